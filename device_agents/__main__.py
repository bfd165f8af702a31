"""`edgekit-agent`: the on-device command. Needs only numpy, PyYAML, paho-mqtt and a LiteRT interpreter.

    edgekit-agent bench model.tflite|model.onnx [--eval eval.npz] [--threads N] [--delegate edgetpu] [--root R] [--json]
    edgekit-agent run --config agent.yaml           # the service: MQTT, commands, telemetry
    edgekit-agent install model.tflite --variant ID --model-name NAME [--sha256 S] [--eval eval.npz] [--root R]
    edgekit-agent activate (--sha256 S | --variant ID) [--root R]   # with R/agent.yaml's runtime, delegate, threads
    edgekit-agent rollback [--root R]
    edgekit-agent state [--root R] [--socket S]   # the store, and the running agent's live figures
    edgekit-agent unit --config agent.yaml [--user U]   # a systemd unit for the service
    edgekit-agent supervise --config agent.yaml --pidfile P   # the service where there is no systemd

``install``, ``activate``, ``rollback`` and ``state`` work on the model store (see
:mod:`device_agents.store`) and print JSON. Every error edge-kit raises on purpose is mapped here,
once: one line (``edgekit-agent: error: ...``) and its ``exit_code`` (2); with ``--json`` (every command
that prints a result takes it) also ``{"error", "exit_code"}`` on stdout, as ``edgekit --json`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from device_agents.errors import StoreError, UsageError
from device_agents.runtimes import RUNTIMES
from device_agents.store import ModelStore, default_root
from edgekit_protocol.config import (
    INFERENCE_TIMEOUT_FACTOR,
    AgentConfig,
    BenchSettings,
    PowerConfig,
)
from edgekit_protocol.errors import (
    EdgeKitError,
    StdoutFailed,
    leave_on_closed_stdout,
    watched_stdout,
)


def _print_table(model: Path, record: dict) -> None:
    from device_agents.bench import summary_rows

    rows = [("model", str(model)), *summary_rows(record)]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:>{width}}  {value}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `edgekit-agent` console script: an error edge-kit raises on purpose is one line and its
    ``exit_code``; output whose reader has gone (``| head -1``) ends it quietly with exit 141; output that cannot be
    written (``> /dev/full``, standard output closed: ``>&-``) is one line and exit 1
    (:func:`edgekit_protocol.errors.watched_stdout`)."""
    parser = argparse.ArgumentParser(prog="edgekit-agent", description="edge-kit on-device agent")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="benchmark a model (.tflite or .onnx) once and print the result")
    b.add_argument("model", type=Path)
    b.add_argument("--eval", type=Path, help=".npz with x (real inputs) and optionally y (labels: top-1 accuracy)")
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--delegate", default="xnnpack", help="xnnpack (default), none, edgetpu, gpu")
    b.add_argument("--delegate-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the delegate's target, e.g. device=usb:0 for edgetpu; repeat")
    b.add_argument("--runtime", choices=sorted(RUNTIMES), help="default: first installed")
    b.add_argument("--warmup", type=int, default=BenchSettings.warmup)
    b.add_argument("--min-runs", type=int, default=BenchSettings.min_runs)
    b.add_argument("--min-seconds", type=float, default=BenchSettings.min_seconds)
    b.add_argument("--step-timeout-s", type=float, default=BenchSettings.step_timeout_s,
                   help="end the benchmark when loading, the first inference or the metric takes longer")
    b.add_argument("--inference-timeout-s", type=float, default=BenchSettings.inference_timeout_s,
                   help=f"end it when a later inference takes longer (or {INFERENCE_TIMEOUT_FACTOR}x the first, if longer)")
    b.add_argument("--total-timeout-s", type=float, default=BenchSettings.total_timeout_s,
                   help="end it when the whole benchmark takes longer")
    b.add_argument("--idle-w", type=float, help="device idle watts, for an estimate when no power sensor answers")
    b.add_argument("--busy-w", type=float, help="device busy watts (all cores), for the estimate")
    b.add_argument("--root", type=Path, default=None,
                   help=f"with --delegate edgetpu: the agent root whose Edge TPU turn it takes and whose running agent "
                        f"pauses its serving (default {default_root()}; none there: neither)")
    b.add_argument("--json", action="store_true", help="print the record as JSON")
    b.add_argument("--verbose", action="store_true",
                   help="on a Python exception in the benchmark's child, print its traceback after the one-line error")
    r = sub.add_parser("run", help="run the agent service (MQTT) until SIGTERM")
    r.add_argument("--config", type=Path, required=True, help="agent.yaml")
    r.add_argument("--log-file", type=Path)
    root_help = f"device root (default {default_root()})"
    i = sub.add_parser("install", help="copy a model into the store (checked by sha256)")
    i.add_argument("model", type=Path)
    i.add_argument("--variant", required=True)
    i.add_argument("--model-name", required=True, help="the source model's name, as in the manifest")
    i.add_argument("--sha256", help="expected sha256 (from the manifest); refuse the file if it differs")
    i.add_argument("--eval", type=Path, help="eval.npz shipped with the artifacts")
    i.add_argument("--eval-sha256", help="refuse the eval set unless its content has this sha256")
    i.add_argument("--move", action="store_true", help="delete the source file once installed (uploads)")
    a = sub.add_parser("activate", help="make an installed model current, after a smoke inference in a child")
    a.add_argument("--sha256")
    a.add_argument("--variant")
    yaml_default = "default: bench.{} of the agent.yaml in --root, the agent's own"
    a.add_argument("--runtime", choices=sorted(RUNTIMES),
                   help=yaml_default.format("runtime") + " (else the first installed)")
    a.add_argument("--delegate", help=yaml_default.format("delegate") + " (else xnnpack)")
    a.add_argument("--delegate-option", action="append", default=[], metavar="KEY=VALUE",
                   help=yaml_default.format("delegate_options") + " when --delegate is not given either; repeat")
    sv = sub.add_parser("supervise", help="keep the service running where there is no systemd")
    sv.add_argument("--config", type=Path, required=True)
    sv.add_argument("--pidfile", type=Path, required=True)
    sv.add_argument("--log-file", type=Path)
    u = sub.add_parser("unit", help="print a systemd unit that runs this agent as a service")
    u.add_argument("--config", type=Path, required=True)
    u.add_argument("--user", help="run as this user (default: root)")
    sub.add_parser("rollback", help="swap current and previous")
    st = sub.add_parser("state", help="print what is installed, current and previous, and the running agent's live figures")
    st.add_argument("--socket", type=Path, default=None,
                    help="the serving API's socket the live figures are read from (default ROOT/serve.sock; "
                         "agent.yaml's serve.socket if it sets one)")
    for p in (i, a, *[sub.choices[n] for n in ("rollback", "state")]):
        p.add_argument("--root", type=Path, default=None, help=root_help)
        p.add_argument("--json", action="store_true", help="the result is JSON already; an error is JSON on stdout too")
    with watched_stdout("edgekit-agent"):  # output that cannot be written (> /dev/full, >&-): one line, exit 1
        try:
            try:
                args = parser.parse_args(argv)  # in here: `--help > /dev/full` is said too (it exited 0)
                _dispatch(args)
            except EdgeKitError as exc:
                sys.stderr.write(f"edgekit-agent: error: {exc}\n")  # first: seen even when stdout's reader has gone
                if getattr(args, "json", False):  # as `edgekit --json`: one document on stdout, the line on stderr
                    try:
                        print(json.dumps({"error": str(exc), "exit_code": exc.exit_code}, indent=2), flush=True)
                    except BrokenPipeError:  # its reader has gone: the failure's exit code (as without --json), not 141
                        leave_on_closed_stdout(code=exc.exit_code)
                        raise
                    except StdoutFailed as failed:  # cannot be written: the line above said it all; its exit code
                        failed.said = exc.exit_code
                        raise
                sys.exit(exc.exit_code)
            finally:
                sys.stdout.flush()  # here, not at exit: a reader gone (`| head -1`) is then caught below
        except BrokenPipeError:
            leave_on_closed_stdout()  # exit 141, quietly, as git and ls do; any other broken pipe is a bug: shown
            raise


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "run":
        _run(args)
    elif args.command == "supervise":
        from device_agents.config import load_agent_config
        from device_agents.supervise import supervise

        cfg = load_agent_config(args.config)
        check_own_code(cfg.root, cfg.verify_code)  # tampered code is never started, nor restarted
        sys.exit(supervise(args.config, args.pidfile, args.log_file))
    elif args.command == "unit":
        from device_agents.config import load_agent_config
        from device_agents.unit import render_unit

        load_agent_config(args.config)  # a unit for a config that does not load would only fail at every boot
        print(render_unit(args.config, user=args.user), end="")
    elif args.command == "bench":
        _bench(args)
    else:
        _store_command(args)


