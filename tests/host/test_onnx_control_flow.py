"""ONNX models with control flow through ``edgekit compile``: onnx2tf (the ONNX -> LiteRT conversion) converts an
``If`` whose condition is computed from the input, and the variants pass the compiler's fidelity check on inputs
taking both branches; it cannot convert a ``Loop``, and the compile stops in one line naming the file, the node and
its op type and what to do, exit 2, nothing written. Models built here with ``onnx.helper``, a few nodes each; one
real compile each (onnx2tf runs: about 15 s)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from edge_kit.compiler.onnx_source import CONVERSION_WARN_SNR_DB, version
from edge_kit.compiler.pipeline import CompileRequest, compile_model
from edge_kit.manifest import Manifest, read_manifest
from edge_kit.profiles import load_profile


def vec(name: str, shape: list | None = (1, 4)) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None if shape is None else list(shape))


def save(path: Path, nodes: list, initializers: list) -> Path:
    graph = helper.make_graph(nodes, "g", [vec("x")], [vec("y")], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def if_model(path: Path, then_name: str = "", else_name: str = "") -> Path:
    """``y = relu(x) if sum(x) > 0 else -x``, x [1, 4]: the condition comes from the input, so no folding removes
    the ``If``; the branches' nodes named ``then_name`` and ``else_name``."""
    then = helper.make_graph([helper.make_node("Relu", ["x"], ["t_y"], name=then_name)], "then", [], [vec("t_y")])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e_y"], name=else_name)], "else", [], [vec("e_y")])
    nodes = [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
             helper.make_node("Greater", ["total", "zero"], ["positive"]),
             helper.make_node("If", ["positive"], ["y"], then_branch=then, else_branch=other, name="branch")]
    return save(path, nodes, [numpy_helper.from_array(np.zeros((1,), np.float32), "zero")])


def halving_body() -> onnx.GraphProto:
    """A Loop body ``v_out = v_in / 2 + x``: it reads the outer graph's ``x`` by name."""
    return helper.make_graph([helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                              helper.make_node("Mul", ["v_in", "half"], ["halved"]),
                              helper.make_node("Add", ["halved", "x"], ["v_out"])], "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), vec("v_in")],
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), vec("v_out")],
                             [numpy_helper.from_array(np.array(0.5, np.float32), "half")])


def loop_model(path: Path) -> Path:
    """``v = x; 3 times: v = v / 2 + x; y = v``, x [1, 4]: a ``Loop`` with a stored trip count of 3."""
    body = halving_body()
    nodes = [helper.make_node("Loop", ["trips", "go", "x"], ["y"], body=body, name="refine")]
    return save(path, nodes, [numpy_helper.from_array(np.array(3, np.int64), "trips"),
                              numpy_helper.from_array(np.array(True), "go")])


@pytest.fixture(scope="module")
def if_compiled(tmp_path_factory) -> tuple[Path, Manifest]:
    """Return the :func:`if_model` (its then branch's node named 'relu@1:0', a Paddle-style name) and its manifest,
    compiled for fp32 and onnx-fp32 on 16 calibration samples, half positive-sum, half negative-sum (both branches).
    One compile for the two tests below: onnx2tf runs once."""
    folder = tmp_path_factory.mktemp("if")
    x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    x[:8] = np.abs(x[:8])
    x[8:] = -np.abs(x[8:])
    np.savez(folder / "calib.npz", x=x)
    profile = load_profile("rpi4").model_copy(update={"variants": ["fp32", "onnx-fp32"]})
    model = if_model(folder / "branch.onnx", then_name="relu@1:0")
    return model, compile_model(CompileRequest(model, [profile], folder / "out", calib=folder / "calib.npz"))


