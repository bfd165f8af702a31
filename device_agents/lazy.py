"""A module imported at its first use, then a plain global: for the agent's modules whose commands start without numpy
(``edgekit-agent install``, ``state``, ...) and whose hot paths (the serving API's frames, a request's inputs) use it.

A function's own ``import numpy as np`` costs each call: some 0.13 us here (measured with timeit on a 2-core x86-64
VM), eight to ten of them a served request between the client and the server. A :class:`LazyModule` bound to the
module's global ``np`` imports numpy at the first attribute asked of it and puts numpy itself in that global: every
later use is a global lookup, as an import at the module's top would be.
"""

from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    """Stands for the module ``name`` in the global ``alias`` of ``namespace`` (a module's ``globals()``) until an
    attribute of it is first asked for; then imports it, binds ``alias`` to it and returns the attribute.

    Raises (at that first use): ImportError, as the import does; AttributeError, as the module's attribute does.
    """

    def __init__(self, name: str, namespace: dict[str, Any], alias: str):
        self._name, self._namespace, self._alias = name, namespace, alias

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self._name)
        self._namespace[self._alias] = module
        return getattr(module, attr)
