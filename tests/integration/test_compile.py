"""`edgekit compile` end to end: real TensorFlow conversion, real LiteRT interpreter, real files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_kit.compiler.pipeline import CompileRequest, compile_model
from edge_kit.fsutil import sha256_file
from edge_kit.manifest import read_manifest
from edge_kit.profiles import load_profile

pytestmark = pytest.mark.integration

THREE = ["rpi4", "coral-usb", "jetson-orin-nano"]


@pytest.fixture(scope="module")
def compiled(digits_files, tmp_path_factory):
    """The digits model compiled for three profiles that share variants (no edgetpu_compiler on PATH); the pruned
    variants fine-tuned for 1 epoch (their fine-tuning is most of the compile; int8-pruned-ch50 scored 98.6 % top-1
    after 1, 99.2 % after 2)."""
    out = tmp_path_factory.mktemp("artifacts")
    manifest = compile_model(CompileRequest(
        digits_files.model, [load_profile(n) for n in THREE], out,
        calib=digits_files.calib, eval=digits_files.eval, train=digits_files.train, epochs=1))
    return out / "digits", manifest


def test_each_distinct_variant_is_built_once_and_listed_for_every_profile_using_it(compiled):
    folder, manifest = compiled
    ids = [a.id for a in manifest.artifacts]
    assert len(ids) == len(set(ids))
    assert set(ids) == {"fp32", "fp16", "dynamic-int8", "int8", "int8-pruned-50", "int8-pruned-ch50", "edgetpu",
                        "onnx-fp32", "onnx-fp16", "onnx-int8",  # rpi4 and the Jetson list ONNX Runtime variants too
                        "trt-fp16", "trt-int8"}  # the Jetson's TensorRT variants, engines built on the device
    assert manifest.artifact("int8").profiles == THREE
    assert manifest.artifact("int8-pruned-ch50").profiles == THREE
    assert manifest.artifact("fp16").profiles == ["rpi4", "jetson-orin-nano"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["manifest.json", "eval.npz", *(a.file for a in manifest.artifacts if a.status == "built"),
         *(a.calibration_table["file"] for a in manifest.artifacts if a.calibration_table)])


def test_the_eval_set_ships_with_the_fp32_reference_outputs(compiled, digits_files):
    folder, manifest = compiled
    assert manifest.eval["file"] == "eval.npz" and manifest.eval["reference"] == "fp32"
    with np.load(folder / "eval.npz") as shipped, np.load(digits_files.eval) as source:
        assert np.array_equal(shipped["x"], source["x"].astype(np.float32)) and np.array_equal(shipped["y"], source["y"])
        reference = shipped["reference"]
    from device_agents.inference import ModelRunner
    from device_agents.runtimes import get_runtime

    fp32 = ModelRunner(get_runtime("litert").interpreter(folder / "fp32.tflite")).predict(source_x(digits_files))
    assert reference.shape == (360, 10) and np.allclose(reference, fp32["output_0"], atol=1e-6)


def source_x(files):
    with np.load(files.eval) as npz:
        return npz["x"].astype(np.float32)


def test_manifest_records_hashes_sizes_and_versions(compiled, digits_files):
    folder, manifest = compiled
    on_disk = read_manifest(folder)
    assert on_disk == manifest
    assert manifest.model["sha256"] == sha256_file(digits_files.model)
    assert manifest.calibration["sha256"] == sha256_file(digits_files.calib)
    assert manifest.eval["metric"] == "top1" and manifest.train["samples"] > 1000
    assert manifest.versions["tensorflow"] and manifest.versions["ai_edge_litert"] and manifest.versions["edge_kit"]
    for a in manifest.artifacts:
        if a.status != "built":
            continue
        data = (folder / a.file).read_bytes()
        assert a.sha256 == sha256_file(folder / a.file) and a.bytes == len(data)
        assert 0 < a.gzip_bytes < a.bytes
        conv, runtime = ("CONV_2D", "LiteRT") if a.runtime == "litert" else ("Conv", "ONNX Runtime")
        assert a.macs > 0 and a.op_histogram[conv] == 3, a.id
        if a.built_on_device:  # trt-*: the engine exists only on the device; nothing measured here
            assert not a.accuracy.measured and "not measured on host" in a.accuracy.method
            continue
        assert a.accuracy.measured and a.accuracy.samples == 360 and runtime in a.accuracy.method
        assert a.fidelity.measured and a.fidelity.inputs == "digits-eval.npz"


def test_every_counted_figure_says_how_it_was_counted_and_older_manifests_still_load(compiled, tmp_path):
    """DESIGN.md promises a `method` for every figure; sizes, MACs, sparsity, weights, precision, the op histogram and
    the build time had none (the table's footnote said "counted from each file", the manifest nothing). Each built
    artifact now has `methods`, one per figure, naming the file it was counted from and what MACs leave out."""
    from edge_kit.compiler.analysis import MAC_OPS as TFLITE_MAC_OPS
    from edge_kit.compiler.onnx_variants import MAC_OPS as ONNX_MAC_OPS

    folder, _ = compiled
    data = json.loads((folder / "manifest.json").read_text())
    figures = {"bytes", "gzip_bytes", "precision", "op_histogram", "weights", "sparsity", "macs", "macs_nonzero",
               "build_seconds"}
    built = [a for a in data["artifacts"] if a["status"] == "built"]
    assert {a["runtime"] for a in built} == {"litert", "onnxruntime", "tensorrt"}
    for a in built:
        methods = a["methods"]
        assert set(methods) == figures and all(a[f] is not None for f in figures), a["id"]
        where, ops = (("the .tflite flatbuffer", TFLITE_MAC_OPS) if a["file"].endswith(".tflite")
                      else ("the ONNX graph", ONNX_MAC_OPS))
        assert methods["macs"].startswith(f"counted from {where}, for one inference (batch 1)")
        assert "not counted" in methods["macs"] and all(op in methods["weights"] for op in ops), a["id"]
        assert methods["gzip_bytes"].startswith("counted: ") and "perf_counter" in methods["build_seconds"]
    assert all(a.get("methods") is None for a in data["artifacts"] if a["status"] != "built")
    old = tmp_path / "digits"  # as compiled before the methods were recorded: still read, same figures
    old.mkdir()
    for a in data["artifacts"]:
        a.pop("methods", None)
    (old / "manifest.json").write_text(json.dumps(data))
    assert read_manifest(old).artifact("fp32").macs == compiled[1].artifact("fp32").macs


def test_precisions_are_read_from_the_files(compiled):
    _, manifest = compiled
    precision = {a.id: a.precision for a in manifest.artifacts if a.status == "built"}
    assert precision["fp32"] == "float32" and precision["fp16"] == "float16"
    assert precision["dynamic-int8"] == "dynamic-int8" and precision["int8"] == "int8"
    int8 = manifest.artifact("int8")
    (inp,), (out,) = int8.inputs, int8.outputs
    assert inp["dtype"] == "int8" and out["dtype"] == "int8" and inp["scale"] > 0 and inp["name"] == "image"


def test_int8_keeps_accuracy_and_shrinks_the_file(compiled):
    _, manifest = compiled
    fp32, int8 = manifest.artifact("fp32"), manifest.artifact("int8")
    assert fp32.fidelity.top1_agreement == 1.0 and fp32.fidelity.max_abs_error == 0.0
    assert int8.accuracy.value >= fp32.accuracy.value - 0.01
    assert int8.bytes <= 0.30 * fp32.bytes


def test_magnitude_pruning_zeroes_weights_and_shrinks_the_download(compiled):
    _, manifest = compiled
    fp32, pruned, int8 = (manifest.artifact(v) for v in ("fp32", "int8-pruned-50", "int8"))
    assert 0.49 <= pruned.sparsity <= 0.51
    assert pruned.macs == int8.macs and pruned.macs_nonzero < 0.55 * int8.macs
    assert pruned.gzip_bytes <= 0.20 * fp32.gzip_bytes
    assert pruned.fine_tuned["epochs"] == 1  # the request's, not the default 3


def test_channel_pruning_cuts_macs_and_bytes(compiled):
    _, manifest = compiled
    int8, ch = manifest.artifact("int8"), manifest.artifact("int8-pruned-ch50")
    assert ch.macs <= 0.55 * int8.macs and ch.bytes < 0.6 * int8.bytes
    assert ch.accuracy.value > 0.9  # fine-tuned on --train


def test_edgetpu_without_compiler_is_not_built_and_says_why(compiled):
    _, manifest = compiled
    etpu = manifest.artifact("edgetpu")
    assert etpu.status == "not-built" and etpu.sha256 is None and etpu.file is None
    assert "edgetpu_compiler not found on PATH" in etpu.reason
    tpu = manifest.artifact("int8").accelerators["edgetpu"]
    assert tpu["method"] == "rule-check" and tpu["first_fallback"] is None and tpu["ops_mapped"] == tpu["ops_total"]
    assert "edgetpu" not in manifest.artifact("fp16").accelerators  # fp16 is not built for a Coral profile
    # jetson-orin-nano runs LiteRT on xnnpack (its GPU through TensorRT): no LiteRT GPU count for a path never taken
    assert "gpu" not in manifest.artifact("fp16").accelerators


def test_compile_json_and_table(digits_files, tmp_path, run_cli, capsys):
    """One compile (each takes a while) seen both ways: the table it prints, then its manifest as --json prints it
    (the function the command calls for either; an unsigned --json compile: the dynamic-dimensions test below)."""
    from device_agents.identity import Signer
    from edge_kit.cli.compile import _print_result
    from edge_kit.manifest import ArtifactTrust, read_manifest

    signer = Signer.generate()
    signer.save(tmp_path / "release.key")
    code, out, err = run_cli("compile", digits_files.model, "-p", "coral-usb", "--calib", digits_files.calib,
                             "--out", tmp_path, "--sign-key", tmp_path / "release.key")
    assert code == 0 and "int8-pruned-ch50" in out and "edgetpu_compiler not found" in out, err
    assert f"signed by key {signer.key_id}" in out
    trusted = read_manifest(tmp_path / "digits", ArtifactTrust((signer.public,), required=True))
    assert trusted.signature == f"signed by key {signer.key_id} (trusted)"
    _print_result(trusted, tmp_path / "digits", True, signer)
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == "edgekit.manifest/2"
    assert {a["id"]: a["status"] for a in data["artifacts"]} == {
        "fp32": "built", "int8": "built", "int8-pruned-ch50": "built", "edgetpu": "not-built"}
    assert data["artifacts"][0]["accuracy"]["method"] == "not measured: no --eval data"
    assert data["key_id"] == signer.key_id and data["sig"]  # signed as written


def test_missing_calibration_leaves_int8_variants_not_built(digits_files, tmp_path, run_cli):
    """Without --eval or --calib every variant's fidelity was "not measured: no --eval or --calib inputs". Each one
    the host runs is measured against fp32 on the seeded random samples an ONNX conversion check uses now, and the
    manifest and the table's note say it is on random samples, never taken for a figure of real inputs."""
    from edge_kit.compiler.data import random_inputs

    code, out, err = run_cli("compile", digits_files.model, "-p", "rpi5", "--out", tmp_path)
    assert code == 0, err
    m = read_manifest(tmp_path / "digits")
    assert m.artifact("fp32").status == "built" and m.artifact("dynamic-int8").status == "built"
    assert m.artifact("int8").status == "not-built" and "--calib" in m.artifact("int8").reason
    said = random_inputs({name: tuple(shape) for name, shape in m.model["inputs"].items()}, {})[1]
    assert said.startswith("4 random samples (no --eval or --calib given): 'image' "), said
    for vid, floor in (("fp16", 60), ("dynamic-int8", 30)):
        fid = m.artifact(vid).fidelity
        assert fid.measured and fid.samples == 4 and fid.inputs == said and fid.snr_db > floor, (vid, fid)
        assert fid.method.endswith("against the fp32 variant's outputs") and set(fid.outputs) == {"output_0"}, fid
    assert m.artifact("int8").fidelity is None and m.artifact("fp16").accuracy.measured is False
    note = " ".join(out.split())  # the table's note, wrapped to the terminal
    assert "SNR against fp32 (worst output) on 4 random samples (no --eval or --calib given), a check that is no " \
        "figure of real inputs (selection never uses it), measured on this host" in note, note


def test_a_float_tflite_input_gives_every_variant_but_pruning(compiled, digits_files, tmp_path):
    folder, manifest = compiled
    src = tmp_path / "digits.tflite"
    src.write_bytes((folder / "fp32.tflite").read_bytes())
    m = compile_model(CompileRequest(src, [load_profile("rpi4")], tmp_path / "out", calib=digits_files.calib,
                                     eval=digits_files.eval))
    status = {a.id: (a.status, a.derived_from) for a in m.artifacts}
    assert status["fp32"] == ("built", "source .tflite as is")
    assert m.artifact("fp32").sha256 == manifest.artifact("fp32").sha256
    assert status["dynamic-int8"] == ("built", "ai-edge-quantizer dynamic_wi8_afp32")
    assert status["fp16"] == ("built", "ai-edge-quantizer float16 weight casting")
    assert status["int8"][0] == "built" and "static_wi8_ai8" in status["int8"][1]
    assert "min/max over all of --calib" in status["int8"][1]
    assert [m.artifact(v).precision for v in ("fp16", "dynamic-int8", "int8")] == ["float16", "dynamic-int8", "int8"]
    int8 = m.artifact("int8")
    assert int8.inputs[0]["dtype"] == "int8" and int8.accuracy.value > 0.9 and int8.fidelity.top1_agreement > 0.95
    for vid in ("int8-pruned-50", "int8-pruned-ch50"):
        assert status[vid][0] == "not-built" and "pruning needs the Keras model" in m.artifact(vid).reason


def test_an_int8_tflite_input_can_go_to_the_edgetpu_but_not_back_to_float(compiled, tmp_path):
    folder, _ = compiled
    src = tmp_path / "q.tflite"
    src.write_bytes((folder / "int8.tflite").read_bytes())
    m = compile_model(CompileRequest(src, [load_profile("coral-devboard")], tmp_path / "out"))
    assert m.artifact("int8").status == "built" and m.artifact("int8").derived_from == "source .tflite as is"
    assert "edgetpu_compiler not found" in m.artifact("edgetpu").reason
    assert "cannot be made from a int8 .tflite file" in m.artifact("fp32").reason


@pytest.fixture
def dynamic_tflite(tmp_path):
    """A float .tflite whose input 'image' is [-1, -1, -1, 3] (height and width dynamic), as exporters write it."""
    import keras

    from edge_kit.compiler.tf_quiet import captured_output, tensorflow

    tf = tensorflow()
    inp = keras.Input((None, None, 3), name="image")
    y = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    y = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(y)
    model = keras.Model(inp, keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(y)))
    with captured_output():
        data = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    path = tmp_path / "dyn.tflite"
    path.write_bytes(data)
    return path


