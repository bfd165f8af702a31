"""A full disk is a state the agent reports, not a crash.

The agent keeps a small reserve file (``<root>/.reserve``, ``store.reserve_mb``) while the disk has
room. When a write fails for lack of space (``ENOSPC``, ``EDQUOT`` or SQLite's "database or disk is
full"), the reserve is deleted so the answer saying so can still be written to the spool and sent;
and while the free space under the root is below ``store.min_free_mb`` the agent refuses every
command that would write a model or switch ``current``, with an ack that says how much to free.
When space returns, the reserve is put back and the agent works as before. Telemetry and the
retained status carry the figures (``disk``), which the monitor alerts on.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import sqlite3
import time
from pathlib import Path
from stat import S_ISDIR, S_ISREG
from typing import Any, Iterator

from device_agents.errors import DiskFull
from edgekit_protocol.files import read_head, within_limit
from edgekit_protocol.messages import strict_loads

log = logging.getLogger("edgekit.agent")
RESERVE = ".reserve"
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_out_of_space(exc: BaseException) -> bool:
    """Return True when ``exc`` (or what it wraps) says the filesystem has no room left."""
    while exc is not None:
        if isinstance(exc, DiskFull):
            return True
        if isinstance(exc, OSError) and exc.errno in _SPACE_ERRNOS:
            return True
        if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


class Disk:
    """The filesystem under the agent's root: free space, the reserve, and the full/not-full state."""

    def __init__(self, root: Path, *, reserve_bytes: int = 1 << 20, min_free_bytes: int = 4 << 20):
        self.root = Path(root)
        self.reserve = self.root / RESERVE
        self.reserve_bytes = reserve_bytes
        self.min_free_bytes = min_free_bytes
        self.full = False  # a write failed for lack of space, and the space has not come back since

    def usage(self) -> dict[str, Any]:
        """Return ``{"free_bytes", "total_bytes", "full", "reserve_bytes", "min_free_bytes"}`` measured now
        (``os.statvfs`` through :func:`shutil.disk_usage`; ``full`` as last observed)."""
        u = shutil.disk_usage(self.root)
        return {"free_bytes": u.free, "total_bytes": u.total, "full": self.full, "reserve_bytes": self._reserved(),
                "min_free_bytes": self.min_free_bytes}

    def _reserved(self) -> int:
        """Return the reserve's size now (0 when another thread just released it)."""
        try:
            return self.reserve.stat().st_size
        except OSError:
            return 0

    def release(self) -> None:
        """Delete the reserve (a write just failed for lack of space) and remember the disk is full."""
        if not self.full:
            log.error("disk full under %s (%d bytes free): refusing installs and activations until space returns",
                      self.root, shutil.disk_usage(self.root).free)
        self.full = True
        self.reserve.unlink(missing_ok=True)

    def refresh(self) -> None:
        """Put the reserve back when there is room for it above the floor; ``full`` is then whether the
        free space is below the floor.

        Never raises: a reserve that cannot be written is tried again next time.
        """
        was = self.full
        if self._reserved() < self.reserve_bytes and shutil.disk_usage(self.root).free >= self.reserve_bytes + self.min_free_bytes:
            tmp = self.reserve.with_name(RESERVE + ".tmp")
            try:
                with open(tmp, "wb") as f:  # written, not sparse: the blocks are really held
                    for at in range(0, self.reserve_bytes, 1 << 16):
                        f.write(bytes(min(1 << 16, self.reserve_bytes - at)))
                    os.fsync(f.fileno())
                os.replace(tmp, self.reserve)
            except OSError:
                tmp.unlink(missing_ok=True)
        self.full = shutil.disk_usage(self.root).free < self.min_free_bytes
        if was and not self.full:
            log.info("disk space is back under %s: installs and activations allowed again", self.root)

    def check(self, what: str, needs: int = 0) -> None:
        """Refuse ``what`` while the disk is full or would be with ``needs`` more bytes.

        Raises:
            DiskFull: the text names the free space, the floor and what to free.
        """
        free = shutil.disk_usage(self.root).free
        if self.full or free - needs < self.min_free_bytes:
            self.full = self.full or free < self.min_free_bytes
            raise DiskFull(f"disk full: {what} refused; {_mb(free)} free under {self.root}, needs "
                           f"{_mb(needs + self.min_free_bytes)} (store.min_free_mb {_mb(self.min_free_bytes)} "
                           f"+ {_mb(needs)}); free space on the device or lower store.max_store_mb")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def atomic_write(path: Path, data: bytes, tmp_dir: Path | None = None, mode: int = 0o666) -> None:
    """Write ``data`` to ``path`` through a temporary file (in ``tmp_dir``, same filesystem; default
    beside it; created with ``mode`` less the umask, e.g. 0o600 for a private key), fsync it, rename it
    over ``path`` and fsync ``path``'s folder (:func:`durable_replace`): readers see the old file or
    the new one, whole, and after a power loss too; returns nothing.

    The temporary file is named ``.<name>.<pid>.tmp``; one left by a killed process is removed by
    :func:`sweep_tmp`.

    Raises:
        OSError: the write failed (the temporary file is removed).
    """
    tmp = (tmp_dir or path.parent) / f".{path.name}.{os.getpid()}.tmp"
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        durable_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def durable_replace(src: Path, dst: Path) -> None:
    """Rename ``src`` over ``dst`` atomically (rename(2)), then fsync the folders it changed
    (``dst``'s, and ``src``'s when it is another one), so a power loss after this returns cannot lose
    or undo the rename; returns nothing.

    Raises:
        OSError: the rename failed (nothing changed).
    """
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)
    if Path(src).parent.resolve() != Path(dst).parent.resolve():
        fsync_dir(Path(src).parent)


