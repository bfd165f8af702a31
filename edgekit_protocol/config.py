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

This module is the one model of that file, for both sides: the agent reads it (its YAML loader
turns the document into a :class:`Node` tree and calls :func:`build`), and the host writes it
from the same dataclasses (:func:`to_plain`) and checks what it wrote with the same rules. The
broker settings (:class:`BrokerConfig`) are also the host's, in the fleet file: one model, one
``password_file`` rule. Unknown keys and wrong types are errors naming the file, line and key, with
the closest valid name. A password is never written in a config file; ``password_file`` points at
a file readable by its user only.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit_protocol.commands import bounds
from edgekit_protocol.errors import ConfigError
from edgekit_protocol.files import read_head, within_limit
from edgekit_protocol.messages import MAX_TELEMETRY_INTERVAL_S, check_name

# Pydantic (on the host) honours this on stdlib dataclasses used as fields: unknown keys are errors.
_FORBID = {"extra": "forbid"}

DEFAULT_SENSORS = ("ina3221", "pi5-pmic", "ina219", "rapl", "hwmon")  # tried in this order
# Physical bounds of a device's figures in a profile and agent.yaml: more is a typo or the wrong unit (milliwatts,
# kilobytes), never a device; refused with the bound named
MAX_WATTS = 10_000  # 10 kW
MAX_MEGABYTES = 1_000_000_000  # 1 PB: RAM, a model, a store budget
MAX_LATENCY_MS = 86_400_000  # a day


def closest(word: str, choices: typing.Iterable[str]) -> str | None:
    """Return the choice most like ``word`` (difflib ratio >= 0.6), or None: the "did you mean" of every
    error about an unknown key or name, on the host and on the device."""
    found = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


@dataclass(frozen=True)
class TlsConfig:
    __pydantic_config__ = _FORBID

    ca: Path | None = None  # CA bundle to verify the broker; None: the system's
    cert: Path | None = None  # client certificate (mutual TLS)
    key: Path | None = None


MAX_PASSWORD_BYTES = 65535  # of broker.password_file: the most an MQTT CONNECT's password field holds
MAX_CA_BYTES = 1 << 20  # of a CA bundle (broker.tls.ca, pull.ca_file): a system's whole is ~200 KiB; room to spare


@dataclass(frozen=True)
class BrokerConfig:
    """Where an MQTT client (agent, monitor, deploy) connects, and as whom."""

    __pydantic_config__ = _FORBID

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password_file: Path | None = None
    tls: TlsConfig | None = None
    keepalive: int = 30
    reconnect_max_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is not between 1 and 65535")
        if self.username is not None and (not self.username or ":" in self.username
                                          or any(ord(c) < 32 or ord(c) == 127 for c in self.username)):
            # Mosquitto's password file holds one 'user:hash' line each: such a name could be neither added there
            # nor removed (fleet revoke), and a line break in it would add a line of its own
            raise ValueError(f"username {self.username!r} is not a broker user name: give one without ':' or control "
                             "characters")

    def password(self, where: str = "") -> str | None:
        """Return the password read from ``password_file`` (stripped), or None when none is set.

        ``where`` names the config the settings came from, for the message.

        Raises:
            ConfigError: the file cannot be read (missing, a folder, permission denied: the line says to create it or
                fix the key in ``where``), is no regular file (a FIFO: never waited on), holds more than
                :data:`MAX_PASSWORD_BYTES` or is not UTF-8 text.
        """
        if self.password_file is None:
            return None
        prefix = f"{where}: " if where else ""
        name = f"{prefix}broker.password_file {self.password_file}"
        try:  # a regular file only: a plain read of a FIFO waited for a writer, holding the agent, bench or monitor
            return within_limit(read_head(Path(self.password_file).expanduser(), MAX_PASSWORD_BYTES),
                                MAX_PASSWORD_BYTES, name).decode().strip()
        except OSError as exc:
            raise ConfigError(f"{name}: {exc.strerror or exc}; create it holding the broker password alone (`edgekit "
                              "fleet init` wrote each user's in its secrets/ folder), readable by this user, or fix "
                              f"broker.password_file in {where or 'the config'}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{name}: not UTF-8 text; give a file holding the password alone") from None
        except ValueError as exc:  # over the limit: the text names the file
            raise ConfigError(str(exc)) from None


INFERENCE_TIMEOUT_FACTOR = 20  # a benchmark's inference may last this many times its first (if over inference_timeout_s)


