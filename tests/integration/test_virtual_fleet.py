"""Virtual devices against a real Mosquitto and nginx: a rollout to 200 of them, with failures,
cut downloads and offline devices, converges exactly where it should."""

from __future__ import annotations

import json
import time

import pytest

from edge_kit.fleet.artifact_store import object_path, publish
from edge_kit.fleet.commands import FleetClient
from edge_kit.fleet.inventory import load_fleet
from edge_kit.loop.waves import Rollout, RolloutSettings, plan_rollout
from edge_kit.sim.store_server import start_store_server
from edge_kit.sim.virtual import Behaviour, VirtualFleet, _share, write_virtual_fleet
from edge_kit.telemetry.store import Store
from edgekit_protocol.config import BrokerConfig

pytestmark = pytest.mark.integration
N = 200


def test_a_rollout_to_virtual_devices_with_failures_cuts_and_offline_devices(tmp_path, mosquitto, digits_artifacts_v2,
                                                                           capsys):
    store = tmp_path / "store"
    publish(digits_artifacts_v2, store)
    fleet_file = write_virtual_fleet(tmp_path / "fleet", N, ["rpi4"], BrokerConfig(host=mosquitto.host, port=mosquitto.port))
    fleet = load_fleet(fleet_file)
    behaviour = Behaviour(fail_fetch=0.04, fail_activate=0.02, offline=0.05, cut=0.1, seed=3)
    share = {what: {d.name for d in fleet.devices if _share(3, d.name, what) < getattr(behaviour, what)}
             for what in ("fail_fetch", "fail_activate", "offline", "cut")}
    offline = share["offline"]
    failing = (share["fail_fetch"] | share["fail_activate"]) - offline
    history = Store(tmp_path / "h.db")
    with start_store_server(store, workdir=tmp_path / "nginx") as server, VirtualFleet(fleet_file, behaviour) as vf:
        plan = plan_rollout("v1", digits_artifacts_v2, fleet, fleet.devices, server.url, "int8",
                            RolloutSettings(waves=(0.1, 1.0), max_failed=0.2, wave_timeout_s=6))
        history.save_rollout("v1", "running", plan)
        clients = []

        def connect(cb):
            clients.append(FleetClient.of(fleet, kinds=("reported",), on_reported=cb))
            return clients[-1]

        summary = Rollout(history, "v1", connect).run()
        assert summary["state"] == "done", (vf.stats, clients[0].rejected[:3])
        assert summary["counts"] == {"converged": N - len(offline) - len(failing), "failed": len(failing),
                                     "sent": len(offline)}, (vf.stats, clients[0].rejected[:3])
        assert {r["device"] for r in summary["devices"] if r["state"] == "failed"} == failing
        # every device that reported said it is simulated, and the table says so (offline ones said nothing yet)
        assert {r["device"] for r in summary["devices"] if r["simulated"]} == {d.name for d in fleet.devices} - offline
        from edge_kit.cli.rollout import _print

        _print(summary)
        assert f"simulated: {N - len(offline)} of {N} devices said so in their reports" in capsys.readouterr().out
        # Each device that downloaded fetched the model and its eval set once; the cut ones resumed.
        downloads = N - len(offline) - len(share["fail_fetch"] - offline)
        size = object_path(store, plan["targets"]["v00000"]["sha256"]).stat().st_size + plan["targets"]["v00000"]["eval_bytes"]
        assert vf.stats.bytes_downloaded == downloads * size
        assert vf.stats.resumed == len(share["cut"] - offline - share["fail_fetch"])
        assert vf.stats.refused == 0 and not vf.stats.errors
        assert vf.come_back() == len(offline)  # back online: they take the desired state they missed
        deadline = time.monotonic() + 30
        view = Rollout(history, "v1", connect)
        while time.monotonic() < deadline:
            status = view.status(history.rollout("v1"), refresh=True)
            if "sent" not in status["counts"]:
                break
            time.sleep(0.5)
        late_failing = offline & (share["fail_fetch"] | share["fail_activate"])
        assert status["counts"] == {"converged": N - len(failing) - len(late_failing),
                                    "failed": len(failing) + len(late_failing)}
    assert json.loads(json.dumps(summary))  # the summary is plain data (--json)
