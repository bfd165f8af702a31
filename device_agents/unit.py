"""The systemd unit that runs the agent as a service.

``edgekit-agent unit --config /etc/edgekit/agent.yaml | sudo tee /etc/systemd/system/edgekit-agent.service``
then ``sudo systemctl enable --now edgekit-agent``. The deploy tool writes the same unit.

Paths are written the way systemd reads them back unchanged: arguments with spaces or quotes in
double quotes, ``%`` as ``%%`` (a specifier otherwise) and, in ``ExecStart``, ``$`` as ``$$``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TEMPLATE = """\
[Unit]
Description=edge-kit device agent ({description})
Wants=network-online.target
After=network-online.target time-sync.target

[Service]
Type=simple
ExecStart={exec_start}
Restart=always
RestartSec=5
# Exit 2 is a config error or agent code that fails its signed check: restarting cannot help.
RestartPreventExitStatus=2
# SIGTERM lets the agent publish 'offline' and keep unsent records in its spool.
KillSignal=SIGTERM
TimeoutStopSec=30
{environment}
{workdir}{user}
[Install]
WantedBy=multi-user.target
"""


def _word(text: str) -> str:
    """Return ``text`` as one systemd command-line word: double-quoted (``\\`` and ``"`` escaped) when it
    holds whitespace, quotes or backslashes, or is empty."""
    if text and not any(c.isspace() or c in "\"'\\;" for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_unit(config: Path, python: str | None = None, user: str | None = None, workdir: str | None = None,
                env: dict[str, str] | None = None) -> str:
    """Return the unit file text for an agent with ``config``, run by ``python`` (default: this one)
    from ``workdir`` (the deploy's: ``<root>/agent``, so ``python -m`` finds only the checked code),
    with ``env`` added to its environment (``PYTHONUNBUFFERED=1`` always).

    Raises:
        ValueError: a path, the interpreter or an environment value holds a line break or another
            control character (a unit file cannot carry it).
    """
    config_path = os.path.abspath(os.path.expanduser(os.fspath(config)))
    python = python or sys.executable
    variables = {"PYTHONUNBUFFERED": "1", **(env or {})}
    for text in (config_path, python, workdir or "", user or "", *variables, *variables.values()):
        if any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise ValueError(f"{text!r}: a control character cannot be written in a systemd unit")

    def specifiers(text: str) -> str:  # '%' starts a specifier in every setting used here
        return text.replace("%", "%%")

    argv = [python, "-B", "-m", "device_agents", "run", "--config", config_path]
    exec_start = " ".join(specifiers(_word(a)).replace("$", "$$") for a in argv)
    environment = "Environment=" + " ".join(specifiers(_word(f"{k}={v}")) for k, v in variables.items())
    return TEMPLATE.format(description=specifiers(config_path), exec_start=exec_start, environment=environment,
                           user=f"User={user}\n" if user else "",
                           workdir=f"WorkingDirectory={specifiers(workdir)}\n" if workdir else "")
