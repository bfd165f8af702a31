"""Put the agent itself on a device: its code, its config, and a service that keeps it running.

The code goes as one tarball of ``device_agents`` and ``edgekit_protocol`` (the agent imports
nothing else of edge-kit; nothing of the host ships), built reproducibly so its sha256 says whether
a device is current.
It is unpacked into ``<root>/agent`` by a stdlib-only script (the device may not have the agent
yet) and swapped in with a rename. The device's Python must already have numpy, PyYAML, paho-mqtt
and a LiteRT interpreter: nothing installs itself; a missing module is reported with the command
that installs it.

The service is a systemd unit where systemd runs and the deploy user is root, else (and always on
a simulated device) the agent's own supervisor (``device_agents supervise``) started detached with
a pid file.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

import device_agents
import edge_kit
import edgekit_protocol
from device_agents import codecheck
from device_agents.disk import read_head, within_limit
from device_agents.identity import (
    OPERATOR,
    PROVISIONED,
    Keyring,
    Signer,
    decode_key,
    encode_key,
    key_id,
)
from device_agents.unit import render_unit
from edge_kit.config import SafeDumper
from edge_kit.errors import ConfigError, DeployError
from edge_kit.fleet.broker_setup import OPERATOR_USER
from edge_kit.fleet.inventory import Device, Fleet
from edge_kit.fleet.keys import KeyRevoked, revoked_on
from edge_kit.fleet.ssh import (
    AGENT_UNIT,
    MIN_PYTHON,
    RESTART_PENDING,
    DeviceShell,
    agent_unit,
)
from edge_kit.profiles import load_profile
from edgekit_protocol.config import (
    MAX_CA_BYTES,
    AgentConfig,
    BenchSettings,
    BrokerConfig,
    Node,
    PowerConfig,
    PullConfig,
    ServeConfig,
    StoreConfig,
    TlsConfig,
    build,
    to_plain,
)
from edgekit_protocol.errors import EdgeKitError
from edgekit_protocol.labels import clip

STOP_TIMEOUT_S = 30.0
BROKER_CA = "identity/broker-ca.pem"  # where the deploy puts the broker's CA on the device

# Each bundle gets a folder of its own, <root>/agent-<sha12>-<pid>, and <root>/agent is a symlink to the
# current one, switched with one rename: no moment without an agent, and a running agent (whose
# sys.path and working folder are its own version's real path) never imports a file of another
# version before the deploy restarts it. Older versions and what interrupted installs left are
# removed, never one a process runs from (its working folder: a second install before a restart
# keeps the version that still runs, not only the one <root>/agent named).
_INSTALL_BUNDLE = r"""
import hashlib, os, shutil, sys, tarfile
archive, sha, root, signed = sys.argv[1], sys.argv[2], os.path.expanduser(sys.argv[3]), sys.argv[4]
with open(archive, "rb") as f:
    if hashlib.sha256(f.read()).hexdigest() != sha:
        sys.exit("agent bundle: sha256 mismatch (corrupt or truncated upload); deploy again")
name = "agent-%s-%d" % (sha[:12], os.getpid())
new, live, link = os.path.join(root, name), os.path.join(root, "agent"), os.path.join(root, ".agent-link-%d" % os.getpid())
shutil.rmtree(new, ignore_errors=True)  # an interrupted install under a reused pid
try:
    with tarfile.open(archive) as t:
        try:
            t.extractall(new, filter="data")
        except TypeError:  # Python without extraction filters; the archive is our own
            t.extractall(new)
    with open(os.path.join(new, "AGENT.json"), "w") as f:
        f.write(signed)
except OSError as exc:  # a full or read-only disk: leave nothing of this attempt, the running agent untouched
    shutil.rmtree(new, ignore_errors=True)
    os.remove(archive)
    sys.exit("agent bundle: cannot unpack it under %s (%s); free space there (or make it writable) and deploy again"
             % (root, exc.strerror or exc))
running = os.path.basename(os.readlink(live)) if os.path.islink(live) else None
if os.path.isdir(live) and not os.path.islink(live):  # a folder, as deploys before versioned folders left it
    running = "agent-legacy-%d" % os.getpid()
    os.rename(live, os.path.join(root, running))
