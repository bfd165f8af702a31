"""The registry of target plugins, keyed by what profiles call ``runtime.delegate``.

See :mod:`device_agents.targets.base` for what a target holds; one module per target.
"""

from __future__ import annotations

from typing import Any

from device_agents.errors import RuntimeUnavailable
from device_agents.targets.base import Target
from device_agents.targets.cpu import Reference, Xnnpack
from device_agents.targets.edgetpu import EdgeTpu
from device_agents.targets.gpu import LiteRtGpu
from edgekit_protocol.config import closest

TARGETS: dict[str, type[Target]] = {cls.key: cls for cls in (Xnnpack, Reference, EdgeTpu, LiteRtGpu)}


def get_target(key: str) -> type[Target]:
    """Return the target plugin ``key``.

    Raises:
        RuntimeUnavailable: no such target (the message names the closest one and all known).
    """
    cls = TARGETS.get(key)
    if cls is None:
        near = closest(key, TARGETS)
        raise RuntimeUnavailable(f"unknown target '{key}'" + (f"; did you mean '{near}'?" if near else "")
                                 + f" (known: {', '.join(TARGETS)})")
    return cls


def compiler_of(variant: str) -> type[Target] | None:
    """Return the target whose own compiler makes ``variant`` (``edgetpu``), or None."""
    return next((t for t in TARGETS.values() if t.compiled_variant == variant), None)


def accelerator_missing(variant: str | None, delegate: str, options: dict[str, Any] | None = None) -> str | None:
    """Return why a model of ``variant`` cannot run on this device with ``delegate`` and its ``options`` (the agent's
    ``runtime.delegate`` and ``runtime.options``), or None when it can. Only a variant a target's own compiler makes
    (``edgetpu``) needs anything: that target as the delegate, its library loadable here and the accelerator
    ``options`` name attached (:meth:`Target.device_missing`). Such a model holds an op only that delegate resolves
    (``edgetpu-custom-op``), so on any other path it would fail as if it were broken.

    Returns:
        One line: the variant, what is missing (no such accelerator configured, its library, the accelerator
        ``options`` name, or options it does not take), and what to install or do instead; None when nothing is
        missing.
    """
    target = compiler_of(variant) if variant else None
    if target is None:
        return None
    if delegate != target.key:
        return (f"variant {variant} runs only on the {target.summary} through the '{target.key}' delegate, and this "
                f"agent runs the '{delegate}' delegate (no {target.accelerator} here: a simulated device or a profile "
                f"without it); {target.install_hint}, attach the accelerator and set runtime.delegate: {target.key}, "
                "or use another variant")
    missing = target.library_missing() or target.device_missing(options)
    return None if missing is None else (f"variant {variant} needs the {target.summary}: {missing}; or use another "
                                         "variant")


CPU = "xnnpack"  # what a variant runs on where the profile's delegate is an accelerator made for another variant


def delegate_for(variant: str | None, delegate: str, options: dict[str, Any] | None) -> tuple[str, dict[str, Any] | None]:
    """Return ``(delegate, options)`` that a model of ``variant`` runs with where the agent's ``runtime.delegate``
    is ``delegate`` with ``options``. A target with a compiler of its own (``edgetpu``) runs only the variant that
    compiler makes: every other variant (``int8``, ``fp32``, ...) runs on the CPU, through LiteRT's default
    (:data:`CPU`: no delegate given to the interpreter, no target options), so a Coral without a working Edge TPU
    still runs them. Any other delegate, or an unknown ``variant`` (a file benchmarked by hand), is kept as given.

    Returns:
        The delegate key and its options (None for the CPU).
    """
    target = TARGETS.get(delegate)
    if variant is not None and target is not None and target.compiled_variant and variant != target.compiled_variant:
        return CPU, None
    return delegate, options


__all__ = ["CPU", "TARGETS", "Target", "accelerator_missing", "compiler_of", "delegate_for", "get_target"]
