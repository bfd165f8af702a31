"""What the device was doing while it was measured: governor, clock, temperature, throttling, load,
and on a Jetson its power mode (``nvpmodel -q``) and whether ``jetson_clocks`` pinned the clocks.

Each reader returns None where the platform does not expose the value; nothing is guessed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

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


def _command(argv: list[str]) -> str | None:
    """Return the stdout of ``argv`` (found on PATH, 5 s timeout), or None when absent or failing."""
    exe = shutil.which(argv[0])
    if not exe:
        return None
    try:
        done = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 and done.stdout.strip() else None


def jetson_power_mode(run: Callable[[list[str]], str | None] = _command) -> dict[str, Any] | None:
    """Return the Jetson power mode from ``nvpmodel -q`` as ``{"name": "15W", "id": 0}`` (``id`` None
    when the output holds no number), or None off-Jetson or when the output has no ``NV Power Mode`` line."""
    out = run(["nvpmodel", "-q"])
    if not out:
        return None
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("NV Power Mode:"):
            name = line.split(":", 1)[1].strip()
            follow = lines[i + 1] if i + 1 < len(lines) else ""
            return {"name": name, "id": int(follow) if follow.isdigit() else None}
    return None


def jetson_clocks_on(run: Callable[[list[str]], str | None] = _command) -> bool | None:
    """Return whether ``jetson_clocks`` pinned the clocks, read from ``jetson_clocks --show``: True when every
    CPU, GPU and EMC line there has MinFreq equal to MaxFreq (what jetson_clocks sets), False otherwise; None
    off-Jetson or when the command cannot run (it needs root: run the agent as root, or the figure stays None)."""
    out = run(["jetson_clocks", "--show"])
    if not out:
        return None
    pinned = []
    for line in out.splitlines():
        line = line.strip()
        if not (line.startswith("cpu") or line.startswith("GPU") or line.startswith("EMC")) or "MinFreq=" not in line:
            continue
        if line.startswith("cpu") and "Online=0" in line:
            continue
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        pinned.append(fields.get("MinFreq") == fields.get("MaxFreq"))
    return all(pinned) if pinned else None


def snapshot(sys_root: Path = SYS, run: Callable[[list[str]], str | None] = _command) -> dict[str, Any]:
    """Return the current conditions as a dict (values None where not exposed; ``power_mode`` and
    ``jetson_clocks`` are None off-Jetson). ``run`` runs a command and returns its stdout (tests fake it)."""
    return {
        "cpu_governor": cpu_governor(sys_root),
        "cpu_freq_mhz": cpu_freq_mhz(sys_root),
        "temperature_c": max_temperature_c(sys_root),
        "throttling": throttling(),
        "load_1m": round(os.getloadavg()[0], 2),
        "power_mode": jetson_power_mode(run),
        "jetson_clocks": jetson_clocks_on(run),
    }
