"""What a compile is doing, noted for the ``edgekit`` process that watches it (:mod:`edge_kit.cli.worker`).

``edgekit compile`` runs the compile as a worker process; :data:`WORKER_ENV` names a file where the worker
appends one JSON line per note: the model and output folder, each step it enters, and, around the work that
runs the user's model in this process (TensorFlow's loading of a Keras or SavedModel source, the int8
calibrations, fine-tuning), what it does and until when it may take (:func:`watched`). The watching process
reads the notes to word a crash and stops a step that runs past its deadline. Outside a worker (a test, or
:func:`~edge_kit.compiler.pipeline.compile_model` called from Python) the notes go nowhere and nothing is enforced.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

WORKER_ENV = "EDGEKIT_COMPILE_WORKER"  # set: this process is the worker (its value: where it notes steps, or '')


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


@contextmanager
def watched(doing: str, seconds: float, *, at_once: bool = True) -> Iterator[Callable[[], None]]:
    """Note that this process is ``doing`` something (a noun phrase: ``the int8 calibration on calib.npz``) that
    runs the user's model here and may take ``seconds``; the watching process stops the compile when it runs
    longer. The clock starts on entry, or with ``at_once=False`` when the returned function is first called (a
    calibrator calls it as it takes its first sample, so the conversion before does not count). On exit the
    deadline is lifted.

    Yields:
        The function that starts the clock (idempotent; a no-op once started).
    """
    started = False

    def start() -> None:
        nonlocal started
        if not started:
            started = True
            note(doing=doing, seconds=seconds, until=time.monotonic() + seconds)  # CLOCK_MONOTONIC: system-wide

    if at_once:
        start()
    try:
        yield start
    finally:
        if started:
            note(doing=None, seconds=None, until=None)
