"""The ``onnx-*`` variants: ONNX models run by ONNX Runtime on the device, built once on the host.

From an ONNX source (the file ``edgekit compile`` was given):

- ``onnx-fp32``: the model itself with its input shapes pinned (batch 1, ``--input-shape`` pins),
  written with onnx's shape API and shape inference, and ``Constant`` nodes stored as initializers
  (Paddle exports hold their weights in them, which ONNX Runtime's quantizer does not quantize):
  the same computation as the file the user exported, runnable one sample at a time.
- ``onnx-fp16``: ``onnxruntime.transformers.float16.convert_float_to_float16`` on ``onnx-fp32``,
  with float32 inputs and outputs kept (``keep_io_types``) so the same data files feed it. That
  converter ships inside ONNX Runtime itself (it is the maintained copy of onnxconverter-common's,
  updated with each ONNX Runtime release), so it adds no dependency to the ``onnx`` extra.
- ``onnx-int8``: ONNX Runtime's static quantization, QDQ format (``quantize_static``), calibrated
  on ``--calib`` (MinMax), after ``quant_pre_process`` (shape inference and graph optimisation, as
  ONNX Runtime's quantization guide asks; its symbolic inference skipped: the shapes are pinned;
  the optimisation too, said in ``derived_from``, when its result does not quantize into a model
  ONNX Runtime loads); activations uint8, weights int8 per channel, the
  combination its guide recommends for CPUs. Inputs and outputs stay float32.

From a Keras or SavedModel source, the ONNX model is first exported once by tf2onnx
(:func:`export_graph`): ``tf2onnx.convert.from_function`` on the same batch-1 TensorFlow function
the LiteRT variants are converted from, so inputs and outputs keep their names. tf2onnx 1.17's
``from_keras`` fails on Keras 3 models (it looks outputs up by Keras 2 tensor names); its
``from_function`` route works with TensorFlow 2.21. From a ``.tflite`` source they are refused with
a one-line reason (:data:`NOT_FROM_TFLITE`): nothing converts a ``.tflite`` back to ONNX here.

Each artifact is read back with ``onnx`` for its op histogram, weights, sparsity and MACs
(:func:`analyse_onnx`), and run with the agent's own ``onnxruntime`` runtime for accuracy and fidelity.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_kit.compiler.analysis import (
    CONVERSION_CAUSE,
    ModelStats,
    conversion_deadline,
    count_methods,
    gzip_size,
)
from edge_kit.compiler.onnx_source import (
    _constants_as_initializers,
    graphs_of,
    outer_reads,
)
from edge_kit.compiler.watch import watched
from edge_kit.errors import CompileError, first_line

NOT_FROM_TFLITE = ("ONNX variants are built from an ONNX, Keras or SavedModel source: nothing here converts a .tflite "
                   "back to ONNX; compile the model it came from")
OPSET = 17  # what tf2onnx exports Keras/SavedModel sources at (ONNX Runtime 1.20+ runs it; QDQ per channel needs >= 13)
CALIB_SAMPLES = 256  # calibration samples fed to ONNX Runtime's MinMax calibrator (more only slows it)
FP16_METHOD = "onnxruntime.transformers.float16.convert_float_to_float16 (keep_io_types: float32 inputs and outputs)"
INT8_METHOD = ("onnxruntime.quantization.quantize_static, QDQ, MinMax calibration on --calib, activations uint8, "
               "weights int8 per channel, after quant_pre_process")
MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ONNX_METHODS = count_methods(
    "the ONNX graph", weights=f"the initializer feeding each {', '.join(MAC_OPS)} node as its weight (read through "
    "a DequantizeLinear in a QDQ model)",
    macs="per such node, its output elements times the weight's reduction size (input channels / group x kernel; "
         "ConvTranspose: input elements x output channels / group x kernel), shapes from ONNX shape inference; a "
         "node whose shapes inference cannot give, a MatMul of two activations (attention), element-wise and other "
         "nodes are not counted; a node in a Loop or Scan body (or an If branch) once, not per iteration",
    macs_nonzero="each counted node's MACs times its weight's share of non-zeros",
    precision="the stored type of most MAC weight elements (int8 or uint8: int8; float16; else float32)",
    ops="the node types of the graph and of its If/Loop/Scan subgraphs, each body once (QuantizeLinear / "
        "DequantizeLinear included)")
"""How each figure :func:`analyse_onnx` gives is obtained, as the manifest records it (``Artifact.methods``)."""



def calibration_reader(xs: dict[str, np.ndarray], calibrating: Callable[[], None] | None = None) -> Any:
    """Return an ONNX Runtime ``CalibrationDataReader`` over the calibration samples ``xs`` (input name
    to array), one sample per batch, the first :data:`CALIB_SAMPLES` (static int8 and TensorRT tables).
    ``calibrating`` (when given) is called as the calibrator reads each sample (the compile's deadline for
    the calibration starts at the first: :func:`edge_kit.compiler.watch.watched`)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            n = min(len(next(iter(xs.values()))), CALIB_SAMPLES)
            self.rows = iter([{name: np.ascontiguousarray(x[i:i + 1], dtype=np.float32) for name, x in xs.items()}
                              for i in range(n)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            if calibrating is not None:
                calibrating()
            return next(self.rows, None)

    return Reader()

def _converting(doing: str, data: bytes, seconds: float | None) -> Any:
    """Return the context that gives a conversion step of the model ``data`` (``doing``: a noun phrase naming the
    tool and the variant) its deadline in a compile worker (:func:`edge_kit.compiler.watch.watched`): ``seconds``,
    else :func:`~edge_kit.compiler.analysis.conversion_deadline` of the model's size."""
    return watched(doing, conversion_deadline(len(data)) if seconds is None else seconds, cause=CONVERSION_CAUSE)


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise CompileError("ONNX variants need onnx and onnxruntime on the host: pip install 'edge-kit[onnx]'") from None
    return onnx


def exporter_unavailable() -> str | None:
    """Return why Keras/SavedModel sources cannot be exported to ONNX here (one line naming the extra), or None."""
    try:
        import tf2onnx  # noqa: F401
    except ImportError:
        return "ONNX variants of a Keras or SavedModel source need tf2onnx on the host: pip install 'edge-kit[onnx]'"
    return None


def export_graph(function: Any, inputs: dict[str, tuple[int, ...]], outputs: list[str]) -> tuple[bytes, str]:
    """Return (the ONNX model, how) of a batch-1 TensorFlow concrete function, exported by tf2onnx.

    ``function`` is :attr:`edge_kit.compiler.sources.Graph.function` (named inputs, a dict of named
    outputs); the ONNX model keeps those names.

    Raises:
        CompileError: tf2onnx failed, the export lost an input or output name, or ONNX Runtime cannot
            load it (tf2onnx passes a TensorFlow op it cannot convert, such as ``ReadFile``, through
            as is; loaded in a child first, so a crash is this error too).
    """
    import tensorflow as tf
    import tf2onnx

    specs = [tf.TensorSpec([1, *shape], tf.float32, name=name) for name, shape in inputs.items()]
    try:
        model, _ = tf2onnx.convert.from_function(tf.function(lambda *args: function(*args), input_signature=specs),
                                                 input_signature=specs, opset=OPSET)
    except Exception as exc:  # noqa: BLE001 - tf2onnx raises assorted types
        raise CompileError(f"onnx-fp32: tf2onnx {tf2onnx.__version__} could not export the model "
                           f"({first_line(exc, 300)})") from None
    got_in, got_out = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    if set(got_in) != set(inputs) or set(got_out) != set(outputs):
        raise CompileError(f"onnx-fp32: tf2onnx's export names inputs {got_in} and outputs {got_out}, the model "
                           f"{list(inputs)} and {outputs}; export the model to ONNX yourself and compile the .onnx")
    data = model.SerializeToString()
    from device_agents.runtimes import get_runtime
    from edge_kit.compiler.analysis import probe_in_child

    try:
        probe_in_child(data, fmt="onnx")
        get_runtime("onnxruntime").interpreter(data)
    except (ValueError, RuntimeError) as exc:
        raise CompileError(f"onnx-fp32: ONNX Runtime cannot load the tf2onnx export "
                           f"({first_line(exc, 300)}); export the model to ONNX with ops "
                           "ONNX Runtime runs and compile the .onnx") from None
    return data, f"tf2onnx {tf2onnx.__version__} from_function export (opset {OPSET}) of the TensorFlow graph"


def refusal(source_kind: str, needs_calibration: bool, calib: Any) -> str | None:
    """Return why an ONNX variant cannot be built from this source and data (one line), or None."""
    if source_kind == "tflite":
        return NOT_FROM_TFLITE
    if source_kind != "onnx" and (why := exporter_unavailable()):
        return why
    if needs_calibration and calib is None:
        return "QDQ static int8 needs calibration data: pass --calib FILE.npz (a few hundred inputs)"
    return None


def pinned(data: bytes, inputs: dict[str, tuple[int, ...]], *, seconds: float | None = None) -> bytes:
    """Return the ONNX model with every input's shape written in (batch 1 + the sample shape), shapes inferred
    (onnx's shape inference with a deadline of ``seconds``: see :func:`_converting`).

    Raises:
        CompileError: the model cannot be parsed or its shapes not written.
    """
    onnx = _onnx()
    try:
        model = onnx.load_from_string(data)
        for value in model.graph.input:
            if value.name not in inputs:
                continue  # an initializer listed as an input (old exports)
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, (1, *inputs[value.name])):
                dim.Clear()
                dim.dim_value = size
        for value in model.graph.output:  # inferred again from the pinned inputs
            for dim in value.type.tensor_type.shape.dim:
                if not dim.HasField("dim_value"):
                    dim.Clear()
        del model.graph.value_info[:]  # exporters store intermediate shapes with dynamic dims; inference keeps them
        _constants_as_initializers(model.graph)  # Paddle exports hold weights in Constant nodes: the quantizer skips those
        try:
            with _converting("onnx's shape inference of onnx-fp32 (its input shapes pinned)", data, seconds):
                model = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 - ONNX Runtime infers shapes itself; the pinned inputs are what matter
            pass
        return model.SerializeToString()
    except Exception as exc:  # noqa: BLE001 - protobuf and onnx raise assorted types
        raise CompileError(f"onnx-fp32: could not pin the input shapes ({first_line(exc, 400)})") from None


def to_fp16(fp32: bytes, *, seconds: float | None = None) -> bytes:
    """Return ``fp32`` with float16 weights and activations, float32 inputs and outputs (:data:`FP16_METHOD`), the
    conversion with a deadline of ``seconds`` (see :func:`_converting`).

    Raises:
        CompileError: the converter failed (its first line).
    """
    onnx = _onnx()
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        with _converting("ONNX Runtime's float16 conversion of onnx-fp16", fp32, seconds):
            model = convert_float_to_float16(onnx.load_from_string(fp32), keep_io_types=True)
            _toposort(model.graph)  # the converter appends the input Casts last: ONNX Runtime runs that, onnx's
            # checker refuses it
            onnx.checker.check_model(model)
            return model.SerializeToString()
    except Exception as exc:  # noqa: BLE001 - the converter raises assorted types
        raise CompileError(f"onnx-fp16: float16 conversion failed ({first_line(exc, 400)})") from None


def _toposort(graph: Any) -> None:
    """Reorder ``graph.node`` so every node comes after the nodes producing its inputs (stable otherwise), the values
    its ``If``/``Loop``/``Scan`` bodies read from the graph by name included (:func:`outer_reads`).

    Raises:
        ValueError: the graph has a cycle, or a node reads a value nothing produces.
    """
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    reads = {id(n): [*n.input, *outer_reads(n)] for n in pending}
    while pending:
        ready = [n for n in pending if all(i in known for i in reads[id(n)])]
        if not ready:
            raise ValueError(f"node '{pending[0].name}' reads a value no node produces (or the graph has a cycle)")
        ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ids]
        for n in ready:
            ordered.append(n)
            known.update(n.output)
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