def test_a_tflite_with_dynamic_dimensions_is_pinned_by_input_shape(dynamic_tflite, tmp_path, run_cli):
    from edge_kit.compiler.analysis import analyse

    assert analyse(dynamic_tflite.read_bytes()).inputs[0]["shape_signature"] == [-1, -1, -1, 3]
    rng = np.random.default_rng(0)
    x = np.cumsum(np.cumsum(rng.normal(size=(24, 32, 32, 3)), 1), 2).astype(np.float32)  # smooth, image-like
    np.savez(tmp_path / "calib.npz", x=x / np.abs(x).max())
    code, out, err = run_cli("compile", dynamic_tflite, "-p", "rpi4", "--calib", tmp_path / "calib.npz",
                             "--input-shape", "image=1x32x32x3", "--out", tmp_path / "o", "--json")
    assert code == 0, err
    assert "key_id" not in json.loads(out) and "sig" not in json.loads(out)  # unsigned without --sign-key
    manifest = read_manifest(tmp_path / "o" / "dyn")
    assert manifest.model["inputs"] == {"image": [32, 32, 3]}
    built = {a.id: a for a in manifest.artifacts if a.status == "built"}
    assert set(built) == {"fp32", "fp16", "dynamic-int8", "int8"}
    # 32x32x(3x3x3x8) + 16x16x(3x3x8x8) + 8x4: the shapes are propagated through the graph, not only set on the input
    expected_macs = 32 * 32 * 216 + 16 * 16 * 576 + 32
    for a in built.values():
        assert a.inputs[0]["shape"] == [1, 32, 32, 3] and a.inputs[0]["shape_signature"] == [1, 32, 32, 3], a.id
        assert a.macs == expected_macs, a.id
        assert a.fidelity.measured and a.fidelity.outputs, a.id
    assert built["int8"].inputs[0]["dtype"] == "int8" and built["int8"].fidelity.snr_db > 20

    # left dynamic: one line naming the input and the option that pins it; nothing written
    code, _, err = run_cli("compile", dynamic_tflite, "-p", "rpi4", "--out", tmp_path / "o2")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "input 'image'" in line and "dynamic dimension" in line and "--input-shape image=1x" in line
    assert not (tmp_path / "o2" / "dyn").exists()
    # a pin that fights a static dimension, or names no input
    for spec, words in (("image=1x32x32x4", "does not fit the declared shape"), ("img=1x32x32x3", "'img', which is not an input")):
        code, _, err = run_cli("compile", dynamic_tflite, "-p", "rpi4", "--input-shape", spec, "--out", tmp_path / "o3")
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_a_tflites_input_shapes_are_pinned_in_a_child_first_not_in_the_compilers_process(dynamic_tflite, monkeypatch):
    """Pinning resizes and allocates the user's file in the LiteRT interpreter at shapes no child had run it at:
    that ran in the compiler's own process, before the smoke check of the result. Made to fail here, it must not
    run here (the child imports its own)."""
    from edge_kit.compiler import tflite_edit
    from edge_kit.compiler.sources import load_source

    def in_process(*args, **kwargs):
        raise AssertionError("pin_inputs ran in the compiler's own process")

    monkeypatch.setattr(tflite_edit, "pin_inputs", in_process)
    source = load_source(dynamic_tflite, {"image": (32, 32, 3)})
    assert source.inputs == {"image": (32, 32, 3)}
    from edge_kit.compiler.analysis import analyse

    assert analyse(source.tflite).inputs[0]["shape_signature"] == [1, 32, 32, 3]