def test_an_if_on_a_computed_condition_converts_and_passes_the_fidelity_check(if_compiled):
    """Both branches checked: the calibration samples (the conversion check's inputs without --eval) are half
    positive-sum, half negative-sum; the LiteRT fp32 variant and the ONNX Runtime one are built and match ONNX
    Runtime on the source to round-off."""
    model, manifest = if_compiled
    conversion = manifest.model["conversion"]
    assert conversion["samples"] == 16 and conversion["snr_db"] > CONVERSION_WARN_SNR_DB, conversion
    for vid in ("fp32", "onnx-fp32"):
        art = manifest.artifact(vid)
        assert art.status == "built", art.reason
        assert art.fidelity.measured and art.fidelity.samples == 16 and art.fidelity.snr_db > CONVERSION_WARN_SNR_DB
        assert (model.parent / "out" / "branch" / art.file).is_file()


def test_node_names_inside_if_branches_get_the_names_onnx2tf_is_given_at_the_top_level(if_compiled):
    """The model handed to onnx2tf has its node names cleaned (only characters TensorFlow takes in an op name, a name
    for a node without one): at the top level only, so a branch's ``relu@1`` (a Paddle-style name) and unnamed node
    reached onnx2tf as they were. Every graph's nodes are cleaned now; the model still converts and matches ONNX
    Runtime on both branches (the calibration samples take both)."""
    import re

    from edge_kit.compiler.onnx_source import graphs_of, prepared_model
    from edge_kit.compiler.sources import load_source

    model, manifest = if_compiled
    source = load_source(model)
    ready, _ins, _outs, _shapes = prepared_model(source.onnx, source.inputs)
    names = [n.name for g in graphs_of(onnx.load_from_string(ready).graph) for n in g.node]
    assert "relu_1_0" in names and all(re.fullmatch(r"[A-Za-z0-9_./-]+", n) for n in names), names
    assert len(set(names)) == len(names), names  # the unnamed Neg in the else branch is no top-level node's namesake
    conversion = manifest.model["conversion"]
    assert conversion["samples"] == 16 and conversion["snr_db"] > CONVERSION_WARN_SNR_DB, conversion


LOOP_LINE = ("{model}: onnx2tf {version} cannot convert the Loop node 'refine' to TensorFlow Lite, so no LiteRT "
             "variant can be made; export the model with the loop unrolled (a loop of fixed count traced by "
             "torch.onnx.export unrolls; torch.jit.script keeps a Loop, and onnxsim does not unroll one), and compile "
             "again, or compile for ONNX Runtime variants only (a profile whose variants are onnx-*)")


def profile_file(tmp_path: Path, variants: list[str]) -> Path:
    """Write rpi4's profile named ``tiny`` with only ``variants``; return its path."""
    rpi4 = yaml.safe_load((Path(__file__).resolve().parents[2] / "profiles" / "rpi4.yaml").read_text())
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**rpi4, "name": "tiny", "variants": variants}))
    return path


def test_a_loop_onnx2tf_cannot_convert_is_one_line_naming_the_node_and_what_to_do(tmp_path, run_cli):
    """onnx2tf fails on a Loop with a TypeError of tf.function cut mid-sentence, holding a memory address
    ("... <function while_loop.<locals>.wrapped_body at 0x7fc2"), and the line said "simplify or replace that op
    (another opset...)", which no opset does for a Loop. The line now names the Loop node and says to unroll it.
    A profile asking LiteRT variants only gets nothing: exit 2, nothing written."""
    model = loop_model(tmp_path / "loop.onnx")
    code, _out, err = run_cli("compile", model, "-p", profile_file(tmp_path, ["fp32", "fp16"]), "--out", tmp_path / "out")
    assert code == 2 and err.strip() == "edgekit: error: " + LOOP_LINE.format(model=model, version=version("onnx2tf"))
    assert not (tmp_path / "out").exists()


def test_a_loop_onnx2tf_cannot_convert_is_named_as_the_model_names_it(tmp_path, run_cli):
    """onnx2tf is given node names TensorFlow takes ('refine_0_1' for a Paddle-style 'refine@0:1'), and its log
    names that: the line named a node the user's model does not hold. It names the model's own name now, shown on one
    line (a line break in a name is escaped)."""
    # one name of both kinds ('re_fine_0_1' to onnx2tf), so onnx2tf fails once, not once per name
    nodes = [helper.make_node("Loop", ["trips", "go", "x"], ["y"], body=halving_body(), name="re\nfine@0:1")]
    model = save(tmp_path / "loop.onnx", nodes, [numpy_helper.from_array(np.array(3, np.int64), "trips"),
                                                 numpy_helper.from_array(np.array(True), "go")])
    code, _out, err = run_cli("compile", model, "-p", profile_file(tmp_path, ["fp32"]), "--out", tmp_path / "out")
    assert code == 2 and err.strip() == "edgekit: error: " + LOOP_LINE.format(
        model=model, version=version("onnx2tf")).replace("'refine'", "'re\\x0afine@0:1'"), err


