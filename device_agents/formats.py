"""Model formats on the device: the one place that tells a ``.tflite`` artifact from an ``.onnx`` one.

Stdlib only, so the store can use it without importing numpy or an interpreter.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Union

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


# Keys edgekit compile writes into an ONNX artifact's metadata_props (ModelProto field 14), read here on the device.
# Each starts with META_PREFIX, which only edgekit compile writes: an ONNX source carrying one is refused.
META_PREFIX = "edgekit."
META_RUNTIME = "edgekit.runtime"  # "tensorrt" on the trt-* variants: the agent builds an engine from the model
META_VARIANT = "edgekit.variant"  # the variant id, which also makes trt-fp16's bytes differ from onnx-fp32's
META_CALIB = "edgekit.trt_calibration_table"  # trt-int8: the host's calibration table (base64 of ORT's flatbuffers file)
META_CALIB_SHA256 = "edgekit.trt_calibration_table_sha256"  # sha256 of the decoded table, as the manifest records it


def _varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Return (value, next position) of the protobuf varint at ``pos``. Raises ValueError when truncated."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes | memoryview) -> list[tuple[int, int, Any]]:
    """Return the (field number, wire type, value) of a protobuf message's top-level fields; a
    length-delimited value is a memoryview (not copied). Raises ValueError on a malformed message."""
    out: list[tuple[int, int, Any]] = []
    view, pos = memoryview(buf), 0
    while pos < len(view):
        tag, pos = _varint(view, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(view, pos)
        elif wire == 1:
            value, pos = bytes(view[pos:pos + 8]), pos + 8
        elif wire == 5:
            value, pos = bytes(view[pos:pos + 4]), pos + 4
        elif wire == 2:
            size, pos = _varint(view, pos)
            if pos + size > len(view):
                raise ValueError(f"field {number} runs past the end")
            value, pos = view[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported wire type {wire} in field {number}")
        out.append((number, wire, value))
    return out


def _read_onnx(model: Path | bytes, walk: Callable[[bytes | memoryview], Any], empty: Any) -> Any:
    """Return ``walk`` of an ONNX model's bytes (a file is memory-mapped, not read), or ``empty`` for a
    model that is not ONNX or an empty file.

    Raises:
        OSError: the file cannot be read. ValueError: ``walk`` found the protobuf malformed.
    """
    import mmap

    if isinstance(model, bytes | bytearray):
        return walk(bytes(model)) if model_format(model) == "onnx" else empty
    if model_format(model) != "onnx":
        return empty
    with open(model, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return empty
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                return walk(view)
            except ValueError as exc:  # raised again once the slices into the map it holds are gone:
                problem = str(exc)     # the map then closes (else BufferError hides the reason)
            finally:
                view.release()
    raise ValueError(problem)


def onnx_metadata(model: Path | bytes) -> dict[str, str]:
    """Return an ONNX model's ``metadata_props`` (key -> value), read with a minimal protobuf walk of the
    ``ModelProto``'s top-level fields (stdlib only: the agent has no ``onnx`` package); ``{}`` for a
    model that has none or is not ONNX.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file starts like an ONNX model but its top level is not valid protobuf.
    """

    def walk(buf: bytes | memoryview) -> dict[str, str]:
        props: dict[str, str] = {}
        for number, wire, value in _fields(buf):
            if number == 14 and wire == 2:  # StringStringEntryProto {1: key, 2: value}
                entry = {n: bytes(v).decode("utf-8", "replace") for n, w, v in _fields(value) if w == 2}
                props[entry.get(1, "")] = entry.get(2, "")
        return props

    return _read_onnx(model, walk, {})


Dim = Union[int, str]  # a fixed size, or the symbolic name of a dynamic one ("" when it has none)


def onnx_input_shapes(model: Path | bytes) -> dict[str, list[Dim]]:
    """Return the declared shape of each graph input that is not an initializer, in graph order:
    ``{name: [dim, ...]}`` with an int for a fixed size and a string (its symbolic name, or ``""``)
    for a dynamic one; read with a protobuf walk like :func:`onnx_metadata`. ``{}`` when not ONNX.

    Raises:
        OSError: the file cannot be read. ValueError: the protobuf is malformed.
    """

    def text(buf: Any) -> str:
        return bytes(buf).decode("utf-8", "replace")

    def dims(value_info: Any) -> list[Dim]:
        out: list[Dim] = []
        for n, w, type_proto in _fields(value_info):
            if n != 2 or w != 2:  # ValueInfoProto.type
                continue
            for n2, w2, tensor in _fields(type_proto):
                if n2 != 1 or w2 != 2:  # TypeProto.tensor_type
                    continue
                for n3, w3, shape in _fields(tensor):
                    if n3 != 2 or w3 != 2:  # TypeProto.Tensor.shape
                        continue
                    for n4, w4, dim in _fields(shape):
                        if n4 != 1 or w4 != 2:  # TensorShapeProto.dim
                            continue
                        parts = {k: v for k, wk, v in _fields(dim)}
                        value = parts.get(1)
                        fixed = isinstance(value, int) and 0 < value < 1 << 63  # -1 arrives as a 10-byte varint
                        out.append(int(value) if fixed else text(parts.get(2, b"")))
        return out

    def walk(buf: bytes | memoryview) -> dict[str, list[Dim]]:
        graph = next((v for n, w, v in _fields(buf) if n == 7 and w == 2), None)  # ModelProto.graph
        if graph is None:
            return {}
        inputs: dict[str, list[Dim]] = {}
        constants: set[str] = set()
        for n, w, value in _fields(graph):
            if n == 11 and w == 2:  # GraphProto.input: ValueInfoProto {1: name}
                name = next((text(v) for k, wk, v in _fields(value) if k == 1 and wk == 2), "")
                inputs[name] = dims(value)
            elif n == 5 and w == 2:  # GraphProto.initializer: TensorProto {8: name}
                constants.update(text(v) for k, wk, v in _fields(value) if k == 8 and wk == 2)
        return {name: shape for name, shape in inputs.items() if name not in constants}

    return _read_onnx(model, walk, {})
