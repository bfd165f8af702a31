"""Task metrics: each figure checked against an independent computation (pycocotools for mAP)."""

from __future__ import annotations

import numpy as np
import pytest

from device_agents.errors import MetricError
from device_agents.metrics import MetricSpec, labels_of
from device_agents.metrics.detection import mean_average_precision


def test_classification_top1_and_top5():
    scores = np.zeros((4, 10))
    scores[np.arange(4), [1, 2, 3, 4]] = 1.0
    scores[3, 9] = 2.0  # sample 3's best is 9, its label 4 is second
    scores[2, 0] = -1.0  # sample 2's label 0 scores lowest of all ten
    got = MetricSpec.build("classification").scorer().score({"logits": scores}, {"y": np.array([1, 2, 0, 4])})
    assert got["metric"] == "top1" and got["value"] == 0.5 and got["figures"]["top5"] == 0.75


def test_one_hot_class_labels_are_a_one_line_error_not_a_crash_or_a_wrong_top1():
    """Integer one-hot rows passed the label check and then failed to broadcast against the argmax (a
    traceback), or, with as many samples as classes, were scored as N*N labels."""
    scorer = MetricSpec.build("classification").scorer()
    onehot = np.eye(10, dtype=np.int64)[[1, 2, 3, 4]]
    with pytest.raises(MetricError, match=r"eval.npz: labels 'y' have shape \(4, 10\).*y.argmax\(axis=1\)"):
        scorer.check({"y": onehot}, 4, "eval.npz")
    with pytest.raises(MetricError, match="one integer class per sample"):
        scorer.score({"logits": np.eye(10)[[1, 2, 3, 4]]}, {"y": onehot})
    column = np.array([[1], [2], [3], [4]])  # [N, 1] is one class per sample
    scorer.check({"y": column}, 4, "eval.npz")
    assert scorer.score({"logits": np.eye(10)[[1, 2, 3, 0]]}, {"y": column})["value"] == 0.75



def test_float_labels_one_hot_or_not_are_refused_saying_what_to_save():
    """Float one-hot rows (Keras' to_categorical makes them) were refused as 'must be integers, got float32', with
    nothing on what to save: the one-hot message was for integer rows only; and float labels of any task said nothing
    on what to save."""
    scorer = MetricSpec.build("classification").scorer()
    with pytest.raises(MetricError, match=r"eval.npz: labels 'y' have shape \(4, 10\), several values per sample "
                                          r"\(one-hot\?\).*save y.argmax\(axis=1\)"):
        scorer.check({"y": np.eye(10, dtype=np.float32)[[1, 2, 3, 4]]}, 4, "eval.npz")
    with pytest.raises(MetricError, match=r"eval.npz: labels 'y' must be integers for --task classification, got "
                                          r"float32; save them as integers, e.g. with .astype\(numpy.int64\)"):
        scorer.check({"y": np.array([1.0, 2.0, 3.0, 4.0], np.float32)}, 4, "eval.npz")
    with pytest.raises(MetricError, match=r"labels 'y.classes' must be integers for --task detection, got float64; "
                                          "save them as integers"):
        MetricSpec.build("detection").scorer().check({"boxes": np.zeros((1, 1, 4)), "classes": np.zeros((1, 1))}, 1,
                                                     "eval.npz")


@pytest.mark.parametrize("task", ["keypoints", "regression"])
def test_points_that_are_no_points_say_what_to_use_for_other_targets(task):
    """A single value per sample (a price) as y.points [N, 1, 1] was refused as 'y.points must be [samples, K, 2 or 3]',
    nothing on what else scores it."""
    with pytest.raises(MetricError, match=r"eval.npz: labels 'y.points' must be \[samples, K, 2 or 3\] \(points of 2 "
                                          rf"or 3 coordinates\) for --task {task}, got \(4, 1, 1\); score other "
                                          r"targets \(a single value per sample\) with --metric module:function"):
        MetricSpec.build(task).scorer().check({"points": np.zeros((4, 1, 1))}, 4, "eval.npz")

