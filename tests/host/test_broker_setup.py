"""`edgekit fleet init`: the wall's files and modes, and no half-written wall after a failure."""

from __future__ import annotations

import json

import pytest
import yaml

from edge_kit.fleet import broker_setup

FLEET = {"fleet": "plant", "broker": {"host": "127.0.0.1", "port": 8883}, "defaults": {"user": "pi"},
         "devices": [{"name": "cam-1", "host": "10.0.0.2", "profile": "rpi4"}]}


@pytest.fixture(autouse=True)
def broker_cleared(monkeypatch):
    """`fleet revoke` clears the device's retained messages at the fleet's broker, which these tests of the wall's
    files do not run (tests/integration/test_revoke.py clears them on a real Mosquitto; test_fleet_client.py has the
    broker that cannot be reached): said cleared."""
    from edge_kit.loop import revoke

    monkeypatch.setattr(revoke, "clear_retained", lambda fleet, device: "its retained messages cleared (no broker here)")


def test_a_bad_broker_host_is_one_line_and_leaves_nothing_behind(tmp_path, run_cli):
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump(FLEET))
    for host in ("bücher.example", "-oProxyCommand=x", "a b"):
        code, out, err = run_cli("fleet", "init", "--fleet", fleet_file, "--broker-host", "127.0.0.1",
                                 "--broker-host", host, "--out", tmp_path / "wall")
        assert code == 2 and f"--broker-host {host!r}" in err and "Traceback" not in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["fleet.yaml"]  # no secrets, no partial folder
    code, out, err = run_cli("fleet", "init", "--fleet", fleet_file, "--broker-host", "xn--bcher-kva.example",
                             "--out", tmp_path / "wall")
    assert code == 0, err


def test_an_out_that_is_a_file_or_cannot_be_made_is_one_line(tmp_path, run_cli):
    """`fleet init --out FILE` raised NotADirectoryError, and an --out under a folder that cannot be created
    FileNotFoundError: tracebacks, nothing on stdout with --json."""
    import json

    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump(FLEET))
    (tmp_path / "a-file").write_text("mine")
    for out_dir, why in ((tmp_path / "a-file", f"{tmp_path}/a-file: a file, not a folder; choose another --out"),
                         (tmp_path / "a-file" / "wall", f"{tmp_path}/a-file: cannot write the broker's files there (")):
        code, out, err = run_cli("fleet", "init", "--fleet", fleet_file, "--broker-host", "h", "--out", out_dir, "--json")
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert json.loads(out)["error"].startswith(why)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "fleet.yaml"]
    assert (tmp_path / "a-file").read_text() == "mine"


def test_an_interrupted_init_leaves_no_wall_and_the_next_one_writes_it_with_private_modes(tmp_path, monkeypatch):
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(broker_setup, "make_tls", interrupted)  # after the passwords were written
        with pytest.raises(KeyboardInterrupt):
            broker_setup.write_fleet_wall(tmp_path / "wall", "plant", ["cam-1"], ["127.0.0.1"])
    assert list(tmp_path.iterdir()) == []
    wall = broker_setup.write_fleet_wall(tmp_path / "wall", "plant", ["cam-1"], ["127.0.0.1"])
    folder = tmp_path / "wall"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wall"]
    assert wall.password_files["cam-1"] == folder / "secrets" / "cam-1.pass" and wall.tls.ca == folder / "tls" / "ca.pem"
    assert wall.password_files["cam-1"].read_text().strip() == wall.users["cam-1"]
    modes = {p: (folder / p).stat().st_mode & 0o777 for p in ("secrets", "secrets/cam-1.pass", "secrets/operator.pass",
                                                              "passwd", "tls/server.key", "data")}
    assert modes == {"secrets": 0o700, "secrets/cam-1.pass": 0o600, "secrets/operator.pass": 0o600, "passwd": 0o600,
                     "tls/server.key": 0o600, "data": 0o700}
    assert f"password_file {folder / 'passwd'}" in (folder / "mosquitto.conf").read_text()
    with pytest.raises(FileExistsError):
        broker_setup.write_fleet_wall(folder, "plant", ["cam-1"], ["127.0.0.1"])


