"""The fleet model and measurement planner (edge_kit.selection.fleetmodel) on small simulated fleets."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_kit.selection.constraints import Measured
from edge_kit.selection.fleetmodel import (
    KIND,
    Measurements,
    Settings,
    _drift,
    decisions_of,
    fit,
    plan_measurements,
)
from edge_kit.selection.policy import Candidate, Request, choose_all
from edge_kit.sim.fleetsim import CONSTRAINTS, exhaustive, make_fleet, run_planner
from edge_kit.telemetry.report import FLEET_KIND


def _sample_all(fleet, devices) -> Measurements:
    """Return every candidate of ``devices`` measured once."""
    return fleet.bench([(d, v) for d in devices for v in np.flatnonzero(fleet.spec.candidates[d])])


def test_offsets_are_shrunk_toward_zero_and_tighten_with_measurements():
    fleet = make_fleet(400, noise=0.05, outliers=0.0, seed=3)
    spec = fleet.spec
    m = _sample_all(fleet, range(40))
    slow = 100  # one device, measured once on one variant, then on every variant
    v = int(np.flatnonzero(spec.candidates[slow])[0])
    fleet.true_log_p90[slow] += np.log(1.12)  # 12 % slower than its profile: within the normal spread
    once = m.concat(fleet.bench([(slow, v)]))
    f1 = fit(spec, once).fits["p90_ms"]
    raw = np.log(once.p90_ms[-1]) - f1.mu[spec.profile[slow], v]
    assert 0 < f1.offset[slow] < raw
    every = once.concat(_sample_all(fleet, [slow]))
    f2 = fit(spec, every).fits["p90_ms"]
    assert f2.offset_var[slow] < f1.offset_var[slow] < f1.tau2[spec.profile[slow]] + 1e-12
    truth = np.nanmean(fleet.true_log_p90[slow] - np.log(_truth_mu(fleet, slow)))
    assert abs(f2.offset[slow] - truth) < 0.06


def _truth_mu(fleet, d):
    from edge_kit.sim.fleetsim import TRUTH

    p = fleet.spec.profiles[fleet.spec.profile[d]]
    return np.array([TRUTH[p].get(v, (np.nan, np.nan, np.nan))[1] for v in fleet.spec.variants])


def test_planner_decides_like_exhaustive_measurement_for_a_fraction_of_the_runs():
    fleet = make_fleet(2000, noise=0.05, seed=4)
    ex = exhaustive(fleet)
    out = run_planner(fleet, 0.08 * ex.runs)
    assert out.runs <= 0.08 * ex.runs
    assert (out.chosen == ex.chosen).mean() >= 0.97
    assert out.health <= 1.3 * len(fleet.spec.devices)  # one health benchmark per switched device, and a few again
    flagged, outlier = out.flagged, fleet.outlier
    assert (flagged & outlier).sum() >= 0.9 * outlier.sum()
    assert (flagged & ~outlier).sum() <= 0.01 * (~outlier).sum()


def test_a_throttled_device_is_flagged_with_the_covariate_that_explains_it_and_measured_individually():
    fleet = make_fleet(400, noise=0.05, outliers=0.0, seed=5)
    spec = fleet.spec
    hot = 7
    fleet.true_log_p90[hot] += np.log(1.9)
    fleet.throttled[hot], fleet.temperature[hot] = 1, 85.0
    m = _sample_all(fleet, range(40))
    v = int(np.flatnonzero(spec.candidates[hot])[0])
    m = m.concat(fleet.bench([(hot, v)]))
    plan = plan_measurements(spec, m, budget=100)
    assert plan.model.flagged[hot] and plan.model.flagged.sum() == 1
    why = plan.model.flag_why[hot]
    assert "p90 x1." in why and "explained by throttled" in why and "temperature 85 C" in why
    assert any(d == hot and w == "flagged" for d, v2, w in plan.measure) or plan.confidence[hot] >= 0.95
    # it stays flagged (measured individually) while the spec says so, even after normal measurements
    again = plan_measurements(replace(spec, flagged=plan.model.flagged), m, budget=0)
    assert again.model.flagged[hot]
    decision = decisions_of(plan, {v: v for v in spec.variants}, [hot])[0]
    assert decision.kind == KIND == FLEET_KIND and decision.flagged == why


def test_an_unexplained_deviation_says_no_covariate_explains_it_and_a_device_without_conditions_is_named():
    fleet = make_fleet(400, noise=0.05, outliers=0.0, no_conditions=0.5, seed=6)
    spec = fleet.spec
    m = _sample_all(fleet, range(40))
    odd = next(d for d in range(60, 400) if fleet.no_conditions[d])
    fleet.true_log_p90[odd] += np.log(2.0)
    m = m.concat(fleet.bench([(odd, int(np.flatnonzero(spec.candidates[odd])[0]))]))
    plan = plan_measurements(spec, m, budget=0)
    assert plan.model.flagged[odd]
    assert "reports no conditions" in plan.model.flag_why[odd]
    assert any("report no conditions" in text and "inferred without covariates" in text for text in plan.messages)


def test_a_profile_with_no_measurements_and_a_budget_too_small_are_said_not_guessed():
    fleet = make_fleet(80, noise=0.05, outliers=0.0, seed=7)
    spec = fleet.spec
    plan = plan_measurements(spec, Measurements.empty(), budget=3)
    assert (plan.chosen == -1).all() and len(plan.undecided) == len(spec.devices)
    assert any("less than the" in t and "one device on every candidate" in t for t in plan.messages)
    assert any("no measurements yet" in t and "cannot be decided" in t for t in plan.messages)
    assert plan.cost <= 3
    # enough for every profile: each gets its sample and its devices wait for it, saying so
    plan = plan_measurements(spec, Measurements.empty(), budget=1000, settings=Settings(sample_per_profile=2))
    sampled = {spec.profile[d] for d, _v, w in plan.measure if w == "sample"}
    assert sampled == set(range(len(spec.profiles)))
    assert "no measurements yet" in plan.reason(0)


def test_contradictory_measurements_are_measured_again_then_flag_the_device():
    fleet = make_fleet(200, noise=0.05, outliers=0.0, seed=8)
    spec = fleet.spec
    m = _sample_all(fleet, range(40))
    d, v = 100, int(np.flatnonzero(spec.candidates[100])[0])
    two = m.concat(fleet.bench([(d, v)])).concat(fleet.bench([(d, v)]))
    two.p90_ms[-1] *= 3.0
    plan = plan_measurements(spec, two, budget=50)
    assert (d, v, "contradictory") in plan.measure
    assert any("disagree" in t and "measured again" in t for t in plan.messages)
    three = two.concat(fleet.bench([(d, v)]))
    three.p90_ms[-1] *= 0.3
    plan = plan_measurements(spec, three, budget=50)
    assert plan.model.flagged[d] and "still disagree" in plan.model.flag_why[d]


def _measured_on_old_software():
    """Return (fleet, its spec, every candidate of 80 devices measured on "litert 1.2", profile 0, six unmeasured
    devices of that profile, a variant they can run): the drift tests' starting point."""
    fleet = make_fleet(400, noise=0.05, outliers=0.0, seed=9)
    spec = fleet.spec
    fleet.software = "litert 1.2"
    old = _sample_all(fleet, range(80))
    p = 0
    devs = [d for d in range(80, 400) if spec.profile[d] == p][:6]
    return fleet, spec, old, p, devs, int(np.flatnonzero(spec.candidates[devs[0]])[2])


