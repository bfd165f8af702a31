"""A rollout gated on live traffic, on a simulated fleet whose devices serve a real application.

Three rpi4 devices serve the digits model to an application (threads calling each device's serving
API with eval images, as an app on the device would). A candidate goes to one canary; the other two
are the controls. A deliberately slowed candidate (the same task, a much wider network, its fp32
variant: tens of times the service time) is rolled back by the gate; a retrained candidate of the
same architecture is promoted. Both pass the canary's health benchmark and constraints, so the
only thing that tells them apart is the live figures.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from device_agents.serving import Client
from device_agents.store import ModelStore
from edge_kit.fleet.deploy import DeployOptions, deploy
from edge_kit.loop.rollout import LiveGate, rollout

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def slowed_artifacts(tmp_path_factory, digits_files):
    """The digits task with a much wider network (about 100 M MACs, the digits CNN has 0.3 M), trained one
    epoch: its fp32 variant passes the canary's health benchmark and constraints, and is several
    milliseconds where the digits int8 is a fraction of one."""
    from edge_kit.compiler.pipeline import CompileRequest, compile_model
    from edge_kit.examples import _digits_split, _train_and_write, tensorflow
    from edge_kit.profiles import load_profile

    tensorflow()
    import keras

    keras.utils.set_random_seed(3)
    model = keras.Sequential([
        keras.Input((8, 8, 1), name="image"),
        *[keras.layers.Conv2D(192, 3, padding="same", activation="relu") for _ in range(5)],
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ], name="digits_wide")
    files = _train_and_write(model, "digits", tmp_path_factory.mktemp("wide"), _digits_split(0), 1, {})
    profile = load_profile("rpi4").model_copy(update={"variants": ["fp32"]})  # the variant the test deploys
    out = tmp_path_factory.mktemp("wide-artifacts")
    compile_model(CompileRequest(files.model, [profile], out, calib=files.calib, eval=files.eval))
    return out / "digits"


class Traffic:
    """An application per device: classifies eval images through the device's serving API, about 150 a
    second (a camera's rate, not a flood: the machine is not saturated, so service times reflect the model)."""

    def __init__(self, devices, eval_file: Path):
        with np.load(eval_file) as data:
            self.x = data["x"].astype(np.float32)
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(Path(d.root),), daemon=True) for d in devices]

    def _run(self, root: Path) -> None:
        i = 0
        with Client(root) as app:
            while not self.stop.is_set():
                try:
                    app.predict(self.x[i % len(self.x)])
                except Exception as exc:  # noqa: BLE001 - counted: a swap must fail no request
                    self.errors.append(repr(exc))
                i += 1
                self.stop.wait(0.006)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_):
        self.stop.set()
        for t in self.threads:
            t.join(30)


def test_the_live_gate_rolls_back_a_slower_candidate_and_promotes_a_good_one(
        sim, digits_artifacts, digits_artifacts_v2, slowed_artifacts, digits_files, tmp_path):
    simfleet, fleet = sim(3)
    assert len(deploy(fleet, fleet.devices, DeployOptions(digits_artifacts, variant="int8")).succeeded) == 3
    store = {d.name: ModelStore(Path(d.root)) for d in fleet.devices}
    before = {n: s.current() for n, s in store.items()}
    # Three simulated devices share two cores (with the tests' other processes): the same model's service
    # times can differ between them by a factor, so this test's effect-size guard is 2x (a real fleet's
    # default is 1.1x); the slowed candidate is several times slower than that.
    gate = LiveGate(window_s=180, min_samples=150, alpha=0.01, min_slowdown=1.0)  # at most: ends at 150 answers
    decisions: list[dict] = []
    with Traffic(fleet.devices, digits_files.eval) as traffic:
        slow = rollout(fleet, fleet.devices, DeployOptions(slowed_artifacts, variant="fp32"), canary=0.3,
                       gate=gate, record=decisions.append)
        assert slow.stopped and slow.stopped.startswith("live gate: roll back: canaries slower"), decisions[-1]["gate"]
        assert {n: s.current() for n, s in store.items()} == before  # the canary is back, the controls untouched
        g = decisions[-1]["gate"]
        assert decisions[-1]["device"] == "rpi4-1" and g["controls"] == ["rpi4-2", "rpi4-3"]
        assert g["canary_p50_ms"] > 2 * g["control_p50_ms"] and g["p_value"] < 0.01 and g["canary_samples"] >= 150

        good = rollout(fleet, fleet.devices, DeployOptions(digits_artifacts_v2, variant="int8"), canary=0.3,
                       gate=gate, record=decisions.append)
        assert good.stopped is None and [r.status for r in good.results] == ["succeeded"] * 3, decisions[-1]["gate"]
        g = decisions[-1]["gate"]
        assert decisions[-1]["switch"] is True and g["action"] == "promote"
        assert g["canary_p50_ms"] < g["control_p50_ms"] * 2 or g["p_value"] >= 0.01, g
    new = ModelStore(Path(fleet.devices[0].root)).current()
    assert new != before["rpi4-1"] and all(s.current() == new for s in store.values())
    assert traffic.errors == []  # three activations and a rollback under load: no request failed
    from edge_kit.telemetry.report import build_report
    from edge_kit.telemetry.store import Store

    history = Store(tmp_path / "h.db")  # what `edgekit deploy --gate live` records, shown by the report
    for d in decisions:
        history.add_decision(d)
    build_report(history, tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert "Rollout gate decisions" in page and page.count("roll back") >= 1 and "promote" in page
