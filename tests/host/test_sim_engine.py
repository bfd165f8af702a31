"""A simulated device whose profile runs on tflite-runtime (``coral-devboard``) runs its agent with the checkout's
``.venv-tflite`` (tflite-runtime needs numpy<2, so it is not in the host's Python): before, every one of them was
refused at its deploy ("profile coral-devboard runs its LiteRT variants on tflite-runtime ..., which the device's
Python lacks") unless the host's Python had tflite-runtime, which it cannot beside numpy 2."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from edge_kit.errors import InputError
from edge_kit.sim import fleet as simfleet


def test_a_tflite_runtime_profile_runs_its_simulated_devices_with_the_tflite_venv(tmp_path, monkeypatch):
    assert importlib.util.find_spec("tflite_runtime") is None  # the premise: the host's Python (numpy 2) lacks it
    python = tmp_path / "venv-tflite" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    monkeypatch.setenv(simfleet.TFLITE_PYTHON_ENV, str(python))
    assert simfleet.engine_pythons(["rpi4", "coral-devboard", "coral-usb", "coral-devboard"]) == {
        "coral-devboard": str(python)}  # the LiteRT profiles keep this Python
    monkeypatch.delenv(simfleet.TFLITE_PYTHON_ENV)
    checkout = Path(simfleet.__file__).resolve().parents[2] / ".venv-tflite" / "bin" / "python"
    beside = Path(sys.prefix).resolve().parent / ".venv-tflite" / "bin" / "python"
    found = simfleet.tflite_python()
    assert found == (checkout if checkout.exists() else beside if beside.exists() else None)


def test_without_a_tflite_venv_sim_up_says_what_to_do_and_starts_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(simfleet.TFLITE_PYTHON_ENV, raising=False)
    monkeypatch.setattr(simfleet, "tflite_python", lambda: None)
    sim = simfleet.SimFleet(tmp_path / "sim")
    with pytest.raises(InputError) as refused:
        sim.up(2, ["rpi4", "coral-devboard"], insecure=True)
    text = str(refused.value)
    assert text == (f"profile coral-devboard runs its variants on tflite-runtime (its runtime.engine), which this "
                    f"Python ({sys.executable}) lacks, and there is no .venv-tflite for its simulated devices: run "
                    "`bash .ci/setup` (it makes .venv-tflite with tflite-runtime and numpy<2, on Python 3.11 or "
                    f"older), or set {simfleet.TFLITE_PYTHON_ENV} to a Python that has it, or leave coral-devboard "
                    "out of --profiles; nothing was started")
    assert sim.state() is None and not (tmp_path / "sim" / "fleet.yaml").exists()
