"""The agent's on-disk outbox: order, persistence of seq, bounded with telemetry dropped first."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from device_agents import spool as spool_module
from device_agents.identity import Signer
from device_agents.mqtt import SpooledPublisher
from device_agents.spool import Spool
from edgekit_protocol import messages

ROOT = Path(__file__).resolve().parents[2]


def add(spool, kind, text="x"):
    return spool.add(kind, f"t/{kind}", lambda seq: f"{kind}:{seq}:{text}".encode())


@contextlib.contextmanager
def disk_full_on(spool, statement):
    """Within the block, every SQL statement of ``spool`` that starts with ``statement`` fails as on a full disk."""
    real = spool._db

    class Full:
        def execute(self, sql, *args):
            if sql.startswith(statement):
                raise sqlite3.OperationalError("database or disk is full")
            return real.execute(sql, *args)

        def __getattr__(self, name):  # the rest as the real connection has it (in_transaction...)
            return getattr(real, name)

    spool._db = Full()
    try:
        yield
    finally:
        spool._db = real


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
    assert spool.stats() == {"pending": 4, "dropped_telemetry": 3, "dropped_live": 0, "dropped_shadow": 0,
                             "refused_commands": 0, "replayed_commands": 0, "expired_commands": 0, "stale_desired": 0,
                             "failed_pulls": 0, "ended_benches": 0, "unsent_reports": 0, "oversize_messages": 0, "unsignable_messages": 0, "damaged_spools": 0, "max_records": 3}


def test_live_and_shadow_rows_are_periodic_dropped_oldest_first_and_counted_per_kind_with_their_own_seq(tmp_path):
    """Live figures and shadow comparisons have topics of their own: each is superseded by the next, so a full
    spool drops them as it drops telemetry (never a bench record), each kind counted and numbered apart."""
    spool = Spool(tmp_path / "s.db", max_records=3)
    add(spool, "live", "old")
    add(spool, "shadow", "old")
    add(spool, "telemetry")
    add(spool, "bench")  # full: the oldest periodic row goes, whatever its kind
    add(spool, "bench")
    assert [r[2] for r in spool.pending()] == [b"telemetry:1:x", b"bench:1:x", b"bench:2:x"]
    assert add(spool, "live", "new")[1] == b"live:2:new"  # drops the telemetry row; its own seq goes on
    stats = spool.stats()
    assert (stats["dropped_live"], stats["dropped_shadow"], stats["dropped_telemetry"]) == (1, 1, 1)


def test_command_ids_are_kept_until_their_command_expired_by_the_senders_clock(tmp_path):
    """The horizon follows the newest command's ts (minus HORIZON_S), never the device clock: an id is
    forgotten only once its command is refused anyway, so no replay ever runs twice."""
    spool = Spool(tmp_path / "s.db")
    t0 = 1_800_000_000.0
    assert spool.take("a", b"a", ts=t0, expires=t0 + 60) is None
    assert spool.take("a", b"a", ts=t0, expires=t0 + 60) == "replayed"
    assert spool.take("b", b"b", ts=t0 + 30, expires=t0 + 86_400) is None
    assert spool.seen_ids() == 2
    # an hour later by the operator's clock: 'a' expired before the horizon, so its id may go ...
    assert spool.take("c", b"c", ts=t0 + 3600, expires=t0 + 3660) is None
    assert spool.seen_ids() == 2  # b and c
    # ... because 'a' itself, replayed now, is refused as expired (whatever the device's clock says)
    assert spool.take("a", b"a", ts=t0, expires=t0 + 60) == "expired"
    assert spool.take("b", b"b", ts=t0 + 30, expires=t0 + 86_400) == "replayed"  # still remembered: not expired
    spool.close()
    again = Spool(tmp_path / "s.db")  # the horizon and the ids persist
    assert again.take("a", b"a", ts=t0, expires=t0 + 60) == "expired"
    assert again.take("c", b"c", ts=t0 + 3600, expires=t0 + 3660) == "replayed"


def test_an_acknowledged_row_the_full_disk_kept_from_deleting_is_deleted_with_the_next(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "s.db")
    r1, _ = add(spool, "bench")
    r2, _ = add(spool, "bench")
    with disk_full_on(spool, "DELETE"):
        spool.done(r1)  # never raises (it runs on paho's thread)
        assert spool.stats()["pending"] == 2  # its deletion failed: still on disk
        assert [r[0] for r in spool.pending()] == [r2]  # but not handed out again
    spool.done(r2)
    assert spool.pending() == [] and spool.stats()["pending"] == 0


def test_a_puback_writes_nothing_and_its_row_leaves_the_disk_with_the_next_write(tmp_path):
    """done() runs on paho's network thread for every PUBACK: it takes no commit (nor the spool's lock) of its own;
    the acknowledged rows are deleted in the next add()'s transaction, and left out of pending() meanwhile."""
    spool = Spool(tmp_path / "s.db")
    r1, _ = add(spool, "telemetry")
    r2, _ = add(spool, "telemetry")
    statements = []
    spool._db.set_trace_callback(statements.append)
    with spool._lock:  # held elsewhere (an add() signing its record): done() does not wait for it
        acked = threading.Thread(target=spool.done, args=(r1,), daemon=True)
        acked.start()
        acked.join(5)
        assert not acked.is_alive()
    assert statements == []
    assert [r[0] for r in spool.pending()] == [r2]
    r3, _ = add(spool, "telemetry")
    assert statements.count("COMMIT") == 1  # the deletion rode on the add's commit
    other = sqlite3.connect(tmp_path / "s.db")
    assert [r[0] for r in other.execute("SELECT id FROM outbox ORDER BY id")] == [r2, r3]
    spool.done(r2)
    spool.done(r2)  # idempotent
    assert spool.pending(after=r3) == []  # the idle publisher's poll: nothing to send, so the deletion is written
    assert [r[0] for r in other.execute("SELECT id FROM outbox ORDER BY id")] == [r3]
    spool.done(r3)
    assert spool.stats()["pending"] == 0
    assert other.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0
    other.close()


