"""What the device was doing while it was measured: governor, clock, temperature, throttling, load.

Each reader returns None where the platform does not expose the value; nothing is guessed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

SYS = Path("/sys")  # tests pass a fake tree as sys_root


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cpu_governor(sys_root: Path = SYS) -> str | None:
    """Return cpu0's cpufreq scaling governor, or None."""
    return _read(sys_root / "devices/system/cpu/cpu0/cpufreq/scaling_governor")


def cpu_freq_mhz(sys_root: Path = SYS) -> float | None:
    """Return cpu0's current frequency in MHz (cpufreq), or None."""
    khz = _read(sys_root / "devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
    return round(int(khz) / 1000, 1) if khz and khz.isdigit() else None


def max_temperature_c(sys_root: Path = SYS) -> float | None:
    """Return the hottest thermal zone in degrees C, or None when there is none."""
    temps = []
    for zone in sorted((sys_root / "class/thermal").glob("thermal_zone*/temp")):
        raw = _read(zone)
        if raw and raw.lstrip("-").isdigit():
            temps.append(int(raw) / 1000)
    return max(temps) if temps else None


def throttling() -> dict[str, Any] | None:
    """Return Raspberry Pi throttling flags from ``vcgencmd get_throttled``, or None elsewhere."""
    exe = shutil.which("vcgencmd")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "get_throttled"], capture_output=True, text=True, timeout=5, check=True).stdout
        bits = int(out.strip().split("=")[1], 16)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return {"raw": hex(bits), "under_voltage": bool(bits & 0x1), "freq_capped": bool(bits & 0x2),
            "throttled": bool(bits & 0x4), "soft_temp_limit": bool(bits & 0x8)}


def snapshot(sys_root: Path = SYS) -> dict[str, Any]:
    """Return the current conditions as a dict (values None where not exposed)."""
    return {
        "cpu_governor": cpu_governor(sys_root),
        "cpu_freq_mhz": cpu_freq_mhz(sys_root),
        "temperature_c": max_temperature_c(sys_root),
        "throttling": throttling(),
        "load_1m": round(os.getloadavg()[0], 2),
    }
