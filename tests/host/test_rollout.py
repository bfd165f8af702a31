"""The canary decision, on results alone (no devices)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from edge_kit.fleet.deploy import DeviceResult
from edge_kit.loop.rollout import judge_canaries


def result(name: str, status: str = "succeeded", activated: bool = True, rolled_back: bool = False) -> DeviceResult:
    return DeviceResult(name, status, activated=activated, rolled_back=rolled_back)  # type: ignore[arg-type]


def fake_fleet(monkeypatch, live) -> None:
    """Make the live gate's fleet client a fake: device ``name`` answers ``state`` with ``live(name)`` as its
    live figures (``live`` may raise, as a silent device does); the gate's pauses between polls take no time."""
    from edge_kit.loop import rollout as ro

    class Client:
        def __enter__(self):
            return self

        def __exit__(self, *_):
            return None

        def request(self, name, *_a, **_k):
            return {"result": {"live": live(name)}}

    monkeypatch.setattr(ro.FleetClient, "of", staticmethod(lambda _fleet: Client()))
    monkeypatch.setattr(ro.time, "sleep", lambda _s: None)


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

    def fake_deploy(_fleet, targets, _opts, _progress=None, _manifest=None):
        deployed.extend(d.name for d in targets)
        return GroupResult([DeviceResult(d.name, "succeeded", activated=True, variant="int8") for d in targets])

    monkeypatch.setattr(ro, "deploy", fake_deploy)
    monkeypatch.setattr(ro, "read_manifest", lambda *_a: None)
    monkeypatch.setattr(ro, "check_built_for", lambda *_a: None)  # no artifacts folder: deploy is faked too
    monkeypatch.setattr(ro, "broken_constraints", lambda *_a: None)
    monkeypatch.setattr(ro, "collect_live", lambda *_a: ([], []))
    monkeypatch.setattr(ro, "judge_live", lambda *_a, **_k: GateDecision("roll back", "canaries slower"))
    monkeypatch.setattr(ro, "roll_back", lambda _f, devs, *_a: rolled.extend(d.name for d in devs))

    def failing_record(_decision):
        raise HistoryError("the history database postgresql://edgekit@db/edgekit failed (gone)")

    with pytest.raises(HistoryError):
        ro.rollout(SimpleNamespace(artifact_trust=lambda: None), devices, DeployOptions(tmp_path), canary=0.3, gate=ro.LiveGate(), record=failing_record)
    assert rolled == ["c1"] and deployed == ["c1"]