os.symlink(name, link)
os.replace(link, live)
# kept: every version a process runs from (its working folder; after an install whose restart did not
# happen, <root>/agent no longer names it), or without /proc the one <root>/agent named
proc = os.path.isdir("/proc/self")
in_use, real = (set() if proc else {running}), os.path.realpath(root)
for pid in os.listdir("/proc") if proc else []:
    try:
        cwd = os.readlink("/proc/%s/cwd" % pid) if pid.isdigit() else ""
    except OSError:  # gone meanwhile, or another user's
        continue
    if os.path.dirname(cwd) == real:
        in_use.add(os.path.basename(cwd))
for other in os.listdir(root):
    if other.startswith(("agent-", "agent.new-", "agent.old-", ".agent-link-")) and other != name and other not in in_use:
        path = os.path.join(root, other)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
os.remove(archive)
"""

_bundle_lock = threading.Lock()


def agent_bundle() -> tuple[bytes, str, dict[str, str]]:
    """Return the agent tarball, its sha256 (same bytes for the same code) and ``{path: sha256}`` of
    its files, as :func:`device_agents.codecheck.tree` lists them once unpacked.

    Built once per process, by the first caller: a deploy's devices ask for it at once, one thread each
    (``functools.cache`` alone let each of them build and gzip it: 16 times in a fresh ``edgekit deploy --parallel
    16``); the others wait for that one."""
    with _bundle_lock:
        return _build_bundle()


@functools.cache
def _build_bundle() -> tuple[bytes, str, dict[str, str]]:
    """Return what :func:`agent_bundle` returns, built from the packages' files (cached; call :func:`agent_bundle`)."""
    members = []
    for package in (device_agents, edgekit_protocol):
        folder = Path(package.__file__).parent
        members += [(p, str(p.relative_to(folder.parent))) for p in sorted(folder.rglob("*.py"))]
    buf = io.BytesIO()
    files = {}
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path, name in members:
            data = path.read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
            files[name] = hashlib.sha256(data).hexdigest()
    data = gzip.compress(buf.getvalue(), mtime=0)
    return data, hashlib.sha256(data).hexdigest(), dict(sorted(files.items()))


MAX_SHOWN_PATH = 200  # characters of a file name the device reports, as a deploy's result quotes it


def _code_state(shell: DeviceShell, operator: Keyring) -> str | None:
    """Return why the device's ``<root>/agent`` is not the signed current bundle, or None when it is.

    What the device holds comes from the shell's probe (:meth:`DeviceShell._probe`), which runs
    :mod:`device_agents.codecheck` as a script sent from this host (it does not trust the device's copy
    of the code it checks): every file's sha256, and the signed manifest.
    """
    _, sha, files = agent_bundle()
    found = shell.info["code"]
    if found["files"] is None:
        return "not installed"
    diff = codecheck.differences(files, found["files"])
    if diff:
        # the device's file names are its word, any length (a deploy's table shows them): each cut
        return ("code differs: " + ", ".join(clip(d, MAX_SHOWN_PATH) for d in diff[:3])
                + (f" and {len(diff) - 3} more" if len(diff) > 3 else ""))
    try:
        doc = json.loads(found["manifest"] or "")
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        operator.verify(doc, OPERATOR)
    except (ValueError, RecursionError, EdgeKitError):  # RecursionError: nested deeper than the parser goes
        return "its signed manifest is missing or not this operator's"
    if doc.get("bundle") != sha or doc.get("files") != files:
        return "its signed manifest is for other code"
    return None


