"""What the host tests of the monitor share: a simulated fleet file, and a monitor started on a history alone (its
broker, port 1, refuses: only the history's part of the start runs). Imported by name: pytest puts this folder on
``sys.path`` for the tests in it."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

from edge_kit.fleet.inventory import load_fleet
from edge_kit.telemetry.monitor import Monitor


def fleet_yaml(path: Path, devices: Iterable[str] = ("d1",)) -> Path:
    """Write a fleet file of ``devices`` (rpi4, broker on port 1) at ``path``; return ``path``."""
    path.write_text("fleet: sim\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                    "devices:\n" + "".join(f"  - {{name: {d}, host: 127.0.0.1}}\n" for d in devices))
    return path


def started(fleet_file: Path, store, settled: bool = False, **kw) -> Monitor:
    """Return a monitor of ``fleet_file`` on ``store`` that read the history as it starts (it then fails to connect);
    ``settled``: as one subscribed for SETTLE_S, so it judges the devices last heard in the history."""
    mon = Monitor(load_fleet(fleet_file), store, verify_in_child=False, **kw)
    try:
        mon.start(timeout=0.5)
    except Exception:  # noqa: BLE001 - AgentError: only the history's part matters here
        pass
    if settled:
        mon._judge_before_from = time.monotonic()
    return mon
