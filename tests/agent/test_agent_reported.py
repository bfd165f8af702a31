"""The agent's retained ``reported`` state (what `edgekit rollout status` reads) is never lost to one failed try.

A reported body that could not be signed or handed to the broker connection was lost until the next reconnect: the
exception ended the reconcile step (the service loop logged it and went on), and nothing published the body again, so
the operator saw the device's previous state. Now the failure is counted (``unsent_reports``), logged in one line, and
the main loop publishes the newest body again until it goes out. The agent's loop runs for real here, against a
broker port nobody listens on; only the signer or the publisher is made to fail once.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import pytest

from device_agents import service
from device_agents.identity import Keyring
from device_agents.service import Agent
from edgekit_protocol.messages import MAX_PAYLOAD, SCHEMAS


@pytest.mark.parametrize("fails", ["signer", "publisher"])
def test_a_reported_state_that_failed_once_is_counted_and_published_on_the_next_tick(offline_config, tmp_path, monkeypatch, fails):
    monkeypatch.setattr(service, "REPORT_RETRY_S", 0.3)
    agent = Agent(offline_config())
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


class _Connected:
    is_failure = False


class _Client:
    def subscribe(self, *_a, **_k):
        return (0, 1)


def _run_until(agent: Agent, done, timeout: float = 20.0) -> None:
    """Run the agent's loop for real until ``done()`` holds (or ``timeout``), then stop it."""
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        agent.stop()
        runner.join(10)


def test_a_reported_state_never_published_before_a_restart_is_published_once_the_started_agent_connects(
        offline_config, tmp_path, monkeypatch):
    """The desired state converged, its report could not be published, and the agent restarted: the restarted agent
    has nothing to reconcile (converged), and the broker's redelivered desired state is the one on disk; it publishes
    the persisted reported state as soon as it connects, not the rollout's next state change."""
    agent = Agent(offline_config())
    tried: list[dict] = []

    def unreachable(topic, payload, *, retain=False, row=None):
        if topic.endswith("/reported"):
            tried.append(json.loads(payload))
            raise OSError("the broker connection is gone")
        return None

    monkeypatch.setattr(agent.publisher, "publish", unreachable)
    agent._desired_inbox.put(({"msg_id": "m1", "rollout": "r1", "revision": 1, "hold": True}, 1, 1))
    _run_until(agent, lambda: bool(tried))
    assert tried and tried[0]["state"] == "converged", "the first agent never tried to report"
    agent.spool.close()

    again = Agent(agent.cfg)
    published: list[tuple[str, dict, bool]] = []

    def publish(topic, payload, *, retain=False, row=None):
        if topic.endswith("/reported"):
            published.append((topic, json.loads(payload), retain))
        return None

    monkeypatch.setattr(again.publisher, "publish", publish)
    again._on_connect(_Client(), None, None, _Connected(), None)  # what paho's network thread calls on connecting
    _run_until(again, lambda: bool(published))
    assert len(published) == 1, "the restarted agent did not publish its reported state on connecting"
    topic, msg, retain = published[0]
    assert topic == "edgekit/v1/f/pi-1/reported" and retain
    assert (msg["state"], msg["rollout"], msg["revision"]) == ("converged", "r1", 1)
    Keyring(devices={"pi-1": again.signer.public}).verify(msg, "pi-1")
    assert msg["msg_id"] != tried[0]["msg_id"], "a new message, not a replay of the failed try's"
    # the failed try never went out: the one that did has its number, so no receiver sees a gap
    assert msg["seq"] == tried[0]["seq"] == 1


def test_a_persisted_reported_state_of_another_desired_state_is_not_taken(offline_config, tmp_path):
    """A reported.json left from a desired state other than desired.json's (a write that failed in between) is not
    published: it would say the device stands where it does not."""
    agent = Agent(offline_config())
    root = agent.cfg.root
    agent.spool.close()
    (root / "desired.json").write_text(json.dumps({"message": {"msg_id": "m2", "rollout": "r2", "revision": 2,
                                                               "hold": True}, "converged": True, "attempts": 0}))
    (root / "reported.json").write_text(json.dumps({"rollout": "r1", "revision": 1, "state": "converged"}))
    again = Agent(agent.cfg)
    try:
        assert again.reconciler.last is None
    finally:
        again.spool.close()


