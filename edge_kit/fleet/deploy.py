"""`edgekit deploy`: push the agent and a compiled model's variants to devices, activate, check health.

Per device, over one SSH connection (Fabric) with its host key verified:

1. make sure the agent code, its config and its service are current (:mod:`edge_kit.fleet.agent_install`);
2. upload every variant the device's profile asks for that it does not hold yet, with the eval set,
   each as ``*.part`` (SFTP); the running agent's ``install`` command checks the sha256 against the
   manifest and moves it into ``models/<sha256>/``, so a deploy starts no process on the device
   (without a broker, ``edgekit-agent install`` over SSH does the same);
3. activate the target variant by asking the running agent over MQTT: it checks the sha256, runs a
   smoke inference in a child process, switches ``current`` atomically (``previous`` kept) and
   acks; that ack is the health report (after a restart, the agent's ``online`` status comes first).
   A refusal leaves the device as it was; no ack in time means it is rolled back to ``previous``
   if it had switched, and reported failed. Without a broker, activation runs over SSH;
4. with ``health_bench`` (canaries, tune), a fresh benchmark of the activated model too; failing
   that also rolls the device back.

Before uploading, the deploy's probe hashes the device's stored copies of the variants it would deploy
(``repair``, on by default; the rule is :func:`device_agents.store.damage`, the agent's own): a model
whose artifact or eval set no longer matches its sha256, or whose ``meta.json`` is unreadable or out of contract
(:func:`device_agents.store.read_meta`), is
uploaded again and replaces the damaged copy.

Devices run in parallel (``parallel`` at a time); one device's failure never stops the others.
Canary rollouts, which judge the health benchmarks against each device's constraints, are
orchestration and live in :mod:`edge_kit.loop.rollout`.
"""

from __future__ import annotations

import difflib
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from device_agents.targets import compiler_of
from device_agents.targets.edgetpu import TURN_WAIT_S
from edge_kit.errors import (
    AgentError,
    AgentTimeout,
    DeployError,
    DeployInterrupted,
    EdgeKitError,
    InputError,
    NotBuiltFor,
)
from edge_kit.fleet.agent_install import ensure_agent
from edge_kit.fleet.commands import FleetClient
from edge_kit.fleet.inventory import Device, Fleet
from edge_kit.fleet.keys import readmit_hint, revoked_on
from edge_kit.fleet.ssh import COMMAND_TIMEOUT_S, Cancelled, DeviceShell
from edge_kit.fsutil import sha256_file
from edge_kit.manifest import Artifact, Manifest, read_manifest
from edge_kit.profiles import load_profile
from edgekit_protocol.messages import disk_free_bytes, field_at, in_range

Status = Literal["succeeded", "skipped", "failed"]


SECONDS_METHOD = ("measured: this host's wall clock (time.perf_counter) per device, from the start of its deploy "
                  "(connecting, uploading, installing, activating, the health benchmark) to its result")


def size_text(n: int | float) -> str:
    """Return a byte count as the deploy prints it: ``0.8 MB`` from 100 kB up, ``3.9 kB`` below, ``512 bytes`` below
    1 kB, so a small model's upload never reads ``0.0 MB``."""
    if n >= 100_000:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} kB" if n >= 1000 else f"{int(n)} bytes"


