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
from device_agents.service import Agent
from edgekit_protocol import messages
from edgekit_protocol.commands import Command
from edgekit_protocol.errors import PayloadTooLarge


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
    with pytest.raises(PayloadTooLarge, match="a live message of [0-9,]+ bytes is over"):
        agent.emit("live", {"models": [{"note": "x" * messages.MAX_PAYLOAD}]})
    assert [m["seq"] for k, m in _spooled(agent)] == before and agent.spool.stats()["oversize_messages"] == 1
    small = agent.emit("live", {"models": []})
    assert small is not None and small["seq"] == 1  # the refused one left no gap


def test_a_message_too_large_for_a_full_spool_leaves_its_bound_and_pending_count_as_they_were(tmp_path):
    """On a full spool, the oldest periodic row is dropped in the same transaction as the new one is built: a
    build refused as too large rolls both back, and the spool's count of pending rows must not move either (it did:
    the spool then held one row beyond its bound, and said one fewer was pending)."""
    from device_agents.spool import Spool
    spool = Spool(tmp_path / "s.db", max_records=2)
    for kind in ("telemetry", "bench"):
        spool.add(kind, f"t/{kind}", lambda seq, kind=kind: f"{kind}:{seq}".encode())

    def too_large(seq):
        raise PayloadTooLarge("a bench message of 70,000 bytes is over the protocol's limit: not sent")

    with pytest.raises(PayloadTooLarge):
        spool.add("bench", "t/bench", too_large)
    assert spool.stats()["pending"] == len(spool.pending()) == 2
    spool.add("bench", "t/bench", lambda seq: f"bench:{seq}".encode())  # full: drops the telemetry row
    assert [p for _, _, p in spool.pending()] == [b"bench:1", b"bench:2"]
    assert spool.stats()["pending"] == 2 and spool.stats()["dropped_telemetry"] == 1
    spool.close()


def test_a_shadow_comparison_dropped_on_a_full_disk_is_spooled_again_at_the_next_interval(agent, monkeypatch):
    """A shadow message is spooled only when its counts changed since the last one spooled: one dropped on a full
    disk was taken for spooled, and the comparison never reached the monitor once the disk had room again."""
    from device_agents.errors import DiskFull
    shadow = {"model": {"variant": "v", "sha256": "a" * 64}, "compared": 3, "errors": 0, "dropped_queue_full": 0,
              "skipped_rate": 0, "skipped_busy_cpu": 0}
    monkeypatch.setattr(agent, "served", lambda: [("shadow", {**shadow, "serving": shadow["model"]})])
    real_emit = agent.emit

    def full(kind, body, answers=None):
        if kind == "shadow":
            raise DiskFull("no room")
        return real_emit(kind, body, answers)

    monkeypatch.setattr(agent, "emit", full)
    agent.telemetry()
    assert agent._shadow_sent is None  # dropped: not sent
    monkeypatch.setattr(agent, "emit", real_emit)
    agent.telemetry()
    assert [m["compared"] for k, m in _spooled(agent) if k == "shadow"] == [3]


def test_a_message_too_large_is_counted_once_when_the_count_meets_a_full_disk(agent, monkeypatch):
    """The count went through the disk-full retry (free the reserve, write again), and count() adds before it
    writes: a first write refused for lack of space counted the message twice, and a second one raised DiskFull
    in place of PayloadTooLarge, so a command's answer too large to send was never answered. The count is held
    until it can be written (Spool.count), once; the message is refused as too large whatever the disk says."""
    import sqlite3

    from device_agents import spool as spool_module

    real, failures = agent.spool._save_counts, [2]

    def full_then_room():
        if failures[0]:
            failures[0] -= 1
            held, agent.spool._uncounted = agent.spool._uncounted, {}
            for name, by in held.items():  # kept, as the real one keeps them on a failed write
                agent.spool._uncounted[name] = agent.spool._uncounted.get(name, 0) + by
            raise sqlite3.OperationalError("database or disk is full")
        real()

    monkeypatch.setattr(agent.spool, "_save_counts", full_then_room)
    monkeypatch.setattr(spool_module, "COUNT_EVERY_S", 0.0)
    with pytest.raises(PayloadTooLarge):
        agent.emit("live", {"models": [{"note": "x" * messages.MAX_PAYLOAD}]})
    assert agent.spool.stats()["oversize_messages"] == 1


def test_a_shadow_model_whose_outputs_do_not_match_is_reported_in_a_message_within_the_limit(agent, monkeypatch):
    """A shadow model whose outputs are not the served model's has no fidelity: the comparison says why in
    ``fidelity_error``, which listed every output name of both models (names a model file chooses). With many long
    names the shadow message was over the 64 KiB limit: refused at every interval, so the operator never learnt the
    two could not be compared. The reason is cut short now, and the message goes out."""
    import threading

    import numpy as np

    from device_agents.serving.shadow import ModelRef, Shadow
    from edgekit_protocol.desired import MAX_ERROR_CHARS

    shadow = Shadow.__new__(Shadow)  # its figures only: no child process
    served = {f"served_output_{i}_" + "s" * 200: np.zeros(2, np.float32) for i in range(300)}
    other = {f"shadow_output_{i}_" + "o" * 200: np.zeros(2, np.float32) for i in range(300)}
    shadow.pairs, shadow._lock, shadow.ended, shadow.run = [(served, other)], threading.Lock(), None, "r" * 16
    shadow.counts = {"compared": 1, "skipped_rate": 0, "skipped_busy_cpu": 0, "dropped_queue_full": 0, "errors": 0,
                     "non_finite": 0}
    shadow.share, shadow.max_per_s, shadow.priority = 1.0, 5.0, "SCHED_IDLE"
    shadow.model = ModelRef("b" * 64, "fp16", [], [])
    comparison = shadow.snapshot()
    assert comparison["fidelity"] is None and comparison["fidelity_error"].startswith("outputs [")
    assert len(comparison["fidelity_error"]) <= MAX_ERROR_CHARS + 40
    serving = {"sha256": "a" * 64, "variant": "int8"}
    monkeypatch.setattr(agent, "served", lambda: [("shadow", {**comparison, "serving": serving})])
    agent.telemetry()
    spooled = [m for k, m in _spooled(agent) if k == "shadow"]
    assert len(spooled) == 1 and agent.spool.stats()["oversize_messages"] == 0
    assert messages.check_body("shadow", spooled[0])["fidelity_error"] == comparison["fidelity_error"]


