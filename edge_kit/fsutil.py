"""Small file helpers: content hashes and writes that are never seen half-done."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edge_kit.errors import InputError

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, or of every file under a directory (sorted by relative path).

    Raises:
        OSError: the path cannot be read.
    """
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def sha256_sums(folder: Path, names: list[str]) -> tuple[str, dict[str, str]]:
    """Return the sha256 of what ``sha256sum NAME...`` prints in ``folder`` for the files ``names`` (in that order;
    ``cd folder && sha256sum a.onnx a.data | sha256sum`` gives it), and {name: that file's sha256}: one name for
    several files, each of which can still be checked on its own.

    Raises:
        OSError: a file cannot be read.
    """
    sums = {name: sha256_file(Path(folder) / name) for name in names}
    return sha256_bytes("".join(f"{sums[name]}  {name}\n" for name in names).encode()), sums


def sha256_bytes(data: bytes) -> str:
    """Return the hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file in the same folder and ``os.replace``.

    Readers see either the old file or the complete new one, never a partial write.

    Raises:
        OSError: the folder is not writable or the disk is full (the temporary file is removed).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; artifacts and reports are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` (an existing folder) while the block runs: for a read-modify-write of
    files in it that another process (another edgekit command) may be doing at once; that one waits. The lock goes
    with the process should it be killed. Yields nothing.

    Raises:
        OSError: the folder cannot be opened.
    """
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def writable_folder(folder: Path, option: str = "--out", file: Path | None = None) -> Path:
    """Create ``folder`` (with its parents) when missing, check a file can be written in it, and return it.
    ``file``: the file the option named, to be written in ``folder`` (its parent), which the message then names.

    Raises:
        InputError: it cannot be created or written; the message names it (or ``file``), the reason (the OSError's
            strerror) and ``option`` to choose another.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".edgekit-write-test-"):
            pass
    except OSError as exc:
        why = "a file, not a folder" if isinstance(exc, FileExistsError) else exc.strerror or exc  # mkdir's EEXIST
        if file is not None:
            raise InputError(f"{file}: cannot write a file in {folder} ({why}); choose another {option}") from None
        raise InputError(f"{folder}: output folder is not writable ({why}); choose another with {option}") from None
    return folder