def check_own_code(root: Path | None, required: bool = False) -> None:
    """When this agent runs from a deployed ``<root>/agent`` folder, check it against its signed manifest.

    ``required`` (``verify_code`` in a deployed agent.yaml): also refuse to run from anywhere else.

    Raises:
        CodeTampered: see :func:`device_agents.codecheck.verify_code`; or ``required`` and this code
            is not ``<root>/agent`` (a package planted earlier on ``sys.path``).
    """
    from device_agents.codecheck import is_deployed, verify_code
    from device_agents.errors import CodeTampered

    here = Path(__file__).resolve().parent.parent
    root = (root or default_root()).expanduser().resolve()
    if is_deployed(here, root):
        verify_code(here, root / "identity" / "operators.json")
    elif required:
        raise CodeTampered(f"this agent runs from {here}, not from the deployed {root / 'agent'}; not started "
                           "(something earlier on sys.path shadows it): run `edgekit deploy` and start it from there")


def _run(args: argparse.Namespace) -> None:
    from device_agents.config import load_agent_config

    cfg = load_agent_config(args.config)
    check_own_code(cfg.root, cfg.verify_code)
    cfg.password(str(args.config))
    try:
        from device_agents.service import run_agent
    except ImportError as exc:
        raise UsageError(f"the service needs paho-mqtt ({exc}); install it with: pip install 'edge-kit[agent]'") from None
    run_agent(cfg, args.log_file)


