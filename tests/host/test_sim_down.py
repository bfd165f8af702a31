"""Stopping a simulated fleet finishes even when Ctrl-C comes in the middle (it often comes while a run
cleans up), so nothing is left running; the interrupt is raised after."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from edge_kit.sim import fleet as simfleet


def test_ctrl_c_while_the_simulated_fleet_stops_leaves_nothing_running(tmp_path, monkeypatch):
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    sim = simfleet.SimFleet(tmp_path)
    sim._save({"broker": {"kind": "mosquitto", "host": "127.0.0.1", "port": 1, "pid": procs[0].pid}, "links": None,
               "devices": [{"name": f"d{i}", "sshd_pid": p.pid, "root": str(tmp_path / f"d{i}")}
                           for i, p in enumerate(procs[1:])]})
    real = simfleet.terminate_pid
    presses = []

    def ctrl_c_then_stop(pid, *args):
        if not presses:
            presses.append(pid)
            os.kill(os.getpid(), signal.SIGINT)  # the operator presses Ctrl-C as the first process stops
        real(pid, *args)

    monkeypatch.setattr(simfleet, "terminate_pid", ctrl_c_then_stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            sim.down()
        for p in procs:
            p.wait(timeout=10)  # stopped (terminate_pid reaps its own children)
        assert sim.state() is None
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        for p in procs:
            p.kill()
