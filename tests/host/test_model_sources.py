"""Model files and artifact folders that are not what the user meant: one line naming the path and what to give."""

from __future__ import annotations

import json
import sys
import time

import pytest


@pytest.mark.parametrize("content", [b"this is not a zip", b"", b"PK\x03\x04 cut short"])
def test_a_keras_file_that_is_not_a_zip_archive_says_so_not_file_not_found(tmp_path, content):
    """Keras answered a .keras file that is not a zip with "File not found: filepath=..." for a file that exists,
    and edge-kit added advice about custom layers; the line now says what is wrong with the file."""
    from edge_kit.compiler.sources import load_source
    from edge_kit.errors import InputError

    bad = tmp_path / "model.keras"
    bad.write_bytes(content)
    with pytest.raises(InputError) as caught:
        load_source(bad)
    assert str(caught.value) == (f"{bad}: not a loadable Keras model (not a zip archive, as every .keras file is: "
                                 "damaged, cut short, or another format named .keras); save it again with "
                                 "model.save('name.keras')")
    assert caught.value.exit_code == 2



def test_a_keras_archive_that_expands_past_half_the_memory_is_refused_before_keras_reads_it(tmp_path, monkeypatch):
    """A .keras is a zip: 60 KB of it can declare a config.json of 64 MB (or, likewise, gigabytes), which
    Keras read whole into memory; the declared sizes bound what reading decompresses, as for data files."""
    import zipfile

    import edgekit_protocol.datafile as datafile
    from edge_kit.compiler.sources import load_source
    from edge_kit.errors import InputError

    bomb = tmp_path / "bomb.keras"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("metadata.json", json.dumps({"keras_version": "3.15.0"}))
        zf.writestr("config.json", "{}" + " " * (64 << 20))
    assert bomb.stat().st_size < 1 << 20
    monkeypatch.setattr(datafile, "memory_available", lambda: 100 << 20)
    import keras

    def no_load(*args, **kwargs):
        raise AssertionError("Keras read the archive before its sizes were checked")

    monkeypatch.setattr(keras.models, "load_model", no_load)
    with pytest.raises(InputError) as caught:
        load_source(bomb)
    assert str(caught.value) == (f"{bomb}: not a loadable Keras model (its zip archive holds 67 MB once "
                                 "decompressed, more than half of the 105 MB of memory available here: a damaged or "
                                 "hostile file); save it again with model.save('name.keras')")

def test_an_artifacts_path_that_is_not_one_compiled_model_says_what_to_give(tmp_path):
    """`compile --out artifacts` then `deploy --artifacts artifacts` was told to "run `edgekit compile` into
    artifacts first", which the user had just done; a file was "unreadable manifest ([Errno 20] ...)"."""
    from edge_kit.errors import InputError
    from edge_kit.manifest import read_manifest

    out = tmp_path / "artifacts"
    for model in ("digits", "faces"):
        (out / model).mkdir(parents=True)
        (out / model / "manifest.json").write_text("{}")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "empty").mkdir()
    expected = {out: f"{out}/manifest.json: no manifest; {out} holds compiled models (digits, faces): give one "
                     f"model's folder, e.g. {out}/digits",
                tmp_path / "a-file": f"{tmp_path}/a-file: not a folder; give the compiled model's folder (artifacts/<model>)",
                tmp_path / "none": f"{tmp_path}/none: no such folder; give the compiled model's folder (artifacts/<model>)",
                tmp_path / "empty": f"{tmp_path}/empty/manifest.json: no manifest; run `edgekit compile` into "
                                    f"{tmp_path}/empty first"}
    for folder, message in expected.items():
        with pytest.raises(InputError) as caught:
            read_manifest(folder)
        assert str(caught.value) == message


@pytest.mark.parametrize("content, why", [(b"[]", "not a manifest (its JSON is an array, not an object)"),
                                          (b"null", "not a manifest (its JSON is null, not an object)"),
                                          (b"\x82\xffPK garbage", "unreadable manifest ('utf-8' codec can't decode")])
