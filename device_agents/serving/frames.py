"""The serving API's wire format: one frame per request and per answer, on a Unix stream socket.

A frame is ``b"EKS1"``, the header's length (4 bytes, little endian), the header (UTF-8 JSON, at
most :data:`MAX_HEADER` bytes) and then the tensors' raw bytes, C order, one after another, as the
header's ``tensors`` list describes them (``name``, ``dtype``, ``shape``)::

    request  {"op": "predict", "tensors": [{"name": "image", "dtype": "float32", "shape": [1, 8, 8, 1]}]}
    answer   {"ok": true, "model": {"sha256": ..., "variant": ...}, "ms": 0.41, "tensors": [...]}
    error    {"ok": false, "error": "input 'image': shape [8, 8], the model takes [8, 8, 1] ..."}
    request  {"op": "info"}  ->  {"ok": true, "model": {...}, "inputs": [...], "outputs": [...]}

Tensors travel as bytes, never through JSON or pickle: a 640x640x3 float32 input is one 4.9 MB
copy into the socket and one out of it (the figures page quotes what the framing costs).

Large inputs may travel through shared memory instead: the client makes an anonymous memory file
(``memfd_create``), seals it against shrinking (``F_SEAL_SHRINK``) and passes its descriptor to the
server with a request (``SCM_RIGHTS``); that request and the following ones on the connection say
``"shm": true`` and give each tensor's ``offset`` in the file; no tensor bytes follow the header. The
server refuses a descriptor that is not such a sealed memory file, maps it once per connection
(private, copy on write: arrays the interpreter takes without a copy, no write of the server's
reaching the client) and reads the inputs in place (one copy fewer each way of the socket). The seal is what
makes the mapping safe: a file its client could shrink would kill the reading process (SIGBUS), the
whole agent. No file name is involved, so no other process can name, swap or read it. Answers always
come over the socket.
"""

from __future__ import annotations

import array
import json
import math
import os
import re
import socket
import struct
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from device_agents.lazy import LazyModule
from edgekit_protocol.errors import MessageError
from edgekit_protocol.messages import strict_loads

if TYPE_CHECKING:
    import numpy as np
else:  # imported at the first frame with tensors (one without, info, live, pause, goes without it), then a
    np = LazyModule("numpy", globals(), "np")  # plain global: a request runs no import statement

MAGIC = b"EKS1"
MAX_HEADER = 64 * 1024
# How the server's error answers begin after which it hangs up (shut for writing, then closed): a malformed request (the
# stream out of step), one that took too long to arrive, a client turned away (busy, or evicted for a new one). A
# client opens a new connection for its next request after one, not after the others (wrong shape, no model...).
MALFORMED, TIMED_OUT, BUSY = "malformed request: ", "timed out: ", "busy: "
HANGS_UP_AFTER = (MALFORMED, TIMED_OUT, BUSY)
DTYPES = ("float32", "float16", "float64", "uint8", "int8", "int16", "int32", "int64", "bool")
MAX_DIMS = 8


MAX_SOCKET_PATH = 107  # bytes of a Unix socket's path (sun_path, 108 with its NUL)


@contextmanager
def socket_address(path: Path) -> Iterator[str]:
    """Yield an address for binding or connecting a Unix socket at ``path`` whatever its length: the path itself when
    it fits :data:`MAX_SOCKET_PATH`, else the same file reached through its folder opened here
    (``/proc/self/fd/N/serve.sock``, valid while the block runs: a bound or connected socket keeps its file). A
    device root deeper than about 95 characters put ``serve.sock`` past the limit: the agent served nothing.

    Raises:
        OSError: the folder cannot be opened (missing, no permission).
    """
    if len(os.fsencode(str(path))) <= MAX_SOCKET_PATH or not hasattr(os, "O_PATH"):
        yield str(path)  # short, or no /proc/self/fd here: the OS says what is wrong with a long one
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def peer(sock: Any) -> tuple[int, int] | None:
    """Return ``(pid, uid)`` of the process at the other end of the Unix socket ``sock`` (SO_PEERCRED: as it was when
    it connected), or None where the system does not say (not Linux) or the socket is gone. Never raises."""
    try:
        pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                             struct.calcsize("3i")))
    except (AttributeError, OSError, struct.error):
        return None
    return pid, uid


