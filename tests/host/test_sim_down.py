"""Stopping a simulated fleet finishes even when Ctrl-C comes in the middle (it often comes while a run
cleans up), so nothing is left running; the interrupt is raised after."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from edge_kit.sim import fleet as simfleet


def test_ctrl_c_while_the_simulated_fleet_stops_leaves_nothing_running(tmp_path, monkeypatch):
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    sim = simfleet.SimFleet(tmp_path)
    sim._save({"broker": {"kind": "mosquitto", "host": "127.0.0.1", "port": 1, "pid": procs[0].pid}, "links": None,
               "devices": [{"name": f"d{i}", "sshd_pid": p.pid, "root": str(tmp_path / f"d{i}")}
                           for i, p in enumerate(procs[1:])]})
    real = simfleet.terminate_pid
    presses = []

    def ctrl_c_then_stop(pid, *args, **kwargs):
        if not presses:
            presses.append(pid)
            os.kill(os.getpid(), signal.SIGINT)  # the operator presses Ctrl-C as the first process stops
        real(pid, *args, **kwargs)

    monkeypatch.setattr(simfleet, "terminate_pid", ctrl_c_then_stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            sim.down()
        for p in procs:
            p.wait(timeout=10)  # stopped (terminate_pid reaps its own children)
        assert sim.state() is None
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        for p in procs:
            p.kill()


def test_sim_down_stops_only_the_processes_sim_up_started_not_others_given_their_pids(tmp_path):
    """After a reboot (or once they exited), the pids a simulated fleet recorded may belong to other
    processes: sim down sent them SIGTERM, then SIGKILL. Now a pid is stopped only while it is still the
    process started then (its start time), and the agents are this root's supervisors found by their command
    line (agent.pid may name another process, or not yet the one a deploy just started: a leaked agent)."""
    import sys

    from edge_kit.sim.process import started_at

    root = tmp_path / "d0"
    root.mkdir()
    ours = subprocess.Popen(["sleep", "60"])
    other = subprocess.Popen(["sleep", "60"])  # took a pid sim up had recorded for a process since gone
    supervisor, restarted = (subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "supervise",
                                               "--pidfile", f"{root}/agent.pid"]) for _ in range(2))
    stranger = subprocess.Popen(["sleep", "60"])  # agent.pid of another device root names it
    (root / "agent.pid").write_text(f"{supervisor.pid}\n")  # `restarted` has not written it yet (a deploy just ended)
    (tmp_path / "d1").mkdir()
    (tmp_path / "d1" / "agent.pid").write_text(f"{stranger.pid}\n")
    (tmp_path / "sim").mkdir()
    sim = simfleet.SimFleet(tmp_path / "sim")
    sim._save({"broker": {"kind": "mosquitto", "pid": ours.pid, "started": started_at(ours.pid)}, "links": None,
               "devices": [{"name": "d0", "root": str(root), "sshd_pid": other.pid,
                            "sshd_started": started_at(other.pid) - 1},
                           {"name": "d1", "root": str(tmp_path / "d1"), "sshd_pid": None}]})
    try:
        sim.down()
        assert all(p.wait(timeout=10) is not None for p in (ours, supervisor, restarted))
        assert other.poll() is None and stranger.poll() is None  # left alone
    finally:
        for p in (ours, other, supervisor, restarted, stranger):
            p.kill()
            p.wait()


def test_a_process_that_exited_but_is_not_reaped_yet_is_not_waited_for():
    """A stopped process's pid lingers as a zombie until its parent, or the init that inherited it, reaps it; an
    init that reaps now and then (a container's, a VM's) held every supervisor `sim down` stopped for 1.5 s more."""
    import sys
    import time

    from device_agents.disk import pid_alive
    from edge_kit.sim.process import terminate_pid

    done = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for _ in range(200):  # exited: a zombie until reaped (this process does not reap it yet)
            stat = open(f"/proc/{done.pid}/stat", "rb").read()
            if stat[stat.rfind(b")") + 2:][:1] == b"Z":
                break
            time.sleep(0.01)
        else:
            pytest.fail("the process did not exit")
        assert not pid_alive(done.pid)
        assert terminate_pid(done.pid) is False  # nothing to stop, nothing waited for
        assert pid_alive(os.getpid())
    finally:
        done.wait()


def test_the_agents_of_a_simulated_fleet_are_stopped_together(tmp_path):
    """Each agent takes a moment to say offline when stopped: three supervisors that each take 2 s are stopped in
    about 2 s, not 6."""
    import sys
    import time

    slow = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *_: (time.sleep(2), sys.exit(0)))\n"
            "print('ready', flush=True)\ntime.sleep(60)\n")
    roots = [tmp_path / f"d{i}" for i in range(3)]
    supervisors = [subprocess.Popen([sys.executable, "-c", slow, "supervise", "--pidfile", f"{root}/agent.pid"],
                                    stdout=subprocess.PIPE, text=True) for root in roots]
    try:
        for p in supervisors:
            assert p.stdout.readline().strip() == "ready"  # its SIGTERM handler is in place
        (tmp_path / "sim").mkdir()
        sim = simfleet.SimFleet(tmp_path / "sim")
        sim._save({"broker": None, "links": None,
                   "devices": [{"name": r.name, "root": str(r), "sshd_pid": None} for r in roots]})
        started = time.monotonic()
        down = sim.down()
        took = time.monotonic() - started
        assert all(p.wait(timeout=10) == 0 for p in supervisors)  # each ended by its own handler, not killed
        assert sorted(down.stopped) == ["agent d0", "agent d1", "agent d2"]
        assert 2 <= took < 4.5, took
    finally:
        for p in supervisors:
            p.kill()
            p.wait()


def test_started_at_tells_a_running_process_from_none():
    from edge_kit.sim.process import started_at

    assert isinstance(started_at(os.getpid()), int) and started_at(os.getpid()) == started_at(os.getpid())
    assert started_at(None) is None and started_at(2 ** 22 + 12345) is None


@pytest.mark.parametrize("content", [b"", b"[1]", b'{"devices": [1]}', b"\x82\xff not text"])
def test_a_damaged_sim_json_is_one_line_not_nothing_is_up(tmp_path, run_cli, content):
    """`sim down` on a sim.json holding `[1]` raised TypeError (a traceback); on an empty or garbled one it said
    "nothing is up" and exited 0 while the processes it had recorded kept running (and `sim up` started a
    second fleet over it). Now both say which file cannot be read and what to do, exit 2, and stop nothing."""
    (tmp_path / "sim.json").write_bytes(content)
    for command in (["sim", "down"], ["sim", "up", "--devices", "1"]):
        code, out, err = run_cli(*command, "--dir", tmp_path, "--json")
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert json.loads(out)["error"].startswith(f"{tmp_path}/sim.json: unreadable (")
        assert "stop its broker, sshd and agent processes by hand" in err
    assert (tmp_path / "sim.json").read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim.json"]


def test_sim_down_where_nothing_was_started_says_so(tmp_path, run_cli):
    code, out, err = run_cli("sim", "down", "--dir", tmp_path / "none", "--json")
    assert code == 0 and json.loads(out) == {"stopped": [], "not_running": []}


def test_sim_down_on_a_file_is_one_line_not_nothing_is_up(tmp_path, run_cli):
    """`sim down --dir FILE` said "nothing is up in FILE", exit 0: a mistyped --dir read as a fleet stopped."""
    (tmp_path / "notes").write_text("x")
    code, out, err = run_cli("sim", "down", "--dir", tmp_path / "notes", "--json")
    assert code == 2 and err.count("\n") == 1
    assert json.loads(out)["error"] == (f"{tmp_path / 'notes'}: a file, not a folder; give --dir the simulated fleet's "
                                        "folder (default .edgekit-sim)")
    assert (tmp_path / "notes").read_text() == "x"


def test_sim_down_says_a_broker_that_had_already_died_was_not_running_and_still_cleans_up(tmp_path, run_cli):
    """A broker that had crashed was listed as "stopped" by `sim down`; now what had already ended is said so,
    and the rest is stopped and the record removed all the same."""
    from edge_kit.sim.process import started_at

    dead, sshd = subprocess.Popen(["sleep", "60"]), subprocess.Popen(["sleep", "60"])
    dead_started = started_at(dead.pid)
    dead.kill()
    dead.wait()
    sim = simfleet.SimFleet(tmp_path)
    sim._save({"broker": {"kind": "mosquitto", "pid": dead.pid, "started": dead_started}, "links": None,
               "devices": [{"name": "d0", "root": str(tmp_path / "d0"), "sshd_pid": sshd.pid,
                            "sshd_started": started_at(sshd.pid)}]})
    try:
        code, out, err = run_cli("sim", "down", "--dir", tmp_path, "--json")
        assert code == 0, err
        assert json.loads(out) == {"stopped": ["sshd d0"], "not_running": ["agent d0", "broker (mosquitto)"]}
        assert sshd.wait(timeout=10) is not None and sim.state() is None
    finally:
        sshd.kill()
        sshd.wait()


@pytest.mark.parametrize("command", [["sim", "up", "--devices", "1"], ["demo", "--devices", "1"]])
def test_a_dir_that_is_a_file_or_cannot_be_made_is_one_line_and_starts_nothing(tmp_path, run_cli, command):
    """`sim up --dir /no/such/x` and `demo --dir FILE` raised FileNotFoundError / FileExistsError (tracebacks)."""
    (tmp_path / "a-file").write_text("mine")
    for folder in (tmp_path / "a-file", tmp_path / "a-file" / "sim"):
        code, out, err = run_cli(*command, "--dir", folder, "--json")
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert json.loads(out)["error"].endswith("; choose another with --dir")
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"] and (tmp_path / "a-file").read_text() == "mine"


@pytest.mark.parametrize("options, error", [
    (["--store", "{tmp}/nope"], "{tmp}/nope: no such store folder; run `edgekit publish ARTIFACTS --store {tmp}/nope` first"),
    (["--store", "{tmp}/a-file"], "{tmp}/a-file: not a folder; run `edgekit publish ARTIFACTS --store {tmp}/a-file` first"),
    (["--embedded-broker"], "the embedded broker has no credentials, ACL or TLS: install Mosquitto (apt install "
                            "mosquitto), or pass --insecure to run it anonymous and plain")])
def test_sim_up_refuses_a_bad_store_or_broker_choice_before_starting_anything(tmp_path, run_cli, options, error):
    """`sim up --store nope` started the broker, then failed, leaving broker/ and broker-wall/ (its secrets) in
    --dir; `--embedded-broker` without --insecure (a bad choice of options) exited 1, not 2."""
    (tmp_path / "a-file").write_text("x")
    code, out, err = run_cli("sim", "up", "--devices", "1", "--dir", tmp_path / "sim",
                             *[o.format(tmp=tmp_path) for o in options], "--json")
    assert code == 2 and json.loads(out)["error"] == error.format(tmp=tmp_path), err
    assert not (tmp_path / "sim").exists()


def test_sim_up_never_replaces_a_fleet_file_it_did_not_write(tmp_path, run_cli):
    """`sim up --dir .` in a real fleet's folder replaced its fleet.yaml (and known_hosts) with the simulated
    fleet's; now a fleet file that is not a simulated one is refused before anything starts."""
    real = "fleet: plant\ndevices: [{name: a, host: h, user: u, profile: rpi4}]\n"
    (tmp_path / "fleet.yaml").write_text(real)
    code, out, err = run_cli("sim", "up", "--devices", "1", "--dir", tmp_path, "--json")
    assert code == 2 and json.loads(out)["error"] == (f"{tmp_path}/fleet.yaml: a fleet file `edgekit sim up` did not "
                                                      "write (not simulated), which it would replace; choose another --dir")
    assert (tmp_path / "fleet.yaml").read_text() == real and [p.name for p in tmp_path.iterdir()] == ["fleet.yaml"]


