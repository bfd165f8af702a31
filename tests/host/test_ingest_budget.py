"""The monitor's per-device ingest budget (a token bucket per device), on a clock the test turns."""

from __future__ import annotations

import pytest

from edge_kit.errors import InputError
from edge_kit.telemetry.budget import DEFAULT_BURST, DEFAULT_RATE, IngestBudget


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_each_device_has_its_burst_then_its_rate_and_a_quiet_device_fills_up_to_its_burst_only():
    clock = Clock()
    budget = IngestBudget(rate=10, burst=50, clock=clock)
    assert budget.available("d1") == 50 and budget.available("d2") == 50  # a device not seen yet: a full bucket
    budget.spend("d1", 50)
    assert budget.available("d1") == 0 and budget.available("d2") == 50  # one device's flood is its own
    clock.now += 0.35
    assert budget.available("d1") == 3  # 10 a second: whole records only
    budget.spend("d1", 10)  # never below empty
    assert budget.available("d1") == 0
    clock.now += 3600
    assert budget.available("d1") == 50  # an hour quiet: the burst, not 36,000


def test_the_defaults_let_a_full_default_spool_through_whole():
    """An agent back from an outage sends its whole spool at once (spool_max_records, 10,000 by default)."""
    import dataclasses

    from edgekit_protocol.config import AgentConfig

    spool = {f.name: f.default for f in dataclasses.fields(AgentConfig)}["spool_max_records"]
    assert DEFAULT_BURST >= spool
    assert DEFAULT_RATE >= 10 * (3 / 0.3)  # ten times telemetry, live and shadow every 0.3 s (the tests' fastest agent)


@pytest.mark.parametrize("rate, burst, error", [
    (0, 10, "--budget-rate 0: give the records a second each device may send, above 0"),
    (float("nan"), 10, "--budget-rate nan: give the records a second each device may send, above 0"),
    (1, 0.5, "--budget-burst 0.5: give the records each device may send at once, 1 or more"),
    (1, float("inf"), "--budget-burst inf: give the records each device may send at once, 1 or more")])
def test_a_budget_that_is_no_rate_is_refused_in_one_line(rate, burst, error):
    with pytest.raises(InputError) as info:
        IngestBudget(rate, burst)
    assert str(info.value) == error


def test_workers_of_one_shared_subscription_hold_the_budget_together_not_each():
    """With --share the broker hands a device's records to the workers in turn; each worker held the whole budget, so
    two workers let a device store twice its burst and twice its rate. Now each holds 1/workers of it."""
    clock = Clock()
    workers = [IngestBudget(rate=10, burst=50, clock=clock, workers=2) for _ in range(2)]

    def flood(n: int) -> int:
        admitted = 0
        for i in range(n):
            budget = workers[i % 2]
            if budget.available("d1") >= 1:
                budget.spend("d1")
                admitted += 1
        return admitted

    assert flood(400) == 50  # the burst, for the whole monitor
    clock.now += 1.0
    assert flood(400) == 10  # then the rate
    assert all(w.rate == 10 and w.burst == 50 for w in workers)  # what the alerts name: the whole monitor's budget


def test_a_budget_charged_with_what_the_history_stored_lately_is_what_a_running_monitor_would_hold():
    """A monitor started again rebuilds each device's bucket from when the history says it stored its records in the
    last burst/rate seconds: spent as they came, refilled at the rate between them and since."""
    clock = Clock()
    budget = IngestBudget(rate=10, burst=50, clock=clock)
    assert budget.window_s() == 5.0
    now = 1_000_000.0
    budget.charge({"d1": [(now - 1, 45)], "d2": [(now - 1, 500)], "d4": [(now - 5 + s, 10) for s in range(5)]}, now)
    assert budget.available("d1") == 15  # 5 left, then a second of refill
    assert budget.available("d2") == 10  # none left (never below 0), then a second of refill
    assert budget.available("d3") == 50  # nothing stored: a full bucket
    assert budget.available("d4") == 50  # 10 a second, its rate, for the whole window: nothing taken
    shared = IngestBudget(rate=10, burst=50, clock=clock, workers=2)
    shared.charge({"d1": [(now, 40)]}, now)  # the whole monitor stored 40: each of two workers is charged 20 of its 25
    assert shared.available("d1") == 5


@pytest.mark.parametrize("burst, workers, error", [
    (10, 0, "--workers 0: give how many monitor workers share the group, 1 or more"),
    (10, 1.5, "--workers 1.5: give how many monitor workers share the group, 1 or more"),
    (3, 4, "--budget-burst 3 over --workers 4: each worker holds burst/workers, under one record; give a burst of 4 "
           "or more")])
def test_a_worker_count_that_cannot_share_the_budget_is_refused_in_one_line(burst, workers, error):
    with pytest.raises(InputError) as info:
        IngestBudget(1, burst, workers=workers)
    assert str(info.value) == error
