"""The deadlines a compile worker notes around the work that runs the user's model in its own process."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edge_kit.compiler.watch import LOOP_CAUSE, WORKER_ENV, watched


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_watched_step_notes_its_deadline_from_its_first_sample_and_lifts_it_on_exit(tmp_path, monkeypatch):
    notes = tmp_path / "notes.jsonl"
    monkeypatch.setenv(WORKER_ENV, str(notes))
    with watched("the int8 calibration of int8 on calib.npz", 7.0, at_once=False) as start:
        assert not notes.exists()  # the conversion before the first sample does not count
        before = time.monotonic()
        start()
        start()  # once per step, whatever the calibrator calls it for each sample
    first, last = _lines(notes)
    assert first["doing"] == "the int8 calibration of int8 on calib.npz" and first["seconds"] == 7.0
    assert first["cause"] == LOOP_CAUSE
    assert before + 7.0 <= first["until"] <= time.monotonic() + 7.0
    assert last == {"doing": None, "seconds": None, "until": None}


def test_a_watched_step_that_raises_lifts_its_deadline_and_one_never_started_notes_nothing(tmp_path, monkeypatch):
    notes = tmp_path / "notes.jsonl"
    monkeypatch.setenv(WORKER_ENV, str(notes))
    with pytest.raises(ValueError), watched("Keras's loading of the model", 3.0):
        raise ValueError("bad file")
    assert _lines(notes)[-1] == {"doing": None, "seconds": None, "until": None}
    notes.unlink()
    with watched("the int8 calibration", 3.0, at_once=False):
        pass  # the converter failed before calibrating
    assert not notes.exists()


def test_outside_a_worker_nothing_is_noted(tmp_path, monkeypatch):
    monkeypatch.setenv(WORKER_ENV, "")
    with watched("TensorFlow's loading of the SavedModel", 3.0):
        pass
    assert list(tmp_path.iterdir()) == []


def _folded(path):
    """The notes as the watching process reads them (edge_kit.cli.worker._notes: later lines win)."""
    from edge_kit.cli.worker import _notes

    return _notes(path)


def test_a_step_inside_another_restores_the_outer_deadline_when_it_ends_its_time_not_counted(tmp_path, monkeypatch):
    """A calibration runs inside the TFLite conversion that calls it: when it ended, the deadline was lifted, so the
    rest of the conversion ran without one. Now the outer one is in force again, moved on by the inner one's time
    (each counts only its own), and only the outermost's end lifts it."""
    notes = tmp_path / "notes.jsonl"
    monkeypatch.setenv(WORKER_ENV, str(notes))
    with watched("the TFLite converter's int8 conversion of int8", 60.0, cause="conversion?"):
        outer = _folded(notes)
        assert outer["doing"] == "the TFLite converter's int8 conversion of int8" and outer["cause"] == "conversion?"
        with watched("the int8 calibration of int8 on calib.npz", 5.0, at_once=False) as start:
            assert _folded(notes)["doing"] == outer["doing"]  # not started: the conversion's deadline holds
            start()
            inner = _folded(notes)
            assert inner["doing"] == "the int8 calibration of int8 on calib.npz" and inner["seconds"] == 5.0
            assert inner["cause"] == LOOP_CAUSE and inner["until"] < outer["until"]
            time.sleep(0.3)
        after = _folded(notes)
        assert {k: after[k] for k in ("doing", "seconds", "cause")} == {
            "doing": "the TFLite converter's int8 conversion of int8", "seconds": 60.0, "cause": "conversion?"}
        assert after["until"] >= outer["until"] + 0.3  # the calibration's time is not the conversion's
        assert after["until"] <= time.monotonic() + 60.0
    assert _folded(notes)["until"] is None and _lines(notes)[-1] == {"doing": None, "seconds": None, "until": None}


def test_an_outer_step_that_ends_first_leaves_the_inner_deadline_in_force(tmp_path, monkeypatch):
    """A calibration started inside quantize_static's step outlives it (its context is the caller's): the step's
    end notes nothing, the calibration's deadline holds until it ends, and then none."""
    notes = tmp_path / "notes.jsonl"
    monkeypatch.setenv(WORKER_ENV, str(notes))
    with watched("the int8 calibration", 5.0, at_once=False) as start:
        with watched("ONNX Runtime's quantize_static of onnx-int8", 60.0):
            start()
        assert _folded(notes)["doing"] == "the int8 calibration"
        assert _lines(notes)[-1]["doing"] == "the int8 calibration"
    assert _lines(notes)[-1] == {"doing": None, "seconds": None, "until": None}
    with watched("a later step", 1.0):  # nothing left behind: a fresh step is the only one
        assert _folded(notes)["doing"] == "a later step"
    assert _folded(notes)["until"] is None


def test_a_conversion_gets_five_loading_budgets_plus_a_second_per_mib_of_the_model():
    from edge_kit.compiler.analysis import INFERENCE_FLOOR_S, conversion_deadline

    assert conversion_deadline(0) == 5 * INFERENCE_FLOOR_S  # 600 s by default
    assert conversion_deadline(0, 2) == 10.0  # --timeout 2
    assert conversion_deadline(300 * 2**20, 2) == 310.0  # a 300 MiB model converts for longer
    assert conversion_deadline(1000, 2) == 11.0  # rounded up to a whole second, as the one line says it


