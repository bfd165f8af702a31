"""A simulated fleet for fleet-scale selection: a stated ground truth, per-device offsets, noise, outliers.

Pure simulation (no broker, no agents): a benchmark of (device, variant) returns the ground truth of
the device's profile and the variant, times the device's offset, its per-variant interaction, its
outlier factor, and measurement noise. The k-th measurement of a pair always returns the same
draw, so two procedures that measure a pair the same number of times see the same figures: the
planner and exhaustive measurement are compared on identical measurements.

Every figure is simulated; nothing here was measured on a device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge_kit.profiles import Constraints
from edge_kit.selection.fleetmodel import FleetSpec, Measurements

# Ground truth per profile and variant: (top-1 accuracy, p90 ms, average W) of a typical device.
# The accuracy bound and the p90 bound decide: the most accurate variant within the bounds wins.
TRUTH: dict[str, dict[str, tuple[float, float, float]]] = {
    "rpi4": {"fp32": (0.991, 88.0, 4.1), "fp16": (0.991, 112.0, 4.3), "dynamic-int8": (0.988, 44.0, 3.7),
             "int8": (0.985, 31.0, 3.5), "int8-pruned-50": (0.979, 22.0, 3.4), "int8-pruned-ch50": (0.974, 15.0, 3.3)},
    "rpi5": {"fp32": (0.991, 38.0, 6.3), "fp16": (0.991, 47.0, 6.6), "dynamic-int8": (0.988, 21.0, 5.9),
             "int8": (0.985, 14.0, 5.6), "int8-pruned-50": (0.979, 10.0, 5.4), "int8-pruned-ch50": (0.974, 7.0, 5.3)},
    "coral-usb": {"fp32": (0.991, 96.0, 4.6), "dynamic-int8": (0.988, 51.0, 4.1), "int8": (0.985, 33.0, 3.9),
                  "edgetpu": (0.984, 3.1, 5.2), "int8-pruned-ch50": (0.974, 16.0, 3.7)},
    "jetson-orin-nano": {"trt-fp16": (0.991, 4.6, 11.5), "trt-int8": (0.986, 2.9, 10.2), "onnx-fp32": (0.991, 14.0, 9.1),
                         "onnx-int8": (0.985, 9.0, 8.6), "fp32": (0.991, 26.0, 7.4), "int8": (0.985, 17.0, 7.0)},
}
CONSTRAINTS: dict[str, Constraints] = {
    "rpi4": Constraints(max_latency_p90_ms=50.0, min_accuracy_ratio=0.98),
    "rpi5": Constraints(max_latency_p90_ms=30.0, min_accuracy_ratio=0.98),
    "coral-usb": Constraints(max_latency_p90_ms=20.0, min_accuracy_ratio=0.98),
    "jetson-orin-nano": Constraints(max_latency_p90_ms=5.0, min_accuracy_ratio=0.98),
}
TAU = {"rpi4": 0.07, "rpi5": 0.05, "coral-usb": 0.06, "jetson-orin-nano": 0.04}  # device offsets, log sd
INTERACTION = 0.02  # device x variant, log sd
MODES = ("15W", "7W")  # Jetson power modes; the others report none


@dataclass
class SimFleet:
    """A simulated fleet: its :class:`FleetSpec`, the ground truth of every device, and counters."""

    spec: FleetSpec
    true_log_p90: np.ndarray  # (devices, variants), NaN where not a candidate
    watts: np.ndarray  # (devices, variants)
    accuracy: np.ndarray  # (profiles, variants)
    outlier: np.ndarray  # (devices,) bool
    outlier_kind: np.ndarray  # (devices,) "" | "throttled" | "unexplained" | "power mode" | "fast"
    throttled: np.ndarray  # (devices,) 0/1
    temperature: np.ndarray  # (devices,) C
    power_mode: np.ndarray  # (devices,) -1 or index into MODES
    no_conditions: np.ndarray  # (devices,) the device reports no conditions
    noise: float
    seed: int
    runs: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (devices, variants) measurements so far
    order: float = 0.0
    software: str | None = None

    def bench(self, pairs: list[tuple[int, int]] | np.ndarray, health: bool = False) -> Measurements:
        """Return one measurement per (device, variant) pair (the k-th of a pair is always the same draw)."""
        pairs = np.asarray(pairs, dtype=np.intp).reshape(-1, 2)
        d, v = pairs[:, 0], pairs[:, 1]
        k = self.runs[d, v].astype(np.int64)
        np.add.at(self.runs, (d, v), 1)
        z = _draws(self.seed, d, v, k, len(self.spec.variants))
        log_p90 = self.true_log_p90[d, v] + self.noise * z
        p90 = np.exp(log_p90)
        watts = self.watts[d, v]
        n = len(d)
        self.order += 1
        none = self.no_conditions[d]
        return Measurements(d, v, p90, watts * p90 * 0.9, watts, self.accuracy[self.spec.profile[d], v], np.full(n, np.nan),
                            np.full(n, self.order), np.where(none, np.nan, self.throttled[d]),
                            np.where(none, np.nan, self.temperature[d]), np.where(none, -1, self.power_mode[d]),
                            np.full(n, 0 if self.software else -1, dtype=np.intp), np.full(n, health), MODES,
                            (self.software,) if self.software else ())

    def exhaustive_pairs(self) -> np.ndarray:
        """Return every (device, candidate variant) pair."""
        return np.argwhere(self.spec.candidates)


def _draws(seed: int, d: np.ndarray, v: np.ndarray, k: np.ndarray, V: int) -> np.ndarray:
    """Return a standard normal per (device, variant, k), the same for the same triple and seed."""
    with np.errstate(over="ignore"):
        return _mix(seed, d, v, k, V)


def _mix(seed: int, d: np.ndarray, v: np.ndarray, k: np.ndarray, V: int) -> np.ndarray:
    """Return :func:`_draws` (splitmix64 of the triple, then Box-Muller); uint64 arithmetic wraps on purpose."""
    key = (d.astype(np.uint64) * np.uint64(V) + v.astype(np.uint64)) * np.uint64(64) + k.astype(np.uint64)
    x = key * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed) * np.uint64(0xBF58476D1CE4E5B9)
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = (x ^ (x >> np.uint64(shift))) * np.uint64(mult)
    x = x ^ (x >> np.uint64(31))
    u1 = ((x >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0 ** 53
    y = x * np.uint64(0x2545F4914F6CDD1D)
    u2 = ((y >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0 ** 53
    return np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2)


def make_fleet(devices: int = 10_000, *, noise: float = 0.05, outliers: float = 0.03, no_conditions: float = 0.0,
               profiles: tuple[str, ...] = tuple(TRUTH), seed: int = 0) -> SimFleet:
    """Return a simulated fleet of ``devices`` spread evenly over ``profiles``.

    Offsets are log-normal (``TAU`` per profile), a device-by-variant interaction ``INTERACTION``,
    noise ``noise`` (log sd of one p90). ``outliers`` of the devices differ: a quarter each
    throttled in a hot enclosure (x1.6-2.2, reports throttled and 80-90 C), slower for no reported
    reason (x1.5-2.2: a slow SD card), in another power mode (x1.6-2.0 where the profile has modes,
    else unexplained), or faster (x0.5-0.65). ``no_conditions`` of the devices report no conditions.

    Raises:
        KeyError: a profile has no ground truth in ``TRUTH``.
    """
    rng = np.random.default_rng(seed)
    variants = tuple(dict.fromkeys(v for p in profiles for v in TRUTH[p]))
    P, V, D = len(profiles), len(variants), devices
    profile = np.arange(D) % P
    cand_p = np.array([[v in TRUTH[p] for v in variants] for p in profiles])
    acc = np.array([[TRUTH[p].get(v, (np.nan,) * 3)[0] for v in variants] for p in profiles])
    p90 = np.log(np.array([[TRUTH[p].get(v, (np.nan,) * 3)[1] for v in variants] for p in profiles]))
    watts_p = np.array([[TRUTH[p].get(v, (np.nan,) * 3)[2] for v in variants] for p in profiles])
    tau = np.array([TAU[p] for p in profiles])[profile]
    log = p90[profile] + (tau * rng.standard_normal(D))[:, None] + INTERACTION * rng.standard_normal((D, V))
    is_out = rng.random(D) < outliers
    kind = np.array([""] * D, dtype=object)
    kinds = rng.integers(0, 4, D)
    has_modes = np.array([p.startswith("jetson") for p in profiles])[profile]
    throttled = np.zeros(D)
    temperature = rng.normal(52, 5, D)
    mode = np.where(has_modes, 0, -1)
    factor = np.ones(D)
    for i in np.flatnonzero(is_out):
        k = kinds[i]
        if k == 0:
            kind[i], factor[i], throttled[i], temperature[i] = "throttled", rng.uniform(1.6, 2.2), 1, rng.uniform(80, 90)
        elif k == 1 or (k == 2 and not has_modes[i]):
            kind[i], factor[i] = "unexplained", rng.uniform(1.5, 2.2)
        elif k == 2:
            kind[i], factor[i], mode[i] = "power mode", rng.uniform(1.6, 2.0), 1
        else:
            kind[i], factor[i] = "fast", rng.uniform(0.5, 0.65)
    log = log + np.log(factor)[:, None]
    cand = cand_p[profile]
    log = np.where(cand, log, np.nan)
    spec = FleetSpec(tuple(f"{profiles[profile[i]]}-{i}" for i in range(D)), profiles, variants, profile, cand,
                     tuple(CONSTRAINTS[p] for p in profiles), profile.copy(), np.where(cand_p, 1.0, np.nan),
                     np.where(cand_p, acc, np.nan)[:, variants.index("fp32")][profile] if "fp32" in variants
                     else np.full(D, np.nan), np.full(D, -1, dtype=np.intp))
    return SimFleet(spec, log, np.where(cand, watts_p[profile], np.nan), acc, is_out, kind, throttled, temperature, mode,
                    rng.random(D) < no_conditions, noise, seed, np.zeros((D, V)))


@dataclass
class Outcome:
    """What one selection procedure did on a simulated fleet."""

    chosen: np.ndarray  # (devices,) variant index, -1 undecided
    runs: int  # benchmark runs to decide (health benchmarks apart)
    health: int  # health benchmarks of switched-to variants
    flagged: np.ndarray  # (devices,) bool
    rounds: int
    plans: list = field(default_factory=list)
    plan_seconds: list[float] = field(default_factory=list)
    measurements: Measurements | None = None


def exhaustive(fleet: SimFleet, *, rounds: int = 4) -> Outcome:
    """Return the choice exhaustive measurement makes, as ``tune`` without a budget does: every candidate
    measured once on every device, decided by the same policy, the switched devices health-benchmarked
    and decided again, for ``rounds``. Uses its own counters: the planner sees the same draws."""
    from edge_kit.selection.fleetmodel import Settings

    probe = SimFleet(**{**fleet.__dict__, "runs": np.zeros_like(fleet.runs)})
    pairs = probe.exhaustive_pairs()
    out = run_planner(probe, 0, Settings(draws=0), rounds=rounds, initial=probe.bench(pairs))
    out.runs = len(pairs)
    return out


def run_planner(fleet: SimFleet, budget: float, settings=None, *, rounds: int = 4, inner: int = 8, clock=None,
                initial: Measurements | None = None) -> Outcome:
    """Return what ``tune --budget`` does on ``fleet``: plan, measure the planned pairs, plan again until the plan
    is empty or the budget spent; switch the devices whose choice changed (a health benchmark each, counted
    apart) and repeat for ``rounds``. ``clock`` (e.g. ``time.process_time``) times each planning call."""
    from dataclasses import replace

    from edge_kit.selection.fleetmodel import plan_measurements

    spec = fleet.spec
    m = Measurements(*(np.zeros(0, dtype=t) for t in (np.intp, np.intp) + (float,) * 8 + (np.intp, np.intp)),
                     np.zeros(0, bool), MODES, (fleet.software,) if fleet.software else ())
    if initial is not None:
        m = m.concat(initial)
    left, runs, health, flagged = float(budget), 0, 0, np.zeros(len(spec.devices), bool)
    out = Outcome(np.full(len(spec.devices), -1), 0, 0, flagged, 0)
    for number in range(1, rounds + 1):
        out.rounds = number
        for _ in range(inner):
            t0 = clock() if clock else 0.0
            plan = plan_measurements(replace(spec, flagged=flagged), m, budget=left, settings=settings)
            if clock:
                out.plan_seconds.append(clock() - t0)
            out.plans.append(plan)
            flagged = plan.model.flagged
            if not plan.measure:
                break
            m = m.concat(fleet.bench([(d, v) for d, v, _w in plan.measure]))
            runs += len(plan.measure)
            left -= plan.cost
        if not plan.health:
            break
        m = m.concat(fleet.bench(plan.health, health=True))
        health += len(plan.health)
        current = spec.current.copy()
        current[[d for d, _v in plan.health]] = [v for _d, v in plan.health]
        spec = replace(spec, current=current)
    out.chosen, out.runs, out.health, out.flagged, out.measurements = plan.chosen, runs, health, plan.model.flagged, m
    return out
