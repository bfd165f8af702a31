"""agent.yaml as the agent reads it: strict keys, file:line errors, defaults."""

from __future__ import annotations

import json
import re
import time

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


def test_relative_paths_in_agent_yaml_are_taken_from_its_folder_not_the_working_directory(tmp_path, monkeypatch):
    """A relative serve.socket was taken from the working directory, which a systemd unit, a supervisor and a shell
    each set otherwise: `edgekit-agent state` looked for the socket in another folder than the agent served it in."""
    from device_agents.__main__ import _serving_socket

    root = tmp_path / "root"
    root.mkdir()
    (root / "pw").write_text("secret\n")
    monkeypatch.chdir(tmp_path)  # elsewhere than the file's folder
    cfg = load_agent_config(write(root, "agent.yaml", "device: pi-1\nfleet: f\nroot: .\nserve: {socket: api.sock}\n"
                                                      "broker: {password_file: pw, tls: {ca: ../ca.pem}}\n"))
    assert cfg.root == root and cfg.serve.socket == root / "api.sock" and cfg.broker.tls.ca == root / "../ca.pem"
    assert cfg.password() == "secret" and _serving_socket(root, cfg) == root / "api.sock"
    cfg = load_agent_config(write(root, "abs.yaml", "device: pi-1\nfleet: f\nserve: {socket: /run/x.sock}\n"))
    assert str(cfg.serve.socket) == "/run/x.sock"


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


@pytest.mark.parametrize("block, message", [
    ("bench: {min_seconds: 601}", "a.yaml:3: bench: min_seconds 601.0 is not between 0 and 600"),
    ("bench: {threads: 1000}", "a.yaml:3: bench: threads 1000 is not between 1 and 64"),
    ("bench: {min_seconds: -1}", "a.yaml:3: bench: min_seconds -1.0 is not between 0 and 600"),
    ("power: {idle_w: 2.7}", "a.yaml:3: power: give both idle_w and busy_w"),
    ("power: {idle_w: -2.7, busy_w: 5}", "a.yaml:3: power: idle_w -2.7 and busy_w 5.0 must be positive watts, at most "
                                         "10,000"),
    ("power: {idle_w: 2, busy_w: 1.0e+29}", "a.yaml:3: power: idle_w 2.0 and busy_w 1e+29 must be positive watts, at "
                                            "most 10,000"),
    ("store: {max_store_mb: 1.0e+29}", "a.yaml: store.max_store_mb must be positive, at most 1,000,000,000 (1 PB)"),
    ("bench: {threads: '4'}", "a.yaml:3: bench.threads: expected int, got '4'"),
    ("power: {idle_w: 6, busy_w: 2}", "a.yaml:3: power: busy_w (2.0) must be at least idle_w (6.0)"),
])
def test_bench_and_power_blocks_follow_the_bench_commands_and_the_profiles_rules(tmp_path, block, message):
    """agent.yaml took bench.min_seconds -1, 1000 threads, an idle_w alone (no estimate, silently) or a busy_w below
    idle_w (an estimate that falls as the CPU works); and, as profiles now refuse them, a busy_w or a store budget no
    device has (1e29). Text for a number was refused before, as profiles now refuse it."""
    path = write(tmp_path, "a.yaml", f"device: pi-1\nfleet: f\n{block}\n")
    with pytest.raises(ConfigError) as caught:
        load_agent_config(path)
    assert str(caught.value).startswith(str(tmp_path / message))


@pytest.mark.parametrize("options, message", [
    (["--min-seconds", "nan"], "--min-seconds: nan is not between 0 and 600"),
    (["--min-seconds", "inf"], "--min-seconds: inf is not between 0 and 600"),
    (["--threads", "100000"], "--threads: 100000 is not between 1 and 64"),
    (["--idle-w", "nan", "--busy-w", "5"], "idle_w nan and busy_w 5.0 must be positive watts, at most 10,000 (--idle-w, "
                                           "--busy-w)"),
    (["--idle-w", "5", "--busy-w", "2"], "busy_w (2.0) must be at least idle_w (5.0) (--idle-w, --busy-w)"),
    (["--idle-w", "5"], "give both idle_w and busy_w (the power estimate needs both), or neither (--idle-w, --busy-w)"),
])
def test_agent_bench_refuses_what_would_print_a_figure_nothing_measured(tmp_path, capsys, options, message):
    """`edgekit-agent bench --idle-w nan --busy-w 5` printed "nan W, nan mJ per inference; estimated"; --min-seconds nan
    was ignored and inf capped silently; --idle-w alone gave "no idle_w/busy_w to estimate from"."""
    from device_agents.__main__ import main

    model = write(tmp_path, "m.tflite", "not read: the options are refused first")
    with pytest.raises(SystemExit) as caught:
        main(["bench", str(model), *options])
    assert caught.value.code == 2
    assert capsys.readouterr().err == f"edgekit-agent: error: {message}\n"


