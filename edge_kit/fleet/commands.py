"""Send commands to agents over MQTT and wait for their acks and records.

Used by ``edgekit bench --device``, deploy (activate, rollback) and tune. One client per call
site, subscribed to the fleet's ``cmd/ack`` and ``bench`` topics before anything is sent, so an
answer cannot slip past.

Every command is signed with the operator key and carries an expiry. An answer counts only when it
verifies as the addressed device's (the registered key of the device the topic names, which must
also be the device the command went to), is well formed, and is not dated ahead of this host's
clock; anything else is refused and counted in :attr:`FleetClient.rejected_count` (the newest
:data:`MAX_REJECTED` reasons in :attr:`FleetClient.rejected`), never taken. What the client keeps is
bounded however long it runs and whatever is published: at most :data:`MAX_STATUS` statuses per device
and :data:`MAX_RECORDS` bench records (the newest).

A device's answer is its own word about itself only: the bench record an ack announces is taken only when that
same device published it (a compromised device naming another's record gets no one's), and the error text of an
ack is cut to :data:`~edgekit_protocol.desired.MAX_ERROR_CHARS` as it arrives, before any caller quotes it.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import OrderedDict, deque
from typing import Any, Callable

from device_agents.identity import Keyring, Signer, receive, verify_published
from device_agents.mqtt import ReadAheadClient, make_client, message_topic
from edge_kit.errors import AgentError, AgentTimeout
from edge_kit.fleet.keys import DeviceRevoked
from edgekit_protocol import commands, messages
from edgekit_protocol.config import BrokerConfig
from edgekit_protocol.desired import MAX_ERROR_CHARS, Desired
from edgekit_protocol.labels import clip

CONNECT_TIMEOUT_S = 10.0
MAX_REJECTED = 1000  # reasons of refused messages kept (the newest); all are counted in ``rejected_count``
MAX_STATUS = 64  # statuses kept per device (the newest): wait_online looks at the recent ones
MAX_RECORDS = 10_000  # bench records (and refusals of signed ones) kept, the newest: a request waits seconds for its own


def broker_unreachable(broker: BrokerConfig, exc: OSError) -> AgentError:
    """Return the error for a broker that refused or never answered the TCP connection (every host client:
    commands, rollouts, the monitor), naming the address and what to check."""
    return AgentError(f"cannot reach the MQTT broker at {broker.host}:{broker.port} ({exc.strerror or exc}); "
                      "check broker.host/port in the fleet file and that the broker runs")
RETAINED_QUIET_S = 0.5  # retained statuses: done when none arrived for this long (or every device has one) ...
RETAINED_WAIT_S = 5.0  # ... or after this long
COMMAND_TTL_S = 3600.0  # a command nobody waits for expires after this, so it cannot be replayed later


def _started(status: dict[str, Any]) -> float:
    """Return a status's ``started`` (the agent's start, its clock) when it is a number, else -inf."""
    started = status.get("started")
    return float(started) if messages.in_range(started) else float("-inf")


def _keep_newest(kept: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    """Put ``value`` under ``key`` in ``kept`` as its newest entry, dropping the oldest beyond
    :data:`MAX_RECORDS`; returns nothing."""
    kept[key] = value
    kept.move_to_end(key)
    while len(kept) > MAX_RECORDS:
        kept.popitem(last=False)


class FleetClient:
    """A host-side MQTT session with one fleet. Use as a context manager.

    ``transport`` replaces the paho client (unit tests pass an in-memory fake with paho's
    ``connect/loop_start/subscribe/publish/disconnect/loop_stop`` and callback attributes).

    Raises (on enter):
        AgentError: the broker cannot be reached or refuses the connection.
    """

    def __init__(self, broker: BrokerConfig, fleet: str, password: str | None = None, *, signer: Signer,
                 keyring: Keyring, transport: Any = None, kinds: tuple[str, ...] = ("cmd/ack", "bench", "status"),
                 on_reported: Callable[[dict[str, Any]], None] | None = None,
                 revoked: Callable[[str], dict[str, Any] | None] | None = None):
        self.broker = broker
        # device -> its revoked-list entry when its key was revoked and none registered since (None: not revoked);
        # :meth:`send` refuses such a device before anything is sent
        self.revoked = revoked
        self.kinds = kinds  # what it subscribes to; a rollout takes ``reported`` only (one retained per device)
        self.on_reported = on_reported  # called (network thread) with each verified reported message
        self.fleet = fleet
        self.signer = signer
        self.keyring = keyring
        # reads what the socket holds at once (a rollout takes thousands of reported states a second); each read, the
        # key files are checked once for the messages it brought (:meth:`_check_keys`), not twice a message
        self.client = transport or make_client(broker, f"edgekit-host-{uuid.uuid4().hex[:8]}", password=password,
                                               read_ahead=True)
        self._keys_checked = contextlib.ExitStack()
        if isinstance(self.client, ReadAheadClient):
            self.client.on_read = self._check_keys
        self._cond = threading.Condition()
        self.sent: dict[str, str] = {}  # command id -> the device it went to
        # why the newest refused messages were refused (forged, misaddressed, ...); all are counted
        self.rejected: deque[str] = deque(maxlen=MAX_REJECTED)
        self.rejected_count = 0
        # messages a revoked device left at the broker (its retained status, its last will), dropped unrefused, each
        # counted once by its msg_id
        # (:meth:`~edge_kit.fleet.keys._RegistryKeyring.left_by_revoked`)
        self.left_by_revoked = 0
        self._left_ids: set[str] = set()  # their msg ids (signed by revoked keys before revocation: a few)
        self.acks: dict[str, dict[str, Any]] = {}
        # bench records by (device, msg_id): an ack names a record of the device that sent the ack, never another's
        self.records: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        # bench records their device did sign whose content the checks refused ((device, msg_id) -> why): tune
        # says so at once
        self.refused_records: OrderedDict[tuple[str, str], str] = OrderedDict()
        # device -> (received, message), the newest MAX_STATUS
        self.status: dict[str, deque[tuple[float, dict[str, Any]]]] = {}
        # device -> the status the broker held retained for it when this client subscribed (verified), and
        # when the last such status arrived (host monotonic clock)
        self.retained: dict[str, dict[str, Any]] = {}
        # device -> the reported state (a pull rollout's agent's) the broker held retained for it, verified
        self.retained_reported: dict[str, dict[str, Any]] = {}
        self._retained_at = 0.0
        # device -> (received, epoch, highest seq of that epoch, latest `started`) each time a status raised either or
        # brought an epoch not seen before: what a status must beat to prove a new start (a replayed old one raises
        # neither, so it never adds a row)
        self._status_peaks: dict[str, deque[tuple[float, str | None, int, float]]] = {}
        self._connected = threading.Event()
        self._refused: str | None = None
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    def _check_keys(self) -> None:
        """Check the keyring's files now, for the messages one read of the socket brought (called by the
        :class:`~device_agents.mqtt.ReadAheadClient` after each read, in the network thread, before any of them is
        handled: :meth:`~edge_kit.fleet.keys._RegistryKeyring.checked_once`, each read's block ending at the next
        read). A key revoked before the read counts for every message it brought. Returns nothing; never raises."""
        self._keys_checked.close()
        self._keys_checked.enter_context(self.keyring.checked_once())

    def _on_connect(self, client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            self._connected.set()
            return
        if not self.kinds:  # a client that only publishes (clear_retained)
            self._connected.set()
            return
        client.subscribe([(messages.subscription(self.fleet, kind), 1) for kind in self.kinds])
        client.on_subscribe = lambda *_: self._connected.set()

    @classmethod
    def of(cls, fleet: Any, *, transport: Any = None, **kw: Any) -> FleetClient:
        """Return a client for a fleet read from its file: its broker, password and keys.

        Raises:
            ConfigError: the broker password file or the fleet's keys cannot be read.
        """
        keys = fleet.key_store()
        keyring = keys.keyring()
        return cls(fleet.broker, fleet.fleet, fleet.broker_password(), signer=keys.operator, keyring=keyring,
                   transport=transport, revoked=keyring.device_revocation, **kw)

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        topic = message_topic(message)  # a topic that is not UTF-8 read strictly would end paho's network thread
        if messages.is_cleared(topic, message.payload):  # a retained message cleared (fleet revoke does): nothing said
            return
        left = self.keyring.left_by_revoked(topic, message.payload, bool(getattr(message, "retain", False)))
        if left is not None:
            with self._cond:  # what a revoked device left at the broker (its last will): neither taken nor refused
                if left not in self._left_ids:  # each once: a keyless peer may send a captured one again
                    self._left_ids.add(left)
                    self.left_by_revoked += 1
            return
        try:
            kind, msg = receive(self.keyring, topic, message.payload, time.time())
            device = msg["device"]
            if msg["fleet"] != self.fleet:
                raise messages.MessageError(f"{topic}: not fleet {self.fleet}")
            if kind == "cmd/ack" and self.sent.get(msg.get("cmd_id")) != device:
                raise messages.MessageError(f"an ack from {device} for a command not sent to it")
        except Exception as exc:  # noqa: BLE001 - EdgeKitError, or anything odd: refused, never the thread's end
            genuine = self._genuine_bench_id(topic, message.payload)
            with self._cond:
                self.rejected.append(f"{topic}: {exc}"[:300])
                self.rejected_count += 1
                if genuine is not None:
                    _keep_newest(self.refused_records, genuine, clip(str(exc), 300))
                    self._cond.notify_all()
            return
        if kind == "reported":
            if getattr(message, "retain", False):  # what the broker holds for the device: its last report
                with self._cond:
                    self.retained_reported[device], self._retained_at = msg, time.monotonic()
                    self._cond.notify_all()
            if self.on_reported is not None:
                self.on_reported(msg)
            return
        with self._cond:
            if kind == "cmd/ack":
                if msg.get("error") is not None:  # quoted by every caller (a device may send 64 KiB of it, or no text)
                    msg["error"] = clip(str(msg["error"]), MAX_ERROR_CHARS)
                self.acks[msg["cmd_id"]] = msg
            elif kind == "bench":
                _keep_newest(self.records, (device, msg["msg_id"]), msg)
            elif kind == "status":  # verified: one of the registered devices
                now = time.time()
                if getattr(message, "retain", False):  # sent because we subscribed: what the broker holds now
                    self.retained[device], self._retained_at = msg, time.monotonic()
                self.status.setdefault(device, deque(maxlen=MAX_STATUS)).append((now, msg))
                peaks = self._status_peaks.setdefault(device, deque(maxlen=MAX_STATUS))
                seq, started, epoch = msg["seq"], _started(msg), messages.message_epoch(msg)
                top = max((p[2] for p in peaks if p[1] == epoch), default=None)
                latest = peaks[-1][3] if peaks else started
                if top is None or seq > top or started > latest:
                    peaks.append((now, epoch, seq if top is None else max(seq, top), max(started, latest)))
            self._cond.notify_all()

    def _genuine_bench_id(self, topic: str, payload: bytes) -> tuple[str, str] | None:
        """Return ``(device, msg_id)`` of a refused bench record that its device (the one its topic names) did sign
        (so the refusal is its device's word, not a forger's), else None."""
        try:
            _, device, kind = messages.parse_topic(topic)
            if kind != "bench" or verify_published(self.keyring, topic, payload) is not None:
                return None
            msg_id = messages.decode(payload).get("msg_id")
        except Exception:  # noqa: BLE001 - not even a signed message: nothing to say about it
            return None
        return (device, msg_id) if isinstance(msg_id, str) else None

    def __enter__(self) -> FleetClient:
        b = self.broker
        try:
            self.client.connect(b.host, b.port, keepalive=30)
        except OSError as exc:
            raise broker_unreachable(b, exc) from None
        self.client.loop_start()
        if not self._connected.wait(CONNECT_TIMEOUT_S) or self._refused:
            self.close()
            raise AgentError(f"the MQTT broker at {b.host}:{b.port} did not accept the connection "
                             f"({self._refused or 'timeout'}); check broker credentials in the fleet file")
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()

    def send(self, device: str, name: str, args: dict[str, Any] | None = None, expires: float | None = None) -> str:
        """Publish a command to ``device``; return its id (what the ack's ``cmd_id`` will be).

        ``expires`` (unix time): the agent refuses the command when it would run later than that
        (default: in :data:`COMMAND_TTL_S`). The command is signed with the operator key.

        Raises:
            DeviceRevoked: ``device``'s key was revoked and none registered since (its answers would be refused):
                nothing is sent; the text says when and how to readmit it.
            CommandError: the command or its arguments break the spec the agent enforces; nothing is sent.
            PayloadTooLarge: the signed command is over the protocol's payload limit (the agent would refuse it, and
                the broker cut this client off at every reconnect); nothing is sent.
            ConfigError: the key registry or the revoked list cannot be read (and never could be by this client).
        """
        entry = self.revoked(device) if self.revoked is not None else None
        if entry is not None:
            raise DeviceRevoked.of(device, entry, name)
        msg = commands.command(self.fleet, device, name, args,
                               expires=expires if expires is not None else time.time() + COMMAND_TTL_S)
        self.signer.sign(msg)
        payload = messages.encode_within_limit(msg, f"{device}: the {name} command", "shorten its arguments")
        with self._cond:
            self.sent[msg["msg_id"]] = device
        self.client.publish(messages.topic(self.fleet, device, "cmd"), payload, qos=1)
        return msg["msg_id"]

    def publish_desired(self, desired: Desired, device: str) -> dict[str, Any]:
        """Publish ``desired`` as ``device``'s desired state (signed, retained: the device takes it on
        its next connect if it is offline now); return the message sent.

        Raises:
            PayloadTooLarge: the signed desired state is over the protocol's payload limit; nothing is sent.
        """
        msg = self.signer.sign(messages.envelope("desired", self.fleet, device, 0, desired.body()))
        payload = messages.encode_within_limit(msg, f"{device}: the desired state of rollout {desired.rollout[:60]}",
                                               "shorten the rollout id, store URL or model name")
        self.client.publish(messages.topic(self.fleet, device, "desired"), payload, qos=1, retain=True)
        return msg

    def wait_ack(self, cmd_id: str, timeout: float) -> dict[str, Any] | None:
        """Return the ack of ``cmd_id``, or None when none came within ``timeout`` seconds."""
        with self._cond:
            self._cond.wait_for(lambda: cmd_id in self.acks, timeout)
            return self.acks.get(cmd_id)

    def wait_record(self, device: str, msg_id: str, timeout: float) -> dict[str, Any] | None:
        """Return the bench record ``msg_id`` that ``device`` published, or None when it did not come within
        ``timeout`` seconds or came signed by it and was refused (then :attr:`refused_records` says why under
        ``(device, msg_id)``). A record of another device with that id is not ``device``'s: never returned."""
        key = (device, msg_id)
        with self._cond:
            self._cond.wait_for(lambda: key in self.records or key in self.refused_records, timeout)
            return self.records.get(key)

    def statuses(self) -> list[dict[str, Any]]:
        """Return every status message received so far, oldest first."""
        with self._cond:
            return [m for msgs in self.status.values() for _, m in msgs]

    def retained_statuses(self, devices: list[str], quiet_s: float = RETAINED_QUIET_S,
                          timeout: float = RETAINED_WAIT_S) -> dict[str, dict[str, Any]]:
        """Return the status the broker holds retained for each device that has one, as verified on arrival
        (a forged or misaddressed one is refused and counted in :attr:`rejected_count`, never returned).

        The broker holds what each agent said last: ``online`` when it connected, ``offline`` when it
        stopped cleanly, and its signed last will (``offline``) when its connection died. The broker
        sends them right after the subscription; this waits until every device in ``devices`` has
        one, or none arrived for ``quiet_s``, at most ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            self._retained_at = max(self._retained_at, time.monotonic())  # the quiet time counts from now at the earliest
            while not set(devices) <= set(self.retained):
                now = time.monotonic()
                left = min(deadline, self._retained_at + quiet_s) - now
                if left <= 0:
                    break
                self._cond.wait(left)
            return {d: m for d, m in self.retained.items() if d in devices}

    def retained_reports(self, devices: list[str]) -> dict[str, dict[str, Any]]:
        """Return the ``reported`` state the broker held retained for each device of ``devices`` that has one, as
        verified on arrival (a forged or misaddressed one is refused and counted in :attr:`rejected_count`, never
        returned): for a client subscribed to ``reported`` before ``status``, all of them have come once
        :meth:`retained_statuses` returns (the broker sends each subscription's retained messages in turn). Raises
        nothing."""
        with self._cond:
            return {d: m for d, m in self.retained_reported.items() if d in devices}

    def wait_online(self, device: str, since: float, timeout: float) -> dict[str, Any] | None:
        """Return the first ``online`` status of ``device`` received after ``since`` (host clock) that is newer than
        every status received before it (a higher ``seq`` in its ``epoch``, a later ``started``, or an epoch none of
        them carried: a new start, not a replay of an old one, which anyone holding the device's broker password could
        publish), or None. An agent that was running when its device lost power numbers in a new epoch from 1, and a
        device without a real-time clock may start it on an older time: its epoch is what tells. A replayed status of
        an epoch this client never saw passes too; the commands sent next then go unanswered, as to any agent
        offline."""
        def fresh() -> dict[str, Any] | None:
            before = [p for p in self._status_peaks.get(device, ()) if p[0] < since]
            tops: dict[str | None, int] = {}
            for _, epoch, seq, _started_at in before:
                tops[epoch] = max(seq, tops.get(epoch, seq))
            started = before[-1][3] if before else float("-inf")

            def new(m: dict[str, Any]) -> bool:
                epoch = messages.message_epoch(m)
                if epoch is not None and epoch not in tops:
                    return True
                return m["seq"] > tops.get(epoch, max(tops.values(), default=-1)) or _started(m) > started

            return next((m for t, m in self.status.get(device, []) if t >= since and m.get("state") == "online"
                         and new(m)), None)

        with self._cond:
            self._cond.wait_for(lambda: fresh() is not None, timeout)
            return fresh()

    def request(self, device: str, name: str, args: dict[str, Any] | None = None, timeout: float = 60.0,
                expire: bool = False) -> dict[str, Any]:
        """Send a command and return its successful ack (for ``bench``, with the record as ``record``).

        ``expire`` makes the command void once ``timeout`` has passed, so it never runs after the
        caller has given up (for switches such as ``activate``).

        Raises:
            AgentTimeout: no ack (or record) within ``timeout``; the device is named.
            AgentError: the agent refused it (its reason is given), or its ``bench`` ack names no record (no text
                ``bench_msg_id``), or a record that device signed but the checks refuse.
            DeviceRevoked: ``device``'s key was revoked (:meth:`send`): nothing sent, nothing waited for.
        """
        deadline = time.monotonic() + timeout
        ack = self.wait_ack(self.send(device, name, args, time.time() + timeout if expire else None), timeout)
        if ack is None:
            raise AgentTimeout(f"{device}: no answer to '{name}' within {timeout:.0f} s; is its agent running "
                             f"and connected to {self.broker.host}:{self.broker.port}?")
        if not ack["ok"]:
            raise AgentError(f"{device}: {name} refused: {ack['error']}")
        if name == "bench":
            mid = ack["result"].get("bench_msg_id")
            if not isinstance(mid, str):
                raise AgentError(f"{device}: its answer to 'bench' names no record (bench_msg_id is "
                                 f"{type(mid).__name__}, not text); check that the device runs edge-kit's agent")
            record = self.wait_record(device, mid, max(1.0, deadline - time.monotonic()))
            if record is None:
                with self._cond:
                    refused = self.refused_records.get((device, mid))
                if refused is not None:
                    raise AgentError(f"{device}: its bench record was refused: {refused}; check that the device runs "
                                     "edge-kit's agent (edgekit deploy installs it) and that its sensors work")
                raise AgentTimeout(f"{device}: the bench record announced in the ack did not arrive within {timeout:.0f} s")
            ack = {**ack, "record": record}
        return ack


def broker_statuses(fleet: Any) -> tuple[dict[str, dict[str, Any]] | None, dict[str, dict[str, Any]], str]:
    """Return the status each device of ``fleet`` left retained on its broker (verified as that device's;
    see :meth:`FleetClient.retained_statuses`; one a revoked device left, its last will, is ignored and counted in the
    line), or None when the broker was not asked (no device key
    registered yet) or could not be reached (then the states come from the history); the ``reported`` state each
    device's agent left retained there (pull rollouts: :meth:`FleetClient.retained_reports`, verified the same way;
    empty when the broker was not asked or reached); and one line saying which: the broker, with how many retained
    messages were refused (forged, or not signed by the device their topic names), or why it was not asked or
    reached.

    Raises:
        ConfigError: the broker password file or the fleet's keys cannot be read.
    """
    keys = fleet.key_store()
    if not keys.devices():
        return None, {}, f"broker not asked: no device key is registered in {keys.registry} yet (deploy first)"
    names = [d.name for d in fleet.devices]
    try:
        # reported first: the broker sends each subscription's retained messages in turn, so they are all in
        # once every status is
        with FleetClient.of(fleet, kinds=("reported", "status")) as client:
            found = client.retained_statuses(names)
            reported = client.retained_reports(names)
            refused, left = client.rejected_count, client.left_by_revoked
    except AgentError as exc:
        return None, {}, f"broker not reached: {exc}"
    return found, reported, (f"broker {fleet.broker.host}:{fleet.broker.port}: {len(found)} retained status(es) and "
                             f"{len(reported)} retained reported state(s), verified"
                             + (f"; {refused} refused (not signed by the device its topic names)" if refused else "")
                             + (f"; {left} left by revoked devices, ignored (their last will)" if left else ""))


CLEAR_TIMEOUT_S = 10.0  # the broker's acknowledgement of the clears, at most


def clear_retained(fleet: Any, device: str, *, transport: Any = None) -> str:
    """Clear what ``fleet``'s broker keeps retained for ``device`` (its ``status`` and ``reported``, the operator's
    ``desired`` for it): publish an empty retained payload on each topic, as MQTT clears a retained message, with the
    operator's credentials, and wait for the broker to acknowledge each (QoS 1). For ``edgekit fleet revoke``: what a
    revoked device left there would be sent, and refused, to every receiver that subscribes.

    Returns:
        One line saying what was cleared, and where.

    Raises:
        AgentError: the broker cannot be reached, refuses the connection, or did not acknowledge the clears within
            :data:`CLEAR_TIMEOUT_S` (names it).
        ConfigError: the broker password file or the fleet's keys cannot be read.
    """
    b = fleet.broker
    with FleetClient.of(fleet, kinds=(), transport=transport) as client:
        deadline = time.monotonic() + CLEAR_TIMEOUT_S
        try:
            sent = [client.client.publish(messages.topic(fleet.fleet, device, kind), b"", qos=1, retain=True)
                    for kind in messages.RETAINED_KINDS]
            for info in sent:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            done = all(info.is_published() for info in sent)
        except (RuntimeError, ValueError) as exc:  # paho: the connection dropped, or its queue is full
            raise AgentError(f"the MQTT broker at {b.host}:{b.port} took no clear of {device}'s retained messages "
                             f"({exc}); check that it runs") from None
        if not done:
            raise AgentError(f"the MQTT broker at {b.host}:{b.port} did not acknowledge the clears of {device}'s "
                             f"retained messages within {CLEAR_TIMEOUT_S:.0f} s; check that it runs")
    kinds = messages.RETAINED_KINDS
    return (f"its retained {', '.join(kinds[:-1])} and {kinds[-1]} messages cleared on the broker "
            f"{b.host}:{b.port}")
