"""`edgekit deploy` over real sshd to a simulated fleet with real agents and a real Mosquitto."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import yaml
from harness import CuttingProxy

from device_agents.identity import provisioned_at
from device_agents.store import ModelStore
from edge_kit.fleet.deploy import DeployOptions, deploy
from edge_kit.fleet.inventory import load_fleet
from edge_kit.fleet.ssh import DeviceShell
from edge_kit.sim.ssh import known_hosts_line, write_keypair
from edge_kit.telemetry.store import Store

pytestmark = pytest.mark.integration


def current(dev) -> str | None:
    return ModelStore(Path(dev.root)).current()


def manifest_sha(artifacts: Path, variant: str) -> str:
    data = json.loads((artifacts / "manifest.json").read_text())
    return next(a["sha256"] for a in data["artifacts"] if a["id"] == variant)


def test_deploy_to_four_devices_in_parallel_then_redeploy_skips_them_all(sim, digits_artifacts, run_cli):
    simfleet, fleet = sim(4)
    code, out, err = run_cli("deploy", "--fleet", simfleet.fleet_file, "--artifacts", digits_artifacts,
                             "--variant", "int8", "--parallel", "4", "--json")
    assert code == 0, out
    result = json.loads(out)
    assert result["counts"] == {"succeeded": 4, "skipped": 0, "failed": 0}
    int8 = manifest_sha(digits_artifacts, "int8")
    for dev, r in zip(fleet.devices, result["devices"]):
        assert r["device"] == dev.name and r["variant"] == "int8" and current(dev) == int8
        assert "uploaded fp32 (0.8 MB)" in r["actions"] and "activated int8" in r["actions"]
        assert r["activation"]["current"] == int8 and r["activation"]["smoke"]["outputs"] == {"output_0": [1, 10]}
        assert {m["variant"] for m in ModelStore(Path(dev.root)).installed()} == {"fp32", "dynamic-int8", "int8"}
        # given its key (by `sim up`'s deploy): the floor of its command horizon is that deploy's clock
        assert time.time() - 600 < provisioned_at(Path(dev.root) / "identity") <= time.time()
    code, out, err = run_cli("deploy", "--fleet", simfleet.fleet_file, "--artifacts", digits_artifacts, "--json")
    again = json.loads(out)
    assert code == 0 and again["counts"] == {"succeeded": 0, "skipped": 4, "failed": 0}
    assert all(r["reason"].startswith("already current") for r in again["devices"])
    code, out, err = run_cli("deploy", "--fleet", simfleet.fleet_file, "--artifacts", digits_artifacts)
    assert code == 0 and out.count("skipped") == 4
    with DeviceShell(fleet.devices[0], fleet.known_hosts) as shell:  # the link's latency and CPU settings hold
        link = shell.conn.client.get_transport()
        assert link.remote_cipher == "aes128-gcm@openssh.com"
        assert link.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_an_unchanged_redeploy_costs_each_device_one_ssh_command_and_nothing_else(sim, digits_artifacts, monkeypatch):
    """What a device with nothing to change costs, pinned: one SSH session running one command (the probe:
    the agent code's hashes, identity, models, `current`, and the hashes of the stored candidates for the
    repair check, in one isolated Python), no SFTP session and no MQTT request. It used to take an SFTP
    session of some twenty reads, a second command for the code check and a `state` request over MQTT
    (the agent hashing its models)."""
    import paramiko

    from edge_kit.fleet.commands import FleetClient

    _, fleet = sim(2)
    assert not deploy(fleet, fleet.devices, DeployOptions(digits_artifacts, variant="int8")).failed
    commands: list[str] = []
    subsystems: list[str] = []
    requests: list[tuple[str, str]] = []
    exec_command, invoke_subsystem, send = (paramiko.Channel.exec_command, paramiko.Channel.invoke_subsystem,
                                            FleetClient.send)
    monkeypatch.setattr(paramiko.Channel, "exec_command",
                        lambda self, command: (commands.append(command), exec_command(self, command))[1])
    monkeypatch.setattr(paramiko.Channel, "invoke_subsystem",
                        lambda self, name: (subsystems.append(name), invoke_subsystem(self, name))[1])
    monkeypatch.setattr(FleetClient, "send",
                        lambda self, device, name, *a, **k: (requests.append((device, name)),
                                                             send(self, device, name, *a, **k))[1])
    group = deploy(fleet, fleet.devices, DeployOptions(digits_artifacts))
    assert [r.status for r in group.results] == ["skipped", "skipped"], [r.reason for r in group.results]
    assert subsystems == [] and requests == []
    assert len(commands) == 2 and all(" -I -S -B -c " in c for c in commands), [c[:80] for c in commands]


def through_proxy(simfleet, fleet, index: int, proxy: CuttingProxy, tmp_path: Path):
    """Return the fleet with device ``index`` reached through ``proxy`` (its host key known there too)."""
    dev = fleet.devices[index]
    data = yaml.safe_load(simfleet.fleet_file.read_text())
    data["devices"][index]["port"] = proxy.port
    host_key = (simfleet.workdir / "devices" / dev.name / "ssh" / "ssh_host_ed25519_key.pub").read_text()
    with open(fleet.known_hosts, "a") as f:
        f.write(known_hosts_line("127.0.0.1", proxy.port, host_key) + "\n")
    cut_file = tmp_path / f"fleet-cut-{proxy.port}.yaml"
    cut_file.write_text(yaml.safe_dump(data))
    return load_fleet(cut_file)


def test_a_connection_cut_mid_upload_leaves_that_device_on_its_previous_model(sim, digits_artifacts,
                                                                              digits_artifacts_v2, tmp_path):
    simfleet, fleet = sim(3)
    first = deploy(fleet, fleet.devices, DeployOptions(digits_artifacts, variant="int8"))
    assert len(first.succeeded) == 3
    victim = fleet.devices[1]
    proxy = CuttingProxy(victim.port, cut_after=300_000)  # past the handshake, inside the first upload
    cut_fleet = through_proxy(simfleet, fleet, 1, proxy, tmp_path)
    try:
        group = deploy(cut_fleet, cut_fleet.devices, DeployOptions(digits_artifacts_v2, variant="int8"))
        assert [r.status for r in group.results] == ["succeeded", "failed", "succeeded"]
        assert proxy.cuts == 1 and victim.name in group.failed[0].reason
        assert "upload" in group.failed[0].reason or "connection" in group.failed[0].reason
        assert current(victim) == manifest_sha(digits_artifacts, "int8")  # still the previous model
        assert ModelStore(Path(victim.root)).verify(current(victim))
        new = manifest_sha(digits_artifacts_v2, "int8")
        assert [current(d) for d in fleet.devices] == [new, manifest_sha(digits_artifacts, "int8"), new]
        proxy.cut_after = None  # the link is back: a retry completes
        retry = deploy(cut_fleet, cut_fleet.devices, DeployOptions(digits_artifacts_v2, variant="int8"))
        assert [r.status for r in retry.results] == ["skipped", "succeeded", "skipped"]
        assert current(victim) == new
    finally:
        proxy.close()


@pytest.mark.parametrize("cut_after", [500, 2_500, 6_000])  # client bytes: SSH handshake, state read, upload
def test_a_connection_cut_anywhere_is_a_clean_error_for_that_device(sim, digits_artifacts, digits_artifacts_v2,
                                                                    tmp_path, cut_after):
    simfleet, fleet = sim(1)
    assert deploy(fleet, fleet.devices, DeployOptions(digits_artifacts, variant="int8")).succeeded
    proxy = CuttingProxy(fleet.devices[0].port, cut_after=cut_after)
    try:
        cut_fleet = through_proxy(simfleet, fleet, 0, proxy, tmp_path)
        r = deploy(cut_fleet, cut_fleet.devices, DeployOptions(digits_artifacts_v2, variant="int8")).results[0]
    finally:
        proxy.close()
    assert r.status == "failed" and proxy.cuts == 1
    assert r.reason.startswith("rpi4-1") and "unexpected" not in r.reason and "()" not in r.reason, r.reason
    assert current(fleet.devices[0]) == manifest_sha(digits_artifacts, "int8")


def test_host_keys_unknown_refused_trusted_on_request_and_a_changed_key_always_refused(sim, digits_artifacts, tmp_path, run_cli):
    simfleet, fleet = sim(1)
    data = yaml.safe_load(simfleet.fleet_file.read_text())
    known = tmp_path / "known_hosts"
    data["known_hosts"] = str(known)
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump(data))
    code, out, err = run_cli("deploy", "--fleet", fleet_file, "--artifacts", digits_artifacts, "--json")
    reason = json.loads(out)["devices"][0]["reason"]
    assert code == 4 and "host key is not in" in reason and "--trust-new-hosts" in reason
    assert current(fleet.devices[0]) is None
    code, out, err = run_cli("deploy", "--fleet", fleet_file, "--artifacts", digits_artifacts, "--trust-new-hosts", "--json")
    assert code == 0, out
    dev = fleet.devices[0]
    assert known.read_text().startswith(f"[127.0.0.1]:{dev.port} ssh-ed25519 ")
    other = write_keypair(tmp_path / "impostor")  # the device "changed" its key
    known.write_text(known_hosts_line("127.0.0.1", dev.port, other) + "\n")
    code, out, err = run_cli("deploy", "--fleet", fleet_file, "--artifacts", digits_artifacts, "--trust-new-hosts", "--json")
    assert code == 4 and "host key differs" in json.loads(out)["devices"][0]["reason"]


def test_a_bad_known_hosts_file_is_named_and_the_changed_key_hint_works(sim, tmp_path):
    """An unreadable, corrupt or unwritable known_hosts file fails the device with a line naming that
    file (not 'unexpected ...' nor 'unreachable'), and the command a changed key's message gives, once
    run, lets --trust-new-hosts record the device's real key."""
    import shlex
    import subprocess

    from edge_kit.errors import DeployError
    from edge_kit.fleet.ssh import HostKeyError, known_hosts_name

    _, fleet = sim(1)
    dev = fleet.devices[0]

    def refusal(known: Path, trust_new: bool = False) -> str:
        with pytest.raises(DeployError) as caught:
            with DeviceShell(dev, known, trust_new):
                pass
        assert isinstance(caught.value, HostKeyError), caught.value
        return str(caught.value)

    folder = tmp_path / "kh-dir"
    folder.mkdir()
    assert refusal(folder).startswith(f"{dev.name}: {folder}: cannot read the SSH known_hosts file")
    corrupt = tmp_path / "kh-corrupt"
    corrupt.write_text("# mine\n[10.9.9.9]:22 ssh-ed25519 AAAA!!!notbase64\n")
    assert refusal(corrupt).startswith(f"{dev.name}: {corrupt}:2: not a valid host key line")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    why = refusal(blocker / "known_hosts", trust_new=True)
    assert f"cannot record its new host key in {blocker / 'known_hosts'}" in why and "unreachable" not in why

    known = tmp_path / "known_hosts"
    other = write_keypair(tmp_path / "impostor")  # the device "changed" its key
    known.write_text("pi-9 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n"
                     + known_hosts_line("127.0.0.1", dev.port, other) + "\n")
    why = refusal(known, trust_new=True)
    assert "host key differs" in why
    hint = why.split("remove the old key: ", 1)[1].rstrip(")")
    subprocess.run(shlex.split(hint), check=True, capture_output=True, timeout=30)
    with DeviceShell(dev, known, trust_new=True):
        pass
    lines = known.read_text().splitlines()
    assert lines[0].startswith("pi-9 ") and len(lines) == 2  # the other host's key is kept
    assert lines[1].startswith(f"[127.0.0.1]:{dev.port} ssh-ed25519 ") and other.split()[1] not in lines[1]
    assert known_hosts_name("10.0.0.21", 22) == "10.0.0.21"  # as OpenSSH files a port-22 host


