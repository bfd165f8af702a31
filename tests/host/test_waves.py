"""The rollout driver's rules with an in-memory broker (the real one: tests/integration/test_pull_rollout.py
and test_virtual_fleet.py): waves, thresholds, abort, and a resume that neither loses nor repeats a device."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edge_kit.errors import ConfigError
from edge_kit.loop.waves import (
    Rollout,
    RolloutError,
    RolloutInterrupted,
    RolloutSettings,
    _by_reason,
    parse_rate,
    parse_share,
    parse_waves,
    wave_ends,
)
from edge_kit.telemetry.store import Store

SHA = "c" * 64


def test_wave_rate_and_share_parsing():
    assert parse_waves("1%,10%,100%") == (0.01, 0.1, 1.0)
    assert parse_share("2%", "--max-failed") == 0.02 and parse_share("0.5", "--max-failed") == 0.5
    assert parse_rate("200/min", "--rate") == pytest.approx(200 / 60)
    assert parse_rate("2MB/s", "--bandwidth", "B") == 2e6
    for bad in ("10%,5%,100%", "1%,50%", "0%,100%", "x"):
        with pytest.raises(ConfigError, match="--wave"):
            parse_waves(bad)
    for bad in ("-1/min", "fast", "0/s"):
        with pytest.raises(ConfigError, match="--rate"):
            parse_rate(bad, "--rate")
    assert wave_ends(1000, (0.01, 0.1, 1.0)) == [10, 100, 1000]
    assert wave_ends(3, (0.01, 0.1, 1.0)) == [1, 2, 3]  # every wave moves on by at least one device


class FakeBroker:
    """Devices that answer each desired state at once: ``fail`` ones report failed."""

    def __init__(self, fail=(), crash_after=None, on_publish=None, silent=(), fetching=()):
        self.fail, self.crash_after, self.on_publish = set(fail), crash_after, on_publish
        self.silent = set(silent)  # devices offline: they take nothing and say nothing
        self.fetching = set(fetching)  # devices that answer 'fetching' to the candidate and stop there
        self.sent: list[tuple[str, int]] = []
        self.desired: dict[str, object] = {}  # each device's retained desired state
        self.on: dict[str, str] = {}  # the model each device runs (default: "0" * 64)
        self.retained: dict[str, dict] = {}  # what a new subscriber gets at once

    def __call__(self, callback):
        self.cb = callback
        return self

    def __enter__(self):
        for msg in self.retained.values():
            self.cb(msg)
        return self

    def __exit__(self, *_):
        pass

    def publish_desired(self, desired, device):
        if self.crash_after is not None and len(self.sent) >= self.crash_after:
            raise KeyboardInterrupt("the host went down")
        self.sent.append((device, desired.revision))
        self.desired[device] = desired
        if device in self.silent:
            return
        state = "converged" if desired.hold else "failed" if device in self.fail else \
            "fetching" if device in self.fetching and desired.sha256 == SHA else "converged"  # its old model: installed
        if state == "converged" and not desired.hold:
            self.on[device] = desired.sha256
        msg = {"device": device, "rollout": desired.rollout, "revision": desired.revision, "state": state,
               "error": "simulated" if state == "failed" else None, "current": {"sha256": self.on.get(device, "0" * 64)},
               "previous": {"sha256": "0" * 64, "variant": "fp32", "model": "m", "bytes": 7}}
        self.retained[device] = msg
        self.cb(msg)
        if self.on_publish:
            self.on_publish(len(self.sent))


def planned(history, n=20, **settings):
    names = [f"d{i:02d}" for i in range(n)]
    gate = settings.pop("gate", None)
    s = RolloutSettings(**{"waves": (0.1, 0.5, 1.0), "wave_timeout_s": 2.0, **settings})
    plan = {"gate": gate, "id": "r", "fleet": "f", "model": "m", "store": "http://127.0.0.1:9", "variant": "int8", "artifacts": "/x",
            "signature": "signed by key 0123456789abcdef (trusted)",
            "settings": {"waves": list(s.waves), "rate_per_s": s.rate_per_s, "max_failed": s.max_failed,
                         "wave_timeout_s": s.wave_timeout_s,
                         "fetch": {"max_bytes_s": None, "start_delay_s": 0.0, "timeout_s": 30.0}},
            "order": names, "targets": {n: {"variant": "int8", "sha256": SHA, "bytes": 1, "keep": [], "profile": "rpi4"} for n in names},
            "refused": {"old": "old: the artifacts were not compiled for profile rpi3"}}
    history.save_rollout("r", "running", plan)
    return names


def test_waves_go_in_order_and_a_failure_over_the_threshold_stops_the_rollout(tmp_path):
    history = Store(tmp_path / "h.db")
    names = planned(history)
    broker = FakeBroker(fail={names[3]})
    out = Rollout(history, "r", broker).run()
    assert out["state"] == "stopped" and "1 of 10 devices sent so far failed" in out["reason"]
    assert out["reason"].endswith("`edgekit rollout resume r` goes on once the failures are under the threshold; "
                                  "`edgekit rollout abort r` puts the devices back)")  # what to do, not only what happened
    assert [d for d, _ in broker.sent] == names[:10]  # waves of 2 and 8; the last wave was never sent
    assert out["counts"] == {"converged": 9, "failed": 1, "planned": 10, "refused": 1}
    assert history.rollout("r")["state"] == "stopped" and history.rollout("r")["owner"] is None
    again = Rollout(history, "r", broker).run()  # resumable: stops again while the failure stands
    assert again["state"] == "stopped" and len(broker.sent) == 10
    broker.retained[names[3]] = {**broker.retained[names[3]], "state": "converged", "error": None}  # it recovered
    done = Rollout(history, "r", broker).run()
    assert done["state"] == "done" and done["counts"] == {"converged": 20, "refused": 1}
    with pytest.raises(RolloutError, match="is done"):
        Rollout(history, "r", broker).run()


def test_a_resumed_rollout_sends_each_device_once_and_takes_what_converged_meanwhile(tmp_path):
    history = Store(tmp_path / "h.db")
    names = planned(history, max_failed=0.5)
    broker = FakeBroker(crash_after=7)
    with pytest.raises(RolloutInterrupted, match="`edgekit rollout resume r` goes on"):
        Rollout(history, "r", broker).run()
    rows = history.rollout_devices("r")
    assert sum(r["state"] == "converged" for r in rows.values()) >= 2  # the answers before the crash are kept
    broker.crash_after = None
    out = Rollout(history, "r", broker).run()
    assert out["state"] == "done" and out["counts"] == {"converged": 20, "refused": 1}
    sent = [d for d, _ in broker.sent]
    assert sorted(sent) == sorted(names)  # nobody twice: those answered before the crash were not sent again
    revisions = [rev for _, rev in broker.sent]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)


def test_a_silent_device_holds_its_own_wave_for_the_timeout_not_every_later_wave(tmp_path):
    # Found by walking a simulated fleet with one device offline: waves 1 %, 10 %, 100 % waited the whole
    # --wave-timeout three times (each wave waited for the first wave's silent device again).
    history = Store(tmp_path / "h.db")
    names = planned(history, wave_timeout_s=1.5)
    broker = FakeBroker(silent={names[0]})
    started = time.monotonic()
    out = Rollout(history, "r", broker).run()
    took = time.monotonic() - started
    assert out["state"] == "done" and out["counts"] == {"converged": 19, "sent": 1, "refused": 1}
    assert out["reason"] == ("1 device(s) did not answer within --wave-timeout (1.5 s; offline?): their desired state "
                             "waits for them on the broker; `edgekit rollout status r --refresh` takes their answers")
    assert [d for d, _ in broker.sent] == names  # every wave went out
    assert 1.5 <= took < 3.0, took  # the first wave's timeout once, not once per wave (4.5 s)
    assert Rollout(history, "r", broker).status(history.rollout("r"))["reason"] == out["reason"]
    broker.silent.clear()
    broker.publish_desired(broker.desired[names[0]], names[0])  # it comes online and takes its retained desired state
    assert Rollout(history, "r", broker).status(history.rollout("r"), refresh=True)["reason"] is None


def test_a_second_driver_is_refused_and_abort_stops_the_first(tmp_path):
    history = Store(tmp_path / "h.db")
    planned(history, waves=(0.1, 1.0), rate_per_s=5.0)
    assert history.claim_rollout("r", "other-host:1", stale_s=60) is None
    with pytest.raises(RolloutError, match="being driven by other-host:1"):
        Rollout(history, "r", FakeBroker()).run()
    history.release_rollout("r", "other-host:1")
    out = Rollout(history, "r", FakeBroker(on_publish=lambda n: n == 3 and history.set_rollout_state("r", "aborting"))).run()
    assert out["state"] == "aborted" and out["counts"]["planned"] > 0


def test_a_history_that_goes_away_is_one_line_and_the_rollout_resumes(tmp_path):
    import sqlite3

    history = Store(tmp_path / "h.db")
    planned(history)

    class Flaky:
        def __init__(self, store, fail_after):
            self.store, self.calls, self.fail_after = store, 0, fail_after

        def __getattr__(self, name):
            def call(*a, **kw):
                if name == "set_rollout_devices":
                    self.calls += 1
                    if self.calls > self.fail_after:
                        raise sqlite3.OperationalError("disk I/O error\nmore detail")
                return getattr(self.store, name)(*a, **kw)
            return call

    with pytest.raises(RolloutError) as caught:
        Rollout(Flaky(history, 3), "r", FakeBroker()).run()
    text = str(caught.value)
    assert "\n" not in text and "OperationalError: disk I/O error" in text and "edgekit rollout resume r" in text
    out = Rollout(history, "r", FakeBroker()).run()
    assert out["state"] == "done" and out["counts"] == {"converged": 20, "refused": 1}


@pytest.mark.parametrize("action", ["promote", "hold", "roll back"])
def test_the_live_gate_judges_the_first_wave_against_devices_not_yet_sent(tmp_path, action):
    from edge_kit.selection.gate import GateDecision

    history = Store(tmp_path / "h.db")
    names = planned(history, gate={"window_s": 1})
    seen = []

    def judge(canaries, controls):
        seen.append((canaries, controls))
        return GateDecision(action, f"simulated {action}")

    broker = FakeBroker()
    out = Rollout(history, "r", broker, judge=judge).run()
    assert seen == [(names[:2], names[2:])]  # the canaries and the rest of their profile, judged once
    assert out["gate"]["action"] == action and out["gate"]["reason"] == f"simulated {action}"  # shown by the CLI
    decisions = history.decisions()
    assert {d["device"] for d in decisions} == set(names[:2]) and all(d["rollout"] == "r" for d in decisions)
    if action == "promote":
        assert out["state"] == "done" and out["counts"] == {"converged": 20, "refused": 1}
    elif action == "hold":
        assert out["state"] == "held" and out["counts"]["planned"] == 18
        out = Rollout(history, "r", broker, judge=judge).run()  # resume: promoted by hand, not judged again
        assert out["state"] == "done" and len(seen) == 1
    else:
        assert out["state"] == "rolled back" and out["counts"] == {"rolled back": 2, "planned": 18, "refused": 1}
        assert broker.retained[names[0]]["revision"] > broker.sent[0][1]  # a new desired state: the previous model
        assert [d for d, _ in broker.sent] == names[:2] * 2
    with pytest.raises(RolloutError, match="drive it with"):
        planned(Store(tmp_path / "h2.db"), gate={"window_s": 1})
        Rollout(Store(tmp_path / "h2.db"), "r", FakeBroker()).run()


def test_a_gate_decision_the_history_refuses_for_what_it_holds_is_noted_on_its_canary_and_the_rollout_goes_on(
        tmp_path, monkeypatch):
    """Recording the gate's decision for a canary went through add_decision outside the batch writer: a decision the
    database refused for what it holds stopped the rollout ("the history went away: resume"), which resuming only
    repeated. Now that canary's decision is kept in the invalid table, noted in its row, and the rollout goes on."""
    from edge_kit.errors import HistoryRecordError
    from edge_kit.selection.gate import GateDecision

    history = Store(tmp_path / "h.db")
    names = planned(history, gate={"window_s": 1})
    real = Store.add_decision

    def add_decision(self, decision):
        if decision["device"] == names[0]:
            raise HistoryRecordError("the history file h.db refused a record (simulated)")
        real(self, decision)

    monkeypatch.setattr(Store, "add_decision", add_decision)
    out = Rollout(history, "r", FakeBroker(), judge=lambda *_a: GateDecision("promote", "simulated promote")).run()
    assert out["state"] == "done" and out["counts"] == {"converged": 20, "refused": 1}
    assert {d["device"] for d in history.decisions()} == {names[1]}
    assert [(r["device"], r["topic"]) for r in history.refused_messages()] == [(names[0], "decisions")]
    detail = history.rollout_devices("r")[names[0]]["detail"]
    assert detail["history"] == "decision (refused by the history: the history file h.db refused a record (simulated))"


