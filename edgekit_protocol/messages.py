"""MQTT topics and message envelopes, shared by the host and the on-device agent.

Part of the protocol package: standard library only.

Topics are ``edgekit/v1/<fleet>/<device>/<kind>`` with ``kind`` one of :data:`KINDS`. Every payload
is a JSON object with the envelope fields ``schema``, ``device``, ``fleet``, ``seq``, ``ts``,
``msg_id``, ``key_id`` and ``sig``. ``seq`` counts per device and per kind, persisted across
restarts, so a gap in the bench sequence means a lost record; ``msg_id`` is unique per message and
is what receivers deduplicate on (QoS 1 delivers at least once). ``epoch`` (optional: an older agent sends none)
names the numbering ``seq`` belongs to: random, created with the agent's spool (its persisted state), so a device
re-imaged, or whose agent state was wiped or found damaged, numbers from 1 again in a new epoch, which receivers
take as a restart of its numbering, not as a gap or as numbers already seen.

``sig`` is an Ed25519 signature (base64) over :func:`canonical`, by the key ``key_id`` names: the
device's for what a device publishes, the operator's for commands. Receivers verify it against the
key registered for the device the topic names (or the operator's), refuse NaN and infinities at
parse time, stamp their own receive time and refuse a ``ts`` further ahead of it than their allowed
clock skew (:func:`check_time`): a sender's clock never orders anything on its own.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
import time
import uuid
from typing import Any

from edgekit_protocol.errors import MessageError, PayloadTooLarge

ROOT = "edgekit/v1"
KINDS = ("status", "bench", "telemetry", "live", "shadow", "cmd", "cmd/ack", "desired", "reported")
OPERATOR_KINDS = ("cmd", "desired")  # what the operator publishes; everything else is a device's
RETAINED_KINDS = ("status", "reported", "desired")  # what the broker keeps retained per device (its own, the operator's)
SCHEMAS = {
    "status": "edgekit.status/1",
    "bench": "edgekit.bench/1",
    "telemetry": "edgekit.telemetry/1",
    "live": "edgekit.live/1",
    "shadow": "edgekit.shadow/1",
    "cmd": "edgekit.cmd/1",
    "cmd/ack": "edgekit.ack/1",
    "desired": "edgekit.desired/1",
    "reported": "edgekit.reported/1",
}
MAX_PAYLOAD = 64 * 1024  # bytes; larger commands are refused unread
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_MODEL_NAME_CHARS = 128  # a model's name: a folder on the host and in the artifact store, a field of messages
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,%d}$" % (MAX_MODEL_NAME_CHARS - 1))
_ENVELOPE_TYPES: dict[str, type | tuple[type, ...]] = {
    "schema": str, "device": str, "fleet": str, "seq": int, "ts": (int, float), "msg_id": str,
    "key_id": str, "sig": str,
}
# How deep objects and lists may nest (a real message nests 5 levels). Deeper ones are refused at decode: near
# Python's recursion limit a payload parses but cannot be encoded again (RecursionError while signing or
# verifying its canonical form, depending on how deep the caller's stack already is).
MAX_DEPTH = 32
MAX_SKEW_S = 300.0  # how far ahead of the receiver's clock a sender's ts may be
_MSG_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # the dedup key, shown and logged: no controls, no markup
MAX_EPOCH_CHARS = 64
_EPOCH = re.compile(r"[A-Za-z0-9._:-]{1,%d}" % MAX_EPOCH_CHARS)  # a numbering's name: shown, stored, indexed
# A NUL or a lone UTF-16 surrogate in a decoded string can only come from a ``\\u0000`` or ``\\udXXX`` escape
# (raw, they are not JSON or not UTF-8). PostgreSQL's text columns refuse NUL, and a lone surrogate has no
# UTF-8 form (signing, storing, printing or writing it to a file raises): such a message is refused.
_ODD_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
_ODD_CHAR = re.compile("[\x00\ud800-\udfff]")


def check_name(value: str, what: str) -> str:
    """Return ``value`` when it can be a fleet or device name in a topic.

    Raises:
        ValueError: empty (said so), too long, or holds characters other than letters, digits, ``_ . -``
            (MQTT wildcards and ``/`` would break topic routing).
    """
    if value == "":  # "device '' must be 1-64 letters" hid that nothing was given (a "$NAME" not set)
        raise ValueError(f"the {what} name is empty; give the {what}'s name (1-64 letters, digits, '_', '.' or '-')")
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"{what} {value!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
    return value


def check_model_name(value: str) -> str:
    """Return ``value`` when it can be a model's name: the one rule for every place that takes one (compile names
    ``OUT/<model>`` with it, publish ``manifests/<model>/`` in the store; manifests, desired states and a device's
    store carry it).

    Raises:
        ValueError: not a string of 1-:data:`MAX_MODEL_NAME_CHARS` letters, digits, ``_ . -`` starting with a
            letter or digit (no spaces, no ``/``, never hidden); the message states the rule, callers add what to do.
    """
    if not isinstance(value, str) or not _MODEL_NAME.fullmatch(value):
        shown = repr(value[:80] + "…" if len(value) > 80 else value) if isinstance(value, str) else repr(value)
        raise ValueError(f"model name {shown} must be 1-{MAX_MODEL_NAME_CHARS} letters, digits, '_', '.' or '-', "
                         "starting with a letter or digit")
    return value


def model_name_like(text: str) -> str:
    """Return a name :func:`check_model_name` takes, made from ``text`` (runs of other characters become ``_``,
    cut to :data:`MAX_MODEL_NAME_CHARS`; ``model`` when nothing is left): what an error suggests instead."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).lstrip("_.-")[:MAX_MODEL_NAME_CHARS]
    return name or "model"


