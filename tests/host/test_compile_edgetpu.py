"""The ``edgetpu`` variant through ``edgekit compile`` with a stand-in ``edgetpu_compiler`` on PATH.

Coral's compiler cannot be installed here (its apt repository is not reachable, and it runs on x86-64 Linux
only), and no Edge TPU is attached: nothing here has run against the real compiler or hardware. The stand-in
(:data:`FAKE`, written into a temporary folder put first on PATH, for these tests only) takes the real compiler's
command line (``--version``; ``-s``/``--show_operations``, ``-o``/``--out_dir DIR``, the model), writes
``<input name>_edgetpu.tflite`` into the output folder (its input with the first op replaced by an
``edgetpu-custom-op``, as the real compiler replaces the ops it maps; the input unchanged when none maps), and prints the real compiler's log format, taken from its logs as users post them (version line, summary,
the "Model successfully compiled but not all operations are supported by the Edge TPU" paragraph with the counts,
the op table). ``FAKE_EDGETPU_MODE`` picks what it does: ``all`` (every op mapped), ``partial``, ``none`` (0 ops
mapped: the real compiler exits 0 and writes the model), ``abort`` (compiler 16's failure: "ERROR: ...",
"Compilation failed: <why>", then "Compilation failed!", exit 1), ``abort15`` ("Internal compiler error. Aborting!",
exit 1), ``nofile`` (exit 0, no model written) and ``damaged`` (exit 0, a model whose constants' buffers are cut
short: a file edge-kit cannot read)."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
from tiny_models import dense_tflite

from edge_kit.manifest import read_manifest

FAKE = r'''
import os, shutil, sys

VERSION = "Edge TPU Compiler version 16.0.384591198"
args = sys.argv[1:]
if args == ["--version"]:
    print(VERSION)
    sys.exit(0)
out_dir, show, models = ".", False, []
while args:
    arg = args.pop(0)
    if arg in ("-o", "--out_dir"):
        out_dir = args.pop(0)
    elif arg in ("-s", "--show_operations"):
        show = True
    else:
        models.append(arg)
mode = os.environ.get("FAKE_EDGETPU_MODE", "all")
print(VERSION)
print("Started a compilation timeout timer of 180 seconds.")
if mode == "abort":  # compiler 16's failure: the cause, then a last line that says nothing
    print("ERROR: Attempting to use a delegate that only supports static-sized tensors with a graph that has "
          "dynamic-sized tensors.")
    print("Compilation failed: Model failed in Tflite interpreter. Please ensure model can be loaded/run in Tflite "
          "interpreter.")
    print("Compilation child process completed within timeout period.")
    print("Compilation failed! ")
    sys.exit(1)
if mode == "abort15":  # compilers 14 and 15
    print("\nInternal compiler error. Aborting! ", file=sys.stderr)
    sys.exit(1)
(src,) = models
stem = os.path.splitext(os.path.basename(src))[0]
out = os.path.join(out_dir, stem + "_edgetpu.tflite")


def compiled(data):
    """Return the model with its first op replaced by an 'edgetpu-custom-op' reading and writing the same tensors,
    as the real compiler replaces the ops it maps with one such op (which only the Edge TPU delegate resolves)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(data, 0))
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    code.customCode, code.version = "edgetpu-custom-op", 1
    model.operatorCodes.append(code)
    first = model.subgraphs[0].operators[0]
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = len(model.operatorCodes) - 1, first.inputs, first.outputs
    op.customOptions = list(b"edgetpu")
    model.subgraphs[0].operators[0] = op
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


if mode == "none":  # nothing mapped: the model as it came
    shutil.copyfile(src, out)
elif mode == "damaged":  # a model whose constant's buffer is shorter than its shape (what a file cut short reads as)
    from ai_edge_litert import schema_py_generated as schema

    with open(src, "rb") as given:
        model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(given.read(), 0))
    import flatbuffers

    for buffer in model.buffers:
        if buffer.data is not None and len(buffer.data) > 4:
            buffer.data = buffer.data[:4]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    with open(out, "wb") as written:
        written.write(compiled(bytes(builder.Output())))
