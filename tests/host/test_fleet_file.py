"""fleet.yaml: strict keys, file:line errors, defaults, selectors."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from edge_kit.errors import ConfigError
from edge_kit.fleet.inventory import load_fleet


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


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
    # a comma list (as sim up's --profiles takes) said only "matches no device", listing the very devices named
    with pytest.raises(ConfigError) as listed:
        fleet.select(["coral-1,tag:pi"])
    assert str(listed.value) == ("--devices coral-1,tag:pi: one device, tag:<tag> or all per --devices, not a list; "
                                 "give each its own: --devices coral-1 --devices tag:pi")
    with pytest.raises(ConfigError, match="did you mean 'coral-1'"):
        fleet.device("coral-l")


@pytest.mark.parametrize("change, message", [
    (("tags: [pi]}", "tagz: [pi]}"), "fleet.yaml:5: devices[0].tagz: unknown key; did you mean 'tags'?"),
    (("profile: coral-usb", "profile: coral-usbb"), "device coral-1: unknown profile 'coral-usbb'"),
    (("name: pi-2", "name: pi-1"), "listed twice: pi-1"),
    (("broker: {host: 127.0.0.1, port: 1883}", "broker: {host: 127.0.0.1, password: x}"), "broker.password: unknown key"),
    (("name: pi-2", "name: operator"), "'operator' is reserved for the operator"),
])
def test_fleet_errors_name_the_line_and_the_key(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("?", r"\?")):
        load_fleet(write(tmp_path, "fleet.yaml", FLEET.replace(*change)))


@pytest.mark.parametrize("change, message", [
    (("host: 10.0.0.1,", "host: '-oProxyCommand=touch /tmp/x',"), "devices[0].host: '-oProxyCommand=touch /tmp/x' is not a host name"),
    (("host: 10.0.0.1,", "host: 'evil@10.0.0.1',"), "devices[0].host: 'evil@10.0.0.1' is not a host name"),
    (("host: 10.0.0.1,", "host: '10.0.0.1:2222',"), "the port goes in 'port'"),
    (("host: 10.0.0.1,", "host: 'pi 1',"), "devices[0].host: 'pi 1' is not a host name"),
    (("host: 10.0.0.1,", 'host: "pi-1\\n",'), "devices[0].host: 'pi-1\\n' is not a host name"),  # '$' matched before it
    # Python's ipaddress takes any text after an IPv6 address's '%' as its zone: spaces and line breaks too
    (("host: 10.0.0.1,", 'host: "fe80::1%eth0\\n-oProxyCommand=x",'),
     "devices[0].host: 'fe80::1%eth0\\n-oProxyCommand=x' is not a host name"),
    (("host: 10.0.0.1,", "host: 'fe80::1%eth0 x',"), "devices[0].host: 'fe80::1%eth0 x' is not a host name"),
    (("user: mendel", "user: 'mendel;reboot'"), "devices[2].user: 'mendel;reboot' is not a login name"),
    (("user: mendel", 'user: "mendel\\n"'), "devices[2].user: 'mendel\\n' is not a login name"),
    (("user: edgekit,", "user: '-oProxyCommand=x',"), "defaults.user: '-oProxyCommand=x' is not a login name"),
    (("tags: [pi]}", "tags: [pi], root: edgekit}"), "devices[0].root: 'edgekit': give an absolute folder"),
    (("tags: [pi]}", "tags: [pi], root: '~other/x'}"), "devices[0].root: '~other/x': give an absolute folder"),
    (("tags: [pi]}", "tags: [pi], python: 'python3 -c 1'}"), "devices[0].python: 'python3 -c 1': give the device's interpreter"),
    # the agent would read it from its working folder (<root>/agent: the bundle each deploy replaces)
    (("tags: [pi]}", "tags: [pi], pull: {ca_file: store-ca.pem}}"), "devices[0].pull.ca_file: 'store-ca.pem': give an absolute"),
    (("tags: [pi]}", "tags: [pi], port: 70000}"), "devices[0].port"),
])
def test_what_reaches_an_ssh_command_line_or_a_device_folder_is_checked_at_load(tmp_path, change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_fleet(write(tmp_path, "fleet.yaml", FLEET.replace(*change)))


@pytest.mark.parametrize("change", [
    ("host: 10.0.0.1,", "host: pi-01.local,"), ("host: 10.0.0.1,", "host: 'fe80::1%eth0',"),
    ("host: 10.0.0.1,", "host: 'edge_pi.lan.',"), ("user: mendel", "user: mendel.x_1"),
    ("tags: [pi]}", "tags: [pi], root: '/opt/edge kit'}"), ("tags: [pi]}", "tags: [pi], python: /usr/bin/python3.11}"),
    ("tags: [pi]}", "tags: [pi], pull: {ca_file: ~/store-ca.pem}}"),
    ("host: 10.0.0.2,", "host: 10.0.0.1, root: /opt/other,"),  # one host, two agent folders
    ("host: 10.0.0.2,", "host: 10.0.0.1, port: 2222,"),  # one address, two ports (two sshd, e.g. containers)
])
def test_real_addresses_logins_and_folders_still_load(tmp_path, change):
    assert len(load_fleet(write(tmp_path, "fleet.yaml", FLEET.replace(*change))).devices) == 3


@pytest.mark.parametrize("change", [("host: 10.0.0.2,", "host: 10.0.0.1,"),
                                    ("host: 10.0.0.2,", "host: 10.0.0.1, root: ~/.edgekit/,")])
def test_a_deploy_to_two_devices_sharing_one_agent_folder_is_refused_before_any_is_touched(tmp_path, change):
    from edge_kit.fleet.deploy import DeployOptions, deploy

    fleet = load_fleet(write(tmp_path, "fleet.yaml", FLEET.replace(*change)))  # a monitoring-only fleet may
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'fleet.yaml'}: devices pi-1 and pi-2 reach the same "
                                                    "agent folder (edgekit@10.0.0.1:22 ~/.edgekit")):
        deploy(fleet, fleet.devices, DeployOptions(tmp_path / "no-artifacts", health=False))


def test_serve_and_pull_settings_reach_the_agents_config(tmp_path):
    from edge_kit.fleet.agent_install import agent_config

    text = FLEET.replace("defaults: {user: edgekit, profile: rpi4}",
                         "defaults: {user: edgekit, profile: rpi4, serve: {http_port: 8089}}").replace(
        "{name: pi-2, host: 10.0.0.2, tags: [pi, canary]}",
        "{name: pi-2, host: 10.0.0.2, tags: [pi, canary], pull: {ca_file: /etc/edgekit/store-ca.pem, retry_s: 5}}")
    fleet = load_fleet(write(tmp_path, "fleet.yaml", text))
    one, _ = agent_config(fleet, fleet.device("pi-1"))
    two, _ = agent_config(fleet, fleet.device("pi-2"))
    assert "http_port: 8089" in one and "ca_file" not in one
    assert "ca_file: /etc/edgekit/store-ca.pem" in two and "retry_s: 5" in two
    with pytest.raises(ConfigError, match="http_port"):
        load_fleet(write(tmp_path, "bad.yaml", text.replace("http_port: 8089", "http_port: 70000")))


def test_the_telemetry_interval_is_set_from_the_fleet_file_per_device_or_in_defaults(tmp_path):
    """The agent's telemetry_interval_s could only be set in its agent.yaml, which every deploy writes again from the
    fleet file: an operator could not change it. Now the fleet file sets it, checked as the agent checks it."""
    from device_agents.config import load_agent_config
    from edge_kit.fleet.agent_install import agent_config

    text = FLEET.replace("defaults: {user: edgekit, profile: rpi4}",
                         "defaults: {user: edgekit, profile: rpi4, telemetry_interval_s: 5}").replace(
        "{name: pi-2, host: 10.0.0.2, tags: [pi, canary]}", "{name: pi-2, host: 10.0.0.2, telemetry_interval_s: 0.5}")
    fleet = load_fleet(write(tmp_path, "fleet.yaml", text))
    for name, seconds in (("pi-1", 5.0), ("pi-2", 0.5), ("coral-1", 5.0)):
        config, _ = agent_config(fleet, fleet.device(name))
        (tmp_path / f"{name}.yaml").write_text(config)
        assert load_agent_config(tmp_path / f"{name}.yaml").telemetry_interval_s == seconds
    plain = load_fleet(write(tmp_path, "plain.yaml", FLEET))  # none set: the agent's default
    (tmp_path / "default.yaml").write_text(agent_config(plain, plain.device("pi-1"))[0])
    assert load_agent_config(tmp_path / "default.yaml").telemetry_interval_s == 30.0
    for bad in ("0", "-1", ".nan", ".inf", "86401", "soon"):
        with pytest.raises(ConfigError, match=r"fleet.yaml.*telemetry_interval_s"):
            load_fleet(write(tmp_path, "fleet.yaml", text.replace("telemetry_interval_s: 5", f"telemetry_interval_s: {bad}")))


def test_the_serving_timeouts_docs_name_are_fleet_file_keys_and_reach_the_agent(tmp_path):
    """docs/serving.md says the fleet file's `serve` takes request_timeout_s, http_header_timeout_s and send_timeout_s;
    the fleet file refused them as unknown keys, so a deployed agent could only keep the defaults (the deploy
    writes its agent.yaml). Now they reach the agent's config, checked against the agent's bounds."""
    from edge_kit.fleet.agent_install import agent_config

    serve = "serve: {http_port: 8089, request_timeout_s: 12, http_header_timeout_s: 2.5, send_timeout_s: 7}"
    text = FLEET.replace("defaults: {user: edgekit, profile: rpi4}", "defaults: {user: edgekit, profile: rpi4, "
                         + serve + "}")
    fleet = load_fleet(write(tmp_path, "fleet.yaml", text))
    plain, _ = agent_config(fleet, fleet.device("pi-1"))
    assert "request_timeout_s: 12" in plain and "http_header_timeout_s: 2.5" in plain and "send_timeout_s: 7" in plain
    with pytest.raises(ConfigError, match=r"fleet.yaml:3: defaults.serve.send_timeout_s"):
        load_fleet(write(tmp_path, "fleet.yaml", text.replace("send_timeout_s: 7", "send_timeout_s: 3601")))


def test_a_missing_fleet_file_says_how_to_get_one(tmp_path, run_cli):
    code, out, err = run_cli("fleet", "status", "--fleet", tmp_path / "fleet.yaml", "--json")
    assert code == 2
    assert json.loads(out)["error"] == (f"{tmp_path / 'fleet.yaml'}: no such fleet file; write one (docs/fleet.md), or "
                                        "start a simulated fleet with `edgekit sim up` and pass its .edgekit-sim/fleet.yaml")


def test_relative_paths_are_taken_from_the_fleet_files_folder_not_the_current_one(tmp_path, monkeypatch):
    """`edgekit deploy --fleet conf/fleet.yaml` run from another folder read `key: keys/id` and the broker's
    password file relative to the current folder (the wrong file, or none). Now they come from conf/."""
    from edge_kit.fleet.agent_install import agent_config

    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "mqtt.pass").write_text("from-conf\n")
    (conf / "pi-2.pass").write_text("pi-2-secret\n")
    (tmp_path / "mqtt.pass").write_text("from-the-current-folder\n")  # what the old lookup found instead
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    text = FLEET.replace("broker: {host: 127.0.0.1, port: 1883}",
                         "broker: {host: 127.0.0.1, port: 1883, username: ops, password_file: mqtt.pass,\n"
                         "         tls: {ca: tls/ca.pem, cert: tls/ops.pem, key: /etc/ops.key}}\n"
                         "known_hosts: ssh/known_hosts").replace(
        "defaults: {user: edgekit, profile: rpi4}", "defaults: {user: edgekit, profile: rpi4, key: keys/id}").replace(
        "{name: pi-2, host: 10.0.0.2, tags: [pi, canary]}",
        "{name: pi-2, host: 10.0.0.2, tags: [pi, canary], key: ~/.ssh/pi2,\n"
        "     agent_broker: {username: pi-2, password_file: pi-2.pass, tls: {ca: tls/ca.pem, cert: dev.pem, key: dev.key}}}")
    write(conf, "fleet.yaml", text)
    monkeypatch.chdir(tmp_path)
    fleet = load_fleet(Path("conf/fleet.yaml"))
    assert fleet.known_hosts == conf / "ssh/known_hosts"
    assert [d.key for d in fleet.devices] == [conf / "keys/id", home / ".ssh/pi2", conf / "keys/id"]
    assert fleet.broker.password() == "from-conf"
    assert (fleet.broker.tls.ca, fleet.broker.tls.cert, fleet.broker.tls.key) == (
        conf / "tls/ca.pem", conf / "tls/ops.pem", Path("/etc/ops.key"))
    pi2 = fleet.device("pi-2").agent_broker
    assert pi2.password_file == conf / "pi-2.pass" and pi2.tls.ca == conf / "tls/ca.pem"
    assert (pi2.tls.cert, pi2.tls.key) == (Path("dev.pem"), Path("dev.key"))  # paths on the device: as written
    text, password = agent_config(fleet, fleet.device("pi-2"))
    assert password == b"pi-2-secret\n"
    assert fleet.key_store().folder == conf / "keys"


def test_a_simulated_devices_agent_estimates_its_power_from_its_profile_never_from_this_hosts_sensors(tmp_path):
    """A simulated rpi4's agent probed this host's sensors: a laptop's hwmon power meter or a GPU's power1_average
    was recorded as the Pi's measured watts and judged against its 6.5 W bound. It now estimates from the profile."""
    import yaml

    from edge_kit.fleet.agent_install import agent_config

    fleet = load_fleet(write(tmp_path, "fleet.yaml", FLEET.replace(
        "{name: pi-2, host: 10.0.0.2, tags: [pi, canary]}", "{name: pi-2, host: 10.0.0.2, simulated: true}")))
    real = yaml.safe_load(agent_config(fleet, fleet.device("pi-1"))[0])["power"]
    sim = yaml.safe_load(agent_config(fleet, fleet.device("pi-2"))[0])["power"]
    assert real["sensors"] == ["ina219", "hwmon"] and sim["sensors"] == []
    assert (sim["idle_w"], sim["busy_w"]) == (real["idle_w"], real["busy_w"]) == (2.7, 6.4)


