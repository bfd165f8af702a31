"""How the monitor judges a device's numbering: a new ``epoch`` (the device re-imaged, its agent state wiped) restarts
each stream's mark and is recorded as a restart, not a gap; a late message of the older numbering is not judged
against the new one; a number implausibly far past the newest (a hostile device's telemetry claiming 10**12) is
counted and not taken; an older agent without an epoch is judged as before. With --share, the gap scan reads only the
new numbering's rows."""

from __future__ import annotations

import time

import pytest
from monitor_helpers import fleet_yaml
from monitor_helpers import started as _monitor

from edge_kit.telemetry.monitor import MAX_SEQ_LEAD, Monitor, share_gaps
from edge_kit.telemetry.store import SCHEMA_VERSION, Store
from edgekit_protocol import messages


@pytest.fixture
def fleet_file(tmp_path):
    return fleet_yaml(tmp_path / "fleet.yaml", ('d1',))



def _live(seq: int, epoch: str | None, device: str = "d1") -> tuple[str, dict]:
    return "live", messages.envelope("live", "sim", device, seq, {"model": {"variant": "int8", "sha256": "ab"},
                                                                   "requests": 1, "errors": 0, "window": 1}, epoch=epoch)


def _telemetry(seq: int, epoch: str | None, seqs: dict[str, int]) -> tuple[str, dict]:
    return "telemetry", messages.envelope("telemetry", "sim", "d1", seq, {"conditions": {}, "spool": {},
                                                                         "seqs": seqs}, epoch=epoch)


def _feed(mon: Monitor, store: Store, records: list[tuple[str, dict]]) -> None:
    """Store and judge ``records`` as the monitor's writer does."""
    for kind, msg in records:
        store.add_many([(kind, msg)])
        mon._after_store(kind, msg)


def _gaps(store: Store) -> list[tuple[str, int, int]]:
    return sorted((g["kind"], g["first_missing"], g["last_missing"]) for g in store.sequence_gaps(limit=100))


def test_a_device_numbering_again_from_1_in_a_new_epoch_is_a_restart_and_its_gaps_are_judged(fleet_file, tmp_path):
    """A device re-imaged (or its agent state wiped) numbers from 1 again: the monitor judged none of its records until
    the numbers passed the old mark, so a gap in that time was silent. Now its new epoch restarts the mark at 0,
    recorded as a restart (not a gap), and what it then misses is a gap; a late record of the old numbering is stored
    and not judged against the new one."""
    with Store(tmp_path / "h.db") as store:
        mon = _monitor(fleet_file, store)
        try:
            _feed(mon, store, [_live(seq, "e1") for seq in range(1, 51)])
            _feed(mon, store, [_live(1, "e2"), _live(2, "e2"), _live(5, "e2")])  # 3 and 4 lost after the re-image
            assert _gaps(store) == [("live", 3, 4)]
            assert mon.stats.restarts == 1 and [a.kind for a in mon.alerts].count("restart") == 1
            restart = store.seq_restarts("d1")
            assert [(r["epoch"], r["previous"], r["first_seq"]) for r in restart] == [("e2", "e1", 1)]
            _feed(mon, store, [_live(51, "e1"), _live(6, "e2")])  # the old numbering's last, late: no gap, no restart
            assert _gaps(store) == [("live", 3, 4)] and mon.stats.restarts == 1
        finally:
            mon.stop(drain_s=0)
        # a monitor started again (persistent) continues the new numbering the history holds
        again = _monitor(fleet_file, store, persistent=True)
        try:
            _feed(again, store, [_live(8, "e2")])
            assert _gaps(store) == [("live", 3, 4), ("live", 7, 7)] and again.stats.restarts == 0
        finally:
            again.stop(drain_s=0)


