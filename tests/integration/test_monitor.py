"""The fleet monitor against a real Mosquitto: validation, dedup, gaps, alerts, metrics, shared subscriptions."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import time
import urllib.request

import paho.mqtt.client as mqtt
import pytest
from harness import wait_until
from paho.mqtt.enums import CallbackAPIVersion

from device_agents.identity import Signer
from edge_kit.fleet.inventory import load_fleet
from edge_kit.sim.broker import free_port
from edge_kit.telemetry.metrics import FleetMetrics
from edge_kit.telemetry.monitor import Monitor
from edge_kit.telemetry.store import Store
from edgekit_protocol import messages

pytestmark = pytest.mark.integration
FLEET = "mon"
DEVICE_KEYS = {"d1": Signer.generate(), "d2": Signer.generate()}  # what a deploy would have provisioned


@pytest.fixture
def fleet(mosquitto, tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text(f"fleet: {FLEET}\nbroker: {{host: 127.0.0.1, port: {mosquitto.port}}}\n"
                    "defaults: {user: edgekit, profile: rpi4}\n"
                    "devices:\n  - {name: d1, host: 127.0.0.1}\n"
                    "  - {name: d2, host: 127.0.0.1, constraints: {min_fidelity_snr_db: 20}}\n")
    fleet = load_fleet(path)
    for name, signer in DEVICE_KEYS.items():
        fleet.key_store().register(name, signer.public)
    return fleet


@pytest.fixture
def publisher(mosquitto):
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-publisher")
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    yield client
    client.disconnect()
    client.loop_stop()


def bench(device: str, seq: int, p90: float = 5.0, variant: str = "int8") -> dict:
    return messages.envelope("bench", FLEET, device, seq, {
        "variant": variant, "sha256": "a" * 64, "model_bytes": 200_000, "profile": "rpi4", "runs": 100,
        "latency_ms": {"p50": p90 / 2, "p90": p90, "p99": p90 * 1.2, "mean": p90 / 2, "std": 0.1, "min": 0.1, "max": p90 * 2},
        "power": {"measured": True, "estimated": False, "sensor": "ina219", "avg_w": 4.2, "energy_per_inference_mj": 0.5,
                  "method": "ina219"}, "accuracy": {"metric": "top1", "value": 0.99, "samples": 360}, "simulated": False})


def monitor_session(fleet, client_id: str) -> str:
    """Open the persistent session that a monitor run with ``--client-id client_id`` takes over, subscribed as the
    monitor subscribes, and return ``client_id``: what is published from now on waits for that run at the broker,
    however long the CLI takes to start (a test that slept 1 s first lost its records on a busy machine)."""
    import threading

    from edge_kit.telemetry.monitor import STORED_KINDS

    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect(fleet.broker.host, fleet.broker.port)
    client.loop_start()
    client.subscribe([(messages.subscription(FLEET, k), 1) for k in STORED_KINDS])
    assert subscribed.wait(10), "the broker did not confirm the monitor's subscriptions"
    client.disconnect()
    client.loop_stop()
    return client_id


def signed(message: dict) -> dict:
    """Return the message signed by the key registered for the device it names."""
    return DEVICE_KEYS[message["device"]].sign(message)


def send(client, kind: str, payload: bytes | dict, device: str = "d1") -> None:
    """Publish on ``device``'s topic: a dict signed by the device it names, bytes as they are."""
    data = messages.encode(signed(payload)) if isinstance(payload, dict) else payload
    client.publish(messages.topic(FLEET, device, kind), data, qos=1).wait_for_publish(5)


def test_malformed_and_duplicate_messages_leave_each_valid_record_once(fleet, publisher, tmp_path):
    store = Store(tmp_path / "h.db")
    mon = Monitor(fleet, store).start()
    try:
        records = [bench("d1", i) for i in range(1, 6)]
        for rec in records:
            send(publisher, "bench", rec)
            send(publisher, "bench", rec)  # a QoS 1 redelivery or a spool replay
        send(publisher, "bench", records[0])
        bad = [b"not json", b"[]", messages.encode({**bench("d1", 9), "latency_ms": {"p90": "fast"}}),
               messages.encode({k: v for k, v in bench("d1", 9).items() if k != "msg_id"}),
               messages.encode({**bench("d1", 9), "device": "d2"}),  # names d2, came on d1's topic
               messages.encode(messages.envelope("status", FLEET, "d1", 1, {"state": "sleeping"})), b"\xff" * 10]
        for payload in bad:
            send(publisher, "bench" if b"sleeping" not in payload else "status", payload)
        send(publisher, "bench", bench("d1", 8))  # 6 and 7 never come: a gap
        assert wait_until(lambda: mon.stats.received == 5 * 2 + 1 + len(bad) + 1, 20), mon.stats
    finally:
        mon.stop()
    assert store.count("bench") == 6 and mon.stats.stored == 6
    assert mon.stats.duplicates == 6 and mon.stats.invalid == len(bad) == store.count("invalid")
    assert mon.stats.gaps == 1
    assert sorted(r["seq"] for r in store.bench_records("d1")) == [1, 2, 3, 4, 5, 8]


def test_alerts_for_offline_broken_constraints_and_silence(fleet, publisher, tmp_path):
    mon = Monitor(fleet, Store(tmp_path / "h.db"), silence_s=1.0).start()
    try:
        send(publisher, "status", messages.envelope("status", FLEET, "d2", 1, {"state": "offline"}), device="d2")
        send(publisher, "bench", bench("d1", 1, p90=80.0))  # rpi4 allows p90 <= 50 ms
        low = {"conditions": {}, "spool": {}, "disk": {"free_bytes": 9e6, "total_bytes": 3e10, "full": False}}
        for seq in (1, 2):  # the same episode: alerted once
            send(publisher, "telemetry", messages.envelope("telemetry", FLEET, "d1", seq, low))
        send(publisher, "telemetry", messages.envelope("telemetry", FLEET, "d1", 3, {**low, "disk": {"free_bytes": 5e9}}))
        send(publisher, "status", messages.envelope("status", FLEET, "d1", 1, {
            "state": "online", "disk": {"free_bytes": 1e6, "total_bytes": 3e10, "full": True}}))
        def shadow_snr(seq, snr):  # d2's shadow comparison: its served int8 against an fp32 shadow on live inputs
            send(publisher, "shadow", messages.envelope("shadow", FLEET, "d2", seq, {
                "model": {"sha256": "b", "variant": "fp32"}, "serving": {"sha256": "a", "variant": "int8"},
                "compared": 40 + seq, "window": 40, "fidelity": {"snr_db": snr}}), device="d2")
        for seq, snr in enumerate((31.0, 12.5, 11.0, 30.0, 9.0), start=1):  # drifts, stays low, recovers, drifts
            shadow_snr(seq, snr)
        assert wait_until(lambda: {a.kind for a in mon.alerts} >= {"offline", "constraints", "silent"}, 10), mon.alerts
        assert wait_until(lambda: len([a for a in mon.alerts if a.kind == "disk"]) == 2, 10), mon.alerts
        assert wait_until(lambda: len([a for a in mon.alerts if a.kind == "drift"]) == 2, 10), mon.alerts
    finally:
        mon.stop()
    texts = [a.text for a in mon.alerts]
    assert "d2 went offline" in texts and "d1 int8: breaks p90 <= 50 ms (80 ms p90, the device's clock)" in texts
    assert [a.text for a in mon.alerts if a.kind == "drift"][0] == (
        "d2: live outputs of int8 are 12.5 dB from fp32 (shadow, 40 inputs), below 20 dB")
    assert [a.text for a in mon.alerts if a.kind == "disk"] == [
        "d1: 9.0 MB free (below 32 MB)", "d1: 1.0 MB free (full: installs, activations and benches refused)"]


def test_a_variant_losing_accuracy_against_the_device_s_fp32_is_alerted_alone_and_with_share(fleet, publisher, tmp_path):
    """The Raspberry Pi user's case: the monitor running, `edgekit bench --variant int8` on a device whose int8 scores
    51.25 % against its fp32's 53.75 % (rpi4: min_accuracy_ratio 0.99): 0 alerts, the bound judged without the fp32
    accuracy. Now the monitor takes d1's fp32 accuracy from the history as it starts, d2's from the record that arrives
    (with --share, whichever worker the broker hands it to: the history is shared), and alerts each int8 once."""
    def scored(device, seq, variant, value):
        return {**bench(device, seq, p90=5.0, variant=variant), "model": "digits", "sha256": variant[0] * 64,
                "accuracy": {"metric": "top1", "value": value, "samples": 80}}

    expected = ("{d} int8: breaks accuracy >= 0.99 x fp32 (51.25% on the eval set, 0.9535 x fp32's 53.75%, its newest "
                "fp32 benchmark on {d})")
    store = Store(tmp_path / "h.db")
    store.add("bench", signed(scored("d1", 1, "fp32", 0.5375)))
    mon = Monitor(fleet, store).start()
    try:
        send(publisher, "bench", scored("d1", 2, "int8", 0.5125))
        send(publisher, "bench", scored("d2", 1, "fp32", 0.5375), device="d2")
        send(publisher, "bench", scored("d2", 2, "int8", 0.5125), device="d2")
        assert wait_until(lambda: mon.stats.stored == 3, 20), mon.stats
    finally:
        mon.stop()
    assert sorted(a.text for a in mon.alerts) == [expected.format(d="d1"), expected.format(d="d2")]

    shared = Store(tmp_path / "shared.db")
    workers = [Monitor(fleet, shared, share="acc", workers=2, client_id=f"acc-{i}") for i in range(2)]
    for worker in workers:
        worker.start()
    try:
        for seq in range(1, 6):  # fp32 to one worker or the other, then int8 to either: judged all the same
            send(publisher, "bench", scored("d1", 2 * seq - 1, "fp32", 0.5375))
            assert wait_until(lambda: shared.count("bench") == 2 * seq - 1, 20)
            send(publisher, "bench", scored("d1", 2 * seq, "int8", 0.5125 if seq % 2 else 0.535))  # breaks, meets
            assert wait_until(lambda: shared.count("bench") == 2 * seq, 20)
    finally:
        for worker in workers:
            worker.stop()
    raised = sorted(a.text for w in workers for a in w.alerts)
    assert raised == [expected.format(d="d1")] * 3, raised  # each breaking episode once, by one worker
    assert [(r["device"], r["kind"], r["cleared_at"] is None) for r in shared.alerts(limit=10)] == [
        ("d1", "constraints", True)] + [("d1", "constraints", False)] * 2


