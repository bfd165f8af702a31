"""Token ids through the quantized variants. A model taking integer ids (an embedding) is compiled with a float32
input cast inside; its full-integer variants quantized that input like any other, with the scale the calibration ids
span (ids 0..299: 1.17), so most ids reached the cast as a neighbouring id and the int8 variant computed something
else (0.8 dB from fp32, top-1 50 %) while its manifest said "int8" and nothing more. Built here with onnx.helper and
Keras, compiled for real (onnx2tf, the TFLite converter, ai-edge-quantizer, ONNX Runtime's quantizer), and run with
the runtimes the devices use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROWS = 300  # ids above 127 and 255: what an int8 or uint8 input could not carry even at scale 1


def embedding_onnx(path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Write an ONNX model taking int64 ids [N, 8] -> Gather (a stored ROWS x 16 table) -> ReduceMean over the ids
    -> MatMul (16 x 5) -> ``y`` [N, 5]; return it with its table and weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    table = rng.normal(0, 1, (ROWS, 16)).astype(np.float32)
    w = rng.normal(0, 1, (16, 5)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
             helper.make_node("ReduceMean", ["rows"], ["mean"], axes=[1], keepdims=0),
             helper.make_node("MatMul", ["mean", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 5])],
                              [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path, table, w


def embedding_keras(path: Path, rows: int, ids: str = "int64", cast: str | None = None):
    """Write a Keras model taking ``ids`` [N, 8] -> Embedding(rows, 16) -> mean over the ids -> Dense 5 ``y`` to
    ``path`` (.keras), the ids cast to ``cast`` first when given; return the model."""
    from edge_kit.compiler.tf_quiet import tensorflow

    tensorflow()
    import keras

    keras.utils.set_random_seed(0)
    ids_in = keras.Input((8,), dtype=ids, name="ids")
    looked_up = keras.ops.cast(ids_in, cast) if cast else ids_in
    hidden = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(rows, 16, name="emb")(looked_up))
    model = keras.Model(ids_in, keras.layers.Dense(5, name="y")(hidden))
    model.save(path)
    return model


def id_files(folder: Path, reference) -> tuple[Path, Path, np.ndarray]:
    """Write ``calib.npz`` (160 samples of ids 0..ROWS-1) and ``eval.npz`` (32 samples, the last 16 all above 255,
    labelled with ``reference``'s argmax) as int64; return both and the eval ids."""
    rng = np.random.default_rng(2)
    np.savez(folder / "calib.npz", x=rng.integers(0, ROWS, (160, 8)))
    ids = np.concatenate([rng.integers(0, ROWS, (16, 8)), rng.integers(256, ROWS, (16, 8))])
    np.savez(folder / "eval.npz", x=ids, y=np.asarray(reference(ids)).argmax(1))
    return folder / "calib.npz", folder / "eval.npz", ids


def run_variant(folder: Path, artifact: dict, ids: np.ndarray) -> tuple[dict, np.ndarray]:
    """Return the variant's first input port and its outputs on ``ids``, run as the agent runs it (its runtime,
    inputs quantized and outputs dequantized by :class:`device_agents.inference.ModelRunner`)."""
    from device_agents.inference import ModelRunner
    from device_agents.runtimes import get_runtime

    runner = ModelRunner(get_runtime(artifact["runtime"]).interpreter((folder / artifact["file"]).read_bytes()))
    return runner.inputs[0], runner.predict(ids.astype(np.float32))["y"]


def test_every_quantized_variant_of_an_onnx_embedding_model_takes_its_ids_exactly(tmp_path, run_cli):
    """int8 (ai-edge-quantizer from the onnx2tf conversion) took its ids as int8 at scale 1.17: id 298 became 297.
    Each quantized variant now keeps the ids input float32 and follows fp32 on ids above 127 and 255 too."""
    from device_agents.inference import output_fidelity

    model, table, w = embedding_onnx(tmp_path / "emb.onnx")

    def reference(ids):
        return table[ids].mean(axis=1) @ w

    calib, evalset, ids = id_files(tmp_path, reference)
    code, _, err = run_cli("compile", model, "-p", "rpi4", "--calib", calib, "--eval", evalset, "--out", tmp_path / "o")
    assert code == 0, err
    folder = tmp_path / "o" / "emb"
    artifacts = {a["id"]: a for a in json.loads((folder / "manifest.json").read_text())["artifacts"]}
    expected = reference(ids)
    for vid in ("fp16", "dynamic-int8", "int8", "onnx-int8"):
        artifact = artifacts[vid]
        assert artifact["status"] == "built", (vid, artifact["reason"])
        assert artifact["inputs"][0]["dtype"] == "float32" and artifact["inputs"][0]["scale"] is None, vid
        port, out = run_variant(folder, artifact, ids)
        assert port.dtype == np.float32 and not port.scale, vid
        for part, rows in (("all", slice(None)), ("ids 256..299", slice(16, None))):
            fid = output_fidelity(out[rows], expected[rows], classes=True)
            assert fid["snr_db"] > 20 and fid["top1_agreement"] >= 0.9, (vid, part, fid)  # int8 was 0.8 dB, top-1 50 %
        assert artifact["fidelity"]["snr_db"] > 20, (vid, artifact["fidelity"])
    assert artifacts["int8"]["precision"] == "int8"  # the rest stays full-integer: int8 weights and activations
    assert "input 'ids' kept float32" in artifacts["int8"]["derived_from"], artifacts["int8"]["derived_from"]


def test_a_float64_input_is_quantized_as_any_float_input_not_kept_as_ids(tmp_path, run_cli):
    """skl2onnx gives tabular models a DOUBLE input cast to float: it is no id. Taken for one, its int8 variant
    failed ("input 'x' (ids, cast inside the model) was quantized and is read by FULLY_CONNECTED"), where it had
    built before ids were kept float32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (8, 5)).astype(np.float32)
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["xf", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [None, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 5])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "tab.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.normal(0, 1, (100, 8)))
    x = rng.normal(0, 1, (32, 8))
    np.savez(tmp_path / "eval.npz", x=x, y=(x.astype(np.float32) @ w).argmax(1))
    profile = tmp_path / "tab.yaml"
    profile.write_text("name: tab\ndescription: test\nhardware: {arch: aarch64, cpu: cortex-a72, cores: 4, ram_mb: 4096, "
                       "accelerator: none}\nruntime: {engine: litert, delegate: xnnpack, threads: 4}\n"
                       "variants: [fp32, int8]\nconstraints: {max_latency_p90_ms: 50}\n"
                       "power: {sensors: [], idle_w: 2.7, busy_w: 6.4}\n")
    code, _, err = run_cli("compile", tmp_path / "tab.onnx", "-p", profile, "--calib", tmp_path / "calib.npz",
                           "--eval", tmp_path / "eval.npz", "--out", tmp_path / "o")
    assert code == 0, err
    int8 = next(a for a in json.loads((tmp_path / "o" / "tab" / "manifest.json").read_text())["artifacts"]
                if a["id"] == "int8")
    assert int8["status"] == "built" and "kept float32" not in int8["derived_from"], int8
    assert int8["fidelity"]["snr_db"] > 20, int8["fidelity"]


def test_the_int8_and_pruned_int8_variants_of_a_keras_embedding_model_keep_the_ids_float(tmp_path, run_cli):
    """The TFLite converter's full-integer conversion (int8, and int8-pruned-S after pruning) quantized a Keras
    model's id input the same way (0.3 dB from fp32); the ids input now stays float32 there too."""
    model = embedding_keras(tmp_path / "emb.keras", ROWS)
    calib, evalset, ids = id_files(tmp_path, model)
    rpi4 = (Path(__file__).parents[2] / "profiles" / "rpi4.yaml").read_text()  # its variants under test only
    (tmp_path / "ids.yaml").write_text(rpi4.replace("name: rpi4", "name: ids").replace(
        "variants: [fp32, fp16, dynamic-int8, int8, int8-pruned-50, int8-pruned-ch50, onnx-fp32, onnx-int8]",
        "variants: [fp32, int8, int8-pruned-50]"))
    code, _, err = run_cli("compile", tmp_path / "emb.keras", "-p", tmp_path / "ids.yaml", "--calib", calib,
                           "--eval", evalset, "--out", tmp_path / "o")
    assert code == 0, err
    folder = tmp_path / "o" / "emb"
    artifacts = {a["id"]: a for a in json.loads((folder / "manifest.json").read_text())["artifacts"]}
    for vid in ("int8", "int8-pruned-50"):
        artifact = artifacts[vid]
        assert artifact["status"] == "built" and artifact["precision"] == "int8", (vid, artifact["reason"])
        assert artifact["inputs"][0]["dtype"] == "float32" and artifact["inputs"][0]["scale"] is None, vid
        assert "DEQUANTIZE" not in artifact["op_histogram"], (vid, artifact["op_histogram"])  # ids go straight to CAST
        port, _ = run_variant(folder, artifact, ids)
        assert port.dtype == np.float32 and not port.scale, vid
    assert artifacts["int8"]["fidelity"]["snr_db"] > 20, artifacts["int8"]["fidelity"]  # -0.3 dB before
    assert artifacts["int8"]["accuracy"]["value"] >= 0.9, artifacts["int8"]["accuracy"]


def test_an_id_input_a_quantized_op_reads_fails_the_variant_in_one_line_naming_it(tmp_path):
    """Only a DEQUANTIZE reading the quantized ids can be taken out (its float32 result becomes the input); an id
    input a quantized op reads itself cannot get its ids back exactly, so that variant fails saying why and what to
    do, instead of being written with ids rounded to other ids."""
    import pytest

    from edge_kit.compiler.convert import quantize_tflite
    from edge_kit.compiler.pipeline import _exact_ids
    from edge_kit.compiler.sources import Source
    from edge_kit.compiler.tf_quiet import tensorflow
    from edge_kit.compiler.tflite_edit import as_float32, float_id_inputs
    from edge_kit.errors import CompileError
    from edge_kit.variants import parse_variant

    tf = tensorflow()
    w = tf.constant(np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3))

    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32, name="ids")])
    def model(ids):
        return {"y": tf.matmul(ids, w)}

    fp32 = tf.lite.TFLiteConverter.from_concrete_functions([model.get_concrete_function()], model).convert()
    calib = {"ids": np.random.default_rng(0).integers(0, 300, (20, 4)).astype(np.float32)}
    int8 = quantize_tflite(as_float32(bytes(fp32))[0], "int8", calib, variant="int8")  # FULLY_CONNECTED reads the int8 input
    assert float_id_inputs(int8, ["other"]) == (int8, [])  # not an id input: left as it is
    source = Source(tmp_path / "m.onnx", "onnx", "0" * 64, "m", {"ids": (4,)}, ["y"], input_types={"ids": "int64"})
    with pytest.raises(CompileError) as raised:
        _exact_ids(parse_variant("int8"), source, int8, "made")
    assert str(raised.value) == (
        "variant int8: input 'ids' (ids, cast inside the model) was quantized and is read by FULLY_CONNECTED, not only "
        "by DEQUANTIZE, so it cannot take exact ids; leave int8 out (the float variants take ids exactly)")