@dataclass
class DeviceResult:
    """The outcome on one device: typed fields to decide on, ``actions`` and ``reason`` to read.

    ``error`` keeps the exception that failed the device (``reason`` is its text); decisions use
    ``status``, ``activated`` and ``rolled_back``, never the text.
    """

    device: str
    status: Status
    reason: str | None = None
    actions: list[str] = field(default_factory=list)
    variant: str | None = None  # active after the deploy
    sha256: str | None = None
    seconds: float = 0.0  # SECONDS_METHOD
    activated: bool = False  # this deploy switched the device's current model
    rolled_back: bool = False  # and it was switched back to its previous model since
    refused: dict[str, str] = field(default_factory=dict)  # variant -> why it was not sent (no runtime for it)
    activation: dict[str, Any] | None = None  # the agent's ack of the activation (smoke result included)
    health: dict[str, Any] | None = None  # the benchmark record after activation (canaries, tune)
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        """Return True unless the deploy failed on this device (succeeded and skipped are both ok)."""
        return self.status != "failed"

    @property
    def switched(self) -> bool:
        """Return True when the device runs a model this deploy activated (and did not roll back)."""
        return self.activated and not self.rolled_back

    def fail(self, error: BaseException, reason: str | None = None) -> None:
        """Mark the device failed by ``error`` (its text is the reason unless ``reason`` is given)."""
        self.status, self.error, self.reason = "failed", error, reason or str(error)

    def roll_back_noted(self) -> None:
        """Record that the device was switched back to its previous model."""
        self.rolled_back = True
        self.actions.append("rolled back")

    def as_dict(self) -> dict[str, Any]:
        """Return the result as plain data (for ``--json``); the exception as its type and text."""
        data = {k: v for k, v in vars(self).items() if k != "error"}
        data["error"] = None if self.error is None else {"type": type(self.error).__name__, "message": str(self.error)}
        return {**data, "actions": list(self.actions)}


@dataclass
class GroupResult:
    """Per-device results of one deploy, in fleet order (as Fabric's GroupResult)."""

    results: list[DeviceResult]
    stopped: str | None = None  # why a rollout stopped before every device
    signature: str = "not checked"  # the manifest's signature, as the fleet's artifact_keys judged it

    @property
    def succeeded(self) -> list[DeviceResult]:
        """Return the results of the devices the deploy changed, in fleet order."""
        return [r for r in self.results if r.status == "succeeded"]

    @property
    def skipped(self) -> list[DeviceResult]:
        """Return the results of the devices left as they were (already up to date, or after a stop), in fleet order."""
        return [r for r in self.results if r.status == "skipped"]

    @property
    def failed(self) -> list[DeviceResult]:
        """Return the results of the devices the deploy failed on (each keeps its exception), in fleet order."""
        return [r for r in self.results if r.status == "failed"]

    def as_dict(self) -> dict[str, Any]:
        """Return the results as plain data (for ``--json``): ``stopped``, ``signature`` (the manifest's),
        ``devices``, ``counts`` per status and ``methods`` (how each device's ``seconds`` was measured)."""
        return {"stopped": self.stopped, "signature": self.signature, "devices": [r.as_dict() for r in self.results],
                "counts": {s: len([r for r in self.results if r.status == s]) for s in ("succeeded", "skipped", "failed")},
                "methods": {"seconds": SECONDS_METHOD}}


@dataclass
class DeployOptions:
    artifacts: Path
    variant: str | None = None  # None: keep the current variant if it is one of these artifacts, else the profile's first
    variants: dict[str, str] = field(default_factory=dict)  # per-device choice (tune), over `variant`
    parallel: int = 8
    trust_new_hosts: bool = False
    health_timeout: float = 120.0
    health: bool = True  # activate through the agent over MQTT and take its ack as the health report
    health_bench: dict[str, Any] | None = None  # also benchmark the activated model (canaries, tune)
    repair: bool = True  # the probe hashes the stored copies of the candidates; damaged ones are uploaded again
    new_key: bool = False  # give each device a fresh key pair (the way back after `edgekit fleet revoke`)
    # with new_key, the devices named one by one (--devices NAME): the only revoked devices readmitted (given a key)
    named: tuple[str, ...] = ()


