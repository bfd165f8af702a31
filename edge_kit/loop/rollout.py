"""Canary rollouts: a share of the devices goes first, is benchmarked and judged, then the rest.

``canary`` of the devices (rounded up, at least one) are deployed first with a short health
benchmark of the activated model. A canary fails when its deploy failed or its benchmark breaks
the device's constraints. When more than ``max_failed`` of the canaries failed, every canary this
deploy switched is rolled back and the other devices are left as they were; otherwise the rest
is deployed. The decision is :func:`judge_canaries`, pure and unit-tested; this module wires it
to the fleet (deploy, rollback) and the selection layer (constraints).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from edge_kit.fleet.deploy import (
    DeployOptions,
    DeviceResult,
    GroupResult,
    deploy,
    roll_back,
)
from edge_kit.fleet.inventory import Device, Fleet
from edge_kit.manifest import Manifest, read_manifest
from edge_kit.profiles import load_profile
from edge_kit.selection.constraints import (
    Measured,
    describe,
    effective_constraints,
    violations,
)

CANARY_BENCH = {"min_runs": 50, "min_seconds": 0.0, "warmup": 5}  # enough to judge it against its constraints


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
    """Return the constraints the device's health benchmark broke, described, or None."""
    if result.health is None:
        return None
    c = effective_constraints(load_profile(dev.profile).constraints, dev.constraints)
    art = manifest.artifact(result.variant or "")
    fp32 = manifest.artifact("fp32")
    broken = violations(c, Measured.from_record(result.health, art.bytes if art and art.bytes else 0),
                        fp32.accuracy.value if fp32 and fp32.accuracy else None)
    return ", ".join(describe(k, c) for k in broken) or None


def rollout(fleet: Fleet, devices: list[Device], opts: DeployOptions, canary: float, max_failed: float = 0.0,
            progress: Callable[[str, str], None] | None = None) -> GroupResult:
    """Deploy to a ``canary`` share of ``devices`` first, judge them, then to the rest or to none.

    Returns:
        One result per device in the order given; ``stopped`` says why when the rest was not deployed.

    Raises:
        InputError: the artifact folder has no (valid) manifest.
        AgentError: the fleet's broker cannot be reached.
    """
    order = {d.name: i for i, d in enumerate(devices)}
    n = max(1, math.ceil(len(devices) * canary))
    canaries, rest = devices[:n], devices[n:]
    first = deploy(fleet, canaries, replace(opts, health_bench=dict(CANARY_BENCH)), progress).results
    manifest = read_manifest(opts.artifacts)
    by_name = {d.name: d for d in canaries}
    broken = {r.device: b for r in first if r.ok and (b := broken_constraints(manifest, by_name[r.device], r))}
    for r in first:
        if r.device in broken:
            r.status, r.reason = "failed", f"{r.device}: canary breaks its constraints ({broken[r.device]})"
    verdict = judge_canaries(first, broken, max_failed)
    if verdict.proceed:
        return GroupResult(sorted(first + deploy(fleet, rest, opts, progress).results, key=lambda r: order[r.device]))
    roll_back(fleet, [by_name[d] for d in verdict.roll_back], opts, first, "rolled back: the canary rollout stopped")
    skipped = [DeviceResult(d.name, "skipped", reason="rollout stopped after the canaries") for d in rest]
    return GroupResult(sorted(first + skipped, key=lambda r: order[r.device]), stopped=verdict.reason)
