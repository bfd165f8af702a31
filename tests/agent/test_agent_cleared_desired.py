"""`edgekit fleet revoke` clears the device's retained ``desired`` on the broker with an empty payload. The agent keeps
a persistent session, so a device readmitted later (``deploy --new-key``) is handed that clear, queued for it, as it
reconnects; the agent refused it as a malformed desired state: one refused command counted and a warning logged on
every readmitted device, for nothing anyone sent. An empty payload on a command topic is still refused."""

from __future__ import annotations

import json
from types import SimpleNamespace

from paho.mqtt.client import MQTTMessage

from device_agents.config import load_agent_config
from device_agents.identity import Signer, encode_key
from device_agents.service import Agent
from edgekit_protocol import messages


def test_an_empty_retained_desired_is_a_clear_acknowledged_not_a_refused_command(tmp_path):
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device: pi-1\nfleet: f\nroot: {tmp_path / 'root'}\nserve: {{enabled: false}}\n")
    agent = Agent(load_agent_config(cfg))
    agent.identity.mkdir(parents=True, exist_ok=True)
    (agent.identity / "operators.json").write_text(json.dumps([encode_key(Signer.generate().public)]))
    acked: list[int] = []
    client = SimpleNamespace(ack=lambda mid, qos: acked.append(mid))
    try:
        for mid, kind in ((3, "desired"), (4, "cmd")):
            message = MQTTMessage(mid=mid, topic=messages.topic("f", "pi-1", kind).encode())
            message.payload, message.qos = b"", 1
            agent._on_message(client, None, message)
        assert acked == [3, 4]  # the broker forgets both
        assert agent._desired_inbox.empty()  # the clear is no desired state to take
        assert agent.spool.stats()["refused_commands"] == 1  # the empty command only
    finally:
        agent.spool.close()
