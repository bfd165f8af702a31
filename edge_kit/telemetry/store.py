"""The fleet history: SQLite in WAL mode, one row per message, duplicates dropped by ``msg_id``.

Tables: ``status``, ``bench``, ``telemetry`` (the message JSON plus indexed columns), ``decisions``
(what selection chose for a device and why), ``invalid`` (payloads that failed validation, kept
for inspection) and ``gaps`` (missing ``seq`` ranges per device and kind). Several monitor
processes may write the same file: WAL lets readers work alongside, writes are serialized by SQLite
with a busy timeout, and ``INSERT OR IGNORE`` on the message id keeps each record once.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

KINDS = ("status", "bench", "telemetry")
HISTORY_NAME = "edgekit-history.db"


def history_path(fleet_file: Path) -> Path:
    """Return where the history of the fleet described by ``fleet_file`` lives: ``edgekit-history.db`` beside it.

    The one rule for every command that defaults its ``--store`` and for ``edgekit demo``, so the
    history a command (or the demo) wrote is the one the next command reads.
    """
    return Path(fleet_file).resolve().parent / HISTORY_NAME


# Every ts column is this host's clock when the row was received or written, never a sender's claim.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS status (msg_id TEXT PRIMARY KEY, device TEXT, ts REAL, seq INTEGER, state TEXT, body TEXT);
CREATE TABLE IF NOT EXISTS bench (msg_id TEXT PRIMARY KEY, device TEXT, ts REAL, seq INTEGER, variant TEXT,
                                  sha256 TEXT, p90_ms REAL, body TEXT);
CREATE TABLE IF NOT EXISTS telemetry (msg_id TEXT PRIMARY KEY, device TEXT, ts REAL, seq INTEGER, body TEXT);
CREATE TABLE IF NOT EXISTS decisions (id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT, ts REAL, chosen TEXT,
                                      previous TEXT, feasible INTEGER, switched INTEGER, body TEXT);
CREATE TABLE IF NOT EXISTS invalid (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL, topic TEXT, reason TEXT, payload BLOB);
CREATE TABLE IF NOT EXISTS gaps (device TEXT, kind TEXT, first_missing INTEGER, last_missing INTEGER, ts REAL);
CREATE INDEX IF NOT EXISTS bench_device_sha ON bench (device, sha256, ts);
CREATE INDEX IF NOT EXISTS status_device ON status (device, ts);
CREATE INDEX IF NOT EXISTS telemetry_device ON telemetry (device, ts);
"""


