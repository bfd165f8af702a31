"""The agent deployed as a systemd service, under a real systemd (PID 1 of a namespace the test creates)."""

from __future__ import annotations

import sys
import time

import pytest
import yaml
from harness import FLEET, SystemdNamespace, wait_until

from edge_kit.fleet.commands import FleetClient
from edge_kit.fleet.deploy import DeployOptions, deploy
from edge_kit.fleet.inventory import load_fleet
from edge_kit.fleet.ssh import DeviceShell
from edge_kit.sim.ssh import SshEndpoint, known_hosts_line, write_keypair

pytestmark = pytest.mark.integration


@pytest.fixture
def systemd(tmp_path):
    ns = SystemdNamespace(tmp_path).start()
    yield ns
    ns.stop()


def main_pid(ns: SystemdNamespace) -> int:
    return int(ns.run("systemctl", "show", "-p", "MainPID", "--value", "edgekit-agent").stdout.strip() or 0)


@pytest.fixture
def device_in(tmp_path, mosquitto):
    """Factory: a fleet of one root-login device whose sshd runs inside ``ns``; stopped after the test."""
    endpoints = []

    def make(ns: SystemdNamespace, simulated: bool = False, root: str = "device"):
        key = tmp_path / "id_ed25519"
        ssh = SshEndpoint(tmp_path / "ssh", write_keypair(key), wrap=ns.enter).start()
        endpoints.append(ssh)
        (tmp_path / "known_hosts").write_text(known_hosts_line(ssh.host, ssh.port, ssh.host_public) + "\n")
        (tmp_path / "fleet.yaml").write_text(yaml.safe_dump({
            "fleet": FLEET, "broker": {"host": mosquitto.host, "port": mosquitto.port},
            "known_hosts": str(tmp_path / "known_hosts"),
            "devices": [{"name": "pi-1", "host": ssh.host, "port": ssh.port, "user": "root", "key": str(key),
                         "profile": "rpi4", "root": str(tmp_path / root), "python": sys.executable,
                         "simulated": simulated}]}))
        return load_fleet(tmp_path / "fleet.yaml")

    yield make
    for ssh in endpoints:
        ssh.stop()


def test_deploy_runs_the_agent_as_a_systemd_service_that_systemd_restarts(tmp_path, systemd, device_in, digits_artifacts,
                                                                         monkeypatch):
    fleet = device_in(systemd)
    first = deploy(fleet, fleet.devices, DeployOptions(digits_artifacts, variant="int8"))
    r = first.results[0]
    assert r.status == "succeeded", r.reason
    assert "service started" in r.actions and r.variant == "int8" and r.activation["model"]["variant"] == "int8"
    unit = (systemd.units / "edgekit-agent.service").read_text()
    assert f"--config {tmp_path / 'device' / 'agent.yaml'}" in unit and "Restart=always" in unit
    assert (systemd.units / "multi-user.target.wants" / "edgekit-agent.service").is_symlink()  # enabled
    assert systemd.run("systemctl", "is-active", "edgekit-agent").stdout.strip() == "active"
    assert not (tmp_path / "device" / "agent.pid").exists()  # systemd supervises it, not our supervisor

    with FleetClient.of(fleet) as client:
        crashed, since = main_pid(systemd), time.time()
        systemd.run("kill", "-KILL", str(crashed))  # the agent dies: systemd starts it again (RestartSec=5)
        assert client.wait_online("pi-1", since, 30) is not None, systemd.run("systemctl", "status", "edgekit-agent").stdout
        assert wait_until(lambda: main_pid(systemd) not in (0, crashed), 10)
        state = client.request("pi-1", "state", timeout=30)["result"]
    assert state["current"]["variant"] == "int8"

    commands = []  # what each deploy runs on the device: an unchanged one, its probe alone (systemctl is-active in it)
    exec_command = DeviceShell._exec
    monkeypatch.setattr(DeviceShell, "_exec", lambda shell, command, timeout: commands.append(command) or
                        exec_command(shell, command, timeout))
    again = deploy(fleet, fleet.devices, DeployOptions(digits_artifacts, variant="int8"))
    assert again.results[0].status == "skipped", again.results[0].reason  # running, same agent and config
    assert len(commands) == 1, commands

    systemd.run("systemctl", "stop", "edgekit-agent")  # the probe sees it: the deploy starts it again
    restarted = deploy(fleet, fleet.devices, DeployOptions(digits_artifacts, variant="int8"))
    assert restarted.results[0].actions == ["service started"], restarted.results[0].reason
    assert systemd.run("systemctl", "is-active", "edgekit-agent").stdout.strip() == "active"


def test_a_root_folder_with_spaces_a_percent_and_a_dollar_runs_under_systemd(tmp_path, systemd, device_in,
                                                                            digits_artifacts):
    """systemd reads '%' as a specifier, '$' as a variable and splits on spaces: the unit used to name
    another folder, and the agent never started; now it is quoted and the agent runs."""
    fleet = device_in(systemd, root="edge kit 100%$HOME")
    r = deploy(fleet, fleet.devices, DeployOptions(digits_artifacts, variant="int8")).results[0]
    assert r.status == "succeeded", r.reason
    assert systemd.run("systemctl", "is-active", "edgekit-agent").stdout.strip() == "active"
    pid = main_pid(systemd)
    argv = systemd.run("cat", f"/proc/{pid}/cmdline").stdout.split("\0")
    assert argv[-3:] == ["--config", str(tmp_path / "edge kit 100%$HOME" / "agent.yaml"), ""], argv
    assert systemd.run("readlink", f"/proc/{pid}/cwd").stdout.strip() == str((tmp_path / "edge kit 100%$HOME" / "agent").resolve())


def test_a_simulated_device_keeps_to_its_own_supervisor_even_where_systemd_runs(tmp_path, systemd, device_in,
                                                                                 digits_artifacts):
    fleet = device_in(systemd, simulated=True)  # its siblings would share the host's one edgekit-agent unit
    r = deploy(fleet, fleet.devices, DeployOptions(digits_artifacts, variant="int8")).results[0]
    assert r.status == "succeeded", r.reason
    assert (tmp_path / "device" / "agent.pid").is_file() and not (systemd.units / "edgekit-agent.service").exists()
