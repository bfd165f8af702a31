"""The selection policy: which variant each device should run, from what it measured.

Per device, among the variants built for its profile:

1. A variant without a measurement from this device is *unmeasured*; no choice is made until every
   candidate is measured (``tune`` measures them first).
2. *Feasible* variants meet every constraint (:mod:`edge_kit.selection.constraints`).
3. Among feasible ones: highest top-1 accuracy, then lowest energy per inference, then lowest p90.
   Energy and latency count as different only when they differ by more than ``margin`` (default
   5 %), so measurement noise does not reorder near-equal variants.
4. No flapping: a device stays on its current variant while that is feasible and the best beats
   it by less than the margin (accuracy counts at any difference; it is measured on the same set).
5. When nothing is feasible, the device is flagged infeasible and given the least-violating
   variant (smallest sum of relative violations), with what it violates; it stays on its current
   variant while that violates within the margin of the least.

Returns a :class:`Decision` with the table behind it, for ``--explain`` and for the record.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from typing import Any

from edge_kit.profiles import Constraints
from edge_kit.selection.constraints import Measured, describe, violations

DEFAULT_MARGIN = 0.05


@dataclass(frozen=True)
class Candidate:
    variant: str
    sha256: str
    bytes: int
    measured: Measured | None = None


@dataclass
class Decision:
    device: str
    chosen: str | None  # variant id; None while candidates are unmeasured
    chosen_sha256: str | None
    current: str | None
    feasible: bool
    switch: bool
    reason: str
    unmeasured: list[str] = field(default_factory=list)
    violates: list[str] = field(default_factory=list)  # of the chosen variant, when infeasible
    table: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _differs(a: float | None, b: float | None, margin: float) -> int:
    """Return -1 when ``a`` is lower by more than ``margin`` (relative), 1 when higher, 0 otherwise."""
    if a is None or b is None:
        return 0 if a is None and b is None else (1 if a is None else -1)  # a known figure beats an unknown one
    if abs(a - b) <= margin * max(abs(a), abs(b)):
        return 0
    return -1 if a < b else 1


def compare(a: Measured, b: Measured, margin: float) -> int:
    """Return <0 when ``a`` is preferred to ``b``, >0 when ``b`` is, 0 when they are equal within the margin."""
    acc_a, acc_b = a.accuracy if a.accuracy is not None else -1.0, b.accuracy if b.accuracy is not None else -1.0
    if round(acc_a, 9) != round(acc_b, 9):
        return -1 if acc_a > acc_b else 1
    return _differs(a.energy_mj, b.energy_mj, margin) or _differs(a.p90_ms, b.p90_ms, margin)


def choose(device: str, candidates: list[Candidate], constraints: Constraints, *, fp32_accuracy: float | None,
           current_sha: str | None, margin: float = DEFAULT_MARGIN) -> Decision:
    """Return the decision for one device (see the module docstring for the rules)."""
    current = next((c for c in candidates if c.sha256 == current_sha), None)
    table = []
    for c in candidates:
        m = c.measured
        broken = violations(constraints, m, fp32_accuracy) if m else {}
        table.append({"variant": c.variant, "sha256": c.sha256, "measured": m is not None,
                      "p90_ms": m.p90_ms if m else None, "accuracy": m.accuracy if m else None,
                      "energy_mj": m.energy_mj if m else None, "avg_w": m.avg_w if m else None,
                      "power_source": m.power_source if m else None, "model_mb": round(c.bytes / 1e6, 3),
                      "violates": [describe(k, constraints) for k in broken], "_score": sum(broken.values()),
                      "current": c.sha256 == current_sha})
    base = Decision(device, None, None, current.variant if current else None, False, False, "")
    unmeasured = [c.variant for c in candidates if c.measured is None]
    if not candidates:
        base.reason = "no candidate variant is installed for this device's profile"
        return base
    if unmeasured:
        base.unmeasured, base.table = unmeasured, _public(table)
        base.reason = f"not measured yet on this device: {', '.join(unmeasured)}"
        return base
    rows = {r["variant"]: r for r in table}
    feasible = [c for c in candidates if not rows[c.variant]["violates"]]
    key = functools.cmp_to_key(lambda x, y: compare(x.measured, y.measured, margin))
    if feasible:
        ranked = sorted(feasible, key=key)
        best = ranked[0]
        if current is not None and current in feasible and compare(best.measured, current.measured, margin) >= 0:
            chosen, reason = current, (f"stays on {current.variant}: feasible, and no feasible variant beats it "
                                       f"by more than the {margin:.0%} margin")
        else:
            chosen = best
            why = _why(best, ranked[1] if len(ranked) > 1 else None, margin)
            reason = f"{best.variant}: {why}" + (f" (current {current.variant} " + (
                "breaks its constraints)" if current not in feasible else "is beaten beyond the margin)")
                if current and current is not best else "")
        decision = Decision(device, chosen.variant, chosen.sha256, base.current, True,
                            chosen.sha256 != current_sha, reason)
    else:
        chosen = min(candidates, key=lambda c: rows[c.variant]["_score"])
        why = f"infeasible: no variant meets every constraint; {chosen.variant} violates least"
        if current is not None and rows[current.variant]["_score"] <= rows[chosen.variant]["_score"] * (1 + margin):
            chosen, why = current, (f"infeasible: no variant meets every constraint; stays on {current.variant}, "
                                    f"within the {margin:.0%} margin of the least violating")
        decision = Decision(device, chosen.variant, chosen.sha256, base.current, False, chosen.sha256 != current_sha,
                            why, violates=rows[chosen.variant]["violates"])
    for r in table:
        r["chosen"] = r["variant"] == decision.chosen
    decision.table = _public(table)
    return decision


def _why(best: Candidate, runner_up: Candidate | None, margin: float) -> str:
    m = best.measured
    if runner_up is None:
        return "the only feasible variant"
    r = runner_up.measured
    if round(m.accuracy or -1, 9) != round(r.accuracy or -1, 9):
        return f"highest accuracy among feasible variants ({100 * (m.accuracy or 0):.2f} % vs {100 * (r.accuracy or 0):.2f} % for {runner_up.variant})"
    if _differs(m.energy_mj, r.energy_mj, margin):
        return f"same accuracy, least energy per inference ({m.energy_mj:.4g} vs {r.energy_mj:.4g} mJ for {runner_up.variant})"
    return f"same accuracy and energy within {margin:.0%}, lowest p90 ({m.p90_ms:.4g} vs {r.p90_ms:.4g} ms for {runner_up.variant})"


def _public(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in table]
