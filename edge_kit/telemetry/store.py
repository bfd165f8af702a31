"""The fleet history: SQLite in WAL mode, one row per message, duplicates dropped by ``msg_id``.

Tables: ``status``, ``bench``, ``telemetry`` (the message JSON plus indexed columns), ``decisions``
(what selection chose for a device and why), ``rollouts`` and ``rollout_devices`` (a pull
rollout's settings, state and owner, and each device's state in it: what lets a rollout resume
after the host restarts), ``invalid`` (payloads that failed validation, kept
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
CREATE TABLE IF NOT EXISTS rollouts (id TEXT PRIMARY KEY, created REAL, ts REAL, state TEXT, owner TEXT,
                                     heartbeat REAL, body TEXT);
CREATE TABLE IF NOT EXISTS rollout_devices (rollout TEXT, device TEXT, wave INTEGER, state TEXT, revision INTEGER,
                                            ts REAL, detail TEXT, PRIMARY KEY (rollout, device));
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

    # --- rollouts (edge_kit.loop.waves) ------------------------------------------------------------

    def save_rollout(self, rid: str, state: str, body: dict[str, Any]) -> None:
        """Create or update rollout ``rid`` with its ``state`` and settings/progress ``body`` (JSON)."""
        now = time.time()
        with self._lock:
            self._db.execute("INSERT INTO rollouts (id, created, ts, state, owner, heartbeat, body) "
                             "VALUES (?, ?, ?, ?, NULL, NULL, ?) ON CONFLICT (id) DO UPDATE SET ts = excluded.ts, "
                             "state = excluded.state, body = excluded.body",
                             (rid, now, now, state, json.dumps(body, default=str)))

    def claim_rollout(self, rid: str, owner: str, stale_s: float) -> str | None:
        """Make ``owner`` the one process driving rollout ``rid``; return None when it now is, else
        the live owner that holds it (its heartbeat newer than ``stale_s``)."""
        now = time.time()
        with self._lock:
            self._db.execute("UPDATE rollouts SET owner = ?, heartbeat = ? WHERE id = ? AND "
                             "(owner IS NULL OR owner = ? OR heartbeat < ?)", (owner, now, rid, owner, now - stale_s))
            row = self._db.execute("SELECT owner FROM rollouts WHERE id = ?", (rid,)).fetchone()
        return None if row and row[0] == owner else (row[0] if row else "nobody: no such rollout")

    def heartbeat_rollout(self, rid: str, owner: str) -> str:
        """Note that ``owner`` still drives rollout ``rid``; return the rollout's state (``aborting``
        when someone asked it to stop)."""
        with self._lock:
            self._db.execute("UPDATE rollouts SET heartbeat = ? WHERE id = ? AND owner = ?", (time.time(), rid, owner))
            row = self._db.execute("SELECT state FROM rollouts WHERE id = ?", (rid,)).fetchone()
        return row[0] if row else "missing"

    def release_rollout(self, rid: str, owner: str) -> None:
        """Let go of rollout ``rid`` (another process may resume it at once)."""
        with self._lock:
            self._db.execute("UPDATE rollouts SET owner = NULL WHERE id = ? AND owner = ?", (rid, owner))

    def set_rollout_state(self, rid: str, state: str) -> None:
        """Set rollout ``rid``'s state (``abort`` sets ``aborting``; its owner stops and sets ``aborted``)."""
        with self._lock:
            self._db.execute("UPDATE rollouts SET state = ?, ts = ? WHERE id = ?", (state, time.time(), rid))

    def rollout(self, rid: str) -> dict[str, Any] | None:
        """Return rollout ``rid`` (``id, created, ts, state, owner, heartbeat, body``), or None."""
        rows = self._rows("SELECT id, created, ts, state, owner, heartbeat, body FROM rollouts WHERE id = ?", (rid,))
        return self._rollout_row(rows[0]) if rows else None

    def rollouts(self, limit: int = 20) -> list[dict[str, Any]]:
        """Return the newest rollouts first."""
        rows = self._rows("SELECT id, created, ts, state, owner, heartbeat, body FROM rollouts "
                          "ORDER BY created DESC LIMIT ?", (limit,))
        return [self._rollout_row(r) for r in rows]

    @staticmethod
    def _rollout_row(row: tuple) -> dict[str, Any]:
        return {**dict(zip(("id", "created", "ts", "state", "owner", "heartbeat"), row[:6])), "body": json.loads(row[6])}

    def set_rollout_devices(self, rid: str, rows: list[dict[str, Any]]) -> None:
        """Create or update devices' rows of rollout ``rid`` in one transaction; each a dict with
        ``device``, ``wave``, ``state``, ``revision`` and ``detail`` (a dict, JSON)."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO rollout_devices VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (rollout, device) DO UPDATE "
                    "SET wave = excluded.wave, state = excluded.state, revision = excluded.revision, ts = excluded.ts, "
                    "detail = excluded.detail",
                    [(rid, r["device"], r["wave"], r["state"], r["revision"], now, json.dumps(r.get("detail") or {}))
                     for r in rows])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def rollout_devices(self, rid: str) -> dict[str, dict[str, Any]]:
        """Return each device's row of rollout ``rid`` (``wave, state, revision, ts, detail``) by name."""
        rows = self._rows("SELECT device, wave, state, revision, ts, detail FROM rollout_devices WHERE rollout = ?", (rid,))
        return {d: {"wave": w, "state": s, "revision": rev, "ts": ts, "detail": json.loads(det)}
                for d, w, s, rev, ts, det in rows}

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
