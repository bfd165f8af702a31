"""`edgekit sim`: a fleet of virtual devices on this machine.

``up`` starts an MQTT broker (Mosquitto, or the embedded one when Mosquitto is missing), one sshd
per device on a loopback port with its own host key and root folder, writes ``fleet.yaml`` and
``known_hosts`` for them, and starts the real agent on each through the same SSH path a deploy
uses. The agents run the real LiteRT interpreter on this machine's CPU: every record is a real
measurement of this machine, marked ``simulated: true``; nothing slows them down to imitate the
profile's hardware. With ``link_rate`` each device sits in its own network namespace behind an
emulated link of that rate (:mod:`edge_kit.sim.links`) instead of on loopback. ``down`` stops
everything ``up`` started, found through ``sim.json``.
"""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edge_kit.errors import ConfigError, EdgeKitError, InputError
from edge_kit.fleet.agent_install import ensure_agent
from edge_kit.fleet.broker_setup import (
    OPERATOR_USER,
    BrokerWall,
    broker_entry,
    build_wall,
)
from edge_kit.fleet.commands import FleetClient
from edge_kit.fleet.inventory import Fleet, load_fleet
from edge_kit.fleet.keys import FleetKeys
from edge_kit.fleet.ssh import DeviceShell
from edge_kit.fsutil import atomic_write_text, writable_folder
from edge_kit.profiles import load_profile
from edge_kit.sim.broker import MosquittoBroker, find_mosquitto, free_port, wait_port
from edge_kit.sim.links import Links, create_links, remove_links
from edge_kit.sim.process import (
    interrupts_deferred,
    processes,
    started_at,
    terminate_pid,
    terminate_pids,
)
from edge_kit.sim.ssh import SshEndpoint, known_hosts_line, write_keypair
from edge_kit.sim.store_server import start_store_server, store_folder

STATE = "sim.json"
FLEET_NAME = "sim"
ONLINE_TIMEOUT_S = 60.0


TFLITE_PYTHON_ENV = "EDGEKIT_TFLITE_PYTHON"  # a Python with tflite-runtime (numpy<2), in place of .venv-tflite's


def tflite_python() -> Path | None:
    """Return the Python of the checkout's ``.venv-tflite`` (tflite-runtime with numpy<2, which ``.ci/setup`` makes
    where Python is 3.11 or older): ``$EDGEKIT_TFLITE_PYTHON`` when set, else ``.venv-tflite/bin/python`` beside the
    checkout ``edge_kit`` is imported from or beside this Python's own environment, the first that exists; None
    when none does."""
    import os

    if os.environ.get(TFLITE_PYTHON_ENV):
        return Path(os.environ[TFLITE_PYTHON_ENV])
    places = (Path(__file__).resolve().parents[2], Path(sys.prefix).resolve().parent)
    return next((p / ".venv-tflite" / "bin" / "python" for p in places
                 if (p / ".venv-tflite" / "bin" / "python").exists()), None)


def engine_pythons(profiles: list[str]) -> dict[str, str]:
    """Return ``{profile: python}`` for the profiles whose ``runtime.engine`` this Python lacks (``coral-devboard``
    on ``tflite-runtime``, which needs numpy<2): their simulated devices run the agent with the checkout's
    ``.venv-tflite`` (:func:`tflite_python`); profiles on this Python's engine are not in it.

    Raises:
        InputError: there is no such Python: one line naming the profile, the engine, and to run ``bash .ci/setup``
            (or set ``$EDGEKIT_TFLITE_PYTHON``, or leave the profile out); nothing is started.
    """
    import importlib.util

    from device_agents.runtimes import RUNTIMES

    out: dict[str, str] = {}
    for name in dict.fromkeys(profiles):
        engine = load_profile(name).runtime.engine
        if importlib.util.find_spec(RUNTIMES[engine].module.split(".")[0]) is not None:
            continue
        python = tflite_python() if engine == "tflite-runtime" else None
        if python is None:
            raise InputError(f"profile {name} runs its variants on {engine} (its runtime.engine), which this Python "
                             f"({sys.executable}) lacks, and there is no .venv-tflite for its simulated devices: run "
                             f"`bash .ci/setup` (it makes .venv-tflite with {RUNTIMES[engine].package} and numpy<2, on "
                             f"Python 3.11 or older), or set {TFLITE_PYTHON_ENV} to a Python that has it, or leave "
                             f"{name} out of --profiles; nothing was started")
        out[name] = str(python)
    return out


