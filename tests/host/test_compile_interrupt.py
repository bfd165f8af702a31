"""Ctrl-C at the end of ``edgekit compile``: once the new result (manifest and all) is in place, there is nothing to
undo, so the first Ctrl-C stops what is left (the table) and the compile exits 0, saying the result is complete and
what it skipped; before, it prints no result table, exits 130 and leaves the previous result as it was. The signal
is sent, a real SIGINT to this process, from a hook at the moment in question (monkeypatch). A one-layer ``.tflite``
and its ``fp32`` variant only: each compile takes seconds."""

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


def _slow_report(monkeypatch, interrupts: int) -> list:
    """Make the result table take a minute (work after the result is written), with ``interrupts`` Ctrl-C sent from
    0.2 s into it; return the list that says whether that minute ran out (True) or was stopped (nothing in it)."""
    import threading
    import time

    from edge_kit.cli import compile as compile_cli

    ran_out = []

    def slow_report(manifest):
        for i in range(interrupts):
            threading.Timer(0.2 + 0.3 * i, ctrl_c).start()
        time.sleep(60)
        ran_out.append(True)
        return compile_cli._compile_report.__wrapped__(manifest)

    slow_report.__wrapped__ = compile_cli._compile_report
    monkeypatch.setattr(compile_cli, "_compile_report", slow_report)
    return ran_out


def test_ctrl_c_once_the_result_is_written_stops_what_is_left_and_exits_0_saying_so(tmp_path, run_cli, monkeypatch):
    """A compile whose work after its result (here its table) took over 10 s ignored the first Ctrl-C and, stopped by
    the edgekit process 10 s later, exited 130 for a result written in full. The first Ctrl-C after the result now
    stops what is left at once: exit 0, one line saying the result is complete and what was skipped."""
    import time

    ran_out = _slow_report(monkeypatch, interrupts=1)
    started = time.monotonic()
    code, out, err = run_cli(*compile_args(tmp_path))
    assert code == 0 and time.monotonic() - started < 30 and not ran_out, err
    assert out == "" and err == (f"edgekit: interrupted once the result was written: {tmp_path / 'out' / 'dense'} is "
                                 "complete (manifest.json and its variants); skipped the result table (manifest.json "
                                 "holds its figures)\n")
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