def test_prometheus_endpoint_exports_per_device_and_variant_series(fleet, publisher, tmp_path):
    """Benchmarks, status, and the serving API's figures and shadow comparisons from their own topics: each
    verified as its device's (a forged one is refused and counted), stored in its table, gaps found per kind."""
    metrics = FleetMetrics()
    store = Store(tmp_path / "h.db")
    mon = Monitor(fleet, store, on_message=metrics.observe)
    metrics.watch(mon)
    port = free_port()
    server = metrics.serve(port)
    mon.start()
    try:
        send(publisher, "bench", bench("d1", 1, p90=7.5))
        send(publisher, "status", messages.envelope("status", FLEET, "d1", 1, {
            "state": "online", "disk": {"free_bytes": 123456789, "total_bytes": 3e10, "full": False}}))
        live = {"source": "live", "model": {"sha256": "ab", "variant": "int8"}, "requests": 42, "errors": 1,
                "window": 42, "queue_depth": 0, "latency_ms": {"p50": 0.4, "p90": 0.6, "p99": 0.9}}
        send(publisher, "live", messages.envelope("live", FLEET, "d1", 1, {**live, "requests": 40}))
        send(publisher, "live", messages.envelope("live", FLEET, "d1", 3, live))  # seq 2 never comes: a gap
        send(publisher, "shadow", messages.envelope("shadow", FLEET, "d1", 1, {
            "model": {"sha256": "cd", "variant": "fp32"}, "serving": live["model"], "compared": 30, "window": 30,
            "fidelity": {"snr_db": 33.5, "cosine": 0.99}}))
        forged = DEVICE_KEYS["d2"].sign(messages.envelope("live", FLEET, "d1", 4, {**live, "requests": 10 ** 6}))
        send(publisher, "live", messages.encode(forged))  # d2's key, on d1's topic in d1's name
        send(publisher, "live", messages.encode(signed(messages.envelope("live", FLEET, "d1", 5, {
            **live, "latency_ms": {"p99": 1}})))[:-40])  # cut short
        assert wait_until(lambda: mon.stats.stored == 5 and mon.stats.invalid == 2, 10), mon.stats
        scraped = {"text": ""}

        def scrape() -> str:  # the metrics follow each stored message from the writer thread, just after it counts
            scraped["text"] = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            return scraped["text"]

        wait_until(lambda: 'edgekit_live_requests{device="d1",variant="int8"} 42.0' in scrape()
                   and "edgekit_live_shadow_snr_db" in scraped["text"], 10)
        text = scraped["text"]
    finally:
        mon.stop()
        server.shutdown()
    assert store.count("live") == 2 and store.count("shadow") == 1 and store.count("invalid") == 2
    assert store.latest_live()["d1"]["requests"] == 42 and store.latest_shadow()["d1"]["fidelity"]["snr_db"] == 33.5
    assert mon.stats.gaps == 1 and store._rows("SELECT kind, first_missing FROM gaps") == [("live", 2)]
    refused = [a.text for a in mon.alerts if a.kind == "refused"]
    assert len(refused) == 2 and any("/d1/live" in t and "not d1's registered key" in t for t in refused), refused
    assert 'edgekit_latency_ms{device="d1",quantile="p90",variant="int8"} 7.5' in text
    assert 'edgekit_power_watts{device="d1",source="ina219",variant="int8"} 4.2' in text
    assert 'edgekit_accuracy{device="d1",metric="top1",variant="int8"} 0.99' in text
    assert 'edgekit_device_online{device="d1"} 1.0' in text
    assert 'edgekit_device_disk_free_bytes{device="d1"} 1.23456789e+08' in text
    assert 'edgekit_device_disk_full{device="d1"} 0.0' in text
    assert 'edgekit_live_requests{device="d1",variant="int8"} 42.0' in text
    assert 'edgekit_live_latency_ms{device="d1",quantile="p99",variant="int8"} 0.9' in text
    assert 'edgekit_live_shadow_snr_db{device="d1",shadow="fp32",variant="int8"} 33.5' in text
    assert 'edgekit_monitor_messages_total{outcome="stored"} 5.0' in text
    assert 'edgekit_monitor_messages_total{outcome="invalid"} 2.0' in text


