"""LiteRT (``ai-edge-litert``) and the older ``tflite-runtime``: the same interpreter API, two packages."""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path
from typing import Any, ClassVar

from device_agents.runtimes.base import Runtime
from device_agents.targets import get_target


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

    def interpreter(self, model: Path | bytes, *, threads: int = 1, delegate: str = "xnnpack",
                    options: dict[str, Any] | None = None) -> Any:
        mod = self._module()
        kwargs: dict[str, Any] = {"num_threads": threads}
        if isinstance(model, bytes | bytearray):
            kwargs["model_content"] = bytes(model)
        else:
            kwargs["model_path"] = str(model)
        kwargs.update(get_target(delegate).interpreter_options(mod, options))
        interp = mod.Interpreter(**kwargs)
        interp.allocate_tensors()
        return interp


class TfliteRuntime(LiteRT):
    key: ClassVar[str] = "tflite-runtime"
    package: ClassVar[str] = "tflite-runtime"
    module: ClassVar[str] = "tflite_runtime.interpreter"
