"""A monitor started again (an upgrade, a crash, a reboot of its host) takes the alert episodes under way from the
history's alerts table: an open one is not alerted again, a device silent since before the restart is alerted when its
limit passes (counted from its last record of any kind, by this host's clock). On a history an older edge-kit wrote
(no alerts kept) they are inferred from the records once: low disk is not alerted again, and a silence the monitor
that stored the fleet's later records alerted is not alerted again."""

from __future__ import annotations

import math
import sqlite3
import time

import pytest
from monitor_helpers import fleet_yaml, started

from edge_kit.fleet.inventory import load_fleet
from edge_kit.telemetry.metrics import FleetMetrics
from edge_kit.telemetry.monitor import Monitor
from edge_kit.telemetry.store import LATE_S, Store
from edgekit_protocol import messages


@pytest.fixture
def fleet_file(tmp_path):
    return fleet_yaml(tmp_path / "fleet.yaml", ('d1', 'd2', 'd3'))


def _started(fleet_file, store, settled=True, **kw) -> Monitor:
    """:func:`monitor_helpers.started`, settled unless told otherwise."""
    return started(fleet_file, store, settled=settled, **kw)


def _disk(device, seq, free_mb, kind="telemetry"):
    body = {"disk": {"free_bytes": int(free_mb * 1e6), "total_bytes": 3e10, "full": False}}
    return (kind, messages.envelope(kind, "sim", device, seq, {**body, "state": "online"} if kind == "status" else body))


def _live(device, seq):
    return ("live", messages.envelope("live", "sim", device, seq, {"requests": 1}))


def _older(path, records, received=None) -> Store:
    """Return the history at ``path`` holding ``records`` as the previous edge-kit left it (schema version 2: no alerts
    table), opened by this one (upgraded)."""
    with Store(path) as store:
        store.add_many(records, received=received)
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE alerts")
        conn.execute("DELETE FROM edgekit_schema WHERE name = 'alerts'")
        conn.execute("UPDATE edgekit_schema SET version = 2")
    conn.close()
    return Store(path)


def _rows(store) -> list[tuple]:
    """Return the alerts table's rows as (device, kind, open?)."""
    return [(a["device"], a["kind"], a["cleared_at"] is None) for a in reversed(store.alerts(limit=100))]


def test_low_disk_the_history_shows_is_not_alerted_again_and_a_new_episode_still_is(fleet_file, tmp_path):
    """A monitor started again alerted "d1: 1.0 MB free" on d1's next telemetry: the monitor before it had already
    raised it (and /metrics had no sign of it)."""
    now = time.time()
    store = _older(tmp_path / "h.db", [_disk("d1", 1, 1.0), _disk("d2", 1, 1.0), _disk("d2", 2, 500.0, kind="status"),
                                       _disk("d3", 1, 500.0), _disk("d3", 2, 1.0, kind="status"), _live("d3", 1)],
                   received=[now - 50, now - 50, now - 40, now - 50, now - 40, now - 30])
    mon = _started(fleet_file, store)
    for kind, msg in (_disk("d1", 2, 1.0), _disk("d2", 3, 1.0), _disk("d3", 3, 1.0)):
        mon._after_store(kind, msg)
    # d2's newest word (a status) said 500 MB free: its episode had ended; d3's newest with a disk figure said 1 MB
    assert [a.text for a in mon.alerts if a.kind == "disk"] == ["d2: 1.0 MB free (below 32 MB)"]
    mon._after_store(*_disk("d1", 3, 500.0))  # d1's episode ends, the next one is news
    mon._after_store(*_disk("d1", 4, 2.0))
    assert [a.text for a in mon.alerts if a.kind == "disk"][1:] == ["d1: 2.0 MB free (below 32 MB)"]
    assert mon.alert_states()["disk"] == {"d1", "d2", "d3"}


def test_a_device_silent_since_before_the_restart_is_alerted_once_its_limit_passes(fleet_file, tmp_path):
    """A monitor started again knew only what it received: a device that went silent before the restart was never
    alerted. Now it is last heard when this host stored its newest record of any kind (d1's is a live one)."""
    store = Store(tmp_path / "h.db")
    now = time.time()
    store.add_many([_disk("d1", 1, 500.0), _live("d1", 1), _disk("d2", 1, 500.0), _disk("d3", 1, 500.0)],
                   received=[now - 900, now - 185, now - 100, now - 10])
    mon = _started(fleet_file, store, silence_s=180)
    mon._check_silence()  # no monitor stored a record after any limit passed: nobody was told of d1
    assert [a.device for a in mon.alerts if a.kind == "silent"] == ["d1"]
    assert mon.alerts[-1].text.startswith("d1 silent for 18")  # from its live record, not from the monitor's start
    assert mon.last_seen == pytest.approx({"d1": now - 185, "d2": now - 100, "d3": now - 10}, abs=1e-3)
    assert mon.alert_states()["silent"] == {"d1"}
    mon._check_silence()
    assert len([a for a in mon.alerts if a.kind == "silent"]) == 1


def test_a_silence_the_monitor_before_alerted_is_not_alerted_again_one_nobody_was_told_of_is(fleet_file, tmp_path):
    """d1's limit passed while a monitor stored d3's records (it alerted d1 then): not news. d2's passed after the
    last record any monitor stored (the monitor was down): nobody was told, so it is alerted now."""
    now = time.time()
    store = _older(tmp_path / "h.db", [_live("d1", 1), _disk("d2", 1, 500.0), _disk("d3", 1, 500.0)],
                   received=[now - 2000, now - 1000, now - 900])
    mon = _started(fleet_file, store, silence_s=180)
    mon._check_silence()
    assert sorted(a.device for a in mon.alerts if a.kind == "silent") == ["d2", "d3"]
    assert mon.alert_states()["silent"] == {"d1", "d2", "d3"}
    mon._after_store(*_live("d1", 2))  # d1 speaks again: its episode ends
    assert mon.alert_states()["silent"] == {"d2", "d3"}
    # what was inferred once is kept: d1's inferred silence opened and closed, d2's and d3's raised and open
    assert _rows(store) == [("d1", "silent", False), ("d2", "silent", True), ("d3", "silent", True)]
    assert store.alerts_kept()


