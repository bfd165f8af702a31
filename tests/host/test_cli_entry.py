"""The `edgekit` entry point: one line and an exit code, whatever goes wrong before a command runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def command_code(prelude: str, args) -> str:
    """Return the ``python -c`` program that runs ``prelude`` and then `edgekit ARGS...` as its entry point does."""
    return f"import sys; {prelude}; sys.argv = ['edgekit', *{list(args)!r}]; from edge_kit.cli import main; main()"


def run_edgekit(prelude: str, *args: str) -> subprocess.CompletedProcess:
    """Return the finished process of `edgekit ARGS...` in a new Python, ``prelude`` run before edge_kit is imported."""
    return subprocess.run([sys.executable, "-c", command_code(prelude, args)], capture_output=True, text=True,
                          timeout=120)


# Reads JSON lines [stdout file, stderr file, program]; for each, forks a child that leaves the loop with those files
# as its stdout and stderr and runs the program as `python -c` would (its exit status is Python's end of it); says
# "exit <waitpid status>". What edge_kit.cli.main imports is imported once, here: a new Python importing it per command
# was most of this file's time.
FORKING = """
import json, os, sys
import typer
from edge_kit.cli import app, compile, fleet, history, loop, main, rollout
for line in sys.stdin:
    out, err, program = json.loads(line)
    pid = os.fork()
    if pid == 0:
        break
    print("exit", os.waitpid(pid, 0)[1], flush=True)
else:
    sys.exit(0)
for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY), (2, err, os.O_WRONLY)):
    os.dup2(os.open(path, flags), fd)
exec(program, {"__name__": "__main__", "__builtins__": __builtins__})
"""


@pytest.fixture(scope="module")
def edgekit(tmp_path_factory):
    """Return ``run(prelude, *args)``: :func:`run_edgekit`'s finished process, in a process forked from one that has
    imported the CLI's modules (a prelude that must run before those imports needs :func:`run_edgekit`)."""
    import select

    folder = tmp_path_factory.mktemp("edgekit-runs")
    parent = subprocess.Popen([sys.executable, "-c", FORKING], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)

    def run(prelude: str, *args: str) -> subprocess.CompletedProcess:
        out, err = folder / "stdout", folder / "stderr"
        out.write_bytes(b"")
        err.write_bytes(b"")
        parent.stdin.write(json.dumps([str(out), str(err), command_code(prelude, args)]) + "\n")
        parent.stdin.flush()
        assert select.select([parent.stdout], [], [], 120)[0], f"edgekit {args} did not end within 120 s"
        said = parent.stdout.readline()
        assert said.startswith("exit "), f"the forking process ended: {said!r}"
        status = int(said.split()[1])
        code = os.waitstatus_to_exitcode(status)
        return subprocess.CompletedProcess(args, code, out.read_text(), err.read_text())

    yield run
    parent.stdin.close()
    parent.wait(60)


def test_without_the_host_extra_it_names_what_to_install_in_one_line():
    result = run_edgekit("sys.modules['typer'] = None", "profiles", "list")
    assert result.returncode == 2
    assert result.stderr == ("edgekit: error: the host commands need the host extra (typer is not installed): "
                             "pip install 'edge-kit[host]'\n")


def test_a_typer_without_the_help_internals_edge_kit_adjusts_still_runs_every_command():
    """edge-kit adjusts typer's help (flags without a value type, ``MODEL`` for an argument) through typer's internals,
    which pyproject's ``typer>=0.12`` does not promise: typer 0.12.5 has no ``display_type_rich``, and importing the
    CLI raised AttributeError, a traceback for every command. Now such a typer shows its own help."""
    prelude = ("import typer.core as c, typer.rich_utils as r; del c.TyperOption.display_type_rich; "
               "del c._TyperParameter.display_type_rich; del c.TyperArgument._usage_display_name; del r._fix_linebreaks")
    results = [run_edgekit(prelude, *args) for args in (("profiles", "list", "--json"), ("compile", "--help"))]
    for result in results:
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "rpi4" in results[0].stdout


