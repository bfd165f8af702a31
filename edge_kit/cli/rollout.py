"""`edgekit rollout`: pull rollouts in waves over desired state (start, resume, status, abort, list)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from edge_kit.cli.app import (
    WAIT_MAX_S,
    DevicesOpt,
    FleetOpt,
    GateAlphaOpt,
    GateOpt,
    GateRequestsOpt,
    GateShadowOpt,
    GateSlowdownOpt,
    GateSnrOpt,
    GateWindowOpt,
    HistoryOpt,
    JsonOpt,
    app,
    bounded,
    emit_json,
    err,
    gate_lines,
    live_gate,
    open_fleet_history,
    out,
    print_refused,
    progress_bar,
    safe,
    utf8_text,
)

rollout_app = typer.Typer(no_args_is_help=True, help="Pull rollouts in waves: devices fetch from an artifact store "
                                                     "against a desired state (large fleets, behind NAT, offline).")
app.add_typer(rollout_app, name="rollout")

ABORT_OK = ("rolled back", "planned", "refused", "superseded", "left the fleet")  # abort: exit 0
IdArg = Annotated[str, typer.Argument(help="The rollout's id (see `edgekit rollout list`).", callback=utf8_text)]
STYLE = {"converged": "green", "failed": "red", "refused": "red", "rolled back": "red", "rolling back": "yellow",
         "superseded": "dim", "left the fleet": "dim", "sent": "yellow", "fetching": "yellow", "planned": "dim"}


def _history(fleet_file: Path, history: str | None, read_only: bool = True, writes: bool = False) -> Any:
    """Return the open history ``--history`` names (a file or a postgresql:// URL), or the fleet's default file.

    ``read_only``: every command but ``start`` works on rollouts already in it, so a ``--history`` file that
    does not exist is a mistyped path, not a new history (see :func:`~edge_kit.cli.app.open_fleet_history`).
    ``writes``: the command writes into it (``resume``, ``abort``, ``status --refresh``: the states it reads from the
    broker), so an older schema is upgraded and a newer one refused; ``status`` and ``list`` only read, and change no
    schema.

    Raises:
        InputError: ``read_only`` and ``--history`` names no such file.
        HistoryError: the database cannot be opened or reached, or (``writes``) a newer edge-kit wrote it.
    """
    return open_fleet_history(fleet_file, history, read_only=read_only, writes=writes)


def _drive(fleet_file: Path, db: Any, rid: str, as_json: bool) -> dict[str, Any]:
    from edge_kit.fleet.commands import FleetClient
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.loop.rollout import LiveGate
    from edge_kit.loop.waves import Rollout, live_judge, revoked_devices

    fleet = load_fleet(fleet_file)
    record = db.rollout(rid)
    body = (record or {}).get("body", {})
    gate = body.get("gate")
    judge = live_judge(fleet, LiveGate(**gate), candidates={n: t["sha256"] for n, t in body["targets"].items()}) \
        if gate else None
    members = {d.name for d in fleet.devices}
    revoked = revoked_devices(fleet)  # since the plan: not sent again, not waited for

    def connect(on_reported: Any) -> Any:
        return FleetClient.of(fleet, kinds=("reported",), on_reported=on_reported)

    if as_json:
        return Rollout(db, rid, connect, judge=judge, members=members, revoked=revoked).run()
    with progress_bar(TextColumn("wave {task.fields[wave]}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[counts]}"), TimeElapsedColumn(), as_json=False, transient=False) as bar:
        task = bar.add_task("rollout", total=None, wave="-", counts="")

        def show(p: Any) -> None:
            done = sum(p.counts.get(k, 0) for k in ("converged", "failed", "refused"))
            bar.update(task, total=p.total, completed=done, wave=f"{p.wave}/{p.waves}",
                       counts=" ".join(f"{k} {v}" for k, v in sorted(p.counts.items())))

        return Rollout(db, rid, connect, progress=show, judge=judge, members=members, revoked=revoked).run()


def what_happened(row: dict[str, Any]) -> str:
    """Return the "what happened" cell of a rollout summary's device row: what an abort did, the device's error,
    what it fetched, or, for a device that converged without fetching a byte, that the model was on it already
    (its agent reports no download then); empty for a device still on its way."""
    dl = row.get("download") or {}
    if row.get("abort") or row.get("error"):
        return str(row.get("abort") or row.get("error"))
    if isinstance(dl.get("bytes"), (int, float)) and dl["bytes"]:
        return f"fetched {dl['bytes'] / 1e6:.2f} MB{' (resumed)' if dl.get('resumed') else ''}"
    return "nothing fetched: the model was on the device already" if row.get("state") == "converged" else ""


def _print(summary: dict[str, Any]) -> None:
    t = Table("device", "wave", "state", "variant", "what happened", "seconds", box=box.SIMPLE_HEAD, pad_edge=False,
              caption=f"seconds: {summary['methods']['seconds']}" if summary.get("methods") else None,
              caption_justify="left")
    t.columns[4].overflow = "fold"  # a store URL with its sha256 is one word: folded whole, never cut to '…'
    rows = sorted(summary["devices"], key=lambda r: (r["wave"] or 1e9, r["device"]))
    for r in rows[:200]:
        t.add_row(safe(r["device"]), str(r["wave"] or "-"), f"[{STYLE.get(r['state'], '')}]{safe(r['state'])}[/]",
                  safe(r["variant"] or "-"), safe(what_happened(r)), "-" if r["seconds"] is None else f"{r['seconds']:.1f}")
    out.print(t)
    if len(rows) > 200:
        out.print(f"... and {len(rows) - 200} more devices (--json lists them all)")
    simulated = sum(1 for r in rows if r.get("simulated"))
    if simulated:
        out.print(f"simulated: {simulated} of {len(rows)} devices said so in their reports (`edgekit sim` devices, "
                  "or virtual ones: edge_kit.sim.virtual): their downloads, installs and activations ran on this "
                  "machine (a virtual device's not at all), not on their profile's hardware")
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary["counts"].items()))
    out.print(f"rollout {summary['id']}: [bold]{summary['state']}[/] ({counts})"
              + (f": {safe(summary['reason'])}" if summary.get("reason") else ""))
    if summary.get("gate"):
        out.print(gate_lines(summary["gate"], promoted=summary["gate"].get("action") == "promote"), highlight=False)
    print_refused(summary.get("history_refused") or {}, after="; the rollout went on")
    if summary.get("refused_messages"):
        out.print(f"[red]{summary['refused_messages']} reported message(s) refused[/] (not the device's key, malformed "
                  f"or from the future), e.g. {safe(summary['refused_examples'][0])}")


def _exit(summary: dict[str, Any]) -> None:
    """Return (exit 0) only when the rollout is done, every device converged, was refused up front or left the fleet,
    and the history recorded every gate decision.

    Raises:
        typer.Exit: 1 when the rollout is not done or a device did not converge; else 4 when the history refused a
            canary's gate decision for what it holds (``history_refused``: kept in its invalid table, not recorded),
            as ``tune`` and ``deploy --canary`` exit.
    """
    if summary["state"] != "done" or set(summary["counts"]) - {"converged", "refused", "left the fleet"}:
        raise typer.Exit(1)
    if summary.get("history_refused"):
        raise typer.Exit(4)


@rollout_app.command("start")
def start_cmd(
    fleet_file: FleetOpt,
    artifacts: Annotated[Path, typer.Argument(help="The compiled model's folder (its manifest.json), published to the store.")],
    store: Annotated[str, typer.Option("--store", help="The artifact store's URL as devices reach it (http:// or https://).",
                                       callback=utf8_text)],
    devices: DevicesOpt = None,
    variant: Annotated[Optional[str], typer.Option(help="Variant to roll out, or 'selected': each device's last choice "
                                                        "by select/tune in the history (default: each profile's first built one).",
                                                   callback=utf8_text)] = None,
    wave: Annotated[str, typer.Option(help="Cumulative wave sizes.")] = "1%,10%,100%",
    rate: Annotated[Optional[str], typer.Option(help="Desired states sent per time, e.g. 200/min (default: no limit).")] = None,
    max_failed: Annotated[str, typer.Option("--max-failed", help="Stop when more than this share of the devices sent so far failed.")] = "0%",
    wave_timeout: Annotated[float, typer.Option(**bounded("Seconds a wave waits for its devices' answers.", 1, WAIT_MAX_S))] = 600.0,
    bandwidth: Annotated[Optional[str], typer.Option(help="Download cap per device, e.g. 2MB/s (default: none).")] = None,
    start_delay: Annotated[float, typer.Option(**bounded("Longest random delay (s) before a device starts its download.", 0, 3600))] = 0.0,
    rid: Annotated[Optional[str], typer.Option("--id", help="The rollout's id (default: <model>-<time>).", callback=utf8_text)] = None,
    gate: GateOpt = None,
    gate_window: GateWindowOpt = 60.0,
    gate_min_requests: GateRequestsOpt = 200,
    gate_alpha: GateAlphaOpt = 0.01,
    gate_min_slowdown: GateSlowdownOpt = 0.10,
    gate_shadow: GateShadowOpt = 0.0,
    gate_min_snr_db: GateSnrOpt = None,
    history: HistoryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Plan a rollout, record it in the history, and drive its waves to the end (resume it with `resume` if stopped).

    With --gate live, the first wave is judged on live traffic against the devices of its profiles not
    yet sent (the same gate as `deploy --canary --gate live`): promoted (the next waves go), held (the
    rollout stops; `resume` promotes it by hand) or rolled back (each canary is sent its previous
    model as a new desired state); the decision goes to the history with its numbers.
    """
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.loop.waves import (
        UNFINISHED,
        RolloutError,
        RolloutSettings,
        check_no_overlap,
        parse_bandwidth,
        parse_rate,
        parse_share,
        parse_waves,
        plan_rollout,
        selected_variants,
    )
    from edge_kit.manifest import read_manifest
    from edgekit_protocol.desired import Fetch

    fleet = load_fleet(fleet_file)
    settings = RolloutSettings(waves=parse_waves(wave), rate_per_s=parse_rate(rate, "--rate") if rate else None,
                               max_failed=parse_share(max_failed, "--max-failed"), wave_timeout_s=wave_timeout,
                               fetch=Fetch(parse_bandwidth(bandwidth) if bandwidth else None, start_delay))
    manifest = read_manifest(artifacts)
    rid = rid or f"{manifest.model.get('name', 'model')}-{time.strftime('%Y%m%d-%H%M%S')}"
    db = _history(fleet_file, history, read_only=False)  # a new rollout: a new history is fine
    existing = db.rollout(rid)
    if existing is not None:  # resume goes on only with an unfinished one: do not send a user there in vain
        advice = (f"`edgekit rollout resume {rid}`, or give another --id" if existing["state"] in UNFINISHED
                  else "give another --id")
        raise RolloutError(f"rollout {rid} exists already ({existing['state']}); {advice}")
    gated = live_gate(gate, gate_window, gate_min_requests, gate_alpha, gate_min_slowdown, gate_shadow, gate_min_snr_db,
                      manifest)
    if gated is not None and len(settings.waves) < 2:
        raise RolloutError("--gate live judges the first wave before the others: give at least two waves (--wave)")
    targets = fleet.select(devices)
    choices = selected_variants(db, targets) if variant == "selected" else None
    if choices is not None and not choices:
        raise RolloutError("--variant selected: the history has no feasible choice for these devices; run "
                           "`edgekit tune` (or `select`) first, or name a variant")
    plan = plan_rollout(rid, artifacts, fleet, targets, store, None if choices is not None else variant, settings,
                        gate=gated, choices=choices)
    from edge_kit.fleet.artifact_store import check_published

    check_no_overlap(db, plan)
    check_published(plan["store"], _files(plan))
    db.save_rollout(rid, "running", plan)
    if not as_json:
        err.print(f"rollout {rid}: {len(plan['targets'])} devices in {len(settings.waves)} waves"
                  + (f", {len(plan['refused'])} refused" if plan["refused"] else "") + f"; manifest {plan['signature']}",
                  highlight=False, soft_wrap=True)
    summary = _drive(fleet_file, db, rid, as_json)
    emit_json(summary) if as_json else _print(summary)
    _exit(summary)


def _files(plan: dict[str, Any]) -> dict[str, int]:
    files: dict[str, int] = {}
    for t in plan["targets"].values():
        files[t["sha256"]] = t["bytes"]
        if t.get("eval_sha256"):
            files[t["eval_sha256"]] = t["eval_bytes"]
    return files


@rollout_app.command("resume")
def resume_cmd(fleet_file: FleetOpt, rollout_id: IdArg, history: HistoryOpt = None, as_json: JsonOpt = False) -> None:
    """Go on with a rollout that stopped with its host (its plan and device states are in the history)."""
    summary = _drive(fleet_file, _history(fleet_file, history, writes=True), rollout_id, as_json)
    emit_json(summary) if as_json else _print(summary)
    _exit(summary)


@rollout_app.command("abort")
def abort_cmd(
    fleet_file: FleetOpt, rollout_id: IdArg, history: HistoryOpt = None,
    wait: Annotated[float, typer.Option(**bounded("Seconds to wait for the devices sent back "
                                                  "to confirm.", 0, WAIT_MAX_S))] = 120.0,
    as_json: JsonOpt = False,
) -> None:
    """Stop a rollout and put back every device it moved.

    A device on the candidate is sent its previous model as a new desired state, one not on it yet
    (fetching, failed, silent) is told to keep the model it runs. Each device's row says what was done;
    running it again is safe (and checks again)."""
    from edge_kit.fleet.commands import FleetClient
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.loop.waves import Rollout

    db = _history(fleet_file, history, writes=True)
    fleet = load_fleet(fleet_file)
    summary = Rollout(db, rollout_id, lambda cb: FleetClient.of(fleet, kinds=("reported",), on_reported=cb)).abort(wait_s=wait)
    if as_json:
        emit_json(summary)
    else:
        _print(summary)
    if any(r["state"] not in ABORT_OK for r in summary["devices"]):
        raise typer.Exit(1)  # a device not confirmed back: offline, its rollback failed, or it named no previous model


@rollout_app.command("status")
def status_cmd(
    fleet_file: FleetOpt, rollout_id: IdArg, history: HistoryOpt = None,
    refresh: Annotated[bool, typer.Option("--refresh", help="Also read the devices' retained reported states from the broker "
                                               "(devices that converged after the rollout's host stopped).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show a rollout's state and each device's."""
    from edge_kit.fleet.commands import FleetClient
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.loop.waves import Rollout, UnknownRollout

    db = _history(fleet_file, history, writes=refresh)  # --refresh stores the states it reads
    record = db.rollout(rollout_id)
    if record is None:
        raise UnknownRollout(rollout_id)
    view = Rollout(db, rollout_id, connect=lambda cb: FleetClient.of(load_fleet(fleet_file), kinds=("reported",), on_reported=cb))
    summary = view.status(record, refresh=refresh)
    emit_json(summary) if as_json else _print(summary)


@rollout_app.command("list")
def list_cmd(fleet_file: FleetOpt, history: HistoryOpt = None,
             limit: Annotated[int, typer.Option(min=1, max=100_000, help="List at most this many, newest first.")] = 20,
             as_json: JsonOpt = False) -> None:
    """List the rollouts in the history, newest first (the 20 newest unless --limit says otherwise)."""
    from edge_kit.telemetry.report import outcome_counts_text, rollout_summaries

    db = _history(fleet_file, history)
    found = db.rollouts(limit=limit + 1)  # one more than shown: whether older ones were left out
    rows = rollout_summaries(found[:limit])
    if as_json:
        emit_json(rows)
        return
    if not rows:
        out.print(f"no rollout in {safe(db.where)} yet (`edgekit rollout start` makes one)", highlight=False, soft_wrap=True)
        return
    t = Table("id", "state", "started", "devices", "variant", "outcome", box=box.SIMPLE_HEAD, pad_edge=False)
    for r in rows:
        t.add_row(safe(r["id"]), safe(r["state"]), time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])), str(r["devices"]),
                  safe(r["variant"] or "per profile"), safe(outcome_counts_text(r)))
    out.print(t)
    if len(found) > limit:
        out.print(f"the {limit} newest; older ones are in {safe(db.where)} (--limit N lists more)", highlight=False,
                  soft_wrap=True)
