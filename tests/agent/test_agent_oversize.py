"""A message the agent builds over the protocol's 64 KiB payload limit is never spooled.

Every receiver refuses such a message, and the fleet's broker (``max_packet_size``) cuts off a client that sends
one: spooled, it was sent again at every reconnect and cut the agent off each time, with every message behind it.
Now it is counted (``oversize_messages``) and logged; an answer too large to send becomes a refusal that says so, so
the command is still answered; nothing behind it waits."""

from __future__ import annotations

import json
import time

import pytest

from device_agents.config import load_agent_config
from device_agents.errors import MessageTooLarge
from device_agents.service import Agent
from edgekit_protocol import messages
from edgekit_protocol.commands import Command


@pytest.fixture
def agent(tmp_path):
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device: pi-1\nfleet: f\nroot: {tmp_path / 'root'}\nserve: {{enabled: false}}\n")
    agent = Agent(load_agent_config(cfg))
    yield agent
    agent.spool.close()


def _spooled(agent):
    return [(topic.rsplit("/", 1)[-1], json.loads(p)) for _, topic, p in agent.spool.pending()]


def test_an_answer_too_large_to_send_is_sent_as_a_refusal_saying_so(agent, monkeypatch):
    monkeypatch.setattr(agent, "_cmd_state", lambda cmd: {"huge": "x" * messages.MAX_PAYLOAD})
    assert agent.spool.take("c1", b"{}", time.time(), time.time() + 60) is None
    agent.run_command(Command("c1", "state", {}))
    (kind, ack), = [(k, m) for k, m in _spooled(agent) if k == "ack"]
    assert ack["cmd_id"] == "c1" and ack["ok"] is False and ack["result"] == {}
    assert "is over the protocol's 65,536-byte limit: not sent" in ack["error"]
    assert len(messages.encode(ack)) <= messages.MAX_PAYLOAD
    assert agent.spool.stats()["oversize_messages"] == 1
    assert agent.spool.pending_commands() == []  # answered: it left the inbox


def test_other_messages_too_large_are_refused_counted_and_take_no_sequence_number(agent):
    before = [m["seq"] for k, m in _spooled(agent)]
    with pytest.raises(MessageTooLarge, match="a live message of [0-9,]+ bytes is over"):
        agent.emit("live", {"models": [{"note": "x" * messages.MAX_PAYLOAD}]})
    assert [m["seq"] for k, m in _spooled(agent)] == before and agent.spool.stats()["oversize_messages"] == 1
    small = agent.emit("live", {"models": []})
    assert small is not None and small["seq"] == 1  # the refused one left no gap
