"""LiteRT's "INFO: Created ... XNNPACK delegate" line is kept out of the CLI's output, nothing else is.

Each case runs in a fresh Python: the runtime prints the line once per process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BANNER = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
ROOT = Path(__file__).resolve().parents[2]


def tiny_add_model() -> bytes:
    """A float32 ADD of two [1, 4] tensors, built with LiteRT's own schema (no TensorFlow needed)."""
    import ai_edge_litert.schema_py_generated as s
    import flatbuffers
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.ADD
    code.version = 1
    tensors = []
    for name in ("a", "b", "sum"):
        t = s.TensorT()
        t.shape, t.type, t.buffer, t.name = [1, 4], s.TensorType.FLOAT32, 0, name
        tensors.append(t)
    add = s.OperatorT()
    add.opcodeIndex, add.inputs, add.outputs = 0, [0, 1], [2]
    add.builtinOptionsType, add.builtinOptions = s.BuiltinOptions.AddOptions, s.AddOptionsT()
    graph = s.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs, graph.operators = tensors, [0, 1], [2], [add]
    model = s.ModelT()
    model.version, model.operatorCodes, model.buffers, model.subgraphs = 3, [code], [s.BufferT()], [graph]
    b = flatbuffers.Builder(1024)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def run(tmp_path: Path, body: str) -> str:
    """Build an interpreter of the tiny model in a fresh process; return what reached its fd 2."""
    model = tmp_path / "add.tflite"
    model.write_bytes(tiny_add_model())
    script = ("import os\nfrom device_agents.runtimes import get_runtime\n"
              "from edge_kit.compiler.tf_quiet import runtime_banner_dropped\n"
              f"rt, model = get_runtime('litert'), {str(model)!r}\n" + body)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_the_runtime_prints_its_banner_on_fd_2_without_the_helper(tmp_path):
    # The control: without it the next test would pass on a runtime that had simply stopped printing.
    assert BANNER in run(tmp_path, "rt.interpreter(model)\n")


def test_the_helper_drops_the_banner_and_passes_on_everything_else_in_order(tmp_path):
    err = run(tmp_path, "try:\n"
                        "    with runtime_banner_dropped():\n"
                        "        os.write(2, b'before\\n')\n"
                        "        rt.interpreter(b'not a flatbuffer')\n"
                        "except ValueError:\n"
                        "    os.write(2, b'raised\\n')\n"  # fd 2 is back after an exception in the block
                        "with runtime_banner_dropped():\n"
                        "    rt.interpreter(model)\n"
                        "    os.write(2, b'a real error\\n')\n"
                        "rt.interpreter(model)\n"
                        "with runtime_banner_dropped():\n"  # dropped once: no redirect any more
                        "    os.write(2, b'after\\n')\n")
    assert BANNER not in err
    assert err.index("before") < err.index("raised") < err.index("a real error") < err.index("after"), err


def test_the_smoke_child_a_compile_starts_keeps_the_banner_off_stderr_too(tmp_path):
    """The compiler loads a source first in a forkserver child (probe_in_child): that process's own
    first interpreter printed the line in the middle of compile's output."""
    script = tmp_path / "probe.py"
    script.write_text("import sys\nfrom edge_kit.compiler.analysis import probe_in_child\n"
                      "if __name__ == '__main__':\n"  # the forkserver imports this file: run only here
                      f"    probe_in_child(open({str(tmp_path / 'add.tflite')!r}, 'rb').read())\n"
                      "    print('probed')\n")
    (tmp_path / "add.tflite").write_bytes(tiny_add_model())
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stdout.strip() == "probed", done.stderr
    assert BANNER not in done.stderr, done.stderr