QDQ_OPSET = 13  # DequantizeLinear takes a per-channel axis from opset 13 on


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def to_int8(fp32: bytes, calib_x: dict[str, np.ndarray], calibrating: Callable[[], None] | None = None, *,
            seconds: float | None = None) -> tuple[bytes, str]:
    """Return ``fp32`` quantized to QDQ static int8, calibrated on ``calib_x`` (:data:`INT8_METHOD`;
    ``calibrating``: see :func:`calibration_reader`), and
    a note on the opset when it had to be raised: per-channel ``DequantizeLinear`` needs opset 13, so an
    older model is converted with ``onnx.version_converter`` first (the note says from which opset).
    The version converter, ``quant_pre_process`` and ``quantize_static`` each have a deadline of ``seconds`` (see
    :func:`_converting`); the calibration inside ``quantize_static`` its own (``calibrating``'s), that clock standing
    still meanwhile.

    Raises:
        CompileError: pre-processing or quantization failed (its first line).
    """
    import onnxruntime as ort
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process


    onnx = _onnx()
    note = ""
    model = onnx.load_from_string(fp32)
    if (old := _opset(model)) < QDQ_OPSET:
        try:
            with _converting(f"onnx's version converter on onnx-int8 (opset {old} to {QDQ_OPSET})", fp32, seconds):
                fp32 = onnx.version_converter.convert_version(model, QDQ_OPSET).SerializeToString()
        except Exception as exc:  # noqa: BLE001 - the converter raises assorted types
            raise CompileError(f"onnx-int8: the model's opset {old} is below the {QDQ_OPSET} per-channel QDQ needs, and "
                               f"onnx's version converter failed ({first_line(exc, 300)}); "
                               f"export the model with opset {QDQ_OPSET} or later") from None
        note = f"; opset raised from {old} to {QDQ_OPSET} by onnx.version_converter first"
    with tempfile.TemporaryDirectory(prefix="edgekit-ort-q-") as tmp:
        src, pre, out = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        ort.set_default_logger_severity(3)  # its optimiser lists every unused initializer on stderr
        first = None
        try:
            # shapes are pinned: onnx's inference suffices (symbolic inference would need sympy). The graph
            # optimisation (Conv+BatchNorm fusion...) makes the int8 model faster; should its result not
            # quantize into a model ONNX Runtime loads, the quantization runs again without it, and says so.
            for skip in (False, True):
                try:
                    optimised = "without" if skip else "with"
                    with _converting(f"ONNX Runtime's quant_pre_process of onnx-int8 ({optimised} graph optimisation)",
                                     fp32, seconds):
                        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, skip_optimization=skip)
                    with _converting("ONNX Runtime's quantize_static of onnx-int8", fp32, seconds):
                        quantize_static(str(pre), str(out), calibration_reader(calib_x, calibrating),
                                        quant_format=QuantFormat.QDQ, per_channel=True,
                                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
                    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])  # the device must load it
                    break
                except Exception as exc:  # noqa: BLE001 - the quantizer and ONNX Runtime raise assorted types
                    if skip:
                        raise
                    first = first_line(exc, 200)
            if first is not None:
                note += f"; quant_pre_process's graph optimisation skipped (with it: {first})"
        except Exception as exc:  # noqa: BLE001 - the quantizer and ONNX Runtime raise assorted types
            raise CompileError(f"onnx-int8: ONNX Runtime quantization failed ({first_line(exc, 600)})") from None
        finally:
            ort.set_default_logger_severity(2)
        return out.read_bytes(), note


