import pytest

from edge_kit.fsutil import atomic_write_bytes, sha256_bytes, sha256_file


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "a.bin"
    atomic_write_bytes(p, b"old")
    atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"new"
    assert sha256_file(p) == sha256_bytes(b"new")
    assert [f.name for f in tmp_path.iterdir()] == ["a.bin"]


def test_failed_write_leaves_old_file_and_no_part(tmp_path, monkeypatch):
    p = tmp_path / "a.bin"
    atomic_write_bytes(p, b"old")

    def boom(*_a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"old"
    assert [f.name for f in tmp_path.iterdir()] == ["a.bin"]


def test_directory_hash_depends_on_names_and_content(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_bytes(b"1")
    h1 = sha256_file(tmp_path / "d")
    (tmp_path / "d" / "x").rename(tmp_path / "d" / "y")
    assert sha256_file(tmp_path / "d") != h1
