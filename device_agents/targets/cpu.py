"""The CPU targets: LiteRT's XNNPACK delegate (the default) and its reference kernels (``none``).

Both run every LiteRT op and need nothing installed beyond the interpreter; ``none`` exists to
measure what XNNPACK buys on a device.
"""

from __future__ import annotations

from typing import Any, ClassVar

from device_agents.targets.base import Target


class Xnnpack(Target):
    key: ClassVar[str] = "xnnpack"
    summary: ClassVar[str] = "CPU through LiteRT's default XNNPACK delegate"


class Reference(Target):
    key: ClassVar[str] = "none"
    summary: ClassVar[str] = "CPU with LiteRT's reference kernels, no delegate"

    @classmethod
    def interpreter_options(cls, interpreter_module: Any, options: dict[str, Any] | None = None) -> dict[str, Any]:
        cls.options(options)
        return {"experimental_op_resolver_type": interpreter_module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
