"""The live gate of a rollout: promote, hold or roll back a candidate from what devices see in production.

Evidence per device is the serving API's service times (ms, the last requests answered by the
model it serves now) and, where a shadow run compares it with the reference (fp32, or onnx-fp32), the worst-output
SNR of its live outputs. Canaries run the candidate; controls are devices of the same profiles that
still run the current model, under the same kind of traffic.

The decision, in this order:

1. **hold** when a canary or the pooled controls have fewer than ``min_samples`` service times
   (not enough live traffic to judge), or a fidelity floor is set and a canary has no shadow figure;
2. **roll back** when a canary's live SNR against the reference is below ``min_snr_db``;
3. **roll back** when the canaries are slower: a one-sided Mann-Whitney U test (canaries
   stochastically slower than the controls) rejects at ``alpha`` **and** the canaries' median
   exceeds the controls' by more than ``min_slowdown`` (a share); the effect-size guard keeps a
   statistically real but immaterial difference (two processes on one host are never identical)
   from blocking every rollout;
4. **promote** otherwise.

The unit of the test is the **device**: each device's median service time is one observation
(canary medians against control medians; the medians compared by the effect-size guard are the
medians of those). Requests of one device are not independent (they share its hardware, load and
temperature), so pooling them makes a p-value far too small: 3 canaries with 10,000 requests each
are 3 observations of the candidate, not 30,000. When the device counts are too small for a
device-level test to ever reach ``alpha`` (the smallest one-sided p of the exact test is
``1 / C(n_canaries + n_controls, n_canaries)``: 1 canary needs 99 controls at 0.01), the test falls
back to the pooled requests and says so (``unit`` ``"requests"``, and in ``test``): that p-value is
optimistic and a device's own speed counts as the candidate's, which the effect-size guard must
absorb. Devices are compared within their profile (``LiveEvidence.profile``): each device's figures are
divided by the median of its profile's control medians before the test and the guard, so a canary
wave with more of a fast profile than the controls have neither hides a slower candidate nor blames
a good one. A canary whose profile has no control with traffic (every device of that profile is a
canary: nobody else of it gets the candidate on promotion) is left out of the test and named in the
reason; so is a canary whose profile's control median is 0 ms (nothing to divide by); when that is every canary,
the gate holds. Service times
that are not finite, or negative, are refused and counted
(``refused_samples``), never passed to the test.

Pure: numbers in, decision out (scipy's ``mannwhitneyu`` does the test: exact when fewer than 8
devices are on one side (tied medians, e.g. from a coarse timer, get midranks and the no-ties null
distribution), else scipy's choice: exact for small samples without ties, otherwise the normal
approximation with tie and continuity correction).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from edgekit_protocol.labels import clip


@dataclass(frozen=True)
class LiveEvidence:
    """One device's live figures: its recent service times and, if any, its shadow SNR against the reference."""

    device: str
    samples_ms: list[float]
    shadow_snr_db: float | None = None
    profile: str | None = None  # devices are compared within their profile (None: one group)
    clock: str | None = None  # how the device's serving API timed them, in its own words (its live figures' ``clock``)


SOURCE = ("measured: service times of each device's serving API on its own traffic (timed on the device by the clock "
          "it names, the decision's clocks; "
          "simulated devices time on the host that runs them), SNR from its shadow runs against the reference (fp32; "
          "onnx-fp32 for an ONNX model compiled without LiteRT variants)")
