"""Desired state: what the operator wants a device to run, and what the device reports back.

Part of the protocol package: standard library only.

``desired`` (operator to device; retained, QoS 1, signed by the operator) names one model for one
device and where to fetch it:

=============  ========================================================================================
rollout        the rollout's id (what ``reported`` answers)
revision       an integer the operator raises with every new desired state of the device; the agent
               applies only a revision above the last it applied, so a replayed old message (validly
               signed, retained or captured) can never take a device back
store          the artifact store's base URL (``http://`` or ``https://``); files are ``<store>/sha256/<hash>``
model          the model's name; ``variant`` the variant id; ``sha256`` and ``bytes`` the artifact's
eval           ``{sha256, bytes}`` of the eval set shipped with it, or null
keep           sha256s the store budget must spare (the profile's other candidates), may be empty
fetch          ``{max_bytes_s, start_delay_s, timeout_s}``: the rollout's bandwidth cap per device
               (null: none; else at least :data:`MIN_BYTES_S`), the longest random delay before the download starts (spreads a wave's
               load on the store), and the per-request timeout
=============  ========================================================================================

A desired state may instead **hold** the device where it is (``{"rollout", "revision", "hold": true}``,
nothing else): keep the model it runs, drop a desired state taken before it and a download in
flight. ``rollout abort`` sends it to a device that never answered the candidate: the device knows
what it runs, the operator may not (its last status can predate a switch), and a hold queued after
the candidate in an offline device's session supersedes it.

``reported`` (device to operator; retained, QoS 1, signed by the device) says where the device is
with the revision it last took: ``state`` is ``fetching``, ``converged`` (the desired model is
current and passed its smoke test) or ``failed`` (``error`` says why; the device stays on its
model and retries with back-off, ``attempt`` counts). ``current`` is the model the device runs,
``previous`` the one before it (what a rollback goes back to).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from edgekit_protocol.errors import MessageError
from edgekit_protocol.messages import check_model_name, in_range

STATES = ("fetching", "converged", "failed")
MAX_REVISION = 2 ** 63 - 1  # the largest revision a desired state carries (a signed 64-bit integer: SQLite's too)
MAX_START_DELAY_S = 3600.0
MAX_ERROR_CHARS = 2000  # a reported error's length: the agent cuts its own, a receiver refuses longer
MAX_NAME_CHARS = 512  # a rollout id, variant name, store URL (a model's name: messages.check_model_name)
MIN_BYTES_S = 1000.0  # the lowest bandwidth cap (1 kB/s): a lower one would hold a 14 MB model's download for days
_SHA = frozenset("0123456789abcdef")


def check_revision(value: Any, kind: str = "desired", lowest: int = 1) -> int:
    """Return ``value`` when a ``kind`` message (``desired``, ``reported``) may carry it as its revision: an integer
    from ``lowest`` (1 in a desired state; 0 in a report, a device that took none yet) to :data:`MAX_REVISION`.
    The one bound on revisions: a host that cannot go above a device's report asks it here too.

    Raises:
        MessageError: anything else (a bool, a float, a string, out of range).
    """
    if not isinstance(value, int) or isinstance(value, bool) or not lowest <= value <= MAX_REVISION:
        raise MessageError(f"{kind}: field 'revision' is not an integer from {lowest} to {MAX_REVISION} (2**63 - 1)")
    return value


def _sha(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value) != 64 or not set(value) <= _SHA:
        raise MessageError(f"desired: {where} is not a sha256 (64 lowercase hex digits)")
    return value


MAX_ARTIFACT_BYTES = 2 ** 40  # 1 TiB: an artifact's size is below it (a desired state's, a manifest's)


def _size(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < MAX_ARTIFACT_BYTES:
        raise MessageError(f"desired: {where} is not a size in bytes (1 byte to 1 TiB)")
    return value


@dataclass(frozen=True)
class Fetch:
    max_bytes_s: float | None = None
    start_delay_s: float = 0.0
    timeout_s: float = 30.0


@dataclass(frozen=True)
class Desired:
    """A checked ``desired`` message (see the module docstring for the fields)."""

    msg_id: str
    rollout: str
    revision: int
    store: str
    model: str
    variant: str
    sha256: str
    bytes: int
    eval_sha256: str | None = None
    eval_bytes: int | None = None
    keep: tuple[str, ...] = ()
    fetch: Fetch = Fetch()
    hold: bool = False  # keep the model the device runs (then store, model, variant, sha256 and bytes are empty)

    @classmethod
    def holding(cls, rollout: str, revision: int) -> Desired:
        """Return the desired state that holds a device on the model it runs (see the module docstring)."""
        return cls(msg_id="", rollout=rollout, revision=revision, store="", model="", variant="", sha256="", bytes=0,
                   hold=True)

    def body(self) -> dict[str, Any]:
        """Return the message body (the fields after the envelope) that states this desired state."""
        if self.hold:
            return {"rollout": self.rollout, "revision": self.revision, "hold": True}
        return {"rollout": self.rollout, "revision": self.revision, "store": self.store, "model": self.model,
                "variant": self.variant, "sha256": self.sha256, "bytes": self.bytes,
                "eval": {"sha256": self.eval_sha256, "bytes": self.eval_bytes} if self.eval_sha256 else None,
                "keep": list(self.keep), "fetch": {"max_bytes_s": self.fetch.max_bytes_s,
                                                   "start_delay_s": self.fetch.start_delay_s,
                                                   "timeout_s": self.fetch.timeout_s}}


def _has_host(url: str) -> bool:
    """Return whether ``url`` parses with a host and a valid port (urllib raised ValueError in the fetch for an
    unclosed IPv6 bracket or a port over 65535)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsed on access: raises ValueError when out of range
    except ValueError:
        return False
    return bool(parts.hostname)


