"""Read what a ``.tflite`` flatbuffer really contains: ops, tensors, MACs, weight sparsity, precision.

All figures here are counted from the file itself (its op, tensor and buffer tables, read with the
LiteRT flatbuffer schema), never estimated; the LiteRT interpreter the agents use loads the model
too, which proves it runs and names its inputs and outputs.

MACs count the multiply-accumulates of CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED and
TRANSPOSE_CONV for one inference; element-wise and custom ops are not counted. ``macs_nonzero`` counts only
those whose weight is non-zero, i.e. what a sparsity-aware kernel would need.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from device_agents.inference import ports
from device_agents.runtimes import get_runtime
from edge_kit.errors import first_line
from edgekit_protocol.labels import clip, printable

MAC_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")


def count_methods(where: str, weights: str, macs: str, macs_nonzero: str, precision: str, ops: str) -> dict[str, str]:
    """Return the manifest's ``methods`` for the figures counted from one file (``where``: ``the .tflite
    flatbuffer``, ``the ONNX graph``), keyed by the artifact's field: bytes, gzip_bytes, precision, op_histogram,
    weights, sparsity, macs, macs_nonzero. ``weights`` says which tensors are the weights, ``macs`` how the MACs
    are counted and what is left out, the others likewise for their figure."""
    return {
        "bytes": "counted: the file's size",
        "gzip_bytes": "counted: the file's size gzip-compressed at level 9 (Python's gzip, mtime 0): what a download "
                      "of it costs, and how far zeroed weights really shrink it",
        "precision": f"read from {where}: {precision}",
        "op_histogram": f"counted from {where}: {ops}",
        "weights": f"counted from {where}: the elements of {weights}",
        "sparsity": f"counted from {where}: the share of zeros among those weights",
        "macs": f"counted from {where}, for one inference (batch 1): {macs}",
        "macs_nonzero": f"counted from {where}: {macs_nonzero}",
    }


TFLITE_METHODS = count_methods(
    "the .tflite flatbuffer", weights=f"the constant weight tensor of each {', '.join(MAC_OPS)} op of the main "
    "graph (read through a DEQUANTIZE op where the weights are stored compressed)",
    macs="each of those ops' weight elements times the positions it is applied at (output pixels; FULLY_CONNECTED: "
         "output rows; TRANSPOSE_CONV: input pixels), from the file's tensor shapes; element-wise, pooling, activation and custom ops, and MAC ops without a constant weight, are "
         "not counted",
    macs_nonzero="as macs, counting only the non-zero weights (what a sparsity-aware kernel would compute)",
    precision="int8 when every MAC op's weight is int8 and none outputs float32; else float16 or dynamic-int8 by "
              "the constants' types; else float32",
    ops="the main graph's operators by op code")
"""How each figure :func:`analyse` gives is obtained, as the manifest records it (``Artifact.methods``)."""


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
    inputs: list[dict[str, Any]] = field(default_factory=list)  # name, shape, shape_signature, dtype, quantization
    outputs: list[dict[str, Any]] = field(default_factory=list)
    input_tensors: list[int] = field(default_factory=list)  # tensor index of each of ``inputs``, in order
    output_tensors: list[int] = field(default_factory=list)  # likewise for ``outputs``
    methods: dict[str, str] = field(default_factory=dict)  # how each figure was counted (TFLITE_METHODS, ...)

    @property
    def sparsity(self) -> float:
        """Share of zero values among the weights of MAC ops."""
        return 1.0 - self.weights_nonzero / self.weights if self.weights else 0.0


def gzip_size(data: bytes) -> int:
    """Return the size of ``data`` gzip-compressed at level 9 (how far sparsity really shrinks a download)."""
    return len(gzip.compress(data, compresslevel=9, mtime=0))


def _io(interp: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[int], list[int]]:
    """Return the manifest entries of the model's inputs and outputs, named as the agent names them,
    then the tensor index of each input and of each output."""
    signature = {int(d["index"]): [int(x) for x in d.get("shape_signature", d["shape"])]
                 for d in [*interp.get_input_details(), *interp.get_output_details()]}
    ins, outs = ports(interp)
    return ([{**p.record(), "shape_signature": signature[p.index]} for p in ins],
            [{**p.record(), "shape_signature": signature[p.index]} for p in outs],
            [p.index for p in ins], [p.index for p in outs])


def _names(enum: Any) -> dict[int, str]:
    return {v: k for k, v in vars(enum).items() if k.isupper() and isinstance(v, int)}


def _buffer_bytes(buffer: Any, data: bytes) -> Any:
    """Return a buffer's contents: inline, or (as ai-edge-quantizer writes them) at ``offset`` after the flatbuffer."""
    if getattr(buffer, "offset", 0) > 1 and getattr(buffer, "size", 0):
        return data[buffer.offset:buffer.offset + buffer.size]
    return buffer.data


