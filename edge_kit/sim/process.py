"""Stopping the local processes the simulated fleet starts (by handle, or by pid from another process)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from device_agents.disk import pid_alive


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0, grace: float = 0.0) -> None:
    """SIGTERM a child and wait for it; SIGKILL after ``timeout``. No-op when it has exited.

    ``grace``: seconds to wait first for a child already told to exit another way (its stdin closed, a
    command sent) before the SIGTERM: one that hangs is stopped, never left running after its caller."""
    if proc is None or proc.poll() is not None:
        return
    if grace:
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()



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
    return terminate_pids([(pid, started)], timeout)[0]


def terminate_pids(pids: list[tuple[int | None, int | None]], timeout: float = 15.0) -> list[bool]:
    """:func:`terminate_pid` for several processes at once, each ``(pid, started)``: every one is sent SIGTERM
    first, then all are waited for together (their shutdowns overlap), and SIGKILLed ``timeout`` s after.

    Returns:
        For each, in order, whether it was running and has been stopped (see :func:`terminate_pid`).
    """
    running = [bool(pid) and pid_alive(pid) and (started is None or started_at(pid) == started) for pid, started in pids]
    for (pid, _), sent in zip(pids, running):
        if sent:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:  # ended since the check: stopped all the same
                pass
    waiting = {pid for (pid, _), sent in zip(pids, running) if sent}
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for pid in list(waiting):
            if not pid_alive(pid):  # a zombie (exited, not reaped yet) does not run
                waiting.discard(pid)
            try:
                os.waitpid(pid, os.WNOHANG)  # reap it when it is our own child (after the check: never left a zombie)
            except ChildProcessError:
                pass
        if waiting:
            time.sleep(0.05)
    for pid in waiting:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # ended between the check and the kill
            pass
    return running


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
