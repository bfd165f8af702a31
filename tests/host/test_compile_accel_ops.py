"""`edgekit compile`'s "accelerator ops" column and the manifest's ``accelerators`` count only the path a profile's
devices take: the ops of the LiteRT delegate the profile runs (``runtime.delegate``) on its accelerator. A one-layer
``.tflite`` and its ``fp32`` variant only: each compile takes seconds."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from tiny_models import dense_tflite

PROFILES = Path(__file__).resolve().parents[2] / "profiles"


def _profile(tmp_path: Path, name: str, **runtime) -> Path:
    jetson = yaml.safe_load((PROFILES / "jetson-orin-nano.yaml").read_text())
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**jetson, "name": name, "variants": ["fp32"],
                                    "runtime": {**jetson["runtime"], **runtime}}))
    return path


def test_a_jetson_profile_shows_no_litert_gpu_count_for_the_path_its_devices_never_take(tmp_path, run_cli):
    """The table showed 'gpu 7/7' for the digits model compiled for jetson-orin-nano (and the manifest recorded it),
    a count for the LiteRT GPU delegate the profile does not run (JetPack has no OpenCL; its LiteRT runs on xnnpack,
    its GPU through TensorRT). Now '-', with the reason in the profile's note; a profile that does run the GPU
    delegate still gets its count."""
    model = tmp_path / "dense.tflite"
    dense_tflite(model)
    jetson = _profile(tmp_path, "jetson")
    code, out, err = run_cli("compile", model, "-p", jetson, "--out", tmp_path / "a", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["artifacts"][0]["accelerators"] == {}
    assert data["profiles"]["jetson"]["delegate"] == "xnnpack"
    code, out, err = run_cli("compile", model, "-p", jetson, "--out", tmp_path / "b")
    assert code == 0, err
    row = next(ln.split() for ln in out.splitlines() if ln.split()[:1] == ["fp32"])
    assert row[-1] == "-" and "gpu" not in row, row
    text = " ".join(out.split())
    assert ("profile jetson (accelerator: gpu, its LiteRT variants run on xnnpack, the CPU, so no gpu ops are "
            "counted): fp32") in text, text

    gpu = _profile(tmp_path, "jetson-gpu", delegate="gpu")  # a copy that runs the LiteRT GPU delegate: counted
    code, out, err = run_cli("compile", model, "-p", gpu, "--out", tmp_path / "c", "--json")
    assert code == 0, err
    assert json.loads(out)["artifacts"][0]["accelerators"]["gpu"]["method"] == "rule-check"


def test_the_note_names_the_runtimes_that_reach_the_accelerator():
    from edge_kit.cli.compile import _compile_report
    from edge_kit.manifest import Manifest

    profiles = {"jetson-orin-nano": {"accelerator": "gpu", "delegate": "xnnpack",
                                     "variants": ["trt-fp16", "onnx-fp32", "fp32"]},
                "old": {"accelerator": "gpu", "variants": ["fp32"]},  # a manifest from before "delegate" was recorded
                # no LiteRT variant (an ONNX model compiled for ONNX Runtime variants alone): none is said to run
                "onnx-only": {"accelerator": "gpu", "delegate": "xnnpack", "variants": ["trt-fp16", "onnx-fp32"]}}
    m = Manifest(created="now", model={"name": "m"}, versions={}, profiles=profiles, artifacts=[])
    lines = _compile_report(m)[1]
    assert any(ln.startswith("    profile jetson-orin-nano (accelerator: gpu, used through onnxruntime, tensorrt on "
                             "the device; its LiteRT variants run on xnnpack, the CPU, so no gpu ops are counted): ")
               for ln in lines), lines
    assert any(ln.startswith("    profile old (accelerator: gpu): ") for ln in lines), lines
    assert any(ln.startswith("    profile onnx-only (accelerator: gpu, used through onnxruntime, tensorrt on the "
                             "device): ") for ln in lines), lines