def test_a_deploy_cut_after_changing_the_agent_config_restarts_it_next_time(sim, tmp_path, monkeypatch):
    """A deploy that wrote a new agent.yaml and lost the device before restarting the agent left it
    running the old config, and the next deploy found nothing to change; now the next one restarts it."""
    from edge_kit.errors import DeployError
    from edge_kit.fleet import agent_install

    simfleet, fleet = sim(1)
    dev = fleet.devices[0]
    data = yaml.safe_load(simfleet.fleet_file.read_text())
    data["devices"][0]["serve"] = {"max_clients": 7}  # a new agent.yaml
    changed_file = tmp_path / "fleet-changed.yaml"
    changed_file.write_text(yaml.safe_dump(data))
    changed = load_fleet(changed_file)
    pid = int((Path(dev.root) / "agent.pid").read_text())

    def cut(*_args, **_kwargs):
        raise DeployError(f"{dev.name}: SSH connection lost (cut by the test)")

    with monkeypatch.context() as m:
        m.setattr(agent_install, "_stop_supervisor", cut)
        with DeviceShell(changed.devices[0], fleet.known_hosts) as shell, pytest.raises(DeployError, match="cut by the test"):
            agent_install.ensure_agent(shell, changed)
    assert "max_clients: 7" in (Path(dev.root) / "agent.yaml").read_text()
    assert int((Path(dev.root) / "agent.pid").read_text()) == pid  # still the agent with the old config
    with DeviceShell(changed.devices[0], fleet.known_hosts) as shell:
        state = agent_install.ensure_agent(shell, changed)
    assert state.restarted_at is not None and state.changed == ["an interrupted deploy's changes", "service restarted"]
    assert not (Path(dev.root) / "restart.pending").exists()
    assert wait_for(lambda: (Path(dev.root) / "agent.pid").read_text().strip() not in ("", str(pid)))
    with DeviceShell(changed.devices[0], fleet.known_hosts) as shell:  # and then nothing more to do
        assert agent_install.ensure_agent(shell, changed).changed == []