@pytest.mark.parametrize("content", [b'{"rollout": "r2", "revision": 2, "state": "converged", "x": NaN}',
                                     b'{"rollout": "r2", "revision": 2, "state": "owned"}',
                                     b'{"rollout": "r2", "revision": 2, "state": "converged"',
                                     b"[1, 2]", b'{"rollout": "r2", "revision": 2, "state": "converged", "pad": "'
                                     + b"a" * 70_000 + b'"}'])
def test_a_damaged_persisted_reported_state_is_not_taken(offline_config, tmp_path, content):
    """reported.json is read back at start and published signed: a non-finite number, a state the protocol does not
    know, a truncated or oversized file is not taken (logged); the next reconcile step reports afresh."""
    agent = Agent(offline_config())
    root = agent.cfg.root
    agent.spool.close()
    (root / "desired.json").write_text(json.dumps({"message": {"msg_id": "m2", "rollout": "r2", "revision": 2,
                                                               "hold": True}, "converged": True, "attempts": 0}))
    (root / "reported.json").write_bytes(content)
    again = Agent(agent.cfg)
    try:
        assert again.reconciler.last is None
    finally:
        again.spool.close()
    (root / "reported.json").write_bytes(b'{"rollout": "r2", "revision": 2, "state": "converged"}')
    sound = Agent(agent.cfg)  # the same file, sound: taken
    try:
        assert sound.reconciler.last == {"rollout": "r2", "revision": 2, "state": "converged"}
    finally:
        sound.spool.close()


def _recording(agent: Agent, monkeypatch, fail: dict[str, int]) -> tuple[list[dict], list[dict]]:
    """Replace the agent's publisher by one that raises for the next ``fail["left"]`` reported messages; return the
    reported messages tried and the ones that went out (verified as a receiver verifies them)."""
    tried: list[dict] = []
    sent: list[dict] = []
    keyring = Keyring(devices={"pi-1": agent.signer.public})

    def publish(topic, payload, *, retain=False, row=None):
        if topic.endswith("/reported"):
            msg = json.loads(payload)
            tried.append(msg)
            if fail["left"]:
                fail["left"] -= 1
                raise OSError("the broker connection is gone")
            assert len(payload) <= MAX_PAYLOAD, "a payload over the protocol's limit was handed to the broker"
            keyring.verify(msg, "pi-1")  # signed, as every message
            sent.append(msg)
        return None

    monkeypatch.setattr(agent.publisher, "publish", publish)
    return tried, sent


def test_failed_tries_of_a_reported_state_take_no_sequence_number(offline_config, tmp_path, monkeypatch):
    """Each failed try took a new seq: a broker outage of N tries numbered N messages that never existed, and a
    receiver checking the sequence saw a gap for each (a false alarm). The number is taken once it goes out: the
    reported messages that went out are numbered 1, 2, 3 whatever failed in between, across a restart too."""
    agent = Agent(offline_config())
    fail = {"left": 3}
    tried, sent = _recording(agent, monkeypatch, fail)
    body = {"rollout": "r1", "revision": 1, "state": "fetching"}
    agent._report(body)
    while agent._report_retry_at is not None:  # what _report_when_due does, without its wait
        agent._report(body)
    agent._report({**body, "state": "converged"})
    assert [m["seq"] for m in tried] == [1, 1, 1, 1, 2]
    assert [(m["seq"], m["state"]) for m in sent] == [(1, "fetching"), (2, "converged")]
    assert agent.spool.stats()["unsent_reports"] == 3
    fail["left"] = 2
    agent._report({**body, "revision": 2, "state": "fetching"})  # fails: a newer body comes before it went out
    agent._report({**body, "revision": 2, "state": "failed", "error": "hash mismatch"})  # fails
    agent.spool.close()
    again = Agent(agent.cfg)  # restarted during the outage
    try:
        _, sent_again = _recording(again, monkeypatch, {"left": 0})
        again._report({**body, "revision": 2, "state": "converged"})
        assert [m["seq"] for m in sent + sent_again] == [1, 2, 3]
    finally:
        again.spool.close()