def not_readmitted(fleet: Fleet, devices: list[Device], opts: DeployOptions) -> dict[str, str]:
    """Return the devices of ``devices`` a ``--new-key`` deploy leaves out, each with the line saying how to readmit
    it: revoked (``edgekit fleet revoke``, no key registered since) and not named one by one in ``opts.named`` (a
    stolen device still in the fleet file is not given a fresh key by a deploy to every device). Empty without
    ``opts.new_key`` (a revoked device is then refused by the deploy itself).

    Raises:
        ConfigError: the fleet's key registry or revoked list cannot be read.
    """
    if not opts.new_key:
        return {}
    revoked = fleet.key_store().revoked_devices()
    return {d.name: f"{d.name}: revoked on {revoked_on(revoked[d.name])} (key {revoked[d.name]['key_id']}), and "
                    f"--devices does not name it: not readmitted; {readmit_hint(d.name)}"
            for d in devices if d.name in revoked and d.name not in opts.named}


def candidates_for(manifest: Manifest, dev: Device) -> list[Artifact]:
    """Return the built artifacts meant for the device's profile, in the profile's order.

    Raises:
        NotBuiltFor: the artifacts were not compiled for that profile, or none of its variants was built.
    """
    profile = load_profile(dev.profile)
    if dev.profile not in manifest.profiles:
        raise NotBuiltFor(f"{dev.name}: the artifacts were not compiled for profile {dev.profile} "
                          f"(compiled for: {', '.join(manifest.profiles)}); recompile with -p {dev.profile}, "
                          f"or leave its devices out with --devices")
    built = {a.id: a for a in manifest.artifacts if a.status == "built" and dev.profile in a.profiles}
    wanted = [built[v] for v in profile.variants if v in built]
    if not wanted:
        raise NotBuiltFor(f"{dev.name}: no variant for profile {dev.profile} was built; see the manifest")
    return wanted


def check_built_for(artifacts: Path, devices: list[Device], variants: Iterable[str | None] = (),
                    manifest: Manifest | None = None) -> None:
    """Return None when the compiled folder ``artifacts`` has built variants for every device's profile
    and holds each variant asked for (``variants``, None for none): a deploy checks it before it
    touches any device, as ``select`` and ``tune`` do. ``manifest``: the folder's, as the caller read
    it (None: read here).

    Raises:
        InputError: the folder has no (valid) manifest (:func:`~edge_kit.manifest.read_manifest`), or a variant
            asked for is not in it (a typo).
        NotBuiltFor: the first device whose profile was not compiled, or got no built variant.
    """
    manifest = manifest if manifest is not None else read_manifest(artifacts)
    built = [a.id for a in manifest.artifacts if a.status == "built"]
    for variant in variants:
        if variant is not None and manifest.artifact(variant) is None:
            close = difflib.get_close_matches(variant, built, n=1)
            raise InputError(f"--variant {variant}: {artifacts / 'manifest.json'} has no such variant"
                             + (f"; did you mean {close[0]!r}?" if close else "") + f" (built: {', '.join(built)})")
    for dev in devices:
        candidates_for(manifest, dev)


# How long an install of a built_on_device artifact (trt-*) may take: the agent builds its TensorRT engine
# then (device_agents.runtimes.tensorrt.BUILD_TIMEOUT_S, plus the upload's move and checks).
ENGINE_BUILD_TIMEOUT_S = 1900.0
# `edgekit-agent activate` over SSH may first wait its turn on an Edge TPU (TURN_WAIT_S) while the agent this deploy
# restarted checks its own model, then ask for serving's pause and run its own smoke check
ACTIVATE_TIMEOUT_S = COMMAND_TIMEOUT_S + TURN_WAIT_S

# The device runtime each artifact needs beyond the agent's own (LiteRT), and how to get it there.
OPTIONAL_RUNTIMES = {"onnxruntime": "pip install 'edge-kit[agent-onnx]'",
                     "tensorrt": "install NVIDIA's onnxruntime-gpu wheel for its JetPack (docs/firmware/jetson.md)",
                     # not a runtime: the delegate an accelerator's own variant (edgetpu) needs under LiteRT
                     "edgetpu": "install Coral's libedgetpu1-std package, attach the Edge TPU and set the profile's "
                                "runtime.delegate: edgetpu (docs/firmware/coral.md)"}
