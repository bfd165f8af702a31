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

import pytest
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


def _swap_line(target: Path) -> str:
    return (f"edgekit: error: interrupted during the result swap, which was finished first: {target} holds the new "
            "result, complete (manifest.json and its variants)\n")


def _whole(folder: Path) -> dict:
    """Return the manifest in ``folder`` after checking that every artifact it lists is there with its sha256, and
    that nothing else (no staging folder, no previous result set aside) is beside the folder."""
    import hashlib

    manifest = json.loads((folder / "manifest.json").read_text())
    for a in manifest["artifacts"]:
        if a["status"] == "built":
            assert hashlib.sha256((folder / a["file"]).read_bytes()).hexdigest() == a["sha256"], a["file"]
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]
    return manifest


def test_ctrl_c_during_the_result_swap_is_held_then_stops_the_compile_with_the_new_result_whole(tmp_path, run_cli,
                                                                                                monkeypatch):
    """A Ctrl-C that came during the swap (here, right after the new result took the output folder's place) was
    dropped: the compile went on, printed its table and exited 0, as if nobody had pressed it. It is held through the
    swap (never between the two renames), then stops the compile: exit 130, one line saying the new result is in
    place, whole, and no table."""
    from edge_kit.compiler import pipeline

    assert run_cli(*compile_args(tmp_path))[0] == 0
    rename = pipeline.os.replace

    def interrupted_rename(src, dst):
        rename(src, dst)
        if ".staging-" in Path(src).name:
            ctrl_c()

    monkeypatch.setattr(pipeline.os, "replace", interrupted_rename)
    code, out, err = run_cli(*compile_args(tmp_path))
    assert (code, out, err) == (130, "", _swap_line(tmp_path / "out" / "dense"))
    assert _whole(tmp_path / "out" / "dense")["artifacts"][0]["status"] == "built"


