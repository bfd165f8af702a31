"""What every `edgekit` command module shares: the typer app, the consoles, common options, tables.

Command modules (:mod:`~edge_kit.cli.compile`, :mod:`~edge_kit.cli.fleet`, :mod:`~edge_kit.cli.loop`)
register their commands on :data:`app`; they import this module and library code, never each
other (an import-linter contract checks it). Errors map to one line in :func:`edge_kit.cli.main`.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import typer.rich_utils
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, ProgressColumn
from rich.segment import Segments
from rich.table import Table

from edgekit_protocol.commands import MAX_TTL_S, bounds
from edgekit_protocol.labels import clip, printable  # one rule for the CLI and /metrics

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="edge-kit: compile one model into per-device variants and keep a fleet on the best one.")

# NO_COLOR (no-color.org) means no escape codes at all: rich alone drops the colours but keeps bold and dim.
# The same goes for typer's help pages.
COLOR_SYSTEM: Optional[str] = None if os.environ.get("NO_COLOR") else "auto"
typer.rich_utils.COLOR_SYSTEM = COLOR_SYSTEM


def _shown_type(shown_by_typer: Any) -> Any:
    """Return the type column of typer's help (``display_type_rich``) made plain: nothing for a flag (or a counter),
    which takes no value; the element's type for a repeatable option or argument (``<str>``, ``<path>``: each value is
    given on its own, the help says "repeat"), not ``<list[str]>``, which read as one list to give; else typer's."""
    def display_type_rich(param: Any, ctx: Any) -> Optional[str]:
        if getattr(param, "is_flag", False) or getattr(param, "count", False):
            return None
        shown = shown_by_typer(param, ctx)
        element = re.fullmatch(r"<list\[(\w+)\]>", shown or "") if param.metavar is None else None
        return f"<{element[1].lower()}>" if element else shown

    return display_type_rich


def _usage_name(argument: Any) -> str:
    """Return an argument's name on the usage line as every other tool writes it: ``MODEL`` when required (typer
    0.29 wrote ``{model}``, braces a user might type), ``[MODEL]`` when not, ``FILES...`` when it takes several."""
    name = argument.display_name_raw.upper()
    name = name if argument.required else f"[{name}]"
    return name + ("..." if argument.nargs != 1 else "")


def _reflowed(paragraphs: list[str], _markup_mode: Any) -> str:
    """Return a command's description paragraphs (those after its summary) joined by blank lines, each one's line
    breaks made spaces, so the terminal wraps it (typer 0.29 kept the docstring's breaks: ragged at 80 columns); a
    paragraph starting with ``\\b`` keeps them (click's mark for a preformatted one)."""
    return "\n\n".join(p.replace("\b\n", "") if p.startswith("\b") else " ".join(p.split()) for p in paragraphs)


# typer 0.29's help showed every flag as taking a value (`--json <bool>`, `--help <bool>`), a repeatable option as
# taking a list (`--profile <list[str]>`) and a required argument as `{model}`. Set once, as the module is imported.
# These are typer's internals, which the `typer>=0.12` edge-kit takes do not all have (0.12.5 has none): a typer
# without one shows its own help there (the assignments below add an attribute it never reads).
for _param in (typer.core.TyperOption, typer.core.TyperArgument):
    if hasattr(_param, "display_type_rich"):
        _param.display_type_rich = _shown_type(_param.display_type_rich)  # type: ignore[method-assign]
typer.core.TyperArgument._usage_display_name = _usage_name  # type: ignore[method-assign]
# and its errors named an argument as the code does ("Missing argument 'model'") while the usage line says MODEL: one
# name everywhere (usage line, help panel, errors), the one on the usage line; a metavar given stays as written
typer.core.TyperArgument.display_name_raw = property(  # type: ignore[method-assign,assignment]
    lambda self: self.metavar if self.metavar is not None else self.name.upper())
typer.rich_utils._fix_linebreaks = _reflowed  # and a description's paragraphs as the docstring broke them