def test_metrics_last_heard_starts_from_any_kind_stored(fleet_file, tmp_path):
    """edgekit_device_last_seen_seconds started from the stored status and telemetry only: a device whose newest
    record was a bench, live or shadow one showed an older time (or none) after a restart."""
    store = Store(tmp_path / "h.db")
    store.add_many([_disk("d1", 1, 500.0), _live("d1", 1), _live("d2", 1)],
                   received=[1_700_000_000.0, 1_700_000_500.0, 1_700_000_600.0])
    metrics = FleetMetrics()
    metrics.seed(store, ["d1", "d2"])
    assert metrics.registry.get_sample_value("edgekit_device_last_seen_seconds", {"device": "d1"}) == 1_700_000_500.0
    assert metrics.registry.get_sample_value("edgekit_device_last_seen_seconds", {"device": "d2"}) == 1_700_000_600.0
    assert store.last_received() == {"d1": 1_700_000_000.0}  # the fleet table's last heard: status and telemetry
    with pytest.raises(ValueError, match="not 'gaps'"):
        store.last_received(("gaps",))


def test_a_device_whose_queued_records_arrive_after_the_restart_is_not_alerted_silent(fleet_file, tmp_path):
    """While the monitor was stopped the broker queued what the devices sent (its persistent session); those arrive
    just after it subscribes. Judged silent from the history before they arrived, every device would be alerted after
    an outage longer than its limit: a device last heard in the history is judged once the monitor has been subscribed
    for SETTLE_S."""
    store = Store(tmp_path / "h.db")
    now = time.time()
    store.add_many([_disk("d1", 1, 500.0), _disk("d2", 1, 500.0)], received=[now - 600, now - 600])
    mon = _started(fleet_file, store, settled=False, silence_s=180)
    mon._check_silence()  # not subscribed yet (or just): what the broker queued has not arrived
    assert not [a for a in mon.alerts if a.kind == "silent"]
    mon._after_store(*_disk("d1", 2, 500.0))  # d1's queued telemetry arrives
    mon._judge_before_from = time.monotonic()  # SETTLE_S later
    mon._check_silence()
    assert [a.device for a in mon.alerts if a.kind == "silent"] == ["d2"]


def test_the_alert_gauges_say_nothing_until_the_monitor_has_read_the_history(fleet_file, tmp_path):
    """/metrics is served before the monitor starts: it exported edgekit_device_low_disk 0 (and drifting, silent) for a
    device the history shows low on disk, until the monitor had read the history. Now no series until then."""
    store = _older(tmp_path / "h.db", [_disk("d1", 1, 1.0)])
    mon = Monitor(load_fleet(fleet_file), store, verify_in_child=False)
    metrics = FleetMetrics()
    metrics.watch(mon)
    assert metrics.registry.get_sample_value("edgekit_device_low_disk", {"device": "d1"}) is None
    try:
        mon.start(timeout=0.5)
    except Exception:  # noqa: BLE001 - AgentError: no broker on port 1; the history was read first
        pass
    assert metrics.registry.get_sample_value("edgekit_device_low_disk", {"device": "d1"}) == 1
    assert metrics.registry.get_sample_value("edgekit_device_low_disk", {"device": "d2"}) == 0


def test_records_stored_while_no_monitor_ran_are_no_sign_that_anyone_was_alerted(fleet_file, tmp_path):
    """tune, bench and deploy store records with no monitor running: d3's record, stored after d1's silence limit
    passed, made a restarted monitor take d1's silence as alerted, and d2's low disk (no monitor saw it) as well.
    Nobody was told: the alerts table holds no open alert, so both are alerted now, once, and kept there."""
    now = time.time()
    store = Store(tmp_path / "h.db")
    store.add_many([_live("d1", 1), _disk("d2", 1, 1.0), _disk("d3", 1, 500.0)],
                   received=[now - 2000, now - 300, now - 10])
    mon = _started(fleet_file, store, silence_s=180)
    mon._check_silence()
    mon._after_store(*_disk("d2", 2, 1.0))
    mon._check_silence()
    assert sorted((a.device, a.kind) for a in mon.alerts) == [("d1", "silent"), ("d2", "disk"), ("d2", "silent")]
    assert sorted(_rows(store)) == [("d1", "silent", True), ("d2", "low_disk", True), ("d2", "silent", False)]


def test_a_monitor_started_again_takes_the_open_alerts_and_closes_them_when_their_episode_ends(fleet_file, tmp_path):
    """The alerts one run raised are the next run's "already alerted": not raised again while they hold; an episode
    that ends is cleared in the table, and the next one is raised and kept as a new row."""
    now = time.time()
    store = Store(tmp_path / "h.db")
    store.add_many([_live("d1", 1), _disk("d2", 1, 1.0)], received=[now - 2000, now - 10])
    first = _started(fleet_file, store, silence_s=180)
    first._check_silence()
    first._after_store(*_disk("d2", 2, 1.0))
    first.stop()
    assert [(a.device, a.kind) for a in first.alerts] == [("d1", "silent"), ("d2", "disk")]
    again = _started(fleet_file, store, silence_s=180)
    assert again.alert_states() == {"drift": frozenset(), "disk": {"d2"}, "silent": {"d1"}, "constraints": frozenset()}
    again._check_silence()
    again._after_store(*_disk("d2", 3, 1.0))
    assert not again.alerts
    again._after_store(*_disk("d2", 4, 500.0))  # d2's disk episode ends
    again._after_store(*_live("d1", 2))  # d1 speaks: its silence ends
    again._after_store(*_disk("d2", 5, 2.0))  # a new disk episode: news
    assert [a.text for a in again.alerts] == ["d2: 2.0 MB free (below 32 MB)"]
    again.stop()
    rows = store.alerts(limit=10)
    assert [(a["device"], a["kind"], a["cleared_at"] is None) for a in reversed(rows)] == [
        ("d1", "silent", False), ("d2", "low_disk", False), ("d2", "low_disk", True)]
    assert rows[-1]["raised_at"] <= rows[-1]["cleared_at"] <= time.time()
    assert rows[0]["detail"] == "d2: 2.0 MB free (below 32 MB)"