def test_acknowledged_rows_not_deleted_yet_take_no_room_in_what_pending_returns(tmp_path):
    """``limit`` counts the rows returned: acknowledged ones still on disk (left out) do not use it up, so a row
    waiting behind them is returned, never an empty list that reads as nothing left to send."""
    spool = Spool(tmp_path / "s.db")
    r1, r2, r3 = (add(spool, "bench")[0] for _ in range(3))
    spool.done(r1)
    spool.done(r2)
    assert [r[0] for r in spool.pending(limit=2)] == [r3]
    assert [r[0] for r in spool.pending(limit=1)] == [r3]
    spool.done(r3)
    assert spool.pending(limit=2) == []  # nothing to send: the deletions are written
    assert spool._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0


def test_status_and_reported_numbers_keep_rising_across_restarts_and_a_full_disk(tmp_path):
    """Retained messages are not spooled, but their seq is the spool's: a restart never numbers from 1 again
    (receivers order by seq and receive time), and a disk too full to write the counter still gives a higher one."""
    spool = Spool(tmp_path / "s.db")
    assert [spool.next_seq("status") for _ in range(3)] == [1, 2, 3]
    assert spool.next_seq("reported") == 1
    spool.close()
    spool = Spool(tmp_path / "s.db")
    assert spool.next_seq("status") == 4
    with disk_full_on(spool, "INSERT"):
        assert [spool.next_seq("status") for _ in range(2)] == [5, 6]  # from memory, never raises
    assert spool.next_seq("status") == 7  # written again once space returns
    spool.close()
    assert Spool(tmp_path / "s.db").next_seq("status") == 8


def test_a_command_is_marked_started_with_fsync_even_right_after_telemetry(tmp_path):
    """A command marked started is answered "interrupted" after a restart, never run again (a second
    ``rollback`` would undo the first). Telemetry is committed without fsync; the start mark written
    after it must not be: with ``synchronous=NORMAL`` a power loss (not a process kill) forgets the
    mark, and the restarted agent runs the command again."""
    spool = Spool(tmp_path / "s.db")
    assert spool.take("cmd-1", b"{}", ts=1000.0, expires=1060.0) is None
    add(spool, "telemetry")  # sent while the command waited its turn
    traced = []
    spool._db.set_trace_callback(traced.append)
    spool.start("cmd-1")
    spool._db.set_trace_callback(None)
    assert spool._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: the commit was fsynced
    assert traced.index("PRAGMA synchronous=FULL") < next(i for i, t in enumerate(traced) if t.startswith("UPDATE inbox"))
    assert spool.pending_commands() == [(b"{}", True)]


