"""A device's service level, and how a measurement breaks it.

The profile's ``constraints`` apply unless the fleet file overrides them per device. Each bound is
optional. ``min_accuracy_ratio`` compares on-device top-1 accuracy with the fp32 variant's accuracy
on the same shipped eval set (measured on the device when it has been, else the manifest's host
figure). ``min_fidelity_snr_db`` bounds the worst output's SNR against the fp32 outputs on that
eval set, a label-free check that catches a variant that runs but computes something else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from edge_kit.profiles import Constraints
from edgekit_protocol.labels import accuracy_text, power_source

#: The variants a model's others are compared with (fidelity, and the accuracy ratio), in order of preference, as
#: :attr:`edge_kit.manifest.Manifest.reference_id` picks one: ``fp32``, else ``onnx-fp32`` (an ONNX model whose fp32
#: could not be converted). What judges a benchmark without its manifest (the monitor) takes the first of them that the
#: device measured for the model.
REFERENCE_VARIANTS = ("fp32", "onnx-fp32")


def effective_constraints(profile_constraints: Constraints, override: Constraints | None) -> Constraints:
    """Return the profile's constraints with every bound the override sets replaced."""
    if override is None:
        return profile_constraints
    return profile_constraints.model_copy(update=override.model_dump(exclude_unset=True))


@dataclass(frozen=True)
class Measured:
    """What selection needs of one variant on one device."""

    variant: str
    p90_ms: float
    avg_w: float | None
    energy_mj: float | None
    power_source: str  # sensor name, "estimated" or "not measured"
    accuracy: float | None
    model_mb: float
    snr_db: float | None = None  # worst output's fidelity SNR against fp32, when measured

    @classmethod
    def from_record(cls, record: dict[str, Any], model_bytes: float) -> Measured:
        """Return the selection view of an ``edgekit.bench/1`` record (``model_bytes`` NaN: size not known)."""
        power = record.get("power") or {}
        acc = record.get("accuracy") or {}
        fid = record.get("fidelity") or {}
        return cls(variant=record["variant"], p90_ms=record["latency_ms"]["p90"], avg_w=power.get("avg_w"),
                   energy_mj=power.get("energy_per_inference_mj"), power_source=power_source(power),
                   accuracy=acc.get("value"), model_mb=model_bytes / 1e6, snr_db=fid.get("snr_db"))


def overshoot(c: Constraints, p90_ms: Any, avg_w: Any, model_mb: Any, accuracy: Any,
              fp32_accuracy: Any, snr_db: Any = math.nan) -> dict[str, tuple[Any, Any]]:
    """Return, for each bound ``c`` sets: (whether it is broken, by how much as a share of the bound).

    The figures are floats or numpy arrays that broadcast together, NaN where a figure is missing
    (a power, accuracy or fp32 accuracy of NaN leaves its bound unjudged, and so does an fp32 accuracy
    of 0 or less: a ratio to it means nothing, and a user metric may be negative), and so are the results;
    a share means something only where its bound is broken. Bounds come in the order
    :func:`describe` knows them: p90, power, model size, accuracy, fidelity.
    """
    out: dict[str, tuple[Any, Any]] = {}
    if c.max_latency_p90_ms is not None:
        out["max_latency_p90_ms"] = p90_ms > c.max_latency_p90_ms, p90_ms / c.max_latency_p90_ms - 1
    if c.max_power_w is not None:
        out["max_power_w"] = avg_w > c.max_power_w, avg_w / c.max_power_w - 1
    if c.max_model_mb is not None:
        out["max_model_mb"] = model_mb > c.max_model_mb, model_mb / c.max_model_mb - 1
    if c.min_accuracy_ratio is not None:
        ratio = accuracy / _positive(fp32_accuracy)
        out["min_accuracy_ratio"] = ratio < c.min_accuracy_ratio, 1 - ratio / c.min_accuracy_ratio
    if c.min_fidelity_snr_db is not None:  # in dB: the share is the shortfall over 10 dB (a factor of 10)
        out["min_fidelity_snr_db"] = snr_db < c.min_fidelity_snr_db, (c.min_fidelity_snr_db - snr_db) / 10
    return out


def violations(c: Constraints, m: Measured, fp32_accuracy: float | None) -> dict[str, float]:
    """Return how far ``m`` breaks each bound it breaks, as a share of the bound (0.1 = 10 % over).

    An accuracy bound is not judged without both accuracies (an fp32 accuracy of 0 or less counts as
    none); a power bound not without a figure.
    """
    shares = overshoot(c, m.p90_ms, _nan(m.avg_w), m.model_mb, _nan(m.accuracy), _nan(fp32_accuracy),
                       _nan(m.snr_db))
    return {name: share for name, (broken, share) in shares.items() if broken}


