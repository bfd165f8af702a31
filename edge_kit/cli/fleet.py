"""Fleet commands of the `edgekit` CLI: bench, deploy, publish, sim."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.table import Table

from edge_kit.cli.app import (
    BENCH_RUNS_MAX,
    BENCH_RUNS_MIN,
    BENCH_SECONDS_MAX,
    BENCH_SECONDS_MIN,
    WAIT_MAX_S,
    DevicesOpt,
    FleetOpt,
    GateAlphaOpt,
    GateOpt,
    GateRequestsOpt,
    GateShadowOpt,
    GateSlowdownOpt,
    GateSnrOpt,
    GateWindowOpt,
    HistoryOpt,
    JsonOpt,
    ParallelOpt,
    ProfilesOpt,
    TrustNewHostsOpt,
    app,
    bounded,
    emit_json,
    err,
    gate_lines,
    live_gate,
    open_fleet_history,
    out,
    print_refused,
    profile_names,
    progress_bar,
    results_table,
    safe,
    spinner,
    utf8_text,
)
from edgekit_protocol.labels import clip
from edgekit_protocol.messages import field_at

_ENVELOPE = ("schema", "device", "fleet", "seq", "ts", "msg_id", "key_id", "sig", "variant", "sha256", "profile")


def bench_rows(record: dict[str, Any]) -> list[tuple[str, str]]:
    """Return (label, text) rows for a bench record from a device: who measured it, then the figures (the agent's
    own summary; a record it cannot read, an older or a compromised agent's, as its fields were received)."""
    from device_agents.bench import summary_rows

    try:
        figures = summary_rows(record)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):  # only the wire checks hold for a device's record
        figures = [("note", "the record lacks fields this host's summary reads: shown as received (--json for all of it)")]
        figures += [(k, clip(", ".join(f"{a} {b}" for a, b in v.items()) if isinstance(v, dict) else str(v), 300))
                    for k, v in record.items() if k not in _ENVELOPE]
    return [("device", f"{record['device']} ({record.get('profile') or 'no profile'})"
                       + ("  (simulated device: measured on this machine)" if record.get("simulated") else "")),
            ("variant", f"{record.get('variant')}  sha256 {str(record.get('sha256'))[:12]}"),
            *figures]


