"""What the monitor does with a revoked device's messages: a last will it left, sent again by a keyless peer, is
counted once (copies as replays); a thief flooding the device's topic with its stolen, revoked key is refused as
revoked before any check, and opens no alert."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from monitor_helpers import fleet_yaml
from monitor_helpers import started as _monitor

from device_agents.identity import Signer
from edge_kit.fleet.inventory import load_fleet
from edge_kit.telemetry.store import Store
from edgekit_protocol import messages


@pytest.fixture
def revoked_fleet(tmp_path):
    """Return (fleet file, d1's stolen signer, d1's last will signed before its revocation): d1 revoked, d2 not."""
    path = fleet_yaml(tmp_path / "fleet.yaml", ("d1", "d2"))
    keys = load_fleet(path).key_store()
    d1, d2 = Signer.generate(), Signer.generate()
    keys.register_many({"d1": d1.public, "d2": d2.public})
    will = messages.envelope("status", "sim", "d1", 7, {"state": "offline"})
    will["ts"] = round(time.time() - 60, 6)  # signed when it connected, before the revocation
    will = d1.sign(will)
    keys.revoke("d1", "stolen")
    return path, d1, messages.encode(will)


def _delivered(topic: str, payload: bytes, retain: bool) -> SimpleNamespace:
    return SimpleNamespace(topic=topic, payload=payload, retain=retain, qos=0, mid=0)


def test_a_replayed_last_will_of_a_revoked_device_is_counted_once_and_its_copies_as_replays(revoked_fleet, tmp_path):
    """A keyless peer that captured the last will of a revoked device published it again and again: each copy verified
    (signed by the device before its revocation) and was counted as left_by_revoked, so the count said the broker kept
    sending leftovers. Now each will is counted once, by its msg_id; a copy sent live again is a replay."""
    fleet_file, _stolen, will = revoked_fleet
    topic = messages.topic("sim", "d1", "status")
    with Store(tmp_path / "h.db") as store:
        mon = _monitor(fleet_file, store)
        try:
            mon._on_message(None, None, _delivered(topic, will, retain=True))  # the broker's retained copy
            mon._on_message(None, None, _delivered(topic, will, retain=True))  # sent again at the next subscribe
            for _ in range(5):
                mon._on_message(None, None, _delivered(topic, will, retain=False))  # the peer's replays
            assert mon.stats.left_by_revoked == 1
            assert mon.retained_leftovers == {"d1"}  # the broker holds it: the summary names what clears it
            assert mon.stats.replayed_by_revoked == 5
            assert mon._queue.qsize() == 0 and mon.stats.invalid == 0 and not mon.alerts
        finally:
            mon.stop(drain_s=0)


def test_a_thief_flooding_a_revoked_device_s_topic_is_refused_as_revoked_and_opens_no_alert(revoked_fleet, tmp_path):
    """A thief holding a revoked device's key flooded its topic with records it signed: past the device's ingest budget
    they opened an over_budget alert for a device whose alerts were closed as revoked (and each one within the budget
    was verified, then alerted as refused). Now every message on a revoked device's topic is refused unchecked as
    revoked: counted (stats.revoked), kept as refused with the reason, no budget spent, no alert; another device's
    records are stored as before."""
    fleet_file, stolen, _will = revoked_fleet
    flood = [(messages.topic("sim", "d1", "telemetry"),
              messages.encode(stolen.sign(messages.envelope("telemetry", "sim", "d1", seq, {"conditions": {},
                                                                                              "spool": {}}))),
              time.time(), None) for seq in range(1, 41)]
    with Store(tmp_path / "h.db") as store:
        mon = _monitor(fleet_file, store, budget_rate=1, budget_burst=5)
        try:
            good, _raw, _at = mon._check_within_budget(flood)
            mon._end_floods(float("inf"))
            assert not mon.alerts and store.open_alert_keys() == [], [a.text for a in mon.alerts]
            assert good == [] and mon.stats.over_budget == 0 and mon.stats.invalid == 0
            assert mon.stats.revoked == 40 and mon.stats.received == 40
            refused = store.refused_messages("d1", limit=100)
            assert len(refused) == 40 and all("d1's key" in r["reason"] and "revoked on" in r["reason"]
                                              and "stolen" in r["reason"] for r in refused), refused[:1]
            assert mon.budget.available("d1") == 5  # none spent
        finally:
            mon.stop(drain_s=0)


def test_a_flood_on_a_revoked_device_s_topic_costs_no_history_write_a_message_past_the_first(revoked_fleet, tmp_path,
                                                                                             monkeypatch):
    """Past the first MAX_REVOKED_ROWS of a run, a revoked device's messages are counted, not written one by one (as
    a device over its ingest budget costs no write a message)."""
    from edge_kit.telemetry import monitor as monitor_module

    monkeypatch.setattr(monitor_module, "MAX_REVOKED_ROWS", 10)
    fleet_file, stolen, _will = revoked_fleet
    flood = [(messages.topic("sim", "d1", "bench"), b"{}", time.time(), None) for _ in range(40)]
    with Store(tmp_path / "h.db") as store:
        mon = _monitor(fleet_file, store)
        try:
            mon._check_within_budget(flood)
            assert mon.stats.revoked == 40 and len(store.refused_messages("d1", limit=100)) == 10
        finally:
            mon.stop(drain_s=0)
