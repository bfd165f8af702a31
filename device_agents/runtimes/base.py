"""The runtime plugin interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar


class Runtime:
    """A way to run models of some :attr:`formats`. Subclasses set ``key``, ``package`` and implement the hooks."""

    key: ClassVar[str]
    package: ClassVar[str]  # what `pip install` needs for this runtime
    formats: ClassVar[tuple[str, ...]] = ("tflite",)  # the model formats it runs (device_agents.runtimes.model_format)
    # the ``options`` of :meth:`interpreter` for a reader of the agent's store (an application's open_current): a
    # runtime that writes there (TensorRT's engine cache) then only reads; None: it never writes there
    reader_options: ClassVar[dict[str, Any] | None] = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Return None when usable here, else a one-line reason naming what to install."""
        raise NotImplementedError

    def version(self) -> str:
        """Return the runtime library's version string."""
        raise NotImplementedError

    def interpreter(self, model: Path | bytes, *, threads: int = 1, delegate: str = "xnnpack",
                    options: dict[str, Any] | None = None) -> Any:
        """Return an allocated interpreter for ``model`` (a path or the flatbuffer bytes).

        ``delegate`` is a target plugin's key (:data:`device_agents.targets.TARGETS`): ``xnnpack``
        (the default CPU path), ``none`` (reference kernels), ``edgetpu``, ``gpu``; ``options`` its
        ``runtime.options``, checked by the target's config model.

        Raises:
            RuntimeUnavailable: an unknown target, or its library cannot be loaded here.
            ConfigError: an option the target does not take.
            ValueError: the model is not a valid flatbuffer or cannot be prepared.
        """
        raise NotImplementedError