def topic(fleet: str, device: str, kind: str) -> str:
    """Return the topic of ``kind`` for one device.

    Raises:
        ValueError: ``kind`` is not one of :data:`KINDS`.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown topic kind {kind!r} (known: {', '.join(KINDS)})")
    return f"{ROOT}/{fleet}/{device}/{kind}"


def subscription(fleet: str, kind: str, device: str = "+", share: str | None = None) -> str:
    """Return a subscription filter for ``kind`` of one device or (``+``) all devices of a fleet.

    ``share`` names an MQTT 5 shared-subscription group (``$share/<group>/...``): the broker then
    hands each message to one member of the group.
    """
    filt = topic(fleet, device, kind) if device != "+" else f"{ROOT}/{fleet}/+/{kind}"
    return f"$share/{share}/{filt}" if share else filt


def parse_topic(name: str) -> tuple[str, str, str]:
    """Return ``(fleet, device, kind)`` of an edge-kit topic.

    Raises:
        MessageError: the topic is not ``edgekit/v1/<fleet>/<device>/<kind>``.
    """
    prefix = ROOT + "/"
    if not name.startswith(prefix):
        raise MessageError(f"topic {name!r} is not under {ROOT}/")
    parts = name[len(prefix):].split("/", 2)
    if len(parts) != 3 or parts[2] not in KINDS:
        raise MessageError(f"topic {name!r} is not {ROOT}/<fleet>/<device>/<kind>")
    return parts[0], parts[1], parts[2]


def is_cleared(topic: str, payload: bytes) -> bool:
    """Return True when ``payload`` on ``topic`` is a retained message cleared (an empty payload, as MQTT clears one:
    ``fleet revoke`` does) on a topic the broker keeps retained (:data:`RETAINED_KINDS`): no message, nothing to check
    or count. An empty payload on any other topic (``bench``, ``telemetry``, ``cmd``...) is no clear: False, so it is
    refused and counted as any other bad message. Never raises."""
    if payload:
        return False
    try:
        return parse_topic(topic)[2] in RETAINED_KINDS
    except MessageError:
        return False


def new_msg_id() -> str:
    """Return a fresh message id (random UUID, hex)."""
    return uuid.uuid4().hex


def envelope(kind: str, fleet: str, device: str, seq: int, body: dict[str, Any],
             epoch: str | None = None) -> dict[str, Any]:
    """Return the message of ``kind``: the envelope fields (with ``epoch``, the numbering ``seq`` belongs to, when
    given) followed by ``body``."""
    head = {"schema": SCHEMAS[kind], "device": device, "fleet": fleet, "seq": seq,
            "ts": round(time.time(), 6), "msg_id": new_msg_id()}
    if epoch is not None:
        head["epoch"] = epoch
    return {**head, **body}


def message_epoch(message: Any) -> str | None:
    """Return the ``epoch`` a message carries (the numbering its ``seq`` belongs to), or None when it carries none
    (an older agent) or one that is no epoch (a history holds what a device sent, checked or not). Never raises."""
    epoch = message.get("epoch") if isinstance(message, dict) else None
    return epoch if isinstance(epoch, str) and _EPOCH.fullmatch(epoch) else None


# The wire form's encoder, built once (json.dumps given options builds one on every call).
_COMPACT = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def encode(message: dict[str, Any]) -> bytes:
    """Return the compact UTF-8 JSON form of a message.

    Raises:
        ValueError: the message holds NaN or an infinity (they have no JSON form).
        TypeError: it holds a value JSON has no form for (a numpy number, bytes).
    """
    return _COMPACT.encode(message).encode()


def encode_within_limit(message: dict[str, Any], what: str, hint: str = "") -> bytes:
    """Return :func:`encode` of ``message`` when it is within :data:`MAX_PAYLOAD`, the size every receiver takes:
    what each sender (the host's commands and desired states, the agent's messages) checks before publishing.
    ``what`` names the message in the error (``"the bench command to pi-1"``), ``hint`` says what to do.

    Raises:
        PayloadTooLarge: it is over the limit (nothing is published); the text gives ``what``, its size and the limit.
    """
    payload = encode(message)
    if len(payload) > MAX_PAYLOAD:
        raise PayloadTooLarge(f"{what} of {len(payload):,} bytes is over the protocol's {MAX_PAYLOAD:,}-byte limit: "
                              "not sent" + (f"; {hint}" if hint else ""))
    return payload


# The canonical form's encoder, built once as the wire form's.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical(message: dict[str, Any]) -> bytes:
    """Return the bytes a signature covers: every field but ``sig``, keys sorted, compact UTF-8 JSON.

    Raises:
        ValueError: the message holds NaN or an infinity (they have no JSON form).
    """
    return _CANONICAL.encode({k: v for k, v in message.items() if k != "sig"}).encode()


def check_time(message: dict[str, Any], received: float, max_skew_s: float = MAX_SKEW_S) -> dict[str, Any]:
    """Return ``message`` when its ``ts`` is not more than ``max_skew_s`` ahead of ``received``.

    Raises:
        MessageError: a timestamp from the future (a wrong clock, or a forgery meant to outrank
            every real measurement).
    """
    ahead = message["ts"] - received
    if ahead > max_skew_s:
        raise MessageError(f"ts is {ahead:.0f} s ahead of the receiver's clock (at most {max_skew_s:.0f} s); refused")
    return message

def in_range(value: Any, limit: float = 1e12) -> bool:
    """Return True for a real number (not a bool) within +-``limit``: finite, and small enough that
    arithmetic on it cannot overflow (a 400-digit integer is valid JSON)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and -limit < value < limit