def test_a_device_without_python_or_with_an_old_one_is_told_so_and_keeps_its_agent(sim, tmp_path):
    """No interpreter: 'not found' and what to set (was 'sh: 1: ...: not found' at best); Python 3.9:
    the version the agent needs (was a deploy that installed an agent that never came online)."""
    import sys

    from edge_kit.errors import DeployError
    from edge_kit.fleet.agent_install import ensure_agent

    simfleet, fleet = sim(1)
    root = Path(fleet.devices[0].root)
    old39 = tmp_path / "python3.9"  # the host's Python, reporting 3.9 to a `-c` script
    old39.write_text(f"""#!/bin/sh
if [ "$1" = "-c" ]; then
  shift
  exec {sys.executable} -c 'import sys; sys.version_info = (3, 9, 18, "final", 0); src = sys.argv[1]; \\
sys.argv = ["-c", *sys.argv[2:]]; exec(compile(src, "<string>", "exec"))' "$@"
fi
exec {sys.executable} "$@"
""")
    old39.chmod(0o755)
    service = root / "agent" / "device_agents" / "service.py"
    service.write_text(service.read_text() + "\n# changed on the device\n")  # so the agent is installed again
    code = (root / "agent").resolve()
    for python, message in ((str(tmp_path / "no-such-python3"), "no-such-python3' is not found on the device; install Python 3.10 or newer"),
                            (str(old39), "is 3.9.18; the agent needs 3.10 or newer")):
        data = yaml.safe_load(simfleet.fleet_file.read_text())
        data["devices"][0]["python"] = python
        (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(data))
        changed = load_fleet(tmp_path / "fleet.yaml")
        with pytest.raises(DeployError) as caught:  # no interpreter: the probe itself says so
            with DeviceShell(changed.devices[0], changed.known_hosts) as shell:
                ensure_agent(shell, changed)
        assert str(caught.value).startswith("rpi4-1: ") and message in str(caught.value), caught.value
        assert (root / "agent").resolve() == code and (root / "agent.pid").is_file()  # untouched, still running


def test_a_device_whose_shell_prints_a_banner_is_deployed(sim, digits_artifacts, tmp_path):
    """A .bashrc that echoes (bash sources it for commands sshd runs, not only for logins) prints before
    every command's output: the deploy used to fail with 'unexpected JSONDecodeError ... please report it'."""
    from edge_kit.sim.ssh import SshEndpoint

    simfleet, fleet = sim(1)
    home = tmp_path / "home"  # the SSH user's home as its shell sees it, with a chatty .bashrc
    home.mkdir()
    (home / ".bashrc").write_text("echo 'Welcome to rpi4-1'\necho '{ this is not JSON'\n")
    ssh = SshEndpoint(tmp_path / "ssh", (simfleet.workdir / "id_ed25519.pub").read_text().strip(), embedded=False,
                      settings=(f"SetEnv HOME={home}",)).start()
    try:
        data = yaml.safe_load(simfleet.fleet_file.read_text())
        data["devices"][0]["port"] = ssh.port
        data["known_hosts"] = str(tmp_path / "known_hosts")
        (tmp_path / "known_hosts").write_text(known_hosts_line(ssh.host, ssh.port, ssh.host_public) + "\n")
        (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(data))
        chatty_fleet = load_fleet(tmp_path / "fleet.yaml")
        with DeviceShell(chatty_fleet.devices[0], chatty_fleet.known_hosts) as shell:
            assert shell.run(["true"]).startswith("Welcome to rpi4-1")  # the banner is really there
        r = deploy(chatty_fleet, chatty_fleet.devices, DeployOptions(digits_artifacts, variant="int8", health=False)).results[0]
    finally:
        ssh.stop()
    assert r.status == "succeeded", r.reason
    assert current(fleet.devices[0]) == manifest_sha(digits_artifacts, "int8")