def test_savedmodel_and_h5_inputs(digits_files, tmp_path):
    import keras

    model = keras.models.load_model(digits_files.model, compile=False)
    model.export(str(tmp_path / "sm"), verbose=False)
    model.save(tmp_path / "d.h5")
    profile = tmp_path / "p.yaml"
    profile.write_text("description: t\nhardware: {arch: x86_64, cpu: x, cores: 1, ram_mb: 1}\nruntime: {}\n"
                       "variants: [fp32, int8, int8-pruned-50]\npower: {idle_w: 1, busy_w: 2}\n")
    for src in (tmp_path / "sm", tmp_path / "d.h5"):
        m = compile_model(CompileRequest(src, [load_profile(profile)], tmp_path / "out",
                                         calib=digits_files.calib, eval=digits_files.eval))
        assert m.artifact("int8").status == "built" and m.artifact("int8").accuracy.value > 0.9
        if src.name == "sm":
            assert m.model["format"] == "savedmodel"
            assert "pruning needs the Keras model" in m.artifact("int8-pruned-50").reason
        else:
            assert m.artifact("int8-pruned-50").status == "built"


def test_structured_pruning_on_a_mobilenet_style_model_and_refusal_when_no_channel_may_go():
    import keras

    from edge_kit.compiler.pruning import channel_prune
    from edge_kit.errors import CompileError
    from edge_kit.examples import mobilenet_model

    model = mobilenet_model(size=32, alpha=0.25)
    pruned = channel_prune(model, 0.5)
    x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    assert pruned(x).shape == (2, 10)
    assert pruned.count_params() < 0.4 * model.count_params()

    # the conv is tied to the model input by the residual add, the Dense is the output: nothing to remove
    # (residual models in general are pruned: tests/host/test_pruning.py)
    inp = keras.Input((8, 8, 4))
    y = keras.layers.Conv2D(4, 3, padding="same")(inp)
    y = keras.layers.Add()([inp, y])
    out = keras.layers.Dense(2)(keras.layers.Flatten()(y))
    with pytest.raises(CompileError, match="no Conv or Dense layer whose channels may be removed"):
        channel_prune(keras.Model(inp, out), 0.5)


