"""`edgekit demo`'s own folder: removed after a run that worked (unless kept), kept after one that failed.

The integration test runs the real demo with ``--keep`` (it reads the history the demo leaves); this unit test
stands in for the steps (fakes, never run as the demo) to check what happens to the folder either way."""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from edge_kit.errors import EdgeKitError
from edge_kit.loop import demo


class _Sim:
    """A simulated fleet that starts nothing: records that it was stopped."""

    stopped: list[Path] = []

    def __init__(self, folder: Path):
        self.folder, self.fleet_file = folder, folder / "fleet.yaml"

    def up(self, *_args, **_kwargs):
        self.folder.mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(devices=[], key_store=lambda: SimpleNamespace(operator=None))

    def down(self) -> None:
        _Sim.stopped.append(self.folder)


@pytest.fixture
def steps(monkeypatch, tmp_path):
    """The demo's steps replaced; its temporary folders made under ``tmp_path``. Returns a dict whose "fail" names
    the step that raises."""
    what: dict[str, str | None] = {"fail": None}

    def step(name, value=None):
        def run(*_args, **_kwargs):
            if what["fail"] == name:
                raise EdgeKitError(f"{name} failed")
            return value
        return run

    files = SimpleNamespace(model=None, calib=None, eval=None, train=None)
    monkeypatch.setattr(demo, "digits", step("digits", files))
    monkeypatch.setattr(demo, "compile_model", step("compile"))
    monkeypatch.setattr(demo, "find_mosquitto", lambda: "/usr/sbin/mosquitto")
    monkeypatch.setattr(demo, "SimFleet", _Sim)
    monkeypatch.setattr(demo, "sign_manifest", step("sign"))
    monkeypatch.setattr(demo, "tune", step("tune", SimpleNamespace(final={})))
    monkeypatch.setattr(demo, "_serve_an_application", step("serve", {}))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    _Sim.stopped.clear()
    return what


def _made(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("edgekit-demo-*"))


def test_a_demo_that_worked_removes_its_own_folder_after_stopping_the_fleet(steps, tmp_path):
    result = demo.run_demo(devices=1, profiles=("rpi4",))
    assert result.kept is False and not result.workdir.exists() and _made(tmp_path) == []
    assert _Sim.stopped == [result.workdir / "sim"]


def test_a_kept_demo_and_one_in_a_named_folder_leave_it(steps, tmp_path):
    kept = demo.run_demo(devices=1, profiles=("rpi4",), keep=True)
    assert kept.kept is True and kept.workdir.is_dir() and _made(tmp_path) == [kept.workdir]
    named = demo.run_demo(devices=1, profiles=("rpi4",), workdir=tmp_path / "mine")
    assert named.kept is True and named.workdir == tmp_path / "mine" and named.workdir.is_dir()


@pytest.mark.parametrize("failing", ["compile", "tune", "serve"])
def test_a_demo_that_failed_keeps_its_folder_to_inspect_and_stops_the_fleet(steps, tmp_path, failing):
    steps["fail"] = failing
    with pytest.raises(EdgeKitError, match=f"{failing} failed"):
        demo.run_demo(devices=1, profiles=("rpi4",))
    (folder,) = _made(tmp_path)
    assert folder.is_dir() and _Sim.stopped == [folder / "sim"]
