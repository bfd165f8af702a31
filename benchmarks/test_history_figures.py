"""History figures: the monitor's ingest into PostgreSQL against SQLite, same stream, same run; two
workers in two processes into one PostgreSQL database, none lost or doubled."""

from __future__ import annotations

import numpy as np
from test_fleet_figures import _ingest_rate

from edge_kit.sim.broker import MosquittoBroker
from edge_kit.sim.postgres import PostgresServer

SETTLE_S = 8.0  # at most this long waiting for an idle machine before each drain (a shared machine may never be)


def test_monitor_ingest_into_postgresql_and_sqlite(tmp_path, figure, benchmark):
    n = 10_000
    sqlite, pg = [], []
    with MosquittoBroker(tmp_path / "broker") as broker, PostgresServer() as server:  # the server's default settings
        for r in range(3):  # interleaved pairs: this shared machine's speed drifts between runs
            for backend, rates in (("sqlite", sqlite), ("pg", pg)):
                tag = f"{backend}{r}"
                history = server.create_database(f"ingest_{tag}") if backend == "pg" else None
                rate, stored, rows, _ = _ingest_rate(tmp_path, broker, n, 1, tag, history, SETTLE_S)
                assert stored == rows == n  # none lost, none doubled
                rates.append(rate)
        url = server.create_database("ingest_two")
        two, stored, rows, _ = benchmark.pedantic(_ingest_rate, args=(tmp_path, broker, n, 2, "pgtwo", url, SETTLE_S),
                                                  rounds=1, iterations=1)
        assert stored == rows == n  # two workers, two processes, one database: none lost, none doubled
    ratio = float(np.median(np.array(pg) / np.array(sqlite)))
    figure("monitor: ingest into PostgreSQL / into SQLite, one worker", f"{ratio:.2f}", "info",
           f"median of 3 interleaved pairs ({', '.join(f'{p / s:.2f}' for s, p in zip(sqlite, pg))}); {n:,} signed "
           f"bench records queued on loopback Mosquitto, drained by one monitor process; SQLite file in WAL "
           f"(synchronous=NORMAL), PostgreSQL {server.bin.parent.name} on loopback with its default settings "
           f"(fsync, synchronous_commit on), psycopg 3; SQLite {np.median(sqlite):,.0f}/s, "
           f"PostgreSQL {np.median(pg):,.0f}/s on this machine")
    figure("monitor: two worker processes into one PostgreSQL, records stored / sent", f"{rows / n:.2f}", "1.00",
           f"{n:,} records, MQTT 5 shared subscription, each stored once (msg_id ON CONFLICT DO NOTHING); "
           f"{two:,.0f}/s, {two / float(np.median(pg)):.2f}x one worker into PostgreSQL")
