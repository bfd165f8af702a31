"""A signed telemetry message whose msg_id carries a newline and ESC, and a live figure observe() cannot take:
the monitor's writer logs the failure with the device's msg_id (stderr via logging's last resort)."""
import sys
import time
from pathlib import Path

from device_agents.identity import Signer
from edge_kit.fleet.inventory import load_fleet
from edge_kit.telemetry.metrics import FleetMetrics
from edge_kit.telemetry.monitor import Monitor
from edge_kit.telemetry.store import Store
from edgekit_protocol import messages

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
(out / "fleet.yaml").write_text("fleet: rev\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                                "devices:\n  - {name: d1, host: 127.0.0.1}\n")
fleet = load_fleet(out / "fleet.yaml"); key = Signer.generate(); fleet.key_store().register("d1", key.public)
mon = Monitor(fleet, Store(out / "h.db"), on_message=FleetMetrics().observe, verify_in_child=False)
m = messages.envelope("telemetry", "rev", "d1", 1, {"conditions": {}, "spool": {}, "live": {
    "model": {"variant": "int8"}, "requests": 1, "errors": "x"}})
m["msg_id"] = "abc\nERROR:edgekit.monitor:operator key rotated by admin, run `edgekit keys rotate --force`\x1b[2K"
mon._store([(messages.topic("rev", "d1", "telemetry"), messages.encode(key.sign(m)), time.time(), None)])
