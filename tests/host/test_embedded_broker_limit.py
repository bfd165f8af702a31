"""The embedded broker's packet limit, on the MQTT framing alone (no broker): amqtt takes no max packet size."""

from __future__ import annotations

import asyncio

import pytest

from edge_kit.sim.embedded_broker import PacketTooLarge, _PacketLimit


class Bytes:
    """A reader over fixed bytes (amqtt's ReaderAdapter interface)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read(self, n: int = -1) -> bytes:
        n = len(self.data) if n == -1 else n
        out, self.data = self.data[:n], self.data[n:]
        return out

    def feed_eof(self) -> None:
        pass


def packet(body_len: int) -> bytes:
    """Return a PUBLISH packet with a body of ``body_len`` bytes (its remaining length as MQTT encodes it)."""
    length, n = b"", body_len
    while True:
        n, digit = n // 128, n % 128
        length += bytes([digit | (0x80 if n else 0)])
        if not n:
            return b"\x30" + length + b"x" * body_len


@pytest.mark.parametrize("chunks", [(1, 1, 1, 100, 40), (1, 1, 1, 140), (3, 140)])
def test_packets_within_the_limit_pass_however_they_are_read_and_the_next_one_over_it_is_refused(chunks):
    async def run() -> list[int]:
        reader = _PacketLimit(Bytes(packet(140) + packet(0) + packet(200_000)), limit=1_000)
        sizes = []
        for n in chunks + (1, 1):  # the first packet as amqtt reads it (header bytes one by one, the body), the empty one
            sizes.append(len(await reader.read(n)))
        with pytest.raises(PacketTooLarge, match="a packet of 200,004 bytes, over the 1,000-byte limit"):
            for _ in range(4):  # its type byte, then its length: refused before the body is read
                await reader.read(1)
        return sizes

    assert sum(asyncio.run(run())) == len(packet(140)) + 2
