"""The `edgekit` command line. Every command has ``--json`` (machine-readable result on stdout).

Errors from the toolkit (:class:`~edge_kit.errors.EdgeKitError`) become one line on stderr and the
error's exit code, here and nowhere else; a traceback means a bug. Without the ``host`` extra
the command says in one line what to install.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any


def _warning_line(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    from edge_kit.cli.app import printable

    sys.stderr.write(f"edgekit: warning: {printable(message)}\n")


def main() -> None:
    """Console-script entry point: run the app, map toolkit errors to one line and an exit code."""
    from edge_kit.errors import EdgeKitError

    try:
        from edge_kit.cli import compile, fleet, loop, rollout  # noqa: F401  (each registers its commands)
        from edge_kit.cli.app import app, err, printable
    except ModuleNotFoundError as exc:
        sys.stderr.write(f"edgekit: error: the host commands need the host extra ({exc.name} is not installed): "
                         "pip install 'edge-kit[host]'\n")
        sys.exit(2)
    warnings.showwarning = _warning_line
    try:
        app()
    except EdgeKitError as exc:
        sys.stderr.write(f"edgekit: error: {printable(exc)}\n")  # device answers in it: no terminal controls
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("edgekit: interrupted; nothing was half-written")
        sys.exit(130)
