"""The agent's local inference API: the active model, served on a Unix socket, swapped without a dropped request.

The agent runs a :class:`Server` (``serve`` block of ``agent.yaml``; on by default) at
``<root>/serve.sock`` (mode 660: the agent's user and group). Applications on the device call it
with :class:`device_agents.serving.Client`, which sends float arrays by input name and gets float
arrays by output name back, whatever variant is active (the server quantizes and dequantizes).

Swapping: :meth:`Server.serve_model` loads the new model into its own interpreters first, then
replaces the reference requests start from. A request holds the model it started with until it is
answered, so requests in flight finish on the old model, new ones go to the new one, and the old
interpreters are released when the last of them is done. A model that cannot be loaded is never
served (the old one keeps serving); the agent only serves what passed its activation smoke test.

Live figures (:meth:`Server.snapshot`, in the agent's telemetry as ``live``): per served model,
requests, errors, service time p50/p90/p99 over the last :data:`WINDOW` requests (perf_counter_ns
from a request read to its answer ready, queueing for an interpreter included), queue depth and
connected clients, plus what was turned away (busy, malformed, oversized).
"""

from __future__ import annotations

import logging
import os
import queue
import random
import socketserver
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.errors import DeviceError
from device_agents.inference import ModelRunner, fidelity
from device_agents.serving.frames import (
    FrameError,
    read_frame,
    socket_buffers,
    write_frame,
)

log = logging.getLogger("edgekit.agent.serve")
WINDOW = 2048  # requests the live percentiles are taken over
WARMUP = 3  # inferences on zeros a new model runs before it is served
SHADOW_WINDOW = 256  # live input pairs the shadow comparison is taken over


@dataclass
class _Stats:
    requests: int = 0
    errors: int = 0
    latencies_ns: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    since: float = field(default_factory=time.time)


class _Served:
    """One model being served: a pool of interpreters (one per worker) and its live figures."""

    def __init__(self, path: Path, sha256: str, variant: str | None, make: Any, workers: int):
        self.sha256, self.variant, self.path = sha256, variant, path
        self.pool: queue.Queue[ModelRunner] = queue.Queue()
        for _ in range(workers):
            runner = ModelRunner(make(path))
            for _ in range(WARMUP):  # the first runs pack weights and fill caches: before any request, not during
                runner.invoke_raw([np.zeros(p.shape, p.dtype) for p in runner.inputs])
            self.pool.put(runner)
        probe = self.pool.queue[0]
        self.inputs = [p.record() for p in probe.inputs]
        self.outputs = [p.record() for p in probe.outputs]
        self.stats = _Stats()
        self.waiting = 0
        self.lock = threading.Lock()  # the counters above, updated from every connection's thread

    def count(self, took_ns: int | None) -> None:
        """Count one answered request (``took_ns`` its service time) or, with None, one error."""
        with self.lock:
            if took_ns is None:
                self.stats.errors += 1
            else:
                self.stats.requests += 1
                self.stats.latencies_ns.append(took_ns)

    def ref(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "variant": self.variant}

    def predict(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return the outputs for one sample (float32, by output name).

        Raises:
            ValueError: the inputs do not fit the model (named).
        """
        with self.lock:
            self.waiting += 1
        runner = self.pool.get()
        with self.lock:
            self.waiting -= 1
        try:
            runner.invoke_raw(runner.sample_tensors(arrays))
            return runner.results()
        finally:
            self.pool.put(runner)


class _Shadow:
    """A second model run on a share of live inputs, in a thread of its own, compared with the served one.

    Only the comparison is kept (per-output fidelity over the last :data:`SHADOW_WINDOW` pairs, the
    same metrics the compiler reports); the inputs are dropped as soon as the shadow model has run.
    A request never waits for it: an input is offered only when the share, the rate limit and the
    idle-CPU test allow, and dropped (counted) when the shadow is still busy.
    """

    def __init__(self, model: _Served, serving: _Served, share: float, max_per_s: float, max_load: float | None):
        self.model, self.serving = model, serving
        self.share, self.max_per_s = share, max_per_s
        self.max_load = 0.8 * (os.cpu_count() or 1) if max_load is None else max_load  # 1-minute load average
        self.pairs: deque = deque(maxlen=SHADOW_WINDOW)
        self.counts = {"compared": 0, "skipped_rate": 0, "skipped_busy_cpu": 0, "dropped_queue_full": 0, "errors": 0}
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._tokens, self._last = max_per_s, time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True, name="shadow").start()

    def offer(self, served: _Served, arrays: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Maybe queue one answered request for the shadow model (never blocks, never raises)."""
        if served is not self.serving or random.random() >= self.share:
            return
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.max_per_s, self._tokens + (now - self._last) * self.max_per_s)
            self._last = now
            if self._tokens < 1:
                self.counts["skipped_rate"] += 1
                return
            if os.getloadavg()[0] >= self.max_load:  # the device is busy: its own work first
                self.counts["skipped_busy_cpu"] += 1
                return
            self._tokens -= 1
        try:  # copies: a shared-memory input is the client's to overwrite once answered
            self._queue.put_nowait(({k: np.array(v) for k, v in arrays.items()}, outputs))
        except queue.Full:
            with self._lock:
                self.counts["dropped_queue_full"] += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                arrays, outputs = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                theirs = self.model.predict(arrays)
            except Exception:  # noqa: BLE001 - counted; the served answer went out already
                with self._lock:
                    self.counts["errors"] += 1
                continue
            with self._lock:
                self.pairs.append((outputs, theirs))
                self.counts["compared"] += 1

    def stop(self) -> None:
        self._stop.set()

    def snapshot(self) -> dict[str, Any]:
        """Return the comparison: the shadow model, the counts and the served outputs' fidelity against it."""
        with self._lock:
            pairs = list(self.pairs)
            counts = dict(self.counts)
        out: dict[str, Any] = {"model": self.model.ref(), "share": self.share, "max_per_s": self.max_per_s,
                               "window": len(pairs), **counts, "fidelity": None}
        if pairs:
            served = {k: np.stack([p[0][k] for p in pairs]) for k in pairs[0][0]}
            shadow = {k: np.stack([p[1][k] for p in pairs]) for k in pairs[0][1]}
            try:
                f = fidelity(served, shadow)
                out["fidelity"] = {k: f[k] for k in ("snr_db", "cosine", "max_abs_error", "mean_abs_error") if k in f}
                out["fidelity"]["of"] = "served outputs against the shadow model's, same live inputs"
            except ValueError as exc:  # different outputs: not comparable
                out["fidelity_error"] = str(exc)
        return out