def test_a_deploy_without_a_broker_activates_with_the_devices_own_runtime_and_delegate(sim, digits_artifacts,
                                                                                      monkeypatch):
    """Without a broker the deploy activates over SSH (`edgekit-agent activate`), which ran xnnpack whatever the
    device's agent.yaml said: a Coral's edgetpu variant was refused as on a device with no Edge TPU, and the smoke
    check never ran on the profile's runtime and delegate. It runs as the device's own agent would now. Shown with a
    profile whose runtime.delegate is ``none`` (LiteRT's reference kernels: real on this host, as no Edge TPU is)."""
    from edge_kit.fleet import agent_install
    from edge_kit.profiles import Runtime, load_profile

    _, fleet = sim(1)
    reference = load_profile("rpi4").model_copy(update={"runtime": Runtime(delegate="none", threads=2)})
    monkeypatch.setattr(agent_install, "load_profile", lambda _name: reference)
    r = deploy(fleet, fleet.devices, DeployOptions(digits_artifacts, variant="int8", health=False)).results[0]
    assert r.status == "succeeded", r.reason
    assert yaml.safe_load((Path(fleet.devices[0].root) / "agent.yaml").read_text())["bench"]["delegate"] == "none"
    smoke = r.activation["smoke"]
    assert (smoke["runtime"], smoke["delegate"], smoke["outputs"]) == ("litert", "none", {"output_0": [1, 10]})
    assert current(fleet.devices[0]) == manifest_sha(digits_artifacts, "int8")


def test_a_stale_pid_file_naming_another_process_is_neither_trusted_nor_stopped(sim):
    """After a reboot or a crash, agent.pid may name a pid that now belongs to another process: the deploy
    took the agent for running (nothing started: 'already current' with no agent), and would have sent
    that process SIGTERM on a change. Now it starts the agent and leaves the other process alone."""
    import signal
    import subprocess

    from edge_kit.fleet.agent_install import ensure_agent

    _, fleet = sim(1)
    dev = fleet.devices[0]
    pidfile = Path(dev.root) / "agent.pid"
    os.kill(int(pidfile.read_text()), signal.SIGTERM)  # the agent is gone (as after a power cut) ...
    assert wait_gone(pidfile)
    other = subprocess.Popen(["sleep", "300"])  # ... and its pid now belongs to something else
    try:
        pidfile.write_text(f"{other.pid}\n")
        with DeviceShell(dev, fleet.known_hosts) as shell:
            assert shell.info["agent_pid"] is None
            state = ensure_agent(shell, fleet)
        assert state.changed == ["service started"] and other.poll() is None
        assert wait_for(lambda: pidfile.read_text().strip() not in ("", str(other.pid)))
        with DeviceShell(dev, fleet.known_hosts) as shell:  # the supervisor it started is recognised
            assert shell.info["agent_pid"] == int(pidfile.read_text()) and ensure_agent(shell, fleet).changed == []
    finally:
        other.kill()
        other.wait()


def test_a_missing_ssh_key_file_is_named_not_reported_as_an_unreachable_host(sim, tmp_path):
    from edge_kit.errors import DeployError

    _, fleet = sim(1)
    for key, why in ((tmp_path / "no-such-key", "No such file or directory"), (tmp_path, "Is a directory")):
        dev = fleet.devices[0].model_copy(update={"key": key})
        with pytest.raises(DeployError) as caught:
            with DeviceShell(dev, fleet.known_hosts):
                pass
        assert f"SSH key {key}: {why}; set the device's `key:`" in str(caught.value), caught.value
        assert "unreachable" not in str(caught.value)


def test_ctrl_c_during_a_deploy_leaves_the_devices_not_yet_started_alone(sim, digits_artifacts):
    """Ctrl-C: the devices not started yet are never touched (their futures are cancelled), and the one
    under way finishes its deploy, so none is left between two models; the error names where each ended."""
    import signal
    import threading

    _, fleet = sim(3)
    seen: list[tuple[str, str]] = []

    def progress(device: str, step: str) -> None:
        seen.append((device, step))
        if len(seen) == 1:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # Ctrl-C while the first is under way

    from edge_kit.errors import DeployInterrupted

    with pytest.raises(DeployInterrupted) as caught:
        deploy(fleet, fleet.devices, DeployOptions(digits_artifacts, variant="int8", parallel=1), progress=progress)
    assert {d for d, _ in seen} == {"rpi4-1"} and seen[-1] == ("rpi4-1", "succeeded")  # it finished its deploy
    # and the line says so: which device now runs what, which were not touched (exit 130, one line)
    assert "(rpi4-1 succeeded, int8 active; rpi4-2 not touched; rpi4-3 not touched)" in str(caught.value), caught.value
    assert caught.value.exit_code == 130
    assert current(fleet.devices[0]) == manifest_sha(digits_artifacts, "int8")
    assert [current(d) for d in fleet.devices[1:]] == [None, None]