def test_the_cli_starts_without_numpy_pydantic_or_the_history_store():
    """Every `edgekit` command took a second before it did anything: `edgekit --help` imported numpy, the profile
    models (pydantic) and the history store, for three option defaults that one command module read at import. It
    takes about half that now; a command imports what it needs when it runs."""
    code = ("import sys\nsys.argv = ['edgekit', '--help']\nfrom edge_kit.cli import main\ntry:\n    main()\n"
            "except SystemExit:\n    pass\nprint(sorted({m.split('.')[0] for m in sys.modules} & {'numpy', 'pydantic'}),"
            " [m for m in ('edge_kit.profiles', 'edge_kit.telemetry.store', 'edge_kit.selection.policy') if m in "
            "sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip().splitlines()[-1] == "[] []"


def test_a_toolkit_error_is_one_line_and_its_exit_code(edgekit):
    result = edgekit("pass", "profiles", "show", "rpi-4")
    assert result.returncode == 2
    assert result.stderr.startswith("edgekit: error: unknown profile 'rpi-4'; did you mean 'rpi4'?")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_with_json_a_toolkit_error_is_also_one_json_document_on_stdout(edgekit):
    result = edgekit("pass", "profiles", "show", "rpi-4", "--json")
    assert result.returncode == 2
    answer = json.loads(result.stdout)
    assert answer["exit_code"] == 2 and answer["error"].startswith("unknown profile 'rpi-4'; did you mean 'rpi4'?")
    assert result.stderr == f"edgekit: error: {answer['error']}\n"


@pytest.mark.parametrize("value, why", [("0", "greater than or equal to 1"), ("-1", "greater than or equal to 1"),
                                        ("many", "valid integer")])
def test_a_bad_option_value_is_one_line_exit_2_and_json_with_json(value, why, edgekit):
    result = edgekit("pass", "deploy", "--fleet", "fleet.yaml", "--artifacts", "a", "--parallel", value, "--json")
    assert result.returncode == 2
    answer = json.loads(result.stdout)
    assert why in answer["error"] and "--parallel" in answer["error"] and "`edgekit deploy --help`" in answer["error"]
    assert result.stderr == f"edgekit: error: {answer['error']}\n"
    plain = edgekit("pass", "deploy", "--fleet", "fleet.yaml", "--artifacts", "a", "--parallel", value)
    assert plain.returncode == 2 and plain.stdout == "" and plain.stderr == result.stderr


def test_an_unknown_command_is_one_line_naming_the_closest(edgekit):
    result = edgekit("pass", "deplyo")
    assert result.returncode == 2
    assert result.stderr == "edgekit: error: No such command 'deplyo'. Did you mean 'deploy', 'demo'? (see `edgekit --help`)\n"


def test_ctrl_c_in_a_command_is_one_line_and_exit_130(edgekit):
    interrupt = "import edge_kit.profiles as p; p.bundled_profiles = lambda: (_ for _ in ()).throw(KeyboardInterrupt())"
    result = edgekit(interrupt, "profiles", "list")
    assert result.returncode == 130
    assert result.stderr == "edgekit: error: interrupted; nothing was half-written\n" and result.stdout == ""
    as_json = edgekit(interrupt, "profiles", "list", "--json")
    assert as_json.returncode == 130 and json.loads(as_json.stdout)["exit_code"] == 130


def test_no_color_on_a_terminal_prints_no_escape_codes(on_a_terminal):
    for args in (["profiles", "list"], ["profiles", "--help"]):
        code, text = on_a_terminal(f"import sys; sys.argv = ['edgekit', *{args!r}]; from edge_kit.cli import main; main()",
                                   NO_COLOR="1")
        assert code == 0
        assert "rpi4" in text or "Usage" in text
        assert "\x1b" not in text, args


def test_progress_and_spinners_go_to_stderr_on_a_terminal_only_and_never_with_json(capsys, monkeypatch):
    from rich.progress import BarColumn

    from edge_kit.cli import app

    def work(as_json):
        with app.spinner("working", as_json) as status:
            status.update("still working")
        with app.progress_bar("{task.description}", BarColumn(), as_json=as_json) as bar:
            bar.update(bar.add_task("steps", total=2), advance=2)
        return capsys.readouterr()

    piped = work(as_json=False)  # a log gets no bar, and no blank line where it was
    assert piped.out == "" and piped.err == ""
    monkeypatch.setattr(app.err, "_force_terminal", True)
    shown = work(as_json=False)
    assert shown.out == "" and shown.err != ""
    quiet = work(as_json=True)
    assert quiet.out == "" and quiet.err == ""



def test_a_disabled_progress_bar_writes_no_blank_line_on_the_rich_the_floor_allows(capsys, monkeypatch):
    """rich before 14.3 (pyproject allows 13.8) printed a blank line on stop() off a terminal even when disabled:
    each compile step left one in a log or a ``--json`` run's stderr. Its stop() is put back here."""
    from rich.progress import BarColumn, Progress

    from edge_kit.cli import app

    def stop_before_14_3(self):  # rich 13.8's Progress.stop, verbatim
        self.live.stop()
        if not self.console.is_interactive and not self.console.is_jupyter:
            self.console.print()

    monkeypatch.setattr(Progress, "stop", stop_before_14_3)
    for as_json in (False, True):
        with app.progress_bar("{task.description}", BarColumn(), as_json=as_json) as bar:
            bar.update(bar.add_task("steps", total=2), advance=2)
        assert capsys.readouterr() == ("", ""), as_json

@pytest.mark.parametrize("command", [["sim", "up", "--dir", "{tmp}/sim"], ["demo", "--dir", "{tmp}/demo"]])
def test_profiles_naming_none_is_one_line_exit_2(tmp_path, run_cli, command):
    code, out, err = run_cli(*[a.format(tmp=tmp_path) for a in command], "--profiles", " , ", "--json")
    assert code == 2
    assert json.loads(out)["error"] == ("--profiles ' , ': name at least one profile, e.g. rpi4,rpi5,coral-usb "
                                        "(see `edgekit profiles list`)")
    assert err.count("\n") == 1 and list(tmp_path.iterdir()) == []


def test_a_broker_host_no_certificate_can_name_writes_nothing(tmp_path, run_cli):
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: f\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                          "devices:\n  - {name: d1, host: 127.0.0.1}\n")
    for host in ("", "a b", "x" * 65):
        code, out, err = run_cli("fleet", "init", "--fleet", fleet_file, "--broker-host", host, "--out", tmp_path / "wall",
                                 "--json")
        assert code == 2 and json.loads(out)["error"].startswith(f"--broker-host {host!r}: give the name or address")
        assert not (tmp_path / "wall").exists()  # a half-written wall would refuse the next, corrected run


