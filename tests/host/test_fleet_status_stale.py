"""`edgekit fleet status` from the history alone (no broker asked): a device whose last word was online but that
has been silent for more than STALE_INTERVALS telemetry intervals is shown stale, saying so, not online."""

from __future__ import annotations

import json
import time

from edge_kit.telemetry.report import STALE_INTERVALS, TELEMETRY_INTERVAL_S
from edge_kit.telemetry.store import Store, history_path
from edgekit_protocol import messages


def test_a_device_silent_for_longer_than_a_few_telemetry_intervals_is_stale_not_online(tmp_path, run_cli):
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: sim\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                          "devices:\n  - {name: quiet, host: 127.0.0.1}\n  - {name: chatty, host: 127.0.0.1}\n"
                          "  - {name: gone, host: 127.0.0.1}\n  - {name: new, host: 127.0.0.1}\n")
    after = STALE_INTERVALS * TELEMETRY_INTERVAL_S
    now = time.time()
    store = Store(history_path(fleet_file))
    store.add_many([("status", messages.envelope("status", "sim", "quiet", 1, {"state": "online"})),
                    ("status", messages.envelope("status", "sim", "chatty", 1, {"state": "online"})),
                    ("status", messages.envelope("status", "sim", "gone", 1, {"state": "offline"}))],
                   received=[now - after - 60, now - 5, now - after - 60])
    store.close()
    code, out, err = run_cli("fleet", "status", "--fleet", fleet_file, "--history-only")
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (["quiet"], ["chatty"], ["gone"], ["new"])}
    assert f"stale (history: online, silent > {after:.0f} s)" in rows["quiet"], rows["quiet"]
    assert "online (history)" in rows["chatty"] and "offline (history)" in rows["gone"] and "never seen" in rows["new"]
    assert "broker not asked (--history-only)" in out and f"more than {STALE_INTERVALS} telemetry intervals" in out
    # every state came from the history: the line said the broker's and "otherwise the history's"
    assert " ".join(out.split()).count("state: the history's newest status, 'stale' when") == 1 and "otherwise" not in out
    code, out, err = run_cli("fleet", "status", "--fleet", fleet_file, "--json")  # asked, but no key is registered
    state = json.loads(out)
    assert state["state"]["quiet"]["state"] == "stale" and state["state"]["quiet"]["said"] == "online"
    assert state["state"]["quiet"]["source"] == "history" and state["state"]["quiet"]["silent_s"] > after
    assert state["state_source"].startswith("state: the history's newest status")
    assert state["state_source"].endswith("; broker not asked: no device key is registered in "
                                          f"{tmp_path / 'keys' / 'devices.json'} yet (deploy first)"), state["state_source"]


def test_each_device_is_judged_stale_by_its_own_telemetry_interval(tmp_path, run_cli):
    """The stale rule took the default 30 s interval for every device: an agent sending every 10 minutes was
    called stale between its beats, one sending every 5 s only after 90 s of silence. Each device's newest
    telemetry says its interval now; an agent that does not say gets the default."""
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: sim\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                          "devices:\n  - {name: slow, host: 127.0.0.1}\n  - {name: fast, host: 127.0.0.1}\n"
                          "  - {name: old, host: 127.0.0.1}\n")
    now = time.time()
    beat = {"conditions": {}, "spool": {}}
    rows = []
    for device, interval in (("slow", 600.0), ("fast", 5.0), ("old", None)):
        said = {**beat, "interval_s": interval} if interval else beat
        rows += [("status", messages.envelope("status", "sim", device, 1, {"state": "online"})),
                 ("telemetry", messages.envelope("telemetry", "sim", device, 1, said))]
    store = Store(history_path(fleet_file))
    store.add_many(rows, received=[now - 200] * len(rows))  # each silent for 200 s
    store.close()
    code, out, err = run_cli("fleet", "status", "--fleet", fleet_file, "--history-only", "--json")
    assert code == 0, err
    state = json.loads(out)["state"]
    assert state["slow"]["state"] == "online" and state["slow"]["stale_after_s"] == 1800
    assert (state["slow"]["interval_s"], state["slow"]["interval_source"]) == (600, "device")
    assert state["fast"]["state"] == "stale" and state["fast"]["stale_after_s"] == 15
    assert state["old"]["state"] == "stale" and state["old"]["stale_after_s"] == STALE_INTERVALS * TELEMETRY_INTERVAL_S
    assert state["old"]["interval_source"] == "default"
    code, out, err = run_cli("fleet", "status", "--fleet", fleet_file, "--history-only")
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (["slow"], ["fast"], ["old"])}
    assert "online (history)" in lines["slow"] and "stale (history: online, silent > 15 s)" in lines["fast"]
    assert "each device's own, as its newest telemetry says" in " ".join(out.split())


