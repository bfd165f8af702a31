"""ONNX models taking integer inputs (token ids): edge-kit gives such an input float32 and a ``Cast`` to the declared
type first in the graph (``onnx_source.float_inputs``). Here: the subgraphs of ``If``/``Loop``/``Scan``, which read
the outer graph's values by name, read the cast too, and the names the conversion gives the inputs; the source is
named by the user's file's own sha256, not the rewritten model's; ``trt-int8``'s calibration table gives the ids no
int8 range. Models built with ``onnx.helper``, a few nodes each; no TensorRT runs here (no GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edge_kit.compiler.sources import load_source
from edge_kit.fsutil import sha256_file

TABLE = np.arange(80, dtype=np.float32).reshape(10, 8)


def tensor(name: str, dtype: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def save(path: Path, graph: onnx.GraphProto) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def if_model(path: Path) -> Path:
    """Write a model taking int64 ``ids`` [N, 4] and float ``x`` [N, 1]: ``If`` x > 0, its then-branch gathers the
    ids' rows of a stored 10x8 table, its else-branch their negation, both reading ``ids`` (and the table) from the
    outer graph by name; ``y`` [N, 32]. Return it."""
    shape = numpy_helper.from_array(np.array([-1, 32], np.int64), "shape")
    then = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["t_rows"], axis=0),
                              helper.make_node("Reshape", ["t_rows", "shape"], ["t_y"])],
                             "then", [], [tensor("t_y", TensorProto.FLOAT, [None, 32])])
    other = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["e_rows"], axis=0),
                               helper.make_node("Neg", ["e_rows"], ["e_neg"]),
                               helper.make_node("Reshape", ["e_neg", "shape"], ["e_y"])],
                              "else", [], [tensor("e_y", TensorProto.FLOAT, [None, 32])])
    zero = numpy_helper.from_array(np.zeros((1, 1), np.float32), "zero")
    nodes = [helper.make_node("Greater", ["x", "zero"], ["positive"]),
             helper.make_node("Reshape", ["positive", "one"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)]
    graph = helper.make_graph(nodes, "g",
                              [tensor("ids", TensorProto.INT64, [None, 4]), tensor("x", TensorProto.FLOAT, [None, 1])],
                              [tensor("y", TensorProto.FLOAT, [None, 32])],
                              [numpy_helper.from_array(TABLE, "table"), shape, zero,
                               numpy_helper.from_array(np.array([1], np.int64), "one")])
    return save(path, graph)


def run(model: bytes | str, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def test_an_if_branch_reading_an_integer_input_reads_its_cast(tmp_path):
    """The Cast's output replaced the input only in the top-level graph: the branches still read ``ids``, now float32,
    and a model ONNX Runtime runs was refused at load ("ONNX Runtime cannot load the model (... Type (tensor(int64))
    ... does not match expected type (tensor(float)))"). Now both branches read the cast and give the model's own
    answers for float32 ids."""
    path = if_model(tmp_path / "branch.onnx")
    ids = np.array([[3, 0, 9, 1]], np.int64)
    for sign in (1.0, -1.0):
        x = np.array([[sign]], np.float32)
        assert run(str(path), {"ids": ids, "x": x}).reshape(4, 8)[:, 0].tolist() == [sign * v for v in (24, 0, 72, 8)]
    source = load_source(path)
    assert source.input_types == {"ids": "int64"}
    for model in (source.onnx, source.pinned_onnx()):
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        assert {i.name: i.type for i in session.get_inputs()} == {"ids": "tensor(float)", "x": "tensor(float)"}
        for sign in (1.0, -1.0):
            got = session.run(None, {"ids": ids.astype(np.float32), "x": np.array([[sign]], np.float32)})[0]
            assert got.reshape(4, 8)[:, 0].tolist() == [sign * v for v in (24, 0, 72, 8)]


def test_a_subgraph_defining_the_inputs_name_itself_keeps_reading_its_own():
    """A subgraph value of the same name as the outer input hides the input from that subgraph (and its own
    subgraphs): its reads are its own value's, never the cast."""
    from edge_kit.compiler.onnx_source import CAST_SUFFIX, float_inputs

    inner = helper.make_graph([helper.make_node("Identity", ["ids"], ["i_y"])], "inner", [],
                              [tensor("i_y", TensorProto.INT64, [1])])
    seven = numpy_helper.from_array(np.array([7], np.int64))
    own = helper.make_graph([helper.make_node("Constant", [], ["ids"], value=seven),
                             helper.make_node("If", ["c"], ["o_y"], then_branch=inner, else_branch=inner)],
                            "own", [], [tensor("o_y", TensorProto.INT64, [1])])
    outer = helper.make_graph([helper.make_node("Identity", ["ids"], ["r_y"])], "outer", [],
                              [tensor("ids", TensorProto.INT64, [1])])  # gives the outer input back as it is
    graph = helper.make_graph([helper.make_node("If", ["c"], ["a"], then_branch=own, else_branch=outer)], "g",
                              [tensor("ids", TensorProto.INT64, [1]), tensor("c", TensorProto.BOOL, [1])],
                              [tensor("a", TensorProto.INT64, [1])])
    model = float_inputs(helper.make_model(graph), {"ids": "int64"})
    node = model.graph.node[1]
    branches = {a.name: a.g for a in node.attribute}
    then, other = branches["then_branch"], branches["else_branch"]
    assert model.graph.node[0].op_type == "Cast" and model.graph.node[0].output[0] == "ids" + CAST_SUFFIX
    assert then.node[0].output[0] == "ids"  # its own value, and what it and its branches read
    assert [list(a.g.node[0].input) for a in then.node[1].attribute] == [["ids"], ["ids"]]
    assert list(other.node[0].input) == ["ids" + CAST_SUFFIX] and other.output[0].name == "ids" + CAST_SUFFIX