def test_ctrl_c_while_a_device_is_still_connecting_returns_at_once(sim, digits_artifacts, silent_port):
    """A device that does not answer (here a loopback port whose accept queue is full) held a Ctrl-C'd deploy
    for the whole connect timeout (10 s): nothing had been changed on it, so now its connect gives up at once."""
    import signal
    import threading

    _, fleet = sim(1)
    silent = fleet.devices[0].model_copy(update={"port": silent_port})
    timer = threading.Timer(0.5, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    started = time.monotonic()
    timer.start()
    from edge_kit.errors import DeployInterrupted

    with pytest.raises(DeployInterrupted, match=f"[(]{silent.name} not touched[)]"):
        deploy(fleet, [silent], DeployOptions(digits_artifacts, variant="int8", health=False))
    assert time.monotonic() - started < 3.0  # not CONNECT_TIMEOUT_S
    assert current(fleet.devices[0]) is None


def test_an_agent_install_on_a_full_disk_is_named_and_leaves_nothing_behind(sim, tmp_path):
    """On a root with room for the bundle but not for its files, the install used to fail with the last
    line of a traceback and leave the half-unpacked folder and the upload, filling the disk for the next try."""
    import shutil
    import subprocess

    from edge_kit.errors import DeployError
    from edge_kit.fleet.agent_install import ensure_agent

    _, fleet = sim(1)
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    try:
        dev = fleet.devices[0].model_copy(update={"root": str(disk / "root")})
        (disk / "root").mkdir()
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - 400_000))  # room for the upload, not the files
        with DeviceShell(dev, fleet.known_hosts) as shell, pytest.raises(DeployError) as caught:
            ensure_agent(shell, fleet)
        assert str(caught.value).startswith(f"{dev.name}: agent bundle: cannot unpack it under {disk / 'root'} "
                                            "(No space left on device); free space there"), caught.value
        assert sorted(p.name for p in (disk / "root").iterdir()) == ["incoming", "restart.pending"]
        assert list((disk / "root" / "incoming").iterdir()) == []
        filler.unlink()
        with DeviceShell(dev, fleet.known_hosts) as shell:
            assert "service started" in ensure_agent(shell, fleet).changed
        assert (disk / "root" / "agent").is_symlink() and not (disk / "root" / "restart.pending").exists()
    finally:
        pid = disk / "root" / "agent.pid"
        if pid.exists():
            os.kill(int(pid.read_text()), 15)
            wait_gone(pid)
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_bad_inputs_are_per_device_errors_and_devices_keep_their_model(sim, digits_artifacts, digits_artifacts_v2,
                                                                      tmp_path, run_cli):
    simfleet, fleet = sim(3)
    assert len(deploy(fleet, fleet.devices, DeployOptions(digits_artifacts, variant="int8")).succeeded) == 3
    old = manifest_sha(digits_artifacts, "int8")
    data = yaml.safe_load(simfleet.fleet_file.read_text())
    data["devices"][0]["port"] = 1  # nothing listens there
    write_keypair(tmp_path / "wrong_key")
    data["devices"][1]["key"] = str(tmp_path / "wrong_key")
    full = fleet.devices[2]  # its disk is "full": the upload's target is /dev/full
    sha = manifest_sha(digits_artifacts_v2, "fp32")
    os.symlink("/dev/full", Path(full.root) / "incoming" / f"{sha}.tflite.part")
    bad = tmp_path / "fleet.yaml"
    bad.write_text(yaml.safe_dump(data))
    code, out, err = run_cli("deploy", "--fleet", bad, "--artifacts", digits_artifacts_v2, "--json")
    reasons = [r["reason"] for r in json.loads(out)["devices"]]
    assert code == 4 and [r["status"] for r in json.loads(out)["devices"]] == ["failed"] * 3
    assert "unreachable" in reasons[0] and "Authentication failed" in reasons[1] and "upload of" in reasons[2]
    assert "is its disk full" in reasons[2]
    assert [current(d) for d in fleet.devices] == [old] * 3
    code, out, err = run_cli("deploy", "--fleet", simfleet.fleet_file, "--artifacts", tmp_path)
    assert code == 2 and err.strip() == f"edgekit: error: {tmp_path}/manifest.json: no manifest; run `edgekit compile` into {tmp_path} first"


def test_a_canary_breaking_its_constraints_stops_the_rollout_and_is_rolled_back(sim, digits_artifacts,
                                                                              digits_artifacts_v2, tmp_path, run_cli):
    simfleet, fleet = sim(4)
    assert len(deploy(fleet, fleet.devices, DeployOptions(digits_artifacts, variant="int8")).succeeded) == 4
    old, new = manifest_sha(digits_artifacts, "int8"), manifest_sha(digits_artifacts_v2, "int8")
    data = yaml.safe_load(simfleet.fleet_file.read_text())
    data["devices"][0]["constraints"] = {"max_latency_p90_ms": 0.0001}  # no variant can meet this
    tight = tmp_path / "fleet.yaml"
    tight.write_text(yaml.safe_dump(data))
    code, out, err = run_cli("deploy", "--fleet", tight, "--artifacts", digits_artifacts_v2, "--variant", "int8",
                             "--canary", "50%", "--json")
    result = json.loads(out)
    assert code == 4 and "1 of 2 canaries failed" in result["stopped"]
    statuses = [(r["status"], r["reason"]) for r in result["devices"]]
    assert statuses[0][0] == "failed" and "canary breaks its constraints (p90 <= 0.0001 ms (" in statuses[0][1]
    assert statuses[1] == ("failed", "rolled back: the canary rollout stopped")
    assert statuses[2:] == [("skipped", "rollout stopped after the canaries")] * 2
    assert [current(d) for d in fleet.devices] == [old] * 4  # canaries back on the previous model, the rest untouched
    # the canaries' health benchmarks (the figures the rollout was stopped on) are in the fleet's history, where
    # select and report read them; they were judged and dropped before
    health = {r["health"]["msg_id"] for r in result["devices"] if r.get("health")}
    assert len(health) == 2
    with Store(tmp_path / "edgekit-history.db") as db:
        assert {r["msg_id"] for r in db.bench_records()} == health
    code, out, err = run_cli("deploy", "--fleet", simfleet.fleet_file, "--artifacts", digits_artifacts_v2,
                             "--variant", "int8", "--canary", "25%")
    assert code == 0 and f"canary health benchmarks: 1 stored in {simfleet.fleet_file.parent.resolve()}" in out, out
    assert [current(d) for d in fleet.devices] == [new] * 4


def test_without_sshd_the_embedded_ssh_server_and_broker_carry_the_same_deploy(sim, digits_artifacts, run_cli):
    simfleet, fleet = sim(2, embedded_ssh=True, embedded_broker=True, insecure=True)
    assert {d["ssh"] for d in simfleet.state()["devices"]} == {"embedded (paramiko)"}
    assert simfleet.state()["broker"]["kind"] == "embedded (amqtt, anonymous)"
    code, out, err = run_cli("deploy", "--fleet", simfleet.fleet_file, "--artifacts", digits_artifacts,
                             "--variant", "int8", "--json")
    assert code == 0, out + err
    assert [current(d) for d in fleet.devices] == [manifest_sha(digits_artifacts, "int8")] * 2
    code, out, err = run_cli("deploy", "--fleet", simfleet.fleet_file, "--artifacts", digits_artifacts, "--json")
    assert code == 0 and json.loads(out)["counts"]["skipped"] == 2
    code, out, err = run_cli("bench", "--fleet", simfleet.fleet_file, "--device", fleet.devices[0].name,
                             "--min-runs", "10", "--json")
    assert code == 0 and json.loads(out)["variant"] == "int8"