def test_the_monitor_judges_silence_by_each_devices_own_telemetry_interval(tmp_path):
    """`fleet status` took each device's interval_s, the monitor's silence alert did not: an agent set to report
    every 10 minutes was alerted 'silent' 180 s after each of its messages. A device is silent now after
    --silence-s or three of its own intervals, whichever is longer; one that says no interval keeps --silence-s."""
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.telemetry.monitor import Monitor

    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: sim\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                          "devices:\n  - {name: slow, host: 127.0.0.1}\n  - {name: old, host: 127.0.0.1}\n")
    store = Store(tmp_path / "h.db")
    store.add("telemetry", messages.envelope("telemetry", "sim", "later", 1, {"interval_s": 900.0}))
    mon = Monitor(load_fleet(fleet_file), store, silence_s=180, verify_in_child=False)
    for device, body in (("slow", {"interval_s": 600.0}), ("old", {})):
        mon._after_store("telemetry", messages.envelope("telemetry", "sim", device, 1, body))
    mon.last_seen = {"slow": time.time() - 300, "old": time.time() - 300}
    mon._check_silence()
    assert [a.text for a in mon.alerts] == ["old silent for 300 s"]
    mon.last_seen["slow"] = time.time() - 1900  # past 3 x 600 s
    mon._check_silence()
    assert [a.text for a in mon.alerts] == ["old silent for 300 s", "slow silent for 1900 s"]

    later = Monitor(load_fleet(fleet_file), store, silence_s=180, verify_in_child=False)
    try:
        later.start(timeout=0.5)  # no broker on port 1: it reads the history, then fails to connect
    except Exception:  # noqa: BLE001 - AgentError: only the history's part matters here
        pass
    later.last_seen = {"later": time.time() - 2000}  # heard from before its first telemetry in this run
    later._check_silence()
    assert not later.alerts


def test_an_offline_device_shows_the_last_model_it_reported_marked_last_known_with_when(tmp_path, run_cli):
    """An offline device whose last word (a last will signed before its model was installed, or a short status) names
    no model showed '-' as its current model, though the history held the one it ran. It shows that one now, marked
    last known with when this host received it; an online device's model is shown as before."""
    from edge_kit.telemetry.report import local_time

    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: sim\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                          "devices:\n  - {name: gone, host: 127.0.0.1}\n  - {name: up, host: 127.0.0.1}\n"
                          "  - {name: never, host: 127.0.0.1}\n")
    now = time.time()
    int8 = {"variant": "int8", "sha256": "ab" * 32}
    store = Store(history_path(fleet_file))
    store.add_many([("status", messages.envelope("status", "sim", "gone", 1, {"state": "online", "current": int8})),
                    ("status", messages.envelope("status", "sim", "gone", 2, {"state": "offline", "current": None})),
                    ("status", messages.envelope("status", "sim", "up", 1, {"state": "online", "current": int8})),
                    ("status", messages.envelope("status", "sim", "never", 1, {"state": "offline", "current": None}))],
                   received=[now - 600, now - 60, now - 5, now - 5])
    store.close()
    code, out, err = run_cli("fleet", "status", "--fleet", fleet_file, "--history-only")
    assert code == 0, err
    rows = {line.split()[0]: " ".join(line.split()) for line in out.splitlines() if line.split()[:1] in
            (["gone"], ["up"], ["never"])}
    assert f"offline (history) int8 (last known: history, received {local_time(now - 600)})" in rows["gone"], rows["gone"]
    assert "online (history) int8 " in rows["up"] and "last known" not in rows["up"]
    assert "offline (history) - " in rows["never"]
    code, out, err = run_cli("fleet", "status", "--fleet", fleet_file, "--history-only", "--json")
    current = json.loads(out)["current"]
    assert current["gone"] == {**int8, "last_known": True, "at": now - 600, "source": "history"}
    assert current["up"] == {**int8, "last_known": False, "at": None, "source": "history"}
    assert "never" not in current
