"""The host's MQTT client (FleetClient) against a real Mosquitto: a rollout's stream of reported states."""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_kit.fleet.commands import FleetClient
from edge_kit.fleet.inventory import load_fleet
from edge_kit.fleet.keys import FleetKeys, _RegistryKeyring
from edge_kit.sim.virtual import device_signer, write_virtual_fleet
from edgekit_protocol import messages
from edgekit_protocol.config import BrokerConfig
from edgekit_protocol.desired import Desired, reported_body

pytestmark = pytest.mark.integration


def wait_until(check, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.02)
    return check()


def test_the_key_files_are_checked_once_a_read_not_twice_a_message_and_a_revocation_counts_at_the_next_read(
        mosquitto, tmp_path, monkeypatch):
    """The host's client stat'ed the key registry and the revoked list twice for every message (once for what a
    revoked device left at the broker, once to verify), and read its socket a few bytes at a time: a tenth of a
    10,000-device rollout's host CPU. It reads what the socket holds at once now (ReadAheadClient) and checks the key
    files once per read, before any message of it is handled: every message still verified, and one a device signs
    after its key was revoked is refused."""
    broker = BrokerConfig(host=mosquitto.host, port=mosquitto.port)
    fleet = load_fleet(write_virtual_fleet(tmp_path / "fleet", 2, ["rpi4"], broker))
    stamps = []
    real = _RegistryKeyring._file_stamp
    monkeypatch.setattr(_RegistryKeyring, "_file_stamp", lambda self: stamps.append(1) or real(self))
    desired = Desired(msg_id="", rollout="r", revision=1, store="http://127.0.0.1:9", model="m", variant="int8",
                      sha256="c" * 64, bytes=1)

    def reported(device: str, seq: int) -> bytes:
        body = reported_body(desired, "fetching", None)
        return messages.encode(device_signer(fleet.fleet, device).sign(
            messages.envelope("reported", fleet.fleet, device, seq, body)))

    n = 400
    payloads = [reported("v00000", i + 1) for i in range(n)]
    forged = reported("v00000", n + 1)[:-3] + b'A="}'  # its signature altered: refused
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="device-side")
    publisher.connect(broker.host, broker.port)
    publisher.loop_start()
    got: list[dict] = []
    try:
        with FleetClient.of(fleet, kinds=("reported",), on_reported=got.append) as client:
            stamps.clear()
            infos = [publisher.publish(messages.topic(fleet.fleet, "v00000", "reported"), p, qos=1)
                     for p in [*payloads, forged]]
            for info in infos:
                info.wait_for_publish(10)
            assert wait_until(lambda: len(got) + client.rejected_count >= n + 1), (len(got), client.rejected_count)
            assert [m["seq"] for m in got] == list(range(1, n + 1)) and client.rejected_count == 1
            assert "does not verify" in client.rejected[-1]
            assert len(stamps) < n / 4, f"{len(stamps)} checks of the key files for {n + 1} messages"
            FleetKeys(tmp_path / "fleet" / "keys").revoke("v00001")
            publisher.publish(messages.topic(fleet.fleet, "v00001", "reported"), reported("v00001", 1), qos=1)
            assert wait_until(lambda: client.rejected_count == 2), client.rejected_count
            assert "v00001's key" in client.rejected[-1] and "was revoked" in client.rejected[-1]
            assert len(got) == n
    finally:
        publisher.disconnect()
        publisher.loop_stop()
