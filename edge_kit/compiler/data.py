"""Calibration, training and evaluation data on the host.

The file format is checked by :func:`edgekit_protocol.datafile.read_data` (shared with the agent); this
module adds the compiler's rules (calibration sample counts) and the hash the manifest records.
Everything is checked before any conversion starts, so a mismatch costs seconds, not minutes.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_kit.errors import InputError
from edge_kit.fsutil import sha256_file
from edgekit_protocol.datafile import read_data

MIN_CALIBRATION = 10  # fewer cannot give usable activation ranges
WARN_CALIBRATION = 100  # TensorFlow's guidance is a few hundred representative samples


@dataclass(frozen=True)
class Dataset:
    path: Path
    sha256: str
    x: dict[str, np.ndarray]  # input name -> float32 samples
    labels: dict[str, np.ndarray]  # "y" or the key after "y." -> array

    def __len__(self) -> int:
        return len(next(iter(self.x.values()))) if self.x else 0

    def record(self) -> dict[str, object]:
        """Return the manifest entry: where the data came from and how much there was."""
        return {"path": str(self.path), "sha256": self.sha256, "samples": len(self)}


FLOAT32_EXACT = 2**24  # every whole number up to this is exact in float32; above it, ids sent as floats change


def id_range(dtype: str) -> tuple[int, int] | None:
    """Return the whole numbers ``(low, high)`` an input declared ``dtype`` (a numpy name) takes from float32 data
    exactly: the type's own range within +-:data:`FLOAT32_EXACT` (``bool``: 0..1); None for a float type."""
    try:
        kind = np.dtype(dtype).kind
    except TypeError:
        return None
    if kind == "b":
        return 0, 1
    if kind not in "iu":
        return None
    info = np.iinfo(dtype)
    return max(int(info.min), -FLOAT32_EXACT), min(int(info.max), FLOAT32_EXACT)


def id_inputs(types: dict[str, str]) -> list[str]:
    """Return the names of the inputs ``types`` (input name -> numpy type name, as
    :attr:`edge_kit.compiler.sources.Source.input_types`) declares integer or boolean: token ids, which every variant
    takes as float32 and must carry exactly (a float64 or float16 input is a float input like any other)."""
    return [name for name, dtype in types.items() if id_range(dtype) is not None]


def check_ids(path: Path, role: str, name: str, key: str, x: np.ndarray, dtype: str) -> None:
    """Refuse values of an integer or boolean input (token ids) that the cast inside the model would change: not
    whole, or outside :func:`id_range` of its type. ``x`` holds the values as the file stores them (float32 would
    already have changed 2^24 + 1). Returns nothing.

    Raises:
        InputError: naming the file, key, first bad index, the input's type and the range it takes.
    """
    span = id_range(dtype)
    if span is None or not x.size:
        return
    low, high = span
    x = x.astype(np.int8) if x.dtype.kind == "b" else x
    bad = (x != np.round(x)) | (x < low) | (x > high)
    if bad.any():
        where = [int(i) for i in np.unravel_index(int(np.argmax(bad)), x.shape)]
        raise InputError(f"{path}: --{role} key '{key}' holds {float(x[tuple(where)]):.9g} at index {where}, but input "
                         f"'{name}' is {dtype} (ids, sent as float32 and cast inside the model): give whole numbers "
                         f"in {low}..{high}")


