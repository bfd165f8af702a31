"""Fixtures of the agent tests."""

from __future__ import annotations

import socket

import pytest


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
