import re
from pathlib import Path

import pytest

from edge_kit.errors import ConfigError
from edge_kit.profiles import POWER_SENSORS, bundled_profiles, load_profile

GOOD = """\
name: mine
description: test board
hardware: {arch: aarch64, cpu: a53, cores: 4, ram_mb: 1024}
runtime:
  engine: litert
  delegate: xnnpack
  threads: 2
variants: [fp32, int8]
constraints: {max_latency_p90_ms: 30}
power: {sensors: [hwmon], idle_w: 1.0, busy_w: 3.0}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    return path


def test_every_bundled_profile_is_valid_and_named_after_its_file():
    names = bundled_profiles()
    assert {"rpi4", "rpi5", "jetson-orin-nano", "coral-usb", "coral-devboard", "host-x86-64"} <= set(names)
    for name in names:
        profile = load_profile(name)
        assert profile.name == name
        assert set(profile.power.sensors) <= set(POWER_SENSORS)


def test_coral_profiles_build_the_edgetpu_variant_and_target_the_tpu():
    for name in ("coral-usb", "coral-devboard"):
        p = load_profile(name)
        assert "edgetpu" in p.variants and p.hardware.accelerator == "edgetpu"


def test_a_valid_file_loads_with_defaults(tmp_path):
    p = load_profile(write(tmp_path, GOOD))
    assert p.runtime.threads == 2 and p.constraints.max_power_w is None and p.hardware.accelerator == "none"


def test_misspelled_key_names_file_line_key_and_closest_valid_name(tmp_path):
    path = write(tmp_path, GOOD.replace("  delegate: xnnpack", "  delegat: xnnpack"))
    with pytest.raises(ConfigError) as exc:
        load_profile(path)
    assert str(exc.value) == f"{path}:6: runtime.delegat: unknown key; did you mean 'delegate'?"


@pytest.mark.parametrize("file, text, said", [
    ("My_Pi.yaml", GOOD.replace("name: mine\n", ""), "My_Pi.yaml:1: name: 'My_Pi' is not a profile name (lowercase "
     "letters, digits and '-', starting with a letter or digit); give name: my-pi (a file without a name: key is named "
     "by its file name)"),
    ("mine.yaml", GOOD.replace("name: mine", "name: Pi 4.v2"), "mine.yaml:1: name: 'Pi 4.v2' is not a profile name "
     "(lowercase letters, digits and '-', starting with a letter or digit); give name: pi-4-v2"),
])
def test_a_name_that_is_no_profile_name_says_the_rule_and_one_to_give(tmp_path, file, text, said):
    """Said as pydantic's "String should match pattern '^[a-z0-9][a-z0-9-]*$'", nothing on what to do; and for a
    name taken from the file's name (my_pi.yaml, no name: key) at a line of the file that has no name at all."""
    path = tmp_path / file
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_profile(path)
    assert str(exc.value).startswith(f"{tmp_path}/{said}")


@pytest.mark.parametrize("extra, line, key", [("constraints: {max_latency_p90_ms: 5000}\n", 11, "constraints"),
                                             ("", 8, "runtime.threads")])
def test_a_key_given_twice_is_refused_not_silently_the_last(tmp_path, run_cli, extra, line, key):
    """A profile with a second `constraints:` line (a pasted block) loaded with the second alone: PyYAML keeps
    the last of two equal keys without a word, so a 50 ms bound became 5000 ms; fleet files read the same way."""
    text = GOOD + extra if extra else GOOD.replace("  threads: 2", "  threads: 2\n  threads: 4")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_profile(path)
    assert str(exc.value) == f"{path}:{line}: {key}: given twice (YAML would keep only the last); remove one"
    code, out, err = run_cli("profiles", "check", path, "--json")
    assert code == 2 and err == f"edgekit: error: {exc.value}\n"