class Server:
    """The local inference API. ``start()``, ``serve_model(...)`` on every activation, ``close()``."""

    def __init__(self, path: Path, *, make_interpreter: Any, max_clients: int = 16,
                 max_payload: int = 64 * 1024 * 1024, workers: int = 1):
        self.path = Path(path)
        self.make_interpreter = make_interpreter  # path -> allocated interpreter (the agent's runtime and target)
        self.max_clients = max_clients
        self.max_payload = max_payload
        self.workers = workers
        self.current: _Served | None = None
        self.clients = 0
        self.turned_away = {"busy": 0, "malformed": 0}
        self.swaps = 0
        self.shadow: _Shadow | None = None
        self._lock = threading.Lock()
        self._server: socketserver.ThreadingUnixStreamServer | None = None

    # --- life cycle -------------------------------------------------------------------------------

    def start(self) -> Server:
        """Listen on the socket (a stale socket file is replaced) and serve in a background thread.

        Raises:
            DeviceError: the socket cannot be created (path too long, no permission).
        """
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def setup(self) -> None:
                socket_buffers(self.request)
                super().setup()

            def handle(self) -> None:
                outer._handle(self.connection, self.rfile)

        class Listener(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True
            request_queue_size = 64

        self.path.unlink(missing_ok=True)
        try:
            self._server = Listener(str(self.path), Handler)
            os.chmod(self.path, 0o660)
        except OSError as exc:
            raise DeviceError(f"serving API: cannot listen on {self.path}: {exc.strerror or exc}") from None
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True,
                         name="serve").start()
        return self

    def close(self) -> None:
        """Stop listening and remove the socket (connections in progress end with their thread)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.path.unlink(missing_ok=True)

    def serve_model(self, path: Path, sha256: str, variant: str | None) -> None:
        """Load ``path`` into fresh interpreters, then serve it; requests in flight finish on the old one.

        Raises:
            DeviceError: the model cannot be loaded (the old one keeps serving).
        """
        if self.current is not None and self.current.sha256 == sha256:
            return
        try:
            new = _Served(path, sha256, variant, self.make_interpreter, self.workers)
        except Exception as exc:  # noqa: BLE001 - whatever the interpreter raises: not served
            raise DeviceError(f"serving API: model {sha256[:12]} cannot be loaded ({exc}); still serving "
                              f"{self.current.sha256[:12] if self.current else 'nothing'}") from None
        with self._lock:
            self.current = new
            self.swaps += 1
            shadow, self.shadow = self.shadow, None
        if shadow is not None:  # its comparison was with the model served before: ended, set it again
            shadow.stop()
        log.info("serving %s %s", variant, sha256[:12])

    def set_shadow(self, path: Path | None, sha256: str = "", variant: str | None = None, *, share: float = 0.1,
                   max_per_s: float = 5.0, max_load: float | None = None) -> None:
        """Run ``path`` as the shadow model on ``share`` of the live requests (at most ``max_per_s`` a
        second, only while the 1-minute load average is below ``max_load``, default 0.8 per core), or
        none with ``path`` None. Ends with the next swap.

        Raises:
            DeviceError: nothing is served, the shadow is the served model, or it cannot be loaded.
        """
        old, self.shadow = self.shadow, None
        if old is not None:
            old.stop()
        if path is None:
            return
        served = self.current
        if served is None or served.sha256 == sha256:
            raise DeviceError("shadow: " + ("nothing is served" if served is None else "that is the served model"))
        try:
            model = _Served(path, sha256, variant, self.make_interpreter, 1)
        except Exception as exc:  # noqa: BLE001 - not loadable: no shadow
            raise DeviceError(f"shadow: model {sha256[:12]} cannot be loaded ({exc})") from None
        self.shadow = _Shadow(model, served, share, max_per_s, max_load)

    # --- figures ----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Return the live figures of the served model (``source: live``), or ``{"model": None}``."""
        served = self.current
        out: dict[str, Any] = {"source": "live", "clients": self.clients, "turned_away": dict(self.turned_away),
                               "swaps": self.swaps, "model": served.ref() if served else None}
        if served is None:
            return out
        with served.lock:
            lat = np.array(served.stats.latencies_ns, dtype=np.float64) / 1e6
        out.update(requests=served.stats.requests, errors=served.stats.errors, queue_depth=served.waiting,
                   since=round(served.stats.since, 3), window=len(lat),
                   latency_ms={q: round(float(np.percentile(lat, p)), 4) for q, p in (("p50", 50), ("p90", 90), ("p99", 99))}
                   if len(lat) else None,
                   clock="perf_counter_ns from a request read to its answer ready (queueing included)")
        shadow = self.shadow
        out["shadow"] = shadow.snapshot() if shadow is not None and shadow.serving is served else None
        return out

    def samples(self, n: int) -> list[float]:
        """Return the served model's last ``n`` service times in ms, oldest first (what a rollout gate tests)."""
        served = self.current
        if served is None or n <= 0:
            return []
        with served.lock:
            tail = list(served.stats.latencies_ns)[-n:]
        return [round(t / 1e6, 4) for t in tail]

    # --- one connection ---------------------------------------------------------------------------

    def _handle(self, conn: Any, rfile: Any) -> None:
        with self._lock:
            admitted = self.clients < self.max_clients
            if admitted:
                self.clients += 1
            else:
                self.turned_away["busy"] += 1
        if not admitted:
            _answer(conn, {"ok": False, "error": f"busy: {self.max_clients} clients connected (serve.max_clients); "
                                                 "retry later"})
            return
        shm: dict = {}  # this connection's shared-memory mapping, kept while the client's file is the same
        try:
            while True:
                try:
                    frame = read_frame(rfile, self.max_payload, shm)
                except FrameError as exc:  # the stream is out of step: answer, then hang up
                    with self._lock:
                        self.turned_away["malformed"] += 1
                    _answer(conn, {"ok": False, "error": f"malformed request: {exc}"})
                    return
                if frame is None:
                    return
                if not _answer(conn, *self._request(*frame)):
                    return
        finally:
            with self._lock:
                self.clients -= 1

    def _request(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
        """Return the answer (header, arrays) to one well-framed request."""
        started = time.perf_counter_ns()
        served = self.current  # this request's model, whatever is activated meanwhile
        op = header.get("op")
        if served is None:
            return {"ok": False, "error": "no model is active on this device; activate one first"}, None
        if op == "info":
            return {"ok": True, "model": served.ref(), "inputs": served.inputs, "outputs": served.outputs}, None
        if op != "predict":
            return {"ok": False, "error": f"unknown op {str(op)[:20]!r} (predict, info)"}, None
        try:
            outputs = served.predict(arrays)
        except ValueError as exc:
            served.count(None)
            return {"ok": False, "error": str(exc), "model": served.ref()}, None
        except Exception as exc:  # noqa: BLE001 - the interpreter's failure is this request's error, not the server's end
            served.count(None)
            log.exception("inference failed")
            return {"ok": False, "error": f"inference failed: {type(exc).__name__}: {exc}", "model": served.ref()}, None
        took = time.perf_counter_ns() - started
        served.count(took)
        shadow = self.shadow
        if shadow is not None:
            shadow.offer(served, arrays, outputs)
        return {"ok": True, "model": served.ref(), "ms": round(took / 1e6, 4)}, outputs


def _answer(conn: Any, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> bool:
    """Send one answer; return False when the client is gone."""
    try:
        write_frame(conn, header, arrays)
        return True
    except OSError:
        return False