def unjudged(c: Constraints, m: Measured, fp32_accuracy: float | None,
             reference_id: str = REFERENCE_VARIANTS[0]) -> list[str]:
    """Return, in words, the bounds ``c`` sets that ``m`` cannot be judged on for lack of a figure: power
    without a power figure (no sensor, no estimate), accuracy without its own or the reference's accuracy
    (``fp32_accuracy``, of the variant ``reference_id``; no eval set; one of 0 or less counts as none), fidelity without
    an SNR. :func:`violations` leaves those out, so a variant that meets the rest is feasible; this says what that
    feasibility did not cover."""
    missing = {"max_power_w": m.avg_w is None,
               "min_accuracy_ratio": m.accuracy is None or math.isnan(_positive(_nan(fp32_accuracy))),
               "min_fidelity_snr_db": m.snr_db is None}
    return [describe(name, c, reference_id) for name, gone in missing.items() if gone and getattr(c, name) is not None]


def broken_text(c: Constraints, m: Measured, broken: Iterable[str],
                reference: tuple[float, str, str] | None = None, reference_id: str = REFERENCE_VARIANTS[0]) -> str:
    """Return each bound in ``broken`` (constraint names) with the figure of ``m`` that broke it and where that came
    from, e.g. ``p90 <= 20 ms (31.2 ms p90, the device's clock)``, joined by commas. ``reference``: the accuracy the
    accuracy bound was judged against, where it came from and its variant (one of :data:`REFERENCE_VARIANTS`; e.g.
    ``(0.5375, "the device's newest fp32 benchmark", "fp32")``), shown with the ratio: ``accuracy >= 0.99 x fp32
    (51.25% on the eval set, 0.9535 x fp32's 53.75%, the device's newest fp32 benchmark)``; without it, the bound
    names ``reference_id``.

    Raises:
        KeyError: a name in ``broken`` is not a constraint.
    """
    ref_id = reference[2] if reference is not None else reference_id
    return ", ".join(f"{describe(k, c, ref_id)} ({measured_text(k, m, reference)})" for k in broken)


def _positive(x: Any) -> Any:
    """Return ``x`` (a float or numpy array) with what is not above 0 made NaN (no ratio to it)."""
    if isinstance(x, np.ndarray):
        return np.where(x > 0, x, np.nan)
    return x if x > 0 else math.nan


def _nan(x: float | None) -> float:
    """Return ``x``, or NaN for None (a missing figure)."""
    return math.nan if x is None else x


def describe(name: str, c: Constraints, reference_id: str = REFERENCE_VARIANTS[0]) -> str:
    """Return the bound of constraint ``name`` in words, e.g. ``p90 <= 50 ms``; the accuracy bound's a share of
    ``reference_id``'s accuracy."""
    bound = getattr(c, name)
    return {"max_latency_p90_ms": f"p90 <= {bound:g} ms", "max_power_w": f"power <= {bound:g} W",
            "max_model_mb": f"model <= {bound:g} MB", "min_accuracy_ratio": f"accuracy >= {bound:g} x {reference_id}",
            "min_fidelity_snr_db": f"fidelity SNR >= {bound:g} dB"}[name]


def measured_text(name: str, m: Measured, reference: tuple[float, str, str] | None = None) -> str:
    """Return the figure of ``m`` that constraint ``name`` judges, with its unit and where it came from, e.g.
    ``6.9 W, estimated`` or ``80 ms p90, the device's clock``; the accuracy one as a share or on its own scale, and
    with ``reference`` (the accuracy it was judged against, where that came from and its variant: fp32 or onnx-fp32)
    its ratio to it and both.

    Raises:
        KeyError: ``name`` is not a constraint.
    """
    def num(x: float | None) -> str:
        return "none" if x is None or math.isnan(x) else f"{x:.4g}"

    accuracy = f"{accuracy_text(m.accuracy)} on the eval set"
    if name == "min_accuracy_ratio" and reference is not None and m.accuracy is not None and reference[0] > 0:
        value, where, variant = reference
        accuracy += f", {num(m.accuracy / value)} x {variant}'s {accuracy_text(value)}, {where}"
    return {"max_latency_p90_ms": f"{num(m.p90_ms)} ms p90, the device's clock",
            "max_power_w": f"{num(m.avg_w)} W, {m.power_source}",
            "max_model_mb": f"{num(m.model_mb)} MB, the artifact's size",
            "min_accuracy_ratio": accuracy,
            "min_fidelity_snr_db": f"{num(m.snr_db)} dB worst output"}[name]