def load_dataset(path: Path, role: str, inputs: dict[str, tuple[int, ...]], *, labels: bool,
                 types: dict[str, str] | None = None) -> Dataset:
    """Load and check a data file for one role (``calib``, ``eval``, ``train``).

    ``inputs`` are the model's inputs, ``{name: shape of one sample}``; the keys the file needs are
    in :mod:`edgekit_protocol.datafile`. Inputs are cast to float32. ``types`` name the declared type
    of inputs that are not float32 (:attr:`edge_kit.compiler.sources.Source.input_types`): an integer
    or boolean one's values are checked by :func:`check_ids`. With ``labels``, some ``y`` or
    ``y.<key>`` must be there (which ones, the task's check says).

    Returns:
        The loaded :class:`Dataset`.

    Raises:
        InputError: the file is missing or not an ``.npz``, lacks an input (or labels), has samples
            of the wrong shape, holds NaN or infinity (a ``DataFileError``) or an input value beyond
            float32's range, an integer input's value that is not a whole number its type takes exactly from
            float32 (:func:`check_ids`), has no samples, or (calibration) fewer than ten samples.
    """
    path = Path(path)
    data = read_data(path, f"--{role}", inputs, labels="required" if labels else "ignored")
    x = {}
    for name, a in data.x.items():
        with np.errstate(over="ignore"):
            x[name] = np.asarray(a, dtype=np.float32)
        if not np.isfinite(x[name]).all():  # finite in the file's float64, infinite as the float32 models take
            bad = [int(i) for i in np.unravel_index(int(np.argmin(np.isfinite(x[name]))), x[name].shape)]
            raise InputError(f"{path}: --{role} key '{a.key}' holds {np.asarray(a)[tuple(bad)]:.3g} at index {bad}, "
                             "beyond float32's range (3.4e38), which the model takes; clean or drop that sample")
        # the values as the file stores them: 2^24 + 1 is 2^24 once float32
        check_ids(path, role, name, a.key, np.asarray(a), (types or {}).get(name, "float32"))
    if data.samples == 0:  # an empty set would pass for an absent one: no accuracy, no fidelity, no fine-tuning
        raise InputError(f"{path}: --{role} has no samples (the first axis of its arrays is 0); save at least one "
                         "sample per array, or leave the option out")
    if role == "calib":
        if data.samples < MIN_CALIBRATION:
            raise InputError(f"{path}: only {data.samples} calibration samples; need at least {MIN_CALIBRATION} (a few hundred is best)")
        if data.samples < WARN_CALIBRATION:
            warnings.warn(f"{path}: only {data.samples} calibration samples; int8 ranges may be poor below {WARN_CALIBRATION}", stacklevel=2)
    return Dataset(path=path, sha256=sha256_file(path), x=x,
                   labels={k: np.asarray(a) for k, a in data.labels.items()})


NOISE_CORRELATION = 0.3  # natural images: neighbouring pixels correlate at 0.8-0.99; i.i.d. noise at ~0


def noise_warning(data: Dataset) -> str | None:
    """Return a warning when an image input of calibration data looks like noise, else None.

    For each input shaped like an image (``[H, W]``, ``[H, W, C]`` or, as ONNX models take them,
    ``[C, H, W]`` with 1 to 4 channels; both sides at least 8), the Pearson correlation of
    horizontally neighbouring values over the samples is computed; real photographs correlate
    strongly, random data does not, and int8 ranges calibrated on noise are what makes a quantized
    model compute something else.
    """
    for name, x in data.x.items():
        if x.ndim == 4 and x.shape[1] <= 4 < min(x.shape[2:]) and x.shape[3] > 4:  # channels-first (NCHW)
            x = np.moveaxis(x, 1, -1)
        if x.ndim not in (3, 4) or min(x.shape[1:3]) < 8 or len(x) == 0:
            continue
        sample = x[: min(len(x), 64)]
        left, right = sample[:, :, :-1].ravel().astype(np.float64), sample[:, :, 1:].ravel().astype(np.float64)
        if left.std() == 0 or right.std() == 0:
            continue
        corr = float(np.corrcoef(left, right)[0, 1])
        if corr < NOISE_CORRELATION:
            return (f"{data.path}: calibration input '{name}' looks like noise (neighbouring pixels correlate at "
                    f"{corr:.2f}; real images at 0.8 or more): int8 ranges calibrated on it will not fit real "
                    "inputs; calibrate on a few hundred real samples")
    return None


