"""Download an artifact from the store over HTTP(S): Range resume, bandwidth cap, sha256 check.

The device side of the artifact store (:mod:`edge_kit.fleet.artifact_store` writes it; any HTTP
server, object store or CDN serves it). Standard library only, so it runs wherever the agent runs.

A download goes to ``<dest>.partial`` next to ``dest``. When a transfer is cut, the bytes received
stay there and the next call asks for the rest only (``Range: bytes=N-``):

* ``206 Partial Content`` starting at ``N``: the rest is appended;
* ``200 OK``: the server ignored the Range; the partial is truncated and the body written from 0;
* ``416 Range Not Satisfiable``: the partial already holds the whole file (its hash decides) or is
  longer than the file (it is dropped and the download starts over).

The file becomes ``dest`` only once its sha256 matches the expected one: it is fsynced, renamed
over ``dest`` atomically and the folder fsynced. A mismatch deletes the partial and raises. A
``dest`` that already holds the right bytes is returned without any request.

A call is bounded as a whole (``max_seconds``) and by a ``cancel`` event, from the connection to the
last byte: a store that sends its headers or its body a byte at a time, or stops sending, is left at
the deadline or the cancel, not only after ``timeout_s`` of silence.

Every error is a :class:`FetchError` with one line naming the URL and what to do.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from device_agents.content_length import DIGITS, byte_count
from device_agents.disk import durable_replace, is_out_of_space, sha256_of
from device_agents.errors import DeviceError
from edgekit_protocol.desired import MIN_BYTES_S
from edgekit_protocol.labels import clip, printable

CHUNK = 64 * 1024
MAX_REDIRECTS = 5
MAX_ATTEMPTS = 3  # attempts in one fetch() while each one makes progress (a cut, then resume at once)
MIN_RATE = MIN_BYTES_S  # bytes/s: the lowest bandwidth cap (one bound with the desired state's)
CANCELLED = "cancelled"
TOO_SLOW = "too slow"
CUT_RCVBUF = 16 * 1024  # receive buffer of a connection told to stop early: little in flight when it closes
USER_AGENT = "edgekit-agent-fetch/1"
_SHA = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_RANGE = re.compile(rf"^bytes\s+({DIGITS})-({DIGITS})/({DIGITS}|\*)$")
_UNSATISFIED_RANGE = re.compile(rf"^bytes\s+\*/({DIGITS})$")

# Partials being written by this process (a second fetch of the same dest would corrupt it).
_active: set[str] = set()
_active_lock = threading.Lock()


class FetchError(DeviceError):
    """A download from the store failed; the one-line text names the URL and what to do."""


@dataclass(frozen=True)
class FetchResult:
    """What :func:`fetch` did: ``path`` holds the verified file; ``bytes_downloaded`` counts the body
    bytes received by this call (0 when ``dest`` was already there); ``resumed`` is True when bytes
    already in the partial (from an earlier call, or a cut during this one) were kept and the rest
    fetched with a Range; ``seconds`` is this call's wall time."""

    path: Path
    bytes_downloaded: int
    resumed: bool
    seconds: float


@dataclass(frozen=True)
class Attempt:
    """One HTTP request of :func:`download_once`.

    ``status``: the HTTP status (0 when none arrived); ``received``: body bytes written to the
    partial by this request; ``offset``: where the partial stood before it; ``resumed``: the server
    answered the Range (206); ``complete``: the partial now holds the whole file (its hash is not
    checked yet); ``total``: the file's size when the server said it; ``cut``: why the body stopped
    early (None when it did not).
    """

    status: int
    received: int
    offset: int
    resumed: bool
    complete: bool
    total: int | None
    cut: str | None = None


