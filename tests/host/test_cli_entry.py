"""The `edgekit` entry point: one line and an exit code, whatever goes wrong before a command runs."""

from __future__ import annotations

import subprocess
import sys


def run_edgekit(prelude: str, *args: str) -> subprocess.CompletedProcess:
    code = f"import sys; {prelude}; sys.argv = ['edgekit', *{list(args)!r}]; from edge_kit.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_without_the_host_extra_it_names_what_to_install_in_one_line():
    result = run_edgekit("sys.modules['typer'] = None", "profiles", "list")
    assert result.returncode == 2
    assert result.stderr == ("edgekit: error: the host commands need the host extra (typer is not installed): "
                             "pip install 'edge-kit[host]'\n")


def test_a_toolkit_error_is_one_line_and_its_exit_code():
    result = run_edgekit("pass", "profiles", "show", "rpi-4")
    assert result.returncode == 2
    assert result.stderr.startswith("edgekit: error: unknown profile 'rpi-4'; did you mean 'rpi4'?")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
