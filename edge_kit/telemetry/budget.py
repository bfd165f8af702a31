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
monitor admits at most the records a device has budget for to the costly checks, so a device over
its budget costs a topic split per record, not a signature check.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from edge_kit.errors import InputError

DEFAULT_RATE = 100.0  # records a second per device
DEFAULT_BURST = 10_000  # records a device may send at once (an agent's default spool_max_records)


class IngestBudget:
    """Token buckets, one per device, filled at ``rate`` tokens a second up to ``burst``; one token per record."""

    def __init__(self, rate: float = DEFAULT_RATE, burst: float = DEFAULT_BURST,
                 clock: Callable[[], float] = time.monotonic):
        """Raises InputError: ``rate`` or ``burst`` is not a number above 0 (``burst`` at least 1)."""
        if not (isinstance(rate, (int, float)) and 0 < rate < float("inf")):
            raise InputError(f"--budget-rate {rate!r}: give the records a second each device may send, above 0")
        if not (isinstance(burst, (int, float)) and 1 <= burst < float("inf")):
            raise InputError(f"--budget-burst {burst!r}: give the records each device may send at once, 1 or more")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._tokens: dict[str, tuple[float, float]] = {}  # device -> (tokens, when counted)

    def available(self, device: str) -> int:
        """Return how many records ``device`` may have checked and stored now (whole tokens in its bucket)."""
        return int(self._fill(device))

    def spend(self, device: str, n: int = 1) -> None:
        """Take ``n`` tokens from ``device``'s bucket (never below 0); return nothing."""
        self._tokens[device] = (max(0.0, self._fill(device) - n), self._clock())

    def _fill(self, device: str) -> float:
        """Return ``device``'s tokens now (a device not seen yet has a full bucket)."""
        now = self._clock()
        tokens, then = self._tokens.get(device, (self.burst, now))
        return min(self.burst, tokens + (now - then) * self.rate)