def test_a_reported_state_over_the_payload_limit_is_counted_and_never_handed_to_the_broker(offline_config, tmp_path, monkeypatch):
    """The reported state was published without the payload check every other message has: one over the limit
    (a model's metadata of many kilobytes in ``current``) went to the broker, which cuts off a client sending it,
    at every reconnect (it is re-sent on each). Now it is refused before it is signed out: counted as
    ``oversize_messages``, logged, not retried on every tick, nothing spooled; the agent goes on, and the next
    reported state is published under the number the refused one did not take."""
    agent = Agent(offline_config())
    try:
        tried, sent = _recording(agent, monkeypatch, {"left": 0})
        agent._report({"rollout": "r1", "revision": 1, "state": "converged",
                       "current": {"sha256": "a" * 64, "variant": "v" * MAX_PAYLOAD}})
        assert tried == [] and sent == []
        stats = agent.spool.stats()
        assert (stats["oversize_messages"], stats["unsent_reports"], stats["pending"]) == (1, 0, 0)
        assert agent._report_retry_at is None  # not tried again: it would never go out
        agent._report({"rollout": "r1", "revision": 2, "state": "converged"})
        assert [(m["seq"], m["revision"]) for m in sent] == [(1, 2)]
    finally:
        agent.spool.close()


def test_two_threads_reporting_at_once_number_their_reported_messages_uniquely_and_consecutively(offline_config, tmp_path, monkeypatch):
    """``reported`` is numbered only once it went out (upcoming_seq, then took_seq): two threads reporting at once (a
    reconcile step and a redelivered desired state, or a retry) both read the same upcoming number and published two
    messages under one seq, which receivers order by (one of them taken for a replay)."""
    agent = Agent(offline_config())
    seqs: list[int] = []

    def publish(topic, payload, *, retain=False, row=None):
        if topic.endswith("/reported"):
            time.sleep(0)  # let the other thread run between the number taken and the number kept, as a broker may
            seqs.append(json.loads(payload)["seq"])
        return None

    monkeypatch.setattr(agent.publisher, "publish", publish)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as a loaded 2-core device may
    body = {"rollout": "r1", "revision": 1, "state": "converged", "want": None, "current": None, "attempt": 0,
            "download": None, "error": None}
    start = threading.Barrier(2)

    def report_many() -> None:
        start.wait()
        for _ in range(300):
            agent._report(body)

    try:
        threads = [threading.Thread(target=report_many) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        sys.setswitchinterval(interval)
        agent.spool.close()
    assert len(seqs) == 600
    assert sorted(seqs) == list(range(seqs[0], seqs[0] + 600)), "two reported messages went out under one seq"
    assert seqs == sorted(seqs)  # in the order they were numbered


@pytest.mark.parametrize("simulated", [True, False])
def test_a_simulated_devices_reported_state_says_so_as_its_status_does(offline_config, tmp_path, monkeypatch, simulated):
    """Found walking `edgekit sim up` + `edgekit rollout start`: the agents of a simulated fleet reported their
    rollout states without ``simulated``, so the rollout's table and ``--json`` (``"simulated": false`` per row) gave
    no sign that nothing of it ran on the profile's hardware, while their status and bench records said so."""
    agent = Agent(offline_config("simulated: true\n" if simulated else ""))
    try:
        _, sent = _recording(agent, monkeypatch, {"left": 0})
        agent._report({"rollout": "r1", "revision": 1, "state": "converged"})
        assert [m.get("simulated") for m in sent] == [True if simulated else None]
    finally:
        agent.spool.close()
