"""The rollout's live gate: promote, hold or roll back from live service times and shadow fidelity."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from edge_kit.selection.gate import LiveEvidence, judge_live

rng = np.random.default_rng(0)


def times(n, median, spread=0.15):
    return list(rng.lognormal(np.log(median), spread, n))


def test_a_slower_candidate_is_rolled_back_with_its_numbers():
    d = judge_live([LiveEvidence("c1", times(300, 2.0))], [LiveEvidence("k1", times(300, 1.0)), LiveEvidence("k2", times(300, 1.0))])
    assert d.action == "roll back" and d.p_value < 1e-10 and d.canary_p50_ms > 1.8 and d.control_p50_ms < 1.1
    assert d.canary_samples == 300 and d.control_samples == 600 and "canaries slower" in d.reason


def test_the_same_distribution_is_promoted_and_the_decision_depends_on_the_figures():
    same = judge_live([LiveEvidence("c1", times(300, 1.0))], [LiveEvidence("k1", times(300, 1.0))])
    assert same.action == "promote" and same.p_value > 0.01
    # only the canary's figures change: the decision follows them
    slower = judge_live([LiveEvidence("c1", times(300, 1.5))], [LiveEvidence("k1", times(300, 1.0))])
    assert slower.action == "roll back"


def test_a_significant_but_immaterial_slowdown_is_promoted():
    d = judge_live([LiveEvidence("c1", times(5000, 1.04, 0.05))], [LiveEvidence("k1", times(5000, 1.0, 0.05))])
    assert d.p_value < 0.01 and d.action == "promote"  # 4 % slower: under the 10 % effect-size guard


def test_too_little_traffic_holds():
    d = judge_live([LiveEvidence("c1", times(20, 1.0))], [LiveEvidence("k1", times(300, 1.0))], min_samples=100)
    assert d.action == "hold" and "c1 answered fewer than 100" in d.reason
    assert judge_live([LiveEvidence("c1", times(300, 1.0))], []).action == "hold"
    assert judge_live([], [LiveEvidence("k1", times(300, 1.0))]).action == "hold"


def test_the_fidelity_floor_rolls_back_a_candidate_that_drifts_from_the_reference():
    fast_but_wrong = LiveEvidence("c1", times(300, 0.5), shadow_snr_db=3.2)
    d = judge_live([fast_but_wrong], [LiveEvidence("k1", times(300, 1.0))], min_snr_db=15)
    assert d.action == "roll back" and d.worst_snr_db == 3.2 and "below 15 dB" in d.reason
    good = judge_live([LiveEvidence("c1", times(300, 1.0), 31.0)], [LiveEvidence("k1", times(300, 1.0))], min_snr_db=15)
    assert good.action == "promote" and good.worst_snr_db == 31.0
    blind = judge_live([LiveEvidence("c1", times(300, 1.0))], [LiveEvidence("k1", times(300, 1.0))], min_snr_db=15)
    assert blind.action == "hold" and "no shadow comparison from c1" in blind.reason


# --- the unit of the test: devices, not requests (scipy's mannwhitneyu as the oracle) ------------------------


def fleet(medians, n=300, spread=0.1, prefix="d"):
    """One LiveEvidence per device, each device's service times around its own median."""
    return [LiveEvidence(f"{prefix}{i}", times(n, m, spread)) for i, m in enumerate(medians)]


def test_thousands_of_requests_from_a_few_devices_are_not_thousands_of_observations():
    """Devices differ (hardware, load): 12 canaries that happen to sit a little above the middle of their
    profile are no evidence against the candidate. Pooling their 3,600 requests would make that a p-value
    near zero (pseudo-replication) and roll a good candidate back; the gate tests the devices' medians."""
    from scipy.stats import mannwhitneyu

    controls = fleet(np.exp(np.linspace(-0.6, 0.6, 40)), prefix="k")
    canaries = fleet(np.exp(np.linspace(-0.45, 0.75, 12)), prefix="c")
    pooled = mannwhitneyu(np.concatenate([c.samples_ms for c in canaries]),
                          np.concatenate([k.samples_ms for k in controls]), alternative="greater").pvalue
    assert pooled < 1e-6  # what a request-level test would conclude
    d = judge_live(canaries, controls)
    medians = [np.median(e.samples_ms) for e in canaries], [np.median(e.samples_ms) for e in controls]
    assert d.unit == "devices" and d.canary_devices == 12 and d.control_devices == 40
    assert d.p_value == mannwhitneyu(*medians, alternative="greater").pvalue and d.p_value > 0.01
    assert d.canary_p50_ms == np.median(medians[0]) and d.control_p50_ms == np.median(medians[1])
    assert d.action == "promote" and "12 canary vs 40 control devices" in d.reason
    assert d.canary_samples == 12 * 300 and d.control_samples == 40 * 300