def socket_buffers(sock: Any, size: int = 4 << 20) -> None:
    """Ask for ``size``-byte send and receive buffers (the kernel caps them at ``net.core.*mem_max``), so
    an image-sized frame crosses in a few copies instead of a ping-pong of 200 kB pieces."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
        except OSError:
            pass


_TIMEVAL: str | None = None  # struct format of the kernel's timeval (64-bit fields, or 32-bit on older 32-bit ABIs)


def busy_poll(sock: socket.socket, ns: int) -> None:
    """Return once ``sock`` has a byte to read (or the peer closed), or after ``ns`` nanoseconds,
    checking without blocking all the while: a receive that follows finds the bytes in without
    sleeping, so nothing has to wake this thread's core (what Linux's ``SO_BUSY_POLL`` does for
    network sockets, in user space). Never raises: a failed socket is the receive's to report."""
    end = time.perf_counter_ns() + ns
    while time.perf_counter_ns() < end:
        try:
            sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            return
        except BlockingIOError:
            continue
        except OSError:
            return


def set_timeout(sock: Any, option: int, seconds: float) -> bool:
    """Set a socket's kernel timeout ``option`` (SO_RCVTIMEO, SO_SNDTIMEO) to ``seconds`` (at least 1 ms):
    a blocking receive or send waiting longer fails with BlockingIOError, with no poll() before each
    call. Return False (never raise) when the socket does not take it: the caller falls back on
    Python's own timeout."""
    global _TIMEVAL
    try:
        if _TIMEVAL is None:
            _TIMEVAL = "@qq" if len(sock.getsockopt(socket.SOL_SOCKET, option, 64)) == 16 else "@ii"
        us = max(int(seconds * 1e6), 1000)
        sock.setsockopt(socket.SOL_SOCKET, option, struct.pack(_TIMEVAL, us // 1_000_000, us % 1_000_000))
    except (OSError, struct.error):
        return False
    return True


class FrameError(ValueError):
    """The stream is not a valid frame (bad magic, header, sizes): answered, then the connection is closed."""


def _exactly(stream: BinaryIO, n: int) -> bytes | None:
    """Return ``n`` bytes from ``stream``; None at a clean end of stream before the first byte.

    Raises:
        FrameError: the stream ended in the middle.
    """
    data = stream.read(n)
    if not data:
        return None
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            raise FrameError(f"the stream ended {n - len(data)} bytes short of a complete frame")
        data += more
    return data


def describe(arrays: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Return the header's ``tensors`` entries for named arrays."""
    return [{"name": name, "dtype": np.asarray(a).dtype.name, "shape": list(np.shape(a))} for name, a in arrays.items()]


_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode  # one encoder: ~3x faster than json.dumps(...)


def encode_head(header: dict[str, Any]) -> bytes:
    """Return the frame's start: magic, the header's length and the header (compact JSON).

    Raises:
        ValueError: the header holds NaN or infinity (never sent).
    """
    head = _ENCODE(header).encode()
    return MAGIC + struct.pack("<I", len(head)) + head


def send_chunks(sock: Any, chunks: list[Any], fds: list[int] | None = None) -> None:
    """Send ``chunks`` (bytes or memoryviews) on a socket in as few system calls as the kernel allows:
    one ``sendmsg`` gathering them all (no joined copy), then whatever it did not take. ``fds`` go
    with the first bytes (``SCM_RIGHTS``, a Unix socket).

    Raises:
        OSError: the peer is gone or the socket timed out.
    """
    views = [memoryview(c).cast("B") for c in chunks if len(c)]
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    while views:
        sent = sock.sendmsg(views[:512], ancillary)  # IOV_MAX is 1024 on Linux
        ancillary = []
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]


def write_frame(stream: Any, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None,
                head: bytes | None = None, fds: list[int] | None = None) -> None:
    """Write one frame (``header`` plus ``arrays`` by name) to a socket or a binary file.

    ``head`` is the frame's start when the caller has it encoded already (:func:`encode_head`; its
    ``tensors`` must describe ``arrays``); ``fds`` are passed with it (a socket only).

    Raises:
        OSError: the peer is gone. ValueError: the header holds NaN or infinity.
    """
    if arrays:
        arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    else:
        arrays = {}
    if head is None:
        if arrays or "tensors" not in header:  # a shared-memory request describes its tensors itself
            header = {**header, "tensors": describe(arrays) if arrays else []}
        head = encode_head(header)
    chunks = [head, *(memoryview(a).cast("B") for a in arrays.values() if a.nbytes)]
    if hasattr(stream, "sendmsg"):
        send_chunks(stream, chunks, fds)
    elif sum(len(c) for c in chunks) < 65536:  # small: one write
        stream.write(b"".join(bytes(c) for c in chunks))
    else:
        for c in chunks:
            stream.write(c)


_MSG_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: the flag enum's & costs microseconds per frame
MAX_FDS = 4  # descriptors taken from one read; more are closed and the frame is refused
MEMFD_SEALS = ("F_ADD_SEALS", "F_GET_SEALS", "F_SEAL_SHRINK")


def shared_memory_available() -> bool:
    """Return whether this system has sealable memory files (Linux 3.17+): the shared-memory inputs' requirement."""
    import fcntl
    import os

    return hasattr(os, "memfd_create") and all(hasattr(fcntl, k) for k in MEMFD_SEALS)


def attach_shared(fd: int, max_payload: int) -> memoryview:
    """Return a view of the memory file a client passed as descriptor ``fd`` (which is closed), mapped private
    (copy on write): what the client writes in it shows, what the server would write stays its own, and arrays
    over it are writable, which LiteRT's ``set_tensor`` takes as they are (a read-only array it copied first,
    a temporary of the input's size per request). Where the system will not reserve the file's size for a private
    mapping (``ENOMEM``: ``vm.overcommit_memory=2``, a data ulimit), it is mapped shared and read-only instead.

    Raises:
        FrameError: it is not a memory file sealed against shrinking (``memfd_create`` with
            ``MFD_ALLOW_SEALING``, then ``F_SEAL_SHRINK``), it is a huge-page one (a page the system
            cannot supply would kill the reader), it is empty or larger than ``max_payload``, or it cannot be
            mapped for reading (a descriptor reopened write-only), or the server has no memory left to map it.
    """
    import errno
    import fcntl
    import mmap
    import os
    import stat

    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FrameError("shm: the descriptor passed is not a memory file (memfd_create)")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            raise FrameError("shm: the descriptor passed is not a sealable memory file (memfd_create with "
                             "MFD_ALLOW_SEALING)") from None
        if not seals & fcntl.F_SEAL_SHRINK:
            raise FrameError("shm: the memory file is not sealed against shrinking (F_SEAL_SHRINK)")
        if st.st_blksize > 65536:
            raise FrameError("shm: a huge-page memory file is refused (use a plain memfd)")
        if not 0 < st.st_size <= max_payload:
            raise FrameError(f"shm: the memory file has {st.st_size} bytes (1 to {max_payload})")
        try:
            try:
                return memoryview(mmap.mmap(fd, st.st_size, flags=mmap.MAP_PRIVATE,
                                            prot=mmap.PROT_READ | mmap.PROT_WRITE))
            except OSError as exc:
                if exc.errno != errno.ENOMEM:
                    raise
                # a private writable mapping is charged its whole size (strict overcommit, a data ulimit): shared
                # read-only then, charged nothing (set_tensor copies each request's inputs first)
                return memoryview(mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ))
        except (OSError, ValueError) as exc:  # e.g. reopened write-only: else taken for the client going away
            if getattr(exc, "errno", None) == errno.ENOMEM:  # the server's address space or map count is used up
                raise FrameError(f"shm: the server has no memory left to map the {st.st_size}-byte memory file "
                                 "(Cannot allocate memory); send smaller inputs, or fewer requests at once") from None
            raise FrameError(f"shm: the memory file cannot be mapped for reading ({getattr(exc, 'strerror', None) or exc}); "
                             "pass the descriptor memfd_create returned") from None
    finally:
        os.close(fd)


def _shared_arrays(plan: list[tuple], view: memoryview) -> dict[str, np.ndarray]:
    """Return the arrays ``plan`` describes as views of the attached memory file, at their offsets.

    Raises:
        FrameError: a tensor lies outside the file.
    """
    arrays: dict[str, np.ndarray] = {}
    for name, dtype, shape, nbytes, offset in plan:
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0 or offset + nbytes > len(view):
            raise FrameError(f"tensor {name}: offset {str(offset)[:20]} + {nbytes} bytes is outside the "
                             f"{len(view)}-byte shared-memory file")
        arrays[name] = (np.frombuffer(view, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
                        if nbytes else np.zeros(shape, dtype))
    return arrays


def _parse_header(raw: bytes | memoryview) -> dict[str, Any]:
    """Return the header (a JSON object) of a frame.

    Raises:
        FrameError: it is not UTF-8 or not JSON, holds a NaN, an infinity or a key twice, is nested too deeply for the
            parser (a few thousand brackets fit in MAX_HEADER: a bad frame, never the connection's end), or is not
            an object: :func:`edgekit_protocol.messages.strict_loads`'s rule and words.

    What it costs: every header :func:`read_frame` reads is parsed. A :class:`Receiver` keeps what it parsed of up
    to 16 distinct headers per connection (at a 17th it empties the cache and starts again): on the server, the
    ``predict`` requests' headers; on the client, the answers' headers, told apart by all but their one ``"ms"``
    value. A header repeated byte for byte (an answer's: but for its ``"ms"``) is not parsed again while it is kept;
    every other header (another op, an answer without exactly one ``"ms"`` number) is parsed each time.
    """
    try:
        header = strict_loads(bytes(raw) or b"", "the header")
    except MessageError as exc:
        raise FrameError(str(exc)) from None
    if not isinstance(header, dict):
        raise FrameError("the header is not a JSON object")
    return header


_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def _ms_slot(raw: bytes) -> tuple[bytes, float] | None:
    """Return an answer header's bytes without the value of its one ``"ms":`` key, and that value (a
    finite JSON number); None when there is not exactly one such key or its value is not one."""
    at = raw.find(b'"ms":')
    if at < 0 or raw.find(b'"ms":', at + 5) >= 0:
        return None
    start = at + 5
    number = _NUMBER.match(raw, start)
    if number is None or raw[number.end():number.end() + 1] not in (b",", b"}"):
        return None
    value = float(number.group())
    return (raw[:start] + raw[number.end():], value) if math.isfinite(value) else None


def _header_size(start: bytes | memoryview) -> int:
    """Return the header's length from a frame's first 8 bytes.

    Raises:
        FrameError: bad magic, or a header over :data:`MAX_HEADER`.
    """
    if bytes(start[:4]) != MAGIC:
        raise FrameError(f"not an edge-kit serving frame (starts with {bytes(start[:4])!r}, expected {MAGIC!r})")
    (size,) = struct.unpack("<I", start[4:8])
    if size > MAX_HEADER:
        raise FrameError(f"header of {size} bytes is over the {MAX_HEADER}-byte limit")
    return size


_MAX_ARRAY = sys.maxsize  # bytes of the largest shape numpy takes (np.intp's largest), its zero dimensions left out


def _plan(header: dict[str, Any], max_payload: int, limit: str = "serve.max_payload_mb") -> tuple[list[tuple], int]:
    """Return the header's tensors as ``(name, dtype, shape, nbytes, offset)`` and their total bytes; ``limit`` names
    the setting ``max_payload`` comes from (the server's; a client reading an answer, its own).

    Raises:
        FrameError: a tensor entry that is malformed (name, dtype, shape: an empty one whose other dimensions numpy
            cannot take included) or tensors over ``max_payload``.
    """
    entries = header.get("tensors", [])
    if not isinstance(entries, list) or len(entries) > 64:
        raise FrameError("'tensors' must be a list of at most 64 entries")
    if not entries:
        return [], 0
    plan = []
    total = 0
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or len(e["name"]) > 256:
            raise FrameError(f"tensors[{i}]: needs a 'name' string")
        if e.get("dtype") not in DTYPES:
            raise FrameError(f"tensors[{i}] ({e['name']}): dtype {str(e.get('dtype'))[:20]!r} is not one of {', '.join(DTYPES)}")
        shape = e.get("shape")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2 ** 31 for d in shape)):
            raise FrameError(f"tensors[{i}] ({e['name']}): shape must be a list of at most {MAX_DIMS} non-negative integers")
        nbytes = math.prod(shape) * np.dtype(e["dtype"]).itemsize
        if not nbytes and math.prod(d for d in shape if d) * np.dtype(e["dtype"]).itemsize > _MAX_ARRAY:
            raise FrameError(f"tensors[{i}] ({e['name']}): shape {shape} holds no values, yet its other dimensions "
                             "are too large for an array")
        total += nbytes
        if total > max_payload:
            raise FrameError(f"tensors of {total} bytes or more are over the {max_payload}-byte limit ({limit})")
        plan.append((e["name"], np.dtype(e["dtype"]), tuple(shape), nbytes, e.get("offset")))
    return plan, total


