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

Live figures (:meth:`Server.snapshot`, what the agent publishes on its ``live`` topic, the shadow
comparison apart on ``shadow``): per served model,
requests, errors, service time p50/p90/p99 over the last :data:`WINDOW` requests (perf_counter_ns
from a request read to its answer ready, queueing for an interpreter included), queue depth and
connected clients, plus what was turned away (busy, malformed, oversized, timed out).

Limits: ``max_clients`` socket clients and, apart, ``http_max_clients`` HTTP connections (any local
user can reach the loopback; the socket is the agent's group's). When all places are taken, a new
client gets the place of the connection idle the longest (waiting for its next request, none in
flight, no byte of the next one in, and for :data:`EVICT_GRACE_S` at least when it had one: closed, counted
as ``evicted_idle`` and logged; one that had no request yet is answered ``busy`` first, as a client turned away
is), as nginx reuses idle keep-alive connections; only when none is idle is it turned away (``busy``). A frame that has started must be
complete within ``request_timeout_s`` (a client may stay idle between frames while places are free),
and a client that takes none of its answer for ``send_timeout_s`` is cut off: both kernel timeouts
on the connection (SO_RCVTIMEO, SO_SNDTIMEO), nothing added to a request that arrives in one piece
but one clock read (when its connection started waiting).

Shadow runs (:meth:`Server.set_shadow`) run in a child process at idle priority
(:mod:`device_agents.serving.shadow`). With ``http_port`` the same server also answers loopback
HTTP/JSON (:mod:`device_agents.serving.http`): same model, limits, errors and live figures.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import queue
import select
import socket
import socketserver
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from device_agents.errors import NO_ACTIVE_MODEL, AcceleratorBusy, DeviceError
from device_agents.inference import ModelRunner
from device_agents.serving.frames import (
    BUSY,
    MAGIC,
    MALFORMED,
    TIMED_OUT,
    FrameError,
    Receiver,
    busy_poll,
    describe,
    encode_head,
    peer,
    set_timeout,
    socket_address,
    socket_buffers,
    write_frame,
)
from device_agents.serving.shadow import Interpreters, Shadow
from device_agents.targets.edgetpu import EdgeTpu
from edgekit_protocol.labels import clip, printable

__all__ = ["Interpreters", "Place", "RequestError", "Server"]

log = logging.getLogger("edgekit.agent.serve")
WINDOW = 2048  # requests the live percentiles are taken over
WARMUP = 3  # inferences on zeros a new model runs before it is served
PAUSE_WAIT_S = 20.0  # a request waits this long at most for a paused model (the Client's default timeout is 30 s)
PAUSE_POLL_S = 0.25  # how often a waiting request looks whether a pause has kept it waiting that long
# a pause another process asks for (the socket's pause op: `edgekit-agent activate`) ends when its connection closes,
# or after this long at most (that process stopped, not killed: its smoke check's child is killed after 120 s)
PAUSE_HOLD_MAX_S = 300.0
# A connection that has had a request gives its place to a new client only once it has waited this long for its next
# one: a client sending requests back to back waits a fraction of a millisecond between its answer and its next
# request, and closing it then fails that request without an answer. One that never sent a byte gets no grace, or
# connecting again and again would lock every other client out.
EVICT_GRACE_S = 0.5


EVICTED_IDLE = "idle"  # Place.evicted: it had requests; closed without a word (its next request would read one)
EVICTED_NEW = "new"  # Place.evicted: it had none yet; answered as a client turned away (busy), then closed


class Place:
    """What :meth:`Server.admit` knows of a connection holding a place (the socket's :class:`_FrameTimer`,
    HTTP's request reader), set by :meth:`_take_place`: ``sock``; ``idle_since``, the monotonic time it
    began waiting for a request's first byte (0 while a request is under way, its first bytes in: never
    evicted then); ``served``, whether a request came on it (it then gets :data:`EVICT_GRACE_S` between
    requests); ``evicted``, False or why the server closed it for a new client (:data:`EVICTED_IDLE`,
    :data:`EVICTED_NEW`). No slots of its own: a subclass declares them (or has a ``__dict__``)."""

    __slots__ = ()

    def _take_place(self, sock: Any) -> None:
        """Set the record's fields for a new connection on ``sock``, waiting for its first request."""
        self.sock, self.idle_since, self.served, self.evicted = sock, time.monotonic(), False, False


class RequestError(DeviceError):
    """A request that could not be answered with outputs; ``kind`` says whose fault (``input``: it does not
    fit the model; ``no_model``: nothing is served; ``inference``: the interpreter failed)."""

    def __init__(self, message: str, kind: str, model: dict[str, Any] | None = None):
        super().__init__(message)
        self.kind, self.model = kind, model


@dataclass
class _Stats:
    requests: int = 0
    errors: int = 0
    latencies_ns: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    since: float = field(default_factory=time.time)