_NEEDS_NAMED = {"edgetpu": "the Edge TPU's delegate, the shared library libedgetpu.so.1 (Debian package "
                           "libedgetpu1-std),"}
# what the deploy's probe of the device found missing, when it is not a Python package
_PROBE_LACKS = {"edgetpu": "the device cannot load"}


def device_needs(art: Artifact) -> str | None:
    """Return what ``art`` needs on a device beyond LiteRT, as devices report it (a key of their ``runtimes``:
    ``onnxruntime``, ``tensorrt``, or the accelerator target whose own compiler made it, ``edgetpu``), or None."""
    if art.runtime in OPTIONAL_RUNTIMES:
        return art.runtime
    target = compiler_of(art.id)
    return target.key if target is not None and target.key in OPTIONAL_RUNTIMES else None


def engine_missing(dev: Device, python_facts: dict[str, Any]) -> str | None:
    """Return why the device cannot run its profile's LiteRT variants (``runtime.engine``: ``tflite-runtime`` on a
    device whose Python has only ``ai-edge-litert``, or the other way round), in one line naming the package to
    install; None when its Python has that engine (or does not say: an older probe).

    ``python_facts`` is :attr:`DeviceShell.python_facts` (its ``runtimes`` say which interpreter modules it finds).
    """
    from device_agents.runtimes import RUNTIMES

    engine = load_profile(dev.profile).runtime.engine
    if (python_facts.get("runtimes") or {}).get(engine, True) is not False:
        return None
    python, package = python_facts.get("python") or dev.python, RUNTIMES[engine].package
    return (f"{dev.name}: profile {dev.profile} runs its LiteRT variants on {engine} (its runtime.engine), which the "
            f"device's Python ({python}) lacks; install it there ({python} -m pip install {package}), or give the "
            "device a profile with another runtime.engine; nothing was uploaded")


def runtime_refusals(device: str, wanted: list[Artifact], runtimes: dict[str, Any],
                     lacks: str | None = None) -> dict[str, str]:
    """Return {variant: one-line reason} for the artifacts whose runtime the device lacks.

    ``runtimes`` is what the device reported: :attr:`DeviceShell.python_facts` ``runtimes`` (``True``
    or ``False`` per runtime) or its status message's ``runtimes`` (``"available"``, or why it is not);
    a runtime it does not mention counts as missing. ``lacks`` says who said so, in the reason; None: the deploy's
    probe of the device (its Python lacks a package; the device cannot load the Edge TPU's shared library). LiteRT
    variants are never refused here (the agent's install check requires LiteRT).
    """
    return {a.id: f"{device}: {a.id} needs {_NEEDS_NAMED.get(need, need)} on the device, which "
                  f"{lacks or _PROBE_LACKS.get(need, 'its Python lacks')}; {OPTIONAL_RUNTIMES[need]} there to deploy it"
            for a in wanted if (need := device_needs(a)) is not None and runtimes.get(need, False) not in (True, "available")}


def reported_runtimes(status: dict[str, Any] | None) -> dict[str, Any] | None:
    """Return the runtimes a device's status message reports (``{runtime: "available" or why not}``, as
    its agent sends them), or None when it reports none (no status, or an agent older than the field):
    then nothing is known about them, and nothing should be assumed."""
    runtimes = (status or {}).get("runtimes")
    return runtimes if isinstance(runtimes, dict) else None


def removed_text(activation: dict[str, Any]) -> str | None:
    """Return what an activation's answer says the device's store removed for its budget (``removed``: the agent's
    list of models, each with its ``bytes``), e.g. ``removed 2 old model(s), 3.1 MB, for the store budget``; None
    when it removed nothing. The answer is the device's word: only a list counts, and only byte counts add up."""
    removed = activation.get("removed")
    if not isinstance(removed, list) or not removed:
        return None
    freed = sum(m["bytes"] for m in removed if isinstance(m, dict) and in_range(m.get("bytes"), 1e18))
    return f"removed {len(removed)} old model(s), {size_text(freed)}, for the store budget"