def _store_command(args: argparse.Namespace) -> None:
    store = ModelStore(args.root or default_root())
    if args.command != "install" and not store.models.is_dir():  # a mistyped --root: never an empty store, exit 0
        raise StoreError(f"no model store at {store.root} (no models/ folder): give the agent's root with --root "
                         f"(default {default_root()}), or install a model there first")
    if args.command == "install":
        own = _agent_bench(store.root)  # checked before anything is copied: a broken agent.yaml changes nothing
        done = store.install(args.model, variant=args.variant, model=args.model_name,
                             expect_sha256=args.sha256, eval_file=args.eval,
                             expect_eval_sha256=args.eval_sha256, move=args.move)
        out = {"sha256": done.sha256, "variant": done.variant, "model": done.model, "fresh": done.fresh}
        from device_agents.runtimes import prepare_installed

        # a trt-* variant: its engine, built now with the threads the agent runs it with
        engine = prepare_installed(store, done.sha256, fresh=done.fresh, threads=own.threads)
        if engine is not None:
            out["engine"] = engine
    elif args.command == "activate":
        if not (args.sha256 or args.variant):
            raise StoreError("activate: give --sha256 or --variant")
        from device_agents.smoke import SmokePool

        cfg = _agent_config(store.root)
        own = cfg.bench if cfg else BenchSettings()
        sha = store.resolve(sha256=args.sha256, variant=args.variant)
        given = bool(args.delegate or args.delegate_option)  # another delegate's options would not fit it
        delegate, options = args.delegate or own.delegate, _options(args) if given else own.delegate_options
        serving = _serving_socket(store.root, cfg)
        pool = SmokePool()
        with _serving_paused(store, sha, delegate, options, serving, pool):  # the running agent's, on the Edge TPU
            out = store.activate(sha, runtime=args.runtime or own.runtime, delegate=delegate, options=options,
                                 threads=own.threads, smoke=pool)
    elif args.command == "rollback":
        out = store.rollback()
    else:
        try:  # read once: whether the device is simulated, and where it serves
            cfg, unloaded = _agent_config(store.root), None
        except EdgeKitError as exc:
            cfg, unloaded = None, exc
        simulated = cfg.simulated if cfg is not None else None  # None: no agent.yaml that loads says
        live = live_figures(args.socket) if args.socket else _own_live_figures(store.root, cfg, unloaded)
        if simulated and "measured_by" in live:  # an `edgekit sim` device's figures are the simulating machine's
            live["measured_by"] += (f"; a simulated device (simulated: true in {store.root / 'agent.yaml'}): measured "
                                    "on the machine simulating it, not on its profile's hardware")
        out = {"root": str(store.root), "simulated": simulated, "current": store.describe(store.current()),
               "previous": store.describe(store.previous()), "installed": store.installed(), "live": live}
    print(json.dumps(out, indent=2, default=str))