# Piped output (CI logs, `| tee`) gets rich's 80 columns, which cut the figures in wide tables.
out = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 120, color_system=COLOR_SYSTEM)
err = Console(stderr=True, color_system=COLOR_SYSTEM)


def print_whole(table: Table, console: Console | None = None) -> None:
    """Print ``table`` on ``console`` (default :data:`out`) at no less than its natural width; returns nothing.

    rich fits a table to the console's width by cutting cells to '…', ``no_wrap`` figures included: on an 80-column
    terminal the compile table read ``6,55…`` for 6,558.4 KiB and lost its last column. A table wider than the console
    is printed whole instead (the terminal wraps its lines): a figure is never shown cut.
    """
    console = console or out
    need = console.measure(table, options=console.options.update_width(100_000)).maximum
    if need <= console.width:
        console.print(table)
        return
    console.print(Segments(console.render(table, console.options.update_width(need))), crop=False)


def progress_bar(*columns: str | ProgressColumn, as_json: bool, transient: bool = True) -> Progress:
    """Return a rich :class:`~rich.progress.Progress` with ``columns`` on stderr (never stdout), shown only
    on a terminal and without ``--json``: a log or a pipe gets no bar (and no blank line where it was)."""
    disable = as_json or not err.is_terminal
    # A disabled bar still printed a blank line off a terminal on stop() before rich 14.3: it gets a silent console.
    return Progress(*columns, console=Console(quiet=True) if disable else err, transient=transient, disable=disable)


class _NoSpinner:
    def update(self, *_args: Any, **_kwargs: Any) -> None:
        """Do nothing: there is no spinner to update (``--json``)."""


def spinner(text: str, as_json: bool) -> AbstractContextManager[Any]:
    """Return a context that shows a spinner saying ``text`` on stderr (never stdout) and yields an object
    whose ``update(text)`` changes it; with ``--json``, one whose ``update`` does nothing."""
    return nullcontext(_NoSpinner()) if as_json else err.status(text, spinner="dots")


JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
FleetOpt = Annotated[Path, typer.Option("--fleet", "-f", help="fleet.yaml: devices, SSH and broker.")]
DevicesOpt = Annotated[Optional[list[str]], typer.Option("--devices", help="Device name, tag:<tag> or all; repeat.")]
_HISTORY_HELP = ("History database: a SQLite file, or a postgresql://user:password@host:port/db URL shared by several "
                 "hosts (default: edgekit-history.db next to the fleet file)")
# One name per concept: --history is the history database everywhere, --store the artifact store (publish,
# rollout, sim up). Round 1's --store for the history was renamed when the artifact store came.
HistoryOpt = Annotated[Optional[str], typer.Option("--history", metavar="PATH|URL", help=_HISTORY_HELP + ".",
                                                   callback=lambda v: utf8_text(v) if v and "://" in v else v)]
ProfilesOpt = Annotated[str, typer.Option("--profiles", help="Comma-separated profiles, cycled over the devices.")]
ParallelOpt = Annotated[int, typer.Option(min=1, max=256, help="Devices at a time.")]
TrustNewHostsOpt = Annotated[bool, typer.Option("--trust-new-hosts", help="Accept and record SSH host keys seen for the "
                                                                         "first time (a changed key is always refused).")]


# A wait on the devices (--timeout, --health-timeout, --wave-timeout, --gate-window, --wait) lasts a day at most: a
# command sent with it must expire within the protocol's MAX_TTL_S (the agent refuses a later expiry), and a longer
# wait broke the thread's wait (OverflowError) after the command was sent.
WAIT_MAX_S = MAX_TTL_S
# A benchmark's length: the bounds the agent checks its bench command against (edgekit_protocol.commands).
BENCH_RUNS_MIN, BENCH_RUNS_MAX = bounds("bench", "min_runs")
BENCH_SECONDS_MIN, BENCH_SECONDS_MAX = bounds("bench", "min_seconds")


