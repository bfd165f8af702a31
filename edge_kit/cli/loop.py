"""Loop commands of the `edgekit` CLI: select, tune, demo, monitor, fleet status, report."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.table import Column, Table

from edge_kit.cli.app import (
    BENCH_RUNS_MAX,
    BENCH_RUNS_MIN,
    BENCH_SECONDS_MAX,
    BENCH_SECONDS_MIN,
    WAIT_MAX_S,
    DevicesOpt,
    FleetOpt,
    HistoryOpt,
    JsonOpt,
    ParallelOpt,
    ProfilesOpt,
    TrustNewHostsOpt,
    app,
    bounded,
    device_name,
    emit_json,
    err,
    open_fleet_history,
    out,
    print_refused,
    profile_names,
    progress_bar,
    results_table,
    safe,
    spinner,
)
from edge_kit.errors import INFEASIBLE_EXIT
from edge_kit.selection import DEFAULT_MARGIN
from edge_kit.telemetry import GAP_GRACE_S
from edge_kit.telemetry.budget import DEFAULT_BURST, DEFAULT_RATE
from edgekit_protocol.labels import accuracy_text, clip, power_source

CandidatesOpt = Annotated[Path, typer.Option("--artifacts", help="The compiled model's folder: its variants are the candidates.")]
MarginOpt = Annotated[float, typer.Option(**bounded("Relative gain needed to switch (no flapping).", 0, 1))]

def decision_table(decisions: dict[str, Any], explain: bool) -> list[Any]:
    """Return rich renderables: one summary table, and with ``explain`` the table behind each choice."""
    out_items: list[Any] = []
    t = Table("device", "chosen", "feasible", "switch", "why", box=box.SIMPLE_HEAD, pad_edge=False)
    for name, d in decisions.items():
        feasible = "-" if d.chosen is None else ("yes" if d.feasible else "[red]NO[/]: " + safe(_violated(d)))
        t.add_row(safe(name), safe(d.chosen or "-"), feasible, "yes" if d.switch else "no", safe(d.reason))
    out_items.append(t)
    if explain:
        for name, d in decisions.items():
            fleet = getattr(d, "kind", None) == "fleet selection"
            # no choice (nothing to infer a candidate from): no confidence to give, the why column says what is missing
            sure = getattr(d, "confidence", None)  # a plain decision (every candidate measured) has none
            sure = "no choice yet" if sure is None else f"confidence {sure:.2f}"
            title = safe(name) if not fleet else (f"{safe(name)} ({sure}"
                                            + (f"; [red]flagged[/]: {safe(d.flagged)}" if d.flagged else "") + ")")
            e = Table(Column("variant", min_width=16, no_wrap=True), "p90 ms", "accuracy", "energy mJ/inf",
                      "source" if fleet else "power source", "runs", "MB", "violates", "",
                      title=title, title_justify="left", box=box.SIMPLE, pad_edge=False)
            for r in d.table:
                mark = "chosen" if r.get("chosen") else ("current" if r["current"] else "")
                inferred = r.get("source") == "inferred"
                e.add_row(safe(r["variant"]), _cell(r, "p90_ms", _num), _cell(r, "accuracy", accuracy_text), _cell(r, "energy_mj", _num),
                          safe(_source(r) if fleet else (r["power_source"] or "-")), str(r["runs"]),
                          f"{r['model_mb']:.3g}",  # a 4 kB model is 0.004 MB, never 0.00
                          safe(", ".join(r["violates"])) or ("-" if r["measured"] or inferred else "not measured"), mark)
            for variant, why in (getattr(d, "excluded", None) or {}).items():  # it cannot run them
                e.add_row(safe(variant), "-", "-", "-", "-", "0", "-", "[red]left out[/]: " + safe(why), "")
            out_items.append(e)
    return out_items


def _violated(d: Any) -> str:
    """Return the bounds decision ``d``'s chosen variant breaks, in words, a power bound with the source of the
    figure that broke it (``power <= 5 W (estimated)``): an estimate from CPU use is no meter's reading; any other
    bound broken on a figure the fleet model inferred says so (``p90 <= 8 ms (inferred)``): the device never
    measured it."""
    row = next((r for r in getattr(d, "table", None) or [] if r.get("chosen")), {})
    source = row.get("power_source")
    inferred = " (inferred)" if row.get("source") == "inferred" else ""
    return ", ".join(f"{v} ({source})" if v.startswith("power") and source else v + inferred for v in d.violates)


def infeasible_line(decisions: dict[str, Any], chosen: str = "runs") -> str | None:
    """Return the line (rich markup) naming the devices of ``decisions`` left on a variant that meets not every
    constraint, each with the variant and what it breaks (a power bound with its figure's source), or None when
    there are none (:func:`~edge_kit.selection.policy.infeasible`); ``chosen``: what the device does with it
    (``runs`` after tune, ``gets`` from select)."""
    from edge_kit.selection.policy import infeasible

    names = list(infeasible(decisions))
    if not names:
        return None
    shown = "; ".join(f"{safe(n)} {chosen} {safe(decisions[n].chosen)}, breaking {safe(_violated(decisions[n]))}"
                      for n in names[:10])
    more = f"; and {len(names) - 10} more (--json: infeasible)" if len(names) > 10 else ""
    return (f"[red]infeasible[/] {len(names)} device(s) meet no variant's constraints (the least-violating one is "
            f"chosen): {shown}{more}")


def _source(row: dict[str, Any]) -> str:
    """Return a fleet decision row's source: ``measured`` or ``inferred``, with where its power came from
    (a measured row's sensor or ``estimated``; an inferred row's pooled sources, e.g. ``from estimated``)."""
    ps = row.get("power_source")
    if row.get("source") == "measured" and ps:
        return f"measured (power: {ps})"
    if row.get("source") == "inferred" and ps and ps != "inferred":
        return f"inferred (power {ps.removeprefix('inferred ')})"
    return row.get("source") or "-"


def figures_note(devices: Any, inferred: bool = False, *, table: str = "select", metric: str | None = None) -> str:
    """Return the line printed under a table of the devices' figures (``table``: ``select`` for select --explain,
    ``fleet`` for fleet status and the monitor), markup escaped: :func:`figures_text`."""
    return safe(figures_text(devices, inferred, table=table, metric=metric))


def figures_text(devices: Any, inferred: bool = False, *, table: str = "select", metric: str | None = None) -> str:
    """Return where each figure of the devices' table comes from (plain text, as ``--json`` gives it): the select
    table's accuracy, named by ``metric`` (the eval set's headline figure, e.g. ``top1``, ``map``; the manifest's
    ``eval.metric``; ``accuracy`` when it names none) and MB, or the fleet table's last heard (``table``); ``~``
    figures and confidence when ``inferred``, and which of ``devices`` (fleet
    :class:`~edge_kit.fleet.inventory.Device`) are simulated, so measured on this machine."""
    if table == "select":
        named = f"accuracy ({metric})" if metric else "accuracy"  # a detector's accuracy is its mAP, never top-1
        text = (f"figures: p90 and {named} measured by each device's own agent (`edgekit bench` names the clock), "
                f"{metric or 'accuracy'} on the eval set shipped with the artifacts; W and mJ from the power source shown "
                "(a sensor, or estimated); MB: the artifact's size, counted from its file by `edgekit compile` (the "
                "manifest's bytes)")
    else:  # the fleet table shows p90, W and last heard (HistoryStore.last_received: status and telemetry only)
        text = ("figures: p90 measured by each device's own agent (`edgekit bench` names the clock), of the current "
                "variant's latest benchmark; W from the power source shown (a sensor, or estimated); last heard: by this "
                "host's clock, when it stored the device's last status or telemetry message")
    if inferred:
        text += ("; ~ inferred by the fleet model from other devices of the profile, [90 % interval]; confidence: the "
                 "share of the fleet model's posterior draws that pick the same variant")
    simulated = [d.name for d in devices if d.simulated]
    if simulated:
        text += f"; simulated devices ({', '.join(simulated)}): measured on this machine, not their profile's hardware"
    return text


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _cell(row: dict[str, Any], key: str, fmt: Any) -> str:
    """Return a figure of an explain row; an inferred one as ``~value [lo-hi]`` (its 90 % interval); ``-`` for none
    (measured by nothing, or nothing to infer it from)."""
    if row.get("source") != "inferred" or row.get(key) is None:
        return fmt(row.get(key))
    lo_hi = row.get(f"{key}_interval")
    return f"~{fmt(row.get(key))}" + (f" [{fmt(lo_hi[0])}-{fmt(lo_hi[1])}]" if lo_hi else "")


@app.command("select")
def select_cmd(
    fleet_file: FleetOpt,
    artifacts: Annotated[Optional[Path], typer.Option(help="The compiled model's folder: its variants are the "
                                                           "candidates (default: the one the last tune used).")] = None,
    devices: DevicesOpt = None,
    history: HistoryOpt = None,
    margin: MarginOpt = DEFAULT_MARGIN,
    explain: Annotated[bool, typer.Option("--explain", help="Print the table behind each choice.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Say which variant each device should run, and why, from the measurements in the history store."""
    from edge_kit.errors import InputError
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.loop.tune import (
        decide,
        decide_fleet,
        last_artifacts,
        note_runtimes,
        runtime_limits,
        unknown_runtimes_note,
    )
    from edge_kit.manifest import read_manifest
    from edge_kit.selection.policy import infeasible

    fleet = load_fleet(fleet_file)
    db = open_fleet_history(fleet_file, history, read_only=True)
    if artifacts is None:
        artifacts = last_artifacts(db)
        if artifacts is None:
            raise InputError(f"{db.where}: no tune has run against this history; pass --artifacts FOLDER")
    manifest = read_manifest(artifacts)
    status = db.latest_status()
    chosen = fleet.select(devices)
    current = {d.name: ((status.get(d.name) or {}).get("current") or {}).get("sha256") for d in chosen}
    refused, unknown = runtime_limits(manifest, chosen, status)  # what each device last said it can run
    decisions = decide(manifest, chosen, db, current, margin, refused)
    messages: list[str] = []
    if any(d.unmeasured for d in decisions.values()):  # infer what a device has not measured from its profile
        decisions, messages = decide_fleet(manifest, chosen, db, current, margin, refused)
    note_runtimes(decisions, refused, unknown)
    if unknown:
        messages.append(unknown_runtimes_note(unknown))
    inferred = any(r.get("source") == "inferred" for d in decisions.values() for r in d.table)
    metric = (manifest.eval or {}).get("metric")  # the accuracy column's figure: top1, map, miou, pck, a user's
    if as_json:
        emit_json({"devices": {k: v.as_dict() for k, v in decisions.items()}, "notes": messages,
                   "figures": figures_text(chosen, inferred, metric=metric), "infeasible": infeasible(decisions)})
    else:
        for item in decision_table(decisions, explain):
            out.print(item)
        if explain:
            out.print(figures_note(chosen, inferred, metric=metric), highlight=False)
        for text in messages:
            out.print(f"[yellow]note[/] {safe(text)}")
        line = infeasible_line(decisions, "gets")
        if line is not None:
            out.print(line, highlight=False)
    if infeasible(decisions):
        raise typer.Exit(INFEASIBLE_EXIT)