def test_a_manifest_that_is_json_but_no_object_or_not_text_is_one_line(tmp_path, run_cli, content, why):
    """`select --artifacts` on a manifest.json holding `[]` raised AttributeError, and on binary garbage
    UnicodeDecodeError, both with a traceback and nothing on stdout for --json."""
    from edge_kit.errors import InputError
    from edge_kit.manifest import read_manifest

    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(InputError) as caught:
        read_manifest(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path}/manifest.json: {why}")
    (tmp_path / "fleet.yaml").write_text("fleet: f\ndevices: [{name: d1, host: 127.0.0.1, user: pi, profile: rpi4}]\n")
    code, out, err = run_cli("select", "--fleet", tmp_path / "fleet.yaml", "--artifacts", tmp_path, "--json")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert json.loads(out)["error"].startswith(f"{tmp_path}/manifest.json: {why}")


def test_a_mistyped_example_name_gets_the_closest_one_and_leaves_no_folder(run_cli, tmp_path, monkeypatch):
    """... and it no longer leaves an empty examples/ folder behind (the folder was made before the name was checked)."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("example", "digit", "--json")
    assert code == 2 and err.count("\n") == 1
    assert json.loads(out)["error"] == "unknown example 'digit'; did you mean 'digits'? (choose from: digits, mobilenet, mobilenetv2)"
    assert list(tmp_path.iterdir()) == []


def test_the_input_shape_hint_names_each_dynamic_dimension_apart():
    from edge_kit.compiler.sources import pin_hint

    assert pin_hint([3, None, None]) == "1x3xHxW"  # was 1x3xHxH: height and width read as one size
    assert pin_hint([None, None, 3]) == "1xHxWx3"
    assert pin_hint([None, 8, None, None]) == "1xHx8xWxD3"
    assert pin_hint([16]) == "1x16"


def test_the_face_data_command_writes_enough_calibration_samples_and_says_errors_on_stderr(wheels, tmp_path, capsys):
    """The docs' own compile command warned 'only 64 calibration samples' (below the compiler's 100)."""
    import numpy as np

    from edge_kit import realmodels
    from edge_kit.compiler.data import WARN_CALIBRATION

    assert realmodels.main(["--wheels", str(wheels), "--out", str(tmp_path / "faces")]) == 0
    with np.load(tmp_path / "faces" / "face-calib.npz") as calib:
        assert len(calib["x"]) >= WARN_CALIBRATION
    capsys.readouterr()
    assert realmodels.main(["--wheels", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    out, err = capsys.readouterr()
    assert not out and err.startswith("python -m edge_kit.realmodels: error: ")


def test_the_face_data_command_finds_the_wheels_without_wheels_from_any_folder(wheels, tmp_path, monkeypatch, capsys):
    """Without --wheels it looked in ./.cache/wheels of the current folder only, ignoring $EDGEKIT_WHEELS (which
    the tests and wheels_folder() honour): run anywhere but the checkout's root, it said the wheels were missing."""
    from edge_kit import realmodels

    monkeypatch.setenv("EDGEKIT_WHEELS", str(wheels))
    monkeypatch.chdir(tmp_path)
    assert realmodels.main(["--out", "faces", "--calib", "2", "--eval", "2"]) == 0, capsys.readouterr().err
    assert (tmp_path / "faces" / "face_detection_full_range.tflite").is_file()


@pytest.mark.parametrize("version", ["3.10.0", "3.13.2", "2.15.0"])
def test_a_keras_with_known_safe_mode_bypasses_is_not_used_to_load_a_keras_file(tmp_path, monkeypatch, version):
    """safe_mode is what keeps a .keras file from running code while it loads; Keras before 3.14 lets a crafted
    archive get around it (CVE-2025-1550, CVE-2025-9906, CVE-2026-1462 through TFSMLayer), and nothing kept
    edge-kit from loading with one."""
    import zipfile

    import keras

    from edge_kit.compiler.sources import load_source
    from edge_kit.errors import InputError

    model = tmp_path / "m.keras"
    with zipfile.ZipFile(model, "w") as zf:
        zf.writestr("config.json", "{}")

    def no_load(*args, **kwargs):
        raise AssertionError("loaded with a Keras whose safe mode can be bypassed")

    monkeypatch.setattr(keras, "__version__", version)
    monkeypatch.setattr(keras.models, "load_model", no_load)
    with pytest.raises(InputError) as caught:
        load_source(model)
    assert str(caught.value) == (f"{model}: Keras {version} is installed, whose safe mode a crafted file can get around "
                                 "to run code while it loads (CVE-2025-1550, CVE-2025-9906, CVE-2026-1462); edge-kit "
                                 "loads Keras files with Keras 3.14 or later: pip install 'keras>=3.14'")


