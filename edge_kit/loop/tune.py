"""`edgekit tune`: measure, select, activate, verify; repeat until nothing changes.

1. Deploy: every candidate variant onto each device (skipped where already there), agent current.
2. Measure: every candidate without a measurement from that device is benchmarked there (commands
   go out to all devices at once; each agent runs its own one at a time). Devices that do not
   answer in time are listed with what they did not answer, and left out of this round.
3. Select with :func:`edge_kit.selection.policy.choose`; every decision is stored with its reasons.
4. Activate where the choice differs, through the deploy path (safe activation, health check with a
   fresh benchmark of the activated variant, rollback when it fails); the fresh record is stored and
   the next round decides again with it.

Stops when a round switches nothing, or after ``rounds``; then, when the last round switched, one
more decision on the health benchmarks of those switches is recorded (``verify``) and what it would
still switch is listed as ``pending``, not switched. Measurements persist in the history store, so a
second run with an unchanged fleet measures nothing new and switches nothing.

With a budget (``tune --budget N``, benchmark runs or device-seconds), step 2 measures only the pairs
:func:`edge_kit.selection.fleetmodel.plan_measurements` plans (a sample per profile, then where a
device's choice is uncertain), planning again after each batch until the plan is empty or the
budget is spent; step 3 decides with the fleet model (figures measured on the device, else inferred
from its profile, each marked); step 4 is unchanged: a device is switched only with a health
benchmark of the variant it switches to, stored, and the next round plans with it; the ``verify``
decision after the last round is the same as without a budget. Decisions are stored with ``kind: "fleet
selection"``, their flags, confidence, inferred figures and drift.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_kit.errors import HistoryRecordError
from edge_kit.fleet.commands import FleetClient
from edge_kit.fleet.deploy import (
    DeployOptions,
    GroupResult,
    candidates_for,
    deploy,
    device_needs,
    reported_runtimes,
    runtime_refusals,
)
from edge_kit.fleet.inventory import Device, Fleet
from edge_kit.fleet.keys import DeviceRevoked
from edge_kit.manifest import Manifest, read_manifest
from edge_kit.profiles import load_profile
from edge_kit.selection import DEFAULT_MARGIN
from edge_kit.selection.constraints import Measured, effective_constraints
from edge_kit.selection.fleetmodel import (
    KIND as FLEET_KIND,
)
from edge_kit.selection.fleetmodel import (
    FleetSpec,
    Measurements,
    Settings,
    decisions_of,
    plan_measurements,
    rows_from_records,
)
from edge_kit.selection.policy import (
    Candidate,
    Decision,
    Request,
    choose_all,
    infeasible,
)
from edge_kit.telemetry.report import flagged_devices
from edge_kit.telemetry.store import SELECTION_KIND, HistoryStore


@dataclass
class TuneOptions:
    artifacts: Path
    rounds: int = 2
    margin: float = DEFAULT_MARGIN
    bench: dict[str, Any] = field(default_factory=lambda: {"min_runs": 200, "min_seconds": 2.0})
    timeout: float = 300.0  # per round, for all measurements to come back
    parallel: int = 8
    trust_new_hosts: bool = False
    budget: float | None = None  # None: measure every candidate on every device (no planning)
    budget_unit: str = "runs"  # "runs" (benchmark runs) or "seconds" (device-seconds of benchmarking)
    plans_per_round: int = 4  # planning batches per round at most


@dataclass
class TuneReport:
    deploy: GroupResult
    rounds: list[dict[str, Any]] = field(default_factory=list)  # per round: measured, decisions, switched, silent
    final: dict[str, Decision] = field(default_factory=dict)
    silent: dict[str, list[str]] = field(default_factory=dict)  # device -> variants it did not answer for
    # device -> its records the history refused for what they hold (kept as invalid, not stored): measurements,
    # health benchmarks, statuses, decisions
    refused: dict[str, list[str]] = field(default_factory=dict)
    budget: dict[str, Any] | None = None  # with a budget: spent, left, unit, messages, health benchmarks
    metric: str | None = None  # the accuracy figure's metric, as the verified manifest's eval set names it

    @property
    def switched(self) -> list[str]:
        """Return the devices switched to another variant, one entry per switch, in round order."""
        return [d for r in self.rounds for d in r["switched"]]

    @property
    def activation_failed(self) -> dict[str, str]:
        """Return the devices whose switch (a round's activation with its health benchmark) failed, each with why
        (the deploy's reason; the newest round's when several failed), in round order: they run what they ran."""
        failed: dict[str, str] = {}
        for r in self.rounds:
            for row in (r.get("activation") or {}).get("devices", []):
                if row.get("status") == "failed":
                    failed[row["device"]] = row.get("reason") or "failed"
        return failed

    def as_dict(self) -> dict[str, Any]:
        """Return the report as plain data (for ``--json``): ``activation_failed`` (:attr:`activation_failed`),
        ``infeasible`` maps each device left on a variant that
        meets not every constraint to the bounds it breaks (:func:`~edge_kit.selection.policy.infeasible`);
        ``budget`` only when the tune had one."""
        out = {"deploy": self.deploy.as_dict(), "rounds": self.rounds, "silent": self.silent, "refused": self.refused,
               "final": {k: v.as_dict() for k, v in self.final.items()}, "infeasible": infeasible(self.final),
               "activation_failed": self.activation_failed}
        if self.budget is not None:
            out["budget"] = self.budget
        return out


def runtime_limits(manifest: Manifest, devices: list[Device], status: dict[str, dict[str, Any]],
                   ) -> tuple[dict[str, dict[str, str]], dict[str, list[str]]]:
    """Return (refused, unknown) from what each device last reported of its runtimes (``status``: the
    newest status message per device, :meth:`~edge_kit.telemetry.store.HistoryStore.latest_status`).

    ``refused`` maps a device to {variant: why} for its candidates that need a runtime (ONNX Runtime,
    TensorRT, the Edge TPU's delegate) its newest status says it lacks: it cannot run them, so they are not its candidates.
    ``unknown`` maps a device to its candidates that need such a runtime when no status of it reports
    its runtimes (none stored, or an agent older than the field): nothing is assumed either way, they
    stay candidates and the decision says so. Devices whose candidates all run on LiteRT are in neither.

    Raises:
        NotBuiltFor: the artifacts were not compiled for a device's profile.
    """
    refused: dict[str, dict[str, str]] = {}
    unknown: dict[str, list[str]] = {}
    for dev in devices:
        optional = [a for a in candidates_for(manifest, dev) if device_needs(a)]
        if not optional:
            continue
        runtimes = reported_runtimes(status.get(dev.name))
        if runtimes is None:
            unknown[dev.name] = [a.id for a in optional]
            continue
        why = runtime_refusals(dev.name, optional, runtimes, lacks="its newest status in the history says it lacks")
        if why:
            refused[dev.name] = why
    return refused, unknown


def note_runtimes(decisions: dict[str, Decision], refused: dict[str, dict[str, str]],
                  unknown: dict[str, list[str]] | None = None) -> dict[str, Decision]:
    """Return ``decisions`` with, per device, the variants left out because it cannot run them (``excluded``,
    with why) and the candidates whose runtime it never reported (``runtimes_unknown``); a decision that
    chose such a variant says so in its reason. Changes the decisions in place."""
    for name, d in decisions.items():
        d.excluded = dict(refused.get(name) or {})
        d.runtimes_unknown = [v for v in (unknown or {}).get(name, ()) if v not in d.excluded]
        if d.excluded and not d.table and d.chosen is None:
            d.reason = "nothing it can run: every candidate needs a runtime it lacks"
        elif d.chosen in d.runtimes_unknown:
            d.reason += (f"; {d.chosen} needs a runtime this device has not reported (no status with its runtimes "
                         "in the history): check it has it before deploying")
    return decisions


def unknown_runtimes_note(unknown: dict[str, list[str]]) -> str:
    """Return the note for devices whose runtimes nothing in the history reports (``unknown`` of
    :func:`runtime_limits`)."""
    names = sorted(unknown)
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (f"{len(names)} device(s) have not reported their runtimes (no status with them in the history: run "
            f"`edgekit monitor`, or update their agents): {shown}; their ONNX Runtime, TensorRT and Edge TPU variants are kept as "
            "candidates, not verified")


def decide(manifest: Manifest, devices: list[Device], store: HistoryStore, current: dict[str, str | None],
           margin: float, refused: dict[str, dict[str, str]] | None = None) -> dict[str, Decision]:
    """Return the decision for each device from its recent stored measurements of its candidate variants.

    ``current`` maps a device to the sha256 it runs; ``refused`` a device to the variants it cannot run,
    with why (the deploy did not send them, or its status says it lacks their runtime: :func:`runtime_limits`),
    which are not its candidates, since it can never measure them; each decision lists them in
    ``excluded``. One history query and one policy call per group of devices that share variants and
    constraints, however many devices there are.

    Raises:
        NotBuiltFor: the artifacts were not compiled for a device's profile.
    """
    refused = refused or {}
    recent = store.recent_bench(devices[0].name if len(devices) == 1 else None,
                                sha256s=tuple(a.sha256 for a in manifest.artifacts if a.sha256))
    host_fp32 = manifest.reference()  # fp32, or onnx-fp32 where an ONNX model has no LiteRT conversion
    profiles: dict[str, Any] = {}
    requests = []
    for dev in devices:
        cands = [Candidate(a.id, a.sha256, a.bytes or 0,
                           tuple(Measured.from_record(r, a.bytes or 0) for r in recent.get((dev.name, a.sha256), ())))
                 for a in candidates_for(manifest, dev) if a.id not in refused.get(dev.name, ())]
        fp32 = next((c for c in cands if c.variant == manifest.reference_id and c.measured
                     and c.measured.accuracy is not None), None)
        fp32_acc = fp32.measured.accuracy if fp32 else (host_fp32.accuracy.value if host_fp32 and host_fp32.accuracy else None)
        profile = profiles.get(dev.profile) or profiles.setdefault(dev.profile, load_profile(dev.profile))
        requests.append(Request(dev.name, cands, effective_constraints(profile.constraints, dev.constraints),
                                fp32_acc, current.get(dev.name), profile.target_order, manifest.reference_id))
    return note_runtimes({r.device: d for r, d in zip(requests, choose_all(requests, margin))}, refused)


def store_each(store: HistoryStore, kind: str, records: list[dict[str, Any]],
               refused: dict[str, list[str]] | None = None) -> tuple[int, dict[str, list[str]]]:
    """Store devices' ``kind`` records (signed messages as received); a record the history refuses for what it holds
    is refused alone (kept in the history's ``invalid`` table, not stored) and the others are stored
    (:meth:`~edge_kit.telemetry.store.HistoryStore.add_each`).

    Returns:
        (how many were new; ``refused``, or a new dict, with each refused record added under its device as
        ``"<variant or kind> (refused by the history: <why>)"``).

    Raises:
        HistoryError: the history cannot be written (not a record's fault).
    """
    refused = {} if refused is None else refused
    new, why = store.add_each([(kind, r) for r in records])
    for i, reason in why.items():
        r = records[i]
        label = f"{kind} {r['variant']}" if kind == "bench" and isinstance(r.get("variant"), str) else kind
        refused.setdefault(str(r.get("device")), []).append(f"{label} (refused by the history: {reason})")
    return new, refused


def store_decision(store: HistoryStore, decision: dict[str, Any], refused: dict[str, list[str]]) -> bool:
    """Record ``decision`` (:meth:`~edge_kit.telemetry.store.HistoryStore.add_decision`); one the history refuses for
    what it holds (:class:`~edge_kit.errors.HistoryRecordError`: a NUL or a lone surrogate in a name it quotes) is
    refused alone, as :func:`store_each` refuses a record: kept in the history's ``invalid`` table (its JSON, under
    its device, topic ``decisions``) and added to ``refused`` under its device as ``"decision (refused by the history:
    <why>)"``, so the command goes on with the other devices and exits 4.

    Returns:
        True when it was stored, False when it was refused.

    Raises:
        HistoryError: the history cannot be written (not the decision's fault).
    """
    try:
        store.add_decision(decision)
        return True
    except HistoryRecordError as exc:
        device = str(decision.get("device"))
        store.add_invalid("decisions", str(exc), json.dumps(decision, default=str).encode(), device=device)
        refused.setdefault(device, []).append(f"decision (refused by the history: {exc})")
        return False


def _measure(client: FleetClient, store: HistoryStore, wanted: dict[str, list[tuple[str, str]]], bench: dict[str, Any],
             timeout: float) -> tuple[int, dict[str, list[str]], dict[str, list[str]]]:
    """Ask every device for its unmeasured variants at once; store what comes back (a record the history refuses
    for what it holds is refused alone, the others are stored: :func:`store_each`).

    Returns:
        (records stored, {device: variants that got no answer in time}, {device: its measurements the history
        refused, with why}).

    Raises:
        HistoryError: the history cannot be written (not a record's fault).
    """
    sent: dict[str, tuple[str, str]] = {}  # cmd id -> (device, variant)
    expires = time.time() + timeout  # a benchmark not started when the round gives up is asked again next round
    stored, silent, refused = 0, {}, {}
    for device, items in wanted.items():
        for variant, sha in items:
            try:
                sent[client.send(device, "bench", {"sha256": sha, **bench}, expires)] = (device, variant)
            except DeviceRevoked as exc:  # revoked since the round began: not asked, not waited for
                silent.setdefault(device, []).append(f"{variant} (not asked: {exc})")
    deadline = time.monotonic() + timeout
    for cmd_id, (device, variant) in sent.items():
        ack = client.wait_ack(cmd_id, max(0.0, deadline - time.monotonic()))
        record = None
        mid = ack["result"].get("bench_msg_id") if ack is not None and ack["ok"] else None
        if isinstance(mid, str):
            record = client.wait_record(device, mid, max(0.0, deadline - time.monotonic()))
        if record is None:
            rejected = client.refused_records.get((device, mid)) if isinstance(mid, str) else None
            why = "no answer" if ack is None else (ack.get("error") or (f"record refused: {rejected}" if rejected
                                                                        else "record did not arrive"))
            silent.setdefault(device, []).append(f"{variant} ({why})")
            continue
        before = len(refused.get(device, []))
        store_each(store, "bench", [record], refused)  # as each arrives: a history failing later keeps these
        stored += len(refused.get(device, [])) == before
    return stored, silent, refused


def answered(live: list[Device], silent: dict[str, list[str]], unstored: dict[str, list[str]]) -> list[Device]:
    """Return the devices of ``live`` a round decides on, in order: those neither ``silent`` (no answer in time) nor
    ``unstored`` (a measurement the history refused for what it holds), which are left out of this round."""
    return [d for d in live if d.name not in silent and d.name not in unstored]


def tune(fleet: Fleet, devices: list[Device], opts: TuneOptions, store: HistoryStore,
         progress: Callable[[str], None] | None = None) -> TuneReport:
    """Run the loop on ``devices``; return what happened (never raises for a single device).

    Raises:
        InputError: no manifest in ``opts.artifacts``, or its signature fails the fleet's ``artifact_keys``.
        AgentError: the broker cannot be reached.
    """
    step = progress or (lambda _m: None)
    manifest = read_manifest(opts.artifacts, fleet.artifact_trust())
    step("deploying candidate variants")
    deployed = deploy(fleet, devices, DeployOptions(opts.artifacts, parallel=opts.parallel, health_timeout=opts.timeout,
                                                    trust_new_hosts=opts.trust_new_hosts), manifest=manifest)
    report = TuneReport(deployed, metric=(manifest.eval or {}).get("metric"))
    current = {r.device: r.sha256 for r in deployed.results if r.ok}
    refused = {r.device: dict(r.refused) for r in deployed.results}  # not sent: the device lacks their runtime
    live = [d for d in devices if d.name in current]
    if opts.budget is not None:
        _tune_budget(fleet, live, manifest, opts, store, report, current, refused, step)
        return report
    with FleetClient.of(fleet) as client:
        for number in range(1, opts.rounds + 2):
            verify = number > opts.rounds  # after the last round's switches: decide on their health benchmarks only
            wanted = {}
            for dev in [] if verify else live:
                have = store.latest_bench(dev.name)
                wanted[dev.name] = [(a.id, a.sha256) for a in candidates_for(manifest, dev)
                                    if (dev.name, a.sha256) not in have and a.id not in refused.get(dev.name, ())]
            count = sum(len(v) for v in wanted.values())
            step(f"round {number}: " + ("deciding on the health benchmarks" if verify else
                                        f"measuring {count} variant(s) on {len([w for w in wanted.values() if w])} device(s)"))
            stored, silent, unstored = _measure(client, store, {k: v for k, v in wanted.items() if v}, opts.bench,
                                                opts.timeout)
            for device, what in silent.items():
                report.silent.setdefault(device, []).extend(what)
            for device, what in unstored.items():
                report.refused.setdefault(device, []).extend(what)
            step(f"round {number}: selecting")
            decisions = decide(manifest, answered(live, silent, unstored), store, current, opts.margin, refused)
            for d in decisions.values():
                store_decision(store, {**d.as_dict(), "round": number, "artifacts": str(opts.artifacts.resolve()),
                                       "verify": verify}, report.refused)
            switch = {name: d.chosen for name, d in decisions.items() if d.switch and d.chosen}
            report.final.update(decisions)
            entry = {"round": number, "measured": stored, "silent": silent, "refused": unstored, "switched": sorted(switch),
                     "verify": verify, "decisions": {k: v.as_dict() for k, v in decisions.items()}}
            report.rounds.append(entry)
            if not switch:
                break
            if verify:  # the rounds are used up: say what a further run would switch, do not switch it
                entry["pending"], entry["switched"] = entry["switched"], []
                break
            step(f"round {number}: activating on {len(switch)} device(s)")
            entry["activation"] = _activate(fleet, [d for d in live if d.name in switch], switch, opts, store,
                                            current, manifest, report.refused).as_dict()
        time.sleep(0.2)  # let the agents' status updates after an activation arrive
        store_each(store, "status", client.statuses(), report.refused)
    return report



def pending_note(devices: list[str]) -> str:
    """Return the note for devices the ``verify`` decision would switch again (not switched: no rounds left)."""
    return f"{len(devices)} device(s) would switch again on their health benchmarks ({', '.join(devices)}): run tune again"


def _activate(fleet: Fleet, devices: list[Device], switch: dict[str, str], opts: TuneOptions, store: HistoryStore,
              current: dict[str, str | None], manifest: Manifest, unstored: dict[str, list[str]]) -> GroupResult:
    """Activate each device's chosen variant with a health benchmark; store those benchmarks (the fresh
    measurement of the activated variant; one the history refuses for what it holds is added to ``unstored`` under
    its device, the others stored: :func:`store_each`) and note what each device now runs in ``current``.
    ``manifest``: the one the tune checked and decided on (a manifest replaced since is not deployed).

    Returns:
        The deploy's per-device results.

    Raises:
        HistoryError: the history cannot be written (not a record's fault).
    """
    group = deploy(fleet, devices, DeployOptions(opts.artifacts, variants=switch, parallel=opts.parallel,
                                                 trust_new_hosts=opts.trust_new_hosts, health_bench=dict(opts.bench),
                                                 health_timeout=opts.timeout), manifest=manifest)
    store_each(store, "bench", [r.health for r in group.results if r.health is not None], unstored)
    for r in group.results:
        if r.ok and r.sha256:
            current[r.device] = r.sha256
    return group


def last_artifacts(store: HistoryStore) -> Path | None:
    """Return the artifacts folder of the newest decision a tune recorded, or None when no tune has run.
    Other decisions (the live gate's) name none and are passed over. Raises HistoryError."""
    newest = store.decisions(limit=1, kinds=(SELECTION_KIND, FLEET_KIND))  # what tune records, not the gate's
    return Path(newest[0]["artifacts"]) if newest and newest[0].get("artifacts") else None


def flagged_before(store: HistoryStore) -> dict[str, str]:
    """Return the devices the newest fleet-selection decision of each flagged, with why."""
    return flagged_devices(store.latest_decisions((FLEET_KIND,)))


def fleet_inputs(manifest: Manifest, devices: list[Device], store: HistoryStore, current: dict[str, str | None],
                 refused: dict[str, dict[str, str]] | None = None, flagged: dict[str, str] | None = None,
                 ) -> tuple[FleetSpec, Measurements, dict[str, str], list[dict[str, Any]]]:
    """Return (spec, measurements, sha256 by variant id, records) for the fleet model from the history;
    ``records`` are the bench records of ``devices`` on these artifacts (by sha256: not older builds'),
    oldest first. Simulated devices (the fleet file's ``simulated``, or a record of theirs that says so) are a
    profile of their own in the spec, ``<profile> (simulated)``: their figures, the host's, are never pooled with
    a real device's.

    Raises:
        NotBuiltFor: the artifacts were not compiled for a device's profile.
        HistoryError: the history cannot be read.
    """
    refused = refused or {}
    flagged = flagged or {}
    cands = {d.name: [a for a in candidates_for(manifest, d) if a.id not in refused.get(d.name, ())] for d in devices}
    variants = tuple(dict.fromkeys(a.id for d in devices for a in cands[d.name]))
    arts = {a.id: a for d in devices for a in cands[d.name]}
    index = {d.name: i for i, d in enumerate(devices)}
    # Only the records of these builds: a long history holds many of older builds, never read here.
    records = [r for r in store.bench_records(sha256s=tuple(sorted({a.sha256 for a in arts.values()})))
               if r.get("device") in index]
    # a simulated device's figures are the simulating machine's: pooled with other simulated devices' alone, as a
    # profile of its own, so no real device's figure is ever inferred from them (nor theirs from a real device's)
    simulated = {d.name for d in devices if d.simulated} | {r.get("device") for r in records if r.get("simulated") is True}
    pooled_as = [f"{d.profile} (simulated)" if d.name in simulated else d.profile for d in devices]
    profiles = tuple(dict.fromkeys(pooled_as))
    profile_of = dict(zip(pooled_as, (d.profile for d in devices)))  # the profile file each pool's devices name
    host_fp32 = manifest.reference()
    host_acc = host_fp32.accuracy.value if host_fp32 and host_fp32.accuracy else None
    loaded = {p: load_profile(p) for p in dict.fromkeys(d.profile for d in devices)}
    groups: list[Any] = []
    group_of = []
    for d in devices:
        c = effective_constraints(loaded[d.profile].constraints, d.constraints)
        if c not in groups:
            groups.append(c)
        group_of.append(groups.index(c))
    candidates = np.array([[v in {a.id for a in cands[d.name]} for v in variants] for d in devices], dtype=bool)
    model_mb = np.array([[(arts[v].bytes or 0) / 1e6 if v in arts else np.nan for v in variants] for _p in profiles])
    variant_of = {(index[d.name], a.sha256): variants.index(a.id) for d in devices for a in cands[d.name]}
    m = Measurements.of(rows_from_records(records, index, variant_of))
    fp32 = np.full(len(devices), np.nan if host_acc is None else host_acc)
    if manifest.reference_id in variants:  # measured on the device where it has been
        got = (m.variant == variants.index(manifest.reference_id)) & np.isfinite(m.accuracy)
        fp32[m.device[got]] = m.accuracy[got]
    by_sha = {a.sha256: variants.index(a.id) for a in arts.values()}
    spec = FleetSpec(tuple(d.name for d in devices), profiles, variants, np.array([profiles.index(p) for p in pooled_as]),
                     candidates, tuple(groups), np.array(group_of), model_mb, fp32,
                     np.array([by_sha.get(current.get(d.name), -1) for d in devices], dtype=np.intp),
                     np.array([d.name in flagged for d in devices], dtype=bool),
                     {i: flagged[d.name] for i, d in enumerate(devices) if d.name in flagged},
                     tuple(loaded[profile_of[p]].target_order for p in profiles), manifest.reference_id)
    return spec, m, {v: arts[v].sha256 for v in variants}, records


def _cost(spec: FleetSpec, records: list[dict[str, Any]], opts: TuneOptions) -> np.ndarray | float:
    """Return what one benchmark costs per (profile, variant): 1 run, or its device-seconds (the median
    ``duration_s`` of its records in the history, else the bench settings' ``min_seconds``, at least 0.1).
    A duration that is not a number from 0 to a day (a device's bug) is left out."""
    if opts.budget_unit == "runs":
        return 1.0
    default = max(float(opts.bench.get("min_seconds") or 0.0), 0.1)
    cost = np.full((len(spec.profiles), len(spec.variants)), default)
    seen: dict[tuple[str, str], list[float]] = {}
    profile = dict(zip(spec.devices, spec.profile))
    for r in records:
        duration = r.get("duration_s")
        if isinstance(duration, (int, float)) and not isinstance(duration, bool) and 0 <= duration <= 86_400 \
                and r.get("device") in profile:
            seen.setdefault((profile[r["device"]], r.get("variant")), []).append(float(duration))
    for (p, v), values in seen.items():
        if v in spec.variants:
            cost[p, spec.variants.index(v)] = max(float(np.median(values)), 0.1)
    return cost


def _tune_budget(fleet: Fleet, live: list[Device], manifest: Manifest, opts: TuneOptions, store: HistoryStore,
                 report: TuneReport, current: dict[str, str | None], refused: dict[str, dict[str, str]],
                 step: Callable[[str], None]) -> None:
    """Run ``tune`` with a measurement budget (see the module docstring); fill ``report`` in place."""
    left = float(opts.budget or 0.0)
    settings = Settings(margin=opts.margin)
    if not live:  # nothing was deployed: nothing to plan for (the deploy results say why)
        report.budget = {"unit": opts.budget_unit, "budget": left, "spent": 0.0, "measured": 0, "health": 0,
                         "messages": ["no device is live: nothing was planned"]}
        return
    flagged = flagged_before(store)
    info: dict[str, Any] = {"unit": opts.budget_unit, "budget": left, "spent": 0.0, "measured": 0, "health": 0,
                            "messages": []}
    report.budget = info
    by_name = {d.name: d for d in live}
    with FleetClient.of(fleet) as client:
        for number in range(1, opts.rounds + 2):
            verify = number > opts.rounds  # after the last round's switches: decide on their health benchmarks only
            measured, silent, unstored, planned = 0, {}, {}, []
            stale = False  # the plan in hand predates measurements stored since
            for batch in range(1, 1 + (1 if verify else opts.plans_per_round)):
                spec, m, shas, records = fleet_inputs(manifest, answered(live, silent, unstored), store, current,
                                                      refused, flagged)
                plan = plan_measurements(spec, m, budget=0 if verify else left, cost=_cost(spec, records, opts),
                                         settings=settings)
                flagged = {spec.devices[d]: plan.model.flag_why.get(d, "differs from its profile")
                           for d in np.flatnonzero(plan.model.flagged)}
                if not plan.measure:
                    stale = False
                    break
                stale = True
                wanted: dict[str, list[tuple[str, str]]] = {}
                for d, v, why in plan.measure:
                    planned.append((spec.devices[d], spec.variants[v], why))
                    wanted.setdefault(spec.devices[d], []).append((spec.variants[v], shas[spec.variants[v]]))
                step(f"round {number}.{batch}: measuring {len(plan.measure)} planned pair(s) on {len(wanted)} device(s)")
                stored, missing, refused_now = _measure(client, store, wanted, opts.bench, opts.timeout)
                measured += stored
                left -= plan.cost
                info["spent"] += plan.cost
                for device, what in missing.items():
                    silent.setdefault(device, []).extend(what)
                    report.silent.setdefault(device, []).extend(what)
                for device, what in refused_now.items():  # left out of this round, as a silent device
                    unstored.setdefault(device, []).extend(what)
                    report.refused.setdefault(device, []).extend(what)
            if silent or unstored or stale:  # decide on every measurement stored, without the devices that did not answer
                spec, m, shas, records = fleet_inputs(manifest, answered(live, silent, unstored), store, current,
                                                      refused, flagged)
                plan = plan_measurements(spec, m, budget=0, settings=settings)
            info["measured"] += measured
            info["messages"] = plan.messages
            decisions = note_runtimes({d.device: d for d in decisions_of(plan, shas, records=records)}, refused)
            for d in decisions.values():
                store_decision(store, {**d.as_dict(), "round": number, "artifacts": str(opts.artifacts.resolve()),
                                       "budget": {k: info[k] for k in ("unit", "budget", "spent")}, "verify": verify},
                               report.refused)
            switch = {name: d.chosen for name, d in decisions.items() if d.switch and d.chosen}
            report.final.update(decisions)
            entry = {"round": number, "measured": measured, "silent": silent, "refused": unstored, "switched": sorted(switch),
                     "verify": verify, "planned": planned,
                     "messages": plan.messages, "decisions": {k: v.as_dict() for k, v in decisions.items()}}
            report.rounds.append(entry)
            if not switch:
                break
            if verify:  # the rounds are used up: say what a further run would switch, do not switch it
                entry["pending"], entry["switched"] = entry["switched"], []
                info["messages"] = [*plan.messages, pending_note(sorted(switch))]
                break
            step(f"round {number}: activating on {len(switch)} device(s), each with a health benchmark")
            group = _activate(fleet, [by_name[n] for n in switch], switch, opts, store, current, manifest, report.refused)
            entry["activation"] = group.as_dict()
            info["health"] += sum(r.health is not None for r in group.results)
        time.sleep(0.2)
        store_each(store, "status", client.statuses(), report.refused)


def decide_fleet(manifest: Manifest, devices: list[Device], store: HistoryStore, current: dict[str, str | None],
                 margin: float, refused: dict[str, dict[str, str]] | None = None) -> tuple[dict[str, Decision], list[str]]:
    """Return (decision per device, messages) from the fleet model: each device's own measurements where
    it has them, else figures inferred from its profile, each marked (what ``select`` shows when a
    device has not measured every candidate). ``refused``: as :func:`decide` (left out, never inferred).

    Raises:
        NotBuiltFor: the artifacts were not compiled for a device's profile.
    """
    refused = refused or {}
    spec, m, shas, records = fleet_inputs(manifest, devices, store, current, refused, flagged=flagged_before(store))
    plan = plan_measurements(spec, m, budget=0, settings=Settings(margin=margin), decide_only=True)
    return note_runtimes({d.device: d for d in decisions_of(plan, shas, records=records)}, refused), plan.messages
