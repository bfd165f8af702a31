"""`edgekit-agent run`: the long-running service on each device.

Threads: paho's network loop (receives commands, checks them, acks bad ones at once), the spooled
publisher (moves records to the broker), and the main thread, which runs accepted commands one at
a time (benchmarks must not overlap) and sends telemetry every ``telemetry_interval_s``, with, while
the serving API serves a model, its ``live`` figures and (when there are new ones) its ``shadow``
comparison, each on its own topic.

Everything the agent says is spooled first (see :mod:`device_agents.spool`) except its retained
``status``, which is re-sent on every connect and replaced by the broker with the last will
(``state: offline``) if the agent disappears.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import logging.handlers
import os
import queue
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import edgekit_protocol
from device_agents import codecheck, conditions
from device_agents.bench import bench_in_child
from device_agents.disk import Disk, atomic_write, is_out_of_space, read_json
from device_agents.errors import (
    NO_ACTIVE_MODEL,
    AcceleratorBusy,
    BenchFailed,
    CodeTampered,
    DeviceError,
    DiskFull,
    SmokeFailed,
    SmokeTimedOut,
    SpoolUnavailable,
    Unsignable,
)
from device_agents.identity import (
    OPERATOR,
    Keyring,
    Signer,
    decode_key,
    encode_key,
    key_id,
    provisioned_at,
    read_operators,
)
from device_agents.mqtt import (
    SpooledPublisher,
    agent_client_id,
    drop_session,
    make_client,
)
from device_agents.power import SensorEnv, SensorMeter, power_meter
from device_agents.reconcile import Reconciler
from device_agents.runtimes import RUNTIMES, prepare_installed
from device_agents.serving.client import SOCKET
from device_agents.serving.server import Interpreters, Server
from device_agents.smoke import SmokePool
from device_agents.spool import Spool
from device_agents.store import ModelStore, StoreError, default_root
from device_agents.targets import TARGETS, accelerator_missing
from device_agents.targets.edgetpu import TURN_WAIT_S, EdgeTpu, turn
from edgekit_protocol import messages
from edgekit_protocol.commands import MAX_TTL_S, Command, CommandError, parse_command
from edgekit_protocol.config import AgentConfig
from edgekit_protocol.desired import MAX_ERROR_CHARS
from edgekit_protocol.errors import EdgeKitError, MessageError, PayloadTooLarge
from edgekit_protocol.labels import clip

log = logging.getLogger("edgekit.agent")
WRITES = ("install", "activate", "rollback", "bench", "operators")  # commands that write a model, a link or a record
# may run for minutes (a TensorRT engine is built at install; a shadow model loads in its child for up to
# 120 s; a benchmark runs in its watched child up to bench.total_timeout_s): the telemetry beat goes on meanwhile
LONG = ("install", "shadow", "bench")
# How long an activation (a command or a desired state, on the main thread: no telemetry, no other command meanwhile)
# waits for `edgekit-agent activate`'s turn on the Edge TPU (a smoke check takes seconds), then answers it busy; a
# bench, in its worker thread, waits as long as that activate would (TURN_WAIT_S).
ACTIVATE_TURN_WAIT_S = 30.0
# The log file (``--log-file``, what the supervisor's agent writes) is cut at this size and one older part kept:
# every refused command is a line, and a flood of them on the broker must not fill the device's storage.
LOG_MAX_BYTES = 5_000_000
# A retained ``reported`` body that could not be signed or handed to the broker connection is published again by the
# main loop this often until it goes out (and on every connect): `rollout status` reads the newest one.
REPORT_RETRY_S = 1.0


def _until(wait_s: float, expires: float | None) -> float:
    """Return the seconds to wait for an Edge TPU turn: ``wait_s``, less what is left before a command's ``expires``
    (unix time; None: no expiry), never below 0."""
    return wait_s if expires is None else max(0.0, min(wait_s, expires - time.time()))


class Agent:
    """One device's agent. ``run()`` blocks until ``stop()`` (or SIGTERM/SIGINT)."""

    def __init__(self, cfg: AgentConfig):
        """Set up the agent of ``cfg`` (its store, key, spool, broker client); nothing runs before :meth:`run`.

        Raises:
            SpoolUnavailable: the spool cannot be opened (locked, read-only, a full disk, I/O errors); a damaged one is
                moved aside and a new one started instead.
        """
        self.cfg = cfg
        self.store = ModelStore(cfg.root or default_root())
        self.store.ensure()
        self.identity = self.store.root / "identity"
        self.signer, created = Signer.load_or_create(self.identity / "device.key")
        if created or not (self.identity / "device.pub").exists():  # what the operator registers
            (self.identity / "device.pub").write_text(encode_key(self.signer.public) + "\n")
        if created:  # an agent started by hand, not by a deploy: its key is not registered yet
            log.warning("created device key %s; register %s with the operator", self.signer.key_id,
                        self.identity / "device.pub")
        self.disk = Disk(self.store.root, reserve_bytes=int(cfg.store.reserve_mb * 1e6),
                         min_free_bytes=int(cfg.store.min_free_mb * 1e6))
        self.disk.refresh()  # the reserve that lets the agent answer "disk full" when the disk is full
        try:
            self.spool = Spool(self.store.root / "spool.db", cfg.spool_max_records,
                               horizon_floor=provisioned_at(self.identity))
        except sqlite3.OperationalError as exc:  # not damage (that is moved aside): said in one line, started again
            raise SpoolUnavailable(f"{self.store.root / 'spool.db'}: the spool cannot be opened ({exc}); kept as it is, "
                                   "tried again at the agent's next start: free space on its disk, check the card "
                                   "(dmesg: I/O errors, a read-only mount) or stop what holds it; moving it aside "
                                   "starts a new spool (its unsent records stay in it)") from exc
        # A persistent session: commands sent while the agent reconnects wait for it on the broker.
        # A persistent session, and the broker hears that a command arrived only once it is on disk.
        password = cfg.password()
        self.client = make_client(cfg.broker, agent_client_id(cfg.fleet, cfg.device, password), password=password,
                                  clean=False, manual_ack=True)
        self.publisher = SpooledPublisher(self.client, self.spool)
        self.smoke = SmokePool()
        self._smoked: set[tuple[Any, ...]] = set()  # (sha256, runtime, delegate, options) that passed it, for bench
        self.reconciler = Reconciler(self.store.root, self.store, activate=self._activate, report=self._report,
                                     check_disk=lambda needs: self.disk.check("fetch", needs), settings=cfg.pull,
                                     threads=cfg.bench.threads)
        self._desired_inbox: queue.Queue[Any] = queue.Queue()  # verified desired messages, taken by the main thread
        self._report_again = threading.Event()
        # held from a reported message's seq taken to its seq kept: two threads reporting at once (a reconcile
        # step, a redelivered desired state, a retry) would otherwise publish two messages under one seq
        self._report_lock = threading.Lock()
        self._report_retry_at: float | None = None  # monotonic time the newest reported body is tried again at
        self._report_error: str | None = None  # why the last try to publish it failed (logged once per reason)
        self.commands: queue.Queue[Command] = queue.Queue(maxsize=cfg.max_queued_commands)
        self._stop = threading.Event()
        self._unservable: str | None = None  # a current model the serving API could not load (logged once)
        self._untaken: list[Any] = []  # commands a full disk kept from being taken: taken when space returns
        self.dropped_on_full_disk = 0  # telemetry, live and shadow messages not written for lack of space (the spool counts the rest)
        self._shadow_sent: tuple[Any, ...] | None = None  # the counts of the last shadow comparison spooled
        self._announced: str | None = None  # the current model as the last status said
        self.started = time.time()
        self._next_telemetry = time.monotonic() + cfg.telemetry_interval_s
        p = cfg.power
        self._meter_args = dict(keys=p.sensors, env=SensorEnv(p.sys_root, p.vcgencmd), idle_w=p.idle_w,
                                busy_w=p.busy_w, cores=p.cores, profile=cfg.profile or "?")
        probe = power_meter(**self._meter_args)
        self.power_source = (probe.sensor.description if isinstance(probe, SensorMeter)
                             else "estimated from profile idle/busy watts and CPU use" if probe else "none")
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self._unreachable = False  # the broker could not be reached since the last connection (logged once)
        # the session an agent before agent_client_id kept under its plain id: dropped once this run is connected
        self._former_id = agent_client_id(cfg.fleet, cfg.device, None) if password is not None else None
        self.client.on_message = self._on_message
        self.client.on_publish = self.publisher.on_publish
        self._will(self.client)
        s, b = cfg.serve, cfg.bench
        self.server = Server(s.socket or self.store.root / SOCKET,  # a picklable factory: shadow runs build theirs in a child
                             make_interpreter=Interpreters(b.runtime, b.threads, b.delegate, b.delegate_options),
                             max_clients=s.max_clients, max_payload=int(s.max_payload_mb * 1e6),
                             workers=s.workers, http_port=s.http_port, http_max_clients=s.http_max_clients,
                             http_max_body=int(s.http_max_body_mb * 1e6), request_timeout_s=s.request_timeout_s,
                             http_header_timeout_s=s.http_header_timeout_s, send_timeout_s=s.send_timeout_s,
                             busy_poll_us=s.busy_poll_us) if s.enabled else None

    # --- messages -----------------------------------------------------------------------------

    def _topic(self, kind: str) -> str:
        return messages.topic(self.cfg.fleet, self.cfg.device, kind)

    def _model_ref(self, sha: str | None) -> dict[str, Any] | None:
        meta = self.store.describe(sha)
        if meta is None:
            return None
        return {k: meta[k] for k in ("sha256", "variant", "model", "damaged") if k in meta}

    def _will(self, client: Any) -> None:
        """Set the last will of the next connection, under a new connection id; return nothing.

        The will is signed now, so its ``current`` is the model at connect time; every status of that
        connection carries the same ``connection``, so a host receiving the will after a switch takes
        ``current`` from the connection's newest status instead (the history's ``latest_status``)."""
        self._connection = os.urandom(6).hex()
        client.will_set(self._topic("status"), self._status_payload("offline"), qos=1, retain=True)

    def _status(self, state: str, short: bool = False) -> dict[str, Any]:
        """Return the signed status message ``state`` (``online``, ``offline``), noting the model and disk state it
        announces. ``short``: the current model by its sha256 alone (variant null) and each runtime as ``available``
        or ``unavailable``, without the texts of unbounded length (:meth:`_status_payload`)."""
        self._announced = self.store.current()
        self._announced_full = self.disk.full
        runtimes = {k: (cls.unavailable_reason() or "available") for k, cls in RUNTIMES.items()}
        for target in TARGETS.values():  # an accelerator's own variant (edgetpu) needs its delegate here, loadable
            if target.compiled_variant:
                runtimes[target.key] = self._accelerator_missing(target.compiled_variant) or "available"
        current = self._model_ref(self.store.current())
        if short:
            runtimes = {k: "available" if v == "available" else "unavailable" for k, v in runtimes.items()}
            current = current and {"sha256": current.get("sha256"), "variant": None}
        return self.signer.sign(messages.envelope("status", self.cfg.fleet, self.cfg.device, self.spool.next_seq("status"), epoch=self.spool.epoch, body={
            "state": state, "agent_version": edgekit_protocol.__version__, "profile": self.cfg.profile,
            "current": current, "runtimes": runtimes,
            "power_source": self.power_source, "simulated": self.cfg.simulated, "pid": os.getpid(),
            "started": self.started, "disk": self.disk.usage(), "connection": self._connection}))

    def _accelerator_missing(self, variant: str) -> str | None:
        """Return :func:`~device_agents.targets.accelerator_missing` of ``variant`` with the agent's delegate and
        options. Its probe may open the Edge TPU, so it runs in the agent's turn on it
        (:func:`~device_agents.targets.edgetpu.turn`): while another process's check or bench holds that turn (its
        child could find the Edge TPU busy), the Edge TPU is taken as attached (None), as a busy one is. A turn file
        that does not open: asked without the turn. Never raises what the turn raises."""
        b = self.cfg.bench
        try:
            with turn(self.store.root) if b.delegate == EdgeTpu.key else contextlib.nullcontext():
                return accelerator_missing(variant, b.delegate, b.delegate_options)
        except AcceleratorBusy:
            return None
        except DeviceError:
            return accelerator_missing(variant, b.delegate, b.delegate_options)

    def _status_payload(self, state: str) -> bytes:
        """Return the payload of the status ``state`` (the retained status and the last will), within the protocol's
        payload limit. One over it (a model's metadata or a runtime's reason of many kilobytes, as an older agent's
        store may hold) would make the broker cut the agent off at every connect: it is counted and logged
        (:meth:`_count_refused`) and the short status sent instead (:meth:`_status`), so the device still says it is
        online and which model it runs.

        Raises:
            PayloadTooLarge: not even the short status is within the limit (its fields are bounded: never met).
        """
        try:
            return messages.encode_within_limit(self._status(state), "a status message")
        except PayloadTooLarge as exc:
            self._count_refused("oversize", exc)
        return messages.encode_within_limit(self._status(state, short=True), "a short status message")

    def _report(self, body: dict[str, Any]) -> None:
        """Publish a ``reported`` body, signed and retained (the newest is what the operator reads); returns nothing.

        Never raises (it runs inside a reconcile step, after the switch it reports): when the body cannot be signed
        or handed to the broker connection, the failure is counted (``unsent_reports`` in the spool's counters:
        ``state`` and telemetry), logged in one line (once per reason), and :meth:`_report_when_due` publishes the
        newest reported body again :data:`REPORT_RETRY_S` later, until it goes out. Its ``seq`` is taken only once it
        went out (:meth:`Spool.upcoming_seq`), so failed tries leave no gap in the ``reported`` sequence; any thread may
        call it: taking the seq, publishing and keeping the seq happen under one lock, so two reports never go out
        under one seq. A body over the protocol's payload limit is not published (every receiver and the broker refuse
        it) nor tried again: counted as ``oversize_messages`` and logged (:meth:`_count_refused`). A simulated
        device's (``simulated: true`` in its config, as ``edgekit sim`` writes it) says ``"simulated": true``, as
        its status and bench records do.
        """
        if self.cfg.simulated:  # a device of `edgekit sim`: what the rollout shows of it did not run on its hardware
            body = {**body, "simulated": True}
        with self._report_lock:
            try:
                seq = self.spool.upcoming_seq("reported")  # taken once it went out: a failed try leaves no gap
                msg = self.signer.sign(messages.envelope("reported", self.cfg.fleet, self.cfg.device, seq, body,
                                                                   epoch=self.spool.epoch))
                payload = messages.encode_within_limit(msg, "a reported message")
                self.publisher.publish(self._topic("reported"), payload, retain=True)
                self.spool.took_seq("reported", seq)
            except PayloadTooLarge as exc:  # would never go out: counted, not tried again until a connect or a new body
                self._count_refused("oversize", exc)
                self._report_retry_at, self._report_error = None, None
                return
            except Exception as exc:  # noqa: BLE001 - the state is kept and sent again, never dropped with the step
                self._report_retry_at = time.monotonic() + REPORT_RETRY_S
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                try:
                    self._on_disk(lambda: self.spool.count("unsent_reports"))
                except (DiskFull, OSError, sqlite3.Error) as full:
                    log.error("could not count the unsent reported state: %s", full)
                if why != self._report_error:
                    log.error("reported state %s of revision %s could not be published (%s); it is tried again every "
                              "%g s until it goes out", body.get("state"), body.get("revision"), why, REPORT_RETRY_S)
                self._report_error = why
                return
            if self._report_error is not None:
                log.info("reported state %s of revision %s published after failed tries", body.get("state"),
                         body.get("revision"))
            self._report_retry_at, self._report_error = None, None

    def _report_when_due(self) -> None:
        """Publish the newest reported body again after a (re)connect, or once a failed try's
        :data:`REPORT_RETRY_S` have passed; returns nothing (a failure is :meth:`_report`'s to count)."""
        retry = self._report_retry_at is not None and time.monotonic() >= self._report_retry_at
        if (self._report_again.is_set() or retry) and self.reconciler.last is not None:
            self._report_again.clear()
            self._report_retry_at = None
            self._report(self.reconciler.last)

    def emit(self, kind: str, body: dict[str, Any], answers: str | None = None) -> dict[str, Any] | None:
        """Spool one message of ``kind`` (signed) and wake the publisher; ``answers``: the taken command
        it answers, which leaves the inbox in the same transaction.

        Returns:
            The message, or None when it was of a droppable kind (telemetry, live, shadow) dropped because
            the spool is full.

        Raises:
            DiskFull: it could not be written even after the reserve was freed.
            PayloadTooLarge: it would be over the protocol's payload limit (counted as ``oversize_messages``, not
                spooled); an answer (``cmd/ack``) is then sent as a refusal saying so instead.
            Unsignable: it holds a NaN, an infinity or a value with no JSON form, which cannot be signed (counted as
                ``unsignable_messages`` and logged by :meth:`_count_refused`, not spooled); a successful answer
                (``cmd/ack``) is then sent as a refusal saying so instead.
        """
        built: dict[str, Any] = {}

        def build(seq: int) -> bytes:
            # raised inside the spool's transaction: its seq is not taken
            try:
                built.update(self.signer.sign(messages.envelope(kind, self.cfg.fleet, self.cfg.device, seq, body,
                                                                       epoch=self.spool.epoch)))
                return messages.encode_within_limit(built, f"a {kind} message")
            except PayloadTooLarge:
                raise
            except (ValueError, TypeError) as exc:  # the canonical form: a NaN or an infinity has no JSON form
                raise Unsignable(f"a {kind} message holds a NaN, an infinity or a value with no JSON form ({exc}), "
                                 "which no signed message can carry: not sent") from exc

        try:
            row, _ = self._on_disk(lambda: self.spool.add(kind, self._topic(kind), build, answers=answers))
        except PayloadTooLarge as exc:
            self._count_refused("oversize", exc)
            if kind != "cmd/ack" or body.get("error") == str(exc):
                raise
            # the command still gets its answer: that it had one too large to send
            return self.emit(kind, {**body, "ok": False, "error": str(exc), "result": {}}, answers)
        except Unsignable as exc:
            self._count_refused("unsignable", exc)
            if kind != "cmd/ack" or not body.get("ok"):
                raise
            # the command still gets its answer: that it had one that could not be signed
            return self.emit(kind, {**body, "ok": False, "error": "the answer holds a NaN, an infinity or a value with no JSON "
                                    f"form ({exc.__cause__}), which no signed message can carry: not sent", "result": {}},
                             answers)
        self.publisher.wake()
        return built if row is not None else None

    def _count_refused(self, counter: str, exc: Exception) -> None:
        """Count one message refused before it was spooled under the spool's ``counter`` (``oversize``: over the
        protocol's payload limit, shown as ``oversize_messages``; ``unsignable``: impossible to sign, shown as
        ``unsignable_messages``) and log ``exc`` in one line; returns nothing, never raises (a count a full disk keeps
        back is held by the spool until it can be written)."""
        try:  # not through _on_disk, whose second try would count it again
            self.spool.count(counter)
        except (OSError, sqlite3.Error) as full:
            log.warning("the %s message's count is not on disk yet: %s", counter, full)
        log.error("%s", exc)

    def _on_disk(self, write: Any) -> Any:
        """Return ``write()``; when it fails for lack of space, free the reserve and try once more.

        Raises:
            DiskFull: the second try failed too (the text says how much is free).
        """
        try:
            return write()
        except (OSError, sqlite3.OperationalError) as exc:
            if not is_out_of_space(exc):
                raise
            self.disk.release()
        try:
            return write()
        except (OSError, sqlite3.OperationalError) as exc:
            if not is_out_of_space(exc):
                raise
            raise DiskFull(f"disk full under {self.store.root}: not even the reserve made room ({exc})") from None

    def operators(self) -> Keyring:
        """Return the operator keys pinned on this device (re-read, so a deploy's update applies at once).

        Raises:
            ConfigError: none pinned (the device was never deployed to): every command is refused.
        """
        return Keyring(operators=read_operators(self.identity / "operators.json"))

    def refuse(self, why: str) -> None:
        """Count and log a command that is not the operator's (unsigned, forged, from the future, garbage).

        It gets no answer: a signed ack to unauthenticated input would let anyone make this device
        vouch for a ``cmd_id`` of their choosing.
        """
        try:
            self._on_disk(lambda: self.spool.count("refused"))
        except DiskFull:
            pass  # the refusal is logged; the count waits for space
        log.warning("refused a command: %s", why)

    def ack(self, cmd_id: str | None, name: str | None, ok: bool, *, error: str | None = None,
            result: dict[str, Any] | None = None) -> None:
        """Answer a command on ``cmd/ack``; returns nothing. ``error`` is cut to
        :data:`~edgekit_protocol.desired.MAX_ERROR_CHARS` (and how long it was): a runtime's or a model's text may
        be of any length, and an answer over the payload limit would say only that, not why the command failed.

        Never raises: an answer that cannot be written even after the reserve is freed is logged, and
        the command stays taken, so the next start answers it ("interrupted").
        """
        try:
            self.emit("cmd/ack", {"cmd_id": cmd_id, "command": name, "ok": ok,
                                  "error": clip(error, MAX_ERROR_CHARS) if error is not None else None,
                                  "result": result or {}}, answers=cmd_id)
        except DiskFull as exc:
            log.error("could not answer %s %s: %s", name, cmd_id, exc)

    # --- paho callbacks (network thread) -------------------------------------------------------

    def _on_connect(self, client: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.error("broker %s:%s refused the connection: %s", self.cfg.broker.host, self.cfg.broker.port, reason)
            return
        client.subscribe([(self._topic("cmd"), 1), (self._topic("desired"), 1)])
        self.publisher.publish(self._topic("status"), self._status_payload("online"), retain=True)
        self.reconciler.on_connect()
        self._report_again.set()  # where this device stands, again (the broker may have lost it): main thread
        self.publisher.connected.set()
        self.publisher.wake()
        self._unreachable = False
        log.info("connected to %s:%s", self.cfg.broker.host, self.cfg.broker.port)
        if self._former_id is not None:
            threading.Thread(target=self._drop_former_session, args=(self._former_id,), daemon=True,
                             name="drop-former-session").start()
            self._former_id = None

    def _drop_former_session(self, former: str) -> None:
        """Drop the persistent session the broker kept under ``former``, the client id an older agent connected with
        (:func:`~device_agents.mqtt.drop_session`): nothing reads it any more, and the broker would queue every command
        and desired state sent to this device in it for ever. Tried again at the next connect when the broker did not
        take it; returns nothing, never raises."""
        if drop_session(self.cfg.broker, former, self.cfg.password()):
            log.info("dropped the broker session of %s, the client id of an older agent", former)
        else:
            self._former_id = former

    def _on_connect_fail(self, _client: Any, _u: Any) -> None:
        """Log, once until a connection succeeds, that the broker cannot be reached (paho retries): an
        agent with a wrong broker address or port said nothing at all."""
        if not self._unreachable and not self._stop.is_set():
            self._unreachable = True
            b = self.cfg.broker
            log.warning("cannot reach the broker at %s:%s (check broker.host and broker.port in agent.yaml); "
                        "retrying, records stay in the spool, the serving API serves meanwhile", b.host, b.port)

    def _on_disconnect(self, client: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self.publisher.connected.clear()
        self._will(client)  # a fresh one for the next connection: a will reused would be one msg_id, stored once
        if not self._stop.is_set():
            log.warning("disconnected from the broker (%s); records stay in the spool", reason)

    def _on_message(self, client: Any, _u: Any, message: Any) -> None:
        if message.topic == self._topic("desired"):
            self._on_desired(client, message)
            return
        try:
            self._take(message.payload)
        except DiskFull as exc:  # not on disk yet: held here (unacknowledged) and taken when space returns
            log.error("a command could not be taken (%s); it is taken when space returns", exc)
            self._untaken.append(message)
            return
        except Exception:  # noqa: BLE001 - nothing a message holds may stop the network thread
            log.exception("a command could not be taken; it was not run")
            self.refuse("could not be taken")
        client.ack(message.mid, message.qos)  # taken (on disk) or refused: now the broker may forget it

    def _take(self, payload: bytes, *, after_restart: bool = False) -> None:
        """Verify a command is the operator's, persist it as taken, and queue it.

        What is not the operator's is counted and left unanswered (:meth:`refuse`); an operator's
        command that cannot run (another device, a bad argument, expired) gets an error ack.
        """
        try:
            msg = messages.decode(payload, "cmd")
            self.operators().verify(msg, OPERATOR)
            messages.check_time(msg, time.time())
        except EdgeKitError as exc:  # garbage, unsigned, forged, altered, or from the future
            self.refuse(str(exc))
            if after_restart:  # taken before, refused now (the operator key changed, or damaged in the spool): never again
                self.spool.drop(payload)
            return
        if not after_restart:
            expires = msg.get("expires") if messages.in_range(msg.get("expires")) else msg["ts"] + MAX_TTL_S
            seen = self._on_disk(lambda: self.spool.take(msg["msg_id"], payload, msg["ts"], expires))
            if seen is not None:  # a redelivery or a replay of a command already taken, or long expired: never run
                self._on_disk(lambda: self.spool.count(seen))
                if seen == "expired":  # the operator's own signed command: safe to answer why not
                    self.ack(msg["msg_id"], msg.get("command") if isinstance(msg.get("command"), str) else None,
                             False, error="expired before the newest command's horizon (sent long before it); not run")
                return
        try:
            cmd = parse_command(payload, self.cfg.fleet, self.cfg.device)
            self.commands.put_nowait(cmd)
        except CommandError as exc:
            self.ack(msg["msg_id"], exc.name, False, error=str(exc))
        except queue.Full:
            self.ack(cmd.msg_id, cmd.name, False, error=f"busy: {self.commands.qsize()} commands queued; retry later")

    def _on_desired(self, client: Any, message: Any) -> None:
        """Check a desired state is the operator's and for this device, and hand it to the main thread,
        which acknowledges it to the broker once it is on disk; what is not is refused and counted. An empty payload
        is the retained state cleared (``edgekit fleet revoke`` does; a readmitted device's session is handed it as it
        reconnects): acknowledged, nothing to take, nothing refused. Returns nothing."""
        if messages.is_cleared(message.topic, message.payload):
            log.info("the retained desired state was cleared on the broker (fleet revoke); nothing to take")
            client.ack(message.mid, message.qos)
            return
        try:
            msg = messages.decode(message.payload, "desired")
            self.operators().verify(msg, OPERATOR)
            # No clock check: revisions order desired states (a device without a real-time clock, behind
            # until NTP syncs, would refuse every one), and a retained state is old by design.
            if (msg["fleet"], msg["device"]) != (self.cfg.fleet, self.cfg.device):
                raise EdgeKitError(f"desired state for {msg['fleet']}/{msg['device']} on this device's topic")
        except EdgeKitError as exc:
            self.refuse(f"desired: {exc}")
            client.ack(message.mid, message.qos)
            return
        self._desired_inbox.put((msg, message.mid, message.qos))

    def _take_desired(self) -> None:
        """Take the desired states the network thread verified (main thread), then let the broker forget them."""
        while not self._desired_inbox.empty():
            msg, mid, qos = self._desired_inbox.get()
            try:
                if self._on_disk(lambda: self.reconciler.take(msg)) == "stale":  # an old revision, replayed
                    self._on_disk(lambda: self.spool.count("stale_desired"))
            except DiskFull as exc:
                log.error("a desired state could not be taken (%s); it is taken when space returns", exc)
                self._desired_inbox.put((msg, mid, qos))
                return
            except EdgeKitError as exc:
                self.refuse(f"desired: {exc}")
            self.client.ack(mid, qos)

    def _retake(self) -> None:
        """Take the commands a full disk kept back (oldest first), then let the broker forget each."""
        while self._untaken:
            message = self._untaken[0]
            try:
                self._take(message.payload)
            except DiskFull:
                return
            except Exception:  # noqa: BLE001 - as in _on_message
                log.exception("a held command could not be taken; it was not run")
            self._untaken.pop(0)
            self.client.ack(message.mid, message.qos)

    # --- commands (main thread) ----------------------------------------------------------------

    def handle(self, cmd: Command) -> None:
        """Run one accepted command and ack it; a failure is an error ack, never a crash."""
        if cmd.expires is not None and time.time() > cmd.expires:
            self.ack(cmd.msg_id, cmd.name, False, error=f"expired {time.time() - cmd.expires:.1f} s before it could "
                                                        "run (the sender stopped waiting); not run")
            return
        try:
            if cmd.name in WRITES:  # refused before anything changes: never a switch that cannot be answered
                self.disk.check(cmd.name)
            # from here on, a crash answers it "interrupted" rather than running it again
            self._on_disk(lambda: self.spool.start(cmd.msg_id))
            result = getattr(self, f"_cmd_{cmd.name}")(cmd)
            if cmd.name in ("activate", "rollback") and self.server is not None:  # served before the answer
                self.follow_current()
                result["serving"] = self.server.current.ref() if self.server.current else None
        except EdgeKitError as exc:  # the one mapping on this boundary: an error ack
            self.ack(cmd.msg_id, cmd.name, False, error=str(exc))
        except Exception as exc:  # noqa: BLE001 - a command's surprise is its error ack, never the agent's end
            if is_out_of_space(exc):
                self.disk.release()
                self.ack(cmd.msg_id, cmd.name, False, error=f"disk full: {cmd.name} failed writing under "
                         f"{self.store.root} ({exc}); free space on the device or lower store.max_store_mb")
                return
            log.exception("command %s failed", cmd.name)
            self.ack(cmd.msg_id, cmd.name, False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        else:
            self.ack(cmd.msg_id, cmd.name, True, result=result)
        self.follow_current()  # the served model follows at once: new requests go to the new one
        if self.store.current() != self._announced:  # switched by the command, or over SSH meanwhile
            self._publish_status()

    def run_command(self, cmd: Command) -> None:
        """Run one command (:meth:`handle`); commands run one at a time, in order. One of :data:`LONG`
        runs in a worker thread while this thread keeps sending telemetry when it is due, so a device
        building a TensorRT engine for minutes, or benchmarking (in a child process: the telemetry's work is
        this process's, not the timed runs'), is not taken for a silent one. Returns once the command has ended:
        a telemetry round that fails meanwhile is logged, never a return while the worker still runs (the next command
        would run beside it)."""
        if cmd.name not in LONG:
            self.handle(cmd)
            return
        worker = threading.Thread(target=self.handle, args=(cmd,), daemon=True, name=f"command-{cmd.name}")
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
            try:
                self._telemetry_when_due()
            except Exception as exc:  # noqa: BLE001 - as the service loop does; the round is tried at the next interval
                log.error("telemetry during %s failed (%s: %s); the command goes on", cmd.name, type(exc).__name__, exc)

    def _telemetry_when_due(self) -> None:
        """Send telemetry if its interval has passed since the last."""
        if time.monotonic() >= self._next_telemetry:
            self._next_telemetry = time.monotonic() + self.cfg.telemetry_interval_s
            self.telemetry()

    def _cmd_bench(self, cmd: Command) -> dict[str, Any]:
        """Benchmark an installed model (:func:`device_agents.bench.bench_in_child`) and spool its record; return
        the ack's result.

        Raises:
            StoreError: not installed, damaged, or it failed its smoke inference. BenchFailed: the benchmark's child
                failed, crashed or was killed by its watchdog (the model's sha256, the step and the reason said).
            DataFileError: the eval set does not fit the model. RuntimeUnavailable: no runtime for it here.
            CommandError: its ``min_seconds`` is not below this agent's ``bench.total_timeout_s``.
            AcceleratorBusy: on the Edge TPU, `edgekit-agent activate`'s turn did not end within ``TURN_WAIT_S`` (or
                before the command expired: it is not run for nobody), or serving is paused for its child.
        """
        a = cmd.args
        overrides = {k: a[k] for k in ("warmup", "min_runs", "min_seconds", "threads") if k in a}
        try:  # the command's lengths are in bounds (parse_command); min_seconds may still pass this agent's total
            settings = dataclasses.replace(self.cfg.bench, **overrides)
        except ValueError as exc:
            raise CommandError(f"bench: {exc} (this device's agent.yaml bench.total_timeout_s); ask for fewer "
                               "min_seconds", cmd.msg_id, "bench") from None
        sha = self.store.resolve(sha256=a.get("sha256"), variant=a.get("variant"))
        path = self.store.verify(sha)
        settings = self._settings_for(sha, settings)  # the record names the delegate that ran it
        try:
            with self._accelerator_for_child(settings, f"bench of model {sha[:12]}", _until(TURN_WAIT_S, cmd.expires)):
                # a model that fails on zeros is named so, as at activation; stopping the agent ends that child too
                self._loads_in_child(path, sha, settings, cancel=self._stop)
                # in a child, watched: a model that loops or crashes on the eval samples costs the child, not the agent
                measured = bench_in_child(self.smoke, path, settings, eval_file=self.store.eval_path(sha),
                                          meter_args=self._meter_args, cancel=self._stop)
        except BenchFailed as exc:
            if exc.ended:  # a model that loops or crashes on real inputs: counted, as hostile input is
                try:
                    self._on_disk(lambda: self.spool.count("ended_benches"))
                except DiskFull as full:  # the answer goes out; only the count is lost
                    log.error("could not count the ended benchmark: %s", full)
            if exc.detail:  # a Python exception in the child: its traceback here (escaped, one line), not in the ack
                log.warning("bench of model %s: %s; the child's traceback: %s", sha[:12], exc, exc.detail.strip())
            goes_on = "" if self._stop.is_set() else ", the agent runs on"
            raise BenchFailed(f"bench of model {sha[:12]}: {exc}; nothing recorded{goes_on}") from None
        meta = self.store.describe(sha) or {}
        record = self.emit("bench", {
            "variant": meta.get("variant"), "sha256": sha, "model": meta.get("model"), "model_bytes": meta.get("bytes"),
            "profile": self.cfg.profile,
            "cmd_id": cmd.msg_id, "simulated": self.cfg.simulated, **measured})
        assert record is not None  # bench records are never dropped
        lat = measured["latency_ms"]
        return {"bench_msg_id": record["msg_id"], "variant": meta.get("variant"), "sha256": sha,
                "latency_p90_ms": lat["p90"], "runs": measured["runs"]}

    def _loads_in_child(self, path: Path, sha: str, settings: Any, cancel: threading.Event | None = None) -> None:
        """Check that model ``sha`` loads and runs once in a child process (the smoke check, with the
        runtime, delegate, options and threads of ``settings``) before this process loads it: a
        benchmarked candidate need not have been activated, a model switched over SSH was checked with
        that command's settings, and a damaged or hostile file that crashes the interpreter must crash
        the child, not the agent. A pass is remembered per model and settings for the agent's life. ``cancel``
        set (the agent is stopping) ends the child at once.

        Raises:
            AcceleratorUnavailable: the model is made for an accelerator this device lacks (an ``edgetpu`` variant
                without the Edge TPU's delegate): not run at all.
            StoreError: the smoke inference failed or crashed (the agent runs on; nothing was loaded), or was
                stopped by ``cancel``.
        """
        # not the model's failure: nothing to run it on; asked at every bench (an Edge TPU unplugged since)
        self.store.check_accelerator(sha, settings.delegate, settings.delegate_options)
        key = self._smoke_key(sha, settings)
        if key in self._smoked:
            return
        try:
            with self._accelerator_for_child(settings, f"smoke check of model {sha[:12]}"):
                self.smoke(path, runtime=settings.runtime, delegate=settings.delegate,
                           options=settings.delegate_options, threads=settings.threads, cancel=cancel)
        except SmokeFailed as exc:
            if isinstance(exc, SmokeTimedOut) and exc.how == "stopped":  # not the model's doing
                raise StoreError(f"model {sha[:12]}: its smoke inference was stopped: the agent is stopping") from None
            raise StoreError(f"model {sha[:12]} failed its smoke inference: {exc}; not loaded here") from None
        self._smoked.add(key)

    @contextlib.contextmanager
    def _accelerator_for_child(self, settings: Any, what: str, wait_s: float = 0.0) -> Iterator[None]:
        """Run the ``with`` block, where a child process (``what``) opens a model with ``settings``' delegate, with
        the serving API's interpreters closed when they hold that accelerator and it opens for one process at a time
        (:meth:`Server.paused_for`: an Edge TPU).
        Requests wait meanwhile, 20 s at most (``PAUSE_WAIT_S``, then told it is paused). On the Edge TPU it takes its
        turn first (:func:`~device_agents.targets.edgetpu.turn`, ``wait_s`` at most, less once the agent is stopping;
        serving not paused meanwhile), as
        `edgekit-agent activate` does: neither child finds it busy; within the same ``wait_s``, it then waits for that
        process's pause of serving to end (serving loads its model again after that turn). ``settings`` None: no child
        runs. Yields nothing; raises what the block raises.

        Raises:
            AcceleratorBusy: another process's turn (`edgekit-agent activate`) did not end within ``wait_s`` (``what``
                named), or serving is still paused for another process's child then, which holds that Edge TPU.
            DeviceError: the turn's file does not open (named).
        """
        if settings is None:
            yield
            return
        deadline = time.monotonic() + wait_s
        with contextlib.ExitStack() as held:
            if settings.delegate == EdgeTpu.key:
                try:
                    held.enter_context(turn(self.store.root, wait_s, cancel=self._stop))
                except AcceleratorBusy as exc:
                    raise AcceleratorBusy(f"{what}: {exc}") from None
            if self.server is not None:  # the pause of the process whose turn it waited for ends after that turn
                held.enter_context(self.server.paused_for(settings.delegate, settings.delegate_options,
                                                          f"the {what} opens the Edge TPU it holds (one process at a "
                                                          "time)", deadline - time.monotonic(), self._stop))
            yield

    def _settings_for(self, sha: str, settings: Any) -> Any:
        """Return ``settings`` (the agent's ``bench`` section, or a bench command's) with the delegate and options
        installed model ``sha`` runs with (:meth:`ModelStore.delegate_for`: a CPU variant on the CPU where the
        profile's delegate is the Edge TPU)."""
        delegate, options = self.store.delegate_for(sha, settings.delegate, settings.delegate_options)
        return dataclasses.replace(settings, delegate=delegate, delegate_options=options or {})

    @staticmethod
    def _smoke_key(sha: str, settings: Any) -> tuple[Any, ...]:
        return (sha, settings.runtime, settings.delegate, json.dumps(settings.delegate_options or {}, sort_keys=True),
                settings.threads)

    def _incoming(self, path: str) -> Path:
        """Return ``path`` when it names a file under ``<root>/incoming/`` (uploads land there, nowhere else)."""
        incoming = (self.store.root / "incoming").resolve()
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(incoming) or not resolved.is_file():
            raise StoreError(f"install: {path} is not an upload under {incoming}")
        return resolved

    def _cmd_install(self, cmd: Command) -> dict[str, Any]:
        a = cmd.args
        missing = [k for k in ("path", "sha256", "variant", "model") if k not in a]
        if missing:
            raise StoreError(f"install: missing argument(s) {', '.join(missing)}")
        done = self.store.install(self._incoming(a["path"]), variant=a["variant"], model=a["model"],
                                  expect_sha256=a["sha256"], eval_file=self._incoming(a["eval"]) if "eval" in a else None,
                                  expect_eval_sha256=a.get("eval_sha256"), move=True)
        engine = prepare_installed(self.store, done.sha256, fresh=done.fresh, threads=self.cfg.bench.threads)  # TensorRT
        return {"sha256": done.sha256, "variant": done.variant, "model": done.model, "fresh": done.fresh,
                **({"engine": engine} if engine is not None else {})}

    def _cmd_activate(self, cmd: Command) -> dict[str, Any]:
        sha = self.store.resolve(sha256=cmd.args.get("sha256"), variant=cmd.args.get("variant"))
        return self._activate(sha, cmd.args.get("keep"), cmd.expires)

    def _activate(self, sha: str, keep: Any = None, expires: float | None = None) -> dict[str, Any]:
        """Switch to installed model ``sha`` safely (hash check, smoke test in a child), then apply the
        store budget sparing ``keep``; return the activation result with what the budget removed.

        ``expires`` (unix time, the command's): the turn is waited for, and the smoke check run, no longer than what
        is left of it, and nothing is switched after it (the host stopped waiting for the answer then).

        Raises:
            StoreError: not installed, damaged, it failed its smoke test, or ``expires`` passed (the current model
                stays).
            AcceleratorBusy: on the Edge TPU, `edgekit-agent activate`'s turn did not end within
                :data:`ACTIVATE_TURN_WAIT_S` (or what is left before ``expires``), or serving is paused for its child
                (nothing changed).
        """
        self.disk.check("activate")
        if keep is not None:  # written before the switch: nothing after it can fail for space
            atomic_write(self.store.root / "candidates.json", json.dumps(sorted(keep)).encode())
        b = self.cfg.bench
        child = self._settings_for(sha, b) if sha != self.store.current() else None  # current: no check, no child
        wait_s = _until(ACTIVATE_TURN_WAIT_S, expires)
        with self._accelerator_for_child(child, f"smoke check of model {sha[:12]}", wait_s):
            result = self.store.activate(sha, runtime=b.runtime, delegate=b.delegate, options=b.delegate_options,
                                         threads=b.threads, smoke=self.smoke, deadline=expires)
        if result["smoke"] is not None:  # checked with the settings it is served with: not again
            self._smoked.add(self._smoke_key(sha, self._settings_for(sha, b)))
        return {**result, "model": self._model_ref(sha), "removed": self._apply_budget()}

    def _apply_budget(self) -> list[dict[str, Any]]:
        """After an activation: remove the oldest models beyond ``store.max_store_mb``; return what went.

        The candidates the host deployed last (an activation's ``keep``, remembered in
        ``<root>/candidates.json``) are spared, as are current and previous.
        """
        if self.cfg.store.max_store_mb is None:
            return []
        try:
            spared = set(read_json(self.store.root / "candidates.json"))
        except FileNotFoundError:
            spared = set()
        except (OSError, ValueError, TypeError) as exc:  # damaged: the budget spares only what else it must
            log.error("%s is unreadable (%s); the store budget spares no tune candidate", self.store.root / "candidates.json",
                      exc)
            spared = set()
        spared |= self.reconciler.protected()  # the desired model may be installed and not yet active
        removed = self.store.prune(int(self.cfg.store.max_store_mb * 1e6), spared)
        if removed:
            log.info("store budget %.0f MB: removed %s", self.cfg.store.max_store_mb,
                     ", ".join(f"{m['variant']} {m['sha256'][:12]}" for m in removed))
        return removed

    def _cmd_rollback(self, _cmd: Command) -> dict[str, Any]:
        return self.store.rollback()

    def _cmd_state(self, cmd: Command) -> dict[str, Any]:
        state = {"current": self._model_ref(self.store.current()), "previous": self._model_ref(self.store.previous()),
                 "installed": self.store.installed(), "spool": self.spool.stats(), "power_source": self.power_source,
                 "queued_commands": self.commands.qsize(), "disk": self.disk.usage(),
                 "desired": self.reconciler.last}  # where the device stands with its desired state (None: never given one)
        if cmd.args.get("verify"):
            state["damaged"] = self.store.damaged()
        if "live" in cmd.args:  # the serving API's figures, with the last N service times (a rollout gate's samples)
            state["live"] = ({**self.server.snapshot(), "latency_samples_ms": self.server.samples(cmd.args["live"])}
                             if self.server else None)
        if cmd.args.get("code"):  # the signed manifest of this agent's code (None when not run from <root>/agent)
            state["code"] = codecheck.read_manifest(self._code_dir()) if self._deployed() else None
        return state

    def _code_dir(self) -> Path:
        return Path(codecheck.__file__).resolve().parent.parent

    def _deployed(self) -> bool:
        """Return whether this agent runs from the deploy's ``<root>/agent`` (and so has a signed manifest)."""
        return codecheck.is_deployed(self._code_dir(), self.store.root)

    def _cmd_operators(self, cmd: Command) -> dict[str, Any]:
        """Pin the operator keys ``keys`` (the command itself is signed by a key pinned now).

        A deployed agent (running from ``<root>/agent``) takes ``code`` too, its code manifest
        signed by one of the new keys, so it still starts after the old key is dropped. The two files
        are written in the order that keeps them a valid pair at every moment: a growing key list
        before the manifest, a shrinking one after it.

        Raises:
            ConfigError: a key is not a key. CodeTampered: ``code`` is missing, not signed by a new
                key, or not for this agent's files.
        """
        keys = [decode_key(k, f"operators: keys[{i}]") for i, k in enumerate(cmd.args["keys"])]
        pinned_now = set(read_operators(self.identity / "operators.json"))
        writes = [(self.identity / "operators.json", json.dumps([encode_key(k) for k in keys]).encode())]
        if self._deployed():
            here, doc = self._code_dir(), cmd.args.get("code")
            try:
                Keyring(operators=keys).verify(doc or {}, OPERATOR)
            except EdgeKitError as exc:
                raise CodeTampered(f"operators: the code manifest is missing or not signed by a new key ({exc})") from None
            diff = codecheck.differences(doc.get("files") or {}, codecheck.tree(here))
            if diff or doc.get("schema") != codecheck.SCHEMA:
                raise CodeTampered(f"operators: the code manifest is for other code ({', '.join(diff[:3])}); "
                                   "deploy this agent first")
            manifest = (here / codecheck.MANIFEST, json.dumps(doc, indent=1).encode())
            writes = writes + [manifest] if set(keys) >= pinned_now else [manifest] + writes
        for path, data in writes:
            atomic_write(path, data, tmp_dir=self.store.root)  # temporary files never inside the checked folder
        log.warning("operator keys now pinned: %s", ", ".join(key_id(k) for k in keys))
        return {"pinned": [key_id(k) for k in keys]}

    def _cmd_shadow(self, cmd: Command) -> dict[str, Any]:
        """Start (or with ``off`` stop) a shadow run beside the served model; return what it compares.

        Raises:
            StoreError: the model is not installed or fails its check. DeviceError: no serving API,
                nothing served, the shadow is the served model or cannot be loaded, or it runs on the Edge TPU.
        """
        if self.server is None:
            raise DeviceError("shadow: the serving API is off on this device (serve.enabled)")
        a = cmd.args
        if a.get("off"):
            self.server.set_shadow(None)
            return {"shadow": None}
        sha = self.store.resolve(sha256=a.get("sha256"), variant=a.get("variant"))
        settings = self._settings_for(sha, self.cfg.bench)
        if settings.delegate == EdgeTpu.key:  # its child would hold it for as long as it runs, taking no turn
            raise DeviceError(f"shadow: model {sha[:12]} runs on the Edge TPU, which opens for one process at a time: "
                              "a shadow's child would hold it as long as it runs, and serving, smoke checks and "
                              "benches (edgekit-agent activate's too) would find it busy; bench it instead (serving "
                              "pauses for a bench)")
        self.server.set_shadow(self.store.verify(sha), sha, (self.store.describe(sha) or {}).get("variant"),
                               share=float(a.get("share", 0.1)), max_per_s=float(a.get("max_per_s", 5.0)))
        return {"shadow": self.server.shadow.model.ref(), "serving": self.server.current.ref()}

    def follow_current(self) -> None:
        """Serve the current model when it is not served yet (after an activation or a rollback, or a
        switch made over SSH). A model that does not load is logged and not served; the old one stays.
        While nothing is served, requests are told why: no model active, the active one loading (at the
        agent's start: its check in a child takes seconds), or the active one not servable. A served model whose
        interpreters a pause left unloaded (:meth:`Server.paused`: the Edge TPU unplugged meanwhile) is loaded again,
        at each call (the service loop's, every second) until it loads. On an Edge TPU, the check and load (and that
        load again) take their turn (:func:`~device_agents.targets.edgetpu.turn`): while another process checks a model
        on it (`edgekit-agent activate`), nothing is loaded and nothing logged until a later call. Returns nothing;
        never raises what a load raises."""
        sha = self.store.current()
        if self.server is None:
            return
        served = self.server.current
        again = served is not None and served.sha256 == sha  # a pause left it unloaded (an Edge TPU unplugged)
        if again and served.broken is None:
            return
        if sha is None:
            if self.server.current is None:
                self.server.no_model = NO_ACTIVE_MODEL
            return
        if self.server.current is None:
            self.server.no_model = (f"the agent is loading the active model {sha[:12]} (checked in a child "
                                    "first); retry in a moment")
        # its check and load open the Edge TPU, as `edgekit-agent activate`'s (a deploy without a broker, right after a
        # restart), and so does loading again a model a pause left unloaded
        on_tpu = self.cfg.bench.delegate == EdgeTpu.key
        try:
            with turn(self.store.root) if on_tpu else contextlib.nullcontext():
                if again:
                    self.server.serve_model(served.path, sha, served.variant)
                    return
                path = self.store.verify(sha)
                self._loads_in_child(path, sha, self.cfg.bench)  # switched over SSH, or checked before a restart
                self.server.serve_model(path, sha, (self.store.describe(sha) or {}).get("variant"))
        except AcceleratorBusy:  # another process checks a model on it: tried again at the next call, once it ended
            if self.server.current is None:
                self.server.no_model = (f"the agent is loading the active model {sha[:12]} once another process's "
                                        "check on the Edge TPU ends (edgekit-agent activate or bench); retry in a "
                                        "moment")
        except EdgeKitError as exc:
            if sha != self._unservable:
                log.error("%s", exc)
            self._unservable = sha
            if self.server.current is None:
                self.server.no_model = (f"the active model {sha[:12]} cannot be served ({str(exc)[:300]}); activate "
                                        "another (edgekit-agent rollback, or edgekit-agent activate) or deploy again")

    def reconcile(self) -> dict[str, Any] | None:
        """Run one reconcile step toward the desired state (main thread); the served model and the
        status follow a switch at once; a failed try is counted (``failed_pulls`` in the spool's counters:
        state and telemetry). Returns the ``reported`` body (None: a superseded download ended)."""
        reported = self.reconciler.step()
        if reported is not None and reported["state"] == "failed":
            try:
                self._on_disk(lambda: self.spool.count("failed_pulls"))
            except DiskFull as exc:  # the report went out; only the count is lost
                log.error("could not count the failed pull: %s", exc)
        self.follow_current()
        if self.store.current() != self._announced:
            self._publish_status()
        return reported

    def _publish_status(self) -> None:
        if self.publisher.connected.is_set():
            self.publisher.publish(self._topic("status"), self._status_payload("online"), retain=True)

    def telemetry(self) -> None:
        """Spool the periodic messages: one telemetry message, then :meth:`served` (each droppable: on a disk
        too full to write it, it is dropped and counted in ``disk.dropped_telemetry``); returns nothing."""
        for kind, body in [("telemetry", self._telemetry()), *self.served()]:
            try:
                self.emit(kind, body)
            except DiskFull as exc:
                self.dropped_on_full_disk += 1
                log.warning("%s dropped: %s", kind, exc)
                continue  # not spooled: a shadow comparison is offered again at the next interval
            except PayloadTooLarge:
                continue  # counted and logged by emit
            except Unsignable:  # counted and logged by emit; the next interval's message goes out
                if kind != "shadow":
                    continue
            if kind == "shadow":  # sent or refused: the same comparison is not offered again
                self._shadow_sent = self._shadow_counts(body)

    def _telemetry(self) -> dict[str, Any]:
        """Return the body of a telemetry message: conditions, spool, current model, disk, the interval it is
        sent at (``interval_s``: how long a silence means the agent has stopped) and the newest ``seq`` given to each
        of :data:`~edgekit_protocol.messages.MARKED_KINDS` (``seqs``: a receiver that has not had them all knows
        what was lost, though no later record of that kind comes)."""
        return {"conditions": conditions.snapshot(), "spool": self.spool.stats(), "interval_s": self.cfg.telemetry_interval_s,
                "seqs": {kind: self.spool.upcoming_seq(kind) - 1 for kind in messages.MARKED_KINDS},
                "current": self._model_ref(self.store.current()), "simulated": self.cfg.simulated,
                "uptime_s": round(time.time() - self.started, 1),
                "disk": {**self.disk.usage(), "dropped_telemetry": self.dropped_on_full_disk}}

    def served(self) -> list[tuple[str, dict[str, Any]]]:
        """Return the serving API's periodic messages as ``(kind, body)``: none while nothing is served; else
        ``live`` (the served model's figures, :meth:`Server.snapshot` without its shadow) and, when a shadow run's
        counts changed since the last one spooled, ``shadow`` (its comparison, with the ``serving`` model)."""
        if self.server is None:
            return []
        live = self.server.snapshot()
        shadow = live.pop("shadow", None)
        if live["model"] is None:
            return []
        out = [("live", live)]
        if shadow is not None and self._shadow_counts(shadow) != self._shadow_sent:
            out.append(("shadow", {**shadow, "serving": live["model"]}))
        return out

    @staticmethod
    def _shadow_counts(shadow: dict[str, Any]) -> tuple[Any, ...]:
        """Return what tells one shadow comparison from the next: its model, run, counts and end."""
        return (shadow["model"]["sha256"], shadow.get("run"), shadow["compared"], shadow["errors"],
                shadow["dropped_queue_full"], shadow["skipped_rate"], shadow["skipped_busy_cpu"], shadow.get("non_finite"),
                shadow.get("ended"))

    # --- life cycle ----------------------------------------------------------------------------

    def stop(self, *_: Any) -> None:
        """Ask ``run()`` to return (safe from a signal handler)."""
        self._stop.set()

    def run(self) -> None:
        """Connect, serve commands and send telemetry until stopped; then say offline and disconnect."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        b = self.cfg.broker
        for payload, started in self.spool.pending_commands():  # taken before a crash, never answered
            if started:  # it may have taken effect: say so, never run it twice
                try:  # verified when it was taken; the spool's file may be damaged since
                    msg = messages.decode(payload, "cmd")
                except MessageError as exc:
                    self.refuse(f"a command taken before the restart no longer reads in the spool ({exc}); dropped")
                    self.spool.drop(payload)
                    continue
                self.ack(msg["msg_id"], msg.get("command"), False, error="interrupted by an agent restart while "
                         "it ran; not run again (it may have taken effect: ask for the state)")
            else:
                self._take(payload, after_restart=True)
        threading.Thread(target=self.smoke.warm, daemon=True, name="smoke-warm").start()
        if self.server is not None:
            try:
                self.server.start()
            except EdgeKitError as exc:  # e.g. a socket path over the 107-byte limit: no API, the agent still runs
                log.error("%s; the serving API is off", exc)
                self.server = None
            self.follow_current()
        self.publisher.start()
        self.client.connect_async(b.host, b.port, keepalive=b.keepalive)
        self.client.loop_start()
        next_disk = time.monotonic()
        try:
            while not self._stop.is_set():
                try:
                    cmd = self.commands.get(timeout=min(0.2, max(0.0, self._next_telemetry - time.monotonic())))
                except queue.Empty:
                    cmd = None
                try:
                    if cmd is not None:
                        self.run_command(cmd)
                    self._take_desired()
                    self._report_when_due()
                    if self.reconciler.due():
                        self.reconcile()
                    if time.monotonic() >= next_disk:  # space came back (or went): reserve, state, status
                        next_disk = time.monotonic() + 1.0
                        self.disk.refresh()
                        if not self.disk.full:
                            self._retake()
                        if self.disk.full != self._announced_full:
                            self._publish_status()
                        self.follow_current()
                    self._telemetry_when_due()
                except Exception:  # noqa: BLE001 - the service outlives any one step (a full disk most of all)
                    log.exception("the service loop met an error; it goes on")
                    time.sleep(0.2)
        finally:
            self._shutdown()

    def _shutdown(self, drain_s: float = 2.0) -> None:
        deadline = time.monotonic() + drain_s
        while self.publisher.connected.is_set() and self.spool.stats()["pending"] and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.publisher.connected.is_set():
            info = self.client.publish(self._topic("status"), self._status_payload("offline"), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=1.0)
            except RuntimeError:
                pass
        if self.server is not None:
            self.server.close()
        self.reconciler.stop()
        self.publisher.stop()
        self.client.disconnect()
        self.client.loop_stop()
        self.spool.close()


class OneLineFormatter(logging.Formatter):
    """The agent's log format, with every control character of a message shown as ``\\xNN``
    (:func:`edgekit_protocol.labels.printable`): text a message, a command or a model file carries (a
    tensor name) is quoted in log lines, and its newlines would forge lines and its escapes drive the
    terminal reading the log. A traceback after the line keeps its lines."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the formatted line (and any traceback) of ``record``, its message escaped."""
        from edgekit_protocol.labels import printable

        record = logging.makeLogRecord({**record.__dict__, "msg": printable(record.getMessage()), "args": None})
        return super().format(record)


def log_to(log_file: Path | None) -> None:
    """Send this process's log (INFO and up) to ``log_file``, at most :data:`LOG_MAX_BYTES` in it and as much in
    ``<log_file>.1`` (the older part), or to stderr when None, one line per message (:class:`OneLineFormatter`);
    returns nothing."""
    handler: logging.Handler = logging.StreamHandler() if log_file is None else \
        logging.handlers.RotatingFileHandler(log_file, maxBytes=LOG_MAX_BYTES, backupCount=1)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def run_agent(cfg: AgentConfig, log_file: Path | None = None) -> None:
    """Run the agent in this process until SIGTERM/SIGINT."""
    log_to(log_file)
    Agent(cfg).run()
