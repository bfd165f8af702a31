"""The host never publishes a message over the protocol's 64 KiB payload limit, against the fleet's real broker.

The fleet's Mosquitto runs with ``max_packet_size`` (the limit and room for the topic and header). A command over it
(`edgekit bench --variant` of 70,000 characters: command strings have no bound of their own) was published: the
broker cut the host's client off, paho reconnected and sent the QoS 1 message again, dozens of times a second, and
the command waited out its whole timeout to say "no answer; is its agent running". Now it is refused before it is
published, in one line naming the device, the command, the size and the limit; the session stays connected.
"""

from __future__ import annotations

import time

import pytest

from device_agents.identity import Keyring, Signer
from edge_kit.fleet.commands import FleetClient
from edgekit_protocol.config import BrokerConfig
from edgekit_protocol.errors import PayloadTooLarge


def test_a_command_over_the_limit_is_refused_at_once_and_the_broker_never_cuts_the_host_off(mosquitto):
    operator = Signer.generate()
    cuts: list[float] = []
    with FleetClient(BrokerConfig(host=mosquitto.host, port=mosquitto.port), "f", signer=operator,
                     keyring=Keyring({}, [operator.public])) as c:
        c.client.on_disconnect = lambda *_a: cuts.append(time.monotonic())
        started = time.monotonic()
        with pytest.raises(PayloadTooLarge, match=r"^pi-1: the bench command of [0-9,]+ bytes is over the protocol's "
                                                  r"65,536-byte limit: not sent"):
            c.request("pi-1", "bench", {"variant": "x" * 70_000}, timeout=5)
        assert time.monotonic() - started < 2, "it waited for an answer that could never come"
        c.send("pi-1", "state")  # the session goes on: a command within the limit goes out
        time.sleep(1.0)
        assert cuts == [] and c.client.is_connected(), "the broker cut the host off"
