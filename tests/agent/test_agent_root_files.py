"""The agent's own files under its root (desired state, its revision floor, the pinned operator keys, the
provisioning time, the tune candidates, its code manifest) may be damaged or edited by hand. They are read with a
size bound (one of gigabytes is never read whole: on a Pi that is the agent killed for memory at every start) and as
the receivers parse a message (no NaN or infinity: what reaches a signed message must be signable).
"""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from device_agents.disk import SMALL_FILE
from device_agents.identity import (
    PROVISIONED,
    Signer,
    encode_key,
    provisioned_at,
    read_operators,
)
from device_agents.service import Agent
from edgekit_protocol.commands import Command
from edgekit_protocol.errors import ConfigError

PAD = "x" * (4 * 64 * 1024 + 1)  # over any bound the agent sets on its small files, valid JSON all the same



HOLD = {"msg_id": "m2", "rollout": "r2", "revision": 2, "hold": True}


@pytest.mark.parametrize("saved", [{"message": {**HOLD, "note": float("nan")}, "converged": True, "attempts": 0},
                                   {"message": {**HOLD, "pad": PAD}, "converged": True, "attempts": 0}])
def test_a_desired_json_with_a_nan_or_over_its_bound_is_not_taken(offline_config, tmp_path, saved, caplog):
    cfg = offline_config()
    Agent(cfg).spool.close()
    (cfg.root / "desired.json").write_text(json.dumps(saved))
    with caplog.at_level(logging.ERROR):
        agent = Agent(cfg)
    try:
        assert agent.reconciler.desired is None  # waits for the operator's next one (retained on the broker)
    finally:
        agent.spool.close()
    assert "desired.json: unreadable desired state" in caplog.text
    (cfg.root / "desired.json").write_text(json.dumps({"message": HOLD, "converged": True, "attempts": 0}))
    sound = Agent(cfg)
    try:
        assert sound.reconciler.desired is not None and sound.reconciler.desired.rollout == "r2"
    finally:
        sound.spool.close()


def test_a_revision_floor_over_its_bound_is_not_read_whole(offline_config, tmp_path, caplog):
    cfg = offline_config()
    Agent(cfg).spool.close()
    (cfg.root / "desired-revision.json").write_text(json.dumps({"revision": 7, "msg_id": "m7", "pad": PAD}))
    with caplog.at_level(logging.ERROR):
        agent = Agent(cfg)
    try:
        assert agent.reconciler._floor == (0, None)
    finally:
        agent.spool.close()
    assert f"over the {SMALL_FILE:,} bytes such a file may take" in caplog.text


def test_an_operator_key_list_over_its_bound_is_one_line_saying_so(tmp_path):
    path = tmp_path / "operators.json"
    path.write_text(json.dumps([encode_key(Signer.generate().public)] * 2000))  # 94 KB of keys
    with pytest.raises(ConfigError, match=rf"^{path}: over the 65,536 bytes such a file may take; deploy to this "
                                          "device again$"):
        read_operators(path)
    path.write_text('["a", NaN]')
    with pytest.raises(ConfigError, match="operators.json holds the non-finite number NaN; numbers must be finite; deploy"):
        read_operators(path)


def test_a_provisioning_time_over_its_bound_or_non_finite_is_no_floor(tmp_path):
    for text in (json.dumps({"at": 1.7e9, "pad": PAD}), '{"at": NaN}'):
        (tmp_path / PROVISIONED).write_text(text)
        assert provisioned_at(tmp_path) == 0.0


def test_a_damaged_candidates_list_is_logged_and_spares_nothing_else(offline_config, tmp_path, caplog):
    agent = Agent(offline_config("store: {max_store_mb: 1}\n"))
    try:
        (agent.store.root / "candidates.json").write_text(json.dumps(["a" * 64, PAD]))
        with caplog.at_level(logging.ERROR):
            assert agent._apply_budget() == []
        assert "candidates.json is unreadable" in caplog.text and "over the 65,536 bytes" in caplog.text
    finally:
        agent.spool.close()


def test_a_code_manifest_holding_nan_is_an_answered_error_not_an_unsignable_answer(offline_config, tmp_path, monkeypatch):
    """``state`` with ``code`` put the manifest on disk into its answer: one holding NaN (a damaged or edited file;
    the agent verified it only at start) made the answer unsignable, and the command was never answered."""
    agent = Agent(offline_config())
    try:
        code = tmp_path / "agent"
        code.mkdir()
        (code / "AGENT.json").write_text('{"schema": "edgekit.agent-code/1", "files": {}, "bundle": NaN}')
        monkeypatch.setattr(agent, "_deployed", lambda: True)
        monkeypatch.setattr(agent, "_code_dir", lambda: code)
        assert agent.spool.take("c1", b"{}", 0.0, 4e9) is None
        agent.handle(Command("c1", "state", {"code": True}))
        (ack,) = [json.loads(p) for _, topic, p in agent.spool.pending() if topic.endswith("/cmd/ack")]
        assert ack["cmd_id"] == "c1" and ack["ok"] is False
        assert "AGENT.json holds the non-finite number NaN" in ack["error"]
    finally:
        agent.spool.close()


@pytest.mark.parametrize("started", [True, False])
def test_a_taken_command_damaged_in_the_spool_is_refused_and_dropped_not_a_crash_at_every_start(offline_config, tmp_path, started):
    """A taken command is read back from spool.db at start: one whose payload no longer reads (the file damaged or
    edited) raised JSONDecodeError out of run(), before the agent connected, at every start (it stayed in the
    inbox). It is refused (counted, logged) and dropped now, and the agent runs."""
    cfg = offline_config()
    agent = Agent(cfg)
    agent.spool.take("c1", b'{"msg_id": "c1", "command": "state", "seq": NaN', 1e9, 4e9)
    if started:
        agent.spool.start("c1")
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    time.sleep(1.5)
    agent.stop()
    runner.join(10)
    again = Agent(cfg)
    try:
        assert again.spool.pending_commands() == []
        assert again.spool.stats()["refused_commands"] == 1
    finally:
        again.spool.close()
