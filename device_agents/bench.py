"""One benchmark run of a ``.tflite`` model: latency distribution, start-up cost, memory, accuracy.

Method (in the spirit of MLPerf SingleStream, one query at a time, p90 the headline figure):
``warmup`` untimed runs, then timed runs until both ``min_runs`` and ``min_seconds`` are reached
(``max_runs`` caps it). Each run is one ``invoke()`` timed with ``time.perf_counter_ns``; input
tensors are prepared before timing. MLPerf itself asks for 1,024 queries and minutes of run time;
that is too slow for a tuning loop on a fleet, so the defaults are smaller and configurable.

Inputs are the eval set's samples when one is given (cycled, each set before its timed run, as an
application would), else one tensor of uniform random data over the input's range, set once (as
TFLite's benchmark_model does); the record says which.
"""

from __future__ import annotations

import platform
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from device_agents import conditions
from device_agents.inference import ModelRunner, fidelity, top1_accuracy
from device_agents.power import not_measured
from device_agents.runtimes import get_runtime
from edgekit_protocol.config import BenchSettings
from edgekit_protocol.datafile import read_arrays, read_npz, read_reference


def _percentiles(ns: np.ndarray) -> dict[str, float]:
    ms = ns / 1e6
    return {
        "p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()), "std": float(ms.std()),
        "min": float(ms.min()), "max": float(ms.max()),
    }


def _inputs(runner: ModelRunner, eval_x: np.ndarray | None, seed: int = 0) -> tuple[list[np.ndarray], str]:
    if eval_x is not None and len(eval_x):
        return [runner.quantize_input(x) for x in eval_x[:256]], "eval set"
    dtype = runner.input["dtype"]
    rng = np.random.default_rng(seed)
    shape = runner.input_shape
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return [rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)], "random"
    return [rng.uniform(0, 1, size=shape).astype(dtype)], "random"


