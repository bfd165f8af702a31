"""`edgekit compile`: plan the variants every profile asks for, build each once, measure, record.

Flow: check every input (model, data, output folder) before converting anything; plan each distinct
variant once (plus fp32, the fidelity reference); build into a hidden staging folder; analyse and
evaluate every artifact with the LiteRT interpreter; write the manifest; then swap the staging
folder in for ``<out>/<model>`` so readers see the old complete folder or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import edge_kit
from device_agents.metrics import MetricSpec
from device_agents.targets import TARGETS, compiler_of
from edge_kit.compiler.analysis import (
    CONVERSION_CAUSE,
    ChildInference,
    ModelStats,
    analyse,
    conversion_deadline,
    float_ops,
    inference_deadline,
    probe_in_child,
)
from edge_kit.compiler.convert import (
    INT8_TFLITE_METHOD,
    converter_version,
    quantize_tflite,
    to_tflite,
)
from edge_kit.compiler.data import (
    MIN_RANDOM_KEPT,
    Dataset,
    finite_samples,
    id_inputs,
    is_random,
    leak_warning,
    left_out_said,
    load_dataset,
    noise_warning,
    random_inputs,
    range_warning,
    shared_samples,
)
from edge_kit.compiler.onnx_source import CONVERTER
from edge_kit.compiler.sources import (
    Graph,
    Source,
    keras_graph,
    load_source,
    source_graph,
)
from edge_kit.compiler.tflite_edit import as_float32
from edge_kit.compiler.watch import (
    interrupts_held,
    note,
    pause_for_tests,
    result_written,
    watched,
)
from edge_kit.errors import CompileError, CompileInterrupted, ConfigError, InputError
from edge_kit.fsutil import (
    atomic_write_bytes,
    atomic_write_text,
    sha256_bytes,
    writable_folder,
)
from edge_kit.manifest import Accuracy, Artifact, Fidelity, Manifest
from edge_kit.profiles import Profile
from edge_kit.variants import VariantSpec, build_order, parse_variant

PRECISION_TO_VARIANT = {"float32": "fp32", "float16": "fp16", "dynamic-int8": "dynamic-int8", "int8": "int8"}
Progress = Callable[[str, int], None]  # (the step now entered, how many steps the compile has in all: plan_steps's
# count, grown by two when onnx-fp32 is added as the reference of an ONNX model onnx2tf cannot convert)
EVAL_FILE = "eval.npz"  # shipped next to the artifacts: inputs, labels, fp32 outputs and metric, for on-device accuracy


BUILD_SECONDS_METHOD = ("measured: this host's wall clock (time.perf_counter) around the variant's build (conversion, "
                        "quantization, pruning and fine-tuning, compiling; a step several variants share, such as the "
                        "ONNX export, counts for the first) and, when this host can run it, the devices' smoke check")


@dataclass
class CompileRequest:
    model: Path
    profiles: list[Profile]
    out: Path
    calib: Path | None = None
    eval: Path | None = None
    train: Path | None = None
    epochs: int = 3  # fine-tuning epochs after pruning, when --train is given
    threads: int = 1  # interpreter threads for host evaluation
    task: str | None = None  # metric plugin (device_agents.metrics); None: classification, or custom with `metric`
    task_options: dict[str, Any] = field(default_factory=dict)
    metric: str | None = None  # module:function scoring the outputs itself
    decode: str | None = None  # module:function decoding detections
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # pinned dynamic dimensions
    signer: Any = None  # a device_agents.identity.Signer that signs manifest.json (None: unsigned)
    name: str | None = None  # the model's name (OUT/<name>); None: the model file's (sources.model_name)
    timeout: float | None = None  # seconds each run of a model over --eval/--calib may take (None: by sample count)


@dataclass
class _Plan:
    spec: VariantSpec
    profiles: list[str]
    refusal: str | None = None
    data: bytes | None = None
    artifact: Artifact | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _wanted(profiles: list[Profile], onnx: bool) -> dict[str, list[str]]:
    """Return {variant id: names of the profiles asking for it}, the reference always included: fp32, or onnx-fp32
    for an ``onnx`` source no profile asks a LiteRT variant of (it is not converted to LiteRT then:
    :func:`_converts`)."""
    wanted: dict[str, list[str]] = {}
    for profile in profiles:
        for vid in profile.variants:
            wanted.setdefault(vid, []).append(profile.name)
    litert = any(parse_variant(vid).format == "tflite" for vid in wanted)
    wanted.setdefault("fp32" if litert or not onnx else "onnx-fp32", [])
    return wanted


def _converts(wanted: dict[str, list[str]], onnx: bool) -> bool:
    """Return whether the compile of an ``onnx`` source (else: never) converts it to LiteRT for the variants
    ``wanted`` (:func:`_wanted`): only when one of them is LiteRT's, as fp32 is whenever there is one."""
    return onnx and "fp32" in wanted


def plan_steps(req: CompileRequest) -> int:
    """Return how many progress steps :func:`compile_model` reports as planned (for a progress bar's total; the
    compile reports a larger total with each step should onnx-fp32 be added as the reference, :data:`Progress`)."""
    onnx = Path(req.model).suffix.lower() == ".onnx"
    return _steps(_wanted(req.profiles, onnx), onnx)


def _steps(wanted: dict[str, list[str]], onnx: bool) -> int:
    """Return how many progress steps a compile of the variants ``wanted`` takes: checking inputs, converting (an ONNX
    source, :func:`_converts`), building and measuring each variant to build, writing the result."""
    return 2 * len(build_order(list(wanted))) + 2 + _converts(wanted, onnx)


def _versions() -> dict[str, str | None]:
    return {
        "edge_kit": edge_kit.__version__,
        "tensorflow": converter_version(),
        "ai_edge_litert": _version_of("ai-edge-litert"),
        "ai_edge_quantizer": _version_of("ai-edge-quantizer"),
        **{k: v for t in TARGETS.values() for k, v in t.tool_versions().items()},
    }


def _check_target(target: Path, model: Path) -> None:
    """Check that ``target`` (``OUT/<model name>``) may be replaced by this compile's result.

    Raises:
        InputError: it exists but is not an earlier compile's result (a file, or a folder without a
            ``manifest.json``: replacing it would delete what the user keeps there), or the model
            compiled is inside it (a SavedModel folder compiled with ``--out`` its parent).
    """
    if not target.exists():
        return
    resolved = target.resolve()
    if resolved == Path(model).resolve() or resolved in Path(model).resolve().parents:
        raise InputError(f"{target}: the output folder would replace the model being compiled; choose another --out")
    if not target.is_dir() or not (target / "manifest.json").is_file():
        raise InputError(f"{target}: exists and is not an edgekit compile result (no manifest.json), and the compile "
                         "replaces that folder; move it away or choose another --out")