elif mode != "nofile":
    with open(src, "rb") as given, open(out, "wb") as written:
        written.write(compiled(given.read()))
rows = {"all": [("FULLY_CONNECTED", 1, "Mapped to Edge TPU"), ("QUANTIZE", 1, "Mapped to Edge TPU")],
        "partial": [("FULLY_CONNECTED", 1, "Mapped to Edge TPU"),
                    ("DEQUANTIZE", 1, "Operation is working on an unsupported data type")],
        "damaged": [("FULLY_CONNECTED", 1, "Mapped to Edge TPU"), ("QUANTIZE", 1, "Mapped to Edge TPU")],
        "none": [("FULLY_CONNECTED", 1, "Operation is working on an unsupported data type"),
                 ("QUANTIZE", 1, "Operation is otherwise supported, but not mapped due to some unspecified limitation")],
        "nofile": [("FULLY_CONNECTED", 1, "Mapped to Edge TPU")]}[mode]
mapped = sum(n for _, n, status in rows if status == "Mapped to Edge TPU")
total = sum(n for _, n, _ in rows)
print(f"""
Model compiled successfully in 12 ms.

Input model: {src}
Input size: 1.05KiB
Output model: {out}
Output size: 1.30KiB
On-chip memory used for caching model parameters: {'512.00B' if mapped else '0.00B'}
On-chip memory remaining for caching model parameters: 7.86MiB
Off-chip memory used for streaming uncached model parameters: 0.00B
Number of Edge TPU subgraphs: {1 if mapped else 0}
Total number of operations: {total}
Operation log: {os.path.join(out_dir, stem + '_edgetpu.log')}
""")
if mapped < total:
    print("Model successfully compiled but not all operations are supported by the Edge TPU. A percentage of the "
          "model will instead run on the CPU, which is slower. If possible, consider updating your model to use only "
          "operations supported by the Edge TPU. For details, visit g.co/coral/model-reqs.")
    print(f"Number of operations that will run on Edge TPU: {mapped}")
    print(f"Number of operations that will run on CPU: {total - mapped}")
if show:
    print("\nOperator                       Count      Status\n")
    for op, n, status in rows:
        print(f"{op:<31}{n:<11}{status}")
