"""The selection policy on hand-made measurements."""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_kit.profiles import Constraints
from edge_kit.selection.constraints import Measured, effective_constraints, violations
from edge_kit.selection.policy import Candidate, Group, choose, choose_group

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
    # the reason quotes the figure that breaks the bound and where it came from (it named only the bound, so the
    # line a user reads, "NO: p90 <= 15 ms ... stays on int8", never said by how much)
    assert d.reason.endswith("int8 violates least: accuracy >= 0.98 x fp32 (95.00% on the eval set)"), \
        d.reason


def test_the_accuracy_bound_names_the_reference_an_onnx_model_without_litert_variants_has():
    """An ONNX model compiled for ONNX Runtime and TensorRT variants alone has onnx-fp32 as its reference, no fp32:
    select's table and reason said 'accuracy >= 0.98 x fp32', a variant the model does not have."""
    cands = [cand("onnx-fp32", 12, 0.99, 2.0), cand("onnx-int8", 3, 0.95, 1.0)]
    d = choose("d", cands, C, fp32_accuracy=0.99, current_sha=None, reference_id="onnx-fp32")
    rows = {r["variant"]: r for r in d.table}
    assert rows["onnx-int8"]["violates"] == ["accuracy >= 0.98 x onnx-fp32"] and d.chosen == "onnx-int8"
    assert d.reason.endswith("onnx-int8 violates least: accuracy >= 0.98 x onnx-fp32 (95.00% on the eval set)"), d.reason
    no_power = [replace(c, history=(replace(c.history[0], avg_w=None),)) for c in cands]
    d = choose("d", no_power, C, fp32_accuracy=None, current_sha=None, reference_id="onnx-fp32")
    assert "accuracy >= 0.98 x onnx-fp32" in d.table[0]["unjudged"], d.table[0]


def test_an_infeasible_reason_quotes_the_figures_that_break_the_bounds():
    """With a bound nothing meets, the reason read "infeasible: no variant meets every constraint; fp32 violates
    least": the user could not tell by how much, nor where the figure came from."""
    cands = [cand("fp32", 12, 0.99, 2.0), cand("fp16", 15, 0.99, 2.0, watts=6)]
    d = choose("d", cands, C, fp32_accuracy=0.99, current_sha=None)
    assert not d.feasible and d.chosen == "fp32"
    assert d.reason == ("infeasible: no variant meets every constraint; fp32 violates least: "
                        "p90 <= 10 ms (12 ms p90, the device's clock)")
    d = choose("d", cands[1:], C, fp32_accuracy=0.99, current_sha=None)  # every bound it breaks, each with its source
    assert d.reason.endswith("p90 <= 10 ms (15 ms p90, the device's clock), power <= 5 W (6 W, ina219)"), d.reason


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


def test_when_every_feasible_variant_is_beaten_the_preferred_one_is_chosen():
    # energies tie with their neighbours within 5 % but not end to end:
    # a beats b and b beats c on p90, c beats a on energy
    cands = [cand("a", 1.0, 0.99, 1.08), cand("b", 2.0, 0.99, 1.04), cand("c", 3.0, 0.99, 1.00)]
    d = choose("d", cands, C, fp32_accuracy=0.99, current_sha=None, margin=0.05)
    # of those within 5 % of the least energy (b, c), the lower p90
    assert d.chosen == "b" and reference(cands, C, 0.99, None, 0.05) == (1, True, True)


def test_accuracies_are_compared_rounded_to_9_decimals_as_python_rounds_them():
    # 5067 of 5120 right is 0.9896484375, a tie at the 10th decimal: Python rounds the float down to
    # 0.989648437; rounding the float times 1e9 (np.round) goes up and would rank it above b
    cands = [cand("a", 5.0, 5067 / 5120, 2.0), cand("b", 5.0, 0.989648437, 1.0)]
    d = choose("d", cands, C, fp32_accuracy=0.99, current_sha=None)
    assert d.chosen == "b" and "least energy" in d.reason