def profile_names(text: str) -> list[str]:
    """Return the profile names of a comma-separated ``--profiles`` value, in order.

    Raises:
        InputError: it names none.
    """
    from edge_kit.errors import InputError

    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise InputError(f"--profiles {text!r}: name at least one profile, e.g. rpi4,rpi5,coral-usb "
                         "(see `edgekit profiles list`)")
    return names


def open_fleet_history(fleet_file: Path | None, history: str | None, must_exist: bool = False,
                       read_only: bool = False, upgrade: bool = False, writes: bool = False) -> Any:
    """Return the open :class:`~edge_kit.telemetry.store.HistoryStore` that ``--history`` names, or the fleet's
    default file (``edgekit-history.db`` beside the fleet file; in the current folder without one). A SQLite
    file is created when missing, unless ``must_exist`` (a command that only reads it), or ``read_only`` and
    ``--history`` names it (a command that only reads: a mistyped ``--history`` must not become a new, empty history
    that reads as "nothing happened"; the default file beside a fleet file is still created, as the fleet's history
    that nothing wrote yet). ``upgrade``: a history that must exist, as with ``must_exist``, opened for writing (its
    schema brought up to date: ``edgekit history upgrade``). ``writes``: with ``read_only``, a command that writes
    into the history it finds (a rollout's ``resume``, ``abort`` or ``status --refresh``): an older schema is
    upgraded, as for any writer, instead of refused as for a reader.

    Raises:
        ConfigError: no ``--history`` and no fleet file at ``fleet_file``
            (:func:`~edge_kit.fleet.inventory.check_fleet_file`): a mistyped path must neither read the history beside
            it nor get a new, empty one there.
        InputError: the history file is a folder; or ``must_exist`` (or ``read_only`` with ``--history``) and there
            is no such SQLite file, or an empty one (a read would write a new history's tables into it).
        HistoryError: the database cannot be opened or reached, or (unless ``must_exist`` or ``read_only``) written;
            for the default file, the text names its folder and --history as the way out. A command that only reads
            upgrades an older schema when its user may, else changes nothing
            (:func:`~edge_kit.telemetry.store.open_history`): a history of an older schema it may not upgrade is one
            line naming what to run; a PostgreSQL database without edge-kit tables reads as an empty history. A history
            a newer edge-kit wrote is read by a command that only reads, refused to one that writes (one line naming
            the edge-kit to run).
    """
    from edge_kit.errors import InputError
    from edge_kit.fleet.inventory import check_fleet_file
    from edge_kit.telemetry.store import (
        HISTORY_NAME,
        history_path,
        is_postgres,
        open_history,
    )

    if history and is_postgres(history):  # a reader changes no schema it may not: a role with SELECT alone may read
        return open_history(history, write=upgrade or writes or not (must_exist or read_only))
    if history:
        path = Path(history)
    elif fleet_file is not None:
        check_fleet_file(fleet_file)
        path = history_path(fleet_file)
    else:
        path = Path(HISTORY_NAME)
    if path.is_dir():  # "no history store" sent the user looking for one that was never made
        raise InputError(f"{path}: a folder, not a history store; give --history its file (e.g. {path / HISTORY_NAME}) "
                         "or a postgresql:// URL")
    only_reads = must_exist or upgrade or (read_only and history)
    if only_reads and path.is_file() and path.stat().st_size == 0:  # SQLite would write its tables into it
        raise InputError(f"{path}: an empty file, not a history store; check --history")
    if only_reads and not path.is_file():
        raise InputError(f"{path}: no history store; " + ("check --history (`edgekit monitor` and `edgekit tune` "
                                                          "write one)" if history else
                                                          "run `edgekit monitor` or `edgekit tune` first, or pass --history"))
    # beside the fleet file: a read-only checkout or another user's folder must say where the way out is
    hint = None if history or fleet_file is None else (
        f"the fleet's history lives beside its fleet file, in {path.parent}: make that folder and the file writable "
        "for you, or give --history with a file in a folder you can write (or a postgresql:// URL)")
    # a command that only reads the fleet's history it finds opens it as a reader (it reads a newer schema too)
    reads = only_reads or (read_only and path.is_file() and path.stat().st_size > 0)
    db = open_history(path, hint=hint, write=upgrade or writes or not reads)
    if not (must_exist or read_only) or upgrade:  # a command that writes: refused now, before any device work
        try:
            db.check_writable(hint)
        except BaseException:
            db.close()
            raise
    return db


