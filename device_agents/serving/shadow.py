"""Shadow runs in a child process: a second model on a share of live inputs, never in a request's way.

The shadow model runs in a process of its own (``forkserver``, as the activation smoke test and the
monitor's signature checks do), at the lowest CPU priority the kernel has (``SCHED_IDLE`` on Linux:
it runs only on a core nothing else wants; ``nice 19`` where that policy is missing). It never
competes with the served model for Python's GIL, and never for a core the device's own work asks for.

The agent hands it inputs through a small ring of slots in a shared-memory file (one copy of the
input, as float32, into a free slot; a few bytes through a pipe name the slot); the child writes
the shadow model's outputs into the same slot and names them, and the agent pairs them with the
served answer of the same request. A pair where either answer holds NaN or an infinity is counted
(``non_finite``) and kept out of the comparison, which the finite pairs still measure.
When every slot is taken (the child is behind: no idle CPU, or a slow model) the input is dropped
and counted (``dropped_queue_full``); nothing ever waits for the child. Only the comparison is kept:
per-output fidelity over the last :data:`SHADOW_WINDOW` pairs (the compiler's metrics); the slots
are overwritten by the next inputs and the file is removed when the shadow run ends.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import mmap
import multiprocessing
import os
import pickle
import random
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.errors import DeviceError
from device_agents.inference import fidelity
from edgekit_protocol.desired import MAX_ERROR_CHARS
from edgekit_protocol.labels import clip

log = logging.getLogger("edgekit.agent.serve")
SHADOW_WINDOW = 256  # live input pairs the shadow comparison is taken over
SLOTS = 2  # inputs in the ring: one being run by the child, one waiting; more are dropped
READY_TIMEOUT_S = 120.0  # the child's model load (and warm-up) at most


@dataclasses.dataclass(frozen=True)
class Interpreters:
    """A picklable interpreter factory (``path -> allocated interpreter``) for the serving API, the
    agent's runtime, target and threads: what a shadow child process can rebuild on its side."""

    runtime: str | None = None
    threads: int = 1
    delegate: str = "xnnpack"
    options: dict[str, Any] | None = None

    def for_variant(self, variant: str | None) -> Interpreters:
        """Return the factory for models of ``variant``: this one with the delegate and options that variant runs
        with (:func:`device_agents.targets.delegate_for`: a CPU variant on the CPU where the delegate is the Edge
        TPU)."""
        from device_agents.targets import delegate_for

        delegate, options = delegate_for(variant, self.delegate, self.options)
        return dataclasses.replace(self, delegate=delegate, options=options)

    def __call__(self, path: Path) -> Any:
        """Return an allocated interpreter for ``path``.

        Raises:
            RuntimeUnavailable: the runtime cannot be used here. ValueError, RuntimeError: the model
                cannot be loaded (the runtime's own error).
        """
        from device_agents.runtimes import get_runtime

        return get_runtime(self.runtime, model=Path(path)).interpreter(Path(path), threads=self.threads,
                                                                       delegate=self.delegate, options=self.options)


class ModelRef:
    """The shadow model as the agent names it (``ref()``), with its inputs and outputs."""

    def __init__(self, sha256: str, variant: str | None, inputs: list[dict], outputs: list[dict]):
        self.sha256, self.variant, self.inputs, self.outputs = sha256, variant, inputs, outputs

    def ref(self) -> dict[str, Any]:
        """Return ``{"sha256", "variant"}``."""
        return {"sha256": self.sha256, "variant": self.variant}