def _coco_map(preds, truths):
    """mAP with pycocotools, the reference implementation, on the same boxes."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(b):  # ours are ymin, xmin, ymax, xmax
        return [float(b[1]), float(b[0]), float(b[3] - b[1]), float(b[2] - b[0])]

    images = [{"id": i, "width": 100, "height": 100} for i in range(len(truths))]
    cats = sorted({int(c) for t in truths for c in t["classes"]})
    anns = [{"id": k + 1, "image_id": i, "category_id": int(c), "bbox": xywh(b), "area": xywh(b)[2] * xywh(b)[3], "iscrowd": 0}
            for k, (i, c, b) in enumerate((i, c, b) for i, t in enumerate(truths) for c, b in zip(t["classes"], t["boxes"]))]
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in cats]}
    gt.createIndex()
    dets = [{"image_id": i, "category_id": int(c), "bbox": xywh(b), "score": float(s)}
            for i, p in enumerate(preds) for b, s, c in zip(p["boxes"], p["scores"], p["classes"])]
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.params.areaRng = [[0, 1e10]] * 4  # one area range: we do not split by object size
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats[0], ev.stats[1]


def _scene(rng, n_images=12):
    truths, preds = [], []
    for _ in range(n_images):
        m = rng.integers(1, 5)
        tl = rng.uniform(0, 60, (m, 2))
        boxes = np.concatenate([tl, tl + rng.uniform(8, 40, (m, 2))], axis=1)
        classes = rng.integers(0, 3, m)
        truths.append({"boxes": boxes, "classes": classes})
        jitter = boxes + rng.normal(0, 3, boxes.shape)
        extra = rng.integers(0, 3)
        etl = rng.uniform(0, 60, (extra, 2))
        pboxes = np.concatenate([jitter, np.concatenate([etl, etl + 20], axis=1)])
        pclasses = np.concatenate([np.where(rng.random(m) < 0.85, classes, (classes + 1) % 3), rng.integers(0, 3, extra)])
        preds.append({"boxes": pboxes, "classes": pclasses, "scores": rng.random(len(pboxes))})
    return preds, truths


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detection_map_matches_pycocotools(seed):
    preds, truths = _scene(np.random.default_rng(seed))
    ours = mean_average_precision(preds, truths)
    coco_map, coco_map50 = _coco_map(preds, truths)
    assert ours["map"] == pytest.approx(coco_map, abs=1e-6) and ours["map50"] == pytest.approx(coco_map50, abs=1e-6)
    assert 0.05 < ours["map"] < 0.95  # a scene where the figure can move both ways


def test_detection_map_caps_detections_per_image_and_class_as_pycocotools():
    """COCOeval keeps the 100 best detections of each class in an image, not 100 over all classes: with
    150 per image, most of them confident class 0/1 ones, capping over all classes drops class 2's."""
    rng = np.random.default_rng(0)
    truths, preds = [], []
    for _ in range(4):
        tl = rng.uniform(0, 60, (30, 2))
        boxes = np.concatenate([tl, tl + rng.uniform(8, 40, (30, 2))], axis=1)
        classes = rng.integers(0, 3, 30)
        truths.append({"boxes": boxes, "classes": classes})
        pick = rng.integers(0, 30, 150)
        pclasses = classes[pick]
        scores = np.where(pclasses == 2, rng.uniform(0, 0.3, 150), rng.uniform(0.3, 1, 150))
        preds.append({"boxes": boxes[pick] + rng.normal(0, 2, (150, 4)), "classes": pclasses, "scores": scores})
    ours = mean_average_precision(preds, truths)
    coco_map, coco_map50 = _coco_map(preds, truths)
    assert ours["map"] == pytest.approx(coco_map, abs=1e-6) and ours["map50"] == pytest.approx(coco_map50, abs=1e-6)


