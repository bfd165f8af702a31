"""The selection policy: which variant each device should run, from what it measured.

Per device, among the variants built for its profile:

1. A variant without a measurement from this device is *unmeasured*; no choice is made until every
   candidate is measured (``tune`` measures them first).
2. *Feasible* variants meet every constraint (:mod:`edge_kit.selection.constraints`), judged on
   their newest measurement.
3. Among feasible ones: highest top-1 accuracy; among those, the variants whose energy per inference
   is within ``margin`` (default 10 %) of the least; among those, the lowest p90. The result does not
   depend on the order of the candidates.
4. No flapping: a variant *beats* another only when it is better beyond the margin in every recent
   measurement of the two (its worst against the other's best: accuracy, then energy, then p90).
   A device stays on its current variant while that is feasible and nothing beats it; otherwise it
   goes to the best variant that nothing beats. A fresh measurement of the variant a device runs
   can only make it harder to beat, so a choice made on one set of measurements is kept when the
   chosen variant is measured again, however noisy the clock.
5. When nothing is feasible, the device is flagged infeasible and given the least-violating
   variant (smallest sum of relative violations, each variant judged on its worst recent
   measurement), with what it violates; it stays on its current variant while that, judged on its
   best recent measurement, violates within the margin of the least.

Returns a :class:`Decision` with the table behind it, for ``--explain`` and for the record.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from edge_kit.profiles import Constraints
from edge_kit.selection.constraints import Measured, describe, violations

DEFAULT_MARGIN = 0.1


@dataclass(frozen=True)
class Candidate:
    variant: str
    sha256: str
    bytes: int
    history: tuple[Measured, ...] = ()  # recent measurements on this device, newest first; () unmeasured

    @property
    def measured(self) -> Measured | None:
        """The newest measurement, or None."""
        return self.history[0] if self.history else None

    def envelope(self, best: bool) -> Measured:
        """Return the most (``best``) or least favourable figures across the recent measurements."""
        ms = self.history
        if len(ms) == 1:
            return ms[0]

        def pick(name: str, lower_is_better: bool = True) -> float | None:
            values = [v for v in (getattr(m, name) for m in ms) if v is not None]
            return None if not values else (min if best == lower_is_better else max)(values)

        return replace(ms[0], p90_ms=pick("p90_ms"), avg_w=pick("avg_w"), energy_mj=pick("energy_mj"),
                       accuracy=pick("accuracy", lower_is_better=False))


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


def _accuracy(m: Measured) -> float:
    return round(m.accuracy, 9) if m.accuracy is not None else -1.0


def compare(a: Measured, b: Measured, margin: float) -> int:
    """Return <0 when ``a`` is preferred to ``b``, >0 when ``b`` is, 0 when they are equal within the margin."""
    if _accuracy(a) != _accuracy(b):
        return -1 if _accuracy(a) > _accuracy(b) else 1
    return _differs(a.energy_mj, b.energy_mj, margin) or _differs(a.p90_ms, b.p90_ms, margin)


def _preference(candidates: list[Candidate], margin: float) -> list[Candidate]:
    """Return ``candidates`` best first: accuracy, then energy within the margin of the least, then p90.

    A total order on the newest measurements (ties broken by variant id), so the result does not
    depend on the order the candidates came in.
    """
    top = max(_accuracy(c.measured) for c in candidates)
    energies = [c.measured.energy_mj for c in candidates if _accuracy(c.measured) == top and c.measured.energy_mj is not None]
    least = min(energies, default=None)

    def key(c: Candidate) -> tuple:
        m = c.measured
        near = least is None or (m.energy_mj is not None and _differs(m.energy_mj, least, margin) == 0)
        energy = m.energy_mj if m.energy_mj is not None else math.inf
        return -_accuracy(m), not near, m.p90_ms if near else energy, m.p90_ms, c.variant

    return sorted(candidates, key=key)


def _beats(a: Candidate, b: Candidate, margin: float) -> bool:
    """Return whether ``a`` is better than ``b`` beyond the margin in every recent measurement of both."""
    return compare(a.envelope(best=False), b.envelope(best=True), margin) < 0


def choose(device: str, candidates: list[Candidate], constraints: Constraints, *, fp32_accuracy: float | None,
           current_sha: str | None, margin: float = DEFAULT_MARGIN) -> Decision:
    """Return the decision for one device (see the module docstring for the rules)."""
    current = next((c for c in candidates if c.sha256 == current_sha), None)
    table = []
    for c in candidates:
        m = c.measured
        broken = violations(constraints, m, fp32_accuracy) if m else {}
        table.append({"variant": c.variant, "sha256": c.sha256, "measured": m is not None,
                      "runs": len(c.history),
                      "p90_ms": m.p90_ms if m else None, "accuracy": m.accuracy if m else None,
                      "energy_mj": m.energy_mj if m else None, "avg_w": m.avg_w if m else None,
                      "power_source": m.power_source if m else None, "model_mb": round(c.bytes / 1e6, 3),
                      "violates": [describe(k, constraints) for k in broken], "current": c.sha256 == current_sha})
    base = Decision(device, None, None, current.variant if current else None, False, False, "")
    unmeasured = [c.variant for c in candidates if c.measured is None]
    if not candidates:
        base.reason = "no candidate variant is installed for this device's profile"
        return base
    if unmeasured:
        base.unmeasured, base.table = unmeasured, table
        base.reason = f"not measured yet on this device: {', '.join(unmeasured)}"
        return base
    rows = {r["variant"]: r for r in table}
    feasible = [c for c in candidates if not rows[c.variant]["violates"]]
    if feasible:
        chosen, reason = _choose_feasible(feasible, current, margin)
        decision = Decision(device, chosen.variant, chosen.sha256, base.current, True, chosen is not current, reason)
    else:
        chosen, reason = _least_violating(candidates, current, constraints, fp32_accuracy, margin)
        decision = Decision(device, chosen.variant, chosen.sha256, base.current, False, chosen is not current,
                            reason, violates=rows[chosen.variant]["violates"])
    for r in table:
        r["chosen"] = r["variant"] == decision.chosen
    decision.table = table
    return decision


def _choose_feasible(feasible: list[Candidate], current: Candidate | None, margin: float) -> tuple[Candidate, str]:
    """Return the feasible variant to run, and why."""
    def unbeaten(c: Candidate) -> bool:
        return not any(_beats(o, c, margin) for o in feasible if o is not c)

    current_feasible = any(c is current for c in feasible)
    if current_feasible and unbeaten(current):
        return current, (f"stays on {current.variant}: feasible, and no feasible variant beats it by more than "
                         f"the {margin:.0%} margin in every recent measurement")
    ranked = _preference(feasible, margin)
    best = next((c for c in ranked if unbeaten(c)), ranked[0])
    runner_up = next((c for c in ranked if c is not best), None)
    reason = f"{best.variant}: {_why(best, runner_up, margin)}"
    if current is not None and current is not best:
        reason += f" (current {current.variant} " + ("is beaten beyond the margin)" if current_feasible
                                                      else "breaks its constraints)")
    return best, reason


def _least_violating(candidates: list[Candidate], current: Candidate | None, constraints: Constraints,
                     fp32_accuracy: float | None, margin: float) -> tuple[Candidate, str]:
    """Return the variant that violates the constraints least, and why (the device is infeasible)."""
    def score(c: Candidate, best: bool) -> float:
        return sum(violations(constraints, c.envelope(best), fp32_accuracy).values())

    worst = {c.variant: score(c, best=False) for c in candidates}
    least = min(candidates, key=lambda c: (worst[c.variant], c.variant))
    if current is not None and score(current, best=True) <= worst[least.variant] * (1 + margin):
        return current, (f"infeasible: no variant meets every constraint; stays on {current.variant}, "
                         f"within the {margin:.0%} margin of the least violating")
    return least, f"infeasible: no variant meets every constraint; {least.variant} violates least"


def _why(best: Candidate, runner_up: Candidate | None, margin: float) -> str:
    m = best.measured
    if runner_up is None:
        return "the only feasible variant"
    r = runner_up.measured
    if _accuracy(m) != _accuracy(r):
        return f"highest accuracy among feasible variants ({100 * (m.accuracy or 0):.2f} % vs {100 * (r.accuracy or 0):.2f} % for {runner_up.variant})"
    if _differs(m.energy_mj, r.energy_mj, margin):
        return f"same accuracy, least energy per inference ({m.energy_mj:.4g} vs {r.energy_mj:.4g} mJ for {runner_up.variant})"
    return f"same accuracy and energy within {margin:.0%}, lowest p90 ({m.p90_ms:.4g} vs {r.p90_ms:.4g} ms for {runner_up.variant})"
