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
import socketserver
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.errors import DeviceError
from device_agents.inference import ModelRunner
from device_agents.serving.frames import (
    FrameError,
    read_frame,
    socket_buffers,
    write_frame,
)

log = logging.getLogger("edgekit.agent.serve")
WINDOW = 2048  # requests the live percentiles are taken over


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
            self.pool.put(ModelRunner(make(path)))
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
        log.info("serving %s %s", variant, sha256[:12])

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
        return out

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
        try:
            while True:
                try:
                    frame = read_frame(rfile, self.max_payload)
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
        return {"ok": True, "model": served.ref(), "ms": round(took / 1e6, 4)}, outputs


def _answer(conn: Any, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> bool:
    """Send one answer; return False when the client is gone."""
    try:
        write_frame(conn, header, arrays)
        return True
    except OSError:
        return False