def test_sim_up_after_a_device_was_revoked_starts_the_others_and_leaves_it_out(tmp_path, monkeypatch):
    """`sim down` keeps the folder's keys; after `fleet revoke` of a simulated device, `sim up` in that folder started
    the agent on every device: the deploy refused the revoked one (its key is revoked) and the whole fleet was torn
    down again, so no simulated fleet could be started there. It is now left out, and `up` says which."""
    import contextlib
    from types import SimpleNamespace

    from device_agents.identity import Signer
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.fleet.keys import KeyRevoked

    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: sim\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: u, profile: rpi4}\n"
                          "devices:\n" + "".join(f"  - {{name: {d}, host: 127.0.0.1}}\n" for d in ("d1", "d2", "d3")))
    fleet = load_fleet(fleet_file)
    keys = fleet.key_store()
    held = {d: Signer.generate() for d in ("d1", "d2", "d3")}
    keys.register_many({d: s.public for d, s in held.items()})
    keys.revoke("d2", "lost")
    started = []

    def ensure_agent(shell, fleet):  # the deploy's own check, then 'started' (no service is restarted)
        if fleet.key_store().revocation(held[shell.dev.name].public) is not None:
            raise KeyRevoked(f"{shell.dev.name}: its key was revoked")
        started.append(shell.dev.name)
        return SimpleNamespace(restarted_at=None)

    monkeypatch.setattr(simfleet, "ensure_agent", ensure_agent)
    monkeypatch.setattr(simfleet, "DeviceShell", lambda dev, *a, **k: contextlib.nullcontext(SimpleNamespace(dev=dev)))
    monkeypatch.setattr(simfleet.FleetClient, "of", classmethod(lambda cls, fleet, **kw: contextlib.nullcontext()))
    assert simfleet.SimFleet(tmp_path).start_agents(fleet) == ["d2"]
    assert sorted(started) == ["d1", "d3"]


