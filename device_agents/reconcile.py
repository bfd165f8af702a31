"""Desired state, reconciled: fetch what the operator wants this device to run, install it, activate it
safely, and report where the device stands (see :mod:`edgekit_protocol.desired`).

The agent hands every ``desired`` message it verified to :meth:`Reconciler.take`; the main loop
calls :meth:`Reconciler.step` whenever :meth:`Reconciler.due` says so. The download (and install)
runs in a worker thread, bounded in time and cancelled by a newer desired state, so a slow or
hostile store never holds the agent's commands; the switch itself runs in the main loop, never
beside a command or a benchmark.

What survives a restart: the last desired message taken and whether it converged
(``<root>/desired.json``, written atomically before the broker is told it arrived) and the partial
download (``<root>/incoming/<sha256>.partial``, resumed with a Range request). The highest revision taken
is kept a second time (``<root>/desired-revision.json``, with its ``msg_id``), so a ``desired.json`` lost
or damaged does not let a replayed older desired state take the device back. The last ``reported`` body is kept
too (``<root>/reported.json``, written atomically): a restarted agent publishes it once it connects, so a report
whose publishing failed before the restart is not lost until the next state change. A desired state that
converged is not applied again after a restart (an operator may have moved the device since, by a
push deploy); one that had not is resumed once the broker had a moment to deliver a newer one.
A device is never left without a working model:
the new one is activated only through the store's safe activation (hash check, smoke inference in a
child), and any failure leaves the current model in place, reports ``failed`` with the reason and
retries with back-off up to ``pull.max_attempts``; an Edge TPU that another process holds for its turn is no
failure of the model, and its try is made again after ``pull.retry_s`` without counting.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from device_agents.config import store_ca_context
from device_agents.disk import atomic_write, read_json
from device_agents.errors import AcceleratorBusy
from device_agents.store import is_sha256
from edgekit_protocol.config import PullConfig
from edgekit_protocol.desired import (
    Desired,
    check_reported,
    parse_desired,
    reported_body,
)
from edgekit_protocol.errors import EdgeKitError, MessageError
from edgekit_protocol.messages import MAX_PAYLOAD, encode

log = logging.getLogger("edgekit.agent.reconcile")
MAX_RETRY_S = 900.0
DESIRED = "desired.json"
REVISION = "desired-revision.json"  # the highest revision taken and its msg_id: the floor a lost desired.json leaves
REPORTED = "reported.json"  # the last reported body: published again once a restarted agent connects
# desired.json: a desired message (at most MAX_PAYLOAD bytes as sent; written with \u escapes, which take up to 3 times
# the bytes of the UTF-8 they stand for) and two counts; a larger one is damaged, and not read whole
DESIRED_FILE_BYTES = 4 * MAX_PAYLOAD
CONNECT_GRACE_S = 2.0  # after a restart, how long the broker gets to deliver a newer desired state
FLOOR_RATE = 8192.0  # bytes/s: a download slower than this on average (or half the cap) is given up and retried


def _line(exc: BaseException) -> str:
    """Return an exception as one line: its text (a toolkit error's is one), else its type and first line."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, EdgeKitError):
        return text
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return f"{type(exc).__name__}: {text}"[:300]


@dataclass
class _Job:
    """A download and install running beside the main loop."""

    revision: int
    thread: threading.Thread
    cancel: threading.Event
    result: dict[str, Any] | None = None
    error: str | None = None


class Reconciler:
    """One device's desired state and the work to reach it.

    ``store`` is the device's :class:`~device_agents.store.ModelStore`; ``activate(sha256, keep)``
    switches to an installed model safely and returns the activation result; ``report(body)``
    publishes a ``reported`` body; ``check_disk(needs)`` raises ``DiskFull`` when ``needs`` more
    bytes do not fit; ``fetch`` is :func:`device_agents.fetch.fetch` (tests pass another); ``threads`` (the agent's
    ``bench.threads``) is what a TensorRT variant's engine is built with at install.

    The download and install run in a worker thread (the agent's commands, telemetry and newer
    desired states are not held by a slow store); the activation runs in the caller's thread, in
    :meth:`step`, once :meth:`due` says the download is done. A newer desired state cancels a
    download in flight.
    """

    def __init__(self, root: Path, store: Any, *, activate: Callable[[str, tuple[str, ...]], dict[str, Any]],
                 report: Callable[[dict[str, Any]], None], check_disk: Callable[[int], None],
                 settings: PullConfig = PullConfig(), fetch: Callable[..., Any] | None = None,
                 clock: Callable[[], float] = time.time, rng: Callable[[], float] = random.random,
                 connect_grace_s: float = CONNECT_GRACE_S, threads: int = 1):
        self.root = Path(root)
        self.store = store
        self._activate, self._report, self._check_disk = activate, report, check_disk
        self.settings = settings
        self._fetch = fetch
        self.clock, self.rng = clock, rng
        self.connect_grace_s = connect_grace_s
        self.threads = threads  # bench.threads: what a TensorRT engine is built with, as the agent runs it
        self.desired: Desired | None = None
        self._message: dict[str, Any] | None = None  # the desired message as taken (what desired.json keeps)
        self.attempt = 0
        self.next_at: float | None = None  # when to try (again); None: nothing to do
        self.last: dict[str, Any] | None = None  # the last reported body (published again on every connect)
        self._job: _Job | None = None
        self._resumed = False  # resumed from disk after a restart: wait for the broker's newer word first
        self._connected_at: float | None = None
        self._floor: tuple[int, str | None] = (0, None)  # the highest revision taken, and its msg_id
        self._load()

    def _load(self) -> None:
        """Take the desired state persisted before a restart (a damaged file is logged and ignored).

        One that had converged is done: if the device runs something else now, an operator moved it
        since (a push deploy, an ``activate``), and that stands. One that had not is resumed, but only
        once the broker had a moment to deliver a newer one (:data:`CONNECT_GRACE_S` after connecting).
        """
        try:
            floor = read_json(self.root / REVISION)
            if isinstance(floor.get("revision"), int) and isinstance(floor.get("msg_id"), str):
                self._floor = (floor["revision"], floor["msg_id"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as exc:
            log.error("%s: unreadable (%s); the revision in desired.json is the floor", self.root / REVISION, exc)
        try:
            saved = read_json(self.root / DESIRED, DESIRED_FILE_BYTES)
            self.desired, self._message = parse_desired(saved["message"]), saved["message"]
            if self.desired.revision >= self._floor[0]:
                self._floor = (self.desired.revision, self.desired.msg_id)
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, EdgeKitError) as exc:
            log.error("%s: unreadable desired state (%s); waiting for the operator's next one", self.root / DESIRED, exc)
            return
        self.last = self._load_reported()
        attempts = saved.get("attempts")
        self.attempt = attempts if isinstance(attempts, int) and not isinstance(attempts, bool) and attempts >= 0 else 0
        if not saved.get("converged") and self.attempt < self.settings.max_attempts:
            self.next_at, self._resumed = self.clock(), True  # no second start delay: it was served before

    def _load_reported(self) -> dict[str, Any] | None:
        """Return the reported body persisted before a restart when it is about the desired state taken (same
        rollout and revision), else None (none; damaged, over the payload limit, non-finite or not a reported body
        as the protocol checks one: logged; or about another desired state)."""
        path = self.root / REPORTED
        try:
            with path.open("rb") as f:
                data = f.read(MAX_PAYLOAD + 1)
            if len(data) > MAX_PAYLOAD:
                raise MessageError(f"over the {MAX_PAYLOAD}-byte payload limit")
            body = json.loads(data)
            if not isinstance(body, dict):
                raise MessageError(f"a JSON {type(body).__name__}, not a reported body")
            encode(check_reported(body))  # the receivers' checks; encode refuses NaN and infinity (a ValueError)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # MessageError is a ValueError
            log.error("%s: unreadable (%s); the next reconcile step reports again", path, exc)
            return None
        d = self.desired
        if d is None or (body.get("rollout"), body.get("revision")) != (d.rollout, d.revision):
            return None
        return body

    def _save(self, converged: bool, message: dict[str, Any] | None = None, attempts: int | None = None) -> None:
        """Persist the desired message (``message``, else the one taken), whether it converged and the tries
        so far (a restart neither re-applies a converged state nor grants a failing one fresh tries).

        Raises:
            OSError: the write failed (e.g. the disk is full); the file keeps what it held.
        """
        atomic_write(self.root / DESIRED, json.dumps({
            "message": self._message if message is None else message, "converged": converged,
            "attempts": self.attempt if attempts is None else attempts}).encode())

    def on_connect(self) -> None:
        """Note that the broker connection is up (any thread): a resumed desired state waits a grace
        period for the retained one, which may be newer."""
        self._connected_at = self.clock()

    def protected(self) -> set[str]:
        """Return the sha256s the store budget must never remove: the desired model, its eval set's
        model and the candidates it keeps."""
        d = self.desired
        return {d.sha256, *d.keep} if d and not d.hold else set()

    def take(self, message: dict[str, Any]) -> str | None:
        """Take a verified ``desired`` message; return None when taken, else why not (``stale``:
        its revision is not above the one taken before; ``same``: the one taken already, delivered again).

        The message is on disk before this returns, so the broker may forget it. A download in flight
        for an older one is cancelled. When it cannot be written, nothing changes (a retry takes it).

        Raises:
            MessageError: the body is malformed (the text names the field).
            OSError: ``desired.json`` could not be written (a full disk): the message is not taken.
        """
        new = parse_desired(message)
        old = self.desired
        if old is None and new.revision <= self._floor[0] and (new.revision, new.msg_id) != self._floor:
            log.warning("refused desired revision %d of rollout %s: not above the revision %d taken before "
                        "(desired.json was lost; a replay)", new.revision, new.rollout, self._floor[0])
            return "stale"
        if old is not None and new.revision <= old.revision:
            if new.revision == old.revision and new.msg_id == old.msg_id:
                self._resumed = False  # the broker's word is the one on disk: go on at once
                if self.last is not None:
                    self._report(self.last)  # a redelivery (reconnect): say again where the device is
                return "same"
            log.warning("refused desired revision %d of rollout %s: not above the revision %d taken before "
                        "(a replay, or the operator's clock went back)", new.revision, new.rollout, old.revision)
            return "stale"
        self._save(converged=False, message=message, attempts=0)  # first: a failed write takes nothing
        self._floor = (new.revision, new.msg_id)
        try:  # the second copy: desired.json holds the revision already, so a failure here loses nothing yet
            atomic_write(self.root / REVISION, json.dumps({"revision": new.revision, "msg_id": new.msg_id}).encode())
        except OSError as exc:
            log.error("%s: could not be written (%s); desired.json alone keeps revision %d",
                      self.root / REVISION, exc, new.revision)
        self._message = message
        self.desired, self.attempt, self._resumed = new, 0, False
        if self._job is not None:
            self._job.cancel.set()
        self.next_at = self.clock() + (0.0 if new.hold else self.rng() * new.fetch.start_delay_s)
        log.info("desired: %s %s (%s) of rollout %s, revision %d", new.model, new.variant, new.sha256[:12],
                 new.rollout, new.revision)
        return None

    def due(self) -> bool:
        """Return True when :meth:`step` should run now: a download finished, or a try is due."""
        if self._job is not None:
            return not self._job.thread.is_alive()
        if self.next_at is None:
            return False
        if self._resumed and (self._connected_at is None or self.clock() < self._connected_at + self.connect_grace_s):
            return False
        return self.clock() >= self.next_at

    def step(self) -> dict[str, Any] | None:
        """Reconcile once (the caller's thread): start the download of a model not installed, or
        activate the desired model once it is installed, unless it is current already.

        Returns:
            The ``reported`` body it published (``fetching``, ``converged`` or ``failed``), or None when
            a download it finished was for a desired state replaced since (the new one is due).
        """
        d = self.desired
        assert d is not None, "step() without a desired state"
        if d.hold and self._job is None:  # stay on the model it runs: nothing to fetch or switch
            self.next_at, self._resumed, self.attempt = None, False, 0
            self._sweep(d)  # an aborted candidate's download is not resumed: its bytes go
            self._save_converged()
            log.info("desired: hold on the current model (rollout %s, revision %d)", d.rollout, d.revision)
            return self._say("converged")
        download = None
        if self._job is not None:
            job, self._job = self._job, None
            job.thread.join()
            if job.revision != d.revision:  # cancelled for a newer desired state: that one goes on
                self.next_at = self.next_at if self.next_at is not None else self.clock()
                return None
            if job.error is not None:
                return self._failed(job.error)
            download = job.result
        else:
            self.next_at, self._resumed = None, False
            self.attempt += 1
            have = self._sweep(d)  # also when nothing is fetched (a rollback to an installed model)
            if self.store.current() != d.sha256 and not self._installed(d.sha256):
                try:
                    self._start(d, have)
                except Exception as exc:  # noqa: BLE001 - e.g. DiskFull: an answer, never the loop's end
                    return self._failed(_line(exc))
                return self._say("fetching")
        try:
            if self.store.current() != d.sha256:
                activation = self._activate(d.sha256, (d.sha256, *d.keep))
                smoke = activation.get("smoke") or {}  # what the smoke check timed: smoke.SMOKE_TIMED
                log.info("desired %s %s is current (smoke check: loaded and one cold invoke() on zeros in %s ms)",
                         d.model, d.variant, smoke.get("load_and_first_invoke_ms"))
        except AcceleratorBusy as exc:  # another process's turn on the Edge TPU: nothing wrong with the model
            return self._failed(_line(exc), counted=False)
        except Exception as exc:  # noqa: BLE001 - a failed activation leaves the current model: say why
            return self._failed(_line(exc))
        self.attempt = 0
        self._save_converged()
        return self._say("converged", download=download)

    def _save_converged(self) -> None:
        """Mark the desired state converged on disk; a failed write (a full disk) is logged, never raised: the
        switch is done and must be reported, and the ``converged: false`` left on disk is settled at once after a
        restart (the desired model is current, or the hold is taken again)."""
        try:
            self._save(converged=True)
        except OSError as exc:
            log.error("could not record in %s that the desired state converged (%s); reported anyway",
                      self.root / DESIRED, exc)

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel a download in flight and wait for its thread (at most ``timeout`` seconds)."""
        if self._job is not None:
            self._job.cancel.set()
            self._job.thread.join(timeout)

    def _sweep(self, d: Desired) -> int:
        """Drop the downloads ``d`` does not want; return the bytes the ones it wants hold already.

        A download is ``incoming/<sha256>.partial`` while it runs and ``incoming/<sha256>`` once
        verified, until the install takes it; either is left behind when a download is cut, the agent
        killed or the power gone before the install. Every step that starts no download for it (a hold,
        a rollback to an installed model) drops it too, else an aborted candidate's bytes would hold the
        disk until some later rollout. Other files in ``incoming/`` (a push deploy's uploads) are not
        the reconciler's and stay. A file that cannot be removed is logged and left.
        """
        incoming = self.root / "incoming"
        have = 0
        try:
            downloads = list(incoming.iterdir()) if incoming.is_dir() else []
        except OSError as exc:
            log.error("%s: cannot be listed (%s); downloads left there are not dropped", incoming, exc)
            return 0
        for download in downloads:
            sha = download.name.removesuffix(".partial")
            if not is_sha256(sha) or not download.is_file():
                continue
            try:
                if not d.hold and sha in (d.sha256, d.eval_sha256):
                    have += download.stat().st_size
                else:
                    download.unlink(missing_ok=True)  # a superseded desired state's download
                    log.info("dropped %s: no desired state wants it any more", download)
            except OSError as exc:
                log.error("%s: cannot be dropped (%s)", download, exc)
        return have

    def _start(self, d: Desired, have: int) -> None:
        """Start the download and install of ``d`` in a worker thread, after checking the space it needs
        beyond the ``have`` bytes its downloads hold already (:meth:`_sweep` dropped the others).

        Raises:
            DiskFull: what is left to download does not fit.
        """
        (self.root / "incoming").mkdir(parents=True, exist_ok=True)
        self._check_disk(max(0, d.bytes + (d.eval_bytes or 0) - have))
        job = _Job(d.revision, threading.Thread(target=lambda: None), threading.Event())

        def run() -> None:
            try:
                job.result = self._fetch_and_install(d, job.cancel)
            except Exception as exc:  # noqa: BLE001 - any failure is the step's "failed", with its line
                job.error = _line(exc)

        job.thread = threading.Thread(target=run, daemon=True, name="desired-fetch")
        self._job = job
        job.thread.start()

    def _installed(self, sha: str) -> bool:
        try:
            self.store.verify(sha)
        except EdgeKitError:
            return False
        return True

    def _fetch_and_install(self, d: Desired, cancel: threading.Event) -> dict[str, Any]:
        """Return what was downloaded; the model (and its eval set) installed when this returns.

        Raises:
            FetchError: the store did not answer, the bytes do not hash right, the download was cut
                again, too slow, or cancelled. StoreError: the install check failed, or a trt-* variant's
                TensorRT engine build failed (the model is removed again).
        """
        from device_agents import (
            fetch as fetching,  # a device that never pulls never imports urllib's TLS
        )

        fetch = self._fetch or fetching.fetch
        incoming = self.root / "incoming"
        done: dict[str, Any] = {"bytes": 0, "resumed": False, "seconds": 0.0}
        files = [(d.sha256, d.bytes)] + ([(d.eval_sha256, d.eval_bytes)] if d.eval_sha256 else [])
        paths = []
        for sha, size in files:
            floor = min(FLOOR_RATE, d.fetch.max_bytes_s / 2 if d.fetch.max_bytes_s else FLOOR_RATE)
            got = fetch(fetching.artifact_url(d.store, sha), sha, incoming / sha, max_bytes_s=d.fetch.max_bytes_s,
                        timeout_s=d.fetch.timeout_s, max_bytes=size, ssl_context=self._ssl(), cancel=cancel,
                        max_seconds=60 + size / floor)
            done["bytes"] += got.bytes_downloaded
            done["resumed"] = done["resumed"] or got.resumed
            done["seconds"] = round(done["seconds"] + got.seconds, 3)
            paths.append(got.path)
        installed = self.store.install(paths[0], variant=d.variant, model=d.model, expect_sha256=d.sha256,
                                       eval_file=paths[1] if d.eval_sha256 else None,
                                       expect_eval_sha256=d.eval_sha256, move=True)
        if d.eval_sha256:
            Path(paths[1]).unlink(missing_ok=True)
        if d.variant.startswith("trt-"):  # a TensorRT variant: its engine is built now, not at first use
            from device_agents import runtimes

            engine = runtimes.prepare_installed(self.store, d.sha256, fresh=getattr(installed, "fresh", True),
                                                threads=self.threads)
            if engine is not None:
                done["engine"] = engine
        return done

    def _ssl(self) -> Any:
        """Return the TLS context an https:// store is checked with: ``pull.ca_file``'s, None for the system's.

        Raises:
            ConfigError: see :func:`device_agents.config.store_ca_context`. Loading agent.yaml checked the file too;
                read again at each try, as the store may be reached months later: the bundle may have been replaced
                (a rotated CA), removed or turned into a FIFO since.
        """
        if self.settings.ca_file is None:
            return None
        return store_ca_context(self.settings.ca_file)

    def _failed(self, error: str, counted: bool = True) -> dict[str, Any]:
        """Record a failed try (``counted`` False: not one of ``pull.max_attempts``, tried again after ``retry_s``),
        schedule the next one unless it was the last, and report ``failed`` with ``error``; return that report."""
        if not counted:
            self.attempt -= 1
        last_try = counted and self.attempt >= self.settings.max_attempts
        try:
            self._save(converged=False)  # the count of tries survives a restart
        except OSError as exc:
            log.error("could not record the failed try in %s: %s", self.root / DESIRED, exc)
        if not last_try:
            backoff = 2 ** (self.attempt - 1) if counted else 1
            self.next_at = self.clock() + min(MAX_RETRY_S, self.settings.retry_s * backoff)
        log.error("desired %s: attempt %d failed: %s%s", self.desired.variant if self.desired else "?", self.attempt,
                  error, "; no more retries until the next desired revision" if last_try else "; retrying")
        return self._say("failed", error=error)

    def _say(self, state: str, **extra: Any) -> dict[str, Any]:
        def ref(sha: str | None) -> dict[str, Any] | None:
            meta = self.store.describe(sha)
            return {k: meta[k] for k in ("sha256", "variant", "model", "bytes") if k in meta} if meta else None

        self.last = {**reported_body(self.desired, state, ref(self.store.current()), attempt=self.attempt, **extra),
                     "previous": ref(self.store.previous())}  # what a rollback by desired state goes back to
        try:  # before publishing: a restart before it goes out still has it to publish on connecting
            atomic_write(self.root / REPORTED, json.dumps(self.last).encode())
        except (OSError, TypeError, ValueError) as exc:
            log.error("could not keep the reported state in %s (%s); it is published all the same",
                      self.root / REPORTED, exc)
        self._report(self.last)
        return self.last