def agent_config(fleet: Fleet, dev: Device) -> tuple[str, bytes | None]:
    """Return the device's ``agent.yaml`` text and the broker password to ship beside it (or None).

    The text is written from the protocol's one config model and read back through the agent's own
    check, so a deploy never ships a config the agent would refuse.

    Raises:
        ConfigError: the broker's password file cannot be read, or the config fails the agent's check.
    """
    profile = load_profile(dev.profile)
    broker: BrokerConfig = dev.agent_broker or fleet.broker
    if broker.username == OPERATOR_USER:
        raise ConfigError(f"fleet file, device {dev.name}: the agent would connect as the operator "
                          f"('{OPERATOR_USER}'); give the device agent_broker credentials of its own")
    root = dev.root.rstrip("/")  # as written in the fleet file; the agent expands ~
    password = broker.password(f"fleet file, device {dev.name}")
    delegate = profile.runtime.delegate
    if dev.simulated and delegate in ("edgetpu", "gpu"):
        delegate = "xnnpack"  # a virtual device has no accelerator; its records say delegate xnnpack, simulated
    storage = dev.storage or profile.storage
    cfg = AgentConfig(
        device=dev.name, fleet=fleet.fleet, profile=profile.name, root=Path(root),
        broker=BrokerConfig(host=broker.host, port=broker.port, username=broker.username,
                            password_file=Path(root, "mqtt.pass") if password is not None else None,
                            tls=TlsConfig(ca=Path(root, BROKER_CA), cert=broker.tls.cert, key=broker.tls.key)
                            if broker.tls and broker.tls.ca else broker.tls),
        bench=BenchSettings(threads=profile.runtime.threads, delegate=delegate, runtime=profile.runtime.engine,
                            delegate_options=dict(profile.runtime.options) if delegate == profile.runtime.delegate else {}),
        # a simulated device probes no sensor: this machine's (a CPU package's RAPL, a GPU's hwmon) measures the whole
        # host, not the device it simulates; the profile's idle/busy estimate is per device and says it is one
        power=PowerConfig(sensors=() if dev.simulated else tuple(profile.power.sensors), idle_w=profile.power.idle_w,
                          busy_w=profile.power.busy_w, cores=profile.hardware.cores),
        store=StoreConfig(max_store_mb=storage.max_store_mb),
        serve=ServeConfig(**dev.serve.model_dump()) if dev.serve else ServeConfig(),
        pull=PullConfig(**{**dev.pull.model_dump(), "ca_file": Path(dev.pull.ca_file) if dev.pull.ca_file else None})
        if dev.pull else PullConfig(),
        simulated=dev.simulated,
        **({"telemetry_interval_s": dev.telemetry_interval_s} if dev.telemetry_interval_s is not None else {}),
        verify_code=True,  # deployed: the agent refuses to start from anywhere but its signed <root>/agent
    )
    plain = to_plain(cfg)
    build(Node.plain(plain), f"agent.yaml for {dev.name}")
    header = f"# written by edgekit deploy for {dev.name}; edits are replaced on the next deploy\n"
    return header + yaml.dump(plain, Dumper=SafeDumper, sort_keys=False), (password.encode() + b"\n") if password is not None else None


@dataclass
class AgentState:
    """What ensuring the agent did on one device."""

    changed: list[str]
    restarted_at: float | None  # host clock, when the service was (re)started