def test_rollout_resume_exits_4_naming_the_canary_whose_gate_decision_the_history_refused(tmp_path, run_cli,
                                                                                           monkeypatch):
    """The driver noted a refused gate decision in the canary's row and went on, but `rollout start`/`resume` exited
    0 and said nothing of it, as if every decision was recorded. Now the rollout still goes on to the end, and the
    summary (`history_refused`, a line per device and a note) names the canary, exit 4 as tune and deploy --canary."""
    from edge_kit.errors import HistoryRecordError
    from edge_kit.fleet.commands import FleetClient
    from edge_kit.loop import waves
    from edge_kit.selection.gate import GateDecision

    history = Store(tmp_path / "edgekit-history.db")
    names = planned(history, gate={"window_s": 1})
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: f\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: u, profile: rpi4}\n"
                          "devices:\n" + "".join(f"  - {{name: {n}, host: h}}\n" for n in names))
    real = Store.add_decision

    def add_decision(self, decision):
        if decision["device"] == names[0]:
            raise HistoryRecordError("the history file h.db refused a record (simulated)")
        real(self, decision)

    broker = FakeBroker()
    monkeypatch.setattr(Store, "add_decision", add_decision)
    monkeypatch.setattr(FleetClient, "of", lambda *_a, on_reported, **_k: broker(on_reported))
    monkeypatch.setattr(waves, "live_judge", lambda *_a, **_k: lambda *_b: GateDecision("promote", "simulated promote"))
    code, out, err = run_cli("rollout", "resume", "--fleet", fleet_file, "r")
    text = " ".join(out.split())
    assert code == 4, (out, err)
    assert "rollout r: done (converged 20, refused 1)" in text
    assert f"{names[0]}: history refused decision (refused by the history: the history file h.db refused" in text
    assert f"1 record(s) refused by the history for what they hold ({names[0]}): kept in its invalid table" in text
    assert len(broker.sent) == 20  # the rollout went on to its last wave

    code, out, err = run_cli("rollout", "status", "--fleet", fleet_file, "r", "--json")
    summary = json.loads(out)
    assert code == 0 and list(summary["history_refused"]) == [names[0]], err
    assert {r["device"]: r["history"] for r in summary["devices"]}[names[0]].startswith("decision (refused by")
    from edge_kit.cli.rollout import _exit

    with pytest.raises(__import__("typer").Exit) as held:  # a rollout not done: exit 1 says more than 4
        _exit({**summary, "state": "held"})
    assert held.value.exit_code == 1