def test_channel_pruning_keeps_the_function_of_surviving_channels():
    """Pruning 0 % must give the same outputs: the slicing of every layer type is consistent."""
    from edge_kit.compiler.pruning import channel_prune
    from edge_kit.examples import mobilenet_model

    model = mobilenet_model(size=32, alpha=0.25)
    same = channel_prune(model, 0.0)
    x = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(same(x)), np.asarray(model(x)), rtol=1e-4, atol=1e-4)


def test_a_variant_computing_nan_where_fp32_does_not_is_failed_not_shipped(digits_files, tmp_path, monkeypatch):
    """A variant whose outputs hold NaN on the eval inputs (an int8 model that overflows, a broken
    kernel) was 'built' with its fidelity 'not measured', and selection could pick it; now it is
    failed with the output and sample named, and no file of it is written."""
    from edge_kit.compiler.analysis import ChildInference, analyse

    real = ChildInference.__call__  # the run over the eval set, in a child: its outputs come back here

    def run(self, data):
        out = real(self, data)
        if analyse(data).inputs[0]["dtype"] == "int8":  # the full-int8 variant only
            out = {k: v.copy() for k, v in out.items()}
            next(iter(out.values()))[3] = np.nan
        return out

    monkeypatch.setattr(ChildInference, "__call__", run)
    profile = load_profile("rpi4").model_copy(update={"variants": ["fp32", "dynamic-int8", "int8"]})
    manifest = compile_model(CompileRequest(digits_files.model, [profile], tmp_path, calib=digits_files.calib,
                                            eval=digits_files.eval))
    int8 = manifest.artifact("int8")
    assert int8.status == "failed" and "holds NaN or infinity on digits-eval.npz (first at sample 3)" in int8.reason, int8
    assert manifest.artifact("dynamic-int8").status == manifest.artifact("fp32").status == "built"
    assert not (tmp_path / "digits" / "int8.tflite").exists()


