"""Compiler figures: size, accuracy, pruning and shared-variant cost, each as a ratio to its baseline
measured in the same run."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from edge_kit.compiler.pipeline import CompileRequest, compile_model
from edge_kit.profiles import Profile, load_profile

THREE = ["rpi4", "coral-usb", "jetson-orin-nano"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from edge_kit.examples import digits

    return digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def compiled(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("art")
    m = compile_model(CompileRequest(digits.model, [load_profile(p) for p in THREE], out,
                                     calib=digits.calib, eval=digits.eval, train=digits.train))
    return out / "digits", m


def _median_latency_us(path: Path, runs: int = 3000) -> float:
    from device_agents.inference import ModelRunner
    from device_agents.runtimes import get_runtime

    r = ModelRunner(get_runtime("litert").interpreter(path, threads=1))
    x = r.tensors({p.name: np.zeros((1, *p.sample_shape), np.float32) for p in r.inputs}, 0)
    for _ in range(200):
        r.invoke_raw(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter_ns()
        r.invoke_raw(x)
        times.append(time.perf_counter_ns() - t)
    return float(np.median(times)) / 1000


def test_int8_accuracy_and_size(compiled, figure, benchmark):
    folder, m = compiled
    fp32, int8 = m.artifact("fp32"), m.artifact("int8")
    figure("digits int8 top-1 minus fp32 top-1 (points)", f"{100 * (int8.accuracy.value - fp32.accuracy.value):+.2f}",
           ">= -1.0", "LiteRT on host, 360 eval images")
    figure("digits int8 bytes / fp32 bytes", f"{int8.bytes / fp32.bytes:.3f}", "<= 0.30", "file sizes")
    from edge_kit.compiler.analysis import analyse

    benchmark.extra_info.update(fp32_bytes=fp32.bytes, int8_bytes=int8.bytes)
    benchmark(analyse, (folder / "int8.tflite").read_bytes())  # the per-artifact inspection cost


def test_magnitude_pruning_gzip(compiled, figure, benchmark):
    folder, m = compiled
    fp32, pruned = m.artifact("fp32"), m.artifact("int8-pruned-50")
    figure("digits int8-pruned-50 gzip bytes / fp32 gzip bytes", f"{pruned.gzip_bytes / fp32.gzip_bytes:.3f}",
           "<= 0.20", "gzip -9 of the files")
    figure("digits int8-pruned-50 top-1 (fine-tuned 3 epochs)", f"{100 * pruned.accuracy.value:.1f}%", "-",
           "LiteRT on host")
    from edge_kit.compiler.analysis import gzip_size

    benchmark(gzip_size, (folder / "int8-pruned-50.tflite").read_bytes())


def test_channel_pruning_macs_and_latency(compiled, figure, benchmark):
    folder, m = compiled
    int8, ch = m.artifact("int8"), m.artifact("int8-pruned-ch50")
    figure("digits int8-pruned-ch50 MACs / int8 MACs", f"{ch.macs / int8.macs:.3f}", "<= 0.55", "counted from files")
    base = _median_latency_us(folder / "int8.tflite")
    pruned = benchmark.pedantic(_median_latency_us, args=(folder / "int8-pruned-ch50.tflite",), rounds=1, iterations=1)
    figure("digits int8-pruned-ch50 p50 latency / int8 p50", f"{pruned / base:.3f}", "< 1.0",
           f"host, LiteRT 1 thread, perf_counter_ns, {pruned:.1f} us vs {base:.1f} us")
    figure("digits int8-pruned-ch50 top-1 (fine-tuned 3 epochs)", f"{100 * ch.accuracy.value:.1f}%", "-", "LiteRT on host")


def test_mobilenet_channel_pruning_latency(tmp_path, figure, benchmark):
    from edge_kit.examples import mobilenet

    files = mobilenet(tmp_path / "ex")
    profile = Profile.model_validate({**load_profile("rpi4").model_dump(), "variants": ["int8", "int8-pruned-ch50"]})
    m = compile_model(CompileRequest(files.model, [profile], tmp_path / "art", calib=files.calib))
    folder = tmp_path / "art" / "mobilenet"
    base = _median_latency_us(folder / "int8.tflite", runs=300)
    pruned = benchmark.pedantic(_median_latency_us, args=(folder / "int8-pruned-ch50.tflite", 300), rounds=1, iterations=1)
    figure("mobilenet-96-a0.5 int8-pruned-ch50 MACs / int8 MACs",
           f"{m.artifact('int8-pruned-ch50').macs / m.artifact('int8').macs:.3f}", "<= 0.55", "counted from files")
    figure("mobilenet-96-a0.5 int8-pruned-ch50 p50 latency / int8 p50", f"{pruned / base:.3f}", "< 1.0",
           f"host, LiteRT 1 thread, {pruned:.0f} us vs {base:.0f} us")


def test_mobilenetv2_residual_channel_pruning(tmp_path, figure, benchmark):
    """Channel pruning across residual adds, on a MobileNet-v2-style model trained on real data (the
    digits upsampled to 32x32x3); the pruned variant is fine-tuned by the compiler (--train)."""
    from edge_kit.examples import mobilenetv2

    files = mobilenetv2(tmp_path / "ex")
    profile = Profile.model_validate({**load_profile("rpi4").model_dump(), "variants": ["int8", "int8-pruned-ch50"]})
    req = CompileRequest(files.model, [profile], tmp_path / "art", calib=files.calib, eval=files.eval, train=files.train)
    m = compile_model(req)
    int8, ch = m.artifact("int8"), m.artifact("int8-pruned-ch50")
    assert ch.status == "built", ch.reason
    folder = tmp_path / "art" / "mobilenetv2"
    base = _median_latency_us(folder / "int8.tflite", runs=1000)
    pruned = benchmark.pedantic(_median_latency_us, args=(folder / "int8-pruned-ch50.tflite", 1000), rounds=1, iterations=1)
    figure("mobilenetv2-32 (residual) int8-pruned-ch50 MACs / int8 MACs", f"{ch.macs / int8.macs:.3f}", "<= 0.55",
           "counted from files")
    figure("mobilenetv2-32 (residual) int8-pruned-ch50 p50 latency / int8 p50", f"{pruned / base:.3f}", "< 1.0",
           f"host, LiteRT 1 thread, {pruned:.0f} us vs {base:.0f} us")
    figure("mobilenetv2-32 (residual) int8-pruned-ch50 top-1 minus int8 top-1 (points)",
           f"{100 * (ch.accuracy.value - int8.accuracy.value):+.1f}", ">= -2.0",
           f"LiteRT on host, {ch.accuracy.samples} digits eval images, {100 * ch.accuracy.value:.1f}% vs "
           f"{100 * int8.accuracy.value:.1f}%, fine-tuned {req.epochs} epochs")


def test_shared_variants_cost(digits, tmp_path, figure, benchmark):
    """Three profiles sharing variants vs one profile holding the distinct variants once, compiled in
    the order once, three, three, once (a drift of this shared machine's speed cancels out): the
    ratio of the summed wall times, and of the summed CPU times of this process (TensorFlow's threads
    included)."""
    profiles = [load_profile(p) for p in THREE]
    union = sorted({v for p in profiles for v in p.variants})
    distinct = Profile.model_validate({**load_profile("coral-usb").model_dump(), "name": "distinct", "variants": union,
                                       "targets": None})  # the order the variants name them
    kwargs = dict(calib=digits.calib, eval=digits.eval, train=digits.train)
    wall = {"once": 0.0, "three": 0.0}
    cpu = {"once": 0.0, "three": 0.0}

    def run(name: str, i: int) -> None:
        t, c = time.perf_counter(), time.process_time()
        compile_model(CompileRequest(digits.model, [distinct] if name == "once" else profiles, tmp_path / f"{name}{i}",
                                     **kwargs))
        wall[name] += time.perf_counter() - t
        cpu[name] += time.process_time() - c

    run("once", 0)
    benchmark.pedantic(run, args=("three", 0), rounds=1, iterations=1)
    run("three", 1)
    run("once", 1)
    figure("compile for 3 profiles / compile distinct variants once", f"{wall['three'] / wall['once']:.2f}", "<= 1.2",
           f"wall clock (perf_counter), twice each in the order once, three, three, once: {wall['three']:.1f} s vs "
           f"{wall['once']:.1f} s; CPU time of the process (process_time): {cpu['three'] / cpu['once']:.2f}")
