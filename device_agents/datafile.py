"""The data-file format shared by host and device: ``.npz`` with ``x`` (inputs, first axis = samples)
and, where labels are needed, ``y`` (one integer per sample).

Lives on the device side because the agent reads eval sets too and must not import the host package;
the host compiler adds its own rules (calibration sample counts, hashes) on top.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Literal

import numpy as np


class DataFileError(ValueError):
    """The file breaks the format; the message is one line naming the file, option and the fix."""


def read_npz(path: Path, option: str, input_shape: tuple[int, ...], *,
             labels: Literal["required", "optional", "ignored"]) -> tuple[np.ndarray, np.ndarray | None]:
    """Read and check a data file for a model taking ``input_shape`` (without the batch axis).

    ``option`` is the command-line option the file came from (``--eval``), used in messages.
    ``labels``: ``required`` (``y`` must be there), ``optional`` (checked and returned if there),
    ``ignored`` (never read: calibration data).

    Returns:
        (``x`` as float32, ``y`` flattened or None).

    Raises:
        DataFileError: missing or unreadable file, no ``x``, samples of the wrong shape or type,
            a required ``y`` missing, or a ``y`` that is not one integer label per sample.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: {option} file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataFileError(f"{path}: {option} is not a readable .npz file ({exc}); "
                            "save it with numpy.savez(path, x=..., y=...)") from None
    if "x" not in arrays:
        raise DataFileError(f"{path}: {option} has no array 'x' (found: {', '.join(arrays) or 'none'}); save inputs as x=")
    x = arrays["x"]
    if x.ndim == 0 or tuple(x.shape[1:]) != tuple(input_shape):
        raise DataFileError(f"{path}: {option} samples have shape {tuple(x.shape[1:])} but the model takes "
                            f"{tuple(input_shape)} (first axis of x is the sample axis)")
    if not np.issubdtype(x.dtype, np.number):
        raise DataFileError(f"{path}: {option} x has dtype {x.dtype}; expected numbers")
    if labels == "ignored" or (labels == "optional" and "y" not in arrays):
        return x.astype(np.float32), None
    if "y" not in arrays:
        raise DataFileError(f"{path}: {option} has no array 'y' of integer labels")
    y = arrays["y"].reshape(-1)
    if len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataFileError(f"{path}: {option} y must hold one integer label per sample ({len(x)}), got {y.dtype} x {len(y)}")
    return x.astype(np.float32), y


def read_reference(path: Path, samples: int) -> np.ndarray | None:
    """Return the fp32 model's outputs stored as ``reference`` next to ``x``, or None.

    The compiler ships ``eval.npz`` with the artifacts holding ``x``, ``y`` and ``reference`` (the
    fp32 variant's outputs on ``x``), so a device can report fidelity without the fp32 model.

    Raises:
        DataFileError: ``reference`` is there but has not one row per sample.
    """
    with np.load(path, allow_pickle=False) as npz:
        if "reference" not in npz.files:
            return None
        ref = npz["reference"]
    if len(ref) != samples:
        raise DataFileError(f"{path}: reference has {len(ref)} rows for {samples} samples of x")
    return ref.astype(np.float32)
