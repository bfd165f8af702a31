"""A periodic message (telemetry, live, shadow) that cannot be signed is refused alone; the agent goes on.

A NaN or an infinity in a telemetry, live or shadow body (a sensor file reading ``nan``, a figure from a runtime) made
the canonical form raise out of :meth:`Agent.telemetry`: the service loop logged a traceback at every interval, the
round's other messages (``live`` after a bad telemetry) never went out, nothing counted it, and during a long command
the error left :meth:`Agent.run_command` while its worker still ran, so the next command ran beside it. Now each such
message is refused alone: counted (``unsignable_messages``, as an answer that cannot be signed), logged in one line;
the others of its round and the next rounds go out. The agent's loop runs for real here, against a broker port
nobody listens on (every message stays in the spool, where the test reads it).
"""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from device_agents import service
from device_agents.service import Agent
from edgekit_protocol.commands import Command


@pytest.fixture
def agent(offline_config):
    return Agent(offline_config("telemetry_interval_s: 0.1\n"))


def _spooled(agent):
    return [(topic.rsplit("/", 1)[-1], json.loads(p)) for _, topic, p in agent.spool.pending()]


def _nan_first(real, times: int):
    """Return a figure source that gives a NaN in its body ``times`` times, then what ``real`` gives."""
    left = {"n": times}

    def source():
        if left["n"]:
            left["n"] -= 1
            return {"temperature_c": float("nan")}
        return real()
    return source


def test_a_telemetry_or_live_body_holding_a_nan_is_refused_alone_and_the_agent_goes_on(agent, monkeypatch, caplog):
    monkeypatch.setattr(service.conditions, "snapshot", _nan_first(service.conditions.snapshot, 2))
    lives = iter([{"model": {"sha256": "a" * 64}, "p50_ms": float("inf")}])  # the first round's live: an infinity
    monkeypatch.setattr(agent, "served", lambda: [("live", next(lives, {"model": {"sha256": "a" * 64}, "p50_ms": 1.5}))])
    caplog.set_level(logging.INFO, logger="edgekit.agent")
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sum(k == "telemetry" for k, _ in _spooled(agent)) < 2:
            time.sleep(0.02)
        assert runner.is_alive(), "the agent stopped"
    finally:
        agent.stop()
        runner.join(10)
    agent = Agent(agent.cfg)  # run() closed its spool: read what it left, as the next start does
    spooled = _spooled(agent)
    telemetry = [m for k, m in spooled if k == "telemetry"]
    assert len(telemetry) >= 2, "no telemetry went out after the refused ones"
    assert all(m["conditions"].get("temperature_c") == m["conditions"].get("temperature_c") for m in telemetry)
    # the first two rounds' telemetry was refused; their live messages went out all the same (but the first, an inf)
    lives_out = [m for k, m in spooled if k == "live"]
    assert len(lives_out) >= 3 and all(m["p50_ms"] == 1.5 for m in lives_out)
    assert [m["seq"] for m in telemetry] == list(range(1, len(telemetry) + 1))  # a refused message takes no seq
    assert agent.spool.stats()["unsignable_messages"] == 3
    assert telemetry[-1]["spool"]["unsignable_messages"] >= 2  # said in the telemetry itself
    refusals = [r for r in caplog.records if "which no signed message can carry: not sent" in r.getMessage()]
    assert len(refusals) == 3 and all(r.exc_info is None for r in refusals)  # one line each, no traceback
    assert not [r for r in caplog.records if "the service loop met an error" in r.getMessage()]
    agent.spool.close()


def test_a_telemetry_refused_during_a_long_command_does_not_end_the_command_early(agent, monkeypatch):
    """A long command runs in a worker while the main thread sends telemetry; a telemetry that could not be signed
    made run_command return (raise) while the worker still ran, so the next command would run beside it."""
    monkeypatch.setattr(service.conditions, "snapshot", _nan_first(service.conditions.snapshot, 1))
    agent._next_telemetry = 0.0
    done = threading.Event()

    def handle(cmd):
        time.sleep(0.6)
        done.set()

    monkeypatch.setattr(agent, "handle", handle)
    agent.run_command(Command("c1", "bench", {}))
    assert done.is_set(), "run_command returned while its command still ran"
    assert agent.spool.stats()["unsignable_messages"] == 1
    agent.spool.close()


def test_a_telemetry_round_that_fails_otherwise_during_a_long_command_is_logged_and_the_command_waited_for(
        agent, monkeypatch, caplog):
    """Any other failure of a telemetry round (a database error, a sensor that raises) left run_command the same
    way, with the command still running; it is logged in one line and the command waited for."""
    def broken():
        raise RuntimeError("the spool's database is locked")

    monkeypatch.setattr(agent, "telemetry", broken)
    agent._next_telemetry = 0.0
    done = threading.Event()
    monkeypatch.setattr(agent, "handle", lambda cmd: (time.sleep(0.6), done.set()))
    agent.run_command(Command("c1", "install", {}))
    assert done.is_set(), "run_command returned while its command still ran"
    assert any("telemetry during install failed (RuntimeError: the spool's database is locked)" in r.getMessage()
               for r in caplog.records)
    agent.spool.close()


def test_a_shadow_comparison_that_cannot_be_signed_is_refused_once_not_at_every_interval(agent, monkeypatch):
    shadow = {"model": {"sha256": "b" * 64}, "run": 1, "compared": 3, "errors": 0, "dropped_queue_full": 0,
              "skipped_rate": 0, "skipped_busy_cpu": 0, "max_abs_error": float("nan")}
    monkeypatch.setattr(agent, "served", lambda: [("live", {"model": {"sha256": "a" * 64}, "p50_ms": 1.5})] + (
        [("shadow", shadow)] if agent._shadow_counts(shadow) != agent._shadow_sent else []))
    agent.telemetry()
    agent.telemetry()
    assert agent.spool.stats()["unsignable_messages"] == 1
    assert [k for k, _ in _spooled(agent)] == ["telemetry", "live", "telemetry", "live"]
    agent.spool.close()