def test_without_data_every_variant_of_an_onnx_embedding_model_is_measured_on_ids_its_table_has(tmp_path):
    """Without --eval or --calib only the conversion was checked on random ids; the variants had no fidelity ("not
    measured: no --eval or --calib inputs"). Each is measured against fp32 on the same random ids now, drawn from the
    table's 300 rows (ids the model takes), and ``fidelity.inputs`` says they are random."""
    from edge_kit.compiler.pipeline import CompileRequest, compile_model
    from edge_kit.profiles import load_profile

    model, _, _ = embedding_onnx(tmp_path / "emb.onnx")
    profile = load_profile("rpi4").model_copy(update={"variants": ["fp32", "fp16", "onnx-fp32"]})
    manifest = compile_model(CompileRequest(model, [profile], tmp_path / "out"))
    said = ("4 random samples (no --eval or --calib given): 'ids' whole numbers uniform in 0..299 (the 300 rows of "
            "Gather table 'table')")
    assert manifest.model["conversion"]["inputs"] == said
    for vid in ("fp16", "onnx-fp32"):
        fid = manifest.artifact(vid).fidelity
        assert fid.measured and fid.samples == 4 and fid.inputs == said and fid.snr_db > 40, (vid, fid)


@pytest.mark.parametrize("kind", ["keras", "tflite"])
def test_without_data_a_keras_or_tflite_embedding_is_measured_on_ids_its_table_has(tmp_path, kind):
    """A Keras model's Embedding, and a .tflite's GATHER, were not read for the ids they take: the random ids were
    edge-kit's default 0..99, which a 7-row table refuses past 6, so no variant's fidelity was measured. The ids are
    drawn from the table's rows now (the Embedding's input_dim; the GATHER's table, which Keras reaches through
    SELECT(ids < 0, ids + 7, ids)), and every variant is measured on them."""
    from edge_kit.compiler.pipeline import CompileRequest, compile_model
    from edge_kit.compiler.tf_quiet import tensorflow
    from edge_kit.profiles import load_profile

    model = embedding_keras(tmp_path / "emb.keras", 7, ids="int32")
    path, table = tmp_path / "emb.keras", "Embedding layer 'emb')"
    if kind == "tflite":
        table = "GATHER table '"
        path = tmp_path / "emb.tflite"
        path.write_bytes(tensorflow().lite.TFLiteConverter.from_keras_model(model).convert())
    profile = load_profile("rpi4").model_copy(update={"variants": ["fp32", "fp16"]})
    manifest = compile_model(CompileRequest(path, [profile], tmp_path / "out"))
    fp32 = manifest.artifact("fp32")
    said = f"4 random samples (no --eval or --calib given): 'ids' whole numbers uniform in 0..6 (the 7 rows of {table}"
    assert fp32.fidelity.inputs.startswith(said), fp32.fidelity.inputs  # a GATHER's table: as the converter named it
    for vid in ("fp32", "fp16"):
        fid = manifest.artifact(vid).fidelity
        assert fid.measured and fid.samples == 4 and fid.inputs == fp32.fidelity.inputs and fid.snr_db > 40, (vid, fid)
    with pytest.raises(RuntimeError, match="gather index out of bounds"):  # the ids 0..99 drawn before: refused
        run_variant(tmp_path / "out" / "emb", {"runtime": fp32.runtime, "file": fp32.file}, np.full((1, 8), 7))


