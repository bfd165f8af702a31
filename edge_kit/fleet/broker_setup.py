"""The broker as a second wall: per-device MQTT credentials, an ACL that confines each device to its
own topics, and a CA with a server certificate for TLS.

Signatures (``edge_kit.fleet.keys``) already make forged messages useless; the broker's wall keeps
strangers from publishing at all, keeps a compromised device from reading another's commands or
writing under another's name, and keeps the traffic private. What it generates:

- a password per device and one for the operator (``<folder>/secrets/<user>.pass``, mode 600);
- the ACL: a device may publish only its own ``status``, ``bench``, ``telemetry``, ``live``,
  ``shadow``, ``cmd/ack`` and ``reported`` (:data:`DEVICE_TOPICS_WRITE`) and read only its own ``cmd``
  and ``desired``; only the operator user publishes commands and reads the fleet;
- a CA and a server certificate for the broker's addresses (``<folder>/tls/``), EC P-256.

The simulated fleet, the demo and the tests run with all of it unless told ``--insecure``; the
docs' Security page gives the same ACL and a hardened ``mosquitto.conf`` for a real fleet.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_kit.errors import InputError
from edge_kit.fsutil import folder_lock
from edgekit_protocol.messages import MAX_PAYLOAD, OPERATOR_KINDS, ROOT

OPERATOR_USER = "operator"
MAX_PACKET = MAX_PAYLOAD + 4096  # a message at the protocol's limit, its topic and the MQTT header
# QoS 1 messages the broker sends one client (the monitor) before it acknowledges them: what waits in the monitor is
# bounded by it (Mosquitto's default, 20, would hold the monitor to 20 records a transaction; 0 is no bound at all,
# and a flooding device then fills the monitor's memory). Six of the monitor's batches of 500: the one being
# checked, the four the writer may hold, one arriving.
MAX_INFLIGHT = 3000
MAX_QUEUED = 100_000  # QoS 1 messages queued per client beyond those in flight (an offline monitor's session)


def broker_limits(queued: int = MAX_QUEUED) -> list[str]:
    """Return the ``mosquitto.conf`` lines that bound what one client can make the broker hold: the largest packet
    (a receiver refuses a message over the protocol's limit anyway), the messages in flight to a client and those
    queued for it (``queued``). Mosquitto has no per-client publish rate: the monitor's ingest budget is that."""
    return [f"max_packet_size {MAX_PACKET}", f"max_inflight_messages {MAX_INFLIGHT}",
            f"max_queued_messages {queued}", "max_queued_bytes 0"]
DEVICE_TOPICS_WRITE = ("status", "bench", "telemetry", "live", "shadow", "cmd/ack", "reported")


@dataclass(frozen=True)
class BrokerTls:
    """PEM files for a TLS listener: the CA that signed the server certificate, and the server's pair."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class BrokerWall:
    """What a broker needs to enforce the wall, and where each user's password file is."""

    users: dict[str, str]  # user -> password (for the broker's password file)
    password_files: dict[str, Path]
    acl: str
    tls: BrokerTls


def fleet_acl(fleet: str, operator: str = OPERATOR_USER) -> str:
    """Return the Mosquitto ACL of a fleet whose device usernames are the device names.

    ``%u`` is Mosquitto's pattern for the connecting username, so one rule covers every device.
    """
    base = f"{ROOT}/{fleet}"
    lines = ["# edge-kit: the operator commands and reads the fleet; each device only its own topics",
             f"user {operator}", f"topic readwrite {base}/#", ""]
    lines += [f"pattern write {base}/%u/{kind}" for kind in DEVICE_TOPICS_WRITE]
    lines += [f"pattern read {base}/%u/{kind}" for kind in OPERATOR_KINDS]
    return "\n".join(lines) + "\n"


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only (a symlink in its place is refused, an existing
    file's mode tightened before a byte is written); returns nothing.

    Raises:
        OSError: the folder or the file cannot be written, or ``path`` is a symlink.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _passwd_lines(passwd: Path) -> list[str]:
    """Return the lines of the Mosquitto password file ``passwd``, each with its line end.

    Raises:
        InputError: it cannot be read, or is not UTF-8 text (names it).
    """
    try:
        return passwd.read_text(encoding="utf-8").splitlines(keepends=True)
    except (OSError, UnicodeError) as exc:
        raise InputError(f"{passwd}: cannot read the broker's password file ({getattr(exc, 'strerror', None) or exc}); "
                         "give --broker-dir the folder `edgekit fleet init --out` wrote") from None


def broker_users(passwd: Path) -> set[str]:
    """Return the users the Mosquitto password file ``passwd`` holds.

    Raises:
        InputError: it cannot be read, or is not UTF-8 text (names it).
    """
    return {line.split(":", 1)[0] for line in _passwd_lines(passwd) if line.strip()}


def _rewrite_passwd(passwd: Path, change: Callable[[list[str]], list[str]]) -> bool:
    """Apply ``change`` to the lines of the Mosquitto password file ``passwd`` and write the result atomically (a
    temporary file, mode 600, renamed over it: the broker never reads half a file), holding its folder's lock
    (:func:`~edge_kit.fsutil.folder_lock`: a revoke and a ``deploy --new-key`` at once never write one's change over
    the other's); return whether it changed.

    Raises:
        InputError: ``passwd`` cannot be read (names it; nothing is written).
        OSError: it cannot be rewritten (it stays as it was).
    """
    with folder_lock(passwd.parent):
        lines = _passwd_lines(passwd)
        new = change(lines)
        if new == lines:
            return False
        tmp = passwd.with_name(f".{passwd.name}.{os.getpid()}.part")
        try:
            write_private(tmp, "".join(new).encode())
            os.replace(tmp, passwd)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return True


def remove_broker_user(passwd: Path, user: str) -> bool:
    """Remove ``user``'s line from the Mosquitto password file ``passwd``, atomically; return whether it was there.
    The broker goes on taking the user until it reloads the file (SIGHUP, ``systemctl reload mosquitto``).

    Raises:
        InputError: ``passwd`` cannot be read (names it; nothing is written).
        OSError: it cannot be rewritten (it stays as it was).
    """
    return _rewrite_passwd(passwd, lambda lines: [line for line in lines if line.split(":", 1)[0] != user])


def add_broker_user(passwd: Path, user: str, password: str) -> None:
    """Set ``user``'s password in the Mosquitto password file ``passwd`` (hashed, its old line replaced),
    atomically; returns nothing. The broker takes it once it reloads the file.

    Raises:
        InputError: ``passwd`` cannot be read (names it; nothing is written).
        OSError: it cannot be rewritten (it stays as it was).
    """
    def change(lines: list[str]) -> list[str]:
        kept = [x for x in lines if x.split(":", 1)[0] != user]
        if kept and not kept[-1].endswith("\n"):
            kept[-1] += "\n"
        return [*kept, mosquitto_password_line(user, password) + "\n"]

    _rewrite_passwd(passwd, change)


def make_tls(folder: Path, hosts: list[str], days: int = 365) -> BrokerTls:
    """Write a CA and a server certificate valid for ``hosts`` (IP addresses or DNS names) into ``folder``.

    Returns:
        The PEM files (the CA's own key is not kept: nothing else is ever signed with it).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def alt(host: str) -> x509.GeneralName:
        try:
            return x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            return x509.DNSName(host)

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    valid = dict(not_valid_before=now - datetime.timedelta(minutes=5), not_valid_after=now + datetime.timedelta(days=days))
    ca = (x509.CertificateBuilder(subject_name=name("edge-kit fleet CA"), issuer_name=name("edge-kit fleet CA"),
                                  public_key=ca_key.public_key(), serial_number=x509.random_serial_number(), **valid)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder(subject_name=name(hosts[0]), issuer_name=ca.subject, public_key=key.public_key(),
                                      serial_number=x509.random_serial_number(), **valid)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.SubjectAlternativeName([alt(h) for h in hosts]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "server.pem").write_bytes(server.public_bytes(pem))
    write_private(folder / "server.key", key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                                            serialization.NoEncryption()))
    return BrokerTls(folder / "ca.pem", folder / "server.pem", folder / "server.key")


def build_wall(folder: Path, fleet: str, devices: list[str], hosts: list[str],
               left_out: set[str] | frozenset[str] = frozenset()) -> BrokerWall:
    """Generate fresh credentials for the operator and each device, the fleet's ACL, and TLS for ``hosts``.

    A device in ``left_out`` (revoked: ``edgekit fleet revoke``) gets no password: its ``secrets/<device>.pass`` is
    not written, and one left there from before its revocation is removed (a password no broker takes is no use, and
    a plain one lying about is one more to leak); its file's path stays in ``password_files``, where
    ``edgekit deploy --new-key`` writes a fresh one when it readmits the device.

    Returns:
        The wall (passwords are also written to ``<folder>/secrets/<user>.pass``, mode 600, folder 700); ``users``
        holds no device of ``left_out``.

    Raises:
        OSError: a file cannot be written or removed.
    """
    users = {user: secrets.token_urlsafe(24) for user in (OPERATOR_USER, *devices) if user not in left_out}
    (folder / "secrets").mkdir(mode=0o700, parents=True, exist_ok=True)  # every plain password: the owner's alone
    files = {user: folder / "secrets" / f"{user}.pass" for user in (OPERATOR_USER, *devices)}
    for user, path in files.items():
        if user in users:
            write_private(path, (users[user] + "\n").encode())
        else:
            path.unlink(missing_ok=True)
    return BrokerWall(users, files, fleet_acl(fleet), make_tls(folder / "tls", hosts))


def broker_entry(host: str, port: int, wall: BrokerWall | None, user: str) -> dict[str, Any]:
    """Return the fleet file's broker settings for ``user`` (the operator, or a device's ``agent_broker``)."""
    entry: dict[str, Any] = {"host": host, "port": port}
    if wall is not None:
        entry.update(username=user, password_file=str(wall.password_files[user]), tls={"ca": str(wall.tls.ca)})
    return entry


def mosquitto_password_line(user: str, password: str, iterations: int = 101) -> str:
    """Return ``user:$7$...``, one line of a Mosquitto 2 password file (PBKDF2-SHA512, as
    ``mosquitto_passwd`` writes it), so no Mosquitto tool is needed on the operator's machine."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"{user}:$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def hardened_conf(folder: Path, port: int = 8883, queued: int = MAX_QUEUED, listen: str | None = None) -> str:
    """Return a ``mosquitto.conf`` for a real fleet whose wall files are in ``folder`` (as written by
    :func:`write_fleet_wall`): TLS only, no anonymous clients, the ACL, persistence, and queues sized
    so a monitor outage does not lose records (``queued`` messages per offline persistent client)."""
    return "\n".join([
        "# edge-kit fleet broker (written by `edgekit fleet init`). Started as root, Mosquitto drops to the user",
        "# 'mosquitto', which must read passwd, acl and tls/server.key and write data/ (never secrets/, which",
        f"# holds every client's plain password for the fleet file): cd {folder} && "
        "chown mosquitto: passwd acl tls/server.key && chown -R mosquitto: data",
        f"listener {port}" + (f" {listen}" if listen else ""), "allow_anonymous false", f"password_file {folder / 'passwd'}", f"acl_file {folder / 'acl'}",
        f"cafile {folder / 'tls' / 'ca.pem'}", f"certfile {folder / 'tls' / 'server.pem'}",
        f"keyfile {folder / 'tls' / 'server.key'}", "tls_version tlsv1.2", "persistence true",
        f"persistence_location {folder / 'data'}/",
        f"# receivers refuse messages over {MAX_PAYLOAD} bytes anyway; {MAX_INFLIGHT} unacknowledged to a client "
        "(the monitor); a queue per offline client sized for the outage to survive (past it Mosquitto drops what",
        "# devices publish: lost, recorded by the monitor as sequence gaps and alerted)",
        *broker_limits(queued), "set_tcp_nodelay true", ""])


def write_fleet_wall(folder: Path, fleet: str, devices: list[str], hosts: list[str], port: int = 8883,
                     listen: str | None = None, left_out: set[str] | frozenset[str] = frozenset()) -> BrokerWall:
    """Write everything a real fleet's broker and devices need into ``folder``: ``passwd`` (hashed),
    ``acl``, ``tls/`` (CA, server certificate and key), ``mosquitto.conf`` and each user's
    ``secrets/<user>.pass`` (mode 600, in a folder of mode 700) for the fleet file. A device in ``left_out``
    (revoked) gets neither a user in ``passwd`` nor a password file, as in :func:`build_wall`.

    Everything is written into a temporary folder beside ``folder`` and renamed into place, so a
    failure or an interruption leaves no half-written wall (and nothing that blocks a second try).

    Returns:
        The wall.

    Raises:
        FileExistsError: ``folder`` already holds a wall (never overwritten: devices may use it).
        InputError: a host, or ``listen``, is not a host name or an IP address (non-ASCII names in their ``xn--``
            form), or the first host is too long for a certificate's name; ``folder`` is a file, or its parent
            cannot be created or written (nothing is written).
        OSError: writing failed midway (nothing is left behind).
    """
    from edge_kit.fleet.inventory import check_host

    folder = Path(folder).resolve()
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: a file, not a folder; choose another --out for the broker's files")
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(folder)
    for i, host in enumerate(hosts):
        try:
            check_host(host)
            host.encode("ascii")
            ok = i > 0 or len(host) <= 64
        except (ValueError, UnicodeError):
            ok = False
        if not ok:
            raise InputError(f"--broker-host {host!r}: give the name or address devices reach the broker at "
                             "(an IP address or an ASCII DNS name, a non-ASCII one in its xn-- form; the first, "
                             "the certificate's name, at most 64 characters)")
    if listen is not None:
        try:  # it is written into mosquitto.conf's listener line: a space or a line break would add settings
            check_host(listen)
        except ValueError:
            raise InputError(f"--listen {listen!r}: give the IP address or host name of an interface of the broker's "
                             "host (e.g. 10.0.0.2, or ::1 without brackets), or leave --listen out for every "
                             "interface") from None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    except OSError as exc:
        raise InputError(f"{folder.parent}: cannot write the broker's files there ({exc.strerror or exc}); "
                         "choose another --out") from None
    try:
        wall = build_wall(work, fleet, devices, hosts, left_out)
        (work / "data").mkdir(mode=0o700)
        write_private(work / "passwd", ("\n".join(mosquitto_password_line(u, p) for u, p in wall.users.items()) + "\n").encode())
        (work / "acl").write_text(wall.acl)
        (work / "mosquitto.conf").write_text(hardened_conf(folder, port, listen=listen))
        work.chmod(0o755)  # the broker's user reads passwd, acl and tls/ in it (secrets/ stays 700)
        if folder.exists():
            folder.rmdir()  # empty (checked above); a wall written meanwhile makes this fail
        work.rename(folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    moved = {user: folder / path.relative_to(work) for user, path in wall.password_files.items()}
    return BrokerWall(wall.users, moved, wall.acl, BrokerTls(folder / "tls" / "ca.pem", folder / "tls" / "server.pem",
                                                             folder / "tls" / "server.key"))
