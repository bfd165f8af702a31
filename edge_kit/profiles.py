"""Device profiles: what a device is, how models run on it, which variants to build, its service level.

Profiles are YAML files (``profiles/<name>.yaml`` in the source tree, shipped inside the wheel as
``edge_kit/_profiles``). ``load_profile`` accepts a bundled name or a path to a file of your own.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from device_agents.power.sensors import SENSORS
from device_agents.targets import TARGETS
from edge_kit.config import StrictModel, closest, load_yaml_model
from edge_kit.errors import ConfigError, EdgeKitError
from edge_kit.variants import TARGET_NAMES, parse_variant
from edgekit_protocol.config import MAX_LATENCY_MS, MAX_MEGABYTES, MAX_WATTS

# Keys of the device agent's power-sensor plugins (the agent's registry is the one source).
POWER_SENSORS = tuple(SENSORS)
# Accelerators and delegates come from the target plugins (device_agents.targets): one place.
ACCELERATORS = tuple(dict.fromkeys(["none", *(t.accelerator for t in TARGETS.values())]))


def _one_of(value: str, valid: tuple[str, ...], what: str) -> str:
    if value not in valid:
        hint = closest(value, valid)
        raise ValueError(f"unknown {what} '{value}'" + (f"; did you mean '{hint}'?" if hint else "")
                         + f" (valid: {', '.join(valid)})")
    return value


class Hardware(StrictModel):
    arch: Literal["aarch64", "armv7l", "x86_64"]
    cpu: str | None = None  # the CPU's name (cortex-a72), for people: nothing reads it
    cores: int = Field(gt=0, le=4096)
    ram_mb: int = Field(gt=0, le=MAX_MEGABYTES)
    accelerator: str = "none"  # one of ACCELERATORS

    @field_validator("accelerator")
    @classmethod
    def _known_accelerator(cls, value: str) -> str:
        return _one_of(value, ACCELERATORS, "accelerator")


class Runtime(StrictModel):
    engine: Literal["litert", "tflite-runtime"] = "litert"
    delegate: str = "xnnpack"  # a target plugin's key
    options: dict[str, Any] = Field(default_factory=dict)  # checked by the target's own config model
    threads: int = Field(default=1, ge=1, le=64)

    @field_validator("delegate")
    @classmethod
    def _known_target(cls, value: str) -> str:
        return _one_of(value, tuple(TARGETS), "delegate")

    @model_validator(mode="after")
    def _target_options(self) -> Runtime:
        try:
            TARGETS[self.delegate].options(self.options, "runtime")
        except EdgeKitError as exc:  # "runtime: options.x: ..." -> pydantic adds file, line and "runtime"
            raise ValueError(f"delegate {self.delegate}: {str(exc).split(': ', 1)[-1]}") from None
        return self


class Constraints(StrictModel):
    """Service level. Every bound is optional; an absent bound does not constrain."""

    max_latency_p90_ms: float | None = Field(default=None, gt=0, le=MAX_LATENCY_MS)
    max_power_w: float | None = Field(default=None, gt=0, le=MAX_WATTS)
    min_accuracy_ratio: float | None = Field(default=None, gt=0, le=1)
    max_model_mb: float | None = Field(default=None, gt=0, le=MAX_MEGABYTES)
    # worst output's SNR against fp32 on the eval set (label-free): catches an int8 that "detects nothing"
    min_fidelity_snr_db: float | None = Field(default=None)


class Storage(StrictModel):
    """The device's model store budget: after an activation the agent removes the oldest models
    beyond it (never ``current``, ``previous`` or a candidate of the last tune). None: no budget."""

    max_store_mb: float | None = Field(default=None, gt=0, le=MAX_MEGABYTES)


class Power(StrictModel):
    """Power sensing. ``idle_w``/``busy_w`` feed only estimates, which are always marked ``estimated``."""

    sensors: list[str] = Field(default_factory=list)
    idle_w: float = Field(gt=0, le=MAX_WATTS)
    busy_w: float = Field(gt=0, le=MAX_WATTS)

    @field_validator("sensors")
    @classmethod
    def _known_sensors(cls, sensors: list[str]) -> list[str]:
        for s in sensors:
            if s not in POWER_SENSORS:
                hint = closest(s, POWER_SENSORS)
                raise ValueError(
                    f"unknown power sensor '{s}'" + (f"; did you mean '{hint}'?" if hint else "")
                    + f" (valid: {', '.join(POWER_SENSORS)})"
                )
        return sensors

    @model_validator(mode="after")
    def _busy_above_idle(self) -> Power:
        if self.busy_w < self.idle_w:
            raise ValueError(f"busy_w ({self.busy_w}) must be at least idle_w ({self.idle_w})")
        return self


PROFILE_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")


class Profile(StrictModel):
    name: str  # PROFILE_NAME; a file without a name: key is named by its file name (load_profile)
    description: str
    hardware: Hardware
    runtime: Runtime = Runtime()
    variants: list[str] = Field(min_length=1)
    # the targets that run its variants, most preferred first: what selection prefers when two variants'
    # figures tie; left out, the order in which ``variants`` first names each (see target_order)
    targets: list[str] | None = None
    constraints: Constraints = Constraints()
    storage: Storage = Storage()
    power: Power

    @field_validator("name")
    @classmethod
    def _profile_name(cls, name: str) -> str:
        """Return ``name``. Raises ValueError: it is not :data:`PROFILE_NAME`; the message says the rule and one to
        give."""
        if not PROFILE_NAME.fullmatch(name):
            like = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "my-device"
            raise ValueError(f"'{name}' is not a profile name (lowercase letters, digits and '-', starting with a letter "
                             f"or digit); give name: {like} (a file without a name: key is named by its file name)")
        return name

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, variants: list[str]) -> list[str]:
        for v in variants:
            parse_variant(v)
        if len(set(variants)) != len(variants):
            raise ValueError(f"variants listed twice: {sorted({v for v in variants if variants.count(v) > 1})}")
        return variants

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, targets: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if targets is None:
            return None
        for t in targets:
            _one_of(t, TARGET_NAMES, "target")
        if len(set(targets)) != len(targets):
            raise ValueError(f"listed twice: {sorted({t for t in targets if targets.count(t) > 1})}")
        for variant in info.data.get("variants", ()):  # checked before (declared first); absent when invalid
            target = parse_variant(variant).target
            if target not in targets:
                raise ValueError(f"variant '{variant}' runs on {target}, which is not listed")
        return targets

    def as_dict(self) -> dict[str, Any]:
        """Return the profile as plain data, ``targets`` as it is in effect (:attr:`target_order`)."""
        return {**self.model_dump(), "targets": list(self.target_order)}

    @property
    def target_order(self) -> tuple[str, ...]:
        """Return the targets most preferred first: ``targets``, or, left out, the order in which
        ``variants`` first names each."""
        if self.targets is not None:
            return tuple(self.targets)
        return tuple(dict.fromkeys(parse_variant(v).target for v in self.variants))

    @model_validator(mode="after")
    def _accelerator_matches(self) -> Profile:
        acc = self.hardware.accelerator
        for variant in self.variants:
            needs = parse_variant(variant).accelerator
            if needs and needs != acc:
                raise ValueError(f"variant '{variant}' needs hardware.accelerator: {needs}")
        needs = TARGETS[self.runtime.delegate].accelerator
        if needs != "none" and needs != acc:
            raise ValueError(f"runtime.delegate {self.runtime.delegate} needs hardware.accelerator: {needs}")
        return self


def profiles_dir() -> Path:
    """Return the folder of bundled profiles (inside the wheel, or the source tree's ``profiles/``)."""
    here = Path(__file__).resolve().parent
    packaged = here / "_profiles"
    return packaged if packaged.is_dir() else here.parent / "profiles"


def bundled_profiles() -> list[str]:
    """Return the names of the bundled profiles, sorted."""
    return sorted(p.stem for p in profiles_dir().glob("*.yaml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a bundled profile by name, or a profile YAML file by path.

    Returns:
        The validated profile (a file read before and unchanged since, by its stat, is not parsed again). A file's
        ``name`` defaults to its stem.

    Raises:
        ConfigError: no such profile (with the closest bundled name), or the file is invalid.
    """
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith((".yaml", ".yml")) or path.exists()):
        path = profiles_dir() / f"{text}.yaml"
        if not path.exists():
            names = bundled_profiles()
            hint = closest(text, names)
            raise ConfigError(
                f"unknown profile '{text}'" + (f"; did you mean '{hint}'?" if hint else "")
                + f" (bundled: {', '.join(names)}; or give a path to a .yaml file)"
            )
    # read again only when the file changed: a deploy asks for each device's profile four times (16 devices: 60 ms)
    try:
        st = path.stat()
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    except OSError:
        stamp = None  # load_yaml_model says why
    known = _loaded.get(os.fspath(path))
    if stamp is not None and known is not None and known[0] == stamp:
        return known[1].model_copy(deep=True)  # a copy: its lists and dicts are the caller's to change
    profile = load_yaml_model(path, Profile, defaults={"name": path.stem})
    if stamp is not None:
        _loaded[os.fspath(path)] = (stamp, profile.model_copy(deep=True))
    return profile


# path -> (the file's stat when it was read, the profile read from it): what load_profile read, by file
_loaded: dict[str, tuple[tuple[int, ...], Profile]] = {}
