import warnings

import numpy as np
import pytest

from edge_kit.compiler.data import load_dataset
from edge_kit.errors import InputError


def save(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_loads_x_and_y_as_float_and_int(tmp_path):
    p = save(tmp_path / "e.npz", x=np.zeros((12, 4, 4, 1), np.uint8), y=np.arange(12))
    ds = load_dataset(p, "eval", {"x": (4, 4, 1)}, labels=True)
    assert ds.x["x"].dtype == np.float32 and len(ds) == 12 and len(ds.sha256) == 64 and ds.labels["y"].dtype.kind == "i"


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="--calib file not found"):
        load_dataset(tmp_path / "nope.npz", "calib", {"x": (4,)}, labels=False)


def test_not_an_npz(tmp_path):
    p = tmp_path / "c.npz"
    p.write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a readable .npz"):
        load_dataset(p, "calib", {"x": (4,)}, labels=False)


def test_shape_mismatch_names_both_shapes(tmp_path):
    p = save(tmp_path / "c.npz", x=np.zeros((200, 8, 8)))
    with pytest.raises(InputError, match=r"key 'x' samples have shape \(8, 8\) but input 'x' takes \(8, 8, 1\)"):
        load_dataset(p, "calib", {"x": (8, 8, 1)}, labels=False)


def test_no_x_array(tmp_path):
    p = save(tmp_path / "c.npz", images=np.zeros((200, 4)))
    with pytest.raises(InputError, match="no array 'x' for input 'x'.*found: images"):
        load_dataset(p, "calib", {"x": (4,)}, labels=False)


def test_too_few_calibration_samples_refused_under_10(tmp_path):
    p = save(tmp_path / "c.npz", x=np.zeros((9, 4)))
    with pytest.raises(InputError, match="only 9 calibration samples; need at least 10"):
        load_dataset(p, "calib", {"x": (4,)}, labels=False)