@app.command("bench")
def bench_cmd(
    fleet_file: FleetOpt,
    device: Annotated[str, typer.Option(help="Device name from the fleet file.", callback=utf8_text)],
    variant: Annotated[Optional[str], typer.Option(help="Variant id installed on the device (default: its current model).",
                                                   callback=utf8_text)] = None,
    min_runs: Annotated[Optional[int], typer.Option(min=BENCH_RUNS_MIN, max=BENCH_RUNS_MAX, help="Timed runs at least (default: the agent's config).")] = None,
    min_seconds: Annotated[Optional[float], typer.Option(**bounded("Timed seconds at least.", BENCH_SECONDS_MIN, BENCH_SECONDS_MAX))] = None,
    timeout: Annotated[float, typer.Option(**bounded("Seconds to wait for the record.", 1, WAIT_MAX_S))] = 300.0,
    history: HistoryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask a running agent for a benchmark over MQTT; store the record in the history and print it.

    The history is the fleet's (beside its file) or --history: where select, fleet status and report read it."""
    from edge_kit.fleet.commands import FleetClient
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.loop.tune import store_each

    fleet = load_fleet(fleet_file)
    dev = fleet.device(device)
    args = {k: v for k, v in {"variant": variant, "min_runs": min_runs, "min_seconds": min_seconds}.items() if v is not None}
    # opened before the device is asked: a history that cannot be written stops here, not after the measurement
    with open_fleet_history(fleet_file, history) as db:
        with FleetClient.of(fleet) as client:
            with spinner(f"benchmarking {variant or 'the current model'} on {dev.name}", as_json):
                # void once this gives up: a benchmark queued behind others never starts when nobody waits for it
                record = client.request(dev.name, "bench", args, timeout=timeout, expire=True)["record"]
        # once: a monitor that stored it too has the same msg_id; one the history refuses for what it holds is
        # kept as invalid, shown and said (exit 4), never a traceback that loses the measurement
        _, refused = store_each(db, "bench", [record])
        where = db.where
    if as_json:
        # where it was stored, as the human output's last line says (the signed record itself has no such field)
        emit_json({**record, "history": where} if not refused else {**record, "history_refused": refused})
    else:
        t = Table(show_header=False, box=box.SIMPLE, pad_edge=False)
        for label, text in bench_rows(record):
            t.add_row(label, safe(text))
        out.print(t)
        out.print(f"stored in {safe(where)}" if not refused else
                  f"[red]{safe(dev.name)}: not stored:[/] {safe('; '.join(refused[dev.name]))}", highlight=False)
    if refused:
        raise typer.Exit(4)



@app.command("shadow")
def shadow_cmd(
    fleet_file: FleetOpt,
    device: Annotated[str, typer.Option(help="Device name from the fleet file.", callback=utf8_text)],
    variant: Annotated[Optional[str], typer.Option(help="Installed variant to run beside the served one "
                                                        "(fp32: how far the served model is from the reference).",
                                                   callback=utf8_text)] = None,
    share: Annotated[float, typer.Option(**bounded("Share of live requests also run through it.", 0, 1))] = 0.1,
    max_per_s: Annotated[float, typer.Option(**bounded("At most this many shadow runs a second.", 0, 1000))] = 5.0,
    off: Annotated[bool, typer.Option("--off", help="Stop the device's shadow run.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run an installed variant beside the served one on the device's live inputs, and compare them.

    Only the comparison leaves the device (on its shadow topic, stored by the monitor); the inputs never do."""
    from edge_kit.errors import InputError
    from edge_kit.fleet.commands import FleetClient
    from edge_kit.fleet.inventory import load_fleet

    if not off and not variant:
        raise InputError("shadow: give --variant (the model to run beside the served one) or --off")
    fleet = load_fleet(fleet_file)
    dev = fleet.device(device)
    args = {"off": True} if off else {"variant": variant, "share": share, "max_per_s": max_per_s}
    with FleetClient.of(fleet) as client:
        result = client.request(dev.name, "shadow", args, timeout=60, expire=True)["result"]
    if as_json:
        emit_json(result)
    elif off:
        out.print(f"{dev.name}: shadow run stopped")
    else:
        # the device's answer: any shape, any length (a variant name is cut as in `fleet status`)
        named = (lambda *path: safe(clip(str(field_at(result, *path) or "?"), 128)))
        out.print(f"{dev.name}: {named('shadow', 'variant')} runs beside {named('serving', 'variant')} on "
                  f"{share:.0%} of live requests (at most {max_per_s:g}/s, idle CPU only); its comparison comes on its shadow topic")


keys_app = typer.Typer(no_args_is_help=True, help="The fleet's keys: the operator key devices pin.")
app.add_typer(keys_app, name="keys")


@keys_app.command("rotate")
def keys_rotate_cmd(
    fleet_file: FleetOpt,
    timeout: Annotated[float, typer.Option(**bounded("Seconds to wait for each step's answers.", 1, WAIT_MAX_S))] = 30.0,
    force: Annotated[bool, typer.Option("--force", help="Switch even when a device missed the new key (deploy to it after).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Replace the operator key on every device of the fleet over MQTT (the old key is kept under keys/retired/).

    The key is switched only when every device took the new one (or with --force); exit 4 when a
    device did not, and the table says what to do for it. Run it again to finish: the pending key is kept.
    """
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.fleet.rotate import rotate_operator_key

    fleet = load_fleet(fleet_file)
    with spinner("rotating the operator key", as_json):
        old, new, switched, results = rotate_operator_key(fleet, timeout, force=force)
    if as_json:
        emit_json({"old_key": old, "new_key": new, "switched": switched, "devices": [r.__dict__ for r in results]})
    else:
        out.print(f"operator key {old} -> {new} (old key kept in {fleet.key_store().folder / 'retired'})" if switched
                  else f"operator key NOT switched: {old} stays; {new} is pending until every device has it", soft_wrap=True)
        t = Table("device", "outcome", "what to do", box=box.SIMPLE)
        for r in results:
            t.add_row(safe(r.device), safe(r.outcome), safe(r.reason or ""))
        out.print(t)
    if any(r.outcome not in ("rotated", "revoked") for r in results):
        raise typer.Exit(4)


@app.command("publish")
def publish_cmd(
    artifacts: Annotated[Path, typer.Argument(help="A compiled model's folder (with manifest.json).")],
    store: Annotated[str, typer.Option("--store", help="The store folder (created); serve it with nginx, or sync it "
                                                       "to S3 / a CDN origin (docs/artifact-store.md).")],
    as_json: JsonOpt = False,
) -> None:
    """Write the artifacts content-addressed into a store folder; what is already there is not written again.

    Artifacts go to sha256/<hash>, the manifest to manifests/<model>/<sha256>.json and latest.json."""
    from edge_kit.fleet.artifact_store import publish

    result = publish(artifacts, store)
    if as_json:
        emit_json(result.as_dict())
        return
    t = Table("kind", "name", "sha256", "bytes", "store path", "", box=box.SIMPLE_HEAD, pad_edge=False)
    for f in result.files:
        t.add_row(f.kind, safe(f.name), f.sha256[:12], f"{f.bytes:,}", safe(f.path),
                  "[green]written[/]" if f.written else "[dim]already there[/]")
    for folded in (1, 2, 4):  # names, hashes and store paths folded whole on a narrow terminal, never cut to '…'
        t.columns[folded].overflow = "fold"
    out.print(t)
    written = result.written
    out.print(f"{result.model}: {len(written)} written ({sum(f.bytes for f in written):,} bytes), "
              f"{len(result.present)} already there, in {safe(str(result.store))}; devices fetch "
              f"<store URL>/sha256/<hash>; manifest: manifests/{result.model}/{result.manifest_sha256[:12]}….json",
              soft_wrap=True)


sim_app = typer.Typer(no_args_is_help=True, help="A simulated fleet on this machine: broker, sshd and agent per device.")
app.add_typer(sim_app, name="sim")
SimDirOpt = Annotated[Path, typer.Option("--dir", help="Where the simulated fleet lives (its fleet.yaml is here).")]


@app.command("deploy")
def deploy_cmd(
    fleet_file: FleetOpt,
    artifacts: Annotated[Path, typer.Option(help="A compiled model's folder (with manifest.json).")],
    devices: DevicesOpt = None,
    variant: Annotated[Optional[str], typer.Option(help="Variant to activate (default: keep the current one if it is "
                                                        "among these artifacts, else the profile's first).",
                                                   callback=utf8_text)] = None,
    parallel: ParallelOpt = 8,
    canary: Annotated[Optional[str], typer.Option(help="Deploy to this share first, e.g. 10%; stop if too many fail.")] = None,
    max_failed: Annotated[str, typer.Option(help="Share of canaries allowed to fail, e.g. 0% or 20%.")] = "0%",
    trust_new_hosts: TrustNewHostsOpt = False,
    health_timeout: Annotated[float, typer.Option(**bounded("Seconds to wait for each device's health check.", 1, WAIT_MAX_S))] = 120.0,
    repair: Annotated[bool, typer.Option("--repair/--no-repair", help="Hash each device's stored copies of the "
                                                                      "variants to deploy; upload damaged ones again.")] = True,
    new_key: Annotated[bool, typer.Option("--new-key", help="Give each device a fresh key pair, generated on this host "
                                                            "and written over SSH (mode 600), replacing the one it holds, "
                                                            "and register it: the way back for a device whose key was "
                                                            "revoked (edgekit fleet revoke), which --devices must name "
                                                            "(a revoked device it does not name is skipped).")] = False,
    broker_dir: Annotated[Optional[Path], typer.Option(
        "--broker-dir", help="With --new-key: the broker wall's folder (`edgekit fleet init --out`); a device whose "
                             "user `fleet revoke` removed there gets it back with a fresh password. A simulated "
                             "fleet's broker is found by itself.")] = None,
    new_operator_key: Annotated[bool, typer.Option(
        "--new-operator-key", help="The fleet's operator key (keys/operator.key) is lost: make a new one and pin it on "
                                   "each device this deploy reaches over SSH (the others refuse its commands until "
                                   "deployed to). Refused while the key is there: `edgekit keys rotate` replaces it.")] = False,
    gate: GateOpt = None,
    gate_window: GateWindowOpt = 60.0,
    gate_min_requests: GateRequestsOpt = 200,
    gate_alpha: GateAlphaOpt = 0.01,
    gate_min_slowdown: GateSlowdownOpt = 0.10,
    gate_shadow: GateShadowOpt = 0.0,
    gate_min_snr_db: GateSnrOpt = None,
    history_spec: HistoryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Push the agent and the artifacts to devices over SSH, activate safely, check health, roll back failures.

    With --canary and --gate live, the canaries are judged on live traffic (latency against the control
    devices by a one-sided Mann-Whitney U test, live fidelity against the reference), then promoted,
    held or rolled back; every decision goes to the history with its numbers.
    """
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

    from edge_kit.errors import ConfigError, InputError
    from edge_kit.fleet.deploy import DeployOptions, deploy
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.loop.rollout import rollout
    from edge_kit.loop.tune import store_decision, store_each
    from edge_kit.loop.waves import parse_share
    from edge_kit.manifest import read_manifest

    fleet = load_fleet(fleet_file)
    targets = fleet.select(devices)
    manifest = read_manifest(artifacts, fleet.artifact_trust())  # a missing, broken or untrusted manifest stops here
    if broker_dir is not None and not new_key:
        raise InputError("--broker-dir gives revoked devices their broker user back: it goes with --new-key")
    opts = DeployOptions(artifacts=artifacts, variant=variant, parallel=parallel, trust_new_hosts=trust_new_hosts,
                         health_timeout=health_timeout, repair=repair, new_key=new_key, named=fleet.named(devices))
    canary_share = parse_share(canary, "--canary") if canary is not None else None
    if canary_share == 0:  # no canary stage at all: everything would go at once, which --canary asks not to do
        raise InputError(f"--canary {canary}: give a share above 0 (e.g. 10%), or leave --canary out to deploy "
                         "to every device at once")
    failed_share = parse_share(max_failed, "--max-failed")
    gated = live_gate(gate, gate_window, gate_min_requests, gate_alpha, gate_min_slowdown, gate_shadow, gate_min_snr_db,
                      manifest)
    if gated is not None and not canary_share:
        raise InputError("--gate live judges canaries: give --canary too")
    # The canaries' health benchmarks and the gate's decisions go to the history (opened before any device is
    # touched: a database that cannot be reached stops the deploy here), where select, fleet status and report
    # read them.
    history = open_fleet_history(fleet_file, history_spec) if canary_share else None
    if new_operator_key:  # the last check before devices are touched: pinned on each over SSH by ensure_agent
        key = fleet.key_store().new_operator()
        (err if as_json else out).print(f"a new operator key {key.key_id} was made; devices this deploy does not reach "
                                        "refuse its commands until deployed to", highlight=False)
    elif (lost := fleet.key_store().lost_operator()) is not None:  # one line here, not one failure per device
        raise ConfigError(lost)
    if new_key:  # the device's old broker password went with its old key: a fresh one where the wall removed it
        from edge_kit.fleet.deploy import not_readmitted
        from edge_kit.loop.revoke import readmit_broker_users

        left_out = not_readmitted(fleet, targets, opts)  # revoked, not named: no key, no broker user (skipped below)
        for line in readmit_broker_users(fleet, [d for d in targets if d.name not in left_out], broker_dir):
            (err if as_json else out).print(safe(line), highlight=False)  # --json keeps stdout one document
    with progress_bar(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} devices"),
                      TimeElapsedColumn(), as_json=as_json) as bar:
        task = bar.add_task("deploying", total=len(targets))

        def progress(device: str, what: str) -> None:
            done = what in ("succeeded", "skipped", "failed")
            # the live gate quotes a device's refusal here: rich reads a description as markup
            bar.update(task, advance=1 if done else 0, description=safe(f"{device}: {what}"))

        judged: list[dict] = []  # the gate's decision, as recorded (one entry per canary, the same decision)
        unrecorded: dict[str, list[str]] = {}  # a canary's decision the history refused for what it holds

        def record(entry: dict) -> None:
            store_decision(history, entry, unrecorded)
            judged.append(entry)

        group = (rollout(fleet, targets, opts, canary_share, failed_share, progress, gate=gated,
                         record=record if gated is not None else None) if canary_share
                 else deploy(fleet, targets, opts, progress))
    stored, refused = 0, {}
    if history is not None:
        try:  # each once: a monitor that stored a record too has the same msg_id; one the history refuses for what
            # it holds is refused alone (kept as invalid), the others stored
            stored, refused = store_each(history, "bench", [r.health for r in group.results if r.health], unrecorded)
            where = history.where
        finally:
            history.close()
    if as_json:
        doc = group.as_dict()
        if history is not None:  # what the text says under its table: where the figures went, the gate's decision
            doc.update(history_refused=refused, history=where)
        if gated is not None:
            doc["gate"] = judged[0]["gate"] if judged else None  # None: the canaries failed before the gate judged
        emit_json(doc)
    else:
        out.print(results_table(group))
        out.print(f"manifest: {group.signature}", highlight=False)
        if stored:
            out.print(f"canary health benchmarks: {stored} stored in {safe(where)}", highlight=False, soft_wrap=True)
        print_refused(refused)
        if group.stopped:
            out.print(f"[red]rollout stopped:[/] {safe(group.stopped)}")
        if judged:
            out.print(gate_lines(judged[0]["gate"], promoted=not group.stopped), highlight=False)
    if group.failed or group.stopped or refused:
        raise typer.Exit(4)


@sim_app.command("up")
def sim_up(
    devices: Annotated[int, typer.Option("--devices", min=1, max=64, help="How many virtual devices.")] = 3,
    profiles: ProfilesOpt = "rpi4,rpi5,coral-usb",
    workdir: SimDirOpt = Path(".edgekit-sim"),
    embedded_broker: Annotated[bool, typer.Option("--embedded-broker", help="Use the embedded broker even when Mosquitto is installed.")] = False,
    embedded_ssh: Annotated[bool, typer.Option("--embedded-ssh", help="Use the embedded SSH server even when sshd is installed.")] = False,
    insecure: Annotated[bool, typer.Option("--insecure", help="Run the broker anonymous and plain (no passwords, ACL "
                                                              "or TLS); needed for the embedded broker.")] = False,
    link_rate: Annotated[str | None, typer.Option(
        "--link-rate", help="Put each device in its own network namespace behind an emulated link of this rate "
                            "(e.g. 50mbit; tc tbf both ways). Needs root and iproute2. Default: loopback.")] = None,
    store: Annotated[Optional[Path], typer.Option("--store", help="Also serve this published store folder over HTTP "
                                                                  "(nginx; its URL is printed and kept in sim.json).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a broker and N virtual devices (an SSH server + the real agent each); writes DIR/fleet.yaml."""
    from edge_kit.sim.fleet import SimFleet
    from edge_kit.sim.links import Links, parse_rate

    rate = parse_rate(link_rate) if link_rate is not None else None
    sim = SimFleet(workdir)
    with spinner("starting the simulated fleet", as_json) as status:
        fleet = sim.up(devices, profile_names(profiles), embedded_broker=embedded_broker or None,
                       embedded_ssh=embedded_ssh or None, link_rate=rate, insecure=insecure, store=store,
                       progress=lambda msg: status.update(msg))
    state = sim.state()
    kinds = {d["name"]: d["ssh"] for d in state["devices"]}
    links = Links(**state["links"]).describe() if state["links"] else "loopback"
    info = {"fleet_file": str(sim.fleet_file), "broker": state["broker"], "links": links,
            "devices": [{"name": d.name, "profile": d.profile, "ssh": f"{d.host}:{d.port}", "ssh_server": kinds[d.name],
                         "root": d.root} for d in fleet.devices], "store": state.get("store"),
            "revoked": state.get("revoked") or []}
    if as_json:
        emit_json(info)
        return
    t = Table("device", "profile", "ssh", "server", "root", box=box.SIMPLE_HEAD, pad_edge=False)
    for d in info["devices"]:
        t.add_row(d["name"], d["profile"], d["ssh"], d["ssh_server"], d["root"])
    t.columns[4].overflow = "fold"  # each device's root whole on a narrow terminal, never cut to '…'
    out.print(t)
    out.print(f"broker: {info['broker']['kind']} on {info['broker']['host']}:{info['broker']['port']}; links: {links}; "
              f"fleet file: {sim.fleet_file}", soft_wrap=True)
    if info["store"]:
        out.print(f"artifact store: {info['store']['kind']} at {info['store']['url']} serving {safe(info['store']['folder'])}",
                  soft_wrap=True)
    for name in info["revoked"]:
        out.print(f"{safe(name)}: its key was revoked (edgekit fleet revoke): its agent was not started, nor its broker "
                  "user let in; "
                  f"`edgekit deploy --new-key --fleet {sim.fleet_file} --artifacts <folder> --devices {safe(name)}` "
                  "brings it back",
                  highlight=False, soft_wrap=True)
    out.print(f"measurements are this machine's, marked simulated; stop with: edgekit sim down --dir {workdir}",
              soft_wrap=True)


@sim_app.command("down")
def sim_down(workdir: SimDirOpt = Path(".edgekit-sim"), as_json: JsonOpt = False) -> None:
    """Stop everything `edgekit sim up` started in DIR."""
    from edge_kit.sim.fleet import SimFleet

    down = SimFleet(workdir).down()
    if as_json:
        emit_json({"stopped": down.stopped, "not_running": down.not_running})
        return
    if down.stopped:
        out.print(f"stopped: {', '.join(down.stopped)}")
    if down.not_running:
        out.print(f"not running (had already ended; its record cleaned up): {', '.join(down.not_running)}")
    if not (down.stopped or down.not_running):
        out.print(f"nothing is up in {workdir}", soft_wrap=True)
