"""Deploy: a variant whose runtime the device lacks is refused in one line, the others proceed."""

from __future__ import annotations

from edge_kit.fleet.deploy import runtime_refusals
from edge_kit.manifest import Artifact


def art(vid: str, runtime: str) -> Artifact:
    return Artifact(id=vid, status="built", profiles=["rpi4"], summary="", precision="float32", runtime=runtime,
                    file=f"{vid}.{'onnx' if runtime == 'onnxruntime' else 'tflite'}", sha256="0" * 64, bytes=1)


WANTED = [art("fp32", "litert"), art("onnx-fp32", "onnxruntime"), art("int8", "litert"), art("onnx-int8", "onnxruntime")]


def test_onnx_variants_are_refused_on_a_device_without_onnxruntime():
    refused = runtime_refusals("pi-1", WANTED, {"onnxruntime": False})
    assert set(refused) == {"onnx-fp32", "onnx-int8"}
    for vid, why in refused.items():
        assert "\n" not in why and why.startswith(f"pi-1: {vid} needs onnxruntime")
        assert "pip install 'edge-kit[agent-onnx]'" in why
    assert set(runtime_refusals("pi-1", WANTED, {})) == {"onnx-fp32", "onnx-int8"}  # not reported: missing


def test_nothing_is_refused_where_onnxruntime_is_installed():
    assert runtime_refusals("pi-1", WANTED, {"onnxruntime": True}) == {}
    assert runtime_refusals("pi-1", WANTED[:1], {}) == {}  # LiteRT variants need nothing more


def test_trt_variants_are_refused_where_onnxruntime_has_no_tensorrt_provider():
    wanted = [*WANTED, art("trt-fp16", "tensorrt"), art("trt-int8", "tensorrt")]
    refused = runtime_refusals("jetson-1", wanted, {"onnxruntime": True, "tensorrt": False})
    assert set(refused) == {"trt-fp16", "trt-int8"}
    assert all("\n" not in why and "onnxruntime-gpu" in why and why.startswith("jetson-1: trt-") for why in refused.values())
    assert runtime_refusals("jetson-1", wanted, {"onnxruntime": True, "tensorrt": True}) == {}


def test_the_edgetpu_variant_is_refused_where_the_device_cannot_load_the_edge_tpu_delegate():
    """The edgetpu variant runs on LiteRT, so it was sent to every Coral and activated: on one without the Edge TPU
    or libedgetpu (a simulated one, a missing package) the agent refused it as a model that failed its smoke
    inference ("Encountered unresolved custom op: edgetpu-custom-op"), naming neither the TPU nor what to install.
    The device's facts (and its agent's status) now say whether the delegate loads; without it, the variant is not
    sent, in one line naming what to install, and int8 proceeds. The line said the device's "Python lacks" it:
    what it lacks is a shared library (libedgetpu.so.1, from the Debian package libedgetpu1-std), named so now."""
    wanted = [art("int8", "litert"), art("edgetpu", "litert")]
    refused = runtime_refusals("coral-1", wanted, {"onnxruntime": False, "tensorrt": False, "edgetpu": False})
    assert refused == {"edgetpu": "coral-1: edgetpu needs the Edge TPU's delegate, the shared library libedgetpu.so.1 "
                                  "(Debian package libedgetpu1-std), on the device, which the device cannot load; "
                                  "install Coral's libedgetpu1-std package, attach the Edge TPU "
                                  "and set the profile's runtime.delegate: edgetpu (docs/firmware/coral.md) there to "
                                  "deploy it"}
    assert "Python" not in refused["edgetpu"]
    assert set(runtime_refusals("coral-1", wanted, {})) == {"edgetpu"}  # not reported (an older agent): missing
    assert runtime_refusals("coral-1", wanted, {"edgetpu": True}) == {}
    assert runtime_refusals("coral-1", wanted, {"edgetpu": "available"}) == {}