def tune_options(artifacts: Path, rounds: int, margin: float, min_runs: int, min_seconds: float, timeout: float,
                 parallel: int, trust_new_hosts: bool, budget: float | None = None, budget_unit: str = "runs") -> Any:
    """Return the :class:`~edge_kit.loop.tune.TuneOptions` the ``tune`` command's options make."""
    from edge_kit.loop.tune import TuneOptions

    return TuneOptions(artifacts, rounds=rounds, margin=margin, bench={"min_runs": min_runs, "min_seconds": min_seconds},
                       timeout=timeout, parallel=parallel, trust_new_hosts=trust_new_hosts, budget=budget,
                       budget_unit=budget_unit)


def rounds_text(report: Any) -> str:
    """Return how many rounds of measure, select and switch a :class:`~edge_kit.loop.tune.TuneReport` ran (what
    ``--rounds`` bounds), and whether a verify decision on the last switches' health benchmarks followed."""
    rounds = sum(1 for r in report.rounds if not r.get("verify"))
    verified = any(r.get("verify") for r in report.rounds)
    return f"{rounds} round(s)" + (" and a verify decision on the switches' health benchmarks" if verified else "")


def switches_text(report: Any) -> str:
    """Return the switches a :class:`~edge_kit.loop.tune.TuneReport` made, in round order, each as ``device (from ->
    to)`` (its round's decision: the variant it ran, the one chosen), then what the table above them is: the decision
    after them (so a device switched here reads ``stays on ...``, ``switch: no``); one whose activation failed is
    marked ``FAILED``; ``nothing`` when none."""
    moves = []
    for r in report.rounds:
        failed = {row.get("device") for row in (r.get("activation") or {}).get("devices", [])
                  if row.get("status") == "failed"}
        for device in r["switched"]:
            d = (r.get("decisions") or {}).get(device) or {}
            moves.append((f"{device} ({d.get('current') or 'none'} -> {d['chosen']})" if d.get("chosen") else device)
                         + (" FAILED" if device in failed else ""))
    if not moves:
        return "nothing"
    return ", ".join(moves) + " (the table: the decision after these switches; its switch column says whether another is due)"