def test_a_device_that_does_not_ack_its_activation_is_failed_and_never_switches_later(sim, digits_artifacts,
                                                                                     digits_artifacts_v2):
    import signal
    import subprocess
    import time

    simfleet, fleet = sim(2)
    assert len(deploy(fleet, fleet.devices, DeployOptions(digits_artifacts, variant="int8")).succeeded) == 2
    old, new = manifest_sha(digits_artifacts, "int8"), manifest_sha(digits_artifacts_v2, "int8")
    frozen = fleet.devices[0]
    v2 = json.loads((digits_artifacts_v2 / "manifest.json").read_text())
    for art in (a for a in v2["artifacts"] if a["status"] == "built"):  # uploaded earlier: straight to activation
        ModelStore(Path(frozen.root)).install(digits_artifacts_v2 / art["file"], variant=art["id"], model="digits")
    supervisor = (Path(frozen.root) / "agent.pid").read_text().strip()
    agent_pid = int(subprocess.run(["pgrep", "-P", supervisor], capture_output=True, text=True).stdout.split()[0])
    os.kill(agent_pid, signal.SIGSTOP)  # alive, connected, but not answering
    try:
        # repair off: its state request would meet the frozen agent first; this is about the activation
        group = deploy(fleet, fleet.devices, DeployOptions(digits_artifacts_v2, variant="int8", health_timeout=3,
                                                           repair=False))
        assert [r.status for r in group.results] == ["failed", "succeeded"]
        assert "no answer to 'activate' within 3 s" in group.results[0].reason
        assert "still runs its previous model" in group.results[0].reason
    finally:
        os.kill(agent_pid, signal.SIGCONT)
    time.sleep(3)  # the agent now reads the queued activate: expired, so it is refused, not run
    assert current(frozen) == old and current(fleet.devices[1]) == new


def test_a_tampered_model_and_a_truncated_meta_json_are_reported_and_repaired_by_the_next_deploy(sim, digits_artifacts):
    simfleet, fleet = sim(1)
    dev = fleet.devices[0]
    assert len(deploy(fleet, [dev], DeployOptions(digits_artifacts, variant="int8")).succeeded) == 1
    store = ModelStore(Path(dev.root))
    int8, fp32 = manifest_sha(digits_artifacts, "int8"), manifest_sha(digits_artifacts, "fp32")
    with open(store.model_path(fp32), "r+b") as f:  # one byte changed in a stored model
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    dyn = manifest_sha(digits_artifacts, "dynamic-int8")
    (store.models / dyn / "eval.npz").write_bytes(b"PK not the eval set")  # the eval set (metric code) replaced
    meta = store.models / int8 / "meta.json"  # the current model's metadata cut short
    meta.write_text(meta.read_text()[:20])
    assert store.describe(int8) == {"sha256": int8, "damaged": "meta.json is missing or unreadable"}  # not "none"
    group = deploy(fleet, [dev], DeployOptions(digits_artifacts, variant="int8"))
    r = group.results[0]
    assert r.status == "succeeded", r.reason
    assert "repair fp32 (the artifact no longer hashes to its sha256)" in r.actions
    assert "repair int8 (meta.json is missing or unreadable)" in r.actions
    assert "repair dynamic-int8 (the eval set no longer hashes to its sha256)" in r.actions
    assert store.damaged() == [] and store.describe(int8)["variant"] == "int8" and current(dev) == int8
    again = deploy(fleet, [dev], DeployOptions(digits_artifacts, variant="int8")).results[0]
    assert again.status == "skipped" and not any(a.startswith("repair") for a in again.actions)


def test_a_meta_json_not_utf8_or_too_large_is_damaged_for_the_deploy_as_for_the_agent_and_repaired(sim, digits_artifacts):
    """The probe decoded meta.json with errors="replace": a byte that is not UTF-8 inside a string looked intact to
    the deploy while the agent called the model damaged, so no deploy repaired it. And it printed the file whole: one
    of megabytes went over SSH and past what the host parses, failing the probe (and the deploy) of that device."""
    simfleet, fleet = sim(1)
    dev = fleet.devices[0]
    assert len(deploy(fleet, [dev], DeployOptions(digits_artifacts, variant="int8")).succeeded) == 1
    store = ModelStore(Path(dev.root))
    int8, fp32 = manifest_sha(digits_artifacts, "int8"), manifest_sha(digits_artifacts, "fp32")
    meta = store.models / int8 / "meta.json"  # the current model's: its model name holds a byte that is not UTF-8
    meta.write_bytes(meta.read_bytes().replace(b'"model": "', b'"model": "\xff', 1))
    assert store.describe(int8) == {"sha256": int8, "damaged": "meta.json is missing or unreadable"}
    big = store.models / fp32 / "meta.json"
    big.write_bytes(big.read_bytes()[:-1] + b', "pad": "' + b"x" * 6_000_000 + b'"}')
    assert store.describe(fp32)["damaged"].startswith("meta.json: over the 65,536 bytes")
    r = deploy(fleet, [dev], DeployOptions(digits_artifacts, variant="int8")).results[0]
    assert r.status == "succeeded", r.reason
    assert "repair int8 (meta.json is missing or unreadable)" in r.actions
    assert any(a.startswith("repair fp32 (meta.json: over the 65,536 bytes") for a in r.actions), r.actions
    assert store.damaged() == [] and store.describe(int8)["variant"] == "int8" and current(dev) == int8


