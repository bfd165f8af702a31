"""SSH endpoints for virtual devices: OpenSSH's sshd on its own port and address, with its own host key.

Each virtual device gets one ``sshd -D`` with a fresh ed25519 host key, public-key login only
(the simulated fleet's own key pair), and ``internal-sftp``; where sshd is not installed, the
embedded server of :mod:`edge_kit.sim.embedded_ssh` with the same keys. The host keys are known in advance, so
``sim up`` writes a ``known_hosts`` that the deploy tool checks like any other.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_kit.errors import EdgeKitError
from edge_kit.fleet.ssh import known_hosts_name
from edge_kit.sim.broker import START_TIMEOUT_S, free_port, wait_port
from edge_kit.sim.process import stop_process

# sshd's packet buffers grow past glibc's mmap threshold and are unmapped again, so every 14 MB
# upload faulted in ~57,000 fresh pages (perf stat: 0.19 CPU-s, mostly kernel). Keeping them on the
# heap cuts that to ~4,000 and the sshd's CPU per upload by half; a simulated device shares the
# host's cores, a real one pays this on its own CPU.
SSHD_MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=67108864"


def write_keypair(path: Path, comment: str = "edge-kit") -> str:
    """Write an ed25519 private key (OpenSSH format, mode 600) and ``<path>.pub``.

    Returns:
        The public key line (``ssh-ed25519 AAAA... comment``).
    """
    key = Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    line = f"{public} {comment}"
    path.with_suffix(".pub").write_text(line + "\n")
    return line


def known_hosts_line(host: str, port: int, public_line: str) -> str:
    """Return the ``known_hosts`` entry for a host key served on ``host:port``."""
    kind, blob = public_line.split()[:2]
    return f"{known_hosts_name(host, port)} {kind} {blob}"


def find_sshd() -> str | None:
    """Return the path of OpenSSH's ``sshd``, or None."""
    return shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if Path(p).is_file()), None)


@dataclass
class SshEndpoint:
    """One sshd for one virtual device; ``authorized`` is the public key line allowed to log in."""

    workdir: Path
    authorized: str
    port: int = 0
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None
    host_public: str = ""
    embedded: bool | None = None  # None: OpenSSH's sshd when installed, else the embedded server
    wrap: tuple[str, ...] = ()  # runs the server, e.g. ``nsenter ...`` to put it in another namespace
    settings: tuple[str, ...] = ()  # more sshd_config lines (OpenSSH's sshd only), e.g. ``SetEnv ...``

    @property
    def kind(self) -> str:
        return "embedded (paramiko)" if self.embedded else "OpenSSH sshd"

    def start(self) -> SshEndpoint:
        """Start the SSH server and wait until it listens.

        Raises:
            EdgeKitError: it did not start (its last error line is given).
        """
        sshd = find_sshd()
        if self.embedded is None:
            self.embedded = sshd is None
        self.workdir.mkdir(parents=True, exist_ok=True)
        host_key = self.workdir / "ssh_host_ed25519_key"
        if not host_key.exists():
            self.host_public = write_keypair(host_key, "edge-kit-sim-host")
        else:
            self.host_public = host_key.with_suffix(".pub").read_text().strip()
        (self.workdir / "authorized_keys").write_text(self.authorized + "\n")
        self.port = self.port or free_port()
        config = self.workdir / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", f"ListenAddress {self.host}", f"HostKey {host_key}",
            f"PidFile {self.workdir / 'sshd.pid'}", f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}",
            f"AllowUsers {getpass.getuser()}", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes", "UsePAM no", "StrictModes no", "PermitRootLogin prohibit-password",
            "Subsystem sftp internal-sftp", "LogLevel ERROR", "MaxStartups 64:30:128", "MaxSessions 64",
            *self.settings,
        ]) + "\n")
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        if self.embedded:
            argv = [sys.executable, "-m", "edge_kit.sim.embedded_ssh", "--host", self.host, "--port", str(self.port),
                    "--host-key", str(host_key), "--authorized", str(self.workdir / "authorized_keys")]
        else:
            argv = [str(sshd), "-D", "-e", "-f", str(config)]
        with open(self.workdir / "sshd.log", "ab") as log:
            self.proc = subprocess.Popen([*self.wrap, *argv], stdout=log, stderr=log, start_new_session=True,
                                         env=None if self.embedded else {**os.environ, "GLIBC_TUNABLES": SSHD_MALLOC_TUNABLES})
        if not wait_port(self.host, self.port, START_TIMEOUT_S):
            self.stop()
            tail = (self.workdir / "sshd.log").read_text().strip().splitlines()[-1:]
            raise EdgeKitError(f"{self.kind} did not start on {self.host}:{self.port}: {' '.join(tail) or 'no output'}")
        return self

    def stop(self) -> None:
        """Stop sshd (no-op when stopped); sessions it started end with their connections."""
        stop_process(self.proc)
        self.proc = None
