"""`edgekit monitor`: subscribe to the fleet, check every message, store it once, raise alerts.

Messages arrive on paho's network thread and are queued; a checker thread checks each batch as
every receiver must (:func:`device_agents.identity.receive`: schema, topic, time) while a child
process verifies the signatures (:mod:`edge_kit.telemetry.verifier`), and a writer thread drops
duplicates by ``msg_id`` and stores them (one history transaction per batch, SQLite or PostgreSQL),
then acknowledges them to the broker: a message is acknowledged only once stored (or kept as
invalid), so when the history fails (:attr:`Monitor.failed`) what was not stored stays with the
broker for the next run of the persistent session. Invalid payloads are counted and kept in the
``invalid`` table; nothing a device sends can stop the monitor, and a check that fails on one
message (a bug) has its batch checked again one message at a time: only that one is kept as invalid.

Several workers can share the load: with ``share="group"`` each worker subscribes to
``$share/group.<hash>/edgekit/v1/<fleet>/+/<kind>`` (MQTT 5 shared subscription; :func:`share_group`) and the broker hands
each message to one member of the group; all of them write the same store. Sequence gaps are then
judged from the store rather than per worker: at most every :data:`GAP_SCAN_S`, one worker at a time scans what the
history holds past where the last scan stood, and records as gaps the numbers missing up to what each device's settled
records and telemetry claim, settled meaning received at least ``gap_grace_s`` ago (:func:`share_gaps`).

Ingest budget (:mod:`edge_kit.telemetry.budget`): each device of the fleet file may have so many records a
second checked and stored, for the whole monitor (with ``share``, each of ``workers`` workers holds its share) and
across its restarts (charged at start with what the history stored lately); what a device sends beyond (a
compromised one flooding with its valid key) is refused before it is decoded or verified (or, admitted in place of
forgeries and verified past the budget, after: a few verifier calls a batch at most), counted per device
(``stats.over_budget_by_device``), alerted once per episode, and the span it refused recorded as a sequence gap when
the episode ends (within the device's verified seq numbers), so the other devices' records keep being stored promptly.

Alerts: a device whose status says offline, a benchmark that breaks the device's constraints, a
shadow comparison whose fidelity is under the device's ``min_fidelity_snr_db`` (drift), and a device
silent for longer than ``silence_s``, or than :data:`SILENT_INTERVALS` of its own telemetry interval when that is
longer (the ``interval_s`` its telemetry says: an agent set to report every 10 minutes is not silent after 3).
Every alert about a device holds over an episode (alerted once, when it begins): offline (until its status says
otherwise), a variant breaking the constraints (until a benchmark of it meets them), drift, low disk, silence and an
ingest budget overrun. Each is opened in the history's ``alerts`` table when it begins and closed when it ends, written
only then (never per record). The table keeps one open alert per device, kind and subject (a constraints alert's
variant), so of several ``share`` workers the one whose write opened it raises it, and the others neither keep, count
nor print it; each worker takes the table's open drift, low-disk, offline and constraints alerts as its own before a
batch (:meth:`Monitor._sync_alert_states`), so whichever sees an episode end closes it (at most every
:data:`ALERT_SYNC_S`, never a query a record). An over-budget episode is each worker's own (its own share of the
budget): each worker holds the alert open while its episode lasts (the history's ``alert_holders``), confirms it every
:data:`~edge_kit.telemetry.store.ALERT_CONFIRM_S`, and it clears when the last holder lets go; one that no worker
confirmed for :data:`~edge_kit.telemetry.store.ALERT_STALE_S` (its holder crashed) is stale, closed by whichever worker
sees it. A monitor that starts takes the episodes under way from the table's open alerts
(:meth:`Monitor._seed_alert_states`), keeps them as :attr:`Monitor.carried_over` for its caller to show, and
:meth:`Monitor.alert_states` says which hold (exported as gauges by :mod:`edge_kit.telemetry.metrics`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import queue
import re
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_agents.identity import receive, verify_published
from device_agents.mqtt import ack_all, make_client, message_topic
from edge_kit.errors import AgentError, ConfigError, HistoryError, InputError
from edge_kit.fleet.commands import broker_unreachable
from edge_kit.fleet.inventory import Fleet
from edge_kit.profiles import load_profile
from edge_kit.selection.constraints import (
    REFERENCE_VARIANTS,
    Measured,
    broken_text,
    effective_constraints,
    violations,
)
from edge_kit.telemetry import GAP_GRACE_S
from edge_kit.telemetry.budget import DEFAULT_BURST, DEFAULT_RATE, IngestBudget
from edge_kit.telemetry.store import (
    ALERT_CONFIRM_S,
    CLEARED_REVOKED,
    CLEARED_STALE,
    HELD_KINDS,
    KINDS,
    REFERENCE_SCAN,
    SCAN_ROWS,
    SEQ_KINDS,
    HistoryStore,
    alert_subject,
    alerts_by_kind,
)
from edge_kit.telemetry.verifier import Verifier
from edge_kit.variants import parse_variant
from edgekit_protocol import messages
from edgekit_protocol.errors import MessageError
from edgekit_protocol.labels import clip
from edgekit_protocol.messages import disk_free_bytes, telemetry_interval

# A device is silent once it sent nothing for this many of its telemetry intervals (as `fleet status` judges it
# stale: edge_kit.telemetry.report.STALE_INTERVALS), or ``silence_s`` when that is longer.
SILENT_INTERVALS = 3
# A device last heard in the history (before this monitor started) is judged silent only once the monitor has been
# subscribed this long and has checked what it received: what the broker queued for its persistent session while it
# was stopped arrives first, and a device that spoke meanwhile is not alerted as silent.
SETTLE_S = 2.0

log = logging.getLogger("edgekit.monitor")
# kinds whose copy the history holds already raise no alert and are not handed on again (see _keep)
NOT_NEWS_AGAIN = ("status", "shadow")
STORED_KINDS = KINDS  # the monitor subscribes to what the history keeps
# streams an agent's spool, full, drops the oldest of (device_agents.spool.DROPPABLE; bench records never are): a gap
# of one may be the device's own drop, which its telemetry's spool counts
SPOOL_DROPPED_KINDS = ("telemetry", "live", "shadow")
BATCH = 500


@dataclass
class Alert:
    device: str
    kind: str  # "offline", "constraints", "silent", "refused" (forged, unsigned, from the future, over budget), "store", "disk", "drift",
    # "gap" (records a device numbered that never arrived, or a seq implausibly far ahead), "restart" (a device's
    # numbering started again: a new epoch)
    # (the history's alerts table keeps "offline", "constraints", "drift", "disk" as low_disk, "silent" and an
    # over-budget "refused" as over_budget: every alert about a device's state; a refused message is in ``invalid``)
    text: str
    ts: float = field(default_factory=time.time)


@dataclass
class MonitorStats:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    invalid: int = 0
    gaps: int = 0
    dropped: int = 0  # QoS 0 messages not taken while MAX_QUEUED wait to be checked (devices publish at QoS 1)
    # what revoked devices left at the broker (their retained status or reported state, their last will): dropped,
    # neither stored nor refused (Keyring.left_by_revoked)
    left_by_revoked: int = 0
    # what a revoked device left that a keyless peer sent again (the same last will, by its msg_id): dropped, counted
    # here, not again in left_by_revoked
    replayed_by_revoked: int = 0
    # messages on the topic of a device whose key was revoked (and none registered since): refused unchecked (no
    # signature checked, no budget spent, no alert: the device shows as revoked), counted here, kept as invalid
    revoked: int = 0
    # benchmarks breaking their device's constraints for a variant beyond the MAX_BREAKING_VARIANTS whose episodes the
    # device has open: stored, counted here, alerted once a device (a device naming a new variant in each record)
    breaking_not_alerted: int = 0
    # sequence gaps found past the MAX_GAP_ROWS a device may have recorded in one run: counted here, neither recorded
    # nor alerted one by one (a device skipping every other number would write a row a record); alerted once a device
    gaps_not_recorded: int = 0
    # with ``share``: records stored after the gap scan had recorded their number as lost (later than the grace), taken
    # out of that gap (it shrank or split): stored plus recorded gaps stays what the devices published
    late: int = 0
    # late records that would have split their gap past the MAX_GAP_ROWS rows their device may add in one run: stored,
    # left in the gap (a device sending every other number of a long gap late would add a row a record), counted here
    late_not_taken: int = 0
    # devices whose numbering started again (a new ``epoch``: re-imaged, agent state wiped): recorded as restarts
    restarts: int = 0
    # new numberings of a device past the MAX_RESTARTS it may have recorded in one run (a device naming a new epoch in
    # each message): counted here, neither recorded nor followed (its records are stored, not judged), alerted once
    restarts_not_recorded: int = 0
    # seq numbers (a record's, or a telemetry's claim) more than MAX_SEQ_LEAD past the device's newest of the kind:
    # not taken as where its numbering stands (the record is stored), counted, alerted once a device
    implausible_seqs: int = 0
    # per device of the fleet file: records refused because it was over its ingest budget
    over_budget_by_device: dict[str, int] = field(default_factory=dict)

    @property
    def over_budget(self) -> int:
        """Return the records refused over their device's ingest budget, all devices together."""
        return sum(dict(self.over_budget_by_device).values())  # a copy: the checker thread adds devices


# A device's episode over its ingest budget ends once none of its records was refused for this long: then its
# refused span is recorded as sequence gaps and alerted with the count.
FLOOD_QUIET_S = 5.0
#: With ``share``: how often (seconds, at most) a worker takes the history's open drift and low-disk alerts as the
#: episodes under way (:meth:`Monitor._sync_alert_states`): its peers open and close them.
ALERT_SYNC_S = 2.0
#: With ``share``: how often (seconds, at most) a worker tries the sequence-gap scan (:meth:`Monitor._scan_gaps`).
GAP_SCAN_S = 5.0
# The seq a refused record claims (unverified: it was refused before its signature was checked), found in its
# first bytes (the envelope's fields come first) without decoding it.
_CLAIMED_SEQ = re.compile(rb'"seq":(\d{1,18})[,}]')
CLAIMED_SEQ_BYTES = 1024


@dataclass
class _Flood:
    """One device's episode over its ingest budget: when it began and last refused, how many, and per topic kind
    the lowest and highest ``seq`` the refused records claimed above the device's newest verified one of that kind
    when each was refused (a claim at or below it is no news, or a forger's)."""

    first: float
    last: float
    count: int = 0
    seqs: dict[str, tuple[int, int]] = field(default_factory=dict)
    confirmed: float = field(default_factory=time.monotonic)  # when this worker last confirmed its hold of the alert


# Verifier calls one batch may cost (see Monitor._check_within_budget): the first round, then rounds whose margin
# doubles until it covers a whole batch.
MAX_CHECK_ROUNDS = 2 + math.ceil(math.log2(BATCH))
MAX_ALERTS = 10_000  # alerts kept in memory (the newest); all are counted
MAX_INVALID_ROWS = 100_000  # refused messages stored per run (4 KiB of the first 1,000, 256 bytes of the rest)
# messages on revoked devices' topics kept as refused per run (the rest counted, in stats.revoked): a thief flooding
# one costs no history write a message, as a device over its ingest budget costs none
MAX_REVOKED_ROWS = 1_000
# Messages received and waiting to be checked. QoS 1 ones are bounded by the broker (it sends no more than its
# inflight limit unacknowledged, and the monitor acknowledges once stored); QoS 0 ones are not, so past this
# many a device flooding at QoS 0 (every agent publishes at QoS 1) is dropped and counted, not queued without end.
MAX_QUEUED = 20_000
MAX_REASON = 500  # characters of a refusal's reason kept (in the alert and the invalid row): it may quote a device
MAX_TOPIC = 256  # characters of a refused message's topic kept (a real one has under 160; the broker allows 64 KiB)
MAX_ALERT_CHARS = 1000  # characters of an alert kept: its text may hold a device's variant name (any length)
MAX_BREAKING_VARIANTS = 32  # a device's variants held as breaking its constraints at once (an episode and alert each)
MAX_GAP_ROWS = 32  # sequence-gap rows one monitor run records (and alerts) per device; the others are counted
MAX_RESTARTS = 8  # restarts (new numberings) of a device one monitor run records (and alerts); the others are counted
MAX_CARRIED = 100  # open alerts of the history a monitor shows as carried over when it starts (the newest)


