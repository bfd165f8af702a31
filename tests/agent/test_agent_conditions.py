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