def reference(cands, c, fp32_accuracy, current, margin):
    """The rule device by device in plain Python, as written before it was vectorised (module docstring
    of edge_kit.selection.policy). Returns (index of the chosen variant or None, feasible, switch)."""
    if not cands or any(not x.history for x in cands):
        return None, False, False

    def envelope(x, best):  # the most (best) or least favourable figures over the recent measurements
        def pick(name, lower_is_better=True):
            values = [getattr(m, name) for m in x.history if getattr(m, name) is not None]
            return (min if best == lower_is_better else max)(values) if values else None
        return replace(x.history[0], p90_ms=pick("p90_ms"), avg_w=pick("avg_w"), energy_mj=pick("energy_mj"),
                       accuracy=pick("accuracy", lower_is_better=False))

    def acc(m):
        return round(m.accuracy, 9) if m.accuracy is not None else -1.0

    def differs(a, b):
        if a is None or b is None:
            return 0 if a is None and b is None else (1 if a is None else -1)
        return 0 if abs(a - b) <= margin * max(abs(a), abs(b)) else (-1 if a < b else 1)

    def beats(i, j):
        a, b = envelope(cands[i], best=False), envelope(cands[j], best=True)
        if acc(a) != acc(b):
            return acc(a) > acc(b)
        return (differs(a.energy_mj, b.energy_mj) or differs(a.p90_ms, b.p90_ms)) < 0

    ok = [i for i, x in enumerate(cands) if not violations(c, x.history[0], fp32_accuracy)]
    if ok:
        unbeaten = [i for i in ok if not any(beats(o, i) for o in ok if o != i)]
        if current in unbeaten:
            return current, True, False
        newest = {i: cands[i].history[0] for i in ok}
        top = max(acc(m) for m in newest.values())
        least = min((m.energy_mj for m in newest.values() if acc(m) == top and m.energy_mj is not None), default=None)

        def key(i):
            m = newest[i]
            near = least is None or (m.energy_mj is not None and differs(m.energy_mj, least) == 0)
            energy = m.energy_mj if m.energy_mj is not None else math.inf
            return -acc(m), not near, m.p90_ms if near else energy, m.p90_ms, cands[i].variant

        ranked = sorted(ok, key=key)
        best = next((i for i in ranked if i in unbeaten), ranked[0])
        return best, True, best != current

    def score(i, best):
        return sum(violations(c, envelope(cands[i], best), fp32_accuracy).values())

    least = min(range(len(cands)), key=lambda i: (score(i, False), cands[i].variant))
    if current is not None and score(current, True) <= score(least, False) * (1 + margin):
        return current, False, False
    return least, False, least != current


# few distinct values, so that ties, margins and bounds are hit often; missing figures are None
P90 = st.one_of(st.sampled_from([1.0, 1.04, 1.1, 2.0, 3.0, 9.9, 10.0, 10.95, 11.0, 12.0]), st.floats(0.5, 15.0))
ENERGY = st.one_of(st.none(), st.sampled_from([1.0, 1.04, 1.08, 2.0]), st.floats(0.5, 3.0))
ACCURACY = st.one_of(st.none(), st.sampled_from([0.95, 0.97, 0.98, 0.99, 0.99 + 1e-12, 0.992]))
BOUNDS = st.fixed_dictionaries({}, optional={"max_latency_p90_ms": st.sampled_from([2.0, 10.0]),
                                             "max_power_w": st.sampled_from([3.5, 5.0]),
                                             "min_accuracy_ratio": st.sampled_from([0.98, 0.99, 1.0]),
                                             "max_model_mb": st.sampled_from([1.0, 2.0])})