_SPANS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def time_bound(text: str | None, option: str, now: float | None = None) -> float | None:
    """Return the unix time a ``--since`` / ``--until`` value names (None for None): a span back from ``now`` (a number
    with ``s``, ``m``, ``h`` or ``d``: ``30m``, ``2h``, ``7d``) or an ISO 8601 date or date-time (``2026-11-30``,
    ``2026-11-30T09:00``; local time unless it names its zone, ``Z`` or ``+01:00``).

    Raises:
        InputError: it is neither, or a date-time no unix time holds (one line naming ``option`` and both forms).
    """
    import datetime
    import re

    from edge_kit.errors import InputError

    if text is None:
        return None
    span = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if span:
        return (time.time() if now is None else now) - float(span[1]) * _SPANS[span[2]]
    try:  # a naive one is local time; one a unix time cannot hold (0001-01-01 here, 9999-12-31 ahead) raises too
        return datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00")).timestamp()
    except (ValueError, OverflowError, OSError):
        raise InputError(f"{option} {text!r}: give a span back from now (30m, 2h, 7d) or a date-time "
                         "(2026-11-30T09:00, local time unless it names its zone)") from None


def finite(value: float | None) -> float | None:
    """Return ``value``, an option's number (the ``callback`` of a float option without bounds; :func:`bounded`
    calls it first for the others).

    Raises:
        typer.BadParameter: it is infinite or NaN (``inf`` passes a lower bound, and breaks the waits it sets;
            ``nan`` fails every bound, but an option without one took it: a threshold nothing is below).
    """
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value}: give a finite number")
    return value


def utf8_text(value: str | None) -> str | None:
    """Return ``value``, an option naming a device, a variant, a rollout or a URL (its ``callback``).

    Raises:
        typer.BadParameter: it holds a byte that is not UTF-8 (Python keeps one as a lone surrogate, which no
            history query, signed message or HTTP request can carry: each was a UnicodeEncodeError traceback).
    """
    if value is not None and not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            # the value is not repeated: a --history URL holds its password
            raise typer.BadParameter("it holds bytes that are not UTF-8; give it as UTF-8 text") from None
    return value


def device_name(value: str) -> str:
    """Return ``value``, a device's name given on the command line (its ``callback``).

    Raises:
        typer.BadParameter: empty, or not a device name (:func:`edgekit_protocol.messages.check_name`, the fleet
            file's rule): said so, not searched for in the key registry.
    """
    from edgekit_protocol.messages import check_name

    try:
        return check_name(value, "device")
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def bounded(help: str, low: float | None = None, high: float | None = None) -> dict[str, Any]:
    """Return the ``typer.Option`` keywords (``callback``, ``help``) of a float option bounded by ``low`` and/or
    ``high`` (inclusive): NaN and infinities get :func:`finite`'s message, then a value out of range is refused
    naming the bound; the help ends with the range, as typer's own ``min``/``max`` would show it.

    Typer's ``min``/``max`` are not used for floats: typer checks them before any callback, so ``nan`` (which fails
    every comparison) was refused as "should be <= 86400" or ">= 0", never as what it is.
    """
    def check(value: float | None) -> float | None:
        """Return ``value``. Raises typer.BadParameter: NaN, an infinity, or outside the option's range."""
        finite(value)
        if value is not None and low is not None and value < low:
            raise typer.BadParameter(f"{value:g}: give a number greater than or equal to {low:g}")
        if value is not None and high is not None and value > high:
            raise typer.BadParameter(f"{value:g}: give a number less than or equal to {high:g}")
        return value

    span = "<=".join([*([f"{low:g}"] if low is not None else []), "x", *([f"{high:g}"] if high is not None else [])])
    return {"callback": check, "help": f"{help} [{span}]"}


