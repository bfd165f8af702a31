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
import threading
import time
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
from edge_kit.telemetry.monitor import Monitor
from edge_kit.telemetry.store import HistoryStore, history_path, open_history
from edgekit_protocol.messages import field_at

STEPS = ("building the example model", "compiling", "starting the simulated fleet", "tuning",
         "serving an application on every device", "cleaning up")
APP_REQUESTS = 300  # per device: the demo's application classifies this many eval images through the serving API
# The demo's agents send telemetry and live figures every 5 s (the fleet file's telemetry_interval_s; an agent's own
# default is 30 s): the live message covering the application's requests is due within one interval, and has a
# second one and some slack to arrive.
TELEMETRY_INTERVAL_S = 5.0
LIVE_WAIT_S = 2 * TELEMETRY_INTERVAL_S + 10
TOP1_SOURCE = "the demo application on this host, scoring the answers it got against the eval set's labels (not stored)"
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


def _serve_an_application(fleet: Any, eval_file: Path, store: HistoryStore,
                          step: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Run a small application on every device: it classifies eval images through the agent's serving
    API (``device_agents.serving.Client``, as an application on the device would) and scores them, while
    a :class:`~edge_kit.telemetry.monitor.Monitor` stores in ``store`` what the agents publish; then wait
    (up to :data:`LIVE_WAIT_S`) until each device's signed ``live`` message covering those requests is stored.

    The live figures stored, and shown, are the agent's own message, checked as the monitor checks every
    message (signature against the device's registered key, schema, topic, time); the application's
    ``top1`` is this host's scoring of the answers it got, never stored (it is no device's signed word).

    Returns:
        Per device: ``requests``, ``top1`` of the application's own answers against the labels (with
        ``top1_source``), and from the stored live message ``p50_ms``/``p99_ms`` (the agent's service time) with the
        ``clock`` it names, ``served`` (its variant), ``requests_served`` and ``record`` (its ``msg_id``,
        ``seq``); or ``not_stored`` (why no live message was stored: those figures are then None); or ``error``.

    Raises:
        AgentError: the broker cannot be reached. HistoryError: ``store`` cannot be written.
    """
    import numpy as np

    from device_agents.serving import Client, ServingError
    from edge_kit.fleet.commands import FleetClient

    with np.load(eval_file) as data:
        x = data[next(k for k in data.files if k.startswith("x"))].astype(np.float32)
        y = data[next(k for k in data.files if k.startswith("y"))]
    heard = threading.Condition()
    lives: dict[str, list[dict[str, Any]]] = {}

    def on_message(kind: str, msg: dict[str, Any]) -> None:  # the monitor's writer thread, once a message is stored
        if kind == "live":
            with heard:
                lives.setdefault(msg["device"], []).append(msg)
                heard.notify_all()

    # started before the first request: every live message the agents send from now on is checked and stored
    monitor = Monitor(fleet, store, on_message=on_message, verify_in_child=False).start()
    out: dict[str, dict[str, Any]] = {}
    try:
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
            out[dev.name] = {"requests": APP_REQUESTS, "top1": right / APP_REQUESTS, "top1_source": TOP1_SOURCE}
        # what each agent served and counted once the application was done: its next live message covers them
        wanted: dict[str, tuple[Any, int]] = {}
        with FleetClient.of(fleet) as client:
            for dev in fleet.devices:
                if "error" not in out[dev.name]:
                    live = client.request(dev.name, "state", {"live": 0}, timeout=30)["result"]["live"]
                    counted = field_at(live, "requests")  # the device's word: a count only when it is one
                    wanted[dev.name] = (field_at(live, "model", "sha256"),
                                        max(APP_REQUESTS, counted if type(counted) is int else 0))
        step(f"{STEPS[4]}: waiting for each agent's signed live figures (sent every "
             f"{TELEMETRY_INTERVAL_S:g} s)")

        def covering(device: str) -> dict[str, Any] | None:
            sha, counted = wanted[device]  # the protocol checked a live message's requests is a whole number
            return next((m for m in reversed(lives.get(device, [])) if isinstance(sha, str)
                         and field_at(m, "model", "sha256") == sha and m["requests"] >= counted), None)

        deadline = time.monotonic() + LIVE_WAIT_S
        with heard:  # woken by each live message stored; a failed history is seen within half a second
            while not all(covering(d) for d in wanted) and monitor.failed is None and time.monotonic() < deadline:
                heard.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            found = {d: covering(d) for d in wanted}
    finally:
        monitor.stop()
    if monitor.failed is not None:
        raise monitor.failed
    refused = monitor.stats.invalid
    for device, msg in found.items():
        if msg is None:
            why = (f"no live message of its served model covering the application's requests within {LIVE_WAIT_S:.0f} s"
                   + (f"; {refused} message(s) refused (the history's invalid table says why)" if refused else
                      f"; see {fleet.device(device).root}/agent.log"))
            out[device].update(p50_ms=None, p99_ms=None, clock=None, served=None, requests_served=None, record=None,
                               not_stored=why)
            continue
        out[device].update(p50_ms=field_at(msg, "latency_ms", "p50"), p99_ms=field_at(msg, "latency_ms", "p99"),
                           clock=field_at(msg, "clock"),
                           served=field_at(msg, "model", "variant"), requests_served=msg["requests"],
                           record={"msg_id": msg["msg_id"], "seq": msg["seq"]})
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
        fleet = sim.up(devices, list(profiles), embedded_broker=embedded_broker, insecure=embedded_broker,
                       telemetry_interval_s=TELEMETRY_INTERVAL_S)
        sign_manifest(artifacts, fleet.key_store().operator)  # as a release step would: deploys check it
        step(STEPS[3])
        history = history_path(sim.fleet_file)  # the embedded SQLite file the next commands find
        store = open_history(history)
        report = tune(fleet, fleet.devices, TuneOptions(artifacts, bench=dict(DEMO_BENCH), timeout=180), store,
                      progress=lambda m: step(f"{STEPS[3]}: {m}"))
        step(STEPS[4])
        live = _serve_an_application(fleet, files.eval, store, step)
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
