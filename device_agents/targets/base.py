"""The target plugin interface: one module per accelerator or runtime target.

A target is what a profile names as ``runtime.delegate`` and what a bench record names as its
``delegate``. Its module holds everything that target means, on both sides:

- its ``key``, the ``accelerator`` a profile's hardware must have for it, and its summary;
- compile side (run by the host's compiler, never needing TensorFlow): :meth:`Target.rule_check`,
  the op support predicted from the vendor's documented rules, and, for targets with a compiler of
  their own, the variant it makes (:attr:`Target.compiled_variant`), :meth:`Target.compile` and
  :meth:`Target.compiler_unavailable`;
- device side: :meth:`Target.interpreter_options`, how the interpreter loads the target.

The registry (:mod:`device_agents.targets`) finds them. Adding a target is adding one module
here and one test; the docs' "Adding a target" page walks through one.
"""

from __future__ import annotations

import ctypes
from typing import Any, ClassVar, Protocol

from device_agents.errors import RuntimeUnavailable


class OpLike(Protocol):
    index: int
    name: str
    inputs: list[int]
    outputs: list[int]


class ModelFacts(Protocol):
    """What a rule check reads of a model (``edge_kit.compiler.analysis.ModelStats`` has it)."""

    ops: list[Any]
    tensors: dict[int, Any]


class Target:
    """Base class; subclasses set the class attributes and override the hooks they need."""

    key: ClassVar[str]
    accelerator: ClassVar[str] = "none"  # the profile's hardware.accelerator this target needs
    summary: ClassVar[str] = ""
    library: ClassVar[str | None] = None  # the delegate's shared library on the device, if any
    install_hint: ClassVar[str] = ""  # where the library comes from
    compiled_variant: ClassVar[str | None] = None  # the variant this target's own compiler makes

    @classmethod
    def rule_check(cls, stats: ModelFacts) -> dict[str, Any] | None:
        """Return the predicted op support of a model on this target (``method: rule-check``), or None."""
        return None

    @classmethod
    def compiler_unavailable(cls) -> str | None:
        """Return why :meth:`compile` cannot run on this host (one line naming what to install), or None."""
        return None

    @classmethod
    def compile(cls, model: bytes) -> tuple[bytes, dict[str, Any]]:
        """Return (compiled model, the compiler's own record) for :attr:`compiled_variant`.

        Raises:
            RuntimeError: the compiler failed; the message holds its last line of output.
        """
        raise NotImplementedError(f"target {cls.key} has no compiler of its own")

    @classmethod
    def tool_versions(cls) -> dict[str, str | None]:
        """Return the versions of the host tools this target's compile step uses (for the manifest)."""
        return {}

    @classmethod
    def interpreter_options(cls, interpreter_module: Any) -> dict[str, Any]:
        """Return the keyword arguments that make a LiteRT ``Interpreter`` run on this target.

        Raises:
            RuntimeUnavailable: the target's library cannot be loaded here.
        """
        if cls.library is None:
            return {}
        try:
            ctypes.CDLL(cls.library)  # probe first: a failed load_delegate leaves a half-built object behind
            return {"experimental_delegates": [interpreter_module.load_delegate(cls.library)]}
        except (ValueError, OSError) as exc:
            raise RuntimeUnavailable(f"delegate '{cls.key}' needs {cls.library}, which could not be loaded "
                                     f"({exc}); {cls.install_hint}") from None


def count_unsupported(stats: ModelFacts, supported: frozenset[str]) -> dict[str, Any]:
    """Return a rule check for a target that splits the graph as often as needed (ops fall back locally).

    Returns:
        ``{"method": "rule-check", "ops_total", "ops_mapped", "unsupported_ops": {op: count}}``.
    """
    unsupported: dict[str, int] = {}
    for op in stats.ops:
        if op.name not in supported:
            unsupported[op.name] = unsupported.get(op.name, 0) + 1
    return {"method": "rule-check", "ops_total": len(stats.ops),
            "ops_mapped": len(stats.ops) - sum(unsupported.values()), "unsupported_ops": unsupported}
