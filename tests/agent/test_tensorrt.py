"""The agent's ``tensorrt`` runtime (ONNX Runtime's TensorRT execution provider) around a fake ``onnxruntime``.

No machine of this project has a GPU with TensorRT: :class:`FakeOrt` stands in for onnxruntime-gpu.
Its sessions run the model for real on ONNX Runtime's CPU provider, and play the TensorRT provider's
part that the agent relies on: it takes the provider options, writes an ``.engine`` file into
``trt_engine_cache_path`` when none is there (the build), reads the calibration table from that
folder for int8, fails when told to, and writes a profile with TensorRT node events. What is tested
is the agent's logic around it: cache keys, invalidation on a TensorRT version or GPU change, the
options passed, calibration table handling, a failed build keeping the device on its model, and the
bench record and printout.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as real_ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from device_agents import __main__ as agent_cli
from device_agents import smoke
from device_agents.bench import run_bench, summary_rows
from device_agents.errors import RuntimeUnavailable, StoreError
from device_agents.formats import META_CALIB_SHA256, onnx_metadata
from device_agents.runtimes import get_runtime, is_tensorrt, prepare_installed
from device_agents.runtimes import tensorrt as trt
from device_agents.store import ModelStore
from edge_kit.compiler import trt_variants
from edgekit_protocol.config import BenchSettings
from edgekit_protocol.errors import ConfigError

IDENT = trt.Identity("10.3.0", "NVIDIA Jetson Orin Nano Developer Kit")


def fp32_model() -> bytes:
    """A small float model: y = relu(x @ W), x [1, 8], y [1, 4]."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


class FakeOrt:
    """The parts of onnxruntime-gpu the tensorrt runtime uses; models run on the real CPU provider."""

    __version__ = "1.20.0+fake"
    SessionOptions = real_ort.SessionOptions

    def __init__(self, *, fail: str | None = None, fallback: bool = False):
        self.fail, self.fallback = fail, fallback
        self.sessions: list[dict[str, Any]] = []
        self.builds = 0

    def get_available_providers(self) -> list[str]:
        return [trt.PROVIDER, "CUDAExecutionProvider", "CPUExecutionProvider"]

    def InferenceSession(self, path: str, sess_options: Any = None, providers: Any = None) -> Any:  # noqa: N802
        name, options = providers[0]
        assert name == trt.PROVIDER
        self.sessions.append({"path": path, "options": dict(options), "providers": providers,
                              "profiling": bool(sess_options.enable_profiling),
                              "threads": sess_options.intra_op_num_threads})
        if self.fail:
            raise RuntimeError(f"[ONNXRuntimeError] : 1 : FAIL : {self.fail}")
        cache = Path(options["trt_engine_cache_path"])
        if options.get("trt_int8_enable"):
            table = cache / options["trt_int8_calibration_table_name"]
            assert table.is_file(), "the provider reads the calibration table from the engine cache path"
        if not list(cache.glob("*.engine")):
            self.builds += 1
            (cache / "TensorrtExecutionProvider_TRTKernel_graph_g_1_0_0_sm87.engine").write_bytes(b"engine" * 100)
        return FakeSession(path, self, sess_options)


