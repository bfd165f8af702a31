"""The root of edge-kit's one exception tree.

Every error a user can cause is an :class:`EdgeKitError` whose ``str()`` is one line naming the
file, field or device at fault and what to do. Each boundary maps the tree once: the CLIs print
that line and exit with ``exit_code``; the agent's command handler answers with an error ack; a
fleet operation stores the exception in the device's result. Anything else is a bug and keeps its
traceback.

The host adds its own branches (``edge_kit.errors``); the agent its own (``device_agents.errors``).
"""

from __future__ import annotations

import errno
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator, NoReturn

STDOUT_CLOSED = 141  # what a shell reports for a process ended by SIGPIPE (128 + 13), as `git log | head -1` does
STDOUT_FAILED = 1  # the exit code when standard output cannot be written (a full disk), its reader not gone


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


class StdoutFailed(Exception):
    """A write to standard output failed, other than for its reader gone (``ENOSPC`` writing to /dev/full or a full
    disk, ``EIO``); its text is the error's. Not an OSError: a command's ``except OSError`` for its own files would
    name one of them (and argparse's help ignores an OSError). ``said``: set by a CLI that said an error on stderr
    before the JSON document of that error failed to be written: the exit code of that error."""

    said: int | None = None


class _WatchedStdout:
    """Standard output (``stream``), whose failed writes and flushes raise :class:`StdoutFailed`; a reader gone still
    raises BrokenPipeError (each CLI exits 141 for it: :func:`leave_on_closed_stdout`). Everything else is the
    stream's."""

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> int:
        """Return what the stream's ``write`` returns. Raises as :meth:`_call`."""
        return self._call(self._stream.write, text)

    def flush(self) -> None:
        """Flush the stream; returns nothing. Raises as :meth:`_call`."""
        self._call(self._stream.flush)

    @staticmethod
    def _call(method: Any, *args: Any) -> Any:
        """Return ``method(*args)``. Raises BrokenPipeError as it does, StdoutFailed for another OSError."""
        try:
            return method(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise StdoutFailed(exc.strerror or str(exc)) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _stdout_failed(prog: str, why: str | None, stream: Any, code: int) -> NoReturn:
    """Say in one line on stderr, as ``prog``, that standard output could not be written (``why``; None: say nothing,
    an error was said), point its file descriptor (of ``stream``, when it has one) at ``os.devnull`` so that what is
    still buffered does not fail again at exit, and exit with ``code``. Raises SystemExit, always."""
    if why is not None:
        sys.stderr.write(f"{prog}: error: cannot write to standard output ({why}); its output is missing or cut "
                         "short: send it to a file or pipe that can take it\n")
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):  # closed (>&-), or a stream without a descriptor
        pass
    sys.exit(code)


@contextmanager
def watched_stdout(prog: str) -> Iterator[None]:
    """Run the body (a CLI's whole run, ``prog`` its name) with ``sys.stdout`` watched: output that cannot be written
    (``> /dev/full``, a full disk) or standard output closed (``>&-``: refused at once, before the body) is one line on
    stderr, ``PROG: error: cannot write to standard output (WHY); ...``, and an exit code, never a traceback. The body
    flushes ``sys.stdout`` itself before it ends, where it handles a reader gone (BrokenPipeError passes through).

    Raises:
        SystemExit: standard output is closed or a write to it failed (:class:`StdoutFailed`): with the code of the
            error said before whose document failed (``said``, no second line), else the failing code of the exit
            the write failed during (a command's own exit 4 is kept), else :data:`STDOUT_FAILED`.
    """
    if sys.stdout is None:  # started with it closed (`>&-`): Python gives None
        _stdout_failed(prog, os.strerror(errno.EBADF), None, STDOUT_FAILED)
    real, sys.stdout = sys.stdout, _WatchedStdout(sys.stdout)  # type: ignore[assignment]
    try:
        yield
    except StdoutFailed as exc:
        during = exc.__context__.code if isinstance(exc.__context__, SystemExit) else None
        code = exc.said or (during if isinstance(during, int) and during else STDOUT_FAILED)
        _stdout_failed(prog, None if exc.said else str(exc), real, code)
    finally:
        sys.stdout = real


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
