"""The selection policy: which variant each device should run, from what it measured.

Per device, among the variants built for its profile:

1. A variant without a measurement from this device is *unmeasured*; no choice is made until every
   candidate is measured (``tune`` measures them first).
2. *Feasible* variants meet every constraint (:mod:`edge_kit.selection.constraints`), judged on
   their newest measurement.
3. Among feasible ones: highest top-1 accuracy; among those, the variants whose energy per inference
   is within ``margin`` (default 10 %) of the least; among those, the lowest p90; where figures tie,
   the target the profile prefers (its ``targets``), then the variant id. The result does not depend
   on the order of the candidates.
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

One implementation, on arrays: :func:`choose_group` decides for many devices at once that share
their candidate variants and constraints (devices x variants x recent measurements, NaN where a
figure is missing). :func:`choose_all` decides for a fleet through it, one call per group of
devices that share variants and constraints, and returns a :class:`Decision` per device with the
table behind it and the reason, for ``--explain`` and for the record; :func:`choose` is one device.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edge_kit.profiles import Constraints
from edge_kit.selection import DEFAULT_MARGIN
from edge_kit.selection.constraints import (
    REFERENCE_VARIANTS,
    Measured,
    broken_text,
    describe,
    overshoot,
    unjudged,
    violations,
)
from edge_kit.variants import parse_variant
from edgekit_protocol.labels import accuracy_text


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
    unjudged: list[str] = field(default_factory=list)  # bounds of the chosen variant nothing measured (not judged)
    excluded: dict[str, str] = field(default_factory=dict)  # variants left out: the device cannot run them (why)
    runtimes_unknown: list[str] = field(default_factory=list)  # candidates whose runtime the device never reported

    def as_dict(self) -> dict[str, Any]:
        """Return the decision as plain data (for ``--json`` and the history)."""
        return asdict(self)


def infeasible(decisions: dict[str, Any]) -> dict[str, list[str]]:
    """Return, per device of ``decisions`` (device -> :class:`Decision` or a fleet-model decision) given a variant
    that meets not every constraint (the least-violating one), the bounds it breaks, in words (``violates``); a
    device with no choice yet (nothing measured) is not infeasible, and is left out."""
    return {name: list(d.violates) for name, d in decisions.items() if d.chosen is not None and not d.feasible}


@dataclass(frozen=True)
class Group:
    """Devices that choose among the same variants under the same constraints, and what they measured.

    Each figure is an array of shape (devices, variants, recent measurements >= 1), newest first,
    NaN where there is no such measurement or it has no such figure (power, energy, accuracy); a
    variant whose newest p90 is NaN is unmeasured on that device. ``model_mb`` is the model size of
    the newest measurement, (devices, variants) or anything that broadcasts to it.
    """

    variants: tuple[str, ...]
    p90_ms: np.ndarray
    energy_mj: np.ndarray
    avg_w: np.ndarray
    accuracy: np.ndarray
    model_mb: np.ndarray
    snr_db: np.ndarray | None = None  # same shape as the figures; None: no fidelity measured
    # per variant, the rank of its target in the profile's order of preference (lower first): what breaks
    # a tie before the variant id; None: no preference
    preference: tuple[int, ...] | None = None

    @classmethod
    def of(cls, devices: list[list[Candidate]], targets: tuple[str, ...] = ()) -> Group:
        """Return the group of ``devices``, each given as its candidates; ``targets`` is the profile's
        order of preference (:attr:`edge_kit.profiles.Profile.target_order`), () for none.

        Raises:
            ValueError: a device lists other variants, or in another order, than the first.
        """
        variants = tuple(c.variant for c in devices[0]) if devices else ()
        if any(tuple(c.variant for c in cands) != variants for cands in devices):
            raise ValueError("every device of a group lists the same variants in the same order")
        depth = max([1] + [len(c.history) for cands in devices for c in cands])

        def figures(name: str) -> np.ndarray:
            rows = [[[getattr(m, name) for m in c.history] + [None] * (depth - len(c.history)) for c in cands]
                    for cands in devices]
            return np.array(rows, dtype=float).reshape(len(devices), len(variants), depth)

        model_mb = [[c.measured.model_mb if c.measured else None for c in cands] for cands in devices]
        return cls(variants, figures("p90_ms"), figures("energy_mj"), figures("avg_w"), figures("accuracy"),
                   np.array(model_mb, dtype=float).reshape(len(devices), len(variants)), figures("snr_db"),
                   target_ranks(variants, targets) if targets else None)


@dataclass(frozen=True)
class Choices:
    """What :func:`choose_group` decided: one entry per device of the group in each array."""

    chosen: np.ndarray  # index of the variant to run; -1 while one of the device's variants is unmeasured
    feasible: np.ndarray  # the chosen variant meets every constraint
    switch: np.ndarray  # the chosen variant is not the one the device runs
    stays: np.ndarray  # kept on the variant it runs by the no-flapping rule (feasible or not)
    runner_up: np.ndarray  # the feasible variant preferred next after the chosen one; -1 when none


def choose_group(group: Group, constraints: Constraints, *, fp32_accuracy: np.ndarray | float | None,
                 current: np.ndarray, margin: float = DEFAULT_MARGIN) -> Choices:
    """Return the decisions for every device of ``group`` (see the module docstring for the rules).

    ``fp32_accuracy`` is one per device or one for all, NaN, 0 or None where unknown; ``current`` the
    index of the variant each device runs, -1 when it runs none of them.

    Raises:
        ValueError: the group has no variants to choose from.
    """
    if not group.variants:
        raise ValueError("a group needs at least one variant to choose from")
    fp32 = np.asarray(np.nan if fp32_accuracy is None else fp32_accuracy, dtype=float).reshape(-1, 1)
    fp32 = np.where(fp32 == 0, np.nan, fp32)  # like None: the accuracy bound is not judged
    current = np.asarray(current, dtype=np.intp)
    shape = group.p90_ms.shape[:2]
    model_mb = np.broadcast_to(group.model_mb, shape)
    measured = ~np.isnan(group.p90_ms[:, :, 0])
    ready = measured.all(axis=1)
    p90_lo, p90_hi = _spread(group.p90_ms)
    energy_lo, energy_hi = _spread(group.energy_mj)
    watts_lo, watts_hi = _spread(group.avg_w)
    acc_lo, acc_hi = _spread(group.accuracy)
    snr = np.full(group.p90_ms.shape, np.nan) if group.snr_db is None else group.snr_db
    snr_lo, snr_hi = _spread(snr)

    # rules 1 and 2: measured, and feasible on the newest measurement
    newest = overshoot(constraints, group.p90_ms[:, :, 0], group.avg_w[:, :, 0], model_mb, group.accuracy[:, :, 0],
                       fp32, snr[:, :, 0])
    ok = measured & ~_broken(newest, shape)
    feasible = ok.any(axis=1)

    # rule 4: a beats b (axes 1 and 2) when a's worst figures are better than b's best beyond the margin
    worst_acc, best_acc = _ranked_accuracy(acc_lo)[:, :, None], _ranked_accuracy(acc_hi)[:, None, :]
    energy = _differs(energy_hi[:, :, None], energy_lo[:, None, :], margin)
    p90 = _differs(p90_hi[:, :, None], p90_lo[:, None, :], margin)
    beats = np.where(worst_acc != best_acc, worst_acc > best_acc, np.where(energy != 0, energy < 0, p90 < 0))
    beats &= ok[:, :, None] & ~np.eye(shape[1], dtype=bool)  # by another feasible variant
    unbeaten = ok & ~beats.any(axis=1)

    # rule 3 among the unbeaten: the preferred feasible variant that nothing beats
    names = np.broadcast_to(_tie_ranks(group), shape)
    order = _preference(ok, group.p90_ms[:, :, 0], group.energy_mj[:, :, 0], _ranked_accuracy(group.accuracy[:, :, 0]),
                        names, margin)
    best = _first(unbeaten, order)
    best = np.where(best >= 0, best, order[:, 0])  # every feasible variant beaten: the preferred one
    runner_up = _first(ok & (np.arange(shape[1]) != best[:, None]), order)

    # rule 5: the least violating, judged on the worst figures (the current one on its best)
    worst = _total(overshoot(constraints, p90_hi, watts_hi, model_mb, acc_lo, fp32, snr_lo), shape)
    best_case = _total(overshoot(constraints, p90_lo, watts_lo, model_mb, acc_hi, fp32, snr_hi), shape)
    least = np.lexsort((names, worst), axis=1)[:, 0]

    # a device stays on its current variant where rule 4 or 5 says so
    runs = current >= 0
    at = np.where(runs, current, 0)[:, None]
    stays_feasible = np.take_along_axis(unbeaten, at, axis=1)[:, 0]
    stays_infeasible = (np.take_along_axis(best_case, at, axis=1)[:, 0]
                        <= np.take_along_axis(worst, least[:, None], axis=1)[:, 0] * (1 + margin))
    stays = ready & runs & np.where(feasible, stays_feasible, stays_infeasible)
    chosen = np.where(ready, np.where(stays, current, np.where(feasible, best, least)), -1)
    return Choices(chosen, ready & feasible, ready & (chosen != current), stays,
                   np.where(ready & feasible, runner_up, -1))


def target_ranks(variants: tuple[str, ...], targets: tuple[str, ...]) -> tuple[int, ...]:
    """Return, per variant, the place of its target in ``targets`` (one past the end where it is not
    listed, or the id is no variant this version knows)."""
    def rank(variant: str) -> int:
        try:
            target = parse_variant(variant).target
        except ValueError:
            return len(targets)
        return targets.index(target) if target in targets else len(targets)

    return tuple(rank(v) for v in variants)


def _tie_ranks(group: Group) -> np.ndarray:
    """Return each variant's rank when its figures tie with another's: by its target's preference
    (``group.preference``), then by variant id; a total order, whatever order the variants came in."""
    ids = np.unique(np.array(group.variants), return_inverse=True)[1]
    preference = np.zeros(len(ids)) if group.preference is None else np.asarray(group.preference)
    return np.lexsort((ids, preference)).argsort()


def _spread(figures: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the least and the most of each variant's recent figures, NaN where it has none."""
    return np.fmin.reduce(figures, axis=2), np.fmax.reduce(figures, axis=2)


