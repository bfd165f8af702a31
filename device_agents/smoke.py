"""The check a model passes before it becomes current: load it, run one inference, in another process.

:class:`SmokePool` runs it in children forked from a ``forkserver`` that has numpy and the
interpreter already imported: the running agent keeps one, so a check costs a model load, not a
Python start. A model that crashes the interpreter kills only the child.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.errors import SmokeCrashed, SmokeFailed
from device_agents.runtimes import RUNTIMES, RuntimeUnavailable, get_runtime
from edgekit_protocol.errors import ConfigError


def smoke(model: Path, runtime: str | None = None, delegate: str = "xnnpack",
          options: dict[str, Any] | None = None, threads: int = 1) -> dict[str, Any]:
    """Load ``model`` and run one inference on zeros, with the runtime, delegate, options and threads
    that will serve it.

    Returns:
        Input and output shapes and the milliseconds it took.

    Raises:
        SmokeFailed: it did not load (options its target does not take included), did not run, or gave
            NaN/infinite float outputs.
    """
    from device_agents.inference import ModelRunner

    try:
        t0 = time.perf_counter()
        runner = ModelRunner(get_runtime(runtime, model=Path(model)).interpreter(Path(model), threads=threads,
                                                                                     delegate=delegate, options=options))
        runner.invoke_raw([np.zeros(p.shape, dtype=p.dtype) for p in runner.inputs])
        outs = [runner.interpreter.get_tensor(p.index) for p in runner.outputs]
    except (ValueError, RuntimeError, RuntimeUnavailable, OSError, ConfigError) as exc:  # ConfigError: the target's options
        raise SmokeFailed((str(exc).strip().splitlines() or [type(exc).__name__])[0]) from None
    for port, out in zip(runner.outputs, outs):
        if np.issubdtype(out.dtype, np.floating) and not np.all(np.isfinite(out)):
            raise SmokeFailed(f"output '{port.name}' holds NaN or infinity")
    return {"inputs": {p.name: list(p.shape) for p in runner.inputs},
            "outputs": {p.name: list(p.shape) for p in runner.outputs},
            "ms": round((time.perf_counter() - t0) * 1000, 3)}


def _child(model: str, runtime: str | None, delegate: str, options: dict[str, Any] | None, threads: int,
           conn: Any) -> None:
    from device_agents.runtimes.banner import runtime_banner_dropped

    try:
        with runtime_banner_dropped():  # the child's own first interpreter: its INFO line, nothing else
            result = smoke(Path(model), runtime, delegate, options, threads)
        conn.send(("ok", result))
    except SmokeFailed as exc:
        conn.send(("failed", str(exc)))
    conn.close()


def _preload() -> None:
    """Import the installed interpreter module in the forkserver, so children start warm."""
    for cls in RUNTIMES.values():
        if cls.unavailable_reason() is None:
            break


class SmokePool:
    """Runs :func:`smoke` in children of a forkserver that has the interpreter imported."""

    def __init__(self) -> None:
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["device_agents.smoke"])

    def warm(self) -> None:
        """Start the forkserver now (it imports numpy and the interpreter once), not at the first activation."""
        from multiprocessing import forkserver

        forkserver.ensure_running()

    def __call__(self, model: Path, *, runtime: str | None = None, delegate: str = "xnnpack",
                 options: dict[str, Any] | None = None, threads: int = 1,
                 timeout: float = 120.0) -> dict[str, Any]:
        """Return what :func:`smoke` returned in the child.

        Raises:
            SmokeCrashed: the child crashed (signal named in ``how``), was killed or timed out.
            SmokeFailed: the model did not load or run, or gave NaN or infinity.
        """
        receive, send = self.ctx.Pipe(duplex=False)
        child = self.ctx.Process(target=_child, args=(str(model), runtime, delegate, options, threads, send), daemon=True)
        child.start()
        send.close()
        try:
            if not receive.poll(timeout):
                child.kill()
                raise SmokeCrashed(f"the smoke inference did not finish within {timeout:.0f} s",
                                   f"did not finish within {timeout:.0f} s")
            try:
                status, value = receive.recv()
            except EOFError:
                child.join(5)
                code = child.exitcode or 0
                name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"exit {code}"
                how = "was killed (out of memory?)" if name == "SIGKILL" else f"crashed ({name})"
                raise SmokeCrashed(f"the interpreter crashed (exit {code})", how) from None
        finally:
            receive.close()
            child.join(5)
        if status != "ok":
            raise SmokeFailed(value)
        return value


_preload()
