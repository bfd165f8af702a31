"""The serving API over loopback HTTP/JSON, for applications in languages without the binary framing.

Off by default; ``serve.http_port`` in ``agent.yaml`` turns it on, bound to ``127.0.0.1`` only (never
another interface: the API has no authentication beyond being local). Standard library only
(:class:`http.server.ThreadingHTTPServer`), and every request goes through the same
:class:`~device_agents.serving.server.Server` as the Unix socket: the same served model (hot swaps
included), the same error texts, counted in the same live figures and offered to the same shadow run.

Limits of its own, since any local user can reach the loopback and JSON costs several times its
size in memory while it is parsed: ``http_max_clients`` connections (4; apart from the socket's
``max_clients``; when all are taken, the keep-alive connection idle the longest is closed for a new
one, after ``EVICT_GRACE_S`` once it had a request, answered 503 busy if it had none; never one whose next
request's first bytes are in, read into its buffer or not), a body of at most what the served model's inputs can take as JSON (:func:`json_body_limit`)
and ``http_max_body_mb`` (4, which a 224x224x3 float input needs: JSON costs 4-34 times its size to parse; on a
device short of memory lower it and send large inputs as the socket's binary frames), one body parsed at a time (a
parse's peak once, not once per client), a request's line and headers within
``http_header_timeout_s`` of its first byte (5), its body at :data:`BODY_MIN_RATE` or faster after
as long again, and the whole request within ``request_timeout_s`` (30; an idle keep-alive
connection is closed after as long). A request cut off is answered 408 and counted as
``timed_out``. Answers are sent within ``send_timeout_s``.

- ``POST /v1/predict`` with ``{"inputs": {name: nested lists of numbers}}`` answers
  ``{"ok": true, "outputs": {name: nested lists}, "model": {"sha256", "variant"}, "ms": ...}``.
- ``GET /v1/model`` answers ``{"ok": true, "model": ..., "inputs": [...], "outputs": [...]}``.
- ``GET /v1/live`` answers the live figures as the socket's ``live`` op does (``{"ok": true, "source": "live", ...}``,
  :meth:`~device_agents.serving.server.Server.live_answer`), ``model`` null while nothing is served.

Errors answer ``{"ok": false, "error": "..."}`` with 400 (malformed JSON, NaN or infinity, not a
rectangular array of numbers, inputs that do not fit the model, a request line or headers that are
not HTTP), 403 (a ``Host`` or ``Origin`` that
is not the loopback: a web page in a browser on the device, see below), 404, 405 (the wrong method,
any but GET and POST included), 411 (no
Content-Length), 408 (the request came too slowly), 413 (body over ``http_max_body_mb``,
``max_payload_mb`` or what the served model's inputs can take as JSON, refused before it is read), 500 (the interpreter failed, or its outputs hold NaN or infinity) or 503 (no model active; busy).

A browser on the device can reach 127.0.0.1 too: any web page it shows may post to this endpoint
(a "simple" cross-origin POST needs no preflight), and one whose name it re-resolves to 127.0.0.1
(DNS rebinding) may read the answers. Such requests carry the page's name in ``Host`` or its origin
in ``Origin``: only ``127.0.0.1``, ``localhost`` and ``[::1]`` (any port) are answered.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from device_agents.content_length import byte_count
from device_agents.errors import DeviceError
from device_agents.serving.server import EVICTED_NEW, Place, RequestError
from edgekit_protocol.messages import refuse_constant

log = logging.getLogger("edgekit.agent.serve")
HOST = "127.0.0.1"
# a body must keep coming at this rate (bytes/s) once its first http_header_timeout_s are over: any
# client on the loopback sends far faster; one sending a byte now and then holds a place no longer
BODY_MIN_RATE = 65_536
# a JSON number the served model's input can need, with its separator and any indentation: the
# longest float64 a JSON encoder writes is 24 characters (-2.2250738585072014e-308)
JSON_NUMBER_BYTES = 96
JSON_SPARE_BYTES = 16_384  # {"inputs": ...}, the inputs' names, brackets and whitespace beyond the numbers'
_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_refuse_body_constant = functools.partial(refuse_constant, what="the body")  # NaN, Infinity: the protocol's refusal


class _BadRequest(ValueError):
    """A request this endpoint refuses; ``status`` is the HTTP status it is answered with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def _loopback_host(value: str) -> bool:
    """Return whether a ``Host`` value (``name`` or ``name:port``) names the loopback."""
    host = value.strip().lower()
    name, sep, port = host.rpartition(":")
    if sep and not host.endswith("]") and port.isascii() and (port.isdigit() or not port):
        host = name
    return host in LOOPBACK_NAMES