def _table(data: bytes) -> tuple[list[OpInfo], dict[int, TensorInfo], dict[int, np.ndarray]]:
    """Return the main graph's ops, tensors and constant values, read from the flatbuffer itself.

    Read from the file rather than from an interpreter: a delegate replaces the ops it takes with
    one node, and a model with custom ops loads only with the resolver that knows them.

    Raises:
        ValueError: ``data`` is not a ``.tflite`` flatbuffer, or a damaged one (truncated, an offset or
            index out of range: whatever the schema reader trips on, as one line).
    """
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ValueError("not a .tflite flatbuffer (no TFL3 identifier)")
    try:
        return _read_table(data)
    except UnicodeDecodeError:
        raise ValueError("a tensor or op name that is not UTF-8 text: a damaged or hostile file") from None
    except ValueError:
        raise
    except struct.error as exc:
        if "requires a buffer of at least" not in str(exc):
            raise ValueError(f"damaged .tflite flatbuffer (truncated or corrupt: struct.error: {first_line(exc, 120)})") \
                from None
        # the reader's own words ("unpack_from requires a buffer of at least 2147483422 bytes for unpacking...")
        # ran past the 200 characters an error line keeps, cut mid-word, and said nothing a user can act on
        raise ValueError(f"damaged .tflite flatbuffer: an offset in it points past the end of its {len(data):,} "
                         "bytes (a file cut short, or a damaged or hostile one); download or export it again") from None
    except Exception as exc:  # noqa: BLE001 - IndexError, TypeError... from a damaged file
        raise ValueError(f"damaged .tflite flatbuffer (truncated or corrupt: {type(exc).__name__}: "
                         f"{first_line(exc, 120)})") from None


