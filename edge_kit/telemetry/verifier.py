"""Signature checks in a process of their own, so the monitor's network and store threads never wait for them.

Ed25519 verification (``cryptography``) holds the GIL, so in a thread it takes its time from paho's
network thread and the SQLite writer. :class:`Verifier` runs it in a child process (multiprocessing,
``forkserver``: no fork of a threaded parent) that reads the fleet's key registry itself (re-read
when ``devices.json`` or ``revoked.json`` changes, as every receiver does; checked once a batch:
:meth:`~edge_kit.fleet.keys._RegistryKeyring.checked_once`). The monitor sends each batch's
``(topic, payload)`` pairs, checks everything else meanwhile, then takes the child's answers.

A child that dies is started again; while it cannot be, the monitor verifies in its own process:
nothing is ever stored unverified.
"""

from __future__ import annotations

import logging
import multiprocessing
from pathlib import Path
from typing import Any

log = logging.getLogger("edgekit.monitor")
# a batch of 500 signatures takes the child about 50 ms: one that has not answered in this long is hung
RESULT_TIMEOUT_S = 30.0


def _serve(conn: Any, keys_folder: str) -> None:
    """The child: answer each list of ``(topic, payload)`` with a list of None (signed by the topic's
    device) or the reason it is not; stop at end of input. The monitor checks the same payloads with
    the strict decoder and takes a verdict only for those it accepted (``decoded_elsewhere``). Never raises on a message (verify_published
    turns every failure into a reason); anything else ends the child, which the monitor notices."""
    from device_agents.identity import verify_published
    from edge_kit.fleet.keys import FleetKeys

    keyring = FleetKeys(Path(keys_folder)).keyring()
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return
        with keyring.checked_once():  # the key files stat'ed once a batch, not twice a message
            verdicts = [verify_published(keyring, topic, payload, decoded_elsewhere=True) for topic, payload in batch]
        conn.send(verdicts)


class Verifier:
    """A verifying child process. ``submit`` a batch, do other work, then ``result()``."""

    def __init__(self, keys_folder: Path):
        self.keys_folder = Path(keys_folder)
        self._ctx = multiprocessing.get_context("forkserver")
        self._conn: Any = None
        self._proc: Any = None

    def start(self) -> Verifier:
        """Start the child (about 0.3 s: it imports cryptography); return self."""
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_serve, args=(child, str(self.keys_folder)), daemon=True,
                                       name="edgekit-verifier")
        self._proc.start()
        child.close()
        self._conn = parent
        return self

    def submit(self, batch: list[tuple[str, bytes]]) -> bool:
        """Send a batch to the child; return False when it is gone and could not be started again
        (the caller verifies in its own process then)."""
        for attempt in (1, 2):
            try:
                self._conn.send(batch)
                return True
            except (OSError, ValueError, AttributeError):
                if attempt == 2:
                    return False
                log.warning("the verifying process is gone; starting it again")
                self.stop()
                try:
                    self.start()
                except OSError:
                    return False
        return False

    def result(self, timeout: float = RESULT_TIMEOUT_S) -> list[str | None] | None:
        """Return the answers to the last batch submitted, or None when the child died meanwhile or gave no answer
        within ``timeout`` seconds (it is stopped then, and started again with the next batch)."""
        try:
            if self._conn.poll(timeout):
                return self._conn.recv()
        except (EOFError, OSError):
            return None
        log.warning("the verifying process gave no answer in %.0f s; stopping it (this batch is verified here)", timeout)
        self.stop()
        return None

    def stop(self) -> None:
        """Close the pipe and end the child (it stops at end of input)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            self._proc.join(timeout=5)
            if self._proc.is_alive():  # hung, or stopped (SIGSTOP): a SIGTERM would wait for it to go on
                self._proc.kill()
                self._proc.join(timeout=5)
            self._proc = None