def _arrays(plan: list[tuple], payload: Any) -> dict[str, np.ndarray]:
    """Return the arrays ``plan`` describes, as views of ``payload`` (one after another)."""
    if not plan:
        return {}
    arrays: dict[str, np.ndarray] = {}
    at = 0
    for name, dtype, shape, nbytes, _ in plan:
        arrays[name] = (np.frombuffer(payload, dtype=dtype, count=math.prod(shape), offset=at).reshape(shape)
                        if nbytes else np.zeros(shape, dtype))
        at += nbytes
    return arrays


def read_frame(stream: BinaryIO, max_payload: int) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """Read one frame from a binary stream; return ``(header, arrays by name)``, or None when the peer
    closed between frames (:class:`Receiver` does the same on a socket with fewer copies).

    Shared memory needs a socket (:class:`Receiver`): a frame with ``shm`` is refused here.

    Raises:
        FrameError: bad magic, a header that is too long, not JSON or not an object, a tensor entry
            that is malformed (name, dtype, shape, offset), tensors bigger than ``max_payload`` bytes
            or outside the shared-memory file, or a stream cut inside the frame.
    """
    start = _exactly(stream, 8)
    if start is None:
        return None
    size = _header_size(start)
    raw = _exactly(stream, size) if size else b""
    if size and raw is None:
        raise FrameError("the stream ended inside the header")
    header = _parse_header(raw)
    plan, total = _plan(header, max_payload)
    if "shm" in header:
        raise FrameError("shm: shared memory needs a Unix socket connection")
    payload = _exactly(stream, total) if total else b""
    if total and payload is None:
        raise FrameError("the stream ended before the tensors")
    return header, _arrays(plan, payload)