def test_a_roll_back_cut_short_by_ctrl_c_still_records_the_gates_decision(monkeypatch, tmp_path):
    """Ctrl-C while the canaries were being rolled back left the decision unrecorded: the history (and the report)
    never said the candidate had been judged slower, though a canary already ran its previous model again."""
    import pytest

    from edge_kit.fleet.deploy import DeployOptions, GroupResult
    from edge_kit.fleet.inventory import Device
    from edge_kit.loop import rollout as ro
    from edge_kit.selection.gate import GateDecision

    devices = [Device(name=n, host="127.0.0.1", user="edgekit", profile="rpi4") for n in ("c1", "c2", "r1", "r2", "r3")]
    recorded = []
    monkeypatch.setattr(ro, "deploy", lambda _f, targets, *_a: GroupResult(
        [DeviceResult(d.name, "succeeded", activated=True, variant="int8") for d in targets]))
    monkeypatch.setattr(ro, "read_manifest", lambda *_a: None)
    monkeypatch.setattr(ro, "check_built_for", lambda *_a: None)
    monkeypatch.setattr(ro, "broken_constraints", lambda *_a: None)
    monkeypatch.setattr(ro, "collect_live", lambda *_a, **_k: ([], []))
    monkeypatch.setattr(ro, "judge_live", lambda *_a, **_k: GateDecision("roll back", "canaries slower"))

    def interrupted(*_a):
        raise KeyboardInterrupt

    monkeypatch.setattr(ro, "roll_back", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ro.rollout(SimpleNamespace(artifact_trust=lambda: None), devices, DeployOptions(tmp_path), canary=0.4,
                   gate=ro.LiveGate(), record=recorded.append)
    assert recorded and {e["gate"]["action"] for e in recorded} == {"roll back"}


def test_live_figures_of_any_shape_are_evidence_only_where_they_are_numbers(monkeypatch):
    """A buggy (but signed) agent answers ``state`` with live figures of the wrong shape: text for the request
    count, text and bools among the samples, no ``live`` object at all. The gate counts only numbers."""
    from edge_kit.loop import rollout as ro

    answers = {"c1": {"requests": "many", "latency_samples_ms": [1.0, "fast", True, 2.0]},
               "c2": "live",
               "k1": {"requests": 3, "latency_samples_ms": [1.5, None, 2.5, 3.5], "shadow": {"fidelity": {"snr_db": "high"}}}}

    fake_fleet(monkeypatch, lambda name: answers[name])
    cans, ctrls = ro.collect_live(None, ["c1", "c2"], ["k1"], ro.LiveGate(window_s=0.0, min_samples=1), lambda *_: None)
    assert [e.samples_ms for e in cans] == [[], []] and ctrls[0].samples_ms == [] and ctrls[0].shadow_snr_db is None
    polls = {"c1": iter([{"requests": 2, "latency_samples_ms": [1.0, 2.0]},
                         {"requests": 6, "latency_samples_ms": [1.0, 2.0, "fast", True, 3.0, 4.0]}]),
             "k1": iter([{"requests": 0}, {"requests": 2, "latency_samples_ms": [5.0, 6.0]}])}
    fake_fleet(monkeypatch, lambda name: next(polls[name]))
    cans, ctrls = ro.collect_live(None, ["c1"], ["k1"], ro.LiveGate(window_s=60.0, min_samples=2), lambda *_: None)
    assert cans[0].samples_ms == [3.0, 4.0] and ctrls[0].samples_ms == [5.0, 6.0]  # of 4 answered since, 2 numbers


def test_live_figures_too_large_for_a_float_are_no_evidence_and_no_crash(monkeypatch):
    """JSON allows integers of hundreds of digits (the message decoder takes up to 4,300): a signed agent
    answering with one as its request count, a sample or its shadow SNR is not evidence. The gate
    raised OverflowError (``math.isfinite`` on an int too large for a float) and stopped the rollout."""
    from edge_kit.loop import rollout as ro

    huge = 10 ** 400
    answers = {"c1": {"requests": 3, "latency_samples_ms": [1.0, huge, 2.0], "shadow": {"fidelity": {"snr_db": huge}}},
               "k1": {"requests": huge, "latency_samples_ms": [1.5, 2.5]}}

    fake_fleet(monkeypatch, lambda name: answers[name])
    cans, ctrls = ro.collect_live(None, ["c1"], ["k1"], ro.LiveGate(window_s=0.0, min_samples=1), lambda *_: None)
    assert cans[0].shadow_snr_db is None and ctrls[0].samples_ms == []  # no number: no count, nothing answered since
    answers["c1"] = {"requests": 6, "latency_samples_ms": [1.0, huge, 2.0, 3.0]}
    answers["k1"] = {"requests": 2, "latency_samples_ms": [5.0, 6.0]}
    polls = {"c1": iter([{"requests": 0}, answers["c1"]]), "k1": iter([{"requests": 0}, answers["k1"]])}
    fake_fleet(monkeypatch, lambda name: next(polls[name]))
    cans, ctrls = ro.collect_live(None, ["c1"], ["k1"], ro.LiveGate(window_s=60.0, min_samples=2), lambda *_: None)
    assert cans[0].samples_ms == [1.0, 2.0, 3.0] and ctrls[0].samples_ms == [5.0, 6.0]


def polled(monkeypatch, answers: dict[str, list]) -> None:
    """Make device ``name`` answer the gate's polls with ``answers[name]`` in turn, then its last one again."""
    def live(name):
        return answers[name].pop(0) if len(answers[name]) > 1 else answers[name][0]

    fake_fleet(monkeypatch, live)


def test_a_canary_whose_agent_restarts_keeps_what_it_gave_and_counts_its_requests_since(monkeypatch):
    """The gate counted a device's samples as those answered since its first poll, by the served model's request
    counter: an agent restarting mid-window starts that counter again, so the canary's samples were dropped and
    none counted until it had answered as many requests again as before (the gate held for want of traffic)."""
    from edge_kit.loop import rollout as ro

    a = {"sha256": "a" * 64, "variant": "int8"}
    polled(monkeypatch, {
        "c1": [{"requests": 100, "model": a, "since": 1.0},
               {"requests": 104, "model": a, "since": 1.0, "latency_samples_ms": [9.0] * 100 + [1.0, 2.0, 3.0, 4.0]},
               {"requests": 3, "model": a, "since": 50.0, "latency_samples_ms": [5.0, 6.0, 7.0]},  # restarted
               {"requests": 6, "model": a, "since": 50.0, "latency_samples_ms": [5.0, 6.0, 7.0, 8.0, 9.0, 10.0]}],
        "k1": [{"requests": 0}, {"requests": 20, "latency_samples_ms": [1.0] * 20}]})
    cans, ctrls = ro.collect_live(None, ["c1"], ["k1"], ro.LiveGate(window_s=0.5, min_samples=10), lambda *_: None,
                                  {"c1": "a" * 64})
    assert cans[0].samples_ms == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]