@dataclass(frozen=True)
class BenchSettings:
    """How the agent benchmarks a model (the ``bench`` block, and ``edgekit-agent bench``'s options)."""

    warmup: int = 10
    min_runs: int = 200
    min_seconds: float = 10.0
    max_runs: int = 100_000
    threads: int = 1
    delegate: str = "xnnpack"  # a target plugin's key (device_agents.targets)
    delegate_options: dict = field(default_factory=dict)  # checked by the target's own Options model
    runtime: str | None = None  # None: the first installed of litert, tflite-runtime
    # The benchmark runs in a child the agent ends when it makes no progress (device_agents.bench.bench_in_child):
    step_timeout_s: float = 120.0  # loading (model, eval set), the first inference, conditions, the metric: each
    inference_timeout_s: float = 30.0  # any later inference: this, or INFERENCE_TIMEOUT_FACTOR x the first if longer
    total_timeout_s: float = 3600.0  # the whole benchmark

    def __post_init__(self) -> None:
        """Raises ValueError: a length or thread count outside what the ``bench`` command takes
        (:func:`edgekit_protocol.commands.bounds`), or a timeout not above 0 and at most a day, NaN included, or a
        ``total_timeout_s`` not above ``min_seconds`` (the timed runs alone last that long: every benchmark would be
        ended at it, and counted as one whose model looped)."""
        for key in ("warmup", "min_runs", "min_seconds", "threads"):
            low, high = bounds("bench", key)
            if not low <= getattr(self, key) <= high:
                raise ValueError(f"{key} {getattr(self, key)} is not between {low} and {high}")
        for key in ("step_timeout_s", "inference_timeout_s", "total_timeout_s"):
            if not 0 < getattr(self, key) <= 86_400:
                raise ValueError(f"{key} {getattr(self, key)} is not above 0 and at most 86400 seconds")
        if self.total_timeout_s <= self.min_seconds:
            raise ValueError(f"total_timeout_s {self.total_timeout_s:g} is not above min_seconds {self.min_seconds:g}: "
                             "the timed runs alone last that long, so every benchmark would be ended at it")


@dataclass(frozen=True)
class PowerConfig:
    sensors: tuple[str, ...] = DEFAULT_SENSORS
    idle_w: float | None = None  # from the device profile, for the estimate when no sensor answers
    busy_w: float | None = None
    cores: int | None = None
    sys_root: Path = Path("/")
    vcgencmd: str = "vcgencmd"

    def __post_init__(self) -> None:
        """Raises ValueError: only one of ``idle_w`` and ``busy_w`` (the estimate needs both), one not a positive
        number up to :data:`MAX_WATTS`, or ``busy_w`` below ``idle_w`` (the profile's rules): an estimate from them is
        no figure."""
        given = [v for v in (self.idle_w, self.busy_w) if v is not None]
        if len(given) == 1:
            raise ValueError("give both idle_w and busy_w (the power estimate needs both), or neither")
        if given and not all(0 < v <= MAX_WATTS for v in given):
            raise ValueError(f"idle_w {self.idle_w} and busy_w {self.busy_w} must be positive watts, at most {MAX_WATTS:,}")
        if given and self.busy_w < self.idle_w:
            raise ValueError(f"busy_w ({self.busy_w}) must be at least idle_w ({self.idle_w})")


@dataclass(frozen=True)
class StoreConfig:
    """The device's model store: its budget (from the profile's ``storage``, or the fleet file)."""

    max_store_mb: float | None = None  # None: no budget; old models are kept until removed by hand
    min_free_mb: float = 4.0  # below this much free space the agent refuses installs, activations and benches
    reserve_mb: float = 1.0  # held in <root>/.reserve, freed when the disk fills so "disk full" can be answered


