"""Small, checked rewrites of a ``.tflite`` flatbuffer, so a float ``.tflite`` can give every variant.

A pretrained ``.tflite`` often stores its weights as float16 behind DEQUANTIZE ops, names its ops
with the pre-2.4 ``deprecated_builtin_code`` only, and has no signature. ai-edge-quantizer reads
only ``builtin_code`` (it then takes a CONV_2D for an ADD and quantizes its weights as activations,
which the interpreter refuses), leaves float16 weights alone, and calibrates per signature.
:func:`as_float32` fixes all three, and folds standalone RELUs into the ops before them (as the
TFLite converter writes them, which XNNPACK needs to run an int8 model in one piece), without
changing what the model computes (checked by the tests against the interpreter's outputs on the
original). :func:`pin_inputs` writes ``--input-shape`` into a model with dynamic dimensions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SIGNATURE = "serving_default"


def _schema() -> Any:
    from ai_edge_litert import schema_py_generated as schema

    return schema


def _load(data: bytes) -> Any:
    schema = _schema()
    return schema.ModelT.InitFromObj(schema.Model.GetRootAs(data, 0))


def _dump(model: Any) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(max(1024, 2 * sum(len(b.data) for b in model.buffers if b.data is not None)))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _drop_unread_tensors(model: Any) -> int:
    """Remove, from every subgraph, the tensors no op reads or writes and no graph input, output or
    signature names, and empty the buffers nothing refers to any more.

    Indices in ops, graph inputs/outputs and signatures are renumbered. Returns the number of
    buffer bytes freed.
    """
    for index, graph in enumerate(model.subgraphs):
        keep = {int(i) for op in graph.operators or [] for i in [*(op.inputs if op.inputs is not None else []),
                                                                     *(op.outputs if op.outputs is not None else []),
                                                                     *(op.intermediates if op.intermediates is not None else [])]
                if i >= 0}
        keep |= {int(i) for i in [*(graph.inputs if graph.inputs is not None else []),
                                  *(graph.outputs if graph.outputs is not None else [])]}
        for sig in model.signatureDefs or []:
            if sig.subgraphIndex == index:
                keep |= {int(m.tensorIndex) for m in [*(sig.inputs or []), *(sig.outputs or [])]}
        if len(keep) == len(graph.tensors):
            continue
        new = {old: n for n, old in enumerate(sorted(keep))}

        def remap(indices: Any) -> Any:
            return None if indices is None else np.asarray([new[int(i)] if i >= 0 else -1 for i in indices], dtype=np.int32)

        graph.tensors = [graph.tensors[old] for old in sorted(keep)]
        for op in graph.operators or []:
            op.inputs, op.outputs, op.intermediates = remap(op.inputs), remap(op.outputs), remap(op.intermediates)
        graph.inputs, graph.outputs = remap(graph.inputs), remap(graph.outputs)
        for sig in model.signatureDefs or []:
            if sig.subgraphIndex == index:
                for entry in [*(sig.inputs or []), *(sig.outputs or [])]:
                    entry.tensorIndex = new[int(entry.tensorIndex)]
    used = {t.buffer for g in model.subgraphs for t in g.tensors}
    used |= {m.buffer for m in model.metadata or []}
    freed = 0
    for i, buffer in enumerate(model.buffers):
        if i and i not in used and buffer.data is not None:
            freed += len(buffer.data)
            buffer.data = None
    return freed


def _fuse_activations(model: Any) -> int:
    """Fold each standalone RELU, RELU6 or RELU_N1_TO_1 into the CONV_2D, DEPTHWISE_CONV_2D, ADD or
    FULLY_CONNECTED that produces its input (as the op's fused activation), where that op has none and
    nothing else reads the tensor between them. Returns how many were folded.

    The float model computes exactly the same. Quantized, it is the layout the TFLite converter
    writes: XNNPACK runs a fused int8 op but not a standalone int8 RELU, which split MediaPipe's
    BlazeFace into 45 delegate partitions with the interpreter's kernels between them (int8 7x slower
    than fp32 on the host), and the op's int8 output range starts at 0 instead of wasting half its
    steps on negative values the RELU drops.
    """
    schema = _schema()
    ops_ = schema.BuiltinOperator
    activation = {ops_.RELU: schema.ActivationFunctionType.RELU, ops_.RELU6: schema.ActivationFunctionType.RELU6,
                  ops_.RELU_N1_TO_1: schema.ActivationFunctionType.RELU_N1_TO_1}
    fusable = {ops_.CONV_2D, ops_.DEPTHWISE_CONV_2D, ops_.ADD, ops_.FULLY_CONNECTED}
    codes = [c.builtinCode for c in model.operatorCodes or []]
    folded = 0
    for index, graph in enumerate(model.subgraphs):
        kept_outputs = {int(i) for i in (graph.outputs if graph.outputs is not None else [])}
        kept_outputs |= {int(e.tensorIndex) for sig in model.signatureDefs or [] if sig.subgraphIndex == index
                         for e in sig.outputs or []}
        readers: dict[int, int] = {}
        for op in graph.operators or []:
            for i in op.inputs if op.inputs is not None else []:
                readers[int(i)] = readers.get(int(i), 0) + 1
        producer = {int(o): op for op in graph.operators or [] for o in (op.outputs if op.outputs is not None else [])}
        dropped = set()
        for op in graph.operators or []:
            if codes[op.opcodeIndex] not in activation:
                continue
            tensor = int(op.inputs[0])
            src = producer.get(tensor)
            if (src is None or codes[src.opcodeIndex] not in fusable or readers.get(tensor) != 1
                    or tensor in kept_outputs or len(src.outputs) != 1):
                continue
            if src.builtinOptions is None and codes[src.opcodeIndex] == ops_.ADD:  # old exporters omit AddOptions
                src.builtinOptionsType, src.builtinOptions = schema.BuiltinOptions.AddOptions, schema.AddOptionsT()
            if src.builtinOptions is None or src.builtinOptions.fusedActivationFunction != schema.ActivationFunctionType.NONE:
                continue
            src.builtinOptions.fusedActivationFunction = activation[codes[op.opcodeIndex]]
            src.outputs = np.asarray([int(op.outputs[0])], dtype=np.int32)
            dropped.add(id(op))
            folded += 1
        graph.operators = [op for op in graph.operators or [] if id(op) not in dropped]
    return folded


def as_float32(data: bytes) -> tuple[bytes, int]:
    """Return the model with float16 constants stored as float32, plus how many were converted.

    Every DEQUANTIZE op whose input is a float16 constant is removed and its output becomes a
    float32 constant holding the same values; the float16 tensors nothing reads any more are
    removed with their buffers (kept, they made the fp32 file 1.5 times its size and stayed in every
    quantized variant: int8 was 0.58 of fp32, now 0.37); opcodes get ``builtin_code`` filled from the
    deprecated field; a model without signatures gets one (``serving_default``, the graph's own
    input and output tensor names), so each variant's inputs and outputs keep the same names; and
    standalone RELUs are folded into the op before them (:func:`_fuse_activations`).

    Returns:
        (the rewritten flatbuffer, how many float16 constants were converted).
    """
    schema = _schema()
    model = _load(data)
    for code in model.operatorCodes or []:
        code.builtinCode = max(code.builtinCode, code.deprecatedBuiltinCode)
    dequantize = {i for i, c in enumerate(model.operatorCodes or []) if c.builtinCode == schema.BuiltinOperator.DEQUANTIZE}
    converted = 0
    for graph in model.subgraphs:
        kept = []
        for op in graph.operators or []:
            if op.opcodeIndex in dequantize:
                src, dst = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
                raw = model.buffers[src.buffer].data
                if src.type == schema.TensorType.FLOAT16 and raw is not None and len(raw):
                    values = np.frombuffer(bytes(raw), dtype="<f2").astype("<f4")
                    buffer = schema.BufferT()
                    buffer.data = np.frombuffer(values.tobytes(), dtype=np.uint8)
                    model.buffers.append(buffer)
                    dst.buffer = len(model.buffers) - 1
                    converted += 1
                    continue
            kept.append(op)
        graph.operators = kept
    if not model.signatureDefs:
        graph = model.subgraphs[0]

        def mapped(index: int) -> Any:
            entry = schema.TensorMapT()
            entry.name, entry.tensorIndex = graph.tensors[index].name, int(index)
            return entry

        sig = schema.SignatureDefT()
        sig.signatureKey, sig.subgraphIndex = SIGNATURE.encode(), 0
        sig.inputs = [mapped(i) for i in graph.inputs]
        sig.outputs = [mapped(i) for i in graph.outputs]
        model.signatureDefs = [sig]
    _fuse_activations(model)
    _drop_unread_tensors(model)  # the float16 copies and the tensors between folded ops and their RELUs
    return _dump(model), converted


def pin_inputs(data: bytes, shapes: dict[str, tuple[int, ...]]) -> bytes:
    """Return the model with the named inputs fixed to ``shapes`` ({input name: full shape, batch included}).

    Inputs are named as :func:`device_agents.inference.ports` names them (signature, else tensor
    names). The LiteRT interpreter resizes them (only dimensions the model declares dynamic may
    change) and propagates the shapes through the graph; every tensor whose declared shape had a
    dynamic dimension then gets the shape the interpreter computed, as ``shape`` and
    ``shape_signature``, so the file is static: ai-edge-quantizer, the analysis (MACs) and devices
    read fixed sizes from it.

    Raises:
        KeyError: a name is not an input of the model.
        ValueError / RuntimeError: the interpreter refuses the shape (it does not fit a static
            dimension, or an op cannot run at it).
    """
    from device_agents.inference import ports
    from device_agents.runtimes import get_runtime

    # reference kernels: a delegate keeps the tensors inside its partition at their old shapes
    interp = get_runtime("litert").interpreter(data, delegate="none")
    index = {p.name: p.index for p in ports(interp)[0]}
    for name, shape in shapes.items():
        interp.resize_tensor_input(index[name], [int(d) for d in shape], strict=True)
    interp.allocate_tensors()
    found = {int(d["index"]): tuple(int(x) for x in d["shape"]) for d in interp.get_tensor_details()}
    model = _load(data)
    for i, tensor in enumerate(model.subgraphs[0].tensors):
        declared = [int(d) for d in tensor.shapeSignature] if tensor.shapeSignature is not None else []
        shape = found.get(i)
        if not any(d < 0 for d in declared) or shape is None or len(shape) != len(declared) or \
                any(d >= 0 and d != s for d, s in zip(declared, shape)):
            continue  # static already, or a shape the interpreter does not know before running (leave it)
        tensor.shape = np.asarray(shape, dtype=np.int32)
        tensor.shapeSignature = np.asarray(shape, dtype=np.int32)
    return _dump(model)


def signature_key(data: bytes) -> str:
    """Return the key of the model's only signature (the quantizer calibrates per signature).

    Raises:
        ValueError: the model has no signature or several.
    """
    keys = [s.signatureKey.decode() for s in (_load(data).signatureDefs or [])]
    if len(keys) != 1:
        raise ValueError(f"the model has {len(keys)} signatures; edge-kit compiles models with one")
    return keys[0]


def _placeholder(name: str, names: dict[str, str]) -> str | None:
    """Return which of ``names`` a signature or tensor name stands for (TensorFlow may decorate it), or None."""
    if name in names:
        return name
    bare = name.removeprefix("serving_default_").split(":")[0]
    return bare if bare in names else None


def rename_signature(data: bytes, inputs: dict[str, str], outputs: dict[str, str]) -> bytes:
    """Return the model with its inputs and outputs renamed ({name in the file: new name} for each).

    The single signature's entries are renamed (a model without one gets ``serving_default`` from
    its graph's inputs and outputs), and so are the tensors they point at, so the LiteRT interpreter
    and ai-edge-quantizer both see the new names. An entry is found by its signature name, else its
    tensor name (TensorFlow may decorate either, ``serving_default_input_0:0``); when exactly one
    input (or output) is left unmatched and one name is left for it, they are paired (a converter
    that names its only output ``Identity``); anything else is an error, never a guess.

    Raises:
        ValueError: the model has several signatures, or its inputs or outputs cannot be matched
            one to one with the names.
    """
    schema = _schema()
    model = _load(data)
    if len(model.signatureDefs or []) > 1:
        raise ValueError(f"the model has {len(model.signatureDefs)} signatures; edge-kit compiles models with one")
    graph = model.subgraphs[0]
    if not model.signatureDefs:
        sig = schema.SignatureDefT()
        sig.signatureKey, sig.subgraphIndex = SIGNATURE.encode(), 0

        def mapped(index: int) -> Any:
            entry = schema.TensorMapT()
            entry.name, entry.tensorIndex = graph.tensors[index].name, int(index)
            return entry

        sig.inputs = [mapped(i) for i in graph.inputs]
        sig.outputs = [mapped(i) for i in graph.outputs]
        model.signatureDefs = [sig]
    sig = model.signatureDefs[0]
    for entries, names in ((sig.inputs or [], inputs), (sig.outputs or [], outputs)):
        keys: list[str | None] = []
        for entry in entries:
            key = _placeholder(entry.name.decode(), names)
            if key is None:
                key = _placeholder((graph.tensors[entry.tensorIndex].name or b"").decode(), names)
            keys.append(key)
        left = sorted(set(names) - set(keys))
        if keys.count(None) == 1 and len(left) == 1:
            keys[keys.index(None)] = left[0]
        if None in keys or sorted(keys) != sorted(names):  # type: ignore[type-var]
            found = [e.name.decode() for e in entries]
            raise ValueError(f"cannot match {found} with {sorted(names)}")
        for entry, key in zip(entries, keys):
            entry.name = names[key].encode()  # type: ignore[index]
            graph.tensors[entry.tensorIndex].name = names[key].encode()  # type: ignore[index]
        order = list(names)
        pairs = sorted(zip(keys, entries), key=lambda ke: order.index(ke[0]))  # the names' order
        entries[:] = [e for _, e in pairs]
    return _dump(model)


def repoint_signature(data: bytes) -> bytes:
    """Return the model with signature entries pointing at the graph's real inputs and outputs again.

    ai-edge-quantizer quantizes an output that other ops also read by adding a QUANTIZE op after it
    and making that op's result (``<name>_quantized``) the graph output, but leaves the signature on
    the old tensor, so the model's outputs would lose their names. Each such entry is moved to the
    graph output computed directly from its old tensor; a model whose signature is consistent comes
    back unchanged.

    Raises:
        ValueError: an entry points at a tensor that is not an input or output, and no single graph
            output is computed from it.
    """
    model = _load(data)
    if not model.signatureDefs:
        return data
    graph = model.subgraphs[0]
    changed = False
    for sig in model.signatureDefs:
        for entries, ends in ((sig.inputs or [], list(graph.inputs)), (sig.outputs or [], list(graph.outputs))):
            for entry in entries:
                if entry.tensorIndex in ends:
                    continue
                made = [int(o) for op in graph.operators or [] if entry.tensorIndex in list(op.inputs)
                        for o in op.outputs if int(o) in ends]
                if len(made) != 1:
                    raise ValueError(f"signature entry '{entry.name.decode()}' points at no input or output")
                entry.tensorIndex = made[0]
                changed = True
    return _dump(model) if changed else data


def channels_last(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Return ``shape`` (batch, channels, spatial...) as a converter lays it out channels-last (batch, spatial..., channels)."""
    return (shape[0], *shape[2:], shape[1]) if len(shape) >= 3 else tuple(shape)


