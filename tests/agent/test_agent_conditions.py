"""Device conditions read from a fake sysfs tree."""

from device_agents import conditions


def make_sysfs(root):
    cpu = root / "devices/system/cpu/cpu0/cpufreq"
    cpu.mkdir(parents=True)
    (cpu / "scaling_governor").write_text("performance\n")
    (cpu / "scaling_cur_freq").write_text("1500000\n")
    for i, t in enumerate(("48312", "51000")):
        zone = root / f"class/thermal/thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "temp").write_text(t + "\n")
    return root


def test_snapshot_reads_governor_clock_and_hottest_zone(tmp_path):
    snap = conditions.snapshot(make_sysfs(tmp_path))
    assert snap["cpu_governor"] == "performance"
    assert snap["cpu_freq_mhz"] == 1500.0
    assert snap["temperature_c"] == 51.0
    assert snap["load_1m"] >= 0


def test_missing_values_are_none_not_guesses(tmp_path):
    snap = conditions.snapshot(tmp_path)
    assert snap["cpu_governor"] is None and snap["cpu_freq_mhz"] is None and snap["temperature_c"] is None


NVPMODEL = "NV Fan Mode:quiet\nNV Power Mode: 15W\n0\n"
CLOCKS_OFF = """SOC family:tegra234  Machine:NVIDIA Jetson Orin Nano Developer Kit
Online CPUs: 0-5
cpu0: Online=1 Governor=schedutil MinFreq=115200 MaxFreq=1510400 CurrentFreq=729600 IdleStates: WFI=1 cpuidle=1
cpu1: Online=1 Governor=schedutil MinFreq=115200 MaxFreq=1510400 CurrentFreq=1510400 IdleStates: WFI=1 cpuidle=1
GPU MinFreq=306000000 MaxFreq=624750000 CurrentFreq=306000000
EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=3199000000 FreqOverride=0
NV Power Mode: 15W
"""
CLOCKS_ON = """SOC family:tegra234  Machine:NVIDIA Jetson Orin Nano Developer Kit
Online CPUs: 0-5
cpu0: Online=1 Governor=schedutil MinFreq=1510400 MaxFreq=1510400 CurrentFreq=1510400 IdleStates: WFI=0 cpuidle=0
cpu1: Online=1 Governor=schedutil MinFreq=1510400 MaxFreq=1510400 CurrentFreq=1510400 IdleStates: WFI=0 cpuidle=0
cpu5: Online=0 Governor=schedutil MinFreq=115200 MaxFreq=1510400 CurrentFreq=115200 IdleStates: WFI=0 cpuidle=0
GPU MinFreq=624750000 MaxFreq=624750000 CurrentFreq=624750000
EMC MinFreq=3199000000 MaxFreq=3199000000 CurrentFreq=3199000000 FreqOverride=1
NV Power Mode: 15W
"""


def fake(outputs):
    return lambda argv: outputs.get(argv[0])


def test_jetson_power_mode_and_clocks_from_command_output(tmp_path):
    snap = conditions.snapshot(tmp_path, run=fake({"nvpmodel": NVPMODEL, "jetson_clocks": CLOCKS_ON}))
    assert snap["power_mode"] == {"name": "15W", "id": 0}
    assert snap["jetson_clocks"] is True
    assert conditions.jetson_clocks_on(fake({"jetson_clocks": CLOCKS_OFF})) is False
    assert conditions.jetson_power_mode(fake({"nvpmodel": "NV Power Mode: MAXN\n"})) == {"name": "MAXN", "id": None}


def test_jetson_fields_are_none_off_jetson(tmp_path):
    snap = conditions.snapshot(tmp_path, run=fake({}))
    assert snap["power_mode"] is None and snap["jetson_clocks"] is None
    assert conditions.jetson_power_mode(fake({"nvpmodel": "garbage\n"})) is None
    assert conditions.jetson_clocks_on(fake({"jetson_clocks": "SOC family:tegra234\n"})) is None