def test_a_slower_candidate_is_rolled_back_on_the_devices_medians():
    spread = np.exp(np.linspace(-0.3, 0.3, 30))
    d = judge_live(fleet(1.5 * spread[::3], prefix="c"), fleet(spread, prefix="k"))
    assert d.action == "roll back" and d.unit == "devices" and d.p_value < 0.01 and d.canary_devices == 10


def test_the_exact_test_on_small_device_counts_matches_scipy():
    from scipy.stats import mannwhitneyu

    cans, ctrls = fleet([1.3, 1.4, 1.5], prefix="c"), fleet([0.9, 1.0, 1.05, 1.1, 1.15, 1.2, 1.25], prefix="k")
    d = judge_live(cans, ctrls, alpha=0.01)
    oracle = mannwhitneyu([np.median(e.samples_ms) for e in cans], [np.median(e.samples_ms) for e in ctrls],
                          alternative="greater", method="exact").pvalue
    assert d.unit == "devices" and d.p_value == oracle == 1 / 120  # the extreme arrangement of 3 among 10
    assert d.action == "roll back"


def test_too_few_devices_fall_back_to_requests_and_say_the_p_value_is_optimistic():
    from scipy.stats import mannwhitneyu

    from edge_kit.selection.gate import smallest_p

    assert smallest_p(1, 99) == mannwhitneyu([100.0], list(range(99)), alternative="greater", method="exact").pvalue
    assert smallest_p(1, 2) == 1 / 3 and smallest_p(0, 5) == 1.0
    d = judge_live([LiveEvidence("c1", times(300, 2.0))], fleet([1.0, 1.0], prefix="k"))
    assert d.unit == "requests" and "optimistic" in d.test and "pooled requests" in d.reason
    assert d.action == "roll back"


def test_non_finite_or_negative_service_times_are_refused_and_counted_never_tested():
    """A NaN among the samples made scipy's p-value NaN, and NaN < alpha is false: a slower candidate was promoted."""
    slow = times(300, 2.0) + [float("nan"), float("inf"), -1.0]
    d = judge_live([LiveEvidence("c1", slow)], [LiveEvidence("k1", times(300, 1.0) + [float("-inf")])])
    assert d.action == "roll back" and d.refused_samples == 4 and np.isfinite(d.p_value)
    only_bad = judge_live([LiveEvidence("c1", [float("nan")] * 300)], [LiveEvidence("k1", times(300, 1.0))])
    assert only_bad.action == "hold" and only_bad.refused_samples == 300 and "300 service times refused" in only_bad.reason


def test_identical_service_times_everywhere_are_promoted_with_p_one():
    d = judge_live([LiveEvidence("c1", [1.0] * 300)], [LiveEvidence("k1", [1.0] * 300)])
    assert d.action == "promote" and d.p_value == 1.0