@st.composite
def fleets(draw):
    """A group of devices over the same variants, each with up to 5 recent measurements per variant (at
    times none: unmeasured), and the index of the variant each runs (None for none)."""
    variants = draw(st.lists(st.sampled_from(["fp32", "fp16", "dynamic-int8", "int8", "int8-pruned-50"]),
                             min_size=1, max_size=4, unique=True))
    devices, current = [], []
    for d in range(draw(st.integers(1, 5))):
        cands = []
        for v in variants:
            mb, watts = draw(st.sampled_from([0.5, 1.0, 3.0])), draw(st.sampled_from([None, 3.0, 4.0, 6.0]))
            history = tuple(Measured(v, draw(P90), watts, draw(ENERGY), "ina219", draw(ACCURACY), mb)
                            for _ in range(draw(st.integers(0, 5) if draw(st.booleans()) else st.integers(1, 5))))
            cands.append(Candidate(v, f"{d}-{v}", int(mb * 1e6), history))
        devices.append(cands)
        current.append(draw(st.none() | st.integers(0, len(variants) - 1)))
    return devices, current


@settings(max_examples=300, deadline=None)
@given(fleets(), BOUNDS, st.sampled_from([None, 0.0, 0.99]), st.sampled_from([0.0, 0.05, 0.1, 0.3]))
def test_the_vectorised_policy_decides_as_the_rule_does_device_by_device(fleet, bounds, fp32, margin):
    devices, current = fleet
    c = Constraints(**bounds)
    expected = [reference(cands, c, fp32, cur, margin) for cands, cur in zip(devices, current)]
    got = choose_group(Group.of(devices), c, fp32_accuracy=fp32, margin=margin,
                       current=np.array([-1 if cur is None else cur for cur in current]))
    assert [(None if i < 0 else int(i), bool(f), bool(s)) for i, f, s in zip(got.chosen, got.feasible, got.switch)] \
        == expected
    for cands, cur, (index, feasible, switch) in zip(devices, current, expected):
        d = choose("d", cands, c, fp32_accuracy=fp32, current_sha=None if cur is None else cands[cur].sha256,
                   margin=margin)
        assert (d.chosen, d.feasible, d.switch) == (None if index is None else cands[index].variant, feasible, switch)


def test_a_variant_below_the_fidelity_floor_is_not_chosen_and_the_table_says_why():
    c = Constraints(max_latency_p90_ms=10, min_fidelity_snr_db=20)
    good = Measured("fp16", 6, 3.0, 3.0, "ina219", 0.99, 1.0, snr_db=45.0)
    noisy = Measured("int8", 2, 3.0, 1.0, "ina219", 0.99, 1.0, snr_db=7.4)  # faster, cheaper, computes something else
    cands = [Candidate(m.variant, m.variant * 4, 10 ** 6, (m,)) for m in (good, noisy)]
    d = choose("d", cands, c, fp32_accuracy=0.99, current_sha=None)
    rows = {r["variant"]: r for r in d.table}
    assert d.chosen == "fp16" and rows["int8"]["violates"] == ["fidelity SNR >= 20 dB"]
    assert violations(c, noisy, 0.99) == {"min_fidelity_snr_db": pytest.approx(1.26)}
    unmeasured = replace(noisy, snr_db=None)  # no eval set on the device: the bound is not judged
    assert violations(c, unmeasured, 0.99) == {}


def test_a_bound_nothing_measured_is_said_to_be_unjudged_not_met():
    """A profile asks for max power, min accuracy and min fidelity, and the device has no power sensor nor
    estimate, and no eval set: the choice is made on what was measured (latency), and the decision says
    which bounds it could not judge, rather than calling them met."""
    c = Constraints(max_latency_p90_ms=10, max_power_w=5, min_accuracy_ratio=0.98, min_fidelity_snr_db=20)
    cands = [cand("fp32", 8, None, None, watts=None), cand("int8", 3, None, None, watts=None)]
    d = choose("d", cands, c, fp32_accuracy=None, current_sha=None)
    assert d.chosen == "int8" and d.feasible
    assert d.unjudged == ["power <= 5 W", "accuracy >= 0.98 x fp32", "fidelity SNR >= 20 dB"]
    assert "not judged (nothing measured it): power <= 5 W, accuracy >= 0.98 x fp32, fidelity SNR >= 20 dB" in d.reason
    assert {r["variant"]: r["unjudged"] for r in d.table}["fp32"] == d.unjudged
    judged = choose("d", [cand("fp32", 8, 0.99, 2.0), cand("int8", 3, 0.99, 1.0)], C, fp32_accuracy=0.99,
                    current_sha=None)
    assert judged.unjudged == [] and "not judged" not in judged.reason