def test_selected_variants_follow_the_last_feasible_choice_and_the_plan_takes_them(tmp_path):
    import hashlib

    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.loop.waves import plan_rollout, selected_variants
    from edge_kit.manifest import Artifact, Manifest

    history = Store(tmp_path / "h.db")
    (tmp_path / "fleet.yaml").write_text("fleet: f\ndefaults: {user: u, profile: rpi4}\ndevices:\n"
                                         "  - {name: a, host: h}\n  - {name: b, host: h}\n  - {name: c, host: h}\n")
    fleet = load_fleet(tmp_path / "fleet.yaml")
    history.add_decision({"device": "a", "chosen": "fp32", "current": None, "feasible": True, "switch": True})
    history.add_decision({"device": "a", "chosen": "int8", "current": None, "feasible": True, "switch": True})
    history.add_decision({"device": "b", "chosen": "int8", "current": None, "feasible": False, "switch": False})
    history.add_decision({"device": "b", "kind": "live gate", "chosen": "fp32", "current": None, "feasible": True,
                          "switch": True})
    assert selected_variants(history, fleet.devices) == {"a": "int8"}  # newest feasible; gate records are not choices
    folder = tmp_path / "art"
    folder.mkdir()
    arts = [Artifact(id=v, status="built", profiles=["rpi4"], summary=v, precision=v, file=f"{v}.tflite",
                     sha256=hashlib.sha256(v.encode()).hexdigest(), bytes=3) for v in ("fp32", "int8")]
    (folder / "manifest.json").write_text(Manifest(created="2026-11-29T00:00:00+00:00", model={"name": "m"}, versions={},
                                                   profiles={"rpi4": {}}, artifacts=arts).to_json())
    plan = plan_rollout("r", folder, fleet, fleet.devices, "http://s", None, RolloutSettings(),
                        choices=selected_variants(history, fleet.devices))
    assert {d: (t["variant"], t["why"]) for d, t in plan["targets"].items()} == {
        "a": ("int8", "selected"), "b": ("fp32", "profile's first"), "c": ("fp32", "profile's first")}


@pytest.mark.parametrize("command", ["status", "resume", "abort"])
def test_an_unknown_rollout_id_is_bad_input_exit_2_in_json_too(tmp_path, run_cli, command):
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: sim\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                          "devices:\n  - {name: d1, host: 127.0.0.1}\n")
    code, out, err = run_cli("rollout", command, "--fleet", fleet_file, "nope", "--json")
    assert code == 2
    assert json.loads(out)["error"] == "rollout nope: not in the history; see `edgekit rollout list` (or check --history)"
    assert err.count("\n") == 1


def test_a_device_in_another_unfinished_rollout_is_refused_at_start(tmp_path):
    """Before, a second rollout could target devices a held or running one still drives: the two took turns
    overriding each device's desired state (a resume of the first undid the second). Now `start` refuses."""
    from edge_kit.loop.waves import check_no_overlap

    history = Store(tmp_path / "h.db")
    names = planned(history)  # rollout "r", running, devices d00..d19
    other = {"id": "r2", "targets": {n: {} for n in ("d03", "d04", "x1")}}
    with pytest.raises(RolloutError, match=r"2 device\(s\) \(d03, d04\) are in rollout r, which is running; "
                                           r"`edgekit rollout abort r` first"):
        check_no_overlap(history, other)
    for state in ("held", "stopped", "aborting"):
        history.set_rollout_state("r", state)
        with pytest.raises(RolloutError, match=f"which is {state}"):
            check_no_overlap(history, other)
    check_no_overlap(history, {"id": "r2", "targets": {"x1": {}}})  # no shared device: fine
    check_no_overlap(history, {"id": "r", "targets": {n: {} for n in names}})  # itself is no conflict
    for state in ("done", "aborted", "rolled back"):
        history.set_rollout_state("r", state)
        check_no_overlap(history, other)  # finished: it sends nothing more


def one_artifact_plan(tmp_path: Path, devices: str) -> tuple[Path, Path]:
    """Write a fleet file of one-letter ``devices`` (rpi4) and an artifacts folder with one built int8
    artifact; return both paths."""
    from edge_kit.manifest import Artifact, Manifest

    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: f\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: u, profile: rpi4}\n"
                          "devices:\n" + "".join(f"  - {{name: {d}, host: h}}\n" for d in devices))
    folder = tmp_path / "art"
    folder.mkdir()
    arts = [Artifact(id="int8", status="built", profiles=["rpi4"], summary="int8", precision="int8", file="int8.tflite",
                     sha256=SHA, bytes=3)]
    (folder / "manifest.json").write_text(Manifest(created="2026-11-29T00:00:00+00:00", model={"name": "m"}, versions={},
                                                   profiles={"rpi4": {}}, artifacts=arts).to_json())
    return fleet_file, folder


def test_rollout_start_refuses_devices_of_a_held_rollout_before_anything_is_sent(tmp_path, run_cli):
    fleet_file, folder = one_artifact_plan(tmp_path, devices="ab")
    history = Store(tmp_path / "edgekit-history.db")
    history.save_rollout("old", "held", {"id": "old", "targets": {"a": {}}})
    code, out, err = run_cli("rollout", "start", "--fleet", fleet_file, folder, "--store", "http://127.0.0.1:1",
                             "--id", "new", "--json")
    assert code == 4, err
    assert json.loads(out)["error"] == ("rollout new: 1 device(s) (a) are in rollout old, which is held; "
                                        "`edgekit rollout abort old` first, or leave them out with --devices")
    assert history.rollout("new") is None  # nothing recorded, nothing sent