def test_a_model_that_already_has_a_value_named_as_the_cast_keeps_it(tmp_path):
    """The cast of ``ids`` was named ``ids__edgekit_cast`` whatever the model held: a model with a value of that name
    (an output of its own here) had the inserted Cast give it a second producer, an invalid graph."""
    from edge_kit.compiler.onnx_source import CAST_SUFFIX, float_inputs, id_bounds

    taken = "ids" + CAST_SUFFIX
    graph = helper.make_graph([helper.make_node("Identity", ["ids"], [taken]),
                               helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0)], "g",
                              [tensor("ids", TensorProto.INT64, [None, 4])],
                              [tensor("rows", TensorProto.FLOAT, [None, 4, 8]), tensor(taken, TensorProto.INT64, [None, 4])],
                              [numpy_helper.from_array(TABLE, "table")])
    model = float_inputs(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), {"ids": "int64"})
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.node[0].output[0] == taken + "1" and list(model.graph.node[1].input) == [taken + "1"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 3, 9, 2]], np.float32)
    rows, own = session.run(None, {"ids": ids})
    np.testing.assert_array_equal(rows, TABLE[ids.astype(np.int64)])
    np.testing.assert_array_equal(own, ids.astype(np.int64))  # the model's own value, as it was
    assert id_bounds(model.SerializeToString(), {"ids": "int64"})["ids"][0] == 10  # the table, found from the cast