def test_a_damaged_spool_is_moved_aside_and_a_new_one_started_counted_with_its_horizon_at_this_clock(tmp_path):
    """A spool.db that was no database any more (a fault) raised DatabaseError at every start: the agent crashed
    in a loop and the device was lost until someone logged in. Now it is moved aside (kept) and a new one
    started, counted; with the ids taken before gone, commands that expired by this clock are refused."""
    import time

    path = tmp_path / "spool.db"
    path.write_bytes(b"not a database, " * 512)
    spool = Spool(path)
    kept = list(tmp_path.glob("spool.db.damaged-*"))
    assert len(kept) == 1 and kept[0].read_bytes().startswith(b"not a database")
    assert spool.stats()["damaged_spools"] == 1 and spool.stats()["pending"] == 0
    now = time.time()
    assert spool.take("old", b"{}", now - 7200, now - 3600) == "expired"  # a captured command replayed
    assert spool.take("new", b"{}", now, now + 3600) is None
    assert spool.take("new", b"{}", now, now + 3600) == "replayed"
    spool.close()
    assert Spool(path).stats()["damaged_spools"] == 1  # a sound spool is opened as it is


def test_a_spool_damaged_inside_is_moved_aside_at_the_start_too(tmp_path):
    """A spool whose header and schema were sound but one of whose outbox pages was damaged raised "database disk
    image is malformed" at every start (the count of its rows read the page): the agent crashed in a loop. SQLite's
    quick_check finds it now, so it is moved aside and a new spool started, as one that is no database at all."""
    path = tmp_path / "spool.db"
    spool = Spool(path)
    for _ in range(300):
        add(spool, "bench", "x" * 1300)
    spool.close()
    data = bytearray(path.read_bytes())
    page = len(data) // 4096 - 3  # a leaf page of the outbox
    data[page * 4096:(page + 1) * 4096] = b"\xff" * 4096
    path.write_bytes(bytes(data))
    spool = Spool(path)
    assert spool.stats()["damaged_spools"] == 1 and spool.stats()["pending"] == 0
    assert len(list(tmp_path.glob("spool.db.damaged-*"))) == 1
    assert add(spool, "bench")[1] == b"bench:1:x"
    spool.close()


def test_a_spool_damaged_again_within_the_same_second_keeps_the_one_kept_before(tmp_path, monkeypatch):
    """A device without a real-time clock boots at the time it saved last: two damaged spools found at two starts
    were both named spool.db.damaged-<that second>, and the second was renamed over the first (its unsent records,
    kept for a look, were gone). Each is kept now, under a name of its own."""
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)
    path = tmp_path / "spool.db"
    for text in (b"first damage, ", b"second damage "):
        path.write_bytes(text * 512)
        Spool(path).close()
        path.unlink()
    kept = sorted(p.read_bytes()[:14] for p in tmp_path.glob("spool.db.damaged-*") if not p.name.endswith(("-wal", "-shm")))
    assert kept == [b"first damage, ", b"second damage "]


def test_a_spool_that_cannot_be_read_at_the_start_stops_the_agent_in_one_line_and_is_kept(offline_config, tmp_path,
                                                                                            monkeypatch, capsys,
                                                                                            logging_kept):
    """An I/O error reading the spool (a failing card; quick_check reads every page) or one locked, read-only or on a
    full disk is no damage: the spool is kept as it is. The agent's start ended in a Python traceback, at every
    restart; now in one line naming the file, the error and what to do, exit 1 (systemd starts it again)."""
    from device_agents.__main__ import main

    cfg = offline_config()
    Spool(cfg.root / "spool.db").close()
    real = sqlite3.connect

    class Unreadable(sqlite3.Connection):
        def execute(self, sql, *args):
            if sql.startswith("PRAGMA quick_check"):
                raise sqlite3.OperationalError("disk I/O error")
            return super().execute(sql, *args)

    monkeypatch.setattr(sqlite3, "connect", lambda *args, **kw: real(*args, factory=Unreadable, **kw))
    with logging_kept(), pytest.raises(SystemExit) as caught:  # the agent logs to this test's stderr
        main(["run", "--config", str(tmp_path / "agent.yaml")])
    err = capsys.readouterr().err.splitlines()  # the log's lines before it: the device key made
    assert caught.value.code == 1 and not any(line.startswith("Traceback") for line in err)
    assert err[-1].startswith(f"edgekit-agent: error: {cfg.root / 'spool.db'}: the spool cannot be opened (disk I/O "
                              "error)") and "dmesg" in err[-1]
    assert (cfg.root / "spool.db").exists() and not list(cfg.root.glob("spool.db.damaged-*"))


