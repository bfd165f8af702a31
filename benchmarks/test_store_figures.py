"""Store figures: 1,000 simulated devices pull one 2 MB artifact from one nginx serving a published
store, 10 % of the downloads cut midway and resumed; what the store served against what was needed.

Every device is a thread (500 per process, two processes) running the agent's own
:func:`device_agents.fetch.fetch`; a cut device first reads half the artifact with
:func:`~device_agents.fetch.download_once` and drops the connection, then fetches again (a Range
request for the rest). The bytes served are nginx's own count ($body_bytes_sent in its access
log), so they include what a dropped connection still had in flight (nginx's send buffer is kept
at 16 KiB, as a real link's window would bound it). Downloads land on tmpfs and are deleted once
verified. All figures are simulated devices on this machine: labelled so.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest

from device_agents.fetch import artifact_url, download_once, fetch, partial_path
from edge_kit.fleet.artifact_store import publish
from edge_kit.manifest import Artifact, Manifest
from edge_kit.sim.links import create_links, parse_rate, remove_links
from edge_kit.sim.store_server import find_nginx, start_store_server

DEVICES = 1000
PROCESSES = 2
SIZE = 2 * 1024 * 1024
CUT_SHARE = 0.10
SNDBUF = 16 * 1024
LINK = "1gbit"  # the store's emulated link (tc tbf both ways, a server NIC's rate), where root allows

# nginx comes from .ci/setup (nginx-light): a machine without it fails here rather than skipping the figure.
assert find_nginx() is not None, "nginx is not installed (apt install nginx-light; .ci/setup does)"


def _published(root: Path) -> tuple[Path, str]:
    """Publish a compiled folder holding one random 2 MiB artifact; return the store and its sha256."""
    folder = root / "artifacts" / "bench"
    folder.mkdir(parents=True)
    data = os.urandom(SIZE)
    (folder / "int8.tflite").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    manifest = Manifest(created="2026-11-29T00:00:00+00:00", model={"name": "bench"}, versions={}, profiles={},
                        artifacts=[Artifact(id="int8", status="built", profiles=["rpi4"], summary="int8",
                                            precision="int8", file="int8.tflite", sha256=sha, bytes=SIZE)])
    (folder / "manifest.json").write_text(manifest.to_json())
    publish(folder, root / "store")
    return root / "store", sha


def _devices(url: str, sha: str, ids: list[int], out: str) -> dict:
    """One process: a thread per device id; return bytes received, failures and the slowest device's seconds."""
    threading.stack_size(256 * 1024)
    got = {"received": 0, "failed": [], "resumed": 0, "slowest": 0.0}
    lock = threading.Lock()
    start = threading.Event()

    def device(i: int) -> None:
        dest = Path(out) / f"dev{i}"
        start.wait()
        t0 = time.monotonic()
        received, resumed = 0, False
        try:
            if i % round(1 / CUT_SHARE) == 0:  # every tenth device is cut midway
                received += download_once(url, partial_path(dest), cut_after=SIZE // 2, timeout_s=60).received
            r = fetch(url, sha, dest, timeout_s=60)
            received += r.bytes_downloaded
            resumed = r.resumed
            dest.unlink()
        except Exception as exc:  # a device's failure is counted, never stops the others
            with lock:
                got["failed"].append(f"dev{i}: {exc}")
        with lock:
            got["received"] += received
            got["resumed"] += resumed
            got["slowest"] = max(got["slowest"], time.monotonic() - t0)

    threads = [threading.Thread(target=device, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    start.set()
    for t in threads:
        t.join()
    return got


def _pull(url: str, sha: str) -> tuple[dict, float]:
    """Run the 1,000 devices; return the merged counts and the wall seconds."""
    out = tempfile.mkdtemp(prefix="edgekit-fetch-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        ids = list(range(DEVICES))
        with ProcessPoolExecutor(PROCESSES, mp_context=get_context("fork")) as pool:
            pool.submit(int).result()  # the processes exist before the clock starts
            t0 = time.monotonic()
            parts = list(pool.map(_devices, [url] * PROCESSES, [sha] * PROCESSES, [ids[k::PROCESSES] for k in
                                                                                  range(PROCESSES)], [out] * PROCESSES))
            wall = time.monotonic() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    merged = {"received": sum(p["received"] for p in parts), "failed": [f for p in parts for f in p["failed"]],
              "resumed": sum(p["resumed"] for p in parts), "slowest": max(p["slowest"] for p in parts)}
    return merged, wall


def _record(figure, where: str, server, got: dict, wall: float) -> float:
    needed = SIZE * DEVICES
    reqs = server.wait_requests(DEVICES + int(DEVICES * CUT_SHARE), timeout=30)
    served = sum(r["bytes"] for r in reqs)
    ratio = served / needed
    assert not got["failed"], got["failed"][:3]
    assert got["received"] == needed and got["resumed"] == int(DEVICES * CUT_SHARE)
    assert ratio <= 1.01, ratio  # each device downloads once; a resume fetches only what it lacks
    figure(f"{where}: store bytes served / (artifact bytes x devices), 1,000 simulated devices, 2 MiB, 10 % cut "
           "midway and resumed", f"{ratio:.4f}", "1.00",
           f"nginx access log $body_bytes_sent, {len(reqs)} requests; {served - needed:,} bytes over = what the "
           f"{int(DEVICES * CUT_SHARE)} cut connections had in flight (send buffer {SNDBUF // 1024} KiB); simulated")
    figure(f"{where}: bytes the devices received / (artifact bytes x devices)", f"{got['received'] / needed:.4f}",
           "1.00", "sum of FetchResult.bytes_downloaded + the cut attempts' bytes; every file sha256-checked; simulated")
    return served


def test_thousand_devices_pull_from_one_store_on_loopback(figure, tmp_path):
    store, sha = _published(tmp_path)
    with start_store_server(store, workdir=tmp_path / "nginx", sndbuf=SNDBUF, embedded=False) as server:
        got, wall = _pull(artifact_url(server.url, sha), sha)
        served = _record(figure, "loopback", server, got, wall)
    figure("loopback: wall time for 1,000 simulated devices to pull 2 MiB (100 cut and resumed)",
           f"{wall:.1f} s ({served / wall / 1e6:.0f} MB/s served)", "info",
           f"time.monotonic around all downloads; nginx (1 worker) and {PROCESSES} client processes x "
           f"{DEVICES // PROCESSES} threads share this machine's {os.cpu_count()} cores: the clients' CPU bounds it, "
           f"not a link; slowest device {got['slowest']:.1f} s; machine-local, simulated")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("tc"), reason="emulating the store's link needs root and iproute2")
def test_thousand_devices_pull_through_the_stores_emulated_link(figure, tmp_path):
    store, sha = _published(tmp_path)
    rate = parse_rate(LINK)
    links = create_links(1, rate)  # the store sits in its own namespace behind a tc tbf link of `rate` each way
    try:
        with start_store_server(store, host=links.address(0), workdir=tmp_path / "nginx", sndbuf=SNDBUF,
                                embedded=False, wrap=links.wrap(0)) as server:
            got, wall = _pull(artifact_url(server.url, sha), sha)
            served = _record(figure, f"{LINK} store link", server, got, wall)
    finally:
        remove_links(links)
    floor = served * 8 / rate
    figure(f"{LINK} store link (tc tbf, emulated): wall time for 1,000 devices / the link's floor (bytes served / rate)",
           f"{wall / floor:.2f} ({wall:.1f} s / {floor:.1f} s)", "info (1.00 = the link is the bound)",
           f"time.monotonic around all downloads; floor = bytes served x 8 / {rate / 1e6:g} Mbit/s; headers and TCP/IP "
           "overhead are above the floor; simulated devices, emulated link")