def shared_samples(data: Dataset, evalset: Dataset) -> int:
    """Return how many samples of ``data`` are also in ``evalset``: every input byte-identical (as float32).

    Calibrating or fine-tuning on eval samples flatters the accuracy measured on them.
    """
    def digests(d: Dataset) -> list[bytes]:
        names = sorted(d.x)
        return [hashlib.blake2b(b"".join(np.ascontiguousarray(d.x[n][i]).tobytes() for n in names),
                                digest_size=16).digest() for i in range(len(d))]

    if sorted(data.x) != sorted(evalset.x):
        return 0
    held = set(digests(evalset))
    return sum(d in held for d in digests(data))


def leak_warning(data: Dataset, role: str, evalset: Dataset, shared: int) -> str | None:
    """Return the warning for ``shared`` samples of ``data`` (``calib`` or ``train``) found in ``evalset``, else None."""
    if not shared:
        return None
    what = ("int8 activation ranges fitted to the eval inputs flatter the int8 accuracy measured on them"
            if role == "calib" else "the pruned variants are fine-tuned on eval samples, which flatters their accuracy")
    return (f"{data.path}: {shared} of the {len(data)} --{role} samples are also in --eval {evalset.path.name}: {what}; "
            f"take --{role} from data held out from --eval (e.g. the training split)")


OUT_OF_RANGE_SHARE = 0.01  # eval values outside the calibrated range, above which int8 inputs visibly clip


def range_warning(calib: Dataset, evalset: Dataset, types: dict[str, str] | None = None) -> str | None:
    """Return a warning when an input of ``evalset`` takes values outside the range ``calib`` spans, else None.

    A full-integer model quantizes its input with the scale and zero point fitted to ``calib``; an eval
    (or field) input beyond that range is clipped, e.g. eval images in 0..255 for a model calibrated
    on 0..1 (a preprocessing step applied to one file and not the other). More than
    :data:`OUT_OF_RANGE_SHARE` of an input's values beyond the range (plus 1 % of its width) warns.
    An integer or boolean input (``types``, as :func:`load_dataset` takes them: token ids) is not judged: every
    variant takes it unquantized (:func:`edge_kit.compiler.tflite_edit.float_id_inputs`), so nothing clips an id
    the calibration did not hold.
    """
    for name, c in calib.x.items():
        e = evalset.x.get(name)
        if e is None or not c.size or not e.size or id_range((types or {}).get(name, "float32")) is not None:
            continue
        lo, hi = float(c.min()), float(c.max())
        slack = 0.01 * (hi - lo)
        outside = float(np.mean((e < lo - slack) | (e > hi + slack)))
        if outside > OUT_OF_RANGE_SHARE:
            return (f"{evalset.path}: {outside:.1%} of --eval input '{name}' lies outside the range of --calib "
                    f"{calib.path.name} ({lo:.4g}..{hi:.4g}; --eval spans {float(e.min()):.4g}..{float(e.max()):.4g}): "
                    "int8 variants clip it to the calibrated range; preprocess both files the same way")
    return None


RANDOM_SAMPLES = 4  # without --eval or --calib: this many random inputs check a conversion and measure every
# variant's fidelity, said so in the manifest
RANDOM_SAID = "random samples (no --eval or --calib given)"  # how the manifest names them (random_inputs, is_random)
MIN_RANDOM_KEPT = 0.5  # the share of the random samples the reference must give finite outputs on to be compared on
RANDOM_UNIFORM = 2  # of them, for a float input: this many uniform in [0, 1), then standard normal ones in pairs z, -z
DEFAULT_ID_COUNT = 100  # an integer input indexing no table edge-kit reads the size of: ids 0..99


