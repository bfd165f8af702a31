"""Shared-memory inputs against a hostile client: a memory file it could shrink under the server, a
descriptor that is no memory file at all, descriptors by the handful, a frame that names nothing.

The client passes a sealed ``memfd`` over the socket; the server maps it only when the seal makes
shrinking impossible (a shrunk mapping kills the reader with SIGBUS: the whole agent, in production).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from device_agents.serving.frames import (
    FrameError,
    Receiver,
    shared_memory_available,
    write_frame,
)

pytestmark = pytest.mark.skipif(not shared_memory_available(), reason="no sealable memory files (memfd_create)")

SEALED = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def _memfd(data: bytes, seals: int = SEALED) -> int:
    fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, len(data))
    os.pwrite(fd, data, 0)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def _header(shape: list[int], offset: int = 0) -> dict:
    return {"op": "predict", "shm": True, "tensors": [{"name": "x", "dtype": "float32", "shape": shape, "offset": offset}]}


def _read(receiver: Receiver) -> str | dict:
    """Return the frame's arrays, or the refusal's text."""
    try:
        return receiver.read(1 << 20)[1]
    except FrameError as exc:
        return str(exc)


def test_only_a_memory_file_sealed_against_shrinking_is_mapped():
    """A sealed memfd is read in place at its offsets; an unsealed memfd (its client could shrink it),
    a regular file, a pipe and a frame with no descriptor ever passed are each refused, one line."""
    x = np.arange(12, dtype=np.float32)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    receiver = Receiver(b, reuse=True, shared=True)
    r, w = os.pipe()
    disk = open(__file__, "rb")  # noqa: SIM115 - its descriptor is passed, the server closes its copy
    try:
        write_frame(a, _header([12]))
        assert "no memory file was passed" in _read(receiver)
        for fd, why in [(_memfd(x.tobytes(), seals=0), "not sealed against shrinking"),
                        (disk.fileno(), "not a sealable memory file"), (r, "not a memory file")]:
            write_frame(a, _header([12]), fds=[fd])
            assert why in _read(receiver)
        good = _memfd(b"\0" * 16 + x.tobytes())
        write_frame(a, _header([12], offset=16), fds=[good])
        arrays = _read(receiver)
        np.testing.assert_array_equal(arrays["x"], x)
        with pytest.raises(PermissionError):
            os.ftruncate(good, 0)  # the seal: the client cannot pull pages from under the server's mapping
        write_frame(a, _header([12], offset=40))  # the file stays attached; this tensor runs past its end
        assert "outside the 64-byte shared-memory file" in _read(receiver)
        write_frame(a, {**_header([12]), "shm": "edgekit-by-name"})
        assert "must be true" in _read(receiver)
    finally:
        receiver.close()
        for fd in (r, w):
            os.close(fd)
        disk.close()
        a.close()
        b.close()


def test_descriptors_by_the_handful_are_closed_never_leaked():
    """A client passing several descriptors with every frame leaves the server holding none of them
    but the memory file it maps: 200 frames of 3 descriptors each, the reader's open descriptors counted
    before and after, in a child process of its own."""
    reader = textwrap.dedent("""
        import os, socket, sys
        from device_agents.serving.frames import FrameError, Receiver
        sock = socket.socket(fileno=int(sys.argv[1]))
        before = len(os.listdir("/proc/self/fd"))
        receiver, read = Receiver(sock, reuse=True, shared=True), 0
        while True:
            try:
                frame = receiver.read(1 << 20)
            except FrameError as exc:
                print("refused", exc, flush=True)
                break
            if frame is None:
                break
            read += 1
            sock.sendall(b"k")
        receiver.close()
        print(read, len(os.listdir("/proc/self/fd")) - before)
    """)
    ours, theirs = socket.socketpair()
    child = subprocess.Popen([sys.executable, "-c", reader, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    theirs.close()
    fds = [_memfd(np.ones(4, np.float32).tobytes()) for _ in range(3)]
    try:
        for _ in range(200):
            write_frame(ours, _header([4]), fds=fds)
            assert ours.recv(1) == b"k"
        ours.shutdown(socket.SHUT_WR)
        out, err = child.communicate(timeout=30)
    finally:
        for fd in fds:
            os.close(fd)
        ours.close()
    assert child.returncode == 0, err.decode()[-400:]
    assert out.split() == [b"200", b"0"], out  # every frame read; no descriptor left open after close


def test_a_mapped_file_outlives_the_clients_own_mapping_and_descriptor():
    """The client unmapping and closing its file after passing it changes nothing for the server: its
    mapping holds the pages (what the client wrote last is what it reads)."""
    a, b = socket.socketpair()
    receiver = Receiver(b, reuse=True, shared=True)
    try:
        fd = _memfd(np.zeros(8, np.float32).tobytes())
        view = mmap.mmap(fd, 32)
        view[:] = np.full(8, 3.0, np.float32).tobytes()
        write_frame(a, _header([8]), fds=[fd])
        view.close()
        os.close(fd)
        np.testing.assert_array_equal(_read(receiver)["x"], np.full(8, 3.0, np.float32))
    finally:
        receiver.close()
        a.close()
        b.close()


def test_a_memory_file_passed_write_only_is_refused_in_one_line():
    """A sealed memfd reopened write-only (/proc/self/fd/N, O_WRONLY) passed every check, then mmap raised
    PermissionError: the server took it for the client going away and hung up with no answer, uncounted."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    receiver = Receiver(b, reuse=True, shared=True)
    fd = _memfd(np.arange(12, dtype=np.float32).tobytes())
    write_only = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC)
    try:
        write_frame(a, _header([12]), fds=[write_only])
        assert _read(receiver) == ("shm: the memory file cannot be mapped for reading (Permission denied); pass the "
                                   "descriptor memfd_create returned")
    finally:
        receiver.close()
        for f in (fd, write_only, a, b):
            os.close(f) if isinstance(f, int) else f.close()