def test_detection_rounds_class_ids_an_int8_output_dequantizes_slightly_off():
    """A classes output dequantized from int8 reads 0.98 for class 1; truncated, every box scored as class 0."""
    boxes = np.array([[[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]]])
    labels = {"boxes": boxes, "classes": np.array([[1, 2]])}
    scorer = MetricSpec.build("detection").scorer()
    exact = {"boxes": boxes, "classes": np.array([[1.0, 2.0]]), "scores": np.array([[0.9, 0.8]]), "count": np.array([2.0])}
    off = {**exact, "classes": np.array([[0.98, 2.03]])}
    assert scorer.score(exact, labels)["value"] == pytest.approx(1.0)
    assert scorer.score(off, labels)["figures"] == scorer.score(exact, labels)["figures"]


def test_detection_reads_the_postprocess_layout_and_refuses_raw_anchors():
    boxes = np.array([[[0.1, 0.1, 0.5, 0.5], [0, 0, 0, 0]]])
    outputs = {"boxes": boxes, "classes": np.array([[2.0, 0.0]]), "scores": np.array([[0.9, 0.1]]), "count": np.array([1.0])}
    labels = {"boxes": np.array([[[0.1, 0.1, 0.5, 0.5], [0, 0, 0, 0]]]), "classes": np.array([[2, -1]])}
    scorer = MetricSpec.build("detection").scorer()
    scorer.check(labels, 1, "eval.npz")
    assert scorer.score(outputs, labels)["value"] == pytest.approx(1.0)
    with pytest.raises(MetricError, match="pass --decode module:function"):
        scorer.score({"regressors": np.zeros((1, 896, 16)), "classificators": np.zeros((1, 896, 1))}, labels)
    with pytest.raises(MetricError, match=r"needs labels 'y.classes' \(found: y.boxes\)"):
        scorer.check({"boxes": labels["boxes"]}, 1, "eval.npz")


def test_a_user_decoder_is_shipped_as_source_and_its_failures_are_named(tmp_path):
    mod = tmp_path / "mydecode.py"
    mod.write_text("import numpy as np\n"
                   "def decode(outputs):\n"
                   "    return [{'boxes': b[None], 'scores': [1.0], 'classes': [0]} for b in outputs['box']]\n"
                   "def broken(outputs):\n    raise KeyError('anchors')\n"
                   "def wrong(outputs):\n    return 3\n")
    spec = MetricSpec.build("detection", decode=f"{mod}:decode")
    shipped = MetricSpec.from_bytes(spec.to_bytes(), "eval.npz")
    mod.unlink()  # the device has only what was shipped
    labels = {"boxes": np.array([[[0.0, 0.0, 1.0, 1.0]]]), "classes": np.array([[0]])}
    assert shipped.scorer().score({"box": np.array([[0.0, 0.0, 1.0, 1.0]])}, labels)["value"] == pytest.approx(1.0)
    for func, message in (("broken", "raised KeyError: 'anchors'"), ("wrong", "one dict per sample")):
        spec = MetricSpec(task="detection", decode=f"{mod}:{func}", sources=shipped.sources)
        with pytest.raises(MetricError, match=message):
            spec.scorer().score({"box": np.array([[0.0, 0.0, 1.0, 1.0]])}, labels)