def test_only_a_canarys_figures_on_its_candidate_count_and_a_control_on_a_candidate_is_dropped(monkeypatch):
    """The gate took whatever model a device served: a canary whose agent went back to its previous model had
    that model's service times judged as the candidate's, and a control already serving the candidate (a device
    given it by an earlier deploy) compared the candidate with itself. Both made a slower candidate look fine."""
    from edge_kit.loop import rollout as ro

    cand, old = {"sha256": "a" * 64, "variant": "int8"}, {"sha256": "b" * 64, "variant": "fp32"}
    said = []
    polled(monkeypatch, {
        "c1": [{"requests": 0, "model": cand, "since": 1.0},
               {"requests": 5, "model": cand, "since": 1.0, "latency_samples_ms": [3.0] * 5},
               {"requests": 300, "model": old, "since": 9.0, "latency_samples_ms": [1.0] * 300}],  # swapped back
        "k1": [{"requests": 0, "model": cand, "since": 1.0}],
        "k2": [{"requests": 0, "model": old, "since": 1.0},
               {"requests": 300, "model": old, "since": 1.0, "latency_samples_ms": [1.0] * 300}]})
    cans, ctrls = ro.collect_live(None, ["c1"], ["k1", "k2"], ro.LiveGate(window_s=0.5, min_samples=10),
                                  lambda d, m: said.append((d, m)), {"c1": "a" * 64})
    assert cans[0].samples_ms == [3.0] * 5 and [e.device for e in ctrls] == ["k2"]
    assert ("k1", f"serves a candidate ({'a' * 12}); dropped from the controls") in said
    assert ("c1", f"serves {'b' * 12}, not its candidate: its figures are not counted") in said


def test_a_gate_whose_every_control_serves_the_candidate_already_holds_saying_so(monkeypatch):
    """A rollout of the model the fleet runs already (or a profile updated by an earlier deploy): every control was
    dropped for serving the candidate, and the hold read 'not enough live traffic to judge: the controls answered
    fewer than 10 requests', sending the user to a longer window that could never help. Now it says why."""
    from edge_kit.loop import rollout as ro
    from edge_kit.loop.waves import live_judge

    cand = {"sha256": "a" * 64, "variant": "int8"}
    busy = [{"requests": 0, "model": cand, "since": 1.0},
            {"requests": 300, "model": cand, "since": 1.0, "latency_samples_ms": [1.0] * 300}]
    polled(monkeypatch, {"c1": list(busy), "k1": list(busy), "k2": list(busy)})
    judge = live_judge(None, ro.LiveGate(window_s=0.5, min_samples=10), candidates={n: "a" * 64 for n in ("c1", "k1", "k2")})
    decision = judge(["c1"], ["k1", "k2"])
    assert decision.action == "hold" and decision.reason == ("every control device that answered serves the candidate "
                                                             "already (k1, k2): none runs the current model to compare it with")


def test_a_silent_device_does_not_stop_the_gate(monkeypatch):
    """One control among many is offline (its `state` request times out): before, the AgentTimeout ended the
    gate (and the command) with the canaries on the candidate. Now that control is dropped and named; a
    silent canary is asked again and, short of samples, makes the gate hold."""
    from edge_kit.errors import AgentTimeout
    from edge_kit.loop import rollout as ro
    from edge_kit.selection.gate import judge_live

    asked: dict[str, int] = {}

    def live(name):
        asked[name] = asked.get(name, 0) + 1
        if name in ("k2", "c2"):
            raise AgentTimeout(f"{name}: no answer to 'state' within 30 s")
        n = 4 * (asked[name] - 1)
        return {"requests": n, "latency_samples_ms": [1.0 + 0.01 * i for i in range(n)]}

    fake_fleet(monkeypatch, live)
    said = []
    cans, ctrls = ro.collect_live(None, ["c1"], ["k1", "k2", "k3"], ro.LiveGate(window_s=60.0, min_samples=8),
                                  lambda who, msg: said.append((who, msg)))
    assert [e.device for e in ctrls] == ["k1", "k3"] and asked["k2"] == 1  # dropped after its one silence
    assert len(cans[0].samples_ms) >= 8 and ("k2", "no live figures (k2: no answer to 'state' within 30 s); "
                                                   "dropped from the controls") in said
    cans, ctrls = ro.collect_live(None, ["c1", "c2"], ["k1"], ro.LiveGate(window_s=0.0, min_samples=8),
                                  lambda *_: None)
    assert cans[1].samples_ms == [] and judge_live(cans, ctrls, min_samples=8).action == "hold"


