"""The broker as a second wall: per-device MQTT credentials, an ACL that confines each device to its
own topics, and a CA with a server certificate for TLS.

Signatures (``edge_kit.fleet.keys``) already make forged messages useless; the broker's wall keeps
strangers from publishing at all, keeps a compromised device from reading another's commands or
writing under another's name, and keeps the traffic private. What it generates:

- a password per device and one for the operator (``<folder>/secrets/<user>.pass``, mode 600);
- the ACL: a device may publish only its own ``status``, ``bench``, ``telemetry`` and ``cmd/ack``
  and read only its own ``cmd``; only the operator user publishes commands and reads the fleet;
- a CA and a server certificate for the broker's addresses (``<folder>/tls/``), EC P-256.

The simulated fleet, the demo and the tests run with all of it unless told ``--insecure``; the
docs' Security page gives the same ACL and a hardened ``mosquitto.conf`` for a real fleet.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from edgekit_protocol.messages import ROOT

OPERATOR_USER = "operator"
DEVICE_TOPICS_WRITE = ("status", "bench", "telemetry", "cmd/ack")


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
    lines += [f"pattern read {base}/%u/cmd"]
    return "\n".join(lines) + "\n"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


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
    _write_private(folder / "server.key", key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                                            serialization.NoEncryption()))
    return BrokerTls(folder / "ca.pem", folder / "server.pem", folder / "server.key")


def build_wall(folder: Path, fleet: str, devices: list[str], hosts: list[str]) -> BrokerWall:
    """Generate fresh credentials for the operator and each device, the fleet's ACL, and TLS for ``hosts``.

    Returns:
        The wall (passwords are also written to ``<folder>/secrets/<user>.pass``, mode 600).
    """
    users = {user: secrets.token_urlsafe(24) for user in (OPERATOR_USER, *devices)}
    files = {}
    for user, password in users.items():
        files[user] = folder / "secrets" / f"{user}.pass"
        _write_private(files[user], (password + "\n").encode())
    return BrokerWall(users, files, fleet_acl(fleet), make_tls(folder / "tls", hosts))
