"""Every figure a command prints says where it came from (measured by which clock, counted from what), in the
table and in --json: the audit's fixes for deploy/tune's and rollouts' seconds, select's MB and fleet status's
last heard."""

from __future__ import annotations

import json

from edge_kit.fleet.deploy import DeviceResult, GroupResult
from edge_kit.loop.waves import Rollout
from edge_kit.telemetry.store import Store, history_path


def flat(text: str) -> str:
    """Return ``text`` with rich's line wrapping undone (every run of whitespace one space)."""
    return " ".join(text.split())


def test_deploy_says_which_clock_timed_each_device(tmp_path, run_cli, monkeypatch):
    """The deploy table's `seconds` column (also tune's and a canary rollout's) named no clock, nor did --json."""
    from test_model_name import compiled, fleet_file

    import edge_kit.fleet.deploy as deploy_module

    folder, fleet = compiled(tmp_path, "m"), fleet_file(tmp_path)
    done = GroupResult([DeviceResult("a", "succeeded", actions=["activated int8"], variant="int8", seconds=1.25)])
    monkeypatch.setattr(deploy_module, "deploy", lambda *_a, **_k: done)  # no device here: the table is what is tested
    code, out, err = run_cli("deploy", "--fleet", fleet, "--artifacts", folder)
    assert code == 0, err
    assert "1.2" in out and ("seconds: measured: this host's wall clock (time.perf_counter) per device, from the start "
                             "of its deploy") in flat(out)
    code, out, err = run_cli("deploy", "--fleet", fleet, "--artifacts", folder, "--json")
    data = json.loads(out)
    assert code == 0 and data["devices"][0]["seconds"] == 1.25
    assert data["methods"]["seconds"].startswith("measured: this host's wall clock (time.perf_counter) per device")


def test_a_rollouts_seconds_say_which_clock_and_between_what(tmp_path, run_cli):
    """`rollout start/status` printed each device's seconds with no word of what they measured."""
    from test_waves import FakeBroker, planned

    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("fleet: f\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: u, profile: rpi4}\n"
                     "devices:\n  - {name: d00, host: 127.0.0.1}\n")
    history = Store(history_path(fleet))
    planned(history, n=2)
    assert Rollout(history, "r", FakeBroker()).run()["state"] == "done"
    history.close()
    code, out, err = run_cli("rollout", "status", "--fleet", fleet, "r")
    assert code == 0, err
    assert ("seconds: measured: this host's wall clock (time.time) from sending the device its desired state to "
            "receiving its final report") in flat(out)
    code, out, err = run_cli("rollout", "status", "--fleet", fleet, "r", "--json")
    data = json.loads(out)
    assert all(r["seconds"] is not None for r in data["devices"] if r["state"] == "converged")
    assert data["methods"]["seconds"].startswith("measured: this host's wall clock (time.time)")


def test_select_says_where_model_sizes_and_fleet_status_where_last_heard_come_from(tmp_path, run_cli):
    """select --explain's MB column and fleet status's 'last heard' were the only columns the note under the
    table did not account for."""
    from test_select_from_history import write_fleet

    fleet, folder = write_fleet(tmp_path)
    sizes = "MB: the artifact's size, counted from its file by `edgekit compile` (the manifest's bytes)"
    # it said "the device's last message", but live, shadow and bench messages do not count (HistoryStore.last_received)
    heard = "last heard: by this host's clock, when it stored the device's last status or telemetry message"
    code, out, err = run_cli("select", "--fleet", fleet, "--artifacts", folder, "--explain")
    assert code == 0 and sizes in flat(out) and heard not in flat(out), err
    code, out, err = run_cli("select", "--fleet", fleet, "--artifacts", folder, "--json")
    figures = json.loads(out)["figures"]
    assert sizes in figures and "confidence: the share of the fleet model's posterior draws" in figures
    code, out, err = run_cli("fleet", "status", "--fleet", fleet)
    assert code == 0 and "last heard" in out and heard in flat(out) and sizes not in flat(out), err
    code, out, err = run_cli("fleet", "status", "--fleet", fleet, "--json")
    assert heard in json.loads(out)["figures"]


def test_the_reports_live_figures_name_the_serving_apis_clock(tmp_path, run_cli):
    """The report's note named the clock of every benchmark figure, but not of the fleet table's live p50/p99."""
    from edgekit_protocol import messages

    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("fleet: sim\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                     "devices:\n  - {name: d1, host: 127.0.0.1}\n")
    store = Store(history_path(fleet))
    store.add_many([
        ("bench", messages.envelope("bench", "sim", "d1", 1, {
            "profile": "rpi4", "variant": "int8", "sha256": "a" * 64, "runs": 100, "simulated": False,
            "latency_ms": {"p90": 0.2}, "latency_method": "time.perf_counter_ns around interpreter.invoke()",
            "runtime": "litert", "power": {}, "accuracy": {"value": 0.99}})),
        ("live", messages.envelope("live", "sim", "d1", 2, {
            "model": {"variant": "int8", "sha256": "a" * 64}, "requests": 40, "errors": 0, "window": 40,
            "latency_ms": {"p50": 0.5, "p90": 0.8, "p99": 1.5},
            "clock": "perf_counter_ns from a request read to its answer ready (queueing included)"}))])
    store.close()
    code, out, err = run_cli("report", "--fleet", fleet, "--out", tmp_path / "r.html")
    assert code == 0, err
    page = (tmp_path / "r.html").read_text()
    assert ("Live p50/p99 are each device's serving API's service times over its last requests, measured there with "
            "perf_counter_ns from a request read to its answer ready (queueing included).") in page
    assert "0.5/1.5 (40" in page


def test_tunes_json_says_where_its_decisions_figures_come_from_and_which_devices_are_simulated(tmp_path, run_cli,
                                                                                               monkeypatch):
    """`tune --json` gave every candidate's p90, accuracy, W and mJ (its decisions' tables) with no word of the clock,
    the eval set or the simulated devices whose figures are this machine's, which `select --json` says in `figures`."""
    from types import SimpleNamespace

    from test_select_from_history import write_fleet

    from edge_kit.fleet.deploy import GroupResult
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.loop import tune as tn
    from edge_kit.manifest import read_manifest

    fleet, folder = write_fleet(tmp_path)
    fleet.write_text(fleet.read_text().replace("{name: a, host: 127.0.0.1,", "{name: a, host: 127.0.0.1, simulated: true,"))
    devices = load_fleet(fleet).select(["a", "b"])
    decisions = tn.decide(read_manifest(folder), devices, Store(tmp_path / "edgekit-history.db"), {}, 0.1)
    monkeypatch.setattr(tn, "tune", lambda *_a, **_k: tn.TuneReport(deploy=GroupResult([]), final=decisions))
    monkeypatch.setattr(tn, "TuneOptions", lambda *_a, **_k: SimpleNamespace())
    code, out, err = run_cli("tune", "--fleet", fleet, "--artifacts", folder, "--devices", "a", "--devices", "b", "--json")
    data = json.loads(out)
    assert code == 0 and data["final"]["a"]["table"][0]["p90_ms"] is not None, err
    code, select_out, err = run_cli("select", "--fleet", fleet, "--artifacts", folder, "--devices", "a", "--devices", "b",
                                    "--json")
    assert code == 0 and data["figures"] == json.loads(select_out)["figures"], err
    assert "simulated devices (a): measured on this machine, not their profile's hardware" in data["figures"]
    assert "p90 and accuracy measured by each device's own agent (`edgekit bench` names the clock)" in data["figures"]
