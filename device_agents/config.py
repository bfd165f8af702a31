"""Reading ``agent.yaml`` on the device: PyYAML turns it into the protocol's tree, which the protocol
package's one config model checks (:mod:`edgekit_protocol.config`); the agent adds what only it knows,
the keys of its power-sensor plugins.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import NoReturn

import yaml

from device_agents.disk import read_bounded
from device_agents.power import SENSORS
from edgekit_protocol.config import MAX_CA_BYTES, AgentConfig, Node, build, closest
from edgekit_protocol.errors import ConfigError


def _tree(node: yaml.Node) -> Node:
    """Return the protocol tree of a composed YAML node (scalars typed as ``yaml.safe_load`` would)."""
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        return Node({str(k.value): _tree(v) for k, v in node.value},
                    line, {str(k.value): k.start_mark.line + 1 for k, _ in node.value})
    if isinstance(node, yaml.SequenceNode):
        return Node([_tree(v) for v in node.value], line)
    return Node(yaml.safe_load(yaml.serialize(node)), line)


def duplicate_key(node: yaml.Node | None, where: str = "", _seen: set[int] | None = None) -> tuple[int, str] | None:
    """Return ``(1-based line, dotted key)`` of the first key a YAML mapping in ``node`` gives twice, or None.

    PyYAML keeps the last of two equal keys without a word, so a second ``constraints:`` block (or a pasted
    ``device:``) would silently replace the first: every config file edge-kit reads refuses one instead.
    """
    seen = _seen if _seen is not None else set()
    if node is None or id(node) in seen:  # an anchor used twice is one node: checked once
        return None
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: set[str] = set()
        for key, value in node.value:
            name = f"{where}.{key.value}" if where else str(key.value)
            if key.value in keys:
                return key.start_mark.line + 1, name
            keys.add(key.value)
            found = duplicate_key(value, name, seen)
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found = duplicate_key(item, f"{where}[{i}]", seen)
            if found:
                return found
    return None


# What PyYAML's safe constructors raise, with no line, for a scalar typed (by its look or an explicit tag) as what
# its text is not: ValueError (a 5000-digit int, 2024-13-45, !!int abc), KeyError (!!bool maybe), AttributeError
# (!!timestamp nope), and a ConstructorError (a YAMLError) for a tag they do not know (!foo).
UNREADABLE = (ValueError, KeyError, AttributeError, TypeError, yaml.YAMLError)


def unreadable_value(node: yaml.Node | None, where: str = "",
                     _seen: set[int] | None = None) -> tuple[int, str, str] | None:
    """Return ``(1-based line, dotted key, reason)`` of the first scalar in ``node`` that YAML types but cannot turn
    into a value, or None: an integer of more digits than Python converts (4300), a date that does not exist
    (``2024-13-45``, which YAML reads as a date, not text), text under an explicit tag it is not (``!!bool maybe``)
    or an unknown tag. PyYAML raises one of :data:`UNREADABLE` for these, with no line. Raises nothing."""
    seen = _seen if _seen is not None else set()
    if node is None or id(node) in seen:
        return None
    seen.add(id(node))
    if isinstance(node, yaml.ScalarNode):
        try:
            yaml.safe_load(yaml.serialize(node))
        except ValueError as exc:
            return node.start_mark.line + 1, where or "<top level>", str(exc).split(";")[0]
        except UNREADABLE:
            tag = node.tag.removeprefix("tag:yaml.org,2002:")
            why = f"not a valid {tag}" if tag != node.tag else f"unknown tag {tag}"
            return node.start_mark.line + 1, where or "<top level>", why
        return None
    items = ([(f"{where}.{k.value}" if where else str(k.value), v) for k, v in node.value]
             if isinstance(node, yaml.MappingNode) else [(f"{where}[{i}]", v) for i, v in enumerate(node.value)])
    for name, value in items:
        found = unreadable_value(value, name, seen)
        if found:
            return found
    return None


def refuse_unreadable_value(node: yaml.Node | None, path: Path) -> NoReturn:
    """Say which value of ``node`` (the composed file at ``path``) YAML could not construct, for a loader that caught
    one of :data:`UNREADABLE` while constructing it. Returns never.

    Raises:
        ConfigError: always: file, line, dotted key and why (see :func:`unreadable_value`), or the file alone when
            no single scalar is to blame.
    """
    bad = unreadable_value(node)
    if bad:
        raise ConfigError(f"{path}:{bad[0]}: {bad[1]}: YAML cannot read this value ({bad[2]}); quote it if it is "
                          "text, else give a valid one") from None  # not the constructor's line-less error
    raise ConfigError(f"{path}: YAML cannot read a value; quote text, give valid values") from None


def refuse_duplicate_key(node: yaml.Node | None, path: Path) -> None:
    """Return None when no YAML mapping in ``node`` (the composed file at ``path``) gives a key twice.

    Raises:
        ConfigError: one does (file, line and dotted key: YAML would keep only the last).
    """
    twice = duplicate_key(node)
    if twice:
        raise ConfigError(f"{path}:{twice[0]}: {twice[1]}: given twice (YAML would keep only the last); remove one")


MAX_CONFIG_BYTES = 1 << 20  # agent.yaml: a real one holds a few kilobytes; a larger one is not read whole
MAX_VALUES = 100_000  # values in agent.yaml, aliases expanded (a real one holds under a hundred)


def _expanded(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Return how many values ``node`` stands for once its aliases are expanded (each shared node counted once
    per use, computed once); over :data:`MAX_VALUES` for an alias used inside itself (endless)."""
    if id(node) not in sizes:
        sizes[id(node)] = MAX_VALUES + 1  # reached again while counting: an alias inside itself, endless
        children = ([v for pair in node.value for v in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        sizes[id(node)] = 1 + sum(_expanded(child, sizes) for child in children)
    return sizes[id(node)]


def load_agent_config(path: Path) -> AgentConfig:
    """Read and check an agent config file.

    Returns:
        The config, with defaults filled in.

    Raises:
        ConfigError: unreadable file, over :data:`MAX_CONFIG_BYTES`, not UTF-8, bad YAML, nested too deeply, more than :data:`MAX_VALUES` values
            once its aliases are expanded (an alias bomb), a value YAML cannot read, a key given twice, unknown key,
            wrong type, invalid value, an unknown power sensor, or a ``bench.delegate`` no target has or
            ``bench.delegate_options`` it does not take (:func:`_check_delegate`), or a ``pull.ca_file`` that is no
            readable PEM bundle (:func:`store_ca_context`); the message names the file, line and key.
    """
    path = Path(path)
    try:
        data = read_bounded(path, MAX_CONFIG_BYTES)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the agent config ({exc.strerror})") from None
    except ValueError:  # over the bound
        raise ConfigError(f"{path}: over {MAX_CONFIG_BYTES:,} bytes, not an agent config (one holds a few kilobytes); "
                          "write it as the deploy does") from None
    try:
        node = yaml.compose(data.decode("utf-8"))
    except RecursionError:  # the composer recurses per level: a few thousand brackets
        raise ConfigError(f"{path}: nested too deeply to be an agent config; write it as the deploy does "
                          "(blocks of keys, a few levels deep)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: the agent config is not UTF-8 text (byte {exc.start}); write it as YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(f"{path}:{mark.line + 1 if mark else '?'}: not valid YAML") from None
    if node is None:
        raise ConfigError(f"{path}: the agent config is empty; it needs at least device and fleet")
    if _expanded(node, {}) > MAX_VALUES:  # read as a tree, each alias is a copy: 9 of 9 of 9 ... is billions
        raise ConfigError(f"{path}: more than {MAX_VALUES} values once its aliases (*name) are expanded, or an alias "
                          "used inside itself; write the agent config without nested aliases")
    refuse_duplicate_key(node, path)
    try:
        tree = _tree(node)
    except UNREADABLE:  # a scalar YAML cannot construct (a 5000-digit number, 2024-13-45, !!bool maybe): say where
        refuse_unreadable_value(node, path)
    cfg = build(tree, path)
    bad = [s for s in cfg.power.sensors if s not in SENSORS]
    if bad:
        near = closest(bad[0], SENSORS)
        raise ConfigError(f"{path}: power.sensors: unknown sensor '{bad[0]}'"
                          + (f"; did you mean '{near}'?" if near else f" (known: {', '.join(SENSORS)})"))
    _check_delegate(cfg, tree, path)
    if cfg.pull.ca_file is not None:  # refused now, not at the first pull of an https:// store, days later
        pull = tree.value.get("pull")
        line = pull.key_lines.get("ca_file") if pull is not None else None
        try:
            store_ca_context(cfg.pull.ca_file)
        except ConfigError as exc:
            raise ConfigError(f"{path}:{line}: {exc}" if line else f"{path}: {exc}") from None
    return cfg


def store_ca_context(path: Path) -> ssl.SSLContext:
    """Return the TLS context that checks an https:// store against the CA bundle at ``path`` (``pull.ca_file``) alone,
    read here as a regular file, no further than :data:`MAX_CA_BYTES`: never opened by OpenSSL, whose open of a FIFO
    waited for a writer.

    Raises:
        ConfigError: it cannot be read, is no regular file (a FIFO), is over :data:`MAX_CA_BYTES`, or holds no PEM
            certificate; the text names the key and the file and says what to do.
    """
    fix = "point pull.ca_file (fleet file or agent.yaml) at the store's CA bundle (PEM) on the device"
    try:
        data = read_bounded(Path(path), MAX_CA_BYTES)
    except OSError as exc:
        raise ConfigError(f"pull.ca_file {path}: {exc.strerror or exc}; {fix}") from None
    except ValueError:
        raise ConfigError(f"pull.ca_file {path}: over the {MAX_CA_BYTES:,} bytes a CA bundle may take; {fix}") from None
    try:  # empty: no cadata, and create_default_context would trust the system's CAs instead
        context = ssl.create_default_context(cadata=data.decode("utf-8")) if data.strip() else None
    except (UnicodeDecodeError, ssl.SSLError):
        context = None
    if context is None or not context.cert_store_stats()["x509"]:  # a CRL alone loads: no download could pass
        raise ConfigError(f"pull.ca_file {path}: not a PEM certificate; {fix}")
    return context


def _check_delegate(cfg: AgentConfig, tree: Node, path: Path) -> None:
    """Return None when ``bench.delegate`` names a target plugin and ``bench.delegate_options`` are options it takes.

    Raises:
        ConfigError: no such target (the closest named), or an option it does not take; the message names the file,
            the key's line and the key (else each smoke check and bench would blame the model).
    """
    from device_agents.errors import RuntimeUnavailable
    from device_agents.targets import get_target

    bench = tree.value.get("bench") if isinstance(tree.value, dict) else None
    lines = bench.key_lines if bench is not None else {}

    def at(key: str) -> str:
        return f"{path}:{lines[key]}" if lines.get(key) else str(path)

    try:
        target = get_target(cfg.bench.delegate)
    except RuntimeUnavailable as exc:
        raise ConfigError(f"{at('delegate')}: bench.delegate: {exc}") from None
    try:
        target.options(cfg.bench.delegate_options, "bench.delegate_options")
    except ConfigError as exc:
        raise ConfigError(f"{at('delegate_options')}: {exc}") from None
