"""The stdlib .npz reader: what numpy writes reads back exactly; what would crash native code is refused."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgekit_protocol.datafile import (
    first_nonfinite,
    read_arrays,
    read_data,
    read_reference,
)
from edgekit_protocol.errors import DataFileError, InputError


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "uint8", "int8", "int32", "int64", "bool"])
def test_arrays_numpy_writes_read_back_exactly(tmp_path, save, dtype):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(5, 3, 2)) * 50).astype(dtype)
    path = tmp_path / "d.npz"
    save(path, x=x, y=np.arange(5))
    arrays = read_arrays(path, "--calib")
    assert list(arrays) == ["x", "y"]
    back = np.asarray(arrays["x"])
    assert back.dtype == x.dtype and back.shape == x.shape and np.array_equal(back, x)


def test_read_data_checks_shapes_and_labels(tmp_path):
    path = tmp_path / "eval.npz"
    np.savez(path, x=np.zeros((4, 8, 8, 1), np.float32), y=np.arange(4).reshape(4, 1), reference=np.ones((4, 10)))
    data = read_data(path, "--eval", {"image": (8, 8, 1)}, labels="required")
    assert np.asarray(data.x["image"]).shape == (4, 8, 8, 1) and np.asarray(data.labels["y"]).ravel().tolist() == [0, 1, 2, 3]
    assert np.asarray(read_reference(path, 4, ["probs"])["probs"]).shape == (4, 10)
    with pytest.raises(DataFileError, match=r"eval.npz: --eval key 'x' samples have shape \(8, 8, 1\) but input 'image' takes \(28, 28, 1\)"):
        read_data(path, "--eval", {"image": (28, 28, 1)}, labels="required")
    with pytest.raises(DataFileError, match="reference has 4 rows for 5 samples"):
        read_reference(path, 5, ["probs"])
    np.savez(path, x=np.zeros((4, 2), np.float32))
    with pytest.raises(DataFileError, match=r"has no labels \(y or y.<key>; found: x\)"):
        read_data(path, "--eval", {"v": (2,)}, labels="required")
    assert issubclass(DataFileError, InputError) and DataFileError.exit_code == 2


def test_several_inputs_are_keyed_by_name_and_must_agree_on_samples(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, **{"x.image": np.zeros((3, 4, 4, 3)), "x.meta": np.zeros((3, 2)), "y.boxes": np.zeros((3, 1, 4))})
    data = read_data(path, "--calib", {"image": (4, 4, 3), "meta": (2,)}, labels="optional")
    assert set(data.x) == {"image", "meta"} and set(data.labels) == {"boxes"} and data.samples == 3
    with pytest.raises(DataFileError, match=r"no array 'x.extra' for input 'extra' \(expected: x.image, x.extra; found: x.image, x.meta, y.boxes\)"):
        read_data(path, "--calib", {"image": (4, 4, 3), "extra": (2,)}, labels="ignored")
    np.savez(path, **{"x.image": np.zeros((3, 4, 4, 3)), "x.meta": np.zeros((2, 2))})
    with pytest.raises(DataFileError, match="key 'x.meta' has 2 samples, the inputs 3"):
        read_data(path, "--calib", {"image": (4, 4, 3), "meta": (2,)}, labels="ignored")
    np.savez(path, **{"x.image": np.zeros((3, 4, 4, 3)), "reference.a": np.zeros((3, 2))})
    with pytest.raises(DataFileError, match=r"no reference for output 'b' \(reference.b\)"):
        read_reference(path, 3, ["a", "b"])



@pytest.mark.parametrize("inputs, how", [({"image": (4,)}, "numpy.savez(path, x=...)"),
                                         ({"image": (4,), "meta": (4,)}, "numpy.savez(path, **{'x.image': ..., "
                                                                         "'x.meta': ...})")])
def test_an_array_saved_without_a_name_is_told_how_to_save_it_under_its_key(tmp_path, inputs, how):
    """numpy.savez(path, x) saves x as arr_0: the line said 'found: arr_0; save one array per model input', nothing
    on the key to give it or how."""
    path = tmp_path / "calib.npz"
    np.savez(path, np.zeros((3, 4), np.float32))
    with pytest.raises(DataFileError) as exc:
        read_data(path, "--calib", inputs, labels="ignored")
    assert str(exc.value).endswith(f"found: arr_0); save one array per model input under its key: {how} (an array "
                                   "given without a name is saved as arr_0)")

@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_infinity_are_refused_with_the_key_and_first_bad_index(tmp_path, dtype, bad):
    x = np.ones((6, 4, 3), dtype)
    x[2, 1, 0] = bad
    x[5, 3, 2] = bad
    path = tmp_path / "calib.npz"
    np.savez(path, x=x)
    with pytest.raises(DataFileError, match=r"calib.npz: --calib key 'x' holds NaN or infinity at index \[2, 1, 0\]"):
        read_arrays(path, "--calib")


def test_the_largest_finite_values_are_not_mistaken_for_infinity():
    from edgekit_protocol.datafile import Array

    for dtype in ("float16", "float32", "float64"):
        info = np.finfo(dtype)
        a = np.array([info.max, -info.max, info.tiny, 0.0, -0.0], dtype)
        assert first_nonfinite(Array("x", a.dtype.str, a.shape, a.tobytes())) is None


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


@pytest.mark.parametrize("data, message", [
    (lambda: _zip({"x.npy": _npy(np.array([{"a": 1}], dtype=object))}), "holds Python object values \\('\\|O'\\)"),
    (lambda: _zip({"x.npy": _npy(np.ones(3, ">f4"))}), "holds big-endian float32 values \\('>f4'\\)"),
    (lambda: _zip({"x.npy": _npy(np.ones(3, "<c8"))}), r"holds complex64 values \('<c8'\); give little-endian numbers"),
    (lambda: _zip({"x.npy": _npy(np.array(["a", "b"]))}), r"holds text \(unicode string\) values \('<U1'\)"),
    (lambda: _zip({"x.npy": _npy(np.asfortranarray(np.ones((3, 2), "f4")))}), "Fortran order"),
    (lambda: _zip({"x.npy": _npy(np.ones(8, "f4"))[:-5]}), "truncated or padded"),
    (lambda: _zip({"x.npy": b"not an array"}), "is not a numpy array"),
    (lambda: _zip({"x.npy": b"\x93NUMPY\x02\x00\x10\x00"}), "is not a numpy array"),  # v2 header cut short
    (lambda: _zip({"x.npy": b"\x93NUMPY\x01\x00\xff\x00{'descr'"}), "truncated inside its array header"),
    (lambda: b"PK\x03\x04 cut short", "is not a readable .npz file"),
])
def test_what_native_code_would_trip_over_is_refused_in_one_line(tmp_path, data, message):
    path = tmp_path / "bad.npz"
    path.write_bytes(data())
    with pytest.raises(DataFileError, match=message) as info:
        read_arrays(path, "--calib")
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_arrays_bigger_than_half_the_memory_once_decompressed_are_refused_before_reading(tmp_path, monkeypatch):
    """A zip bomb: 64 MB of zeros in a file of about 64 kB; refused by the sizes the zip declares
    (zipfile never decompresses past them: a member that lies about its size fails its CRC)."""
    from edgekit_protocol import datafile

    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, x=np.zeros((16, 1024, 1024), "f4"))
    assert path.stat().st_size < 1_000_000
    monkeypatch.setattr(datafile, "memory_available", lambda: 100_000_000)  # this machine's figure, made small
    with pytest.raises(DataFileError, match=r"bomb.npz: --calib holds 67 MB of arrays once decompressed, more than "
                                            r"half of the 100 MB of memory available here; give fewer samples"):
        read_arrays(path, "--calib")
    monkeypatch.setattr(datafile, "memory_available", lambda: 200_000_000)
    assert read_arrays(path, "--calib")["x"].shape == (16, 1024, 1024)
    monkeypatch.undo()
    assert datafile.memory_available() > 100_000_000  # the real probe: /proc/meminfo on this Linux machine


def test_a_folder_or_a_pipe_is_named_as_such_not_as_missing(tmp_path):
    import os

    (tmp_path / "dir.npz").mkdir()
    os.mkfifo(tmp_path / "fifo.npz")
    for name in ("dir.npz", "fifo.npz"):
        with pytest.raises(DataFileError, match=f"{name}: --calib is not a regular file"):
            read_arrays(tmp_path / name, "--calib")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=0, max_value=300))
def test_any_bytes_are_read_or_refused_never_crash(tmp_path_factory, noise, cut):
    """Fuzz: random and truncated files give arrays or a DataFileError, nothing else."""
    good = _zip({"x.npy": _npy(np.arange(12, dtype="f4").reshape(3, 4))})
    for data in (noise, good[:cut] + noise, _zip({"x.npy": _npy(np.ones(2, "f4"))[:cut] + noise})):
        path = tmp_path_factory.mktemp("fuzz") / "f.npz"
        path.write_bytes(data)
        try:
            read_arrays(path, "--calib")
        except DataFileError:
            pass
