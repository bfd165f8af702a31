"""The history-store contract, run against both backends: the SQLite file and a real PostgreSQL server.

Every method of :class:`edge_kit.telemetry.store.HistoryStore` is exercised here with the same
assertions on both; a method a backend lacks, or answers differently, fails one parametrization.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from edge_kit.errors import HistoryError
from edge_kit.telemetry.store import (
    SCHEMA_VERSION,
    TABLES,
    HistoryStore,
    Store,
    open_history,
)
from edgekit_protocol import messages

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def history_spec(request, tmp_path) -> str:
    """What ``--history`` would be given: a file path, or a new PostgreSQL database's URL."""
    if request.param == "sqlite":
        return str(tmp_path / "h.db")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def history(history_spec):
    store = open_history(history_spec)
    yield store
    store.close()


def bench(device, sha, p90, seq, variant="int8"):
    return messages.envelope("bench", "f", device, seq, {"variant": variant, "sha256": sha, "latency_ms": {"p90": p90},
                                                       "runs": 10, "power": {}, "simulated": False})


def test_open_history_picks_the_backend_from_the_spec(history, history_spec):
    from edge_kit.telemetry.pg import PostgresStore

    assert isinstance(history, HistoryStore)
    assert isinstance(history, PostgresStore if history_spec.startswith("postgresql://") else Store)
    assert ":" not in history.where.split("@")[0].removeprefix("postgresql://")  # no password in messages


def test_duplicates_are_stored_once_and_latest_views_pick_the_newest(history):
    a, b = bench("d1", "s1", 1.0, 1), bench("d1", "s1", 2.0, 2)
    b["ts"] = a["ts"] + 1
    assert history.add_many([("bench", a), ("bench", a), ("bench", b)]) == 2
    assert not history.add("bench", a)
    assert history.count("bench") == 2
    assert history.latest_bench()[("d1", "s1")]["latency_ms"]["p90"] == 2.0
    c = bench("d2", "s1", 3.0, 1)
    assert history.add("bench", c)
    assert {k: v["latency_ms"]["p90"] for k, v in history.latest_bench().items()} == {("d1", "s1"): 2.0, ("d2", "s1"): 3.0}
    assert list(history.latest_bench("d2")) == [("d2", "s1")]
    assert [r["latency_ms"]["p90"] for r in history.recent_bench("d1")[("d1", "s1")]] == [2.0, 1.0]  # newest first
    assert list(history.recent_bench("d2")) == [("d2", "s1")] and history.recent_bench("d1", keep=1)[("d1", "s1")] == [b]
    assert [r["seq"] for r in history.bench_records("d1")] == [1, 2] and len(history.bench_records()) == 3
    history.add("bench", bench("d1", "old-build", 9.0, 3))
    assert [(r["device"], r["seq"]) for r in history.bench_records(sha256s=("s1",))] == [("d1", 1), ("d1", 2), ("d2", 1)]
    assert [r["sha256"] for r in history.bench_records("d1", sha256s=("old-build", "s9"))] == ["old-build"]
    assert history.bench_records(sha256s=()) == [] and len(history.bench_records()) == 4
    assert set(history.recent_bench(sha256s=("s1",))) == {("d1", "s1"), ("d2", "s1")}  # the old build's never ranked
    assert list(history.recent_bench("d1", sha256s=("old-build",))) == [("d1", "old-build")]
    assert history.recent_bench(sha256s=()) == {} and len(history.recent_bench()) == 3


def test_rows_are_ordered_by_the_receivers_clock_not_the_senders(history):
    """A device whose clock runs ahead cannot make an old measurement look newest."""
    early, late = bench("d1", "s1", 1.0, 1), bench("d1", "s1", 2.0, 2)
    early["ts"] = late["ts"] + 3600  # the sender claims the first one is an hour newer
    now = time.time()
    history.add_many([("bench", early)], received=[now])
    history.add_many([("bench", late)], received=[now + 1])
    assert history.latest_bench()[("d1", "s1")]["seq"] == 2
    assert [r["seq"] for r in history.bench_records()] == [1, 2]
    s1 = messages.envelope("status", "f", "d1", 1, {"state": "online"})
    s2 = messages.envelope("status", "f", "d1", 2, {"state": "offline"})
    s1["ts"] = s2["ts"] + 3600
    history.add_many([("status", s2), ("status", s1)], received=[now + 2, now + 1])
    assert history.latest_status()["d1"]["state"] == "offline"
    t1 = messages.envelope("telemetry", "f", "d2", 1, {"conditions": {}, "spool": {}}) | {"ts": 1.0}  # no RTC yet
    history.add_many([("telemetry", t1)], received=[now + 3])
    assert history.last_received() == {"d1": now + 2, "d2": now + 3}  # this host's clock, never the sender's
    # a last will (signed at connect, seq 10) received after the connection's switch (seq 12): current from seq 12
    will, on, switched = (messages.envelope("status", "f", "d3", seq, {"state": state, "connection": "c1",
                                                                        "current": {"sha256": sha}})
                          for seq, state, sha in ((10, "offline", "old"), (11, "online", "old"), (12, "online", "new")))
    history.add_many([("status", on), ("status", switched), ("status", will)], received=[now + 1, now + 2, now + 3])
    assert history.latest_status()["d3"]["state"] == "offline" and history.latest_status()["d3"]["current"] == {"sha256": "new"}


def _status(device, seq, state, connection, sha, epoch="e1"):
    return ("status", messages.envelope("status", "f", device, seq, {"state": state, "connection": connection,
                                                                     "current": {"sha256": sha}}, epoch=epoch))


def test_a_device_is_online_or_offline_by_its_own_order_not_by_when_a_share_worker_stamped_its_status(history):
    """The newest status by receive time decided online or offline: a status a --share peer stamped after the will of
    its own connection (d1), or one of an older connection received after the newer connection's will (d2), showed
    online a device whose last will said offline. Now the device's own order decides (connection, then seq; its
    newest epoch): those stay offline, naming their connection's last model; a newer connection's status received
    before (d3) or after (d4) the older connection's will shows online; without connection or seq (an older agent,
    d5), or two connections' statuses without an epoch (d7: re-flashed, it numbers from 1 again), receive time still
    decides; a re-imaged device's new epoch (d6) outranks its old numbering's higher seq."""
    now = time.time()
    # connection c1: will seq 10 (signed at connect), online 11; c2: will 12 (signed when c1 ended), online 13
    history.add_many([_status("d1", 10, "offline", "c1", "a"), _status("d1", 11, "online", "c1", "b")],
                     received=[now, now + 1])  # the peer holding the online status stamped it last
    history.add_many([_status("d2", 13, "online", "c2", "b"), _status("d2", 12, "offline", "c2", "b"),
                      _status("d2", 11, "online", "c1", "a")], received=[now, now + 1, now + 2])
    history.add_many([_status("d3", 13, "online", "c2", "b"), _status("d3", 10, "offline", "c1", "a")],
                     received=[now, now + 1])  # c1's will published when c2 took the session over
    history.add_many([_status("d4", 10, "offline", "c1", "a"), _status("d4", 13, "online", "c2", "b")],
                     received=[now, now + 1])
    history.add_many([("status", messages.envelope("status", "f", "d5", seq, {"state": state}))
                      for seq, state in ((2, "offline"), (1, "online"))], received=[now, now + 1])
    history.add_epoch("d6", "e1", 1, seen=now - 60)
    history.add_epoch("d6", "e2", 1, seen=now - 30)
    history.add_many([_status("d6", 2, "online", "k2", "new", epoch="e2"), _status("d6", 50, "offline", "k1", "old",
                                                                                   epoch="e1")],
                     received=[now, now + 1])  # the old numbering's will, received late
    history.add_many([_status("d7", 32, "online", "c1", "a", epoch=None), _status("d7", 1, "offline", "c2", "b", epoch=None)],
                     received=[now, now + 1])
    latest = history.latest_status()
    assert {d: (m["state"], m["seq"], m.get("current")) for d, m in latest.items()} == {
        "d1": ("offline", 10, {"sha256": "b"}), "d2": ("offline", 12, {"sha256": "b"}),
        "d3": ("online", 13, {"sha256": "b"}), "d4": ("online", 13, {"sha256": "b"}), "d5": ("online", 1, None),
        "d6": ("online", 2, {"sha256": "new"}), "d7": ("offline", 1, {"sha256": "b"})}
    assert history.latest_status(["d1", "d6", "nope"]) == {d: latest[d] for d in ("d1", "d6")}  # the monitor's ask


def test_sequence_numbers_past_32_bits_are_kept(history):
    """A device's persisted seq only grows: 64 bits on both backends."""
    history.add("bench", bench("d1", "s1", 1.0, 2**40))
    history.add_gap("d1", "bench", 2**33, 2**40 - 1)
    assert history.bench_records()[0]["seq"] == 2**40 and history.count("gaps") == 1


def test_raw_payloads_are_stored_as_received(history):
    m = bench("d1", "s1", 1.5, 1)
    raw = messages.encode({**m, "as": "received"})  # the bytes kept are the payload, not a re-encoding of m
    assert history.add_many([("bench", m)], raw=[raw]) == 1
    assert history.bench_records() == [{**m, "as": "received"}]