DEVICE_TEST = "one-sided Mann-Whitney U (canary > control) on each device's median service time"
REQUEST_TEST = ("one-sided Mann-Whitney U (canary > control) on pooled service times (requests): too few devices "
                "for a device-level test at alpha; requests of one device are not independent, so this p-value is "
                "optimistic and a device's own speed counts as the candidate's")


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided and the numbers it decided on.

    ``unit`` is what the test's observations are: ``"devices"`` (one median per device) or
    ``"requests"`` (pooled, when too few devices); ``canary_p50_ms``/``control_p50_ms`` are the medians
    of that unit in ms, and ``slowdown`` the share the effect-size guard compared (the same ratio with one
    profile; with several, each device's figures over its profile's control median first).
    ``refused_samples`` counts the service times refused as not finite or negative.
    """

    action: str  # "promote", "hold" or "roll back"
    reason: str
    p_value: float | None = None
    canary_p50_ms: float | None = None
    control_p50_ms: float | None = None
    slowdown: float | None = None  # the canaries' median over the controls', less 1, within profiles (what min_slowdown bounds)
    canary_samples: int = 0
    control_samples: int = 0
    worst_snr_db: float | None = None
    test: str = DEVICE_TEST
    source: str = SOURCE  # where the figures come from
    unit: str | None = None
    canary_devices: int = 0
    control_devices: int = 0
    refused_samples: int = 0
    settings: dict = field(default_factory=dict)
    clocks: list = field(default_factory=list)  # each clock the devices named for their service times, once, sorted

    def as_dict(self) -> dict:
        """Return the decision as a JSON-ready dict (what the history stores)."""
        return asdict(self)


def _clean(evidence: list[LiveEvidence]) -> tuple[list[np.ndarray], int]:
    """Return each device's finite, non-negative service times and how many samples were refused."""
    kept, refused = [], 0
    for e in evidence:
        try:
            a = np.asarray(e.samples_ms, dtype=np.float64).ravel()
        except (TypeError, ValueError):  # not numbers at all: every one refused
            kept.append(np.empty(0))
            refused += len(e.samples_ms)
            continue
        ok = np.isfinite(a) & (a >= 0)
        kept.append(a[ok])
        refused += int((~ok).sum())
    return kept, refused


def smallest_p(n_canaries: int, n_controls: int) -> float:
    """Return the smallest one-sided p-value the exact Mann-Whitney U test can give for these sample sizes
    (``1 / C(n1 + n2, n1)``; 1.0 when either is empty)."""
    if n_canaries < 1 or n_controls < 1:
        return 1.0
    return 1.0 / math.comb(n_canaries + n_controls, n_canaries)


def judge_live(canaries: list[LiveEvidence], controls: list[LiveEvidence], *, alpha: float = 0.01,
               min_samples: int = 100, min_slowdown: float = 0.10, min_snr_db: float | None = None) -> GateDecision:
    """Decide a canary wave from live evidence (see the module docstring for the rule and the test's unit).

    Returns:
        The decision with its numbers: the p-value and medians of the unit tested, the sample and device
        counts, the worst live SNR, the refused samples, the settings and the clocks the devices timed with.
    """
    decision = _decide(canaries, controls, alpha=alpha, min_samples=min_samples, min_slowdown=min_slowdown,
                       min_snr_db=min_snr_db)
    return replace(decision, clocks=sorted({clip(e.clock or "clock not named", 120) for e in canaries + controls}))


