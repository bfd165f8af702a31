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
    ds = load_dataset(p, "eval", (4, 4, 1), labels=True)
    assert ds.x.dtype == np.float32 and len(ds) == 12 and len(ds.sha256) == 64


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="--calib file not found"):
        load_dataset(tmp_path / "nope.npz", "calib", (4,), labels=False)


def test_not_an_npz(tmp_path):
    p = tmp_path / "c.npz"
    p.write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a readable .npz"):
        load_dataset(p, "calib", (4,), labels=False)


def test_shape_mismatch_names_both_shapes(tmp_path):
    p = save(tmp_path / "c.npz", x=np.zeros((200, 8, 8)))
    with pytest.raises(InputError, match=r"samples have shape \(8, 8\) but the model takes \(8, 8, 1\)"):
        load_dataset(p, "calib", (8, 8, 1), labels=False)


def test_no_x_array(tmp_path):
    p = save(tmp_path / "c.npz", images=np.zeros((200, 4)))
    with pytest.raises(InputError, match="no array 'x'.*images"):
        load_dataset(p, "calib", (4,), labels=False)


def test_too_few_calibration_samples_refused_under_10(tmp_path):
    p = save(tmp_path / "c.npz", x=np.zeros((9, 4)))
    with pytest.raises(InputError, match="only 9 calibration samples; need at least 10"):
        load_dataset(p, "calib", (4,), labels=False)


def test_few_calibration_samples_warn_under_100(tmp_path):
    p = save(tmp_path / "c.npz", x=np.zeros((50, 4)))
    with pytest.warns(UserWarning, match="only 50 calibration samples"):
        load_dataset(p, "calib", (4,), labels=False)
    p = save(tmp_path / "d.npz", x=np.zeros((100, 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset(p, "calib", (4,), labels=False)


def test_labels_must_be_one_integer_per_sample(tmp_path):
    p = save(tmp_path / "e.npz", x=np.zeros((10, 4)), y=np.zeros(9, np.int64))
    with pytest.raises(InputError, match="one integer label per sample"):
        load_dataset(p, "eval", (4,), labels=True)
    p = save(tmp_path / "f.npz", x=np.zeros((10, 4)))
    with pytest.raises(InputError, match="no array 'y'"):
        load_dataset(p, "eval", (4,), labels=True)