def test_status_telemetry_live_shadow_invalid_gaps_and_counts(history):
    history.add("status", messages.envelope("status", "f", "d1", 1, {"state": "online"}))
    history.add("status", messages.envelope("status", "f", "d1", 2, {"state": "offline"}))
    history.add("status", messages.envelope("status", "f", "d2", 1, {"state": "online"}))
    history.add("telemetry", messages.envelope("telemetry", "f", "d1", 1, {"conditions": {"temp_c": 40}}))
    history.add("telemetry", messages.envelope("telemetry", "f", "d1", 2, {"conditions": {"temp_c": 41}}))
    assert {d: m["state"] for d, m in history.latest_status().items()} == {"d1": "offline", "d2": "online"}
    assert history.latest_telemetry()["d1"]["conditions"] == {"temp_c": 41}
    served = {"sha256": "a" * 64, "variant": "int8"}
    for seq, requests in ((1, 10), (2, 25)):
        history.add("live", messages.envelope("live", "f", "d1", seq, {"model": served, "requests": requests,
                                                                        "errors": 0, "window": requests}))
    history.add("shadow", messages.envelope("shadow", "f", "d1", 1, {
        "model": {"sha256": "b" * 64, "variant": "fp32"}, "serving": served, "compared": 9, "window": 9,
        "fidelity": {"snr_db": 2 ** 40 + 0.5}}))  # the indexed snr_db column holds what a double holds
    assert history.latest_live()["d1"]["requests"] == 25 and history.latest_shadow()["d1"]["compared"] == 9
    assert history._rows("SELECT variant, sha256 FROM live WHERE seq = 2") == [("int8", "a" * 64)]
    assert history._rows("SELECT variant, snr_db FROM shadow") == [("fp32", 2 ** 40 + 0.5)]
    history.add_invalid("edgekit/v1/f/d1/bench", "not JSON", b"\xff\x00" * 3000)
    history.add_gap("d1", "bench", 3, 7)
    assert dict(zip(TABLES, (history.count(t) for t in TABLES))) == {
        "status": 3, "bench": 0, "telemetry": 2, "live": 2, "shadow": 1, "decisions": 0, "invalid": 1, "gaps": 1,
        "rollouts": 0, "rollout_devices": 0, "alerts": 0, "alert_holders": 0, "seq_scans": 0, "scan_lease": 0,
        "seq_epochs": 0}
    with pytest.raises(ValueError):
        history.count("sqlite_master")


def test_a_batch_with_a_bad_kind_stores_nothing(history):
    with pytest.raises(ValueError, match="not 'cmd/ack'"):
        history.add_many([("bench", bench("d1", "s1", 1.0, 1)), ("cmd/ack", bench("d1", "s1", 1.0, 2))])
    assert history.count("bench") == 0


def test_decisions_newest_first_per_device_and_limited(history):
    for i, (device, chosen) in enumerate([("d1", "fp32"), ("d2", "int8"), ("d1", "int8"), ("d1", "dynamic-int8")]):
        history.add_decision({"device": device, "chosen": chosen, "current": None, "feasible": i != 1, "switch": True,
                              "artifacts": "/a"})
    assert [d["chosen"] for d in history.decisions("d1")] == ["dynamic-int8", "int8", "fp32"]
    assert [d["chosen"] for d in history.decisions(limit=2)] == ["dynamic-int8", "int8"]
    assert history.decisions("d2")[0]["feasible"] is False and history.decisions(limit=1)[0]["artifacts"] == "/a"
    assert all(isinstance(d["recorded"], float) and abs(d["recorded"] - time.time()) < 60 for d in history.decisions())
    assert history.count("decisions") == 4


def test_newest_decision_per_device_of_a_kind_is_answered_by_the_store(history):
    """The report, fleet status, tune and rollouts ask for the newest decision per device (of a kind): one
    query, not every body of a long history (they read up to 1,000,000 and still missed devices)."""
    rows = [("d1", "fleet selection", "fp32", True, "hot"), ("d2", None, "int8", True, None),
            ("d1", None, "int8", False, None), ("d1", "live gate", "fp16", True, None),
            ("d3", "fleet selection", None, False, None), ("d2", "fleet selection", "fp16", True, None)]
    for device, kind, chosen, feasible, flagged in rows:
        history.add_decision({"device": device, "chosen": chosen, "current": None, "feasible": feasible, "switch": True,
                              **({"kind": kind} if kind else {}), **({"flagged": flagged} if flagged else {})})
    assert {d: m["chosen"] for d, m in history.latest_decisions().items()} == {"d1": "fp16", "d2": "fp16", "d3": None}
    fleet = history.latest_decisions(("fleet selection",))
    assert {d: m["chosen"] for d, m in fleet.items()} == {"d1": "fp32", "d2": "fp16", "d3": None}
    assert fleet["d1"]["flagged"] == "hot" and isinstance(fleet["d1"]["recorded"], float)
    assert {d: m["chosen"] for d, m in history.latest_decisions(("selection",)).items()} == {"d1": "int8", "d2": "int8"}
    # the newest that chose a feasible variant, passing over d1's newer infeasible one and the gate's
    assert {d: m["chosen"] for d, m in history.latest_decisions(("selection", "fleet selection"), feasible=True).items()} \
        == {"d1": "fp32", "d2": "fp16"}
    assert [d["chosen"] for d in history.decisions(kinds=("live gate",))] == ["fp16"]
    assert [d["chosen"] for d in history.decisions("d1", kinds=("selection", "live gate"))] == ["fp16", "int8"]
    assert history.latest_decisions(()) == {} and history.decisions(kinds=()) == []


# The decisions table as edge-kit wrote it before it had a ``kind`` column.
_OLD_DECISIONS = ("CREATE TABLE decisions (id {serial}, device TEXT, ts {real}, chosen TEXT, previous TEXT, "
                  "feasible INTEGER, switched INTEGER, body TEXT)")


def test_a_history_written_before_decisions_had_a_kind_is_migrated_when_opened(history_spec, monkeypatch):
    """A file or database made by the old schema: the column is added, every old row gets its kind from its
    body (in batches), and the new queries answer on it; opening it again changes nothing."""
    import json

    from edge_kit.telemetry import store as store_module

    bodies = [{"device": f"d{i % 4}", "chosen": f"v{i}", "current": None, "feasible": True, "switch": False,
               **({"kind": "fleet selection", "flagged": f"why {i}"} if i % 3 == 0 else {}),
               **({"kind": "live gate"} if i % 3 == 1 else {}), "confidence": float("nan") if i == 5 else 1.0}
              for i in range(12)]
    rows = [(b["device"], 1000.0 + i, b["chosen"], None, 1, 0, json.dumps(b)) for i, b in enumerate(bodies)]
    insert = "INSERT INTO decisions (device, ts, chosen, previous, feasible, switched, body) VALUES ({0}, {0}, {0}, {0}, {0}, {0}, {0})"
    if history_spec.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(history_spec, autocommit=True) as conn:
            conn.execute(_OLD_DECISIONS.format(serial="BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
                                               real="DOUBLE PRECISION"))
            with conn.cursor() as cur:
                cur.executemany(insert.format("%s"), rows)
    else:
        import sqlite3

        with sqlite3.connect(history_spec) as conn:
            conn.execute(_OLD_DECISIONS.format(serial="INTEGER PRIMARY KEY AUTOINCREMENT", real="REAL"))
            conn.executemany(insert.format("?"), rows)
        conn.close()
    monkeypatch.setattr(store_module, "BATCH_ROWS", 5)  # 12 old rows: three batches
    for again in (0, 1):
        history = open_history(history_spec)
        try:
            assert history.count("decisions") == 12 + again
            newest = {d: m["chosen"] for d, m in history.latest_decisions().items()}
            assert newest == {"d0": "v8", "d1": "v9", "d2": "v10", "d3": "v11", **({"d9": "new"} if again else {})}
            fleet = history.latest_decisions(("fleet selection",))
            assert {d: m["chosen"] for d, m in fleet.items()} == {"d0": "v0", "d1": "v9", "d2": "v6", "d3": "v3"}
            assert {d: m["chosen"] for d, m in history.latest_decisions(("selection",)).items()} == {
                "d0": "v8", "d1": "v5", "d2": "v2", "d3": "v11", **({"d9": "new"} if again else {})}
            assert [d["chosen"] for d in history.decisions(kinds=("live gate",), limit=2)] == ["v10", "v7"]
            if not again:
                history.add_decision({"device": "d9", "chosen": "new", "current": None, "feasible": True, "switch": True})
        finally:
            history.close()
    assert rows_without_kind(history_spec) == 0


def rows_without_kind(spec: str) -> int:
    """Return how many decisions rows have no kind, read with the database's own client (not the store)."""
    if spec.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(spec) as conn:
            return conn.execute("SELECT COUNT(*) FROM decisions WHERE kind IS NULL").fetchone()[0]
    import sqlite3

    conn = sqlite3.connect(spec)
    try:
        return conn.execute("SELECT COUNT(*) FROM decisions WHERE kind IS NULL").fetchone()[0]
    finally:
        conn.close()


_WRITER = """
import sys
from edge_kit.telemetry.store import open_history
from edgekit_protocol import messages
store = open_history(sys.argv[1])
start = int(sys.argv[2])
new = 0
for first in range(start, start + 600, 50):  # overlapping ranges, batches of 50, in opposite orders
    batch = [("bench", messages.envelope("bench", "f", "d1", i, {"sha256": "s", "variant": "v"})
              | {"msg_id": f"m{i}"}) for i in range(first, first + 50)]
    new += store.add_many(batch[::-1] if start else batch)
print(new)
"""


