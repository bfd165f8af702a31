"""`edgekit-agent bench` on real compiled artifacts with the real LiteRT interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from device_agents.bench import BenchSettings, run_bench
from edge_kit.compiler.pipeline import CompileRequest, compile_model
from edge_kit.profiles import load_profile

pytestmark = pytest.mark.integration

FAST = BenchSettings(warmup=2, min_runs=50, min_seconds=0.0)


@pytest.fixture(scope="module")
def artifacts(digits_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    compile_model(CompileRequest(digits_files.model, [load_profile("coral-devboard")], out, calib=digits_files.calib))
    return out / "digits"


def test_bench_record_has_the_latency_distribution_and_accuracy(artifacts, digits_files):
    r = run_bench(artifacts / "int8.tflite", FAST, eval_file=digits_files.eval)
    lat = r["latency_ms"]
    assert r["runs"] >= 50 and r["inputs"] == "eval set"
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert r["init_ms"] > 0 and r["first_inference_ms"] > 0 and r["peak_rss_mb"] > 0
    assert r["accuracy"]["samples"] == 360 and r["accuracy"]["value"] > 0.9
    assert r["power"]["measured"] is False
    assert set(r["conditions"]["start"]) == {"cpu_governor", "cpu_freq_mhz", "temperature_c", "throttling", "load_1m",
                                             "power_mode", "jetson_clocks"}
    assert r["conditions"]["start"]["power_mode"] is None  # off a Jetson


def test_bench_runs_at_least_min_seconds(artifacts):
    r = run_bench(artifacts / "fp32.tflite", BenchSettings(warmup=0, min_runs=1, min_seconds=0.3))
    assert r["duration_s"] >= 0.3 and r["inputs"] == "random"


def test_bench_fidelity_against_reference(artifacts, digits_files, tmp_path):
    with np.load(digits_files.eval) as npz:
        x, y = npz["x"][:50], npz["y"][:50]
    np.savez(tmp_path / "e50.npz", x=x, y=y)
    ref = run_bench(artifacts / "fp32.tflite", FAST, eval_file=tmp_path / "e50.npz")
    from device_agents.inference import ModelRunner
    from device_agents.runtimes import get_runtime

    reference = ModelRunner(get_runtime().interpreter(artifacts / "fp32.tflite")).predict(x)
    r = run_bench(artifacts / "int8.tflite", FAST, eval_file=tmp_path / "e50.npz", reference=reference)
    assert r["fidelity"]["samples"] == 50 and r["fidelity"]["top1_agreement"] > 0.9
    assert ref["fidelity"] is None


def test_an_eval_file_without_labels_gives_real_inputs_but_no_accuracy(artifacts, digits_files, tmp_path):
    with np.load(digits_files.eval) as npz:
        np.savez(tmp_path / "x_only.npz", x=npz["x"])
    r = run_bench(artifacts / "int8.tflite", FAST, eval_file=tmp_path / "x_only.npz")
    assert r["inputs"] == "eval set" and r["accuracy"] is None


def agent(*args):
    return subprocess.run([sys.executable, "-m", "device_agents", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_cli_json_and_errors(artifacts, tmp_path):
    p = agent("bench", artifacts / "int8.tflite", "--min-runs", "20", "--min-seconds", "0", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["runs"] >= 20
    p = agent("bench", tmp_path / "missing.tflite")
    assert p.returncode == 2 and p.stderr.strip() == f"edgekit-agent: error: {tmp_path / 'missing.tflite'}: model not found"
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a flatbuffer")
    p = agent("bench", bad)
    assert p.returncode == 2 and "cannot load or run the model" in p.stderr
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((5, 28, 28, 1), np.float32))
    p = agent("bench", artifacts / "int8.tflite", "--eval", wrong)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == (f"edgekit-agent: error: {wrong}: --eval key 'x' samples have shape "
                                                 "(28, 28, 1) but input 'image' takes (8, 8, 1) (the first axis is the sample axis)")
    p = agent("bench", artifacts / "int8.tflite", "--delegate", "edgetpu")
    assert p.returncode == 2 and "libedgetpu.so.1" in p.stderr and "Traceback" not in p.stderr


def test_agent_never_imports_tensorflow(artifacts):
    code = ("import sys, device_agents.__main__ as m; "
            f"m.main(['bench', r'{artifacts / 'int8.tflite'}', '--min-runs', '5', '--min-seconds', '0', '--json']); "
            "assert 'tensorflow' not in sys.modules, 'agent imported tensorflow'")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
