"""Interpreter runtimes as plugins, keyed by name (``litert``, ``tflite-runtime``, ``onnxruntime``).

A runtime whose library is not installed stays registered but unavailable, and says which package
to install; nothing installs itself at run time.

A model's format (``tflite`` or ``onnx``) is read from its bytes by :func:`model_format`, the one
place that decides it; :func:`get_runtime` given the model picks a runtime that runs that format.
"""

from __future__ import annotations

from pathlib import Path

from device_agents.errors import RuntimeUnavailable
from device_agents.formats import FORMATS, SUFFIX, model_format
from device_agents.runtimes.base import Runtime
from device_agents.runtimes.litert import LiteRT, TfliteRuntime
from device_agents.runtimes.onnxruntime import OnnxRuntime

RUNTIMES: dict[str, type[Runtime]] = {cls.key: cls for cls in (LiteRT, TfliteRuntime, OnnxRuntime)}


def get_runtime(key: str | None = None, *, model: Path | bytes | None = None) -> Runtime:
    """Return an instance of the runtime ``key``, or of the first available one when ``key`` is None.

    With ``model``, the runtime must run that model's format (:func:`model_format`): an ONNX model
    always gets ``onnxruntime`` (``key``, a LiteRT runtime choice, then does not apply); a
    ``.tflite`` model the runtime ``key``, or the first installed LiteRT runtime. Without ``model``,
    ``key`` as given, or the first installed LiteRT runtime.

    Raises:
        RuntimeUnavailable: unknown key, a key that does not run the model's format, or its library
            is not installed (the message says what to install, in one line).
    """
    fmt = model_format(model) if model is not None else None
    if fmt == "onnx" and (key is None or fmt not in RUNTIMES.get(key, Runtime).formats):
        name = "the model" if isinstance(model, bytes | bytearray) else Path(model).name  # type: ignore[arg-type]
        reason = OnnxRuntime.unavailable_reason()
        if reason:
            raise RuntimeUnavailable(f"{name} is an ONNX model; {reason}")
        return OnnxRuntime()
    if key is not None:
        cls = RUNTIMES.get(key)
        if cls is None:
            raise RuntimeUnavailable(f"unknown runtime '{key}' (known: {', '.join(RUNTIMES)})")
        if fmt is not None and fmt not in cls.formats:
            raise RuntimeUnavailable(f"runtime '{key}' does not run {fmt} models "
                                     f"(it runs {', '.join(cls.formats)})")
        reason = cls.unavailable_reason()
        if reason:
            raise RuntimeUnavailable(reason)
        return cls()
    reasons = []
    for cls in RUNTIMES.values():
        if (fmt or "tflite") not in cls.formats:
            continue
        reason = cls.unavailable_reason()
        if reason is None:
            return cls()
        reasons.append(reason)
    raise RuntimeUnavailable("no interpreter runtime is installed: " + "; ".join(reasons))


__all__ = ["FORMATS", "RUNTIMES", "SUFFIX", "Runtime", "RuntimeUnavailable", "get_runtime", "model_format"]