def test_a_missing_broker_password_file_names_the_fleet_file(tmp_path, run_cli):
    """`bench` with a broker.password_file that is not there said "fleet file: broker.password_file ...", not
    which fleet file."""
    fleet_file = tmp_path / "plant.yaml"
    fleet_file.write_text("fleet: f\nbroker: {host: 127.0.0.1, port: 1, password_file: nope.pass}\n"
                          "devices: [{name: a, host: h, user: u, profile: rpi4}]\n")
    with pytest.raises(ConfigError) as caught:
        load_fleet(fleet_file).broker_password()
    assert str(caught.value) == (f"{fleet_file}: broker.password_file {tmp_path}/nope.pass: No such file or directory; "
                                 "create it holding the broker password alone (`edgekit fleet init` wrote each user's in "
                                 f"its secrets/ folder), readable by this user, or fix broker.password_file in {fleet_file}")
    code, out, err = run_cli("bench", "--fleet", fleet_file, "--device", "a", "--json")
    assert code == 2 and json.loads(out)["error"] == str(caught.value)


@pytest.mark.parametrize("ca, error", [("nope.pem", "broker.tls.ca {tmp}/nope.pem: no such file"),
                                       ("notpem.pem", "broker.tls (ca {tmp}/notpem.pem): not a PEM certificate or key (")])