def test_few_calibration_samples_warn_under_100(tmp_path):
    p = save(tmp_path / "c.npz", x=np.zeros((50, 4)))
    with pytest.warns(UserWarning, match="only 50 calibration samples"):
        load_dataset(p, "calib", {"x": (4,)}, labels=False)
    p = save(tmp_path / "d.npz", x=np.zeros((100, 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset(p, "calib", {"x": (4,)}, labels=False)


def test_labels_need_one_row_per_sample(tmp_path):
    p = save(tmp_path / "e.npz", x=np.zeros((10, 4)), y=np.zeros(9, np.int64))
    with pytest.raises(InputError, match="key 'y' has 9 samples, the inputs 10"):
        load_dataset(p, "eval", {"x": (4,)}, labels=True)
    p = save(tmp_path / "f.npz", x=np.zeros((10, 4)))
    with pytest.raises(InputError, match="has no labels"):
        load_dataset(p, "eval", {"x": (4,)}, labels=True)


def test_calibration_that_looks_like_noise_is_named(tmp_path):
    from edge_kit.compiler.data import noise_warning

    rng = np.random.default_rng(0)
    noise = save(tmp_path / "noise.npz", x=rng.uniform(-1, 1, (120, 32, 32, 3)))
    warning = noise_warning(load_dataset(noise, "calib", {"img": (32, 32, 3)}, labels=False))
    assert warning and "input 'img' looks like noise" in warning
    smooth = np.cumsum(rng.normal(size=(120, 32, 32, 3)), axis=2)  # neighbouring pixels correlate, as in photos
    real = save(tmp_path / "real.npz", x=smooth)
    assert noise_warning(load_dataset(real, "calib", {"img": (32, 32, 3)}, labels=False)) is None


def test_channels_first_calibration_that_looks_like_noise_is_named_too(tmp_path):
    """[N, 3, H, W] inputs (PyTorch models through ONNX) were never checked: their 'height' was the 3 channels."""
    from edge_kit.compiler.data import noise_warning

    rng = np.random.default_rng(0)
    noise = save(tmp_path / "noise.npz", x=rng.uniform(-1, 1, (120, 3, 32, 32)))
    warning = noise_warning(load_dataset(noise, "calib", {"img": (3, 32, 32)}, labels=False))
    assert warning and "input 'img' looks like noise" in warning
    real = save(tmp_path / "real.npz", x=np.cumsum(rng.normal(size=(120, 3, 32, 32)), axis=3))
    assert noise_warning(load_dataset(real, "calib", {"img": (3, 32, 32)}, labels=False)) is None


@pytest.mark.parametrize("role", ["eval", "train", "calib"])
def test_a_file_with_no_samples_is_refused_not_taken_for_no_file(tmp_path, role):
    """Once an empty --eval or --train compiled with exit 0 as if the option was not given (an empty Dataset is falsy)."""
    p = save(tmp_path / "e.npz", x=np.zeros((0, 8, 8, 1), np.float32), y=np.zeros(0, np.int64))
    with pytest.raises(InputError, match=f"e.npz: --{role} has no samples"):
        load_dataset(p, role, {"x": (8, 8, 1)}, labels=role != "calib")


def test_calibration_or_training_samples_found_in_eval_are_counted_and_warned(tmp_path):
    """Calibrating (or fine-tuning) on the eval samples flattered int8 accuracy without a word."""
    from edge_kit.compiler.data import leak_warning, shared_samples

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(120, 4, 4, 1)).astype(np.float32)
    ev = load_dataset(save(tmp_path / "e.npz", x=x[:40], y=np.zeros(40, np.int64)), "eval", {"x": (4, 4, 1)}, labels=True)
    calib = load_dataset(save(tmp_path / "c.npz", x=x[25:]), "calib", {"x": (4, 4, 1)}, labels=False)
    assert shared_samples(calib, ev) == 15
    said = leak_warning(calib, "calib", ev, 15)
    assert said.startswith(f"{tmp_path / 'c.npz'}: 15 of the 95 --calib samples are also in --eval e.npz")
    assert "flatter the int8 accuracy" in said and "held out from --eval" in said
    held_out = load_dataset(save(tmp_path / "h.npz", x=x[40:]), "calib", {"x": (4, 4, 1)}, labels=False)
    assert shared_samples(held_out, ev) == 0 and leak_warning(held_out, "calib", ev, 0) is None


def test_eval_inputs_outside_the_calibrated_range_are_warned(tmp_path):
    """Eval images in 0..255 against a model calibrated on 0..1: int8 clips them, and nothing said so."""
    from edge_kit.compiler.data import range_warning

    rng = np.random.default_rng(0)
    shape = {"x": (4, 4, 1)}
    calib = load_dataset(save(tmp_path / "c.npz", x=rng.uniform(size=(120, 4, 4, 1))), "calib", shape, labels=False)
    same = load_dataset(save(tmp_path / "e.npz", x=rng.uniform(size=(30, 4, 4, 1)), y=np.zeros(30, np.int64)),
                        "eval", shape, labels=True)
    assert range_warning(calib, same) is None
    scaled = load_dataset(save(tmp_path / "s.npz", x=255 * rng.uniform(size=(30, 4, 4, 1)), y=np.zeros(30, np.int64)),
                          "eval", shape, labels=True)
    said = range_warning(calib, scaled)
    assert said.startswith(f"{tmp_path / 's.npz'}: 99.") and "of --eval input 'x' lies outside the range of --calib c.npz" in said
    assert "preprocess both files the same way" in said


def test_an_input_beyond_float32s_range_is_refused_not_turned_into_infinity(tmp_path):
    """A float64 1e39 passed the NaN/infinity check and became inf in float32, which the converter crashed on."""
    x = np.random.default_rng(0).uniform(size=(12, 4))
    x[3, 2] = -1e39
    with pytest.raises(InputError, match=r"d.npz: --calib key 'x' holds -1e\+39 at index \[3, 2\], beyond float32's range"):
        load_dataset(save(tmp_path / "d.npz", x=x), "calib", {"x": (4,)}, labels=False)


def test_random_check_inputs_of_an_integer_input_are_ids_not_all_zero():
    """Without --eval or --calib a conversion was checked on uniform [0, 1) samples, which an integer input (token
    ids, class ids, uint8 pixels) casts to all 0: a model that is wrong on any other id passed. Each input is now
    sampled over what its type takes, and the manifest's sentence says which range and why."""
    from edge_kit.compiler.data import DEFAULT_ID_COUNT, RANDOM_SAMPLES, random_inputs

    xs, said = random_inputs({"ids": (16,), "classes": (16,), "pixels": (8, 8), "mask": (16,), "x": (4,)},
                             {"ids": "int64", "classes": "int32", "pixels": "uint8", "mask": "bool"},
                             {"ids": (10, "the 10 rows of Gather table 'emb'")})
    for name, high in (("ids", 9), ("classes", DEFAULT_ID_COUNT - 1), ("pixels", 255), ("mask", 1)):
        x = xs[name]
        assert x.dtype == np.float32 and len(x) == RANDOM_SAMPLES and (x == np.round(x)).all(), name
        assert x.min() >= 0 and x.max() <= high and x.any() and len(np.unique(x)) > 1, name
    assert xs["pixels"].max() > 1 and 0 <= xs["x"][:2].min() and xs["x"][:2].max() < 1  # a float input: [0, 1) first
    assert (xs["x"][3] == -xs["x"][2]).all() and xs["x"][2].any()  # then a standard normal sample and its negation
    assert said == (f"{RANDOM_SAMPLES} random samples (no --eval or --calib given): 'ids' whole numbers uniform in 0..9 "
                    "(the 10 rows of Gather table 'emb'); 'classes' whole numbers uniform in 0..99 (no table size read "
                    "from the model: edge-kit's default for int32 ids; give --eval with real ones); 'pixels' whole "
                    "numbers uniform in 0..255 (the range of uint8); 'mask' whole numbers uniform in 0..1 (the range of bool); 'x' 2 uniform in [0, 1), then 1 "
                    "standard normal and its negation")


@pytest.mark.parametrize("types", [{}, {"x": "int32"}])
def test_random_check_inputs_take_little_more_memory_than_themselves(types):
    """The random samples were drawn whole in float64 (int64), stacked, concatenated and cast: over 4 times their own
    size at the peak for a float input (3 for ids), 9 GiB for one input at MAX_SAMPLE_VALUES, which every compile
    without data draws now. Drawn a sample at a time into float32: at most twice their size."""
    import tracemalloc

    from edge_kit.compiler.data import random_inputs

    tracemalloc.start()
    try:
        xs, _said = random_inputs({"x": (3, 128, 128)}, types)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 2 * xs["x"].nbytes, peak / xs["x"].nbytes


def test_ids_an_integer_input_cannot_take_from_float32_are_refused_with_file_key_and_index(tmp_path):
    p = save(tmp_path / "c.npz", x=np.array([[1, 2], [3, 300]] * 6, np.float64))
    assert load_dataset(p, "calib", {"x": (2,)}, labels=False, types={"x": "int16"}).x["x"].max() == 300
    with pytest.raises(InputError, match=r"c.npz: --calib key 'x' holds 300 at index \[1, 1\], but input 'x' is uint8 "
                                         r"\(ids, sent as float32 and cast inside the model\): give whole numbers in 0..255"):
        load_dataset(p, "calib", {"x": (2,)}, labels=False, types={"x": "uint8"})


def id_model(chain: list[str], rows: int = 300):
    """Return an ONNX model (bytes, as ``float_inputs`` makes it: float32 ``ids`` cast to int64 first) whose ids
    [N, 2, 3] pass through the ops ``chain`` (each of Reshape, Unsqueeze, Squeeze, Flatten, Identity, Add) before
    indexing a stored ``rows`` x 4 table with a Gather, and the numpy reference of its output."""
    from onnx import TensorProto, helper, numpy_helper

    from edge_kit.compiler.onnx_source import float_inputs

    inits = [numpy_helper.from_array(np.zeros((rows, 4), np.float32), "table"),
             numpy_helper.from_array(np.array([1, 6], np.int64), "flat"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0"),
             numpy_helper.from_array(np.array(1, np.int64), "one")]
    nodes, at = [], "ids"
    for i, op in enumerate(chain):
        extra = {"Reshape": ["flat"], "Unsqueeze": ["axis0"], "Squeeze": ["axis0"], "Add": ["one"]}.get(op, [])
        nodes.append(helper.make_node(op, [at, *extra], [f"t{i}"]))
        at = f"t{i}"
    nodes.append(helper.make_node("Gather", ["table", at], ["y"], axis=0))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return float_inputs(model, {"ids": "int64"}).SerializeToString()


def test_random_check_ids_follow_shape_only_ops_to_the_embedding_table():
    """The table lookup found a Gather only when fed straight by the input's cast: ids flattened first
    (``ids.view(-1)`` in PyTorch: a Reshape, or Unsqueeze, Squeeze, Flatten, Identity) fell back to 0..99, so a
    300-row embedding was checked on its first 100 rows only. Shape-only ops are now followed back (an op that changes
    the ids, an Add, is not)."""
    from edge_kit.compiler.onnx_source import id_bounds

    found = (300, "the 300 rows of Gather table 'table'")
    assert id_bounds(id_model([]), {"ids": "int64"}) == {"ids": found}
    for chain in (["Reshape"], ["Unsqueeze", "Squeeze", "Flatten"], ["Identity", "Reshape", "Identity"]):
        assert id_bounds(id_model(chain), {"ids": "int64"}) == {"ids": found}, chain
    assert id_bounds(id_model(["Reshape", "Add"]), {"ids": "int64"}) == {}  # ids + 1: not the rows' range any more
    assert id_bounds(id_model(["Add", "Reshape"]), {"ids": "int64"}) == {}
    assert id_bounds(id_model(["Identity"] * 40), {"ids": "int64"}) == {}  # beyond the bounded walk: left at the default


def test_eval_ids_beyond_the_calibration_ids_are_not_warned_as_clipped(tmp_path):
    """Eval ids 0..299 against calibration ids 0..149 warned that "int8 variants clip it to the calibrated range",
    which no variant does: every one takes an integer input's ids unquantized. A float input still warns."""
    from edge_kit.compiler.data import range_warning

    rng = np.random.default_rng(0)
    calib = save(tmp_path / "c.npz", x=rng.integers(0, 150, (120, 8)))
    evalset = save(tmp_path / "e.npz", x=rng.integers(0, 300, (30, 8)), y=np.zeros(30, np.int64))
    types = {"x": "int64"}
    ids = [load_dataset(calib, "calib", {"x": (8,)}, labels=False, types=types),
           load_dataset(evalset, "eval", {"x": (8,)}, labels=True, types=types)]
    assert range_warning(*ids, types) is None
    assert "of --eval input 'x' lies outside the range of --calib c.npz" in range_warning(*ids, {})  # float: clipped
