"""``--task keypoints`` (also for regression): PCK and mean error.

Labels: ``y.points`` float ``[samples, K, D]`` (D = 2 or 3 coordinates), in the units of the model's
output; an optional ``y.visible`` ``[samples, K]`` (0 = not labelled, ignored). Scored output:
``output=NAME`` or the first output with a multiple of K values per sample, read as ``[K, D']``
(D' >= D; the first D coordinates are compared).

``pck``: share of labelled points within ``alpha`` (option, default 0.1) times the size of the
sample's labelled points (the longer side of their bounding box), the usual PCK normalisation.
``mean_error``: mean Euclidean distance. PCK is the headline (higher is better).
"""

from __future__ import annotations

import numpy as np

from device_agents.errors import MetricError
from device_agents.metrics.base import (
    Labels,
    Outputs,
    Task,
    need,
    pick_output,
    positive_option,
)


class Keypoints(Task):
    key = "keypoints"
    headline = "pck"
    labels_doc = "y.points [samples, K, D] floats (D = 2 or 3), optional y.visible [samples, K] (0 = ignore)"
    option_keys = ("output", "alpha")

    def check(self, labels: Labels, samples: int, where: str) -> None:
        points = need(labels, "points", samples, where, self.key, ndim=3)
        if points.shape[2] not in (2, 3):
            raise MetricError(f"{where}: labels 'y.points' must be [samples, K, 2 or 3] (points of 2 or 3 coordinates) "
                              f"for --task {self.key}, got {points.shape}; score other targets (a single value per "
                              "sample) with --metric module:function")
        if "visible" in labels:
            visible = need(labels, "visible", samples, where, self.key, ndim=2)
            if visible.shape != points.shape[:2]:
                raise MetricError(f"{where}: y.visible must be [samples, K] = {points.shape[:2]}, got {visible.shape}")

    def score(self, outputs: Outputs, labels: Labels) -> dict[str, float]:
        points = np.asarray(labels["points"], dtype=np.float64)
        n, k, d = points.shape
        out = pick_output(outputs, self.key, self.options,
                          lambda o: (size := int(np.prod(o.shape[1:]))) % k == 0 and size // k >= d)
        pred = out.reshape(n, k, -1)[..., :d].astype(np.float64)
        visible = np.asarray(labels.get("visible", np.ones((n, k)))) > 0
        if not visible.any():
            raise MetricError(f"--task {self.key}: y.visible marks no point as labelled")
        dist = np.linalg.norm(pred - points, axis=2)
        span = np.where(visible[..., None], points, np.nan)
        size = np.nanmax(np.nanmax(span, axis=1) - np.nanmin(span, axis=1), axis=1)
        size = np.where(np.isfinite(size) & (size > 0), size, 1.0)
        alpha = positive_option(self.options, "alpha", 0.1, self.key)
        hit = dist <= alpha * size[:, None]
        return {"pck": float(hit[visible].mean()), "mean_error": float(dist[visible].mean())}


class Regression(Keypoints):
    """``--task regression``: the keypoints figures, under the task name the user gave (so its errors name it)."""

    key = "regression"
