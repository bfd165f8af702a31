"""What a task metric plugin holds, and the one scoring path host and device share.

A task (``classification``, ``detection``, ``segmentation``, ``keypoints``) knows the label keys it
reads from a data file (``y`` or ``y.<name>``, documented on each plugin), checks them before any
model runs, and scores a model's float outputs (``{output name: array, first axis = samples}``)
against them. Every figure is higher-is-better for the headline (what selection compares):
top-1, mAP@[.5:.95], mIoU, PCK.

A user can replace the scoring (``--metric module:function``) or, for detection, only the box
decoding (``--decode module:function``); see :mod:`device_agents.metrics.user`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from device_agents.errors import MetricError

Outputs = dict[str, np.ndarray]
Labels = dict[str, np.ndarray]  # label key without the "y." prefix ("y" itself for a bare y)


class Task:
    """One task's metric: label format, label check and scoring. Subclasses set the class attributes."""

    key: ClassVar[str]
    headline: ClassVar[str]  # the figure selection compares (higher is better)
    labels_doc: ClassVar[str]  # the data-file keys it reads, for docs and messages
    option_keys: ClassVar[tuple[str, ...]] = ("output",)  # the --task-option keys it reads

    def __init__(self, options: dict[str, Any] | None = None,
                 decode: Callable[[Outputs], Any] | None = None):
        self.options = dict(options or {})
        self.decode = decode

    def check(self, labels: Labels, samples: int, where: str) -> None:
        """Check ``labels`` hold what this task needs for ``samples`` samples.

        Raises:
            MetricError: a key is missing or has the wrong shape or type (the message names it).
        """
        raise NotImplementedError

    def class_outputs(self, outputs: Outputs) -> set[str]:
        """Return the names of the outputs holding class scores (their fidelity includes top-1 agreement)."""
        return set()

    def score(self, outputs: Outputs, labels: Labels) -> dict[str, float]:
        """Return the task's figures, the headline first.

        Raises:
            MetricError: the outputs cannot be scored for this task (the message says why).
        """
        raise NotImplementedError


def need(labels: Labels, key: str, samples: int, where: str, task: str, *, kind: str | None = None,
         ndim: int | None = None) -> np.ndarray:
    """Return label array ``key`` after checking it has one row per sample, ``kind`` ('int'/'float') and ``ndim``.

    Raises:
        MetricError: missing, or of the wrong row count, kind or rank.
    """
    shown = "y" if key == "y" else f"y.{key}"
    if key not in labels:
        found = ", ".join("y" if k == "y" else f"y.{k}" for k in labels) or "none"
        raise MetricError(f"{where}: --task {task} needs labels '{shown}' (found: {found}); see the data-file docs")
    a = np.asarray(labels[key])
    if a.ndim == 0 or len(a) != samples:
        raise MetricError(f"{where}: labels '{shown}' have {len(a) if a.ndim else 0} rows for {samples} samples")
    if kind == "int" and not np.issubdtype(a.dtype, np.integer):
        raise MetricError(f"{where}: labels '{shown}' must be integers for --task {task}, got {a.dtype}; save them as "
                          "integers, e.g. with .astype(numpy.int64)")
    if ndim is not None and a.ndim != ndim:
        raise MetricError(f"{where}: labels '{shown}' must have {ndim} axes for --task {task}, got shape {a.shape}")
    return a


def pick_output(outputs: Outputs, task: str, options: dict[str, Any], fits: Callable[[np.ndarray], bool]) -> np.ndarray:
    """Return the output named by ``options['output']``, else the first (in the model's order) that ``fits``.

    Raises:
        MetricError: the named output does not exist, or none fits.
    """
    name = options.get("output")
    if name is not None:
        if name not in outputs:
            raise MetricError(f"--task {task}: the model has no output '{name}' (outputs: {', '.join(outputs)})")
        return outputs[name]
    for out in outputs.values():
        if fits(out):
            return out
    raise MetricError(f"--task {task}: no output of the model fits the task (outputs: "
                      f"{', '.join(f'{k} {tuple(v.shape[1:])}' for k, v in outputs.items())}); "
                      "name one with output=NAME or pass --metric module:function")


def positive_option(options: dict[str, Any], key: str, default: float, task: str) -> float:
    """Return task option ``key`` as a finite positive number (``default`` when absent).

    Raises:
        MetricError: it is not a finite number above zero.
    """
    value = options.get(key, default)
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer too large for a float
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise MetricError(f"--task {task}: option {key}={value!r} must be a finite number above 0")
    return number


def finite_figures(result: Any, where: str) -> dict[str, float]:
    """Return a metric's result as ``{name: float}``; a bare number becomes ``{"value": x}``.

    Raises:
        MetricError: it is not a finite number or a non-empty dict of finite numbers.
    """
    figures = {"value": result} if not isinstance(result, dict) else result
    if not figures:
        raise MetricError(f"{where} returned an empty dict; return a number or {{name: number}}")
    out = {}
    for name, value in figures.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not math.isfinite(float(value)):
            raise MetricError(f"{where} returned {name}={value!r}; every figure must be a finite number")
        out[str(name)] = float(value)
    return out
