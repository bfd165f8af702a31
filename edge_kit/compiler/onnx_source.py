"""ONNX sources: pin the shapes, convert once to a float32 ``.tflite`` with onnx2tf, and measure the conversion.

Every LiteRT variant of an ONNX model is made from one float32 ``.tflite`` (then the float
``.tflite`` route of :mod:`edge_kit.compiler.pipeline`: ai-edge-quantizer makes fp16, dynamic-int8
and int8, ``edgetpu_compiler`` the Edge TPU model). The steps, each checked:

1. :func:`load_onnx` reads the file with ``onnx``, checks it, opens it with ONNX Runtime (which
   proves it runs), and takes its named inputs (one of another numeric type than float32, token ids,
   takes float32 and is cast inside the model: :func:`float_inputs`); the batch is pinned to 1, any other dynamic
   dimension must be pinned with ``--input-shape NAME=1x3x224x224`` (the ONNX layout).
2. :func:`convert` writes those shapes into the graph (onnx's shape API, shape inference, onnxsim),
   gives node names TensorFlow accepts (Paddle exports use ``@``), the inputs and outputs
   placeholder names, and ``Constant`` nodes the form of initializers, then runs onnx2tf in a child
   process (its own working folder, a timeout, its output captured) with every input kept in its
   ONNX layout (``-kat``): the data files that feed ONNX Runtime feed the ``.tflite`` unchanged.
   The ``.tflite`` gets the ONNX input and output names back in its signature, and an output
   onnx2tf laid out channels-last a TRANSPOSE back to the ONNX shape. onnx2tf never quantizes here,
   and the sample images it would download for 3-channel NHWC inputs are written into its working
   folder first (no network).
3. :func:`conversion_fidelity` runs the ONNX model with ONNX Runtime (CPUExecutionProvider) and the
   ``.tflite`` with the LiteRT interpreter the devices use on the same inputs, one sample at a
   time, each in a child process with a deadline, and returns per-output SNR, cosine and errors
   (:func:`device_agents.inference.fidelity`).
"""

from __future__ import annotations

import importlib.metadata
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from edge_kit.compiler.data import MIN_RANDOM_KEPT, finite_samples
from edge_kit.errors import CompileError, InputError

CONVERTER = "onnx2tf"
CONVERT_TIMEOUT_S = 1800  # a large detector takes minutes on two cores; a hung converter must not block forever
CONVERSION_WARN_SNR_DB = 40.0  # a float32 conversion that computes the same thing measures 60-140 dB
CONVERSION_REFUSE_SNR_DB = 0.0  # error energy above the signal's: the converted model computes something else
FIDELITY_SAMPLES = 64  # inputs the conversion is checked on (the first of --eval, else --calib)
GRAPH_TIMEOUT_S = 600.0  # onnx's checker, shape inference and onnxsim take seconds on a large detector
_SAFE_NODE = re.compile(r"[^A-Za-z0-9_./-]")  # TensorFlow refuses '@', ':' and the like in op names
# onnx2tf reads this file from its working folder for 3-channel NHWC inputs, else downloads it
_ONNX2TF_SAMPLES = "calibration_image_sample_data_20x128x128x3_float32.npy"


def version(package: str) -> str | None:
    """Return the installed version of ``package``, or None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise InputError("ONNX sources need the onnx package: pip install 'edge-kit[onnx]' (see docs/compile.md)") from None
    return onnx


def _session(data: bytes) -> Any:
    """Return an ONNX Runtime CPU session on the model bytes. Raises ImportError, or ORT's error."""
    import onnxruntime as ort

    from device_agents.runtimes.onnxruntime import precise_int8

    options = precise_int8(ort.SessionOptions())  # a source quantized already: its own answers, not AVX2's
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])


def _in_child(path: Path, what: str, fn: Any, *args: Any) -> Any:
    """Return ``fn(*args)`` computed in a child of :class:`device_agents.smoke.SmokePool` (``fn`` raises
    :class:`~device_agents.errors.SmokeFailed` for what it refuses): onnx's checker, its shape inference
    and onnxsim are native code reading a file the user did not necessarily make, and onnxsim runs
    the model's constant parts with ONNX Runtime.

    Raises:
        InputError: the child crashed, was killed (out of memory) or did not finish within
            :data:`GRAPH_TIMEOUT_S` (``what`` named: a damaged or hostile file).
        SmokeFailed: ``fn`` refused (the caller words it).
    """
    from device_agents.errors import SmokeCrashed
    from device_agents.smoke import SmokePool

    try:
        return SmokePool().run(fn, *args, timeout=GRAPH_TIMEOUT_S, what=what)
    except SmokeCrashed as exc:
        raise InputError(f"{path}: {what} {exc.how} on the model: a damaged or hostile file") from None


def _checked(data: bytes) -> None:
    """Run onnx's checker on the model's bytes (in a child: :func:`_in_child`). Raises SmokeFailed: its first line."""
    from device_agents.errors import SmokeFailed

    try:
        _onnx().checker.check_model(data)
    except Exception as exc:  # noqa: BLE001 - ValidationError, or a protobuf error on a damaged file
        raise SmokeFailed(_first_line(exc)) from None


def _pinned(data: bytes, inputs: dict[str, tuple[int, ...]]) -> bytes:
    """Return :func:`edge_kit.compiler.onnx_variants.pinned` (in a child: :func:`_in_child`). Raises SmokeFailed: why not."""
    from device_agents.errors import SmokeFailed
    from edge_kit.compiler.onnx_variants import pinned

    try:
        return pinned(data, inputs)
    except CompileError as exc:
        raise SmokeFailed(str(exc)) from None


def _prepared(data: bytes, inputs: dict[str, tuple[int, ...]]
              ) -> tuple[bytes, dict[str, str], dict[str, str], dict[str, tuple[int, ...]]]:
    """Return :func:`prepared_model` (in a child: :func:`_in_child`). Raises SmokeFailed: its first line."""
    from device_agents.errors import SmokeFailed

    try:
        return prepared_model(data, inputs)
    except Exception as exc:  # noqa: BLE001 - protobuf and onnx raise assorted types
        raise SmokeFailed(_first_line(exc)) from None


def _dims(value_info: Any) -> list[int | None]:
    """Return the declared dimensions of a graph input or output, None where dynamic."""
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in shape.dim]


