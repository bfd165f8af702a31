"""The history's side of the ``edgekit monitor --share`` gap scan and of a monitor's start, on both backends (a SQLite
file and a real PostgreSQL server): what one scan reads is bounded, a late record leaves the gap recorded for it, and a
start reads a bounded number of rows whatever the history's size; so do the newest-per-device reads of `fleet status`,
`report` and /metrics."""

from __future__ import annotations

import json
import math
import random
import time

import pytest

from edge_kit.telemetry.monitor import share_gaps
from edge_kit.telemetry.store import (
    KINDS,
    LATE_S,
    SCHEMA_VERSION,
    SEQ_KINDS,
    STATUS_ORDER_SCAN,
    newer_status,
    open_history,
)
from edgekit_protocol import messages

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def history(request, tmp_path):
    spec = str(tmp_path / "h.db") if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    store = open_history(spec)
    yield store
    store.close()


def tele(device, seq, seqs=None):
    return ("telemetry", messages.envelope("telemetry", "f", device, seq, {"seqs": seqs} if seqs else {}))


def scan(store, owner, limit, settled_by=None):
    """One gap scan as a worker runs it: take the lease, read, judge, record; return the rows read and the gaps."""
    assert store.take_scan_lease(owner)
    rows = store.seq_window(limit)
    marks, gaps = share_gaps(rows, time.time() if settled_by is None else settled_by, limit)
    assert store.record_scan(owner, marks, gaps)
    return rows, gaps


def test_a_scan_reads_at_most_its_bound_of_a_stream_and_the_next_goes_on_from_where_it_stopped(history):
    """The first scan of a group whose marks lagged far behind read every row stored since them in one query: on a big
    history it outlasted the lease (30 s) and never finished. Now a scan reads at most ``limit`` rows of a stream past
    its mark, judges up to the last of them (never past it: a telemetry claim beyond is the next scan's), and the next
    scan goes on from there: the same gaps, found a bounded piece at a time."""
    history.add_many([tele("d1", 0), ("bench", messages.envelope("bench", "f", "d1", 0, {"variant": "v"}))])
    history.follow_seqs(["d1"])  # the marks stand at 0
    lost = {300, 801, 802}
    top = 1200
    history.add_many([tele("d1", n, {"bench": 5} if n == top else None) for n in range(1, top + 1) if n not in lost],
                     received=[time.time() - 120] * (top - len(lost)))
    found, scans = [], 0
    while True:
        rows, gaps = scan(history, "w", 100)
        scans += 1
        assert len([r for r in rows if r[2] is not None]) <= 100
        found += gaps
        if not [r for r in rows if r[2] is not None]:
            break
    assert found == [("d1", "telemetry", 300, 300), ("d1", "telemetry", 801, 802), ("d1", "bench", 1, 5)]
    assert scans == 13  # 1,197 rows, 100 a scan, then the one that finds nothing more
    assert sorted(history._rows("SELECT kind, scanned_to FROM seq_scans WHERE device = 'd1'")) == [
        ("bench", 5), ("live", -1), ("shadow", -1), ("telemetry", top)]
    # what a scan reads does not grow with the rows below the marks, nor with a device it does not follow (PostgreSQL
    # hashed every telemetry row to learn which followed device had telemetry past its mark)
    history.add_many([tele("d1", top + 1)])
    if not hasattr(history, "_db"):
        history._execute("ANALYZE")
    idle = _read_by(history, *_seq_window_sql(history))
    history.add_many([tele("d9", n) for n in range(15_000)])
    if not hasattr(history, "_db"):
        history._execute("ANALYZE")
    big = _read_by(history, *_seq_window_sql(history))
    assert big <= idle * 1.5 + 20 and big < 500, (idle, big)  # the history holds 16,000 rows


def test_a_record_stored_after_its_gap_was_recorded_is_taken_out_of_it(history):
    """A record arriving later than the grace was stored and also stayed in the gap recorded for it, so the history
    said it was both stored and lost. Now the worker that stores it takes it out of that gap (it shrinks, splits or
    goes), and so does a scan whose gap a record committed while it judged fell in: stored plus recorded gaps is what
    the device published."""
    history.add_many([tele("d1", 0)])
    history.follow_seqs(["d1"])
    history.add_many([tele("d1", n) for n in (1, 7)])
    _, gaps = scan(history, "w", 100)
    assert gaps == [("d1", "telemetry", 2, 6)]
    history.add_many([tele("d1", 4), tele("d1", 2)])  # late: after the gap was recorded
    assert history.take_out_of_gaps([("d1", "telemetry", 4), ("d1", "telemetry", 2), ("d1", "telemetry", 9)]) == 2

    def recorded():
        return sorted((g["kind"], g["first_missing"], g["last_missing"]) for g in history.sequence_gaps())

    assert recorded() == [("telemetry", 3, 3), ("telemetry", 5, 6)]
    history.add_many([tele("d1", 3)])
    assert history.take_out_of_gaps([("d1", "telemetry", 3)]) == 1
    assert recorded() == [("telemetry", 5, 6)]
    assert history.take_out_of_gaps([("d1", "telemetry", 3)]) == 0  # stored twice (a redelivery): nothing more
    # a scan judged 8..11 missing while 10 was being committed by another worker: found after its own commit
    assert history.take_scan_lease("w")
    history.add_many([tele("d1", 12)])
    marks, gaps = share_gaps(history.seq_window(), time.time())
    history.add_many([tele("d1", 10)])
    assert history.record_scan("w", marks, gaps) and gaps == [("d1", "telemetry", 8, 11)]
    assert history.take_out_of_gaps(history.stored_in(gaps)) == 1
    assert recorded() == [("telemetry", 5, 6), ("telemetry", 8, 9), ("telemetry", 11, 11)]
    # a number inside a gap recorded more than LATE_S ago: the device's numbering started again, not that gap's record
    history._execute("UPDATE gaps SET ts = ts - ? WHERE first_missing = 5", (LATE_S + 1,))
    history.add_many([tele("d1", 6)])
    assert history.take_out_of_gaps([("d1", "telemetry", 6)]) == 0
    assert recorded() == [("telemetry", 5, 6), ("telemetry", 8, 9), ("telemetry", 11, 11)]


def test_a_batchs_look_for_late_records_reads_their_gaps_not_the_whole_gaps_table(history):
    """Every batch a --share worker stores is looked up in the gaps recorded (a late record leaves its gap). On
    PostgreSQL that join hashed the whole ``gaps`` table at each batch: 48 ms a batch at 200,000 gap rows, growing with
    them, on the storing path. Now each record's gaps are found through ``gaps (device, kind, last_missing)`` on both
    backends: what a batch's look reads does not grow with the gaps of other devices."""
    now = time.time()
    records = [(f"x{i}", "telemetry", 12, None) for i in range(300)]  # a batch (no epochs): 12 is in each gap 10..15

    def add_gaps(devices: range) -> int:
        history._write_batch([("INSERT INTO gaps (device, kind, first_missing, last_missing, ts) VALUES (?, ?, ?, ?, ?)",
                               [(f"x{i}", "telemetry", j * 10, j * 10 + 5, now) for i in devices for j in range(10)])])
        if not hasattr(history, "_db"):
            history._execute("ANALYZE")
        asked: list[tuple[str, tuple]] = []
        real = history._rows
        history._rows = lambda sql, args=(): asked.append((sql, args)) or real(sql, args)
        try:
            found = history._gaps_around(records, now - 60)
        finally:
            del history._rows
        assert {(d, first, last) for d, _k, first, last, _ts in found} == {(f"x{i}", 10, 15) for i in range(300)}
        return _read_by(history, *asked[0])

    small = add_gaps(range(300))  # 3,000 gap rows: those of the batch's own devices
    big = add_gaps(range(300, 4300))  # 43,000: 40,000 of devices the batch has no record of
    assert big <= small * 1.5 + 50, (small, big)


