"""Power during a benchmark: a real sensor when one answers, else a labelled estimate.

:func:`power_meter` tries the configured sensor keys in order (see :data:`SENSORS`); the first that
answers is used. Without one, and with the profile's idle and busy watts, the meter estimates
``idle_w + (busy_w - idle_w) x CPU use`` from the benchmark's own CPU time (its threads, not the
agent's serving or messaging), and says so.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from device_agents.power.sensors import SENSORS, PowerSensor, SensorEnv
from edgekit_protocol.config import DEFAULT_SENSORS


def find_sensor(keys: tuple[str, ...] | list[str] = DEFAULT_SENSORS, env: SensorEnv = SensorEnv()) -> PowerSensor | None:
    """Return the first sensor among ``keys`` that answers here, or None.

    Raises:
        ValueError: a key is not a known sensor.
    """
    for key in keys:
        if key not in SENSORS:
            raise ValueError(f"unknown power sensor {key!r} (known: {', '.join(SENSORS)})")
        sensor = SENSORS[key].probe(env)
        if sensor is not None:
            return sensor
    return None


class SensorMeter:
    """Measures a sensor over a stretch of runs: sampled every ``interval_s``, or by energy counter."""

    def __init__(self, sensor: PowerSensor, interval_s: float = 0.05):
        self.sensor = sensor
        self.interval_s = interval_s
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_j = 0.0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._samples.append(self.sensor.read())
            except OSError:
                pass

    def start(self) -> None:
        """Begin measuring (call right before the timed runs)."""
        self._samples, self._started = [], time.perf_counter()
        if self.sensor.kind == "energy":
            self._start_j = self.sensor.read()
        else:
            self._samples.append(self.sensor.read())
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True, name="power-sampler")
            self._thread.start()

    def stop(self, runs: int) -> dict[str, Any]:
        """End measuring; return the ``power`` part of a bench record for ``runs`` inferences."""
        seconds = time.perf_counter() - self._started
        if self.sensor.kind == "energy":
            joules = self.sensor.read() - self._start_j
            avg_w, samples = joules / seconds if seconds > 0 else 0.0, 2
            how = "energy counter read before and after the timed runs"
        else:
            self._stop.set()
            if self._thread:
                self._thread.join()
            avg_w, samples = sum(self._samples) / len(self._samples), len(self._samples)
            how = f"mean of {samples} samples every {self.interval_s * 1000:.0f} ms during the timed runs"
        return {"measured": True, "estimated": False, "sensor": self.sensor.key, "method": f"{self.sensor.description}; {how}",
                "avg_w": round(avg_w, 4), "energy_per_inference_mj": round(avg_w * seconds / max(runs, 1) * 1000, 4),
                "samples": samples, "seconds": round(seconds, 3)}


def _thread_clock(tid: int) -> int:
    """Return the CPU-time clock id of thread ``tid`` of this process (Linux's encoding, the one
    ``pthread_getcpuclockid`` returns: the thread's scheduler clock)."""
    return (~tid << 3) | 6


def _thread_cpu_ns(tids: set[int]) -> dict[int, int]:
    """Return the CPU time (ns) of each of ``tids`` still running in this process (never raises)."""
    spent = {}
    for tid in tids:
        try:
            spent[tid] = time.clock_gettime_ns(_thread_clock(tid))
        except (OSError, OverflowError):  # ended meanwhile
            pass
    return spent


def _task_ids() -> set[int] | None:
    """Return the ids of this process's threads, or None where ``/proc/self/task`` cannot be read."""
    try:
        return {int(name) for name in os.listdir("/proc/self/task")}
    except (OSError, ValueError):
        return None


def _cores_here() -> int:
    """Return how many cores this process may run on (its CPU affinity; the machine's count where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass
class EstimateMeter:
    """Estimates watts from the profile's idle/busy figures and the CPU use of the benchmark.

    The benchmark's CPU is that of the thread that calls :meth:`start` and of the threads started
    since this meter was made that are not Python threads (the runtime's worker pools for the model
    under test): the agent's other work (serving, MQTT, telemetry, other models' pools) is left out.
    Where threads cannot be told apart (no ``/proc/self/task``), the whole process's CPU time is
    used, and the method says so.

    That CPU time is measured on the cores of the machine the benchmark runs on, which for a simulated device is the
    host, not the profile's device. So the CPU use is the CPU time over the wall time and over the cores the
    benchmark's threads could use here (the fewer of its ``threads`` and this process's cores), scaled to the share of
    the profile's ``cores`` those threads use on the device. On the device itself this is CPU time / wall time /
    ``cores``; on a host with fewer cores than the profile, a benchmark that kept every core it could use busy is
    not read as a fraction of the device's.
    """

    idle_w: float
    busy_w: float
    cores: int  # the profile's: the device the figure is for
    profile: str = "?"
    threads: int | None = None  # the benchmark's threads (bench.threads); None: as many as the profile's cores

    def __post_init__(self) -> None:
        self._before = _task_ids()  # threads that exist before the model under test is loaded

    def _own(self) -> set[int] | None:
        """Return the ids of the benchmark's threads (see the class), or None where unknown."""
        now = _task_ids()
        if now is None or self._before is None:
            return None
        others = {t.native_id for t in threading.enumerate() if t is not threading.current_thread()}
        return {threading.get_native_id()} | (now - self._before - others)

    def start(self) -> None:
        """Begin measuring (call right before the timed runs, from the thread that runs them)."""
        self._wall = time.perf_counter()
        own = self._own()
        self._cpu = _thread_cpu_ns(own) if own is not None else time.process_time_ns()

    def stop(self, runs: int) -> dict[str, Any]:
        """End measuring; return the ``power`` part of a bench record, marked estimated."""
        seconds = time.perf_counter() - self._wall
        if isinstance(self._cpu, dict):
            now = _thread_cpu_ns(set(self._cpu) | (self._own() or set()))
            cpu_s = sum(ns - self._cpu.get(tid, 0) for tid, ns in now.items()) / 1e9
            whose = f"CPU time of the benchmark's {len(now)} thread(s), per-thread CPU clocks of this machine"
        else:
            cpu_s = (time.process_time_ns() - self._cpu) / 1e9
            whose = "the whole process's CPU time (threads not told apart here), process CPU clock of this machine"
        threads = self.threads or self.cores
        here = _cores_here()
        could, would = min(threads, here), min(threads, self.cores)  # cores its threads use here, and on the device
        use = min(1.0, max(0.0, cpu_s / (seconds * could))) * would / self.cores if seconds > 0 else 0.0
        over = (f"{self.cores} cores" if could == would else
                f"{could} core(s) its {threads} thread(s) could use on this machine ({here} here) x {would} of the "
                f"profile's {self.cores} cores they use on the device")
        watts = self.idle_w + (self.busy_w - self.idle_w) * use
        model = (f"idle_w + (busy_w - idle_w) x CPU use, profile {self.profile}: idle {self.idle_w} W, "
                 f"busy {self.busy_w} W, CPU use {use:.3f} ({whose} / wall time / {over})")
        return {"measured": False, "estimated": True, "sensor": None, "method": f"estimated: {model}",
                "avg_w": round(watts, 4), "energy_per_inference_mj": round(watts * seconds / max(runs, 1) * 1000, 4),
                "cpu_use": round(use, 4), "seconds": round(seconds, 3)}


