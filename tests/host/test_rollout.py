"""The canary decision, on results alone (no devices)."""

from __future__ import annotations

from edge_kit.fleet.deploy import DeviceResult
from edge_kit.loop.rollout import judge_canaries


def result(name: str, status: str = "succeeded", activated: bool = True, rolled_back: bool = False) -> DeviceResult:
    return DeviceResult(name, status, activated=activated, rolled_back=rolled_back)  # type: ignore[arg-type]


def test_healthy_canaries_let_the_rollout_proceed():
    verdict = judge_canaries([result("a"), result("b")], {}, max_failed=0.0)
    assert verdict.proceed and verdict.failed == () and verdict.roll_back == ()


def test_a_canary_breaking_its_constraints_stops_it_and_only_switched_canaries_are_rolled_back():
    results = [result("a"), result("b", activated=False), result("c", status="failed", activated=True, rolled_back=True)]
    verdict = judge_canaries(results, {"a": "p90 <= 1 ms"}, max_failed=0.0)
    assert not verdict.proceed
    assert verdict.failed == ("a", "c")
    assert verdict.roll_back == ("a",)  # b never switched; c was already rolled back
    assert "2 of 3 canaries failed (more than 0%)" in verdict.reason


def test_the_failure_share_is_a_bound_not_a_trigger():
    results = [result(n) for n in "abcde"]
    assert judge_canaries(results, {"a": "x"}, max_failed=0.2).proceed  # 1 of 5 = 20 % is allowed
    assert not judge_canaries(results, {"a": "x", "b": "y"}, max_failed=0.2).proceed


def test_the_result_keeps_the_exception_and_says_so_in_json():
    r = result("a")
    r.fail(ValueError("boom"))
    assert r.status == "failed" and r.reason == "boom" and isinstance(r.error, ValueError)
    assert r.as_dict()["error"] == {"type": "ValueError", "message": "boom"}


def test_a_history_that_fails_to_record_the_gate_does_not_leave_a_rolled_back_candidate_running(monkeypatch, tmp_path):
    """The live gate says roll back and recording its decision fails (the database went away): the canaries
    are rolled back first, then the one-line HistoryError stops the command; the rest is never deployed."""
    import pytest

    from edge_kit.errors import HistoryError
    from edge_kit.fleet.deploy import DeployOptions, GroupResult
    from edge_kit.fleet.inventory import Device
    from edge_kit.loop import rollout as ro
    from edge_kit.selection.gate import GateDecision

    devices = [Device(name=n, host="127.0.0.1", user="edgekit", profile="rpi4") for n in ("c1", "r1", "r2")]
    deployed, rolled = [], []

    def fake_deploy(_fleet, targets, _opts, _progress=None):
        deployed.extend(d.name for d in targets)
        return GroupResult([DeviceResult(d.name, "succeeded", activated=True, variant="int8") for d in targets])

    monkeypatch.setattr(ro, "deploy", fake_deploy)
    monkeypatch.setattr(ro, "read_manifest", lambda _a: None)
    monkeypatch.setattr(ro, "check_built_for", lambda *_a: None)  # no artifacts folder: deploy is faked too
    monkeypatch.setattr(ro, "broken_constraints", lambda *_a: None)
    monkeypatch.setattr(ro, "collect_live", lambda *_a: ([], []))
    monkeypatch.setattr(ro, "judge_live", lambda *_a, **_k: GateDecision("roll back", "canaries slower"))
    monkeypatch.setattr(ro, "roll_back", lambda _f, devs, *_a: rolled.extend(d.name for d in devs))

    def failing_record(_decision):
        raise HistoryError("the history database postgresql://edgekit@db/edgekit failed (gone)")

    with pytest.raises(HistoryError):
        ro.rollout(None, devices, DeployOptions(tmp_path), canary=0.3, gate=ro.LiveGate(), record=failing_record)
    assert rolled == ["c1"] and deployed == ["c1"]


def test_live_figures_of_any_shape_are_evidence_only_where_they_are_numbers(monkeypatch):
    """A buggy (but signed) agent answers ``state`` with live figures of the wrong shape: text for the request
    count, text and bools among the samples, no ``live`` object at all. The gate counts only numbers."""
    from edge_kit.loop import rollout as ro

    answers = {"c1": {"requests": "many", "latency_samples_ms": [1.0, "fast", True, 2.0]},
               "c2": "live",
               "k1": {"requests": 3, "latency_samples_ms": [1.5, None, 2.5, 3.5], "shadow": {"fidelity": {"snr_db": "high"}}}}

    class Client:
        def __enter__(self):
            return self

        def __exit__(self, *_):
            return None

        def request(self, name, *_a, **_k):
            return {"result": {"live": answers[name]}}

    monkeypatch.setattr(ro.FleetClient, "of", staticmethod(lambda _fleet: Client()))
    monkeypatch.setattr(ro.time, "sleep", lambda _s: None)
    cans, ctrls = ro.collect_live(None, ["c1", "c2"], ["k1"], ro.LiveGate(window_s=0.0, min_samples=1), lambda *_: None)
    assert [e.samples_ms for e in cans] == [[], []] and ctrls[0].samples_ms == [] and ctrls[0].shadow_snr_db is None
    polls = {"c1": iter([{"requests": 2, "latency_samples_ms": [1.0, 2.0]},
                         {"requests": 6, "latency_samples_ms": [1.0, 2.0, "fast", True, 3.0, 4.0]}]),
             "k1": iter([{"requests": 0}, {"requests": 2, "latency_samples_ms": [5.0, 6.0]}])}
    monkeypatch.setattr(Client, "request", lambda self, name, *_a, **_k: {"result": {"live": next(polls[name])}})
    cans, ctrls = ro.collect_live(None, ["c1"], ["k1"], ro.LiveGate(window_s=60.0, min_samples=2), lambda *_: None)
    assert cans[0].samples_ms == [3.0, 4.0] and ctrls[0].samples_ms == [5.0, 6.0]  # of 4 answered since, 2 numbers