def parse_desired(message: dict[str, Any]) -> Desired:
    """Return the desired state a decoded, verified ``desired`` message states.

    Raises:
        MessageError: a field is missing, mistyped or out of range (named), the store is not an
            http(s) URL, a name holds characters that cannot be a file name, or the eval set's sha256
            is the model's.
    """
    m = message
    if m.get("hold") is not None:
        if (m["hold"] is not True or not isinstance(m.get("rollout"), str) or not m["rollout"]
                or len(m["rollout"]) > MAX_NAME_CHARS):
            raise MessageError("desired: a hold is {rollout, revision, hold: true}")
        return replace(Desired.holding(m["rollout"], check_revision(m.get("revision"))), msg_id=m["msg_id"])
    for name in ("rollout", "store", "model", "variant"):
        if not isinstance(m.get(name), str) or not m[name] or len(m[name]) > MAX_NAME_CHARS:
            raise MessageError(f"desired: field '{name}' is missing or not a string of 1-{MAX_NAME_CHARS} characters")
    if not m["store"].startswith(("http://", "https://")) or not _has_host(m["store"]):
        raise MessageError(f"desired: store {m['store'][:80]!r} is not an http:// or https:// URL")
    if "/" in m["variant"]:
        raise MessageError("desired: variant must not hold '/'")
    try:
        check_model_name(m["model"])
    except ValueError as exc:
        raise MessageError(f"desired: field 'model': {exc}") from None
    rev = check_revision(m.get("revision"))
    ev = m.get("eval")
    if ev is not None and not isinstance(ev, dict):
        raise MessageError("desired: field 'eval' is neither an object nor null")
    keep = m.get("keep", [])
    if not isinstance(keep, list) or len(keep) > 256:
        raise MessageError("desired: field 'keep' is not a list of at most 256 sha256s")
    f = m.get("fetch") or {}
    if not isinstance(f, dict):
        raise MessageError("desired: field 'fetch' is not an object")
    cap, delay, timeout = f.get("max_bytes_s"), f.get("start_delay_s", 0.0), f.get("timeout_s", 30.0)
    if cap is not None and not (in_range(cap) and cap >= MIN_BYTES_S):
        raise MessageError(f"desired: fetch.max_bytes_s is neither null nor a number of at least {MIN_BYTES_S:.0f} bytes/s")
    if not (in_range(delay) and 0 <= delay <= MAX_START_DELAY_S):
        raise MessageError(f"desired: fetch.start_delay_s is not 0-{MAX_START_DELAY_S:.0f} s")
    if not (in_range(timeout) and 0 < timeout <= 600):
        raise MessageError("desired: fetch.timeout_s is not 0-600 s")
    sha = _sha(m.get("sha256"), "sha256")
    eval_sha = _sha(ev.get("sha256"), "eval.sha256") if ev else None
    if eval_sha == sha:  # one download cannot be installed as both (the install moves the model away)
        raise MessageError("desired: eval.sha256 is the model's own sha256; give the eval set's (or null)")
    return Desired(msg_id=m["msg_id"], rollout=m["rollout"], revision=rev, store=m["store"].rstrip("/"),
                   model=m["model"], variant=m["variant"], sha256=sha, bytes=_size(m.get("bytes"), "bytes"),
                   eval_sha256=eval_sha,
                   eval_bytes=_size(ev.get("bytes"), "eval.bytes") if ev else None,
                   keep=tuple(_sha(k, f"keep[{i}]") for i, k in enumerate(keep)),
                   fetch=Fetch(float(cap) if cap is not None else None, float(delay), float(timeout)))


