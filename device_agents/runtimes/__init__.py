"""Interpreter runtimes as plugins, keyed by name (``litert``, ``tflite-runtime``, ``onnxruntime``, ``tensorrt``).

A runtime whose library is not installed stays registered but unavailable, and says which package
to install; nothing installs itself at run time.

A model's format (``tflite`` or ``onnx``) is read from its bytes by :func:`model_format`, the one
place that decides it; :func:`get_runtime` given the model picks a runtime that runs that format.
An ONNX model that ``edgekit compile`` tagged for TensorRT (the ``trt-*`` variants,
:data:`~device_agents.formats.META_RUNTIME` in its metadata) gets ``tensorrt``;
:func:`prepare_installed` builds its engine at install.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from device_agents.errors import RuntimeUnavailable, StoreError
from device_agents.formats import (
    FORMATS,
    META_RUNTIME,
    SUFFIX,
    model_format,
    onnx_metadata,
)
from device_agents.runtimes.base import Runtime
from device_agents.runtimes.litert import LiteRT, TfliteRuntime
from device_agents.runtimes.onnxruntime import OnnxRuntime
from device_agents.runtimes.tensorrt import TensorRT

RUNTIMES: dict[str, type[Runtime]] = {cls.key: cls for cls in (LiteRT, TfliteRuntime, OnnxRuntime, TensorRT)}


def is_tensorrt(model: Path | bytes) -> bool:
    """Return True when ``model`` is an ONNX artifact tagged for TensorRT (a ``trt-*`` variant).

    Raises:
        OSError: the file cannot be read.
    """
    try:
        return onnx_metadata(model).get(META_RUNTIME) == "tensorrt"
    except ValueError:  # not valid protobuf: onnxruntime will say so when it loads it
        return False


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
    if fmt == "onnx" and model is not None and is_tensorrt(model):  # the engine needs TensorRT: no silent CPU fallback
        name = "the model" if isinstance(model, bytes | bytearray) else Path(model).name
        reason = TensorRT.unavailable_reason()
        if reason:
            raise RuntimeUnavailable(f"{name} is a TensorRT variant; {reason}")
        return TensorRT()
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


def prepare_installed(store: Any, sha256: str, *, fresh: bool = True, threads: int = 1,
                      build: Callable[..., dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """Do what an installed model needs before it can be activated: for a ``trt-*`` variant, build its
    TensorRT engine now (:func:`device_agents.runtimes.tensorrt.build_in_child`), not on the first request.

    ``store`` is the :class:`~device_agents.store.ModelStore`; ``fresh`` says the install added the model
    (a failed build then removes it again, unless it is ``current`` or ``previous``); ``build`` replaces
    the builder (tests).

    Returns:
        The engine build record (time, peak memory, cache key...) for a TensorRT variant, else None.

    Raises:
        StoreError: the engine build failed (one line); the device stays on its current model.
    """
    from device_agents.runtimes import tensorrt

    path = store.model_path(sha256)
    if not is_tensorrt(path):
        return None
    build = build or tensorrt.build_in_child
    try:
        return build(path, store.root, threads=threads)
    except tensorrt.EngineBuildError as exc:
        if fresh and sha256 not in (store.current(), store.previous()):
            store.remove(sha256)
            tensorrt.remove_engines(store.root, sha256)
        raise StoreError(f"install: {exc}; the device stays on its current model") from None


def ran_with(interpreter: Any, delegate: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """Return what ran a model in ``interpreter``, made with ``delegate`` and its ``options``, as a bench record and a
    smoke check's answer name it: ``delegate`` and ``delegate_options``; for ONNX Runtime the execution provider the
    session runs on (it stands where LiteRT's target does) and no options."""
    if hasattr(interpreter, "provider"):
        return {"delegate": interpreter.provider, "delegate_options": {}}
    return {"delegate": delegate, "delegate_options": dict(options or {})}


__all__ = ["FORMATS", "RUNTIMES", "SUFFIX", "Runtime", "RuntimeUnavailable", "get_runtime", "is_tensorrt",
           "model_format", "prepare_installed", "ran_with"]
