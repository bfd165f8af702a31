"""The agent's log file stays bounded whatever is published at it, and quoted text cannot forge its lines."""

from __future__ import annotations

import contextlib

import pytest

from device_agents import service


@pytest.fixture
def agent_log(logging_kept):
    """Return ``logging_to(path)``: log to ``path`` as the agent does (``service.log_to``) for the block; the root
    logger's handlers flushed, closed and put back after."""

    @contextlib.contextmanager
    def logging_to(path):
        with logging_kept():
            service.log_to(path)
            yield

    return logging_to


def test_a_flood_of_refused_commands_cannot_grow_the_agent_log_without_bound(tmp_path, monkeypatch, agent_log):
    """Every refused command is a warning line in ``<root>/agent.log`` (the supervisor's --log-file), which was a
    plain file: a flood of garbage on the device's cmd topic filled its storage line by line. It is now cut at
    LOG_MAX_BYTES with one older part kept, and the newest lines are in the file."""
    monkeypatch.setattr(service, "LOG_MAX_BYTES", 50_000)
    with agent_log(tmp_path / "agent.log"):
        for i in range(5_000):
            service.log.warning("refused a command: the signature does not verify as operator's; refused %d", i)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["agent.log", "agent.log.1"]
    assert all((tmp_path / f).stat().st_size <= 50_000 for f in files)
    assert (tmp_path / "agent.log").read_text().rstrip().endswith("refused 4999")


def test_text_from_a_model_or_a_message_cannot_forge_or_colour_a_log_line(tmp_path, agent_log):
    """A model's tensor name (or a refused payload) quoted in a log line wrote its newlines and escape
    sequences as they were: one line could pass for several, e.g. a forged 'activated' entry."""
    with agent_log(tmp_path / "agent.log"):
        service.log.error("%s", "smoke check failed: input x\n2026-01-01 00:00:00,000 INFO edgekit: activated \x1b[2J")
    text = (tmp_path / "agent.log").read_text()
    assert text.count("\n") == 1 and "\x1b" not in text and "INFO edgekit: activated \\x1b[2J" in text


def test_a_broker_the_agent_cannot_reach_is_logged_once_not_silently_retried(tmp_path, caplog):
    """An agent whose broker.port was wrong (nothing listening) retried in silence: its log said it served a
    model and nothing else. The refused connection is now one warning naming broker.host and broker.port, once
    until a connection succeeds, however often paho retries."""
    import socket
    import time

    from device_agents.config import load_agent_config

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device: pi-1\nfleet: f\nroot: {tmp_path / 'root'}\nbroker: {{host: 127.0.0.1, port: {port}}}\n"
                   "serve: {enabled: false}\n")
    agent = service.Agent(load_agent_config(cfg))
    agent.client.reconnect_delay_set(0.05, 0.05)
    caplog.set_level("WARNING", logger="edgekit.agent")
    try:
        agent.client.connect_async("127.0.0.1", port)
        agent.client.loop_start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not [r for r in caplog.records if r.getMessage().startswith("cannot reach")]:
            time.sleep(0.05)
        time.sleep(0.5)  # several more retries
    finally:
        agent.client.loop_stop()
        agent.spool.close()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cannot reach")]
    assert said == [f"cannot reach the broker at 127.0.0.1:{port} (check broker.host and broker.port in agent.yaml); "
                    "retrying, records stay in the spool, the serving API serves meanwhile"]