def test_an_interrupted_gate_puts_the_canaries_back(monkeypatch, tmp_path):
    """Ctrl-C (or the broker going away) while the gate collects: before, the command ended with the canaries
    on the candidate nobody judged. Now the switched canaries are rolled back, then the interruption goes on."""
    import pytest

    from edge_kit.fleet.deploy import DeployOptions, GroupResult
    from edge_kit.fleet.inventory import Device
    from edge_kit.loop import rollout as ro

    devices = [Device(name=n, host="127.0.0.1", user="edgekit", profile="rpi4") for n in ("c1", "r1", "r2")]
    deployed, rolled, why = [], [], []

    def fake_deploy(_fleet, targets, _opts, _progress=None, _manifest=None):
        deployed.extend(d.name for d in targets)
        return GroupResult([DeviceResult(d.name, "succeeded", activated=True, variant="int8") for d in targets])

    def interrupted(*_a):
        raise KeyboardInterrupt

    monkeypatch.setattr(ro, "deploy", fake_deploy)
    monkeypatch.setattr(ro, "read_manifest", lambda *_a: None)
    monkeypatch.setattr(ro, "check_built_for", lambda *_a: None)  # no artifacts folder: deploy is faked too
    monkeypatch.setattr(ro, "broken_constraints", lambda *_a: None)
    monkeypatch.setattr(ro, "collect_live", interrupted)
    monkeypatch.setattr(ro, "roll_back", lambda _f, devs, _o, _r, w: (rolled.extend(d.name for d in devs), why.append(w)))
    with pytest.raises(KeyboardInterrupt):
        ro.rollout(SimpleNamespace(artifact_trust=lambda: None), devices, DeployOptions(tmp_path), canary=0.3, gate=ro.LiveGate(), record=lambda _d: None)
    assert rolled == ["c1"] and deployed == ["c1"] and "the live gate was interrupted (KeyboardInterrupt)" in why[0]


def fake_shells(monkeypatch, unreachable=()) -> list[tuple[str, str]]:
    """Make deploy's SSH shell a fake: each device answers its agent commands, listed as (device, command) in the
    list returned, except the ``unreachable`` ones, whose connection fails (AgentError)."""
    from edge_kit.errors import AgentError
    from edge_kit.fleet import deploy as dep

    ran: list[tuple[str, str]] = []

    class Shell:
        def __init__(self, dev, *_a, **_k):
            self.dev = dev

        def __enter__(self):
            if self.dev.name in unreachable:
                raise AgentError(f"{self.dev.name}: ssh: connection refused")
            return self

        def __exit__(self, *_):
            return None

        def agent(self, command):
            ran.append((self.dev.name, command))

    monkeypatch.setattr(dep, "DeviceShell", Shell)
    return ran


def test_a_gate_roll_back_on_a_rerun_after_a_hold_rolls_back_canaries_already_on_the_candidate(monkeypatch, tmp_path):
    """The gate held; the same deploy run again found the canary on the candidate already (skipped: nothing
    switched) and the gate now said roll back: only canaries this run had switched were rolled back, so the
    canary stayed on the rejected candidate, shown 'skipped', while the command said the rollout was stopped.
    Now every canary judged on the candidate goes back, and its row says so."""
    from edge_kit.fleet.deploy import DeployOptions, GroupResult
    from edge_kit.fleet.inventory import Device
    from edge_kit.loop import rollout as ro
    from edge_kit.selection.gate import GateDecision

    devices = [Device(name=n, host="127.0.0.1", user="edgekit", profile="rpi4") for n in ("c1", "r1", "r2")]

    def fake_deploy(_fleet, targets, _opts, _progress=None, _manifest=None):
        return GroupResult([DeviceResult(d.name, "skipped", variant="int8", reason="already current") for d in targets])

    ran = fake_shells(monkeypatch)
    monkeypatch.setattr(ro, "deploy", fake_deploy)
    monkeypatch.setattr(ro, "read_manifest", lambda *_a: None)
    monkeypatch.setattr(ro, "check_built_for", lambda *_a: None)
    monkeypatch.setattr(ro, "broken_constraints", lambda *_a: None)
    monkeypatch.setattr(ro, "collect_live", lambda *_a: ([], []))
    monkeypatch.setattr(ro, "judge_live", lambda *_a, **_k: GateDecision("roll back", "canaries slower"))
    group = ro.rollout(SimpleNamespace(artifact_trust=lambda: None, known_hosts=None), devices, DeployOptions(tmp_path),
                       canary=0.3, gate=ro.LiveGate(), record=lambda _d: None)
    assert ran == [("c1", "rollback")] and group.stopped.startswith("live gate: roll back: canaries slower")
    c1 = group.results[0]
    assert c1.status == "failed" and c1.reason == "rolled back by the live gate: canaries slower" and c1.rolled_back


