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


def rename_signature(data: bytes, names: dict[str, str]) -> bytes:
    """Return the model with its inputs and outputs renamed by ``names`` ({name in the file: new name}).

    The single signature's entries are renamed (a model without one gets ``serving_default`` from
    its graph's inputs and outputs), and so are the tensors they point at, so the LiteRT interpreter
    and ai-edge-quantizer both see the new names.

    Raises:
        ValueError: the model has several signatures, or an input or output of the file is not in
            ``names`` (or one of ``names`` is not in the file).
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
    order = list(names)
    seen = set()
    for entries in (sig.inputs or [], sig.outputs or []):
        keys = []
        for entry in entries:
            key = _placeholder(entry.name.decode(), names)
            if key is None:
                key = _placeholder((graph.tensors[entry.tensorIndex].name or b"").decode(), names)
            if key is None:
                raise ValueError(f"'{entry.name.decode()}' is none of {sorted(names)}")
            keys.append(key)
            entry.name = names[key].encode()
            graph.tensors[entry.tensorIndex].name = names[key].encode()
        seen.update(keys)
        entries.sort(key=lambda e, k=dict(zip(map(id, entries), keys)): order.index(k[id(e)]))  # the names' order
    if seen != set(names):
        raise ValueError(f"{sorted(set(names) - seen)} not found among the file's inputs and outputs")
    return _dump(model)
