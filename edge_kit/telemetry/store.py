"""The fleet history: one interface, two databases. One row per message, duplicates dropped by ``msg_id``.

:class:`HistoryStore` is the interface every command uses (monitor, select, tune, fleet status,
report, the live rollout gate) and holds all the SQL, written once: SQLite (:class:`Store`, the
embedded default, a file in WAL mode) and PostgreSQL (:class:`edge_kit.telemetry.pg.PostgresStore`,
psycopg 3) differ only in how they connect, run a statement and spell four column types.
:func:`open_history` picks one from what the user passed: a ``postgresql://`` URL or a file path.

Tables: ``status``, ``bench``, ``telemetry``, ``live``, ``shadow`` (the message JSON plus indexed columns), ``decisions``
(what selection chose for a device and why), ``rollouts`` and ``rollout_devices`` (a pull
rollout's settings, state and owner, and each device's state in it: what lets a rollout resume
after the host restarts), ``invalid`` (payloads that failed validation, kept
for inspection, with the device their topic names), ``gaps`` (missing ``seq`` ranges per device and kind) and
``alerts`` (every alert the monitor raises about a device: raised, and cleared when its episode ends; at most one open
per device, kind and subject, so several workers raise each once) and ``alert_holders`` (which monitor workers hold an
over-budget alert open, and when each last confirmed it); ``edgekit_schema`` holds the schema's version
(:data:`SCHEMA_VERSION`). Several monitor
processes (on one host for SQLite, on several for PostgreSQL) may write one history:
``INSERT ... ON CONFLICT DO NOTHING`` on the message id keeps each record once, and a batch is
one transaction, stored whole or not at all.
"""

from __future__ import annotations

import abc
import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from edge_kit.errors import HistoryError, HistoryRecordError
from edgekit_protocol.errors import MessageError
from edgekit_protocol.labels import clip, printable
from edgekit_protocol.messages import (
    ROOT,
    field_at,
    in_range,
    message_epoch,
    parse_topic,
    telemetry_interval,
    topic,
)

KINDS = ("status", "bench", "telemetry", "live", "shadow")
TABLES = (*KINDS, "decisions", "invalid", "gaps", "rollouts", "rollout_devices", "alerts", "alert_holders", "seq_scans",
          "scan_lease", "seq_epochs")
#: The kinds numbered by ``seq`` per device (a number skipped is a record lost); a ``status`` is retained and replaced.
SEQ_KINDS = tuple(k for k in KINDS if k != "status")
#: The schema this edge-kit reads and writes, kept in the ``edgekit_schema`` table (a history without that table
#: was written before it: version 1). 2: ``decisions.kind``, ``invalid.device`` and their indexes. 3: the ``alerts``
#: table. 4: ``alerts.subject`` (one open alert per device, kind and subject), ``alerts.seen`` and ``alerts.cleared_why``,
#: and the ``alert_holders`` table. 5: the ``seq_scans`` and ``scan_lease`` tables and an index on each numbered kind's
#: ``(device, seq)``: the sequence-gap scan of several monitor workers (:meth:`HistoryStore.seq_window`). 6: the
#: ``seq_epochs`` table (each numbering a device's agent started: its spool's ``epoch``, and the one before it, so a
#: device whose numbering started again is recorded as a restart, not a gap), ``seq_scans.epoch`` (the numbering
#: the gap scan follows; a record's is in its body, so the record tables are as before), an index on
#: ``bench (device, ts)`` (each device's newest bench record found through it, never by reading the table:
#: :meth:`HistoryStore.newest_seqs`, :meth:`HistoryStore.last_heard`) and one on ``gaps (device, kind,
#: last_missing)`` (the gap a late record falls in: :meth:`HistoryStore.take_out_of_gaps`); the tables a version 5
#: edge-kit writes are as they were, so one still running reads and writes the history as before. 7: an index on
#: ``status (device, seq)`` (a last will's connection's model, read from the device's highest-numbered statuses:
#: :meth:`HistoryStore.latest_status`, which reads by receive time since); no table changed. 8: an index on
#: ``bench (device, variant, ts, seq)`` (each device's newest records of a reference variant: :meth:`HistoryStore.reference_accuracies`), its variant as its
#: MD5 on PostgreSQL (:attr:`HistoryStore.VARIANT_KEY`); no table changed.
SCHEMA_VERSION = 8
#: How long (seconds, by the database's clock) a worker's hold of the gap scan (:meth:`HistoryStore.take_scan_lease`)
#: keeps others out: a scan takes milliseconds; a worker that died holding it is passed over after this.
SCAN_LEASE_STALE_S = 30.0
#: How long (seconds) a worker that records a device's new numbering waits for the gap scan to move its marks: a scan
#: under way would otherwise write its older marks over them (:meth:`HistoryStore.add_epoch`).
EPOCH_LEASE_WAIT_S = 2.0
#: Rows of one stream (device and kind) one gap scan reads at most (:meth:`HistoryStore.seq_window`): a scan whose marks
#: lag far behind (a group that last ran long ago) reads this many of each stream past its mark, records what it judged
#: and the next scan goes on from there, so a scan's time is bounded whatever the history's size.
SCAN_ROWS = 5000
#: A device's newest bench records of an fp32 reference variant read for its models' accuracy
#: (:meth:`HistoryStore.reference_accuracies`): one a model, a few models a device.
REFERENCE_SCAN = 32
#: How long (seconds, the clock the gaps were recorded by) after a sequence gap was recorded a record of no epoch stored
#: inside it is taken as late and taken out of it (:meth:`HistoryStore.take_out_of_gaps`): a record arriving past the
#: grace (a stalled worker, a persistent session handed back after a crash) comes within minutes or hours; a number
#: inside an older gap is a device's numbering started again (re-imaged), not the record that gap missed. A record of
#: an agent that numbers in epochs is matched by its numbering instead, however late (a gap recorded since its epoch's
#: first message was received, before the next restart).
LATE_S = 86400.0
#: A device's newest statuses by receive time among which :meth:`HistoryStore.latest_status` takes the newest by the
#: device's own order (:func:`newer_status`): a status received after a newer one (a ``--share`` peer's stamp a little
#: out of order, an older connection's status handed over late, a will published when the next connection took the
#: session over) comes a few statuses late at most; an agent sends one at connect, at a switch and at a clean stop.
STATUS_ORDER_SCAN = 8
#: The kinds of alert the ``alerts`` table keeps: every alert the monitor raises about a device, each over an episode
#: (raised once, cleared when it ends).
ALERT_KINDS = ("drift", "low_disk", "silent", "over_budget", "offline", "constraints")
#: The kinds whose episode is a monitor worker's own, not the device's: each worker holds the alert open while its own
#: episode lasts (``alert_holders``), confirming it every :data:`ALERT_CONFIRM_S`; the alert clears when the last holder
#: lets go, or goes stale when none confirmed it for :data:`ALERT_STALE_S` (a worker that crashed).
HELD_KINDS = ("over_budget",)
ALERT_CONFIRM_S = 15.0
ALERT_STALE_S = 60.0
#: ``alerts.cleared_why``: its episode ended, or no worker confirmed it for :data:`ALERT_STALE_S` (closed by whoever saw
#: that: a worker that crashed held it), or the device's key was revoked (``edgekit fleet revoke``: nothing of it is
#: news any more).
CLEARED_ENDED, CLEARED_STALE, CLEARED_REVOKED = "ended", "stale", "revoked"
MAX_ALERT_DETAIL = 1000  # characters of an alert's detail kept (it may quote a device's variant name, any length)
#: The ``edgekit_schema`` row that says the ``alerts`` table holds every alert raised on this history: written when
#: the history is created, and by the first monitor that starts on a history an older edge-kit wrote (before it,
#: which alerts were raised is inferred from the stored records: :meth:`Monitor._seed_alert_states`).
ALERTS_KEPT = "alerts"
MAX_ALERT_SUBJECT = 128  # characters of an alert's subject kept (a variant name, any length: the open index holds it)
HISTORY_NAME = "edgekit-history.db"
#: A write that changes nothing: whether the history takes writes, asked without writing.
NO_OP_WRITE = "INSERT INTO status SELECT * FROM status WHERE 1 = 0"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def history_path(fleet_file: Path) -> Path:
    """Return where the history of the fleet described by ``fleet_file`` lives: ``edgekit-history.db`` beside it.

    The one rule for every command that defaults its ``--history`` and for ``edgekit demo``, so the
    history a command (or the demo) wrote is the one the next command reads.
    """
    return Path(fleet_file).resolve().parent / HISTORY_NAME


def is_postgres(spec: str | Path) -> bool:
    """Return True when ``spec`` is a PostgreSQL URL (``postgresql://`` or ``postgres://``), False for a path."""
    return isinstance(spec, str) and spec.startswith(POSTGRES_SCHEMES)


def open_history(spec: str | Path, hint: str | None = None, write: bool = True) -> HistoryStore:
    """Return the history store ``spec`` names: PostgreSQL for a ``postgresql://`` URL, else a SQLite file.
    ``hint``: what to do when the SQLite file cannot be opened (default: check the path and its permissions).
    ``write``: the caller may write; only then are missing tables created. An older schema is upgraded by a reader
    too when its user may (a file it may write, a role that owns the tables), else a reader changes nothing, so a
    PostgreSQL role with SELECT alone, or a file it may not write, can be read; a PostgreSQL database without
    edge-kit tables reads as an empty history.

    Raises:
        HistoryError: the database cannot be opened or reached, psycopg (the host extra) is missing, it is of an
            older schema its user may not upgrade (the line names why, what to run and as whom), (a writer) of a newer
            schema (the line names the edge-kit to run), or (a reader) a SQLite file holds no history.
    """
    if is_postgres(spec):
        try:
            from edge_kit.telemetry.pg import PostgresStore
        except ModuleNotFoundError as exc:
            raise HistoryError(f"a PostgreSQL history needs psycopg ({exc.name} is not installed): "
                               "pip install 'edge-kit[host]'") from None
        return PostgresStore(str(spec), write=write)
    try:
        return Store(Path(spec), write=write)
    except (sqlite3.Error, OSError) as exc:  # OSError: its folder cannot be made (a file there, no permission)
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise HistoryError(f"cannot open the history file {spec} ({why}): "
                           f"{hint or 'check the path and its permissions'}") from None


# Every ts column is this host's clock when the row was received or written, never a sender's claim.
# {real}, {int}, {blob} and {serial} are the only spellings the two databases do not share: SQLite's
# REAL is a double and its INTEGER 64 bits; PostgreSQL's REAL is four bytes (an epoch time rounded to
# minutes) and its INTEGER 32 bits (a rollout revision or a long-lived device's seq would not fit). {variant} is how
# an index holds a bench variant (:attr:`HistoryStore.VARIANT_KEY`).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS status (msg_id TEXT PRIMARY KEY, device TEXT, ts {real}, seq {int}, state TEXT, body TEXT);
CREATE TABLE IF NOT EXISTS bench (msg_id TEXT PRIMARY KEY, device TEXT, ts {real}, seq {int}, variant TEXT,
                                  sha256 TEXT, p90_ms {real}, body TEXT);
CREATE TABLE IF NOT EXISTS telemetry (msg_id TEXT PRIMARY KEY, device TEXT, ts {real}, seq {int}, body TEXT);
CREATE TABLE IF NOT EXISTS live (msg_id TEXT PRIMARY KEY, device TEXT, ts {real}, seq {int}, variant TEXT,
                                 sha256 TEXT, body TEXT);
CREATE TABLE IF NOT EXISTS shadow (msg_id TEXT PRIMARY KEY, device TEXT, ts {real}, seq {int}, variant TEXT,
                                   snr_db {real}, body TEXT);
CREATE TABLE IF NOT EXISTS decisions (id {serial}, device TEXT, ts {real}, chosen TEXT,
                                      previous TEXT, feasible INTEGER, switched INTEGER, body TEXT, kind TEXT);
CREATE TABLE IF NOT EXISTS invalid (id {serial}, ts {real}, topic TEXT, reason TEXT, payload {blob}, device TEXT);
CREATE TABLE IF NOT EXISTS gaps (device TEXT, kind TEXT, first_missing {int}, last_missing {int}, ts {real});
CREATE TABLE IF NOT EXISTS rollouts (id TEXT PRIMARY KEY, created {real}, ts {real}, state TEXT, owner TEXT,
                                     heartbeat {real}, body TEXT);
CREATE TABLE IF NOT EXISTS rollout_devices (rollout TEXT, device TEXT, wave {int}, state TEXT, revision {int},
                                            ts {real}, detail TEXT, PRIMARY KEY (rollout, device));
CREATE TABLE IF NOT EXISTS edgekit_schema (name TEXT PRIMARY KEY, version {int});
CREATE TABLE IF NOT EXISTS alerts (id {serial}, device TEXT, kind TEXT, raised_at {real}, cleared_at {real}, detail TEXT,
                                  subject TEXT NOT NULL DEFAULT '', seen {real}, cleared_why TEXT);
CREATE TABLE IF NOT EXISTS alert_holders (device TEXT, kind TEXT, subject TEXT, holder TEXT, seen {real},
                                          PRIMARY KEY (device, kind, subject, holder));
CREATE TABLE IF NOT EXISTS seq_scans (device TEXT, kind TEXT, scanned_to {int}, epoch TEXT, PRIMARY KEY (device, kind));
CREATE TABLE IF NOT EXISTS seq_epochs (device TEXT, epoch TEXT, previous TEXT, ts {real}, first_seq {int},
                                       PRIMARY KEY (device, epoch));