def test_nodes_whose_names_clean_alike_convert_and_a_failure_names_the_right_one(tmp_path, run_cli):
    """'a@0' and 'a:0' both cleaned to 'a_0' (ONNX lets nodes share a name): onnx2tf was given two nodes of one name,
    and its log's 'a_0' led back to the first, so a Loop named 'a:0' after a Relu named 'a@0' was said to be the
    Loop node 'a@0'. The second is 'a_0_1' now (no node's own name): a model of such nodes converts, and the line
    names the Loop as the model names it."""
    from edge_kit.compiler.onnx_source import cleaned_names

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="a@0"), helper.make_node("Neg", ["r"], ["y"], name="a:0")]
    model = save(tmp_path / "twins.onnx", nodes, [])
    assert [name for _, name in cleaned_names(onnx.load(model).graph)] == ["a_0", "a_0_1"]
    profile = load_profile("rpi4").model_copy(update={"variants": ["fp32"]})
    conversion = compile_model(CompileRequest(model, [profile], tmp_path / "out")).model["conversion"]
    assert conversion["snr_db"] > CONVERSION_WARN_SNR_DB, conversion

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="a@0"),
             helper.make_node("Loop", ["trips", "go", "r"], ["y"], body=halving_body(), name="a:0")]
    model = save(tmp_path / "loop.onnx", nodes, [numpy_helper.from_array(np.array(3, np.int64), "trips"),
                                                 numpy_helper.from_array(np.array(True), "go")])
    code, _out, err = run_cli("compile", model, "-p", profile_file(tmp_path, ["fp32"]), "--out", tmp_path / "out2")
    assert code == 2 and err.strip() == "edgekit: error: " + LOOP_LINE.format(
        model=model, version=version("onnx2tf")).replace("'refine'", "'a:0'"), err


def test_the_onnx_runtime_variants_of_a_loop_onnx2tf_cannot_convert_are_built(tmp_path, run_cli):
    """The ONNX Runtime variants need no conversion, yet onnx2tf's failure stopped the whole compile, and a profile
    asking onnx-* variants only got nothing either (the LiteRT fp32 variant, every variant's reference, was always
    built first). They are built now, measured against onnx-fp32 in fp32's place; every LiteRT variant is not-built
    with the line as its reason, which is printed as a warning."""
    model = loop_model(tmp_path / "loop.onnx")
    x = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    held_out = np.random.default_rng(1).normal(size=(40, 4)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=held_out, y=np.argmax(held_out, axis=1))
    code, _out, err = run_cli("compile", model, "-p", profile_file(tmp_path, ["fp32", "int8", "onnx-fp32", "onnx-int8"]),
                              "--out", tmp_path / "out", "--calib", tmp_path / "calib.npz", "--eval", tmp_path / "eval.npz")
    line = LOOP_LINE.format(model=model, version=version("onnx2tf"))
    assert code == 0, err
    assert f"edgekit: warning: {line}; only the ONNX Runtime variants are built, measured against onnx-fp32" in err
    manifest = read_manifest(tmp_path / "out" / "loop")
    assert manifest.eval["reference"] == manifest.reference_id == "onnx-fp32"
    assert manifest.model_copy(update={"eval": None}).reference_id == "onnx-fp32"  # without --eval: from the statuses
    assert manifest.reference().accuracy.measured  # tune's and the rollout gate's base for min_accuracy_ratio
    for vid in ("fp32", "int8"):
        assert manifest.artifact(vid).status == "not-built" and manifest.artifact(vid).reason == line
    for vid in ("onnx-fp32", "onnx-int8"):
        art = manifest.artifact(vid)
        assert art.status == "built" and (tmp_path / "out" / "loop" / art.file).is_file(), art.reason
        assert art.fidelity.measured and "against the onnx-fp32 variant's outputs" in art.fidelity.method
        assert art.accuracy.measured and art.accuracy.samples == 40
    assert manifest.artifact("onnx-fp32").fidelity.snr_db > 100  # itself
    assert manifest.artifact("onnx-int8").fidelity.snr_db > 20
    assert "conversion" not in manifest.model