def test_a_device_that_left_the_fleet_is_not_sent_again_and_does_not_hold_the_rollout(tmp_path):
    """A device removed from the fleet file after the plan (decommissioned, its key gone): before, a resume sent
    it a retained desired state again and waited for it, and the rollout could not end done. Now it ends
    ``left the fleet``: not sent, not waited for, not counted as sent by the failure threshold."""
    history = Store(tmp_path / "h.db")
    names = planned(history, max_failed=0.5)
    broker = FakeBroker(crash_after=3)  # the host goes down after the first wave (2) and one more
    with pytest.raises(RolloutInterrupted, match="`edgekit rollout resume r` goes on"):
        Rollout(history, "r", broker).run()
    sent_before = {d for d, _ in broker.sent}
    gone = {names[2], names[15]}  # names[2] was sent before the crash (wave 2), names[15] never
    assert names[2] in sent_before and names[15] not in sent_before
    broker.crash_after = None
    out = Rollout(history, "r", broker, members=set(names) - gone).run()
    assert out["state"] == "done" and out["counts"] == {"converged": 18, "left the fleet": 2, "refused": 1}
    assert not gone & {d for d, _ in broker.sent[3:]}  # nothing sent to them after the resume
    rows = {r["device"]: r for r in out["devices"]}
    assert rows[names[15]]["error"] == f"{names[15]}: no longer in the fleet file; not sent"
    assert rows[names[2]]["error"] == f"{names[2]}: no longer in the fleet file; not sent again"


def test_the_first_wave_has_a_device_of_each_profile_when_it_can():
    """200 rpi4s, one Jetson and one Coral at 1 %: before, the first wave (3 devices) was almost surely all
    rpi4s, and the Jetson and the Coral got the candidate after a gate that never saw their kind."""
    from edge_kit.loop.waves import _order

    names = [f"r{i:03d}" for i in range(200)] + ["jetson", "coral"]
    profile = {n: "rpi4" for n in names[:200]} | {"jetson": "jetson-orin-nano", "coral": "coral-usb"}
    order = _order("rollout-1", names, profile)
    first = order[:wave_ends(len(order), (0.01, 1.0))[0]]
    assert {profile[n] for n in first} == {"rpi4", "jetson-orin-nano", "coral-usb"}
    assert sorted(order) == sorted(names) and order == _order("rollout-1", list(reversed(names)), profile)  # stable
    assert _order("rollout-1", names) == sorted(names, key=lambda n: __import__("hashlib").sha256(
        f"rollout-1/{n}".encode()).hexdigest())  # without profiles: the plain shuffle


def test_the_cli_says_what_the_gate_decided_and_where_its_figures_came_from(capsys):
    from edge_kit.cli.rollout import _print
    from edge_kit.selection.gate import LiveEvidence, judge_live

    d = judge_live([LiveEvidence("c1", [1.0] * 300, clock="perf_counter_ns from a request read to its answer ready")],
                   [LiveEvidence("k1", [1.0] * 300)])
    _print({"id": "r", "state": "done", "reason": None, "gate": d.as_dict(), "counts": {"converged": 2},
            "refused_messages": 0, "devices": []})
    text = " ".join(capsys.readouterr().out.split())
    assert "live gate: promote: canaries not slower" in text
    assert "gate figures: measured: service times of each device's serving API on its own traffic (timed on the device" in text
    assert "clocks: clock not named; perf_counter_ns from a request read to its answer ready; test: one-sided" in text
    assert "test: one-sided Mann-Whitney U" in text


def test_status_of_a_running_rollout_says_whether_a_host_drives_it_and_what_to_run_when_none_does(tmp_path):
    """Found walking Ctrl-C then `rollout status`: 'running (planned 2, sent 1)' with nothing driving it, which reads
    as if it were going on; after a resume of a stopped rollout was interrupted, the stop's old reason was shown."""
    history = Store(tmp_path / "h.db")
    names = planned(history)
    broker = FakeBroker(fail={names[0]})
    assert Rollout(history, "r", broker).run()["state"] == "stopped"
    broker.retained[names[0]] = {**broker.retained[names[0]], "state": "converged", "error": None}  # it recovered
    broker.crash_after = len(broker.sent)
    with pytest.raises(RolloutInterrupted):  # resumed, then Ctrl-C before its next desired state went out
        Rollout(history, "r", broker).run()
    view = Rollout(history, "r", FakeBroker()).status(history.rollout("r"))
    assert view["state"] == "running"
    assert view["reason"] == ("no host drives it (its driver was stopped: Ctrl-C, or its host went down); `edgekit "
                              "rollout resume r` goes on, `edgekit rollout abort r` ends it")
    assert history.claim_rollout("r", "ops-host:42", 30.0) is None
    assert Rollout(history, "r", FakeBroker()).status(history.rollout("r"))["reason"] == "driven by ops-host:42"


def test_ctrl_c_while_driving_says_how_to_resume_in_one_line_exit_130(tmp_path, run_cli, monkeypatch):
    """Before: 'interrupted; nothing was half-written', which did not say the rollout was resumable or how."""
    from edge_kit.loop import waves

    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: f\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: u, profile: rpi4}\n"
                          "devices:\n  - {name: d00, host: h}\n")
    planned(Store(tmp_path / "edgekit-history.db"))

    def interrupted(self, plan):
        raise KeyboardInterrupt

    monkeypatch.setattr(waves.Rollout, "_run", interrupted)
    code, out, err = run_cli("rollout", "resume", "--fleet", fleet_file, "r")
    assert code == 130 and out == ""
    assert err == ("edgekit: error: rollout r: interrupted; the devices sent so far keep their desired state and no "
                   "other was sent: `edgekit rollout resume r` goes on (a live gate not yet decided judges again), "
                   "`edgekit rollout abort r` ends it\n")
    assert Store(tmp_path / "edgekit-history.db").rollout("r")["owner"] is None  # released: resumable at once


def test_a_rolled_back_gate_names_the_canaries_it_could_not_send_back(tmp_path):
    """A canary whose report named no previous model (a fresh device) cannot be sent back: before, the summary
    only counted '1 of 2 canaries sent back' and that device's row said nothing. Now both name it."""
    from edge_kit.selection.gate import GateDecision

    history = Store(tmp_path / "h.db")
    names = planned(history, gate={"window_s": 1})

    class Fresh(FakeBroker):
        def __call__(self, callback):
            def fresh(msg):  # names[0] had no model before this rollout: its report names no previous
                callback({**msg, "previous": None} if msg["device"] == names[0] else msg)
            self.cb = fresh
            return self

    broker = Fresh()
    out = Rollout(history, "r", broker, judge=lambda c, k: GateDecision("roll back", "canaries slower")).run()
    assert out["state"] == "rolled back"
    assert out["reason"].endswith(f"1 of 2 canaries sent back to their previous model; kept on the candidate "
                                  f"(each row says why): {names[0]}")
    row = {r["device"]: r for r in out["devices"]}[names[0]]
    assert row["state"] == "converged" and "kept on the candidate: it reported no previous model" in row["error"]


