"""Reading a file a user or a config names without waiting on it: a FIFO or a device there is refused in one line,
never opened for a read that waits for a writer or never ends, and no file is read past a bound."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def read_head(path: Path, limit: int) -> bytes:
    """Return the bytes of ``path``, read no further than ``limit`` + 1: enough for :func:`within_limit` to tell a
    file over ``limit``, and a file damaged, edited by hand or grown to gigabytes is never read whole (``limit`` 0
    only checks that it is a regular file that can be read). :func:`device_agents.disk.read_bounded` checks the size
    at once; a reader whose rule checks it with the rest of the file's contract (a model's ``meta.json``:
    :func:`device_agents.store.read_meta`) takes these bytes.

    Raises:
        OSError: it cannot be read (FileNotFoundError: there is none), or it is no regular file: a FIFO (opened without
            waiting for a writer, never read: open() waited for one, holding whoever read it) or a device such as
            /dev/zero (which would never end), errno EINVAL, strerror "not a regular file".
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return f.read(limit + 1)


def within_limit(data: bytes, limit: int, name: str) -> bytes:
    """Return ``data`` when it holds at most ``limit`` bytes: the one size check of a file read with
    :func:`read_head`, or on a device by the deploy's probe, which reads as much.

    Raises:
        ValueError: it holds more (``limit`` + 1 bytes: all that is read of a larger file); the text names ``name``
            and the limit.
    """
    if len(data) > limit:
        raise ValueError(f"{name}: over the {limit:,} bytes such a file may take")
    return data