def ensure_agent(shell: DeviceShell, fleet: Fleet, new_key: bool = False) -> AgentState:
    """Make the device run the current agent code with its current config. ``new_key``: give the device a
    fresh key pair, replacing the one it holds (the way back for a device whose key was revoked).

    Returns:
        What changed and, when the service was (re)started, when.

    Raises:
        KeyRevoked: ``new_key`` is not given and the device holds a revoked key, or was revoked and has no key
            registered since (whatever key it holds now); checked before anything is written to the device.
        DeployError: the device's Python lacks a dependency (with the pip command), an upload or a
            remote step failed.
        ConfigError: the fleet's broker.tls.ca cannot be read, is no regular file or is over :data:`MAX_CA_BYTES`.
    """
    dev, info = shell.dev, shell.info
    if not new_key:
        _check_not_revoked(shell, fleet)
    root = shell.root
    changed: list[str] = []
    marked = info["restart_pending"]

    def before_change() -> None:  # the marker goes first: a cut after any write still restarts next time
        nonlocal marked
        if not marked:
            shell.put(b"a deploy changed the agent's files; the next deploy restarts it\n", f"{root}/{RESTART_PENDING}")
            marked = True

    data, sha, files = agent_bundle()
    operator = fleet.key_store().operator
    why = _code_state(shell, Keyring(operators=[operator.public]))
    if why is not None:
        facts = shell.python_facts
        if tuple(facts["version"]) < MIN_PYTHON:
            raise DeployError(f"{dev.name}: the device's Python ({facts['python']}) is "
                              f"{'.'.join(map(str, facts['version']))}; the agent needs "
                              f"{'.'.join(map(str, MIN_PYTHON))} or newer: install it there and set `python:` for "
                              "the device in the fleet file")
        if facts["missing"]:
            raise DeployError(f"{dev.name}: the device's Python ({facts['python']}) lacks {', '.join(facts['missing'])}; "
                              f"install: {facts['python']} -m pip install numpy pyyaml paho-mqtt cryptography ai-edge-litert")
        before_change()
        part = shell.put(data, f"{root}/incoming/agent-{sha[:12]}.tar.gz", rename=False)
        signed = json.dumps(operator.sign(codecheck.code_manifest(files, sha)), indent=1)
        shell.run([dev.python, "-c", _INSTALL_BUNDLE, part, sha, root, signed])
        changed.append(f"agent {edge_kit.__version__} ({sha[:12]})" + ("" if why == "not installed" else f", reinstalled: {why}"))
    changed += _ensure_identity(shell, fleet, before_change, new_key)
    broker = dev.agent_broker or fleet.broker
    if broker.tls and broker.tls.ca:  # the CA the agent checks the broker's certificate against
        path, fix = Path(broker.tls.ca).expanduser(), "set broker.tls.ca in the fleet file to the broker's CA certificate (PEM)"
        try:  # a regular file only, read no further than a CA bundle goes: a FIFO waited for a writer, holding the deploy
            ca = within_limit(read_head(path, MAX_CA_BYTES), MAX_CA_BYTES, f"broker.tls.ca {path}")
        except OSError as exc:
            raise ConfigError(f"fleet file, device {dev.name}: broker.tls.ca {path}: {exc.strerror}; {fix}") from None
        except ValueError as exc:  # over the limit: the text names the file
            raise ConfigError(f"fleet file, device {dev.name}: {exc}; {fix}") from None
        if info["broker_ca_sha256"] != hashlib.sha256(ca).hexdigest():
            before_change()
            shell.put(ca, f"{root}/{BROKER_CA}")
            changed.append("broker CA")
    text, password = agent_config(fleet, dev)
    if password is not None and info["password_sha256"] != hashlib.sha256(password).hexdigest():
        before_change()
        shell.put(password, f"{root}/mqtt.pass", mode=0o600)
        changed.append("broker password")
    if info["config_sha256"] != hashlib.sha256(text.encode()).hexdigest():
        before_change()
        shell.put(text.encode(), f"{root}/agent.yaml", mode=0o600)
        changed.append("agent.yaml")
    if info["restart_pending"] and not changed:
        changed.append("an interrupted deploy's changes")
    # A simulated device shares the host's systemd with its siblings: it always gets the supervisor,
    # which `edgekit sim down` stops, and never touches the host's units.
    systemd = agent_unit(dev) is not None and info["systemd"]
    running = bool(info["unit_active"]) if systemd else info["agent_pid"] is not None
    if running and not changed:
        return AgentState(changed, None)
    started = time.time()
    if systemd:
        _systemd_start(shell, root)
    else:
        if running:
            _stop_supervisor(shell, info["agent_pid"])
        shell.run([dev.python, "-B", "-m", "device_agents", "supervise", "--config", f"{root}/agent.yaml",
                   "--pidfile", f"{root}/agent.pid", "--log-file", f"{root}/agent.log"],
                  env={"PYTHONPATH": f"{root}/agent"}, background=True, cwd=f"{root}/agent")
    if marked:
        shell.remove(f"{root}/{RESTART_PENDING}")
    changed.append("service restarted" if running else "service started")
    return AgentState(changed, started)


def _device_public(shell: DeviceShell) -> bytes | None:
    """Return the public key the device holds (read over SSH by the probe), or None when it has no key or
    the public half is unreadable (then it gets a new key)."""
    info = shell.info
    if info["device_pub"] and info["has_device_key"]:
        try:
            return decode_key(info["device_pub"], f"{shell.dev.name}: identity/device.pub")
        except ConfigError:
            return None
    return None


