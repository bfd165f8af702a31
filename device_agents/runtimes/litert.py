"""LiteRT (``ai-edge-litert``) and the older ``tflite-runtime``: the same interpreter API, two packages."""

from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
from pathlib import Path
from typing import Any, ClassVar

from device_agents.runtimes.base import Runtime, RuntimeUnavailable

# Shared library names of the external delegates, as the vendors' packages install them.
DELEGATE_LIBRARIES = {
    "edgetpu": "libedgetpu.so.1",  # Debian package libedgetpu1-std (or -max) from Coral
    "gpu": "libtensorflowlite_gpu_delegate.so",  # built from LiteRT sources; needs OpenCL or OpenGL ES
}


class LiteRT(Runtime):
    key: ClassVar[str] = "litert"
    package: ClassVar[str] = "ai-edge-litert"
    module: ClassVar[str] = "ai_edge_litert.interpreter"

    @classmethod
    def _module(cls) -> Any:
        return importlib.import_module(cls.module)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            cls._module()
        except ImportError as exc:
            return f"runtime '{cls.key}' needs the '{cls.package}' package (pip install {cls.package}): {exc}"
        return None

    def version(self) -> str:
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    def interpreter(self, model: Path | bytes, *, threads: int = 1, delegate: str = "xnnpack") -> Any:
        mod = self._module()
        kwargs: dict[str, Any] = {"num_threads": threads}
        if isinstance(model, bytes | bytearray):
            kwargs["model_content"] = bytes(model)
        else:
            kwargs["model_path"] = str(model)
        if delegate == "none":
            kwargs["experimental_op_resolver_type"] = mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        elif delegate in DELEGATE_LIBRARIES:
            lib = DELEGATE_LIBRARIES[delegate]
            try:
                ctypes.CDLL(lib)  # probe first: a failed load_delegate leaves a half-built object behind
                kwargs["experimental_delegates"] = [mod.load_delegate(lib)]
            except (ValueError, OSError) as exc:
                raise RuntimeUnavailable(
                    f"delegate '{delegate}' needs {lib}, which could not be loaded ({exc}); "
                    "see docs/firmware/ for how to install it"
                ) from None
        elif delegate != "xnnpack":
            raise RuntimeUnavailable(f"unknown delegate '{delegate}' (known: xnnpack, none, {', '.join(DELEGATE_LIBRARIES)})")
        interp = mod.Interpreter(**kwargs)
        interp.allocate_tensors()
        return interp


class TfliteRuntime(LiteRT):
    key: ClassVar[str] = "tflite-runtime"
    package: ClassVar[str] = "tflite-runtime"
    module: ClassVar[str] = "tflite_runtime.interpreter"
