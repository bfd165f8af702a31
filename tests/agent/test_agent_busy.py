"""protocol.md: a command that finds the agent's command queue full (``max_queued_commands``) is answered ``busy``,
retry later; it is neither run later behind the sender's back nor left unanswered."""

from __future__ import annotations

import json
import time

from device_agents.config import load_agent_config
from device_agents.identity import Signer, encode_key
from device_agents.service import Agent
from edgekit_protocol import messages
from edgekit_protocol.commands import command


def test_a_command_that_finds_the_queue_full_is_answered_busy_and_never_run_later(tmp_path):
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device: pi-1\nfleet: f\nroot: {tmp_path / 'root'}\nmax_queued_commands: 1\n"
                   "serve: {enabled: false}\n")
    agent = Agent(load_agent_config(cfg))
    operator = Signer.generate()
    agent.identity.mkdir(parents=True, exist_ok=True)
    (agent.identity / "operators.json").write_text(json.dumps([encode_key(operator.public)]))
    try:
        sent = [operator.sign(command("f", "pi-1", "state", {}, seq=i, expires=time.time() + 60)) for i in (1, 2)]
        for message in sent:
            agent._take(messages.encode(message))
        assert agent.commands.qsize() == 1 and agent.commands.get_nowait().msg_id == sent[0]["msg_id"]
        acks = [json.loads(p) for _, topic, p in agent.spool.pending() if topic.endswith("/cmd/ack")]
        assert [(a["cmd_id"], a["ok"], a["error"]) for a in acks] == [
            (sent[1]["msg_id"], False, "busy: 1 commands queued; retry later")]
        inbox = [json.loads(payload)["msg_id"] for payload, _started in agent.spool.pending_commands()]
        assert inbox == [sent[0]["msg_id"]]  # the busy one was answered: no restart runs it behind the sender's back
    finally:
        agent.spool.close()
