"""Operator key rotation over MQTT: ``edgekit keys rotate``.

Two steps, so no device is ever left pinning only a key the host no longer signs with:

1. signed with the old key, every device is told to pin ``[old, new]`` and is given the agent-code
   manifest signed by the new key (so a deployed agent still starts once the old key is gone);
2. the host switches to the new key (the old one is kept under ``keys/retired/``), then, signed
   with the new key, every device that took step 1 is told to pin ``[new]`` only.

A device that misses step 1 (offline, refused) still pins the old key only and refuses the new
key's commands: it is listed, and the next ``edgekit deploy`` to it pins the new key over SSH
(whose host key the deploy verifies). A device that took step 1 but missed step 2 accepts both
keys until it is deployed to or rotated again; it is listed too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from device_agents.codecheck import code_manifest
from device_agents.identity import Signer, encode_key, key_id
from edge_kit.fleet.agent_install import agent_bundle
from edge_kit.fleet.commands import FleetClient
from edge_kit.fleet.inventory import Device, Fleet


@dataclass
class Rotated:
    """One device's outcome: ``rotated`` (pins the new key only), ``both`` (still accepts the old key
    too) or ``missed`` (pins the old key only); ``reason`` says why it is not ``rotated``."""

    device: str
    outcome: str
    reason: str | None = None


def _pin(client: FleetClient, devices: list[str], keys: list[str], code: dict, timeout: float) -> dict[str, str | None]:
    """Send ``operators`` to every device at once; return ``{device: None when pinned, else why not}``."""
    expires = time.time() + timeout  # never pinned later, behind the host's back
    sent = {name: client.send(name, "operators", {"keys": keys, "code": code}, expires=expires) for name in devices}
    out: dict[str, str | None] = {}
    for name, cmd_id in sent.items():
        ack = client.wait_ack(cmd_id, timeout)
        out[name] = (f"no answer within {timeout:.0f} s (offline?)" if ack is None
                     else None if ack["ok"] else str(ack.get("error")))
    return out


def rotate_operator_key(fleet: Fleet, devices: list[Device], timeout: float = 30.0) -> tuple[str, str, list[Rotated]]:
    """Rotate the fleet's operator key on ``devices``.

    Returns:
        ``(old key id, new key id, per-device outcomes)``.

    Raises:
        AgentError: the broker cannot be reached (nothing changed then). ConfigError: the keys cannot be read.
    """
    keys = fleet.key_store()
    old, new = keys.operator, Signer.generate()
    _, sha, files = agent_bundle()
    code = new.sign(code_manifest(files, sha))
    names = [d.name for d in devices]
    with FleetClient.of(fleet) as client:
        first = _pin(client, names, [encode_key(old.public), encode_key(new.public)], code, timeout)
    keys.replace_operator(new)
    took = [n for n in names if first[n] is None]
    with FleetClient.of(fleet) as client:
        second = _pin(client, took, [encode_key(new.public)], code, timeout) if took else {}
    out = []
    for name in names:
        if first[name] is not None:
            out.append(Rotated(name, "missed", f"{first[name]}; it still pins only the old key: `edgekit deploy` to it"))
        elif second.get(name) is not None:
            out.append(Rotated(name, "both", f"{second[name]}; it still accepts the old key too: rotate again or deploy"))
        else:
            out.append(Rotated(name, "rotated"))
    return key_id(old.public), key_id(new.public), out