def test_sim_up_after_a_device_was_revoked_leaves_its_broker_user_out_of_the_passwd_it_writes(tmp_path, monkeypatch):
    """`sim up` wrote the simulated broker's passwd afresh with a user for every device, so after `fleet revoke`
    (which removed the revoked device's user), `sim down` and `sim up`, the revoked device could connect to the broker
    again. Its user is now left out of the passwd `up` writes; the others are in it, as is the operator."""
    from device_agents.identity import Signer
    from edge_kit.errors import EdgeKitError
    from edge_kit.fleet.keys import FleetKeys

    names = [n for n, _ in simfleet.device_names(3, ["rpi4"])]
    keys = FleetKeys(tmp_path / "keys")  # kept by `sim down`, as `fleet revoke` left it
    keys.register_many({n: Signer.generate().public for n in names})
    keys.revoke(names[1], "stolen")
    written: dict = {}

    class Broker:  # Mosquitto as up() starts it: what matters is the users of the passwd it would write
        def __init__(self, workdir, *, users=None, **_kw):
            written.update(users or {})

        def start(self):
            raise EdgeKitError("stopped here: the broker's users are known")

    monkeypatch.setattr(simfleet, "MosquittoBroker", Broker)
    with pytest.raises(EdgeKitError, match="stopped here"):
        simfleet.SimFleet(tmp_path).up(3, ["rpi4"], embedded_broker=False)
    assert sorted(written) == sorted(["operator", names[0], names[2]]), written
    assert simfleet.SimFleet(tmp_path).state() is None  # up() cleaned up after itself