def test_fleet_revoke_with_broker_dir_removes_the_device_s_user_from_the_wall_written_by_fleet_init(tmp_path, run_cli):
    """Stopping a compromised device at a real fleet's broker meant editing `passwd` by hand. `fleet revoke
    --broker-dir` removes its line (atomically, mode 600 kept) and says the broker must reload it; a wrong folder is
    one line and revokes nothing; without the folder the user is left and the line says what to do."""
    from device_agents.identity import Signer
    from edge_kit.fleet.inventory import load_fleet

    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump({**FLEET, "devices": [*FLEET["devices"],
                                                               {"name": "cam-2", "host": "10.0.0.3", "profile": "rpi4"}]}))
    wall = tmp_path / "wall"
    code, out, err = run_cli("fleet", "init", "--fleet", fleet_file, "--broker-host", "127.0.0.1", "--out", wall)
    assert code == 0, err
    settings = yaml.safe_load((wall / "fleet-broker.yaml").read_text())  # pasted into the fleet file, as it says
    data = yaml.safe_load(fleet_file.read_text())
    data["broker"] = settings["broker"]
    for dev in data["devices"]:
        dev["agent_broker"] = settings["agent_broker"][dev["name"]]
    fleet_file.write_text(yaml.safe_dump(data))
    keys = load_fleet(fleet_file).key_store()
    keys.register_many({"cam-1": Signer.generate().public, "cam-2": Signer.generate().public})
    code, out, err = run_cli("fleet", "revoke", "cam-1", "--fleet", fleet_file, "--broker-dir", tmp_path / "nowhere")
    assert code == 2 and "no passwd file there" in err and len(err.strip().splitlines()) == 1, err
    assert set(keys.devices()) == {"cam-1", "cam-2"}
    before = (wall / "passwd").read_text().splitlines()
    code, out, err = run_cli("fleet", "revoke", "cam-1", "--fleet", fleet_file, "--broker-dir", wall, "--json")
    assert code == 0, err
    done = json.loads(out)
    assert done["newly_revoked"] and "removed its broker user 'cam-1'" in done["broker"]
    assert "systemctl reload mosquitto" in done["broker"]
    assert (wall / "passwd").read_text().splitlines() == [x for x in before if not x.startswith("cam-1:")]
    assert (wall / "passwd").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in wall.iterdir() if p.name.startswith(".")) == []  # no temporary file left
    code, out, err = run_cli("fleet", "revoke", "cam-2", "--fleet", fleet_file)
    assert code == 0 and "its broker user 'cam-2' is untouched: remove it at your broker" in " ".join(out.split()), out
    assert any(x.startswith("cam-2:") for x in (wall / "passwd").read_text().splitlines())
    broker_setup.add_broker_user(wall / "passwd", "cam-1", "fresh")  # the way back (deploy --new-key)
    lines = (wall / "passwd").read_text().splitlines()
    assert [x.split(":")[0] for x in lines].count("cam-1") == 1 and lines[-1].startswith("cam-1:$7$")


def test_a_passwd_that_cannot_be_rewritten_leaves_the_key_revoked_and_says_what_is_left_in_one_line(
        tmp_path, run_cli, monkeypatch):
    """A `passwd` that could not be rewritten (a full disk, a read-only mount) after the key was revoked ended
    `fleet revoke` in a traceback, leaving the operator unsure what was done. Now the key stays revoked and one
    line says the broker user is left and what to do there, exit 4 (the command's "partly done")."""
    from device_agents.identity import Signer
    from edge_kit.fleet.inventory import load_fleet

    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump(FLEET))
    wall = tmp_path / "wall"
    assert run_cli("fleet", "init", "--fleet", fleet_file, "--broker-host", "127.0.0.1", "--out", wall)[0] == 0
    data = yaml.safe_load(fleet_file.read_text())
    data["devices"][0]["agent_broker"] = yaml.safe_load((wall / "fleet-broker.yaml").read_text())["agent_broker"]["cam-1"]
    fleet_file.write_text(yaml.safe_dump(data))
    keys = load_fleet(fleet_file).key_store()
    keys.register_many({"cam-1": Signer.generate().public})
    before = (wall / "passwd").read_bytes()

    def full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(broker_setup, "_rewrite_passwd", full)
    code, out, err = run_cli("fleet", "revoke", "cam-1", "--fleet", fleet_file, "--broker-dir", wall)
    assert code == 4 and len(err.strip().splitlines()) == 1, (out, err)
    assert "its broker user 'cam-1' could not be removed" in err and "No space left on device" in err
    assert "mosquitto_passwd -D passwd cam-1" in " ".join(err.split())
    assert keys.devices() == {} and [e["device"] for e in keys.revoked()] == ["cam-1"]
    assert (wall / "passwd").read_bytes() == before
    code, out, _ = run_cli("fleet", "revoke", "cam-1", "--fleet", fleet_file, "--broker-dir", wall, "--json")
    assert code == 4 and json.loads(out)["broker_failed"] is True


