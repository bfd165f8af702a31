"""A ``.tflite`` a user did not make, whose inputs or outputs a device cannot serve (a scalar output, no
inputs, no outputs, names given twice, an output no op computes): ``edgekit compile`` refuses it in
one line (they used to be taken in). The models are made here with TensorFlow's converter, then
edited with LiteRT's flatbuffer schema."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def scalar_output_model(path: Path) -> Path:
    from edge_kit.compiler.tf_quiet import tensorflow

    tf = tensorflow()

    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32, name="x")])
    def model(x):
        return {"total": tf.reduce_sum(x), "y": x * 2.0}

    converter = tf.lite.TFLiteConverter.from_concrete_functions([model.get_concrete_function()], model)
    path.write_bytes(converter.convert())
    return path


def test_a_scalar_output_is_refused_in_one_line(tmp_path, run_cli):
    model = scalar_output_model(tmp_path / "total.tflite")
    code, _, err = run_cli("compile", model, "-p", "rpi4", "--out", tmp_path / "o")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert f"{model}: output '" in line and "is a scalar (0-d); devices return each output with a batch axis" in line
    assert not (tmp_path / "o").exists()


def _edited(path: Path, edit) -> Path:
    """Write a small float model (x [1, 4] -> FULLY_CONNECTED -> 'Identity' [1, 4]) to ``path`` with
    ``edit(model, subgraph)`` applied to its flatbuffer (LiteRT's schema object API)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    from edge_kit.compiler.tf_quiet import tensorflow

    tf = tensorflow()

    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32, name="x")])
    def model(x):
        return {"y": tf.matmul(x, tf.constant([[1.0, 2.0, 3.0, 4.0]] * 4)) + 1.0}

    converter = tf.lite.TFLiteConverter.from_concrete_functions([model.get_concrete_function()], model)
    flat = schema.ModelT.InitFromObj(schema.Model.GetRootAs(converter.convert(), 0))
    edit(flat, flat.subgraphs[0])
    builder = flatbuffers.Builder(1024)
    builder.Finish(flat.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))
    return path


def _no_outputs(model, graph):
    graph.outputs = []


def _no_inputs(model, graph):
    graph.inputs = []


def _output_named_as_input(model, graph):
    graph.tensors[graph.outputs[0]].name = graph.tensors[graph.inputs[0]].name


def _output_is_input(model, graph):
    graph.outputs = [graph.inputs[0]]


def _output_computed_by_no_op(model, graph):
    graph.operators = []


@pytest.mark.parametrize("edit, says", [
    (_no_outputs, "the model declares no outputs"),
    (_no_inputs, "the model has no inputs, so it computes the same output for every request"),
    (_output_named_as_input, "output 'x' has the name of another input or output"),
    (_output_is_input, "output 'x' is also an input (passed through unchanged)"),
    (_output_computed_by_no_op, "output 'Identity' is computed by no op"),
])
def test_a_tflite_whose_inputs_or_outputs_a_device_cannot_serve_is_refused_in_one_line(tmp_path, run_cli, edit, says):
    """Each of these compiled (exit 0, or 3 with failed variants) before; an ONNX graph of the same kind
    was already refused."""
    model = _edited(tmp_path / "odd.tflite", edit)
    code, _, err = run_cli("compile", model, "-p", "rpi4", "--out", tmp_path / "o")
    assert code == 2, err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"edgekit: error: {model}: {says}"), line
    assert not (tmp_path / "o").exists()


