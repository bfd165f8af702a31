"""Task metrics: the registry and the one scoring path the compiler and the agent share.

One module per task (see :mod:`device_agents.metrics.base` for what a task holds). A
:class:`MetricSpec` says which task, its options and any user function; it travels to devices
inside ``eval.npz`` (key ``metric``, UTF-8 JSON as bytes) so a device scores exactly as the host did.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from device_agents.errors import MetricError
from device_agents.metrics.base import Labels, Outputs, Task, finite_figures
from device_agents.metrics.classification import Classification
from device_agents.metrics.detection import Detection
from device_agents.metrics.keypoints import Keypoints, Regression
from device_agents.metrics.segmentation import Segmentation
from device_agents.metrics.user import call_user, load_function, read_source

# regression: the keypoints figures (mean error and PCK over points)
TASKS: dict[str, type[Task]] = {cls.key: cls for cls in (Classification, Detection, Segmentation, Keypoints, Regression)}
CUSTOM = "custom"  # the task name when a user metric does all the scoring


@dataclass
class MetricSpec:
    """How accuracy is scored: task, task options, and user functions with their source code."""

    task: str = "classification"
    options: dict[str, Any] = field(default_factory=dict)
    metric: str | None = None  # module:function that does all the scoring
    decode: str | None = None  # module:function that decodes detections
    sources: dict[str, str] = field(default_factory=dict)  # module part of a spec -> its source text

    @classmethod
    def build(cls, task: str | None, options: dict[str, Any] | None = None, metric: str | None = None,
              decode: str | None = None) -> MetricSpec:
        """Return a checked spec, reading the source of any user function.

        Raises:
            MetricError: unknown task (the closest is named), an option the task does not read (or
                any option with a user metric), ``--decode`` for a task other than detection, or a
                user function that cannot be found.
        """
        task = task or (CUSTOM if metric else "classification")
        if task != CUSTOM and task not in TASKS:
            near = difflib.get_close_matches(task, list(TASKS), n=1)
            raise MetricError(f"unknown --task '{task}'" + (f"; did you mean '{near[0]}'?" if near else "")
                              + f" (tasks: {', '.join(TASKS)})")
        if decode and task != "detection":
            raise MetricError(f"--decode applies to --task detection, not {task}")
        known = TASKS[task].option_keys if task in TASKS and not metric else ()  # a --metric function takes none
        for key in options or {}:
            if key not in known:
                near = difflib.get_close_matches(key, known, n=1)
                raise MetricError(f"--task-option {key}: not an option of "
                                  + (f"--metric {metric}" if metric else f"--task {task}")
                                  + (f"; did you mean '{near[0]}'?" if near else "")
                                  + f" (options: {', '.join(known) or 'none'})")
        spec = cls(task, dict(options or {}), metric, decode)
        for user in (metric, decode):
            if user:
                spec.sources[user.rpartition(":")[0]] = read_source(user)
        spec.scorer()  # fail now, on the host, if a user module does not load
        return spec

    def to_bytes(self) -> bytes:
        """Return the spec as UTF-8 JSON (what ``eval.npz`` carries under ``metric``)."""
        return json.dumps({"task": self.task, "options": self.options, "metric": self.metric,
                           "decode": self.decode, "sources": self.sources}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> MetricSpec:
        """Return the spec stored by :meth:`to_bytes`.

        Raises:
            MetricError: not such a JSON object.
        """
        try:
            d = json.loads(data.decode("utf-8"))
            return cls(str(d["task"]), dict(d.get("options") or {}), d.get("metric"), d.get("decode"),
                       {str(k): str(v) for k, v in (d.get("sources") or {}).items()})
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MetricError(f"{where}: the metric spec is not readable ({exc})") from None

    def record(self) -> dict[str, Any]:
        """Return the manifest entry (the sources are not repeated there)."""
        return {"task": self.task, "task_options": self.options, "user_metric": self.metric, "decode": self.decode}

    def _function(self, spec: str) -> Any:
        module = spec.rpartition(":")[0]
        if module not in self.sources:
            raise MetricError(f"'{spec}': its source was not shipped with the eval set")
        return load_function(self.sources[module], spec)

    def scorer(self) -> Scorer:
        """Return the scorer for this spec (user modules are loaded here).

        Raises:
            MetricError: a user module fails to load.
        """
        decode = self._function(self.decode) if self.decode else None
        user = self._function(self.metric) if self.metric else None
        task = TASKS[self.task](self.options, decode) if self.task in TASKS else None
        return Scorer(self, task, user)


@dataclass
class Scorer:
    spec: MetricSpec
    task: Task | None
    user: Any = None

    def check(self, labels: Labels, samples: int, where: str) -> None:
        """Check the labels fit the task (a user metric checks its own). Raises MetricError."""
        if self.task is not None and self.user is None:
            self.task.check(labels, samples, where)

    def class_outputs(self, outputs: Outputs) -> set[str]:
        """Return the outputs the task scores as class vectors (none for a user metric)."""
        return self.task.class_outputs(outputs) if self.task is not None and self.user is None else set()

    def score(self, outputs: Outputs, labels: Labels) -> dict[str, Any]:
        """Return ``{"task", "metric" (headline name), "value" (headline), "figures" (all)}``.

        Raises:
            MetricError: the outputs cannot be scored, or a user function raised or returned
                something other than finite numbers.
        """
        if self.user is not None:
            where = f"--metric {self.spec.metric}"
            figures = finite_figures(call_user(self.user, where, dict(outputs), dict(labels)), where)
            headline = next(iter(figures))
        else:
            assert self.task is not None
            figures = finite_figures(self.task.score(outputs, labels), f"--task {self.spec.task}")
            headline = self.task.headline
        return {"task": self.spec.task, "metric": headline, "value": figures[headline], "figures": figures}


def labels_of(arrays: dict[str, Any]) -> Labels:
    """Return the label arrays of a data file: ``y`` as ``y``, ``y.<key>`` as ``<key>``."""
    return {("y" if k == "y" else k[2:]): np.asarray(a) for k, a in arrays.items() if k == "y" or k.startswith("y.")}


__all__ = ["CUSTOM", "TASKS", "MetricSpec", "Scorer", "labels_of"]
