"""Turn a TensorFlow graph into a ``.tflite`` flatbuffer at one precision, with the TFLite converter.

The toolkit does not quantize anything itself: it configures the converter per the variant table
and checks what comes out (see :mod:`edge_kit.compiler.analysis`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from edge_kit.compiler.sources import Graph
from edge_kit.compiler.tf_quiet import captured_output, tensorflow
from edge_kit.errors import CompileError

MAX_CALIBRATION_SAMPLES = 500  # beyond a few hundred, int8 ranges stop improving and time grows


def converter_version() -> str:
    """Return the TensorFlow (converter) version."""
    return tensorflow().__version__


def to_tflite(graph: Graph, precision: str, calib_x: np.ndarray | None = None, *, variant: str = "") -> bytes:
    """Convert ``graph`` at ``precision`` (float32, float16, dynamic-int8 or int8).

    int8 is full-integer: every op int8, input and output int8, activation ranges calibrated on
    ``calib_x`` (one sample per step, at most :data:`MAX_CALIBRATION_SAMPLES`).

    Returns:
        The flatbuffer bytes.

    Raises:
        CompileError: the converter failed, or int8 was asked for without calibration data.
    """
    tf = tensorflow()
    conv = tf.lite.TFLiteConverter.from_concrete_functions([graph.function], graph.trackable)
    if precision in ("float16", "dynamic-int8", "int8"):
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if precision == "float16":
        conv.target_spec.supported_types = [tf.float16]
    elif precision == "int8":
        if calib_x is None:
            raise CompileError(f"variant {variant}: full-integer int8 needs calibration data (--calib)")
        samples = calib_x[:MAX_CALIBRATION_SAMPLES]

        def representative() -> Iterator[list[np.ndarray]]:
            for x in samples:
                yield [x[None, ...].astype(np.float32)]

        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    elif precision not in ("float32", "dynamic-int8"):
        raise CompileError(f"variant {variant}: unknown precision '{precision}'")
    try:
        with captured_output():
            return bytes(conv.convert())
    except Exception as exc:  # noqa: BLE001 - converter errors come in many types; report the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompileError(f"variant {variant}: TFLite converter failed at {precision}: {first[:300]}") from None


def quantize_tflite(data: bytes, precision: str, *, variant: str = "") -> bytes:
    """Quantize an existing float ``.tflite`` with ai-edge-quantizer (no TensorFlow graph needed).

    Only ``dynamic-int8`` (int8 weights, float activations) is offered from a flatbuffer: full-integer
    int8 with int8 input/output and pruning both rewrite the graph before conversion.

    Returns:
        The quantized flatbuffer bytes.

    Raises:
        CompileError: ai-edge-quantizer is not installed, or it failed.
    """
    if precision != "dynamic-int8":
        raise CompileError(f"variant {variant}: only dynamic-int8 can be made from a .tflite file")
    try:
        from ai_edge_quantizer import quantizer, recipe
    except ImportError:
        raise CompileError(f"variant {variant}: quantizing a .tflite needs ai-edge-quantizer (pip install 'edge-kit[host]')") from None
    try:
        with captured_output():
            qt = quantizer.Quantizer(data)
            qt.load_quantization_recipe(recipe.dynamic_wi8_afp32())
            return bytes(qt.quantize().quantized_model)
    except Exception as exc:  # noqa: BLE001
        raise CompileError(f"variant {variant}: ai-edge-quantizer failed: {str(exc).splitlines()[0][:300]}") from None
