"""The target plugin interface: one module per accelerator or runtime target.

A target is what a profile names as ``runtime.delegate`` and what a bench record names as its
``delegate``. Its module holds everything that target means, on both sides:

- its ``key``, the ``accelerator`` a profile's hardware must have for it, and its summary;
- its config model, :attr:`Target.Options`: a frozen dataclass of what a profile may set under
  ``runtime.options`` (checked strictly, on the host when the profile loads and on the device);
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
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from device_agents.errors import RuntimeUnavailable
from edgekit_protocol.config import parse


class OpLike(Protocol):
    index: int
    name: str
    inputs: list[int]
    outputs: list[int]


class ModelFacts(Protocol):
    """What a rule check reads of a model (``edge_kit.compiler.analysis.ModelStats`` has it)."""

    ops: list[Any]
    tensors: dict[int, Any]


@dataclass(frozen=True)
class NoOptions:
    """The config model of a target that takes no options."""


class Target:
    """Base class; subclasses set the class attributes and override the hooks they need."""

    Options: ClassVar[type] = NoOptions  # the target's config model (profile runtime.options)

    key: ClassVar[str]
    accelerator: ClassVar[str] = "none"  # the profile's hardware.accelerator this target needs
    summary: ClassVar[str] = ""
    library: ClassVar[str | None] = None  # the delegate's shared library on the device, if any
    install_hint: ClassVar[str] = ""  # where the library comes from
    compiled_variant: ClassVar[str | None] = None  # the variant this target's own compiler makes
    custom_op: ClassVar[str | None] = None  # the op that compiler writes, which only this target's delegate resolves

    @classmethod
    def options(cls, raw: dict[str, Any] | None, where: str = "runtime.options") -> Any:
        """Return ``raw`` as the target's :attr:`Options`.

        Raises:
            ConfigError: a key the target does not take (with the closest one), or a wrong type.
        """
        return parse(cls.Options, raw or {}, where, "options")

    @classmethod
    def delegate_options(cls, options: Any) -> dict[str, str]:
        """Return the options as the ``load_delegate`` options dictionary (set fields only, as strings)."""
        return {f.name: str(v) for f in dataclasses.fields(options) if (v := getattr(options, f.name)) is not None}

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
    def interpreter_options(cls, interpreter_module: Any, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """Return the keyword arguments that make a LiteRT ``Interpreter`` run on this target.

        ``options``: the target's ``runtime.options`` (see :attr:`Options`).

        Raises:
            ConfigError: an option the target does not take.
            RuntimeUnavailable: the target's library cannot be loaded here.
        """
        checked = cls.options(options)
        if cls.library is None:
            return {}
        if (missing := cls.library_missing()) is not None:  # a failed load_delegate leaves a half-built object behind
            raise RuntimeUnavailable(missing)
        try:
            return {"experimental_delegates": [interpreter_module.load_delegate(cls.library,
                                                                                cls.delegate_options(checked))]}
        except (ValueError, OSError) as exc:
            raise RuntimeUnavailable(f"delegate '{cls.key}' needs {cls.library}, which could not be loaded "
                                     f"({exc}); {cls.install_hint}") from None

    @classmethod
    def library_missing(cls) -> str | None:
        """Return why the target's delegate library cannot be loaded in this process (one line naming what to
        install), or None when it loads or the target needs none. Loading it opens no device."""
        if cls.library is None:
            return None
        try:
            ctypes.CDLL(cls.library)
        except OSError as exc:
            return f"delegate '{cls.key}' needs {cls.library}, which could not be loaded ({exc}); {cls.install_hint}"
        return None

    @classmethod
    def device_missing(cls, options: dict[str, Any] | None = None) -> str | None:
        """Return why the target's accelerator (the one its ``options``, ``runtime.options``, name) cannot be opened
        now although its library loads (one line: none attached), or None when it opens or the target has no device
        to open. Asked again at every check, so a device attached later is found without restarting the agent."""
        return None


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