def test_several_processes_writing_overlapping_batches_store_each_record_once(history, history_spec):
    """Two workers (processes) store overlapping message ranges at once: every msg_id once, no deadlock."""
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, history_spec, str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for start in (0, 300)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert sum(int(out) for out, _ in outs) == 900 == history.count("bench")


def test_a_database_that_cannot_be_reached_is_one_line_naming_it(postgres_server, tmp_path):
    from edge_kit.sim.broker import free_port

    url = f"postgresql://edgekit:secret@127.0.0.1:{free_port()}/edgekit"
    with pytest.raises(HistoryError) as info:
        open_history(url)
    text = str(info.value)
    assert "\n" not in text and "secret" not in text and f"postgresql://edgekit@127.0.0.1:{url.split(':')[3]}" in text
    assert "--history" in text
    wrong = postgres_server.url.replace(postgres_server.password, "wrong")
    with pytest.raises(HistoryError, match="password authentication failed"):
        open_history(wrong)
    (tmp_path / "not-a-db").write_text("hello " * 1000)
    with pytest.raises(HistoryError, match="not-a-db"):
        open_history(tmp_path / "not-a-db")


def test_a_server_stopped_and_started_again_fails_one_call_then_reconnects(tmp_path):
    from edge_kit.sim.postgres import PostgresServer

    with PostgresServer(settings={"fsync": "off"}) as server:
        store = open_history(server.url)
        assert store.add("bench", bench("d1", "s1", 1.0, 1))
        server.stop()
        with pytest.raises(HistoryError, match="history database postgresql://edgekit@127.0.0.1"):
            store.add_many([("bench", bench("d1", "s1", 1.0, 2)), ("bench", bench("d1", "s1", 1.0, 3))])
        server.start()
        assert store.count("bench") == 1  # nothing of the failed batch, the earlier row kept
        assert store.add("bench", bench("d1", "s1", 1.0, 2)) and store.count("bench") == 2
        store.close()


def test_every_connection_turns_jit_off_and_a_server_without_jit_is_read_and_written(postgres_url, monkeypatch):
    """Each connection turns JIT compilation off (a newest-per-device read, guessed costly, was compiled for seconds),
    a reconnection too. A server that has no ``jit`` setting (PostgreSQL 10, told here by a server whose setting has
    another name) refused ``SET jit = off``, so edge-kit could open no history there: it is read and written as before."""
    import psycopg

    store = open_history(postgres_url)
    store._conn.close()  # a reconnection sets it again
    assert store._rows("SHOW jit") == [("off",)]
    store.close()
    real = psycopg.Connection.execute
    monkeypatch.setattr(psycopg.Connection, "execute",
                        lambda conn, query, *a, **k: real(conn, query.replace("jit", "no_jit_here"), *a, **k))
    store = open_history(postgres_url)
    assert store.add("bench", bench("d1", "s1", 1.0, 1)) and set(store.latest_bench()) == {("d1", "s1")}
    store.close()


def test_rollout_state_has_one_owner_at_a_time_and_device_rows_update_in_place(history):
    """What `edgekit rollout` keeps to resume after a restart (edge_kit.loop.waves)."""
    history.save_rollout("r1", "running", {"variant": "int8"})
    assert history.claim_rollout("r1", "host-a:1", stale_s=60) is None
    assert history.claim_rollout("r1", "host-b:2", stale_s=60) == "host-a:1"  # a second start is refused
    time.sleep(0.05)
    assert history.claim_rollout("r1", "host-b:2", stale_s=0.02) is None  # a dead owner's claim goes stale (database clock)
    assert history.claim_rollout("nope", "host-b:2", stale_s=60) is not None
    big = 1_795_900_000_123  # revisions are clock-based: past 32 bits (PostgreSQL's INTEGER)
    history.set_rollout_devices("r1", [{"device": "d1", "wave": 0, "state": "sent", "revision": 5, "detail": {"a": 1}},
                                       {"device": "d2", "wave": 1, "state": "sent", "revision": big}])
    history.set_rollout_devices("r1", [{"device": "d1", "wave": 0, "state": "converged", "revision": 5}])
    history.set_rollout_devices("r1", [])
    rows = history.rollout_devices("r1")
    assert {d: r["state"] for d, r in rows.items()} == {"d1": "converged", "d2": "sent"} and rows["d2"]["revision"] == big
    assert rows["d1"]["detail"] == {} and rows["d2"]["wave"] == 1 and abs(rows["d1"]["ts"] - time.time()) < 60
    history.set_rollout_state("r1", "aborting")
    assert history.heartbeat_rollout("r1", "host-b:2") == "aborting" and history.heartbeat_rollout("r9", "x") == "missing"
    history.release_rollout("r1", "host-b:2")
    record = history.rollout("r1")
    assert record["owner"] is None and record["body"] == {"variant": "int8"} and record["state"] == "aborting"
    assert isinstance(record["created"], float) and record["heartbeat"] >= record["created"]
    history.save_rollout("r1", "finished", {"variant": "int8", "outcome": "done"})  # an update keeps created
    assert history.rollout("r1")["created"] == record["created"] and history.rollout("r1")["state"] == "finished"
    time.sleep(0.01)
    history.save_rollout("r2", "running", {})
    assert [r["id"] for r in history.rollouts()] == ["r2", "r1"] and [r["id"] for r in history.rollouts(limit=1)] == ["r2"]
    assert history.rollout("r3") is None and history.rollout_devices("r3") == {}
    assert history.count("rollouts") == 2 and history.count("rollout_devices") == 2


_CLAIMER = """
import sys
from edge_kit.telemetry.store import open_history
store = open_history(sys.argv[1])
wins = sum(store.claim_rollout(f"r{i}", sys.argv[2], stale_s=3600) is None for i in range(40))
print(wins)
"""