# The live gate (deploy --canary --gate live, rollout start --gate live): edge_kit.selection.gate.judge_live.
GateOpt = Annotated[Optional[str], typer.Option(help="'live': judge the first devices (canaries) on production traffic "
                                                     "against the devices of their profiles still on the current model.")]
GateWindowOpt = Annotated[float, typer.Option(**bounded("Live gate: seconds to collect at most.", 1, WAIT_MAX_S))]
GateRequestsOpt = Annotated[int, typer.Option(min=10, help="Live gate: requests each canary must answer.")]
GateAlphaOpt = Annotated[float, typer.Option(**bounded("Live gate: the latency test's significance.", 1e-6, 0.5))]
GateSlowdownOpt = Annotated[float, typer.Option(**bounded("Live gate: roll back only when the "
                                                          "canaries' median is also this share above "
                                                          "the controls' (0.1: 10 %).", 0))]
GateShadowOpt = Annotated[float, typer.Option(**bounded("Live gate: share of canary requests also run through "
                                                        "the fp32 reference (0: none).", 0, 1))]
GateSnrOpt = Annotated[Optional[float], typer.Option(callback=finite, help="Live gate: roll back below this live fidelity "
                                                                          "(needs --gate-shadow).")]


def gate_lines(gate: dict[str, Any], promoted: bool) -> str:
    """Return what a command prints of a live-gate decision (``GateDecision.as_dict()``): the decision when it
    promoted (a stop already printed it) and where its figures came from, escaped for rich."""
    from edge_kit.selection.gate import SOURCE

    text = f"live gate: {gate.get('action')}: {gate.get('reason')}\n" if promoted else ""
    clocks = gate.get("clocks") if isinstance(gate.get("clocks"), list) else []  # none in a decision stored before
    return safe(text + f"gate figures: {gate.get('source') or SOURCE}"
                + (f"; clocks: {'; '.join(clip(str(c), 120) for c in clocks[:8])}" if clocks else "")
                + f"; test: {gate.get('test') or '-'}")


def live_gate(gate: str | None, window: float, min_requests: int, alpha: float, min_slowdown: float, shadow: float,
              min_snr_db: float | None, manifest: Any = None) -> Any:
    """Return the :class:`~edge_kit.loop.rollout.LiveGate` the ``--gate*`` options describe, or None without ``--gate``;
    its shadow runs compare with ``manifest``'s reference variant (``fp32`` without one).

    Raises:
        InputError: ``--gate`` is not ``live``, or ``--gate-min-snr-db`` is given without ``--gate-shadow``.
    """
    if gate is None:
        return None
    from edge_kit.errors import InputError
    from edge_kit.loop.rollout import LiveGate

    if gate != "live":
        raise InputError(f"--gate {gate}: the only gate is 'live'")
    if min_snr_db is not None and shadow <= 0:
        raise InputError("--gate-min-snr-db needs --gate-shadow (the share of requests compared with the reference)")
    return LiveGate(window_s=window, min_samples=min_requests, alpha=alpha, min_slowdown=min_slowdown,
                    shadow_share=shadow, min_snr_db=min_snr_db,
                    reference=manifest.reference_id if manifest is not None else "fp32")


def safe(value: Any) -> str:
    """Return ``value`` as text for a rich table cell or ``out.print``: :func:`printable`, with rich markup
    escaped (a ``[link=...]`` or a stray ``[/]`` from a device is shown, not obeyed or raised). Use it for
    everything that does not come from this program: device messages, their records in the history,
    command answers, fleet, manifest and model files."""
    return escape(printable(value))


SHOWN_REFUSED = 10  # devices the history refused a record of, named in text; --json lists them all


