"""A target added as one module is picked up by the profile model and the registry with no other change
(the worked example of docs/adding-a-target.md)."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from device_agents.errors import RuntimeUnavailable
from device_agents.targets import TARGETS, get_target
from device_agents.targets.base import Target, count_unsupported
from edge_kit.errors import ConfigError
from edge_kit.profiles import load_profile


class ArmNN(Target):
    key: ClassVar[str] = "armnn"
    accelerator: ClassVar[str] = "gpu"
    summary: ClassVar[str] = "Arm NN delegate (Mali GPU, NEON CPU)"
    library: ClassVar[str | None] = "libarmnnDelegate.so"
    install_hint: ClassVar[str] = "install Arm NN's delegate"

    @classmethod
    def rule_check(cls, stats: Any) -> dict[str, Any]:
        return count_unsupported(stats, frozenset({"CONV_2D"}))


PROFILE = """\
name: mali-board
description: a board with a Mali GPU
hardware: {{arch: aarch64, cpu: Cortex-A76, cores: 4, ram_mb: 4096, accelerator: {acc}}}
runtime: {{engine: litert, delegate: armnn, threads: 4}}
variants: [fp32, fp16]
power: {{sensors: [hwmon], idle_w: 2, busy_w: 6}}
"""


def test_a_registered_target_is_a_valid_delegate_for_the_hardware_it_needs(tmp_path, monkeypatch):
    monkeypatch.setitem(TARGETS, "armnn", ArmNN)
    good = tmp_path / "mali-board.yaml"
    good.write_text(PROFILE.format(acc="gpu"))
    assert load_profile(good).runtime.delegate == "armnn"
    bad = tmp_path / "cpu-board.yaml"
    bad.write_text(PROFILE.format(acc="none"))
    with pytest.raises(ConfigError, match="runtime.delegate armnn needs hardware.accelerator: gpu"):
        load_profile(bad)
    with pytest.raises(RuntimeUnavailable, match="libarmnnDelegate.so, which could not be loaded.*install Arm NN"):
        get_target("armnn").interpreter_options(object())


def test_an_unregistered_delegate_is_refused_with_the_known_ones(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(PROFILE.format(acc="gpu"))
    with pytest.raises(ConfigError, match="unknown delegate 'armnn'.*valid: xnnpack, none, edgetpu, gpu"):
        load_profile(path)