def test_a_listen_address_that_is_no_address_writes_no_broker_settings(tmp_path, run_cli):
    """--listen went into mosquitto.conf's listener line as given (exit 0): 'not an ip' left a broker that would
    not start, and a line break added settings of the user's own, such as a listener without TLS. Now refused."""
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: f\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                          "devices:\n  - {name: d1, host: 127.0.0.1}\n")
    for listen in ("not an ip", "127.0.0.1\nlistener 1884\nallow_anonymous true",
                   "fe80::1%eth0\nlistener 1884\nallow_anonymous true"):  # the line break in an IPv6 zone passed
        code, out, err = run_cli("fleet", "init", "--fleet", fleet_file, "--broker-host", "mqtt.local", "--listen",
                                 listen, "--out", tmp_path / "wall", "--json")
        assert code == 2 and err.count("\n") == 1
        assert json.loads(out)["error"].startswith(f"--listen {listen!r}: give the IP address or host name")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["fleet.yaml"]  # no wall, no partial folder
    code, out, _err = run_cli("fleet", "init", "--fleet", fleet_file, "--broker-host", "mqtt.local", "--listen", "[::1]",
                              "--out", tmp_path / "wall", "--json")  # Mosquitto takes no brackets: the line says so
    assert code == 2 and "(e.g. 10.0.0.2, or ::1 without brackets)" in json.loads(out)["error"]
    code, out, err = run_cli("fleet", "init", "--fleet", fleet_file, "--broker-host", "mqtt.local", "--listen", "::",
                             "--out", tmp_path / "wall", "--json")
    assert code == 0 and "listener 8883 ::\n" in (tmp_path / "wall" / "mosquitto.conf").read_text()


