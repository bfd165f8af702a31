"""Selection at fleet scale: learn per profile, infer what was not measured, plan what to measure.

Pure: measurements in (arrays), a model, decisions and a measurement plan out. No clock, no I/O.

The model
---------
For a profile ``p``, a variant ``v`` and a device ``d`` of that profile, each log-scale figure
``y`` (log p90, log energy per inference, log average power) of one measurement is

    y = mu[p, v] + b[d] + x . beta[p] + e,      b[d] ~ N(0, tau[p]^2),   e ~ N(0, sigma[p]^2)

- ``mu[p, v]``: the profile's figure for the variant (pooled over the profile's devices);
- ``b[d]``: the device's offset, how it compares with its profile, shared by its variants (a
  device 10 % slower is 10 % slower on each of them);
- ``x``: the measurement's conditions as covariates, each 0 where unknown or typical:
  ``throttled`` (0/1), ``temperature`` ((t - profile median) / 10 C), ``power_mode`` (1 when not
  the profile's commonest mode), ``clock`` (log of the CPU clock over the profile's median);
  ``beta[p]`` is fitted by ridge least squares on the profile's residuals, a column only when at
  least 3 measurements set it;
- ``e``: measurement noise and the device-by-variant interaction.

Hierarchical, fitted by empirical Bayes (no sampler): ``mu`` is the median over the profile's
devices of each device's median (robust to devices that differ, and a device counts once however many
records it sends: one compromised device cannot set its profile's figures), ``sigma`` the robust (MAD) spread of each device's
measurements around its own mean, ``tau`` the robust spread of the device means less the part
noise explains (with 2 to 4 devices, the larger of that and the prior ``tau_prior``; with one, the prior). The
offset is the posterior mean, shrunk toward 0:

    b[d] = sum(residuals of d) / (n[d] + sigma^2 / tau^2),   var b[d] = 1 / (n[d] / sigma^2 + 1 / tau^2)

A device that has measured nothing gets ``b = 0``, ``var = tau^2``. Accuracy and fidelity (SNR) are
the same for every device of a profile (the same eval set): their model is the profile's median
per variant, with no offset.

An unmeasured pair is *inferred*: its figure is ``mu + b + x . beta`` with the predictive variance
``var mu + var b + sigma^2`` of one measurement (``var mu = tau^2 / devices + sigma^2 / measurements`` of the
pair in the profile); intervals are 90 % (1.645 sd) and, for the log
figures, given back in ms, mJ and W. A measured pair uses the device's own recent measurements,
never the model.

Devices that differ
-------------------
A device is *flagged* when its measurements deviate from its profile (no offset, no covariates)
by more than ``flag_z`` (4) standard deviations (``sqrt(tau^2 + sigma^2 + var mu)``, for one
measurement or for the mean of its measurements) and by more than ``flag_min_ratio`` (x1.15), in
p90 or energy, or when its accuracy differs from the profile's by more than
``accuracy_tolerance``. The covariates that explain it are named where its conditions are atypical
for the profile (throttled, 15 C above the median, another power mode, a clock 15 % off the
median). A flagged device is left
out of the pooled fit and measured individually from then on: its offset is its own (not shrunk)
and each of its unmeasured figures gets an extra ``flagged_spread`` (log sd 0.25), so the planner
measures every variant that could still be its choice.

Drift
-----
Each measurement may carry its software (runtime and version). Where the newest software of a
(profile, variant) (the one that appeared last) differs from older measurements', each device's median on the newer one is compared
with the older measurements' median, one shift per device: their median (with 2 devices, the smaller shift
when both point the same way) beyond ``drift_z`` standard errors and ``drift_min_ratio`` (x1.10) marks the older ones *stale* (left out of the
model and of the devices' measured figures, so those pairs are measured again), and every affected decision
says why; a device measured on older software since the newer one appeared still runs it: those measurements
stay its own. New software on fewer than 2 devices (however many records one device sends: a compromised one's
are its word alone): a drift check measures the pair on up to 3 devices. A profile whose only device can run
the variant is judged on that device's own measurements (2 at least on the new software): no second device
will ever confirm it.

Planning
--------
:func:`plan_measurements` chooses pairs under a budget (benchmark runs, or device-seconds with a
cost per pair): first a sample of ``sample_per_profile`` devices per profile measured on every
candidate; then re-measures (drift, contradictions); then, by Thompson sampling, the pairs where a
device's choice is uncertain. The decision is :func:`~edge_kit.selection.policy.choose_group` on
the point figures (measured, else inferred); ``draws`` (40) posterior draws of the inferred figures
are decided the same way, and a device is *confident* when at least ``confidence`` (0.95) of the
draws choose what the point figures choose. An uncertain device gets one pair a round: the
unmeasured variant chosen most often by the draws. Devices are served most uncertain first until
the budget is spent. A device is never switched on inferred figures alone: the variant it switches
to gets a health benchmark when it is activated; the plan lists those apart (``health``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_kit.profiles import Constraints
from edge_kit.selection import DEFAULT_MARGIN
from edge_kit.selection.constraints import (
    REFERENCE_VARIANTS,
    Measured,
    describe,
    overshoot,
    unjudged,
)
from edge_kit.selection.policy import (
    Decision,
    Group,
    choose_group,
    target_ranks,
)
from edgekit_protocol.labels import power_source

LOG_METRICS = ("p90_ms", "energy_mj", "avg_w")
FLAT_METRICS = ("accuracy", "snr_db")
METRICS = LOG_METRICS + FLAT_METRICS
#: The ``source`` of a decision row none of whose figures anything measured or inferred (:meth:`Plan.sources`).
NOT_MEASURED = "not measured"
COVARIATES = ("throttled", "temperature", "power_mode", "clock")
# what an undecided device's reason says to do: measure what nothing could be inferred from
MEASURE_HINT = "`edgekit tune` measures it (or `edgekit bench --device DEVICE --variant VARIANT`, one at a time)"
Z90 = 1.6448536269514722


@dataclass(frozen=True)
class Settings:
    """The planner's and the model's stated thresholds (see the module docstring)."""

    confidence: float = 0.95
    draws: int = 40
    sample_per_profile: int = 12
    flag_z: float = 4.0
    flag_min_ratio: float = 1.15
    accuracy_tolerance: float = 0.005
    flagged_spread: float = 0.25
    drift_z: float = 4.0
    drift_min_ratio: float = 1.10
    contradiction_ratio: float = 1.5
    recheck_sd: float = 2.0
    sigma_prior: float = 0.05
    tau_prior: float = 0.10
    depth: int = 5
    margin: float = DEFAULT_MARGIN
    seed: int = 0
    chunk: int = 2000


@dataclass(frozen=True)
class FleetSpec:
    """The fleet to decide for.

    ``profile`` gives each device's profile (index into ``profiles``); ``candidates`` (devices x
    variants, bool) which variants it may run; ``constraint_group`` each device's constraints (index
    into ``constraints``); ``model_mb`` (profiles x variants) each artifact's size; ``fp32_accuracy``
    one per device (NaN: unknown, the accuracy bound is not judged); ``current`` the variant each
    device runs (-1: none of these); ``flagged`` devices flagged before (they stay flagged), with
    ``flagged_why`` their reasons by device index.
    """

    devices: tuple[str, ...]
    profiles: tuple[str, ...]
    variants: tuple[str, ...]
    profile: np.ndarray
    candidates: np.ndarray
    constraints: tuple[Constraints, ...]
    constraint_group: np.ndarray
    model_mb: np.ndarray
    fp32_accuracy: np.ndarray
    current: np.ndarray
    flagged: np.ndarray | None = None
    flagged_why: dict[int, str] | None = None  # why each was flagged before (kept while nothing newer says why)
    targets: tuple[tuple[str, ...], ...] | None = None  # per profile, its targets most preferred first (ties)
    reference_id: str = REFERENCE_VARIANTS[0]  # the variant fp32_accuracy is of: the manifest's reference

    def __post_init__(self) -> None:
        """Check the shapes agree.

        Raises:
            ValueError: an array's shape does not match the devices, profiles or variants.
        """
        d, p, v = len(self.devices), len(self.profiles), len(self.variants)
        for name, arr, shape in (("profile", self.profile, (d,)), ("candidates", self.candidates, (d, v)),
                                 ("constraint_group", self.constraint_group, (d,)), ("model_mb", self.model_mb, (p, v)),
                                 ("fp32_accuracy", self.fp32_accuracy, (d,)), ("current", self.current, (d,))):
            if np.shape(arr) != shape:
                raise ValueError(f"FleetSpec.{name} has shape {np.shape(arr)}, expected {shape}")


@dataclass(frozen=True)
class Measurements:
    """Benchmark measurements, one row each (arrays of one length).

    ``device``/``variant`` index the spec; figures NaN where absent; ``order`` the receive time (or
    any number that grows with time); conditions NaN (``throttled``, ``temperature_c``) or -1
    (``power_mode``, an index into ``power_modes``) where not reported; ``software`` an index into
    ``softwares`` (-1: not reported); ``health`` marks health benchmarks after an activation;
    ``clock_mhz`` the CPU clock when the measurement started (None or NaN: not reported).
    """

    device: np.ndarray
    variant: np.ndarray
    p90_ms: np.ndarray
    energy_mj: np.ndarray
    avg_w: np.ndarray
    accuracy: np.ndarray
    snr_db: np.ndarray
    order: np.ndarray
    throttled: np.ndarray
    temperature_c: np.ndarray
    power_mode: np.ndarray
    software: np.ndarray
    health: np.ndarray
    power_modes: tuple[str, ...] = ()
    softwares: tuple[str, ...] = ()
    clock_mhz: np.ndarray | None = None

    @property
    def clock(self) -> np.ndarray:
        """Return ``clock_mhz``, NaN where (or when) it is not reported."""
        return np.full(len(self.device), np.nan) if self.clock_mhz is None else self.clock_mhz

    def __len__(self) -> int:
        """Return the number of measurements."""
        return len(self.device)

    @classmethod
    def empty(cls) -> Measurements:
        """Return a table with no rows."""
        return cls.of([])

    @classmethod
    def of(cls, rows: list[dict[str, Any]], power_modes: tuple[str, ...] = (), softwares: tuple[str, ...] = ()) -> Measurements:
        """Return the table of ``rows``, dicts with the field names (missing figures: None or absent).

        ``power_mode`` and ``software`` may be given as names; new names are added to the lists.

        Raises:
            KeyError: a row lacks ``device``, ``variant`` or ``p90_ms``.
        """
        modes, soft = list(power_modes), list(softwares)

        def code(value: Any, names: list[str]) -> int:
            """Return the index of ``value`` in ``names`` (added when new), -1 for none."""
            if value is None or (isinstance(value, (int, np.integer)) and value < 0):
                return -1
            if isinstance(value, (int, np.integer)):
                return int(value)
            if value not in names:
                names.append(value)
            return names.index(value)

        def col(name: str, default: Any = np.nan) -> np.ndarray:
            """Return column ``name`` as floats, ``default`` where a row has none."""
            return np.array([default if r.get(name) is None else r[name] for r in rows], dtype=float)

        return cls(np.array([r["device"] for r in rows], dtype=np.intp), np.array([r["variant"] for r in rows], dtype=np.intp),
                   np.array([r["p90_ms"] for r in rows], dtype=float), col("energy_mj"), col("avg_w"), col("accuracy"),
                   col("snr_db"), col("order", 0.0), col("throttled"), col("temperature_c"),
                   np.array([code(r.get("power_mode"), modes) for r in rows], dtype=np.intp),
                   np.array([code(r.get("software"), soft) for r in rows], dtype=np.intp),
                   np.array([bool(r.get("health")) for r in rows], dtype=bool), tuple(modes), tuple(soft),
                   col("clock_mhz"))

    def concat(self, other: Measurements) -> Measurements:
        """Return this table with ``other``'s rows appended (their mode and software names must match).

        Raises:
            ValueError: the two tables name power modes or software differently.
        """
        if other.power_modes[:len(self.power_modes)] != self.power_modes[:len(other.power_modes)] or \
                other.softwares[:len(self.softwares)] != self.softwares[:len(other.softwares)]:
            raise ValueError("the two tables name power modes or software differently")
        names = ("device", "variant", "p90_ms", "energy_mj", "avg_w", "accuracy", "snr_db", "order", "throttled",
                 "temperature_c", "power_mode", "software", "health")
        modes = self.power_modes if len(self.power_modes) >= len(other.power_modes) else other.power_modes
        soft = self.softwares if len(self.softwares) >= len(other.softwares) else other.softwares
        return Measurements(*(np.concatenate([getattr(self, n), getattr(other, n)]) for n in names), modes, soft,
                            np.concatenate([self.clock, other.clock]))


@dataclass
class MetricFit:
    """The fitted model of one figure (see the module docstring); arrays by profile, variant, device."""

    metric: str
    mu: np.ndarray  # (profiles, variants), NaN: no measurement
    mu_var: np.ndarray
    sigma2: np.ndarray  # (profiles,)
    tau2: np.ndarray
    beta: np.ndarray  # (profiles, covariates)
    offset: np.ndarray  # (devices,)
    offset_var: np.ndarray
    raw_z: np.ndarray  # (devices,) the largest |z| of a measurement, or of the mean, against the profile
    raw_ratio: np.ndarray  # (devices,) exp(mean deviation from the profile), log figures
    extra_var: np.ndarray | None = None  # (devices,) per-variant variance added for flagged devices


@dataclass
class FleetModel:
    """Everything :func:`fit` learned from the measurements."""

    spec: FleetSpec
    settings: Settings
    fits: dict[str, MetricFit]
    stale: np.ndarray  # (rows,) measurements superseded by a drift
    flagged: np.ndarray  # (devices,)
    flag_why: dict[int, str]
    x_device: np.ndarray  # (devices, covariates) each device's newest conditions as covariates (0: unknown/typical)
    has_conditions: np.ndarray  # (devices,)
    drift: dict[tuple[int, int], str]  # (profile, variant) -> why its older measurements are stale
    drift_check: list[tuple[int, int]]  # pairs with new software on too few devices to judge
    contradictory: dict[tuple[int, int], str]  # (device, variant) -> what disagrees
    messages: list[str]


def _median_by(keys: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """Return the median of ``values`` per key in ``range(size)``, NaN where a key has none."""
    out = np.full(size, np.nan)
    if len(keys) == 0:
        return out
    order = np.lexsort((values, keys))
    k, v = keys[order], values[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    ends = np.r_[starts[1:], len(k)]
    lo, hi = v[starts + (ends - starts - 1) // 2], v[starts + (ends - starts) // 2]
    out[k[starts]] = (lo + hi) / 2
    return out


def _device_median_by(keys: np.ndarray, devices: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """Return, per key in ``range(size)``, the median over devices of each device's median of ``values`` (NaN where
    a key has none): a device counts once however many rows it has, so one device sending many records (a
    compromised one) weighs no more in a profile's figure than any other."""
    if len(keys) == 0:
        return np.full(size, np.nan)
    width = int(devices.max()) + 1
    pairs, which = np.unique(keys.astype(np.int64) * width + devices, return_inverse=True)
    return _median_by(pairs // width, _median_by(which, values, len(pairs)), size)


def _covariates(spec: FleetSpec, m: Measurements) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Return (x per row, the profiles' typical conditions: ``temperature``, ``power_mode``, ``clock``, row has
    conditions)."""
    P = len(spec.profiles)
    prof = spec.profile[m.device] if len(m) else np.zeros(0, dtype=np.intp)
    hot = ~np.isnan(m.temperature_c)
    temp_ref = _device_median_by(prof[hot], m.device[hot], m.temperature_c[hot], P)
    mode_ref = np.full(P, -1, dtype=np.intp)
    for p in range(P):
        said = (prof == p) & (m.power_mode >= 0)
        if said.any():  # the mode most devices report (each device once per mode)
            pairs = np.unique(np.stack([m.device[said], m.power_mode[said]]), axis=1)
            mode_ref[p] = np.bincount(pairs[1]).argmax()
    x = np.zeros((len(m), len(COVARIATES)))
    x[:, 0] = np.nan_to_num(m.throttled, nan=0.0)
    x[:, 1] = np.nan_to_num((m.temperature_c - temp_ref[prof]) / 10.0, nan=0.0)
    x[:, 2] = (m.power_mode >= 0) & (m.power_mode != mode_ref[prof])
    clock = m.clock
    clock_ref = _device_median_by(prof[clock > 0], m.device[clock > 0], clock[clock > 0], P)
    with np.errstate(divide="ignore", invalid="ignore"):
        x[:, 3] = np.nan_to_num(np.log(clock / clock_ref[prof]), nan=0.0, posinf=0.0, neginf=0.0)
    has = ~np.isnan(m.throttled) | ~np.isnan(m.temperature_c) | (m.power_mode >= 0) | (clock > 0)
    return x, {"temperature": temp_ref, "power_mode": mode_ref, "clock": clock_ref}, has


def _fit_metric(spec: FleetSpec, m: Measurements, metric: str, use: np.ndarray, x: np.ndarray, excluded: np.ndarray,
                s: Settings) -> MetricFit:
    """Return the fit of one log figure (see the module docstring); ``use`` the rows it may use,
    ``excluded`` the devices left out of the pooled estimates."""
    P, V, D = len(spec.profiles), len(spec.variants), len(spec.devices)
    raw = getattr(m, metric)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(raw > 0, np.log(raw), np.nan)
    ok = use & np.isfinite(y)
    prof = spec.profile[m.device]
    pv = prof * V + m.variant
    pool = ok & ~excluded[m.device]
    mu = _device_median_by(pv[pool], m.device[pool], y[pool], P * V)
    mu = np.where(np.isnan(mu), _device_median_by(pv[ok], m.device[ok], y[ok], P * V), mu)  # only flagged devices measured it
    beta = np.zeros((P, len(COVARIATES)))
    r = y - mu[pv]
    for p in range(P):
        rows = pool & (prof == p)
        X = x[rows]
        cols = (np.count_nonzero(X, axis=0) >= 3) & (X.std(axis=0) > 0) if rows.any() else np.zeros(len(COVARIATES), bool)
        if cols.any():
            A = X[:, cols]
            beta[p, cols] = np.linalg.solve(A.T @ A + np.eye(cols.sum()), A.T @ r[rows])
    r2 = r - (x * beta[prof]).sum(axis=1)
    r2 = np.where(ok, r2, 0.0)
    n = np.bincount(m.device, weights=ok.astype(float), minlength=D)
    total = np.bincount(m.device, weights=r2, minlength=D)
    mean = np.divide(total, n, out=np.zeros(D), where=n > 0)
    sigma2 = np.full(P, s.sigma_prior ** 2)
    tau2 = np.full(P, s.tau_prior ** 2)
    for p in range(P):
        rows = pool & (prof == p) & (n[m.device] >= 2)
        if rows.sum() >= 8:
            e = np.abs(r2[rows] - mean[m.device[rows]]) * np.sqrt(n[m.device[rows]] / (n[m.device[rows]] - 1))
            typical = _device_median_by(np.zeros(len(e), dtype=np.intp), m.device[rows], e, 1)[0]  # each device once
            sigma2[p] = max((1.4826 * typical) ** 2, 1e-6)
        devs = (spec.profile == p) & (n > 0) & ~excluded
        if devs.sum() >= 2:  # with 2 to 4 devices, never narrower than the prior: their spread says too little
            md = mean[devs]
            spread = (1.4826 * np.median(np.abs(md - np.median(md)))) ** 2
            tau2[p] = max(spread - float(np.mean(sigma2[p] / n[devs])), 1e-4 if devs.sum() >= 5 else s.tau_prior ** 2)
    s2, t2 = sigma2[spec.profile], tau2[spec.profile]
    offset = total / (n + s2 / t2)
    offset_var = 1 / (n / s2 + 1 / t2)
    own = excluded & (n > 0)  # flagged devices: their own offset, not shrunk
    offset[own] = mean[own]
    offset_var[own] = s2[own] / n[own]
    extra_var = np.where(excluded, s.flagged_spread ** 2, 0.0)  # per variant: a flagged device may differ on each
    # refit the profile figures on the offset-corrected figures, robustly
    corrected = y - offset[m.device] - (x * beta[prof]).sum(axis=1)
    mu2 = _device_median_by(pv[pool], m.device[pool], corrected[pool], P * V)
    mu = np.where(np.isnan(mu2), mu, mu2)
    count = np.bincount(pv[ok], minlength=P * V).astype(float)
    width = int(m.device.max()) + 1 if len(m) else 1
    pairs = np.unique(pv[ok].astype(np.int64) * width + m.device[ok])
    devices = np.bincount(pairs // width, minlength=P * V).astype(float)
    # how the profile's devices differ is learned from devices, the noise from measurements: one device measured
    # 20 times is one device
    mu_var = np.where(count > 0, tau2.repeat(V) / np.maximum(devices, 1) + sigma2.repeat(V) / np.maximum(count, 1),
                      np.nan)
    # deviation from the profile without offset or covariates, for flagging
    dev = np.where(ok, y - mu[pv], 0.0)
    sd_one = np.sqrt(tau2[prof] + sigma2[prof] + np.nan_to_num(mu_var[pv]))
    row_z = np.where(ok, np.abs(dev) / sd_one, 0.0)
    max_z = np.zeros(D)
    np.maximum.at(max_z, m.device, row_z)
    dev_mean = np.divide(np.bincount(m.device, weights=dev, minlength=D), n, out=np.zeros(D), where=n > 0)
    sd_mean = np.sqrt(t2 + s2 / np.maximum(n, 1))
    mean_z = np.where(n > 0, np.abs(dev_mean) / sd_mean, 0.0)
    return MetricFit(metric, mu.reshape(P, V), mu_var.reshape(P, V), sigma2, tau2, beta, offset, offset_var,
                     np.maximum(max_z, mean_z), np.exp(dev_mean), extra_var)


def _flat_fit(spec: FleetSpec, m: Measurements, metric: str, use: np.ndarray, excluded: np.ndarray) -> MetricFit:
    """Return the fit of accuracy or SNR: the profile's median per variant, no offset, no covariates."""
    P, V, D = len(spec.profiles), len(spec.variants), len(spec.devices)
    y = getattr(m, metric)
    ok = use & np.isfinite(y)
    pv = spec.profile[m.device] * V + m.variant
    pool = ok & ~excluded[m.device]
    mu = _device_median_by(pv[pool], m.device[pool], y[pool], P * V)
    mu = np.where(np.isnan(mu), _device_median_by(pv[ok], m.device[ok], y[ok], P * V), mu)
    dev = np.where(ok, np.abs(y - mu[pv]), 0.0)
    worst = np.zeros(D)
    np.maximum.at(worst, m.device, np.nan_to_num(dev))
    count = np.bincount(pv[ok], minlength=P * V)
    spread = np.zeros(P * V)
    if ok.any():
        spread = np.sqrt(np.maximum(_device_median_by(pv[pool], m.device[pool], (y[pool] - mu[pv[pool]]) ** 2, P * V), 0))
    mu_var = np.where(count > 0, np.nan_to_num(spread) ** 2 + 1e-8, np.nan)
    return MetricFit(metric, mu.reshape(P, V), mu_var.reshape(P, V), np.zeros(P), np.zeros(P),
                     np.zeros((P, len(COVARIATES))), np.zeros(D), np.zeros(D), worst, np.ones(D))


def _drift(spec: FleetSpec, m: Measurements, s: Settings) -> tuple[np.ndarray, dict[tuple[int, int], str], list[tuple[int, int]]]:
    """Return (stale rows, {(profile, variant): why}, pairs to check) from the software each row ran."""
    V = len(spec.variants)
    stale = np.zeros(len(m), dtype=bool)
    why: dict[tuple[int, int], str] = {}
    check: list[tuple[int, int]] = []
    if not len(m) or not (m.software >= 0).any():
        return stale, why, check
    prof = spec.profile[m.device]
    pv = prof * V + m.variant
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(m.p90_ms > 0, np.log(m.p90_ms), np.nan)
    for key in np.unique(pv[m.software >= 0]):
        rows = (pv == key) & np.isfinite(y)
        soft = m.software[rows]
        if not (soft >= 0).any():
            continue
        # the newest software is the one that appeared last (not the one measured last: a device not yet updated,
        # measured again, would make the old software the newest and the updated devices' measurements stale)
        first = {int(sw): float(m.order[rows][soft == sw].min()) for sw in np.unique(soft[soft >= 0])}
        newest = max(first, key=lambda sw: first[sw])
        new, old = rows & (m.software == newest), rows & (m.software != newest)
        if not old.any():
            continue
        p, v = divmod(int(key), V)
        name = m.softwares[newest]
        on_new = np.unique(m.device[new])
        # one device's records are its word alone, however many it sends: 2 devices must have run the new software,
        # unless the profile has a single device that can run the variant (its word is the profile's: 2 records)
        able = int(((spec.profile == p) & spec.candidates[:, v]).sum())
        if len(on_new) < min(2, able) or new.sum() < 2:
            check.append((p, v))
            continue
        # each device's median on the new software against the older measurements' (over the profile's devices),
        # one figure per device; their median, or with 2 devices the smaller shift when both point the same way
        # (none otherwise): one device (a compromised one) can neither invent a shift nor make the others'
        # measurements stale
        before = float(_device_median_by(np.zeros(int(old.sum()), dtype=np.intp), m.device[old], y[old], 1)[0])
        # each device's median by one sort (a mask per device cost devices x rows: seconds once a fleet updated)
        shifts = [float(x) for x in _median_by(m.device[new], y[new], len(spec.devices))[on_new] - before]
        if len(shifts) != 2:
            shift = float(np.median(shifts))
        else:
            shift = min(shifts, key=abs) if shifts[0] * shifts[1] > 0 else 0.0
        spread = max(float(np.std(y[old])) if old.sum() > 2 else s.tau_prior, s.sigma_prior)
        se = 1.2533 * spread * math.sqrt(1 / new.sum() + 1 / old.sum())
        if abs(shift) > max(s.drift_z * se, math.log(s.drift_min_ratio)):
            # a device whose newest measurement of the pair is on older software, taken since the newest appeared,
            # still runs it: its measurements on that software are its own; any other device's on older software
            # are stale (measured again)
            at = np.flatnonzero(rows)
            at = at[np.lexsort((m.order[at], m.device[at]))]
            last = at[np.r_[m.device[at][1:] != m.device[at][:-1], True]]  # each device's newest row of the pair
            runs = np.full(len(spec.devices), newest)
            runs[m.device[last]] = np.where(m.order[last] > first[newest], m.software[last], newest)
            stale |= old & (m.software != runs[m.device])
            why[(p, v)] = (f"{spec.profiles[p]}/{spec.variants[v]}: p90 x{math.exp(shift):.2f} since {name} "
                           f"({int(new.sum())} measurements on {len(on_new)} devices vs {int(old.sum())} before): "
                           "measured again")
    return stale, why, check


def fit(spec: FleetSpec, m: Measurements, settings: Settings | None = None) -> FleetModel:
    """Return the fleet model of ``m`` (see the module docstring): per metric fits, flags, drift,
    contradictions, and the messages that say what could not be judged.

    Raises:
        ValueError: a measurement names a device or variant outside ``spec``.
    """
    s = settings or Settings()
    D, V = len(spec.devices), len(spec.variants)
    if len(m) and (m.device.min() < 0 or m.device.max() >= D or m.variant.min() < 0 or m.variant.max() >= V):
        raise ValueError("a measurement names a device or variant that is not in the fleet")
    messages: list[str] = []
    stale, drift, check = _drift(spec, m, s)
    use = ~stale & np.asarray(spec.candidates[m.device, m.variant], dtype=bool) if len(m) else stale
    x, refs, has_row = _covariates(spec, m)
    flagged = np.zeros(D, bool) if spec.flagged is None else np.asarray(spec.flagged, bool).copy()
    before = flagged.copy()
    why: dict[int, str] = {}
    fits: dict[str, MetricFit] = {}
    for _pass in range(2):  # fit, flag, fit again without the flagged devices
        fits = {k: _fit_metric(spec, m, k, use, x, flagged, s) for k in LOG_METRICS}
        fits.update({k: _flat_fit(spec, m, k, use, flagged) for k in FLAT_METRICS})
        for k in ("p90_ms", "energy_mj"):
            f = fits[k]
            off = (f.raw_z > s.flag_z) & (np.abs(np.log(f.raw_ratio)) > math.log(s.flag_min_ratio))
            for d in np.flatnonzero(off & (~flagged | before)):
                why[int(d)] = f"{'p90' if k == 'p90_ms' else 'energy'} x{f.raw_ratio[d]:.2f} of its profile ({f.raw_z[d]:.1f} sd)"
            flagged |= off
        acc = fits["accuracy"].raw_z > s.accuracy_tolerance
        for d in np.flatnonzero(acc & (~flagged | before)):
            why[int(d)] = f"accuracy differs from its profile's by {100 * fits['accuracy'].raw_z[d]:.2f} points"
        flagged |= acc
    # each device's newest conditions, as covariates (0 where unknown)
    x_device = np.zeros((D, len(COVARIATES)))
    has_conditions = np.zeros(D, bool)
    if len(m):
        newest = np.lexsort((m.order, m.device))
        last = newest[np.r_[m.device[newest][1:] != m.device[newest][:-1], True]]
        x_device[m.device[last]] = x[last]
        np.logical_or.at(has_conditions, m.device, has_row)
    for d, text in list(why.items()):
        why[d] = text + _explained(int(d), spec, m, fits["p90_ms"].beta, refs)
    for d in np.flatnonzero(before):
        why.setdefault(int(d), (spec.flagged_why or {}).get(int(d)) or "flagged before: measured individually")
    contradictory = _contradictions(spec, m, use, fits, s)
    for (d, v), text in contradictory.items():
        if text.endswith("flagged"):
            flagged[d] = True
            why.setdefault(d, text)
    measured_devices = np.zeros(D, bool)
    if len(m):
        measured_devices[m.device] = True
    bare = measured_devices & ~has_conditions
    if bare.any():
        names = [spec.devices[d] for d in np.flatnonzero(bare)[:5]]
        messages.append(f"{int(bare.sum())} measured device(s) report no conditions (temperature, throttling, power "
                        f"mode), e.g. {', '.join(names)}: their figures are inferred without covariates, and a "
                        "deviation is flagged without an explanation")
    for (p, v) in check:
        messages.append(f"{spec.profiles[p]}/{spec.variants[v]}: new software measured on fewer than 2 devices (a "
                        "profile's only device: fewer than 2 times): measured on up to 3 devices to check for a shift")
    return FleetModel(spec, s, fits, stale, flagged, why, x_device, has_conditions, drift, check, contradictory, messages)


def _explained(d: int, spec: FleetSpec, m: Measurements, beta: np.ndarray, refs: dict[str, np.ndarray]) -> str:
    """Return ``"; explained by ..."`` naming the device's atypical conditions, or ``"; no covariate explains it"``."""
    p = spec.profile[d]
    rows = np.flatnonzero(m.device == d)
    if not len(rows):
        return ""
    last = rows[np.argmax(m.order[rows])]
    temp_ref, mode_ref, clock_ref = refs["temperature"], refs["power_mode"], refs["clock"]
    clock = m.clock[last]
    parts = []
    if m.throttled[last] == 1:
        parts.append("throttled" + (f" (x{math.exp(beta[p, 0]):.2f} on this profile)" if beta[p, 0] else ""))
    if not np.isnan(m.temperature_c[last]) and not np.isnan(temp_ref[p]) and m.temperature_c[last] >= temp_ref[p] + 15:
        parts.append(f"temperature {m.temperature_c[last]:.0f} C (profile median {temp_ref[p]:.0f} C)")
    if m.power_mode[last] >= 0 and mode_ref[p] >= 0 and m.power_mode[last] != mode_ref[p]:
        parts.append(f"power mode {m.power_modes[m.power_mode[last]]} (profile: {m.power_modes[mode_ref[p]]})")
    if clock > 0 and clock_ref[p] > 0 and abs(math.log(clock / clock_ref[p])) >= math.log(1.15):
        parts.append(f"clock {clock:.0f} MHz (profile median {clock_ref[p]:.0f} MHz)")
    if parts:
        return "; explained by " + ", ".join(parts)
    if np.isnan(m.throttled[last]) and np.isnan(m.temperature_c[last]) and m.power_mode[last] < 0 and not clock > 0:
        return "; it reports no conditions, so no covariate can explain it"
    return "; no covariate explains it"


def _contradictions(spec: FleetSpec, m: Measurements, use: np.ndarray, fits: dict[str, MetricFit],
                    s: Settings) -> dict[tuple[int, int], str]:
    """Return {(device, variant): what disagrees} for pairs whose recent measurements contradict each other;
    the text ends with ``flagged`` when three or more still do."""
    out: dict[tuple[int, int], str] = {}
    if not len(m):
        return out
    V = len(spec.variants)
    key = m.device * V + m.variant
    rows = np.flatnonzero(use)
    counts = np.bincount(key[rows], minlength=len(spec.devices) * V)
    multi = rows[counts[key[rows]] >= 2]
    if not len(multi):
        return out
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.log(m.p90_ms[multi])
    k = key[multi]
    hi = np.full(len(counts), -np.inf)
    lo = np.full(len(counts), np.inf)
    np.maximum.at(hi, k, y)
    np.minimum.at(lo, k, y)
    ahi = np.full(len(counts), -np.inf)
    alo = np.full(len(counts), np.inf)
    acc = m.accuracy[multi]
    fin = np.isfinite(acc)
    np.maximum.at(ahi, k[fin], acc[fin])
    np.minimum.at(alo, k[fin], acc[fin])
    sigma = np.sqrt(fits["p90_ms"].sigma2[spec.profile[np.unique(k) // V]])
    for i, kk in enumerate(np.unique(k)):
        d, v = divmod(int(kk), V)
        limit = max(math.log(s.contradiction_ratio), 6 * float(sigma[i]))
        parts = []
        if hi[kk] - lo[kk] > limit:
            parts.append(f"p90 {math.exp(lo[kk]):.4g} and {math.exp(hi[kk]):.4g} ms (beyond x{math.exp(limit):.2f})")
        if ahi[kk] > alo[kk] + s.accuracy_tolerance:
            parts.append(f"accuracy {100 * alo[kk]:.2f} % and {100 * ahi[kk]:.2f} %")
        if parts:
            tail = ("still disagree after 3 measurements: the device is flagged" if counts[kk] >= 3
                    else "measured again; until then the policy judges it on its worst and best recent measurement")
            out[(d, v)] = f"{spec.devices[d]}/{spec.variants[v]}: " + " and ".join(parts) + " disagree; " + tail
    return out


@dataclass
class Figures:
    """Per device and variant, what the decision uses: (devices, variants, depth) per metric, newest
    first (NaN: none), ``measured`` (devices, variants) whether it is the device's own, and for the
    inferred ones the log-scale (or flat) mean and sd."""

    values: dict[str, np.ndarray]
    measured: np.ndarray
    mean: dict[str, np.ndarray]
    sd: dict[str, np.ndarray]


def figures(model: FleetModel, m: Measurements) -> Figures:
    """Return the figures each device's decision uses: its own recent measurements (not stale) where
    it has them, else the profile's inferred figures with their sd."""
    spec, s = model.spec, model.settings
    D, V, K = len(spec.devices), len(spec.variants), s.depth
    values = {k: np.full((D, V, K), np.nan) for k in METRICS}
    measured = np.zeros((D, V), bool)
    keep = np.flatnonzero(~model.stale & np.isfinite(m.p90_ms)) if len(m) else np.zeros(0, np.intp)
    if len(keep):
        order = keep[np.lexsort((-m.order[keep], m.variant[keep], m.device[keep]))]
        key = m.device[order] * V + m.variant[order]
        start = np.r_[True, key[1:] != key[:-1]]
        first = np.maximum.accumulate(np.where(start, np.arange(len(key)), 0))
        rank = np.arange(len(key)) - first
        sel = rank < K
        dd, vv, rr = m.device[order][sel], m.variant[order][sel], rank[sel]
        for k in METRICS:
            values[k][dd, vv, rr] = getattr(m, k)[order][sel]
        measured[dd, vv] = True
    p = spec.profile
    mean, sd = {}, {}
    for k in METRICS:
        f = model.fits[k]
        cov = (model.x_device * f.beta[p]).sum(axis=1)
        mean[k] = f.mu[p] + (f.offset + cov)[:, None]
        extra = 0.0 if f.extra_var is None else f.extra_var[:, None]
        sd[k] = np.sqrt(f.mu_var[p] + f.offset_var[:, None] + f.sigma2[p][:, None] + extra)
        point = np.exp(mean[k]) if k in LOG_METRICS else mean[k]
        values[k][:, :, 0] = np.where(measured, values[k][:, :, 0], point)
    return Figures(values, measured, mean, sd)


@dataclass
class Plan:
    """One planning round's result.

    ``measure``: (device, variant, why) pairs to benchmark, in order, within the budget; ``cost``
    what they cost. ``chosen`` (devices,) the variant index each device should run (-1: cannot be
    decided, see ``undecided``); ``confidence`` the share of posterior draws that agree (1 where every
    candidate is measured); ``switch`` where the choice differs from what the device runs: each such
    device gets a health benchmark of the chosen variant on activation (``health``, counted apart).
    ``messages`` say what could not be planned or decided, and why.
    """

    measure: list[tuple[int, int, str]]
    cost: float
    budget_left: float
    chosen: np.ndarray
    feasible: np.ndarray
    confidence: np.ndarray
    switch: np.ndarray
    health: list[tuple[int, int]]
    undecided: dict[int, str]
    messages: list[str]
    model: FleetModel
    figures: Figures
    uncertain: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def sources(self, d: int) -> list[dict[str, Any]]:
        """Return the table behind device ``d``'s decision: one row per candidate with each figure (None where
        nothing gave one), its ``source``: ``measured`` on the device, ``inferred`` from its profile (with the 90 %
        interval of each inferred figure) or ``not measured`` (nothing measured it and nothing could be inferred:
        no figure at all), never ``inferred`` for figures nothing produced.
        """
        spec, f = self.model.spec, self.figures
        rows = []
        for v in np.flatnonzero(spec.candidates[d]):
            own = bool(f.measured[d, v])
            row: dict[str, Any] = {"variant": spec.variants[v], "source": "measured" if own else "inferred",
                                   # plain bools: numpy's were written "False" by json.dumps(default=str) (truthy)
                                   "chosen": bool(self.chosen[d] == v), "current": bool(spec.current[d] == v)}
            for k in METRICS:
                value = f.values[k][d, v, 0]
                row[k] = None if np.isnan(value) else float(value)
                if not own and not np.isnan(f.mean[k][d, v]):
                    lo, hi = f.mean[k][d, v] - Z90 * f.sd[k][d, v], f.mean[k][d, v] + Z90 * f.sd[k][d, v]
                    row[f"{k}_interval"] = ([float(np.exp(lo)), float(np.exp(hi))] if k in LOG_METRICS
                                            else [float(lo), float(hi)])
            if not own and not self.inferred(d, v):
                row["source"] = NOT_MEASURED
            rows.append(row)
        return rows

    def inferred(self, d: int, v: int) -> bool:
        """Return True when device ``d`` did not measure variant ``v`` and the fleet model inferred a figure of it
        (False for one measured, or one of which nothing could be inferred: no figure at all)."""
        f = self.figures
        return not f.measured[d, v] and any(not np.isnan(f.values[k][d, v, 0]) for k in METRICS)

    def reason(self, d: int) -> str:
        """Return why device ``d`` gets its choice, in words: measured or inferred, confidence, flag, drift."""
        spec, model = self.model.spec, self.model
        if d in self.undecided:
            return self.undecided[d]
        v = int(self.chosen[d])
        cands = np.flatnonzero(spec.candidates[d])
        inferred = [spec.variants[c] for c in cands if self.inferred(d, c)]
        blank = [spec.variants[c] for c in cands if not self.figures.measured[d, c] and not self.inferred(d, c)]
        text = f"{spec.variants[v]}: " + ("every candidate measured on this device" if not inferred and not blank else
                                           f"on {'its own measurement' if self.figures.measured[d, v] else 'inferred figures'}"
                                           f" of {spec.variants[v]}; "
                                           + (f"inferred from profile {spec.profiles[spec.profile[d]]}: "
                                              f"{', '.join(inferred)}; " if inferred else "")
                                           + (f"not measured, nothing to infer from: {', '.join(blank)}; " if blank else "")
                                           + f"confidence {self.confidence[d]:.2f}")
        if not self.feasible[d]:
            text += "; infeasible: nothing meets every constraint, least violating"
        if model.flagged[d]:
            text += f"; flagged: {model.flag_why.get(d, 'differs from its profile')}"
        drift = [w for (p, _v), w in model.drift.items() if p == spec.profile[d] and spec.candidates[d, _v]]
        if drift:
            text += "; drift: " + "; ".join(drift)
        return text


def _decide(model: FleetModel, values: dict[str, np.ndarray], devices: np.ndarray,
            g_cols: np.ndarray, constraints: Constraints, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (chosen variant index into the spec's variants, feasible) for ``devices`` of one group."""
    spec = model.spec
    names = tuple(spec.variants[c] for c in g_cols)
    targets = spec.targets[spec.profile[devices[0]]] if spec.targets and len(devices) else ()
    group = Group(names, values["p90_ms"], values["energy_mj"], values["avg_w"], values["accuracy"],
                  spec.model_mb[spec.profile[devices]][:, g_cols], values["snr_db"],
                  target_ranks(names, targets) if targets else None)
    cur = np.full(len(devices), -1, dtype=np.intp)
    at = current[:, None] == g_cols[None, :]
    cur[at.any(axis=1)] = at.argmax(axis=1)[at.any(axis=1)]
    got = choose_group(group, constraints, fp32_accuracy=spec.fp32_accuracy[devices], current=cur,
                       margin=model.settings.margin)
    return np.where(got.chosen >= 0, g_cols[np.maximum(got.chosen, 0)], -1), got.feasible


def plan_measurements(spec: FleetSpec, m: Measurements, *, budget: float, cost: np.ndarray | float = 1.0,
                      settings: Settings | None = None, decide_only: bool = False) -> Plan:
    """Return one round's plan: which (device, variant) pairs to measure within ``budget``, and the
    decision each device gets from what is known now (see the module docstring for the method).

    ``decide_only`` (``select``: it has no budget and measures nothing; give ``budget`` 0): the messages say that a
    profile without measurements waits for ``edgekit tune``, not that a budget the user never gave is too small.

    ``cost`` is what one benchmark of each (profile, variant) costs in the budget's unit: 1 (benchmark
    runs, the default) or its device-seconds, an array (profiles, variants) or one number.

    Raises:
        ValueError: ``budget`` is negative, or a measurement names a device or variant not in ``spec``.
    """
    if budget < 0 or not math.isfinite(budget):
        raise ValueError(f"the budget must be a finite number >= 0, not {budget}")
    s = settings or Settings()
    model = fit(spec, m, s)
    fig = figures(model, m)
    P, V, D = len(spec.profiles), len(spec.variants), len(spec.devices)
    unit = np.broadcast_to(np.asarray(cost, dtype=float), (P, V))
    rng = np.random.default_rng(s.seed)
    messages = list(model.messages)
    undecided: dict[int, str] = {}
    measure: list[tuple[int, int, str]] = []
    planned = np.zeros((D, V), bool)
    left = float(budget)

    def take(d: int, v: int, why: str) -> bool:
        """Plan measuring (d, v); return False when it is planned already or the budget cannot pay for it."""
        nonlocal left
        c = float(unit[spec.profile[d], v])
        if planned[d, v] or c > left + 1e-9:
            return False
        planned[d, v] = True
        measure.append((d, v, why))
        left -= c
        return True

    # 1. a sample of devices per profile, measured on every candidate
    cand = np.asarray(spec.candidates, bool)
    full = (fig.measured | ~cand).all(axis=1)
    no_model = np.zeros(P, bool)
    one_each = 0.0
    needs: list[tuple[int, np.ndarray]] = []
    for p in range(P):
        devs = np.flatnonzero(spec.profile == p)
        if not len(devs):
            continue
        have = int(full[devs].sum())
        want = min(len(devs), s.sample_per_profile) - have
        measured_any = fig.measured[devs].any()
        if not measured_any:
            no_model[p] = True
        if want <= 0:
            continue
        rest = devs[~full[devs] & ~model.flagged[devs]]
        # cheapest first: devices that already measured most, then at random
        done = fig.measured[rest].sum(axis=1)
        rest = rest[np.lexsort((rng.random(len(rest)), -done))][:want]
        needs.append((p, rest))
        if not measured_any and len(rest):
            one_each += float((unit[p] * (cand[rest[0]] & ~fig.measured[rest[0]])).sum())
    if one_each > budget and not decide_only:
        messages.append(f"the budget ({budget:g}) is less than the {one_each:g} it takes to measure one device on "
                        "every candidate of each profile that has no measurements yet; profiles left without "
                        "measurements cannot be decided")
    for i in range(max([len(rest) for _p, rest in needs] or [0])):  # one device of each profile, then a second...
        for p, rest in needs:
            if i < len(rest):
                d = int(rest[i])
                for v in np.flatnonzero(cand[d] & ~fig.measured[d]):
                    take(d, int(v), "sample")
    for p in np.flatnonzero(no_model):
        sampled = [d for d, _v, w in measure if w == "sample" and spec.profile[d] == p]
        messages.append(f"profile {spec.profiles[p]}: no measurements yet; " +
                        (f"sampling {len(set(sampled))} device(s) this round; its devices are decided once they are in"
                         if sampled else f"its devices cannot be decided: {MEASURE_HINT}" if decide_only
                         else "the budget leaves none to sample it: its devices cannot be decided"))
        for d in np.flatnonzero(spec.profile == p):
            undecided[int(d)] = (f"profile {spec.profiles[p]} has no measurements yet: nothing to infer its figures from; "
                                 f"{MEASURE_HINT}")

    # 2. drift checks and re-measures of contradictions
    for p, v in model.drift_check:
        devs = np.flatnonzero((spec.profile == p) & cand[:, v])
        for d in devs[:3]:
            take(int(d), int(v), "drift check")
    for (d, v), text in model.contradictory.items():
        if not text.endswith("flagged"):
            take(d, v, "contradictory")
        messages.append(text)

    # 3. decide, and find where the choice is uncertain (Thompson draws)
    chosen = np.full(D, -1, dtype=np.intp)
    feasible = np.zeros(D, bool)
    confidence = np.ones(D)
    pick = np.full(D, -1, dtype=np.intp)  # the unmeasured variant the draws choose most often
    orders = list(dict.fromkeys(spec.targets or ()))  # devices decided together share their targets' order too
    prefers = np.array([orders.index(spec.targets[p]) for p in spec.profile] if spec.targets else np.zeros(D),
                       dtype=np.intp)
    keys = np.unique(np.c_[np.packbits(cand, axis=1), spec.constraint_group, prefers], axis=0,
                     return_inverse=True)[1].ravel()
    nan_mu = np.isnan(model.fits["p90_ms"].mu)
    for g in np.unique(keys):
        devs = np.flatnonzero((keys == g) & ~no_model[spec.profile])
        if not len(devs):
            continue
        cols = np.flatnonzero(cand[devs[0]])
        missing = nan_mu[spec.profile[devs]][:, cols] & ~fig.measured[devs][:, cols]
        bad = missing.any(axis=1)
        for d in devs[bad]:
            names = [spec.variants[c] for c in cols if nan_mu[spec.profile[d], c] and not fig.measured[d, c]]
            undecided[int(d)] = (f"no device of profile {spec.profiles[spec.profile[d]]} has measured "
                                 f"{', '.join(names)} yet: nothing to infer it from; {MEASURE_HINT}")
        devs = devs[~bad]
        constraints = spec.constraints[spec.constraint_group[devs[0]]] if len(devs) else None
        for start in range(0, len(devs), s.chunk):
            part = devs[start:start + s.chunk]
            vals = {k: fig.values[k][part][:, cols] for k in METRICS}
            best, ok = _decide(model, vals, part, cols, constraints, spec.current[part])
            chosen[part], feasible[part] = best, ok
            open_ = ~fig.measured[part][:, cols]
            some = np.flatnonzero(open_.any(axis=1))
            if not len(some) or s.draws <= 0:
                continue
            sub = part[some]
            n, S = len(sub), s.draws
            drawn = {}
            z_dev = rng.standard_normal((S, n, 1))
            for k in METRICS:
                mean, sd = fig.mean[k][sub][:, cols], fig.sd[k][sub][:, cols]
                if k in LOG_METRICS:
                    f = model.fits[k]
                    shared = np.sqrt(f.offset_var[sub])[:, None]  # the device's offset: one draw for its variants
                    own = np.sqrt(np.maximum(sd ** 2 - shared ** 2, 0))
                    sample = mean[None] + shared[None] * z_dev + own[None] * rng.standard_normal((S, n, len(cols)))
                    sample = np.exp(sample)
                else:
                    sample = mean[None] + sd[None] * rng.standard_normal((S, n, len(cols)))
                base = np.broadcast_to(vals[k][some][None], (S, n, len(cols), s.depth)).copy()
                base[:, :, :, 0] = np.where(open_[some][None], sample, base[:, :, :, 0])
                drawn[k] = base.reshape(S * n, len(cols), s.depth)
            picks, _ok = _decide(model, drawn, np.tile(sub, S), cols, constraints, np.tile(spec.current[sub], S))
            picks = picks.reshape(S, n)
            confidence[sub] = (picks == chosen[sub][None]).mean(axis=0)
            freq = np.stack([(picks == c).sum(axis=0) for c in cols], axis=1).astype(float)
            freq[~open_[some]] = -1  # only unmeasured variants are worth measuring
            freq[freq == 0] = -1
            best_open = freq.argmax(axis=1)
            pick[sub] = np.where(freq.max(axis=1) > 0, cols[best_open], -1)
    for d in undecided:
        chosen[d] = -1

    # 4. the uncertain devices, most uncertain first (flagged ones first among equals), one pair each
    uncertain = (confidence < s.confidence) & (pick >= 0) & (chosen >= 0)
    # a device that has measured nothing yet and will switch gets its health benchmark first: free
    # information about its offset, so the budget is spent where that has not settled the choice
    deferred = uncertain & ~fig.measured.any(axis=1) & (chosen != spec.current)
    uncertain &= ~deferred
    order = np.flatnonzero(uncertain)
    order = order[np.lexsort((~model.flagged[order], confidence[order]))]
    skipped = 0
    for d in order:
        if not take(int(d), int(pick[d]), "flagged" if model.flagged[d] else "uncertain"):
            skipped += 1
    # 5. a chosen figure measured once, within ``recheck_sd`` of its p90 bound: measured again before it is
    #    relied on (the next measurement, e.g. the health benchmark, may land on the other side)
    runs = (~np.isnan(fig.values["p90_ms"])).sum(axis=2)
    bound = np.array([np.nan if c.max_latency_p90_ms is None else c.max_latency_p90_ms for c in spec.constraints])
    bound = bound[spec.constraint_group]
    at = np.maximum(chosen, 0)
    value = fig.values["p90_ms"][np.arange(D), at, 0]
    sigma = np.sqrt(model.fits["p90_ms"].sigma2[spec.profile])
    with np.errstate(invalid="ignore", divide="ignore"):
        near = (chosen >= 0) & fig.measured[np.arange(D), at] & (runs[np.arange(D), at] == 1) & \
            (np.abs(np.log(value / bound)) < s.recheck_sd * sigma)
    for d in np.flatnonzero(near & ~uncertain):
        if not take(int(d), int(chosen[d]), "near its bound"):
            skipped += 1
    if skipped:
        messages.append(f"budget spent: {skipped} device(s) whose choice is still below confidence "
                        f"{s.confidence:.2f} are decided on what is known (their confidence is in the plan)")
    switch = (chosen >= 0) & (chosen != spec.current)
    health = [(int(d), int(chosen[d])) for d in np.flatnonzero(switch)]
    return Plan(measure, float(budget) - left, left, chosen, feasible, confidence, switch, health, undecided, messages,
                model, fig, uncertain)


def violated(plan: Plan, d: int) -> list[str]:
    """Return the bounds device ``d``'s chosen variant breaks on the figures its decision used, in words."""
    spec = plan.model.spec
    v = int(plan.chosen[d])
    if v < 0:
        return []
    c = spec.constraints[spec.constraint_group[d]]
    f = plan.figures.values
    shares = overshoot(c, f["p90_ms"][d, v, 0], f["avg_w"][d, v, 0], spec.model_mb[spec.profile[d], v],
                       f["accuracy"][d, v, 0], spec.fp32_accuracy[d], f["snr_db"][d, v, 0])
    return [describe(k, c, spec.reference_id) for k, (broken, _share) in shares.items() if bool(broken)]


KIND = "fleet selection"


@dataclass
class FleetDecision(Decision):
    """A :class:`~edge_kit.selection.policy.Decision` made by the fleet model: its table rows say, per
    figure, ``source`` (``measured`` on the device, or ``inferred`` from its profile) and for an
    inferred figure its 90 % interval (``<figure>_interval``)."""

    kind: str = KIND
    confidence: float | None = 1.0  # None when nothing was chosen (undecided): no choice to be confident in
    flagged: str | None = None  # why the device differs from its profile; None: it does not
    inferred: list[str] = field(default_factory=list)  # variants whose figures are inferred
    drift: list[str] = field(default_factory=list)


def decisions_of(plan: Plan, sha256: dict[str, str], devices: list[int] | None = None,
                 records: list[dict[str, Any]] | None = None) -> list[FleetDecision]:
    """Return one :class:`FleetDecision` per device (``devices``: indices, default all), with the table
    behind it; ``sha256`` maps a variant id to its artifact's hash.

    ``records`` are the bench records the measurements came from, oldest first: a measured row's
    ``power_source`` is the newest one's label (the sensor's key, ``estimated`` or ``not measured``, as
    the per-device policy says it), None without them; an inferred row's is ``inferred from <labels>`` (the
    sources of the power figures its profile pooled for that variant, e.g. ``inferred from estimated``), or
    ``inferred`` without them.
    """
    spec = plan.model.spec
    labels: dict[tuple[Any, Any], str] = {}
    profile_of = {name: int(spec.profile[i]) for i, name in enumerate(spec.devices)}
    pooled: dict[tuple[int, Any], set[str]] = {}  # (profile, sha256): the power sources the profile's figures pooled
    for r in records or ():
        if isinstance(r.get("power"), dict):
            label = power_source(r["power"])
            labels[(r.get("device"), r.get("sha256"))] = label
            if r.get("device") in profile_of and label != "not measured":
                pooled.setdefault((profile_of[r["device"]], r.get("sha256")), set()).add(label)
    out = []
    for d in range(len(spec.devices)) if devices is None else devices:
        v = int(plan.chosen[d])
        current = int(spec.current[d])
        table = []
        for row in plan.sources(d):
            vi = spec.variants.index(row["variant"])
            table.append({**row, "sha256": sha256.get(row["variant"]), "measured": row["source"] == "measured",
                          "runs": int((~np.isnan(plan.figures.values["p90_ms"][d, vi])).sum()) if row["source"] == "measured" else 0,
                          "power_source": (labels.get((spec.devices[d], sha256.get(row["variant"])))
                                           if row["source"] == "measured" else NOT_MEASURED
                                           if row["source"] == NOT_MEASURED else _inferred_power(
                                               pooled.get((int(spec.profile[d]), sha256.get(row["variant"]))))),
                          "model_mb": float(spec.model_mb[spec.profile[d], vi]),
                          "violates": _row_violates(plan, d, vi), "unjudged": unjudged_bounds(plan, d, vi)})
        drift = [w for (p, dv), w in plan.model.drift.items() if p == spec.profile[d] and spec.candidates[d, dv]]
        feasible = bool(plan.feasible[d]) if v >= 0 else False
        blind = next((r["unjudged"] for r in table if r["variant"] == spec.variants[v]), []) if v >= 0 else []
        reason = plan.reason(d) + (f"; not judged (no figure for it): {', '.join(blind)}" if blind else "")
        out.append(FleetDecision(
            spec.devices[d], spec.variants[v] if v >= 0 else None, sha256.get(spec.variants[v]) if v >= 0 else None,
            spec.variants[current] if current >= 0 else None, feasible, bool(plan.switch[d]), reason,
            [spec.variants[c] for c in np.flatnonzero(spec.candidates[d]) if not plan.figures.measured[d, c]] if v < 0 else [],
            [] if feasible or v < 0 else violated(plan, d), table, confidence=float(plan.confidence[d]) if v >= 0 else None,
            flagged=plan.model.flag_why.get(d, "differs from its profile") if plan.model.flagged[d] else None,
            unjudged=blind, inferred=[r["variant"] for r in table if r["source"] == "inferred"], drift=drift))
    return out


def _inferred_power(sources: set[str] | None) -> str:
    """Return an inferred row's ``power_source``: ``inferred from <the sources the profile's power figures came
    from>`` (sensor keys, ``estimated``), so an inference from estimates never reads as one from sensors;
    ``inferred`` when unknown (no records given, or none with a power figure)."""
    return f"inferred from {', '.join(sorted(sources))}" if sources else "inferred"


def unjudged_bounds(plan: Plan, d: int, v: int) -> list[str]:
    """Return, in words, the bounds of device ``d`` that variant ``v``'s figures (measured or inferred) cannot be
    judged on for lack of a figure (:func:`~edge_kit.selection.constraints.unjudged`: no power, accuracy or
    SNR figure anywhere in the profile); such a bound is not met, it is unknown, and the decision says so."""
    spec, f = plan.model.spec, plan.figures.values

    def known(x: Any) -> float | None:
        return None if np.isnan(x) else float(x)

    m = Measured(spec.variants[v], float(f["p90_ms"][d, v, 0]), known(f["avg_w"][d, v, 0]), known(f["energy_mj"][d, v, 0]),
                 "measured" if plan.figures.measured[d, v] else "inferred", known(f["accuracy"][d, v, 0]),
                 float(spec.model_mb[spec.profile[d], v]), known(f["snr_db"][d, v, 0]))
    return unjudged(spec.constraints[spec.constraint_group[d]], m, known(spec.fp32_accuracy[d]), spec.reference_id)


def _row_violates(plan: Plan, d: int, v: int) -> list[str]:
    """Return the bounds variant ``v`` breaks on device ``d``'s figures (measured or inferred), in words."""
    chosen = plan.chosen[d]
    try:
        plan.chosen[d] = v
        return violated(plan, d)
    finally:
        plan.chosen[d] = chosen


def rows_from_records(records: list[dict], device_index: dict[str, int], variant_of: dict[tuple[int, str], int]) -> list[dict]:
    """Return :meth:`Measurements.of` rows from ``edgekit.bench/1`` records, oldest first as given.

    ``device_index`` maps a device name to its index; ``variant_of`` maps (device index, sha256) to a
    candidate variant's index. Records of other devices or artifacts are left out. Conditions are
    read from the record's ``conditions.start`` (throttling flags, temperature, CPU clock, the Jetson
    power mode's name where the device reports one); the software is the record's runtime and its version.
    No schema checks conditions: a temperature or clock that is not a plausible number (text, a bool,
    1e300 C, a negative clock) and a power mode that is not a name count as not reported.
    """
    rows = []
    for i, r in enumerate(records):
        d = device_index.get(r.get("device"))
        v = variant_of.get((d, r.get("sha256"))) if d is not None else None
        p90 = (r.get("latency_ms") or {}).get("p90")
        if v is None or p90 is None:
            continue
        power, acc, fid = r.get("power") or {}, r.get("accuracy") or {}, r.get("fidelity") or {}
        cond = (r.get("conditions") or {}).get("start") if isinstance(r.get("conditions"), dict) else None
        cond = cond if isinstance(cond, dict) else {}
        thr = cond.get("throttling")
        throttled = None if not isinstance(thr, dict) else float(bool(thr.get("throttled") or thr.get("freq_capped")))
        mode = cond.get("power_mode")  # the agent reports {"name": "15W", "id": 0} on a Jetson (nvpmodel -q)
        mode = mode.get("name") if isinstance(mode, dict) else mode
        runtime = r.get("runtime")
        rows.append({"device": d, "variant": v, "p90_ms": p90, "energy_mj": power.get("energy_per_inference_mj"),
                     "avg_w": power.get("avg_w"), "accuracy": acc.get("value"), "snr_db": fid.get("snr_db"),
                     "order": float(i), "throttled": throttled,
                     "temperature_c": _plausible(cond.get("temperature_c"), -100.0, 250.0),
                     "clock_mhz": _plausible(cond.get("cpu_freq_mhz"), 1.0, 100_000.0),
                     "power_mode": mode if isinstance(mode, str) else None,
                     "software": f"{runtime} {r.get('runtime_version')}" if runtime else None,
                     "health": bool(r.get("health"))})
    return rows


def _plausible(value: Any, lo: float, hi: float) -> float | None:
    """Return ``value`` when it is a real number (not a bool) within ``lo..hi``, else None (not reported)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        return None
    return float(value)