def restore_layouts(data: bytes, shapes: dict[str, tuple[int, ...]]) -> tuple[bytes, list[str]]:
    """Return the model with outputs a converter turned channels-last transposed back, and their names.

    ``shapes`` maps output names (as the signature names them) to the shape the source model
    declares. An output whose shape in the file differs from it but equals its channels-last form
    (:func:`channels_last`) gets a TRANSPOSE op appended that restores the declared layout; the
    signature and the graph's outputs then point at the transposed tensor, which takes the name.
    Outputs already in the declared shape, or whose shape is unknown, are left alone.

    Raises:
        ValueError: an output has neither the declared shape nor its channels-last form.
    """
    schema = _schema()
    model = _load(data)
    if not model.signatureDefs:
        return data, []
    graph = model.subgraphs[0]
    fixed: list[str] = []
    for entry in model.signatureDefs[0].outputs or []:
        name = entry.name.decode()
        want = tuple(int(d) for d in shapes.get(name, ()))
        if not want or min(want) < 1:
            continue
        src = graph.tensors[entry.tensorIndex]
        have = tuple(int(d) for d in src.shape)
        if have == want:
            continue
        if have != channels_last(want):
            raise ValueError(f"output '{name}' has shape {have}, the source declares {want}")
        rank = len(want)
        perm = np.asarray([0, rank - 1, *range(1, rank - 1)], np.int32)  # channels-last back to channels-first
        code = next((i for i, c in enumerate(model.operatorCodes)
                     if max(c.builtinCode, c.deprecatedBuiltinCode) == schema.BuiltinOperator.TRANSPOSE), None)
        if code is None:
            oc = schema.OperatorCodeT()
            oc.builtinCode = schema.BuiltinOperator.TRANSPOSE
            oc.deprecatedBuiltinCode = min(schema.BuiltinOperator.TRANSPOSE, 127)
            oc.version = 1
            model.operatorCodes.append(oc)
            code = len(model.operatorCodes) - 1
        perm_buffer = schema.BufferT()
        perm_buffer.data = np.frombuffer(perm.tobytes(), np.uint8)
        model.buffers.append(perm_buffer)
        perm_tensor = schema.TensorT()
        perm_tensor.shape, perm_tensor.type = [rank], schema.TensorType.INT32
        perm_tensor.buffer, perm_tensor.name = len(model.buffers) - 1, f"{name}/restore_layout/perm".encode()
        out_buffer = schema.BufferT()
        model.buffers.append(out_buffer)
        out_tensor = schema.TensorT()
        out_tensor.shape, out_tensor.type = list(want), src.type
        out_tensor.buffer, out_tensor.name = len(model.buffers) - 1, name.encode()
        src.name = f"{name}/channels_last".encode()
        graph.tensors.extend([perm_tensor, out_tensor])
        perm_index, out_index = len(graph.tensors) - 2, len(graph.tensors) - 1
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = code, [entry.tensorIndex, perm_index], [out_index]
        op.builtinOptionsType = schema.BuiltinOptions.TransposeOptions
        op.builtinOptions = schema.TransposeOptionsT()
        graph.operators.append(op)
        graph.outputs = [out_index if int(o) == entry.tensorIndex else int(o) for o in graph.outputs]
        entry.tensorIndex = out_index
        fixed.append(name)
    return (_dump(model), fixed) if fixed else (data, [])