def test_an_accuracy_ratio_to_an_fp32_figure_of_zero_or_less_is_unjudged_not_inverted():
    """A user metric may be negative (e.g. minus an error, higher is better): -2 against fp32's -1 is a
    ratio of 2, which would pass a 0.98 bound while being worse. No ratio is taken to a figure <= 0."""
    c = Constraints(min_accuracy_ratio=0.98)
    worse = Measured("int8", 3, None, None, "not measured", -2.0, 1.0)
    assert violations(c, worse, -1.0) == {} and violations(c, worse, 0.0) == {}
    d = choose("d", [cand("fp32", 8, -1.0, 2.0), cand("int8", 3, -2.0, 1.0)], c, fp32_accuracy=-1.0, current_sha=None)
    assert d.unjudged == ["accuracy >= 0.98 x fp32"] and "not judged" in d.reason
    assert violations(c, replace(worse, accuracy=0.5), 1.0) == {"min_accuracy_ratio": pytest.approx(1 - 0.5 / 0.98)}
    group = np.array([1.0, 0.0, -1.0, np.nan])  # the fleet model's arrays take the same rule
    from edge_kit.selection.constraints import overshoot
    broken, _ = overshoot(c, 1.0, np.nan, 1.0, np.full(4, 0.5), group)["min_accuracy_ratio"]
    assert broken.tolist() == [True, False, False, False]


def test_tune_decides_without_the_variants_a_device_has_no_runtime_for(monkeypatch, tmp_path, tune_offline):
    """A device without ONNX Runtime is never sent onnx-fp32 (the deploy refuses it), so it can never measure it:
    tune must decide among what the device can run, not wait for onnx-fp32 round after round."""
    from types import SimpleNamespace

    from edge_kit.fleet.deploy import DeviceResult, GroupResult
    from edge_kit.fleet.inventory import Device
    from edge_kit.loop import tune as tn
    from edge_kit.manifest import Artifact, ArtifactTrust, Manifest
    from edge_kit.telemetry.store import Store
    from edgekit_protocol import messages

    def art(vid):
        return Artifact(id=vid, status="built", profiles=["rpi4"], summary="", precision="fp32", bytes=100,
                        gzip_bytes=90, sparsity=0.0, macs=10, sha256=vid * 4)

    manifest = Manifest(created="now", model={"name": "m"}, versions={}, profiles={"rpi4": {}},
                        artifacts=[art("fp32"), art("int8"), art("onnx-fp32")])
    dev = Device(name="d1", host="127.0.0.1", user="edgekit", profile="rpi4")
    store = Store(tmp_path / "h.db")
    for seq, (vid, p90) in enumerate((("fp32", 9.0), ("int8", 3.0))):
        store.add("bench", messages.envelope("bench", "f", "d1", seq, {
            "variant": vid, "sha256": vid * 4, "latency_ms": {"p90": p90}, "runs": 10, "simulated": False,
            "power": {"estimated": True, "avg_w": 3.0, "energy_per_inference_mj": 1.0}, "accuracy": {"value": 0.99}}))
    deployed = DeviceResult("d1", "succeeded", variant="fp32", sha256="fp32" * 4)
    deployed.refused = {"onnx-fp32": "d1: onnx-fp32 needs ONNX Runtime: pip install 'edge-kit[agent-onnx]'"}

    monkeypatch.setattr(tn, "read_manifest", lambda *_a: manifest)
    monkeypatch.setattr(tn, "deploy", lambda *_a, **_k: GroupResult([deployed]))
    monkeypatch.setattr(tn, "_measure", lambda _c, _s, wanted, *_a: (0, {}, {}) if not any(wanted.values())
                        else pytest.fail(f"asked to measure {wanted}"))
    monkeypatch.setattr(tn, "_activate", lambda _f, devs, switch, _o, _s, current, _m, _u: current.update(
        {d: v * 4 for d, v in switch.items()}) or GroupResult([]))
    report = tn.tune(SimpleNamespace(artifact_trust=ArtifactTrust), [dev], tn.TuneOptions(tmp_path), store)
    d = report.final["d1"]
    assert d.chosen == "int8" and d.unmeasured == [] and "onnx-fp32" not in {r["variant"] for r in d.table}


