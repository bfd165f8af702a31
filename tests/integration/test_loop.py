"""The closed loop on a simulated fleet of mixed profiles: tune, select --explain, report, demo."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml

from edge_kit.telemetry.store import Store, history_path

pytestmark = pytest.mark.integration
PROFILES = ("rpi4", "rpi5", "coral-usb")


@pytest.fixture(scope="module")
def mixed_artifacts(digits_files, tmp_path_factory):
    from edge_kit.compiler.pipeline import CompileRequest, compile_model
    from edge_kit.profiles import load_profile

    profiles = []
    for name in PROFILES:
        p = load_profile(name)
        profiles.append(p.model_copy(update={"variants": [v for v in p.variants if v in ("fp32", "dynamic-int8", "int8")]}))
    out = tmp_path_factory.mktemp("mixed")
    compile_model(CompileRequest(digits_files.model, profiles, out, calib=digits_files.calib, eval=digits_files.eval))
    return out / "digits"


def test_tune_leaves_every_device_feasible_or_flagged_and_a_second_run_changes_nothing(sim, mixed_artifacts, run_cli,
                                                                                      tmp_path):
    simfleet, fleet = sim(3, PROFILES)
    data = yaml.safe_load(simfleet.fleet_file.read_text())
    data["devices"][0]["constraints"] = {"max_model_mb": 0.5}  # rpi4-1: fp32 (0.76 MB) does not fit
    data["devices"][1]["constraints"] = {"max_latency_p90_ms": 0.000001}  # rpi5-1: nothing is that fast
    simfleet.fleet_file.write_text(yaml.safe_dump(data))
    args = ["tune", "--fleet", simfleet.fleet_file, "--artifacts", mixed_artifacts, "--min-runs", "50",
            "--min-seconds", "0.2", "--json"]
    code, out, err = run_cli(*args, "--rounds", "1")
    assert code == 7, err  # rpi5-1 meets no variant's constraints: tune completed, with a device outside them
    report = json.loads(out)
    # round 1 measured and switched; the rounds used up, one more decision on the health benchmarks, never acted on
    first, verify = report["rounds"]
    assert first["switched"] and not first["verify"] and report["silent"] == {}
    assert verify["verify"] and verify["measured"] == 0 and verify["switched"] == [] and "activation" not in verify
    pending = verify.get("pending", [])
    assert Store(simfleet.workdir / "edgekit-history.db").decisions(limit=3)[0]["verify"] is True
    final = report["final"]
    assert final["rpi4-1"]["feasible"] and final["rpi4-1"]["chosen"] in ("dynamic-int8", "int8")
    fp32_row = next(r for r in final["rpi4-1"]["table"] if r["variant"] == "fp32")
    assert fp32_row["violates"] == ["model <= 0.5 MB"]
    assert not final["rpi5-1"]["feasible"] and final["rpi5-1"]["violates"] == ["p90 <= 1e-06 ms"]
    assert final["coral-usb-1"]["feasible"] and final["coral-usb-1"]["chosen"] == "int8"
    store = Store(simfleet.workdir / "edgekit-history.db")
    status = store.latest_status()
    for name, d in final.items():  # every device runs what was chosen (pending: what round 1 chose)
        assert status[name]["current"]["variant"] == (first["decisions"][name]["chosen"] if name in pending else d["chosen"]), name
    measured = store.count("bench")
    code, out, err = run_cli(*args)
    again = json.loads(out)
    assert code == 7 and again["deploy"]["counts"]["skipped"] == 3 and again["infeasible"] == {
        "rpi5-1": ["p90 <= 1e-06 ms"]}
    assert again["rounds"][0]["switched"] == sorted(pending) and again["rounds"][-1]["switched"] == []
    assert again["rounds"][0]["measured"] == 0
    assert store.count("bench") == measured + len(pending)  # nothing measured again; a pending switch's health benchmark
    code, out, err = run_cli("select", "--fleet", simfleet.fleet_file, "--explain")  # the artifacts tune used
    assert code == 7 and "model <= 0.5 MB" in out and "NO" in out and "stays on" in out
    assert "infeasible 1 device(s) meet no variant's constraints" in " ".join(out.split())

    html = tmp_path / "report.html"
    code, out, err = run_cli("report", "--fleet", simfleet.fleet_file, "--out", html, "--json")
    info = json.loads(out)
    assert code == 0 and info["profiles"] == sorted(PROFILES) and info["plots"] == 6 and info["devices"] == 3
    assert "https://" not in html.read_text().split("<body>")[1][:2000]  # no network needed for the page itself
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is missing: run `bash .ci/setup` (it installs the Debian package)"
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
                          "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    assert dom.count('class="main-svg"') >= 12  # every plot was drawn (plotly draws 2+ svg layers per plot)
    assert dom.count('class="point"') >= 7  # one marker per device and variant, plus the chosen stars
    (tmp_path / "dom.html").write_text(dom)
    assert 'data-unformatted="chosen"' in dom and "max p90 50 ms" in dom, tmp_path / "dom.html"


def test_demo_runs_the_whole_loop_keeps_its_live_figures_signed_and_cleans_up(run_cli, tmp_path):
    """The demo printed its application's live figures but its history held none of them (the report's live column
    said '-'): now the agents' signed live messages covering the application's requests are stored, as the monitor
    stores them, and `edgekit report --json` lists them labelled live next to the bench ones."""
    from device_agents.identity import key_id
    from edge_kit.fleet.inventory import load_fleet

    code, out, err = run_cli("demo", "--devices", "2", "--profiles", "rpi4,coral-usb", "--keep", "--json")
    assert code == 0, err
    result = json.loads(out)
    workdir = Path(result["workdir"])
    try:
        assert [r["device"] for r in result["devices"]] == ["rpi4-1", "coral-usb-1"]
        assert result["tune"]["deploy"]["signature"].startswith("signed by key ")  # the release step it shows
        assert result["tune"]["deploy"]["signature"].endswith("(trusted)")
        for row in result["devices"]:
            assert row["variant"] and row["feasible"] and row["simulated"] is True and row["p90_ms"] > 0
            assert row["accuracy"] > 0.9 and row["power_method"].startswith("estimated:")
            live = row["live"]  # the demo's application, served by the agent: its own answers scored, the agent's figures
            assert "not_stored" not in live, live
            assert live["requests"] == 300 and live["top1"] > 0.9 and live["served"] == row["variant"]
            assert live["requests_served"] >= 300 and 0 < live["p50_ms"] <= live["p99_ms"]
            assert live["clock"].startswith("perf_counter_ns from a request read")  # as the stored message names it
            assert live["top1_source"].startswith("the demo application on this host")
        assert result["kept"] is True and workdir.is_dir()
        # the history was written where report/select/fleet status look for it: beside the fleet file
        fleet_file = Path(result["fleet_file"])
        assert result["history"] == str(history_path(fleet_file))
        leftovers = subprocess.run(["pgrep", "-f", result["workdir"]], capture_output=True, text=True).stdout.split()
        assert leftovers == []  # no sshd, broker or agent left behind

        # every live record stored is the device's own signed message: it verifies under that device's registered key
        keyring = load_fleet(fleet_file).key_store().keyring()
        with contextlib.closing(sqlite3.connect(result["history"])) as db:
            stored = [json.loads(b) for (b,) in db.execute("SELECT body FROM live ORDER BY ts, seq")]
        assert stored
        for msg in stored:
            keyring.verify(msg, msg["device"])  # raises MessageError on a forged or unsigned one
            assert msg["key_id"] == key_id(keyring.devices[msg["device"]])
        by_id = {m["msg_id"]: m for m in stored}
        for row in result["devices"]:  # the figures the demo printed are those of a stored, signed message
            msg = by_id[row["live"]["record"]["msg_id"]]
            assert msg["device"] == row["device"] and msg["model"]["variant"] == row["variant"]
            assert msg["requests"] >= 300 and msg["latency_ms"]["p50"] == row["live"]["p50_ms"]

        code, out, err = run_cli("report", "--fleet", fleet_file, "--out", tmp_path / "report.html", "--json")
        assert code == 0, err
        rows = json.loads(out)["rows"]
        for row in result["devices"]:
            mine = {r["source"]: r for r in rows if r["device"] == row["device"]}
            assert set(mine) == {"bench", "live"}, mine  # labelled live, next to its bench figures
            assert mine["live"]["msg_id"] in by_id and mine["live"]["variant"] == row["variant"]
            assert mine["live"]["requests"] >= 300 and mine["live"]["p50_ms"] > 0
            assert mine["bench"]["variant"] == row["variant"] and mine["bench"]["p90_ms"] == row["p90_ms"]
        page = (tmp_path / "report.html").read_text().split("<h2>Fleet</h2>")[1]
        cells = {r.split("</td>")[0]: r for r in page.split("<tr><td>")[1:]}
        assert "<th>bench p90 ms</th>" in page and "<th>live p50/p99 ms (requests)</th>" in page
        for row in result["devices"]:  # the fleet table's live cell: p50/p99 (requests, variant)
            live = next(r for r in rows if r["device"] == row["device"] and r["source"] == "live")
            assert f"({live['requests']:,}, {row['variant']}" in cells[row["device"]]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_tune_with_a_budget_measures_a_sample_infers_the_rest_and_switches_only_with_a_health_benchmark(
        sim, mixed_artifacts, run_cli):
    simfleet, fleet = sim(4, ("rpi4", "rpi4", "rpi5", "coral-usb"))
    data = yaml.safe_load(simfleet.fleet_file.read_text())
    # the deploy activates each profile's first variant, fp32 (0.76 MB); on rpi4-1 it does not fit, so at least
    # one device must switch, whichever variant this busy host happens to measure fastest elsewhere
    data["devices"][0]["constraints"] = {"max_model_mb": 0.5}
    simfleet.fleet_file.write_text(yaml.safe_dump(data))
    names = [d["name"] for d in data["devices"]]
    assert len(names) == 4
    args = ["tune", "--fleet", simfleet.fleet_file, "--artifacts", mixed_artifacts, "--min-runs", "50",
            "--min-seconds", "0.2", "--budget", "9", "--json"]
    code, out, err = run_cli(*args)
    assert code == 0, err
    report = json.loads(out)
    budget = report["budget"]
    assert budget["unit"] == "runs" and budget["spent"] <= 9 and budget["measured"] <= 9
    first = report["rounds"][0]
    whys = [why for _d, _v, why in first["planned"]]
    assert whys.count("sample") >= 3 and set(whys) <= {"sample", "uncertain", "near its bound", "flagged", "contradictory"}
    assert sum(len(r["planned"]) for r in report["rounds"]) == budget["measured"] or report["silent"]
    store = Store(simfleet.workdir / "edgekit-history.db")
    exhaustive = sum(len(d["table"]) for d in report["final"].values())
    assert budget["measured"] < exhaustive  # fewer benchmark runs than every candidate on every device
    decided = first["decisions"]
    assert any(d["inferred"] for d in decided.values()), decided  # round 1 decided some on inferred figures
    final = report["final"]
    pending = set(report["rounds"][-1].get("pending", []))  # rounds used up: listed, not switched
    for name in names:
        d = final[name]
        assert d["kind"] == "fleet selection" and d["chosen"], d
        sources = {r["variant"]: r["source"] for r in d["table"]}
        if name not in pending:
            assert sources[d["chosen"]] == "measured", d  # the health benchmark (or the sample) measured what it runs
        for r in d["table"]:
            assert r["source"] in ("measured", "inferred")
            if r["source"] == "inferred":
                lo, hi = r["p90_ms_interval"]
                assert lo <= r["p90_ms"] <= hi
    assert names[0] in report["rounds"][0]["switched"]  # off fp32, which does not fit it
    assert budget["health"] >= 1 and budget["health"] == sum(len(r["switched"]) for r in report["rounds"])
    status = store.latest_status()
    for name, d in final.items():
        assert status[name]["current"]["variant"] == d["chosen"] or name in pending, name
    assert report["rounds"][-1]["switched"] == []  # the last entry only decides on the health benchmarks
    recorded = store.decisions(limit=100)
    assert all(r["kind"] == "fleet selection" and "budget" in r for r in recorded)
    code, out, err = run_cli("select", "--fleet", simfleet.fleet_file, "--explain")
    assert code == 0, err
    if any(final[n]["inferred"] for n in names):
        assert "inferred" in out and "confidence" in out
    code, out, err = run_cli("fleet", "status", "--fleet", simfleet.fleet_file, "--json")
    flagged = {n: d["flagged"] for n, d in final.items() if d["flagged"]}  # sub-ms p90s on this busy host vary
    assert code == 0 and json.loads(out)["flagged"] == flagged  # the newest decision's flags, with why
    assert all("of its profile" in why or "accuracy" in why or "disagree" in why for why in flagged.values())
    code, out, err = run_cli("tune", "--fleet", simfleet.fleet_file, "--artifacts", mixed_artifacts, "--budget", "1",
                             "--budget-unit", "minutes")
    assert code != 0 and "runs or seconds" in (out + err)
