"""The rollout's live gate: promote, hold or roll back from live service times and shadow fidelity."""

from __future__ import annotations

import numpy as np

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
