"""One compromised device sends a fresh variant name (and sensor name) per bench record: count the series
the monitor's /metrics keeps (FleetMetrics.observe is the monitor's on_message)."""
import sys
import tracemalloc

from prometheus_client import generate_latest

from edge_kit.telemetry.metrics import FleetMetrics
from edgekit_protocol import messages

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
m = FleetMetrics()
tracemalloc.start()
for i in range(N):
    msg = messages.envelope("bench", "rev", "d1", i, {
        "variant": f"v{i}-" + "x" * 60, "sha256": "a" * 64, "runs": 1, "simulated": False,
        "latency_ms": {q: 1.0 for q in ("p50", "p90", "p99", "mean", "std", "min", "max")},
        "power": {"sensor": f"s{i}", "avg_w": 1.0, "energy_per_inference_mj": 1.0}, "accuracy": {"value": 0.9}})
    m.observe("bench", msg)
cur, peak = tracemalloc.get_traced_memory()
text = generate_latest(m.registry)
series = sum(1 for ln in text.decode().splitlines() if ln and not ln.startswith("#"))
print(f"{N} bench records from one device -> {series} series, /metrics {len(text)/1e6:.1f} MB, python heap {cur/1e6:.1f} MB")
