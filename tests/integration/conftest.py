"""Integration fixtures: a real Mosquitto and a real PostgreSQL on free loopback ports, real agents as subprocesses."""

from __future__ import annotations

import itertools
import os
from typing import Any

import pytest
from harness import AgentProcess, Monitor

from edge_kit.sim.broker import MosquittoBroker


@pytest.fixture
def mosquitto(tmp_path):
    broker = MosquittoBroker(tmp_path / "broker").start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL (Debian's package) on a free loopback port for the session, in a temporary cluster
    (fsync off: throw-away data); as root it runs as the ``postgres`` (or ``nobody``) user."""
    from edge_kit.sim.postgres import PostgresServer

    server = PostgresServer(settings={"fsync": "off", "full_page_writes": "off"}).start()
    yield server
    server.remove()


_databases = itertools.count(1)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """The ``postgresql://`` URL of a new, empty database of the session's server, for one test."""
    return postgres_server.create_database(f"test_{os.getpid()}_{next(_databases)}")


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


@pytest.fixture
def sim(tmp_path):
    """Factory: a simulated fleet of rpi4 devices (real sshd, broker and agents); torn down after."""
    from edge_kit.sim.fleet import SimFleet

    fleets: list[SimFleet] = []

    def up(count: int, profiles: tuple[str, ...] = ("rpi4",), **options):
        fleet_dir = SimFleet(tmp_path / f"sim{len(fleets)}")
        fleets.append(fleet_dir)
        return fleet_dir, fleet_dir.up(count, list(profiles), **options)

    yield up
    for f in fleets:
        f.down()
