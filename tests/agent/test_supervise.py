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


def test_an_agent_that_ignores_sigterm_is_killed_not_left_running_without_its_supervisor(tmp_path, monkeypatch):
    """The supervisor waited 30 s for a stopping agent, then ended with TimeoutExpired: the agent ran on,
    orphaned (the next deploy started a second one with the same identity), and agent.pid stayed."""
    import subprocess

    handlers = {}
    monkeypatch.setattr(sv.signal, "signal", lambda sig, handler: handlers.__setitem__(sig, handler))
    monkeypatch.setattr(sv, "STOP_TIMEOUT_S", 0.01)
    pidfile = tmp_path / "agent.pid"
    calls: list[str] = []

    class Stubborn:
        def __init__(self, argv, cwd):
            self.killed = False

        def wait(self, timeout=None):
            if not calls:
                calls.append("running")
                handlers[signal.SIGTERM]()  # systemd stops the service while the agent runs
                return 0
            if timeout is not None and not self.killed:
                calls.append("still running")
                raise subprocess.TimeoutExpired("agent", timeout)
            return -signal.SIGKILL

        def poll(self):
            return -signal.SIGKILL if self.killed else None

        def terminate(self):
            calls.append("SIGTERM")

        def kill(self):
            calls.append("SIGKILL")
            self.killed = True

    monkeypatch.setattr(sv.subprocess, "Popen", Stubborn)
    assert sv.supervise(tmp_path / "agent.yaml", pidfile) == 0
    assert calls == ["running", "SIGTERM", "SIGTERM", "still running", "SIGKILL"] and not pidfile.exists()


def test_a_relative_config_and_log_file_are_given_to_the_agent_from_where_the_supervisor_was_started(tmp_path,
                                                                                                   monkeypatch):
    """``edgekit-agent supervise --config agent.yaml`` from the device's root: the supervisor read agent.yaml there,
    then started the agent from the agent's own folder with the same relative path: it found no agent.yaml, exited 2
    (a config error) and the supervisor with it, and a relative --log-file was written into the agent's code. The
    agent is given both as absolute paths, taken from where the supervisor was started."""
    handlers = {}
    monkeypatch.setattr(sv.signal, "signal", lambda sig, handler: handlers.__setitem__(sig, handler))
    monkeypatch.chdir(tmp_path)
    argvs: list[list[str]] = []

    class Child:
        def __init__(self, argv, cwd):
            argvs.append(argv)

        def wait(self, timeout=None):
            handlers[signal.SIGTERM]()
            return -signal.SIGTERM

        def poll(self):
            return 0

    monkeypatch.setattr(sv.subprocess, "Popen", Child)
    assert sv.supervise(Path("agent.yaml"), Path("agent.pid"), Path("logs/agent.log")) == 0
    argv = argvs[0]
    assert argv[argv.index("--config") + 1] == str(tmp_path / "agent.yaml")
    assert argv[argv.index("--log-file") + 1] == str(tmp_path / "logs" / "agent.log")
