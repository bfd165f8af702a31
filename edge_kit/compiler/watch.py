"""What a compile is doing, noted for the ``edgekit`` process that watches it (:mod:`edge_kit.cli.worker`).

``edgekit compile`` runs the compile as a worker process; :data:`WORKER_ENV` names a file where the worker
appends one JSON line per note: the model and output folder, each step it enters, and, around the work that
runs the user's model in this process (TensorFlow's loading, tracing and conversion of a Keras or SavedModel
source, tf2onnx's export, ONNX Runtime's and ai-edge-quantizer's conversions, the int8 calibrations,
fine-tuning), what it does and until when it may take (:func:`watched`). The watching process reads the notes to
word a crash and stops a step that runs past its deadline. Outside a worker (a test, or
:func:`~edge_kit.compiler.pipeline.compile_model` called from Python) the notes go nowhere and nothing is enforced.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

WORKER_ENV = "EDGEKIT_COMPILE_WORKER"  # set: this process is the worker (its value: where it notes steps, or '')
LOOP_CAUSE = "a model that loops on real inputs? (edgekit compile --timeout sets the limit)"  # a run over the data
LOAD_CAUSE = ("a model too large to load, or whose file makes TensorFlow loop? (edgekit compile --timeout sets "
              "the limit)")  # TensorFlow's loading of a Keras or SavedModel: it runs no inputs


def note(**fields: Any) -> None:
    """Append ``fields`` as one JSON line to the worker's notes (the current step; the output folder, and whether
    this compile made it; a deadline), when this process is a worker; else do nothing. Returns nothing, never raises."""
    path = os.environ.get(WORKER_ENV)
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(fields) + "\n")
    except OSError:
        pass  # the notes only word a crash or a deadline; a compile never fails for them


@dataclass(eq=False)  # told apart by identity: two steps may say the same
class _Deadline:
    doing: str
    seconds: float
    cause: str
    until: float
    paused: float | None = None  # when a step inside it started: its clock stands still meanwhile

    def said(self) -> None:
        note(doing=self.doing, seconds=self.seconds, until=self.until, cause=self.cause)


_running: list[_Deadline] = []  # the started deadlines, the innermost (the one in force) last


@contextmanager
def watched(doing: str, seconds: float, *, at_once: bool = True, cause: str = LOOP_CAUSE
            ) -> Iterator[Callable[[], None]]:
    """Note that this process is ``doing`` something (a noun phrase: ``the int8 calibration on calib.npz``) that
    runs the user's model here and may take ``seconds``; the watching process stops the compile when it runs
    longer, saying ``cause`` (what to suspect and do). The clock starts on entry, or with ``at_once=False`` when
    the returned function is first called (a calibrator calls it as it takes its first sample, so the conversion
    before does not count).

    Steps nest (a calibration inside the conversion that runs it): the innermost started one is in force, and the
    clock of the one around it stands still meanwhile, so each counts only its own time. When the inner one ends,
    the outer one's deadline is noted again (moved on by the time the inner one took); when the last one ends,
    the deadline is lifted.

    Yields:
        The function that starts the clock (idempotent; a no-op once started).
    """
    mine: list[_Deadline] = []

    def start() -> None:
        if not mine:
            now = time.monotonic()  # CLOCK_MONOTONIC: system-wide, as the watching process reads it
            if _running and _running[-1].paused is None:
                _running[-1].paused = now
            mine.append(_Deadline(doing, seconds, cause, now + seconds))
            _running.append(mine[0])
            mine[0].said()

    if at_once:
        start()
    try:
        yield start
    finally:
        if mine:
            _end(mine[0])


def _end(deadline: _Deadline) -> None:
    """Take ``deadline`` off the running ones and note the one now in force (its clock going again), or none."""
    innermost = _running and _running[-1] is deadline
    _running.remove(deadline)
    if not innermost:
        return  # one inside it, started later, is still in force
    if not _running:
        note(doing=None, seconds=None, until=None)
        return
    outer = _running[-1]
    if outer.paused is not None:
        outer.until += time.monotonic() - outer.paused
        outer.paused = None
    outer.said()


_written = [False]  # whether this process's compile has put its complete result in place (set by the result swap)


def result_written(done: bool | None = None) -> bool:
    """Return whether the compile running in this process has put its complete result (manifest included) in place;
    with ``done``, first record it (the compile sets False as it starts, the result swap True once it is done)."""
    if done is not None:
        _written[0] = done
    return _written[0]


def _set_sigint(handler: Any) -> Any:
    """Set ``handler`` for SIGINT and return the one it replaces (SIG_DFL for one not set from Python); None, and
    nothing set, outside the main thread, where Python sets no signal handler."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.signal(signal.SIGINT, handler)
    return signal.SIG_DFL if previous is None else previous


@contextmanager
def interrupts_held() -> Iterator[list[int]]:
    """Hold Ctrl-C (SIGINT) while the block runs (the result swap, which must happen whole or not at all); the
    previous handler is back after it. Raises nothing itself: the caller says what a held Ctrl-C does once the block
    is done (the swap: stop the compile, exit 130, with the result that is in place whole). Outside the main thread
    the block just runs, and nothing is held.

    Yields:
        The list each Ctrl-C that came during the block is appended to (its signal number): empty when none came.
    """
    came: list[int] = []
    previous = _set_sigint(lambda signum, _frame: came.append(signum))
    try:
        yield came
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


SWAP_PAUSE_ENV = "EDGEKIT_TEST_SWAP_PAUSE"  # tests: a file path; the swap creates it and waits (<= 60 s) till removed


def pause_for_tests() -> None:
    """When :data:`SWAP_PAUSE_ENV` names a file (tests only), create it and wait until it is removed, at most 60 s:
    a test's Ctrl-C can land in the middle of the result swap, between its two renames. Returns nothing; raises
    nothing (a file that cannot be made: no pause)."""
    flag = os.environ.get(SWAP_PAUSE_ENV)
    if not flag:
        return
    try:
        open(flag, "x").close()
    except OSError:
        return
    deadline = time.monotonic() + 60
    while os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.05)


class StoppedAfterResult(BaseException):
    """The first Ctrl-C once the compile's result is in place (:func:`interrupts_after_result_stop`): the work left
    (printing the result table, its warnings) is skipped; the result is complete. A BaseException, as
    KeyboardInterrupt: no ``except Exception`` in the work it stops takes it for a failure of its own."""


@contextmanager
def interrupts_after_result_stop() -> Iterator[Callable[[], None]]:
    """While the block runs, Ctrl-C (SIGINT) raises KeyboardInterrupt as usual until the compile's result is written
    (:func:`result_written`). The first one afterwards stops the work left, which nothing needs undone: once the block
    has called the function this yields (its work after the result begins), it raises :class:`StoppedAfterResult`;
    one that came before (the compile was returning) is raised by that call. A second one raises KeyboardInterrupt:
    a compile stuck in its report can always be stopped. The previous handler is back after the block. Outside the
    main thread the block just runs, and the call raises nothing.

    Yields:
        The function that marks the start of the work after the result (raises StoppedAfterResult for a Ctrl-C that
        came since the result was written).
    """
    came: list[int] = []
    after: list[bool] = []

    def on_sigint(signum: int, _frame: Any) -> None:
        if not result_written() or came:
            raise KeyboardInterrupt
        came.append(signum)
        if after:
            raise StoppedAfterResult

    def begin_after_result() -> None:
        after.append(True)
        if came:
            raise StoppedAfterResult

    previous = _set_sigint(on_sigint)
    try:
        yield begin_after_result
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