def test_an_over_budget_alert_a_crashed_monitor_left_open_is_closed_by_the_next_one_alone(fleet_file, tmp_path):
    """A monitor that stops ends its floods and closes their alerts; one that crashed left the row open for good. The
    next monitor without --share has no flood under way: it closes it. A --share worker leaves it to the group."""
    store = Store(tmp_path / "h.db")
    store.open_alert("d1", "over_budget", "d1: over its ingest budget", at=time.time() - 60)
    _started(fleet_file, store, share="edgekit", workers=2).stop()
    assert _rows(store) == [("d1", "over_budget", True)]
    _started(fleet_file, store).stop()
    assert _rows(store) == [("d1", "over_budget", False)]
    assert store.alerts()[0]["cleared_why"] == "stale"
    # one that crashed mid-flood left its hold too: the next monitor alone forgets it, so its own flood's alert clears
    crashed = _started(fleet_file, store)
    _flood(crashed)
    mon = _started(fleet_file, store)
    _flood(mon)
    mon._end_floods(math.inf)
    assert _rows(store)[1:] == [("d1", "over_budget", False), ("d1", "over_budget", False)]
    crashed._floods.clear()
    crashed.stop()
    mon.stop()


def test_share_workers_close_and_raise_a_disk_episode_whichever_of_them_sees_its_end_and_the_next(fleet_file, tmp_path,
                                                                                                   monkeypatch):
    """With --share the broker hands a device's records to any worker. A worker closed a low-disk alert only if it had
    seen the episode begin: worker A raised "d1: 1.0 MB free", B saw the disk freed (nothing closed: B knew of no
    episode), then A saw d1 low again and raised nothing (it took it for the same episode), the history's alert open
    all along. Each worker now takes the history's open drift and low-disk alerts as its own, once a batch at most."""
    import json

    from edge_kit.telemetry import monitor as monitor_module

    monkeypatch.setattr(monitor_module, "ALERT_SYNC_S", 0.0, raising=False)  # as if seconds passed between batches
    store = Store(tmp_path / "h.db")
    a, b = (_started(fleet_file, store, share="edgekit", workers=2) for _ in range(2))

    def batch(worker, seq, free_mb):
        kind, msg = _disk("d1", seq, free_mb)
        worker._keep([(kind, msg)], [json.dumps(msg).encode()], [time.time()])

    batch(a, 1, 1.0)  # A: the episode begins
    batch(b, 2, 500.0)  # B: it ends
    batch(a, 3, 1.0)  # A: a new one begins
    texts = [x.text for x in a.alerts + b.alerts if x.kind == "disk"]
    assert texts == ["d1: 1.0 MB free (below 32 MB)"] * 2
    assert _rows(store) == [("d1", "low_disk", False), ("d1", "low_disk", True)]
    a.stop()
    b.stop()


def _flood(worker, device="d1"):
    """Have ``worker`` refuse one of ``device``'s records over its ingest budget (its episode begins or goes on)."""
    worker._refuse_over_budget([(messages.topic("sim", device, "bench"), b'{"seq":7}', time.time())])


def test_share_workers_each_hold_the_over_budget_alert_until_the_last_flood_ends(fleet_file, tmp_path):
    """Each --share worker holds its share of a device's budget, so each has its own episode over it. The first worker
    whose episode ended closed the group's over-budget alert while the other still refused d1's records. Now each
    holds it, and it clears when the last holder lets go."""
    store = Store(tmp_path / "h.db")
    a, b = (_started(fleet_file, store, share="edgekit", workers=2) for _ in range(2))
    _flood(a)
    _flood(b)
    assert [x.device for x in a.alerts + b.alerts if x.kind == "refused"] == ["d1"]  # raised once, by A
    a._end_floods(math.inf)  # A's episode ends; B still refuses d1's records
    assert _rows(store) == [("d1", "over_budget", True)]
    b._end_floods(math.inf)
    assert _rows(store) == [("d1", "over_budget", False)]
    assert store.alerts()[0]["cleared_why"] == "ended"
    a.stop()
    b.stop()


def test_a_restarted_worker_closes_the_stale_over_budget_alert_a_crash_left_and_raises_the_next_flood(
        fleet_file, tmp_path, monkeypatch):
    """A worker that crashed mid-flood left the over-budget row open; a --share worker started again could not tell it
    from a peer's flood under way, so its own next flood of that device was never raised. Now an alert no worker
    confirmed for ALERT_STALE_S is stale: closed by whoever sees it (at start, at a sync, at the next flood), and the
    next flood is raised. A peer's alert that is confirmed is left alone; a worker started again under its old name
    lets go of what it held at once."""
    from edge_kit.telemetry import monitor as monitor_module
    from edge_kit.telemetry.store import ALERT_STALE_S

    store = Store(tmp_path / "h.db")
    crashed = _started(fleet_file, store, share="edgekit", workers=2, client_id="worker-1")
    _flood(crashed, "d1")
    _flood(crashed, "d2")
    peer = _started(fleet_file, store, share="edgekit", workers=2)
    _flood(peer, "d3")  # a peer's flood under way, confirmed
    store._execute("UPDATE alerts SET seen = seen - ? WHERE device != 'd3'", (ALERT_STALE_S + 5,))
    store._execute("UPDATE alert_holders SET seen = seen - ? WHERE device != 'd3'", (ALERT_STALE_S + 5,))
    # crashed: never stopped. Another worker starts: d1's and d2's alerts are stale, closed; d3's holds
    again = _started(fleet_file, store, share="edgekit", workers=2)
    assert sorted(_rows(store)) == [("d1", "over_budget", False), ("d2", "over_budget", False),
                                    ("d3", "over_budget", True)]
    _flood(again, "d1")  # its own flood of d1: news
    _flood(again, "d3")  # the peer's d3 flood holds the alert: not raised again
    assert [x.text.split(":")[0] for x in again.alerts if x.kind == "refused"] == ["d1"]
    # one left stale while a worker runs is closed at its next sync
    monkeypatch.setattr(monitor_module, "ALERT_SYNC_S", 0.0)
    store._execute("UPDATE alerts SET seen = seen - ? WHERE device = 'd3'", (ALERT_STALE_S + 5,))
    store._execute("UPDATE alert_holders SET seen = seen - ? WHERE device = 'd3' AND holder = ?",
                   (ALERT_STALE_S + 5, peer.holder))
    store._execute("DELETE FROM alert_holders WHERE holder = ? AND device = 'd3'", (again.holder,))
    again._sync_alert_states()
    assert ("d3", "over_budget", True) not in _rows(store)
    # a worker started again under its own name (the CLI's fixed client id) lets go of what it held at once
    _flood(again, "d2")
    assert store.held_by(again.holder) == [("d1", "over_budget"), ("d2", "over_budget")]
    _started(fleet_file, store, share="edgekit", workers=2, client_id=again.holder)
    assert store.held_by(again.holder) == [] and store.open_alerts() == {}
    for worker in (crashed, peer, again):
        worker._floods.clear()
        worker.stop()


