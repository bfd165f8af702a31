"""Calibration, training and evaluation data on the host.

The file format is checked by :func:`edgekit_protocol.datafile.read_npz` (shared with the agent); this
module adds the compiler's rules (calibration sample counts) and the hash the manifest records.
Everything is checked before any conversion starts, so a mismatch costs seconds, not minutes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_kit.errors import InputError
from edge_kit.fsutil import sha256_file
from edgekit_protocol.datafile import read_npz

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
            of the wrong shape, holds NaN or infinity (a ``DataFileError``), or (calibration)
            fewer than ten samples.
    """
    path = Path(path)
    xa, ya = read_npz(path, f"--{role}", input_shape, labels="required" if labels else "ignored")
    x, y = np.asarray(xa, dtype=np.float32), None if ya is None else np.asarray(ya)
    if role == "calib":
        if len(x) < MIN_CALIBRATION:
            raise InputError(f"{path}: only {len(x)} calibration samples; need at least {MIN_CALIBRATION} (a few hundred is best)")
        if len(x) < WARN_CALIBRATION:
            warnings.warn(f"{path}: only {len(x)} calibration samples; int8 ranges may be poor below {WARN_CALIBRATION}", stacklevel=2)
    return Dataset(path=path, sha256=sha256_file(path), x=x, y=y)