def _loopback_origin(value: str) -> bool:
    """Return whether an ``Origin`` value is a page served from the loopback (``http://127.0.0.1:8080``)."""
    scheme, sep, rest = value.strip().partition("://")
    return bool(sep) and scheme.lower() in ("http", "https") and "/" not in rest and _loopback_host(rest)


_FOUND = {"U": "text", "S": "text", "b": "true or false"}  # what a JSON array that is not numbers holds, by dtype kind


def parse_inputs(body: bytes, max_payload: int) -> dict[str, np.ndarray]:
    """Return the float arrays by input name of a ``/v1/predict`` body.

    Raises:
        _BadRequest: (400) the body is not JSON, holds NaN or infinity (also as a number too large
            for a float), is not ``{"inputs": {name: nested lists}}``, an input is not a
            rectangular array of numbers (text such as ``"1.5"``, ``true``, ``null`` are not numbers, also
            among numbers; integers of any size are), or the arrays are over ``max_payload`` bytes as float32.
    """
    try:
        # not strict_loads: its check of every float made a body of 150,000 numbers parse 1.5 times as long, and
        # the arrays' own check below finds a number too large for a float (infinity) at numpy's speed
        doc = json.loads(body, parse_constant=_refuse_body_constant)
    except RecursionError:
        raise _BadRequest(400, "malformed request: the JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _BadRequest(400, f"malformed request: the body is not JSON ({str(exc)[:120]})") from None
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    if not isinstance(inputs, dict) or not inputs or not all(isinstance(k, str) for k in inputs):
        raise _BadRequest(400, 'malformed request: the body must be {"inputs": {name: nested lists of numbers}}')
    arrays, total = {}, 0
    may_hold_bools = b"true" in body or b"false" in body  # once: per input, a body of many keys took minutes
    for name, value in inputs.items():
        try:
            a = np.asarray(value)  # typed by what the JSON holds: a float64 one would turn "1.5" and true into numbers
        except (ValueError, TypeError, OverflowError, RecursionError):
            raise _BadRequest(400, f"input {name!r}: not a rectangular array of numbers") from None
        kind = a.dtype.kind
        if kind == "O" and all(type(x) in (int, float) for x in a.flat):  # integers past 64 bits (JavaScript: 1e20)
            try:
                a, kind = np.asarray(value, dtype=np.float64), "f"
            except OverflowError:
                raise _BadRequest(400, f"input {name!r} holds a number too large for a float") from None
        elif kind in "iuf" and may_hold_bools and any(
                type(x) is bool for x in np.asarray(value, dtype=object).flat):  # numpy reads [1, true] as [1, 1]
            kind = "b"
        if kind not in "iuf":
            found = _FOUND.get(kind, "null or objects")
            raise _BadRequest(400, f"input {name!r}: not a rectangular array of numbers (it holds {found})")
        a = a.astype(np.float64, copy=False)
        if a.ndim > 8:
            raise _BadRequest(400, f"input {name!r}: {a.ndim} dimensions, at most 8")
        if a.size and not np.isfinite(a).all():
            i = int(np.flatnonzero(~np.isfinite(a.ravel()))[0])
            raise _BadRequest(400, f"input {name!r} holds NaN or infinity (first at flat index {i})")
        total += a.size * 4
        if total > max_payload:
            raise _BadRequest(413, f"inputs of {total} bytes or more are over the {max_payload}-byte limit "
                                   "(serve.max_payload_mb)")
        arrays[name] = a.astype(np.float32)
    return arrays


def json_body_limit(input_shapes: list[tuple[str, tuple[int, ...]]]) -> tuple[int, int]:
    """Return (the largest ``/v1/predict`` body the model with these inputs can need, its number of
    elements): :data:`JSON_NUMBER_BYTES` per element plus :data:`JSON_SPARE_BYTES`. A larger body
    cannot fit the model whatever it holds, and parsing it could cost tens of times its size."""
    elements = sum(math.prod(shape) for _, shape in input_shapes)
    return elements * JSON_NUMBER_BYTES + JSON_SPARE_BYTES, elements


class _RequestReader(io.RawIOBase, Place):
    """An HTTP connection's incoming bytes, with deadlines counted from a request's first byte: its
    line and headers within ``header_s``, the whole request within ``limit_s``, and, once
    :meth:`body` is called, its body at :data:`BODY_MIN_RATE` or faster after a grace of ``header_s``
    (each byte received moves the deadline on by ``1 / BODY_MIN_RATE`` s). Waiting for a request's
    first byte (an idle keep-alive connection) lasts ``limit_s``. Answers are sent with ``send_s`` as
    the socket's timeout.

    It is the connection's :class:`~device_agents.serving.server.Place` (``sock``, ``idle_since``, ``served``,
    ``evicted``): what :meth:`Server.admit` reads to close the idle connection with the oldest ``idle_since``
    for a new client."""

    def __init__(self, sock: Any, limit_s: float, header_s: float, send_s: float, on_timeout: Any):
        super().__init__()
        self._take_place(sock)
        self.limit_s, self.header_s, self.send_s = limit_s, header_s, send_s
        self.on_timeout = on_timeout
        self.deadline: float | None = None  # None: waiting for a request's first byte
        self.end = 0.0  # the whole request's deadline (first byte + limit_s)
        self.rate = 0  # bytes/s the body must keep up once body() is called (0: reading the headers)
        self.cut = ""  # why the request under way was cut off (answered 408), "" while it was not

    def readable(self) -> bool:
        """Return True."""
        return True

    def next_request(self) -> None:
        """Wait for a new request: its deadlines start with its first byte."""
        self.deadline, self.rate = None, 0

    def begin(self) -> None:
        """A request's first bytes are in (received now, or with the request before it): start its
        deadlines; the connection is not idle until the next :meth:`next_request`."""
        self.idle_since, self.served = 0.0, True
        self.end = time.monotonic() + self.limit_s
        self.deadline = min(self.end, self.end - self.limit_s + self.header_s)

    def body(self) -> None:
        """Start the body's clock: it must keep coming at :data:`BODY_MIN_RATE` after ``header_s``."""
        self.deadline, self.rate = min(self.end, time.monotonic() + self.header_s), BODY_MIN_RATE

    def _why(self) -> str:
        """Return the one-line reason the request under way was cut off, naming the setting."""
        if self.deadline is not None and self.deadline >= self.end:
            return f"timed out: a request must arrive within {self.limit_s:g} s of its first byte (serve.request_timeout_s)"
        if self.rate:
            return (f"timed out: the body came slower than {self.rate} bytes/s after its first "
                    f"{self.header_s:g} s (serve.http_header_timeout_s); send it at once")
        return (f"timed out: a request's line and headers must arrive within {self.header_s:g} s of its first "
                "byte (serve.http_header_timeout_s)")

    def readinto(self, b: Any) -> int:
        """Receive into ``b``; return the byte count (0: the client closed).

        Raises:
            TimeoutError: the request under way missed a deadline (counted by ``on_timeout``, its
                reason in ``cut``), or an idle connection sent nothing for ``limit_s``.
            OSError: the client is gone.
        """
        started = self.deadline is not None
        if started:
            left = self.deadline - time.monotonic()
        else:
            left = self.limit_s
            if not self.idle_since:
                self.idle_since = time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError("the request did not arrive in time")
            self.sock.settimeout(left)
            got = self.sock.recv_into(b)
        except TimeoutError:
            if started:
                self.cut = self._why()
                self.on_timeout()
            raise
        finally:
            self.sock.settimeout(self.send_s)
        if not started:
            self.begin()
        elif self.rate:
            self.deadline = min(self.end, self.deadline + got / self.rate)
        return got


def listen(server: Any, port: int) -> ThreadingHTTPServer:
    """Return an HTTP server on ``127.0.0.1:port`` (0: a free port) answering for ``server``; the
    caller runs its ``serve_forever``.

    Raises:
        DeviceError: the port cannot be bound (taken, or below 1024 without the right).
    """
    # the settings' bound on a JSON body, its key and what to do instead: JSON costs 4-34 times its size to parse
    settings_limit = (*min((server.http_max_body, "serve.http_max_body_mb"), (server.max_payload, "serve.max_payload_mb")),
                      "send large inputs over the Unix socket (binary frames: device_agents.serving.Client)")
    parse_lock = threading.Lock()  # one JSON body parsed at a time: its peak (several times the body) once, not per client

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: one connection, many requests
        disable_nagle_algorithm = True  # headers and body are two writes: never wait for the client's delayed ACK
        server_version = "edgekit-serve"
        timeout = server.send_timeout_s  # answers; reading a request has its own deadline (_RequestReader)

        def setup(self) -> None:
            """Set up the connection, reading through a :class:`_RequestReader` (the request's deadline)
            and answering with ``send_timeout_s`` as the socket's timeout."""
            super().setup()
            self.rfile.close()  # the standard one, unused: the socket itself stays open
            self._reader = _RequestReader(self.connection, server.request_timeout_s, server.http_header_timeout_s,
                                          server.send_timeout_s, server.timed_out)
            self.rfile = io.BufferedReader(self._reader, 65536)
            self._answered = False  # a response went out on it (send_response): no 503 may follow it unasked

        def send_response(self, code: int, message: str | None = None) -> None:
            """Start a response (the standard library's), noting that this connection has had one."""
            self._answered = True
            super().send_response(code, message)

        def handle(self) -> None:
            """Serve one connection (its keep-alive requests) in an HTTP client place (the idle one's with
            them all taken); answer 503 without one, 408 to a request cut off for coming too slowly."""
            if not server.admit(self._reader, http=True):  # places of its own: the socket's are for the agent's group
                self._raw_refusal(503, server.busy_message(http=True))
                return
            try:
                super().handle()  # the standard library ends the connection on a TimeoutError
            except OSError:  # the client went away or was too slow
                pass
            finally:
                server.leave(self._reader, http=True)
            if self._reader.cut:
                self._raw_refusal(408, self._reader.cut)
            elif self._reader.evicted == EVICTED_NEW and not self._answered:  # closed for a new client before any
                self._raw_refusal(503, server.busy_message(http=True))  # request: told why (none answered since)

        def handle_one_request(self) -> None:
            """Serve one request: its deadlines start with its first byte (one that has not come
            within ``request_timeout_s`` ends the connection, uncounted: an idle keep-alive).

            Raises:
                OSError: the client is gone (ends the connection).
            """
            reader = self._reader
            reader.next_request()
            try:
                # the wait for its first bytes, unless they came with the request before (pipelined, in
                # rfile's buffer): then its deadlines start now, and it is under way, never idle
                if self.rfile.peek(1) and reader.deadline is None:
                    reader.begin()
            except TimeoutError:  # idle for request_timeout_s: the connection ends, as the standard library's would
                self.close_connection = True
                return
            super().handle_one_request()

        def parse_request(self) -> bool:
            """Parse the request line and headers, then refuse (403) a ``Host`` or an ``Origin`` that is
            not the loopback: a web page in a browser on the device (cross-site, or DNS rebinding)."""
            if not super().parse_request():
                return False
            host, origin = self.headers.get("Host"), self.headers.get("Origin")
            bad = (("Host", host) if host is not None and not _loopback_host(host)
                   else ("Origin", origin) if origin is not None and not _loopback_origin(origin) else None)
            if bad is None:
                return True
            server.malformed()
            try:
                self._error(403, f"refused: {bad[0]} {bad[1][:60]!r} is not the loopback (127.0.0.1, localhost): "
                                 "a web page cannot use this API", close=True)
            except OSError:
                pass
            return False

        def _raw_refusal(self, status: int, message: str) -> None:
            """Answer ``status`` and close, before the request is read (never raises)."""
            body = _ENCODE({"ok": False, "error": message}).encode()
            reason = self.responses.get(status, ("",))[0]
            try:
                self.wfile.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            except OSError:
                pass

        def _send(self, status: int, doc: dict[str, Any], close: bool = False,
                  headers: dict[str, str] | None = None) -> None:
            """Answer ``doc`` as JSON (500 when it holds NaN or infinity), with ``headers`` besides its own;
            ``close`` ends the connection after.

            Raises:
                OSError: the client is gone, or did not take the answer within ``send_timeout_s``
                    (TimeoutError, counted as ``timed_out``); either ends the connection.
            """
            try:
                body = _ENCODE(doc).encode()
            except ValueError:  # NaN or infinity in the outputs: JSON cannot carry them
                status, body = 500, _ENCODE({"ok": False, "error": "inference failed: the outputs hold NaN or "
                                                                   "infinity (JSON cannot carry them)"}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            try:
                self.end_headers()
                self.wfile.write(body)
            except TimeoutError:  # the client did not take its answer within send_timeout_s
                server.timed_out()
                raise

        def _error(self, status: int, message: str, model: dict[str, Any] | None = None, close: bool = False) -> None:
            """Answer ``{"ok": false, "error": message}`` (and the model that refused it) with ``status``.

            Raises:
                OSError: the client is gone.
            """
            self._send(status, {"ok": False, "error": message, **({"model": model} if model else {})}, close)

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """Answer the standard library's own refusals as every other error, one JSON line, and close:
            a method other than GET and POST is 405 naming the two endpoints (not 501 and an HTML page),
            a request line or headers that are not HTTP (400, 414, 431, 505) are ``malformed`` and counted.

            Raises:
                OSError: the client is gone.
            """
            if self.request_version == "HTTP/0.9":  # a line too short to be HTTP: answered as HTTP/1.1 all the same
                self.request_version = self.protocol_version
            if code == 501:  # a method no do_ handles (PUT, DELETE, HEAD, OPTIONS...)
                self._send(405, {"ok": False, "error": f"method {str(self.command)[:20]!r} is not allowed: "
                                                       "use GET /v1/model or POST /v1/predict"},
                           close=True, headers={"Allow": "GET, POST"})
                return
            server.malformed()
            reason = message or self.responses.get(code, ("not an HTTP request",))[0]
            self._send(code, {"ok": False, "error": f"malformed request: {reason[:120]}; send an HTTP/1.1 request "
                                                    "(GET /v1/model or POST /v1/predict)"}, close=True)

        def do_GET(self) -> None:  # noqa: N802 - the standard library's name
            """Answer ``GET /v1/model`` (503 when nothing is served) and ``GET /v1/live`` (404/405 for other paths).

            Raises:
                OSError: the client is gone.
            """
            if self.path.split("?")[0] == "/v1/predict":
                self._error(405, "use POST for /v1/predict")
                return
            if self.path.split("?")[0] == "/v1/live":  # the counters read, nothing kept: as the socket's live op
                self._send(200, server.live_answer(http=True))
                return
            if self.path.split("?")[0] != "/v1/model":
                self._error(404, f"no such endpoint {self.path[:60]!r} (POST /v1/predict, GET /v1/model, GET /v1/live)")
                return
            served = server.current
            if served is None:
                self._error(503, server.no_model)
                return
            self._send(200, {"ok": True, "model": served.ref(), "inputs": served.inputs, "outputs": served.outputs})

        def do_POST(self) -> None:  # noqa: N802 - the standard library's name
            """Answer ``POST /v1/predict`` through the server's request path, then offer it to the shadow run.

            Raises:
                OSError: the client is gone or too slow (ends the connection).
            """
            if self.path.split("?")[0] != "/v1/predict":
                if self.path.split("?")[0] in ("/v1/model", "/v1/live"):
                    self._error(405, f"use GET for {self.path.split('?')[0]}", close=True)
                else:
                    self._error(404, f"no such endpoint {self.path[:60]!r} (POST /v1/predict, GET /v1/model, GET /v1/live)",
                                close=True)
                return
            length = self.headers.get("Content-Length")
            if (self.headers.get("Transfer-Encoding") or length is None
                    or not (length.isascii() and length.isdigit())):  # "²".isdigit() is True, int("²") raises
                server.malformed()
                self._error(411, "malformed request: send the body with a Content-Length", close=True)
                return
            served = server.current  # what its inputs can need as JSON (served.json_body, from its activation) bounds it too
            by_model = served is not None and served.json_body[0] < settings_limit[0]
            limit = served.json_body[0] if by_model else settings_limit[0]
            size = byte_count(length)  # None: 20 digits or more (int() would refuse over 4300, with a bare ValueError)
            if size is None or size > limit:
                if by_model:
                    key = (f"the served model's {served.json_body[1]} input numbers as JSON, {JSON_NUMBER_BYTES} "
                           f"bytes each and {JSON_SPARE_BYTES} to spare")
                    advice = "check the inputs' names and shapes (GET /v1/model)"
                else:
                    _, key, advice = settings_limit
                server.malformed()
                self._error(413, f"malformed request: a body of {'10**19 bytes or more' if size is None else f'{size} bytes'}"
                                 f" is over the {limit}-byte limit ({key}); {advice}", close=True)
                return
            self._reader.body()
            body = self.rfile.read(size)
            if len(body) < size:
                server.malformed()
                self.close_connection = True  # the client went away mid-body: nobody to answer
                return
            started = time.perf_counter_ns()  # the live figures' clock: from the request read (JSON parsed in it)
            try:
                with parse_lock:
                    arrays = parse_inputs(body, server.max_payload)
            except _BadRequest as exc:
                server.malformed()
                self._error(exc.status, str(exc))
                return
            finally:
                body = b""  # freed before the model runs
            try:
                served, outputs, took = server.predict(arrays, started, finite=True)
            except RequestError as exc:
                status = {"input": 400, "no_model": 503, "paused": 503}.get(exc.kind, 500)
                self._error(status, str(exc), exc.model)
                return
            self._send(200, {"ok": True, "outputs": {k: v.tolist() for k, v in outputs.items()},
                             "model": served.ref(), "ms": round(took / 1e6, 4)})
            server.offer_shadow(served, arrays, outputs)  # after the answer, as on the socket

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the standard library's name
            """Log the access line at debug level (not on stderr)."""
            log.debug("http: " + format, *args)

    class Listener(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 64
        allow_reuse_address = True

    try:
        return Listener((HOST, port), Handler)
    except OSError as exc:
        raise DeviceError(f"serving API: cannot listen on http://{HOST}:{port}: {exc.strerror or exc}") from None


__all__ = ["BODY_MIN_RATE", "HOST", "JSON_NUMBER_BYTES", "JSON_SPARE_BYTES", "json_body_limit", "listen",
           "parse_inputs"]
