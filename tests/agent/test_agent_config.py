"""agent.yaml and fleet.yaml: strict keys, file:line errors, defaults."""

from __future__ import annotations

import pytest

from device_agents.config import ConfigError, load_agent_config
from edge_kit.errors import ConfigError
from edge_kit.fleet.inventory import load_fleet


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


FLEET = """\
fleet: plant-a
broker: {host: 127.0.0.1, port: 1883}
defaults: {user: edgekit, profile: rpi4}
devices:
  - {name: pi-1, host: 10.0.0.1, tags: [pi]}
  - {name: pi-2, host: 10.0.0.2, tags: [pi, canary]}
  - {name: coral-1, host: 10.0.0.3, profile: coral-usb, user: mendel}
"""


def test_fleet_defaults_fill_devices_and_selectors_pick_them(tmp_path):
    fleet = load_fleet(write(tmp_path, "fleet.yaml", FLEET))
    assert [d.user for d in fleet.devices] == ["edgekit", "edgekit", "mendel"]
    assert [d.name for d in fleet.select(["tag:pi"])] == ["pi-1", "pi-2"]
    assert [d.name for d in fleet.select(["coral-1", "tag:canary"])] == ["pi-2", "coral-1"]
    with pytest.raises(ConfigError, match="--devices tag:jetson: matches no device"):
        fleet.select(["tag:jetson"])
    with pytest.raises(ConfigError, match="did you mean 'coral-1'"):
        fleet.device("coral-l")


@pytest.mark.parametrize("change, message", [
    (("tags: [pi]}", "tagz: [pi]}"), "fleet.yaml:5: devices[0].tagz: unknown key; did you mean 'tags'?"),
    (("profile: coral-usb", "profile: coral-usbb"), "device coral-1: unknown profile 'coral-usbb'"),
    (("name: pi-2", "name: pi-1"), "listed twice: pi-1"),
    (("broker: {host: 127.0.0.1, port: 1883}", "broker: {host: 127.0.0.1, password: x}"), "broker.password: unknown key"),
])
def test_fleet_errors_name_the_line_and_the_key(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("?", r"\?")):
        load_fleet(write(tmp_path, "fleet.yaml", FLEET.replace(*change)))


def test_the_systemd_unit_runs_the_agent_with_its_config(tmp_path):
    from device_agents.unit import render_unit

    unit = render_unit(tmp_path / "agent.yaml", python="/opt/venv/bin/python", user="edgekit")
    assert f"ExecStart=/opt/venv/bin/python -m device_agents run --config {tmp_path / 'agent.yaml'}\n" in unit
    assert "Restart=always" in unit and "User=edgekit\n" in unit and "WantedBy=multi-user.target" in unit