def build(variant: str, data: bytes, inputs: dict[str, tuple[int, ...]],
          calib_x: dict[str, np.ndarray] | None, calibrating: Callable[[], None] | None = None, *,
          fp32: bytes | None = None, seconds: float | None = None) -> tuple[bytes, str]:
    """Return (the ONNX artifact, how it was made) for ``onnx-fp32``, ``onnx-fp16`` or ``onnx-int8``.

    ``data`` is the ONNX source's bytes, ``inputs`` its sample shapes (batch dropped); ``calibrating``: see
    :func:`calibration_reader`; ``fp32``: ``data`` already pinned (:func:`pinned`; an ONNX source's, made in a
    child at load), else it is pinned here; ``seconds``: each conversion step's deadline (see :func:`_converting`).

    Raises:
        CompileError: a step failed, or ``variant`` is not an ONNX variant.
    """
    fp32 = pinned(data, inputs, seconds=seconds) if fp32 is None else fp32
    if variant == "onnx-fp32":
        return fp32, "the ONNX source with its input shapes pinned (batch 1), onnx shape inference"
    if variant == "onnx-fp16":
        return to_fp16(fp32, seconds=seconds), FP16_METHOD
    if variant == "onnx-int8":
        if calib_x is None:
            raise CompileError("onnx-int8: needs --calib")
        data, note = to_int8(fp32, calib_x, calibrating, seconds=seconds)
        return data, INT8_METHOD + note
    raise CompileError(f"{variant}: not an ONNX variant")


