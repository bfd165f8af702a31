"""A model that loops on real inputs (it stops at once on the smoke check's zeros), benchmarked by the agent's
``bench`` command and by ``edgekit-agent bench``: the benchmark runs in a watched child, which is killed when an
inference makes no progress within its limit; the command fails in one line naming the model, the step and the
limit, and the agent goes on sending telemetry and serving its current model meanwhile, and answers the next
command. Once the agent spun in the model's loop for ever: no telemetry, no commands. The model is made here with
TensorFlow's converter (a ``WHILE`` op), run by the real LiteRT interpreter."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from device_agents.bench import TIMED, run_bench
from device_agents.config import load_agent_config
from device_agents.service import Agent
from device_agents.serving.client import Client
from edgekit_protocol.commands import Command
from edgekit_protocol.config import BenchSettings

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def looping_tflite(tmp_path_factory) -> Path:
    """x [1, 8] -> y = 2x, with a ``WHILE`` that spins for ever while any input value is above 1."""
    from edge_kit.compiler.tf_quiet import tensorflow

    tf = tensorflow()

    @tf.function(input_signature=[tf.TensorSpec([1, 8], tf.float32, name="x")])
    def model(x):
        above = tf.reduce_max(x) - 1.0
        spins = tf.while_loop(lambda i: above > 0.0, lambda i: i + 1.0, [tf.constant(0.0)])[0]
        return {"y": x * 2.0 + tf.minimum(spins, 0.0)}

    converter = tf.lite.TFLiteConverter.from_concrete_functions([model.get_concrete_function()], model)
    path = tmp_path_factory.mktemp("looping") / "loop.tflite"
    path.write_bytes(converter.convert())
    return path


def eval_set(path: Path, samples: int, looping: int | None) -> Path:
    """Write ``samples`` zero samples, sample ``looping`` (0-based) one the model spins on; return ``path``."""
    x = np.zeros((samples, 8), np.float32)
    if looping is not None:
        x[looping] = 2.0
    np.savez(path, x=x)
    return path


def acks(agent: Agent) -> list[dict]:
    return [json.loads(p) for _, topic, p in agent.spool.pending() if topic.endswith("cmd/ack")]


def test_a_bench_of_a_model_that_loops_on_an_eval_sample_fails_in_bounded_time_and_the_agent_goes_on(
        looping_tflite, tmp_path):
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device: pi-1\nfleet: f\nroot: {tmp_path / 'root'}\ntelemetry_interval_s: 0.2\n"
                   f"serve: {{socket: {tmp_path / 's.sock'}}}\n"
                   "bench: {inference_timeout_s: 1, step_timeout_s: 10}\n")
    agent = Agent(load_agent_config(cfg))
    others = set(multiprocessing.active_children())
    served: list[tuple[float, list[float]]] = []
    stop = threading.Event()

    def application():  # an application of the device's, asking the current model (one sample) all along
        with Client(path=tmp_path / "s.sock") as client:
            while not stop.is_set():
                (y,) = client.predict(np.ones(8, np.float32)).values()
                served.append((time.monotonic(), y.tolist()))
                time.sleep(0.05)

    try:
        sha = agent.store.install(looping_tflite, variant="fp32", model="loop",
                                  eval_file=eval_set(tmp_path / "eval.npz", 8, looping=3)).sha256
        agent._activate(sha)  # its smoke inference (zeros) passes
        agent.server.start()
        agent.follow_current()
        app = threading.Thread(target=application, daemon=True)
        app.start()
        for msg_id in ("b1", "s1"):
            assert agent.spool.take(msg_id, b"{}", time.time(), time.time() + 60) is None
        started = time.monotonic()
        agent.run_command(Command("b1", "bench", {"min_runs": 20, "warmup": 0, "min_seconds": 0}))
        ended = time.monotonic()
        assert ended - started < 30  # the 1 s limit, the child's start and the kill: not for ever
        (ack,) = acks(agent)
        assert (ack["cmd_id"], ack["ok"]) == ("b1", False)
        assert ack["error"] == (
            f"bench of model {sha[:12]}: timed run 4 did not finish within 1 s (bench.inference_timeout_s, or 20x the "
            f"first inference's {ack['error'].split('first inference' + chr(39) + 's ')[1].split(' ms')[0]} ms when "
            "longer); the benchmark's child was killed; nothing recorded, the agent runs on")
        sent = [topic.rsplit("/", 1)[-1] for _, topic, _ in agent.spool.pending()]
        assert "bench" not in sent and sent.count("telemetry") >= 2  # the beat went on while the child ran
        assert [y for t, y in served if started < t < ended][:1] == [[2.0] * 8]  # and so did serving
        agent.run_command(Command("s1", "state", {}))
        state = acks(agent)[-1]
        assert (state["cmd_id"], state["ok"], state["result"]["current"]["sha256"]) == ("s1", True, sha)
        assert state["result"]["spool"]["ended_benches"] == 1  # counted, as hostile input is
        assert set(multiprocessing.active_children()) - others == set()  # the looping child is gone
    finally:
        stop.set()
        if agent.server is not None:
            agent.server.close()
        agent.spool.close()


def test_a_bench_of_that_model_on_inputs_it_stops_on_is_recorded_from_its_child(looping_tflite, tmp_path):
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device: pi-1\nfleet: f\nroot: {tmp_path / 'root'}\nserve: {{enabled: false}}\n")
    agent = Agent(load_agent_config(cfg))
    try:
        sha = agent.store.install(looping_tflite, variant="fp32", model="loop",
                                  eval_file=eval_set(tmp_path / "eval.npz", 8, looping=None)).sha256
        assert agent.spool.take("b1", b"{}", time.time(), time.time() + 60) is None
        agent.run_command(Command("b1", "bench", {"sha256": sha, "min_runs": 20, "warmup": 1, "min_seconds": 0}))
        (ack,) = acks(agent)
        assert ack["ok"] and ack["result"]["runs"] == 20, ack
        (record,) = [json.loads(p) for _, topic, p in agent.spool.pending() if topic.endswith("/bench")]
        assert record["sha256"] == sha and record["inputs"] == "eval set"
        assert "ran in a child process" in record["methods"]["process"]
        assert record["peak_rss_method"] == "VmHWM in /proc/self/status: the benchmark's child process, scoring included"
    finally:
        agent.spool.close()


def agent_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "device_agents", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


def one_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    return done.stderr.strip()


def test_the_bench_command_line_ends_a_model_looping_in_scoring_or_past_its_total(looping_tflite, tmp_path):
    """The timed runs cycle over the first 256 samples; sample 300 is met only when the eval set is scored."""
    started = time.monotonic()
    line = one_line(agent_cli("bench", looping_tflite, "--eval", eval_set(tmp_path / "e.npz", 300, looping=299),
                              "--min-runs", "5", "--min-seconds", "0", "--inference-timeout-s", "1"))
    assert time.monotonic() - started < 30
    assert line.startswith(f"edgekit-agent: error: {looping_tflite}: scoring sample 300 did not finish within 1 s "
                           "(--inference-timeout-s, or 20x the first inference's ")
    assert line.endswith(" ms when longer); the benchmark's child was killed")
    line = one_line(agent_cli("bench", looping_tflite, "--eval", eval_set(tmp_path / "z.npz", 4, looping=None),
                              "--min-runs", "1000000", "--min-seconds", "0", "--total-timeout-s", "0.5"))
    assert line.startswith(f"edgekit-agent: error: {looping_tflite}: the benchmark did not finish within 0.5 s "
                           "(--total-timeout-s); it was at timed run ")
    assert one_line(agent_cli("bench", looping_tflite, "--inference-timeout-s", "nan")) == (
        "edgekit-agent: error: --inference-timeout-s: nan is not above 0 and at most 86400 seconds")


def test_the_watchdogs_progress_is_written_outside_the_timed_invoke(looping_tflite, tmp_path):
    """Each run's progress is told before its clock starts: a slow report (here 20 ms) shows in the run's wall
    time, never in its latency (the model runs in microseconds on zeros)."""
    told: list[tuple[int, int]] = []

    def progress(step: int, n: int, _first_us: int) -> None:
        told.append((step, n))
        if step == TIMED:
            time.sleep(0.02)

    record = run_bench(looping_tflite, BenchSettings(warmup=0, min_runs=10, max_runs=10, min_seconds=0),
                       eval_file=eval_set(tmp_path / "z.npz", 4, looping=None), progress=progress)
    assert [n for step, n in told if step == TIMED] == list(range(1, 11))
    assert record["duration_s"] >= 0.2 and record["latency_ms"]["max"] < 10


def _children(pid: int) -> set[int]:
    """Return the ids of the processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry))
    return found