def device_names(count: int, profiles: list[str]) -> list[tuple[str, str]]:
    """Return ``(name, profile)`` for ``count`` devices, cycling through ``profiles``."""
    seen: dict[str, int] = {}
    out = []
    for i in range(count):
        profile = profiles[i % len(profiles)]
        seen[profile] = seen.get(profile, 0) + 1
        out.append((f"{profile}-{seen[profile]}", profile))
    return out


@dataclass
class Down:
    """What :meth:`SimFleet.down` did: ``stopped`` (running, now stopped or removed) and ``not_running`` (already
    ended, or its pid now another process's: left alone, its record removed), each a list of names such as
    ``broker (mosquitto)`` or ``sshd d0``."""

    stopped: list[str] = field(default_factory=list)
    not_running: list[str] = field(default_factory=list)


class SimFleet:
    """The virtual fleet living in ``workdir`` (its ``fleet.yaml`` is what the other commands take)."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir).resolve()
        self.state_file = self.workdir / STATE
        self.fleet_file = self.workdir / "fleet.yaml"
        self.keys_folder = self.workdir / "keys"  # the fleet's keys, kept by `down`

    def state(self) -> dict[str, Any] | None:
        """Return what ``up`` recorded, or None when nothing is up here (no ``sim.json``).

        Raises:
            ConfigError: ``sim.json`` is there but unreadable, not JSON or not what ``up`` writes: what it started
                cannot be told, so nothing may be started over it nor be said to be down.
        """
        try:
            state = json.loads(self.state_file.read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError):  # no sim.json, or no such folder: nothing is up here
            return None
        except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
            state, why = None, str(exc)
        else:
            why = "not what `edgekit sim up` writes"
        if not (isinstance(state, dict) and isinstance(state.get("devices"), list)
                and all(isinstance(d, dict) for d in state["devices"])):
            raise ConfigError(f"{self.state_file}: unreadable ({why}), so what `edgekit sim up` started here cannot be "
                              "told: stop its broker, sshd and agent processes by hand, then remove the file")
        return state

    def up(self, count: int, profiles: list[str], *, embedded_broker: bool | None = None,
           embedded_ssh: bool | None = None, link_rate: int | None = None, insecure: bool = False,
           store: Path | None = None, telemetry_interval_s: float | None = None,
           progress: Callable[[str], None] | None = None) -> Fleet:
        """Start the broker, ``count`` devices and their agents; return the fleet.

        ``link_rate`` (bit/s) puts each device behind an emulated link of that rate; None: loopback.
        The broker is Mosquitto with a password per device and for the operator, the fleet's ACL
        and TLS (:mod:`edge_kit.fleet.broker_setup`); ``insecure`` runs it anonymous and plain
        instead (the embedded broker, used where Mosquitto is missing, is always that).
        ``store``: a published store folder served over HTTP next to the broker (nginx, or the
        embedded server where nginx is missing; :mod:`edge_kit.sim.store_server`), its URL in
        ``sim.json`` under ``store``. ``telemetry_interval_s``: the agents' (the fleet file's default;
        None: the agent's own, 30 s).

        Raises:
            ConfigError: an unknown profile; a ``sim.json`` here that cannot be read (:meth:`state`).
            InputError: the folder cannot be created or written, holds a fleet file a simulated fleet did not
                write, ``store`` is not a folder, the embedded broker is asked for without ``insecure``, or a
                profile's ``runtime.engine`` (``tflite-runtime``) is in neither this Python nor a ``.venv-tflite``
                (:func:`engine_pythons`) (nothing is started).
            EdgeKitError: already up here, the links could not be made, or a service did not start (nothing
                is left running).
        """
        step = progress or (lambda _m: None)
        if count < 1:
            raise EdgeKitError("--devices must be at least 1")
        for p in profiles:
            load_profile(p)
        pythons = engine_pythons(profiles)  # before anything starts: a coral-devboard needs tflite-runtime's Python
        if self.state() is not None:
            raise EdgeKitError(f"a simulated fleet is already up in {self.workdir}; run `edgekit sim down --dir {self.workdir}` first")
        if embedded_broker is None:
            embedded_broker = find_mosquitto() is None
        if embedded_broker and not insecure:
            raise InputError("the embedded broker has no credentials, ACL or TLS: install Mosquitto "
                             "(apt install mosquitto), or pass --insecure to run it anonymous and plain")
        if store is not None:
            store_folder(store)  # before anything starts: a mistyped --store leaves no broker files behind
        self._check_own_fleet_file()
        names = device_names(count, profiles)
        writable_folder(self.workdir, "--dir")
        state: dict[str, Any] = {"broker": None, "devices": [], "links": None, "fleet_file": str(self.fleet_file)}
        try:
            links = None
            if link_rate is not None:
                step("creating the emulated links")
                links = create_links(count, link_rate)
                state["links"] = links.to_state()
                self._save(state)
            broker_host = links.host_address if links else "127.0.0.1"
            # a device revoked in this folder (`fleet revoke`, kept by `down`) gets no broker user and no password
            # file: `deploy --new-key --devices NAME` adds it back with a fresh password
            revoked = set(FleetKeys(self.keys_folder).revoked_devices())
            wall = None if insecure else build_wall(self.workdir / "broker-wall", FLEET_NAME, [n for n, _ in names],
                                                      [broker_host], left_out=revoked)
            step("starting the MQTT broker")
            state["broker"] = self._start_broker(embedded_broker, broker_host, wall)
            self._save(state)
            if store is not None:
                step("starting the artifact store's HTTP server")
                server = start_store_server(Path(store), host=broker_host, workdir=self.workdir / "store-server")
                state["store"] = {"kind": server.kind, "url": server.url, "folder": str(Path(store).resolve()),
                                  "pid": server.proc.pid if server.proc is not None else None,
                                  "started": started_at(server.proc.pid) if server.proc is not None else None}
                if server.proc is None:  # the embedded server lives in this process: it would die with it
                    server.stop()
                    raise EdgeKitError("nginx is not installed (apt install nginx-light): `sim up --store` needs it "
                                       "to keep serving after this command returns")
                self._save(state)
            key = self.workdir / "id_ed25519"
            public = write_keypair(key, "edge-kit-sim")
            known = []
            devices = []
            for i, (name, profile) in enumerate(names):
                step(f"starting the SSH server for {name}")
                folder = self.workdir / "devices" / name
                where = {"host": links.address(i), "port": 22, "wrap": links.wrap(i)} if links else {}
                # a home of its own: a device's shell does not run this host user's start-up files (bash
                # sources ~/.bashrc for every SSH command; a pyenv or conda init there costs 100 ms a command)
                (folder / "home").mkdir(parents=True, exist_ok=True)
                ssh = SshEndpoint(folder / "ssh", public, embedded=embedded_ssh, settings=(f'SetEnv "HOME={folder / "home"}"',),
                                  **where).start()
                state["devices"].append({"name": name, "profile": profile, "sshd_pid": ssh.proc.pid,
                                         "sshd_started": started_at(ssh.proc.pid), "port": ssh.port,
                                         "ssh": ssh.kind, "root": str(folder / "root")})
                self._save(state)
                known.append(known_hosts_line(ssh.host, ssh.port, ssh.host_public))
                devices.append({"name": name, "host": ssh.host, "port": ssh.port, "profile": profile,
                                "root": str(folder / "root"), "tags": [profile, "sim"],
                                **({"python": pythons[profile]} if profile in pythons else {}),
                                **({"agent_broker": self._broker_entry(state, wall, name)} if wall else {})})
            (self.workdir / "known_hosts").write_text("\n".join(known) + "\n")
            self.fleet_file.write_text(yaml.safe_dump({
                "fleet": FLEET_NAME,
                "broker": self._broker_entry(state, wall, OPERATOR_USER),
                "known_hosts": str(self.workdir / "known_hosts"), "keys": str(self.keys_folder),
                "defaults": {"user": getpass.getuser(), "key": str(key), "python": sys.executable, "simulated": True,
                             **({"telemetry_interval_s": telemetry_interval_s} if telemetry_interval_s else {})},
                "devices": devices,
            }, sort_keys=False))
            fleet = load_fleet(self.fleet_file)
            step("starting the agents")
            state["revoked"] = self.start_agents(fleet)  # left out: `sim up` after `fleet revoke` in this folder
            self._save(state)
            return fleet
        except BaseException:
            self.down()
            raise

    def broker_passwd(self) -> Path | None:
        """Return the password file of the broker ``up`` started here when it is Mosquitto with credentials (the
        fleet's broker wall); None when nothing is up here or the broker takes anyone (``--insecure``, embedded).

        Raises:
            ConfigError: ``sim.json`` cannot be read (:meth:`state`).
        """
        state = self.state()
        broker = (state or {}).get("broker") or {}
        if not str(broker.get("kind", "")).startswith("mosquitto (credentials"):
            return None
        return self.workdir / "broker" / "passwd"

    def reload_broker(self) -> bool:
        """Tell the Mosquitto ``up`` started here to read its password file and ACL again (SIGHUP); return whether
        it was running (and is still the process ``up`` started) to be told.

        Raises:
            ConfigError: ``sim.json`` cannot be read (:meth:`state`).
        """
        import os
        import signal

        broker = (self.state() or {}).get("broker") or {}
        pid = broker.get("pid")
        if not isinstance(pid, int) or started_at(pid) is None or started_at(pid) != broker.get("started"):
            return False
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            return False
        return True

    def start_agents(self, fleet: Fleet) -> list[str]:
        """Deploy and start the agent on every device over SSH whose key was not revoked; wait until each is online.

        Returns:
            The devices left out, in the fleet file's order: revoked (``edgekit fleet revoke``) and no key registered
            since. A deploy would refuse each (and end ``up``); ``edgekit deploy --new-key`` brings one back.

        Raises:
            EdgeKitError: an agent could not be started or did not come online (names the device).
            ConfigError: the fleet's key registry or revoked list cannot be read.
        """
        revoked = fleet.key_store().revoked_devices()
        with FleetClient.of(fleet) as client:
            def one(dev: Any) -> None:
                with DeviceShell(dev, fleet.known_hosts) as shell:
                    started = ensure_agent(shell, fleet).restarted_at
                if started is not None and client.wait_online(dev.name, started, ONLINE_TIMEOUT_S) is None:
                    raise EdgeKitError(f"{dev.name}: the agent did not come online within {ONLINE_TIMEOUT_S:.0f} s; "
                                       f"see {dev.root}/agent.log")

            with ThreadPoolExecutor(max_workers=8) as pool:
                for fut in [pool.submit(one, d) for d in fleet.devices if d.name not in revoked]:
                    fut.result()
        return [d.name for d in fleet.devices if d.name in revoked]

    @staticmethod
    def _broker_entry(state: dict[str, Any], wall: BrokerWall | None, user: str) -> dict[str, Any]:
        """Return the fleet file's broker settings for ``user`` (the operator, or a device's agent)."""
        return broker_entry(state["broker"]["host"], state["broker"]["port"], wall, user)

    def _start_broker(self, embedded: bool, host: str, wall: BrokerWall | None) -> dict[str, Any]:
        """Start the broker (Mosquitto with ``wall``'s users, which leave revoked devices out, its ACL and TLS;
        anonymous without a wall; the embedded one when ``embedded``); return what ``sim.json`` records of it.

        Raises:
            EdgeKitError: it did not start (its log is named).
        """
        if not embedded:
            broker = MosquittoBroker(self.workdir / "broker", host=host, users=wall.users if wall else None,
                                     acl=wall.acl if wall else None, tls=wall.tls if wall else None).start()
            return {"kind": "mosquitto" + (" (credentials, ACL, TLS)" if wall else " (anonymous, --insecure)"),
                    "host": host, "port": broker.port, "pid": broker.proc.pid, "started": started_at(broker.proc.pid)}
        port = free_port(host)
        with open(self.workdir / "embedded-broker.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-W", "ignore", "-m", "edge_kit.sim.embedded_broker", "--host", host,
                                     "--port", str(port)], stdout=log, stderr=log, start_new_session=True)
        if not wait_port(host, port, 20):
            terminate_pid(proc.pid)
            raise EdgeKitError(f"the embedded MQTT broker did not start; see {self.workdir / 'embedded-broker.log'}")
        return {"kind": "embedded (amqtt, anonymous)", "host": host, "port": port, "pid": proc.pid,
                "started": started_at(proc.pid)}

    def _check_own_fleet_file(self) -> None:
        """Raise InputError when ``fleet.yaml`` here is not one a simulated fleet wrote (``up`` replaces it, with
        ``known_hosts`` and the SSH key beside it): ``--dir`` naming a real fleet's folder must not lose its
        fleet file. Return nothing otherwise."""
        try:
            data = yaml.safe_load(self.fleet_file.read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError):
            return
        except (OSError, ValueError, yaml.YAMLError):
            data = None
        defaults = data.get("defaults") if isinstance(data, dict) else None
        if not (isinstance(defaults, dict) and defaults.get("simulated") is True):
            raise InputError(f"{self.fleet_file}: a fleet file `edgekit sim up` did not write (not simulated), which "
                             "it would replace; choose another --dir")

    def _save(self, state: dict[str, Any]) -> None:
        atomic_write_text(self.state_file, json.dumps(state, indent=2))

    def down(self) -> Down:
        """Stop the agents, the sshds and the broker this fleet started; return what was stopped and what had
        already ended (its record is cleaned up all the same).

        Ctrl-C does not cut it short (it often comes while a run cleans up): it is raised as
        KeyboardInterrupt once everything is stopped.

        Raises:
            ConfigError: ``sim.json`` cannot be read (:meth:`state`); nothing is stopped.
            InputError: the folder is a file (it said "nothing is up" of one, exit 0).
        """
        with interrupts_deferred():
            return self._down()

    def _down(self) -> Down:
        from device_agents.supervise import is_supervisor

        result = Down()
        if self.workdir.exists() and not self.workdir.is_dir():
            raise InputError(f"{self.workdir}: a file, not a folder; give --dir the simulated fleet's folder "
                             "(default .edgekit-sim)")
        state = self.state()
        if state is None:
            return result

        def stop(what: str, pid: int | None, started: int | None) -> None:
            # each pid only while it is still the process `sim up` started (its start time, recorded then)
            (result.stopped if terminate_pid(pid, started=started) else result.not_running).append(what)

        # every supervisor of a device's root, found by its command line: not agent.pid, which after a reboot may
        # name another process and is written only after a deploy that has just restarted the agent returned. All
        # are stopped together (each agent takes a moment to say offline).
        supervisors = {dev["name"]: processes(lambda cmdline, root=dev["root"]: is_supervisor(cmdline, root))
                       for dev in state["devices"]}
        terminate_pids([(pid, None) for pids in supervisors.values() for pid in pids])
        for name, pids in supervisors.items():
            (result.stopped if pids else result.not_running).append(f"agent {name}")
        for dev in state["devices"]:
            stop(f"sshd {dev['name']}", dev["sshd_pid"], dev.get("sshd_started"))
        if state.get("store") and state["store"].get("pid"):
            stop(f"store server ({state['store']['kind']})", state["store"]["pid"], state["store"].get("started"))
        if state.get("broker"):
            stop(f"broker ({state['broker']['kind']})", state["broker"]["pid"], state["broker"].get("started"))
        if state.get("links"):
            remove_links(Links(**state["links"]))
            result.stopped.append("emulated links")
        self.state_file.unlink(missing_ok=True)
        return result

