"""A per-device ingest budget for the monitor: a token bucket per device named in the fleet file.

A compromised device holds a valid key (and, behind the broker's wall, its own credentials), so its
messages verify; left alone, tens of thousands of them a second queue ahead of every other device's
records, take the verifying process's time and grow the history without end. Each device gets
``rate`` records a second, with ``burst`` in hand; what it sends beyond is refused by the monitor
before anything costly (decoding, the signature) is done, counted per device and alerted.

Defaults, from what an agent publishes (``device_agents.service``): per ``telemetry_interval_s`` (30 s
by default; tests run 0.3 s) one ``telemetry``, one ``live`` and, when a shadow run compared anything
new, one ``shadow`` message; a ``status`` when it connects, activates or stops; a ``bench`` record per
benchmark (each runs for seconds); a ``cmd/ack`` and a ``reported`` per command or desired state (the
monitor does not subscribe to those). That is under 0.1 record a second at the defaults and about 10
at a 0.3 s interval. After an outage the agent sends its whole spool at once: ``spool_max_records``,
10,000 by default. So the default budget is :data:`DEFAULT_RATE` records a second (10 times a 0.3 s
interval agent) with a burst of :data:`DEFAULT_BURST` (a full default spool passes whole).

Only records whose signature verified as the topic's device spend its budget, so nobody else (a
forger on a broker without the fleet's ACL) can spend a real device's budget into refusal; the
monitor admits at most the records a device has budget for to the costly checks (in place of forgeries it refused,
a margin doubling each round: a few verifier calls a batch), so a device over its budget costs a topic split per
record, not a signature check.

Several workers (``--share``): the broker hands each message to one worker of the group, spreading a device's
records over them, so each of ``workers`` workers holds ``rate / workers`` and ``burst / workers``: together never
more than the documented budget. Its limit: a device whose records the broker hands unevenly (or a group with fewer
workers running than ``workers`` says) gets less than the whole budget, never more.

A monitor that starts again rebuilds each device's bucket from when the history says it stored that device's
records in the last ``burst / rate`` seconds (:meth:`IngestBudget.charge`), as a running monitor's would be: a
flooding device gets no fresh burst, and a device that sent within its rate keeps its whole budget (the records the
broker held for it while the monitor was down are stored).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from edge_kit.errors import InputError

DEFAULT_RATE = 100.0  # records a second per device
DEFAULT_BURST = 10_000  # records a device may send at once (an agent's default spool_max_records)


class IngestBudget:
    """Token buckets, one per device, filled at ``rate / workers`` tokens a second up to ``burst / workers``; one
    token per record. ``rate`` and ``burst`` stay the whole monitor's budget (what alerts and docs name)."""

    def __init__(self, rate: float = DEFAULT_RATE, burst: float = DEFAULT_BURST,
                 clock: Callable[[], float] = time.monotonic, workers: int = 1):
        """``workers``: how many monitor workers share the subscription (each holds its share of the budget).

        Raises InputError: ``rate`` or ``burst`` is not a number above 0 (``burst`` at least 1), ``workers`` is not
        a whole number of 1 or more, or ``burst / workers`` is under one record (a worker could never admit any)."""
        if not (isinstance(rate, (int, float)) and 0 < rate < float("inf")):
            raise InputError(f"--budget-rate {rate!r}: give the records a second each device may send, above 0")
        if not (isinstance(burst, (int, float)) and 1 <= burst < float("inf")):
            raise InputError(f"--budget-burst {burst!r}: give the records each device may send at once, 1 or more")
        if type(workers) is not int or workers < 1:
            raise InputError(f"--workers {workers!r}: give how many monitor workers share the group, 1 or more")
        if burst / workers < 1:
            raise InputError(f"--budget-burst {burst:g} over --workers {workers}: each worker holds burst/workers, "
                             f"under one record; give a burst of {workers} or more")
        self.rate = float(rate)
        self.burst = float(burst)
        self.workers = workers
        self._rate = self.rate / workers  # this worker's share
        self._burst = self.burst / workers
        self._clock = clock
        self._tokens: dict[str, tuple[float, float]] = {}  # device -> (tokens, when counted)

    def available(self, device: str) -> int:
        """Return how many records ``device`` may have checked and stored now (whole tokens in its bucket)."""
        return int(self._fill(device))

    def spend(self, device: str, n: float = 1) -> None:
        """Take ``n`` tokens (records) from ``device``'s bucket (never below 0); return nothing."""
        self._tokens[device] = (max(0.0, self._fill(device) - n), self._clock())

    def window_s(self) -> float:
        """Return the seconds a bucket takes to fill from empty (``burst / rate``): what a device stored that long
        ago no longer counts against it."""
        return self.burst / self.rate

    def charge(self, stored: dict[str, list[tuple[float, int]]], now: float) -> None:
        """Set each device's bucket to what it would hold had this monitor run through the last :meth:`window_s`:
        full at its start, then ``stored[device]``'s ``(unix time, records)`` pairs (oldest first; the whole
        monitor's records, of which this worker takes its ``1 / workers`` share) spent as they came and refilled at
        the rate between them and up to ``now`` (unix time). A monitor started again gives a flooding device no fresh
        burst, and takes from a device that sent within its rate nothing (what the broker held for it through the
        restart is stored); return nothing."""
        for device, seconds in stored.items():
            tokens, then = self._burst, now - self.window_s()
            for when, n in seconds:
                tokens = max(0.0, min(self._burst, tokens + max(0.0, when - then) * self._rate) - n / self.workers)
                then = max(then, when)
            self._tokens[device] = (min(self._burst, tokens + max(0.0, now - then) * self._rate), self._clock())

    def _fill(self, device: str) -> float:
        """Return ``device``'s tokens now (a device not seen yet has a full bucket)."""
        now = self._clock()
        tokens, then = self._tokens.get(device, (self._burst, now))
        return min(self._burst, tokens + (now - then) * self._rate)
