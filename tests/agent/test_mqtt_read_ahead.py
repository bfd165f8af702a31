"""ReadAheadClient (device_agents/mqtt.py) against a socket that never runs dry: the monitor's network loop."""
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from device_agents.mqtt import ReadAheadClient


def publish_packet(i: int) -> bytes:
    """Return one QoS 0 PUBLISH packet (MQTT 3.1.1) on topic t carrying ``i``."""
    body = b"\x00\x01t" + str(i).encode() * 40
    return bytes([0x30, len(body)]) + body


class EndlessSocket:
    """A socket whose peer always has more: each recv returns at most ``chunk`` bytes of an endless stream of
    PUBLISH packets (so packets are cut at every read's end); ``reads`` counts the recv calls."""

    def __init__(self, chunk: int = 997, limit: int = 500):
        self.chunk, self.limit, self.reads, self.i, self.pending = chunk, limit, 0, 0, b""

    def recv(self, n: int) -> bytes:
        self.reads += 1
        if self.reads > self.limit:  # loop_read kept reading a socket that never runs dry: end it as a closed one
            return b""
        while len(self.pending) < self.chunk:
            self.i += 1
            self.pending += publish_packet(self.i)
        out, self.pending = self.pending[:min(n, self.chunk)], self.pending[min(n, self.chunk):]
        return out

    def close(self) -> None:
        pass


def test_a_peer_that_never_stops_sending_does_not_hold_the_network_loop_in_one_read():
    """loop_read handled the buffer's packets and, when the last was cut at the buffer's end, read the socket again
    for its rest, and so on: while the broker had more to send (a device flooding QoS 0 messages) it never returned,
    so the network loop wrote nothing (no PUBACK, no PINGREQ: the broker dropped the monitor at its keepalive). Now
    one loop_read reads the socket a bounded number of times; a packet cut at the buffer's end is finished at the next
    (the socket is still readable, so select() returns at once) and none is lost."""
    got: list[bytes] = []
    client = ReadAheadClient(CallbackAPIVersion.VERSION2, client_id="read-ahead", protocol=mqtt.MQTTv311)
    client.on_message = lambda c, u, msg: got.append(msg.payload)
    sock = EndlessSocket()
    client._sock = sock
    for n in range(1, 8):
        assert client.loop_read() == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS and client._sock is sock
        assert sock.reads <= 2 * n, f"{sock.reads} socket reads in {n} loop_read calls"
    # every packet whole and in order, none lost across the reads' ends
    assert len(got) > 7 * 8 and got == [str(i).encode() * 40 for i in range(1, len(got) + 1)]


def test_ack_all_falls_back_to_one_ack_each_where_paho_s_private_queue_is_missing_or_takes_other_arguments():
    """ack_all writes a batch's PUBACKs through paho's private packet queue: a paho without it, or one whose queue
    takes other arguments (a future release), acknowledges each by ``ack`` instead of losing them all (the monitor
    logs a failed ack at debug level only, and the broker would send the whole backlog again at every reconnect)."""
    from device_agents.mqtt import ack_all

    class Acking:
        def __init__(self):
            self.acked = []

        def ack(self, mid, qos):
            self.acked.append((mid, qos))

    class OtherQueue(Acking):
        def _packet_queue(self, packet):  # another signature: the call raises TypeError, nothing queued
            raise AssertionError("not called with one argument")

    class Queue(Acking):
        queued = None

        def _packet_queue(self, command, packet, mid, qos, info=None):
            self.queued = (command, packet)

    for client in (Acking(), OtherQueue()):
        ack_all(client, [3, None, 7])
        assert client.acked == [(3, 1), (7, 1)]
    client = Queue()
    ack_all(client, [3, None, 7])
    assert client.acked == [] and client.queued == (0x40, b"\x40\x02\x00\x03\x40\x02\x00\x07")
