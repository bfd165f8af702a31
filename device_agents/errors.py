"""The agent's branches of edge-kit's one exception tree (rooted in :mod:`edgekit_protocol.errors`).

Mapped once at each boundary: ``edgekit-agent`` prints the one line and exits with ``exit_code``;
the command handler (:meth:`device_agents.service.Agent.handle`) answers with an error ack.
"""

from __future__ import annotations

from edgekit_protocol.errors import EdgeKitError

NO_ACTIVE_MODEL = ("no model is active on this device; deploy one (edgekit deploy on the host), or install and activate "
                   "one here (edgekit-agent install, then edgekit-agent activate)")


class DeviceError(EdgeKitError):
    """Something the agent was asked could not be done on this device; the text says why."""

    exit_code = 2


class RuntimeUnavailable(DeviceError):
    """The runtime (or delegate) cannot be used here; the message says what to install or change."""


class StoreError(DeviceError):
    """An install, activation or rollback was refused; the text is the reason, in one line."""


class AcceleratorUnavailable(StoreError):
    """A model made for an accelerator (an ``edgetpu`` variant) on a device without it or its delegate library:
    the model is not at fault; the message says what is missing and what to install."""


class AcceleratorBusy(DeviceError):
    """Another process holds an accelerator that opens for one process at a time (an Edge TPU) for a check or load of
    its own: nothing is wrong with the model, it is tried again once that ends; the text names what holds it."""


class SmokeFailed(StoreError):
    """The model failed its smoke inference; the text says how."""


class SmokeCrashed(SmokeFailed):
    """The smoke check's child died (a signal, out of memory) or ran out of time: what a damaged or
    hostile file does to native code. ``how`` says which in a few words (``crashed (SIGSEGV)``)."""

    def __init__(self, message: str, how: str):
        super().__init__(message)
        self.how = how


class SmokeTimedOut(SmokeCrashed):
    """The child ran past its deadline and was killed (``how``: ``did not finish within N s``)."""


class BenchFailed(DeviceError):
    """A benchmark's child gave no record: the model failed, crashed or made no progress in time at one
    step (loading, first inference, timed run N, scoring sample N...); the text says which and how.
    ``ended``: the child crashed or was killed by its watchdog (not a failure the runtime reported). ``detail``: the
    traceback of a Python exception the child raised ("" for none), for a log, never for the one-line answer."""

    def __init__(self, message: str, ended: bool = False, detail: str = ""):
        super().__init__(message)
        self.ended = ended
        self.detail = detail


class UsageError(DeviceError):
    """``edgekit-agent`` was given options that cannot work together."""


class MetricError(DeviceError):
    """Accuracy cannot be scored: labels in the wrong format for the task, or a user metric or decoder
    that raised or returned something else than numbers; the text names the key or function."""


class SpoolUnavailable(EdgeKitError):
    """The agent's spool cannot be opened at its start (locked, read-only, a full disk, I/O errors): no damage, so it
    is kept as it is; the text names the file, the error and what to do. Exit 1: systemd starts the agent again (exit 2
    stops it for good), and a fault that passes (space freed, the other process gone) ends there."""


class DiskFull(StoreError):
    """The device's disk has no room for what was asked; the text says how much is free and what to free."""


class CodeTampered(DeviceError):
    """The agent's own code differs from what the operator signed (or is unsigned): it does not start."""


class Unsignable(DeviceError, ValueError):
    """A message the agent built cannot be signed: it holds a NaN, an infinity or a value with no JSON form (a
    figure from a runtime or a sensor, a record read back from disk); the text names its kind and the value's error."""