def float_id_inputs(data: bytes, names: list[str]) -> tuple[bytes, list[str]]:
    """Return the quantized model with each input named in ``names`` (token ids or flags: an integer or boolean input
    the model takes as float32 and casts inside) taking float32 again, and the names of those changed.

    A full-integer conversion (the TFLite converter's ``inference_input_type=int8``, ai-edge-quantizer's
    ``static_wi8_ai8``) quantizes such an input like any other, with the scale its calibration ids span: ids 0..299
    took a scale of 1.17, so id 298 reached the cast as 297, and a few ids in every sample hit other rows. Both write
    the input followed by a DEQUANTIZE op that feeds the cast; that op's float32 result becomes the input here (it
    takes the input's name and shape), so ids reach the cast exactly, and every other op stays as quantized. An input
    the file does not quantize (a plain integer input, a float one) is left as it is.

    Raises:
        ValueError: such an input is quantized and read by an op other than DEQUANTIZE (nothing here could give that
            op its ids exactly).
    """
    from edge_kit.compiler.analysis import _names

    schema = _schema()
    model = _load(data)
    if not model.signatureDefs or not names:
        return data, []
    op_names = _names(schema.BuiltinOperator)
    graph = model.subgraphs[model.signatureDefs[0].subgraphIndex]
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes or []]
    wanted = dict.fromkeys(names, "")
    changed: list[str] = []
    for entry in model.signatureDefs[0].inputs or []:
        index = int(entry.tensorIndex)
        tensor = graph.tensors[index]
        name = _placeholder(entry.name.decode(), wanted) or _placeholder((tensor.name or b"").decode(), wanted)
        scale = tensor.quantization.scale if tensor.quantization is not None else None
        if name is None or tensor.type == schema.TensorType.FLOAT32 or scale is None or not len(scale):
            continue
        readers = [op for op in graph.operators or [] if op.inputs is not None and index in [int(i) for i in op.inputs]]
        others = sorted({op_names.get(codes[op.opcodeIndex], "an unknown op") for op in readers
                         if codes[op.opcodeIndex] != schema.BuiltinOperator.DEQUANTIZE})
        if others:
            raise ValueError(f"input '{name}' (ids, cast inside the model) was quantized and is read by "
                             f"{', '.join(others)}, not only by DEQUANTIZE, so it cannot take exact ids")
        if not readers:  # an input nothing reads: nothing to give exact ids to
            continue
        kept = int(readers[0].outputs[0])
        merged = {int(op.outputs[0]) for op in readers[1:]}  # several DEQUANTIZE of the one input: their readers share one
        for op in graph.operators or []:
            if op.inputs is not None:
                op.inputs = np.asarray([kept if int(i) in merged else int(i) for i in op.inputs], dtype=np.int32)
        graph.outputs = np.asarray([kept if int(o) in merged else int(o) for o in graph.outputs], dtype=np.int32)
        graph.operators = [op for op in graph.operators if not any(op is r for r in readers)]
        graph.inputs = np.asarray([kept if int(i) == index else int(i) for i in graph.inputs], dtype=np.int32)
        entry.tensorIndex = kept
        new = graph.tensors[kept]
        new.name, new.shape, new.shapeSignature = tensor.name, tensor.shape, tensor.shapeSignature
        tensor.name = (tensor.name or b"") + b"/quantized"  # dropped below: nothing reads it any more
        changed.append(name)
    if not changed:
        return data, []
    _drop_unread_tensors(model)
    return _dump(model), changed


