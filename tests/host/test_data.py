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


@pytest.mark.parametrize("role", ["eval", "train", "calib"])
def test_a_file_with_no_samples_is_refused_not_taken_for_no_file(tmp_path, role):
    """Once an empty --eval or --train compiled with exit 0 as if the option was not given (an empty Dataset is falsy)."""
    p = save(tmp_path / "e.npz", x=np.zeros((0, 8, 8, 1), np.float32), y=np.zeros(0, np.int64))
    with pytest.raises(InputError, match=f"e.npz: --{role} has no samples"):
        load_dataset(p, role, {"x": (8, 8, 1)}, labels=role != "calib")