@pytest.mark.parametrize("edit, said", [
    (("max_power_w: 6.5", "max_power_w: yes"), "profile.yaml:8: constraints.max_power_w: a number is wanted, not true"),
    (("threads: 4", "threads: on"), "profile.yaml:6: runtime.threads: a number is wanted, not true or false"),
    (("port: 2}", "port: true}"), "fleet.yaml:5: devices[0].port: a number is wanted, not true or false"),
    (("port: 1}", "port: 1, keepalive: off}"), "fleet.yaml:2: broker.keepalive: a number is wanted, not true"),
    (("ram_mb: 4096", 'ram_mb: "64"'), "profile.yaml:5: hardware.ram_mb: a number is wanted, not the text '64'; write "
                                       "it without quotes"),
    (("ram_mb: 4096", "ram_mb: 1e29"), "profile.yaml:5: hardware.ram_mb: a number is wanted, not the text '1e29'; write "
                                       "it as 1.0e+29, as YAML reads an exponent only with a dot and a sign"),
    (("ram_mb: 4096", "ram_mb: 100000000000000000000000000000"), "profile.yaml:5: hardware.ram_mb: Input should be "
                                                                 "less than or equal to 1000000000"),
    (("max_power_w: 6.5", "max_power_w: 1.0e+29"), "profile.yaml:8: constraints.max_power_w: Input should be less "
                                                   "than or equal to 10000"),
    (("max_latency_p90_ms: 50", "max_latency_p90_ms: 1.0e+9"), "profile.yaml:8: constraints.max_latency_p90_ms: Input "
                                                               "should be less than or equal to 86400000"),
    (("busy_w: 6.4", "busy_w: 64000"), "profile.yaml:10: power.busy_w: Input should be less than or equal to 10000"),
    (("port: 2}", "port: '2'}"), "fleet.yaml:5: devices[0].port: a number is wanted, not the text '2'; write it"),
    (("port: 1}", "port: '1'}"), "fleet.yaml:2: broker.port: a number is wanted, not the text '1'; write it"),
])
def test_yes_or_no_text_or_an_absurd_number_in_a_profile_or_fleet_file_is_named(tmp_path, run_cli, edit, said):
    """YAML reads yes/no/on/off as true/false, and pydantic took true as 1: a profile's `max_power_w: yes` was a 1 W
    limit, a device's `port: true` port 1, with exit 0. So was text: `ram_mb: "64"` was 64 (the agent's own config
    refuses text for a number), `ram_mb: 1e29` (text to YAML) 'unable to parse string as an integer'; and 1e29 MB of
    RAM, a 1e29 W limit or an 11-day latency bound were taken. Now the file, line and key are named, exit 2."""
    from pathlib import Path

    profile = tmp_path / "profile.yaml"
    profile.write_text((Path(__file__).parents[2] / "profiles" / "rpi4.yaml").read_text())
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(f"fleet: f\nbroker: {{host: 127.0.0.1, port: 1}}\ndefaults: {{user: edgekit, profile: {profile}}}\n"
                     "devices:\n  - {name: d1, host: 127.0.0.1, port: 2}\n")
    target = profile if said.startswith("profile") else fleet
    target.write_text(target.read_text().replace(*edit))
    command = ("profiles", "check", profile) if target == profile else \
        ("fleet", "status", "--fleet", fleet, "--history-only", "--history", tmp_path / "none.db")
    code, out, err = run_cli(*command, "--json")
    assert code == 2 and err.count("\n") == 1
    assert json.loads(out)["error"].startswith(f"{tmp_path}/{said}")


@pytest.mark.parametrize("content, got", [("", "nothing (the file is empty, or only comments)"),
                                          ("# todo\n", "nothing (the file is empty, or only comments)"),
                                          ("- rpi4\n", "a list"), ("rpi4\n", "the single value 'rpi4'")])
def test_a_profile_or_fleet_file_that_is_no_mapping_says_what_it_holds(tmp_path, run_cli, content, got):
    """An empty profile or fleet file was 'expected a mapping of keys to values, got NoneType': Python's name."""
    path = tmp_path / "x.yaml"
    path.write_text(content)
    for command in (("profiles", "check", path), ("fleet", "status", "--fleet", path, "--history-only")):
        code, out, _err = run_cli(*command, "--json")
        assert code == 2 and json.loads(out)["error"] == f"{path}:1: expected a mapping of keys to values, got {got}"


@pytest.mark.parametrize("command, option, where", [
    (("history", "refused", "--history", "{tmp}/h.db", "--device", "d\udcff"), "--device", "history refused"),
    (("rollout", "status", "r\udcff", "--fleet", "{tmp}/fleet.yaml", "--history", "{tmp}/h.db"), "ROLLOUT_ID",
     "rollout status"),
    (("select", "--fleet", "{tmp}/fleet.yaml", "--history", "postgresql://u:secret@127.0.0.1:1/d\udcff"), "--history",
     "select"),
])
def test_a_name_or_url_that_is_not_utf8_is_one_line(tmp_path, run_cli, command, option, where):
    """A device, rollout id or URL given with a byte that is not UTF-8 (\\xff, kept as a lone surrogate) reached a
    history query, or psycopg, as it was: a UnicodeEncodeError traceback. Now one line, without the URL's password."""
    from edge_kit.telemetry.store import Store

    Store(tmp_path / "h.db").close()
    (tmp_path / "fleet.yaml").write_text("fleet: f\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, "
                                         "profile: rpi4}\ndevices:\n  - {name: d1, host: 127.0.0.1}\n")
    code, out, err = run_cli(*[a.format(tmp=tmp_path) for a in command], "--json")
    assert code == 2 and err.count("\n") == 1 and "secret" not in err
    assert json.loads(out)["error"] == (f"Invalid value for '{option}': it holds bytes that are not UTF-8; give it as "
                                        f"UTF-8 text (see `edgekit {where} --help`)")


@pytest.mark.parametrize("name, said", [("", "the device name is empty; give the device's name (1-64 letters"),
                                        ("a/b", "device 'a/b' must be 1-64 letters, digits, '_', '.' or '-'")])