def test_a_monitor_starting_shows_the_open_alerts_an_earlier_run_left_marked_as_carried_over(fleet_file, tmp_path):
    """A monitor that died after writing an alert's row but before printing it left an alert no later run showed: the
    next one takes it as under way and says nothing. Now it keeps the open alerts it found as carried over (the CLI
    prints them, --json emits them), saying which it closed at start (an over-budget one nobody holds)."""
    from edge_kit.cli.loop import carried_lines

    store = Store(tmp_path / "h.db")
    store.open_alert("d1", "offline", "d1 went offline", at=time.time() - 60)
    store.open_alert("d2", "over_budget", "d2: over its ingest budget", at=time.time() - 30)
    mon = _started(fleet_file, store)
    assert [(r["device"], r["kind"], r["still_open"]) for r in mon.carried_over] == [
        ("d2", "over_budget", False), ("d1", "offline", True)]
    assert mon.carried_over_total == 2 and not mon.alerts
    lines = carried_lines(mon.carried_over, 3)
    assert lines[0].startswith("[red]alert[/] carried over (raised ") and lines[0].endswith(
        ", closed now: no worker holds it): d2: over its ingest budget")
    assert lines[1].endswith(", still holds): d1 went offline")
    assert lines[2] == "[red]alert[/] 1 more open alerts carried over: edgekit history alerts --open"
    assert _started(fleet_file, Store(tmp_path / "empty.db")).carried_over == []
    mon.stop()


def _bench(device, seq, variant, p90):
    return ("bench", messages.envelope("bench", "sim", device, seq, {
        "variant": variant, "sha256": "a" * 64, "model_bytes": 200_000, "profile": "rpi4", "runs": 100,
        "latency_ms": {"p50": p90 / 2, "p90": p90, "p99": p90 * 1.2, "mean": p90 / 2, "std": 0.1, "min": 0.1,
                       "max": p90 * 2}, "accuracy": {"metric": "top1", "value": 0.99, "samples": 360}}))


def _status(device, seq, state):
    return ("status", messages.envelope("status", "sim", device, seq, {"state": state}))


def test_offline_and_constraints_alerts_are_kept_as_episodes_and_listed(fleet_file, tmp_path, run_cli):
    """An offline status and a benchmark breaking the device's constraints were alerted but not kept: the history had
    no row of them, `edgekit history alerts` and the report never listed them, and a restarted monitor could not tell
    them. Now each is an episode in the alerts table: offline until the device's status says otherwise, a variant
    breaking the constraints until a benchmark of it meets them (rpi4: p90 <= 50 ms)."""
    import json

    store = Store(tmp_path / "h.db")
    mon = _started(fleet_file, store)
    for record in (_status("d1", 1, "offline"), _status("d1", 2, "offline"), _bench("d2", 1, "int8", 80.0),
                   _bench("d2", 2, "int8", 90.0), _bench("d2", 3, "fp32", 70.0)):
        mon._after_store(*record)
    assert [a.text for a in mon.alerts] == ["d1 went offline", "d2 int8: breaks p90 <= 50 ms (80 ms p90, the device's "
                                            "clock)", "d2 fp32: breaks p90 <= 50 ms (70 ms p90, the device's clock)"]
    mon._after_store(*_bench("d2", 4, "int8", 20.0))  # int8 meets them now: its episode ends, fp32's holds
    mon.stop()
    again = _started(fleet_file, store)  # a restart: the episodes under way are not news
    for record in (_status("d1", 3, "offline"), _bench("d2", 5, "fp32", 75.0)):
        again._after_store(*record)
    assert not again.alerts
    again._after_store(*_status("d1", 4, "online"))  # d1 back: its offline episode ends, the next is news
    again._after_store(*_status("d1", 5, "offline"))
    assert [a.text for a in again.alerts] == ["d1 went offline"]
    again.stop()
    assert [(r["device"], r["kind"], r["subject"], r["cleared_at"] is None) for r in reversed(store.alerts())] == [
        ("d1", "offline", "", False), ("d2", "constraints", "int8", False), ("d2", "constraints", "fp32", True),
        ("d1", "offline", "", True)]
    code, out, err = run_cli("history", "alerts", "--history", tmp_path / "h.db", "--json")
    assert code == 0 and [r["kind"] for r in json.loads(out)["alerts"]] == ["offline", "constraints", "constraints",
                                                                            "offline"], err
    code, out, err = run_cli("history", "alerts", "--history", tmp_path / "h.db", "--open")
    assert code == 0 and "constraints fp32" in out and "d1 went offline" in out, err
    code, out, err = run_cli("report", "--history", tmp_path / "h.db", "--out", tmp_path / "r.html", "--json")
    assert code == 0 and json.loads(out)["alerts_holding"] == 2, err
    assert "constraints fp32" in (tmp_path / "r.html").read_text()


def test_a_device_naming_a_new_variant_in_every_breaking_record_holds_at_most_max_breaking_variants(fleet_file, tmp_path):
    """A hostile device (its own valid key) signing benchmarks that break its constraints, each naming a new variant,
    grew the monitor's set of breaking variants, the history's open alerts and the operator's screen by one a record,
    without bound (a variant named once never meets the constraints). Now a device holds at most MAX_BREAKING_VARIANTS
    such episodes: the others are stored and counted, alerted once."""
    from edge_kit.telemetry.monitor import MAX_BREAKING_VARIANTS

    store = Store(tmp_path / "h.db")
    mon = _started(fleet_file, store)
    many = MAX_BREAKING_VARIANTS + 200
    for seq in range(1, many + 1):
        mon._after_store(*_bench("d2", seq, f"v{seq}", 80.0))
    assert len(mon._breaking["d2"]) == MAX_BREAKING_VARIANTS
    assert mon.stats.breaking_not_alerted == 200
    assert len(store.alerts(holds=True, limit=1000)) == MAX_BREAKING_VARIANTS
    assert mon.alerts_raised == MAX_BREAKING_VARIANTS + 1
    assert mon.alerts[-1].text.startswith(f"d2: {MAX_BREAKING_VARIANTS} variants break its constraints at once")
    mon._after_store(*_bench("d2", many + 1, "v1", 20.0))  # v1 meets them: its episode ends, room for one more
    mon._after_store(*_bench("d2", many + 2, "new", 90.0))
    assert "new" in mon._breaking["d2"] and mon.alerts[-1].text.startswith("d2 new: breaks p90 <= 50 ms")
    mon.stop()