def test_a_runtime_update_that_shifts_a_profile_makes_its_pairs_stale_and_measured_again():
    fleet, spec, old, p, devs, v = _measured_on_old_software()
    fleet.true_log_p90[spec.profile == p, v] += np.log(1.4)  # the update slows this variant by 40 %
    fleet.software = "litert 1.3"
    new = fleet.bench([(d, v) for d in devs])
    m = _with_software(old, new, ("litert 1.2", "litert 1.3"))
    model = fit(spec, m)
    assert (p, v) in model.drift and "x1.4" in model.drift[(p, v)] and "litert 1.3" in model.drift[(p, v)]
    stale = model.stale
    assert stale[:len(old)][(old.variant == v) & (spec.profile[old.device] == p)].all() and not stale[len(old):].any()
    plan = plan_measurements(spec, m, budget=500)
    re = [d for d, vv, _w in plan.measure if vv == v and spec.profile[d] == p and d < 80]
    assert re  # sampled devices measure the shifted variant again
    assert "drift" in plan.reason(devs[0]) and "litert 1.3" in plan.reason(devs[0])
    # a new software with a single measurement is checked, not trusted or ignored
    m1 = _with_software(old, new, ("litert 1.2", "litert 1.3"), first=1)
    plan = plan_measurements(spec, m1, budget=500)
    assert any("drift check" == w for _d, _v, w in plan.measure)
    assert any("fewer than 2 devices" in t for t in plan.messages)


def test_decisions_mark_each_figure_measured_or_inferred_with_an_interval():
    fleet = make_fleet(200, noise=0.05, outliers=0.0, seed=10)
    spec = fleet.spec
    m = _sample_all(fleet, range(40))
    d = 150
    v = int(np.flatnonzero(spec.candidates[d])[0])
    m = m.concat(fleet.bench([(d, v)]))
    plan = plan_measurements(spec, m, budget=0)
    decision = decisions_of(plan, {x: f"sha-{x}" for x in spec.variants}, [d])[0]
    rows = {r["variant"]: r for r in decision.table}
    assert rows[spec.variants[v]]["source"] == "measured" and "p90_ms_interval" not in rows[spec.variants[v]]
    others = [r for name, r in rows.items() if name != spec.variants[v]]
    assert others and all(r["source"] == "inferred" for r in others)
    for r in others:
        lo, hi = r["p90_ms_interval"]
        assert lo < r["p90_ms"] < hi
    assert set(decision.inferred) == {r["variant"] for r in others}
    assert "inferred from profile" in decision.reason and f"confidence {decision.confidence:.2f}" in decision.reason
    assert decision.as_dict()["kind"] == "fleet selection"


def test_a_decisions_table_marks_chosen_and_current_with_json_booleans(tmp_path):
    """`tune --budget ... --json` printed "chosen": "False" and "current": "True" in each row (numpy booleans that
    json.dumps(default=str) spelled as strings), and the history kept them so: the string "False" is true."""
    import json

    from edge_kit.telemetry.store import Store

    fleet = make_fleet(60, noise=0.05, outliers=0.0, seed=12)
    plan = plan_measurements(fleet.spec, _sample_all(fleet, range(60)), budget=0)
    decision = decisions_of(plan, {x: f"sha-{x}" for x in fleet.spec.variants}, [5])[0]
    rows = json.loads(json.dumps(decision.as_dict(), default=str))["table"]
    assert all(type(r["chosen"]) is bool and type(r["current"]) is bool for r in rows)
    assert [r["variant"] for r in rows if r["chosen"]] == [decision.chosen]
    store = Store(tmp_path / "h.db")
    store.add_decision(decision.as_dict())
    kept = store.latest_decisions((decision.as_dict()["kind"],))[decision.device]
    assert [r["variant"] for r in kept["table"] if r["chosen"]] == [decision.chosen]