def test_a_status_over_the_limit_is_counted_and_sent_short_as_will_and_retained_status(agent, monkeypatch):
    """The status (retained, sent on every connect, and the last will) was published without the payload check:
    a model's metadata of many kilobytes (an older agent's store took any variant name) made it over the limit, and
    the broker cut the agent off at every connect, so the device stayed offline for good. It is counted now, and the
    short status (the model by its sha256, each runtime available or not) goes out in its place, signed and passing
    the receivers' check."""
    from device_agents.identity import Keyring

    monkeypatch.setattr(agent, "_model_ref", lambda sha: {"sha256": "a" * 64, "variant": "v" * messages.MAX_PAYLOAD,
                                                          "model": "m"})
    sent: list[tuple[str, bytes]] = []

    class Client:
        def will_set(self, topic, payload, qos, retain):
            sent.append((topic, payload))

    def publish(topic, payload, *, retain=False, row=None):
        sent.append((topic, payload))

    monkeypatch.setattr(agent.publisher, "publish", publish)
    agent._will(Client())
    agent.publisher.connected.set()
    agent._publish_status()
    assert [t for t, _ in sent] == ["edgekit/v1/f/pi-1/status"] * 2
    for (_, payload), state in zip(sent, ("offline", "online")):
        assert len(payload) <= messages.MAX_PAYLOAD
        msg = messages.decode(payload, "status")
        Keyring(devices={"pi-1": agent.signer.public}).verify(msg, "pi-1")
        assert msg["state"] == state and msg["current"] == {"sha256": "a" * 64, "variant": None}
        assert set(msg["runtimes"].values()) <= {"available", "unavailable"}
    assert agent.spool.stats()["oversize_messages"] == 2


def test_a_failed_commands_error_of_any_length_is_answered_cut_short_not_as_too_large(agent, monkeypatch):
    """A command's error is text from a runtime, a model file or the device (a converter's message listing every
    tensor of a hostile model): one of 70,000 characters made the answer over the payload limit, so the operator was
    told only that the answer was too large to send, never why the command failed. It is cut to 2,000 characters
    (what the host cuts an error to anyway) and the answer goes out."""
    from device_agents.errors import DeviceError
    from edgekit_protocol.desired import MAX_ERROR_CHARS

    def fails(cmd):
        raise DeviceError("the runtime refused the model: " + "tensor_name " * 6_000)

    monkeypatch.setattr(agent, "_cmd_state", fails)
    assert agent.spool.take("c1", b"{}", time.time(), time.time() + 60) is None
    agent.run_command(Command("c1", "state", {}))
    (kind, ack), = [(k, m) for k, m in _spooled(agent) if k == "ack"]
    assert ack["cmd_id"] == "c1" and ack["ok"] is False
    assert ack["error"].startswith("the runtime refused the model: tensor_name") and "(72,031 characters)" in ack["error"]
    assert len(ack["error"]) <= MAX_ERROR_CHARS + 40
    assert agent.spool.stats()["oversize_messages"] == 0


def test_an_answer_holding_a_nan_is_sent_as_a_refusal_saying_so(agent, monkeypatch):
    """An answer with a NaN or an infinity (a figure from a runtime, a record read back from disk) could not be
    signed: the ValueError left handle(), and the command was never answered. It is answered as an error now."""
    monkeypatch.setattr(agent, "_cmd_state", lambda cmd: {"figure": float("nan")})
    assert agent.spool.take("c1", b"{}", time.time(), time.time() + 60) is None
    agent.run_command(Command("c1", "state", {}))
    (ack,) = [m for k, m in _spooled(agent) if k == "ack"]
    assert ack["cmd_id"] == "c1" and ack["ok"] is False and ack["result"] == {}
    assert ack["error"].startswith("the answer holds a NaN, an infinity or a value with no JSON form (") and ack["error"].endswith("not sent")
    assert agent.spool.pending_commands() == []  # answered: it left the inbox
    assert agent.spool.stats()["unsignable_messages"] == 1  # the answer that could not be signed, counted


def test_telemetry_carries_the_newest_seq_given_to_each_marked_stream(agent):
    """Records the broker dropped at the end of a stream (its queue for the monitor full) were seen only when a later
    record of the same kind came. The telemetry now says the newest seq given to bench, live and shadow records, so
    the monitor knows what it should have had."""
    agent.emit("bench", {"x": 1})
    agent.emit("bench", {"x": 2})
    agent.telemetry()
    (telemetry,) = [m for k, m in _spooled(agent) if k == "telemetry"]
    assert telemetry["seqs"] == {"bench": 2, "live": 0, "shadow": 0}
    assert messages.check_body("telemetry", telemetry) == telemetry