class LoadedOnnx(NamedTuple):
    """What :func:`load_onnx` returns."""

    data: bytes  # the model every later step compiles: external data read in, integer inputs cast inside
    inputs: dict[str, tuple[int, ...]]  # input name -> shape of one sample in the ONNX layout
    outputs: list[str]
    pinned: bytes | str  # ``data`` with those shapes pinned, or why it could not be
    types: dict[str, str]  # input name -> numpy name of its declared type, for each input not float32
    sha256: str  # of the user's files as read, before any cast: the file's own, or with external data sha256_sums'
    files: dict[str, str]  # with external data: {name in the model's folder: sha256} of the file and each data file


def load_onnx(path: Path, pinned: dict[str, tuple[int, ...]]) -> LoadedOnnx:
    """Read and check an ONNX model; ``pinned`` holds ``--input-shape`` sample shapes (batch dropped).

    Tensors kept in external-data files beside the model (``onnx.save(..., save_as_external_data=True)``)
    are read into the returned bytes, so every later step has one self-contained model; a location
    outside the model's folder (absolute, ``..``, a link leading out) is refused and never read.

    Returns:
        :class:`LoadedOnnx`: the model's bytes, external data included, each input not float32 taking float32
        and cast inside (:func:`float_inputs`); {input name: shape of one sample in the ONNX layout}; output names;
        the model with those shapes pinned, as :func:`edge_kit.compiler.onnx_variants.pinned` makes it in a child,
        or why it could not be (every later step takes it from here, so onnx's shape inference never runs on the
        file in this process); {input name: numpy name of its type} for each input not float32; the sha256 of
        the model as the user gave it, before the casts: the file's own, what ``sha256sum`` prints, or for a model
        with external data that of ``sha256sum MODEL DATA...`` run in its folder (the model, then its data files in
        name order: :func:`~edge_kit.fsutil.sha256_sums`), which covers the weights; and then {file name: sha256}
        of those files (else empty).

    Raises:
        InputError: not an ONNX model (or truncated), metadata of edge-kit's own artifacts
            (``edgekit.*`` keys), external data outside the model's folder or
            missing, a graph :func:`_check_graph` refuses, a scalar (0-d) input, an input that is not a number
            (a string: :func:`~edge_kit.compiler.sources.check_input_dtype`),
            a batch fixed above 1, an input with a dynamic dimension besides the batch, a pin that
            names no input or does not fit the declared shape, an input too large for one sample
            (:func:`~edge_kit.compiler.sources.check_sample_sizes`), or a model that crashes ONNX
            Runtime or that it cannot open; onnx's checker and shape inference run in a child process
            too (:func:`_in_child`): one that crashes or hangs them is refused the same way.
    """
    onnx = _onnx()
    data = Path(path).read_bytes()
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends for a bad file
        raise InputError(f"{path}: not an ONNX model ({_first_line(exc)}); export it again (torch.onnx.export, paddle2onnx)") from None
    if not model.graph.node or not model.opset_import:
        raise InputError(f"{path}: not an ONNX model (no graph nodes or opset); export it again (torch.onnx.export, paddle2onnx)")
    from device_agents.formats import META_PREFIX

    ours = sorted(p.key for p in model.metadata_props if p.key.startswith(META_PREFIX))
    if ours:  # they tell devices how to run an artifact (edgekit.runtime=tensorrt): never taken from a source
        raise InputError(f"{path}: the model carries metadata '{ours[0]}', which tells devices how to run an edge-kit "
                         "artifact and only edgekit compile writes it; give the model exported by its framework, "
                         "not a compiled artifact or a file edited to look like one")
    files: dict[str, str] = {}
    if _external_tensors(model):
        model, names = _with_external_data(Path(path), model)
        from edge_kit.fsutil import sha256_sums

        try:
            real = Path(path).resolve()  # the folder its data was read from (the model may be a link to it)
            digest, files = sha256_sums(real.parent, [real.name, *(n for n in names if n != real.name)])
        except OSError as exc:
            raise InputError(f"{path}: cannot read its external data again to hash it ({exc.strerror or exc})") from None
        try:
            data = model.SerializeToString()
        except Exception as exc:  # noqa: BLE001 - protobuf refuses a message above 2 GB
            raise InputError(f"{path}: the model with its external data does not fit in one ONNX file "
                             f"({_first_line(exc)}); edge-kit compiles models below 2 GB") from None
    from device_agents.errors import SmokeFailed

    try:
        _in_child(Path(path), "onnx's checker", _checked, data)
    except SmokeFailed as exc:
        raise InputError(f"{path}: not a valid ONNX model ({exc})") from None
    _check_graph(Path(path), model)
    initializers = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    names = [i.name for i in graph_inputs]
    extra = sorted(set(pinned) - set(names))
    if extra:
        raise InputError(f"{path}: --input-shape names '{extra[0]}', which is not an input (inputs: {', '.join(names)})")
    inputs: dict[str, tuple[int, ...]] = {}
    types: dict[str, str] = {}
    for value in graph_inputs:
        if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            from edge_kit.compiler.sources import check_input_dtype

            types[value.name] = _numpy_name(value.type.tensor_type.elem_type)
            check_input_dtype(Path(path), value.name, types[value.name])  # a string: refused as a Keras one is
        dims = _dims(value)
        declared = tuple(-1 if d is None else d for d in dims)
        if dims and dims[0] is not None and dims[0] != 1:
            raise InputError(f"{path}: input '{value.name}' has a fixed batch of {dims[0]} {declared}; devices run one "
                             "sample at a time: export the model with batch 1 or a dynamic batch")
        if value.name in pinned:
            given = pinned[value.name]
            if len(given) != len(dims) - 1 or any(d is not None and d != g for d, g in zip(dims[1:], given)):
                raise InputError(f"{path}: --input-shape {value.name}=1x{'x'.join(map(str, given))} does not fit the "
                                 f"declared shape {declared} of input '{value.name}'")
            inputs[value.name] = given
            continue
        if not dims:
            raise InputError(f"{path}: input '{value.name}' has no dimensions (a scalar, or no declared shape); "
                             "devices feed one sample with a batch axis: export the model with this input "
                             "shaped [1, ...] (or [N, ...])")
        if any(d is None for d in dims[1:]):
            from edge_kit.compiler.sources import pin_hint

            raise InputError(f"{path}: input '{value.name}' has shape {declared} with a dynamic dimension besides the batch; "
                             f"pin it with --input-shape {value.name}={pin_hint(dims[1:])} (the ONNX layout, e.g. NCHW)")
        inputs[value.name] = tuple(int(d) for d in dims[1:])  # type: ignore[arg-type]
    from edge_kit.compiler.sources import check_sample_sizes

    check_sample_sizes(path, inputs)  # before anything runs the model on a sample of that size
    from edge_kit.fsutil import sha256_bytes

    if not files:
        digest = sha256_bytes(data)  # the user's model, not the casts edge-kit adds: what the manifest names it by
    if types:  # float32 in, cast inside to the type the model takes, as a Keras or SavedModel source is compiled
        data = float_inputs(model, types).SerializeToString()
    from edge_kit.compiler.analysis import probe_in_child

    fixed: bytes | str
    try:  # run at the shapes every later step runs it at (a dynamic dimension leaves the child no shape to run)
        probed = fixed = _in_child(Path(path), "onnx's shape inference", _pinned, data, inputs)
    except SmokeFailed as exc:
        probed, fixed = data, str(exc)  # ONNX Runtime's load says what is wrong, below; else each onnx-* variant
    try:
        probe_in_child(probed, fmt="onnx")  # a file that crashes ONNX Runtime crashes a child, never this process
    except ValueError as exc:
        raise InputError(f"{path}: not a loadable ONNX model ({exc})") from None
    try:
        _session(data)
    except ImportError:
        raise InputError("ONNX sources need onnxruntime: pip install 'edge-kit[onnx]' (see docs/compile.md)") from None
    except Exception as exc:  # noqa: BLE001 - ORT raises its own Fail / InvalidGraph / NotImplemented types
        from device_agents.runtimes.onnxruntime import ort_error

        raise InputError(f"{path}: ONNX Runtime cannot load the model ({ort_error(exc)})") from None
    return LoadedOnnx(data, inputs, [o.name for o in model.graph.output], fixed, types, digest, files)