def _shape_of(value: Any) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]


def analyse_onnx(data: bytes) -> ModelStats:
    """Return the :class:`~edge_kit.compiler.analysis.ModelStats` of an ONNX artifact, read from its graph.

    Op histogram: the node types of the graph and of its subgraphs (``If`` branches, ``Loop`` and ``Scan``
    bodies, each counted once, at any depth; ``QuantizeLinear``/``DequantizeLinear`` included in a QDQ model). Weights: the initializers feeding MAC ops (``Conv``, ``ConvTranspose``, ``Gemm``,
    ``MatMul``), through a ``DequantizeLinear`` in a QDQ model. MACs: per MAC op, output elements x
    the weight's reduction size (input channels / group x kernel), from the inferred shapes; an op
    whose shapes inference cannot give is not counted; an op in a ``Loop`` or ``Scan`` body once, not per iteration. Inputs and outputs: as the agent's
    ``onnxruntime`` runtime names them (loading the model also proves it runs).

    Raises:
        ValueError: not an ONNX model ONNX Runtime loads.
    """
    onnx = _onnx()
    from onnx import numpy_helper

    from device_agents.inference import ports
    from device_agents.runtimes import get_runtime

    model = onnx.shape_inference.infer_shapes(onnx.load_from_string(data))
    graphs = graphs_of(model.graph)  # If branches, Loop and Scan bodies hold nodes too (their bodies counted once)
    nodes = [n for g in graphs for n in g.node]
    inits = {i.name: i for g in graphs for i in g.initializer}
    shapes = {v.name: _shape_of(v) for g in graphs for v in [*g.value_info, *g.input, *g.output]}
    shapes.update({name: list(i.dims) for name, i in inits.items()})
    dequant = {n.output[0]: n.input[0] for n in nodes if n.op_type == "DequantizeLinear"}
    histogram = Counter(n.op_type for n in nodes)
    macs = macs_nonzero = weights = weights_nonzero = 0
    by_dtype: Counter[str] = Counter()  # weight elements of MAC ops by stored type: the artifact's precision
    for node in nodes:
        if node.op_type not in MAC_OPS or len(node.input) < 2:
            continue
        wname = dequant.get(node.input[1], node.input[1])
        if wname not in inits:
            continue  # activations x activations (attention MatMul): not a weight op
        w = numpy_helper.to_array(inits[wname])
        by_dtype[w.dtype.name] += int(w.size)
        weights += int(w.size)
        nz = int(np.count_nonzero(w))
        weights_nonzero += nz
        out = shapes.get(node.output[0], [])
        if not out or any(d <= 0 for d in out):
            continue
        if node.op_type == "Conv":
            per_out = int(np.prod(w.shape[1:]))  # Cin/group x kernel, per output element
        elif node.op_type == "ConvTranspose":  # weight [Cin, Cout/group, k...]: each input element feeds Cout/group x kernel
            out = shapes.get(node.input[0], [])
            per_out = int(np.prod(w.shape[1:]))
            if not out or any(d <= 0 for d in out):
                continue
        else:  # Gemm / MatMul: weight [K, N] (or [N, K] with transB)
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            per_out = int(w.shape[-1] if trans_b else w.shape[-2]) if w.ndim >= 2 else int(w.size)
        elements = int(np.prod(out))
        macs += elements * per_out
        macs_nonzero += int(round(elements * per_out * (nz / w.size if w.size else 0.0)))
    stored = by_dtype.most_common(1)[0][0] if by_dtype else "float32"
    precision = "int8" if stored in ("int8", "uint8") else stored if stored in ("float16", "float32") else "float32"
    interp = get_runtime("onnxruntime").interpreter(data)
    ins, outs = ports(interp)
    inputs = [{**p.record(), "shape_signature": list(p.shape)} for p in ins]
    outputs = [{**p.record(), "shape_signature": list(p.shape)} for p in outs]
    return ModelStats(bytes=len(data), gzip_bytes=gzip_size(data),
                      precision=precision, ops=[], tensors={}, op_histogram=dict(sorted(histogram.items())),
                      macs=macs, macs_nonzero=macs_nonzero, weights=weights, weights_nonzero=weights_nonzero,
                      inputs=inputs, outputs=outputs, methods=ONNX_METHODS)