FLOAT_SOURCE_VARIANTS = ("fp32", "fp16", "dynamic-int8", "int8")  # what ai-edge-quantizer makes from a float .tflite


def _refusal(spec: VariantSpec, source: Source, calib: Dataset | None) -> str | None:
    """Return why ``spec`` cannot be built from this source and data, or None."""
    if spec.runtime in ("onnxruntime", "tensorrt"):  # trt-*: the onnx-fp32 model (+ a calibration table)
        from edge_kit.compiler.onnx_variants import refusal

        if spec.runtime == "tensorrt" and spec.needs_calibration and calib is None and source.kind != "tflite":
            return ("the TensorRT int8 engine needs the calibration table the host computes from --calib: "
                    "pass --calib FILE.npz (a few hundred inputs)")
        return refusal(source.kind, spec.needs_calibration, calib)
    if spec.pruning and source.kind != "keras":
        return (f"pruning needs the Keras model (.keras or .h5): {'an' if source.kind == 'onnx' else 'a'} {source.kind} source has no editable layers; "
                "every other variant can be built from it")
    if source.kind in ("tflite", "onnx"):  # an ONNX source is its float32 .tflite conversion from here on
        own = PRECISION_TO_VARIANT[source.tflite_precision or "float32"]
        made = set(FLOAT_SOURCE_VARIANTS) if own in ("fp32", "fp16") else {own}
        made |= {t.compiled_variant for t in TARGETS.values()
                 if t.compiled_variant and parse_variant(t.compiled_variant).base in made}
        if spec.id not in made:
            return (f"cannot be made from a {source.tflite_precision} .tflite file (a quantized model cannot be "
                    "made float again): give the float model it came from")
    if spec.needs_calibration and calib is None and not (source.kind == "tflite" and source.tflite_precision == "int8"):
        return "full-integer int8 needs calibration data: pass --calib FILE.npz (a few hundred inputs)"
    target = compiler_of(spec.id)
    return target.compiler_unavailable() if target else None


def _compiled_stats(data: bytes, base: bytes, base_id: str) -> ModelStats:
    """Return the :class:`ModelStats` of a model an accelerator's compiler made (``edgetpu``) from the variant
    ``base_id`` (its bytes ``base``). The compiler replaces the ops it maps with one custom op (``edgetpu-custom-op``)
    that only the accelerator's delegate resolves and whose weights it lays out itself: no interpreter here loads the
    model, and a count of its file would find neither those ops' MACs nor their weights. Sizes, precision and the op
    histogram are the file's own; inputs and outputs, which the compiler keeps, are read from the base's interpreter;
    MACs, weights and sparsity are the base's (the same computation), and ``methods`` say so.

    Raises:
        ValueError: either file is not a ``.tflite`` model, or the base does not load.
    """
    import dataclasses

    own, of_base = analyse(data, ports_from=base), analyse(base)
    said = (f"the {base_id} variant's figure (the model it was compiled from, the same computation): the compiler's "
            "custom op holds the ops it mapped and their weights, which a count of this file cannot see")
    return dataclasses.replace(
        own, macs=of_base.macs, macs_nonzero=of_base.macs_nonzero, weights=of_base.weights,
        weights_nonzero=of_base.weights_nonzero,
        methods={**own.methods, **{k: said for k in ("macs", "macs_nonzero", "weights", "sparsity")}})


def _calibration_used(samples: int) -> dict[str, int]:
    """Return how many samples of ``--calib`` each calibrator reads: the first ones, in file order."""
    from edge_kit.compiler.convert import MAX_CALIBRATION_SAMPLES
    from edge_kit.compiler.onnx_variants import CALIB_SAMPLES

    return {"litert": min(samples, MAX_CALIBRATION_SAMPLES), "onnxruntime": min(samples, CALIB_SAMPLES),
            "tensorrt": min(samples, CALIB_SAMPLES)}


def _check_train(train: Dataset, source: Source) -> None:
    """Check ``--train`` can fine-tune ``source`` as pruning does: a single-input, single-output Keras
    classifier trained with sparse cross-entropy on one integer class per sample.

    Raises:
        InputError: no ``y``, ``y`` not one integer per sample (one-hot rows, floats), a class the
            model's output does not have, or a model with several inputs or outputs (the message
            names the file and says what to do).
    """
    where = f"{train.path}: --train"
    y = train.labels.get("y")
    if y is None:
        raise InputError(f"{where} needs integer class labels y (fine-tuning trains a classifier)")
    if not np.issubdtype(y.dtype, np.integer) or int(np.prod(y.shape[1:])) != 1:
        raise InputError(f"{where} labels 'y' have shape {y.shape} and dtype {y.dtype}; fine-tuning needs one integer "
                         "class per sample (save y.argmax(axis=1) for one-hot rows)")
    if source.keras_model is None:
        return  # pruning, the only user of --train, needs the Keras model and says so per variant
    if len(source.inputs) != 1 or len(source.outputs) != 1:
        raise InputError(f"{where}: fine-tuning after pruning takes a model with one input and one output (this one has "
                         f"inputs {', '.join(source.inputs)} and outputs {', '.join(source.outputs)}); leave --train out "
                         "to build the pruned variants without fine-tuning")
    classes = int(source.keras_model.outputs[0].shape[-1] or 0)
    bad = np.flatnonzero((y.reshape(-1) < 0) | (y.reshape(-1) >= classes))
    if len(bad):
        raise InputError(f"{where} labels 'y' hold class {int(y.reshape(-1)[bad[0]])} at sample {int(bad[0])}, but the "
                         f"model's output has {classes} classes (0..{classes - 1}); give class indices of that output")


def _prepared(source: Source, seconds: float) -> Graph | bytes:
    """Return what every variant of ``source`` is made from: its TensorFlow graph, traced with a deadline of
    ``seconds`` (:func:`watched`: TensorFlow calls the Keras model or the SavedModel's signature in this process to
    trace it), or for a ``.tflite`` its float32 rewrite (:func:`~edge_kit.compiler.tflite_edit.as_float32`).

    Raises:
        CompileError: the flatbuffer could not be rewritten.
    """
    if source.kind not in ("tflite", "onnx"):
        what = "the Keras model" if source.kind == "keras" else "the SavedModel's serving_default signature"
        with watched(f"TensorFlow's tracing of {what} to a concrete function", seconds, cause=CONVERSION_CAUSE):
            return source_graph(source)
    try:
        return as_float32(source.tflite or b"")[0]
    except Exception as exc:  # noqa: BLE001 - flatbuffer parsing raises assorted types on odd files
        raise CompileError(f"{source.path}: could not rewrite the .tflite to float32 for quantizing ({exc})") from None


