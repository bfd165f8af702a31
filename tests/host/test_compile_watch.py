"""The deadlines a compile worker notes around the work that runs the user's model in its own process."""

from __future__ import annotations

import json
import time

import pytest

from edge_kit.compiler.watch import WORKER_ENV, watched


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
