"""Pull rollout: the host's cost of a rollout to 10,000 virtual devices (simulated devices, real broker, store and host code).

The host side is the real thing: :func:`edge_kit.loop.waves.plan_rollout` and
:class:`~edge_kit.loop.waves.Rollout` in this process, against a real Mosquitto, writing the real
SQLite history, verifying every ``reported`` message's Ed25519 signature. The devices are
:mod:`edge_kit.sim.virtual` in a child process (their CPU is not the host's): each verifies its
signed desired state, downloads a 16 KiB artifact from nginx for real (sha256 checked) and
publishes signed ``fetching`` and ``converged``/``failed`` states; 1 % fail their download.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from edge_kit.fleet.artifact_store import publish
from edge_kit.fleet.commands import FleetClient
from edge_kit.fleet.inventory import load_fleet
from edge_kit.loop.waves import Rollout, RolloutSettings, plan_rollout
from edge_kit.manifest import Artifact, Manifest
from edge_kit.sim.broker import MosquittoBroker
from edge_kit.sim.store_server import start_store_server
from edge_kit.sim.virtual import write_virtual_fleet
from edge_kit.telemetry.store import Store
from edgekit_protocol.config import BrokerConfig

N = 10_000
RATE = 1000.0  # desired states per second: the set rate
PROFILES = ["rpi4", "rpi5", "jetson-orin-nano", "host-x86-64"]
SIZE = 16 * 1024


def _artifacts(root: Path) -> Path:
    folder = root / "artifacts" / "bench"
    folder.mkdir(parents=True)
    data = os.urandom(SIZE)
    (folder / "int8.tflite").write_bytes(data)
    manifest = Manifest(created="2026-11-29T00:00:00+00:00", model={"name": "bench"}, versions={},
                        profiles={p: {} for p in PROFILES},
                        artifacts=[Artifact(id="int8", status="built", profiles=PROFILES, summary="int8", precision="int8",
                                            file="int8.tflite", sha256=hashlib.sha256(data).hexdigest(), bytes=SIZE)])
    (folder / "manifest.json").write_text(manifest.to_json())
    return folder


def test_rollout_to_ten_thousand_virtual_devices(figure, tmp_path):
    artifacts = _artifacts(tmp_path)
    publish(artifacts, tmp_path / "store")
    broker = MosquittoBroker(tmp_path / "broker", persistence=False).start()
    ready, stats_file = tmp_path / "ready", tmp_path / "stats.json"
    try:
        fleet_file = write_virtual_fleet(tmp_path / "fleet", N, PROFILES, BrokerConfig(host=broker.host, port=broker.port))
        with start_store_server(tmp_path / "store", workdir=tmp_path / "nginx", workers=1) as server:
            devices = subprocess.Popen([sys.executable, "-m", "edge_kit.sim.virtual", str(fleet_file), "--workers", "16",
                                        "--behaviour", json.dumps({"fail_fetch": 0.01}), "--ready", str(ready),
                                        "--stats", str(stats_file)])
            try:
                deadline = time.monotonic() + 60
                while not ready.exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert ready.exists(), "the virtual devices did not start"
                history = Store(tmp_path / "h.db")
                cpu0, wall0 = time.process_time(), time.perf_counter()
                fleet = load_fleet(fleet_file)
                plan = plan_rollout("bench", artifacts, fleet, fleet.devices, server.url, None,
                                    RolloutSettings(waves=(0.01, 0.1, 1.0), rate_per_s=RATE, max_failed=0.05,
                                                    wave_timeout_s=120))
                history.save_rollout("bench", "running", plan)
                summary = Rollout(history, "bench", lambda cb: FleetClient.of(fleet, kinds=("reported",),
                                                                             on_reported=cb)).run()
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            finally:
                devices.send_signal(signal.SIGTERM)
                devices.wait(60)
    finally:
        broker.stop()
    stats = json.loads(stats_file.read_text())
    counts = summary["counts"]
    assert summary["state"] == "done" and counts.get("converged", 0) + counts.get("failed", 0) == N, counts
    assert stats["refused"] == 0 and not stats["errors"]
    published = N + stats["reported"]  # the host's desired states and the devices' reported states
    figure("pull rollout to 10,000 virtual devices: host CPU per device (plan, send, verify, record)",
           f"{cpu / N * 1e3:.2f} ms ({cpu:.1f} CPU-s)", "<= 2 ms",
           f"time.process_time() of the host process over plan_rollout + Rollout.run (all its threads: paho's network "
           f"loop, the Ed25519 signing of {N} desired states and verifying of {stats['reported']} reported ones, SQLite "
           "history); devices simulated in a child process (edge_kit.sim.virtual), real Mosquitto and nginx")
    figure("pull rollout: broker messages per device", f"{published / N:.2f}",
           "quoted", "PUBLISHes counted at the publishers: 1 retained desired per device, and its retained reported "
           f"states (fetching, then converged or failed: {stats['reported']} from the virtual devices); "
           f"{counts.get('failed', 0)} devices failed their download on purpose (1 %)")
    figure("pull rollout: wall time at a set rate of 1,000 devices/s", f"{wall:.1f} s (the rate alone: {N / RATE:.0f} s)",
           "quoted", "time.perf_counter() from plan to the last answer; waves 1 %, 10 %, 100 %, each waiting for "
           "its devices' answers; 16 KiB artifact downloaded from nginx by every device; the host, the devices, the "
           "broker and nginx share this machine's cores (simulated devices)")