def test_a_flood_of_refusals_is_counted_exactly_with_about_one_commit_a_second(tmp_path):
    """Each refused (or replayed) command was one committed counter write: a flood of unsigned commands on the
    device's topic was a transaction per message on its SD card. Counts now reach the disk at most once a
    second (and at close), read back exactly meanwhile."""
    spool = Spool(tmp_path / "spool.db")
    commits = []
    spool._db.set_trace_callback(lambda sql: commits.append(sql) if sql.startswith("INSERT OR REPLACE INTO counters") else None)
    for _ in range(2_000):
        spool.count("refused")
    spool.count("replayed")
    assert spool.stats()["refused_commands"] == 2_000 and spool.stats()["replayed_commands"] == 1
    assert len(commits) <= 4  # the first count, and at most one more save within the second
    spool.close()
    assert Spool(tmp_path / "spool.db").stats()["refused_commands"] == 2_000  # held ones are saved at close


def test_a_new_spools_horizon_starts_at_the_devices_provisioning_by_the_operators_clock(tmp_path):
    """A device whose root was wiped (re-imaged, a new card) has a new spool that remembers no command id,
    and a Pi without a real-time clock may boot with yesterday's time: a command captured before, still
    unexpired by that clock, ran again. The deploy that gives the device its key writes the operator's
    time (identity/provisioned.json); the horizon starts there and never moves back."""
    import json

    from device_agents.config import load_agent_config
    from device_agents.identity import PROVISIONED, provisioned_at
    from device_agents.service import Agent
    from device_agents.spool import HORIZON_S

    t1 = time.time() - 600  # the re-provisioning, by the operator's clock
    spool = Spool(tmp_path / "s.db", horizon_floor=t1)
    assert spool.take("captured", b"{}", ts=t1 - 7200, expires=t1 - 3600) == "expired"
    assert spool.take("sent just before", b"{}", ts=t1 - 60, expires=t1 - HORIZON_S + 1) is None
    spool.close()
    again = Spool(tmp_path / "s.db", horizon_floor=t1 - 86_400)  # an older floor never moves it back
    assert again.take("captured 2", b"{}", ts=t1 - 7200, expires=t1 - 3600) == "expired"
    again.close()

    root = tmp_path / "root"
    (root / "identity").mkdir(parents=True)
    for text in ("", "{not json", '{"at": "yesterday"}', '{"at": 1e400}', "[1]"):
        (root / "identity" / PROVISIONED).write_text(text)
        assert provisioned_at(root / "identity") == 0.0, text  # unreadable: no floor, never a crash
    (root / "identity" / PROVISIONED).write_text(json.dumps({"at": t1}))
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device: pi-1\nfleet: f\nroot: {root}\nserve: {{enabled: false}}\n")
    agent = Agent(load_agent_config(cfg))
    try:
        assert agent.spool.take("captured", b"{}", ts=t1 - 7200, expires=t1 - 3600) == "expired"
    finally:
        agent.spool.close()


def test_a_provisioning_time_from_the_future_does_not_lock_out_every_command(tmp_path):
    """identity/provisioned.json holding a time years ahead (an operator host whose clock was wrong, a hostile
    file): before, the horizon, which never moves back, was put there and every command the operator sent for
    years was refused as expired. Now the floor counts only up to this clock plus the skew a command may have."""
    now = time.time()
    spool = Spool(tmp_path / "s.db", horizon_floor=now + 10 * 365 * 86400)
    assert spool.take("today's", b"{}", ts=now, expires=now + 60) is None
    spool.close()


