"""The desired-state reconciler's rules, with an in-memory store and fetch (the real ones run in
tests/integration/test_pull_rollout.py): revisions only go up, a failure keeps the model and backs
off, a restart resumes where it stood."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from device_agents.errors import DeviceError
from device_agents.fetch import FetchResult
from device_agents.reconcile import DESIRED, Reconciler
from edgekit_protocol.config import PullConfig
from edgekit_protocol.errors import MessageError

A, B = "a" * 64, "b" * 64


class FakeStore:
    def __init__(self):
        self.models: dict[str, dict] = {}
        self.cur: str | None = None

    def current(self):
        return self.cur

    def previous(self):
        return None

    def activated_elsewhere(self, sha):  # a push deploy or an `activate` command moved the device
        self.cur = sha

    def verify(self, sha):
        if sha not in self.models:
            raise DeviceError(f"{sha[:6]} not installed")
        return Path("/nowhere")

    def install(self, path, *, variant, model, expect_sha256, **_):
        self.models[expect_sha256] = {"sha256": expect_sha256, "variant": variant, "model": model}

    def describe(self, sha):
        return self.models.get(sha)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def desired(rev, sha=A, msg_id=None, delay=0.0):
    return {"msg_id": msg_id or f"m{rev}", "rollout": "r1", "revision": rev, "store": "http://127.0.0.1:9/",
            "model": "digits", "variant": "int8", "sha256": sha, "bytes": 10, "eval": None, "keep": [],
            "fetch": {"max_bytes_s": None, "start_delay_s": delay, "timeout_s": 5}}


@pytest.fixture
def rig(tmp_path):
    store, clock, reports, fetched, activated = FakeStore(), Clock(), [], [], []
    fail = {"fetch": 0}

    def fetch(url, sha, dest, cancel=None, **kw):
        fetched.append(url)
        if fail.get("hold"):  # a store that trickles: only a cancel ends it
            assert cancel.wait(10)
            raise DeviceError(f"{url}: download cancelled")
        if fail.get("odd"):
            raise ValueError("Invalid IPv6 URL")  # not a FetchError: still a reported failure, never the loop's end
        if fail["fetch"]:
            fail["fetch"] -= 1
            raise DeviceError(f"{url}: store not answering")
        return FetchResult(dest, 10, False, 0.01)

    def activate(sha, keep):
        activated.append(sha)
        store.cur = sha
        return {"smoke": {"ok": True}}

    def make(**kw):
        return Reconciler(tmp_path, store, activate=activate, report=reports.append, check_disk=lambda n: None,
                          settings=PullConfig(retry_s=10, max_attempts=3), fetch=fetch, clock=clock, rng=lambda: 0.5,
                          connect_grace_s=2.0, **kw)

    return make, store, clock, reports, fetched, activated, fail


def run(rec):
    """Step until the attempt ends (a download runs in a thread: wait for it); return the last report."""
    out = rec.step()
    while out is not None and out["state"] == "fetching":
        deadline = time.monotonic() + 10
        while not rec.due() and time.monotonic() < deadline:
            time.sleep(0.01)
        out = rec.step()
    return out


def test_a_new_revision_is_fetched_installed_activated_and_reported_converged(rig, tmp_path):
    make, store, clock, reports, fetched, activated, _ = rig
    rec = make()
    assert rec.take(desired(5, delay=60)) is None
    saved = json.loads((tmp_path / DESIRED).read_text())
    assert saved["message"]["revision"] == 5 and saved["converged"] is False  # on disk before the broker forgets it
    assert not rec.due()  # the random start delay (0.5 x 60 s) spreads a wave's downloads
    clock.t += 30
    assert rec.due()
    out = run(rec)
    assert out["state"] == "converged" and out["current"]["sha256"] == A and out["revision"] == 5
    assert fetched == [f"http://127.0.0.1:9/sha256/{A}"] and activated == [A]
    assert [r["state"] for r in reports] == ["fetching", "converged"]
    assert not rec.due() and json.loads((tmp_path / DESIRED).read_text())["converged"] is True
    assert rec.protected() == {A}  # the store budget never removes the desired model


def test_old_revisions_are_refused_and_a_redelivery_only_reports_again(rig):
    make, *_ , reports, fetched, activated, _ = rig
    rec = make()
    rec.take(desired(5))
    run(rec)
    assert rec.take(desired(5)) == "same" and reports[-1]["state"] == "converged"
    assert rec.take(desired(4, sha=B)) == "stale"  # a replayed old desired state never takes the device back
    assert rec.take(desired(5, sha=B, msg_id="other")) == "stale"
    assert not rec.due() and activated == [A]
    with pytest.raises(MessageError, match="sha256"):
        rec.take({**desired(6), "sha256": "../../etc"})


def test_a_failure_keeps_the_model_backs_off_and_gives_up_after_max_attempts(rig):
    make, store, clock, reports, fetched, activated, fail = rig
    rec = make()
    rec.take(desired(1))
    run(rec)
    rec.take(desired(2, sha=B))
    fail["fetch"] = 5
    waits = []
    for _ in range(3):
        assert rec.due()
        out = run(rec)
        assert out["state"] == "failed" and "store not answering" in out["error"]
        assert out["current"]["sha256"] == A  # still on its working model
        if rec.next_at is not None:
            waits.append(rec.next_at - clock.t)
            clock.t = rec.next_at
    assert waits == [10, 20] and rec.next_at is None  # 10 s, 20 s, then no more until a new revision
    restarted = make()  # a restart grants no fresh tries to a desired state that gave up
    restarted.on_connect()
    clock.t += 60
    assert not restarted.due() and restarted.attempt == 3
    rec.take(desired(3, sha=B))
    fail["fetch"] = 0
    assert run(rec)["state"] == "converged" and store.cur == B


def test_a_pull_ca_file_that_is_a_fifo_is_a_failed_try_naming_it_never_a_wait(rig, tmp_path):
    """pull.ca_file went to ssl.create_default_context as it was: OpenSSL's open of a FIFO waited for a writer, so the
    download's thread never ended and the device never reconciled again. Now the try fails with one line naming it."""
    import os

    make, store, clock, reports, fetched, activated, _ = rig
    ca = tmp_path / "store-ca.pem"
    os.mkfifo(ca, 0o600)
    rec = make()
    rec.settings = PullConfig(retry_s=10, max_attempts=3, ca_file=ca)
    rec.take(desired(1))
    assert rec.step()["state"] == "fetching"
    deadline = time.monotonic() + 30
    while not rec.due() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not rec.due():  # waiting in the FIFO's open: a writer releases it
        os.close(os.open(ca, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"loading pull.ca_file {ca} (a FIFO) waited for a writer")
    out = rec.step()
    assert out["state"] == "failed" and fetched == [] and store.cur is None, out
    assert out["error"] == (f"pull.ca_file {ca}: not a regular file; point pull.ca_file (fleet file or agent.yaml) at "
                            "the store's CA bundle (PEM) on the device")


def test_a_slow_download_holds_nothing_and_a_newer_desired_state_cancels_it(rig):
    make, store, clock, reports, fetched, activated, fail = rig
    rec = make()
    fail["hold"] = True
    rec.take(desired(1))
    assert rec.step()["state"] == "fetching"  # returns at once: the download runs beside the main loop
    assert not rec.due()
    fail["hold"] = False
    rec.take(desired(2, sha=B))  # cancels the download in flight
    deadline = time.monotonic() + 10
    while not rec.due() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rec.step() is None  # the cancelled download's end: nothing reported for the old revision
    out = run(rec)
    assert out["state"] == "converged" and out["revision"] == 2 and store.cur == B and activated == [B]
    fail["odd"] = True
    rec.take(desired(3, sha=A))
    out = run(rec)
    assert out["state"] == "failed" and out["error"] == "ValueError: Invalid IPv6 URL" and rec.next_at is not None


def test_a_restart_resumes_an_unfinished_desired_state_after_the_broker_had_its_say(rig, tmp_path):
    make, store, clock, reports, fetched, activated, fail = rig
    make().take(desired(7, delay=600))
    again = make()
    assert again.desired.revision == 7 and not again.due()  # not before the broker could deliver a newer one
    again.on_connect()
    assert not again.due()
    clock.t += 2
    assert again.due()  # no second start delay after a restart
    assert again.take(desired(6)) == "stale"
    (tmp_path / DESIRED).write_text('{"message": ')
    assert make().desired is None


def test_a_converged_desired_state_is_not_applied_again_after_a_restart(rig):
    make, store, clock, reports, fetched, activated, fail = rig
    rec = make()
    rec.take(desired(1))
    run(rec)
    store.models[B] = {"sha256": B, "variant": "fp32", "model": "digits"}
    store.activated_elsewhere(B)  # an operator pushed another model since
    again = make()
    again.on_connect()
    clock.t += 60
    assert not again.due() and store.cur == B and activated == [A]


def test_a_trt_variant_gets_its_engine_built_at_install_and_a_failed_build_keeps_the_model(rig, monkeypatch):
    """A desired trt-* variant: the engine is built after the install, before any activation; a failed build
    is the reported error and the device stays on its model (tensorrt's own logic: tests/agent/test_tensorrt.py);
    it is built with the agent's bench.threads (it was built with one thread)."""
    from device_agents import runtimes
    from device_agents.errors import StoreError

    make, store, clock, reports, fetched, activated, _ = rig
    rec = make(threads=3)
    rec.take(desired(1))
    run(rec)
    builds = []

    def failing(st, sha, **kw):
        builds.append(sha)
        st.models.pop(sha, None)  # what prepare_installed does with a fresh model whose build failed
        raise StoreError("install: trt-fp16.onnx: TensorRT engine build failed: out of memory; "
                         "the device stays on its current model")

    monkeypatch.setattr(runtimes, "prepare_installed", failing)
    rec.take({**desired(2, sha=B), "variant": "trt-fp16"})
    out = run(rec)
    assert out["state"] == "failed" and "engine build failed" in out["error"] and out["current"]["sha256"] == A
    assert builds == [B] and activated == [A] and B not in store.models
    monkeypatch.setattr(runtimes, "prepare_installed", lambda st, sha, **kw: {"variant": "trt-fp16", "seconds": 1.0,
                                                                               "threads": kw.get("threads", 1)})
    rec.take({**desired(3, sha=B), "variant": "trt-fp16"})
    out = run(rec)
    assert out["state"] == "converged" and out["download"]["engine"]["variant"] == "trt-fp16" and store.cur == B
    assert out["download"]["engine"]["threads"] == 3


def test_a_superseded_download_left_whole_by_a_power_loss_is_dropped_and_the_wanted_one_counted(rig, tmp_path):
    """The power went after a download was verified (``incoming/<sha>``) and before its install took it;
    then the operator wanted another model. The next download drops the old one, whole or partial (else
    it stays on the card forever), counts what is there of the wanted one, and never touches a push
    deploy's uploads."""
    make, store, clock, reports, fetched, activated, fail = rig
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    C = "c" * 64
    (incoming / C).write_bytes(b"x" * 100)  # verified, never installed: the power went
    (incoming / f"{C}.partial").write_bytes(b"x" * 50)
    (incoming / A).write_bytes(b"y" * 4)  # the wanted one, verified before the power went
    uploads = [incoming / f"{B}.tflite.part", incoming / "eval.npz", incoming / "agent-0123456789ab.tar.gz.part"]
    for upload in uploads:
        upload.write_bytes(b"z")
    needs = []
    rec = Reconciler(tmp_path, store, activate=lambda sha, keep: {"smoke": {}}, report=reports.append,
                     check_disk=needs.append, settings=PullConfig(), fetch=lambda url, sha, dest, **kw: FetchResult(dest, 0, False, 0.0),
                     clock=clock, rng=lambda: 0.0)
    rec.take(desired(1))
    assert run(rec)["state"] == "converged"
    assert sorted(p.name for p in incoming.iterdir()) == sorted([A, *(u.name for u in uploads)])
    assert needs == [10 - 4]  # 10 bytes wanted, 4 of them on the card already


def test_a_desired_state_that_could_not_be_written_is_not_taken_and_a_retry_takes_it(rig, tmp_path, monkeypatch):
    """A full disk while a desired state is taken: nothing changes in memory, so the agent's retry (after
    freeing its reserve, or when space returns) takes it for real: persisted, scheduled, the old download
    cancelled. It used to be half taken: a retry saw the same msg_id as "same", so it was never written to
    disk nor started, and the broker was told it was taken (lost until a restart)."""
    import errno

    from device_agents import reconcile

    make, store, clock, reports, fetched, activated, fail = rig
    rec = make()
    rec.take(desired(1))
    run(rec)
    real = reconcile.atomic_write

    def full(path, data, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(reconcile, "atomic_write", full)
    with pytest.raises(OSError):
        rec.take(desired(2, sha=B))
    assert rec.desired.revision == 1 and not rec.due()  # nothing half taken
    monkeypatch.setattr(reconcile, "atomic_write", real)
    assert rec.take(desired(2, sha=B)) is None  # the retry takes it
    assert json.loads((tmp_path / DESIRED).read_text())["message"]["revision"] == 2
    assert rec.due()
    out = run(rec)
    assert out["state"] == "converged" and out["revision"] == 2 and store.cur == B


@pytest.mark.parametrize("stall", ["trickling_http", "silent_port"])
def test_a_store_trickling_its_headers_or_never_taking_the_connect_does_not_hold_a_newer_desired_state(
        tmp_path, request, stall):
    """The real download against a store that sends one header byte every 0.2 s, or drops every SYN (loopback
    servers): a newer desired state used to wait behind it (the cancel was looked at only between body reads, and
    the header phase never ended; the connect was not watched at all: the desired state's timeout_s, up to 600 s);
    now the download ends within a second or so of the newer desired state."""
    store = request.getfixturevalue(stall)
    store = store if stall == "trickling_http" else f"http://127.0.0.1:{store}"
    rec = Reconciler(tmp_path, FakeStore(), activate=lambda s, k: {}, report=lambda b: None,
                     check_disk=lambda n: None, settings=PullConfig(retry_s=10, max_attempts=3),
                     clock=Clock(), rng=lambda: 0.0)
    rec.take({**desired(1), "store": store})
    assert rec.step()["state"] == "fetching"
    time.sleep(0.5)
    assert not rec.due()  # the real download is held in its headers, or its connect
    rec.take({**desired(2, sha=B), "store": store})
    t0 = time.monotonic()
    while not rec.due() and time.monotonic() - t0 < 10:
        time.sleep(0.02)
    assert time.monotonic() - t0 < 2  # the cancel ended it at once
    assert rec.step() is None and rec.desired.revision == 2  # the newer desired state goes on
    rec.stop()


def test_a_hold_cancels_a_download_in_flight_keeps_the_model_and_survives_a_restart(rig):
    """`rollout abort` had no way to stop a device that had not converged on the candidate: it kept fetching
    and retrying it, and a device offline during the wave took it from its session when it came back (the
    host cannot name what such a device runs). A hold is the device's own answer: keep what it runs."""
    make, store, clock, reports, fetched, activated, fail = rig
    store.models[B] = {"sha256": B, "variant": "fp32", "model": "digits"}
    store.cur = B
    rec = make()
    fail["hold"] = True
    rec.take(desired(1))  # the candidate, A
    assert rec.step()["state"] == "fetching"
    assert rec.take({"msg_id": "h2", "rollout": "r1", "revision": 2, "hold": True}) is None  # cancels the download
    assert rec.protected() == set()  # the candidate is no longer spared by the store budget
    deadline = time.monotonic() + 10
    while not rec.due() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rec.step() is None  # the cancelled download ends: nothing reported for the candidate's revision
    out = rec.step()
    assert out["state"] == "converged" and out["revision"] == 2 and out["want"] is None
    assert out["current"]["sha256"] == B and store.cur == B and activated == [] and not rec.due()
    again = make()  # a restart: the hold is what it took last, converged; nothing to do
    assert again.desired.hold and not again.due()
    assert again.take(desired(1)) == "stale"  # the candidate, delivered again from the session: refused
    with pytest.raises(MessageError, match="a hold is"):
        again.take({"msg_id": "h3", "rollout": "r1", "revision": 3, "hold": "yes"})


@pytest.mark.parametrize("damage", ["truncated", "removed"])
def test_a_lost_desired_json_does_not_let_a_replayed_older_desired_state_take_the_device_back(rig, tmp_path, damage):
    """The only record of the revision taken was desired.json: truncated by a fault or removed, the agent took
    any validly signed desired state again, so an old one replayed on its topic rolled the device back to an
    old model. The highest revision is kept a second time; the one taken before (same msg_id) is still taken."""
    make, store, clock, reports, fetched, activated, fail = rig
    rec = make()
    rec.take(desired(5))
    run(rec)
    if damage == "truncated":
        (tmp_path / DESIRED).write_text("")
    else:
        (tmp_path / DESIRED).unlink()
    again = make()
    assert again.desired is None
    assert again.take(desired(4, sha=B)) == "stale" and again.take(desired(5, sha=B, msg_id="other")) == "stale"
    assert again.desired is None and not again.due()
    assert again.take(desired(5)) is None  # the broker's retained one, as taken before: resumed
    assert again.take(desired(6, sha=B)) is None and again.desired.revision == 6
    assert make().take(desired(5)) == "stale"


@pytest.mark.parametrize("then", ["hold", "rollback"])
def test_an_aborted_candidates_partial_download_is_dropped_by_a_hold_or_a_rollback(rig, tmp_path, then):
    """A download cut (the store died, the agent was killed) left incoming/<sha>.partial; only the start of another
    download dropped it. `rollout abort` (a hold) or a rollback to a model the device has installed starts none, so
    the aborted candidate's bytes, up to the model's size, held the device's disk until some later rollout."""
    make, store, clock, reports, fetched, activated, fail = rig
    store.models[B] = {"sha256": B, "variant": "fp32", "model": "digits"}
    store.cur = B
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / f"{A}.partial").write_bytes(b"x" * 1000)  # the candidate's download, cut
    (incoming / A).write_bytes(b"y" * 10)  # or whole, the power gone before the install
    (incoming / f"{A}.tflite").write_bytes(b"z")  # a push deploy's upload: not the reconciler's
    rec = make()
    rec.take({"msg_id": "h2", "rollout": "r1", "revision": 2, "hold": True} if then == "hold" else desired(2, sha=B))
    out = run(rec)
    assert out["state"] == "converged" and store.cur == B and fetched == [] and activated == []
    assert sorted(p.name for p in incoming.iterdir()) == [f"{A}.tflite"]


@pytest.mark.parametrize("then", ["download", "hold"])
def test_a_full_disk_after_the_switch_still_reports_converged(rig, tmp_path, monkeypatch, then):
    """The model was switched (or the hold taken), then desired.json could not be marked converged (the disk
    filled): step raised, the service loop logged it and went on, and the device stayed on the new model while
    its last report said `fetching` for ever; nothing was due any more, so the rollout waited on it until a
    restart. The report goes out now; desired.json keeps `converged: false`, which a restart settles at once
    (the desired model is current)."""
    import errno

    from device_agents import reconcile

    make, store, clock, reports, fetched, activated, fail = rig
    store.models[B] = {"sha256": B, "variant": "fp32", "model": "digits"}
    store.cur = B
    rec = make()
    rec.take(desired(1) if then == "download" else {"msg_id": "h1", "rollout": "r1", "revision": 1, "hold": True})
    real = reconcile.atomic_write

    def full(path, data, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(reconcile, "atomic_write", full)
    out = run(rec)
    assert out["state"] == "converged" and reports[-1] is out and store.cur == (A if then == "download" else B)
    assert not rec.due()
    monkeypatch.setattr(reconcile, "atomic_write", real)
    assert json.loads((tmp_path / DESIRED).read_text())["converged"] is False
    again = make()  # a restart: resumed once the broker had its say, then converged without a second switch
    again.on_connect()
    clock.t += 5
    assert again.due() and run(again)["state"] == "converged" and activated == ([A] if then == "download" else [])


def test_the_log_line_of_a_converged_activation_gives_the_smoke_checks_time_in_words_not_its_record(rig, caplog):
    """The smoke check's record now holds `timed`, a sentence: the agent's log said the whole record per activation."""
    from device_agents.smoke import SMOKE_TIMED

    make, *_ = rig
    rec = make()
    rec._activate = lambda sha, keep: {"smoke": {"inputs": {}, "outputs": {}, "load_and_first_invoke_ms": 12.5,
                                                 "timed": SMOKE_TIMED}}
    rec.take(desired(5))
    with caplog.at_level("INFO", logger="edgekit.agent"):
        assert run(rec)["state"] == "converged"
    line = next(r.getMessage() for r in caplog.records if "is current" in r.getMessage())
    assert line.endswith("is current (smoke check: loaded and one cold invoke() on zeros in 12.5 ms)"), line


def test_an_edge_tpu_busy_with_another_processs_turn_is_tried_again_without_using_up_the_attempts(rig):
    """A desired-state activation answered busy (`edgekit-agent bench --delegate edgetpu` run by hand held the
    Edge TPU past the agent's turn wait) used one of pull.max_attempts and doubled the back-off, as a broken model does:
    a few minutes of someone's bench and the desired state was given up until its next revision. Now busy is
    reported, tried again after pull.retry_s, and not counted."""
    from device_agents.errors import AcceleratorBusy

    make, store, clock, reports, fetched, activated, fail = rig
    busy = {"n": 5}
    rec = make()
    plain = rec._activate

    def activate(sha, keep):
        if busy["n"]:
            busy["n"] -= 1
            raise AcceleratorBusy("smoke check of model aaaa: another process holds the Edge TPU; retry once it ends")
        return plain(sha, keep)

    rec._activate = activate
    rec.take(desired(1))
    clock.t = rec.next_at
    for _ in range(5):  # more than max_attempts (3)
        out = run(rec)
        assert out["state"] == "failed" and "holds the Edge TPU" in out["error"] and rec.attempt == 0
        assert rec.next_at - clock.t == 10  # pull.retry_s, not doubled
        clock.t = rec.next_at
    assert run(rec)["state"] == "converged" and store.cur == A and activated == [A]