def _agent_config(root: Path) -> AgentConfig | None:
    """Return the config of the agent at ``root``, ``<root>/agent.yaml`` loaded (the file a deploy writes there and the
    running agent reads: the runtime, delegate, options and threads it runs models with in ``bench``, its serving API
    in ``serve``), or None without that file (a store made by hand, docs/serving.md).

    Raises:
        ConfigError: the file is there but does not load (its file, line and key named: :func:`load_agent_config`,
            which refuses a ``bench.delegate`` no target has, or ``bench.delegate_options`` it does not take, too).
    """
    from device_agents.config import load_agent_config

    path = root / "agent.yaml"
    return load_agent_config(path) if os.path.lexists(path) else None


def _serving_socket(root: Path, cfg: AgentConfig | None) -> Path | None:
    """Return the socket the agent at ``root`` serves its API on, by its config ``cfg`` (:func:`_agent_config`):
    ``serve.socket`` if it sets one, else ``<root>/serve.sock``; None when it turns serving off."""
    from device_agents.serving.client import SOCKET

    if cfg is None:
        return root / SOCKET
    return None if not cfg.serve.enabled else cfg.serve.socket or root / SOCKET


def _own_live_figures(root: Path, cfg: AgentConfig | None, unloaded: EdgeKitError | None) -> dict[str, Any]:
    """Return :func:`live_figures` of the agent at ``root``, at the socket its agent.yaml (``cfg``, as
    :func:`_agent_config` read it; ``unloaded``: why it did not load) serves on (:func:`_serving_socket`);
    ``{"source": "live", "unavailable": why}`` when that file turns serving off or does not load (the store's own
    state is still worth showing). Never raises."""
    if unloaded is not None:
        return {"source": "live", "unavailable": f"{unloaded} (give the serving API's socket with --socket)"}
    socket = _serving_socket(root, cfg)
    if socket is None:
        return {"source": "live", "unavailable": f"serving is off (serve.enabled: false in {root / 'agent.yaml'})"}
    return live_figures(socket)


def _agent_bench(root: Path) -> BenchSettings:
    """Return the ``bench`` settings of :func:`_agent_config` (the defaults without agent.yaml). Raises as it."""
    cfg = _agent_config(root)
    return cfg.bench if cfg else BenchSettings()


PAUSE_ASK_TIMEOUT_S = 30.0  # `activate` waits this long for the running agent to pause its serving of the Edge TPU
PAUSE_ASK_AGAIN_S = 0.25  # how often it asks again while serving is paused for another process (ending)


@contextlib.contextmanager
def _serving_paused(store: ModelStore, sha: str, delegate: str, options: dict[str, Any] | None,
                    socket: Path | None, pool: Any) -> Iterator[None]:
    """Run the ``with`` block (the activation of installed model ``sha``: its smoke check, a child of ``pool``, opens
    it with ``delegate`` and ``options``) in this process's turn on the Edge TPU with the running agent's serving
    paused (:func:`_edge_tpu_taken`) when that child opens the Edge TPU. A StoreError the block raises (a smoke check
    failed as busy) says why serving was not paused, when it was not. Yields nothing; raises what the block raises.

    Raises:
        AcceleratorBusy, DeviceError: as :func:`_edge_tpu_taken`; the block did not run.
    """
    from device_agents.targets.edgetpu import EdgeTpu

    if sha == store.current() or store.delegate_for(sha, delegate, options)[0] != EdgeTpu.key:
        yield  # no smoke check, or not on the Edge TPU
        return
    with _edge_tpu_taken(store.root, options, socket, pool, f"the smoke check of model {sha[:12]} by edgekit-agent "
                         "activate opens the Edge TPU it holds (one process at a time)", "activating") as note:
        try:
            yield
        except StoreError as exc:
            if note is not None:
                exc.args = (f"{exc}; {note}",)
            raise