def test_the_conversion_renames_an_input_read_in_a_branch_everywhere(tmp_path):
    """onnx2tf gets the inputs renamed input_0, input_1...: only the top-level graph's nodes were renamed, the branches
    still read ``x`` by its old name, so shape inference and onnxsim failed (silently) and the model given to onnx2tf
    did not load. The branches read the new name; the prepared model gives the model's answers."""
    from edge_kit.compiler.onnx_source import prepared_model

    then = helper.make_graph([helper.make_node("Relu", ["x"], ["t_y"])], "then", [],
                             [tensor("t_y", TensorProto.FLOAT, [1, 4])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e_y"])], "else", [],
                              [tensor("e_y", TensorProto.FLOAT, [1, 4])])
    nodes = [helper.make_node("ReduceSum", ["x"], ["sum"], keepdims=0),
             helper.make_node("Greater", ["sum", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)]
    graph = helper.make_graph(nodes, "g", [tensor("x", TensorProto.FLOAT, [None, 4])],
                              [tensor("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(np.zeros((1,), np.float32), "zero")])
    source = load_source(save(tmp_path / "branch.onnx", graph))
    ready, ins, outs, _shapes = prepared_model(source.onnx, source.inputs)
    assert ins == {"input_0": "x"} and outs == {"output_0": "y"}
    for x, y in (([[1, -2, 3, 4]], [[1, 0, 3, 4]]), ([[1, -2, -3, 0]], [[-1, 2, 3, 0]])):
        assert run(ready, {"input_0": np.array(x, np.float32)}).tolist() == y


def test_the_source_is_named_by_the_users_files_own_sha256(tmp_path):
    """Since integer inputs are cast inside, the source's sha256 (the manifest's model.sha256) was the hash of the
    rewritten model, which no one can check against the file with sha256sum. It is the file's own again."""
    path = embedding_model(tmp_path / "emb.onnx")
    source = load_source(path)
    assert source.input_types == {"ids": "int64"}
    assert source.sha256 == sha256_file(path) == source.record()["sha256"]
    assert source.onnx != path.read_bytes()  # the model compiled is the rewritten one; the name is the file's


def embedding_model(path: Path) -> Path:
    """Write a model taking int64 ``ids`` [N, 4]: Reshape to [N*4] -> Gather rows of a stored 10x8 table -> Relu ->
    ``y`` [N, 32] (Reshape). Return it."""
    nodes = [helper.make_node("Reshape", ["ids", "flat"], ["flat_ids"]),
             helper.make_node("Gather", ["table", "flat_ids"], ["rows"], axis=0),
             helper.make_node("Relu", ["rows"], ["act"]),
             helper.make_node("Reshape", ["act", "shape"], ["y"])]
    graph = helper.make_graph(nodes, "g", [tensor("ids", TensorProto.INT64, [1, 4])],
                              [tensor("y", TensorProto.FLOAT, [1, 32])],
                              [numpy_helper.from_array(TABLE, "table"),
                               numpy_helper.from_array(np.array([-1], np.int64), "flat"),
                               numpy_helper.from_array(np.array([-1, 32], np.int64), "shape")])
    return save(path, graph)


def table_ranges(blob: bytes) -> dict[str, float]:
    """Return {tensor: range} of a calibration table in ONNX Runtime's TensorRT flatbuffers format."""
    from onnxruntime.quantization.CalTableFlatBuffers import TrtTable

    parsed = TrtTable.TrtTable.GetRootAsTrtTable(blob, 0)
    return {parsed.Dict(i).Key().decode(): float(parsed.Dict(i).Value()) for i in range(parsed.DictLength())}


def test_trt_int8s_calibration_table_gives_token_ids_no_range(tmp_path):
    """The table held a range for the float32 ids input (every float tensor is calibrated: 'ids' at 9.0), so
    TensorRT could run the ids and their Cast in int8 (steps of 9/127) and round ids to other ids. The ids, and what
    only casts or reshapes them, have no range in the table written now (TensorRT keeps a tensor without one out of
    int8); the embeddings keep theirs, and the artifact says what was left out. The manifest names the source by the
    file's own sha256. Compiled for real for a Jetson profile (onnx2tf too: about 20 s); TensorRT itself runs on
    the device only (no GPU here)."""
    from edge_kit.compiler import trt_variants
    from edge_kit.compiler.pipeline import CompileRequest, compile_model
    from edge_kit.manifest import read_manifest
    from edge_kit.profiles import load_profile

    path = embedding_model(tmp_path / "emb.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).integers(0, 10, (100, 4)))
    jetson = load_profile("jetson-orin-nano").model_copy(update={"variants": ["onnx-fp32", "trt-int8"]})
    compile_model(CompileRequest(path, [jetson], tmp_path / "out", calib=tmp_path / "calib.npz"))
    manifest = read_manifest(tmp_path / "out" / "emb")
    art = manifest.artifact("trt-int8")
    assert art.status == "built", art.reason
    ranges = table_ranges((tmp_path / "out" / "emb" / art.calibration_table["file"]).read_bytes())
    assert not any(k.startswith("ids") or k == "flat_ids" for k in ranges), ranges
    assert ranges["rows"] == ranges["act"] == ranges["y"] == 79.0  # the table's largest value
    assert art.derived_from.endswith("; token-id input 'ids' and what only casts or reshapes it left out of the "
                                     "table, so TensorRT keeps them out of int8)"), art.derived_from
    assert manifest.model["sha256"] == sha256_file(path)

    fp32 = (tmp_path / "out" / "emb" / "onnx-fp32.onnx").read_bytes()
    assert trt_variants.id_tensors(fp32, ["ids"]) == ["flat_ids", "ids", "ids__edgekit_cast"]
    calib = {"ids": np.arange(64, dtype=np.float32).reshape(16, 4) % 10}
    _artifact, how, files = trt_variants.build("trt-int8", fp32, calib)  # no id inputs named: 'ids' is calibrated
    assert table_ranges(files["trt-int8.calib"])["ids"] == 9.0 and "left out" not in how


def bounded_ids(path: Path) -> tuple[dict[str, np.ndarray], str]:
    """Return the random check inputs ``edgekit compile`` makes for the model at ``path`` without --eval or --calib
    (``random_inputs`` over the bounds ``id_bounds`` finds in the model as loaded), and their sentence."""
    from edge_kit.compiler.data import random_inputs
    from edge_kit.compiler.onnx_source import id_bounds

    source = load_source(path)
    return random_inputs(source.inputs, source.input_types, id_bounds(source.onnx, source.input_types))


def test_random_check_ids_follow_the_models_own_cast_to_the_table(tmp_path):
    """int32 ids cast to int64 by the model itself before the Gather (the Gather takes int32 or int64; exporters
    often cast): the walk from the input's cast stopped at the model's Cast, so the ids were drawn from edge-kit's
    default 0..99 and a 37-row embedding got ids it does not have (ONNX Runtime: "indices element out of data
    bounds"). They are drawn from the table's 37 rows now."""
    table = numpy_helper.from_array(np.ones((37, 2), np.float32), "emb")
    nodes = [helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64),
             helper.make_node("Unsqueeze", ["ids64", "axis"], ["ids3"]),
             helper.make_node("Squeeze", ["ids3", "axis"], ["ids2"]),
             helper.make_node("Gather", ["emb", "ids2"], ["y"], axis=0)]
    graph = helper.make_graph(nodes, "g", [tensor("ids", TensorProto.INT32, [None, 6])],
                              [tensor("y", TensorProto.FLOAT, [None, 6, 2])],
                              [table, numpy_helper.from_array(np.array([0], np.int64), "axis")])
    xs, said = bounded_ids(save(tmp_path / "cast.onnx", graph))
    ids = xs["ids"]
    assert ids.max() <= 36 and len(np.unique(ids)) > 10, ids
    assert "0..36 (the 37 rows of Gather table 'emb')" in said
    source = load_source(tmp_path / "cast.onnx")
    assert run(source.onnx, {"ids": ids[:1]}).shape == (1, 6, 2)  # ids the model takes


def test_random_check_ids_find_a_table_read_inside_an_if_branch(tmp_path):
    """The Gather of the ids sits in an ``If`` branch, which reads the outer ``ids`` by name: only the top-level graph
    was searched, so the 10-row table was missed and ids went up to 99. The branches are searched too."""
    xs, said = bounded_ids(if_model(tmp_path / "branch.onnx"))
    assert xs["ids"].max() <= 9 and "0..9 (the 10 rows of Gather table 'table')" in said

    # a branch reshaping the ids first, into a table of its own (23 rows) the other branch does not index
    own = numpy_helper.from_array(np.ones((23, 8), np.float32), "own")
    then = helper.make_graph([helper.make_node("Flatten", ["ids"], ["flat"], axis=0),
                              helper.make_node("Gather", ["own", "flat"], ["rows"], axis=0),
                              helper.make_node("Reshape", ["rows", "shape"], ["t_y"])],
                             "then", [], [tensor("t_y", TensorProto.FLOAT, [None, 32])], [own])
    other = helper.make_graph([helper.make_node("Identity", ["zeros"], ["e_y"])], "else", [],
                              [tensor("e_y", TensorProto.FLOAT, [None, 32])])
    nodes = [helper.make_node("Greater", ["x", "zero"], ["positive"]),
             helper.make_node("Reshape", ["positive", "one"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)]
    graph = helper.make_graph(nodes, "g", [tensor("ids", TensorProto.INT64, [None, 4]), tensor("x", TensorProto.FLOAT, [None, 1])],
                              [tensor("y", TensorProto.FLOAT, [None, 32])],
                              [numpy_helper.from_array(np.zeros((1, 32), np.float32), "zeros"),
                               numpy_helper.from_array(np.array([-1, 32], np.int64), "shape"),
                               numpy_helper.from_array(np.zeros((1, 1), np.float32), "zero"),
                               numpy_helper.from_array(np.array([1], np.int64), "one")])
    xs, said = bounded_ids(save(tmp_path / "own.onnx", graph))
    assert xs["ids"].max() <= 22 and "0..22 (the 23 rows of Gather table 'own')" in said


def test_random_check_ids_of_an_input_indexing_two_tables_fit_the_smaller(tmp_path):
    """One input feeds two embeddings (token and position tables of 50 and 12 rows, one reached through a Reshape,
    one straight): every id must index both, so the bound is the smaller table's."""
    nodes = [helper.make_node("Gather", ["tokens", "ids"], ["a"], axis=0),
             helper.make_node("Reshape", ["ids", "flat"], ["flat_ids"]),
             helper.make_node("Gather", ["positions", "flat_ids"], ["b"], axis=0),
             helper.make_node("Reshape", ["b", "back"], ["b4"]),
             helper.make_node("Add", ["a", "b4"], ["y"])]
    graph = helper.make_graph(nodes, "g", [tensor("ids", TensorProto.INT64, [None, 4])],
                              [tensor("y", TensorProto.FLOAT, [None, 4, 3])],
                              [numpy_helper.from_array(np.ones((50, 3), np.float32), "tokens"),
                               numpy_helper.from_array(np.ones((12, 3), np.float32), "positions"),
                               numpy_helper.from_array(np.array([-1], np.int64), "flat"),
                               numpy_helper.from_array(np.array([-1, 4, 3], np.int64), "back")])
    xs, said = bounded_ids(save(tmp_path / "two.onnx", graph))
    assert xs["ids"].max() <= 11 and "0..11 (the 12 rows of Gather table 'positions')" in said


def _scan_body():
    """The body of a Scan over ids: a float state passed on, and each step's 4 ids looked up in the table 'emb'."""
    return helper.make_graph(
        [helper.make_node("Identity", ["state"], ["state_out"]),
         helper.make_node("Gather", ["emb", "step_ids"], ["step_rows"], axis=0)],
        "scan_body", [tensor("state", TensorProto.FLOAT, [1]), tensor("step_ids", TensorProto.INT64, [4])],
        [tensor("state_out", TensorProto.FLOAT, [1]), tensor("step_rows", TensorProto.FLOAT, [4, 8])])


def test_random_check_ids_follow_ids_passed_into_a_loop_or_scan_body(tmp_path):
    """The ids enter a ``Loop`` body as its loop-carried value, or a ``Scan`` body as the sequence it scans (after
    a state variable), and the body reads them under its own input's name: only bodies reading the outer name were
    searched, so the 19-row table gathered inside was missed and ids went up to 99 (ONNX Runtime: indices out of
    data bounds). The outer value is followed to the body input it becomes."""
    table = numpy_helper.from_array(np.ones((19, 8), np.float32), "emb")
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Identity", ["carried"], ["carried_out"]),
         helper.make_node("Gather", ["emb", "carried"], ["rows"], axis=0)],
        "body", [tensor("i", TensorProto.INT64, []), tensor("cond_in", TensorProto.BOOL, []),
                 tensor("carried", TensorProto.INT64, [None, 4])],
        [tensor("cond_out", TensorProto.BOOL, []), tensor("carried_out", TensorProto.INT64, [None, 4]),
         tensor("rows", TensorProto.FLOAT, [None, 4, 8])])
    loop = helper.make_graph(
        [helper.make_node("Loop", ["trips", "go", "ids"], ["last", "y"], body=body)], "g",
        [tensor("ids", TensorProto.INT64, [None, 4])], [tensor("y", TensorProto.FLOAT, [3, None, 4, 8])],
        [table, numpy_helper.from_array(np.array(3, np.int64), "trips"), numpy_helper.from_array(np.array(True), "go")])
    xs, said = bounded_ids(save(tmp_path / "loop.onnx", loop))
    assert xs["ids"].max() <= 18 and len(np.unique(xs["ids"])) > 10, xs["ids"]
    assert "0..18 (the 19 rows of Gather table 'emb')" in said
    source = load_source(tmp_path / "loop.onnx")
    assert run(source.onnx, {"ids": xs["ids"][:1]}).shape == (3, 1, 4, 8)  # ids the model takes

    scan_body = _scan_body()
    scan = helper.make_graph(
        [helper.make_node("Scan", ["start", "ids"], ["end", "y"], body=scan_body, num_scan_inputs=1)], "g",
        [tensor("ids", TensorProto.INT64, [None, 4])], [tensor("y", TensorProto.FLOAT, [None, 4, 8])],
        [table, numpy_helper.from_array(np.zeros(1, np.float32), "start")])
    xs, said = bounded_ids(save(tmp_path / "scan.onnx", scan))
    assert xs["ids"].max() <= 18 and "0..18 (the 19 rows of Gather table 'emb')" in said, said
    source = load_source(tmp_path / "scan.onnx")
    assert run(source.onnx, {"ids": xs["ids"][:1]}).shape == (1, 4, 8)


def test_random_check_ids_follow_ids_scanned_by_an_opset_8_scan(tmp_path):
    """Scan of opset 8 takes ``sequence_lens`` (here left out, "") before its state variables: its inputs are its
    body's inputs one position on, so the scanned ids are the body's 'step_ids', not its 'state'."""
    table = numpy_helper.from_array(np.ones((19, 8), np.float32), "emb")
    body = _scan_body()
    graph = helper.make_graph(
        [helper.make_node("Scan", ["", "start", "ids"], ["end", "y"], body=body, num_scan_inputs=1)], "g",
        [tensor("ids", TensorProto.INT64, [1, 3, 4])], [tensor("y", TensorProto.FLOAT, [1, 3, 4, 8])],
        [table, numpy_helper.from_array(np.zeros((1, 1), np.float32), "start")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 7
    onnx.save(model, tmp_path / "scan8.onnx")
    xs, said = bounded_ids(tmp_path / "scan8.onnx")
    assert xs["ids"].max() <= 18 and "0..18 (the 19 rows of Gather table 'emb')" in said, said


def _leaving_models(tmp_path: Path) -> dict[str, Path]:
    """Write three models taking int64 ``ids`` [1, 4] whose ids come back out of a subgraph before the top-level
    Gather of a stored 13-row table: a ``Loop`` carrying them (its final value), a ``Scan`` passing them on as its
    state, and an ``If`` whose then-branch reshapes them and whose else-branch passes them on (Identity). Return
    {kind: path}."""
    table = numpy_helper.from_array(np.ones((13, 8), np.float32), "emb")
    ids = tensor("ids", TensorProto.INT64, [1, 4])
    y = tensor("y", TensorProto.FLOAT, [1, 4, 8])
    loop_body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["carried"], ["kept"])],
        "body", [tensor("i", TensorProto.INT64, []), tensor("cond_in", TensorProto.BOOL, []),
                 tensor("carried", TensorProto.INT64, [1, 4])],
        [tensor("cond_out", TensorProto.BOOL, []), tensor("kept", TensorProto.INT64, [1, 4])])
    loop = helper.make_graph(
        [helper.make_node("Loop", ["trips", "go", "ids"], ["looped"], body=loop_body),
         helper.make_node("Gather", ["emb", "looped"], ["y"], axis=0)], "g", [ids], [y],
        [table, numpy_helper.from_array(np.array(2, np.int64), "trips"), numpy_helper.from_array(np.array(True), "go")])
    scan_body = helper.make_graph(
        [helper.make_node("Identity", ["state"], ["state_out"]), helper.make_node("Identity", ["step"], ["step_out"])],
        "scan_body", [tensor("state", TensorProto.INT64, [1, 4]), tensor("step", TensorProto.FLOAT, [1])],
        [tensor("state_out", TensorProto.INT64, [1, 4]), tensor("step_out", TensorProto.FLOAT, [1])])
    scan = helper.make_graph(
        [helper.make_node("Scan", ["ids", "steps"], ["scanned", "unused"], body=scan_body, num_scan_inputs=1),
         helper.make_node("Gather", ["emb", "scanned"], ["y"], axis=0)], "g", [ids], [y],
        [table, numpy_helper.from_array(np.zeros((3, 1), np.float32), "steps")])
    then = helper.make_graph([helper.make_node("Reshape", ["ids", "shape"], ["t_ids"])], "then", [],
                             [tensor("t_ids", TensorProto.INT64, [1, 4])])
    other = helper.make_graph([helper.make_node("Identity", ["ids"], ["e_ids"])], "else", [],
                              [tensor("e_ids", TensorProto.INT64, [1, 4])])
    branch = helper.make_graph(
        [helper.make_node("ReduceSum", ["ids"], ["total"], keepdims=0),
         helper.make_node("Greater", ["total", "ten"], ["big"]),
         helper.make_node("If", ["big"], ["chosen"], then_branch=then, else_branch=other),
         helper.make_node("Gather", ["emb", "chosen"], ["y"], axis=0)], "g", [ids], [y],
        [table, numpy_helper.from_array(np.array([1, 4], np.int64), "shape"),
         numpy_helper.from_array(np.array(10, np.int64), "ten")])
    return {kind: save(tmp_path / f"{kind}.onnx", graph) for kind, graph in
            (("loop", loop), ("scan", scan), ("if", branch))}


def test_random_check_ids_follow_ids_coming_back_out_of_a_loop_scan_or_if(tmp_path):
    """The ids leave a ``Loop`` (its loop-carried value's final value), a ``Scan`` (its state's) or an ``If`` (a
    branch's output) and a top-level Gather indexes a 13-row table
    with them: the walk went into bodies but never back out, so the table was missed, the check ids went up to 99
    and ONNX Runtime refused them (indices out of data bounds). The body's output is followed to the node's."""
    for kind, path in _leaving_models(tmp_path).items():
        xs, said = bounded_ids(path)
        assert xs["ids"].max() <= 12 and len(np.unique(xs["ids"])) > 8, (kind, xs["ids"])
        assert "0..12 (the 13 rows of Gather table 'emb')" in said, (kind, said)
        source = load_source(path)
        assert run(source.onnx, {"ids": xs["ids"][:1]}).shape == (1, 4, 8), kind  # ids the model takes


def test_trt_int8s_table_gives_no_range_to_ids_coming_back_out_of_a_subgraph(tmp_path):
    """The top-level output of a ``Loop``, ``Scan`` or ``If`` that gives the ids back holds ids too: it had a range
    in trt-int8's calibration table (TensorRT could round those ids to other ids in int8). It is left out now."""
    from edge_kit.compiler import trt_variants
    from edge_kit.compiler.onnx_source import float_inputs

    expected = {"loop": "looped", "scan": "scanned", "if": "chosen"}
    for kind, path in _leaving_models(tmp_path).items():
        model = float_inputs(onnx.load(path), {"ids": "int64"})
        fp32 = model.SerializeToString()
        left_out = trt_variants.id_tensors(fp32, ["ids"])
        assert expected[kind] in left_out and "y" not in left_out, (kind, left_out)
        calib = {"ids": np.arange(32, dtype=np.float32).reshape(8, 4) % 13}
        _artifact, how, files = trt_variants.build("trt-int8", fp32, calib, ids=["ids"])
        ranges = table_ranges(files["trt-int8.calib"])
        assert expected[kind] not in ranges and ranges["y"] == 1.0, (kind, ranges)