def test_a_canary_whose_rollback_fails_is_failed_not_succeeded(monkeypatch, tmp_path):
    """A rollback that failed left the canary 'succeeded' (its reason alone said 'rollback failed'): the table
    showed the device that still runs the rejected candidate as one that went well."""
    from edge_kit.fleet import deploy as dep
    from edge_kit.fleet.inventory import Device

    ran = fake_shells(monkeypatch, unreachable={"c1"})
    results = [DeviceResult(n, "succeeded", activated=True, variant="int8") for n in ("c1", "c2")]
    dep.roll_back(SimpleNamespace(known_hosts=None), [Device(name=n, host="h", user="u", profile="rpi4") for n in ("c1", "c2")],
                  dep.DeployOptions(tmp_path), results, "rolled back by the live gate: canaries slower")
    assert ran == [("c2", "rollback")] and [r.status for r in results] == ["failed", "failed"]
    assert not results[0].rolled_back and results[1].rolled_back
    assert results[0].reason == ("rolled back by the live gate: canaries slower; rollback failed: c1: ssh: "
                                 "connection refused")


def test_the_gate_polls_a_stable_spread_sample_of_a_large_fleet_as_controls():
    from edge_kit.loop.rollout import MAX_CONTROLS, pick_controls

    names = [f"dev-{i:05d}" for i in range(5000)]
    picked = pick_controls(names)
    assert len(picked) == MAX_CONTROLS and len(set(picked)) == MAX_CONTROLS and set(picked) <= set(names)
    assert picked == pick_controls(list(reversed(names)))  # the same sample whatever the order
    assert max(int(n[4:]) for n in picked) > 4000 and min(int(n[4:]) for n in picked) < 1000  # spread, not the first 200
    assert pick_controls(names[:3]) == names[:3]


def test_live_evidence_carries_each_device_profile_from_the_fleet_file(monkeypatch):
    from types import SimpleNamespace

    from edge_kit.loop import rollout as ro

    fake_fleet(monkeypatch, lambda _name: {"requests": 0})
    fleet = SimpleNamespace(devices=[SimpleNamespace(name="c1", profile="jetson-orin-nano"),
                                     SimpleNamespace(name="k1", profile="rpi4")])
    cans, ctrls = ro.collect_live(fleet, ["c1"], ["k1"], ro.LiveGate(window_s=0.0), lambda *_: None)
    assert cans[0].profile == "jetson-orin-nano" and ctrls[0].profile == "rpi4"


def test_every_profile_the_rollout_reaches_has_a_canary():
    """A fleet file listing its rpi4s before its Jetsons: before, `--canary 10%` took the first two rpi4s and
    the Jetsons got the candidate with no canary of theirs benchmarked or judged."""
    from edge_kit.fleet.inventory import Device
    from edge_kit.loop.rollout import pick_canaries

    devices = [Device(name=f"r{i}", host="h", user="u", profile="rpi4") for i in range(10)] + \
              [Device(name=f"j{i}", host="h", user="u", profile="jetson-orin-nano") for i in range(10)]
    assert [d.name for d in pick_canaries(devices, 0.1)] == ["r0", "j0"]
    assert [d.name for d in pick_canaries(devices, 0.25)] == ["r0", "r1", "r2", "j0", "j1", "j2"]  # rounded up
    assert [d.name for d in pick_canaries(devices[:3], 0.01)] == ["r0"]  # a share that rounds to 0: one
    assert pick_canaries([], 0.1) == []


def _canary_fleet(tmp_path):
    """Write a fleet file of two rpi4 devices (a, b) and a compiled model's folder whose manifest holds one built int8
    variant; return both paths (the deploy --canary tests' fleet)."""
    from edge_kit.manifest import Artifact, Manifest

    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: f\ndefaults: {user: u, profile: rpi4}\ndevices:\n  - {name: a, host: h}\n"
                          "  - {name: b, host: h}\n")
    folder = tmp_path / "art"
    folder.mkdir()
    (folder / "manifest.json").write_text(Manifest(
        created="2026-11-29T00:00:00+00:00", model={"name": "m"}, versions={}, profiles={"rpi4": {}},
        artifacts=[Artifact(id="int8", status="built", profiles=["rpi4"], summary="int8", precision="int8",
                            file="int8.tflite", sha256="c" * 64, bytes=3)]).to_json())
    return fleet_file, folder


