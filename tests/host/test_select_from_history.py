"""`select` and the fleet model's inputs, from what the history holds.

Without a deploy in the same run, what a device can run is what its newest (signed) status reported
(``runtimes``); the fleet model must not infer an ONNX Runtime variant for a device that has none, and
says when it knows nothing. Its measurements are the records of the builds being tuned, not older ones.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from edge_kit.fleet.inventory import load_fleet
from edge_kit.manifest import Artifact, Manifest, read_manifest
from edge_kit.telemetry.store import Store
from edgekit_protocol import messages

FIGURES = {"fp32": (30.0, 12.0), "onnx-fp32": (10.0, 4.0)}  # p90 ms, mJ per inference: onnx-fp32 is better


def sha(vid: str) -> str:
    return hashlib.sha256(vid.encode()).hexdigest()


def bench_body(vid: str, p90: float, mj: float) -> dict:
    """The body of a bench record of ``vid`` (its p90 latency, its energy per inference estimated; top-1 0.98)."""
    return {"variant": vid, "sha256": sha(vid), "latency_ms": {"p90": p90}, "runs": 100, "simulated": False,
            "power": {"estimated": True, "avg_w": 3.0, "energy_per_inference_mj": mj}, "accuracy": {"value": 0.98}}


def write_fleet(tmp_path, eval_set=None):
    folder = tmp_path / "art"
    folder.mkdir()
    arts = [Artifact(id=v, status="built", profiles=["rpi4"], summary=v, precision="float32", file=f"{v}.x",
                     runtime="onnxruntime" if v.startswith("onnx") else "litert", sha256=sha(v), bytes=1000)
            for v in FIGURES]
    (folder / "manifest.json").write_text(Manifest(created="2026-11-29T00:00:00+00:00", model={"name": "m"},
                                                   versions={}, profiles={"rpi4": {}}, artifacts=arts,
                                                   eval=eval_set).to_json())
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("fleet: f\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                     "devices:\n" + "".join(f"  - {{name: {d}, host: 127.0.0.1, port: {i + 2}}}\n"  # each its own agent: nothing listens
                                             for i, d in enumerate(("a", "b", "c", "nojs", "quiet"))))
    store = Store(tmp_path / "edgekit-history.db")
    seq = 0
    # a and b measured both variants; nojs (no ONNX Runtime) and quiet (no status at all) only fp32
    for device, variants in (("a", FIGURES), ("b", FIGURES), ("c", FIGURES), ("nojs", ["fp32"]), ("quiet", ["fp32"])):
        for vid in variants:
            p90, mj = FIGURES[vid]
            seq += 1
            store.add("bench", messages.envelope("bench", "f", device, seq, bench_body(vid, p90, mj)))
    for device, ort in (("a", "available"), ("b", "available"), ("c", True), ("nojs", False)):
        seq += 1
        store.add("status", messages.envelope("status", "f", device, seq, {
            "state": "online", "current": {"variant": "fp32", "sha256": sha("fp32")},
            "runtimes": {"litert": "available", "onnxruntime": ort, "tensorrt": "no TensorRT provider"}}))
    store.close()
    return fleet, folder


def test_select_leaves_out_what_a_device_status_says_it_cannot_run(tmp_path, run_cli):
    fleet, folder = write_fleet(tmp_path)
    code, out, err = run_cli("select", "--fleet", fleet, "--artifacts", folder, "--json")
    assert code == 0, err
    whole = json.loads(out)
    got = whole["devices"]
    assert got["a"]["chosen"] == "onnx-fp32"  # measured, and better
    nojs = got["nojs"]
    assert nojs["chosen"] == "fp32", nojs  # not the onnx-fp32 its profile's figures would infer
    assert list(nojs["excluded"]) == ["onnx-fp32"] and "onnxruntime" in nojs["excluded"]["onnx-fp32"]
    assert "status" in nojs["excluded"]["onnx-fp32"]
    assert "onnx-fp32" not in {r["variant"] for r in nojs["table"]}
    assert got["a"]["excluded"] == {} and got["a"]["runtimes_unknown"] == []
    # nothing known about quiet's runtimes: said, not assumed either way
    quiet = got["quiet"]
    assert quiet["runtimes_unknown"] == ["onnx-fp32"] and quiet["excluded"] == {}
    assert quiet["chosen"] != "onnx-fp32" or "has not reported" in quiet["reason"], quiet

    code, out, err = run_cli("select", "--fleet", fleet, "--artifacts", folder, "--explain")
    assert code == 0, err
    left_out = [line for line in out.splitlines() if "left out" in line]
    assert len(left_out) == 1 and "onnx-fp32" in left_out[0] and "onnxruntime" in left_out[0], out
    assert "have not reported their runtimes" in out and "quiet" in out
    # --json has every note the person reads (it had none: only the decisions), and where the figures came from
    printed = [" ".join(line.split()) for line in out.split("note ")[1:]]
    assert whole["notes"] and len(printed) == len(whole["notes"])
    for note, text in zip(whole["notes"], printed):
        assert text.startswith(" ".join(note.split())[:60]), (note, text)
    assert any("have not reported their runtimes" in n and "quiet" in n for n in whole["notes"])
    assert whole["figures"].startswith("figures: p90 and accuracy measured by each device's own agent")
    assert "~ inferred by the fleet model" in whole["figures"]


@pytest.mark.parametrize("metric", ["map", "top1"])
def test_select_names_the_eval_sets_metric_where_it_says_where_the_accuracy_came_from(tmp_path, run_cli, metric):
    """A detector's accuracy column is its mAP: the line under select --explain (and --json's ``figures``) named it
    top-1 whatever the eval set scored."""
    fleet, folder = write_fleet(tmp_path, {"file": "eval.npz", "samples": 48, "metric": metric,
                                         "task": "detection" if metric == "map" else "classification"})
    code, out, err = run_cli("select", "--fleet", fleet, "--artifacts", folder, "--json")
    assert code == 0, err
    figures = json.loads(out)["figures"]
    assert figures.startswith(f"figures: p90 and accuracy ({metric}) measured by each device's own agent"), figures
    assert f"{metric} on the eval set shipped with the artifacts" in figures
    assert ("top-1" in figures) is False
    code, out, err = run_cli("select", "--fleet", fleet, "--artifacts", folder, "--explain")
    assert code == 0, err
    assert f"figures: p90 and accuracy ({metric}) measured" in " ".join(out.split()), out


def test_the_fleet_model_reads_only_the_bench_records_of_the_builds_being_tuned(tmp_path):
    """tune --budget plans from the history at every batch: the records of older builds of the model (other
    sha256) are not read, however many there are."""
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.loop.tune import fleet_inputs
    from edge_kit.manifest import read_manifest

    fleet_file, folder = write_fleet(tmp_path)
    store = Store(tmp_path / "edgekit-history.db")
    for seq in range(100, 130):  # an older build of fp32, measured often
        store.add("bench", messages.envelope("bench", "f", "a", seq, {
            "variant": "fp32", "sha256": sha("fp32 of last month"), "latency_ms": {"p90": 99.0}, "runs": 100,
            "simulated": False, "power": {}, "duration_s": 50.0}))
    _spec, m, _shas, records = fleet_inputs(read_manifest(folder), load_fleet(fleet_file).devices, store, {})
    assert {r["sha256"] for r in records} == {sha("fp32"), sha("onnx-fp32")}
    assert len(records) == 2 * 3 + 2  # a, b and c measured both; nojs and quiet fp32 only


def test_a_round_decides_on_the_devices_that_answered_and_whose_records_were_stored(tmp_path):
    """tune and tune --budget each wrote the filter of devices left out of a round (no answer in time, or a record
    the history refused); it is one function now, which all three decisions call."""
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.loop.tune import answered

    devices = load_fleet(write_fleet(tmp_path)[0]).devices
    names = [d.name for d in devices]
    assert [d.name for d in answered(devices, {}, {})] == names
    kept = answered(devices, {names[0]: ["fp32 (no answer)"]}, {names[2]: ["bench: refused"]})
    assert [d.name for d in kept] == [n for n in names if n not in (names[0], names[2])]


def test_artifacts_not_compiled_for_a_devices_profile_are_bad_input_exit_2(tmp_path, run_cli):
    fleet, folder = write_fleet(tmp_path)
    fleet.write_text(fleet.read_text().replace("profile: rpi4", "profile: rpi5"))
    code, out, err = run_cli("select", "--fleet", fleet, "--artifacts", folder, "--json")
    assert code == 2, err
    assert json.loads(out)["error"] == ("a: the artifacts were not compiled for profile rpi5 (compiled for: rpi4); "
                                        "recompile with -p rpi5, or leave its devices out with --devices")


@pytest.mark.parametrize("canary", [[], ["--canary", "40%"]])
def test_deploy_refuses_artifacts_not_compiled_for_a_devices_profile_before_touching_any(tmp_path, run_cli, canary):
    """deploy went on with the other devices and failed that one, exit 4 (the docs' exit table says 2, as select
    and tune exit); with --canary the canaries were deployed before the rest was refused."""
    fleet, folder = write_fleet(tmp_path)
    fleet.write_text(fleet.read_text().replace("  - {name: quiet, host: 127.0.0.1, port: 6}", "  - {name: quiet, host: 127.0.0.1, port: 6, profile: rpi5}"))
    # No device and no broker answers on these ports: any attempt to reach one would fail otherwise (exit 4 or 5).
    code, out, err = run_cli("deploy", "--fleet", fleet, "--artifacts", folder, *canary, "--json")
    assert code == 2, err
    assert json.loads(out) == {"error": "quiet: the artifacts were not compiled for profile rpi5 (compiled for: rpi4); "
                                        "recompile with -p rpi5, or leave its devices out with --devices",
                                        "exit_code": 2}


def test_deploy_refuses_a_variant_the_artifacts_do_not_hold_before_touching_any_device(tmp_path, run_cli):
    """deploy --variant with a typo failed every device one by one, exit 4; now it is bad input, exit 2,
    naming the closest variant built."""
    fleet, folder = write_fleet(tmp_path)
    # No device and no broker answers on these ports: any attempt to reach one would fail otherwise (exit 4 or 5).
    code, out, err = run_cli("deploy", "--fleet", fleet, "--artifacts", folder, "--variant", "fp23", "--json")
    assert code == 2, err
    error = json.loads(out)["error"]
    assert error.startswith(f"--variant fp23: {folder / 'manifest.json'} has no such variant; did you mean 'fp32'?"), error


def _fp32_int8_for_one_device(tmp_path, size: int):
    """Write a manifest of fp32 and int8 (``size`` bytes each, rpi4) and a fleet of one device, a; return both paths."""
    folder = tmp_path / "art"
    folder.mkdir()
    arts = [Artifact(id=v, status="built", profiles=["rpi4"], summary=v, precision="float32", file=f"{v}.x",
                     runtime="litert", sha256=sha(v), bytes=size) for v in ("fp32", "int8")]
    (folder / "manifest.json").write_text(Manifest(created="2026-11-29T00:00:00+00:00", model={"name": "m"},
                                                   versions={}, profiles={"rpi4": {}}, artifacts=arts).to_json())
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("fleet: f\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                     "devices:\n  - {name: a, host: 127.0.0.1, port: 2}\n")
    return folder, fleet


def test_select_explain_shows_no_figure_and_no_confidence_where_nothing_could_be_inferred(tmp_path, run_cli):
    """A device whose profile measured fp32 only: int8 cannot be inferred and nothing is chosen yet. --explain
    showed ``~-`` for each of int8's figures (an inferred figure that is none) and ``confidence 1.00`` over a device
    with no choice."""
    folder, fleet = _fp32_int8_for_one_device(tmp_path, size=1000)
    with Store(tmp_path / "edgekit-history.db") as store:
        store.add("bench", messages.envelope("bench", "f", "a", 1, bench_body("fp32", 30.0, 12.0)))
    code, out, err = run_cli("select", "--fleet", fleet, "--artifacts", folder, "--json")
    assert code == 0, err
    decision = json.loads(out)["devices"]["a"]
    assert decision["chosen"] is None and "nothing to infer" in decision["reason"], decision
    assert decision["confidence"] is None, decision  # was 1.0: certainty about a choice not made
    assert decision["reason"].endswith("`edgekit tune` measures it (or `edgekit bench --device DEVICE --variant "
                                       "VARIANT`, one at a time)"), decision  # what to do about it
    code, out, err = run_cli("select", "--fleet", fleet, "--artifacts", folder, "--explain")
    assert code == 0, err
    assert "~-" not in out, out
    assert "confidence" not in out.split("figures:")[0] and "a (no choice yet)" in out, out
    int8 = next(line for line in out.splitlines() if line.split()[:1] == ["int8"])
    # nothing measured or inferred int8's figures: its row says so, never "inferred" (it was, with "-" figures)
    assert int8.split()[1:4] == ["-", "-", "-"] and "inferred" not in int8 and "not measured" in int8, int8
    code, out, err = run_cli("select", "--fleet", fleet, "--artifacts", folder, "--json")
    row = next(r for r in json.loads(out)["devices"]["a"]["table"] if r["variant"] == "int8")
    assert (row["source"], row["power_source"], row["p90_ms"]) == ("not measured", "not measured", None), row
    assert json.loads(out)["devices"]["a"]["inferred"] == [], out
    with Store(tmp_path / "edgekit-history.db") as store:  # int8 measured too: a plain decision, with no confidence
        store.add("bench", messages.envelope("bench", "f", "a", 2, bench_body("int8", 10.0, 4.0)))
    code, out, err = run_cli("select", "--fleet", fleet, "--artifacts", folder, "--explain")
    assert code == 0, err
    assert "int8" in out.split("figures:")[0] and "confidence" not in out, out


def test_select_explain_gives_a_small_models_size_not_zero(tmp_path, run_cli):
    """A user's own 4 kB model: --explain's MB column read 0.00 for every variant, a size of nothing."""
    folder, fleet = _fp32_int8_for_one_device(tmp_path, size=3900)
    with Store(tmp_path / "edgekit-history.db") as store:
        store.add("bench", messages.envelope("bench", "f", "a", 1, bench_body("fp32", 30.0, 12.0)))
        store.add("bench", messages.envelope("bench", "f", "a", 2, bench_body("int8", 10.0, 4.0)))
    code, out, err = run_cli("select", "--fleet", fleet, "--artifacts", folder, "--explain")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["fp32"], ["int8"])]
    assert rows and all("0.004" in row and "0.00" not in row for row in rows), out


def test_select_never_speaks_of_a_budget_it_does_not_have(tmp_path, run_cli):
    """select over a fleet with a profile nothing measured yet said "the budget (0) is less than the 8 it takes ..."
    and "the budget leaves none to sample it": select has no --budget and measures nothing; what to run was unsaid."""
    folder = tmp_path / "art"
    folder.mkdir()
    arts = [Artifact(id=v, status="built", profiles=["rpi4", "rpi5"], summary=v, precision="float32", file=f"{v}.x",
                     runtime="litert", sha256=sha(v), bytes=1000) for v in ("fp32", "int8")]
    (folder / "manifest.json").write_text(Manifest(created="2026-11-29T00:00:00+00:00", model={"name": "m"},
                                                   versions={}, profiles={"rpi4": {}, "rpi5": {}},
                                                   artifacts=arts).to_json())
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("fleet: f\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                     "devices:\n  - {name: a, host: 127.0.0.1, port: 2}\n"
                     "  - {name: b, host: 127.0.0.1, port: 3, profile: rpi5}\n")
    with Store(tmp_path / "edgekit-history.db") as store:
        store.add("bench", messages.envelope("bench", "f", "a", 1, bench_body("fp32", 30.0, 12.0)))
        store.add("bench", messages.envelope("bench", "f", "a", 2, bench_body("int8", 10.0, 4.0)))
    code, out, err = run_cli("select", "--fleet", fleet, "--artifacts", folder, "--json")
    assert code == 0, err
    notes = json.loads(out)["notes"]
    assert not [n for n in notes if "budget" in n], notes
    assert ("profile rpi5: no measurements yet; its devices cannot be decided: `edgekit tune` measures it (or "
            "`edgekit bench --device DEVICE --variant VARIANT`, one at a time)") in notes, notes


def test_the_reports_fleet_selection_table_shows_no_confidence_for_an_undecided_device():
    """An undecided device's stored fleet decision has no confidence (None): the report's table read 1.00 for it,
    and a None must not stop the report."""
    from edge_kit.telemetry.report import _fleet_selection_rows

    rows = _fleet_selection_rows({"a": {"chosen": None, "confidence": None, "table": []},
                                  "b": {"chosen": "int8", "confidence": 0.97, "table": []},
                                  "c": {"chosen": None, "confidence": 1.0, "table": []}})  # stored by an older edge-kit
    assert [r[2] for r in rows] == ["-", "0.97", "-"]


def test_select_never_picks_the_edgetpu_variant_for_a_device_whose_status_says_it_has_no_edge_tpu(tmp_path, run_cli):
    """An ``edgetpu`` variant runs on LiteRT, so nothing in the host's runtime checks looked at it: a Coral whose
    agent has no Edge TPU delegate (its libedgetpu missing, or a simulated one running xnnpack) stayed a candidate
    for it, measured or inferred from the profile's other devices, and was chosen again after each refused
    activation. Its status now reports ``runtimes.edgetpu`` (``available`` or why not); select leaves the variant out
    there, with why (unavailable, not a failure of the model), and still chooses it where the TPU is."""
    folder = tmp_path / "art"
    folder.mkdir()
    figures = {"int8": (30.0, 12.0), "edgetpu": (3.0, 1.0)}
    arts = [Artifact(id=v, status="built", profiles=["coral-usb"], summary=v, precision="int8", file=f"{v}.tflite",
                     runtime="litert", sha256=sha(v), bytes=1000) for v in figures]
    (folder / "manifest.json").write_text(Manifest(created="2026-11-29T00:00:00+00:00", model={"name": "m"},
                                                   versions={}, profiles={"coral-usb": {}}, artifacts=arts).to_json())
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("fleet: f\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: coral-usb}\n"
                     "devices:\n  - {name: tpu, host: 127.0.0.1, port: 2}\n  - {name: notpu, host: 127.0.0.1, port: 3}\n")
    store = Store(tmp_path / "edgekit-history.db")
    seq = 0
    for device in ("tpu", "notpu"):
        for vid in figures if device == "tpu" else ["int8"]:
            seq += 1
            store.add("bench", messages.envelope("bench", "f", device, seq, bench_body(vid, *figures[vid])))
    no_tpu = ("variant edgetpu runs only on the Coral Edge TPU (USB, M.2, Dev Board) through the 'edgetpu' delegate, "
              "and this agent runs the 'xnnpack' delegate")
    for device, edgetpu in (("tpu", "available"), ("notpu", no_tpu)):
        seq += 1
        store.add("status", messages.envelope("status", "f", device, seq, {
            "state": "online", "current": {"variant": "int8", "sha256": sha("int8")},
            "runtimes": {"litert": "available", "edgetpu": edgetpu}}))
    store.close()
    code, out, err = run_cli("select", "--fleet", fleet, "--artifacts", folder, "--json")
    # notpu's int8 (30 ms) breaks coral-usb's p90 <= 15 ms: it gets the least-violating variant, and select says so
    assert code == 7 and json.loads(out)["infeasible"] == {"notpu": ["p90 <= 15 ms"]}, err
    got = json.loads(out)["devices"]
    assert got["tpu"]["chosen"] == "edgetpu" and got["tpu"]["excluded"] == {}, got["tpu"]
    notpu = got["notpu"]
    assert notpu["chosen"] == "int8" and list(notpu["excluded"]) == ["edgetpu"], notpu
    why = notpu["excluded"]["edgetpu"]
    assert why.startswith("notpu: edgetpu needs the Edge TPU's delegate, the shared library libedgetpu.so.1 (Debian "
                          "package libedgetpu1-std), on the device, which its newest status in the history says it "
                          "lacks; install Coral's libedgetpu1-std package"), why
    assert "edgetpu" not in {r["variant"] for r in notpu["table"]}


def test_select_and_tune_name_the_infeasible_devices_and_exit_7(tmp_path, run_cli, monkeypatch):
    """A device no variant can satisfy (a: p90 <= 1 ms, every variant measured 10 ms or more) was given the
    least-violating variant with exit 0 and nothing beyond the table's "NO": a script or CI job running `edgekit tune`
    saw success. Now a line names each such device, its variant and what it breaks, `--json` has ``infeasible``
    (device -> bounds), and both commands exit 7 (INFEASIBLE_EXIT); a fleet that meets its constraints exits 0."""
    from types import SimpleNamespace

    from edge_kit.errors import INFEASIBLE_EXIT
    from edge_kit.fleet.deploy import GroupResult
    from edge_kit.loop import tune as tn

    fleet, folder = write_fleet(tmp_path)
    code, out, err = run_cli("select", "--fleet", fleet, "--artifacts", folder, "--devices", "a", "--devices", "b", "--json")
    assert code == 0 and json.loads(out)["infeasible"] == {}, err
    fleet.write_text(fleet.read_text().replace("{name: a, host: 127.0.0.1,",
                                               "{name: a, host: 127.0.0.1, constraints: {max_latency_p90_ms: 1},"))
    code, out, err = run_cli("select", "--fleet", fleet, "--artifacts", folder, "--devices", "a", "--devices", "b", "--json")
    assert code == INFEASIBLE_EXIT == 7, err
    assert json.loads(out)["infeasible"] == {"a": ["p90 <= 1 ms"]}
    code, out, err = run_cli("select", "--fleet", fleet, "--artifacts", folder, "--devices", "a", "--devices", "b")
    text = " ".join(out.split())
    assert code == 7 and ("infeasible 1 device(s) meet no variant's constraints (the least-violating one is chosen): a "
                          "gets onnx-fp32, breaking p90 <= 1 ms") in text, (out, err)

    # tune: the same line and code after what it did, the same field in --json
    decisions = tn.decide(read_manifest(folder), load_fleet(fleet).select(["a", "b"]), Store(tmp_path / "edgekit-history.db"),
                          {}, 0.1)
    report = tn.TuneReport(deploy=GroupResult([]), final=decisions)
    monkeypatch.setattr(tn, "tune", lambda *_a, **_k: report)
    monkeypatch.setattr(tn, "TuneOptions", lambda *_a, **_k: SimpleNamespace())
    code, out, err = run_cli("tune", "--fleet", fleet, "--artifacts", folder, "--devices", "a", "--devices", "b", "--json")
    assert code == 7 and json.loads(out)["infeasible"] == {"a": ["p90 <= 1 ms"]}, err
    code, out, err = run_cli("tune", "--fleet", fleet, "--artifacts", folder, "--devices", "a", "--devices", "b")
    assert code == 7 and "a runs onnx-fp32, breaking p90 <= 1 ms" in " ".join(out.split()), (out, err)


def test_tune_exits_4_when_a_rounds_switch_failed_even_with_an_infeasible_device(tmp_path, run_cli, monkeypatch):
    """A round's activation (the switch, with its health benchmark) that failed on a device was neither said nor
    counted: tune printed "switched: b (...)" and exited 0, or 7 with an infeasible device, so a script saw success
    (or "outside its constraints") where a device had not been switched at all. Now the line says the device was not
    switched and why, the switches mark it FAILED, --json has ``activation_failed``, and tune exits 4 before 7."""
    from types import SimpleNamespace

    from edge_kit.fleet.deploy import DeviceResult, GroupResult
    from edge_kit.loop import tune as tn

    fleet, folder = write_fleet(tmp_path)
    decisions = tn.decide(read_manifest(folder), load_fleet(fleet).select(["a", "b"]), Store(tmp_path / "edgekit-history.db"), {}, 0.1)
    failed = GroupResult([DeviceResult("b", "failed", reason="model 1234 failed its smoke inference")])
    rounds = [{"round": 1, "switched": ["b"], "decisions": {k: v.as_dict() for k, v in decisions.items()},
               "activation": failed.as_dict()}]
    report = tn.TuneReport(deploy=GroupResult([]), final=decisions, rounds=rounds)
    monkeypatch.setattr(tn, "tune", lambda *_a, **_k: report)
    monkeypatch.setattr(tn, "TuneOptions", lambda *_a, **_k: SimpleNamespace())
    code, out, err = run_cli("tune", "--fleet", fleet, "--artifacts", folder, "--devices", "a", "--devices", "b")
    text = " ".join(out.split())
    assert code == 4 and "b was not switched: model 1234 failed its smoke inference" in text, (out, err)
    assert "FAILED" in text
    code, out, err = run_cli("tune", "--fleet", fleet, "--artifacts", folder, "--devices", "a", "--devices", "b", "--json")
    assert code == 4 and json.loads(out)["activation_failed"] == {"b": "model 1234 failed its smoke inference"}, err
    fleet.write_text(fleet.read_text().replace("{name: a, host: 127.0.0.1,",
                                               "{name: a, host: 127.0.0.1, constraints: {max_latency_p90_ms: 1},"))
    report.final = tn.decide(read_manifest(folder), load_fleet(fleet).select(["a", "b"]), Store(tmp_path / "edgekit-history.db"), {}, 0.1)
    code, out, err = run_cli("tune", "--fleet", fleet, "--artifacts", folder, "--devices", "a", "--devices", "b")
    assert code == 4 and "infeasible" in out, (out, err)  # said, but the failure's code comes first


def test_a_real_devices_figures_are_never_inferred_from_a_simulated_devices(tmp_path, run_cli):
    """A simulated device of the profile (``edgekit sim``: its figures are this machine's) measured both variants, the
    real device nothing: the real one's figures were inferred from the simulating host's, ``~10 ms``, as its Pi's.
    A simulated device is its profile's hardware in name only: it is pooled with simulated devices alone."""
    folder, _fleet = _fp32_int8_for_one_device(tmp_path, size=1000)
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("fleet: f\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                     "devices:\n  - {name: pi, host: 127.0.0.1, port: 2}\n"
                     "  - {name: sim, host: 127.0.0.1, port: 3, simulated: true}\n"
                     "  - {name: sim2, host: 127.0.0.1, port: 4}\n")  # the fleet file does not say; its records do
    with Store(tmp_path / "edgekit-history.db") as store:
        for seq, (vid, p90) in enumerate((("fp32", 30.0), ("int8", 10.0)), 1):
            store.add("bench", messages.envelope("bench", "f", "sim", seq, {**bench_body(vid, p90, 4.0), "simulated": True}))
        store.add("bench", messages.envelope("bench", "f", "sim2", 1, {**bench_body("fp32", 31.0, 4.0), "simulated": True}))
    code, out, err = run_cli("select", "--fleet", fleet, "--artifacts", folder, "--json")
    assert code == 0, err
    got = json.loads(out)["devices"]
    assert got["pi"]["chosen"] is None and got["pi"]["inferred"] == [], got["pi"]
    assert all(r["source"] == "not measured" and r["p90_ms"] is None for r in got["pi"]["table"]), got["pi"]
    assert "rpi4 has no measurements yet" in got["pi"]["reason"], got["pi"]
    # the simulated devices are pooled together: sim2's int8 is inferred from sim's, and says it is simulated
    assert got["sim2"]["chosen"] == "int8" and got["sim2"]["inferred"] == ["int8"], got["sim2"]
    assert "rpi4 (simulated)" in got["sim2"]["reason"], got["sim2"]


def test_a_bound_broken_on_inferred_figures_says_they_were_inferred(tmp_path, run_cli):
    """b measured nothing; its profile's a measured int8 at 10 ms, and b's bound is p90 <= 8 ms. The infeasible line
    read 'b gets int8, breaking p90 <= 8 ms', as if b had been measured: its int8 is inferred, ~10 ms with an
    interval that holds 8. It says the figure that breaks it was inferred."""
    folder, fleet = _fp32_int8_for_one_device(tmp_path, size=1000)
    fleet.write_text(fleet.read_text() + "  - {name: b, host: 127.0.0.1, port: 3, constraints: {max_latency_p90_ms: 8}}\n")
    with Store(tmp_path / "edgekit-history.db") as store:
        store.add("bench", messages.envelope("bench", "f", "a", 1, bench_body("fp32", 30.0, 12.0)))
        store.add("bench", messages.envelope("bench", "f", "a", 2, bench_body("int8", 10.0, 4.0)))
    code, out, err = run_cli("select", "--fleet", fleet, "--artifacts", folder)
    assert code == 7, (out, err)
    assert "b gets int8, breaking p90 <= 8 ms (inferred)" in " ".join(out.split()), out
    code, out, err = run_cli("select", "--fleet", fleet, "--artifacts", folder, "--json")
    b = json.loads(out)["devices"]["b"]
    assert b["inferred"] == ["fp32", "int8"] and json.loads(out)["infeasible"] == {"b": ["p90 <= 8 ms"]}, b
