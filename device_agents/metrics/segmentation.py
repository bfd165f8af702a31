"""``--task segmentation``: mean IoU and pixel accuracy.

Labels: ``y.mask`` int ``[samples, H, W]``, one class per pixel; 255 (or any negative value) marks
pixels to ignore. Scored output: ``output=NAME`` or the first output of rank 3 or 4 per sample
(``[h, w, C]`` class scores, argmax per pixel; a single channel is a foreground probability,
thresholded at 0.5). The output is read channels-last ``[h, w, C]``, or channels-first
``[C, h, w]`` (ONNX's NCHW) when its first two axes do not have the mask's aspect ratio and its
last two do (or it has one channel first). Predictions of another size than the mask are resized to it
by nearest neighbour. mIoU is the mean over classes of IoU from one confusion matrix over every
labelled pixel of the set, over the classes present in the labels or the predictions (a class
absent from both is left out, not counted as 0 or 1).
"""

from __future__ import annotations

import numpy as np

from device_agents.errors import MetricError
from device_agents.metrics.base import Labels, Outputs, Task, need, pick_output

IGNORE = 255


def _nearest(pred: np.ndarray, h: int, w: int) -> np.ndarray:
    rows = (np.arange(h) * pred.shape[1] // h)
    cols = (np.arange(w) * pred.shape[2] // w)
    return pred[:, rows][:, :, cols]


def _channels_last(out: np.ndarray, h: int, w: int) -> np.ndarray:
    """Return a ``[N, a, b, c]`` output as ``[N, h', w', C]``: read as channels-first (``[N, C, h', w']``,
    ONNX's NCHW) when ``a:b`` is not the mask's aspect ratio ``h:w`` and ``b:c`` is (or ``a`` is 1 and
    ``c`` is not), else returned as it is."""
    def fits(a: int, b: int) -> bool:
        return a * w == b * h

    last = fits(out.shape[1], out.shape[2])
    if not last and (fits(out.shape[2], out.shape[3]) or (out.shape[1] == 1 and out.shape[-1] != 1)):
        return np.moveaxis(out, 1, -1)
    return out


class Segmentation(Task):
    key = "segmentation"
    headline = "miou"
    labels_doc = "y.mask [samples, H, W] ints, one class per pixel, 255 = ignore"

    def check(self, labels: Labels, samples: int, where: str) -> None:
        need(labels, "mask", samples, where, self.key, kind="int", ndim=3)

    def score(self, outputs: Outputs, labels: Labels) -> dict[str, float]:
        out = pick_output(outputs, self.key, self.options, lambda o: o.ndim in (3, 4))
        mask = np.asarray(labels["mask"]).astype(np.int64)
        out = out[..., None] if out.ndim == 3 else _channels_last(out, mask.shape[1], mask.shape[2])
        pred = (out[..., 0] > 0.5).astype(np.int64) if out.shape[-1] == 1 else np.argmax(out, axis=-1)
        pred = _nearest(pred, mask.shape[1], mask.shape[2]) if pred.shape[1:] != mask.shape[1:] else pred
        valid = (mask >= 0) & (mask != IGNORE)
        if not valid.any():
            raise MetricError("--task segmentation: every pixel of y.mask is marked ignore (255)")
        p, t = pred[valid], mask[valid]
        n = int(max(p.max(), t.max())) + 1
        confusion = np.bincount(t * n + p, minlength=n * n).reshape(n, n)
        inter = np.diag(confusion).astype(np.float64)
        union = confusion.sum(0) + confusion.sum(1) - inter
        present = union > 0
        return {"miou": float(np.mean(inter[present] / union[present])), "pixel_accuracy": float(inter.sum() / p.size)}