@contextlib.contextmanager
def _edge_tpu_taken(root: Path, options: dict[str, Any] | None, socket: Path | None, pool: Any, why: str,
                    doing: str) -> Iterator[str | None]:
    """Run the ``with`` block, where a child of ``pool`` opens the Edge TPU ``options`` names, in this process's turn
    on it at the agent's ``root`` with the running agent's serving paused (a USB Coral opens for one process at a
    time): the agent serving at ``socket`` (None: serving is off) closes its interpreters that hold it, its requests
    told ``why``, until this process closes the connection, at the block's end or its own (killed included:
    :meth:`device_agents.serving.Client.pause`). ``pool``'s forkserver starts first, not during the pause. Before it
    asks, it waits its turn (:func:`device_agents.targets.edgetpu.turn`, :data:`TURN_WAIT_S` at most) while the agent,
    restarted by the same deploy, checks and loads its own model on the Edge TPU, which no pause covers (nothing is
    served yet), or checks or benchmarks one (serving off included); the agent waits for this process's turn the same
    way. Serving paused for another process (the one whose turn this one waited for, until serving has loaded its
    model again): asked again, :data:`PAUSE_ASK_TIMEOUT_S` at most. Nothing listening at ``socket``: nothing to pause.
    Yields None, or, when the agent could not be asked (older than pausing, no permission, no answer within
    :data:`PAUSE_ASK_TIMEOUT_S`, paused for another process as long; the block runs all the same), one line saying
    why serving was not paused (``doing``: what to stop it while); raises what the block raises.

    Raises:
        AcceleratorBusy: the agent's turn did not end within :data:`TURN_WAIT_S`; the block did not run.
        DeviceError: the turn's file does not open (:func:`~device_agents.targets.edgetpu.turn`); the block did not run.
    """
    from device_agents.serving.client import Client, ServingError
    from device_agents.targets.edgetpu import TURN_WAIT_S, EdgeTpu, turn

    pool.warm()
    with turn(root, TURN_WAIT_S):  # opened after the forkserver started: its children never hold it
        if socket is None:  # serving off: nothing to pause, but the agent's own smoke checks and benches take turns
            yield None
            return
        client = Client(path=socket, timeout=PAUSE_ASK_TIMEOUT_S, shared_memory=False)
        note, deadline = None, time.monotonic() + PAUSE_ASK_TIMEOUT_S
        while True:
            try:
                client.pause(EdgeTpu.key, options, why)
            except ServingError as exc:
                # the process whose turn this one waited for: its pause ends once serving has loaded again
                if str(exc).startswith("pause: serving is paused already") and time.monotonic() < deadline:
                    client.close()  # the agent closed that connection: asked again on a new one
                    time.sleep(PAUSE_ASK_AGAIN_S)
                    continue
                if not isinstance(exc.__cause__, (FileNotFoundError, ConnectionRefusedError)):  # else: no agent running
                    who = running_agent(socket)
                    note = (f"the agent running at {socket}{who} is older than pausing its serving for another "
                            f"process: deploy this version to it (edgekit deploy), or stop it while {doing}"
                            if str(exc).startswith("unknown op 'pause'") else
                            f"the agent running at {socket}{who} did not pause its serving of the Edge TPU: {exc}")
            break
        try:
            yield note
        finally:
            client.close()  # serving resumes


LIVE_TIMEOUT_S = 2.0  # `state` waits this long for the running agent's live figures