class Unconvertible(InputError):
    """onnx2tf cannot convert the model (an op it has no conversion for, or fails on: the message names it). No
    LiteRT variant can be made; the ONNX Runtime ones need no conversion (:func:`edge_kit.compiler.pipeline.compile_model`
    builds them alone)."""


CAST_SUFFIX = "__edgekit_cast"  # the name of what the Cast of a non-float32 input gives the graph (a number after
# it when the model already has a value of that name)


def _numpy_name(elem_type: int) -> str:
    """Return the numpy name of an ONNX tensor type (``int64``, ``bool``, ``float64``; ``string`` for a string)."""
    from onnx import TensorProto, helper

    if elem_type == TensorProto.STRING:
        return "string"
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):  # a type numpy has no name for: refused by its ONNX name
        return TensorProto.DataType.Name(elem_type).lower()


def float_inputs(model: Any, types: dict[str, str]) -> Any:
    """Return ``model`` (changed in place) taking float32 at each input named in ``types``, a ``Cast`` to the input's
    own ONNX type first in the graph, which the input's readers now read: edge-kit feeds float32 data files, and
    Keras and SavedModel sources are compiled the same way (token ids sent as floats, exact up to 2^24)."""
    from onnx import TensorProto, helper

    graph = model.graph
    casts, used = [], _names(graph)
    for value in graph.input:
        if value.name not in types:
            continue
        cast, n = value.name + CAST_SUFFIX, 1
        while cast in used:  # a name the model gives a value of its own: the cast would be read in its place
            cast, n = f"{value.name}{CAST_SUFFIX}{n}", n + 1
        used.add(cast)
        _read_as(graph, value.name, cast)  # If/Loop/Scan bodies read it by name too
        for out in graph.output:  # an output that is the input itself (refused earlier): kept consistent anyway
            if out.name == value.name:
                out.name = cast
        casts.append(helper.make_node("Cast", [value.name], [cast], to=value.type.tensor_type.elem_type, name=cast))
        value.type.tensor_type.elem_type = TensorProto.FLOAT
    if casts:  # first: ONNX wants a graph's nodes in topological order
        nodes = [*casts, *graph.node]
        del graph.node[:]
        graph.node.extend(nodes)
    return model


SHAPE_ONLY_OPS = ("Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Transpose", "Expand", "Tile", "Slice",
                  "Split", "Gather")  # move ids about, never change one (a Gather whose data, input 0, is the ids)
ID_CASTS = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")  # a model's own Cast of ids to
# one of these keeps every id a table of its range indexes
MAX_SHAPE_HOPS = 16  # ops followed from the input's cast to a Gather (a loop in a bad graph ends)


def id_bounds(data: bytes, types: dict[str, str]) -> dict[str, tuple[int, str]]:
    """Return, for an integer input of the model ``data`` (as :func:`float_inputs` made it) that indexes a stored
    table (a ``Gather`` whose data is an initializer or a ``Constant``: an embedding), ``(rows of the smallest such
    table, what it is)``: the ids it takes are ``0..rows-1``. The ids are followed from the input's cast as
    :func:`id_flow` follows them (shape-only ops, the model's own casts, ``Concat``, into and out of ``If``/``Loop``/
    ``Scan`` bodies). Inputs indexing no stored table are left out."""
    model = _onnx().load_from_string(data)
    out: dict[str, tuple[int, str]] = {}
    for node in model.graph.node:  # float_inputs' own casts, first in the graph: the only readers of the inputs
        if node.op_type != "Cast" or not node.input or node.input[0] not in types or not node.output:
            continue
        name = node.input[0]
        for _value, _depth, reads in id_flow(model, node.output[0]):
            for reader, at, tables in reads:
                if reader.op_type == "Gather" and reader.domain in ("", "ai.onnx") and at == 1 \
                        and reader.input[0] in tables:
                    axis = next((a.i for a in reader.attribute if a.name == "axis"), 0)
                    dims = tables[reader.input[0]]
                    if -len(dims) <= axis < len(dims) and dims[axis] >= 1:
                        rows = int(dims[axis])
                        if name not in out or rows < out[name][0]:
                            out[name] = (rows, f"the {rows} rows of Gather table '{reader.input[0]}'")
    return out