def test_a_broker_ca_that_is_missing_or_no_certificate_is_one_line(tmp_path, run_cli, ca, error):
    """`bench` or `monitor` with a fleet file whose broker.tls.ca is missing raised FileNotFoundError from paho's
    tls_set (a traceback, nothing on stdout with --json); the agent with such an agent.yaml did the same."""
    (tmp_path / "notpem.pem").write_text("not a certificate\n")
    fleet_file = tmp_path / "plant.yaml"
    fleet_file.write_text(f"fleet: f\nbroker: {{host: 127.0.0.1, port: 1, tls: {{ca: {ca}}}}}\n"
                          "devices: [{name: a, host: h, user: u, profile: rpi4}]\n")
    for command in (["bench", "--device", "a"], ["monitor", "--duration", "1"]):
        code, out, err = run_cli(*command, "--fleet", fleet_file, "--json")
        assert code == 2 and err.count("\n") == 1, err
        assert json.loads(out)["error"].startswith(error.format(tmp=tmp_path))




def test_a_broker_ca_that_is_a_fifo_is_one_line_from_bench_never_a_wait(tmp_path):
    """`bench` (or `monitor`) with a fleet file whose broker.tls.ca named a FIFO waited for ever: paho's tls_set had
    OpenSSL open it, which waits for a writer. Now it is one line naming it, exit 2."""
    import os
    import subprocess
    import sys

    os.mkfifo(tmp_path / "ca.pem", 0o600)
    fleet_file = tmp_path / "plant.yaml"
    fleet_file.write_text("fleet: f\nbroker: {host: 127.0.0.1, port: 1, tls: {ca: ca.pem}}\n"
                          "devices: [{name: a, host: h, user: u, profile: rpi4}]\n")
    code = f"import sys; sys.argv = ['edgekit', 'bench', '--device', 'a', '--fleet', {str(fleet_file)!r}, '--json']; " \
           "from edge_kit.cli import main; main()"
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"bench with broker.tls.ca {tmp_path / 'ca.pem'} (a FIFO) waited for a writer")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert json.loads(result.stdout)["error"] == (f"broker.tls.ca {tmp_path}/ca.pem: not a regular file; fix the path "
                                                  "in the fleet file or agent config")