def live_figures(socket: Path) -> dict[str, Any]:
    """Return the live figures of the running agent's serving API at ``socket`` (requests, errors, service time
    percentiles, queue depth, clients, what was turned away: :meth:`device_agents.serving.server.Server.figures`),
    asked over the socket itself, so no broker is needed; with ``covers`` (the span of the counts and the window of
    the percentiles, in words) and ``measured_by`` (where and with which clock). When the agent cannot be asked
    (nothing listens at ``socket``: not running, serving off, a socket elsewhere; no permission), turns the question
    away (``serve.max_clients`` connected: busy), closes the connection or gives no answer within
    :data:`LIVE_TIMEOUT_S`, or answers an error (an agent older than the ``live`` op), ``{"source": "live",
    "unavailable": why}``: "start it" only when nothing listens, an agent that runs named with its pid and version
    (:func:`running_agent`; not a busy one: asking would be one more client turned away). Never raises."""
    from datetime import datetime, timezone

    from device_agents.serving.client import Client, ServingError

    client = Client(path=socket, timeout=LIVE_TIMEOUT_S, shared_memory=False)
    try:
        live = client.live()
    except ServingError as exc:
        if isinstance(exc.__cause__, (FileNotFoundError, ConnectionRefusedError)):  # nothing listens there
            return {"source": "live", "unavailable": f"{exc} (the live figures are the running agent's: start it, "
                                                     "or give its serve.socket with --socket)"}
        if isinstance(exc.__cause__, OSError):  # no connection for another reason (no permission): its own words
            return {"source": "live", "unavailable": str(exc)}
        if str(exc).startswith("busy: "):  # told before or after the request went (then the connection is closed)
            return {"source": "live", "unavailable": f"the agent running at {socket} turned this question away: {exc}"}
        who = running_agent(socket)
        if str(exc).startswith("unknown op 'live'"):
            why = (f"the agent running at {socket}{who} is older than the live figures on the device (its serving API "
                   "has no live op): it does not report them here; they still go out on its live topic to edgekit "
                   "monitor. Deploy this version to it (edgekit deploy) to see them here")
        elif client.connected:
            why = f"the agent running at {socket}{who} answered: {exc}"
        else:  # it took the connection, then closed it or let the timeout pass
            why = f"the agent running at {socket}{who} took the connection but gave no answer: {exc}"
        return {"source": "live", "unavailable": why}
    finally:
        client.close()
    model = live.get("model")
    live["measured_by"] = (f"the running agent (pid {live.get('measured_in')}) serving at {socket}, on this device; "
                           "service times with its perf_counter_ns (CLOCK_MONOTONIC), from a request read to its "
                           "answer ready, waiting for an interpreter included")
    if not model:
        live["covers"] = "nothing is served: no requests to count"
        return live
    since = datetime.fromtimestamp(live["since"], timezone.utc).isoformat(timespec="seconds")
    as_of = datetime.fromtimestamp(live["as_of"], timezone.utc).isoformat(timespec="seconds")
    live["covers"] = (f"requests and errors from {since} (when the agent began serving {model.get('variant')} "
                      f"{str(model.get('sha256'))[:12]}; a restart or a swap starts them again) to {as_of}; "
                      f"latency_ms over the last {live.get('window')} requests answered (at most "
                      f"{live.get('window_max')}); queue_depth and clients at {as_of}")
    return live


def running_agent(socket: Path) -> str:
    """Return `` (pid N, edge-kit V)`` for the process that listens at the serving API's ``socket``, as far as this user
    may see it: the pid from the connection's peer credentials (Linux), the version from ``edgekit_protocol`` in its
    working folder (a deployed agent runs from its version's folder, ``<root>/agent-<sha12>-<n>``); `` (pid N)`` when
    the version cannot be read, ``""`` when neither can be known. Never raises."""
    import re
    import socket as sockets

    from device_agents.serving.frames import peer, socket_address

    try:
        with sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM) as sock:
            sock.settimeout(LIVE_TIMEOUT_S)
            with socket_address(socket) as address:
                sock.connect(address)
            who = peer(sock)  # None: no SO_PEERCRED (not Linux), gone meanwhile
    except OSError:
        return ""
    if who is None:
        return ""
    pid = who[0]
    try:
        with open(f"/proc/{pid}/cwd/edgekit_protocol/__init__.py", encoding="utf-8") as f:
            found = re.search(r'^__version__ = "([0-9A-Za-z.+-]{1,40})"', f.read(65536), re.M)
    except (OSError, ValueError):  # another user's process, or not run from its own folder
        found = None
    return f" (pid {pid}, edge-kit {found.group(1)})" if found else f" (pid {pid}; its version unknown)"