def test_ctrl_c_to_a_real_compile_between_the_swaps_two_renames_exits_130_once_the_new_result_is_whole(tmp_path,
                                                                                                       run_cli):
    """`edgekit compile` as a user runs it (its own process and compile worker, in a session of its own): a Ctrl-C to
    the whole group (a terminal's) while the worker is between the swap's two renames (the previous result set aside,
    the new one not yet in; the swap pauses there for the test) was dropped: exit 0. Now it waits for the swap, then
    exit 130 and one line; the new result is in place, whole, the previous one gone, nothing else left."""
    import subprocess
    import sys
    import time

    from edge_kit.compiler.watch import SWAP_PAUSE_ENV, WORKER_ENV

    args = [str(a) for a in compile_args(tmp_path)]
    assert run_cli(*args)[0] == 0  # the previous result (in-process: only the second compile is the real thing)
    env = {k: v for k, v in os.environ.items() if k != WORKER_ENV}  # the real thing: a worker, as for a user
    before = json.loads((tmp_path / "out" / "dense" / "manifest.json").read_text())
    flag = tmp_path / "at-swap"
    proc = subprocess.Popen([sys.executable, "-m", "edge_kit", *args], env={**env, SWAP_PAUSE_ENV: str(flag)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert flag.exists(), "the compile never reached its result swap"
        assert not (tmp_path / "out" / "dense").exists()  # between the renames: the previous result set aside
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.5)
        flag.unlink()  # the swap goes on
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert (proc.returncode, out, err) == (130, "", _swap_line(tmp_path / "out" / "dense")), err
    after = _whole(tmp_path / "out" / "dense")
    assert after["created"] != before["created"]  # the new result, not the previous one put back


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


@pytest.mark.parametrize("given", ["soon", "0", "-1", "nan", "inf", ""])
def test_the_grace_after_ctrl_c_is_the_environments_and_a_bad_one_is_one_line_before_any_worker(monkeypatch, given):
    """EDGEKIT_INTERRUPT_GRACE_S sets how long a compile has to stop on its own after Ctrl-C (tests shorten it; it
    had no override); unset, INTERRUPT_GRACE_S. A value that is not a number of seconds above 0 is one line, exit 2,
    and no worker is started (the model named does not exist: a started one would say so instead)."""
    from edge_kit.cli import worker

    monkeypatch.delenv(worker.INTERRUPT_GRACE_ENV, raising=False)
    assert worker.interrupt_grace() == worker.INTERRUPT_GRACE_S
    monkeypatch.setenv(worker.INTERRUPT_GRACE_ENV, "2.5")
    assert worker.interrupt_grace() == 2.5
    monkeypatch.setenv(worker.INTERRUPT_GRACE_ENV, given)
    assert worker.run_worker(["compile", "nope.keras"]) == (2, (
        f"$EDGEKIT_INTERRUPT_GRACE_S is {given!r}, not a number of seconds above 0 (how long a compile has to stop on "
        f"its own after Ctrl-C); set it to one, or unset it for {worker.INTERRUPT_GRACE_S:g}"))


class _CtrlCMidWrite:
    """stdout whose write sends a real SIGINT to this process once half of a long text is written (a Ctrl-C landing
    while the JSON goes out, as when the reader's pipe is full), then writes the rest."""

    def __init__(self, real):
        self.real, self.sent = real, False

    def write(self, text):
        if self.sent or len(text) < 200:
            return self.real.write(text)
        half = len(text) // 2
        self.real.write(text[:half])
        self.sent = True
        ctrl_c()  # the Python handler runs at the next bytecode: here, before the second half
        return self.real.write(text[half:]) + half

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_ctrl_c_while_compile_json_writes_the_manifest_never_cuts_it(tmp_path, run_cli, monkeypatch):
    """`edgekit compile --json`: a Ctrl-C landing while the manifest was written on stdout raised there, so the reader
    got half a JSON document (and a line saying the manifest on stdout was skipped). The interrupt is held during the
    write: the reader gets the whole manifest, and the compile, whose work was all done, exits 0."""
    import sys

    assert run_cli(*compile_args(tmp_path))[0] == 0  # the model and profile are made; the next run writes the JSON
    fake = _CtrlCMidWrite(sys.stdout)
    monkeypatch.setattr(sys, "stdout", fake)
    code, out, err = run_cli(*compile_args(tmp_path), "--json")
    assert fake.sent, "the fake Ctrl-C was not sent"
    assert code == 0 and err == "", (code, err)
    assert json.loads(out) == json.loads((tmp_path / "out" / "dense" / "manifest.json").read_text())


def test_ctrl_c_while_a_json_result_is_written_comes_once_it_is_whole(run_cli, monkeypatch):
    """Any --json result (emit_json): the Ctrl-C is acted on (exit 130) only after the document is out whole."""
    import sys

    fake = _CtrlCMidWrite(sys.stdout)
    monkeypatch.setattr(sys, "stdout", fake)
    code, out, err = run_cli("profiles", "list", "--json")
    assert fake.sent and code == 130 and err == "edgekit: error: interrupted; nothing was half-written\n", (code, err)
    decoder = json.JSONDecoder()
    profiles, end = decoder.raw_decode(out)
    assert {p["name"] for p in profiles} >= {"rpi4", "jetson-orin-nano"}
    assert json.loads(out[end:]) == {"error": "interrupted; nothing was half-written", "exit_code": 130}


def test_a_second_ctrl_c_while_a_json_document_is_held_stops_at_once():
    """A Ctrl-C while a --json document is written is held until it is out; a second one was held too, so a reader
    that never reads (a stuck pipe) held the command for ever. Now the second stops it at once."""
    from edge_kit.cli.app import interrupts_held

    reached, before = [], signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in `edgekit` (an xdist worker may ignore it)
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            signal.raise_signal(signal.SIGINT)
            reached.append("after the first")  # held: the document goes on being written
            signal.raise_signal(signal.SIGINT)
            reached.append("after the second")
    try:
        assert reached == ["after the first"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler before it is back
    finally:
        signal.signal(signal.SIGINT, before)