def test_one_device_reporting_a_huge_revision_raises_only_its_own_and_is_refused_at_the_top(tmp_path):
    """A device's reported revision is its word (a compromised one can say anything its key signs). The
    next revision sent to it must be above it, but it used to raise the driver's one counter for every
    device: one report of 2**63 - 1 put every later device beyond what a desired state can carry, and
    the whole fleet refused every rollout from then on. Now it counts for that device alone, and a
    device that can be sent nothing above its report is refused with why, not sent a message it refuses."""
    history = Store(tmp_path / "h.db")
    names = planned(history, max_failed=0.5)
    broker = FakeBroker()
    top = 2 ** 63 - 1
    broker.retained[names[1]] = {"device": names[1], "rollout": "other", "revision": top, "state": "converged",
                                 "error": None, "current": None, "previous": None}
    broker.retained[names[2]] = {"device": names[2], "rollout": "other", "revision": top - 10, "state": "converged",
                                 "error": None, "current": None, "previous": None}
    out = Rollout(history, "r", broker).run()
    sent = dict(broker.sent)
    assert names[1] not in sent and sent[names[2]] == top - 9  # above its own report, still a valid revision
    others = [rev for d, rev in broker.sent if d != names[2]]
    assert max(others) < 2 ** 62 and len(others) == 18  # the others were not dragged up with it
    row = next(r for r in out["devices"] if r["device"] == names[1])
    assert row["state"] == "refused" and "reported revision" in row["error"] and names[1] in row["error"]
    assert out["state"] == "done" and out["counts"] == {"converged": 19, "refused": 2}


def test_a_bandwidth_cap_below_what_the_agent_takes_is_refused_at_start_not_by_every_device(tmp_path, run_cli):
    """`--bandwidth 500B/s` was planned and sent: every device then refused to download below 1 KiB/s
    (each one `failed`, the rollout stopped at its first wave). One bound now, in the protocol: the CLI
    refuses the cap at once (bad input, exit 2, nothing recorded) and the agent refuses such a desired state."""
    from edge_kit.loop.waves import parse_bandwidth
    from edgekit_protocol.desired import MIN_BYTES_S, parse_desired

    assert parse_bandwidth("2MB/s") == 2e6 and parse_bandwidth("1kB/s") == MIN_BYTES_S == 1000
    with pytest.raises(ConfigError, match="--bandwidth 500B/s: .*at least 1 kB/s"):
        parse_bandwidth("500B/s")
    body = {"msg_id": "m", "rollout": "r", "revision": 1, "store": "http://s", "model": "m", "variant": "int8",
            "sha256": SHA, "bytes": 1, "fetch": {"max_bytes_s": 500}}
    from edgekit_protocol.errors import MessageError
    with pytest.raises(MessageError, match="max_bytes_s"):
        parse_desired(body)
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: f\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: u, profile: rpi4}\n"
                          "devices:\n  - {name: a, host: h}\n")
    code, out, err = run_cli("rollout", "start", "--fleet", fleet_file, tmp_path, "--store", "http://127.0.0.1:1",
                             "--bandwidth", "500B/s", "--json")
    assert code == 2, err
    assert "--bandwidth 500B/s" in json.loads(out)["error"] and err.count("\n") == 1


def test_a_plan_whose_desired_state_the_devices_would_refuse_is_refused_at_start(tmp_path, run_cli):
    """The agent checks every desired state (parse_desired) and refuses what breaks a rule: an id over 512
    characters, an artifact over 1 TiB... The host did not check its own: `rollout start --id <600 chars>`
    sent every device a desired state it refused (counted on the device, silent here), and the rollout
    waited out each wave with every device `sent`. Now the plan is checked by the same rules at start:
    one line, exit 2, nothing recorded or sent."""
    fleet_file, folder = one_artifact_plan(tmp_path, devices="a")
    code, out, err = run_cli("rollout", "start", "--fleet", fleet_file, folder, "--store", "http://127.0.0.1:1",
                             "--id", "x" * 600, "--json")
    assert code == 2, err
    error = json.loads(out)["error"]
    assert "a: the device would refuse its desired state" in error and "'rollout'" in error and "\n" not in error
    assert Store(tmp_path / "edgekit-history.db").rollout("x" * 600) is None


def test_a_gate_roll_back_interrupted_while_sending_the_canaries_back_is_finished_by_resume(tmp_path):
    """The gate's decision was stored (the rollout still running) before the canaries were sent back: Ctrl-C or the
    host going down while sending them, and `resume` took the decision as done and sent the rejected candidate to
    every later wave. Now a resume finishes the roll back and sends nothing else."""
    from edge_kit.selection.gate import GateDecision

    history = Store(tmp_path / "h.db")
    names = planned(history, gate={"window_s": 1})
    broker = FakeBroker(crash_after=2)  # the first wave's two desired states go out; the host dies sending them back
    with pytest.raises(RolloutInterrupted):
        Rollout(history, "r", broker, judge=lambda c, k: GateDecision("roll back", "canaries slower")).run()
    assert history.rollout("r")["state"] == "running"
    broker.crash_after = None
    out = Rollout(history, "r", broker, judge=lambda c, k: pytest.fail("judged again")).run()
    assert out["state"] == "rolled back" and out["counts"] == {"rolled back": 2, "planned": 18, "refused": 1}
    assert out["reason"].startswith("live gate: roll back: canaries slower; 2 of 2 canaries sent back")
    assert {d for d, _ in broker.sent} == set(names[:2])  # no later wave got the candidate
    assert all(broker.desired[d].sha256 == "0" * 64 for d in names[:2])


def test_a_gate_decision_recorded_before_the_run_stopped_stands_on_resume_and_is_recorded_once(tmp_path):
    """The canaries' decisions were recorded before the plan stored the gate's: a run stopped in between (Ctrl-C, the
    history gone) was judged again on resume, a roll back could come out promote, and the history held both. Now the
    recorded decision is carried out, and each canary's is recorded once."""
    from edge_kit.selection.gate import GateDecision

    history = Store(tmp_path / "h.db")
    names = planned(history, gate={"window_s": 1})

    def add_decision(decision):  # the host went down recording the second canary's
        if decision["device"] == names[1]:
            raise KeyboardInterrupt("the host went down")
        return Store.add_decision(history, decision)

    history.add_decision = add_decision
    with pytest.raises(RolloutInterrupted):
        Rollout(history, "r", FakeBroker(), judge=lambda c, k: GateDecision("roll back", "canaries slower")).run()
    del history.add_decision
    assert "gated" not in history.rollout("r")["body"]
    broker = FakeBroker()
    out = Rollout(history, "r", broker, judge=lambda c, k: pytest.fail("judged again")).run()
    assert out["state"] == "rolled back" and out["reason"].startswith("live gate: roll back: canaries slower")
    assert {d for d, _ in broker.sent} == set(names[:2])  # no later wave got the candidate
    for d in names[:2]:
        assert [x["reason"] for x in history.decisions(device=d, kinds=("live gate",))] == ["canaries slower"]


