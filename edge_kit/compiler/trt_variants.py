"""The ``trt-*`` variants: the ONNX model a Jetson's agent builds a TensorRT engine from, at install.

A TensorRT engine is specific to the GPU and the TensorRT version that built it, so the host ships
no engine: it ships the ``onnx-fp32`` model (shapes pinned, batch 1) tagged in its
``metadata_props`` (:data:`device_agents.formats.META_RUNTIME` = ``tensorrt``, and the variant id,
which also keeps ``trt-fp16``'s bytes, and so its sha256, apart from ``onnx-fp32``'s), and for
``trt-int8`` the calibration table computed here from ``--calib``:

- ``trt-fp16``: the engine is built with ``trt_fp16_enable``.
- ``trt-int8``: ONNX Runtime's calibrator (``onnxruntime.quantization.create_calibrator``, MinMax,
  symmetric ranges: TensorRT's dynamic ranges are symmetric) runs the fp32 model on the ``--calib``
  samples; ``write_calibration_table`` writes the table in the flatbuffers format that ONNX
  Runtime's TensorRT execution provider reads (``trt_int8_use_native_calibration_table`` false).
  Token ids (an integer input the model takes as float32 and casts inside, and what ``Cast`` and shape-only ops
  make of it: :func:`id_tensors`) get no range in the table: the provider sets TensorRT's dynamic range only for the
  tensors the table names, and TensorRT runs a layer without one in a higher precision, so ids reach the model
  exactly instead of rounded to the int8 steps of their range.
  The table is written beside the artifact as ``trt-int8.calib`` (its sha256 in the manifest) and
  embedded in the artifact's ``metadata_props`` (base64, with its sha256), so it reaches the device
  with the model by every transport (SSH deploy, store fetch) and cannot be paired with another model.

Nothing here runs TensorRT: the host has no GPU. Accuracy, fidelity and latency of these variants
are measured on the device (``edgekit-agent bench``, the tune loop); the manifest says so.
"""

from __future__ import annotations

import base64
import hashlib
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.formats import (
    META_CALIB,
    META_CALIB_SHA256,
    META_RUNTIME,
    META_VARIANT,
)
from edge_kit.compiler.analysis import CONVERSION_CAUSE, conversion_deadline
from edge_kit.compiler.onnx_variants import calibration_reader
from edge_kit.compiler.watch import watched
from edge_kit.errors import CompileError, first_line

CALIB_SUFFIX = ".calib"  # trt-int8.calib beside trt-int8.onnx
CALIB_METHOD = ("onnxruntime.quantization.create_calibrator (MinMax, symmetric) on --calib, "
                "write_calibration_table (ONNX Runtime's TensorRT flatbuffers table)")
NOT_MEASURED = ("not measured on host: the TensorRT engine is built on the device at install; "
                "measured there by the agent (edgekit-agent bench, tune)")


def id_tensors(fp32: bytes, ids: Iterable[str]) -> list[str]:
    """Return the names of the top-level tensors of the model ``fp32`` that hold token ids: the inputs named in
    ``ids`` (taken as float32, cast inside: :func:`~edge_kit.compiler.onnx_source.float_inputs`), and every value
    :func:`~edge_kit.compiler.onnx_source.id_flow` follows them to, which moves ids without computing anything from
    them (casts, shape-only ops, ``Concat``; ids coming back out of an ``If``/``Loop``/``Scan`` body as the node's
    output too). Sorted; none when ``ids`` is empty.

    Raises:
        CompileError: the model cannot be parsed.
    """
    import onnx

    from edge_kit.compiler.onnx_source import id_flow

    found = set(ids)
    if not found:
        return []
    try:
        model = onnx.load_from_string(fp32)
    except Exception as exc:  # noqa: BLE001 - protobuf raises assorted types
        raise CompileError(f"trt-int8: the onnx-fp32 model cannot be parsed ({first_line(exc)})") from None
    for name in sorted(found):
        found.update(value for value, depth, _reads in id_flow(model, name) if depth == 0)
    return sorted(found)


