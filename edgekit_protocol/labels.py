"""The one spelling of every label a record or report carries.

``str`` enums: a member compares equal to its value and serialises as it, so records on the wire
and rows in the history hold plain strings.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Any


class StrEnum(str, Enum):
    """A string enum whose ``str()`` is its value (Python 3.10 has no ``enum.StrEnum``)."""

    def __str__(self) -> str:
        return str(self.value)


class PowerSource(StrEnum):
    """Where a power figure came from, when no named sensor measured it."""

    ESTIMATED = "estimated"  # idle_w + (busy_w - idle_w) x CPU use, from the profile's figures
    NOT_MEASURED = "not measured"


MAX_SENSOR_CHARS = 64  # a sensor's key is a short name (ina219, tegrastats); a device may send any text


def power_source(power: dict) -> str:
    """Return the label of a bench record's ``power`` block: the sensor's key (cut to :data:`MAX_SENSOR_CHARS`,
    saying how long it was), or a :class:`PowerSource`."""
    if power.get("sensor"):
        return clip(str(power["sensor"]), MAX_SENSOR_CHARS)
    return str(PowerSource.ESTIMATED if power.get("estimated") else PowerSource.NOT_MEASURED)


def accuracy_text(value: float | None, decimals: int = 2) -> str:
    """Return an accuracy figure as it is shown: a share (0 to 1, what every built-in task reports) as a
    percentage, anything else on its own scale (a user metric may be 37.5 or negative), "-" for none."""
    if value is None:
        return "-"
    if 0 <= value <= 1:
        return f"{100 * value:.{decimals}f}%"
    return f"{value:.4g}"


# C0 and C1 controls (ESC starts colour, OSC 8 hyperlinks, OSC 52 clipboard writes; CR and newlines
# overwrite or forge lines), DEL, the bidirectional marks and overrides that reorder what a line seems to say,
# the invisible characters that make one name look like another (soft hyphen, zero-width space and joiners,
# word joiner and invisible operators, byte order mark, Mongolian vowel separator), and lone UTF-16
# surrogates (no UTF-8 form: writing one raises; decode refuses them, but text may come by another way).
_UNPRINTABLE = re.compile(
    "[\x00-\x1f\x7f-\x9f\xad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff"
    "\ud800-\udfff]"
)


def printable(value: Any) -> str:
    """Return ``str(value)`` with every control character shown as ``\\xNN`` (``\\uNNNN``): what a device, a
    fleet file or a model file says cannot drive the terminal it is shown on (colours, links, the clipboard,
    rewritten or forged lines), whether the CLI prints it or someone reads /metrics with curl."""
    text = value if isinstance(value, str) else str(value)
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


def clip(text: str, limit: int) -> str:
    """Return ``text`` when it has at most ``limit`` characters, else its first ``limit`` and how long it was: a
    device's field may be as long as its payload (64 KiB), and alerts, table cells and stored reasons stay short."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"
