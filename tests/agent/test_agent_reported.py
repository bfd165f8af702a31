"""The agent's retained ``reported`` state (what `edgekit rollout status` reads) is never lost to one failed try.

A reported body that could not be signed or handed to the broker connection was lost until the next reconnect: the
exception ended the reconcile step (the service loop logged it and went on), and nothing published the body again, so
the operator saw the device's previous state. Now the failure is counted (``unsent_reports``), logged in one line, and
the main loop publishes the newest body again until it goes out. The agent's loop runs for real here, against a
broker port nobody listens on; only the signer or the publisher is made to fail once.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from device_agents import service
from device_agents.config import load_agent_config
from device_agents.identity import Keyring
from device_agents.service import Agent
from edgekit_protocol.messages import SCHEMAS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent(tmp_path) -> Agent:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device: pi-1\nfleet: f\nroot: {tmp_path / 'root'}\nserve: {{enabled: false}}\n"
                   f"broker: {{host: 127.0.0.1, port: {_free_port()}}}\n")
    return Agent(load_agent_config(cfg))


@pytest.mark.parametrize("fails", ["signer", "publisher"])
def test_a_reported_state_that_failed_once_is_counted_and_published_on_the_next_tick(tmp_path, monkeypatch, fails):
    monkeypatch.setattr(service, "REPORT_RETRY_S", 0.3)
    agent = _agent(tmp_path)
    published: list[tuple[str, dict, bool]] = []
    failures = {"left": 1}
    real_sign, real_publish = agent.signer.sign, agent.publisher.publish

    def sign(message):
        if fails == "signer" and message["schema"] == SCHEMAS["reported"] and failures["left"]:
            failures["left"] -= 1
            raise ValueError("the signing key could not be read")
        return real_sign(message)

    def publish(topic, payload, *, retain=False, row=None):
        if topic.endswith("/reported"):
            if fails == "publisher" and failures["left"]:
                failures["left"] -= 1
                raise OSError("the broker connection is gone")
            published.append((topic, json.loads(payload), retain))
            return None
        return real_publish(topic, payload, retain=retain, row=row)

    monkeypatch.setattr(agent.signer, "sign", sign)
    monkeypatch.setattr(agent.publisher, "publish", publish)
    # a verified desired state, as the network thread hands it over: hold the device on its model
    agent._desired_inbox.put(({"msg_id": "m1", "rollout": "r1", "revision": 1, "hold": True}, 1, 1))
    runner = threading.Thread(target=agent.run, daemon=True)
    started = time.monotonic()
    runner.start()
    try:
        deadline = time.monotonic() + 20
        while not published and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        agent.stop()
        runner.join(10)
    assert failures["left"] == 0, "the failure was never met"
    assert len(published) == 1, "the reported state was lost after one failed try"
    topic, msg, retain = published[0]
    assert topic == "edgekit/v1/f/pi-1/reported" and retain
    assert (msg["state"], msg["rollout"], msg["revision"]) == ("converged", "r1", 1)
    Keyring(devices={"pi-1": agent.signer.public}).verify(msg, "pi-1")  # signed, as every message
    assert time.monotonic() - started >= 0.3  # on a later tick, not in a busy loop
    again = Agent(agent.cfg)  # the count is persisted: the next start still shows it (state, telemetry)
    try:
        assert again.spool.stats()["unsent_reports"] == 1
    finally:
        again.spool.close()
