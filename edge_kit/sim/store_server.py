"""Serve an artifact store folder over HTTP: nginx (Debian's ``nginx-light``) on a free port.

Used by ``edgekit sim up --store DIR``, the tests and the benchmarks, and shaped like what a user
runs in production (docs/artifact-store.md has the same server block): static files, Range
requests answered by nginx itself (206 / 416), ``Cache-Control: immutable`` on the
content-addressed ``sha256/`` objects and ``no-cache`` on ``manifests/``. Each request is logged
as ``status body_bytes_sent range uri``; :meth:`StoreServer.bytes_served` sums the second field,
so the figure is the server's own count of body bytes it sent.

Where nginx is not installed, ``start_store_server(..., embedded=None)`` falls back to
:class:`EmbeddedStoreServer` (a standard-library ``ThreadingHTTPServer`` with the same Range
behaviour and byte counter) and says so in ``kind``.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from device_agents.content_length import DIGITS
from edge_kit.errors import EdgeKitError, InputError
from edge_kit.fleet.broker_setup import BrokerTls
from edge_kit.sim.broker import free_port, wait_port
from edge_kit.sim.process import stop_process

START_TIMEOUT_S = 10.0
LOG_FORMAT = '$status $body_bytes_sent "$http_range" $request_uri'
_LOG_LINE = re.compile(r'^(\d{3}) (\d+) "([^"]*)" (\S+)$')
_RANGE = re.compile(rf"^bytes=({DIGITS})-({DIGITS})?$")  # one range, byte counts as the agent reads them


def find_nginx() -> str | None:
    """Return the path of the ``nginx`` executable, or None."""
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if Path(p).is_file()), None)


def nginx_config(folder: Path, workdir: Path, host: str, port: int, *, ignore_range: bool = False,
                 sndbuf: int | None = None, workers: int = 1, tls: BrokerTls | None = None) -> str:
    """Return an nginx.conf serving ``folder`` read-only on ``host:port``, logging to ``workdir``.

    ``ignore_range``: ``max_ranges 0`` (nginx answers 200 with the whole file: a server that
    ignores Range). ``sndbuf``: the listening socket's send buffer (small: few bytes counted as
    sent are still in flight when a client drops the connection). ``tls``: serve HTTPS with that
    certificate and key.
    """
    user = f"user {getpass.getuser()};" if os.geteuid() == 0 else ""  # as root nginx would switch to nobody
    tmp = workdir / "tmp"
    listen = f"listen {host}:{port}" + (" ssl" if tls else "") + " backlog=4096" + (f" sndbuf={sndbuf}" if sndbuf else "") + ";"
    certs = f"ssl_certificate {tls.cert};\n        ssl_certificate_key {tls.key};" if tls else ""
    return f"""# written by edge_kit.sim.store_server
{user}
daemon off;
worker_processes {workers};
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    default_type application/octet-stream;
    types {{ application/json json; }}
    log_format store '{LOG_FORMAT}';
    access_log {workdir}/access.log store;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 30s;
    server_tokens off;
    server {{
        {listen}
        {certs}
        root {folder};
        autoindex off;
        {"max_ranges 0;" if ignore_range else ""}
        location /sha256/ {{
            add_header Cache-Control "public, max-age=31536000, immutable";
        }}
        location /manifests/ {{
            add_header Cache-Control "no-cache";
        }}
        location / {{
            return 404;
        }}
    }}
}}
"""


class StoreServer:
    """A running store server: ``url``, ``bytes_served()``, ``requests()``, ``stop()``."""

    kind = "nginx"

    def __init__(self, folder: Path, workdir: Path, host: str, port: int, proc: subprocess.Popen | None,
                 scheme: str = "http"):
        self.folder, self.workdir, self.host, self.port, self.proc = folder, workdir, host, port, proc
        self.url = f"{scheme}://{host}:{port}"
        self.access_log = workdir / "access.log"
        self.temporary = False  # the workdir was made for it: removed by stop()

    def requests(self) -> list[dict[str, Any]]:
        """Return every logged request: ``status``, ``bytes`` (body bytes sent), ``range``, ``uri``."""
        try:
            lines = self.access_log.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            m = _LOG_LINE.match(line.strip())
            if m:
                out.append({"status": int(m.group(1)), "bytes": int(m.group(2)),
                            "range": None if m.group(3) in ("", "-") else m.group(3), "uri": m.group(4)})
        return out

    def bytes_served(self) -> int:
        """Return the body bytes the server says it sent, over every request so far (its access log)."""
        return sum(r["bytes"] for r in self.requests())

    def wait_requests(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until at least ``count`` requests are logged (a dropped connection is logged when the
        server notices); return the requests (fewer after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            reqs = self.requests()
            if len(reqs) >= count or time.monotonic() > deadline:
                return reqs
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (and remove its workdir when it was a temporary one); no-op when stopped."""
        stop_process(self.proc)
        self.proc = None
        if self.temporary:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> StoreServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


