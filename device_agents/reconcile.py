"""Desired state, reconciled: fetch what the operator wants this device to run, install it, activate it
safely, and report where the device stands (see :mod:`edgekit_protocol.desired`).

The agent hands every ``desired`` message it verified to :meth:`Reconciler.take`; the main loop
calls :meth:`Reconciler.step` whenever :meth:`Reconciler.due` says so, so a reconcile never runs
beside a command (benchmarks must not overlap with a download's CPU or an activation's smoke test).

What survives a restart: the last desired message taken (``<root>/desired.json``, written
atomically before the broker is told it arrived) and the partial download (``<root>/incoming/
<sha256>.partial``, resumed with a Range request). A device is never left without a working model:
the new one is activated only through the store's safe activation (hash check, smoke inference in a
child), and any failure leaves the current model in place, reports ``failed`` with the reason and
retries with back-off up to ``pull.max_attempts``.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable

from device_agents.disk import atomic_write
from edgekit_protocol.config import PullConfig
from edgekit_protocol.desired import Desired, parse_desired, reported_body
from edgekit_protocol.errors import EdgeKitError

log = logging.getLogger("edgekit.agent.reconcile")
MAX_RETRY_S = 900.0
DESIRED = "desired.json"


class Reconciler:
    """One device's desired state and the work to reach it.

    ``store`` is the device's :class:`~device_agents.store.ModelStore`; ``activate(sha256, keep)``
    switches to an installed model safely and returns the activation result; ``report(body)``
    publishes a ``reported`` body; ``check_disk(needs)`` raises ``DiskFull`` when ``needs`` more
    bytes do not fit; ``fetch`` is :func:`device_agents.fetch.fetch` (tests pass another).
    """

    def __init__(self, root: Path, store: Any, *, activate: Callable[[str, tuple[str, ...]], dict[str, Any]],
                 report: Callable[[dict[str, Any]], None], check_disk: Callable[[int], None],
                 settings: PullConfig = PullConfig(), fetch: Callable[..., Any] | None = None,
                 write: Callable[[Path, bytes], None] | None = None, clock: Callable[[], float] = time.time,
                 rng: Callable[[], float] = random.random):
        self.root = Path(root)
        self.store = store
        self._activate, self._report, self._check_disk = activate, report, check_disk
        self.settings = settings
        self._fetch = fetch
        self._write = write or atomic_write
        self.clock, self.rng = clock, rng
        self.desired: Desired | None = None
        self.attempt = 0
        self.next_at: float | None = None  # when to try (again); None: nothing to do
        self.last: dict[str, Any] | None = None  # the last reported body (published again on every connect)
        self._load()

    def _load(self) -> None:
        """Take the desired state persisted before a restart (a damaged file is logged and ignored)."""
        try:
            self.desired = parse_desired(json.loads((self.root / DESIRED).read_text()))
        except FileNotFoundError:
            return
        except (OSError, ValueError, EdgeKitError) as exc:
            log.error("%s: unreadable desired state (%s); waiting for the operator's next one", self.root / DESIRED, exc)
            return
        self.next_at = self.clock()  # a restart resumes at once: the start delay was served before

    def take(self, message: dict[str, Any]) -> str | None:
        """Take a verified ``desired`` message; return None when taken, else why not (``stale``:
        its revision is not above the one taken before; ``same``: the one taken already, delivered again).

        The message is on disk before this returns, so the broker may forget it.

        Raises:
            MessageError: the body is malformed (the text names the field).
        """
        new = parse_desired(message)
        old = self.desired
        if old is not None and new.revision <= old.revision:
            if new.revision == old.revision and new.msg_id == old.msg_id:
                if self.last is not None:
                    self._report(self.last)  # a redelivery (reconnect): say again where the device is
                return "same"
            log.warning("refused desired revision %d of rollout %s: not above the revision %d taken before "
                        "(a replay, or the operator's clock went back)", new.revision, new.rollout, old.revision)
            return "stale"
        self._write(self.root / DESIRED, json.dumps(message).encode())
        self.desired, self.attempt = new, 0
        self.next_at = self.clock() + self.rng() * new.fetch.start_delay_s
        log.info("desired: %s %s (%s) of rollout %s, revision %d", new.model, new.variant, new.sha256[:12],
                 new.rollout, new.revision)
        return None

    def due(self) -> bool:
        """Return True when a reconcile step should run now."""
        return self.next_at is not None and self.clock() >= self.next_at

    def step(self) -> dict[str, Any]:
        """Reconcile once: fetch, install and activate the desired model unless it is current already.

        Returns:
            The ``reported`` body it published (``converged`` or ``failed``).
        """
        d = self.desired
        assert d is not None, "step() without a desired state"
        self.next_at = None
        self.attempt += 1
        try:
            download = None
            if self.store.current() != d.sha256:
                if not self._installed(d.sha256):
                    self._say("fetching")
                    download = self._fetch_and_install(d)
                activation = self._activate(d.sha256, (d.sha256, *d.keep))
                log.info("desired %s %s is current (%s)", d.model, d.variant, activation.get("smoke", {}))
        except EdgeKitError as exc:
            return self._failed(str(exc))
        except OSError as exc:  # the disk, the network below urllib's errors
            return self._failed(f"{type(exc).__name__}: {exc.strerror or exc}")
        self.attempt = 0
        return self._say("converged", download=download)

    def _installed(self, sha: str) -> bool:
        try:
            self.store.verify(sha)
        except EdgeKitError:
            return False
        return True

    def _fetch_and_install(self, d: Desired) -> dict[str, Any]:
        """Return what was downloaded; the model (and its eval set) installed when this returns.

        Raises:
            FetchError: the store did not answer, the bytes do not hash right, or the download was cut
                again. StoreError: the install check failed, or a trt-* variant's TensorRT engine build
                failed (the model is removed again). DiskFull: the files do not fit.
        """
        from device_agents import (
            fetch as fetching,  # a device that never pulls never imports urllib's TLS
        )

        fetch = self._fetch or fetching.fetch
        incoming = self.root / "incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        need = d.bytes + (d.eval_bytes or 0)
        self._check_disk(need)
        done: dict[str, Any] = {"bytes": 0, "resumed": False, "seconds": 0.0}
        files = [(d.sha256, d.bytes)] + ([(d.eval_sha256, d.eval_bytes)] if d.eval_sha256 else [])
        paths = []
        for sha, size in files:
            got = fetch(fetching.artifact_url(d.store, sha), sha, incoming / sha, max_bytes_s=d.fetch.max_bytes_s,
                        timeout_s=d.fetch.timeout_s, max_bytes=size, ssl_context=self._ssl())
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

            engine = runtimes.prepare_installed(self.store, d.sha256, fresh=getattr(installed, "fresh", True))
            if engine is not None:
                done["engine"] = engine
        return done

    def _ssl(self) -> Any:
        if self.settings.ca_file is None:
            return None
        import ssl

        return ssl.create_default_context(cafile=str(self.settings.ca_file))

    def _failed(self, error: str) -> dict[str, Any]:
        last_try = self.attempt >= self.settings.max_attempts
        if not last_try:
            self.next_at = self.clock() + min(MAX_RETRY_S, self.settings.retry_s * 2 ** (self.attempt - 1))
        log.error("desired %s: attempt %d failed: %s%s", self.desired.variant if self.desired else "?", self.attempt,
                  error, "; no more retries until the next desired revision" if last_try else "; retrying")
        return self._say("failed", error=error)

    def _say(self, state: str, **extra: Any) -> dict[str, Any]:
        def ref(sha: str | None) -> dict[str, Any] | None:
            meta = self.store.describe(sha)
            return {k: meta[k] for k in ("sha256", "variant", "model", "bytes") if k in meta} if meta else None

        self.last = {**reported_body(self.desired, state, ref(self.store.current()), attempt=self.attempt, **extra),
                     "previous": ref(self.store.previous())}  # what a rollback by desired state goes back to
        self._report(self.last)
        return self.last

