"""The registry of target plugins, keyed by what profiles call ``runtime.delegate``.

See :mod:`device_agents.targets.base` for what a target holds; one module per target.
"""

from __future__ import annotations

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


__all__ = ["TARGETS", "Target", "compiler_of", "get_target"]
