"""The `edgekit` command line. Every command has ``--json`` (machine-readable result on stdout).

Errors from the toolkit (:class:`~edge_kit.errors.EdgeKitError`), usage errors (an unknown option, or a renamed
one: :data:`RENAMED_OPTIONS`; a bad value) and Ctrl-C become one line on stderr and an exit code, here and nowhere else; with
``--json`` the same line is also the ``error`` of one JSON document on stdout. A traceback means a
bug. Without the ``host`` extra the command says in one line what to install.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Any, NoReturn

INTERRUPTED = 130  # what a shell reports for a process stopped by SIGINT
# Options given a new name: (command path, old spelling) -> the new one. The old one is refused (exit 2) with a line
# naming the new one, never taken silently: "No such option" alone left a script's author guessing.
RENAMED_OPTIONS = {("edgekit fleet status", "--no-broker"): "--history-only"}


def _warning_line(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    from edge_kit.cli.app import printable

    sys.stderr.write(f"edgekit: warning: {printable(message)}\n")


def fail(message: str, exit_code: int, as_json: bool) -> NoReturn:
    """Write ``edgekit: error: MESSAGE`` on stderr (and, with ``--json``, ``{"error": MESSAGE, "exit_code":
    EXIT_CODE}`` on stdout), then exit with ``exit_code``.

    ``message`` must already be printable (no terminal controls). Raises SystemExit, always.
    """
    from edgekit_protocol.errors import StdoutFailed, leave_on_closed_stdout

    sys.stderr.write(f"edgekit: error: {message}\n")  # first: seen even when stdout's reader has gone (`| head`)
    if as_json:
        try:
            sys.stdout.write(json.dumps({"error": message, "exit_code": exit_code}, indent=2) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # its reader has gone (`--json | head -c 10`): the failure's exit code, not 141
            leave_on_closed_stdout(code=exit_code)
            raise
        except StdoutFailed as exc:  # cannot be written (a full disk): the line above said it all; its exit code
            exc.said = exit_code
            raise
    raise _Decided(exit_code)


class _Decided(SystemExit):
    """An exit code :func:`_main` chose (a command's own, an error's): :func:`main` keeps it when standard output's
    reader has gone, where the exit 1 rich and typer answer an ``EPIPE`` with becomes exit 141."""


def main() -> None:
    """Console-script entry point: run the app, map toolkit errors, usage errors and Ctrl-C to one line and
    an exit code (2 for usage and bad input, 130 for Ctrl-C, else the error's ``exit_code``); output whose reader has
    gone (``| head -1``) ends it quietly with exit 141, as git and ls do; output that cannot be written (a full disk,
    standard output closed: ``>&-``) is one line on stderr and exit 1
    (:func:`edgekit_protocol.errors.watched_stdout`)."""
    from edgekit_protocol.errors import (
        STDOUT_CLOSED,
        leave_on_closed_stdout,
        watched_stdout,
    )

    with watched_stdout("edgekit"):
        try:  # rich points fd 1 at /dev/null when its reader has gone: this duplicate still tells
            stdout: int | None = os.dup(sys.__stdout__.fileno())
        except (AttributeError, OSError, ValueError):
            stdout = None
        try:
            try:
                _main()
            finally:
                sys.stdout.flush()  # here, not at exit: a reader gone is then caught below
        except BrokenPipeError as exc:
            # a write cut short: exit 141; the flush after a failure's exit code (the error said on stderr): that code
            decided = exc.__context__ if isinstance(exc.__context__, _Decided) and exc.__context__.code else None
            leave_on_closed_stdout(stdout, decided.code if decided else STDOUT_CLOSED)  # type: ignore[arg-type]
            raise  # any other broken pipe (a socket) is a bug: shown
        except SystemExit as exc:
            if exc.code == 1 and not isinstance(exc, _Decided):  # rich's and typer's own answer to EPIPE in a command
                leave_on_closed_stdout(stdout)  # (exit 1): the same exit 141 as ours; a command's own exit 1 is kept
            raise


def _main() -> None:
    """Run the app (:func:`main` says how it ends)."""
    from edge_kit.cli.worker import run_worker, supervised
    from edge_kit.errors import EdgeKitError

    as_json = "--json" in sys.argv[1:]
    if supervised(sys.argv[1:]):  # a compile runs in a worker: a native crash in it is one line here
        code, said = run_worker(sys.argv[1:])
        if said:
            from edgekit_protocol.labels import printable

            if code == 0:  # stopped after its result was complete: a note, not an error
                sys.stderr.write(f"edgekit: {printable(said)}\n")
            else:
                fail(printable(said), code, as_json)
        raise _Decided(code)
    try:
        import typer

        from edge_kit.cli import compile, fleet, history, loop, rollout  # noqa: F401  (each registers its commands)
        from edge_kit.cli.app import app, printable
    except ModuleNotFoundError as exc:
        fail(f"the host commands need the host extra ({exc.name} is not installed): pip install 'edge-kit[host]'", 2,
             as_json)
    warnings.showwarning = _warning_line
    try:
        # Not standalone: typer would print usage errors as a framed block and turn Ctrl-C into a silent 130.
        code = app(standalone_mode=False, prog_name="edgekit")
    except EdgeKitError as exc:
        fail(printable(exc), exc.exit_code, as_json)  # device answers in it: no terminal controls
    except typer.TyperException as exc:  # usage: an unknown command or option, a value out of range
        if not exc.format_message():  # a group without its subcommand: its help was printed
            raise _Decided(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "edgekit"
        renamed = RENAMED_OPTIONS.get((where, getattr(exc, "option_name", None)))  # only an unknown option has a name
        if renamed:
            fail(f"{exc.option_name} was renamed {renamed}; give {renamed} instead (see `{where} --help`)",
                 exc.exit_code, as_json)
        fail(f"{printable(exc.format_message().rstrip('.'))} (see `{where} --help`)", exc.exit_code, as_json)
    except (typer.Abort, KeyboardInterrupt):
        code = INTERRUPTED
    if code == INTERRUPTED:  # typer turns Ctrl-C in a command into this code
        fail("interrupted; nothing was half-written", INTERRUPTED, as_json)
    raise _Decided(code or 0)
