"""Small, checked rewrites of a ``.tflite`` flatbuffer, so a float ``.tflite`` can give every variant.

A pretrained ``.tflite`` often stores its weights as float16 behind DEQUANTIZE ops, names its ops
with the pre-2.4 ``deprecated_builtin_code`` only, and has no signature. ai-edge-quantizer reads
only ``builtin_code`` (it then takes a CONV_2D for an ADD and quantizes its weights as activations,
which the interpreter refuses), leaves float16 weights alone, and calibrates per signature.
:func:`as_float32` fixes all three, without changing what the model computes (checked by the tests
against the interpreter's outputs on the original).
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


def as_float32(data: bytes) -> tuple[bytes, int]:
    """Return the model with float16 constants stored as float32, plus how many were converted.

    Every DEQUANTIZE op whose input is a float16 constant is removed and its output becomes a
    float32 constant holding the same values; opcodes get ``builtin_code`` filled from the
    deprecated field; a model without signatures gets one (``serving_default``, the graph's own
    input and output tensor names), so each variant's inputs and outputs keep the same names.
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
    used = {t.buffer for g in model.subgraphs for t in g.tensors}
    for i, buffer in enumerate(model.buffers):
        if i and i not in used:
            buffer.data = None  # the float16 copies nothing reads any more
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
    return _dump(model), converted


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