def is_float(value: Any) -> bool:
    """Return True for a real number (not a bool) of any size a float holds: finite, and a whole number no larger
    than the largest float (a 400-digit integer is valid JSON, and has no float form)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= sys.float_info.max


def field_at(doc: Any, *path: str) -> Any:
    """Return ``doc[path[0]][path[1]]...``, or None where a step is missing or not an object (what a
    device sends beyond the checked fields is never trusted to have the shape it should)."""
    for key in path:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def disk_free_bytes(disk: Any) -> float | None:
    """Return the ``free_bytes`` of a status or telemetry ``disk`` block when it is a byte count (a number from 0
    to 1e18), else None: these blocks are a device's word, not checked at decode (``disk`` may be any JSON)."""
    free = disk.get("free_bytes") if isinstance(disk, dict) else None
    return free if in_range(free, 1e18) and free >= 0 else None


def refuse_constant(name: str, what: str = "payload") -> float:
    """Refuse the JSON parser's ``NaN``, ``Infinity`` or ``-Infinity`` (``name``), read in ``what``: its
    ``parse_constant`` for every JSON edge-kit reads (:func:`strict_loads`; the serving API's bodies, which check
    their numbers themselves and parse no faster with more); returns nothing.

    Raises:
        MessageError: always; the text starts with ``what``.
    """
    raise MessageError(f"{what} holds the non-finite number {name}; numbers must be finite")