def print_tune(report: Any) -> None:
    """Print a :class:`~edge_kit.loop.tune.TuneReport` for a person: the decisions, failed deploys, silent
    devices, the rounds, the budget spent and the notes (device text escaped); return nothing."""
    for item in decision_table(report.final, explain=False):
        out.print(item)
    if report.deploy.failed:
        out.print(results_table(report.deploy))
    for device, what in report.silent.items():
        out.print(f"[red]{device} did not answer:[/] {safe(', '.join(what))}")
    print_refused(report.refused)
    for device, why in report.activation_failed.items():  # its switch failed: it runs what it ran
        out.print(f"[red]{safe(device)} was not switched:[/] {safe(why)}")
    out.print(f"{rounds_text(report)}; switched: {safe(switches_text(report))}", highlight=False)
    if report.budget is not None:
        b = report.budget
        # not the runs inside a benchmark; device-seconds are planned from each pair's median duration, not timed
        unit = "benchmark runs" if b["unit"] == "runs" else "device-seconds (estimated: median durations)"
        out.print(f"budget: {b['spent']:g} of {b['budget']:g} {unit} spent on {b['measured']} measurement(s); "
                  f"{b['health']} health benchmark(s) of switched-to variants, counted apart", soft_wrap=True)
        for text in b["messages"]:
            out.print(f"[yellow]note[/] {safe(text)}")
    from edge_kit.loop.tune import pending_note

    pending = [d for r in report.rounds for d in r.get("pending", [])]
    if pending and report.budget is None:  # with a budget its notes said so
        out.print(f"[yellow]note[/] {safe(pending_note(pending))}")
    flagged = {k: d.flagged for k, d in report.final.items() if getattr(d, "flagged", None)}
    for name, why in flagged.items():
        out.print(f"[red]flagged[/] {name}: {safe(why)}")
    line = infeasible_line(report.final)
    if line is not None:
        out.print(line, highlight=False)


@app.command("tune")
def tune_cmd(
    fleet_file: FleetOpt,
    artifacts: CandidatesOpt,
    devices: DevicesOpt = None,
    history: HistoryOpt = None,
    rounds: Annotated[int, typer.Option(min=1, max=10, help="Rounds of measure, select and switch at most; stops "
                                                            "earlier when a round switches nothing.")] = 2,
    margin: MarginOpt = DEFAULT_MARGIN,
    min_runs: Annotated[int, typer.Option(min=BENCH_RUNS_MIN, max=BENCH_RUNS_MAX, help="Timed runs per measurement at least.")] = 200,
    min_seconds: Annotated[float, typer.Option(**bounded("Timed seconds per measurement at least.", BENCH_SECONDS_MIN, BENCH_SECONDS_MAX))] = 2.0,
    timeout: Annotated[float, typer.Option(**bounded("Seconds per round for all measurements to arrive.", 1, WAIT_MAX_S))] = 300.0,
    parallel: ParallelOpt = 8,
    trust_new_hosts: TrustNewHostsOpt = False,
    budget: Annotated[Optional[float], typer.Option(**bounded("Measure only what the fleet model "
                                                              "plans, within this many benchmark runs "
                                                              "(or device-seconds, --budget-unit); "
                                                              "default: every candidate on every device.", 0))] = None,
    budget_unit: Annotated[str, typer.Option(help="runs | seconds")] = "runs",
    as_json: JsonOpt = False,
) -> None:
    """Measure the candidates on the devices, select, activate with a health benchmark, verify; repeat until stable.

    Every candidate is measured on every device, or with --budget what the fleet model plans."""
    from edge_kit.errors import InputError
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.loop.tune import tune
    from edge_kit.selection.policy import infeasible

    if budget_unit not in ("runs", "seconds"):
        raise InputError(f"--budget-unit {budget_unit!r}: use runs or seconds")
    fleet = load_fleet(fleet_file)
    targets = fleet.select(devices)
    opts = tune_options(artifacts, rounds, margin, min_runs, min_seconds, timeout, parallel, trust_new_hosts, budget,
                        budget_unit)
    db = open_fleet_history(fleet_file, history)
    with spinner("tuning", as_json) as status:
        report = tune(fleet, targets, opts, db, progress=status.update)
    if as_json:  # the decisions' figures, with where they came from, as select --json says it
        inferred = any(r.get("source") == "inferred" for d in report.final.values() for r in d.table)
        emit_json({**report.as_dict(), "figures": figures_text(targets, inferred, metric=report.metric)})
    else:
        print_tune(report)
    if report.deploy.failed or report.silent or report.refused or report.activation_failed:
        raise typer.Exit(4)  # a failure's code first: 7 never hides one
    if infeasible(report.final):  # completed, with a device outside its constraints: a code of its own
        raise typer.Exit(INFEASIBLE_EXIT)