def test_fleet_revoke_of_an_empty_or_no_device_name_says_so(tmp_path, run_cli, name, said):
    """`fleet revoke ""` said ": no key is registered for it in keys/devices.json" (an empty name, unseen), and made
    keys/; a name no device can have was looked up too. Now the name is checked by the fleet file's rule first."""
    (tmp_path / "fleet.yaml").write_text("fleet: f\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, "
                                         "profile: rpi4}\ndevices:\n  - {name: d1, host: 127.0.0.1}\n")
    code, out, err = run_cli("fleet", "revoke", name, "--fleet", tmp_path / "fleet.yaml", "--json")
    assert code == 2 and err.count("\n") == 1
    assert json.loads(out)["error"].startswith(f"Invalid value for 'DEVICE': {said}")
    assert json.loads(out)["error"].endswith("(see `edgekit fleet revoke --help`)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleet.yaml"]


def test_fleet_revoke_of_a_device_with_no_key_says_so_and_leaves_the_fleet_folder_as_it_was(tmp_path, run_cli):
    """`fleet revoke d1` in a fleet no deploy had registered a key for said so, and left an empty keys/ behind."""
    (tmp_path / "fleet.yaml").write_text("fleet: f\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, "
                                         "profile: rpi4}\ndevices:\n  - {name: d1, host: 127.0.0.1}\n")
    code, out, err = run_cli("fleet", "revoke", "d1", "--fleet", tmp_path / "fleet.yaml")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"edgekit: error: d1: no key is registered for it in {tmp_path / 'keys' / 'devices.json'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleet.yaml"]


def test_fleet_revoke_with_a_keys_folder_that_is_a_file_says_so(tmp_path, run_cli):
    """`fleet revoke d1` in a fleet whose `keys:` named a file said no key was registered in afile/devices.json: check
    the device name (since it no longer made a keys folder to say so; before, a FileExistsError traceback)."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "fleet.yaml").write_text("fleet: f\nkeys: afile\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: "
                                         "edgekit, profile: rpi4}\ndevices:\n  - {name: d1, host: 127.0.0.1}\n")
    code, out, err = run_cli("fleet", "revoke", "d1", "--fleet", tmp_path / "fleet.yaml")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err == (f"edgekit: error: {tmp_path / 'afile'}: the fleet's keys folder is a file; set `keys:` in the fleet "
                   "file to its keys folder\n")
    assert (tmp_path / "afile").read_text() == "x"


def test_a_store_folder_that_does_not_exist_is_bad_input(tmp_path):
    from edge_kit.errors import InputError
    from edge_kit.sim.store_server import start_store_server

    with pytest.raises(InputError, match="no such store folder; run `edgekit publish ARTIFACTS --store"):
        start_store_server(tmp_path / "none")
    assert InputError.exit_code == 2


def test_every_command_has_a_one_line_summary_and_no_negative_of_a_plain_switch():
    import typer.main

    from edge_kit.cli import compile, fleet, loop, rollout  # noqa: F401  (each registers its commands)
    from edge_kit.cli.app import app

    def commands(group, path):
        for name, cmd in group.commands.items():
            yield f"{path} {name}", cmd
            if hasattr(cmd, "commands"):
                yield from commands(cmd, f"{path} {name}")

    root = typer.main.get_command(app)
    for path, cmd in commands(root, "edgekit"):
        summary = (cmd.help or "").strip().split("\n\n")[0]
        assert summary and "\n" not in summary, f"{path}: its summary in `edgekit --help` is broken over lines"
        negatives = [o for p in cmd.params for o in p.secondary_opts]
        assert set(negatives) <= {"--no-repair"}, f"{path}: {negatives}"


def test_every_option_and_argument_of_every_command_is_explained_in_its_help_and_json_is_everywhere():
    """`edgekit tune --help` listed --rounds, --parallel and --trust-new-hosts with no word on what they do."""
    import typer.main

    from edge_kit.cli import compile, fleet, loop, rollout  # noqa: F401  (each registers its commands)
    from edge_kit.cli.app import app

    def leaves(group, path):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                yield from leaves(cmd, f"{path} {name}")
            else:
                yield f"{path} {name}", cmd

    unexplained, without_json = [], []
    for path, cmd in leaves(typer.main.get_command(app), "edgekit"):
        unexplained += [f"{path} {p.opts[0]}" for p in cmd.params if not (getattr(p, "help", None) or "").strip()]
        if not any("--json" in p.opts for p in cmd.params):
            without_json.append(path)
    assert unexplained == [] and without_json == []


@pytest.mark.parametrize("args", [["bench", "--device", "d1", "--timeout", "inf"],
                                  ["tune", "--artifacts", "a", "--timeout", "inf"],
                                  ["monitor", "--silence-s", "inf"],
                                  ["rollout", "start", "a", "--store", "http://s", "--wave-timeout", "inf"]])
def test_an_infinite_number_is_refused_like_any_bad_value(args, edgekit):
    """`inf` passes a lower bound; a wait on it was an OverflowError traceback after the command was sent."""
    result = edgekit("pass", *args, "--fleet", "fleet.yaml", "--json")
    assert result.returncode == 2
    error = json.loads(result.stdout)["error"]
    assert ": inf: give a finite number (see `edgekit " in error
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("args, option", [(["compile", "m.keras", "--timeout", "nan"], "--timeout"),
                                          (["monitor", "--fleet", "fleet.yaml", "--duration", "nan"], "--duration"),
                                          (["monitor", "--fleet", "fleet.yaml", "--silence-s", "NaN"], "--silence-s"),
                                          (["shadow", "--fleet", "fleet.yaml", "--device", "d1", "--share", "nan"],
                                           "--share"),
                                          (["rollout", "abort", "r1", "--fleet", "fleet.yaml", "--wait", "-inf"], "--wait")])
def test_nan_is_refused_as_not_finite_naming_the_option(args, option, edgekit):
    """Typer checks an option's min/max before its callback: `--timeout nan` was refused as "should be less than
    or equal to 86400" and `--duration nan` as "greater than or equal to 0", which no NaN is told to fix."""
    result = edgekit("pass", *args, "--json")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    error = json.loads(result.stdout)["error"]
    assert error.startswith(f"Invalid value for '{option}': ") and ": give a finite number (see `edgekit " in error