def test_a_config_that_is_not_text_is_one_line(tmp_path):
    """`edgekit-agent run --config` on a binary file raised UnicodeDecodeError (a traceback)."""
    path = tmp_path / "a.yaml"
    path.write_bytes(b"device: pi-1\n\xfc\x80 fleet")
    with pytest.raises(ConfigError) as caught:
        load_agent_config(path)
    assert str(caught.value) == f"{path}: the agent config is not UTF-8 text (byte 13); write it as YAML"


def test_the_unit_command_refuses_a_config_that_does_not_load(tmp_path, capsys):
    """`edgekit-agent unit --config nope.yaml` printed a unit (exit 0) whose service could only fail at every boot."""
    from device_agents.__main__ import main

    for config in (tmp_path / "nope.yaml", tmp_path):
        with pytest.raises(SystemExit) as caught:
            main(["unit", "--config", str(config)])
        assert caught.value.code == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith(f"edgekit-agent: error: {config}: cannot read the agent config")
    good = write(tmp_path, "agent.yaml", "device: pi-1\nfleet: f\n")
    main(["unit", "--config", str(good)])
    assert f"--config {good}\n" in capsys.readouterr().out


@pytest.mark.parametrize("bench, why", [
    ("{delegate: nosuch}", "agent.yaml:6: bench.delegate: unknown target 'nosuch' (known: xnnpack, none, edgetpu, gpu)"),
    ("{delegate: edgetpu,\n  delegate_options: {devic: usb}}",
     "agent.yaml:7: bench.delegate_options: options.devic: unknown key; did you mean 'device'?")])
def test_the_agent_refuses_to_start_on_a_delegate_no_target_has_in_one_line(offline_config, tmp_path, capsys, bench,
                                                                            why):
    """`edgekit-agent run` started on a bench.delegate no target has (activate refused it): each smoke check and
    bench then blamed the model. Its config load refuses it now, as activate does: file, line and key, exit 2."""
    from device_agents.__main__ import main

    with pytest.raises(ConfigError, match=re.escape(why)):
        offline_config(f"bench: {bench}\n")
    with pytest.raises(SystemExit) as caught:
        main(["run", "--config", str(tmp_path / "agent.yaml")])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err == f"edgekit-agent: error: {tmp_path}/{why}\n"


@pytest.mark.parametrize("kind, why", [("missing", "No such file or directory"), ("folder", "Is a directory")])
def test_a_password_file_that_cannot_be_read_stops_the_agent_in_one_line_saying_what_to_do(tmp_path, capsys, kind,
                                                                                          why):
    """`edgekit-agent run` on a broker.password_file that is missing (or a folder) said only "broker.password_file
    /x: No such file or directory": not which agent.yaml, nor what to do. Now the line names both, exit 2."""
    from device_agents.__main__ import main

    pw = tmp_path / "mqtt.pass"
    if kind == "folder":
        pw.mkdir()
    config = write(tmp_path, "agent.yaml", f"device: pi-1\nfleet: f\nroot: {tmp_path / 'root'}\n"
                                           f"broker: {{host: 127.0.0.1, port: 1, username: pi-1, password_file: {pw}}}\n")
    with pytest.raises(SystemExit) as caught:
        main(["run", "--config", str(config)])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err == (
        f"edgekit-agent: error: {config}: broker.password_file {pw}: {why}; create it holding the broker password "
        "alone (`edgekit fleet init` wrote each user's in its secrets/ folder), readable by this user, or fix "
        f"broker.password_file in {config}\n")


FIX_CA = "point pull.ca_file (fleet file or agent.yaml) at the store's CA bundle (PEM) on the device"


@pytest.mark.parametrize("kind, why", [("missing", "No such file or directory"), ("fifo", "not a regular file"),
                                       ("folder", "Is a directory"),
                                       ("huge", "over the 1,048,576 bytes a CA bundle may take"),
                                       ("text", "not a PEM certificate"), ("empty", "not a PEM certificate"),
                                       ("binary", "not a PEM certificate")])
