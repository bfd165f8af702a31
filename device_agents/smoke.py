"""Run a model in another process, with a deadline: the smoke check a model passes before it becomes
current (load it, run one inference on zeros), and a run over a whole set of inputs.

:class:`SmokePool` runs them in children forked from a ``forkserver`` that has numpy and the
interpreter already imported: the running agent keeps one, so a check costs a model load, not a
Python start. A model that crashes the interpreter kills only the child, and one that runs past
the deadline (a loop whose trip count comes from the input) is killed with it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_agents.errors import SmokeCrashed, SmokeFailed, SmokeTimedOut
from device_agents.runtimes import RuntimeUnavailable, get_runtime, ran_with
from edgekit_protocol.errors import ConfigError

if TYPE_CHECKING:  # imported in the children (the forkserver preloads it): not in a parent that only waits for them
    import numpy as np

# once a child has begun its answer, how long it may take to finish it at the least (else the run's deadline)
SEND_GRACE_S = 10.0
# what a smoke check's load_and_first_invoke_ms times, said with it
SMOKE_TIMED = ("time.perf_counter (CLOCK_MONOTONIC) in the smoke check's child process, once: loading the model "
               "(runtime, delegate and threads it is served with) and one cold invoke() on all-zero inputs, its "
               "outputs read; a load time, not a latency: edgekit-agent bench measures that")


def _first_line(exc: BaseException) -> str:
    """Return the first line of ``exc``'s text, or its type's name when it has none."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def smoke(model: Path, runtime: str | None = None, delegate: str = "xnnpack",
          options: dict[str, Any] | None = None, threads: int = 1) -> dict[str, Any]:
    """Load ``model`` and run one inference on zeros, with the runtime, delegate, options and threads
    that will serve it.

    Returns:
        ``inputs`` and ``outputs`` (their shapes by name), ``load_and_first_invoke_ms`` (the milliseconds from before
        the runtime is chosen to the outputs read: loading the model and one cold ``invoke()`` on zeros),
        ``timed`` (:data:`SMOKE_TIMED`, that in words) and what ran it, as a bench record names it: ``runtime``,
        ``delegate`` (ONNX Runtime's execution provider for an ONNX model) and ``delegate_options``.

    Raises:
        SmokeFailed: it did not load (options its target does not take included), did not run, or gave
            NaN/infinite float outputs.
    """
    import numpy as np

    from device_agents.inference import ModelRunner

    try:
        t0 = time.perf_counter()
        chosen = get_runtime(runtime, model=Path(model))
        runner = ModelRunner(chosen.interpreter(Path(model), threads=threads, delegate=delegate, options=options))
        runner.invoke_raw([np.zeros(p.shape, dtype=p.dtype) for p in runner.inputs])
        outs = [runner.interpreter.get_tensor(p.index) for p in runner.outputs]
    except (ValueError, RuntimeError, RuntimeUnavailable, OSError, ConfigError) as exc:  # ConfigError: the target's options
        raise SmokeFailed(_first_line(exc)) from None
    for port, out in zip(runner.outputs, outs):
        if np.issubdtype(out.dtype, np.floating) and not np.all(np.isfinite(out)):
            raise SmokeFailed(f"output '{port.name}' holds NaN or infinity")
    return {"inputs": {p.name: list(p.shape) for p in runner.inputs},
            "outputs": {p.name: list(p.shape) for p in runner.outputs},
            "load_and_first_invoke_ms": round((time.perf_counter() - t0) * 1000, 3), "timed": SMOKE_TIMED,
            "runtime": chosen.key, **ran_with(runner.interpreter, delegate, options)}


def _smoke_quietly(model: str, runtime: str | None, delegate: str, options: dict[str, Any] | None,
                   threads: int) -> dict[str, Any]:
    """Return :func:`smoke`'s result, the child's own first interpreter banner dropped. Raises SmokeFailed."""
    from device_agents.runtimes.banner import runtime_banner_dropped

    with runtime_banner_dropped():  # the child's own first interpreter: its INFO line, nothing else
        return smoke(Path(model), runtime, delegate, options, threads)


def save_inputs(inputs: dict[str, np.ndarray], folder: Path) -> Path:
    """Write ``inputs`` ({input name: samples}) into ``folder`` (made if missing), one ``.npy`` file per
    input, for :meth:`SmokePool.predict` children to map rather than receive through a pipe.

    Returns:
        ``folder``.

    Raises:
        OSError: the folder or a file could not be written.
    """
    import numpy as np

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(inputs.values()):
        np.save(folder / f"in{i}.npy", np.asarray(x), allow_pickle=False)
    (folder / "names.json").write_text(json.dumps(list(inputs)), encoding="utf-8")
    return folder