class RateLimiter:
    """A token bucket of ``rate`` bytes/s: :meth:`take` sleeps until ``n`` bytes may pass.

    The bucket starts empty and holds at most a tenth of a second's worth (at least one chunk), so
    the measured rate over any stretch longer than that stays within a few percent of ``rate``.
    """

    def __init__(self, rate: float, cancel: threading.Event | None = None):
        if not rate >= MIN_RATE:
            raise FetchError(f"max_bytes_s must be at least {MIN_RATE:.0f} bytes/s, got {rate!r}")
        self.rate = float(rate)
        self.cancel = cancel  # set: a wait ends at once (the caller checks it after)
        self.capacity = max(self.rate * 0.1, float(CHUNK))
        self.tokens = 0.0
        self.stamp = time.monotonic()

    def take(self, n: int) -> None:
        """Wait until ``n`` bytes are allowed; returns None."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        if self.tokens < 0:
            if self.cancel is not None:
                self.cancel.wait(-self.tokens / self.rate)
            else:
                time.sleep(-self.tokens / self.rate)

    def chunk(self) -> int:
        """Return the read size that keeps the rate smooth (at most :data:`CHUNK`)."""
        return int(max(1024, min(CHUNK, self.rate / 20)))


def artifact_url(store_url: str, sha256: str) -> str:
    """Return ``<store>/sha256/<hash>``: where the store keeps the artifact with this hash.

    Raises:
        FetchError: ``sha256`` is not 64 hex digits.
    """
    digest = _checked_sha(sha256, store_url)
    return f"{store_url.rstrip('/')}/sha256/{digest}"


def partial_path(dest: Path) -> Path:
    """Return the file a download into ``dest`` is written to until it is verified."""
    dest = Path(dest)
    return dest.with_name(dest.name + ".partial")


def _checked_sha(sha256: str, url: str) -> str:
    digest = str(sha256).strip().lower()
    if not _SHA.fullmatch(digest):
        raise FetchError(f"{url}: expected sha256 {sha256!r} is not 64 hex digits; check the desired state")
    return digest



class _Watchdog:
    """Ends a request's connect, TLS handshake and reads when ``cancel`` is set or ``deadline``
    (``time.monotonic()``) passes.

    A store can hold a connect, a handshake or a read for up to ``timeout_s`` (silent), or for ever (one byte of
    an endless header every few seconds: each read returns in time and http.client parses the headers in one call);
    the checks between two body reads cannot see either. A thread (only when there is something to watch)
    shuts the socket of the connection down, so the blocked connect or read returns at once; ``fired``
    then says why (:data:`CANCELLED` or :data:`TOO_SLOW`), and the caller takes whatever the read did as
    that cut, never as the end of the body.
    """

    POLL_S = 0.05

    def __init__(self, cancel: threading.Event | None, deadline: float | None):
        self.cancel, self.deadline = cancel, deadline
        self.fired: str | None = None
        self._sock: socket.socket | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        if cancel is not None or deadline is not None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="fetch-watchdog")
            self._thread.start()

    def due(self) -> str | None:
        """Return why the request must stop now (cancelled, too slow), or None."""
        if self.cancel is not None and self.cancel.is_set():
            return CANCELLED
        if self.deadline is not None and time.monotonic() > self.deadline:
            return TOO_SLOW
        return None

    def watch(self, sock: socket.socket) -> None:
        """Watch ``sock``, a request's TCP socket, from before its connect (a redirect's next one replaces it);
        returns None.

        A duplicate of it is kept (and closed by the next :meth:`watch` or :meth:`close`): the TLS handshake takes
        the socket's descriptor over, and http.client forgets the socket when the body ends with the connection, but
        shutting the duplicate down ends the connect, the handshake and every read on the same connection.
        """
        if self._thread is None:  # nothing to watch for
            return
        with self._lock:
            if self._sock is not None:
                self._sock.close()
            self._sock = sock.dup()
            if self.fired is not None:
                _shut(self._sock)

    def resolve(self, host: str, port: int) -> list[tuple]:
        """Return ``socket.getaddrinfo(host, port, 0, SOCK_STREAM)``, given up when a cancel or the deadline comes
        first: the system resolver's own timeouts (seconds per server and try, a DNS server gone silent) would hold the
        request past both. The lookup runs in a thread of its own, which ends with the resolver's answer; an address
        needs none.

        Raises:
            OSError: the name is not resolved (the resolver's error), or this watchdog fired first (``fired`` says why).
        """
        if self._thread is None or _ip(host) is not None:
            return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        answer: list[Any] = []
        done = threading.Event()

        def lookup() -> None:
            try:
                answer.append(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
            except BaseException as exc:  # noqa: BLE001  (raised in the caller's thread)
                answer.append(exc)
            done.set()

        threading.Thread(target=lookup, daemon=True, name="fetch-resolve").start()
        while not done.wait(self.POLL_S):
            why = self.fired or self.due()
            if why is not None:
                with self._lock:
                    self.fired = why
                raise OSError(f"the lookup of {host} was given up ({why})")
        if isinstance(answer[0], BaseException):
            raise answer[0]
        return answer[0]

    def _run(self) -> None:
        while not self._done.wait(self.POLL_S):
            why = self.fired or self.due()
            if why is not None:  # shut at every poll once fired: a socket not yet connecting ignores the first
                with self._lock:
                    self.fired = why
                    _shut(self._sock)

    def close(self) -> None:
        """Stop watching; returns None."""
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _shut(sock: socket.socket | None) -> None:
    """Shut ``sock`` down at the TCP level (a connect, TLS handshake or read blocked on the same connection returns;
    ``SSLSocket.shutdown`` would drop its TLS state under the reading thread); closing is left to its owner."""
    if sock is not None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


def _socket_to(host: str, port: int, timeout_s: float, rcvbuf: int | None, watchdog: _Watchdog | None) -> socket.socket:
    """Return a TCP connection to ``host:port``, each address the name has tried in turn (as
    :func:`socket.create_connection` does), each socket handed to ``watchdog`` before its connect: a cancel or the
    deadline ends the name's lookup, the connect, and the TLS handshake after it, at once (each could otherwise take
    ``timeout_s``, the lookup the resolver's own timeouts).

    Raises:
        OSError: the name is not resolved, the connect is refused, unreachable, timed out, or ended by the watchdog
            (its ``fired`` says why).
    """
    error: OSError | None = None
    found = watchdog.resolve(host, port) if watchdog is not None else socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    for family, kind, proto, _name, address in found:
        sock = socket.socket(family, kind, proto)
        try:
            if rcvbuf:  # before the connect: the window it offers is set at the handshake
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(timeout_s)
            if watchdog is not None:
                watchdog.watch(sock)
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
            if watchdog is not None and watchdog.fired:
                break
    raise error if error is not None else OSError(f"{host} has no address")


def _connect(url: str, timeout_s: float, ssl_context: ssl.SSLContext | None, rcvbuf: int | None,
             watchdog: _Watchdog | None = None) -> http.client.HTTPConnection:
    """Return a connection to ``url``'s host, connected (and its TLS handshake done for ``https://``), watched by
    ``watchdog`` from before the connect.

    Raises:
        FetchError: not an http(s) URL, or a bad one. ssl.SSLError: the TLS handshake failed. OSError: see
            :func:`_socket_to`.
    """
    try:
        parts = urlsplit(url)
        parts.hostname and parts.hostname.encode("idna")  # a name IDNA cannot encode fails here, as one line
    except (ValueError, UnicodeError):
        raise FetchError(f"{url[:200]}: not a valid URL; check the store URL (or the redirect the store sent)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(f"{url}: not an http:// or https:// URL; give the store's URL")
    try:
        port = parts.port
    except ValueError:
        raise FetchError(f"{url}: bad port in the URL; check the store URL") from None
    if parts.scheme == "https":
        context = ssl_context or ssl.create_default_context()
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(parts.hostname, port, timeout=timeout_s,
                                                                       context=context)
    else:
        conn = http.client.HTTPConnection(parts.hostname, port, timeout=timeout_s)
    sock = _socket_to(conn.host, conn.port, timeout_s, rcvbuf, watchdog)  # what conn.connect() would do, watched
    if parts.scheme == "https":
        try:
            sock = context.wrap_socket(sock, server_hostname=conn.host)
        except BaseException:
            sock.close()
            raise
    conn.sock = sock
    return conn


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Return ``address`` as an IP address (an IPv4-mapped IPv6 address as its IPv4 one, without a ``%zone``), or None
    when it is none."""
    try:
        ip = ipaddress.ip_address(str(address).split("%")[0])
    except ValueError:
        return None
    return getattr(ip, "ipv4_mapped", None) or ip


def _peer(conn: http.client.HTTPConnection) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Return the address ``conn`` is connected to (None when it cannot be told)."""
    try:
        return _ip(conn.sock.getpeername()[0])
    except (OSError, IndexError, AttributeError):
        return None


def _scope(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> str | None:
    """Return ``"loopback"`` (the device itself), ``"link-local"`` or ``"private"`` (its network) for such an
    address, else None (a public address, or none known)."""
    if ip is None:
        return None
    return ("loopback" if ip.is_loopback or ip.is_unspecified else "link-local" if ip.is_link_local
            else "private" if ip.is_private else None)


def _resolve(host: str, watchdog: _Watchdog | None = None) -> list[str]:
    """Return the addresses ``host`` resolves to here (empty when it does not, or when ``watchdog`` gave the lookup up:
    its ``fired`` says so); a seam for the tests."""
    try:
        if watchdog is not None:
            return [info[4][0] for info in watchdog.resolve(host, 0)]
        return [info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)]
    except (OSError, UnicodeError, ValueError):
        return []


def _is_on(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, host: str,
           first: ipaddress.IPv4Address | ipaddress.IPv6Address | None, watchdog: _Watchdog | None = None) -> bool:
    """Return whether ``ip`` is an address the store the operator named is on: ``first``, the address its first
    request reached, or, when ``host`` is a name, any address it resolves to (``store.local`` on a LAN of Pis: an
    IPv4 address and an IPv6 link-local one). Resolved only when a redirect asks, the lookup given up at
    ``watchdog``'s cancel or deadline (then False, and its ``fired`` says why)."""
    if ip is None or ip == first:
        return ip is not None
    return _ip(host) is None and ip in {_ip(a) for a in _resolve(host, watchdog)}


def _target(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _open(url: str, headers: dict[str, str], timeout_s: float, ssl_context: ssl.SSLContext | None,
          rcvbuf: int | None, watchdog: _Watchdog | None = None
          ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, str] | str:
    """Send a GET, following redirects; return the connection, the response and the final URL, or why
    ``watchdog`` stopped it before the headers were read (:data:`CANCELLED`, :data:`TOO_SLOW`).

    Raises:
        FetchError: the store does not answer, TLS failed, too many redirects, a redirect that is no
            URL, one from https:// to anything else (a downgrade), or one to another host on a loopback,
            link-local or private address that the store the operator named (the first URL's host, trusted
            as named) is not on: the device's own services, or its network's.
    """
    first_url, first_host, first_ip = url, "", None
    for hop in range(MAX_REDIRECTS + 1):
        if watchdog is not None and watchdog.due():
            return watchdog.due() or TOO_SLOW
        try:
            conn = _connect(url, timeout_s, ssl_context, rcvbuf, watchdog)
        except FetchError:
            raise
        except (OSError, http.client.HTTPException, ValueError, UnicodeError) as exc:
            if watchdog is not None and watchdog.fired:
                return watchdog.fired  # it ended the connect or the TLS handshake, not the store
            if isinstance(exc, ssl.SSLError):
                raise FetchError(f"{url}: TLS failed ({exc.reason or exc}); check the store's certificate and the "
                                 "device's CA bundle") from None
            raise FetchError(f"{url}: the store does not answer ({_reason(exc)}); check the store URL and that its "
                             "server runs, then fetch again") from None
        host = (urlsplit(url).hostname or "").lower()
        if hop == 0:  # what the operator named is trusted as named, wherever it is
            first_host, first_ip = host, _peer(conn)
        elif host != first_host:  # a redirect elsewhere: never to a local address the named store is not on
            ip = _peer(conn)
            scope = _scope(ip)
            if scope is not None and not _is_on(ip, first_host, first_ip, watchdog):  # before any request: none sent
                conn.close()
                if watchdog is not None and watchdog.fired:
                    return watchdog.fired  # it gave the lookup of the store's name up: neither answer is known
                where = f"its own {scope} address" if scope != "private" else "a private address"
                raise FetchError(f"{first_url}: the store redirected the device to {where} ({url[:120]} at {ip}), "
                                 f"where local services listen and the store named ({first_host[:120]}) is not; fix "
                                 "the store's (or CDN's) redirect, or name that host in the store URL")
        try:
            conn.request("GET", _target(url), headers={"User-Agent": USER_AGENT, **headers})
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException, ValueError, UnicodeError) as exc:
            conn.close()
            if watchdog is not None and watchdog.fired:
                return watchdog.fired
            raise FetchError(f"{url}: the store does not answer ({_reason(exc)}); check the store URL and that its "
                             "server runs, then fetch again") from None
        if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
            resp.close()
            conn.close()
            try:
                location = urljoin(url, resp.getheader("Location"))
            except ValueError:
                raise FetchError(f"{url}: the store redirected to {resp.getheader('Location')[:200]!r}, not a URL; "
                                 "check the store's server") from None
            if urlsplit(url).scheme == "https" and urlsplit(location).scheme != "https":
                raise FetchError(f"{url}: the store redirected from https:// to {location.split('://')[0][:10]}:// "
                                 f"({location[:120]}); the model would cross the network in the clear: fix the "
                                 "store's (or CDN's) redirect")
            url = location
            continue
        return conn, resp, url
    raise FetchError(f"{url}: more than {MAX_REDIRECTS} redirects; check the store URL")


def _reason(exc: BaseException) -> str:
    """Return why a connect, request or read failed, in a few words on one line: what the store sent (a status line
    that is not HTTP's, up to 64 kB with its line end) is quoted short, its control characters escaped."""
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"name not resolved: {exc.strerror or exc}"
    if isinstance(exc, http.client.BadStatusLine) and not isinstance(exc, http.client.RemoteDisconnected):
        return f"not an HTTP status line: '{clip(printable(str(exc).strip()), 80)}'"
    return clip(printable(str(exc) or type(exc).__name__), 200)


def _total_of(resp: http.client.HTTPResponse) -> tuple[int | None, int | None]:
    """Return (first byte of the body, size of the whole file) from a 200/206 response's headers."""
    body = byte_count(resp.getheader("Content-Length"))  # None: unknown, read to the limit
    if resp.status == 206:
        m = _CONTENT_RANGE.match((resp.getheader("Content-Range") or "").strip())
        if not m:
            return None, None
        total = None if m.group(3) == "*" else int(m.group(3))
        return int(m.group(1)), total
    return 0, body


def download_once(url: str, partial: Path, *, max_bytes_s: float | None = None, timeout_s: float = 30.0,
                  max_bytes: int | None = None, ssl_context: ssl.SSLContext | None = None,
                  cut_after: int | None = None, limiter: RateLimiter | None = None,
                  cancel: threading.Event | None = None, deadline: float | None = None) -> Attempt:
    """Make one GET of ``url`` into ``partial``, continuing from the partial's size with a Range.

    ``cut_after``: stop after that many body bytes and drop the connection (a simulated cut: the
    connection's receive buffer is kept small so little is in flight when it closes). ``limiter``
    (or ``max_bytes_s``) caps the rate. ``cancel`` (set) or ``deadline`` (``time.monotonic()``
    passed) stop the request at once, in the headers as in the body (a watchdog shuts the socket down
    under a blocked read): a silent or trickling store cannot hold the caller longer.
    The hash is not checked here: :func:`fetch` does it.

    Returns:
        The :class:`Attempt`: status, bytes received, whether the partial is now complete, and why
        the body stopped early if it did (a cut is not an error here).

    Raises:
        FetchError: the store does not answer, answers an HTTP error (404: not published; other
            statuses named), the file is larger than ``max_bytes`` (the partial is deleted), or the
            partial cannot be written (disk full, read-only).
    """
    partial = Path(partial)
    if limiter is None and max_bytes_s is not None:
        limiter = RateLimiter(max_bytes_s, cancel)
    offset = partial.stat().st_size if partial.exists() else 0
    if max_bytes is not None and offset > max_bytes:
        partial.unlink(missing_ok=True)
        offset = 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    watchdog = _Watchdog(cancel, deadline)
    try:
        opened = _open(url, headers, timeout_s, ssl_context, CUT_RCVBUF if cut_after is not None else None, watchdog)
        if isinstance(opened, str):  # cancelled or too slow before the headers were all in
            return Attempt(0, 0, offset, False, False, None, cut=opened)
        conn, resp, _final = opened
        return _receive(url, partial, offset, conn, resp, max_bytes, cut_after, limiter, watchdog)
    finally:
        watchdog.close()


def _receive(url: str, partial: Path, offset: int, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse,
             max_bytes: int | None, cut_after: int | None, limiter: RateLimiter | None, watchdog: _Watchdog) -> Attempt:
    """Write the body of ``resp`` (the answer to a GET from ``offset``) into ``partial``; return the
    :class:`Attempt` (see :func:`download_once`, which documents what it raises)."""
    cancel, deadline = watchdog.cancel, watchdog.deadline
    try:
        if resp.status == 416:
            # The partial reaches (or passes) the end: complete if its size is the file's, else wrong.
            m = _UNSATISFIED_RANGE.match((resp.getheader("Content-Range") or "").strip())
            total = int(m.group(1)) if m else None
            if total is not None and total == offset:
                return Attempt(416, 0, offset, False, True, total)
            partial.unlink(missing_ok=True)
            return Attempt(416, 0, offset, False, False, total, cut="the partial was longer than the file: dropped")
        if resp.status == 404:
            raise FetchError(f"{url}: not in the store (HTTP 404); publish it with `edgekit publish` or check the "
                             "store URL and hash")
        if resp.status not in (200, 206):
            raise FetchError(f"{url}: the store answered HTTP {resp.status} {clip(printable(resp.reason), 80)}; check "
                             "the store's server and its logs, then fetch again")
        start, total = _total_of(resp)
        if resp.status == 206 and start != offset:
            partial.unlink(missing_ok=True)  # a range we did not ask for: start over on the next attempt
            why = (f"the store answered a range from byte {start}" if start is not None
                   else "the store answered 206 without a valid Content-Range")
            return Attempt(206, 0, offset, False, False, total, cut=why)
        if max_bytes is not None and total is not None and total > max_bytes:
            partial.unlink(missing_ok=True)
            raise FetchError(f"{url}: {total} bytes, more than the {max_bytes} allowed; check the desired state's "
                             "artifact or raise the limit")
        resumed = resp.status == 206 and offset > 0
        received = 0
        cut = None
        size = offset if resumed else 0
        try:
            f = open(partial, "r+b" if resumed else "wb")
        except OSError as exc:
            raise _write_error(url, partial, exc) from None
        try:
            with f:
                if resumed:
                    f.seek(offset)
                step = limiter.chunk() if limiter else CHUNK
                while True:
                    want = step if cut_after is None else min(step, cut_after - received)
                    if want <= 0:
                        cut = f"stopped after {received} bytes as asked"
                        break
                    if cancel is not None and cancel.is_set():
                        cut = CANCELLED
                        break
                    if deadline is not None and time.monotonic() > deadline:
                        cut = TOO_SLOW
                        break
                    try:
                        block = resp.read1(want)  # what has arrived: a trickle cannot hold one read for long
                    except (OSError, http.client.HTTPException) as exc:
                        cut = _reason(exc)
                        break
                    if not block:
                        break
                    if limiter:
                        limiter.take(len(block))
                    f.write(block)
                    received += len(block)
                    size += len(block)
                    if max_bytes is not None and size > max_bytes:
                        f.close()
                        partial.unlink(missing_ok=True)
                        raise FetchError(f"{url}: more than the {max_bytes} bytes allowed; check the desired state's "
                                         "artifact or raise the limit")
        except OSError as exc:  # the reads' errors are caught above: this is the disk (full, read-only)
            raise _write_error(url, partial, exc) from None
        if watchdog.fired and not (cut is None and total is not None and size == total):
            cut = watchdog.fired  # the read that ended was cut short by it, whatever it returned
        complete = cut is None and (total is None or size == total)
        if cut is None and not complete:
            cut = f"connection closed at {size} of {total} bytes"
        return Attempt(resp.status, received, offset, resumed, complete, total, cut)
    finally:
        resp.close()
        conn.close()


def _write_error(url: str, path: Path, exc: OSError) -> FetchError:
    """Return the one-line error for a local write that failed (disk full, read-only, permissions).

    When the disk is full and ``path`` is a partial download, the partial is deleted first: kept, it
    would hold the device's disk at its last byte (every other writer failing with it) for the sake of
    a resume that needs the space back anyway.
    """
    if is_out_of_space(exc) and path.name.endswith(".partial"):
        path.unlink(missing_ok=True)
        return FetchError(f"{url}: cannot write {path} ({exc.strerror or exc}); the partial download was deleted to "
                          "give the space back: free space on the device, then fetch again")
    return FetchError(f"{url}: cannot write {path} ({exc.strerror or exc}); free space or fix the folder on the "
                      "device, then fetch again (the bytes received so far are kept)")



def fetch(url: str, sha256: str, dest: Path, *, max_bytes_s: float | None = None, timeout_s: float = 30.0,
          max_bytes: int | None = None, ssl_context: ssl.SSLContext | None = None,
          cancel: threading.Event | None = None, max_seconds: float | None = None) -> FetchResult:
    """Download ``url`` into ``dest`` and check it has sha256 ``sha256``; resume an earlier partial.

    Already-present ``dest`` with the right hash: returned at once, no request. Otherwise up to
    :data:`MAX_ATTEMPTS` requests while each makes progress (a cut is resumed with a Range at once).
    ``max_bytes_s`` caps the rate (bytes/s, token bucket); ``max_bytes`` refuses larger files;
    ``timeout_s`` bounds each connect and each read; ``max_seconds`` the whole call (a store that
    trickles a byte at a time, in its headers or its body, cannot hold the caller); ``cancel`` (set
    from another thread) stops it at once, even in a read the store keeps waiting. Either keeps the
    bytes received in the partial.

    Returns:
        :class:`FetchResult` for the verified file at ``dest``.

    Raises:
        FetchError: bad hash argument, store not answering, a redirect refused (from https:// to
            http://, or to another host on a loopback, link-local or private address the named store is not on), an
            HTTP error status, a file over
            ``max_bytes``, the device's disk refusing the write (a full one: the partial is deleted, giving
            the space back), a hash mismatch (the partial is
            deleted, ``dest`` untouched; after a resume, the whole file is fetched once more
            first, in case the kept bytes were the bad ones), cut again on every attempt (the
            partial is kept: fetch again to resume), or another fetch of the same ``dest`` in this
            process.
    """
    t0 = time.monotonic()
    digest = _checked_sha(sha256, url)
    dest = Path(dest)
    if dest.is_file() and sha256_of(dest) == digest:
        return FetchResult(dest, 0, False, time.monotonic() - t0)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(url, dest.parent, exc) from None
    partial = partial_path(dest)
    key = str(partial.resolve())
    with _active_lock:
        if key in _active:
            raise FetchError(f"{url}: another download into {dest} is running; wait for it")
        _active.add(key)
    try:
        limiter = RateLimiter(max_bytes_s, cancel) if max_bytes_s is not None else None
        deadline = t0 + max_seconds if max_seconds is not None else None
        downloaded, resumed = 0, False
        for fresh_start in (False, True):
            last = None
            for _ in range(MAX_ATTEMPTS):
                attempt = download_once(url, partial, timeout_s=timeout_s, max_bytes=max_bytes,
                                        ssl_context=ssl_context, limiter=limiter, cancel=cancel, deadline=deadline)
                downloaded += attempt.received
                if attempt.cut == CANCELLED:
                    raise FetchError(f"{url}: download cancelled (a newer desired state, or the agent stops); the "
                                     "bytes received are kept")
                if attempt.cut == TOO_SLOW:
                    raise FetchError(f"{url}: the download took longer than {max_seconds:.0f} s (the store sends too "
                                     "slowly); the bytes received are kept and resumed next time: check the store")
                kept = attempt.resumed or (attempt.status == 416 and attempt.complete)
                resumed = resumed or (attempt.offset > 0 and kept)
                last = attempt
                if attempt.complete:
                    break
                if attempt.received == 0 and attempt.status not in (206, 416):
                    break  # no progress: do not hammer the store
            if last is None or not last.complete:
                have = partial.stat().st_size if partial.exists() else 0
                raise FetchError(f"{url}: download cut again ({last.cut if last else 'no answer'}); {have} bytes kept "
                                 f"in {partial.name}: fetch again to resume")
            got = sha256_of(partial)
            partial_was_old = resumed and not fresh_start
            if got == digest:
                break
            partial.unlink(missing_ok=True)
            if not partial_was_old:
                raise FetchError(f"{url}: sha256 mismatch (got {got[:12]}…, expected {digest[:12]}…); the download "
                                 "was deleted: republish the artifact or check the desired state's hash")
            resumed = False  # the kept bytes may have been the bad ones: once more, from byte 0
        try:
            with open(partial, "rb+") as f:
                os.fsync(f.fileno())
            durable_replace(partial, dest)
        except OSError as exc:
            raise _write_error(url, dest, exc) from None
        return FetchResult(dest, downloaded, resumed, time.monotonic() - t0)
    finally:
        with _active_lock:
            _active.discard(key)