def test_broken_outputs_names_the_first_output_and_sample():
    from edge_kit.compiler.pipeline import broken_outputs

    ok = {"y": np.zeros((4, 3), np.float32)}
    bad = {"y": np.zeros((4, 3), np.float32), "z": np.zeros((4, 2), np.float32)}
    bad["z"][2, 1] = np.inf
    assert broken_outputs({"fp32": ok, "int8": ok}, None) == {}
    assert list(broken_outputs({"fp32": ok, "int8": bad}, None)) == ["int8"]
    assert "output 'z' holds NaN or infinity (first at sample 2)" in broken_outputs({"fp32": ok, "int8": bad}, None)["int8"]
    assert broken_outputs({"fp32": bad, "int8": bad}, None) == {}  # fp32 itself is not finite: judged before


def test_calibrating_or_fine_tuning_on_the_eval_set_is_warned_and_recorded(digits_files, tmp_path):
    """--calib (or --train) holding the --eval samples flattered accuracy without a word; held-out data counts 0."""
    profile = load_profile("rpi4").model_copy(update={"variants": ["fp32"]})
    with pytest.warns(UserWarning) as said:
        m = compile_model(CompileRequest(digits_files.model, [profile], tmp_path / "leak", calib=digits_files.eval,
                                         eval=digits_files.eval, train=digits_files.eval))
    samples = m.eval["samples"]
    assert m.calibration["eval_overlap"] == samples and m.train["eval_overlap"] == samples
    assert m.calibration["samples_used"] == {"litert": samples, "onnxruntime": 256, "tensorrt": 256}  # first N, file order
    assert "flatter the int8 accuracy" in m.calibration["eval_overlap_warning"]
    assert "fine-tuned on eval samples" in m.train["eval_overlap_warning"]
    assert {str(w.message) for w in said} >= {m.calibration["eval_overlap_warning"], m.train["eval_overlap_warning"]}
    m = compile_model(CompileRequest(digits_files.model, [profile], tmp_path / "held", calib=digits_files.calib,
                                     eval=digits_files.eval, train=digits_files.train))
    assert m.calibration["eval_overlap"] == 0 and m.calibration["eval_overlap_warning"] is None
    assert m.train["eval_overlap"] == 0 and m.calibration["eval_range_warning"] is None