MAX_CLIENT_ID_BYTES = 65_535  # MQTT encodes a client id's length in 16 bits


def _mqtt_text(text: str) -> bool:
    """Return whether ``text`` can be an MQTT string a broker takes: UTF-8 (no lone surrogate, which an argument
    that is not UTF-8 holds) without control characters (Mosquitto drops a client whose id holds one)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text)


#: How far (numbers) past a device's newest ``seq`` of a kind a record or a telemetry claim may number and still be
#: taken as where its numbering stands: a live stream every second for 11 days of outage. One further is implausible (a
#: hostile device with a valid key claiming 10**12 blinded gap detection on its stream for ever): counted
#: (``implausible_seqs``), alerted once a device, and not taken.
MAX_SEQ_LEAD = 1_000_000
MAX_STALE_EPOCHS = 1_000  # (device, epoch) of older numberings remembered (a late message of one is not judged)
MAX_LEFT_SEEN = 10_000  # leftovers of revoked devices remembered (each signed by a revoked key before its revocation)

MAX_OLD_RUNS = 64  # a device's ended shadow runs remembered: a late message of one is no news
# fp32 reference accuracies remembered per device ((model, variant), its oldest dropped: a hostile device naming a new
# model in each record grows no map without bound and pushes out only its own, never another device's), and notes
# kept (the newest; each said once per device and model, at most MAX_NOTED_PER_DEVICE models of a device)
MAX_REFERENCES_PER_DEVICE = REFERENCE_SCAN * len(REFERENCE_VARIANTS)  # all a device's history read gives
MAX_NOTES = 1_000
#: With ``share``: how far (seconds) before its last look at a device's benchmarks a worker reads them again for a
#: peer's fp32 reference (:meth:`Monitor._keep`): a peer stores a record within its batch, seconds after receiving it;
#: one stored later than this is read at the next start.
REFERENCE_LAG_S = 300.0
#: How far (seconds) the database's clock may be from this host's before a --share worker says so in a note: its
#: receive times are stored by the database's clock, which every peer shares, but a reader on a host with a right clock
#: sees them off by as much (a device heard hours ahead or behind).
MAX_DB_SKEW_S = 300.0
MAX_NOTED_PER_DEVICE = 64


class RunCap:
    """A per-device cap of one monitor run: per device, how many of ``limit`` things (gap rows, restarts) it took in this
    run, and whether it was already alerted as past them (constraints episodes: only that, their count is the open
    ones'). Its devices are those whose records verified (a key in the fleet's registry) or the history holds, never a
    name a forger made up: it grows with the registry, not with what arrives. The writer thread alone uses it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used: dict[str, int] = {}
        self._alerted: set[str] = set()

    def room(self, device: str) -> int:
        """Return how many more ``device`` may take in this run (0 once it took ``limit``)."""
        return self.limit - self._used.get(device, 0)

    def full(self, device: str) -> bool:
        """Return True once ``device`` took ``limit`` in this run."""
        return self.room(device) <= 0

    def take(self, device: str, n: int = 1) -> None:
        """Count ``n`` more taken by ``device`` (the caller checked :meth:`room`); return nothing."""
        if n:
            self._used[device] = self._used.get(device, 0) + n

    def first_refusal(self, device: str) -> bool:
        """Return True the first time it is asked for ``device`` (in this run, or since :meth:`rearm`): alert then,
        count the later ones only."""
        if device in self._alerted:
            return False
        self._alerted.add(device)
        return True

    def rearm(self, device: str) -> None:
        """Let ``device``'s next refusal be alerted again (its episode past the cap ended); return nothing."""
        self._alerted.discard(device)


def _shadow_mark(shadow: dict[str, Any]) -> tuple[int | None, str | None, int]:
    """Return what the drift check keeps of a ``shadow`` message: its ``seq`` (None when it has no whole number
    there: a history row holds what a device sent, checked or not), its ``run`` (None from an older agent) and its
    ``non_finite`` count (0 when it says none)."""
    seq, run, count = shadow.get("seq"), shadow.get("run"), shadow.get("non_finite")
    return (seq if type(seq) is int else None, run if isinstance(run, str) else None,
            count if type(count) is int and count >= 0 else 0)


def _breaking_of(keys: list[tuple[str, str, str, bool]], devices: Any) -> dict[str, set[str]]:
    """Return, per device of ``devices`` (names, or a mapping keyed by them), the subjects (variants) of its open
    constraints alerts among ``keys`` (:meth:`HistoryStore.open_alert_keys`' answer). Never raises."""
    out: dict[str, set[str]] = {}
    for kind, device, subject, _stale in keys:
        if kind == "constraints" and device in devices:
            out.setdefault(device, set()).add(subject)
    return out


def share_group(share: str, password: str | None) -> str:
    """Return the MQTT shared-subscription group the workers of ``--share share`` join: ``share``, a dot and 16 hex
    digits of a sha256 of it and ``password``, the operator's broker password, which every worker of the group holds
    and no device does (``share`` alone without one: a broker without passwords lets anyone in anyway).

    Mosquitto hands each message of a group to its members in turn and drops it when that member may not read it, so
    a device's broker user joining the group by its name (``$share/<share>/...``, subscribe is not checked against
    the ACL) took a turn at every device's records, which no worker then stored. A group it cannot name it cannot join.
    """
    if password is None:
        return share
    digest = hashlib.sha256(f"{share}\n{password}".encode(errors="surrogateescape")).hexdigest()
    return f"{share}.{digest[:16]}"


def share_gaps(rows: list[tuple[str, str, int | None, float | None, int, str | None]],
               settled_by: float, bound: int | None = None) -> tuple[list[tuple[str, str, int]], list[tuple[str, str, int, int]]]:
    """Return what the sequence-gap scan of ``share`` workers finds in ``rows`` (:meth:`HistoryStore.seq_window`: per
    device and kind, the rows stored past the scan's mark): ``(marks, gaps)``, the ``(device, kind, seq)`` where each
    stream's scan stands now, and each ``(device, kind, first, last)`` run of numbers missing.

    A stream is judged up to its horizon: the highest ``seq`` that a row stored at or before ``settled_by`` (unix
    seconds, this host's clock) has, or that a telemetry row stored by then claims for the kind (its ``seqs``:
    :func:`~edgekit_protocol.messages.telemetry_marks`). Every number between the mark and the horizon that no row
    holds (rows stored since ``settled_by`` count as held) is missing. A mark of -1 (nothing stored when the scan
    began following the device) is judged from its first stored record; a stream without a horizon past its mark is
    left as it is. ``bound``: the rows of a stream the scan read at most (:meth:`HistoryStore.seq_window`'s ``limit``);
    a stream with that many was cut there, so it is judged no further than its highest row read (rows past it, and the
    numbers its telemetry claims past it, are the next scan's); so is one past a row ``(kind, device, cut, None, mark,
    None)``, where the read of a stream followed in an epoch stopped (rows of its older numberings filled the bound). A
    claim more than :data:`MAX_SEQ_LEAD` past what the stream holds is implausible and not taken. Never raises."""
    held: dict[tuple[str, str], set[int]] = {}
    horizon: dict[tuple[str, str], int] = {}
    mark: dict[tuple[str, str], int] = {}
    cut: dict[tuple[str, str], int] = {}
    claims: list[tuple[str, str, int]] = []
    for kind, device, seq, ts, scanned_to, body in rows:
        key = (device, kind)
        mark[key] = scanned_to
        if seq is None or ts is None:  # a mark alone: the device's telemetry may claim past it
            if seq is not None:  # or where the read of a stream followed in an epoch stopped: not judged past it
                cut[key] = seq
            continue
        held.setdefault(key, set()).add(seq)
        if ts <= settled_by:
            horizon[key] = max(seq, horizon.get(key, seq))
            if body is not None:
                try:
                    claims += [(device, k, n) for k, n in messages.telemetry_marks(json.loads(body)).items()]
                except ValueError:  # stored as received and verified: JSON; a hand-made row is no claim
                    pass
    for device, kind, newest in claims:
        key = (device, kind)
        # a claim more than MAX_SEQ_LEAD past what the stream holds is implausible: not the horizon (see _numbered)
        if key in mark and newest - max(mark[key], max(held.get(key, ()), default=0), 0) <= MAX_SEQ_LEAD:
            horizon[key] = max(newest, horizon.get(key, newest))
    if bound is not None:  # a stream read to the bound: what lies past its highest row read is not read yet
        counts = Counter((device, kind) for kind, device, seq, ts, _m, _b in rows if seq is not None and ts is not None)
        for key, n in counts.items():
            if n >= bound and key in horizon:
                horizon[key] = min(horizon[key], max(held[key]))
    for key, stop in cut.items():
        if key in horizon:
            horizon[key] = min(horizon[key], stop)
    marks: list[tuple[str, str, int]] = []
    gaps: list[tuple[str, str, int, int]] = []
    for key, top in sorted(horizon.items()):
        device, kind = key
        seqs = held.get(key, set())
        base = mark[key]
        if base < 0:  # followed from its first record: none before it is missing (as one worker judges a stream)
            if not seqs:  # claimed by its telemetry, none stored: where its numbering stands, nothing judged
                marks.append((device, kind, top))
                continue
            base = min(seqs) - 1
        if top <= base:
            continue
        last = base
        for seq in sorted(s for s in seqs if base < s <= top):
            if seq > last + 1:
                gaps.append((device, kind, last + 1, seq - 1))
            last = seq
        if top > last:
            gaps.append((device, kind, last + 1, top))
        marks.append((device, kind, top))
    return marks, gaps


