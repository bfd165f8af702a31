"""LiteRT (``ai-edge-litert``) and the older ``tflite-runtime``: the same interpreter API, two packages."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, ClassVar

from device_agents.runtimes.base import Runtime
from device_agents.targets import TARGETS, get_target


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
        import importlib.metadata  # here: the store commands, which never ask, start without it (tens of ms)

        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    def interpreter(self, model: Path | bytes, *, threads: int = 1, delegate: str = "xnnpack",
                    options: dict[str, Any] | None = None) -> Any:
        """Return an allocated interpreter for ``model`` (see :meth:`Runtime.interpreter`).

        Raises:
            RuntimeUnavailable, ConfigError: as :meth:`Runtime.interpreter` says (the target's).
            ValueError: the model is empty, not a valid flatbuffer, or cannot be prepared; for a
                file, the message starts with its name.
        """
        mod = self._module()
        kwargs: dict[str, Any] = {"num_threads": threads}
        if isinstance(model, bytes | bytearray):
            kwargs["model_content"] = bytes(model)
            name = None
        else:
            kwargs["model_path"] = str(model)
            name = Path(model).name
        kwargs.update(get_target(delegate).interpreter_options(mod, options))
        empty = len(model) == 0 if name is None else Path(model).is_file() and Path(model).stat().st_size == 0
        if empty:
            raise ValueError(f"{name or 'the model'}: is empty (0 bytes); copy or install the model again")
        try:
            interp = mod.Interpreter(**kwargs)
            interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            if name is None:  # bytes: the caller names the model (compile, the store)
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = next((f"; it is compiled for the {t.summary} ({t.custom_op}), which only the '{t.key}' delegate "
                         f"runs: give --delegate {t.key} on a device with it ({t.install_hint}), or use another variant"
                         for t in TARGETS.values() if t.custom_op and t.custom_op in first and t.key != delegate), "")
            raise ValueError(f"{name}: {self.key} cannot load it: {first[:300]}{hint}") from None
        return interp


class TfliteRuntime(LiteRT):
    key: ClassVar[str] = "tflite-runtime"
    package: ClassVar[str] = "tflite-runtime"
    module: ClassVar[str] = "tflite_runtime.interpreter"