@app.command("demo")
def demo_cmd(
    devices: Annotated[int, typer.Option("--devices", min=1, max=32, help="How many virtual devices.")] = 3,
    profiles: ProfilesOpt = "rpi4,rpi5,coral-usb",
    workdir: Annotated[Optional[Path], typer.Option("--dir", help="Work folder (kept); default: a temporary one, removed.")] = None,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the temporary folder (artifacts, history, logs).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The whole loop on a simulated fleet: example model, compile, broker, devices, deploy, measure, select."""
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

    from edge_kit.loop.demo import STEPS, run_demo

    names = profile_names(profiles)
    with progress_bar(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), as_json=as_json) as bar:
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
        emit_json(result.as_dict())
        return
    print_demo(result)


def print_demo(result: Any) -> None:
    """Print a :class:`~edge_kit.loop.demo.DemoResult`: one row per device, then where each column's figures
    came from (the clocks and runtimes its records name, the eval set, the power method, the application)."""
    from edge_kit.loop.demo import APP_REQUESTS
    from edge_kit.telemetry.report import latency_clocks

    t = Table(Column("device", no_wrap=True), Column("profile", no_wrap=True), Column("variant", no_wrap=True), "p90 ms", "top-1",
              "mJ/inference", "feasible", "live p50/p99 ms", "app top-1", box=box.SIMPLE_HEAD,
              pad_edge=False, title="each device on its best variant (measured by the real agent on this machine, "
                                    "simulated devices)", title_justify="left")
    for r in result.rows:
        t.add_row(safe(r["device"]), safe(r["profile"]), safe(r["variant"] or "-"), _num(r["p90_ms"]),
                  "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%", _num(r["energy_mj"]),
                  "yes" if r["feasible"] else ("[red]no[/]: " + safe(", ".join(r["violates"])) if r["feasible"] is False else "-"),
                  *_live_cells(r.get("live")))
    out.print(t)
    rows = [r for r in result.rows if r.get("p90_ms") is not None]
    clocks = latency_clocks(rows)
    samples = sorted({str(r["accuracy_samples"]) for r in rows if r.get("accuracy_samples")})
    methods = sorted({r["power_method"].split(",")[0] for r in result.rows if r["power_method"]})
    served = sorted({clip(str(r["live"].get("clock") or "clock not named"), 120) for r in result.rows  # each message's
                     if isinstance(r.get("live"), dict) and r["live"].get("p50_ms") is not None})
    out.print(safe(f"p90: {'; '.join(clocks) or 'not measured'}, on this machine; top-1: the agent, on the eval set "
                   f"shipped with the artifacts ({'/'.join(samples) or '?'} samples); energy: {'; '.join(methods) or 'not measured'}; "
                   "live: the agent's serving API answering a demo application's requests, its service time by "
                   f"{'; '.join(served) or 'no clock (none stored)'}, from the signed live message it published (stored "
                   "in the history, labelled live); "
                   f"app top-1: that application's own answers to {APP_REQUESTS} eval images, scored on this host "
                   "(not stored)"))
    for r in result.rows:
        if (r.get("live") or {}).get("not_stored"):
            out.print("[red]" + safe(f"{r['device']}: live figures not stored: {r['live']['not_stored']}") + "[/]")
    on_cpu = [f"{r['device']} ran {r['variant']} on {r['delegate']}" for r in rows
              if _on_cpu(r.get("delegate")) and _accelerator(r["profile"]) not in (None, "none")]
    if on_cpu:  # a Coral or Jetson profile simulated here has no Edge TPU or GPU to run on
        out.print(safe(f"no accelerator on this machine: {', '.join(on_cpu)} (the CPU)"))
    if result.report.deploy.failed:
        out.print(results_table(result.report.deploy))
    switched = result.report.switched
    out.print(f"manifest: {result.report.deploy.signature}; tune: {rounds_text(result.report)}; "
              f"switched {', '.join(switched) or 'nothing'}", highlight=False)
    if result.kept:
        out.print(f"files kept in {result.workdir}; the devices are stopped, their history stays beside the fleet file:",
                  soft_wrap=True)
        out.print(f"  edgekit report --fleet {result.fleet_file} --out report.html", highlight=False, soft_wrap=True)


def _on_cpu(delegate: str | None) -> bool:
    """Return whether a bench record's ``delegate`` ran on the CPU: a LiteRT target needing no accelerator
    (the target registry says which), or ONNX Runtime's CPU provider."""
    from device_agents.targets import TARGETS

    target = TARGETS.get(delegate or "")
    return delegate == "CPUExecutionProvider" or (target is not None and target.accelerator == "none")


def _accelerator(profile: str) -> str | None:
    """Return a profile's accelerator (``none``, ``edgetpu``, ``gpu``), or None for a profile not found."""
    from edge_kit.errors import ConfigError
    from edge_kit.profiles import load_profile

    try:
        return load_profile(profile).hardware.accelerator
    except ConfigError:
        return None


def _live_cells(live: dict[str, Any] | None) -> tuple[str, str]:
    """Return the demo table's live cells: service-time p50/p99 (from the agent's stored live message; ``not
    stored`` when none arrived, the reason printed under the table), and the application's own top-1."""
    if not live:
        return "-", "-"
    if "error" in live:
        return "[red]" + safe(str(live["error"])[:40]) + "[/]", "-"
    served = "[red]not stored[/]" if live.get("not_stored") else f"{_num(live.get('p50_ms'))}/{_num(live.get('p99_ms'))}"
    return served, f"{100 * live['top1']:.1f}%"


def _state_cell(state: dict[str, Any]) -> str:
    """Return the table's state cell for :func:`~edge_kit.telemetry.report.device_state`'s answer, saying where it came from."""
    if state["state"] == "revoked":
        return f"[red]revoked[/] ({state['revoked_on']})"
    if state["source"] is None:
        return "never seen"
    if state["state"] == "stale":
        return f"stale (history: {safe(clip(str(state['said']), 32))}, silent > {state['stale_after_s']:.0f} s)"
    return f"{safe(clip(str(state['state']), 32))} ({state['source']})"


def _fleet_states(fleet: Any, status: dict[str, dict[str, Any]], received: dict[str, float],
                  retained: dict[str, dict[str, Any]] | None = None,
                  intervals: dict[str, float] | None = None,
                  revoked: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Return :func:`~edge_kit.telemetry.report.device_state` for every device of ``fleet``: ``revoked`` for a device
    in ``revoked`` (the fleet's revoked devices, :meth:`~edge_kit.fleet.keys.FleetKeys.revoked_devices`; None: read
    here, none when the list cannot be read), else from ``retained`` (the broker's statuses, verified) where it has
    one, else from the history's newest ``status``, when this host last ``received`` from the device and the
    telemetry interval its agent says (the store's latest_status, last_received and telemetry_intervals, read once
    by the caller)."""
    import time as _time

    from edge_kit.errors import ConfigError
    from edge_kit.telemetry.report import device_state

    if revoked is None:
        try:
            revoked = fleet.key_store().revoked_devices()
        except ConfigError:  # the live view goes on; `fleet status` reads the list itself and says what is wrong
            revoked = {}
    now = _time.time()
    return {d.name: device_state(status.get(d.name), received.get(d.name), (retained or {}).get(d.name), now,
                                 (intervals or {}).get(d.name), revoked.get(d.name))
            for d in fleet.devices}


def _current_models(store: Any, fleet: Any, status: dict[str, dict[str, Any]], states: dict[str, dict[str, Any]],
                    retained: dict[str, dict[str, Any]] | None = None,
                    reported: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Return the model each device of ``fleet`` runs, or ran last as far as this host knows: ``variant``, ``sha256``,
    ``last_known`` (the device is not online now: what it said before), ``at`` (when this host received the status
    that said it; None for a message retained at the broker) and ``source``: ``history``, ``broker`` (its status
    retained at the broker) or ``reported`` (the reported state a pull rollout's agent left retained at the broker).
    An online device's is its newest status's (the broker's retained ``online`` where given, fresher). An offline,
    stale or revoked one's is its newest status in the history naming a model (its last will may name none), unless
    its verified retained ``reported`` state (``reported``: :func:`~edge_kit.fleet.commands.broker_statuses`) names
    one and is newer by the device's own clock (the only order the two share: a retained message carries no receive
    time), else its retained status's; a device nothing named a model of is left out. ``status``: the history's
    newest statuses; ``states``: :func:`_fleet_states`. One history query for all the offline devices (two at most).
    Raises HistoryError."""
    found: dict[str, dict[str, Any]] = {}
    offline = []
    for dev in fleet.devices:
        st = status.get(dev.name) or {}
        kept = (retained or {}).get(dev.name) or {}
        source = "history"
        if kept.get("state") == "online":  # the agent's word on connecting (and on each switch since): fresher
            st, source = kept, "broker"
        cur = st.get("current") if isinstance(st.get("current"), dict) else {}  # a device's own word: any shape
        if states[dev.name]["state"] != "online":
            offline.append(dev.name)
        elif cur:
            found[dev.name] = {"variant": cur.get("variant"), "sha256": cur.get("sha256"), "last_known": False,
                               "at": None, "source": source}
    known = store.last_known_models(offline) if offline else {}
    for name in offline:
        history = known.get(name)
        report = _named_model(((reported or {}).get(name) or {}).get("current"))
        kept = (retained or {}).get(name) or {}
        said = _named_model(kept.get("current"))
        if report is not None and (history is None or _newer(reported[name].get("ts"), history.get("said_at"))):
            found[name] = {**report, "last_known": True, "at": None, "source": "reported"}
        elif history is not None:
            found[name] = {"variant": history["variant"], "sha256": history["sha256"], "last_known": True,
                           "at": history["at"], "source": "history"}
        elif said is not None:
            found[name] = {**said, "last_known": True, "at": None, "source": "broker"}
    return found


def _named_model(current: Any) -> dict[str, Any] | None:
    """Return ``{variant, sha256}`` of a device's ``current`` (its own word: any shape) when it names a variant, else
    None. Raises nothing."""
    if isinstance(current, dict) and isinstance(current.get("variant"), str) and current["variant"]:
        return {"variant": current["variant"], "sha256": current.get("sha256")}
    return None


def _newer(ts: Any, than: Any) -> bool:
    """Return whether the device clock stamp ``ts`` is later than ``than`` (a number each, else False). Raises
    nothing."""
    from edgekit_protocol.messages import in_range

    return in_range(ts) and in_range(than) and ts > than


def _current_cell(model: dict[str, Any] | None) -> str:
    """Return the table's current-model cell for :func:`_current_models`' answer of one device: its variant, marked
    ``last known`` with where it came from (and when this host received it, for the history's) for a device not
    online; ``-`` when none is known. Raises nothing."""
    from edge_kit.telemetry.report import local_time

    if not model:
        return "-"
    variant = safe(clip(model.get("variant") or "-", 128))
    if not model["last_known"]:
        return variant
    return f"{variant} (last known: {LAST_KNOWN_FROM[model['source']]}" + (
        f", received {local_time(model['at'])})" if model.get("at") is not None else ")")


# where a device's last known model came from (:func:`_current_models`' ``source``), as the fleet table says it
LAST_KNOWN_FROM = {"history": "history", "broker": "retained status", "reported": "retained reported"}
LAST_KNOWN_RULE = ("current, for a device not online (last known): the history's newest status naming a model, or "
                   "the reported state its agent left retained on the broker (pull rollouts; verified as the "
                   "device's, a forged one refused) when newer by the device's own clock, else its retained status")


def _fleet_table(store: Any, fleet: Any, retained: dict[str, dict[str, Any]] | None = None,
                 reported: dict[str, dict[str, Any]] | None = None) -> Table:
    """Per device: state (from the broker's ``retained`` statuses where given, else the history; see
    :func:`_fleet_states`), current variant (the last known one, saying so and where it came from, for a device not
    online: :func:`_current_models`, which takes the broker's retained ``reported`` states too), latest benchmark of
    it, last message. Raises HistoryError."""
    import time as _time

    status, bench, received = store.latest_status(), store.latest_bench(), store.last_received()
    states = _fleet_states(fleet, status, received, retained, store.telemetry_intervals())
    models = _current_models(store, fleet, status, states, retained, reported)
    t = Table("device", "profile", "state", "current", "p90 ms", "W (source)", "last heard", box=box.SIMPLE_HEAD, pad_edge=False)
    for dev in fleet.devices:
        model = models.get(dev.name)
        rec = bench.get((dev.name, model.get("sha256"))) if model else None
        heard = received.get(dev.name)  # this host's clock: a device's ts may say 1970 (no RTC, before NTP)
        power = (rec or {}).get("power") or {}
        watts = "-" if power.get("avg_w") is None else f"{power['avg_w']:.2f} ({safe(power_source(power))})"
        t.add_row(safe(dev.name), safe(dev.profile), _state_cell(states[dev.name]), _current_cell(model),
                  _num(rec["latency_ms"]["p90"]) if rec else "-", watts,
                  f"{_time.time() - heard:.0f} s ago" if heard else "-")
    return t


def _fleet_view(store: Any, fleet: Any, retained: dict[str, dict[str, Any]] | None = None,
                reported: dict[str, dict[str, Any]] | None = None) -> Any:
    """Return the monitor's live view (and `fleet status`'s table): :func:`_fleet_table` and the
    :func:`figures_note` under it."""
    from rich.console import Group
    from rich.text import Text

    return Group(_fleet_table(store, fleet, retained, reported),
                 Text.from_markup(figures_note(fleet.devices, table="fleet")))


MAX_REFUSED_SHOWN = 5  # refused-message (and sequence gap) alerts printed per refresh of the live table; the rest summed
# in one line each: the alerts a device can raise one per message it sends, and what that line says of the rest
CAPPED_ALERTS = {"refused": "refused messages (counted in the --json summary's invalid; kept in the history's invalid "
                            "table)",
                 "gap": "sequence gaps (counted in the --json summary's gaps; listed by `edgekit history gaps`)"}


def alert_lines(alerts: list[Any], new: int) -> list[str]:
    """Return the lines (rich markup) that show the ``new`` newest of ``alerts`` (the monitor's
    :class:`~edge_kit.telemetry.monitor.Alert` objects, oldest first): every alert about a device's state, but at
    most :data:`MAX_REFUSED_SHOWN` refused messages and as many sequence gaps, the rest of each counted in one line, so
    a device flooding the broker with junk (or numbering its records with gaps) cannot scroll an offline or constraint
    alert off the operator's screen."""
    fresh = alerts[-new:] if new > 0 else []
    lines = [f"[red]alert[/] {new - len(fresh):,} older alerts not shown (too many)"] if new > len(fresh) else []
    capped = {kind: [a for a in fresh if a.kind == kind] for kind in CAPPED_ALERTS}
    first = {id(a) for group in capped.values() for a in group[:MAX_REFUSED_SHOWN]}
    lines += [f"[red]alert[/] {safe(a.text)}" for a in fresh if a.kind not in CAPPED_ALERTS or id(a) in first]
    for kind, group in capped.items():
        if len(group) > MAX_REFUSED_SHOWN:
            lines.append(f"[red]alert[/] {len(group) - MAX_REFUSED_SHOWN:,} more {CAPPED_ALERTS[kind]}")
    return lines


def carried_lines(rows: list[dict[str, Any]], total: int) -> list[str]:
    """Return the lines (rich markup) that show the history's open alerts a monitor found when it started (``rows``:
    :attr:`~edge_kit.telemetry.monitor.Monitor.carried_over`, the newest; ``total``: how many were open), each marked
    as carried over, with when it was raised and whether it still holds (one closed at start: nobody held it)."""
    from edge_kit.telemetry.report import local_time

    lines = [f"[red]alert[/] carried over (raised {local_time(r['raised_at'])}, "
             + ("still holds" if r.get("still_open", True) else "closed now: no worker holds it")
             + f"): {safe(r['detail'])}" for r in rows]
    if total > len(rows):
        lines.append(f"[red]alert[/] {total - len(rows):,} more open alerts carried over: edgekit history alerts --open")
    return lines


@app.command("monitor")
def monitor_cmd(
    fleet_file: FleetOpt,
    history: HistoryOpt = None,
    metrics_port: Annotated[Optional[int], typer.Option(min=0, max=65535, help="Serve Prometheus metrics on this port "
                                                                        "(0: a free one, which is printed).")] = None,
    metrics_addr: Annotated[str, typer.Option(help="Address for the metrics endpoint.")] = "127.0.0.1",
    share: Annotated[Optional[str], typer.Option(help="Join this MQTT 5 shared-subscription group (several workers; "
                                                      "give --workers too).")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="With --share: how many monitor workers share the group; "
                                                               "each holds 1/N of every device's ingest budget.")] = None,
    silence_s: Annotated[float, typer.Option(**bounded("Alert when a device is silent this long (or 3 of its own telemetry intervals, when longer).", 1))] = 180.0,
    min_free_mb: Annotated[float, typer.Option(**bounded("Alert when a device reports less free disk space "
                                                         "(its agent refuses writes below its own store.min_free_mb).", 0))] = 32.0,
    duration: Annotated[Optional[float], typer.Option(**bounded("Stop after this many seconds (default: until Ctrl-C).", 0))] = None,
    budget_rate: Annotated[float, typer.Option(**bounded("Ingest budget: records a second each device may have stored; "
                                                         "beyond it (and its burst) they are refused unchecked, counted "
                                                         "and alerted.", 0.001))] = DEFAULT_RATE,
    budget_burst: Annotated[float, typer.Option(**bounded("Ingest budget: records each device may send at once (at least "
                                                          "its agent's spool_max_records, which it replays after an outage).",
                                                          1))] = DEFAULT_BURST,
    gap_grace_s: Annotated[float, typer.Option(**bounded("With --share: how long a record may take to reach the history "
                                                         "through another worker before the seq it fills counts as lost "
                                                         "(a sequence gap).", 0, 86400))] = GAP_GRACE_S,
    client_id: Annotated[Optional[str], typer.Option(help="MQTT client id of this worker's persistent session (default: "
                                                          "from the fleet, the store and, with --share, this host); "
                                                          "give each worker on one host its own.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Store every message of the fleet (checked, deduplicated) and show a live table; optional /metrics.

    The session is persistent under a fixed client id: while the monitor is stopped the broker queues
    what the devices publish (up to its own limits: max_queued_messages, max_queued_bytes), and the
    next run stores it, so a restart loses nothing; what is still missing shows up as a sequence gap.
    """
    import sys
    import time as _time

    from rich.live import Live

    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.telemetry.metrics import FleetMetrics, metrics_url, metrics_where
    from edge_kit.telemetry.monitor import (
        MAX_BREAKING_VARIANTS,
        MAX_GAP_ROWS,
        MAX_RESTARTS,
        MAX_SEQ_LEAD,
        Monitor,
    )

    fleet = load_fleet(fleet_file)
    db = open_fleet_history(fleet_file, history)
    metrics = FleetMetrics()
    if metrics_port is not None:  # what the history holds, before what arrives
        metrics.seed(db, [d.name for d in fleet.devices])
    if client_id is None:
        import hashlib
        import socket

        ident = str(db.path.resolve()) if hasattr(db, "path") else db.where  # a file, or the database's URL
        where = f"{ident}|{share}|{socket.gethostname()}" if share else ident
        digest = hashlib.sha256(where.encode(errors="surrogateescape")).hexdigest()  # a path's bytes, UTF-8 or not
        client_id = f"edgekit-monitor-{fleet.fleet}-{digest[:10]}"
    mon = Monitor(fleet, db, share=share, silence_s=silence_s, on_message=metrics.observe, client_id=client_id,
                  persistent=True, min_free_mb=min_free_mb, budget_rate=budget_rate, budget_burst=budget_burst,
                  workers=workers, gap_grace_s=gap_grace_s)
    metrics.watch(mon)
    server = metrics.serve(metrics_port, metrics_addr) if metrics_port is not None else None
    served = None if server is None else metrics_url(metrics_addr, server.server_port)
    mon.start()  # /metrics is served from before: the alert gauges appear once it has read the history
    if served is not None:  # said only once a scrape gets every series (the alert gauges too), never before
        try:
            metrics.wait_served(served)
        except BaseException:
            mon.stop()
            server.shutdown()
            raise
    if served is not None:  # with --json, stdout holds the summary alone: a script reads the port here as it runs
        if as_json:
            sys.stderr.write(f"edgekit: Prometheus metrics at {served}\n")
            sys.stderr.flush()
        else:
            out.print(f"Prometheus metrics at {safe(metrics_where(metrics_addr, server.server_port))}", highlight=False,
                      soft_wrap=True)
    if not as_json:  # what an earlier run raised and may never have shown (it died first): shown, marked, once
        for line in carried_lines(mon.carried_over, mon.carried_over_total):
            out.print(line, highlight=False)
    end = _time.monotonic() + duration if duration is not None else None
    shown = noted = 0
    stopped = _stop_on_sigterm()
    try:
        with Live(_fleet_view(db, fleet), console=out, refresh_per_second=1, transient=False) if not as_json else nullcontext() as live:
            while (end is None or _time.monotonic() < end) and mon.failed is None:
                _time.sleep(1.0)  # the table queries the whole history: once a second is plenty
                if mon.failed is not None:
                    break
                if live is not None:
                    live.update(_fleet_view(db, fleet))
                    new, shown = mon.alerts_raised - shown, mon.alerts_raised
                    for line in alert_lines(list(mon.alerts), new):
                        live.console.print(line)
                    fresh, noted = mon.notes_raised - noted, mon.notes_raised
                    for note in list(mon.notes)[-fresh:] if fresh > 0 else []:
                        live.console.print(f"[yellow]note[/] {safe(note)}")
    except KeyboardInterrupt:
        pass
    finally:
        stopped()
        mon.stop()
        if server is not None:
            server.shutdown()
    if mon.failed is not None:  # the history went away: one line, exit 6 (what it stored before is kept, whole)
        raise mon.failed
    s = mon.stats
    if as_json:
        emit_json({"received": s.received, "stored": s.stored, "duplicates": s.duplicates, "invalid": s.invalid,
                    "gaps": s.gaps, "dropped": s.dropped, "over_budget": s.over_budget, "left_by_revoked": s.left_by_revoked,
                    "replayed_by_revoked": s.replayed_by_revoked, "revoked": s.revoked,
                    "restarts": s.restarts, "implausible_seqs": s.implausible_seqs,
                    "retained_by_revoked": sorted(mon.retained_leftovers),
                    "breaking_not_alerted": s.breaking_not_alerted, "gaps_not_recorded": s.gaps_not_recorded,
                    "late": s.late, "late_not_taken": s.late_not_taken, "restarts_not_recorded": s.restarts_not_recorded,
                    "over_budget_by_device": dict(sorted(mon.over_budget.items())),
                    "alerts": [vars(a) for a in mon.alerts], "alerts_raised": mon.alerts_raised,
                    "notes": list(mon.notes),
                    "carried_over": mon.carried_over, "carried_over_total": mon.carried_over_total,
                   "store": db.where, "metrics": served})
    else:
        if not out.is_terminal:  # rich ends its last frame with a newline on a terminal only: a log got "...hardwarestored"
            out.line()
        late = mon.notes_raised - noted  # what the last batches, stored as it stopped, could not judge
        for note in list(mon.notes)[-late:] if late > 0 else []:
            out.print(f"[yellow]note[/] {safe(note)}", highlight=False)
        # dropped unrefused and not alerted one by one (a revoked key's use included), and what the sequence check
        # found besides gaps: said here when there were any
        quiet = "".join(f"{n:,} {what}, " for n, what in (
            (s.left_by_revoked, "left by revoked devices (signed before their revocation: dropped, not stored)"),
            (s.replayed_by_revoked, "replays of what revoked devices left (the same message sent again: dropped)"),
            (s.revoked, "from revoked devices (refused unchecked, kept as refused, not alerted)"),
            (s.breaking_not_alerted, "benchmarks breaking constraints not alerted (past a device's "
                                     f"{MAX_BREAKING_VARIANTS} variants)"),
            (s.gaps_not_recorded, f"sequence gaps not recorded (past a device's {MAX_GAP_ROWS} in this run)"),
            (s.late, "late records taken out of their recorded gap"),
            (s.late_not_taken, f"late records left in their gap (splitting it past a device's {MAX_GAP_ROWS} rows)"),
            (s.restarts, "restarts (a device numbering again in a new epoch)"),
            (s.restarts_not_recorded, f"restarts not recorded (past a device's {MAX_RESTARTS} in this run)"),
            (s.implausible_seqs, f"seqs implausibly far ahead (past {MAX_SEQ_LEAD:,}: not taken)")) if n)
        out.print(safe(f"stored {s.stored:,} of {s.received:,} messages received ({s.duplicates:,} duplicates, "
                       f"{s.invalid:,} refused, {s.over_budget:,} over budget, {s.gaps:,} sequence gaps, {quiet}"
                       f"{mon.alerts_raised:,} alerts) in {db.where}"),
                  highlight=False, soft_wrap=True)
        for device in sorted(mon.retained_leftovers)[:10]:  # the broker keeps it until it is cleared: say how
            out.print(safe(f"{device}: revoked, and the broker still holds what it left retained (its last will, sent "
                           f"as the broker restarted): `edgekit fleet revoke {device} --fleet {fleet_file}` clears it"),
                      highlight=False, soft_wrap=True)


def _stop_on_sigterm() -> Callable[[], None]:
    """Make SIGTERM (systemd's stop, ``kill``) end the monitor as Ctrl-C does, with its summary, where this runs in
    the main thread (the only one a signal handler can be set from). Returns what puts the previous handler back."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


fleet_app = typer.Typer(no_args_is_help=True, help="The fleet: its broker's wall, revoking a device, and what the history store knows.")
app.add_typer(fleet_app, name="fleet")


@fleet_app.command("init")
def fleet_init_cmd(
    fleet_file: FleetOpt,
    broker_host: Annotated[list[str], typer.Option("--broker-host", help="Name or address devices reach the broker "
                                                                         "at (repeat; the first is the certificate's name).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the broker's files (created; never overwritten).")] = Path("broker"),
    port: Annotated[int, typer.Option(min=1, max=65535, help="The broker's TLS port.")] = 8883,
    listen: Annotated[Optional[str], typer.Option(help="Address the broker listens on (default: every interface).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a real fleet's broker wall, and the fleet-file broker settings that use it (fleet-broker.yaml).

    The wall: per-device passwords, the ACL, a CA and server certificate, a hardened mosquitto.conf."""
    import yaml

    from edge_kit.errors import ConfigError
    from edge_kit.fleet.broker_setup import (
        OPERATOR_USER,
        broker_entry,
        write_fleet_wall,
    )
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.fleet.keys import readmit_hint

    fleet = load_fleet(fleet_file)
    names = [d.name for d in fleet.devices]
    if OPERATOR_USER in names:
        raise ConfigError(f"{fleet_file}: a device is named '{OPERATOR_USER}', the broker user that commands the fleet; rename it")
    # a revoked device gets no broker user: `deploy --new-key --devices NAME` adds it back, as to an older wall
    revoked = sorted(set(fleet.key_store().revoked_devices()) & set(names))
    try:
        wall = write_fleet_wall(out_dir, fleet.fleet, names, broker_host, port, listen, set(revoked))
    except FileExistsError as exc:
        raise ConfigError(f"{exc}: not empty (a broker wall devices may use is never overwritten); choose another --out") from None
    host = broker_host[0]
    settings = {"broker": broker_entry(host, port, wall, OPERATOR_USER),
                "agent_broker": {name: broker_entry(host, port, wall, name) for name in names}}
    snippet = out_dir.resolve() / "fleet-broker.yaml"
    snippet.write_text("# put 'broker' in the fleet file, and each device's 'agent_broker' under that device\n"
                       + yaml.safe_dump(settings, sort_keys=False))
    files = {"mosquitto.conf": wall.tls.ca.parent.parent / "mosquitto.conf", "passwd": wall.tls.ca.parent.parent / "passwd",
             "acl": wall.tls.ca.parent.parent / "acl", "ca": wall.tls.ca, "fleet settings": snippet}
    if as_json:
        emit_json({"files": {k: str(v) for k, v in files.items()}, "users": sorted(wall.users), "revoked": revoked,
                   **settings})
        return
    for label, path in files.items():  # a line each, never wrapped: a path, and a command to copy
        out.print(f"{label:>15}  {path}", soft_wrap=True)
    for name in revoked:
        out.print(safe(f"{name}: revoked, so given no broker user; {readmit_hint(name)} (with --broker-dir "
                       f"{out_dir.resolve()}, which adds its user)"), soft_wrap=True, highlight=False)
    out.print(f"{len(names) - len(revoked)} device users + '{OPERATOR_USER}'; passwords in {out_dir.resolve() / 'secrets'} "
              f"(mode 600). Run the broker with: mosquitto -c {files['mosquitto.conf']}", soft_wrap=True)


@fleet_app.command("status")
def fleet_status_cmd(fleet_file: FleetOpt, history: HistoryOpt = None, as_json: JsonOpt = False,
                     history_only: Annotated[bool, typer.Option(
                         "--history-only",
                         help="Do not ask the broker for each agent's retained status (its last word, or its last "
                              "will); take the states from the history.")] = False,
                     ) -> None:
    """Per device: state (and where it came from), current variant and its latest benchmark.

    The state is the status each agent left retained on the broker (verified as the device's), else the
    history's newest, shown stale when the device has been silent for more than a few telemetry intervals.
    A device not online shows its last known model, saying where it came from: the history, or the reported
    state its agent left retained on the broker (pull rollouts; verified) when that is newer.
    """
    from edge_kit.fleet.commands import broker_statuses
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.telemetry.report import (
        FLEET_KIND,
        STALE_INTERVALS,
        TELEMETRY_INTERVAL_S,
        flagged_devices,
    )

    fleet = load_fleet(fleet_file)
    revoked = fleet.key_store().revoked_devices()  # a damaged revoked list is one line naming it
    db = open_fleet_history(fleet_file, history, read_only=True)
    retained, reported, said = ((None, {}, "broker not asked (--history-only)") if history_only
                                else broker_statuses(fleet))
    history_rule = (f"the history's newest status, 'stale' when the device has been silent for more than "
                    f"{STALE_INTERVALS} telemetry intervals (each device's own, as its newest telemetry says; "
                    f"{TELEMETRY_INTERVAL_S:.0f} s, so {STALE_INTERVALS * TELEMETRY_INTERVAL_S:.0f} s, for an agent "
                    "that does not say)")
    # every state from the history when the broker was not asked or reached: say that first, not as an "otherwise"
    where = f"state: {history_rule}; {said}" if retained is None else f"state: {said}; a device without one: {history_rule}"
    retained = retained or {}
    flagged = flagged_devices(db.latest_decisions((FLEET_KIND,)))
    if as_json:
        status = db.latest_status()
        telemetry = db.latest_telemetry()
        states = _fleet_states(fleet, status, db.last_received(), retained, db.telemetry_intervals(telemetry), revoked)
        emit_json({"state": states,
                   "state_source": where, "current_source": LAST_KNOWN_RULE,
                   "current": _current_models(db, fleet, status, states, retained, reported),
                   "retained": retained, "reported": reported, "status": status, "telemetry": telemetry, "live": db.latest_live(),
                   "shadow": db.latest_shadow(),
                   "bench": {f"{d}/{s}": r for (d, s), r in db.latest_bench().items()}, "flagged": flagged,
                   "simulated": [d.name for d in fleet.devices if d.simulated], "figures": figures_text(fleet.devices, table="fleet")})
        return
    out.print(_fleet_view(db, fleet, retained, reported))
    out.print(safe(where))
    out.print(LAST_KNOWN_RULE, highlight=False)
    if flagged:
        t = Table("device", "differs from its profile (measured individually)", box=box.SIMPLE_HEAD, pad_edge=False,
                  title="devices that differ", title_justify="left")
        for name, why in flagged.items():
            t.add_row(safe(name), safe(why))
        out.print(t)


@fleet_app.command("revoke")
def fleet_revoke_cmd(
    device: Annotated[str, typer.Argument(help="The device whose key to revoke (compromised, stolen or lost).",
                                          callback=device_name)],
    fleet_file: FleetOpt,
    reason: Annotated[str, typer.Option("--reason", help="Why, kept in keys/revoked.json.")] = "",
    broker_dir: Annotated[Optional[Path], typer.Option(
        "--broker-dir", help="The broker wall's folder (`edgekit fleet init --out`): its user is removed from passwd "
                             "there too. A simulated fleet's broker is found (and reloaded) by itself.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a device's key: every receiver refuses its messages from now on, no deploy registers that key again.

    The key moves from keys/devices.json to keys/revoked.json; what the broker keeps retained for the device is
    cleared. The way back: `edgekit deploy --new-key --devices DEVICE`."""
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.fleet.keys import revoked_on
    from edge_kit.loop.revoke import revoke_device

    done = revoke_device(load_fleet(fleet_file), device, reason, broker_dir)
    if as_json:
        emit_json(done.as_dict())
        raise typer.Exit(4 if done.partial else 0)
    if done.newly:
        out.print(f"{safe(device)}: key {done.entry['key_id']} revoked; receivers refuse its messages from now on "
                  f"(the way back: edgekit deploy --new-key --devices {safe(device)})", highlight=False, soft_wrap=True)
    else:
        out.print(f"{safe(device)}: already revoked on {revoked_on(done.entry)} (key {done.entry['key_id']}); nothing "
                  "changed in the registry", highlight=False, soft_wrap=True)
    for line, failed in ((done.broker, done.broker_failed), (done.retained, done.retained_failed)):
        # a line each, never wrapped: it names a file (a long path) and a command to run
        (err if failed else out).print(f"{safe(device)}: {safe(line)}", highlight=False, soft_wrap=True)
    if done.partial:  # the key is revoked; a step at the broker is left, which the line above says
        raise typer.Exit(4)


@app.command("report")
def report_cmd(
    out_file: Annotated[Path, typer.Option("--out", help="The HTML file to write.")] = Path("report.html"),
    fleet_file: Annotated[Optional[Path], typer.Option("--fleet", "-f", help="fleet.yaml (its history store is used).")] = None,
    history: HistoryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write one self-contained HTML report: per profile, latency vs accuracy and energy; the fleet table."""
    from edge_kit.fsutil import writable_folder
    from edge_kit.telemetry.report import build_report

    profiles = None
    if fleet_file is not None:  # each device's profile is the fleet file's, not what its records claim
        from edge_kit.fleet.inventory import load_fleet

        profiles = {d.name: d.profile for d in load_fleet(fleet_file).devices}
    writable_folder(out_file.parent, file=out_file)
    with open_fleet_history(fleet_file, history, must_exist=True) as db:
        info = build_report(db, out_file, profiles=profiles)
    if as_json:
        emit_json(info)
    else:
        held = [f"{info['rollouts']:,} rollout(s)" if info["rollouts"] else "",
                f"{info['alerts_holding']:,} alert(s) holding" if info["alerts_holding"] else ""]
        out.print(f"wrote {safe(out_file)}: {info['plots']} plots for {safe(', '.join(info['profiles']) or 'no profile')}, "
                  + ", ".join([f"{info['devices']} devices", *filter(None, held)]), soft_wrap=True)
        if not info["records"]:  # an empty report is not a fleet that measured nothing worth drawing
            out.print(f"[yellow]note[/] {safe(db.where)} holds no benchmark record yet, so the report has no plot (its "
                      "tables show the rest): run `edgekit tune` (or `edgekit bench`, or `edgekit monitor` while devices "
                      "benchmark) for them")