def predict_saved(model: str, runtime: str | None, threads: int, inputs: str, outputs: str) -> list[str]:
    """Run ``model`` one sample at a time (:meth:`device_agents.inference.ModelRunner.predict`) over the
    inputs :func:`save_inputs` wrote into the folder ``inputs``, and write output ``i`` to
    ``outputs/out<i>.npy`` (the folder is made).

    Returns:
        The output names, in the order of the ``out<i>.npy`` files.

    Raises:
        SmokeFailed: the model did not load or run, or the inputs do not fit it (the first line said).
    """
    import numpy as np

    from device_agents.inference import ModelRunner
    from device_agents.runtimes.banner import runtime_banner_dropped

    folder = Path(inputs)
    try:
        names = json.loads((folder / "names.json").read_text(encoding="utf-8"))
        xs = {name: np.load(folder / f"in{i}.npy", mmap_mode="r", allow_pickle=False) for i, name in enumerate(names)}
        with runtime_banner_dropped():
            interp = get_runtime(runtime, model=Path(model)).interpreter(Path(model), threads=threads)
        got = ModelRunner(interp).predict(xs)
        os.makedirs(outputs, exist_ok=True)
        for i, y in enumerate(got.values()):
            np.save(Path(outputs) / f"out{i}.npy", y, allow_pickle=False)
    except (ValueError, RuntimeError, RuntimeUnavailable, ConfigError, KeyError, OSError) as exc:
        raise SmokeFailed(_first_line(exc)) from None
    return list(got)


def _die_with_caller(conn: Any) -> None:
    """Start a thread that SIGKILLs this child once the process that started it is gone (its end of ``conn``,
    the pipe the answer goes back on, closed: Linux reports an error on the writing end); returns nothing.

    A killed agent takes its watchdog along: without this, a child spinning in a model's loop (the runtime
    releases the GIL while it runs the model) would spin on, orphaned. Where ``poll`` is missing it does nothing.
    """
    import select
    import threading

    if not hasattr(select, "poll"):
        return

    def watch() -> None:
        poller = select.poll()
        poller.register(conn.fileno(), 0)  # no events asked: POLLERR and POLLHUP are always reported
        while True:
            for _, ev in poller.poll():
                if ev & select.POLLNVAL:  # closed here, the answer sent: nothing left to watch
                    return
                if ev & (select.POLLERR | select.POLLHUP):
                    os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="caller-watch").start()


def _child(fn: Callable[..., Any], args: tuple[Any, ...], conn: Any) -> None:
    """Send ``("ok", fn(*args))`` or ``("failed", why)`` for a :class:`SmokeFailed`; anything else kills
    the child with its traceback on stderr (a bug, which the parent reports as a crash). The child dies with
    its caller (:func:`_die_with_caller`)."""
    _die_with_caller(conn)
    try:
        result = ("ok", fn(*args))
    except SmokeFailed as exc:
        result = ("failed", str(exc))
    conn.send(result)
    conn.close()


def seconds(s: float) -> str:
    """Return ``s`` seconds as a timeout's text says them: three significant digits, whole seconds from 1000 on
    (from 999.5: three significant digits of those would be ``1e+03``)."""
    return f"{s:.3g}" if s < 999.5 else f"{s:.0f}"