# op -> the positions of its inputs that reach its output id for id (a SELECT picks between two: Keras writes an
# Embedding as GATHER of SELECT(ids < 0, ids + rows, ids), ids >= 0 passing through as they are)
ID_MOVES = {"CAST": (0,), "RESHAPE": (0,), "SQUEEZE": (0,), "EXPAND_DIMS": (0,), "SELECT": (1, 2), "SELECT_V2": (1, 2)}
TABLE_OPS = {"GATHER": (0, 1), "EMBEDDING_LOOKUP": (1, 0)}  # op -> positions of its (table, ids) inputs


def table_rows(data: bytes, names: list[str]) -> dict[str, tuple[int, str]]:
    """Return, for each input of the ``.tflite`` model ``data`` named in ``names`` (integer ids, named as
    :func:`device_agents.inference.ports` names them: the signature's names, else the tensors') that a GATHER (as its
    indices) or an EMBEDDING_LOOKUP (as its ids) reads, directly or through :data:`ID_MOVES`, ``(rows of the
    smallest such table along the gathered axis, what it is)``: the ids it takes are ``0..rows-1``. Inputs reaching
    no such op, or one whose table has a dynamic size there, are left out."""
    from edge_kit.compiler.analysis import _names
    from edge_kit.compiler.onnx_source import MAX_SHAPE_HOPS

    schema = _schema()
    model = _load(data)
    graph = model.subgraphs[0]
    sigs = [s for s in model.signatureDefs or [] if s.subgraphIndex == 0]
    entries = ([(e.name, int(e.tensorIndex)) for e in sigs[0].inputs or []] if len(sigs) == 1 else
               [(graph.tensors[i].name, int(i)) for i in graph.inputs])
    op_names = _names(schema.BuiltinOperator)
    kinds = [op_names.get(max(c.builtinCode, c.deprecatedBuiltinCode), "") for c in model.operatorCodes or []]
    wanted = dict.fromkeys(names, "")
    out: dict[str, tuple[int, str]] = {}
    for entry, index in entries:
        name = (_placeholder((entry or b"").decode(errors="replace"), wanted)
                or _placeholder((graph.tensors[index].name or b"").decode(errors="replace"), wanted))
        if name is None:
            continue
        frontier, seen = {index}, set()
        for _ in range(MAX_SHAPE_HOPS + 1):
            seen |= frontier
            ahead: set[int] = set()
            for op in graph.operators or []:
                ins = [int(i) for i in (op.inputs if op.inputs is not None else [])]
                kind = kinds[op.opcodeIndex] if op.opcodeIndex < len(kinds) else ""
                roles = TABLE_OPS.get(kind)
                if roles and len(ins) == 2 and ins[roles[1]] in frontier:
                    axis = int(op.builtinOptions.axis) if kind == "GATHER" and op.builtinOptions is not None else 0
                    tensor = graph.tensors[ins[roles[0]]]
                    dims = [int(d) for d in (tensor.shapeSignature if tensor.shapeSignature is not None else
                                             tensor.shape if tensor.shape is not None else [])]
                    axis += len(dims) if axis < 0 else 0
                    if 0 <= axis < len(dims) and dims[axis] >= 1 and (name not in out or dims[axis] < out[name][0]):
                        out[name] = (dims[axis], f"the {dims[axis]} rows of {kind} table "
                                                 f"'{(tensor.name or b'').decode(errors='replace')}'")
                elif any(at < len(ins) and ins[at] in frontier for at in ID_MOVES.get(kind, ())):
                    ahead |= {int(o) for o in op.outputs if int(o) >= 0} - seen
            frontier = ahead
    return out
