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


def load_dataset(path: Path, role: str, inputs: dict[str, tuple[int, ...]], *, labels: bool) -> Dataset:
    """Load and check a data file for one role (``calib``, ``eval``, ``train``).

    ``inputs`` are the model's inputs, ``{name: shape of one sample}``; the keys the file needs are
    in :mod:`edgekit_protocol.datafile`. Inputs are cast to float32. With ``labels``, some ``y`` or
    ``y.<key>`` must be there (which ones, the task's check says).

    Returns:
        The loaded :class:`Dataset`.

    Raises:
        InputError: the file is missing or not an ``.npz``, lacks an input (or labels), has samples
            of the wrong shape, holds NaN or infinity (a ``DataFileError``) or an input value beyond
            float32's range, has no samples, or (calibration) fewer than ten samples.
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


def range_warning(calib: Dataset, evalset: Dataset) -> str | None:
    """Return a warning when an input of ``evalset`` takes values outside the range ``calib`` spans, else None.

    A full-integer model quantizes its input with the scale and zero point fitted to ``calib``; an eval
    (or field) input beyond that range is clipped, e.g. eval images in 0..255 for a model calibrated
    on 0..1 (a preprocessing step applied to one file and not the other). More than
    :data:`OUT_OF_RANGE_SHARE` of an input's values beyond the range (plus 1 % of its width) warns.
    """
    for name, c in calib.x.items():
        e = evalset.x.get(name)
        if e is None or not c.size or not e.size:
            continue
        lo, hi = float(c.min()), float(c.max())
        slack = 0.01 * (hi - lo)
        outside = float(np.mean((e < lo - slack) | (e > hi + slack)))
        if outside > OUT_OF_RANGE_SHARE:
            return (f"{evalset.path}: {outside:.1%} of --eval input '{name}' lies outside the range of --calib "
                    f"{calib.path.name} ({lo:.4g}..{hi:.4g}; --eval spans {float(e.min()):.4g}..{float(e.max()):.4g}): "
                    "int8 variants clip it to the calibrated range; preprocess both files the same way")
    return None
