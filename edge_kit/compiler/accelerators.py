"""Which ops of a ``.tflite`` an accelerator would take, and why the first one it would not.

These are predictions from the vendors' documented rules, labelled as such in the manifest
(``method: rule-check``); when ``edgetpu_compiler`` runs, its own per-op mapping is recorded beside
them (``method: edgetpu_compiler``) and is the one to trust.

Edge TPU rules (Coral, "TensorFlow models on the Edge TPU"): tensors are 8-bit quantized, shapes are
static, a tensor has at most 3 dimensions larger than 1 (the innermost ones), and only the listed
ops map. The compiler cuts the graph once: the first op that cannot map and every op after it run
on the CPU, even ones that could map.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from edge_kit.compiler.analysis import ModelStats, OpInfo

EDGETPU_OPS = frozenset({
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "EXPAND_DIMS",
    "FULLY_CONNECTED", "HARD_SWISH", "L2_NORMALIZATION", "LOGISTIC", "LSTM", "MAXIMUM", "MAX_POOL_2D",
    "MEAN", "MINIMUM", "MUL", "PACK", "PAD", "PRELU", "QUANTIZE", "DEQUANTIZE", "REDUCE_MAX", "REDUCE_MIN",
    "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "RSQRT",
    "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "SQUARED_DIFFERENCE", "SQUEEZE", "STRIDED_SLICE",
    "SUB", "SUM", "TANH", "TRANSPOSE", "TRANSPOSE_CONV",
})

# Ops the LiteRT GPU delegate (OpenCL / OpenGL ES backends) documents as supported.
GPU_OPS = frozenset({
    "ABS", "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "COS", "DEPTHWISE_CONV_2D",
    "DEPTH_TO_SPACE", "DEQUANTIZE", "DIV", "ELU", "EXP", "FULLY_CONNECTED", "HARD_SWISH", "LEAKY_RELU",
    "LOG", "LOGISTIC", "MAXIMUM", "MAX_POOL_2D", "MEAN", "MINIMUM", "MIRROR_PAD", "MUL", "NEG", "PAD",
    "POW", "PRELU", "QUANTIZE", "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR",
    "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SIN", "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "SQRT",
    "SQUARE", "SQUARED_DIFFERENCE", "STRIDED_SLICE", "SUB", "TANH", "TRANSPOSE", "TRANSPOSE_CONV",
})


def _edgetpu_reason(op: OpInfo, stats: ModelStats) -> str | None:
    """Return why ``op`` cannot map to the Edge TPU, or None if the documented rules allow it."""
    if op.name not in EDGETPU_OPS:
        return f"{op.name} is not an Edge TPU op"
    for idx in (*op.inputs, *op.outputs):
        if idx < 0:
            continue
        t = stats.tensors[idx]
        if t.constant:  # weights and biases are laid out by the compiler; the rules are about activations
            continue
        if any(d < 0 for d in t.shape_signature):
            return f"tensor '{t.name}' has a dynamic shape {t.shape_signature}"
        if t.dtype in ("float32", "float16") and op.name not in ("QUANTIZE", "DEQUANTIZE"):
            return f"tensor '{t.name}' is {t.dtype}, not 8-bit quantized"
        if any(d > 1 for d in t.shape[:-3]):
            return f"tensor '{t.name}' has shape {list(t.shape)}: more than 3 dimensions larger than 1"
    return None


def edgetpu_rule_check(stats: ModelStats) -> dict[str, Any]:
    """Return the predicted Edge TPU mapping of a model.

    Returns:
        ``{"method": "rule-check", "ops_total", "ops_mapped", "first_fallback": {index, op, reason} | None,
        "fallback_ops": {op: count}}``. Ops from the first fallback on are counted as CPU ops.
    """
    first = None
    mapped = 0
    fallback: dict[str, int] = {}
    for op in stats.ops:
        if first is None:
            reason = _edgetpu_reason(op, stats)
            if reason is None:
                mapped += 1
                continue
            first = {"index": op.index, "op": op.name, "reason": reason}
        fallback[op.name] = fallback.get(op.name, 0) + 1
    return {"method": "rule-check", "ops_total": len(stats.ops), "ops_mapped": mapped,
            "first_fallback": first, "fallback_ops": fallback}


def gpu_rule_check(stats: ModelStats) -> dict[str, Any]:
    """Return which ops the LiteRT GPU delegate documents as supported.

    Returns:
        ``{"method": "rule-check", "ops_total", "ops_mapped", "unsupported_ops": {op: count}}``.
        The GPU delegate splits the graph as often as needed, so unsupported ops only fall back locally.
    """
    unsupported: dict[str, int] = {}
    for op in stats.ops:
        if op.name not in GPU_OPS:
            unsupported[op.name] = unsupported.get(op.name, 0) + 1
    return {"method": "rule-check", "ops_total": len(stats.ops),
            "ops_mapped": len(stats.ops) - sum(unsupported.values()), "unsupported_ops": unsupported}


def accelerator_support(stats: ModelStats, accelerators: set[str]) -> dict[str, Any]:
    """Return the rule checks for each accelerator in ``accelerators`` (``edgetpu``, ``gpu``)."""
    checks = {"edgetpu": edgetpu_rule_check, "gpu": gpu_rule_check}
    return {acc: checks[acc](stats) for acc in sorted(accelerators) if acc in checks}


# ---- edgetpu_compiler -------------------------------------------------------------------------

COMPILER = "edgetpu_compiler"
COMPILER_TIMEOUT_S = 600
_OP_ROW = re.compile(r"^(?P<op>[A-Z][A-Z0-9_]+)\s+(?P<count>\d+)\s+(?P<status>\S.*?)\s*$")


class EdgeTpuCompilerMissing(RuntimeError):
    """edgetpu_compiler is not on PATH."""


def find_compiler() -> str | None:
    """Return the path of ``edgetpu_compiler`` on PATH, or None."""
    return shutil.which(COMPILER)


def compiler_version(path: str) -> str:
    """Return ``edgetpu_compiler --version`` output, or 'unknown' if it fails."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parse_compiler_log(text: str) -> list[dict[str, Any]]:
    """Return the per-op rows of an ``edgetpu_compiler -s`` log: ``[{op, count, status, mapped}]``."""
    rows = []
    in_table = False
    for line in text.splitlines():
        if line.strip().startswith("Operator") and "Status" in line:
            in_table = True
            continue
        if in_table and (m := _OP_ROW.match(line.strip())):
            status = m.group("status")
            rows.append({"op": m.group("op"), "count": int(m.group("count")), "status": status,
                         "mapped": status.startswith("Mapped to Edge TPU")})
    return rows


