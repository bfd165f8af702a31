"""Ed25519 identities: every message is signed by its sender and verified against a registered key.

A device signs everything it publishes (status, bench, telemetry, acks) with its own key, kept at
``<root>/identity/device.key`` (mode 600; the first deploy writes it and keeps no copy). The
operator signs every command with the operator key; a device accepts commands only under the
operator public keys pinned in ``<root>/identity/operators.json`` (written by the deploy over SSH,
whose host key is verified). Receivers verify against the registered key of the device the topic
names (or the operator's), never against a key the message itself offers.

The signature covers the protocol's canonical form (:func:`edgekit_protocol.messages.canonical`):
every field but ``sig``, so ``key_id``, ``seq``, ``ts`` and ``msg_id`` are signed too. The
``cryptography`` package does the curve arithmetic (its Ed25519 is OpenSSL's). Where PyNaCl is
installed (the host extra: the monitor and rollouts verify every message a fleet sends) verification
is libsodium's instead, the same RFC 8032 check at about 0.6 of OpenSSL's cost (the figures page
quotes both); devices, which verify a few commands, do without it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from device_agents.disk import SMALL_FILE, atomic_write, read_bounded, read_json
from edgekit_protocol import messages
from edgekit_protocol.errors import ConfigError, EdgeKitError, MessageError
from edgekit_protocol.messages import canonical

OPERATOR = "operator"  # the signer name of commands and desired states
# Written by the deploy that gives a device its key (a first deploy, or one after the root was wiped):
# the operator host's clock at that moment, the floor of the agent's command horizon (see Spool.take).
PROVISIONED = "provisioned.json"

try:  # optional: libsodium's Ed25519 verification (see the module's docstring)
    from nacl.bindings import crypto_sign_open as _sodium_open
    from nacl.exceptions import CryptoError as _SodiumError
except ImportError:  # pragma: no cover - the device side
    _sodium_open = None


def verify_ed25519(public: bytes, sig: bytes, data: bytes) -> bool:
    """Return whether ``sig`` is a valid Ed25519 signature of ``data`` by the raw 32-byte key ``public``
    (libsodium where PyNaCl is installed, else OpenSSL through ``cryptography``; never raises)."""
    if len(sig) != 64 or len(public) != 32:
        return False
    if _sodium_open is not None:
        try:
            _sodium_open(sig + data, public)
            return True
        except (_SodiumError, ValueError, TypeError):
            return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(sig, data)
        return True
    except (InvalidSignature, ValueError):
        return False


def key_id(public: bytes) -> str:
    """Return the short id of a raw 32-byte public key (16 hex digits of its sha256)."""
    return hashlib.sha256(public).hexdigest()[:16]


def encode_key(public: bytes) -> str:
    """Return a raw public key as base64 text (how key files and registries hold it)."""
    return base64.b64encode(public).decode()


def decode_key(text: str, where: str) -> bytes:
    """Return the raw public key in base64 ``text``.

    Raises:
        ConfigError: not base64 of 32 bytes (``where`` names the file or entry).
    """
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"{where}: not an Ed25519 public key (base64 of 32 bytes)")
    return raw


class Signer:
    """A private key that signs messages."""

    def __init__(self, private: Ed25519PrivateKey):
        self._private = private
        self.public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = key_id(self.public)

    @classmethod
    def generate(cls) -> Signer:
        """Return a fresh key."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, data: bytes, where: str) -> Signer:
        """Return the key in PEM ``data``.

        Raises:
            ConfigError: not an unencrypted Ed25519 private key in PEM.
        """
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            key = None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{where}: not an unencrypted Ed25519 private key in PEM")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path, loose_remedy: str = "chmod 600 it (or remove it for a new one)"
                       ) -> tuple[Signer, bool]:
        """Return the key at ``path``, creating it (mode 600) when there is none; and whether it was created.
        ``loose_remedy`` is what the error for a key readable by others tells the user to do: removal only where
        a new key is harmless (a device's own, re-registered by the next deploy), never for a key others trust.

        Raises:
            ConfigError: the file is there but is not a key, or is readable by others than its owner; or there
                is none and one cannot be written there (its folder is a file, or not writable).
        """
        path = Path(path)
        if path.exists():
            return cls.load(path, loose_remedy), False
        signer = cls.generate()
        try:
            signer.save(path)
        except OSError as exc:  # e.g. the fleet file's keys: names a file
            raise ConfigError(f"{path}: cannot write a new key there ({exc.strerror or exc}); check that "
                              f"{path.parent} is a writable folder (the fleet file's keys:, or the agent's root)") from None
        return signer, True

    @classmethod
    def load(cls, path: Path, loose_remedy: str = "chmod 600 it") -> Signer:
        """Return the key at ``path``; ``loose_remedy`` is what the error for a key readable by others tells
        the user to do.

        Raises:
            ConfigError: no such file, it is a folder, it cannot be read, is over
                :data:`device_agents.disk.SMALL_FILE` bytes, is not a key, or is readable by others than its owner.
        """
        path = Path(path)
        try:
            mode = path.stat().st_mode
            if stat.S_ISDIR(mode):  # a folder is drwxr-xr-x: "readable by others; chmod 600 it" misled
                raise ConfigError(f"{path}: a folder, not a key file; give an Ed25519 private key in PEM (e.g. the "
                                  "fleet's keys/operator.key)")
            data = read_bounded(path, SMALL_FILE)  # a PEM key is 119 bytes: a larger file is not read whole
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror or exc}; give an Ed25519 private key in PEM (e.g. the fleet's "
                              "keys/operator.key)") from None
        except ValueError:
            raise ConfigError(f"{path}: over {SMALL_FILE:,} bytes, not an Ed25519 private key in PEM") from None
        signer = cls.from_pem(data, str(path))  # a file that is no key (a .pub given for the .key) says so first:
        if mode & 0o077:  # a chmod would not help it
            raise ConfigError(f"{path}: a private key readable by others; {loose_remedy}")
        return signer

    def pem(self) -> bytes:
        """Return the private key as unencrypted PKCS#8 PEM (to write once, mode 600)."""
        return self._private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())

    def save(self, path: Path) -> None:
        """Write the key to ``path``, mode 600 from the start (its folder 700 when created), atomically
        and durably (:func:`~device_agents.disk.atomic_write`: a power loss right after the first start
        must not leave an empty key that stops every later one); returns nothing.

        Raises:
            OSError: the folder or the file cannot be written.
        """
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(path, self.pem(), mode=0o600)

    def sign(self, message: dict[str, Any]) -> dict[str, Any]:
        """Return ``message`` with its ``key_id`` and ``sig`` set (the message is changed in place)."""
        message["key_id"] = self.key_id
        message.pop("sig", None)
        message["sig"] = base64.b64encode(self._private.sign(canonical(message))).decode()
        return message