def test_the_progress_bar_of_a_loop_compile_ends_at_its_total(tmp_path, run_cli, monkeypatch):
    """The onnx-fp32 variant added as the reference when onnx2tf cannot convert the Loop has its build and measure
    steps, which the bar's total (planned before the conversion) did not count: the bar ended at 9/7. The compile
    now reports its total with each step, and the bar ends full."""
    from rich.progress import Progress

    from edge_kit.cli import compile as compile_cli

    bars: list[Progress] = []

    def recording_bar(*columns, as_json, transient=True):
        bars.append(Progress(*columns, disable=True))
        return bars[-1]

    monkeypatch.setattr(compile_cli, "progress_bar", recording_bar)
    code, _out, err = run_cli("compile", loop_model(tmp_path / "loop.onnx"), "-p",
                              profile_file(tmp_path, ["fp32", "onnx-fp16"]), "--out", tmp_path / "out")
    assert code == 0, err
    (task,) = bars[0].tasks
    assert task.completed == task.total == 2 * 3 + 3, (task.completed, task.total)  # fp32, onnx-fp16, onnx-fp32


RANDOM_SAID = ("4 random samples (no --eval or --calib given): 'x' 2 uniform in [0, 1), then 1 standard normal and "
               "its negation")


def test_without_data_the_onnx_variants_of_a_loop_onnx2tf_cannot_convert_get_fidelity_on_random_samples(tmp_path):
    """Without --eval or --calib a converted model is checked on random samples (``model.conversion``), but the
    ONNX Runtime variants of a model onnx2tf cannot convert had no figure at all ("not measured: no --eval or
    --calib inputs"). They are measured against onnx-fp32 on the same kind of random samples now, said so."""
    profile = load_profile("rpi4").model_copy(update={"variants": ["onnx-fp32", "onnx-fp16"]})
    manifest = compile_model(CompileRequest(loop_model(tmp_path / "loop.onnx"), [profile], tmp_path / "out"))
    assert manifest.reference_id == "onnx-fp32" and "conversion" not in manifest.model
    for vid, floor in (("onnx-fp32", 100), ("onnx-fp16", 40)):
        fid = manifest.artifact(vid).fidelity
        assert fid.measured and fid.samples == 4 and fid.inputs == RANDOM_SAID, (vid, fid)
        assert fid.snr_db > floor and set(fid.outputs) == {"y"}, (vid, fid)
        assert fid.method.endswith("(CPUExecutionProvider, 1 thread(s)), against the onnx-fp32 variant's outputs")


def test_without_data_random_samples_an_unconverted_model_does_not_take_are_left_out_of_its_fidelity(tmp_path):
    """``y = sqrt(loop(x))`` is NaN where the loop's value is negative: the standard normal sample and its negation
    (both of mixed signs) are left out of the onnx-fp16 fidelity, as of the conversion check, and said so."""
    nodes = [helper.make_node("Loop", ["trips", "go", "x"], ["v"], body=halving_body(), name="refine"),
             helper.make_node("Sqrt", ["v"], ["y"])]
    model = save(tmp_path / "root_loop.onnx", nodes, [numpy_helper.from_array(np.array(3, np.int64), "trips"),
                                                      numpy_helper.from_array(np.array(True), "go")])
    profile = load_profile("rpi4").model_copy(update={"variants": ["onnx-fp16"]})
    fid = compile_model(CompileRequest(model, [profile], tmp_path / "out")).artifact("onnx-fp16").fidelity
    assert fid.measured and fid.samples == 2 and fid.snr_db > 40, fid
    assert fid.inputs == RANDOM_SAID + " (2 left out: the onnx-fp32 variant's outputs are NaN or infinity on them, " \
        "inputs the model does not take)", fid.inputs