def _lowest_priority() -> str:
    """Put this process at the lowest CPU priority available; return which one it got."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # type: ignore[attr-defined]
        return "SCHED_IDLE"
    except (AttributeError, OSError):
        pass
    try:
        os.nice(19)
        return "nice 19"
    except OSError:
        return "normal"


def _child(make: Any, model: str, ring: str, slot_bytes: int, in_bytes: int, conn: Any) -> None:
    """The shadow process: load ``model``, then run every input the agent names until end of input.

    Sends ``("ready", priority, inputs, outputs)`` or ``("failed", reason)`` first, then
    ``(seq, slot, outputs, error or None)`` per input: ``outputs`` is a list of ``(name, shape)``
    when they were written (float32) into the slot after its ``in_bytes`` of inputs, or the arrays
    themselves when they do not fit there. Never raises: a model that fails on one input answers that
    input's error; a lost agent (end of pipe) ends the process.
    """
    try:
        from device_agents.inference import ModelRunner

        priority = _lowest_priority()
        runner = ModelRunner(make(Path(model)))
        runner.invoke_raw([np.zeros(p.shape, p.dtype) for p in runner.inputs])  # packs weights before any input
        fd = os.open(ring, os.O_RDWR)  # it writes its outputs back into the slot
        try:
            buf = mmap.mmap(fd, slot_bytes * SLOTS)
        finally:
            os.close(fd)
        conn.send(("ready", priority, [p.record() for p in runner.inputs], [p.record() for p in runner.outputs]))
    except Exception as exc:  # noqa: BLE001 - whatever the interpreter raises is the reason given
        try:
            conn.send(("failed", f"{type(exc).__name__}: {exc}".strip().splitlines()[0]))
        except OSError:
            pass
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        seq, slot, specs = msg
        at = slot * slot_bytes
        arrays = {}
        for name, shape in specs:
            n = math.prod(shape)
            arrays[name] = np.frombuffer(buf, np.float32, count=n, offset=at).reshape(shape)
            at += 4 * n
        try:
            runner.invoke_raw(runner.sample_tensors(arrays))
            outputs: Any = runner.results()
            if sum(4 * o.size for o in outputs.values()) <= slot_bytes - in_bytes:  # back through the slot too
                at, written = slot * slot_bytes + in_bytes, []
                for name, o in outputs.items():
                    np.copyto(np.frombuffer(buf, np.float32, count=o.size, offset=at).reshape(o.shape), o,
                              casting="unsafe")
                    written.append((name, o.shape))
                    at += 4 * o.size
                outputs = written
            answer = (seq, slot, outputs, None)
        except Exception as exc:  # noqa: BLE001 - counted by the agent; the served answer went out already
            answer = (seq, slot, None, f"{type(exc).__name__}: {exc}")
        try:
            conn.send(answer)
        except OSError:
            return


def _finite(outputs: Any) -> bool:
    """Return whether ``outputs`` (one answer: ``{name: array}``) holds no NaN and no infinity."""
    return isinstance(outputs, dict) and all(bool(np.isfinite(a).all()) for a in outputs.values())


def _ring_file(size: int) -> Path:
    """Return a new file of ``size`` zero bytes (mode 600) under /dev/shm, or the temporary folder.

    Its name never starts with ``edgekit-``: a client cannot name it as its own shared-memory input.

    Raises:
        OSError: the file cannot be made (no space on /dev/shm).
    """
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    fd, name = tempfile.mkstemp(prefix="ekshadow-", dir=folder)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return Path(name)


class Shadow:
    """A shadow run: the child process, the ring of input slots, and the comparison kept.

    ``offer()`` is called by a request's thread after (or, for inputs the client may overwrite,
    just before) it answers; it never blocks and never raises.
    """

    def __init__(self, path: Path, sha256: str, variant: str | None, *, serving: Any, make: Any,
                 input_shapes: list[tuple[str, tuple[int, ...]]], output_shapes: list[tuple[str, tuple[int, ...]]],
                 share: float, max_per_s: float,
                 max_load: float | None):
        """Start the child and wait until it has loaded the model.

        Raises:
            DeviceError: the interpreter factory cannot be sent to a child process, or the child
                failed to load the model (its reason).
        """
        self.serving = serving
        self.share, self.max_per_s = share, max_per_s
        self.max_load = 0.8 * (os.cpu_count() or 1) if max_load is None else max_load  # 1-minute load average
        self.pairs: deque = deque(maxlen=SHADOW_WINDOW)
        self.counts = {"compared": 0, "skipped_rate": 0, "skipped_busy_cpu": 0, "dropped_queue_full": 0, "errors": 0,
                       "non_finite": 0}
        self.ended: str | None = None  # why the child is gone, when it is
        # this run's id, in each of its messages: its counts only rise within it, and a new id (a new shadow run, an
        # agent started again) tells the monitor that they started again from 0 (edgekit_protocol.messages)
        self.run = os.urandom(8).hex()
        self._tokens, self._last = max_per_s, time.monotonic()
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._seq = 0
        self._pending: dict[int, dict[str, np.ndarray]] = {}  # seq -> the served outputs it is compared with
        self._free = list(range(SLOTS))
        self._specs = input_shapes
        self._in_bytes = 4 * sum(math.prod(s) for _, s in input_shapes)  # then room for as many outputs
        self._slot_bytes = max(4, self._in_bytes + 4 * sum(math.prod(s) for _, s in output_shapes))
        if isinstance(make, Interpreters):
            make = dataclasses.replace(make, threads=1)  # one core at most, and only an idle one
        try:
            pickle.dumps(make)
        except Exception:  # noqa: BLE001 - a lambda or a bound method: cannot reach the child
            raise DeviceError("shadow: the serving API's interpreter factory cannot be sent to a child process "
                              "(use device_agents.serving.shadow.Interpreters)") from None
        self._ring: Path | None = None
        self._buf: Any = None
        self._conn: Any = None
        self._proc: Any = None
        try:
            self._ring = _ring_file(self._slot_bytes * SLOTS)
            fd = os.open(self._ring, os.O_RDWR)
            try:
                self._buf = mmap.mmap(fd, self._slot_bytes * SLOTS)
            finally:
                os.close(fd)
            method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
            ctx = multiprocessing.get_context(method)
            self._conn, child = ctx.Pipe()
            self._proc = ctx.Process(target=_child, args=(make, str(path), str(self._ring), self._slot_bytes,
                                                         self._in_bytes, child),
                                     daemon=True, name="edgekit-shadow")
            self._proc.start()
            child.close()
            if not self._conn.poll(READY_TIMEOUT_S):
                raise DeviceError(f"shadow: model {sha256[:12]} did not load within {READY_TIMEOUT_S:.0f} s")
            try:
                first = self._conn.recv()
            except (EOFError, OSError):
                self._proc.join(5)
                raise DeviceError(f"shadow: the shadow process ended while loading model {sha256[:12]} "
                                  f"(exit {self._proc.exitcode})") from None
            if first[0] != "ready":
                raise DeviceError(f"shadow: model {sha256[:12]} cannot be loaded ({first[1]})")
        except OSError as exc:  # no room for the slots, no process to start
            self._close()
            raise DeviceError(f"shadow: cannot start the shadow process ({exc.strerror or exc})") from None
        except BaseException:
            self._close()
            raise
        finally:
            if self._ring is not None:
                self._ring.unlink(missing_ok=True)  # both sides have it mapped: no name left behind
        self.priority = first[1]
        self.model = ModelRef(sha256, variant, first[2], first[3])
        threading.Thread(target=self._collect, daemon=True, name="shadow-collect").start()

    # --- the request side -------------------------------------------------------------------------

    def offer(self, served: Any, arrays: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Maybe hand one answered request's inputs to the shadow process (never blocks, never raises)."""
        taken = self.take(served, arrays, outputs)
        if taken is not None:
            self.send(taken)

    def take(self, served: Any, arrays: dict[str, np.ndarray],
             outputs: dict[str, np.ndarray]) -> tuple[int, int, list] | None:
        """Maybe copy one request's inputs into a free slot, its share, rate, load and slots allowing (counted when
        not); return what :meth:`send` hands the child, or None. The copy is all a request whose inputs its client
        may overwrite once answered waits for: :meth:`send` wakes the child, after the answer. Never blocks, never
        raises."""
        if served is not self.serving or self.ended or random.random() >= self.share:
            return None
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.max_per_s, self._tokens + (now - self._last) * self.max_per_s)
            self._last = now
            if self._tokens < 1:
                self.counts["skipped_rate"] += 1
                return None
            if os.getloadavg()[0] >= self.max_load:  # the device is busy: its own work first
                self.counts["skipped_busy_cpu"] += 1
                return None
            if not self._free:
                self.counts["dropped_queue_full"] += 1
                return None
            self._tokens -= 1
            slot = self._free.pop()
            self._seq += 1
            seq = self._seq
            self._pending[seq] = outputs
        try:
            specs, at = [], slot * self._slot_bytes
            if len(arrays) == 1 and len(self._specs) == 1:  # a single-input model takes its array under any name
                arrays = {self._specs[0][0]: next(iter(arrays.values()))}
            for name, shape in self._specs:
                a = arrays[name]
                n = a.size
                if n != math.prod(shape):
                    raise ValueError(name)
                np.copyto(np.frombuffer(self._buf, np.float32, count=n, offset=at).reshape(a.shape), a,
                          casting="unsafe")
                specs.append((name, a.shape))
                at += 4 * n
            return seq, slot, specs
        except Exception:  # noqa: BLE001 - inputs that do not fit (or a closed run's slots): not compared
            self._lost(seq, slot)
            return None

    def send(self, taken: tuple[int, int, list]) -> None:
        """Hand the child the slot :meth:`take` filled (never blocks on the child, never raises)."""
        try:
            with self._send_lock:  # request threads of several clients share the pipe
                self._conn.send(taken)
        except Exception:  # noqa: BLE001 - a closed pipe: the run ended
            self._lost(taken[0], taken[1])

    def _lost(self, seq: int, slot: int) -> None:
        """Give ``slot`` back and count input ``seq`` as an error: it never reached the child."""
        with self._lock:
            self._pending.pop(seq, None)
            self._free.append(slot)
            self.counts["errors"] += 1

    # --- the child's answers ----------------------------------------------------------------------

    def _collect(self) -> None:
        """Pair the child's outputs with the served ones until the child's pipe ends."""
        conn = self._conn
        while True:
            try:
                seq, slot, theirs, error = conn.recv()
            except (EOFError, OSError, TypeError, ValueError):
                break
            if isinstance(theirs, list):  # written into the slot: copied out before the slot is given back
                at, arrays = slot * self._slot_bytes + self._in_bytes, {}
                for name, shape in theirs:
                    n = math.prod(shape)
                    arrays[name] = np.frombuffer(self._buf, np.float32, count=n, offset=at).reshape(shape).copy()
                    at += 4 * n
                theirs = arrays
            with self._lock:
                ours = self._pending.pop(seq, None)
                self._free.append(slot)
                if error is not None or ours is None:
                    self.counts["errors"] += 1
                elif not _finite(ours) or not _finite(theirs):  # kept out of the window: no figure means anything on it
                    self.counts["non_finite"] += 1
                else:
                    self.pairs.append((ours, theirs))
                    self.counts["compared"] += 1
        if self.ended is None:
            if self._proc is not None:
                self._proc.join(1)  # its exit status, for the reason
            code = self._proc.exitcode if self._proc is not None else None
            self.ended = f"the shadow process ended (exit {code})"
            log.warning("shadow: %s", self.ended)

    def stop(self) -> None:
        """End the shadow run: the child stops at end of input (killed after 2 s) and its memory is freed."""
        if self.ended is None:
            self.ended = "stopped"
        self._close()

    def _close(self) -> None:
        """End the child (end of input, then killed after 2 s) and remove the slots' file; never raises."""
        if self._conn is not None:
            try:
                self._conn.send(None)
            except (OSError, ValueError):
                pass
        if self._proc is not None:
            self._proc.join(2)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(2)
        if self._conn is not None:
            self._conn.close()
        if self._ring is not None:
            self._ring.unlink(missing_ok=True)

    # --- figures ----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Return the comparison: the shadow model, this run's id (``run``), the counts and the served outputs'
        fidelity against it (or ``fidelity_error``, why they cannot be compared, at most
        :data:`edgekit_protocol.desired.MAX_ERROR_CHARS` characters and how long it was)."""
        with self._lock:
            pairs = list(self.pairs)
            counts = dict(self.counts)
        out: dict[str, Any] = {"model": self.model.ref(), "run": self.run, "share": self.share, "max_per_s": self.max_per_s,
                               "window": len(pairs), **counts, "fidelity": None,
                               "runs_in": f"child process ({self.priority})"}
        if self.ended and self.ended != "stopped":
            out["ended"] = self.ended
        if pairs:
            served = {k: np.stack([p[0][k] for p in pairs]) for k in pairs[0][0]}
            shadow = {k: np.stack([p[1][k] for p in pairs]) for k in pairs[0][1]}
            try:
                f = fidelity(served, shadow)
                out["fidelity"] = {k: f[k] for k in ("snr_db", "cosine", "max_abs_error", "mean_abs_error") if k in f}
                out["fidelity"]["of"] = "served outputs against the shadow model's, same live inputs"
            except ValueError as exc:  # different outputs: not comparable (their names are the models': cut short, or
                out["fidelity_error"] = clip(str(exc), MAX_ERROR_CHARS)  # the message is over the limit, never sent)
        return out