def power_meter(keys: tuple[str, ...] | list[str] = DEFAULT_SENSORS, env: SensorEnv = SensorEnv(), *,
                idle_w: float | None = None, busy_w: float | None = None, cores: int | None = None,
                profile: str = "?", threads: int | None = None) -> SensorMeter | EstimateMeter | None:
    """Return a meter for the first sensor that answers, else an estimator (for the profile's ``cores``, this machine's
    where None, and a benchmark of ``threads`` threads: :class:`EstimateMeter`), else None.

    Raises:
        ValueError: an unknown sensor key.
    """
    sensor = find_sensor(keys, env)
    if sensor is not None:
        return SensorMeter(sensor)
    if idle_w is not None and busy_w is not None:
        return EstimateMeter(idle_w, busy_w, cores or _cores_here(), profile, threads)  # unknown: the cores it may use
    return None


def not_measured(keys: tuple[str, ...] | list[str] = DEFAULT_SENSORS) -> dict[str, Any]:
    """Return the ``power`` part of a bench record when there is neither a sensor nor an estimate."""
    return {"measured": False, "estimated": False, "sensor": None,
            "method": f"not measured: no power sensor answered (tried {', '.join(keys) or 'none'}) "
                      "and no idle_w/busy_w to estimate from"}


__all__ = ["DEFAULT_SENSORS", "SENSORS", "EstimateMeter", "PowerSensor", "SensorEnv", "SensorMeter",
           "find_sensor", "not_measured", "power_meter"]
