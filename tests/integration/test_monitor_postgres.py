"""The monitor on a real PostgreSQL history: workers in several processes, the CLI's --history URL, and a
database that goes away mid-run. The broker is a real Mosquitto; the helpers are test_monitor's."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
import test_monitor
from harness import wait_until
from test_monitor import FLEET, bench, monitor_session, send, signed

from edge_kit.sim.postgres import PostgresServer
from edge_kit.telemetry.store import open_history
from edgekit_protocol import messages

pytestmark = pytest.mark.integration
fleet, publisher = test_monitor.fleet, test_monitor.publisher  # the same fixtures: a two-device fleet, a publisher

_WORKER = """
import json, sys
from edge_kit.fleet.inventory import load_fleet
from edge_kit.telemetry.monitor import Monitor
from edge_kit.telemetry.store import open_history
mon = Monitor(load_fleet(sys.argv[1]), open_history(sys.argv[2]), share="edgekit", workers=2).start()
print("ready", flush=True)
sys.stdin.readline()  # the test says stop
mon.stop()
print(json.dumps(vars(mon.stats)), flush=True)
"""


def count(url: str, table: str = "bench") -> int:
    """Return the rows of ``table`` in the database at ``url`` (its own connection, a reader's: a history of a newer
    schema is counted too)."""
    with open_history(url, write=False) as store:
        return store.count(table)


def set_schema(spec: str, version: int) -> None:
    """Record schema ``version`` in the history at ``spec``, as a newer edge-kit's upgrade does (its own connection)."""
    with open_history(spec, write=False) as other:
        other._execute("UPDATE edgekit_schema SET version = ? WHERE name = 'history'", (version,))


def test_two_worker_processes_on_a_shared_subscription_store_each_record_once_in_postgresql(fleet, publisher,
                                                                                           postgres_url, tmp_path):
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path / "fleet.yaml"), postgres_url],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    try:
        assert [w.stdout.readline().strip() for w in workers] == ["ready", "ready"], [w.stderr.read() for w in workers]
        n = 400
        for i in range(1, n + 1):
            device = f"d{1 + i % 2}"
            publisher.publish(messages.topic(FLEET, device, "bench"), messages.encode(signed(bench(device, i))), qos=1)
        assert wait_until(lambda: count(postgres_url) >= n, 60), count(postgres_url)
        time.sleep(0.3)
        stats = []
        for w in workers:
            out, err = w.communicate("stop\n", timeout=60)
            assert w.returncode == 0, err
            stats.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    stored = [s["stored"] for s in stats]
    assert sum(stored) == n and min(stored) > n // 4, stats  # both took a share, none doubled
    assert count(postgres_url) == n and sum(s["invalid"] for s in stats) == 0


