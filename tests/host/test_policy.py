"""The selection policy on hand-made measurements."""

from __future__ import annotations

import itertools
import random

import pytest

from edge_kit.profiles import Constraints
from edge_kit.selection.constraints import Measured, effective_constraints
from edge_kit.selection.policy import Candidate, choose

C = Constraints(max_latency_p90_ms=10, max_power_w=5, min_accuracy_ratio=0.98, max_model_mb=2)


def cand(variant, p90, acc, energy, mb=1.0, watts=3.0, measured=True):
    m = Measured(variant, p90, watts, energy, "ina219", acc, mb) if measured else None
    return Candidate(variant, variant * 4, int(mb * 1e6), (m,) if m else ())


def test_highest_accuracy_then_least_energy_then_lowest_p90():
    cands = [cand("fp32", 9, 0.99, 5.0), cand("fp16", 6, 0.99, 3.0), cand("int8", 3, 0.985, 1.0),
             cand("int8-pruned-50", 2, 0.99, 3.05)]
    d = choose("d", cands, C, fp32_accuracy=0.99, current_sha=None, margin=0.05)
    # fp16 and int8-pruned-50 tie on accuracy and on energy (within 5 %): the lower p90 wins
    assert d.chosen == "int8-pruned-50" and d.feasible and d.switch
    assert "lowest p90" in d.reason
    d = choose("d", cands[:3], C, fp32_accuracy=0.99, current_sha=None, margin=0.05)
    assert d.chosen == "fp16" and "least energy" in d.reason


def test_constraints_exclude_variants_and_the_table_says_why():
    cands = [cand("fp32", 12, 0.99, 2.0), cand("int8", 3, 0.95, 1.0), cand("fp16", 5, 0.99, 2.0, mb=3),
             cand("dyn", 4, 0.99, 2.5, watts=6)]
    d = choose("d", cands, C, fp32_accuracy=0.99, current_sha=None)
    assert d.feasible is False  # every one breaks something
    rows = {r["variant"]: r for r in d.table}
    assert rows["fp32"]["violates"] == ["p90 <= 10 ms"] and rows["int8"]["violates"] == ["accuracy >= 0.98 x fp32"]
    assert rows["fp16"]["violates"] == ["model <= 2 MB"] and rows["dyn"]["violates"] == ["power <= 5 W"]
    # least violating: int8 (0.95/0.99 is 2 % under 0.98), fp32 is 20 % over, fp16 50 %, dyn 20 %
    assert d.chosen == "int8" and d.violates == ["accuracy >= 0.98 x fp32"] and "infeasible" in d.reason


def test_no_flapping_within_the_margin_but_a_real_gain_switches():
    cands = [cand("fp16", 5.0, 0.99, 2.0), cand("int8", 4.9, 0.99, 1.95)]
    d = choose("d", cands, C, fp32_accuracy=0.99, current_sha="fp16" * 4, margin=0.05)
    assert d.chosen == "fp16" and not d.switch and "stays on fp16" in d.reason
    cands[1] = cand("int8", 2.0, 0.99, 1.0)
    d = choose("d", cands, C, fp32_accuracy=0.99, current_sha="fp16" * 4, margin=0.05)
    assert d.chosen == "int8" and d.switch and "beaten beyond the margin" in d.reason


def test_a_current_variant_that_breaks_its_constraints_is_left():
    cands = [cand("fp32", 20, 0.99, 2.0), cand("int8", 4, 0.99, 1.0)]
    d = choose("d", cands, C, fp32_accuracy=0.99, current_sha="fp32" * 4)
    assert d.chosen == "int8" and d.switch and "breaks its constraints" in d.reason


def test_nothing_is_chosen_while_candidates_are_unmeasured():
    d = choose("d", [cand("fp32", 5, 0.99, 1.0), cand("int8", 0, 0, 0, measured=False)], C,
               fp32_accuracy=0.99, current_sha=None)
    assert d.chosen is None and d.unmeasured == ["int8"] and "not measured yet" in d.reason