def test_a_profile_on_tflite_runtime_is_refused_before_any_upload_where_the_device_lacks_it():
    """coral-devboard runs its models on tflite-runtime (runtime.engine). The deploy's check of the device's Python
    took either LiteRT package, so a device with only ai-edge-litert (every simulated one) was sent its variants,
    which the agent then refused at activation ("runtime 'tflite-runtime' needs the 'tflite-runtime' package"),
    after the upload. The facts now say which interpreter modules the device has; the deploy stops first, in one line
    naming the package to install."""
    from edge_kit.fleet.deploy import engine_missing
    from edge_kit.fleet.inventory import Device

    board = Device(name="board-1", host="127.0.0.1", user="mendel", profile="coral-devboard")
    facts = {"python": "/usr/bin/python3", "runtimes": {"litert": True, "tflite-runtime": False}}
    assert engine_missing(board, facts) == (
        "board-1: profile coral-devboard runs its LiteRT variants on tflite-runtime (its runtime.engine), which the "
        "device's Python (/usr/bin/python3) lacks; install it there (/usr/bin/python3 -m pip install tflite-runtime), "
        "or give the device a profile with another runtime.engine; nothing was uploaded")
    assert engine_missing(board, {**facts, "runtimes": {"tflite-runtime": True}}) is None
    assert engine_missing(board, {"python": "/usr/bin/python3", "runtimes": {}}) is None  # an older probe: not said
    pi = Device(name="pi-1", host="127.0.0.1", user="pi", profile="rpi4")
    assert engine_missing(pi, {"runtimes": {"litert": True, "tflite-runtime": False}}) is None


def test_ctrl_c_during_a_deploy_names_where_each_device_ended(tmp_path, monkeypatch):
    """Ctrl-C mid-deploy printed 'interrupted; nothing was half-written' alone, while a device past connecting had
    finished its deploy and switched model: the user could not tell which devices now ran the new one."""
    import signal
    import threading

    import pytest

    from edge_kit.errors import DeployInterrupted
    from edge_kit.fleet import deploy as dp
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.fleet.ssh import Cancelled
    from edge_kit.manifest import Manifest

    folder = tmp_path / "art"
    folder.mkdir()
    (folder / "manifest.json").write_text(Manifest(created="2026-11-29T00:00:00+00:00", model={"name": "m"}, versions={},
                                                   profiles={"rpi4": {}}, artifacts=WANTED[:1]).to_json())
    (tmp_path / "fleet.yaml").write_text(
        "fleet: f\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\ndevices:\n"
        + "".join(f"  - {{name: {d}, host: 127.0.0.1, port: {i + 2}}}\n" for i, d in enumerate("abcd")))
    fleet = load_fleet(tmp_path / "fleet.yaml")
    started = []

    def one(self, dev):  # a done, b under way when Ctrl-C comes, c gives up connecting, d never started
        started.append(dev.name)
        if dev.name == "b":
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            assert self.cancel.wait(10)  # the main thread saw Ctrl-C: b finishes all the same
            return dp.DeviceResult("b", "succeeded", variant="fp32", activated=True)
        if dev.name == "c":
            result = dp.DeviceResult("c", "skipped")
            result.fail(Cancelled("cancelled during the connect; nothing was changed on the device"))
            return result
        return dp.DeviceResult(dev.name, "skipped", variant="fp32")

    monkeypatch.setattr(dp._Deployer, "one", one)
    with pytest.raises(DeployInterrupted) as info:
        dp.deploy(fleet, fleet.devices, dp.DeployOptions(folder, parallel=2, health=False))
    text = str(info.value)
    assert info.value.exit_code == 130 and "\n" not in text
    assert "a skipped, fp32 active" in text and "b succeeded, fp32 active" in text, text
    assert "d not touched" in text and "run the deploy again" in text, text
    if "c" in started:
        assert "c not touched" in text, text
    assert "d" not in started