def test_cli_commands_take_a_postgresql_history(fleet, publisher, postgres_url, tmp_path, run_cli):
    fleet_file = tmp_path / "fleet.yaml"

    cid = monitor_session(fleet, "cli-postgres")

    def feed():
        send(publisher, "status", messages.envelope("status", FLEET, "d1", 1, {
            "state": "online", "current": {"variant": "int8", "sha256": "a" * 64}}))
        send(publisher, "bench", bench("d1", 1, p90=3.25))
        send(publisher, "bench", b"garbage")

    threading.Thread(target=feed, daemon=True).start()
    code, out, err = run_cli("monitor", "--fleet", fleet_file, "--history", postgres_url, "--client-id", cid,
                             "--duration", "3", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["stored"] == 2 and summary["invalid"] == 1
    assert summary["store"].startswith("postgresql://edgekit@") and ":" not in summary["store"].split("@")[0][13:]
    assert count(postgres_url) == 1 and count(postgres_url, "invalid") == 1
    with open_history(postgres_url) as store:  # what a monitor started again charges each device's ingest budget with
        seconds = store.stored_since(time.time() - 600)
        assert list(seconds) == ["d1"] and sum(n for _, n in seconds["d1"]) == 2  # status, bench
        assert all(time.time() - 600 <= t <= time.time() for t, _ in seconds["d1"])
        assert store.stored_since(time.time() + 600) == {}
    assert not (tmp_path / "edgekit-history.db").exists()  # nothing went to the default SQLite file
    code, out, err = run_cli("fleet", "status", "--fleet", fleet_file, "--history", postgres_url)
    assert code == 0 and "d1" in out and "int8" in out and "3.25" in out and "never seen" in out, err
    code, out, err = run_cli("fleet", "status", "--fleet", fleet_file, "--history", postgres_url, "--json")
    assert code == 0 and json.loads(out)["bench"][f"d1/{'a' * 64}"]["latency_ms"]["p90"] == 3.25
    code, out, err = run_cli("report", "--history", postgres_url, "--out", tmp_path / "r.html", "--json")
    assert code == 0 and json.loads(out)["devices"] >= 1, err
    code, out, err = run_cli("select", "--fleet", fleet_file, "--history", postgres_url)
    assert code == 2 and "no tune has run against this history" in err and "postgresql://edgekit@" in err
    code, out, err = run_cli("rollout", "list", "--fleet", fleet_file, "--history", postgres_url, "--json")
    assert code == 0 and json.loads(out) == [], err
    code, out, err = run_cli("rollout", "status", "r1", "--fleet", fleet_file, "--history", postgres_url)
    assert code != 0 and "not in the history" in err


def test_a_database_stopped_mid_run_stops_the_monitor_with_one_line_and_loses_nothing(fleet, publisher, tmp_path, run_cli):
    fleet_file = tmp_path / "fleet.yaml"
    with PostgresServer(settings={"fsync": "off"}) as server:
        url = server.url
        stored_before = threading.Event()

        cid = monitor_session(fleet, "stopped-mid-run")

        def feed():
            for seq in range(1, 51):
                send(publisher, "bench", bench("d1", seq))
            stored_before.set() if wait_until(lambda: count(url) == 50, 20) else None
            server.stop()  # a fast shutdown: the monitor's connection is cut
            for seq in range(51, 61):
                send(publisher, "bench", bench("d1", seq))

        threading.Thread(target=feed, daemon=True).start()
        started = time.monotonic()
        code, out, err = run_cli("monitor", "--fleet", fleet_file, "--history", url, "--client-id", cid, "--duration", "40",
                                 "--json")
        took = time.monotonic() - started
        assert stored_before.is_set()
        assert code == 6 and took < 30, (code, took, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith(f"edgekit: error: the history database postgresql://edgekit@127.0.0.1:{server.port}/edgekit failed")
        assert server.password not in err and "check that the server is up" in err
        server.start()
        assert count(url) == 50  # what was stored before is whole; nothing half-written
        # What the monitor got but could not store was never acknowledged: the broker kept it for the
        # persistent session, and the next run stores it, once.
        code, out, err = run_cli("monitor", "--fleet", fleet_file, "--history", url, "--client-id", cid, "--duration", "3",
                                 "--json")
        summary = json.loads(out)
        assert code == 0 and summary["stored"] == 10 and summary["gaps"] == 0, (summary, err)
        assert count(url) == 60


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_history_a_newer_edge_kit_upgrades_mid_run_stops_the_monitor_with_one_line_and_loses_nothing(
        fleet, publisher, tmp_path, run_cli, request, backend):
    """The schema version was checked at open only: a monitor running when a newer edge-kit upgraded the history (a
    --share worker updated first) kept writing to it. Now each batch asks first: the next batch is refused with the
    line a writer gets at open, exit 6, nothing of it stored or acknowledged, so the broker keeps it for the next run.
    Its refused messages too: the check of a batch kept them as invalid before the store asked (twice: once more when
    the broker sent them again)."""
    from edge_kit.telemetry.store import SCHEMA_VERSION

    fleet_file = tmp_path / "fleet.yaml"
    spec = str(tmp_path / "h.db") if backend == "sqlite" else request.getfixturevalue("postgres_url")
    with open_history(spec) as store:
        where = store.where  # as the refusal names it (a URL without its password)
    stored_before = threading.Event()
    cid = monitor_session(fleet, f"upgraded-mid-run-{backend}")

    def feed():
        for seq in range(1, 21):
            send(publisher, "bench", bench("d1", seq))
        if wait_until(lambda: count(spec) == 20, 20):
            stored_before.set()
        set_schema(spec, SCHEMA_VERSION + 1)
        send(publisher, "bench", b"garbage")  # refused by the check of the batch after the upgrade
        for seq in range(21, 31):
            send(publisher, "bench", bench("d1", seq))

    threading.Thread(target=feed, daemon=True).start()
    code, out, err = run_cli("monitor", "--fleet", fleet_file, "--history", spec, "--client-id", cid, "--duration", "40",
                             "--json")
    assert stored_before.is_set() and code == 6, (code, err)
    assert err == (f"edgekit: error: the history {where} was written by a newer edge-kit (schema version "
                   f"{SCHEMA_VERSION + 1}; this one writes {SCHEMA_VERSION}) and this command would write to it: upgrade "
                   f"edge-kit on this host to the version that wrote it (schema {SCHEMA_VERSION + 1}), then run again\n")
    assert count(spec) == 20 and count(spec, "invalid") == 0
    set_schema(spec, SCHEMA_VERSION)  # this edge-kit's again: the next run stores what the broker kept, once
    code, out, err = run_cli("monitor", "--fleet", fleet_file, "--history", spec, "--client-id", cid, "--duration", "3",
                             "--json")
    assert code == 0 and json.loads(out)["stored"] == 10, (out, err)
    assert count(spec) == 30 and count(spec, "invalid") == 1


def test_a_share_worker_no_batch_reaches_stops_when_a_newer_edge_kit_upgrades_the_history(fleet, tmp_path,
                                                                                           monkeypatch):
    """The schema version was asked before each batch only: a --share worker of a quiet fleet, no batch reaching it,
    kept running its gap scan on the history a newer edge-kit upgraded, writing its lease and marks every GAP_SCAN_S.
    Now each scan asks first: the worker stops with the line a writer gets at open, and scans no more."""
    from edge_kit.telemetry import monitor
    from edge_kit.telemetry.store import SCHEMA_VERSION

    monkeypatch.setattr(monitor, "GAP_SCAN_S", 0.2)
    spec = str(tmp_path / "h.db")
    mon = monitor.Monitor(fleet, open_history(spec), share="quiet", workers=1, verify_in_child=False).start()
    try:
        def lease():
            with open_history(spec, write=False) as other:
                return other._rows("SELECT owner, seen FROM scan_lease")

        assert wait_until(lambda: lease() != [], 10)
        set_schema(spec, SCHEMA_VERSION + 1)
        assert wait_until(lambda: mon.failed is not None, 10)
        assert str(mon.failed).startswith(f"the history {spec} was written by a newer edge-kit (schema version "
                                          f"{SCHEMA_VERSION + 1}; this one writes {SCHEMA_VERSION})")
        seen = lease()
        time.sleep(0.5)
        assert lease() == seen  # no scan since
    finally:
        mon.stop()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_nul_or_a_lone_surrogate_from_a_device_is_refused_and_counted_and_the_rest_stored(fleet, publisher, tmp_path,
                                                                                           request, backend):
    """A device (compromised, or its runtime's odd text) signs ``\\u0000`` (PostgreSQL's text columns refuse
    it: the history failed and the monitor stopped, and the persistent session sent it again on every run;
    SQLite stored it) or sends a lone ``\\ud800`` (no UTF-8 form, so unsignable: it was refused as a bad
    signature). Now each is refused at decode naming why, counted and kept as invalid; the rest is stored."""
    from edge_kit.telemetry.monitor import Monitor

    spec = str(tmp_path / "h.db") if backend == "sqlite" else request.getfixturevalue("postgres_url")
    store = open_history(spec)
    mon = Monitor(fleet, store).start()
    try:
        send(publisher, "bench", bench("d1", 1))
        send(publisher, "bench", bench("d1", 2, variant="int8\x00"))  # signed by d1's own key
        lone = messages.encode(signed(bench("d1", 3))).replace(b'"variant":"int8"', b'"variant":"\\ud800"')
        send(publisher, "bench", lone)
        send(publisher, "live", messages.envelope("live", FLEET, "d1", 4, {
            "model": {"variant": "\x00", "sha256": "a"}, "requests": 1, "errors": 0, "window": 1}))
        send(publisher, "bench", bench("d1", 5))
        assert wait_until(lambda: mon.stats.received == 5, 15), (mon.stats, mon.failed, list(mon.alerts))
    finally:
        mon.stop()
    assert mon.failed is None
    assert sorted(r["seq"] for r in store.bench_records("d1")) == [1, 5]
    assert mon.stats.invalid == 3 == store.count("invalid") and store.count("live") == 0
    reasons = [a.text for a in mon.alerts if a.kind == "refused"]
    assert len(reasons) == 3 and all("holds a NUL character or a lone UTF-16 surrogate" in r for r in reasons), reasons
    store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_bench_sha256_too_long_for_an_index_is_refused_and_counted_and_the_rest_stored(fleet, publisher, tmp_path,
                                                                                        request, backend):
    """A device signs a bench record whose ``sha256`` is 8,000 random characters: PostgreSQL cannot index it (an index
    row is at most 2,704 bytes), so the batch failed, the monitor stopped (``failed``, exit 6: "check that the server
    is up") and the persistent session sent it again on every run, while SQLite stored it. Now it is refused at
    decode on both, counted and kept as invalid; the records around it are stored."""
    import secrets

    from edge_kit.telemetry.monitor import Monitor

    spec = str(tmp_path / "h.db") if backend == "sqlite" else request.getfixturevalue("postgres_url")
    store = open_history(spec)
    mon = Monitor(fleet, store).start()
    try:
        send(publisher, "bench", bench("d1", 1))
        long = bench("d1", 2)
        long["sha256"] = secrets.token_hex(4000)  # signed by d1's own key
        send(publisher, "bench", long)
        send(publisher, "bench", bench("d1", 3))
        assert wait_until(lambda: mon.stats.received == 3, 15), (mon.stats, mon.failed, list(mon.alerts))
    finally:
        mon.stop()
    assert mon.failed is None, mon.failed
    assert sorted(r["seq"] for r in store.bench_records("d1")) == [1, 3]
    assert mon.stats.invalid == 1 == store.count("invalid")
    reasons = [a.text for a in mon.alerts if a.kind == "refused"]
    assert len(reasons) == 1 and "bench: sha256 is not a text of 1 to 128 characters" in reasons[0], reasons
    store.close()


def test_a_record_a_latin1_database_cannot_hold_is_refused_and_counted_and_its_batch_stored(fleet, publisher,
                                                                                         postgres_url):
    """A PostgreSQL database created with ENCODING 'LATIN1' (or SQL_ASCII) cannot hold every character a device may
    sign (a variant named in Cyrillic): psycopg encoded the batch as LATIN1 in Python and raised UnicodeEncodeError,
    which the writer took for a bug, so the whole batch was acknowledged and lost, nothing counted. Now the
    connection speaks UTF-8, the server refuses that record (SQLSTATE 22P05), and the monitor stores the batch one
    record at a time: that one is counted and kept as invalid, the others are stored. (SQLite is always UTF-8 and
    stores it.)"""
    import psycopg

    from edge_kit.telemetry.monitor import Monitor

    url = postgres_url.rsplit("/", 1)[0] + "/latin1_" + postgres_url.rsplit("/", 1)[1]
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {url.rsplit('/', 1)[1]} ENCODING 'LATIN1' TEMPLATE template0 "
                     "LC_COLLATE 'C' LC_CTYPE 'C'")
    store = open_history(url)
    mon = Monitor(fleet, store).start()
    try:
        mon.client.loop_stop()  # the broker holds them meanwhile: delivered at once, they are checked as one batch
        for m in (bench("d1", 1), bench("d1", 2, variant="модель"), bench("d1", 3)):
            send(publisher, "bench", m)
        mon.client.loop_start()
        assert wait_until(lambda: mon.stats.received == 3 and mon.stats.stored + mon.stats.invalid == 3, 15), \
            (mon.stats, mon.failed, list(mon.alerts))
    finally:
        mon.stop()
    assert mon.failed is None, mon.failed
    assert sorted(r["seq"] for r in store.bench_records("d1")) == [1, 3]
    assert mon.stats.invalid == 1 == store.count("invalid") and mon.stats.stored == 2
    reasons = [a.text for a in mon.alerts if a.kind == "refused"]
    assert len(reasons) == 1 and "refused a record" in reasons[0] and "LATIN1" in reasons[0], reasons
    store.close()


def _hostile() -> list[tuple[str, bytes, bool]]:
    """Return ``(what, payload, stored)`` for content a compromised device (signed) or anyone (unsigned) may send on
    d1's bench topic: ``stored`` when the history must keep it (as received), else it must be refused and counted."""
    import secrets

    def body(seq: int, **fields) -> dict:
        return {**bench("d1", seq), **fields}

    def nested(levels: int) -> list:  # lists ``levels`` deep (the message around them is one more level)
        value: list = []
        for _ in range(levels - 1):
            value = [value]
        return value

    def raw(m: dict, old: bytes, new: bytes) -> bytes:  # signed, then altered: refused before or at its signature
        return messages.encode(signed(m)).replace(old, new, 1)

    return [
        ("a 60 KB variant name", messages.encode(signed(body(1, variant="v" + secrets.token_hex(30_000)))), True),
        ("a 400-digit integer outside the columns", messages.encode(signed(body(2, extra=10 ** 400))), True),
        ("noncharacters and U+10FFFF", messages.encode(signed(body(3, variant="\uffff\ufffe\U0010ffff"))), True),
        ("the text \\u0000, escaped", messages.encode(signed(body(4, note="\\u0000 \\ud800"))), True),
        ("nesting 32 levels", messages.encode(signed(body(5, extra=nested(31)))), True),
        ("a 4,000-character sha256", messages.encode(signed(body(6, sha256=secrets.token_hex(2000)))), False),
        ("a NUL, signed", messages.encode(signed(body(7, variant="a\x00"))), False),
        ("a lone surrogate", raw(body(8), b'"variant":"int8"', b'"variant":"\\udfff"'), False),
        ("a key twice", raw(body(9), b'"variant":"int8"', b'"variant":"int8","variant":"fp32"'), False),
        ("nesting 41 levels", messages.encode(signed(body(10, extra=nested(40)))), False),
        ("a 5,000-digit integer", raw(body(11), b'"runs":100', b'"runs":' + b"9" * 5000), False),
        ("a seq beyond 64 bits", raw(body(12), b'"seq":12', b'"seq":' + str(2 ** 64).encode()), False),
        ("not UTF-8, unsigned", b'{"a":"\xff\x00"}', False),
        ("a NUL, unsigned", b'{"schema":"edgekit.bench/1","device":"d1\\u0000"}', False),
    ]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_hostile_content_is_stored_as_received_or_refused_and_counted_the_same_on_both_backends(fleet, publisher,
                                                                                              tmp_path, request, backend):
    """Every kind of hostile content, one after the other among good records: the monitor never fails, every message
    is either stored (its body the payload's text, byte for byte) or refused, counted and kept as invalid, and the
    good records after each are stored; which is which is the same on SQLite and PostgreSQL."""
    from edge_kit.telemetry.monitor import Monitor

    spec = str(tmp_path / "h.db") if backend == "sqlite" else request.getfixturevalue("postgres_url")
    store = open_history(spec)
    hostile = _hostile()
    mon = Monitor(fleet, store).start()
    try:
        for i, (_, payload, _) in enumerate(hostile):
            send(publisher, "bench", payload)
            send(publisher, "bench", bench("d1", 100 + i))
        assert wait_until(lambda: mon.stats.received == 2 * len(hostile), 30), (mon.stats, mon.failed, list(mon.alerts))
    finally:
        mon.stop()
    assert mon.failed is None, mon.failed
    kept = {json.loads(b)["seq"]: b for (b,) in store._rows("SELECT body FROM bench")}
    want = {json.loads(p)["seq"]: p.decode() for _, p, ok in hostile if ok}
    assert {s: b for s, b in kept.items() if s < 100} == want, [w for w, _, ok in hostile if ok]
    assert sorted(s for s in kept if s >= 100) == list(range(100, 100 + len(hostile)))
    refused = sum(not ok for _, _, ok in hostile)
    assert mon.stats.invalid == refused == store.count("invalid"), [a.text for a in mon.alerts if a.kind == "refused"]
    assert mon.stats.stored == len(kept) == 2 * len(hostile) - refused
    store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_workers_of_a_shared_subscription_raise_a_silent_devices_alert_once(fleet, publisher, tmp_path, request, backend):
    """`edgekit monitor --share NAME --workers N`: every worker judged the silence of each device the history holds,
    so N workers raised (and printed) N copies of "d1 silent". Now one worker opens the alert in the history's alerts
    table (one open alert per device and kind) and raises it; the others, finding it open, do not."""
    from edge_kit.telemetry.monitor import Monitor

    spec = str(tmp_path / "h.db") if backend == "sqlite" else request.getfixturevalue("postgres_url")
    with open_history(spec) as store:  # d1 was heard 10 s ago, then fell silent
        store.add_many([("bench", signed(bench("d1", 1)))], received=[time.time() - 10])
    workers = [Monitor(fleet, open_history(spec), share="edgekit", workers=2, silence_s=1.0) for _ in range(2)]
    try:
        for mon in workers:
            mon.start()
        assert wait_until(lambda: any(a.kind == "silent" for mon in workers for a in mon.alerts), 15)
        time.sleep(1.5)  # both workers have judged the silence many times since (every 0.2 s)
        for mon in workers:
            assert mon.alert_states()["silent"] == {"d1"}
    finally:
        for mon in workers:
            mon.stop()
            mon.store.close()
    alerts = [a.text for mon in workers for a in mon.alerts]
    assert len(alerts) == 1 and alerts[0].startswith("d1 silent for "), alerts
    with open_history(spec) as store:
        rows = store.alerts()
    assert [(r["device"], r["kind"], r["cleared_at"]) for r in rows] == [("d1", "silent", None)]
    assert rows[0]["detail"] == alerts[0]
