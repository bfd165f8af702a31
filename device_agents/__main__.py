"""`edgekit-agent`: the on-device command. Needs only numpy and a LiteRT interpreter.

    edgekit-agent bench model.tflite [--eval eval.npz] [--threads N] [--delegate edgetpu] [--json]

Errors print one line (``edgekit-agent: error: ...``) and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from device_agents.bench import BenchSettings, run_bench
from device_agents.datafile import DataFileError
from device_agents.runtimes import RUNTIMES, RuntimeUnavailable


class UsageError(Exception):
    """Bad input from the command line; printed as one line."""


def _print_table(model: Path, r: dict) -> None:
    lat = r["latency_ms"]
    rows = [
        ("model", str(model)),
        ("runtime", f"{r['runtime']} {r['runtime_version']}, delegate {r['delegate']}, {r['threads']} thread(s)"),
        ("runs", f"{r['runs']} timed after {r['warmup_runs']} warm-up, {r['duration_s']} s, inputs: {r['inputs']}"),
        ("latency p50 / p90 / p99", f"{lat['p50']:.3f} / {lat['p90']:.3f} / {lat['p99']:.3f} ms"),
        ("latency mean ± std", f"{lat['mean']:.3f} ± {lat['std']:.3f} ms (min {lat['min']:.3f}, max {lat['max']:.3f})"),
        ("init / first inference", f"{r['init_ms']:.1f} / {r['first_inference_ms']:.2f} ms"),
        ("peak RSS", f"{r['peak_rss_mb']} MB (whole process, getrusage)"),
    ]
    if r["accuracy"]:
        rows.append(("top-1 accuracy", f"{100 * r['accuracy']['value']:.2f} % on {r['accuracy']['samples']} samples"))
    rows.append(("power", r["power"]["method"]))
    start, end = r["conditions"]["start"], r["conditions"]["end"]

    def na(v: object, unit: str = "") -> str:
        return "n/a" if v is None else f"{v}{unit}"

    rows.append(("conditions", f"governor {na(start['cpu_governor'])}, clock {na(start['cpu_freq_mhz'], ' MHz')}, "
                               f"temperature {na(start['temperature_c'], ' C')} -> {na(end['temperature_c'], ' C')}, "
                               f"load {start['load_1m']}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:>{width}}  {value}")
    print("(latency: time.perf_counter_ns around interpreter.invoke(); p90 is the headline figure)")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `edgekit-agent` console script."""
    parser = argparse.ArgumentParser(prog="edgekit-agent", description="edge-kit on-device agent")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="benchmark a .tflite model once and print the result")
    b.add_argument("model", type=Path)
    b.add_argument("--eval", type=Path, help=".npz with x (real inputs) and optionally y (labels: top-1 accuracy)")
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--delegate", default="xnnpack", help="xnnpack (default), none, edgetpu, gpu")
    b.add_argument("--runtime", choices=sorted(RUNTIMES), help="default: first installed")
    b.add_argument("--warmup", type=int, default=BenchSettings.warmup)
    b.add_argument("--min-runs", type=int, default=BenchSettings.min_runs)
    b.add_argument("--min-seconds", type=float, default=BenchSettings.min_seconds)
    b.add_argument("--json", action="store_true", help="print the record as JSON")
    args = parser.parse_args(argv)
    try:
        if not args.model.is_file():
            raise UsageError(f"{args.model}: model not found")
        if args.threads < 1 or args.min_runs < 1 or args.warmup < 0 or args.min_seconds < 0:
            raise UsageError("--threads and --min-runs must be at least 1; --warmup and --min-seconds not negative")
        settings = BenchSettings(warmup=args.warmup, min_runs=args.min_runs, min_seconds=args.min_seconds,
                                 threads=args.threads, delegate=args.delegate, runtime=args.runtime)
        try:
            record = run_bench(args.model, settings, eval_file=args.eval)
        except DataFileError:
            raise
        except ValueError as exc:
            raise UsageError(f"{args.model}: cannot load or run the model ({str(exc).splitlines()[0]})") from None
    except (UsageError, RuntimeUnavailable, DataFileError) as exc:
        sys.stderr.write(f"edgekit-agent: error: {exc}\n")
        sys.exit(2)
    if args.json:
        print(json.dumps({"model": str(args.model), **record}, indent=2))
    else:
        _print_table(args.model, record)


if __name__ == "__main__":
    main()
