"""`edgekit-agent run`: the long-running service on each device.

Threads: paho's network loop (receives commands, checks them, acks bad ones at once), the spooled
publisher (moves records to the broker), and the main thread, which runs accepted commands one at
a time (benchmarks must not overlap) and sends telemetry every ``telemetry_interval_s``.

Everything the agent says is spooled first (see :mod:`device_agents.spool`) except its retained
``status``, which is re-sent on every connect and replaced by the broker with the last will
(``state: offline``) if the agent disappears.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import edgekit_protocol
from device_agents import codecheck, conditions
from device_agents.bench import run_bench
from device_agents.disk import Disk, is_out_of_space
from device_agents.errors import CodeTampered, DiskFull
from device_agents.identity import (
    OPERATOR,
    Keyring,
    Signer,
    decode_key,
    encode_key,
    key_id,
    read_operators,
)
from device_agents.mqtt import SpooledPublisher, make_client
from device_agents.power import SensorEnv, SensorMeter, not_measured, power_meter
from device_agents.runtimes import RUNTIMES
from device_agents.smoke import SmokePool
from device_agents.spool import Spool
from device_agents.store import ModelStore, StoreError, default_root
from edgekit_protocol import messages
from edgekit_protocol.commands import MAX_TTL_S, Command, CommandError, parse_command
from edgekit_protocol.config import AgentConfig
from edgekit_protocol.errors import EdgeKitError

log = logging.getLogger("edgekit.agent")
WRITES = ("install", "activate", "rollback", "bench")  # commands that write a model, a link or a record


class Agent:
    """One device's agent. ``run()`` blocks until ``stop()`` (or SIGTERM/SIGINT)."""

    def __init__(self, cfg: AgentConfig):
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
        self.spool = Spool(self.store.root / "spool.db", cfg.spool_max_records)
        # A persistent session: commands sent while the agent reconnects wait for it on the broker.
        # A persistent session, and the broker hears that a command arrived only once it is on disk.
        self.client = make_client(cfg.broker, f"edgekit-agent-{cfg.fleet}-{cfg.device}", password=cfg.password(),
                                  clean=False, manual_ack=True)
        self.publisher = SpooledPublisher(self.client, self.spool)
        self.smoke = SmokePool()
        self.commands: queue.Queue[Command] = queue.Queue(maxsize=cfg.max_queued_commands)
        self._stop = threading.Event()
        self._status_seq = 0
        self._announced: str | None = None  # the current model as the last status said
        self.started = time.time()
        p = cfg.power
        self._meter_args = dict(keys=p.sensors, env=SensorEnv(p.sys_root, p.vcgencmd), idle_w=p.idle_w,
                                busy_w=p.busy_w, cores=p.cores, profile=cfg.profile or "?")
        probe = power_meter(**self._meter_args)
        self.power_source = (probe.sensor.description if isinstance(probe, SensorMeter)
                             else "estimated from profile idle/busy watts and CPU use" if probe else "none")
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self.publisher.on_publish
        self.client.will_set(self._topic("status"), messages.encode(self._status("offline")), qos=1, retain=True)

    # --- messages -----------------------------------------------------------------------------

    def _topic(self, kind: str) -> str:
        return messages.topic(self.cfg.fleet, self.cfg.device, kind)

    def _model_ref(self, sha: str | None) -> dict[str, Any] | None:
        meta = self.store.describe(sha)
        if meta is None:
            return None
        return {k: meta[k] for k in ("sha256", "variant", "model", "damaged") if k in meta}

    def _status(self, state: str) -> dict[str, Any]:
        self._status_seq += 1
        self._announced = self.store.current()
        self._announced_full = self.disk.full
        runtimes = {k: (cls.unavailable_reason() or "available") for k, cls in RUNTIMES.items()}
        return self.signer.sign(messages.envelope("status", self.cfg.fleet, self.cfg.device, self._status_seq, {
            "state": state, "agent_version": edgekit_protocol.__version__, "profile": self.cfg.profile,
            "current": self._model_ref(self.store.current()), "runtimes": runtimes,
            "power_source": self.power_source, "simulated": self.cfg.simulated, "pid": os.getpid(),
            "started": self.started, "disk": self.disk.usage()}))

    def emit(self, kind: str, body: dict[str, Any], answers: str | None = None) -> dict[str, Any] | None:
        """Spool one message of ``kind`` (signed) and wake the publisher; ``answers``: the taken command
        it answers, which leaves the inbox in the same transaction.

        Returns:
            The message, or None when it was telemetry dropped because the spool is full.
        """
        built: dict[str, Any] = {}

        def build(seq: int) -> bytes:
            built.update(self.signer.sign(messages.envelope(kind, self.cfg.fleet, self.cfg.device, seq, body)))
            return messages.encode(built)

        row, _ = self._on_disk(lambda: self.spool.add(kind, self._topic(kind), build, answers=answers))
        self.publisher.wake()
        return built if row is not None else None

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
        """Answer a command on ``cmd/ack``.

        Never raises: an answer that cannot be written even after the reserve is freed is logged, and
        the command stays taken, so the next start answers it ("interrupted").
        """
        try:
            self.emit("cmd/ack", {"cmd_id": cmd_id, "command": name, "ok": ok, "error": error,
                                  "result": result or {}}, answers=cmd_id)
        except DiskFull as exc:
            log.error("could not answer %s %s: %s", name, cmd_id, exc)

    # --- paho callbacks (network thread) -------------------------------------------------------

    def _on_connect(self, client: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.error("broker %s:%s refused the connection: %s", self.cfg.broker.host, self.cfg.broker.port, reason)
            return
        client.subscribe(self._topic("cmd"), qos=1)
        self.publisher.publish(self._topic("status"), messages.encode(self._status("online")), retain=True)
        self.publisher.connected.set()
        self.publisher.wake()
        log.info("connected to %s:%s", self.cfg.broker.host, self.cfg.broker.port)

    def _on_disconnect(self, client: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self.publisher.connected.clear()
        # A fresh last will for the next connection: a will reused would be one msg_id, stored once.
        client.will_set(self._topic("status"), messages.encode(self._status("offline")), qos=1, retain=True)
        if not self._stop.is_set():
            log.warning("disconnected from the broker (%s); records stay in the spool", reason)

    def _on_message(self, client: Any, _u: Any, message: Any) -> None:
        try:
            self._take(message.payload)
        except DiskFull as exc:  # not on disk: the broker keeps it and sends it again after a reconnect
            log.error("a command could not be taken (%s); the broker keeps it", exc)
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
            if after_restart:  # taken before, refused now (the operator key changed): never again
                self.spool.forget(json.loads(payload).get("msg_id", ""))
            return
        if not after_restart:
            expires = msg.get("expires") if messages.in_range(msg.get("expires")) else msg["ts"] + MAX_TTL_S
            seen = self._on_disk(lambda: self.spool.take(msg["msg_id"], payload, msg["ts"], expires))
            if seen is not None:  # a redelivery or a replay of a command already taken, or long expired: never run
                self._on_disk(lambda: self.spool.count(seen))
                return
        try:
            cmd = parse_command(payload, self.cfg.fleet, self.cfg.device)
            self.commands.put_nowait(cmd)
        except CommandError as exc:
            self.ack(msg["msg_id"], exc.name, False, error=str(exc))
        except queue.Full:
            self.ack(cmd.msg_id, cmd.name, False, error=f"busy: {self.commands.qsize()} commands queued; retry later")

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
        if self.store.current() != self._announced:  # switched by the command, or over SSH meanwhile
            self._publish_status()

    def _cmd_bench(self, cmd: Command) -> dict[str, Any]:
        a = cmd.args
        sha = self.store.resolve(sha256=a.get("sha256"), variant=a.get("variant"))
        path = self.store.verify(sha)
        overrides = {k: a[k] for k in ("warmup", "min_runs", "min_seconds", "threads") if k in a}
        settings = dataclasses.replace(self.cfg.bench, **overrides)
        meter = power_meter(**self._meter_args)
        measured = run_bench(path, settings, eval_file=self.store.eval_path(sha), power=meter)
        if meter is None:
            measured["power"] = not_measured(self.cfg.power.sensors)
        meta = self.store.describe(sha) or {}
        record = self.emit("bench", {
            "variant": meta.get("variant"), "sha256": sha, "model": meta.get("model"), "model_bytes": meta.get("bytes"),
            "profile": self.cfg.profile,
            "cmd_id": cmd.msg_id, "simulated": self.cfg.simulated, **measured})
        assert record is not None  # bench records are never dropped
        lat = measured["latency_ms"]
        return {"bench_msg_id": record["msg_id"], "variant": meta.get("variant"), "sha256": sha,
                "latency_p90_ms": lat["p90"], "runs": measured["runs"]}

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
        return {"sha256": done.sha256, "variant": done.variant, "model": done.model, "fresh": done.fresh}

    def _cmd_activate(self, cmd: Command) -> dict[str, Any]:
        sha = self.store.resolve(sha256=cmd.args.get("sha256"), variant=cmd.args.get("variant"))
        result = self.store.activate(sha, runtime=self.cfg.bench.runtime, delegate=self.cfg.bench.delegate,
                                     options=self.cfg.bench.delegate_options,
                                     smoke=self.smoke)
        return {**result, "model": self._model_ref(sha), "removed": self._apply_budget(cmd.args.get("keep"))}

    def _apply_budget(self, keep: list[str] | None) -> list[dict[str, Any]]:
        """After an activation: remove the oldest models beyond ``store.max_store_mb``; return what went.

        ``keep`` (the candidates the host just deployed) is remembered in ``<root>/candidates.json``
        so a later activation without it still spares them.
        """
        remembered = self.store.root / "candidates.json"
        if keep is not None:
            atomic_write(remembered, json.dumps(sorted(keep)).encode())
        if self.cfg.store.max_store_mb is None:
            return []
        try:
            spared = set(json.loads(remembered.read_text())) if keep is None else set(keep)
        except (OSError, ValueError, TypeError):
            spared = set()
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
                 "queued_commands": self.commands.qsize(), "disk": self.disk.usage()}
        if cmd.args.get("verify"):
            state["damaged"] = self.store.damaged()
        return state

    def _cmd_operators(self, cmd: Command) -> dict[str, Any]:
        """Pin the operator keys ``keys`` (the command itself is signed by a key pinned now).

        A deployed agent (running from ``<root>/agent``) takes ``code`` too, its code manifest
        signed by one of the new keys, so it still starts after the old key is dropped; it is
        written first, while the old keys stay pinned, so a crash in between leaves a valid pair.

        Raises:
            ConfigError: a key is not a key. CodeTampered: ``code`` is missing, not signed by a new
                key, or not for this agent's files.
        """
        keys = [decode_key(k, f"operators: keys[{i}]") for i, k in enumerate(cmd.args["keys"])]
        here = Path(codecheck.__file__).resolve().parent.parent
        if here == self.store.root.resolve() / "agent":
            doc = cmd.args.get("code")
            try:
                Keyring(operators=keys).verify(doc or {}, OPERATOR)
            except EdgeKitError as exc:
                raise CodeTampered(f"operators: the code manifest is missing or not signed by a new key ({exc})") from None
            diff = codecheck.differences(doc.get("files") or {}, codecheck.tree(here))
            if diff or doc.get("schema") != codecheck.SCHEMA:
                raise CodeTampered(f"operators: the code manifest is for other code ({', '.join(diff[:3])}); "
                                   "deploy this agent first")
            atomic_write(here / codecheck.MANIFEST, json.dumps(doc, indent=1).encode())
        atomic_write(self.identity / "operators.json", json.dumps([encode_key(k) for k in keys]).encode())
        log.warning("operator keys now pinned: %s", ", ".join(key_id(k) for k in keys))
        return {"pinned": [key_id(k) for k in keys]}

    def _publish_status(self) -> None:
        if self.publisher.connected.is_set():
            self.publisher.publish(self._topic("status"), messages.encode(self._status("online")), retain=True)

    def telemetry(self) -> None:
        """Spool one telemetry message (droppable when the spool is full)."""
        self.emit("telemetry", {"conditions": conditions.snapshot(), "spool": self.spool.stats(),
                                "current": self._model_ref(self.store.current()), "simulated": self.cfg.simulated,
                                "uptime_s": round(time.time() - self.started, 1), "disk": self.disk.usage()})

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
                msg = json.loads(payload)
                self.ack(msg["msg_id"], msg.get("command"), False, error="interrupted by an agent restart while "
                         "it ran; not run again (it may have taken effect: ask for the state)")
            else:
                self._take(payload, after_restart=True)
        threading.Thread(target=self.smoke.warm, daemon=True, name="smoke-warm").start()
        self.publisher.start()
        self.client.connect_async(b.host, b.port, keepalive=b.keepalive)
        self.client.loop_start()
        next_telemetry = time.monotonic() + self.cfg.telemetry_interval_s
        next_disk = time.monotonic()
        try:
            while not self._stop.is_set():
                try:
                    cmd = self.commands.get(timeout=min(0.2, max(0.0, next_telemetry - time.monotonic())))
                except queue.Empty:
                    cmd = None
                if cmd is not None:
                    self.handle(cmd)
                if time.monotonic() >= next_disk:  # space came back (or went): reserve, state, status
                    self.disk.refresh()
                    if self.disk.full != self._announced_full:
                        self._publish_status()
                    next_disk = time.monotonic() + 1.0
                if time.monotonic() >= next_telemetry:
                    self.telemetry()
                    next_telemetry = time.monotonic() + self.cfg.telemetry_interval_s
        finally:
            self._shutdown()

    def _shutdown(self, drain_s: float = 2.0) -> None:
        deadline = time.monotonic() + drain_s
        while self.publisher.connected.is_set() and self.spool.stats()["pending"] and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.publisher.connected.is_set():
            info = self.client.publish(self._topic("status"), messages.encode(self._status("offline")), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=1.0)
            except RuntimeError:
                pass
        self.publisher.stop()
        self.client.disconnect()
        self.client.loop_stop()
        self.spool.close()


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename: readers see old or new, whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_agent(cfg: AgentConfig, log_file: Path | None = None) -> None:
    """Run the agent in this process until SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.INFO, filename=log_file,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Agent(cfg).run()
