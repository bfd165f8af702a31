"""Start an Eclipse Mosquitto broker on a free port (loopback unless told) with its own config.

Used by ``edgekit sim`` / ``edgekit demo`` and by the test fixtures. Options cover what a real
deployment sets: username/password (``password_file`` in ``mosquitto_passwd``'s format), an ACL,
TLS, and persistence, which keeps persistent sessions (and their queued QoS 1 messages) across a
broker restart.
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

from edge_kit.errors import EdgeKitError
from edge_kit.fleet.broker_setup import (
    BrokerTls,
    broker_limits,
    mosquitto_password_line,
    write_private,
)
from edge_kit.sim.process import stop_process

START_TIMEOUT_S = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float) -> bool:
    """Return True once something accepts TCP connections on ``host:port``, False after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def find_mosquitto() -> str | None:
    """Return the path of the ``mosquitto`` executable, or None."""
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
                                              if Path(p).is_file()), None)


class MosquittoBroker:
    """One mosquitto process. ``start()``/``stop()``/``restart()`` keep the same port and state folder."""

    def __init__(self, workdir: Path, port: int | None = None, *, users: dict[str, str] | None = None,
                 acl: str | None = None, tls: BrokerTls | None = None, persistence: bool = True, host: str = "127.0.0.1"):
        self.exe = find_mosquitto()
        if self.exe is None:
            raise EdgeKitError("mosquitto is not installed (apt install mosquitto); "
                               "`edgekit demo` falls back to an embedded broker")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port(host)
        self.users, self.acl, self.tls, self.persistence = users, acl, tls, persistence
        self.proc: subprocess.Popen | None = None
        self.log = self.workdir / "mosquitto.log"

    def _config(self) -> Path:
        # As root, mosquitto switches to the `mosquitto` user unless told otherwise, and could then not
        # write its log and persistence file in our private folder.
        lines = [f"user {getpass.getuser()}", f"listener {self.port} {self.host}", f"log_dest file {self.log}", "log_type error",
                 "log_type warning", *broker_limits(), "set_tcp_nodelay true",
                 f"persistence {'true' if self.persistence else 'false'}", f"persistence_location {self.workdir}/"]
        if self.users:  # hashed here: `mosquitto_passwd -b` would show each password to `ps` on this machine
            pw = self.workdir / "passwd"
            write_private(pw, "".join(mosquitto_password_line(u, p) + "\n" for u, p in self.users.items()).encode())
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl is not None:
            acl = self.workdir / "acl"
            acl.write_text(self.acl)
            acl.chmod(0o600)
            lines.append(f"acl_file {acl}")
        if self.tls:
            lines += [f"cafile {self.tls.ca}", f"certfile {self.tls.cert}", f"keyfile {self.tls.key}"]
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self) -> MosquittoBroker:
        """Start the broker and wait until it accepts connections.

        Raises:
            EdgeKitError: it exited or did not listen within the timeout (the log's last line says why).
        """
        conf = self._config()
        with open(self.workdir / "mosquitto.out", "ab") as out:
            self.proc = subprocess.Popen([self.exe, "-c", str(conf)], stdout=out, stderr=out, start_new_session=True)
        if not wait_port(self.host, self.port, START_TIMEOUT_S):
            self.stop()
            tail = self.log.read_text().strip().splitlines()[-1:] if self.log.exists() else []
            raise EdgeKitError(f"mosquitto did not start on {self.host}:{self.port}: {' '.join(tail) or 'no log'}")
        return self

    def stop(self) -> None:
        """Stop the broker (SIGTERM, so it writes its persistence file); no-op when stopped."""
        stop_process(self.proc)
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port with the same state."""
        self.stop()
        self.start()

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