def _promoting_rollout(decision):
    """Return a stand-in for ``rollout`` whose canary a is promoted by ``decision`` (recorded as the live gate's)
    and every device succeeds on int8."""
    from edge_kit.fleet.deploy import GroupResult

    def fake_rollout(_fleet, targets, _opts, _canary, _failed, _progress, gate, record):
        record({"device": "a", "kind": "live gate", "chosen": "int8", "current": None, "feasible": True,
                "switch": True, "reason": decision.reason, "gate": decision.as_dict()})
        return GroupResult([DeviceResult(d.name, "succeeded", activated=True, variant="int8") for d in targets])

    return fake_rollout


def test_deploy_prints_a_promoting_gate_decision_and_where_its_figures_came_from(monkeypatch, tmp_path, run_cli):
    """Before, a promoted canary wave printed nothing of the gate: the numbers it promoted on were only in the
    history. Now the decision and the source of its figures are printed; --json keeps them in the history."""
    from edge_kit.loop import rollout as ro
    from edge_kit.selection.gate import LiveEvidence, judge_live
    from edge_kit.telemetry.store import Store

    fleet_file, folder = _canary_fleet(tmp_path)
    decision = judge_live([LiveEvidence("a", [1.0] * 300)], [LiveEvidence("b", [1.0] * 300)])

    monkeypatch.setattr(ro, "rollout", _promoting_rollout(decision))
    code, out, err = run_cli("deploy", "--fleet", fleet_file, "--artifacts", folder, "--canary", "50%", "--gate", "live")
    assert code == 0, err
    text = " ".join(out.split())
    assert "live gate: promote: canaries not slower" in text and "gate figures: measured: service times" in text
    stored = Store(tmp_path / "edgekit-history.db").decisions(kinds=("live gate",))
    assert stored[0]["gate"]["source"].startswith("measured: service times")