CREATE TABLE IF NOT EXISTS scan_lease (name TEXT PRIMARY KEY, owner TEXT, seen {real});
CREATE INDEX IF NOT EXISTS alerts_device ON alerts (device, id);
CREATE INDEX IF NOT EXISTS bench_seq ON bench (device, seq);
CREATE INDEX IF NOT EXISTS telemetry_seq ON telemetry (device, seq);
CREATE INDEX IF NOT EXISTS live_seq ON live (device, seq);
CREATE INDEX IF NOT EXISTS shadow_seq ON shadow (device, seq);
CREATE INDEX IF NOT EXISTS bench_device_sha ON bench (device, sha256, ts);
CREATE INDEX IF NOT EXISTS bench_sha ON bench (sha256, ts);
CREATE INDEX IF NOT EXISTS bench_device ON bench (device, ts);
CREATE INDEX IF NOT EXISTS gaps_seq ON gaps (device, kind, last_missing);
CREATE INDEX IF NOT EXISTS status_device ON status (device, ts);
CREATE INDEX IF NOT EXISTS telemetry_device ON telemetry (device, ts);
CREATE INDEX IF NOT EXISTS live_device ON live (device, ts);
CREATE INDEX IF NOT EXISTS shadow_device ON shadow (device, ts);
CREATE INDEX IF NOT EXISTS decisions_device ON decisions (device, id);
CREATE INDEX IF NOT EXISTS status_seq ON status (device, seq);
CREATE INDEX IF NOT EXISTS bench_variant ON bench (device, {variant}, ts, seq);
"""

#: The ``kind`` column of a decision whose body names none: a per-device selection (``tune`` without a budget).
#: The others: ``fleet selection`` (the fleet model, :data:`edge_kit.selection.fleetmodel.KIND`) and ``live gate``.
SELECTION_KIND = "selection"
BATCH_ROWS = 5000  # rows per transaction when a migration fills a new column


def newer_status(a: dict[str, Any], b: dict[str, Any], newest_epoch: str | None) -> bool | None:
    """Return whether status ``a`` is newer than status ``b`` of the same device by the device's own order, None when
    the device gives none (then receive time decides). Its agent numbers statuses (``seq``) per ``epoch`` and signs
    each connection's last will when the connection begins, under the ``connection`` all its statuses carry: the will
    (``offline``) has the lowest number of its connection and is published after all of them, a later connection's
    statuses are numbered above every status and will of an earlier one. So: of two of one connection, an ``offline``
    numbered lower is its will, the newer; of two of different connections of one epoch, the higher-numbered; of two
    epochs, the one that is ``newest_epoch`` (the device's newest, ``seq_epochs``). None where either lacks a ``seq``
    or a ``connection`` (an older agent), they carry the same number, two connections' carry no epoch (an agent
    without epochs numbers from 1 again when re-flashed), only one carries an epoch or neither epoch is the newest.
    Raises nothing."""
    epoch_a, epoch_b = message_epoch(a), message_epoch(b)
    if epoch_a != epoch_b:  # an agent without epochs before or after one with: no order
        known = None not in (epoch_a, epoch_b, newest_epoch) and newest_epoch in (epoch_a, epoch_b)
        return epoch_a == newest_epoch if known else None
    seq_a, seq_b = a.get("seq"), b.get("seq")
    conn_a, conn_b = a.get("connection"), b.get("connection")
    if not (type(seq_a) is type(seq_b) is int and isinstance(conn_a, str) and isinstance(conn_b, str)) or seq_a == seq_b:
        return None
    if conn_a != conn_b:  # without an epoch, an agent re-flashed numbers from 1 again: its numbers tell nothing
        return seq_a > seq_b if epoch_a is not None else None
    lower = a if seq_a < seq_b else b  # of one connection: a lower-numbered offline is its will, published last
    return (lower is a) == (lower.get("state") == "offline")


def topic_device(name: str) -> str | None:
    """Return the device an edge-kit topic ``name`` names (``edgekit/v1/<fleet>/<device>/<kind>``), or None when it
    is no such topic (a refused message's topic is its sender's choice)."""
    try:
        return parse_topic(name)[1]
    except MessageError:
        return None


def stored_topic_device(stored: str | None) -> str | None:
    """Return the ``invalid.device`` value of a refused message kept under topic ``stored`` (as kept: printable): the
    device the topic names, shown printable, or None when it is no edge-kit topic. The one rule for the migration that
    fills the column and for readers of rows an older edge-kit wrote without it."""
    device = topic_device(stored) if isinstance(stored, str) else None
    return None if device is None else printable(device)


def alert_subject(subject: str) -> str:
    """Return ``subject`` (what an alert is about beyond its device: a variant name, a device's text) as the ``alerts``
    table keeps it: control characters shown as ``\\xNN``, cut to :data:`MAX_ALERT_SUBJECT` characters (the unique index
    of the open alerts holds it, and a PostgreSQL index row holds at most 2,704 bytes)."""
    return clip(printable(subject), MAX_ALERT_SUBJECT)


def alerts_by_kind(keys: list[tuple[str, str, str, bool]]) -> dict[str, set[str]]:
    """Return the devices of ``keys`` (:meth:`HistoryStore.open_alert_keys`' answer) by kind of alert."""
    held: dict[str, set[str]] = {}
    for kind, device, _subject, _stale in keys:
        held.setdefault(kind, set()).add(device)
    return held


def decision_kind(decision: dict[str, Any]) -> str:
    """Return the ``kind`` column of a decision: its body's ``kind``, or :data:`SELECTION_KIND` when it names none."""
    kind = decision.get("kind")
    return kind if isinstance(kind, str) and kind else SELECTION_KIND

# One INSERT per kind of message; ON CONFLICT DO NOTHING (SQLite >= 3.24 and PostgreSQL alike) keeps
# the first row of a msg_id, so a redelivery, a spool replay or another worker's copy is dropped.
_INSERT = {
    "status": "INSERT INTO status VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
    "bench": "INSERT INTO bench VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
    "telemetry": "INSERT INTO telemetry VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
    "live": "INSERT INTO live VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
    "shadow": "INSERT INTO shadow VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
}


def message_row(kind: str, m: dict[str, Any], body: str | None, received: float) -> tuple:
    """Return the row of ``_INSERT[kind]`` for message ``m`` (``body``: its JSON as received, or None to encode it).

    Raises:
        ValueError: ``kind`` is not one the store keeps.
    """
    body = body or json.dumps(m, separators=(",", ":"))
    head = (m["msg_id"], m["device"], received, m["seq"])
    if kind == "bench":
        return (*head, m.get("variant"), m.get("sha256"), (m.get("latency_ms") or {}).get("p90"), body)
    if kind == "status":
        return (*head, m.get("state"), body)
    if kind == "telemetry":
        return (*head, body)
    if kind == "live":  # the served model (the protocol checked its variant and sha256 are text or null)
        return (*head, field_at(m, "model", "variant"), field_at(m, "model", "sha256"), body)
    if kind == "shadow":  # the shadow model, and the served outputs' worst SNR against it (a number or null)
        return (*head, field_at(m, "model", "variant"), field_at(m, "fidelity", "snr_db"), body)
    raise ValueError(f"the store keeps {', '.join(KINDS)}, not {kind!r}")


def _pieces(first: int, last: int, seqs: list[int]) -> int:
    """Return how many runs of ``first..last`` are left once ``seqs`` (inside it) are taken out."""
    runs, start = 0, first
    for seq in sorted(seqs) + [last + 1]:
        runs += seq > start
        start = seq + 1
    return runs


def _within_room(within: dict[tuple[str, str, int, int, float], set[int]], room: dict[str, int],
                 left: list[tuple[str, str, int]] | None) -> dict[tuple[str, str, int, int, float], set[int]]:
    """Return the part of ``within`` (gaps and the late seqs inside each: :meth:`HistoryStore._gaps_around`) whose
    taking out adds no more gap rows per device than ``room`` allows (lowered by the rows added; an end of a gap or
    its last number adds none), lowest seq first; each seq left out is appended to ``left`` (when given)."""
    out: dict[tuple[str, str, int, int, float], set[int]] = {}
    for gap, seqs in sorted(within.items()):
        device, kind, first, last, _ts = gap
        taken: list[int] = []
        for seq in sorted(seqs):
            added = _pieces(first, last, [*taken, seq]) - _pieces(first, last, taken)
            if added > 0 and room.get(device, 0) < added:
                if left is not None:
                    left.append((device, kind, seq))
                continue
            room[device] = room.get(device, 0) - max(added, 0)
            taken.append(seq)
        if taken:
            out[gap] = set(taken)
    return out


def _kept_kinds(kinds: tuple[str, ...]) -> None:
    """Check that the history keeps each of ``kinds`` (:data:`KINDS`); return nothing.

    Raises:
        ValueError: one it does not keep (the first named, with those it keeps).
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"the history keeps {', '.join(KINDS)}, not {unknown[0]!r}")


class HistoryStore(abc.ABC):
    """The history interface: every method here works the same on SQLite and PostgreSQL.

    A backend provides :meth:`_execute` (one statement, committed), :meth:`_rows` (a query),
    :meth:`_write_batch` (several statements in one transaction) and :meth:`close`; the SQL above is
    written with ``?`` placeholders and each backend turns them into its own. Thread-safe; open one
    per process. Every method may raise :class:`~edge_kit.errors.HistoryError` when the database
    cannot be reached or written.
    """

    #: Says which database this is in messages (a path, or a URL without its password).
    where: str
    #: The database's own clock in unix seconds, as SQL: rollout heartbeats are written and judged by it,
    #: so hosts with skewed clocks agree on whose heartbeat is stale.
    NOW_SQL: str
    #: The SQL of a stored record's ``epoch`` (in its body), ``{row}`` the table's alias: NULL without one.
    EPOCH_SQL: str
    #: The SQL type of a time column ({real} in the schema).
    _REAL: str
    #: How a query joins each row of ``b`` to the rows ``t`` of ``{table}`` that ``{on}`` takes, found through an index:
    #: one index search per row of ``b`` (a plain join here; PostgreSQL's is LATERAL).
    ROWS_JOIN = "JOIN {table} t ON {on}"
    #: How a lookup that walks an index in its order names one value ``{1}`` of its column ``{0}``: equal here;
    #: PostgreSQL's is a range of one (equal, its planner takes the column's order as given and may walk another index).
    ONE = "{0} = {1}"
    #: How an index holds a bench record's ``variant`` ``{0}`` (``bench (device, variant, ts, seq)``), and how a lookup
    #: names it to be found through that index: as it is here; PostgreSQL's is its MD5 (an index row holds at most
    #: 2,704 bytes there, and a device names its variants, any length).
    VARIANT_KEY = "{0}"

    def _newest_join(self, table: str, match: str, keep: int) -> str:
        """Return the SQL that joins each row of ``b`` to the ``keep`` newest rows ``t`` of ``table`` (by receive time,
        then ``seq``; a row without a receive time is nobody's newest) that ``match`` takes (``{0}``: the table's alias),
        found through an index on ``match``'s columns, then ``ts``: here, the rows since the receive time of the
        ``keep``-th newest (fewer: all of them), a bound searched in that index (rank them to keep ``keep``: rows of
        the same receive time may be more); PostgreSQL's is LATERAL."""
        since = (f"COALESCE((SELECT x.ts FROM {table} x WHERE {match.format('x')} AND x.ts IS NOT NULL ORDER BY x.ts DESC "
                 f"LIMIT 1 OFFSET {int(keep) - 1}), (SELECT MIN(x.ts) FROM {table} x WHERE {match.format('x')}))")
        return f"JOIN {table} t ON {match.format('t')} AND t.ts >= {since}"

    def check_writable(self, hint: str | None = None) -> None:
        """Return nothing when this history takes writes; a command that will write asks before any device work, so a
        history it cannot write stops it before a measurement, not after (its record thrown away). ``hint``: what to
        do, for the error.

        Raises:
            HistoryError: it cannot be written (a read-only file or folder, a role without the grant).
        """
        try:
            self._execute(NO_OP_WRITE)
        except HistoryError as exc:
            raise HistoryError(self._unwritable(exc, hint)) from None

    def _unwritable(self, exc: HistoryError, hint: str | None) -> str:
        """Return the one-line error for :meth:`check_writable`'s failed write ``exc``, with ``hint`` (what to do)."""
        return f"{exc}{'; ' + hint if hint else ''}"

    def _open_schema(self, write: bool) -> None:
        """Check the history's schema version first; create the tables or upgrade an older schema (:meth:`_upgrade`)
        only when it is not :data:`SCHEMA_VERSION`. A writer creates missing tables; an older schema is upgraded by
        whoever opens it, reader or writer, when this connection may (:meth:`_cannot_upgrade`): a history the previous
        edge-kit wrote reads as before. A reader of a database without edge-kit tables reads it as the backend says
        (:meth:`_no_history`). Return nothing.

        A newer schema (a newer edge-kit upgraded the history: one worker of a ``--share`` group updated before this
        one) is refused to a writer: what it writes could break the newer tables. A reader reads it: each schema so far
        only added tables, columns and indexes, so what this edge-kit reads is still there.

        Raises:
            HistoryError: the database cannot be read, or the upgrade failed; a reader: it holds no history (SQLite),
                or one of an older schema this connection may not upgrade (one line naming what to run); a writer: an
                older schema this connection may not upgrade (one line naming why, who may, and the upgrade to run;
                nothing changed), or a newer schema (one line naming both versions and the edge-kit to run instead).
        """
        version = self._schema_version()
        if version is not None and version > SCHEMA_VERSION and write:
            raise HistoryError(self._newer_schema(version))
        if version is not None and version >= SCHEMA_VERSION:
            return
        if version is None:
            if write:
                self._upgrade()
                self.keep_alerts()  # a new history: its alerts table holds every alert from the start
            else:
                self._no_history()
            return
        blocked = self._cannot_upgrade()
        if blocked is None:
            self._upgrade()
        elif write:
            raise HistoryError(self._upgrade_needed(version, *blocked))
        else:
            raise HistoryError(self._upgrade_needed(version, "this command only reads it",
                                                    "a user (or PostgreSQL role) that owns its tables"))

    def _newer_schema(self, version: int) -> str:
        """Return the one-line refusal of a writer for a history of a newer schema ``version`` (a newer edge-kit
        upgraded it): both versions, and the edge-kit to run."""
        return (f"the history {self.where} was written by a newer edge-kit (schema version {version}; this one writes "
                f"{SCHEMA_VERSION}) and this command would write to it: upgrade edge-kit on this host to the version that "
                f"wrote it (schema {version}), then run again")

    def check_schema(self) -> None:
        """Return nothing while the history's schema is not newer than this edge-kit's: a writer that opened it asks
        before each batch it writes, since a newer edge-kit may upgrade it meanwhile (another worker of a ``--share``
        group, updated first) and what this one writes could break the newer tables. One lookup of the
        ``edgekit_schema`` row.

        Raises:
            HistoryError: the history's schema is newer now (the line a writer gets at open: :meth:`_open_schema`), or
                the history cannot be read.
        """
        rows = self._rows("SELECT version FROM edgekit_schema WHERE name = ?", ("history",))
        if rows and rows[0][0] > SCHEMA_VERSION:
            raise HistoryError(self._newer_schema(rows[0][0]))

    def _no_history(self) -> None:
        """Called for a reader of a database without edge-kit tables; return nothing (the backend reads it as an empty
        history) or raise.

        Raises:
            HistoryError: it is no history (a SQLite file a reader was pointed at holds other tables, or none): one
                line naming what to run first.
        """
        raise HistoryError(f"{self.where} holds no edge-kit history yet (no tables) and this command only reads: "
                           "run `edgekit monitor` or `edgekit tune` with it as --history first")

    def _upgrade_needed(self, version: int, why: str, who: str) -> str:
        """Return the one-line error for a history of an older schema ``version`` that this command cannot upgrade:
        ``why`` it cannot, and ``who`` must run ``edgekit history upgrade`` instead."""
        return (f"the history {self.where} was written by an older edge-kit (schema version {version}; this one reads "
                f"{SCHEMA_VERSION}) and {why}: run `edgekit history upgrade --history <it>` once as {who}, then run "
                "again")

    def _schema_version(self) -> int | None:
        """Return the history's schema version: the ``edgekit_schema`` row, 1 for a history written before that
        table, None for a database without edge-kit tables. Raises HistoryError."""
        tables = self._tables()
        if "edgekit_schema" in tables:
            rows = self._rows("SELECT version FROM edgekit_schema WHERE name = ?", ("history",))
            return rows[0][0] if rows else 1
        return 1 if "status" in tables else None

    def _set_schema_version(self) -> None:
        """Record that the tables are at :data:`SCHEMA_VERSION` (after :meth:`_migrate`), never lowering a newer
        version a newer edge-kit recorded meanwhile; return nothing. Raises HistoryError."""
        self._execute("INSERT INTO edgekit_schema (name, version) VALUES (?, ?) ON CONFLICT (name) DO UPDATE "
                      "SET version = excluded.version WHERE edgekit_schema.version < excluded.version",
                      ("history", SCHEMA_VERSION))

    # --- what a backend provides ------------------------------------------------------------------

    @abc.abstractmethod
    def _tables(self) -> set[str]:
        """Return the names of the tables of the database (its current schema). Raises HistoryError."""

    @abc.abstractmethod
    def _cannot_upgrade(self) -> tuple[str, str] | None:
        """Return None when this connection may upgrade the history's older schema, else (why it may not, who may):
        the two halves of :meth:`_upgrade_needed`'s line. Changes nothing. Raises HistoryError."""

    @abc.abstractmethod
    def _upgrade(self) -> None:
        """Create the tables it lacks and :meth:`_migrate` an older schema, then :meth:`_set_schema_version`, safe
        while other processes open the same history; return nothing. Raises HistoryError."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection; return nothing. Safe to call twice."""

    @abc.abstractmethod
    def _execute(self, sql: str, args: tuple = ()) -> int:
        """Run one statement in its own transaction; return its row count. Raises HistoryError."""

    @abc.abstractmethod
    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Run one query; return all its rows. Raises HistoryError."""

    @abc.abstractmethod
    def _columns(self, table: str) -> set[str]:
        """Return the names of ``table``'s columns. Raises HistoryError."""

    @abc.abstractmethod
    def _add_column(self, table: str, column: str, sql_type: str) -> None:
        """Add ``column`` to ``table`` unless it is there (another process may add it at the same moment);
        return nothing. Raises HistoryError."""

    @abc.abstractmethod
    def _write_batch(self, statements: list[tuple[str, list[tuple]]]) -> int:
        """Run each ``(sql, rows)`` for all its rows, all in one transaction (all or nothing); return the
        summed row count. Raises HistoryRecordError when the database refused a row for what it holds, else
        HistoryError (nothing of the batch is then stored)."""

    # --- the interface ----------------------------------------------------------------------------

    def add_many(self, messages: list[tuple[str, dict[str, Any]]], raw: list[bytes] | None = None,
                 received: list[float] | None = None) -> int:
        """Store ``(kind, message)`` pairs in one transaction; return how many were new (not duplicates).

        ``raw`` may give each message's JSON as received, stored as is (saves encoding it again);
        ``received`` each message's receive time on this host (default: now). The rows' ``ts`` is
        that receive time, never the sender's own ``ts``: measurements are ordered by it and ``seq``.

        Raises:
            ValueError: a kind the store does not keep (nothing stored).
            HistoryRecordError: the database refused a row for what it holds (a value no column, index or encoding
                takes: nothing of the batch stored; stored one at a time, the others go in).
            HistoryError: the database cannot be written (nothing of the batch stored).
        """
        now = time.time()
        rows: dict[str, list[tuple]] = {}
        for i, (kind, m) in enumerate(messages):
            rows.setdefault(kind, []).append(message_row(kind, m, raw[i].decode() if raw is not None else None,
                                                         received[i] if received is not None else now))
        # Tables, and rows by msg_id, in one fixed order: two workers inserting overlapping batches
        # take their row locks in the same order and never deadlock (PostgreSQL).
        statements = []
        for kind in KINDS:
            if kind in rows:
                first: dict[str, tuple] = {}
                for row in rows[kind]:
                    first.setdefault(row[0], row)  # a msg_id twice in one batch: the first copy, as before
                statements.append((_INSERT[kind], sorted(first.values(), key=lambda r: r[0])))
        return self._write_batch(statements) if statements else 0

    def stored_ids(self, kind: str, msg_ids: list[str]) -> set[str]:
        """Return which of ``msg_ids`` the ``kind`` table (one of ``KINDS``) already holds. Raises HistoryError."""
        if kind not in KINDS:
            raise ValueError(f"the history keeps no {kind!r} messages")
        found: set[str] = set()
        for i in range(0, len(msg_ids), 500):  # bounded statements; a batch of retained statuses is small
            part = msg_ids[i:i + 500]
            found.update(r[0] for r in self._rows(f"SELECT msg_id FROM {kind} WHERE msg_id IN ({', '.join('?' * len(part))})",
                                                  tuple(part)))
        return found

    def add_each(self, messages: list[tuple[str, dict[str, Any]]], raw: list[bytes] | None = None,
                 received: list[float] | None = None, *, keep_refused: bool = True) -> tuple[int, dict[int, str]]:
        """Store ``(kind, message)`` pairs as :meth:`add_many` does, but a record the database refuses for what it
        holds (:class:`~edge_kit.errors.HistoryRecordError`) is refused alone: the batch is halved until each refused
        record stands alone and the others go in (one bad record in a batch of n costs about 2 log2(n) transactions,
        not n: a compromised device sending one a batch would otherwise hold a monitor to a transaction a record).
        With ``keep_refused``, each refused message is kept in the ``invalid`` table (its JSON, with the topic it came
        on and why), so nothing is lost; without, the caller keeps it.

        Returns:
            (how many were new, not duplicates; {index in ``messages``: why the database refused it}).

        Raises:
            ValueError: a kind the store does not keep (nothing stored).
            HistoryError: the database cannot be written (the records not stored yet are not).
        """
        refused: dict[int, str] = {}

        def store(lo: int, hi: int) -> int:
            part = slice(lo, hi)
            try:
                return self.add_many(messages[part], raw[part] if raw is not None else None,
                                     received[part] if received is not None else None)
            except HistoryRecordError as exc:
                if hi - lo == 1:
                    refused[lo] = str(exc)
                    return 0
            mid = (lo + hi) // 2
            return store(lo, mid) + store(mid, hi)

        new = store(0, len(messages)) if messages else 0
        for i, why in sorted(refused.items()) if keep_refused else ():
            kind, m = messages[i]
            payload = raw[i] if raw is not None else json.dumps(m, separators=(",", ":"), default=str).encode()
            self.add_invalid(topic(m.get("fleet", "?"), m.get("device", "?"), kind), why, payload)
        return new, refused

    def add(self, kind: str, message: dict[str, Any]) -> bool:
        """Store one message; return False when its ``msg_id`` was already there.

        Raises:
            ValueError, HistoryError: as :meth:`add_many`.
        """
        return self.add_many([(kind, message)]) == 1

    def add_invalid(self, topic: str, reason: str, payload: bytes, device: str | None = None) -> None:
        """Keep a payload that failed validation (its first 4 KiB, as received), with its topic, the reason and the
        device (``device``, else the one the topic names: :func:`topic_device`); return nothing. The topic, the
        reason and the device are stored with their control characters, a NUL and lone UTF-16 surrogates
        shown as ``\\xNN`` / ``\\uNNNN`` (:func:`~edgekit_protocol.labels.printable`): a sender chose the topic and a
        reason may quote it, and neither database takes every string (PostgreSQL refuses a NUL, both a surrogate),
        so keeping a refusal never fails on what was refused. Raises HistoryError."""
        device = topic_device(topic) if device is None else device
        self._execute("INSERT INTO invalid (ts, topic, reason, payload, device) VALUES (?, ?, ?, ?, ?)",
                      (time.time(), printable(topic), printable(reason), bytes(payload[:4096]),
                       None if device is None else printable(device)))

    def add_gap(self, device: str, kind: str, first: int, last: int, at: float | None = None) -> None:
        """Record that ``seq`` ``first..last`` of ``kind`` from ``device`` never arrived (so far), at ``at`` (unix
        seconds by the clock the caller stores receive times by, as its records' and restarts' times are: a monitor's
        :meth:`~edge_kit.telemetry.monitor.Monitor._clock`; default this host's now); return nothing.
        Raises HistoryError."""
        self._execute("INSERT INTO gaps VALUES (?, ?, ?, ?, ?)",
                      (device, kind, first, last, time.time() if at is None else at))

    def follow_seqs(self, devices: list[str]) -> None:
        """Start the gap scan's mark (``seq_scans``) of each of ``devices`` and :data:`SEQ_KINDS` that has none: the
        newest ``seq`` the history holds of it (no gap is judged below it), or -1 when it holds none (judged from the
        first record stored). A mark another worker started or moved is left as it is. Return nothing.
        Raises HistoryError."""
        newest, epochs = self.newest_seqs(SEQ_KINDS, devices), self.device_epochs(devices)
        self._write_batch([("INSERT INTO seq_scans (device, kind, scanned_to, epoch) VALUES (?, ?, ?, ?) "
                            "ON CONFLICT DO NOTHING",
                            [(d, k, newest.get((d, k), -1), epochs.get(d)) for d in sorted(devices) for k in SEQ_KINDS])])

    def device_epochs(self, devices: Iterable[str]) -> dict[str, str]:
        """Return the newest numbering of each of ``devices`` (``seq_epochs``: the ``epoch`` its agent's messages
        carry, the one first received last, :meth:`add_epoch`), ``{device: epoch}``; a device whose agent sends none
        is not in it. One query per 200 devices, each device's rows found through the table's ``(device, epoch)``
        key: never the whole table (which holds every device's every numbering). Raises HistoryError."""
        out: dict[str, str] = {}
        names = sorted(set(devices))
        for i in range(0, len(names), 200):
            part = names[i:i + 200]
            for device, epoch in self._rows(
                    f"WITH d(device) AS (VALUES {', '.join(['(?)'] * len(part))}) SELECT d.device, (SELECT e.epoch FROM "
                    "seq_epochs e WHERE e.device = d.device ORDER BY e.ts DESC, e.epoch DESC LIMIT 1) FROM d",
                    tuple(part)):
                if epoch is not None:
                    out[device] = epoch
        return out

    def add_epoch(self, device: str, epoch: str, first_seq: int, owner: str | None = None,
                  seen: float | None = None) -> tuple[bool, str | None]:
        """Record that ``device`` numbers its messages in ``epoch`` (first seen with ``first_seq``), unless the history
        knows it already; one worker of several records each once (the table's key). ``seen``: when the message that
        names it was received (its receive stamp, as stored; a ``share`` worker's is the database's clock), else now by
        the database's clock: a device's epochs are ordered by it (:meth:`device_epochs`), so a worker recording an
        epoch after a peer recorded a newer one (its batch behind the peer's: the device re-imaged twice within
        moments) records it as the older, before the next (that one's ``previous``), never as the device's newest; a
        stamp equal to a known epoch's is taken as just before it (the epoch recorded first stays the newer).

        Returns:
            ``(new, newest)``: whether this call recorded it, and the device's newest epoch now (``epoch`` itself,
            or a later one when ``epoch`` is an older numbering a late message still carries). A new epoch after
            another is a restart (:meth:`seq_restarts`), and the gap scan's marks of the device (``seq_scans``, a
            ``share`` group's) start again at 0 in it (:meth:`seq_window` reads only its rows). ``owner`` (a
            ``share`` worker's scan name) moves them holding the scan (:meth:`take_scan_lease`, waited for up to
            :data:`EPOCH_LEASE_WAIT_S`), so a scan under way cannot write its older marks over them afterwards.

        Raises:
            HistoryError: the history cannot be read or written.
        """
        known = sorted(self._rows("SELECT ts, epoch FROM seq_epochs WHERE device = ?", (device,)), reverse=True)
        if seen is not None and any(ts == seen for ts, _ in known):
            seen = math.nextafter(seen, -math.inf)
        previous = next((e for ts, e in known if seen is None or ts < seen), None)
        later = [e for ts, e in known if seen is not None and ts > seen]  # newest first
        new = self._execute(f"INSERT INTO seq_epochs (device, epoch, previous, ts, first_seq) VALUES "
                            f"(?, ?, ?, {self.NOW_SQL if seen is None else '?'}, ?) ON CONFLICT DO NOTHING",
                            (device, epoch, previous, *(() if seen is None else (seen,)), first_seq)) > 0
        if new and later:  # the one received next after it came after it, not after its own previous
            self._execute("UPDATE seq_epochs SET previous = ? WHERE device = ? AND epoch = ?",
                          (epoch, device, later[-1]))
        newest = self.device_epochs([device]).get(device)
        if new and previous is not None and newest == epoch:  # a new numbering from 1: judged from 0, its rows only
            held = owner is not None and self._wait_scan_lease(owner)
            try:
                self._execute("UPDATE seq_scans SET scanned_to = 0, epoch = ? WHERE device = ?", (epoch, device))
            finally:
                if held:
                    self._execute("UPDATE scan_lease SET owner = NULL WHERE name = 'gaps' AND owner = ?", (owner,))
        return new, newest

    def _wait_scan_lease(self, owner: str) -> bool:
        """Take the gap scan for ``owner`` (:meth:`take_scan_lease`), trying for up to :data:`EPOCH_LEASE_WAIT_S` (a
        scan holds it for milliseconds); return whether it holds it. Raises HistoryError."""
        deadline = time.monotonic() + EPOCH_LEASE_WAIT_S
        while not self.take_scan_lease(owner):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def seq_restarts(self, device: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """Return up to ``limit`` restarts of devices' numbering, newest first: ``ts`` (when its first message was
        received, :meth:`add_epoch`), ``device``, ``epoch`` (the new numbering), ``previous`` and
        ``first_seq`` (the first number of the new one the monitor saw). Raises HistoryError."""
        where, args = self._where(device, "", None)
        rows = self._rows(f"SELECT ts, device, epoch, previous, first_seq FROM seq_epochs {where}"
                          + (" AND" if where else " WHERE") + " previous IS NOT NULL ORDER BY ts DESC LIMIT ?",
                          (*args, limit))
        return [dict(zip(("ts", "device", "epoch", "previous", "first_seq"), row)) for row in rows]

    def forget_seq_scans(self) -> None:
        """Forget every gap scan mark (``seq_scans``): a monitor without ``share`` starts, and records the gaps it finds
        itself; the next ``share`` group follows each stream from where it then stands (:meth:`follow_seqs`), never
        judging again what that monitor judged. Return nothing. Raises HistoryError."""
        self._execute("DELETE FROM seq_scans")

    def take_scan_lease(self, owner: str) -> bool:
        """Make ``owner`` (a monitor worker) the one that scans for sequence gaps now, unless another holds the scan
        (taken within :data:`SCAN_LEASE_STALE_S` by the database's clock and not released); one statement, atomic on
        both databases. Return True when ``owner`` holds it. Raises HistoryError."""
        return self._execute(f"INSERT INTO scan_lease (name, owner, seen) VALUES ('gaps', ?, {self.NOW_SQL}) "
                             "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, seen = excluded.seen WHERE "
                             "scan_lease.owner IS NULL OR scan_lease.owner = excluded.owner OR "
                             f"scan_lease.seen < {self.NOW_SQL} - ?", (owner, SCAN_LEASE_STALE_S)) > 0

    def seq_window(self, limit: int = SCAN_ROWS) -> list[tuple[str, str, int | None, float | None, int, str | None]]:
        """Return, for every device and kind the gap scan follows (``seq_scans``), the rows the history holds past its
        mark, of the numbering it follows when the device's agent numbers in epochs (:meth:`add_epoch`), among the
        ``limit`` lowest numbers of each stream at most (a stream with more is judged up to the last read, and the next
        scan goes on from there: :func:`~edge_kit.telemetry.monitor.share_gaps`): ``(kind, device, seq, receive time,
        mark, body)``, ``body`` a telemetry row's JSON (its ``seqs`` claim the device's newest numbers), None for the
        others; for each device with telemetry past its mark, the marks of its other kinds as ``(kind, device, None,
        None, mark, None)`` (its telemetry may claim numbers past them); and for a stream followed in an epoch whose
        read was cut at ``limit`` rows (rows of older numberings among them), ``(kind, device, cut, None, mark, None)``:
        it is judged no further than ``cut``. One query, each kind read through its ``(device, seq)`` index from the mark
        on, ``limit`` index entries of a stream at most, whatever the history's size (or the older numberings' rows
        above the mark after a restart: they count towards the bound, so they are read ``limit`` at a time). Raises
        HistoryError."""
        news = ("EXISTS (SELECT 1 FROM telemetry r WHERE r.device = m.device AND r.seq > (SELECT t.scanned_to FROM "
                "seq_scans t WHERE t.device = m.device AND t.kind = 'telemetry'))")  # through the (device, seq) index
        top = 2 ** 63 - 1  # no limit-th number past the mark: every row past it
        # a numbering started again: its rows only (a record's epoch is in its body: read only for rows within the cut)
        same = self._same_numbering("r", "m")

        def cut(kind: str) -> str:  # the limit-th number past the mark, of any numbering: index entries only
            return (f"COALESCE((SELECT x.seq FROM {kind} x WHERE x.device = m.device AND x.seq > m.scanned_to "
                    f"ORDER BY x.seq LIMIT 1 OFFSET {int(limit) - 1}), {top})")

        def stream(kind: str) -> str:
            return (f"SELECT '{kind}', r.device, r.seq, r.ts, m.scanned_to, "
                    f"{'r.body' if kind == 'telemetry' else 'CAST(NULL AS TEXT)'} FROM seq_scans m JOIN {kind} r "
                    f"ON r.device = m.device AND r.seq > m.scanned_to AND r.seq <= {cut(kind)} AND {same} "
                    f"WHERE m.kind = '{kind}'")

        def stops(kind: str) -> str:  # in an epoch, the rows read may be fewer than limit: say where the read stopped
            return (f"SELECT '{kind}', m.device, {cut(kind)}, NULL, m.scanned_to, NULL FROM seq_scans m "
                    f"WHERE m.kind = '{kind}' AND m.epoch IS NOT NULL AND {cut(kind)} < {top}")

        if limit < 1:
            raise ValueError(f"a gap scan reads 1 row of a stream or more, not {limit}")
        return self._rows(" UNION ALL ".join(
            [stream(kind) for kind in SEQ_KINDS] + [stops(kind) for kind in SEQ_KINDS]
            + [f"SELECT m.kind, m.device, NULL, NULL, m.scanned_to, NULL FROM seq_scans m WHERE m.kind <> 'telemetry' "
               f"AND {news}"]))

    def record_scan(self, owner: str, marks: list[tuple[str, str, int]], gaps: list[tuple[str, str, int, int]]) -> bool:
        """Record what ``owner``'s gap scan found, in one transaction, only while it holds the scan
        (:meth:`take_scan_lease`), and let go of it: each ``(device, kind, seq)`` of ``marks`` as where the scan of that
        stream stands now, each ``(device, kind, first, last)`` of ``gaps`` as a sequence gap (:meth:`add_gap`).

        Returns:
            True when they were recorded; False when another worker took the scan meanwhile (this one held it past
            :data:`SCAN_LEASE_STALE_S`): nothing was, so no gap is recorded twice.

        Raises:
            HistoryError: the history cannot be written (nothing recorded).
        """
        held = "EXISTS (SELECT 1 FROM scan_lease WHERE name = 'gaps' AND owner = ?)"
        return self._write_batch([(sql, rows) for sql, rows in [
            # first: on PostgreSQL this locks the lease row until the commit, so nobody takes it meanwhile
            (f"UPDATE scan_lease SET seen = {self.NOW_SQL} WHERE name = 'gaps' AND owner = ?", [(owner,)]),
            (f"UPDATE seq_scans SET scanned_to = ? WHERE device = ? AND kind = ? AND {held}",
             [(seq, device, kind, owner) for device, kind, seq in marks]),
            # recorded by the database's clock, as a restart is (seq_epochs): which of the two came first holds whatever
            # the scanning worker's host clock says
            (f"INSERT INTO gaps (device, kind, first_missing, last_missing, ts) SELECT ?, ?, ?, ?, {self.NOW_SQL} "
             f"WHERE {held}", [(device, kind, first, last, owner) for device, kind, first, last in gaps]),
            ("UPDATE scan_lease SET owner = NULL WHERE name = 'gaps' AND owner = ?", [(owner,)]),
        ] if rows]) > 0

    def _same_numbering(self, row: str, scan: str) -> str:
        """Return the SQL condition that record ``row`` is of the numbering gap scan mark ``scan`` (a ``seq_scans``
        row) follows: any when it follows none; else one carrying its epoch, or one carrying none (an agent downgraded
        to a version without epochs numbers on) received since that epoch was recorded (``seq_epochs``: both by the
        database's clock with ``share``), not one of before it (the agent before it sent epochs)."""
        epoch = self.EPOCH_SQL.format(row=row)
        return (f"({scan}.epoch IS NULL OR {epoch} = {scan}.epoch OR ({epoch} IS NULL AND {row}.ts >= (SELECT e.ts FROM "
                f"seq_epochs e WHERE e.device = {scan}.device AND e.epoch = {scan}.epoch)))")

    def stored_in(self, gaps: list[tuple[str, str, int, int]]) -> list[tuple[str, str, int, str | None]]:
        """Return the ``(device, kind, seq, epoch)`` of the records the history holds inside ``gaps`` (``(device, kind,
        first, last)`` each, of :data:`SEQ_KINDS`, just recorded by the gap scan) in the numbering the scan follows
        (``seq_scans.epoch``, :meth:`_same_numbering`; any when it follows none): those stored while the scan that recorded them judged (a record
        late past the grace, committed by another worker meanwhile); a record of an older numbering with a number inside
        is not one of them. One indexed query a gap. Raises HistoryError."""
        found: list[tuple[str, str, int, str | None]] = []
        epoch = self.EPOCH_SQL.format(row="r")
        for device, kind, first, last in gaps:
            _kept_kinds((kind,))
            found += [(device, kind, int(seq), tag) for seq, tag in self._rows(
                f"SELECT DISTINCT r.seq, {epoch} FROM {kind} r LEFT JOIN seq_scans m ON m.device = r.device AND "
                f"m.kind = ? WHERE r.device = ? AND r.seq >= ? AND r.seq <= ? AND {self._same_numbering('r', 'm')} "
                "ORDER BY r.seq", (kind, device, first, last))]
        return found

    def take_out_of_gaps(self, records: list[tuple[str, str, int] | tuple[str, str, int, str | None]],
                         room: dict[str, int] | None = None, left: list[tuple[str, str, int]] | None = None,
                         now: float | None = None) -> int:
        """Take each ``(device, kind, seq)`` or ``(device, kind, seq, epoch)`` of ``records`` (stored; ``epoch`` the
        numbering the record carries, None for none) out of the sequence gap recorded around it in the same numbering,
        if any: the gap shrinks, or splits in two, or goes (its ``ts`` kept), so the history never says a record is both
        stored and lost. Which gap is the one the record missed: for a record of an epoch (``seq_epochs``: a restart,
        or the device's first), one recorded since that epoch's first message was received, however old (a gap before
        a first epoch is of the numbering before it, of no epoch: a device re-imaged from an agent without epochs
        numbers from 1 again in its first); for one of no epoch, one recorded within :data:`LATE_S` before ``now``
        (by the clock the gaps were recorded by, :meth:`add_gap`; default this host's now): an agent without epochs
        cannot say its numbering started again, so a number inside an older gap is taken as a re-imaged device's, and
        that gap stays; and in all cases one recorded before the
        device's next restart, if any (a record of a new numbering never leaves a gap of the old one, nor a late record
        of the old numbering a gap of the new). A record of an epoch the history does not know yet, of a device it knows
        epochs of, is a new numbering: no gap recorded is its. Safe while other workers do the same: each gap row is
        locked, and its pieces written only while it is still there; a gap another worker split meanwhile is looked up
        again. One indexed query (through ``gaps (device, kind, last_missing)``) per 300 records, and a transaction
        only when a record is in a gap.

        ``room``: per device, how many gap rows its records may still add by splitting a gap (one inside a gap, at
        neither end, splits it in two: a row more), lowered by what they add; a device missing from it may add none.
        A record whose split would go past its device's room is left in its gap (the history then says it is both stored
        and lost), appended to ``left`` as ``(device, kind, seq)``: a device sending every other number of a long gap
        late adds a row a record otherwise. None (the default): no bound.

        Returns:
            How many of ``records`` were taken out of a gap (a late record).

        Raises:
            HistoryError: the history cannot be read or written.
        """
        taken = 0
        tagged = [(r[0], r[1], r[2], r[3] if len(r) > 3 else None) for r in records]
        for i in range(0, len(tagged), 300):
            part = sorted(set(tagged[i:i + 300]), key=lambda r: (r[0], r[1], r[2], r[3] or ""))
            for _attempt in range(5):  # a gap split by another worker meanwhile is found again as its pieces
                within = self._gaps_around(part, (time.time() if now is None else now) - LATE_S)
                if not within:
                    break
                if room is not None and _attempt == 0:
                    within = _within_room(within, room, left)
                    kept = {(d, k, s) for (d, k, *_g), seqs in within.items() for s in seqs}
                    part = [r for r in part if (r[0], r[1], r[2]) in kept]
                    if not within:
                        break
                pieces, rows = [], []
                for (device, kind, first, last, ts), seqs in sorted(within.items()):
                    rows.append((device, kind, first, last))
                    start = first
                    for seq in sorted(seqs) + [last + 1]:
                        if seq > start:
                            pieces.append((device, kind, start, seq - 1, ts, device, kind, first, last))
                        start = seq + 1
                    if _attempt == 0:
                        taken += len(seqs)
                self._write_batch([
                    ("UPDATE gaps SET ts = ts WHERE device = ? AND kind = ? AND first_missing = ? AND last_missing = ?",
                     rows),  # locks the row (PostgreSQL) until the commit: another worker's split waits
                    ("INSERT INTO gaps (device, kind, first_missing, last_missing, ts) SELECT ?, ?, ?, ?, ? WHERE EXISTS "
                     "(SELECT 1 FROM gaps WHERE device = ? AND kind = ? AND first_missing = ? AND last_missing = ?)",
                     pieces),
                    ("DELETE FROM gaps WHERE device = ? AND kind = ? AND first_missing = ? AND last_missing = ?", rows)])
        return taken

    def _gaps_around(self, records: list[tuple[str, str, int, str | None]],
                     since: float) -> dict[tuple[str, str, int, int, float], set[int]]:
        """Return the gaps ``(device, kind, first, last, ts)`` holding any of ``records`` (``(device, kind, seq,
        epoch)``) in its numbering (:meth:`take_out_of_gaps`: recorded since the record's epoch was first received
        (a restart, or the device's first epoch), or at or after ``since``, unix seconds, for a record of no epoch;
        before the device's next restart), each with the seqs of them it holds. Raises HistoryError."""
        if not records:
            return {}
        out: dict[tuple[str, str, int, int, float], set[int]] = {}
        for device, kind, first, last, ts, seq in self._rows(self._gaps_around_sql(len(records)),
                                                             (*(v for r in records for v in r), since)):
            out.setdefault((device, kind, first, last, ts), set()).add(seq)
        return out

    #: How :meth:`_gaps_around`' query reaches each record's gaps ``g`` (``{since}``: the earliest ``ts`` a gap of its
    #: numbering may have): a join SQLite's planner looks up through ``gaps (device, kind, last_missing)`` record by
    #: record; PostgreSQL's override forces that lookup.
    GAPS_AROUND_JOIN = ("JOIN gaps g ON g.device = b.device AND g.kind = b.kind AND g.last_missing >= b.seq AND "
                        "g.first_missing <= b.seq AND g.ts >= {since}")

    @classmethod
    def _gaps_around_sql(cls, records: int) -> str:
        """Return :meth:`_gaps_around`' query for ``records`` ``(device, kind, seq, epoch)`` quadruples (then the time
        since, for records of no epoch) as arguments: each record's gaps of its own numbering (recorded since the
        first message of its epoch was received, and before the device's next epoch by receive time: not the one whose
        ``previous`` names it, which two workers recording epochs at once may both have set to the same)."""
        values = ", ".join(["(?, ?, ?, CAST(? AS TEXT))"] * records)
        since = "(CASE WHEN e.epoch IS NOT NULL THEN e.ts ELSE ? END)"
        return (f"WITH b(device, kind, seq, epoch) AS (VALUES {values}) SELECT DISTINCT g.device, g.kind, "
                "g.first_missing, g.last_missing, g.ts, b.seq FROM b LEFT JOIN seq_epochs e ON e.device = b.device AND "
                f"e.epoch = b.epoch {cls.GAPS_AROUND_JOIN.format(since=since)} "
                "WHERE (b.epoch IS NULL OR e.epoch IS NOT NULL OR NOT EXISTS (SELECT 1 FROM seq_epochs o "
                "WHERE o.device = b.device)) "
                "AND NOT EXISTS (SELECT 1 FROM seq_epochs n WHERE n.device = b.device AND n.ts > e.ts "
                "AND n.ts <= g.ts)")

    def open_alert(self, device: str, kind: str, detail: str, at: float | None = None, subject: str = "") -> bool:
        """Record that alert ``kind`` (one of :data:`ALERT_KINDS`) of ``device`` about ``subject`` (a constraints alert's
        variant; ``""`` for the other kinds) was raised at ``at`` (this host's clock; default now), saying ``detail``
        (cut to :data:`MAX_ALERT_DETAIL` characters, its control characters shown as ``\\xNN``: it may quote a device's
        text), unless that alert is open already: one open alert per device, kind and subject (a unique index), so of
        several monitor workers raising it at once one opens it. Its ``seen`` (last confirmed) is now, by the
        database's clock.

        Returns:
            True when this call opened it; False when it was open already (another worker, or a monitor before a
            restart, raised it).

        Raises:
            ValueError: a kind the table does not keep.
            HistoryError: the history cannot be written.
        """
        if kind not in ALERT_KINDS:
            raise ValueError(f"the history keeps alerts of kind {', '.join(ALERT_KINDS)}, not {kind!r}")
        return self._execute("INSERT INTO alerts (device, kind, raised_at, cleared_at, detail, subject, seen) "
                             f"VALUES (?, ?, ?, NULL, ?, ?, {self.NOW_SQL}) ON CONFLICT DO NOTHING",
                             (printable(device), kind, time.time() if at is None else at,
                              printable(clip(detail, MAX_ALERT_DETAIL)), alert_subject(subject))) == 1

    def close_alert(self, device: str, kind: str, at: float | None = None, subject: str = "",
                    why: str = CLEARED_ENDED) -> bool:
        """Record that the open alert ``kind`` of ``device`` about ``subject`` cleared at ``at`` (this host's clock;
        default now), ``why``: its episode ended (:data:`CLEARED_ENDED`), or nobody holds it (:data:`CLEARED_STALE`).

        Returns:
            True when an open alert was closed; False when none was open (another worker closed it).

        Raises:
            HistoryError: the history cannot be written.
        """
        return self._execute("UPDATE alerts SET cleared_at = ?, cleared_why = ? WHERE device = ? AND kind = ? AND "
                             "subject = ? AND cleared_at IS NULL",
                             (time.time() if at is None else at, why, printable(device), kind,
                              alert_subject(subject))) > 0

    def hold_alert(self, device: str, kind: str, holder: str, detail: str, at: float | None = None) -> bool:
        """Record that monitor worker ``holder`` holds alert ``kind`` (one of :data:`HELD_KINDS`) of ``device`` open:
        its own episode began at ``at`` (this host's clock; default now). The holder is written first (so a peer letting
        go meanwhile leaves the alert open), then an open alert of the device and kind that no worker confirmed for
        :data:`ALERT_STALE_S` is closed as stale (:meth:`close_stale_alerts`: a worker that crashed held it), then the
        alert is opened (:meth:`open_alert`) or, open already (a peer's episode), confirmed.

        Returns:
            True when this call opened it (the caller raises it); False when a peer holds it open.

        Raises:
            ValueError: a kind no worker holds.
            HistoryError: the history cannot be written.
        """
        if kind not in HELD_KINDS:
            raise ValueError(f"monitor workers hold alerts of kind {', '.join(HELD_KINDS)}, not {kind!r}")
        self._confirm_holder(device, kind, holder)
        self.close_stale_alerts(device, kind)
        if self.open_alert(device, kind, detail, at):
            return True
        self._execute(f"UPDATE alerts SET seen = {self.NOW_SQL} WHERE device = ? AND kind = ? AND subject = '' "
                      "AND cleared_at IS NULL", (printable(device), kind))
        return False

    def confirm_alert(self, device: str, kind: str, holder: str) -> bool:
        """Record that ``holder`` still holds alert ``kind`` of ``device`` (its episode goes on): the holder's and the
        alert's ``seen`` become now, by the database's clock. A worker calls it every :data:`ALERT_CONFIRM_S` at most,
        never a record.

        Returns:
            True when the alert is open; False when it was closed meanwhile (as stale: the caller holds it again).

        Raises:
            HistoryError: the history cannot be written.
        """
        self._confirm_holder(device, kind, holder)
        return self._execute(f"UPDATE alerts SET seen = {self.NOW_SQL} WHERE device = ? AND kind = ? AND subject = '' "
                             "AND cleared_at IS NULL", (printable(device), kind)) > 0

    def _confirm_holder(self, device: str, kind: str, holder: str) -> None:
        """Write ``holder``'s row of alert ``kind`` of ``device`` with ``seen`` now (the database's clock); return
        nothing. Raises HistoryError."""
        self._execute(f"INSERT INTO alert_holders (device, kind, subject, holder, seen) VALUES (?, ?, '', ?, {self.NOW_SQL}) "
                      "ON CONFLICT (device, kind, subject, holder) DO UPDATE SET seen = excluded.seen",
                      (printable(device), kind, holder))

    def release_alert(self, device: str, kind: str, holder: str, at: float | None = None) -> bool:
        """Record that ``holder``'s episode of alert ``kind`` of ``device`` ended at ``at`` (this host's clock; default
        now): its holder row goes, and the alert clears (:data:`CLEARED_ENDED`) unless another worker holds it
        (confirmed within :data:`ALERT_STALE_S`).

        Returns:
            True when this call closed the alert; False when a peer still holds it, or it was not open.

        Raises:
            HistoryError: the history cannot be written.
        """
        key = (printable(device), kind)
        self._execute("DELETE FROM alert_holders WHERE device = ? AND kind = ? AND subject = '' AND holder = ?",
                      (*key, holder))
        return self._execute(
            "UPDATE alerts SET cleared_at = ?, cleared_why = ? WHERE device = ? AND kind = ? AND subject = '' AND "
            "cleared_at IS NULL AND NOT EXISTS (SELECT 1 FROM alert_holders h WHERE h.device = alerts.device AND "
            f"h.kind = alerts.kind AND h.subject = alerts.subject AND h.seen >= {self.NOW_SQL} - ?)",
            (time.time() if at is None else at, CLEARED_ENDED, *key, ALERT_STALE_S)) > 0

    def held_by(self, holder: str) -> list[tuple[str, str]]:
        """Return the ``(device, kind)`` of the alerts ``holder`` holds (a worker started again under the same name
        finds what it held before it crashed). Raises HistoryError."""
        return [(d, k) for d, k in self._rows("SELECT device, kind FROM alert_holders WHERE holder = ? ORDER BY 1, 2",
                                              (holder,))]

    def forget_holders(self, kinds: tuple[str, ...]) -> None:
        """Forget every worker's hold of the alerts of ``kinds`` (a monitor without ``share`` that starts is the only
        worker: nobody's episode is under way); return nothing. Raises HistoryError."""
        self._execute(f"DELETE FROM alert_holders WHERE kind IN ({', '.join('?' * len(kinds))})", tuple(kinds))

    def close_device_alerts(self, device: str, why: str, at: float | None = None) -> int:
        """Close every open alert of ``device`` (at ``at``, this host's clock; default now) with ``cleared_why`` ``why``
        (:data:`CLEARED_REVOKED`: its key was revoked), and forget who held them; return how many were closed.
        Raises HistoryError."""
        self._execute("DELETE FROM alert_holders WHERE device = ?", (printable(device),))
        return self._execute("UPDATE alerts SET cleared_at = ?, cleared_why = ? WHERE device = ? AND cleared_at IS NULL",
                             (time.time() if at is None else at, why, printable(device)))

    def close_stale_alerts(self, device: str | None = None, kind: str | None = None, at: float | None = None) -> int:
        """Close (at ``at``, this host's clock; default now) the open alerts of :data:`HELD_KINDS` (of ``device`` and
        ``kind`` when given) that no worker confirmed for :data:`ALERT_STALE_S` by the database's clock, or ever (one
        an older edge-kit opened), with ``cleared_why`` :data:`CLEARED_STALE`, and forget holders as stale; return how
        many alerts were closed. Raises HistoryError."""
        held = ", ".join("?" * len(HELD_KINDS))
        where, args = f"kind IN ({held})", tuple(HELD_KINDS)
        for column, value in (("device", device), ("kind", kind)):
            if value is not None:
                where += f" AND {column} = ?"
                args = (*args, printable(value))
        self._execute(f"DELETE FROM alert_holders WHERE {where} AND seen < {self.NOW_SQL} - ?", (*args, ALERT_STALE_S))
        return self._execute(f"UPDATE alerts SET cleared_at = ?, cleared_why = ? WHERE {where} AND cleared_at IS NULL "
                             f"AND (seen IS NULL OR seen < {self.NOW_SQL} - ?)",
                             (time.time() if at is None else at, CLEARED_STALE, *args, ALERT_STALE_S))

    def open_alert_keys(self) -> list[tuple[str, str, str, bool]]:
        """Return ``(kind, device, subject, stale)`` of every open alert; ``stale``: of :data:`HELD_KINDS`, and no worker
        confirmed it for :data:`ALERT_STALE_S` (:meth:`close_stale_alerts` closes it). One query. Raises HistoryError."""
        held = ", ".join("?" * len(HELD_KINDS))
        return [(k, d, sub, bool(stale)) for k, d, sub, stale in self._rows(
            f"SELECT kind, device, subject, CASE WHEN kind IN ({held}) AND (seen IS NULL OR seen < {self.NOW_SQL} - ?) "
            "THEN 1 ELSE 0 END FROM alerts WHERE cleared_at IS NULL", (*HELD_KINDS, ALERT_STALE_S))]

    def open_alerts(self) -> dict[str, set[str]]:
        """Return the devices whose alert holds (raised, not cleared), by kind of alert. Raises HistoryError."""
        return alerts_by_kind(self.open_alert_keys())

    def alerts_kept(self) -> bool:
        """Return True when the ``alerts`` table holds every alert raised on this history (:data:`ALERTS_KEPT`);
        False for a history an older edge-kit wrote that no monitor of this one has started on yet.
        Raises HistoryError."""
        return bool(self._rows("SELECT 1 FROM edgekit_schema WHERE name = ?", (ALERTS_KEPT,)))

    def keep_alerts(self) -> None:
        """Record that the ``alerts`` table holds every alert raised on this history from now on
        (:data:`ALERTS_KEPT`); return nothing. Raises HistoryError."""
        self._execute("INSERT INTO edgekit_schema (name, version) VALUES (?, 1) ON CONFLICT (name) DO NOTHING",
                      (ALERTS_KEPT,))

    def alerts(self, device: str | None = None, since: float | None = None, until: float | None = None,
               holds: bool | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """Return up to ``limit`` rows of the ``alerts`` table, newest raised first: ``device``, ``kind``,
        ``subject`` (a constraints alert's variant, else ``""``), ``raised_at`` and ``cleared_at`` (this host's clock;
        ``cleared_at`` None while it holds), ``cleared_why`` (:data:`CLEARED_ENDED`, :data:`CLEARED_STALE`, or None: it
        holds, or an older edge-kit cleared it) and ``detail`` (as kept: cut, control characters shown as ``\\xNN``).
        ``device``, ``since`` and ``until`` (unix seconds, inclusive, of ``raised_at``) and ``holds`` (True: only those
        that hold; False: only those cleared) narrow them; those that hold are read through the open alerts' index
        (a monitor's start reads them), never every alert raised. Raises HistoryError."""
        where, args = self._window(device, since, until, "raised_at")
        if holds is not None:
            where += (" AND" if where else "WHERE") + f" cleared_at IS {'' if holds else 'NOT '}NULL"
        if holds:  # found through the open alerts' index: walking the ids down read every alert ever raised
            where += " AND id IN (SELECT o.id FROM alerts o WHERE o.cleared_at IS NULL)"
        names = ("device", "kind", "subject", "raised_at", "cleared_at", "cleared_why", "detail")
        return self._newest(", ".join(names), "alerts", where, args, limit, lambda r: dict(zip(names, r)))

    def add_decision(self, decision: dict[str, Any]) -> None:
        """Record a selection decision (a dict with ``device``, ``chosen``, ``current``, ``feasible``, ``switch``);
        return nothing.

        Raises:
            HistoryRecordError: the database refused it for what it holds (a NUL or a lone surrogate in a name it
                quotes): nothing stored; the caller refuses that device's decision alone.
            HistoryError: the database cannot be written.
        """
        self._write_batch([("INSERT INTO decisions (device, ts, chosen, previous, feasible, switched, body, kind) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            [(decision["device"], time.time(), decision.get("chosen"), decision.get("current"),
                              int(bool(decision.get("feasible"))), int(bool(decision.get("switch"))),
                              json.dumps(decision, default=str), decision_kind(decision))])])

    def refused_messages(self, device: str | None = None, since: float | None = None, until: float | None = None,
                         limit: int = 20) -> list[dict[str, Any]]:
        """Return up to ``limit`` rows of the ``invalid`` table (what the monitor, tune or a deploy refused), newest
        first: ``ts`` (this host's clock when it was refused), ``device`` (as its topic names it; None when it names
        none), ``topic``, ``reason``, ``bytes`` (of the payload kept) and ``payload`` (as kept, its bytes that are
        no UTF-8 shown as ``\\xNN``). ``device``, ``since`` and ``until`` (unix seconds, inclusive) narrow them.

        A row an older edge-kit wrote after the upgrade has no ``device`` (it knew no such column): it is read as the
        device its topic names (:func:`stored_topic_device`, as the upgrade fills older rows), for the filter too.
        Raises HistoryError."""
        where, args = self._window(None, since, until)
        if device:  # the column, or a row without one whose topic may name the device (checked exactly below)
            pattern = ROOT + "/%/" + "".join("!" + c if c in "!%_" else c for c in device) + "/%"
            where += (" AND" if where else "WHERE") + " (device = ? OR (device IS NULL AND topic LIKE ? ESCAPE '!'))"
            args = (*args, device, pattern)

        def kept(row: tuple) -> dict[str, Any] | None:
            ts, dev, t, why, p = row
            dev = stored_topic_device(t) if dev is None else dev
            if device and dev != device:
                return None
            return {"ts": ts, "device": dev, "topic": t, "reason": why, "bytes": len(p or b""),
                    "payload": bytes(p or b"").decode("utf-8", "backslashreplace")}

        return self._newest("ts, device, topic, reason, payload", "invalid", where, args, limit, kept)

    def _newest(self, columns: str, table: str, where: str, args: tuple, limit: int,
                keep: Callable[[tuple], Any]) -> list[Any]:
        """Return up to ``limit`` of ``keep(row)`` for the rows of ``table`` that ``where`` takes, newest (largest
        ``id``) first, leaving out the rows ``keep`` returns None for: the query takes a few rows more than wanted
        (a row an older edge-kit wrote without a column, whose body or topic is checked here), so it pages down the
        ids until ``limit`` are kept or none are left. Raises HistoryError."""
        found: list[Any] = []
        before = None
        while len(found) < limit:
            page = self._rows(f"SELECT id, {columns} FROM {table} {where}"
                              + ("" if before is None else (" AND" if where else " WHERE") + " id < ?")
                              + " ORDER BY id DESC LIMIT ?", (*args, *(() if before is None else (before,)), limit))
            found.extend(v for v in (keep(row[1:]) for row in page) if v is not None)
            if len(page) < limit:
                break
            before = page[-1][0]
        return found[:limit]

    def sequence_gaps(self, device: str | None = None, since: float | None = None, until: float | None = None,
                      limit: int = 20) -> list[dict[str, Any]]:
        """Return up to ``limit`` rows of the ``gaps`` table, newest first: ``ts`` (when it was recorded, this host's
        clock), ``device``, ``kind`` and the ``first_missing`` .. ``last_missing`` ``seq`` numbers that never arrived,
        with how many (``missing``). ``device``, ``since`` and ``until`` (unix seconds, inclusive) narrow them.
        Raises HistoryError."""
        where, args = self._window(device, since, until)
        rows = self._rows(f"SELECT ts, device, kind, first_missing, last_missing FROM gaps {where} "
                          "ORDER BY ts DESC LIMIT ?", (*args, limit))
        return [{"ts": ts, "device": dev, "kind": kind, "first_missing": lo, "last_missing": hi, "missing": hi - lo + 1}
                for ts, dev, kind, lo, hi in rows]

    def _window(self, device: str | None, since: float | None, until: float | None,
                column: str = "ts") -> tuple[str, tuple]:
        """Return the WHERE clause (or "") and its arguments for rows of ``device`` (None: any) whose ``column`` (a
        time) is within ``since`` .. ``until`` (None: unbounded)."""
        where, args = self._where(device, "", None)
        for bound, op in ((since, ">="), (until, "<=")):
            if bound is not None:
                where += (" AND" if where else "WHERE") + f" {column} {op} ?"
                args = (*args, bound)
        return where, args

    def count(self, table: str) -> int:
        """Return the number of rows in ``table``.

        Raises:
            ValueError: not a table of the history.
            HistoryError: the database cannot be read.
        """
        if table not in TABLES:
            raise ValueError(table)
        rows = self._rows(f"SELECT COUNT(*) FROM {table}")
        return rows[0][0] if rows else 0  # no row: a database without tables, read as an empty history

    def knows_device(self, device: str) -> bool:
        """Return whether any table of the history holds a row of ``device``: a record, a decision, a refused message
        its topic names, a sequence gap, an alert or a rollout's entry (a table an older schema lacks, or that lacks
        its ``device`` column, holds none). Raises HistoryError."""
        return any("device" in self._columns(table)
                   and self._rows(f"SELECT 1 FROM {table} WHERE device = ? LIMIT 1", (device,))
                   for table in TABLES if table not in ("rollouts", "seq_scans"))  # seq_scans: the fleet file's

    def devices(self) -> set[str]:
        """Return the name of every device a table of the history holds a row of: a record, a decision, a sequence gap,
        an alert or a rollout's entry (not a refused message: what its topic names is anyone's word; a table an older
        schema lacks, or that lacks its ``device`` column, holds none). Each table indexed by device first is read by a
        skip scan (:meth:`_each_device`), one index lookup per device, not every entry. Raises HistoryError."""
        def names(table: str) -> str:  # rollout_devices is indexed by rollout first: a skip scan would read it whole
            return (f"SELECT DISTINCT device FROM {table}" if table == "rollout_devices" else
                    f"WITH RECURSIVE {self._each_device(table)} SELECT device FROM d WHERE device IS NOT NULL")

        return {name for table in TABLES if table not in ("rollouts", "invalid") and "device" in self._columns(table)
                for (name,) in self._rows(names(table)) if isinstance(name, str)}

    def latest_bench(self, device: str | None = None) -> dict[tuple[str, str], dict[str, Any]]:
        """Return the newest bench record per ``(device, sha256)`` (of one device, or all). Raises HistoryError."""
        return {key: records[0] for key, records in self.recent_bench(device, keep=1).items()}

    def recent_bench(self, device: str | None = None, keep: int = 5,
                     sha256s: tuple[str, ...] | None = None) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """Return up to ``keep`` bench records per ``(device, sha256)`` (of one device, or all; of the
        artifacts whose sha256 is in ``sha256s``, or of any), newest first. The artifacts are chosen in
        the query (indexed): records of other builds are never ranked or read. Of any artifact, each device and
        artifact is found by a skip scan of ``bench (device, sha256, ts)``, and only its ``keep`` newest records (by
        receive time, then ``seq``) are ranked: the work grows with the devices and artifacts, not with how often each
        was measured. Raises HistoryError."""
        if sha256s is not None:
            where, args = self._where(device, "sha256", sha256s)
            sql = ("SELECT body FROM (SELECT body, ts, seq, ROW_NUMBER() OVER (PARTITION BY device, sha256 ORDER BY ts "
                   f"DESC, seq DESC) AS n FROM bench {where}) AS ranked WHERE n <= ? ORDER BY ts DESC, seq DESC")
            args = (*args, keep)
        else:  # p: each (device, sha256) found from the one before it in bench (device, sha256, ts), from ('', ''):
            # the device's next sha256, else the next device's first; one index search each
            # each device (and artifact) named as ONE says, ordered by the index's columns: with x.device = ...,
            # PostgreSQL took its order as given and walked bench (sha256, ts), reading every device's records of it
            mine = "" if device is None else " AND p.device = ?"
            dev = self.ONE.format("x.device", "{0}")
            sha = self.ONE.format("x.sha256", "p.sha")
            same = (f"(SELECT x.sha256 FROM bench x WHERE {dev.format('p.device')} AND x.sha256 > p.sha ORDER BY "
                    "x.device, x.sha256 LIMIT 1)")
            then = "(SELECT MIN(x.device) FROM bench x WHERE x.device > p.device)"
            first = (f"(SELECT x.sha256 FROM bench x WHERE {dev.format(then)} AND x.sha256 IS NOT NULL ORDER BY "
                     "x.device, x.sha256 LIMIT 1)")
            after = f"CASE WHEN {same} IS NULL THEN {then} ELSE p.device END, COALESCE({same}, {first})"
            # a row without a receive time: as in _newest_rows
            since = (f"COALESCE((SELECT x.ts FROM bench x WHERE {dev.format('p.device')} AND {sha} AND x.ts IS NOT NULL "
                     "ORDER BY x.device DESC, x.sha256 DESC, x.ts DESC LIMIT 1 OFFSET ?), (SELECT x.ts FROM bench x WHERE "
                     f"{dev.format('p.device')} AND {sha} AND x.ts IS NOT NULL ORDER BY x.device, x.sha256, x.ts LIMIT 1))")
            on = "t.device = b.device AND t.sha256 = b.sha AND t.ts >= b.since"
            sql = (f"WITH RECURSIVE p(device, sha) AS (SELECT CAST(? AS TEXT), CAST('' AS TEXT) UNION ALL SELECT "
                   f"{after} FROM p WHERE p.device IS NOT NULL{mine}), "
                   f"b(device, sha, since) AS (SELECT p.device, p.sha, {since} FROM p WHERE p.sha <> ''{mine}) "
                   "SELECT body FROM (SELECT t.body, t.ts, t.seq, ROW_NUMBER() OVER (PARTITION BY t.device, t.sha256 "
                   f"ORDER BY t.ts DESC, t.seq DESC) AS n FROM b {self.ROWS_JOIN.format(table='bench', on=on)}) AS "
                   "ranked WHERE n <= ? ORDER BY ts DESC, seq DESC")
            one = () if device is None else (device,)
            args = (device or "", *one, max(keep - 1, 0), *one, keep)  # keep 0: none (a negative OFFSET is an error)
        out: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for (body,) in self._rows(sql, args):
            m = json.loads(body)
            out.setdefault((m["device"], m["sha256"]), []).append(m)
        return out

    def reference_accuracies(self, devices: list[str], variants: tuple[str, ...], scan: int = REFERENCE_SCAN,
                             since: dict[str, float] | None = None) -> dict[tuple[str, str | None, str], float]:
        """Return, per ``(device, model, variant)`` of ``devices`` and ``variants`` (the fp32 references), the
        accuracy of the newest bench record (by receive time, then ``seq``) of that model (its ``model``, None from an
        agent that names none) and variant that carries one (a number above 0), among the ``scan`` newest records of
        each device and variant: what the accuracy bound of its other variants is a ratio of. ``since``: per device,
        only its records received after that time (unix seconds, as stored; a device missing from it: none): a
        ``--share`` worker's look after each batch. One query per 200 devices, each device and variant's newest read
        through ``bench (device, variant, ts, seq)`` (schema version 8, :meth:`_newest_join`): never the records the
        history holds beyond those. Raises HistoryError."""
        out: dict[tuple[str, str | None, str], float] = {}
        names = sorted(set(devices))
        if not variants or scan < 1:
            return out
        # each device and variant's newest ``scan`` through bench (device, variant, ts, seq): ranking every record of
        # the devices and variants read all of them, however old (the monitor's start, and a --share batch of benches)
        held = self.VARIANT_KEY
        match = (f"{{0}}.device = b.device AND {held.format('{0}.variant')} = {held.format('b.variant')} AND "
                 "{0}.variant = b.variant" + ("" if since is None else " AND {0}.ts > b.since"))
        for i in range(0, len(names), 200):
            part = names[i:i + 200]
            pairs = ", ".join([f"(?, CAST(? AS TEXT), CAST(? AS {self._REAL}))"] * (len(part) * len(variants)))
            rows = self._rows(f"WITH b(device, variant, since) AS (VALUES {pairs}) SELECT device, variant, body FROM (SELECT "
                              "t.device, t.variant, t.body, ROW_NUMBER() OVER (PARTITION BY t.device, t.variant ORDER BY "
                              f"t.ts DESC, t.seq DESC) AS n FROM b {self._newest_join('bench', match, scan)}) AS ranked "
                              "WHERE n <= ? ORDER BY device, variant, n",
                              (*(v for d in part for variant in variants
                                 for v in (d, variant, None if since is None else since.get(d, math.inf))), scan))
            for device, variant, body in rows:  # newest first per device and variant: the first of a model wins
                try:
                    m = json.loads(body)
                except (TypeError, ValueError):  # stored as received and verified: JSON; a hand-made row is none
                    continue
                model = m.get("model") if isinstance(m, dict) else None
                value = field_at(m, "accuracy", "value")
                key = (device, model if isinstance(model, str) else None, variant)
                if key not in out and in_range(value) and value > 0:
                    out[key] = float(value)
        return out

    def latest_status(self, devices: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """Return the newest status message per device (of ``devices``, or every device's; the monitor asks for those a
        batch held statuses of): of its :data:`STATUS_ORDER_SCAN` newest by receive time, the newest by the device's own
        order (:func:`newer_status`: epoch, connection, then ``seq``), by receive time where the device gives none. A
        status a ``--share`` peer stamped after the device's last will, or one of an older connection received late,
        no longer makes a device whose will said offline look online; a newer connection's status received before the
        older one's will still shows it online. When the newest is an ``offline`` one, its
        ``current`` is the one of the newest status (by ``seq``) of the same agent ``connection``: a last will
        the broker published was signed when the agent connected, and names the model of that moment, not one
        it switched to since (looked for among the device's statuses numbered after the will's, of its numbering, its
        ``epoch`` when it says one: a re-imaged device numbers from 1 again).

        Those are looked for among the device's 100 newest statuses by receive time (at or before the will's: it is the
        newest), not by number: a will is published once its connection ended, so that connection's statuses were
        received before it, and only a status of another connection (the next one's, when it took the session over)
        or one a ``--share`` peer stamped a little out of order (receive times are by the database's clock there, one
        device's may interleave: hence the newest by ``seq`` of those read) comes between; an agent sends a status at
        connect, at a switch and at a clean stop, so 100 is many reconnects, as for :meth:`last_known_models`. Read by
        number, down ``status (device, seq)``, a re-imaged device's walk passed every status of its older numbering
        above the will's. One query, one more per 200 devices whose newest statuses are of two epochs (for the newest,
        :meth:`device_epochs`) and one per 200 devices whose newest status is such a will; each read through the
        ``(device, ts)`` index (:meth:`_newest_rows`, :meth:`_newest_join`): never all of a device's statuses.
        Raises HistoryError."""
        read: dict[str, list[dict[str, Any]]] = {}
        for device, body, _ts in self._newest_rows("status", 1, STATUS_ORDER_SCAN, devices):  # newest first, by device
            read.setdefault(device, []).append(json.loads(body))
        epochs = self.device_epochs([d for d, ms in read.items() if len({message_epoch(m) for m in ms} - {None}) > 1])
        newest = {}
        for device, statuses in read.items():
            best = statuses[0]
            for m in statuses[1:]:  # received earlier: newer only by the device's own order
                if newer_status(m, best, epochs.get(device)):
                    best = m
            newest[device] = best
        wills = {device: msg for device, msg in newest.items()
                 if msg.get("state") == "offline" and isinstance(msg.get("connection"), str)
                 and isinstance(msg.get("seq"), int)}  # not online (its own word, fresh), and says its connection
        names = sorted(wills)
        later: dict[str, dict[str, Any]] = {}
        for i in range(0, len(names), 200):
            part = names[i:i + 200]
            for device, body in self._rows(
                    f"WITH b(device) AS (VALUES {', '.join(['(?)'] * len(part))}) SELECT device, body FROM (SELECT "
                    "t.device, t.body, ROW_NUMBER() OVER (PARTITION BY t.device ORDER BY t.ts DESC, t.seq DESC) AS n "
                    f"FROM b {self._newest_join('status', '{0}.device = b.device', 100)}) AS ranked WHERE n <= 100",
                    tuple(part)):
                m, will = json.loads(body), wills[device]
                seq, epoch, best = m.get("seq"), message_epoch(will), later.get(device)
                if (isinstance(seq, int) and seq > will["seq"] and (epoch is None or m.get("epoch") == epoch)
                        and m.get("connection") == will["connection"] and (best is None or seq > best["seq"])):
                    later[device] = m  # the connection's highest-numbered so far
        for device, m in later.items():
            newest[device] = {**wills[device], "current": m.get("current")}
        return newest

    def last_known_models(self, devices: Iterable[str] | None = None, scan: int = 100) -> dict[str, dict[str, Any]]:
        """Return, per device (of ``devices``, or every device), the model that the newest of its ``scan`` newest
        statuses (by receive time, then ``seq``) naming one says it ran (for a device offline now, whose last word,
        its last will, may name none): ``variant``, ``sha256``, ``at`` (when this host received that status) and
        ``said_at`` (the status's ``ts``: the device's own clock). A device none of whose ``scan`` newest statuses
        names a variant is left out.

        At most two queries, however many devices: each device's two newest statuses first (where a device says its
        model, unless its last will names none), then older ones only when a device is left without a model; each
        reads only those statuses of each device (:meth:`_newest_rows`), however long the history.

        Raises:
            HistoryError: the history cannot be read.
        """
        wanted = None if devices is None else set(devices)
        found: dict[str, dict[str, Any]] = {}
        seen: set[str] = set()
        for first, last in ((1, min(2, scan)), (3, scan)):
            if first > last:
                break
            for device, body, received in self._newest_rows("status", first, last):
                if device in found or (wanted is not None and device not in wanted):
                    continue
                seen.add(device)
                m = json.loads(body)
                cur = m.get("current")
                if isinstance(cur, dict) and isinstance(cur.get("variant"), str) and cur["variant"]:
                    found[device] = {"variant": cur["variant"], "sha256": cur.get("sha256"), "at": received,
                                     "said_at": m.get("ts")}
            if seen <= set(found):  # every device with statuses has its model: no older ones to read
                break
        return found

    def latest_telemetry(self) -> dict[str, dict[str, Any]]:
        """Return the newest telemetry message per device. Raises HistoryError."""
        return self._latest("telemetry")

    def telemetry_intervals(self, latest: dict[str, dict[str, Any]] | None = None) -> dict[str, float]:
        """Return the telemetry interval (seconds) each device's newest telemetry message says its agent sends at
        (:func:`~edgekit_protocol.messages.telemetry_interval`), by device; a device whose newest says none (an older
        agent) is left out. ``latest``: :meth:`latest_telemetry`'s answer when the caller has read it already.
        Raises HistoryError."""
        said = {device: telemetry_interval(m) for device, m in (latest or self.latest_telemetry()).items()}
        return {device: v for device, v in said.items() if v is not None}

    def latest_live(self) -> dict[str, dict[str, Any]]:
        """Return the newest ``live`` message (the serving API's figures) per device. Raises HistoryError."""
        return self._latest("live")

    def latest_shadow(self) -> dict[str, dict[str, Any]]:
        """Return the newest ``shadow`` message (a shadow run's comparison) per device. Raises HistoryError."""
        return self._latest("shadow")

    def last_received(self, kinds: tuple[str, ...] = ("status", "telemetry")) -> dict[str, float]:
        """Return when this host last stored a message of one of ``kinds`` (default: status or telemetry, the fleet
        table's "last heard"; :data:`KINDS` for any message the monitor stores) of each device (its receive time, unix
        seconds by this host's clock; never the device's own ``ts``), by device.

        Raises:
            ValueError: a kind the store does not keep.
            HistoryError: the history cannot be read.
        """
        _kept_kinds(kinds)
        heard: dict[str, float] = {}
        for table in kinds:  # each device's newest receive time: one entry of the kind's (device, ts) index
            for device, ts in self._rows(f"WITH RECURSIVE {self._each_device(table)} SELECT d.device, (SELECT MAX(x.ts) "
                                         f"FROM {table} x WHERE x.device = d.device) FROM d WHERE d.device IS NOT NULL"):
                if ts is not None:  # rows without a receive time (hand-made) say nothing of when it was heard
                    heard[device] = max(ts, heard.get(device, ts))
        return heard

    def clock_offset(self) -> float:
        """Return how far the database's clock (:attr:`NOW_SQL`) is ahead of this host's (seconds; negative: behind),
        measured by one query, to its round trip: the ``share`` workers of several hosts keep receive times by it, so
        hosts whose clocks differ compare them alike. Raises HistoryError."""
        before = time.time()
        ((now,),) = self._rows(f"SELECT {self.NOW_SQL}")
        return float(now) - (before + time.time()) / 2

    def last_heard(self, devices: list[str]) -> dict[str, float]:
        """Return when this host (any worker) last stored a message of any kind (:data:`KINDS`) of each of ``devices``
        (its receive time, unix seconds by the storing worker's clock: a ``share`` worker's is the database's,
        :meth:`clock_offset`), by device; a device the history holds nothing of
        is left out. One query per 200 devices, each device's newest row of a kind found through the kind's
        ``(device, ts)`` index: a few index entries per device and kind, whatever the history's size. Raises
        HistoryError."""
        heard: dict[str, float] = {}
        names = sorted(set(devices))
        for i in range(0, len(names), 200):
            part = names[i:i + 200]
            newest = ", ".join(f"(SELECT MAX(t.ts) FROM {kind} t WHERE t.device = d.device)" for kind in KINDS)
            for device, *times in self._rows(f"WITH d(device) AS (VALUES {', '.join(['(?)'] * len(part))}) "
                                             f"SELECT d.device, {newest} FROM d", tuple(part)):
                known = [t for t in times if t is not None]
                if known:
                    heard[device] = max(known)
        return heard

    def stored_since(self, since: float) -> dict[str, list[tuple[int, int]]]:
        """Return, by device, how many messages (of every kind the monitor stores, :data:`KINDS`) this host stored with
        a receive time at or after ``since`` (unix seconds, this host's clock), a ``(second, count)`` pair per whole
        second that holds any, oldest first: at most one row a second a device, however many it sent.

        Cost: one query per kind, each device found by :meth:`_each_device` and only its rows since ``since`` read
        through its kind's ``(device, ts)`` index: the work grows with the devices and what they stored lately, not
        with the history's length (a monitor's start reads it). Raises HistoryError."""
        counts: dict[tuple[str, int], int] = {}
        for kind in KINDS:
            recent = self.ROWS_JOIN.format(table=kind, on="t.device = d.device AND t.ts >= ?")
            for device, sec, n in self._rows(f"WITH RECURSIVE {self._each_device(kind)} SELECT t.device, FLOOR(t.ts), "
                                             f"COUNT(*) FROM d {recent} WHERE d.device IS NOT NULL "
                                             "GROUP BY t.device, FLOOR(t.ts)", (since,)):  # FLOOR: SQLite 3.35+
                counts[(device, int(sec))] = counts.get((device, int(sec)), 0) + int(n)
        out: dict[str, list[tuple[int, int]]] = {}
        for (device, sec), n in sorted(counts.items()):
            out.setdefault(device, []).append((sec, n))
        return out

    def newest_seqs(self, kinds: tuple[str, ...], devices: list[str]) -> dict[tuple[str, str], int]:
        """Return the ``seq`` of the newest message the history holds (by receive time, then ``seq``) per device of
        ``devices`` and kind of ``kinds``, as ``{(device, kind): seq}``: where each device's numbering stood when it was
        last stored (a device whose numbering started again, re-imaged, stands at its new numbers: the newest record
        of its newest numbering, ``seq_epochs``, not a late one of an older numbering stored after it), or the end of a
        sequence gap of that device and kind recorded since, when higher (numbers a telemetry message's ``seqs`` said
        were given, whose records never came: they are recorded once, not again by the next monitor). A device and kind
        the history holds nothing of is left out.

        Cost: one query per kind (per 200 devices), each device's newest row of its numbering found through its kind's
        ``(device, ts)`` index (from the newest down: one entry, and one more per late record of an older numbering
        stored after it) and its gaps through ``gaps (device, ts)``: a few index entries per device and kind, whatever the
        history's size (a start reads nothing in proportion to the rows stored).

        Raises:
            ValueError: a kind the store does not keep.
            HistoryError: the history cannot be read.
        """
        _kept_kinds(kinds)
        out: dict[tuple[str, str], int] = {}
        names = sorted(set(devices))
        epochs = self.device_epochs(names)
        for kind in kinds:
            for i in range(0, len(names), 200):
                part = names[i:i + 200]
                pairs = tuple(v for d in part for v in (d, epochs.get(d)))
                for device, seq, last in self._rows(self._newest_seqs_sql(kind, len(part)), (*pairs, kind)):
                    if seq is not None:
                        out[(device, kind)] = max(int(seq), int(last)) if last is not None else int(seq)
        return out

    @classmethod
    def _newest_seqs_sql(cls, kind: str, devices: int) -> str:
        """Return :meth:`newest_seqs`' query of ``kind`` for ``devices`` ``(device, newest epoch or None)`` pairs (then
        the kind) as arguments: per device, its newest ``seq`` at its newest receive time in its newest numbering (a
        row of no epoch counts as of it: an agent downgraded numbers on), and the end of the newest gap recorded
        since."""
        values = ", ".join(["(?, CAST(? AS TEXT))"] * devices)

        def ours(row: str, d: str) -> str:
            epoch = cls.EPOCH_SQL.format(row=row)
            return f"({d}.epoch IS NULL OR {epoch} IS NULL OR {epoch} = {d}.epoch)"

        # walked down the (device, ts) index from the newest, up to the first row of the numbering: one, unless late
        # records of an older numbering were stored after it
        newest = f"(SELECT t.ts FROM {kind} t WHERE t.device = d.device AND {ours('t', 'd')} ORDER BY t.ts DESC LIMIT 1)"
        # MAX(seq + 0): found through (device, ts), not by walking (device, seq) down past an older numbering's higher
        # numbers
        return (f"WITH d(device, epoch) AS (VALUES {values}) SELECT n.device, (SELECT MAX(t.seq + 0) FROM {kind} t "
                f"WHERE t.device = n.device AND t.ts = n.ts AND {ours('t', 'n')}), (SELECT MAX(g.last_missing) FROM gaps g "
                "WHERE g.device = n.device AND g.kind = ? AND g.ts >= n.ts) FROM (SELECT d.device AS device, d.epoch AS "
                f"epoch, {newest} AS ts FROM d) n WHERE n.ts IS NOT NULL")

    def _latest(self, table: str) -> dict[str, dict[str, Any]]:
        """Return the newest message of ``table`` per device (by receive time, then ``seq``), by device: one query that
        reads a few index entries and one body per device (:meth:`_newest_rows`). Raises HistoryError."""
        return {m["device"]: m for m in (json.loads(b) for _device, b, _ts in self._newest_rows(table, 1, 1))}

    @staticmethod
    def _each_device(table: str) -> str:
        """Return the SQL of ``d(device)``, for after ``WITH RECURSIVE``: every device ``table`` holds a row of, in
        order, then one NULL (take ``d.device IS NOT NULL``). Each is found from the one before by one lookup in the
        table's ``(device, ...)`` index (a skip scan): one lookup per device, however many rows each has, where
        ``GROUP BY device`` or ``DISTINCT`` reads every entry of the index."""
        return (f"d(device) AS (SELECT MIN(device) FROM {table} UNION ALL SELECT (SELECT MIN(x.device) FROM {table} x "
                "WHERE x.device > d.device) FROM d WHERE d.device IS NOT NULL)")

    def _newest_rows(self, table: str, first: int, last: int,
                     devices: Iterable[str] | None = None) -> list[tuple[str, str, float]]:
        """Return ``(device, body, ts)`` of the ``first``-th to ``last``-th newest rows (by receive time, then ``seq``;
        1: the newest) of every device of ``table`` (a record kind), or of ``devices`` alone, by device, newest first.
        One query (one per 200 of ``devices``): each device found by :meth:`_each_device` (or given), then its ``last``
        newest rows through its ``(device, ts)`` index (:meth:`_newest_join`): the work grows with the devices and ``last``,
        not with the history's length (a one-device history's too). Raises HistoryError."""
        # a row without a receive time (hand-made) is ranked by neither database: PostgreSQL sorts it first, SQLite last
        newest = self._newest_join(table, "{0}.device = b.device", last)
        ranked = ("SELECT device, body, ts FROM (SELECT t.device, t.body, t.ts, ROW_NUMBER() OVER (PARTITION BY t.device "
                  f"ORDER BY t.ts DESC, t.seq DESC) AS n FROM b {newest}) AS ranked WHERE n BETWEEN ? AND ? ORDER BY "
                  "device, n")
        if devices is None:
            return self._rows(f"WITH RECURSIVE {self._each_device(table)}, b(device) AS (SELECT d.device FROM d WHERE "
                              f"d.device IS NOT NULL) {ranked}", (first, last))
        names, rows = sorted(set(devices)), []
        for i in range(0, len(names), 200):
            part = names[i:i + 200]
            rows += self._rows(f"WITH b(device) AS (VALUES {', '.join(['(?)'] * len(part))}) {ranked}",
                               (*part, first, last))
        return rows

    def decisions(self, device: str | None = None, limit: int = 100,
                  kinds: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        """Return up to ``limit`` recorded decisions (of one device, or all; of the ``kinds`` given, see
        :func:`decision_kind`, or any), newest first, each with ``recorded`` (this host's time). A decision an
        older edge-kit wrote without the ``kind`` column (after the upgrade) is of the kind its body says.
        Raises HistoryError."""
        where, args = self._where(device, "", None)
        if kinds is not None:
            where += (" AND" if where else "WHERE") + f" (kind IS NULL OR kind IN ({', '.join('?' * len(kinds)) or 'NULL'}))"
            args = (*args, *kinds)

        def kept(row: tuple) -> dict[str, Any] | None:
            body, ts, kind = row
            m = json.loads(body)
            return {**m, "recorded": ts} if kinds is None or (kind or decision_kind(m)) in kinds else None

        return self._newest("body, ts, kind", "decisions", where, args, limit, kept)

    def latest_decisions(self, kinds: tuple[str, ...] | None = None, feasible: bool = False) -> dict[str, dict[str, Any]]:
        """Return the newest recorded decision per device (of the ``kinds`` given, see :func:`decision_kind`, or of
        any; with ``feasible``, the newest that chose a feasible variant), each with ``recorded``. Raises
        HistoryError.

        Cost: one indexed query that reads one body per device, however long the history (each device found by
        :meth:`_each_device`, its newest decision through its own index entries, not by grouping the table). With
        ``kinds``, a decision an older edge-kit wrote without the ``kind`` column after the upgrade is of the kind its
        body says, so a second indexed query reads the rows without a kind that are newer than their device's newest
        row of the ``kinds`` (only those can replace it), and parses their bodies newest first, a device's only until
        one is of the ``kinds``: at most the rows an older edge-kit wrote since the upgrade, never the history before it.
        """
        where, args = self._where(None, "kind", kinds)
        good = "feasible = 1 AND chosen IS NOT NULL" if feasible else ""
        if good:
            where += (" AND " if where else "WHERE ") + good
        newest: dict[str, dict[str, Any]] = {}
        # each device's newest, walked down its (device, id) index: its device as a range of one, so no plan walks the
        # whole table down its ids (PostgreSQL did for a device none was recorded of lately: its ids' order fits too);
        # its body and time read by id (a join of the ids was planned as a hash of the whole table)
        mine = f"{where + ' AND' if where else 'WHERE'} x.device >= d.device AND x.device <= d.device"
        by_id = "(SELECT e.{} FROM decisions e WHERE e.id = n.id)"
        for b, ts in self._rows(f"WITH RECURSIVE {self._each_device('decisions')} SELECT {by_id.format('body')}, "
                                f"{by_id.format('ts')} FROM (SELECT (SELECT x.id FROM decisions x {mine} ORDER BY "
                                "x.device DESC, x.id DESC LIMIT 1) AS id FROM d WHERE d.device IS NOT NULL) n "
                                "WHERE n.id IS NOT NULL", args):
            m = json.loads(b)
            newest[m["device"]] = {**m, "recorded": ts}
        if kinds:  # the subquery's unqualified columns are its own (k): the device's newest row of the kinds
            settled: set[str] = set()
            for device, b, ts in self._rows(
                    f"SELECT device, body, ts FROM decisions u WHERE kind IS NULL{' AND ' + good if good else ''} AND "
                    f"id > COALESCE((SELECT MAX(id) FROM decisions k {where} AND k.device = u.device), -1) "
                    "ORDER BY id DESC", args):
                if device in settled:  # a newer one of the kinds was found: the older ones are not parsed
                    continue
                m = json.loads(b)
                if decision_kind(m) in kinds:
                    settled.add(device)
                    newest[m["device"]] = {**m, "recorded": ts}
        return newest

    @staticmethod
    def _where(device: str | None, column: str, values: tuple[str, ...] | None) -> tuple[str, tuple]:
        """Return the WHERE clause (or "") and its arguments for rows of ``device`` (None: any) whose
        ``column`` is one of ``values`` (None: any; empty: none)."""
        terms, args = [], []
        if device:
            terms.append("device = ?")
            args.append(device)
        if values is not None:
            terms.append(f"{column} IN ({', '.join('?' * len(values))})" if values else "1 = 0")
            args.extend(values)
        return ("WHERE " + " AND ".join(terms) if terms else ""), tuple(args)

    def _migrate(self) -> None:
        """Bring a history an older edge-kit wrote up to this schema; return nothing. Idempotent, and safe while
        other processes open the same history. Raises HistoryError.

        Since the first schema (version 1, :data:`SCHEMA_VERSION`): ``invalid.device`` (the device a refused message's
        topic names, filled from the topics of older rows) and the indexes that list refused messages and gaps of
        one device; ``decisions.kind`` (:func:`decision_kind` of the body; rows written before it
        are filled from their bodies, a batch per transaction) and its index, which answer "the newest decision
        per device of a kind" without reading every body. Version 3: the ``alerts`` table (created by the schema's
        ``CREATE TABLE IF NOT EXISTS``, empty: the first monitor that starts infers the alerts under way from the
        records, then keeps them there, :meth:`alerts_kept`). Version 4: ``alerts.subject`` (``''`` for the rows
        before it), ``seen`` and ``cleared_why`` (empty for them), the open alerts' unique index over device, kind and
        subject instead of device and kind, and the ``alert_holders`` table (created by the schema). Version 6:
        ``seq_scans.epoch`` (NULL in older rows: the scan follows any numbering, as before); the ``seq_epochs`` table
        and the ``bench (device, ts)`` and ``gaps (device, kind, last_missing)`` indexes are created by the schema.
        Version 7: the ``status (device, seq)`` index, created by the schema. Version 8: the ``bench (device, variant,
        ts, seq)`` index (:attr:`VARIANT_KEY`), created by the schema.
        """
        if "device" not in self._columns("invalid"):
            self._add_column("invalid", "device", "TEXT")
        if "epoch" not in self._columns("seq_scans"):  # version 6: the numbering the scan follows (NULL: any)
            self._add_column("seq_scans", "epoch", "TEXT")
        self._execute("CREATE INDEX IF NOT EXISTS invalid_device ON invalid (device, id)")
        self._execute("CREATE INDEX IF NOT EXISTS gaps_device ON gaps (device, ts)")
        after = -1
        while True:  # the device each older refused message's topic names (none: it stays NULL)
            rows = self._rows("SELECT id, topic FROM invalid WHERE device IS NULL AND id > ? ORDER BY id LIMIT ?",
                              (after, BATCH_ROWS))
            if not rows:
                break
            after = rows[-1][0]
            named = [(dev, rid) for rid, dev in ((rid, stored_topic_device(t)) for rid, t in rows) if dev is not None]
            if named:
                self._write_batch([("UPDATE invalid SET device = ? WHERE id = ?", named)])
        have = self._columns("alerts")  # version 4: a version 3 table lacks these (a new one has them)
        for column, sql_type in (("subject", "TEXT NOT NULL DEFAULT ''"), ("seen", self._REAL), ("cleared_why", "TEXT")):
            if column not in have:
                self._add_column("alerts", column, sql_type)
        # the new index before version 3's goes (one open alert per device and kind): never a moment without one, in
        # which a monitor of an older edge-kit still running would open an alert twice, and this index then fail
        self._execute("CREATE UNIQUE INDEX IF NOT EXISTS alerts_open_subject ON alerts (device, kind, subject) "
                      "WHERE cleared_at IS NULL")
        self._execute("DROP INDEX IF EXISTS alerts_open")
        if "kind" not in self._columns("decisions"):
            self._add_column("decisions", "kind", "TEXT")
        self._execute("CREATE INDEX IF NOT EXISTS decisions_kind ON decisions (kind, device, id)")
        while True:
            rows = self._rows("SELECT id, body FROM decisions WHERE kind IS NULL ORDER BY id LIMIT ?", (BATCH_ROWS,))
            if not rows:
                return
            fill = []
            for rid, body in rows:
                try:
                    decision = json.loads(body)
                except (TypeError, ValueError):
                    decision = {}
                fill.append((decision_kind(decision if isinstance(decision, dict) else {}), rid))
            self._write_batch([("UPDATE decisions SET kind = ? WHERE id = ?", fill)])

    def bench_records(self, device: str | None = None, sha256s: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        """Return every bench record (of one device, or all; of the artifacts whose sha256 is in ``sha256s``,
        or of any), oldest first. The artifacts are chosen in the query (indexed), so records of other builds
        are never read. Raises HistoryError."""
        where, args = self._where(device, "sha256", sha256s)
        return [json.loads(b) for (b,) in self._rows(f"SELECT body FROM bench {where} ORDER BY ts, seq", args)]

    # --- rollouts (edge_kit.loop.waves) ------------------------------------------------------------

    def save_rollout(self, rid: str, state: str, body: dict[str, Any]) -> None:
        """Create or update rollout ``rid`` with its ``state`` and settings/progress ``body`` (JSON); return
        nothing. Raises HistoryError."""
        now = time.time()
        self._execute("INSERT INTO rollouts (id, created, ts, state, owner, heartbeat, body) "
                      "VALUES (?, ?, ?, ?, NULL, NULL, ?) ON CONFLICT (id) DO UPDATE SET ts = excluded.ts, "
                      "state = excluded.state, body = excluded.body",
                      (rid, now, now, state, json.dumps(body, default=str)))

    def claim_rollout(self, rid: str, owner: str, stale_s: float) -> str | None:
        """Make ``owner`` the one process driving rollout ``rid``; return None when it now is, else
        the live owner that holds it (its heartbeat newer than ``stale_s``). Raises HistoryError.

        The conditional UPDATE is atomic on both databases (PostgreSQL re-checks the condition after a
        concurrent claim commits), so of two hosts claiming at once one wins."""
        now = self.NOW_SQL
        self._execute(f"UPDATE rollouts SET owner = ?, heartbeat = {now} WHERE id = ? AND "
                      f"(owner IS NULL OR owner = ? OR heartbeat < {now} - ?)", (owner, rid, owner, stale_s))
        rows = self._rows("SELECT owner FROM rollouts WHERE id = ?", (rid,))
        return None if rows and rows[0][0] == owner else (rows[0][0] if rows else "nobody: no such rollout")

    def rollout_driver(self, rid: str, stale_s: float) -> str | None:
        """Return the owner driving rollout ``rid`` now (its heartbeat newer than ``stale_s`` by the
        database's clock), or None. Raises HistoryError."""
        rows = self._rows(f"SELECT owner FROM rollouts WHERE id = ? AND owner IS NOT NULL AND heartbeat >= {self.NOW_SQL} - ?",
                          (rid, stale_s))
        return rows[0][0] if rows else None

    def heartbeat_rollout(self, rid: str, owner: str) -> str:
        """Note that ``owner`` still drives rollout ``rid``; return the rollout's state (``aborting``
        when someone asked it to stop), ``lost`` when another process holds it now, ``missing`` when
        there is no such rollout. Raises HistoryError."""
        if not self._execute(f"UPDATE rollouts SET heartbeat = {self.NOW_SQL} WHERE id = ? AND owner = ?", (rid, owner)):
            return "lost" if self._rows("SELECT 1 FROM rollouts WHERE id = ?", (rid,)) else "missing"
        rows = self._rows("SELECT state FROM rollouts WHERE id = ?", (rid,))
        return rows[0][0] if rows else "missing"

    def release_rollout(self, rid: str, owner: str) -> None:
        """Let go of rollout ``rid`` (another process may resume it at once); return nothing. Raises HistoryError."""
        self._execute("UPDATE rollouts SET owner = NULL WHERE id = ? AND owner = ?", (rid, owner))

    def set_rollout_state(self, rid: str, state: str) -> None:
        """Set rollout ``rid``'s state (``abort`` sets ``aborting``; its owner stops and sets ``aborted``);
        return nothing. Raises HistoryError."""
        self._execute("UPDATE rollouts SET state = ?, ts = ? WHERE id = ?", (state, time.time(), rid))

    def rollout(self, rid: str) -> dict[str, Any] | None:
        """Return rollout ``rid`` (``id, created, ts, state, owner, heartbeat, body``), or None. Raises HistoryError."""
        rows = self._rows("SELECT id, created, ts, state, owner, heartbeat, body FROM rollouts WHERE id = ?", (rid,))
        return self._rollout_row(rows[0]) if rows else None

    def rollouts(self, limit: int = 20, states: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        """Return the newest rollouts first (at most ``limit``; with ``states``, only those in one of them).
        Raises HistoryError."""
        where = f"WHERE state IN ({', '.join('?' for _ in states)}) " if states else ""
        rows = self._rows("SELECT id, created, ts, state, owner, heartbeat, body FROM rollouts "
                          f"{where}ORDER BY created DESC LIMIT ?", (*(states or ()), limit))
        return [self._rollout_row(r) for r in rows]

    @staticmethod
    def _rollout_row(row: tuple) -> dict[str, Any]:
        """Return a ``rollouts`` row as a dict, its body decoded."""
        return {**dict(zip(("id", "created", "ts", "state", "owner", "heartbeat"), row[:6])), "body": json.loads(row[6])}

    def set_rollout_devices(self, rid: str, rows: list[dict[str, Any]]) -> None:
        """Create or update devices' rows of rollout ``rid`` in one transaction; each a dict with
        ``device``, ``wave``, ``state``, ``revision`` and ``detail`` (a dict, JSON). Return nothing.
        Raises HistoryError (nothing of it written)."""
        now = time.time()
        values = sorted(((rid, r["device"], r["wave"], r["state"], r["revision"], now, json.dumps(r.get("detail") or {}))
                         for r in rows), key=lambda v: v[1])  # one lock order for concurrent writers
        if values:
            self._write_batch([(
                "INSERT INTO rollout_devices VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (rollout, device) DO UPDATE "
                "SET wave = excluded.wave, state = excluded.state, revision = excluded.revision, ts = excluded.ts, "
                "detail = excluded.detail", values)])

    def rollout_devices(self, rid: str) -> dict[str, dict[str, Any]]:
        """Return each device's row of rollout ``rid`` (``wave, state, revision, ts, detail``) by name.
        Raises HistoryError."""
        rows = self._rows("SELECT device, wave, state, revision, ts, detail FROM rollout_devices WHERE rollout = ?", (rid,))
        return {d: {"wave": w, "state": st, "revision": rev, "ts": ts, "detail": json.loads(det)}
                for d, w, st, rev, ts, det in rows}

    def __enter__(self) -> HistoryStore:
        """Return the store itself (closed on leaving the ``with``)."""
        return self

    def __exit__(self, *_: object) -> None:
        """Close the store; return nothing."""
        self.close()


class Store(HistoryStore):
    """The embedded history: a SQLite file in WAL mode. Several processes on one host may share it:
    readers work alongside, writes are serialized by SQLite with a busy timeout."""

    NOW_SQL = "((julianday('now') - 2440587.5) * 86400.0)"
    EPOCH_SQL = "json_extract({row}.body, '$.epoch')"  # a stored record's epoch (NULL without one)
    _REAL = "REAL"

    def __init__(self, path: Path, write: bool = True):
        """Open the history file at ``path``; with ``write``, create it and its tables when new; an older schema is
        upgraded when this user may write the file, reader or writer (:meth:`HistoryStore._open_schema`).

        Raises:
            sqlite3.Error: the file cannot be opened or is not a SQLite database, or OSError: its folder
                cannot be created (:func:`open_history` turns either into a HistoryError).
            HistoryError: the file is of an older schema this user may not write (upgrade), (a writer) of a newer schema,
                or (a reader) it holds no history.
        """
        self.path = Path(path)
        self.where = str(self.path)
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
        try:
            self._open_schema(write)
        except BaseException:
            self._db.close()
            raise

    def _tables(self) -> set[str]:
        """Return the names of the file's tables. Raises HistoryError."""
        return {name for (name,) in self._rows("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def _cannot_upgrade(self) -> tuple[str, str] | None:
        """Return None when this user may write the file, else why the upgrade cannot run and who may run it. SQLite
        opens a file it may not write read-only and says so only at the first write: a write that changes nothing is
        tried. Raises HistoryError (any other failure of the file)."""
        try:
            self._execute(NO_OP_WRITE)
        except HistoryError as exc:
            cause = exc.__cause__
            name = getattr(cause, "sqlite_errorname", "")  # Python 3.11+; the text on 3.10
            if not (name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN")) or
                    any(w in str(cause) for w in ("readonly", "unable to open"))):
                raise
            return (f"needs an upgrade, which cannot write the file ({cause})",
                    "a user that may write the file and its folder (its owner), or on a writable copy of it")
        return None

    def _upgrade(self) -> None:
        """Create the tables the file lacks, migrate an older schema, record the version; return nothing.
        Raises HistoryError."""
        try:
            with self._lock:
                self._db.executescript(_SCHEMA.format(real="REAL", int="INTEGER", blob="BLOB",
                                                      serial="INTEGER PRIMARY KEY AUTOINCREMENT",
                                                      variant=self.VARIANT_KEY.format("variant")))
        except sqlite3.Error as exc:
            raise self._failed(exc) from exc
        self._migrate()
        self._set_schema_version()

    def close(self) -> None:
        """Close the file; return nothing."""
        with self._lock:
            self._db.close()

    def _unwritable(self, exc: HistoryError, hint: str | None) -> str:
        """Return :meth:`HistoryStore.check_writable`'s error for this file (SQLite opens a file it may not write
        read-only, and says so only at the first write): the file, its folder (SQLite's ``-wal`` and ``-shm`` files
        live beside it) or the disk refused the write."""
        return (f"the history file {self.where} cannot be written ({exc.__cause__ or exc}): "
                f"{hint or 'check the file, its folder and their permissions'}")

    def _failed(self, exc: sqlite3.Error) -> HistoryError:
        """Return the one-line error for a SQLite failure on this file."""
        return HistoryError(f"the history file {self.where} cannot be written or read ({exc}): "
                            "check the disk and the file, then run again")

    def _execute(self, sql: str, args: tuple = ()) -> int:
        """Run one statement (autocommit); return its row count. Raises HistoryError."""
        try:
            with self._lock:
                return self._db.execute(sql, args).rowcount
        except sqlite3.Error as exc:
            raise self._failed(exc) from exc

    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Run one query; return its rows. Raises HistoryError."""
        try:
            with self._lock:
                return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise self._failed(exc) from exc

    def _columns(self, table: str) -> set[str]:
        """Return the names of ``table``'s columns. Raises HistoryError."""
        return {row[1] for row in self._rows(f"PRAGMA table_info({table})")}

    def _add_column(self, table: str, column: str, sql_type: str) -> None:
        """Add ``column`` unless another process just did; return nothing. Raises HistoryError."""
        try:
            self._execute(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}")
        except HistoryError:
            if column not in self._columns(table):
                raise

    def _write_batch(self, statements: list[tuple[str, list[tuple]]]) -> int:
        """Run every statement over its rows in one ``BEGIN IMMEDIATE`` transaction; return the summed row count.
        Raises HistoryRecordError (a value SQLite cannot hold: an integer beyond 64 bits, a string too big or with a
        lone surrogate) or HistoryError (both rolled back)."""
        new = 0
        try:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for sql, rows in statements:
                        if rows:  # executemany's rowcount is the sum over its rows (0 for an ignored one)
                            new += self._db.executemany(sql, rows).rowcount
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        except (sqlite3.DataError, OverflowError, UnicodeEncodeError) as exc:  # a value the file cannot hold
            raise HistoryRecordError(f"the history file {self.where} refused a record ({exc}): it cannot be stored as it "
                                     "is; the others are") from exc
        except sqlite3.Error as exc:
            raise self._failed(exc) from exc
        return new

