"""One benchmark run of a ``.tflite`` or ``.onnx`` model: latency distribution, start-up cost, memory, accuracy.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from device_agents import conditions
from device_agents.errors import MetricError
from device_agents.inference import Batch, ModelRunner, fidelity
from device_agents.power import not_measured
from device_agents.runtimes import get_runtime, ran_with
from edgekit_protocol.config import INFERENCE_TIMEOUT_FACTOR, BenchSettings
from edgekit_protocol.datafile import Array, read_arrays, read_data, read_reference


def _percentiles(ns: np.ndarray) -> dict[str, float]:
    ms = ns / 1e6
    return {
        "p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()), "std": float(ms.std()),
        "min": float(ms.min()), "max": float(ms.max()),
    }


def _inputs(runner: ModelRunner, eval_x: Batch | None, seed: int = 0) -> tuple[list[list[np.ndarray]], str]:
    """Return the typed input tensors of each timed run, and where they came from."""
    samples = len(next(iter(eval_x.values()))) if eval_x else 0
    if samples:
        return [runner.tensors(eval_x, i) for i in range(min(samples, 256))], "eval set"
    rng = np.random.default_rng(seed)
    tensors = []
    for port in runner.inputs:
        if np.issubdtype(port.dtype, np.integer):
            info = np.iinfo(port.dtype)
            tensors.append(rng.integers(info.min, info.max, size=port.shape, endpoint=True).astype(port.dtype))
        else:
            tensors.append(rng.uniform(0, 1, size=port.shape).astype(port.dtype))
    return [tensors], "random"


def _scored(runner: ModelRunner, eval_x: Batch, arrays: dict[str, Array], eval_file: Path,
            reference: dict[str, np.ndarray] | None,
            mark: Callable[..., None]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Return the (accuracy, fidelity) blocks of a bench record for the eval set's inputs, telling ``mark``
    (``mark(step, n)``) each sample before it runs, then the metric.

    Accuracy is scored as the ``metric`` spec shipped in the eval set says (top-1 when there is
    none); a metric that fails is an ``error`` in the accuracy block, never a failed benchmark.
    """
    from device_agents.metrics import MetricSpec, labels_of

    outputs = runner.predict(eval_x, progress=lambda i: mark(SCORING, i))
    mark(METRIC)
    samples = len(next(iter(outputs.values()))) if outputs else 0
    accuracy = fid = None
    labels = labels_of(arrays)
    classes: set[str] = set()
    try:
        spec = MetricSpec.from_bytes(bytes(np.asarray(arrays["metric"]).astype(np.uint8)), str(eval_file)) \
            if "metric" in arrays else MetricSpec()
        scorer = spec.scorer()
        classes = scorer.class_outputs(outputs)
        if labels:
            scorer.check(labels, samples, str(eval_file))
            accuracy = {**scorer.score(outputs, labels), "samples": samples}
    except MetricError as exc:
        accuracy = {"error": str(exc), "samples": samples}
    if reference is None:
        ref = read_reference(eval_file, samples, list(outputs), arrays)
        reference = None if ref is None else {k: np.asarray(v, dtype=np.float32) for k, v in ref.items()}
    if reference is not None:
        try:
            fid = {**fidelity(outputs, reference, classes=classes), "samples": samples}
        except ValueError as exc:
            fid = {"error": f"{eval_file}: {exc}", "samples": samples}
    return accuracy, fid


