"""Virtual devices: thousands of devices in one process speaking the real protocol, to measure the
host side of a pull rollout at fleet scale on one machine. A test and benchmark tool; what it
produces is simulated and every figure drawn from it says so.

Each virtual device has its own Ed25519 key (registered in the fleet's key registry like a real
device's), takes its desired state from the broker (the operator's signature verified, the revision
checked as the agent does), downloads the artifact from the store for real
(:func:`device_agents.fetch.fetch`: Range resume, sha256 check), and publishes signed, retained
``reported`` states (``fetching``, then ``converged`` or ``failed``). It does not run a model: an
"activation" is bookkeeping, and the downloaded bytes are deleted once checked.

Behaviour is chosen per device from a seeded hash, so a run is repeatable: ``fail_fetch`` of the
devices report a failed download, ``fail_activate`` a failed smoke test, ``offline`` stay silent
until :meth:`VirtualFleet.come_back`, ``cut`` have their first download cut midway (and resume it).

The devices share a few MQTT connections (one subscription to the fleet's ``+/desired``) instead
of one each: the broker's per-connection cost is not what this tool measures, and 10,000 sockets
would need a raised file limit. Use ``python -m edge_kit.sim.virtual`` to run them in their own
process, so the host's CPU figures are its own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agents import fetch as fetching
from device_agents.identity import OPERATOR, Keyring, Signer
from device_agents.mqtt import make_client, message_topic
from edge_kit.fleet.inventory import Fleet, load_fleet
from edge_kit.fleet.keys import FleetKeys
from edgekit_protocol import messages
from edgekit_protocol.config import BrokerConfig
from edgekit_protocol.desired import Desired, parse_desired, reported_body
from edgekit_protocol.errors import EdgeKitError


@dataclass(frozen=True)
class Behaviour:
    fail_fetch: float = 0.0  # share of devices whose download fails
    fail_activate: float = 0.0  # share whose activation fails its smoke test
    offline: float = 0.0  # share that is offline until come_back()
    cut: float = 0.0  # share whose first download is cut midway, then resumed
    download: bool = True  # fetch the artifact from the store (else answer without downloading)
    seed: int = 0


def device_signer(fleet: str, name: str) -> Signer:
    """Return virtual device ``name``'s key (derived from the names: the same in every process; a
    simulation's key, never a real device's)."""
    return Signer(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"edgekit-virtual/{fleet}/{name}".encode()).digest()))


def _share(seed: int, name: str, what: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}/{what}".encode()).digest()[:8], "big") / 2 ** 64


def write_virtual_fleet(folder: Path, count: int, profiles: list[str], broker: BrokerConfig, *,
                        name: str = "virtual") -> Path:
    """Write the fleet file of ``count`` virtual devices (profiles round-robin, each tagged with its
    profile) and register their keys; return the fleet file.

    Raises:
        ValueError: ``count`` is not positive or no profile is given.
    """
    if count < 1 or not profiles:
        raise ValueError("a virtual fleet needs at least one device and one profile")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(count - 1)))
    devices = [{"name": f"v{i:0{width}d}", "host": "virtual.invalid", "profile": profiles[i % len(profiles)],
                "tags": [profiles[i % len(profiles)]]} for i in range(count)]
    doc = {"fleet": name, "broker": {"host": broker.host, "port": broker.port},
           "defaults": {"user": "virtual", "simulated": True, "root": "/nonexistent"}, "devices": devices}
    fleet_file = folder / "fleet.yaml"
    fleet_file.write_text(json.dumps(doc))  # YAML is a superset of JSON; 10,000 devices dump fast this way
    FleetKeys(folder / "keys").register_many({d["name"]: device_signer(name, d["name"]).public for d in devices})
    return fleet_file


@dataclass
class Stats:
    desired: int = 0  # desired messages received
    refused: int = 0  # not the operator's, not a known device, malformed, or a stale revision
    reported: int = 0  # reported messages published
    converged: int = 0
    failed: int = 0
    bytes_downloaded: int = 0
    resumed: int = 0
    held: int = 0  # desired states waiting for an offline device to come back
    errors: list[str] = field(default_factory=list)


class VirtualFleet:
    """The virtual devices of a fleet file written by :func:`write_virtual_fleet`. Use as a context manager.

    Raises (on enter):
        EdgeKitError: the broker cannot be reached.
    """

    def __init__(self, fleet_file: Path, behaviour: Behaviour = Behaviour(), *, workers: int = 8,
                 workdir: Path | None = None):
        self.fleet: Fleet = load_fleet(fleet_file)
        self.behaviour = behaviour
        self.keyring = Keyring(operators=[self.fleet.key_store().operator.public])
        self.names = {d.name for d in self.fleet.devices}
        self._signers: dict[str, Signer] = {}
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="edgekit-virtual-"))
        self.stats = Stats()
        self._lock = threading.Lock()
        self._revision: dict[str, int] = {}
        self._current: dict[str, dict[str, Any] | None] = {}
        self._seq: dict[str, int] = {}
        self._held: dict[str, dict[str, Any]] = {}
        self._online = True
        self._work: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
        self._threads = [threading.Thread(target=self._worker, daemon=True, name=f"virtual-{i}") for i in range(workers)]
        self.client = make_client(self.fleet.broker, f"edgekit-virtual-{os.getpid()}",
                                  password=self.fleet.broker_password())
        self._subscribed = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe(messages.subscription(self.fleet.fleet, "desired"), qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message

    def signer(self, name: str) -> Signer:
        """Return device ``name``'s key."""
        s = self._signers.get(name)
        if s is None:
            s = self._signers[name] = device_signer(self.fleet.fleet, name)
        return s

    def __enter__(self) -> VirtualFleet:
        b = self.fleet.broker
        try:
            self.client.connect(b.host, b.port, keepalive=60)
        except OSError as exc:
            raise EdgeKitError(f"virtual fleet: cannot reach the broker at {b.host}:{b.port} ({exc})") from None
        for t in self._threads:
            t.start()
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise EdgeKitError(f"virtual fleet: the broker at {b.host}:{b.port} did not confirm the subscription")
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers, disconnect, delete the download folder."""
        for _ in self._threads:
            self._work.put(None)
        for t in self._threads:
            t.join(timeout=5)
        self.client.disconnect()
        self.client.loop_stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        try:
            fleet, device, _ = messages.parse_topic(message_topic(message))
        except EdgeKitError:
            return
        self._work.put((device, {"payload": message.payload}))

    def come_back(self) -> int:
        """Bring the offline devices online: each takes the desired state it missed; return how many."""
        with self._lock:
            held, self._held = self._held, {}
            self._online = True
        for device, item in held.items():
            self._work.put((device, {**item, "back": True}))
        return len(held)

    def _worker(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            device, data = item
            try:
                self._handle(device, data)
            except Exception as exc:  # noqa: BLE001 - a tool's worker reports, never dies
                with self._lock:
                    self.stats.errors.append(f"{device}: {type(exc).__name__}: {exc}"[:300])

    def _handle(self, device: str, data: dict[str, Any]) -> None:
        b = self.behaviour
        if "desired" in data:
            d = data["desired"]
        else:
            with self._lock:
                self.stats.desired += 1
            try:
                msg = messages.decode(data["payload"], "desired")
                self.keyring.verify(msg, OPERATOR)
                messages.check_time(msg, time.time())
                if device not in self.names or msg["device"] != device:
                    raise EdgeKitError(f"{device}: not a device of this virtual fleet")
                d = parse_desired(msg)
            except EdgeKitError:
                with self._lock:
                    self.stats.refused += 1
                return
            with self._lock:
                if d.revision <= self._revision.get(device, 0):
                    self.stats.refused += 1
                    return
                self._revision[device] = d.revision
                if _share(b.seed, device, "offline") < b.offline and not data.get("back"):
                    self._held[device] = {"desired": d}
                    self.stats.held = len(self._held)
                    return
        self._apply(device, d)

    def _apply(self, device: str, d: Desired) -> None:
        if d.hold:  # stay on its model: nothing to fetch
            self._report(device, d, "converged")
            return
        b = self.behaviour
        download = None
        if b.download:
            self._report(device, d, "fetching")
            if _share(b.seed, device, "fail_fetch") < b.fail_fetch:
                self._report(device, d, "failed", error="simulated: the store did not answer", attempt=1)
                return
            folder = self.workdir / device
            got_bytes, resumed, seconds = 0, False, 0.0
            files = [(d.sha256, d.bytes)] + ([(d.eval_sha256, d.eval_bytes or 0)] if d.eval_sha256 else [])
            try:
                folder.mkdir(parents=True, exist_ok=True)
                for sha, size in files:
                    url = fetching.artifact_url(d.store, sha)
                    if sha == d.sha256 and _share(b.seed, device, "cut") < b.cut:  # the first connection drops halfway
                        got_bytes += fetching.download_once(url, fetching.partial_path(folder / sha), cut_after=size // 2,
                                                            timeout_s=d.fetch.timeout_s).received
                    got = fetching.fetch(url, sha, folder / sha, max_bytes_s=d.fetch.max_bytes_s,
                                         timeout_s=d.fetch.timeout_s, max_bytes=size)
                    got_bytes, resumed, seconds = got_bytes + got.bytes_downloaded, resumed or got.resumed, seconds + got.seconds
            except EdgeKitError as exc:
                self._report(device, d, "failed", error=str(exc), attempt=1)
                return
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            download = {"bytes": got_bytes, "resumed": resumed, "seconds": round(seconds, 3)}
            with self._lock:
                self.stats.bytes_downloaded += got_bytes
                self.stats.resumed += int(resumed)
        if _share(b.seed, device, "fail_activate") < b.fail_activate:
            self._report(device, d, "failed", error="simulated: the smoke test failed; the old model stays", attempt=1)
            return
        with self._lock:
            self._current[device] = {"sha256": d.sha256, "variant": d.variant, "model": d.model}
        self._report(device, d, "converged", download=download)

    def _report(self, device: str, d: Desired, state: str, **extra: Any) -> None:
        with self._lock:
            seq = self._seq[device] = self._seq.get(device, 0) + 1
            current = self._current.get(device)
            self.stats.reported += 1
            if state in ("converged", "failed"):
                setattr(self.stats, state, getattr(self.stats, state) + 1)
        body = {**reported_body(d, state, current, **extra), "simulated": True}
        msg = self.signer(device).sign(messages.envelope("reported", self.fleet.fleet, device, seq, body))
        self.client.publish(messages.topic(self.fleet.fleet, device, "reported"), messages.encode(msg), qos=1, retain=True)


def main(argv: list[str] | None = None) -> None:
    """``python -m edge_kit.sim.virtual FLEET_FILE [--behaviour JSON] [--stats FILE]``: run the virtual
    devices until SIGTERM (SIGUSR1: the offline ones come back); write the stats as JSON on exit."""
    ap = argparse.ArgumentParser(prog="python -m edge_kit.sim.virtual")
    ap.add_argument("fleet_file", type=Path)
    ap.add_argument("--behaviour", default="{}", help="JSON of Behaviour fields")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--stats", type=Path, help="write the stats here (JSON) on exit")
    ap.add_argument("--ready", type=Path, help="touch this file once subscribed")
    args = ap.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with VirtualFleet(args.fleet_file, Behaviour(**json.loads(args.behaviour)), workers=args.workers) as vf:
        signal.signal(signal.SIGUSR1, lambda *_: threading.Thread(target=vf.come_back, daemon=True).start())
        if args.ready:
            args.ready.touch()
        while not stop.wait(0.2):
            pass
        if args.stats:
            args.stats.write_text(json.dumps(asdict(vf.stats)))


if __name__ == "__main__":
    main(sys.argv[1:])