class Keyring:
    """The public keys a receiver trusts: one per device name, and the operator's (one or more)."""

    def __init__(self, devices: dict[str, bytes] | None = None, operators: list[bytes] | tuple[bytes, ...] = ()):
        self.devices = dict(devices or {})
        self.operators = tuple(operators)
        self._ids: dict[bytes, str] = {}

    def _id(self, key: bytes) -> str:
        """Return :func:`key_id` of ``key``, computed once per key (it is asked once per message)."""
        if key not in self._ids:
            self._ids[key] = key_id(key)
        return self._ids[key]

    @contextlib.contextmanager
    def checked_once(self) -> Iterator[Keyring]:
        """Yield this keyring for a block of verifications (a batch of messages). These keys are fixed: nothing to
        check; a keyring read from files checks them once at the block's start instead of once a message
        (``edge_kit.fleet.keys``). Never raises."""
        yield self

    def keys_of(self, signer: str) -> tuple[bytes, ...]:
        """Return the keys that may sign as ``signer`` (a device name, or :data:`OPERATOR`)."""
        if signer == OPERATOR:
            return self.operators
        key = self.devices.get(signer)
        return (key,) if key else ()

    def left_by_revoked(self, topic: str, payload: bytes, retained: bool) -> str | None:
        """Return the ``msg_id`` of ``payload`` on ``topic`` when it is what a revoked device left at the broker, which
        receivers drop unstored, uncounted as refused and unshown; else None. A keyring without a revoked list (this
        one; the operator's, in ``edge_kit.fleet.keys``, has one) holds no such device: None. Never raises."""
        return None

    def revoked_devices(self) -> frozenset[str]:
        """Return the devices whose key was revoked and none registered since: none for a keyring without a revoked
        list (this one; the operator's, in ``edge_kit.fleet.keys``, has one). Never raises."""
        return frozenset()

    def revocation_reason(self, device: str) -> str:
        """Return why a message on ``device``'s topic is refused when the device is revoked (one of
        :meth:`revoked_devices`): this keyring holds no revoked list, so a line naming the device only. Never raises."""
        return f"{device}'s key was revoked; refused"

    def verify(self, message: dict[str, Any], signer: str) -> None:
        """Check that ``message`` was signed by ``signer``'s registered key.

        Raises:
            MessageError: no key is registered for ``signer``, the message names another key, or
                the signature does not verify (forged, altered or truncated).
        """
        keys = self.keys_of(signer)
        if not keys:
            raise MessageError(f"no key is registered for {signer}; refused (deploy to it, or `edgekit keys` it)")
        kid = message.get("key_id")
        key = next((k for k in keys if self._id(k) == kid), None)
        if key is None:
            raise MessageError(f"signed with key {str(kid)[:20]!r}, not {signer}'s registered key; refused")
        text = str(message.get("sig", ""))
        try:
            sig = base64.b64decode(text, validate=True)
            # one spelling per signature: base64 ignores the last character's spare bits ("Ag==" and "Ah=="
            # decode alike), which would let anyone make a second message from a signed one
            good = base64.b64encode(sig).decode() == text and verify_ed25519(key, sig, canonical(message))
        except ValueError:
            good = False
        if not good:
            raise MessageError(f"the signature does not verify as {signer}'s; refused")