def test_arrays_of_a_memory_file_are_writable_private_views_that_see_the_clients_next_write():
    """The server's arrays over a client's memory file are writable, so LiteRT's ``set_tensor`` takes them as they are
    (it copied a read-only array into a temporary of the input's size first, each request), yet no server write reaches
    the client's file, and what the client writes for its next request is what the server reads then, without the
    file being passed again."""
    page = mmap.PAGESIZE // 4  # float32 values in a page
    a, b = socket.socketpair()
    receiver = Receiver(b, reuse=True, shared=True)
    fd = _memfd(np.zeros(2 * page, np.float32).tobytes())
    try:
        client = mmap.mmap(fd, 8 * page)
        write_frame(a, _header([page]), fds=[fd])
        x = _read(receiver)["x"]
        assert x.flags.writeable
        x[:] = 5.0  # the server's own copy of that page from now on: the client's file is untouched
        assert not np.frombuffer(client, np.float32).any()
        np.frombuffer(client, np.float32)[page:page + 4] = [1.0, 2.0, 3.0, 4.0]  # the client's next inputs
        write_frame(a, _header([4], offset=4 * page))  # a later request: no descriptor, the same mapping
        np.testing.assert_array_equal(_read(receiver)["x"], [1.0, 2.0, 3.0, 4.0])
        client.close()
    finally:
        receiver.close()
        os.close(fd)
        a.close()
        b.close()


def test_a_memory_file_the_system_will_not_reserve_privately_is_read_from_a_shared_read_only_mapping():
    """A private writable mapping is charged its whole size (vm.overcommit_memory=2, a data ulimit such as systemd's
    LimitDATA=), where the shared read-only one it replaced was charged nothing: a 256 MB memory file under a data
    limit 64 MB above the reader's use was refused, "cannot be mapped for reading (Cannot allocate memory); pass the
    descriptor memfd_create returned", counted as malformed and the connection closed. It is read, read-only (the
    set_tensor copy comes back for it alone). In a child process: the limit is its own."""
    reader = textwrap.dedent("""
        import fcntl, mmap, os, resource, socket
        import numpy as np
        from device_agents.serving.frames import Receiver, write_frame
        fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 256 << 20)
        os.pwrite(fd, np.arange(4, dtype=np.float32).tobytes(), 0)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        a, b = socket.socketpair()
        receiver = Receiver(b, reuse=True, shared=True)
        used = next(int(line.split()[1]) << 10 for line in open("/proc/self/status") if line.startswith("VmData"))
        resource.setrlimit(resource.RLIMIT_DATA, (used + (64 << 20), resource.getrlimit(resource.RLIMIT_DATA)[1]))
        try:
            mmap.mmap(fd, 256 << 20, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            print("private:", exc.strerror)
        write_frame(a, {"op": "predict", "shm": True,
                        "tensors": [{"name": "x", "dtype": "float32", "shape": [4], "offset": 0}]}, fds=[fd])
        x = receiver.read(512 << 20)[1]["x"]
        print(x.tolist(), x.flags.writeable)
    """)
    child = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.returncode == 0, child.stderr[-600:]
    assert child.stdout.splitlines() == ["private: Cannot allocate memory", "[0.0, 1.0, 2.0, 3.0] False"]


def test_a_memory_file_no_mapping_of_which_fits_the_server_is_refused_as_no_memory_left_not_a_wrong_descriptor():
    """When even the shared read-only mapping fails for lack of memory (an address-space limit, systemd's LimitAS=),
    the answer said "pass the descriptor memfd_create returned", which the client had done. In a child process: the
    limit is its own."""
    reader = textwrap.dedent("""
        import fcntl, os, resource, socket
        import numpy  # loaded before the limit, as in the agent: frames.py imports it at the first tensor
        from device_agents.serving.frames import FrameError, Receiver, write_frame
        fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 256 << 20)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        a, b = socket.socketpair()
        receiver = Receiver(b, reuse=True, shared=True)
        used = next(int(line.split()[1]) << 10 for line in open("/proc/self/status") if line.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (used + (64 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
        write_frame(a, {"op": "predict", "shm": True,
                        "tensors": [{"name": "x", "dtype": "float32", "shape": [4], "offset": 0}]}, fds=[fd])
        try:
            receiver.read(512 << 20)
        except FrameError as exc:
            print(exc)
    """)
    child = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.returncode == 0, child.stderr[-600:]
    assert child.stdout.strip() == ("shm: the server has no memory left to map the 268435456-byte memory file (Cannot "
                                    "allocate memory); send smaller inputs, or fewer requests at once")
