"""``fleet.yaml``: the devices of one fleet, how to reach them over SSH, and the fleet's broker.

Example::

    fleet: factory-a
    broker: {host: mqtt.local, port: 8883, username: ops, password_file: ~/.config/edgekit/mqtt.pass,
             tls: {ca: ~/.config/edgekit/ca.pem}}
    defaults: {user: edgekit, key: ~/.ssh/edgekit_ed25519, profile: rpi4}
    devices:
      - {name: pi-01, host: 10.0.0.21, tags: [pi, line-1]}
      - {name: coral-01, host: 10.0.0.31, profile: coral-usb, tags: [coral]}

Relative paths of files on the host (``key``, ``known_hosts``, ``keys``, the broker's ``password_file``
and ``tls`` files) are taken from the fleet file's folder, whatever the current folder; ``~`` is the
home folder. SSH host keys are checked against ``known_hosts`` (default ``~/.ssh/known_hosts``). Passwords
are never written in the file: SSH uses keys, MQTT a ``password_file``. ``defaults``
fills any device key a device leaves out. Each device may carry ``constraints`` overriding its
profile's, and ``agent_broker`` (username and password file the agent on that device uses).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections import Counter
from pathlib import Path
from typing import Annotated

from pydantic import (
    AfterValidator,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from edge_kit.config import StrictModel, closest, load_yaml_model
from edge_kit.errors import ConfigError
from edge_kit.fleet.broker_setup import OPERATOR_USER
from edge_kit.fleet.keys import FleetKeys
from edge_kit.manifest import ArtifactTrust
from edge_kit.profiles import Constraints, Storage
from edgekit_protocol.config import BrokerConfig, ServeConfig
from edgekit_protocol.messages import MAX_TELEMETRY_INTERVAL_S

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# A DNS name: dot-separated labels of letters, digits, '-' and '_', none starting or ending with '-'.
_HOST_LABEL = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"
_HOST = re.compile(rf"^{_HOST_LABEL}(\.{_HOST_LABEL})*\.?$")
_ZONE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # an IPv6 address's zone: an interface's name or index
_LOGIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?$")  # a POSIX login name (useradd's, and Samba's '$')


def check_host(host: str) -> str:
    """Return ``host`` when it is an IP address (an IPv6 one with an interface as its zone, ``fe80::1%eth0``) or a
    DNS name.

    Raises:
        ValueError: anything else (an option such as ``-oProxyCommand=...``, ``user@host``, a port, spaces, a zone
            that is no interface name: Python's ``ipaddress`` takes any text after ``%``, a line break too).
    """
    try:
        zone = getattr(ipaddress.ip_address(host), "scope_id", None)
        if zone is None or _ZONE.fullmatch(zone):
            return host
    except ValueError:
        pass
    if len(host) > 253 or not _HOST.fullmatch(host):
        raise ValueError(f"{host!r} is not a host name or an IP address; give the device's address "
                         "(e.g. 10.0.0.21 or pi-01.local; the port goes in 'port', the login in 'user')")
    return host


def _check_login(user: str) -> str:
    """Return ``user`` when it is a login name (letters, digits, '_', '.', '-'; at most 32).

    Raises:
        ValueError: anything else (shell characters, spaces, an option).
    """
    if not _LOGIN.fullmatch(user):
        raise ValueError(f"{user!r} is not a login name (letters, digits, '_', '.' and '-', at most 32, "
                         "not starting with '-' or '.')")
    return user


def _on_device(path: str, give: str) -> str:
    """Return ``path`` (on the device) when it is absolute or under the login's home (``~`` or ``~/...``).

    Raises:
        ValueError: a relative path (the agent runs from ``<root>/agent``, the bundle each deploy replaces, where it
            would mean another), ``~user`` or control characters; the text says to ``give`` one.
    """
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise ValueError(f"{path!r} holds a control character")
    if not (path == "~" or path.startswith("~/") or (path.startswith("/") and path.strip("/"))):
        raise ValueError(f"{path!r}: give {give}")
    return path


def _check_root(root: str) -> str:
    """Return ``root`` when it is an absolute folder or one under the login's home (``~`` or ``~/...``).

    Raises:
        ValueError: as :func:`_on_device`.
    """
    return _on_device(root, "an absolute folder (/opt/edgekit) or one under the SSH user's home (~/.edgekit)")


def _check_device_file(path: str) -> str:
    """Return ``path`` (a file on the device: ``pull.ca_file``) when it is absolute or under the login's home.

    Raises:
        ValueError: as :func:`_on_device`.
    """
    return _on_device(path, "an absolute path on the device (/etc/edgekit/store-ca.pem) or one under the SSH user's "
                            "home (~/store-ca.pem)")


def _check_python(python: str) -> str:
    """Return ``python`` when it can be one word of a command line: a name on the PATH or a path.

    Raises:
        ValueError: empty, an option, or holding whitespace or control characters.
    """
    if not python or python.startswith("-") or any(c.isspace() or ord(c) < 32 for c in python):
        raise ValueError(f"{python!r}: give the device's interpreter as a name on its PATH or a path "
                         "(python3, /usr/bin/python3.11), without spaces or options")
    return python


Host = Annotated[str, AfterValidator(check_host)]
Login = Annotated[str, AfterValidator(_check_login)]
Root = Annotated[str, AfterValidator(_check_root)]
DeviceFile = Annotated[str, AfterValidator(_check_device_file)]
Python = Annotated[str, AfterValidator(_check_python)]
# what an agent's own config takes (and its telemetry says): receivers refuse more than a day
TelemetryInterval = Annotated[float, Field(gt=0, le=MAX_TELEMETRY_INTERVAL_S)]


class Serving(StrictModel):
    """The agent's serving API (its ``serve`` config) as the fleet file may set it."""

    enabled: bool = True
    http_port: int | None = Field(default=None, gt=0, lt=65536)  # loopback HTTP/JSON on 127.0.0.1; None: off
    workers: int = Field(default=1, ge=1, le=64)
    max_clients: int = Field(default=16, ge=1, le=10_000)  # socket clients
    http_max_clients: int = Field(default=4, ge=1, le=1000)  # HTTP connections, places of their own
    http_max_body_mb: float = Field(default=ServeConfig.http_max_body_mb, gt=0, le=4096)
    busy_poll_us: int = Field(default=0, ge=0, le=100_000)  # the server waits on the CPU for a lone client's next request
    # How long a request may take to arrive, its headers on HTTP, and a client to take its answer (the agent's bounds)
    request_timeout_s: float = Field(default=ServeConfig.request_timeout_s, gt=0, le=3600)
    http_header_timeout_s: float = Field(default=ServeConfig.http_header_timeout_s, gt=0, le=3600)
    send_timeout_s: float = Field(default=ServeConfig.send_timeout_s, gt=0, le=3600)


class Pulling(StrictModel):
    """Pull rollouts on the device (its ``pull`` config) as the fleet file may set it."""

    ca_file: DeviceFile | None = None  # a CA bundle on the device, for an https:// store with a private CA
    retry_s: float = Field(default=30.0, gt=0, le=3600)
    max_attempts: int = Field(default=6, ge=1, le=100)


class DeviceDefaults(StrictModel):
    port: int = Field(default=22, gt=0, lt=65536)
    user: Login | None = None
    key: Path | None = None
    profile: str | None = None
    root: Root = "~/.edgekit"
    python: Python = "python3"
    simulated: bool = False
    storage: Storage | None = None
    serve: Serving | None = None
    pull: Pulling | None = None
    telemetry_interval_s: TelemetryInterval | None = None


class Device(StrictModel):
    name: str = Field(pattern=_NAME)

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name == OPERATOR_USER:
            raise ValueError(f"'{name}' is reserved for the operator (its broker user and key); rename the device")
        return name
    host: Host
    port: int = Field(default=22, gt=0, lt=65536)
    user: Login
    key: Path | None = None  # None: the SSH agent / default keys
    profile: str
    tags: list[str] = Field(default_factory=list)
    root: Root = "~/.edgekit"
    python: Python = "python3"  # the interpreter on the device that has numpy, paho-mqtt, PyYAML and LiteRT
    simulated: bool = False  # a virtual device of `edgekit sim`: its agent marks every record
    constraints: Constraints | None = None
    storage: Storage | None = None  # overrides the profile's store budget
    serve: Serving | None = None  # the serving API's settings (default: the agent's)
    pull: Pulling | None = None  # pull rollouts' settings (default: the agent's)
    # seconds between the agent's telemetry, live and shadow messages (default: the agent's, 30)
    telemetry_interval_s: TelemetryInterval | None = None
    agent_broker: BrokerConfig | None = None  # what the agent on this device connects with; default: the fleet's

    def matches(self, selector: str) -> bool:
        """Return True when ``selector`` (a name, ``tag:<tag>``, or ``all``) selects this device."""
        if selector == "all":
            return True
        if selector.startswith("tag:"):
            return selector[4:] in self.tags
        return selector == self.name


class Fleet(StrictModel):
    fleet: str = Field(pattern=_NAME)
    broker: BrokerConfig = BrokerConfig()
    known_hosts: Path = Path("~/.ssh/known_hosts")  # SSH host keys the deploy checks against
    keys: Path = Path("keys")  # the operator key and the device key registry; relative: to this file's folder
    defaults: DeviceDefaults = DeviceDefaults()
    devices: list[Device] = Field(min_length=1)
    # Ed25519 public keys (base64, as in a device.pub, or a file holding one) whose signed manifests this
    # fleet takes; listing any makes a signature by one of them (or the operator key) required
    artifact_keys: list[str] = []
    _source: Path | None = PrivateAttr(default=None)  # the fleet file it was read from

    @model_validator(mode="before")
    @classmethod
    def _apply_defaults(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("devices"), list):
            defaults = {k: v for k, v in (data.get("defaults") or {}).items() if v is not None}
            data = {**data, "devices": [{**defaults, **d} if isinstance(d, dict) else d for d in data["devices"]]}
        return data

    @field_validator("devices")
    @classmethod
    def _unique_names(cls, devices: list[Device]) -> list[Device]:
        listed = Counter(d.name for d in devices)  # one pass (names.count per name was quadratic: seconds for 10,000)
        twice = sorted(n for n, times in listed.items() if times > 1)
        if twice:
            raise ValueError(f"device names must be unique; listed twice: {', '.join(twice)}")
        return devices

    def check_agent_folders(self) -> None:
        """Check that no two devices reach the same agent folder over SSH (same host, port and root, and
        the same user when the root is under the home): a deploy to both would overwrite one's keys,
        config and models with the other's. Fleets that are not deployed over SSH (monitoring, virtual
        devices) may share a host.

        Raises:
            ConfigError: two devices share one (names both, the folder and the fleet file).
        """
        seen: dict[tuple[str, int, str, str], str] = {}
        for d in self.devices:
            where = (d.host.lower().rstrip("."), d.port, d.user if d.root.startswith("~") else "", d.root.rstrip("/"))
            if where in seen:
                raise ConfigError(f"{self._source or 'fleet file'}: devices {seen[where]} and {d.name} reach the same "
                                  f"agent folder ({d.user}@{d.host}:{d.port} {d.root}); give each its own host, port or root")
            seen[where] = d.name

    def select(self, selectors: list[str] | None) -> list[Device]:
        """Return the devices any selector picks (all devices when ``selectors`` is empty).

        Raises:
            ConfigError: a selector picks nothing (names the selector and the known names/tags).
        """
        if not selectors:
            return list(self.devices)
        picked: dict[str, Device] = {}
        for sel in selectors:
            hits = [d for d in self.devices if d.matches(sel)]
            if not hits:
                parts = [p.strip() for p in sel.split(",")]
                if len(parts) > 1 and all(any(d.matches(p) for d in self.devices) for p in parts):
                    raise ConfigError(f"--devices {sel}: one device, tag:<tag> or all per --devices, not a list; give "
                                      "each its own: " + " ".join(f"--devices {p}" for p in parts))
                tags = sorted({t for d in self.devices for t in d.tags})
                raise ConfigError(f"--devices {sel}: matches no device of fleet {self.fleet} "
                                  f"(devices: {', '.join(d.name for d in self.devices)}; tags: {', '.join(tags) or 'none'})")
            picked.update({d.name: d for d in hits})
        return [d for d in self.devices if d.name in picked]

    def named(self, selectors: list[str] | None) -> tuple[str, ...]:
        """Return the devices ``selectors`` name one by one (their own name, not ``tag:<tag>`` or ``all``), in the
        fleet file's order: what ``deploy --new-key`` readmits when revoked."""
        given = set(selectors or ())
        return tuple(d.name for d in self.devices if d.name in given)

    @property
    def source(self) -> Path:
        """Return the fleet file this fleet was read from.

        Raises:
            ConfigError: the fleet was not read from a file (it has no place for its keys and history).
        """
        if self._source is None:
            raise ConfigError(f"fleet {self.fleet} was not read from a file; load it with load_fleet")
        return self._source

    def broker_password(self) -> str | None:
        """Return the operator's broker password (``broker.password_file``), or None when none is set.

        Raises:
            ConfigError: the file cannot be read; the message names the fleet file and the key.
        """
        return self.broker.password(str(self._source or "fleet file"))

    def key_store(self) -> FleetKeys:
        """Return the fleet's keys (see :mod:`edge_kit.fleet.keys`): the ``keys`` folder, by default
        ``keys/`` next to the fleet file."""
        return FleetKeys(self.source.resolve().parent / self.keys.expanduser())

    def artifact_trust(self) -> ArtifactTrust:
        """Return the manifest signatures this fleet trusts (:class:`edge_kit.manifest.ArtifactTrust`): its
        ``artifact_keys`` (a file's path relative to the fleet file's folder) and its operator key where
        it has one; a signature is required when ``artifact_keys`` lists any.

        Raises:
            ConfigError: an entry is neither a key nor a readable file holding one (names the entry, and
                the file: missing, a folder, no regular file (a FIFO), not text, or a private key where its public
                half belongs).
        """
        from device_agents.identity import decode_key

        base = self._source.resolve().parent if self._source is not None else Path.cwd()
        keys = []
        for i, entry in enumerate(self.artifact_keys):
            where = f"{self._source or 'fleet file'}: artifact_keys[{i}]"
            path = base / Path(entry).expanduser()  # an absolute one stays as it is
            if not path.is_file():
                # base64 has no '.': a file name (a pasted key is never echoed); one that is there (a FIFO) too
                if entry.strip() and ("." in entry or path.exists()):
                    what = "a folder" if path.is_dir() else "not a regular file" if path.exists() else "no such file"
                    raise ConfigError(f"{where}: {path}: {what}; give a file holding an Ed25519 public key (base64, "
                                      "as `edgekit sign` prints it), or the key")
                keys.append(decode_key(entry, where))
                continue
            try:
                text = path.read_bytes()[:4096].decode().strip()
            except OSError as exc:
                raise ConfigError(f"{where}: {path}: {exc.strerror}") from None
            except UnicodeDecodeError:
                text = ""  # a binary file (a DER key, anything else): not a key in base64
            if "PRIVATE KEY" in text:
                raise ConfigError(f"{where}: {path} is a private key; list its public half (base64, as `edgekit sign` "
                                  "prints it, or a file holding that), and keep the private key off the fleet file")
            keys.append(decode_key(text, f"{where}: {path}"))
        if self._source is not None and (self.key_store().folder / "operator.key").is_file():
            keys.append(self.key_store().operator.public)
        return ArtifactTrust(tuple(keys), bool(self.artifact_keys))

    def device(self, name: str) -> Device:
        """Return the device called ``name``.

        Raises:
            ConfigError: no such device (with the known names).
        """
        for dev in self.devices:
            if dev.name == name:
                return dev
        names = [d.name for d in self.devices]
        hint = closest(name, names)
        raise ConfigError(f"device {name!r} is not in fleet {self.fleet}"
                          + (f"; did you mean '{hint}'?" if hint else f" (devices: {', '.join(names)})"))


def check_fleet_file(path: Path) -> None:
    """Return None when there is a fleet file at ``path`` (its contents are :func:`load_fleet`'s to check).

    Raises:
        ConfigError: nothing there, or a folder, with what to do.
    """
    if Path(path).is_dir():
        raise ConfigError(f"{path}: a folder, not a fleet file; give its fleet.yaml (e.g. {Path(path) / 'fleet.yaml'})")
    if not Path(path).exists():
        raise ConfigError(f"{path}: no such fleet file; write one (docs/fleet.md), or start a simulated fleet with "
                          "`edgekit sim up` and pass its .edgekit-sim/fleet.yaml")


def _at(path: Path | None, base: Path) -> Path | None:
    """Return ``path`` with ``~`` expanded and, when relative, taken from ``base`` (None stays None)."""
    if path is None:
        return None
    path = Path(path).expanduser()
    return path if path.is_absolute() else base / path


def _broker_at(broker: BrokerConfig | None, base: Path, *, agent: bool = False) -> BrokerConfig | None:
    """Return ``broker`` with its host-side files taken from ``base``: the password file and the TLS CA (read
    on the host; a deploy ships them), and for the host's own connection (not ``agent``) the TLS client
    certificate and key. An agent's certificate and key are paths on the device and stay as written."""
    if broker is None:
        return None
    tls = broker.tls
    if tls is not None:
        tls = dataclasses.replace(tls, ca=_at(tls.ca, base), **({} if agent else {"cert": _at(tls.cert, base),
                                                                                 "key": _at(tls.key, base)}))
    return dataclasses.replace(broker, password_file=_at(broker.password_file, base), tls=tls)


def _resolve_paths(fleet: Fleet, base: Path) -> Fleet:
    """Return ``fleet`` with every host-side file it names (``known_hosts``, each device's SSH ``key``, the
    broker's password file and TLS files, each ``agent_broker``'s password file and CA) taken from ``base``
    when relative, with ``~`` expanded; paths on the device (``pull.ca_file``, ``root``) stay as written."""
    devices = [d.model_copy(update={"key": _at(d.key, base), "agent_broker": _broker_at(d.agent_broker, base, agent=True)})
               for d in fleet.devices]
    defaults = fleet.defaults.model_copy(update={"key": _at(fleet.defaults.key, base)})
    return fleet.model_copy(update={"known_hosts": _at(fleet.known_hosts, base), "broker": _broker_at(fleet.broker, base),
                                    "defaults": defaults, "devices": devices})


def load_fleet(path: Path) -> Fleet:
    """Read and check ``fleet.yaml`` and return it; device profiles are checked to exist. Relative file paths
    in it (SSH keys, ``known_hosts``, the broker's password and TLS files) are taken from the fleet file's
    folder, not the current one; ``~`` is the home folder.

    Raises:
        ConfigError: missing, unreadable, unknown key, missing field, or an unknown profile (with file and line).
    """
    from edge_kit.profiles import load_profile

    check_fleet_file(path)
    fleet = _resolve_paths(load_yaml_model(path, Fleet), Path(path).resolve().parent)
    fleet._source = Path(path)
    first: dict[str, Device] = {}
    for d in fleet.devices:
        first.setdefault(d.profile, d)
    for dev in first.values():  # each profile once, with its first device, in the file's order: read per device, a
        try:  # fleet of 10,000 read its few profiles 10,000 times
            load_profile(dev.profile)
        except ConfigError as exc:
            raise ConfigError(f"{path}: device {dev.name}: {exc}") from None
    return fleet