def test_an_agent_s_first_epoch_is_no_restart_and_an_older_agent_is_judged_as_before(fleet_file, tmp_path):
    """An agent upgraded to one that sends an epoch goes on numbering: its first epoch restarts nothing. An older
    agent (no epoch) numbering from 1 again is judged as before: not until it passes its old mark."""
    with Store(tmp_path / "h.db") as store:
        mon = _monitor(fleet_file, store)
        try:
            _feed(mon, store, [_live(seq, None) for seq in range(1, 11)] + [_live(11, "e1"), _live(13, "e1")])
            assert _gaps(store) == [("live", 12, 12)] and mon.stats.restarts == 0
            assert store.seq_restarts() == []
        finally:
            mon.stop(drain_s=0)
    with Store(tmp_path / "old.db") as store:
        mon = _monitor(fleet_file, store)
        try:
            _feed(mon, store, [_live(seq, None) for seq in (1, 2, 3, 1, 3)])
            assert _gaps(store) == [] and mon.stats.restarts == 0
        finally:
            mon.stop(drain_s=0)


def test_a_telemetry_claim_implausibly_far_past_the_newest_seq_is_counted_not_taken(fleet_file, tmp_path):
    """A hostile device (valid key) whose telemetry claimed seqs {live: 10**12} blinded gap detection on its live
    stream for ever: nothing below 10**12 was judged again. Now a number more than MAX_SEQ_LEAD past the newest is
    counted (implausible_seqs), alerted once, and not taken; a plausible claim still is."""
    with Store(tmp_path / "h.db") as store:
        mon = _monitor(fleet_file, store)
        try:
            _feed(mon, store, [_live(1, "e1"), _live(2, "e1"), _telemetry(1, "e1", {"live": 10 ** 12}),
                               _telemetry(2, "e1", {"live": 10 ** 12}), _live(3, "e1"), _live(5, "e1")])
            assert _gaps(store) == [("live", 4, 4)]
            assert mon.stats.implausible_seqs == 2 and sum("implausible" in a.text for a in mon.alerts) == 1
            _feed(mon, store, [_telemetry(3, "e1", {"live": 7})])  # plausible: records 6 and 7 lost at the end
            assert _gaps(store) == [("live", 4, 4), ("live", 6, 7)]
            _feed(mon, store, [_live(5 + MAX_SEQ_LEAD + 10, "e1"), _live(9, "e1")])  # a record's jump too
            assert _gaps(store) == [("live", 4, 4), ("live", 6, 7), ("live", 8, 8)]
        finally:
            mon.stop(drain_s=0)


def test_share_scan_reads_only_the_new_numbering_and_ignores_an_implausible_claim(tmp_path):
    """With --share the gap scan judged a re-imaged device's new numbers against its old rows (nothing below the old
    mark was judged); now a new epoch starts the scan at 0 in it. A telemetry claim of 10**12 is not the horizon."""
    with Store(tmp_path / "h.db") as store:
        store.follow_seqs(["d1"])
        store.add_epoch("d1", "e1", 1)
        store.add_many([_live(seq, "e1") for seq in range(1, 31)], received=[time.time() - 60] * 30)
        marks, gaps = share_gaps(store.seq_window(), time.time())
        store.take_scan_lease("w")
        assert store.record_scan("w", marks, gaps) and gaps == []
        new, newest = store.add_epoch("d1", "e2", 1)
        assert new and newest == "e2" and store.add_epoch("d1", "e1", 31) == (False, "e2")  # a late old one
        store.add_many([_live(1, "e2"), _live(2, "e2"), _live(5, "e2"), _live(31, "e1"),
                        _telemetry(1, "e2", {"live": 10 ** 12})], received=[time.time() - 60] * 5)
        marks, gaps = share_gaps(store.seq_window(), time.time())
        assert gaps == [("d1", "live", 3, 4)], gaps
        assert ("d1", "live", 5) in marks
        assert [r["previous"] for r in store.seq_restarts("d1")] == ["e1"]


