"""Run a ``.tflite`` model on float inputs and get float outputs, whatever its I/O quantization.

Used by the host compiler (accuracy and fidelity of each variant) and by the agent (on-device
accuracy), so both quantize inputs and dequantize outputs the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ModelRunner:
    """Feeds one sample at a time to an allocated interpreter with a single input and output."""

    def __init__(self, interpreter: Any):
        self.interpreter = interpreter
        self.input = interpreter.get_input_details()[0]
        self.output = interpreter.get_output_details()[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Return the model's input shape including its batch dimension."""
        return tuple(int(d) for d in self.input["shape"])

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """Return one float sample (without batch dim) as the model's input tensor (with batch dim)."""
        dtype = self.input["dtype"]
        x = np.asarray(x, dtype=np.float32).reshape(self.input_shape)
        if np.issubdtype(dtype, np.integer):
            scale, zero = self.input["quantization"]
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / scale + zero), info.min, info.max)
        return x.astype(dtype)

    def dequantize_output(self, y: np.ndarray) -> np.ndarray:
        """Return the output tensor as float32, dequantized when the model's output is an integer type."""
        if np.issubdtype(self.output["dtype"], np.integer):
            scale, zero = self.output["quantization"]
            return (y.astype(np.float32) - zero) * scale
        return y.astype(np.float32)

    def invoke_raw(self, tensor: np.ndarray) -> None:
        """Set the already-typed input tensor and run once (the timed path of a benchmark)."""
        self.interpreter.set_tensor(self.input["index"], tensor)
        self.interpreter.invoke()

    def predict(self, xs: np.ndarray) -> np.ndarray:
        """Return float outputs for each sample of ``xs`` (first axis = samples), stacked."""
        outs = []
        for x in xs:
            self.invoke_raw(self.quantize_input(x))
            outs.append(self.dequantize_output(self.interpreter.get_tensor(self.output["index"]))[0])
        return np.stack(outs) if outs else np.zeros((0,), np.float32)


def top1_accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    """Return the share of samples whose highest-scoring class equals the integer label."""
    return float(np.mean(np.argmax(outputs.reshape(len(outputs), -1), axis=1) == labels.reshape(-1)))


def fidelity(outputs: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Return agreement of ``outputs`` with ``reference`` outputs (the fp32 model's) on the same inputs.

    Returns:
        ``top1_agreement`` (share of samples with the same argmax), ``max_abs_error`` and
        ``mean_abs_error`` over all output values.
    """
    a = outputs.reshape(len(outputs), -1)
    b = reference.reshape(len(reference), -1)
    diff = np.abs(a - b)
    return {
        "top1_agreement": float(np.mean(np.argmax(a, 1) == np.argmax(b, 1))),
        "max_abs_error": float(diff.max()) if diff.size else 0.0,
        "mean_abs_error": float(diff.mean()) if diff.size else 0.0,
    }
