"""`edgekit fleet status` with real agents and a real Mosquitto: the state it shows is the status each agent
left retained on the broker (verified as the device's), not the history's last word."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def wait_gone(path: Path, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not path.exists()


def test_an_agent_stopped_while_no_monitor_ran_is_offline_and_a_forged_retained_status_is_refused(sim, run_cli):
    """The history said online (the monitor's last sight of it) for an agent stopped since: `fleet status`
    showed it online. Now the broker's retained status, which the agent replaced with `offline` on its way
    out (or its last will does, after a crash), is what it shows; one nobody but the device could sign."""
    from device_agents.identity import Signer
    from edge_kit.fleet.commands import FleetClient
    from edgekit_protocol import messages

    simfleet, fleet = sim(2)
    code, out, err = run_cli("monitor", "--fleet", simfleet.fleet_file, "--duration", "3", "--json")
    assert code == 0, err
    code, out, err = run_cli("fleet", "status", "--fleet", simfleet.fleet_file, "--json")
    assert code == 0, err
    before = json.loads(out)
    assert {d: before["status"][d]["state"] for d in ("rpi4-1", "rpi4-2")} == {"rpi4-1": "online", "rpi4-2": "online"}
    stopped = fleet.devices[0]
    pidfile = Path(stopped.root) / "agent.pid"
    os.kill(int(pidfile.read_text()), signal.SIGTERM)  # the supervisor stops its agent, which says offline
    assert wait_gone(pidfile)

    code, out, err = run_cli("fleet", "status", "--fleet", simfleet.fleet_file, "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["status"]["rpi4-1"]["state"] == "online"  # the history still says so: no monitor ran since
    assert status["state"]["rpi4-1"]["state"] == "offline" and status["state"]["rpi4-1"]["source"] == "broker"
    assert status["state"]["rpi4-2"]["state"] == "online" and status["state"]["rpi4-2"]["source"] == "broker"
    code, out, err = run_cli("fleet", "status", "--fleet", simfleet.fleet_file)
    row = next(line for line in out.splitlines() if line.split()[:1] == ["rpi4-1"])
    assert "offline (broker)" in row and "online" not in row, row

    # someone with write access to the topic leaves a retained "online" for the stopped device: refused
    forged = Signer.generate().sign(messages.envelope("status", fleet.fleet, stopped.name, 10**6, {"state": "online"}))
    with FleetClient.of(fleet) as client:
        client.client.publish(messages.topic(fleet.fleet, stopped.name, "status"), messages.encode(forged),
                              qos=1, retain=True).wait_for_publish(10)
    code, out, err = run_cli("fleet", "status", "--fleet", simfleet.fleet_file, "--json")
    status = json.loads(out)
    assert "rpi4-1" not in status["retained"] and "1 refused" in status["state_source"]
    assert status["state"]["rpi4-1"]["source"] == "history"  # from the history, stale once it has been silent long enough


def test_an_offline_devices_last_known_model_comes_from_its_retained_reported_state_when_newer(tmp_path, mosquitto,
                                                                                                 run_cli):
    """`fleet status` never read the `reported` state a pull rollout's agent leaves retained on the broker: a device
    that converged on a new model by a rollout and went offline before any monitor stored a status of it showed the
    model the history last held. Now its signed reported state is read (verified as the device's) and used when it
    is newer than the history's word (by the device's own clock); a forged one is ignored and counted; the table
    and --json say where each last known model came from."""
    from device_agents.identity import Signer
    from edge_kit.fleet.commands import FleetClient
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.telemetry.report import local_time
    from edge_kit.telemetry.store import Store, history_path
    from edgekit_protocol import messages
    from edgekit_protocol.desired import reported_body

    fleet_file = tmp_path / "fleet.yaml"
    names = ("moved", "older", "spoofed", "quiet")
    fleet_file.write_text(f"fleet: f\nbroker: {{host: 127.0.0.1, port: {mosquitto.port}}}\n"
                          "defaults: {user: edgekit, profile: rpi4}\n"
                          "devices:\n" + "".join(f"  - {{name: {d}, host: 127.0.0.1}}\n" for d in names))
    fleet = load_fleet(fleet_file)
    signers = {d: Signer.generate() for d in names}
    for d, signer in signers.items():
        fleet.key_store().register(d, signer.public)
    now = time.time()
    int8, fp16, fp32 = ({"variant": v, "sha256": c * 64} for v, c in (("int8", "a"), ("fp16", "b"), ("fp32", "c")))

    def said(kind, device, seq, body, ts, signer=None):
        msg = messages.envelope(kind, "f", device, seq, body)
        msg["ts"] = ts
        return (signer or signers[device]).sign(msg)

    store = Store(history_path(fleet_file))
    store.add_many([("status", said("status", d, 1, {"state": "online", "current": int8}, now - 600))
                    for d in ("moved", "older", "spoofed")]
                   + [("status", said("status", d, 2, {"state": "offline", "current": None}, now - 300))
                      for d in ("moved", "older", "spoofed")],
                   received=[now - 600] * 3 + [now - 300] * 3)
    store.close()
    reports = {"moved": said("reported", "moved", 7, reported_body(None, "converged", fp16), now - 100),
               "older": said("reported", "older", 7, reported_body(None, "converged", fp16), now - 3600),
               "spoofed": said("reported", "spoofed", 7, reported_body(None, "converged", fp32), now - 10,
                              Signer.generate()),  # not the device's key
               "quiet": said("reported", "quiet", 3, reported_body(None, "converged", fp32), now - 50)}
    with FleetClient.of(fleet) as client:
        for d, msg in reports.items():
            client.client.publish(messages.topic("f", d, "reported"), messages.encode(msg), qos=1,
                                  retain=True).wait_for_publish(10)

    code, out, err = run_cli("fleet", "status", "--fleet", fleet_file, "--json")
    assert code == 0, err
    doc = json.loads(out)
    last = {"last_known": True, "at": None, "source": "reported"}
    assert doc["current"] == {"moved": {**fp16, **last}, "quiet": {**fp32, **last},
                              "older": {**int8, "last_known": True, "at": now - 600, "source": "history"},
                              "spoofed": {**int8, "last_known": True, "at": now - 600, "source": "history"}}
    assert sorted(doc["reported"]) == ["moved", "older", "quiet"]  # the forged one is not taken ...
    assert "3 retained reported state(s), verified; 1 refused" in doc["state_source"]  # ... but counted
    assert "reported state its agent left retained" in doc["current_source"]
    code, out, err = run_cli("fleet", "status", "--fleet", fleet_file)
    assert code == 0, err
    rows = {line.split()[0]: " ".join(line.split()) for line in out.splitlines() if line.split()[:1] in
            [[d] for d in names]}
    assert "fp16 (last known: retained reported)" in rows["moved"], rows["moved"]
    assert "fp32 (last known: retained reported)" in rows["quiet"], rows["quiet"]
    assert f"int8 (last known: history, received {local_time(now - 600)})" in rows["older"], rows["older"]
    assert "fp32" not in rows["spoofed"] and "int8 (last known: history" in rows["spoofed"], rows["spoofed"]
    assert "1 refused" in " ".join(out.split())