def test_a_version_5_history_is_upgraded_with_the_numbering_columns_and_the_restarts_table(tmp_path):
    """The history of the previous edge-kit (schema 5) has no seq_scans.epoch and no seq_epochs table: opened by this
    one, it is upgraded, its rows kept, and the new ones stored (a record's epoch in its body, its table as before)."""
    import sqlite3

    path = tmp_path / "h.db"
    with Store(path) as store:
        store.add_many([_live(1, None)])
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE seq_scans DROP COLUMN epoch")
        conn.execute("DROP TABLE seq_epochs")
        conn.execute("UPDATE edgekit_schema SET version = 5")
    conn.close()
    with Store(path) as store:
        assert store._schema_version() == SCHEMA_VERSION
        store.add_many([_live(2, "e1")])
        assert store._rows("SELECT seq, json_extract(body, '$.epoch') FROM live ORDER BY seq") == [(1, None), (2, "e1")]
        assert "epoch" in store._columns("seq_scans")
        assert store.add_epoch("d1", "e1", 2) == (True, "e1") and store.seq_restarts() == []


def test_a_restart_recorded_while_a_peer_scans_is_not_overwritten_by_that_scan_s_older_marks(tmp_path):
    """A --share worker recording a device's new numbering moved its scan marks to 0 at once: a peer whose scan was
    under way (it read the window before) then wrote its older marks over them, and the new numbering was not judged
    until it passed them. The worker now moves them holding the scan, after the peer's scan ends."""
    import threading

    path = tmp_path / "h.db"
    with Store(path) as peer, Store(path) as worker:
        peer.follow_seqs(["d1"])
        peer.add_epoch("d1", "e1", 1)
        peer.add_many([_live(seq, "e1") for seq in range(1, 31)], received=[time.time() - 60] * 30)
        assert peer.take_scan_lease("peer")
        marks, gaps = share_gaps(peer.seq_window(), time.time())  # the peer's scan is under way
        recorded = threading.Thread(target=worker.add_epoch, args=("d1", "e2", 1, "worker"))
        recorded.start()
        time.sleep(0.2)
        assert peer.record_scan("peer", marks, gaps)  # the peer's older marks (30) go in first
        recorded.join(10)
        assert set(worker._rows("SELECT kind, scanned_to, epoch FROM seq_scans WHERE device = 'd1'")) == {
            (kind, 0, "e2") for kind in ("bench", "telemetry", "live", "shadow")}
        assert worker._rows("SELECT owner FROM scan_lease") == [(None,)]  # let go


def test_device_epochs_reads_only_the_devices_asked_about_through_the_table_s_key(tmp_path, monkeypatch):
    """device_epochs() read the whole seq_epochs table (every device's every numbering) at each start, follow_seqs and
    twice per add_epoch. Now it reads the devices asked about, each through the (device, epoch) key."""
    with Store(tmp_path / "h.db") as store:
        for device in ("d1", "d2", "other"):
            store.add_epoch(device, "a", 1)
        time.sleep(0.01)  # the database's clock orders the epochs
        store.add_epoch("d1", "b", 1)
        assert store.device_epochs(["d1", "d2", "d9"]) == {"d1": "b", "d2": "a"}
        asked: list[tuple[str, tuple]] = []
        rows = store._rows
        monkeypatch.setattr(store, "_rows", lambda sql, args=(): asked.append((sql, args)) or rows(sql, args))
        store.device_epochs(["d1"])
        monkeypatch.setattr(store, "_rows", rows)
        plans = [" | ".join(str(r[-1]) for r in store._rows("EXPLAIN QUERY PLAN " + sql, args)) for sql, args in asked]
        assert plans and all("seq_epochs" in sql for sql, _ in asked)
        assert not any("SCAN e" in p or "SCAN seq_epochs" in p for p in plans), plans