def _peak_rss() -> dict[str, Any]:
    """Return the process's peak resident memory and how it was read.

    Linux's ``VmHWM`` belongs to the current program image; ``ru_maxrss`` survives ``exec`` and so
    can report the parent's peak (e.g. a large launcher), hence it is only the fallback.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return {"peak_rss_mb": round(int(line.split()[1]) / 1024, 1),
                        "peak_rss_method": "VmHWM in /proc/self/status: the whole process"}
    except OSError:
        pass
    return {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_rss_method": "getrusage(RUSAGE_SELF).ru_maxrss: the whole process"}


def run_bench(model: Path, settings: BenchSettings = BenchSettings(), *, eval_file: Path | None = None,
              reference: np.ndarray | None = None, power: Any = None) -> dict[str, Any]:
    """Benchmark ``model`` and return the measurement part of an ``edgekit.bench/1`` record.

    ``eval_file`` is an ``.npz`` (see :mod:`edgekit_protocol.datafile`), checked against the model's
    input shape before anything is timed; with labels ``y`` it also gives top-1 accuracy.
    ``reference`` holds the fp32 model's outputs on its ``x`` (for fidelity); when None and the
    eval file carries an array ``reference``, that is used. ``power`` is a meter from
    :func:`device_agents.power.power_meter` (started and stopped around the timed runs); None
    records power as not measured.

    Raises:
        RuntimeUnavailable: the runtime or delegate is not installed here.
        DataFileError: ``eval_file`` is missing, unreadable or does not fit the model.
        ValueError: the model cannot be loaded or run.
    """
    runtime = get_runtime(settings.runtime)
    before = conditions.snapshot()
    t0 = time.perf_counter_ns()
    interp = runtime.interpreter(Path(model), threads=settings.threads, delegate=settings.delegate,
                                 options=settings.delegate_options)
    init_ms = (time.perf_counter_ns() - t0) / 1e6
    runner = ModelRunner(interp)
    eval_x = eval_y = None
    if eval_file is not None:
        arrays = read_arrays(eval_file, "--eval")  # read once: inputs, labels and the fp32 reference
        x, y = read_npz(eval_file, "--eval", runner.input_shape[1:], labels="optional", arrays=arrays)
        eval_x, eval_y = np.asarray(x, dtype=np.float32), None if y is None else np.asarray(y)
        if reference is None:
            ref = read_reference(eval_file, len(eval_x), arrays)
            reference = None if ref is None else np.asarray(ref, dtype=np.float32)
    inputs, input_source = _inputs(runner, eval_x)

    t0 = time.perf_counter_ns()
    runner.invoke_raw(inputs[0])
    first_ms = (time.perf_counter_ns() - t0) / 1e6
    for i in range(settings.warmup):
        runner.invoke_raw(inputs[i % len(inputs)])

    if len(inputs) == 1:  # random data: set once, as benchmark_model does; eval samples are set per run
        runner.interpreter.set_tensor(runner.input["index"], inputs[0])
    times: list[int] = []
    if power is not None:
        power.start()
    started = time.perf_counter()
    n = len(inputs)
    while len(times) < settings.max_runs and (
            len(times) < settings.min_runs or time.perf_counter() - started < settings.min_seconds):
        if n == 1:
            t = time.perf_counter_ns()
            runner.interpreter.invoke()
        else:
            x = inputs[len(times) % n]
            t = time.perf_counter_ns()
            runner.invoke_raw(x)
        times.append(time.perf_counter_ns() - t)
    duration = time.perf_counter() - started
    power_record = power.stop(len(times)) if power is not None else not_measured()
    after = conditions.snapshot()

    record: dict[str, Any] = {
        "runtime": runtime.key, "runtime_version": runtime.version(), "delegate": settings.delegate,
        "delegate_options": dict(settings.delegate_options),
        "threads": settings.threads, "machine": platform.machine(),
        "warmup_runs": settings.warmup, "runs": len(times), "duration_s": round(duration, 3),
        "latency_ms": _percentiles(np.asarray(times, dtype=np.float64)),
        "latency_method": "time.perf_counter_ns around interpreter.invoke()",
        "init_ms": round(init_ms, 3), "first_inference_ms": round(first_ms, 3),
        **_peak_rss(),
        "inputs": input_source,
        "conditions": {"start": before, "end": after},
        "accuracy": None, "fidelity": None,
        "power": power_record,
    }
    if eval_x is not None:
        outputs = runner.predict(eval_x)
        if eval_y is not None:
            record["accuracy"] = {"metric": "top1", "value": top1_accuracy(outputs, eval_y), "samples": len(eval_x)}
        if reference is not None:
            record["fidelity"] = {**fidelity(outputs, reference), "samples": len(eval_x)}
    return record



def summary_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """Return ``(label, text)`` rows describing a bench record, each figure with how it was obtained.

    Shared by ``edgekit-agent bench`` and the host's ``edgekit bench --device``.
    """
    lat, power = r["latency_ms"], r["power"]
    rows = [
        ("runtime", f"{r['runtime']} {r['runtime_version']}, delegate {r['delegate']}, {r['threads']} thread(s)"),
        ("runs", f"{r['runs']} timed after {r['warmup_runs']} warm-up in {r['duration_s']} s; inputs: {r['inputs']}"),
        ("latency p50/p90/p99", f"{lat['p50']:.3f} / {lat['p90']:.3f} / {lat['p99']:.3f} ms ({r['latency_method']}; "
                                "p90 is the headline figure)"),
        ("latency mean ± std", f"{lat['mean']:.3f} ± {lat['std']:.3f} ms (min {lat['min']:.3f}, max {lat['max']:.3f})"),
        ("init / first inference", f"{r['init_ms']:.1f} / {r['first_inference_ms']:.2f} ms"),
        ("peak RSS", f"{r['peak_rss_mb']} MB ({r['peak_rss_method']})"),
        ("power", (f"{power['avg_w']:.3f} W, {power['energy_per_inference_mj']:.3f} mJ per inference; "
                   if power.get("avg_w") is not None else "") + power["method"]),
    ]
    if r.get("accuracy"):
        rows.append(("top-1 accuracy", f"{100 * r['accuracy']['value']:.2f} % on {r['accuracy']['samples']} eval samples"))
    if r.get("fidelity"):
        fid = r["fidelity"]
        rows.append(("fidelity vs fp32", f"top-1 agreement {100 * fid['top1_agreement']:.2f} %, "
                                         f"max |err| {fid['max_abs_error']:.4g}"))
    start, end = r["conditions"]["start"], r["conditions"]["end"]

    def na(v: object, unit: str = "") -> str:
        return "n/a" if v is None else f"{v}{unit}"

    rows.append(("conditions", f"governor {na(start['cpu_governor'])}, clock {na(start['cpu_freq_mhz'], ' MHz')}, "
                               f"temperature {na(start['temperature_c'], ' C')} -> {na(end['temperature_c'], ' C')}, "
                               f"load {start['load_1m']}"))
    return rows