def reported_body(desired: Desired | None, state: str, current: dict[str, Any] | None, *, error: str | None = None,
                  attempt: int = 0, download: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return the body of a ``reported`` message about ``desired`` (None: no desired state taken yet);
    ``error`` is cut to :data:`MAX_ERROR_CHARS` (ending with an ellipsis) so that no receiver refuses it.

    Raises:
        ValueError: ``state`` is not one of :data:`STATES`.
    """
    if state not in STATES:
        raise ValueError(f"reported: state {state!r} is not one of {', '.join(STATES)}")
    return {"rollout": desired.rollout if desired else None, "revision": desired.revision if desired else 0,
            "state": state, "want": {"variant": desired.variant, "sha256": desired.sha256}
            if desired and not desired.hold else None,
            "current": current, "attempt": attempt, "download": download,
            "error": error[:MAX_ERROR_CHARS - 1] + "…" if error is not None and len(error) > MAX_ERROR_CHARS else error}


def check_reported(message: dict[str, Any]) -> dict[str, Any]:
    """Return a decoded ``reported`` message when its body is well formed.

    Raises:
        MessageError: ``state`` unknown, ``revision`` not a non-negative integer, ``rollout`` or
            ``error`` not a string (or null) or longer than :data:`MAX_NAME_CHARS` / :data:`MAX_ERROR_CHARS`,
            ``current`` not an object (or null), a name in it longer than :data:`MAX_NAME_CHARS`.
    """
    m = message
    if m.get("state") not in STATES:
        raise MessageError(f"reported: state {str(m.get('state'))[:20]!r} is not one of {', '.join(STATES)}")
    check_revision(m.get("revision"), "reported", lowest=0)
    for name, types in (("rollout", str), ("error", str), ("current", dict), ("previous", dict), ("download", dict)):
        if m.get(name) is not None and not isinstance(m[name], types):
            raise MessageError(f"reported: field '{name}' is {type(m[name]).__name__}")
    for name, most in (("rollout", MAX_NAME_CHARS), ("error", MAX_ERROR_CHARS)):
        if isinstance(m.get(name), str) and len(m[name]) > most:
            raise MessageError(f"reported: field '{name}' is longer than {most} characters")
    if m.get("attempt") is not None and not (isinstance(m["attempt"], int) and not isinstance(m["attempt"], bool)
                                             and 0 <= m["attempt"] < 10_000):
        raise MessageError("reported: field 'attempt' is not a count")
    for name in ("current", "previous"):  # model references: what the host may send back as a desired state
        ref = m.get(name) or {}
        for key, types in (("sha256", str), ("variant", str), ("model", str), ("bytes", int)):
            if ref.get(key) is not None and (not isinstance(ref[key], types) or isinstance(ref[key], bool)):
                raise MessageError(f"reported: {name}.{key} is {type(ref[key]).__name__}")
            if isinstance(ref.get(key), str) and len(ref[key]) > MAX_NAME_CHARS:
                raise MessageError(f"reported: {name}.{key} is longer than {MAX_NAME_CHARS} characters")
    dl = m.get("download") or {}
    for key, types in (("bytes", int), ("resumed", bool), ("seconds", (int, float))):
        if dl.get(key) is not None and (not isinstance(dl[key], types) or (key != "resumed" and isinstance(dl[key], bool))
                                        or (key != "resumed" and not (in_range(dl[key]) and dl[key] >= 0))):
            raise MessageError(f"reported: download.{key} is not a {'flag' if key == 'resumed' else 'non-negative number'}")
    return m
