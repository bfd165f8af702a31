"""The history on a PostgreSQL server, through psycopg 3: the same tables and SQL as the SQLite file.

Chosen because psycopg 3 is the maintained PostgreSQL driver for Python (psycopg2 gets fixes only),
connects from the same ``postgresql://`` URLs as libpq and ``psql``, ships binary wheels with libpq
inside (``psycopg[binary]``: nothing to compile on the host), and pipelines ``executemany`` (one
round trip per batch rather than one per row), which is what a monitor's batch of inserts needs.

Several monitor workers, on several hosts, may write one database: every batch is one transaction,
``INSERT ... ON CONFLICT DO NOTHING`` on the message id keeps each record once, and rows are
inserted in msg_id order so two workers' overlapping batches never deadlock. A server that goes
away raises :class:`~edge_kit.errors.HistoryError` naming the database; the next call reconnects. A
server restarted between two calls costs nothing: its goodbye on the idle connection is seen before the
next statement is sent, and that statement runs on a fresh connection.
"""

from __future__ import annotations

import logging
import select
import threading
from urllib.parse import urlsplit, urlunsplit

import psycopg

from edge_kit.errors import HistoryError, HistoryRecordError, InputError
from edge_kit.telemetry.store import _SCHEMA, SCHEMA_VERSION, TABLES, HistoryStore

CONNECT_TIMEOUT_S = 10
# psycopg logs a warning when a failed batch's pipeline is torn down: the HistoryError raised for the
# same failure already says it, once (and a CLI prints no second line).
logging.getLogger("psycopg").setLevel(logging.ERROR)
# What a refused record raises: SQLSTATE classes 22 (data exception: a NUL in text, a number out of range, a character
# the database's encoding lacks) and 54 (program limit exceeded: an index row too long), and a string with no
# UTF-8 form or an integer beyond the driver's (raised before anything is sent). Anything else is the database.
_RECORD_SQLSTATES = ("22", "54")
_SCHEMA_LOCK = 0x6564676B  # "edgk": one advisory lock, so workers creating the tables at once do not collide


