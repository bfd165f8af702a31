"""MQTT plumbing shared by the agent and the host: client set-up and the spooled publisher.

``make_client`` builds a paho-mqtt v2 client from a :class:`BrokerConfig` (TLS, username and
password, keepalive, back-off between reconnects). :class:`SpooledPublisher` moves spool rows to
the broker at QoS 1 and deletes each one only when its PUBACK arrives.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import struct
import threading
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from device_agents.disk import read_head
from device_agents.spool import Spool
from edgekit_protocol.config import BrokerConfig
from edgekit_protocol.errors import ConfigError

log = logging.getLogger("edgekit.agent.mqtt")


READ_AHEAD = 64 * 1024  # bytes a ReadAheadClient asks the socket for at once


class ReadAheadClient(mqtt.Client):
    """A paho client that reads its socket :data:`READ_AHEAD` bytes at a time and handles every whole packet read.

    paho reads each packet with a ``recv`` per byte of its fixed header (type, then each length byte) and one
    for the rest, and handles one packet per ``select`` when nothing of its own is in flight: four or five
    system calls and a pass of its network loop for each message received. For a receiver of a stream (the
    monitor draining a backlog: tens of thousands of messages a minute) this reads what the socket holds at once,
    hands paho its packets from that buffer and goes on until the buffer is empty (a packet cut at its end waits
    for the rest, as paho's own partial reads do). Handling what the buffer holds never reads the socket again: a peer
    that always has more to send (a flood of QoS 0 messages) cannot hold the network loop in one ``loop_read``, which
    would write nothing meanwhile (no PUBACK, no PINGREQ: the broker drops the client at its keepalive); the rest of
    a packet cut at the buffer's end is read at the next, the socket being readable. The buffer belongs to one
    socket: what a closed connection left unread is never read as the next connection's.

    ``on_read``, when set, is called (in the network thread) after each read of the socket that brought bytes, before
    any packet of them is handled: a receiver checks there what holds for the whole read (the host's clients check
    their key files once a read, not once a message)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._ahead = b""
        self._ahead_at = 0  # how much of _ahead was handed out
        self._ahead_sock: Any = None  # the socket _ahead was read from
        self._draining = False  # handling what the buffer holds: the socket is not read again meanwhile
        self.on_read: Callable[[], None] | None = None

    def _sock_recv(self, bufsize: int) -> bytes:
        """Return up to ``bufsize`` bytes: from the buffer, else from one ``recv`` of :data:`READ_AHEAD` bytes
        (b"" when the connection closed). Raises as paho's own (BlockingIOError: nothing to read now, or the buffer
        is handled and the socket is read at the next ``loop_read``)."""
        if self._ahead_at < len(self._ahead) and self._ahead_sock is self._sock:
            chunk = self._ahead[self._ahead_at:self._ahead_at + bufsize]
            self._ahead_at += len(chunk)
            return chunk
        if self._draining:
            raise BlockingIOError("read ahead handled; the socket is read at the next loop_read")
        data = super()._sock_recv(max(bufsize, READ_AHEAD))
        self._ahead, self._ahead_at, self._ahead_sock = data, min(bufsize, len(data)), self._sock
        if data and self.on_read is not None:
            self.on_read()
        return data[:bufsize] if len(data) > bufsize else data

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        """Read and handle packets as paho does, then every whole one left in the buffer; return paho's code."""
        rc = super().loop_read(max_packets)
        self._draining = True
        try:
            while (rc == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS and self._sock is not None
                   and self._ahead_sock is self._sock and self._ahead_at < len(self._ahead)):
                rc = super().loop_read(max_packets)  # each pass takes at least one byte of the buffer
        finally:
            self._draining = False
        return rc


def agent_client_id(fleet: str, device: str, password: str | None) -> str:
    """Return the MQTT client id of ``device``'s agent: ``edgekit-agent-<fleet>-<device>``, followed with a broker
    password by a dot and 12 hex digits of a sha256 of it, which no other device holds. Mosquitto closes the
    connection of a client whose id another client connects with, whatever its user, and a clean connection wipes the
    session's queued commands: a device that could name another's id could keep it off the broker and lose its
    commands. Never raises."""
    base = f"edgekit-agent-{fleet}-{device}"
    if password is None:
        return base
    return f"{base}.{hashlib.sha256(password.encode(errors='surrogateescape')).hexdigest()[:12]}"


def drop_session(broker: BrokerConfig, client_id: str, password: str | None, timeout_s: float = 10.0) -> bool:
    """Connect once as ``client_id`` with a clean session and disconnect, so the broker drops the persistent session it
    kept under that id: its subscriptions, and the messages it would queue for them for ever (an agent's id before
    :func:`agent_client_id` named it by its password: every command and desired state sent to the device since).
    Return whether the broker took the connection within ``timeout_s``. Never raises (a broker not reached: False)."""
    try:
        client = make_client(broker, client_id, password=password, clean=True)
        answered, took = threading.Event(), []
        client.on_connect = lambda _c, _u, _f, reason, _p: (took.append(not reason.is_failure), answered.set())
        client.connect(broker.host, broker.port, keepalive=max(5, int(timeout_s)))
        client.loop_start()
        try:
            answered.wait(timeout_s)
        finally:
            client.disconnect()
            client.loop_stop()
        return took == [True]
    except Exception as exc:  # noqa: BLE001 - tried again at the next start
        log.debug("the session of %s was not dropped: %s", client_id, exc)
        return False


def make_client(broker: BrokerConfig, client_id: str, *, password: str | None = None, v5: bool = False,
                clean: bool = True, manual_ack: bool = False, read_ahead: bool = False) -> mqtt.Client:
    """Return a configured, not yet connected paho client.

    ``v5`` selects MQTT 5 (needed for shared subscriptions); ``clean`` False keeps the session
    (subscriptions and queued QoS 1 messages) on the broker across disconnects; ``manual_ack`` leaves
    the PUBACK of each received QoS 1 message to ``client.ack`` (the agent persists a command first);
    ``read_ahead`` makes it a :class:`ReadAheadClient` (for a receiver of many messages: the monitor).

    Raises:
        ConfigError: a TLS file (``broker.tls.ca``, ``cert``, ``key``) is missing, no regular file (a FIFO) or not
            PEM.
    """
    # paho's own client where its private _sock_recv (paho-mqtt 2.x) is not there to build on
    cls = ReadAheadClient if read_ahead and hasattr(mqtt.Client, "_sock_recv") else mqtt.Client
    if v5:
        client = cls(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=manual_ack)
    else:
        client = cls(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                     clean_session=clean, manual_ack=manual_ack)
    if broker.username:
        client.username_pw_set(broker.username, password)
    if broker.tls is not None:
        files = {k: getattr(broker.tls, k) for k in ("ca", "cert", "key") if getattr(broker.tls, k)}
        for k, v in files.items():  # a regular file only: OpenSSL's open of a FIFO waited for a writer, holding us
            try:
                read_head(Path(v).expanduser(), 0)
            except FileNotFoundError:
                pass  # said below, as paho's error for it
            except OSError as exc:
                raise ConfigError(f"broker.tls.{k} {v}: {exc.strerror or exc}; fix the path in the fleet file or agent "
                                  "config") from None
        try:
            client.tls_set(ca_certs=str(files["ca"]) if "ca" in files else None,
                           certfile=str(files["cert"]) if "cert" in files else None,
                           keyfile=str(files["key"]) if "key" in files else None,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        except (OSError, ssl.SSLError) as exc:  # a path that is wrong, or a file that is no PEM certificate or key
            bad = next((f"{k} {v}" for k, v in files.items() if not Path(v).expanduser().is_file()), None)
            what = f"broker.tls.{bad}: no such file" if bad else \
                f"broker.tls ({', '.join(f'{k} {v}' for k, v in files.items())}): not a PEM certificate or key ({exc})"
            raise ConfigError(f"{what}; fix the path in the fleet file or agent config") from None
    client.on_socket_open = _send_at_once
    client.reconnect_delay_set(min_delay=0.1, max_delay=max(0.1, broker.reconnect_max_s))
    client.max_inflight_messages_set(200)
    client.max_queued_messages_set(0)
    return client


def ack_all(client: mqtt.Client, mids: list[int | None]) -> None:
    """Acknowledge the QoS 1 messages ``mids`` (None: a QoS 0 one, nothing to acknowledge) that ``client``
    (``manual_ack``) received, in the order given, as one write of their PUBACKs; return nothing. paho's ``ack`` queues
    each PUBACK alone, waking the network thread and sending a TCP segment per message: a system call or two for each
    message a receiver of a stream stores. Where paho has no ``_packet_queue`` (its private queue of outgoing packets,
    paho-mqtt 2.x), or one that takes other arguments, each is acknowledged by ``ack``. Raises as paho's ``ack``
    (nothing is sent while disconnected: the broker sends those messages again)."""
    mids = [mid for mid in mids if mid is not None]
    if not mids:
        return
    queue = getattr(client, "_packet_queue", None)
    if queue is not None:
        # PUBACK with its 2-byte packet id and nothing more (MQTT 3.1.1; MQTT 5's reason code 0, success, left out): as
        # paho's own _send_puback writes it
        try:
            queue(mqtt.PUBACK, b"".join(struct.pack("!BBH", mqtt.PUBACK, 2, mid) for mid in mids), 0, 0)
            return
        except TypeError:  # a paho whose private queue takes other arguments: nothing was queued
            pass
    for mid in mids:
        client.ack(mid, 1)


def message_topic(message: mqtt.MQTTMessage) -> str:
    """Return the topic ``message`` came on, its bytes that are not UTF-8 shown as ``\\xNN``. Never raises.

    paho decodes a topic strictly when it is read, and an exception out of an ``on_message`` callback is raised again
    in paho's network thread, which then ends: the client receives nothing more and says nothing. The MQTT spec has
    a broker refuse such a topic (Mosquitto does), not every broker checks; with a wildcard subscription anyone
    allowed to publish under it can send one. Shown so, it names no device and is refused like any other."""
    try:
        return message.topic
    except UnicodeDecodeError:
        return message._topic.decode("utf-8", "backslashreplace")  # paho keeps the bytes there, and offers no other way


def _send_at_once(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    """Switch Nagle off on the broker connection (paho leaves it on).

    With it on, a small packet such as a command or its ack could wait 40 ms for the broker's
    delayed acknowledgement of the previous one (README: the broker needs ``set_tcp_nodelay`` too).
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class SpooledPublisher:
    """Hands spooled rows to paho while connected; deletes each row on its PUBACK.

    Every row is handed to paho once per process: paho keeps unacknowledged QoS 1 messages and
    re-sends them after a reconnect, and rows written while disconnected are handed over at the
    next connect. After an agent restart every row still in the spool is sent again, so a record
    may arrive twice but never zero times; receivers drop duplicates by ``msg_id``.
    """

    def __init__(self, client: mqtt.Client, spool: Spool, batch: int = 500):
        self.client = client
        self.spool = spool
        self.batch = batch
        self.connected = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._rows: dict[int, int | None] = {}  # mid -> spool row (None: not spooled)
        self._early: set[int] = set()  # PUBACKs that arrived before publish() returned
        self._handed_upto = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="spool-publisher")

    def start(self) -> None:
        """Start the background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (unsent rows stay in the spool)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def wake(self) -> None:
        """Tell the thread that new rows are waiting."""
        self._wake.set()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, row: int | None = None) -> None:
        """Publish at QoS 1, remembering which spool row (if any) the PUBACK releases."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._lock:
            if info.mid in self._early:
                self._early.discard(info.mid)
                release = True
            else:
                self._rows[info.mid] = row
                release = False
        if release and row is not None:
            self.spool.done(row)

    def on_publish(self, _client: Any, _userdata: Any, mid: int, _rc: Any = None, _props: Any = None) -> None:
        """paho callback: the broker acknowledged ``mid``."""
        with self._lock:
            if mid not in self._rows:
                self._early.add(mid)
                return
            row = self._rows.pop(mid)
        if row is not None:
            self.spool.done(row)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            while True:
                self.spool.checkpoint()  # now and then, connected or not: the WAL's fsyncs on this thread, not the writer's
                if not self.connected.is_set() or self._stop.is_set():
                    break
                rows = self.spool.pending(self.batch, after=self._handed_upto)
                if not rows:
                    break
                for row_id, topic, payload in rows:
                    self.publish(topic, payload, row=row_id)
                    self._handed_upto = row_id
