"""`edgekit compile` in a worker process, so a crash in native code is one line, not a dead command.

Every run of a model over the data happens in a child with a deadline (:mod:`device_agents.smoke`), but
TensorFlow's converter and calibrator, ai-edge-quantizer and ONNX Runtime's quantizer still run the
user's model inside the compiling process (docs/compile.md): a damaged or hostile
model, or a converter bug, can kill it with SIGSEGV, and Python prints nothing. So the ``edgekit``
process runs the compile as a worker: ``python -m edge_kit compile ...``, same arguments, same
terminal (progress bars and ``--json`` pass through). The worker notes each step and its output
folder in a file (:data:`WORKER_ENV` names it). When the worker dies of a signal, this process says
which signal at which step in one line (exit 3, and ``--json`` gives it as the error) and removes what
the worker left: its temporary files (its ``TMPDIR`` is a folder made here) and an output folder it
made and left empty. Its own exit code otherwise passes through unchanged.

The work that runs the user's model inside the worker (TensorFlow's loading, tracing and conversion of a Keras or
SavedModel source, tf2onnx's export, the in-process ONNX and ai-edge-quantizer conversions, the int8 calibrations,
fine-tuning) is noted with a deadline (:func:`edge_kit.compiler.watch.watched`), derived from ``--timeout`` as the
model-run children's (a conversion's: :func:`edge_kit.compiler.analysis.conversion_deadline`): this process reads
the notes every :data:`POLL_S` seconds and, when one runs past it, stops the worker (SIGTERM, SIGKILL
:data:`STOP_GRACE_S` later), says which step in one line (exit 2, as a model run over the data that does not finish
in time) and cleans up as for a crash.

Ctrl-C reaches the worker from the terminal (same process group) and this process waits for it to
finish cleaning up (exit 130). This process does not ignore SIGINT (an ignored signal is inherited by the
worker, whose Ctrl-C then did nothing: the compile ran on and replaced the previous result); it notes it, and
a worker still running :data:`INTERRUPT_GRACE_S` seconds after it (native code running the model, which
Python cannot interrupt; :data:`INTERRUPT_GRACE_ENV` sets other seconds) is stopped as an overdue one is. A SIGTERM
sent here is passed on to the worker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edge_kit.compiler.watch import LOOP_CAUSE, WORKER_ENV

POLL_S = 0.5  # how often the notes are read for a deadline
STOP_GRACE_S = 5.0  # after SIGTERM, how long an overdue worker has before SIGKILL
INTERRUPT_GRACE_S = 10.0  # after Ctrl-C, how long the worker has to stop on its own before it is stopped
INTERRUPT_GRACE_ENV = "EDGEKIT_INTERRUPT_GRACE_S"  # seconds in place of INTERRUPT_GRACE_S (tests shorten it)


def supervised(argv: list[str]) -> bool:
    """Return True when ``argv`` (``edgekit``'s arguments) is a compile this process should hand to a worker: not
    when it is a worker itself, or runs in-process (tests set :data:`WORKER_ENV` empty)."""
    return bool(argv) and argv[0] == "compile" and WORKER_ENV not in os.environ


def interrupt_grace() -> float | str:
    """Return the seconds a worker has to stop on its own after Ctrl-C: :data:`INTERRUPT_GRACE_ENV` when set, else
    :data:`INTERRUPT_GRACE_S`; or, when the variable is not a number of seconds above 0, the one line that says so
    and what to do. Raises nothing."""
    given = os.environ.get(INTERRUPT_GRACE_ENV)
    if given is None:
        return INTERRUPT_GRACE_S
    try:
        seconds = float(given)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        return (f"${INTERRUPT_GRACE_ENV} is {given!r}, not a number of seconds above 0 (how long a compile has to stop "
                f"on its own after Ctrl-C); set it to one, or unset it for {INTERRUPT_GRACE_S:g}")
    return seconds


def _notes(path: Path) -> dict[str, Any]:
    """Return the worker's notes folded into one dict (later lines win); empty when there are none."""
    folded: dict[str, Any] = {}
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                folded.update(json.loads(line))
            except ValueError:
                continue  # a line cut by the crash
    except OSError:
        pass
    return folded


def run_worker(argv: list[str]) -> tuple[int, str | None]:
    """Run ``edgekit ARGV`` (a compile) in a worker process and wait for it, stopping it when a step that runs the
    model in the worker outlives the deadline the worker noted for it (:func:`edge_kit.compiler.watch.watched`).

    Returns:
        ``(exit code, None)`` as the worker exited; or ``(code, one line for the caller to print)``: when it died
        of a signal, ``3`` and which signal at which step; when a step ran past its deadline, ``2`` (as a run of the
        model over the data that does not finish in time) and which step, what to do. Either line says what was
        cleaned up. Ctrl-C: ``(130, None)`` when the worker stopped on its own (it said so), ``(130, line)`` when it
        had to be stopped; ``(0, line)`` when it had to be stopped after its result was written (complete: the line
        says so, for the caller to print as a note, not an error). ``(2, line)``, no worker started, when
        :data:`INTERRUPT_GRACE_ENV` is not a number of seconds (:func:`interrupt_grace`).

    Raises:
        OSError: the worker could not be started.
    """
    from edge_kit.sim.process import stop_process

    grace = interrupt_grace()
    if isinstance(grace, str):
        return 2, grace
    scratch = Path(tempfile.mkdtemp(prefix="edgekit-"))  # short: the worker's forkserver puts a socket path in it
    notes = scratch / "notes.jsonl"
    env = {**os.environ, WORKER_ENV: str(notes), "TMPDIR": str(scratch)}
    proc = None
    overdue: dict[str, Any] | None = None
    interrupted: list[float] = []  # when Ctrl-C came
    stopped_after_interrupt = False
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # noted, not ignored: a handler, unlike SIG_IGN, is not inherited, so the terminal's Ctrl-C interrupts the
        # worker, which cleans up
        signal.signal(signal.SIGINT, lambda _signum, _frame: interrupted.append(time.monotonic()))
        proc = subprocess.Popen([sys.executable, "-m", "edge_kit", *argv], env=env)
        signal.signal(signal.SIGTERM, lambda signum, _frame: proc.send_signal(signum))
        while True:
            try:
                code = proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                said = _notes(notes)
                until = said.get("until")
                if interrupted and time.monotonic() > interrupted[0] + grace:
                    stopped_after_interrupt = True
                    stop_process(proc, STOP_GRACE_S)  # SIGTERM, then SIGKILL
                    code = proc.wait()
                    break
                if isinstance(until, (int, float)) and time.monotonic() > until:
                    overdue = said
                    stop_process(proc, STOP_GRACE_S)  # SIGTERM, then SIGKILL
                    code = proc.wait()
                    break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        said = _notes(notes)
        shutil.rmtree(scratch, ignore_errors=True)
    model = said.get("model") or "edgekit compile"
    step = said.get("step") or "starting"
    if stopped_after_interrupt and said.get("published"):  # its result was complete: what it still did is skipped
        _cleaned(said)
        return 0, (f"interrupted once the result was written: {said['published']} is complete (manifest.json and its "
                   f"variants); the compile did not stop on its own within {grace:g} s of Ctrl-C, so it "
                   "was stopped, skipping what it still had to print")
    if stopped_after_interrupt:
        return 130, (f"interrupted: {model} did not stop on its own within {grace:g} s of Ctrl-C while "
                     f"{step!r}, so it was stopped; {_cleaned(said)}")
    if overdue is not None:
        return 2, (f"{model}: {overdue.get('doing') or 'a step'} did not finish within {overdue.get('seconds', 0):g} s "
                   f"while {step!r}: {overdue.get('cause') or LOOP_CAUSE}; the compile was stopped; {_cleaned(said)}")
    if code >= 0:
        return code, None
    if -code in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, or a SIGTERM passed on: stopped, not crashed
        return 128 - code, None
    try:
        name = signal.Signals(-code).name
    except ValueError:  # a real-time signal has no name
        name = f"signal {-code}"
    if -code == signal.SIGKILL:
        return 3, (f"{model}: the compile was killed (SIGKILL) while {step!r}: most likely by the kernel for want of "
                   f"memory (see dmesg); try a machine with more memory, or fewer variants or samples; {_cleaned(said)}")
    return 3, (f"{model}: the compile died of {name} while {step!r}: native code that runs the model in the compiling "
               "process (TensorFlow's converter or calibrator, a quantizer) crashed on it: a damaged or hostile model, "
               f"or a converter bug; leave that variant out (a profile without it) and compile again; {_cleaned(said)}")


def _ours(said: dict[str, Any], key: str, kind: str) -> Path | None:
    """Return the folder the worker noted under ``key`` (``staging``, ``old``) when it is one the compile's result
    swap makes beside the output folder (``.<out>.<kind>-...``, :func:`edge_kit.compiler.pipeline._publish`) and it
    exists; else None: nothing else is ever moved or removed."""
    out, path = said.get("out"), said.get(key)
    if not (isinstance(out, str) and isinstance(path, str)):
        return None
    out_path, found = Path(out), Path(path)
    ok = found.parent == out_path.parent and found.name.startswith(f".{out_path.name}.{kind}-")
    return found if ok and found.is_dir() and not found.is_symlink() else None


def _cleaned(said: dict[str, Any]) -> str:
    """Finish or undo the result swap the worker was in when it ended (``said``: its folded notes): after the new
    result took the output folder's place, remove the previous result set aside; before, remove the staging folder
    and put a previous result set aside back. Then remove the output folder it made when it is left empty.

    Returns:
        What was cleaned up, in words, for the end of the line that reports the worker's end.
    """
    out = said.get("out")
    old = _ours(said, "old", "old")
    if said.get("published"):
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return f"the new result had been written to {out} already"
    staging = _ours(said, "staging", "staging")
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
    if old is not None and not Path(out).exists():
        os.replace(old, out)  # ended between the swap's two renames: the previous result comes back
    if out and said.get("made") and Path(out).is_dir() and not any(Path(out).iterdir()):
        Path(out).rmdir()
        return f"nothing was written ({out}, which it made, was removed)"
    return "nothing was written; an earlier result in the output folder is left as it was"