def test_tune_leaves_a_device_whose_measurement_the_history_refused_out_of_the_round_and_says_so(
        monkeypatch, tmp_path, tune_offline, run_cli):
    """The history refused d1's measurement for what it holds: tune stopped with exit 6 and decided nothing for
    anyone. Now d1 is left out of the round (its decision would lack that variant) with the refusal in the report
    (``refused``, per device, and in the round), d2 is decided, and `edgekit tune` exits 4."""
    from types import SimpleNamespace

    from edge_kit.fleet.deploy import DeviceResult, GroupResult
    from edge_kit.fleet.inventory import Device
    from edge_kit.loop import tune as tn
    from edge_kit.manifest import Artifact, ArtifactTrust, Manifest
    from edge_kit.telemetry.store import Store

    art = Artifact(id="fp32", status="built", profiles=["rpi4"], summary="", precision="fp32", bytes=100,
                   gzip_bytes=90, sparsity=0.0, macs=10, sha256="f" * 64)
    manifest = Manifest(created="now", model={"name": "m"}, versions={}, profiles={"rpi4": {}}, artifacts=[art])
    devs = [Device(name=n, host="127.0.0.1", user="edgekit", profile="rpi4") for n in ("d1", "d2")]
    why = "bench fp32 (refused by the history: the history file h.db refused a record (integer overflow))"
    monkeypatch.setattr(tn, "read_manifest", lambda *_a: manifest)
    monkeypatch.setattr(tn, "deploy", lambda *_a, **_k: GroupResult(
        [DeviceResult(d.name, "succeeded", variant="fp32", sha256="f" * 64) for d in devs]))
    monkeypatch.setattr(tn, "_measure", lambda _c, _s, wanted, *_a: (1, {}, {"d1": [why]}))
    report = tn.tune(SimpleNamespace(artifact_trust=ArtifactTrust), devs, tn.TuneOptions(tmp_path, rounds=1),
                     Store(tmp_path / "h.db"))
    assert report.refused == {"d1": [why]} and report.rounds[0]["refused"] == {"d1": [why]}
    assert sorted(report.final) == ["d2"] and report.as_dict()["refused"] == {"d1": [why]}

    from edge_kit.cli import loop as cli_loop
    from edge_kit.fleet import inventory

    monkeypatch.setattr(inventory, "load_fleet", lambda _p: SimpleNamespace(select=lambda _s: devs))
    monkeypatch.setattr(tn, "tune", lambda *_a, **_k: report)
    monkeypatch.setattr(cli_loop, "open_fleet_history", lambda *_a: Store(tmp_path / "h.db"))
    code, out, err = run_cli("tune", "--fleet", tmp_path / "fleet.yaml", "--artifacts", tmp_path)
    text = " ".join(out.split())
    assert code == 4 and "d1: history refused bench fp32 (refused by the history:" in text, (out, err)
    assert "1 record(s) refused by the history" in text