_SLOW_REMOVE = r"""
import sys, time
from pathlib import Path
from edge_kit.fleet import broker_setup

real = broker_setup.write_private

def slow(path, data):  # another command removing a user, between its read of passwd and its write
    print("read", flush=True)
    time.sleep(1.5)
    real(path, data)

broker_setup.write_private = slow
broker_setup.remove_broker_user(Path(sys.argv[1]), "pi-1")
"""


def test_two_commands_changing_the_broker_s_passwd_at_once_keep_both_changes(tmp_path):
    """passwd was read, changed and renamed over without a lock: `fleet revoke pi-1` and `fleet revoke pi-2` (or a
    `deploy --new-key` adding a user back) at once each wrote its change over the other's, and the user one of them
    removed was in the broker's passwd again."""
    import os
    import subprocess
    import sys

    passwd = tmp_path / "passwd"
    passwd.write_text("".join(broker_setup.mosquitto_password_line(u, "pw") + "\n" for u in ("pi-1", "pi-2", "pi-3")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", _SLOW_REMOVE, str(passwd)], stdout=subprocess.PIPE, text=True,
                             env=env)
    try:
        assert child.stdout.readline().strip() == "read"  # the other command has read passwd, not yet written it
        assert broker_setup.remove_broker_user(passwd, "pi-2")  # waits for it, then reads what it wrote
    finally:
        assert child.wait(60) == 0
    assert [line.split(":", 1)[0] for line in passwd.read_text().splitlines()] == ["pi-3"]


def test_revoking_a_device_that_shares_its_agent_broker_user_with_another_leaves_that_user(tmp_path, run_cli):
    """`fleet revoke` removed the revoked device's agent_broker user from passwd whenever it was not the fleet's own
    broker user: two devices given one agent_broker username (a group's) lost it both, the one not revoked locked
    out of the broker. A user other devices connect as is left, and the line names them."""
    from device_agents.identity import Signer
    from edge_kit.fleet.inventory import load_fleet

    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump({**FLEET, "devices": [*FLEET["devices"],
                                                               {"name": "cam-2", "host": "10.0.0.3", "profile": "rpi4"}]}))
    wall = tmp_path / "wall"
    assert run_cli("fleet", "init", "--fleet", fleet_file, "--broker-host", "127.0.0.1", "--out", wall)[0] == 0
    settings = yaml.safe_load((wall / "fleet-broker.yaml").read_text())
    data = yaml.safe_load(fleet_file.read_text())
    data["broker"] = settings["broker"]
    for dev in data["devices"]:
        dev["agent_broker"] = settings["agent_broker"]["cam-1"]  # both connect as cam-1
    fleet_file.write_text(yaml.safe_dump(data))
    keys = load_fleet(fleet_file).key_store()
    keys.register_many({"cam-1": Signer.generate().public, "cam-2": Signer.generate().public})
    before = (wall / "passwd").read_text()
    code, out, err = run_cli("fleet", "revoke", "cam-1", "--fleet", fleet_file, "--broker-dir", wall)
    assert code == 0, err
    assert "it connects as broker user 'cam-1', which other devices use too (cam-2): left in place" in " ".join(out.split()), out
    assert (wall / "passwd").read_text() == before and set(keys.devices()) == {"cam-2"}


