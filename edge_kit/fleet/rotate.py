"""Operator key rotation over MQTT: ``edgekit keys rotate``, always for the whole fleet.

1. A new key is generated and saved at once (``keys/operator-next.key``, mode 600), so an
   interrupted rotation resumes with it instead of losing it.
2. Signed with the current key, every device is asked for its agent-code manifest (``state
   {code}``), which must verify under the current key; it is re-signed with the new key (the
   device's own files, whatever version it runs), and the device is told to pin ``[current, new]``
   with it.
3. Only when every device took step 2 (or ``force``) does the host switch: the new key becomes
   ``keys/operator.key``, the old one moves to ``keys/retired/``; then, signed with the new key,
   every device that took step 2 is told to pin ``[new]``.

So no device is left pinning only a key the host stopped signing with, unless the operator forces
it: a device that misses step 2 is listed (exit 4) and the key is not switched; run the rotation
again when it is back (the same new key is used), or ``edgekit deploy`` to it. With ``force``, the
devices that missed it still pin only the old key: a deploy over SSH pins the new one.

A device whose key was revoked (``edgekit fleet revoke``, none registered since) is not asked: it could not answer (its
answers are refused) and would hold the switch back; it is listed ``revoked`` and pins the old key until
``edgekit deploy --new-key`` pins the current one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from device_agents.identity import OPERATOR, Keyring, Signer, encode_key, key_id
from edge_kit.fleet.commands import FleetClient
from edge_kit.fleet.inventory import Fleet
from edge_kit.fleet.keys import revoked_on
from edgekit_protocol.errors import EdgeKitError

NEXT = "operator-next.key"


@dataclass
class Rotated:
    """One device's outcome: ``rotated`` (pins the new key only), ``both`` (accepts the old key too,
    until the rotation is finished), ``missed`` (pins the old key only) or ``revoked`` (its key was revoked: not
    asked); ``reason`` says why."""

    device: str
    outcome: str
    reason: str | None = None


def _answers(client: FleetClient, sent: dict[str, str], timeout: float) -> dict[str, dict | str]:
    """Return ``{device: result}`` for the devices that answered ok within ``timeout`` seconds from now (in all, not
    per device: the commands were all just sent, and a step that waited for each offline device in turn sent the next
    one after its commands' expiry), ``{device: why not}`` for the others."""
    out: dict[str, dict | str] = {}
    deadline = time.monotonic() + timeout
    for name, cmd_id in sent.items():
        ack = client.wait_ack(cmd_id, max(0.0, deadline - time.monotonic()))
        out[name] = (f"no answer within {timeout:.0f} s (offline?)" if ack is None
                     else ack["result"] if ack["ok"] else str(ack.get("error")))
    return out


def _resigned(state: dict | str, old: Signer, new: Signer) -> dict | str | None:
    """Return the device's code manifest re-signed with ``new`` (None: not a deployed agent), or why not (its
    answer is the device's word: a ``code`` that is no object is a reason, never an exception that would stop
    the rotation of every other device)."""
    if isinstance(state, str):
        return state
    doc = state.get("code")
    if doc is None:
        return None
    if not isinstance(doc, dict):
        return (f"its answer to 'state' holds a {type(doc).__name__} where its code manifest goes, not an object; "
                "check that it runs edge-kit's agent (deploy to it)")
    try:
        Keyring(operators=[old.public, new.public]).verify(doc, OPERATOR)  # new: a resumed rotation's step 2
    except EdgeKitError as exc:
        return f"its code manifest does not verify under the current key ({exc}); deploy to it first"
    return new.sign({k: v for k, v in doc.items() if k not in ("key_id", "sig")})


def rotate_operator_key(fleet: Fleet, timeout: float = 30.0, *, force: bool = False) -> tuple[str, str, bool, list[Rotated]]:
    """Rotate the fleet's operator key on all its devices.

    Returns:
        ``(old key id, new key id, switched, per-device outcomes)``; ``switched`` is False when a
        device missed the first step and ``force`` was not given (the new key stays pending). A revoked device is
        not asked (outcome ``revoked``) and does not hold the switch back.

    Raises:
        AgentError: the broker cannot be reached (nothing switched then). ConfigError: the keys (the registry, the
            revoked list) cannot be read.
    """
    keys = fleet.key_store()
    revoked = keys.revoked_devices()
    old = keys.operator
    new, _ = Signer.load_or_create(keys.folder / NEXT)  # saved before anything is sent
    if new.key_id == old.key_id:  # a rotation stopped between switching and removing its pending key
        (keys.folder / NEXT).unlink()
        new, _ = Signer.load_or_create(keys.folder / NEXT)
    names = [d.name for d in fleet.devices if d.name not in revoked]
    expires = time.time() + 3 * timeout  # never pinned later, behind the host's back
    with FleetClient.of(fleet) as client:
        states = _answers(client, {n: client.send(n, "state", {"code": True}, expires=expires) for n in names}, timeout)
        codes = {n: _resigned(states[n], old, new) for n in names}
        step = {n: client.send(n, "operators", {"keys": [encode_key(old.public), encode_key(new.public)],
                                                **({"code": codes[n]} if isinstance(codes[n], dict) else {})},
                               expires=expires)
                for n in names if not isinstance(codes[n], str)}
        first = {**{n: codes[n] for n in names if isinstance(codes[n], str)}, **_answers(client, step, timeout)}
    took = [n for n in names if not isinstance(first[n], str)]
    switched = force or len(took) == len(names)
    second: dict[str, dict | str] = {}
    if switched:
        keys.replace_operator(new)
        (keys.folder / NEXT).unlink(missing_ok=True)
        with FleetClient.of(fleet) as client:
            second = _answers(client, {n: client.send(n, "operators", {
                "keys": [encode_key(new.public)], **({"code": codes[n]} if isinstance(codes[n], dict) else {})},
                expires=expires) for n in took}, timeout)
    out = [Rotated(d.name, "revoked", f"its key was revoked on {revoked_on(revoked[d.name])}: not asked; it pins the "
                   "old key until `edgekit deploy --new-key` pins the current one") for d in fleet.devices
           if d.name in revoked]
    for n in names:
        if isinstance(first[n], str):
            out.append(Rotated(n, "missed", f"{first[n]}; it pins only the old key: " + (
                "`edgekit deploy` to it" if switched else "nothing was switched; rotate again when it is back")))
        elif not switched:
            out.append(Rotated(n, "both", "accepts the old and the new key until the rotation is finished"))
        elif isinstance(second.get(n), str):
            out.append(Rotated(n, "both", f"{second[n]}; it still accepts the old key too: rotate again or deploy"))
        else:
            out.append(Rotated(n, "rotated"))
    return key_id(old.public), key_id(new.public), switched, out
