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

Large inputs may travel through shared memory instead: the request's header names a file the client
made under ``/dev/shm`` (``"shm": "edgekit-..."``) and each tensor entry its ``offset`` in it; no
tensor bytes follow the header. The server maps the file read-only, checks every tensor lies inside
it, and reads the inputs in place (one copy fewer each way of the socket). Answers always come over
the socket.
"""

from __future__ import annotations

import json
import math
import socket
import struct
from typing import Any, BinaryIO

import numpy as np

MAGIC = b"EKS1"
MAX_HEADER = 64 * 1024
DTYPES = ("float32", "float16", "float64", "uint8", "int8", "int16", "int32", "int64", "bool")
MAX_DIMS = 8


def socket_buffers(sock: Any, size: int = 4 << 20) -> None:
    """Ask for ``size``-byte send and receive buffers (the kernel caps them at ``net.core.*mem_max``), so
    an image-sized frame crosses in a few copies instead of a ping-pong of 200 kB pieces."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
        except OSError:
            pass


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


def write_frame(stream: Any, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> None:
    """Write one frame (``header`` plus ``arrays`` by name) to a socket or a binary file."""
    arrays = {k: np.ascontiguousarray(v) for k, v in (arrays or {}).items()}
    if arrays or "tensors" not in header:  # a shared-memory request describes its tensors itself
        header = {**header, "tensors": describe(arrays)}
    head = json.dumps(header, separators=(",", ":")).encode()
    chunks = [MAGIC + struct.pack("<I", len(head)) + head, *(memoryview(a).cast("B") for a in arrays.values() if a.nbytes)]
    send = getattr(stream, "sendall", None) or stream.write
    if sum(len(c) for c in chunks) < 65536:  # small: one write
        send(b"".join(bytes(c) for c in chunks))
    else:
        for c in chunks:
            send(c)


SHM_DIR = "/dev/shm"
SHM_PREFIX = "edgekit-"


def map_shared(name: Any, max_payload: int, cache: dict | None = None) -> memoryview:
    """Return a read-only view of the shared-memory file ``/dev/shm/<name>`` a client made for its inputs.

    ``cache`` (one per connection) keeps the mapping while the file stays the same (inode and size),
    so a client's every request costs one ``stat``, not a new mapping.

    Raises:
        FrameError: the name is not an ``edgekit-`` file directly under /dev/shm, it is not a regular
            file (a symlink is refused), or it is larger than ``max_payload``.
    """
    import mmap
    import os
    import stat

    if not isinstance(name, str) or not name.startswith(SHM_PREFIX) or "/" in name or len(name) > 128:
        raise FrameError(f"shm: {str(name)[:40]!r} is not an {SHM_PREFIX}* name under {SHM_DIR}")
    if cache is not None and name in cache:
        try:
            st = os.stat(os.path.join(SHM_DIR, name), follow_symlinks=False)
        except OSError:
            st = None
        view, ino, size = cache[name]
        if st is not None and (st.st_ino, st.st_size) == (ino, size):
            return view
        del cache[name]
    try:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise FrameError(f"shm: {name}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > max_payload or st.st_size == 0:
            raise FrameError(f"shm: {name} is not a regular file of 1 to {max_payload} bytes")
        view = memoryview(mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ))
    finally:
        os.close(fd)
    if cache is not None:
        cache.clear()  # one client, one file at a time
        cache[name] = (view, st.st_ino, st.st_size)
    return view


def read_frame(stream: BinaryIO, max_payload: int,
               shm_cache: dict | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """Read one frame; return ``(header, arrays by name)``, or None when the peer closed between frames.

    With ``shm`` in the header the arrays are read-only views of the client's shared-memory file.

    Raises:
        FrameError: bad magic, a header that is too long, not JSON or not an object, a tensor entry
            that is malformed (name, dtype, shape, offset), tensors bigger than ``max_payload`` bytes
            or outside the shared-memory file, or a stream cut inside the frame.
    """
    start = _exactly(stream, 8)
    if start is None:
        return None
    if start[:4] != MAGIC:
        raise FrameError(f"not an edge-kit serving frame (starts with {start[:4]!r}, expected {MAGIC!r})")
    (size,) = struct.unpack("<I", start[4:])
    if size > MAX_HEADER:
        raise FrameError(f"header of {size} bytes is over the {MAX_HEADER}-byte limit")
    raw = _exactly(stream, size) if size else b""
    try:
        header = json.loads(raw or b"", parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except (ValueError, UnicodeDecodeError):
        raise FrameError("the header is not JSON") from None
    if not isinstance(header, dict):
        raise FrameError("the header is not a JSON object")
    entries = header.get("tensors", [])
    if not isinstance(entries, list) or len(entries) > 64:
        raise FrameError("'tensors' must be a list of at most 64 entries")
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
        total += nbytes
        if total > max_payload:
            raise FrameError(f"tensors of {total} bytes or more are over the {max_payload}-byte limit (serve.max_payload_mb)")
        plan.append((e["name"], np.dtype(e["dtype"]), tuple(shape), nbytes, e.get("offset")))
    shared = "shm" in header
    if shared:
        payload = map_shared(header["shm"], max_payload, shm_cache)
    else:
        payload = _exactly(stream, total) if total else b""
        if total and payload is None:
            raise FrameError("the stream ended before the tensors")
    arrays: dict[str, np.ndarray] = {}
    at = 0
    for name, dtype, shape, nbytes, offset in plan:
        if shared:
            if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0 or offset + nbytes > len(payload):
                raise FrameError(f"tensor {name}: offset {str(offset)[:20]} + {nbytes} bytes is outside the "
                                 f"{len(payload)}-byte shared-memory file")
            at = offset
        arrays[name] = (np.frombuffer(payload, dtype=dtype, count=math.prod(shape), offset=at).reshape(shape)
                        if nbytes else np.zeros(shape, dtype))
        at += nbytes
    return header, arrays