def test_a_decision_the_history_refuses_for_what_it_holds_is_that_devices_error_and_tune_goes_on(
        monkeypatch, tmp_path, tune_offline, run_cli):
    """The history refused d1's decision for what it holds (as a LATIN1 PostgreSQL database refuses a device name
    in another script; the store's own refusal is tested on both databases in test_history_backends.py): tune
    stopped on it (exit 6 for a record's fault, or a traceback where the driver's error escaped), deciding nothing
    more. Now that decision is refused alone (kept in the invalid table, under d1), d2's is stored, `edgekit tune`
    exits 4 and says why; a history that is down still stops tune with its one line (exit 6)."""
    from types import SimpleNamespace

    from edge_kit.errors import HistoryError, HistoryRecordError
    from edge_kit.fleet.deploy import DeviceResult, GroupResult
    from edge_kit.fleet.inventory import Device
    from edge_kit.loop import tune as tn
    from edge_kit.manifest import Artifact, ArtifactTrust, Manifest
    from edge_kit.telemetry.store import Store
    from edgekit_protocol import messages

    art = Artifact(id="fp32", status="built", profiles=["rpi4"], summary="", precision="fp32", bytes=100,
                   gzip_bytes=90, sparsity=0.0, macs=10, sha256="f" * 64)
    manifest = Manifest(created="now", model={"name": "m"}, versions={}, profiles={"rpi4": {}}, artifacts=[art])
    devs = [Device(name=n, host="127.0.0.1", user="edgekit", profile="rpi4") for n in ("d1", "d2")]
    store = Store(tmp_path / "h.db")
    for seq, name in enumerate(("d1", "d2")):
        store.add("bench", messages.envelope("bench", "f", name, seq, {
            "variant": "fp32", "sha256": "f" * 64, "latency_ms": {"p90": 1.0}, "runs": 10, "simulated": False,
            "power": {"estimated": True, "avg_w": 3.0, "energy_per_inference_mj": 1.0}, "accuracy": {"value": 0.99}}))
    store.close()
    why = "the history database postgresql://edgekit@db/edgekit refused a record (character with no equivalent in LATIN1)"
    real = Store.add_decision

    def add_decision(self, decision):
        if decision["device"] == "d1":
            raise HistoryRecordError(why)
        real(self, decision)

    monkeypatch.setattr(Store, "add_decision", add_decision)
    monkeypatch.setattr(tn, "read_manifest", lambda *_a: manifest)
    monkeypatch.setattr(tn, "deploy", lambda *_a, **_k: GroupResult(
        [DeviceResult(d.name, "succeeded", variant="fp32", sha256="f" * 64) for d in devs]))
    monkeypatch.setattr(tn, "_measure", lambda *_a: (0, {}, {}))
    store = Store(tmp_path / "h.db")
    report = tn.tune(SimpleNamespace(artifact_trust=ArtifactTrust), devs, tn.TuneOptions(tmp_path, rounds=1), store)
    assert report.refused == {"d1": [f"decision (refused by the history: {why})"]}  # one round: no switch, no verify
    assert sorted(report.final) == ["d1", "d2"]
    assert {d["device"] for d in store.decisions()} == {"d2"}  # d2's decisions stored, d1's refused alone ...
    kept = store.refused_messages()
    assert [(r["device"], r["topic"], r["reason"]) for r in kept] == [("d1", "decisions", why)]  # ... kept
    assert json.loads(kept[0]["payload"])["device"] == "d1" and json.loads(kept[0]["payload"])["chosen"] == "fp32"

    from edge_kit.cli import loop as cli_loop
    from edge_kit.fleet import inventory

    monkeypatch.setattr(inventory, "load_fleet", lambda _p: SimpleNamespace(select=lambda _s: devs,
                                                                       artifact_trust=ArtifactTrust))
    monkeypatch.setattr(cli_loop, "open_fleet_history", lambda *_a: Store(tmp_path / "h.db"))
    code, out, err = run_cli("tune", "--fleet", tmp_path / "fleet.yaml", "--artifacts", tmp_path, "--rounds", "1")
    text = " ".join(out.split())
    assert code == 4 and "d1: history refused decision (refused by the history:" in text, (out, err)

    def down(_self, _decision):
        raise HistoryError("the history database postgresql://edgekit@db/edgekit failed (server closed the connection)")

    monkeypatch.setattr(Store, "add_decision", down)
    code, out, err = run_cli("tune", "--fleet", tmp_path / "fleet.yaml", "--artifacts", tmp_path, "--rounds", "1")
    assert code == 6 and err == ("edgekit: error: the history database postgresql://edgekit@db/edgekit failed (server "
                                 "closed the connection)\n")


NO_ACC = Constraints(max_latency_p90_ms=10, max_power_w=5, max_model_mb=2)


