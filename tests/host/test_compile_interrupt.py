"""Ctrl-C at the end of ``edgekit compile``: once the new result (manifest and all) is in place, there is nothing to
stop or undo, so the compile reports it and exits 0, saying nothing of the interrupt; before, it prints no result
table, exits 130 and leaves the previous result as it was. The signal is sent, a real SIGINT to this process, from a
hook at the moment in question (monkeypatch), not after a delay. A one-layer ``.tflite`` and its ``fp32`` variant
only: each compile takes seconds."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import yaml
from tiny_models import dense_tflite


def compile_args(tmp_path: Path) -> list:
    rpi4 = yaml.safe_load((Path(__file__).resolve().parents[2] / "profiles" / "rpi4.yaml").read_text())
    profile = tmp_path / "tiny.yaml"
    profile.write_text(yaml.safe_dump({**rpi4, "name": "tiny", "variants": ["fp32"]}))
    model = tmp_path / "dense.tflite"
    if not model.exists():
        dense_tflite(model)
    return ["compile", model, "-p", profile, "--out", tmp_path / "out"]


def ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_as_the_result_table_is_printed_exits_0(tmp_path, run_cli, monkeypatch):
    """The new-user walkthrough: a Ctrl-C landing as the compile printed its table gave the whole success table and
    then "interrupted; nothing was half-written", exit 130, for a result written in full."""
    from edge_kit.cli import compile as compile_cli

    report = compile_cli._compile_report

    def interrupted_report(manifest):
        ctrl_c()
        return report(manifest)

    monkeypatch.setattr(compile_cli, "_compile_report", interrupted_report)
    code, out, err = run_cli(*compile_args(tmp_path))
    assert code == 0, err
    assert "interrupted" not in err and "fp32" in out and "/manifest.json" in out
    assert json.loads((tmp_path / "out" / "dense" / "manifest.json").read_text())["artifacts"][0]["status"] == "built"


def test_ctrl_c_right_after_the_result_swap_keeps_it_and_exits_0(tmp_path, run_cli, monkeypatch):
    """A Ctrl-C just after the new result took the output folder's place raised there: exit 130 and "nothing was
    half-written" for a result in place, and the previous result set aside was never removed. It is held through the
    swap now and dropped once the result is in place."""
    from edge_kit.compiler import pipeline

    assert run_cli(*compile_args(tmp_path))[0] == 0
    rename = pipeline.os.replace

    def interrupted_rename(src, dst):
        rename(src, dst)
        if ".staging-" in Path(src).name:
            ctrl_c()

    monkeypatch.setattr(pipeline.os, "replace", interrupted_rename)
    code, out, err = run_cli(*compile_args(tmp_path))
    assert code == 0, err
    assert "interrupted" not in err and "/manifest.json" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dense"]  # no staging or previous result left
    assert (tmp_path / "out" / "dense" / "fp32.tflite").is_file()


def test_ctrl_c_before_the_manifest_is_written_prints_no_table_and_keeps_the_previous_result(tmp_path, run_cli,
                                                                                              monkeypatch):
    from edge_kit.compiler import pipeline

    assert run_cli(*compile_args(tmp_path))[0] == 0
    before = (tmp_path / "out" / "dense" / "manifest.json").read_bytes()
    write = pipeline.atomic_write_text

    def interrupted_write(path, text):
        ctrl_c()
        return write(path, text)

    monkeypatch.setattr(pipeline, "atomic_write_text", interrupted_write)
    code, out, err = run_cli(*compile_args(tmp_path))
    assert code == 130 and err == "edgekit: error: interrupted; nothing was half-written\n" and out == "", (code, err)
    assert (tmp_path / "out" / "dense" / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dense"]