def test_a_tflite_whose_tensor_would_take_gigabytes_is_refused_before_any_runtime_loads_it(tmp_path, run_cli,
                                                                                           monkeypatch):
    """1.3 KB of flatbuffer whose BROADCAST_TO makes a 14.4 GB tensor from a [1, 4] input: the smoke child
    (and then the compiler itself) had LiteRT allocate it; with the memory capped, the compile stopped on
    an IndexError traceback (LiteRT's allocation error has no text)."""
    from edge_kit.compiler import analysis
    from edge_kit.compiler.tf_quiet import tensorflow

    tf = tensorflow()
    fn = tf.function(lambda x: {"y": tf.reduce_sum(tf.broadcast_to(tf.reshape(x, [1, 4, 1, 1]), [1, 4, 30000, 30000]),
                                                   axis=[2, 3])},
                     input_signature=[tf.TensorSpec([1, 4], tf.float32, name="x")])
    model = tmp_path / "bomb.tflite"
    model.write_bytes(tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn).convert())

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before its tensor sizes were checked")

    monkeypatch.setattr(analysis, "probe_in_child", no_load)
    monkeypatch.setattr(analysis, "analyse", no_load)
    code, _, err = run_cli("compile", model, "-p", "rpi4", "--out", tmp_path / "o")
    assert code == 2, err
    (line,) = err.strip().splitlines()
    assert line == (f"edgekit: error: {model}: tensor 'BroadcastTo' (shape 1x4x30000x30000, float32) would take "
                    "14,400,000,000 bytes; edge-kit takes models whose tensors each fit in 2,147,483,648 bytes (no "
                    "device has the memory for more): export the model for a smaller input")
    assert not (tmp_path / "o").exists()


def test_a_runtime_error_without_text_is_named_by_its_type_not_an_index_error(tmp_path, run_cli, monkeypatch):
    from edge_kit.compiler import analysis

    model = _edited(tmp_path / "m.tflite", lambda model, graph: None)

    def fails(*args, **kwargs):
        raise RuntimeError("")

    monkeypatch.setattr(analysis, "analyse", fails)
    code, _, err = run_cli("compile", model, "-p", "rpi4", "--out", tmp_path / "o")
    assert code == 2 and err.strip() == f"edgekit: error: {model}: not a loadable .tflite model (RuntimeError)", err


def test_a_model_file_named_with_terminal_controls_is_shown_escaped(tmp_path, run_cli):
    """The closing 'wrote OUT/<name>/manifest.json' once printed the name raw; now the model-name rule refuses it,
    and the refusal shows it escaped, with a name to give instead."""
    model = _edited(tmp_path / "m\x1b[2Jx.tflite", lambda model, graph: None)
    code, out, err = run_cli("compile", model, "-p", "rpi4", "--out", tmp_path / "o")
    assert code == 2 and "\x1b" not in out + err and "m\\x1b[2Jx.tflite: the model takes its file's name" in err, err
    assert "give --name m_2Jx or rename the file" in err and not (tmp_path / "o").exists()


def test_a_tensor_name_that_is_not_utf8_is_named_as_such(tmp_path, run_cli):
    """Once Python's bare "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"."""
    def garble(model, graph):
        graph.tensors[graph.inputs[0]].name = b"\xff\xfex"

    model = _edited(tmp_path / "garbled.tflite", garble)
    code, _, err = run_cli("compile", model, "-p", "rpi4", "--out", tmp_path / "o")
    assert code == 2 and err.strip() == (f"edgekit: error: {model}: not a loadable .tflite model (a tensor or op name "
                                         "that is not UTF-8 text: a damaged or hostile file)"), err


def test_a_tflite_with_a_nan_weight_is_refused_with_its_tensor_as_an_onnx_initializer_is(tmp_path, run_cli):
    """Its float variants failed (exit 3) while int8 was built from it, with no reference to measure against."""
    import numpy as np

    def poison(model, graph):
        for buffer in model.buffers:
            if buffer.data is not None and len(buffer.data) == 64:  # the [4, 4] float32 weight
                values = np.frombuffer(bytes(buffer.data), "<f4").copy()
                values[2] = np.nan
                buffer.data = np.frombuffer(values.tobytes(), np.uint8)

    model = _edited(tmp_path / "nan.tflite", poison)
    code, _, err = run_cli("compile", model, "-p", "rpi4", "--out", tmp_path / "o")
    assert code == 2, err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"edgekit: error: {model}: constant tensor '") and line.endswith(
        "' holds NaN at flat index 2, so the model computes NaN; export it again from weights without NaN"), line
    assert not (tmp_path / "o").exists()
