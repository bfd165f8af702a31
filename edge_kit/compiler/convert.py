"""Turn a TensorFlow graph into a ``.tflite`` flatbuffer at one precision, with the TFLite converter.

The toolkit does not quantize anything itself: it configures the converter per the variant table
and checks what comes out (see :mod:`edge_kit.compiler.analysis`).
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Callable, Iterator

import numpy as np

from edge_kit.compiler.sources import Graph
from edge_kit.compiler.tf_quiet import captured_output, tensorflow
from edge_kit.errors import CompileError, first_line

MAX_CALIBRATION_SAMPLES = 500  # beyond a few hundred, int8 ranges stop improving and time grows
# How the int8 variant of a float .tflite is made (recorded in the manifest's derived_from).
INT8_TFLITE_METHOD = ("ai-edge-quantizer static_wi8_ai8 (int8 weights per channel, int8 activations per tensor, "
                      "every op it takes; int8 input and output), activation ranges = min/max over all of --calib")


# the distributions that install the ``tensorflow`` module (one at a time), by the name each is installed under: those
# looked for first (another, e.g. intel-tensorflow, is found by the module it holds: a scan of every distribution)
TF_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tf-nightly", "tf-nightly-cpu", "tensorflow-macos")


def converter_version() -> str | None:
    """Return the TensorFlow (converter) version: the module's when this process has imported it, else the installed
    distribution's (a compile that never converts with TensorFlow, an ONNX or .tflite source's, imported it for this
    alone: seconds of its time), one of :data:`TF_DISTRIBUTIONS` or any other that holds the ``tensorflow`` module;
    None when none is installed."""
    from edge_kit.compiler.onnx_source import version

    module = sys.modules.get("tensorflow")
    return (getattr(module, "__version__", None) or next(filter(None, map(version, TF_DISTRIBUTIONS)), None)
            or next(filter(None, map(version, importlib.metadata.packages_distributions().get("tensorflow", []))), None))


def _quantizer_unusable(variant: str, exc: BaseException) -> str:
    """Return the one-line error for an ai-edge-quantizer that is installed but fails to import ``exc``."""
    from edge_kit.compiler.onnx_source import version

    return (f"variant {variant}: ai-edge-quantizer {version('ai-edge-quantizer')} with numpy {np.__version__} cannot "
            f"be imported ({first_line(exc)}); pip install -U 'edge-kit[host]' for the versions it needs")


def to_tflite(graph: Graph, precision: str, calib: dict[str, np.ndarray] | None = None, *, variant: str = "",
              calibrating: Callable[[], None] | None = None) -> bytes:
    """Convert ``graph`` at ``precision`` (float32, float16, dynamic-int8 or int8).

    int8 is full-integer: every op int8, input and output int8, activation ranges calibrated on
    ``calib`` ({input name: samples}; one sample per step, at most :data:`MAX_CALIBRATION_SAMPLES`).
    ``calibrating`` (when given) is called as the calibrator takes its first sample (the compile's deadline for the calibration starts there: :func:`edge_kit.compiler.watch.watched`).

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
        if calib is None:
            raise CompileError(f"variant {variant}: full-integer int8 needs calibration data (--calib)")
        count = min(MAX_CALIBRATION_SAMPLES, len(calib[graph.inputs[0]]))

        def representative() -> Iterator[dict[str, np.ndarray]]:
            # keyed by input name: the converter orders a list by its own rules, not the signature's
            for i in range(count):
                if calibrating is not None:
                    calibrating()
                yield {name: np.asarray(calib[name][i:i + 1], dtype=np.float32) for name in graph.inputs}

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


def quantize_tflite(data: bytes, precision: str, calib: dict[str, np.ndarray] | None = None, *,
                   variant: str = "", calibrating: Callable[[], None] | None = None) -> bytes:
    """Make a variant of a float ``.tflite`` with ai-edge-quantizer (no TensorFlow graph needed).

    ``data`` is the model already rewritten to plain float32 by
    :func:`~edge_kit.compiler.tflite_edit.as_float32` (once per compile, shared by every variant);
    ``float32`` is that, ``float16`` casts weights to float16, ``dynamic-int8`` is the
    ``dynamic_wi8_afp32`` recipe and ``int8`` the static ``static_wi8_ai8`` recipe (int8 weights
    per channel and int8 activations per tensor for every op it takes, int8 input and output)
    calibrated on ``calib`` ({input name: samples}, at most :data:`MAX_CALIBRATION_SAMPLES`).
    ``calibrating`` (when given) is called as the calibrator takes its first sample (the compile's deadline for the calibration starts there: :func:`edge_kit.compiler.watch.watched`).

    Each activation's range is the minimum and maximum it takes over *all* calibration samples,
    as the TFLite converter calibrates. ai-edge-quantizer's default instead keeps an exponential
    moving average (factor 0.95) of each sample's min and max, which ends near a typical sample's
    extremes and clips the rest: on BlazeFace that cut the largest box offsets and sizes and cost
    8 % of mAP@[.5:.95] (int8 0.918 of fp32; 0.995 now, with the RELUs folded by
    :func:`~edge_kit.compiler.tflite_edit.as_float32`; docs/real-models.md).

    Returns:
        The flatbuffer bytes.

    Raises:
        CompileError: ai-edge-quantizer is not installed or cannot be imported (older than
            pyproject.toml's floor, or with a numpy it cannot use), int8 without calibration data,
            or the quantizer failed.
    """
    from edge_kit.compiler.tflite_edit import repoint_signature, signature_key

    try:
        from ai_edge_quantizer import (
            calibrator,
            qtyping,
            quantizer,
            recipe,
            recipe_manager,
        )
        from ai_edge_quantizer.utils import qsv_utils
    except ModuleNotFoundError as exc:
        if exc.name != "ai_edge_quantizer":
            raise CompileError(_quantizer_unusable(variant, exc)) from None
        raise CompileError(f"variant {variant}: quantizing a .tflite needs ai-edge-quantizer (pip install 'edge-kit[host]')") from None
    except (ImportError, AttributeError) as exc:  # too old (no qsv_utils before 0.7), or numpy older than it reads
        raise CompileError(_quantizer_unusable(variant, exc)) from None
    if precision == "int8" and calib is None:
        raise CompileError(f"variant {variant}: full-integer int8 needs calibration data (--calib)")
    try:
        with captured_output():
            fp32 = data
            if precision == "float32":
                return fp32
            qt = quantizer.Quantizer(fp32)
            if precision == "float16":
                manager = recipe_manager.RecipeManager()
                manager.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                                               num_bits=16, algorithm_key=recipe_manager.AlgorithmName.FLOAT_CASTING)
                qt.load_quantization_recipe(manager.get_quantization_recipe())
                return repoint_signature(bytes(qt.quantize().quantized_model))
            if precision == "dynamic-int8":
                qt.load_quantization_recipe(recipe.dynamic_wi8_afp32())
                return repoint_signature(bytes(qt.quantize().quantized_model))
            if precision != "int8":
                raise CompileError(f"variant {variant}: unknown precision '{precision}'")
            static = recipe.static_wi8_ai8()
            qt.load_quantization_recipe(static)
            assert calib is not None
            count = min(MAX_CALIBRATION_SAMPLES, len(next(iter(calib.values()))))
            samples = [{name: np.asarray(x[i:i + 1], dtype=np.float32) for name, x in calib.items()} for i in range(count)]
            # Quantizer.calibrate offers no choice of range statistic: run its Calibrator with the
            # library's own min_max_update (global min/max) instead of the moving average.
            manager = recipe_manager.RecipeManager()
            manager.load_quantization_recipe(static)
            cal = calibrator.Calibrator(fp32, num_threads=1, qsv_update_func=qsv_utils.min_max_update)
            if calibrating is not None:
                calibrating()
            cal.calibrate({signature_key(fp32): samples}, manager)
            return repoint_signature(bytes(qt.quantize(cal.get_model_qsvs()).quantized_model))  # see repoint_signature
    except CompileError:
        raise
    except Exception as exc:  # noqa: BLE001 - the quantizer raises many types; report the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompileError(f"variant {variant}: ai-edge-quantizer failed at {precision}: {first[:300]}") from None