def test_labels_the_fp32_variant_scores_zero_on_are_warned_and_recorded(digits_files, tmp_path):
    """Labels in another numbering than the outputs gave top-1 0 % for every variant and no word."""
    import keras

    data = dict(np.load(digits_files.eval))
    predicted = keras.models.load_model(digits_files.model, compile=False).predict(data["x"], verbose=0).argmax(1)
    np.savez(tmp_path / "e.npz", x=data["x"], y=(predicted + 1) % 10)  # never the class the model gives
    profile = load_profile("rpi4").model_copy(update={"variants": ["fp32"]})
    with pytest.warns(UserWarning, match=r"e.npz: the fp32 variant scores top1 0 on it, so every variant will"):
        m = compile_model(CompileRequest(digits_files.model, [profile], tmp_path / "o", eval=tmp_path / "e.npz"))
    assert m.artifact("fp32").accuracy.value == 0.0 and "labels probably do not match" in m.eval["warning"]
    m = compile_model(CompileRequest(digits_files.model, [profile], tmp_path / "o", eval=digits_files.eval))
    assert "warning" not in m.eval


def test_the_examples_figures_say_how_they_were_obtained(tmp_path, run_cli, monkeypatch):
    """`edgekit example digits` printed `keras_eval_accuracy: 0.9944` (and mobilenet its params) with nothing saying
    what measured or counted them."""
    import functools

    from edge_kit import examples

    # trained for 1 epoch, not 30: what the figure's words say, not the figure, is checked
    monkeypatch.setattr(examples, "digits", functools.partial(examples.digits, epochs=1))
    code, out, err = run_cli("example", "digits", "--out", tmp_path / "digits")
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if "keras_eval_accuracy" in ln)
    assert ("(measured on this host: Keras model.evaluate (top-1 accuracy) of the trained float model on the 360 "
            "samples of digits-eval.npz)") in line
    code, out, err = run_cli("example", "mobilenet", "--out", tmp_path / "mobilenet", "--json")
    data = json.loads(out)
    assert code == 0 and data["params"] > 0
    assert data["methods"] == {"params": "counted: Keras Model.count_params() of the model as written"}