def id_flow(model: Any, start: str) -> Any:
    """Yield ``(value, depth, reads)`` for each value of the ONNX ``model`` that holds the ids the top-level value
    ``start`` holds (``start`` first), each once per graph it is visible in: ``depth`` is the number of subgraphs
    around that graph (0: the top-level graph), ``reads`` a list of ``(node, input position, the stored tensors the
    node's graph sees: {name: dims})`` for the nodes of that graph reading it.

    The ids are followed, up to :data:`MAX_SHAPE_HOPS` ops from ``start``, through what moves ids without changing
    one: :data:`SHAPE_ONLY_OPS` reading them as their data (input 0; PyTorch exports ``ids.view(-1)`` or
    ``unsqueeze`` before an embedding), the model's own ``Cast`` to an integer type (:data:`ID_CASTS`: int32 ids
    cast to int64), a ``Concat`` of them with other ids; into the ``If``/``Loop``/``Scan`` bodies (at any depth)
    that read them by the outer name (unless the body defines that name itself, :func:`_defines`) or take them as a
    ``Loop``'s loop-carried value or a ``Scan``'s state or scanned sequence (:func:`_body_input`); and out of a body
    again through its outputs: an ``If`` branch's output k is the ``If``'s output k, a ``Loop`` body's output k
    (after its condition) the ``Loop``'s output k-1 (its final value, or the values of every iteration stacked), a
    ``Scan`` body's output k the ``Scan``'s output k."""
    scan8 = any(o.domain in ("", "ai.onnx") and o.version < 9 for o in model.opset_import)  # Scan-8: sequence_lens first
    seen: set[tuple[int, str]] = set()
    # a value, the graph it is read in, the stored tensors around that graph, the path down to it: ((owner node,
    # the graph holding the owner, the stored tensors that graph sees), ...) from the top level
    frontier: list[tuple[str, Any, dict, tuple]] = [(start, model.graph, {}, ())]
    for _ in range(MAX_SHAPE_HOPS + 1):
        ahead: list[tuple[str, Any, dict, tuple]] = []
        for value, top, around, top_path in frontier:
            for scope, outer, path in _scopes_seeing(top, value, around, top_path):
                if (id(scope), value) in seen:
                    continue
                seen.add((id(scope), value))
                tables = _tables(scope, outer)
                reads = [(node, at, tables) for node in scope.node for at, name in enumerate(node.input) if name == value]
                yield value, len(path), reads
                for reader, at, _ in reads:
                    kind = reader.op_type if reader.domain in ("", "ai.onnx") else ""
                    if kind == "Concat" or at == 0 and (kind in SHAPE_ONLY_OPS or kind == "Cast" and _cast_keeps_ids(reader)):
                        ahead.extend((o, scope, outer, path) for o in reader.output if o)
                    elif kind in ("Loop", "Scan") and (body := _body_input(reader, at, scan8)) is not None:
                        ahead.append((body[1], body[0], tables, (*path, (reader, scope, outer))))
                if path:  # a body's output leaving it: the owner's output in the enclosing graph
                    owner, holder, holder_outer = path[-1]
                    for k, given in enumerate(scope.output):
                        if given.name == value and (leaves := _leaving(owner, k)):
                            ahead.append((leaves, holder, holder_outer, path[:-1]))
        frontier = ahead


def _scopes_seeing(graph: Any, name: str, outer: dict, path: tuple) -> Any:
    """Yield ``(graph, outer, path)`` and, for every subgraph of its nodes (``GRAPH`` and ``GRAPHS`` attributes, at any
    depth) that reads the value ``name`` from the outer scope (defines no value of that name, :func:`_defines`),
    ``(subgraph, the stored tensors around it, its path)``; ``path`` as in :func:`id_flow`."""
    from onnx import AttributeProto

    yield graph, outer, path
    tables = None
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == AttributeProto.GRAPH else \
                    list(attr.graphs) if attr.type == AttributeProto.GRAPHS else []:
                if not _defines(sub, name):
                    tables = _tables(graph, outer) if tables is None else tables
                    yield from _scopes_seeing(sub, name, tables, (*path, (node, graph, outer)))


def _leaving(owner: Any, k: int) -> str | None:
    """Return the name of the output of the ``If``/``Loop``/``Scan`` node ``owner`` that its subgraph's output ``k``
    becomes (see :func:`id_flow`); None for a ``Loop`` body's condition, another op, or an output the node leaves
    out (empty name, or fewer outputs declared)."""
    at = {"If": k, "Scan": k, "Loop": k - 1}.get(owner.op_type if owner.domain in ("", "ai.onnx") else "")
    return owner.output[at] or None if at is not None and 0 <= at < len(owner.output) else None


def _body_input(node: Any, at: int, scan8: bool = False) -> tuple[Any, str] | None:
    """Return ``(body graph, input name)`` under which the body of the ``Loop`` or ``Scan`` ``node`` reads the value
    passed as the node's input ``at``: a Loop's inputs 2.. (its loop-carried values) are its body's inputs 2.. (after
    the iteration number and condition); a Scan's inputs (its state variables, then the sequences it scans, a slice
    of each per iteration) are its body's inputs of the same position, one before it with ``scan8`` (a model of opset
    8, whose Scan takes ``sequence_lens`` first). None for a Loop's trip count or condition, Scan-8's
    ``sequence_lens``, or a body declaring fewer inputs (a malformed graph)."""
    from onnx import AttributeProto

    body = next((a.g for a in node.attribute if a.name == "body" and a.type == AttributeProto.GRAPH), None)
    if scan8 and node.op_type == "Scan":
        at -= 1
    if body is None or node.op_type == "Loop" and at < 2 or not 0 <= at < len(body.input):
        return None
    return body, body.input[at].name


def _cast_keeps_ids(node: Any) -> bool:
    """Return whether the ``Cast`` ``node`` casts to a type in :data:`ID_CASTS` (one that keeps a table's ids)."""
    to = next((a.i for a in node.attribute if a.name == "to"), None)
    return to is not None and _numpy_name(to) in ID_CASTS