def test_a_run_cap_counts_per_device_and_alerts_each_device_once_until_rearmed(fleet_file, tmp_path):
    """The monitor's three per-device caps of a run (breaking variants, gap rows, restarts) each kept their own counters
    and "alerted once" flags (one a +1 past the cap). One RunCap holds them: room and alert-once per device, and a
    passing benchmark that closes one of a full device's constraints episodes lets the next one past the cap alert
    again."""
    from edge_kit.telemetry.monitor import MAX_BREAKING_VARIANTS, RunCap

    cap = RunCap(3)
    cap.take("a", 2)
    assert (cap.room("a"), cap.full("a"), cap.room("b")) == (1, False, 3)
    cap.take("a")
    assert cap.full("a") and not cap.full("b")
    assert [cap.first_refusal("a"), cap.first_refusal("a"), cap.first_refusal("b")] == [True, False, True]
    cap.rearm("a")
    assert cap.first_refusal("a") and not cap.first_refusal("a")

    store = Store(tmp_path / "h.db")
    mon = _started(fleet_file, store)
    for seq in range(1, MAX_BREAKING_VARIANTS + 3):
        mon._after_store(*_bench("d2", seq, f"v{seq}", 80.0))
    mon._after_store(*_bench("d2", 100, "v1", 20.0))  # v1's episode ends: the cap's alert re-armed
    mon._after_store(*_bench("d2", 101, "v1", 80.0))  # full again
    mon._after_store(*_bench("d2", 102, "w1", 80.0))
    mon._after_store(*_bench("d2", 103, "w2", 80.0))
    capped = [a.text for a in mon.alerts if " variants break its constraints at once" in a.text]
    assert len(capped) == 2 and mon.stats.breaking_not_alerted == 2 + 2
    mon.stop()


def test_records_a_telemetry_mark_said_were_lost_are_one_gap_across_a_restart(fleet_file, tmp_path):
    """d1's telemetry said it gave bench 1..3 (its ``seqs``) and only bench 1 came: the gap 2..3 was recorded. A
    persistent monitor started again took where d1's bench numbering stood from the newest stored bench record (1), so
    d1's next bench record (4) recorded 2..3 again: two gap rows and two alerts for two lost records."""
    def stored(mon, kind, msg):
        store.add(kind, msg)
        mon._after_store(kind, msg)

    store = Store(tmp_path / "h.db")
    mon = _started(fleet_file, store, persistent=True, client_id="m1")
    stored(mon, *_bench("d1", 1, "int8", 20.0))
    stored(mon, "telemetry", messages.envelope("telemetry", "sim", "d1", 1, {"conditions": {}, "spool": {},
                                                                            "seqs": {"bench": 3}}))
    assert [(g["first_missing"], g["last_missing"]) for g in store.sequence_gaps()] == [(2, 3)]
    mon.stop()
    again = _started(fleet_file, store, persistent=True, client_id="m1")
    stored(again, *_bench("d1", 4, "int8", 20.0))
    assert [(g["first_missing"], g["last_missing"]) for g in store.sequence_gaps()] == [(2, 3)]
    assert not [a for a in again.alerts if a.kind == "gap"] and again.stats.gaps == 0
    stored(again, *_bench("d1", 6, "int8", 20.0))  # a gap after it is still one
    assert [(g["first_missing"], g["last_missing"]) for g in store.sequence_gaps()] == [(5, 5), (2, 3)]
    again.stop()


def test_a_gap_in_a_stream_the_device_s_spool_drops_says_the_device_may_have_dropped_it(fleet_file, tmp_path):
    """An agent whose spool is full drops its oldest live, shadow and telemetry rows (numbered already, counted in its
    telemetry's spool figures); the gap they leave, which its telemetry's ``seqs`` now shows at once, was alerted as lost
    by the broker only, sending the operator to the broker's queue limits. Bench records are never dropped so."""
    store = Store(tmp_path / "h.db")
    mon = _started(fleet_file, store)
    for record in (_live("d1", 1), _live("d1", 4), _bench("d1", 1, "int8", 20.0), _bench("d1", 3, "int8", 20.0)):
        mon._after_store(*record)
    live, bench = [a.text for a in mon.alerts if a.kind == "gap"]
    assert live.startswith("d1: 2 live record(s) never arrived (seq 2..3)") and live.endswith(
        "or dropped by the device's full spool before it sent them (its telemetry's spool counts those: dropped_live)")
    assert bench.startswith("d1: 1 bench record(s) never arrived (seq 2..2)") and "spool" not in bench
    mon.stop()


def test_a_share_worker_seeing_the_device_back_online_closes_the_offline_alert_a_peer_opened_since_its_sync(
        fleet_file, tmp_path):
    """With --share, the offline status went to one worker and the device's next status (online) to another, which had
    not synced the peer's new alert yet (at most every ALERT_SYNC_S): it closed nothing, and the alert held until the
    device's next reconnect. Now any worker seeing a status other than offline closes it. The gauge of a device whose
    variant breaks its constraints says so on /metrics."""
    store = Store(tmp_path / "h.db")
    a, b = (_started(fleet_file, store, share="edgekit", workers=2) for _ in range(2))
    a._after_store(*_status("d1", 1, "offline"))
    assert _rows(store) == [("d1", "offline", True)]
    b._after_store(*_status("d1", 2, "online"))  # B has not synced: d1's offline alert is not among its own
    assert _rows(store) == [("d1", "offline", False)]
    b._after_store(*_bench("d2", 1, "int8", 80.0))  # rpi4: p90 <= 50 ms
    metrics = FleetMetrics()
    metrics.watch(b)
    assert metrics.registry.get_sample_value("edgekit_device_breaking_constraints", {"device": "d2"}) == 1
    assert metrics.registry.get_sample_value("edgekit_device_breaking_constraints", {"device": "d1"}) == 0
    a.stop()
    b.stop()