def test_misspelled_top_level_key(tmp_path):
    path = write(tmp_path, GOOD.replace("constraints:", "constraint:"))
    with pytest.raises(ConfigError, match=r"mine.yaml:9: constraint: unknown key; did you mean 'constraints'\?"):
        load_profile(path)


def test_the_count_of_further_problems_is_not_read_as_more_valid_keys(tmp_path):
    """'valid keys: a, b (and 5 more)' read as five more valid keys; it counts the file's other problems."""
    path = write(tmp_path, "name: x\nbogus: 1\n")
    with pytest.raises(ConfigError) as exc:
        load_profile(path)
    assert str(exc.value).startswith(f"{path}:2: bogus: unknown key") and str(exc.value).endswith(
        "(and 4 more problems in the file: description missing, hardware missing, variants missing and 1 more)"), \
        exc.value


def test_the_further_problems_are_named_by_key(tmp_path):
    """'(and 1 more problem in the file)' left the user to find it in another run: it is named."""
    path = write(tmp_path, GOOD.replace("constraints:", "constraint:").replace("[fp32, int8]", "[fp32, int-8]"))
    with pytest.raises(ConfigError) as exc:
        load_profile(path)
    assert re.search(r"did you mean 'constraints'\? \(and 1 more problem in the file: variants invalid\)$",
                     str(exc.value)), exc.value


def test_unknown_variant_suggests_the_closest(tmp_path):
    path = write(tmp_path, GOOD.replace("[fp32, int8]", "[fp32, int-8]"))
    with pytest.raises(ConfigError, match=r"mine.yaml:8: variants: unknown variant 'int-8'; did you mean 'int8'\?"):
        load_profile(path)


def test_missing_field_is_named_with_its_line(tmp_path):
    path = write(tmp_path, GOOD.replace("description: test board\n", ""))
    with pytest.raises(ConfigError, match=r"mine.yaml:\d+: description: required key is missing"):
        load_profile(path)


def test_wrong_type_and_range(tmp_path):
    path = write(tmp_path, GOOD.replace("threads: 2", "threads: 0"))
    with pytest.raises(ConfigError, match=r"mine.yaml:7: runtime.threads: .*greater than or equal to 1"):
        load_profile(path)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_a_bound_of_nan_or_infinity_is_refused_not_taken_for_no_bound(tmp_path, value):
    path = write(tmp_path, GOOD.replace("max_latency_p90_ms: 30", f"max_latency_p90_ms: 30, min_fidelity_snr_db: {value}"))
    with pytest.raises(ConfigError, match=r"mine.yaml:9: constraints.min_fidelity_snr_db: .*finite number"):
        load_profile(path)


def test_edgetpu_variant_needs_an_edgetpu(tmp_path):
    path = write(tmp_path, GOOD.replace("[fp32, int8]", "[int8, edgetpu]"))
    with pytest.raises(ConfigError, match="edgetpu.*needs hardware.accelerator: edgetpu"):
        load_profile(path)


def test_unknown_power_sensor(tmp_path):
    path = write(tmp_path, GOOD.replace("[hwmon]", "[ina291]"))
    with pytest.raises(ConfigError, match="did you mean 'ina219'"):
        load_profile(path)


def test_yaml_syntax_error_has_a_line(tmp_path):
    path = write(tmp_path, GOOD.replace("variants: [fp32, int8]", "variants: [fp32, int8"))
    with pytest.raises(ConfigError, match=r"mine.yaml:\d+: not valid YAML"):
        load_profile(path)


def test_unknown_bundled_name_suggests_one():
    with pytest.raises(ConfigError, match="unknown profile 'rpi-4'; did you mean 'rpi4'"):
        load_profile("rpi-4")


def test_profiles_check_command_fails_on_a_bad_file(tmp_path, run_cli):
    path = write(tmp_path, GOOD.replace("cores: 4", "core: 4"))
    code, out, err = run_cli("profiles", "check", path)
    assert code == 2
    assert err.strip().startswith("edgekit: error:") and "hardware.core: unknown key; did you mean 'cores'" in err
    assert len(err.strip().splitlines()) == 1