def test_without_data_the_conversion_check_samples_take_both_branches_of_an_if(tmp_path):
    """Without --eval or --calib the conversion was checked on 4 samples uniform in [0, 1): an ``If`` taken for a
    negative input sum never ran, so a conversion wrong on that branch would pass the check. The samples the
    compile makes (two uniform, a standard normal one and its negation) now reach both branches: counted through
    ONNX Runtime, whose outputs say which branch ran (x + 1000 or x - 1000)."""
    import onnxruntime as ort

    from edge_kit.compiler.data import random_inputs
    from edge_kit.compiler.onnx_source import id_bounds
    from edge_kit.compiler.sources import load_source

    then = helper.make_graph([helper.make_node("Add", ["x", "thousand"], ["t_y"])], "then", [], [vec("t_y")])
    other = helper.make_graph([helper.make_node("Sub", ["x", "thousand"], ["e_y"])], "else", [], [vec("e_y")])
    nodes = [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
             helper.make_node("Less", ["total", "zero"], ["negative"]),
             helper.make_node("If", ["negative"], ["y"], then_branch=then, else_branch=other, name="branch")]
    model = save(tmp_path / "signs.onnx", nodes, [numpy_helper.from_array(np.zeros((1,), np.float32), "zero"),
                                                  numpy_helper.from_array(np.array(1000, np.float32), "thousand")])
    source = load_source(model)
    xs, said = random_inputs(source.inputs, source.input_types, id_bounds(source.onnx, source.input_types))
    again, _ = random_inputs(source.inputs, source.input_types, id_bounds(source.onnx, source.input_types))
    assert (xs["x"] == again["x"]).all()  # seeded: every compile checks the same samples
    session = ort.InferenceSession(source.pinned_onnx(), providers=["CPUExecutionProvider"])
    ys = np.concatenate([session.run(None, {"x": x[None]})[0] for x in xs["x"]])
    negative, positive = (ys > 500).all(axis=1).sum(), (ys < -500).all(axis=1).sum()
    assert negative >= 1 and positive >= 1 and negative + positive == len(ys), ys
    assert said == RANDOM_SAID


def test_without_data_a_model_taking_positive_inputs_only_is_checked_on_those_it_takes(tmp_path):
    """The standard normal check samples hold negative values, on which a model computing ``sqrt(x)`` gives NaN in
    ONNX Runtime: the compile refused it ("output 'y' is NaN or infinity ... fix the model") where [0, 1) samples
    had passed. Random samples on which ONNX Runtime's own outputs are not finite are left out, and said so."""
    model = save(tmp_path / "root.onnx", [helper.make_node("Sqrt", ["x"], ["y"])], [])
    profile = load_profile("rpi4").model_copy(update={"variants": ["fp32"]})
    manifest = compile_model(CompileRequest(model, [profile], tmp_path / "out"))
    conversion = manifest.model["conversion"]
    assert conversion["samples"] == 2 and conversion["snr_db"] > CONVERSION_WARN_SNR_DB, conversion
    assert conversion["inputs"].endswith("(2 left out: ONNX Runtime's outputs are NaN or infinity on them, inputs the "
                                         "model does not take)"), conversion["inputs"]
    assert manifest.artifact("fp32").status == "built"


