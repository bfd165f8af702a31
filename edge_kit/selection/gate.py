"""The live gate of a rollout: promote, hold or roll back a candidate from what devices see in production.

Evidence per device is the serving API's service times (ms, the last requests answered by the
model it serves now) and, where a shadow run compares it with the fp32 reference, the worst-output
SNR of its live outputs. Canaries run the candidate; controls are devices of the same profiles that
still run the current model, under the same kind of traffic.

The decision, in this order:

1. **hold** when a canary or the pooled controls have fewer than ``min_samples`` service times
   (not enough live traffic to judge), or a fidelity floor is set and a canary has no shadow figure;
2. **roll back** when a canary's live SNR against the reference is below ``min_snr_db``;
3. **roll back** when the canaries are slower: a one-sided Mann-Whitney U test (canary service
   times stochastically greater than the controls', pooled) rejects at ``alpha`` **and** the canary
   median exceeds the control median by more than ``min_slowdown`` (a share); the effect-size guard
   keeps a statistically real but immaterial difference (two processes on one host are never
   identical) from blocking every rollout;
4. **promote** otherwise.

Pure: numbers in, decision out (scipy's ``mannwhitneyu`` does the test).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class LiveEvidence:
    """One device's live figures: its recent service times and, if any, its shadow SNR against the reference."""

    device: str
    samples_ms: list[float]
    shadow_snr_db: float | None = None


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided and the numbers it decided on."""

    action: str  # "promote", "hold" or "roll back"
    reason: str
    p_value: float | None = None
    canary_p50_ms: float | None = None
    control_p50_ms: float | None = None
    canary_samples: int = 0
    control_samples: int = 0
    worst_snr_db: float | None = None
    test: str = "one-sided Mann-Whitney U (canary > control) on service times"
    settings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def judge_live(canaries: list[LiveEvidence], controls: list[LiveEvidence], *, alpha: float = 0.01,
               min_samples: int = 100, min_slowdown: float = 0.10, min_snr_db: float | None = None) -> GateDecision:
    """Decide a canary wave from live evidence (see the module docstring for the rule).

    Returns:
        The decision with its numbers.
    """
    from scipy.stats import mannwhitneyu

    settings = {"alpha": alpha, "min_samples": min_samples, "min_slowdown": min_slowdown, "min_snr_db": min_snr_db}
    short = [c.device for c in canaries if len(c.samples_ms) < min_samples]
    ctrl = np.array([s for c in controls for s in c.samples_ms], dtype=np.float64)
    if not canaries or short or len(ctrl) < min_samples:
        who = ", ".join(short) if short else "the controls" if canaries else "no canary"
        return GateDecision("hold", f"not enough live traffic to judge: {who} answered fewer than {min_samples} "
                                    "requests in the window", control_samples=len(ctrl), settings=settings)
    snrs = [c.shadow_snr_db for c in canaries]
    worst = min((s for s in snrs if s is not None), default=None)
    if min_snr_db is not None:
        if any(s is None for s in snrs):
            missing = ", ".join(c.device for c in canaries if c.shadow_snr_db is None)
            return GateDecision("hold", f"no shadow comparison from {missing} to check the {min_snr_db:g} dB floor",
                                settings=settings)
        if worst < min_snr_db:
            return GateDecision("roll back", f"live outputs {worst:.1f} dB from the reference, below {min_snr_db:g} dB",
                                worst_snr_db=worst, settings=settings)
    cand = np.array([s for c in canaries for s in c.samples_ms], dtype=np.float64)
    p = float(mannwhitneyu(cand, ctrl, alternative="greater").pvalue)
    c50, k50 = float(np.median(cand)), float(np.median(ctrl))
    numbers = dict(p_value=p, canary_p50_ms=c50, control_p50_ms=k50, canary_samples=len(cand),
                   control_samples=len(ctrl), worst_snr_db=worst, settings=settings)
    if p < alpha and c50 > k50 * (1 + min_slowdown):
        return GateDecision("roll back", f"canaries slower: p50 {c50:.3f} ms vs {k50:.3f} ms, p = {p:.2g} < {alpha:g}",
                            **numbers)
    return GateDecision("promote", f"canaries not slower (p50 {c50:.3f} vs {k50:.3f} ms, p = {p:.2g})"
                        + (f", live fidelity {worst:.1f} dB" if worst is not None else ""), **numbers)
