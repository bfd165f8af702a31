"""Interpreter runtimes as plugins, keyed by name (``litert``, ``tflite-runtime``).

A runtime whose library is not installed stays registered but unavailable, and says which package
to install; nothing installs itself at run time.
"""

from __future__ import annotations

from device_agents.errors import RuntimeUnavailable
from device_agents.runtimes.base import Runtime
from device_agents.runtimes.litert import LiteRT, TfliteRuntime

RUNTIMES: dict[str, type[Runtime]] = {cls.key: cls for cls in (LiteRT, TfliteRuntime)}


def get_runtime(key: str | None = None) -> Runtime:
    """Return an instance of the runtime ``key``, or of the first available one when ``key`` is None.

    Raises:
        RuntimeUnavailable: unknown key, or its library is not installed (the message says what to install).
    """
    if key is not None:
        cls = RUNTIMES.get(key)
        if cls is None:
            raise RuntimeUnavailable(f"unknown runtime '{key}' (known: {', '.join(RUNTIMES)})")
        reason = cls.unavailable_reason()
        if reason:
            raise RuntimeUnavailable(reason)
        return cls()
    reasons = []
    for cls in RUNTIMES.values():
        reason = cls.unavailable_reason()
        if reason is None:
            return cls()
        reasons.append(reason)
    raise RuntimeUnavailable("no interpreter runtime is installed: " + "; ".join(reasons))


__all__ = ["RUNTIMES", "Runtime", "RuntimeUnavailable", "get_runtime"]