def test_without_data_a_model_nan_on_most_check_samples_is_refused_not_checked_on_one(tmp_path):
    """Random samples on which ONNX Runtime's outputs are NaN are left out; a model NaN on three of the four (here
    ``x * sqrt(-sum(x))``: both uniform samples and one of the normal pair) passed the conversion check on the one
    left, with a fidelity figure from a single sample. Over half left out is refused now, saying to give data."""
    from edge_kit.errors import InputError

    nodes = [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=1), helper.make_node("Neg", ["total"], ["neg"]),
             helper.make_node("Sqrt", ["neg"], ["root"]), helper.make_node("Mul", ["x", "root"], ["y"])]
    model = save(tmp_path / "mostly_nan.onnx", nodes, [])
    profile = load_profile("rpi4").model_copy(update={"variants": ["fp32"]})
    with pytest.raises(InputError, match=r"NaN or infinity on 3 of the 4 random samples .* give --eval or --calib"):
        compile_model(CompileRequest(model, [profile], tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing written


def nested_model(path: Path) -> Path:
    """Write ``y`` from x [1, 4] through a ``Loop``, a ``Scan`` and an ``If`` whose bodies read outer-scope values by
    name (the stored weight 'W', 'xw' and 'h' computed outside) and whose results leave them as outputs (the Loop's
    final value and stacked steps, the Scan's final state and stacked outputs, the If's branch output); one MatMul
    by 'W' [4, 4] at the top level and one in each of the three bodies. Return the path."""
    weight = numpy_helper.from_array(np.random.default_rng(3).normal(size=(4, 4)).astype(np.float32) / 2, "W")
    loop_body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["v_in", "W"], ["vw"]), helper.make_node("Add", ["vw", "xw"], ["s"]),
         helper.make_node("Tanh", ["s"], ["v_out"]), helper.make_node("Identity", ["v_out"], ["step"])], "loop_body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), vec("v_in")],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), vec("v_out"), vec("step")])
    scan_body = helper.make_graph(
        [helper.make_node("MatMul", ["st_in", "W"], ["a"]), helper.make_node("Add", ["a", "row"], ["b"]),
         helper.make_node("Mul", ["b", "h"], ["c"]), helper.make_node("Tanh", ["c"], ["st_out"]),
         helper.make_node("Identity", ["st_out"], ["o"])], "scan_body",
        [vec("st_in"), vec("row", (4,))], [vec("st_out"), vec("o")])
    then = helper.make_graph([helper.make_node("MatMul", ["fin", "W"], ["t1"]), helper.make_node("Relu", ["t1"], ["t_y"])],
                             "then", [], [vec("t_y")])
    other = helper.make_graph([helper.make_node("Neg", ["h"], ["e_y"])], "else", [], [vec("e_y")])
    nodes = [helper.make_node("Sigmoid", ["x"], ["h"]), helper.make_node("MatMul", ["x", "W"], ["xw"]),
             helper.make_node("Loop", ["trips", "go", "x"], ["v", "steps"], body=loop_body, name="refine"),
             helper.make_node("Concat", ["x", "x", "x"], ["seq"], axis=0),
             helper.make_node("Scan", ["v", "seq"], ["fin", "outs"], body=scan_body, num_scan_inputs=1, name="scan"),
             helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
             helper.make_node("Greater", ["total", "zero"], ["positive"]),
             helper.make_node("If", ["positive"], ["chosen"], then_branch=then, else_branch=other, name="branch"),
             helper.make_node("ReduceMean", ["steps"], ["m1"], axes=[0], keepdims=0),
             helper.make_node("ReduceMean", ["outs"], ["m2"], axes=[0], keepdims=0),
             helper.make_node("Add", ["chosen", "m1"], ["s1"]), helper.make_node("Add", ["s1", "m2"], ["y"])]
    return save(path, nodes, [weight, numpy_helper.from_array(np.array(3, np.int64), "trips"),
                              numpy_helper.from_array(np.array(True), "go"),
                              numpy_helper.from_array(np.zeros((1,), np.float32), "zero")])