def test_deploy_new_key_with_a_passwd_that_is_not_text_is_one_line_naming_it(tmp_path):
    """readmit_broker_users (`deploy --new-key --broker-dir`) read passwd with its own read_text: a file that is not
    UTF-8 ended the deploy in a UnicodeDecodeError traceback, where revoke said which file in one line."""
    from edge_kit.errors import InputError
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.loop.revoke import readmit_broker_users

    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump(FLEET))
    wall = tmp_path / "wall"
    wall.mkdir()
    (wall / "passwd").write_bytes(b"cam-1:$7$\xff\n")
    fleet = load_fleet(fleet_file)
    with pytest.raises(InputError, match=r"^.*wall/passwd: cannot read the broker's password file \(.*utf-8.*\); give "
                                         "--broker-dir"):
        readmit_broker_users(fleet, fleet.devices, wall)
    assert (wall / "passwd").read_bytes() == b"cam-1:$7$\xff\n"


def test_deploy_new_key_readmits_a_revoked_device_only_when_devices_names_it(tmp_path, run_cli, monkeypatch):
    """`deploy --new-key` to the whole fleet gave every device a fresh key and added back the broker user of each one
    `fleet revoke` had removed, a stolen device still in the fleet file too. Now it re-keys the others, and a revoked
    device is readmitted only when --devices names it; otherwise it is skipped, untouched (no key, no broker user), its
    row saying how to readmit it. A tag or `all` does not name it."""
    from types import SimpleNamespace

    from device_agents.identity import Signer
    from edge_kit.fleet import commands
    from edge_kit.fleet import deploy as dp
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.manifest import Artifact, Manifest

    names = ("cam-1", "cam-2", "cam-3")
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump({**FLEET, "devices": [{"name": n, "host": f"10.0.0.{i + 2}", "profile": "rpi4",
                                                                "tags": ["line"]} for i, n in enumerate(names)]}))
    wall = tmp_path / "wall"
    assert run_cli("fleet", "init", "--fleet", fleet_file, "--broker-host", "127.0.0.1", "--out", wall)[0] == 0
    data = yaml.safe_load(fleet_file.read_text())
    for dev in data["devices"]:
        dev["agent_broker"] = yaml.safe_load((wall / "fleet-broker.yaml").read_text())["agent_broker"][dev["name"]]
    fleet_file.write_text(yaml.safe_dump(data))
    keys = load_fleet(fleet_file).key_store()
    keys.register_many({n: Signer.generate().public for n in names})
    keys.revoke("cam-2", "stolen")  # as `fleet revoke --broker-dir` does: the key and the broker user
    broker_setup.remove_broker_user(wall / "passwd", "cam-2")
    artifacts = tmp_path / "art"
    artifacts.mkdir()
    fp32 = Artifact(id="fp32", status="built", profiles=["rpi4"], summary="", precision="float32", runtime="litert",
                    file="fp32.tflite", sha256="0" * 64, bytes=1)
    (artifacts / "manifest.json").write_text(Manifest(created="2026-11-30T00:00:00+00:00", model={"name": "m"},
                                                      versions={}, profiles={"rpi4": {}}, artifacts=[fp32]).to_json())
    deployed: list[str] = []

    def one(self, dev):  # the deploy of one device (its fresh key included), faked: what matters is who gets one
        deployed.append(dev.name)
        return dp.DeviceResult(dev.name, "succeeded", variant="fp32", actions=["device key provisioned (--new-key)"])

    monkeypatch.setattr(dp._Deployer, "one", one)
    monkeypatch.setattr(commands.FleetClient, "of", classmethod(
        lambda cls, fleet, **kw: SimpleNamespace(__enter__=lambda: None, close=lambda: None)))
    users = lambda: broker_setup.broker_users(wall / "passwd")  # noqa: E731
    for selectors in ((), ("--devices", "all"), ("--devices", "tag:line")):
        deployed.clear()
        code, out, err = run_cli("deploy", "--fleet", fleet_file, "--artifacts", artifacts, "--new-key", "--broker-dir",
                                 wall, *selectors, "--json")
        assert code == 0, (selectors, out, err)
        rows = {r["device"]: r for r in json.loads(out)["devices"]}
        assert sorted(deployed) == ["cam-1", "cam-3"] and rows["cam-2"]["status"] == "skipped", (selectors, rows)
        why = rows["cam-2"]["reason"]
        assert why.startswith("cam-2: revoked on ") and "--devices does not name it: not readmitted" in why, why
        assert why.endswith("`edgekit deploy --new-key --devices cam-2` readmits it once you trust it again (re-imaged)")
        assert "cam-2" not in users() and "cam-2" not in err  # its broker user is not added back either
    deployed.clear()
    code, out, err = run_cli("deploy", "--fleet", fleet_file, "--artifacts", artifacts, "--new-key", "--broker-dir",
                             wall, "--devices", "cam-2", "--json")
    assert code == 0 and deployed == ["cam-2"], (out, err)
    assert "cam-2: broker user 'cam-2' added back" in err and "cam-2" in users()


