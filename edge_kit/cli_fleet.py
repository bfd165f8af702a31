"""Fleet commands of the `edgekit` CLI (registered on :data:`edge_kit.cli.app`)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Column, Table

from edge_kit.cli import JsonOpt, _emit_json, app, out

FleetOpt = Annotated[Path, typer.Option("--fleet", "-f", help="fleet.yaml: devices, SSH and broker.")]
DevicesOpt = Annotated[Optional[list[str]], typer.Option("--devices", help="Device name, tag:<tag> or all; repeat.")]
CandidatesOpt = Annotated[Path, typer.Option("--artifacts", help="The compiled model's folder: its variants are the candidates.")]
MarginOpt = Annotated[float, typer.Option(min=0, max=1, help="Relative gain needed to switch (no flapping).")]


def bench_rows(record: dict[str, Any]) -> list[tuple[str, str]]:
    """Return (label, text) rows describing one bench record, each figure with where it came from."""
    lat = record["latency_ms"]
    power = record["power"]
    rows = [
        ("device", f"{record['device']} ({record.get('profile') or 'no profile'})"
                   + ("  (simulated device: measured on this machine)" if record.get("simulated") else "")),
        ("variant", f"{record.get('variant')}  sha256 {str(record.get('sha256'))[:12]}"),
        ("runtime", f"{record['runtime']} {record['runtime_version']}, {record['delegate']}, {record['threads']} thread(s)"),
        ("runs", f"{record['runs']} timed after {record['warmup_runs']} warm-up in {record['duration_s']} s; inputs: {record['inputs']}"),
        ("latency p50/p90/p99", f"{lat['p50']:.3f} / {lat['p90']:.3f} / {lat['p99']:.3f} ms ({record['latency_method']})"),
        ("init / first", f"{record['init_ms']:.1f} / {record['first_inference_ms']:.2f} ms"),
        ("peak RSS", f"{record['peak_rss_mb']} MB ({record['peak_rss_method']})"),
        ("power", (f"{power['avg_w']:.3f} W, {power['energy_per_inference_mj']:.3f} mJ/inference; " if power.get("avg_w") is not None else "")
                  + power["method"]),
    ]
    if record.get("accuracy"):
        acc = record["accuracy"]
        rows.append(("top-1 accuracy", f"{100 * acc['value']:.2f} % on {acc['samples']} shipped eval samples"))
    if record.get("fidelity"):
        fid = record["fidelity"]
        rows.append(("fidelity vs fp32", f"top-1 agreement {100 * fid['top1_agreement']:.2f} %, max |err| {fid['max_abs_error']:.4g}"))
    return rows


@app.command("bench")
def bench_cmd(
    fleet_file: FleetOpt,
    device: Annotated[str, typer.Option(help="Device name from the fleet file.")],
    variant: Annotated[Optional[str], typer.Option(help="Variant id installed on the device (default: its current model).")] = None,
    min_runs: Annotated[Optional[int], typer.Option(min=1, help="Timed runs at least (default: the agent's config).")] = None,
    min_seconds: Annotated[Optional[float], typer.Option(min=0, help="Timed seconds at least.")] = None,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for the record.")] = 300.0,
    as_json: JsonOpt = False,
) -> None:
    """Ask a running agent for a benchmark over MQTT and print the record when it arrives."""
    from edge_kit.fleet.commands import FleetClient
    from edge_kit.fleet.inventory import load_fleet

    fleet = load_fleet(fleet_file)
    dev = fleet.device(device)
    args = {k: v for k, v in {"variant": variant, "min_runs": min_runs, "min_seconds": min_seconds}.items() if v is not None}
    with FleetClient(fleet.broker, fleet.fleet, fleet.broker.password(str(fleet_file))) as client:
        with out.status(f"benchmarking {variant or 'the current model'} on {dev.name}", spinner="dots") if not as_json else nullcontext():
            record = client.request(dev.name, "bench", args, timeout=timeout)["record"]
    if as_json:
        _emit_json(record)
        return
    t = Table(show_header=False, box=box.SIMPLE, pad_edge=False)
    for label, text in bench_rows(record):
        t.add_row(label, escape(text))
    out.print(t)



sim_app = typer.Typer(no_args_is_help=True, help="A simulated fleet on this machine: broker, sshd and agent per device.")
app.add_typer(sim_app, name="sim")
SimDirOpt = Annotated[Path, typer.Option("--dir", help="Where the simulated fleet lives (its fleet.yaml is here).")]


def _results_table(group: Any) -> Table:
    t = Table("device", "result", "variant", "what happened", "seconds", box=box.SIMPLE_HEAD, pad_edge=False)
    style = {"succeeded": "green", "skipped": "dim", "failed": "red"}
    for r in group.results:
        text = "; ".join(r.actions) if r.status != "failed" else (r.reason or "")
        if r.status == "skipped" and r.reason:
            text = r.reason
        t.add_row(r.device, f"[{style[r.status]}]{r.status}[/]", r.variant or "-", escape(text), f"{r.seconds:.1f}")
    return t


@app.command("deploy")
def deploy_cmd(
    fleet_file: FleetOpt,
    artifacts: Annotated[Path, typer.Option(help="A compiled model's folder (with manifest.json).")],
    devices: DevicesOpt = None,
    variant: Annotated[Optional[str], typer.Option(help="Variant to activate (default: keep the current one if it is "
                                                        "among these artifacts, else the profile's first).")] = None,
    parallel: Annotated[int, typer.Option(min=1, max=256, help="Devices at a time.")] = 8,
    canary: Annotated[Optional[str], typer.Option(help="Deploy to this share first, e.g. 10%; stop if too many fail.")] = None,
    max_failed: Annotated[str, typer.Option(help="Share of canaries allowed to fail, e.g. 0% or 20%.")] = "0%",
    trust_new_hosts: Annotated[bool, typer.Option("--trust-new-hosts", help="Accept and record SSH host keys seen "
                                                  "for the first time (a changed key is always refused).")] = False,
    health_timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for each device's health check.")] = 120.0,
    as_json: JsonOpt = False,
) -> None:
    """Push the agent and the artifacts to devices over SSH, activate safely, check health, roll back failures."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from edge_kit.cli import err
    from edge_kit.fleet.deploy import DeployOptions, deploy
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.manifest import read_manifest

    fleet = load_fleet(fleet_file)
    targets = fleet.select(devices)
    read_manifest(artifacts)  # a missing or broken manifest stops here, before any device is touched
    opts = DeployOptions(artifacts=artifacts, variant=variant, parallel=parallel, canary=_share(canary, "--canary"),
                         max_failed=_share(max_failed, "--max-failed") or 0.0, trust_new_hosts=trust_new_hosts,
                         health_timeout=health_timeout)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} devices"),
                  TimeElapsedColumn(), console=err, transient=True, disable=as_json) as bar:
        task = bar.add_task("deploying", total=len(targets))

        def progress(device: str, what: str) -> None:
            done = what in ("succeeded", "skipped", "failed")
            bar.update(task, advance=1 if done else 0, description=f"{device}: {what}")

        group = deploy(fleet, targets, opts, progress)
    if as_json:
        _emit_json(group.as_dict())
    else:
        out.print(_results_table(group))
        if group.stopped:
            out.print(f"[red]rollout stopped:[/] {escape(group.stopped)}")
    if group.failed or group.stopped:
        raise typer.Exit(4)