def test_hosts_claiming_the_same_rollouts_at_once_get_each_one_once(history, history_spec):
    """Two processes (hosts) resume the same 40 rollouts at the same moment: each is driven by exactly one."""
    for i in range(40):
        history.save_rollout(f"r{i}", "running", {})
    procs = [subprocess.Popen([sys.executable, "-c", _CLAIMER, history_spec, owner], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for owner in ("host-a:1", "host-b:2")]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert sum(int(out) for out, _ in outs) == 40
    assert {r["owner"] for r in history.rollouts(limit=100)} <= {"host-a:1", "host-b:2"}


def test_every_method_lives_on_the_interface_not_on_one_backend():
    """A method added to the SQLite store alone (and so missing on PostgreSQL) fails here: the SQL goes
    in HistoryStore, a backend only connects and runs statements."""
    from edge_kit.telemetry.pg import PostgresStore

    for backend in (Store, PostgresStore):
        own = {n for n, v in vars(backend).items() if callable(v) and not n.startswith("_")}
        assert own <= {"close"}, f"{backend.__name__} has its own {sorted(own - {'close'})}: put them in HistoryStore"
    assert not PostgresStore.__abstractmethods__ and not Store.__abstractmethods__


def test_a_server_restarted_while_the_store_was_idle_costs_no_call():
    """A routine restart (upgrade, failover, config change) between two calls of a long monitor, tune or rollout:
    the dead idle connection is noticed before anything is sent on it, so the next call runs on a fresh one;
    nothing is lost or stored twice, and no statement is sent twice."""
    from edge_kit.sim.postgres import PostgresServer

    with PostgresServer(settings={"fsync": "off"}) as server:
        store = open_history(server.url)
        assert store.add("bench", bench("d1", "s1", 1.0, 1))
        server.stop()
        server.start()
        assert store.add_many([("bench", bench("d1", "s1", 1.0, 2)), ("bench", bench("d1", "s1", 1.0, 3))]) == 2
        store.add_decision({"device": "d1", "chosen": "int8", "current": None, "feasible": True, "switch": False})
        server.stop()
        server.start()
        assert store.count("bench") == 3 and len(store.decisions()) == 1
        store.close()


@pytest.mark.parametrize("url, why", [("postgresql://edgekit:secret@[::1/edgekit", "Invalid IPv6 URL"),
                                      ("postgresql://edgekit:secret@h:99999/edgekit", "Port out of range 0-65535")])
def test_a_history_url_that_does_not_parse_is_bad_input_without_its_password(url, why, run_cli, tmp_path):
    """`--history postgresql://u:pw@[::1/db` (or a port over 65535) raised ValueError from urllib (a traceback)."""
    from edge_kit.errors import InputError

    with pytest.raises(InputError) as info:
        open_history(url)
    assert str(info.value) == (f"--history: not a valid PostgreSQL URL ({why}); give "
                               "postgresql://user:password@host:port/db")
    code, out, err = run_cli("report", "--history", url, "--out", tmp_path / "r.html")
    assert code == 2 and err == f"edgekit: error: {info.value}\n" and "secret" not in err


def test_a_record_the_database_cannot_hold_is_refused_as_the_records_fault_and_the_store_goes_on(history):
    """A row no column takes (a seq beyond 64 bits: the protocol refuses it at decode, a caller may not) failed as
    the database's fault: SQLite raised a bare OverflowError (the monitor's writer acknowledged and lost its whole
    batch), PostgreSQL a HistoryError that stopped the monitor ("check that the server is up"). Both now raise
    HistoryRecordError, store nothing of that batch, and take the next one."""
    from edge_kit.errors import HistoryRecordError

    good, huge = bench("d1", "s1", 1.0, 1), bench("d1", "s1", 2.0, 2)
    huge["seq"] = 2 ** 64
    with pytest.raises(HistoryRecordError, match="refused a record"):
        history.add_many([("bench", good), ("bench", huge)])
    assert history.count("bench") == 0
    assert history.add_many([("bench", good)]) == 1 and history.count("bench") == 1


def test_a_refused_message_is_kept_whatever_its_topic_and_reason_hold(history):
    """The topic of a refused message is the sender's, and a reason may quote it: a NUL (PostgreSQL's text refuses
    it) or a lone surrogate (neither database takes one) failed the insert, so keeping the refusal failed (the
    monitor stopped on PostgreSQL; on SQLite its batch was lost). Both are stored escaped, the payload as received."""
    history.add_invalid("edgekit/v1/f/d\x00/bench", "why \ud800 \x1b[31m", b"\x00\xff{")
    assert history.count("invalid") == 1
    assert history._rows("SELECT topic, reason, payload FROM invalid") == [
        ("edgekit/v1/f/d\\x00/bench", "why \\ud800 \\x1b[31m", b"\x00\xff{")]


def test_a_refused_message_an_older_edge_kit_wrote_after_the_upgrade_is_read_under_its_topics_device(history):
    """An older edge-kit still writing an upgraded history (a monitor not yet updated) inserts refused messages
    without the device column: `history refused --device d_1` left them out and listed them under no device until
    the next upgrade. The reader takes their device from their topic (the rule the upgrade fills older rows by), in
    the filter too; a topic that only looks like it names the device (not an edge-kit topic) is not taken for it."""
    history.add_invalid("edgekit/v1/f/d_1/bench", "new", b"{}")
    old = "INSERT INTO invalid (ts, topic, reason, payload) VALUES (?, ?, ?, ?)"  # the older edge-kit's statement
    for i, t in enumerate(("edgekit/v1/f/d_1/status", "edgekit/v1/f/dx1/status", "edgekit/v1/f/x/d_1/bench",
                           "junk", "edgekit/v1/f/d\\x00/bench", "edgekit/v1/f/d_1/live")):
        history._execute(old, (time.time() + i, t, f"old {i}", b"{}"))
    assert history._rows("SELECT COUNT(*) FROM invalid WHERE device IS NULL") == [(6,)]
    assert [(r["device"], r["reason"]) for r in history.refused_messages()] == [
        ("d_1", "old 5"), ("d\\x00", "old 4"), (None, "old 3"), (None, "old 2"), ("dx1", "old 1"), ("d_1", "old 0"),
        ("d_1", "new")]
    assert [r["reason"] for r in history.refused_messages(device="d_1")] == ["old 5", "old 0", "new"]
    assert [r["reason"] for r in history.refused_messages(device="d_1", limit=2)] == ["old 5", "old 0"]
    assert [r["reason"] for r in history.refused_messages(device="d\\x00")] == ["old 4"]
    assert history.refused_messages(device="x") == []


def test_a_decision_an_edge_kit_older_than_the_kind_column_wrote_after_the_upgrade_is_of_its_bodys_kind(history):
    """An edge-kit from before decisions had a kind, still writing an upgraded history, leaves the column empty. The
    docs said a newer edge-kit fills it when it next opens the history; since the schema has a version, a current one
    is never migrated again, so those decisions stayed out of every read by kind (`rollout start --variant selected`
    did not see an old tune's choice). They are now read as the kind their body says."""
    import json

    history.add_decision({"device": "d1", "chosen": "v1", "current": None, "feasible": True, "switch": True})
    old = "INSERT INTO decisions (device, ts, chosen, previous, feasible, switched, body) VALUES (?, ?, ?, ?, ?, ?, ?)"
    for device, chosen, feasible, extra in (("d1", "v2", 1, {"kind": "fleet selection"}), ("d2", "v3", 1, {}),
                                            ("d1", "v4", 1, {"kind": "live gate"}), ("d3", "v5", 0, {})):
        body = {"device": device, "chosen": chosen, "current": None, "feasible": bool(feasible), "switch": False, **extra}
        history._execute(old, (device, time.time(), chosen, None, feasible, 0, json.dumps(body)))
    assert history._rows("SELECT COUNT(*) FROM decisions WHERE kind IS NULL") == [(4,)]

    def newest(*kinds, feasible=False):
        return {d: m["chosen"] for d, m in history.latest_decisions(kinds, feasible=feasible).items()}

    assert newest("selection", "fleet selection", feasible=True) == {"d1": "v2", "d2": "v3"}
    assert newest("selection") == {"d1": "v1", "d2": "v3", "d3": "v5"}
    assert newest("live gate") == {"d1": "v4"} and newest() == {}
    assert {d: m["chosen"] for d, m in history.latest_decisions().items()} == {"d1": "v4", "d2": "v3", "d3": "v5"}
    assert [d["chosen"] for d in history.decisions(kinds=("selection",))] == ["v5", "v3", "v1"]
    assert [d["chosen"] for d in history.decisions(kinds=("selection",), limit=2)] == ["v5", "v3"]
    assert [d["chosen"] for d in history.decisions("d1", kinds=("selection", "live gate"))] == ["v4", "v1"]
    assert [d["chosen"] for d in history.decisions("d1")] == ["v4", "v2", "v1"] and history.decisions(kinds=()) == []


def test_the_newest_decision_of_a_kind_parses_only_the_kindless_rows_newer_than_the_devices_newest_of_it(history,
                                                                                                        monkeypatch):
    """With kinds, latest_decisions read and parsed every decision an older edge-kit wrote without the kind column,
    however old (its docstring promised one body per device, however long the history). Now it parses only the
    kindless rows newer than the device's newest row of the kinds asked, newest first, until one is of them; the
    answer is the same."""
    import json

    from edge_kit.telemetry import store as store_module

    old = "INSERT INTO decisions (device, ts, chosen, previous, feasible, switched, body) VALUES (?, ?, ?, ?, ?, ?, ?)"

    def kindless(device, chosen, **extra):
        body = {"device": device, "chosen": chosen, "current": None, "feasible": True, "switch": False, **extra}
        return (device, time.time(), chosen, None, 1, 0, json.dumps(body))

    history._write_batch([(old, [kindless("d1", f"old{i}") for i in range(200)])])  # before a newer one wrote d1's
    history.add_decision({"device": "d1", "chosen": "typed", "current": None, "feasible": True, "switch": True})
    history._write_batch([(old, [kindless("d1", "after"), kindless("d1", "gate", kind="live gate"),
                                 kindless("d2", "a"), kindless("d2", "b")])])
    real, parsed = store_module.decision_kind, []
    monkeypatch.setattr(store_module, "decision_kind", lambda m: parsed.append(m["chosen"]) or real(m))
    assert {d: m["chosen"] for d, m in history.latest_decisions(("selection",)).items()} == {"d1": "after", "d2": "b"}
    assert sorted(parsed) == ["after", "b", "gate"]  # d1's 200 older ones and d2's older one: not parsed
    parsed.clear()
    assert {d: m["chosen"] for d, m in history.latest_decisions(("live gate",)).items()} == {"d1": "gate"}
    assert sorted(parsed) == ["a", "b", "gate"]  # d1 has no typed one: its newest kindless one is, the rest unparsed


def test_a_decision_the_database_cannot_hold_is_refused_as_the_records_fault(history):
    """A decision quoting a name no database takes (a lone surrogate, from a device's word) raised a bare
    UnicodeEncodeError from both backends: tune stopped with a traceback. Now it is HistoryRecordError, nothing of
    it stored, and the next decision goes in."""
    from edge_kit.errors import HistoryRecordError

    with pytest.raises(HistoryRecordError, match="refused a record"):
        history.add_decision({"device": "d1", "chosen": "int8", "current": "\ud800", "feasible": True, "switch": True})
    assert history.count("decisions") == 0
    history.add_decision({"device": "d1", "chosen": "int8", "current": None, "feasible": True, "switch": True})
    assert history.count("decisions") == 1


def _psql(url: str, *statements: str) -> None:
    """Run ``statements`` as the owner of the database ``url`` names (the server's superuser)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def test_a_role_with_select_alone_reads_the_history_and_is_told_what_to_run_on_an_older_schema(postgres_url, run_cli,
                                                                                                tmp_path):
    """Opening the history ran CREATE TABLE / CREATE INDEX / ALTER TABLE every time: a role that may only read (a
    dashboard's, an analyst's) could not even run `edgekit report`. A reader now checks the schema's version and
    changes nothing; on an older schema it gets one line naming `edgekit history upgrade`, which the owner runs."""
    import json
    from urllib.parse import urlsplit

    writer = open_history(postgres_url)
    writer.add("bench", bench("d1", "s1", 1.0, 1))
    writer.add_invalid("edgekit/v1/f/d1/bench", "forged", b"{}")
    writer.close()
    parts = urlsplit(postgres_url)
    role = f"reader_{parts.path.lstrip('/')}"
    _psql(postgres_url, f"CREATE ROLE {role} LOGIN PASSWORD 'readonly'", f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    reader = parts._replace(netloc=f"{role}:readonly@{parts.hostname}:{parts.port}").geturl()

    code, out, err = run_cli("report", "--history", reader, "--out", tmp_path / "r.html", "--json")
    assert code == 0, err
    assert json.loads(out)["records"] == 1 and json.loads(out)["refused"] == 1
    code, out, err = run_cli("history", "refused", "--history", reader, "--json")
    assert code == 0 and [r["device"] for r in json.loads(out)["refused"]] == ["d1"], err

    _psql(postgres_url, "UPDATE edgekit_schema SET version = 1")  # as an older edge-kit left it
    code, out, err = run_cli("report", "--history", reader, "--out", tmp_path / "r.html")
    assert code == 6 and err.count("\n") == 1 and f"{role}:readonly" not in err
    assert (f"was written by an older edge-kit (schema version 1; this one reads {SCHEMA_VERSION}) and this command only reads it: run "
            "`edgekit history upgrade --history <it>` once as a user (or PostgreSQL role) that owns its tables") in err
    code, out, err = run_cli("history", "upgrade", "--history", postgres_url)
    assert code == 0, err
    code, out, err = run_cli("report", "--history", reader, "--out", tmp_path / "r.html", "--json")
    assert code == 0 and json.loads(out)["records"] == 1, err

    # a history of version 2 upgraded by its owner gets a new table (alerts) the reader's table-by-table grant
    # does not cover: one line naming the grant, not "check that the server is up"
    _psql(postgres_url, "DROP TABLE alerts", "UPDATE edgekit_schema SET version = 2")
    code, out, err = run_cli("history", "upgrade", "--history", postgres_url)
    assert code == 0, err
    code, out, err = run_cli("history", "alerts", "--history", reader)
    assert code == 6 and err.count("\n") == 1 and "permission denied for table alerts" in err, err
    assert "the role needs a grant on it, e.g. GRANT SELECT ON ALL TABLES IN SCHEMA public TO <role>" in err
    assert "check that the server is up" not in err


def test_a_writer_role_that_does_not_own_the_tables_is_told_an_older_schema_needs_its_owner(postgres_url, run_cli):
    """A role granted INSERT and SELECT (a monitor's, on a database its owner set up) meeting an older schema tried the
    upgrade itself and stopped with the generic 'database failed (permission denied for schema public): check that
    the server is up'. Now it changes nothing and gets one line: the history needs `edgekit history upgrade`, which
    only its tables' owner can run; once the owner has, the same role writes."""
    from urllib.parse import urlsplit

    owner = open_history(postgres_url)
    owner.add("bench", bench("d1", "s1", 1.0, 1))
    owner.close()
    parts = urlsplit(postgres_url)
    role = f"writer_{parts.path.lstrip('/')}"
    _psql(postgres_url, f"CREATE ROLE {role} LOGIN PASSWORD 'writes'",
          f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {role}",
          f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}")
    writer = parts._replace(netloc=f"{role}:writes@{parts.hostname}:{parts.port}").geturl()
    store = open_history(writer)  # the current schema: it writes
    store.add("bench", bench("d1", "s1", 1.0, 2))
    store.close()

    _psql(postgres_url, "UPDATE edgekit_schema SET version = 1")  # as an older edge-kit left it
    want = (f"the history postgresql://{role}@{parts.hostname}:{parts.port}{parts.path} was written by an older "
            f"edge-kit (schema version 1; this one reads {SCHEMA_VERSION}) and needs an upgrade that only the owner of its tables can "
            "run (this role is not; they belong to edgekit): run `edgekit history upgrade --history <it>` once as "
            "edgekit, then run again")
    with pytest.raises(HistoryError) as refused:
        open_history(writer)
    assert str(refused.value) == want
    code, out, err = run_cli("history", "upgrade", "--history", writer)
    assert code == 6 and err == f"edgekit: error: {want}\n" and out == ""
    import psycopg

    with psycopg.connect(postgres_url) as conn:  # nothing was changed: still the older version, no half upgrade
        assert conn.execute("SELECT version FROM edgekit_schema WHERE name = 'history'").fetchall() == [(1,)]

    code, out, err = run_cli("history", "upgrade", "--history", postgres_url)
    assert code == 0, err
    store = open_history(writer)
    store.add("bench", bench("d1", "s1", 1.0, 3))
    assert store.count("bench") == 3
    store.close()


def _as_before_the_version(spec: str) -> None:
    """Leave the history ``spec`` names as the previous edge-kit did: schema version 1, no ``edgekit_schema`` table."""
    if spec.startswith("postgresql://"):
        _psql(spec, "DROP TABLE edgekit_schema")
        return
    import sqlite3

    with sqlite3.connect(spec) as conn:
        conn.execute("DROP TABLE edgekit_schema")
    conn.close()


def test_a_reader_of_a_history_the_previous_edge_kit_wrote_upgrades_it_when_it_may(history_spec, run_cli, tmp_path):
    """Readers were made to change no schema, and so `report`, `history refused` and `fleet status` refused a history the
    previous edge-kit wrote, a SQLite file their user may write or a database whose tables their role owns, where
    opening it upgraded it before. A reader that may write upgrades it; one that may not is told what to run (a role
    with SELECT alone: test_a_role_with_select_alone_...; a read-only file: tests/host/test_history_unwritable.py)."""
    import json

    writer = open_history(history_spec)
    writer.add("bench", bench("d1", "s1", 1.0, 1))
    writer.close()
    _as_before_the_version(history_spec)
    code, out, err = run_cli("report", "--history", history_spec, "--out", tmp_path / "r.html", "--json")
    assert code == 0 and json.loads(out)["records"] == 1, err
    reader = open_history(history_spec, write=False)  # upgraded: it opens as the current schema, nothing to do
    try:
        assert reader._schema_version() == SCHEMA_VERSION and "edgekit_schema" in reader._tables()
    finally:
        reader.close()


def test_a_history_a_newer_edge_kit_wrote_is_refused_to_writers_and_read_by_readers(history_spec, run_cli, tmp_path):
    """A history whose schema a newer edge-kit recorded (one `--share` worker updated before the others) opened as
    current: an older monitor joining wrote the newer tables as its own, and its upgrade set the version back. Now a
    writer is refused in one line naming the history (no password), both versions and the edge-kit to run, exit 6,
    nothing changed; `report` and `fleet status` still read it."""
    import json
    from urllib.parse import urlsplit

    newer = SCHEMA_VERSION + 1
    store = open_history(history_spec)
    store.add("bench", bench("d1", "s1", 1.0, 1))
    store._execute("UPDATE edgekit_schema SET version = ? WHERE name = 'history'", (newer,))
    store._set_schema_version()  # an older edge-kit's upgrade finishing meanwhile: the newer version stays
    assert store._schema_version() == newer
    where = store.where
    store.close()
    want = (f"the history {where} was written by a newer edge-kit (schema version {newer}; this one writes "
            f"{SCHEMA_VERSION}) and this command would write to it: upgrade edge-kit on this host to the version that "
            f"wrote it (schema {newer}), then run again")
    with pytest.raises(HistoryError) as refused:
        open_history(history_spec)
    assert str(refused.value) == want
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("fleet: f\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: u, profile: rpi4}\n"
                     "devices:\n  - {name: d1, host: 127.0.0.1}\n")
    code, out, err = run_cli("monitor", "--fleet", fleet, "--history", history_spec, "--duration", "1")
    assert (code, out, err) == (6, "", f"edgekit: error: {want}\n")
    assert urlsplit(history_spec).password is None or urlsplit(history_spec).password not in err

    code, out, err = run_cli("report", "--history", history_spec, "--out", tmp_path / "r.html", "--json")
    assert code == 0 and json.loads(out)["records"] == 1, err
    code, out, err = run_cli("fleet", "status", "--fleet", fleet, "--history", history_spec, "--history-only", "--json")
    assert code == 0 and list(json.loads(out)["bench"]) == ["d1/s1"], err
    reader = open_history(history_spec, write=False)
    try:
        assert reader._schema_version() == newer and reader.count("bench") == 1
    finally:
        reader.close()


def test_a_database_before_any_monitor_ran_reads_as_an_empty_fleet(postgres_url, run_cli, tmp_path):
    """A PostgreSQL database made for the fleet, before any monitor or tune wrote to it: `fleet status` and `report`
    said "holds no edge-kit history yet" (exit 6), where they showed an empty fleet before. No tables is nothing stored
    yet; a reader reads it as an empty history and creates nothing."""
    import json

    reader = open_history(postgres_url, write=False)
    try:
        assert reader.count("bench") == 0 and reader.latest_status() == {} and reader.latest_bench() == {}
        assert reader.refused_messages() == [] and reader.decisions() == [] and reader.rollouts() == []
        assert reader.last_received() == {} and reader.latest_decisions() == {}
    finally:
        reader.close()
    (tmp_path / "fleet.yaml").write_text("fleet: f\ndefaults: {user: u, profile: rpi4}\ndevices:\n  - {name: a, host: h}\n")
    code, out, err = run_cli("fleet", "status", "--fleet", tmp_path / "fleet.yaml", "--history", postgres_url,
                             "--history-only", "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert list(shown["state"]) == ["a"] and shown["status"] == {} and shown["bench"] == {}
    code, out, err = run_cli("report", "--history", postgres_url, "--out", tmp_path / "r.html", "--json")
    assert code == 0 and json.loads(out)["records"] == 0, err
    import psycopg

    with psycopg.connect(postgres_url) as conn:  # a reader created nothing
        assert conn.execute("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public'").fetchone() == (0,)


def test_an_owner_of_the_tables_that_may_not_create_in_the_schema_is_told_what_the_upgrade_needs(postgres_url, run_cli):
    """A role that owns the tables of an older schema (version 1 lacks `edgekit_schema`) but has no CREATE on the schema
    tried the upgrade and got the generic 'failed (permission denied for schema public): check that the server is up'.
    It now changes nothing and gets one line naming the privilege and the GRANT; once granted, it upgrades."""
    from urllib.parse import urlsplit

    owner = open_history(postgres_url)
    owner.add("bench", bench("d1", "s1", 1.0, 1))
    owner.close()
    _as_before_the_version(postgres_url)
    parts = urlsplit(postgres_url)
    role = f"tables_{parts.path.lstrip('/')}"
    _psql(postgres_url, f"CREATE ROLE {role} LOGIN PASSWORD 'owns'", "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
          *(f"ALTER TABLE {t} OWNER TO {role}" for t in TABLES))
    url = parts._replace(netloc=f"{role}:owns@{parts.hostname}:{parts.port}").geturl()
    want = (f"the history postgresql://{role}@{parts.hostname}:{parts.port}{parts.path} was written by an older "
            f"edge-kit (schema version 1; this one reads {SCHEMA_VERSION}) and needs an upgrade that creates tables and "
            f"indexes in schema public, where this role ({role}) may not create: run `edgekit history upgrade --history "
            f"<it>` once as a role that owns its tables and may create in public (or have the schema's owner run "
            f"`GRANT CREATE ON SCHEMA public TO {role}` first), then run again")
    with pytest.raises(HistoryError) as refused:
        open_history(url)
    assert str(refused.value) == want
    code, out, err = run_cli("history", "upgrade", "--history", url)
    assert code == 6 and err == f"edgekit: error: {want}\n" and out == ""
    code, out, err = run_cli("report", "--history", url, "--out", "/dev/null")  # a reader: the line for readers
    assert code == 6 and "this command only reads it" in err and err.count("\n") == 1, err

    _psql(postgres_url, f"GRANT CREATE ON SCHEMA public TO {role}")
    store = open_history(url)  # the owner, now allowed to create: it upgrades and writes
    try:
        assert store._schema_version() == SCHEMA_VERSION
        store.add("bench", bench("d1", "s1", 1.0, 2))
        assert store.count("bench") == 2
    finally:
        store.close()


def test_a_read_only_session_of_the_tables_owner_is_refused_the_upgrade_in_one_line(postgres_url, run_cli, tmp_path):
    """A reader that owns the tables upgrades an older schema; in a session that may not write (a hot standby, a role
    with default_transaction_read_only, a dashboard's usual setup) that upgrade failed with the generic 'failed (cannot
    execute CREATE TABLE in a read-only transaction): check that the server is up'. It changes nothing: a reader gets
    the readers' line, a writer the line naming the read-only session and the primary server."""
    from urllib.parse import urlsplit

    owner = open_history(postgres_url)
    owner.add("bench", bench("d1", "s1", 1.0, 1))
    owner.close()
    _as_before_the_version(postgres_url)
    parts = urlsplit(postgres_url)
    role = f"replica_{parts.path.lstrip('/')}"
    _psql(postgres_url, f"CREATE ROLE {role} LOGIN PASSWORD 'reads'", f"GRANT CREATE ON SCHEMA public TO {role}",
          f"ALTER ROLE {role} SET default_transaction_read_only = on",
          *(f"ALTER TABLE {t} OWNER TO {role}" for t in TABLES))
    url = parts._replace(netloc=f"{role}:reads@{parts.hostname}:{parts.port}").geturl()
    code, out, err = run_cli("report", "--history", url, "--out", tmp_path / "r.html")
    assert code == 6 and err.count("\n") == 1 and "this command only reads it: run `edgekit history upgrade" in err, err
    with pytest.raises(HistoryError) as refused:
        open_history(url)
    assert str(refused.value) == (
        f"the history postgresql://{role}@{parts.hostname}:{parts.port}{parts.path} was written by an older edge-kit "
        f"(schema version 1; this one reads {SCHEMA_VERSION}) and needs an upgrade, and this session may not write (a "
        "read-only transaction: a standby server, or default_transaction_read_only): run `edgekit history upgrade "
        "--history <it>` once as a role that owns its tables, on the primary server, then run again")
    _psql(postgres_url, f"ALTER ROLE {role} RESET default_transaction_read_only")
    code, out, err = run_cli("report", "--history", url, "--out", tmp_path / "r.html")  # now it may: it upgrades
    assert code == 0, err


def _as_before_alerts(spec: str) -> None:
    """Leave the history ``spec`` names as the previous edge-kit did: schema version 2, no ``alerts`` table."""
    statements = ("DROP TABLE alerts", "DELETE FROM edgekit_schema WHERE name = 'alerts'",
                  "UPDATE edgekit_schema SET version = 2")
    if spec.startswith("postgresql://"):
        _psql(spec, *statements)
        return
    import sqlite3

    with sqlite3.connect(spec) as conn:
        for statement in statements:
            conn.execute(statement)
    conn.close()


def test_alerts_are_kept_one_open_per_device_and_kind_and_a_previous_history_gets_the_table(history_spec):
    """There was no alerts table: whether an alert had been raised was inferred from the records. Now a history of the
    previous schema gets an empty one on upgrade (its alerts not kept yet: the first monitor infers them once), a new
    history keeps them from the start, and a second opening of an open alert (another worker's) is refused by the
    database, whichever backend."""
    with open_history(history_spec) as store:
        assert store.alerts_kept() and store.alerts() == []
        store.add("bench", bench("d1", "s1", 1.0, 1))
    _as_before_alerts(history_spec)
    with open_history(history_spec) as store:
        assert store._schema_version() == SCHEMA_VERSION and store.count("bench") == 1
        assert not store.alerts_kept()
        store.keep_alerts()
        store.keep_alerts()
        assert store.alerts_kept()
        assert store.open_alert("d1", "silent", "d1 silent for 200 s", at=100.0)
        assert not store.open_alert("d1", "silent", "d1 silent for 201 s", at=101.0)  # another worker, later
        assert store.open_alert("d2", "silent", "d2 silent\x1b[2J " + "x" * 2000, at=102.0)
        assert store.open_alert("d1", "drift", "d1 drifts", at=103.0)
        assert store.open_alerts() == {"silent": {"d1", "d2"}, "drift": {"d1"}}
        assert store.close_alert("d1", "silent", at=110.0) and not store.close_alert("d1", "silent", at=111.0)
        assert store.open_alert("d1", "silent", "d1 silent again", at=120.0)  # a new episode: a new row
        rows = store.alerts()
        assert [(r["device"], r["kind"], r["raised_at"], r["cleared_at"]) for r in rows] == [
            ("d1", "silent", 120.0, None), ("d1", "drift", 103.0, None), ("d2", "silent", 102.0, None),
            ("d1", "silent", 100.0, 110.0)]
        assert rows[-1]["detail"] == "d1 silent for 200 s"
        assert rows[2]["detail"].startswith("d2 silent\\x1b[2J xxx") and rows[2]["detail"].endswith("(2,014 characters)")
        assert [r["raised_at"] for r in store.alerts(device="d1", since=101.0, until=119.0)] == [103.0]
        assert [r["raised_at"] for r in store.alerts(holds=True, limit=2)] == [120.0, 103.0]
        assert [r["raised_at"] for r in store.alerts(holds=False)] == [100.0]
        with pytest.raises(ValueError, match="not 'refused'"):
            store.open_alert("d1", "refused", "no")


def _as_version_3(spec: str) -> None:
    """Leave the history ``spec`` names as edge-kit's schema version 3 did: its ``alerts`` table (one open alert per
    device and kind), no ``alert_holders``."""
    statements = ("DROP TABLE alerts", "DROP TABLE alert_holders",
                  "CREATE TABLE alerts (id {serial}, device TEXT, kind TEXT, raised_at {real}, cleared_at {real}, "
                  "detail TEXT)",
                  "CREATE UNIQUE INDEX alerts_open ON alerts (device, kind) WHERE cleared_at IS NULL",
                  "INSERT INTO alerts (device, kind, raised_at, cleared_at, detail) VALUES "
                  "('d1', 'over_budget', 100.0, NULL, 'd1: over its ingest budget')",
                  "UPDATE edgekit_schema SET version = 3")
    if spec.startswith("postgresql://"):
        _psql(spec, *(s.format(serial="BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", real="DOUBLE PRECISION")
                      for s in statements))
        return
    import sqlite3

    with sqlite3.connect(spec) as conn:
        for statement in statements:
            conn.execute(statement.format(serial="INTEGER PRIMARY KEY AUTOINCREMENT", real="REAL"))
    conn.close()


def test_where_a_devices_numbering_stands_counts_the_gaps_recorded_since_its_newest_record(history):
    """A persistent monitor starts from it: the newest stored seq, or the end of a gap recorded after that record (a
    telemetry message's marks), never a gap recorded before it (a device whose numbering started again)."""
    history.add_many([("bench", bench("d1", "s1", 1.0, 5)), ("bench", bench("d2", "s1", 1.0, 7))], received=[100.0, 100.0])
    history.add_gap("d1", "bench", 6, 9)  # recorded now: after d1's record
    history.add_gap("d1", "live", 1, 50)  # of a kind d1 stored nothing of: not a number it stands at
    assert history.newest_seqs(("bench", "live"), ["d1", "d2", "d3"]) == {("d1", "bench"): 9, ("d2", "bench"): 7}
    history.add_many([("bench", bench("d1", "s1", 1.0, 2))], received=[time.time() + 60])  # numbering started again
    assert history.newest_seqs(("bench",), ["d1", "d2"]) == {("d1", "bench"): 2, ("d2", "bench"): 7}


def test_the_version_4_upgrade_leaves_no_moment_without_one_open_alert_per_device_and_kind(history_spec, monkeypatch):
    """The upgrade dropped version 3's unique index of open alerts before it created version 4's: a monitor of the
    older edge-kit still running that raised an alert in between opened it twice, and the new unique index then failed
    to build (every monitor of the new edge-kit then stopped at start). Now the new index comes first."""
    with open_history(history_spec) as store:
        store.add("bench", bench("d1", "s1", 1.0, 1))
    _as_version_3(history_spec)
    if history_spec.startswith("postgresql://"):
        from edge_kit.telemetry.pg import PostgresStore as backend
    else:
        backend = Store
    original = backend._execute

    def execute(self, sql, args=()):
        count = original(self, sql, args)
        if sql.startswith("DROP INDEX IF EXISTS alerts_open"):  # the older edge-kit raises d1's alert again meanwhile
            original(self, "INSERT INTO alerts (device, kind, raised_at, cleared_at, detail) VALUES "
                           "('d1', 'over_budget', 101.0, NULL, 'again') ON CONFLICT DO NOTHING")
        return count

    monkeypatch.setattr(backend, "_execute", execute)
    with open_history(history_spec) as store:
        assert store._schema_version() == SCHEMA_VERSION
        assert [(r["device"], r["kind"], r["detail"]) for r in store.alerts(holds=True)] == [
            ("d1", "over_budget", "d1: over its ingest budget")]


def test_workers_hold_an_over_budget_alert_together_and_a_stale_one_is_closed_by_whoever_sees_it(history_spec):
    """Each --share worker has its own over-budget episode (its own share of the budget), but the table kept one open
    row that the first worker whose episode ended closed while another still refused the device's records; and a row
    a crashed worker left open looked like a peer's flood, so the next flood was never raised. Now workers hold the
    alert (alert_holders), the last one to let go clears it, and one nobody confirmed for ALERT_STALE_S is closed as
    stale by whoever sees it, on both backends; a version 3 history is upgraded to it."""
    from edge_kit.telemetry.store import ALERT_STALE_S, CLEARED_ENDED, CLEARED_STALE

    with open_history(history_spec) as store:
        store.add("bench", bench("d1", "s1", 1.0, 1))
    _as_version_3(history_spec)
    with open_history(history_spec) as store:
        assert store._schema_version() == SCHEMA_VERSION and store.count("bench") == 1
        # version 3's open over-budget row was confirmed by nobody: stale, closed by the first worker that floods
        assert store.open_alert_keys() == [("over_budget", "d1", "", True)]
        assert store.hold_alert("d1", "over_budget", "A", "d1 over (A)", at=200.0)  # A's episode: raised
        assert not store.hold_alert("d1", "over_budget", "B", "d1 over (B)", at=201.0)  # B's too: held, not raised
        assert not store.release_alert("d1", "over_budget", "A", at=210.0)  # B still refuses d1's records: it holds
        assert store.open_alerts() == {"over_budget": {"d1"}}
        assert store.confirm_alert("d1", "over_budget", "B")
        assert store.release_alert("d1", "over_budget", "B", at=220.0)  # the last holder lets go: cleared
        assert store.open_alerts() == {}
        # C crashes while holding; its row and hold age past ALERT_STALE_S
        assert store.hold_alert("d1", "over_budget", "C", "d1 over (C)", at=300.0)
        assert store.held_by("C") == [("d1", "over_budget")]
        store._execute("UPDATE alerts SET seen = seen - ? WHERE cleared_at IS NULL", (ALERT_STALE_S + 5,))
        store._execute("UPDATE alert_holders SET seen = seen - ?", (ALERT_STALE_S + 5,))
        assert store.open_alert_keys() == [("over_budget", "d1", "", True)]
        assert not store.confirm_alert("d2", "over_budget", "D")  # no such alert open
        assert store.hold_alert("d1", "over_budget", "D", "d1 over (D)", at=400.0)  # a new flood: raised
        assert store.held_by("C") == []
        rows = store.alerts(limit=10)
        assert [(r["detail"], r["cleared_at"], r["cleared_why"]) for r in rows[1:]] == [
            ("d1 over (C)", pytest.approx(time.time(), abs=60), CLEARED_STALE),
            ("d1 over (A)", 220.0, CLEARED_ENDED),
            ("d1: over its ingest budget", pytest.approx(time.time(), abs=60), CLEARED_STALE)]
        assert rows[0]["cleared_at"] is None and rows[0]["detail"] == "d1 over (D)"
        store._execute("UPDATE alerts SET seen = seen - ? WHERE cleared_at IS NULL", (ALERT_STALE_S + 5,))
        assert store.close_stale_alerts() == 1 and store.open_alerts() == {}
        # a constraints alert per variant, and drift never goes stale (the device's state, held by no worker)
        assert store.open_alert("d1", "constraints", "int8 breaks", subject="int8")
        assert store.open_alert("d1", "constraints", "fp32 breaks", subject="fp32")
        assert not store.open_alert("d1", "constraints", "int8 breaks again", subject="int8")
        assert store.open_alert("d1", "drift", "drifts")
        store._execute("UPDATE alerts SET seen = NULL")
        assert store.close_stale_alerts() == 0
        assert store.close_alert("d1", "constraints", subject="int8")
        assert sorted(k[:3] for k in store.open_alert_keys()) == [("constraints", "d1", "fp32"), ("drift", "d1", "")]
        with pytest.raises(ValueError, match="not 'drift'"):
            store.hold_alert("d1", "drift", "A", "no")


def test_share_workers_on_one_history_raise_an_over_budget_alert_once_and_clear_it_with_the_last_flood(
        history_spec, tmp_path):
    """The monitor's side of the holders, on both backends: two --share workers flooded by d1 raise one alert; the
    first whose episode ends leaves it open for the other (it closed it before); a worker that crashed mid-flood leaves
    a row that goes stale, and the next worker's flood of d1 is raised."""
    import math

    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.telemetry.monitor import Monitor
    from edge_kit.telemetry.store import ALERT_STALE_S

    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: sim\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                          "devices:\n  - {name: d1, host: 127.0.0.1}\n")

    def worker(store):
        mon = Monitor(load_fleet(fleet_file), store, share="edgekit", workers=2, verify_in_child=False)
        try:
            mon.start(timeout=0.5)
        except Exception:  # noqa: BLE001 - AgentError: no broker on port 1; the history was read first
            pass
        return mon

    def flood(mon):
        mon._refuse_over_budget([(messages.topic("sim", "d1", "bench"), b'{"seq":7}', time.time())])

    stores = [open_history(history_spec) for _ in range(3)]
    try:
        a, b = worker(stores[0]), worker(stores[1])
        flood(a)
        flood(b)
        a._end_floods(math.inf)
        assert stores[2].open_alerts() == {"over_budget": {"d1"}}
        b._end_floods(math.inf)
        assert stores[2].open_alerts() == {}
        flood(a)  # a crashes mid-flood: its row and hold age past ALERT_STALE_S
        stores[2]._execute("UPDATE alerts SET seen = seen - ? WHERE cleared_at IS NULL", (ALERT_STALE_S + 5,))
        stores[2]._execute("UPDATE alert_holders SET seen = seen - ?", (ALERT_STALE_S + 5,))
        flood(b)
        began = [[x.device for x in mon.alerts if "over its ingest budget (" in x.text] for mon in (a, b)]
        assert began == [["d1", "d1"], ["d1"]]  # a's two (the first shared with b), and b's after a's crash
        assert [(r["cleared_why"], r["cleared_at"] is None) for r in stores[2].alerts()] == [
            (None, True), ("stale", False), ("ended", False)]
        for mon in (a, b):
            mon._floods.clear()
            mon.stop()
    finally:
        for store in stores:
            store.close()


def test_the_share_gap_scan_records_each_gap_once_one_worker_at_a_time(history_spec):
    """The sequence-gap scan of ``--share`` workers: one worker scans at a time (a lease row, taken by one statement),
    reads what was stored past the marks in one query, and records gaps and marks in one transaction only while it
    holds the scan. A worker that held it past its staleness (another took it) records nothing: no gap twice."""
    from edge_kit.telemetry import store as store_module
    from edge_kit.telemetry.monitor import share_gaps

    a, b = open_history(history_spec), open_history(history_spec)
    try:
        def tele(seq, seqs=None):
            return messages.envelope("telemetry", "f", "d1", seq, {"seqs": seqs} if seqs else {})

        a.add_many([("telemetry", tele(1)), ("bench", bench("d1", "s", 1.0, 1))])
        a.follow_seqs(["d1", "d2"])
        b.follow_seqs(["d1"])  # a second worker starting: the marks stay where the first put them
        assert sorted(a._rows("SELECT device, kind, scanned_to FROM seq_scans WHERE device = 'd1'")) == [
            ("d1", "bench", 1), ("d1", "live", -1), ("d1", "shadow", -1), ("d1", "telemetry", 1)]
        # telemetry 2, 5 and 6 stored (3 and 4 lost), 6 claiming bench up to 4 (2..4 lost at the end of its stream)
        a.add_many([("telemetry", tele(2)), ("telemetry", tele(5)), ("telemetry", tele(6, {"bench": 4}))])
        rows = a.seq_window()
        assert sorted((k, s) for k, _, s, *_ in rows) == [("bench", None), ("live", None), ("shadow", None),
                                                          ("telemetry", 2), ("telemetry", 5), ("telemetry", 6)]
        marks, gaps = share_gaps(rows, time.time())
        assert gaps == [("d1", "bench", 2, 4), ("d1", "telemetry", 3, 4)]
        assert a.take_scan_lease("worker-a") and not b.take_scan_lease("worker-b")  # one scans at a time
        assert a.record_scan("worker-a", marks, gaps)  # and lets go
        assert b.take_scan_lease("worker-b")
        assert share_gaps(b.seq_window(), time.time()) == ([], [])  # nothing past the marks: nothing found again
        assert b.record_scan("worker-b", [], [])
        assert sorted(a._rows("SELECT kind, first_missing, last_missing FROM gaps")) == [("bench", 2, 4),
                                                                                          ("telemetry", 3, 4)]
        # a worker that held the scan too long: another took it, and what the first found is not recorded
        a.add_many([("telemetry", tele(9))])
        assert a.take_scan_lease("worker-a")
        found = share_gaps(a.seq_window(), time.time())
        a._execute("UPDATE scan_lease SET seen = seen - ?", (store_module.SCAN_LEASE_STALE_S + 1,))
        assert b.take_scan_lease("worker-b")
        assert not a.record_scan("worker-a", *found)
        assert b.record_scan("worker-b", *share_gaps(b.seq_window(), time.time()))
        assert a._rows("SELECT COUNT(*) FROM gaps WHERE first_missing = 7 AND last_missing = 8") == [(1,)]
    finally:
        a.close()
        b.close()


def _offline_fleet(folder, history_spec: str | None, n: int):
    """Write a fleet file of ``n`` devices in ``folder`` and fill its history (``history_spec``, or the file beside
    it) with each one's statuses: online naming its model, then its last will (offline, that connection's, naming
    none) and, for every other device, a later last will of a new connection naming none either (so its older
    statuses are read too); return the fleet file and the device names."""
    folder.mkdir()
    fleet_file = folder / "fleet.yaml"
    names = [f"dev-{i:05d}" for i in range(n)]
    fleet_file.write_text("fleet: f\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                          "devices:\n" + "".join(f"  - {{name: {d}, host: 127.0.0.1}}\n" for d in names))
    now = time.time()
    rows, received = [], []
    for i, d in enumerate(names):
        model = {"variant": f"int8-{i}", "sha256": f"{i:064x}"}
        rows += [("status", messages.envelope("status", "f", d, 5, {"state": "online", "current": model,
                                                                     "connection": "c1"})),
                 ("status", messages.envelope("status", "f", d, 4, {"state": "offline", "current": None,
                                                                     "connection": "c1"}))]
        received += [now - 600, now - 300]
        if i % 2:
            rows.append(("status", messages.envelope("status", "f", d, 1, {"state": "offline", "current": None,
                                                                            "connection": "c2"})))
            received.append(now - 60)
    store = open_history(history_spec or str(folder / "edgekit-history.db"))
    store.add_many(rows, received=received)
    store.close()
    return fleet_file, names


def test_fleet_status_reads_every_offline_devices_last_known_model_in_a_fixed_number_of_queries(
        history_spec, request, tmp_path, run_cli, monkeypatch):
    """`fleet status` asked the history once per offline device for its last known model (and once more per last
    will for its connection's model): on a 10,000-device fleet on PostgreSQL, 20,000 round trips. It sends as many
    statements for 40 offline devices as for 4 now (counted, both backends), and still shows each device's model."""
    import json

    from edge_kit.telemetry.pg import PostgresStore

    counted: list[str] = []
    me = threading.get_ident()  # the command's statements: not those of a thread an earlier test in this worker left
    for cls in (Store, PostgresStore):
        for name in ("_rows", "_execute"):
            def counting(self, sql, args=(), _real=getattr(cls, name)):
                if threading.get_ident() == me:
                    counted.append(sql)
                return _real(self, sql, args)

            monkeypatch.setattr(cls, name, counting)
    statements = []
    for n in (4, 40):
        spec = None if "://" not in history_spec else (
            history_spec if n == 4 else request.getfixturevalue("postgres_server").create_database(
                f"fleet_{n}_{time.monotonic_ns()}"))
        fleet_file, names = _offline_fleet(tmp_path / f"fleet-{n}", spec, n)
        counted.clear()
        code, out, err = run_cli("fleet", "status", "--fleet", fleet_file, "--history-only", "--json",
                                 *(["--history", spec] if spec else []))
        assert code == 0, err
        statements.append(len(counted))
        current = json.loads(out)["current"]
        assert {d: current[d]["variant"] for d in names} == {d: f"int8-{i}" for i, d in enumerate(names)}
        assert all(current[d]["source"] == "history" and current[d]["last_known"] for d in names)
        assert {json.loads(out)["state"][d]["state"] for d in names} == {"offline"}
    assert statements[0] == statements[1] > 0, statements


def test_a_device_s_new_epoch_is_recorded_once_and_the_share_scan_reads_only_its_numbering(history):
    """A device re-imaged numbers from 1 in a new epoch: recorded once as a restart (a late message of the old one
    records nothing), and the gap scan of --share workers, started again at 0 in the new numbering, reads only its rows
    (a record's epoch read from its stored body) on both backends."""
    from edge_kit.telemetry.monitor import share_gaps

    def live(seq, epoch):
        return "live", messages.envelope("live", "f", "d1", seq, {"requests": 1}, epoch=epoch)

    history.follow_seqs(["d1"])
    assert history.add_epoch("d1", "e1", 1) == (True, "e1")
    history.add_many([live(seq, "e1") for seq in range(1, 21)], received=[time.time() - 60] * 20)
    marks, gaps = share_gaps(history.seq_window(), time.time())
    assert history.take_scan_lease("w") and history.record_scan("w", marks, gaps) and gaps == []
    time.sleep(0.01)  # the database's clock orders the epochs
    assert history.add_epoch("d1", "e2", 1) == (True, "e2")
    assert history.add_epoch("d1", "e1", 21) == (False, "e2") and history.device_epochs(["d1"]) == {"d1": "e2"}
    history.add_many([live(1, "e2"), live(2, "e2"), live(6, "e2"), live(21, "e1")], received=[time.time() - 60] * 4)
    marks, gaps = share_gaps(history.seq_window(), time.time())
    assert gaps == [("d1", "live", 3, 5)] and ("d1", "live", 6) in marks
    assert [(r["device"], r["epoch"], r["previous"], r["first_seq"]) for r in history.seq_restarts()] == [
        ("d1", "e2", "e1", 1)]


def test_the_fp32_accuracies_the_monitor_judges_against_come_newest_first_per_device_model_and_variant(history):
    """``reference_accuracies`` (the monitor's start: each device's fp32 accuracy per model, what its other variants'
    accuracy bound is a ratio of) on both backends: the newest record with an accuracy wins, per model and variant;
    a record without one, another device's and a variant not asked about count for nothing."""
    def record(device, seq, variant, accuracy, model="digits"):
        body = {"variant": variant, "sha256": "a" * 64, "model": model, "latency_ms": {"p90": 1.0}, "runs": 10,
                "power": {}, "simulated": False}
        if accuracy is not None:
            body["accuracy"] = {"metric": "top1", "value": accuracy, "samples": 80}
        return "bench", messages.envelope("bench", "f", device, seq, body)

    now = time.time()
    history.add_many([record("d1", 1, "fp32", 0.40), record("d1", 2, "fp32", 0.5375), record("d1", 3, "fp32", None),
                      record("d1", 4, "fp32", 0.9, model="other"), record("d1", 5, "int8", 0.99),
                      record("d2", 1, "onnx-fp32", 0.7), record("d3", 1, "fp32", 0.8)],
                     received=[now - 70, now - 60, now - 50, now - 40, now - 30, now - 20, now - 10])
    assert history.reference_accuracies(["d1", "d2"], ("fp32", "onnx-fp32")) == {
        ("d1", "digits", "fp32"): 0.5375, ("d1", "other", "fp32"): 0.9, ("d2", "digits", "onnx-fp32"): 0.7}


def test_newest_seqs_stands_at_the_newest_numbering_not_a_late_record_of_an_older_one(history):
    """newest_seqs (where a persistent monitor's streams stand at start) took the newest record stored, a late one of
    the device's older numbering (queued before its re-image) included: it stood at that old number, and the new
    numbering's gaps below it were silent. Now it is the newest of the device's newest numbering (a record without an
    epoch, an agent downgraded, counts as of it), on both databases."""
    def live(seq, epoch):
        return "live", messages.envelope("live", "f", "d1", seq, {"requests": 1}, epoch=epoch)

    now = time.time()
    history.add_epoch("d1", "e1", 1)
    history.add_many([live(seq, "e1") for seq in (1, 2, 3)], received=[now - 60] * 3)
    time.sleep(0.01)  # the database's clock orders the epochs
    history.add_epoch("d1", "e2", 1)
    history.add_many([live(seq, "e2") for seq in (1, 2, 5)], received=[now - 30, now - 30, now - 20])
    history.add_many([live(500, "e1")], received=[now - 10])  # the old numbering's, handed over late
    assert history.newest_seqs(("live",), ["d1"]) == {("d1", "live"): 5}
    history.add_many([live(6, None)], received=[now - 5])  # the agent downgraded: no epoch, numbering on
    assert history.newest_seqs(("live",), ["d1"]) == {("d1", "live"): 6}