def test_a_gate_hold_is_stored_held_with_its_decision_in_one_write(tmp_path):
    """The hold was stored as 'running' with its decision, and 'held' only at the end of the run: a driver stopped in
    between left a running rollout (`status`: no host drives it, resume goes on) whose resume sent the next waves,
    the hold never shown. Now the rollout is held from the moment the decision is stored."""
    from edge_kit.selection.gate import GateDecision

    class Dying(FakeBroker):
        def __exit__(self, *_):
            raise KeyboardInterrupt("the host went down")

    history = Store(tmp_path / "h.db")
    planned(history, gate={"window_s": 1})
    with pytest.raises(RolloutInterrupted):
        Rollout(history, "r", Dying(), judge=lambda c, k: GateDecision("hold", "too few samples")).run()
    record = history.rollout("r")
    assert record["state"] == "held" and record["body"]["gated"]["action"] == "hold"


def test_a_gate_roll_back_tells_the_first_waves_devices_not_on_the_candidate_to_keep_their_model(tmp_path):
    """Only the converged canaries were sent back: a first-wave device offline during the window, or still fetching,
    kept the candidate's desired state and installed the rejected candidate when it came back or finished. Now
    each is told to hold the model it runs, as abort does."""
    from edge_kit.selection.gate import GateDecision

    history = Store(tmp_path / "h.db")
    names = planned(history, n=40, gate={"window_s": 1}, wave_timeout_s=0.5)
    broker = FakeBroker(silent={names[1]}, fetching={names[2]})
    out = Rollout(history, "r", broker, judge=lambda c, k: GateDecision("roll back", "canaries slower")).run()
    rows = {r["device"]: r for r in out["devices"]}
    assert out["state"] == "rolled back" and "2 device(s) of the first wave not on the candidate told to keep" in out["reason"]
    assert broker.desired[names[1]].hold and broker.desired[names[2]].hold
    assert broker.desired[names[0]].sha256 == broker.desired[names[3]].sha256 == "0" * 64
    assert rows[names[2]]["state"] == "rolled back" and rows[names[1]]["state"] == "rolling back"
    assert "told to keep the model it runs" in rows[names[1]]["error"]


def test_abort_sends_every_device_the_rollout_moved_back_and_is_safe_to_run_twice(tmp_path):
    """Before, abort only stopped sending: a canary that had converged kept the candidate (its retained desired
    state still named it), a device still fetching went on to it, and a silent device would take it when it came
    back. Now each converged device gets a new desired state naming its previous model, each device not on the
    candidate a hold (keep what it runs), every row says what was done, and a second abort sends only what
    changed since (here: the silent device turned out to have converged on the candidate before its hold)."""
    from edge_kit.selection.gate import GateDecision

    history = Store(tmp_path / "h.db")
    names = planned(history, n=40, gate={"window_s": 1}, wave_timeout_s=0.5)
    broker = FakeBroker(silent={names[1]}, fetching={names[2], names[3]})
    held = Rollout(history, "r", broker, judge=lambda c, k: GateDecision("hold", "too few samples")).run()
    assert held["state"] == "held" and [d for d, _ in broker.sent] == names[:4]
    broker.on[names[3]] = SHA  # it activated the candidate; its 'converged' report never reached the host
    out = Rollout(history, "r", broker).abort(wait_s=2)
    rows = {r["device"]: r for r in out["devices"]}
    assert out["state"] == "aborted" and history.rollout("r")["state"] == "aborted"
    assert out["reason"].endswith("2 device(s) sent back to their previous model, 2 told to keep theirs")
    assert rows[names[0]]["state"] == "rolled back" and rows[names[0]]["abort"] == "sent back to fp32 (000000000000)"
    assert broker.desired[names[0]].sha256 == "0" * 64 and broker.desired[names[0]].variant == "fp32"
    assert broker.desired[names[1]].hold and broker.desired[names[2]].hold
    assert rows[names[2]]["state"] == "rolled back" and rows[names[2]]["abort"].startswith("told to keep the model")
    assert rows[names[1]]["state"] == "rolling back" and rows[names[1]]["abort"].endswith(
        "no answer yet (it goes back when it connects; run abort again to check)")
    assert rows[names[3]]["state"] == "rolled back" and rows[names[3]]["abort"] == (
        "sent back to fp32 (000000000000) (it had converged on the candidate before the hold came)")
    assert broker.on[names[3]] == "0" * 64
    assert rows[names[4]]["state"] == "planned" and rows[names[4]]["abort"].startswith("nothing to do")
    assert out["counts"] == {"rolled back": 3, "rolling back": 1, "planned": 36, "refused": 1}
    assert history.rollout("r")["owner"] is None
    # names[1] had converged on the candidate before its hold came: it says so, and the next abort sends it back
    sent = len(broker.sent)
    rev = history.rollout_devices("r")[names[1]]["revision"]
    broker.silent.clear()
    broker.retained[names[1]] = {"device": names[1], "rollout": "r", "revision": rev, "state": "converged",
                                 "current": {"sha256": SHA}, "previous": {"sha256": "1" * 64, "variant": "int8",
                                                                           "model": "m", "bytes": 9}}
    again = Rollout(history, "r", broker).abort(wait_s=2)
    rows = {r["device"]: r for r in again["devices"]}
    assert [d for d, _ in broker.sent[sent:]] == [names[1]]  # the others are back already: left alone
    assert rows[names[1]]["state"] == "rolled back" and rows[names[1]]["abort"] == "sent back to int8 (111111111111)"
    assert rows[names[0]]["abort"] == rows[names[2]]["abort"] == "already on its previous model"
    # a rollback the device could not carry out (its previous model failed its smoke test) is tried again
    broker.fail.add(names[2])
    broker.fetching.clear()
    history.set_rollout_devices("r", [{"device": names[2], "wave": 1, "state": "converged", "revision": 1, "detail": {
        "previous": {"sha256": "2" * 64, "variant": "int8", "model": "m", "bytes": 9}}}])
    failed = {r["device"]: r for r in Rollout(history, "r", broker).abort(wait_s=2)["devices"]}[names[2]]
    assert failed["state"] == "failed" and "the rollback failed: simulated" in failed["error"]
    broker.fail.clear()
    again = {r["device"]: r for r in Rollout(history, "r", broker).abort(wait_s=2)["devices"]}[names[2]]
    assert again["state"] == "rolled back" and again["abort"] == "sent back to int8 (222222222222)"
    assert broker.desired[names[2]].sha256 == "2" * 64


def test_a_rolled_back_rows_seconds_time_the_rollback_not_the_candidate(tmp_path):
    """Found walking `rollout abort` on a stopped rollout: a device told to hold showed 31.5 s, the time from the
    candidate's desired state to its last failed try half a minute before the abort, though the hold took 3 s."""
    history = Store(tmp_path / "h.db")
    names = planned(history, n=10, max_failed=0.1)
    broker = FakeBroker(fail={names[1]})
    assert Rollout(history, "r", broker).run()["state"] == "stopped"  # names[0] converged, names[1] failed
    time.sleep(0.6)  # the operator looks at it before aborting
    out = Rollout(history, "r", broker).abort(wait_s=2)
    rows = {r["device"]: r for r in out["devices"]}
    assert rows[names[0]]["state"] == "rolled back" and rows[names[0]]["abort"].startswith("sent back to fp32")
    assert rows[names[1]]["state"] == "rolled back" and rows[names[1]]["abort"].startswith("told to keep the model")
    for name in names[:2]:
        assert rows[name]["seconds"] is not None and rows[name]["seconds"] < 0.5, rows[name]


