"""The host history store: one row per message id, latest views."""

from __future__ import annotations

import time

from edge_kit.telemetry.store import Store
from edgekit_protocol import messages


def bench(device, sha, p90, seq):
    return messages.envelope("bench", "f", device, seq, {"variant": "int8", "sha256": sha, "latency_ms": {"p90": p90},
                                                       "runs": 10, "power": {}, "simulated": False})


def test_duplicates_are_stored_once_and_latest_views_pick_the_newest(tmp_path):
    store = Store(tmp_path / "h.db")
    a, b = bench("d1", "s1", 1.0, 1), bench("d1", "s1", 2.0, 2)
    b["ts"] = a["ts"] + 1
    assert store.add_many([("bench", a), ("bench", a), ("bench", b)]) == 2
    assert not store.add("bench", a)
    assert store.count("bench") == 2
    assert store.latest_bench()[("d1", "s1")]["latency_ms"]["p90"] == 2.0
    c = bench("d2", "s1", 3.0, 1)
    store.add("bench", c)
    assert {k: v["latency_ms"]["p90"] for k, v in store.latest_bench().items()} == {("d1", "s1"): 2.0, ("d2", "s1"): 3.0}
    assert [r["latency_ms"]["p90"] for r in store.recent_bench("d1")[("d1", "s1")]] == [2.0, 1.0]  # newest first
    assert list(store.recent_bench("d2")) == [("d2", "s1")] and store.recent_bench("d1", keep=1)[("d1", "s1")] == [b]
    off = messages.envelope("status", "f", "d1", 1, {"state": "offline"})
    store.add("status", off)
    assert store.latest_status()["d1"]["state"] == "offline"
    store.add_decision({"device": "d1", "chosen": "int8", "current": None, "feasible": True, "switch": True})
    assert store.decisions("d1")[0]["chosen"] == "int8"


def test_several_workers_can_open_one_new_store_at_the_same_moment(tmp_path):
    """Monitor workers start together on one history file; switching it to WAL must not fail one."""
    import subprocess
    import sys

    code = "import sys; from edge_kit.telemetry.store import Store; Store(sys.argv[1]).add_gap('d', 'bench', 1, 1)"
    for round_ in range(5):
        path = tmp_path / f"h{round_}.db"
        procs = [subprocess.Popen([sys.executable, "-c", code, str(path)], stderr=subprocess.PIPE) for _ in range(3)]
        errors = [p.communicate(timeout=60)[1].decode() for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], errors
        assert Store(path).count("gaps") == 3


def test_rollout_state_has_one_owner_at_a_time_and_device_rows_update_in_place(tmp_path):
    store = Store(tmp_path / "h.db")
    store.save_rollout("r1", "running", {"variant": "int8"})
    assert store.claim_rollout("r1", "host-a:1", stale_s=60) is None
    assert store.claim_rollout("r1", "host-b:2", stale_s=60) == "host-a:1"  # a second start is refused
    time.sleep(0.05)
    assert store.claim_rollout("r1", "host-b:2", stale_s=0.02) is None  # a dead owner's claim goes stale (database clock)
    assert store.claim_rollout("nope", "host-b:2", stale_s=60) is not None
    store.set_rollout_devices("r1", [{"device": "d1", "wave": 0, "state": "sent", "revision": 5, "detail": {"a": 1}},
                                     {"device": "d2", "wave": 1, "state": "sent", "revision": 6}])
    store.set_rollout_devices("r1", [{"device": "d1", "wave": 0, "state": "converged", "revision": 5}])
    rows = store.rollout_devices("r1")
    assert {d: r["state"] for d, r in rows.items()} == {"d1": "converged", "d2": "sent"} and rows["d2"]["revision"] == 6
    store.set_rollout_state("r1", "aborting")
    assert store.heartbeat_rollout("r1", "host-b:2") == "aborting"
    store.release_rollout("r1", "host-b:2")
    assert store.rollout("r1")["owner"] is None and store.rollout("r1")["body"] == {"variant": "int8"}
    assert [r["id"] for r in store.rollouts()] == ["r1"] and store.rollout("r2") is None


