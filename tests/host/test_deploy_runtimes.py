"""Deploy: a variant whose runtime the device lacks is refused in one line, the others proceed."""

from __future__ import annotations

from edge_kit.fleet.deploy import runtime_refusals
from edge_kit.manifest import Artifact


def art(vid: str, runtime: str) -> Artifact:
    return Artifact(id=vid, status="built", profiles=["rpi4"], summary="", precision="float32", runtime=runtime,
                    file=f"{vid}.{'onnx' if runtime == 'onnxruntime' else 'tflite'}", sha256="0" * 64, bytes=1)


WANTED = [art("fp32", "litert"), art("onnx-fp32", "onnxruntime"), art("int8", "litert"), art("onnx-int8", "onnxruntime")]


def test_onnx_variants_are_refused_on_a_device_without_onnxruntime():
    refused = runtime_refusals("pi-1", WANTED, {"onnxruntime": False})
    assert set(refused) == {"onnx-fp32", "onnx-int8"}
    for vid, why in refused.items():
        assert "\n" not in why and why.startswith(f"pi-1: {vid} needs onnxruntime")
        assert "pip install 'edge-kit[agent-onnx]'" in why
    assert set(runtime_refusals("pi-1", WANTED, {})) == {"onnx-fp32", "onnx-int8"}  # not reported: missing


def test_nothing_is_refused_where_onnxruntime_is_installed():
    assert runtime_refusals("pi-1", WANTED, {"onnxruntime": True}) == {}
    assert runtime_refusals("pi-1", WANTED[:1], {}) == {}  # LiteRT variants need nothing more


def test_trt_variants_are_refused_where_onnxruntime_has_no_tensorrt_provider():
    wanted = [*WANTED, art("trt-fp16", "tensorrt"), art("trt-int8", "tensorrt")]
    refused = runtime_refusals("jetson-1", wanted, {"onnxruntime": True, "tensorrt": False})
    assert set(refused) == {"trt-fp16", "trt-int8"}
    assert all("\n" not in why and "onnxruntime-gpu" in why and why.startswith("jetson-1: trt-") for why in refused.values())
    assert runtime_refusals("jetson-1", wanted, {"onnxruntime": True, "tensorrt": True}) == {}
