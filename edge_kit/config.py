"""Load YAML config files into pydantic models with errors that point at file, line and key.

Every config model in edge-kit derives from :class:`StrictModel` (unknown keys are errors) and is
loaded through :func:`load_yaml_model`, so a typo anywhere reads the same way::

    profiles/rpi4.yaml:9: constraints.max_latncy_p90_ms: unknown key; did you mean 'max_latency_p90_ms'?
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from device_agents.config import (
    UNREADABLE,
    refuse_duplicate_key,
    refuse_unreadable_value,
)
from edge_kit.errors import ConfigError
from edgekit_protocol.config import closest

M = TypeVar("M", bound=BaseModel)
# libyaml's loader when PyYAML was built with it: ~20x faster than the pure-Python one (a deploy
# reads each device's profile); same nodes, same line marks.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# and libyaml's dumper: the same text as the pure-Python one (a deploy writes each device's agent.yaml), 3x faster
SafeDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class StrictModel(BaseModel):
    """Base for config models: unknown keys are refused, values are not coerced across types, NaN and
    infinity are refused (``.nan`` in YAML would turn a bound off: every comparison with it is false)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> tuple[int, bool]:
    """Return (1-based line, exact) of the YAML node at ``loc``; the deepest existing parent if absent."""
    line = node.start_mark.line + 1 if node is not None else 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == str(part)), None)
            key = next((k for k, v in node.value if k.value == str(part)), None)
            if match is None:
                return line, False
            line, node = key.start_mark.line + 1, match
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line, False
    return line, True


def _field_types(model: Any) -> dict[str, Any]:
    """Return ``{key: annotation}`` of a pydantic model or a stdlib dataclass (the protocol's), else {}."""
    if isinstance(model, type) and issubclass(model, BaseModel):
        return {f.alias or n: f.annotation for n, f in model.model_fields.items()}
    if isinstance(model, type) and dataclasses.is_dataclass(model):
        return typing.get_type_hints(model)
    return {}


def _kinds(annotation: Any) -> list[Any]:
    """Return the types ``annotation`` allows: a union's members, each without its ``Annotated`` bounds."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _kinds(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [kind for arg in typing.get_args(annotation) for kind in _kinds(arg)]
    return [annotation]


def _flag_for_number(value: Any, annotation: Any, loc: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Return the key path (under ``loc``) of the first true or false, or text, in ``value`` where ``annotation`` takes
    a number and neither, else None. pydantic turns true into 1 there, and ``"64"`` into 64, and YAML reads yes, no, on
    and off as true and false: ``max_power_w: yes`` became a 1 W limit, ``port: on`` port 1, while the agent's own
    config (:mod:`edgekit_protocol.config`) refuses text for a number."""
    kinds = _kinds(annotation)
    if isinstance(value, (bool, str)):
        return loc if type(value) not in kinds and (int in kinds or float in kinds) else None
    for kind in kinds:
        args = typing.get_args(kind)
        if isinstance(value, list) and typing.get_origin(kind) in (list, tuple) and args:
            found = next((f for i, v in enumerate(value) if (f := _flag_for_number(v, args[0], (*loc, i)))), None)
        elif isinstance(value, dict) and typing.get_origin(kind) is dict and len(args) == 2:
            found = next((f for k, v in value.items() if (f := _flag_for_number(v, args[1], (*loc, k)))), None)
        elif isinstance(value, dict) and (fields := _field_types(kind)):
            found = next((f for k, v in value.items() if k in fields
                          and (f := _flag_for_number(v, fields[k], (*loc, k)))), None)
        else:
            continue
        if found:
            return found
    return None


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Return the field names of the nested model reached by ``loc`` (empty if not a model)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        current = _field_types(current).get(str(part))
        # unwrap Optional[X], list[X], dict[str, X]
        while typing.get_origin(current) is not None:
            args = [a for a in typing.get_args(current) if a is not type(None)]
            current = args[-1] if args else None
    return list(_field_types(current))


