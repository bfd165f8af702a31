"""The root of edge-kit's one exception tree.

Every error a user can cause is an :class:`EdgeKitError` whose ``str()`` is one line naming the
file, field or device at fault and what to do. Each boundary maps the tree once: the CLIs print
that line and exit with ``exit_code``; the agent's command handler answers with an error ack; a
fleet operation stores the exception in the device's result. Anything else is a bug and keeps its
traceback.

The host adds its own branches (``edge_kit.errors``); the agent its own (``device_agents.errors``).
"""

from __future__ import annotations

import os
import sys

STDOUT_CLOSED = 141  # what a shell reports for a process ended by SIGPIPE (128 + 13), as `git log | head -1` does


def stdout_closed(fd: int | None = None) -> bool:
    """Return True when standard output (``fd``: a duplicate of it, made at start) is a pipe whose reader has gone
    (``edgekit ... | head -1`` once ``head`` has read its line): a write to it fails with ``EPIPE``. False for a
    terminal, a file, an open pipe, or where it cannot be told (no ``poll``). Never raises."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.__stdout__.fileno() if fd is None else fd, select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() (Windows), stdout closed or replaced
        return False


def leave_on_closed_stdout(fd: int | None = None, code: int = STDOUT_CLOSED) -> None:
    """When standard output's reader has gone (:func:`stdout_closed`, of ``fd`` if given), exit quietly with ``code``:
    :data:`STDOUT_CLOSED` by default, the usual Unix behaviour (git, ls); a failure's own exit code when the write that
    failed was its error document (its line already said on stderr: ``edgekit compile --json | head -c 10`` still
    exits 3 when the compile failed). No traceback, and nothing still buffered raises again at exit (standard output
    and error are pointed at ``os.devnull``: both are the same pipe in ``2>&1 | head``). Otherwise return: an ``EPIPE``
    from anything else (a socket) is a bug the caller shows. Each CLI's entry point calls it for a
    :class:`BrokenPipeError`.

    Raises:
        SystemExit: ``code``, when standard output's reader has gone.
    """
    if not stdout_closed(fd):
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.__stdout__, sys.__stderr__):
            os.dup2(devnull, stream.fileno())
    except (AttributeError, OSError, ValueError):
        pass
    sys.exit(code)


class EdgeKitError(Exception):
    """Base class of every error edge-kit raises on purpose. ``exit_code`` is what a CLI exits with."""

    exit_code = 1


class ConfigError(EdgeKitError):
    """A profile, fleet or agent config file is missing, malformed or has invalid content."""

    exit_code = 2


class InputError(EdgeKitError):
    """A model or data file given on the command line is missing, corrupt or does not fit."""

    exit_code = 2


class DataFileError(InputError):
    """A data file breaks the ``.npz`` format; the message names the file, option, key and the fix."""


class MessageError(EdgeKitError, ValueError):
    """A payload that is not a valid edge-kit message; the text says which field is wrong."""


class PayloadTooLarge(MessageError):
    """A message its sender built is over the protocol's payload limit (``messages.MAX_PAYLOAD``): never published.
    Every receiver refuses it, and a broker with ``max_packet_size`` cuts off the client that sends it, which sends it
    again (QoS 1) at every reconnect. The text names the message (its device, command or kind), its size and the
    limit; exit 2 (what was given is too big: shorten it)."""

    exit_code = 2


class CommandError(MessageError):
    """A command that cannot be run; ``cmd_id`` and ``name`` are set when they could be read."""

    def __init__(self, message: str, cmd_id: str | None = None, name: str | None = None):
        super().__init__(message)
        self.cmd_id = cmd_id
        self.name = name