@pytest.mark.parametrize("ca", ["fifo", "huge"])
def test_a_broker_ca_a_deploy_ships_that_is_a_fifo_or_too_big_is_one_line_naming_it(tmp_path, ca, unblocked):
    """A deploy shipping the broker's CA to a device read broker.tls.ca with a plain read: a FIFO held it for ever,
    waiting for a writer, and a file of gigabytes was read whole. Now such a file is one line naming it."""
    import os
    from types import SimpleNamespace

    from edge_kit.fleet.agent_install import ensure_agent

    path = tmp_path / "ca.pem"
    if ca == "fifo":
        os.mkfifo(path, 0o600)
    else:
        with open(path, "wb") as f:
            f.truncate((1 << 20) + 1)
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: f\nbroker: {host: 127.0.0.1, port: 1, tls: {ca: ca.pem}}\n"
                          "devices: [{name: d1, host: h, user: u, profile: rpi4}]\n")
    fleet = load_fleet(fleet_file)
    info = {"restart_pending": False, "code": {"files": None}, "device_pub": None, "has_device_key": False,
            "operators_sha256": None, "broker_ca_sha256": None}
    shell = SimpleNamespace(dev=fleet.devices[0], info=info, root="/r", put=lambda *a, **k: None,
                            run=lambda *a, **k: None, remove=lambda *a, **k: None,
                            python_facts={"version": [3, 12, 0], "missing": [], "python": "python3"})
    caught = unblocked(lambda: ensure_agent(shell, fleet), path, 60, "reading broker.tls.ca")  # type: ignore[arg-type]
    why = "not a regular file" if ca == "fifo" else "over the 1,048,576 bytes such a file may take"
    assert isinstance(caught, ConfigError), caught
    assert str(caught) == (f"fleet file, device d1: broker.tls.ca {path}: {why}; set broker.tls.ca in the fleet "
                              "file to the broker's CA certificate (PEM)")


