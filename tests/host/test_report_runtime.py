"""The report's fleet table names the runtime that ran each device's current variant."""

from __future__ import annotations

from edge_kit.telemetry.report import Newest, _fleet_rows
from edge_kit.telemetry.store import Store
from edgekit_protocol import messages


def test_fleet_table_has_a_runtime_column(tmp_path):
    store = Store(tmp_path / "h.db")
    rows = []
    for i, (device, variant, runtime) in enumerate((("a", "fp32", "litert"), ("b", "onnx-fp32", "onnxruntime"),
                                                    ("c", "trt-fp16", "tensorrt"))):
        sha = variant[0] * 64
        rows.append(("bench", messages.envelope("bench", "sim", device, i, {
            "profile": "jetson-orin-nano", "variant": variant, "sha256": sha, "runtime": runtime,
            "latency_ms": {"p90": 1.0}, "runs": 10, "accuracy": {"value": 0.99},
            "power": {"method": "estimated", "estimated": True, "energy_per_inference_mj": 0.1}})))
        rows.append(("status", messages.envelope("status", "sim", device, i, {
            "state": "online", "current": {"sha256": sha, "variant": variant}})))
    store.add_many(rows)
    head, table = _fleet_rows(Newest.read(store))
    col = head.index("runtime")
    assert head[col - 1] == "running"
    assert {r[0]: r[col] for r in table} == {"a": "litert", "b": "onnxruntime", "c": "tensorrt"}
