"""Fleet commands of the `edgekit` CLI (registered on :data:`edge_kit.cli.app`)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from edge_kit.cli import JsonOpt, _emit_json, app, out

FleetOpt = Annotated[Path, typer.Option("--fleet", "-f", help="fleet.yaml: devices, SSH and broker.")]


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