def test_a_revoked_device_s_open_alerts_close_as_revoked_and_it_is_never_alerted_silent(fleet_file, tmp_path, run_cli):
    """`fleet revoke` leaves a device in the fleet file: its open silence and offline alerts held for ever, shown as
    carried over at every monitor start, and a device revoked while the monitor ran was alerted silent. Now a
    monitor closes a revoked device's open alerts (cleared_why "revoked", shown so) and never alerts it silent."""
    import json

    from device_agents.identity import Signer
    from edge_kit.fleet.keys import FleetKeys

    keys = FleetKeys(tmp_path / "keys")
    keys.register_many({d: Signer.generate().public for d in ("d1", "d2", "d3")})
    store = Store(tmp_path / "h.db")
    store.open_alert("d1", "silent", "d1 silent for 200 s", 1_700_000_000.0)
    store.open_alert("d1", "offline", "d1 went offline", 1_700_000_000.0)
    store.open_alert("d2", "offline", "d2 went offline", 1_700_000_000.0)
    keys.revoke("d1", "stolen")
    mon = _started(fleet_file, store, silence_s=0.01)
    assert [(r["device"], r["kind"]) for r in mon.carried_over] == [("d2", "offline")]  # d1's: no news
    assert sorted(_rows(store)) == [("d1", "offline", False), ("d1", "silent", False), ("d2", "offline", True)]
    keys.revoke("d3", "lost")  # while the monitor runs: silent for longer than silence_s, never alerted
    mon.last_seen.update({"d3": time.time() - 60, "d1": time.time() - 60})
    mon._check_silence()
    assert [a.device for a in mon.alerts] == []
    mon.stop()
    code, out, err = run_cli("history", "alerts", "--history", tmp_path / "h.db", "--device", "d1")
    assert code == 0 and out.count("(revoked)") == 2, (out, err)
    code, out, err = run_cli("history", "alerts", "--history", tmp_path / "h.db", "--json")
    assert sorted((r["device"], r["cleared_why"]) for r in json.loads(out)["alerts"]) == [
        ("d1", "revoked"), ("d1", "revoked"), ("d2", None)], out


def test_a_gap_a_single_monitor_recorded_between_two_share_runs_is_not_recorded_again_by_the_next(fleet_file,
                                                                                                 tmp_path):
    """A --share run left its gap scan's marks; a monitor without --share then ran and recorded its own gaps; the next
    --share run kept the old marks (a mark is never moved back), re-read everything stored since and recorded and
    alerted the same gap again. A monitor without --share now forgets the marks as it starts."""
    store = Store(tmp_path / "h.db")
    tele = lambda n: ("telemetry", messages.envelope("telemetry", "sim", "d1", n, {}))  # noqa: E731
    store.add_many([tele(n) for n in range(1, 11)])
    _started(fleet_file, store, share="edgekit", workers=2).stop()  # marks d1's telemetry at 10
    _started(fleet_file, store).stop()  # a single monitor: it recorded 15..19 itself, below
    store.add_many([tele(n) for n in [*range(11, 15), *range(20, 31)]])
    store.add_gap("d1", "telemetry", 15, 19)
    again = _started(fleet_file, store, share="edgekit", workers=2, gap_grace_s=0)
    again._gaps_scanned = -math.inf
    again._scan_gaps()
    again.stop()
    assert store._rows("SELECT first_missing, last_missing FROM gaps WHERE device = 'd1'") == [(15, 19)]
    assert [a for a in again.alerts if a.kind == "gap"] == []


def _kept(worker, *records):
    """Have ``worker`` store ``records`` (``(kind, message)`` pairs) as checked messages of one batch, each received
    a microsecond after the one before (a worker stamps each message as it arrives)."""
    import json

    now = time.time()
    worker._keep(list(records), [json.dumps(m).encode() for _k, m in records],
                 [now + i / 1e6 for i in range(len(records))])


def test_a_monitor_run_records_at_most_max_gap_rows_gaps_a_device_and_counts_the_rest(fleet_file, tmp_path):
    """A device skipping every other number (its own valid key, or a broker dropping) wrote one gap row and one alert
    a record, bounded only by its ingest budget. Now a run records and alerts at most MAX_GAP_ROWS gaps a device; the
    rest are counted (gaps_not_recorded), alerted once a device; other devices' gaps are still recorded."""
    from edge_kit.telemetry.monitor import MAX_GAP_ROWS

    store = Store(tmp_path / "h.db")
    mon = _started(fleet_file, store)
    for seq in range(0, 2 * (MAX_GAP_ROWS + 10), 2):
        mon._after_store(*_live("d1", seq))
    mon._after_store(*_live("d2", 1))
    mon._after_store(*_live("d2", 3))
    assert store.count("gaps") == MAX_GAP_ROWS + 1
    assert mon.stats.gaps == MAX_GAP_ROWS + 1 and mon.stats.gaps_not_recorded == 9
    capped = [a.text for a in mon.alerts if a.text.startswith(f"d1: {MAX_GAP_ROWS} sequence gaps recorded")]
    assert len(capped) == 1 and len([a for a in mon.alerts if a.kind == "gap"]) == MAX_GAP_ROWS + 2
    mon.stop()


def test_a_share_scan_records_at_most_max_gap_rows_gaps_a_device_and_goes_on_at_once_past_its_bound(
        fleet_file, tmp_path, monkeypatch):
    """The --share gap scan holds the same cap per worker run; and a scan that read a stream to its bound (marks lagging
    far behind) is followed by the next at once, not after GAP_SCAN_S, until the stream is judged."""
    from edge_kit.telemetry import monitor as monitor_module

    monkeypatch.setattr(monitor_module, "SCAN_ROWS", 10)
    store = Store(tmp_path / "h.db")
    store.add_many([_live("d1", 0)])
    mon = _started(fleet_file, store, share="edgekit", workers=1, gap_grace_s=0)
    store.add_many([_live("d1", seq) for seq in range(2, 200, 2)])
    scans = 0
    while scans < 100:
        mon._scan_gaps()
        scans += 1
        if mon._gaps_scanned != -math.inf:
            break
    assert scans == 10  # 99 rows, 10 a scan: the tenth read fewer than its bound
    assert store.count("gaps") == monitor_module.MAX_GAP_ROWS and mon.stats.gaps_not_recorded == 98 - 32 + 1
    assert store._rows("SELECT scanned_to FROM seq_scans WHERE device = 'd1' AND kind = 'live'") == [(198,)]
    mon.stop()


