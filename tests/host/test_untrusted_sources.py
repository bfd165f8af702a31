"""Model files a user did not make, refused by ``edgekit compile`` in one line naming the file and what to do (exit 2,
nothing written): a ``.tflite`` whose flatbuffer offsets point past its end or whose constant declares a shape its
buffer does not hold, a Keras file with a ``Lambda`` layer, a SavedModel without the ``serving_default`` signature.
The ONNX counterparts are in ``test_onnx_untrusted.py``. The models are built here with TensorFlow, then edited with
LiteRT's flatbuffer schema or by patching bytes."""

from __future__ import annotations

import struct
from pathlib import Path

from tiny_models import dense_tflite


def refused_by_compile(run_cli, model: Path, out: Path) -> str:
    code, _, err = run_cli("compile", model, "-p", "rpi4", "--out", out)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"edgekit: error: {model}: "), err
    assert "Traceback" not in err and not out.exists()
    return lines[0]


def test_a_tflite_whose_offsets_point_past_its_end_says_so_in_words(tmp_path, run_cli):
    """The flatbuffer reader's struct.error ("unpack_from requires a buffer of at least 2147483422 bytes for
    unpacking 2 bytes at offset 2147483420 (actual buffer siz") was the reason, cut mid-word at 200 characters."""
    data = dense_tflite(tmp_path / "dense.tflite").read_bytes()
    root = struct.unpack_from("<I", data, 0)[0]
    crafted = {"root.tflite": struct.pack("<I", len(data) + 1000) + data[4:],  # the root table past the end
               "vtable.tflite": data[:root] + struct.pack("<i", -0x7FFFFF00) + data[root + 4:],  # its vtable too
               "cut.tflite": data[:len(data) // 2]}
    for name, content in crafted.items():
        (tmp_path / name).write_bytes(content)
        line = refused_by_compile(run_cli, tmp_path / name, tmp_path / "o")
        assert line.endswith(f"not a loadable .tflite model (damaged .tflite flatbuffer: an offset in it points past "
                             f"the end of its {len(content):,} bytes (a file cut short, or a damaged or hostile one); "
                             "download or export it again)"), line


def test_a_tflite_constant_declaring_more_than_its_buffer_holds_is_named(tmp_path, run_cli):
    """A weight of 12 floats declaring shape 46341x46341 (2**31 elements): numpy's "cannot reshape array of size 12
    into shape (46341,46341)" was the reason, naming neither the tensor nor what was wrong with the file."""
    from edge_kit.compiler.tflite_edit import _dump, _load

    data = dense_tflite(tmp_path / "dense.tflite").read_bytes()
    model = _load(data)
    graph = model.subgraphs[0]
    weight = next(i for i, t in enumerate(graph.tensors)
                  if i not in graph.inputs and model.buffers[t.buffer].data is not None
                  and len(model.buffers[t.buffer].data))
    graph.tensors[weight].shape = [46341, 46341]
    name = graph.tensors[weight].name.decode()
    (tmp_path / "big.tflite").write_bytes(_dump(model))
    line = refused_by_compile(run_cli, tmp_path / "big.tflite", tmp_path / "o")
    assert line.endswith(f"not a loadable .tflite model (constant tensor '{name}' declares shape 46341x46341 "
                         "(float32) but its buffer holds 48 bytes: a damaged or hostile file; download or export it "
                         "again)"), line


def test_a_keras_lambda_layer_is_refused_by_name_before_keras_reads_the_file(tmp_path, run_cli, monkeypatch):
    """Keras' safe mode refused it, in words cut at 200 characters mid-sentence ("If you trust the );"), naming no
    layer; the config names it, and Keras does not open the file at all."""
    import keras

    inner_in = keras.Input((4,))
    inner = keras.Model(inner_in, keras.layers.Lambda(lambda t: t * 2.0, name="double")(inner_in), name="block")
    inp = keras.Input((4,), name="x")
    keras.Model(inp, keras.layers.Dense(2, name="y")(inner(inp))).save(tmp_path / "nested.keras")

    def no_load(*args, **kwargs):
        raise AssertionError("Keras read a file holding a Lambda layer")

    monkeypatch.setattr(keras.models, "load_model", no_load)
    line = refused_by_compile(run_cli, tmp_path / "nested.keras", tmp_path / "o")
    assert line.endswith("nested.keras: layer 'double' is a Lambda layer, whose function is Python code stored in the "
                         "file, which edge-kit does not run (Keras safe mode); export the model where that code is "
                         "(model.export(folder) for a SavedModel, or to .onnx) and compile that"), line


def test_a_keras_lambda_layer_naming_a_function_stores_no_code_and_still_loads(tmp_path):
    """Lambda(keras.activations.relu) stores the function's name, not its code: Keras' safe mode loads it, and so
    must edge-kit's check of the config (the refusal above is for a Python lambda's bytecode)."""
    import keras

    from edge_kit.compiler.sources import load_source

    inp = keras.Input((4,), name="x")
    keras.Model(inp, keras.layers.Lambda(keras.activations.relu, name="act")(inp)).save(tmp_path / "named.keras")
    source = load_source(tmp_path / "named.keras")
    assert source.inputs == {"x": (4,)} and len(source.outputs) == 1


def test_keras_files_load_in_safe_mode_whatever_this_process_enabled(tmp_path, monkeypatch):
    """safe_mode was left to Keras' default, which keras.config.enable_unsafe_deserialization() anywhere in the
    process (a notebook, a plugin importing edge-kit) turns off for every later load."""
    import keras

    from edge_kit.compiler.sources import load_source

    inp = keras.Input((4,), name="x")
    keras.Model(inp, keras.layers.Dense(2, name="y")(inp)).save(tmp_path / "dense.keras")
    real, seen = keras.models.load_model, []

    def record(*args, **kwargs):
        seen.append(kwargs.get("safe_mode"))
        return real(*args, **kwargs)

    monkeypatch.setattr(keras.models, "load_model", record)
    assert load_source(tmp_path / "dense.keras").inputs == {"x": (4,)}
    assert seen == [True]


def test_a_savedmodel_without_serving_default_names_its_signatures_and_what_to_do(tmp_path, run_cli):
    """It said "the SavedModel has no 'serving_default' signature": not which it has, nor what to do."""
    from edge_kit.compiler.tf_quiet import tensorflow

    tf = tensorflow()
    module = tf.Module()
    module.w = tf.Variable(tf.ones((4, 3)))
    spec = [tf.TensorSpec([None, 4], tf.float32)]
    predict = tf.function(lambda x: {"y": tf.matmul(x, module.w)}, input_signature=spec)
    other = tf.function(lambda x: {"z": 2.0 * tf.matmul(x, module.w)}, input_signature=spec)
    tf.saved_model.save(module, str(tmp_path / "multi"), signatures={"predict": predict.get_concrete_function(),
                                                                    "other": other.get_concrete_function()})
    line = refused_by_compile(run_cli, tmp_path / "multi", tmp_path / "o")
    assert line.endswith("multi: the SavedModel has no 'serving_default' signature (it has 'other', 'predict'), the one "
                         "edge-kit compiles; save it again with signatures={'serving_default': <the function to "
                         "compile>, ...}"), line
    # several signatures, serving_default among them: that one is compiled, with its own names
    from edge_kit.compiler.sources import load_source

    tf.saved_model.save(module, str(tmp_path / "both"), signatures={"serving_default": predict.get_concrete_function(),
                                                                   "other": other.get_concrete_function()})
    source = load_source(tmp_path / "both")
    assert list(source.inputs.values()) == [(4,)] and source.outputs == ["y"]


def test_a_savedmodel_taking_token_ids_compiles_and_one_taking_strings_is_refused(tmp_path, run_cli):
    """Variants are traced with float32 inputs: an int64 input was handed float32 tensors and every variant failed in
    the converter (exit 3, a manifest of failures written); a string input likewise. The ids are now cast to the
    signature's type, as a Keras source's are; a string input is refused at load."""
    import json

    from edge_kit.compiler.tf_quiet import tensorflow

    tf = tensorflow()
    module = tf.Module()
    module.table = tf.Variable(tf.reshape(tf.range(80, dtype=tf.float32), (10, 8)))
    ids = tf.function(lambda ids: {"y": tf.reshape(tf.gather(module.table, ids), [-1, 32])},
                      input_signature=[tf.TensorSpec([None, 4], tf.int64, name="ids")])
    tf.saved_model.save(module, str(tmp_path / "ids"), signatures={"serving_default": ids.get_concrete_function()})
    code, _, err = run_cli("compile", tmp_path / "ids", "-p", "rpi4", "--out", tmp_path / "o")
    assert code == 0, err
    manifest = json.loads((tmp_path / "o" / "ids" / "manifest.json").read_text())
    fp32 = next(a for a in manifest["artifacts"] if a["id"] == "fp32")
    assert fp32["status"] == "built" and fp32["inputs"][0]["name"] == "ids"
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tmp_path / "o" / "ids" / "fp32.tflite"))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], np.array([[3, 0, 9, 1]], np.float32))
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    assert out.reshape(4, 8)[:, 0].tolist() == [24.0, 0.0, 72.0, 8.0]  # rows 3, 0, 9, 1 of the table

    words = tf.function(lambda s: {"y": tf.strings.to_number(s)[:, None] * tf.ones((1, 4))},
                        input_signature=[tf.TensorSpec([None], tf.string, name="s")])
    tf.saved_model.save(tf.Module(), str(tmp_path / "words"), signatures={"serving_default": words.get_concrete_function()})
    line = refused_by_compile(run_cli, tmp_path / "words", tmp_path / "o2")
    assert line.endswith("words: input 's' is string; edge-kit feeds float32 data files (cast to an integer or "
                         "boolean input's type), so export the model with numeric inputs (parse or tokenize strings "
                         "before the model)"), line