def _read_table(data: bytes) -> tuple[list[OpInfo], dict[int, TensorInfo], dict[int, np.ndarray]]:
    """Do :func:`_table`'s reading; a damaged file raises whatever the generated schema reader raises."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(data, 0))
    graph = model.subgraphs[0]
    builtin, types = _names(schema.BuiltinOperator), _names(schema.TensorType)
    codes = [(c.customCode or b"").decode() or builtin.get(max(c.builtinCode, c.deprecatedBuiltinCode), "UNKNOWN")
             for c in model.operatorCodes or []]
    ops = [OpInfo(i, codes[op.opcodeIndex], [int(t) for t in op.inputs], [int(t) for t in op.outputs])
           for i, op in enumerate(graph.operators or [])]
    produced = {t for op in ops for t in op.outputs} | {int(i) for i in graph.inputs}
    tensors: dict[int, TensorInfo] = {}
    values: dict[int, np.ndarray] = {}
    for idx, t in enumerate(graph.tensors or []):
        dtype = types.get(t.type, "unknown").lower()
        shape = tuple(int(d) for d in (t.shape if t.shape is not None else ()))
        raw = _buffer_bytes(model.buffers[t.buffer], data) if t.buffer < len(model.buffers) else None
        constant = idx not in produced and raw is not None and len(raw) > 0
        q = t.quantization
        tensors[idx] = TensorInfo(idx, (t.name or b"").decode(), shape,
                                  tuple(int(d) for d in t.shapeSignature) if t.shapeSignature is not None else shape,
                                  dtype, q is not None and q.scale is not None and len(q.scale) > 0, constant)
        if constant and dtype in _NUMPY:
            try:
                values[idx] = np.frombuffer(bytes(raw), dtype=_NUMPY[dtype]).reshape(shape)
            except ValueError:  # numpy's "cannot reshape array of size 12 into shape (46341,46341)"
                stored, declared = _clipped_shape(shape), tensors[idx].name
                raise ValueError(f"constant tensor '{printable(clip(declared, 60))}' declares shape {stored} "
                                 f"({dtype}) but its buffer holds {len(raw):,} bytes: a damaged or hostile file; "
                                 "download or export it again") from None
    return ops, tensors, values


def _clipped_shape(shape: tuple[int, ...]) -> str:
    """Return ``shape`` as ``AxBxC``, its first 8 dimensions only (``x...`` after them): a file declares any rank."""
    return "x".join(map(str, shape[:8])) + ("x..." if len(shape) > 8 else "") if shape else "() (a scalar)"


_NUMPY = {"float32": "<f4", "float16": "<f2", "int8": "i1", "uint8": "u1", "int16": "<i2", "int32": "<i4", "int64": "<i8"}


MAX_TENSOR_BYTES = 2**31  # one tensor of 2 GiB: no device has the memory to run more, nor should the host try
_ITEM_BYTES = {"float64": 8, "int64": 8, "uint64": 8, "complex64": 8, "complex128": 16, "float32": 4, "int32": 4,
               "uint32": 4, "float16": 2, "bfloat16": 2, "int16": 2, "uint16": 2}  # any other (int8, bool, int4...): 1


def oversized_tensor(data: bytes) -> str | None:
    """Return, for the first tensor of the flatbuffer's main graph that would take more than
    :data:`MAX_TENSOR_BYTES`, ``tensor 'NAME' (shape AxB, dtype) would take N bytes``; None when every
    tensor fits. Read from the shapes the file declares (a dynamic dimension counted as 1), before
    any runtime allocates them: a file of a few bytes can declare a tensor of any size.

    Raises:
        ValueError: ``data`` is not a ``.tflite`` flatbuffer, or a damaged one (as :func:`_table`).
    """
    _, tensors, _ = _table(data)
    for t in tensors.values():
        size = _ITEM_BYTES.get(t.dtype, 1)
        for d in t.shape:
            size *= max(int(d), 1)
        if size > MAX_TENSOR_BYTES:
            return (f"tensor '{t.name}' (shape {'x'.join(map(str, t.shape))}, {t.dtype}) would take {size:,} bytes")
    return None


def flex_ops(data: bytes) -> list[str]:
    """Return the sorted names of the TensorFlow ("Flex", Select TF) ops of the flatbuffer's main graph, which the
    LiteRT runtime devices run does not have; empty when there are none or the file cannot be read. Never raises."""
    try:
        return sorted({op.name for op in _table(data)[0] if op.name.startswith("Flex")})
    except ValueError:
        return []


def nan_constant(data: bytes) -> tuple[str, int] | None:
    """Return (name, flat index of the first NaN) of the first float constant of the flatbuffer's main
    graph holding NaN, or None (``-inf``, as attention masks store it, is fine).

    Raises:
        ValueError: ``data`` is not a ``.tflite`` flatbuffer, or a damaged one (as :func:`_table`).
    """
    _, tensors, values = _table(data)
    for idx, value in values.items():
        if value.dtype.kind == "f":
            bad = np.isnan(value.ravel())
            if bad.any():
                return tensors[idx].name, int(np.argmax(bad))
    return None


PROBE_TIMEOUT_S = 600.0  # loading (and packing the weights of) a large model takes seconds, not minutes


_PROBED = {"tflite": ("model.tflite", "litert", "the LiteRT interpreter"),
           "onnx": ("model.onnx", "onnxruntime", "ONNX Runtime")}  # format: (file name, runtime, its name in words)


def probe_in_child(data: bytes, timeout: float = PROBE_TIMEOUT_S, *, fmt: str = "tflite", refusals: bool = False) -> None:
    """Load ``data`` (a ``.tflite`` flatbuffer, or an ONNX model with ``fmt="onnx"``) with the runtime the
    devices use and run it once on zeros in a child process first (the agent's smoke check,
    :class:`device_agents.smoke.SmokePool`): a file that crashes the native code (a damaged or hostile
    file passes its verifier) takes down the child, not the compiler. Errors the runtime reports are
    left to the caller's own load (:func:`analyse`, :func:`edge_kit.compiler.onnx_source.load_onnx`),
    which words them, unless ``refusals``: then they raise too (a built variant every device would refuse).

    Raises:
        ValueError: the child crashed (the signal named), was killed (out of memory) or ran out of time;
            with ``refusals``, also the smoke check's refusal (``the devices' smoke check refuses it: ...``).
    """
    import tempfile

    from device_agents.errors import SmokeCrashed, SmokeFailed
    from device_agents.smoke import SmokePool

    file_name, runtime, words = _PROBED[fmt]
    with tempfile.TemporaryDirectory(prefix="edgekit-probe-") as tmp:
        model = os.path.join(tmp, file_name)
        with open(model, "wb") as f:
            f.write(data)
        try:
            SmokePool()(model, runtime=runtime, timeout=timeout)
        except SmokeCrashed as exc:
            raise ValueError(f"{words} {exc.how} loading it: a damaged or hostile file") from None
        except SmokeFailed as exc:
            if refusals:
                raise ValueError(f"the devices' smoke check refuses it: {exc}") from None


INFERENCE_FLOOR_S = 120.0  # loading the model (packing its weights) and starting the child
INFERENCE_PER_SAMPLE_S = 1.0  # one sample on the host: a large detector takes tens of ms; 1 s is a loop, not a model


def inference_deadline(samples: int, timeout: float | None = None) -> float:
    """Return how many seconds one run of a model over ``samples`` inputs may take: ``timeout`` when
    given (``edgekit compile --timeout``), else :data:`INFERENCE_FLOOR_S` plus
    :data:`INFERENCE_PER_SAMPLE_S` per sample."""
    return float(timeout) if timeout is not None else INFERENCE_FLOOR_S + INFERENCE_PER_SAMPLE_S * samples


CONVERSION_LOADS = 5  # a conversion step may take this many loading budgets (inference_deadline of no samples)
CONVERSION_PER_MIB_S = 1.0  # plus this per MiB of the model on disk: a large model's conversion takes longer
CONVERSION_CAUSE = ("a model too large to convert, or whose constants fold into too much work? (edgekit compile "
                    f"--timeout sets the limit: {CONVERSION_LOADS} times it, plus {CONVERSION_PER_MIB_S:g} s per MiB "
                    "of the model)")  # what the compile's one line suggests when a conversion outlives its deadline


def conversion_deadline(model_bytes: int, timeout: float | None = None) -> float:
    """Return how many seconds one conversion step in the compiling process may take for a model of ``model_bytes``
    bytes on disk (TensorFlow's tracing and converter, tf2onnx's export, ONNX Runtime's and onnx's converters,
    ai-edge-quantizer's without calibration): :data:`CONVERSION_LOADS` times the loading budget (``timeout``,
    ``edgekit compile --timeout``, when given, else :data:`INFERENCE_FLOOR_S`: 600 s by default) plus
    :data:`CONVERSION_PER_MIB_S` per MiB of the model. A conversion does not run the model over the data, so the
    samples do not count; it is generous, as it only has to catch a conversion that does not end. Rounded up to a
    whole second (the compile's one line names it)."""
    return float(math.ceil(CONVERSION_LOADS * inference_deadline(0, timeout)
                           + CONVERSION_PER_MIB_S * max(0, model_bytes) / 2**20))


class ChildInference:
    """Runs models over one set of inputs, each run in a child of :class:`device_agents.smoke.SmokePool`
    with a deadline: a model that crashes the runtime on real inputs, or loops on them (a trip count
    read from the input: it passes the smoke check on zeros), costs the compiler one child, not itself.

    The inputs are written once into ``folder`` (:func:`device_agents.smoke.save_inputs`); every run maps them.
    A model run once is not run again: its outputs are kept in ``known`` by the sha256 of its bytes (a dict that
    another instance on the same inputs may share).
    """

    def __init__(self, inputs: dict[str, np.ndarray], folder: Any, where: str, *, timeout: float, threads: int = 1,
                 known: dict[bytes, dict[str, np.ndarray]] | None = None):
        """Save ``inputs`` ({input name: samples}) into ``folder``; ``where`` names them in errors
        (``eval.npz``), ``timeout`` is each run's deadline in seconds; ``known``: {sha256 of a model: its outputs}
        on these same inputs, run already (filled by each run here).

        Raises:
            OSError: the inputs could not be written.
        """
        from device_agents.smoke import SmokePool, save_inputs

        self.folder = save_inputs(inputs, folder)
        self.where, self.timeout, self.threads = where, timeout, threads
        self.known = {} if known is None else known
        self.pool = SmokePool()

    def __call__(self, data: bytes) -> dict[str, np.ndarray]:
        """Return {output name: outputs stacked over the samples} of ``data`` (a ``.tflite`` flatbuffer
        or an ONNX model, run with LiteRT or ONNX Runtime as the devices run it).

        Raises:
            ValueError: one line: the run did not finish within the deadline, the child crashed (signal
                named) or was killed, or the runtime refused the model or the inputs (its first line).
            CompileError: the model or its outputs could not be written into or read from the scratch
                folder (disk full, the folder removed): no fault of the model.
        """
        import hashlib
        import tempfile

        from device_agents.errors import SmokeCrashed, SmokeFailed, SmokeTimedOut
        from device_agents.formats import model_format
        from edge_kit.errors import CompileError

        key = hashlib.sha256(data).digest()
        if key in self.known:  # the same model on the same inputs: the same outputs, without another child's run
            return {name: y.copy() for name, y in self.known[key].items()}
        file_name, runtime, words = _PROBED[model_format(data)]
        try:
            with tempfile.TemporaryDirectory(prefix="edgekit-model-", dir=self.folder.parent) as tmp:
                model = os.path.join(tmp, file_name)
                with open(model, "wb") as f:
                    f.write(data)
                got = self.pool.predict(model, self.folder, runtime=runtime, threads=self.threads, timeout=self.timeout)
            self.known[key] = {name: y.copy() for name, y in got.items()}
            return got
        except OSError as exc:
            raise CompileError(f"{self.folder.parent}: could not write or read a model's run on {self.where} there "
                               f"({exc.strerror or exc}); free space in the temporary folder (TMPDIR)") from None
        except SmokeTimedOut as exc:
            raise ValueError(f"the inference on {self.where} {exc.how}: a model that loops on real inputs? "
                             "(edgekit compile --timeout sets the limit)") from None
        except SmokeCrashed as exc:
            raise ValueError(f"{words} {exc.how} running it on {self.where}") from None
        except SmokeFailed as exc:
            raise ValueError(f"{words} failed running it on {self.where}: {exc}") from None


def analyse(data: bytes, ports_from: bytes | None = None) -> ModelStats:
    """Return the :class:`ModelStats` of a flatbuffer.

    Ops, tensors and weights are read from the file; inputs and outputs from the LiteRT interpreter
    the agents use (XNNPACK), which also proves the model loads: a model it cannot load is refused.
    ``ports_from``: for a model an accelerator's compiler made (``edgetpu``: its ops replaced by an
    ``edgetpu-custom-op`` that only the Edge TPU's delegate resolves, so no interpreter here loads it),
    the model it was compiled from, whose inputs and outputs the compiler keeps: they are read from that
    model's interpreter instead, and ``data`` is read from the file only.

    Raises:
        ValueError: ``data`` (or ``ports_from``) is not a ``.tflite`` model the LiteRT interpreter loads
            (the first line of its error names the op it cannot resolve).
    """
    from edge_kit.compiler.tf_quiet import runtime_banner_dropped

    ops, tensors, values = _table(data)
    with runtime_banner_dropped():  # the runtime's INFO banner, first printed here for a .tflite source
        interp = get_runtime("litert").interpreter(data if ports_from is None else ports_from)
    producer = {t: op for op in ops for t in op.outputs}

    def weight_tensor(op: OpInfo) -> int | None:
        idx = op.inputs[1] if len(op.inputs) > 1 else -1  # conv, depthwise, fully-connected, transpose-conv
        src = producer.get(idx)
        if src is not None and src.name == "DEQUANTIZE":  # float16 / dynamic weights stored compressed
            idx = src.inputs[0]
        return idx if idx >= 0 and idx in values else None

    macs = macs_nonzero = weights = weights_nonzero = 0
    for op in ops:
        if op.name not in MAC_OPS:
            continue
        widx = weight_tensor(op)
        if widx is None:
            continue
        w = values[widx]
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

    inputs, outputs, input_tensors, output_tensors = _io(interp)
    return ModelStats(
        bytes=len(data),
        gzip_bytes=gzip_size(data),
        precision=_precision(ops, tensors),
        ops=ops,
        tensors=tensors,
        op_histogram=dict(sorted(Counter(op.name for op in ops).items())),
        macs=macs,
        macs_nonzero=macs_nonzero,
        weights=weights,
        weights_nonzero=weights_nonzero,
        inputs=inputs,
        outputs=outputs,
        input_tensors=input_tensors,
        output_tensors=output_tensors,
        methods=TFLITE_METHODS,
    )


def float_ops(data: bytes) -> dict[str, int]:
    """Return {op name: count} of the ops of a quantized flatbuffer that still compute in float: those
    with a float32 output, other than the DEQUANTIZE ops that feed them (QUANTIZE takes their result
    back to integers). Empty for a model that is integer throughout.

    Raises:
        ValueError: ``data`` is not a ``.tflite`` flatbuffer.
    """
    ops, tensors, _ = _table(data)
    return dict(sorted(Counter(op.name for op in ops if op.name != "DEQUANTIZE"
                               and any(tensors[o].dtype == "float32" for o in op.outputs if o >= 0)).items()))


def _precision(ops: list[OpInfo], tensors: dict[int, TensorInfo]) -> str:
    """Return float32, float16, dynamic-int8 or int8 from the dtypes the file really holds."""
    const_dtypes = {tensors[i].dtype for op in ops for i in op.inputs if i >= 0 and tensors[i].constant}
    mac_weights = {tensors[op.inputs[1]].dtype for op in ops if op.name in MAC_OPS and len(op.inputs) > 1 and op.inputs[1] >= 0}
    if mac_weights and mac_weights <= {"int8"} and "float32" not in {
        tensors[o].dtype for op in ops if op.name in MAC_OPS for o in op.outputs
    }:
        return "int8"
    if "float16" in const_dtypes:
        return "float16"
    if "int8" in const_dtypes:
        return "dynamic-int8"
    return "float32"
