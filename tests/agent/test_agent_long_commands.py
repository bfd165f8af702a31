"""A command that runs for minutes (an install that builds a TensorRT engine, a shadow model loading, a benchmark in
its watched child) keeps the agent's telemetry going, so the monitor does not take the device for silent. The
command itself is replaced by a slow stand-in: what is tested is the agent's scheduling."""

from __future__ import annotations

import json
import time

import pytest

from device_agents.config import load_agent_config
from device_agents.service import Agent
from edgekit_protocol.commands import Command


def _agent(tmp_path) -> Agent:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device: pi-1\nfleet: f\nroot: {tmp_path / 'root'}\ntelemetry_interval_s: 0.2\nserve: {{enabled: false}}\n")
    return Agent(load_agent_config(cfg))


def _sent(agent: Agent) -> list[tuple[str, dict]]:
    return [(topic.rsplit("/", 1)[-1] if "cmd/ack" not in topic else "ack", json.loads(p))
            for _, topic, p in agent.spool.pending()]


def _slow(seconds: float, result: dict):
    def run(_cmd):
        time.sleep(seconds)
        return result
    return run


@pytest.mark.parametrize("name", ["install", "shadow", "bench"])
def test_a_long_command_keeps_the_telemetry_beat_and_is_answered_once(tmp_path, name):
    """An install building a TensorRT engine; a shadow model loading in its child; a benchmark in its child (once the
    agent said nothing for its whole length, to keep the telemetry's work out of the timed runs: they run in
    another process now)."""
    agent = _agent(tmp_path)
    try:
        setattr(agent, f"_cmd_{name}", _slow(1.5, {"engine": {"build_s": 1.5}}))
        assert agent.spool.take("m1", b"{}", time.time(), time.time() + 60) is None  # taken as delivered
        started = time.monotonic()
        agent.run_command(Command("m1", name, {}))
        assert time.monotonic() - started >= 1.5
        sent = _sent(agent)
        telemetry = [m for kind, m in sent if kind == "telemetry"]
        acks = [m for kind, m in sent if kind == "ack"]
        assert len(telemetry) >= 4, sent  # every 0.2 s while the engine was built
        assert [(a["cmd_id"], a["ok"], a["result"]) for a in acks] == [("m1", True, {"engine": {"build_s": 1.5}})]
        assert [m["seq"] for m in telemetry] == sorted(m["seq"] for m in telemetry)
        assert agent.spool.pending_commands() == []  # answered: the inbox let go of it
    finally:
        agent.spool.close()


def test_the_telemetry_message_says_the_interval_it_is_sent_at(tmp_path):
    """The host judged every device stale after 3 x 30 s, the default interval, whatever its agent's own
    ``telemetry_interval_s``: the message says it now (``interval_s``), and passes every receiver's check."""
    from device_agents.identity import Keyring, receive

    agent = _agent(tmp_path)
    try:
        agent.telemetry()
        ((_, topic, payload),) = agent.spool.pending()
        kind, msg = receive(Keyring({"pi-1": agent.signer.public}), topic, payload, time.time())
        assert kind == "telemetry" and msg["interval_s"] == 0.2
    finally:
        agent.spool.close()


def test_a_shadow_run_whose_new_answers_all_held_nan_is_sent_again():
    """A shadow comparison is sent when its counts change: one whose new answers all held NaN or infinity changed
    only ``non_finite``, so it was never sent again and the monitor's drift alert never heard of them."""
    base = {"model": {"sha256": "b" * 64}, "compared": 3, "errors": 0, "dropped_queue_full": 0, "skipped_rate": 0,
            "skipped_busy_cpu": 0, "non_finite": 0}
    assert Agent._shadow_counts(base) != Agent._shadow_counts({**base, "non_finite": 2})


def test_a_new_shadow_run_whose_counts_match_the_last_ones_sent_is_sent():
    """A new shadow run (a new shadow command, of the same model) that reached the very counts of the last message
    sent was not sent: the monitor heard of its NaN answers only at its next change of counts."""
    base = {"model": {"sha256": "b" * 64}, "run": "a" * 16, "compared": 3, "errors": 0, "dropped_queue_full": 0,
            "skipped_rate": 0, "skipped_busy_cpu": 0, "non_finite": 2}
    assert Agent._shadow_counts(base) != Agent._shadow_counts({**base, "run": "c" * 16})


def test_a_bench_asking_for_more_seconds_than_the_agents_total_is_refused_in_one_line(tmp_path):
    """A bench command's min_seconds (up to 600) above the agent's bench.total_timeout_s ran a benchmark that was
    always ended at its total, and counted as one whose model looped (ended_benches); it is refused first now."""
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device: pi-1\nfleet: f\nroot: {tmp_path / 'root'}\nserve: {{enabled: false}}\n"
                   "bench: {total_timeout_s: 300}\n")
    agent = Agent(load_agent_config(cfg))
    try:
        agent.run_command(Command("b1", "bench", {"min_seconds": 600}))
        ((kind, ack),) = _sent(agent)
        assert kind == "ack" and not ack["ok"]
        assert ack["error"] == ("bench: total_timeout_s 300 is not above min_seconds 600: the timed runs alone last "
                                "that long, so every benchmark would be ended at it (this device's agent.yaml "
                                "bench.total_timeout_s); ask for fewer min_seconds")
        assert agent.spool.stats()["ended_benches"] == 0
    finally:
        agent.spool.close()