def test_metrics_url_is_printed_only_once_a_scrape_gets_every_series(fleet, tmp_path):
    """The first `curl` of the URL `edgekit monitor --metrics-port` printed came back without the alert gauges
    (edgekit_device_drifting, _low_disk, _silent, _breaking_constraints): the URL was printed before the monitor read
    the history, and those are exported only from then. Now it is printed once /metrics answers with every series'
    HELP and TYPE: a scrape the moment the line appears gets them all."""
    import os
    import subprocess
    import sys

    from prometheus_client import generate_latest

    from edge_kit.telemetry.metrics import ALERT_GAUGES

    every = {line.split()[2] for line in generate_latest(FleetMetrics().registry).decode().splitlines()
             if line.startswith("# TYPE")}
    every |= {name for _kind, name, _help in ALERT_GAUGES} | {"edgekit_monitor_messages_total",
                                                              "edgekit_monitor_over_budget_total"}
    # a history that takes a second to read as the monitor starts (a Raspberry Pi's SD card): the window the URL fell in
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(
        "import time\nfrom edge_kit.telemetry import monitor\nseed = monitor.Monitor._seed_alert_states\n"
        "monitor.Monitor._seed_alert_states = lambda self, *a: (time.sleep(1.0), seed(self, *a))[1]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(slow), *sys.path])}
    proc = subprocess.Popen([sys.executable, "-m", "edge_kit", "monitor", "--fleet", str(tmp_path / "fleet.yaml"),
                             "--metrics-port", "0", "--duration", "2", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        assert line.startswith("edgekit: Prometheus metrics at http://127.0.0.1:"), line + proc.stderr.read()
        text = urllib.request.urlopen(line.split(" at ")[1].strip(), timeout=5).read().decode()  # at once
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    for kind in ("HELP", "TYPE"):
        served = {row.split()[2] for row in text.splitlines() if row.startswith(f"# {kind} ")}
        assert every <= served, (kind, sorted(every - served))


def test_a_monitor_started_over_a_kept_history_exports_its_figures_in_metrics_before_any_message(fleet, tmp_path):
    """/metrics was built only from the messages a run received: a monitor started again (or `edgekit monitor` over a
    kept demo) showed the fleet's figures in `edgekit report` but nothing in /metrics until each device spoke again.
    Now the gauges start from the history (the fleet file's devices), then follow what arrives. So do the alerts that
    hold over an episode: the drift, low disk and silence the earlier monitor kept open in the alerts table are not
    alerted again (d2); a device silent since before the restart without an open alert is alerted (d1: the monitor
    that stored the last record was gone before d1's limit passed); last heard is any kind's receive time."""
    import os
    import subprocess
    import sys

    live = {"source": "live", "model": {"sha256": "ab", "variant": "int8"}, "requests": 42, "errors": 1,
            "window": 42, "queue_depth": 0, "latency_ms": {"p50": 0.4, "p90": 0.6, "p99": 0.9}}
    kept = [("bench", bench("d1", 1, p90=9.0)), ("bench", bench("d1", 2, p90=7.5)),  # the newest of int8 is 7.5
            ("bench", {**bench("d1", 3, p90=3.0, variant="fp16"), "sha256": "b" * 64}),
            ("status", messages.envelope("status", FLEET, "d1", 1, {
                "state": "offline", "disk": {"free_bytes": 123456789, "total_bytes": 3e10, "full": False}})),
            ("shadow", messages.envelope("shadow", FLEET, "d2", 1, {
                "model": {"sha256": "cd", "variant": "fp32"}, "serving": live["model"], "compared": 30, "window": 30,
                "fidelity": {"snr_db": 12.5, "cosine": 0.9}})),  # under d2's min_fidelity_snr_db: drifting
            ("bench", {**bench("d1", 4), "device": "gone"}),  # a device no longer in the fleet file
            ("bench", {**bench("d2", 1), "latency_ms": None}),  # a row the gauges cannot read: left out, alone
            ("status", messages.envelope("status", FLEET, "d2", 1, {  # 1 MB free, under --min-free-mb 32: low
                "state": "online", "disk": {"free_bytes": 1_000_000, "total_bytes": 3e10, "full": False}}))]
    with Store(tmp_path / "edgekit-history.db") as store:
        for i, (kind, msg) in enumerate(kept):
            store.add_many([(kind, msg)], received=[1_700_000_000.0 + i])
        # d1's newest record is a live one, 1,000 s later: last heard (not its status's time), and the last record
        # stored (its silence limit passed after it; d2's, 180 s after its records, before it)
        store.add_many([("live", messages.envelope("live", FLEET, "d1", 1, live))], received=[1_700_001_000.0])
        for kind, detail in (("drift", "d2: live outputs of int8 are 12.5 dB from fp32"),
                             ("low_disk", "d2: 1.0 MB free (below 32 MB)"), ("silent", "d2 silent for 181 s")):
            store.open_alert("d2", kind, detail, at=1_700_000_990.0)  # what the earlier monitor raised, kept open
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "edge_kit", "monitor", "--fleet", str(tmp_path / "fleet.yaml"),
                             "--metrics-port", str(port), "--duration", "5", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    scraped = {"text": ""}

    def scrape() -> bool:  # once the monitor has started and checked the silence (within 0.2 s of starting)
        try:
            scraped["text"] = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            return False
        return 'edgekit_device_silent{device="d1"} 1.0' in scraped["text"]

    try:
        assert wait_until(scrape, 30, step=0.5), scraped["text"] or "no /metrics"
        out, err = proc.communicate(timeout=60)  # /metrics is served from before the monitor starts until it stops
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    alerts = json.loads(out)["alerts"]
    assert [a for a in alerts if a["kind"] in ("drift", "disk")] == []  # episodes under way: not news
    # but shown as carried over: the run that raised them may have died before printing them
    carried = json.loads(out)["carried_over"]
    assert [(r["device"], r["kind"], r["still_open"], r["raised_at"]) for r in carried] == [
        ("d2", kind, True, 1_700_000_990.0) for kind in ("silent", "low_disk", "drift")]
    assert json.loads(out)["carried_over_total"] == 3
    assert [a["device"] for a in alerts if a["kind"] == "silent"] == ["d1"], alerts
    text = scraped["text"]
    assert 'edgekit_latency_ms{device="d1",quantile="p90",variant="int8"} 7.5' in text
    assert 'edgekit_latency_ms{device="d1",quantile="p90",variant="fp16"} 3.0' in text
    assert 'edgekit_power_watts{device="d1",source="ina219",variant="int8"} 4.2' in text
    assert 'edgekit_accuracy{device="d1",metric="top1",variant="int8"} 0.99' in text
    assert 'edgekit_device_online{device="d1"} 0.0' in text
    assert 'edgekit_device_disk_free_bytes{device="d1"} 1.23456789e+08' in text
    assert 'edgekit_live_requests{device="d1",variant="int8"} 42.0' in text
    assert 'edgekit_live_latency_ms{device="d1",quantile="p99",variant="int8"} 0.9' in text
    assert 'edgekit_live_shadow_snr_db{device="d2",shadow="fp32",variant="int8"} 12.5' in text
    assert 'edgekit_device_drifting{device="d2"} 1.0' in text and 'edgekit_device_drifting{device="d1"} 0.0' in text
    assert 'edgekit_device_low_disk{device="d2"} 1.0' in text and 'edgekit_device_low_disk{device="d1"} 0.0' in text
    assert 'edgekit_device_silent{device="d2"} 1.0' in text
    assert 'edgekit_device_last_seen_seconds{device="d1"} 1.700001e+09' in text  # when stored (its live), not now
    assert 'device="gone"' not in text and 'edgekit_latency_ms{device="d2"' not in text


def test_two_workers_on_a_shared_subscription_split_the_stream_with_nothing_lost_or_doubled(fleet, publisher, tmp_path):
    store_path = tmp_path / "h.db"
    workers = [Monitor(fleet, Store(store_path), share="edgekit", workers=2).start() for _ in range(2)]
    try:
        n = 400
        for i in range(1, n + 1):
            publisher.publish(messages.topic(FLEET, f"d{1 + i % 2}", "bench"), messages.encode(signed(bench(f"d{1 + i % 2}", i))), qos=1)
        assert wait_until(lambda: sum(w.stats.stored for w in workers) >= n, 30)
        time.sleep(0.3)
    finally:
        for w in workers:
            w.stop()
    counts = [w.stats.stored for w in workers]
    assert sum(counts) == n and min(counts) > n // 4  # both took a share
    assert Store(store_path).count("bench") == n


def test_monitor_cli_json_summary_and_fleet_status(fleet, publisher, tmp_path, run_cli, mosquitto):
    fleet_file = tmp_path / "fleet.yaml"
    import threading

    cid = monitor_session(fleet, "cli-summary")

    def feed():
        send(publisher, "status", messages.envelope("status", FLEET, "d1", 1, {"state": "online",
                                                                           "current": {"variant": "int8", "sha256": "a" * 64}}))
        send(publisher, "bench", bench("d1", 1, p90=3.25))
        send(publisher, "bench", b"garbage")

    threading.Thread(target=feed, daemon=True).start()
    code, out, err = run_cli("monitor", "--fleet", fleet_file, "--client-id", cid, "--duration", "3", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["stored"] == 2 and summary["invalid"] == 1
    assert summary["over_budget"] == 0 and summary["over_budget_by_device"] == {}  # two records: within any budget
    code, out, err = run_cli("fleet", "status", "--fleet", fleet_file)
    assert code == 0 and "d1" in out and "int8" in out and "3.25" in out and "never seen" in out


def test_after_an_outage_only_the_device_that_sent_nothing_meanwhile_is_alerted_silent(fleet, publisher, tmp_path, run_cli):
    """A monitor started again counts silence from the history's records: d2, last stored 10 minutes ago (after the
    monitor before it stopped), is alerted. d1 spoke while the monitor was stopped (the broker queued its spool for the
    persistent session): judged from the history while its queued records were still being checked, it was alerted
    too."""
    now = time.time()
    with Store(tmp_path / "edgekit-history.db") as store:  # what the run before stored, then it stopped
        store.add_many([("bench", bench("d1", 1)), ("bench", bench("d2", 1))], received=[now - 600, now - 600])
    cid = monitor_session(fleet, "cli-outage")
    sent = [publisher.publish(messages.topic(FLEET, "d1", "bench"), messages.encode(signed(bench("d1", seq))), qos=1)
            for seq in range(2, 3002)]  # queued by the broker for the stopped monitor
    for info in sent:
        info.wait_for_publish(30)
    code, out, err = run_cli("monitor", "--fleet", tmp_path / "fleet.yaml", "--client-id", cid, "--duration", "8",
                             "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["stored"] == 3000, summary
    assert [a["device"] for a in summary["alerts"] if a["kind"] == "silent"] == ["d2"], summary["alerts"]


def test_a_flood_of_refused_messages_is_counted_without_bound_but_stored_and_kept_in_memory_within_one(
        fleet, tmp_path, monkeypatch):
    """A compromised device (or a loose ACL) sending junk without end: every message is counted, the
    history keeps at most MAX_INVALID_ROWS of them (short payloads after the first 1,000) and memory the
    newest MAX_ALERTS alerts; the monitor says when it stops storing."""
    from edge_kit.telemetry import monitor as monitor_module

    monkeypatch.setattr(monitor_module, "MAX_INVALID_ROWS", 1_200)
    monkeypatch.setattr(monitor_module, "MAX_ALERTS", 50)
    store = Store(tmp_path / "h.db")
    mon = Monitor(fleet, store, verify_in_child=False)
    junk = messages.encode(bench("d1", 2)) + b" " * 6000  # unsigned, 6 kB
    now = time.time()
    for _ in range(2):
        mon._store([(messages.topic(FLEET, "d1", "bench"), junk, now)] * 600)
    assert mon.alerts[-1].text.startswith("1,200 refused messages stored in this run; more are counted")
    mon._store([(messages.topic(FLEET, "d1", "bench"), junk, now)] * 300)
    assert mon.stats.invalid == 1_500 and store.count("invalid") == 1_200
    assert mon.alerts_raised == 1_501 and len(mon.alerts) == 50  # one per refusal, and the one saying it stopped
    sizes = [len(p) for (p,) in store._rows("SELECT payload FROM invalid ORDER BY id")]
    assert sizes[:1000] == [4096] * 1000 and set(sizes[1000:]) == {256}


@pytest.mark.parametrize("verifier", ["child process", "child killed"])
def test_forged_replayed_future_and_non_finite_messages_are_refused_counted_and_alerted(fleet, publisher, tmp_path,
                                                                                       verifier):
    """What an attacker on the broker can send: none of it is stored, each is counted and alerted;
    also when the verifying child process is killed (started again, or verified in the monitor)."""
    store = Store(tmp_path / "h.db")
    mon = Monitor(fleet, store).start()
    assert mon.verifier is not None and mon.verifier._proc.is_alive()
    if verifier == "child killed":
        mon.verifier._proc.kill()
        mon.verifier._proc.join(5)
    intruder = Signer.generate()  # a key nobody registered
    try:
        send(publisher, "bench", bench("d1", 1, p90=20.0))  # the real measurement
        forged = [
            messages.encode(bench("d1", 2, p90=0.001)),  # unsigned
            messages.encode(intruder.sign(bench("d1", 3, p90=0.001))),  # signed, but not by d1's key
            messages.encode({**signed(bench("d1", 4, p90=20.0)), "latency_ms": {**bench("d1", 4)["latency_ms"], "p90": 0.001}}),
            messages.encode(signed({**bench("d1", 5, p90=0.001), "ts": 4_102_444_800.0})),  # year 2100
            messages.encode(DEVICE_KEYS["d2"].sign(bench("d2", 6, p90=0.001))).replace(b'"device":"d2"', b'"device":"d1"'),
            messages.encode(signed(bench("d1", 7))).replace(b'"p90":5.0', b'"p90":NaN'),
            messages.encode(signed({**bench("d1", 8), "accuracy": [1]})),  # signed, but not the schema
            b'{"seq":1' + b"0" * 5000 + b"}",  # an integer Python refuses to parse
        ]
        for payload in forged:
            send(publisher, "bench", payload)
        send(publisher, "status", messages.encode(intruder.sign(messages.envelope("status", FLEET, "d2", 1,
                                                                                  {"state": "offline"}))), device="d2")
        assert wait_until(lambda: mon.stats.received == 1 + len(forged) + 1, 20), mon.stats
    finally:
        mon.stop()
    assert store.count("bench") == 1 and [r["latency_ms"]["p90"] for r in store.bench_records("d1")] == [20.0]
    assert mon.stats.invalid == len(forged) + 1 == store.count("invalid") == len([a for a in mon.alerts if a.kind == "refused"])
    reasons = " | ".join(a.text for a in mon.alerts)
    for why in ("key_id", "not d1's registered key", "signature does not verify", "ahead of the receiver's clock",
                "non-finite number NaN"):
        assert why in reasons, why
    assert store.latest_status() == {}  # the forged offline status of d2 was not kept


def test_a_monitor_stopped_while_devices_publish_stores_everything_when_it_comes_back(fleet, publisher, tmp_path, run_cli):
    """`edgekit monitor` keeps a persistent session under a fixed client id: the broker queues what is
    published while it is down, and the next run stores all of it, once, with no gap."""
    fleet_file = tmp_path / "fleet.yaml"
    code, out, _ = run_cli("monitor", "--fleet", fleet_file, "--duration", "1", "--json")
    assert code == 0 and json.loads(out)["stored"] == 0
    for seq in range(1, 201):  # the monitor is down: 200 records from two devices
        send(publisher, "bench", bench(f"d{1 + seq % 2}", seq // 2 + 1), device=f"d{1 + seq % 2}")
    code, out, err = run_cli("monitor", "--fleet", fleet_file, "--duration", "3", "--json")
    summary = json.loads(out)
    assert code == 0 and summary["stored"] == 200 and summary["gaps"] == 0 and summary["invalid"] == 0, summary
    store = Store(tmp_path / "edgekit-history.db")
    assert store.count("bench") == 200 and store.count("gaps") == 0


def test_a_bug_on_one_message_loses_none_of_the_others_in_its_batch(fleet, tmp_path, monkeypatch):
    """A check that raised outside the per-message refusals (a bug) dropped its whole batch, acknowledged:
    500 messages lost for one. Now the batch is checked one message at a time: the one it fails on is
    counted, alerted and kept as invalid with the error; the others are stored."""
    store = Store(tmp_path / "h.db")
    mon = Monitor(fleet, store, verify_in_child=False)
    topic = messages.topic(FLEET, "d1", "bench")
    good = [messages.encode(signed(bench("d1", seq))) for seq in (1, 2, 3)]
    poison = messages.encode(signed(bench("d1", 4)))
    real = Monitor._check

    def buggy(self, batch, local=False):
        if any(payload == poison for _, payload, *_ in batch):
            raise RuntimeError("a bug")
        return real(self, batch, local)

    monkeypatch.setattr(Monitor, "_check", buggy)
    now = time.time()
    checked, mids = mon._check_batch([(topic, p, now, i) for i, p in enumerate([good[0], poison, *good[1:]])])
    mon._keep(*checked)
    assert mids == [0, 1, 2, 3]  # all acknowledged: three stored, the fourth kept as invalid
    assert store.count("bench") == 3 and mon.stats.received == 4 and mon.stats.invalid == 1
    ((reason,),) = store._rows("SELECT reason FROM invalid")
    assert reason == "checking it failed: RuntimeError: a bug"
    assert any("checked one at a time" in a.text for a in mon.alerts)


def test_a_refused_message_s_topic_is_kept_short_in_alerts_and_the_invalid_table(fleet, tmp_path):
    """The topic of a refused message was kept whole as the alert's device, in its text and in the invalid
    table: a sender's device level may be 64 KiB long (one '+' matches it), so 10,000 alerts held 640 MB and
    each stored refusal 64 KiB, whatever the payload cut. Now the topic is cut like the reason."""
    from edge_kit.telemetry import monitor as monitor_module

    store = Store(tmp_path / "h.db")
    mon = Monitor(fleet, store, verify_in_child=False)
    topic = messages.topic(FLEET, "x" * 60_000, "bench")
    mon._store([(topic, messages.encode(bench("d1", 2)), time.time())] * 20)
    assert mon.stats.invalid == 20 and len(mon.alerts) == 20
    limit = 300  # the cut (MAX_TOPIC) and how long it was
    assert all(len(a.device) <= limit and len(a.text) <= monitor_module.MAX_ALERT_CHARS + 40 for a in mon.alerts)
    assert "60," in mon.alerts[0].device  # says how long it was
    topics = [t for (t,) in store._rows("SELECT topic FROM invalid")]
    assert len(topics) == 20 and max(map(len, topics)) <= limit


@pytest.mark.parametrize("option, value, error", [
    ("--share", "a/b", "--share 'a/b': give a group name without '/', '+', '#' or control characters, in UTF-8 "
                       "(e.g. monitors)"),
    ("--share", "", "--share '': give a group name without '/', '+', '#' or control characters, in UTF-8 (e.g. monitors)"),
    ("--share", "g\udcff", "--share 'g\\udcff': give a group name without '/', '+', '#' or control characters, in "
                          "UTF-8 (e.g. monitors)"),
    ("--workers", "2", "--workers 2: only with --share (the workers of one shared subscription)"),
    ("--client-id", "", "--client-id: give 1 to 65,535 bytes (got 0)"),
    ("--client-id", "x" * 70_000, "--client-id: give 1 to 65,535 bytes (got 70,000)"),
    ("--client-id", "x\ny", "--client-id 'x\\ny': give one without control characters, in UTF-8 (e.g. edgekit-monitor-1)"),
    ("--client-id", "x\udcff", "--client-id 'x\\udcff': give one without control characters, in UTF-8 (e.g. "
                              "edgekit-monitor-1)"),
    ("--budget-rate", "0", "Invalid value for '--budget-rate': 0: give a number greater than or equal to 0.001 "
                           "(see `edgekit monitor --help`)"),
    ("--budget-burst", "nan", "Invalid value for '--budget-burst': nan: give a finite number (see `edgekit monitor --help`)"),
    ("--gap-grace-s", "-1", "Invalid value for '--gap-grace-s': -1: give a number greater than or equal to 0 "
                            "(see `edgekit monitor --help`)")])
def test_a_share_group_client_id_or_budget_the_monitor_cannot_use_is_refused(fleet, tmp_path, run_cli, option, value,
                                                                             error):
    """`monitor --share a/b` subscribed to `$share/a/b/edgekit/...` (group a, another topic) and stored nothing,
    exit 0; `--client-id ''` got a random id (no persistent session); a 70,000-byte one a struct.error traceback; one
    with a line break waited for the broker to drop it (exit 5, 'timeout'); a share group or client id not UTF-8 (an
    argument's byte \\xff) was a UnicodeEncodeError traceback. An ingest budget of 0 (every record refused) or NaN is
    one line too."""
    code, out, err = run_cli("monitor", "--fleet", fleet.source, "--duration", "1", option, value, "--json")
    assert code == 2 and json.loads(out)["error"] == error and err.count("\n") == 1


def test_a_history_whose_file_name_is_not_utf8_is_monitored(fleet, tmp_path, run_cli):
    """The monitor's own client id hashes the history's path: a name with a byte that is not UTF-8 (\\xff) was a
    UnicodeEncodeError traceback before it started."""
    code, out, err = run_cli("monitor", "--fleet", fleet.source, "--duration", "0", "--history", tmp_path / "h\udcff.db",
                             "--json")
    assert code == 0 and err == "" and json.loads(out), err


def test_a_monitor_stopped_by_sigterm_prints_its_summary_as_after_ctrl_c(fleet, publisher, tmp_path):
    """systemd stops a service with SIGTERM: the monitor once died of it without a word, no summary, no --json."""
    import os
    import signal
    import subprocess
    import sys

    fleet_file = tmp_path / "fleet.yaml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "edge_kit", "monitor", "--fleet", str(fleet_file), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        def stored() -> int:
            if not (tmp_path / "edgekit-history.db").exists():
                return 0
            with Store(tmp_path / "edgekit-history.db") as store:
                return store.count("bench")

        seq = 0

        def one_stored() -> bool:  # the monitor subscribes some time after it starts: send until one is stored
            nonlocal seq
            seq += 1
            send(publisher, "bench", bench("d1", seq))
            return stored() >= 1

        assert wait_until(one_stored, 60, step=0.5), proc.stderr.read() if proc.poll() is not None else "not stored"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert summary["stored"] >= 1 and summary["invalid"] == 0, summary


def telemetry(device: str, seq: int) -> dict:
    return messages.envelope("telemetry", FLEET, device, seq, {"conditions": {}, "spool": {}, "interval_s": 0.3})


# Publishes each line of a file on one topic at QoS 1 as fast as the broker takes them; argv: host port topic file.
FLOODER = """
import sys, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
host, port, topic, path = sys.argv[1:]
client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="flood-test-d2")
client.max_inflight_messages_set(0)
client.connect(host, int(port))
client.loop_start()
infos = [client.publish(topic, line, qos=1) for line in open(path, "rb").read().split(b"\\n")]
for info in infos:
    info.wait_for_publish(30)
client.disconnect()
client.loop_stop()
"""


def test_a_device_flooding_with_its_valid_key_is_held_to_its_budget_and_the_others_are_stored_promptly(
        fleet, mosquitto, tmp_path):
    """A compromised device (its own key: every record of it verifies) publishing as fast as it can. The monitor
    verified and stored every one in turn: the other device's records waited behind the flood (seconds, growing
    with it), the history took all of it and nothing was alerted. Now the flooder gets its ingest budget (rate and
    burst) and what it sends beyond is refused unchecked, counted per device (and in /metrics), alerted and
    recorded as a sequence gap; the normal device's records are all stored, each within a bound."""
    import subprocess
    import sys
    import threading

    from prometheus_client import generate_latest

    rate, burst, flood_n, normal_every_s = 50.0, 500, 24_000, 0.1  # a normal device as an agent at a 0.3 s interval
    flood = [messages.encode(signed(telemetry("d2", seq))) for seq in range(1, flood_n + 1)]
    store = Store(tmp_path / "h.db")
    stored_at: dict[int, float] = {}
    metrics = FleetMetrics()
    mon = Monitor(fleet, store, budget_rate=rate, budget_burst=burst,
                  on_message=lambda kind, msg: stored_at.setdefault(msg["seq"], time.time()) if msg["device"] == "d1" else None)
    metrics.watch(mon)
    normal = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="flood-test-d1")
    normal.connect(mosquitto.host, mosquitto.port)
    normal.loop_start()
    sent_at: dict[int, float] = {}
    flooding = threading.Event()

    def publish_normal() -> None:
        seq = 0
        while flooding.is_set() or seq < 10:
            seq += 1
            sent_at[seq] = time.time()
            normal.publish(messages.topic(FLEET, "d1", "telemetry"), messages.encode(signed(telemetry("d1", seq))), qos=1)
            time.sleep(normal_every_s)

    # the flooder is a process of its own (another machine, in the field): here it would share the monitor's GIL
    (tmp_path / "flood.jsonl").write_bytes(b"\n".join(flood))
    flooder = [sys.executable, "-c", FLOODER, mosquitto.host, str(mosquitto.port),
               messages.topic(FLEET, "d2", "telemetry"), str(tmp_path / "flood.jsonl")]
    mon.start()
    started = time.time()
    try:
        flooding.set()
        thread = threading.Thread(target=publish_normal, daemon=True)
        thread.start()
        done = subprocess.run(flooder, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        time.sleep(1.0)
        flooding.clear()
        thread.join(10)
        assert wait_until(lambda: mon.stats.received == flood_n + len(sent_at), 30), (mon.stats, len(sent_at))
        assert wait_until(lambda: len(stored_at) == len(sent_at), 10), (sorted(stored_at), len(sent_at))
        elapsed = time.time() - started
        scraped = generate_latest(metrics.registry).decode()
    finally:
        mon.stop()
        normal.disconnect()
        normal.loop_stop()
    # the normal device: every record stored, once, each within a bound of being sent, none refused
    delays = {seq: stored_at[seq] - sent_at[seq] for seq in sent_at}
    # 0.8 s on a quiet machine, 2.1 s once under a loaded one (the monitor's network thread still reads every flood
    # record); with the budget off 12.7 s quiet, and growing with the flood
    assert max(delays.values()) < 5.0, sorted(delays.items(), key=lambda kv: -kv[1])[:5]
    assert store._rows("SELECT count(*) FROM telemetry WHERE device = 'd1'") == [(len(sent_at),)]
    assert "d1" not in mon.over_budget and store._rows("SELECT * FROM gaps WHERE device = 'd1'") == []
    # the flooder: held to its budget, the rest refused unchecked and counted, nothing kept as invalid
    (flooder_stored,), = store._rows("SELECT count(*) FROM telemetry WHERE device = 'd2'")
    assert burst <= flooder_stored <= burst + rate * elapsed + 1, (flooder_stored, elapsed)
    assert mon.over_budget == {"d2": flood_n - flooder_stored} and mon.stats.over_budget == flood_n - flooder_stored
    assert mon.stats.invalid == 0 and store.count("invalid") == 0
    assert f'edgekit_monitor_over_budget_total{{device="d2"}} {float(mon.over_budget["d2"])}' in scraped
    assert f'edgekit_monitor_messages_total{{outcome="over_budget"}} {float(mon.over_budget["d2"])}' in scraped
    # alerted (once when it began, once with the count when it ended) and recorded as one gap
    texts = [a.text for a in mon.alerts if a.kind == "refused" and a.device == "d2"]
    assert len(texts) == 2 and "over its ingest budget (50 records/s, burst 500)" in texts[0], texts
    assert texts[1].startswith(f"d2: {mon.over_budget['d2']:,} records refused over its ingest budget"), texts
    ((kind, first, last),) = store._rows("SELECT kind, first_missing, last_missing FROM gaps WHERE device = 'd2'")
    # from the first refused (past the burst) to the last refused (the very last may have found a token again)
    assert kind == "telemetry" and burst < first <= burst + rate * elapsed + 1, (first, last)
    # to the last refused, but never past d2's newest verified seq (what was refused after it is left to the sequence
    # check of its next record): how far that is from the end depends on when the flood's tail found tokens again
    stored = {seq for (seq,) in store._rows("SELECT seq FROM telemetry WHERE device = 'd2'")}
    refused = set(range(1, flood_n + 1)) - stored  # every record arrived: stored or refused
    assert last == min(max(refused), max(stored)), (first, last, max(refused), max(stored))


def test_records_signed_by_another_key_on_a_device_s_topic_never_spend_its_budget(fleet, tmp_path):
    """The budget is keyed on the topic's device, so it is checked before the signature; without the fleet's ACL (an
    --insecure broker) anyone may publish on d1's topic. Only records that verify as d1's spend its budget: a
    forger's hundreds cannot get d1's real records refused, and are refused as forgeries (invalid), not counted as
    d1's. d1 itself past its burst is refused unchecked, and the span recorded as a gap when the episode ends."""
    store = Store(tmp_path / "h.db")
    mon = Monitor(fleet, store, verify_in_child=False, budget_rate=0.001, budget_burst=5)
    topic = messages.topic(FLEET, "d1", "telemetry")
    intruder = Signer.generate()
    now = time.time()
    forged = [(topic, messages.encode(intruder.sign(telemetry("d1", seq))), now) for seq in range(100, 400)]
    real = [(topic, messages.encode(signed(telemetry("d1", seq))), now) for seq in range(1, 9)]
    mon._store(forged + real[:3])
    mon._store(forged + real[3:5])  # the forger fills the batch before d1's last two within its burst
    assert store._rows("SELECT seq FROM telemetry ORDER BY seq") == [(seq,) for seq in range(1, 6)]
    assert mon.stats.invalid == 600 and mon.over_budget == {} and mon.stats.over_budget == 0
    mon._store(real[5:] + forged[:10])  # d1 spent its burst: its own records (and whatever else is on its topic) wait
    assert mon.over_budget == {"d1": 13} and mon.stats.invalid == 600 and store.count("telemetry") == 5
    assert [a.text for a in mon.alerts if a.kind == "refused" and a.device == "d1"][0].startswith(
        "d1: over its ingest budget (0.001 records/s, burst 5)")
    # the episode is kept in the history's alerts table while it holds (the forger's refusals are no episode)
    assert [(a["device"], a["kind"], a["cleared_at"]) for a in store.alerts()] == [("d1", "over_budget", None)]
    mon._end_floods(math.inf)
    ((ended,),) = store._rows("SELECT cleared_at FROM alerts WHERE kind = 'over_budget'")
    assert ended == pytest.approx(time.time(), abs=30)
    # nothing of d1 verified beyond 5: the forger's claims (100-109) make no gap; d1's next record records 6-8
    assert store._rows("SELECT device, kind, first_missing, last_missing FROM gaps") == []
    assert mon.alerts[-1].text == "d1: 13 records refused over its ingest budget in 0 s"
    mon.budget = type(mon.budget)(rate=1000, burst=1000)
    mon._store([(topic, messages.encode(signed(telemetry("d1", 9))), now)])
    assert store._rows("SELECT device, kind, first_missing, last_missing FROM gaps") == [("d1", "telemetry", 6, 8)]


def _over_budget_with_a_forger(mon) -> list[tuple[str, bytes, float]]:
    """Store d1's telemetry 1-5 (its burst, budget_burst=5), then 6-8 and a forger's seq 1 and 10**15 on d1's topic
    (over budget: refused unchecked), and end the flood; return d1's signed telemetry 1-29 as queued messages."""
    topic = messages.topic(FLEET, "d1", "telemetry")
    intruder = Signer.generate()
    now = time.time()
    real = [(topic, messages.encode(signed(telemetry("d1", seq))), now) for seq in range(1, 30)]
    mon._store(real[:5])  # d1's burst: 1-5 stored
    forged = [(topic, messages.encode(intruder.sign(telemetry("d1", seq))), now) for seq in (1, 10**15)]
    mon._store(real[5:8] + forged)  # over budget: 6-8 and the forger's claims refused unchecked
    mon._end_floods(math.inf)
    return real


def test_seq_numbers_claimed_by_records_refused_over_budget_never_hide_a_device_s_later_gaps(fleet, tmp_path):
    """Records refused over budget are not verified, and on a broker without the fleet's ACL anyone may publish on
    the topic of a device over its budget: the span they claim was recorded as a gap whatever it said, and its top
    taken as the device's newest seq. A forger's seq 10**15 then hid every later gap of the real device, and its seq
    1 claimed a gap over records long stored. Now the span stays within the device's verified numbers: above its
    newest verified seq when refused, at most its newest verified seq when the episode ends; the rest is recorded by
    the sequence check from the records that verify."""
    store = Store(tmp_path / "h.db")
    mon = Monitor(fleet, store, verify_in_child=False, budget_rate=0.001, budget_burst=5)
    real = _over_budget_with_a_forger(mon)
    assert store._rows("SELECT first_missing, last_missing FROM gaps") == []  # nothing verified beyond 5 yet
    mon.budget = type(mon.budget)(rate=1000, burst=1000)
    mon._store(real[8:20] + real[25:])  # d1 again, within budget: 9-20 and 26-29 (21-25 lost on the way)
    assert store._rows("SELECT first_missing, last_missing FROM gaps ORDER BY first_missing") == [(6, 8), (21, 25)]


def test_a_monitor_started_again_gives_a_flooding_device_no_fresh_burst(fleet, tmp_path):
    """Each run of the monitor started every device with a full bucket: a device flooding across restarts (or a
    monitor restarted by systemd) got its burst stored again each time. Now the monitor charges each device, at start,
    with what the history says it stored in the last burst/rate seconds (one query)."""
    store = Store(tmp_path / "h.db")
    topic = messages.topic(FLEET, "d1", "telemetry")
    now = time.time()
    real = [(topic, messages.encode(signed(telemetry("d1", seq))), now) for seq in range(1, 13)]
    first = Monitor(fleet, store, verify_in_child=False, budget_rate=0.01, budget_burst=5)
    first._store(real[:8])  # its burst stored, 3 refused over budget
    assert store.count("telemetry") == 5 and first.over_budget == {"d1": 3}
    again = Monitor(fleet, store, verify_in_child=False, budget_rate=0.01, budget_burst=5).start()
    try:
        d2 = [(messages.topic(FLEET, "d2", "telemetry"), messages.encode(signed(telemetry("d2", 1))), now)]
        again._store(real[8:] + d2)
    finally:
        again.stop()
    assert store.count("telemetry") == 6 and again.over_budget == {"d1": 4}  # d1 none: its burst was spent; d2 its own
    assert again.stats.over_budget == 4 and "over_budget" not in {f.name for f in dataclasses.fields(again.stats)}


def test_a_monitor_started_again_keeps_the_whole_budget_of_a_device_that_sent_within_its_rate(fleet, tmp_path):
    """The restart charged each device with every record stored in the last burst/rate seconds, refill ignored: a
    device sending at exactly its rate for that long started with an empty bucket, and all the broker had queued for
    it during the restart was refused over budget. Its bucket is now rebuilt from when the records were stored."""
    store = Store(tmp_path / "h.db")
    now = time.time()
    topic = messages.topic(FLEET, "d1", "telemetry")
    steady = [(topic, messages.encode(signed(telemetry("d1", seq))), now - 100 + seq) for seq in range(1, 100)]
    Monitor(fleet, store, verify_in_child=False)._store(steady)  # received 1 a second (this test stores them at once)
    assert store.count("telemetry") == 99
    again = Monitor(fleet, store, verify_in_child=False, budget_rate=1, budget_burst=10).start()
    try:
        backlog = [(topic, messages.encode(signed(telemetry("d1", seq))), time.time()) for seq in range(100, 110)]
        again._store(backlog)  # what the broker held through the restart: within the burst
    finally:
        again.stop()
    assert store.count("telemetry") == 109 and again.over_budget == {}


def test_a_monitor_that_could_not_read_the_history_at_start_still_exports_its_alert_states(fleet, tmp_path,
                                                                                          monkeypatch):
    """A history read failing at start left the alert states unseeded for the whole run: /metrics never showed the
    drift, low-disk or silence gauges, even for alerts the run itself raised."""
    from edge_kit.telemetry.store import HistoryError

    store = Store(tmp_path / "h.db")

    def down() -> dict:
        raise HistoryError("database is locked")

    monkeypatch.setattr(store, "latest_shadow", down)
    mon = Monitor(fleet, store, verify_in_child=False).start()
    try:
        assert mon.alert_states() == {"drift": frozenset(), "disk": frozenset(), "silent": frozenset(),
                                     "constraints": frozenset()}
    finally:
        mon.stop()


def test_a_shared_monitor_without_workers_runs_with_the_whole_budget_and_says_so(fleet, tmp_path, caplog):
    """`--share` became an error without `--workers`, which stopped every monitor unit written before; it runs as
    before (each worker the whole budget) with a warning naming the option."""
    with caplog.at_level("WARNING", logger="edgekit.monitor"):
        mon = Monitor(fleet, Store(tmp_path / "h.db"), share="monitors", verify_in_child=False, budget_burst=10)
    assert mon.budget.available("d1") == 10
    assert any("--workers N" in r.getMessage() for r in caplog.records)


def test_a_forger_on_the_topic_of_a_device_with_one_record_of_budget_left_costs_a_batch_few_verifier_calls(
        fleet, tmp_path, monkeypatch):
    """Only records that verify spend a device's budget, so when some checked ones were refused (forgeries), the next
    ones were checked in their place, as many as the device had budget for: one record of budget left, and a forger
    filling its topic made the monitor check a batch of 500 in 500 calls to the verifier, one record each. Now the
    rounds admit a margin that doubles: a few calls, each record checked once, the real record still stored."""
    from edge_kit.telemetry.monitor import MAX_CHECK_ROUNDS

    store = Store(tmp_path / "h.db")
    mon = Monitor(fleet, store, verify_in_child=False, budget_rate=0.001, budget_burst=1)
    calls: list[int] = []
    check = mon._check

    def counted(batch, local=False):
        calls.append(len(batch))
        return check(batch, local)

    monkeypatch.setattr(mon, "_check", counted)
    topic = messages.topic(FLEET, "d1", "telemetry")
    intruder = Signer.generate()
    now = time.time()
    forged = [(topic, messages.encode(intruder.sign(telemetry("d1", seq))), now) for seq in range(100, 599)]
    mon._store(forged + [(topic, messages.encode(signed(telemetry("d1", 1))), now)])
    assert store._rows("SELECT seq FROM telemetry") == [(1,)]
    assert mon.stats.invalid == 499 and mon.over_budget == {} and mon.stats.received == 500
    assert len(calls) <= MAX_CHECK_ROUNDS <= 11 and sum(calls) == 500, calls  # 500 calls before
    # records that verify past the device's budget (admitted in the margin) are refused over budget, counted once
    calls.clear()
    mon.budget = type(mon.budget)(rate=0.001, burst=1)
    mon._store(forged[:3] + [(topic, messages.encode(signed(telemetry("d1", seq))), now) for seq in range(2, 7)])
    assert store._rows("SELECT seq FROM telemetry ORDER BY seq") == [(1,), (2,)]
    assert mon.over_budget == {"d1": 4} and mon.stats.received == 508 and mon.stats.invalid == 502
    assert sum(calls) <= 8 and len(calls) <= MAX_CHECK_ROUNDS, calls


def test_a_record_the_history_refuses_costs_its_batch_a_few_transactions_not_one_per_record(fleet, tmp_path,
                                                                                             monkeypatch):
    """A record the database cannot hold (a character a LATIN1 PostgreSQL lacks, a value beyond a column) fails its
    whole batch. Its batch was then stored one transaction per record: 501 for a batch of 500, for every such record
    a compromised device sent (100 a second within its budget), which held the monitor far behind everyone's records.
    Now the batch is halved until the refused record stands alone; the others are stored once each, in order."""
    from edge_kit.errors import HistoryRecordError

    store = Store(tmp_path / "h.db")
    mon = Monitor(fleet, store, verify_in_child=False)
    topic = messages.topic(FLEET, "d1", "bench")
    now = time.time()
    batch = [(topic, messages.encode(signed(bench("d1", seq, variant="poison" if seq == 321 else "int8"))), now)
             for seq in range(1, 501)]
    real_add, calls = store.add_many, []

    def add_many(good, raw=None, received=None):
        calls.append(len(good))
        if any(m["variant"] == "poison" for _, m in good):
            raise HistoryRecordError("the history file refused a record (a test's): it cannot be stored as it is")
        return real_add(good, raw, received)

    monkeypatch.setattr(store, "add_many", add_many)
    mon._store(batch)
    assert sorted(r["seq"] for r in store.bench_records("d1")) == [s for s in range(1, 501) if s != 321]
    assert mon.stats.stored == 499 and mon.stats.invalid == 1 == store.count("invalid")
    assert len(calls) <= 2 + 2 * math.ceil(math.log2(500)), calls


def test_records_a_full_broker_queue_dropped_while_the_monitor_was_down_are_recorded_as_gaps_and_alerted(tmp_path):
    """Past Mosquitto's queue limit for the monitor's persistent session (max_queued_messages 50 here, in a
    mosquitto.conf this test writes) the broker drops what devices publish while the monitor is down, having
    acknowledged it to the device (whose spool then forgets it: nothing sends it again). The monitor that came back
    stored the 50 queued and recorded the rest as a gap only once the device's next record arrived, with no alert,
    and a monitor started again took the first record it got as where the device's numbering stood, so a loss across
    its restart was never recorded at all. Now the gap is alerted with its exact count, and a persistent monitor
    starts from the newest seq its history holds: stored + missing = published, and the operator is told."""
    with small_queues(tmp_path) as (fleet, publisher, _):
        store = Store(tmp_path / "h.db")
        mon = Monitor(fleet, store, client_id="small-queue-monitor", persistent=True).start()
        try:
            for seq in range(1, 11):  # the monitor runs: 10 records stored
                send(publisher, "telemetry", telemetry("d1", seq))
            assert wait_until(lambda: mon.stats.stored == 10, 20), mon.stats
        finally:
            mon.stop()
        for seq in range(11, 211):  # the monitor is down: 200 records, each acknowledged by the broker
            send(publisher, "telemetry", telemetry("d1", seq))
        mon = Monitor(fleet, store, client_id="small-queue-monitor", persistent=True).start()
        try:
            assert wait_until(lambda: mon.stats.stored >= 50, 20), mon.stats
            time.sleep(1)  # whatever else the broker held has arrived
            assert mon.stats.stored == 50, mon.stats  # the broker kept 50 of the 200, dropped the rest
            send(publisher, "telemetry", telemetry("d1", 211))  # the device's next record
            assert wait_until(lambda: mon.stats.stored == 51, 20), mon.stats
        finally:
            mon.stop()
        gaps = store._rows("SELECT first_missing, last_missing FROM gaps WHERE device = 'd1' AND kind = 'telemetry'")
        missing = sum(last - first + 1 for first, last in gaps)
        assert store.count("telemetry") + missing == 211, (store.count("telemetry"), gaps)
        assert missing == 150 and mon.stats.gaps == len(gaps), (gaps, mon.stats)
        alerts = [a for a in mon.alerts if a.kind == "gap"]
        assert len(alerts) == len(gaps) and all(a.device == "d1" for a in alerts), [vars(a) for a in mon.alerts]
        assert sum(int(re.search(r"(\d+) telemetry record", a.text).group(1)) for a in alerts) == 150, alerts[0].text
        # a session the broker no longer holds (lost with its persistence, or a new --client-id): what was published
        # before it existed was queued for no one; the monitor starts from the history's newest seq and says so
        for seq in range(212, 222):
            send(publisher, "telemetry", telemetry("d1", seq))
        mon = Monitor(fleet, store, client_id="small-queue-monitor-2", persistent=True).start()
        try:
            send(publisher, "telemetry", telemetry("d1", 222))
            assert wait_until(lambda: mon.stats.stored == 1, 20), mon.stats
        finally:
            mon.stop()
        assert (212, 221) in store._rows("SELECT first_missing, last_missing FROM gaps WHERE device = 'd1'")
        assert [a.text for a in mon.alerts if a.kind == "gap"] == [
            "d1: 10 telemetry record(s) never arrived (seq 212..221), recorded as a sequence gap: lost on the way to "
            "the monitor (dropped by the broker past its queue limit while the monitor was down, or published while "
            "the broker held no session for it), or dropped by the device's full spool before it sent them (its "
            "telemetry's spool counts those: dropped_telemetry)"]


def test_records_lost_at_the_end_of_a_stream_are_a_gap_as_soon_as_the_device_s_next_telemetry_arrives(tmp_path):
    """A gap was seen only when the device's next record of the same kind arrived: bench records the broker dropped
    while the monitor was down stayed unrecorded until the next benchmark, days later perhaps, or for good. The
    agent's telemetry now carries the newest seq it gave its bench, live and shadow records (seqs): the device's next
    telemetry after the monitor is back records the loss, exactly."""
    with small_queues(tmp_path) as (fleet, publisher, _):
        store = Store(tmp_path / "h.db")
        Monitor(fleet, store, client_id="tail-monitor", persistent=True).start().stop()  # its session, queued for
        for seq in range(1, 201):  # the monitor is down: 200 bench records
            send(publisher, "bench", bench("d1", seq))
        mon = Monitor(fleet, store, client_id="tail-monitor", persistent=True).start()
        try:
            assert wait_until(lambda: mon.stats.stored >= 50, 20), mon.stats
            time.sleep(1)
            assert mon.stats.stored == 50 and mon.stats.gaps == 0, mon.stats  # 150 dropped, no later bench record
            send(publisher, "telemetry", {**telemetry("d1", 1), "seqs": {"bench": 200, "live": 0, "shadow": 0}})
            assert wait_until(lambda: mon.stats.stored == 51, 20), mon.stats
        finally:
            mon.stop()
        assert store._rows("SELECT kind, first_missing, last_missing FROM gaps") == [("bench", 51, 200)]
        assert store.count("bench") + 150 == 200
        assert [a.text.split(" (")[0] for a in mon.alerts if a.kind == "gap"] == ["d1: 150 bench record(s) never arrived"]


def test_a_real_agent_s_records_the_broker_dropped_are_each_stored_or_in_a_recorded_gap(tmp_path, digits_artifacts):
    """The same with the real agent (telemetry and live figures every 0.05 s): its spool forgets a record once the
    broker acknowledged it, so what the broker dropped for the monitor's session is not sent again. Every number the
    agent gave each stream is stored or in a recorded, alerted gap, none in both, up to the newest its last
    telemetry counts."""
    from harness import AgentProcess, spool_sent

    with small_queues(tmp_path, devices=("d1", "a1")) as (fleet, _, broker):
        store = Store(tmp_path / "h.db")
        mon = Monitor(fleet, store, client_id="agent-queue-monitor", persistent=True).start()
        agent = AgentProcess(tmp_path, "a1", broker, digits_artifacts, fleet=FLEET, telemetry_interval_s=0.05)
        fleet.key_store().register("a1", agent.signer.public)
        agent.start()
        try:
            try:
                assert wait_until(lambda: mon.stats.stored >= 20, 60), mon.stats
            finally:
                mon.stop()
            # the monitor is down: the agent publishes on, its telemetry alone far past the 50 the broker queues (the
            # broker took each: a fixed sleep was not enough for an agent slowed by a loaded machine)
            sent = spool_sent(agent.root, "telemetry")
            assert wait_until(lambda: spool_sent(agent.root, "telemetry") > sent + 60, 60), agent.log.read_text()[-2000:]
            mon = Monitor(fleet, store, client_id="agent-queue-monitor", persistent=True).start()
            try:
                assert wait_until(lambda: mon.stats.gaps >= 1, 30), mon.stats
                time.sleep(1)
            finally:
                mon.stop()
        finally:
            agent.stop()
    marks = messages.telemetry_marks(store.latest_telemetry()["a1"])
    for kind in ("telemetry", "live"):
        stored = [seq for (seq,) in store._rows(f"SELECT seq FROM {kind} WHERE device = 'a1'")]
        gaps = [n for first, last in store._rows("SELECT first_missing, last_missing FROM gaps WHERE device = 'a1' "
                                                 "AND kind = ?", (kind,)) for n in range(first, last + 1)]
        assert stored and not set(stored) & set(gaps) and len(set(gaps)) == len(gaps), (kind, stored, gaps)
        newest = max(stored + gaps)
        assert sorted(stored + gaps) == list(range(1, newest + 1)), (kind, sorted(stored + gaps))
        assert newest >= marks.get(kind, 0)
    lost = sum(int(re.search(r"(\d+) \w+ record", a.text).group(1)) for a in mon.alerts if a.kind == "gap")
    assert lost == store._rows("SELECT SUM(last_missing - first_missing + 1) FROM gaps")[0][0] > 0


@pytest.mark.parametrize("share", [None, "epochs"])
def test_a_real_agent_restarted_on_a_wiped_state_numbers_in_a_new_epoch_and_its_lost_records_are_a_gap(
        tmp_path, digits_artifacts, share):
    """The real agent, its state (spool) wiped and started again, numbers from 1: the monitor judged none of its
    records until the numbers passed the old mark, so what the broker dropped meanwhile (its queue full while the
    monitor was down) was silent. Now the agent's messages carry its spool's epoch: the new one is recorded as a
    restart (not a gap), and every number of the new numbering is stored or in a recorded gap, well below the old
    mark. With --share, the gap scan does the same from the history."""
    from harness import AgentProcess, spool_sent

    options = {} if share is None else {"share": share, "workers": 1, "gap_grace_s": 1.0}
    with small_queues(tmp_path, devices=("d1", "a1")) as (fleet, _, broker):
        store = Store(tmp_path / "h.db")
        mon = Monitor(fleet, store, client_id="agent-epoch-monitor", persistent=True, **options).start()
        agent = AgentProcess(tmp_path, "a1", broker, digits_artifacts, fleet=FLEET, telemetry_interval_s=0.05)
        fleet.key_store().register("a1", agent.signer.public)
        agent.start()
        try:
            assert wait_until(lambda: store.count("telemetry") >= 150, 60), mon.stats
            agent.stop()
            old = store.latest_telemetry()["a1"]
            for leftover in agent.root.glob("spool.db*"):  # its state wiped (re-imaged, a new card)
                leftover.unlink()
            mon.stop()
            agent.start()
            # the monitor is down: the agent numbers from 1 again, its telemetry alone far past the 50 the broker queues
            # (the broker took each: on a loaded machine the agent had not even connected after the 4 s slept before)
            assert wait_until(lambda: spool_sent(agent.root, "telemetry") > 60, 60), agent.log.read_text()[-2000:]
            mon = Monitor(fleet, store, client_id="agent-epoch-monitor", persistent=True, **options).start()
            try:
                assert wait_until(lambda: mon.stats.gaps >= 1, 30), (mon.stats, [a.text for a in mon.alerts])
                time.sleep(1)
            finally:
                mon.stop()
        finally:
            agent.stop()
    new = store.latest_telemetry()["a1"]
    assert new["epoch"] != old["epoch"]
    assert [(r["previous"], r["epoch"]) for r in store.seq_restarts("a1")] == [(old["epoch"], new["epoch"])]
    assert mon.stats.restarts == 1 and any(a.kind == "restart" for a in mon.alerts)
    stored = [seq for (seq,) in store._rows("SELECT seq FROM telemetry WHERE device = 'a1' AND "
                                            "json_extract(body, '$.epoch') = ?",
                                            (new["epoch"],))]
    gaps = [n for first, last in store._rows("SELECT first_missing, last_missing FROM gaps WHERE device = 'a1' AND "
                                             "kind = 'telemetry'") for n in range(first, last + 1)]
    assert gaps and not set(stored) & set(gaps), (stored, gaps)
    assert max(gaps) < old["seq"], (gaps, old["seq"])  # below the old numbering's mark: judged all the same
    assert sorted(stored + gaps) == list(range(1, max(stored + gaps) + 1)), sorted(stored + gaps)


@contextlib.contextmanager
def small_queues(tmp_path, devices=("d1",)):
    """Yield a fleet (``devices``, d1's key registered) on a real Mosquitto whose mosquitto.conf, written here, queues
    at most 50 messages for an offline client (max_queued_messages 50), a client publishing as d1, and the broker; all
    stopped after."""
    from edge_kit.fleet.broker_setup import MAX_QUEUED
    from edge_kit.sim.broker import MosquittoBroker

    class SmallQueues(MosquittoBroker):
        def _config(self):
            conf = super()._config()
            text = conf.read_text()
            assert f"max_queued_messages {MAX_QUEUED}\n" in text
            conf.write_text(text.replace(f"max_queued_messages {MAX_QUEUED}\n", "max_queued_messages 50\n"))
            return conf

    broker = SmallQueues(tmp_path / "broker").start()
    publisher = None
    try:
        path = tmp_path / "fleet.yaml"
        path.write_text(f"fleet: {FLEET}\nbroker: {{host: 127.0.0.1, port: {broker.port}}}\n"
                        "defaults: {user: edgekit, profile: rpi4}\ndevices:\n"
                        + "".join(f"  - {{name: {d}, host: 127.0.0.1}}\n" for d in devices))
        fleet = load_fleet(path)
        fleet.key_store().register("d1", DEVICE_KEYS["d1"].public)
        publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="small-queue-d1")
        publisher.connect(broker.host, broker.port)
        publisher.loop_start()
        yield fleet, publisher, broker
    finally:
        if publisher is not None:
            publisher.disconnect()
            publisher.loop_stop()
        broker.stop()


def _bench_backlog(publisher, n):
    """Publish ``n`` signed bench records of devices d1 and d2, in turn (QoS 1, each device's seq from 1); return their
    MQTTMessageInfo (wait for them to be published)."""
    return [publisher.publish(messages.topic(FLEET, f"d{1 + i % 2}", "bench"),
                              messages.encode(signed(bench(f"d{1 + i % 2}", i // 2 + 1))), qos=1) for i in range(n)]


def test_a_backlog_is_read_from_the_socket_in_large_reads_and_every_record_is_stored_once(fleet, publisher, tmp_path,
                                                                                          monkeypatch):
    """paho read each packet with a system call per header byte and one for the rest, one packet per select():
    four or five system calls a record for a monitor draining a backlog. The monitor's client reads what the socket
    holds at once (ReadAheadClient): far fewer reads than records, packets cut at a read's end (and one larger than
    a read) still whole, every record stored once."""
    reads = []
    real = mqtt.Client._sock_recv
    monkeypatch.setattr(mqtt.Client, "_sock_recv", lambda self, n: reads.append(n) or real(self, n))
    cid = monitor_session(fleet, "read-ahead")
    n = 400
    infos = _bench_backlog(publisher, n)
    big = publisher.publish(messages.topic(FLEET, "d1", "bench"), b"x" * 66_000, qos=1)  # over a read and the 64 KiB limit: refused
    for info in [*infos, big]:
        info.wait_for_publish(10)
    store = Store(tmp_path / "h.db")
    mon = Monitor(fleet, store, client_id=cid, persistent=True)
    reads.clear()
    mon.start()
    try:
        assert wait_until(lambda: mon.stats.stored + mon.stats.invalid >= n + 1, 30), mon.stats
    finally:
        mon.stop()
    assert mon.stats.stored == n == store.count("bench") and mon.stats.invalid == 1 and mon.stats.gaps == 0
    assert len(reads) < n / 4, f"{len(reads)} socket reads for {n + 1} records"


def test_a_backlog_s_records_are_acknowledged_a_batch_at_a_write_and_none_is_sent_again(fleet, publisher, tmp_path,
                                                                                      monkeypatch):
    """Each stored record's PUBACK was queued alone (paho's ack): a wake-up of the network thread and a socket write
    per record. The monitor now writes a batch's PUBACKs at once, in order; the broker takes them all: none of the
    backlog is sent again to the session's next run."""
    writes = []
    real = mqtt.Client._sock_send
    monkeypatch.setattr(mqtt.Client, "_sock_send", lambda self, buf: writes.append(bytes(buf)) or real(self, buf))
    cid = monitor_session(fleet, "acks")
    n = 400
    infos = _bench_backlog(publisher, n)
    for info in infos:
        info.wait_for_publish(10)
    store = Store(tmp_path / "h.db")
    mon = Monitor(fleet, store, client_id=cid, persistent=True)
    writes.clear()
    mon.start()
    try:
        assert wait_until(lambda: mon.stats.stored >= n, 30), mon.stats
        # every record stored is acknowledged: writes of PUBACKs (type 0x40, 4 bytes each) alone
        assert wait_until(lambda: sum(len(w) // 4 for w in writes if w[:1] == b"\x40") >= n, 10), f"{len(writes)} writes"
    finally:
        mon.stop()
    assert mon.stats.stored == n == store.count("bench") and mon.stats.invalid == 0
    assert len(writes) < n / 4, f"{len(writes)} socket writes for {n} records"
    again = []  # the session's next run: what the broker holds unacknowledged is sent again
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, clean_session=False)
    client.on_message = lambda _c, _u, m: again.append(m.mid)
    client.connect(fleet.broker.host, fleet.broker.port)
    client.loop_start()
    time.sleep(1.0)
    client.disconnect()
    client.loop_stop()
    assert again == []


def test_a_backlog_read_ahead_over_tls_is_stored_whole_and_once(tmp_path):
    """The read-ahead client over TLS: a TLS record holds at most 16 KiB, so packets are cut at record ends as well
    as at reads'; every record of the backlog is stored once."""
    from harness import make_tls

    from edge_kit.sim.broker import MosquittoBroker

    tls = make_tls(tmp_path / "tls")
    with MosquittoBroker(tmp_path / "broker", tls=tls) as broker:
        path = tmp_path / "fleet.yaml"
        path.write_text(f"fleet: {FLEET}\nbroker: {{host: 127.0.0.1, port: {broker.port}, tls: {{ca: {tls.ca}}}}}\n"
                        "defaults: {user: edgekit, profile: rpi4}\ndevices:\n  - {name: d1, host: 127.0.0.1}\n")
        fleet = load_fleet(path)
        fleet.key_store().register("d1", DEVICE_KEYS["d1"].public)
        store = Store(tmp_path / "h.db")
        mon = Monitor(fleet, store, client_id="tls-read-ahead", persistent=True).start()
        mon.client.disconnect()
        mon.client.loop_stop()
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="tls-publisher")
        pub.tls_set(ca_certs=str(tls.ca))
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        n = 300
        infos = [pub.publish(messages.topic(FLEET, "d1", "bench"), messages.encode(signed(bench("d1", i))), qos=1)
                 for i in range(1, n + 1)]
        for info in infos:
            info.wait_for_publish(10)
        pub.disconnect()
        pub.loop_stop()
        mon.client.reconnect()
        mon.client.loop_start()
        try:
            assert wait_until(lambda: mon.stats.stored >= n, 30), mon.stats
        finally:
            mon.stop()
    assert mon.stats.stored == n == store.count("bench") and mon.stats.invalid == 0 and mon.stats.gaps == 0


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_shared_workers_record_each_sequence_gap_once_from_the_history_and_none_for_a_late_record(
        fleet, publisher, tmp_path, request, backend):
    """With --share each worker sees only part of a device's records, so none followed its numbers and records lost
    on the way (past the broker's queue limit, or never sent) were never recorded nor alerted. Now one worker at a
    time scans the history: every number missing up to what the device's records and telemetry claim, once it has
    settled (gap_grace_s), is one recorded gap, alerted once, and a record merely late (stored within the grace after
    a higher one) is no gap. Two real workers on a real Mosquitto, one history (SQLite, then PostgreSQL)."""
    from edge_kit.telemetry.store import open_history

    spec = str(tmp_path / "h.db") if backend == "sqlite" else request.getfixturevalue("postgres_url")
    workers = [Monitor(fleet, open_history(spec), share="gaps", workers=2, gap_grace_s=4.0).start() for _ in range(2)]
    published = {("d1", "telemetry"): 62, ("d2", "bench"): 25, ("d2", "telemetry"): 1}
    try:
        for seq in range(1, 61):  # d1's telemetry: 11..15 and 31..33 never sent (lost before the broker)
            if not (11 <= seq <= 15 or 31 <= seq <= 33):
                send(publisher, "telemetry", telemetry("d1", seq))
        for seq in range(1, 21):  # d2's bench records: 8..9 lost, and 21..25 lost at the end of the stream
            if seq not in (8, 9):
                send(publisher, "bench", bench("d2", seq), device="d2")
        send(publisher, "telemetry", {**telemetry("d2", 1), "seqs": {"bench": 25, "live": 0, "shadow": 0}}, device="d2")
        send(publisher, "telemetry", telemetry("d1", 62))
        time.sleep(1)  # 61 arrives a second after 62: late, within the grace
        send(publisher, "telemetry", telemetry("d1", 61))
        stored = 60 - 8 + 2 + 18 + 1
        assert wait_until(lambda: sum(w.stats.stored for w in workers) == stored, 30), [w.stats for w in workers]
        assert wait_until(lambda: sum(w.stats.gaps for w in workers) >= 4, 40), [w.stats for w in workers]
        time.sleep(7)  # more scans than one (GAP_SCAN_S 5 s) after the grace: nothing found again
    finally:
        for w in workers:
            w.stop()
    assert min(w.stats.stored for w in workers) > 0, [w.stats for w in workers]  # both took a share
    with open_history(spec) as store:
        gaps = sorted(store._rows("SELECT device, kind, first_missing, last_missing FROM gaps"))
        assert gaps == [("d1", "telemetry", 11, 15), ("d1", "telemetry", 31, 33), ("d2", "bench", 8, 9),
                        ("d2", "bench", 21, 25)], gaps
        for (device, kind), n in published.items():  # stored + recorded gaps = published
            held = store._rows(f"SELECT COUNT(*) FROM {kind} WHERE device = ?", (device,))[0][0]
            assert held + sum(b - a + 1 for d, k, a, b in gaps if (d, k) == (device, kind)) == n, (device, kind)
    assert sum(w.stats.gaps for w in workers) == 4
    alerts = sorted(a.text.split(" (")[0] for w in workers for a in w.alerts if a.kind == "gap")
    assert alerts == ["d1: 3 telemetry record(s) never arrived", "d1: 5 telemetry record(s) never arrived",
                      "d2: 2 bench record(s) never arrived", "d2: 5 bench record(s) never arrived"], alerts


def test_records_a_full_broker_queue_dropped_for_shared_workers_are_each_stored_or_in_one_recorded_gap(tmp_path):
    """Past Mosquitto's queue limit (max_queued_messages 50, per worker's session) the broker drops what a device
    publishes while the --share workers are down. Before, the workers that came back stored what was queued and
    recorded nothing. Now the gap scan records the rest once the device's next telemetry has settled: stored +
    recorded gaps = published, none in both, each gap alerted once."""
    with small_queues(tmp_path) as (fleet, publisher, _):
        spec = tmp_path / "h.db"

        def workers():
            return [Monitor(fleet, Store(spec), share="gaps", workers=2, client_id=f"share-queue-{i}", persistent=True,
                            gap_grace_s=1.0).start() for i in range(2)]

        for mon in workers():  # their sessions, queued for while they are down
            mon.stop()
        for seq in range(1, 201):  # the workers are down: 200 records, each acknowledged by the broker
            send(publisher, "telemetry", telemetry("d1", seq))
        group = workers()
        try:
            assert wait_until(lambda: sum(w.stats.stored for w in group) >= 50, 20), [w.stats for w in group]
            time.sleep(1)  # whatever else the broker held has arrived
            send(publisher, "telemetry", telemetry("d1", 201))  # the device's next record
            assert wait_until(lambda: sum(w.stats.gaps for w in group) >= 1, 30), [w.stats for w in group]
            time.sleep(6)  # another scan: nothing found again
        finally:
            for w in group:
                w.stop()
        store = Store(spec)
        stored = {seq for (seq,) in store._rows("SELECT seq FROM telemetry WHERE device = 'd1'")}
        gaps = store._rows("SELECT first_missing, last_missing FROM gaps WHERE device = 'd1' AND kind = 'telemetry'")
        missing = [n for first, last in gaps for n in range(first, last + 1)]
        assert 50 <= len(stored) < 201 and not stored & set(missing) and len(set(missing)) == len(missing), gaps
        assert sorted(stored | set(missing)) == list(range(1, 202)), (sorted(stored), gaps)  # = published
        alerts = [a for w in group for a in w.alerts if a.kind == "gap"]
        assert len(alerts) == len(gaps) == sum(w.stats.gaps for w in group), [a.text for a in alerts]


def test_records_refused_over_budget_by_shared_workers_are_recorded_by_the_gap_scan_from_verified_numbers(fleet,
                                                                                                         tmp_path):
    """With --share no worker recorded the span a device had refused over its budget (nor any other gap). Now the
    gap scan finds them missing from the history, up to the device's verified numbers: a forger's claims on its topic
    (seq 1, seq 10**15, refused unchecked) neither mark stored records missing nor stretch the gap."""
    store = Store(tmp_path / "h.db")
    mon = Monitor(fleet, store, share="g", workers=1, verify_in_child=False, budget_rate=0.001, budget_burst=5,
                  gap_grace_s=0.0)
    store.follow_seqs(["d1", "d2"])  # as start() does
    real = _over_budget_with_a_forger(mon)
    mon.budget = type(mon.budget)(rate=1000, burst=1000)
    mon._store(real[8:20] + real[25:])  # d1 again, within budget: 9-20 and 26-29 (21-25 lost on the way)
    mon._scan_gaps()
    assert store._rows("SELECT first_missing, last_missing FROM gaps ORDER BY first_missing") == [(6, 8), (21, 25)]
    assert mon.stats.gaps == 2 and [a.text.split(" (")[0] for a in mon.alerts if a.kind == "gap"] == [
        "d1: 3 telemetry record(s) never arrived", "d1: 5 telemetry record(s) never arrived"]
    mon._gaps_scanned = -math.inf
    mon._scan_gaps()  # scanned again: nothing new
    assert store.count("gaps") == 2 and mon.stats.gaps == 2
