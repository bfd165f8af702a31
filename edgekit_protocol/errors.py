"""The root of edge-kit's one exception tree.

Every error a user can cause is an :class:`EdgeKitError` whose ``str()`` is one line naming the
file, field or device at fault and what to do. Each boundary maps the tree once: the CLIs print
that line and exit with ``exit_code``; the agent's command handler answers with an error ack; a
fleet operation stores the exception in the device's result. Anything else is a bug and keeps its
traceback.

The host adds its own branches (``edge_kit.errors``); the agent its own (``device_agents.errors``).
"""

from __future__ import annotations


class EdgeKitError(Exception):
    """Base class of every error edge-kit raises on purpose. ``exit_code`` is what a CLI exits with."""

    exit_code = 1


class ConfigError(EdgeKitError):
    """A profile, fleet or agent config file is missing, malformed or has invalid content."""

    exit_code = 2


class InputError(EdgeKitError):
    """A model or data file given on the command line is missing, corrupt or does not fit."""

    exit_code = 2


class DataFileError(InputError):
    """A data file breaks the ``.npz`` format; the message names the file, option, key and the fix."""


class MessageError(EdgeKitError, ValueError):
    """A payload that is not a valid edge-kit message; the text says which field is wrong."""


class PayloadTooLarge(MessageError):
    """A message its sender built is over the protocol's payload limit (``messages.MAX_PAYLOAD``): never published.
    Every receiver refuses it, and a broker with ``max_packet_size`` cuts off the client that sends it, which sends it
    again (QoS 1) at every reconnect. The text names the message (its device, command or kind), its size and the
    limit; exit 2 (what was given is too big: shorten it)."""

    exit_code = 2


class CommandError(MessageError):
    """A command that cannot be run; ``cmd_id`` and ``name`` are set when they could be read."""

    def __init__(self, message: str, cmd_id: str | None = None, name: str | None = None):
        super().__init__(message)
        self.cmd_id = cmd_id
        self.name = name
