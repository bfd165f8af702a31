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