def _build(plan: _Plan, source: Source, graph: Callable[[], Graph | bytes], req: CompileRequest, calib: Dataset | None,
           train: Dataset | None, built: dict[str, _Plan], built_extra: dict[str, Any] | None = None) -> tuple[bytes, str]:
    """Return (flatbuffer, how it was made) for one planned variant. Raises CompileError.

    ``graph`` gives the source's TensorFlow graph, or for a ``.tflite`` source its float32 rewrite;
    either is made once and shared by every variant. Each conversion step that runs in this process has a deadline
    (:func:`watched`; :func:`~edge_kit.compiler.analysis.conversion_deadline` of the source's size and
    ``req.timeout``), and a calibration inside it its own (its clock standing still meanwhile).
    """
    spec = plan.spec
    convert_seconds = conversion_deadline(source.size, req.timeout)

    def conversion(doing: str) -> Any:
        """Return the context that gives a conversion step (``doing``, naming the tool and variant) its deadline."""
        return watched(doing, convert_seconds, cause=CONVERSION_CAUSE)
    calib_x = calib.x if calib is not None else None
    built_extra = {} if built_extra is None else built_extra  # shared between variants: the ONNX export

    def calibration(calibrator: str, by: str) -> Any:
        """Return the context that gives this variant's calibration its deadline (:func:`watched`), the clock
        started by the calibrator's first sample: a calibrator runs the model over --calib in this process."""
        if calib is None or not spec.needs_calibration:
            return contextlib.nullcontext(None)
        used = _calibration_used(len(calib))[calibrator]
        return watched(f"the int8 calibration of {spec.id} on {calib.path.name} ({by}, {used} samples)",
                       inference_deadline(used, req.timeout), at_once=False)
    if spec.runtime in ("onnxruntime", "tensorrt"):
        from edge_kit.compiler.onnx_variants import build, export_graph

        exported = ""
        if source.kind != "onnx":  # Keras / SavedModel: exported once, every onnx-* variant made from it
            if "onnx_export" not in built_extra:
                graph_of = graph()
                try:
                    if not isinstance(graph_of, Graph):
                        raise CompileError(f"{spec.id}: no TensorFlow graph to export")
                    with conversion(f"tf2onnx's export of the model to ONNX (for {spec.id})"):
                        built_extra["onnx_export"] = export_graph(graph_of.function, source.inputs, source.outputs)
                except CompileError as exc:
                    built_extra["onnx_export"] = exc  # every onnx-* variant fails with the same reason, exported once
            if isinstance(built_extra["onnx_export"], CompileError):
                raise built_extra["onnx_export"]
            data, how = built_extra["onnx_export"]
            exported = how + "; then "
        else:
            data = source.onnx or b""
        fixed = source.pinned_onnx() if source.kind == "onnx" else None  # not shape-inferred again in this process
        if spec.runtime == "tensorrt":  # the engine is built on the device; the host ships its input
            from edge_kit.compiler import trt_variants

            if "onnx_fp32" not in built_extra:  # once for trt-fp16 and trt-int8
                built_extra["onnx_fp32"] = build("onnx-fp32", data, source.inputs, calib_x, fp32=fixed,
                                                 seconds=convert_seconds)[0]
            fp32 = built_extra["onnx_fp32"]
            with calibration("tensorrt", "ONNX Runtime's calibrator") as calibrating:
                artifact, how, files = trt_variants.build(spec.id, fp32, calib_x, calibrating,
                                                          ids=id_inputs(source.input_types))  # token ids: no int8 range
            plan.extra["files"] = files
            return artifact, exported + how
        with calibration("onnxruntime", "ONNX Runtime's quantize_static") as calibrating:
            artifact, how = build(spec.id, data, source.inputs, calib_x, calibrating, fp32=fixed,
                                  seconds=convert_seconds)
        return artifact, exported + how
    target = compiler_of(spec.id)
    if target is not None:
        base = built.get(spec.base or "")
        if base is None or base.data is None:
            raise CompileError(f"{spec.id}: the {spec.base} variant it is compiled from was not built")
        try:
            data, mapping = target.compile(base.data)
        except RuntimeError as exc:
            raise CompileError(f"{spec.id}: {exc}") from None
        try:  # what the table and the manifest will read of it, read now: a file it cannot read fails this variant alone
            _compiled_stats(data, base.data, spec.base or "")
        except ValueError as exc:
            why = str(exc).removesuffix("; download or export it again")  # advice for a source, not for this file
            raise CompileError(f"{spec.id}: the model {target.key}'s compiler wrote cannot be read ({why}); the "
                               f"{spec.base} variant is kept: compile again, and report it with the compiler's version "
                               "if it happens again") from None
        plan.extra["compiler_mapping"] = mapping
        return data, f"{mapping['method']} from {spec.base}"
    if source.kind in ("tflite", "onnx"):
        if source.kind == "onnx" and spec.id == "fp32":
            return source.tflite or b"", f"{CONVERTER} float32 conversion of the ONNX model (inputs in the ONNX layout)"
        if PRECISION_TO_VARIANT[source.tflite_precision or "float32"] == spec.id:
            return source.tflite or b"", "source .tflite as is"
        how = {"float32": "float16 weights stored as float32, standalone RELUs folded into the ops before them",
               "float16": "ai-edge-quantizer float16 weight casting",
               "dynamic-int8": "ai-edge-quantizer dynamic_wi8_afp32",
               "int8": INT8_TFLITE_METHOD}[spec.precision]
        prepared = graph()
        with conversion(f"ai-edge-quantizer's {spec.precision} quantization of {spec.id}"), \
                calibration("litert", "ai-edge-quantizer") as calibrating:
            data = quantize_tflite(prepared, spec.precision, calib_x, variant=spec.id, calibrating=calibrating)
        if spec.precision == "int8" and (left := float_ops(data)):  # e.g. a custom op the quantizer cannot take
            how += "; left float by the quantizer: " + ", ".join(f"{n} x{c}" for n, c in left.items())
        return data, how
    if spec.pruning:
        from edge_kit.compiler import pruning

        train_xy = (next(iter(train.x.values())), train.labels["y"].reshape(-1)) if train is not None else None
        prune = pruning.magnitude_prune if spec.pruning == "magnitude" else pruning.channel_prune
        tuning = contextlib.nullcontext() if train is None else watched(
            f"the fine-tuning of {spec.id} on {train.path.name} ({req.epochs} epoch(s) of {len(train)} samples)",
            max(1, req.epochs) * inference_deadline(len(train), req.timeout))  # --timeout: per pass over the data
        with tuning:
            model = prune(source.keras_model, spec.sparsity, train_xy, epochs=req.epochs)
        if train is not None:
            plan.extra["fine_tuned"] = {"epochs": req.epochs, "samples": len(train), "data_sha256": train.sha256}
        with conversion(f"TensorFlow's tracing of the pruned model of {spec.id} to a concrete function"):
            graph = keras_graph(model, source.inputs, source.outputs)
        how = f"{spec.pruning} pruning{' + fine-tuning' if train is not None else ' (no fine-tuning: no --train)'}, TFLite converter"
        with conversion(f"the TFLite converter's int8 conversion of {spec.id}"), \
                calibration("litert", "TensorFlow's converter") as calibrating:
            return to_tflite(graph, "int8", calib_x, variant=spec.id, calibrating=calibrating), how
    prepared = graph()
    with conversion(f"the TFLite converter's {spec.precision} conversion of {spec.id}"), \
            calibration("litert", "TensorFlow's converter") as calibrating:
        return to_tflite(prepared, spec.precision, calib_x, variant=spec.id, calibrating=calibrating), "TFLite converter"