def test_a_pull_ca_file_that_is_no_readable_pem_bundle_is_refused_when_agent_yaml_loads(tmp_path, unblocked, kind, why):
    """pull.ca_file was checked only when a pull of an https:// store started (days later, as a failed try): an agent
    whose CA bundle was missing, a FIFO, huge or no PEM loaded and ran. Now loading agent.yaml refuses it in one line
    naming the file, line and key; a real CA bundle loads, and is the one the pull then trusts."""
    import os

    from device_agents.config import store_ca_context
    from edge_kit.fleet.broker_setup import make_tls

    ca = tmp_path / "store-ca.pem"
    if kind == "fifo":
        os.mkfifo(ca, 0o600)
    elif kind == "folder":
        ca.mkdir()
    elif kind == "huge":
        with open(ca, "wb") as f:
            f.truncate((1 << 20) + 1)
    elif kind != "missing":
        ca.write_bytes({"text": b"not a certificate\n", "empty": b"", "binary": b"\xff\xfe\x00"}[kind])
    config = write(tmp_path, "agent.yaml", f"device: pi-1\nfleet: f\npull:\n  retry_s: 5\n  ca_file: {ca}\n")
    caught = unblocked(lambda: load_agent_config(config), ca, 30, "loading agent.yaml's pull.ca_file")
    assert isinstance(caught, ConfigError), caught
    assert str(caught) == f"{config}:5: pull.ca_file {ca}: {why}; {FIX_CA}"
    if kind == "missing":  # the real thing: a CA bundle make_tls wrote loads
        ca.write_bytes(make_tls(tmp_path / "tls", ["127.0.0.1"]).ca.read_bytes())
        assert load_agent_config(config).pull.ca_file == ca
        assert store_ca_context(ca).cert_store_stats()["x509_ca"] == 1  # that CA alone, not the system's


@pytest.mark.parametrize("command", ["run", "supervise", "unit", "activate"])
def test_every_command_that_loads_agent_yaml_refuses_a_missing_pull_ca_file_in_one_line(tmp_path, capsys, command):
    """run, supervise, unit and activate load agent.yaml: each refuses a pull.ca_file that is not there, exit 2, before
    anything starts (they took it, and the first pull of an https:// store failed on it)."""
    from device_agents.__main__ import main

    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    ca = tmp_path / "nope.pem"
    config = write(root, "agent.yaml", f"device: pi-1\nfleet: f\nroot: {root}\npull: {{ca_file: {ca}}}\n")
    args = {"run": ["--config", str(config)], "supervise": ["--config", str(config), "--pidfile", str(tmp_path / "p")],
            "unit": ["--config", str(config)], "activate": ["--variant", "int8", "--root", str(root)]}[command]
    with pytest.raises(SystemExit) as caught:
        main([command, *args])
    captured = capsys.readouterr()
    assert caught.value.code == 2 and captured.out == ""
    assert captured.err == f"edgekit-agent: error: {config}:4: pull.ca_file {ca}: No such file or directory; {FIX_CA}\n"


@pytest.mark.parametrize("args", [["state"], ["rollback"], ["activate", "--variant", "int8"], ["bench", "nope.tflite"]])
def test_agent_commands_take_json_and_then_say_an_error_in_json_too(tmp_path, capsys, args):
    """`edgekit-agent state --json` was a usage error (only bench took --json), and `bench --json` said its errors
    on stderr alone: a JSON reader of stdout got nothing to parse."""
    from device_agents.__main__ import main

    root = [] if args[0] == "bench" else ["--root", str(tmp_path / "nowhere")]
    with pytest.raises(SystemExit) as caught:
        main([*args, *root, "--json"])
    captured = capsys.readouterr()
    assert caught.value.code == 2 and captured.err.count("\n") == 1
    assert json.loads(captured.out) == {"error": captured.err.removeprefix("edgekit-agent: error: ").rstrip("\n"),
                                        "exit_code": 2}


@pytest.mark.parametrize("delegate, option, why", [
    ("xnnpack", "bogus=1", "runtime.options: options.bogus: unknown key (it takes none)"),
    ("edgetpu", "devic=usb", "runtime.options: options.devic: unknown key; did you mean 'device'?")])
def test_a_delegate_option_its_target_does_not_take_is_named_not_a_crash(tmp_path, delegate, option, why):
    """`edgekit-agent bench --delegate-option bogus=1` said "the interpreter crashed (exit 1)": the target's
    ConfigError escaped the smoke child; an activation with such options was reported the same way."""
    from device_agents.errors import SmokeFailed
    from device_agents.smoke import SmokePool

    model = write(tmp_path, "m.tflite", "the options are checked before the file is read")
    key, value = option.split("=")
    with pytest.raises(SmokeFailed) as caught:
        SmokePool()(model, delegate=delegate, options={key: value})
    assert str(caught.value) == why


