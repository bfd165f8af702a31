"""Signatures: what a device or the operator signed verifies; anything else is refused."""

from __future__ import annotations

import json
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agents import identity
from device_agents.identity import OPERATOR, Keyring, Signer, read_operators
from edgekit_protocol import commands, messages
from edgekit_protocol.errors import ConfigError, EdgeKitError, MessageError

DEVICE = Signer.generate()
OPS = Signer.generate()
KEYRING = Keyring({"d1": DEVICE.public}, [OPS.public])


def record(**over) -> dict:
    body = {"variant": "int8", "sha256": "a" * 64, "runs": 10, "simulated": False, "power": {"measured": False},
            "latency_ms": {q: 1.5 for q in ("p50", "p90", "p99", "mean", "std", "min", "max")}, **over}
    return DEVICE.sign(messages.envelope("bench", "f", "d1", 1, body))


def receive(payload: bytes, device: str = "d1", kind: str = "bench") -> dict:
    """What every receiver does (:func:`device_agents.identity.receive`), on the device's own topic."""
    return identity.receive(KEYRING, messages.topic("f", device, kind), payload, time.time())[1]


def test_a_signed_record_verifies_and_every_alteration_is_refused():
    good = record()
    assert receive(messages.encode(good)) == good
    for altered, why in [
        ({**good, "latency_ms": {**good["latency_ms"], "p90": 0.001}}, "signature does not verify"),
        ({**good, "seq": 2}, "signature does not verify"),
        ({**good, "key_id": OPS.key_id}, "not d1's registered key"),
        (OPS.sign(dict(good)), "not d1's registered key"),
        ({k: v for k, v in good.items() if k != "sig"}, "'sig' is missing"),
    ]:
        with pytest.raises(MessageError, match=why):
            receive(messages.encode(altered))
    with pytest.raises(MessageError, match="no key is registered for d2"):
        Keyring({"d1": DEVICE.public}).verify(good, "d2")


@pytest.mark.parametrize("backend", ["libsodium", "openssl"])
def test_libsodium_and_openssl_accept_and_refuse_the_same_signatures(backend, monkeypatch):
    """The host verifies with libsodium (PyNaCl), a device with OpenSSL (cryptography): same verdicts."""
    assert identity._sodium_open is not None  # the host extra installs PyNaCl: the fast path is what the monitor runs
    if backend == "openssl":
        monkeypatch.setattr(identity, "_sodium_open", None)
    good = record()
    data = messages.canonical(good)
    sig = __import__("base64").b64decode(good["sig"])
    assert identity.verify_ed25519(DEVICE.public, sig, data)
    flipped = bytes([sig[0] ^ 1]) + sig[1:]
    high_s = sig[:32] + (int.from_bytes(sig[32:], "little") + 2 ** 252 + 27742317777372353535851937790883648493).to_bytes(32, "little")
    for pub, s, d in [(DEVICE.public, flipped, data), (DEVICE.public, sig, data + b" "), (OPS.public, sig, data),
                      (DEVICE.public, sig[:63], data), (DEVICE.public[:31], sig, data), (DEVICE.public, high_s, data),
                      (b"\0" * 32, sig, data)]:
        assert not identity.verify_ed25519(pub, s, d)  # never raises: a refusal
    assert receive(messages.encode(good)) == good


def test_commands_verify_only_under_a_pinned_operator_key(tmp_path):
    cmd = OPS.sign(commands.command("f", "d1", "state", expires=time.time() + 60))
    KEYRING.verify(cmd, OPERATOR)
    with pytest.raises(MessageError):
        Keyring(operators=[DEVICE.public]).verify(cmd, OPERATOR)
    path = tmp_path / "operators.json"
    path.write_text(json.dumps(["not a key"]))
    with pytest.raises(ConfigError, match=r"operators.json\[0\]: not an Ed25519 public key"):
        read_operators(path)
    with pytest.raises(ConfigError, match="no operator key is pinned"):
        read_operators(tmp_path / "missing.json")