def _peak_rss(whose: str = "the whole process") -> dict[str, Any]:
    """Return the process's peak resident memory and how it was read (``whose``: what the process is).

    Linux's ``VmHWM`` belongs to the current program image; ``ru_maxrss`` survives ``exec`` and so
    can report the parent's peak (e.g. a large launcher), hence it is only the fallback.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return {"peak_rss_mb": round(int(line.split()[1]) / 1024, 1),
                        "peak_rss_method": f"VmHWM in /proc/self/status: {whose}"}
    except OSError:
        pass
    return {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_rss_method": f"getrusage(RUSAGE_SELF).ru_maxrss: {whose}"}


# The steps of a benchmark, as its child reports them to the watchdog (bench_in_child): (name, numbered, limit),
# the limit being "step" (BenchSettings.step_timeout_s) or "inference" (inference_timeout_s, or
# INFERENCE_TIMEOUT_FACTOR x the first inference when longer; GPU compute runs: that per run).
LOADING, FIRST, WARMUP, TIMED, GPU, SCORING, METRIC, CONDITIONS = range(8)
STEPS = (("loading", False, "step"), ("first inference", False, "step"), ("warm-up run", True, "inference"),
         ("timed run", True, "inference"), ("GPU compute runs", False, "inference"),
         ("scoring sample", True, "inference"), ("scoring the metric", False, "step"),
         ("reading the conditions", False, "step"))


def step_name(progress: tuple[int, ...]) -> str:
    """Return the name of the step a benchmark child reported as ``(step, n, first inference µs)``: ``timed run 4``."""
    name, numbered, _ = STEPS[progress[0]] if 0 <= progress[0] < len(STEPS) else (f"step {progress[0]}", False, "")
    return f"{name} {progress[1]}" if numbered else name


def agent_yaml_key(key: str) -> str:
    """Return how agent.yaml names the bench setting ``key``: ``bench.<key>``."""
    return f"bench.{key}"


def step_limit(settings: BenchSettings, progress: tuple[int, ...],
               named: Callable[[str], str] = agent_yaml_key) -> tuple[float, str]:
    """Return how long the step ``progress`` (``(step, n, first inference µs)``) of a benchmark may last, in
    seconds, and which settings say so (the text of a timeout; ``named(key)`` spells a setting's key)."""
    step = progress[0] if 0 <= progress[0] < len(STEPS) else LOADING
    if STEPS[step][2] == "step":
        return settings.step_timeout_s, named("step_timeout_s")
    from device_agents.smoke import seconds

    first_s = progress[2] / 1e6
    per_run = max(settings.inference_timeout_s, INFERENCE_TIMEOUT_FACTOR * first_s)
    why = (f"{named('inference_timeout_s')}, or {INFERENCE_TIMEOUT_FACTOR}x the first inference's "
           f"{seconds(first_s * 1000)} ms when longer")  # as its seconds: 12500 ms, never 1.25e+04
    if step == GPU:  # one step over up to 200 runs
        return per_run * max(1, progress[1]), f"{why}, per run"
    return per_run, why


# How each figure of a bench record that has no ``*_method`` of its own was obtained (the record's ``methods``).
METHODS = {
    "init_ms": "time.perf_counter_ns around loading the model into the runtime's interpreter (delegate included)",
    "first_inference_ms": "time.perf_counter_ns around the first invoke, before the warm-up runs",
    "duration_s": "time.perf_counter over the timed runs",
    "accuracy": "scored by this agent on the device's own outputs for the eval set's inputs, with the metric and "
                "labels shipped in it",
    "fidelity": "this agent's outputs against the fp32 reference outputs shipped in the eval set, per output",
    "conditions": "cpufreq governor and clock of cpu0 and the hottest /sys/class/thermal zone before and after, "
                  "the 1-minute load average (os.getloadavg) at the start, vcgencmd and nvpmodel/jetson_clocks where "
                  "present; null where the device does not expose one",
}
# What a record made in a benchmark's child (bench_in_child) adds to its ``methods``.
IN_CHILD = ("the whole benchmark (loading, runs, scoring, power meter) ran in a child process forked from a "
            "forkserver that has numpy and the runtime imported; the parent watched its progress, which the child "
            "writes (three integers) before each run's clock starts, never inside the timed invoke()")


def run_bench(model: Path, settings: BenchSettings = BenchSettings(), *, eval_file: Path | None = None,
              reference: dict[str, np.ndarray] | None = None, power: Any = None,
              progress: Callable[[int, int, int], None] | None = None) -> dict[str, Any]:
    """Benchmark ``model`` and return the measurement part of an ``edgekit.bench/1`` record.

    ``eval_file`` is an ``.npz`` (see :mod:`edgekit_protocol.datafile`), checked against the model's
    inputs before anything is timed; with labels it also gives accuracy, scored by the task metric
    the file names (top-1 when it names none). ``reference`` holds the fp32 model's outputs by
    output name (for per-output fidelity); when None, the eval file's references are used. ``power`` is a meter from
    :func:`device_agents.power.power_meter` (started and stopped around the timed runs); None
    records power as not measured. ``progress(step, n, first_us)`` is told each step (:data:`STEPS`) before
    it starts, outside the timed region: its number ``n`` (1-based; 0 when not numbered) and the first
    inference's microseconds (0 until known); :func:`bench_in_child` watches them.

    Raises:
        RuntimeUnavailable: the runtime or delegate is not installed here.
        DataFileError: ``eval_file`` is missing, unreadable or does not fit the model.
        ValueError: the model cannot be loaded or run.
    """
    from device_agents.runtimes.banner import runtime_banner_dropped

    first_us = 0

    def mark(step: int, n: int = 0) -> None:
        if progress is not None:
            progress(step, n, first_us)

    mark(LOADING)
    runtime = get_runtime(settings.runtime, model=Path(model))  # by the model's format: LiteRT or ONNX Runtime
    before = conditions.snapshot()
    with runtime_banner_dropped():  # its INFO line, nothing else; its own cost is outside the clock
        t0 = time.perf_counter_ns()
        interp = runtime.interpreter(Path(model), threads=settings.threads, delegate=settings.delegate,
                                     options=settings.delegate_options)
        init_ms = (time.perf_counter_ns() - t0) / 1e6
    runner = ModelRunner(interp)
    eval_x = arrays = None
    if eval_file is not None:
        arrays = read_arrays(eval_file, "--eval")  # read once: inputs, labels, metric and fp32 reference
        data = read_data(eval_file, "--eval", runner.input_shapes, labels="optional", arrays=arrays)
        eval_x = {name: np.asarray(a, dtype=np.float32) for name, a in data.x.items()}
    inputs, input_source = _inputs(runner, eval_x)

    mark(FIRST)
    t0 = time.perf_counter_ns()
    runner.invoke_raw(inputs[0])
    first_ms = (time.perf_counter_ns() - t0) / 1e6
    first_us = max(1, min(2**31 - 1, round(first_ms * 1000)))
    for i in range(settings.warmup):
        mark(WARMUP, i + 1)
        runner.invoke_raw(inputs[i % len(inputs)])

    if len(inputs) == 1:  # random data: set once, as benchmark_model does; eval samples are set per run, untimed
        for port, tensor in zip(runner.inputs, inputs[0]):
            runner.interpreter.set_tensor(port.index, tensor)
    times: list[int] = []
    if power is not None:
        power.start()
    started = time.perf_counter()
    n = len(inputs)
    while len(times) < settings.max_runs and (
            len(times) < settings.min_runs or time.perf_counter() - started < settings.min_seconds):
        if n > 1:  # the run's eval sample is set before the clock starts: what is timed is invoke() alone
            for port, tensor in zip(runner.inputs, inputs[len(times) % n]):
                runner.interpreter.set_tensor(port.index, tensor)
        mark(TIMED, len(times) + 1)  # before the clock starts: the watchdog's cost is never timed
        t = time.perf_counter_ns()
        runner.interpreter.invoke()
        times.append(time.perf_counter_ns() - t)
    duration = time.perf_counter() - started
    mark(CONDITIONS)
    power_record = power.stop(len(times)) if power is not None else not_measured()
    after = conditions.snapshot()

    record: dict[str, Any] = {
        "runtime": runtime.key, "runtime_version": runtime.version(),
        **ran_with(interp, settings.delegate, settings.delegate_options),
        "threads": settings.threads, "machine": platform.machine(),
        "warmup_runs": settings.warmup, "runs": len(times), "duration_s": round(duration, 3),
        "latency_ms": _percentiles(np.asarray(times, dtype=np.float64)),
        "latency_method": ("time.perf_counter_ns around session.run() (ONNX Runtime, through the interpreter adapter)"
                           if hasattr(interp, "provider") else "time.perf_counter_ns around interpreter.invoke()"),
        "init_ms": round(init_ms, 3), "first_inference_ms": round(first_ms, 3),
        **_peak_rss(),
        "inputs": input_source,
        "conditions": {"start": before, "end": after},
        "accuracy": None, "fidelity": None,
        "power": power_record,
        "methods": dict(METHODS),
    }
    if hasattr(interp, "engine"):  # TensorRT: the engine build, host latency as trtexec's, the engine's compute time
        record["engine"] = interp.engine
        record["latency_method"] = ("time.perf_counter_ns around session.run() with numpy inputs and outputs: host latency, "
                                    "host-to-device and device-to-host copies included (trtexec's 'Latency')")
        for port, tensor in zip(runner.inputs, inputs[0]):
            runner.interpreter.set_tensor(port.index, tensor)
        mark(GPU, min(len(times), 200))
        try:
            compute, method = interp.compute_times_ms(min(len(times), 200))
            record["gpu_compute_ms"] = _percentiles(np.asarray(compute, dtype=np.float64) * 1e6)
            record["gpu_compute_method"] = method
        except (ValueError, RuntimeError) as exc:
            record["gpu_compute_ms"] = None
            record["gpu_compute_method"] = f"not measured: {exc}"
    if eval_x is not None and arrays is not None and eval_file is not None:
        record["accuracy"], record["fidelity"] = _scored(runner, eval_x, arrays, eval_file, reference, mark)
    return record


def bench_child(model: str, settings: BenchSettings, eval_file: str | None, meter_args: dict[str, Any] | None,
                slots: Any) -> tuple[str, Any]:
    """Run :func:`run_bench` in a benchmark's child (see :func:`bench_in_child`), its progress written into the
    shared int array ``slots`` (step, n, first inference µs), its power meter made here from ``meter_args``
    (:func:`device_agents.power.power_meter`'s; None: no meter) for a benchmark of ``settings.threads`` threads.

    Returns:
        ``("ok", record)``, or ``(kind, text)`` for what the model or its inputs refused: ``"data"`` (a
        DataFileError's text), ``"runtime"`` (RuntimeUnavailable's) or ``"failed"`` (the first line of
        an EdgeKitError, ValueError, RuntimeError or OSError the runtime raised, or of a MemoryError); for any
        other Python exception (a binding's TypeError or KeyError, an IndexError on a malformed output: a failure
        of this child, never a crash of it), ``("raised", (type name, first line of its text, its traceback))``.
    """
    from device_agents.errors import RuntimeUnavailable
    from device_agents.power import DEFAULT_SENSORS, power_meter
    from edgekit_protocol.errors import DataFileError, EdgeKitError

    def progress(step: int, n: int, first_us: int) -> None:
        slots[2], slots[1], slots[0] = first_us, n, step

    try:
        meter = power_meter(**meter_args, threads=settings.threads) if meter_args is not None else None
        record = run_bench(Path(model), settings, eval_file=Path(eval_file) if eval_file else None, power=meter,
                           progress=progress)
    except DataFileError as exc:
        return "data", str(exc)
    except RuntimeUnavailable as exc:
        return "runtime", str(exc)
    except MemoryError:  # the model's buffers do not fit: said so, not taken for a crash (or a bug's traceback)
        return "failed", "out of memory (MemoryError) running the model"
    except (EdgeKitError, ValueError, RuntimeError, OSError) as exc:
        return "failed", (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    except Exception as exc:  # noqa: BLE001 - any other exception: said in one line, its traceback for the log
        import traceback

        return "raised", (type(exc).__name__, (str(exc).strip().splitlines() or [""])[0], traceback.format_exc())
    if meter is None:
        record["power"] = not_measured((meter_args or {}).get("keys", DEFAULT_SENSORS))
    record.update(_peak_rss("the benchmark's child process, scoring included"))
    record["methods"]["process"] = IN_CHILD
    return "ok", record


def bench_in_child(pool: Any, model: Path, settings: BenchSettings, *, eval_file: Path | None = None,
                   meter_args: dict[str, Any] | None = None,
                   named: Callable[[str], str] = agent_yaml_key, cancel: Any = None) -> dict[str, Any]:
    """Return :func:`run_bench`'s record for ``model``, the whole benchmark run in a child of ``pool`` (a
    :class:`device_agents.smoke.SmokePool`) that is killed when a step makes no progress within its limit
    (:func:`step_limit`: ``settings.step_timeout_s`` for loading, the first inference and the metric;
    ``inference_timeout_s``, or :data:`INFERENCE_TIMEOUT_FACTOR` times the first inference, for each later inference)
    or the whole run exceeds ``settings.total_timeout_s``. A model that loops or crashes costs the child.
    ``named(key)`` spells a setting in the texts (agent.yaml's ``bench.<key>`` by default). ``cancel``: a
    ``threading.Event`` whose setting ends the child within a quarter of a second (the agent is stopping).

    Raises:
        BenchFailed: the child was killed (the step and limit named) or crashed (the signal and step named), both
            with ``ended`` set; it was stopped by ``cancel``; the runtime could not load or run the model (the step
            and the runtime's first line); or the child raised another Python exception (the step, the exception's
            type and first line; its traceback in ``detail``, for the caller's log).
        DataFileError: ``eval_file`` is missing, unreadable or does not fit the model.
        RuntimeUnavailable: the runtime or delegate is not installed here.
    """
    from device_agents.errors import (
        BenchFailed,
        RuntimeUnavailable,
        SmokeCrashed,
        SmokeFailed,
        SmokeTimedOut,
    )
    from device_agents.smoke import Watchdog
    from edgekit_protocol.errors import DataFileError

    get_runtime(settings.runtime, model=Path(model))  # one missing here is said at once, without a child's start
    watch = Watchdog("benchmark", settings.total_timeout_s, slots=3, limit=lambda p: step_limit(settings, p, named),
                     step=step_name, total_why=named("total_timeout_s"), cancel=cancel)
    try:
        kind, value = pool.run(bench_child, str(model), settings, str(eval_file) if eval_file else None, meter_args,
                               what="benchmark", watchdog=watch)
    except SmokeTimedOut as exc:
        if watch.cancelled:  # not the model's doing: not counted as one that ended
            raise BenchFailed(f"{exc}: the agent is stopping") from None
        raise BenchFailed(f"{exc}; the benchmark's child was killed", ended=True) from None
    except SmokeCrashed as exc:
        raise BenchFailed(f"the benchmark's child {exc.how} at {watch.step() or 'its start'}", ended=True) from None
    except SmokeFailed as exc:  # not raised by bench_child: kept for a pool that raises it
        raise BenchFailed(f"the benchmark failed at {watch.step() or 'its start'}: {exc}") from None
    if kind == "data":
        raise DataFileError(value)
    if kind == "runtime":
        raise RuntimeUnavailable(value)
    if kind == "raised":  # a Python exception in the child: a failure at its step, not a crash of the child
        name, text, trace = value
        raise BenchFailed(f"the benchmark raised {name} at {watch.step() or 'its start'}" + (f": {text}" if text else ""),
                          detail=trace)
    if kind != "ok":
        raise BenchFailed(f"cannot load or run the model at {watch.step() or 'its start'} ({value})")
    return value


def thin_tail(runs: int, unit: str = "timed run(s)") -> str:
    """Return what a latency line must add when ``runs`` samples (``unit``: what they are) are too few for its
    upper percentiles, else "".

    A q-th percentile needs 100 / (100 - q) samples for one to lie beyond it (p90: 10, p99: 100); over fewer,
    numpy interpolates between the slowest runs, a figure with more decimals than it has meaning.
    """
    short = [q for q, need in (("p90", 10), ("p99", 100)) if runs < need]
    if not short:
        return ""
    return (f"; only {runs} {unit}: {' and '.join(short)} lie between the slowest samples, not true percentiles "
            f"({'100' if 'p99' in short else '10'}+ give one)")


def _engine_text(e: dict[str, Any]) -> str:
    """Return one line on a TensorRT engine build record (:func:`device_agents.runtimes.tensorrt.build_engine`)."""
    how = "loaded from the cache" if e.get("cached") else "built"
    mem = f", peak RSS {e['peak_rss_mb']} MB" if e.get("peak_rss_mb") is not None else ""
    return (f"{e['variant']} {how} in {e['seconds']:.1f} s{mem}; TensorRT {e['trt_version']} on {e['gpu']}; "
            f"{len(e['engines'])} engine file(s), {e['engine_bytes'] / 1e6:.1f} MB in {e['engine_dir']}")


def summary_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """Return ``(label, text)`` rows describing a bench record, each figure with how it was obtained.

    Shared by ``edgekit-agent bench`` and the host's ``edgekit bench --device``.
    """
    lat, power = r["latency_ms"], r["power"]
    methods = r.get("methods") if isinstance(r.get("methods"), dict) else {}  # an older agent's record has none

    def how(*keys: str) -> str:
        """Return `` (method)`` for the figures ``keys`` (``; ``-joined), or "" for a record without them."""
        said = [methods[k] for k in keys if isinstance(methods.get(k), str)]
        return f" ({'; '.join(said)})" if said else ""

    rows = [
        ("runtime", f"{r['runtime']} {r['runtime_version']}, "
                    f"{'provider' if r['runtime'] in ('onnxruntime', 'tensorrt') else 'delegate'} {r['delegate']}, {r['threads']} thread(s)"),
        ("runs", f"{r['runs']} timed after {r['warmup_runs']} warm-up in {r['duration_s']} s{how('duration_s', 'process')}; "
                 f"inputs: {r['inputs']}"),
        ("latency p50/p90/p99", f"{lat['p50']:.3f} / {lat['p90']:.3f} / {lat['p99']:.3f} ms ({r['latency_method']}; "
                                f"p90 is the headline figure{thin_tail(r['runs'])})"),
        *([("TensorRT engine", _engine_text(r["engine"]))] if r.get("engine") else []),
        *([("GPU compute p50/p90/p99", (f"{g['p50']:.3f} / {g['p90']:.3f} / {g['p99']:.3f} ms ({r['gpu_compute_method']})"
                                        if (g := r.get("gpu_compute_ms")) else r["gpu_compute_method"]))]
          if "gpu_compute_method" in r else []),
        ("latency mean ± std", f"{lat['mean']:.3f} ± {lat['std']:.3f} ms (min {lat['min']:.3f}, max {lat['max']:.3f})"),
        ("init / first inference", f"{r['init_ms']:.1f} / {r['first_inference_ms']:.2f} ms{how('init_ms', 'first_inference_ms')}"),
        ("peak RSS", f"{r['peak_rss_mb']} MB ({r['peak_rss_method']})"),
        ("power", (f"{power['avg_w']:.3f} W, {power['energy_per_inference_mj']:.3f} mJ per inference; "
                   if power.get("avg_w") is not None else "") + power["method"]),
    ]
    acc = r.get("accuracy")
    if acc:
        rows.append(("accuracy", f"not scored: {acc['error']}" if "error" in acc else
                     f"{acc.get('task', 'classification')} " + ", ".join(f"{k} {v:.4g}" for k, v in acc.get("figures", {acc["metric"]: acc["value"]}).items())
                     + f" on {acc['samples']} eval samples{how('accuracy')}"))
    fid = r.get("fidelity")
    if fid:
        rows.append(("fidelity vs fp32", f"not measured: {fid['error']}" if "error" in fid else
                     f"worst output SNR {fid['snr_db']:.1f} dB, cosine {fid['cosine']:.4f}, max |err| {fid['max_abs_error']:.4g}"
                     + (f", top-1 agreement {100 * fid['top1_agreement']:.2f} %" if "top1_agreement" in fid else "")
                     + how("fidelity")))
    start, end = r["conditions"]["start"], r["conditions"]["end"]

    def na(v: object, unit: str = "") -> str:
        return "n/a" if v is None else f"{v}{unit}"

    rows.append(("conditions", f"governor {na(start['cpu_governor'])}, clock {na(start['cpu_freq_mhz'], ' MHz')}, "
                               f"temperature {na(start['temperature_c'], ' C')} -> {na(end['temperature_c'], ' C')}, "
                               f"load {start['load_1m']}"
                               + (f", Jetson power mode {start['power_mode']['name']}, jetson_clocks "
                                  f"{ {True: 'on', False: 'off', None: 'unknown'}[start.get('jetson_clocks')] }"
                                  if start.get("power_mode") else "") + how("conditions")))
    return rows
