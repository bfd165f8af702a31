"""The LiteRT GPU delegate (OpenCL or OpenGL ES backends).

The delegate splits the graph as often as needed, so an op it does not support falls back to the
CPU locally; the rule check counts those ops from the list the delegate documents.
"""

from __future__ import annotations

from typing import Any, ClassVar

from device_agents.targets.base import ModelFacts, Target, count_unsupported

# Ops the LiteRT GPU delegate documents as supported.
GPU_OPS = frozenset({
    "ABS", "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "COS", "DEPTHWISE_CONV_2D",
    "DEPTH_TO_SPACE", "DEQUANTIZE", "DIV", "ELU", "EXP", "FULLY_CONNECTED", "HARD_SWISH", "LEAKY_RELU",
    "LOG", "LOGISTIC", "MAXIMUM", "MAX_POOL_2D", "MEAN", "MINIMUM", "MIRROR_PAD", "MUL", "NEG", "PAD",
    "POW", "PRELU", "QUANTIZE", "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR",
    "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SIN", "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "SQRT",
    "SQUARE", "SQUARED_DIFFERENCE", "STRIDED_SLICE", "SUB", "TANH", "TRANSPOSE", "TRANSPOSE_CONV",
})


class LiteRtGpu(Target):
    key: ClassVar[str] = "gpu"
    accelerator: ClassVar[str] = "gpu"
    summary: ClassVar[str] = "GPU through the LiteRT GPU delegate"
    library: ClassVar[str | None] = "libtensorflowlite_gpu_delegate.so"
    install_hint: ClassVar[str] = "build it from LiteRT's sources; it needs OpenCL or OpenGL ES (docs/firmware/)"

    @classmethod
    def rule_check(cls, stats: ModelFacts) -> dict[str, Any]:
        """Return the ops the GPU delegate documents as supported (see :func:`count_unsupported`)."""
        return count_unsupported(stats, GPU_OPS)
