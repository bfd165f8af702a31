"""The agent's artifact download: Range resume, refusals, bandwidth cap, hash check.

A small in-process HTTP server stands in for the store here (it can misbehave on purpose: ignore
Range, drop the connection mid-body, serve other bytes); tests/integration/test_artifact_store.py
runs the same code against nginx serving a published store.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from device_agents.errors import DeviceError
from device_agents.fetch import (
    FetchError,
    RateLimiter,
    artifact_url,
    download_once,
    fetch,
    partial_path,
)

DATA = os.urandom(300_000)
SHA = hashlib.sha256(DATA).hexdigest()
_BOMB = gzip.compress(bytes(30_000_000))  # 30 MB of zeros in ~30 kB


class _Store(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = {f"/sha256/{SHA}": DATA}
        self.ignore_range = False
        self.drop_after: int | None = None  # close the connection after this many body bytes (once)
        self.status: int | None = None
        self.no_length = False  # stream the body until the connection closes (no Content-Length)
        self.trickle: float | None = None  # seconds between 1-byte writes (a store that holds a client)
        self.header_trickle: float | None = None  # seconds between 1-byte writes of an endless header
        self.location: str | None = None  # where /moved redirects to
        self.requests: list[str | None] = []
        self.sent = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *_a):
        pass

    def do_GET(self):
        srv: _Store = self.server
        rng = self.headers.get("Range")
        srv.requests.append(rng)
        if srv.header_trickle is not None:  # the status line, then one header that never ends
            try:
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                for _ in range(600):
                    self.wfile.write(b"a")
                    self.wfile.flush()
                    time.sleep(srv.header_trickle)
            except OSError:
                pass
            self.close_connection = True
            return
        if srv.status:
            self.send_error(srv.status)
            return
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", srv.location or f"/sha256/{SHA}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng and not srv.ignore_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if not srv.no_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.drop_after is not None:
            body, srv.drop_after = body[:srv.drop_after], None
        if srv.trickle is not None:
            try:
                for i in range(len(body)):
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(srv.trickle)
            except OSError:
                return
        self.wfile.write(body)
        with srv.lock:
            srv.sent += len(body)
        self.close_connection = True


@pytest.fixture
def store():
    srv = _Store()
    t = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_artifact_url_and_error_tree():
    assert artifact_url("https://cdn.example/store/", SHA.upper()) == f"https://cdn.example/store/sha256/{SHA}"
    assert issubclass(FetchError, DeviceError)
    with pytest.raises(FetchError, match="not 64 hex digits"):
        artifact_url("http://s", "abc")


def test_fetch_verifies_and_renames(store, tmp_path):
    dest = tmp_path / "models" / "a.bin"
    r = fetch(artifact_url(store.url, SHA), SHA, dest)
    assert dest.read_bytes() == DATA and r.bytes_downloaded == len(DATA) and not r.resumed and r.path == dest
    assert not partial_path(dest).exists()
    again = fetch(artifact_url(store.url, SHA), SHA, dest)
    assert again.bytes_downloaded == 0 and len(store.requests) == 1  # no request for a file already there


def test_cut_download_resumes_with_range_and_fetches_only_the_rest(store, tmp_path):
    dest = tmp_path / "a.bin"
    url = artifact_url(store.url, SHA)
    first = download_once(url, partial_path(dest), cut_after=100_000)
    assert not first.complete and first.received == 100_000
    r = fetch(url, SHA, dest)
    assert r.resumed and r.bytes_downloaded == len(DATA) - 100_000
    assert store.requests[-1] == "bytes=100000-" and dest.read_bytes() == DATA


def test_a_connection_dropped_mid_body_is_resumed_in_the_same_call(store, tmp_path):
    store.drop_after = 120_000
    r = fetch(artifact_url(store.url, SHA), SHA, tmp_path / "a.bin")
    assert r.bytes_downloaded == len(DATA) and store.requests == [None, "bytes=120000-"]
    assert store.sent == len(DATA)


def test_server_ignoring_range_restarts_from_zero(store, tmp_path):
    dest = tmp_path / "a.bin"
    url = artifact_url(store.url, SHA)
    download_once(url, partial_path(dest), cut_after=50_000)
    store.ignore_range = True
    r = fetch(url, SHA, dest)
    assert not r.resumed and r.bytes_downloaded == len(DATA) and dest.read_bytes() == DATA


def test_a_complete_partial_gets_416_and_is_installed(store, tmp_path):
    dest = tmp_path / "a.bin"
    partial_path(dest).write_bytes(DATA)
    r = fetch(artifact_url(store.url, SHA), SHA, dest)
    assert r.bytes_downloaded == 0 and r.resumed and dest.read_bytes() == DATA


def test_a_partial_longer_than_the_file_is_dropped_and_fetched_again(store, tmp_path):
    dest = tmp_path / "a.bin"
    partial_path(dest).write_bytes(DATA + b"junk")
    r = fetch(artifact_url(store.url, SHA), SHA, dest)
    assert r.bytes_downloaded == len(DATA) and dest.read_bytes() == DATA


def test_hash_mismatch_is_refused_and_leaves_nothing(store, tmp_path):
    dest = tmp_path / "a.bin"
    other = hashlib.sha256(b"other").hexdigest()
    store.files[f"/sha256/{other}"] = DATA  # the store holds wrong bytes under that name
    with pytest.raises(FetchError, match="sha256 mismatch.*deleted") as exc:
        fetch(artifact_url(store.url, other), other, dest)
    assert "\n" not in str(exc.value) and artifact_url(store.url, other) in str(exc.value)
    assert not dest.exists() and not partial_path(dest).exists()


def test_a_wrong_dest_is_replaced(store, tmp_path):
    dest = tmp_path / "a.bin"
    dest.write_bytes(b"stale")
    fetch(artifact_url(store.url, SHA), SHA, dest)
    assert dest.read_bytes() == DATA


def test_store_not_answering_is_one_line(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = artifact_url(f"http://127.0.0.1:{port}", SHA)
    with pytest.raises(FetchError, match="does not answer.*connection refused.*fetch again") as exc:
        fetch(url, SHA, tmp_path / "a.bin", timeout_s=2)
    assert "\n" not in str(exc.value) and url in str(exc.value)


def test_http_errors_name_the_status(store, tmp_path):
    with pytest.raises(FetchError, match="HTTP 404.*edgekit publish"):
        fetch(artifact_url(store.url, "0" * 64), "0" * 64, tmp_path / "a.bin")
    store.status = 503
    with pytest.raises(FetchError, match="HTTP 503"):
        fetch(artifact_url(store.url, SHA), SHA, tmp_path / "a.bin")


def test_oversize_body_refused(store, tmp_path):
    dest = tmp_path / "a.bin"
    with pytest.raises(FetchError, match="300000 bytes, more than the 1000 allowed"):
        fetch(artifact_url(store.url, SHA), SHA, dest, max_bytes=1000)
    assert not dest.exists() and not partial_path(dest).exists()


def test_bandwidth_cap_within_tolerance(store, tmp_path):
    rate = 600_000.0  # bytes/s: 300 kB take ~0.5 s
    t0 = time.monotonic()
    r = fetch(artifact_url(store.url, SHA), SHA, tmp_path / "a.bin", max_bytes_s=rate)
    seconds = time.monotonic() - t0
    measured = len(DATA) / seconds
    assert 0.85 * rate <= measured <= 1.05 * rate, measured
    assert r.seconds >= len(DATA) / rate * 0.95


def test_rate_limiter_refuses_nonsense():
    for rate in (0, 1e-9, 999):  # below 1 kB/s a 14 MB model would take days
        with pytest.raises(FetchError, match="at least 1000 bytes/s"):
            RateLimiter(rate)


def test_a_trickling_store_cannot_hold_a_download_past_its_deadline_or_a_cancel(store, tmp_path):
    store.trickle = 0.2  # one byte every 0.2 s, each read well inside timeout_s: only a whole-call bound helps
    _left_at_the_deadline_and_at_a_cancel(artifact_url(store.url, SHA), tmp_path, timeout_s=5, max_bytes_s=2048)


def _left_at_the_deadline_and_at_a_cancel(url: str, tmp_path, timeout_s: float, **kw) -> None:
    """Check that a download of ``url`` a store holds (``fetch``'s ``kw``) ends at its 1 s deadline, then at a
    cancel after 0.5 s, each within seconds, leaving no file."""
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="took longer than 1 s"):
        fetch(url, SHA, tmp_path / "a.bin", timeout_s=timeout_s, max_seconds=1.0)
    assert time.monotonic() - t0 < 4
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="cancelled"):
        fetch(url, SHA, tmp_path / "b.bin", timeout_s=timeout_s, cancel=cancel, **kw)
    assert time.monotonic() - t0 < 3 and not (tmp_path / "b.bin").exists()


def test_a_store_trickling_its_headers_cannot_hold_a_download_past_its_deadline_or_a_cancel(store, tmp_path):
    """One header byte every 0.2 s keeps every read inside timeout_s and the header phase endless: the
    whole-call bound and a cancel end it all the same (they used to be checked only between body reads,
    so a newer desired state waited behind such a store for ever)."""
    store.header_trickle = 0.2
    url = artifact_url(store.url, SHA)
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="took longer than 1 s") as exc:
        fetch(url, SHA, tmp_path / "a.bin", timeout_s=5, max_seconds=1.0)
    assert time.monotonic() - t0 < 4 and "\n" not in str(exc.value)
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="cancelled"):
        fetch(url, SHA, tmp_path / "b.bin", timeout_s=5, cancel=cancel)
    assert time.monotonic() - t0 < 3 and not (tmp_path / "b.bin").exists()


def test_a_silent_store_is_left_at_a_cancel_and_the_bytes_received_are_kept(store, tmp_path):
    """A store that stops sending mid-body (no Content-Length) holds a read for timeout_s; a cancel ends
    it at once, and the bytes received stay in the partial (they were never taken for the whole file)."""
    store.no_length = True
    store.trickle = 30.0  # one byte, then silence
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    dest = tmp_path / "a.bin"
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="cancelled"):
        fetch(artifact_url(store.url, SHA), SHA, dest, timeout_s=20, cancel=cancel)
    assert time.monotonic() - t0 < 3
    assert partial_path(dest).read_bytes() == DATA[:1] and not dest.exists()


def _tls_trickle(conn):
    """Answer a ClientHello with the header of a 16 kB TLS record, then its bytes one every 0.2 s (a minute at most)."""
    conn.sendall(b"\x16\x03\x03\x40\x00")
    for _ in range(300):
        conn.sendall(b"\x00")
        time.sleep(0.2)


@pytest.mark.parametrize("store", ["connect", "tls"])
def test_a_store_that_never_takes_the_connect_or_trickles_its_tls_handshake_is_left_at_the_deadline_or_a_cancel(
        store, request, tmp_path):
    """The connect and the TLS handshake were made before the watchdog watched the socket: a store (or whoever sits
    on the path) that drops the SYN, or sends its handshake a byte at a time, held the download for the whole
    timeout_s (up to 600 s in a desired state) past max_seconds and past a cancel (a newer desired state, an abort's
    hold, the agent stopping), and then ended as 'the store does not answer (timed out)'."""
    if store == "connect":
        url = f"http://127.0.0.1:{request.getfixturevalue('silent_port')}"
    else:
        raw = request.getfixturevalue("raw_store")
        raw["answer"], url = _tls_trickle, raw["url"].replace("http://", "https://")
    _left_at_the_deadline_and_at_a_cancel(artifact_url(url, SHA), tmp_path, timeout_s=20)


def test_a_name_lookup_that_hangs_is_left_at_the_deadline_or_a_cancel(store, tmp_path, monkeypatch):
    """The store's name was looked up before anything watched the request: a DNS server gone silent held the
    download for the resolver's own timeouts (5 s a server and try by default, several tries) past max_seconds and
    past a cancel. An address is never looked up in a thread: it needs no resolver."""
    real, lookups = socket.getaddrinfo, []

    def silent_dns(host, *args, **kw):
        lookups.append(host)
        if host == "store.invalid":
            time.sleep(10)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", silent_dns)
    port = store.url.rsplit(":", 1)[1]
    _left_at_the_deadline_and_at_a_cancel(artifact_url(f"http://store.invalid:{port}", SHA), tmp_path, timeout_s=20)
    assert lookups == ["store.invalid", "store.invalid"]
    assert fetch(artifact_url(store.url, SHA), SHA, tmp_path / "c.bin", max_seconds=5.0).bytes_downloaded == len(DATA)


def test_the_lookup_a_redirect_check_makes_of_the_named_store_is_left_at_the_deadline_or_a_cancel(
        store, tmp_path, monkeypatch):
    """A redirect to a local address the first connection was not on looks the named store's name up again (is it on
    that address too?); that lookup was the system resolver's, unwatched: a DNS server gone silent since the first
    lookup held the download for its own timeouts past max_seconds and past a cancel, and then refused the redirect
    as if the store were not on that address."""
    local = _Store()  # the host the store redirects to, on the device's loopback
    threading.Thread(target=local.serve_forever, args=(0.05,), daemon=True).start()
    real_peer, real_lookup, lookups = socket.socket.getpeername, socket.getaddrinfo, []
    store_port = store.server_address[1]

    def peer(sock):  # the store stands for a remote one
        address = real_peer(sock)
        return ("203.0.113.5", address[1]) if address[1] == store_port else address

    def silent_after_the_first(host, port, *args, **kw):  # each fetch: its connect's lookup, then the check's
        if host != "store.test":
            return real_lookup(host, port, *args, **kw)
        lookups.append(host)
        if len(lookups) % 2 == 0:
            time.sleep(10)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real_lookup("127.0.0.1", port, *args, **kw)

    monkeypatch.setattr(socket.socket, "getpeername", peer)
    monkeypatch.setattr(socket, "getaddrinfo", silent_after_the_first)
    store.location = f"http://localhost:{local.server_address[1]}/sha256/{SHA}"
    try:
        _left_at_the_deadline_and_at_a_cancel(f"http://store.test:{store_port}/moved", tmp_path, timeout_s=20)
    finally:
        local.shutdown()
        local.server_close()
    assert len(lookups) == 4 and local.requests == []


@pytest.mark.parametrize("where", ["http://a..b/x", "http://[::1/x", "http://xn--/x"])
def test_a_redirect_to_a_url_that_cannot_be_one_is_a_fetch_error(store, tmp_path, where):
    store.location = where
    with pytest.raises(FetchError):
        fetch(f"{store.url}/moved", SHA, tmp_path / "a.bin", timeout_s=2)


def test_oversize_body_without_length_is_cut_at_the_limit(store, tmp_path):
    store.no_length = True
    dest = tmp_path / "a.bin"
    with pytest.raises(FetchError, match="more than the 100000 bytes allowed"):
        fetch(artifact_url(store.url, SHA), SHA, dest, max_bytes=100_000)
    assert not partial_path(dest).exists()
    r = fetch(artifact_url(store.url, SHA), SHA, dest)  # without a limit, read until the server closes
    assert r.bytes_downloaded == len(DATA) and dest.read_bytes() == DATA


def test_redirects_are_followed(store, tmp_path):
    r = fetch(f"{store.url}/moved", SHA, tmp_path / "a.bin")
    assert r.bytes_downloaded == len(DATA)


def test_a_destination_that_cannot_be_written_is_one_line(store, tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(FetchError, match="cannot write .*fetch again") as exc:
        fetch(artifact_url(store.url, SHA), SHA, tmp_path / "file" / "a.bin")
    assert "\n" not in str(exc.value)


def test_not_a_url_is_refused(tmp_path):
    with pytest.raises(FetchError, match="not an http"):
        fetch(f"ftp://x/sha256/{SHA}", SHA, tmp_path / "a.bin")


@pytest.mark.parametrize("cut", [1, 64 * 1024, 64 * 1024 + 1, len(DATA) // 2, len(DATA) - 1])
def test_any_cut_point_resumes_to_the_exact_bytes(store, tmp_path, cut):
    dest = tmp_path / "a.bin"
    url = artifact_url(store.url, SHA)
    assert download_once(url, partial_path(dest), cut_after=cut).received == cut
    r = fetch(url, SHA, dest)
    assert r.resumed and r.bytes_downloaded == len(DATA) - cut and dest.read_bytes() == DATA
    assert store.requests[-1] == f"bytes={cut}-"


def test_a_bad_partial_is_dropped_and_the_whole_file_fetched_once_more(store, tmp_path):
    dest = tmp_path / "a.bin"
    partial_path(dest).write_bytes(b"\0" * 100_000)  # left by something else: wrong bytes
    r = fetch(artifact_url(store.url, SHA), SHA, dest)
    assert dest.read_bytes() == DATA and not r.resumed
    assert r.bytes_downloaded == (len(DATA) - 100_000) + len(DATA)
    assert store.requests == ["bytes=100000-", None]


def test_a_store_off_the_device_cannot_redirect_it_to_its_own_local_services(store, tmp_path, monkeypatch):
    """A redirect was followed wherever it pointed: a store (or whoever is on the path of a plain-http one) could
    make every device of the fleet send GETs to services listening on its own loopback (the serving API, any
    local daemon's admin page). The store here stands for a remote one (its address seen as 203.0.113.5); a
    service on the device's loopback must get no request at all. A loopback store may still redirect to itself."""
    local = _Store()  # a local service on the device
    threading.Thread(target=local.serve_forever, args=(0.05,), daemon=True).start()
    real = socket.socket.getpeername
    store_port = store.server_address[1]

    def peer(sock):
        address = real(sock)
        return ("203.0.113.5", address[1]) if address[1] == store_port else address

    try:
        monkeypatch.setattr(socket.socket, "getpeername", peer)
        store.location = f"http://localhost:{local.server_address[1]}/sha256/{SHA}"
        with pytest.raises(FetchError, match=r"/moved: the store redirected the device to its own loopback address "
                                             r"\(http://localhost:\d+/sha256/.* at 127.0.0.1\), where local services "
                                             r"listen and the store named \(127.0.0.1\) is not"):
            fetch(f"{store.url}/moved", SHA, tmp_path / "a.bin", timeout_s=2)
        assert local.requests == [] and not (tmp_path / "a.bin").exists()
        monkeypatch.undo()
        assert fetch(f"{store.url}/moved", SHA, tmp_path / "a.bin").bytes_downloaded == len(DATA)  # loopback to loopback
    finally:
        local.shutdown()
        local.server_close()


@pytest.fixture
def lan(store, monkeypatch):
    """The store and a second server standing for hosts of a LAN of Pis: names resolve (``socket.getaddrinfo``) to
    the loopback servers, and each server's address is presented (``getpeername``) as the LAN address it stands
    for; ``names`` is what each name resolves to as the device's resolver (mDNS) would say (``fetch._resolve``).
    Returns ``(other, seen_as, names)``: the second server, and the maps a test fills."""
    from device_agents import fetch as fetching

    other = _Store()
    threading.Thread(target=other.serve_forever, args=(0.05,), daemon=True).start()
    seen_as: dict[int, tuple] = {}  # server port -> the peer address it is seen at
    names: dict[str, list[str]] = {}  # host name -> its addresses
    real_peer, real_resolve = socket.socket.getpeername, socket.getaddrinfo

    def peer(sock):
        address = real_peer(sock)
        return seen_as.get(address[1], address)

    def resolve(host, port, *args, **kwargs):  # every name of the test reaches the loopback servers
        return real_resolve("127.0.0.1" if host in names else host, port, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "getpeername", peer)
    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setattr(fetching, "_resolve", lambda host, *_: names.get(host, []), raising=False)
    yield other, seen_as, names
    other.shutdown()
    other.server_close()


def test_a_store_named_store_local_may_redirect_to_its_own_ipv6_link_local_address(store, lan, tmp_path):
    """``store.local`` (mDNS on a LAN of Pis) answers on 192.168.1.10 and on its IPv6 link-local fe80::1. A redirect
    from its IPv4 address to its IPv6 one (under its own name, or another name that is on fe80::1) was refused as
    "its own link-local address": the first connection was on no local address, so any local one was refused,
    although the operator named that store in the desired state."""
    other, seen_as, names = lan
    names.update({"store.local": ["192.168.1.10", "fe80::1%2"], "store-v6.local": ["fe80::1%2"]})
    seen_as.update({store.server_address[1]: ("192.168.1.10", store.server_address[1]),
                    other.server_address[1]: ("fe80::1", other.server_address[1], 0, 2)})
    other.files = store.files
    first = f"http://store.local:{store.server_address[1]}/moved"
    for n, where in enumerate(["store.local", "store-v6.local"]):
        store.location = f"http://{where}:{other.server_address[1]}/sha256/{SHA}"
        assert fetch(first, SHA, tmp_path / f"{n}.bin", timeout_s=2).bytes_downloaded == len(DATA)
    assert len(other.requests) == 2


def test_a_store_on_a_link_local_address_is_trusted_as_named(store, lan, tmp_path):
    """``store.local`` resolving to its IPv6 link-local address only: the operator named it, so it is fetched
    from (and may redirect to itself) although the address is link-local."""
    _other, seen_as, names = lan
    names["store.local"] = ["fe80::1%2"]
    seen_as[store.server_address[1]] = ("fe80::1", store.server_address[1], 0, 2)
    assert fetch(f"http://store.local:{store.server_address[1]}/sha256/{SHA}", SHA, tmp_path / "a.bin",
                 timeout_s=2).bytes_downloaded == len(DATA)
    store.location = f"/sha256/{SHA}"
    assert fetch(f"http://store.local:{store.server_address[1]}/moved", SHA, tmp_path / "b.bin",
                 timeout_s=2).bytes_downloaded == len(DATA)


@pytest.mark.parametrize("first, to, scope", [
    ("203.0.113.5", ("192.168.1.1",), "a private address"),  # a CDN sending the device to the LAN's router
    ("203.0.113.5", ("fe80::99", 0, 0, 2), "its own link-local address"),
    ("192.168.1.10", ("192.168.1.11",), "a private address"),  # the LAN store sending it to another LAN host
    ("192.168.1.10", ("fe80::99", 0, 0, 2), "its own link-local address"),  # not an address store.local is on
])
def test_a_redirect_to_a_local_address_the_named_store_is_not_on_is_refused(store, lan, tmp_path, first, to, scope):
    """A redirect to another host on a private, link-local or loopback address that the store the operator named
    is not on gets no request: before, only loopback and link-local were refused (a public store could send every
    device to the LAN's router), and only when the store itself was on none."""
    other, seen_as, names = lan
    names.update({"store.local": [first], "router.local": [to[0]]})
    seen_as.update({store.server_address[1]: (first, store.server_address[1]),
                    other.server_address[1]: (to[0], other.server_address[1], *to[1:])})
    store.location = f"http://router.local:{other.server_address[1]}/sha256/{SHA}"
    with pytest.raises(FetchError, match=rf"store.local:\d+/moved: the store redirected the device to {scope} "
                                         rf"\(http://router.local:\d+/sha256/\w+ at {to[0]}\), where local services "
                                         r"listen and the store named \(store.local\) is not; fix the store's"):
        fetch(f"http://store.local:{store.server_address[1]}/moved", SHA, tmp_path / "a.bin", timeout_s=2)
    assert other.requests == [] and not (tmp_path / "a.bin").exists()


@pytest.fixture
def raw_store():
    """A loopback server answering every connection with ``answer`` (set by the test: bytes, or a function sending
    on the connection), then closing."""
    srv = socket.create_server(("127.0.0.1", 0))
    state = {"answer": b""}

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.recv(65536)
                    answer = state["answer"]
                    answer(conn) if callable(answer) else conn.sendall(answer)
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{srv.getsockname()[1]}"
    yield state
    srv.close()


@pytest.mark.parametrize("status, header, error", [
    ("200 OK", "Content-Length: " + "9" * 5000, "sha256 mismatch"),  # read to the end: its bytes decide
    ("200 OK", "Content-Length: \u00b2", "sha256 mismatch"),  # a digit to str.isdigit, not to int()
    ("206 Partial Content", "Content-Range: bytes 0-5/" + "9" * 5000,
     "download cut again (the store answered 206 without a valid Content-Range)"),
    ("416 Range Not Satisfiable", "Content-Range: bytes */" + "9" * 5000, "download cut again"),
])
def test_a_byte_count_that_is_no_number_is_a_fetch_error_naming_the_url(raw_store, tmp_path, status, header, error):
    """A Content-Length or Content-Range of 5000 digits (over int()'s 4300) or in a non-ASCII digit made fetch raise
    a bare ValueError: no URL, no advice, against its one-line FetchError contract (the agent reported
    "ValueError: Exceeds the limit (4300 digits) ..."). Such a count is now no count at all."""
    raw_store["answer"] = f"HTTP/1.1 {status}\r\n{header}\r\nConnection: close\r\n\r\n".encode("latin-1") + b"x" * 100
    dest = tmp_path / "a.bin"
    if status.startswith("416"):
        partial_path(dest).write_bytes(b"x" * 10)  # a Range request gets the 416
    with pytest.raises(FetchError, match=re.escape(f"{raw_store['url']}/sha256/{SHA}: {error}")):
        fetch(artifact_url(raw_store["url"], SHA), SHA, dest, max_bytes=1000, timeout_s=5)
    assert not dest.exists()


def _endless(conn):
    conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
    while True:
        conn.sendall(b"x" * 65536)


@pytest.mark.parametrize("answer, error, partial_kept", [
    # a body larger than the size the desired state allows, said or not: refused, nothing kept
    (lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 900000\r\n\r\n" + DATA * 3),
     "900000 bytes, more than the 300000 allowed", 0),
    (_endless, "more than the 300000 bytes allowed", 0),
    # a Content-Length shorter than the body: http.client stops at it; the hash refuses the bytes
    (lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + DATA), "sha256 mismatch", 0),
    # longer than the body, then the store hangs up: a cut, the bytes kept for a resume
    (lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 299999\r\nConnection: close\r\n\r\n" + DATA[:1000]),
     "download cut again (connection closed at 1000 of 299999 bytes)", 1000),
    # a gzip bomb: no Content-Encoding is decoded, so 30 kB stay 30 kB, refused by their hash
    (lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(_BOMB) + _BOMB),
     "sha256 mismatch", 0),
    # a range nobody asked for, longer than the file: refused at the limit
    (lambda c: c.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-299999/300000\r\n\r\n" + DATA * 2),
     "more than the 300000 bytes allowed", 0),
    # a redirect to a file on the device
    (lambda c: c.sendall(b"HTTP/1.1 302 Found\r\nLocation: file:///etc/passwd\r\nContent-Length: 0\r\n\r\n"),
     "file:///etc/passwd: not an http:// or https:// URL", 0),
    # not HTTP (the store URL's port is an SSH server's), or a status line of 60 kB with terminal escapes: quoted short,
    # on one line (the line end and all went into the error, and the agent's report kept its first line only)
    (b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
     "does not answer (not an HTTP status line: 'SSH-2.0-OpenSSH_9.2p1 Debian-2'); check the store URL", 0),
    (b"\x1b]52;c;" + b"A" * 60_000 + b"\r\n", "does not answer (not an HTTP status line: '\\x1b]52;c;AAAA", 0),
    (b"HTTP/1.1 500 \x1b[2J\x0bgone\r\nContent-Length: 0\r\n\r\n", "answered HTTP 500 \\x1b[2J\\x0bgone; check", 0),
])
def test_a_hostile_store_is_refused_in_one_line_and_leaves_only_a_resumable_partial(raw_store, tmp_path, answer,
                                                                                    error, partial_kept):
    """A real loopback server misbehaving on purpose: what it sends is refused in one FetchError naming the URL,
    `dest` is never written, and only a cut (bytes that may be right) leaves a partial for the next call."""
    raw_store["answer"], url = answer, raw_store["url"]
    dest = tmp_path / "a.bin"
    with pytest.raises(FetchError, match=re.escape(error)) as caught:
        fetch(artifact_url(url, SHA), SHA, dest, max_bytes=len(DATA), timeout_s=5, max_seconds=30)
    assert "\n" not in str(caught.value) and (url in str(caught.value) or "file://" in str(caught.value))
    assert "\x1b" not in str(caught.value) and len(str(caught.value)) < 500
    assert not dest.exists()
    partial = partial_path(dest)
    assert (partial.stat().st_size if partial.exists() else 0) == partial_kept