def test_a_number_read_ahead_is_taken_only_when_the_message_went_out_and_never_moves_back(tmp_path):
    """The retained reported state reads its number (upcoming_seq) and takes it (took_seq) once it went out: reading
    takes nothing, however often; a number taken survives a restart and a full disk, and an older one never lowers
    the counter."""
    spool = Spool(tmp_path / "s.db")
    assert [spool.upcoming_seq("reported") for _ in range(3)] == [1, 1, 1]
    spool.took_seq("reported", 1)
    assert spool.upcoming_seq("reported") == 2
    spool.took_seq("reported", 1)  # taken again (a retry that did go out twice): no lower, no higher
    assert spool.upcoming_seq("reported") == 2 and spool.upcoming_seq("status") == 1
    with disk_full_on(spool, "INSERT"):
        spool.took_seq("reported", 2)  # held in memory, never raises
        assert spool.upcoming_seq("reported") == 3
    spool.took_seq("reported", 3)
    spool.close()
    assert Spool(tmp_path / "s.db").upcoming_seq("reported") == 4


def test_a_spool_has_one_epoch_across_restarts_and_a_new_spool_has_another(tmp_path):
    """Every numbered message carries its spool's epoch, so a receiver tells a device numbering from 1 again (its state
    root wiped, re-imaged, a damaged spool moved aside) from one that lost records: the epoch is created with the spool,
    kept across the agent's restarts, and a new spool has a new one."""
    spool = Spool(tmp_path / "s.db")
    epoch = spool.epoch
    assert len(epoch) == 16 and int(epoch, 16) > 0
    add(spool, "bench")
    spool.close()
    again = Spool(tmp_path / "s.db")
    assert again.epoch == epoch and add(again, "bench")[1] == b"bench:2:x"
    again.close()
    wiped = Spool(tmp_path / "wiped" / "s.db")
    assert wiped.epoch != epoch and add(wiped, "bench")[1] == b"bench:1:x"
    wiped.close()
    (tmp_path / "s.db").write_bytes(b"not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"s.db{suffix}").unlink(missing_ok=True)
    assert Spool(tmp_path / "s.db").epoch not in (epoch, wiped.epoch)


def test_an_agent_running_when_its_device_lost_power_numbers_in_a_new_epoch_from_1(tmp_path, monkeypatch):
    """The periodic kinds commit without fsync: a power loss can take their last rows and seq counters, and their
    numbers went out again, to other messages, in the same epoch (a receiver then took the older message as the
    newer until the numbering passed it). A spool left open by an agent that was running when the machine booted again
    starts a new epoch, every seq from 1; a spool closed before the boot, or left open by an agent that crashed (the
    same boot: the kernel kept its commits), numbers on."""
    this_boot = spool_module._boot_id()
    assert 0 < this_boot < 2 ** 60 and spool_module._boot_id() == this_boot  # Linux's, the same at every read
    boot = [11]
    monkeypatch.setattr(spool_module, "_boot_id", lambda: boot[0])

    def power_cut(spool):  # the agent never closes it
        spool._ckpt.close()
        spool._db.close()

    spool = Spool(tmp_path / "s.db")
    epoch = spool.epoch
    add(spool, "bench"), add(spool, "telemetry"), add(spool, "telemetry")
    power_cut(spool)
    crashed = Spool(tmp_path / "s.db")  # the same boot: an agent killed, restarted by systemd
    assert crashed.epoch == epoch and add(crashed, "telemetry")[1] == b"telemetry:3:x"
    power_cut(crashed)
    boot[0] = 12
    after = Spool(tmp_path / "s.db")
    assert after.epoch != epoch and int(after.epoch, 16) > 0
    assert add(after, "telemetry")[1] == b"telemetry:1:x" and add(after, "bench")[1] == b"bench:1:x"
    assert after.next_seq("status") == 1 and after.stats()["pending"] == 6  # the unsent rows are all still there
    after.close()
    boot[0] = 13  # a clean stop, then a reboot: numbering goes on
    clean = Spool(tmp_path / "s.db")
    assert clean.epoch == after.epoch and add(clean, "telemetry")[1] == b"telemetry:2:x"
    clean.close()
    monkeypatch.setattr(spool_module, "_boot_id", lambda: 0)  # no boot id to read (not Linux): as before
    assert Spool(tmp_path / "s.db").epoch == after.epoch


def test_the_wal_stays_bounded_under_a_long_write_burst_with_no_idle_time(tmp_path, monkeypatch):
    """SQLite's automatic checkpoints (two fsyncs each) ran in the writer's commits; the publisher's thread runs them
    now, on a connection of its own, while the writer goes on. A checkpoint the writer outruns never lets the WAL
    start over: under a burst with no idle time it would grow without end (some 50 MB here). With the writer's own
    checkpoints (past WAL_MAX_PAGES) switched off, the publisher's (offline, as on a device without a broker) keep
    the WAL under WAL_MAX_PAGES pages while 2,500 signed records are written back to back."""
    shipped = Spool(tmp_path / "d.db")
    assert shipped._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == spool_module.WAL_MAX_PAGES
    shipped.close()
    monkeypatch.setattr(spool_module, "WAL_MAX_PAGES", 10**9)
    spool = Spool(tmp_path / "s.db", max_records=100_000)
    publisher = SpooledPublisher(None, spool)  # never connected: it only checkpoints
    publisher.start()
    device = Signer.generate()
    try:
        for i in range(2500):
            spool.add("telemetry", "t", lambda seq: messages.encode(device.sign(messages.envelope(
                "telemetry", "f", "pi-1", seq, {"i": i, "pad": "x" * 1200}))))
            publisher.wake()
    finally:
        publisher.stop()
    wal = (tmp_path / "s.db-wal").stat().st_size  # the WAL file's largest size until it starts over
    page = spool._db.execute("PRAGMA page_size").fetchone()[0]
    assert wal < 4000 * page, f"WAL grew to {wal / page:.0f} pages"
    assert len(spool.pending(limit=5000)) == 2500
    spool.close()


def test_a_wal_a_burst_grew_is_cut_back_when_it_starts_over(tmp_path, monkeypatch):
    """With no checkpoint during a burst (the writer's own off, no publisher), the WAL file grows to 3,000 pages; once
    a checkpoint copied it all, the next write starts it over and cuts the file to WAL_RESTART_PAGES pages. It kept
    its largest size (12 MB of a device's disk) until the spool was closed."""
    monkeypatch.setattr(spool_module, "WAL_MAX_PAGES", 10**9)
    spool = Spool(tmp_path / "s.db", max_records=100_000)
    page = spool._db.execute("PRAGMA page_size").fetchone()[0]
    wal = tmp_path / "s.db-wal"
    while wal.stat().st_size < 3000 * page:
        add(spool, "telemetry", "x" * 3000)
    spool._commits = spool_module.CHECKPOINT_EVERY
    spool.checkpoint()
    add(spool, "telemetry")
    assert wal.stat().st_size <= spool_module.WAL_RESTART_PAGES * page
    spool.close()


CRASH_CHILD = """
import sys
from pathlib import Path

from device_agents.mqtt import SpooledPublisher
from device_agents.spool import Spool

spool = Spool(Path(sys.argv[1]), max_records=100_000)
if sys.argv[2] == "checkpoints":  # the publisher's thread checkpoints while records are written: killed amid them
    publisher = SpooledPublisher(None, spool)
    publisher.start()
for i in range(int(sys.argv[3])):
    kind = "bench" if i % 10 == 0 else "telemetry"
    row, _ = spool.add(kind, "t/" + kind, lambda seq: f"{kind}:{seq}:".encode() + b"x" * 1300)
    if sys.argv[2] == "checkpoints":
        publisher.wake()
    print(row, flush=True)  # committed
print("written", flush=True)
sys.stdin.read()  # until killed
"""


def _killed_writer(path, mode, records, kill_after) -> list[int]:
    """Run CRASH_CHILD writing ``records`` records into the spool at ``path`` (``mode`` "checkpoints": with the
    publisher's checkpoints), kill it (SIGKILL) once it said ``kill_after`` lines; return the rows it said were
    committed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(path), mode, str(records)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, env=env) as child:
        said = [child.stdout.readline() for _ in range(kill_after)]
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    assert all(said), f"the writer ended before it was killed: {said[-3:]}"
    return [int(line) for line in said if line.strip().isdigit()]


def _check_whole(path, rows) -> int:
    """Assert the spool at ``path`` holds every row in ``rows`` (and maybe rows written after them: committed, not said
    yet), each whole, each kind numbered 1, 2, ... with no gap, and that numbering goes on after them; return how many
    rows it holds."""
    spool = Spool(path)
    kept = spool.pending(limit=10**6)
    assert [r[0] for r in kept][:len(rows)] == rows
    seqs = {"bench": [], "telemetry": []}
    for _, topic, payload in kept:
        kind, seq, pad = payload.split(b":")
        assert topic == "t/" + kind.decode() and pad == b"x" * 1300
        seqs[kind.decode()].append(int(seq))
    assert all(numbers == list(range(1, len(numbers) + 1)) for numbers in seqs.values())
    assert add(spool, "bench")[1] == f"bench:{len(seqs['bench']) + 1}:x".encode()
    spool.close()
    return len(kept)


def test_a_writer_killed_before_any_checkpoint_loses_no_record(tmp_path):
    """A checkpoint no longer follows the writer's commits: records may stay in the WAL alone for longer. A writer
    killed (SIGKILL) with 150 records written and none of them checkpointed (the database file by itself holds no
    table yet) loses none: SQLite replays the WAL at the next open."""
    path = tmp_path / "s.db"
    rows = _killed_writer(path, "none", 150, 151)
    assert len(rows) == 150
    shutil.copy(path, tmp_path / "alone.db")  # the database file without its WAL: no table yet, all is in the WAL
    alone = sqlite3.connect(tmp_path / "alone.db")
    assert alone.execute("SELECT name FROM sqlite_master").fetchall() == []
    alone.close()
    assert _check_whole(path, rows) == 150


def test_a_writer_killed_amid_the_publishers_checkpoints_loses_no_record(tmp_path):
    """Killed (SIGKILL) mid-burst while the publisher's thread checkpoints (a checkpoint may be running at the kill):
    every record the writer had committed is there after the restart, whole and numbered without a gap."""
    path = tmp_path / "s.db"
    rows = _killed_writer(path, "checkpoints", 100_000, 2000)
    assert path.stat().st_size > 4096  # checkpoints had copied pages past the first into the database file
    _check_whole(path, rows)


CKPT_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 121)  # SQLite's checkpointer lock: byte 121 of the -shm file
print("held", flush=True)
sys.stdin.read()  # until the test closes stdin
"""


def test_a_writer_that_outruns_a_slow_checkpoint_waits_for_it_and_the_wal_stays_bounded(tmp_path):
    """A checkpoint of the publisher's on a slow disk (fsyncs of a second on an SD card) holds SQLite's checkpointer
    lock: the writer's own checkpoint past WAL_MAX_PAGES is skipped meanwhile, and a writer going on at full speed
    grew the WAL past 4,000 pages (27 MB with fsyncs of 0.5 s). Here the publisher's checkpoint is in flight for as
    long as the writer goes on (its lock held, SQLite's held by another process): the writer waits for it once
    WAL_AHEAD commits ahead, then completes a checkpoint itself, and the WAL stays about WAL_MAX_PAGES pages."""
    spool = Spool(tmp_path / "s.db", max_records=100_000)
    written = []

    def writer():
        for _ in range(1500):
            written.append(add(spool, "telemetry", "x" * 1300)[0])

    with subprocess.Popen([sys.executable, "-c", CKPT_HOLDER, str(tmp_path / "s.db-shm")], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as holder:
        assert holder.stdout.readline() == "held\n"
        with spool._ckpt_lock:  # the publisher's checkpoint, in flight
            thread = threading.Thread(target=writer)
            thread.start()
            while thread.is_alive():  # until the writer is done, or waits
                before = len(written)
                thread.join(1.0)
                if len(written) == before:
                    break
            holder.stdin.close()  # the checkpoint ends: SQLite's lock first, then the spool's
            assert holder.wait(30) == 0
    thread.join(60)
    assert not thread.is_alive() and len(written) == 1500
    page = spool._db.execute("PRAGMA page_size").fetchone()[0]
    wal = (tmp_path / "s.db-wal").stat().st_size
    # SQLite's own checkpoint follows the commit that passed WAL_MAX_PAGES: a few pages past it (7,000 before the fix)
    assert wal < (spool_module.WAL_MAX_PAGES + 100) * page, f"WAL grew to {wal / page:.0f} pages"
    assert [r[0] for r in spool.pending(limit=5000)] == written
    spool.close()
