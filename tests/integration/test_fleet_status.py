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
