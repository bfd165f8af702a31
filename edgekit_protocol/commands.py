"""Commands the agent accepts on ``.../cmd``, checked before anything runs.

========  =====================================================================================
bench     ``{variant | sha256, min_runs, min_seconds, warmup, threads}``: benchmark an installed
          model (default: the current one); the record goes to ``bench``, the ack names it.
install   ``{path, sha256, variant, model, eval, eval_sha256}``: move an upload from ``<root>/incoming/``
          into the store, checked against ``sha256`` (``eval``: an eval set there, copied alongside,
          checked against ``eval_sha256``).
activate  ``{variant | sha256, keep}``: safe activation (sha256 check, smoke inference in a child), then
          the store budget: the oldest models beyond ``store.max_store_mb`` are removed, never
          ``current``, ``previous`` or one in ``keep`` (the host's candidates); the ack lists them.
rollback  ``{}``: swap ``current`` and ``previous``.
state     ``{verify}``: what is installed, current, previous, the spool, the power sensor, the disk;
          with ``verify``, every stored model is hashed and the damaged ones listed.
shadow    ``{variant | sha256, share, max_per_s, off}``: run an installed model beside the served one on
          ``share`` of the live requests (rate-limited, idle CPU only); telemetry reports the comparison.
operators ``{keys, code}``: pin these operator keys (signed by a key pinned now: key rotation); a
          deployed agent also takes ``code``, its code manifest signed by one of the new keys.
========  =====================================================================================

Every command carries ``expires`` (unix time, at most :data:`MAX_TTL_S` after its ``ts``): one
still queued after that is answered with an error instead of run, so a switch the sender gave up
waiting for never happens behind its back, and a captured command cannot be replayed later. The
agent also remembers the ids of the commands it took (across restarts) and runs none twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgekit_protocol.errors import CommandError, MessageError
from edgekit_protocol.messages import decode, envelope, in_range

_INT = (int,)
_NUM = (int, float)
# argument -> (types, minimum, maximum); strings have no bounds
_ARGS: dict[str, dict[str, tuple[tuple[type, ...], float | None, float | None]]] = {
    "bench": {"variant": ((str,), None, None), "sha256": ((str,), None, None),
              "min_runs": (_INT, 1, 1_000_000), "min_seconds": (_NUM, 0, 600),
              "warmup": (_INT, 0, 10_000), "threads": (_INT, 1, 64)},
    "install": {"path": ((str,), None, None), "sha256": ((str,), None, None), "variant": ((str,), None, None),
                "model": ((str,), None, None), "eval": ((str,), None, None), "eval_sha256": ((str,), None, None)},
    "activate": {"variant": ((str,), None, None), "sha256": ((str,), None, None),
                 "keep": ((list,), 0, 256)},  # sha256s the store budget must spare (a list's bounds: its length)
    "rollback": {},
    # verify: hash every stored model, report the damaged; code: include the agent's signed code manifest
    # live: the serving API's figures plus its last (up to) N service times in ms
    "state": {"verify": ((bool,), None, None), "code": ((bool,), None, None), "live": (_INT, 0, 2048)},
    # keys: the operator public keys to pin from now on (base64); code: the agent-code manifest signed by one of them
    "operators": {"keys": ((list,), 1, 8), "code": ((dict,), None, None)},
    # run an installed variant beside the served one on a share of live requests (off: stop)
    "shadow": {"variant": ((str,), None, None), "sha256": ((str,), None, None), "share": (_NUM, 0, 1),
               "max_per_s": (_NUM, 0, 1000), "off": ((bool,), None, None)},
}
COMMANDS = tuple(_ARGS)


def bounds(name: str, key: str) -> tuple[float | None, float | None]:
    """Return the ``(minimum, maximum)`` the agent accepts for argument ``key`` of command ``name`` (a list's: its
    length; ``(None, None)`` for a string), so an option that feeds it can refuse what the agent would.

    Raises:
        KeyError: no such command or argument.
    """
    _types, low, high = _ARGS[name][key]
    return low, high
MAX_TTL_S = 86_400.0  # a command may stay valid for a day at most (the agent remembers its id until it expired)


@dataclass(frozen=True)
class Command:
    msg_id: str
    name: str
    args: dict[str, Any]
    expires: float | None = None  # unix time after which the sender no longer waits: run it no more
    message: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # as received, for its signature


def parse_command(payload: bytes, fleet: str, device: str) -> Command:
    """Return the command in ``payload`` when it is well formed and meant for this device.

    Raises:
        CommandError: malformed or oversized payload, another device or fleet, unknown command,
            unknown argument, an argument of the wrong type or out of range.
    """
    try:
        msg = decode(payload, "cmd")
    except MessageError as exc:
        raise CommandError(f"malformed command: {exc}") from None
    cmd_id = msg["msg_id"]
    name = msg.get("command")
    if msg["device"] != device or msg["fleet"] != fleet:
        raise CommandError(f"command for {msg['fleet']}/{msg['device']} reached {fleet}/{device}; not run", cmd_id)
    if not isinstance(name, str) or name not in COMMANDS:
        raise CommandError(f"unknown command {str(name)[:40]!r} (known: {', '.join(COMMANDS)})", cmd_id)
    args = msg.get("args", {})
    try:
        check_args(name, args)
    except CommandError as exc:
        raise CommandError(str(exc), cmd_id, name) from None
    expires = msg.get("expires")
    if not in_range(expires):
        raise CommandError(f"{name}: expires must be a unix time (every command expires, so none can be "
                           f"replayed later), got {str(expires)[:20]}", cmd_id, name)
    if expires - msg["ts"] > MAX_TTL_S:
        raise CommandError(f"{name}: expires {expires - msg['ts']:.0f} s after it was sent; at most {MAX_TTL_S:.0f}",
                           cmd_id, name)
    return Command(cmd_id, name, args, expires, msg)


def check_args(name: str, args: Any) -> dict[str, Any]:
    """Return ``args`` when they fit command ``name``'s spec: the one check host and agent both make.

    Raises:
        CommandError: unknown command, args not an object, an unknown argument, one of the wrong
            type or out of range, or an ``activate`` that names nothing to activate.
    """
    if name not in _ARGS:
        raise CommandError(f"unknown command {str(name)[:40]!r} (known: {', '.join(COMMANDS)})", name=None)
    if not isinstance(args, dict):
        raise CommandError(f"{name}: args must be an object, got {type(args).__name__}", name=name)
    spec = _ARGS[name]
    for key, value in args.items():
        if key not in spec:
            raise CommandError(f"{name}: unknown argument {str(key)[:40]!r} (known: {', '.join(spec) or 'none'})", name=name)
        types, low, high = spec[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise CommandError(f"{name}: argument '{key}' must be {'/'.join(t.__name__ for t in types)}, "
                               f"got {type(value).__name__}", name=name)
        if isinstance(value, list):
            if not (low <= len(value) <= high) or not all(isinstance(v, str) and len(v) <= 128 for v in value):
                raise CommandError(f"{name}: argument '{key}' must be a list of at most {high} strings", name=name)
        elif low is not None and not (low <= value <= high):
            raise CommandError(f"{name}: argument '{key}' must be between {low} and {high}, got {value}", name=name)
    if name == "activate" and not (args.get("variant") or args.get("sha256")):
        raise CommandError("activate: give 'variant' or 'sha256'", name=name)
    if name == "shadow" and not (args.get("off") or args.get("variant") or args.get("sha256")):
        raise CommandError("shadow: give 'variant' or 'sha256' (or 'off')", name=name)
    if name == "operators" and "keys" not in args:
        raise CommandError("operators: give 'keys', the operator public keys to pin", name=name)
    return args


def command(fleet: str, device: str, name: str, args: dict[str, Any] | None = None, seq: int = 0,
            expires: float | None = None) -> dict[str, Any]:
    """Return the (unsigned) message of command ``name`` for one device; ``expires``: unix time to give up at
    (the agent refuses a command without one).

    Raises:
        CommandError: the command or its arguments break the spec the agent enforces (checked
            here so the host never sends what the agent would refuse).
    """
    body: dict[str, Any] = {"command": name, "args": check_args(name, args or {})}
    if expires is not None:
        body["expires"] = round(expires, 3)
    return envelope("cmd", fleet, device, seq, body)