def calibration_table(fp32: bytes, calib_x: dict[str, np.ndarray], calibrating: Callable[[], None] | None = None,
                      left_out: Iterable[str] = ()) -> bytes:
    """Return the TensorRT calibration table (ONNX Runtime's flatbuffers format) of ``fp32`` on ``calib_x``
    (``calibrating``: see :func:`~edge_kit.compiler.onnx_variants.calibration_reader`), with no range for the tensors
    named in ``left_out`` (token ids: :func:`id_tensors`), which TensorRT then keeps out of int8.

    Raises:
        CompileError: ONNX Runtime's calibrator failed (its first line).
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        create_calibrator,
        write_calibration_table,
    )
    from onnxruntime.quantization.calibrate import TensorsData

    drop = set(left_out)

    with tempfile.TemporaryDirectory(prefix="edgekit-trt-calib-") as tmp:
        src = Path(tmp) / "fp32.onnx"
        src.write_bytes(fp32)
        try:
            with watched("ONNX Runtime's create_calibrator on trt-int8 (the model augmented to output every tensor)",
                         conversion_deadline(len(fp32)), cause=CONVERSION_CAUSE):  # before the calibration's clock
                calibrator = create_calibrator(str(src), [], augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                               calibrate_method=CalibrationMethod.MinMax,
                                               extra_options={"symmetric": True})
            calibrator.execution_providers = ["CPUExecutionProvider"]
            calibrator.collect_data(calibration_reader(calib_x, calibrating))
            ranges = calibrator.compute_data()
            kept = TensorsData(ranges.calibration_method, {k: v for k, v in ranges.items() if k not in drop})
            write_calibration_table(kept, dir=tmp)
        except Exception as exc:  # noqa: BLE001 - the calibrator raises assorted types
            raise CompileError(f"trt-int8: ONNX Runtime's calibrator failed ({first_line(exc, 400)})") from None
        return (Path(tmp) / "calibration.flatbuffers").read_bytes()


def tagged(fp32: bytes, variant: str, table: bytes | None = None) -> bytes:
    """Return ``fp32`` with the edge-kit ``metadata_props`` of a TensorRT variant (and ``table``, embedded).

    Raises:
        CompileError: the model cannot be parsed.
    """
    import onnx

    try:
        model = onnx.load_from_string(fp32)
    except Exception as exc:  # noqa: BLE001 - protobuf raises assorted types
        raise CompileError(f"{variant}: the onnx-fp32 model cannot be parsed ({exc})") from None
    props = {p.key: p.value for p in model.metadata_props}
    props.update({META_RUNTIME: "tensorrt", META_VARIANT: variant})
    if table is not None:
        props[META_CALIB] = base64.b64encode(table).decode("ascii")
        props[META_CALIB_SHA256] = hashlib.sha256(table).hexdigest()
    onnx.helper.set_model_props(model, props)
    return model.SerializeToString()


def build(variant: str, fp32: bytes, calib_x: dict[str, np.ndarray] | None,
          calibrating: Callable[[], None] | None = None, ids: Iterable[str] = ()) -> tuple[bytes, str, dict[str, Any]]:
    """Return (artifact, how it was made, extra files {name: bytes}) for ``trt-fp16`` or ``trt-int8``.

    ``fp32`` is the ``onnx-fp32`` model (shapes pinned). The extra files hold ``trt-int8.calib``.
    ``calibrating``: see :func:`~edge_kit.compiler.onnx_variants.calibration_reader`. ``ids``: the inputs that carry
    token ids (:func:`edge_kit.compiler.data.id_inputs`), left out of the table with what merely
    casts or reshapes them (:func:`id_tensors`); ``how`` names them.

    Raises:
        CompileError: ``trt-int8`` without calibration data, the calibrator failed, the model cannot be parsed,
            or not a TensorRT variant.
    """
    how = "the onnx-fp32 model tagged for TensorRT; the engine is built on the device at install"
    if variant == "trt-fp16":
        return tagged(fp32, variant), how + " (trt_fp16_enable)", {}
    if variant == "trt-int8":
        if calib_x is None:
            raise CompileError("trt-int8: needs --calib (the calibration table is computed on the host)")
        left_out = id_tensors(fp32, ids)
        table = calibration_table(fp32, calib_x, calibrating, left_out)
        kept = (f"; token-id input {', '.join(repr(n) for n in sorted(ids))} and what only casts or reshapes it left "
                "out of the table, so TensorRT keeps them out of int8") if left_out else ""
        return (tagged(fp32, variant, table), how + f" (trt_int8_enable; calibration table: {CALIB_METHOD}{kept})",
                {variant + CALIB_SUFFIX: table})
    raise CompileError(f"{variant}: not a TensorRT variant")
