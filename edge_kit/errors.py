"""The host's branches of edge-kit's one exception tree (rooted in :mod:`edgekit_protocol.errors`).

Every error a user can cause is an :class:`EdgeKitError` subclass whose ``str()`` is a single line
that names the file, field or device at fault and what to do. The CLI turns these into that line
on stderr and the class's ``exit_code``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from edgekit_protocol.errors import (
    CommandError,
    ConfigError,
    DataFileError,
    EdgeKitError,
    InputError,
    MessageError,
)

#: The exit code of ``edgekit tune`` and ``edgekit select`` when they completed but a device has no variant that
#: meets every constraint (it is given, or runs, the least-violating one): not an error, a fleet outside its service
#: level, which a script or CI job must see. A failure's own code (4: a deploy, a device, the history) comes first.
INFEASIBLE_EXIT = 7


class CompileError(EdgeKitError):
    """A conversion, pruning or packaging step failed."""

    exit_code = 3


class CompileInterrupted(CompileError):
    """Ctrl-C during a compile's result swap: held until the swap ended, then the compile stops; the text says which
    result is in place, whole. Exit code 130, as for any interruption."""

    exit_code = 130


class DeployError(EdgeKitError):
    """Pushing or activating an artifact on a device failed."""

    exit_code = 4


class DeployInterrupted(DeployError):
    """Ctrl-C during a deploy: the devices not started were not touched, those under way finished; the text names
    what each device ended as. Exit code 130, as for any interruption."""

    exit_code = 130


class NotBuiltFor(InputError):
    """The artifacts were not compiled for a device's profile, or none of its variants was built: the
    --artifacts folder given does not fit the fleet (bad input, exit 2)."""


class AgentError(EdgeKitError):
    """The on-device agent could not do what was asked."""

    exit_code = 5


class AgentTimeout(AgentError):
    """An agent did not answer in time (it may still act on the request later, unless it expired)."""


class HistoryError(EdgeKitError):
    """The history database cannot be opened, reached or written (a file, or a PostgreSQL server)."""

    exit_code = 6


class HistoryRecordError(HistoryError):
    """The history database refused a record for what it holds (a value no column, index or encoding of the
    database takes), not because it is down or full: the record is at fault, and the other records of its batch
    can be stored without it."""


__all__ = ["AgentError", "AgentTimeout", "CommandError", "CompileError", "ConfigError", "DataFileError",
           "DeployError", "DeployInterrupted", "EdgeKitError", "HistoryError", "HistoryRecordError", "InputError", "MessageError",
           "NotBuiltFor"]


def first_line(exc: BaseException, limit: int = 200) -> str:
    """Return the first line of ``exc``'s text, or its type's name when it has no text (LiteRT raises
    ``RuntimeError('')`` when it cannot allocate its tensors); a line over ``limit`` characters is cut at
    the last word that fits, ending in "...", never mid-word."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if len(line) <= limit:
        return line
    cut = line[:max(limit - 3, 1)]
    return (cut.rsplit(" ", 1)[0] if " " in cut[limit // 2:] else cut).rstrip(" ,;:(") + "..."