def test_a_bounded_number_option_still_refuses_what_is_out_of_range_and_shows_its_range(edgekit):
    result = edgekit("pass", "monitor", "--fleet", "fleet.yaml", "--duration", "-1", "--json")
    assert result.returncode == 2
    assert json.loads(result.stdout)["error"] == ("Invalid value for '--duration': -1: give a number greater than or "
                                                  "equal to 0 (see `edgekit monitor --help`)")
    helped = subprocess.run([sys.executable, "-m", "edge_kit", "bench", "--help"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "COLUMNS": "250"})
    assert "Seconds to wait for the record. [1<=x<=86400]" in helped.stdout


@pytest.mark.parametrize("args, option, bound", [
    (["bench", "--device", "d1", "--timeout", "1e300"], "--timeout", "86400"),
    (["bench", "--device", "d1", "--min-seconds", "601"], "--min-seconds", "600"),
    (["bench", "--device", "d1", "--min-runs", "99999999999"], "--min-runs", "1000000"),
    (["tune", "--artifacts", "a", "--min-seconds", "1e9"], "--min-seconds", "600"),
    (["tune", "--artifacts", "a", "--timeout", "1e12"], "--timeout", "86400"),
    (["deploy", "--artifacts", "a", "--health-timeout", "90000"], "--health-timeout", "86400"),
    (["keys", "rotate", "--timeout", "1e300"], "--timeout", "86400"),
    (["rollout", "start", "a", "--store", "http://s", "--wave-timeout", "1e300"], "--wave-timeout", "86400"),
    (["deploy", "--artifacts", "a", "--gate", "live", "--gate-window", "1e300"], "--gate-window", "86400")])
def test_a_number_beyond_what_the_agent_or_a_wait_takes_is_refused_before_anything_is_sent(args, option, bound,
                                                                                            edgekit):
    """`bench --timeout 1e300` sent the command, then died in its wait (OverflowError traceback); `bench
    --min-seconds 601` was the agent's refusal, exit 1, naming its argument 'min_seconds' instead of the option;
    `deploy --health-timeout 90000` failed every device (its activation expired beyond the day the agent takes)."""
    result = edgekit("pass", *args, "--fleet", "fleet.yaml", "--json")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    error = json.loads(result.stdout)["error"]
    assert f"'{option}'" in error and f"less than or equal to {bound}" in error


@pytest.mark.parametrize("args, error", [
    (["--canary", "0%"], "--canary 0%: give a share above 0 (e.g. 10%), or leave --canary out to deploy to every "
                         "device at once"),
    (["--canary", "10%", "--gate", "live", "--gate-shadow", "0.5", "--gate-min-snr-db", "nan"],
     "Invalid value for '--gate-min-snr-db': nan: give a finite number (see `edgekit deploy --help`)")])