def test_onnx_int8s_conversion_steps_each_note_a_deadline_and_the_calibration_nests_in_quantize_static(tmp_path,
                                                                                                       monkeypatch):
    """onnx's version converter and ONNX Runtime's quant_pre_process ran in the compiling process before the
    calibration's clock started, without a deadline. Each now notes its own, named (tool and variant), and the
    calibration's, started inside quantize_static, is in force until it ends; then none."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edge_kit.compiler.analysis import CONVERSION_CAUSE
    from edge_kit.compiler.onnx_variants import to_int8

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])  # below 13: converted first
    model.ir_version = 7
    notes = tmp_path / "notes.jsonl"
    monkeypatch.setenv(WORKER_ENV, str(notes))
    with watched("the int8 calibration of onnx-int8 on calib.npz", 30.0, at_once=False) as calibrating:
        data, how = to_int8(model.SerializeToString(), {"x": rng.normal(size=(20, 8)).astype(np.float32)},
                            calibrating, seconds=12.0)
    onnx.load_from_string(data)
    assert "opset raised from 11 to 13" in how
    said = _lines(notes)
    doing = [line["doing"] for line in said]
    assert doing == ["onnx's version converter on onnx-int8 (opset 11 to 13)", None,
                     "ONNX Runtime's quant_pre_process of onnx-int8 (with graph optimisation)", None,
                     "ONNX Runtime's quantize_static of onnx-int8", "the int8 calibration of onnx-int8 on calib.npz",
                     None], said
    assert all(line["seconds"] == 12.0 and line["cause"] == CONVERSION_CAUSE for line in said[:5:2])
    assert said[5]["seconds"] == 30.0 and said[5]["cause"] == LOOP_CAUSE


def test_trt_int8s_calibrator_notes_a_deadline_while_it_augments_the_model_before_the_calibrations_clock(
        tmp_path, monkeypatch):
    """ONNX Runtime's create_calibrator rewrites the model (every tensor made an output) in the compiling process
    before the first sample starts the calibration's clock: it has a conversion deadline of its own, then the
    calibration's is in force until it ends."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from edge_kit.compiler.analysis import CONVERSION_CAUSE, conversion_deadline
    from edge_kit.compiler.trt_variants import calibration_table

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    data = model.SerializeToString()
    notes = tmp_path / "notes.jsonl"
    monkeypatch.setenv(WORKER_ENV, str(notes))
    with watched("the int8 calibration of trt-int8 on calib.npz", 30.0, at_once=False) as calibrating:
        assert calibration_table(data, {"x": rng.normal(size=(20, 8)).astype(np.float32)}, calibrating)
    said = _lines(notes)
    assert [line["doing"] for line in said] == [
        "ONNX Runtime's create_calibrator on trt-int8 (the model augmented to output every tensor)", None,
        "the int8 calibration of trt-int8 on calib.npz", None], said
    assert said[0]["seconds"] == conversion_deadline(len(data)) and said[0]["cause"] == CONVERSION_CAUSE
    assert said[2]["seconds"] == 30.0 and said[2]["cause"] == LOOP_CAUSE


def test_a_sparse_file_in_a_model_folder_does_not_stretch_its_conversion_deadline(tmp_path):
    """The deadline grows with the model's size: counted by apparent size, a 1 TiB sparse file (4 KiB on disk) in a
    SavedModel folder bought every conversion step twelve days."""
    import os

    from edge_kit.compiler.analysis import conversion_deadline
    from edge_kit.compiler.sources import _disk_bytes

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "saved_model.pb").write_bytes(b"x" * 3000)
    with open(folder / "pad.bin", "wb") as f:
        f.truncate(2**40)
    assert os.stat(folder / "pad.bin").st_size == 2**40
    assert _disk_bytes(folder) < 2**20 and _disk_bytes(folder / "saved_model.pb") == 3000
    assert conversion_deadline(_disk_bytes(folder)) == conversion_deadline(0) + 1


def _result(folder, text):
    folder.mkdir()
    (folder / "manifest.json").write_text(text)
    return folder


