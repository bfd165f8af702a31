"""The one table of model variants: what each id means and what it needs.

Variant ids are fixed strings, plus a parametrised family for pruning:

- ``int8-pruned-S``    magnitude (unstructured) pruning to S % zero weights, then full-integer int8
- ``int8-pruned-chS``  structured pruning: S % of the output channels of each prunable layer removed,
                       then full-integer int8

Options are checked against this table and bad combinations are refused with a reason, never
silently rewritten (for example ``edgetpu`` from a float ``.tflite`` input).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from edge_kit.config import closest

Precision = Literal["float32", "float16", "dynamic-int8", "int8"]
Pruning = Literal["magnitude", "channel"]


@dataclass(frozen=True)
class VariantSpec:
    """One row of the variant table.

    Attributes:
        id: the variant id as written in profiles and manifests.
        precision: numeric format of weights/activations in the artifact.
        pruning: None, ``magnitude`` or ``channel``.
        sparsity: requested pruning fraction in [0, 1).
        needs_calibration: conversion needs representative input data.
        base: the variant this one is derived from (``edgetpu`` is compiled from ``int8``).
        accelerator: the accelerator the variant is built for, if any.
        runtime: the device runtime that runs it (``litert``, ``onnxruntime`` or ``tensorrt``).
        format: the artifact's file format, its suffix: ``tflite`` or ``onnx``.
        built_on_device: the artifact is the input of a build the device does itself (a TensorRT
            engine, built at install); the host cannot run or measure what the device will run.
    """

    id: str
    precision: Precision
    pruning: Pruning | None = None
    sparsity: float = 0.0
    needs_calibration: bool = False
    base: str | None = None
    accelerator: str | None = None
    summary: str = ""
    runtime: str = "litert"
    format: str = "tflite"
    built_on_device: bool = False

    @property
    def file(self) -> str:
        """Return the artifact's file name (``<id>.tflite`` or ``<id>.onnx``)."""
        return f"{self.id}.{self.format}"

    @property
    def target(self) -> str:
        """Return the target that runs it, as a profile's ``targets`` names it: ``edgetpu`` for the
        Edge TPU variant (LiteRT with that delegate), else its runtime (one of :data:`TARGET_NAMES`)."""
        return "edgetpu" if self.accelerator == "edgetpu" else self.runtime


FIXED: dict[str, VariantSpec] = {
    v.id: v
    for v in (
        VariantSpec("fp32", "float32", summary="plain conversion; the fidelity reference"),
        VariantSpec("fp16", "float16", summary="float16 weights; for GPU delegates"),
        VariantSpec("dynamic-int8", "dynamic-int8", summary="int8 weights, float activations; no calibration"),
        VariantSpec(
            "int8", "int8", needs_calibration=True,
            summary="full-integer, calibrated, int8 input and output",
        ),
        VariantSpec(
            "edgetpu", "int8", needs_calibration=True, base="int8", accelerator="edgetpu",
            summary="int8 compiled by edgetpu_compiler",
        ),
        VariantSpec("onnx-fp32", "float32", runtime="onnxruntime", format="onnx",
                    summary="the ONNX model, shapes pinned; ONNX Runtime"),
        VariantSpec("onnx-fp16", "float16", runtime="onnxruntime", format="onnx",
                    summary="float16 weights and activations, float32 I/O; ONNX Runtime"),
        VariantSpec("onnx-int8", "int8", needs_calibration=True, runtime="onnxruntime", format="onnx",
                    summary="QDQ static int8, calibrated; ONNX Runtime"),
        VariantSpec("trt-fp16", "float16", runtime="tensorrt", format="onnx", built_on_device=True,
                    summary="the onnx-fp32 model; TensorRT fp16 engine built on the device at install"),
        VariantSpec("trt-int8", "int8", needs_calibration=True, runtime="tensorrt", format="onnx", built_on_device=True,
                    summary="the onnx-fp32 model + a calibration table from --calib; TensorRT int8 engine built on the device"),
    )
}
# What a profile's ``targets`` may list: every variant's VariantSpec.target.
TARGET_NAMES = ("tensorrt", "onnxruntime", "edgetpu", "litert")
_PRUNED = re.compile(r"^int8-pruned-(ch)?(\d{1,2})$")
EXAMPLES = [*FIXED, "int8-pruned-50", "int8-pruned-ch50"]


def parse_variant(variant_id: str) -> VariantSpec:
    """Return the spec of a variant id.

    Raises:
        ValueError: unknown id (the message suggests the closest valid one; ``int8-pruned-05`` is
            not ``int8-pruned-5``) or a pruning fraction outside 1..95 %.
    """
    if variant_id in FIXED:
        return FIXED[variant_id]
    m = _PRUNED.match(str(variant_id))
    if m:
        pct = int(m.group(2))
        if m.group(2) != str(pct):  # one id per level: -05 beside -5 would build the same variant twice
            raise ValueError(f"variant '{variant_id}': write the pruning without a leading zero "
                             f"(int8-pruned-{m.group(1) or ''}{pct})")
        if not 1 <= pct <= 95:
            raise ValueError(f"variant '{variant_id}': pruning must be 1..95 %, got {pct}")
        channel = bool(m.group(1))
        return VariantSpec(
            variant_id, "int8", pruning="channel" if channel else "magnitude", sparsity=pct / 100,
            needs_calibration=True,
            summary=f"{pct} % of {'output channels removed' if channel else 'weights zeroed'}, then int8",
        )
    hint = closest(variant_id, EXAMPLES)
    tail = f"; did you mean '{hint}'?" if hint else ""
    raise ValueError(
        f"unknown variant '{variant_id}'{tail} (valid: {', '.join(FIXED)}, int8-pruned-S, int8-pruned-chS)"
    )


def build_order(variant_ids: list[str]) -> list[VariantSpec]:
    """Return the specs to build for ``variant_ids``, each once, bases before what derives from them."""
    specs: dict[str, VariantSpec] = {}
    for vid in variant_ids:
        spec = parse_variant(vid)
        if spec.base and spec.base not in specs:
            specs[spec.base] = parse_variant(spec.base)
        specs.setdefault(spec.id, spec)
    return sorted(specs.values(), key=lambda s: s.base is not None)
