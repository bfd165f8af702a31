"""The agent's on-disk outbox: order, persistence of seq, bounded with telemetry dropped first."""

from __future__ import annotations

from device_agents.spool import Spool


def add(spool, kind, text="x"):
    return spool.add(kind, f"t/{kind}", lambda seq: f"{kind}:{seq}:{text}".encode())


def test_rows_come_back_in_order_until_acknowledged(tmp_path):
    spool = Spool(tmp_path / "s.db")
    ids = [add(spool, "bench")[0] for _ in range(3)]
    assert [r[0] for r in spool.pending()] == ids
    spool.done(ids[0])
    spool.done(ids[0])  # idempotent
    assert [r[2] for r in spool.pending()] == [b"bench:2:x", b"bench:3:x"]
    assert [r[0] for r in spool.pending(after=ids[1])] == [ids[2]]
    assert spool.stats()["pending"] == 2


def test_rows_and_sequence_numbers_survive_a_restart(tmp_path):
    spool = Spool(tmp_path / "s.db")
    add(spool, "bench")
    add(spool, "telemetry")
    spool.close()
    again = Spool(tmp_path / "s.db")
    assert len(again.pending()) == 2
    assert add(again, "bench")[1] == b"bench:2:x" and add(again, "telemetry")[1] == b"telemetry:2:x"


def test_when_full_the_oldest_telemetry_goes_first_and_bench_records_never(tmp_path):
    spool = Spool(tmp_path / "s.db", max_records=3)
    add(spool, "telemetry", "old")
    add(spool, "bench")
    add(spool, "telemetry", "new")
    add(spool, "bench")  # full: drops the oldest telemetry
    payloads = [r[2] for r in spool.pending()]
    assert b"telemetry:1:old" not in payloads and b"telemetry:2:new" in payloads
    add(spool, "bench")  # drops the other telemetry
    add(spool, "bench")  # nothing droppable left: a bench record is kept beyond the bound
    kinds = [r[2].split(b":")[0] for r in spool.pending()]
    assert kinds == [b"bench"] * 4
    row, payload = add(spool, "telemetry")  # full of bench records: this telemetry is dropped, and counted
    assert row is None and payload is None
    assert spool.stats() == {"pending": 4, "dropped_telemetry": 3, "refused_commands": 0, "replayed_commands": 0,
                             "max_records": 3}
