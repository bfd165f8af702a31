"""User functions for scoring (``--metric module:function``) and box decoding (``--decode module:function``).

``module`` is a ``.py`` file path or an importable module name. Its source is read once on the host
and shipped with the eval set (see :class:`device_agents.metrics.MetricSpec`), so the device runs
the very same code without the user's package installed there.

A metric is called ``function(outputs, labels)``: ``outputs`` maps output names to float arrays
(first axis = samples), ``labels`` maps label keys (``y`` or the part after ``y.``) to arrays. It
returns a number or ``{name: number}`` (the first is the headline, higher is better). A decoder is
called ``function(outputs)`` and returns one dict per sample (see :mod:`device_agents.metrics.detection`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from device_agents.errors import MetricError


def _parts(spec: str) -> tuple[str, str]:
    module, sep, func = spec.rpartition(":")
    if not sep or not module or not func.isidentifier():
        raise MetricError(f"'{spec}': give module:function, e.g. my_metrics.py:score")
    return module, func


def read_source(spec: str) -> str:
    """Return the source text of the module of ``module:function``.

    Raises:
        MetricError: the spec has no ``:``, the file or module cannot be found or read.
    """
    module, _ = _parts(spec)
    if module.endswith(".py") or "/" in module:
        path = Path(module)
    else:
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.origin or not found.origin.endswith(".py"):
            raise MetricError(f"'{spec}': module '{module}' not found (or not a .py file); give a path to the .py file")
        path = Path(found.origin)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MetricError(f"'{spec}': cannot read {path} ({exc})") from None


def load_function(source: str, spec: str) -> Callable[..., Any]:
    """Return the function ``spec`` names from its module's source text, run as a fresh module.

    Raises:
        MetricError: the module fails to run, or has no callable ``func``.
    """
    module_part, func = _parts(spec)
    name = Path(module_part).stem if module_part.endswith(".py") else module_part.rsplit(".", 1)[-1]
    module = types.ModuleType(f"edgekit_user_{name}")
    module.__file__ = f"<{spec}>"
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for --json documents
            exec(compile(source, f"{name}.py", "exec"), module.__dict__)  # noqa: S102 - the operator's own metric code
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code: every failure is reported in one line
        raise MetricError(f"'{spec}': the module failed to load ({type(exc).__name__}: {str(exc)[:200]})") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise MetricError(f"'{spec}': the module has no function '{func}'")
    try:
        fn.spec = spec  # type: ignore[attr-defined] - named in error messages
    except (AttributeError, TypeError):
        pass
    return fn


def call_user(fn: Callable[..., Any], where: str, *args: Any) -> Any:
    """Return ``fn(*args)``, a user function (``--metric``, ``--decode``), with what it prints sent to stderr: stdout
    carries ``--json`` documents (``edgekit compile``, ``edgekit-agent bench``).

    Raises:
        MetricError: ``WHERE raised TYPE: message`` for anything it raises, SystemExit included (a script that
            parses the command line or calls ``sys.exit``); KeyboardInterrupt is left to stop the command.
    """
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return fn(*args)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code: reported, never fatal
        raise MetricError(f"{where} raised {type(exc).__name__}: {str(exc)[:200]}") from None
