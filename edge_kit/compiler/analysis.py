"""Read what a ``.tflite`` flatbuffer really contains: ops, tensors, MACs, weight sparsity, precision.

All figures here are counted from the file itself (through the LiteRT interpreter's tensor and op
tables, with no delegate applied so constant tensors stay readable), never estimated.

MACs count the multiply-accumulates of CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED and
TRANSPOSE_CONV for one inference; element-wise ops are not counted. ``macs_nonzero`` counts only
those whose weight is non-zero, i.e. what a sparsity-aware kernel would need.
"""

from __future__ import annotations

import gzip
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from device_agents.runtimes import get_runtime

MAC_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")


@dataclass
class OpInfo:
    index: int
    name: str
    inputs: list[int]
    outputs: list[int]


@dataclass
class TensorInfo:
    index: int
    name: str
    shape: tuple[int, ...]
    shape_signature: tuple[int, ...]
    dtype: str
    quantized: bool
    constant: bool


@dataclass
class ModelStats:
    """What one flatbuffer holds. See the module docstring for how MACs are counted."""

    bytes: int
    gzip_bytes: int
    precision: str
    ops: list[OpInfo]
    tensors: dict[int, TensorInfo]
    op_histogram: dict[str, int]
    macs: int
    macs_nonzero: int
    weights: int
    weights_nonzero: int
    input: dict[str, Any] = field(default_factory=dict)
    output: dict[str, Any] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Share of zero values among the weights of MAC ops."""
        return 1.0 - self.weights_nonzero / self.weights if self.weights else 0.0


def gzip_size(data: bytes) -> int:
    """Return the size of ``data`` gzip-compressed at level 9 (how far sparsity really shrinks a download)."""
    return len(gzip.compress(data, compresslevel=9, mtime=0))


def _io(detail: dict[str, Any]) -> dict[str, Any]:
    scale, zero = detail["quantization"]
    return {
        "shape": [int(d) for d in detail["shape"]],
        "dtype": np.dtype(detail["dtype"]).name,
        "scale": float(scale) if scale else None,
        "zero_point": int(zero) if scale else None,
    }


def analyse(data: bytes) -> ModelStats:
    """Return the :class:`ModelStats` of a flatbuffer.

    Raises:
        ValueError: ``data`` is not a loadable ``.tflite`` model.
    """
    interp = get_runtime("litert").interpreter(data, delegate="none")
    tensors: dict[int, TensorInfo] = {}
    for t in interp.get_tensor_details():
        q = t.get("quantization_parameters", {})
        tensors[t["index"]] = TensorInfo(
            index=t["index"],
            name=t["name"],
            shape=tuple(int(d) for d in t["shape"]),
            shape_signature=tuple(int(d) for d in t.get("shape_signature", t["shape"])),
            dtype=np.dtype(t["dtype"]).name,
            quantized=bool(len(q.get("scales", ()))),
            constant=False,
        )
    ops = [
        OpInfo(o["index"], o["op_name"], [int(i) for i in o["inputs"]], [int(i) for i in o["outputs"]])
        for o in interp._get_ops_details()  # noqa: SLF001 - the only public-ish op table the interpreter has
    ]
    produced = {t for op in ops for t in op.outputs}
    inputs = {d["index"] for d in interp.get_input_details()}
    for idx, t in tensors.items():
        t.constant = idx not in produced and idx not in inputs
    producer = {t: op for op in ops for t in op.outputs}

    def weight_tensor(op: OpInfo) -> int | None:
        idx = op.inputs[0] if op.name == "TRANSPOSE_CONV" and len(op.inputs) > 2 else op.inputs[1]
        src = producer.get(idx)
        if src is not None and src.name == "DEQUANTIZE":  # float16 / dynamic weights stored compressed
            idx = src.inputs[0]
        return idx if idx >= 0 and tensors[idx].constant else None

    macs = macs_nonzero = weights = weights_nonzero = 0
    for op in ops:
        if op.name not in MAC_OPS:
            continue
        widx = weight_tensor(op)
        if widx is None:
            continue
        w = np.asarray(interp.get_tensor(widx))
        wshape = w.shape
        nnz = int(np.count_nonzero(w))
        out_shape = tensors[op.outputs[0]].shape
        if op.name == "FULLY_CONNECTED":
            positions = int(np.prod(out_shape)) // max(int(wshape[0]), 1)
        elif op.name == "TRANSPOSE_CONV":
            positions = int(np.prod(tensors[op.inputs[2]].shape[:-1]))
        else:
            positions = int(np.prod(out_shape[:-1]))
        # Every weight is used once per output position: conv [Cout,kh,kw,Cin] and depthwise
        # [1,kh,kw,Cout] per pixel, fully-connected [units,in] per row.
        macs += positions * int(np.prod(wshape))
        macs_nonzero += positions * nnz
        weights += int(w.size)
        weights_nonzero += nnz

    return ModelStats(
        bytes=len(data),
        gzip_bytes=gzip_size(data),
        precision=_precision(interp, ops, tensors),
        ops=ops,
        tensors=tensors,
        op_histogram=dict(sorted(Counter(op.name for op in ops).items())),
        macs=macs,
        macs_nonzero=macs_nonzero,
        weights=weights,
        weights_nonzero=weights_nonzero,
        input=_io(interp.get_input_details()[0]),
        output=_io(interp.get_output_details()[0]),
    )


def _precision(interp: Any, ops: list[OpInfo], tensors: dict[int, TensorInfo]) -> str:
    """Return float32, float16, dynamic-int8 or int8 from the dtypes the file really holds."""
    in_dtype = np.dtype(interp.get_input_details()[0]["dtype"])
    const_dtypes = {tensors[i].dtype for op in ops for i in op.inputs if i >= 0 and tensors[i].constant}
    if np.issubdtype(in_dtype, np.integer) and "float32" not in {
        tensors[o].dtype for op in ops if op.name in MAC_OPS for o in op.outputs
    }:
        return "int8"
    if "float16" in const_dtypes:
        return "float16"
    if "int8" in const_dtypes:
        return "dynamic-int8"
    return "float32"