def receive(keyring: Keyring | None, topic: str, payload: bytes, received: float) -> tuple[str, dict[str, Any]]:
    """Check what a device published, as every receiver must: return ``(kind, message)``.

    The message must decode (no NaN, no oversized number), carry the body its kind requires, name
    the fleet and device of its topic, verify under that device's registered key and not be dated
    ahead of ``received`` (this host's clock) beyond the allowed skew. ``keyring`` None skips only
    the signature, for a caller that has it verified elsewhere (:func:`verify_published`).

    Raises:
        MessageError: any of that fails (the text says which).
    """
    fleet, device, kind = messages.parse_topic(topic)
    if kind in messages.OPERATOR_KINDS:
        raise MessageError(f"{topic}: the operator's {kind}, not something a device publishes")
    msg = messages.check_body(kind, messages.decode(payload, kind))
    if msg["device"] != device or msg["fleet"] != fleet:
        raise MessageError(f"message names {msg['fleet']}/{msg['device']} but came on {topic}")
    if keyring is not None:
        keyring.verify(msg, device)
    messages.check_time(msg, received)
    return kind, msg


def verify_published(keyring: Keyring, topic: str, payload: bytes, *, decoded_elsewhere: bool = False) -> str | None:
    """Return None when ``payload`` is signed by the registered key of the device ``topic`` names,
    else why not: the signature half of :func:`receive`, for a verifying worker process. Never raises:
    whatever a payload makes go wrong is its refusal (one message must not end the process verifying them all).

    ``decoded_elsewhere`` is for a caller that takes the verdict only for a payload that
    :func:`edgekit_protocol.messages.decode` also accepted (the monitor: :func:`receive` without a
    keyring on the same bytes). The payload is then read by the plain C JSON parser, at half
    ``decode``'s cost: for every payload ``decode`` accepts (unique keys, finite numbers) the two
    return the same object, so the verdict is about the message that is stored; for any other,
    ``decode``'s refusal stands whatever this returns."""
    try:
        _, device, _ = messages.parse_topic(topic)
        keyring.verify(json.loads(payload) if decoded_elsewhere else messages.decode(payload), device)
    except EdgeKitError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - e.g. RecursionError: refused with what went wrong, never raised
        return f"checking its signature failed ({type(exc).__name__}); refused"
    return None


def provisioned_at(folder: Path) -> float:
    """Return the unix time in ``<folder>/provisioned.json`` (the operator's clock when the deploy
    gave this device its key), or 0.0 when there is none or it is not a finite time (never raises)."""
    try:
        at = read_json(folder / PROVISIONED).get("at")
    except (OSError, ValueError, AttributeError):
        return 0.0
    return float(at) if messages.in_range(at) else 0.0


def read_operators(path: Path) -> tuple[bytes, ...]:
    """Return the operator public keys pinned in ``operators.json`` (a JSON list of base64 keys).

    Raises:
        ConfigError: the file is missing, over :data:`device_agents.disk.SMALL_FILE` bytes, not a JSON list, or holds
            something that is not a key.
    """
    try:
        keys = read_json(Path(path))
    except OSError as exc:
        raise ConfigError(f"{path}: no operator key is pinned ({exc.strerror}); deploy to this device") from None
    except ValueError as exc:  # not JSON, a NaN, or over the size bound (the text names the file)
        raise ConfigError(f"{exc}; deploy to this device again") from None
    if not isinstance(keys, list) or not keys:
        raise ConfigError(f"{path}: expected a JSON list of operator public keys")
    return tuple(decode_key(k, f"{path}[{i}]") if isinstance(k, str) else decode_key("", f"{path}[{i}]")
                 for i, k in enumerate(keys))
