"""The supervisor (``edgekit-agent supervise``): restarts the agent, from the agent's own folder."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from device_agents import supervise as sv


def test_an_agent_that_exits_is_restarted_from_the_agent_folder_and_the_pidfile_goes_at_the_end(tmp_path, monkeypatch):
    """The agent exits 1 (a crash): it is started again, after a pause, from the same folder. Before, the
    supervisor kept the exit code in the variable holding that folder, and passed ``cwd=1`` to the restart."""
    handlers = {}
    monkeypatch.setattr(sv.signal, "signal", lambda sig, handler: handlers.__setitem__(sig, handler))
    pidfile = tmp_path / "agent.pid"
    started: list[tuple[object, str]] = []

    class Child:
        def __init__(self, argv, cwd):
            started.append((cwd, pidfile.read_text()))

        def wait(self, timeout=None):
            if len(started) == 2:
                handlers[signal.SIGTERM]()  # systemd stops the service
                return -signal.SIGTERM
            return 1

        def poll(self):
            return 0

        def terminate(self):
            return None

    monkeypatch.setattr(sv.subprocess, "Popen", Child)
    assert sv.supervise(tmp_path / "agent.yaml", pidfile) == 0
    folder = Path(sv.__file__).resolve().parent.parent
    assert started == [(folder, f"{os.getpid()}\n")] * 2
    assert not pidfile.exists()