def test_a_keys_folder_that_is_a_file_is_one_line(tmp_path, run_cli):
    """A fleet file whose `keys:` named a file made `edgekit bench` (any command that signs) raise FileExistsError
    from mkdir: a traceback, nothing on stdout with --json."""
    (tmp_path / "afile").write_text("x")
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: f\nkeys: afile\nbroker: {host: 127.0.0.1, port: 1}\n"
                          "devices: [{name: a, host: h, user: u, profile: rpi4}]\n")
    code, out, err = run_cli("bench", "--fleet", fleet_file, "--device", "a", "--json")
    assert code == 2 and err.count("\n") == 1
    assert json.loads(out)["error"].startswith(f"{tmp_path}/afile/operator.key: cannot write a new key there")



@pytest.mark.parametrize("tags, key, why", [
    ("[2024-13-45]", "devices[0].tags[0]", "month must be in 1..12"),  # a date-like tag: YAML reads a date
    ("[pi], port: " + "9" * 5000, "devices[0].port", "Exceeds the limit (4300 digits) for integer string conversion"),
    ("[!!bool maybe]", "devices[0].tags[0]", "not a valid bool"),  # PyYAML: a bare KeyError
    ("[!!timestamp nope]", "devices[0].tags[0]", "not a valid timestamp"),  # PyYAML: a bare AttributeError
])
def test_a_value_yaml_cannot_read_is_one_line_naming_the_line_and_key(tmp_path, run_cli, tags, key, why):
    """A tag such as 2024-13-45 (YAML types it as a date that does not exist) or a 5000-digit number made PyYAML
    raise a bare ValueError: `edgekit` printed a Python traceback naming neither the file nor the line."""
    path = write(tmp_path, "fleet.yaml", FLEET.replace("tags: [pi]}", f"tags: {tags}}}"))
    with pytest.raises(ConfigError) as caught:
        load_fleet(path)
    assert str(caught.value).startswith(f"{path}:5: {key}: YAML cannot read this value ({why}")
    assert str(caught.value).endswith("); quote it if it is text, else give a valid one")
    code, out, err = run_cli("fleet", "status", "--fleet", str(path))
    assert code != 0 and "Traceback" not in out + err and f"fleet.yaml:5: {key}: YAML cannot read this value" in err



