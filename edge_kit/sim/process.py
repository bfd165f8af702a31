"""Stopping the local processes the simulated fleet starts (by handle, or by pid from another process)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM a child and wait for it; SIGKILL after ``timeout``. No-op when it has exited."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def alive(pid: int) -> bool:
    """Return True while a process with ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def processes(match: Callable[[bytes], bool]) -> list[int]:
    """Return the pids of the running processes whose command line (``/proc/<pid>/cmdline``, arguments
    separated by NUL) ``match`` accepts; [] without ``/proc``."""
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    found = []
    for entry in entries:
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:  # it ended meanwhile
            continue
        if match(cmdline):
            found.append(int(entry))
    return found


def started_at(pid: int | None) -> int | None:
    """Return when process ``pid`` started (clock ticks after boot, ``/proc/<pid>/stat`` field 22), or
    None when no such process runs: with the pid, what tells a process from a later one given its pid."""
    if not pid:
        return None
    try:
        raw = open(f"/proc/{pid}/stat", "rb").read()
        return int(raw[raw.rindex(b")") + 2:].split()[19])  # the fields after the command name start at 3
    except (OSError, ValueError, IndexError):
        return None


def terminate_pid(pid: int | None, timeout: float = 15.0, started: int | None = None) -> bool:
    """SIGTERM ``pid`` (started by another process, e.g. `sim up`) and wait; SIGKILL after ``timeout``.

    ``started`` (:func:`started_at` when it was started): the pid is left alone unless it is still that
    process. After a reboot, or once it has exited, the pid may belong to something else.

    Returns:
        True when the process was running and has been stopped; False when there was none to stop (no pid, gone
        already, or the pid now names another process).
    """
    if not pid or not alive(pid) or (started is not None and started_at(pid) != started):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it when it is our own child
        except ChildProcessError:
            pass
        time.sleep(0.05)
    if alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # ended between the check and the kill
            pass
    return True


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C back while the block runs (cleanup that must finish: stopping what was started, or a
    fleet is left half running); a SIGINT received meanwhile is raised as KeyboardInterrupt when the block
    ends. Outside the main thread (where no signal arrives) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