def test_the_report_says_whether_the_gate_tested_devices_or_pooled_requests(tmp_path):
    from edge_kit.telemetry.report import build_report
    from edge_kit.telemetry.store import Store

    spread = np.exp(np.linspace(-0.3, 0.3, 30))
    by_device = judge_live(fleet(1.5 * spread[::3], prefix="c"), fleet(spread, prefix="k"))
    by_request = judge_live([LiveEvidence("c1", times(300, 2.0))], [LiveEvidence("k1", times(300, 1.0))])
    store = Store(tmp_path / "edgekit-history.db")
    for name, d in (("c0", by_device), ("c1", by_request)):
        store.add_decision({"device": name, "kind": "live gate", "chosen": "int8", "current": None, "feasible": False,
                            "switch": False, "reason": d.reason, "gate": d.as_dict()})
    build_report(store, tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert f"{by_device.p_value:.2g} on devices" in page and f"{by_request.p_value:.2g} on requests" in page
    assert f"({by_device.slowdown:+.0%} within profiles)" in page


def test_a_canary_without_a_single_service_time_is_never_promoted_whatever_min_samples_says():
    """min_samples=0 (a hand-edited plan in the history): before, an empty canary gave a NaN p and was promoted."""
    d = judge_live([LiveEvidence("c1", [])], [LiveEvidence("k1", times(300, 1.0))], min_samples=0)
    assert d.action == "hold" and "c1 answered fewer than 1 requests" in d.reason


def test_devices_are_compared_within_their_profile():
    """A canary wave whose profile mix differs from the controls': before, Jetson canaries on a candidate 50 %
    slower on every device were promoted (still faster than the controls, mostly rpi4s), and rpi4 canaries on
    a good candidate were rolled back (slower than the controls, mostly Jetsons)."""
    def on(profile, medians, prefix):
        return [replace(e, profile=profile) for e in fleet(medians, prefix=prefix)]

    few, many = np.exp(np.linspace(-0.1, 0.1, 10)), np.exp(np.linspace(-0.1, 0.1, 30))
    mostly_rpi4 = on("rpi4", 10 * many, "kr") + on("jetson", few, "kj")
    slow = judge_live(on("jetson", 1.5 * few, "cj"), mostly_rpi4)
    assert slow.action == "roll back" and slow.unit == "devices" and slow.slowdown == pytest.approx(0.5, abs=0.05)
    assert "within 2 profiles" in slow.reason and "profile's control median" in slow.test
    assert judge_live([replace(e, profile=None) for e in on("jetson", 1.5 * few, "cj")],
                      [replace(e, profile=None) for e in mostly_rpi4]).action == "promote"  # what pooling concluded
    mostly_jetson = on("rpi4", 10 * few, "kr") + on("jetson", many, "kj")
    good = judge_live(on("rpi4", 10 * few, "cr"), mostly_jetson)
    assert good.action == "promote" and abs(good.slowdown) < 0.05
    assert good.canary_p50_ms == pytest.approx(10, rel=0.15)  # the ms medians are still the raw ones
    nobody = judge_live(on("coral", few, "cc"), mostly_rpi4)
    assert nobody.action == "hold" and "no control device with live traffic on profile(s) coral" in nobody.reason


def test_a_canary_alone_in_its_profile_is_named_and_left_out_of_the_live_test():
    """Every device of a profile is a canary (nobody else of it gets the candidate): there is nothing to compare
    it with, so it is left out of the test and named, instead of holding the rest of the fleet forever."""
    few = np.exp(np.linspace(-0.1, 0.1, 10))
    controls = [replace(e, profile="jetson") for e in fleet(np.exp(np.linspace(-0.1, 0.1, 30)), prefix="k")]
    cans = [replace(e, profile="jetson") for e in fleet(few, prefix="c")] + [LiveEvidence("odd", times(300, 50.0),
                                                                                         profile="coral")]
    d = judge_live(cans, controls)
    assert d.action == "promote" and d.canary_devices == 10 and d.canary_samples == 3000
    assert d.reason.endswith("not judged live (no control device of their profile with live traffic): odd")
    slow = judge_live([replace(e, samples_ms=[2 * s for s in e.samples_ms]) for e in cans[:10]] + cans[10:], controls)
    assert slow.action == "roll back" and "odd" in slow.reason


def test_one_canary_slower_than_every_one_of_200_controls_with_tied_medians_is_rolled_back():
    """Control medians on a coarse timer (0.1 ms) tie: scipy's default then takes the normal approximation, whose
    smallest p for 1 canary against 200 controls is 0.042, and a canary 50 % slower than every control was
    promoted. The gate takes the exact distribution for few devices: p = 1/201."""
    from scipy.stats import mannwhitneyu

    medians = np.round(np.linspace(1.0, 2.0, 200), 1)
    controls = [LiveEvidence(f"k{i}", [float(m)] * 300) for i, m in enumerate(medians)]
    d = judge_live([LiveEvidence("c1", [3.0] * 300)], controls)
    assert mannwhitneyu([3.0], medians, alternative="greater").pvalue > 0.04  # what the default would give
    assert d.unit == "devices" and d.p_value == pytest.approx(1 / 201) and d.action == "roll back"


def test_controls_whose_median_is_zero_never_turn_a_slower_canary_into_a_promote():
    """A control answering 0 ms (a service time the wire checks pass) made every ratio to its profile's median
    infinite or NaN: p = nan, and NaN < alpha is false, so a canary at 5 ms was promoted. Now that profile has no
    scale: its canaries are left out of the test and named, and when they are all the canaries the gate holds."""
    one = judge_live([LiveEvidence("c1", [5.0] * 300)], [LiveEvidence("k1", [0.0] * 300)])
    many = judge_live([LiveEvidence("c1", [5.0] * 300)], [LiveEvidence(f"k{i}", [0.0] * 300) for i in range(120)])
    for d in (one, many):
        assert d.action == "hold" and "no control device with live traffic above 0 ms on profile(s)" in d.reason
    mixed = judge_live([LiveEvidence("c1", times(300, 2.0), profile="rpi4"), LiveEvidence("c2", [5.0] * 300, profile="coral")],
                       [LiveEvidence("k1", times(300, 1.0), profile="rpi4"), LiveEvidence("k2", [0.0] * 300, profile="coral")])
    assert mixed.action == "roll back" and np.isfinite(mixed.p_value) and np.isfinite(mixed.slowdown)
    assert mixed.reason.endswith("not judged live (their profile's control median is 0 ms: nothing to compare with): c2")
    assert mixed.control_p50_ms == pytest.approx(1.0, rel=0.1)  # k2's zeros are not the controls' median either