def test_a_fleet_of_thousands_reads_each_profile_once(tmp_path, monkeypatch):
    """load_fleet read each device's profile file again: a YAML parse per device, 10,000 for a fleet of 10,000 on
    four profiles (a tenth of a rollout's host CPU). Each profile is read once now; an unknown profile is still named
    with the first device that has it."""
    from edge_kit import profiles

    read: list[str] = []
    real = profiles.load_profile
    monkeypatch.setattr(profiles, "load_profile", lambda name: read.append(str(name)) or real(name))
    devices = "".join(f"  - {{name: d{i}, host: 10.0.{i // 250}.{i % 250 + 1}, profile: {('rpi4', 'rpi5')[i % 2]}}}\n"
                      for i in range(2000))
    body = "fleet: big\nbroker: {host: 127.0.0.1, port: 1883}\ndefaults: {user: edgekit}\ndevices:\n"
    assert len(load_fleet(write(tmp_path, "fleet.yaml", body + devices)).devices) == 2000
    assert sorted(read) == ["rpi4", "rpi5"]
    with pytest.raises(ConfigError, match="device odd: unknown profile 'rpi9'"):
        load_fleet(write(tmp_path, "fleet.yaml", body + devices + "  - {name: odd, host: 10.9.9.8, profile: rpi9}\n"
                         "  - {name: odd2, host: 10.9.9.7, profile: rpi9}\n"))
    with pytest.raises(ConfigError, match="device odd: unknown profile 'rpi9'"):  # the file's first error, in its order
        load_fleet(write(tmp_path, "fleet.yaml", body + devices + "  - {name: odd, host: 10.9.9.8, profile: rpi9}\n"
                         "  - {name: odd2, host: 10.9.9.7, profile: rpi8}\n"))


def test_the_device_names_of_a_large_fleet_are_checked_in_one_pass():
    """Each name was counted over every name (quadratic: over a second for 10,000 devices, five for 20,000, at each
    load of the fleet file). One pass now; a name listed twice is still named."""
    from types import SimpleNamespace

    from edge_kit.fleet.inventory import Fleet

    devices = [SimpleNamespace(name=f"d{i}") for i in range(20_000)]
    started = time.process_time()
    assert Fleet._unique_names(devices) is devices
    assert time.process_time() - started < 1.0  # one pass: milliseconds
    with pytest.raises(ValueError, match="listed twice: d7, d9$"):
        Fleet._unique_names([*devices, SimpleNamespace(name="d9"), SimpleNamespace(name="d7")])


def test_each_devices_agent_yaml_is_the_text_the_pure_python_dumper_writes(tmp_path):
    """A deploy compares the sha256 of agent.yaml with the device's copy: libyaml's dumper (3x faster) must write the
    same bytes as the pure-Python one, or a host with it and one without would each rewrite it and restart agents."""
    import yaml

    from edge_kit.fleet.agent_install import agent_config

    text = FLEET.replace("defaults: {user: edgekit, profile: rpi4}",
                         "defaults: {user: edgekit, profile: rpi4, serve: {http_port: 8089}, telemetry_interval_s: 2.5}"
                         ).replace("{name: pi-2, host: 10.0.0.2, tags: [pi, canary]}",
                                   "{name: pi-2, host: 10.0.0.2, root: '/srv/edge kit: 2/', pull: {ca_file: /a b.pem}}")
    fleet = load_fleet(write(tmp_path, "fleet.yaml", text))
    for dev in fleet.devices:
        written, _ = agent_config(fleet, dev)
        header, body = written.split("\n", 1)
        assert body == yaml.dump(yaml.safe_load(body), Dumper=yaml.SafeDumper, sort_keys=False), dev.name