def test_fifty_oversized_meta_json_files_not_utf8_are_probed_and_the_candidates_repaired(sim, digits_artifacts):
    """Each meta.json went into the probe's answer as up to 64 KiB + 1 bytes, a byte that is not UTF-8 as a
    six-character escape: about ten such files put it past the 4 MiB the host parses, the deploy of that device
    failed in one line, and no deploy could repair it (the repair needs the probe)."""
    import hashlib

    simfleet, fleet = sim(1)
    dev = fleet.devices[0]
    assert len(deploy(fleet, [dev], DeployOptions(digits_artifacts, variant="int8")).succeeded) == 1
    store = ModelStore(Path(dev.root))
    installed = {m["variant"]: m["sha256"] for m in store.installed()}
    junk = b"\xff" * (64 * 1024 + 100)
    for sha in installed.values():
        (store.models / sha / "meta.json").write_bytes(junk)
    for i in range(50 - len(installed)):  # models of the past, their meta.json as damaged
        folder = store.models / hashlib.sha256(b"old %d" % i).hexdigest()
        folder.mkdir()
        (folder / "meta.json").write_bytes(junk)
    r = deploy(fleet, [dev], DeployOptions(digits_artifacts, variant="int8")).results[0]
    assert r.status == "succeeded", r.reason
    for variant in installed:
        assert f"repair {variant} (meta.json: over the 65,536 bytes such a file may take)" in r.actions, r.actions
    assert all(store.describe(sha).get("variant") == variant for variant, sha in installed.items())
    assert current(dev) == installed["int8"]


def test_tampered_agent_code_is_not_started_and_the_next_deploy_reinstalls_it(sim, digits_artifacts):
    """The deploy checks the agent's files against their sha256 with a script of its own (never a
    marker file); the agent checks them against the operator-signed manifest before it starts."""
    import subprocess
    import sys

    simfleet, fleet = sim(1)
    dev = fleet.devices[0]
    assert len(deploy(fleet, [dev], DeployOptions(digits_artifacts, variant="int8")).succeeded) == 1
    code = Path(dev.root) / "agent"
    assert (code / "AGENT.json").is_file() and not list(code.rglob("__pycache__"))  # it ran with -B
    service = code / "device_agents" / "service.py"
    service.write_text(service.read_text() + "\nprint('tampered')\n")
    started = subprocess.run([sys.executable, "-B", "-m", "device_agents", "run", "--config", f"{dev.root}/agent.yaml"],
                             env={**os.environ, "PYTHONPATH": str(code)}, cwd=dev.root, capture_output=True, text=True,
                             timeout=60)
    assert started.returncode == 2 and "changed device_agents/service.py" in started.stderr, started.stderr
    assert "not started: run `edgekit deploy`" in started.stderr
    r = deploy(fleet, [dev], DeployOptions(digits_artifacts, variant="int8")).results[0]
    assert r.status == "succeeded", r.reason
    assert any("reinstalled: code differs: changed device_agents/service.py" in a for a in r.actions), r.actions
    assert "tampered" not in service.read_text()
    stray = code / "device_agents" / "__pycache__" / "service.cpython-311.pyc"  # a planted .pyc counts too
    stray.parent.mkdir()
    stray.write_bytes(b"\x00" * 16)
    r = deploy(fleet, [dev], DeployOptions(digits_artifacts, variant="int8")).results[0]
    assert any("added device_agents/__pycache__/service.cpython-311.pyc" in a for a in r.actions), r.actions
    assert not stray.exists()
    again = deploy(fleet, [dev], DeployOptions(digits_artifacts, variant="int8")).results[0]
    assert again.status == "skipped", again.actions


def test_an_agent_update_never_changes_the_files_of_the_agent_that_runs(sim, monkeypatch):
    """The new bundle goes into a folder of its own and <root>/agent is switched to it by one rename:
    the running agent (its supervisor here, cut off before the restart) keeps every file of its own
    version, so it never imports a mixture, even through a second install before the restart; what
    interrupted installs left is removed; the restart runs the new version, which checks itself."""
    from device_agents.codecheck import tree
    from edge_kit.errors import DeployError
    from edge_kit.fleet import agent_install

    _, fleet = sim(1)
    dev = fleet.devices[0]
    root = Path(dev.root)
    service = root / "agent" / "device_agents" / "service.py"
    service.write_text(service.read_text() + "\n# changed on the device\n")  # forces a reinstall
    supervisor = int((root / "agent.pid").read_text())
    running = Path(os.readlink(f"/proc/{supervisor}/cwd"))
    before = tree(running)
    (root / "agent-0123456789ab-1").mkdir()  # an install interrupted before its switch
    (root / ".agent-link-1").symlink_to("agent-0123456789ab-1")

    def cut(*_args, **_kwargs):
        raise DeployError(f"{dev.name}: SSH connection lost (cut by the test)")

    with monkeypatch.context() as m:
        m.setattr(agent_install, "_stop_supervisor", cut)
        with DeviceShell(dev, fleet.known_hosts) as shell, pytest.raises(DeployError, match="cut by the test"):
            agent_install.ensure_agent(shell, fleet)
    assert Path(os.readlink(f"/proc/{supervisor}/cwd")) == running and running.is_dir()  # not "(deleted)"
    assert tree(running) == before  # not one file of the running version changed
    assert (root / "agent").is_symlink() and (root / "agent").resolve() != running
    assert "# changed on the device" not in service.read_text()
    assert sorted(p.name for p in root.iterdir() if "agent-" in p.name) == sorted([running.name, (root / "agent").resolve().name])
    skipped = (root / "agent").resolve()
    service.write_text(service.read_text() + "\n# changed on the device\n")  # a second install, again cut before the restart
    with monkeypatch.context() as m:
        m.setattr(agent_install, "_stop_supervisor", cut)
        with DeviceShell(dev, fleet.known_hosts) as shell, pytest.raises(DeployError, match="cut by the test"):
            agent_install.ensure_agent(shell, fleet)
    assert tree(running) == before  # still running from it: kept, though <root>/agent no longer named it
    assert not skipped.exists() and (root / "agent").resolve() not in (running, skipped)
    with DeviceShell(dev, fleet.known_hosts) as shell:
        assert "service restarted" in agent_install.ensure_agent(shell, fleet).changed
    assert wait_for(lambda: Path(os.readlink(f"/proc/{int((root / 'agent.pid').read_text())}/cwd")) == (root / "agent").resolve())

    import shutil  # a device a deploy before versioned folders left: <root>/agent a folder

    current = (root / "agent").resolve()
    (root / "agent").unlink()
    shutil.copytree(current, root / "agent")
    service.write_text(service.read_text() + "\n# changed on the device\n")
    with DeviceShell(dev, fleet.known_hosts) as shell:
        changed = agent_install.ensure_agent(shell, fleet).changed
    assert any("reinstalled" in c for c in changed) and "service restarted" in changed
    assert (root / "agent").is_symlink() and "# changed on the device" not in service.read_text()