def _check_not_revoked(shell: DeviceShell, fleet: Fleet) -> None:
    """Return None unless the key the device holds is in the fleet's revoked list, or the device was revoked and no
    key registered for it since, whatever key it holds now (a thief's device that made itself a new pair, or removed
    its key for the deploy to provision one, is not let back in by a deploy without ``--new-key``).

    Raises:
        KeyRevoked: it is (one line: the device, the key, when, and the way back).
        ConfigError: the registry or the revoked list cannot be read.
    """
    keys, name = fleet.key_store(), shell.dev.name
    public = _device_public(shell)
    entry = keys.revocation(public) if public is not None else None
    if entry is not None:
        raise KeyRevoked(f"{name}: its key {entry['key_id']} was revoked on {revoked_on(entry)}: re-image it "
                         "or run deploy with --new-key to give it a fresh key pair")
    entry = keys.revoked_devices().get(name)
    if entry is not None:
        raise KeyRevoked(f"{name}: revoked on {revoked_on(entry)} (key {entry['key_id']}) and it now holds "
                         f"{'another key' if public is not None else 'no key'}: a deploy gives a revoked device a key "
                         "only with --new-key, once you trust it again (re-imaged)")


def _ensure_identity(shell: DeviceShell, fleet: Fleet, before_change: Callable[[], None],
                     new_key: bool = False) -> list[str]:
    """Give the device its signing key (once, or a fresh one with ``new_key``) and the operator keys it accepts
    commands from; ``before_change`` is called before the first write to the device.

    A device without a key (or with ``new_key``) gets a fresh one, generated here, written over SSH (mode 600
    before a byte is written, replacing the old key; the old ``device.pub`` removed first, so a deploy cut off before
    the new one is written leaves a device the next deploy gives a key again) and registered; this host keeps no copy. A device that has
    one is registered with the public key it holds (read over SSH, whose host key the deploy verified).
    Returns what changed.

    Raises:
        DeployError: a write failed. KeyRevoked: the key it holds was revoked (without ``new_key``).
        ConfigError: the fleet's keys cannot be read.
    """
    keys, info, root = fleet.key_store(), shell.info, shell.root
    changed = []
    public = None if new_key else _device_public(shell)  # None: unreadable or none, given a new key below
    if public is None:
        signer = Signer.generate()
        before_change()
        # the floor of its command horizon: a command captured before its root was wiped is never run again;
        # written before the key, as a later deploy writes it only with a new key (one cut off after the key
        # would leave a device that has a key and no floor, for good)
        shell.put(json.dumps({"at": time.time()}).encode(), f"{root}/identity/{PROVISIONED}")
        if info["device_pub"]:  # the old public half goes first: a cut after the new private half leaves a device
            shell.remove(f"{root}/identity/device.pub")  # with no public key, given a new pair next time (never the
        shell.put(signer.pem(), f"{root}/identity/device.key", mode=0o600)  # old half registered beside the new key)
        shell.put((encode_key(signer.public) + "\n").encode(), f"{root}/identity/device.pub")
        public = signer.public
        changed.append(f"device key {key_id(public)} provisioned" + (" (a fresh key pair: --new-key)" if new_key else ""))
    if keys.register(shell.dev.name, public) and not changed:
        changed.append(f"device key {key_id(public)} registered")
    pinned = keys.operators_json()
    if info["operators_sha256"] != hashlib.sha256(pinned).hexdigest():
        before_change()
        shell.put(pinned, f"{root}/identity/operators.json")
        changed.append("operator key pinned")
    return changed


def _stop_supervisor(shell: DeviceShell, pid: int) -> None:
    script = (f"kill -TERM {pid} 2>/dev/null; for i in $(seq {int(STOP_TIMEOUT_S * 10)}); do "
              f"kill -0 {pid} 2>/dev/null || exit 0; sleep 0.1; done; exit 1")
    try:
        shell.run(["sh", "-c", script], timeout=STOP_TIMEOUT_S + 5)
    except DeployError:
        raise DeployError(f"{shell.dev.name}: the agent (pid {pid}) did not stop within {STOP_TIMEOUT_S:.0f} s") from None


def _systemd_start(shell: DeviceShell, root: str) -> None:
    dev = shell.dev
    unit = render_unit(f"{root}/agent.yaml", python=dev.python, workdir=f"{root}/agent", env={"PYTHONPATH": f"{root}/agent"})
    shell.put(unit.encode(), f"/etc/systemd/system/{AGENT_UNIT}.service")
    for argv in (["systemctl", "daemon-reload"], ["systemctl", "enable", AGENT_UNIT], ["systemctl", "restart", AGENT_UNIT]):
        shell.run(argv)