def test_sim_up_after_a_device_was_revoked_writes_no_password_file_for_it_and_removes_a_stale_one(tmp_path,
                                                                                                 monkeypatch):
    """`sim up` left the revoked device's user out of the broker's passwd but still wrote its plain password to
    broker-wall/secrets/<device>.pass, a password no broker takes lying about; and the one written before the
    revocation stayed there too. Now neither is there; the others' are, and the fleet file still names where
    `deploy --new-key` writes the readmitted device's fresh one."""
    import yaml

    from device_agents.identity import Signer
    from edge_kit.errors import EdgeKitError
    from edge_kit.fleet.keys import FleetKeys

    names = [n for n, _ in simfleet.device_names(3, ["rpi4"])]
    keys = FleetKeys(tmp_path / "keys")
    keys.register_many({n: Signer.generate().public for n in names})
    keys.revoke(names[1], "stolen")
    secrets = tmp_path / "broker-wall" / "secrets"
    secrets.mkdir(parents=True, mode=0o700)
    stale = secrets / f"{names[1]}.pass"
    stale.write_text("the password it had before it was revoked\n")
    fleet_files = []

    def start_agents(self, fleet):  # stop once the broker and the fleet file are written
        fleet_files.append(yaml.safe_load(self.fleet_file.read_text()))
        raise EdgeKitError("stopped here: the wall is written")

    monkeypatch.setattr(simfleet.SimFleet, "start_agents", start_agents)
    monkeypatch.setattr(simfleet, "SshEndpoint", _FakeSsh)
    with pytest.raises(EdgeKitError, match="stopped here"):
        simfleet.SimFleet(tmp_path).up(3, ["rpi4"], embedded_broker=False)
    assert not stale.exists()
    assert sorted(p.name for p in secrets.iterdir()) == sorted(f"{u}.pass" for u in ("operator", names[0], names[2]))
    revoked_entry = next(d for d in fleet_files[0]["devices"] if d["name"] == names[1])
    assert revoked_entry["agent_broker"]["password_file"] == str(stale)  # where a readmission writes its new one
    assert simfleet.SimFleet(tmp_path).state() is None  # up() cleaned up after itself (the broker stopped)