def test_deploy_json_has_the_gate_decision_and_where_it_was_stored(monkeypatch, tmp_path, run_cli):
    """`deploy --canary --gate live --json` printed the deploy's results alone: the gate's decision, which the text
    prints with the source of its figures, and the history the canaries' figures went to were missing."""
    from edge_kit.loop import rollout as ro
    from edge_kit.selection.gate import LiveEvidence, judge_live

    fleet_file, folder = _canary_fleet(tmp_path)
    decision = judge_live([LiveEvidence("a", [1.0] * 300)], [LiveEvidence("b", [1.0] * 300)])

    monkeypatch.setattr(ro, "rollout", _promoting_rollout(decision))
    code, out, err = run_cli("deploy", "--fleet", fleet_file, "--artifacts", folder, "--canary", "50%", "--gate", "live",
                             "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["gate"]["action"] == "promote" and doc["gate"]["source"].startswith("measured: service times")
    assert doc["history"] == str(tmp_path / "edgekit-history.db") and doc["history_refused"] == {}


def test_deploy_names_a_gate_decision_the_history_refused_for_what_it_holds_and_exits_4(monkeypatch, tmp_path, run_cli):
    """The gate's decision for canary a was refused by the history for what it holds: deploy stopped (exit 6) after
    the wave was judged, printing nothing of it. Now it is a's error: kept in the invalid table, named, exit 4."""
    from edge_kit.errors import HistoryRecordError
    from edge_kit.fleet.deploy import GroupResult
    from edge_kit.loop import rollout as ro
    from edge_kit.selection.gate import LiveEvidence, judge_live
    from edge_kit.telemetry.store import Store

    fleet_file, folder = _canary_fleet(tmp_path)
    decision = judge_live([LiveEvidence("a", [1.0] * 300)], [LiveEvidence("b", [1.0] * 300)])

    def fake_rollout(_fleet, targets, _opts, _canary, _failed, _progress, gate, record):
        record({"device": "a", "kind": "live gate", "chosen": "int8", "current": None, "feasible": True,
                "switch": True, "reason": decision.reason, "gate": decision.as_dict()})
        return GroupResult([DeviceResult(d.name, "succeeded", activated=True, variant="int8") for d in targets])

    def refuse(_self, _decision):
        raise HistoryRecordError("the history file h.db refused a record (simulated)")

    monkeypatch.setattr(ro, "rollout", fake_rollout)
    monkeypatch.setattr(Store, "add_decision", refuse)
    code, out, err = run_cli("deploy", "--fleet", fleet_file, "--artifacts", folder, "--canary", "50%", "--gate", "live")
    text = " ".join(out.split())
    assert code == 4, (out, err)
    assert "a: history refused decision (refused by the history: the history file h.db refused a record" in text
    assert "live gate: promote: canaries not slower" in text
    kept = Store(tmp_path / "edgekit-history.db").refused_messages()
    assert [(r["device"], r["topic"]) for r in kept] == [("a", "decisions")]


def test_deploy_caps_the_devices_it_names_when_the_history_refused_thousands_of_decisions(monkeypatch, tmp_path,
                                                                                          run_cli):
    """deploy --canary printed a `history refused` line for every canary whose decision the history refused, and a
    note naming every one of them: 10,000 canaries flooded the terminal with 10,000 lines and a note of 10,000
    names (only `rollout` capped its lines, and not its note). Now the text names 10 (lines and note) and says how
    many more; --json keeps every device."""
    import json

    from edge_kit.errors import HistoryRecordError
    from edge_kit.fleet.deploy import GroupResult
    from edge_kit.loop import rollout as ro
    from edge_kit.telemetry.store import Store

    fleet_file, folder = _canary_fleet(tmp_path)
    names = [f"c{i:05d}" for i in range(10_000)]

    def fake_rollout(_fleet, targets, _opts, _canary, _failed, _progress, gate, record):
        for name in names:  # the same decision recorded under each canary, as the gate does
            record({"device": name, "kind": "live gate", "chosen": "int8", "current": None, "feasible": True,
                    "switch": True, "reason": "simulated promote", "gate": {"action": "promote"}})
        return GroupResult([DeviceResult(d.name, "succeeded", activated=True, variant="int8") for d in targets])

    def refuse(_self, _decision):
        raise HistoryRecordError("the history file h.db refused a record (simulated)")

    monkeypatch.setattr(ro, "rollout", fake_rollout)
    monkeypatch.setattr(Store, "add_decision", refuse)
    monkeypatch.setattr(Store, "add_invalid", lambda *_a, **_k: None)  # kept: not what this test is about
    args = ("deploy", "--fleet", fleet_file, "--artifacts", folder, "--canary", "50%", "--gate", "live")
    code, out, err = run_cli(*args)
    assert code == 4, (out, err)
    lines = [line for line in out.splitlines() if ": history refused decision" in line]
    assert [line.split(":")[0] for line in lines] == names[:10], out
    text = " ".join(out.split())
    assert "... and 9990 more devices (--json lists them all)" in text
    assert (f"10000 record(s) refused by the history for what they hold ({', '.join(names[:10])}, and 9990 more): "
            "kept in its invalid table") in text
    assert len(out) < 5_000, len(out)

    code, out, err = run_cli(*args, "--json")
    assert code == 4, err
    assert list(json.loads(out)["history_refused"]) == names


def test_a_device_answering_more_samples_than_asked_gives_only_what_was_asked(monkeypatch):
    """A buggy or hostile agent claims a billion requests and sends 100,000 service times: before, all of them
    were kept (and tested) on every poll; now the newest LIVE_SAMPLES, as asked."""
    from edge_kit.loop import rollout as ro

    polls = {n: iter([{"requests": 0}, {"requests": 10**9, "latency_samples_ms": [1.0] * 100_000}]) for n in ("c1", "k1")}

    fake_fleet(monkeypatch, lambda name: next(polls[name]))
    cans, ctrls = ro.collect_live(None, ["c1"], ["k1"], ro.LiveGate(window_s=60.0, min_samples=1), lambda *_: None)
    assert len(cans[0].samples_ms) == len(ctrls[0].samples_ms) == ro.LIVE_SAMPLES


def test_the_gates_shadow_runs_compare_with_the_manifests_reference_variant(monkeypatch):
    """A model onnx2tf could not convert has no fp32 variant: its reference is onnx-fp32, yet the gate's shadow runs
    always asked the canaries for fp32, so no canary could compare and the fidelity floor judged nothing. Now the
    gate asks for the manifest's reference variant (fp32 where there is no manifest, as before)."""
    from types import SimpleNamespace

    from edge_kit.cli.app import live_gate
    from edge_kit.loop import rollout as ro

    asked: list[tuple[str, str, dict]] = []

    class Client:
        def __enter__(self):
            return self

        def __exit__(self, *_):
            return None

        def request(self, name, command, args, **_k):
            asked.append((name, command, args))
            return {"result": {"live": {"requests": 0}}}

    monkeypatch.setattr(ro.FleetClient, "of", staticmethod(lambda _fleet: Client()))
    monkeypatch.setattr(ro.time, "sleep", lambda _s: None)
    for manifest, reference in [(SimpleNamespace(reference_id="onnx-fp32"), "onnx-fp32"), (None, "fp32")]:
        asked.clear()
        gate = live_gate("live", 0.0, 1, 0.01, 0.1, 0.1, None, manifest)
        ro.collect_live(None, ["c1"], ["k1"], gate, lambda *_: None)
        assert ("c1", "shadow", {"variant": reference, "share": 0.1}) in asked, asked


def test_a_canary_breaking_its_constraints_is_told_with_the_figures_that_broke_them():
    """`deploy --canary` failed a canary with "canary breaks its constraints (accuracy >= 0.99 x fp32)": neither
    the figure its health benchmark measured nor where it came from, which the monitor's alert gives."""
    from edge_kit.fleet.inventory import Device
    from edge_kit.loop.rollout import broken_constraints

    manifest = SimpleNamespace(artifact=lambda _v: SimpleNamespace(bytes=3000), reference_id="fp32",
                               reference=lambda: SimpleNamespace(accuracy=SimpleNamespace(value=0.5375)))
    dev = Device(name="c1", host="127.0.0.1", user="edgekit", profile="rpi4",
                 constraints={"max_latency_p90_ms": 0.001})
    health = {"variant": "int8", "latency_ms": {"p90": 0.0396}, "accuracy": {"value": 0.5125},
              "power": {"avg_w": 4.5, "estimated": True, "measured": False}}
    r = DeviceResult("c1", "succeeded", activated=True, variant="int8", health=health)  # type: ignore[arg-type]
    assert broken_constraints(manifest, dev, r) == ("p90 <= 0.001 ms (0.0396 ms p90, the device's clock), "
                                                    "accuracy >= 0.99 x fp32 (51.25% on the eval set)")
    onnx = SimpleNamespace(**{**manifest.__dict__, "reference_id": "onnx-fp32"})  # no LiteRT variants: no fp32
    assert broken_constraints(onnx, dev, r).endswith("accuracy >= 0.99 x onnx-fp32 (51.25% on the eval set)")


def test_the_gate_records_the_clocks_the_devices_named_and_the_report_quotes_them(monkeypatch):
    """The report's gate table said "perf_counter_ns" in fixed text, whatever the devices' serving APIs said they
    timed with: the decision now keeps each clock the devices named, and the note quotes those."""
    from edge_kit.loop import rollout as ro
    from edge_kit.selection.gate import judge_live
    from edge_kit.telemetry.report import _gate_rows

    said = "perf_counter_ns from a request read to its answer ready (queueing included)"
    polled(monkeypatch, {
        "c1": [{"requests": 0, "clock": said}, {"requests": 20, "latency_samples_ms": [1.0] * 20, "clock": said}],
        "k1": [{"requests": 0}, {"requests": 20, "latency_samples_ms": [1.0] * 20, "clock": "<b>my own timer"}]})
    cans, ctrls = ro.collect_live(None, ["c1"], ["k1"], ro.LiveGate(window_s=0.5, min_samples=10), lambda *_: None)
    decision = judge_live(cans, ctrls, min_samples=10)
    assert decision.clocks == ["<b>my own timer", said]
    assert judge_live(cans, [ro.LiveEvidence("k1", [1.0] * 20)], min_samples=10).clocks == ["clock not named", said]

    class Store:
        def decisions(self, **_):
            return [{"kind": "live gate", "recorded": 0.0, "device": "c1", "chosen": "int8", "gate": decision.as_dict()},
                    {"kind": "live gate", "recorded": 0.0, "device": "c2", "chosen": "int8",  # stored before clocks were
                     "gate": {k: v for k, v in decision.as_dict().items() if k != "clocks"}}]

    rows, clocks = _gate_rows(Store())
    assert len(rows) == 2 and clocks == ["<b>my own timer", said]


def test_a_hold_because_a_canary_left_its_candidate_says_so_not_only_too_little_traffic(monkeypatch):
    """A canary whose agent went back to its previous model has its figures left out; the hold then said only that it
    "answered fewer than N requests", and a longer window looked like the fix (only the progress line told)."""
    from edge_kit.loop import rollout as ro

    cand, old = {"sha256": "a" * 64, "variant": "int8"}, {"sha256": "b" * 64, "variant": "fp32"}
    polled(monkeypatch, {
        "c1": [{"requests": 0, "model": cand, "since": 1.0},
               {"requests": 300, "model": old, "since": 9.0, "latency_samples_ms": [1.0] * 300}],
        "k1": [{"requests": 0, "model": old, "since": 1.0},
               {"requests": 300, "model": old, "since": 1.0, "latency_samples_ms": [1.0] * 300}]})
    decision = ro.live_decision(None, ["c1"], ["k1"], ro.LiveGate(window_s=0.5, min_samples=10), lambda *_: None,
                                {"c1": "a" * 64})
    assert decision.action == "hold"
    assert decision.reason.startswith("not on their candidate at the end of the window (c1 serves bbbbbbbbbbbb: ")
    assert "c1 answered fewer than 10 requests" in decision.reason
