"""`edgekit bench` and `edgekit deploy --canary` store records in the history beside the fleet file. With a fleet folder
the user cannot write (a read-only checkout, another user's folder), they must stop in one line before any device
work, naming the folder and --history; and --history elsewhere must work.

The commands run as a user who does not own the folder: under root (CI), in a user namespace as uid 1000, where the
folder's owner is that user without root's override (``unshare --user``), so the kernel refuses the writes for real.
A TCP listener stands for the broker and every device's sshd: any device work would connect to it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_kit.manifest import Artifact, Manifest
from edge_kit.telemetry.store import HISTORY_NAME, SCHEMA_VERSION, Store

ROOT = Path(__file__).resolve().parents[2]


def _another_user(args: list[str], cwd: Path) -> dict:
    """Return the keyword arguments of a :mod:`subprocess` call that runs `edgekit ARGS` as a user the folders'
    permissions apply to, its output captured as text."""
    prefix = ["unshare", "--user", "--map-user=1000", "--map-group=1000"] if os.geteuid() == 0 else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(cwd)}
    return {"args": [*prefix, sys.executable, "-m", "edge_kit", *args], "cwd": cwd, "env": env,
            "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}


def _as_another_user(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run `edgekit ARGS` as a user the folders' permissions apply to; return the finished process."""
    return subprocess.run(**_another_user(args, cwd), timeout=120)


@pytest.fixture
def listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        s.setblocking(False)
        yield s


def _checkout(tmp_path: Path, port: int) -> tuple[Path, Path]:
    """Write a fleet file (broker and devices on ``port``) and a compiled model's folder; return both."""
    checkout = tmp_path / "checkout"
    (checkout / "art").mkdir(parents=True)
    (checkout / "keys").mkdir()  # the operator key's folder is the user's (it is not what is tested here)
    arts = [Artifact(id="fp32", status="built", profiles=["rpi4"], summary="fp32", precision="float32", file="fp32.x",
                     runtime="litert", sha256="a" * 64, bytes=1000)]
    (checkout / "art" / "manifest.json").write_text(Manifest(
        created="2026-11-29T00:00:00+00:00", model={"name": "m"}, versions={}, profiles={"rpi4": {}},
        artifacts=arts).to_json())
    fleet = checkout / "fleet.yaml"
    fleet.write_text(f"fleet: f\nbroker: {{host: 127.0.0.1, port: {port}}}\ndefaults: {{user: edgekit, profile: rpi4}}\n"
                     f"devices:\n  - {{name: a, host: 127.0.0.1, port: {port}}}\n  - {{name: b, host: 127.0.0.1, port: {port}, root: /srv/b}}\n")
    return fleet, checkout / "art"


COMMANDS = {"bench": lambda fleet, art: ["bench", "--fleet", str(fleet), "--device", "a", "--timeout", "5", "--json"],
            "deploy --canary": lambda fleet, art: ["deploy", "--fleet", str(fleet), "--artifacts", str(art),
                                                   "--canary", "50%", "--health-timeout", "5", "--json"]}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", ["read-only folder", "another user's history in it", "read-only history file"])
def test_an_unwritable_history_beside_the_fleet_file_stops_before_any_device_work(tmp_path, listener, command, case):
    """Before, a history file that could be opened but not written (read-only, or another user's) let `bench` ask the
    device for its benchmark and fail after it, the record thrown away; and no message said the way out."""
    fleet, art = _checkout(tmp_path, listener.getsockname()[1])
    folder = fleet.parent
    if case != "read-only folder":
        Store(folder / HISTORY_NAME).close()
        (folder / HISTORY_NAME).chmod(0o444)
    if case != "read-only history file":
        folder.chmod(0o555)
    try:
        done = _as_another_user(COMMANDS[command](fleet, art), tmp_path)
    finally:
        folder.chmod(0o755)
    assert done.returncode == 6, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    error = json.loads(done.stdout)["error"]
    assert str(folder / HISTORY_NAME) in error, error
    assert "attempt to write a readonly database" in error or "unable to open database file" in error, error
    assert error.endswith(f"the fleet's history lives beside its fleet file, in {folder}: make that folder and the file "
                          "writable for you, or give --history with a file in a folder you can write "
                          "(or a postgresql:// URL)"), error
    with pytest.raises(BlockingIOError):  # nothing connected: no broker, no device was asked anything
        listener.accept()


