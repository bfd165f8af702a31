"""Fixtures of the agent tests."""

from __future__ import annotations

import contextlib
import logging
import socket

import pytest

# the installed interpreter runtime, imported before a test fakes ctypes.CDLL (as the Edge TPU's library loading or
# not): the runtime's own import loads its library through it (device_agents.smoke's import no longer imports it)
import device_agents.runtimes.preload  # noqa: F401


@contextlib.contextmanager
def root_logging_kept():
    """Run the block, which configures logging as the agent does (``service.log_to``, which ``main(["run", ...])``
    runs too), then put the root logger's handlers and level back, the handlers it added flushed and closed: else the
    later tests' records go to a handler on this test's closed capture stream ("--- Logging error ---" on their
    stderr). Use it inside the test (pytest's own log handlers change between its phases). Yields nothing."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.flush()
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.fixture
def logging_kept():
    """:func:`root_logging_kept`, for a test that runs the agent, or its log set-up, in-process."""
    return root_logging_kept


@pytest.fixture
def offline_config(tmp_path):
    """Return ``make(extra="", serve="{enabled: false}")``, which writes agent.yaml for device pi-1 of fleet f (root
    ``tmp_path/root``, the ``serve`` block given, its broker a free loopback port nobody listens on: the agent runs offline, spooling what it publishes, with
    ``extra`` YAML lines appended) and returns it loaded (:class:`device_agents.config.AgentConfig`)."""
    from device_agents.config import load_agent_config

    def make(extra: str = "", serve: str = "{enabled: false}"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cfg = tmp_path / "agent.yaml"
        cfg.write_text(f"device: pi-1\nfleet: f\nroot: {tmp_path / 'root'}\nserve: {serve}\n"
                       f"broker: {{host: 127.0.0.1, port: {port}}}\n{extra}")
        return load_agent_config(cfg)

    return make


@pytest.fixture
def request_as_evicted(monkeypatch):
    """Return ``arm(send)``: the next time the serving server chooses a connection to evict for a new
    client, ``send()`` runs after the choice and before the chosen connection's reading side is shut
    (then 0.3 s pass, for its thread to read and answer what was sent): a microsecond race, made certain."""
    import threading
    import time

    import device_agents.serving.server as server_module

    looked, clock = server_module._readable, server_module.time
    chose: list = []  # the thread that looked for unread bytes: its next clock read follows the choice
    sends: list = []

    def look(sock):
        chose[:] = [threading.current_thread()]
        return looked(sock)

    class Clock:
        def __getattr__(self, name):
            return getattr(clock, name)

        def monotonic(self):
            if chose and sends and chose[0] is threading.current_thread():
                chose.clear()
                sends.pop()()
                time.sleep(0.3)
            return clock.monotonic()

    monkeypatch.setattr(server_module, "_readable", look)
    monkeypatch.setattr(server_module, "time", Clock())
    return sends.append


@pytest.fixture(autouse=True)
def _edge_tpu_unprobed(tmp_path_factory, monkeypatch):
    """Each test starts with no Edge TPU probe remembered and none listed by this machine's kernel (an empty sysfs
    and /dev): what a test's fake ``load_delegate`` says is all there is."""
    from device_agents.targets import edgetpu

    empty = tmp_path_factory.mktemp("no-edgetpu")
    monkeypatch.setattr(edgetpu, "SYSFS_USB", empty)
    monkeypatch.setattr(edgetpu, "DEV", empty)
    edgetpu.EdgeTpu.forget()
    edgetpu.EdgeTpu._held.clear()
    yield
    edgetpu.EdgeTpu.forget()


@pytest.fixture
def imports_meanwhile(monkeypatch):
    """Return ``count(fn)``: runs ``fn()`` and returns how many import statements naming numpy ran meanwhile, in any
    thread (each call of ``builtins.__import__`` for it: an ``import numpy`` inside a function runs one per call,
    even with numpy imported long before)."""
    import builtins

    real = builtins.__import__
    seen: list[str] = []

    def counting(name, *args, **kwargs):
        if name.split(".")[0] == "numpy":
            seen.append(name)
        return real(name, *args, **kwargs)

    def count(fn) -> int:
        seen.clear()
        with monkeypatch.context() as m:
            m.setattr(builtins, "__import__", counting)
            fn()
        return len(seen)

    return count