@dataclass(frozen=True)
class ServeConfig:
    """The local inference API the agent serves the active model on (``device_agents.serving``)."""

    enabled: bool = True
    socket: Path | None = None  # None: <root>/serve.sock
    max_clients: int = 16  # more are answered "busy" and counted
    max_payload_mb: float = 64.0  # a request's tensors, at most
    workers: int = 1  # interpreters per served model (requests beyond wait: the live queue depth)
    http_port: int | None = None  # loopback HTTP/JSON for other languages, on 127.0.0.1 only; None: off
    http_max_clients: int = 4  # HTTP connections at once (any local user can reach 127.0.0.1): its own places
    http_max_body_mb: float = 4.0  # an HTTP request's JSON body, at most: a 224x224x3 float input is 3.2 MB of JSON
    # (parsing costs 4-34x its size, one body at a time; 1 on a device short of memory, large inputs on the socket)
    request_timeout_s: float = 30.0  # a started socket frame, or an HTTP request's headers and body, must arrive in it
    http_header_timeout_s: float = 5.0  # an HTTP request's line and headers must arrive within it of its first byte
    send_timeout_s: float = 30.0  # a client that takes none of its answer for this long is cut off
    busy_poll_us: int = 0  # after an answer, wait this long on the CPU for the client's next request (one client only)

    def __post_init__(self) -> None:
        if self.http_port is not None and not 0 < self.http_port < 65536:
            raise ValueError(f"http_port {self.http_port} is not between 1 and 65535")
        if self.max_clients < 1:
            raise ValueError(f"max_clients {self.max_clients} is not at least 1")
        if self.http_max_clients < 1:
            raise ValueError(f"http_max_clients {self.http_max_clients} is not at least 1")
        if not self.http_max_body_mb > 0:
            raise ValueError(f"http_max_body_mb {self.http_max_body_mb} is not above 0")
        for key in ("request_timeout_s", "http_header_timeout_s", "send_timeout_s"):
            if not 0 < getattr(self, key) <= 3600:
                raise ValueError(f"{key} {getattr(self, key)} is not between 0 and 3600 seconds")
        if not self.max_payload_mb > 0:
            raise ValueError(f"max_payload_mb {self.max_payload_mb} is not above 0")
        if self.workers < 1:
            raise ValueError(f"workers {self.workers} is not at least 1")
        if not 0 <= self.busy_poll_us <= 100_000:
            raise ValueError(f"busy_poll_us {self.busy_poll_us} is not between 0 and 100000 microseconds")
        for key, most in (("max_clients", 10_000), ("http_max_clients", 1000), ("workers", 64),
                          ("max_payload_mb", 4096), ("http_max_body_mb", 4096)):  # each named with its value
            if getattr(self, key) > most:
                raise ValueError(f"{key} {getattr(self, key)} is over {most}, the most it takes")


@dataclass(frozen=True)
class PullConfig:
    """Desired state over MQTT, artifacts pulled from a store (``device_agents.reconcile``)."""

    retry_s: float = 30.0  # first retry after a failed fetch or activation; doubles each time, at most 15 min
    max_attempts: int = 6  # then the device stays failed on its model until the next desired revision
    ca_file: Path | None = None  # CA bundle for an https:// store (None: the system's)


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
    store: StoreConfig = field(default_factory=StoreConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    pull: PullConfig = field(default_factory=PullConfig)
    verify_code: bool = False  # set by the deploy: refuse to start unless running the signed <root>/agent code
    simulated: bool = False  # a virtual device of `edgekit sim`: every record says so

    def password(self, where: str = "") -> str | None:
        """Return the broker password (see :meth:`BrokerConfig.password`); ``where``: the agent.yaml it came from.

        Raises:
            ConfigError: the password file cannot be read.
        """
        return self.broker.password(where)


@dataclass(frozen=True)
class Node:
    """One value of a parsed config document, with the line it stands on (1-based; 0: unknown).

    ``value`` is a ``dict[str, Node]`` (``key_lines`` gives each key's line), a ``list[Node]``
    or a scalar (``str``, ``int``, ``float``, ``bool`` or ``None``).
    """

    value: Any
    line: int = 0
    key_lines: dict[str, int] = field(default_factory=dict)

    @classmethod
    def plain(cls, value: Any) -> Node:
        """Return the tree of a plain value (dicts, lists, scalars) with no line numbers."""
        if isinstance(value, dict):
            return cls({str(k): cls.plain(v) for k, v in value.items()})
        if isinstance(value, (list, tuple)):
            return cls([cls.plain(v) for v in value])
        return cls(value)


def _where(file: Path | str, line: int, key: str) -> str:
    at = f"{file}:{line}" if line else str(file)
    return f"{at}: {key}" if key else at


def _convert(tp: Any, node: Node, file: Path | str, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if node.value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), node, file, key)
    if dataclasses.is_dataclass(tp):
        return _dataclass(tp, node, file, key)
    if tp is dict or origin is dict:
        if not isinstance(node.value, dict):
            raise ConfigError(f"{_where(file, node.line, key)}: expected a mapping of keys")
        return {k: _plain(v) for k, v in node.value.items()}
    if origin is tuple:
        if not isinstance(node.value, list):
            raise ConfigError(f"{_where(file, node.line, key)}: expected a list")
        return tuple(_convert(args[0], item, file, key) for item in node.value)
    value = node.value
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, (str, int, float)) and not isinstance(value, bool),
          Path: isinstance(value, str)}.get(tp, False)
    if not ok:
        shown = f"a {'mapping' if isinstance(value, dict) else 'sequence'}" if isinstance(value, (dict, list)) else value
        raise ConfigError(f"{_where(file, node.line, key)}: expected {tp.__name__}, got {shown!r}")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{_where(file, node.line, key)}: expected a finite number, got {value!r}")
    if tp is not Path:
        return tp(value)
    # relative to the config file's folder (agent.yaml: the device's root), as docker-compose and kubeconfig take
    # theirs; never to the working directory, which differs between a unit, a supervisor and a shell
    given = Path(value).expanduser()
    return given if given.is_absolute() or not isinstance(file, Path) else file.absolute().parent / given