def test_a_wall_written_after_a_revocation_gives_the_revoked_device_no_broker_user(tmp_path, run_cli):
    """`fleet init` (a new wall: a certificate renewed, a broker moved) gave every device of the fleet file a broker
    user and a plain password file, a device `fleet revoke` had taken out too: the stolen device had its way into the
    broker back. It gets none now, as `sim up` does; `deploy --new-key --devices NAME --broker-dir` adds it back."""
    from device_agents.identity import Signer
    from edge_kit.fleet.inventory import load_fleet

    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump({**FLEET, "devices": [*FLEET["devices"],
                                                               {"name": "cam-2", "host": "10.0.0.3", "profile": "rpi4"}]}))
    keys = load_fleet(fleet_file).key_store()
    keys.register_many({"cam-1": Signer.generate().public, "cam-2": Signer.generate().public})
    keys.revoke("cam-2", "stolen")
    wall = tmp_path / "wall"
    code, out, err = run_cli("fleet", "init", "--fleet", fleet_file, "--broker-host", "127.0.0.1", "--out", wall)
    assert code == 0, err
    assert broker_setup.broker_users(wall / "passwd") == {"operator", "cam-1"}
    assert sorted(p.name for p in (wall / "secrets").iterdir()) == ["cam-1.pass", "operator.pass"]
    assert "cam-2: revoked, so given no broker user; `edgekit deploy --new-key --devices cam-2` readmits it" in out, out
    assert "1 device users + 'operator'" in out
    settings = yaml.safe_load((wall / "fleet-broker.yaml").read_text())  # where the readmitting deploy writes one
    assert settings["agent_broker"]["cam-2"]["password_file"] == str(wall / "secrets" / "cam-2.pass")
    code, out, err = run_cli("fleet", "init", "--fleet", fleet_file, "--broker-host", "127.0.0.1", "--out",
                             tmp_path / "wall2", "--json")
    assert code == 0 and json.loads(out)["revoked"] == ["cam-2"] and json.loads(out)["users"] == ["cam-1", "operator"]


def test_fleet_init_s_lines_are_never_wrapped_on_an_80_column_terminal(tmp_path):
    """On an 80-column terminal rich wrapped `fleet init`'s summary before the mosquitto.conf path of the command
    to run (and a long path of the files above it): copied, the command lost its path. Each is one line now."""
    import os
    import subprocess
    import sys

    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump(FLEET))
    wall = tmp_path / ("a-long-folder-name-for-the-broker-wall-of-this-plant" * 2)
    code = ("import sys; sys.argv = ['edgekit', 'fleet', 'init', '--fleet', sys.argv[1], '--broker-host', 'h', "
            "'--out', sys.argv[2]]; from edge_kit.cli import main; main()")
    done = subprocess.run([sys.executable, "-c", code, str(fleet_file), str(wall)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "80", "NO_COLOR": "1"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f" mosquitto.conf  {wall}/mosquitto.conf" and len(lines) == 6, lines
    assert lines[-1] == (f"1 device users + 'operator'; passwords in {wall}/secrets (mode 600). Run the broker with: "
                         f"mosquitto -c {wall}/mosquitto.conf")
