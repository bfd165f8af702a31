"""A ``.tflite`` a user did not make, with a scalar (0-d) output: ``edgekit compile`` refuses it in one
line (it used to be taken in, and every run of it failed with numpy's IndexError). The model is made
here with TensorFlow's converter."""

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