def test_random_ids_of_a_keras_embedding_of_1000_rows_go_past_99(tmp_path):
    """The random ids of an Embedding(1000) were 0..99, a tenth of its rows; they span its 1000 rows now."""
    from edge_kit.compiler.data import random_inputs
    from edge_kit.compiler.sources import load_source

    embedding_keras(tmp_path / "emb.keras", 1000)
    source = load_source(tmp_path / "emb.keras")
    xs, said = random_inputs(source.inputs, source.input_types, source.id_bounds())
    assert 99 < xs["ids"].max() <= 999 and xs["ids"].min() >= 0, xs["ids"]
    assert said.endswith("'ids' whole numbers uniform in 0..999 (the 1000 rows of Embedding layer 'emb')"), said


def test_without_data_ids_past_a_table_edge_kit_cannot_size_compile_with_no_fidelity_saying_why(tmp_path):
    """A Keras table reached through an op the ids are not followed through (a cast to float32) is not read for the
    ids it takes: the random ids are edge-kit's default 0..99, said so, and a 37-row embedding's GATHER refuses ids
    past 36. That is no fault of the model: every variant is still built, its fidelity not measured, naming the fp32
    run's error and what to give (a failed reference run stopped the compile when fidelity needed data)."""
    from edge_kit.compiler.pipeline import CompileRequest, compile_model
    from edge_kit.profiles import load_profile

    embedding_keras(tmp_path / "emb.keras", 37, cast="float32")
    profile = load_profile("rpi4").model_copy(update={"variants": ["fp32", "fp16"]})
    manifest = compile_model(CompileRequest(tmp_path / "emb.keras", [profile], tmp_path / "out"))
    for vid in ("fp32", "fp16"):
        artifact = manifest.artifact(vid)
        assert artifact.status == "built" and not artifact.fidelity.measured, (vid, artifact)
        method = artifact.fidelity.method
        assert method.startswith("not measured: variant fp32: the LiteRT interpreter failed running it on 4 random "
                                 "samples (no --eval or --calib given): 'ids' whole numbers uniform in 0..99 (no table "
                                 "size read from the model: edge-kit's default for int64 ids"), method
        assert "gather index out of bounds" in method and method.endswith("; give --eval or --calib data the model takes")
