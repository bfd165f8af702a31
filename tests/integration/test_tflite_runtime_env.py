"""The agent on the older runtime: tflite-runtime with numpy<2, in its own environment (made by
.ci/setup), holding only what a device installs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from device_agents.bench import BenchSettings, run_bench

pytestmark = pytest.mark.integration

PYTHON = Path(os.environ.get("EDGEKIT_TFLITE_PYTHON", Path(__file__).parents[2] / ".venv-tflite/bin/python"))


@pytest.fixture(scope="module")
def device_python():
    assert PYTHON.exists(), f"{PYTHON} is missing: run `bash .ci/setup` (it builds the tflite-runtime environment)"
    return PYTHON


def run(python: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *args], capture_output=True, text=True, timeout=300, check=False)


def test_the_device_environment_has_numpy_1_and_no_tensorflow(device_python):
    code = ("import sys, numpy, tflite_runtime, device_agents.service, device_agents.bench; "
            "print(numpy.__version__, tflite_runtime.__version__, "
            "any(m.split('.')[0] in ('tensorflow', 'ai_edge_litert', 'pydantic') for m in sys.modules))")
    proc = run(device_python, "-c", code)
    assert proc.returncode == 0, proc.stderr
    numpy_version, _, heavy = proc.stdout.split()
    assert numpy_version.startswith("1.") and heavy == "False"


def test_bench_on_tflite_runtime_agrees_with_litert(device_python, digits_artifacts):
    model, evalset = digits_artifacts / "int8.tflite", digits_artifacts / "eval.npz"
    proc = run(device_python, "-m", "device_agents", "bench", str(model), "--eval", str(evalset),
               "--runtime", "tflite-runtime", "--min-runs", "50", "--min-seconds", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout)
    assert rec["runtime"] == "tflite-runtime" and rec["runtime_version"].startswith("2.14")
    litert = run_bench(model, BenchSettings(warmup=2, min_runs=50, min_seconds=0), eval_file=evalset)
    assert rec["accuracy"]["value"] == pytest.approx(litert["accuracy"]["value"], abs=0.01)
    assert rec["fidelity"]["top1_agreement"] > 0.95  # against the fp32 reference shipped in eval.npz


def test_safe_activation_on_tflite_runtime(device_python, digits_artifacts, tmp_path):
    root = tmp_path / "root"
    manifest = json.loads((digits_artifacts / "manifest.json").read_text())
    art = next(a for a in manifest["artifacts"] if a["id"] == "int8")
    proc = run(device_python, "-m", "device_agents", "install", str(digits_artifacts / "int8.tflite"), "--root", str(root),
               "--variant", "int8", "--model-name", "digits", "--sha256", art["sha256"])
    assert proc.returncode == 0, proc.stderr
    proc = run(device_python, "-m", "device_agents", "activate", "--root", str(root), "--variant", "int8",
               "--runtime", "tflite-runtime")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["smoke"]["outputs"] == {"output_0": [1, 10]}
    assert os.readlink(root / "current") == f"models/{art['sha256']}"
