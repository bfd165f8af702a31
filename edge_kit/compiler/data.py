"""Calibration, training and evaluation data: ``.npz`` files with ``x`` (inputs) and, for labels, ``y``.

Checked against the model before any conversion starts, so a mismatch costs seconds, not minutes.
"""

from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_kit.errors import InputError
from edge_kit.fsutil import sha256_file

MIN_CALIBRATION = 10  # fewer cannot give usable activation ranges
WARN_CALIBRATION = 100  # TensorFlow's guidance is a few hundred representative samples


@dataclass(frozen=True)
class Dataset:
    path: Path
    sha256: str
    x: np.ndarray
    y: np.ndarray | None

    def __len__(self) -> int:
        return len(self.x)

    def record(self) -> dict[str, object]:
        """Return the manifest entry: where the data came from and how much there was."""
        return {"path": str(self.path), "sha256": self.sha256, "samples": len(self)}


def load_dataset(path: Path, role: str, input_shape: tuple[int, ...], *, labels: bool) -> Dataset:
    """Load and check a data file for one role (``calib``, ``eval``, ``train``).

    ``input_shape`` is the model's input shape without the batch dimension. ``x`` is cast to
    float32; ``y`` must be integers, one per sample, when ``labels`` is true.

    Returns:
        The loaded :class:`Dataset`.

    Raises:
        InputError: the file is missing or not an ``.npz``, lacks ``x`` (or ``y``), has samples
            of the wrong shape, or (calibration) fewer than ten samples.
    """
    path = Path(path)
    opt = f"--{role}"
    if not path.is_file():
        raise InputError(f"{path}: {opt} file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{path}: {opt} is not a readable .npz file ({exc}); save it with numpy.savez(path, x=..., y=...)") from None
    if "x" not in arrays:
        raise InputError(f"{path}: {opt} has no array 'x' (found: {', '.join(arrays) or 'none'}); save inputs as x=")
    x = arrays["x"]
    if x.ndim == 0 or tuple(x.shape[1:]) != tuple(input_shape):
        raise InputError(
            f"{path}: {opt} samples have shape {tuple(x.shape[1:])} but the model takes {tuple(input_shape)} "
            "(first axis of x is the sample axis)"
        )
    if not np.issubdtype(x.dtype, np.number):
        raise InputError(f"{path}: {opt} x has dtype {x.dtype}; expected numbers")
    y = None
    if labels:
        if "y" not in arrays:
            raise InputError(f"{path}: {opt} has no array 'y' of integer labels")
        y = arrays["y"].reshape(-1)
        if len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise InputError(f"{path}: {opt} y must hold one integer label per sample ({len(x)}), got {y.dtype} x {len(y)}")
    if role == "calib":
        if len(x) < MIN_CALIBRATION:
            raise InputError(f"{path}: only {len(x)} calibration samples; need at least {MIN_CALIBRATION} (a few hundred is best)")
        if len(x) < WARN_CALIBRATION:
            warnings.warn(f"{path}: only {len(x)} calibration samples; int8 ranges may be poor below {WARN_CALIBRATION}", stacklevel=2)
    return Dataset(path=path, sha256=sha256_file(path), x=x.astype(np.float32), y=y)