def test_abort_waits_for_a_live_driver_and_says_when_it_did_not_stop(tmp_path):
    history = Store(tmp_path / "h.db")
    planned(history)
    assert history.claim_rollout("r", "other-host:1", stale_s=60) is None
    with pytest.raises(RolloutError, match=r"other-host:1 still drives it 0 s after it was asked to stop; run "
                                           r"`edgekit rollout abort r` again"):
        Rollout(history, "r", FakeBroker()).abort(driver_wait_s=0.3)
    assert history.rollout("r")["state"] == "aborting"  # the driver's next heartbeat stops it
    history.release_rollout("r", "other-host:1")
    broker = FakeBroker()
    broker.rejected, broker.rejected_count = ["d0: forged"], 7  # the client keeps the newest refusals, counts all
    aborted = Rollout(history, "r", broker).abort(wait_s=0)
    assert aborted["state"] == "aborted"
    assert aborted["refused_messages"] == 7 and aborted["refused_examples"] == ["d0: forged"]  # abort counted 0 before
    assert aborted["signature"] == "signed by key 0123456789abcdef (trusted)"  # --json had it only on stderr, as text
    history.save_rollout("d", "done", history.rollout("r")["body"])
    with pytest.raises(RolloutError, match="rollout d is done already; nothing to abort"):
        Rollout(history, "d", FakeBroker()).abort()


@pytest.mark.parametrize("options, error", [
    (["--store", "ftp://127.0.0.1/s"], "--store ftp://127.0.0.1/s: devices fetch over HTTP(S); give the store's http:// "
                                       "or https:// URL"),
    (["--store", "http://127.0.0.1:1", "--variant", "fp16"], "rollout r: no device gets an artifact: a: variant fp16 "
                                                             "is not built for profile rpi4 (built: int8)")])
def test_a_store_url_or_variant_that_cannot_be_rolled_out_is_bad_input_exit_2_like_deploy(tmp_path, run_cli, options, error):
    """`rollout start --store ftp://...` and `--variant <not built>` exited 4 (a rollout that failed) where
    `deploy --variant <not built>` exits 2 (bad input); nothing is recorded or sent in either case."""
    fleet_file, folder = one_artifact_plan(tmp_path, devices="a")
    code, out, err = run_cli("rollout", "start", "--fleet", fleet_file, folder, *options, "--id", "r", "--json")
    assert code == 2, err
    assert json.loads(out)["error"] == error and err.count("\n") == 1
    assert Store(tmp_path / "edgekit-history.db").rollout("r") is None


def test_a_variant_no_device_has_is_one_short_line_grouped_by_reason_however_large_the_fleet(tmp_path, run_cli):
    """Found walking a simulated fleet with `--variant nope`: the line repeated the same reason once per device for
    the first three devices and said nothing of the others (a fleet of 1,000 read as if it had 3)."""
    fleet_file, folder = one_artifact_plan(tmp_path, devices="abcdefg")
    code, out, err = run_cli("rollout", "start", "--fleet", fleet_file, folder, "--store", "http://127.0.0.1:1",
                             "--variant", "fp16", "--id", "r", "--json")
    assert code == 2 and err.count("\n") == 1
    assert json.loads(out)["error"] == ("rollout r: no device gets an artifact: a, b, c and 4 more: variant fp16 is not "
                                        "built for profile rpi4 (built: int8)")
    refused = {f"d{i}": f"d{i}: why {i % 5}" for i in range(12)}
    assert _by_reason(refused, names=2) == ("d0, d5 and 1 more: why 0; d1, d6 and 1 more: why 1; d2, d7: why 2; "
                                            "and 2 more reason(s) for 4 more device(s)")


@pytest.mark.parametrize("state, advice", [("done", "give another --id"),
                                           ("stopped", "`edgekit rollout resume r`, or give another --id")])
def test_starting_an_existing_rollout_id_sends_the_user_to_resume_only_when_it_can_go_on(tmp_path, run_cli, state, advice):
    """`rollout start --id r1` on a finished r1 said "`edgekit rollout resume r1`", which answered "r1 is done;
    start a new one"."""
    fleet_file, folder = one_artifact_plan(tmp_path, devices="a")
    Store(tmp_path / "edgekit-history.db").save_rollout("r", state, {"id": "r", "targets": {}})
    code, out, err = run_cli("rollout", "start", "--fleet", fleet_file, folder, "--store", "http://127.0.0.1:1",
                             "--id", "r", "--json")
    assert code == 4 and json.loads(out)["error"] == f"rollout r exists already ({state}); {advice}"


def test_a_rollback_to_a_model_an_older_agent_named_outside_the_rule_names_the_plans_model(tmp_path):
    """A device reports its previous model as an older agent installed it, any printable name ('my model', as deploy
    took before the one model-name rule); a rollback naming it would be refused by every agent now. The name is a
    label (the device has that sha256 installed), so the rollout's own model name goes instead."""
    from edge_kit.selection.gate import GateDecision
    from edgekit_protocol.desired import parse_desired

    class Older(FakeBroker):
        def __call__(self, callback):
            def older(msg):  # the previous model as an older agent installed it
                callback({**msg, "previous": {**msg["previous"], "model": "my model"}} if msg.get("previous") else msg)
            self.cb = older
            return self

    history = Store(tmp_path / "h.db")
    names = planned(history, n=20, gate={"window_s": 1}, wave_timeout_s=0.5)
    broker = Older()
    held = Rollout(history, "r", broker, judge=lambda c, k: GateDecision("hold", "too few samples")).run()
    canaries = [d for d, _ in broker.sent]
    assert held["state"] == "held" and canaries == names[:2]
    out = Rollout(history, "r", broker).abort(wait_s=2)
    assert out["counts"]["rolled back"] == 2
    for name in canaries:
        desired = broker.desired[name]
        assert (desired.sha256, desired.model) == ("0" * 64, "m")
        assert parse_desired({"msg_id": "x", **desired.body()}).model == "m"  # what the device takes


def test_the_rollout_table_says_what_each_device_did_a_converged_device_that_fetched_nothing_included(capsys):
    from edge_kit.cli.rollout import _print

    def row(device, state, **kw):
        return {"device": device, "wave": 1, "state": state, "variant": "int8", "error": None, "seconds": 0.2,
                "download": None, "abort": None, **kw}

    _print({"id": "r", "state": "done", "reason": None, "gate": None, "counts": {"converged": 3}, "refused_messages": 0,
            "devices": [row("a", "converged", download={"bytes": 2_000_000, "resumed": True}),
                        row("b", "converged"),  # its agent found the model installed: it reports no download
                        row("c", "failed", error="fetch: TLS failed"), row("d", "fetching")]})
    lines = {ln.split()[0]: " ".join(ln.split()) for ln in capsys.readouterr().out.splitlines() if ln.strip()}
    assert "fetched 2.00 MB (resumed)" in lines["a"]
    assert "nothing fetched: the model was on the device already" in lines["b"]
    assert "fetch: TLS failed" in lines["c"] and "nothing fetched" not in lines["d"] + lines["c"]