def _exact_ids(spec: VariantSpec, source: Source, data: bytes, how: str) -> tuple[bytes, str]:
    """Return a full-integer ``.tflite`` variant with its integer or boolean inputs (token ids, which every variant
    takes as float32 and casts inside: :func:`id_inputs`; a float64 or float16 input is quantized as any float input)
    taking float32 again, as :func:`~edge_kit.compiler.tflite_edit.float_id_inputs` makes it, and ``how`` it was made saying so. Quantized
    with the scale of the calibration ids, id 298 reached the model as 297.

    Raises:
        CompileError: such an input was quantized in a way that cannot be undone (the variant fails with the reason).
    """
    from edge_kit.compiler.tflite_edit import float_id_inputs

    ids = id_inputs(source.input_types)
    if not ids:
        return data, how
    try:
        data, kept = float_id_inputs(data, ids)
    except ValueError as exc:
        raise CompileError(f"variant {spec.id}: {exc}; leave {spec.id} out (the float variants take ids exactly)") from None
    if kept:
        how += ("; input " + ", ".join(f"'{n}'" for n in kept) + " kept float32 (ids, cast inside the model: "
                "quantized with the calibration ids' scale, they would be rounded to other ids)")
    return data, how


def broken_outputs(outputs: dict[str, dict[str, np.ndarray]], where: str | None,
                   reference_id: str = "fp32") -> dict[str, str]:
    """Return, by variant id, why a variant other than the reference (``reference_id``: fp32, or onnx-fp32 for an
    ONNX source with no LiteRT conversion) fails: an output holding NaN or infinity on the inputs ``where`` names
    (the first output and sample named) where the reference's are finite (a model computing NaN itself is refused
    before; its variants are not judged here)."""
    reference = outputs.get(reference_id)
    if reference is not None and not all(np.isfinite(v).all() for v in reference.values()):
        return {}
    broken = {}
    for vid, outs in outputs.items():
        for name, value in outs.items() if vid != reference_id else ():
            bad = ~np.isfinite(value.reshape(len(value), -1)).all(axis=1)  # per sample (the batch axis first)
            if bad.any():
                on = f" on {where}" if where is not None else ""
                broken[vid] = (f"its output '{name}' holds NaN or infinity{on} (first at sample {int(np.argmax(bad))}) "
                               f"where the {reference_id} variant's outputs are finite: not deployable")
                break
    return broken


def _evaluate(plan: _Plan, outputs: dict[str, np.ndarray] | None, evalset: Dataset | None, fid_where: str,
              reference: dict[str, np.ndarray] | None, method: str, scorer: Any,
              reference_id: str = "fp32", unrun: str | None = None) -> tuple[Accuracy, Fidelity]:
    """Return accuracy on the eval set and per-output fidelity against the reference variant's outputs
    (``reference``, of the variant ``reference_id``) for one artifact.

    ``outputs`` are the artifact's outputs (None when it was not run: ``unrun`` says why) on the inputs ``fid_where``
    names: a data file, or without one the seeded random samples of :func:`~edge_kit.compiler.data.random_inputs`
    (:func:`~edge_kit.compiler.data.is_random`); ``scorer`` the task metric (:class:`device_agents.metrics.Scorer`).
    A metric that fails on these outputs is recorded as not measured, with the reason.
    """
    from device_agents.errors import MetricError
    from device_agents.inference import fidelity as fid

    target = compiler_of(plan.spec.id)
    if target is not None:
        why = f"a model compiled for {target.summary} runs only there; measured on the device by the agent"
        return Accuracy(measured=False, method=why), Fidelity(measured=False, method=why)
    if plan.spec.built_on_device:
        from edge_kit.compiler.trt_variants import NOT_MEASURED

        return Accuracy(measured=False, method=NOT_MEASURED), Fidelity(measured=False, method=NOT_MEASURED)
    accuracy = Accuracy(measured=False, method="not measured: no --eval data")
    fidelity = Fidelity(measured=False, method=f"not measured: {unrun or 'the variant was not run'}")
    if evalset is not None and outputs is not None:
        try:
            scored = scorer.score(outputs, evalset.labels)
            accuracy = Accuracy(measured=True, task=scored["task"], metric=scored["metric"], value=scored["value"],
                                figures=scored["figures"], samples=len(evalset), method=f"{method} on {evalset.path.name}")
        except MetricError as exc:
            accuracy = Accuracy(measured=False, method=f"not measured: {exc}")
    if outputs is not None and reference is not None:
        try:
            got = fid(outputs, reference, classes=scorer.class_outputs(reference))
            fidelity = Fidelity(measured=True, samples=len(next(iter(reference.values()))), inputs=fid_where,
                                method=f"{method}, against the {reference_id} variant's outputs", **got)
        except ValueError as exc:  # NaN or infinity in an output: a figure on it would be a lie
            fidelity = Fidelity(measured=False, method=f"not measured on {fid_where}: {exc}")
    elif outputs is not None:
        fidelity = Fidelity(measured=False, method=f"not measured: no {reference_id} reference could be built")
    return accuracy, fidelity


def _version_of(package: str) -> str | None:
    from edge_kit.compiler.onnx_source import version

    return version(package)


def _onnx_versions() -> dict[str, str | None]:
    from edge_kit.compiler.onnx_source import version

    return {"onnx": version("onnx"), "onnx2tf": version("onnx2tf"), "onnxruntime": version("onnxruntime")}