'''


@pytest.fixture
def fake_compiler(tmp_path, monkeypatch):
    """Put the stand-in ``edgetpu_compiler`` first on PATH; return a function setting its mode."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "edgetpu_compiler"
    script.write_text(f"#!{sys.executable}\n{FAKE}")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")
    return lambda mode: monkeypatch.setenv("FAKE_EDGETPU_MODE", mode)


def compile_coral(tmp_path: Path, run_cli) -> tuple[int, str, Path]:
    """Compile a one-layer float .tflite for coral-usb (int8 and edgetpu); return (exit code, stderr + stdout, the
    model's output folder)."""
    import numpy as np

    model = dense_tflite(tmp_path / "dense.tflite")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).normal(size=(120, 4)).astype(np.float32))
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("compile", model, "-p", "coral-usb", "--out", out, "--calib", tmp_path / "calib.npz")
    return code, stderr + stdout, out / "dense"


def test_the_edgetpu_variant_records_the_compilers_mapping_and_version(tmp_path, run_cli, fake_compiler):
    """Some ops mapped: built, with the compiler's per-op table, its mapped/total counts (from its summary lines),
    the number of Edge TPU subgraphs and its version recorded, and the table's cell shows tpu* mapped/total.

    The compiled model holds an ``edgetpu-custom-op`` that only the Edge TPU's delegate resolves: reading its inputs
    and outputs with the host's interpreter crashed the compile (a RuntimeError traceback, exit 1, nothing written:
    "Encountered unresolved custom op: edgetpu-custom-op"), the rule check said the TPU hands over to the CPU at that
    op, and its MACs were 0. Its inputs and outputs and MACs are its int8 base's now, and it gets no rule check."""
    fake_compiler("partial")
    code, text, folder = compile_coral(tmp_path, run_cli)
    assert code == 0, text
    manifest = read_manifest(folder)
    art = manifest.artifact("edgetpu")
    assert art.status == "built", art.reason
    mapping = art.accelerators["edgetpu_compiler"]
    assert mapping["method"] == "edgetpu_compiler" and mapping["version"] == "Edge TPU Compiler version 16.0.384591198"
    assert (mapping["ops_mapped"], mapping["ops_total"], mapping["subgraphs"]) == (1, 2, 1)
    assert [(r["op"], r["count"], r["mapped"]) for r in mapping["ops"]] == [("FULLY_CONNECTED", 1, True),
                                                                           ("DEQUANTIZE", 1, False)]
    assert manifest.versions["edgetpu_compiler"] == "Edge TPU Compiler version 16.0.384591198"
    assert art.op_histogram.get("edgetpu-custom-op") == 1, art.op_histogram  # what only the TPU's delegate runs
    int8 = manifest.artifact("int8")
    assert art.inputs == int8.inputs and art.outputs == int8.outputs  # the compiler keeps the model's inputs/outputs
    assert (art.macs, art.weights) == (int8.macs, int8.weights) == (12, 12)  # the computation the custom op holds
    assert art.methods["macs"].startswith("the int8 variant's figure (the model it was compiled from")
    assert set(art.accelerators) == {"edgetpu_compiler"}  # no rule check on the compiled file: int8's row has it
    assert "tpu* 1/2" in text and "CPU from edgetpu-custom-op" not in text


def test_every_op_mapped_is_counted_from_the_summary(tmp_path, run_cli, fake_compiler):
    """Every op mapped: the real compiler prints no "will run on Edge TPU" count then; the total is every op."""
    fake_compiler("all")
    code, text, folder = compile_coral(tmp_path, run_cli)
    assert code == 0, text
    mapping = read_manifest(folder).artifact("edgetpu").accelerators["edgetpu_compiler"]
    assert (mapping["ops_mapped"], mapping["ops_total"]) == (2, 2) and "tpu* 2/2" in text


@pytest.mark.parametrize("mode, reason", [
    ("none", "edgetpu: edgetpu_compiler mapped none of the model's 2 operations to the Edge TPU (first in its table: "
             "FULLY_CONNECTED x1: Operation is working on an unsupported data type), so the variant would run on the "
             "CPU only, like int8; see docs/firmware/coral.md for what the Edge TPU takes (full-integer ops, static "
             "shapes, at most 3 dimensions larger than 1, the supported ops)"),
    ("abort", "edgetpu: edgetpu_compiler failed (exit 1): Compilation failed: Model failed in Tflite interpreter. "
              "Please ensure model can be loaded/run in Tflite interpreter.; it could not compile the int8 variant: "
              "see docs/firmware/coral.md for what the Edge TPU takes (full-integer ops, static shapes, at most 3 "
              "dimensions larger than 1, the supported ops)"),
    ("abort15", "edgetpu: edgetpu_compiler failed (exit 1): Internal compiler error. Aborting!; it could not compile "
                "the int8 variant: see docs/firmware/coral.md for what the Edge TPU takes (full-integer ops, static "
                "shapes, at most 3 dimensions larger than 1, the supported ops)"),
    ("nofile", "edgetpu: edgetpu_compiler exited 0 but wrote no model_edgetpu.tflite (its last line: FULLY_CONNECTED"
               "                1          Mapped to Edge TPU); reinstall Coral's edgetpu-compiler package "
               "(docs/firmware/coral.md) and compile again"),
    ("damaged", "edgetpu: the model edgetpu's compiler wrote cannot be read (constant tensor 'MatMul' declares "
                "shape 3x4 (int8) but its buffer holds 4 bytes: a damaged or hostile file); the int8 variant is kept: compile again, and report it with the compiler's version if it "
                "happens again"),
])
def test_a_compiler_failure_is_one_line_naming_the_variant_and_what_to_do(tmp_path, run_cli, fake_compiler, mode,
                                                                          reason):
    """0 ops mapped (exit 0, a model written: it was recorded as a built edgetpu variant that runs wholly on the
    CPU), a compiler abort (exit 1; compiler 16's reason said only "Compilation failed!", its last line), exit 0
    without a model ("failed (exit 0)" before) and a written model edge-kit cannot read (a ValueError traceback,
    exit 1, nothing written, before): the edgetpu variant fails
    with one line naming it and what to do, printed under the table; the int8 variant is kept and written, and the
    compile exits 3 (a variant failed), its last line saying which."""
    fake_compiler(mode)
    code, text, folder = compile_coral(tmp_path, run_cli)
    assert code == 3, text
    assert "edgekit: error: 1 variant(s) failed: edgetpu (reasons in the table and the manifest; the built ones were " \
           "written)" in text
    assert "[2] edgetpu failed: " + reason[:60] in text
    manifest = read_manifest(folder)
    art = manifest.artifact("edgetpu")
    assert art.status == "failed" and art.reason == reason, art.reason
    assert "\n" not in art.reason and not (folder / "edgetpu.tflite").exists()
    assert manifest.artifact("int8").status == "built"


def test_an_edgetpu_model_whose_int8_base_is_refused_after_its_build_is_refused_with_it(tmp_path, run_cli,
                                                                                          fake_compiler, monkeypatch):
    """The int8 variant built, then refused by the output check (its outputs NaN or infinite where fp32's are finite,
    or its run on the real inputs crashing): the edgetpu model compiled from it stayed built and was analysed with the
    host's interpreter, which cannot resolve its edgetpu-custom-op: a traceback, exit 1, nothing written. Now the
    edgetpu variant is refused with its base, saying why: it is the same computation."""
    import edge_kit.compiler.pipeline as pipeline

    real = pipeline.broken_outputs

    def int8_broken(outputs, inputs, reference_id="fp32"):
        return {**real(outputs, inputs, reference_id), "int8": "its output 'y' holds NaN or infinity (first at sample 0)"}

    monkeypatch.setattr(pipeline, "broken_outputs", int8_broken)
    fake_compiler("partial")
    code, text, folder = compile_coral(tmp_path, run_cli)
    assert "Traceback" not in text and "unresolved custom op" not in text, text
    manifest = read_manifest(folder)
    assert manifest.artifact("int8").status == "failed"
    art = manifest.artifact("edgetpu")
    assert art.status == "failed" and art.reason.startswith("variant edgetpu: compiled from the int8 variant, which "
                                                            "was refused: "), art.reason
    assert "holds NaN or infinity" in art.reason, art.reason


def test_an_edgetpu_model_loaded_without_the_edge_tpu_delegate_says_which_delegate_it_needs(tmp_path, run_cli,
                                                                                              fake_compiler):
    """``edgekit-agent bench edgetpu.tflite`` (a model file, no store record saying its variant) said only "litert
    cannot load it: Encountered unresolved custom op: edgetpu-custom-op.": nothing of the Edge TPU, of
    ``--delegate edgetpu`` or of what to install. The line now says so."""
    from device_agents.runtimes.litert import LiteRT

    fake_compiler("all")
    code, text, folder = compile_coral(tmp_path, run_cli)
    assert code == 0, text
    with pytest.raises(ValueError) as refused:
        LiteRT().interpreter(folder / "edgetpu.tflite")
    assert str(refused.value) == (
        "edgetpu.tflite: litert cannot load it: Encountered unresolved custom op: edgetpu-custom-op.; it is compiled "
        "for the Coral Edge TPU (USB, M.2, Dev Board) (edgetpu-custom-op), which only the 'edgetpu' delegate runs: "
        "give --delegate edgetpu on a device with it (install Coral's libedgetpu1-std package (docs/firmware/coral.md)), "
        "or use another variant")