def _broken(shares: dict[str, tuple[np.ndarray, np.ndarray]], shape: tuple[int, ...]) -> np.ndarray:
    """Return where any bound is broken, from :func:`~edge_kit.selection.constraints.overshoot`."""
    out = np.zeros(shape, dtype=bool)
    for broken, _share in shares.values():
        out |= broken
    return out


def _total(shares: dict[str, tuple[np.ndarray, np.ndarray]], shape: tuple[int, ...]) -> np.ndarray:
    """Return the sum of the shares of the broken bounds, bound by bound (0 where none is broken)."""
    total = np.zeros(shape)
    for broken, share in shares.values():
        total = total + np.where(broken, share, 0.0)
    return total


def _ranked_accuracy(accuracy: np.ndarray) -> np.ndarray:
    """Return the accuracies as selection compares them: rounded to 9 decimals exactly as Python's
    ``round`` does (float noise does not separate equal accuracies), -1 where there is none (NaN)."""
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = accuracy * 1e9
        whole = np.rint(scaled)
        # the product is already rounded once: unless it is clearly away from a tie, np.rint may round
        # it the other way from the exact decimal, so Python rounds those (rare) values itself
        unsure = ~(np.abs(np.abs(scaled - whole) - 0.5) > 2 * np.spacing(scaled)) & ~np.isnan(accuracy)
    out = whole / 1e9
    out[unsure] = [round(float(x), 9) for x in accuracy[unsure]]
    return np.where(np.isnan(accuracy), -1.0, out)


