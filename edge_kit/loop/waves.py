"""`edgekit rollout`: a pull rollout in waves, over desired state on MQTT, resumable from the history.

The host never connects to a device. It publishes each device's desired state (signed, retained:
an offline device takes it when it comes back), and the device fetches the artifact from the store,
activates it safely and answers with its ``reported`` state (:mod:`device_agents.reconcile`).

A rollout is planned once (:func:`plan_rollout`): which artifact each device gets (the variant
asked for, else its profile's first built variant), in a stable shuffled order (a device's place is
the sha256 of the rollout id and its name, so the first wave is a spread sample of the fleet and
the same one after a restart; the first device of each profile leads, so a first wave at least as
large as the number of profiles has a canary of each). Waves are cumulative shares of that order (``1%,10%,100%``), sent at
``rate`` devices per second; a wave ends when each of its devices has converged or failed, or when
``wave_timeout_s`` passes (the silent ones stay ``sent``: they converge when they come back, and
``rollout status --refresh`` shows it). When more than ``max_failed`` of the devices sent so far
have failed, the rollout stops: no further desired state is sent; the failed devices stay on their
own models (the agent never switches to a model that fails its smoke test), the converged keep the
new one. ``abort`` (:meth:`Rollout.abort`) stops it and sends every device it moved back.

Everything a restart needs is in the history (:meth:`~edge_kit.telemetry.store.HistoryStore.save_rollout`, ``rollout_devices``):
the plan, each device's state and the revision it was sent. One process drives a rollout at a time
(:meth:`~edge_kit.telemetry.store.HistoryStore.claim_rollout`; a second start is refused while the first one's heartbeat is fresh).
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_kit.errors import (
    ConfigError,
    EdgeKitError,
    HistoryError,
    InputError,
    NotBuiltFor,
)
from edge_kit.fleet.deploy import candidates_for
from edge_kit.fleet.inventory import Device, Fleet
from edge_kit.fleet.keys import revoked_on
from edge_kit.loop.rollout import LiveGate, live_decision, pick_controls
from edge_kit.loop.tune import store_decision
from edge_kit.manifest import read_manifest
from edge_kit.selection.fleetmodel import KIND as FLEET_KIND
from edge_kit.selection.gate import GateDecision
from edge_kit.telemetry.store import SELECTION_KIND
from edgekit_protocol.desired import (
    MAX_REVISION,
    MIN_BYTES_S,
    Desired,
    Fetch,
    check_revision,
    parse_desired,
)
from edgekit_protocol.errors import MessageError
from edgekit_protocol.messages import check_model_name, field_at

FINAL = ("converged", "failed", "refused", "rolled back", "superseded", "left the fleet")
SETTLED = ("converged", "refused", "rolled back", "superseded", "left the fleet")  # rows no later report changes
STALE_OWNER_S = 30.0  # a driver whose heartbeat is older than this is gone: another may resume

SECONDS_METHOD = ("measured: this host's wall clock (time.time) from sending the device its desired state to receiving "
                  "its final report (converged or failed): download, install, activation and the broker's delivery")
FLUSH_S = 0.5  # how often device states are written to the history


class RolloutError(EdgeKitError):
    """A rollout cannot start, resume or go on (the text says why and what to do)."""

    exit_code = 4


class UnknownRollout(RolloutError):
    """The history holds no rollout of that id: bad input (a wrong id, or another ``--history`` was meant)."""

    exit_code = 2

    def __init__(self, rid: str):
        super().__init__(f"rollout {rid}: not in the history; see `edgekit rollout list` (or check --history)")


class RolloutInterrupted(RolloutError):
    """Ctrl-C while driving a rollout: it stays resumable (the text says how); exit code 130 as for any interruption."""

    exit_code = 130

    def __init__(self, rid: str):
        super().__init__(f"rollout {rid}: interrupted; the devices sent so far keep their desired state and no other "
                         f"was sent: `edgekit rollout resume {rid}` goes on (a live gate not yet decided judges "
                         f"again), `edgekit rollout abort {rid}` ends it")


@dataclass(frozen=True)
class RolloutSettings:
    waves: tuple[float, ...] = (0.01, 0.1, 1.0)  # cumulative shares of the devices
    rate_per_s: float | None = None  # desired states sent per second (None: as fast as the broker takes them)
    max_failed: float = 0.0  # share of the devices sent so far that may fail before the rollout stops
    wave_timeout_s: float = 600.0
    fetch: Fetch = Fetch()


def parse_waves(text: str) -> tuple[float, ...]:
    """Return the cumulative wave shares of ``1%,10%,100%`` (fractions, rising, the last 1.0).

    Raises:
        ConfigError: a share is not a percentage, the shares do not rise, or the last is not 100%.
    """
    try:
        shares = tuple(parse_share(part, "--wave") for part in text.split(","))
    except ConfigError:
        raise ConfigError(f"--wave {text}: expected rising percentages ending at 100%, e.g. 1%,10%,100%") from None
    if any(b <= a for a, b in zip(shares, shares[1:])) or shares[-1] != 1.0 or shares[0] <= 0:
        raise ConfigError(f"--wave {text}: expected rising percentages ending at 100%, e.g. 1%,10%,100%")
    return shares


def parse_share(text: str, option: str) -> float:
    """Return ``2%`` (or ``0.02``) as a fraction in [0, 1].

    Raises:
        ConfigError: not a number or percentage in range.
    """
    m = re.fullmatch(r"\s*([0-9.]+)\s*(%?)\s*", text)
    try:
        value = float(m.group(1)) / (100 if m.group(2) else 1) if m else math.nan
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise ConfigError(f"{option} {text}: expected a share such as 2% or 0.02")
    return value


_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}
_PER = {"s": 1, "sec": 1, "min": 60, "h": 3600}


def parse_rate(text: str, option: str, unit: str = "") -> float:
    """Return ``200/min`` (``unit`` ``""``) or ``2MB/s`` (``unit`` ``"B"``) per second.

    Raises:
        ConfigError: not ``<number>[k|M|G]<unit>/<s|min|h>``.
    """
    m = re.fullmatch(rf"\s*([0-9.]+)\s*([kKmMgG]?){unit}\s*/\s*(s|sec|min|h)\s*", text)
    try:
        value = float(m.group(1)) * _UNITS[m.group(2).lower()] / _PER[m.group(3)] if m else 0.0
    except ValueError:
        value = 0.0
    if not (0 < value < 1e12):
        example = "2MB/s" if unit else "200/min"
        raise ConfigError(f"{option} {text}: expected a positive rate such as {example}")
    return value


def parse_bandwidth(text: str, option: str = "--bandwidth") -> float:
    """Return a per-device download cap such as ``2MB/s`` in bytes/s.

    Raises:
        ConfigError: not a rate (``<number>[k|M|G]B/<s|min|h>``), or below :data:`MIN_BYTES_S` (1 kB/s:
            every device would refuse the desired state).
    """
    value = parse_rate(text, option, "B")
    if value < MIN_BYTES_S:
        raise ConfigError(f"{option} {text}: devices download at least 1 kB/s (a lower cap would hold a download "
                          "for days); give at least 1kB/s, or no cap")
    return value


def _order(rid: str, names: list[str], profile_of: dict[str, str] | None = None) -> list[str]:
    """Return ``names`` in the rollout's stable shuffled order (the sha256 of the rollout id and the name),
    with the first device of each profile (``profile_of``) moved to the front, so that a first wave of at
    least as many devices as there are profiles has a canary of each."""
    shuffled = sorted(names, key=lambda n: hashlib.sha256(f"{rid}/{n}".encode()).hexdigest())
    leaders = list({(profile_of or {}).get(n): n for n in reversed(shuffled)}.values())[::-1]
    lead = set(leaders)
    return sorted(leaders, key=shuffled.index) + [n for n in shuffled if n not in lead]


def selected_variants(history: Any, devices: list[Device]) -> dict[str, str]:
    """Return each device's variant as selection last chose it (``select``/``tune`` decisions in the
    history; live-gate records are not choices); devices with no feasible decision are left out."""
    newest = history.latest_decisions((SELECTION_KIND, FLEET_KIND), feasible=True)
    return {d.name: newest[d.name]["chosen"] for d in devices if d.name in newest}


def revoked_devices(fleet: Fleet) -> dict[str, str]:
    """Return, per device of ``fleet``'s key registry that was revoked and has no key registered since
    (:meth:`~edge_kit.fleet.keys.FleetKeys.revoked_devices`), the line a rollout says of it.

    Raises:
        ConfigError: the registry or the revoked list cannot be read (named).
    """
    return {name: f"{name}: its key was revoked on {revoked_on(entry)}; it gets no desired state (`edgekit deploy "
                  "--new-key` brings it back)" for name, entry in fleet.key_store().revoked_devices().items()}


def _by_reason(refused: dict[str, str], reasons: int = 3, names: int = 3) -> str:
    """Return ``refused`` (device -> ``"<device>: <why>"``) as one line, the devices grouped by their reason: the
    first ``reasons`` reasons, each with its first ``names`` devices and how many more, then how many reasons more
    (a fleet of thousands refused for one reason is one short line, not the first three devices alone)."""
    groups: dict[str, list[str]] = {}
    for name, line in refused.items():
        groups.setdefault(line.removeprefix(f"{name}: "), []).append(name)
    parts = [f"{', '.join(who[:names])}{f' and {len(who) - names} more' if len(who) > names else ''}: {why}"
             for why, who in list(groups.items())[:reasons]]
    if len(groups) > reasons:
        parts.append(f"and {len(groups) - reasons} more reason(s) for {sum(len(w) for w in list(groups.values())[reasons:])} "
                     "more device(s)")
    return "; ".join(parts)


def plan_rollout(rid: str, artifacts: Path, fleet: Fleet, devices: list[Device], store_url: str,
                 variant: str | None, settings: RolloutSettings, gate: LiveGate | None = None,
                 choices: dict[str, str] | None = None) -> dict[str, Any]:
    """Return the plan of a rollout (what the history keeps as its body).

    ``targets`` maps each device to the artifact it gets; ``refused`` each device that gets none to
    why (its key was revoked, :meth:`~edge_kit.fleet.keys.FleetKeys.revoked_devices`: no desired state for a device
    whose reports nobody takes; its profile was not compiled, or ``variant`` is not among its profile's built
    variants).
    ``gate``: judge the first wave on live traffic before the others go (:func:`live_judge`).
    ``choices``: a variant per device (:func:`selected_variants`), over ``variant``.

    Raises:
        InputError: no manifest in ``artifacts``, its signature fails the fleet's ``artifact_keys``, or the
            store URL is not http(s) (bad input, exit 2).
        NotBuiltFor: no device gets anything (none of their profiles has the variant asked for; exit 2, as
            ``deploy --variant``).
        ConfigError: a device would refuse its desired state (:func:`~edgekit_protocol.desired.parse_desired`:
            an id over 512 characters, an artifact over 1 TiB, ...), named with the rule; or the fleet's key registry
            or revoked list cannot be read (named).
    """
    if not store_url.startswith(("http://", "https://")):
        raise InputError(f"--store {store_url}: devices fetch over HTTP(S); give the store's http:// or https:// URL")
    manifest = read_manifest(Path(artifacts), fleet.artifact_trust())  # desired states sign what was checked
    evalset = manifest.eval or {}
    eval_file = Path(artifacts) / "eval.npz"
    eval_ref = ({"eval_sha256": evalset["sha256"], "eval_bytes": eval_file.stat().st_size}
                if evalset.get("sha256") and eval_file.is_file() else {})
    targets: dict[str, dict[str, Any]] = {}
    refused: dict[str, str] = {}
    by_profile: dict[str, list[Any] | str] = {}  # each profile's candidates, or why it has none (once per profile)
    revoked = revoked_devices(fleet)
    for dev in devices:
        if dev.name in revoked:  # a stolen device would fetch the model; what it reports would be refused anyway
            refused[dev.name] = revoked[dev.name]
            continue
        if dev.profile not in by_profile:
            try:
                by_profile[dev.profile] = candidates_for(manifest, dev)
            except NotBuiltFor as exc:
                by_profile[dev.profile] = str(exc).removeprefix(f"{dev.name}: ")
        wanted = by_profile[dev.profile]
        if isinstance(wanted, str):
            refused[dev.name] = f"{dev.name}: {wanted}"
            continue
        want = (choices or {}).get(dev.name) or variant
        pick = next((a for a in wanted if a.id == want), None) if want else wanted[0]
        if pick is None:
            refused[dev.name] = (f"{dev.name}: variant {want} is not built for profile {dev.profile} "
                                 f"(built: {', '.join(a.id for a in wanted)})")
            continue
        targets[dev.name] = {"variant": pick.id, "sha256": pick.sha256, "bytes": pick.bytes, "profile": dev.profile,
                             "why": "selected" if (choices or {}).get(dev.name) else ("asked" if variant else "profile's first"),
                             "keep": [a.sha256 for a in wanted if a.sha256 != pick.sha256], **eval_ref}
    if not targets:
        raise NotBuiltFor(f"rollout {rid}: no device gets an artifact: {_by_reason(refused)}")
    plan = {"id": rid, "fleet": fleet.fleet, "model": manifest.model.get("name"), "store": store_url.rstrip("/"),
            "variant": variant, "artifacts": str(Path(artifacts).resolve()), "signature": manifest.signature,
            "settings": {**asdict(settings), "waves": list(settings.waves)},
            "gate": asdict(gate) if gate is not None else None,
            "order": _order(rid, list(targets), {n: t["profile"] for n, t in targets.items()}), "targets": targets, "refused": refused}
    for name in targets:  # the agent's own rules: a desired state a device would refuse is never planned
        try:
            parse_desired({**desired_for(plan, name, 1).body(), "msg_id": "plan"})
        except MessageError as exc:
            raise ConfigError(f"rollout {rid}: {name}: the device would refuse its desired state ({exc}); fix the "
                              "option or the manifest it comes from") from None
    return plan


def desired_for(plan: dict[str, Any], device: str, revision: int) -> Desired:
    """Return the desired state the plan gives ``device`` under ``revision``."""
    t = plan["targets"][device]
    return Desired(msg_id="", rollout=plan["id"], revision=revision, store=plan["store"], model=plan["model"],
                   variant=t["variant"], sha256=t["sha256"], bytes=t["bytes"], eval_sha256=t.get("eval_sha256"),
                   eval_bytes=t.get("eval_bytes"), keep=tuple(t["keep"]), fetch=Fetch(**plan["settings"]["fetch"]))


def _resent() -> dict[str, Any]:
    """Return the row detail of a device sent a new desired state by a rollback or a hold: its ``seconds`` count from
    now (the candidate's seconds, or its last failed try's, would read as the rollback's)."""
    return {"sent_at": round(time.time(), 3), "seconds": None}


UNFINISHED = ("running", "aborting", "held", "stopped")  # rollouts that may still send desired states (resume)


def check_no_overlap(history: Any, plan: dict[str, Any]) -> None:
    """Refuse a plan whose devices an unfinished rollout (running, aborting, held or stopped: it can be
    resumed) also targets: each device follows one rollout at a time, or the two would take turns
    overriding each other's desired state (and a gate's controls would not be on the current model).
    Return nothing when no device is shared.

    Raises:
        RolloutError: devices are in another unfinished rollout (named, with what to do).
        HistoryError: the history store failed.
    """
    mine = set(plan["targets"])
    for other in history.rollouts(limit=1000, states=UNFINISHED):
        if other["id"] == plan["id"]:
            continue
        shared = sorted(mine & set((other["body"] or {}).get("targets") or {}))
        if shared:
            raise RolloutError(
                f"rollout {plan['id']}: {len(shared)} device(s) ({', '.join(shared[:3])}{', ...' if len(shared) > 3 else ''}) "
                f"are in rollout {other['id']}, which is {other['state']}; `edgekit rollout abort {other['id']}` first, "
                "or leave them out with --devices")


def settings_of(body: dict[str, Any]) -> RolloutSettings:
    """Return the settings a plan was made with."""
    s = dict(body["settings"])
    return RolloutSettings(waves=tuple(s["waves"]), rate_per_s=s["rate_per_s"], max_failed=s["max_failed"],
                           wave_timeout_s=s["wave_timeout_s"], fetch=Fetch(**s["fetch"]))


def wave_ends(n: int, waves: tuple[float, ...]) -> list[int]:
    """Return the cumulative device counts at the end of each wave (each wave at least one more device)."""
    ends, last = [], 0
    for share in waves:
        end = min(n, max(last + 1, math.ceil(share * n)))
        ends.append(end)
        last = end
    return ends


def live_judge(fleet: Fleet, gate: LiveGate, progress: Callable[[str, str], None] | None = None,
               candidates: dict[str, str] | None = None) -> Callable[[list[str], list[str]], GateDecision]:
    """Return the judge of a rollout's first wave: the canaries' live latency (and shadow fidelity)
    against the control devices of the same profiles that still run the current model, by
    :func:`~edge_kit.loop.rollout.live_decision` (the same gate as ``deploy --canary --gate live``).
    ``candidates``: each device's artifact sha256 in the plan (a canary's figures count while it serves its own; a
    control serving any is no control: :func:`~edge_kit.loop.rollout.collect_live`)."""
    def judge(canaries: list[str], controls: list[str]) -> GateDecision:
        if not canaries:
            return GateDecision("hold", "no canary converged: nothing to judge")
        if not controls:
            return GateDecision("hold", "no control device of the canaries' profiles still runs the current model")
        return live_decision(fleet, canaries, controls, gate, progress or (lambda _d, _m: None), candidates)
    return judge


def _model_ref(ref: Any) -> bool:
    """Return True when ``ref`` (a model a device reported) names a sha256 and a size: a desired state can name it."""
    if not isinstance(ref, dict):
        return False
    sha, size = ref.get("sha256"), ref.get("bytes")
    return isinstance(sha, str) and len(sha) == 64 and isinstance(size, int) and not isinstance(size, bool) and size > 0


def _named(ref: dict[str, Any]) -> str:
    """Return a reported model reference as ``<variant> (<sha256 prefix>)``."""
    return f"{ref.get('variant') or 'model'} ({str(ref['sha256'])[:12]})"


@dataclass
class Progress:
    counts: dict[str, int] = field(default_factory=dict)
    wave: int = 0
    waves: int = 0
    total: int = 0


class Rollout:
    """Drives one planned rollout until every wave is sent and answered, it fails, or it is aborted.

    ``history`` is the history store; ``connect(on_reported)`` returns an entered
    :class:`~edge_kit.fleet.commands.FleetClient` subscribed to ``reported`` that calls
    ``on_reported`` with each verified message; ``progress`` is called with a :class:`Progress` at
    most every 0.2 s. ``members``: the devices the fleet file names now; a planned device no longer among
    them, not yet sent or still waiting, is not sent (again) and ends ``left the fleet`` (None: all stay).
    ``revoked``: the devices whose key was revoked since the plan, each with why (:func:`revoked_devices`); such a
    device, not yet sent or still waiting, is not sent (again) either and ends ``left the fleet`` with that line.
    """

    def __init__(self, history: Any, rid: str, connect: Callable[[Callable[[dict[str, Any]], None]], Any], *,
                 progress: Callable[[Progress], None] | None = None, owner: str | None = None,
                 judge: Callable[[list[str], list[str]], GateDecision] | None = None,
                 members: set[str] | None = None, revoked: dict[str, str] | None = None):
        self.history, self.rid = history, rid
        self.members = members
        self.revoked = revoked or {}
        self.judge = judge  # the live gate on the first wave, when the plan asks for one
        self.connect = connect
        self.progress = progress
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.inbox: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.rows: dict[str, dict[str, Any]] = {}
        self._dirty: set[str] = set()
        self._last_rev = 0
        self.ignored = 0  # reported messages of other rollouts or older revisions
        self.refused: list[str] = []  # the newest reported messages refused (forged, malformed, from the future), with why
        self.refused_count = 0  # all of them
        self._device_rev: dict[str, int] = {}  # the newest revision each device reported (any rollout)
        # while a run drives the waves (:meth:`_recount`): the rows per state, the watched devices (the wave's) and how
        # many of them are not in a FINAL state, kept by :meth:`_set`; None outside a run
        self._tally: dict[str, int] | None = None
        self._watched: set[str] = set()
        self._open = 0

    # --- history ---------------------------------------------------------------------------------

    def _db(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except EdgeKitError as exc:
            if not isinstance(exc, HistoryError):
                raise
            why = str(exc)  # the database went away (either backend)
        except Exception as exc:  # noqa: BLE001 - a driver's error outside HistoryError: still one line
            why = f"the history store failed while {what} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        raise RolloutError(f"rollout {self.rid}: {why}; every device keeps its desired state: resume with "
                           f"`edgekit rollout resume {self.rid}` when it is back")

    def _flush(self) -> None:
        if self._dirty:
            rows = [{"device": d, **self.rows[d]} for d in self._dirty]
            self._db("saving device states", lambda: self.history.set_rollout_devices(self.rid, rows))
            self._dirty.clear()

    def _set(self, device: str, **change: Any) -> None:
        row = self.rows[device]
        before = row["state"]
        row.update({k: v for k, v in change.items() if k != "detail"})
        if "detail" in change:
            row["detail"] = {**row.get("detail", {}), **change["detail"]}
        self._dirty.add(device)
        after = row["state"]
        if after != before and self._tally is not None:
            self._tally[before] -= 1
            self._tally[after] = self._tally.get(after, 0) + 1
            if device in self._watched:
                self._open += (before in FINAL) - (after in FINAL)

    def _recount(self, watched: list[str] | None = None) -> None:
        """Count the rows per state, and the ``watched`` devices not in a FINAL state, afresh; :meth:`_set` keeps both
        up to date from then on (the run loop asks them at every pass, every few milliseconds: counting every row
        each time made a rollout's CPU grow with the square of its fleet). Returns nothing."""
        tally: dict[str, int] = {}
        for row in self.rows.values():
            tally[row["state"]] = tally.get(row["state"], 0) + 1
        self._tally, self._watched = tally, set(watched or ())
        self._open = sum(1 for d in self._watched if self.rows[d]["state"] not in FINAL)

    # --- the run ---------------------------------------------------------------------------------

    def _revision(self, device: str) -> int | None:
        """Return a revision for ``device``: above every one this driver sent, above the one this rollout
        sent ``device`` before and above the last one ``device`` reported (a host whose clock is behind
        another's, or was set back, still goes up); None when that would be over :data:`MAX_REVISION`
        (:func:`~edgekit_protocol.desired.check_revision`): nothing can be sent to it, and
        :meth:`_no_revision` says why.

        A device's own floor (its report, a device's word) raises its revision alone, never the
        driver's counter: one device reporting a huge revision cannot push the others' out of range.
        """
        self._last_rev = max(self._last_rev + 1, time.time_ns() // 1000)
        floor = max(self.rows.get(device, {}).get("revision") or 0, self._device_rev.get(device, 0)) + 1
        try:
            return check_revision(max(self._last_rev, floor))
        except MessageError:
            return None

    def _no_revision(self, device: str) -> str:
        """Return why nothing can be sent to ``device`` when :meth:`_revision` found no revision left, and what to do."""
        return (f"{device} reported revision {self._device_rev.get(device, 0)}, the largest a desired state can carry "
                f"({MAX_REVISION}), so no desired state can go above it (a device never reports more than it was sent: "
                "check it, its key may be compromised); clear its retained reported message on the broker and "
                "desired.json and desired-revision.json in its agent root, then start a rollout for it")

    def _take_reports(self) -> None:
        while True:
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                return
            device = msg["device"]
            self._device_rev[device] = max(self._device_rev.get(device, 0), msg.get("revision") or 0)
            row = self.rows.get(device)
            if row is not None and row["state"] in ("sent", "fetching", "failed") and msg.get("rollout") != self.rid \
                    and (msg.get("revision") or 0) > row["revision"] > 0:
                self._set(device, state="superseded", detail={"error": f"taken over by rollout {msg.get('rollout')}"})
                continue
            if row is None or msg.get("rollout") != self.rid or msg.get("revision") != row["revision"] \
                    or row["state"] in SETTLED:
                self.ignored += 1
                continue
            if row["state"] == "rolling back":  # sent back to its previous model (live gate, abort), or held (abort)
                if msg["state"] in FINAL:  # its seconds: from that new desired state to this answer
                    row["detail"]["seconds"] = round(time.time() - row["detail"].get("sent_at", time.time()), 3)
                candidate = row["detail"].get("candidate") if row["detail"].get("hold") else None
                if msg["state"] == "converged" and candidate and field_at(msg, "current", "sha256") == candidate:
                    self._set(device, state="converged", detail={  # it had switched before the hold came
                        "hold": False, "previous": msg.get("previous"), "current": msg.get("current"),
                        "error": "it had converged on the candidate before it was told to hold"})
                elif msg["state"] in ("converged", "failed"):
                    self._set(device, state="rolled back" if msg["state"] == "converged" else "failed",
                              detail={"error": row["detail"].get("error") if msg["state"] == "converged"
                                      else f"the rollback failed: {msg.get('error')}", "current": msg.get("current")})
                continue
            if row["state"] == msg["state"] and msg["state"] != "failed":
                continue
            detail = {"error": msg.get("error"), "attempt": msg.get("attempt"), "current": msg.get("current"),
                      "previous": msg.get("previous"), "download": msg.get("download")}
            if msg["state"] in FINAL:
                detail["seconds"] = round(time.time() - row.get("detail", {}).get("sent_at", time.time()), 3)
            if msg.get("simulated") is True:  # a virtual device (edge_kit.sim.virtual): nothing of it ran on hardware
                detail["simulated"] = True
            self._set(msg["device"], state=msg["state"], detail=detail)

    def _counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.rows.values():
            counts[row["state"]] = counts.get(row["state"], 0) + 1
        return counts

    def _too_many_failed(self, max_failed: float) -> str | None:
        counts = self._tally if self._tally is not None else self._counts()
        sent = sum(v for k, v in counts.items() if k not in ("planned", "refused", "left the fleet"))
        failed = counts.get("failed", 0)
        if sent and failed / sent > max_failed:
            return (f"{failed} of {sent} devices sent so far failed ({failed / sent:.1%} > --max-failed "
                    f"{max_failed:.1%}); no further desired state was sent (a failed device retries by itself, "
                    f"up to its pull.max_attempts: `edgekit rollout resume {self.rid}` goes on once the failures are "
                    f"under the threshold; `edgekit rollout abort {self.rid}` puts the devices back)")
        return None

    def run(self) -> dict[str, Any]:
        """Run (or resume) the rollout; return its summary (:meth:`summary`).

        Raises:
            UnknownRollout: no such rollout in the history.
            RolloutError: it is finished, another process drives it, or the history store failed (the
                rollout can be resumed).
            RolloutInterrupted: Ctrl-C (the rollout can be resumed).
            AgentError: the broker cannot be reached.
        """
        record = self._db("reading the rollout", lambda: self.history.rollout(self.rid))
        if record is None:
            raise UnknownRollout(self.rid)
        if record["state"] in ("done", "aborted", "rolled back"):
            raise RolloutError(f"rollout {self.rid} is {record['state']}; start a new one")
        holder = self._db("claiming the rollout", lambda: self.history.claim_rollout(self.rid, self.owner, STALE_OWNER_S))
        if holder is not None:
            raise RolloutError(f"rollout {self.rid} is being driven by {holder}; wait for it, or `edgekit rollout "
                               f"abort {self.rid}`")
        if record["state"] in ("held", "stopped"):  # resumed by hand: promoted, or gone on after a look
            self._db("resuming", lambda: self.history.set_rollout_state(self.rid, "running"))
        try:
            return self._run(record["body"])
        except KeyboardInterrupt:
            raise RolloutInterrupted(self.rid) from None
        finally:
            self._release()

    def _note_refused(self, client: Any) -> None:
        """Take from ``client`` the reported messages it refused: the newest with why, and how many in all."""
        self.refused = list(getattr(client, "rejected", []))
        self.refused_count = getattr(client, "rejected_count", len(self.refused))

    def _release(self) -> None:
        """Store the rows and let go of the rollout's claim (never raises: the claim goes stale by itself)."""
        try:
            self._flush()
            self.history.release_rollout(self.rid, self.owner)
        except Exception:  # noqa: BLE001 - already failing, or going on without it
            pass

    def _run(self, plan: dict[str, Any]) -> dict[str, Any]:
        settings = settings_of(plan)
        order = plan["order"]
        stored = self._db("reading device states", lambda: self.history.rollout_devices(self.rid))
        for name in order:
            self.rows[name] = stored.get(name) or {"wave": -1, "state": "planned", "revision": 0, "detail": {}}
            self.rows[name].pop("ts", None)
        for name, why in plan["refused"].items():
            self.rows[name] = stored.get(name) or {"wave": -1, "state": "refused", "revision": 0, "detail": {"error": why}}
            self.rows[name].pop("ts", None)
            self._dirty.add(name)
        self._last_rev = 0  # each device's floor is its own row and report (:meth:`_revision`)
        for name in order:  # removed from the fleet file, or revoked, since the plan: never sent (again), never waited for
            if self.rows[name]["state"] not in ("planned", "sent"):
                continue
            again = " again" if self.rows[name]["state"] == "sent" else ""
            if name in self.revoked:
                self._set(name, state="left the fleet", detail={"error": f"{self.revoked[name]}; not sent{again}"})
            elif self.members is not None and name not in self.members:
                self._set(name, state="left the fleet", detail={"error": f"{name}: no longer in the fleet file; "
                                                                         f"not sent{again}"})
        ends = wave_ends(len(order), settings.waves)
        state, reason = "done", None
        resumed = [d for d in order if self.rows[d]["state"] == "sent"]
        with self.connect(self.inbox.put) as client:
            # The retained reported states first: each device's newest revision (the next one sent must be
            # above it), and on a resume, who converged while no host was watching.
            self._settle()
            self._take_reports()
            for d in resumed:  # sent, maybe never published: again, under a new revision (same model)
                if self.rows[d]["state"] == "sent":
                    self.rows[d]["state"] = "planned"
            self._recount()
            last_beat = last_flush = last_shown = 0.0
            gated = plan.get("gated") or {}
            if gated.get("action") == "roll back":  # interrupted while sending the first wave back: finish that alone
                state, reason = self._roll_back_first_wave(plan, order[:ends[0]], str(gated.get("reason")), client,
                                                           frozenset(resumed))
            for w, end in enumerate(ends if state == "done" else ()):
                interval = 1.0 / settings.rate_per_s if settings.rate_per_s else 0.0
                next_send = time.monotonic()
                deadline = None
                pending = deque(d for d in order[:end] if self.rows[d]["state"] == "planned")
                # Waited for: this wave's devices and whatever this loop sends (on a resume, earlier waves'
                # devices sent again). An earlier wave's silent devices had their --wave-timeout: waiting for
                # them again would cost every later wave its whole timeout; their answers still count.
                self._recount(list(dict.fromkeys([*pending, *order[ends[w - 1] if w else 0:end]])))
                while True:
                    now = time.monotonic()
                    batch = []
                    while pending and now >= next_send and len(batch) < 500:
                        prepared = self._prepare(pending.popleft(), w, plan)
                        if prepared is not None:
                            batch.append(prepared)
                            next_send = (next_send + interval) if interval else now
                    if batch:
                        self._flush()  # the revisions are in the history before a device can answer them
                        for device, desired in batch:
                            client.publish_desired(desired, device)
                    if not pending and deadline is None:
                        deadline = now + settings.wave_timeout_s
                    self._take_reports()
                    if now - last_flush >= FLUSH_S:
                        self._flush()
                        last_flush = now
                    if now - last_beat >= 1.0:
                        last_beat = now
                        stop = self._heartbeat()
                        if stop:
                            state, reason = "aborted", stop
                            break
                    reason = self._too_many_failed(settings.max_failed)
                    if reason:
                        state = "stopped"
                        break
                    if self.progress and now - last_shown >= 0.2:
                        last_shown = now
                        self.progress(Progress(self._counts(), w + 1, len(ends), len(self.rows)))
                    if not pending and (self._open == 0 or now >= deadline):  # every waited-for device answered
                        break
                    time.sleep(0.002 if pending else 0.02)
                if state != "done":
                    break
                if w == 0 and plan.get("gate") and len(ends) > 1 and "gated" not in plan:
                    state, reason = self._gate(plan, order, ends[0], client)
                    if state != "done":
                        break
            self._note_refused(client)
        self._take_reports()
        self._tally = None
        self._flush()
        if state == "done":  # exit 1 with nothing said: which devices, and what comes of them
            reason = self._silent(settings)
        summary = self.summary(plan, state, reason)
        self._db("saving the outcome", lambda: self.history.save_rollout(
            self.rid, state, {**plan, "outcome": {k: summary[k] for k in ("state", "reason", "counts")}}))
        if self.progress:
            self.progress(Progress(self._counts(), len(ends), len(ends), len(self.rows)))
        return summary

    def _silent(self, settings: RolloutSettings) -> str | None:
        """Return what a done rollout says of its devices still ``sent`` (silent through their wave's timeout), or
        None when there is none."""
        silent = sum(1 for row in self.rows.values() if row["state"] == "sent")
        if not silent:
            return None
        return (f"{silent} device(s) did not answer within --wave-timeout ({settings.wave_timeout_s:g} s; offline?): "
                f"their desired state waits for them on the broker; `edgekit rollout status {self.rid} --refresh` takes "
                "their answers")

    def _heartbeat(self) -> str | None:
        """Tell the history this driver is alive; return why to stop (an abort), or None to go on.

        Raises:
            RolloutError: another process took the rollout over (this one stops at once, saving nothing).
        """
        state = self._db("heartbeat", lambda: self.history.heartbeat_rollout(self.rid, self.owner))
        if state == "lost":
            raise RolloutError(f"rollout {self.rid}: another process took it over (this one's heartbeat was stale); "
                               "see `edgekit rollout status`")
        return None if state == "running" else "aborted by `edgekit rollout abort`"

    def _gate(self, plan: dict[str, Any], order: list[str], first: int, client: Any) -> tuple[str, str | None]:
        """Judge the first wave on live traffic; return ``("done", None)`` to go on, ``("held", why)``,
        or ``("rolled back", why)`` after sending the first wave back (:meth:`_roll_back_first_wave`).

        Raises:
            RolloutError: the plan asks for a gate and no judge was given.
        """
        if self.judge is None:
            raise RolloutError(f"rollout {self.rid} is gated on live traffic; drive it with `edgekit rollout`")
        targets = plan["targets"]
        canaries = [d for d in order[:first] if self.rows[d]["state"] == "converged"]
        profiles = {targets[d]["profile"] for d in canaries}
        controls = pick_controls([d for d in order[first:]
                                  if self.rows[d]["state"] == "planned" and targets[d]["profile"] in profiles])
        beating = threading.Event()

        def beat() -> None:  # the gate collects for its window: the heartbeat goes on meanwhile
            while not beating.wait(5.0):
                try:
                    self.history.heartbeat_rollout(self.rid, self.owner)
                except Exception:  # noqa: BLE001 - the main loop's next heartbeat reports it
                    return

        # a run stopped after recording canaries' decisions, before storing the plan's: that decision stands (judged
        # again, a roll back could come out promote), and is recorded for the canaries still without it
        recorded = self._recorded_gate(canaries)
        if recorded:
            stored = next(iter(recorded.values()))
            controls = stored.pop("controls", controls)
            decision = GateDecision(**{k: v for k, v in stored.items() if k in GateDecision.__dataclass_fields__})
        else:
            beater = threading.Thread(target=beat, daemon=True, name="rollout-heartbeat")
            beater.start()
            try:
                decision = self.judge(canaries, controls)
            finally:
                beating.set()
                beater.join()
        stop = self._heartbeat()
        if stop:
            return "aborted", stop
        unrecorded: dict[str, list[str]] = {}  # a canary's decision the history refused for what it holds: kept as invalid
        for d in (d for d in canaries if d not in recorded):
            self._db("recording the gate", lambda d=d: store_decision(self.history,
                {"device": d, "kind": "live gate", "rollout": self.rid, "chosen": targets[d]["variant"], "current": None,
                 "feasible": decision.action == "promote", "switch": decision.action == "promote",
                 "reason": decision.reason, "gate": {**decision.as_dict(), "controls": controls}}, unrecorded))
        for d, why in unrecorded.items():
            self._set(d, detail={"history": "; ".join(why)})
        plan["gated"] = decision.as_dict()  # a resumed rollout does not judge again
        # a hold is stored as held with the decision, in one write: a resume after a failure in between would take the
        # rollout for one promoted by hand; a roll back stays running until sent, so a resume finishes it
        self._db("saving the gate", lambda: self.history.save_rollout(
            self.rid, "held" if decision.action == "hold" else "running", plan))
        if decision.action == "promote":
            return "done", None
        if decision.action == "hold":
            return "held", f"live gate: hold: {decision.reason}"
        return self._roll_back_first_wave(plan, order[:first], decision.reason, client)

    def _recorded_gate(self, canaries: list[str]) -> dict[str, dict[str, Any]]:
        """Return the live-gate decision this rollout recorded for each of ``canaries`` that has one (its newest
        live-gate decision names this rollout), as recorded (the decision's fields and ``controls``).

        Raises:
            RolloutError: the history cannot be read.
        """
        found = {}
        for d in canaries:
            newest = self._db("reading the gate's decisions", lambda d=d: self.history.decisions(
                device=d, limit=1, kinds=("live gate",)))
            if newest and newest[0].get("rollout") == self.rid and isinstance(newest[0].get("gate"), dict):
                found[d] = dict(newest[0]["gate"])
        return found

    def _roll_back_first_wave(self, plan: dict[str, Any], first: list[str], why: str, client: Any,
                              resent: frozenset[str] = frozenset()) -> tuple[str, str]:
        """Carry out the live gate's roll back (``why``: its reason) on the first wave's devices ``first``: each canary
        (converged, or sent back before without an answer) is sent its previous model as a new desired state; each
        device still on its way to the candidate (sent, fetching, failed; ``resent``: sent before a resume) is told to
        hold the model it runs (:meth:`~edgekit_protocol.desired.Desired.holding`), or it would take the rejected
        candidate when it comes back or retries. Waits for their answers (``wave_timeout_s``).

        Returns:
            ``("rolled back", why)``: the reason, with how many canaries were sent back and which could not be.
        """
        back, stuck, canaries, held = [], [], 0, 0
        for d in first:
            row = self.rows[d]
            state, detail = row["state"], row.get("detail") or {}
            if state == "converged" or (state == "rolling back" and not detail.get("hold")):
                canaries += 1
                prev = detail.get("previous") if state == "converged" else detail.get("back_to")
                if not _model_ref(prev):
                    stuck.append(d)  # it named no previous model: nothing to send it back to
                    self._set(d, detail={"error": f"live gate: {why}; kept on the candidate: it reported no previous "
                                                  "model to go back to (roll it back with a rollout of the old model)"})
                    continue
                desired = self._send_back(d, prev, plan, f"live gate: {why}")
                if desired is None:  # nothing above what it reported: it cannot be sent back (its row says so)
                    stuck.append(d)
                    continue
                back.append((d, desired))
            elif (state in ("sent", "fetching") or d in resent or (state == "rolling back" and detail.get("hold"))
                  or (state == "failed" and not _model_ref(detail.get("back_to")))):  # not a failed rollback
                rev = self._revision(d)
                if rev is None:
                    self._set(d, detail={"error": f"live gate: {why}; not told to hold: {self._no_revision(d)}"})
                    continue
                held += 1
                back.append((d, Desired.holding(self.rid, rev)))
                self._set(d, state="rolling back", revision=rev, detail={
                    "error": f"live gate: {why}; told to keep the model it runs (it had not converged on the candidate)",
                    "hold": True, "candidate": plan["targets"][d]["sha256"], **_resent()})
        self._publish_back(back, client, plan["settings"]["wave_timeout_s"])
        return "rolled back", (f"live gate: roll back: {why}; {canaries - len(stuck)} of {canaries} canaries "
                               "sent back to their previous model"
                               + (f"; {held} device(s) of the first wave not on the candidate told to keep their model"
                                  if held else "")
                               + (f"; kept on the candidate (each row says why): {', '.join(stuck)}" if stuck else ""))

    def _send_back(self, device: str, model: dict[str, Any], plan: dict[str, Any], why: str) -> Desired | None:
        """Mark ``device`` ``rolling back`` to ``model`` (a reported model reference with sha256 and bytes) under
        a new revision; return the desired state to publish (after a :meth:`_flush`), or None when no
        revision is left above what it reported (its row's error says so)."""
        rev = self._revision(device)
        if rev is None:
            self._set(device, detail={"error": f"{why}; kept on the candidate: {self._no_revision(device)}"})
            return None
        self._set(device, state="rolling back", revision=rev, detail={"error": why, "back_to": model, "hold": False,
                                                                      **_resent()})
        try:  # the device's word for its previous model's name, which an older agent took in any form: a label only
            name = check_model_name(model.get("model"))
        except ValueError:
            name = plan["model"]
        return Desired(msg_id="", rollout=self.rid, revision=rev, store=plan["store"],
                       model=name, variant=model.get("variant") or "previous",
                       sha256=model["sha256"], bytes=model["bytes"], fetch=Fetch(**plan["settings"]["fetch"]))

    def _publish_back(self, back: list[tuple[str, Desired]], client: Any, wait_s: float) -> None:
        """Store the rows, publish each device's desired state of ``back``, and wait at most ``wait_s`` for
        their answers (a rollback confirmed, or its failure shown)."""
        self._flush()
        for d, desired in back:
            client.publish_desired(desired, d)
        deadline = time.monotonic() + wait_s
        self._take_reports()
        while any(self.rows[d]["state"] == "rolling back" for d, _ in back) and time.monotonic() < deadline:
            time.sleep(0.05)
            self._take_reports()
        self._flush()

    def abort(self, *, wait_s: float = 120.0, driver_wait_s: float = 60.0) -> dict[str, Any]:
        """Abort the rollout and put back every device it moved; safe to run again (a device already back is
        left alone, one whose rollback is unconfirmed is sent it again).

        A live driver is asked to stop first (state ``aborting``) and waited for, at most ``driver_wait_s``.
        Then, with the devices' retained reported states taken in, each device of the plan gets one action
        (its row's ``abort`` in the summary says which): converged on the candidate, or sent back before
        without an answer: a new desired state naming its previous model (``rolling back``, then ``rolled
        back`` when it confirms within ``wait_s``); sent and answering (fetching or failed, so still on its
        own model) or sent and silent: a hold (:meth:`~edgekit_protocol.desired.Desired.holding`: keep the
        model it runs, queued after the candidate for an offline device, so it supersedes it); a rollback
        that failed: sent again; never sent, refused, superseded, left the fleet, already rolled back: nothing.

        Returns:
            The rollout's summary (:meth:`summary`), state ``aborted``, each row with its ``abort`` action.

        Raises:
            UnknownRollout: no such rollout in the history.
            RolloutError: it is done (roll it back with a rollout of the old model), its driver did not stop
                within ``driver_wait_s``, or the history store failed (running abort again goes on).
            AgentError: the broker cannot be reached (nothing was sent; run abort again).
        """
        record = self._db("reading the rollout", lambda: self.history.rollout(self.rid))
        if record is None:
            raise UnknownRollout(self.rid)
        if record["state"] == "done":
            raise RolloutError(f"rollout {self.rid} is done already; nothing to abort (put devices back with a "
                               "rollout of the old model)")
        if record["state"] not in ("aborted", "rolled back"):
            self._db("asking the driver to stop", lambda: self.history.set_rollout_state(self.rid, "aborting"))
        deadline = time.monotonic() + driver_wait_s
        while (driver := self._db("reading the driver", lambda: self.history.rollout_driver(self.rid, STALE_OWNER_S))) \
                and driver != self.owner:
            if time.monotonic() >= deadline:
                raise RolloutError(f"rollout {self.rid}: {driver} still drives it {driver_wait_s:.0f} s after it was "
                                   f"asked to stop; run `edgekit rollout abort {self.rid}` again")
            time.sleep(0.2)
        holder = self._db("claiming the rollout", lambda: self.history.claim_rollout(self.rid, self.owner, STALE_OWNER_S))
        if holder is not None:
            raise RolloutError(f"rollout {self.rid} was taken by {holder} meanwhile; run `edgekit rollout abort "
                               f"{self.rid}` again")
        try:
            plan = self._db("reading the rollout", lambda: self.history.rollout(self.rid))["body"]
            return self._abort(plan, wait_s)
        finally:
            self._release()

    def _abort(self, plan: dict[str, Any], wait_s: float) -> dict[str, Any]:
        stored = self._db("reading device states", lambda: self.history.rollout_devices(self.rid))
        for name in plan["order"]:
            self.rows[name] = stored.get(name) or {"wave": -1, "state": "planned", "revision": 0, "detail": {}}
            self.rows[name].pop("ts", None)
        for name, refused in plan["refused"].items():
            self.rows[name] = stored.get(name) or {"wave": -1, "state": "refused", "revision": 0,
                                                   "detail": {"error": refused}}
            self.rows[name].pop("ts", None)
        self._last_rev = 0  # each device's floor is its own row and report (:meth:`_revision`)
        why = "aborted by `edgekit rollout abort`"
        with self.connect(self.inbox.put) as client:
            self._settle()
            self._take_reports()  # who converged, failed or confirmed a rollback while nobody watched
            back: list[tuple[str, Desired]] = []
            for name in plan["order"]:
                row = self.rows[name]
                state, detail = row["state"], row.get("detail") or {}
                held = state == "rolling back" and detail.get("hold")  # a hold not confirmed yet: again
                retry = state == "failed" and _model_ref(detail.get("back_to"))  # its rollback failed: again
                if (state in ("converged", "rolling back") or retry) and not held:
                    model = detail.get("back_to") if state != "converged" else None
                    model = model or detail.get("previous")
                    desired = self._send_back(name, model, plan, why) if _model_ref(model) else None
                    if desired is not None:
                        back.append((name, desired))
                        self._set(name, detail={"abort": f"sent back to {_named(model)}"})
                    elif _model_ref(model):
                        self._set(name, detail={"abort": f"kept on the candidate: {self._no_revision(name)}"})
                    else:
                        self._set(name, detail={"abort": "kept on the candidate: it reported no previous model to "
                                                         "go back to (put it back with a rollout of the old model)"})
                elif state in ("sent", "fetching", "failed") or held:
                    # not on the candidate (yet): the device holds on to what it runs, whatever the host knows of it
                    rev = self._revision(name)
                    if rev is None:
                        self._set(name, detail={"abort": f"nothing sent: {self._no_revision(name)}"})
                        continue
                    back.append((name, Desired.holding(self.rid, rev)))
                    self._set(name, state="rolling back", revision=rev, detail={
                        "error": why, "hold": True, "candidate": plan["targets"][name]["sha256"], **_resent(),
                        "abort": "told to keep the model it runs (it had not converged on the candidate; a download "
                                 "in flight is dropped)"})
                elif state == "rolled back":
                    self._set(name, detail={"abort": "already on its previous model"})
                else:  # planned, refused, superseded, left the fleet: never moved by this rollout
                    self._set(name, detail={"abort": "nothing to do: not moved by this rollout"})
            deadline = time.monotonic() + wait_s
            self._publish_back(back, client, wait_s)
            late = [n for n, d in back if d.hold and self.rows[n]["state"] == "converged"]  # on the candidate after all
            for name in late:
                model = self.rows[name]["detail"].get("previous")
                desired = self._send_back(name, model, plan, why) if _model_ref(model) else None
                if desired is not None:
                    back.append((name, desired))
                    self._set(name, detail={"abort": f"sent back to {_named(model)} (it had converged on the "
                                                     "candidate before the hold came)"})
                elif _model_ref(model):
                    self._set(name, detail={"abort": "kept on the candidate: it converged on it before the hold came "
                                                     "and reported the largest revision a desired state can carry"})
                else:
                    self._set(name, detail={"abort": "kept on the candidate: it converged on it before the hold came "
                                                     "and reported no previous model (put it back with a rollout of "
                                                     "the old model)"})
            self._publish_back([b for b in back if b[0] in late and not b[1].hold], client,  # online: they answer soon
                               max(deadline - time.monotonic(), min(wait_s, 10.0)))
            for name in dict.fromkeys(n for n, _ in back):
                if self.rows[name]["state"] == "rolling back":
                    self._set(name, detail={"abort": self.rows[name]["detail"]["abort"] + "; no answer yet (it goes "
                                                     "back when it connects; run abort again to check)"})
            self._note_refused(client)
        self._flush()
        sent_back = {n for n, d in back if not d.hold}
        kept = {n for n, d in back if d.hold} - sent_back
        reason = f"{why}; {len(sent_back)} device(s) sent back to their previous model, {len(kept)} told to keep theirs"
        summary = self.summary(plan, "aborted", reason)
        self._db("saving the outcome", lambda: self.history.save_rollout(
            self.rid, "aborted", {**plan, "outcome": {k: summary[k] for k in ("state", "reason", "counts")}}))
        return summary

    def _settle(self, quiet_s: float = 0.5, at_most_s: float = 10.0) -> None:
        """Wait until the retained messages stop coming (``quiet_s`` without one, at most ``at_most_s``)."""
        end = time.monotonic() + at_most_s
        seen = -1
        while time.monotonic() < end:
            size = self.inbox.qsize()
            if size == seen:
                return
            seen = size
            time.sleep(quiet_s)

    def _prepare(self, device: str, wave: int, plan: dict[str, Any]) -> tuple[str, Desired] | None:
        """Return ``device`` and its desired state, marked sent; None when no revision is left above
        what it reported (it is marked refused, with why)."""
        rev = self._revision(device)
        if rev is None:
            self._set(device, wave=max(wave, self.rows[device]["wave"]), state="refused",
                      detail={"error": self._no_revision(device)})
            return None
        desired = desired_for(plan, device, rev)
        self._set(device, wave=max(wave, self.rows[device]["wave"]), state="sent", revision=rev,
                  detail={"sent_at": round(time.time(), 3)})
        return device, desired

    def status(self, record: dict[str, Any], refresh: bool = False) -> dict[str, Any]:
        """Return the summary of a rollout as the history has it; with ``refresh``, first take the
        devices' retained reported states from the broker (and store them, unless a live process
        drives the rollout, whose own view wins). A ``running`` rollout's ``reason`` says which host drives it,
        or that none does (its driver was stopped) and what to run.

        Raises:
            AgentError: ``refresh`` and the broker cannot be reached.
        """
        plan = record["body"]
        for name, row in self._db("reading device states", lambda: self.history.rollout_devices(self.rid)).items():
            row.pop("ts", None)
            self.rows[name] = row
        for name in plan["order"]:
            self.rows.setdefault(name, {"wave": -1, "state": "planned", "revision": 0, "detail": {}})
        driven = record["owner"] and (record["heartbeat"] or 0) > time.time() - STALE_OWNER_S
        if refresh:
            with self.connect(self.inbox.put):
                self._settle()
            self._take_reports()
            if not driven:
                self._flush()
        reason = (plan.get("outcome") or {}).get("reason")
        if record["state"] == "done":  # its silent devices may have answered since (--refresh)
            reason = self._silent(settings_of(plan))
        if record["state"] == "running":  # an outcome kept from before a resume is not this run's
            reason = (f"driven by {record['owner']}" if driven else
                      f"no host drives it (its driver was stopped: Ctrl-C, or its host went down); `edgekit rollout "
                      f"resume {self.rid}` goes on, `edgekit rollout abort {self.rid}` ends it")
        return self.summary(plan, record["state"], reason)

    def summary(self, plan: dict[str, Any], state: str, reason: str | None) -> dict[str, Any]:
        """Return the rollout's outcome: ``state`` (done, stopped, aborted), ``reason``, ``counts`` per
        device state, ``ignored`` (reports of other rollouts or revisions), ``refused_messages`` (reports
        that failed their signature or checks; up to five with why), and one row per device (``device, wave,
        state, variant, error, seconds, download, abort``: what an abort did to it, or None); ``gate``: the live gate's decision with its numbers
        (``GateDecision.as_dict()``), None when the rollout has not been judged; ``signature``: what the plan
        found of the manifest's signature (:attr:`~edge_kit.manifest.Manifest.signature`; None for a plan
        made before manifests were signed); ``methods``: how each row's ``seconds`` was measured;
        ``history_refused``: {device: [what the history refused of it]}, the canaries whose gate decision the history
        refused for what it holds (kept in its ``invalid`` table, not recorded; each row's ``history`` says it too),
        empty when every decision was recorded."""
        rows, unrecorded = [], {}
        for name, row in self.rows.items():
            d = row.get("detail") or {}
            rows.append({"device": name, "wave": row["wave"] + 1 if row["wave"] >= 0 else None, "state": row["state"],
                         "variant": plan["targets"].get(name, {}).get("variant"), "error": d.get("error"),
                         "seconds": d.get("seconds"), "download": d.get("download"), "abort": d.get("abort"),
                         "history": d.get("history"), "simulated": d.get("simulated") is True})
            if d.get("history"):
                unrecorded[name] = [d["history"]]
        return {"id": self.rid, "state": state, "reason": reason, "gate": plan.get("gated"), "signature": plan.get("signature"),
                "counts": self._counts(), "history_refused": unrecorded,
                "ignored": self.ignored,
                "refused_messages": self.refused_count, "refused_examples": self.refused[:5], "devices": rows,
                "methods": {"seconds": SECONDS_METHOD}}