class _Deployer:
    def __init__(self, fleet: Fleet, opts: DeployOptions, manifest: Manifest, client: FleetClient | None,
                 progress: Callable[[str, str], None] | None):
        self.fleet = fleet
        self.opts = opts
        self.manifest = manifest
        self.eval_sha256 = self._eval_sha256()
        self.client = client
        self.progress = progress or (lambda _d, _m: None)
        # set on Ctrl-C: a device still connecting gives up at once (nothing changed there); one past that finishes
        self.cancel = threading.Event()

    def _eval_sha256(self) -> str | None:
        """Return the sha256 of the eval set to ship with the artifacts: the one the manifest records
        (its signature covers it), checked against ``eval.npz``; None when the manifest records none
        (an ``eval.npz`` it does not list is not shipped: nothing vouches for the metric code it
        carries) or the file is not there.

        Raises:
            DeployError: the file differs from the sha256 the compile recorded (changed since).
        """
        path = self.opts.artifacts / "eval.npz"
        recorded = (self.manifest.eval or {}).get("sha256")
        if not recorded or not path.is_file():
            return None
        digest = sha256_file(path)
        if recorded != digest:
            raise DeployError(f"{path}: sha256 {digest[:12]}... differs from the manifest's {recorded[:12]}... "
                              "(changed since the compile); compile again")
        return digest

    def one(self, dev: Device) -> DeviceResult:
        started = time.perf_counter()
        result = DeviceResult(dev.name, "skipped")
        try:
            self._deploy(dev, result)
        except EdgeKitError as exc:
            result.fail(exc)
        except Exception as exc:  # noqa: BLE001 - one device's surprise must not stop the others
            where = traceback.extract_tb(exc.__traceback__)[-1]
            result.fail(exc, f"{dev.name}: unexpected {type(exc).__name__}: {exc} "
                             f"(at {Path(where.filename).name}:{where.lineno}; please report it)")
        result.seconds = round(time.perf_counter() - started, 3)
        self.progress(dev.name, result.status)
        return result

    def _deploy(self, dev: Device, result: DeviceResult) -> None:
        wanted = candidates_for(self.manifest, dev)
        by_id = {a.id: a for a in wanted}
        variant = self.opts.variants.get(dev.name, self.opts.variant)
        if variant and variant not in by_id:
            raise DeployError(f"{dev.name}: variant {variant} was not built for profile {dev.profile} "
                              f"(built: {', '.join(by_id)})")
        with DeviceShell(dev, self.fleet.known_hosts, self.opts.trust_new_hosts, cancel=self.cancel,
                         verify=tuple(a.sha256 for a in wanted) if self.opts.repair else ()) as shell:
            self.progress(dev.name, "agent")
            agent = ensure_agent(shell, self.fleet, self.opts.new_key)
            result.actions += agent.changed
            if load_profile(dev.profile).runtime.engine != "litert":  # the agent's own check takes either engine
                if (missing := engine_missing(dev, shell.python_facts)) is not None:
                    raise DeployError(missing)
            if any(device_needs(a) for a in wanted):  # one more command, only when it matters
                result.refused = runtime_refusals(dev.name, wanted, shell.python_facts.get("runtimes") or {})
                if variant in result.refused:
                    raise DeployError(result.refused[variant])
                wanted = [a for a in wanted if a.id not in result.refused]
                if not wanted:
                    raise DeployError(f"{dev.name}: every variant for profile {dev.profile} was refused: "
                                      + "; ".join(result.refused.values()))
            if agent.restarted_at is not None and self.client is not None:
                self._wait_online(dev, agent.restarted_at)
            have = {m["sha256"] for m in shell.info["installed"]}
            damaged = shell.info["damaged"]  # the probe hashed the stored copies of these candidates (repair)
            for art in wanted:
                if art.sha256 in damaged:
                    have.discard(art.sha256)
                    result.actions.append(f"repair {art.id} ({damaged[art.sha256]})")
            need = sum(a.bytes or 0 for a in wanted if a.sha256 not in have)
            free = self._free(shell) if need else 0
            if need > free:
                raise DeployError(f"{dev.name}: not enough space under {shell.root}: the new variants need "
                                  f"{size_text(need)}, {size_text(max(free, 0))} free (above the agent's "
                                  "store.min_free_mb); remove models or lower store.max_store_mb")
            current = shell.info["current"]
            target = next((a for a in wanted if a.id == variant), None) or next(
                (a for a in wanted if a.sha256 == current), wanted[0])
            eval_file = self.opts.artifacts / "eval.npz"
            eval_remote = None
            for art in wanted:
                if art.sha256 in have:
                    continue
                self.progress(dev.name, f"upload {art.id}")
                part = shell.put(self.opts.artifacts / art.file, f"{shell.root}/incoming/{art.sha256}{Path(art.file).suffix}", rename=False)
                if eval_remote is None and self.eval_sha256 is not None:  # only the eval set the manifest lists
                    eval_remote = shell.put(eval_file, f"{shell.root}/incoming/eval.npz")
                self._install(shell, art, part, eval_remote)
                result.actions.append(f"uploaded {art.id} ({size_text(art.bytes or 0)})")
            result.variant, result.sha256 = target.id, target.sha256
            if current != target.sha256:
                self.progress(dev.name, f"activate {target.id}")
                result.activation = self._activate(shell, target, keep=[a.sha256 for a in wanted])
                result.activated = True
                result.actions.append(f"activated {target.id}")
                removed = removed_text(result.activation)
                if removed:
                    result.actions.append(removed)
            if not result.actions:
                result.reason = "already current: same agent, same artifacts, same active variant"
                return
            result.status = "succeeded"
            if self.opts.health_bench and self.client is not None:
                self.progress(dev.name, "benchmark")
                try:
                    result.health = self._bench(dev, target.sha256)
                except DeployError as exc:
                    if result.activated:
                        shell.agent("rollback")
                        result.roll_back_noted()
                        raise DeployError(f"{exc}; rolled back to the previous model") from None
                    raise

    def _free(self, shell: DeviceShell) -> float:
        """Return the bytes the device can take: what its running agent's ``state`` says is free above the floor it
        keeps (``disk.free_bytes - disk.min_free_bytes``), else what its Python says is free under the root.

        Raises:
            DeployError: the agent's answer holds no such byte counts (a broken or hostile device; named).
            AgentError: the agent refused ``state``; AgentTimeout: no answer.
        """
        if self.client is None:
            return shell.python_facts["free"]
        disk = field_at(self._request(shell.dev, "state", {}), "disk")
        free, floor = disk_free_bytes(disk), field_at(disk, "min_free_bytes")
        if free is None or not in_range(floor, 1e18) or floor < 0:
            raise DeployError(f"{shell.dev.name}: its agent's answer to 'state' holds no byte counts disk.free_bytes "
                              "and disk.min_free_bytes; check that the device runs edge-kit's agent")
        return free - floor

    def _wait_online(self, dev: Device, since: float) -> None:
        assert self.client is not None
        if self.client.wait_online(dev.name, since, self.opts.health_timeout) is None:
            raise DeployError(f"{dev.name}: the agent did not come online within {self.opts.health_timeout:.0f} s")

    def _install(self, shell: DeviceShell, art: Artifact, part: str, eval_remote: str | None) -> None:
        """Move an upload into the device's model store, checked against the manifest's sha256.

        The running agent does it (no process started on the device); over SSH without a broker.

        Raises:
            AgentError: the sha256 differs (corrupt upload) or the store refused it; AgentTimeout: no answer.
            DeployError: the same, over SSH.
        """
        evals = {"eval": eval_remote, "eval_sha256": self.eval_sha256} if eval_remote and self.eval_sha256 else {}
        args = {"path": part, "sha256": art.sha256, "variant": art.id, "model": self.manifest.model["name"], **evals}
        # a TensorRT variant's engine is built during the install: minutes on a Jetson, not seconds
        timeout = max(self.opts.health_timeout, ENGINE_BUILD_TIMEOUT_S) if art.built_on_device else None
        if self.client is not None:
            if timeout is None:
                self._request(shell.dev, "install", args)
            else:
                self.client.request(shell.dev.name, "install", args, timeout=timeout, expire=True)
            return
        shell.agent("install", part, "--variant", art.id, "--model-name", args["model"], "--sha256", art.sha256,
                    "--move", *(["--eval", eval_remote, "--eval-sha256", self.eval_sha256] if evals else []),
                    **({"timeout": timeout} if timeout is not None else {}))

    def _request(self, dev: Device, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """Return the result of a command the device's agent ran (it drops one that reaches it after the timeout).

        Raises:
            AgentTimeout: no answer within the health timeout.
            AgentError: the agent refused it (its reason is given).
        """
        assert self.client is not None
        return self.client.request(dev.name, name, args, timeout=self.opts.health_timeout, expire=True)["result"]

    def _activate(self, shell: DeviceShell, target: Artifact, keep: list[str]) -> dict[str, Any]:
        """Activate through the running agent and take its ack as the health report; over SSH without a broker.

        ``keep``: this deploy's candidates, which the device's store budget must not remove.

        Returns:
            What the agent reported: current, previous, and the smoke inference's result.

        Raises:
            DeployError: refused (reason given; nothing changed), or no healthy ack in time (rolled back).
        """
        if self.client is None:
            return shell.agent("activate", "--sha256", target.sha256, timeout=ACTIVATE_TIMEOUT_S)
        try:
            return self._request(shell.dev, "activate", {"sha256": target.sha256, "keep": keep})
        except AgentTimeout as exc:
            probe = shell.agent("state")  # no ack: did it switch anyway?
            if field_at(probe, "current", "sha256") == target.sha256:
                shell.agent("rollback")
                raise DeployError(f"{exc}; it had switched, so it was rolled back to the previous model") from None
            raise DeployError(f"{exc}; it still runs its previous model") from None
        except AgentError as exc:  # refused: nothing changed
            raise DeployError(str(exc)) from None

    def _bench(self, dev: Device, sha: str) -> dict[str, Any]:
        """Return a fresh benchmark record of the now current model.

        Raises:
            DeployError: no record in time, or the agent benchmarked another model.
        """
        assert self.client is not None
        try:
            record = self.client.request(dev.name, "bench", self.opts.health_bench,
                                         timeout=self.opts.health_timeout)["record"]
        except EdgeKitError as exc:
            raise DeployError(f"health check failed: {exc}") from None
        if record["sha256"] != sha:
            raise DeployError(f"{dev.name}: health check ran {record['sha256'][:12]}, not the activated {sha[:12]}")
        return record


def deploy(fleet: Fleet, devices: list[Device], opts: DeployOptions,
           progress: Callable[[str, str], None] | None = None, manifest: Manifest | None = None) -> GroupResult:
    """Deploy to ``devices``, ``opts.parallel`` at a time.

    ``manifest``: the one in ``opts.artifacts`` as the caller read and checked it against the fleet's
    ``artifact_keys`` (a rollout's canaries and the rest, a tune's rounds: one release throughout, not a
    manifest replaced in between); None reads and checks it here.

    With ``opts.new_key``, a revoked device ``opts.named`` does not name is ``skipped``, untouched, its reason saying
    how to readmit it (:func:`not_readmitted`).

    Returns:
        One result per device, in the order given (never raises for a single device).

    Raises:
        InputError: the artifact folder has no (valid) manifest, its signature fails the fleet's
            ``artifact_keys``, or a variant asked for is not in it (no device is touched).
        NotBuiltFor: it was not compiled for a device's profile (no device is touched).
        AgentError: health checks are on and the fleet's broker cannot be reached.
        ConfigError: two devices of the fleet share one agent folder (nothing is touched), or with ``opts.new_key``
            the key registry or revoked list cannot be read.
        DeployInterrupted: Ctrl-C; raised once the devices under way have finished, naming what each device ended
            as (:func:`interrupted_text`).
    """
    fleet.check_agent_folders()
    if manifest is None:
        manifest = read_manifest(opts.artifacts, fleet.artifact_trust())  # what is uploaded is what was checked
    check_built_for(opts.artifacts, devices, [opts.variant, *opts.variants.values()], manifest)
    left_out = not_readmitted(fleet, devices, opts)
    client = FleetClient.of(fleet) if opts.health else None
    if client is not None:
        client.__enter__()
    try:
        deployer = _Deployer(fleet, opts, manifest, client, progress)
        with ThreadPoolExecutor(max_workers=max(1, min(opts.parallel, len(devices)))) as pool:
            futures: list[Future[DeviceResult]] = []
            try:
                for dev in devices:
                    if dev.name in left_out:  # untouched: a done result in its place, in the order given
                        futures.append(Future())
                        futures[-1].set_result(DeviceResult(dev.name, "skipped", reason=left_out[dev.name]))
                        deployer.progress(dev.name, "skipped")
                        continue
                    futures.append(pool.submit(deployer.one, dev))
                return GroupResult([f.result() for f in futures], signature=manifest.signature)
            except BaseException as exc:  # Ctrl-C: the devices not started are cancelled, those connecting give up
                deployer.cancel.set()
                for f in futures:
                    f.cancel()
                if not isinstance(exc, KeyboardInterrupt):
                    raise
                wait(futures)  # a device past connecting finishes its deploy: say where each one ended
                raise DeployInterrupted(interrupted_text(devices, futures)) from None
    finally:
        if client is not None:
            client.close()


def interrupted_text(devices: list[Device], futures: list[Future[DeviceResult]]) -> str:
    """Return the line a deploy stopped by Ctrl-C ends with: per device (``futures`` in the same order, all done; the
    devices past its end were never submitted), what it ended as (``succeeded, fp32 active``, ``skipped``, ``failed:
    why``) or ``not touched`` (never started, or gave up while connecting), and what to do. Raises nothing."""
    ended = []
    for i, dev in enumerate(devices):
        f = futures[i] if i < len(futures) else None
        r = None if f is None or f.cancelled() or f.exception() is not None else f.result()
        if r is None or (r.status == "failed" and isinstance(r.error, Cancelled)):
            ended.append(f"{dev.name} not touched")
        elif r.status == "failed":
            ended.append(f"{dev.name} failed: {r.reason}")
        else:
            ended.append(f"{dev.name} {r.status}" + (f", {r.variant} active" if r.variant else ""))
    return ("interrupted: the devices under way finished their deploy, the others were not touched ("
            + "; ".join(ended) + "); run the deploy again to reach the rest")


def roll_back(fleet: Fleet, devices: list[Device], opts: DeployOptions, results: list[DeviceResult], why: str) -> None:
    """Put devices back on their previous model (best effort, noted per device): each one not failed yet
    becomes failed with ``why``; a rollback that fails is added to the device's reason (it runs what it was to
    be rolled back from)."""
    by_name = {r.device: r for r in results}
    for dev in devices:
        r = by_name[dev.name]
        if r.status != "failed":  # succeeded, or skipped on the model already (a rerun): it is not to stay on it
            r.status, r.reason = "failed", why
        try:
            with DeviceShell(dev, fleet.known_hosts, opts.trust_new_hosts) as shell:
                shell.agent("rollback")
            r.roll_back_noted()
        except EdgeKitError as exc:
            r.reason = f"{r.reason or ''}; rollback failed: {exc}".lstrip("; ")