@pytest.mark.parametrize("ahead", [0, 2 * LATE_S], ids=["same-clock", "host-two-days-ahead"])
def test_a_late_record_a_share_worker_stores_is_taken_out_of_the_gap_the_scan_recorded(fleet_file, tmp_path,
                                                                                        monkeypatch, ahead):
    """A record stored after the scan recorded its number as lost (later than --gap-grace-s) stayed in that gap too:
    the history said it was stored and lost. The worker storing it now takes it out (the gap splits), counted late.
    A late record of no epoch leaves a gap recorded in the last 24 h (LATE_S): the look took this host's clock, the
    scan records gaps by the database's, so a worker on a host two days ahead found no gap recorded lately and left
    the record in its gap. It now looks by the clock its peers record by (Monitor._clock)."""
    store = Store(tmp_path / "h.db")
    store.add_many([_live("d1", 0)])
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + ahead)  # this host's clock
    a, b = (_started(fleet_file, store, share="edgekit", workers=2, gap_grace_s=0) for _ in range(2))
    _kept(a, _live("d1", 1), _live("d1", 5))
    a._scan_gaps()
    assert [(g["first_missing"], g["last_missing"]) for g in store.sequence_gaps()] == [(2, 4)]
    _kept(b, _live("d1", 3))
    assert sorted((g["first_missing"], g["last_missing"]) for g in store.sequence_gaps()) == [(2, 2), (4, 4)]
    assert b.stats.late == 1 and store.count("live") == 4
    a.stop()
    b.stop()


def test_a_share_worker_does_not_alert_silent_a_device_its_peer_still_hears_and_closes_a_peers_alert(
        fleet_file, tmp_path, monkeypatch):
    """With --share each worker judged silence from the records it stored itself: the broker handing a device's
    records to the peer for a while, this worker alerted "d1 silent" while the history held d1's records of a second
    ago; and a silence alert a peer raised was closed only by that peer. Now a worker looks the device up in the history
    before alerting, and takes the open silence alerts at its sync as it takes the others."""
    from edge_kit.telemetry import monitor as monitor_module

    monkeypatch.setattr(monitor_module, "ALERT_SYNC_S", 0.0, raising=False)
    store = Store(tmp_path / "h.db")
    a, b = (_started(fleet_file, store, share="edgekit", workers=2, silence_s=5) for _ in range(2))
    _kept(b, _live("d1", 1))  # the peer hears d1 now
    a.last_seen["d1"] = time.time() - 60  # a last heard it a minute ago
    a._check_silence()
    assert not [x for x in a.alerts if x.kind == "silent"] and _rows(store) == []
    store._execute("UPDATE live SET ts = ts - 60")  # d1 is silent for all: a raises it
    a.last_seen["d1"] = time.time() - 60
    a._check_silence()
    assert [x.text for x in a.alerts if x.kind == "silent"] == ["d1 silent for 60 s"]
    _kept(b, _live("d1", 2))  # b hears d1 again: it syncs, finds a's alert and closes it
    assert _rows(store) == [("d1", "silent", False)]
    a.stop()
    b.stop()


def test_a_constraints_episode_a_peer_opened_closes_on_the_first_passing_benchmark_any_share_worker_stores(
        fleet_file, tmp_path):
    """With --share, a's benchmark broke d2's constraints (a opened the alert) and b, not synced since, stored the next
    one that met them: b closed nothing, and the alert held until b's sync and the benchmark after. Now it closes."""
    store = Store(tmp_path / "h.db")
    a, b = (_started(fleet_file, store, share="edgekit", workers=2) for _ in range(2))
    a._after_store(*_bench("d2", 1, "int8", 80.0))  # rpi4: p90 <= 50 ms
    assert _rows(store) == [("d2", "constraints", True)]
    b._after_store(*_bench("d2", 2, "int8", 20.0))
    assert _rows(store) == [("d2", "constraints", False)]
    a.stop()
    b.stop()


def test_a_record_a_single_monitor_stores_after_recording_its_gap_is_taken_out_of_it(fleet_file, tmp_path):
    """Without --share the monitor records a gap when a higher number arrives; the missing record arriving after that
    (handed over late by the broker) was stored and stayed in its gap. Now it is taken out (counted late); a batch
    in order costs no query for it."""
    store = Store(tmp_path / "h.db")
    mon = _started(fleet_file, store)
    _kept(mon, _live("d1", 1), _live("d1", 5))
    assert [(g["first_missing"], g["last_missing"]) for g in store.sequence_gaps()] == [(2, 4)]
    _kept(mon, _live("d1", 3))
    assert sorted((g["first_missing"], g["last_missing"]) for g in store.sequence_gaps()) == [(2, 2), (4, 4)]
    assert mon.stats.late == 1 and not mon._behind
    mon.stop()


def test_a_single_monitor_on_a_host_whose_clock_is_behind_takes_a_new_numbering_s_late_record_out_of_its_gap(
        fleet_file, tmp_path, monkeypatch):
    """Without --share a gap row (and a record) took this host's clock, but a restart the database's: on a host an
    hour behind, a gap of a re-imaged device's new numbering was recorded an hour before its restart, so the late
    record it missed was taken as of no gap of its numbering and stayed in it (stored and lost). A monitor now records
    its gaps and restarts by one clock (Monitor._clock: this host's without --share, as its records)."""
    def live(seq, epoch):
        return ("live", messages.envelope("live", "sim", "d1", seq, {"requests": 1}, epoch=epoch))

    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 3600)  # this host's clock: an hour behind the database's
    store = Store(tmp_path / "h.db")
    mon = _started(fleet_file, store)
    _kept(mon, live(1, "e1"), live(2, "e1"))
    _kept(mon, live(1, "e2"), live(4, "e2"))  # re-imaged: 2 and 3 of the new numbering not here yet
    assert mon.stats.restarts == 1
    assert [(g["first_missing"], g["last_missing"]) for g in store.sequence_gaps()] == [(2, 3)]
    _kept(mon, live(2, "e2"))
    assert [(g["first_missing"], g["last_missing"]) for g in store.sequence_gaps()] == [(3, 3)] and mon.stats.late == 1
    mon.stop()


