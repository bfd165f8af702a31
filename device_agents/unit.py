"""The systemd unit that runs the agent as a service.

``edgekit-agent unit --config /etc/edgekit/agent.yaml | sudo tee /etc/systemd/system/edgekit-agent.service``
then ``sudo systemctl enable --now edgekit-agent``. The deploy tool writes the same unit.
"""

from __future__ import annotations

import sys
from pathlib import Path

TEMPLATE = """\
[Unit]
Description=edge-kit device agent ({config})
Wants=network-online.target
After=network-online.target time-sync.target

[Service]
Type=simple
ExecStart={python} -B -m device_agents run --config {config}
Restart=always
RestartSec=5
# Exit 2 is a config error or agent code that fails its signed check: restarting cannot help.
RestartPreventExitStatus=2
# SIGTERM lets the agent publish 'offline' and keep unsent records in its spool.
KillSignal=SIGTERM
TimeoutStopSec=30
Environment=PYTHONUNBUFFERED=1
{user}
[Install]
WantedBy=multi-user.target
"""


def render_unit(config: Path, python: str | None = None, user: str | None = None) -> str:
    """Return the unit file text for an agent with ``config``, run by ``python`` (default: this one)."""
    return TEMPLATE.format(config=Path(config).expanduser().resolve(), python=python or sys.executable,
                           user=f"User={user}\n" if user else "")
