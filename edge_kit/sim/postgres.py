"""Start a PostgreSQL server (Debian's packages) on a free loopback port, in its own temporary cluster.

Used by the tests and the benchmarks, as :mod:`edge_kit.sim.broker` starts Mosquitto: ``initdb``
makes a cluster in a new folder, ``postgres`` serves it on ``127.0.0.1:<free port>`` with a password
login, and :attr:`PostgresServer.url` is what ``--history`` takes. PostgreSQL refuses to run as
root: as root the cluster belongs to, and the server runs as, the ``postgres`` user that Debian's
package creates (or ``nobody`` where there is none), through ``subprocess``'s ``user=``/``group=``.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from edge_kit.errors import EdgeKitError
from edge_kit.sim.broker import free_port, wait_port

START_TIMEOUT_S = 30.0
USER = "edgekit"
DATABASE = "edgekit"


def find_postgres_bin() -> Path | None:
    """Return the folder holding ``initdb`` and ``postgres`` (the newest Debian version), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parent.parent.name)
                   if Path(p).parent.parent.name.isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    exe = shutil.which("postgres")
    return Path(exe).parent if exe and shutil.which("initdb") else None


def _run_as() -> tuple[int, int] | None:
    """Return the ``(uid, gid)`` to run PostgreSQL as: None when not root, else ``postgres`` or ``nobody``."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    raise EdgeKitError("running as root, and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL as")


class PostgresServer:
    """One PostgreSQL cluster and server. ``start()``/``stop()``/``restart()`` keep its port and data.

    ``settings`` are passed as ``-c name=value`` (e.g. ``{"fsync": "off"}`` for fast throw-away tests).
    """

    def __init__(self, port: int | None = None, *, host: str = "127.0.0.1", settings: dict[str, str] | None = None):
        """Prepare (not start) a server; the cluster folder is made by :meth:`start`.

        Raises:
            EdgeKitError: PostgreSQL's server binaries are not installed.
        """
        self.bin = find_postgres_bin()
        if self.bin is None:
            raise EdgeKitError("PostgreSQL is not installed (apt install postgresql): initdb and postgres are needed")
        self.host = host
        self.port = port or free_port(host)
        self.settings = settings or {}
        self.password = secrets.token_hex(8)
        self.as_user = _run_as()
        self.workdir: Path | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """Return the ``postgresql://`` URL of the server's ``edgekit`` database (with its password)."""
        return f"postgresql://{USER}:{self.password}@{self.host}:{self.port}/{DATABASE}"

    def _user_kwargs(self) -> dict:
        """Return ``subprocess`` keyword arguments that run a child as the server's user (none when not root)."""
        if self.as_user is None:
            return {}
        return {"user": self.as_user[0], "group": self.as_user[1], "extra_groups": []}

    def _init(self) -> None:
        """Make the cluster (a folder in the system temp dir the server's user owns) and its database.

        Raises:
            EdgeKitError: initdb failed (its last output line says why).
        """
        # pytest's tmp_path is private to root: the cluster lives in its own folder the server user owns.
        self.workdir = Path(tempfile.mkdtemp(prefix="edgekit-pg-"))
        if self.as_user is not None:
            os.chown(self.workdir, *self.as_user)
        pwfile = self.workdir / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.as_user is not None:
            os.chown(pwfile, *self.as_user)
        done = subprocess.run([str(self.bin / "initdb"), "-D", str(self.workdir / "data"), "-U", USER, "--pwfile", str(pwfile),
                               "--auth", "scram-sha-256", "-E", "UTF8", "--locale", "C.UTF-8"],
                              capture_output=True, text=True, timeout=120, cwd=self.workdir, **self._user_kwargs())
        pwfile.unlink()
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
            raise EdgeKitError(f"initdb failed: {' '.join(tail) or f'exit {done.returncode}'}")

    def start(self) -> PostgresServer:
        """Start the server (making the cluster and the ``edgekit`` database the first time); wait until it answers.

        Raises:
            EdgeKitError: initdb failed, or the server exited or did not listen within the timeout.
        """
        first = self.workdir is None
        if first:
            self._init()
        assert self.workdir is not None
        argv = [str(self.bin / "postgres"), "-D", str(self.workdir / "data"), "-p", str(self.port), "-h", self.host,
                "-k", str(self.workdir)]
        for name, value in self.settings.items():
            argv += ["-c", f"{name}={value}"]
        log = self.workdir / "postgres.log"
        with open(log, "ab") as out:
            if self.as_user is not None:
                os.chown(log, *self.as_user)
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out, start_new_session=True, cwd=self.workdir,
                                         **self._user_kwargs())
        if not wait_port(self.host, self.port, START_TIMEOUT_S) or not self._ready():
            self.stop()
            tail = log.read_text(errors="replace").strip().splitlines()[-1:]
            raise EdgeKitError(f"PostgreSQL did not start on {self.host}:{self.port}: {' '.join(tail) or 'no log'}")
        if first:
            self._create_database()
        return self

    def _ready(self) -> bool:
        """Return True once the server accepts a login (it listens before it finishes recovery)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            done = subprocess.run([str(self.bin / "pg_isready"), "-h", self.host, "-p", str(self.port), "-t", "2"],
                                  capture_output=True, timeout=10)
            if done.returncode == 0:
                return True
            if self.proc is not None and self.proc.poll() is not None:
                return False
            time.sleep(0.1)
        return False

    def _create_database(self) -> None:
        """Create the ``edgekit`` database; return nothing. Raises EdgeKitError."""
        self.create_database(DATABASE)

    def create_database(self, name: str) -> str:
        """Create an empty database ``name`` (letters, digits, ``_``) with psql; return its ``postgresql://`` URL.

        Raises:
            EdgeKitError: psql failed (the name is taken, or the server is down).
        """
        if not name.replace("_", "").isalnum():
            raise EdgeKitError(f"{name!r}: a database name here is letters, digits and _")
        done = subprocess.run([str(self.bin / "psql"), "-h", self.host, "-p", str(self.port), "-U", USER, "-d", "postgres",
                               "-v", "ON_ERROR_STOP=1", "-c", f"CREATE DATABASE {name}"],
                              capture_output=True, text=True, timeout=60, env={**os.environ, "PGPASSWORD": self.password})
        if done.returncode != 0:
            raise EdgeKitError(f"cannot create the database {name}: {done.stderr.strip()}")
        return f"postgresql://{USER}:{self.password}@{self.host}:{self.port}/{name}"

    def stop(self) -> None:
        """Stop the server with a fast shutdown (SIGINT: clients are disconnected, data kept); no-op when stopped."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        """Stop and start again on the same port with the same data; return nothing. Raises EdgeKitError."""
        self.stop()
        self.start()

    def remove(self) -> None:
        """Stop the server and delete its cluster folder; return nothing."""
        self.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> PostgresServer:
        """Start the server; return it."""
        return self.start()

    def __exit__(self, *_: object) -> None:
        """Stop the server and delete its data; return nothing."""
        self.remove()
