"""An embedded MQTT broker (amqtt) for machines without Mosquitto; used by `edgekit demo` only.

``python -m edge_kit.sim.embedded_broker --port N [--host A]`` serves anonymous MQTT 3.1.1 on A:N (127.0.0.1)
until SIGTERM. It has no persistence, auth or TLS: a convenience for the demo, not for a fleet.

Of the limits :func:`edge_kit.fleet.broker_setup.broker_limits` gives Mosquitto, amqtt's configuration (0.12)
takes none: no packet size, in-flight or queue bound, and its plugins' message events are not awaited before a
message is passed on, so they cannot refuse one. The largest packet (:data:`~edge_kit.fleet.broker_setup.MAX_PACKET`)
is enforced here, on the bytes each client sends (:class:`_PacketLimit`): a client sending a larger packet is
disconnected before its body is read, as Mosquitto does. That hooks amqtt's ``Broker._client_connected`` (where it
hands each connection's reader to the protocol handler; no public hook sees the bytes), so an amqtt that renames it
loses the limit: ``tests/integration/test_broker_wall.py -k embedded`` says so. In-flight and queued messages stay
unbounded (documented in docs/security.md).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from edge_kit.fleet.broker_setup import MAX_PACKET


class PacketTooLarge(Exception):
    """A client announced an MQTT packet larger than :data:`MAX_PACKET` bytes."""


class _PacketLimit:
    """A reader (amqtt's ``ReaderAdapter`` interface: ``read(n)``, ``feed_eof()``) over a client's bytes that follows
    the MQTT framing (one type byte, a remaining length of 1 to 4 bytes, the body) and raises
    :class:`PacketTooLarge` as soon as a packet's header says it is larger than ``limit`` bytes."""

    def __init__(self, reader: Any, limit: int = MAX_PACKET):
        self._reader = reader
        self._limit = limit
        self._state = "type"  # "type", "length" (its bytes so far in _digits), "body" (_left bytes to go)
        self._length = 0
        self._digits = 0
        self._left = 0

    async def read(self, n: int = -1) -> bytes:
        """Return ``n`` bytes from the client (what amqtt asks). Raises PacketTooLarge: a packet over the limit."""
        data = await self._reader.read(n)
        i = 0
        while i < len(data):
            if self._state == "body":
                take = min(self._left, len(data) - i)
                self._left -= take
                i += take
                if not self._left:
                    self._state = "type"
                continue
            byte = data[i]
            i += 1
            if self._state == "type":
                self._state, self._length, self._digits = "length", 0, 0
                continue
            self._length += (byte & 0x7F) << (7 * self._digits)
            self._digits += 1
            if not byte & 0x80:
                size = 1 + self._digits + self._length
                if size > self._limit:
                    raise PacketTooLarge(f"a packet of {size:,} bytes, over the {self._limit:,}-byte limit")
                self._state, self._left = ("body", self._length) if self._length else ("type", 0)
        return data

    def feed_eof(self) -> None:
        self._reader.feed_eof()


def _broker_class() -> type:
    """Return amqtt's Broker with every client's bytes read through :class:`_PacketLimit`."""
    from amqtt.broker import Broker

    class LimitedBroker(Broker):
        async def _client_connected(self, listener_name: str, reader: Any, writer: Any) -> None:
            try:
                await super()._client_connected(listener_name, _PacketLimit(reader), writer)
            except PacketTooLarge:  # in its CONNECT (later packets end amqtt's reader loop, which closes the link)
                await writer.close()

    return LimitedBroker


async def _serve(host: str, port: int) -> None:
    broker = _broker_class()({"listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
                              "sys_interval": 0, "auth": {"allow-anonymous": True, "plugins": ["auth_anonymous"]},
                              "topic-check": {"enabled": False}})
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m edge_kit.sim.embedded_broker")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    asyncio.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