@pytest.mark.parametrize("declared", [
    {"units": 10**400},  # a JSON integer no float holds
    {"units": 8, "kernel_size": [10**4000] * 3},  # area: 12,000 digits
    {"units": 8, "kernel_size": [2**40] * 200_000},  # a long list: its product grew for minutes
], ids=["huge-units", "huge-kernel", "long-kernel"])
def test_a_keras_config_declaring_sizes_no_float_holds_is_refused_in_one_line(tmp_path, declared):
    """The config size check computed each layer's weights exactly and printed them as MB through a float: a
    config declaring Dense(units=10**400) raised OverflowError (int too large to convert to float), a traceback
    instead of the refusal, and a kernel_size list of 200,000 large entries multiplied for minutes."""
    import zipfile

    from edge_kit.compiler.sources import DECLARED_CAP, _check_keras_config
    from edge_kit.errors import InputError

    model = tmp_path / "forged.keras"
    config = {"class_name": "Functional", "config": {"layers": [
        {"class_name": "InputLayer", "config": {"name": "in", "batch_shape": [None, 8, 8, 3]}},
        {"class_name": "Dense", "config": {"name": "head", **declared}}]}}
    with zipfile.ZipFile(model, "w") as zf:
        zf.writestr("config.json", json.dumps(config))
    started = time.monotonic()
    with pytest.raises(InputError) as caught:
        _check_keras_config(model)
    assert time.monotonic() - started < 10
    assert str(caught.value).startswith(f"{model}: layer 'head' (Dense) declares more than {DECLARED_CAP:,} weights "
                                        f"({DECLARED_CAP * 4 / 1e6:,.0f} MB of float32) in the model's config, more "
                                        "than the 2,147,483,648 bytes edge-kit takes per layer")


@pytest.mark.parametrize("attribute", [[1, 2, 3], 7, 2.5], ids=["array", "int", "float"])
def test_an_h5_whose_model_config_is_no_text_is_one_line_not_a_type_error(tmp_path, attribute):
    """The config size check passed an .h5's ``model_config`` attribute to json.loads whatever it held: an array or a
    number there raised TypeError (a traceback) before Keras could say the file is not a model it loads."""
    import h5py

    from edge_kit.compiler.sources import _check_keras_config, load_source
    from edge_kit.errors import InputError

    model = tmp_path / "odd.h5"
    with h5py.File(model, "w") as f:
        f.attrs["model_config"] = attribute
    assert _check_keras_config(model) is None  # nothing declared to size: Keras's own load says what is wrong
    with pytest.raises(InputError) as caught:
        load_source(model)
    assert str(caught.value).startswith(f"{model}: ") and "\n" not in str(caught.value)


def test_a_long_library_error_is_cut_at_a_word_and_says_it_was_cut():
    """Keras's and LiteRT's own texts were cut at 200 characters mid-word ("If you trust the );")."""
    from edge_kit.errors import first_line

    keras = ("Requested the deserialization of a Lambda layer whose function is a Python lambda. This carries a potential "
             "risk of arbitrary code execution and thus it is disallowed by default. If you trust the source of the "
             "artifact, you can override this error")
    cut = first_line(ValueError(keras + "\nsecond line"))
    assert len(cut) <= 200 and cut.endswith("the...") and keras.startswith(cut[:-3])
    assert first_line(ValueError("x" * 300)) == "x" * 197 + "..."  # no word to cut at: cut where it must
    assert first_line(ValueError("short\nsecond")) == "short" and first_line(RuntimeError("")) == "RuntimeError"


def test_the_converter_version_without_importing_tensorflow_names_whichever_distribution_installed_it(monkeypatch):
    """An ONNX or .tflite compile reads TensorFlow's version from the installed distribution (importing it cost
    seconds): one installed as tf-nightly, or as intel-tensorflow, was recorded as null."""
    import importlib.metadata

    from edge_kit.compiler import convert, onnx_source

    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    installed = {"tf-nightly": "2.21.0.dev20261130"}
    monkeypatch.setattr(onnx_source, "version", installed.get)
    assert convert.converter_version() == "2.21.0.dev20261130"
    installed.clear()
    assert convert.converter_version() is None
    # a build under a name of its own (Intel's, ROCm's): the distribution that holds the module, whatever its name
    monkeypatch.setattr(importlib.metadata, "packages_distributions", lambda: {"tensorflow": ["intel-tensorflow"]})
    installed["intel-tensorflow"] = "2.20.0"
    assert convert.converter_version() == "2.20.0"
