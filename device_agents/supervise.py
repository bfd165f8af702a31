"""A plain supervisor for devices without systemd: keeps ``edgekit-agent run`` alive.

``python -m device_agents supervise --config agent.yaml --pidfile agent.pid [--log-file agent.log]``
restarts the agent when it exits unexpectedly (back-off 1 s doubling to 30 s, reset after a minute
of uptime) and stops it with SIGTERM, so it can say offline and keep its spool, when the
supervisor itself gets SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from device_agents.disk import atomic_write

STOP_TIMEOUT_S = 30.0  # how long a stopping agent may take before it is killed


def is_supervisor(cmdline: bytes, root: str) -> bool:
    """Return whether a process command line (``/proc/<pid>/cmdline``: arguments separated by NUL) is the
    agent supervisor of the device root ``root``: it names ``supervise`` and ``<root>/agent.pid``. A pid
    file left by a reboot or a crash may name a process that is now something else."""
    argv = cmdline.split(b"\0")
    return b"supervise" in argv and f"{root}/agent.pid".encode() in argv


def supervise(config: Path, pidfile: Path, log_file: Path | None = None) -> int:
    """Run the agent, restarting it when it exits (after 1 s, doubling to 30 s while it keeps failing within
    a minute), until SIGTERM/SIGINT; ``pidfile`` holds this process's pid meanwhile. The agent runs from its own
    folder, given ``config`` and ``log_file`` as absolute paths from this process's working directory.

    Returns:
        The supervisor's exit code: 0 once stopped, 2 when the agent exited 2 (a config error or
        tampered code: restarting cannot help).
    """
    stopping = False
    child: subprocess.Popen | None = None

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    atomic_write(pidfile, f"{os.getpid()}\n".encode())
    folder = Path(__file__).resolve().parent.parent  # the folder device_agents was imported from
    # -B: no .pyc beside checked code; paths absolute: the agent runs from its own folder, not this one's
    argv = [sys.executable, "-B", "-m", "device_agents", "run", "--config", str(config.absolute())]
    if log_file:
        argv += ["--log-file", str(log_file.absolute())]
    delay = 1.0
    try:
        while not stopping:
            started = time.monotonic()
            child = subprocess.Popen(argv, cwd=folder)  # from the agent's own folder: `-m` finds only that code
            code = child.wait()
            if stopping:
                break
            if code == 2:  # a config error or tampered code: restarting cannot help
                return 2
            delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2, 30.0)
            deadline = time.monotonic() + delay
            while not stopping and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:  # it ignores SIGTERM: killed, never left running without a supervisor
                child.kill()
                child.wait()
        pidfile.unlink(missing_ok=True)
    return 0
