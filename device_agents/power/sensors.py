"""Power sensor plugins. Each reads one kind of hardware through sysfs or a vendor tool.

Every sensor is found by :meth:`PowerSensor.probe` under a ``sys_root`` (``/`` on a device, a fake
tree in tests) and reads either instantaneous watts (``kind = "power"``, sampled during the timed
runs) or a cumulative energy counter in joules (``kind = "energy"``, read before and after).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

VCGENCMD_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class SensorEnv:
    """Where sensors are looked for: the sysfs root and the ``vcgencmd`` executable."""

    sys_root: Path = Path("/")
    vcgencmd: str = "vcgencmd"


def _read_number(path: Path) -> float:
    return float(path.read_text().strip())


class PowerSensor:
    """A plugin: ``key``, ``kind`` and how to find and read the sensor."""

    key: ClassVar[str]
    kind: ClassVar[str] = "power"  # "power": watts now; "energy": joules since some origin
    description: str = ""

    @classmethod
    def probe(cls, env: SensorEnv) -> PowerSensor | None:
        """Return a ready sensor when this hardware answers here, else None."""
        raise NotImplementedError

    def read(self) -> float:
        """Return watts (``power``) or cumulative joules (``energy``).

        Raises:
            OSError: the sensor stopped answering.
        """
        raise NotImplementedError


class Ina3221(PowerSensor):
    """NVIDIA Jetson module rails on the INA3221 (hwmon driver in JetPack 5+, iio in older ones).

    Uses the ``VDD_IN`` rail (the whole module's input) when it is labelled, else the sum of all
    channels: volts x amps per channel (``in<N>_input`` mV, ``curr<N>_input`` mA).
    """

    key = "ina3221"

    def __init__(self, channels: list[tuple[Path, Path]], description: str):
        self.channels = channels
        self.description = description

    @classmethod
    def probe(cls, env: SensorEnv) -> PowerSensor | None:
        for hw in sorted(env.sys_root.glob("sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*")):
            chans = {}
            for volt in sorted(hw.glob("in*_input")):
                n = volt.name[2:-6]
                curr = hw / f"curr{n}_input"
                if curr.exists():
                    label = (hw / f"in{n}_label").read_text().strip() if (hw / f"in{n}_label").exists() else f"in{n}"
                    chans[label] = (volt, curr)
            if chans:
                if "VDD_IN" in chans:
                    return cls([chans["VDD_IN"]], f"ina3221 VDD_IN rail ({hw})")
                return cls(list(chans.values()), f"ina3221 sum of {', '.join(chans)} ({hw})")
        return None

    def read(self) -> float:
        return sum(_read_number(v) * _read_number(c) for v, c in self.channels) / 1e6


_PMIC_LINE = re.compile(r"^\s*(\S+)_([AV])\s+(?:current|volt)\(\d+\)=([0-9.]+)[AV]\s*$")


class Pi5Pmic(PowerSensor):
    """Raspberry Pi 5 PMIC rails from ``vcgencmd pmic_read_adc``: the sum of volts x amps per rail.

    The PMIC sees the SoC and memory rails, not the USB/peripheral draw, so it reads lower than a
    meter at the wall; the record's sensor name says so.
    """

    key = "pi5-pmic"

    def __init__(self, vcgencmd: str):
        self.argv = [vcgencmd, "pmic_read_adc"]
        self.description = "pi5-pmic: sum of PMIC rails (vcgencmd pmic_read_adc; SoC and memory, not peripherals)"

    @staticmethod
    def parse(text: str) -> float:
        """Return total watts from ``pmic_read_adc`` output.

        Raises:
            ValueError: no rail has both a current and a voltage line.
        """
        amps: dict[str, float] = {}
        volts: dict[str, float] = {}
        for line in text.splitlines():
            m = _PMIC_LINE.match(line)
            if m:
                (amps if m.group(2) == "A" else volts)[m.group(1)] = float(m.group(3))
        rails = amps.keys() & volts.keys()
        if not rails:
            raise ValueError("no rail with both current and voltage in pmic_read_adc output")
        return sum(amps[r] * volts[r] for r in rails)

    @classmethod
    def probe(cls, env: SensorEnv) -> PowerSensor | None:
        if shutil.which(env.vcgencmd) is None:
            return None
        sensor = cls(env.vcgencmd)
        try:
            sensor.read()
        except (OSError, ValueError):
            return None
        return sensor

    def read(self) -> float:
        try:
            proc = subprocess.run(self.argv, capture_output=True, text=True, timeout=VCGENCMD_TIMEOUT_S, check=True)
        except (subprocess.SubprocessError, OSError) as exc:
            raise OSError(f"vcgencmd pmic_read_adc failed: {exc}") from None
        try:
            return self.parse(proc.stdout)
        except ValueError as exc:
            raise OSError(str(exc)) from None


class _HwmonPower(PowerSensor):
    """A hwmon device with ``power1_input`` or ``power1_average`` in microwatts."""

    names: ClassVar[tuple[str, ...] | None] = None  # hwmon ``name`` values to accept; None: any

    def __init__(self, path: Path, description: str):
        self.path = path
        self.description = description

    @classmethod
    def probe(cls, env: SensorEnv) -> PowerSensor | None:
        for hw in sorted(env.sys_root.glob("sys/class/hwmon/hwmon*")):
            name = (hw / "name").read_text().strip() if (hw / "name").exists() else ""
            if cls.names is not None and name not in cls.names:
                continue
            for fname in ("power1_input", "power1_average"):
                if (hw / fname).exists():
                    return cls(hw / fname, f"{cls.key}: {name or hw.name} {fname} ({hw})")
        return None

    def read(self) -> float:
        return _read_number(self.path) / 1e6


class Ina219(_HwmonPower):
    """An INA219 current/power monitor on I2C, through the kernel's ina2xx hwmon driver."""

    key = "ina219"
    names = ("ina219",)


class Hwmon(_HwmonPower):
    """Any hwmon device that reports power (e.g. ACPI power meters, some PMICs)."""

    key = "hwmon"


class Rapl(PowerSensor):
    """Linux powercap RAPL (Intel, and AMD since Zen): package energy counters in microjoules.

    Sums the top-level ``intel-rapl:<N>`` zones (one per CPU package) and handles counter wrap.
    """

    key = "rapl"
    kind = "energy"

    def __init__(self, zones: list[tuple[Path, float]]):
        self.zones = zones
        self.description = f"rapl: package energy counters ({', '.join(z.parent.name for z, _ in zones)})"
        self._last: list[float] = []
        self._total = 0.0

    @classmethod
    def probe(cls, env: SensorEnv) -> PowerSensor | None:
        zones = []
        for zone in sorted(env.sys_root.glob("sys/class/powercap/intel-rapl:*")):
            if zone.name.count(":") != 1 or not (zone / "energy_uj").exists():
                continue
            try:
                _read_number(zone / "energy_uj")  # root-only on kernels since 2020 (CVE-2020-8694)
            except (OSError, ValueError):
                continue
            rng = zone / "max_energy_range_uj"
            zones.append((zone / "energy_uj", _read_number(rng) if rng.exists() else 2.0 ** 32))
        return cls(zones) if zones else None

    def read(self) -> float:
        now = [_read_number(path) for path, _ in self.zones]
        if self._last:
            for (_, wrap), a, b in zip(self.zones, self._last, now):
                self._total += (b - a) if b >= a else (b + wrap - a)
        self._last = now
        return self._total / 1e6


SENSORS: dict[str, type[PowerSensor]] = {cls.key: cls for cls in (Ina3221, Pi5Pmic, Ina219, Rapl, Hwmon)}
