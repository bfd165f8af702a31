"""Canary rollouts: a share of the devices goes first, is benchmarked and judged, then the rest.

``canary`` of each profile's devices (rounded up, at least one per profile, in fleet order) are
deployed first with a short health benchmark of the activated model. A canary fails when its deploy failed or its benchmark breaks
the device's constraints. When more than ``max_failed`` of the canaries failed, every canary this
deploy switched is rolled back and the other devices are left as they were; otherwise the rest
is deployed. The decision is :func:`judge_canaries`, pure and unit-tested; this module wires it
to the fleet (deploy, rollback) and the selection layer (constraints).

With a :class:`LiveGate`, canaries that pass are then judged on production figures: for a window,
their serving API answers the devices' real traffic (and, with a shadow share, runs the fp32
reference beside the candidate), and the control devices of the same profiles keep the current
model; :func:`edge_kit.selection.gate.judge_live` then promotes (the rest is deployed), holds (the
canaries keep the candidate, the rest waits) or rolls back. Each decision is recorded with its
numbers (``record``: the history's decisions).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from edge_kit.errors import EdgeKitError
from edge_kit.fleet.commands import FleetClient
from edge_kit.fleet.deploy import (
    DeployOptions,
    DeviceResult,
    GroupResult,
    check_built_for,
    deploy,
    roll_back,
)
from edge_kit.fleet.inventory import Device, Fleet
from edge_kit.manifest import Manifest, read_manifest
from edge_kit.profiles import load_profile
from edge_kit.selection.constraints import (
    Measured,
    broken_text,
    effective_constraints,
    violations,
)
from edge_kit.selection.gate import GateDecision, LiveEvidence, judge_live
from edgekit_protocol.messages import field_at, in_range

CANARY_BENCH = {"min_runs": 50, "min_seconds": 0.0, "warmup": 5}  # enough to judge it against its constraints


@dataclass(frozen=True)
class LiveGate:
    """How a rollout judges its canaries on live traffic (see :mod:`edge_kit.selection.gate`)."""

    window_s: float = 60.0  # how long to collect at most
    min_samples: int = 200  # live requests each canary (and the pooled controls) must have answered
    alpha: float = 0.01
    min_slowdown: float = 0.10
    shadow_share: float = 0.0  # > 0: the canaries also run the reference variant on this share of requests
    reference: str = "fp32"  # that variant: the manifest's reference_id (onnx-fp32 where onnx2tf could not convert)
    min_snr_db: float | None = None  # the floor on the canaries' live fidelity against the reference


@dataclass(frozen=True)
class CanaryVerdict:
    """What the canaries say: go on, or stop and put the switched canaries back."""

    proceed: bool
    failed: tuple[str, ...]  # canaries that failed their deploy or broke their constraints
    roll_back: tuple[str, ...]  # canaries to put back on their previous model (empty when proceeding)
    reason: str | None = None


def judge_canaries(results: list[DeviceResult], broken: dict[str, str], max_failed: float) -> CanaryVerdict:
    """Decide a canary wave from its results and the constraints each canary broke.

    ``broken`` maps a canary to the constraints its health benchmark broke (absent: none).

    Returns:
        ``proceed`` when at most ``max_failed`` (a share, 0-1) of the canaries failed; otherwise the
        canaries this deploy switched (and did not already roll back) to roll back, and why.
    """
    failed = tuple(r.device for r in results if not r.ok or r.device in broken)
    if not results or len(failed) / len(results) <= max_failed:
        return CanaryVerdict(True, failed, ())
    why = (f"{len(failed)} of {len(results)} canaries failed (more than {max_failed:.0%}); "
           "the canaries were rolled back and the other devices left as they were")
    return CanaryVerdict(False, failed, tuple(r.device for r in results if r.switched), why)


def broken_constraints(manifest: Manifest, dev: Device, result: DeviceResult) -> str | None:
    """Return the constraints the device's health benchmark broke, each with the figure that broke it and where
    that came from (``p90 <= 20 ms (31.2 ms p90, the device's clock)``; the accuracy bound a share of the manifest's
    reference, fp32 or onnx-fp32), or None when it broke none."""
    if result.health is None:
        return None
    c = effective_constraints(load_profile(dev.profile).constraints, dev.constraints)
    art = manifest.artifact(result.variant or "")
    fp32 = manifest.reference()
    m = Measured.from_record(result.health, art.bytes if art and art.bytes else 0)
    broken = violations(c, m, fp32.accuracy.value if fp32 and fp32.accuracy else None)
    return broken_text(c, m, broken, reference_id=manifest.reference_id) or None


def pick_canaries(devices: list[Device], share: float) -> list[Device]:
    """Return the canaries of ``devices``: of each profile, its first ``share`` of devices in fleet order
    (rounded up, at least one), so that every profile the rollout reaches has a canary; in fleet order."""
    by_profile: dict[str, list[Device]] = {}
    for d in devices:
        by_profile.setdefault(d.profile, []).append(d)
    chosen = {id(d) for group in by_profile.values() for d in group[:max(1, math.ceil(len(group) * share))]}
    return [d for d in devices if id(d) in chosen]


LIVE_SAMPLES = 2048  # service times asked of each device per poll (its newest)
MAX_CONTROLS = 200  # control devices polled at most: a device-level test gains little past this, a fleet's poll a lot


def pick_controls(names: list[str], limit: int = MAX_CONTROLS) -> list[str]:
    """Return at most ``limit`` of ``names`` as the gate's control devices: a stable spread sample (by the
    sha256 of each name), in that order; all of them when there are no more than ``limit``."""
    if len(names) <= limit:
        return list(names)
    return sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())[:limit]


def collect_live(fleet: Fleet, canaries: list[str], controls: list[str], gate: LiveGate,
                 progress: Callable[[str, str], None], candidates: dict[str, str] | None = None,
                 serving: set[str] | None = None, strays: dict[str, str] | None = None
                 ) -> tuple[list[LiveEvidence], list[LiveEvidence]]:
    """Poll the devices' live figures until every one has ``min_samples`` answered since the gate
    started (what the health benchmark and the first requests after the switch did is not counted),
    or the window ends.

    A device that does not answer (offline, its agent stopped, a refusal) is named in ``progress`` and
    never stops the gate: a canary is asked again next round (it keeps what it gave, and with too few
    samples the gate holds); a control is dropped for the rest of the window (the others stand in).
    A device whose served model's counters began again (its agent restarted, or it swapped models: a new
    ``since`` or model) keeps what it gave and counts all its requests since. ``candidates`` (device -> the sha256 of
    the candidate it gets): a canary's figures count only while it serves its own, and a control serving any of them
    is dropped (it is no control); each is named in ``progress``, and added to ``serving`` when given; ``strays``, when
    given, holds each canary last seen serving another model than its candidate, with that model (``no model``).

    Returns:
        The canaries' and the controls' evidence, in the order given (empty samples where none came), each
        with its profile from the fleet file (the gate compares devices within their profile).

    Raises:
        AgentError: the fleet's broker cannot be reached.
    """
    profile = {d.name: d.profile for d in fleet.devices} if fleet is not None else {}  # compared within a profile
    evidence: dict[str, LiveEvidence] = {n: LiveEvidence(n, [], profile=profile.get(n)) for n in canaries + controls}
    # per device: its served model and counters' start (sha256, since), the requests answered at the gate's start (0
    # for counters begun since), and the last count seen; with what it gave before its counters began again
    start: dict[str, tuple[Any, float, float]] = {}
    banked: dict[str, list[float]] = {n: [] for n in canaries + controls}
    wanted = set((candidates or {}).values())
    dropped: set[str] = set()  # controls that did not answer, or serve a candidate
    deadline = time.monotonic() + gate.window_s
    with FleetClient.of(fleet) as client:
        if gate.shadow_share > 0:
            for name in canaries:
                try:
                    client.request(name, "shadow", {"variant": gate.reference, "share": gate.shadow_share}, timeout=60,
                                   expire=True)
                except EdgeKitError as exc:  # e.g. the candidate is fp32 itself: no comparison from this canary
                    progress(name, f"no shadow run: {exc}")
        first_round = True
        while True:
            for name in canaries + [c for c in controls if c not in dropped]:
                if not first_round and time.monotonic() >= deadline:
                    break  # silent devices cost their timeout each: the window bounds the round too
                try:
                    answer = client.request(name, "state", {"live": LIVE_SAMPLES}, timeout=30, expire=True)
                except EdgeKitError as exc:  # one silent device never stops the gate
                    if name in controls:
                        dropped.add(name)
                    progress(name, f"no live figures ({exc}); " + ("dropped from the controls" if name in controls
                                                                   else "asked again next round"))
                    continue
                live = field_at(answer, "result", "live")
                answered = _number(field_at(live, "requests")) or 0  # a device's word: numbers only, any shape
                model = field_at(live, "model", "sha256")
                model = model if isinstance(model, str) else None  # a device's word: a name, or nothing served
                if name in controls and model in wanted:
                    dropped.add(name)
                    if serving is not None:
                        serving.add(name)
                    progress(name, f"serves a candidate ({model[:12]}); dropped from the controls")
                    continue
                epoch = (model, field_at(live, "since"))
                if name in start and (epoch != start[name][0] or answered < start[name][2]):  # its counters began again
                    banked[name] = list(evidence[name].samples_ms)
                    start[name] = (epoch, 0, answered)
                base = start.setdefault(name, (epoch, answered, answered))[1]
                start[name] = (epoch, base, answered)
                if name in canaries and name in (candidates or {}) and model != candidates[name]:  # not its candidate
                    progress(name, f"serves {(model or 'no model')[:12]}, not its candidate: its figures are not counted")
                    if strays is not None:
                        strays[name] = (model or "no model")[:12]
                    continue
                if strays is not None:
                    strays.pop(name, None)
                new = int(answered - base)
                samples = field_at(live, "latency_samples_ms")
                # the newest answered since the gate started, never more than were asked for (a device's word)
                samples = samples[-min(new, LIVE_SAMPLES):] if isinstance(samples, list) and new > 0 else []
                clock = field_at(live, "clock")
                evidence[name] = LiveEvidence(name, banked[name] + [s for s in samples if _number(s) is not None],
                                              _number(field_at(live, "shadow", "fidelity", "snr_db")), profile.get(name),
                                              clock if isinstance(clock, str) else None)
            enough = all(len(evidence[n].samples_ms) >= gate.min_samples for n in canaries) and \
                sum(len(evidence[n].samples_ms) for n in controls if n not in dropped) >= gate.min_samples
            if enough and (gate.shadow_share <= 0 or all(evidence[n].shadow_snr_db is not None for n in canaries)):
                break
            if time.monotonic() >= deadline:
                break
            first_round = False
            progress("gate", f"collecting live figures ({int(deadline - time.monotonic())} s left)")
            time.sleep(1.0)
    return [evidence[n] for n in canaries], [evidence[n] for n in controls if n not in dropped]


def live_decision(fleet: Fleet, canaries: list[str], controls: list[str], gate: LiveGate,
                  progress: Callable[[str, str], None], candidates: dict[str, str] | None = None) -> GateDecision:
    """Return the live gate's decision on ``canaries`` against ``controls``: their figures collected by
    :func:`collect_live` and judged by :func:`~edge_kit.selection.gate.judge_live` with ``gate``'s settings; a hold
    that says so when every control left was dropped for serving a candidate already (the candidate is what the
    fleet runs: nothing to compare it with, not too little traffic).

    Raises:
        AgentError: the fleet's broker cannot be reached.
    """
    serving: set[str] = set()
    strays: dict[str, str] = {}
    cans, ctrls = collect_live(fleet, canaries, controls, gate, progress, candidates, serving, strays)
    if serving and not ctrls:
        named = sorted(serving)
        return GateDecision("hold", f"every control device that answered serves the candidate already ("
                                    f"{', '.join(named[:5])}{f' and {len(named) - 5} more' if len(named) > 5 else ''}): "
                                    "none runs the current model to compare it with", settings={
                                        "alpha": gate.alpha, "min_samples": gate.min_samples,
                                        "min_slowdown": gate.min_slowdown, "min_snr_db": gate.min_snr_db})
    decision = judge_live(cans, ctrls, alpha=gate.alpha, min_samples=gate.min_samples, min_slowdown=gate.min_slowdown,
                          min_snr_db=gate.min_snr_db)
    if decision.action == "hold" and strays:  # why its traffic fell short: not "too little traffic" alone
        off = ", ".join(f"{name} serves {model}" for name, model in sorted(strays.items())[:5])
        decision = replace(decision, reason=f"not on their candidate at the end of the window ({off}"
                                            f"{f' and {len(strays) - 5} more' if len(strays) > 5 else ''}: an agent "
                                            f"went back to its previous model?): their figures are not counted; "
                                            + decision.reason)
    return decision


def _number(value: Any) -> float | None:
    """Return ``value`` when it is a number (not a bool) within +-1e12 (:func:`~edgekit_protocol.messages.in_range`:
    finite, and no integer too large for a float), else None."""
    return value if in_range(value) else None


def rollout(fleet: Fleet, devices: list[Device], opts: DeployOptions, canary: float, max_failed: float = 0.0,
            progress: Callable[[str, str], None] | None = None, gate: LiveGate | None = None,
            record: Callable[[dict[str, Any]], None] | None = None) -> GroupResult:
    """Deploy to a ``canary`` share of ``devices`` first, judge them, then to the rest or to none.

    With ``gate``, canaries that pass their health benchmark are also judged on live traffic against
    the control devices of the same profiles; ``record`` receives each canary's gate decision.

    Returns:
        One result per device in the order given; ``stopped`` says why when the rest was not deployed.

    If the gate is interrupted (Ctrl-C, an error while collecting), the canaries this deploy switched are
    put back on their previous model before the interruption goes on: none is left on an unvetted candidate.

    Raises:
        InputError: the artifact folder has no (valid) manifest, or its signature fails the fleet's ``artifact_keys``.
        NotBuiltFor: it was not compiled for a device's profile (checked for every device before the canaries).
        AgentError: the fleet's broker cannot be reached (during the gate: after the canaries were rolled back).
        HistoryError: ``record`` failed; the gate's decision was acted on for the canaries first (rolled
            back, or kept on hold), and the rest was not deployed.
    """
    progress = progress or (lambda _d, _m: None)
    order = {d.name: i for i, d in enumerate(devices)}
    canaries = pick_canaries(devices, canary)
    first_ids = {id(d) for d in canaries}
    rest = [d for d in devices if id(d) not in first_ids]
    # read and checked once: the rest gets the release the canaries were judged on, not a manifest replaced since
    manifest = read_manifest(opts.artifacts, fleet.artifact_trust())
    check_built_for(opts.artifacts, devices, (), manifest)  # the rest too: never canaries first, then a refusal
    canary_group = deploy(fleet, canaries, replace(opts, health_bench=dict(CANARY_BENCH)), progress, manifest)
    first, signature = canary_group.results, canary_group.signature
    by_name = {d.name: d for d in canaries}
    broken = {r.device: b for r in first if r.ok and (b := broken_constraints(manifest, by_name[r.device], r))}
    for r in first:
        if r.device in broken:
            r.status, r.reason = "failed", f"{r.device}: canary breaks its constraints ({broken[r.device]})"
    verdict = judge_canaries(first, broken, max_failed)
    if verdict.proceed and gate is not None:
        switched = [d for d in canaries if any(r.device == d.name and r.switched for r in first)]
        try:
            decision, entries = _gate(fleet, canaries, rest, first, gate, progress)
        except BaseException as exc:  # Ctrl-C, the broker gone: no canary stays on a candidate nobody vetted
            roll_back(fleet, switched, opts, first, f"rolled back: the live gate was interrupted ({type(exc).__name__}"
                                                    f"{': ' + str(exc).splitlines()[0] if str(exc) else ''})")
            raise
        try:
            if decision.action == "roll back":  # every canary judged, also one a run before had switched (a hold, rerun)
                judged = [d for d in canaries if d.name in _on_candidate(first)]
                roll_back(fleet, judged, opts, first, f"rolled back by the live gate: {decision.reason}")
        finally:
            # Recorded once acted on (or cut short acting on it: Ctrl-C during the rollbacks), before the rest is
            # deployed: a history that fails (HistoryError) then stops the command with the canaries already rolled
            # back and the rest untouched, never half-way.
            for entry in entries if record is not None else ():
                record(entry)
        if decision.action != "promote":
            held = "held by the live gate (the canaries keep the candidate)" if decision.action == "hold" else \
                "rollout stopped by the live gate"
            skipped = [DeviceResult(d.name, "skipped", reason=held) for d in rest]
            return GroupResult(sorted(first + skipped, key=lambda r: order[r.device]),
                               stopped=f"live gate: {decision.action}: {decision.reason}", signature=signature)
    if verdict.proceed:
        return GroupResult(sorted(first + deploy(fleet, rest, opts, progress, manifest).results, key=lambda r: order[r.device]),
                           signature=signature)
    roll_back(fleet, [by_name[d] for d in verdict.roll_back], opts, first, "rolled back: the canary rollout stopped")
    skipped = [DeviceResult(d.name, "skipped", reason="rollout stopped after the canaries") for d in rest]
    return GroupResult(sorted(first + skipped, key=lambda r: order[r.device]), stopped=verdict.reason,
                       signature=signature)


def _on_candidate(results: list[DeviceResult]) -> set[str]:
    """Return the canaries of ``results`` that run the candidate: deployed (switched now, or on it already: a run
    after a hold) and not rolled back; a device the deploy left out (a revoked key) runs none of it."""
    return {r.device for r in results if r.ok and r.variant is not None and not r.rolled_back}


def _gate(fleet: Fleet, canaries: list[Device], rest: list[Device], first: list[DeviceResult], gate: LiveGate,
          progress: Callable[[str, str], None]) -> tuple[GateDecision, list[dict[str, Any]]]:
    """Judge the canaries that passed on live traffic against the rest of their profiles; return the
    decision and the history entries that record it (one per canary judged)."""
    ok = [d.name for d in canaries if d.name in _on_candidate(first)]
    profiles = {d.profile for d in canaries if d.name in ok}
    controls = pick_controls([d.name for d in rest if d.profile in profiles])
    if not controls:
        decision = GateDecision("hold", f"no control device on profile(s) {', '.join(sorted(profiles)) or '-'} "
                                        "still runs the current model to compare with")
    else:
        decision = live_decision(fleet, ok, controls, gate, progress,
                                 {r.device: r.sha256 for r in first if r.device in ok and r.sha256})
    return decision, [{"device": r.device, "kind": "live gate", "chosen": r.variant, "current": None,
                       "feasible": decision.action == "promote", "switch": decision.action == "promote",
                       "reason": decision.reason, "gate": {**decision.as_dict(), "controls": controls}}
                      for r in first if r.device in ok]