class Monitor:
    """One monitor worker. ``start()``, then ``stop()``; ``stats`` and ``alerts`` are live."""

    def __init__(self, fleet: Fleet, store: HistoryStore, *, share: str | None = None, silence_s: float = 180.0,
                 on_message: Callable[[str, dict[str, Any]], None] | None = None, client_id: str | None = None,
                 persistent: bool = False, min_free_mb: float = 32.0, verify_in_child: bool = True,
                 budget_rate: float = DEFAULT_RATE, budget_burst: float = DEFAULT_BURST, workers: int | None = None,
                 gap_grace_s: float = GAP_GRACE_S):
        """``budget_rate`` and ``budget_burst``: each device's ingest budget (records a second, and at once) for the
        whole monitor; ``workers``: how many workers share the ``share`` group (each holds 1/workers of the budget;
        without it, each holds the whole budget, with a warning); ``gap_grace_s``: with ``share``, how long a record
        may take to reach the history through another worker before the number it fills is taken as lost
        (:data:`GAP_GRACE_S`, :meth:`_scan_gaps`).

        Raises InputError: ``share`` is not a shared-subscription group name (empty, or with '/', '+' or '#':
        the subscription would name another topic and receive nothing; or not UTF-8, or with control characters),
        ``workers`` above 1 without ``share``, ``gap_grace_s`` below 0,
        ``client_id`` is empty (a random one would lose the persistent session), longer than MQTT carries, not UTF-8
        or with control characters, or the budget is not above 0."""
        if share is not None and (not share or any(c in share for c in "/+#") or not _mqtt_text(share)):
            raise InputError(f"--share {share!r}: give a group name without '/', '+', '#' or control characters, "
                             "in UTF-8 (e.g. monitors)")
        if share is not None and workers is None:  # as before --workers existed: a worker's budget is the whole one
            log.warning("--share %s without --workers: each worker holds every device's whole ingest budget, so N "
                        "workers let a device store N times it; give --workers N to share it", share)
        if share is None and workers not in (None, 1):
            raise InputError(f"--workers {workers}: only with --share (the workers of one shared subscription)")
        if not gap_grace_s >= 0:
            raise InputError(f"--gap-grace-s {gap_grace_s}: give 0 or more seconds")
        if client_id is not None and not _mqtt_text(client_id):  # the broker drops the connection: a timeout, later
            raise InputError(f"--client-id {client_id!r}: give one without control characters, in UTF-8 (e.g. "
                             "edgekit-monitor-1)")
        if client_id is not None and not 0 < len(client_id.encode()) <= MAX_CLIENT_ID_BYTES:
            raise InputError(f"--client-id: give 1 to {MAX_CLIENT_ID_BYTES:,} bytes (got {len(client_id.encode()):,})")
        self.budget = IngestBudget(budget_rate, budget_burst, workers=1 if workers is None else workers)
        self.fleet = fleet
        self.store = store
        self.share = share
        self.silence_s = silence_s
        self.on_message = on_message
        self.persistent = persistent  # keep the broker session (and its queued messages) across disconnects
        self.stats = MonitorStats()
        self.alerts: deque[Alert] = deque(maxlen=MAX_ALERTS)  # the newest; ``alerts_raised`` counts them all
        self.alerts_raised = 0
        self.last_seen: dict[str, float] = {}
        self._floods: dict[str, _Flood] = {}  # devices over their budget now (episodes not ended)
        self.constraints = {d.name: effective_constraints(load_profile(d.profile).constraints, d.constraints)
                            for d in fleet.devices}
        self._queue: queue.Queue = queue.Queue()
        self._recent: OrderedDict[str, None] = OrderedDict()  # msg ids lately stored (cheap dedup before SQL)
        self._left_seen: OrderedDict[str, None] = OrderedDict()  # msg ids of what revoked devices left, counted once
        #: Revoked devices whose leftover the broker handed over as its retained copy: it stays there (sent to every
        #: receiver that subscribes) until it is cleared; `edgekit fleet revoke DEVICE` clears it (the summary says so).
        self.retained_leftovers: set[str] = set()
        self._seq: dict[tuple[str, str], int] = {}
        # without share: records of this batch numbered at or below their stream's newest (out of order, or late): each
        # may be the record of a gap recorded before it came (taken out of it after the batch, one query)
        self._behind: list[tuple[str, str, int, str | None]] = []
        self._epochs: dict[str, str] = {}  # each device's newest numbering (its messages' epoch), as the history has it
        self._stale_epochs: set[tuple[str, str]] = set()  # (device, epoch) of numberings a newer one replaced
        self._implausible: set[str] = set()  # devices alerted for a seq past MAX_SEQ_LEAD this run
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._refused: str | None = None
        self._silent_alerted: set[str] = set()
        self._heard_before: set[str] = set()  # devices last heard in the history, not yet in this run
        self._seeded = False  # start() read the alert states from the history, or failed to
        self._judge_before_from = 0.0  # time.monotonic() from which those are judged silent (start() sets it)
        self.min_free_bytes = min_free_mb * 1e6  # a device reporting less free space is alerted on (once per episode)
        self._low_disk: set[str] = set()
        self._drifting: set[str] = set()
        self._offline: set[str] = set()  # devices whose offline alert holds
        # of the devices the batch being stored holds statuses of, each one's newest status by its own order as the
        # history holds it (HistoryStore.latest_status): whether it is offline (a status received late is no news)
        self._status_now: dict[str, dict[str, Any]] = {}
        # device -> its variants (as the alerts table keeps them) breaking its constraints: at most MAX_BREAKING_VARIANTS
        # each (a hostile device signing records with a new variant name each would grow it without bound)
        self._breaking: dict[str, set[str]] = {}
        self._revoked_closed: set[str] = set()  # revoked devices whose alerts _close_revoked closed
        # alerted once a device as having MAX_BREAKING_VARIANTS episodes open (again once one closed); how many are
        # open is _breaking's, which the history's open alerts rebuild
        self._breaking_cap = RunCap(MAX_BREAKING_VARIANTS)
        self._gap_cap = RunCap(MAX_GAP_ROWS)  # per device, the sequence-gap rows this run recorded
        #: with share: how far the database's clock is ahead of this host's (HistoryStore.clock_offset), measured at
        #: start and before each look at when peers last stored a device: receive times stored, the silence check's
        #: look and the gap scan's grace are all by the database's clock, so a peer host minutes behind alerts nothing
        self._db_offset = 0.0
        self._skew_noted = False  # an offset past MAX_DB_SKEW_S was said (once a run)
        self._restart_cap = RunCap(MAX_RESTARTS)  # per device, the restarts this run recorded
        #: The history's open alerts when this monitor started (newest first, at most MAX_CARRIED; :meth:`start`), each
        #: a row of :meth:`HistoryStore.alerts` with ``still_open`` (False: closed at start, nobody held it), and
        #: how many were open in all: a monitor that died before printing an alert left it there.
        self.carried_over: list[dict[str, Any]] = []
        self.carried_over_total = 0
        self._alerts_synced = -math.inf  # time.monotonic() of the last _sync_alert_states
        # each device's newest shadow message taken, by seq: (seq, run or None, its non_finite count)
        self._last_shadow: dict[str, tuple[int | None, str | None, int]] = {}
        self._old_runs: dict[str, deque[str]] = {}  # each device's runs taken before its newest one
        self._intervals: dict[str, float] = {}  # each device's telemetry interval, as its newest telemetry says it
        # device -> (model, fp32 reference variant) -> the accuracy of its newest benchmark with one: what the accuracy
        # bound of the model's other variants is a ratio of (from the history at start, then from what arrives); at
        # most MAX_REFERENCES_PER_DEVICE a device, the least recently taken dropped first
        self._reference: dict[str, dict[tuple[str | None, str], float]] = {}
        # with share: when (Monitor._clock) the history's fp32 benchmarks were last read, at start and per device since
        self._references_start = -math.inf
        self._references_read: dict[str, float] = {}
        #: What the monitor could not judge, said once per device and model (e.g. an accuracy bound without the fp32
        #: accuracy), the newest :data:`MAX_NOTES`; ``notes_raised`` counts them all. Not alerts: nothing broke.
        self.notes: deque[str] = deque(maxlen=MAX_NOTES)
        self.notes_raised = 0
        self._noted: dict[str, set[str | None]] = {}  # device -> models whose unjudged accuracy bound was said
        # The history's first failure to connect or write (a database gone away): from then on this
        # worker stores nothing more, and whoever runs it stops and says so (`edgekit monitor` exits 6).
        self.failed: HistoryError | None = None
        cid = client_id or f"edgekit-monitor-{uuid.uuid4().hex[:8]}"
        self.holder = cid  # this worker in the history's alert_holders (started again under the same id: the same one)
        self.gap_grace_s = gap_grace_s
        self._scan_owner = f"{cid}/{uuid.uuid4().hex[:8]}"  # this worker when it holds the gap scan: no one else's name
        self._gaps_scanned = -math.inf  # time.monotonic() of the last _scan_gaps
        # Each QoS 1 message is acknowledged to the broker only once it is stored (or refused and kept as
        # invalid): what a failed history did not store stays with the broker, which sends it again to
        # the next run of a persistent session (and the msg_id keeps it once).
        password = fleet.broker_password()
        self._group = share_group(share, password) if share is not None else None  # the group subscribed to
        self.client = make_client(fleet.broker, cid, password=password,
                                  v5=share is not None, clean=not persistent, manual_ack=True, read_ahead=True)
        self.client.on_connect = self._on_connect
        self.keyring = fleet.key_store().keyring()
        # Signatures are checked in a child process (see edge_kit.telemetry.verifier); in this one
        # only when that is off or the child cannot run.
        self.verifier = Verifier(fleet.key_store().folder) if verify_in_child else None
        self._verifying = threading.Lock()
        self._closing = threading.Event()  # set by stop(): what arrives from then on is left to the broker
        self.client.on_message = self._on_message
        # Two stages: the checker decodes and verifies (Ed25519 verification releases the GIL, so it
        # runs on another core while paho reads and the writer stores), the writer stores.
        self._checked: queue.Queue = queue.Queue(maxsize=4)
        self._checker = threading.Thread(target=self._check_loop, daemon=True, name="monitor-checker")
        self._writer = threading.Thread(target=self._write_loop, daemon=True, name="monitor-writer")

    @property
    def over_budget(self) -> dict[str, int]:
        """Return the records refused over each device's ingest budget, by device (``stats.over_budget_by_device``)."""
        return self.stats.over_budget_by_device

    def alert_states(self) -> dict[str, frozenset[str]]:
        """Return, per alert kind that holds over an episode (``drift``, ``disk``, ``silent``, ``constraints``: a variant
        of it breaking them), the devices whose alert holds now (raised, its episode not ended; from the history's newest records when the monitor started: see
        :meth:`_seed_alert_states`); an empty dict until :meth:`start` has read the history (nothing is known yet), or
        failed to (then what this run sees)."""
        if not self._seeded:
            return {}
        # copies: the writer thread changes them
        return {"drift": frozenset(self._drifting), "disk": frozenset(self._low_disk),
                "silent": frozenset(self._silent_alerted), "constraints": frozenset(d for d, held in list(self._breaking.items()) if held)}

    def _on_message(self, _c: Any, _u: Any, m: Any) -> None:
        """Queue ``(topic, payload, receive time, mid to acknowledge or None)``; nothing once stopping, nor an empty
        payload on a retained kind's topic (how MQTT clears a retained message: acknowledged, no message to store;
        :func:`~edgekit_protocol.messages.is_cleared`: on any other topic it is refused and counted), nor what a revoked
        device left at the broker (acknowledged, counted once per ``msg_id`` in ``stats.left_by_revoked``, and each copy
        sent live again, a keyless peer's replay, in ``stats.replayed_by_revoked``:
        :meth:`~edge_kit.fleet.keys._RegistryKeyring.left_by_revoked`), and a QoS 0
        message not while :data:`MAX_QUEUED` wait (counted in ``stats.dropped``, alerted once a run). A topic that is
        not UTF-8 is queued with its bad bytes as ``\\xNN`` (it names no device, so it is refused). Never raises:
        paho's network thread calls it."""
        if self._closing.is_set():
            return
        topic = message_topic(m)
        # a retained message cleared (`fleet revoke` does), or what a revoked device left at the broker (its last will,
        # published as a broker reloaded or restarted after `fleet revoke` dropped its connection): nothing to store
        cleared = messages.is_cleared(topic, m.payload)
        retained = bool(getattr(m, "retain", False))
        left = None if cleared else self.keyring.left_by_revoked(topic, m.payload, retained)
        if cleared or left is not None:
            if left is not None and retained:  # the broker keeps it: only a clear (`fleet revoke`) removes it
                self.retained_leftovers.add(messages.parse_topic(topic)[1])
            if left is not None and left not in self._left_seen:  # each leftover counted once
                self._left_seen[left] = None
                self.stats.left_by_revoked += 1
                while len(self._left_seen) > MAX_LEFT_SEEN:
                    self._left_seen.popitem(last=False)
            elif left is not None and not retained:  # the same one live again: a keyless peer replays a capture
                self.stats.replayed_by_revoked += 1  # (the broker's retained copy, sent at each subscribe, is not)
            if m.qos:
                self._ack([m.mid])
            return
        if not m.qos and self._queue.qsize() >= MAX_QUEUED:
            self.stats.dropped += 1
            if self.stats.dropped == 1:
                self._alert(Alert("monitor", "refused", f"{topic}: QoS 0 messages arrive faster than they can be "
                                                        f"checked ({MAX_QUEUED:,} waiting): dropped and counted (dropped); "
                                                        "agents publish at QoS 1"))
            return
        self._queue.put((topic, m.payload, time.time(), m.mid if m.qos else None))

    def _ack(self, mids: list[int | None]) -> None:
        """Acknowledge the QoS 1 messages ``mids`` to the broker, in the order received, in one write
        (:func:`~device_agents.mqtt.ack_all`); return nothing."""
        try:
            ack_all(self.client, mids)
        except Exception:  # noqa: BLE001 - disconnected: the broker sends them again, the msg_id keeps each once
            log.debug("could not acknowledge %d messages", len(mids))

    def _on_connect(self, client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            self._connected.set()
            return
        client.on_subscribe = lambda *_: self._connected.set()  # ready once the broker confirms the subscriptions
        if self.share is not None and self._group != self.share:  # a session an edge-kit before share_group left
            # joined the group under the bare name, open to any device: left, or each record would come once a group
            client.unsubscribe([messages.subscription(self.fleet.fleet, k, share=self.share) for k in STORED_KINDS])
        client.subscribe([(messages.subscription(self.fleet.fleet, k, share=self._group), 1) for k in STORED_KINDS])

    def start(self, timeout: float = 10.0) -> Monitor:
        """Connect and start storing; return the monitor (started, for chaining).

        Raises:
            AgentError: the broker cannot be reached or refuses the connection.
        """
        b = self.fleet.broker
        self._judge_before_from = math.inf  # until subscribed and settled (SETTLE_S)
        try:  # a device's non-finite answers counted before this monitor started are not new to it
            shadows = self.store.latest_shadow()
            self._last_shadow = {d: _shadow_mark(m) for d, m in shadows.items()}
            self._intervals = self.store.telemetry_intervals()  # until its next telemetry says otherwise
            if self.share is not None:  # the history's receive times are the database's clock: measured first
                self._measure_db_offset()
            # each device's fp32 accuracy per model, what its accuracy bound is judged against (one query)
            self._reference, self._references_start, self._references_read = {}, self._clock(), {}
            self._take_references(self.store.reference_accuracies(self._accuracy_bounded(), REFERENCE_VARIANTS))
            # what each device stored lately spent its budget: a restart gives a flooding device no fresh burst
            now = self._clock()
            recent = self.store.stored_since(now - self.budget.window_s())
            self.budget.charge({d: seconds for d, seconds in recent.items() if d in self.constraints}, now)
            self._close_revoked()  # a revoked device's alerts are no news: not carried over
            open_before = self.store.open_alert_keys()
            self.carried_over = self.store.alerts(holds=True, limit=MAX_CARRIED) if open_before else []
            self.carried_over_total = len(open_before)
            self._seed_alert_states(shadows)  # episodes under way: not alerted again, and silence counted from then
            if self.carried_over:
                still = {(k, d, sub) for k, d, sub, _ in self.store.open_alert_keys()}
                for row in self.carried_over:
                    row["still_open"] = (row["kind"], row["device"], row["subject"]) in still
            # a device's next message in another one: its restart (the fleet's devices only, through the table's key)
            self._epochs = self.store.device_epochs(list(self.constraints))
            if self.persistent and self.share is None:  # a persistent session continues the history: so do the seqs
                self._seq = self.store.newest_seqs(SEQ_KINDS, list(self.constraints))
            if self.share is not None:  # the gap scan follows each device of the fleet file from where it stands
                self.store.follow_seqs(list(self.constraints))
            else:  # this one judges the seqs itself: a later share group's scan starts from where they then stand
                self.store.forget_seq_scans()
        except HistoryError:
            pass  # the writer meets it too, and says so; the alert states are then what this run sees
        self._seeded = True
        if self.verifier is not None:
            self.verifier.start()
        self._checker.start()
        self._writer.start()
        try:
            if self.share is not None:  # MQTT 5: a persistent session is a session expiry interval
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = 3600 if self.persistent else 0
                self.client.connect(b.host, b.port, keepalive=30, clean_start=not self.persistent, properties=props)
            else:
                self.client.connect(b.host, b.port, keepalive=30)
        except OSError as exc:
            raise broker_unreachable(b, exc) from None
        self.client.loop_start()
        if not self._connected.wait(timeout) or self._refused:
            self.stop()
            raise AgentError(f"the MQTT broker at {b.host}:{b.port} refused the monitor ({self._refused or 'timeout'})")
        self._judge_before_from = time.monotonic() + SETTLE_S
        return self

    def stop(self, drain_s: float = 2.0) -> None:
        """Disconnect, store what is queued (up to ``drain_s``), stop the writer; return nothing.

        A history that failed (:attr:`failed`) is not raised here: the caller reads ``failed``.
        """
        # Take nothing new, store (and acknowledge) what is queued while still connected, then leave.
        self._closing.set()
        deadline = time.monotonic() + drain_s
        while (self._queue.unfinished_tasks or self._checked.unfinished_tasks) and time.monotonic() < deadline \
                and self.failed is None:
            time.sleep(0.01)
        self.client.disconnect()
        self.client.loop_stop()
        self._stop.set()
        for thread in (self._checker, self._writer):
            if thread.is_alive():
                thread.join(timeout=5)
        # What was received but not stored yet (the drain timed out) is stored now, here, unacknowledged:
        # a persistent session gets it again (a duplicate, dropped by msg_id), a clean one would lose it.
        # Not when the history has failed: nothing can be stored, and the broker keeps it.
        try:
            while not self._checked.empty() and self.failed is None:
                self._keep(*self._checked.get_nowait()[0])
            rest = []
            while not self._queue.empty():
                rest.append(self._queue.get_nowait())
            if rest and self.failed is None:
                self._store(rest)
        except HistoryError as exc:
            self.failed = exc
        if self.failed is None:
            try:
                self._end_floods(math.inf)  # what a device had refused when the monitor stops is a gap too
            except HistoryError as exc:
                self.failed = exc
        if self.verifier is not None:
            self.verifier.stop()

    # --- the writer thread ------------------------------------------------------------------------

    def _check_loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                self._end_floods_or_fail()
                continue
            batch = [first]
            while len(batch) < BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._checked.put(self._check_batch(batch))  # waits while the writer is behind (bounded)
            for _ in batch:
                self._queue.task_done()
            self._end_floods_or_fail()

    def _end_floods_or_fail(self) -> None:
        """:meth:`_end_floods` in the checker thread: a history that fails is kept in :attr:`failed` (whoever runs the
        monitor stops and says so), not raised. Returns nothing."""
        if self.failed is None and self._floods:
            try:
                self._end_floods()
            except HistoryError as exc:
                self.failed = exc

    def _check_batch(self, batch: list[tuple]) -> tuple[tuple[list, list, list], list[int | None]]:
        """Return what :meth:`_check` returns for ``batch`` and the message ids to acknowledge once it is
        stored: none when the history failed (the broker keeps them). A bug on one message never loses
        the others: the batch is then checked one message at a time. Never raises."""
        mids = [item[3] for item in batch]
        counted = (self.stats.received, self.stats.invalid)
        try:
            return self._check_within_budget(batch), mids
        except HistoryError as exc:  # keeping an invalid payload failed: the database went away
            self.failed = self.failed or exc
            return ([], [], []), []
        except Exception as exc:  # noqa: BLE001 - a bug on some message: the rest of the batch is not lost with it
            log.exception("checking a batch failed; checking its messages one at a time")
            self.stats.received, self.stats.invalid = counted  # counted again, one at a time
            self._alert(Alert("monitor", "store", f"checking {len(batch)} message(s) failed ({exc}); "
                                                  "checked one at a time"))
        try:
            return self._check_each(batch), mids
        except HistoryError as exc:
            self.failed = self.failed or exc
            return ([], [], []), []
        except Exception:  # noqa: BLE001 - keeping a refusal failed too: nothing more to try, said in the log
            log.exception("checking messages one at a time failed")
            return ([], [], []), mids

    def _write_loop(self) -> None:
        while not self._stop.is_set() or self._checked.unfinished_tasks:
            try:
                checked, mids = self._checked.get(timeout=0.2)
            except queue.Empty:
                if self.failed is None:
                    try:
                        self._check_silence()
                        self._scan_gaps()
                    except HistoryError as exc:  # opening the alert failed: the database went away
                        log.info("%s", exc)
                        self.failed = exc
                        self._alert(Alert("monitor", "store", str(exc)))
                continue
            try:
                if self.failed is None:
                    self._keep(*checked)
                    self._ack(mids)
                    self._scan_gaps()
            except HistoryError as exc:  # the database went away: every batch from now on would fail too
                log.info("%s", exc)  # said once, by whoever runs the monitor (not twice on stderr)
                self.failed = exc
                self._alert(Alert("monitor", "store", str(exc)))
            except Exception as exc:  # noqa: BLE001 - the history failed (disk full?): say so, keep going
                log.exception("storing a batch failed")
                self._alert(Alert("monitor", "store", f"storing {len(checked[0])} message(s) failed: {exc}"))
                self._ack(mids)  # a bug, not the database: sent again it would fail again
            self._checked.task_done()

    def _store(self, batch: list[tuple]) -> None:
        """Check and store one batch of ``(topic, payload, receive time, mid)`` in this thread (unacknowledged);
        return nothing. Raises HistoryError."""
        self._keep(*self._check_within_budget(batch))

    def _budget_device(self, topic: str) -> str | None:
        """Return the device of the fleet file that ``topic`` names (whose ingest budget its records spend), or None
        (another topic or device: not budgeted, its records are refused by their signature)."""
        try:
            device = messages.parse_topic(topic)[1]
        except MessageError:
            return None
        return device if device in self.constraints else None  # the fleet file's devices

    def _check_within_budget(self, batch: list[tuple],
                             local: bool = False) -> tuple[list[tuple[str, dict[str, Any]]], list[bytes], list[float]]:
        """Return what :meth:`_check` returns for the messages of ``batch`` its devices have ingest budget for; the
        others are refused over budget (:meth:`_refuse_over_budget`). Raises HistoryError.

        Per device, no more messages than it has budget for are checked at first; only those that verify as the
        device's spend it, so a message signed by anyone else (a forger on the device's topic) spends none: when some
        of the checked ones were refused, the device's next ones are checked in their place, in rounds that admit up
        to its budget or a margin that doubles each round (1, 2, 4, ...), whichever is more. So a batch costs at most
        :data:`MAX_CHECK_ROUNDS` calls to the verifier whatever a forger sends (one a record, when a device had one
        record of budget left and a forger filled its topic), and each message is checked at most once; messages that
        verify beyond the device's budget (admitted in the margin) are refused over budget as the unchecked ones.
        A history a newer edge-kit upgraded is refused before any of the batch is kept as invalid
        (:meth:`~edge_kit.telemetry.store.HistoryStore.check_schema`)."""
        self.store.check_schema()
        good: list[tuple[str, dict[str, Any]]] = []
        raw: list[bytes] = []
        received: list[float] = []
        pending = batch
        margin = 0  # records admitted per device beyond its budget: none until a round's checks refuse some
        revoked = self._revoked_now()  # two stats a batch, a set lookup a record
        while pending:
            admitted: list[tuple] = []
            held: list[tuple] = []
            room: dict[str, int] = {}
            for item in pending:
                device = self._budget_device(item[0])
                if device in revoked:  # a thief holding its key: refused before it is checked or spends any budget
                    self.stats.received += 1
                    self._refuse(item[0], item[1], self.keyring.revocation_reason(device), revoked=True)
                    continue
                if device is not None and device not in room:
                    available = self.budget.available(device)
                    room[device] = max(available, margin) if available > 0 else 0
                if device is None or room[device] > 0:
                    if device is not None:
                        room[device] -= 1
                    admitted.append(item)
                else:
                    held.append(item)
            pending = held
            if not admitted:
                break
            g, r, t = self._check(admitted, local)
            beyond: list[tuple] = []  # verified, but past the device's budget (admitted in the margin)
            left: dict[str, int] = {}
            for item in zip(g, r, t):
                device = item[0][1]["device"]
                if device in self.constraints:
                    if device not in left:
                        left[device] = self.budget.available(device)
                    if left[device] <= 0:
                        kind, msg = item[0]
                        beyond.append((messages.topic(msg["fleet"], device, kind), item[1], item[2]))
                        continue
                    left[device] -= 1
                    self.budget.spend(device)
                good.append(item[0])
                raw.append(item[1])
                received.append(item[2])
            self._refuse_over_budget(beyond, counted=True)
            if len(g) == len(admitted):  # every one checked verified: the rest is over its device's budget
                break
            margin = max(1, 2 * margin)
        self._refuse_over_budget(pending)
        return good, raw, received

    def _revoked_now(self) -> frozenset[str]:
        """Return the fleet file's devices whose key was revoked and none registered since (the keyring re-reads its
        files when either was replaced: two stats); none when the registry cannot be read (every message is then
        refused by its check, saying why). Never raises."""
        try:
            return self.keyring.revoked_devices() & self.constraints.keys()
        except ConfigError:
            return frozenset()

    def _refuse_over_budget(self, batch: list[tuple], counted: bool = False) -> None:
        """Count the messages of ``batch`` (of devices over their ingest budget) as received (unless ``counted``: the
        check counted them) and refused, per device, without storing them; alert when a device's episode begins.
        Return nothing."""
        for topic, payload, at, *_ in batch:
            _, device, kind = messages.parse_topic(topic)  # _budget_device parsed it
            if not counted:
                self.stats.received += 1
            self.over_budget[device] = self.over_budget.get(device, 0) + 1
            flood = self._floods.get(device)
            if flood is None:
                flood = self._floods[device] = _Flood(first=at, last=at)
                self._hold_over_budget(device)
            flood.last = max(flood.last, at)
            flood.count += 1
            found = _CLAIMED_SEQ.search(payload, 0, CLAIMED_SEQ_BYTES)
            if found is not None and int(found.group(1)) > self._seq.get((device, kind), -1):
                seq = int(found.group(1))
                low, high = flood.seqs.get(kind, (seq, seq))
                flood.seqs[kind] = (min(low, seq), max(high, seq))

    def _hold_over_budget(self, device: str) -> None:
        """Hold ``device``'s over-budget alert open in the history for this worker's episode (raised when that opened
        it: no peer's episode holds it); return nothing. Raises HistoryError."""
        self._alert_held(Alert(device, "refused", f"{device}: over its ingest budget ({self.budget.rate:g} records/s, "
                                                  f"burst {self.budget.burst:,.0f}): its records are refused unchecked "
                                                  "and counted (over_budget) until it slows down; the span refused is "
                                                  "recorded as a sequence gap"), "over_budget")

    def _end_floods(self, now: float | None = None) -> None:
        """End the episodes over budget of devices none of whose records was refused for :data:`FLOOD_QUIET_S`
        (every one when ``now`` is ``math.inf``: stopping): record each refused span as a sequence gap per topic kind
        and alert with the count. Return nothing. Raises HistoryError.

        A span runs from the lowest to the highest ``seq`` its records claimed, but never past the device's newest
        verified ``seq`` of the kind: the claims are unchecked (anyone may publish on the topic of a device over its
        budget when the broker has no ACL), and a claim of 10**18 taken as the newest would have hidden every later
        gap of the device. What was refused after its newest verified record is recorded by the sequence check,
        from verified numbers, when its next record is stored. With ``share`` no worker follows the sequence (no
        verified numbers here), so none is recorded here: the records refused are missing from the history, and the gap
        scan (:meth:`_scan_gaps`) records them from the device's verified numbers as any other loss."""
        now = time.time() if now is None else now
        for device, flood in list(self._floods.items()):
            if now - flood.last < FLOOD_QUIET_S:
                if time.monotonic() - flood.confirmed >= ALERT_CONFIRM_S:  # a write every ALERT_CONFIRM_S, not a record
                    flood.confirmed = time.monotonic()
                    if not self.store.confirm_alert(device, "over_budget", self.holder):
                        self._hold_over_budget(device)  # closed as stale meanwhile: this episode still holds it
                continue
            del self._floods[device]
            self.store.release_alert(device, "over_budget", self.holder)  # closed unless a peer's episode holds it
            recorded = []
            for kind, (low, high) in sorted(flood.seqs.items()):
                high = min(high, self._seq.get((device, kind), -1))  # the sequence check records what is beyond
                if low <= high and not self._gap_cap.full(device):
                    self.stats.gaps += 1
                    self._gap_cap.take(device)
                    self.store.add_gap(device, kind, low, high, self._clock())
                    recorded.append(f"{kind} {low}-{high}")
                elif low <= high:
                    self._gap_not_recorded(device)
            spans = ", ".join(recorded)
            self._alert(Alert(device, "refused", f"{device}: {flood.count:,} records refused over its ingest budget in "
                                                 f"{flood.last - flood.first:.0f} s"
                                                 + (f"; recorded as sequence gaps ({spans}: the seq they claim, unchecked)"
                                                    if spans else "")))

    def _check_each(self, batch: list[tuple]) -> tuple[list[tuple[str, dict[str, Any]]], list[bytes], list[float]]:
        """Return what :meth:`_check` returns, checking ``batch`` one message at a time in this process
        (after a batch failed on a bug): a message whose check still fails is counted, kept as invalid
        with the error and alerted, the others are kept. Raises HistoryError."""
        good: list[tuple[str, dict[str, Any]]] = []
        raw: list[bytes] = []
        received: list[float] = []
        for item in batch:
            counted = self.stats.received
            try:
                g, r, t = self._check([item], local=True)
            except HistoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - this message's check is the bug: it is refused, kept as invalid
                self.stats.received = counted + 1
                self._refuse(item[0], item[1], f"checking it failed: {type(exc).__name__}: {exc}")
                continue
            good += g
            raw += r
            received += t
        return good, raw, received

    def _refuse(self, topic: str, payload: bytes, why: str, revoked: bool = False) -> None:
        """Count a refused message, alert, and keep it as invalid (the first :data:`MAX_INVALID_ROWS` of a run), its
        topic cut to :data:`MAX_TOPIC` characters (the sender chose it); ``revoked``: one on the topic of a revoked
        device, counted in ``stats.revoked``, kept only among the first :data:`MAX_REVOKED_ROWS` of a run, never
        alerted (its alerts were closed as revoked; the summary says how many). Return nothing. Raises HistoryError."""
        if revoked:
            self.stats.revoked += 1
        else:
            self.stats.invalid += 1
        kept = self.stats.invalid + self.stats.revoked
        reason = clip(why, MAX_REASON)
        topic = clip(topic, MAX_TOPIC)
        if not revoked:
            self._alert(Alert(topic, "refused", f"refused a message on {topic}: {reason}"))
        elif self.stats.revoked > MAX_REVOKED_ROWS:  # a thief's flood: counted, not a write each
            return
        if kept <= MAX_INVALID_ROWS:  # a flood of them is counted, never the history's size
            self.store.add_invalid(topic, reason, payload[:4096 if kept <= 1000 else 256])
            if kept == MAX_INVALID_ROWS:
                self._alert(Alert("monitor", "refused", f"{MAX_INVALID_ROWS:,} refused messages stored in this "
                                                        "run; more are counted (invalid), not stored"))

    def _check(self, batch: list[tuple], local: bool = False) -> tuple[list[tuple[str, dict[str, Any]]], list[bytes], list[float]]:
        """Return the messages of ``batch`` that decode, verify and are new enough to store (with their
        payloads and receive times); every other one is counted, kept as invalid and alerted.
        ``local``: verify signatures in this process, not in the verifying child. Raises HistoryError."""
        good: list[tuple[str, dict[str, Any]]] = []
        raw: list[bytes] = []
        received: list[float] = []
        pairs = [(topic, payload) for topic, payload, *_ in batch]
        with self._verifying:  # one batch at a time on the pipe (stop() may check leftovers meanwhile)
            try:
                elsewhere = not local and self.verifier is not None and self.verifier.submit(pairs)  # verified there meanwhile
            except Exception:  # noqa: BLE001 - a child that cannot start: verify here
                log.exception("the verifying process cannot run; verifying in the monitor")
                elsewhere = False
            checked: list[tuple[str, dict[str, Any]] | Exception] = []
            with self.keyring.checked_once():  # verifying here: the key files checked once a batch
                for topic, payload, at, *_ in batch:
                    try:
                        checked.append(receive(None if elsewhere else self.keyring, topic, payload, at))
                    except Exception as exc:  # noqa: BLE001 - EdgeKitError, and whatever else a message holds: refused
                        checked.append(exc)
            verdicts = self.verifier.result() if elsewhere else None
            if elsewhere and (verdicts is None or len(verdicts) != len(pairs)):  # the child died: verify here
                with self.keyring.checked_once():
                    verdicts = [verify_published(self.keyring, topic, payload, decoded_elsewhere=True)
                                for topic, payload in pairs]
        for i, (topic, payload, at, *_) in enumerate(batch):
            self.stats.received += 1
            outcome = checked[i]
            if not isinstance(outcome, Exception) and verdicts is not None and verdicts[i] is not None:
                outcome = MessageError(verdicts[i])
            if isinstance(outcome, Exception):
                self._refuse(topic, payload, str(outcome))
                continue
            good.append(outcome)
            raw.append(payload)
            received.append(at)
        return good, raw, received

    def _keep(self, good: list[tuple[str, dict[str, Any]]], raw: list[bytes], received: list[float]) -> None:
        """Store checked messages once each; then sequence gaps, alerts and the ``on_message`` hook. Return nothing.
        Raises HistoryError (a newer edge-kit upgraded the history since it was opened too: nothing of the batch is
        written, :meth:`~edge_kit.telemetry.store.HistoryStore.check_schema`)."""
        self.store.check_schema()
        self._sync_alert_states()
        fresh = [i for i, (_, msg) in enumerate(good) if msg["msg_id"] not in self._recent]
        self.stats.duplicates += len(good) - len(fresh)
        if len(fresh) < len(good):
            good, raw, received = [good[i] for i in fresh], [raw[i] for i in fresh], [received[i] for i in fresh]
        if not good:
            return
        # a status is retained: the broker sends each device's again on every subscribe, so a new run of the monitor
        # got the one an earlier run stored and alerted ("went offline") as news; the history knows it already. A
        # shadow comparison an agent sends again after its restart is no news either, and not handed on again (the
        # drift check orders shadow messages by seq itself: an older one never stored before is no news to it either)
        old = set().union(*(self.store.stored_ids(kind, [m["msg_id"] for k, m in good if k == kind])
                            for kind in NOT_NEWS_AGAIN))
        if self.share is not None and self._db_offset:  # receive times by the database's clock: the peers compare them
            received = [r + self._db_offset for r in received]
        # one record the database cannot hold is refused alone: the others are stored without it
        new, refused = self.store.add_each(good, raw, received, keep_refused=False)
        for i, why in refused.items():  # counted, kept as invalid (its payload as received) and alerted
            self._refuse(messages.topic(good[i][1]["fleet"], good[i][1]["device"], good[i][0]), raw[i], why)
        if refused:
            good = [g for i, g in enumerate(good) if i not in refused]
            received = [r for i, r in enumerate(received) if i not in refused]
        if self.share is not None:  # one indexed query a batch: a record later than the grace leaves its gap
            self._take_late([(m["device"], k, m["seq"], m.get("epoch")) for k, m in good if k in SEQ_KINDS])
        self.stats.duplicates += len(good) - new
        self.stats.stored += new
        if self.share is not None:  # a peer may have stored the device's fp32 benchmark: one query a batch of benches
            bounded = set(self._accuracy_bounded())
            benched = sorted({m["device"] for k, m in good if k == "bench" and m["device"] in bounded})
            if benched:  # what was stored since its last look at each (less REFERENCE_LAG_S): not the whole history
                now = self._clock()
                since = {d: self._references_read.get(d, self._references_start) - REFERENCE_LAG_S for d in benched}
                self._take_references(self.store.reference_accuracies(benched, REFERENCE_VARIANTS, since=since))
                self._references_read.update(dict.fromkeys(benched, now))
        statused = {m["device"] for k, m in good if k == "status"}  # rare: at connect, a switch, a stop; one query
        self._status_now = self.store.latest_status(statused) if statused else {}
        for (kind, msg), at in zip(good, received):
            if kind in NOT_NEWS_AGAIN and msg["msg_id"] in old:
                self._recent[msg["msg_id"]] = None
                continue
            try:
                self._after_store(kind, msg, at)
            except HistoryError:  # an alert's row not written: the database went away (the writer says so)
                raise
            except Exception:  # noqa: BLE001 - a hook or an odd figure must not stop the writer
                log.exception("after storing %s %r", kind, msg.get("msg_id"))  # %r: a device's text, one line
        if self._behind:  # without share: a record that came after its gap was recorded leaves it
            behind, self._behind = self._behind, []
            self._take_late(behind)
        while len(self._recent) > 100_000:
            self._recent.popitem(last=False)

    def _after_store(self, kind: str, msg: dict[str, Any], at: float | None = None) -> None:
        """Remember, check the sequence and the alerts of, and hand on one stored message (received at ``at``, as
        stored; None: now). Return nothing. Raises HistoryError."""
        self._recent[msg["msg_id"]] = None
        self.last_seen[msg["device"]] = time.time()
        if msg["device"] in self._silent_alerted:  # a set lookup a record; the history is written only when it ends
            self._silent_alerted.discard(msg["device"])
            self.store.close_alert(msg["device"], "silent")
        self._heard_before.discard(msg["device"])
        epoch = msg.get("epoch")  # decode checked it; None from an older agent: judged as before
        current = epoch is None or self._epochs.get(msg["device"]) == epoch or self._new_epoch(msg, epoch, at)
        if self.share is None and current:
            self._check_seq(kind, msg)
        self._check_alerts(kind, msg)
        if self.on_message:
            self.on_message(kind, msg)

    def _alert(self, alert: Alert) -> None:
        """Raise ``alert``: kept among the newest :data:`MAX_ALERTS` (its text cut to :data:`MAX_ALERT_CHARS`),
        counted in ``alerts_raised``; return nothing."""
        alert.text = clip(alert.text, MAX_ALERT_CHARS)
        self.alerts.append(alert)
        self.alerts_raised += 1

    def _alert_held(self, alert: Alert, kind: str, subject: str = "") -> None:
        """Raise ``alert``, the start of an episode of ``kind`` (one of the history's
        :data:`~edge_kit.telemetry.store.ALERT_KINDS`) about ``subject`` (a constraints alert's variant): opened in the
        history's ``alerts`` table (one of :data:`~edge_kit.telemetry.store.HELD_KINDS`: held by this worker,
        :meth:`HistoryStore.hold_alert`), and raised here (:meth:`_alert`: kept, counted, printed) only when this call
        opened it: another worker of the ``share`` group that opened it first raised it. Return nothing.
        Raises HistoryError."""
        if kind in HELD_KINDS:
            opened = self.store.hold_alert(alert.device, kind, self.holder, alert.text, alert.ts)
        else:
            opened = self.store.open_alert(alert.device, kind, alert.text, alert.ts, subject=subject)
        if opened:
            self._alert(alert)

    def _scan_gaps(self) -> None:
        """With ``share``, at most every :data:`GAP_SCAN_S`: record and alert the sequence gaps the history shows, if no
        other worker is scanning (:meth:`HistoryStore.take_scan_lease`); return nothing. One query reads what was stored
        past where the last scan (any worker's) stood (:meth:`HistoryStore.seq_window`: :data:`SCAN_ROWS` rows of a
        stream at most), :func:`share_gaps` judges it up to what settled ``gap_grace_s`` ago, and one transaction records
        the gaps and where the scan stands (:meth:`HistoryStore.record_scan`): each gap once, alerted by the worker that
        recorded it, at most :data:`MAX_GAP_ROWS` a device in this run (the others counted). A scan that read a stream
        to its bound (marks lagging far behind) is followed by the next at once, not after :data:`GAP_SCAN_S`, each
        taking the lease again: every scan's time is bounded whatever the history's size. A record stored more than
        ``gap_grace_s`` after a higher number of its stream (or a telemetry claim past it) is stored, and its number
        taken out of the gap recorded for it by the worker that stored it (:meth:`HistoryStore.take_out_of_gaps`,
        counted in ``stats.late``). Raises HistoryError (a newer edge-kit upgraded the history since it was opened too:
        nothing written, :meth:`~edge_kit.telemetry.store.HistoryStore.check_schema`; a worker no batch reaches asks
        here)."""
        now = time.monotonic()
        if self.share is None or now - self._gaps_scanned < GAP_SCAN_S:
            return
        self._gaps_scanned = now
        self.store.check_schema()
        if not self.store.take_scan_lease(self._scan_owner):
            return  # another worker scans now
        rows = self.store.seq_window(SCAN_ROWS)
        marks, gaps = share_gaps(rows, self._clock() - self.gap_grace_s, SCAN_ROWS)
        room = {d: self._gap_cap.room(d) for d, *_ in gaps}
        kept, capped = [], []
        for gap in gaps:
            room[gap[0]] -= 1
            (kept if room[gap[0]] >= 0 else capped).append(gap)
        if self.store.record_scan(self._scan_owner, marks, kept):
            # a record another worker committed while this scan judged: taken out of the gap just recorded (that
            # worker's own look, after its commit, may have come before this commit)
            self._take_late(self.store.stored_in(kept))
            for device, kind, first, last in kept:
                self._gap_found(device, kind, first, last)
            for device, *_ in capped:
                self._gap_not_recorded(device)
        read = Counter((device, kind) for kind, device, seq, ts, *_ in rows if seq is not None and ts is not None)
        stopped = {(device, kind) for kind, device, seq, ts, *_ in rows if seq is not None and ts is None}
        if any(read[(device, kind)] >= SCAN_ROWS or (device, kind) in stopped for device, kind, _seq in marks):
            # a stream read to its bound (or, in an epoch, stopped there by older numberings' rows) whose mark moved:
            # the next scan goes on from there at once (one whose rows have not settled yet waits as any other)
            self._gaps_scanned = -math.inf

    def _take_late(self, records: list[tuple[str, str, int, str | None]]) -> None:
        """Take ``records`` (stored, ``(device, kind, seq, epoch)``) out of the gaps recorded around them
        (:meth:`HistoryStore.take_out_of_gaps`, counted in ``stats.late``), a device's splits adding no more gap rows
        than are left of its :data:`MAX_GAP_ROWS` of this run (each counts as one): a late record past that stays in its
        gap, counted in ``stats.late_not_taken`` and alerted once a device (as gaps past the bound are). Return nothing.
        Raises HistoryError."""
        if not records:
            return
        room = {device: self._gap_cap.room(device) for device, *_ in records}
        left: list[tuple[str, str, int]] = []
        self.stats.late += self.store.take_out_of_gaps(records, room, left, self._clock())
        for device, rows in room.items():  # what the splits took of each device's room
            self._gap_cap.take(device, self._gap_cap.room(device) - rows)
        for device, _kind, _seq in left:
            self.stats.late_not_taken += 1
            self._gap_cap_alert(device)

    def _gap_cap_alert(self, device: str) -> None:
        """Alert, once a run, that ``device`` recorded its :data:`MAX_GAP_ROWS` gap rows of this run; return nothing."""
        if self._gap_cap.first_refusal(device):
            self._alert(Alert(device, "gap", f"{device}: {MAX_GAP_ROWS} sequence gaps recorded in this run; more are "
                                             "counted (gaps_not_recorded in the --json summary), neither recorded nor "
                                             "alerted one by one, and a late record that would split a gap further "
                                             "stays in it (late_not_taken)"))

    def _gap_not_recorded(self, device: str) -> None:
        """Count a sequence gap of ``device`` found past its :data:`MAX_GAP_ROWS` of this run (not recorded), alerting
        the first such once; return nothing."""
        self.stats.gaps_not_recorded += 1
        self._gap_cap_alert(device)

    def _gap_found(self, device: str, kind: str, first: int, last: int) -> None:
        """Count and alert that ``seq`` ``first..last`` of ``device``'s ``kind`` never arrived, recorded in the history's
        ``gaps`` already; return nothing."""
        self.stats.gaps += 1
        self._gap_cap.take(device)
        self._alert(Alert(device, "gap", f"{device}: {last - first + 1} {kind} record(s) never arrived (seq "
                                         f"{first}..{last}), recorded as a sequence gap: lost on the way "
                                         "to the monitor (dropped by the broker past its queue limit while the "
                                         "monitor was down, or published while the broker held no session for "
                                         "it)" + ("" if kind not in SPOOL_DROPPED_KINDS else
                                                 f", or dropped by the device's full spool before it sent them "
                                                 f"(its telemetry's spool counts those: dropped_{kind})")))

    def _new_epoch(self, msg: dict[str, Any], epoch: str, at: float | None = None) -> bool:
        """Take ``epoch``, other than the one known for ``msg``'s device, as its newest numbering when it is (recorded
        once in the history, :meth:`HistoryStore.add_epoch`, as first received at ``at``, ``msg``'s receive stamp as
        stored, else now by :meth:`_clock`: with ``share`` a peer's newer epoch recorded first stays the newest);
        return whether ``msg`` belongs to the device's newest numbering (False: a late message of an older one, stored
        but not judged against the new numbers). A new epoch after another is a restart: counted, alerted, and each
        stream's mark starts again at 0 (a new spool numbers from 1, so what the monitor missed of it is still a gap);
        a device's first epoch (an agent that did not send one before) is no restart: its numbering goes on. A query or
        two an epoch, never one a record; one more when the batch being stored holds statuses of the device: its newest
        status by its own order (``_status_now``) is read again by the epoch now its newest. Raises HistoryError."""
        device = msg["device"]
        if (device, epoch) in self._stale_epochs:
            return False
        previous = self._epochs.get(device)
        if previous is not None and self._restart_cap.full(device):
            self._restart_not_recorded(device, epoch)
            return False
        new, newest = self.store.add_epoch(device, epoch, msg["seq"], self._scan_owner if self.share else None,
                                           self._clock() if at is None else at)
        if newest != epoch:
            if len(self._stale_epochs) >= MAX_STALE_EPOCHS:
                self._stale_epochs.clear()
            self._stale_epochs.add((device, epoch))
            return False
        self._epochs[device] = epoch
        if device in self._status_now:  # its batch's statuses may have been read by its older numbering: read again
            self._status_now.update(self.store.latest_status([device]))
        if previous is not None:
            self._stale_epochs.add((device, previous))
            for kind in SEQ_KINDS:
                self._seq[(device, kind)] = 0
            self._restart_cap.take(device)
            if new:
                self.stats.restarts += 1
                self._alert(Alert(device, "restart", f"{device}: its numbering started again (epoch {epoch}, after "
                                                     f"{previous}: re-imaged, its agent state wiped or found "
                                                     f"damaged, or its agent running when the device lost power): "
                                                     f"recorded as a restart, not a gap; its records are "
                                                     f"judged from seq 1 of the new numbering"))
        return True

    def _restart_not_recorded(self, device: str, epoch: str) -> None:
        """Count a new numbering ``epoch`` of ``device`` past its :data:`MAX_RESTARTS` of this run (not recorded, not
        followed: its messages are stored, not judged), alerting the first such once; return nothing."""
        self.stats.restarts_not_recorded += 1
        if len(self._stale_epochs) >= MAX_STALE_EPOCHS:
            self._stale_epochs.clear()
        self._stale_epochs.add((device, epoch))  # counted once, its later messages not looked up again
        if self._restart_cap.first_refusal(device):
            self._alert(Alert(device, "restart", f"{device}: {MAX_RESTARTS} restarts (new numberings) recorded in this "
                                                 "run; more are counted (restarts_not_recorded in the --json summary), "
                                                 "neither recorded nor alerted, and their records are stored but not "
                                                 "checked for gaps"))

    def _check_seq(self, kind: str, msg: dict[str, Any]) -> None:
        """Record and alert a sequence gap when ``msg`` numbers past the device's newest ``seq`` of its kind plus one
        (this run's, or, for a persistent session, the history's when it started: what the broker dropped while the
        monitor was down, past its queue limit, is a gap too); return nothing. Raises HistoryError."""
        if kind not in SEQ_KINDS:
            return  # a status is retained and replaced, not a stream
        key = (msg["device"], kind)
        if key in self._seq and msg["seq"] <= self._seq[key]:  # behind its stream: it may fill a gap recorded
            self._behind.append((msg["device"], kind, msg["seq"], msg.get("epoch")))
        self._numbered(msg["device"], kind, msg["seq"], msg["seq"] - 1)
        if kind == "telemetry":  # the newest seq the agent gave its other streams: records lost at their end show now
            for marked, newest in messages.telemetry_marks(msg).items():
                self._numbered(msg["device"], marked, newest, newest)

    def _numbered(self, device: str, kind: str, seq: int, before: int) -> None:
        """Take ``seq`` as ``device``'s newest number of ``kind`` when it is above the one known, recording and
        alerting as a gap every number from the known one up to ``before`` (``seq - 1`` for a record; ``seq`` itself
        for a telemetry message's mark of another kind, whose record did not come); return nothing. A number more than
        :data:`MAX_SEQ_LEAD` past the known one (past 0 for a telemetry's claim when none is known) is implausible:
        counted, alerted once a device, and not taken. Raises HistoryError."""
        key = (device, kind)
        last = self._seq.get(key)
        if seq - (last if last is not None else 0 if before == seq else seq) > MAX_SEQ_LEAD:
            self.stats.implausible_seqs += 1
            if device not in self._implausible:
                self._implausible.add(device)
                self._alert(Alert(device, "gap", f"{device}: {kind} seq {seq:,} is more than {MAX_SEQ_LEAD:,} past its "
                                                 f"newest ({last if last is not None else 'none'}): not taken as where "
                                                 "its numbering stands (counted: implausible_seqs)"))
            return
        # while the device is over its budget, what it had refused is recorded as one gap when that ends
        if last is not None and before > last and device not in self._floods:
            if not self._gap_cap.full(device):
                self.store.add_gap(device, kind, last + 1, before, self._clock())
                self._gap_found(device, kind, last + 1, before)
            else:
                self._gap_not_recorded(device)
        if last is None or seq > last:
            self._seq[key] = seq

    def _check_drift(self, device: str, shadow: dict[str, Any]) -> None:
        """Alert (once per episode) when a ``shadow`` message says the served model's live outputs drift from
        its shadow reference below the device's ``min_fidelity_snr_db``, or that answers of either held NaN or
        an infinity since the device's last shadow message (its ``non_finite`` count rose; such answers are
        kept out of the fidelity): that one with or without a fidelity bound. Return nothing.

        Messages are taken in ``seq`` order (the agent's spool keeps it rising across its restarts): one of the same
        run (or without ``run``) not newer than the newest taken for the device (queued, handed to another worker,
        replayed), or one of a run taken before the newest, is no news, neither alerted on nor taken as the count.
        One whose ``run`` was not seen before is a new shadow run (a new ``shadow`` command, the agent started
        again), whose count started from 0, whatever its ``seq``: a device whose spool started again (a damaged one
        moved aside, a device provisioned again) numbers from 1 again. From an older agent, without ``run``, a
        count lower than the last is the only sign of a new run."""
        seq, run, count = _shadow_mark(shadow)
        last = self._last_shadow.get(device)
        old_runs = self._old_runs.setdefault(device, deque(maxlen=MAX_OLD_RUNS))
        new_run = run is not None and last is not None and last[1] is not None and run != last[1]
        if new_run and run in old_runs:
            return  # a late message of a run that has ended
        if last is not None and not new_run and seq is not None and last[0] is not None and seq <= last[0]:
            return
        if new_run:
            old_runs.append(last[1])
        self._last_shadow[device] = (seq, run, count)
        before = 0 if last is None or new_run else last[2]
        bad = count - before if count >= before else count  # a lower count: the agent started again
        low = bool(bad) or self._below_fidelity(device, shadow)
        if low and device not in self._drifting:
            self._drifting.add(device)
            served, ref, window, snr = (messages.field_at(shadow, *path) for path in
                                        (("serving", "variant"), ("model", "variant"), ("window",), ("fidelity", "snr_db")))
            bound = self.constraints[device].min_fidelity_snr_db if not bad else None  # below it: _below_fidelity
            named = (lambda v: v if isinstance(v, str) else "an unnamed model")
            if bad:
                text = (f"{device}: {bad:,} live answers of {named(served)} or of its shadow {named(ref)} held NaN or "
                        "infinity (shadow run's non_finite count)")
            else:
                text = (f"{device}: live outputs of {named(served)} are {snr:.1f} dB from {named(ref)} (shadow, "
                        f"{window if messages.in_range(window) else '?'} inputs), below {bound:g} dB")
            self._alert_held(Alert(device, "drift", text), "drift")
        elif not low and device in self._drifting:
            self._drifting.discard(device)
            self.store.close_alert(device, "drift")

    def _sync_alert_states(self) -> None:
        """With ``share``, at most every :data:`ALERT_SYNC_S`: take the history's open drift, low-disk, offline and
        constraints alerts of the fleet file's devices as this worker's episodes under way, and close the over-budget
        alerts no worker confirmed lately (stale: :meth:`HistoryStore.close_stale_alerts`); return nothing. The broker
        hands a device's records to any worker, so the one that sees an episode end may not be the one that saw it begin (it closes the alert
        only if it knows of it), and the one that saw it begin may not see it end (it would take the next episode for
        the same one, and raise nothing). A query a batch at most, never one a record. Raises HistoryError."""
        now = time.monotonic()
        if self.share is None or now - self._alerts_synced < ALERT_SYNC_S:
            return
        self._alerts_synced = now
        keys = self.store.open_alert_keys()
        if any(stale for *_, stale in keys):  # held by no worker that confirmed it lately (one crashed): closed
            self.store.close_stale_alerts()
        held = alerts_by_kind(keys)
        # rebound, not cleared and filled: /metrics (another thread) reads them whole (alert_states), never half
        self._drifting = {d for d in held.get("drift", ()) if d in self.constraints}
        self._low_disk = {d for d in held.get("low_disk", ()) if d in self.constraints}
        self._offline = {d for d in held.get("offline", ()) if d in self.constraints}
        self._silent_alerted = {d for d in held.get("silent", ()) if d in self.constraints}
        self._breaking = _breaking_of(keys, self.constraints)

    def _seed_alert_states(self, shadows: dict[str, dict[str, Any]]) -> None:
        """Start each alert episode the history shows under way, so a restarted monitor neither raises an alert again
        nor misses one (``shadows``: the store's ``latest_shadow``, read by the caller); return nothing.

        The history's ``alerts`` table says which hold: its open drift, low disk, silence, offline and constraints
        alerts of the fleet file's devices are the episodes under way. Over-budget alerts are workers' own episodes:
        this worker lets go of the holds it left under its name (the same client id: it crashed), a monitor without
        ``share`` closes every open one (a run that did not stop left it: no episode is under way in this one) and
        forgets every hold, and a ``share`` worker closes those no worker confirmed lately (stale). Each device is last heard
        when this host stored its newest record of any kind (never the device's ``ts``): a device silent since before
        the restart without an open silence alert is alerted once its limit passes, once the monitor has been
        subscribed for :data:`SETTLE_S` and has checked what it received without hearing from it (what the broker
        queued while the monitor was stopped comes first).

        A history an older edge-kit wrote, whose alerts were not kept (:meth:`HistoryStore.alerts_kept`), is judged
        from its records instead, per device of the fleet file, as the live checks judge a message that arrives; the
        alerts so inferred are opened in the table, and from then on it holds them:

        - drift: its newest stored shadow comparison is below its bound (:meth:`_below_fidelity`), and low disk: its
          newest stored status or telemetry with a disk figure says so (:meth:`_disk_low`). The monitor that stored
          that record alerted on it: the episode holds, not alerted again.
        - silent: one past its limit already counts as alerted when the history holds a record received after the
          limit passed (a monitor was storing the fleet's records then, and alerted it); else nobody was told, and it
          is alerted as above.

        Raises:
            HistoryError: the history cannot be read or written.
        """
        fleet = self.constraints
        # stored by the database's clock with share (_db_offset; 0 without): this host's, as last_seen is
        heard = {device: seen - self._db_offset for device, seen in self.store.last_received(KINDS).items()}
        for device, seen in heard.items():
            if device in fleet and device not in self.last_seen:  # a message this run stored already is newer
                self.last_seen[device] = seen
                self._heard_before.add(device)
        if self.store.alerts_kept():
            for device, kind in self.store.held_by(self.holder):  # this worker's, before it stopped: no episode now
                self.store.release_alert(device, kind, self.holder)
            keys = self.store.open_alert_keys()
            held = alerts_by_kind(keys)
            for state, kind in ((self._drifting, "drift"), (self._low_disk, "low_disk"),
                                (self._silent_alerted, "silent"), (self._offline, "offline")):
                state.update(d for d in held.get(kind, ()) if d in fleet)
            for device, subjects in _breaking_of(keys, fleet).items():
                self._breaking.setdefault(device, set()).update(subjects)
            if self.share is None:  # the only worker: no episode of another holds it
                self.store.forget_holders(HELD_KINDS)
                for device in held.get("over_budget", ()):
                    self.store.close_alert(device, "over_budget", why=CLEARED_STALE)
            elif any(stale for *_, stale in keys):
                self.store.close_stale_alerts()
            return
        self._infer_alert_states(shadows, heard)
        for state, kind in ((self._drifting, "drift"), (self._low_disk, "low_disk"), (self._silent_alerted, "silent"),
                            (self._offline, "offline")):
            for device in sorted(state):
                self.store.open_alert(device, kind, f"{device}: {kind.replace('_', ' ')} (inferred from the records of "
                                                    "a history kept before alerts were)")
        self.store.keep_alerts()

    def _infer_alert_states(self, shadows: dict[str, dict[str, Any]], heard: dict[str, float]) -> None:
        """Start the alert episodes the records of a history an older edge-kit wrote show under way (see
        :meth:`_seed_alert_states`; ``heard``: the store's ``last_received`` of every kind); return nothing.
        Raises HistoryError (the history cannot be read)."""
        fleet = self.constraints
        status, telemetry = self.store.latest_status(), self.store.latest_telemetry()
        status_at, telemetry_at = self.store.last_received(("status",)), self.store.last_received(("telemetry",))
        disk: dict[str, dict[str, Any]] = {}  # per device, its newest status or telemetry that judges the disk
        for device in fleet:
            said = sorted(((at.get(device, -math.inf), m[device]) for at, m in ((status_at, status),
                                                                                  (telemetry_at, telemetry))
                           if device in m), key=lambda pair: pair[0], reverse=True)
            judged = next((m for _, m in said if self._disk_low(m) is not None), None)
            if judged is not None:
                disk[device] = judged
        for state, newest, holds in ((self._drifting, shadows, self._below_fidelity),
                                     (self._low_disk, disk, lambda _d, m: bool(self._disk_low(m))),
                                     (self._offline, status, lambda _d, m: m.get("state") == "offline")):
            state.update(d for d, m in newest.items() if d in fleet and holds(d, m))
        stored_until = max(heard.values(), default=-math.inf)  # a monitor was storing the fleet's records then
        for device, seen in heard.items():
            if device in fleet and seen + self._silence_limit(device) <= stored_until:
                self._silent_alerted.add(device)

    def _below_fidelity(self, device: str, shadow: dict[str, Any]) -> bool:
        """Return True when ``shadow`` (a ``shadow`` message of ``device``) says the served model's outputs are below
        the device's ``min_fidelity_snr_db`` (False for a device without that bound or not in the fleet file)."""
        c = self.constraints.get(device)
        bound = c.min_fidelity_snr_db if c is not None else None
        snr = messages.field_at(shadow, "fidelity", "snr_db")
        return bound is not None and messages.in_range(snr) and snr < bound

    def _disk_low(self, msg: dict[str, Any]) -> bool | None:
        """Return whether ``msg`` (a status or telemetry message) says its device's disk is full or has less than
        ``min_free_bytes`` free; None when it says neither (no disk, or a figure that is no byte count: negative,
        400 digits)."""
        disk = msg.get("disk")
        free = disk_free_bytes(disk)
        if not isinstance(disk, dict) or (free is None and not disk.get("full")):
            return None
        return bool(disk.get("full")) or free < self.min_free_bytes

    def _check_alerts(self, kind: str, msg: dict[str, Any]) -> None:
        device = msg["device"]
        if kind == "shadow":
            self._check_drift(device, msg)
        if kind == "telemetry":  # an older agent says no interval: the default silence for it
            interval = telemetry_interval(msg)
            if interval is None:
                self._intervals.pop(device, None)
            else:
                self._intervals[device] = interval
        low = self._disk_low(msg) if kind in ("status", "telemetry") else None
        if low is not None:
            disk = msg["disk"]
            free = disk_free_bytes(disk)
            if low and device not in self._low_disk:
                self._low_disk.add(device)
                refused = "installs, activations and benches refused"
                self._alert_held(Alert(device, "disk", f"{device}: disk full ({refused})" if free is None else
                                       f"{device}: {free / 1e6:.1f} MB free" + (f" (full: {refused})" if disk.get("full")
                                                                               else f" (below {self.min_free_bytes / 1e6:.0f} MB)")),
                                 "low_disk")
            elif not low and device in self._low_disk:
                self._low_disk.discard(device)
                self.store.close_alert(device, "low_disk")
        if kind == "status":  # offline until its status says otherwise (an agent says online when it connects)
            # by the device's newest status in its own order, as stored: one received late (an older connection's, or
            # stamped by a --share peer after the will) neither revives a device nor takes it offline
            state = self._status_now.get(device, msg).get("state")
            if state == "offline" and device not in self._offline:
                self._offline.add(device)
                self._alert_held(Alert(device, "offline", f"{device} went offline"), "offline")
            elif state != "offline" and (device in self._offline or self.share is not None):
                # with --share a peer may have opened it since this worker's last sync (its offline came to the peer,
                # this status here): closed all the same, an UPDATE a status message (rare: at connect, activation)
                self._offline.discard(device)
                self.store.close_alert(device, "offline")
        elif kind == "bench" and device in self.constraints:
            c = self.constraints[device]
            # a record without the model's size does not judge the size bound (it is no 0 MB model)
            size = msg.get("model_bytes")
            m = Measured.from_record(msg, size if size is not None else math.nan)
            variant = str(msg["variant"])
            model = msg.get("model") if isinstance(msg.get("model"), str) else None
            if variant in REFERENCE_VARIANTS and messages.in_range(m.accuracy) and m.accuracy > 0:
                self._take_references({(device, model, variant): float(m.accuracy)})
            reference = self._reference_of(device, model)  # (its accuracy, where it came from, its variant), or None
            broken = violations(c, m, reference[0] if reference is not None else None)
            if reference is None and c.min_accuracy_ratio is not None and m.accuracy is not None:
                self._note_unjudged(device, model, variant, c.min_accuracy_ratio)
            subject = alert_subject(variant)  # an episode per variant, as the alerts table keeps it
            held = self._breaking.get(device, set())
            if broken and subject not in held and len(held) >= self._breaking_cap.limit:
                self.stats.breaking_not_alerted += 1  # stored, not an episode: the device has too many open
                if self._breaking_cap.first_refusal(device):
                    self._alert(Alert(device, "constraints", f"{device}: {len(held)} variants break its constraints at "
                                      f"once; those of more are not alerted one by one (counted: breaking_not_alerted "
                                      f"in the --json summary; their records are stored)"))
            elif broken and subject not in held:  # each bound with the figure that broke it and where that came from
                self._breaking.setdefault(device, held).add(subject)
                self._alert_held(Alert(device, "constraints", f"{device} {msg['variant']}: breaks "
                                       + broken_text(c, m, broken, reference)
                                       + ("; a simulated device: this machine's figures" if msg.get("simulated") else "")),
                                 "constraints", subject=variant)
            elif not broken and (subject in held or self.share is not None):
                # with --share a peer may have opened it since this worker's last sync (its breaking benchmark came to
                # the peer, this one here): closed all the same, an UPDATE a passing benchmark (rare: a bench run)
                held.discard(subject)
                self._breaking_cap.rearm(device)
                self.store.close_alert(device, "constraints", subject=variant)

    def _accuracy_bounded(self) -> list[str]:
        """Return the fleet file's devices whose constraints bound accuracy (``min_accuracy_ratio``): those whose fp32
        accuracy the monitor follows."""
        return [d for d, c in self.constraints.items() if c.min_accuracy_ratio is not None]

    def _take_references(self, found: dict[tuple[str, str | None, str], float]) -> None:
        """Take ``found`` (``(device, model, fp32 variant)`` -> accuracy, newer than what is known) as the fp32
        accuracies the accuracy bound is judged against; return nothing. Each device keeps at most
        :data:`MAX_REFERENCES_PER_DEVICE`, the one taken least recently dropped first: a hostile device with a valid key
        naming a new model in each record pushes out only its own, never the fp32 accuracy another device's bound is
        judged against."""
        for (device, model, variant), value in reversed(list(found.items())):  # the history's newest first: taken last
            kept = self._reference.setdefault(device, {})
            kept.pop((model, variant), None)  # taken again: the newest
            kept[(model, variant)] = value
            while len(kept) > MAX_REFERENCES_PER_DEVICE:
                del kept[next(iter(kept))]

    def _reference_of(self, device: str, model: str | None) -> tuple[float, str, str] | None:
        """Return the fp32 accuracy ``device``'s benchmarks of ``model`` are judged against (its newest benchmark of
        the first of :data:`~edge_kit.selection.constraints.REFERENCE_VARIANTS` it measured, with an accuracy), where
        it came from, in words, and that variant; None when none is known (the accuracy bound is then not judged)."""
        for variant in REFERENCE_VARIANTS:
            value = self._reference.get(device, {}).get((model, variant))
            if value is not None:
                return value, f"its newest {variant} benchmark on {device}", variant
        return None

    def _note_unjudged(self, device: str, model: str | None, variant: str, bound: float) -> None:
        """Say once per device and model (a note, not an alert: nothing broke) that a benchmark's accuracy bound of
        ``device`` (``min_accuracy_ratio`` ``bound``) is not judged for want of its fp32 accuracy (onnx-fp32's for an
        ONNX variant: an ONNX model compiled without LiteRT variants has no fp32); return nothing."""
        noted = self._noted.setdefault(device, set())
        if model in noted or len(noted) >= MAX_NOTED_PER_DEVICE:  # a device naming a new model each time: its own cap
            return
        noted.add(model)
        named = f"model {model}" if model is not None else "its model"
        try:
            ref = "onnx-fp32" if parse_variant(variant).format == "onnx" else "fp32"
        except ValueError:  # a name no compile gives: the LiteRT reference
            ref = "fp32"
        self.notes.append(clip(f"{device} {variant}: accuracy >= {bound:g} x {ref} not judged: no {ref} benchmark of "
                               f"{named} with an accuracy from {device} in the history (`edgekit bench --device "
                               f"{device} --variant {ref}` measures it; its other bounds are judged)", MAX_ALERT_CHARS))
        self.notes_raised += 1

    def _clock(self) -> float:
        """Return now (unix seconds) by the clock this monitor stores times by: with ``share`` the database's (this
        host's plus ``_db_offset``, as every peer's receive times are), else this host's (as its receive times are):
        its gap rows and restarts are recorded by it, and the age of a gap a late record may leave is judged by it."""
        return time.time() + self._db_offset

    def _measure_db_offset(self) -> None:
        """Measure how far the database's clock is ahead of this host's (:meth:`HistoryStore.clock_offset`) into
        ``_db_offset``; return nothing. One more than :data:`MAX_DB_SKEW_S` either way is said once a run, as a note: it
        is still used (every peer compares receive times by it), but the clock of one of the hosts is wrong. Raises
        HistoryError."""
        self._db_offset = self.store.clock_offset()
        if abs(self._db_offset) > MAX_DB_SKEW_S and not self._skew_noted:
            self._skew_noted = True
            ahead = "ahead of" if self._db_offset > 0 else "behind"
            self.notes.append(f"the history database's clock is {abs(self._db_offset) / 3600:.1f} h {ahead} this "
                              "host's: with --share receive times are stored by the database's clock, so what reads "
                              "them by another clock (edgekit fleet status, report, a monitor without --share) is off "
                              "by as much; set the time (NTP) of the database's host or of this one")
            self.notes_raised += 1

    def _silence_limit(self, device: str) -> float:
        """Return how long ``device`` may send nothing before it is silent (seconds): ``silence_s``, or
        :data:`SILENT_INTERVALS` of its telemetry interval when that is longer."""
        interval = self._intervals.get(device)
        return max(self.silence_s, SILENT_INTERVALS * interval) if interval is not None else self.silence_s

    def _close_revoked(self) -> set[str]:
        """Close the open alerts of the fleet file's devices whose key was revoked since this monitor last looked
        (``cleared_why`` :data:`~edge_kit.telemetry.store.CLEARED_REVOKED`: nothing of them is news, and a revoked
        device goes silent), and forget their episodes; return the revoked devices. A registry this monitor cannot
        read revokes none here (every message is refused, saying why). Raises HistoryError."""
        revoked = set(self._revoked_now())
        for device in sorted(revoked - self._revoked_closed):
            self.store.close_device_alerts(device, CLEARED_REVOKED)
            for state in (self._silent_alerted, self._offline, self._drifting, self._low_disk):
                state.discard(device)
            self._breaking.pop(device, None)
        self._revoked_closed = revoked
        return revoked

    def _check_silence(self) -> None:
        """Alert (once per episode) each device not heard from for longer than its :meth:`_silence_limit`, but one
        whose key was revoked (:meth:`_close_revoked`); one last heard in the history only once the monitor has been
        subscribed for :data:`SETTLE_S` and has checked what it received. With ``share`` a device is heard when any
        worker stored its record: one this worker has not heard from for its limit is looked up in the history first
        (:meth:`HistoryStore.last_heard`, one indexed query for those devices, once a limit at most: a peer's record
        found counts as heard; receive times stored by the database's clock, :meth:`HistoryStore.clock_offset`, so a
        peer host whose clock is behind is no silence), and a silence alert open (raised by a peer, taken at the sync)
        of a device this worker heard within its limit is closed. Return nothing. Raises HistoryError."""
        revoked = self._close_revoked()
        now = time.time()
        # subscribed for SETTLE_S, and what arrived checked and stored: the broker's queue for this session is in
        settled = time.monotonic() >= self._judge_before_from and not self._queue.unfinished_tasks
        silent = []
        for device, seen in list(self.last_seen.items()):
            if device in revoked:
                continue
            limit = self._silence_limit(device)
            judged = settled or device not in self._heard_before
            if now - seen > limit and device not in self._silent_alerted and judged:
                silent.append(device)
            elif now - seen <= limit and device in self._silent_alerted and self.share is not None:
                self._silent_alerted.discard(device)  # a peer's alert, this worker heard it since
                self.store.close_alert(device, "silent")
        if silent and self.share is not None:  # a peer may hear it: the history says when any worker last stored it
            self._measure_db_offset()  # stored by the database's clock: this host's, now
            for device, heard in self.store.last_heard(silent).items():
                if heard - self._db_offset > self.last_seen.get(device, -math.inf):
                    self.last_seen[device] = heard - self._db_offset
        for device in silent:
            seen = self.last_seen[device]
            if now - seen > self._silence_limit(device) and device not in self._silent_alerted:
                self._silent_alerted.add(device)
                self._alert_held(Alert(device, "silent", f"{device} silent for {now - seen:.0f} s"), "silent")
