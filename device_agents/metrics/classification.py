"""``--task classification``: top-1 and top-5 accuracy.

Labels: ``y``, one integer class per sample. Scored output: ``output=NAME`` or the first output
whose samples are a vector of two or more scores (logits or probabilities).
"""

from __future__ import annotations

import numpy as np

from device_agents.errors import MetricError
from device_agents.metrics.base import Labels, Outputs, Task, need, pick_output


def _vector(out: np.ndarray) -> bool:
    per = out.shape[1:]
    return int(np.prod(per)) >= 2 and int(np.prod(per)) == max(per, default=0)


class Classification(Task):
    key = "classification"
    headline = "top1"
    labels_doc = "y: one integer class per sample"

    def check(self, labels: Labels, samples: int, where: str) -> None:
        """Check ``y`` holds one integer class per sample (shape ``[N]`` or ``[N, 1]``).

        Raises:
            MetricError: ``y`` is missing, not integers, of another row count, or several values per
                sample (one-hot rows, which would be read as that many labels).
        """
        y = need(labels, "y", samples, where, self.key)
        if int(np.prod(y.shape[1:])) != 1:  # before the type: one-hot rows from Keras' to_categorical are floats
            raise MetricError(f"{where}: labels 'y' have shape {y.shape}, several values per sample (one-hot?); "
                              "--task classification takes one integer class per sample: save y.argmax(axis=1)")
        need(labels, "y", samples, where, self.key, kind="int")

    def class_outputs(self, outputs: Outputs) -> set[str]:
        name = self.options.get("output")
        if name in outputs:
            return {str(name)}
        return next(({n} for n, o in outputs.items() if _vector(o)), set())

    def score(self, outputs: Outputs, labels: Labels) -> dict[str, float]:
        """Return ``top1`` (and ``top5`` for more than five classes).

        Raises:
            MetricError: no output fits, or a label is not a class of the scored output.
        """
        scores = pick_output(outputs, self.key, self.options, _vector)
        scores = scores.reshape(len(scores), -1)
        y = np.asarray(labels["y"])
        if len(y) != len(scores) or int(np.prod(y.shape[1:])) != 1:
            raise MetricError(f"labels 'y' have shape {y.shape} for {len(scores)} outputs; --task classification "
                              "takes one integer class per sample")
        y = y.reshape(-1)
        bad = np.flatnonzero((y < 0) | (y >= scores.shape[1]))
        if len(bad):  # else top-1 is silently 0: no score can match a class the output does not have
            raise MetricError(f"labels 'y' hold class {y[bad[0]]} at sample {bad[0]}, but the scored output has "
                              f"{scores.shape[1]} classes (0..{scores.shape[1] - 1}); give class indices, or name the "
                              "output with --task-option output=NAME")
        order = np.argsort(-scores, axis=1, kind="stable")
        figures = {"top1": float(np.mean(order[:, 0] == y)) if len(y) else 0.0}
        if scores.shape[1] > 5:
            figures["top5"] = float(np.mean(np.any(order[:, :5] == y[:, None], axis=1))) if len(y) else 0.0
        return figures
