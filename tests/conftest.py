"""Shared fixtures. Integration fixtures build real models with TensorFlow once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture
def run_cli(capsys):
    """Run `edgekit ARGS...` in-process; return (exit code, stdout, stderr)."""
    from edge_kit.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        argv = sys.argv
        sys.argv = ["edgekit", *map(str, args)]
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            sys.argv = argv
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory):
    """The digits example (trained briefly) in a session temp folder."""
    from edge_kit.examples import digits

    return digits(tmp_path_factory.mktemp("digits"), epochs=10)
