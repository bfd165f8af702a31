"""`edgekit rollout` state on a real PostgreSQL history: the server stopped mid-rollout is one line, and
the rollout resumes from what the database kept once it is back (the driver is the real one; the
broker is test_waves' fake, which answers every desired state at once)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edge_kit.loop.waves import Rollout, RolloutError
from edge_kit.sim.postgres import PostgresServer
from edge_kit.telemetry.store import open_history

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host"))  # the host tests' fake broker and plan
from test_waves import FakeBroker, planned  # noqa: E402

pytestmark = pytest.mark.integration


def test_a_database_stopped_mid_rollout_is_one_line_and_the_rollout_resumes_once_it_is_back():
    with PostgresServer(settings={"fsync": "off"}) as server:
        history = open_history(server.url)
        names = planned(history)
        stopped = []

        def stop_at(n: int) -> None:
            if n == 6 and not stopped:  # the second wave is under way
                stopped.append(n)
                server.stop()

        broker = FakeBroker(on_publish=stop_at)
        with pytest.raises(RolloutError) as caught:
            Rollout(history, "r", broker).run()
        text = str(caught.value)
        assert "\n" not in text and server.password not in text
        assert f"the history database postgresql://edgekit@127.0.0.1:{server.port}/edgekit failed" in text
        assert "edgekit rollout resume r" in text
        server.start()
        again = FakeBroker()
        out = Rollout(history, "r", again).run()  # the same host and process: its own claim is still valid
        assert out["state"] == "done" and out["counts"] == {"converged": 20, "refused": 1}
        kept = {d for d, _ in broker.sent[:2]}  # the first wave's answers were in the database before it stopped
        assert kept and not kept & {d for d, _ in again.sent}
        assert {d for d, _ in broker.sent} | {d for d, _ in again.sent} == set(names)
        assert history.rollout("r")["state"] == "done" and history.rollout("r")["owner"] is None
        history.close()
