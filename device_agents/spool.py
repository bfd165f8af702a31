"""The on-disk outbox: every record is written here before it is published, and removed on PUBACK (in the
transaction of the next write: a PUBACK costs no commit of its own).

SQLite (standard library) in WAL mode: one row per message, plus the per-kind ``seq`` counters,
so a record and its sequence number are committed together and survive an agent restart.
Benchmark records are committed with ``synchronous=FULL`` (fsync, survive power loss);
the periodic kinds (telemetry, live, shadow) with ``NORMAL`` (survives a crash of the agent, may
lose the last rows on power loss), which is what keeps the spool fast enough for a chatty telemetry
interval.

SQLite's checkpoints (the WAL's pages copied into the database file, with two fsyncs) are kept off the writer's path:
the publisher's thread runs them on a connection of its own (:meth:`Spool.checkpoint`) every :data:`CHECKPOINT_EVERY`
commits while the writer goes on, holding it back only to copy the last pages of a WAL past
:data:`WAL_RESTART_PAGES`, so the WAL starts over at the next write. The WAL stays under :data:`WAL_MAX_PAGES` pages
(16 MB) even when no checkpoint comes from there: past it the writer checkpoints itself, as SQLite does by default at
1,000 pages. A writer :data:`WAL_AHEAD` commits past the start of a checkpoint still running (a slow disk: SQLite skips
the writer's own checkpoints meanwhile) waits for it to end, then checkpoints itself, so the bound holds on a slow disk
too. A checkpoint moves what is already committed: a crash at any moment loses nothing (SQLite replays the WAL at the
next open). A WAL file that a burst grew past :data:`WAL_RESTART_PAGES` pages is cut back to that size when it starts
over (SQLite's ``journal_size_limit``): a device's disk does not keep the burst's 16 MB.

The spool is bounded by ``max_records``. When it is full the oldest periodic row (:data:`DROPPABLE`:
telemetry, live figures, shadow comparisons; each is superseded by the next) is dropped to make room;
benchmark records are never dropped (the bound may be exceeded for them). Every drop is counted per
kind, persisted, and reported in telemetry and the ``state`` command.

The spool also holds its ``epoch``: a random id created with the spool, which every message the agent numbers
carries, so a receiver tells a device whose numbering started again (re-imaged, its state root wiped, a damaged
spool moved aside: ``seq`` from 1 again) from one that lost records. An agent that was running when its device lost
power takes a new epoch at its next start too (``seq`` from 1): the periodic kinds' last rows and counters may be lost
with the power, and their numbers would otherwise be given again to other messages.

A spool that is not a database any more, or whose pages SQLite's ``quick_check`` finds damaged at the agent's
start (a damaged file, a write cut by a power loss on a card that lies about fsync), is moved aside
(``spool.db.damaged-<unix time>``, ``~1``... added when one kept has that name; kept for a look) and a new one
started, so the agent still starts; the new one counts it (``damaged_spools``) and starts its command horizon at this
device's clock, so a command that expired by it is refused before it is taken. A new spool's horizon starts no
earlier than the device's provisioning (``horizon_floor``).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

from edgekit_protocol.messages import MAX_SKEW_S

log = logging.getLogger("edgekit.agent.spool")
DROPPABLE = ("telemetry", "live", "shadow")  # the periodic kinds: the next message of each supersedes the last
COUNT_EVERY_S = 1.0  # counters (count()) reach the disk at most this often: a flood of refusals is not a commit each
HORIZON_S = 300.0  # how far behind the newest command's ts a command may still expire (commands sent in parallel)
CHECKPOINT_EVERY = 100  # commits (about 500 WAL pages of telemetry records) after which checkpoint() copies the WAL
WAL_RESTART_PAGES = 1000  # a WAL this long is made to start over by checkpoint() (4 MB of 4 KiB pages)
WAL_MAX_PAGES = 4000  # the writer checkpoints itself past this many WAL pages (SQLite's wal_autocheckpoint; 16 MB)
WAL_AHEAD = 300  # commits (about 1,500 WAL pages) after a checkpoint began past which the writer waits for it to end,
# if it is still running, and checkpoints itself (the WAL under WAL_MAX_PAGES however slow the disk)


def _boot_id() -> int:
    """Return this boot of the machine as a number (the first 60 bits of Linux's ``boot_id``, random at each boot),
    0 where there is none to read."""
    try:
        return int(Path("/proc/sys/kernel/random/boot_id").read_text().replace("-", "").strip()[:15], 16)
    except (OSError, ValueError):
        return 0


class Spool:
    """A bounded, persistent FIFO of ``(kind, topic, payload)`` rows. Thread-safe."""

    def __init__(self, path: Path, max_records: int = 10_000, *, horizon_floor: float = 0.0):
        """Open (or create) the spool at ``path``. ``horizon_floor`` is a unix time no command taken here
        can be older than by more than :data:`HORIZON_S` (when the device was provisioned, by the
        operator's clock): the command horizon starts there, so a command captured before a device's
        root was wiped is not run again, whatever the device's clock says. A floor ahead of this
        device's clock by more than the skew a command's ``ts`` may have (``MAX_SKEW_S``) counts only up to
        there: like a command from the future, it must not push the horizon, which never moves back, past
        every command the operator will send (an operator clock set years ahead, a hostile file).

        Raises:
            ValueError: ``max_records`` is below 1.
            sqlite3.OperationalError: the file cannot be opened (locked, read-only, no space).
        """
        if max_records < 1:
            raise ValueError("spool max_records must be at least 1")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_records = max_records
        self._lock = threading.Lock()
        self._ckpt_lock = threading.Lock()  # one checkpoint() at a time, and none once closed
        self._commits = 0  # commits since checkpoint() last ran (add() and the deletions of acknowledged rows)
        try:
            self._open()
            # every page of every table read, damage inside shows here, not mid-run: measured (records of 1.3 KB, a VM's
            # disk, file evicted from the page cache) 0.3-0.45 s for 10,000 and 2.2-3.2 s for 100,000 (137 MB), where the
            # open took 15 and 160-410 ms before; 12 and 150 ms when cached. An SD card reads slower
            problems = self._db.execute("PRAGMA quick_check").fetchall()
            if problems != [("ok",)]:
                raise sqlite3.DatabaseError(f"damaged: {problems[0][0]}")
            damaged = None
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):  # locked, read-only, no space: not damage
                raise
            if getattr(self, "_db", None) is not None:
                self._db.close()
            name = f"{self.path.name}.damaged-{int(time.time())}"
            damaged, n = self.path.with_name(name), 0
            # one kept before in the same second (a clock without RTC boots at its last saved time): never renamed over
            while any(damaged.with_name(damaged.name + suffix).exists() for suffix in ("", "-wal", "-shm")):
                n += 1
                damaged = self.path.with_name(f"{name}~{n}")
            for suffix in ("", "-wal", "-shm"):
                src = self.path.with_name(self.path.name + suffix)
                if src.exists():
                    src.rename(damaged.with_name(damaged.name + suffix))
            log.error("%s: not a sound database (%s); moved to %s and a new spool started (records not yet sent "
                      "are in the old one)", self.path, exc, damaged.name)
            self._open()
        self._count = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        self._sync = ""
        self._undone: set[int] = set()  # acknowledged rows a full disk kept us from deleting
        self._acked: deque[int] = deque()  # acknowledged rows not deleted yet: done() appends, without the lock
        self._unsaved: dict[str, int] = {}  # next_seq numbers a full disk kept us from writing
        self._uncounted: dict[str, int] = {}  # count()s not on disk yet (at most COUNT_EVERY_S old)
        self._counted_at = 0.0  # monotonic time counters last reached the disk
        with self._lock:
            if damaged is not None:
                self._bump("damaged_spools")
            self.epoch = self._epoch(renew=self._after_power_loss())
            # the ids taken before a damage are gone: this clock's word; at least the provisioning's
            now = time.time()
            at = max(min(horizon_floor, now + MAX_SKEW_S), now if damaged is not None else 0.0)
            horizon = int((at - HORIZON_S) * 1000)
            if horizon > self._counter("horizon_ms"):  # never moves back
                self._db.execute("INSERT OR REPLACE INTO counters (name, value) VALUES ('horizon_ms', ?)", (horizon,))

    def _epoch(self, renew: bool = False) -> str:
        """Return this spool's epoch (16 hex digits), created at random when it has none (a new spool, or one an older
        agent made: its numbering goes on, and receivers take a device's first epoch as no restart) or when ``renew``
        asks, with every kind's ``seq`` from 1 again (after a power loss: see :meth:`_after_power_loss`); caller
        holds the lock. Never raises: a disk too full to keep it gives one for this run only (the next start names
        another, which receivers record as a restart)."""
        value = self._counter("epoch")
        if not value or renew:
            value = secrets.randbits(62) | 1
            try:
                with self._transaction():
                    self._db.execute("DELETE FROM counters WHERE name LIKE 'seq.%'")
                    self._db.execute("INSERT OR REPLACE INTO counters (name, value) VALUES ('epoch', ?)", (value,))
            except sqlite3.OperationalError as exc:
                log.warning("spool: its epoch not persisted: %s", exc)
        return f"{value:016x}"

    def _after_power_loss(self) -> bool:
        """Return whether the agent that had this spool open last was still running when its device lost power (or was
        reset): it never closed the spool (:meth:`close` records that it did), and the machine booted since (another
        ``boot_id``; an agent that crashed or was killed had its commits kept by the kernel). The periodic kinds commit
        without fsync, so such a loss can take the last of their rows and ``seq`` counters with it, and their numbers
        would be given again to other messages in the same epoch: a new epoch is taken instead, which receivers record
        as a restart. Records this boot and the spool open, with one fsync; caller holds the lock. Never raises: where
        there is no boot id (not Linux) or the disk is full, the numbering goes on as before."""
        boot = _boot_id()
        if not boot:
            return False
        last, closed = self._counter("boot"), self._counter("closed")
        try:
            self._synchronous("FULL")
            with self._transaction():
                self._db.executemany("INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)",
                                     [("boot", boot), ("closed", 0)])
        except sqlite3.OperationalError as exc:
            log.warning("spool: this start not recorded: %s", exc)
        lost = bool(last) and last != boot and not closed
        if lost:
            log.warning("%s: the agent was running when the device lost power or was reset; its periodic records may "
                        "have lost their last numbers, so it numbers in a new epoch", self.path)
        return lost

    def _open(self) -> None:
        """Open the database and create its tables (returns nothing).

        Raises:
            sqlite3.DatabaseError: the file is not a database (damaged), or cannot be opened.
        """
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_MAX_PAGES}")
        # a WAL a burst grew past WAL_RESTART_PAGES is cut back to that when it starts over (it kept its largest size)
        page = self._db.execute("PRAGMA page_size").fetchone()[0]
        self._db.execute(f"PRAGMA journal_size_limit={WAL_RESTART_PAGES * page}")
        self._db.execute("CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                         "kind TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, n INTEGER NOT NULL, expires REAL NOT NULL)")
        if "expires" not in {row[1] for row in self._db.execute("PRAGMA table_info(seen)")}:  # a spool of 0.2
            # ids taken before expiries were kept: remember them for a day more (the longest command TTL)
            self._db.execute(f"ALTER TABLE seen ADD COLUMN expires REAL NOT NULL DEFAULT {time.time() + 86400:.0f}")
        self._db.execute("CREATE TABLE IF NOT EXISTS inbox (id TEXT PRIMARY KEY, n INTEGER NOT NULL, payload BLOB NOT NULL, "
                         "started INTEGER NOT NULL DEFAULT 0)")
        self._ckpt: sqlite3.Connection | None = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)

    def _synchronous(self, sync: str) -> None:
        """Set how the next commits reach the disk (caller holds the lock): ``FULL`` fsyncs each commit
        (a power loss keeps it), ``NORMAL`` does not (telemetry: a crash of the agent keeps it, a power
        loss may not). Returns nothing."""
        if sync != self._sync:
            self._db.execute(f"PRAGMA synchronous={sync}")
            self._sync = sync

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """Run the block in one write transaction (caller holds the lock): committed when the block ends, rolled back
        when it or the commit raises (a full disk), and the exception goes on."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _counter(self, name: str) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return (row[0] if row else 0) + self._uncounted.get(name, 0)

    def _bump(self, name: str, by: int = 1) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        value = (row[0] if row else 0) + by
        self._db.execute("INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)", (name, value))
        return value

    def _save_counts(self) -> None:
        """Write the counts :meth:`count` holds to disk, in one transaction (caller holds the lock); returns nothing.
        A failed write (a full disk) keeps them held for the next try."""
        if not self._uncounted:
            return
        held, self._uncounted = self._uncounted, {}
        try:
            with self._transaction():
                for name, by in held.items():
                    self._bump(name, by)
        except BaseException:
            for name, by in held.items():
                self._uncounted[name] = self._uncounted.get(name, 0) + by
            raise
        self._counted_at = time.monotonic()

    def next_seq(self, kind: str) -> int:
        """Return the next sequence number of ``kind`` for a message published without the outbox (a
        retained ``status``), taken at once and persisted so it keeps rising across restarts. Never
        raises: when the disk is too full to write it, the number is kept in memory until it can be."""
        with self._lock:
            value = self._upcoming("seq." + kind)
            self._save_seq("seq." + kind, value)
            return value

    def upcoming_seq(self, kind: str) -> int:
        """Return the number :meth:`next_seq` would return for ``kind``, without taking it: a message that must number
        only what went out (the retained ``reported``, tried again until it does) takes it with :meth:`took_seq`
        once it was handed to the broker connection, so a failed try leaves no gap in its sequence. The caller holds
        one lock of its own from this number to :meth:`took_seq` (the agent's ``_report``): two threads between the
        two would send two messages under one number. Never raises."""
        with self._lock:
            return self._upcoming("seq." + kind)

    def took_seq(self, kind: str, seq: int) -> None:
        """Record that a message of ``kind`` went out numbered ``seq`` (:meth:`upcoming_seq`): the counter rises to
        it, never back, persisted as :meth:`next_seq` persists it; returns nothing, never raises."""
        with self._lock:
            self._save_seq("seq." + kind, max(seq, self._upcoming("seq." + kind) - 1))

    def _upcoming(self, name: str) -> int:
        """Return the number after the counter ``name`` (on disk or held in memory); caller holds the lock."""
        return max(self._counter(name), self._unsaved.get(name, 0)) + 1

    def _save_seq(self, name: str, value: int) -> None:
        """Write the counter ``name`` as ``value``, or hold it in memory when the disk is too full (caller holds the
        lock); returns nothing."""
        try:
            self._db.execute("INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)", (name, value))
            self._unsaved.pop(name, None)
        except sqlite3.OperationalError as exc:  # "database or disk is full"
            self._unsaved[name] = value
            log.warning("spool: %s = %d not persisted yet: %s", name, value, exc)

    def add(self, kind: str, topic: str, build: Callable[[int], bytes],
            answers: str | None = None) -> tuple[int | None, bytes | None]:
        """Number, build and store one message in a single transaction.

        ``build(seq)`` returns the payload for the next sequence number of ``kind``; ``answers`` names
        the taken command this message answers, which leaves the inbox in the same transaction.

        Returns:
            ``(row id, payload)``; ``(None, None)`` when the spool is full of undroppable rows and
            this row, of a :data:`DROPPABLE` kind, was dropped instead (counted).

        Raises:
            Exception: what ``build`` raises (``PayloadTooLarge``...): the transaction is rolled back, so no
                sequence number is taken, no older row dropped and the inbox is as it was.
            sqlite3.Error: the spool cannot be written (a full disk), rolled back likewise.
        """
        if self._commits >= WAL_AHEAD and self._ckpt_lock.locked():  # outran the publisher's checkpoint
            self.checkpoint(wait=True)
        with self._lock:
            self._synchronous("NORMAL" if kind in DROPPABLE else "FULL")
            self._db.execute("BEGIN IMMEDIATE")
            dropped = 0  # rows this transaction deletes: counted once it commits (a failed build rolls them back)
            try:
                acked, gone = self._forget()
                if self._count - gone >= self.max_records:
                    oldest = self._db.execute(f"SELECT id, kind FROM outbox WHERE kind IN ({', '.join('?' * len(DROPPABLE))}) "
                                              "ORDER BY id LIMIT 1", DROPPABLE).fetchone()
                    if oldest is not None:
                        self._db.execute("DELETE FROM outbox WHERE id = ?", oldest[:1])
                        dropped = 1
                        self._bump("dropped." + oldest[1])
                    elif kind in DROPPABLE:
                        self._bump("dropped." + kind)
                        self._db.execute("COMMIT")
                        self._undone -= acked
                        self._count -= gone
                        return None, None
                payload = build(self._bump("seq." + kind))
                if answers is not None:
                    self._db.execute("DELETE FROM inbox WHERE id = ?", (answers,))
                row = self._db.execute("INSERT INTO outbox (kind, topic, payload) VALUES (?, ?, ?)",
                                       (kind, topic, payload)).lastrowid
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._undone -= acked
            self._count += 1 - dropped - gone
            self._commits += 1
            return row, payload

    def done(self, row_id: int) -> None:
        """Forget a row once the broker has acknowledged it (idempotent); returns nothing, never raises.

        It is deleted in the transaction of the next :meth:`add`, or at the next :meth:`stats`, :meth:`close` or
        :meth:`pending` with nothing to return (the publisher polls so at least every half second while connected),
        and left out of :meth:`pending` meanwhile: a PUBACK costs no commit of its own, and paho's network thread,
        which calls this, neither writes the disk nor waits for this spool's lock. A row not deleted yet at a crash
        is sent again after the restart, as one a disk too full to delete it kept (SQLite writes the deletion to its
        log first): receivers drop both by ``msg_id``.
        """
        self._acked.append(row_id)  # deque.append is atomic: no lock

    def _forget(self) -> tuple[set[int], int]:
        """Delete the acknowledged rows (:meth:`done`, and those a full disk kept) in the transaction the caller holds
        open with the lock. Returns the rows tried and how many were still there: once the caller committed, it takes
        the first from ``_undone`` and the second from ``_count``.

        Raises:
            sqlite3.OperationalError: the deletion cannot be written (a full disk): the caller rolls back.
        """
        acked = self._acknowledged()
        return acked, sum(self._db.execute("DELETE FROM outbox WHERE id = ?", (row,)).rowcount for row in sorted(acked))

    def _acknowledged(self) -> set[int]:
        """Return (a copy of) the acknowledged rows not deleted yet, taking :meth:`done`'s into ``_undone`` one by one
        (a deque's popleft is atomic, iterating it while paho's thread appends is not); caller holds the lock."""
        while self._acked:
            self._undone.add(self._acked.popleft())
        return set(self._undone)

    def _forget_now(self) -> None:
        """Delete the acknowledged rows in a transaction of their own (caller holds the lock); returns nothing, never
        raises: a full disk keeps them for the next try."""
        if not self._acked and not self._undone:
            return
        try:
            with self._transaction():
                acked, gone = self._forget()
        except sqlite3.OperationalError as exc:  # "database or disk is full"
            log.warning("spool: %d acknowledged row(s) not deleted yet: %s", len(self._undone), exc)
            return
        self._undone -= acked
        self._count -= gone
        self._commits += 1

    def pending(self, limit: int = 1000, after: int = 0) -> list[tuple[int, str, bytes]]:
        """Return up to ``limit`` unacknowledged rows with id above ``after``, oldest first: the acknowledged rows
        not deleted yet are left out (they take none of ``limit``), and deleted when there is none to return (the
        publisher's poll while idle)."""
        with self._lock:
            acked = self._acknowledged()
            rows = [row for row in self._db.execute("SELECT id, topic, payload FROM outbox WHERE id > ? ORDER BY id "
                                                    "LIMIT ?", (after, limit + len(acked))) if row[0] not in acked]
            if not rows:
                self._forget_now()
            return rows[:limit]

    def stats(self) -> dict[str, int]:
        """Return ``pending`` (rows waiting), ``dropped_telemetry``, ``dropped_live`` and ``dropped_shadow`` (rows of
        each :data:`DROPPABLE` kind dropped for a full spool, ever), ``refused_commands``
        (forged, future-dated or malformed commands refused, ever), ``replayed_commands`` (commands
        whose id was taken before: redelivered or replayed, not run), ``expired_commands`` (expired
        before the newest command's horizon, not run), ``stale_desired`` (desired states whose revision was not
        above the one taken before: replays, never applied), ``failed_pulls`` (tries to reach a desired state
        that failed: store down, hash mismatch, disk full, smoke test...), ``ended_benches`` (benchmarks whose child
        crashed or was killed by its watchdog: a model that loops or crashes on its eval samples), ``unsent_reports``
        (tries to publish the retained ``reported`` state that failed: it is tried again until it goes out),
        ``oversize_messages`` (messages over the protocol's payload limit, never sent), ``unsignable_messages``
        (messages holding a NaN, an infinity or a value with no JSON form, which cannot be signed: never sent), ``damaged_spools``
        (spools found damaged and replaced at start) and ``max_records``."""
        with self._lock:
            self._forget_now()
            return {"pending": self._count, **{f"dropped_{k}": self._counter("dropped." + k) for k in DROPPABLE},
                    "refused_commands": self._counter("refused"), "replayed_commands": self._counter("replayed"),
                    "expired_commands": self._counter("expired"),
                    "stale_desired": self._counter("stale_desired"), "failed_pulls": self._counter("failed_pulls"),
                    "ended_benches": self._counter("ended_benches"),
                    "unsent_reports": self._counter("unsent_reports"), "oversize_messages": self._counter("oversize"),
                    "unsignable_messages": self._counter("unsignable"),
                    "damaged_spools": self._counter("damaged_spools"), "max_records": self.max_records}

    def count(self, name: str) -> None:
        """Add one to the persistent counter ``name``: on disk within :data:`COUNT_EVERY_S` (and at :meth:`close`), so
        a flood of refused or replayed commands costs one commit a second, not one each; returns nothing.

        Raises:
            sqlite3.Error, OSError: the counts could not be written (a full disk); they stay held.
        """
        with self._lock:
            self._uncounted[name] = self._uncounted.get(name, 0) + 1
            if time.monotonic() - self._counted_at >= COUNT_EVERY_S:
                self._save_counts()

    def take(self, msg_id: str, payload: bytes, ts: float, expires: float) -> str | None:
        """Record a command as taken and keep it until the message answering it is spooled
        (``add(..., answers=msg_id)``) or :meth:`drop` drops it, in one transaction (fsync).

        Command ids are kept until their command has expired by the sender's clock: the spool keeps a
        horizon, the newest ``ts`` of any command taken minus :data:`HORIZON_S`, never moving back;
        ids of commands that expired before it are deleted, and a command that expired before it is
        refused. So no id a replay could reuse is ever forgotten, whatever the device's own clock
        does (a Raspberry Pi without a real-time clock boots with yesterday's time).

        Returns:
            None when taken; ``"replayed"`` when its id was taken before (a redelivery or a replay:
            not to be run again); ``"expired"`` when it expired before the horizon.
        """
        with self._lock:
            self._synchronous("FULL")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                horizon = self._counter("horizon_ms") / 1000
                if expires < horizon:
                    self._db.execute("ROLLBACK")
                    return "expired"
                n = self._bump("seen")
                self._db.execute("INSERT INTO seen (id, n, expires) VALUES (?, ?, ?)", (msg_id, n, expires))
                self._db.execute("INSERT INTO inbox (id, n, payload) VALUES (?, ?, ?)", (msg_id, n, payload))
                moved = int((ts - HORIZON_S) * 1000)
                if moved > horizon * 1000:
                    self._db.execute("INSERT OR REPLACE INTO counters (name, value) VALUES ('horizon_ms', ?)", (moved,))
                    self._db.execute("DELETE FROM seen WHERE expires < ?", (moved / 1000,))
            except sqlite3.IntegrityError:
                self._db.execute("ROLLBACK")
                return "replayed"
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return None

    def seen_ids(self) -> int:
        """Return how many command ids are remembered (the ones not yet behind the horizon)."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM seen").fetchone()[0]

    def drop(self, payload: bytes) -> None:
        """Drop the taken commands whose payload is ``payload`` (one refused after a restart, or damaged in the spool:
        its id cannot be told from a payload that no longer reads); returns nothing."""
        with self._lock:
            self._db.execute("DELETE FROM inbox WHERE payload = ?", (payload,))

    def start(self, msg_id: str) -> None:
        """Mark a taken command as started, committed with fsync whatever was written before (telemetry
        is not): after a crash or a power loss it is answered "interrupted", never run again. Returns nothing."""
        with self._lock:
            self._synchronous("FULL")
            self._db.execute("UPDATE inbox SET started = 1 WHERE id = ?", (msg_id,))

    def pending_commands(self) -> list[tuple[bytes, bool]]:
        """Return ``(payload, started)`` of the commands taken but not answered (after a crash), oldest first."""
        with self._lock:
            return [(row[0], bool(row[1])) for row in self._db.execute("SELECT payload, started FROM inbox ORDER BY n")]

    def checkpoint(self, wait: bool = False) -> None:
        """Copy the WAL into the database file once :data:`CHECKPOINT_EVERY` commits were written since the last time
        (a no-op before): called by the publisher's thread, so the writer does not wait for the checkpoint's fsyncs.
        The copy runs on this spool's second connection without the lock (SQLite's PASSIVE checkpoint: writers go
        on). A WAL of :data:`WAL_RESTART_PAGES` or more then has the pages written meanwhile copied with the lock held,
        so the checkpoint is complete and the next write starts the WAL over: it does not grow without bound under a
        burst with no idle time (after a pause it starts over anyway: nothing was written meanwhile). Returns nothing,
        never raises: a failure (a full disk) is logged, and tried again after the next commits; a checkpoint already
        running, or a closed spool, makes it a no-op.

        ``wait`` (:meth:`add`'s, :data:`WAL_AHEAD` commits after the last began): wait for a checkpoint still running
        (a slow disk, whose checkpoint the writer outran: SQLite skips the writer's own meanwhile), then copy the
        whole WAL with the lock held, so the WAL starts over however slow the disk."""
        if self._commits < CHECKPOINT_EVERY or not self._ckpt_lock.acquire(blocking=wait):
            return
        try:
            if self._ckpt is None:  # closed
                return
            with self._lock:
                self._commits = 0
                if wait:
                    self._ckpt.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    return
            _, frames, _ = self._ckpt.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if frames >= WAL_RESTART_PAGES:
                with self._lock:  # the pages written meanwhile, the writer held back: complete, the WAL starts over
                    self._ckpt.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            log.warning("%s: WAL not checkpointed yet (%s)", self.path, exc)
        finally:
            self._ckpt_lock.release()

    def close(self) -> None:
        """Close the database (rows and counts stay on disk for the next start)."""
        with self._ckpt_lock:
            if self._ckpt is not None:
                self._ckpt.close()
                self._ckpt = None
        with self._lock:
            self._forget_now()
            try:
                self._save_counts()
                self._synchronous("FULL")  # the spool closed, and all before it, on disk: see _after_power_loss
                self._db.execute("INSERT OR REPLACE INTO counters (name, value) VALUES ('closed', 1)")
            except (sqlite3.Error, OSError) as exc:
                log.error("%s: counts not saved at close (%s)", self.path, exc)
            self._db.close()
