"""ONNX files a user did not make: each is refused by ``edgekit compile`` in one line naming the file and
what to do (exit 2, nothing written), before any conversion, or taken in whole (external data beside it).

The models are built here with the ``onnx`` package: each is the smallest graph with the one property
under test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_kit.compiler.sources import load_source
from edge_kit.errors import InputError


def save(path: Path, nodes: list, inputs: list, outputs: list, initializers: list | None = None,
         opset: int = 13, **kwargs) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, path, **kwargs)
    return path


def vec(name: str, shape: list | None = (1, 4), dtype: int = TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, None if shape is None else list(shape))


def relu(path: Path, shape=(1, 4), **kwargs) -> Path:
    return save(path, [helper.make_node("Relu", ["x"], ["y"])], [vec("x", shape)], [vec("y", shape)], **kwargs)


def add_weight(path: Path, weight: np.ndarray, **kwargs) -> Path:
    w = numpy_helper.from_array(weight, "w")
    n = weight.shape[-1]
    return save(path, [helper.make_node("Add", ["x", "w"], ["y"])], [vec("x", (1, n))], [vec("y", (1, n))], [w],
                **kwargs)


def refused(path: Path, match: str) -> str:
    with pytest.raises(InputError, match=match) as caught:
        load_source(path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message and "Traceback" not in message
    return message


def test_external_data_beside_the_model_is_read_in(tmp_path):
    weight = np.arange(64, dtype=np.float32).reshape(1, 64)
    model = add_weight(tmp_path / "ext.onnx", weight, save_as_external_data=True, location="ext.data",
                       size_threshold=0)
    assert (tmp_path / "ext.data").is_file()
    source = load_source(model)
    assert source.inputs == {"x": (64,)} and source.outputs == ["y"]
    # the bytes carried on are the whole model: no step after this needs the side file
    embedded = onnx.load_from_string(source.onnx)
    assert not any(t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL
                   for t in embedded.graph.initializer)
    np.testing.assert_array_equal(numpy_helper.to_array(embedded.graph.initializer[0]), weight)


def test_a_model_with_external_data_is_named_by_the_sha256sum_of_its_files(tmp_path):
    """The source's sha256 of a model with external data was the hash of the model re-serialised by onnx with its
    data read in: no command a user runs on the files gives it, and another onnx or protobuf version may serialise
    it otherwise. It is now the sha256 of what ``sha256sum MODEL DATA`` prints in the model's folder, the manifest
    lists each file's own sha256, and the conversion deadline counts the data file's bytes (it counted the
    600-byte model file only)."""
    import hashlib
    import subprocess

    folder = tmp_path / "m"
    folder.mkdir()
    weight = np.arange(4096, dtype=np.float32).reshape(1, 4096)
    model = add_weight(folder / "ext.onnx", weight, save_as_external_data=True, location="ext.data",
                       size_threshold=0)
    source = load_source(model)
    listing = subprocess.run(["sha256sum", "ext.onnx", "ext.data"], cwd=folder, capture_output=True, check=True,
                             timeout=60).stdout
    assert source.sha256 == hashlib.sha256(listing).hexdigest()
    files = {line.split()[1].decode(): line.split()[0].decode() for line in listing.splitlines()}
    assert source.record()["files"] == files and source.record()["sha256"] == source.sha256
    assert source.size == (folder / "ext.onnx").stat().st_size + (folder / "ext.data").stat().st_size
    # other weights in the data file: another model, another name
    np.full(4096, 2.0, np.float32).tofile(folder / "ext.data")
    again = load_source(model)
    assert again.sha256 != source.sha256 and again.files["ext.onnx"] == files["ext.onnx"]
    # a model without external data keeps the file's own hash and lists no files
    plain = add_weight(tmp_path / "plain.onnx", weight)
    assert "files" not in load_source(plain).record() and load_source(plain).sha256 == hashlib.sha256(
        plain.read_bytes()).hexdigest()


@pytest.mark.parametrize("location", ["../secret.bin", "../../../../../../etc/passwd", "/etc/passwd", "link.data"])
def test_external_data_outside_the_models_folder_is_refused_and_never_read(tmp_path, location, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    secret = tmp_path / "secret.bin"
    np.full(64, 7.0, np.float32).tofile(secret)
    (folder / "link.data").symlink_to(secret)  # a link beside the model that leads out of its folder
    model = add_weight(folder / "m.onnx", np.zeros((1, 64), np.float32), save_as_external_data=True,
                       location="w.data", size_threshold=0)
    proto = onnx.load(model, load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(proto, model)
    import onnx.external_data_helper as helpers

    from edge_kit.compiler import onnx_source

    def no_read(*args, **kwargs):
        raise AssertionError("external data was read before its location was checked")

    monkeypatch.setattr(helpers, "load_external_data_for_model", no_read)
    monkeypatch.setattr(onnx_source, "_session", no_read)  # ONNX Runtime would open it too
    message = refused(model, "outside the model's folder")
    assert f"tensor 'w' keeps its data in '{location}'" in message and "save it again" in message


def test_missing_or_short_external_data_is_named(tmp_path):
    model = add_weight(tmp_path / "m.onnx", np.zeros((1, 64), np.float32), save_as_external_data=True,
                       location="w.data", size_threshold=0)
    (tmp_path / "w.data").write_bytes(b"\0" * 16)
    refused(model, r"tensor 'w' needs bytes up to 256 of 'w.data', which has 16")
    (tmp_path / "w.data").unlink()
    refused(model, r"'w.data', which is not a file beside the model; copy that file next to m.onnx")


def test_graphs_a_device_cannot_serve_are_refused_by_name(tmp_path):
    w = numpy_helper.from_array(np.ones((1, 4), np.float32), "w")
    save(tmp_path / "const.onnx", [helper.make_node("Identity", ["w"], ["y"])], [], [vec("y")], [w])
    refused(tmp_path / "const.onnx", "the model has no inputs")
    save(tmp_path / "noout.onnx", [helper.make_node("Relu", ["x"], ["y"])], [vec("x")], [])
    refused(tmp_path / "noout.onnx", "declares no outputs")
    save(tmp_path / "through.onnx", [helper.make_node("Relu", ["x"], ["y"])], [vec("x")], [vec("x"), vec("y")])
    refused(tmp_path / "through.onnx", "output 'x' is also an input .*Identity node")
    save(tmp_path / "twice.onnx", [helper.make_node("Relu", ["x"], ["y"])], [vec("x")], [vec("y"), vec("y")])
    refused(tmp_path / "twice.onnx", "output 'y' is listed twice")  # was exit 3, shapes (4, 4) against (8, 4)
    save(tmp_path / "constant.onnx", [helper.make_node("Relu", ["x"], ["y"])], [vec("x")], [vec("y"), vec("w")],
         [numpy_helper.from_array(np.ones((1, 4), np.float32), "w")])
    refused(tmp_path / "constant.onnx", r"output 'w' is a stored constant \(an initializer\)")  # was exit 3 after onnx2tf
    save(tmp_path / "scalar_in.onnx", [helper.make_node("Unsqueeze", ["x", "axes"], ["y"])], [vec("x", ())],
         [vec("y", (1,))], [numpy_helper.from_array(np.array([0], np.int64), "axes")])
    refused(tmp_path / "scalar_in.onnx", r"input 'x' has no dimensions \(a scalar, or no declared shape\)")
    save(tmp_path / "scalar_out.onnx", [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)], [vec("x")],
         [vec("y", ())])
    refused(tmp_path / "scalar_out.onnx", r"output 'y' is a scalar \(0-d\)")


def test_a_nan_weight_is_refused_with_its_initializer(tmp_path):
    weight = np.zeros((1, 4), np.float32)
    weight[0, 2] = np.nan
    refused(add_weight(tmp_path / "nan.onnx", weight), "initializer 'w' holds NaN at flat index 2")
    masked = np.array([[0.0, -np.inf, 0.0, 0.0]], np.float32)  # -inf is how attention masks are stored: kept
    assert load_source(add_weight(tmp_path / "mask.onnx", masked)).inputs == {"x": (4,)}


def test_an_opset_onnx_runtime_lacks_says_which_it_has(tmp_path):
    import onnxruntime

    message = refused(relu(tmp_path / "new.onnx", opset=99), "uses opset 99 of domain ai.onnx")
    assert f"onnxruntime {onnxruntime.__version__} runs up to opset" in message and "export the model with opset" in message
    assert "onnxruntime_src" not in message and "::" not in message


def test_compile_refuses_with_exit_2_one_line_and_writes_nothing(tmp_path, run_cli):
    save(tmp_path / "through.onnx", [helper.make_node("Relu", ["x"], ["y"])], [vec("x")], [vec("x"), vec("y")])
    code, _, err = run_cli("compile", tmp_path / "through.onnx", "-p", "rpi4", "--out", tmp_path / "o")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith(f"edgekit: error: {tmp_path / 'through.onnx'}: output 'x' is also an input")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("suffix", [".engine", ".plan"])
def test_a_tensorrt_engine_is_refused_with_the_reason_and_what_to_give(tmp_path, suffix):
    engine = tmp_path / f"model{suffix}"
    engine.write_bytes(b"ftrt" + bytes(64))  # a serialized plan from some other GPU
    refused(engine, "a TensorRT engine runs only on the GPU and TensorRT version that built it.*give the .onnx model")


def test_an_input_too_large_for_any_sample_is_refused_before_memory_is_taken(tmp_path):
    """[1, 100000, 100000] costs nothing to declare; its first random sample would be 40 GB of float32."""
    message = refused(relu(tmp_path / "huge.onnx", shape=(1, 100_000, 100_000)),
                      r"input 'x' takes 10,000,000,000 values per sample \(shape 1x100000x100000\); edge-kit takes at most")
    assert "--input-shape x=1x..." in message
    assert load_source(relu(tmp_path / "frame.onnx", shape=(1, 3, 2160, 3840))).inputs == {"x": (3, 2160, 3840)}


def test_a_model_that_crashes_onnx_runtime_crashes_a_child_not_the_compiler(tmp_path, monkeypatch):
    """ONNX Runtime is native code: a hostile file that passes onnx's checker may still kill the process
    that loads it. The compiler opens it in a child first (as for a .tflite); here the child's death is
    played by the smoke pool (a real crasher for ONNX Runtime 1.32 is not at hand)."""
    from device_agents import smoke
    from device_agents.errors import SmokeCrashed
    from edge_kit.compiler import onnx_source

    calls = []

    def crash(self, model, *, runtime=None, **kwargs):
        calls.append((Path(model).suffix, runtime))
        raise SmokeCrashed("the interpreter crashed (exit -11)", "crashed (SIGSEGV)")

    def in_process(*args, **kwargs):
        raise AssertionError("ONNX Runtime opened the model in the compiler's own process first")

    monkeypatch.setattr(smoke.SmokePool, "__call__", crash)
    monkeypatch.setattr(onnx_source, "_session", in_process)
    refused(relu(tmp_path / "hostile.onnx"),
            r"not a loadable ONNX model \(ONNX Runtime crashed \(SIGSEGV\) loading it: a damaged or hostile file\)")
    assert calls == [(".onnx", "onnxruntime")]


def test_external_data_adding_up_past_2_gb_is_refused_before_any_is_read(tmp_path, monkeypatch):
    """Three tensors claiming 1 GiB each of one sparse file beside the model: every byte was read into
    memory (any number of times the same file) before the 2 GB limit of one ONNX file refused it."""
    model = add_weight(tmp_path / "big.onnx", np.zeros((1, 64), np.float32), save_as_external_data=True,
                       location="w.data", size_threshold=0)
    with open(tmp_path / "w.data", "r+b") as fh:
        fh.truncate(2**30)  # sparse: costs no disk
    proto = onnx.load(model, load_external_data=False)
    first = proto.graph.initializer[0]
    for i in range(3):
        tensor = proto.graph.initializer.add()
        tensor.CopyFrom(first)
        tensor.name = f"w{i}"
        for entry in tensor.external_data:
            if entry.key == "length":
                entry.value = str(2**30)
    onnx.save(proto, model)
    import onnx.external_data_helper as helpers

    def no_read(*args, **kwargs):
        raise AssertionError("external data was read before its total size was checked")

    monkeypatch.setattr(helpers, "load_external_data_for_model", no_read)
    message = refused(model, "external data add up to 3,221,225,728 bytes")
    assert "edge-kit compiles models below 2 GB" in message


def test_the_child_runs_a_model_with_dynamic_dimensions_at_the_pinned_shape(tmp_path, monkeypatch):
    """The smoke child got the file as exported: a dynamic dimension gave it no shape to run zeros at, so
    it only loaded the model, and the first run at a real shape (the conversion check) was in the
    compiler's own process."""
    from device_agents import smoke

    seen = []
    real = smoke.SmokePool.__call__

    def record(self, model, **kwargs):
        proto = onnx.load(model)
        seen.append([[d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
                     for v in proto.graph.input])
        return real(self, model, **kwargs)

    monkeypatch.setattr(smoke.SmokePool, "__call__", record)
    source = load_source(relu(tmp_path / "dyn.onnx", shape=("N", "C")), {"x": (4,)})
    assert source.inputs == {"x": (4,)} and seen == [[[1, 4]]]


@pytest.mark.parametrize("key", ["edgekit.runtime", "edgekit.trt_calibration_table", "edgekit.variant"])
def test_a_source_carrying_edge_kits_own_artifact_metadata_is_refused(tmp_path, key):
    """Those keys tell a device how to run an artifact (edgekit.runtime=tensorrt sends it to TensorRT, with
    the calibration table they carry). Carried from a source into onnx-fp32 and the other variants, they made
    every device take an onnx-* artifact for a TensorRT one, with a table of the file's choosing."""
    from device_agents.runtimes import is_tensorrt

    model = relu(tmp_path / "tagged.onnx")
    proto = onnx.load(model)
    helper.set_model_props(proto, {key: "tensorrt", "author": "someone"})
    onnx.save(proto, model)
    assert is_tensorrt(model) == (key == "edgekit.runtime")
    message = refused(model, f"metadata '{key}'")
    assert "only edgekit compile writes it" in message
    helper.set_model_props(proto, {"author": "someone", "edgekit_like": "x"})  # anyone else's metadata is fine
    onnx.save(proto, model)
    assert load_source(model).outputs == ["y"]


def test_an_error_without_text_while_pinning_is_a_compile_error_naming_its_type(monkeypatch):
    """`str(exc).splitlines()[0]` of an exception without text raised IndexError out of the handler."""
    from edge_kit.compiler import onnx_variants
    from edge_kit.errors import CompileError

    def fails(data):
        raise ValueError("")

    monkeypatch.setattr(onnx, "load_from_string", fails)
    with pytest.raises(CompileError, match=r"^onnx-fp32: could not pin the input shapes \(ValueError\)$"):
        onnx_variants.pinned(b"x", {"x": (4,)})


@pytest.mark.parametrize("which", ["input", "output"])
def test_a_name_too_long_for_a_devices_messages_is_refused(tmp_path, which):
    """A device names every input and output in its bench records, which a receiver takes up to 64 KiB (the
    broker cuts the connection of a client sending more): a model whose names alone fill that was compiled,
    and every record a device would send about it was lost."""
    long = "n" * 40_000
    names = {"input": (long, "y"), "output": ("x", long)}[which]
    model = save(tmp_path / "long.onnx", [helper.make_node("Relu", [names[0]], [names[1]])], [vec(names[0])],
                 [vec(names[1])])
    message = refused(model, f"{which} 'n{{60}}\\.\\.\\. \\(40,000 characters\\)' has a name longer than 256 characters")
    assert "export the model with a shorter name" in message


@pytest.mark.parametrize("name", ["a\x00b", "x\n2026 INFO forged", "\x1b[31mred"])
def test_a_name_with_a_control_character_is_refused_shown_escaped(tmp_path, name):
    """Names key the data files and eval.npz, whose zip reader cuts a member's name at NUL (the device then
    finds no array for that input), and reach logs and terminals: no model names a tensor so."""
    from edgekit_protocol.labels import printable

    model = save(tmp_path / "ctl.onnx", [helper.make_node("Relu", [name], ["y"])], [vec(name)], [vec("y")])
    message = refused(model, "has a control character in its name")
    assert f"input '{printable(name)}'" in message and "\x1b" not in message and "\x00" not in message


def test_onnxs_checker_and_shape_inference_run_in_a_child_not_the_compiler(tmp_path, monkeypatch):
    """Both are native code reading the hostile file: a crash or a hang there was the compiler's own.
    Here they are made to fail in this process: the source still loads, so neither ran here."""
    import onnx.checker
    import onnx.shape_inference

    def in_process(*args, **kwargs):
        raise AssertionError("ran in the compiler's own process")

    monkeypatch.setattr(onnx.checker, "check_model", in_process)
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", in_process)
    source = load_source(relu(tmp_path / "m.onnx", shape=(None, 4)))
    assert source.inputs == {"x": (4,)} and source.outputs == ["y"]


def test_a_model_that_crashes_onnxs_checker_crashes_a_child_not_the_compiler(tmp_path, monkeypatch):
    """The child's death is played by the pool (a real crasher for onnx 1.23's checker is not at hand)."""
    from device_agents import smoke
    from device_agents.errors import SmokeCrashed

    def crash(self, fn, *args, timeout, what):
        raise SmokeCrashed("the interpreter crashed (exit -11)", "crashed (SIGSEGV)")

    monkeypatch.setattr(smoke.SmokePool, "run", crash)
    refused(relu(tmp_path / "hostile.onnx"),
            r"hostile\.onnx: onnx's checker crashed \(SIGSEGV\) on the model: a damaged or hostile file$")


def test_a_nan_weight_inside_a_loop_body_is_refused_with_its_initializer(tmp_path):
    """A Loop body's own stored weight holding NaN: only the top-level graph's initializers were checked, so the
    model loaded and was refused only after onnx2tf ran, by the conversion check ("output 'y' is NaN or infinity
    on sample 0 ... fix the model"), the weight not named. It is refused at load now, the initializer named, like
    a top-level one."""
    weight = np.zeros((1, 4), np.float32)
    weight[0, 1] = np.nan
    body = helper.make_graph([helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                              helper.make_node("Add", ["v_in", "bias"], ["v_out"])], "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), vec("v_in")],
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), vec("v_out")],
                             [numpy_helper.from_array(weight, "bias")])
    save(tmp_path / "loop_nan.onnx", [helper.make_node("Loop", ["trips", "go", "x"], ["y"], body=body)], [vec("x")],
         [vec("y")], [numpy_helper.from_array(np.array(2, np.int64), "trips"), numpy_helper.from_array(np.array(True), "go")])
    refused(tmp_path / "loop_nan.onnx", "initializer 'bias' holds NaN at flat index 1")