@pytest.mark.parametrize("command", COMMANDS)
def test_history_elsewhere_is_the_way_out(tmp_path, listener, command):
    fleet, art = _checkout(tmp_path, listener.getsockname()[1])
    fleet.parent.chmod(0o555)
    elsewhere = tmp_path / "mine"
    elsewhere.mkdir()
    connected = False
    try:
        # Nothing answers here: once the command connects (device work began, past the history) it is stopped, not
        # waited for through its broker's connect timeout (15 s)
        with subprocess.Popen(**_another_user([*COMMANDS[command](fleet, art), "--history", str(elsewhere / "h.db")],
                                              tmp_path)) as done:
            deadline = time.monotonic() + 120
            while not connected and done.poll() is None and time.monotonic() < deadline:
                try:
                    listener.accept()[0].close()
                    connected = True
                except BlockingIOError:
                    time.sleep(0.05)
            done.kill()
            out, err = done.communicate()
    finally:
        fleet.parent.chmod(0o755)
    assert "history file" not in json.loads(out or "{}").get("error", ""), out
    assert (elsewhere / "h.db").is_file()  # opened, written there
    assert connected, (done.returncode, err)  # and the device work went on


def _older_read_only_history(tmp_path: Path) -> Path:
    """Write a history as the previous edge-kit left it (schema version 1: no ``edgekit_schema`` table), read-only."""
    import sqlite3

    path = tmp_path / "h.db"
    Store(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE edgekit_schema")
    conn.close()
    path.chmod(0o444)
    return path


def _tables(path: Path) -> set[str]:
    import sqlite3

    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        conn.close()


def test_a_reader_of_an_older_history_it_may_not_write_is_told_to_have_it_upgraded(tmp_path):
    """A reader upgrades a history of an older schema when it may write the file; one that may not (another user's,
    a read-only copy) changes nothing and is told, in one line, what to run and as whom."""
    history = _older_read_only_history(tmp_path)
    done = _as_another_user(["report", "--history", str(history), "--out", str(tmp_path / "r.html")], tmp_path)
    assert done.returncode == 6 and done.stderr.count("\n") == 1 and done.stdout == "", done.stderr
    assert done.stderr == (f"edgekit: error: the history {history} was written by an older edge-kit (schema version 1; "
                           f"this one reads {SCHEMA_VERSION}) and this command only reads it: run `edgekit history upgrade --history "
                           "<it>` once as a user (or PostgreSQL role) that owns its tables, then run again\n")
    assert "edgekit_schema" not in _tables(history)


def test_a_writer_of_an_older_history_it_may_not_write_is_told_the_upgrade_needs_a_user_that_may(tmp_path):
    """A writer (here `edgekit history upgrade` itself) on a read-only file of an older schema got "cannot be written or
    read (attempt to write a readonly database): check the disk and the file", which points at the disk. It is now the
    same kind of line a PostgreSQL role that does not own the tables gets: the history needs an upgrade, and who can
    run it (the file's owner, or anyone on a writable copy)."""
    history = _older_read_only_history(tmp_path)
    done = _as_another_user(["history", "upgrade", "--history", str(history)], tmp_path)
    assert done.returncode == 6 and done.stderr.count("\n") == 1 and done.stdout == "", done.stderr
    assert done.stderr == (f"edgekit: error: the history {history} was written by an older edge-kit (schema version 1; "
                           f"this one reads {SCHEMA_VERSION}) and needs an upgrade, which cannot write the file (attempt to write a "
                           "readonly database): run `edgekit history upgrade --history <it>` once as a user that may "
                           "write the file and its folder (its owner), or on a writable copy of it, then run again\n")
    assert "edgekit_schema" not in _tables(history)
    copy = tmp_path / "copy.db"  # the way out the line names: a writable copy, upgraded
    copy.write_bytes(history.read_bytes())
    done = _as_another_user(["history", "upgrade", "--history", str(copy)], tmp_path)
    assert done.returncode == 0 and "edgekit_schema" in _tables(copy), done.stderr