class Watchdog:
    """Decides when a child must be ended: once ``total_s`` have passed since it started, or, with ``limit``,
    once its progress (the ``slots`` ints it writes into a shared array) has stayed the same longer than
    ``limit(progress)`` allows.

    ``limit(progress)`` returns ``(seconds, why)``: how long the step ``progress`` stands for may last and the
    setting that says so; ``step(progress)`` names that step (``timed run 4``). The parent reads the array
    between its waits, so the child's cost is a few integer writes where it chooses (outside anything it times).
    """

    TICK_S = 0.25  # the parent looks at the child's progress at least this often

    def __init__(self, what: str, total_s: float, *, slots: int = 0,
                 limit: Callable[[tuple[int, ...]], tuple[float, str]] | None = None,
                 step: Callable[[tuple[int, ...]], str] | None = None, total_why: str = "",
                 cancel: threading.Event | None = None):
        self.what, self.total_s, self.slots, self.limit, self.step_of, self.total_why = \
            what, total_s, slots, limit, step, total_why
        self.cancel = cancel  # set (the agent is stopping): the child is ended at the next look
        self.cancelled = False
        self._started: float | None = None
        self._seen: tuple[int, ...] | None = None
        self._since = 0.0

    def left(self, now: float) -> float:
        """Return the seconds left of the whole run at monotonic time ``now`` (all of ``total_s`` before the first look)."""
        return self.total_s if self._started is None else self._started + self.total_s - now

    def step(self) -> str:
        """Return the name of the step the child last reported ("" when there are no steps, or none seen yet)."""
        return self.step_of(self._seen) if self.step_of is not None and self._seen is not None else ""

    def see(self, progress: tuple[int, ...], now: float) -> None:
        """Take the child's ``progress`` at monotonic time ``now`` (the first call starts the clocks); returns nothing."""
        if self._started is None:
            self._started = self._since = now
        if progress != self._seen:
            self._seen, self._since = progress, now

    def check(self, progress: tuple[int, ...], now: float) -> float:
        """Take the child's ``progress`` at monotonic time ``now``; return how long the parent may wait before
        the next check (at most :attr:`TICK_S` when there are steps to watch).

        Raises:
            SmokeTimedOut: the whole run or the current step has lasted too long (the message names the
                step, its limit and the setting behind it), or ``cancel`` is set (:attr:`cancelled` then, and
                ``how`` is ``stopped``); the caller kills the child.
        """
        self.see(progress, now)
        if self.cancel is not None and self.cancel.is_set():
            self.cancelled = True
            at = f" at {self.step()}" if self.step() else ""
            raise SmokeTimedOut(f"the {self.what} was stopped{at}", "stopped")
        total_left = self._started + self.total_s - now
        if total_left <= 0:
            why = f" ({self.total_why})" if self.total_why else ""
            at = f"; it was at {self.step()}" if self.step() else ""
            raise SmokeTimedOut(f"the {self.what} did not finish within {seconds(self.total_s)} s{why}{at}",
                                f"did not finish within {seconds(self.total_s)} s")
        if self.limit is None:
            return total_left if self.cancel is None else min(total_left, self.TICK_S)
        limit_s, why = self.limit(progress)
        step_left = self._since + limit_s - now
        if step_left <= 0:
            raise SmokeTimedOut(f"{self.step()} did not finish within {seconds(limit_s)} s ({why})",
                                f"made no progress for {seconds(limit_s)} s at {self.step()}")
        return min(total_left, step_left, self.TICK_S)


def _end_stalled(watch: Watchdog, child: Any, stalled: threading.Event, received: threading.Event,
                 seconds: float) -> None:
    """Kill ``child`` (and set ``stalled``) unless ``received`` is set within ``seconds``, or as soon as the
    watchdog's ``cancel`` is set (its ``cancelled`` then set too): the answer it began to send never ends, or the
    caller is stopping. Returns nothing."""
    until = time.monotonic() + seconds
    while not received.wait(max(0.0, min(Watchdog.TICK_S, until - time.monotonic()))):
        cancelled = watch.cancel is not None and watch.cancel.is_set()
        if cancelled or time.monotonic() >= until:
            watch.cancelled = watch.cancelled or cancelled
            stalled.set()
            child.kill()
            return