class _FakeSsh:
    """An SSH endpoint as `sim up` uses one, without starting sshd (what matters here is the broker's wall)."""

    def __init__(self, folder, public, **_kw):
        self.host, self.port, self.host_public, self.kind = "127.0.0.1", 1, "ssh-ed25519 AAAA", "fake"
        self.proc = subprocess.Popen([sys.executable, "-c", ""])  # a pid that `down` finds ended: it stops no one
        self.proc.wait()

    def start(self):
        return self


def test_sim_ups_table_keeps_each_devices_root_whole_in_a_pipe(tmp_path, run_cli, monkeypatch):
    """Found walking `edgekit sim up > file` (120 columns): the root column read
    '/tmp/s17walk/sim/devices/jetson-orin-nano-1/…', the one place the table names each device's folder."""
    from types import SimpleNamespace

    from edge_kit.cli.app import out

    root = str(tmp_path / "a-rather-long-folder-name" / "sim" / "devices" / "jetson-orin-nano-1" / "root")
    device = SimpleNamespace(name="jetson-orin-nano-1", profile="jetson-orin-nano", host="127.0.0.1", port=2222, root=root)
    monkeypatch.setattr(simfleet.SimFleet, "up", lambda self, *a, **k: SimpleNamespace(devices=[device]))
    monkeypatch.setattr(simfleet.SimFleet, "state", lambda self: {
        "devices": [{"name": device.name, "ssh": "OpenSSH sshd"}], "links": None, "store": None,
        "broker": {"kind": "mosquitto", "host": "127.0.0.1", "port": 1883}})
    monkeypatch.setattr(out, "width", 120)
    code, text, err = run_cli("sim", "up", "--devices", "1", "--profiles", "jetson-orin-nano", "--dir", tmp_path / "sim")
    assert code == 0, err
    assert "…" not in text and root in "".join(ln.split("OpenSSH sshd")[-1].strip() for ln in text.splitlines()[:8])


def test_a_child_told_to_exit_is_given_its_grace_then_stopped_never_left_running():
    """Benchmarks closed a server's stdin and waited 30 s: a hung server raised TimeoutExpired and ran on."""
    from edge_kit.sim.process import stop_process

    polite = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdin=subprocess.PIPE)
    try:
        for p in (polite, hung):
            p.stdin.close()
        stop_process(polite, grace=30)
        assert polite.returncode == 0  # it ended by itself: no signal
        stop_process(hung, grace=0.5)
        assert hung.returncode == -signal.SIGTERM
    finally:
        for p in (polite, hung):
            p.kill()