def test_a_persistent_monitor_starting_after_a_late_old_numbering_record_stands_at_the_new_numbering(fleet_file,
                                                                                                     tmp_path):
    """A persistent monitor without --share takes where each stream stood from the history's newest record. A late
    record of the device's older numbering (queued before its re-image) stored last made it stand at that old number:
    the new numbering's next records were behind it, and a gap in them was silent. Now the newest record of the
    device's newest numbering is where it stands."""
    with Store(tmp_path / "h.db") as store:
        store.add_epoch("d1", "e1", 1)
        store.add_many([_live(seq, "e1") for seq in (1, 2, 3)], received=[time.time() - 60] * 3)
        time.sleep(0.01)  # the database's clock orders the epochs
        store.add_epoch("d1", "e2", 1)
        store.add_many([_live(seq, "e2") for seq in (1, 2, 3, 4, 5)], received=[time.time() - 30] * 5)
        store.add_many([_live(500, "e1")], received=[time.time() - 10])  # the old numbering's, handed over late
        mon = _monitor(fleet_file, store, persistent=True)
        assert mon._seq[("d1", "live")] == 5
        _feed(mon, store, [_live(6, "e2"), _live(8, "e2")])
        assert _gaps(store) == [("live", 7, 7)] and mon.stats.restarts == 0
        mon.stop()


def test_share_scan_judges_a_downgraded_agent_s_records_after_a_restart(tmp_path):
    """An agent downgraded to a version that sends no epoch, after a restart was recorded: the --share scan read only
    rows of the followed epoch, so its records (no epoch) were never read and its gaps were silent for good (a single
    monitor judges them). Now a record without an epoch received since the restart into the followed epoch is read as
    of it; one of no epoch stored before that restart (the agent before its upgrade) is not."""
    with Store(tmp_path / "h.db") as store:
        store.add_many([_live(seq, None) for seq in range(1, 11)], received=[time.time() - 600] * 10)  # before epochs
        store.follow_seqs(["d1"])
        store.add_epoch("d1", "e1", 11)
        time.sleep(0.01)  # the database's clock orders the epochs
        store.add_epoch("d1", "e2", 1)
        store.add_many([_live(1, "e2"), _live(2, "e2"), _live(3, None), _live(6, None)], received=[time.time()] * 4)
        marks, gaps = share_gaps(store.seq_window(), time.time() + 60)
        assert gaps == [("d1", "live", 4, 5)], gaps
        assert ("d1", "live", 6) in marks


def test_an_older_numbering_a_share_worker_records_after_a_peer_recorded_a_newer_one_never_becomes_the_newest(
        fleet_file, tmp_path):
    """A device re-imaged twice within moments (e1, then e2, then e3): epochs were ordered by when a worker recorded
    them, so a worker whose batch held e2's first message, received before e3's but stored after a peer recorded e3,
    made e2 the device's newest numbering: the scan followed e2 again and e3's gaps went silent. Epochs are now ordered
    by when their first message was received: e2 is recorded as the older, the one before e3."""
    path = tmp_path / "h.db"
    with Store(path) as store_a, Store(path) as store_b:
        a = _monitor(fleet_file, store_a, share="edgekit", workers=2)
        b = _monitor(fleet_file, store_b, share="edgekit", workers=2)
        a._keep([_live(1, "e1")], [b"{}"], [time.time() - 60])
        now = time.time()
        a._keep([_live(1, "e3")], [b"{}"], [now])  # a stores e3 first
        b._keep([_live(1, "e2")], [b"{}"], [now - 1])  # b received e2 before it, its batch stored after
        assert store_a.device_epochs(["d1"]) == {"d1": "e3"} and b._epochs.get("d1") is None
        assert [(r["epoch"], r["previous"]) for r in store_a.seq_restarts("d1")] == [("e3", "e2"), ("e2", "e1")]
        assert set(store_a._rows("SELECT scanned_to, epoch FROM seq_scans WHERE device = 'd1'")) == {(0, "e3")}
        assert (a.stats.restarts, b.stats.restarts) == (1, 0)
        a._keep([_live(2, "e3")], [b"{}"], [time.time()])  # e3 stays the one followed: its next record is no restart
        assert a.stats.restarts == 1 and store_a.device_epochs(["d1"]) == {"d1": "e3"}
        a.stop()
        b.stop()