def _convert_onnx(source: Source, data: Dataset | None, profiles: list[Profile],
                  runner: Callable[[dict[str, np.ndarray], str, str], ChildInference], litert: str) -> list[str]:
    """Convert an ONNX source to float32 once and measure the conversion against ONNX Runtime.

    Sets ``source.tflite`` (every variant is made from it) and ``source.conversion`` (the manifest's
    ``model.conversion``). The inputs are the first :data:`~edge_kit.compiler.onnx_source.FIDELITY_SAMPLES`
    of ``data`` (``--eval``, else ``--calib``), or a few random samples when there is none
    (:func:`~edge_kit.compiler.data.random_inputs`: ids where the model takes integers);
    ``runner(inputs, folder name, where)`` gives what runs both models on them, each in a child with
    a deadline.

    Returns:
        The warnings (printed and recorded on the fp32 artifact): one when the worst output is below
        the conversion floor, the highest of :data:`~edge_kit.compiler.onnx_source.CONVERSION_WARN_SNR_DB`
        and the profiles' ``min_fidelity_snr_db``.

    Raises:
        Unconvertible: onnx2tf cannot convert the model (names the op).
        InputError: onnx2tf is not installed or made ops LiteRT does not run, or the conversion is
            catastrophic: an output below :data:`~edge_kit.compiler.onnx_source.CONVERSION_REFUSE_SNR_DB`
            (the error outweighs the signal), or ONNX Runtime's own outputs hold NaN or infinity, or
            either model crashes, loops past the deadline or fails on those inputs; nothing is written.
        CompileError: the converter timed out or lost an input or output, or the child that pinned the input
            shapes at load could not (:meth:`~edge_kit.compiler.sources.Source.pinned_onnx`).
    """
    from edge_kit.compiler import onnx_source as ox

    started = time.perf_counter()
    source.tflite, transposed = ox.convert(source.path, source.onnx or b"", source.inputs, source.outputs)
    source.tflite_precision = "float32"
    seconds = time.perf_counter() - started
    if data is not None:
        xs = {name: x[: ox.FIDELITY_SAMPLES] for name, x in data.x.items()}
        where = f"{data.path.name} (first {len(next(iter(xs.values())))} samples)"
    else:
        xs, where = random_inputs(source.inputs, source.input_types, source.id_bounds())
    fid = ox.conversion_fidelity(source.path, source.pinned_onnx(), source.tflite, runner(xs, "conversion", where),
                                 random=data is None)
    samples = len(next(iter(xs.values()))) - fid["left_out"]
    if fid["left_out"]:
        where += left_out_said(fid["left_out"], "ONNX Runtime's")
    floor = max([ox.CONVERSION_WARN_SNR_DB, *(p.constraints.min_fidelity_snr_db for p in profiles
                                               if p.constraints.min_fidelity_snr_db is not None)])
    ort = ox.version("onnxruntime")
    source.conversion = {
        "converter": ox.CONVERTER, "converter_version": ox.version("onnx2tf"),
        "options": "-kat (every input keeps its ONNX layout); its Keras model converted once, float32 only, no quantization by the converter",
        "reference": "onnxruntime", "reference_version": ort, "reference_provider": "CPUExecutionProvider",
        "inputs": where, "samples": samples,
        **{k: fid[k] for k in ("snr_db", "cosine", "max_abs_error", "mean_abs_error") if k in fid},
        "outputs": fid["outputs"], "outputs_transposed_back": transposed, "warn_below_snr_db": floor, "refuse_below_snr_db": ox.CONVERSION_REFUSE_SNR_DB,
        "seconds": round(seconds, 3),
        "method": (f"ONNX Runtime {ort} (CPUExecutionProvider) on the ONNX file and LiteRT {litert} on the converted "
                   "float32 .tflite, same inputs one sample at a time; per output SNR dB, cosine, max/mean abs error"),
    }
    worst, figures = min(fid["outputs"].items(), key=lambda kv: kv[1]["snr_db"])
    said = (f"output '{worst}' of the {ox.CONVERTER} conversion is {figures['snr_db']:.1f} dB from ONNX Runtime "
            f"(cosine {figures['cosine']:.3f}, max abs error {figures['max_abs_error']:.3g}) on {where}")
    if figures["snr_db"] < ox.CONVERSION_REFUSE_SNR_DB:
        raise InputError(f"{source.path}: {said}: the converted model computes something else, so no variant is built; "
                         "check the output in ONNX Runtime and report it to onnx2tf, or export the model another way")
    if figures["snr_db"] < floor:
        warning = (f"conversion: {said}, below {floor:g} dB: the converted model may compute something else and every "
                   "variant is made from it; see model.conversion in the manifest")
        warnings.warn(warning, stacklevel=3)
        return [warning]
    return []


def _equal_inputs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """Return whether the inputs ``a`` and ``b`` ({input name: samples}) hold the same names, shapes, types and values."""
    return list(a) == list(b) and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype
                                      and np.array_equal(a[k], b[k]) for k in a)


def _fidelity_warnings(artifact: Artifact, profiles: list[Profile]) -> list[str]:
    """Return a warning per profile whose ``min_fidelity_snr_db`` this artifact's worst output misses."""
    fid = artifact.fidelity
    if not fid or not fid.measured or fid.snr_db is None:
        return []
    worst = min((fid.outputs or {}).items(), key=lambda kv: kv[1]["snr_db"], default=(None, None))[0]
    then = ("on random samples, so check it with --eval data (selection judges fidelity on the eval set only)"
            if is_random(fid.inputs) else "(check --calib holds real inputs); selection will not choose it there")
    return [f"{artifact.id}: output '{worst}' is {fid.snr_db:.1f} dB from fp32, below {p.name}'s "
            f"min_fidelity_snr_db {p.constraints.min_fidelity_snr_db:g}: it may compute something else {then}"
            for p in profiles if artifact.id in p.variants and p.constraints.min_fidelity_snr_db is not None
            and fid.snr_db < p.constraints.min_fidelity_snr_db]