def test_a_canary_of_nothing_or_a_nan_fidelity_bound_is_refused(tmp_path, args, error, edgekit):
    """`deploy --canary 0%` deployed to every device at once (a share of 0 read as no --canary), and
    `--gate-min-snr-db nan` was taken: a bound no live SNR is ever below, so fidelity never rolled back."""
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: f\ndevices: [{name: a, host: h, user: u, profile: rpi4}]\n")
    from edge_kit.manifest import Manifest

    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "manifest.json").write_text(Manifest(created="2026-11-29T00:00:00+00:00", model={"name": "m"},
                                                             versions={}, profiles={}, artifacts=[]).to_json())
    result = edgekit("pass", "deploy", "--fleet", str(fleet_file), "--artifacts", str(tmp_path / "art"), *args, "--json")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert json.loads(result.stdout)["error"] == error


def test_a_renamed_option_names_its_new_spelling(edgekit):
    """`fleet status --no-broker` (renamed --history-only) said only "No such option": a script's author was left
    guessing. The old spelling is refused (exit 2, one line) naming the new one; elsewhere it is unknown as before."""
    result = edgekit("pass", "fleet", "status", "--fleet", "fleet.yaml", "--no-broker", "--json")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert json.loads(result.stdout)["error"] == ("--no-broker was renamed --history-only; give --history-only instead "
                                                  "(see `edgekit fleet status --help`)")
    other = edgekit("pass", "monitor", "--fleet", "fleet.yaml", "--no-broker", "--json")
    error = json.loads(other.stdout)["error"]  # click may add "(Possible options: ...)" from the options it has
    assert error.startswith("No such option: --no-broker (") and error.endswith("(see `edgekit monitor --help`)")
    assert "history-only" not in error


def _help_pages(columns: int):
    """Yield (command path, click command, its --help as rendered at ``columns``) for edgekit and every command."""
    import typer.main
    from typer.testing import CliRunner

    from edge_kit.cli import compile, fleet, history, loop, rollout  # noqa: F401  (each registers its commands)
    from edge_kit.cli.app import app

    def commands(group, path):
        yield path, group
        for name, cmd in getattr(group, "commands", {}).items():
            yield from commands(cmd, [*path, name])

    for path, cmd in commands(typer.main.get_command(app), []):
        shown = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(columns), "NO_COLOR": "1"},
                                   prog_name="edgekit")
        assert shown.exit_code == 0, (path, shown.output)
        yield path, cmd, shown.output


def test_every_commands_help_shows_its_flags_as_plain_flags():
    """typer 0.29's help showed `--json <bool>`, `--open <bool>`, `--help <bool>`: a value to give, for flags that
    take none; `--profile <list[str]>` for an option given once per value; `Usage: edgekit compile [OPTIONS] {model}`,
    braces to type. Every command's help is rendered, and each flag's row holds the flag and then its help text."""
    import re

    checked = 0
    for path, cmd, output in _help_pages(400):
        rows = [" ".join(line.strip("│ ").split()) for line in output.splitlines()]
        usage = next(r for r in rows if r.startswith("Usage: "))
        words = r"( COMMAND \[ARGS\]\.\.\.| [A-Z_]{4,}(\.\.\.)?)*"  # an argument is a word: MODEL, ROLLOUT_ID, not RID
        assert re.fullmatch(r"Usage: edgekit[ a-z-]* \[OPTIONS\]" + words, usage), usage
        assert "<list[" not in output and "<bool>" not in output, path
        flags = [(p.opts[0], p.help) for p in cmd.params if getattr(p, "is_flag", False)]
        for opt, text in [*flags, ("--help", "Show this message and exit.")]:
            row = next((r for r in rows if r.startswith(opt + " ")), None)
            assert row is not None, (path, opt)
            first_words = " ".join(text.split()[:2])
            assert re.fullmatch(rf"{re.escape(opt)}( -\w)?( --no-[a-z-]+)? {re.escape(first_words)}.*", row), (path, row)
            checked += 1
    assert checked > 60  # every command's --help and --json at least


def test_every_commands_description_is_wrapped_by_the_terminal_not_by_its_docstring():
    """At 80 columns `edgekit deploy --help` read "(latency against the control" / "devices by a one-sided ...": each
    docstring line break was kept inside a wrapped paragraph. Every line of a description but a paragraph's last now
    fills the width."""
    ragged = []
    for path, _cmd, output in _help_pages(80):
        text = output.split("╭")[0].split("\n")
        lines = [line.strip() for line in text[text.index(next(t for t in text if "Usage:" in t)) + 2:]]
        for line, after in zip(lines, lines[1:]):
            if line and after and len(line) < 60:  # a line the paragraph goes on after, that does not fill the width
                ragged.append(f"edgekit {' '.join(path)}: {line!r}")
    assert ragged == []


