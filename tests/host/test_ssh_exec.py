"""DeviceShell._exec against a real paramiko server over a socket pair: a device whose SSH server never answers
the exec request, or whose command prints without end, costs the deploy the command's timeout and a bounded
amount of memory, never a hang or the host's memory."""

from __future__ import annotations

import socket
import threading
import time
import types

import paramiko
import pytest

from edge_kit.fleet import ssh
from edge_kit.fleet.ssh import DeviceShell


class _Server(paramiko.ServerInterface):
    def __init__(self, on_exec):
        self.on_exec = on_exec

    def get_allowed_auths(self, username):
        return "none"

    def check_auth_none(self, username):
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind, chanid):
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel, command):
        return self.on_exec(channel)


@pytest.fixture
def device():
    made = []

    def start(on_exec):
        a, b = socket.socketpair()
        server = paramiko.Transport(b)
        server.add_server_key(paramiko.ECDSAKey.generate())
        server.start_server(threading.Event(), server=_Server(on_exec))  # negotiates in its thread
        client = paramiko.Transport(a)
        client.start_client(timeout=10)
        client.auth_none("device")
        made.extend([client, server])
        return types.SimpleNamespace(conn=types.SimpleNamespace(client=types.SimpleNamespace(get_transport=lambda: client)))

    yield start
    for t in made:
        t.close()
    for t in made:  # their threads gone before the next test makes sockets (a late close once hit a reused fd)
        t.join(10)


def _exec_in_thread(shell, timeout):
    """Run _exec in a thread; return what it raised (or returned) and whether it ended within 20 s."""
    got = []

    def go():
        try:
            got.append(DeviceShell._exec(shell, "true", timeout))
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            got.append(exc)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(20)
    return got[0] if got else None


def test_an_exec_request_the_device_never_answers_times_out(device):
    release = threading.Event()
    shell = device(lambda channel: release.wait(30) or True)  # the server's transport never replies
    try:
        got = _exec_in_thread(shell, 1.0)
    finally:
        release.set()
    assert isinstance(got, TimeoutError), got


def test_a_command_printing_without_end_is_cut_at_the_output_limit(device, monkeypatch):
    monkeypatch.setattr(ssh, "MAX_OUTPUT_BYTES", 1 << 20, raising=False)

    def flood(channel):
        def send():
            time.sleep(0.2)  # after the exec request's answer: a flood racing it made exec_command see a closed channel
            try:
                while True:
                    channel.sendall(b"x" * 65536)
            except (OSError, EOFError, paramiko.SSHException):
                pass
        threading.Thread(target=send, daemon=True).start()
        return True

    got = _exec_in_thread(device(flood), 15.0)
    assert isinstance(got, ssh.OutputTooLarge), got