def test_without_data_random_samples_a_tflite_source_does_not_take_are_left_out_of_its_variants_fidelity(tmp_path):
    """``y = sqrt(x @ w)`` (w positive) is NaN on one of a standard normal sample and its negation: that sample is
    left out of every variant's random-sample fidelity, counted and said so, as for an ONNX model's conversion check
    (the variants of a .tflite source had no fidelity at all without --eval or --calib)."""
    from edge_kit.compiler.tf_quiet import tensorflow

    tf = tensorflow()
    w = tf.constant(np.linspace(0.5, 2, 12, dtype=np.float32).reshape(4, 3))

    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32, name="x")])
    def model(x):
        return {"y": tf.sqrt(tf.matmul(tf.reduce_sum(x, axis=1, keepdims=True) * tf.ones([1, 4]), w))}

    converter = tf.lite.TFLiteConverter.from_concrete_functions([model.get_concrete_function()], model)
    (tmp_path / "root.tflite").write_bytes(converter.convert())
    profile = load_profile("rpi4").model_copy(update={"variants": ["fp32", "fp16"]})
    fid = compile_model(CompileRequest(tmp_path / "root.tflite", [profile], tmp_path / "out")).artifact("fp16").fidelity
    assert fid.measured and fid.samples == 3 and fid.snr_db > 40, fid
    assert fid.inputs == ("4 random samples (no --eval or --calib given): 'x' 2 uniform in [0, 1), then 1 standard "
                          "normal and its negation (1 left out: the fp32 variant's outputs are NaN or infinity on them, "
                          "inputs the model does not take)"), fid.inputs


def test_a_fidelity_below_a_profiles_floor_on_random_samples_is_not_said_to_stop_selection():
    """The warning for a variant below a profile's ``min_fidelity_snr_db`` said "selection will not choose it there":
    selection judges the fidelity a device measures on the eval set, which a data-less compile ships none of. On random
    samples the warning says where the figure came from and to check with --eval instead."""
    from edge_kit.compiler.data import random_inputs
    from edge_kit.compiler.pipeline import _fidelity_warnings
    from edge_kit.manifest import Artifact, Fidelity

    profile = load_profile("rpi4")
    profile = profile.model_copy(update={"constraints": profile.constraints.model_copy(update={"min_fidelity_snr_db": 30}),
                                         "variants": ["fp16"]})
    fid = Fidelity(measured=True, snr_db=12.0, outputs={"y": {"snr_db": 12.0}}, samples=4, method="measured",
                   inputs=random_inputs({"x": (4,)}, {})[1])
    artifact = Artifact(id="fp16", status="built", profiles=[profile.name], summary="fp16", precision="float16",
                        fidelity=fid)
    assert _fidelity_warnings(artifact, [profile]) == [
        "fp16: output 'y' is 12.0 dB from fp32, below rpi4's min_fidelity_snr_db 30: it may compute something else on "
        "random samples, so check it with --eval data (selection judges fidelity on the eval set only)"]
    on_file = artifact.model_copy(update={"fidelity": fid.model_copy(update={"inputs": "calib.npz"})})
    assert _fidelity_warnings(on_file, [profile])[0].endswith("selection will not choose it there")
