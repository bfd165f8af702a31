"""The sequence-gap scan of ``edgekit monitor --share`` workers, judged from the history's rows (share_gaps)."""

from __future__ import annotations

import json

from edge_kit.telemetry.monitor import share_gaps

NOW = 1_000_000.0
SETTLED = NOW - 30  # what was stored before this has settled (the grace)


def row(kind, seq, ts, mark, body=None, device="d1"):
    return (kind, device, seq, ts, mark, body)


def test_a_record_stored_within_the_grace_after_a_higher_one_is_no_gap():
    """Workers store a device's records in whatever order the broker handed them out: 5 stored (and settled) while 4
    is still on its way to another worker. 4, stored since, is held; before it settles nothing past 5 is judged."""
    rows = [row("telemetry", 3, SETTLED - 9, 2), row("telemetry", 5, SETTLED - 1, 2), row("telemetry", 4, NOW - 1, 2),
            row("telemetry", 7, NOW - 2, 2)]
    assert share_gaps(rows, SETTLED) == ([("d1", "telemetry", 5)], [])  # 6 is not judged: 7 has not settled
    assert share_gaps(rows, NOW) == ([("d1", "telemetry", 7)], [("d1", "telemetry", 6, 6)])


def test_numbers_a_device_s_telemetry_claims_past_its_stored_records_are_a_gap_once_the_claim_settles():
    claim = json.dumps({"seqs": {"bench": 9, "live": 4}})
    rows = [row("bench", None, None, 6), row("live", None, None, -1), row("telemetry", 8, SETTLED - 1, 7, claim)]
    marks, gaps = share_gaps(rows, SETTLED)
    assert gaps == [("d1", "bench", 7, 9)]  # live was followed from nothing: its claim is where it stands
    assert sorted(marks) == [("d1", "bench", 9), ("d1", "live", 4), ("d1", "telemetry", 8)]
    assert share_gaps(rows, SETTLED - 2) == ([], [])  # the claim has not settled yet


def test_a_stream_followed_from_nothing_is_judged_from_its_first_stored_record():
    rows = [row("bench", n, SETTLED - 1, -1) for n in (40, 41, 44)]
    assert share_gaps(rows, SETTLED) == ([("d1", "bench", 44)], [("d1", "bench", 42, 43)])
