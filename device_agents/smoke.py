"""Child-process check of a model before it becomes current: load it, run one inference.

``python -m device_agents.smoke model.tflite [--delegate D] [--runtime R]`` prints one JSON line
and exits 0, or prints the reason on stderr and exits 1. A model that crashes the interpreter
kills only this process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m device_agents.smoke")
    parser.add_argument("model", type=Path)
    parser.add_argument("--delegate", default="xnnpack")
    parser.add_argument("--runtime")
    args = parser.parse_args(argv)
    from device_agents.inference import ModelRunner
    from device_agents.runtimes import RuntimeUnavailable, get_runtime

    try:
        t0 = time.perf_counter()
        runner = ModelRunner(get_runtime(args.runtime).interpreter(args.model, delegate=args.delegate))
        runner.invoke_raw(np.zeros(runner.input_shape, dtype=runner.input["dtype"]))
        out = runner.interpreter.get_tensor(runner.output["index"])
        if np.issubdtype(out.dtype, np.floating) and not np.all(np.isfinite(out)):
            raise ValueError("the output holds NaN or infinity")
    except (ValueError, RuntimeError, RuntimeUnavailable, OSError) as exc:
        sys.stderr.write(f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0]}\n")
        sys.exit(1)
    print(json.dumps({"input_shape": list(runner.input_shape), "output_shape": list(out.shape),
                      "ms": round((time.perf_counter() - t0) * 1000, 3)}))


if __name__ == "__main__":
    main()
