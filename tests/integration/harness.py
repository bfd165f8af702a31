"""Helpers for integration tests: a plain MQTT monitor, agent subprocesses, waiting."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from device_agents.identity import Keyring, Signer, encode_key
from device_agents.store import ModelStore
from edge_kit.sim.broker import MosquittoBroker
from edge_kit.sim.process import stop_process
from edgekit_protocol import messages

FLEET = "testfleet"
# The tests' operator, and the keys every agent they start registers (the deploy's job in a real fleet).
OPERATOR = Signer.generate()
KEYRING = Keyring({}, [OPERATOR.public])


class Monitor:
    """A plain paho subscriber with a persistent session: every message of the fleet, deduplicated."""

    def __init__(self, host: str, port: int, fleet: str = FLEET, **auth: Any):
        self.fleet = fleet
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"monitor-{uuid.uuid4().hex[:6]}",
                                  clean_session=False)
        if auth:
            self.client.username_pw_set(auth["username"], auth["password"])
        self.client.reconnect_delay_set(0.1, 0.5)
        self.cond = threading.Condition()
        self.messages: dict[str, list[dict]] = {k: [] for k in messages.KINDS}
        self.received = 0  # including duplicates
        self.invalid = 0
        self.seen: set[str] = set()
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe(f"{messages.ROOT}/{fleet}/#", qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        assert self.subscribed.wait(10), "monitor could not subscribe"

    def _on_message(self, _c, _u, message) -> None:
        _, _, kind = messages.parse_topic(message.topic)
        try:
            msg = messages.decode(message.payload, kind)
        except messages.MessageError:
            self.invalid += 1  # e.g. the fuzzer's commands
            return
        with self.cond:
            self.received += 1
            if msg["msg_id"] not in self.seen or kind == "status":
                self.seen.add(msg["msg_id"])
                self.messages[kind].append(msg)
            self.cond.notify_all()

    def wait_for(self, predicate, timeout: float = 60.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self.messages), timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def share_keys(fleet_file: Path, *agents: AgentProcess) -> None:
    """Give a fleet file's keys (``keys/`` beside it) the tests' operator key and register ``agents``,
    as a deploy to them would have."""
    from edge_kit.fleet.keys import FleetKeys

    keys = FleetKeys(fleet_file.parent / "keys")
    OPERATOR.save(keys.folder / "operator.key")
    for agent in agents:
        keys.register(agent.name, agent.signer.public)


class AgentProcess:
    """One device: a model store with the digits variants installed, and `edgekit-agent run`."""

    def __init__(self, tmp: Path, name: str, mqtt_broker: MosquittoBroker, artifacts: Path, **config: Any):
        self.name = name
        self.root = tmp / name
        self.store = ModelStore(self.root)
        self.sha: dict[str, str] = {}
        manifest = json.loads((artifacts / "manifest.json").read_text())
        for art in manifest["artifacts"]:
            if art["status"] == "built":
                done = self.store.install(artifacts / art["file"], variant=art["id"], model="digits",
                                          expect_sha256=art["sha256"], eval_file=artifacts / "eval.npz")
                self.sha[art["id"]] = done.sha256
        self.store.activate(self.sha["int8"])
        self.signer = Signer.generate()  # provisioned as a deploy does: device key, pinned operator key
        self.signer.save(self.root / "identity" / "device.key")
        (self.root / "identity" / "operators.json").write_text(json.dumps([encode_key(OPERATOR.public)]))
        KEYRING.devices[name] = self.signer.public
        cfg = {"device": name, "fleet": FLEET, "root": str(self.root), "profile": "rpi4",
               "broker": {"host": mqtt_broker.host, "port": mqtt_broker.port, "reconnect_max_s": 0.5},
               "telemetry_interval_s": 3600, "bench": {"warmup": 2, "min_runs": 30, "min_seconds": 0.0},
               "power": {"sensors": ["rapl", "hwmon"], "idle_w": 2.7, "busy_w": 6.4}, "simulated": True}
        for key, value in config.items():
            cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
        self.config = self.root / "agent.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.log = self.root / "agent.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> AgentProcess:
        self.proc = subprocess.Popen([sys.executable, "-m", "device_agents", "run", "--config", str(self.config),
                                      "--log-file", str(self.log)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        stop_process(self.proc, timeout=15)
        code = self.proc.returncode
        self.proc.stderr.close()
        self.proc = None
        return code


def online(name: str):
    """Predicate: the latest status of ``name`` says online."""
    def check(messages: dict[str, list[dict]]) -> bool:
        states = [m for m in messages["status"] if m["device"] == name]
        return bool(states) and states[-1]["state"] == "online"
    return check



def wait_until(predicate, timeout: float = 30.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def _spool_rows(root: Path, query: str, *args: object) -> int:
    """Return the count ``query`` gives on an agent's spool database (read-only, beside the running agent)."""
    import sqlite3

    db = sqlite3.connect(f"file:{root / 'spool.db'}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute(query, args).fetchone()[0]
    finally:
        db.close()


def spool_count(root: Path, kind: str) -> int:
    """Rows of ``kind`` waiting in an agent's spool to be published."""
    return _spool_rows(root, "SELECT COUNT(*) FROM outbox WHERE kind = ?", kind)


def spool_sent(root: Path, kind: str) -> int:
    """Return how many ``kind`` records an agent's spool numbered and the broker acknowledged (numbered, neither
    waiting in its outbox nor dropped by it when full); 0 while the spool cannot be read (not made yet: the agent is
    starting)."""
    import sqlite3

    counter = "COALESCE((SELECT value FROM counters WHERE name = ?), 0)"
    try:
        return _spool_rows(root, f"SELECT {counter} - {counter} - (SELECT COUNT(*) FROM outbox WHERE kind = ?)",
                           f"seq.{kind}", f"dropped.{kind}", kind)
    except sqlite3.OperationalError:  # no spool.db yet, or its tables not made yet
        return 0


def spool_taken(root: Path) -> int:
    """Commands an agent has taken (on disk before it let the broker forget them), answered or not."""
    return _spool_rows(root, "SELECT COUNT(*) FROM seen")


def spool_inbox(root: Path, started: bool = False) -> int:
    """Commands an agent has taken and not yet answered (``started``: of those, the ones it began running)."""
    return _spool_rows(root, "SELECT COUNT(*) FROM inbox" + (" WHERE started = 1" if started else ""))


def make_tls(folder: Path):
    """A throw-away CA and a server certificate for 127.0.0.1 (PEM files), as a BrokerTls."""
    from edge_kit.fleet.broker_setup import make_tls as generate

    return generate(folder, ["127.0.0.1"], days=1)


class CuttingProxy:
    """A loopback TCP proxy that can cut a connection after ``cut_after`` bytes from the client."""

    def __init__(self, target_port: int, cut_after: int | None = None):
        import socket

        self.target_port = target_port
        self.cut_after = cut_after
        self.cuts = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            budget = [self.cut_after]

            def pump(src, dst, count: bool) -> None:
                try:
                    while True:
                        data = src.recv(65536)
                        if not data:
                            break
                        if count and budget[0] is not None:
                            budget[0] -= len(data)
                            if budget[0] < 0:
                                self.cuts += 1
                                break
                        dst.sendall(data)
                except OSError:
                    pass
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    s.close()

            threading.Thread(target=pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, client, False), daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self.server.close()


class SystemdNamespace:
    """A real systemd, PID 1 of PID, mount, UTS and IPC namespaces of its own (needs root).

    Inside, ``/run`` is a fresh tmpfs and ``/etc/systemd/system`` a temporary folder, and that folder
    is systemd's only unit path (``SYSTEMD_UNIT_PATH``): it holds empty stand-ins for the targets a
    service depends on by default, so starting a unit never pulls in the machine's own boot units
    (``sysinit.target`` would run ``systemd-tmpfiles --remove``, which empties the shared ``/tmp``).
    The network namespace is the host's (loopback). ``stop()`` kills PID 1, and with it everything
    in the namespace.
    """

    STAND_INS = ("edgekit-test", "sysinit", "basic", "multi-user", "network-online", "time-sync", "shutdown")

    def __init__(self, tmp: Path):
        self.units = tmp / "systemd-units"
        self.log = tmp / "systemd.log"
        self.proc: subprocess.Popen | None = None
        self.pid = 0  # systemd's pid, as the host sees it

    def start(self) -> SystemdNamespace:
        self.units.mkdir(parents=True, exist_ok=True)
        for target in self.STAND_INS:
            (self.units / f"{target}.target").write_text(f"[Unit]\nDescription={target} (edge-kit test stand-in)\n")
        script = (f"mount -t tmpfs tmpfs /run && mount --bind {self.units} /etc/systemd/system && mkdir -p /run/sshd && "
                  "exec env container=other SYSTEMD_UNIT_PATH=/etc/systemd/system "
                  "/lib/systemd/systemd --system --unit=edgekit-test.target")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--mount-proc",
                                          "--propagation", "private", "sh", "-c", script],
                                         stdout=log, stderr=log, start_new_session=True)
        state = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and state not in ("running", "degraded"):
            time.sleep(0.2)
            if self.proc.poll() is not None:
                break
            children = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
            if children:
                self.pid = int(children[0])
                state = self.run("systemctl", "is-system-running").stdout.strip()
        if state not in ("running", "degraded"):
            self.stop()
            raise AssertionError(f"systemd did not come up in a new PID and mount namespace (state {state!r}); this "
                                 f"test needs root and the systemd and util-linux packages: {self.log.read_text()[-500:]}")
        paths = self.run("systemctl", "show", "-p", "UnitPath", "--value").stdout.split()
        if paths != ["/etc/systemd/system"]:  # never let it see the machine's units
            self.stop()
            raise AssertionError(f"the namespaced systemd loads units from {paths}, not only the test's folder")
        return self

    @property
    def enter(self) -> tuple[str, ...]:
        """The command prefix that runs a program inside the namespace."""
        return ("nsenter", "-t", str(self.pid), "-m", "-p", "--")

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self.enter, *argv], capture_output=True, text=True, timeout=30)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)  # PID 1 of the namespace: the kernel ends everything in it
        stop_process(self.proc, timeout=10)
        self.proc = None


def connect(broker, user: str | None, password: str | None, *, tls_ca=None) -> tuple[mqtt.Client, str]:
    """Return a started client and how its connection went ("ok" or the broker's reason)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"connect-{user}-{time.monotonic_ns()}")
    if user:
        client.username_pw_set(user, password)
    if tls_ca:
        client.tls_set(ca_certs=str(tls_ca), cert_reqs=ssl.CERT_REQUIRED)
    result, done = ["no answer"], threading.Event()

    def on_connect(_c, _u, _f, reason, _p):
        result[0] = "ok" if not reason.is_failure else str(reason)
        done.set()

    client.on_connect = on_connect
    try:
        client.connect(broker.host, broker.port)
    except (OSError, ssl.SSLError) as exc:
        return client, f"{type(exc).__name__}"
    client.loop_start()
    done.wait(5)
    return client, result[0]
