"""DeviceShell._exec and its uploads against a real paramiko server over a socket pair: a device whose SSH server
never answers the exec request, or whose command prints without end, or whose SFTP server stops answering (before
its version, or in the middle of an upload), costs the deploy the command's timeout or SFTP_STALL_S and a bounded
amount of memory, never a hang or the host's memory."""

from __future__ import annotations

import os
import socket
import threading
import time
import types

import paramiko
import pytest

from edge_kit.errors import DeployError
from edge_kit.fleet import ssh
from edge_kit.fleet.ssh import DeviceShell, HostKeyError


class _Server(paramiko.ServerInterface):
    def __init__(self, on_exec, on_subsystem=None):
        self.on_exec = on_exec
        self.on_subsystem = on_subsystem

    def get_allowed_auths(self, username):
        return "none"

    def check_auth_none(self, username):
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind, chanid):
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel, command):
        return self.on_exec(channel)

    def check_channel_subsystem_request(self, channel, name):
        if self.on_subsystem is None:  # the handler the transport was given (an SFTP server), or a refusal
            return super().check_channel_subsystem_request(channel, name)
        return self.on_subsystem(channel, name)


@pytest.fixture
def device():
    made = []

    def start(on_exec, on_subsystem=None, sftp=None):
        a, b = socket.socketpair()
        server = paramiko.Transport(b)
        server.add_server_key(paramiko.ECDSAKey.generate())
        if sftp is not None:  # a real SFTP server, answering as the interface given does
            server.set_subsystem_handler("sftp", paramiko.SFTPServer, sftp)
        server.start_server(threading.Event(), server=_Server(on_exec, on_subsystem))  # negotiates in its thread
        client = paramiko.Transport(a)
        client.start_client(timeout=10)
        client.auth_none("device")
        made.extend([client, server])
        return types.SimpleNamespace(conn=types.SimpleNamespace(  # Fabric's Connection, as DeviceShell uses it
            client=types.SimpleNamespace(get_transport=lambda: client),
            sftp=lambda: paramiko.SFTPClient.from_transport(client)))

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


class _StallingSftp(paramiko.SFTPServerInterface):
    """An SFTP server that answers its version, then never answers opening a file (a hung disk, a stopped device)."""

    release = threading.Event()

    def open(self, path, flags, attr):
        self.release.wait(30)
        return paramiko.SFTP_FAILURE

    def stat(self, path):
        return paramiko.SFTPAttributes()  # every folder is there: the upload goes on to open its file


def _shell(device):
    """A DeviceShell on ``device``'s connection (no probe: the uploads are the point)."""
    shell = DeviceShell.__new__(DeviceShell)
    shell.conn, shell.dev, shell._sftp = device.conn, types.SimpleNamespace(name="pi-1"), None
    return shell


def _put_in_thread(shell):
    """Upload a small file with ``shell`` in a thread; return what it raised (or returned) and how long it took, or
    None when it had not ended within 20 s."""
    got = []

    def go():
        started = time.monotonic()
        try:
            got.append((shell.put(b"key", "/opt/edgekit/identity/device.key", mode=0o600), 0.0))
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            got.append((exc, time.monotonic() - started))

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(20)
    return got[0] if got else (None, None)


@pytest.mark.parametrize("stall", ["subsystem request", "version", "open"])
def test_an_sftp_server_that_stops_answering_fails_the_upload_after_sftp_stall_s(device, monkeypatch, stall):
    monkeypatch.setattr(ssh, "SFTP_STALL_S", 1.0, raising=False)
    release = threading.Event()
    _StallingSftp.release = release
    if stall == "subsystem request":  # the server's transport never replies to the request
        shell = _shell(device(lambda channel: False, lambda channel, name: release.wait(30) or True))
    elif stall == "version":  # accepted, then not a word of SFTP
        shell = _shell(device(lambda channel: False, lambda channel, name: True))
    else:
        shell = _shell(device(lambda channel: False, sftp=_StallingSftp))
    try:
        got, seconds = _put_in_thread(shell)
    finally:
        release.set()
    assert isinstance(got, DeployError), f"the upload hung or returned: {got!r}"
    assert str(got) == "pi-1: upload of device.key failed (the device did not answer within 1 s)"
    assert seconds < 5


class _EndlessChannel:
    """A session channel whose stdout always has more ready: a device that prints as fast as the host reads (the
    transport thread refills paramiko's buffer while _exec drains it). It counts what the host took."""

    def __init__(self):
        self.read_fd, self.write_fd = os.pipe()
        os.write(self.write_fd, b"x")  # readable, as paramiko's channel pipe is while data waits
        self.taken = 0
        self.eof_received = self.closed = False
        self.status_event = threading.Event()

    def fileno(self):
        return self.read_fd

    def exec_command(self, command):
        pass

    def shutdown_write(self):
        pass

    def recv_ready(self):
        return True

    def recv(self, n):
        self.taken += n
        if self.taken > 64 * ssh.MAX_OUTPUT_BYTES:
            raise RuntimeError(f"the host read {self.taken:,} bytes and went on reading")
        return b"x" * n

    def recv_stderr_ready(self):
        return False

    def close(self):
        if not self.closed:
            self.closed = True
            os.close(self.read_fd)
            os.close(self.write_fd)