def _finite_float(text: str, what: str = "payload") -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise MessageError(f"{what} holds {text[:30]}, which overflows to infinity; numbers must be finite")
    return value


def _unique_keys(pairs: list[tuple[str, Any]], what: str = "payload") -> dict[str, Any]:
    """Return the object of ``pairs``; raise MessageError when a key appears twice (the parser would keep the
    last, another reader of the stored bytes the first: what was verified must be what every reader sees)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise MessageError(f"{what} holds the key {twice[:40]!r} twice in one object; keys must be unique")
    return obj


@functools.lru_cache(maxsize=64)
def _strict_decoder(what: str) -> json.JSONDecoder:
    """Return the strict parser for JSON read in ``what``, built once per ``what``: ``json.loads`` given hooks builds
    a JSONDecoder and its scanner on every call, a third of decoding a bench record. (Skipping the float hook for a
    text without a long exponent or digit run was tried: the regex scan cost more than the hook's calls.)"""
    return json.JSONDecoder(parse_constant=functools.partial(refuse_constant, what=what),
                            parse_float=functools.partial(_finite_float, what=what),
                            object_pairs_hook=functools.partial(_unique_keys, what=what))


def strict_loads(data: str | bytes | bytearray | memoryview, what: str = "payload") -> Any:
    """Return the JSON value ``data`` holds, parsed as receivers parse a payload: no NaN or infinity (Python's json
    takes ``NaN``, ``Infinity`` and ``1e999``, which no JSON encoder gives back), no key twice in one object. For
    any JSON a sender or the disk hands over (a file an agent wrote may be damaged or edited by hand).

    Raises:
        MessageError: ``data`` is not UTF-8 (:func:`not_utf8`), not JSON (``<what> is not JSON (<why> at line L,
            column C)``: a byte order mark, extra data after the value included), holds an integer too long to read,
            nests deeper than the parser goes (``<what> is nested too deeply``), or holds a NaN, an infinity or a key
            twice in one object; the text starts with ``what`` (what ``data`` is, e.g. a file name).
    """
    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
        if text.startswith("\ufeff"):  # as json.loads: a byte order mark is no JSON
            raise json.JSONDecodeError("a byte order mark before the value", text, 0)
        return _strict_decoder(what).decode(text)
    except RecursionError:
        raise MessageError(f"{what} is nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise not_utf8(what, exc) from None
    except json.JSONDecodeError as exc:
        raise MessageError(f"{what} is not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except ValueError as exc:  # integers of 4,300+ digits: Python's own limit on reading one
        if isinstance(exc, MessageError):
            raise
        raise MessageError(f"{what} holds an integer too long to read ({str(exc).split(':')[0]})") from None


def not_utf8(what: str, exc: UnicodeDecodeError) -> MessageError:
    """Return the error that says ``what`` is not UTF-8, naming the first bad byte's offset and why (``exc``)."""
    return MessageError(f"{what} is not UTF-8 (byte {exc.start}: {exc.reason})")


def _odd_string(value: Any, where: str = "payload") -> str | None:
    """Return where in ``value`` (a decoded JSON value) a string or key holds a NUL or a lone surrogate, else None."""
    if isinstance(value, str):
        return where if _ODD_CHAR.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if _ODD_CHAR.search(key):
                return f"a key of {where}"
            name = repr(key[:40])  # a device's text: quoted, and short
            found = _odd_string(item, f"field {name}" if where == "payload" else f"{where}.{name}")
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _odd_string(item, f"{where}[{i}]")
            if found:
                return found
    return None


def nested_deeper(value: Any, limit: int) -> bool:
    """Return whether objects and lists nest more than ``limit`` levels in ``value`` (a decoded JSON value);
    walks with a list, not recursion, so it never raises RecursionError."""
    todo = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        todo.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def decode(payload: bytes, kind: str | None = None) -> dict[str, Any]:
    """Parse and check a payload's envelope (and, with ``kind``, that its schema fits the topic).

    Returns:
        The message as a dict.

    Raises:
        MessageError: oversized, not UTF-8, not JSON, a NaN or infinity anywhere, a key twice in one object, a NUL or
            lone surrogate in any string or key, not an object, objects or lists nested deeper than :data:`MAX_DEPTH`, a missing or
            mistyped envelope field, an ``epoch`` (optional) that is not 1 to :data:`MAX_EPOCH_CHARS` letters, digits,
            '.', '_', ':' or '-', or a schema that does not match ``kind``.
    """
    if len(payload) > MAX_PAYLOAD:
        raise MessageError(f"payload of {len(payload)} bytes is over the {MAX_PAYLOAD}-byte limit")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise not_utf8("payload", exc) from None
    message = strict_loads(text)
    if not isinstance(message, dict):
        raise MessageError(f"payload is a JSON {type(message).__name__}, expected an object")
    if text.count("[") + text.count("{") > MAX_DEPTH and nested_deeper(message, MAX_DEPTH):  # the walk only when it may be
        raise MessageError(f"payload nests objects or lists deeper than {MAX_DEPTH} levels; refused")
    try:  # the walk only when an escape may hold one
        where = _odd_string(message) if _ODD_ESCAPE.search(text) else None
    except RecursionError:
        where = "a string nested too deep to check"
    if where:
        raise MessageError(f"{where} holds a NUL character or a lone UTF-16 surrogate (\\u0000, \\ud800-\\udfff); "
                           "text must be valid Unicode without NUL")
    for field, types in _ENVELOPE_TYPES.items():
        value = message.get(field)
        if value is None:
            raise MessageError(f"field '{field}' is missing")
        if not isinstance(value, types) or isinstance(value, bool):
            raise MessageError(f"field '{field}' has type {type(value).__name__}")
    if not _MSG_ID.fullmatch(message["msg_id"]):
        raise MessageError("field 'msg_id' must be 1 to 128 letters, digits, '.', '_', ':' or '-'")
    if not 0 <= message["seq"] < 2 ** 63:
        raise MessageError("field 'seq' is out of range (0 to 2**63 - 1)")
    if "epoch" in message and message_epoch(message) is None:
        raise MessageError(f"field 'epoch' must be 1 to {MAX_EPOCH_CHARS} letters, digits, '.', '_', ':' or '-'")
    if not in_range(message["ts"]):
        raise MessageError("field 'ts' is not a plausible unix time")
    if kind is not None and message["schema"] != SCHEMAS[kind]:
        raise MessageError(f"schema {message['schema']!r} does not belong on '{kind}' (expected {SCHEMAS[kind]!r})")
    return message


# Body fields each kind must carry (beyond the envelope), with their JSON types.
_BODY: dict[str, dict[str, type | tuple[type, ...]]] = {
    "status": {"state": str},
    "bench": {"variant": str, "sha256": str, "latency_ms": dict, "runs": int, "power": dict, "simulated": bool},
    "telemetry": {"conditions": dict, "spool": dict},
    "live": {"model": dict, "requests": int, "errors": int, "window": int},
    "shadow": {"model": dict, "serving": dict, "compared": int, "window": int},
    "cmd": {"command": str},
    "cmd/ack": {"ok": bool, "cmd_id": str, "result": dict},
    "desired": {"rollout": str, "revision": int},
    "reported": {"state": str, "revision": int},
}
_LATENCY = ("p50", "p90", "p99", "mean", "std", "min", "max")
# Counts a live or shadow message carries (required ones in _BODY, the others when present): whole numbers >= 0.
_COUNTS = {"live": ("requests", "errors", "window", "queue_depth", "clients", "http_clients", "swaps"),
           "shadow": ("compared", "window", "errors", "skipped_rate", "skipped_busy_cpu", "dropped_queue_full",
                      "non_finite")}


# A shadow message's ``run``: the id of the shadow run whose counts it carries (new at each run, and so at each
# agent start); within one run the counts only rise. Text of at most this many characters.
MAX_RUN_ID = 64

# A bench record's ``sha256`` (the artifact's hash: 64 hex digits from an agent) is indexed in the history, and a
# PostgreSQL index row holds at most 2,704 bytes: longer text is refused at decode, so both backends take the same.
MAX_BENCH_SHA256 = 128

MAX_TELEMETRY_INTERVAL_S = 86400.0  # an agent's telemetry_interval_s at most (a day); its config refuses more
# the kinds whose newest ``seq`` a telemetry message carries (its ``seqs``), so a receiver sees records lost at the end
# of a stream (dropped by a broker whose queue was full) without waiting for that kind's next record
MARKED_KINDS = ("bench", "live", "shadow")


def telemetry_marks(message: Any) -> dict[str, int]:
    """Return the newest ``seq`` per kind that a telemetry message says its agent gave (its ``seqs``, kinds of
    :data:`MARKED_KINDS`), or {} when it says none (an older agent) or they are not whole numbers from 0 to 1e12 (a
    history holds what a device sent, checked or not). Never raises."""
    seqs = message.get("seqs") if isinstance(message, dict) else None
    if not isinstance(seqs, dict):
        return {}
    if not all(k in MARKED_KINDS and isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 1e12
               for k, v in seqs.items()):
        return {}
    return dict(seqs)


def telemetry_interval(message: Any) -> float | None:
    """Return the ``interval_s`` a telemetry message says its agent sends telemetry at (seconds, above 0 and at most
    :data:`MAX_TELEMETRY_INTERVAL_S`), or None when it says none (an older agent) or one that is no such number (a
    history holds what a device sent, checked or not)."""
    value = message.get("interval_s") if isinstance(message, dict) else None
    return float(value) if in_range(value) and 0 < value <= MAX_TELEMETRY_INTERVAL_S else None


def _model_ref(kind: str, message: dict[str, Any], field: str) -> None:
    """Check that ``message[field]`` is an object with text (or null) ``variant`` and ``sha256``; return nothing.

    Raises:
        MessageError: it is not (every reader takes them as text).
    """
    ref = message.get(field)
    if not isinstance(ref, dict) or any(not isinstance(ref.get(f), (str, type(None))) for f in ("variant", "sha256")):
        raise MessageError(f"{kind}: {field} is not an object with text variant and sha256")


def _figures(kind: str, block: str, part: Any, names: tuple[str, ...], non_negative: tuple[str, ...],
             unbounded: tuple[str, ...] = ()) -> None:
    """Check an optional block of figures (null, or an object whose ``names`` present are numbers, those of
    ``non_negative`` not below 0); return nothing. A figure is within +-1e12 (:func:`in_range`'s default), one of
    ``unbounded`` any finite number a float holds (:func:`is_float`): an error measured on huge or diverged outputs
    is an honest figure, and the one a drift alert exists for.

    Raises:
        MessageError: the block is not an object, or a figure in it is not such a number (named).
    """
    if part is None:
        return
    if not isinstance(part, dict):
        raise MessageError(f"{kind}: {block} is {type(part).__name__}, not an object")
    for name in names:
        v = part.get(name)
        ok = is_float(v) if name in unbounded else in_range(v)
        if v is not None and (not ok or (name in non_negative and v < 0)):
            raise MessageError(f"{kind}: {block}.{name} is not a {'non-negative ' if name in non_negative else ''}number")


def _check_served(kind: str, message: dict[str, Any]) -> None:
    """Check the figures of a ``live`` or ``shadow`` body (see :func:`check_body`); return nothing.

    Raises:
        MessageError: a model reference, a count, a latency or a fidelity figure is not what it must be (named).
    """
    for field in ("model", "serving") if kind == "shadow" else ("model",):
        _model_ref(kind, message, field)
    for name in _COUNTS[kind]:
        v = message.get(name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2 ** 63):
            raise MessageError(f"{kind}: {name} is not a whole number from 0 to 2**63 - 1")
    if kind == "live":
        _figures(kind, "latency_ms", message.get("latency_ms"), ("p50", "p90", "p99"), ("p50", "p90", "p99"))
        return
    share = message.get("share")
    if share is not None and not (in_range(share) and 0 <= share <= 1):
        raise MessageError("shadow: share is not a number from 0 to 1")
    run = message.get("run")  # an older agent sends none
    if run is not None and not (isinstance(run, str) and 0 < len(run) <= MAX_RUN_ID):
        raise MessageError(f"shadow: run is not a text of 1 to {MAX_RUN_ID} characters")
    errors = ("max_abs_error", "mean_abs_error")
    _figures(kind, "fidelity", message.get("fidelity"), ("snr_db", "cosine", *errors), errors, unbounded=errors)


def check_body(kind: str, message: dict[str, Any]) -> dict[str, Any]:
    """Return ``message`` when its body has the fields ``kind`` requires, with the right types.

    Raises:
        MessageError: a field is missing or mistyped (named), a latency, power, count or error figure is
            not a non-negative number, or another figure is not a number (``live`` and ``shadow``: a
            model reference is not an object with text ``variant`` and ``sha256``, a shadow's
            ``share`` is not from 0 to 1, or its ``run``, when present, no text of 1 to :data:`MAX_RUN_ID`
            characters; a bench ``sha256`` is no text of 1 to :data:`MAX_BENCH_SHA256` characters; a telemetry ``interval_s``, when present, is not a number of seconds
            above 0 and at most :data:`MAX_TELEMETRY_INTERVAL_S`, or its ``seqs``, when present, not what
            :func:`telemetry_marks` takes).
    """
    for name, types in _BODY[kind].items():
        value = message.get(name)
        if not isinstance(value, types) or (isinstance(value, bool) and types is int):
            raise MessageError(f"{kind}: field '{name}' is {'missing' if value is None else type(value).__name__}")
    if kind == "reported":
        from edgekit_protocol.desired import check_reported  # it builds on this module

        check_reported(message)
    if kind == "status" and message["state"] not in ("online", "offline"):
        raise MessageError(f"status: state {message['state']!r} is neither online nor offline")
    if kind == "status" and message.get("current") is not None:  # every reader takes its variant and sha256 as text
        _model_ref(kind, message, "current")
    if kind in _COUNTS:
        _check_served(kind, message)
    if kind == "telemetry" and message.get("interval_s") is not None and telemetry_interval(message) is None:
        raise MessageError(f"telemetry: interval_s is not a number of seconds above 0 and at most "
                           f"{MAX_TELEMETRY_INTERVAL_S:.0f}")
    if kind == "telemetry" and message.get("seqs") is not None and telemetry_marks(message) != message["seqs"]:
        raise MessageError(f"telemetry: seqs is not an object of {', '.join(MARKED_KINDS)} to whole numbers from 0 "
                           "to 1e12")
    if kind == "bench":
        if not 0 < len(message["sha256"]) <= MAX_BENCH_SHA256:
            raise MessageError(f"bench: sha256 is not a text of 1 to {MAX_BENCH_SHA256} characters "
                               f"({len(message['sha256']):,}); an agent sends the artifact's 64 hex digits")
        for q in _LATENCY:
            v = message["latency_ms"].get(q)
            if not in_range(v) or v < 0:
                raise MessageError(f"bench: latency_ms.{q} is not a non-negative number")
        power = ("avg_w", "energy_per_inference_mj")  # consumption: a sensor wired backwards reads below 0
        for block, fields, non_negative in (("power", power, power), ("accuracy", ("value",), ()),
                                            ("fidelity", ("snr_db", "cosine"), ())):
            _figures(kind, block, message.get(block), fields, non_negative)
        if message.get("model_bytes") is not None and not (in_range(message["model_bytes"]) and message["model_bytes"] >= 0):
            raise MessageError("bench: model_bytes is not a non-negative number")
        if not 0 <= message["runs"] < 2 ** 63:
            raise MessageError("bench: runs is out of range")
    return message