def test_a_keras_model_taking_strings_is_refused_at_load(tmp_path, run_cli):
    """Its variants were traced with a float32 input where the model takes strings, and each failed in the
    converter (exit 3, a manifest of failures written)."""
    import keras

    inp = keras.Input((1,), dtype="string", name="word")
    ids = keras.layers.StringLookup(vocabulary=["a", "b", "c"], name="lookup")(inp)
    out = keras.layers.Embedding(5, 2, name="y")(ids)
    keras.Model(inp, out).save(tmp_path / "words.keras")
    line = refused_by_compile(run_cli, tmp_path / "words.keras", tmp_path / "o")
    assert line.endswith("words.keras: input 'word' is string; edge-kit feeds float32 data files (cast to an integer "
                         "or boolean input's type), so export the model with numeric inputs (parse or tokenize strings "
                         "before the model)"), line


def test_a_tflite_holding_tensorflow_flex_ops_names_them_and_how_to_convert_it(tmp_path, run_cli):
    """LiteRT's "Select TensorFlow op(s), included in the given model, is(are) not supported by this interpreter...
    For the Android, it can be resolved by add" was the reason, cut at 200 characters, naming no op."""
    from edge_kit.compiler.tf_quiet import tensorflow

    tf = tensorflow()

    @tf.function(input_signature=[tf.TensorSpec([1, 3, 3], tf.float32, name="m")])
    def det(m):
        return {"d": tf.reshape(tf.linalg.det(m), [1, 1])}

    converter = tf.lite.TFLiteConverter.from_concrete_functions([det.get_concrete_function()], det)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    (tmp_path / "det.tflite").write_bytes(converter.convert())
    line = refused_by_compile(run_cli, tmp_path / "det.tflite", tmp_path / "o")
    assert line.endswith("det.tflite: not a loadable .tflite model (it holds TensorFlow ops, FlexMatrixDeterminant, "
                         "which the LiteRT runtime on devices does not run); convert it again with builtin ops only "
                         "(supported_ops=[tf.lite.OpsSet.TFLITE_BUILTINS]), or compile the model it came from"), line


