"""Tiny models the host tests build (TensorFlow, in the test: nothing fetched)."""

from __future__ import annotations

from pathlib import Path


def dense_tflite(path: Path) -> Path:
    """Write a float ``.tflite`` of one fully connected layer (x: [1, 4] -> y: [1, 3]) to ``path``; return it."""
    from edge_kit.compiler.tf_quiet import tensorflow

    tf = tensorflow()
    w = tf.constant([[1.0, 2.0, 3.0]] * 4)

    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32, name="x")])
    def model(x):
        return {"y": tf.matmul(x, w)}

    path.write_bytes(tf.lite.TFLiteConverter.from_concrete_functions([model.get_concrete_function()], model).convert())
    return path