def test_a_reason_never_shows_an_accuracy_nothing_measured_as_zero():
    # int8's eval set had no labels (or its metric failed): its accuracy is unknown, not 0 %
    cands = [cand("fp16", 6, 0.99, 3.0), cand("int8", 3, None, 1.0)]
    d = choose("d", cands, NO_ACC, fp32_accuracy=0.99, current_sha=None)
    assert d.chosen == "fp16" and "highest accuracy" in d.reason
    assert "99.00% vs not measured for int8" in d.reason and "0.00" not in d.reason


def test_a_reason_shows_a_user_metric_on_its_own_scale_not_as_a_percentage():
    cands = [cand("fp16", 6, 37.5, 3.0), cand("int8", 3, 12.25, 1.0)]
    d = choose("d", cands, NO_ACC, fp32_accuracy=37.5, current_sha=None)
    assert d.chosen == "fp16" and "(37.5 vs 12.25 for int8)" in d.reason


def test_a_reason_resting_on_energy_says_where_the_energy_came_from():
    """"least energy per inference" read as metered when both figures were estimated from CPU use."""
    est = [Candidate(v, v * 4, 10**6, (Measured(v, p90, 3.0, mj, "estimated", 0.99, 1.0),))
           for v, p90, mj in (("fp16", 6, 3.0), ("int8", 3, 1.0))]
    d = choose("d", est, C, fp32_accuracy=0.99, current_sha=None)
    assert d.chosen == "int8" and d.reason.endswith("(1 vs 3 mJ for fp16; power: estimated)")
    mixed = [cand("fp16", 6, 0.99, 3.0), est[1]]
    d = choose("d", mixed, C, fp32_accuracy=0.99, current_sha=None)
    assert d.chosen == "int8" and d.reason.endswith("(1 vs 3 mJ for fp16; power: estimated vs ina219)")


def test_the_decision_table_says_an_infeasible_power_figure_was_estimated():
    """"NO: power <= 5 W" read as a meter's verdict when the watts were estimated from CPU use."""
    from rich.console import Console

    from edge_kit.cli.loop import decision_table

    hot = [Candidate(v, v * 4, 10**6, (Measured(v, p90, w, 1.0, src, 0.99, 1.0),))
           for v, p90, w, src in (("fp16", 6, 5.5, "estimated"), ("int8", 3, 6.0, "estimated"))]
    d = choose("d", hot, C, fp32_accuracy=0.99, current_sha=None)
    assert d.chosen == "fp16" and not d.feasible and d.violates == ["power <= 5 W"]
    console = Console(width=200, record=True)
    for item in decision_table({"d": d}, explain=False):
        console.print(item)
    assert "NO: power <= 5 W (estimated)" in console.export_text()


def test_where_figures_tie_the_profiles_preferred_target_wins_then_the_variant_id():
    """DESIGN's profile lists `targets` "in order of preference for ties": two variants whose every figure
    is the same (a coarse clock, a simulated device) go to the preferred target, in any candidate order."""
    tie = [cand("fp32", 4.0, 0.99, 2.0), cand("onnx-fp32", 4.0, 0.99, 2.0), cand("trt-fp16", 4.0, 0.99, 2.0)]
    for cands in (tie, tie[::-1]):
        assert choose("d", cands, C, fp32_accuracy=0.99, current_sha=None).chosen == "fp32"  # no preference: the id
        for targets, best in ((("tensorrt", "onnxruntime", "litert"), "trt-fp16"),
                              (("onnxruntime", "litert", "tensorrt"), "onnx-fp32"), (("litert",), "fp32")):
            d = choose("d", cands, C, fp32_accuracy=0.99, current_sha=None, targets=targets)
            assert d.chosen == best, (targets, d.reason)
    faster = [cand("fp32", 3.0, 0.99, 2.0), *tie[1:]]  # not a tie: the figures decide, whatever the preference
    assert choose("d", faster, C, fp32_accuracy=0.99, current_sha=None,
                  targets=("tensorrt", "onnxruntime", "litert")).chosen == "fp32"