def test_the_result_swap_is_noted_and_a_worker_ended_inside_it_is_finished_or_undone(tmp_path, monkeypatch):
    """A worker killed while swapping in its result (the kernel, for memory) was said to have written nothing and
    left its staging folder; killed between the swap's two renames, the previous result was left in a hidden
    `.out.old-PID` folder and the output folder was gone. The swap's steps are noted; the edgekit process finishes
    the swap or undoes it, and says which."""
    from edge_kit.cli.worker import _cleaned, _notes
    from edge_kit.compiler.pipeline import _publish
    from edge_kit.manifest import Manifest

    notes = tmp_path / "notes.jsonl"
    monkeypatch.setenv(WORKER_ENV, str(notes))
    out = _result(tmp_path / "out", "previous")
    manifest = Manifest.model_construct()
    monkeypatch.setattr(Manifest, "to_json", lambda self, signer=None: "new", raising=False)
    _publish(out, {}, manifest, {"eval.npz": b"x"})
    said = _notes(notes)
    assert said["published"] == str(out) and (out / "manifest.json").read_text() == "new"
    assert Path(said["staging"]).parent == Path(said["old"]).parent == tmp_path and not Path(said["old"]).exists()

    # ended after the swap, before the previous result was removed: it is removed, the new one stays
    old = _result(Path(said["old"]), "previous")
    assert _cleaned({"out": str(out), **said}) == f"the new result had been written to {out} already"
    assert not old.exists() and (out / "manifest.json").read_text() == "new"

    # ended between the two renames: the previous result comes back, the staging folder goes
    staging = _result(tmp_path / ".out.staging-abc", "half")
    out.rename(old)
    said = {"out": str(out), "staging": str(staging), "old": str(old)}
    assert _cleaned(said) == "nothing was written; an earlier result in the output folder is left as it was"
    assert (out / "manifest.json").read_text() == "new" and not old.exists() and not staging.exists()

    # before the swap: only the staging folder goes
    staging = _result(tmp_path / ".out.staging-def", "half")
    assert _cleaned({"out": str(out), "staging": str(staging)}).startswith("nothing was written")
    assert not staging.exists() and (out / "manifest.json").read_text() == "new"


def test_a_noted_folder_that_is_not_the_swaps_own_is_never_moved_or_removed(tmp_path):
    from edge_kit.cli.worker import _cleaned

    out = tmp_path / "out"
    keep = [_result(tmp_path / name, "keep") for name in ("precious", ".other.staging-x", ".out.old")]
    link = tmp_path / ".out.staging-link"
    link.symlink_to(keep[0])
    for noted in (*keep, link, tmp_path / "sub"):
        _cleaned({"out": str(out), "staging": str(noted), "old": str(noted)})
        _cleaned({"out": str(out), "staging": str(noted), "old": str(noted), "published": True})
    assert all((k / "manifest.json").read_text() == "keep" for k in keep) and link.is_symlink()
    assert not out.exists()


def test_after_the_result_is_written_a_first_ctrl_c_stops_what_is_left_and_a_second_one_interrupts(monkeypatch):
    """Once the result is in place the first Ctrl-C was ignored: the compile went on with its table however long it
    took, and was stopped 10 s later by the edgekit process, exit 130. Now it stops the work after the result
    (StoppedAfterResult: the command says the result is complete, exit 0), raised when that work begins if it came
    while the compile was returning; a second one raises KeyboardInterrupt."""
    import os
    import signal

    import pytest

    from edge_kit.compiler import watch

    monkeypatch.setattr(watch, "_written", [False])
    with watch.interrupts_after_result_stop() as after_result:
        with pytest.raises(KeyboardInterrupt):  # before the result: stops, as always
            os.kill(os.getpid(), signal.SIGINT)
        watch.result_written(True)
        os.kill(os.getpid(), signal.SIGINT)  # as the compile returns: kept for the work after the result
        with pytest.raises(watch.StoppedAfterResult):
            after_result()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second: stops
    monkeypatch.setattr(watch, "_written", [True])
    with watch.interrupts_after_result_stop() as after_result:
        after_result()
        with pytest.raises(watch.StoppedAfterResult):  # during the work after the result: stops it at once
            os.kill(os.getpid(), signal.SIGINT)
        assert not isinstance(watch.StoppedAfterResult(), Exception)  # no `except Exception` in that work takes it


def test_a_worker_stopped_after_ctrl_c_once_its_result_was_written_exits_0_saying_it_is_complete(tmp_path, monkeypatch):
    """A worker whose work after its result outlasted the grace after Ctrl-C (here one that never stops: a SIGINT
    that reached the edgekit process alone) was stopped with exit 130, "interrupted", for a result written in full.
    Stopped once its notes say the result is in place, it is exit 0 and a line saying the result is complete."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import threading

    from edge_kit.cli import worker

    target = tmp_path / "out" / "dense"
    target.mkdir(parents=True)
    script = ("import json, os, time; open(os.environ['EDGEKIT_COMPILE_WORKER'], 'a').write(json.dumps("
              f"{{'model': 'dense.tflite', 'out': {str(tmp_path / 'out')!r}, 'step': 'writing artifacts', "
              f"'published': {str(target)!r}}}) + '\\n'); time.sleep(60)")
    popen = subprocess.Popen
    monkeypatch.setattr(worker.subprocess, "Popen", lambda _argv, env: popen([sys.executable, "-c", script], env=env))
    monkeypatch.setattr(worker, "INTERRUPT_GRACE_S", 1.0)
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    code, said = worker.run_worker(["compile", "dense.tflite"])
    assert code == 0 and said == (f"interrupted once the result was written: {target} is complete (manifest.json and "
                                  "its variants); the compile did not stop on its own within 1 s of Ctrl-C, so it was "
                                  "stopped, skipping what it still had to print")
    assert target.is_dir() and json.dumps(said).count("\\n") == 0