def run_compiler(int8_model: bytes, compiler: str) -> tuple[bytes, dict[str, Any]]:
    """Compile a full-integer model with ``edgetpu_compiler``.

    Returns:
        (compiled flatbuffer, ``{"method": "edgetpu_compiler", "version", "ops": [...], "log"}``).

    Raises:
        RuntimeError: the compiler exited non-zero, timed out, or wrote no model; the message holds
            the last line of its output.
    """
    with tempfile.TemporaryDirectory(prefix="edgekit-etpu-") as tmp:
        src = Path(tmp) / "model.tflite"
        src.write_bytes(int8_model)
        try:
            proc = subprocess.run([compiler, "-s", "-o", tmp, str(src)], capture_output=True, text=True,
                                  timeout=COMPILER_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{COMPILER} did not finish within {COMPILER_TIMEOUT_S} s") from None
        log = (proc.stdout or "") + (proc.stderr or "")
        out = Path(tmp) / "model_edgetpu.tflite"
        if proc.returncode != 0 or not out.is_file():
            last = next((ln for ln in reversed(log.strip().splitlines()) if ln.strip()), "no output")
            raise RuntimeError(f"{COMPILER} failed (exit {proc.returncode}): {last}")
        return out.read_bytes(), {"method": COMPILER, "version": compiler_version(compiler),
                                  "ops": parse_compiler_log(log), "log": log[-4000:]}
