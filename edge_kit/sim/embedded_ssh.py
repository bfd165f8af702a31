"""An embedded SSH server for virtual devices on machines without OpenSSH's sshd (paramiko).

``python -m edge_kit.sim.embedded_ssh --port N --host-key KEY --authorized KEY.pub [--host A]``
serves one virtual device on A:N (127.0.0.1) until SIGTERM: public-key login for the one authorized key,
``exec`` requests run with ``/bin/sh -c`` as the current user, and an SFTP subsystem over the local
filesystem. It is what ``edgekit sim`` falls back to; deploys cannot tell it from sshd.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import paramiko
from paramiko.sftp import SFTP_FAILURE, SFTP_OK
from paramiko.sftp_attr import SFTPAttributes
from paramiko.sftp_handle import SFTPHandle
from paramiko.sftp_server import SFTPServer
from paramiko.sftp_si import SFTPServerInterface


def _errno(exc: OSError) -> int:
    return SFTPServer.convert_errno(exc.errno)


def _status(call: Any, *args: Any) -> int:
    """Run a filesystem call; return SFTP_OK, or the SFTP code of the OSError it raised."""
    try:
        call(*args)
    except OSError as exc:
        return _errno(exc)
    return SFTP_OK


class _Handle(SFTPHandle):
    def chattr(self, attr: Any) -> int:  # fsetstat: a mode set on an open file (private keys)
        return _status(SFTPServer.set_file_attr, self.filename, attr)

    def stat(self) -> Any:
        try:
            return SFTPAttributes.from_stat(os.fstat(self.readfile.fileno() if hasattr(self, "readfile")
                                                     else self.writefile.fileno()))
        except OSError as exc:
            return _errno(exc)


class LocalSFTP(SFTPServerInterface):
    """SFTP over the local filesystem, paths as the client gives them (relative to the home folder)."""

    def _path(self, path: str) -> str:
        return os.path.join(os.path.expanduser("~"), path) if not path.startswith("/") else path

    def canonicalize(self, path: str) -> str:
        return os.path.normpath(self._path(path))

    def list_folder(self, path: str) -> Any:
        try:
            folder = self._path(path)
            out = []
            for name in os.listdir(folder):
                attr = SFTPAttributes.from_stat(os.lstat(os.path.join(folder, name)))
                attr.filename = name
                out.append(attr)
            return out
        except OSError as exc:
            return _errno(exc)

    def stat(self, path: str) -> Any:
        try:
            return SFTPAttributes.from_stat(os.stat(self._path(path)))
        except OSError as exc:
            return _errno(exc)

    def lstat(self, path: str) -> Any:
        try:
            return SFTPAttributes.from_stat(os.lstat(self._path(path)))
        except OSError as exc:
            return _errno(exc)

    def open(self, path: str, flags: int, attr: Any) -> Any:
        path = self._path(path)
        try:
            fd = os.open(path, flags | getattr(os, "O_BINARY", 0), getattr(attr, "st_mode", None) or 0o644)
        except OSError as exc:
            return _errno(exc)
        mode = "ab" if flags & os.O_APPEND else ("r+b" if flags & os.O_RDWR else ("wb" if flags & os.O_WRONLY else "rb"))
        f = os.fdopen(fd, mode)
        handle = _Handle(flags)
        handle.filename = path
        if "r" in mode or "+" in mode:
            handle.readfile = f
        if "w" in mode or "a" in mode or "+" in mode:
            handle.writefile = f
        return handle

    def remove(self, path: str) -> int:
        return _status(os.remove, self._path(path))

    def rename(self, oldpath: str, newpath: str) -> int:
        if os.path.exists(self._path(newpath)):
            return SFTP_FAILURE  # SFTP v3 rename refuses to overwrite; posix_rename does
        return self.posix_rename(oldpath, newpath)

    def posix_rename(self, oldpath: str, newpath: str) -> int:
        return _status(os.replace, self._path(oldpath), self._path(newpath))

    def mkdir(self, path: str, attr: Any) -> int:
        return _status(os.mkdir, self._path(path), getattr(attr, "st_mode", None) or 0o755)

    def rmdir(self, path: str) -> int:
        return _status(os.rmdir, self._path(path))

    def chattr(self, path: str, attr: Any) -> int:
        return _status(SFTPServer.set_file_attr, self._path(path), attr)

    def readlink(self, path: str) -> Any:
        try:
            return os.readlink(self._path(path))
        except OSError as exc:
            return _errno(exc)

    def symlink(self, target_path: str, path: str) -> int:
        return _status(os.symlink, target_path, self._path(path))


class _Server(paramiko.ServerInterface):
    def __init__(self, authorized: paramiko.PKey):
        self.authorized = authorized
        self.commands: dict[int, str] = {}
        self.ready = threading.Event()

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        ok = key.get_name() == self.authorized.get_name() and key.asbytes() == self.authorized.asbytes()
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        threading.Thread(target=_run_exec, args=(channel, command.decode()), daemon=True).start()
        return True


def _run_exec(channel: paramiko.Channel, command: str) -> None:
    """Run ``command`` with /bin/sh, stream its output to the channel, send the exit status."""
    proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)

    def pump(src: Any, send: Any) -> None:
        for chunk in iter(lambda: src.read1(65536), b""):
            send(chunk)

    def feed() -> None:
        try:
            while True:
                data = channel.recv(65536)
                if not data:
                    break
                proc.stdin.write(data)
                proc.stdin.flush()
        except (OSError, ValueError):
            pass
        try:
            proc.stdin.close()
        except OSError:
            pass

    threads = [threading.Thread(target=pump, args=(proc.stdout, channel.sendall), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, channel.sendall_stderr), daemon=True),
               threading.Thread(target=feed, daemon=True)]
    for t in threads:
        t.start()
    code = proc.wait()
    for t in threads[:2]:
        t.join()
    channel.send_exit_status(code)
    channel.shutdown_write()
    channel.close()


def _serve_connection(sock: socket.socket, host_key: paramiko.PKey, authorized: paramiko.PKey) -> None:
    transport = paramiko.Transport(sock)
    transport.add_server_key(host_key)
    transport.set_subsystem_handler("sftp", SFTPServer, LocalSFTP)
    try:
        transport.start_server(server=_Server(authorized))
    except (paramiko.SSHException, EOFError, OSError):
        transport.close()
        return
    while transport.is_active():
        channel = transport.accept(1.0)
        if channel is None:
            continue


def serve(port: int, host_key: Path, authorized: Path, host: str = "127.0.0.1") -> None:
    """Accept connections on ``host:port`` until SIGTERM/SIGINT."""
    key = paramiko.Ed25519Key.from_private_key_file(str(host_key))
    kind, blob = authorized.read_text().split()[:2]
    allowed = paramiko.PKey.from_type_string(kind, base64.b64decode(blob))
    server = socket.create_server((host, port), reuse_port=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: (stop.set(), server.close()))
    while not stop.is_set():
        try:
            sock, _ = server.accept()
        except OSError:
            break
        threading.Thread(target=_serve_connection, args=(sock, key, allowed), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m edge_kit.sim.embedded_ssh")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host-key", type=Path, required=True)
    parser.add_argument("--authorized", type=Path, required=True, help="the one public key allowed to log in")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    serve(args.port, args.host_key, args.authorized, args.host)


if __name__ == "__main__":
    main()