def _state(pid: int) -> str:
    """Return the state letter of process ``pid`` (``R``: running), or "" when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def test_a_child_spinning_in_the_model_dies_with_a_killed_caller(looping_tflite, tmp_path):
    """The watchdog lives in the caller: killed (SIGKILL, an OOM kill) while its child spins in the model's loop,
    it took the watchdog along, and the child spun on, orphaned, a core at 100 % until the next reboot."""
    caller = subprocess.Popen([sys.executable, "-m", "device_agents", "bench", looping_tflite, "--eval",
                               eval_set(tmp_path / "e.npz", 4, looping=0)],
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.DEVNULL)
    try:
        deadline, spinning = time.monotonic() + 60, set()
        while not spinning and time.monotonic() < deadline:  # the caller's forkserver's child, in its first inference
            running = {c for server in _children(caller.pid) for c in _children(server) if _state(c) == "R"}
            time.sleep(1)  # still running a second later: not the smoke check's child, done in milliseconds
            spinning = {c for c in running if _state(c) == "R"}
        assert spinning, "no child spun"
    finally:
        caller.kill()
        caller.wait()
    deadline = time.monotonic() + 10
    while any(_state(pid) for pid in spinning) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_state(pid) for pid in spinning)


def test_a_bench_spinning_in_the_model_ends_at_once_when_the_agent_stops(looping_tflite, tmp_path):
    """SIGTERM set the agent's stop while its bench spun: the agent waited for the child until the bench's total
    limit (an hour by default), past systemd's 30 s stop timeout and its SIGKILL. The stop now ends the child."""
    import threading

    from device_agents.bench import bench_in_child
    from device_agents.errors import BenchFailed
    from device_agents.smoke import SmokePool
    from edgekit_protocol.config import BenchSettings

    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    started = time.monotonic()
    with pytest.raises(BenchFailed, match=r"^the benchmark was stopped at warm-up run \d+: the agent is stopping$") as caught:
        bench_in_child(SmokePool(), looping_tflite, BenchSettings(min_runs=2, min_seconds=0),
                       eval_file=eval_set(tmp_path / "e.npz", 3, looping=2), cancel=stop)
    assert time.monotonic() - started < 10
    assert not caught.value.ended  # the agent's doing, not the model's: not counted as a benchmark that ended