class FakeSession:
    def __init__(self, path: str, ort: FakeOrt, so: Any):
        self.real = real_ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.ort, self.profiling, self.runs = ort, bool(so.enable_profiling), 0

    def get_providers(self) -> list[str]:
        return ["CPUExecutionProvider"] if self.ort.fallback else [trt.PROVIDER, "CPUExecutionProvider"]

    def get_inputs(self) -> Any:
        return self.real.get_inputs()

    def get_outputs(self) -> Any:
        return self.real.get_outputs()

    def run(self, names: Any, feed: Any) -> Any:
        self.runs += 1
        return self.real.run(names, feed)

    def end_profiling(self) -> str:
        path = Path(f"/tmp/fake-ort-profile-{uuid.uuid4().hex}.json")
        events = [{"cat": "Session", "name": "model_run", "dur": 999}]
        for i in range(self.runs):
            events.append({"cat": "Node", "name": "TRTKernel_graph_g_1_0_kernel_time", "dur": 500 + i,
                           "args": {"provider": trt.PROVIDER}})
            events.append({"cat": "Node", "name": "Relu_kernel_time", "dur": 7, "args": {"provider": "CPUExecutionProvider"}})
        path.write_text(json.dumps(events))
        return str(path)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeOrt:
    ort = FakeOrt()
    monkeypatch.setattr(trt, "_ort", lambda: ort)
    monkeypatch.setattr(trt, "identity", lambda: IDENT)
    monkeypatch.setattr(trt, "trt_version", lambda: IDENT.trt_version)
    # the fake cannot cross into a child process: the build runs here, its "peak memory" a stand-in
    monkeypatch.setattr(trt, "build_in_child", lambda p, r, threads=1, **k: {
        **trt.build_engine(p, r, threads=threads, ort=ort), "peak_rss_mb": 1.5})
    return ort


@pytest.fixture
def fp16(tmp_path: Path) -> Path:
    path = tmp_path / "trt-fp16.onnx"
    path.write_bytes(trt_variants.tagged(fp32_model(), "trt-fp16"))
    return path


@pytest.fixture
def int8(tmp_path: Path) -> Path:
    """trt-int8 as edgekit compile makes it: the calibration table computed by ONNX Runtime's calibrator, for real."""
    x = np.random.default_rng(1).normal(size=(32, 8)).astype(np.float32)
    fp32 = fp32_model()
    data, _, files = trt_variants.build("trt-int8", fp32, {"x": x})
    path = tmp_path / "trt-int8.onnx"
    path.write_bytes(data)
    (tmp_path / "trt-int8.calib").write_bytes(files["trt-int8.calib"])
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cache_key_names_model_version_and_gpu() -> None:
    key = trt.engine_key("ab" * 32, IDENT)
    assert key == "ab" * 32 + "-10.3.0-NVIDIA_Jetson_Orin_Nano_Developer_Kit"
    assert trt.engine_dir(Path("/r"), "ab" * 32, IDENT) == Path("/r/engines") / key
    assert trt.engine_key("ab" * 32, trt.Identity("8.6.2", IDENT.gpu)) != key