def _differs(a: np.ndarray, b: np.ndarray, margin: float) -> np.ndarray:
    """Return -1 where ``a`` is lower than ``b`` by more than ``margin`` (relative), 1 where higher, 0
    otherwise; a figure is lower than a missing one (NaN), and two missing ones are equal."""
    with np.errstate(invalid="ignore"):
        beyond = ~(np.abs(a - b) <= margin * np.maximum(np.abs(a), np.abs(b)))
        known = np.where(beyond, np.where(a < b, np.int8(-1), np.int8(1)), np.int8(0))
    has_a, has_b = ~np.isnan(a), ~np.isnan(b)
    return np.where(has_a == has_b, np.where(has_a, known, np.int8(0)), np.where(has_a, np.int8(-1), np.int8(1)))


def _preference(ok: np.ndarray, p90: np.ndarray, energy: np.ndarray, accuracy: np.ndarray, names: np.ndarray,
                margin: float) -> np.ndarray:
    """Return the order of each device's variants, best first, feasible (``ok``) ones before the rest.

    On the newest figures (``accuracy`` as :func:`_ranked_accuracy` gives it, ``names`` each variant's
    rank in a tie, :func:`_tie_ranks`): highest accuracy first; among equals, those whose energy is
    within the margin of the least energy of the most accurate feasible ones, by p90, then the others
    by energy; ties by p90, then the profile's preferred target, then variant id. A total order, so
    the result does not depend on the order the variants came in.
    """
    top = np.where(ok, accuracy, -np.inf).max(axis=1, keepdims=True)
    least = np.fmin.reduce(np.where(ok & (accuracy == top), energy, np.nan), axis=1, keepdims=True)  # NaN: none
    near = np.isnan(least) | (~np.isnan(energy) & (_differs(energy, least, margin) == 0))
    energy = np.where(np.isnan(energy), np.inf, energy)
    return np.lexsort((names, p90, np.where(near, p90, energy), ~near, -accuracy, ~ok), axis=1)