@pytest.mark.parametrize("returned, said", [
    ("np.zeros((1, 6))", r"sample 0 is not a dict of boxes \[K,4\], scores \[K\], classes \[K\] \(IndexError: "),
    ("{'boxes': [[0.0, 0.0, 1.0, 1.0]], 'scores': [1.0], 'classes': [float('nan')]}", "sample 0 has .* non-finite values"),
])
def test_a_user_decoder_returning_an_array_per_sample_or_a_nan_class_is_named(tmp_path, returned, said):
    """An array per sample (not a dict) raised IndexError out of the scorer: a traceback from edgekit compile. A NaN
    class id was cast to an integer (numpy's warning, 'invalid value encountered in cast', the only word) and scored."""
    mod = tmp_path / "mydecode.py"
    mod.write_text(f"import numpy as np\ndef decode(outputs):\n    return [{returned} for _ in outputs['box']]\n")
    scorer = MetricSpec.build("detection", decode=f"{mod}:decode").scorer()
    labels = {"boxes": np.array([[[0.0, 0.0, 1.0, 1.0]]]), "classes": np.array([[0]])}
    with pytest.raises(MetricError, match=f"--decode {mod}:decode: {said}"):
        scorer.score({"box": np.array([[0.0, 0.0, 1.0, 1.0]])}, labels)

def test_segmentation_miou_and_pixel_accuracy():
    mask = np.array([[[0, 0, 1, 1], [0, 0, 1, 255]]])
    logits = np.zeros((1, 2, 4, 2))
    logits[0, :, :2, 0] = 1  # predicts class 0 on the left half
    logits[0, 0, 2:, 1] = 1  # class 1 on the right of row 0
    logits[0, 1, 2, 0] = 2  # row 1, col 2: wrong (0 for 1); col 3 ignored
    got = MetricSpec.build("segmentation").scorer().score({"seg": logits}, {"mask": mask})
    # class 0: inter 4, union 5; class 1: inter 2, union 3
    assert got["figures"]["miou"] == pytest.approx((4 / 5 + 2 / 3) / 2) and got["figures"]["pixel_accuracy"] == pytest.approx(6 / 7)
    one_channel = {"prob": np.array([[[[0.9], [0.1]]]])}  # single-channel probability, thresholded at 0.5
    assert MetricSpec.build("segmentation").scorer().score(one_channel, {"mask": np.array([[[1, 0]]])})["value"] == 1.0
    # the same probability map channels-first, as an ONNX model's [N, 1, H, W] output comes
    nchw = {"prob": np.array([[[[0.9, 0.1], [0.2, 0.7]]]])}
    got = MetricSpec.build("segmentation").scorer().score(nchw, {"mask": np.array([[[1, 0], [0, 1]]])})
    assert got["value"] == 1.0
    got = MetricSpec.build("segmentation").scorer().score(nchw, {"mask": np.array([[[1, 0], [1, 1]]])})
    assert got["figures"]["pixel_accuracy"] == pytest.approx(3 / 4)


@pytest.mark.parametrize("h, w", [(16, 24), (20, 20)])
def test_segmentation_reads_multi_class_scores_channels_first_as_onnx_models_give_them(h, w):
    """[N, C, H, W] class scores (a PyTorch model through ONNX) were argmaxed over W: mIoU 0.005 for 0.76."""
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 3, (4, h, w))
    scores = rng.normal(size=(4, h, w, 3))
    np.put_along_axis(scores, mask[..., None], np.take_along_axis(scores, mask[..., None], -1) + 2.0, -1)
    scorer = MetricSpec.build("segmentation").scorer()
    nhwc = scorer.score({"seg": scores}, {"mask": mask})["figures"]
    assert 0.5 < nhwc["miou"] < 0.95
    assert scorer.score({"seg": np.moveaxis(scores, -1, 1)}, {"mask": mask})["figures"] == nhwc
    half = np.moveaxis(scores[:, ::2, ::2], -1, 1)  # a half-size NCHW map is resized to the mask as well
    assert scorer.score({"seg": half}, {"mask": mask[:, ::2, ::2]})["figures"] == \
        scorer.score({"seg": scores[:, ::2, ::2]}, {"mask": mask[:, ::2, ::2]})["figures"]