def test_profiles_list_json(run_cli):
    import json

    code, out, _ = run_cli("profiles", "list", "--json")
    assert code == 0
    assert {p["name"] for p in json.loads(out)} >= {"rpi4", "coral-usb"}


DESIGN_EXAMPLE = """\
name: jetson-orin-nano
description: NVIDIA Jetson Orin Nano 8GB, JetPack 6
hardware: {arch: aarch64, cores: 6, ram_mb: 8192, accelerator: gpu}
targets: [tensorrt, onnxruntime, litert]          # in order of preference for ties
variants: [trt-fp16, trt-int8, onnx-fp32, onnx-int8, fp32, int8]
constraints: {max_latency_p90_ms: 20, max_power_w: 15, min_accuracy_ratio: 0.99,
              min_fidelity_snr_db: 20, max_model_mb: 256}
storage: {max_store_mb: 512}
power: {sensors: [ina3221, hwmon], idle_w: 5.0, busy_w: 12.0}
"""


def test_the_design_documents_profile_loads_with_its_targets(tmp_path):
    """The profile contract's own example (targets, no runtime section, no cpu name) was refused:
    'targets: unknown key'."""
    p = load_profile(write(tmp_path, DESIGN_EXAMPLE))
    assert p.target_order == ("tensorrt", "onnxruntime", "litert") and p.constraints.min_fidelity_snr_db == 20
    assert p.runtime.engine == "litert" and p.hardware.cpu is None
    assert load_profile(write(tmp_path, GOOD)).target_order == ("litert",)  # left out: as the variants name them
    assert load_profile("coral-usb").target_order[0] == "edgetpu"


@pytest.mark.parametrize("targets, error", [
    ("[tensorrt, onnxruntime]", r"mine.yaml:4: targets: variant 'fp32' runs on litert, which is not listed"),
    ("[tensorrt, onnxruntime, litert, tensorrt]", r"mine.yaml:4: targets: listed twice: \['tensorrt'\]"),
    ("[tensorrt, onnxruntime, litrt]", r"mine.yaml:4: targets: unknown target 'litrt'; did you mean 'litert'\?"),
])
def test_targets_that_miss_a_variant_repeat_or_are_unknown_are_refused(tmp_path, targets, error):
    with pytest.raises(ConfigError, match=error):
        load_profile(write(tmp_path, DESIGN_EXAMPLE.replace("[tensorrt, onnxruntime, litert]", targets)))


def test_a_profile_is_parsed_again_only_when_its_file_changed(tmp_path, monkeypatch):
    """A deploy asks for each device's profile four times: it was parsed and validated each time (60 ms of a 16-device
    redeploy). An edited file is read again; what a caller changes in its copy is not what the next caller gets."""
    import os

    import edge_kit.profiles as profiles

    parsed = []
    real = profiles.load_yaml_model
    monkeypatch.setattr(profiles, "load_yaml_model", lambda *a, **k: parsed.append(a[0]) or real(*a, **k))
    path = write(tmp_path, GOOD)
    first = load_profile(path)
    first.variants.append("int8-pruned-50")  # the caller's copy
    assert load_profile(path).variants == ["fp32", "int8"] and len(parsed) == 1
    assert load_profile("rpi4").name == load_profile("rpi4").name == "rpi4" and len(parsed) <= 2  # read before?
    parsed.clear()
    path.write_text(GOOD.replace("cores: 4", "cores: 8"))
    os.utime(path, ns=(1, 1))  # whatever the clock's resolution: another stat
    assert load_profile(path).hardware.cores == 8 and len(parsed) == 1
    path.write_text(GOOD.replace("cores: 4", "cores: 0"))
    with pytest.raises(ConfigError, match="cores"):
        load_profile(path)