def test_a_bench_whose_smoke_inference_spins_ends_at_once_when_the_agent_stops(tmp_path):
    """Before its watched child, a bench checks the model in a smoke child (zeros, up to 120 s), which did not look
    at the agent's stop: a model spinning on zeros held SIGTERM for two minutes, past systemd's stop timeout. The stop
    ends that child too, and the command says the agent is stopping, not that the model failed."""
    from edge_kit.compiler.tf_quiet import tensorflow

    tf = tensorflow()

    @tf.function(input_signature=[tf.TensorSpec([1, 8], tf.float32, name="x")])
    def model(x):  # spins while every input value is at most 1: on the smoke check's zeros
        below = 1.0 - tf.reduce_max(x)
        spins = tf.while_loop(lambda i: below >= 0.0, lambda i: i + 1.0, [tf.constant(0.0)])[0]
        return {"y": x * 2.0 + tf.minimum(spins, 0.0)}

    converter = tf.lite.TFLiteConverter.from_concrete_functions([model.get_concrete_function()], model)
    spinning = tmp_path / "zeros-loop.tflite"
    spinning.write_bytes(converter.convert())
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device: pi-1\nfleet: f\nroot: {tmp_path / 'root'}\ntelemetry_interval_s: 0.2\n")
    agent = Agent(load_agent_config(cfg))
    others = set(multiprocessing.active_children())
    try:
        sha = agent.store.install(spinning, variant="fp32", model="loop").sha256
        assert agent.spool.take("b1", b"{}", time.time(), time.time() + 60) is None
        threading.Timer(2.0, agent.stop).start()  # SIGTERM's handler
        started = time.monotonic()
        agent.run_command(Command("b1", "bench", {"sha256": sha, "min_runs": 2, "warmup": 0, "min_seconds": 0}))
        assert time.monotonic() - started < 15
        (ack,) = acks(agent)
        assert (ack["ok"], ack["error"]) == (False, f"model {sha[:12]}: its smoke inference was stopped: the agent "
                                                    "is stopping")
        assert set(multiprocessing.active_children()) - others == set()
    finally:
        agent.spool.close()