def compile_model(req: CompileRequest, progress: Progress | None = None) -> Manifest:
    """Build, measure and record every variant the profiles in ``req`` ask for, calling ``progress`` (:data:`Progress`)
    as each step starts.

    Returns:
        The manifest, already written to ``<out>/<model>/manifest.json``. Variants that cannot be
        built are recorded with ``status`` ``not-built`` (and why) or ``failed`` (and the error).

    Raises:
        InputError: the model, a data file or the output folder is unusable, ``<out>/<model>`` holds
            something that is not an earlier compile's result, an ONNX model does not convert
            (:class:`~edge_kit.compiler.onnx_source.Unconvertible`) and the profiles ask for no ONNX Runtime variant
            (when they do, those are built alone, measured against onnx-fp32, and every LiteRT variant is
            ``not-built`` with that line, also warned), or an ONNX model converts to something else (SNR below 0 dB against ONNX Runtime); nothing is written (an
            ``out`` folder this compile made is removed again).
        ConfigError: two profiles have the same name.
        MetricError: unknown task, labels in the wrong format for it, a user metric that does not load,
            or a metric that cannot score the fp32 variant's outputs (a user function that raises or
            returns a non-number, class labels outside the scored output); nothing is written.
        CompileError: writing the result failed (the previous result, if any, is left intact).
    """
    out = Path(req.out)
    made = not out.exists()  # a folder this compile makes is removed again when it fails before writing in it
    result_written(False)
    try:
        with tempfile.TemporaryDirectory(prefix="edgekit-compile-") as work:  # inputs the children map, models they run
            return _compile_model(req, progress, Path(work))
    except BaseException:
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _compile_model(req: CompileRequest, progress: Progress | None, work: Path) -> Manifest:
    """:func:`compile_model`, but a failure may leave ``req.out`` made and empty; ``work`` is a scratch folder."""
    total = plan_steps(req)

    def step(msg: str) -> None:
        if progress is not None:
            progress(msg, total)

    from device_agents.runtimes import get_runtime

    out = Path(req.out)
    step("checking inputs")
    names = [p.name for p in req.profiles]
    if twice := next((n for n in names if names.count(n) > 1), None):  # the manifest keys profiles by name
        raise ConfigError(f"profile '{twice}' is given twice (-p); give each once (a profile file is named by its "
                          "name: key, else its file name)")
    source = load_source(req.model, req.input_shapes, req.name, load_seconds=inference_deadline(0, req.timeout))
    _check_target(out / source.name, source.path)
    types = source.input_types
    calib = load_dataset(req.calib, "calib", source.inputs, labels=False, types=types) if req.calib else None
    evalset = load_dataset(req.eval, "eval", source.inputs, labels=True, types=types) if req.eval else None
    train = load_dataset(req.train, "train", source.inputs, labels=True, types=types) if req.train else None
    metric = MetricSpec.build(req.task, req.task_options, req.metric, req.decode)
    scorer = metric.scorer()
    if evalset is not None:
        scorer.check(evalset.labels, len(evalset), str(evalset.path))
    if train is not None:
        _check_train(train, source)
    calib_noise = noise_warning(calib) if calib is not None else None
    checks: dict[str, dict[str, Any]] = {"calib": {}, "train": {}, "eval": {}}  # recorded with each file in the manifest
    for role, data in (("calib", calib), ("train", train)):
        if data is not None and evalset is not None:
            checks[role]["eval_overlap"] = shared = shared_samples(data, evalset)
            checks[role]["eval_overlap_warning"] = leak_warning(data, role, evalset, shared)
    if calib is not None and evalset is not None:
        checks["calib"]["eval_range_warning"] = range_warning(calib, evalset, types)
    for said in (calib_noise, *(w for c in checks.values() for k, w in c.items() if k.endswith("warning"))):
        if said:
            warnings.warn(said, stacklevel=2)

    runtime = get_runtime("litert")
    method = f"measured on host with LiteRT {runtime.version()} interpreter (XNNPACK, {req.threads} thread(s))"

    def method_of(spec: VariantSpec) -> str:
        if spec.runtime != "onnxruntime":
            return method
        ort = get_runtime("onnxruntime")
        return f"measured on host with ONNX Runtime {ort.version()} (CPUExecutionProvider, {req.threads} thread(s))"

    # inputs already given to a runner, with that runner's outputs by model: the conversion check's inputs are often
    # all of --eval (or --calib), which fp32 and onnx-fp32 (the ONNX model the check ran) are run on again
    ran: list[tuple[dict[str, np.ndarray], dict[bytes, dict[str, np.ndarray]]]] = []

    def runner(xs: dict[str, np.ndarray], name: str, where: str) -> ChildInference:
        """Return what runs a model over ``xs`` in a child, with the deadline for that many samples; a model it
        was given before on equal inputs is not run again (:class:`ChildInference`'s ``known``).

        Raises:
            CompileError: the inputs could not be written into the scratch folder.
        """
        samples = len(next(iter(xs.values()))) if xs else 0
        known = next((k for seen, k in ran if _equal_inputs(seen, xs)), None)
        if known is None:
            known = {}
            ran.append((xs, known))
        try:
            return ChildInference(xs, work / name, where, timeout=inference_deadline(samples, req.timeout),
                                  threads=req.threads, known=known)
        except OSError as exc:
            raise CompileError(f"{work}: could not write the {where} inputs the runs of the model read "
                               f"({exc.strerror or exc}); free space in the temporary folder (TMPDIR)") from None

    conversion_warnings: list[str] = []
    unconverted = None  # why the ONNX source has no LiteRT conversion (its ONNX Runtime variants need none)
    wanted = _wanted(req.profiles, source.kind == "onnx")
    if _converts(wanted, source.kind == "onnx"):  # not for ONNX Runtime and TensorRT variants alone
        step("converting ONNX")
        from edge_kit.compiler.onnx_source import Unconvertible

        try:
            conversion_warnings = _convert_onnx(source, evalset or calib, req.profiles, runner, runtime.version())
        except Unconvertible as exc:
            if not any(parse_variant(v).format == "onnx" for v in wanted):  # nothing to build without it
                raise
            unconverted = str(exc)
            warnings.warn(f"{exc}; only the ONNX Runtime variants are built, measured against onnx-fp32", stacklevel=2)
            wanted.setdefault("onnx-fp32", [])  # the reference in fp32's place
            total = _steps(wanted, onnx=True)  # its build and measuring steps, which the plan did not count
    # every variant's fidelity is measured against its outputs
    reference_id = "onnx-fp32" if unconverted or "fp32" not in wanted else "fp32"
    writable_folder(out)

    plans = {s.id: _Plan(s, wanted.get(s.id, [])) for s in build_order(list(wanted))}
    for plan in plans.values():
        plan.refusal = unconverted if unconverted and plan.spec.format == "tflite" else _refusal(plan.spec, source, calib)
    # the targets whose op support each variant is checked against: the LiteRT delegate each profile that wants it
    # runs (runtime.delegate) where that delegate uses the profile's accelerator; not every target of that accelerator:
    # a Jetson profile runs LiteRT on xnnpack (its GPU through TensorRT), so a LiteRT GPU count is a path it never takes
    targets_of = {v: sorted({p.runtime.delegate for p in req.profiles if v in p.variants
                             if TARGETS[p.runtime.delegate].accelerator == p.hardware.accelerator != "none"})
                  for v in plans}

    # made once, shared by every precision
    graph = functools.cache(lambda: _prepared(source, conversion_deadline(source.size, req.timeout)))
    built: dict[str, _Plan] = {}
    shared: dict[str, Any] = {}  # made once for several variants (the ONNX export of a Keras/SavedModel source)
    fid_inputs = evalset or calib
    if fid_inputs is not None:
        fid_x, fid_where = fid_inputs.x, fid_inputs.path.name
    else:  # every variant is compared with the reference on the seeded random samples of an ONNX conversion check
        fid_x, fid_where = random_inputs(source.inputs, source.input_types, source.id_bounds())
    outputs: dict[str, dict[str, np.ndarray]] = {}
    outputs_of: Callable[[bytes], dict[str, np.ndarray]] | None = runner(fid_x, "fidelity", fid_where)
    unrun = None  # why the reference did not run on the random samples (no variant's fidelity is measured then)

    def reference_run(data: bytes) -> dict[str, np.ndarray]:
        """Return the reference variant's outputs (fp32's, else onnx-fp32's) over the data, run in a child with the
        deadline.

        Raises:
            InputError: the run crashed, looped past the deadline or refused the inputs; nothing is written.
        """
        try:
            return outputs_of(data)
        except ValueError as exc:  # the source model itself: every variant is made from it
            raise InputError(f"{req.model}: variant {reference_id}: {exc}; nothing was written (every variant is "
                             "made from this model)") from None

    # fp32 first, and run over the data at once: the int8 calibration that follows runs the model over --calib in
    # this process, where a model that loops on real inputs stops the whole compile at the calibration's deadline
    # (kept by the edgekit process, edge_kit.cli.worker) instead of failing the one variant
    for plan in sorted(plans.values(), key=lambda p: p.spec.id != reference_id):
        step(f"building {plan.spec.id}")
        if plan.refusal:
            continue
        started = time.perf_counter()
        try:
            data, how = _build(plan, source, graph, req, calib, train, built, shared)
            if plan.spec.format == "tflite" and plan.spec.precision == "int8" and compiler_of(plan.spec.id) is None:
                data, how = _exact_ids(plan.spec, source, data, how)
            if compiler_of(plan.spec.id) is None and not plan.spec.built_on_device:  # runs on this host's runtime
                try:  # what every device's smoke check at install would say, said here
                    probe_in_child(data, fmt="onnx" if plan.spec.format == "onnx" else "tflite", refusals=True)
                except ValueError as exc:
                    raise CompileError(f"variant {plan.spec.id}: {exc}") from None
        except CompileError as exc:
            plan.refusal = str(exc)
            plan.extra["failed"] = True
            continue
        plan.data = data
        plan.extra["how"] = how
        plan.extra["seconds"] = time.perf_counter() - started
        built[plan.spec.id] = plan
        if plan.spec.id == reference_id and outputs_of is not None:
            if fid_inputs is not None:
                outputs[reference_id] = reference_run(data)
            else:  # random samples, which the model may not take (ids past a table edge-kit cannot size)
                try:
                    outputs[reference_id] = outputs_of(data)
                except ValueError as exc:  # no variant is compared on them; the compile goes on
                    unrun = f"variant {reference_id}: {exc}; give --eval or --calib data the model takes"
                    outputs_of = None

    if fid_inputs is None and reference_id not in outputs:  # random samples serve only to compare with the reference
        unrun, outputs_of = unrun or f"no {reference_id} reference could be built", None
    if outputs_of is not None:
        for vid, plan in list(built.items()):
            if vid in outputs:  # the reference, run as soon as it was built
                continue
            if compiler_of(vid) is None and not plan.spec.built_on_device:  # a target-compiled model needs its hardware
                try:
                    outputs[vid] = outputs_of(plan.data or b"")
                except ValueError as exc:  # crashed, looped past the deadline, or refused the real inputs
                    plan = built.pop(vid)
                    plan.data, plan.refusal, plan.extra["failed"] = None, f"variant {vid}: {exc}", True
    if fid_inputs is None and reference_id in outputs:  # random samples: those the model does not take are left out
        keep = finite_samples(outputs[reference_id])
        if not keep.all() and keep.sum() >= MIN_RANDOM_KEPT * len(keep):  # else no fidelity, said by _evaluate
            outputs = {vid: {k: y[keep] for k, y in outs.items()} for vid, outs in outputs.items()}
            fid_where += left_out_said(int((~keep).sum()), f"the {reference_id} variant's")
    reference = outputs.get(reference_id)
    for vid, why in broken_outputs(outputs, fid_where, reference_id).items():  # a variant computing NaN is not deployable
        plan = built.pop(vid)
        plan.data, plan.refusal, plan.extra["failed"] = None, why, True
        outputs.pop(vid)
    for vid, plan in list(built.items()):  # an accelerator compiler's model of a variant refused above: the same
        base = plan.spec.base  # computation, refused with it (the host cannot analyse it without its base either)
        if compiler_of(vid) is not None and base and base not in built and base in plans:
            why = (plans[base].refusal or "").removeprefix(f"variant {base}: ")
            built.pop(vid)
            plan.data, plan.extra["failed"] = None, True
            plan.refusal = f"variant {vid}: compiled from the {base} variant, which was refused: {why}"
    if evalset is not None and reference is not None:  # a metric that cannot score the reference scores nothing
        from device_agents.errors import MetricError

        try:
            scored = scorer.score(reference, evalset.labels)
        except MetricError as exc:
            # the file and option first, as every other data-file error names them
            raise MetricError(f"{evalset.path.name}: --eval {exc} (scoring the {reference_id} variant's outputs on it); "
                              "nothing was written") from None
        if scored["value"] == 0:  # a model that scores nothing at all is far likelier fed mismatched labels
            checks["eval"]["warning"] = said = (
                f"{evalset.path}: the {reference_id} variant scores {scored['metric']} 0 on it, so every variant will: "
                "the labels probably do not match the outputs (class indices of another output, boxes in pixels for "
                "outputs in 0..1 or the other way round, another class numbering); check them against the "
                f"{reference_id} outputs")
            warnings.warn(said, stacklevel=2)

    for plan in plans.values():
        step(f"measuring {plan.spec.id}")
        spec = plan.spec
        common = dict(id=spec.id, profiles=plan.profiles, summary=spec.summary, precision=spec.precision,
                      pruning=spec.pruning, sparsity_requested=spec.sparsity, runtime=spec.runtime)
        if plan.data is None:
            status = "failed" if plan.extra.get("failed") else "not-built"
            plan.artifact = Artifact(status=status, reason=plan.refusal, **common)
            continue
        if spec.format == "onnx":
            from edge_kit.compiler.onnx_variants import analyse_onnx

            stats = analyse_onnx(plan.data)
            support = {}  # the accelerator targets are LiteRT's; ONNX Runtime picks its providers on the device
        elif (base := built.get(spec.base or "") if compiler_of(spec.id) is not None else None) is not None:
            stats = _compiled_stats(plan.data, base.data or b"", spec.base or "")
            support = {}  # the rule check is its base's (the compiler's input); the compiler's own mapping follows
        else:
            stats = analyse(plan.data)
            support = {key: check for key in targets_of[spec.id] if (check := TARGETS[key].rule_check(stats))}
        if "compiler_mapping" in plan.extra:
            support[plan.extra["compiler_mapping"]["method"]] = plan.extra["compiler_mapping"]
        accuracy, fidelity = _evaluate(plan, outputs.get(spec.id), evalset, fid_where, reference, method_of(spec), scorer,
                                       reference_id, unrun)
        calib_table = None
        for name, blob in plan.extra.get("files", {}).items():  # trt-int8's calibration table, shipped beside it
            from edge_kit.compiler.trt_variants import CALIB_METHOD

            calib_table = {"file": name, "sha256": sha256_bytes(blob), "bytes": len(blob), "method": CALIB_METHOD,
                           "embedded": "in the artifact's metadata_props, so it travels with the model"}
        plan.artifact = Artifact(
            status="built", file=spec.file, derived_from=plan.extra["how"],
            built_on_device=spec.built_on_device, calibration_table=calib_table,
            sha256=sha256_bytes(plan.data), bytes=stats.bytes, gzip_bytes=stats.gzip_bytes,
            sparsity=round(stats.sparsity, 6), macs=stats.macs, macs_nonzero=stats.macs_nonzero,
            weights=stats.weights, op_histogram=stats.op_histogram, inputs=stats.inputs, outputs=stats.outputs,
            accelerators=support, accuracy=accuracy, fidelity=fidelity, fine_tuned=plan.extra.get("fine_tuned"),
            build_seconds=round(plan.extra["seconds"], 3), **{**common, "precision": stats.precision},
            methods={**stats.methods, "build_seconds": BUILD_SECONDS_METHOD},
        )
        plan.artifact.warnings = (conversion_warnings if spec.id == "fp32" else []) + _fidelity_warnings(plan.artifact, req.profiles)
        for warning in plan.artifact.warnings:
            warnings.warn(warning, stacklevel=2)

    extra = {EVAL_FILE: _eval_bundle(evalset, reference, metric)} if evalset else {}
    onnx_built = "onnx_export" in shared or any(p.spec.format == "onnx" and p.data is not None for p in plans.values())
    manifest = Manifest(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=source.record(),
        calibration={**calib.record(), "samples_used": _calibration_used(len(calib)), "warning": calib_noise,
                     **checks["calib"]} if calib else None,
        eval={**evalset.record(), **metric.record(), "file": EVAL_FILE, "sha256": sha256_bytes(extra[EVAL_FILE]),
              "metric": scorer.task.headline if scorer.task is not None and scorer.user is None else None,
              "reference": reference_id if reference is not None else None, **checks["eval"]} if evalset else None,
        train={**train.record(), **checks["train"]} if train else None,
        versions={**_versions(), **(_onnx_versions() if source.kind == "onnx" or onnx_built else {}),
                  **({"tf2onnx": _version_of("tf2onnx")} if "onnx_export" in shared else {})},
        profiles={p.name: {"description": p.description, "accelerator": p.hardware.accelerator,
                           "delegate": p.runtime.delegate, "variants": list(p.variants)} for p in req.profiles},
        artifacts=[p.artifact for p in plans.values() if p.artifact is not None],
    )
    step("writing artifacts")
    for plan in plans.values():
        if plan.data is not None:
            extra.update(plan.extra.get("files", {}))
    _publish(out / source.name, plans, manifest, extra, req.signer)
    return manifest


