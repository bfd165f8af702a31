"""Decode MediaPipe BlazeFace outputs into face boxes: ``--decode edge_kit.decoders.blazeface:decode``.

Self-contained (numpy only): ``edgekit compile`` ships this file's source inside ``eval.npz`` and
the device agent runs it as is, without edge-kit's host code.

The models (``face_detection_short_range.tflite``, 128x128 input, and
``face_detection_full_range.tflite``, 192x192) output raw SSD anchors: regressors ``[N, A, 16]``
(box centre offset, width, height, then six key points, in input pixels) and classificators
``[N, A, 1]`` (logits). The anchors are those MediaPipe's ``SsdAnchorsCalculator`` generates with the
options of its face detection graphs (``fixed_anchor_size``, anchor offset 0.5, aspect ratio 1):

- short range: 128 input, strides 8, 16, 16, 16 (layers of equal stride merged), two anchors per
  cell at stride 8 and six at stride 16: 16·16·2 + 8·8·6 = 896 anchors;
- full range: 192 input, one layer of stride 4, one anchor per cell: 48·48 = 2304 anchors.

Decoding follows ``TensorsToDetectionsCalculator``: scores are ``sigmoid(clip(logit, ±100))``; a box is
``centre = anchor + offset / input size``, ``size = raw / input size``; then MediaPipe's weighted
non-maximum suppression (IoU 0.3: overlapping boxes are averaged, weighted by score).
Boxes come out as the detection metric wants them: ``ymin, xmin, ymax, xmax`` normalised to 0..1
of the (letterboxed) input, class 0 (face).
"""

from __future__ import annotations

import numpy as np

# anchors per model, by anchor count: (input size, [(stride, anchors per cell), ...])
LAYOUTS = {896: (128, [(8, 2), (16, 6)]), 2304: (192, [(4, 1)])}
MIN_SCORE = 0.5  # MediaPipe's min_score_thresh for the short-range graph (0.6 for full range); lower keeps recall for mAP
IOU_SUPPRESSION = 0.3  # MediaPipe's min_suppression_threshold
SCORE_CLIP = 100.0


def anchors(count: int) -> tuple[int, np.ndarray]:
    """Return (input size, anchor centres ``[count, 2]`` as x, y in 0..1) for a model with ``count`` anchors.

    Raises:
        ValueError: ``count`` is neither 896 (short range) nor 2304 (full range).
    """
    if count not in LAYOUTS:
        raise ValueError(f"{count} anchors: not a BlazeFace short-range (896) or full-range (2304) model")
    size, layers = LAYOUTS[count]
    centres = []
    for stride, per_cell in layers:
        cells = size // stride
        ys, xs = np.meshgrid((np.arange(cells) + 0.5) / cells, (np.arange(cells) + 0.5) / cells, indexing="ij")
        grid = np.stack([xs.ravel(), ys.ravel()], axis=1)
        centres.append(np.repeat(grid, per_cell, axis=0))
    return size, np.concatenate(centres).astype(np.float64)


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    h = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    w = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = h * w
    area = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)  # noqa: E731
    union = area(box) + area(others) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def weighted_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float = IOU_SUPPRESSION) -> tuple[np.ndarray, np.ndarray]:
    """Return (boxes, scores) after MediaPipe's weighted non-maximum suppression.

    The best remaining box and every box overlapping it above ``threshold`` (IoU) are merged into
    their score-weighted mean box, with the best box's score; repeated until none remain.
    """
    order = np.argsort(-scores, kind="stable")
    boxes, scores = boxes[order], scores[order]
    kept_boxes, kept_scores = [], []
    while len(boxes):
        overlap = _iou(boxes[0], boxes) > threshold
        overlap[0] = True
        w = scores[overlap][:, None]
        kept_boxes.append((boxes[overlap] * w).sum(axis=0) / w.sum())
        kept_scores.append(scores[0])
        boxes, scores = boxes[~overlap], scores[~overlap]
    return np.asarray(kept_boxes, np.float64).reshape(-1, 4), np.asarray(kept_scores, np.float64)


def _split(outputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    regressors = [v for v in outputs.values() if v.ndim == 3 and v.shape[2] == 16]
    logits = [v for v in outputs.values() if v.ndim == 3 and v.shape[2] == 1]
    if len(regressors) != 1 or len(logits) != 1:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in outputs.items())
        raise ValueError(f"expected one [N, A, 16] regressor and one [N, A, 1] score output, got {shapes}")
    return regressors[0], logits[0][..., 0]


def decode(outputs: dict[str, np.ndarray], min_score: float = MIN_SCORE) -> list[dict[str, np.ndarray]]:
    """Return one dict per sample: ``boxes [K, 4]`` (ymin, xmin, ymax, xmax in 0..1), ``scores [K]``, ``classes [K]`` (0).

    ``outputs``: the model's outputs by name, first axis the samples (any names: the regressor is
    the ``[N, A, 16]`` output, the scores the ``[N, A, 1]`` one). Detections scoring below
    ``min_score`` are dropped before suppression.

    Raises:
        ValueError: the outputs are not BlazeFace's (shapes or anchor count).
    """
    raw, logits = _split(outputs)
    size, centres = anchors(raw.shape[1])
    results = []
    for r, logit in zip(raw.astype(np.float64), logits.astype(np.float64)):
        scores = 1.0 / (1.0 + np.exp(-np.clip(logit, -SCORE_CLIP, SCORE_CLIP)))
        keep = scores >= min_score
        r, s, c = r[keep], scores[keep], centres[keep]
        cx, cy = c[:, 0] + r[:, 0] / size, c[:, 1] + r[:, 1] / size
        w, h = r[:, 2] / size, r[:, 3] / size
        boxes = np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], axis=1)
        boxes, s = weighted_nms(boxes, s)
        results.append({"boxes": boxes, "scores": s, "classes": np.zeros(len(s), np.int64)})
    return results