def _tables(graph: Any, outer: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Return {name: dims} of the stored tensors ``graph`` sees: ``outer``'s (an enclosing graph's), less those a value
    of its own hides, and its own initializers and ``Constant`` nodes' tensors."""
    own = {k: v for k, v in outer.items() if not _defines(graph, k)}
    own.update({i.name: tuple(i.dims) for i in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant" and node.output and len(node.attribute) == 1 and node.attribute[0].name == "value":
            own[node.output[0]] = tuple(node.attribute[0].t.dims)
    return own


MAX_ONNX_BYTES = 2**31  # protobuf's limit on one message: an ONNX file's weights included


def _external_tensors(model: Any) -> list[Any]:
    """Return the model's tensors whose data is kept in an external file (initializers and attributes, subgraphs too)."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return [t for t in _get_all_tensors(model) if uses_external_data(t)]


def _with_external_data(path: Path, model: Any) -> tuple[Any, list[str]]:
    """Return ``model`` with the data of its external tensors read in from files in ``path``'s folder, and the names
    of those files (relative to the folder, normalised, each once, in name order).

    Every location is checked before anything is opened: relative, inside the folder once links
    are resolved, a regular file, and long enough for the offset and length recorded; and the bytes
    the tensors claim (one file may be claimed by any number of them) must add up to less than one
    ONNX file holds (:data:`MAX_ONNX_BYTES`), before any is read into memory.

    Raises:
        InputError: a location outside the folder, a missing or short file (the tensor and location
            named), or claims adding up to :data:`MAX_ONNX_BYTES` or more.
    """
    from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_model

    folder = path.resolve().parent
    claimed, names = 0, set()
    for tensor in _external_tensors(model):
        info = ExternalDataInfo(tensor)
        location = str(info.location)
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or ".." in Path(location).parts or folder not in target.parents:
            raise InputError(f"{path}: tensor '{tensor.name}' keeps its data in '{location}', outside the model's "
                             "folder; edge-kit reads external data only from files beside the model (save it again "
                             "with onnx.save(model, path, save_as_external_data=True, location='<file name>'))")
        if not target.is_file():
            raise InputError(f"{path}: tensor '{tensor.name}' keeps its data in '{location}', which is not a file "
                             f"beside the model; copy that file next to {path.name}")
        size, end = target.stat().st_size, int(info.offset or 0) + int(info.length or 0)
        if end > size:
            raise InputError(f"{path}: tensor '{tensor.name}' needs bytes up to {end} of '{location}', which has "
                             f"{size}; the external data file is truncated or belongs to another model")
        claimed += int(info.length) if info.length else size - int(info.offset or 0)
        names.add(os.path.normpath(location))
    if claimed >= MAX_ONNX_BYTES:
        raise InputError(f"{path}: its tensors' external data add up to {claimed:,} bytes, more than one ONNX file "
                         "holds (2 GB); edge-kit compiles models below 2 GB")
    try:
        load_external_data_for_model(model, str(folder))
    except Exception as exc:  # noqa: BLE001 - onnx raises ValueError / OSError for a bad external file
        raise InputError(f"{path}: cannot read its external data ({_first_line(exc)})") from None
    return model, sorted(names)


def _check_graph(path: Path, model: Any) -> None:
    """Refuse a graph the devices cannot run one sample at a time.

    Raises:
        InputError: no inputs (every graph input is an initializer), no outputs, an output listed
            twice, an output that is a stored constant or also an input, a scalar (0-d) output, or an
            initializer holding NaN, in the graph or an If/Loop/Scan body (named, with its first bad index).
    """
    from onnx import TensorProto as model_type
    from onnx import numpy_helper

    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initializers]
    if not inputs:
        raise InputError(f"{path}: the model has no inputs (every graph input is a stored constant), so it computes "
                         "the same output for every request; export it with its real inputs")
    if not graph.output:
        raise InputError(f"{path}: the model declares no outputs; export it again with its outputs")
    names = [value.name for value in graph.output]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"{path}: output '{twice[0]}' is listed twice; export the model with each output once")
    for value in graph.output:
        if value.name in initializers:
            raise InputError(f"{path}: output '{value.name}' is a stored constant (an initializer), the same for every "
                             "input; remove it from the outputs (the application can keep the constant) and export again")
        if value.name in inputs:
            raise InputError(f"{path}: output '{value.name}' is also an input (passed through unchanged); remove it "
                             "from the outputs, or give it its own name with an Identity node, and export again")
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape") and not tensor_type.shape.dim:
            raise InputError(f"{path}: output '{value.name}' is a scalar (0-d); devices return one sample with a "
                             "batch axis: export it shaped [1, ...] (Unsqueeze or Reshape at the end)")
    floats = {model_type.FLOAT, model_type.FLOAT16, model_type.DOUBLE, model_type.BFLOAT16}
    for init in (i for g in graphs_of(graph) for i in g.initializer):  # If/Loop/Scan bodies store weights too
        if init.data_type not in floats:
            continue
        array = numpy_helper.to_array(init)
        bad = np.isnan(array)
        if bad.any():
            raise InputError(f"{path}: initializer '{init.name}' holds NaN at flat index {int(np.argmax(bad.ravel()))}, "
                             "so the model computes NaN; export it again from weights without NaN")


def _first_line(exc: BaseException) -> str:
    from edge_kit.errors import first_line

    return first_line(exc)


def _names(graph: Any) -> set[str]:
    """Return every value name ``graph`` and its subgraphs (at any depth, :func:`graphs_of`) define or read: inputs,
    outputs, initializers, node inputs and outputs, value infos."""
    names: set[str] = set()
    for g in graphs_of(graph):
        names |= {v.name for v in [*g.input, *g.output, *g.value_info]}
        names |= {i.name for i in g.initializer} | {i.values.name for i in g.sparse_initializer}
        for node in g.node:
            names.update(node.input, node.output)
    return names


def graphs_of(graph: Any) -> list[Any]:
    """Return ``graph`` and every subgraph of its nodes (``If`` branches, ``Loop`` and ``Scan`` bodies: ``GRAPH`` and
    ``GRAPHS`` attributes), at any depth, outer graphs before the graphs inside them."""
    from onnx import AttributeProto

    found = [graph]
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == AttributeProto.GRAPH else \
                    list(attr.graphs) if attr.type == AttributeProto.GRAPHS else []:
                found.extend(graphs_of(sub))
    return found


def outer_reads(node: Any) -> set[str]:
    """Return the names of the values the subgraphs of ``node`` (``If`` branches, ``Loop`` and ``Scan`` bodies, at any
    depth) read from the scope around ``node`` by name: read (as a node input or given back as an output) and not
    defined inside (as an input, initializer or node output). Empty for a node without subgraphs. ONNX counts these
    as the node's inputs when it orders a graph's nodes."""
    from onnx import AttributeProto

    names: set[str] = set()
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == AttributeProto.GRAPH else \
                list(attr.graphs) if attr.type == AttributeProto.GRAPHS else []:
            defined = {v.name for v in sub.input} | {i.name for i in sub.initializer}
            defined |= {i.values.name for i in sub.sparse_initializer} | {o for n in sub.node for o in n.output}
            read = {v.name for v in sub.output}
            for inner in sub.node:
                read.update(i for i in inner.input if i)
                read |= outer_reads(inner)
            names |= read - defined
    return names


def _defines(graph: Any, name: str) -> bool:
    """Return whether ``graph`` defines a value ``name`` of its own (an input, initializer or node output), which then
    hides an outer scope's value of that name from it and its subgraphs."""
    return (any(v.name == name for v in graph.input) or any(i.name == name for i in graph.initializer)
            or any(i.values.name == name for i in graph.sparse_initializer)
            or any(name in node.output for node in graph.node))


def _read_as(graph: Any, old: str, new: str) -> None:
    """Make every read of the value ``old`` in ``graph`` read ``new`` instead: node inputs, and in the subgraphs of its
    nodes (``If`` branches, ``Loop`` and ``Scan`` bodies: ``GRAPH`` and ``GRAPHS`` attributes, at any depth), which read
    an outer scope's values by name, their node inputs and outputs; a subgraph that defines ``old`` itself
    (:func:`_defines`) reads its own and is left as it is. Changes ``graph`` in place; returns nothing."""
    from onnx import AttributeProto

    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == AttributeProto.GRAPH else \
                list(attr.graphs) if attr.type == AttributeProto.GRAPHS else []
            for sub in subgraphs:
                if _defines(sub, old):
                    continue
                _read_as(sub, old, new)
                for value in sub.output:  # a branch may give back an outer value as it is
                    if value.name == old:
                        value.name = new


def _rename(graph: Any, old: str, new: str) -> None:
    """Rename the value ``old`` of ``graph`` (top level: where a node or the graph defines it) ``new``, and every read
    of it, in subgraphs too (:func:`_read_as`). Changes ``graph`` in place; returns nothing."""
    _read_as(graph, old, new)
    for node in graph.node:
        node.output[:] = [new if n == old else n for n in node.output]
    for value in [*graph.input, *graph.output]:
        if value.name == old:
            value.name = new


def prepared_model(data: bytes, inputs: dict[str, tuple[int, ...]]
                   ) -> tuple[bytes, dict[str, str], dict[str, str], dict[str, tuple[int, ...]]]:
    """Return the model ready for onnx2tf, {placeholder: ONNX name} for its inputs and for its outputs,
    and {ONNX output name: shape} as shape inference gives it for the pinned inputs (0 where unknown).

    Inputs get their batch-1 shapes written into the graph, outputs lose their declared dimensions
    (shape inference and onnxsim fill them in again from the pinned inputs), node names (in subgraphs too,
    :func:`graphs_of`) get only characters TensorFlow accepts (a node without one ``node_<k>``, ``k`` counted over
    every graph, outer first), inputs and outputs are renamed ``input_<i>`` / ``output_<i>`` so
    no ONNX name (``save_infer_model/scale_0.tmp_1``) is lost in conversion, and ``Constant``
    nodes become initializers (:func:`_constants_as_initializers`).
    """
    onnx = _onnx()
    from onnx import shape_inference

    model = onnx.load_from_string(data)
    graph = model.graph
    ins, outs = {}, {}
    for i, value in enumerate(v for v in graph.input if v.name in inputs):
        shape = (1, *inputs[value.name])
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims, shape):
            dim.Clear()
            dim.dim_value = size
        ins[f"input_{i}"] = value.name
    for j, value in enumerate(graph.output):
        for dim in value.type.tensor_type.shape.dim:
            dim.Clear()
        outs[f"output_{j}"] = value.name
    for placeholder, name in [*ins.items(), *outs.items()]:
        _rename(graph, name, placeholder)
    for node, name in cleaned_names(graph):  # If branches, Loop and Scan bodies too
        node.name = name
    del graph.value_info[:]
    try:
        model = shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - onnx2tf infers again; a model ORT runs is still worth trying
        pass
    try:
        import onnxsim

        simplified, ok = onnxsim.simplify(model)
        if ok:
            model = simplified
    except Exception:  # noqa: BLE001 - onnxsim is an optimisation; onnx2tf runs it again anyway
        pass
    _constants_as_initializers(model.graph)  # after onnxsim, which folds shape computations into Constant nodes
    shapes = {outs[o.name]: tuple(d.dim_value for d in o.type.tensor_type.shape.dim) for o in model.graph.output}
    return model.SerializeToString(), ins, outs, shapes


def cleaned_names(graph: Any) -> list[tuple[Any, str]]:
    """Return each node of ``graph`` and of its subgraphs (:func:`graphs_of`, outer first) with the name onnx2tf is
    given for it, unique over every graph: only characters TensorFlow takes in an op name (PaddlePaddle's
    ``Softmax@0`` is ``Softmax_0``), ``node_<k>`` for a node without one (``k`` counted over every graph), and a
    name an earlier node already takes (``a@0`` and ``a:0`` both clean to ``a_0``; nodes may share a name in ONNX)
    followed by the first ``_<n>`` (n = 1, 2...) no node takes, so each name leads back to one node of the user's."""
    nodes = [n for g in graphs_of(graph) for n in g.node]
    wanted = [_SAFE_NODE.sub("_", node.name) or f"node_{k}" for k, node in enumerate(nodes)]
    taken: set[str] = set()
    own = set(wanted)
    out: list[tuple[Any, str]] = []
    for node, name in zip(nodes, wanted):
        if name in taken:  # never a name another node has itself
            name = next(c for n in itertools.count(1) if (c := f"{name}_{n}") not in taken and c not in own)
        taken.add(name)
        out.append((node, name))
    return out


def _constants_as_initializers(graph: Any) -> int:
    """Turn the graph's ``Constant`` nodes into initializers; return how many.

    onnx2tf 1.29 handles a ``Constant`` node's output unlike an initializer: YOLOv8's anchor points
    (``[1, 2, 2100]``, a ``Constant`` node after onnxsim) get a channels-last layout the rest of the
    box branch does not, and the ``.tflite`` boxes come out hundreds of pixels off (-4.8 dB against
    ONNX Runtime); as initializers they convert to round-off (144 dB on the head alone).
    """
    from onnx import numpy_helper

    kept, moved = [], 0
    for node in graph.node:
        value = None
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            attr = node.attribute[0]
            if attr.name == "value":
                value = numpy_helper.to_array(attr.t)
            elif attr.name in ("value_float", "value_floats"):
                value = np.asarray(attr.f if attr.name == "value_float" else list(attr.floats), np.float32)
            elif attr.name in ("value_int", "value_ints"):
                value = np.asarray(attr.i if attr.name == "value_int" else list(attr.ints), np.int64)
        if value is None:
            kept.append(node)
            continue
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        moved += 1
    del graph.node[:]
    graph.node.extend(kept)
    return moved


def _sample_images(folder: Path) -> None:
    """Write the sample images onnx2tf reads for 3-channel NHWC inputs (it would download them).

    Smooth colour gradients in [0, 1], deterministic: onnx2tf only uses them to check its own
    intermediate results, never for quantization (edge-kit does not let it quantize).
    """
    yy, xx = np.mgrid[0:128, 0:128].astype(np.float32) / 128.0
    rng = np.random.default_rng(0)
    images = np.empty((20, 128, 128, 3), np.float32)
    for i in range(20):
        for c in range(3):
            fx, fy, px, py = rng.uniform(0.5, 3.0, 4)
            images[i, :, :, c] = 0.5 + 0.25 * np.sin(6.283 * fx * xx + px) + 0.25 * np.cos(6.283 * fy * yy + py)
    np.save(folder / _ONNX2TF_SAMPLES, images)


# what to do about a control-flow op onnx2tf failed on (an If with a condition computed from the input converts:
# docs/compile.md, "Control flow")
CONTROL_FLOW_HINTS = {
    "Loop": ("export the model with the loop unrolled (a loop of fixed count traced by torch.onnx.export unrolls; "
             "torch.jit.script keeps a Loop, and onnxsim does not unroll one)"),
    "Scan": "export the model with the scan unrolled (a recurrence traced over a fixed sequence length)",
    "If": ("export the model traced, which keeps the branch taken (torch.onnx.export of a traced model; "
           "torch.jit.script keeps an If), or each branch as its own model"),
}


def _failure(path: Path, log: str, model: bytes, source: bytes) -> str:
    """Return one line saying where onnx2tf stopped (the ONNX op and its type) from its log of converting ``model``
    (:func:`prepared_model` of ``source``), the node named as ``source`` names it."""
    from edgekit_protocol.labels import clip, printable

    originals: dict[str, str] = {}  # onnx2tf names the node it was given: Softmax_0 for the user's Softmax@0
    try:
        for node, name in cleaned_names(_onnx().load_from_string(source).graph):
            if node.name:  # as the user wrote it, shown on one line
                originals.setdefault(name, printable(clip(node.name, 60)))
    except Exception:  # noqa: BLE001 - the name only decorates the message
        pass
    clean = re.sub(r"\x1b\[[0-9;]*m", "", log)
    op = re.search(r"onnx_op_name:\s*(\S+)", clean)
    cause = [ln.strip() for ln in clean.splitlines() if re.match(r"^\s*[A-Za-z_.]*(Error|Exception):", ln)]
    why = cause[-1][:200] if cause else (clean.strip().splitlines() or ["no output"])[-1][:200]
    missing = re.search(r"No module named 'onnx2tf\.ops\.(\w+)'", clean)
    if missing:
        kind = missing.group(1)
        try:
            names = [originals.get(n.name, n.name) for g in graphs_of(_onnx().load_from_string(model).graph)
                     for n in g.node if n.op_type == kind]  # in an If branch or a Loop/Scan body too
        except Exception:  # noqa: BLE001 - the node name only decorates the message
            names = []
        where = f" (node '{names[0]}'{f' and {len(names) - 1} more' if len(names) > 1 else ''})" if names else ""
        return (f"{path}: {CONVERTER} {version(CONVERTER)} has no conversion for op type '{kind}'{where}; replace that "
                "op in the exported model (another opset or an equivalent op) and compile again")
    if op:
        kind = "?"
        try:
            onnx = _onnx()
            kinds = {_SAFE_NODE.sub("_", n.name): n.op_type for g in graphs_of(onnx.load_from_string(model).graph)
                     for n in g.node}
            kind = kinds.get(op.group(1), "?")
        except Exception:  # noqa: BLE001 - the op type only decorates the message
            pass
        node = originals.get(op.group(1), op.group(1))
        if kind in CONTROL_FLOW_HINTS:  # onnx2tf's own error there (a TypeError of tf.function) tells a user nothing
            return (f"{path}: {CONVERTER} {version(CONVERTER)} cannot convert the {kind} node '{node}' to "
                    f"TensorFlow Lite, so no LiteRT variant can be made; {CONTROL_FLOW_HINTS[kind]}, and compile "
                    "again, or compile for ONNX Runtime variants only (a profile whose variants are onnx-*)")
        return (f"{path}: {CONVERTER} cannot convert op '{node}' ({kind}): {why}; simplify or replace that op "
                "in the exported model (another opset, or export without it) and compile again")
    return f"{path}: {CONVERTER} failed: {why}"


def convert(path: Path, data: bytes, inputs: dict[str, tuple[int, ...]], outputs: list[str]) -> tuple[bytes, list[str]]:
    """Convert the ONNX model to a float32 ``.tflite`` with onnx2tf (see the module docstring).

    onnx2tf keeps the inputs' layout (``-kat``) but may lay an output out channels-last
    (``[1, 320, 320, 1]`` for ONNX's ``[1, 1, 320, 320]``): such an output gets a TRANSPOSE back
    (:func:`~edge_kit.compiler.tflite_edit.restore_layouts`), so every output has the ONNX shape.

    Returns:
        (the flatbuffer, with a ``serving_default`` signature naming the ONNX inputs and outputs and
        every input and output in the ONNX shape; the names of the outputs transposed back).

    Raises:
        Unconvertible: onnx2tf cannot convert an op (the message names it).
        InputError: onnx2tf is not installed, or made TensorFlow ops LiteRT does not run (named).
        CompileError: onnx2tf ran past its timeout, or its output lacks an input or output, or has
            one in a layout that is not the ONNX one nor its channels-last form, or the shapes could
            not be written into the graph (:func:`prepared_model`, run in a child process: one that
            crashes or hangs it is an InputError, :func:`_in_child`).
    """
    from edge_kit.compiler.tflite_edit import rename_signature, restore_layouts

    if version("onnx2tf") is None:
        raise InputError(f"{path}: converting ONNX needs onnx2tf, which .ci/setup installs with --no-deps "
                         "(pip install --no-deps onnx2tf==1.29.24 tf_keras~=2.21.0; see docs/compile.md)")
    from device_agents.errors import SmokeFailed

    try:
        ready, ins, outs, out_shapes = _in_child(Path(path), "onnx's shape inference and onnxsim", _prepared, data, inputs)
    except SmokeFailed as exc:
        raise CompileError(f"{path}: could not write the pinned shapes into the graph for {CONVERTER} ({exc})") from None
    with tempfile.TemporaryDirectory(prefix="edgekit-onnx2tf-") as tmp:
        work = Path(tmp)
        (work / "model.onnx").write_bytes(ready)
        _sample_images(work)
        argv = [sys.executable, str(Path(__file__).with_name("onnx2tf_run.py")), "model.onnx", "model.tflite", *ins]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0", "CUDA_VISIBLE_DEVICES": ""}
        try:
            done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, errors="replace",
                                  timeout=CONVERT_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise CompileError(f"{path}: {CONVERTER} did not finish within {CONVERT_TIMEOUT_S} s") from None
        result = work / "model.tflite"
        if done.returncode != 0 or not result.is_file():
            raise Unconvertible(_failure(path, done.stdout + "\n" + done.stderr, ready, data))
        tflite = result.read_bytes()
    try:
        tflite, transposed = restore_layouts(rename_signature(tflite, ins, outs), out_shapes)
    except ValueError as exc:
        raise CompileError(f"{path}: {CONVERTER}'s output does not keep the model's inputs and outputs ({exc})") from None
    _check_inputs(path, tflite, inputs)
    return tflite, transposed


def _check_inputs(path: Path, tflite: bytes, inputs: dict[str, tuple[int, ...]]) -> None:
    """Check that LiteRT loads ``tflite`` and every input has its ONNX name and batch-1 ONNX shape.

    Raises:
        InputError: LiteRT cannot load it (onnx2tf fell back to TensorFlow "Flex" ops, which are named).
        CompileError: an input lost its name or its ONNX shape.
    """
    from device_agents.inference import ports
    from device_agents.runtimes import get_runtime
    from edge_kit.compiler.analysis import flex_ops
    from edge_kit.compiler.tf_quiet import runtime_banner_dropped

    try:
        with runtime_banner_dropped():
            got = {p.name: p.shape for p in ports(get_runtime("litert").interpreter(tflite))[0]}
    except (RuntimeError, ValueError) as exc:
        custom = flex_ops(tflite)
        if custom:
            raise InputError(f"{path}: {CONVERTER} converted some ops to TensorFlow ops that LiteRT does not run on "
                             f"devices ({', '.join(custom)}); replace the ONNX op(s) behind them in the exported model "
                             "and compile again") from None
        raise InputError(f"{path}: the converted model does not load in LiteRT ({_first_line(exc)})") from None
    want = {name: (1, *shape) for name, shape in inputs.items()}
    if got != want:
        raise CompileError(f"{path}: {CONVERTER} changed the inputs to {got} (the ONNX model has {want}); "
                           "edge-kit feeds the same data to both, so it cannot use this conversion")


def conversion_fidelity(path: Path, data: bytes, tflite: bytes, runner: Any, *, random: bool = False) -> dict[str, Any]:
    """Compare the converted model with ONNX Runtime on the same inputs.

    ``data`` is the ONNX model with its input shapes pinned (:func:`edge_kit.compiler.onnx_variants.pinned`);
    ``runner`` turns a model's bytes into {output name: outputs} on the inputs it holds, ONNX Runtime
    for ONNX and LiteRT for the flatbuffer (:class:`edge_kit.compiler.analysis.ChildInference`: each
    run in a child with a deadline).

    With ``random`` (the inputs are :func:`edge_kit.compiler.data.random_inputs`' samples, not the user's), a sample
    on which ONNX Runtime's outputs hold NaN or infinity is left out, not refused: an input the model does not take
    (the log or square root of a negative value); at most half of them (:data:`MIN_RANDOM_KEPT`): a model whose
    outputs are NaN on most would pass on a single sample.

    Returns:
        :func:`device_agents.inference.fidelity`'s figures: ``outputs`` per output name, and the
        worst ``snr_db``, ``cosine``, ``max_abs_error``, ``mean_abs_error`` over outputs; ``left_out``, how many
        random samples were left out.

    Raises:
        InputError: ONNX Runtime's outputs hold NaN or infinity (the model computes nothing to compare
            with; with ``random``: on over half the samples), or either run crashed, did not finish in time or failed
            (``runner``'s ValueError).
        CompileError: the two models' outputs differ in names or shapes, or the converted model's hold
            NaN or infinity where ONNX Runtime's do not.
    """
    from device_agents.inference import fidelity

    try:
        reference = runner(data)
    except ValueError as exc:
        raise InputError(f"{path}: running the ONNX model to check its conversion: {exc}") from None
    finite = finite_samples(reference)
    if random and finite.any():
        if finite.sum() < MIN_RANDOM_KEPT * len(finite):  # one sample left is no check of a conversion
            raise InputError(f"{path}: ONNX Runtime's outputs are NaN or infinity on {int((~finite).sum())} of the "
                             f"{len(finite)} random samples of the conversion check, too few left to check it; give "
                             "--eval or --calib data the model takes (or fix the model)")
        reference = {name: y[finite] for name, y in reference.items()}
    for name, y in reference.items():
        finite_here = np.isfinite(y.reshape(len(y), -1)).all(axis=1)
        if not finite_here.all():
            raise InputError(f"{path}: output '{name}' is NaN or infinity on sample {int(np.argmin(finite_here))} of the "
                             "conversion check (ONNX Runtime, the model itself); fix the model (weights, a division "
                             "by zero, a log of zero) and export it again")
    try:
        got = runner(tflite)
    except ValueError as exc:
        raise InputError(f"{path}: running its {CONVERTER} float32 conversion: {exc}") from None
    if random:
        got = {name: y[finite] if len(y) == len(finite) else y for name, y in got.items()}
    try:
        return {**fidelity(got, reference), "left_out": int((~finite).sum()) if random else 0}
    except ValueError as exc:
        raise CompileError(f"{path}: the converted model's outputs do not match ONNX Runtime's ({exc})") from None
