"""Power sensor plugins read from fake sysfs trees and a fake vcgencmd."""

from __future__ import annotations

import stat
import time

import pytest

from device_agents.power import (
    EstimateMeter,
    SensorEnv,
    SensorMeter,
    find_sensor,
    power_meter,
)
from device_agents.power.sensors import Ina3221, Pi5Pmic, Rapl

PMIC_OUTPUT = """\
   3V7_WL_SW_A current(0)=0.00000000A
   3V3_SYS_A current(1)=0.06051600A
   VDD_CORE_A current(7)=1.20000000A
   3V7_WL_SW_V volt(8)=3.69840000V
   3V3_SYS_V volt(9)=3.31120000V
   VDD_CORE_V volt(15)=0.80000000V
   EXT5V_V volt(24)=5.13000000V
"""


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def jetson_tree(root, with_label=True):
    hw = root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    for n, (label, mv, ma) in enumerate([("VDD_IN", 5000, 1200), ("VDD_CPU_GPU_CV", 5000, 400)], start=1):
        if with_label:
            write(hw / f"in{n}_label", label + "\n")
        write(hw / f"in{n}_input", f"{mv}\n")
        write(hw / f"curr{n}_input", f"{ma}\n")
    return hw


def test_ina3221_prefers_the_module_input_rail(tmp_path):
    jetson_tree(tmp_path)
    sensor = find_sensor(["ina3221"], SensorEnv(tmp_path))
    assert isinstance(sensor, Ina3221) and "VDD_IN" in sensor.description
    assert sensor.read() == pytest.approx(6.0)  # 5 V x 1.2 A


def test_ina3221_without_labels_sums_the_channels(tmp_path):
    jetson_tree(tmp_path, with_label=False)
    assert find_sensor(["ina3221"], SensorEnv(tmp_path)).read() == pytest.approx(8.0)