def test_a_savedmodel_cut_short_or_without_its_variables_says_how_to_save_it_again(tmp_path, run_cli):
    """TensorFlow's reason alone ("Unsuccessful TensorSliceReader constructor: Failed to find any matching files for
    .../variables/variables") said nothing of what to do."""
    import shutil

    from edge_kit.compiler.tf_quiet import tensorflow

    tf = tensorflow()
    module = tf.Module()
    module.w = tf.Variable(tf.ones((4, 3)))
    serve = tf.function(lambda x: {"y": tf.matmul(x, module.w)}, input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "novars"), signatures={"serving_default": serve.get_concrete_function()})
    shutil.copytree(tmp_path / "novars", tmp_path / "cut")
    shutil.rmtree(tmp_path / "novars" / "variables")
    pb = (tmp_path / "cut" / "saved_model.pb").read_bytes()
    (tmp_path / "cut" / "saved_model.pb").write_bytes(pb[:len(pb) // 2])
    for name in ("novars", "cut"):
        line = refused_by_compile(run_cli, tmp_path / name, tmp_path / "o")
        assert f"{name}: not a loadable SavedModel (" in line and line.endswith(
            "); save it again whole, saved_model.pb with its variables folder (tf.saved_model.save(obj, folder), "
            "Keras: model.export(folder))"), line


def test_an_h5_cut_short_says_so_not_to_export_custom_layers(tmp_path, run_cli):
    """h5py's "truncated file" came with the advice for custom layers and Lambda functions, which it has none of."""
    import keras

    inp = keras.Input((4,), name="x")
    keras.Model(inp, keras.layers.Dense(3, name="y")(inp)).save(tmp_path / "whole.h5")
    data = (tmp_path / "whole.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[:len(data) // 2])
    line = refused_by_compile(run_cli, tmp_path / "cut.h5", tmp_path / "o")
    assert "cut.h5: not a loadable Keras model (not an HDF5 file, or one cut short or damaged: " in line, line
    assert line.endswith("; save it again with model.save('name.keras')") and "custom layers" not in line, line


def token_onnx(path: Path) -> Path:
    """Write an ONNX model taking int64 token ids ``ids`` [N, 4] into a stored 10x8 table (a Gather: an embedding),
    ``y`` [N, 32] the four rows; return it."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.arange(80, dtype=np.float32).reshape(10, 8), "table")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
             helper.make_node("Reshape", ["rows", "shape"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 32])],
                              [table, numpy_helper.from_array(np.array([-1, 32], np.int64), "shape")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def token_savedmodel(path: Path) -> Path:
    """Write a SavedModel taking int64 token ids ``ids`` [N, 4] into a 10x8 table, as :func:`token_onnx`; return it."""
    from edge_kit.compiler.tf_quiet import tensorflow

    tf = tensorflow()
    module = tf.Module()
    module.table = tf.Variable(tf.reshape(tf.range(80, dtype=tf.float32), (10, 8)))
    ids = tf.function(lambda ids: {"y": tf.reshape(tf.gather(module.table, ids), [-1, 32])},
                      input_signature=[tf.TensorSpec([None, 4], tf.int64, name="ids")])
    tf.saved_model.save(module, str(path), signatures={"serving_default": ids.get_concrete_function()})
    return path


def test_an_onnx_model_taking_int64_token_ids_compiles_as_a_savedmodel_does(tmp_path, run_cli):
    """An int64 ONNX input was refused ("export the model with float32 inputs") where a SavedModel's int64 input was
    compiled with a float32 input cast inside: PyTorch exports token ids as int64, so every such model was refused.
    Both now take float32 ids, cast inside every variant. Without --eval or --calib, the conversion is checked on
    ids drawn from the rows of the model's own embedding table, not on uniform [0, 1) samples (all id 0)."""
    import json

    import numpy as np
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    model = token_onnx(tmp_path / "ids.onnx")
    code, out, err = run_cli("compile", model, "-p", "rpi4", "--out", tmp_path / "o")
    assert code == 0, err + out  # the table says why a variant failed (a CI run saw fp16 and dynamic-int8 fail once)
    manifest = json.loads((tmp_path / "o" / "ids" / "manifest.json").read_text())
    assert manifest["model"]["conversion"]["inputs"] == (
        "4 random samples (no --eval or --calib given): 'ids' whole numbers uniform in 0..9 (the 10 rows of Gather "
        "table 'table')")
    ids = np.array([[3, 0, 9, 1]], np.float32)
    interpreter = Interpreter(model_path=str(tmp_path / "o" / "ids" / "fp32.tflite"))
    interpreter.allocate_tensors()
    assert interpreter.get_input_details()[0]["dtype"] == np.float32
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], ids)
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    assert out.reshape(4, 8)[:, 0].tolist() == [24.0, 0.0, 72.0, 8.0]  # rows 3, 0, 9, 1 of the table
    session = ort.InferenceSession(str(tmp_path / "o" / "ids" / "onnx-fp32.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float)"
    assert session.run(None, {"ids": ids})[0].reshape(4, 8)[:, 0].tolist() == [24.0, 0.0, 72.0, 8.0]


def test_ids_float32_cannot_carry_are_refused_the_same_for_a_savedmodel_and_an_onnx_model(tmp_path, run_cli):
    """Token ids travel as float32 and are cast inside the model: 2.5 became id 2, and 16777217 (2^24 + 1) id
    16777216, with no word. Both sources now refuse such data in the same line, before anything is built."""
    import numpy as np

    for model in (token_onnx(tmp_path / "ids.onnx"), token_savedmodel(tmp_path / "ids")):
        for value, shown in ((2.5, "2.5"), (2**24 + 1, "16777217")):
            x = np.tile(np.array([[3, 0, 9, 1]], np.float64), (12, 1))
            x[7, 2] = value
            np.savez(tmp_path / "eval.npz", x=x, y=np.zeros(12, np.int64))
            code, _, err = run_cli("compile", model, "-p", "rpi4", "--out", tmp_path / "o", "--eval", tmp_path / "eval.npz")
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
            assert lines[0] == (f"edgekit: error: {tmp_path / 'eval.npz'}: --eval key 'x' holds {shown} at index [7, 2], "
                                "but input 'ids' is int64 (ids, sent as float32 and cast inside the model): give whole "
                                "numbers in -16777216..16777216"), lines[0]
            assert not (tmp_path / "o").exists()