def test_the_rollout_table_keeps_a_long_url_in_an_error_whole(capsys, monkeypatch):
    """Found walking a store that went down mid-rollout, output to a file (120 columns): the device's error showed
    'http://127.0.0.1:52869/sha256/43f1af8a65adb90fd053ba11de7…', the object's name cut off."""
    from edge_kit.cli.app import out
    from edge_kit.cli.rollout import _print

    monkeypatch.setattr(out, "width", 120)  # what `edgekit` prints to a pipe or a file

    url = f"http://127.0.0.1:52869/sha256/{'43f1af8a65ad' * 5}abcd"
    error = f"{url}: the store does not answer (connection refused); check the store URL and that its server runs"
    _print({"id": "r", "state": "stopped", "reason": None, "gate": None, "counts": {"failed": 1}, "refused_messages": 0,
            "devices": [{"device": "jetson-orin-nano-2", "wave": 1, "state": "failed", "variant": "fp16", "error": error,
                         "seconds": 7.7, "download": None, "abort": None}]})
    text = capsys.readouterr().out
    assert "…" not in text and url[-12:] in text  # folded over lines, the end of the hash included


def test_rollout_list_says_when_there_is_none_and_when_older_ones_were_left_out(tmp_path, run_cli):
    """An empty history printed a table of headers alone, and past 20 rollouts the older ones were left out
    without a word."""
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: sim\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                          "devices:\n  - {name: d1, host: 127.0.0.1}\n")
    history = tmp_path / "edgekit-history.db"
    code, out, err = run_cli("rollout", "list", "--fleet", fleet_file)
    assert code == 0 and " ".join(out.split()) == (f"no rollout in {history} yet (`edgekit rollout start` makes one)")
    with Store(history) as db:
        for i in range(3):
            db.save_rollout(f"r{i}", "done", {"targets": {"d1": {}}, "variant": "int8"})
    code, out, err = run_cli("rollout", "list", "--fleet", fleet_file, "--limit", "2")
    text = " ".join(out.split())
    assert code == 0 and text.endswith(f"the 2 newest; older ones are in {history} (--limit N lists more)"), out
    assert text.count(" done ") == 2
    code, out, err = run_cli("rollout", "list", "--fleet", fleet_file)
    assert "older ones" not in out and out.count(" done ") == 3
    code, out, err = run_cli("rollout", "list", "--fleet", fleet_file, "--limit", "2", "--json")
    assert len(json.loads(out)) == 2


def test_a_revoked_device_is_refused_by_the_plan_and_sent_no_desired_state(tmp_path):
    """`rollout start` planned a revoked device like any other: its retained desired state (the store's URL, the
    model) went to the broker for a device that may be in a thief's hands, and the rollout then waited for reports
    every receiver refuses, until the wave timed out and counted it as failed."""
    from device_agents.identity import Signer
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.loop.waves import plan_rollout

    fleet_file, folder = one_artifact_plan(tmp_path, devices="ab")
    fleet = load_fleet(fleet_file)
    keys = fleet.key_store()
    keys.register_many({"a": Signer.generate().public, "b": Signer.generate().public})
    keys.revoke("b", "stolen")
    plan = plan_rollout("r", folder, fleet, fleet.devices, "http://s", None, RolloutSettings())
    assert set(plan["targets"]) == {"a"} and plan["order"] == ["a"]
    assert plan["refused"]["b"].startswith("b: its key was revoked on ")
    assert plan["refused"]["b"].endswith("; it gets no desired state (`edgekit deploy --new-key` brings it back)")


def test_a_device_revoked_after_the_plan_is_not_sent_again_on_resume_and_does_not_hold_the_rollout(tmp_path):
    """A device revoked while its rollout ran (or stopped with its host) was sent its desired state again on resume
    and waited for: its reports are refused, so it timed out as failed and could stop the rollout. It now ends `left
    the fleet` with the revocation's line, not sent (again), not counted as sent by the failure threshold."""
    history = Store(tmp_path / "h.db")
    names = planned(history, max_failed=0.5)
    broker = FakeBroker(crash_after=3)
    with pytest.raises(RolloutInterrupted):
        Rollout(history, "r", broker).run()
    assert names[2] in {d for d, _ in broker.sent} and names[15] not in {d for d, _ in broker.sent}
    broker.crash_after = None
    revoked = {n: f"{n}: its key was revoked on 2026-11-30 10:00 UTC; it gets no desired state" for n in (names[2], names[15])}
    out = Rollout(history, "r", broker, members=set(names), revoked=revoked).run()
    assert out["state"] == "done" and out["counts"] == {"converged": 18, "left the fleet": 2, "refused": 1}
    assert not set(revoked) & {d for d, _ in broker.sent[3:]}
    rows = {r["device"]: r for r in out["devices"]}
    assert rows[names[15]]["error"] == f"{revoked[names[15]]}; not sent"
    assert rows[names[2]]["error"] == f"{revoked[names[2]]}; not sent again"


class CountingRows(dict):
    """A rollout's rows that count how often they are looked up and walked."""

    lookups = walks = 0

    def __getitem__(self, key):
        self.lookups += 1
        return super().__getitem__(key)

    def values(self):
        self.walks += 1
        return super().values()


def test_the_run_loop_counts_states_as_they_change_not_over_every_row_at_each_pass(tmp_path):
    """Each pass of the run loop (every 2 ms while sending) counted the states over every row (the failure
    threshold) and walked the wave's devices (has each answered?): CPU that grew with the square of the fleet, the
    largest share of the host's CPU for 10,000 devices. The counts are kept as states change now: the rows are walked
    a few times a wave, looked up a bounded number of times a device; the threshold and the wave's end hold as before."""
    history = Store(tmp_path / "h.db")
    n = 2000
    names = planned(history, n=n, waves=(0.5, 1.0), rate_per_s=20_000.0, wave_timeout_s=1.0, max_failed=0.5)
    broker = FakeBroker(fail=set(names[1::100]), fetching={names[n // 2 - 1]})  # 1 % fail; one device never finishes
    rollout = Rollout(history, "r", broker)
    rollout.rows = rows = CountingRows()
    out = rollout.run()
    assert out["state"] == "done" and out["counts"] == {"converged": n - 21, "failed": 20, "fetching": 1, "refused": 1}
    assert rows.walks <= 10, rows.walks
    assert rows.lookups <= 15 * n, rows.lookups  # about 11 a device; 35 when every pass walked the wave
    # a failure over the threshold stops it at the pass that took the report, the rest never sent: a pass sends 500
    # at most (after a stall of this loaded machine, all it fell behind by), and 1 of 500 is over 0.1 %
    history = Store(tmp_path / "h2.db")
    names = planned(history, n=n, waves=(0.5, 1.0), rate_per_s=20_000.0, wave_timeout_s=1.0, max_failed=0.001)
    broker = FakeBroker(fail={names[5]})
    out = Rollout(history, "r", broker).run()
    assert out["state"] == "stopped" and out["counts"]["failed"] == 1 and len(broker.sent) <= 500, len(broker.sent)
