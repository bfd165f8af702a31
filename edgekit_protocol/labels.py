"""The one spelling of every label a record or report carries.

``str`` enums: a member compares equal to its value and serialises as it, so records on the wire
and rows in the history hold plain strings.
"""

from __future__ import annotations

from enum import Enum


class StrEnum(str, Enum):
    """A string enum whose ``str()`` is its value (Python 3.10 has no ``enum.StrEnum``)."""

    def __str__(self) -> str:
        return str(self.value)


class PowerSource(StrEnum):
    """Where a power figure came from, when no named sensor measured it."""

    ESTIMATED = "estimated"  # idle_w + (busy_w - idle_w) x CPU use, from the profile's figures
    NOT_MEASURED = "not measured"


def power_source(power: dict) -> str:
    """Return the label of a bench record's ``power`` block: the sensor's key, or a :class:`PowerSource`."""
    if power.get("sensor"):
        return str(power["sensor"])
    return str(PowerSource.ESTIMATED if power.get("estimated") else PowerSource.NOT_MEASURED)


def accuracy_text(value: float | None, decimals: int = 2) -> str:
    """Return an accuracy figure as it is shown: a share (0 to 1, what every built-in task reports) as a
    percentage, anything else on its own scale (a user metric may be 37.5 or negative), "-" for none."""
    if value is None:
        return "-"
    if 0 <= value <= 1:
        return f"{100 * value:.{decimals}f}%"
    return f"{value:.4g}"
