"""`tune` on a simulated fleet choosing between a LiteRT and an ONNX Runtime variant by measurement.

The digits model compiled as fp32 (LiteRT) and onnx-fp32 (ONNX Runtime) for rpi4; two simulated
devices (real sshd, broker, agents) measure both with their own runtimes, and the variant tune
chooses is checked against the measurements in the history (accuracy, then energy per inference,
then p90, the policy's order, each beyond its 10 % margin), not against a name written here.
"""

from __future__ import annotations

import json

import pytest

from edge_kit.selection import DEFAULT_MARGIN
from edge_kit.telemetry.store import Store

pytestmark = pytest.mark.integration
VARIANTS = ("fp32", "onnx-fp32")


@pytest.fixture(scope="module")
def two_runtimes(digits_files, tmp_path_factory):
    from edge_kit.compiler.pipeline import CompileRequest, compile_model
    from edge_kit.profiles import load_profile

    profile = load_profile("rpi4").model_copy(update={"variants": list(VARIANTS)})
    out = tmp_path_factory.mktemp("two-runtimes")
    manifest = compile_model(CompileRequest(digits_files.model, [profile], out, calib=digits_files.calib,
                                            eval=digits_files.eval))
    assert all(manifest.artifact(v).status == "built" for v in VARIANTS)
    return out / "digits"


def test_tune_chooses_between_litert_and_onnxruntime_by_what_the_devices_measured(sim, two_runtimes, run_cli):
    simfleet, _fleet = sim(2, ("rpi4",))
    code, out, err = run_cli("tune", "--fleet", simfleet.fleet_file, "--artifacts", two_runtimes, "--min-runs", "40",
                             "--min-seconds", "0.2", "--json")
    assert code == 0, err
    final = json.loads(out)["final"]
    store = Store(simfleet.workdir / "edgekit-history.db")
    for device, decision in final.items():
        newest: dict[str, dict] = {}
        for record in store.bench_records(device):  # oldest first: the last one per variant is the newest
            newest[record["variant"]] = record
        assert set(newest) == set(VARIANTS), device
        assert {v: newest[v]["runtime"] for v in VARIANTS} == {"fp32": "litert", "onnx-fp32": "onnxruntime"}
        chosen, other = decision["chosen"], next(v for v in VARIANTS if v != decision["chosen"])
        assert decision["feasible"] and chosen in VARIANTS, decision
        # the policy's order on these figures: accuracy, then energy per inference, then p90, each beyond the margin
        figures = {v: (newest[v]["accuracy"]["value"], newest[v]["power"]["energy_per_inference_mj"],
                       newest[v]["latency_ms"]["p90"]) for v in VARIANTS}
        (acc_c, mj_c, p90_c), (acc_o, mj_o, p90_o) = figures[chosen], figures[other]

        def beyond(a: float, b: float) -> bool:
            return abs(a - b) > DEFAULT_MARGIN * max(abs(a), abs(b))

        if acc_c != acc_o:
            assert acc_c > acc_o, (device, figures)
        elif beyond(mj_c, mj_o):
            assert mj_c < mj_o, (device, figures)
        else:
            assert p90_c < p90_o or not beyond(p90_c, p90_o), (device, figures)
        assert store.latest_status()[device]["current"]["variant"] == chosen