def test_a_missing_argument_is_named_as_the_usage_line_and_the_help_name_it(run_cli):
    """The usage line said `edgekit compile [OPTIONS] MODEL`, the error for it "Missing argument 'model'" and the help's
    argument panel "model": three spellings of one name. All say MODEL now."""
    import re

    for path, argument in ((["compile"], "MODEL"), (["fleet", "revoke"], "DEVICE"),
                           (["rollout", "status"], "ROLLOUT_ID")):
        code, out, err = run_cli(*path)
        assert code == 2 and err == (f"edgekit: error: Missing argument '{argument}' (see `edgekit {' '.join(path)} "
                                     "--help`)\n"), (path, err)
        code, out, err = run_cli(*path, "--help")
        rows = [" ".join(line.strip("│ ").split()) for line in out.splitlines()]
        assert re.fullmatch(rf"Usage: edgekit {' '.join(path)} \[OPTIONS\] {argument}", next(
            r for r in rows if r.startswith("Usage: "))), rows
        assert any(re.match(rf"\* {argument} <", r) for r in rows), rows


@pytest.mark.parametrize("args", [("profiles", "list"), ("profiles", "list", "--json"),
                                  ("profiles", "show", "rpi-4", "--json")],
                         ids=["table", "json", "json-error"])
def test_output_whose_reader_has_gone_ends_quietly_with_exit_141(args):
    """`edgekit history alerts | head -1`, `edgekit fleet status --json | head -c 10`: once `head` had read what it
    wanted, the next write ended in a BrokenPipeError traceback (an error's JSON, or --json's document), or exit 1
    (rich's tables). Now as git and ls: exit 141 (128 + SIGPIPE), nothing on stderr but an error's own line. A failure
    keeps its own exit code (2 here): its error document cut by the gone reader made `--json | head -c 10` exit 141, so
    a script under `set -o pipefail` could not tell a failed command from a cut listing."""
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the first write: what `| head -1` makes of every later one
    try:
        code = f"import sys; sys.argv = ['edgekit', *{list(args)!r}]; from edge_kit.cli import main; main()"
        result = subprocess.run([sys.executable, "-c", code], stdout=write, stderr=subprocess.PIPE, text=True,
                                timeout=120)
    finally:
        os.close(write)
    assert result.returncode == (2 if "rpi-4" in args else 141), result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    if "rpi-4" in args:  # the error's line is said first, on stderr: seen all the same
        assert result.stderr.startswith("edgekit: error: unknown profile 'rpi-4'") and result.stderr.count("\n") == 1
    else:
        assert result.stderr == ""


def test_a_commands_own_exit_1_is_kept_when_its_reader_has_gone():
    """An exit 1 the command chose (`edgekit rollout start` when devices stayed silent) became exit 141 whenever stdout's
    reader had gone by then: only rich's and typer's exit 1 for a failed write means the output was cut."""
    read, write = os.pipe()
    os.close(read)
    try:
        code = ("import sys, typer\nfrom edge_kit.cli import main\nfrom edge_kit.cli.app import app\n"
                "@app.command('exits-one')\ndef exits_one() -> None:\n    raise typer.Exit(1)\n"
                "sys.argv = ['edgekit', 'exits-one']\nmain()\n")
        result = subprocess.run([sys.executable, "-c", code], stdout=write, stderr=subprocess.PIPE, text=True,
                                timeout=120)
    finally:
        os.close(write)
    assert result.returncode == 1 and result.stderr == "", (result.returncode, result.stderr)


@pytest.mark.parametrize("args, line", [
    (("sim", "down", "--dir", "{long}"), "nothing is up in {long}"),
    (("history", "upgrade", "--history", "{long}/h.db"), "{long}/h.db: schema version {schema}, up to date"),
], ids=["sim-down", "history-upgrade"])
def test_a_summary_naming_a_path_is_one_line_on_an_80_column_terminal(tmp_path, args, line):
    """rich wrapped a command's one-line summary on an 80-column terminal, in the middle of the path it names (which
    a user copies). Each is one line now, whatever its length."""
    from edge_kit.telemetry.store import SCHEMA_VERSION, Store

    long = tmp_path / ("a-folder-name-long-enough-to-wrap-" * 3)
    long.mkdir()
    Store(long / "h.db").close()
    code = "import sys; sys.argv = ['edgekit', *sys.argv[1:]]; from edge_kit.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", code, *(a.format(long=long) for a in args)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "COLUMNS": "80", "NO_COLOR": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == line.format(long=long, schema=SCHEMA_VERSION) + "\n"