def test_onnx_variants_of_loop_scan_and_if_bodies_reading_outer_values_run_and_count_their_bodies(tmp_path, run_cli):
    """A model whose Loop, Scan and If bodies read outer-scope values and give results back out, compiled for a
    Jetson (ONNX Runtime and TensorRT variants alone: not converted to LiteRT, onnx-fp32 is the reference): every
    variant is built, runs in ONNX Runtime on inputs taking both branches and matches onnx-fp32 within the fidelity
    check. The op histogram and MACs read the top-level graph alone: 1 MatMul and 16 MACs where 4 MatMuls (one in
    each body) run. They count every body now (once, not per iteration), and the methods say so."""
    import onnxruntime as ort

    from edge_kit.compiler.onnx_variants import analyse_onnx

    model = nested_model(tmp_path / "nested.onnx")
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    x[:32] = np.abs(x[:32])
    x[32:] = -np.abs(x[32:])
    np.savez(tmp_path / "calib.npz", x=x)
    jetson = yaml.safe_load((Path(__file__).resolve().parents[2] / "profiles" / "jetson-orin-nano.yaml").read_text())
    profile = tmp_path / "jetson.yaml"
    profile.write_text(yaml.safe_dump({**jetson, "name": "jx",
                                       "variants": ["onnx-fp32", "onnx-fp16", "onnx-int8", "trt-fp16", "trt-int8"]}))
    code, _out, err = run_cli("compile", model, "-p", profile, "--out", tmp_path / "out", "--calib", tmp_path / "calib.npz")
    assert code == 0, err
    manifest = read_manifest(tmp_path / "out" / "nested")
    assert manifest.reference_id == "onnx-fp32"
    reference = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    want = np.concatenate([reference.run(None, {"x": row[None]})[0] for row in x])
    for vid, floor in (("onnx-fp32", 100), ("onnx-fp16", 40), ("onnx-int8", 20)):
        art = manifest.artifact(vid)
        assert art.status == "built", art.reason
        assert art.fidelity.measured and art.fidelity.samples == 64 and art.fidelity.snr_db > floor, (vid, art.fidelity)
        session = ort.InferenceSession(str(tmp_path / "out" / "nested" / art.file), providers=["CPUExecutionProvider"])
        got = np.concatenate([session.run(None, {"x": row[None]})[0] for row in x])
        snr = 10 * np.log10(np.sum(want ** 2) / max(np.sum((got - want) ** 2), 1e-30))
        assert snr > floor, (vid, snr)
    for vid in ("trt-fp16", "trt-int8"):
        assert manifest.artifact(vid).status == "built", manifest.artifact(vid).reason
    from onnxruntime.quantization.CalTableFlatBuffers import TrtTable

    blob = (tmp_path / "out" / "nested" / manifest.artifact("trt-int8").calibration_table["file"]).read_bytes()
    table = TrtTable.TrtTable.GetRootAsTrtTable(blob, 0)
    ranges = {table.Dict(i).Key().decode() for i in range(table.DictLength())}
    assert {"xw", "v", "steps", "fin", "outs", "chosen", "y"} <= ranges, ranges  # top-level tensors, bodies' results
    assert not ranges & {"vw", "s", "v_out", "a", "b", "c", "st_out", "t1", "t_y", "e_y"}, ranges  # none inside bodies
    fp32 = manifest.artifact("onnx-fp32")
    assert fp32.op_histogram["MatMul"] == 4 and fp32.op_histogram["Loop"] == fp32.op_histogram["Scan"] == 1, \
        fp32.op_histogram
    assert fp32.macs == 4 * 16 and fp32.weights == 4 * 16, (fp32.macs, fp32.weights)
    assert "once, not per iteration" in fp32.methods["macs"] and "If/Loop/Scan" in fp32.methods["op_histogram"]
    stats = analyse_onnx((tmp_path / "out" / "nested" / fp32.file).read_bytes())
    assert stats.op_histogram == fp32.op_histogram


def test_onnx_fp16_of_a_loop_whose_body_reads_the_input_by_name_is_built(tmp_path, run_cli):
    """A Loop whose trip count, condition and start value are stored constants and whose body reads the graph's
    input 'x' by name. ONNX Runtime's float16 converter casts 'x' in a node it appends last; edge-kit's reordering
    of the nodes looked at each node's listed inputs only, so the Loop (all its inputs stored) stayed before the
    cast its body reads, and onnx's checker refused the model: onnx-fp16 failed ("Nodes in a graph must be
    topologically sorted, however input 'graph_input_cast_0' of node: ..."). What bodies read by name counts as
    inputs now: built, and it matches onnx-fp32."""
    body = halving_body()
    model = save(tmp_path / "outer.onnx", [helper.make_node("Loop", ["trips", "go", "v0"], ["y"], body=body, name="refine")],
                 [numpy_helper.from_array(np.array(3, np.int64), "trips"), numpy_helper.from_array(np.array(True), "go"),
                  numpy_helper.from_array(np.zeros((1, 4), np.float32), "v0")])
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32))
    code, _out, err = run_cli("compile", model, "-p", profile_file(tmp_path, ["onnx-fp32", "onnx-fp16"]),
                              "--out", tmp_path / "out", "--calib", tmp_path / "calib.npz")
    assert code == 0, err
    art = read_manifest(tmp_path / "out" / "outer").artifact("onnx-fp16")
    assert art.status == "built", art.reason
    assert art.fidelity.measured and art.fidelity.snr_db > 40, art.fidelity