def _first(wanted: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Return, per device, the first variant in ``order`` that is ``wanted``; -1 where none is."""
    in_order = np.take_along_axis(wanted, order, axis=1)
    first = np.take_along_axis(order, in_order.argmax(axis=1)[:, None], axis=1)[:, 0]
    return np.where(in_order.any(axis=1), first, -1)


@dataclass(frozen=True)
class Request:
    """One device to decide for: its candidates, its constraints, its reference's accuracy (``fp32_accuracy``: the
    accuracy bound's base, of the variant ``reference_id``), what it runs."""

    device: str
    candidates: list[Candidate]
    constraints: Constraints
    fp32_accuracy: float | None
    current_sha: str | None
    targets: tuple[str, ...] = ()  # its profile's targets, most preferred first (ties); () for none
    reference_id: str = REFERENCE_VARIANTS[0]  # the manifest's reference (onnx-fp32 for an ONNX model without LiteRT variants)


def choose(device: str, candidates: list[Candidate], constraints: Constraints, *, fp32_accuracy: float | None,
           current_sha: str | None, margin: float = DEFAULT_MARGIN, targets: tuple[str, ...] = (),
           reference_id: str = REFERENCE_VARIANTS[0]) -> Decision:
    """Return the decision for one device, with its table and reason (see the module docstring for the rules)."""
    return choose_all([Request(device, candidates, constraints, fp32_accuracy, current_sha, targets, reference_id)],
                      margin)[0]


def choose_all(requests: list[Request], margin: float = DEFAULT_MARGIN) -> list[Decision]:
    """Return one decision per request, in order, each with its table and reason.

    Devices that share their variants and constraints are decided together by one
    :func:`choose_group` call; only the table and the reason are built per device.
    """
    decisions: list[Decision | None] = [None] * len(requests)
    groups: dict[tuple[tuple[str, ...], Constraints, tuple[str, ...]], list[int]] = {}
    for i, r in enumerate(requests):
        if r.candidates and all(c.measured for c in r.candidates):
            groups.setdefault((tuple(c.variant for c in r.candidates), r.constraints, r.targets), []).append(i)
        else:
            decisions[i] = _decision(r, None, 0, margin)
    for (_, constraints, targets), members in groups.items():
        batch = [requests[i] for i in members]
        fp32 = np.array([np.nan if r.fp32_accuracy is None else r.fp32_accuracy for r in batch], dtype=float)
        current = np.array([next((k for k, c in enumerate(r.candidates) if c.sha256 == r.current_sha), -1)
                            for r in batch])
        got = choose_group(Group.of([r.candidates for r in batch], targets), constraints, fp32_accuracy=fp32,
                           current=current, margin=margin)
        for row, i in enumerate(members):
            decisions[i] = _decision(requests[i], got, row, margin)
    return decisions  # type: ignore[return-value]


def _decision(r: Request, got: Choices | None, row: int, margin: float) -> Decision:
    """Return the decision of one device: row ``row`` of ``got``, or (None) why nothing can be chosen yet."""
    candidates, constraints, current_sha = r.candidates, r.constraints, r.current_sha
    at = next((i for i, c in enumerate(candidates) if c.sha256 == current_sha), -1)
    current = candidates[at] if at >= 0 else None
    table = []
    for c in candidates:
        m = c.measured
        broken = violations(constraints, m, r.fp32_accuracy) if m else {}
        table.append({"variant": c.variant, "sha256": c.sha256, "measured": m is not None,
                      "runs": len(c.history),
                      "p90_ms": m.p90_ms if m else None, "accuracy": m.accuracy if m else None,
                      "energy_mj": m.energy_mj if m else None, "avg_w": m.avg_w if m else None,
                      "power_source": m.power_source if m else None, "model_mb": round(c.bytes / 1e6, 3),
                      "violates": [describe(k, constraints, r.reference_id) for k in broken],
                      "current": c.sha256 == current_sha,
                      "unjudged": unjudged(constraints, m, r.fp32_accuracy, r.reference_id) if m else []})
    base = Decision(r.device, None, None, current.variant if current else None, False, False, "")
    if got is None:
        if not candidates:
            base.reason = "no candidate variant is installed for this device's profile"
            return base
        base.unmeasured = [c.variant for c in candidates if c.measured is None]
        base.table = table
        base.reason = f"not measured yet on this device: {', '.join(base.unmeasured)}"
        return base
    index, feasible, runner_up = int(got.chosen[row]), bool(got.feasible[row]), int(got.runner_up[row])
    stays = bool(got.stays[row])
    chosen = candidates[index]
    if not feasible:
        reason = "infeasible: no variant meets every constraint; " + (
            f"stays on {chosen.variant}, within the {margin:.0%} margin of the least violating" if stays
            else f"{chosen.variant} violates least")
        if chosen.measured is not None:  # by how much, with where each figure came from ("violates least" alone
            # left the user guessing how far off)
            reason += ": " + broken_text(constraints, chosen.measured, violations(constraints, chosen.measured,
                                                                                r.fp32_accuracy),
                                         reference_id=r.reference_id)
    elif stays:
        reason = (f"stays on {chosen.variant}: feasible, and no feasible variant beats it by more than "
                  f"the {margin:.0%} margin in every recent measurement")
    else:
        reason = f"{chosen.variant}: {_why(chosen, candidates[runner_up] if runner_up >= 0 else None, margin)}"
        if current is not None and current is not chosen:
            reason += f" (current {current.variant} " + ("breaks its constraints)" if table[at]["violates"]
                                                          else "is beaten beyond the margin)")
    if table[index]["unjudged"]:
        reason += f"; not judged (nothing measured it): {', '.join(table[index]['unjudged'])}"
    decision = Decision(r.device, chosen.variant, chosen.sha256, base.current, feasible, bool(got.switch[row]), reason,
                        violates=[] if feasible else table[index]["violates"], unjudged=table[index]["unjudged"])
    for i, t in enumerate(table):
        t["chosen"] = i == index
    decision.table = table
    return decision


def _why(best: Candidate, runner_up: Candidate | None, margin: float) -> str:
    """Return why ``best`` is preferred to ``runner_up`` on their newest measurements, in words."""
    m = best.measured
    if runner_up is None:
        return "the only feasible variant"
    r = runner_up.measured
    accuracy = _ranked_accuracy(np.array([m.accuracy, r.accuracy], dtype=float))
    if accuracy[0] != accuracy[1]:
        return (f"highest accuracy among feasible variants ({_accuracy(m.accuracy)} vs {_accuracy(r.accuracy)} "
                f"for {runner_up.variant})")
    if _differs(*np.array([m.energy_mj, r.energy_mj], dtype=float), margin):
        # where the energies came from: an estimate from CPU use ranks variants by a model, not by a meter
        power = m.power_source if m.power_source == r.power_source else f"{m.power_source} vs {r.power_source}"
        return (f"same accuracy, least energy per inference ({_mj(m.energy_mj)} vs {_mj(r.energy_mj)} mJ for "
                f"{runner_up.variant}; power: {power})")
    return f"same accuracy and energy within {margin:.0%}, lowest p90 ({m.p90_ms:.4g} vs {r.p90_ms:.4g} ms for {runner_up.variant})"


def _accuracy(value: float | None) -> str:
    """Return an accuracy for a reason: :func:`~edgekit_protocol.labels.accuracy_text` (a share as a percentage, a
    user metric on its own scale), or "not measured" when nothing scored it (never a 0 nothing measured)."""
    return "not measured" if value is None or math.isnan(value) else accuracy_text(value)


def _mj(energy: float | None) -> str:
    """Return an energy per inference for a reason, in mJ without the unit; "none" when there is none."""
    return "none" if energy is None else f"{energy:.4g}"