def test_device_overrides_replace_only_the_bounds_they_set():
    eff = effective_constraints(C, Constraints(max_latency_p90_ms=2))
    assert eff.max_latency_p90_ms == 2 and eff.max_power_w == 5 and eff.max_model_mb == 2


@pytest.mark.parametrize("record, source", [
    ({"power": {"sensor": "ina3221", "avg_w": 5.0, "energy_per_inference_mj": 1.0}}, "ina3221"),
    ({"power": {"estimated": True, "sensor": None, "avg_w": 3.0, "energy_per_inference_mj": 1.0}}, "estimated"),
    ({"power": {"measured": False, "method": "not measured"}}, "not measured"),
])
def test_measurements_keep_where_the_power_figure_came_from(record, source):
    rec = {"variant": "int8", "latency_ms": {"p90": 1.0}, "accuracy": None, **record}
    assert Measured.from_record(rec, 10).power_source == source


def test_an_infeasible_device_does_not_flap_between_near_equal_violators():
    cands = [cand("fp32", 20.0, 0.99, 2.0), cand("int8", 19.5, 0.99, 1.0)]
    d = choose("d", cands, C, fp32_accuracy=0.99, current_sha="fp32" * 4, margin=0.1)
    assert d.chosen == "fp32" and not d.switch and not d.feasible and "stays on fp32" in d.reason


def test_the_choice_does_not_depend_on_the_order_of_the_candidates():
    # energies 1.00 / 1.04 / 1.08 mJ: neighbours tie within 5 %, the ends do not; p90 favours the worst energy
    cands = [cand("a", 6.0, 0.99, 1.00), cand("b", 5.0, 0.99, 1.04), cand("c", 4.0, 0.99, 1.08)]
    chosen = {choose("d", list(order), C, fp32_accuracy=0.99, current_sha=None, margin=0.05).chosen
              for order in itertools.permutations(cands)}
    assert chosen == {"b"}  # within 5 % of the least energy (a, b), the lower p90


def noisy(rng, variant, p90, acc, watts=3.0):
    p = p90 * rng.uniform(0.7, 1.3)  # a clock as noisy as a busy 2-core host: +-30 %
    return Measured(variant, p, watts, watts * p, "estimated", acc, 1.0)


def with_history(c, *ms):
    return Candidate(c.variant, c.sha256, c.bytes, ms)


@pytest.mark.parametrize("bound", [10.0, 0.5])  # every p90 (0.7-3.9 ms) within the bound, and none
def test_a_fresh_measurement_of_the_chosen_variant_never_makes_the_device_switch(bound):
    rng = random.Random(7)
    limits = Constraints(max_latency_p90_ms=bound)
    reordered = 0
    for _ in range(2000):
        true = {"fp16": rng.uniform(1, 3), "int8": rng.uniform(1, 3), "dyn": rng.uniform(1, 3)}
        cands = [with_history(cand(v, 0, 0.99, 0), noisy(rng, v, t, 0.99)) for v, t in true.items()]
        first = choose("d", cands, limits, fp32_accuracy=0.99, current_sha=None, margin=0.05)
        again = [with_history(c, noisy(rng, c.variant, true[c.variant], 0.99), *c.history)
                 if c.variant == first.chosen else c for c in cands]
        newest_only = [Candidate(c.variant, c.sha256, c.bytes, c.history[:1]) for c in again]
        reordered += choose("d", newest_only, limits, fp32_accuracy=0.99, current_sha=None, margin=0.05).chosen != first.chosen
        second = choose("d", again, limits, fp32_accuracy=0.99, current_sha=first.chosen_sha256, margin=0.05)
        assert second.chosen == first.chosen and not second.switch, (first.table, second.table)
    assert reordered > 200  # the noise does reorder the newest figures; the policy keeps the device put