def random_inputs(inputs: dict[str, tuple[int, ...]], types: dict[str, str],
                  bounds: dict[str, tuple[int, str]] | None = None) -> tuple[dict[str, np.ndarray], str]:
    """Return :data:`RANDOM_SAMPLES` random float32 samples per input (seeded: the same every compile) and what they
    are, for the manifest: a float input :data:`RANDOM_UNIFORM` samples uniform in [0, 1) (pixels scaled to 0..1),
    then standard normal samples, each followed by its negation (inputs normalized to mean 0: negative values, and
    both signs of any weighted sum of the input, so both branches of an ``If`` on such a sign, are among them); an
    integer or boolean one (``types``) whole numbers uniform over the ids it takes, which [0, 1) would make all 0:
    ``bounds[name]`` = (count, why) when the model says how many (an embedding's rows), else ``uint8`` 0..255,
    ``bool`` 0..1, other types 0..:data:`DEFAULT_ID_COUNT`-1, each within :func:`id_range` of its type."""
    rng = np.random.default_rng(0)
    xs: dict[str, np.ndarray] = {}
    said: list[str] = []
    pairs = (RANDOM_SAMPLES - RANDOM_UNIFORM) // 2  # RANDOM_SAMPLES - RANDOM_UNIFORM is even
    for name, shape in inputs.items():
        span = id_range(types.get(name, "float32"))
        # drawn a sample at a time into float32: numpy draws float64 (int64), and the whole draw, its copies and its
        # cast at once took over 4 times the samples' size (9 GiB for an input at MAX_SAMPLE_VALUES); the same values
        x = xs[name] = np.empty((RANDOM_SAMPLES, *shape), np.float32)
        if span is None:
            for k in range(pairs):  # z1, -z1, z2, -z2, ... after the uniform ones
                x[RANDOM_UNIFORM + 2 * k] = rng.standard_normal(shape)
                np.negative(x[RANDOM_UNIFORM + 2 * k], out=x[RANDOM_UNIFORM + 2 * k + 1])
            for k in range(RANDOM_UNIFORM):
                x[k] = rng.uniform(0, 1, shape)
            said.append(f"'{name}' {RANDOM_UNIFORM} uniform in [0, 1), then {pairs} standard normal and its negation")
            continue
        dtype = types[name]
        if bounds and name in bounds:
            high, why = bounds[name][0] - 1, bounds[name][1]
        elif dtype in ("uint8", "bool"):
            high, why = span[1], f"the range of {dtype}"
        else:
            high, why = (DEFAULT_ID_COUNT - 1, f"no table size read from the model: edge-kit's default for {dtype} ids; "
                         "give --eval with real ones")
        high = max(min(high, span[1]), span[0])
        low = max(0, span[0]) if high >= 0 else span[0]
        for k in range(RANDOM_SAMPLES):
            x[k] = rng.integers(low, high, shape, endpoint=True)
        said.append(f"'{name}' whole numbers uniform in {low}..{high} ({why})")
    return xs, f"{RANDOM_SAMPLES} {RANDOM_SAID}: {'; '.join(said)}"


def is_random(inputs: str | None) -> bool:
    """Return True when ``inputs`` (a fidelity's or conversion check's ``inputs``) names :func:`random_inputs`'
    samples, not a data file: a figure on them says a variant computes what its reference does on made-up inputs,
    nothing of real ones."""
    return RANDOM_SAID in (inputs or "")


def finite_samples(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """Return a boolean mask over the samples (the first axis of every output in ``outputs``, {name: outputs stacked
    over the samples}): True where every value of every output is finite."""
    return np.logical_and.reduce([np.isfinite(y.reshape(len(y), -1)).all(axis=1) for y in outputs.values()])


def left_out_said(count: int, whose: str) -> str:
    """Return what the manifest appends to a description of random samples when ``count`` of them were left out
    because ``whose`` outputs (``ONNX Runtime's``, ``the fp32 variant's``) are NaN or infinity on them."""
    return f" ({count} left out: {whose} outputs are NaN or infinity on them, inputs the model does not take)"