def test_operator_key_rotation_waits_for_every_device_then_switches_and_the_old_key_is_refused(sim, digits_artifacts,
                                                                                              run_cli):
    """`edgekit keys rotate` with a device offline pins [old, new] where it can and switches nothing
    (exit 4; the new key is kept pending); once the device is back, the same rotation finishes: every
    device obeys only the new key, refuses the retired one, and its agent still starts (its own code
    manifest re-signed)."""
    import base64
    import signal
    import subprocess
    import sys

    from device_agents.identity import Signer, key_id
    from edge_kit.errors import AgentTimeout
    from edge_kit.fleet.commands import FleetClient

    simfleet, fleet = sim(2)
    assert len(deploy(fleet, fleet.devices, DeployOptions(digits_artifacts, variant="int8")).succeeded) == 2
    keys = fleet.key_store()
    old = Signer.from_pem((keys.folder / "operator.key").read_bytes(), "old")

    def pinned(dev) -> list[str]:
        return [key_id(base64.b64decode(k)) for k in json.loads((Path(dev.root) / "identity" / "operators.json").read_text())]

    dev1, dev2 = fleet.devices
    os.kill(int((Path(dev2.root) / "agent.pid").read_text()), signal.SIGTERM)  # rpi4-2 goes offline
    assert wait_gone(Path(dev2.root) / "agent.pid")
    code, out, err = run_cli("keys", "rotate", "--fleet", simfleet.fleet_file, "--timeout", "5", "--json")
    first = json.loads(out)
    assert code == 4 and first["switched"] is False and first["old_key"] == old.key_id
    assert [d["outcome"] for d in first["devices"]] == ["both", "missed"] and "offline" in first["devices"][1]["reason"]
    assert fleet.key_store().operator.key_id == old.key_id  # nothing switched: every device still obeys the host
    assert (keys.folder / "operator-next.key").stat().st_mode & 0o777 == 0o600
    assert pinned(dev1) == [old.key_id, first["new_key"]] and pinned(dev2) == [old.key_id]

    assert deploy(fleet, [dev2], DeployOptions(digits_artifacts, variant="int8")).results[0].status == "succeeded"
    code, out, err = run_cli("keys", "rotate", "--fleet", simfleet.fleet_file, "--json")
    done = json.loads(out)
    assert code == 0, out + err
    assert done["switched"] and done["new_key"] == first["new_key"]  # the pending key, not another one
    assert [d["outcome"] for d in done["devices"]] == ["rotated", "rotated"]
    new = fleet.key_store().operator
    assert new.key_id == done["new_key"] and not (keys.folder / "operator-next.key").exists()
    assert (keys.folder / "retired" / f"operator-{old.key_id}.key").stat().st_mode & 0o777 == 0o600
    assert pinned(dev1) == pinned(dev2) == [new.key_id]
    with FleetClient.of(fleet) as client:  # signs with the new key
        assert client.request("rpi4-1", "state", timeout=30)["ok"] and client.request("rpi4-2", "state", timeout=30)["ok"]
    with FleetClient(fleet.broker, fleet.fleet, fleet.broker.password("x"), signer=old, keyring=keys.keyring()) as client:
        with pytest.raises(AgentTimeout):  # the retired key commands nothing any more
            client.request("rpi4-1", "state", timeout=3)
    for dev in fleet.devices:  # each agent's code still verifies under the pinned (new) key: it would start
        check = ("from device_agents.codecheck import verify_code; from pathlib import Path; "
                 f"verify_code(Path({dev.root!r}) / 'agent', Path({dev.root!r}) / 'identity' / 'operators.json')")
        assert subprocess.run([sys.executable, "-I", "-B", "-c", f"import sys; sys.path.insert(0, {dev.root + '/agent'!r}); "
                               + check], cwd=dev.root, timeout=60).returncode == 0
    assert not list((Path(dev1.root) / "agent").glob(".*tmp"))  # no temporary file left in the checked folder


def test_a_rotation_stopped_after_its_switch_is_finished_by_the_next_with_a_fresh_key(sim, run_cli):
    """Stopped between making the new key the operator's and removing operator-next.key, a rotation
    used to be 'finished' by rotating the key to itself: the live key filed under retired/ and reported
    as both the old and the new one."""
    import shutil

    simfleet, fleet = sim(1)
    keys = fleet.key_store()
    live = keys.operator.key_id
    shutil.copy2(keys.folder / "operator.key", keys.folder / "operator-next.key")  # where the stop left it
    code, out, err = run_cli("keys", "rotate", "--fleet", simfleet.fleet_file, "--json")
    done = json.loads(out)
    assert code == 0, out + err
    assert done["old_key"] == live and done["new_key"] != live and done["devices"][0]["outcome"] == "rotated"
    assert fleet.key_store().operator.key_id == done["new_key"]
    assert [p.name for p in (keys.folder / "retired").iterdir()] == [f"operator-{live}.key"]


def wait_for(check, timeout: float = 30.0) -> bool:
    """Return True once ``check()`` is true (a missing file counts as not yet), False after ``timeout``."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.1)
    return False


def wait_gone(path: Path, timeout: float = 30.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not path.exists()