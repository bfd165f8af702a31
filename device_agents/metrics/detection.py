"""``--task detection``: COCO-style mAP@[.5:.95] and mAP@.5 on decoded boxes.

Labels: ``y.boxes`` float ``[samples, M, 4]`` as ``ymin, xmin, ymax, xmax`` in the same units as
the decoded boxes (TFLite's convention: normalised to 0..1), and ``y.classes`` int ``[samples, M]``;
rows whose class is negative are padding (images hold different numbers of objects).

Predictions: the four outputs of TFLite's ``TFLite_Detection_PostProcess`` (boxes ``[K, 4]``,
classes ``[K]``, scores ``[K]``, count), recognised by shape; or, for a model that outputs raw
anchors (most do), what a user decoder returns (``--decode module:function``): one dict per sample
with ``boxes [K, 4]``, ``scores [K]`` and ``classes [K]`` (after the model's own NMS). Class ids are
rounded to the nearest integer (a class output dequantized from int8 is a little off).

The method is COCO's (pycocotools ``COCOeval``, area "all", the 100 highest-scored detections per
image and class, as ``COCOeval.evaluateImg`` keeps them, not per image over all classes): per class
and IoU threshold 0.50, 0.55, …, 0.95, detections sorted by score are matched greedily to the
unmatched ground-truth box of highest IoU; precision is made monotone and read at 101 recall
points; classes without ground truth are left out. The test suite checks it against pycocotools.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from device_agents.errors import MetricError
from device_agents.metrics.base import Labels, Outputs, Task, need
from device_agents.metrics.user import call_user

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
MAX_DETECTIONS = 100


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return the IoU matrix ``[len(a), len(b)]`` of boxes given as ``ymin, xmin, ymax, xmax``."""
    a, b = a[:, None, :], b[None, :, :]
    h = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    w = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = h * w
    area = lambda t: np.clip(t[..., 2] - t[..., 0], 0, None) * np.clip(t[..., 3] - t[..., 1], 0, None)  # noqa: E731
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def mean_average_precision(predictions: list[dict[str, np.ndarray]], truths: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Return ``{"map": mAP@[.5:.95], "map50": mAP@.5}`` over images (see the module docstring).

    ``predictions`` and ``truths``: one dict per image, ``boxes [K, 4]``, ``classes [K]`` (and
    ``scores [K]`` for predictions). With no ground truth at all both figures are 0.
    """
    classes = sorted({int(c) for t in truths for c in t["classes"]})
    if not classes:
        return {"map": 0.0, "map50": 0.0}
    ap = np.zeros((len(IOU_THRESHOLDS), len(classes)))
    for ci, c in enumerate(classes):
        dets = []  # (score, image, box)
        gts = []
        for img, (p, t) in enumerate(zip(predictions, truths)):
            mine = np.flatnonzero(np.asarray(p["classes"]).astype(int) == c)  # as COCOeval: the cap is per image and class
            for j in mine[np.argsort(-p["scores"][mine], kind="stable")][:MAX_DETECTIONS]:
                dets.append((float(p["scores"][j]), img, p["boxes"][j]))
            gts.append(t["boxes"][t["classes"] == c])
        npos = sum(len(g) for g in gts)
        dets.sort(key=lambda d: -d[0])
        ious = [iou(np.asarray([d[2]]), gts[d[1]])[0] if len(gts[d[1]]) else np.zeros(0) for d in dets]
        for ti, thr in enumerate(IOU_THRESHOLDS):
            used = [np.zeros(len(g), bool) for g in gts]
            tp = np.zeros(len(dets))
            for k, (d, ov) in enumerate(zip(dets, ious)):
                cand = np.where(~used[d[1]] & (ov >= thr - 1e-10), ov, -1.0)
                if len(cand) and cand.max() >= 0:
                    used[d[1]][int(np.argmax(cand))] = True
                    tp[k] = 1
            ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
            recall = ctp / npos
            precision = ctp / np.maximum(ctp + cfp, np.finfo(float).eps)
            precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
            idx = np.searchsorted(recall, RECALL_POINTS, side="left")
            ap[ti, ci] = np.mean([precision[i] if i < len(precision) else 0.0 for i in idx])
    return {"map": float(ap.mean()), "map50": float(ap[0].mean())}


def _class_ids(classes: np.ndarray) -> np.ndarray:
    """Return class ids as ints, rounded to the nearest: a class output dequantized from int8 reads
    2.98 for class 3, which truncation would score as class 2."""
    return np.rint(np.asarray(classes, dtype=np.float64)).astype(int)


def _postprocess_layout(outputs: Outputs) -> list[dict[str, np.ndarray]] | None:
    """Return per-sample detections from TFLite_Detection_PostProcess-shaped outputs, or None."""
    boxes = [v for v in outputs.values() if v.ndim == 3 and v.shape[2] == 4]
    if len(boxes) != 1:
        return None
    k = boxes[0].shape[1]
    flat = [(n, v) for n, v in outputs.items() if v.shape[1:] == (k,)]
    if len(flat) != 2:
        return None
    integral = [n for n, v in flat if np.all(v == np.round(v))]
    by_name = [n for n, _ in flat if "class" in n.lower()]
    cls_name = by_name[0] if len(by_name) == 1 else integral[0] if len(integral) == 1 else None
    if cls_name is None:
        return None
    score_name = next(n for n, _ in flat if n != cls_name)
    return [{"boxes": boxes[0][i], "classes": _class_ids(outputs[cls_name][i]), "scores": outputs[score_name][i]}
            for i in range(len(boxes[0]))]


def _checked(decoded: Any, samples: int, where: str) -> list[dict[str, np.ndarray]]:
    if not isinstance(decoded, (list, tuple)) or len(decoded) != samples:
        raise MetricError(f"{where} must return a list with one dict per sample ({samples}), "
                          f"got {type(decoded).__name__}")
    out = []
    for i, d in enumerate(decoded):
        try:
            boxes = np.asarray(d["boxes"], dtype=np.float64).reshape(-1, 4)
            scores = np.asarray(d["scores"], dtype=np.float64).reshape(-1)
            classes = np.asarray(d["classes"], dtype=np.float64).reshape(-1)
        except Exception as exc:  # noqa: BLE001 - what user code returned: an array per sample raises IndexError
            raise MetricError(f"{where}: sample {i} is not a dict of boxes [K,4], scores [K], classes [K] "
                              f"({type(exc).__name__}: {str(exc)[:200]})") from None
        finite = all(np.all(np.isfinite(a)) for a in (boxes, scores, classes))  # a NaN class id cast to int is noise
        if not (len(boxes) == len(scores) == len(classes)) or not finite:
            raise MetricError(f"{where}: sample {i} has boxes, scores and classes of different lengths or non-finite values")
        out.append({"boxes": boxes, "scores": scores, "classes": _class_ids(classes)})
    return out


class Detection(Task):
    key = "detection"
    headline = "map"
    labels_doc = "y.boxes [samples, M, 4] (ymin, xmin, ymax, xmax) and y.classes [samples, M] ints, -1 = padding"
    option_keys = ()  # the layout of decoded boxes is fixed (or --decode's)

    def check(self, labels: Labels, samples: int, where: str) -> None:
        boxes = need(labels, "boxes", samples, where, self.key, kind=None, ndim=3)
        classes = need(labels, "classes", samples, where, self.key, kind="int", ndim=2)
        if boxes.shape[2] != 4 or boxes.shape[1] != classes.shape[1]:
            raise MetricError(f"{where}: y.boxes must be [samples, M, 4] and y.classes [samples, M]; "
                              f"got {boxes.shape} and {classes.shape}")

    def predictions(self, outputs: Outputs) -> list[dict[str, np.ndarray]]:
        """Return one dict of decoded detections per sample (see the module docstring).

        Raises:
            MetricError: no decoder and the outputs are not in the post-processed layout, or the
                decoder raised or returned something else.
        """
        samples = len(next(iter(outputs.values()))) if outputs else 0
        if self.decode is not None:
            where = f"--decode {getattr(self.decode, 'spec', self.decode)}"
            return _checked(call_user(self.decode, where, outputs), samples, where)
        got = _postprocess_layout(outputs)
        if got is None:
            raise MetricError("--task detection: the outputs are not decoded boxes (TFLite_Detection_PostProcess "
                              "layout); pass --decode module:function that turns them into boxes, scores, classes")
        return got

    def score(self, outputs: Outputs, labels: Labels) -> dict[str, float]:
        preds = self.predictions(outputs)
        truths = []
        for boxes, classes in zip(np.asarray(labels["boxes"], dtype=np.float64), np.asarray(labels["classes"])):
            real = classes >= 0
            truths.append({"boxes": boxes[real], "classes": classes[real].astype(int)})
        return mean_average_precision(preds, truths)