def test_late_records_splitting_a_gap_add_at_most_max_gap_rows_rows_a_device_and_the_rest_are_counted(
        fleet_file, tmp_path):
    """The MAX_GAP_ROWS cap was bypassed through late records: a device (its own valid key) numbered 1 then 1000, then
    sent every other number in between late: each split the recorded gap, a row a record (400 records, 401 rows). Now
    the rows a device's splits add count towards its MAX_GAP_ROWS of the run; past them a late record stays in its gap,
    counted (late_not_taken) and alerted once; another device's late record is still taken out."""
    from edge_kit.telemetry.monitor import MAX_GAP_ROWS

    store = Store(tmp_path / "h.db")
    mon = _started(fleet_file, store)
    _kept(mon, _live("d1", 1), _live("d1", 1000), _live("d2", 1), _live("d2", 5))
    for seq in range(3, 803, 2):  # 400 late records, each inside the gap
        _kept(mon, _live("d1", seq))
    rows = store._rows("SELECT COUNT(*) FROM gaps WHERE device = 'd1'")[0][0]
    assert rows == MAX_GAP_ROWS  # the gap itself, and 31 splits
    assert mon.stats.late == MAX_GAP_ROWS - 1 and mon.stats.late_not_taken == 400 - (MAX_GAP_ROWS - 1)
    assert store.count("live") == 404  # every record stored
    assert len([a for a in mon.alerts if a.text.startswith(f"d1: {MAX_GAP_ROWS} sequence gaps recorded")]) == 1
    _kept(mon, _live("d2", 3))
    assert sorted((g["first_missing"], g["last_missing"]) for g in store.sequence_gaps(device="d2")) == [(2, 2), (4, 4)]
    mon.stop()


def test_a_device_naming_a_new_epoch_in_every_message_records_at_most_max_restarts_a_run(fleet_file, tmp_path):
    """A device (its own valid key) naming a new epoch in each message added a seq_epochs row and a restart alert a
    message, bounded only by its ingest budget. Now a run records at most MAX_RESTARTS restarts a device; the others are
    counted (restarts_not_recorded, each new epoch once) and alerted once; its records are all stored."""
    from edge_kit.telemetry.monitor import MAX_RESTARTS

    store = Store(tmp_path / "h.db")
    mon = _started(fleet_file, store)
    for i in range(50):
        _kept(mon, ("live", messages.envelope("live", "sim", "d1", 1, {"requests": 1}, epoch=f"e{i}")))
    _kept(mon, ("live", messages.envelope("live", "sim", "d1", 2, {"requests": 1}, epoch="e49")))  # same: once
    assert store.count("seq_epochs") == MAX_RESTARTS + 1  # the first numbering, and MAX_RESTARTS restarts
    assert mon.stats.restarts == MAX_RESTARTS and mon.stats.restarts_not_recorded == 50 - 1 - MAX_RESTARTS
    assert len([a for a in mon.alerts if a.kind == "restart"]) == MAX_RESTARTS + 1
    assert store.count("live") == 51
    _kept(mon, ("live", messages.envelope("live", "sim", "d2", 1, {"requests": 1}, epoch="x1")),
          ("live", messages.envelope("live", "sim", "d2", 1, {"requests": 1}, epoch="x2")))
    assert mon.stats.restarts == MAX_RESTARTS + 1  # another device's restart is still recorded
    mon.stop()


def test_a_share_worker_does_not_alert_silent_a_device_a_peer_whose_host_clock_is_behind_stores(fleet_file, tmp_path,
                                                                                                  monkeypatch):
    """Shared silence compared the receive time a peer stored (by its host's clock) with this host's clock: a peer host
    five minutes behind stored d1's record of a second ago as five minutes old, and this worker alerted "d1 silent".
    Now share workers store receive times by the database's clock (each measures its own host's offset to it), and
    compare by it: no false alert; a device nobody stored for its limit is still alerted."""
    path = tmp_path / "h.db"
    store_a, store_b = Store(path), Store(path)
    monkeypatch.setattr(store_b, "clock_offset", lambda: 300.0, raising=False)  # b's host clock is 300 s behind the database's
    a = _started(fleet_file, store_a, share="edgekit", workers=2, silence_s=60)
    b = _started(fleet_file, store_b, share="edgekit", workers=2, silence_s=60)
    record = _live("d1", 1)
    b._keep([record], [b"{}"], [time.time() - 300])  # received now, by b's clock
    assert abs(store_a.last_heard(["d1"])["d1"] - time.time()) < 5  # stored by the database's clock
    a.last_seen["d1"] = time.time() - 120  # a last heard d1 two minutes ago itself
    a._check_silence()
    assert not [x for x in a.alerts if x.kind == "silent"] and _rows(store_a) == []
    a.last_seen["d2"] = time.time() - 120  # nobody stored d2 since: silent
    a._check_silence()
    assert [x.text for x in a.alerts if x.kind == "silent"] == ["d2 silent for 120 s"]
    a.stop()
    b.stop()


def test_a_share_worker_on_a_host_whose_clock_is_ahead_reads_the_history_s_receive_times_by_the_database_s_clock(
        fleet_file, tmp_path, monkeypatch):
    """With --share the history's receive times are the database's clock. A worker starting on a host five minutes
    ahead read them by its own: a device that flooded a second ago had spent nothing of its budget (a fresh burst),
    and one heard a second ago was last heard five minutes ago. Now it reads them by the database's clock."""
    path = tmp_path / "h.db"
    with Store(path) as store:
        store.add_many([_live("d1", seq) for seq in range(1, 61)], received=[time.time() - 1] * 60)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 300)  # this host's clock: 300 s ahead of the database's
    store = Store(path)
    mon = _started(fleet_file, store, share="edgekit", workers=1, budget_rate=1, budget_burst=10)
    assert -302 < mon._db_offset < -298
    assert mon.budget.available("d1") <= 2  # 60 stored a second ago: no fresh burst of 10
    assert abs(mon.last_seen["d1"] - (time.time() - 1)) < 2
    mon.stop()