def test_pi5_pmic_sums_rails_with_both_current_and_voltage(tmp_path):
    watts = Pi5Pmic.parse(PMIC_OUTPUT)
    assert watts == pytest.approx(0.060516 * 3.3112 + 1.2 * 0.8)
    fake = tmp_path / "vcgencmd"
    fake.write_text(f"#!/bin/sh\n[ \"$1\" = pmic_read_adc ] || exit 1\ncat <<'OUT'\n{PMIC_OUTPUT}OUT\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    sensor = find_sensor(["pi5-pmic"], SensorEnv(tmp_path, str(fake)))
    assert sensor is not None and sensor.read() == pytest.approx(watts)


def test_pi5_pmic_is_skipped_when_vcgencmd_is_missing_or_says_nothing(tmp_path):
    assert find_sensor(["pi5-pmic"], SensorEnv(tmp_path, str(tmp_path / "absent"))) is None
    fake = tmp_path / "vcgencmd"
    fake.write_text("#!/bin/sh\necho 'error=1 error_msg=\"Command not registered\"'\n")
    fake.chmod(0o755)
    assert find_sensor(["pi5-pmic"], SensorEnv(tmp_path, str(fake))) is None


def test_ina219_is_found_by_hwmon_name_and_reads_microwatts(tmp_path):
    write(tmp_path / "sys/class/hwmon/hwmon0/name", "cpu_thermal\n")
    write(tmp_path / "sys/class/hwmon/hwmon1/name", "ina219\n")
    write(tmp_path / "sys/class/hwmon/hwmon1/power1_input", "2450000\n")
    sensor = find_sensor(["ina219"], SensorEnv(tmp_path))
    assert sensor.key == "ina219" and sensor.read() == pytest.approx(2.45)


def test_rapl_turns_the_energy_counter_into_joules_across_a_wrap(tmp_path):
    zone = tmp_path / "sys/class/powercap/intel-rapl:0"
    write(zone / "energy_uj", "999000000\n")
    write(zone / "max_energy_range_uj", "1000000000\n")
    write(tmp_path / "sys/class/powercap/intel-rapl:0:0/energy_uj", "5\n")  # a sub-zone: not summed
    sensor = find_sensor(["rapl"], SensorEnv(tmp_path))
    assert isinstance(sensor, Rapl) and sensor.kind == "energy"
    assert sensor.read() == 0.0
    write(zone / "energy_uj", "2000000\n")  # wrapped: 1 J to the top, then 2 J
    assert sensor.read() == pytest.approx(3.0)


def test_first_sensor_that_answers_wins_in_the_configured_order(tmp_path):
    jetson_tree(tmp_path)
    write(tmp_path / "sys/class/hwmon/hwmon1/name", "ina219\n")
    write(tmp_path / "sys/class/hwmon/hwmon1/power1_input", "1000000\n")
    assert find_sensor(["ina219", "ina3221"], SensorEnv(tmp_path)).key == "ina219"
    assert find_sensor(["rapl", "ina3221"], SensorEnv(tmp_path)).key == "ina3221"
    with pytest.raises(ValueError, match="unknown power sensor 'ina3220'"):
        find_sensor(["ina3220"], SensorEnv(tmp_path))


def test_sampled_meter_averages_and_gives_energy_per_inference(tmp_path):
    write(tmp_path / "sys/class/hwmon/hwmon0/power1_input", "4000000\n")
    meter = power_meter(["hwmon"], SensorEnv(tmp_path))
    assert isinstance(meter, SensorMeter)
    meter.interval_s = 0.01
    meter.start()
    time.sleep(0.1)
    rec = meter.stop(runs=10)
    assert rec["measured"] and not rec["estimated"] and rec["sensor"] == "hwmon"
    assert rec["avg_w"] == pytest.approx(4.0) and rec["samples"] >= 3
    assert rec["energy_per_inference_mj"] == pytest.approx(4.0 * rec["seconds"] / 10 * 1000, rel=0.05)


def test_without_a_sensor_the_estimate_is_labelled_with_its_model(tmp_path):
    meter = power_meter(["hwmon", "rapl"], SensorEnv(tmp_path), idle_w=2.0, busy_w=6.0, cores=1, profile="rpi4")
    assert isinstance(meter, EstimateMeter)
    wall, cpu = time.perf_counter(), time.thread_time()
    meter.start()
    end = time.thread_time() + 0.1
    while time.thread_time() < end:  # keep this thread busy for 0.1 CPU-s, however the machine's other load shares it
        pass
    rec = meter.stop(runs=100)
    use = (time.thread_time() - cpu) / (time.perf_counter() - wall)  # what the meter saw, from outside its window
    assert rec["estimated"] and not rec["measured"] and rec["sensor"] is None
    assert rec["method"].startswith("estimated: idle_w + (busy_w - idle_w) x CPU use, profile rpi4")
    assert rec["cpu_use"] > 0.05 and abs(rec["cpu_use"] - min(use, 1.0)) < 0.1, (rec, use)
    assert rec["avg_w"] == pytest.approx(2.0 + 4.0 * rec["cpu_use"], abs=1e-3)
    assert power_meter(["hwmon"], SensorEnv(tmp_path)) is None  # no sensor, no figures: nothing to estimate from


def test_the_estimate_counts_the_benchmarks_threads_not_the_agents_other_work():
    """The agent serves and publishes while it benchmarks: a busy thread started before the meter (a
    serving thread, a served model's worker pool) is not the benchmark's CPU; a worker thread the
    runtime starts after the meter was made (the pool of the model under test) is."""
    import _thread
    import hashlib
    import threading

    stop = threading.Event()
    block = bytes(1 << 20)
    spent = {}  # CPU seconds each spinning thread has used so far, by its name

    def spin(name, seconds=1e9):
        end = time.monotonic() + seconds
        while not stop.is_set() and time.monotonic() < end:
            hashlib.sha256(block).digest()  # CPU without the GIL, as a runtime's worker does
            spent[name] = time.thread_time()

    def cpu_s(rec):  # the CPU seconds the estimate counted
        return rec["cpu_use"] * rec["seconds"] * 2

    threading.Thread(target=spin, args=("serving",), daemon=True).start()
    _thread.start_new_thread(spin, ("other pool",))  # a native pool of another model: no threading.Thread
    try:
        meter = EstimateMeter(2.0, 6.0, cores=2)
        time.sleep(0.05)
        others = sum(spent.values())
        meter.start()
        time.sleep(0.3)  # the benchmark's thread idle: only the others are busy
        idle = meter.stop(runs=1)
        assert sum(spent.values()) - others > 0.03  # they did work meanwhile
        assert cpu_s(idle) < 0.01, idle["method"]
        assert "CPU time of the benchmark's 1 thread(s)" in idle["method"]

        meter = EstimateMeter(2.0, 6.0, cores=2)
        _thread.start_new_thread(spin, ("pool",))  # the pool of the model under test, started after the meter
        meter.start()
        time.sleep(0.3)
        pool = meter.stop(runs=1)
        assert spent["pool"] > 0.03
        assert cpu_s(pool) == pytest.approx(spent["pool"], abs=0.02), pool["method"]
        assert "benchmark's 2 thread(s)" in pool["method"]
    finally:
        stop.set()


def test_the_estimate_divides_the_cpu_time_by_the_cores_it_ran_on_and_scales_to_the_profiles():
    """A simulated rpi4 (4 cores) benchmarked on a host with fewer cores than the profile: its CPU use was the
    CPU time of its threads, measured on the host's cores, divided by the profile's 4 cores, so a benchmark whose 2
    threads kept every core it could use busy read as a quarter busy (the host's cores, not the device, were the
    bound). Now it is divided by the cores its threads could use here, then scaled to the share of the profile's
    cores those threads use on the device (2 of 4: half busy), and the method says both. Here the threads are
    pinned to one core of this machine, which stands for a host smaller than the profile."""
    import _thread
    import hashlib
    import os
    import threading

    stop = threading.Event()
    block = bytes(1 << 20)
    spent = {}  # CPU seconds each spinning thread has used so far

    def spin(n):
        while not stop.is_set():
            hashlib.sha256(block).digest()  # CPU without the GIL, as a runtime's worker does
            spent[n] = time.thread_time()

    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})  # this thread and the ones it starts: one core
    try:
        meter = EstimateMeter(2.0, 6.0, cores=4, profile="rpi4", threads=2)
        for n in range(2):  # the runtime's pool for the model under test: 2 threads, as bench.threads says
            _thread.start_new_thread(spin, (n,))
        time.sleep(0.05)
        meter.start()
        at_start = sum(spent.values())
        time.sleep(0.8)
        rec = meter.stop(runs=1)
        got = (sum(spent.values()) - at_start) / rec["seconds"]  # the share of its one core the pool got
    finally:
        stop.set()
        os.sched_setaffinity(0, before)
    assert got > 0.1  # the core was not taken by others all along (a shared machine)
    # the cores it could use here were kept busy `got` of the time; on the device its 2 threads use 2 of 4 cores.
    # Before, it was CPU time / wall time / the profile's 4 cores: got / 4, half of this.
    assert rec["cpu_use"] == pytest.approx(got * 2 / 4, rel=0.25), rec["method"]
    assert rec["avg_w"] == pytest.approx(2.0 + 4.0 * rec["cpu_use"], abs=1e-3)
    assert ("/ wall time / 1 core(s) its 2 thread(s) could use on this machine (1 here) x 2 of the profile's 4 cores "
            "they use on the device") in rec["method"], rec["method"]
    assert "per-thread CPU clocks of this machine" in rec["method"], rec["method"]

    meter = EstimateMeter(2.0, 6.0, cores=4, profile="rpi4", threads=1)  # one thread: one core here and there
    meter.start()
    time.sleep(0.05)
    same = meter.stop(runs=1)
    assert same["method"].endswith("per-thread CPU clocks of this machine / wall time / 4 cores)"), same["method"]


def test_without_the_profiles_core_count_the_estimate_is_over_the_cores_the_agent_may_use(monkeypatch):
    """The fallback was the machine's core count while the CPU use is measured over the cores the process may use:
    an agent limited to 1 of 8 cores (taskset, a cgroup cpuset) read a fully busy core as 1/8 busy."""
    import os

    from device_agents import power

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    meter = power.power_meter((), idle_w=2.0, busy_w=6.0, cores=None)
    assert isinstance(meter, power.EstimateMeter) and meter.cores == 1
    assert power.power_meter((), idle_w=2.0, busy_w=6.0, cores=4).cores == 4  # the profile's, when it says