def refused_note(refused: dict[str, list[str]]) -> str:
    """Return the one line that says how many records the history refused for what they hold, of which devices
    (``refused``: {device: [what was refused]}, as :func:`edge_kit.loop.tune.store_each` fills it), naming the
    first :data:`SHOWN_REFUSED` devices in sorted order and how many more."""
    count = sum(len(v) for v in refused.values())
    names = sorted(refused)
    more = f", and {len(names) - SHOWN_REFUSED} more" if len(names) > SHOWN_REFUSED else ""
    return (f"{count} record(s) refused by the history for what they hold ({', '.join(names[:SHOWN_REFUSED])}{more}): "
            "kept in its invalid table, not stored; the other records are stored")


def print_refused(refused: dict[str, list[str]], after: str = "") -> None:
    """Print the records the history refused for what they hold (``refused``: {device: [what was refused]}): one
    ``<device>: history refused ...`` line for each of the first :data:`SHOWN_REFUSED` devices, how many more
    (``--json`` lists them all), then :func:`refused_note` followed by ``after``; device text escaped. Prints
    nothing when ``refused`` is empty; returns nothing."""
    for name, what in list(refused.items())[:SHOWN_REFUSED]:
        out.print(f"[red]{safe(name)}: history refused[/] {safe('; '.join(what))}", highlight=False)
    if len(refused) > SHOWN_REFUSED:
        out.print(f"... and {len(refused) - SHOWN_REFUSED} more devices (--json lists them all)", highlight=False)
    if refused:
        out.print(f"[yellow]note[/] {safe(refused_note(refused) + after)}", highlight=False)


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) while the block runs: one that comes is noted, not acted on, and raised again once the block
    is done, to the handler in place before it (KeyboardInterrupt by default), so what the block writes is never cut
    (a write interrupted while a pipe is full resumes: PEP 475). A second Ctrl-C during the block stops it at once (a
    reader that never reads holds the write for ever). Outside the main thread the block just runs.

    Raises:
        Whatever that handler raises, after the block, for a Ctrl-C during it; KeyboardInterrupt within the block, at
        a second one.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []

    def held(signum: int, _frame: Any) -> None:  # the first is noted; a second means it: stop now
        came.append(signum)
        if len(came) > 1:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, held)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if came:
        signal.raise_signal(signal.SIGINT)


def write_whole(text: str) -> None:
    """Write ``text`` on stdout and flush it, whole: a Ctrl-C during the write is held until it is out
    (:func:`interrupts_held`), so a reader of ``--json`` never gets a document cut mid-way.

    Raises:
        Whatever the SIGINT handler raises, after the write, for a Ctrl-C during it; OSError from the write.
    """
    with interrupts_held():
        sys.stdout.write(text)
        sys.stdout.flush()


def emit_json(data: Any) -> None:
    """Write ``data`` as indented JSON on stdout (``--json``), whole (:func:`write_whole`). Raises as it does."""
    write_whole(json.dumps(data, indent=2, default=str) + "\n")


def results_table(group: Any) -> Table:
    """Return the per-device results table of a deploy, tune or rollout (a ``GroupResult``), its caption saying
    how ``seconds`` was measured."""
    from edge_kit.fleet.deploy import SECONDS_METHOD

    t = Table("device", "result", "variant", "what happened", "seconds", box=box.SIMPLE_HEAD, pad_edge=False,
              caption=f"seconds: {SECONDS_METHOD}", caption_justify="left")
    style = {"succeeded": "green", "skipped": "dim", "failed": "red"}
    for r in group.results:
        text = "; ".join(r.actions) if r.status != "failed" else (r.reason or "")
        if r.status == "skipped" and r.reason:
            text = r.reason
        refused = getattr(r, "refused", None)  # variants not sent: the device lacks their runtime
        if refused and r.status != "failed":
            text = "; ".join([text, *refused.values()]) if text else "; ".join(refused.values())
        t.add_row(safe(r.device), f"[{style[r.status]}]{r.status}[/]", safe(r.variant or "-"), safe(text), f"{r.seconds:.1f}")
    return t
