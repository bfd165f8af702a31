"""Integration fixtures: a real Mosquitto on a free loopback port, real agents as subprocesses."""

from __future__ import annotations

from typing import Any

import pytest
from harness import AgentProcess, Monitor

from edge_kit.sim.broker import MosquittoBroker


@pytest.fixture
def mosquitto(tmp_path):
    broker = MosquittoBroker(tmp_path / "broker").start()
    yield broker
    broker.stop()


@pytest.fixture
def agents(tmp_path, mosquitto, digits_artifacts):
    """Factory: start an agent for a device name; everything is stopped after the test."""
    started: list[AgentProcess] = []

    def start(name: str = "dev1", **config: Any) -> AgentProcess:
        agent = AgentProcess(tmp_path, name, mosquitto, digits_artifacts, **config).start()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


@pytest.fixture
def monitor(mosquitto):
    mon = Monitor(mosquitto.host, mosquitto.port)
    yield mon
    mon.close()
