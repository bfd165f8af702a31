"""`edgekit tune`: measure, select, activate, verify; repeat until nothing changes.

1. Deploy: every candidate variant onto each device (skipped where already there), agent current.
2. Measure: every candidate without a measurement from that device is benchmarked there (commands
   go out to all devices at once; each agent runs its own one at a time). Devices that do not
   answer in time are listed with what they did not answer, and left out of this round.
3. Select with :func:`edge_kit.selection.policy.choose`; every decision is stored with its reasons.
4. Activate where the choice differs, through the deploy path (safe activation, health check with a
   fresh benchmark of the activated variant, rollback when it fails); the fresh record is stored and
   the next round decides again with it.

Stops when a round switches nothing, or after ``rounds``. Measurements persist in the history
store, so a second run with an unchanged fleet measures nothing new and switches nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_kit.fleet.commands import FleetClient
from edge_kit.fleet.deploy import DeployOptions, GroupResult, candidates_for, deploy
from edge_kit.fleet.inventory import Device, Fleet
from edge_kit.manifest import Manifest, read_manifest
from edge_kit.profiles import load_profile
from edge_kit.selection.constraints import Measured, effective_constraints
from edge_kit.selection.policy import (
    DEFAULT_MARGIN,
    Candidate,
    Decision,
    Request,
    choose_all,
)
from edge_kit.telemetry.store import HistoryStore


@dataclass
class TuneOptions:
    artifacts: Path
    rounds: int = 2
    margin: float = DEFAULT_MARGIN
    bench: dict[str, Any] = field(default_factory=lambda: {"min_runs": 200, "min_seconds": 2.0})
    timeout: float = 300.0  # per round, for all measurements to come back
    parallel: int = 8
    trust_new_hosts: bool = False


@dataclass
class TuneReport:
    deploy: GroupResult
    rounds: list[dict[str, Any]] = field(default_factory=list)  # per round: measured, decisions, switched, silent
    final: dict[str, Decision] = field(default_factory=dict)
    silent: dict[str, list[str]] = field(default_factory=dict)  # device -> variants it did not answer for

    @property
    def switched(self) -> list[str]:
        return [d for r in self.rounds for d in r["switched"]]

    def as_dict(self) -> dict[str, Any]:
        return {"deploy": self.deploy.as_dict(), "rounds": self.rounds, "silent": self.silent,
                "final": {k: v.as_dict() for k, v in self.final.items()}}


def decide(manifest: Manifest, devices: list[Device], store: HistoryStore, current: dict[str, str | None],
           margin: float) -> dict[str, Decision]:
    """Return the decision for each device from its recent stored measurements of its candidate variants.

    ``current`` maps a device to the sha256 it runs. One history query and one policy call per
    group of devices that share variants and constraints, however many devices there are.
    """
    recent = store.recent_bench(devices[0].name if len(devices) == 1 else None)
    host_fp32 = manifest.artifact("fp32")
    profiles: dict[str, Any] = {}
    requests = []
    for dev in devices:
        cands = [Candidate(a.id, a.sha256, a.bytes or 0,
                           tuple(Measured.from_record(r, a.bytes or 0) for r in recent.get((dev.name, a.sha256), ())))
                 for a in candidates_for(manifest, dev)]
        fp32 = next((c for c in cands if c.variant == "fp32" and c.measured and c.measured.accuracy is not None), None)
        fp32_acc = fp32.measured.accuracy if fp32 else (host_fp32.accuracy.value if host_fp32 and host_fp32.accuracy else None)
        profile = profiles.get(dev.profile) or profiles.setdefault(dev.profile, load_profile(dev.profile))
        requests.append(Request(dev.name, cands, effective_constraints(profile.constraints, dev.constraints),
                                fp32_acc, current.get(dev.name)))
    return {r.device: d for r, d in zip(requests, choose_all(requests, margin))}


def _measure(client: FleetClient, store: HistoryStore, wanted: dict[str, list[tuple[str, str]]], bench: dict[str, Any],
             timeout: float) -> tuple[int, dict[str, list[str]]]:
    """Ask every device for its unmeasured variants at once; store what comes back.

    Returns:
        (records stored, {device: variants that got no answer in time}).
    """
    sent: dict[str, tuple[str, str]] = {}  # cmd id -> (device, variant)
    for device, items in wanted.items():
        for variant, sha in items:
            sent[client.send(device, "bench", {"sha256": sha, **bench})] = (device, variant)
    deadline = time.monotonic() + timeout
    stored, silent = 0, {}
    for cmd_id, (device, variant) in sent.items():
        ack = client.wait_ack(cmd_id, max(0.0, deadline - time.monotonic()))
        record = None
        if ack is not None and ack["ok"]:
            record = client.wait_record(ack["result"]["bench_msg_id"], max(0.0, deadline - time.monotonic()))
        if record is None:
            why = "no answer" if ack is None else (ack.get("error") or "record did not arrive")
            silent.setdefault(device, []).append(f"{variant} ({why})")
            continue
        store.add("bench", record)
        stored += 1
    return stored, silent


def tune(fleet: Fleet, devices: list[Device], opts: TuneOptions, store: HistoryStore,
         progress: Callable[[str], None] | None = None) -> TuneReport:
    """Run the loop on ``devices``; return what happened (never raises for a single device).

    Raises:
        InputError: no manifest in ``opts.artifacts``.
        AgentError: the broker cannot be reached.
    """
    step = progress or (lambda _m: None)
    manifest = read_manifest(opts.artifacts)
    step("deploying candidate variants")
    deployed = deploy(fleet, devices, DeployOptions(opts.artifacts, parallel=opts.parallel, health_timeout=opts.timeout,
                                                    trust_new_hosts=opts.trust_new_hosts))
    report = TuneReport(deployed)
    current = {r.device: r.sha256 for r in deployed.results if r.ok}
    refused = {r.device: set(r.refused) for r in deployed.results}  # not sent: the device lacks their runtime
    live = [d for d in devices if d.name in current]
    with FleetClient.of(fleet) as client:
        for number in range(1, opts.rounds + 1):
            wanted = {}
            for dev in live:
                have = store.latest_bench(dev.name)
                wanted[dev.name] = [(a.id, a.sha256) for a in candidates_for(manifest, dev)
                                    if (dev.name, a.sha256) not in have and a.id not in refused.get(dev.name, ())]
            count = sum(len(v) for v in wanted.values())
            step(f"round {number}: measuring {count} variant(s) on {len([w for w in wanted.values() if w])} device(s)")
            stored, silent = _measure(client, store, {k: v for k, v in wanted.items() if v}, opts.bench, opts.timeout)
            for device, what in silent.items():
                report.silent.setdefault(device, []).extend(what)
            step(f"round {number}: selecting")
            decisions = decide(manifest, [d for d in live if d.name not in silent], store, current, opts.margin)
            for d in decisions.values():
                store.add_decision({**d.as_dict(), "round": number, "artifacts": str(opts.artifacts.resolve())})
            switch = {name: d.chosen for name, d in decisions.items() if d.switch and d.chosen}
            report.final.update(decisions)
            entry = {"round": number, "measured": stored, "silent": silent, "switched": sorted(switch),
                     "decisions": {k: v.as_dict() for k, v in decisions.items()}}
            report.rounds.append(entry)
            if not switch:
                break
            step(f"round {number}: activating on {len(switch)} device(s)")
            group = deploy(fleet, [d for d in live if d.name in switch],
                           DeployOptions(opts.artifacts, variants=switch, parallel=opts.parallel,
                                         trust_new_hosts=opts.trust_new_hosts, health_bench=dict(opts.bench),
                                         health_timeout=opts.timeout))
            entry["activation"] = group.as_dict()
            for r in group.results:
                if r.health is not None:
                    store.add("bench", r.health)  # the fresh measurement of the activated variant
                if r.ok and r.sha256:
                    current[r.device] = r.sha256
        time.sleep(0.2)  # let the agents' status updates after an activation arrive
        store.add_many([("status", m) for m in client.statuses()])
    return report