def test_segmentation_miou_leaves_out_classes_absent_from_labels_and_predictions():
    """Class 1 appears nowhere: the mean is over classes 0 and 2, not 0 for class 1 (nor 1)."""
    mask = np.array([[[0, 0, 2, 2], [0, 0, 2, 2]]])
    scores = np.zeros((1, 2, 4, 3))
    scores[0, :, [0, 1, 2], [0, 0, 2]] = 1
    scores[0, :, 3, 0] = 1  # the class-2 pixels of column 3 read as 0
    got = MetricSpec.build("segmentation").scorer().score({"seg": scores}, {"mask": mask})["figures"]
    assert got["miou"] == pytest.approx((4 / 6 + 2 / 4) / 2) and got["pixel_accuracy"] == pytest.approx(6 / 8)


def test_keypoints_pck_and_mean_error():
    points = np.array([[[0.0, 0.0], [10.0, 0.0], [10.0, 10.0]]])
    pred = points + np.array([[0.5, 0.0], [3.0, 0.0], [0.0, 0.0]])
    got = MetricSpec.build("keypoints", {"alpha": 0.1}).scorer().score({"lm": pred.reshape(1, -1)}, {"points": points})
    assert got["figures"]["pck"] == pytest.approx(2 / 3) and got["figures"]["mean_error"] == pytest.approx(3.5 / 3)


def test_regression_scores_as_keypoints_and_its_errors_name_regression():
    """`compile --task regression` with classification labels said "--task keypoints needs labels 'y.points'"."""
    from device_agents.errors import MetricError

    points = np.array([[[0.0, 0.0], [10.0, 0.0], [10.0, 10.0]]])
    scorer = MetricSpec.build("regression", {"alpha": 0.1}).scorer()
    assert scorer.score({"lm": points.reshape(1, -1)}, {"points": points})["figures"]["pck"] == 1.0
    with pytest.raises(MetricError) as caught:
        scorer.check({"y": np.zeros(1, dtype=np.int64)}, 1, "eval.npz")
    assert str(caught.value).startswith("eval.npz: --task regression needs labels 'y.points' (found: y)")


@pytest.mark.parametrize("label", [-1, 10, 10**12])
def test_a_class_label_the_output_does_not_have_is_an_error_not_a_top1_of_zero(label):
    y = np.array([3, label, 1])
    with pytest.raises(MetricError, match=rf"labels 'y' hold class {label} at sample 1, but the scored output has 10 classes"):
        MetricSpec.build("classification").scorer().score({"probs": np.eye(10)[[3, 0, 1]]}, {"y": y})


def test_an_option_the_task_does_not_read_is_refused_not_ignored(tmp_path):
    """Once a misspelt --task-option (outptu=scores) was stored and ignored: the first fitting output was scored."""
    with pytest.raises(MetricError, match=r"--task-option outptu: not an option of --task classification; "
                                          r"did you mean 'output'\? \(options: output\)"):
        MetricSpec.build("classification", {"outptu": "scores"})
    with pytest.raises(MetricError, match=r"--task-option output: not an option of --task detection \(options: none\)"):
        MetricSpec.build("detection", {"output": "boxes"})
    mod = tmp_path / "score.py"
    mod.write_text("def good(o, y):\n    return 1.0\n")
    with pytest.raises(MetricError, match=rf"--task-option alpha: not an option of --metric {mod}:good"):
        MetricSpec.build(None, {"alpha": "0.1"}, metric=f"{mod}:good")
    assert MetricSpec.build("regression", {"output": "lm", "alpha": "0.2"}).options == {"output": "lm", "alpha": "0.2"}