class SmokePool:
    """Runs :func:`smoke`, :func:`predict_saved` or any module-level function in children of a forkserver
    that has the interpreter imported, each with a deadline (or a :class:`Watchdog`)."""

    def __init__(self) -> None:
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["numpy", "device_agents.smoke", "device_agents.bench",
                                         "device_agents.runtimes.preload"])

    def warm(self) -> None:
        """Start the forkserver now (it imports numpy and the interpreter once), not at the first activation."""
        from multiprocessing import forkserver

        forkserver.ensure_running()

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 0.0, what: str,
            watchdog: Watchdog | None = None) -> Any:
        """Return ``fn(*args)`` computed in a child (``fn`` a module-level function, its arguments and
        result picklable), which is killed once ``timeout`` seconds have passed, or when ``watchdog`` says
        so: then ``fn`` gets one more argument, the shared array of ``watchdog.slots`` ints it writes its
        progress into.

        Raises:
            SmokeTimedOut: the child did not finish in time (the message: ``the <what> did not finish
                within N s``, or the watchdog's); it was killed.
            SmokeCrashed: the child crashed (signal named in ``how``) or was killed, before or while sending its
                result (a result cut short is a crash, never the pipe's OSError); with a watchdog's steps, the
                message ends ``at <step>``.
            SmokeFailed: ``fn`` raised it (its text).

        Anything else raised meanwhile (KeyboardInterrupt) kills the child before it propagates. No child outlives
        its run: one that answered but has not exited 5 s later (a thread it left running) is killed.
        """
        watch = watchdog or Watchdog(what, timeout)
        slots = self.ctx.RawArray("i", watch.slots) if watch.slots else None
        receive, send = self.ctx.Pipe(duplex=False)
        child = self.ctx.Process(target=_child, args=(fn, (*args, slots) if slots is not None else args, send),
                                 daemon=True)
        child.start()
        send.close()
        answered = False
        try:
            try:
                while not receive.poll(watch.check(tuple(slots or ()), time.monotonic())):
                    pass
            except SmokeTimedOut:
                child.kill()
                raise
            # the answer has begun: a child that stops halfway through it (stopped, or blocked) is ended at
            # the run's deadline (at least SEND_GRACE_S from now), or when the watchdog's cancel is set, not
            # waited for without end
            stalled, received = threading.Event(), threading.Event()
            ender = threading.Thread(target=_end_stalled, args=(watch, child, stalled, received,
                                                                max(watch.left(time.monotonic()), SEND_GRACE_S)),
                                     daemon=True, name="stalled-send")
            ender.start()
            try:
                status, value = receive.recv()
                answered = True
                watch.see(tuple(slots or ()), time.monotonic())  # the step it ended at (a failure names it)
            except (EOFError, OSError):  # OSError: it died partway through sending ("got end of file during message")
                child.join(5)
                if child.is_alive():  # a pipe that failed under a live child: it is of no more use
                    child.kill()
                    child.join(5)
                watch.see(tuple(slots or ()), time.monotonic())  # the step it died at, as it left it
                if stalled.is_set() and watch.cancelled:
                    at = f" at {watch.step()}" if watch.step() else ""
                    raise SmokeTimedOut(f"the {what} was stopped{at}, partway through sending its result",
                                        "stopped") from None
                if stalled.is_set():
                    raise SmokeTimedOut(f"the {what} stopped partway through sending its result; killed at its "
                                        "deadline", "stopped while sending its result") from None
                code = child.exitcode or 0
                name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"exit {code}"
                how = "was killed (out of memory?)" if name == "SIGKILL" else f"crashed ({name})"
                at = f" at {watch.step()}" if watch.step() else ""
                raise SmokeCrashed(f"the interpreter crashed (exit {code}){at}", how) from None
            finally:
                received.set()
                ender.join()
        finally:
            receive.close()
            if not answered and child.is_alive():  # interrupted (Ctrl-C): it must not outlive its caller's clean-up
                child.kill()
            child.join(5)
            if child.is_alive():  # answered, yet not gone (a thread it left keeps its interpreter from exiting, or
                child.kill()  # it is stopped): it would idle for the caller's life; no child outlives its run
                child.join(5)
        if status != "ok":
            raise SmokeFailed(value)
        return value

    def __call__(self, model: Path, *, runtime: str | None = None, delegate: str = "xnnpack",
                 options: dict[str, Any] | None = None, threads: int = 1,
                 timeout: float = 120.0, cancel: threading.Event | None = None) -> dict[str, Any]:
        """Return what :func:`smoke` returned in the child; ``cancel``: a ``threading.Event`` whose setting ends
        the child within a quarter of a second (the caller is stopping).

        Raises:
            SmokeCrashed: the child crashed (signal named in ``how``), was killed or timed out, or was ended by
                ``cancel`` (a :class:`SmokeTimedOut` whose ``how`` is ``stopped``).
            SmokeFailed: the model did not load or run, or gave NaN or infinity.
        """
        watch = Watchdog("smoke inference", timeout, cancel=cancel) if cancel is not None else None
        return self.run(_smoke_quietly, str(model), runtime, delegate, options, threads, timeout=timeout,
                        what="smoke inference", watchdog=watch)

    def predict(self, model: Path, inputs: Path, *, runtime: str | None = None, threads: int = 1,
                timeout: float) -> dict[str, np.ndarray]:
        """Return ``model``'s outputs ({output name: outputs stacked over the samples}) on the inputs
        :func:`save_inputs` wrote into the folder ``inputs``, computed in a child (:func:`predict_saved`).

        Raises:
            SmokeCrashed: the child crashed (signal named in ``how``), was killed, or did not finish
                within ``timeout`` seconds.
            SmokeFailed: the model did not load or run on these inputs.
        """
        import tempfile

        import numpy as np

        with tempfile.TemporaryDirectory(prefix="edgekit-outputs-", dir=Path(inputs).parent) as out:
            names = self.run(predict_saved, str(model), runtime, threads, str(inputs), out, timeout=timeout,
                             what="inference")
            return {name: np.load(Path(out) / f"out{i}.npy", allow_pickle=False) for i, name in enumerate(names)}