def test_a_device_key_is_created_private_and_a_readable_one_is_refused(tmp_path):
    signer, created = Signer.load_or_create(tmp_path / "identity" / "device.key")
    assert created and (tmp_path / "identity" / "device.key").stat().st_mode & 0o777 == 0o600
    again, created = Signer.load_or_create(tmp_path / "identity" / "device.key")
    assert not created and again.public == signer.public
    os.chmod(tmp_path / "identity" / "device.key", 0o644)
    with pytest.raises(ConfigError, match=r"readable by others; chmod 600 it \(or remove it for a new one\)$"):
        Signer.load_or_create(tmp_path / "identity" / "device.key")


def test_a_key_file_over_its_size_bound_is_refused_unread(tmp_path):
    """A key file was read whole whatever its size (a PEM key is 119 bytes): one grown to gigabytes by damage took
    the agent's memory at every start. One over 64 KiB is refused in one line, before it is read."""
    path = tmp_path / "identity" / "device.key"
    Signer.load_or_create(path)
    path.write_bytes(path.read_bytes() + b"\n" * 70_000)
    with pytest.raises(ConfigError, match=rf"^{path}: over 65,536 bytes, not an Ed25519 private key in PEM$"):
        Signer.load_or_create(path)


def test_a_key_whose_folder_is_a_file_is_one_line_naming_it(tmp_path):
    """A key folder that is a file (a fleet file's `keys:`) raised FileExistsError from mkdir: a traceback."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"afile/operator.key: cannot write a new key there \(File exists\); check "
                                          r"that .*afile is a writable folder"):
        Signer.load_or_create(tmp_path / "afile" / "operator.key")


LIVE = {"source": "live", "model": {"sha256": "a" * 64, "variant": "int8"}, "requests": 40, "errors": 0, "window": 40,
        "queue_depth": 1, "latency_ms": {"p50": 0.8, "p90": 1.0, "p99": 1.25}}
SHADOW = {"model": {"sha256": "b" * 64, "variant": "fp32"}, "serving": {"sha256": "a" * 64, "variant": "int8"},
          "compared": 30, "window": 30, "share": 0.1, "fidelity": {"snr_db": 31.5, "cosine": 0.999, "max_abs_error": 0.02}}
# One signed message of each kind a device publishes with figures in its body: what the fuzz mutates.
GOODS = {"bench": messages.encode(record()),
         "live": messages.encode(DEVICE.sign(messages.envelope("live", "f", "d1", 1, LIVE))),
         "shadow": messages.encode(DEVICE.sign(messages.envelope("shadow", "f", "d1", 1, SHADOW)))}


@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(GOODS)), st.integers(min_value=0, max_value=10 ** 6), st.integers(min_value=0, max_value=255),
       st.integers(min_value=0, max_value=10 ** 6))
def test_fuzz_one_byte_changed_or_the_message_cut_is_refused_or_means_the_same(kind, index, value, cut):
    """10,000 generated messages per run: a signed bench record, live figures or shadow comparison with one
    byte changed, then cut short."""
    good = GOODS[kind]
    index, cut = index % len(good), cut % (len(good) + 1)
    original = receive(good, kind=kind)
    mutated = (good[:index] + bytes([value]) + good[index + 1:])[:cut or None]
    try:
        got = receive(mutated, kind=kind)
    except EdgeKitError:
        return  # refused: the outcome for anything but the original
    assert got == original  # accepted only when it decodes to exactly what was signed (e.g. 1.5 written 15e-1)


@pytest.mark.parametrize("kind, body", [("live", LIVE), ("shadow", SHADOW)])
def test_live_figures_and_shadow_comparisons_verify_only_as_their_devices_on_its_own_topic(kind, body):
    """Live and shadow messages are verified like every device message: the registered key of the device the
    topic names; forged, altered, another device's topic or another kind's topic are refused."""
    good = DEVICE.sign(messages.envelope(kind, "f", "d1", 1, body))
    assert receive(messages.encode(good), kind=kind) == good
    stranger = Signer.generate()
    for payload, device, on, why in [
        (stranger.sign(messages.envelope(kind, "f", "d1", 1, body)), "d1", kind, "not d1's registered key"),
        ({**good, "requests": 10 ** 6, "compared": 10 ** 6}, "d1", kind, "signature does not verify"),
        (good, "d2", kind, "names f/d1 but came on"),
        (good, "d1", "telemetry", f"schema 'edgekit.{kind}/1' does not belong on 'telemetry'"),
        (DEVICE.sign({**messages.envelope(kind, "f", "d1", 1, body), "ts": time.time() + 3600}), "d1", kind, "ahead"),
    ]:
        with pytest.raises(MessageError, match=why):
            receive(messages.encode(payload), device=device, kind=on)


@pytest.mark.parametrize("field", ["avg_w", "energy_per_inference_mj"])
def test_a_signed_record_with_negative_power_is_refused_naming_the_figure(field):
    """A sensor wired backwards (an INA shunt reads negative current) signs a negative watt figure: no figure
    of consumption is below zero, and selection would prefer it over every real one (-3 mJ beats 10 mJ)."""
    power = {"measured": True, "sensor": "ina219", "avg_w": 2.0, "energy_per_inference_mj": 10.0}
    assert receive(messages.encode(record(power=power)))["power"] == power
    with pytest.raises(MessageError, match=rf"power\.{field} is not a non-negative number"):
        receive(messages.encode(record(power={**power, field: -3.0})))


def test_verifying_a_deeply_nested_payload_answers_a_reason_at_every_depth_never_raises():
    """A payload nested just under the parser's recursion limit decoded, then canonical() raised RecursionError
    inside verify_published, which must never raise on a message: the monitor's verifying process died on it
    (restarted, its batch checked again one message at a time) and a flood of them stalled the monitor."""
    signer = Signer.generate()
    keyring = Keyring({"d1": signer.public})
    m = messages.envelope("telemetry", "f", "d1", 1, {"conditions": {}, "spool": {}, "key_id": signer.key_id,
                                                       "sig": "AAAA"})
    head = messages.encode(m)[:-1] + b',"x":'
    for depth in range(1, 1100):
        why = identity.verify_published(keyring, "edgekit/v1/f/d1/telemetry", head + b"[" * depth + b"]" * depth + b"}")
        assert isinstance(why, str), depth


def test_a_signature_spelled_another_way_in_base64_is_refused():
    """The decoder fuzz found it: base64 ignores the spare bits of a signature's last character, so "...Ag=="
    and "...Ah==" are the same 64 bytes and both verified: anyone could make a second, different message
    (other bytes, other hash) from a signed one. One spelling is taken: the one that encodes the bytes."""
    import base64

    good = record()
    raw = base64.b64decode(good["sig"])
    last = good["sig"].rstrip("=")[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    twins = [c for c in alphabet if c != last
             and base64.b64decode(good["sig"].rstrip("=")[:-1] + c + "==") == raw]
    assert twins  # 64 bytes: the last character carries 2 bits and 4 spare
    for c in twins:
        with pytest.raises(MessageError, match="signature does not verify"):
            receive(messages.encode({**good, "sig": good["sig"].rstrip("=")[:-1] + c + "=="}))
    assert receive(messages.encode(good)) == good


def test_a_signed_message_with_a_key_added_twice_does_not_verify_as_its_device_s():
    """Anyone who saw a signed record could put a second, earlier copy of a key in front of the real one: the
    parser kept the last (the signed value), so the message verified and was stored with bytes that say
    something else to a reader keeping the first."""
    signer = Signer.generate()
    keyring = Keyring({"d1": signer.public})
    msg = messages.encode(signer.sign(messages.envelope("status", "f", "d1", 1, {"state": "online"})))
    topic = "edgekit/v1/f/d1/status"
    assert identity.verify_published(keyring, topic, msg) is None
    why = identity.verify_published(keyring, topic, b'{"state":"offline",' + msg[1:])
    assert why is not None and "twice" in why


def test_verify_published_answers_a_reason_when_checking_a_payload_fails_unexpectedly(monkeypatch):
    """The monitor's verifying process ends on any exception verify_published raises: one payload that made the
    check fail other than with a MessageError (as nesting near the recursion limit did) killed it for all."""
    signer = Signer.generate()
    keyring = Keyring({"d1": signer.public})
    msg = messages.encode(signer.sign(messages.envelope("status", "f", "d1", 1, {"state": "online"})))

    def broken(_message):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(identity, "canonical", broken)
    why = identity.verify_published(keyring, "edgekit/v1/f/d1/status", msg)
    assert why is not None and "RecursionError" in why