def redact(url: str) -> str:
    """Return ``url`` without its password (``postgresql://user@host:port/db``), for messages and logs.

    Raises:
        InputError: it is not a URL (an unclosed ``[`` of an IPv6 host, a port out of range); the message does
            not repeat it, since it may hold a password.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InputError(f"--history: not a valid PostgreSQL URL ({exc}); give "
                         "postgresql://user:password@host:port/db") from None
    if parts.password is None:
        return url
    netloc = f"{parts.username}@" if parts.username else ""
    netloc += parts.hostname or ""
    if port:
        netloc += f":{port}"
    return urlunsplit(parts._replace(netloc=netloc))


class PostgresStore(HistoryStore):
    """The history in a PostgreSQL database named by a ``postgresql://`` URL (tables created when missing)."""

    NOW_SQL = "extract(epoch from clock_timestamp())::double precision"
    EPOCH_SQL = "(CAST({row}.body AS json) ->> 'epoch')"  # a stored record's epoch (NULL without one)
    _REAL = "DOUBLE PRECISION"

    def __init__(self, url: str, write: bool = True):
        """Connect to ``url``; with ``write``, create the tables it lacks. An older schema is upgraded, reader or
        writer, when the role may (it owns the tables and may create in the schema), else a reader runs no CREATE or
        ALTER, so a role with SELECT alone reads; a reader of a database without edge-kit tables reads an empty history
        (:meth:`HistoryStore._open_schema`).

        Raises:
            InputError: ``url`` is not a valid URL (:func:`redact`).
            HistoryError: the server cannot be reached, refuses the login, or the database does not exist; it is of
                an older schema the role may not upgrade, or (a writer) of a newer schema.
        """
        self.url = url
        self.where = redact(url)
        self._lock = threading.Lock()
        self._conn: psycopg.Connection | None = None
        self._empty = False  # a reader of a database without edge-kit tables: nothing stored yet
        try:
            self._open_schema(write)
        except BaseException:
            self.close()
            raise

    def _tables(self) -> set[str]:
        """Return the names of the tables of the connection's schema. Raises HistoryError."""
        return {r[0] for r in self._rows("SELECT table_name FROM information_schema.tables "
                                         "WHERE table_schema = current_schema()")}

    def _cannot_upgrade(self) -> tuple[str, str] | None:
        """Return None when the connected role may upgrade the history's older schema, else why not and who may: an
        upgrade adds columns and indexes, which PostgreSQL lets only a table's owner, a member of its role or a
        superuser do, and creates tables and indexes, which needs the CREATE privilege on the schema too, in a session
        that may write (not a standby's). Changes nothing. Raises HistoryError."""
        ((schema, role, may_create, read_only),) = self._rows(
            "SELECT current_schema(), current_user, has_schema_privilege(current_schema(), 'CREATE'), "
            "current_setting('transaction_read_only') = 'on'")
        if read_only:  # a hot standby, or a role or database with default_transaction_read_only
            return ("needs an upgrade, and this session may not write (a read-only transaction: a standby server, or "
                    "default_transaction_read_only)", "a role that owns its tables, on the primary server")
        names = (*TABLES, "edgekit_schema")
        owners = [r[0] for r in self._rows(
            "SELECT DISTINCT pg_get_userbyid(c.relowner) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            f"WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND c.relname IN ({', '.join('?' * len(names))}) "
            "AND NOT pg_has_role(c.relowner, 'USAGE') ORDER BY 1", names)]
        if owners:
            return (f"needs an upgrade that only the owner of its tables can run (this role is not; they belong to "
                    f"{', '.join(owners)})", owners[0])
        if not may_create:  # CREATE TABLE (even IF NOT EXISTS) and CREATE INDEX check it before anything else
            return (f"needs an upgrade that creates tables and indexes in schema {schema}, where this role ({role}) may "
                    "not create", f"a role that owns its tables and may create in {schema} (or have the schema's owner "
                    f"run `GRANT CREATE ON SCHEMA {schema} TO {role}` first)")
        return None

    def _no_history(self) -> None:
        """Read a database without edge-kit tables as an empty history (one made for the fleet before any monitor or
        tune ran): every query answers no rows (:meth:`_rows`); return nothing."""
        self._empty = True

    def _upgrade(self) -> None:
        """Create the tables the database lacks, migrate an older schema and record the version, under one advisory
        lock (workers starting together take turns); return nothing. Raises HistoryError."""
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                    for statement in _SCHEMA.format(real="DOUBLE PRECISION", int="BIGINT", blob="BYTEA",
                                                    serial="BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
                                                    variant=self.VARIANT_KEY.format("variant")).split(";"):
                        if statement.strip():
                            conn.execute(statement)
            except psycopg.Error as exc:
                raise self._failed(exc) from exc
        # Older databases: under the same lock (a session lock now), so workers migrating at once take turns.
        self._execute("SELECT pg_advisory_lock(?)", (_SCHEMA_LOCK,))
        try:
            if (self._schema_version() or 0) < SCHEMA_VERSION:  # another worker may have upgraded it while this one waited
                self._migrate()
                self._set_schema_version()
        finally:
            self._execute("SELECT pg_advisory_unlock(?)", (_SCHEMA_LOCK,))

    def _connection(self) -> psycopg.Connection:
        """Return the open connection, connecting (again) when there is none, it broke, or the server closed
        it while it was idle (a restart between two calls: nothing was sent on it yet, so nothing runs twice).
        Raises HistoryError."""
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            if not self._hung_up(self._conn):
                return self._conn
            self._conn.close()
        try:
            # UTF-8 on the wire whatever the database's encoding: the server, not Python, refuses a character
            # a LATIN1 or SQL_ASCII database cannot hold (SQLSTATE 22P05), as one record's fault
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                                   application_name="edgekit", client_encoding="UTF8")
        except psycopg.Error as exc:
            raise self._failed(exc) from None
        try:
            # no JIT: a history query reads a few index entries a device, but a skip scan's devices are guessed, not
            # counted, and its estimate passed jit_above_cost: compiling took 1.6 s of a 2 ms read of the newest bench.
            # For the session (every statement is its own transaction: a SET LOCAL would need one around each read); a
            # server without JIT (PostgreSQL 10) has no such setting, and `SET jit` would refuse every connection.
            conn.execute("SELECT set_config('jit', 'off', false) WHERE current_setting('jit', true) IS NOT NULL")
        except psycopg.Error as exc:
            conn.close()  # never kept half set up: the next call would take it as it is
            raise self._failed(exc) from None
        self._conn = conn
        return conn

    @staticmethod
    def _hung_up(conn: psycopg.Connection) -> bool:
        """Return True when the idle connection has something to read: between statements the server says
        nothing unless it is going away (a shutdown's FATAL message, then end of file; this store listens to
        no notifications), so that connection is dropped before a statement is sent on it."""
        try:
            return bool(select.select([conn.fileno()], [], [], 0)[0])
        except (OSError, ValueError, psycopg.Error):
            return True

    def _failed(self, exc: BaseException) -> HistoryError:
        """Return the one-line error for a failure of this database: what happened and what to do."""
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, psycopg.errors.InsufficientPrivilege):  # up and named right: the role lacks a grant
            return HistoryError(f"the history database {self.where} refused ({reason}): the role needs a grant on it, "
                                "e.g. GRANT SELECT ON ALL TABLES IN SCHEMA public TO <role> (tables a newer edge-kit "
                                "added, such as alerts, are not in grants given table by table), then run again")
        return HistoryError(f"the history database {self.where} failed ({reason}): check that the server is up and "
                            "--history names it, then run again")

    def close(self) -> None:
        """Close the connection; return nothing."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    #: :meth:`HistoryStore._gaps_around`' gaps, each record's looked up through ``gaps (device, kind, last_missing)``
    #: (a LATERAL subquery, kept apart by ``OFFSET 0``): joined as one, PostgreSQL hashed the whole ``gaps`` table at
    #: every batch a ``--share`` worker stored (tens of milliseconds a batch at 200,000 gap rows, growing with them).
    GAPS_AROUND_JOIN = ("CROSS JOIN LATERAL (SELECT x.device, x.kind, x.first_missing, x.last_missing, x.ts FROM gaps x "
                        "WHERE x.device = b.device AND x.kind = b.kind AND x.last_missing >= b.seq AND "
                        "x.first_missing <= b.seq AND x.ts >= {since} OFFSET 0) g")

    #: :attr:`HistoryStore.ROWS_JOIN` as a LATERAL subquery kept apart by ``OFFSET 0``: joined as one, PostgreSQL merged
    #: or hashed the whole table with each device's bound (each device's newest bench records read the table whole).
    ROWS_JOIN = "CROSS JOIN LATERAL (SELECT * FROM {table} t WHERE {on} OFFSET 0) t"
    #: :attr:`HistoryStore.ONE` as a range of one: ``x.device = ?`` let the planner walk ``bench (sha256, ts)`` for a
    #: device's first artifact, reading every other device's records of it.
    ONE = "{0} >= {1} AND {0} <= {1}"
    #: :attr:`HistoryStore.VARIANT_KEY`: an index row holds at most 2,704 bytes, and a variant's name is any length.
    VARIANT_KEY = "md5({0})"

    def _newest_join(self, table: str, match: str, keep: int) -> str:
        """Return :meth:`HistoryStore._newest_join` as a LATERAL subquery that walks the index down from the newest and
        stops at ``keep`` rows: with the rows since a bound from a subquery, whose value the planner cannot estimate,
        PostgreSQL read a one-device history's whole table (each of its rows matched the device)."""
        return (f"CROSS JOIN LATERAL (SELECT * FROM {table} t WHERE {match.format('t')} AND t.ts IS NOT NULL "
                f"ORDER BY t.ts DESC, t.seq DESC LIMIT {int(keep)}) t")

    @staticmethod
    def _sql(sql: str) -> str:
        """Return the shared SQL with psycopg's placeholders (the shared SQL has no literal ``?`` or ``%``)."""
        return sql.replace("?", "%s")

    def _execute(self, sql: str, args: tuple = ()) -> int:
        """Run one statement (autocommit); return its row count. Raises HistoryError."""
        with self._lock:
            conn = self._connection()
            try:
                return conn.execute(self._sql(sql), args).rowcount
            except psycopg.Error as exc:
                raise self._failed(exc) from exc

    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Run one query; return its rows (none, without asking, for a reader of a database without edge-kit tables:
        :meth:`_no_history`). Raises HistoryError."""
        if self._empty:
            return []
        with self._lock:
            conn = self._connection()
            try:
                return conn.execute(self._sql(sql), args).fetchall()
            except psycopg.Error as exc:
                raise self._failed(exc) from exc

    def _columns(self, table: str) -> set[str]:
        """Return the names of ``table``'s columns (in the connection's schema). Raises HistoryError."""
        return {r[0] for r in self._rows("SELECT column_name FROM information_schema.columns WHERE table_name = ? "
                                         "AND table_schema = current_schema()", (table,))}

    def _add_column(self, table: str, column: str, sql_type: str) -> None:
        """Add ``column`` unless it is there; return nothing. Raises HistoryError."""
        self._execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {sql_type}")

    def _write_batch(self, statements: list[tuple[str, list[tuple]]]) -> int:
        """Run every statement over its rows (pipelined ``executemany``) in one transaction; return the
        summed row count. Raises HistoryRecordError when the server refused a row for what it holds (a NUL in text,
        a number out of range, a character the database's encoding lacks, an index row too long) or the driver could
        not send it, else HistoryError (either way the transaction is rolled back: nothing stored)."""
        new = 0
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction(), conn.cursor() as cur:
                    for sql, rows in statements:
                        cur.executemany(self._sql(sql), rows)
                        new += cur.rowcount
            # DataError also when psycopg itself refuses a value before sending it (a NUL in text: no SQLSTATE)
            except (psycopg.DataError, UnicodeEncodeError, OverflowError) as exc:
                raise self._refused(exc) from exc
            except psycopg.Error as exc:
                if (exc.sqlstate or "")[:2] in _RECORD_SQLSTATES:
                    raise self._refused(exc) from exc
                raise self._failed(exc) from exc
        return new

    def _refused(self, exc: BaseException) -> HistoryRecordError:
        """Return the one-line error for a row this database refused for what it holds."""
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return HistoryRecordError(f"the history database {self.where} refused a record ({reason}): it cannot be stored "
                                  "as it is; the others are")