class _Served:
    """One model being served: its interpreters (one per worker) and its live figures."""

    def __init__(self, path: Path, sha256: str, variant: str | None, make: Any, workers: int):
        """Load ``workers`` interpreters of ``path`` and warm them.

        Raises:
            Exception: whatever the interpreter factory or the warm-up raises (the model is not served).
        """
        self.sha256, self.variant, self.path = sha256, variant, path
        self._make, self.workers = make, workers
        self.pool: queue.Queue[ModelRunner] = queue.Queue()
        for runner in self._load():
            self.pool.put(runner)
        probe = self.pool.queue[0]
        # one worker: a lock around its one interpreter (no queue hand-off on the request path)
        self.single: ModelRunner | None = probe if workers == 1 else None
        self._run_lock = threading.Lock()
        self.inputs = [p.record() for p in probe.inputs]
        self.outputs = [p.record() for p in probe.outputs]
        self.input_shapes = [(p.name, tuple(p.sample_shape)) for p in probe.inputs]
        self.output_shapes = [(p.name, tuple(p.sample_shape)) for p in probe.outputs]
        from device_agents.serving.http import (
            json_body_limit,  # (lazily: http imports this module)
        )

        self.json_body = json_body_limit(self.input_shapes)  # (an HTTP body's bytes, the inputs' numbers), at most
        self.stats = _Stats()
        self.waiting = 0
        self.lock = threading.Lock()  # the counters above, updated from every connection's thread
        self.broken: str | None = None  # why its interpreters did not load again after a pause (each request told)
        self.paused: tuple[float, str] | None = None  # while released(): since when (time.monotonic) and why
        self.pauser: int | None = None  # while released(): the thread that paused it (its nested pauses are its own)
        # cleared while released(): a waiting request takes no runner then (it would take the runner the pause waits
        # for as soon as a request in flight put it back, and with several senders the pause could wait minutes)
        self.resumed = threading.Event()
        self.resumed.set()
        self._head: tuple[Any, bytes, bytes] | None = None  # (outputs' description, encoded answer start)

    def _load(self) -> list[ModelRunner]:
        """Return :attr:`workers` runners of the model, each warmed up.

        Raises:
            Exception: whatever the interpreter factory or the warm-up raises.
        """
        runners = []
        for _ in range(self.workers):
            runner = ModelRunner(self._make(self.path))
            for _ in range(WARMUP):  # the first runs pack weights and fill caches: before any request, not during
                runner.invoke_raw([np.zeros(p.shape, p.dtype) for p in runner.inputs])
            runners.append(runner)
        return runners

    @contextlib.contextmanager
    def released(self, why: str = "its interpreters are loaded again") -> Iterator[None]:
        """Close this model's interpreters for the ``with`` block, and what they hold (an Edge TPU, which one process
        at a time can open), then load them again. Requests in flight finish first; new ones wait for the block's
        end, :data:`PAUSE_WAIT_S` at most (then each is answered in one line that serving is paused, and ``why``).
        When the model does not load again, each request is answered why (an inference error, :attr:`broken`) and it
        is logged once; the next pause (:meth:`Server.serve_model` of this model) tries again. Yields nothing; raises
        what the block raises."""
        with self._run_lock:  # one worker: its requests wait on this lock; several: on the pool, emptied here
            self.paused = (time.monotonic(), why)  # set and cleared holding the lock: one pause's at a time
            self.pauser = threading.get_ident()
            self.resumed.clear()
            for _ in range(self.workers):
                self.pool.get()
            self.single = _Unloaded("paused") if self.workers == 1 else None  # never run: the lock is held
            gc.collect()  # an interpreter in a reference cycle would keep its delegate, so the Edge TPU, open
            try:
                yield
            finally:
                try:
                    runners: list[Any] = self._load()
                    if self.broken is not None:
                        log.info("serving API: model %s loaded again", self.sha256[:12])
                    self.broken = None
                except Exception as exc:  # noqa: BLE001 - whatever the interpreter raises: said to each request
                    why = (f"model {self.sha256[:12]} could not be loaded again after a pause for a child process "
                           f"({' '.join(str(exc).split())[:300]}); the agent tries again every second, or restart it")
                    if self.broken is None:
                        log.error("serving API: %s", why)
                    self.broken = why
                    runners = [_Unloaded(why)] * self.workers
                if self.workers == 1:
                    self.single = runners[0]
                for runner in runners:
                    self.pool.put(runner)
                self.paused = self.pauser = None
                self.resumed.set()

    def count(self, took_ns: int | None) -> None:
        """Count one answered request (``took_ns`` its service time) or, with None, one error."""
        with self.lock:
            if took_ns is None:
                self.stats.errors += 1
            else:
                self.stats.requests += 1
                self.stats.latencies_ns.append(took_ns)

    def ref(self) -> dict[str, Any]:
        """Return ``{"sha256", "variant"}`` of this model."""
        return {"sha256": self.sha256, "variant": self.variant}

    def answer_head(self, outputs: dict[str, np.ndarray], ms: float) -> bytes:
        """Return the encoded start of a predict answer (``ok``, ``model``, ``ms``, ``tensors``), the
        JSON built once per model and output shapes, only ``ms`` formatted per request."""
        spec = [(k, v.dtype, v.shape) for k, v in outputs.items()]
        if self._head is None or self._head[0] != spec:
            head = encode_head({"ok": True, "model": self.ref(), "ms": 0.0, "tensors": describe(outputs)})
            pre, post = head[8:].split(b'"ms":0.0', 1)  # keys in order: ok, model, ms: strings before it are escaped
            self._head = (spec, pre + b'"ms":', post)
        _, pre, post = self._head
        body = pre + repr(ms).encode() + post
        return MAGIC + len(body).to_bytes(4, "little") + body

    def _take(self, take: Any) -> Any:
        """Return what ``take()`` returns once it is truthy (the lock acquired, a runner from the pool): it waits
        :data:`PAUSE_POLL_S` and returns False or raises ``queue.Empty`` meanwhile; it is not called while a pause
        holds (:attr:`resumed`). The request counts in :attr:`waiting` meanwhile.

        Raises:
            RequestError: a pause (:meth:`released`) kept it waiting :data:`PAUSE_WAIT_S` (``paused``).
        """
        arrived = time.monotonic()
        with self.lock:
            self.waiting += 1
        try:
            while True:
                if self.resumed.is_set() or self.resumed.wait(PAUSE_POLL_S):
                    with contextlib.suppress(queue.Empty):
                        got = take()
                        if got:
                            return got
                paused = self.paused
                if paused is not None and time.monotonic() - max(paused[0], arrived) >= PAUSE_WAIT_S:
                    raise RequestError(f"serving paused for {time.monotonic() - paused[0]:.0f} s: {paused[1]}; "
                                       "retry later (a bench pauses it for its length)", "paused", self.ref())
        finally:
            with self.lock:
                self.waiting -= 1

    def predict(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return the outputs for one sample (float32, by output name).

        Raises:
            ValueError: the inputs do not fit the model (named). RequestError: a pause kept it waiting too long
                (:meth:`_take`).
        """
        if self.single is not None:
            # free: taken at once (no clock, counter or event on the way); held by another request or a pause: in turn
            if not self._run_lock.acquire(blocking=False):
                self._take(lambda: self._run_lock.acquire(timeout=PAUSE_POLL_S))
            try:
                runner = self.single
                runner.invoke_raw(runner.sample_tensors(arrays))
                return runner.results()
            finally:
                self._run_lock.release()
        runner = self._take(lambda: self.pool.get(timeout=PAUSE_POLL_S))
        try:
            runner.invoke_raw(runner.sample_tensors(arrays))
            return runner.results()
        finally:
            self.pool.put(runner)


class _Unloaded:
    """Stands where a model's runner was when its interpreters could not be loaded again: each request that reaches
    it fails with ``why`` (RuntimeError), answered as an inference error."""

    def __init__(self, why: str):
        self.why = why

    def invoke_raw(self, *_: Any) -> None:
        """Raise RuntimeError(why): there is no interpreter to run."""
        raise RuntimeError(self.why)

    sample_tensors = invoke_raw


class Server:
    """The local inference API. ``start()``, ``serve_model(...)`` on every activation, ``close()``."""

    def __init__(self, path: Path, *, make_interpreter: Any, max_clients: int = 16,
                 max_payload: int = 64 * 1024 * 1024, workers: int = 1, http_port: int | None = None,
                 http_max_clients: int = 4, http_max_body: int = 4_000_000, request_timeout_s: float = 30.0,
                 http_header_timeout_s: float = 5.0, send_timeout_s: float = 30.0, busy_poll_us: int = 0):
        self.path = Path(path)
        self.make_interpreter = make_interpreter  # path -> allocated interpreter (the agent's runtime and target)
        self.max_clients = max_clients  # socket clients
        self.max_payload = max_payload
        self.http_max_clients = http_max_clients  # HTTP connections: places of their own
        self.http_max_body = http_max_body  # bytes of an HTTP request's JSON body
        self.request_timeout_s = request_timeout_s  # a started frame / an HTTP request's headers and body
        self.http_header_timeout_s = http_header_timeout_s  # an HTTP request's line and headers, from its first byte
        self.send_timeout_s = send_timeout_s  # a client that takes none of its answer for this long is cut off
        self.workers = workers
        # after an answer, the connection's thread waits this long on the CPU for the next request before
        # it sleeps (no wake-up to pay for a client that sends at once); only while one client is connected
        self.busy_poll_ns = busy_poll_us * 1000
        self.http_port = http_port  # None: no HTTP; 0: a free port (tests); bound to 127.0.0.1 only
        self.http_address: tuple[str, int] | None = None  # where HTTP listens once started
        self.current: _Served | None = None
        # what a request is answered while nothing is served: no model active, or (the agent says) the active
        # one still loading or not servable, so an application is not told to deploy a model that is there
        self.no_model = NO_ACTIVE_MODEL
        # busy: socket and HTTP clients turned away for want of a place (busy_http: the HTTP ones among
        # them); timed_out: cut off for a request or an answer not taken in time; evicted_idle: idle
        # connections (socket or HTTP) closed to give their place to a new client
        self.turned_away = {"busy": 0, "malformed": 0, "busy_http": 0, "timed_out": 0, "evicted_idle": 0}
        # the connections holding a place (socket: False, HTTP: True; their Place records): how many are
        # connected, and which is idle the longest
        self._open: dict[bool, set[Place]] = {False: set(), True: set()}
        self.swaps = 0
        self.shadow: Shadow | None = None
        self._lock = threading.Lock()
        self._server: socketserver.ThreadingUnixStreamServer | None = None
        self._http: Any = None

    # --- life cycle -------------------------------------------------------------------------------

    @property
    def clients(self) -> int:
        """Return how many socket clients hold a place."""
        return len(self._open[False])

    @property
    def http_clients(self) -> int:
        """Return how many HTTP connections hold a place."""
        return len(self._open[True])

    def start(self) -> Server:
        """Listen on the socket (a stale socket file is replaced), and on loopback HTTP when
        ``http_port`` is set, and serve in background threads; return self.

        Raises:
            DeviceError: the socket cannot be created (path too long, no permission, something else
                than a socket is at its path), or the HTTP port cannot be bound (taken).
        """
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def setup(self) -> None:
                """Ask for large socket buffers (an image-sized frame crosses in few copies), and set the
                kernel's receive and send timeouts (``request_timeout_s``, ``send_timeout_s``)."""
                socket_buffers(self.request)
                set_timeout(self.request, socket.SO_RCVTIMEO, outer.request_timeout_s)
                set_timeout(self.request, socket.SO_SNDTIMEO, outer.send_timeout_s)

            def handle(self) -> None:
                """Serve the connection (:meth:`Server._handle`; never raises)."""
                outer._handle(self.request)

        class Listener(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True
            request_queue_size = 64

        if self.path.is_symlink() or (self.path.exists() and not stat.S_ISSOCK(self.path.stat().st_mode)):
            raise DeviceError(f"serving API: {self.path} exists and is not a socket; not replaced (check serve.socket)")
        self.path.unlink(missing_ok=True)  # a stale socket of an earlier run
        try:
            with socket_address(self.path) as address:  # a deep root's path is longer than a socket's
                self._server = Listener(address, Handler)
            os.chmod(self.path, 0o660)
        except OSError as exc:
            raise DeviceError(f"serving API: cannot listen on {self.path}: {exc.strerror or exc}") from None
        if self.http_port is not None:
            from device_agents.serving.http import listen

            try:
                self._http = listen(self, self.http_port)
            except DeviceError:
                self._server.server_close()
                self._server = None
                self.path.unlink(missing_ok=True)
                raise
            self.http_address = self._http.server_address[:2]
            threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True,
                             name="serve-http").start()
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True,
                         name="serve").start()
        log.info("serving API on %s%s", self.path,  # where an application reaches it, HTTP's port included
                 f" and http://{self.http_address[0]}:{self.http_address[1]}" if self.http_address else "")
        return self

    def close(self) -> None:
        """Stop listening (socket and HTTP), remove the socket and end a shadow run (connections in
        progress end with their thread)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        self.path.unlink(missing_ok=True)
        shadow, self.shadow = self.shadow, None
        if shadow is not None:
            shadow.stop()

    def _make_for(self, variant: str | None) -> Any:
        """Return the interpreter factory for a model of ``variant`` (``Interpreters.for_variant``: the delegate that
        variant runs with), or the server's own factory when it has no such method."""
        for_variant = getattr(self.make_interpreter, "for_variant", None)
        return for_variant(variant) if for_variant is not None else self.make_interpreter

    def serve_model(self, path: Path, sha256: str, variant: str | None) -> None:
        """Load ``path`` into fresh interpreters, then serve it; requests in flight finish on the old one.

        The model served already: its interpreters loaded again when a pause left them unloaded
        (:attr:`_Served.broken`: an Edge TPU unplugged, then plugged back), else nothing.

        Raises:
            DeviceError: another model cannot be loaded (the old one keeps serving).
        """
        served = self.current
        if served is not None and served.sha256 == sha256:
            if served.broken is not None:
                with served.released():  # still not loading: still broken, said to each request, logged once
                    pass
            return
        try:
            new = _Served(path, sha256, variant, self._make_for(variant), self.workers)
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

    @contextlib.contextmanager
    def paused(self, why: str) -> Iterator[None]:
        """Close the served model's interpreters for the ``with`` block and load them again after it
        (:meth:`_Served.released`), so a child process can open what they hold (an Edge TPU); its requests wait
        meanwhile, :data:`PAUSE_WAIT_S` at most. Nothing served: just the block. Yields nothing; raises what the block
        raises."""
        served = self.current
        if served is None:
            yield
            return
        log.info("serving %s %s paused: %s", served.variant, served.sha256[:12], why)
        t0 = time.monotonic()
        try:
            with served.released(why):
                yield
        finally:
            log.info("serving %s %s resumed after %.1f s", served.variant, served.sha256[:12], time.monotonic() - t0)

    @contextlib.contextmanager
    def paused_for(self, delegate: str | None, options: dict[str, Any] | None, why: str, wait_s: float = 0.0,
                   cancel: threading.Event | None = None) -> Iterator[dict[str, Any] | None]:
        """Run the ``with`` block, where a child process opens a model with ``delegate`` and its ``options``, paused
        (:meth:`paused`) when the served model's interpreters hold that accelerator and it opens for one process at a
        time: an Edge TPU (:meth:`EdgeTpu.held`; a USB Coral would fail the child as busy). Yields the paused model
        (``{"sha256", "variant"}``) or None (nothing held: just the block); raises what the block raises.

        Paused already by this thread (the agent's bench, then its smoke check): just the block. Paused by another
        thread: waits ``wait_s`` at most for that pause to end, less once ``cancel`` is set (the agent is stopping):
        another process's pause ends once serving has loaded its model again, seconds after that process's Edge TPU
        turn, which the agent's own bench or activation waited for.

        Raises:
            AcceleratorBusy: serving is paused already by another thread for another child (another process's pause,
                :meth:`_hold_pause`, until it has seen that process let go and loaded its model again), which holds the
                Edge TPU: this one would fail as busy; the block does not run.
        """
        deadline = time.monotonic() + wait_s
        while ((served := self.current) is not None and delegate == EdgeTpu.key and served.paused is not None
               and served.pauser != threading.get_ident() and time.monotonic() < deadline
               and not (cancel is not None and cancel.is_set())):
            served.resumed.wait(PAUSE_POLL_S)
        served = self.current
        held = served.paused if served is not None and delegate == EdgeTpu.key else None
        if held is not None and served.pauser != threading.get_ident():  # EdgeTpu.held() is False, the other holds it
            raise AcceleratorBusy(f"pause: serving is paused already ({held[1]}, for "
                                  f"{time.monotonic() - held[0]:.0f} s): retry once that ends")
        if served is None or delegate != EdgeTpu.key or not EdgeTpu.held(options):
            yield None
            return
        with self.paused(why):
            yield served.ref()

    def _hold_pause(self, conn: Any, header: dict[str, Any]) -> None:
        """Answer a ``pause`` request: another process (``edgekit-agent activate`` over SSH) is about to run a child on
        the accelerator of the request's ``delegate`` and ``options``. Serving is paused as for the agent's own children
        (:meth:`paused_for`, ``why`` the request's, with the asking pid), answered ``{"ok": true, "paused": the paused
        model or None}``, and stays so until the connection closes (that process ends it, exits or is killed: the
        kernel closes it), :data:`PAUSE_HOLD_MAX_S` at most. Only the agent's user, or root, may ask: the socket is its
        group's applications' too (answered why not); serving paused already is answered so, at once (pauses do not
        nest: the other child holds the Edge TPU). Returns when the pause is over; never raises."""
        asker = peer(conn)
        if asker is None or asker[1] not in (0, os.geteuid()):
            self._answer(conn, {"ok": False, "error": f"pause: only the agent's user (uid {os.geteuid()}) or root may "
                                                      "pause serving (this connection's uid: "
                                                      f"{asker[1] if asker else 'unknown'})"})
            return
        options = header.get("options")
        why = f"{clip(printable(header.get('why') or 'another process asked'), 200)} (pid {asker[0]})"
        try:
            with self.paused_for(str(header.get("delegate")), options if isinstance(options, dict) else None,
                                 why) as paused:
                if not self._answer(conn, {"ok": True, "paused": paused}) or paused is None:
                    return
                poller = select.poll()
                poller.register(conn, select.POLLIN)  # closed (or a byte sent: never asked for): the pause ends
                if not poller.poll(PAUSE_HOLD_MAX_S * 1000):
                    log.warning("serving API: the pause pid %s asked for ended after %.0f s, its connection still open",
                                asker[0], PAUSE_HOLD_MAX_S)
        except DeviceError as exc:  # paused already: the other child holds the Edge TPU
            self._answer(conn, {"ok": False, "error": str(exc)})

    def set_shadow(self, path: Path | None, sha256: str = "", variant: str | None = None, *, share: float = 0.1,
                   max_per_s: float = 5.0, max_load: float | None = None) -> None:
        """Run ``path`` as the shadow model, in a child process at idle CPU priority, on ``share`` of
        the live requests (at most ``max_per_s`` a second, only while the 1-minute load average is
        below ``max_load``, default 0.8 per core, and while the child keeps up), or none with ``path``
        None. Ends with the next swap.

        Raises:
            DeviceError: nothing is served, the shadow is the served model, or it cannot be loaded
                (the child's reason).
        """
        old, self.shadow = self.shadow, None
        if old is not None:
            old.stop()
        if path is None:
            return
        served = self.current
        if served is None or served.sha256 == sha256:
            raise DeviceError("shadow: " + ("nothing is served" if served is None else "that is the served model"))
        self.shadow = Shadow(Path(path), sha256, variant, serving=served, make=self._make_for(variant),
                             input_shapes=served.input_shapes, output_shapes=served.output_shapes, share=share, max_per_s=max_per_s,
                             max_load=max_load)

    # --- figures ----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Return the live figures of the served model (``source: live``), or ``{"model": None}``."""
        served = self.current
        out: dict[str, Any] = {"source": "live", "clients": self.clients + self.http_clients,
                               "http_clients": self.http_clients, "turned_away": dict(self.turned_away),
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

    def figures(self) -> dict[str, Any]:
        """Return :meth:`snapshot` as the socket's ``live`` op answers it to ``edgekit-agent state`` on the device (no
        broker needed): with ``as_of`` (the wall-clock time it was read, ``time.time()``), ``window_max``
        (:data:`WINDOW`, the most requests the percentiles are taken over) and ``measured_in`` (this process's pid).
        Read from the counters the request path keeps anyway: nothing is added per request."""
        return {**self.snapshot(), "as_of": round(time.time(), 3), "window_max": WINDOW, "measured_in": os.getpid()}

    def live_answer(self, http: bool = False) -> dict[str, Any]:
        """Return the answer to a ``live`` question (the socket's ``live`` op, ``GET /v1/live``: ``http``):
        ``{"ok": true}`` and :meth:`figures`, the connection asking not counted in ``clients`` (nor, over HTTP, in
        ``http_clients``): it is not one of the clients it asks about."""
        answer = {"ok": True, **self.figures()}
        answer["clients"] -= 1
        if http:
            answer["http_clients"] -= 1
        return answer

    def samples(self, n: int) -> list[float]:
        """Return the served model's last ``n`` service times in ms, oldest first (what a rollout gate tests)."""
        served = self.current
        if served is None or n <= 0:
            return []
        with served.lock:
            tail = list(served.stats.latencies_ns)[-n:]
        return [round(t / 1e6, 4) for t in tail]

    # --- the request path, shared by the socket and HTTP ------------------------------------------

    def admit(self, conn: Place, http: bool = False) -> bool:
        """Take a place for ``conn`` (a socket client's, an HTTP connection's with ``http``); return
        False, counted as ``busy`` (and ``busy_http``), when ``max_clients`` (``http_max_clients``) are
        connected and none of them is idle.

        When all places are taken, the connection idle the longest gives its place (one that had a
        request only once it has waited :data:`EVICT_GRACE_S`, none with a request's bytes in, read or
        not): marked ``evicted`` (:data:`EVICTED_NEW` when it had no request yet: its thread answers it
        as a client turned away), its reading side shut (its thread wakes and closes it), counted as
        ``evicted_idle`` and logged.
        """
        now = time.monotonic()
        places = self._open[http]
        with self._lock:
            if len(places) < (self.http_max_clients if http else self.max_clients):
                places.add(conn)
                return True
            idle = sorted((c for c in places if c.idle_since
                           and not (c.served and now - c.idle_since < EVICT_GRACE_S)), key=lambda c: c.idle_since)
            victim = next((c for c in idle if not _readable(c.sock)), None)  # readable: a request came, unread yet
            if victim is None:
                if http:
                    self.turned_away["busy_http"] += 1
                self.turned_away["busy"] += 1
                return False
            victim.evicted = EVICTED_IDLE if victim.served else EVICTED_NEW  # its place is conn's now
            places.discard(victim)
            places.add(conn)
            self.turned_away["evicted_idle"] += 1
        idle_s = time.monotonic() - victim.idle_since
        try:
            victim.sock.shutdown(socket.SHUT_RD)  # its wait for a request ends (end of stream): its thread closes it
        except OSError:
            pass  # already gone
        log.info("serving API: closed the %s connection idle for %.1f s to admit a new client (all %d of "
                 "serve.%s taken)", "HTTP" if http else "socket", idle_s,
                 self.http_max_clients if http else self.max_clients, "http_max_clients" if http else "max_clients")
        return True

    def leave(self, conn: Place, http: bool = False) -> None:
        """Give ``conn``'s place back (a socket client's, an HTTP connection's with ``http``); none when
        it was evicted (its place was given to a new client then)."""
        with self._lock:
            self._open[http].discard(conn)

    def timed_out(self) -> None:
        """Count one client cut off for a request or an answer not taken within its time limit."""
        with self._lock:
            self.turned_away["timed_out"] += 1

    def malformed(self) -> None:
        """Count one request turned away as malformed (bad frame, bad JSON, over the payload limit)."""
        with self._lock:
            self.turned_away["malformed"] += 1

    def busy_message(self, http: bool = False) -> str:
        """Return the answer a client turned away for ``max_clients`` (``http_max_clients``) gets."""
        if http:
            return f"{BUSY}{self.http_max_clients} HTTP clients connected (serve.http_max_clients); retry later"
        return f"{BUSY}{self.max_clients} clients connected (serve.max_clients); retry later"

    def predict(self, arrays: dict[str, np.ndarray], started_ns: int | None = None,
                finite: bool = False) -> tuple[_Served, dict[str, np.ndarray], int]:
        """Run one request on the model served when it starts; return (that model, its outputs, the
        service time in ns since ``started_ns``, default now). Counted in the live figures: as an
        error when it raises.

        ``finite``: outputs holding NaN or infinity are an error (HTTP: JSON cannot carry them; the
        socket's frames carry them as they are).

        Raises:
            RequestError: nothing is served (``no_model``), the inputs do not fit (``input``), a pause kept it
                waiting :data:`PAUSE_WAIT_S` (``paused``), or the
                interpreter failed or (with ``finite``) its outputs hold NaN or infinity (``inference``).
        """
        started = time.perf_counter_ns() if started_ns is None else started_ns
        served = self.current  # this request's model, whatever is activated meanwhile
        if served is None:
            raise RequestError(self.no_model, "no_model")
        try:
            outputs = served.predict(arrays)
        except ValueError as exc:
            served.count(None)
            raise RequestError(str(exc), "input", served.ref()) from None
        except RequestError:  # kept waiting by a pause
            served.count(None)
            raise
        except Exception as exc:  # noqa: BLE001 - the interpreter's failure is this request's error, not the server's end
            served.count(None)
            log.exception("inference failed")
            raise RequestError(f"inference failed: {type(exc).__name__}: {exc}", "inference", served.ref()) from None
        if finite and not all(np.isfinite(v).all() for v in outputs.values()):
            served.count(None)
            raise RequestError("inference failed: the outputs hold NaN or infinity (JSON cannot carry them; "
                               "the socket API can)", "inference", served.ref())
        took = time.perf_counter_ns() - started
        served.count(took)
        return served, outputs, took

    def offer_shadow(self, served: _Served, arrays: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Offer an answered request to the shadow run, if one runs beside ``served`` (never blocks)."""
        shadow = self.shadow
        if shadow is not None:
            shadow.offer(served, arrays, outputs)

    def take_shadow(self, served: _Served, arrays: dict[str, np.ndarray],
                    outputs: dict[str, np.ndarray]) -> tuple[Shadow, tuple] | None:
        """Copy a request's inputs for the shadow run, if one runs beside ``served`` and takes them (never blocks);
        return the run and what its :meth:`Shadow.send` hands the child once the request is answered, or None."""
        shadow = self.shadow
        taken = shadow.take(served, arrays, outputs) if shadow is not None else None
        return (shadow, taken) if taken is not None else None

    # --- one socket connection --------------------------------------------------------------------

    def _handle(self, conn: Any) -> None:
        """Serve one connection until the client closes it, sends a malformed frame, takes longer than
        ``request_timeout_s`` over one or ``send_timeout_s`` to take an answer, or goes away."""
        _answer = self._answer
        timed = _FrameTimer(conn, self.request_timeout_s)
        if not self.admit(timed):
            _answer(conn, {"ok": False, "error": self.busy_message()})
            return
        # arrays stay valid until the next read: answered (and offered) by then; memory files passed are taken
        receiver = Receiver(timed, reuse=True, shared=True)
        open_ = self._open
        took = False  # a request was read whole (and answered): an eviction's busy frame would follow its answer
        try:
            while True:
                # the next bytes start a frame (waiting for them may last), unless some are in already; either way
                # its clock is its own (a pipelined frame's starts at its next receive, not the last frame's)
                timed.started, timed.deadline = receiver.pending > 0, 0.0
                if self.busy_poll_ns and len(open_[False]) == 1 and not open_[True] and not receiver.pending:
                    busy_poll(conn, self.busy_poll_ns)
                try:
                    frame = receiver.read(self.max_payload)
                except FrameError as exc:  # the stream is out of step: answer, then hang up
                    if timed.evicted:
                        return  # closed for a new client as its first bytes came: counted as evicted_idle (below)
                    self.malformed()
                    _answer(conn, {"ok": False, "error": f"{MALFORMED}{exc}"})
                    return
                except OSError as exc:
                    if not isinstance(exc, (BlockingIOError, TimeoutError)):
                        return  # the client went away
                    if not timed.started and not receiver.pending:
                        continue  # idle between frames: the receive timeout only woke the wait
                    self.timed_out()
                    _answer(conn, {"ok": False, "error": f"{TIMED_OUT}a request must arrive within "
                                                         f"{self.request_timeout_s:g} s of its first byte "
                                                         "(serve.request_timeout_s)"})
                    return
                if frame is None:
                    return
                header, arrays = frame
                took = True
                started = time.perf_counter_ns()
                op = header.get("op")
                if op == "predict":
                    try:
                        served, outputs, took = self.predict(arrays, started)
                    except RequestError as exc:
                        answer = {"ok": False, "error": str(exc), **({"model": exc.model} if exc.model else {})}
                        if not _answer(conn, answer):
                            return
                        continue
                    # the client may write its memory file again once answered: its inputs are copied first, and the
                    # child is woken after the answer (its wake-up took as long as the copy, on the request's time)
                    taken = self.take_shadow(served, arrays, outputs) if "shm" in header else None
                    try:
                        answered = _answer(conn, served.answer_head(outputs, round(took / 1e6, 4)), outputs)
                    finally:  # whatever the answer met: a slot taken and never sent would be held for good
                        if taken is not None:
                            taken[0].send(taken[1])
                    if not answered:
                        return
                    if "shm" not in header:  # after the answer: the shadow never delays a request
                        self.offer_shadow(served, arrays, outputs)
                    continue
                if op == "pause":  # another process's child opens the Edge TPU served from: paused while it lasts
                    self._hold_pause(conn, header)
                    return
                served = self.current
                if op == "live":  # the figures as they stand, for `edgekit-agent state`: counters read, none kept
                    answer = self.live_answer()
                elif served is None:
                    answer = {"ok": False, "error": self.no_model}
                elif op == "info":
                    answer = {"ok": True, "model": served.ref(), "inputs": served.inputs, "outputs": served.outputs}
                else:
                    answer = {"ok": False, "error": f"unknown op {str(op)[:20]!r} (predict, info, live, pause)"}
                if not _answer(conn, answer):
                    return
        finally:
            # closed for a new client before any request: told why, as if turned away (unless its first request
            # came in the moment it was chosen, and was answered: the client reads no answer it did not ask for)
            if timed.evicted == EVICTED_NEW and not took:
                _answer(conn, {"ok": False, "error": self.busy_message()})
            receiver.close()
            self.leave(timed)

    def _answer(self, conn: Any, header: dict[str, Any] | bytes, arrays: dict[str, np.ndarray] | None = None) -> bool:
        """Send one answer (a header, or its encoded start for ``arrays``); return False when the client
        is gone, or took none of it for ``send_timeout_s`` (counted as ``timed_out``)."""
        try:
            if isinstance(header, bytes):
                write_frame(conn, {}, arrays, head=header)
            else:
                write_frame(conn, header, arrays)
            return True
        except (BlockingIOError, TimeoutError):  # SO_SNDTIMEO: the client does not read its answers
            self.timed_out()
            return False
        except (OSError, ValueError):
            return False


def _readable(sock: Any) -> bool:
    """Return whether ``sock`` has bytes (or its end) to read now, without reading (never raises)."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):  # closed meanwhile
        return False


class _FrameTimer(Place):
    """A socket connection as :class:`Receiver` reads it (``recv_into``, ``recvmsg_into``): once a
    frame's first bytes are in, the rest must come within ``limit_s``; waiting for a frame's first
    bytes may last.

    The socket's receive timeout (SO_RCVTIMEO, ``limit_s``) wakes a wait for a new frame now and then
    (the server waits again) and bounds each wait inside a frame, shortened to what is left of the
    frame's time. A frame received in one piece costs one clock read (``idle_since``: when the wait
    for its first byte began, what the server evicts the longest idle connection by) and a few
    attribute reads and sets here: no system call.
    """

    __slots__ = ("sock", "idle_since", "served", "evicted", "limit_s", "started", "deadline", "short")

    def __init__(self, sock: Any, limit_s: float):
        self._take_place(sock)  # sock, idle_since, served, evicted: what Server.admit reads (Place)
        self.limit_s = limit_s
        self.started = False  # a frame's first bytes are in (the server sets it between frames)
        self.deadline = 0.0  # monotonic time the started frame must be complete by (set on its second receive)
        self.short = False  # SO_RCVTIMEO is shorter than limit_s (what was left of a frame's time)

    def _arm(self) -> None:
        """Before a receive: between frames, give the socket back its full receive timeout; inside a
        frame, start its clock (at its second receive, which follows the first at once) and shorten
        the receive timeout to what is left of it.

        Raises:
            TimeoutError: the frame under way is not complete ``limit_s`` after its first bytes.
        """
        if not self.started:
            set_timeout(self.sock, socket.SO_RCVTIMEO, self.limit_s)
            self.short = False
            return
        now = time.monotonic()
        if not self.deadline:
            self.deadline = now + self.limit_s
        left = self.deadline - now
        if left <= 0:
            raise TimeoutError(f"the frame was not complete within {self.limit_s:g} s")
        if left < self.limit_s - 0.001:
            set_timeout(self.sock, socket.SO_RCVTIMEO, left)
            self.short = True

    def _receive(self, receive: Any, *args: Any) -> Any:
        """Return ``receive(*args)`` with the frame's clock armed first (see :meth:`_arm`).

        Raises:
            TimeoutError: the frame under way is not complete ``limit_s`` after its first bytes.
            BlockingIOError: no byte came within the socket's receive timeout.
            OSError: the socket failed.
        """
        if self.started or self.short:
            self._arm()
        if not self.started and not self.idle_since:
            self.idle_since = time.monotonic()
        got = receive(*args)
        if not self.started:
            self.started, self.deadline, self.idle_since, self.served = True, 0.0, 0.0, True
        return got

    def recv_into(self, view: Any) -> int:
        """Receive into ``view``; return the byte count (0: the peer closed). Raises as :meth:`_receive`."""
        return self._receive(self.sock.recv_into, view)

    def recvmsg_into(self, buffers: Any, ancbufsize: int = 0, flags: int = 0) -> tuple[int, list, int, Any]:
        """Receive into ``buffers`` with ancillary data (passed descriptors); return what
        ``socket.recvmsg_into`` returns. Raises as :meth:`_receive`."""
        return self._receive(self.sock.recvmsg_into, buffers, ancbufsize, flags)