@pytest.mark.parametrize("text, message", [
    ("device: pi-1\nfleet: f\ndevice: pi-2\n", "a.yaml:3: device: given twice"),
    ("device: pi-1\nfleet: f\nbench: {threads: 4, threads: 1}\n", "a.yaml:3: bench.threads: given twice"),
])
def test_a_key_given_twice_is_refused_not_silently_the_last(tmp_path, text, message):
    """PyYAML keeps the last of two equal keys: agent.yaml with two `device:` lines ran as the second."""
    with pytest.raises(ConfigError) as caught:
        load_agent_config(write(tmp_path, "a.yaml", text))
    assert str(caught.value) == f"{tmp_path / message} (YAML would keep only the last); remove one"


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


@pytest.mark.parametrize("text, message", [
    ("device: pi-1\nfleet: f\nbench: {threads: 2024-13-45}\n", "a.yaml:3: bench.threads: YAML cannot read this value "
                                                               "(month must be in 1..12)"),
    ("device: pi-1\nfleet: f\nserve:\n  max_clients: " + "9" * 5000 + "\n",
     "a.yaml:4: serve.max_clients: YAML cannot read this value (Exceeds the limit (4300 digits) for integer string "
     "conversion: value has 5000 digits)"),
    # text under an explicit tag it is not: PyYAML raised KeyError, AttributeError (a traceback at start)
    ("device: pi-1\nfleet: f\nbench: {threads: !!bool maybe}\n", "a.yaml:3: bench.threads: YAML cannot read this "
                                                                   "value (not a valid bool)"),
    ("device: pi-1\nfleet: f\nbench:\n  threads: !!timestamp nope\n", "a.yaml:4: bench.threads: YAML cannot read "
                                                                       "this value (not a valid timestamp)"),
    ("device: pi-1\nfleet: f\nbench: {threads: !mine 2}\n", "a.yaml:3: bench.threads: YAML cannot read this value "
                                                              "(unknown tag !mine)"),
])
def test_a_value_yaml_cannot_read_is_one_line_not_a_crash(tmp_path, text, message):
    """A date that does not exist or a 5000-digit number: PyYAML raised a bare ValueError, and the agent died at
    start with a traceback naming neither the file nor the line."""
    with pytest.raises(ConfigError) as caught:
        load_agent_config(write(tmp_path, "a.yaml", text))
    assert str(caught.value) == f"{tmp_path / message}; quote it if it is text, else give a valid one"


def test_an_alias_bomb_a_recursive_alias_or_deep_nesting_is_one_line_at_once(tmp_path):
    """agent.yaml is read as a tree in which each alias is a copy: six levels of nine aliases took 80 s on this
    machine (nine levels: hours and gigabytes), an alias inside itself and a few thousand nested brackets raised
    RecursionError; the agent did not start and said nothing of the file."""
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))
    for text, message in [
        (bomb, "more than 100000 values once its aliases (*name) are expanded, or an alias used inside itself"),
        ("bench: {delegate_options: {x: &r [*r]}}\n", "more than 100000 values once its aliases"),
        ("x: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply to be an agent config"),
    ]:
        started = time.thread_time()  # CPU, not wall: a loaded CI machine stretched 2 s to 19
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_agent_config(write(tmp_path, "a.yaml", "device: pi-1\nfleet: f\n" + text))
        assert time.thread_time() - started < 10
    shared = "device: pi-1\nfleet: f\nbench: &b {threads: 2}\n"  # an alias used as intended still loads
    assert load_agent_config(write(tmp_path, "a.yaml", shared)).bench.threads == 2


def test_a_config_over_its_size_bound_is_one_line_without_being_read_whole(tmp_path):
    """agent.yaml was read whole whatever its size: one grown to gigabytes (damaged, or a log written over it) took
    the agent's memory before any check. A real one holds a few kilobytes; one over 1 MiB is refused unread."""
    path = write(tmp_path, "a.yaml", "device: pi-1\nfleet: f\n" + "# padding\n" * 110_000)
    with pytest.raises(ConfigError) as caught:
        load_agent_config(path)
    assert str(caught.value) == (f"{path}: over 1,048,576 bytes, not an agent config (one holds a few kilobytes); "
                                 "write it as the deploy does")
    assert load_agent_config(write(tmp_path, "b.yaml", "device: pi-1\nfleet: f\n" + "# padding\n" * 1000)).device == "pi-1"