def _options(args: argparse.Namespace) -> dict[str, str]:
    """Return ``--delegate-option KEY=VALUE`` options as a dict (the target's model checks them).

    Raises:
        UsageError: an option without ``=``.
    """
    bad = [o for o in args.delegate_option if "=" not in o]
    if bad:
        raise UsageError(f"--delegate-option {bad[0]}: give KEY=VALUE, e.g. device=usb:0")
    return dict(o.split("=", 1) for o in args.delegate_option)


# BenchSettings' checked keys, options of `bench`
_BENCH_KEYS = ("warmup", "min_runs", "min_seconds", "threads", "step_timeout_s", "inference_timeout_s", "total_timeout_s")


def _bench(args: argparse.Namespace) -> None:
    from device_agents.bench import bench_in_child

    if not args.model.is_file():
        raise UsageError(f"{args.model}: model not found")
    try:  # the rules agent.yaml's bench and power blocks follow
        settings = BenchSettings(warmup=args.warmup, min_runs=args.min_runs, min_seconds=args.min_seconds,
                                 threads=args.threads, delegate=args.delegate, runtime=args.runtime,
                                 delegate_options=_options(args), step_timeout_s=args.step_timeout_s,
                                 inference_timeout_s=args.inference_timeout_s, total_timeout_s=args.total_timeout_s)
        PowerConfig(idle_w=args.idle_w, busy_w=args.busy_w)
    except ValueError as exc:
        key = str(exc).split()[0]  # the settings' key: its option is spelled with dashes
        raise UsageError(f"--{key.replace('_', '-')}: {str(exc).removeprefix(key + ' ')}" if key in _BENCH_KEYS
                         else f"{exc} (--idle-w, --busy-w)") from None
    from device_agents.errors import BenchFailed, SmokeFailed
    from device_agents.runtimes import is_tensorrt
    from device_agents.smoke import SmokePool
    from device_agents.targets.edgetpu import EdgeTpu

    pool = SmokePool()
    root = args.root or default_root()
    taken: Any = contextlib.nullcontext()
    if args.delegate == EdgeTpu.key and (root / "models").is_dir():  # an agent's: its own checks take turns there too
        try:
            socket = _serving_socket(root, _agent_config(root))
        except EdgeKitError:  # an agent.yaml that does not load: no agent runs with it, the default socket asked
            socket = _serving_socket(root, None)
        taken = _edge_tpu_taken(root, settings.delegate_options, socket, pool, f"the bench of {args.model.name} by "
                                "edgekit-agent bench opens the Edge TPU it holds (one process at a time)",
                                "benchmarking")
    with taken as note:
        try:  # loaded in a child first: a file that crashes the interpreter crashes the child, not this command
            if not is_tensorrt(args.model):  # a TensorRT variant's engine was built, so loaded, in a child at install
                pool(args.model, runtime=args.runtime, delegate=args.delegate, options=settings.delegate_options)
        except SmokeFailed as exc:
            raise UsageError(f"{args.model}: cannot load or run the model ({exc}){f'; {note}' if note else ''}") \
                from None
        except OSError as exc:
            raise UsageError(f"{args.model}: cannot read it ({exc.strerror or exc})") from None
        try:  # the benchmark too: a model that loops or crashes on the eval samples is ended, named, exit 2
            record = bench_in_child(pool, args.model, settings, eval_file=args.eval,
                                    meter_args={"idle_w": args.idle_w, "busy_w": args.busy_w},
                                    named=lambda key: "--" + key.replace("_", "-"))
        except BenchFailed as exc:  # the child's traceback, if it raised, on request (a service: in the agent's log)
            if exc.detail and args.verbose:
                sys.stderr.write(exc.detail.rstrip() + "\n")
            hint = "; --verbose prints the child's traceback" if exc.detail and not args.verbose else ""
            raise BenchFailed(f"{args.model}: {exc}{hint}") from None
    if args.json:
        print(json.dumps({"model": str(args.model), **record}, indent=2))
    else:
        _print_table(args.model, record)


if __name__ == "__main__":
    main()
