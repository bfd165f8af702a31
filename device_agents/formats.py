"""Model formats on the device: the one place that tells a ``.tflite`` artifact from an ``.onnx`` one.

Stdlib only, so the store can use it without importing numpy or an interpreter.
"""

from __future__ import annotations

from pathlib import Path

FORMATS = ("tflite", "onnx")
SUFFIX = {"tflite": ".tflite", "onnx": ".onnx"}  # the file name an installed model of each format gets


def model_format(model: Path | bytes) -> str:
    """Return ``"tflite"`` or ``"onnx"``: the format of a model file (or its bytes), read from its content.

    A TFLite flatbuffer carries the identifier ``TFL3`` at bytes 4..8; an ONNX ``ModelProto`` starts
    with its ``ir_version`` field (protobuf tag ``0x08``), which every ONNX writer emits first.
    Anything else counts as ``tflite``, so an unreadable file fails where a ``.tflite`` one would (at load).

    Raises:
        OSError: the file cannot be read.
    """
    if isinstance(model, bytes | bytearray):
        head = bytes(model[:8])
    else:
        with open(model, "rb") as f:
            head = f.read(8)
    if head[4:8] == b"TFL3":
        return "tflite"
    return "onnx" if head[:1] == b"\x08" else "tflite"