def _decide(canaries: list[LiveEvidence], controls: list[LiveEvidence], *, alpha: float, min_samples: int,
            min_slowdown: float, min_snr_db: float | None) -> GateDecision:
    """Return :func:`judge_live`'s decision without its clocks."""
    from scipy.stats import mannwhitneyu

    settings = {"alpha": alpha, "min_samples": min_samples, "min_slowdown": min_slowdown, "min_snr_db": min_snr_db}
    cans, bad_c = _clean(canaries)
    ctrls, bad_k = _clean(controls)
    refused = bad_c + bad_k
    need = max(1, min_samples)  # a device without one service time is no evidence, whatever the setting
    short = [e.device for e, a in zip(canaries, cans) if len(a) < need]
    ctrl = np.concatenate(ctrls) if ctrls else np.empty(0)
    if not canaries or short or len(ctrl) < need:
        who = ", ".join(short) if short else "the controls" if canaries else "no canary"
        return GateDecision("hold", f"not enough live traffic to judge: {who} answered fewer than {need} "
                                    "requests in the window" + (f" ({refused} service times refused as not finite "
                                                                "or negative)" if refused else ""),
                            control_samples=len(ctrl), refused_samples=refused, settings=settings)
    snrs = [e.shadow_snr_db if e.shadow_snr_db is None or math.isfinite(e.shadow_snr_db) else None for e in canaries]
    worst = min((s for s in snrs if s is not None), default=None)
    if min_snr_db is not None:
        if any(s is None for s in snrs):
            missing = ", ".join(e.device for e, s in zip(canaries, snrs) if s is None)
            return GateDecision("hold", f"no shadow comparison from {missing} to check the {min_snr_db:g} dB floor",
                                refused_samples=refused, settings=settings)
        if worst < min_snr_db:
            return GateDecision("roll back", f"live outputs {worst:.1f} dB from the reference, below {min_snr_db:g} dB",
                                worst_snr_db=worst, refused_samples=refused, settings=settings)
    # Each profile is its own scale: a device's figures are divided by the median of its profile's control
    # medians, so a canary wave richer in a fast profile than the controls is not a faster candidate.
    kept = [(e.profile, a) for e, a in zip(controls, ctrls) if len(a)]
    medians = {pr: float(np.median([np.median(a) for q, a in kept if q == pr])) for pr in {q for q, _ in kept}}
    # A profile whose controls' median is 0 ms (a device's word, or a timer that cannot see them) is no scale: every
    # ratio to it is infinite or NaN, and a NaN p-value promoted a candidate however slow.
    scale = {pr: m for pr, m in medians.items() if m > 0}
    kept = [(q, a) for q, a in kept if q in scale]
    blind = [e.device for e in canaries if e.profile not in medians]  # a profile every device of which is a canary
    zero = [e.device for e in canaries if e.profile in medians and e.profile not in scale]
    alone = (("; not judged live (no control device of their profile with live traffic): " + ", ".join(blind)
              if blind else "")
             + ("; not judged live (their profile's control median is 0 ms: nothing to compare with): " + ", ".join(zero)
                if zero else ""))
    if len(blind) + len(zero) == len(canaries):
        return GateDecision("hold", f"no control device with live traffic{' above 0 ms' if zero else ''} on profile(s) "
                                    f"{', '.join(sorted({str(e.profile) for e in canaries}))} to compare the canaries with",
                            control_samples=len(ctrl), refused_samples=refused, settings=settings)
    canaries, cans = zip(*[(e, a) for e, a in zip(canaries, cans) if e.profile in scale])
    cand = np.concatenate(cans)
    can_med = np.array([np.median(a) for a in cans])
    ctl_med = np.array([np.median(a) for _, a in kept])
    can_scale = np.array([scale[e.profile] for e in canaries])
    ctl_scale = np.array([scale[q] for q, _ in kept])
    if smallest_p(len(can_med), len(ctl_med)) <= alpha:
        unit, test = "devices", DEVICE_TEST
        x, y, raw_x, raw_y = can_med / can_scale, ctl_med / ctl_scale, can_med, ctl_med
    else:
        unit, test = "requests", REQUEST_TEST
        raw_x, raw_y = cand, np.concatenate([a for _, a in kept])
        x = np.concatenate([a / sc for a, sc in zip(cans, can_scale)])
        y = np.concatenate([a / sc for (_, a), sc in zip(kept, ctl_scale)])
    if len(scale) > 1:
        test += "; each device's figures divided by its profile's control median (profiles compared within themselves)"
    # A few canaries against many controls: the exact null distribution, ties or not (scipy would take the normal
    # approximation when medians tie, which cannot reach alpha with one canary: p >= 0.04 against 200 controls).
    exact = unit == "devices" and min(len(x), len(y)) < 8
    p = float(mannwhitneyu(x, y, alternative="greater", method="exact" if exact else "auto").pvalue)
    c50, k50 = float(np.median(raw_x)), float(np.median(raw_y))
    slowdown = float(np.median(x) / np.median(y) - 1)
    numbers = dict(p_value=p, canary_p50_ms=c50, control_p50_ms=k50, slowdown=slowdown, canary_samples=len(cand),
                   control_samples=len(ctrl), worst_snr_db=worst, test=test, unit=unit, canary_devices=len(can_med),
                   control_devices=len(ctl_med), refused_samples=refused, settings=settings)
    on = (f"on {len(can_med)} canary vs {len(ctl_med)} control devices' medians" if unit == "devices" else
          f"on pooled requests of {len(can_med)} canary and {len(ctl_med)} control devices (too few devices for a "
          "device-level test)") + (f", within {len(scale)} profiles" if len(scale) > 1 else "")
    if p < alpha and slowdown > min_slowdown:
        return GateDecision("roll back", f"canaries slower: p50 {c50:.3f} ms vs {k50:.3f} ms ({slowdown:+.0%}), "
                            f"p = {p:.2g} < {alpha:g} {on}{alone}", **numbers)
    return GateDecision("promote", f"canaries not slower (p50 {c50:.3f} vs {k50:.3f} ms, {slowdown:+.0%}, p = {p:.2g} "
                        f"{on})" + (f", live fidelity {worst:.1f} dB" if worst is not None else "") + alone, **numbers)