def test_with_every_candidate_measured_the_fleet_decision_is_the_policys():
    fleet = make_fleet(60, noise=0.05, outliers=0.0, seed=11)
    spec = fleet.spec
    m = _sample_all(fleet, range(60))
    plan = plan_measurements(spec, m, budget=0)
    assert (plan.confidence == 1).all() and not plan.measure
    requests = []
    for d in range(60):
        cands = [Candidate(spec.variants[v], spec.variants[v], 1_000_000, (Measured(
            spec.variants[v], float(m.p90_ms[i]), float(m.avg_w[i]), float(m.energy_mj[i]), "simulated",
            float(m.accuracy[i]), 1.0),)) for v in np.flatnonzero(spec.candidates[d])
            for i in np.flatnonzero((m.device == d) & (m.variant == v))]
        requests.append(Request(spec.devices[d], cands, CONSTRAINTS[spec.profiles[spec.profile[d]]],
                                float(spec.fp32_accuracy[d]), None))
    expected = [r.chosen for r in choose_all(requests)]
    assert [spec.variants[c] for c in plan.chosen] == expected


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget=st.floats(0, 400), seed=st.integers(0, 10_000), sampled=st.integers(0, 60),
       cost=st.sampled_from([1.0, 2.5]))
def test_a_plan_never_exceeds_its_budget_and_only_measures_candidates(budget, seed, sampled, cost):
    fleet = make_fleet(120, noise=0.05, seed=seed)
    spec = fleet.spec
    m = _sample_all(fleet, range(sampled)) if sampled else Measurements.empty()
    plan = plan_measurements(spec, m, budget=budget, cost=cost, settings=Settings(draws=16, seed=seed))
    assert plan.cost <= budget + 1e-9 and plan.cost == pytest.approx(cost * len(plan.measure))
    measured = plan.figures.measured
    for d, v, why in plan.measure:
        assert spec.candidates[d, v]
        if why in ("sample", "uncertain", "flagged"):
            assert not measured[d, v]
    assert len({(d, v) for d, v, _w in plan.measure}) == len(plan.measure)
    ok = plan.chosen >= 0
    assert spec.candidates[np.flatnonzero(ok), plan.chosen[ok]].all()
    assert all(plan.chosen[d] == -1 for d in plan.undecided)
    assert ((plan.confidence >= 0) & (plan.confidence <= 1)).all()


def test_bad_arguments_raise():
    fleet = make_fleet(20, seed=1)
    with pytest.raises(ValueError, match="budget"):
        plan_measurements(fleet.spec, Measurements.empty(), budget=-1)
    bad = Measurements.of([{"device": 99, "variant": 0, "p90_ms": 1.0}])
    with pytest.raises(ValueError, match="not in the fleet"):
        fit(fleet.spec, bad)
    with pytest.raises(ValueError, match="shape"):
        replace(fleet.spec, current=np.zeros(3, dtype=np.intp))


def test_bench_records_become_rows_with_conditions_and_software():
    from edge_kit.selection.fleetmodel import rows_from_records

    record = {"device": "a", "sha256": "s1", "variant": "int8", "latency_ms": {"p90": 12.5},
              "power": {"avg_w": 3.0, "energy_per_inference_mj": 30.0}, "accuracy": {"value": 0.98},
              "fidelity": {"snr_db": 31.0}, "runtime": "litert", "runtime_version": "1.3",
              "conditions": {"start": {"temperature_c": 71.0, "throttling": {"throttled": True}, "power_mode": {"name": "7W", "id": 1},
                                       "cpu_freq_mhz": 1200.0}}}
    bare = {"device": "a", "sha256": "s1", "variant": "int8", "latency_ms": {"p90": 13.0}, "power": {}}
    other = {**record, "device": "nobody"}
    rows = rows_from_records([record, bare, other], {"a": 0}, {(0, "s1"): 2})
    assert len(rows) == 2
    r, b = rows
    assert (r["device"], r["variant"], r["p90_ms"], r["energy_mj"], r["avg_w"]) == (0, 2, 12.5, 30.0, 3.0)
    assert (r["throttled"], r["temperature_c"], r["power_mode"], r["software"]) == (1.0, 71.0, "7W", "litert 1.3")
    assert r["clock_mhz"] == 1200.0
    assert b["throttled"] is None and b["temperature_c"] is None and b["software"] is None and b["clock_mhz"] is None
    m = Measurements.of(rows)
    assert m.power_modes == ("7W",) and m.softwares == ("litert 1.3",) and list(m.software) == [0, -1]
    assert np.isnan(m.throttled[1]) and m.power_mode[1] == -1 and m.clock[0] == 1200.0 and np.isnan(m.clock[1])


