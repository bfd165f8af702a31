"""Fixtures shared by both test roots, ``tests/`` and ``benchmarks/`` (pytest loads this file for each)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def wheels() -> Path:
    """The folder of pinned wheels real models and photos come from (``.ci/setup`` fetches them); fails,
    never skips, when one is missing."""
    from edge_kit import realmodels

    try:
        return realmodels.wheels_folder()
    except realmodels.MissingWheel as exc:
        pytest.fail(str(exc), pytrace=False)
