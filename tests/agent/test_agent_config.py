"""agent.yaml as the agent reads it: strict keys, file:line errors, defaults."""

from __future__ import annotations

import json

import pytest

from device_agents.config import load_agent_config
from edgekit_protocol.errors import ConfigError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_agent_config_defaults_and_nested_values(tmp_path):
    cfg = load_agent_config(write(tmp_path, "a.yaml", "device: pi-1\nfleet: f\nbroker: {port: 8883, tls: {ca: /ca.pem}}\n"))
    assert cfg.broker.port == 8883 and str(cfg.broker.tls.ca) == "/ca.pem" and cfg.bench.min_runs == 200
    assert cfg.power.sensors[0] == "ina3221" and cfg.password() is None


@pytest.mark.parametrize("text, message", [
    ("device: pi-1\nfleet: f\nbroker:\n  prot: 1\n", "a.yaml:4: broker.prot: unknown key; did you mean 'port'?"),
    ("device: pi-1\nfleet: f\nbench: {min_runs: many}\n", "a.yaml:3: bench.min_runs: expected int, got 'many'"),
    ("device: pi-1\n", "missing required key 'fleet'"),
    ("device: pi/1\nfleet: f\n", "device 'pi/1' must be 1-64 letters"),
    ("device: pi-1\nfleet: f\npower: {sensors: [ina3220]}\n", "unknown sensor 'ina3220'; did you mean 'ina3221'?"),
    ("device: pi-1\nfleet: f\nbroker: {password_file: /nonexistent/pw}\n", None),
    ("device: [\n", "a.yaml:2: not valid YAML"),
])
def test_agent_config_errors_name_file_line_and_key(tmp_path, text, message):
    path = write(tmp_path, "a.yaml", text)
    if message is None:
        with pytest.raises(ConfigError, match="broker.password_file /nonexistent/pw"):
            load_agent_config(path).password()
        return
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        load_agent_config(path)


def test_the_systemd_unit_runs_the_agent_with_its_config(tmp_path):
    from device_agents.unit import render_unit

    unit = render_unit(tmp_path / "agent.yaml", python="/opt/venv/bin/python", user="edgekit")
    assert f"ExecStart=/opt/venv/bin/python -B -m device_agents run --config {tmp_path / 'agent.yaml'}\n" in unit
    assert "Restart=always" in unit and "User=edgekit\n" in unit and "WantedBy=multi-user.target" in unit


def test_the_systemd_unit_quotes_what_systemd_would_split_or_expand(tmp_path):
    import shlex

    from device_agents.unit import render_unit

    root = "/opt/edge kit/100%$HOME \"x\""
    unit = render_unit(f"{root}/agent.yaml", python="/opt/my venv/bin/python", workdir=f"{root}/agent",
                       env={"PYTHONPATH": f"{root}/agent"})
    lines = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    # systemd: '%%' is '%', '$$' is '$' (ExecStart only), then words split as a shell splits double quotes
    assert shlex.split(lines["ExecStart"].replace("%%", "%").replace("$$", "$")) == [
        "/opt/my venv/bin/python", "-B", "-m", "device_agents", "run", "--config", f"{root}/agent.yaml"]
    assert shlex.split(lines["Environment"].replace("%%", "%")) == ["PYTHONUNBUFFERED=1", f"PYTHONPATH={root}/agent"]
    assert lines["WorkingDirectory"].replace("%%", "%") == f"{root}/agent" and "%%" in lines["Description"]
    with pytest.raises(ValueError, match="control character"):
        render_unit("/opt/a\nExecStartPre=/bin/rm -rf /x/agent.yaml")


def test_every_command_in_the_protocol_has_a_handler_in_the_agent():
    from device_agents.service import Agent
    from edgekit_protocol.commands import COMMANDS

    assert all(callable(getattr(Agent, f"_cmd_{name}", None)) for name in COMMANDS)


def test_the_last_will_and_the_statuses_of_one_connection_name_the_same_connection(tmp_path):
    """What lets a host tell that a will (signed at connect) predates the statuses sent after a switch."""
    from device_agents.service import Agent

    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device: pi-1\nfleet: f\nroot: {tmp_path / 'root'}\nserve: {{enabled: false}}\n")
    agent = Agent(load_agent_config(cfg))
    try:
        will = json.loads(agent.client._will_payload)
        online = agent._status("online")
        assert will["state"] == "offline" and will["connection"] == online["connection"]
        assert online["seq"] > will["seq"]
        agent._on_disconnect(agent.client, None, None, "test", None)  # the next connection: a new id, a new will
        again = json.loads(agent.client._will_payload)
        assert again["connection"] != will["connection"] == online["connection"]
        assert agent._status("online")["connection"] == again["connection"]
    finally:
        agent.spool.close()