def _eval_bundle(evalset: Dataset, reference: dict[str, np.ndarray] | None, metric: Any) -> bytes:
    """Return the ``.npz`` shipped to devices: inputs, labels, fp32 outputs and the metric spec.

    Keys as :mod:`edgekit_protocol.datafile` documents them, so the agent reads it like any data file.
    """
    from edgekit_protocol.datafile import input_key, output_key

    arrays = {input_key(name, len(evalset.x)): x for name, x in evalset.x.items()}
    arrays.update({("y" if k == "y" else f"y.{k}"): v for k, v in evalset.labels.items()})
    for name, out in (reference or {}).items():
        arrays[output_key(name, len(reference or {}))] = out
    arrays["metric"] = np.frombuffer(metric.to_bytes(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _publish(target: Path, plans: dict[str, _Plan], manifest: Manifest, extra: dict[str, bytes], signer: Any = None) -> None:
    """Write artifacts, ``extra`` files and the manifest (signed by ``signer`` when given) into a staging
    folder, then swap it in for ``target``.

    Raises:
        CompileError: a write or rename failed; the previous result is left in place. An interrupt
            (or any other exception) likewise puts the previous result back before it propagates.
        CompileInterrupted: a Ctrl-C came during the swap, which was held until the swap was done
            (:func:`~edge_kit.compiler.watch.interrupts_held`): the new result is in place, whole (exit 130).
    """
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.staging-"))
    note(staging=str(staging))  # for the edgekit process, should this worker die while writing (edge_kit.cli.worker)
    old = None
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the artifacts are shared (store, deploy) like their files
        for plan in plans.values():
            if plan.data is not None:
                atomic_write_bytes(staging / plan.spec.file, plan.data)
        for name, data in extra.items():
            atomic_write_bytes(staging / name, data)
        atomic_write_text(staging / "manifest.json", manifest.to_json(signer))
        with interrupts_held() as held:  # a Ctrl-C during the swap comes once it is done, whole (below)
            if target.exists():
                old = target.parent / f".{target.name}.old-{os.getpid()}"
                note(old=str(old))
                os.replace(target, old)
            pause_for_tests()  # between the two renames: where an interrupt not held would leave no result in place
            try:
                os.replace(staging, target)
            except OSError:
                if old is not None:
                    os.replace(old, target)  # put the previous complete result back
                raise
            note(published=str(target))  # truthy: where the complete result is
            result_written(True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise CompileError(f"{target}: could not write the result ({exc.strerror or exc}); nothing was changed") from None
    except BaseException:
        if old is not None and old.exists() and not target.exists():
            os.replace(old, target)  # interrupted between the two renames: the previous result comes back
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if held:  # the swap ran whole: the new result is in place, and the Ctrl-C stops the compile now
        raise CompileInterrupted(f"interrupted during the result swap, which was finished first: {target} holds the "
                                 "new result, complete (manifest.json and its variants)")