def test_a_user_metric_that_raises_or_returns_a_non_number_is_a_one_line_error(tmp_path):
    mod = tmp_path / "score.py"
    mod.write_text("def good(o, y):\n    return {'hits': 0.5, 'n': 2}\n"
                   "def nan(o, y):\n    return float('nan')\n"
                   "def text(o, y):\n    return 'high'\n"
                   "def boom(o, y):\n    return 1 / 0\n")
    got = MetricSpec.build(None, metric=f"{mod}:good").scorer().score({"o": np.zeros((2, 1))}, {"y": np.zeros(2)})
    assert got["task"] == "custom" and got["metric"] == "hits" and got["value"] == 0.5
    for func, message in (("nan", "value=nan"), ("text", "value='high'"), ("boom", "raised ZeroDivisionError")):
        with pytest.raises(MetricError, match=message):
            MetricSpec.build(None, metric=f"{mod}:{func}").scorer().score({"o": np.zeros((2, 1))}, {})
    with pytest.raises(MetricError, match="has no function 'missing'"):
        MetricSpec.build(None, metric=f"{mod}:missing")
    with pytest.raises(MetricError, match="unknown --task 'detect'; did you mean 'detection'"):
        MetricSpec.build("detect")


def test_user_code_prints_on_stderr_and_a_system_exit_in_it_is_a_one_line_error(tmp_path, capsys):
    """What a --metric or --decode module printed went to stdout, inside `edgekit compile --json`'s document; and a
    SystemExit in it (a script that parses its command line at import, sys.exit) ended edgekit there: argparse's usage,
    no error line, no JSON document, its exit code."""
    mod = tmp_path / "score.py"
    mod.write_text("import sys\nprint('loading')\n"
                   "def chatty(o, y):\n    print('scoring')\n    return 0.5\n"
                   "def quits(o, y):\n    sys.exit(3)\n"
                   "def decode(o):\n    print('decoding')\n"
                   "    return [{'boxes': [[0, 0, 1, 1]], 'scores': [1], 'classes': [0]}]\n")
    assert MetricSpec.build(None, metric=f"{mod}:chatty").scorer().score({"o": np.zeros((2, 1))}, {})["value"] == 0.5
    spec = MetricSpec.build("detection", decode=f"{mod}:decode")
    assert spec.scorer().score({"box": np.zeros((1, 4))}, {"boxes": np.array([[[0, 0, 1, 1]]]),
                                                          "classes": np.array([[0]])})["value"] == 1.0
    out, err = capsys.readouterr()
    assert out == "" and "loading" in err and "scoring" in err and "decoding" in err
    with pytest.raises(MetricError, match=f"--metric {mod}:quits raised SystemExit: 3"):
        MetricSpec.build(None, metric=f"{mod}:quits").scorer().score({"o": np.zeros((2, 1))}, {})
    script = tmp_path / "script.py"
    script.write_text("import argparse\nparser = argparse.ArgumentParser(prog='script')\n"
                      "parser.add_argument('--model', required=True)\nparser.parse_args()\n"
                      "def decode(o):\n    return []\n")
    with pytest.raises(MetricError, match=f"'{script}:decode': the module failed to load \\(SystemExit: 2\\)"):
        MetricSpec.build("detection", decode=f"{script}:decode")


def test_labels_of_strips_the_prefix():
    assert sorted(labels_of({"x": 1, "y": np.zeros(1), "y.boxes": np.zeros(1), "reference": 2})) == ["boxes", "y"]


@pytest.mark.parametrize("alpha", ["abc", "nan", "-1", "inf"])
def test_a_task_option_that_is_not_a_positive_number_is_a_one_line_error(alpha):
    points = np.zeros((1, 2, 2))
    with pytest.raises(MetricError, match=f"option alpha='{alpha}' must be a finite number above 0"):
        MetricSpec.build("keypoints", {"alpha": alpha}).scorer().score({"lm": points.reshape(1, -1)}, {"points": points})
    assert MetricSpec.build("keypoints", {"alpha": "0.2"}).scorer().score(
        {"lm": points.reshape(1, -1)}, {"points": points})["value"] == 1.0


def test_a_task_option_too_large_for_a_float_is_a_metric_error_not_an_overflow():
    from device_agents.metrics.base import positive_option

    with pytest.raises(MetricError, match=r"option iou=10{400} must be a finite number above 0"):
        positive_option({"iou": 10 ** 400}, "iou", 0.5, "detection")
    assert positive_option({}, "iou", 0.5, "detection") == 0.5
