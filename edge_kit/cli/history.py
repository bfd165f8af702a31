"""History commands of the `edgekit` CLI: list what the monitor refused, the sequence gaps it recorded and the alerts
it raised (the rows `edgekit report` counts and lists), and upgrade a history an older edge-kit wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.table import Table

from edge_kit.cli.app import (
    HistoryOpt,
    JsonOpt,
    app,
    emit_json,
    open_fleet_history,
    out,
    safe,
    time_bound,
    utf8_text,
)

history_app = typer.Typer(no_args_is_help=True, help="The history store: what it kept that no figure shows, its schema.")
app.add_typer(history_app, name="history")

ReadFleetOpt = Annotated[Optional[Path], typer.Option("--fleet", "-f", help="fleet.yaml (its history store is used).")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="Only this device's rows.", callback=utf8_text)]
SinceOpt = Annotated[Optional[str], typer.Option("--since", help="Only rows from then on: a span back from now (30m, "
                                                                 "2h, 7d) or a date-time (2026-11-30T09:00, local).")]
UntilOpt = Annotated[Optional[str], typer.Option("--until", help="Only rows up to then (same forms as --since).")]
LimitOpt = Annotated[int, typer.Option("--limit", min=1, max=100_000, help="The newest N rows at most.")]


def _listing(kind: str, fleet_file: Path | None, history: str | None, device: str | None, since: str | None,
             until: str | None, limit: int, **more: Any) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """Return (the history's name, its newest ``kind`` rows: ``refused``, ``gaps`` or ``alerts``, the filters as given,
    with ``since_ts``/``until_ts``); ``more``: the reader's other filters (``holds`` of alerts).

    Raises:
        InputError: a bad --since/--until, no history, or a --device that is neither in the fleet file nor in any
            row of the history (a mistyped name must not read as "nothing happened to it").
        ConfigError: the fleet file, when given, is missing or damaged (:func:`~edge_kit.fleet.inventory.load_fleet`).
        HistoryError: the history cannot be read.
    """
    from edge_kit.fleet.inventory import load_fleet

    names = [d.name for d in load_fleet(fleet_file).devices] if fleet_file is not None else []
    low, high = time_bound(since, "--since"), time_bound(until, "--until")
    filters = {"device": device, "since": since, "until": until, "since_ts": low, "until_ts": high, "limit": limit,
               **more}
    with open_fleet_history(fleet_file, history, must_exist=True) as db:
        read = {"refused": db.refused_messages, "gaps": db.sequence_gaps, "alerts": db.alerts}[kind]
        rows = read(device=device, since=low, until=high, limit=limit, **more)
        if device is not None and not rows and not db.knows_device(device):
            _unknown_device(device, fleet_file, names, db.where)
        return db.where, rows, filters


def _unknown_device(device: str, fleet_file: Path | None, names: list[str], where: str) -> None:
    """Raise InputError for ``--device DEVICE`` when the history holds no row of it, unless the fleet file's device
    ``names`` (empty without one) hold it (a device that never spoke: its empty listing is the answer); return None then.

    Raises:
        InputError: no such device, naming the fleet file's closest name when there is one.
    """
    from edge_kit.config import closest
    from edge_kit.errors import InputError

    if device in names:
        return
    hint = closest(device, names)
    raise InputError(f"--device {device!r}: " + (f"not a device of {fleet_file}, and " if names else "")
                     + f"no row of the history {where} names it; "
                     + (f"did you mean '{hint}'? " if hint else "check the name; ")
                     + "leave --device out to list every device's rows")


def _footer(where: str, rows: list[dict[str, Any]], limit: int, what: str, filters: dict[str, Any]) -> str:
    """Return the line under a listing: how many, from where, and whether --limit cut it; an empty one names the
    filters given (``filters``: :func:`_listing`'s, as given), or none. Raises nothing."""
    if not rows:
        given = [f"--{name} {filters[name]}" for name in ("device", "since", "until") if filters.get(name) is not None]
        return f"no {what} in {safe(where)}" + (f" for {safe(', '.join(given))}" if given else "")
    more = f"; the {limit} newest: older ones with a larger --limit" if len(rows) == limit else ""
    return f"{len(rows)} {what} from {safe(where)}, newest first (times: this host's clock){more}"


@history_app.command("refused")
def refused_cmd(fleet_file: ReadFleetOpt = None, history: HistoryOpt = None, device: DeviceOpt = None,
                since: SinceOpt = None, until: UntilOpt = None, limit: LimitOpt = 20, as_json: JsonOpt = False) -> None:
    """List the messages the monitor (or tune, or a deploy) refused, newest first.

    Each row: when, the device its topic names, the topic, why, and how many bytes of the payload were kept
    (--json gives the payload)."""
    from edge_kit.telemetry.report import local_time

    where, rows, filters = _listing("refused", fleet_file, history, device, since, until, limit)
    if as_json:
        emit_json({"history": where, "filters": filters, "refused": rows})
        return
    t = Table("when", "device (its topic's)", "topic", "why", "bytes kept", box=box.SIMPLE_HEAD, pad_edge=False)
    for r in rows:  # a sender's topic and a reason quoting it: shown as text, never obeyed by the terminal
        t.add_row(local_time(r["ts"]), safe(r["device"] or "-"), safe(r["topic"]), safe(r["reason"]), f"{r['bytes']:,}")
    if rows:
        out.print(t)
    out.print(_footer(where, rows, limit, "refused message(s)", filters), highlight=False)


@history_app.command("gaps")
def gaps_cmd(fleet_file: ReadFleetOpt = None, history: HistoryOpt = None, device: DeviceOpt = None,
             since: SinceOpt = None, until: UntilOpt = None, limit: LimitOpt = 20, as_json: JsonOpt = False) -> None:
    """List the sequence gaps the monitor recorded, newest first.

    Each row: when, device, kind of message and the seq numbers the device gave that never arrived."""
    from edge_kit.telemetry.report import local_time

    where, rows, filters = _listing("gaps", fleet_file, history, device, since, until, limit)
    if as_json:
        emit_json({"history": where, "filters": filters, "gaps": rows})
        return
    t = Table("recorded", "device", "kind", "seq missing", "how many", box=box.SIMPLE_HEAD, pad_edge=False)
    for r in rows:
        t.add_row(local_time(r["ts"]), safe(r["device"]), safe(r["kind"]), f"{r['first_missing']}..{r['last_missing']}",
                  f"{r['missing']:,}")
    if rows:
        out.print(t)
    out.print(_footer(where, rows, limit, "sequence gap(s)", filters), highlight=False)


@history_app.command("alerts")
def alerts_cmd(fleet_file: ReadFleetOpt = None, history: HistoryOpt = None, device: DeviceOpt = None,
               since: SinceOpt = None, until: UntilOpt = None,
               open_only: Annotated[bool, typer.Option("--open", help="Only the alerts that hold (not cleared).")] = False,
               limit: LimitOpt = 20, as_json: JsonOpt = False) -> None:
    """List the alerts the monitor raised (offline, constraints, drift, low disk, silence, over budget), newest first.

    Each alert holds over an episode. Each row: when it was raised, when it cleared (or that it holds; "stale": closed
    because no monitor worker confirmed it), device, kind (a constraints alert's variant with it) and what the alert
    said. --since and --until bound when it was raised."""
    from edge_kit.telemetry.report import (
        alert_cleared_text,
        alert_kind_text,
        local_time,
    )

    where, rows, filters = _listing("alerts", fleet_file, history, device, since, until, limit,
                                    holds=True if open_only else None)
    if as_json:
        emit_json({"history": where, "filters": filters, "alerts": rows})
        return
    t = Table("raised", "cleared", "device", "kind", "detail", box=box.SIMPLE_HEAD, pad_edge=False)
    for r in rows:  # the detail may quote a device's text: shown as text, never obeyed by the terminal
        t.add_row(local_time(r["raised_at"]), alert_cleared_text(r), safe(r["device"]), safe(alert_kind_text(r)),
                  safe(r["detail"]))
    if rows:
        out.print(t)
    out.print(_footer(where, rows, limit, "open alert(s)" if open_only else "alert(s)", filters), highlight=False)


@history_app.command("upgrade")
def upgrade_cmd(fleet_file: ReadFleetOpt = None, history: HistoryOpt = None, as_json: JsonOpt = False) -> None:
    """Bring a history an older edge-kit wrote up to this one's schema, in place.

    Run it as a user (or PostgreSQL role) that owns its tables (and, on PostgreSQL, may create in their schema); any
    command does the same when its user may, so this is for a history read by users who may not."""
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.telemetry.store import SCHEMA_VERSION

    if fleet_file is not None:  # checked as every --fleet is: a profile or a mistyped file must not pick a history
        load_fleet(fleet_file)
    with open_fleet_history(fleet_file, history, upgrade=True) as db:
        where = db.where
    if as_json:
        emit_json({"history": where, "schema_version": SCHEMA_VERSION})
        return
    out.print(f"{safe(where)}: schema version {SCHEMA_VERSION}, up to date", highlight=False, soft_wrap=True)