def test_a_history_path_that_cannot_be_a_file_is_one_line_naming_it(tmp_path, run_cli):
    """A --history whose folder is a file, or which is itself a folder: HistoryError naming the path, exit 6."""
    import pytest

    from edge_kit.errors import HistoryError
    from edge_kit.telemetry.store import open_history

    (tmp_path / "afile").write_text("x")
    for spec in (tmp_path / "afile" / "h.db", tmp_path):
        with pytest.raises(HistoryError, match=f"history file {spec}"):
            open_history(spec)
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("fleet: sim\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                     "devices:\n  - {name: d1, host: 127.0.0.1}\n")
    code, _out, err = run_cli("fleet", "status", "--fleet", fleet, "--history", tmp_path / "afile" / "h.db")
    # fleet status only reads: a --history file that is not there is named before anything is opened (exit 2)
    assert code == 2 and err.count("\n") == 1 and "afile/h.db: no history store; check --history" in err, err


def test_select_finds_the_last_tunes_artifacts_behind_a_newer_gate_decision(tmp_path, run_cli):
    """`deploy --gate live` records decisions without artifacts; `select` without --artifacts still takes the
    folder of the last tune, not 'no tune has run'."""
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("fleet: sim\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                     "devices:\n  - {name: d1, host: 127.0.0.1}\n")
    store = Store(tmp_path / "edgekit-history.db")
    store.add_decision({"device": "d1", "chosen": "int8", "current": None, "feasible": True, "switch": True,
                        "artifacts": str(tmp_path / "tuned-artifacts")})
    store.add_decision({"device": "d1", "kind": "live gate", "chosen": "int8", "current": None, "feasible": True,
                        "switch": True, "gate": {"action": "promote"}})
    store.close()
    code, _out, err = run_cli("select", "--fleet", fleet)
    assert code != 0 and "tuned-artifacts" in err and "no tune has run" not in err, err


def test_a_last_will_received_after_a_switch_does_not_take_the_device_back_to_its_old_model(tmp_path):
    """An agent's last will is signed when it connects; the broker publishes it when the device drops off, after
    any switch since. The history took its stale `current` as the device's model (fleet status, select's no-flap
    rule, everything reading latest_status). Now an offline status takes `current` from the newest status (by
    seq) of the same connection; another connection's statuses (a re-flashed device counting seq from 1) never."""
    store = Store(tmp_path / "h.db")

    def status(seq, state, sha, conn):
        return messages.envelope("status", "f", "d1", seq, {"state": state, "current": {"sha256": sha}, "connection": conn})

    store.add_many([("status", status(20, "online", "X", "c0")), ("status", status(31, "online", "A", "c1")),
                    ("status", status(32, "online", "B", "c1")), ("status", status(30, "offline", "A", "c1"))],
                   received=[100.0, 200.0, 300.0, 400.0])  # the will (seq 30) arrives last
    latest = store.latest_status()["d1"]
    assert latest["state"] == "offline" and latest["seq"] == 30 and latest["current"]["sha256"] == "B"
    store.add_many([("status", status(2, "online", "C", "c2")), ("status", status(1, "offline", "C0", "c2"))],
                   received=[600.0, 700.0])  # re-flashed: seq from 1 again, a new connection; its will arrives
    assert store.latest_status()["d1"]["current"]["sha256"] == "C"
    store.add_many([("status", status(3, "offline", "D", "c3"))], received=[800.0])  # a clean stop: its own word
    assert store.latest_status()["d1"]["current"]["sha256"] == "D"


def _fleet_with_a_newer_history(tmp_path):
    """Write a fleet file (its broker unreachable) and, beside it, its history as a newer edge-kit left it: a bench
    record of d1 and rollout r1 over d1, no host driving it, at schema version SCHEMA_VERSION + 1. Return the fleet
    file, the history file and the error a command that would write it prints (stderr)."""
    from edge_kit.telemetry.store import SCHEMA_VERSION

    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("fleet: sim\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                     "devices:\n  - {name: d1, host: 127.0.0.1}\n")
    history = tmp_path / "edgekit-history.db"
    with Store(history) as store:
        store.add("bench", bench("d1", "s1", 1.0, 1))
        store.save_rollout("r1", "running", {"id": "r1", "order": ["d1"], "targets": {"d1": {"variant": "int8"}}})
        store._execute("UPDATE edgekit_schema SET version = ? WHERE name = 'history'", (SCHEMA_VERSION + 1,))
    want = (f"edgekit: error: the history {history} was written by a newer edge-kit (schema version "
            f"{SCHEMA_VERSION + 1}; this one writes {SCHEMA_VERSION}) and this command would write to it: upgrade "
            f"edge-kit on this host to the version that wrote it (schema {SCHEMA_VERSION + 1}), then run again\n")
    return fleet, history, want


def test_the_fleets_history_a_newer_edge_kit_wrote_is_read_by_fleet_status_and_refused_to_monitor(tmp_path, run_cli):
    """The history beside the fleet file, of a newer schema: `edgekit monitor` (and `history upgrade`) opened it as
    current and wrote it. Now they stop in one line naming the file, both versions and what to run, exit 6; `fleet
    status`, which only reads, still shows it: it opens the fleet's history it finds as a reader."""
    import json

    from edge_kit.telemetry.store import SCHEMA_VERSION

    fleet, history, want = _fleet_with_a_newer_history(tmp_path)
    for command in (["monitor", "--fleet", fleet, "--duration", "1"], ["history", "upgrade", "--fleet", fleet]):
        assert run_cli(*command) == (6, "", want)
    code, out, err = run_cli("fleet", "status", "--fleet", fleet, "--history-only", "--json")
    assert code == 0 and list(json.loads(out)["bench"]) == ["d1/s1"], err
    with Store(history, write=False) as store:
        assert store._schema_version() == SCHEMA_VERSION + 1


def test_rollout_status_refresh_which_writes_the_devices_states_is_refused_a_newer_history_and_status_reads_it(
        tmp_path, run_cli):
    """`rollout status` opens the fleet's history it finds as a reader, so a newer edge-kit's history is not refused
    to it; with --refresh it stores the states it reads from the broker in that history, a write no newer-schema
    check stopped. With --refresh it opens it as a writer now: refused in one line before the broker is asked, exit
    6, nothing changed; without it, it reads the rollout as before."""
    import json

    from edge_kit.telemetry.store import SCHEMA_VERSION

    fleet, history, want = _fleet_with_a_newer_history(tmp_path)
    assert run_cli("rollout", "status", "r1", "--fleet", fleet, "--refresh") == (6, "", want)
    code, out, err = run_cli("rollout", "status", "r1", "--fleet", fleet, "--json")
    assert code == 0 and [r["device"] for r in json.loads(out)["devices"]] == ["d1"], err
    with Store(history, write=False) as store:
        assert store._schema_version() == SCHEMA_VERSION + 1 and store.rollout_devices("r1") == {}