class Store:
    """A connection to the history file. Thread-safe; open one per process."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        # Switching to WAL needs the file to itself, and SQLite does not wait for that (no busy
        # handler): several monitor workers opening one new store at once retry here, briefly.
        for attempt in range(100):
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 99:
                    raise
                time.sleep(0.05)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add_many(self, messages: list[tuple[str, dict[str, Any]]], raw: list[bytes] | None = None,
                 received: list[float] | None = None) -> int:
        """Store ``(kind, message)`` pairs in one transaction; return how many were new (not duplicates).

        ``raw`` may give each message's JSON as received, stored as is (saves encoding it again);
        ``received`` each message's receive time on this host (default: now). The rows' ``ts`` is
        that receive time, never the sender's own ``ts``: measurements are ordered by it and ``seq``.
        """
        new = 0
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for i, (kind, m) in enumerate(messages):
                    new += self._insert(kind, m, raw[i].decode() if raw is not None else None,
                                        received[i] if received is not None else now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return new

    def add(self, kind: str, message: dict[str, Any]) -> bool:
        """Store one message; return False when its ``msg_id`` was already there."""
        return self.add_many([(kind, message)]) == 1

    def _insert(self, kind: str, m: dict[str, Any], body: str | None, received: float) -> int:
        body = body or json.dumps(m, separators=(",", ":"))
        head = (m["msg_id"], m["device"], received, m["seq"])
        if kind == "bench":
            sql = "INSERT OR IGNORE INTO bench VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            row = (*head, m.get("variant"), m.get("sha256"), (m.get("latency_ms") or {}).get("p90"), body)
        elif kind == "status":
            sql, row = "INSERT OR IGNORE INTO status VALUES (?, ?, ?, ?, ?, ?)", (*head, m.get("state"), body)
        elif kind == "telemetry":
            sql, row = "INSERT OR IGNORE INTO telemetry VALUES (?, ?, ?, ?, ?)", (*head, body)
        else:
            raise ValueError(f"the store keeps {', '.join(KINDS)}, not {kind!r}")
        return self._db.execute(sql, row).rowcount

    def add_invalid(self, topic: str, reason: str, payload: bytes) -> None:
        """Keep a payload that failed validation (first 4 KiB), with the reason."""
        with self._lock:
            self._db.execute("INSERT INTO invalid (ts, topic, reason, payload) VALUES (?, ?, ?, ?)",
                             (time.time(), topic, reason, payload[:4096]))

    def add_gap(self, device: str, kind: str, first: int, last: int) -> None:
        """Record that ``seq`` ``first..last`` of ``kind`` from ``device`` never arrived (so far)."""
        with self._lock:
            self._db.execute("INSERT INTO gaps VALUES (?, ?, ?, ?, ?)", (device, kind, first, last, time.time()))

    def add_decision(self, decision: dict[str, Any]) -> None:
        """Record a selection decision (a dict with ``device``, ``chosen``, ``current``, ``feasible``, ``switch``)."""
        with self._lock:
            self._db.execute("INSERT INTO decisions (device, ts, chosen, previous, feasible, switched, body) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (decision["device"], time.time(), decision.get("chosen"), decision.get("current"),
                              int(bool(decision.get("feasible"))), int(bool(decision.get("switch"))),
                              json.dumps(decision, default=str)))

    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def count(self, table: str) -> int:
        """Return the number of rows in ``table``."""
        if table not in (*KINDS, "decisions", "invalid", "gaps"):
            raise ValueError(table)
        return self._rows(f"SELECT COUNT(*) FROM {table}")[0][0]

    def latest_bench(self, device: str | None = None) -> dict[tuple[str, str], dict[str, Any]]:
        """Return the newest bench record per ``(device, sha256)`` (of one device, or all)."""
        return {key: records[0] for key, records in self.recent_bench(device, keep=1).items()}

    def recent_bench(self, device: str | None = None, keep: int = 5) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """Return up to ``keep`` bench records per ``(device, sha256)`` (of one device, or all), newest first."""
        where, args = ("WHERE device = ?", (device, keep)) if device else ("", (keep,))
        sql = ("SELECT body FROM (SELECT body, ts, seq, ROW_NUMBER() OVER (PARTITION BY device, sha256 ORDER BY ts DESC, seq DESC) AS n "
               f"FROM bench {where}) WHERE n <= ? ORDER BY ts DESC, seq DESC")
        out: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for (body,) in self._rows(sql, args):
            m = json.loads(body)
            out.setdefault((m["device"], m["sha256"]), []).append(m)
        return out

    def latest_status(self) -> dict[str, dict[str, Any]]:
        """Return the newest status message per device."""
        rows = self._rows("SELECT s.body FROM status s JOIN (SELECT device, MAX(ts) AS ts FROM status GROUP BY device) l "
                          "ON s.device = l.device AND s.ts = l.ts")
        return {m["device"]: m for m in (json.loads(b) for (b,) in rows)}

    def latest_telemetry(self) -> dict[str, dict[str, Any]]:
        """Return the newest telemetry message per device."""
        rows = self._rows("SELECT t.body FROM telemetry t JOIN (SELECT device, MAX(ts) AS ts FROM telemetry GROUP BY device) l "
                          "ON t.device = l.device AND t.ts = l.ts")
        return {m["device"]: m for m in (json.loads(b) for (b,) in rows)}

    def decisions(self, device: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Return recorded decisions, newest first."""
        sql = "SELECT body, ts FROM decisions" + (" WHERE device = ?" if device else "") + " ORDER BY id DESC LIMIT ?"
        return [{**json.loads(b), "recorded": ts} for b, ts in self._rows(sql, ((device,) if device else ()) + (limit,))]

    def bench_records(self, device: str | None = None) -> list[dict[str, Any]]:
        """Return every bench record (of one device, or all), oldest first."""
        sql = "SELECT body FROM bench" + (" WHERE device = ?" if device else "") + " ORDER BY ts"
        return [json.loads(b) for (b,) in self._rows(sql, (device,) if device else ())]