def _plain(node: Node) -> Any:
    if isinstance(node.value, dict):
        return {k: _plain(v) for k, v in node.value.items()}
    if isinstance(node.value, list):
        return [_plain(v) for v in node.value]
    return node.value


def parse(cls: type, value: Any, where: Path | str, key: str = "") -> Any:
    """Return the dataclass ``cls`` built from a plain value (dicts, lists, scalars), checked strictly.

    Raises:
        ConfigError: unknown key (with the closest valid one), wrong type or missing key; the
            message names ``where`` and the dotted key.
    """
    return _dataclass(cls, value if isinstance(value, Node) else Node.plain(value), where, key)


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    """Return ``typing.get_type_hints(cls)``, worked out once per class (it evaluates every annotation: most of the
    time a deploy took to check each device's agent.yaml)."""
    return typing.get_type_hints(cls)


def _dataclass(cls: type, node: Node, file: Path | str, key: str) -> Any:
    if not isinstance(node.value, dict):
        raise ConfigError(f"{_where(file, node.line, key)}: expected a mapping of keys")
    hints = _type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for name, value_node in node.value.items():
        dotted = f"{key}.{name}" if key else name
        if name not in names:
            near = closest(name, names)
            hint = f"; did you mean '{near}'?" if near else (f" (valid: {', '.join(names)})" if names else " (it takes none)")
            raise ConfigError(f"{_where(file, node.key_lines.get(name, node.line), dotted)}: unknown key{hint}")
        values[name] = _convert(hints[name], value_node, file, dotted)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{_where(file, node.line, key)}: missing required key '{missing[0]}'")
    try:
        return cls(**values)
    except ValueError as exc:
        raise ConfigError(f"{_where(file, node.line, key)}: {exc}") from None


def build(node: Node, file: Path | str) -> AgentConfig:
    """Return the agent config a document tree describes, defaults filled in. A relative path in it (``root``,
    ``serve.socket``, ``pull.ca_file``, ``broker.password_file``, ``broker.tls.*``) is taken from the folder of
    ``file`` when that is the file's path (a ``str`` names where the tree came from, and leaves it as given).

    Raises:
        ConfigError: an unknown key (with the closest valid one), a wrong type, a missing
            ``device`` or ``fleet``, a name that cannot stand in a topic, or a value out of range;
            the message names ``file``, the line and the key.
    """
    cfg = _dataclass(AgentConfig, node, file, "")
    try:
        check_name(cfg.device, "device")
        check_name(cfg.fleet, "fleet")
    except ValueError as exc:
        raise ConfigError(f"{file}: {exc}") from None
    if cfg.telemetry_interval_s <= 0 or cfg.spool_max_records < 1 or cfg.bench.min_runs < 1 or cfg.bench.threads < 1:
        raise ConfigError(f"{file}: telemetry_interval_s, spool_max_records, bench.min_runs and bench.threads must be positive")
    if cfg.telemetry_interval_s > MAX_TELEMETRY_INTERVAL_S:  # its telemetry says it: receivers refuse more
        raise ConfigError(f"{file}: telemetry_interval_s is {cfg.telemetry_interval_s:g}; at most "
                          f"{MAX_TELEMETRY_INTERVAL_S:.0f} s (a day)")
    if cfg.store.max_store_mb is not None and not 0 < cfg.store.max_store_mb <= MAX_MEGABYTES:
        raise ConfigError(f"{file}: store.max_store_mb must be positive, at most {MAX_MEGABYTES:,} (1 PB), or left out "
                          "for no budget")
    if not (0 <= cfg.store.min_free_mb < 1e6 and 0 <= cfg.store.reserve_mb < 1e4):
        raise ConfigError(f"{file}: store.min_free_mb and store.reserve_mb must be non-negative numbers of megabytes")
    if not (0 < cfg.pull.retry_s <= 3600 and 1 <= cfg.pull.max_attempts <= 100):
        raise ConfigError(f"{file}: pull.retry_s (0-3600 s) and pull.max_attempts (1-100) are out of range")
    return cfg


def to_plain(cfg: Any) -> Any:
    """Return a config dataclass as plain dicts, lists and strings (for YAML or JSON), Nones left out."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                if getattr(cfg, f.name) is not None}
    if isinstance(cfg, tuple):
        return [to_plain(v) for v in cfg]
    return str(cfg) if isinstance(cfg, Path) else cfg