def test_an_op_onnx2tf_lacks_inside_an_if_branch_is_named(tmp_path, run_cli):
    """onnx2tf has no conversion for CastLike; inside an If branch the line named the op type but not the node
    ("has no conversion for op type 'CastLike'; replace that op..."): the node was looked up in the top-level graph
    only. The branches are searched too now, and the node named as the model names it (onnx2tf is given
    'inner_castlike', a name no search of the user's model finds)."""
    then = helper.make_graph([helper.make_node("CastLike", ["x", "zero"], ["t_y"], name="inner@castlike")], "then", [],
                             [vec("t_y")])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e_y"])], "else", [], [vec("e_y")])
    nodes = [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
             helper.make_node("Greater", ["total", "zero"], ["positive"]),
             helper.make_node("If", ["positive"], ["y"], then_branch=then, else_branch=other, name="branch")]
    graph = helper.make_graph(nodes, "g", [vec("x")], [vec("y")],
                              [numpy_helper.from_array(np.zeros((1,), np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])  # CastLike: opset 15
    model.ir_version = 8
    onnx.save(model, tmp_path / "castlike.onnx")
    code, _out, err = run_cli("compile", tmp_path / "castlike.onnx", "-p", profile_file(tmp_path, ["fp32"]),
                              "--out", tmp_path / "out")
    assert code == 2 and err.strip() == (
        f"edgekit: error: {tmp_path / 'castlike.onnx'}: onnx2tf {version('onnx2tf')} has no conversion for op type "
        "'CastLike' (node 'inner@castlike'); replace that op in the exported model (another opset or an equivalent "
        "op) and compile again"), err
    assert not (tmp_path / "out").exists()


def test_an_onnx_model_compiled_for_onnx_runtime_variants_alone_is_not_converted_to_litert(tmp_path, monkeypatch):
    """An ONNX source was always converted by onnx2tf and built as the LiteRT fp32 variant (every variant's
    reference), even for a Jetson profile asking ONNX Runtime and TensorRT variants alone: minutes of onnx2tf on a
    large model, and a compile that failed on a conversion nothing would use. Without a LiteRT variant asked for,
    onnx2tf never runs now and onnx-fp32 is the reference, as when onnx2tf cannot convert the model."""
    from edge_kit.compiler import onnx_source

    def never(*_a, **_k):
        raise AssertionError("onnx2tf ran")

    monkeypatch.setattr(onnx_source, "convert", never)
    model = save(tmp_path / "relu.onnx", [helper.make_node("Relu", ["x"], ["y"])], [])
    steps = []
    profile = load_profile("rpi4").model_copy(update={"variants": ["onnx-fp32", "onnx-fp16"]})
    manifest = compile_model(CompileRequest(model, [profile], tmp_path / "out"), progress=lambda s, n: steps.append(n))
    assert manifest.reference_id == "onnx-fp32" and manifest.artifact("fp32") is None and "conversion" not in manifest.model
    assert [a.id for a in manifest.artifacts if a.status == "built"] == ["onnx-fp32", "onnx-fp16"]
    assert manifest.artifact("onnx-fp16").fidelity.measured and manifest.artifact("onnx-fp16").fidelity.snr_db > 40
    assert read_manifest(tmp_path / "out" / "relu").model_copy(update={"eval": None}).reference_id == "onnx-fp32"
    assert set(steps) == {len(steps)}  # the planned total is what it took: no conversion step counted
