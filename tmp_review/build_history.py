"""Build a history through the monitor's own checking+storing path, with messages signed by a registered
device key (a compromised device): usage build_history.py DIR."""
import sys
import time
from pathlib import Path

from device_agents.identity import Signer
from edge_kit.fleet.inventory import load_fleet
from edge_kit.telemetry.metrics import FleetMetrics
from edge_kit.telemetry.monitor import Monitor
from edge_kit.telemetry.store import Store, history_path
from edgekit_protocol import messages

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
FLEET = "rev"
fleet_file = out / "fleet.yaml"
fleet_file.write_text(f"fleet: {FLEET}\nbroker: {{host: 127.0.0.1, port: 1}}\n"
                      "defaults: {user: edgekit, profile: rpi4}\ndevices:\n  - {name: d1, host: 127.0.0.1}\n")
fleet = load_fleet(fleet_file)
key = Signer.generate()
fleet.key_store().register("d1", key.public)

OSC52 = "\x1b]52;c;ZWNobyBwd25lZA==\x1b\\"               # clipboard write: "echo pwned"
OSC8 = "\x1b]8;;file:///etc/passwd\x1b\\click\x1b]8;;\x1b\\"  # hyperlink
MARKUP = sys.argv[3] if len(sys.argv) > 3 else "[link=file:///etc/shadow]int8[/link][/][bold red]ALERT: operator key compromised"
EVIL_VARIANT = "int8" + OSC52 + MARKUP
XSS = '<img src=x onerror=alert(1)>'

def bench(seq, variant, sensor="ina219"):
    return messages.envelope("bench", FLEET, "d1", seq, {
        "variant": variant, "sha256": "a" * 64, "model_bytes": 200_000, "profile": "rpi4", "runs": 100,
        "latency_ms": {"p50": 2.5, "p90": 5.0, "p99": 6.0, "mean": 2.5, "std": 0.1, "min": 0.1, "max": 10},
        "power": {"measured": True, "estimated": False, "sensor": sensor, "avg_w": 4.2, "energy_per_inference_mj": 0.5,
                  "method": "ina219"}, "accuracy": {"metric": "top1", "value": 0.99, "samples": 360}, "simulated": False,
        "runtime": "litert" + XSS})

def status(seq, variant):
    return messages.envelope("status", FLEET, "d1", seq, {"state": "online", "profile": "rpi4",
                             "current": {"variant": variant, "sha256": "a" * 64}})

def telemetry(seq, live):
    return messages.envelope("telemetry", FLEET, "d1", seq, {"conditions": {}, "spool": {}, "live": live})

metrics = FleetMetrics()
mon = Monitor(fleet, Store(history_path(fleet_file)), on_message=metrics.observe, verify_in_child=False)
now = time.time()
batch = []
def add(kind, m):
    batch.append((messages.topic(FLEET, "d1", kind), messages.encode(key.sign(m)), now, None))

add("bench", bench(1, EVIL_VARIANT, sensor="ina219" + OSC8 + XSS))
add("bench", bench(2, XSS))
add("status", status(3, EVIL_VARIANT))
mode = sys.argv[2] if len(sys.argv) > 2 else ""
if mode == "live-str":
    add("telemetry", telemetry(4, {"latency_ms": {"p50": "x", "p99": 1}, "requests": 1, "model": {"variant": "v"}}))
if mode == "current-str":
    add("status", status(5, EVIL_VARIANT) | {"current": "not-a-dict"})
mon._store(batch)
print("stored", mon.stats, "alerts:", [a.text for a in mon.alerts])
mon.store.close()
print(fleet_file)