def _seq_window_sql(history) -> tuple[str, tuple]:
    """Return the query (and its arguments) ``seq_window(100)`` runs."""
    asked: list[tuple[str, tuple]] = []
    real = history._rows
    history._rows = lambda sql, args=(): asked.append((sql, args)) or real(sql, args)
    try:
        history.seq_window(100)
    finally:
        del history._rows
    return asked[0]


def _read_by(history, sql: str, args: tuple) -> int:
    """Return how much work the database did answering ``sql``: SQLite's virtual-machine steps, or (PostgreSQL) the rows
    every scan of the plan read (EXPLAIN ANALYZE's actual rows, and those its filter removed, times loops) and the pages
    it read (an index scan whose condition is on a later column reads every entry and says only the rows it kept)."""
    if hasattr(history, "_db"):
        steps = [0]

        def count() -> int:
            steps[0] += 1
            return 0

        history._db.set_progress_handler(count, 1)
        try:
            history._rows(sql, args)
        finally:
            history._db.set_progress_handler(None, 1)
        return steps[0]
    ((plan,),) = history._rows(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", args)
    plan = plan if isinstance(plan, list) else json.loads(plan)

    def walk(node) -> int:
        read = node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)
        rows = read * node.get("Actual Loops", 1) if "Scan" in node.get("Node Type", "") else 0
        return rows + sum(walk(child) for child in node.get("Plans", ()))

    top = plan[0]["Plan"]  # its pages count those of the nodes under it
    return walk(top) + top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0)


def _grow(history, seq: list[int], n: int, kinds) -> None:
    """Store ``n`` more records of d1 and of d2 of each of ``kinds`` (each: device, seq -> (kind, message)), numbered on
    from ``seq[0]`` (raised by ``n``) and received a microsecond apart, 5,000 a batch; return nothing."""
    now = time.time()
    for start in range(0, n, 5000):
        part = [(device, seq[0] + i + 1) for i in range(start, min(n, start + 5000)) for device in ("d1", "d2")]
        history.add_many([kind(d, s) for kind in kinds for d, s in part],
                         received=[now + s / 1e6 for _d, s in part] * len(kinds))
    seq[0] += n


def _stays_flat(history, work, grow) -> None:
    """Assert that ``work()`` (rows and index entries read) stays about the same after ``grow()`` adds to the history
    (PostgreSQL's statistics refreshed first, as autovacuum would); return nothing."""
    small = work()
    grow()
    if not hasattr(history, "_db"):
        history._execute("ANALYZE")
    big = work()
    assert big <= small * 1.5 + 20, (small, big)


def test_where_each_stream_stands_at_start_costs_a_bounded_read_whatever_the_historys_size(history, monkeypatch):
    """``newest_seqs`` (a persistent monitor's start, a --share worker's first marks) grouped every row of each kind by
    device: a start read the whole history. Now each device's newest row is found through its kind's ``(device, ts)``
    index: the work is the same for 100 rows as for 30,000. So is a --share worker's look at when a device was last
    stored by any worker (``last_heard``)."""
    queries: list[tuple[str, tuple]] = []
    real = history._rows

    def recorded(sql, args=()):
        queries.append((sql, args))
        return real(sql, args)

    def work() -> int:
        queries.clear()
        monkeypatch.setattr(history, "_rows", recorded)
        assert history.newest_seqs(SEQ_KINDS, ["d1", "d2"])[("d1", "telemetry")] == seq[0]
        assert set(history.last_heard(["d1", "d9"])) == {"d1"}  # a --share worker's look before alerting silence
        monkeypatch.setattr(history, "_rows", real)
        return sum(_read_by(history, sql, args) for sql, args in queries)

    seq = [0]
    kinds = (tele, lambda d, s: ("bench", messages.envelope("bench", "f", d, s, {"variant": "v", "sha256": "s",
                                                                               "latency_ms": {"p90": 1.0}})))
    _grow(history, seq, 50, kinds)
    _stays_flat(history, work, lambda: _grow(history, seq, 15_000, kinds))


def test_a_share_workers_look_for_a_peers_fp32_accuracy_reads_what_was_stored_since_its_last_look(history, monkeypatch):
    """After each batch holding a benchmark of a device with an accuracy bound, a --share worker reads the fp32
    accuracy a peer may have stored. It read every bench record the device ever sent, at every such batch (1.1 million
    SQLite steps a batch at 30,000 records, growing with them). It now reads those stored since its last look
    (``since``): the same work at 100 records as at 15,100, and a peer's fp32 stored since is found."""
    def bench(device, seq, variant="int8", accuracy=0.5):
        return ("bench", messages.envelope("bench", "f", device, seq, {"variant": variant, "sha256": "s", "model": "m",
                                                                       "latency_ms": {"p90": 1.0},
                                                                       "accuracy": {"value": accuracy}}))

    seq = [0]
    found: list[dict] = []

    def work() -> int:
        look = time.time()
        seq[0] += 1
        history.add_many([bench("d1", seq[0], "fp32", 0.75)], received=[look + 0.001])  # a peer's, since the look
        asked = _asked(history, monkeypatch, lambda: found.append(
            history.reference_accuracies(["d1"], ("fp32", "onnx-fp32"), since={"d1": look})))
        return sum(_read_by(history, sql, args) for sql, args in asked)

    _grow(history, seq, 50, (lambda d, s: bench(d, s, "fp32"), bench))
    _stays_flat(history, work, lambda: _grow(history, seq, 7_500, (lambda d, s: bench(d, s, "fp32"), bench)))
    assert found == [{("d1", "m", "fp32"): 0.75}] * 2


def _asked(history, monkeypatch, reads) -> list[tuple[str, tuple]]:
    """Call ``reads()``; return the queries (and their arguments) it asked the history."""
    queries: list[tuple[str, tuple]] = []
    real = history._rows
    monkeypatch.setattr(history, "_rows", lambda sql, args=(): queries.append((sql, args)) or real(sql, args))
    try:
        reads()
    finally:
        monkeypatch.setattr(history, "_rows", real)
    return queries


def test_a_batchs_late_records_cost_the_same_queries_and_one_transaction_however_many_it_holds(history, monkeypatch):
    """The look a --share worker makes after each batch (a late record leaves its gap) is one query for the whole batch,
    one transaction for every late record in it, and one look again (a gap a peer split meanwhile is found as its
    pieces): the same for one late record as for 199, never a query or a transaction a record."""
    history.add_gap("d1", "telemetry", 1, 1000)
    writes: list = []
    write = history._write_batch
    monkeypatch.setattr(history, "_write_batch", lambda statements: writes.append(statements) or write(statements))
    taken: list[int] = []

    def cost(seqs) -> tuple[int, int]:
        writes.clear()
        asked = _asked(history, monkeypatch,
                       lambda: taken.append(history.take_out_of_gaps([("d1", "telemetry", s) for s in seqs])))
        return len(asked), len(writes)

    assert cost([500]) == cost(range(2, 400, 2)) == (2, 1)
    assert taken == [1, 199] and len(history.sequence_gaps(limit=500)) == 201


