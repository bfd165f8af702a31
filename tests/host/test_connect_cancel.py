"""Connecting to a device gives up on cancel (Ctrl-C on a deploy) at once, in the connect and in the name lookup,
and a name lookup is bounded by the connect timeout too: both used to run to their own end (10 s, or the
resolver's)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from edge_kit.fleet.ssh import Cancelled, open_socket


def cancelled_after(seconds: float) -> threading.Event:
    event = threading.Event()
    threading.Timer(seconds, event.set).start()
    return event


def test_a_connect_to_an_address_that_does_not_answer_gives_up_on_cancel_and_at_its_timeout(silent_port):
    started = time.monotonic()
    with pytest.raises(Cancelled, match="cancelled during the connect to 127.0.0.1"):
        open_socket("127.0.0.1", silent_port, timeout=30, cancel=cancelled_after(0.3))
    assert time.monotonic() - started < 2.0
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        open_socket("127.0.0.1", silent_port, timeout=0.5, cancel=threading.Event())
    assert 0.4 < time.monotonic() - started < 2.5


def test_a_name_lookup_that_hangs_gives_up_on_cancel_and_at_the_timeout(monkeypatch):
    """The system resolver takes no timeout and no cancel: a fake one that never answers stands in for a DNS
    server that does not (this machine has no network to make a real one hang)."""
    real, release = socket.getaddrinfo, threading.Event()

    def hanging(host, *args, **kwargs):
        if kwargs.get("flags", 0) & socket.AI_NUMERICHOST or host == "127.0.0.1":
            return real(host, *args, **kwargs)  # a literal address: answered at once, as the real one does
        release.wait(30)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    try:
        started = time.monotonic()
        with pytest.raises(Cancelled, match="name lookup of pi-7.example"):
            open_socket("pi-7.example", 22, timeout=30, cancel=cancelled_after(0.3))
        assert time.monotonic() - started < 2.0
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="name lookup of pi-7.example timed out"):
            open_socket("pi-7.example", 22, timeout=0.5)
        assert time.monotonic() - started < 2.5
    finally:
        release.set()


def test_a_reachable_address_still_connects_and_a_refused_one_says_so():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        with open_socket("127.0.0.1", port, cancel=threading.Event()) as sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        server.close()
    with pytest.raises(ConnectionRefusedError):
        open_socket("127.0.0.1", port)


def test_a_port_that_closes_without_an_ssh_banner_fails_the_device_in_one_line_without_a_traceback(tmp_path):
    """A host whose port accepts and closes at once (no sshd there: another service, a firewall, a NAT) failed the
    device with one line, but paramiko's transport thread also logged its traceback, which Python's last-resort
    handler printed on stderr (no handler configured). A separate process: pytest's own log handlers hide it."""
    import subprocess
    import sys

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def close_each():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=close_each, daemon=True).start()
    (tmp_path / "known_hosts").write_text("")
    script = ("import sys\n"
              "from edge_kit.errors import DeployError\n"
              "from edge_kit.fleet.inventory import Device\n"
              "from edge_kit.fleet.ssh import DeviceShell\n"
              f"dev = Device(name='pi-1', host='127.0.0.1', port={server.getsockname()[1]}, user='pi', profile='rpi4')\n"
              "try:\n"
              f"    DeviceShell(dev, {str(tmp_path / 'known_hosts')!r}).__enter__()\n"
              "except DeployError as exc:\n"
              "    print(exc)\n")
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    finally:
        server.close()
    assert done.returncode == 0 and done.stdout.startswith("pi-1 (pi@127.0.0.1:"), done
    assert done.stderr == "", done.stderr
