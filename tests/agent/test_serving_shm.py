"""Shared-memory inputs against a hostile client: a file it shrinks under the server, a FIFO in its place."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from device_agents.serving.frames import SHM_DIR, FrameError, Receiver, write_frame

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason="no /dev/shm")


def _header(name: str, shape: list[int]) -> dict:
    return {"op": "predict", "shm": name, "tensors": [{"name": "x", "dtype": "float32", "shape": shape, "offset": 0}]}


def test_a_client_shrinking_its_file_while_the_server_reads_it_is_refused_never_a_crash(tmp_path):
    """The client flaps its file's size between 0 and full while the server's receiver reads requests
    naming it, in a child process (a SIGBUS would kill it; it kills the whole agent in production):
    each request is answered with its inputs or refused as malformed, and the reader lives."""
    reader = textwrap.dedent("""
        import socket, sys
        from device_agents.serving.frames import FrameError, Receiver
        sock = socket.socket(fileno=int(sys.argv[1]))
        receiver, read, refused = Receiver(sock, reuse=True), 0, 0
        while True:
            try:
                frame = receiver.read(1 << 24)
            except FrameError:
                refused += 1
                sock.sendall(b"r")
                continue
            if frame is None:
                break
            read += 1
            frame[1]["x"].sum()  # every byte touched, as the interpreter's copy does
            sock.sendall(b"k")
        print(read, refused)
    """)
    name = f"edgekit-test-shrink-{os.getpid()}"
    path = os.path.join(SHM_DIR, name)
    size = 1 << 20
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    ours, theirs = socket.socketpair()
    stop = threading.Event()

    def flap() -> None:
        while not stop.is_set():
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)

    try:
        os.ftruncate(fd, size)
        child = subprocess.Popen([sys.executable, "-c", reader, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ,
                                 "PYTHONPATH": os.pathsep.join(sys.path)})
        theirs.close()
        flapper = threading.Thread(target=flap, daemon=True)
        flapper.start()
        answers = b""
        for _ in range(300):
            write_frame(ours, _header(name, [size // 4]))
            answers += ours.recv(1)
        stop.set()
        flapper.join()
        ours.shutdown(socket.SHUT_WR)
        out, err = child.communicate(timeout=30)
    finally:
        stop.set()
        os.close(fd)
        os.unlink(path)
        ours.close()
    assert child.returncode == 0, f"the reader died (exit {child.returncode}): {err.decode()[-400:]}"
    read, refused = map(int, out.split())
    assert read + refused == 300 and len(answers) == 300


def test_a_fifo_named_as_the_shared_memory_file_is_refused_at_once():
    """A FIFO under an edgekit- name is refused as not a regular file, not waited on: the server's
    thread and its client place would otherwise be held for ever, even after the client is gone."""
    name = f"edgekit-test-fifo-{os.getpid()}"
    os.mkfifo(os.path.join(SHM_DIR, name))
    a, b = socket.socketpair()
    try:
        b.settimeout(5)  # a read that blocks fails the test instead of hanging it
        write_frame(a, _header(name, [4]))
        got: list = []
        t = threading.Thread(target=lambda: got.append(_read_error(Receiver(b, reuse=True))), daemon=True)
        t.start()
        t.join(5)
        assert not t.is_alive(), "the receiver is still waiting on the FIFO"
        assert "not a regular file" in got[0]
    finally:
        os.unlink(os.path.join(SHM_DIR, name))
        a.close()
        b.close()


def test_shared_memory_inputs_are_read_at_their_offsets_and_outlive_changes_to_the_file():
    """Two tensors at their offsets come back equal to what the client wrote, and stay so when the
    client overwrites its file afterwards (the server holds its own copy, for the shadow run too)."""
    name = f"edgekit-test-offsets-{os.getpid()}"
    path = os.path.join(SHM_DIR, name)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y = np.arange(5, dtype=np.int16)
    with open(path, "wb") as f:
        f.write(b"\0" * 8 + x.tobytes() + y.tobytes())
    a, b = socket.socketpair()
    try:
        header = {"op": "predict", "shm": name, "tensors": [
            {"name": "x", "dtype": "float32", "shape": [3, 4], "offset": 8},
            {"name": "y", "dtype": "int16", "shape": [5], "offset": 8 + x.nbytes}]}
        write_frame(a, header)
        _, arrays = Receiver(b, reuse=True).read(1 << 20)
        with open(path, "r+b") as f:
            f.write(b"\xff" * (8 + x.nbytes + y.nbytes))
        np.testing.assert_array_equal(arrays["x"], x)
        np.testing.assert_array_equal(arrays["y"], y)
    finally:
        os.unlink(path)
        a.close()
        b.close()


def _read_error(receiver: Receiver) -> str:
    try:
        receiver.read(1 << 20)
    except FrameError as exc:
        return str(exc)
    return "no error"