def test_build_passes_the_documented_provider_options_and_caches(fake: FakeOrt, fp16: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    rec = trt.build_engine(fp16, root)
    opts = fake.sessions[0]["options"]
    cache = trt.engine_dir(root, sha(fp16), IDENT)
    assert opts == {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                    "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
                    "trt_fp16_enable": True, "trt_int8_enable": False}
    assert [p if isinstance(p, str) else p[0] for p in fake.sessions[0]["providers"]] == [
        trt.PROVIDER, "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert rec["cached"] is False and rec["engine_key"] == cache.name and rec["variant"] == "trt-fp16"
    assert rec["engines"] and rec["engine_bytes"] == 600 and rec["seconds"] >= 0
    assert json.loads((cache / trt.BUILD_RECORD).read_text())["sha256"] == sha(fp16)
    again = trt.build_engine(fp16, root)
    assert again["cached"] is True and fake.builds == 1


@pytest.mark.parametrize("change", [trt.Identity("10.4.0", IDENT.gpu), trt.Identity(IDENT.trt_version, "Orin NX")])
def test_a_tensorrt_version_or_gpu_change_invalidates_the_engine(fake: FakeOrt, fp16: Path, tmp_path: Path,
                                                                  change: trt.Identity) -> None:
    root = tmp_path / "root"
    first = trt.build_engine(fp16, root, ident=IDENT)
    second = trt.build_engine(fp16, root, ident=change)
    assert second["cached"] is False and fake.builds == 2
    assert second["invalidated"] == [first["engine_key"]]
    assert not Path(first["engine_dir"]).exists() and Path(second["engine_dir"]).is_dir()


def test_int8_ships_the_hosts_calibration_table_to_the_provider(fake: FakeOrt, int8: Path, tmp_path: Path) -> None:
    table = (tmp_path / "trt-int8.calib").read_bytes()
    assert onnx_metadata(int8)[META_CALIB_SHA256] == hashlib.sha256(table).hexdigest()
    rec = trt.build_engine(int8, tmp_path / "root")
    opts = fake.sessions[0]["options"]
    assert opts["trt_int8_enable"] is True and opts["trt_fp16_enable"] is False
    assert opts["trt_int8_calibration_table_name"] == trt.CALIB_NAME
    assert opts["trt_int8_use_native_calibration_table"] is False  # ONNX Runtime's flatbuffers table
    assert (Path(rec["engine_dir"]) / trt.CALIB_NAME).read_bytes() == table
    assert rec["calibration_table_sha256"] == hashlib.sha256(table).hexdigest()


def test_a_tampered_or_missing_calibration_table_is_refused(fake: FakeOrt, tmp_path: Path) -> None:
    model = onnx.load_from_string(trt_variants.tagged(fp32_model(), "trt-int8", b"table"))
    for p in model.metadata_props:
        if p.key == META_CALIB_SHA256:
            p.value = "0" * 64
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(model.SerializeToString())
    with pytest.raises(trt.EngineBuildError, match="does not match its recorded sha256"):
        trt.build_engine(bad, tmp_path / "root")
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(trt_variants.tagged(fp32_model(), "trt-int8"))
    with pytest.raises(trt.EngineBuildError, match="compile it again with --calib"):
        trt.build_engine(bare, tmp_path / "root")
    assert not fake.sessions and not (tmp_path / "root" / trt.ENGINES).exists()


def test_a_failed_build_leaves_no_engine_and_a_cpu_fallback_is_a_failure(fake: FakeOrt, fp16: Path, tmp_path: Path) -> None:
    fake.fail = "TensorRT EP could not build engine for fused node: TRTKernel_graph_g"
    with pytest.raises(trt.EngineBuildError, match="TensorRT engine build failed: .*could not build engine"):
        trt.build_engine(fp16, tmp_path / "root")
    assert not list((tmp_path / "root" / trt.ENGINES).glob("*"))
    fake.fail, fake.fallback = None, True
    with pytest.raises(trt.EngineBuildError, match="did not put the TensorRT provider first"):
        trt.build_engine(fp16, tmp_path / "root")


def test_a_failed_build_at_install_keeps_the_device_on_its_model(fake: FakeOrt, fp16: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "dev")
    store.ensure()
    old = tmp_path / "old.onnx"
    old.write_bytes(fp32_model())
    current = store.install(old, variant="onnx-fp32", model="m").sha256
    store.activate(current, smoke=lambda *a, **k: {"ms": 0})
    new = store.install(fp16, variant="trt-fp16", model="m")

    def failing(path: Path, root: Path, **_: Any) -> dict[str, Any]:
        raise trt.EngineBuildError("trt-fp16.onnx: TensorRT engine build failed: out of memory")

    with pytest.raises(StoreError, match="out of memory; the device stays on its current model"):
        prepare_installed(store, new.sha256, fresh=new.fresh, build=failing)
    assert store.current() == current
    assert new.sha256 not in {m["sha256"] for m in store.installed()}
    assert prepare_installed(store, current) is None  # not a TensorRT variant: nothing to build

    again = store.install(trt_copy(fp16, tmp_path), variant="trt-fp16", model="m")
    rec = prepare_installed(store, again.sha256, build=lambda p, r, **k: trt.build_engine(p, r))
    assert rec is not None and Path(rec["engine_dir"]).parent == store.root / trt.ENGINES
    store.activate(again.sha256, smoke=lambda *a, **k: {"ms": 0})
    store.activate(current, smoke=lambda *a, **k: {"ms": 0})
    store.activate(new_model(tmp_path, store), smoke=lambda *a, **k: {"ms": 0})
    store.remove(again.sha256)  # a removed model takes its engines along
    assert not list((store.root / trt.ENGINES).glob(f"{again.sha256}-*"))


def trt_copy(src: Path, tmp: Path) -> Path:
    dst = tmp / "again.onnx"
    dst.write_bytes(src.read_bytes())
    return dst


def new_model(tmp: Path, store: ModelStore) -> str:
    path = tmp / "third.onnx"
    model = onnx.load_from_string(fp32_model())
    model.doc_string = "third"
    path.write_bytes(model.SerializeToString())
    return store.install(path, variant="onnx-fp32", model="m3").sha256


def test_build_in_child_reports_a_failure_in_one_line(tmp_path: Path) -> None:
    plain = tmp_path / "plain.onnx"
    plain.write_bytes(fp32_model())
    with pytest.raises(trt.EngineBuildError, match="not a TensorRT variant"):
        trt.build_in_child(plain, tmp_path, timeout=120)


def test_get_runtime_picks_tensorrt_for_a_trt_variant(fp16: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_tensorrt(fp16) and not is_tensorrt(fp32_model())
    with pytest.raises(RuntimeUnavailable, match="trt-fp16.onnx is a TensorRT variant; .*onnxruntime-gpu"):
        get_runtime("litert", model=fp16)  # the CPU build here has no TensorRT provider: said, no CPU fallback
    monkeypatch.setattr(trt, "_ort", lambda: FakeOrt())
    assert get_runtime("litert", model=fp16).key == "tensorrt"


class InlinePool:
    """Runs what a :class:`device_agents.smoke.SmokePool` would run in a child in this process, unwatched."""

    def run(self, fn, *args, what, timeout=0.0, watchdog=None):
        return fn(*args, [0] * watchdog.slots) if watchdog is not None and watchdog.slots else fn(*args)


def test_bench_reports_the_build_host_latency_and_trt_compute_time(fake: FakeOrt, fp16: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    settings = BenchSettings(warmup=2, min_runs=20, min_seconds=0.0, delegate_options={"engine_root": str(tmp_path / "r")})
    rec = run_bench(fp16, settings)
    assert rec["runtime"] == "tensorrt" and rec["delegate"] == trt.PROVIDER
    assert rec["engine"]["variant"] == "trt-fp16" and rec["engine"]["gpu"] == IDENT.gpu
    assert "copies included" in rec["latency_method"]
    assert rec["gpu_compute_ms"]["p50"] == pytest.approx(0.5, abs=0.05)  # the TensorRT node's µs only, per run
    assert "not CUDA events" in rec["gpu_compute_method"]
    labels = dict(summary_rows(rec))
    assert "built in" in labels["TensorRT engine"] and "peak RSS 1.5 MB" in labels["TensorRT engine"]
    assert "GPU compute p50/p90/p99" in labels
    monkeypatch.setattr(smoke, "SmokePool", InlinePool)  # the fake provider is this process's: no child sees it
    agent_cli.main(["bench", str(fp16), "--min-runs", "10", "--min-seconds", "0",
                    "--delegate-option", f"engine_root={tmp_path / 'r'}"])
    out = capsys.readouterr().out
    assert "TensorRT engine" in out and "loaded from the cache" in out and "GPU compute" in out
    assert fake.builds == 1 and len(fake.sessions) == 5  # build + run + profiled; then from the cache: run + profiled


def test_trt_node_times_sums_each_runs_tensorrt_nodes() -> None:
    ev = [{"cat": "Node", "name": f"TRTKernel_{k}_kernel_time", "dur": d, "args": {"provider": trt.PROVIDER}}
          for d, k in ((100, "a"), (50, "b"), (200, "a"), (70, "b"))]
    assert trt.trt_node_times(ev, 2) == pytest.approx([0.15, 0.27])
    with pytest.raises(ValueError, match="TensorRT ran no part"):
        trt.trt_node_times([{"cat": "Node", "name": "x_kernel_time", "args": {"provider": "CPUExecutionProvider"}}], 1)


def test_install_over_ssh_builds_the_engine_or_fails_in_one_line(fp16: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`edgekit-agent install` (what deploy runs over SSH): here, with no TensorRT, the real child build
    fails in one line and nothing stays installed; with the fake provider the engine record is printed."""
    root = tmp_path / "dev"
    with pytest.raises(SystemExit) as exit_:
        agent_cli.main(["install", str(fp16), "--variant", "trt-fp16", "--model-name", "m", "--root", str(root)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code != 0 and len(err) == 1 and "the device stays on its current model" in err[0], err
    assert ModelStore(root).installed() == []
    ort = FakeOrt()
    monkeypatch.setattr(trt, "_ort", lambda: ort)
    monkeypatch.setattr(trt, "build_in_child", lambda p, r, **k: trt.build_engine(p, r, ident=IDENT, ort=ort))
    agent_cli.main(["install", str(fp16), "--variant", "trt-fp16", "--model-name", "m", "--root", str(root)])
    out = json.loads(capsys.readouterr().out)
    assert out["engine"]["variant"] == "trt-fp16" and out["engine"]["engine_dir"].startswith(str(root / trt.ENGINES))


def test_install_over_ssh_builds_the_engine_with_the_threads_of_the_agent_yaml_in_its_root(
        fake: FakeOrt, fp16: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], offline_config: Any) -> None:
    """`edgekit-agent install` built a trt-* variant's engine with one thread, whatever agent.yaml's bench.threads
    (what activate, bench and the running agent use); it reads the agent.yaml in --root as activate does now, and a
    broken one is its one line, exit 2, before anything is installed."""
    install = ["install", str(fp16), "--variant", "trt-fp16", "--model-name", "m", "--root", str(tmp_path)]
    with pytest.raises(ConfigError):
        offline_config("bench: {threads: 0}")  # tmp_path/agent.yaml: --root tmp_path is that agent's root
    with pytest.raises(SystemExit) as caught:
        agent_cli.main(install)
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.count("\n") == 1 and "agent.yaml:6: bench: threads 0" in err and not fake.sessions
    assert ModelStore(tmp_path).installed() == []
    offline_config("bench: {threads: 3}")
    agent_cli.main(install)
    out = json.loads(capsys.readouterr().out)
    assert [s["threads"] for s in fake.sessions] == [3] and out["engine"]["threads"] == 3


def test_the_storage_budget_counts_and_removes_engines(fake: FakeOrt, fp16: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "dev")
    store.ensure()
    done = store.install(fp16, variant="trt-fp16", model="m")
    before = store._bytes(done.sha256)
    trt.build_engine(store.model_path(done.sha256), store.root)
    assert store._bytes(done.sha256) > before + 500  # the engine's 600 bytes count against the budget
    removed = store.prune(0, keep=set())
    assert [r["sha256"] for r in removed] == [done.sha256]
    assert not list((store.root / trt.ENGINES).glob("*"))


def shaped_model(tmp_path: Path, name: str, dims: list) -> Path:
    """A ``trt-fp16`` artifact whose input ``x`` has ``dims`` (8 features last), made by hand, not by compile."""
    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims),
                               helper.make_tensor_value_info("W", TensorProto.FLOAT, [8, 4])],  # an overridable constant
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [(dims or [1])[0], 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / name
    path.write_bytes(trt_variants.tagged(model.SerializeToString(), "trt-fp16"))
    return path


def test_input_shapes_are_read_without_the_onnx_package(tmp_path: Path) -> None:
    from device_agents.formats import onnx_input_shapes

    assert onnx_input_shapes(shaped_model(tmp_path, "a.onnx", ["N", 8])) == {"x": ["N", 8]}  # W: an initializer
    negative = onnx.load(shaped_model(tmp_path, "b.onnx", [1, 8]))
    negative.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1  # some exporters write -1 for dynamic
    assert onnx_input_shapes(negative.SerializeToString()) == {"x": ["", 8]}
    assert onnx_input_shapes(b"TFL3" * 4) == {}


def test_a_dynamic_batch_gets_an_explicit_batch_1_profile(fake: FakeOrt, tmp_path: Path) -> None:
    """Without min/opt/max shapes the provider would build at the first run for whatever shape came; the
    engine is built for the one shape devices run, and the build record says so in its options."""
    rec = trt.build_engine(shaped_model(tmp_path, "dyn.onnx", ["N", 8]), tmp_path / "root")
    opts = fake.sessions[0]["options"]
    assert opts["trt_profile_min_shapes"] == opts["trt_profile_opt_shapes"] == opts["trt_profile_max_shapes"] == "x:1x8"
    assert rec["provider_options"]["trt_profile_min_shapes"] == "x:1x8"
    static = trt.build_engine(shaped_model(tmp_path, "static.onnx", [1, 8]), tmp_path / "root")
    assert not any(k.startswith("trt_profile") for k in static["provider_options"])


@pytest.mark.parametrize(("dims", "match"), [
    ([1, "features"], r"input 'x' has a dynamic dimension 1 \('features'\); a TensorRT engine is built for fixed sizes"),
    ([], r"input 'x' has no dimensions"),
])
def test_a_dynamic_dimension_besides_the_batch_is_refused_before_the_disk(fake: FakeOrt, tmp_path: Path,
                                                                           dims: list, match: str) -> None:
    with pytest.raises(trt.EngineBuildError, match=match):
        trt.build_engine(shaped_model(tmp_path, "m.onnx", dims), tmp_path / "root")
    assert not fake.sessions and not (tmp_path / "root" / trt.ENGINES).exists()


@pytest.mark.parametrize("record", [{"trt_version": "10.3.0", "gpu": "NVIDIA Jetson Orin Nano (Developer Kit)"}, None])
def test_an_engine_in_this_devices_folder_but_not_built_here_is_rebuilt(fake: FakeOrt, fp16: Path, tmp_path: Path,
                                                                        record: dict | None) -> None:
    """GPU names that slug alike ('Orin Nano (Developer Kit)' and 'Orin Nano Developer Kit') share a folder,
    and a build cut short leaves an engine without its record: either was taken as this device's engine."""
    root = tmp_path / "root"
    cache = trt.engine_dir(root, sha(fp16), IDENT)
    cache.mkdir(parents=True)
    (cache / "TensorrtExecutionProvider_TRTKernel_graph_g_1_0_0_sm72.engine").write_bytes(b"other plan")
    if record is not None:
        assert trt.engine_key(sha(fp16), trt.Identity(**record)) == cache.name  # the collision is real
        (cache / trt.BUILD_RECORD).write_text(json.dumps({**record, "provider_options": {}}))
    assert trt._cached_record(fp16, root) is None  # serving does not load it; the install-time build replaces it
    rec = trt.build_engine(fp16, root)
    assert rec["cached"] is False and fake.builds == 1
    why = "built for TensorRT 10.3.0 on NVIDIA Jetson Orin Nano (Developer Kit)" if record else "no build record"
    assert rec["invalidated"] == [f"{cache.name} ({why} says which TensorRT version and GPU built it)"
                                  if not record else f"{cache.name} ({why})"]
    assert [p.name for p in cache.glob("*.engine")] == ["TensorrtExecutionProvider_TRTKernel_graph_g_1_0_0_sm87.engine"]
    assert trt._cached_record(fp16, root)["cached"] is True


def _dies_mid_send(model: str, root: str, threads: int, conn) -> None:
    """A build child that dies partway through sending its answer: a length header, 3 of its 1,000 bytes."""
    import os
    import struct

    os.write(conn.fileno(), struct.pack("!i", 1000) + b"abc")
    os._exit(9)


def test_a_build_child_dying_partway_through_its_answer_is_a_one_line_build_error(tmp_path: Path) -> None:
    """The pipe says "got end of file during message" (OSError), which escaped as a traceback."""
    with pytest.raises(trt.EngineBuildError, match=r"the engine build process died \(exit code 9\)"):
        trt.build_in_child(tmp_path / "m.onnx", tmp_path, timeout=60, target=_dies_mid_send)


def _stalls_mid_send(model: str, root: str, threads: int, conn) -> None:
    """A build child that stops partway through sending its answer: a length header, 3 of its 1,000 bytes, then
    nothing more (stopped, or blocked), alive."""
    import os
    import struct
    import time

    os.write(conn.fileno(), struct.pack("!i", 1000) + b"abc")
    time.sleep(3600)


def test_a_build_child_stopping_partway_through_its_answer_is_ended_at_the_deadline(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    """Once the first bytes of its answer had come, the agent read the rest with no deadline (SmokePool.run had
    got one, the engine build had not): a build child stopped halfway held the install command, and the agent's
    stop, for ever."""
    import time

    monkeypatch.setattr(smoke, "SEND_GRACE_S", 0.5)
    started = time.monotonic()
    with pytest.raises(trt.EngineBuildError, match="stopped partway through sending its result; killed at the "
                                                   "build's deadline"):
        # 15 s: the child's start (a spawned interpreter and its imports) has to fit before the deadline on a busy
        # machine too, or the build is killed before its answer starts ("took more than 2 s", then "more than 6 s"
        # in CI runs at a load of 20 on 2 cores)
        trt.build_in_child(tmp_path / "m.onnx", tmp_path, timeout=15, target=_stalls_mid_send)
    assert time.monotonic() - started < 60


def test_a_build_record_holding_nan_is_no_record_and_the_engine_is_rebuilt(fake: FakeOrt, fp16: Path, tmp_path: Path) -> None:
    """The build record is read back into an install's answer (``engine``): one holding NaN (damaged or edited) made
    that answer unsignable. It is read as the receivers parse a message: not a record, so the engine is built again."""
    root = tmp_path / "root"
    cache = trt.engine_dir(root, sha(fp16), IDENT)
    cache.mkdir(parents=True)
    (cache / "TensorrtExecutionProvider_TRTKernel_graph_g_1_0_0_sm87.engine").write_bytes(b"plan")
    (cache / trt.BUILD_RECORD).write_text(json.dumps({"trt_version": IDENT.trt_version, "gpu": IDENT.gpu,
                                                      "provider_options": {}, "build_s": float("nan")}))
    assert trt._cached_record(fp16, root) is None
    rec = trt.build_engine(fp16, root)
    assert rec["cached"] is False and fake.builds == 1
    assert trt._cached_record(fp16, root)["cached"] is True


def test_an_application_reading_the_store_never_builds_nor_removes_an_engine(fake: FakeOrt, fp16: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """open_current in an application (a reader of the agent's store) built a missing engine itself, removing on the
    way the engines of other TensorRT versions and GPUs and a build half done: the agent's own, maybe under way."""
    from device_agents.serving import ServingError, open_current

    store = ModelStore(tmp_path / "root")
    active = store.install(fp16, variant="trt-fp16", model="m").sha256
    store._point("current", active)
    agents = trt.build_engine(store.model_path(active), store.root)  # the agent's, at install
    upgraded = trt.Identity("10.4.0", IDENT.gpu)  # JetPack upgraded; the agent has not served the model since
    monkeypatch.setattr(trt, "identity", lambda: upgraded)
    half = trt.engine_dir(store.root, active, upgraded)
    for building in (False, True):  # then the agent's build under way: an engine, no record yet
        if building:
            half.mkdir(parents=True)
            (half / "TensorrtExecutionProvider_TRTKernel_graph_g_1_0_0_sm87.engine").write_bytes(b"half")
        with pytest.raises(ServingError, match="no TensorRT engine built for this device's TensorRT version and GPU"):
            open_current(store.root).predict(np.zeros((1, 8), np.float32))
        assert Path(agents["engine_dir"]).is_dir() and fake.builds == 1
        assert half.is_dir() == building and (not building or [p.name for p in half.iterdir()] == [
            "TensorrtExecutionProvider_TRTKernel_graph_g_1_0_0_sm87.engine"])
    assert trt.build_engine(store.model_path(active), store.root)["cached"] is False  # the agent, its writer
    assert open_current(store.root).predict(np.zeros((1, 8), np.float32)) and fake.builds == 2
