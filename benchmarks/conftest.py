"""Benchmarks print the figures the README quotes. Run: .venv/bin/python -m pytest benchmarks -q

Each figure is recorded with what it measured and how; the table prints at the end of the run.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
FIGURES: list[tuple[str, str, str, str]] = []


@pytest.fixture
def figure():
    """record(name, value, target, how): add one row to the figures table."""

    def record(name: str, value: str, target: str, how: str) -> None:
        FIGURES.append((name, value, target, how))

    return record


def pytest_terminal_summary(terminalreporter):
    if not FIGURES:
        return
    terminalreporter.section("edge-kit figures (quoted in README.md)")
    for name, value, target, how in FIGURES:
        terminalreporter.write_line(f"{name:<58} {value:>12}   target {target:<10} [{how}]")
