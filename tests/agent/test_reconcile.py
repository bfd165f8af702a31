"""The desired-state reconciler's rules, with an in-memory store and fetch (the real ones run in
tests/integration/test_pull_rollout.py): revisions only go up, a failure keeps the model and backs
off, a restart resumes where it stood."""

from __future__ import annotations

import json
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

    def fetch(url, sha, dest, **kw):
        fetched.append(url)
        if fail["fetch"]:
            fail["fetch"] -= 1
            raise DeviceError(f"{url}: store not answering")
        return FetchResult(dest, 10, False, 0.01)

    def activate(sha, keep):
        activated.append(sha)
        store.cur = sha
        return {"smoke": {"ok": True}}

    def make():
        return Reconciler(tmp_path, store, activate=activate, report=reports.append, check_disk=lambda n: None,
                          settings=PullConfig(retry_s=10, max_attempts=3), fetch=fetch, clock=clock, rng=lambda: 0.5)

    return make, store, clock, reports, fetched, activated, fail


def test_a_new_revision_is_fetched_installed_activated_and_reported_converged(rig, tmp_path):
    make, store, clock, reports, fetched, activated, _ = rig
    rec = make()
    assert rec.take(desired(5, delay=60)) is None
    assert json.loads((tmp_path / DESIRED).read_text())["revision"] == 5  # on disk before the broker forgets it
    assert not rec.due()  # the random start delay (0.5 x 60 s) spreads a wave's downloads
    clock.t += 30
    assert rec.due()
    out = rec.step()
    assert out["state"] == "converged" and out["current"]["sha256"] == A and out["revision"] == 5
    assert fetched == [f"http://127.0.0.1:9/sha256/{A}"] and activated == [A]
    assert [r["state"] for r in reports] == ["fetching", "converged"]
    assert not rec.due()


def test_old_revisions_are_refused_and_a_redelivery_only_reports_again(rig):
    make, *_ , reports, fetched, activated, _ = rig
    rec = make()
    rec.take(desired(5))
    rec.step()
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
    rec.step()
    rec.take(desired(2, sha=B))
    fail["fetch"] = 5
    waits = []
    for _ in range(3):
        assert rec.due()
        out = rec.step()
        assert out["state"] == "failed" and "store not answering" in out["error"]
        assert out["current"]["sha256"] == A  # still on its working model
        if rec.next_at is not None:
            waits.append(rec.next_at - clock.t)
            clock.t = rec.next_at
    assert waits == [10, 20] and rec.next_at is None  # 10 s, 20 s, then no more until a new revision
    rec.take(desired(3, sha=B))
    fail["fetch"] = 0
    assert rec.step()["state"] == "converged" and store.cur == B


def test_a_restart_resumes_the_desired_state_and_a_damaged_file_is_ignored(rig, tmp_path):
    make, store, clock, reports, fetched, activated, fail = rig
    make().take(desired(7, delay=600))
    again = make()
    assert again.desired.revision == 7 and again.due()  # no second start delay after a restart
    assert again.take(desired(6)) == "stale"
    (tmp_path / DESIRED).write_text('{"revision": ')
    assert make().desired is None


def test_a_trt_variant_gets_its_engine_built_at_install_and_a_failed_build_keeps_the_model(rig, monkeypatch):
    """A desired trt-* variant: the engine is built after the install, before any activation; a failed build
    is the reported error and the device stays on its model (tensorrt's own logic: tests/agent/test_tensorrt.py)."""
    from device_agents import runtimes
    from device_agents.errors import StoreError

    make, store, clock, reports, fetched, activated, _ = rig
    rec = make()
    rec.take(desired(1))
    rec.step()
    builds = []

    def failing(st, sha, **kw):
        builds.append(sha)
        st.models.pop(sha, None)  # what prepare_installed does with a fresh model whose build failed
        raise StoreError("install: trt-fp16.onnx: TensorRT engine build failed: out of memory; "
                         "the device stays on its current model")

    monkeypatch.setattr(runtimes, "prepare_installed", failing)
    rec.take({**desired(2, sha=B), "variant": "trt-fp16"})
    out = rec.step()
    assert out["state"] == "failed" and "engine build failed" in out["error"] and out["current"]["sha256"] == A
    assert builds == [B] and activated == [A] and B not in store.models
    monkeypatch.setattr(runtimes, "prepare_installed", lambda st, sha, **kw: {"variant": "trt-fp16", "seconds": 1.0})
    rec.take({**desired(3, sha=B), "variant": "trt-fp16"})
    out = rec.step()
    assert out["state"] == "converged" and out["download"]["engine"]["variant"] == "trt-fp16" and store.cur == B