class Receiver:
    """Reads frames from one connected socket with ``recv_into``: the frame's start, header and the
    first bytes of its tensors usually arrive in one system call, the rest straight into the buffer
    the arrays are views of (no intermediate copy, no buffered-reader layer).

    ``reuse=True`` (the server) keeps one payload buffer per connection: the arrays of a frame are
    only valid until the next :meth:`read`. Otherwise (the client) each frame gets its own buffer: a slice
    of the receive buffer when the whole frame came with its header, in one copy.

    ``shared=True`` (the server) takes the descriptors a client passes (``recvmsg``) and reads
    ``"shm": true`` frames from the memory file last passed (:func:`attach_shared`): those arrays are
    views of memory the client may write again once it has its answer. :meth:`close` lets go of it.
    """

    def __init__(self, sock: Any, *, reuse: bool = False, shared: bool = False):
        self.sock = sock
        self.reuse = reuse
        self._buf = bytearray(8 + MAX_HEADER)
        self._view = memoryview(self._buf)
        self._start = self._end = 0  # bytes received but not yet used: _buf[_start:_end]
        self._payload: Any = None
        self._known: dict[bytes, tuple] = {}  # header bytes (an answer's without its "ms") -> (header, plan, max_payload)
        self._takes_fds = shared
        self._recv = self._recv_with_fds if shared else sock.recv_into
        self._passed: int | None = None  # the last descriptor the client passed, not attached yet
        self._refuse_fds = ""  # why the descriptors passed are refused (too many), said at the next frame
        self.shared: memoryview | None = None  # the attached memory file

    def _recv_with_fds(self, view: memoryview) -> int:
        """``recv_into`` that also takes passed descriptors: the last one is kept for the next
        ``shm`` frame, any other is closed at once (never leaked)."""
        got, ancillary, flags, _ = self.sock.recvmsg_into([view], socket.CMSG_SPACE(MAX_FDS * 4))
        fds: list[int] = []
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += array.array("i", data[:len(data) - len(data) % 4])
        if flags & _MSG_CTRUNC:
            self._refuse_fds = f"more than {MAX_FDS} descriptors passed with one frame"
        if fds:
            import os

            for fd in fds[:-1] + ([self._passed] if self._passed is not None else []):
                os.close(fd)
            self._passed = fds[-1]
        return got

    @property
    def pending(self) -> int:
        """Return how many bytes of a next frame are buffered (0: the peer is between frames)."""
        return self._end - self._start

    def close(self) -> None:
        """Let go of the attached memory file and any descriptor passed but not attached (never raises)."""
        import os

        if self._passed is not None:
            os.close(self._passed)
            self._passed = None
        if self.shared is not None:
            try:
                self.shared.obj.close()  # the mmap; fails while an array still views it: the GC unmaps it then
            except BufferError:
                pass
            self.shared = None

    def _need(self, n: int, clean_end: bool = False) -> bool:
        """Make sure ``n`` bytes (at most the buffer's size) are buffered; return False at a clean end
        of stream before any byte when ``clean_end``.

        Raises:
            FrameError: the stream ended short of them. OSError: the socket failed or timed out.
        """
        if self._end - self._start >= n:
            return True
        if self._start:
            have = self._end - self._start
            self._buf[:have] = self._view[self._start:self._end]
            self._start, self._end = 0, have
        while self._end - self._start < n:
            got = self._recv(self._view[self._end:])
            if not got:
                if clean_end and self._end == self._start:
                    return False
                raise FrameError(f"the stream ended {n - (self._end - self._start)} bytes short of a complete frame")
            self._end += got
        return True

    def _fill(self, dest: memoryview) -> None:
        """Fill ``dest`` with the next bytes of the stream.

        Raises:
            FrameError: the stream ended first. OSError: the socket failed or timed out.
        """
        k = min(len(dest), self._end - self._start)
        if k:
            dest[:k] = self._view[self._start:self._start + k]
            self._start += k
        while k < len(dest):
            got = self._recv(dest[k:])
            if not got:
                raise FrameError(f"the stream ended {len(dest) - k} bytes short of a complete frame")
            k += got

    def read(self, max_payload: int) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        """Read one frame; return ``(header, arrays by name)``, or None when the peer closed between frames.

        Raises:
            FrameError: as :func:`read_frame`. OSError: the socket failed or timed out.
        """
        if not self._need(8, clean_end=True):
            return None
        size = _header_size(self._view[self._start:self._start + 8])
        self._start += 8
        self._need(size)
        raw = bytes(self._view[self._start:self._start + size])
        self._start += size
        # a client sends the same header for the same inputs, a server the same answer but for its "ms":
        # each parsed once (offsets into shared memory are still checked every time)
        key, ms = raw, None
        if not self.reuse:
            slot = _ms_slot(raw)
            if slot is not None:
                key, ms = slot
        known = self._known.get(key)
        if known is None or known[2] != max_payload:
            header = _parse_header(raw)
            plan, total = _plan(header, max_payload, "serve.max_payload_mb" if self.reuse else "Client's max_payload")
            if (header.get("op") == "predict") if self.reuse else (ms is not None and header.get("ms") == ms):
                if len(self._known) >= 16:
                    self._known.clear()
                self._known[key] = (header, (plan, total), max_payload)
        else:
            header, (plan, total), _ = known
            if ms is not None:
                header = {**header, "ms": ms}
        if "shm" in header:
            return header, self._from_shared(header, plan, max_payload)
        if not total:
            return header, _arrays(plan, b"")
        if not self.reuse:
            if self._end - self._start >= total:  # all in already (an answer of up to 64 kB): copied out in one go
                self._start += total
                return header, _arrays(plan, self._buf[self._start - total:self._start])
            payload = np.empty(total, np.uint8)  # not zeroed: every byte is received into it
        else:
            if self._payload is None or len(self._payload) < total:
                self._payload = np.empty(total, np.uint8)  # a new one: views of the old one may still be alive
            payload = self._payload
        self._fill(memoryview(payload)[:total])
        return header, _arrays(plan, payload)

    def _from_shared(self, header: dict[str, Any], plan: list[tuple], max_payload: int) -> dict[str, np.ndarray]:
        """Return a ``shm`` frame's arrays, attaching the memory file passed with it (if one was).

        Raises:
            FrameError: shared memory is not taken on this connection, ``shm`` is not ``true``, too
                many descriptors came, the one passed is refused, or nothing is attached.
        """
        if not self._takes_fds or header["shm"] is not True:
            raise FrameError("shm: must be true (the memory file is passed as a descriptor)" if self._takes_fds
                             else "shm: this connection takes no shared memory")
        if self._refuse_fds:
            why, self._refuse_fds = self._refuse_fds, ""
            raise FrameError(f"shm: {why}")
        if self._passed is not None:
            fd, self._passed = self._passed, None
            self.close()
            self.shared = attach_shared(fd, max_payload)
        if self.shared is None:
            raise FrameError("shm: no memory file was passed on this connection (send its descriptor with a request)")
        return _shared_arrays(plan, self.shared)