def test_explain_marks_inferred_figures_with_their_interval():
    from rich.console import Console

    from edge_kit.cli.loop import decision_table

    fleet = make_fleet(200, noise=0.05, outliers=0.0, seed=12)
    spec = fleet.spec
    m = _sample_all(fleet, range(40))
    d = 150
    m = m.concat(fleet.bench([(d, int(np.flatnonzero(spec.candidates[d])[0]))]))
    plan = plan_measurements(spec, m, budget=0)
    decision = decisions_of(plan, {x: x for x in spec.variants}, [d])[0]
    console = Console(width=250, record=True)
    for item in decision_table({decision.device: decision}, explain=True):
        console.print(item)
    text = console.export_text()
    assert "source" in text and "measured" in text and "inferred" in text and "confidence" in text
    assert "~" in text and "[" in text  # an inferred figure with its 90 % interval


def test_device_seconds_cost_each_pair_its_median_benchmark_duration():
    from pathlib import Path

    from edge_kit.loop.tune import TuneOptions, _cost

    fleet = make_fleet(8, seed=2)
    spec = fleet.spec
    v = spec.variants.index("int8")
    records = [{"device": spec.devices[0], "variant": "int8", "duration_s": t} for t in (3.0, 5.0, 40.0)]
    opts = TuneOptions(Path("."), budget=100, budget_unit="seconds", bench={"min_seconds": 2.0})
    cost = _cost(spec, records, opts)
    assert cost[spec.profile[0], v] == 5.0 and cost[spec.profile[1], v] == 2.0
    assert _cost(spec, records, TuneOptions(Path("."), budget=100)) == 1.0
    # a buggy device's durations (text, a bool, negative, absurd) are not durations: left out, not fatal
    odd = records + [{"device": spec.devices[0], "variant": "int8", "duration_s": t} for t in ("slow", True, -1.0, 1e300)]
    assert _cost(spec, odd, opts)[spec.profile[0], v] == 5.0
    plan = plan_measurements(spec, Measurements.empty(), budget=13, cost=cost)
    assert plan.cost <= 13 and plan.budget_left == pytest.approx(13 - plan.cost)