class EmbeddedStoreServer(StoreServer):
    """The fallback: a standard-library threaded HTTP server with Range support and a byte counter."""

    kind = "embedded (python http.server)"

    def __init__(self, folder: Path, workdir: Path, host: str, port: int, *, ignore_range: bool = False,
                 sndbuf: int | None = None):
        super().__init__(folder, workdir, host, port, None)
        self._log: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        handler = _handler(self, folder.resolve(), ignore_range, sndbuf)
        self._httpd = _QuietServer((host, port), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def record(self, entry: dict[str, Any]) -> None:
        """Add one request to the log (called by the handler)."""
        with self._lock:
            self._log.append(entry)

    def requests(self) -> list[dict[str, Any]]:
        """Return every request served so far (as :meth:`StoreServer.requests`)."""
        with self._lock:
            return list(self._log)

    def stop(self) -> None:
        """Stop the server (and remove its workdir when it was a temporary one); no-op when stopped."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._httpd.server_close()
        if self.temporary:
            shutil.rmtree(self.workdir, ignore_errors=True)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that drops its connection is normal here (a cut download)


def _handler(server: EmbeddedStoreServer, root: Path, ignore_range: bool,
             sndbuf: int | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            if sndbuf:
                self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            super().setup()

        def log_message(self, *_a: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            rng = self.headers.get("Range")
            sent = 0
            status = 404
            path = (root / self.path.split("?", 1)[0].lstrip("/")).resolve()
            try:
                if not path.is_relative_to(root) or not path.is_file() or not self.path.startswith(("/sha256/", "/manifests/")):
                    self.send_error(404)
                    return
                size = path.stat().st_size
                start, end = 0, size - 1
                m = _RANGE.match(rng or "")  # anything else (20 digits and more too): the whole file
                if m and not ignore_range:
                    start = int(m.group(1))
                    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                    if start >= size or end < start:
                        status = 416
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                else:
                    status = 200
                    self.send_response(200)
                immutable = self.path.startswith("/sha256/")
                self.send_header("Cache-Control", "public, max-age=31536000, immutable" if immutable else "no-cache")
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("Accept-Ranges", "none" if ignore_range else "bytes")
                self.end_headers()
                with open(path, "rb") as f:
                    f.seek(start)
                    left = end - start + 1
                    while left > 0:
                        block = f.read(min(64 * 1024, left))
                        if not block:
                            break
                        self.wfile.write(block)
                        sent += len(block)
                        left -= len(block)
            except OSError:
                self.close_connection = True
            finally:
                server.record({"status": status, "bytes": sent, "range": rng, "uri": self.path})

    return Handler


def store_folder(folder: Path | str) -> Path:
    """Return ``folder`` resolved, a published store folder to serve.

    Raises:
        InputError: it is not a folder (missing, or a file).
    """
    folder = Path(folder).resolve()
    if not folder.is_dir():
        why = "not a folder" if folder.exists() else "no such store folder"
        raise InputError(f"{folder}: {why}; run `edgekit publish ARTIFACTS --store {folder}` first")
    return folder


def start_store_server(folder: Path, port: int | None = None, *, host: str = "127.0.0.1",
                       workdir: Path | None = None, embedded: bool | None = None, ignore_range: bool = False,
                       sndbuf: int | None = None, workers: int = 1, wrap: tuple[str, ...] = (),
                       tls: BrokerTls | None = None) -> StoreServer:
    """Serve the store ``folder`` on ``host:port`` (a free port when None) and wait until it answers.

    nginx is used when installed (``embedded=None``) or asked for (``embedded=False``); otherwise
    the embedded server. ``workdir`` holds the config and logs (when None: a temporary folder,
    removed by ``stop()``).
    ``sndbuf``: the server's socket send buffer in bytes (None: the kernel's autotuning). Small
    values bound what a dropped connection had in flight, which the server counts as sent: the
    tests and benchmarks set it to count a cut download the way a real link would.
    ``ignore_range``: answer every request with 200 and the whole file. ``wrap``: a command prefix
    nginx runs under, e.g. ``("ip", "netns", "exec", NS)`` to serve from behind an emulated link
    (:mod:`edge_kit.sim.links`; ``host`` is then the namespace's address). ``tls``: serve HTTPS
    with this certificate (:func:`edge_kit.fleet.broker_setup.make_tls` makes one); nginx only.

    Returns:
        The running :class:`StoreServer` (``.url``, ``.bytes_served()``, ``.stop()``; a context manager).

    Raises:
        InputError: the folder does not exist.
        EdgeKitError: nginx was asked for and is missing, the port is in use, or the server did not
            start (the error log's last line says why).
    """
    folder = store_folder(folder)
    temporary = workdir is None
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="edgekit-store-"))
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or (80 if wrap else free_port(host))  # a namespace of its own: the usual port is free
    exe = find_nginx()
    if embedded is None:
        embedded = exe is None
    if embedded:
        if wrap or tls:
            raise EdgeKitError("the embedded store server serves plain HTTP in this process only: install nginx "
                               "(apt install nginx-light) for TLS or a namespace")
        embedded_server = EmbeddedStoreServer(folder, workdir, host, port, ignore_range=ignore_range, sndbuf=sndbuf)
        embedded_server.temporary = temporary
        return embedded_server
    if exe is None:
        raise EdgeKitError("nginx is not installed (apt install nginx-light); the embedded store server needs no install")
    if not wrap and wait_port(host, port, 0.05):
        raise EdgeKitError(f"{host}:{port} is already in use; give another port (or none for a free one)")
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_config(folder, workdir, host, port, ignore_range=ignore_range, sndbuf=sndbuf, workers=workers,
                                 tls=tls))
    with open(workdir / "nginx.out", "ab") as out:
        proc = subprocess.Popen([*wrap, exe, "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(conf)],
                                stdout=out, stderr=out, start_new_session=True)
    server = StoreServer(folder, workdir, host, port, proc, "https" if tls else "http")
    server.temporary = temporary
    if not wait_port(host, port, START_TIMEOUT_S) or proc.poll() is not None:
        log = workdir / "error.log"
        tail = log.read_text().strip().splitlines()[-1:] if log.exists() else []
        server.stop()
        raise EdgeKitError(f"nginx did not start on {host}:{port}: {' '.join(tail) or 'no log'}")
    return server