def _share(text: str | None, option: str) -> float | None:
    """Return ``10%`` or ``0.1`` as 0.1; None for None."""
    if text is None:
        return None
    from edge_kit.errors import InputError

    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise InputError(f"{option} {text}: give a share such as 10% or 0.1") from None
    if not 0 <= value <= 1:
        raise InputError(f"{option} {text}: must be between 0% and 100%")
    return value


@sim_app.command("up")
def sim_up(
    devices: Annotated[int, typer.Option("--devices", min=1, max=64, help="How many virtual devices.")] = 3,
    profiles: Annotated[str, typer.Option(help="Comma-separated profiles, cycled over the devices.")] = "rpi4,rpi5,coral-usb",
    workdir: SimDirOpt = Path(".edgekit-sim"),
    embedded_broker: Annotated[bool, typer.Option("--embedded-broker", help="Use the embedded broker even when Mosquitto is installed.")] = False,
    embedded_ssh: Annotated[bool, typer.Option("--embedded-ssh", help="Use the embedded SSH server even when sshd is installed.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Start a broker and N virtual devices (an SSH server + the real agent each); writes DIR/fleet.yaml."""
    from edge_kit.cli import err
    from edge_kit.sim.fleet import SimFleet

    sim = SimFleet(workdir)
    with err.status("starting the simulated fleet") as status:
        fleet = sim.up(devices, [p.strip() for p in profiles.split(",") if p.strip()], embedded_broker=embedded_broker or None,
                       embedded_ssh=embedded_ssh or None, progress=lambda msg: status.update(msg))
    state = sim.state()
    kinds = {d["name"]: d["ssh"] for d in state["devices"]}
    info = {"fleet_file": str(sim.fleet_file), "broker": state["broker"],
            "devices": [{"name": d.name, "profile": d.profile, "ssh": f"{d.host}:{d.port}", "ssh_server": kinds[d.name],
                         "root": d.root} for d in fleet.devices]}
    if as_json:
        _emit_json(info)
        return
    t = Table("device", "profile", "ssh", "server", "root", box=box.SIMPLE_HEAD, pad_edge=False)
    for d in info["devices"]:
        t.add_row(d["name"], d["profile"], d["ssh"], d["ssh_server"], d["root"])
    out.print(t)
    out.print(f"broker: {info['broker']['kind']} on 127.0.0.1:{info['broker']['port']}; fleet file: {sim.fleet_file}")
    out.print(f"measurements are this machine's, marked simulated; stop with: edgekit sim down --dir {workdir}")


@sim_app.command("down")
def sim_down(workdir: SimDirOpt = Path(".edgekit-sim"), as_json: JsonOpt = False) -> None:
    """Stop everything `edgekit sim up` started in DIR."""
    from edge_kit.sim.fleet import SimFleet

    stopped = SimFleet(workdir).down()
    if as_json:
        _emit_json({"stopped": stopped})
    else:
        out.print(f"stopped {len(stopped)} process(es)" if stopped else f"nothing is up in {workdir}")


StoreOpt = Annotated[Optional[Path], typer.Option("--store", help="History database (default: edgekit-history.db next to the fleet file).")]


def _store_path(fleet_file: Path, store: Path | None) -> Path:
    return store or fleet_file.resolve().parent / "edgekit-history.db"


def decision_table(decisions: dict[str, Any], explain: bool) -> list[Any]:
    """Return rich renderables: one summary table, and with ``explain`` the table behind each choice."""
    out_items: list[Any] = []
    t = Table("device", "chosen", "feasible", "switch", "why", box=box.SIMPLE_HEAD, pad_edge=False)
    for name, d in decisions.items():
        feasible = "-" if d.chosen is None else ("yes" if d.feasible else "[red]NO[/]: " + escape(", ".join(d.violates)))
        t.add_row(name, d.chosen or "-", feasible, "yes" if d.switch else "no", escape(d.reason))
    out_items.append(t)
    if explain:
        for name, d in decisions.items():
            e = Table(Column("variant", min_width=16, no_wrap=True), "p90 ms", "top-1", "energy mJ/inf", "power source", "MB", "violates", "",
                      title=f"{name}", title_justify="left", box=box.SIMPLE, pad_edge=False)
            for r in d.table:
                mark = "chosen" if r.get("chosen") else ("current" if r["current"] else "")
                e.add_row(r["variant"], _num(r["p90_ms"]), "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%",
                          _num(r["energy_mj"]), r["power_source"] or "-", f"{r['model_mb']:.2f}",
                          escape(", ".join(r["violates"])) or ("-" if r["measured"] else "not measured"), mark)
            out_items.append(e)
    return out_items


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


@app.command("select")
def select_cmd(
    fleet_file: FleetOpt,
    artifacts: Annotated[Optional[Path], typer.Option(help="The compiled model's folder: its variants are the "
                                                           "candidates (default: the one the last tune used).")] = None,
    devices: DevicesOpt = None,
    store: StoreOpt = None,
    margin: MarginOpt = 0.1,
    explain: Annotated[bool, typer.Option("--explain", help="Print the table behind each choice.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Say which variant each device should run, and why, from the measurements in the history store."""
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.manifest import read_manifest
    from edge_kit.selection.tune import decide
    from edge_kit.telemetry.store import Store

    from edge_kit.errors import InputError

    fleet = load_fleet(fleet_file)
    db = Store(_store_path(fleet_file, store))
    if artifacts is None:
        last = next((d.get("artifacts") for d in db.decisions(limit=1)), None)
        if not last:
            raise InputError(f"{db.path}: no tune has run against this history; pass --artifacts FOLDER")
        artifacts = Path(last)
    manifest = read_manifest(artifacts)
    status = db.latest_status()
    decisions = {}
    for dev in fleet.select(devices):
        current = ((status.get(dev.name) or {}).get("current") or {}).get("sha256")
        decisions[dev.name] = decide(manifest, dev, db, current, margin)
    if as_json:
        _emit_json({k: v.as_dict() for k, v in decisions.items()})
        return
    for item in decision_table(decisions, explain):
        out.print(item)


def tune_options(artifacts: Path, rounds: int, margin: float, min_runs: int, min_seconds: float, timeout: float,
                 parallel: int, trust_new_hosts: bool) -> Any:
    from edge_kit.selection.tune import TuneOptions

    return TuneOptions(artifacts, rounds=rounds, margin=margin, bench={"min_runs": min_runs, "min_seconds": min_seconds},
                       timeout=timeout, parallel=parallel, trust_new_hosts=trust_new_hosts)


def print_tune(report: Any) -> None:
    for item in decision_table(report.final, explain=False):
        out.print(item)
    if report.deploy.failed:
        out.print(_results_table(report.deploy))
    for device, what in report.silent.items():
        out.print(f"[red]{device} did not answer:[/] {escape(', '.join(what))}")
    switched = report.switched
    out.print(f"{len(report.rounds)} round(s); switched: {', '.join(switched) or 'nothing'}")


@app.command("tune")
def tune_cmd(
    fleet_file: FleetOpt,
    artifacts: CandidatesOpt,
    devices: DevicesOpt = None,
    store: StoreOpt = None,
    rounds: Annotated[int, typer.Option(min=1, max=10)] = 2,
    margin: MarginOpt = 0.1,
    min_runs: Annotated[int, typer.Option(min=1, help="Timed runs per measurement at least.")] = 200,
    min_seconds: Annotated[float, typer.Option(min=0, help="Timed seconds per measurement at least.")] = 2.0,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds per round for all measurements to arrive.")] = 300.0,
    parallel: Annotated[int, typer.Option(min=1, max=256)] = 8,
    trust_new_hosts: Annotated[bool, typer.Option("--trust-new-hosts")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Measure every candidate on every device, select, activate, verify; repeat until nothing changes."""
    from edge_kit.cli import err
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.selection.tune import tune
    from edge_kit.telemetry.store import Store

    fleet = load_fleet(fleet_file)
    targets = fleet.select(devices)
    opts = tune_options(artifacts, rounds, margin, min_runs, min_seconds, timeout, parallel, trust_new_hosts)
    db = Store(_store_path(fleet_file, store))
    with err.status("tuning", spinner="dots") if not as_json else nullcontext() as status:
        report = tune(fleet, targets, opts, db, progress=(lambda m: status.update(m)) if status else None)
    if as_json:
        _emit_json(report.as_dict())
    else:
        print_tune(report)
    if report.deploy.failed or report.silent:
        raise typer.Exit(4)


@app.command("demo")
def demo_cmd(
    devices: Annotated[int, typer.Option("--devices", min=1, max=32, help="How many virtual devices.")] = 3,
    profiles: Annotated[str, typer.Option(help="Comma-separated profiles, cycled over the devices.")] = "rpi4,rpi5,coral-usb",
    workdir: Annotated[Optional[Path], typer.Option("--dir", help="Work folder (kept); default: a temporary one, removed.")] = None,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the temporary folder (artifacts, history, logs).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The whole loop on a simulated fleet: example model, compile, broker, devices, deploy, measure, select."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from edge_kit.cli import err
    from edge_kit.demo import STEPS, run_demo

    names = [p.strip() for p in profiles.split(",") if p.strip()]
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=err,
                  transient=True, disable=as_json) as bar:
        task = bar.add_task(STEPS[0], total=len(STEPS))
        seen: list[str] = []

        def progress(msg: str) -> None:
            top = msg.split(":")[0]
            if top in STEPS and top not in seen:
                seen.append(top)
                bar.update(task, completed=len(seen) - 1)
            bar.update(task, description=msg)

        result = run_demo(devices, tuple(names), workdir, keep, progress=progress)
    if as_json:
        _emit_json(result.as_dict())
        return
    t = Table("device", "profile", Column("variant", no_wrap=True), "p90 ms", "top-1", "mJ/inference", "feasible", box=box.SIMPLE_HEAD,
              pad_edge=False, title="each device on its best variant (measured by the real agent on this machine, "
                                    "simulated devices)", title_justify="left")
    for r in result.rows:
        t.add_row(r["device"], r["profile"], r["variant"] or "-", _num(r["p90_ms"]),
                  "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%", _num(r["energy_mj"]),
                  "yes" if r["feasible"] else ("[red]no[/]: " + escape(", ".join(r["violates"])) if r["feasible"] is False else "-"))
    out.print(t)
    methods = sorted({r["power_method"].split(",")[0] for r in result.rows if r["power_method"]})
    out.print(f"latency: perf_counter_ns around invoke(), LiteRT on this machine; energy: {escape('; '.join(methods))}")
    if result.report.deploy.failed:
        out.print(_results_table(result.report.deploy))
    switched = result.report.switched
    out.print(f"tune: {len(result.report.rounds)} round(s), switched {', '.join(switched) or 'nothing'}")
    if result.kept:
        out.print(f"files kept in {result.workdir}")


def _fleet_table(store: Any, fleet: Any) -> Table:
    """Per device: state, current variant, latest benchmark of it, last message."""
    import time as _time

    status, tele, bench = store.latest_status(), store.latest_telemetry(), store.latest_bench()
    t = Table("device", "profile", "state", "current", "p90 ms", "W (source)", "last heard", box=box.SIMPLE_HEAD, pad_edge=False)
    for dev in fleet.devices:
        st = status.get(dev.name) or {}
        cur = st.get("current") or {}
        rec = bench.get((dev.name, cur.get("sha256"))) if cur else None
        heard = max([m["ts"] for m in (st, tele.get(dev.name) or {}) if m] or [0])
        power = (rec or {}).get("power") or {}
        watts = "-" if power.get("avg_w") is None else f"{power['avg_w']:.2f} ({power.get('sensor') or 'estimated'})"
        t.add_row(dev.name, dev.profile, st.get("state", "never seen"), cur.get("variant") or "-",
                  _num(rec["latency_ms"]["p90"]) if rec else "-", watts,
                  f"{_time.time() - heard:.0f} s ago" if heard else "-")
    return t


@app.command("monitor")
def monitor_cmd(
    fleet_file: FleetOpt,
    store: StoreOpt = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="Serve Prometheus metrics on this port.")] = None,
    metrics_addr: Annotated[str, typer.Option(help="Address for the metrics endpoint.")] = "127.0.0.1",
    share: Annotated[Optional[str], typer.Option(help="Join this MQTT 5 shared-subscription group (several workers).")] = None,
    silence_s: Annotated[float, typer.Option(min=1, help="Alert when a device is silent this long.")] = 180.0,
    duration: Annotated[Optional[float], typer.Option(min=0, help="Stop after this many seconds (default: until Ctrl-C).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Store every message of the fleet (checked, deduplicated) and show a live table; optional /metrics."""
    import time as _time

    from rich.live import Live

    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.telemetry.metrics import FleetMetrics
    from edge_kit.telemetry.monitor import Monitor
    from edge_kit.telemetry.store import Store

    fleet = load_fleet(fleet_file)
    db = Store(_store_path(fleet_file, store))
    metrics = FleetMetrics()
    mon = Monitor(fleet, db, share=share, silence_s=silence_s, on_message=metrics.observe)
    metrics.watch(mon)
    server = metrics.serve(metrics_port, metrics_addr) if metrics_port else None
    mon.start()
    end = _time.monotonic() + duration if duration is not None else None
    shown = 0
    try:
        with Live(_fleet_table(db, fleet), console=out, refresh_per_second=1, transient=False) if not as_json else nullcontext() as live:
            while end is None or _time.monotonic() < end:
                _time.sleep(0.5)
                if live is not None:
                    live.update(_fleet_table(db, fleet))
                    for alert in mon.alerts[shown:]:
                        live.console.print(f"[red]alert[/] {escape(alert.text)}")
                    shown = len(mon.alerts)
    except KeyboardInterrupt:
        pass
    finally:
        mon.stop()
        if server is not None:
            server.shutdown()
    if as_json:
        s = mon.stats
        _emit_json({"received": s.received, "stored": s.stored, "duplicates": s.duplicates, "invalid": s.invalid,
                    "gaps": s.gaps, "alerts": [vars(a) for a in mon.alerts], "store": str(db.path)})


fleet_app = typer.Typer(no_args_is_help=True, help="What the history store knows about the fleet.")
app.add_typer(fleet_app, name="fleet")


@fleet_app.command("status")
def fleet_status_cmd(fleet_file: FleetOpt, store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Per device: last status, current variant and its latest benchmark, from the history store."""
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.telemetry.store import Store

    fleet = load_fleet(fleet_file)
    db = Store(_store_path(fleet_file, store))
    if as_json:
        _emit_json({"status": db.latest_status(), "telemetry": db.latest_telemetry(),
                    "bench": {f"{d}/{s}": r for (d, s), r in db.latest_bench().items()}})
        return
    out.print(_fleet_table(db, fleet))


@app.command("report")
def report_cmd(
    out_file: Annotated[Path, typer.Option("--out", help="The HTML file to write.")] = Path("report.html"),
    fleet_file: Annotated[Optional[Path], typer.Option("--fleet", "-f", help="fleet.yaml (its history store is used).")] = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write one self-contained HTML report: per profile, latency vs accuracy and energy; the fleet table."""
    from edge_kit.errors import InputError
    from edge_kit.telemetry.report import build_report
    from edge_kit.telemetry.store import Store

    path = store or (_store_path(fleet_file, None) if fleet_file else Path("edgekit-history.db"))
    if not path.is_file():
        raise InputError(f"{path}: no history store; run `edgekit monitor` or `edgekit tune` first, or pass --store")
    info = build_report(Store(path), out_file)
    if as_json:
        _emit_json(info)
    else:
        out.print(f"wrote {out_file}: {info['plots']} plots for {', '.join(info['profiles']) or 'no profile'}, "
                  f"{info['devices']} devices")