def pid_alive(pid: int) -> bool:
    """Return True when a process ``pid`` runs (this one included): what a leftover named by its pid waits for,
    and what stopping a process waits for. A zombie (it has exited; its parent, or the init that inherited it,
    has not reaped it yet) does not run: an init that reaps orphans only now and then (a container's, a VM's)
    would otherwise hold every wait for a stopped process until it gets round to it."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it is there, as another user's (or its zombie: read on)
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:  # no /proc here, or it was reaped meanwhile: the signal said it was there
        return True
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")  # the state after "pid (name) "


def boot_time() -> float | None:
    """Return when this machine booted (unix time: ``btime`` in ``/proc/stat``, whole seconds), or None where there
    is no such line to read."""
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def started(pid: int) -> float | None:
    """Return when process ``pid`` started (unix time: this boot's ``btime`` plus its ``starttime`` in
    ``/proc/<pid>/stat``; up to a second early, never late), or None where either cannot be read (it is gone, no
    /proc) or the sum is in the future (a ``btime`` that is not the one its ``starttime`` counts from)."""
    booted = boot_time()
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            ticks = int(f.read().rsplit(b")", 1)[1].split()[19])  # field 22, counted after "pid (name)"
    except (OSError, ValueError, IndexError):
        return None
    at = None if booted is None else booted + ticks / os.sysconf("SC_CLK_TCK")
    return at if at is not None and at <= time.time() else None


MTIME_SLACK_S = 2.0  # how much earlier than its change a file's mtime may say (FAT keeps even seconds, rounded down)


def maker_gone(path: Path, pid: int) -> bool:
    """Return True when ``path``, a leftover named by the ``pid`` of the process that made it, is no longer that
    process's: no process ``pid`` runs, or ``path`` last changed before the process that has that pid now started
    (:func:`started`, else this boot: after a power loss, or a container's restart, the agent itself may get its old
    pid back; its mtime more than :data:`MTIME_SLACK_S` earlier) and no one holds it (:func:`held`). A leftover that is
    no file or folder (a FIFO, a device) is never opened. Never raises: a ``path`` gone meanwhile is the maker's no
    more either.

    A clock set back since (a Raspberry Pi without a real-time clock, before NTP) can make an old leftover look newer
    than that start: it is then kept, as while its maker ran, until that pid is free. One set forward (NTP, then)
    moves the start forward too, so a leftover in the making can look older: the hold keeps it.
    """
    if not pid_alive(pid):
        return True
    since = started(pid) or boot_time()  # another user's process, under a /proc mounted hidepid: the boot
    try:
        st = os.lstat(path)
        if since is None or st.st_mtime >= since - MTIME_SLACK_S:
            return False
        if not (S_ISDIR(st.st_mode) or S_ISREG(st.st_mode)):
            return True  # a link (made and renamed at once, never held), a FIFO or a device: never opened
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # replaced by a FIFO since: no wait
    except OSError:  # gone meanwhile
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:  # held by the process making it; else a filesystem that takes no flock (NFS: EBADF)
        return exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def held(path: Path) -> Iterator[None]:
    """Hold ``path`` (a file or folder named by this process's pid, in the making) for the block: :func:`maker_gone`
    keeps it while held, whatever the clock says (an exclusive flock, ended with the block or the process; where the
    filesystem takes no flock, the block runs unheld).

    Raises:
        OSError: ``path`` cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


_TMP = re.compile(r"^\..+\.(\d+)\.tmp$")


def sweep_tmp(folder: Path) -> list[str]:
    """Remove the temporary files of :func:`atomic_write` (``.<name>.<pid>.tmp``) in ``folder`` whose
    writer no longer runs (killed, or the power went, mid-write: :func:`maker_gone`).

    Returns:
        The names removed. Never raises: a file that cannot be removed is tried again next time.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TMP.match(entry.name)
        if m and maker_gone(entry, int(m.group(1))) and (entry.is_symlink() or not entry.is_dir()):
            try:
                entry.unlink()
                removed.append(entry.name)
            except OSError:
                pass
    return removed


def sha256_of(path: Path) -> str:
    """Return the hex sha256 of a file's content. Raises OSError when it cannot be read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; return nothing. File systems that refuse
    fsync on a folder are let be: the files themselves were fsynced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


SMALL_FILE = 64 * 1024  # what the agent's own small JSON files (desired state, keys list, records) may take


def read_bounded(path: Path, limit: int) -> bytes:
    """Return the bytes of ``path`` (:func:`read_head`) when they are at most ``limit`` (:func:`within_limit`).

    Raises:
        OSError: it cannot be read (FileNotFoundError: there is none).
        ValueError: it holds more than ``limit`` bytes (the text names it and the limit).
    """
    return within_limit(read_head(path, limit), limit, str(path))


def read_json(path: Path, limit: int = SMALL_FILE) -> Any:
    """Return the JSON value in the file ``path`` (at most ``limit`` bytes: :func:`read_bounded`), parsed as the
    receivers parse a message (:func:`edgekit_protocol.messages.strict_loads`: no NaN or infinity, which no signed
    message can carry, no key twice). For the agent's own files, which may be damaged or edited by hand.

    Raises:
        OSError: it cannot be read (FileNotFoundError: there is none).
        ValueError: over ``limit``, not UTF-8, not JSON, or a NaN, an infinity or a key twice (a MessageError), the path
            named.
    """
    return strict_loads(read_bounded(path, limit), str(path))
