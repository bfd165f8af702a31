"""``agent.yaml``: what one agent is called, where its broker is, how it measures.

Example (every key but ``device`` and ``fleet`` has a default)::

    device: pi-kitchen-01
    fleet: factory-a
    profile: rpi5
    root: /opt/edgekit
    broker: {host: mqtt.local, port: 8883, username: pi-kitchen-01, password_file: /etc/edgekit/mqtt.pass,
             tls: {ca: /etc/edgekit/ca.pem}}
    telemetry_interval_s: 30
    bench: {min_runs: 200, min_seconds: 10, threads: 4}
    power: {sensors: [pi5-pmic, ina219, rapl, hwmon], idle_w: 2.7, busy_w: 6.4}

Validated with the standard library and PyYAML only (the agent has no pydantic): unknown keys and
wrong types are errors naming the file, line and key, with the closest valid name. A password is
never written in this file; ``password_file`` points at a file readable by the agent only.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from device_agents.settings import BenchSettings
from device_agents.power import DEFAULT_ORDER, SENSORS
from edge_kit.schema import check_name


class AgentConfigError(ValueError):
    """The agent config is invalid; the text names the file, line and key."""


@dataclass(frozen=True)
class TlsConfig:
    ca: Path | None = None  # CA bundle to verify the broker; None: the system's
    cert: Path | None = None  # client certificate (mutual TLS)
    key: Path | None = None


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password_file: Path | None = None
    tls: TlsConfig | None = None
    keepalive: int = 30
    reconnect_max_s: float = 10.0


@dataclass(frozen=True)
class PowerConfig:
    sensors: tuple[str, ...] = DEFAULT_ORDER
    idle_w: float | None = None  # from the device profile, for the estimate when no sensor answers
    busy_w: float | None = None
    cores: int | None = None
    sys_root: Path = Path("/")
    vcgencmd: str = "vcgencmd"


@dataclass(frozen=True)
class AgentConfig:
    device: str
    fleet: str
    root: Path | None = None  # None: /opt/edgekit as root, else ~/.edgekit
    profile: str | None = None
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    telemetry_interval_s: float = 30.0
    spool_max_records: int = 10_000
    max_queued_commands: int = 32
    bench: BenchSettings = field(default_factory=BenchSettings)
    power: PowerConfig = field(default_factory=PowerConfig)
    simulated: bool = False  # a virtual device of `edgekit sim`: every record says so

    def password(self) -> str | None:
        """Return the broker password read from ``broker.password_file``, or None.

        Raises:
            AgentConfigError: the file cannot be read.
        """
        if self.broker.password_file is None:
            return None
        try:
            return self.broker.password_file.read_text().strip()
        except OSError as exc:
            raise AgentConfigError(f"broker.password_file {self.broker.password_file}: {exc.strerror}") from None


def _where(file: Path, node: yaml.Node, key: str) -> str:
    return f"{file}:{node.start_mark.line + 1}: {key}" if key else f"{file}:{node.start_mark.line + 1}"


def _convert(tp: Any, node: yaml.Node, file: Path, key: str) -> Any:
    """Return ``node`` as a value of type ``tp``, or raise AgentConfigError naming file:line: key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null") and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), node, file, key)
    if dataclasses.is_dataclass(tp):
        return _dataclass(tp, node, file, key)
    if origin is tuple:
        if not isinstance(node, yaml.SequenceNode):
            raise AgentConfigError(f"{_where(file, node, key)}: expected a list")
        return tuple(_convert(args[0], item, file, key) for item in node.value)
    value = yaml.safe_load(yaml.serialize(node)) if isinstance(node, yaml.ScalarNode) else None
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, (str, int, float)) and not isinstance(value, bool),
          Path: isinstance(value, str)}.get(tp, False)
    if not ok:
        shown = value if isinstance(node, yaml.ScalarNode) else f"a {type(node).__name__[:-4].lower()}"
        raise AgentConfigError(f"{_where(file, node, key)}: expected {tp.__name__}, got {shown!r}")
    return Path(value).expanduser() if tp is Path else tp(value)


def _dataclass(cls: type, node: yaml.Node, file: Path, key: str) -> Any:
    if not isinstance(node, yaml.MappingNode):
        raise AgentConfigError(f"{_where(file, node, key)}: expected a mapping of keys")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for key_node, value_node in node.value:
        name = str(key_node.value)
        dotted = f"{key}.{name}" if key else name
        if name not in names:
            near = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f" (valid: {', '.join(names)})"
            raise AgentConfigError(f"{_where(file, key_node, dotted)}: unknown key{hint}")
        values[name] = _convert(hints[name], value_node, file, dotted)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise AgentConfigError(f"{_where(file, node, key)}: missing required key '{missing[0]}'")
    return cls(**values)


def load_agent_config(path: Path) -> AgentConfig:
    """Read and check an agent config file.

    Returns:
        The config, with defaults filled in.

    Raises:
        AgentConfigError: unreadable file, bad YAML, unknown key, wrong type or invalid value.
    """
    path = Path(path)
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AgentConfigError(f"{path}: cannot read the agent config ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise AgentConfigError(f"{path}:{mark.line + 1 if mark else '?'}: not valid YAML") from None
    if node is None:
        raise AgentConfigError(f"{path}: the agent config is empty; it needs at least device and fleet")
    cfg = _dataclass(AgentConfig, node, path, "")
    try:
        check_name(cfg.device, "device")
        check_name(cfg.fleet, "fleet")
    except ValueError as exc:
        raise AgentConfigError(f"{path}: {exc}") from None
    bad = [s for s in cfg.power.sensors if s not in SENSORS]
    if bad:
        near = difflib.get_close_matches(bad[0], list(SENSORS), n=1)
        raise AgentConfigError(f"{path}: power.sensors: unknown sensor '{bad[0]}'"
                               + (f"; did you mean '{near[0]}'?" if near else f" (known: {', '.join(SENSORS)})"))
    if cfg.telemetry_interval_s <= 0 or cfg.spool_max_records < 1 or cfg.bench.min_runs < 1 or cfg.bench.threads < 1:
        raise AgentConfigError(f"{path}: telemetry_interval_s, spool_max_records, bench.min_runs and bench.threads must be positive")
    return cfg