def test_the_newest_records_per_device_cost_a_bounded_read_whatever_the_historys_length(history, monkeypatch):
    """The newest status, telemetry (and live, shadow) per device, its newest bench record per artifact, its last known
    model, when each device was last heard and which devices the history holds (`fleet status`, `report`, the monitor's
    /metrics) grouped or ranked every row of their tables: their work grew with the history's length, not the fleet's
    size. Now each device (and artifact) is found by a skip scan of the table's index and its newest rows through it:
    the work is the same for 100 statuses, telemetry messages and bench records a device as for 8,100 (on SQLite, no
    table is scanned whole; on PostgreSQL, no plan is compiled), the answers the same as before."""
    def status(device, seq, model=None, state="online", connection="c"):
        return ("status", messages.envelope("status", "f", device, seq, {"state": state, "current": model,
                                                                         "connection": connection}))

    def bench(device, seq):
        return ("bench", messages.envelope("bench", "f", device, seq, {"variant": "int8", "sha256": "s"}))

    model = {"variant": "int8", "sha256": "s"}

    def reads():
        latest = history.latest_status()
        assert latest["d1"]["seq"] == seq[0] and latest["d3"]["state"] == "offline"
        assert latest["d3"]["current"] == model  # its last will names the model its connection ran last
        assert history.latest_telemetry()["d2"]["seq"] == seq[0]
        # d2's 100 newest statuses name no model: both passes read, the second up to 100 a device
        assert set(history.last_known_models()) == {"d1", "d3"}
        assert set(history.last_received(KINDS)) == {"d1", "d2", "d3"}
        assert history.devices() == {"d1", "d2", "d3"}  # the report's devices
        bench = history.latest_bench()  # fleet status, the report, /metrics
        assert set(bench) == {("d1", "s"), ("d2", "s"), ("d3", "s")} and bench[("d2", "s")]["seq"] == seq[0]
        assert [m["seq"] for m in history.recent_bench("d1", keep=3)[("d1", "s")]] == [seq[0], seq[0] - 1, seq[0] - 2]

    def work() -> int:
        queries = _asked(history, monkeypatch, reads)
        if hasattr(history, "_db"):
            plans = [r[-1] for sql, args in queries for r in history._rows(f"EXPLAIN QUERY PLAN {sql}", args)]
            assert not [p for p in plans if p.startswith("SCAN") and p.split()[1] in KINDS], plans
        else:  # compiled (JIT) for a guessed cost, a plan that reads a few rows took seconds
            plans = [history._rows(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", args)[0][0] for sql, args in queries]
            assert not [p for p in plans if "JIT" in (p if isinstance(p, list) else json.loads(p))[0]]
        return sum(_read_by(history, sql, args) for sql, args in queries)

    seq = [0]
    kinds = (lambda d, s: status(d, s, model if d == "d1" else None), tele, bench)
    history.add_many([status("d2", 0, model), status("d3", 1, state="offline"), status("d3", 2, model),
                      bench("d3", 1)],
                     received=[time.time() - 60, time.time() - 30, time.time() - 40, time.time()])
    _grow(history, seq, 100, kinds)
    _stays_flat(history, work, lambda: _grow(history, seq, 8_000, kinds))


def test_the_newest_decision_per_device_costs_a_bounded_read_whatever_the_historys_length(history, monkeypatch):
    """The newest decision per device (of a kind, feasible: `report`, `fleet status`, `tune`, a rollout's waves) grouped
    the whole ``decisions`` index by device; on PostgreSQL, a first rewrite walked the table down its ids past every
    decision since a device's newest. Now each device is found by a skip scan and its newest through its own index
    entries: the work is the same for 100 decisions a device as for 20,100, d3's long ago among them."""
    kinds = ("selection", "fleet selection", "live gate")
    insert = ("INSERT INTO decisions (device, ts, chosen, previous, feasible, switched, body, kind) "
              "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")

    def grow(n, devices):
        rows = []
        for i in range(count[0], count[0] + n):
            for device in devices:
                decision = {"device": device, "chosen": f"v{i}", "current": None, "feasible": i % 2 == 0,
                            "switch": True, "kind": kinds[i % 3]}
                rows.append((device, time.time(), f"v{i}", None, int(i % 2 == 0), 1, json.dumps(decision), kinds[i % 3]))
        history._write_batch([(insert, rows)])
        count[0] += n

    def reads():
        newest = {d: m["chosen"] for d, m in history.latest_decisions().items()}
        fleet = {d: m["chosen"] for d, m in history.latest_decisions(("fleet selection",)).items()}
        feasible = {d: m["chosen"] for d, m in history.latest_decisions(kinds[:2], feasible=True).items()}
        for got, taken in ((newest, lambda i: True), (fleet, lambda i: i % 3 == 1),
                           (feasible, lambda i: i % 3 < 2 and i % 2 == 0)):
            assert got == {d: f"v{max(i for i in range(count[0] if d != 'd3' else 100) if taken(i))}"
                           for d in ("d1", "d2", "d3")}

    def work() -> int:
        return sum(_read_by(history, sql, args) for sql, args in _asked(history, monkeypatch, reads))

    count = [0]
    grow(100, ("d1", "d2", "d3"))
    _stays_flat(history, work, lambda: grow(20_000, ("d1", "d2")))


def test_the_open_alerts_a_start_carries_over_cost_a_bounded_read_whatever_the_alerts_raised_before(history,
                                                                                                     monkeypatch):
    """A monitor's start lists the alerts still open (carried over): ``alerts(holds=True)`` walked every alert ever raised
    down its ids looking for open ones (SQLite read the whole table). Now the open ones are found through the open
    alerts' index: the work is the same with 20,000 alerts raised and cleared before as with 100."""
    insert = ("INSERT INTO alerts (device, kind, raised_at, cleared_at, detail, subject, seen) "
              "VALUES (?, 'drift', ?, ?, 'x', '', 0)")

    def reads():
        assert [(a["device"], a["detail"]) for a in history.alerts(holds=True)] == [("d1", "now")]
        assert history.open_alert_keys() == [("drift", "d1", "", False)]

    def work() -> int:
        return sum(_read_by(history, sql, args) for sql, args in _asked(history, monkeypatch, reads))

    history._write_batch([(insert, [(f"d{i % 3}", i, i + 1.0) for i in range(100)])])
    history.open_alert("d1", "drift", "now")
    _stays_flat(history, work,
                lambda: history._write_batch([(insert, [(f"d{i % 3}", i, i + 1.0) for i in range(20_000)])]))


def _indexes(store) -> set[str]:
    if hasattr(store, "_db"):
        return {n for (n,) in store._rows("SELECT name FROM sqlite_master WHERE type = 'index'")}
    return {n for (n,) in store._rows("SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()")}


def test_a_version_5_history_is_upgraded_to_6_and_a_worker_of_version_5_still_writes_it(request, tmp_path, run_cli):
    """Schema version 6 adds two indexes (``bench (device, ts)``, ``gaps (device, kind, last_missing)``): `edgekit
    history upgrade` adds them to a version 5 history, on both backends, and what a version 5 worker writes (its
    statements name the same columns) still goes in."""
    for spec in (str(tmp_path / "h.db"), request.getfixturevalue("postgres_url")):
        with open_history(spec) as store:
            store.add_many([tele("d1", 1)])
            store.add_gap("d1", "telemetry", 2, 3)
            for name in ("bench_device", "gaps_seq"):
                store._execute(f"DROP INDEX {name}")
            store._execute("UPDATE edgekit_schema SET version = 5 WHERE name = 'history'")
            assert store._schema_version() == 5
        code, out, err = run_cli("history", "upgrade", "--history", spec, "--json")
        assert code == 0 and json.loads(out)["schema_version"] == SCHEMA_VERSION, err
        with open_history(spec) as store:
            assert {"bench_device", "gaps_seq"} <= _indexes(store)
            # a version 5 worker's writes: its INSERTs and the gap scan's statements, unchanged by version 6
            store._execute("INSERT INTO gaps VALUES (?, ?, ?, ?, ?)", ("d1", "telemetry", 5, 5, time.time()))
            store._execute("UPDATE seq_scans SET scanned_to = ? WHERE device = ? AND kind = ?", (1, "d1", "telemetry"))
            assert store.take_out_of_gaps([("d1", "telemetry", 2)]) == 1
            assert sorted((g["first_missing"], g["last_missing"]) for g in store.sequence_gaps()) == [(3, 3), (5, 5)]


def _upgraded_from(spec: str, version: int, index: str, run_cli) -> None:
    """Make the history ``spec`` one of schema ``version`` (``index``, what the next version added, dropped), then
    `edgekit history upgrade` it and check it is of this edge-kit's schema with ``index`` back. Return nothing."""
    with open_history(spec) as store:
        store._execute(f"DROP INDEX {index}")
        store._execute(f"UPDATE edgekit_schema SET version = {version} WHERE name = 'history'")
    code, out, err = run_cli("history", "upgrade", "--history", spec, "--json")
    assert code == 0 and json.loads(out)["schema_version"] == SCHEMA_VERSION, err
    with open_history(spec) as store:
        assert index in _indexes(store) and store._schema_version() == SCHEMA_VERSION


def test_a_version_6_history_is_upgraded_to_7_and_what_a_version_6_worker_writes_still_goes_in(request, tmp_path,
                                                                                                run_cli):
    """Schema version 7 adds an index (``status (device, seq)``) and changes no table: `edgekit history upgrade` adds it
    to a version 6 history, on both backends, and a version 6 worker's INSERT (the same columns) still goes in; the read
    it serves answers as before."""
    for spec in (str(tmp_path / "h.db"), request.getfixturevalue("postgres_url")):
        _upgraded_from(spec, 6, "status_seq", run_cli)
        with open_history(spec) as store:
            body = {"state": "offline", "connection": "c"}
            store._execute("INSERT INTO status VALUES (?, ?, ?, ?, ?, ?)",  # a version 6 worker's statement
                           ("m1", "d1", time.time(), 1, "offline", json.dumps(messages.envelope("status", "f", "d1", 1,
                                                                                                 body))))
            assert store.latest_status()["d1"]["state"] == "offline"


def test_a_version_7_history_is_upgraded_to_8_and_takes_a_variant_of_any_length(request, tmp_path, run_cli):
    """Schema version 8 adds an index (``bench (device, variant, ts, seq)``; PostgreSQL's holds the variant's MD5: a
    60 kB name is over its index row's 2,704 bytes) and changes no table: `edgekit history upgrade` adds it to a version
    7 history, on both backends; a version 7 worker's INSERT (the same columns) still goes in, a record of a variant that
    long too, and the read it serves finds it."""
    long = "v" * 60_000
    for spec in (str(tmp_path / "h.db"), request.getfixturevalue("postgres_url")):
        _upgraded_from(spec, 7, "bench_variant", run_cli)
        with open_history(spec) as store:
            for n, variant in enumerate(("fp32", long)):
                body = messages.envelope("bench", "f", "d1", n, {"variant": variant, "accuracy": {"value": 0.5}})
                store._execute("INSERT INTO bench VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # a version 7 worker's statement
                               (f"m{n}", "d1", time.time(), n, variant, "s", 1.0, json.dumps(body)))
            assert store.reference_accuracies(["d1"], ("fp32", long)) == {("d1", None, "fp32"): 0.5,
                                                                           ("d1", None, long): 0.5}


def test_a_record_of_a_new_numbering_never_leaves_a_gap_of_the_old_one(history):
    """A device re-imaged numbers from 1 in a new epoch: a record of it whose number lay inside a gap of the old
    numbering recorded within the last 24 h was taken out of that gap (the history then lost a number the old
    numbering really missed), and a scan took a record of the old numbering stored inside a gap of the new one out of
    it. Now a record leaves only a gap of its own numbering: recorded since the restart into its epoch, before the next."""
    def rec(seq, epoch):
        return ("telemetry", messages.envelope("telemetry", "f", "d1", seq, {}, epoch=epoch))

    def recorded():
        return sorted((g["first_missing"], g["last_missing"]) for g in history.sequence_gaps())

    history.add_epoch("d1", "e1", 1)
    history.add_many([rec(n, "e1") for n in (1, 2, 11)])
    history.add_gap("d1", "telemetry", 3, 10)  # the old numbering lost 3..10
    for table in ("seq_epochs", "gaps"):  # e1 first received, then its gap recorded, an hour ago: within LATE_S
        history._execute(f"UPDATE {table} SET ts = ts - 3600")
    assert history.add_epoch("d1", "e2", 1) == (True, "e2")  # re-imaged: a restart
    history.add_many([rec(n, "e2") for n in (1, 2, 5)])
    assert history.take_out_of_gaps([("d1", "telemetry", 5, "e2")]) == 0  # not the old numbering's 5
    assert recorded() == [(3, 10)]
    history.add_gap("d1", "telemetry", 3, 4)  # the new numbering lost 3 and 4
    history.add_many([rec(4, "e2")])
    assert history.take_out_of_gaps([("d1", "telemetry", 4, "e2")]) == 1
    assert recorded() == [(3, 3), (3, 10)]
    history.add_many([rec(3, "e1"), rec(7, "e1")])  # late records of the old numbering: its gap only
    assert history.take_out_of_gaps([("d1", "telemetry", 3, "e1"), ("d1", "telemetry", 7, "e1")]) == 2
    assert recorded() == [(3, 3), (4, 6), (8, 10)]
    # a scan's own gap: a record of the old numbering stored inside it is not one it missed
    history.follow_seqs(["d1"])
    history._execute("UPDATE seq_scans SET scanned_to = 2 WHERE device = 'd1'")
    assert history.stored_in([("d1", "telemetry", 3, 3)]) == []  # e1's 3 is stored; e2's is not
    # the numbering, not the age, says which gap: a gap recorded a day ago since the restart is still its records'
    history._execute("UPDATE gaps SET ts = ts - ?", (LATE_S,))
    history._execute("UPDATE seq_epochs SET ts = ts - ?", (LATE_S,))
    history.add_many([rec(3, "e2")])
    assert history.take_out_of_gaps([("d1", "telemetry", 3, "e2")]) == 1
    assert history.take_out_of_gaps([("d1", "telemetry", 5)]) == 0  # no epoch: only a gap of the last 24 h
    assert recorded() == [(4, 6), (8, 10)]


def test_a_record_of_a_device_s_first_epoch_leaves_its_gap_however_late(history):
    """A record of a device's first epoch (most devices: never re-imaged) was taken out of its gap only when the gap
    was recorded in the last 24 h (LATE_S), by this host's clock: a record handed over later (a worker's session the
    broker kept over a long outage) was stored and stayed in its gap, so the history said it was both stored and lost.
    Its epoch says its numbering (a re-image names a new one): it now leaves its gap however late. A record of no epoch
    (an agent older than epochs) still leaves only a gap recorded in the last 24 h: past it, the number is taken as a
    re-imaged device's new numbering, and the gap stays."""
    def rec(seq, epoch=None):
        return ("telemetry", messages.envelope("telemetry", "f", "d1", seq, {}, epoch=epoch))

    def recorded():
        return sorted((g["first_missing"], g["last_missing"]) for g in history.sequence_gaps())

    history.add_epoch("d1", "e1", 1)
    history.add_many([rec(n, "e1") for n in (1, 2, 12)])
    history.add_gap("d1", "telemetry", 3, 11)
    for table in ("seq_epochs", "gaps"):  # e1 first received, then its gap recorded, three days ago
        history._execute(f"UPDATE {table} SET ts = ts - ?", (3 * LATE_S,))
    history.add_many([rec(5, "e1")])
    assert history.take_out_of_gaps([("d1", "telemetry", 5, "e1")]) == 1
    assert recorded() == [(3, 4), (6, 11)]
    history.add_many([rec(7)])
    assert history.take_out_of_gaps([("d1", "telemetry", 7)]) == 0  # no epoch: a gap older than LATE_S stays
    assert recorded() == [(3, 4), (6, 11)]


def test_a_record_of_a_device_s_first_epoch_never_leaves_a_gap_recorded_before_that_epoch_was_first_received(history):
    """A record of a device's first epoch left any gap of its device, however old: also one recorded before that
    epoch's first message was received, a gap of the numbering before it (an agent older than epochs, whose late
    records carry none). A device re-imaged from such an agent to one that numbers in epochs numbers from 1 again, in
    its first epoch (no restart): its record 5 took a gap of the old numbering's 3..11 out, so the history said the old
    5 was stored. A first epoch's record now leaves only a gap recorded since its epoch was first received."""
    def rec(seq, epoch=None):
        return ("telemetry", messages.envelope("telemetry", "f", "d1", seq, {}, epoch=epoch))

    def recorded():
        return sorted((g["first_missing"], g["last_missing"]) for g in history.sequence_gaps())

    history.add_many([rec(n) for n in (1, 2, 12)])  # the old agent: no epoch
    history.add_gap("d1", "telemetry", 3, 11, time.time() - 60)
    history.add_epoch("d1", "e1", 1, seen=time.time())  # re-imaged: the new agent's first epoch, from 1
    history.add_many([rec(5, "e1")])
    assert history.take_out_of_gaps([("d1", "telemetry", 5, "e1")]) == 0
    assert recorded() == [(3, 11)]
    history.add_gap("d1", "telemetry", 6, 8, time.time() + 1)  # a gap of e1's numbering: its late record leaves it
    history.add_many([rec(7, "e1")])
    assert history.take_out_of_gaps([("d1", "telemetry", 7, "e1")]) == 1
    assert recorded() == [(3, 11), (6, 6), (8, 8)]


def test_a_late_record_of_an_older_numbering_two_workers_recorded_at_once_never_leaves_a_gap_of_the_newer(history):
    """Two workers recording a device's e2 and e3 at once (re-imaged twice within moments) each read its epochs before
    the other wrote: both recorded e1 as the one before theirs, and e2 (received first) was no epoch's ``previous``. A
    record's numbering ended at the restart whose ``previous`` named its epoch, so a late record of e2 was taken out of
    a gap of e3 (the history said e3's lost number was stored). It now ends at the device's next epoch by receive
    time."""
    def rec(seq, epoch):
        return ("telemetry", messages.envelope("telemetry", "f", "d1", seq, {}, epoch=epoch))

    now = time.time()
    history.add_epoch("d1", "e1", 1, seen=now - 60)
    history.add_epoch("d1", "e3", 1, seen=now)
    # the row the other worker's add_epoch wrote: it read e1 as the newest before this one's e3 was there
    history._execute("INSERT INTO seq_epochs (device, epoch, previous, ts, first_seq) VALUES (?, ?, ?, ?, ?)",
                     ("d1", "e2", "e1", now - 1, 1))
    assert history.device_epochs(["d1"]) == {"d1": "e3"}
    history.add_gap("d1", "telemetry", 2, 4, now + 1)  # e3 lost 2..4
    history.add_many([rec(3, "e2")])
    assert history.take_out_of_gaps([("d1", "telemetry", 3, "e2")]) == 0
    assert [(g["first_missing"], g["last_missing"]) for g in history.sequence_gaps()] == [(2, 4)]


def test_a_scan_after_a_restart_reads_its_bound_of_a_stream_and_judges_the_new_numbering_no_further(history):
    """After a restart the scan follows the new numbering from 0, and the old numbering's rows above that mark fill the
    bound of a stream's read: the new numbering's rows read were fewer than the bound, so the stream was taken as read
    whole, and a telemetry claim past the cut recorded every number beyond it as lost (51..150 here). The scan now
    judges such a stream no further than where its read stopped, and the next scan goes on from there."""
    def rec(kind, seq, epoch, body=None):
        return (kind, messages.envelope(kind, "f", "d1", seq, body or ({"variant": "v"} if kind == "bench" else {}),
                                        epoch=epoch))

    history.add_epoch("d1", "e1", 1)
    history.add_many([rec("bench", n, "e1") for n in range(1, 301)] + [rec("telemetry", 1, "e1")])
    history.follow_seqs(["d1"])
    assert history.add_epoch("d1", "e2", 1) == (True, "e2")  # the marks start again at 0 in e2
    new = [rec("bench", n, "e2") for n in range(1, 151) if n != 40]
    new += [rec("telemetry", n, "e2", {"seqs": {"bench": 150}} if n == 3 else None) for n in (1, 2, 3)]
    history.add_many(new, received=[time.time() - 120] * len(new))
    found = []
    for _ in range(10):
        rows, gaps = scan(history, "w", 100)
        found += gaps
        if not [r for r in rows if r[3] is not None]:
            break
    assert found == [("d1", "bench", 40, 40)]
    assert sorted(history._rows("SELECT kind, scanned_to FROM seq_scans WHERE device = 'd1'")) == [
        ("bench", 150), ("live", 0), ("shadow", 0), ("telemetry", 3)]


def test_what_each_device_stored_lately_is_counted_per_second_as_the_whole_table_scan_counted_it(history):
    """``stored_since`` (a monitor's start charges each device's ingest budget with it) now reads each device's rows
    through its kind's ``(device, ts)`` index: on a random history of every kind, its per-second counts are those of
    every stored row's receive time (what the scan of every table counted), a row received at ``since`` itself
    counted, one before it not."""
    rng = random.Random(19)
    since = float(int(time.time()) - 100)
    records, received = [], []
    for i in range(400):
        kind, device = rng.choice(KINDS), f"d{rng.randrange(6)}"
        records.append((kind, messages.envelope(kind, "f", device, i + 1, {})))
        received.append(since if i % 50 == 0 else since + rng.uniform(-30.0, 20.0))
    history.add_many(records, received=received)
    want: dict[str, dict[int, int]] = {}
    for kind in KINDS:
        for device, ts in history._rows(f"SELECT device, ts FROM {kind}"):
            if ts >= since:
                want.setdefault(device, {}).setdefault(int(ts // 1), 0)
                want[device][int(ts // 1)] += 1
    got = history.stored_since(since)
    assert got == {d: sorted(seconds.items()) for d, seconds in want.items()}
    assert sum(n for seconds in got.values() for _, n in seconds) == sum(r >= since for r in received) > 0
    assert history.stored_since(since + 3600) == {}


def test_what_each_device_stored_lately_costs_a_bounded_read_whatever_the_historys_length(history, monkeypatch):
    """A monitor's start (every --share worker's too) read every row of every kind's table to count what each device
    stored within its ingest budget's window (``WHERE ts >= ?``: no index on ``ts`` alone). Now each device is found
    by a skip scan and only its rows since then are read through its kind's ``(device, ts)`` index: the work is the
    same with 15,000 older rows a device as with 5."""
    since = time.time() - 60
    seq = [0]

    def grow(n, at):
        for start in range(0, n, 5000):
            part = [(device, seq[0] + i + 1) for i in range(start, min(n, start + 5000)) for device in ("d1", "d2")]
            history.add_many([tele(d, s) for d, s in part] + [("status", messages.envelope(
                "status", "f", d, s, {"state": "online"})) for d, s in part],
                received=[at + i / 1000 for i in range(2 * len(part))])  # distinct: not deduplicated in an index
        seq[0] += n

    def work() -> int:
        queries = _asked(history, monkeypatch, lambda: counted.append(history.stored_since(since)))
        if hasattr(history, "_db"):
            plans = [r[-1] for sql, args in queries for r in history._rows(f"EXPLAIN QUERY PLAN {sql}", args)]
            assert not [p for p in plans if p.startswith("SCAN") and p.split()[1] in KINDS], plans
        return sum(_read_by(history, sql, args) for sql, args in queries)

    counted: list[dict] = []
    grow(5, since - 3600)
    grow(10, int(since) + 30.0)
    _stays_flat(history, work, lambda: grow(15_000, since - 7200))
    assert counted[0] == counted[1] == {d: [(int(since + 30), 20)] for d in ("d1", "d2")}


def test_a_last_wills_model_costs_a_bounded_read_whatever_the_historys_length(history, monkeypatch):
    """A device whose newest status is its last will: ``latest_status`` (fleet status, report, /metrics) read every
    status numbered after the will's through ``status (device, ts)`` for its connection's model (no ``(device, seq)``
    index). Schema version 7 added it, and only the 100 highest-numbered were read; now the 100 newest by receive
    time are: the work is the same with 15,000 statuses a device as with 100, the answer as before."""
    seq = [1]

    def grow(n):
        now = time.time()
        for start in range(0, n, 5000):
            seqs = range(seq[0] + start + 1, seq[0] + min(n, start + 5000) + 1)
            history.add_many([("status", messages.envelope("status", "f", "d1", s, {
                "state": "online", "connection": "c", "current": {"variant": f"v{s}", "sha256": "s"}})) for s in seqs],
                received=[now - 60 + s / 1e6 for s in seqs])
        seq[0] += n
        history.add_many([("status", messages.envelope("status", "f", "d1", 1, {"state": "offline", "connection": "c"}))],
                         received=[now])  # its will: signed at connect (seq 1), published last

    def reads():
        assert history.latest_status()["d1"]["current"] == {"variant": f"v{seq[0]}", "sha256": "s"}

    def work() -> int:
        return sum(_read_by(history, sql, args) for sql, args in _asked(history, monkeypatch, reads))

    # two quiet devices besides: with one device, PostgreSQL reads the newest status of each (_newest_rows) by
    # scanning the table (a planner's guess; a fleet of one device)
    history.add_many([("status", messages.envelope("status", "f", d, 1, {"state": "online"})) for d in ("d2", "d3")])
    grow(100)
    _stays_flat(history, work, lambda: grow(15_000))


def test_a_last_will_numbered_at_the_top_of_the_range_leaves_every_devices_status_readable(history):
    """A will may carry any ``seq`` a message may (up to 2**63 - 1): the bound of the statuses after it was its number
    plus one, past PostgreSQL's BIGINT, so one device's will failed ``latest_status`` (fleet status, report, /metrics)
    for the whole fleet ('bigint out of range'). Now it reads as the old query did: the will, no status after it."""
    top = 2 ** 63 - 1
    history.add_many([("status", messages.envelope("status", "f", "d1", 5, {
        "state": "online", "connection": "c", "current": {"variant": "v", "sha256": "s"}})),
        ("status", messages.envelope("status", "f", "d2", 1, {"state": "online"}))], received=[time.time() - 60] * 2)
    history.add_many([("status", messages.envelope("status", "f", "d1", top, {"state": "offline", "connection": "c"}))])
    latest = history.latest_status()
    assert latest["d1"]["seq"] == top and latest["d1"].get("current") is None and latest["d2"]["state"] == "online"


# The queries the newest-per-device reads ran before the skip scans (3f5c8ac^): the reference their answers are held to.
OLD_LATEST = ("SELECT t.body FROM {table} t JOIN (SELECT device, MAX(ts) AS ts FROM {table} GROUP BY device) l "
              "ON t.device = l.device AND t.ts = l.ts ORDER BY t.seq")
OLD_RANKED = ("SELECT device, body, ts FROM (SELECT device, body, ts, seq, ROW_NUMBER() OVER (PARTITION BY device ORDER "
              "BY ts DESC, seq DESC) AS n FROM status) AS ranked WHERE n BETWEEN ? AND ? ORDER BY device, n")
OLD_BENCH = ("SELECT body FROM (SELECT body, ts, seq, ROW_NUMBER() OVER (PARTITION BY device, sha256 ORDER BY ts DESC, "
             "seq DESC) AS n FROM bench {where}) AS ranked WHERE n <= ? ORDER BY ts DESC, seq DESC")
OLD_DECISIONS = ("SELECT d.body, d.ts FROM decisions d JOIN (SELECT MAX(id) AS id FROM decisions {where} GROUP BY device) "
                 "l ON d.id = l.id")
OLD_UNKINDED = ("SELECT device, body, ts FROM decisions u WHERE kind IS NULL{good} AND id > COALESCE((SELECT MAX(id) FROM "
                "decisions k {where} AND k.device = u.device), -1) ORDER BY id DESC")  # unchanged: with the kinds asked
# odd names: a quote, LIKE's wildcards, a prefix of another, unicode, 300 characters
ODD_DEVICES = ("a", "a'; DROP TABLE status; --", "100%_x", "a\\b", "ü-dév ☃", "é" * 300, "Z")


def _old_answers(history) -> dict:
    """Return what the old queries answer for the history's newest records per device (see OLD_*)."""
    def latest(table):
        return {m["device"]: m for m in (json.loads(b) for (b,) in history._rows(OLD_LATEST.format(table=table)))}

    # each device's newest status by its own order (newer_status: these have no epochs) among its newest by receive
    # time as the old ranking found them, a last will's model its connection's highest-numbered status's after it
    ranked: dict = {}
    for device, b, _ts in history._rows(OLD_RANKED, (1, 100)):
        ranked.setdefault(device, []).append(json.loads(b))
    status = {}
    for device, rows in ranked.items():
        best = rows[0]
        for m in rows[1:STATUS_ORDER_SCAN]:
            best = m if newer_status(m, best, None) else best
        if best.get("state") == "offline" and isinstance(best.get("connection"), str) and isinstance(best.get("seq"), int):
            later = [m for m in rows if isinstance(m.get("seq"), int) and m["seq"] > best["seq"]
                     and m.get("connection") == best["connection"]]
            if later:
                best = {**best, "current": max(later, key=lambda m: m["seq"]).get("current")}
        status[device] = best
    bench: dict = {}
    for device in (None, *ODD_DEVICES[:3]):
        where, args = history._where(device, "sha256", None)
        for keep in (0, 1, 3):
            for (b,) in history._rows(OLD_BENCH.format(where=where), (*args, keep)):
                m = json.loads(b)
                bench.setdefault((device, keep), {}).setdefault((m["device"], m["sha256"]), []).append(m)
    decisions = {}
    for kinds, feasible in ((None, False), (("fleet selection",), False), (("selection", "fleet selection"), True)):
        where, args = history._where(None, "kind", kinds)
        good = " AND feasible = 1 AND chosen IS NOT NULL" if feasible else ""
        where += good if where or not good else "WHERE" + good[4:]
        rows = history._rows(OLD_DECISIONS.format(where=where), args)
        newest = decisions[kinds, feasible] = {json.loads(b)["device"]: {**json.loads(b), "recorded": ts} for b, ts in rows}
        settled: set[str] = set()
        for device, b, ts in history._rows(OLD_UNKINDED.format(good=good, where=where), args) if kinds else ():
            if device not in settled and json.loads(b)["kind"] in kinds:  # a kind the body says, as decision_kind
                settled.add(device)
                newest[device] = {**json.loads(b), "recorded": ts}
    return {"status": status, "telemetry": latest("telemetry"), "bench": bench, "decisions": decisions,
            "ranked": [history._rows(OLD_RANKED, span) for span in ((1, 1), (1, 2), (3, 100))],
            "received": {d: ts for d, ts in history._rows("SELECT device, MAX(ts) FROM telemetry GROUP BY device")},
            "devices": {d for t in ("status", "telemetry", "bench", "decisions")
                        for (d,) in history._rows(f"SELECT DISTINCT device FROM {t}")}}


def _new_answers(history) -> dict:
    """Return what the store answers now for what :func:`_old_answers` asks the old queries."""
    return {"status": history.latest_status(), "telemetry": history.latest_telemetry(),
            "bench": {(device, keep): history.recent_bench(device, keep=keep) for device in (None, *ODD_DEVICES[:3])
                      for keep in (0, 1, 3) if history.recent_bench(device, keep=keep)},
            "decisions": {(kinds, feasible): history.latest_decisions(kinds, feasible) for kinds, feasible in (
                (None, False), (("fleet selection",), False), (("selection", "fleet selection"), True))},
            "ranked": [history._newest_rows("status", *span) for span in ((1, 1), (1, 2), (3, 100))],
            "received": history.last_received(("telemetry",)), "devices": history.devices()}


@pytest.mark.parametrize("seed", range(25))
def test_the_newest_records_per_device_are_the_ones_the_old_grouping_queries_found(history, seed):
    """The skip scans (3f5c8ac and after) replaced queries that grouped or ranked whole tables; they must pick the same
    rows: on random small histories of odd device names, with receive times shared by several records (the newest is
    then the highest ``seq``), records without a ``seq`` (a hand-made or old row), devices whose records are all old,
    last wills, decisions without a kind, every answer is the old queries' (the references above), on both databases
    (PostgreSQL refused the newest 0 bench records: a negative OFFSET). A device's status is the newest by its own
    order among the statuses the old ranking found newest (:func:`newer_status`, held to its meaning elsewhere)."""
    import random

    rng = random.Random(seed)
    devices = rng.sample(ODD_DEVICES, rng.randint(0, len(ODD_DEVICES)))
    rows: dict[str, list[tuple]] = {"status": [], "telemetry": [], "bench": [], "decisions": []}
    for device in devices:
        seqs = rng.sample(range(1, 40), rng.randint(1, 12))  # distinct: one record a (ts, seq), ties on ts alone
        stamps = [rng.choice((1.0, 2.0, 3.0, 1e-9 * rng.random())) for _ in seqs]
        if rng.random() < 0.3:
            seqs[0] = None  # no seq: on a tie, SQLite ranks it last and PostgreSQL first, before as now
        for n, (seq, ts) in enumerate(zip(seqs, stamps)):
            body = {"device": device, "seq": seq, "state": rng.choice(("online", "offline")),
                    "connection": rng.choice(("c1", "c2")), "current": {"variant": f"v{n}", "sha256": "s"}
                    if rng.random() < 0.5 else None, "sha256": rng.choice(("s1", "s2"))}
            rows["status"].append((f"{device}/{n}", device, ts, seq, body["state"], json.dumps(body)))
            rows["telemetry"].append((f"{device}/{n}", device, ts, seq, json.dumps(body)))
            rows["bench"].append((f"{device}/{n}", device, ts, seq, "v", body["sha256"], 1.0, json.dumps(body)))
            kind = rng.choice(("selection", "fleet selection", None))
            decision = {"device": device, "chosen": rng.choice(("v", None)), "kind": rng.choice(("fleet selection",
                                                                                                  "selection"))}
            rows["decisions"].append((device, ts, decision["chosen"], None, rng.randint(0, 1), 1, json.dumps(decision),
                                      kind))
    rng.shuffle(rows["decisions"])  # ids in no device's order
    history._write_batch([(sql, rows[table]) for table, sql in (
        ("status", "INSERT INTO status VALUES (?, ?, ?, ?, ?, ?)"), ("telemetry", "INSERT INTO telemetry VALUES "
         "(?, ?, ?, ?, ?)"), ("bench", "INSERT INTO bench VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
        ("decisions", "INSERT INTO decisions (device, ts, chosen, previous, feasible, switched, body, kind) VALUES "
         "(?, ?, ?, ?, ?, ?, ?, ?)")) if rows[table]])
    old, new = _old_answers(history), _new_answers(history)
    for key in old:
        assert new[key] == old[key], key


def test_a_record_without_a_receive_time_is_among_no_devices_newest_on_either_database(history):
    """A row without a ``ts`` (hand-made: the store always writes one) sorts first on PostgreSQL, last on SQLite: on
    PostgreSQL it was taken as a device's newest-but-one's bound, so the second newest status and bench record were
    missed and the last known model was an older one; a device with no other row failed ``last_received`` (a
    TypeError). Now neither database ranks it."""
    def body(seq, variant):
        return json.dumps({"device": "n", "seq": seq, "sha256": "s", "current": variant and {"variant": variant}})

    rows = [(None, 9, "unstamped"), (5.0, 3, None), (4.0, 2, "second"), (3.0, 1, "third")]
    history._write_batch([("INSERT INTO status VALUES (?, ?, ?, ?, ?, ?)",
                           [(f"s{seq}", "n", ts, seq, "online", body(seq, v)) for ts, seq, v in rows]),
                          ("INSERT INTO bench VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           [(f"b{seq}", "n", ts, seq, "v", "s", 1.0, body(seq, v)) for ts, seq, v in rows])])
    assert [json.loads(b)["seq"] for _d, b, _ts in history._newest_rows("status", 1, 2)] == [3, 2]
    assert history.last_known_models()["n"]["variant"] == "second"
    assert [m["seq"] for m in history.recent_bench(keep=2)[("n", "s")]] == [3, 2]
    history._write_batch([("INSERT INTO bench VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [("m", "m", None, 1, "v", "s", 1.0, "{}")])])
    assert history.last_received(("status", "bench")) == {"n": 5.0}


# The query reference_accuracies ran before schema 8: every bench record of the devices and variants ranked.
OLD_REFERENCE = ("SELECT device, variant, body FROM (SELECT device, variant, body, ts, seq, ROW_NUMBER() OVER (PARTITION "
                 "BY device, variant ORDER BY ts DESC, seq DESC) AS n FROM bench WHERE device IN ({devices}) AND variant "
                 "IN ({variants})) AS ranked WHERE n <= ? ORDER BY device, variant, n")


@pytest.mark.parametrize("seed", range(20))
def test_the_reference_accuracies_are_the_ones_the_old_ranking_query_found(history, seed):
    """``reference_accuracies`` ranked every bench record of the devices and variants it was asked; now each device
    and variant's newest are read through ``bench (device, variant, ts, seq)``. On random histories (odd device names,
    a variant over PostgreSQL's index row limit, receive times shared by several records, records without a ``seq``,
    accuracies that are none, zero or text, models named or not), every answer is the old query's, on both
    databases."""
    rng = random.Random(seed)
    variants = ("fp32", "onnx-fp32", "int8", "é" * 1500)
    devices = rng.sample(ODD_DEVICES, rng.randint(1, len(ODD_DEVICES)))
    rows = []
    for device in devices:
        seqs = rng.sample(range(1, 60), rng.randint(1, 40))  # distinct: one record a (ts, seq), ties on ts alone
        if rng.random() < 0.3:
            seqs[0] = None
        for n, seq in enumerate(seqs):
            variant = rng.choice(variants)
            body = {"device": device, "seq": seq, "variant": variant, "model": rng.choice(("m1", "m2", None)),
                    "accuracy": {"value": rng.choice((None, 0, 0.25, 0.5, 0.75, "x"))}}
            rows.append((f"{device}/{n}", device, rng.choice((1.0, 2.0, 3.0, 1.0 + n)), seq, variant, "s", 1.0,
                         json.dumps(body)))
    history._write_batch([("INSERT INTO bench VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)])
    asked = rng.sample(devices + ["nobody"], rng.randint(1, len(devices) + 1))
    wanted = tuple(rng.sample(variants, rng.randint(1, len(variants))))
    for scan in (1, 2, 5, 32):
        old: dict = {}
        for device, variant, body in history._rows(OLD_REFERENCE.format(devices=", ".join("?" * len(asked)),
                                                                        variants=", ".join("?" * len(wanted))),
                                                   (*asked, *wanted, scan)):
            m = json.loads(body)
            value = m["accuracy"]["value"]
            key = (device, m["model"], variant)
            if key not in old and isinstance(value, float) and value > 0:
                old[key] = value
        assert history.reference_accuracies(asked, wanted, scan) == old, scan


def test_the_reference_accuracies_cost_a_bounded_read_whatever_one_devices_history(history, monkeypatch):
    """``reference_accuracies`` (a monitor's start, and every --share batch with bench records of an accuracy-bounded
    device) ranked every bench record of those devices' reference variants: its work grew with how often each was
    measured. Now each device and variant's newest are read through ``bench (device, variant, ts, seq)``: the work is
    the same with 15,000 records of a device and variant as with 50."""
    seq = [0]

    def bench(device, s):
        return ("bench", messages.envelope("bench", "f", device, s, {"variant": "fp32", "model": "m", "accuracy": {
            "value": s / 1e6}}))

    def reads():
        assert history.reference_accuracies(["d1", "d2"], ("fp32", "onnx-fp32")) == {
            (d, "m", "fp32"): seq[0] / 1e6 for d in ("d1", "d2")}

    def work() -> int:
        return sum(_read_by(history, sql, args) for sql, args in _asked(history, monkeypatch, reads))

    _grow(history, seq, 50, (bench,))
    _stays_flat(history, work, lambda: _grow(history, seq, 15_000, (bench,)))


def test_the_newest_records_of_a_one_device_history_cost_a_bounded_read_whatever_its_length(history, monkeypatch):
    """A fleet of one device: PostgreSQL read each device's newest rows (``_newest_rows``: the newest status and
    telemetry, the last known model) by scanning the whole table, the rows since a bound it could not estimate being
    all of that device's. Now each device's newest are walked down its ``(device, ts)`` index and the walk stops at
    them: the work is the same with 15,000 records as with 100."""
    seq = [0]

    def grow(n):
        now = time.time()
        for start in range(0, n, 5000):
            seqs = range(seq[0] + start + 1, seq[0] + min(n, start + 5000) + 1)
            history.add_many([("status", messages.envelope("status", "f", "d1", s, {
                "state": "online", "current": {"variant": f"v{s}", "sha256": "s"}})) for s in seqs] +
                [tele("d1", s) for s in seqs], received=[now + s / 1e6 for s in seqs] * 2)
        seq[0] += n

    def reads():
        assert history.latest_status()["d1"]["seq"] == seq[0] and history.latest_telemetry()["d1"]["seq"] == seq[0]
        assert history.last_known_models()["d1"]["variant"] == f"v{seq[0]}"
        assert [json.loads(b)["seq"] for _d, b, _ts in history._newest_rows("status", 3, 100)] == list(
            range(seq[0] - 2, seq[0] - 100, -1))

    def work() -> int:
        return sum(_read_by(history, sql, args) for sql, args in _asked(history, monkeypatch, reads))

    grow(100)
    _stays_flat(history, work, lambda: grow(15_000))


def _epoch_status(seq, epoch, connection, state="online", variant=None):
    """Return d1's status ``(kind, message)`` numbered ``seq`` in ``epoch``, of ``connection``, naming ``variant``."""
    return ("status", messages.envelope("status", "f", "d1", seq, {
        "state": state, "connection": connection, "current": variant and {"variant": variant, "sha256": "s"}},
        epoch=epoch))


def test_a_re_imaged_devices_last_will_names_the_model_its_new_connection_ran(history):
    """A device re-imaged numbers from 1 in a new epoch: its last will's model was read from the 100 highest-numbered
    statuses after the will, and 150 statuses of its older numbering (numbered 1 to 150) were all of them, so the new
    connection's statuses were never read: fleet status showed no model for it. Now only the will's epoch is read."""
    now = time.time()
    old = [_epoch_status(s, "e1", "c1", variant="old") for s in range(1, 151)]
    new = [_epoch_status(2, "e2", "c2", variant="new"), _epoch_status(3, "e2", "c2", variant="newer")]
    history.add_many(old + new + [_epoch_status(1, "e2", "c2", state="offline")],
                     received=[now - 600 + i for i in range(150)] + [now - 20, now - 10, now])
    latest = history.latest_status()["d1"]
    assert latest["state"] == "offline" and latest["current"] == {"variant": "newer", "sha256": "s"}


def test_a_re_imaged_devices_last_will_costs_a_bounded_read_whatever_its_older_numbering(history, monkeypatch):
    """A re-imaged device's last will (its new epoch numbered from 1 again): its connection's model was read from its
    statuses numbered after the will's of its epoch, walked down ``status (device, seq)`` from the device's highest
    number, past every status of the older numbering above the will's (20,000 of them: 320,733 SQLite steps on
    each fleet status, report and /metrics read). Now its newest statuses by receive time are read, through
    ``status (device, ts)``: the work is the same with 5,000 statuses of the older numbering as with 100."""
    now, seq = time.time(), [0]

    def grow(n):  # the older numbering, received before the re-image
        seqs = range(seq[0] + 1, seq[0] + n + 1)
        history.add_many([_epoch_status(s, "e1", "c1", variant="old") for s in seqs],
                         received=[now - 86_400 + s / 1e3 for s in seqs])
        seq[0] += n

    def reads():
        latest = history.latest_status()["d1"]
        assert latest["state"] == "offline" and latest["current"] == {"variant": "newer", "sha256": "s"}

    def work() -> int:
        return sum(_read_by(history, sql, args) for sql, args in _asked(history, monkeypatch, reads))

    # two quiet devices besides, as in the test of a last will's model's cost (PostgreSQL's planner, one device)
    history.add_many([("status", messages.envelope("status", "f", d, 1, {"state": "online"})) for d in ("d2", "d3")])
    history.add_many([_epoch_status(2, "e2", "c2", variant="new"), _epoch_status(3, "e2", "c2", variant="newer"),
                      _epoch_status(1, "e2", "c2", state="offline")], received=[now - 20, now - 10, now])
    grow(100)
    _stays_flat(history, work, lambda: grow(4_900))


@pytest.mark.parametrize("seed", range(12))
def test_the_reference_accuracies_since_a_look_are_the_newest_received_after_it(history, seed):
    """A --share worker's look (``since``) reads each device and variant's ``scan`` newest records received after its
    device's time, through the same bounded read as a monitor's start. On random histories (receive times shared by
    several records, records without a receive time or a ``seq``, looks before, between and after the records, a
    device missing from ``since``: none of its records), every answer is the one a plain Python ranking of the rows
    finds, on both databases."""
    rng = random.Random(seed)
    variants = ("fp32", "onnx-fp32", "int8")
    devices = rng.sample(ODD_DEVICES, rng.randint(1, len(ODD_DEVICES)))
    stored = []
    for device in devices:
        seqs = rng.sample(range(1, 60), rng.randint(1, 40))
        if rng.random() < 0.3:
            seqs[0] = None
        for n, seq in enumerate(seqs):
            variant = rng.choice(variants)
            ts = None if rng.random() < 0.1 else rng.choice((1.0, 2.0, 3.0, 1.0 + n))
            body = {"device": device, "seq": seq, "variant": variant, "model": rng.choice(("m1", "m2", None)),
                    "accuracy": {"value": rng.choice((None, 0, 0.25, 0.5, 0.75, "x"))}}
            stored.append((f"{device}/{n}", device, ts, seq, variant, "s", 1.0, json.dumps(body)))
    history._write_batch([("INSERT INTO bench VALUES (?, ?, ?, ?, ?, ?, ?, ?)", stored)])
    asked = rng.sample(devices + ["nobody"], rng.randint(1, len(devices) + 1))
    wanted = tuple(rng.sample(variants, rng.randint(1, len(variants))))
    since = {d: rng.choice((-1.0, 0.5, 1.0, 2.5, 3.0, 20.0, 1e9)) for d in asked if rng.random() < 0.8}
    unnumbered = -math.inf if hasattr(history, "_db") else math.inf  # where each database sorts a NULL seq

    for scan in (1, 2, 5, 32):
        expected: dict = {}
        for device in asked:
            for variant in wanted:
                mine = [r for r in stored if r[1] == device and r[4] == variant and r[2] is not None
                        and r[2] > since.get(device, math.inf)]
                mine.sort(key=lambda r: (r[2], unnumbered if r[3] is None else r[3]), reverse=True)
                for r in mine[:scan]:
                    m = json.loads(r[7])
                    value = m["accuracy"]["value"]
                    if isinstance(value, float) and value > 0:
                        expected.setdefault((device, m["model"], variant), value)
        assert history.reference_accuracies(asked, wanted, scan, since=since) == expected, (scan, since)