def test_a_device_printing_as_fast_as_the_host_reads_is_cut_at_the_output_limit(monkeypatch):
    monkeypatch.setattr(ssh, "MAX_OUTPUT_BYTES", 1 << 20)
    chan = _EndlessChannel()
    transport = types.SimpleNamespace(is_active=lambda: True, open_session=lambda timeout: chan)
    shell = types.SimpleNamespace(conn=types.SimpleNamespace(client=types.SimpleNamespace(get_transport=lambda: transport)))
    with pytest.raises(ssh.OutputTooLarge):
        DeviceShell._exec(shell, "cat /dev/zero", 10.0)
    assert chan.taken <= ssh.MAX_OUTPUT_BYTES + (1 << 16)  # one read past the limit at most


def test_a_failing_command_printing_millions_of_lines_costs_the_host_no_more_than_its_output():
    """Its error line is the last line of stderr that says something: every line was made a string of its own
    first, so 64 MiB of two-letter lines (within the output limit) cost the host 1.7 GB."""
    import tracemalloc

    stderr = "ab\n" * (1 << 20) + "Traceback: the device's own error\r\n" + "INFO: stopped\n" * 100 + "\n" * 100
    shell = DeviceShell.__new__(DeviceShell)
    shell.dev = types.SimpleNamespace(name="pi-1", python="python3")
    shell._exec = lambda command, timeout: (1, "", stderr)
    tracemalloc.start()
    try:
        with pytest.raises(DeployError) as failed:
            shell.run(["false"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(failed.value) == "pi-1: Traceback: the device's own error"
    # one line at a time, whatever the output's length (before: 62 MB for these 3 MB)
    assert peak < 2 << 20, f"{peak:,} bytes for {len(stderr):,} characters of output"


def test_a_json_answer_of_millions_of_values_is_refused_before_it_is_parsed():
    """What the host parses of a device is at most MAX_JSON_BYTES: 64 MiB (the output limit) of ``{},`` parsed to
    22 million dicts, 1.6 GB on the operator's machine for one device; the probe prints a few kB."""
    import tracemalloc

    out = "[" + "{}," * ((ssh.MAX_JSON_BYTES if hasattr(ssh, "MAX_JSON_BYTES") else 4 << 20) // 3 + 100) + "{}]"
    shell = DeviceShell.__new__(DeviceShell)
    shell.dev = types.SimpleNamespace(name="pi-1", python="python3")
    shell._exec = lambda command, timeout: (0, out, "")
    tracemalloc.start()
    try:
        with pytest.raises(DeployError, match=r"^pi-1: the device state probe printed [0-9,]+ characters, more "
                                              r"than the 4 MiB a JSON answer may take; refused \(check the device\)$"):
            shell.run_json(["python3", "-c", "probe"], "the device state probe")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak:,} bytes"


class _DroppingChannel:
    """A session channel whose exec request is never answered and whose link goes down as the deadline comes:
    closing it raises (paramiko's packetizer is closed), and the waiting request then fails, as paramiko's does."""

    def __init__(self):
        self.gone = threading.Event()
        self.closed = False

    def exec_command(self, command):
        self.gone.wait(20)
        raise EOFError()

    def close(self):
        self.gone.set()
        raise EOFError()


def test_an_exec_deadline_meeting_a_dropped_link_is_one_timeout_not_a_traceback(monkeypatch):
    crashed = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashed.append(args.exc_type))
    chan = _DroppingChannel()
    transport = types.SimpleNamespace(is_active=lambda: True, open_session=lambda timeout: chan)
    shell = types.SimpleNamespace(conn=types.SimpleNamespace(client=types.SimpleNamespace(get_transport=lambda: transport)))
    with pytest.raises(TimeoutError):
        DeviceShell._exec(shell, "sleep 1000", 0.5)
    time.sleep(0.2)
    assert crashed == [], "the watchdog's thread raised (a traceback on the operator's terminal)"


class _SlowSftp(paramiko.SFTPServerInterface):
    """An SFTP server that answers every write, each well within SFTP_STALL_S, but late: a device that keeps an
    upload of N chunks going for N times that. It records what was removed."""

    delay = 0.25
    removed: list[str] = []

    class _Handle(paramiko.SFTPHandle):
        def write(self, offset, data):
            time.sleep(_SlowSftp.delay)
            return paramiko.SFTP_OK

        def chattr(self, attr):
            return paramiko.SFTP_OK

    def open(self, path, flags, attr):
        return self._Handle(flags)

    def stat(self, path):
        return paramiko.SFTPAttributes()

    def remove(self, path):
        self.removed.append(path)
        return paramiko.SFTP_OK


@pytest.mark.parametrize("source", ["bytes", "file"])
def test_an_upload_answered_just_in_time_request_by_request_fails_at_its_overall_deadline(device, monkeypatch,
                                                                                         tmp_path, source):
    """Every SFTP request waited at most SFTP_STALL_S, but a device answering each just in time stalled an upload of N
    chunks for N times that. The upload as a whole now has 2 * SFTP_STALL_S + its size at SFTP_MIN_RATE; past it, one
    line names the device, the file, the bytes sent and the rate required, and the .part is removed."""
    monkeypatch.setattr(ssh, "SFTP_STALL_S", 1.0, raising=False)
    monkeypatch.setattr(ssh, "SFTP_MIN_RATE", 1 << 20, raising=False)  # 2 + 0.6 s for the 640 KiB below
    _SlowSftp.removed = []
    shell = _shell(device(lambda channel: False, sftp=_SlowSftp))  # 20 writes of 32 KiB: 5 s at 0.25 s each
    got, seconds = [], []
    local = b"m" * (640 << 10)
    if source == "file":  # sftp.put, as a deploy uploads a model
        (tmp_path / "model.tflite").write_bytes(local)
        local = tmp_path / "model.tflite"

    def go():
        started = time.monotonic()
        try:
            got.append(shell.put(local, "/opt/edgekit/incoming/model.tflite", rename=False))
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            got.append(exc)
        seconds.append(time.monotonic() - started)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(20)
    assert got and isinstance(got[0], DeployError), f"the upload hung or went on to the end: {got!r}"
    assert seconds[0] < 4.5, seconds
    assert str(got[0]).startswith("pi-1: upload of model.tflite failed (")
    assert " of 655,360 bytes sent in 3 s; an upload must go at 1024 KiB/s or more" in str(got[0]), str(got[0])
    assert _SlowSftp.removed == ["/opt/edgekit/incoming/model.tflite.part"]
    assert ssh.upload_deadline(14 << 20) == 2.0 + 14


def test_an_upload_of_a_local_file_gone_meanwhile_is_one_line_naming_it(device, tmp_path):
    """The upload's size is read before its deadline is set: a local file removed since the manifest was checked
    raised FileNotFoundError out of put(), "unexpected ... please report it" in a deploy."""
    _SlowSftp.removed = []
    shell = _shell(device(lambda channel: False, sftp=_SlowSftp))
    with pytest.raises(DeployError, match=r"^pi-1: upload of int8\.tflite failed \(.*No such file"):
        shell.put(tmp_path / "gone.tflite", "/opt/edgekit/incoming/int8.tflite")


def test_an_ssh_key_that_is_a_fifo_is_one_line_naming_it_never_a_wait(tmp_path, unblocked):
    """A device's `key:` naming a FIFO held the deploy for ever: the key was read to check it, and a FIFO's open waits
    for a writer. Now a key that is no regular file is one line naming it, before any connection."""
    from edge_kit.fleet.inventory import load_fleet

    key = tmp_path / "id_ed25519"
    os.mkfifo(key, 0o600)
    (tmp_path / "fleet.yaml").write_text(f"fleet: f\nbroker: {{host: 127.0.0.1, port: 1}}\ndefaults: {{user: edgekit, "
                                         f"profile: rpi4, key: {key}}}\ndevices:\n  - {{name: d1, host: 127.0.0.1}}\n")
    dev = load_fleet(tmp_path / "fleet.yaml").devices[0]
    def connect():
        with DeviceShell(dev, tmp_path / "known_hosts"):
            pass

    caught = unblocked(connect, key, 20, "connecting with the SSH key")
    assert isinstance(caught, DeployError), caught
    assert str(caught) == (f"d1 (edgekit@127.0.0.1:22): SSH key {key}: not a regular file; set the device's `key:` "
                              "in the fleet file to its private key file")


def test_a_known_hosts_file_that_is_a_fifo_is_one_line_naming_it_never_a_wait(tmp_path, unblocked):
    """A fleet's `known_hosts` naming a FIFO held the deploy for ever: paramiko opened it to load the host keys, and a
    FIFO's open waits for a writer. Now it is one line naming the file, before any connection."""
    from edge_kit.fleet.inventory import load_fleet

    known_hosts = tmp_path / "known_hosts"
    os.mkfifo(known_hosts, 0o600)
    (tmp_path / "fleet.yaml").write_text("fleet: f\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, "
                                         "profile: rpi4}\ndevices:\n  - {name: d1, host: 127.0.0.1}\n")
    dev = load_fleet(tmp_path / "fleet.yaml").devices[0]
    def connect():
        with DeviceShell(dev, known_hosts):
            pass

    caught = unblocked(connect, known_hosts, 20, "loading the known_hosts file")
    assert isinstance(caught, HostKeyError), caught
    assert str(caught) == (f"d1: {known_hosts}: cannot read the SSH known_hosts file (not a regular file); make it "
                              "a readable file, or set known_hosts in the fleet file")