def _describe(err: dict[str, Any], model: type[BaseModel]) -> str:
    """Return the human part of one pydantic error, with a suggestion where one helps."""
    loc = err["loc"]
    kind = err["type"]
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):  # the latter: protocol dataclasses
        valid = _fields_at(model, loc[:-1])
        hint = closest(str(loc[-1]), valid)
        tail = f"did you mean '{hint}'?" if hint else f"valid keys: {', '.join(valid)}"
        return f"unknown key; {tail}"
    if kind == "missing":
        return "required key is missing"
    return err["msg"].removeprefix("Value error, ")


def format_loc(loc: tuple[Any, ...]) -> str:
    """Return a dotted key path such as ``constraints.max_power_w`` or ``variants[2]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


MAX_NAMED_PROBLEMS = 3  # further problems a config error names, after the one it explains


def _named(errors: list[dict[str, Any]]) -> str:
    """Return the first :data:`MAX_NAMED_PROBLEMS` of pydantic's ``errors`` named by key and kind (``variants
    missing, constraints.max_power_w invalid``), and how many more, for the end of a one-line config error."""
    kinds = {"missing": "missing", "extra_forbidden": "unknown key"}
    named = [f"{format_loc(e['loc'])} {kinds.get(e['type'], 'invalid')}" for e in errors[:MAX_NAMED_PROBLEMS]]
    rest = len(errors) - len(named)
    return ", ".join(named) + (f" and {rest} more" if rest else "")


def load_yaml_model(path: Path, model: type[M], *, defaults: dict[str, Any] | None = None) -> M:
    """Parse a YAML file and validate it as ``model``.

    ``defaults`` fills top-level keys the file leaves out (for example ``name`` from the file name).

    Returns:
        The validated model instance.

    Raises:
        ConfigError: the file is missing or unreadable, is not YAML, holds a value YAML cannot read (a
            5000-digit number, a date that does not exist, ``!!bool maybe``), is not a mapping, gives a key twice,
            gives true or false (yes, no, on, off) or text (``"64"``, ``1e3``) for a number, or fails validation. The
            message names the file, the line and the key, and the closest valid key for a misspelling. The first
            problem is explained; the next few are named by key at the end of the line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    loader = _SafeLoader(text)
    try:
        node = loader.get_single_node()  # kept for the line numbers of validation errors
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}") from None
    except UNREADABLE:  # a scalar YAML types but cannot construct (a 5000-digit number, 2024-13-45, !!bool maybe)
        refuse_unreadable_value(node, path)
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        got = "nothing (the file is empty, or only comments)" if data is None else \
            "a list" if isinstance(data, list) else f"the single value {str(data)[:40]!r}"
        raise ConfigError(f"{path}:1: expected a mapping of keys to values, got {got}")
    refuse_duplicate_key(node, path)
    flag = _flag_for_number(data, model, ())
    if flag is not None:
        given = data
        for part in flag:
            given = given[part]
        where = f"{path}:{_line_of(node, flag)[0]}: {format_loc(flag)}: a number is wanted"
        if isinstance(given, bool):
            raise ConfigError(f"{where}, not true or false (YAML reads yes, no, on and off as those); give the number")
        try:
            number = float(given)
        except ValueError:
            number = math.nan
        how = "give the number" if not math.isfinite(number) else "write it without quotes" if "e" not in given.lower() \
            else f"write it as {number:.1e}, as YAML reads an exponent only with a dot and a sign"
        raise ConfigError(f"{where}, not the text {given!r:.40}; {how}")
    if defaults:
        data = {**defaults, **data}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # A misspelled required key shows up as both "unknown" and "missing"; the typo explains both.
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        err = errors[0]
        line, _ = _line_of(node, err["loc"])
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''} in the file: " \
            f"{_named(errors[1:])})" if len(errors) > 1 else ""
        raise ConfigError(f"{path}:{line}: {format_loc(err['loc'])}: {_describe(err, model)}{more}") from None
