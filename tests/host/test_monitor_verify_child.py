"""The monitor's verifying child reads payloads with the plain JSON parser (half the strict decoder's cost):
its verdict must agree with the strict path wherever the monitor takes it, and a payload only the strict
decoder refuses (a key twice, the parsers keep different copies) is refused all the same."""

from __future__ import annotations

import time

from device_agents import identity
from device_agents.identity import Keyring, Signer
from edge_kit.fleet.inventory import load_fleet
from edge_kit.telemetry.monitor import Monitor
from edge_kit.telemetry.store import Store
from edge_kit.telemetry.verifier import Verifier
from edgekit_protocol import messages

TOPIC = messages.topic("sim", "d1", "status")


def _fleet(tmp_path, signer):
    path = tmp_path / "fleet.yaml"
    path.write_text("fleet: sim\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                    "devices:\n  - {name: d1, host: 127.0.0.1}\n")
    fleet = load_fleet(path)
    fleet.key_store().register("d1", signer.public)
    return fleet


def _signed(signer, seq=1, state="online"):
    return messages.encode(signer.sign(messages.envelope("status", "sim", "d1", seq, {"state": state})))


def _verifying_in_child(tmp_path, signer):
    """Return ``(fleet, store, monitor)``: a one-device fleet whose d1 signs with ``signer``, a history, and a monitor
    whose verifying child is started (the caller stops it)."""
    fleet = _fleet(tmp_path, signer)
    store = Store(tmp_path / "h.db")
    mon = Monitor(fleet, store, verify_in_child=True)
    mon.verifier.start()
    return fleet, store, mon


def test_the_lenient_verdict_is_the_strict_one_for_signed_altered_and_foreign_payloads():
    signer, other = Signer.generate(), Signer.generate()
    keyring = Keyring({"d1": signer.public})
    good = _signed(signer)
    cases = [good, good.replace(b'"online"', b'"offline"'), _signed(other), good[:-5], b"[]", b'{"sig": 1}']
    for payload in cases:
        strict = identity.verify_published(keyring, TOPIC, payload)
        lenient = identity.verify_published(keyring, TOPIC, payload, decoded_elsewhere=True)
        assert (strict is None) == (lenient is None), payload
    assert identity.verify_published(keyring, TOPIC, good, decoded_elsewhere=True) is None


def test_a_key_added_twice_to_a_signed_message_is_refused_by_the_monitor_verifying_in_its_child(tmp_path):
    signer = Signer.generate()
    fleet, store, mon = _verifying_in_child(tmp_path, signer)
    try:
        good = _signed(signer, 1)
        forged = b'{"state":"offline",' + _signed(signer, 2)[1:]
        # what the child alone says of the forgery: its parser keeps the last (signed) copy
        assert identity.verify_published(fleet.key_store().keyring(), TOPIC, forged, decoded_elsewhere=True) is None
        mon._store([(TOPIC, good, time.time(), None), (TOPIC, forged, time.time(), None)])
    finally:
        mon.verifier.stop()
    assert mon.stats.invalid == 1 == store.count("invalid")
    (reason,) = store._rows("SELECT reason FROM invalid")[0]
    assert "twice" in reason


def test_a_forgery_the_child_refuses_is_refused_though_it_decodes(tmp_path):
    signer, other = Signer.generate(), Signer.generate()
    fleet, store, mon = _verifying_in_child(tmp_path, signer)
    try:
        mon._store([(TOPIC, _signed(other, 1), time.time(), None), (TOPIC, _signed(signer, 2), time.time(), None)])
    finally:
        mon.verifier.stop()
    assert mon.stats.invalid == 1 and mon.stats.received == 2


def test_a_verifying_child_that_gives_no_answer_is_replaced_and_its_batch_verified_here(tmp_path):
    """The monitor's checker thread waited on the child's answer without end: a hung (here stopped) child held
    every record after it. Now it is stopped after a timeout; the batch is checked in the monitor, the next
    batch goes to a new child."""
    import os
    import signal

    signer = Signer.generate()
    fleet = _fleet(tmp_path, signer)
    verifier = Verifier(fleet.key_store().folder).start()
    try:
        assert verifier.submit([(TOPIC, _signed(signer, 1))]) and verifier.result() == [None]
        hung = verifier._proc
        os.kill(hung.pid, signal.SIGSTOP)
        assert verifier.submit([(TOPIC, _signed(signer, 2))])
        started = time.monotonic()
        assert verifier.result(timeout=1.0) is None
        assert time.monotonic() - started < 10 and not hung.is_alive()
        assert verifier.submit([(TOPIC, _signed(signer, 3))]) and verifier.result() == [None]  # a new child
    finally:
        verifier.stop()


def test_a_topic_that_is_not_utf8_is_refused_and_counted_not_raised_in_the_network_thread(tmp_path):
    """The MQTT spec has a broker refuse a topic that is not UTF-8 (Mosquitto does), but not every broker checks:
    paho decodes the topic strictly when the monitor reads it, and the UnicodeDecodeError left the monitor's
    callback, which paho raises again in its network thread: that thread ended, and the monitor received nothing
    more, with nothing said. Now the topic is read with the bad bytes shown as ``\\xNN``, and the message is
    refused, counted and kept as invalid like any other on a topic no device of the fleet owns."""
    from paho.mqtt.client import MQTTMessage

    signer = Signer.generate()
    fleet = _fleet(tmp_path, signer)
    store = Store(tmp_path / "h.db")
    mon = Monitor(fleet, store, verify_in_child=False)
    message = MQTTMessage(mid=7, topic=b"edgekit/v1/sim/d1\xff/status")
    message.payload, message.qos = _signed(signer), 1
    mon._on_message(None, None, message)  # paho's network thread calls it
    (queued,) = [mon._queue.get_nowait()]
    assert queued[0] == "edgekit/v1/sim/d1\\xff/status" and queued[3] == 7
    mon._store([queued])
    assert mon.stats.received == mon.stats.invalid == 1 == store.count("invalid") and store.count("status") == 0
    assert store._rows("SELECT topic FROM invalid") == [("edgekit/v1/sim/d1\\xff/status",)]


def test_an_empty_payload_is_a_clear_only_on_a_retained_topic_elsewhere_it_is_refused_and_counted(tmp_path):
    """`fleet revoke` clears a device's retained status, reported and desired with empty payloads, which the monitor
    drops uncounted. It dropped an empty payload on every topic alike: a flood of them on a device's bench or
    telemetry topic (no retained message there to clear) went unseen and uncounted. Now only the retained kinds'
    empty payloads are clears; any other is refused, counted and kept as invalid."""
    from paho.mqtt.client import MQTTMessage

    fleet = _fleet(tmp_path, Signer.generate())
    store = Store(tmp_path / "h.db")
    mon = Monitor(fleet, store, verify_in_child=False)
    for mid, kind in enumerate(("status", "bench", "telemetry", "reported"), start=1):
        message = MQTTMessage(mid=mid, topic=messages.topic("sim", "d1", kind).encode())
        message.payload, message.qos = b"", 1
        mon._on_message(None, None, message)
    queued = []
    while not mon._queue.empty():
        queued.append(mon._queue.get_nowait())
    assert [q[0].rsplit("/", 1)[1] for q in queued] == ["bench", "telemetry"]
    mon._store(queued)
    assert mon.stats.received == mon.stats.invalid == 2 == store.count("invalid")


def test_a_device_revoked_between_two_batches_is_refused_in_the_next_by_the_verifying_child(tmp_path):
    """The verifying child checks the key files once a batch (not twice a message): a message received after
    ``fleet revoke`` returned goes in a later batch, and is refused there as revoked (by the monitor itself, which
    reads the revoked list once a batch too and refuses a revoked device's messages before they are verified)."""
    signer = Signer.generate()
    fleet, store, mon = _verifying_in_child(tmp_path, signer)
    try:
        mon._store([(TOPIC, _signed(signer, 1), time.time(), None)])
        assert mon.stats.stored == 1 and mon.stats.invalid == 0
        fleet.key_store().revoke("d1", "stolen")
        mon._store([(TOPIC, _signed(signer, 2), time.time(), None)])
    finally:
        mon.verifier.stop()
    assert mon.stats.stored == 1 and mon.stats.revoked == 1 and mon.stats.invalid == 0
    (reason,) = store._rows("SELECT reason FROM invalid")[0]
    assert "d1's key" in reason and "was revoked" in reason and "stolen" in reason


def test_the_verifying_child_itself_refuses_a_device_revoked_between_two_batches(tmp_path):
    """What the monitor's own revoked check does not refuse first (a device the fleet file does not list) is refused by
    the verifying child, which reads the key files again once a batch."""
    signer = Signer.generate()
    fleet, store, mon = _verifying_in_child(tmp_path, signer)
    mon._revoked_now = frozenset  # as for a device outside the fleet file: left to the child
    try:
        mon._store([(TOPIC, _signed(signer, 1), time.time(), None)])
        fleet.key_store().revoke("d1", "stolen")
        mon._store([(TOPIC, _signed(signer, 2), time.time(), None)])
    finally:
        mon.verifier.stop()
    assert mon.stats.stored == 1 and mon.stats.invalid == 1 and mon.stats.revoked == 0
    (reason,) = store._rows("SELECT reason FROM invalid")[0]
    assert "d1's key" in reason and "was revoked" in reason and "stolen" in reason