def test_the_report_and_fleet_status_list_flagged_devices_and_what_was_inferred(tmp_path, run_cli):
    from edge_kit.telemetry.report import build_report, flagged_devices
    from edge_kit.telemetry.store import Store

    fleet = make_fleet(200, noise=0.05, outliers=0.0, seed=13)
    spec = fleet.spec
    hot = 150
    fleet.true_log_p90[hot] += np.log(2.0)
    fleet.throttled[hot] = 1
    m = _sample_all(fleet, range(40)).concat(fleet.bench([(hot, int(np.flatnonzero(spec.candidates[hot])[0]))]))
    plan = plan_measurements(spec, m, budget=0)
    store = Store(tmp_path / "edgekit-history.db")
    for d in decisions_of(plan, {x: x for x in spec.variants}, [0, hot]):
        store.add_decision(d.as_dict())
    flagged = flagged_devices(store.latest_decisions(("fleet selection",)))
    assert list(flagged) == [spec.devices[hot]] and "explained by throttled" in flagged[spec.devices[hot]]
    info = build_report(store, tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert info["flagged"] == flagged
    assert "Fleet selection: measured and inferred figures" in page and "explained by throttled" in page
    assert "90 %" in page  # an inferred p90 with its interval
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: f\ndevices:\n  - {name: a, host: 127.0.0.1, user: pi, profile: rpi4}\n")
    code, out, err = run_cli("fleet", "status", "--fleet", fleet_file, "--json")
    assert code == 0, err
    assert json.loads(out)["flagged"] == flagged


def test_a_device_on_a_lower_clock_is_flagged_with_the_clock_as_its_explanation():
    fleet = make_fleet(400, noise=0.05, outliers=0.0, seed=14)
    spec = fleet.spec
    slow = 9
    fleet.true_log_p90[slow] += np.log(1.7)
    m = _sample_all(fleet, range(40)).concat(fleet.bench([(slow, int(np.flatnonzero(spec.candidates[slow])[0]))]))
    clock = np.full(len(m), 1500.0)
    clock[-1] = 900.0
    plan = plan_measurements(spec, replace(m, clock_mhz=clock), budget=0)
    assert plan.model.flagged[slow] and "clock 900 MHz (profile median 1500 MHz)" in plan.model.flag_why[slow]
    assert plan.model.x_device[slow, 3] == pytest.approx(np.log(900 / 1500))


def test_conditions_a_buggy_device_reports_are_left_out_not_fitted():
    """Conditions are the device's word and no schema checks them: text, lists, booleans, absurd but finite
    figures and a power mode given as a bare number are taken as not reported, so one device cannot stop
    ``select`` or ``tune --budget`` for the fleet (a bare number once made ``np.bincount`` allocate that many)."""
    from edge_kit.selection.fleetmodel import rows_from_records

    fleet = make_fleet(60, noise=0.05, outliers=0.0, seed=5)
    spec = fleet.spec
    good = _sample_all(fleet, range(len(spec.devices)))
    names = {f"d{i}": i for i in range(len(spec.devices))}
    records = []
    for i, (d, v, p90) in enumerate(zip(good.device, good.variant, good.p90_ms)):
        odd = [{"temperature_c": "hot", "cpu_freq_mhz": [1200], "power_mode": 10 ** 12},
               {"temperature_c": 1e300, "cpu_freq_mhz": -5.0, "power_mode": {"name": ["15W"]}, "throttling": "yes"},
               {"temperature_c": True, "cpu_freq_mhz": 1e300, "power_mode": {"name": "15W"}}][i % 3]
        records.append({"device": f"d{d}", "sha256": f"s{v}", "latency_ms": {"p90": float(p90)}, "power": {},
                        "conditions": {"start": odd}})
    rows = rows_from_records(records, names, {(d, f"s{v}"): v for d in range(len(spec.devices))
                                              for v in range(len(spec.variants))})
    assert len(rows) == len(records)
    assert {r["temperature_c"] for r in rows} == {None} and {r["clock_mhz"] for r in rows} == {None}
    assert {r["power_mode"] for r in rows} == {None, "15W"}
    m = Measurements.of(rows)
    assert m.power_modes == ("15W",)
    plan = plan_measurements(spec, m, budget=0)
    assert len(decisions_of(plan, {x: x for x in spec.variants})) == len(spec.devices)


def test_a_measured_row_says_how_its_power_was_obtained_never_just_measured():
    """On the device, the energy of a measured row comes from a sensor, from the profile's idle/busy estimate, or
    from nothing: the fleet decision's table says which, as the per-device policy's does; inferred rows say
    inferred."""
    fleet = make_fleet(60, noise=0.05, outliers=0.0, seed=4)
    spec = fleet.spec
    d = 0
    cands = [int(v) for v in np.flatnonzero(spec.candidates[d])]
    m = _sample_all(fleet, range(1, 40)).concat(fleet.bench([(d, cands[0]), (d, cands[1])]))
    plan = plan_measurements(spec, m, budget=0)
    estimated = {"estimated": True, "method": "estimated: idle_w + (busy_w - idle_w) x CPU use"}
    records = [{"device": spec.devices[d], "sha256": spec.variants[cands[0]], "power": {"sensor": "ina219", "measured": True}},
               {"device": spec.devices[d], "sha256": spec.variants[cands[1]], "power": {"sensor": "ina219", "measured": True}},
               {"device": spec.devices[d], "sha256": spec.variants[cands[1]], "power": estimated}]  # the newest counts
    decision = decisions_of(plan, {x: x for x in spec.variants}, [d], records=records)[0]
    sources = {r["variant"]: (r["source"], r["power_source"]) for r in decision.table}
    assert sources[spec.variants[cands[0]]] == ("measured", "ina219")
    assert sources[spec.variants[cands[1]]] == ("measured", "estimated")
    assert {s for v, s in sources.items() if v not in (spec.variants[cands[0]], spec.variants[cands[1]])} == {("inferred", "inferred")}
    assert "measured" not in {r["power_source"] for r in decisions_of(plan, {x: x for x in spec.variants}, [d])[0].table}


def test_tune_with_a_budget_decides_on_a_plan_that_includes_its_last_measurements(monkeypatch, tmp_path, tune_offline):
    """When every planning batch of a round measured something, the round's decision must be taken on a plan
    made after the last batch's measurements were stored, not on the plan that asked for them."""
    from types import SimpleNamespace

    from edge_kit.fleet.deploy import GroupResult
    from edge_kit.loop import tune as tn
    from edge_kit.telemetry.store import Store

    stored = []  # what the history holds, as the planner sees it
    plans = []

    def fake_inputs(*_a, **_k):
        return SimpleNamespace(devices=("d1",), variants=("int8",)), list(stored), {"int8": "s"}, []

    def fake_plan(_spec, seen, **_k):
        plan = SimpleNamespace(measure=[] if seen else [(0, 0, "unmeasured")], cost=1.0, messages=[], seen=list(seen),
                               model=SimpleNamespace(flagged=np.zeros(1, bool), flag_why={}))
        plans.append(plan)
        return plan

    def fake_measure(_client, _store, wanted, *_a):
        stored.append(wanted)
        return 1, {}, {}

    decided_on = []
    monkeypatch.setattr(tn, "fleet_inputs", fake_inputs)
    monkeypatch.setattr(tn, "plan_measurements", fake_plan)
    monkeypatch.setattr(tn, "_measure", fake_measure)
    monkeypatch.setattr(tn, "decisions_of", lambda plan, *_a, **_k: decided_on.append(plan) or [])

    store = Store(tmp_path / "h.db")
    opts = tn.TuneOptions(tmp_path, rounds=1, budget=10, plans_per_round=1)
    report = tn.TuneReport(GroupResult([]))
    tn._tune_budget(None, [SimpleNamespace(name="d1")], None, opts, store, report, {}, {}, lambda _m: None)
    assert stored and decided_on[0].seen == stored  # decided with the measurement taken in the round


def test_a_bound_no_device_of_the_profile_has_a_figure_for_is_not_judged_and_the_decision_says_so():
    """A power bound on a profile whose devices have no power sensor (and no estimate): before, the fleet
    path called the choice feasible and said nothing; now it names the bounds it could not judge, as the
    per-device policy does (in ``unjudged``, the reason and each table row)."""
    from edge_kit.profiles import Constraints

    fleet = make_fleet(80, noise=0.05, outliers=0.0, profiles=("rpi4",), seed=21)
    spec = replace(fleet.spec, constraints=(Constraints(max_latency_p90_ms=50.0, max_power_w=5.0,
                                                        min_fidelity_snr_db=20.0),))
    m = _sample_all(fleet, range(20))
    m = replace(m, avg_w=np.full(len(m), np.nan), energy_mj=np.full(len(m), np.nan), snr_db=np.full(len(m), np.nan))
    plan = plan_measurements(spec, m, budget=0)
    measured, inferred = decisions_of(plan, {x: x for x in spec.variants}, [0, 70])
    for d in (measured, inferred):
        assert d.chosen is not None and d.unjudged == ["power <= 5 W", "fidelity SNR >= 20 dB"], d
        assert "not judged (no figure for it): power <= 5 W, fidelity SNR >= 20 dB" in d.reason
        assert all(r["unjudged"] == ["power <= 5 W", "fidelity SNR >= 20 dB"] for r in d.table)
    assert "inferred" in inferred.reason or inferred.inferred  # the figures it was judged on say where they came from
    judged = decisions_of(plan_measurements(replace(spec, constraints=(Constraints(max_latency_p90_ms=50.0),)), m,
                                            budget=0), {x: x for x in spec.variants}, [0])[0]
    assert judged.unjudged == [] and "not judged" not in judged.reason
    # an ONNX model without LiteRT variants: the accuracy bound is a share of onnx-fp32's (it said 'x fp32')
    onnx = replace(spec, constraints=(Constraints(max_latency_p90_ms=50.0, min_accuracy_ratio=0.9),),
                   fp32_accuracy=np.full(len(spec.devices), np.nan), reference_id="onnx-fp32")
    d = decisions_of(plan_measurements(onnx, m, budget=0), {x: x for x in spec.variants}, [0])[0]
    assert d.unjudged == ["accuracy >= 0.9 x onnx-fp32"], d


def test_the_report_names_the_bounds_a_feasible_choice_was_not_judged_on(tmp_path):
    from edge_kit.telemetry.report import build_report
    from edge_kit.telemetry.store import Store

    store = Store(tmp_path / "edgekit-history.db")
    store.add_decision({"device": "d1", "kind": KIND, "chosen": "int8", "current": None, "feasible": True, "switch": False,
                        "reason": "int8", "unjudged": ["power <= 5 W"]})
    store.add_decision({"device": "d2", "kind": KIND, "chosen": "fp32", "current": None, "feasible": True, "switch": False,
                        "reason": "fp32", "unjudged": []})
    build_report(store, tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert "int8 (feasible; not judged: power &lt;= 5 W)" in page and "fp32 (feasible)" in page


def test_an_inferred_energy_says_whether_it_was_pooled_from_sensors_or_estimates():
    """Every device of the profile estimates its power (no sensor): before, a device's inferred energy read just
    'inferred', as if pooled from sensor readings. Now it says what it was inferred from, in --json and --explain."""
    from rich.console import Console

    from edge_kit.cli.loop import decision_table

    fleet = make_fleet(60, noise=0.05, outliers=0.0, profiles=("rpi4",), seed=8)
    spec = fleet.spec
    m = _sample_all(fleet, range(20))
    plan = plan_measurements(spec, m, budget=0)
    cands = [spec.variants[int(v)] for v in np.flatnonzero(spec.candidates[0])]
    estimated = {"estimated": True, "method": "estimated: idle_w + (busy_w - idle_w) x CPU use"}
    records = [{"device": spec.devices[i], "sha256": v, "power": estimated} for i in range(20) for v in cands]
    records.append({"device": spec.devices[3], "sha256": cands[0], "power": {"sensor": "ina219", "measured": True}})
    records.append({"device": spec.devices[4], "sha256": cands[1], "power": {"avg_w": None}})  # nothing: not a source
    decision = decisions_of(plan, {x: x for x in spec.variants}, [50], records=records)[0]
    sources = {r["variant"]: (r["source"], r["power_source"]) for r in decision.table}
    assert sources[cands[0]] == ("inferred", "inferred from estimated, ina219")
    assert sources[cands[1]] == ("inferred", "inferred from estimated")
    console = Console(width=250, record=True)
    for item in decision_table({decision.device: decision}, explain=True):
        console.print(item)
    assert "inferred (power from estimated)" in console.export_text()


def test_the_fleet_decision_breaks_a_tie_by_the_profiles_targets_as_the_policy_does():
    from edge_kit.profiles import Constraints
    from edge_kit.selection.fleetmodel import FleetSpec

    variants = ("fp32", "onnx-fp32", "int8")
    spec = FleetSpec(("a", "b"), ("rpi4",), variants, np.zeros(2, dtype=np.intp), np.ones((2, 3), bool),
                     (Constraints(),), np.zeros(2, dtype=np.intp), np.ones((1, 3)), np.full(2, 0.9),
                     np.full(2, -1, dtype=np.intp))
    rows = [{"device": d, "variant": v, "p90_ms": 4.0 if v < 2 else 9.0, "energy_mj": 2.0, "avg_w": 3.0,
             "accuracy": 0.9, "order": float(d * 3 + v)} for d in range(2) for v in range(3)]
    m = Measurements.of(rows)
    assert [variants[c] for c in plan_measurements(spec, m, budget=0).chosen] == ["fp32", "fp32"]  # by id
    preferred = replace(spec, targets=(("onnxruntime", "litert"),))
    assert [variants[c] for c in plan_measurements(preferred, m, budget=0).chosen] == ["onnx-fp32", "onnx-fp32"]


def _with_software(old: Measurements, new: Measurements, names: tuple[str, ...], first: int | None = None) -> Measurements:
    """Return ``old`` then ``new`` (its ``first`` rows, default all) as one table, ``new``'s rows running the second
    of ``names``."""
    m = Measurements(*(np.concatenate([getattr(old, k), getattr(new, k)[:first]]) for k in (
        "device", "variant", "p90_ms", "energy_mj", "avg_w", "accuracy", "snr_db", "order", "throttled",
        "temperature_c", "power_mode", "software", "health")), old.power_modes, names)
    m.software[len(old):] = 1
    return m


def test_one_device_claiming_new_software_cannot_make_the_profiles_measurements_stale():
    """Drift was judged on measurements, not devices: one compromised device sending three records that say
    "litert 9.9" with a p90 ten times its profile's marked every other device's measurements of that variant
    stale (left out of the model and of their measured figures), so its own figures became the profile's.
    New software is judged once at least two devices ran it, each device's shift counted once (their median; two
    devices must agree on a shift for it to be drift); with one device it is a drift check (measured on others)."""
    fleet, spec, old, p, devs, v = _measured_on_old_software()
    liar = fleet.bench([(devs[0], v)] * 3)
    liar.p90_ms[:] *= 10
    model = fit(spec, _with_software(old, liar, ("litert 1.2", "litert 9.9")))
    assert (p, v) not in model.drift and not model.stale.any() and (p, v) in model.drift_check
    honest = fleet.bench([(devs[1], v)])  # a second device on the new software, its figures as before
    both = liar.concat(honest)
    model = fit(spec, _with_software(old, both, ("litert 1.2", "litert 9.9")))
    assert (p, v) not in model.drift and not model.stale.any()
    more = fleet.bench([(devs[2], v)])  # and a third: the median of the three devices' shifts is an honest one's
    three = both.concat(more)
    model = fit(spec, _with_software(old, three, ("litert 1.2", "litert 9.9")))
    assert (p, v) not in model.drift and not model.stale.any()


def test_one_device_sending_many_records_counts_once_in_its_profiles_figures():
    """A profile's figure was the median over its measurements: a compromised device publishing 60 benchmark
    records (every one is stored) of a variant at ten times the p90 and 0.1 accuracy, against three honest devices'
    one each, set the profile's p90 and accuracy, flagged the honest devices as the ones that differ, and gave
    every unmeasured device of the profile its figures. Each device now counts once (its own median)."""
    fleet = make_fleet(200, noise=0.05, outliers=0.0, seed=11)
    spec = fleet.spec
    p = 0
    devs = [d for d in range(len(spec.devices)) if spec.profile[d] == p][:4]
    v = int(np.flatnonzero(spec.candidates[devs[0]])[0])
    honest = fleet.bench([(d, v) for d in devs[1:]])
    liar = fleet.bench([(devs[0], v)] * 60)
    liar.p90_ms[:] *= 10
    liar.accuracy[:] = 0.1
    m = honest.concat(liar)
    model = fit(spec, m)
    mu = model.fits["p90_ms"].mu[p, v]
    assert abs(mu - np.median(np.log(honest.p90_ms))) < 0.1
    assert abs(model.fits["accuracy"].mu[p, v] - np.median(honest.accuracy)) < 1e-9
    assert model.flagged[devs[0]] and not model.flagged[devs[1:]].any()


def test_a_profile_of_one_device_still_detects_a_runtime_update_that_shifts_its_p90():
    """Drift needed 2 devices on the new software: a profile whose only device is the fleet's (one Jetson) got a
    drift check every planning call, never a verdict, and its older, faster measurements kept deciding. A profile
    whose only able device ran the new software twice is judged on it."""
    fleet = make_fleet(1, noise=0.05, outliers=0.0, seed=5)
    spec = fleet.spec
    v = int(np.flatnonzero(spec.candidates[0])[0])
    fleet.software = "litert 1.2"
    old = fleet.bench([(0, v)] * 4)
    fleet.true_log_p90[0, v] += np.log(1.6)  # the update slows this variant by 60 %
    fleet.software = "litert 1.3"
    once = _with_software(old, fleet.bench([(0, v)]), ("litert 1.2", "litert 1.3"))
    model = fit(spec, once)
    assert (0, v) in model.drift_check and (0, v) not in model.drift  # one record: checked, not concluded
    twice = _with_software(old, fleet.bench([(0, v)] * 2), ("litert 1.2", "litert 1.3"))
    model = fit(spec, twice)
    assert (0, v) in model.drift and "x1.6" in model.drift[(0, v)] and (0, v) not in model.drift_check
    assert model.stale[:len(old)].all() and not model.stale[len(old):].any()


@pytest.mark.parametrize("p90s", [(10.0, 20.0), (10.0, 13.0, 20.0)])
def test_an_inferred_interval_from_a_few_devices_that_differ_is_as_wide_as_they_are(p90s):
    """The spread of a profile's devices (tau) was its prior, 0.10, until 5 devices had measured: two Pis measured
    at 10 and 20 ms (one on a slower SD card) gave a third '~14.1 [11.3-17.7]' ms, a 90 % interval that neither
    measured device is in. With 2 to 4 devices it is the larger of the prior and their (robust) spread."""
    from edge_kit.profiles import Constraints
    from edge_kit.selection.fleetmodel import FleetSpec

    k = len(p90s)
    spec = FleetSpec(tuple(f"d{i}" for i in range(k + 1)), ("rpi4",), ("fp32",), np.zeros(k + 1, dtype=np.intp),
                     np.ones((k + 1, 1), bool), (Constraints(),), np.zeros(k + 1, dtype=np.intp), np.ones((1, 1)),
                     np.full(k + 1, 0.9), np.full(k + 1, -1, dtype=np.intp))
    m = Measurements.of([{"device": d, "variant": 0, "p90_ms": p90, "order": float(d)} for d, p90 in enumerate(p90s)])
    plan = plan_measurements(spec, m, budget=0)
    (row,) = plan.sources(k)
    lo, hi = row["p90_ms_interval"]
    assert row["source"] == "inferred" and lo < min(p90s) and max(p90s) < hi, row
    assert not plan.model.flagged.any()  # too few devices to say which one differs
    same = Measurements.of([{"device": d, "variant": 0, "p90_ms": 10.0 + 0.1 * d, "order": float(d)} for d in range(k)])
    assert fit(spec, same).fits["p90_ms"].tau2[0] == pytest.approx(0.10 ** 2)  # devices that agree: the prior, not less


def test_a_fleet_half_updated_keeps_each_devices_own_figures_on_the_software_it_runs():
    """Two of six Pis updated their runtime (p90 x1.6); the four others, still on the old one, were measured again
    after it. The "newest" software was the one measured last: the old one, so the drift read 'x0.64 since litert
    1.2', the updated devices' measurements on the new runtime became stale and they were decided on their 10 ms of
    before the update, while they run at 16 ms. The newest software is the one that appeared last; a device measured
    on older software since then still runs it: its measurements are its own."""
    from edge_kit.profiles import Constraints
    from edge_kit.selection.fleetmodel import FleetSpec

    spec = FleetSpec(tuple(f"d{i}" for i in range(6)), ("rpi4",), ("fp32",), np.zeros(6, dtype=np.intp),
                     np.ones((6, 1), bool), (Constraints(),), np.zeros(6, dtype=np.intp), np.ones((1, 1)),
                     np.full(6, 0.9), np.full(6, -1, dtype=np.intp))
    rows = [(d, 10.0 + 0.1 * d, "litert 1.2") for d in range(6)]  # all on litert 1.2
    rows += [(0, 16.0, "litert 1.3"), (0, 16.1, "litert 1.3"), (1, 16.2, "litert 1.3"), (1, 16.0, "litert 1.3")]
    model = fit(spec, Measurements.of([{"device": d, "variant": 0, "p90_ms": p90, "order": float(i), "software": s}
                                       for i, (d, p90, s) in enumerate(rows)]))
    assert "x1.57" in model.drift[(0, 0)] and "since litert 1.3" in model.drift[(0, 0)], model.drift
    rows += [(d, 10.0 + 0.1 * d, "litert 1.2") for d in range(2, 6)]  # the four not updated, measured again
    m = Measurements.of([{"device": d, "variant": 0, "p90_ms": p90, "order": float(i), "software": s}
                         for i, (d, p90, s) in enumerate(rows)])
    plan = plan_measurements(spec, m, budget=10)
    assert "x1.5" in plan.model.drift[(0, 0)] and "since litert 1.3" in plan.model.drift[(0, 0)], plan.model.drift
    assert plan.figures.measured.all() and not plan.measure, plan.measure  # nothing to measure again, ever
    p90 = plan.figures.values["p90_ms"][:, 0, 0]
    assert p90[:2] == pytest.approx([16.1, 16.0]) and p90[2:] == pytest.approx([10.2, 10.3, 10.4, 10.5])


def test_a_profile_figure_from_one_device_measured_often_is_as_uncertain_as_one_device():
    """The profile figure's variance was (sigma^2 + tau^2) / its measurements: one Pi measured 20 times narrowed the
    interval inferred for the others as if 20 Pis had been (90 % claimed, about 78 % held). How the devices of a profile
    differ is learned from devices, not from records: var mu is tau^2 / devices + sigma^2 / measurements."""
    from edge_kit.profiles import Constraints
    from edge_kit.selection.fleetmodel import FleetSpec

    spec = FleetSpec(("a", "b"), ("rpi4",), ("fp32",), np.zeros(2, dtype=np.intp), np.ones((2, 1), bool),
                     (Constraints(),), np.zeros(2, dtype=np.intp), np.ones((1, 1)), np.full(2, 0.9),
                     np.full(2, -1, dtype=np.intp))
    m = Measurements.of([{"device": 0, "variant": 0, "p90_ms": 10.0 * (1 + 0.001 * (i % 3)), "order": float(i)}
                         for i in range(20)])
    (row,) = plan_measurements(spec, m, budget=0).sources(1)
    lo, hi = row["p90_ms_interval"]
    s = Settings()
    # at least the spread of b's offset and that of the one device the profile's figure came from (its noise: ~0)
    assert np.log(hi / lo) / 2 >= 0.999 * 1.6448 * np.sqrt(2 * s.tau_prior ** 2), row


def test_drift_over_a_fleet_updated_by_half_takes_one_sort_per_pair_not_one_pass_per_device():
    """Each device's shift was the median of a mask of every row, one per device on the new software: 10,000
    devices, half of them updated, took 3.4 s of CPU for one fit (devices x rows). Now one sort per pair."""
    import time

    fleet = make_fleet(10_000, noise=0.05, outliers=0.0, seed=9)
    fleet.software = "litert 1.2"
    old = _sample_all(fleet, range(5000))
    fleet.true_log_p90[:, 0] += np.log(1.5)  # the update slows one variant by half on every profile
    fleet.software = "litert 1.3"
    m = _with_software(old, _sample_all(fleet, range(5000, 10_000)), ("litert 1.2", "litert 1.3"))
    started = time.process_time()
    stale, drift, _check = _drift(fleet.spec, m, Settings())
    assert time.process_time() - started < 1.0
    assert drift and all(" p90 x1.4" in why or " p90 x1.5" in why for why in drift.values()) and stale.any()
