"""`edgekit demo`: the whole loop on a simulated fleet, with nothing configured.

Builds the digits example (a small CNN trained on scikit-learn's bundled digits), compiles it for
three profiles, starts a broker (Mosquitto, or the embedded one) and a simulated fleet (sshd and
the real agent per device), then runs `edgekit tune` on it: deploy, measure every variant on every
device, select under each profile's constraints, activate, verify. Everything lives in one folder
that is removed afterwards unless asked to keep it; a kept folder holds the fleet file
(``sim/fleet.yaml``) and its history beside it, where ``edgekit report``, ``select`` and
``fleet status`` look for it (the devices are stopped: those read the history, not the devices).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_kit.compiler.pipeline import CompileRequest, compile_model
from edge_kit.examples import digits
from edge_kit.fsutil import writable_folder
from edge_kit.loop.tune import TuneOptions, TuneReport, tune
from edge_kit.manifest import sign_manifest
from edge_kit.profiles import load_profile
from edge_kit.sim.broker import find_mosquitto
from edge_kit.sim.fleet import SimFleet
from edge_kit.telemetry.store import history_path, open_history

STEPS = ("building the example model", "compiling", "starting the simulated fleet", "tuning",
         "serving an application on every device", "cleaning up")
APP_REQUESTS = 300  # per device: the demo's application classifies this many eval images through the serving API
DEMO_BENCH = {"min_runs": 100, "min_seconds": 0.5}


@dataclass
class DemoResult:
    workdir: Path
    kept: bool
    report: TuneReport
    rows: list[dict[str, Any]]  # one per device: what it runs now and what that measured
    fleet_file: Path | None = None  # the simulated fleet's fleet.yaml (its devices are stopped)
    history: Path | None = None  # the history store the tune wrote, beside fleet_file

    def as_dict(self) -> dict[str, Any]:
        """Return the result as plain data (for ``--json``): paths as text, the tune report included."""
        return {"workdir": str(self.workdir), "kept": self.kept, "fleet_file": str(self.fleet_file),
                "history": str(self.history), "devices": self.rows, "tune": self.report.as_dict()}


def _serve_an_application(fleet: Any, eval_file: Path) -> dict[str, dict[str, Any]]:
    """Run a small application on every device: it classifies eval images through the agent's serving
    API (``device_agents.serving.Client``, as an application on the device would) and scores them.

    Returns:
        Per device: ``requests``, ``top1`` of the application's own answers against the labels, and the
        agent's live figures (``p50_ms``/``p99_ms``: its service time, perf_counter_ns), or ``error``.
    """
    import numpy as np

    from device_agents.serving import Client, ServingError
    from edge_kit.fleet.commands import FleetClient

    with np.load(eval_file) as data:
        x = data[next(k for k in data.files if k.startswith("x"))].astype(np.float32)
        y = data[next(k for k in data.files if k.startswith("y"))]
    out: dict[str, dict[str, Any]] = {}
    for dev in fleet.devices:
        right = 0
        try:
            with Client(Path(dev.root)) as app:
                for i in range(APP_REQUESTS):
                    scores = next(iter(app.predict(x[i % len(x)]).values()))
                    right += int(np.argmax(scores) == y[i % len(y)])
        except ServingError as exc:
            out[dev.name] = {"error": str(exc)}
            continue
        out[dev.name] = {"requests": APP_REQUESTS, "top1": right / APP_REQUESTS}
    with FleetClient.of(fleet) as client:
        for dev in fleet.devices:
            if "error" in out[dev.name]:
                continue
            live = client.request(dev.name, "state", {"live": 0}, timeout=30)["result"]["live"] or {}
            lat = live.get("latency_ms") or {}
            out[dev.name].update(p50_ms=lat.get("p50"), p99_ms=lat.get("p99"), served=(live.get("model") or {}).get("variant"))
    return out


def run_demo(devices: int = 3, profiles: tuple[str, ...] = ("rpi4", "rpi5", "coral-usb"), workdir: Path | None = None,
             keep: bool = False, embedded_broker: bool | None = None,
             progress: Callable[[str], None] | None = None) -> DemoResult:
    """Run the loop once; return each device's final variant with its measurement.

    Raises:
        InputError: ``workdir`` cannot be created or written (nothing is started).
        EdgeKitError: a step failed (everything started is stopped; the folder is kept to inspect).
    """
    step = progress or (lambda _m: None)
    for p in profiles:
        load_profile(p)
    own = workdir is None
    folder = Path(tempfile.mkdtemp(prefix="edgekit-demo-")) if own else writable_folder(Path(workdir), "--dir")
    sim = SimFleet(folder / "sim")
    ok = False
    try:
        step(STEPS[0])
        files = digits(folder / "example", epochs=15)
        step(STEPS[1])
        compile_model(CompileRequest(files.model, [load_profile(p) for p in profiles], folder / "artifacts",
                                     calib=files.calib, eval=files.eval, train=files.train, epochs=2))
        artifacts = folder / "artifacts" / "digits"
        step(STEPS[2])
        if embedded_broker is None:
            embedded_broker = find_mosquitto() is None
        if embedded_broker:  # the embedded broker cannot enforce a wall: say so rather than pretend
            step(f"{STEPS[2]}: Mosquitto not found, so an embedded broker, anonymous and plain (--insecure)")
        fleet = sim.up(devices, list(profiles), embedded_broker=embedded_broker, insecure=embedded_broker)
        sign_manifest(artifacts, fleet.key_store().operator)  # as a release step would: deploys check it
        step(STEPS[3])
        history = history_path(sim.fleet_file)  # the embedded SQLite file the next commands find
        store = open_history(history)
        report = tune(fleet, fleet.devices, TuneOptions(artifacts, bench=dict(DEMO_BENCH), timeout=180), store,
                      progress=lambda m: step(f"{STEPS[3]}: {m}"))
        step(STEPS[4])
        live = _serve_an_application(fleet, files.eval)
        latest = store.latest_bench()
        rows = []
        for dev in fleet.devices:
            d = report.final.get(dev.name)
            rec = latest.get((dev.name, d.chosen_sha256)) if d and d.chosen_sha256 else None
            rows.append({"device": dev.name, "profile": dev.profile, "variant": d.chosen if d else None,
                         "feasible": d.feasible if d else None, "violates": d.violates if d else [],
                         "reason": d.reason if d else "no decision (see the tune report)",
                         "p90_ms": rec["latency_ms"]["p90"] if rec else None,
                         "latency_method": rec.get("latency_method") if rec else None,
                         "runtime": rec.get("runtime") if rec else None,
                         "delegate": rec.get("delegate") if rec else None,
                         "accuracy": (rec.get("accuracy") or {}).get("value") if rec else None,
                         "accuracy_samples": (rec.get("accuracy") or {}).get("samples") if rec else None,
                         "energy_mj": rec["power"].get("energy_per_inference_mj") if rec else None,
                         "power_method": rec["power"]["method"] if rec else None,
                         "simulated": rec.get("simulated") if rec else None,
                         "live": live.get(dev.name)})
        store.close()
        ok = True
        return DemoResult(folder, keep or not own, report, rows, sim.fleet_file, history)
    finally:
        step(STEPS[5])
        sim.down()
        if own and ok and not keep:
            shutil.rmtree(folder, ignore_errors=True)
