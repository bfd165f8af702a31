"""SSH to one device with Fabric: verified host keys, remote agent commands, checked uploads.

Fabric's ``Connection`` accepts unknown host keys by default; here the client loads only the fleet's
``known_hosts`` and refuses a key it does not hold, unless ``trust_new`` is set, in which case the
key is recorded there (trust on first use, as ``ssh -o StrictHostKeyChecking=accept-new``). A key
that differs from the recorded one is always refused.
"""

from __future__ import annotations

import errno
import functools
import inspect
import itertools
import json
import logging
import os
import re
import selectors
import shlex
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko
from fabric import Connection

from device_agents import codecheck
from device_agents.disk import read_head, within_limit
from device_agents.store import (
    MAX_META_BYTES,
    META,
    UNREADABLE_META,
    damage,
    is_sha256,
    meta_fault,
    read_meta,
)
from device_agents.supervise import is_supervisor
from edge_kit.errors import DeployError
from edge_kit.fleet.inventory import Device
from edgekit_protocol.desired import MAX_ERROR_CHARS
from edgekit_protocol.labels import clip, printable

CONNECT_TIMEOUT_S = 10
COMMAND_TIMEOUT_S = 300
# How long one SFTP request (open, write, stat, rename...) waits for the device's answer: a device that stops
# answering fails the upload after this, wherever it stops (paramiko's SFTP waits without a deadline).
SFTP_STALL_S = 60
# The slowest an upload may go on average: it fails after 2 * SFTP_STALL_S + its size / SFTP_MIN_RATE seconds in all
# (a 14 MB model: 5.6 min; one request's stall is the stall's failure, not this one), so a device answering each
# request just in time cannot hold a deploy for a minute per chunk. 64 KiB/s is half a megabit: a Pi on a poor Wi-Fi
# link does many times that.
SFTP_MIN_RATE = 64 << 10
_known_hosts_lock = threading.Lock()
# Written (under the root) before a deploy changes what the agent runs (code, keys, config), removed once it
# restarted the agent: a deploy cut off in between leaves it, and the next one restarts the agent.
RESTART_PENDING = "restart.pending"
MIN_PYTHON = (3, 10)  # the agent's (pyproject's requires-python)
AGENT_UNIT = "edgekit-agent"  # the systemd unit the deploy writes, where systemd runs and the user is root
UNIT_TIMEOUT_S = 30  # how long the probe waits for `systemctl is-active`
# paramiko's transport thread logs a failed handshake's traceback (a port with no sshd behind it); each device's
# failure is already one line in the results, and with no handler Python's last resort printed it on stderr
logging.getLogger("paramiko").addHandler(logging.NullHandler())


# The agent's dependencies the facts below look for, and how a missing LiteRT is named: all that ``missing`` can
# hold (the deploy quotes it, so a device's answer is checked against this list).
AGENT_MODULES = ("numpy", "yaml", "paho", "cryptography")
LITERT_MISSING = "ai_edge_litert or tflite_runtime"
FACT_MODULES = (*AGENT_MODULES, LITERT_MISSING)
PATH_MAX = 4096  # Linux's longest path: the device Python's path is one
# A process id has at most 7 digits (Linux's pid_max is at most 2^22); a pid file holding more names no process (and
# int() refuses 4,300 or more: a ValueError the deploy reported as "unexpected", and a rollback raised)
MAX_PID_DIGITS = 10

# What only the device's Python can say: free space under the root, and which of the agent's
# dependencies it lacks. Standard library only (the agent may not be there yet).
_PYTHON_FACTS = f"AGENT_MODULES, LITERT_MISSING = {AGENT_MODULES!r}, {LITERT_MISSING!r}\n" + r"""
import importlib.util, json, os, pathlib, shutil, sys
probe = sys.argv[1]
while not os.path.exists(probe):
    probe = os.path.dirname(probe)
missing = [m for m in AGENT_MODULES if importlib.util.find_spec(m) is None]
if not any(importlib.util.find_spec(m) for m in ("ai_edge_litert", "tflite_runtime")):
    missing.append(LITERT_MISSING)
ort = importlib.util.find_spec("onnxruntime")
runtimes = {"onnxruntime": ort is not None,  # optional: the onnx-* variants; trt-*: onnxruntime-gpu's TensorRT provider
            "tensorrt": any(any(pathlib.Path(p, "capi").glob("libonnxruntime_providers_tensorrt*"))
                            for p in ((ort.submodule_search_locations or []) if ort else []))}
runtimes["litert"] = importlib.util.find_spec("ai_edge_litert") is not None  # a profile's runtime.engine
runtimes["tflite-runtime"] = importlib.util.find_spec("tflite_runtime") is not None
try:  # the edgetpu variant: the Edge TPU's delegate library (loading it opens no TPU)
    import ctypes
    ctypes.CDLL("libedgetpu.so.1")
    runtimes["edgetpu"] = True
except OSError:
    runtimes["edgetpu"] = False
print(json.dumps({"free": shutil.disk_usage(probe).free, "python": sys.executable, "missing": missing,
                  "runtimes": runtimes, "version": list(sys.version_info[:3])}))
"""


# What the deploy reads of a device, in one command: this runs after the source of
# device_agents.codecheck's tree() (DeviceShell._probe), as `python -I -S -B -c`: standard library only,
# and nothing of the device's working folder, PYTHONPATH or site-packages is imported before the check.
# A file that exists but cannot be read is an error naming it, a missing one is null. It imports no more
# than it needs and writes its JSON itself: json (through re and enum), pathlib and typing took most of
# its time here (python -X importtime), and a device's CPU is slower still. The host interprets what it
# prints.
_DEVICE_STATE = r"""
root, pending, unit, verify = os.path.expanduser(sys.argv[1]).rstrip("/"), sys.argv[2], sys.argv[3], sys.argv[4:]

def opened(path):  # the file open for reading; None when it is missing or no regular file: a FIFO would hold the
    try:  # probe (opened without waiting for a writer, never read), a link to /dev/zero fill the device's memory;
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # what the deploy writes there then replaces it
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a link leading to itself: no file either (an error held every deploy)
            return None
        sys.exit("cannot read %s (%s)" % (path, exc.strerror or exc))
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        return None
    return f

def read(path, limit=-1):  # its bytes, the first `limit` of them when one is given; None as opened() says
    f = opened(path)
    if f is None:
        return None
    with f:
        try:
            return f.read(limit)
        except OSError as exc:
            sys.exit("cannot read %s (%s)" % (path, exc.strerror or exc))

def sha256(path):  # its sha256, read a block at a time (a file of gigabytes costs no memory); None as opened() says
    f = opened(path)
    if f is None:
        return None
    h = hashlib.sha256()
    with f:
        try:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        except OSError as exc:
            sys.exit("cannot read %s (%s)" % (path, exc.strerror or exc))
    return h.hexdigest()

def text(path, limit):  # its first `limit` bytes as text: more is no key, pid or manifest (cut, it reads as none)
    data = read(path, limit)
    return None if data is None else data.decode("utf-8", "replace")

def meta(path):  # its bytes as text (the host judges them: read_meta), or {"fault": why} when they are damaged
    data = read(path, MAX_META_BYTES + 1)  # whatever they say (meta_fault: over the limit, not UTF-8): a byte that
    if data is None:  # is not UTF-8 is printed as six characters
        return None
    fault = meta_fault(data)
    return data.decode("utf-8") if fault is None else {"fault": fault}

def printed(value):  # what dump(value) takes on the wire
    return len(dump(value).encode("utf-8", "backslashreplace"))

def listing():  # {name: meta}, the deploy's candidates first, in META_BUDGET bytes in all whatever the device holds:
    out, spent = {}, 0  # past it, a candidate's meta.json is sent as not read, another model is left out (the
    for n in ordered:  # deploy needs only the candidates')
        value = meta(os.path.join(root, "models", n, META))
        size = printed(n) + printed(value) + 2
        if spent + size <= META_BUDGET:
            spent += size
        elif n in verify:
            value = {"fault": "%s not read: the device's meta.json files take more than the probe's %d bytes"
                              % (META, META_BUDGET)}
        else:
            continue
        out[n] = value
    return out

def cut(files):  # the code's listing in CODE_BUDGET bytes: past it, cut, one entry saying so (it differs, so the
    out, spent = {}, 0  # deploy installs the code again)
    for rel, sha in files.items():
        spent += printed(rel) + printed(sha) + 2
        if spent > CODE_BUDGET:
            out["... (the listing was cut at %d bytes)" % CODE_BUDGET] = "cut"
            break
        out[rel] = sha
    return out

def exists(path):
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:  # there, though not ours to look into
        return True
    return True

def digest(name):
    return sha256(os.path.join(root, name))

def active(systemd):  # whether systemd runs `unit` (systemctl is-active); None when not asked or no systemd runs
    if not unit or not systemd:
        return None
    import time  # built in; subprocess's imports took 30 ms of CPU here, more than all the rest of the probe
    try:
        pid = os.posix_spawnp("systemctl", ["systemctl", "is-active", "--quiet", unit], os.environ,
                              file_actions=[(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)])
    except OSError:  # no systemctl: not known to run
        return False
    deadline = time.monotonic() + UNIT_TIMEOUT
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0
        time.sleep(0.002)
    os.kill(pid, 9)  # no answer in time: not known to run
    os.waitpid(pid, 0)
    return False

def file_hashes(folder):  # the files a stored model's check needs (device_agents.store.damage), by name
    hashes = {name: sha256(os.path.join(folder, name)) for name in ("model.tflite", "model.onnx", "eval.npz")}
    return {name: h for name, h in hashes.items() if h is not None}

try:
    names = sorted(n for n in os.listdir(os.path.join(root, "models")) if len(n) == 64 and not n.strip(HEX))
except (FileNotFoundError, NotADirectoryError):
    names = []
except OSError as exc:
    sys.exit("cannot list %s/models (%s)" % (root, exc.strerror or exc))
systemd = exists("/run/systemd/system")
ordered = [n for n in names if n in verify] + [n for n in names if n not in verify]  # the deploy's candidates first
try:
    current = os.path.basename(os.readlink(os.path.join(root, "current"))) or None
except OSError:
    current = None
pid = (text(os.path.join(root, "agent.pid"), 64) or "").strip()
cmdline = read("/proc/%s/cmdline" % pid, CMDLINE_BYTES) if pid.isdigit() else None  # cut: not the supervisor
manifest = text(os.path.join(root, "agent", MANIFEST), MAX_MANIFEST_BYTES + 1)
code = os.path.join(root, "agent")
_ESCAPES = {**{i: "\\u%04x" % i for i in range(32)}, ord('"'): '\\"', ord("\\"): "\\\\"}

def dump(value):
    if isinstance(value, dict):
        return "{" + ",".join(dump(k) + ":" + dump(v) for k, v in value.items()) + "}"
    if isinstance(value, str):  # UTF-8 on the wire: JSON allows it, and it spares a pass over every character
        return '"' + value.translate(_ESCAPES) + '"'
    return {None: "null", True: "true", False: "false"}[value]

sys.stdout.buffer.write(dump({
    "root": root,
    "digests": {"config_sha256": digest("agent.yaml"), "password_sha256": digest("mqtt.pass"),
                "operators_sha256": digest("identity/operators.json"),
                "broker_ca_sha256": digest("identity/broker-ca.pem")},
    "device_pub": (text(os.path.join(root, "identity", "device.pub"), 4096) or "").strip() or None,
    "has_device_key": exists(os.path.join(root, "identity", "device.key")),
    "pid": pid if pid.isdigit() else None, "cmdline": None if cmdline is None else cmdline.decode("latin-1"),
    "restart_pending": exists(os.path.join(root, pending)), "systemd": systemd, "unit_active": active(systemd),
    "models": listing(), "current": current,
    "hashes": {n: file_hashes(os.path.join(root, "models", n)) for n in verify if n in names},
    "code": {"files": cut(tree(code)) if os.path.isdir(code) else None,  # a manifest over the budget: none
             "manifest": manifest if manifest is None or printed(manifest) <= CODE_BUDGET else None},
}).encode("utf-8", "backslashreplace") + b"\n")  # a lone surrogate (an undecodable file name): \udcXX
"""


def _probe_shape(found: Any) -> None:
    """Check that ``found`` has the shape :data:`_DEVICE_STATE` prints (the types of its fields, down to the
    texts in its maps); return nothing. What the host then reads of it cannot raise anything but a refusal.

    Raises:
        ValueError: it does not; the text names the first field that differs.
    """
    maybe = (str, type(None))
    if not isinstance(found, dict):
        raise ValueError(f"a JSON {type(found).__name__}")
    for name, kinds in (("root", str), ("device_pub", maybe), ("has_device_key", bool), ("pid", maybe),
                        ("cmdline", maybe), ("restart_pending", bool), ("systemd", bool),
                        ("unit_active", (bool, type(None))), ("current", maybe),
                        ("digests", dict), ("models", dict), ("hashes", dict), ("code", dict)):
        if not isinstance(found.get(name), kinds):
            raise ValueError(f"a field '{name}' of type {type(found.get(name)).__name__}")
    if len(found["root"]) > PATH_MAX:  # a path: the deploy's uploads go under it and its errors name it
        raise ValueError(f"a field 'root' of {len(found['root']):,} characters, longer than a path")
    if found["pid"] is not None and not (found["pid"].isascii() and found["pid"].isdigit()):
        raise ValueError("a field 'pid' that is not a process id")
    if found["cmdline"] is not None and not all(ord(c) < 256 for c in found["cmdline"]):
        raise ValueError("a field 'cmdline' that is not bytes as latin-1")
    for name, value in found["digests"].items():
        if not isinstance(value, maybe):
            raise ValueError(f"a field 'digests.{name}' of type {type(value).__name__}")
    if not all(is_sha256(name) for name in itertools.chain(found["models"], found["hashes"])):
        # what the probe lists are the store's folders, named by sha256: a device's made-up names (350,000 of one
        # character each fit in what the host parses) each cost a judgement, seconds of the host's CPU in all
        raise ValueError("a field 'models' or 'hashes' naming a model by other than a sha256")
    if any(not isinstance(meta, maybe) and not (isinstance(meta, dict) and list(meta) == ["fault"] and isinstance(
            meta["fault"], str) and len(meta["fault"]) <= MAX_FAULT_CHARS) for meta in found["models"].values()):
        raise ValueError("a field 'models' whose values are not all text, null or {fault: a short text}")
    for files in found["hashes"].values():
        if not isinstance(files, dict) or any(not isinstance(h, str) for h in files.values()):
            raise ValueError("a field 'hashes' that is not sha256s by file name")
    code = found["code"]
    if not isinstance(code.get("files"), (dict, type(None))) or not isinstance(code.get("manifest"), maybe):
        raise ValueError("a field 'code' that is not {files: object or null, manifest: text or null}")


def _device_bytes(text: str | None) -> bytes | None:
    """Return the bytes of a device file that :data:`_DEVICE_STATE` printed as text, as the file holds them (it
    sends a file's text only when its bytes are UTF-8: :func:`device_agents.store.meta_fault`); None stays None. A
    lone surrogate (a device's own script) is kept as bytes that are not UTF-8 either, which the rule then refuses."""
    if text is None:
        return None
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _facts_shape(found: Any) -> None:
    """Check that ``found`` has the shape :data:`_PYTHON_FACTS` prints: ``free`` a byte count, ``python`` a path
    (text of at most :data:`PATH_MAX` characters), ``missing`` a list of :data:`FACT_MODULES`, ``runtimes`` an object, ``version`` a list of at least two whole numbers; return
    nothing. What the deploy then compares, joins and formats of it cannot raise.

    Raises:
        ValueError: it does not; the text names the first field that differs.
    """
    if not isinstance(found, dict):
        raise ValueError(f"a JSON {type(found).__name__}")
    free, version, missing = found.get("free"), found.get("version"), found.get("missing")
    if type(free) is not int or free < 0:
        raise ValueError(f"a field 'free' of {type(free).__name__} {clip(repr(free), 40)}, not a byte count")
    python = found.get("python")
    if not isinstance(python, str) or len(python) > PATH_MAX or not isinstance(found.get("runtimes"), dict):
        raise ValueError(f"no 'python' path (text of at most {PATH_MAX} characters) and object 'runtimes'")
    if not isinstance(missing, list) or any(m not in FACT_MODULES for m in missing):
        raise ValueError("a field 'missing' that is not a list of the modules the script looks for")
    if not isinstance(version, list) or len(version) < 2 or any(type(v) is not int for v in version):
        raise ValueError("a field 'version' that is not [major, minor, micro]")


@functools.cache
def _probe_script() -> str:
    """Return the probe's script: :data:`_DEVICE_STATE` after the sources of :func:`device_agents.codecheck.tree` (with
    its ``_listed``), :func:`device_agents.disk.within_limit` and :func:`device_agents.store.meta_fault` (read once:
    ``inspect`` tokenizes the modules for it)."""
    return (f"from __future__ import annotations\nimport errno, hashlib, os, stat, sys\nMANIFEST = {codecheck.MANIFEST!r}\n"
            f"MAX_MANIFEST_BYTES, HEX = {codecheck.MAX_MANIFEST_BYTES!r}, '0123456789abcdef'\n"
            f"META, MAX_META_BYTES, UNREADABLE_META = {META!r}, {MAX_META_BYTES!r}, {UNREADABLE_META!r}\n"
            f"META_BUDGET, CODE_BUDGET, CMDLINE_BYTES = {META_BUDGET!r}, {CODE_BUDGET!r}, {CMDLINE_BYTES!r}\n"
            f"UNIT_TIMEOUT = {UNIT_TIMEOUT_S!r}\n"
            + inspect.getsource(codecheck.tree) + inspect.getsource(codecheck._listed)
            + inspect.getsource(within_limit) + inspect.getsource(meta_fault)
            + _DEVICE_STATE)


def probe_argv(python: str, root: str, verify: tuple[str, ...] = (), unit: str | None = None) -> list[str]:
    """Return the argv that prints, as JSON, the state of the device root ``root`` (``~`` expanded there)
    with the device's ``python``: the probe's script in isolated mode without ``site``. The stored models
    named in ``verify`` (sha256s) also get their files hashed (``hashes``); with ``unit``, where systemd runs, whether
    it runs that unit (``unit_active``, ``systemctl is-active``: a command of its own over SSH took another session
    and round trip per device and deploy)."""
    return [python, "-I", "-S", "-B", "-c", _probe_script(), root, RESTART_PENDING, unit or "", *verify]


def agent_unit(dev: Device) -> str | None:
    """Return the systemd unit the agent runs as on ``dev`` where systemd runs (``edgekit-agent``: the deploy user is
    root and the device is not simulated, whose siblings share the host's systemd), else None (the agent's own
    supervisor keeps it running)."""
    return AGENT_UNIT if dev.user == "root" and not dev.simulated else None


# What a dropped or refused connection raises, from the socket, paramiko's transport or its SFTP reader.
_LINK_ERRORS = (OSError, paramiko.SSHException, EOFError)


def _why(exc: BaseException) -> str:
    """Return an exception's text, or what it means when it has none (paramiko's bare EOFError)."""
    return str(exc).strip() or f"connection closed ({type(exc).__name__})"


class _AeadFirstTransport(paramiko.Transport):
    """paramiko's transport offering AES-GCM before AES-CTR (paramiko lists it last).

    GCM encrypts and authenticates in one OpenSSL pass; CTR needs a separate HMAC of every packet
    in paramiko's Python loop. Measured here on a 14 MB upload: the deploy tool's CPU went from
    0.08 to 0.06 CPU-s. Servers without GCM still get CTR.
    """

    _preferred_ciphers = tuple(sorted(paramiko.Transport._preferred_ciphers, key=lambda c: "-gcm@" not in c))


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only; elsewhere only Nagle is switched off


class _PromptAckSocket(socket.socket):
    """A TCP socket that acknowledges what it reads at once (Linux ``TCP_QUICKACK``, re-armed per read).

    sshd leaves Nagle on for non-interactive sessions and announces its host keys right after the
    login, so its reply to the session request waits until that announcement is acknowledged, and
    Linux delays the acknowledgement by 40 ms. With ``TCP_NODELAY`` against the same stall in
    paramiko's own small handshake writes, connecting and reading a device's state takes about a
    third of the time (``benchmarks/test_fleet_figures.py``), on loopback as on a LAN.
    """

    __slots__ = ()

    def recv(self, *args: Any) -> bytes:
        data = super().recv(*args)
        if _QUICKACK is not None:
            self.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        return data


MAX_JSON_STARTS = 64  # the lines run_json tries a document from: a shell's greeting is a few lines
# What run_json parses at most: the probe prints a few hundred bytes per stored model (4 MiB: over 10,000 of them).
# Parsed, JSON takes up to 25 times its size (`[{},{},...]`: a dict per 3 bytes), so the output limit alone let
# one device's answer take 1.6 GB of the host's memory.
MAX_JSON_BYTES = 4 << 20
MAX_OUTPUT_BYTES = 64 << 20  # what one command may print (stdout and stderr): the probe's JSON is a few kB per model
# What the probe prints of the device's meta.json files in all (their text, escaped): half of what the host parses.
# Install writes a few hundred bytes (thousands of models fit); past it a candidate's is sent as not read, damaged,
# and the other models are left out.
META_BUDGET = MAX_JSON_BYTES // 2
# What it prints of the agent's code listing, and of its signed manifest, each (the bundle's: about 10 kB); past it
# the listing is cut and the manifest left out, so the deploy installs the code again instead of failing the probe.
CODE_BUDGET = 512 << 10
CMDLINE_BYTES = 8 * PATH_MAX  # what it reads of the pid file's process's command line (the supervisor's: 4 paths)
MAX_FAULT_CHARS = 200  # a meta.json's fault as the probe sends it (meta_fault's line, or the budget's)


ERROR_TAIL_LINES = 10_000  # how many lines from its end a failing command's stderr is searched for its error line


def _error_line(stderr: str) -> str | None:
    """Return the last line of a failing command's ``stderr`` that says something (not blank, not an ``INFO:`` log
    line), whole, looked for among its last :data:`ERROR_TAIL_LINES` lines; None when there is none. Splitting all
    of it made a string of every line: 64 MiB of two-letter lines (within the output limit) cost the host 1.7 GB."""
    end = len(stderr)
    for _ in range(ERROR_TAIL_LINES):
        if end <= 0:
            break
        start = stderr.rfind("\n", 0, end) + 1
        line = stderr[start:end].rstrip("\r")
        if line.strip() and not line.startswith("INFO:"):
            return line
        end = start - 1
    return None


def upload_deadline(size: int) -> float:
    """Return how many seconds an upload of ``size`` bytes may take in all: twice :data:`SFTP_STALL_S` (so a device
    that stops answering fails as that, after one request's wait) plus its size at :data:`SFTP_MIN_RATE`."""
    return 2 * SFTP_STALL_S + size / SFTP_MIN_RATE


def _close_quietly(chan: paramiko.Channel) -> None:
    """Close ``chan``; return nothing. A link that went down meanwhile (closing then raises) is left alone: what
    waits on the channel fails on its own, and the reason already on its way is not replaced by this one."""
    try:
        chan.close()
    except _LINK_ERRORS:
        pass


def _watchdog(chan: paramiko.Channel, seconds: float) -> tuple[threading.Timer, threading.Event]:
    """Return a started timer that closes ``chan`` after ``seconds`` (paramiko waits for the answer to an exec or a
    subsystem request without a timeout; cancel the timer once it came) and the event it sets when it fired.
    Closing a channel whose link went down raised in the timer's thread: a traceback on the operator's terminal."""
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        _close_quietly(chan)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    return timer, expired


class OutputTooLarge(Exception):
    """A command on the device printed more than :data:`MAX_OUTPUT_BYTES`."""


class Cancelled(DeployError):
    """The operation was cancelled (Ctrl-C on a deploy) before it reached the device: nothing changed there."""


CANCEL_POLL_S = 0.05  # how often a connect or a name lookup in progress looks at its cancel event


def _wait(done: Callable[[float], bool], deadline: float, cancel: threading.Event | None, what: str) -> None:
    """Return once ``done(seconds)`` (wait at most that long; True when finished) says so.

    Raises:
        Cancelled: ``cancel`` was set meanwhile (looked at every :data:`CANCEL_POLL_S`).
        TimeoutError: ``deadline`` (monotonic) passed first; ``what`` names the step.
    """
    while True:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"cancelled during the {what}; nothing was changed on the device")
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{what} timed out")
        if done(min(left, CANCEL_POLL_S) if cancel is not None else left):
            return


def _resolve(host: str, port: int, deadline: float, cancel: threading.Event | None) -> list[tuple[Any, ...]]:
    """Return ``getaddrinfo`` for a TCP connection to ``host:port``. A literal address is taken at once; a
    name is looked up in a daemon thread, given up (left to finish on its own) at ``deadline`` or on ``cancel``,
    since the resolver itself takes neither.

    Raises:
        OSError (socket.gaierror): the name does not resolve. TimeoutError, Cancelled: see :func:`_wait`.
    """
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        pass  # a name, not an address
    found: list[Any] = []
    ready = threading.Event()

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            found.append(exc)
        ready.set()

    threading.Thread(target=lookup, name=f"resolve {host}", daemon=True).start()
    _wait(ready.wait, deadline, cancel, f"name lookup of {host}")
    if isinstance(found[0], OSError):
        raise found[0]
    return found[0]


def open_socket(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S,
                cancel: threading.Event | None = None) -> socket.socket:
    """Return a TCP connection to ``host:port`` for SSH: no Nagle, prompt acknowledgements.

    The name lookup and the connect share ``timeout``; both give up within :data:`CANCEL_POLL_S` of
    ``cancel`` being set (a connect is made non-blocking and polled, a lookup runs in a thread).
    Each address the name has is tried in turn, as :func:`socket.create_connection` does.

    Raises:
        Cancelled: ``cancel`` was set first.
        OSError: unreachable, refused, not resolved or timed out (TimeoutError).
    """
    deadline = time.monotonic() + timeout
    error: OSError | None = None
    for family, kind, proto, _name, address in _resolve(host, port, deadline, cancel):
        plain = socket.socket(family, kind, proto)
        try:
            plain.setblocking(False)
            code = plain.connect_ex(address)
            if code in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
                with selectors.DefaultSelector() as sel:
                    sel.register(plain, selectors.EVENT_WRITE)
                    _wait(lambda s: bool(sel.select(s)), deadline, cancel, f"connect to {host}:{port}")
                code = plain.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, os.strerror(code))
        except OSError as exc:  # TimeoutError is one: the next address gets what is left (nothing, then)
            plain.close()
            error = exc
            continue
        except BaseException:
            plain.close()
            raise
        sock = _PromptAckSocket(fileno=plain.detach())
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise error if error is not None else OSError(f"{host} has no address")


class HostKeyError(DeployError):
    """The device's SSH host key is unknown or has changed."""


def known_hosts_name(host: str, port: int) -> str:
    """Return the name a host key is filed under in ``known_hosts``: ``host`` on port 22, else ``[host]:port``
    (as OpenSSH and paramiko write and look it up)."""
    return host if port == 22 else f"[{host}]:{port}"


class _RecordNewKey(paramiko.MissingHostKeyPolicy):
    """Accept a host key seen for the first time and append it to ``known_hosts``."""

    def __init__(self, path: Path):
        self.path = path

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        try:
            with _known_hosts_lock:
                if not self.path.parent.is_dir():
                    self.path.parent.mkdir(mode=0o700, parents=True)  # ~/.ssh: the owner's alone, as ssh makes it
                # one write() of one line with O_APPEND: deploys in other processes appending at once lose nothing
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        except OSError as exc:
            raise _KnownHostsUnwritable(exc.strerror or str(exc)) from None
        client.get_host_keys().add(hostname, key.get_name(), key)


class _KnownHostsUnwritable(Exception):
    """Raised inside paramiko's connect by :class:`_RecordNewKey`; mapped to HostKeyError with the device."""


class _RefuseNewKey(paramiko.MissingHostKeyPolicy):
    """Refuse a host key that is not in ``known_hosts`` with our own error (not paramiko's text)."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise _UnknownHostKey(hostname)


class _UnknownHostKey(Exception):
    """Raised inside paramiko's connect by :class:`_RefuseNewKey`; mapped to HostKeyError with the device."""


def _load_known_hosts(client: paramiko.SSHClient, path: Path) -> None:
    """Load ``path`` (when it exists) into ``client`` as the host keys to check against.

    Raises:
        HostKeyError: the file cannot be read or is no regular file (a FIFO, a device), or a line holds a key that is
            not one (with its line number).
    """
    with _known_hosts_lock:
        if not path.exists():
            return
        try:
            read_head(path, 0)  # a regular file only: paramiko's open of a FIFO waited for a writer, holding the deploy
            client.load_host_keys(str(path))
        except OSError as exc:
            raise HostKeyError(f"{path}: cannot read the SSH known_hosts file ({exc.strerror or exc}); "
                               "make it a readable file, or set known_hosts in the fleet file") from None
        except paramiko.hostkeys.InvalidHostKey as exc:
            text = path.read_text(encoding="utf-8", errors="replace").splitlines()
            number = next((i for i, ln in enumerate(text, 1) if ln.strip() == str(exc.line).strip()), None)
            raise HostKeyError(f"{path}{f':{number}' if number else ''}: not a valid host key line "
                               f"({str(exc.line)[:60]!r}); remove or fix it (ssh-keyscan gives the right line)") from None


class DeviceShell:
    """An open SSH connection to one device. Use as a context manager.

    Raises (on enter):
        HostKeyError: the host key is not in known_hosts (and ``trust_new`` is off) or has changed.
        Cancelled: ``cancel`` was set while connecting (or looking the name up).
        DeployError: unreachable host, refused key, timeout; or the probe of the device's state failed
            (its ``python`` not found, a file there unreadable: see :meth:`_probe`).
    """

    def __init__(self, dev: Device, known_hosts: Path, trust_new: bool = False, cancel: threading.Event | None = None,
                 verify: tuple[str, ...] = ()):
        self.dev = dev
        self.verify = verify  # sha256s of stored models the probe checks (``info["damaged"]``)
        self._sftp: paramiko.SFTPClient | None = None  # opened by the first upload (:meth:`sftp`)
        self.cancel = cancel  # set: a connect (or name lookup) still under way gives up at once (Cancelled)
        self.known_hosts = Path(known_hosts).expanduser()
        self.trust_new = trust_new
        kwargs: dict[str, Any] = {"allow_agent": dev.key is None, "look_for_keys": dev.key is None,
                                  "banner_timeout": CONNECT_TIMEOUT_S, "auth_timeout": CONNECT_TIMEOUT_S,
                                  "transport_factory": _AeadFirstTransport}
        if dev.key is not None:
            kwargs["key_filename"] = str(dev.key.expanduser())
        self.conn = Connection(dev.host, user=dev.user, port=dev.port, connect_timeout=CONNECT_TIMEOUT_S,
                               connect_kwargs=kwargs)
        client = paramiko.SSHClient()  # the host keys are loaded on enter (a bad known_hosts fails there)
        client.set_missing_host_key_policy(_RecordNewKey(self.known_hosts) if trust_new else _RefuseNewKey())
        self.conn.client = client

    def __enter__(self) -> DeviceShell:
        try:
            self._connect()
        except DeployError:
            self.conn.client.close()  # the socket too, when the handshake got that far
            raise
        try:
            self.info = self._probe()
        except DeployError:
            self.__exit__()
            raise
        except _LINK_ERRORS as exc:
            self.__exit__()
            raise DeployError(f"{self.dev.name}: SSH connection lost while reading the device's state ({_why(exc)})") from None
        self.root = self.info["root"]
        return self

    def _connect(self) -> None:
        where = f"{self.dev.name} ({self.dev.user}@{self.dev.host}:{self.dev.port})"
        try:
            _load_known_hosts(self.conn.client, self.known_hosts)
        except HostKeyError as exc:
            raise HostKeyError(f"{self.dev.name}: {exc}") from None
        if self.dev.key is not None:  # paramiko's own error for it would read as the host being unreachable
            key = self.dev.key.expanduser()
            try:  # its first byte, through a regular file only: a FIFO held the deploy waiting for a writer
                read_head(key, 0)
            except OSError as exc:
                raise DeployError(f"{where}: SSH key {key}: {exc.strerror or _why(exc)}; set the device's `key:` "
                                  "in the fleet file to its private key file") from None
        name = known_hosts_name(self.dev.host, self.dev.port)
        try:
            self.conn.connect_kwargs["sock"] = open_socket(self.dev.host, self.dev.port, cancel=self.cancel)
            self.conn.open()
        except Cancelled as exc:
            raise Cancelled(f"{where}: {exc}") from None
        except paramiko.BadHostKeyException:
            raise HostKeyError(f"{where}: host key differs from the one in {self.known_hosts}; refusing (someone may be "
                               "impersonating the device; if it was reinstalled, remove the old key: "
                               f"{shlex.join(['ssh-keygen', '-f', str(self.known_hosts), '-R', name])})") from None
        except _KnownHostsUnwritable as exc:
            raise HostKeyError(f"{where}: cannot record its new host key in {self.known_hosts} ({exc}); make it "
                               "writable, or add the key yourself (ssh-keyscan)") from None
        except _UnknownHostKey:
            raise HostKeyError(f"{where}: host key is not in {self.known_hosts}; check it and add it "
                               f"(ssh-keyscan -p {self.dev.port} {shlex.quote(self.dev.host)}), or rerun with --trust-new-hosts to record it") from None
        except paramiko.SSHException as exc:
            raise DeployError(f"{where}: SSH failed: {_why(exc)}") from None
        except OSError as exc:
            raise DeployError(f"{where}: unreachable ({exc.strerror or _why(exc)})") from None
        except EOFError as exc:
            raise DeployError(f"{where}: the connection closed during the SSH handshake ({_why(exc)})") from None

    def _probe(self) -> dict[str, Any]:
        """Return what of the agent and its models is on the device, read by one command.

        One Python process on the device (:data:`_DEVICE_STATE` after :func:`device_agents.codecheck.tree`'s
        source, sent from this host, in isolated mode without ``site``) returns: the absolute root, the
        agent code's tree of sha256s and its signed manifest (``code``, for
        :func:`edge_kit.fleet.agent_install.ensure_agent`), hashes of its config, password, operator
        keys and broker CA, the device's public key and whether its private key is there, whether its
        supervisor runs (the pid file's process, recognised by its command line), whether systemd
        runs and, where the agent would run as its unit (:func:`agent_unit`), whether it runs that unit
        (``unit_active``, else None), whether a deploy left a restart pending, the installed models and the
        current one (the layout of :mod:`device_agents.store`; a ``meta.json`` is judged here from its bytes by
        :func:`device_agents.store.read_meta`, or on the device already by :func:`device_agents.store.meta_fault`, and
        once the probe printed :data:`META_BUDGET` of them, a candidate in ``verify`` (they come first) counts as
        damaged, not read, and the other models are left out; the code's listing and manifest take at most
        :data:`CODE_BUDGET` each),
        and ``damaged``: ``{sha256: why}`` for the stored models named
        in ``verify`` that fail :func:`device_agents.store.damage` (their files hashed on the device). No SFTP
        session is opened: a device with nothing to
        change costs one SSH handshake and this one command.

        Raises:
            DeployError: the device's Python is missing or failed (named), a file exists but cannot be
                read, or the connection was lost.
        """
        found = self.run_json(probe_argv(self.dev.python, self.dev.root, self.verify, agent_unit(self.dev)),
                              "the device state probe")
        try:
            _probe_shape(found)
        except ValueError as exc:
            raise DeployError(f"{self.dev.name}: the device state probe printed {exc}, not what the probe prints; check "
                              "the device's Python (`python:` in the fleet file) and that the device is yours") from None
        root = found["root"]
        installed, metas, unread = [], {}, {}
        for name, meta in sorted(found["models"].items()):
            if isinstance(meta, dict):  # damaged whatever its bytes say (meta_fault on the device), or not read
                unread[name] = meta["fault"]
                continue
            try:  # as the agent's store reads it, from the same bytes: strict JSON, within the contract install writes
                metas[name] = read_meta(_device_bytes(meta), name)
            except ValueError as exc:  # damaged: not counted as installed, so the deploy uploads it again
                unread[name] = str(exc)
                continue
            installed.append(metas[name])
        damaged = {name: why for name, hashes in found["hashes"].items()
                   if (why := damage(metas.get(name), name, hashes, unread.get(name))) is not None}
        pid, cmdline = found["pid"], found["cmdline"]
        return {"root": root, **found["digests"], "code": found["code"],
                "device_pub": found["device_pub"], "has_device_key": found["has_device_key"],
                "agent_pid": int(pid) if pid and len(pid) <= MAX_PID_DIGITS and cmdline is not None
                and is_supervisor(cmdline.encode("latin-1"), root) else None,
                "restart_pending": found["restart_pending"], "systemd": found["systemd"],
                "unit_active": found["unit_active"],
                "installed": installed, "current": found["current"], "damaged": damaged}

    @functools.cached_property
    def python_facts(self) -> dict[str, Any]:
        """Return free bytes under the root, the device Python's path and ``version`` ([major, minor, micro]),
        the agent dependencies it lacks and which optional runtimes it has (``runtimes``:
        ``{"onnxruntime": bool, "tensorrt": bool}``).

        Raises:
            DeployError: the interpreter is missing or failed, the connection was lost, or it printed a document
                of another shape (a hostile or broken device; the field is named).
        """
        found = self.run_json([self.dev.python, "-c", _PYTHON_FACTS, self.root], "the device's Python")
        try:
            _facts_shape(found)
        except ValueError as exc:
            raise DeployError(f"{self.dev.name}: the device's Python printed {printable(exc)}, not what the facts "
                              "script prints; check the device's Python (`python:` in the fleet file) and that the "
                              "device is yours") from None
        return found

    def __exit__(self, *_: object) -> None:
        self._close_sftp()
        try:
            self.conn.close()
        except _LINK_ERRORS:  # the link is gone: raising would hide why
            self.conn.client.close()

    def run(self, argv: list[str], *, env: dict[str, str] | None = None, timeout: float = COMMAND_TIMEOUT_S,
            background: bool = False, cwd: str | None = None) -> str:
        """Run an argv list on the device (quoted for its shell) and return stdout.

        ``background`` detaches it (``setsid nohup ... &``) and returns at once; ``cwd`` runs it there
        (the deployed agent always runs from ``<root>/agent``, so ``python -m`` finds only checked code).

        Raises:
            DeployError: non-zero exit (with the last line of stderr), a timeout, more output than
                :data:`MAX_OUTPUT_BYTES` or a lost connection.
        """
        program = argv[0] if argv else ""
        if env:
            argv = ["env", *(f"{k}={v}" for k, v in env.items()), *argv]
        command = shlex.join(argv)
        if background:  # in a brace group: the backgrounded command alone holds (redirected) descriptors
            command = f"{{ setsid nohup {command} >/dev/null 2>&1 < /dev/null & }}"
        if cwd:
            command = f"cd {shlex.quote(cwd)} && {command}"
        try:
            exited, stdout, stderr = self._exec(command, timeout)
        except TimeoutError:
            raise DeployError(f"{self.dev.name}: `{argv[-1] if argv else ''}` took longer than {timeout:.0f} s") from None
        except OutputTooLarge as exc:
            raise DeployError(f"{self.dev.name}: {program!r} {exc}; refused (a command the deploy runs prints a few kB: "
                              "check the device)") from None
        except _LINK_ERRORS as exc:
            raise DeployError(f"{self.dev.name}: SSH connection lost ({_why(exc)})") from None
        if exited == 127:  # POSIX shells and env: command not found
            raise DeployError(f"{self.dev.name}: {program!r} is not found on the device"
                              + (f"; install Python {'.'.join(map(str, MIN_PYTHON))} or newer there, or set `python:` "
                                 "for the device in the fleet file to its interpreter" if program == self.dev.python else ""))
        if exited != 0:
            line = _error_line(stderr)
            # the device's text, up to the output limit: cut as a reported error is (a table cell, a rollout's row)
            raise DeployError(f"{self.dev.name}: {clip(line, MAX_ERROR_CHARS) if line else f'exit code {exited}'}")
        return stdout

    def _exec(self, command: str, timeout: float) -> tuple[int, str, str]:
        """Return the exit code, stdout and stderr (UTF-8, undecodable bytes replaced) of ``command``, run by the
        device user's shell on a session channel of its own, with no input (end of file at once).

        Read straight from the channel (stdout and stderr as they come, so neither fills the window while the
        other is awaited), it returns as soon as the command exits: Fabric's runner polled for the exit every
        10 ms in threads of its own (10 to 20 ms more per command, ``benchmarks/test_fleet_figures.py``).

        Raises:
            TimeoutError: not finished within ``timeout`` seconds, the exec request's answer included (the
                channel is closed).
            OutputTooLarge: it printed more than :data:`MAX_OUTPUT_BYTES` (the channel is closed).
            EOFError, OSError, paramiko.SSHException: the connection was lost (no exit status came).
        """
        transport = self.conn.client.get_transport()
        if transport is None or not transport.is_active():
            raise EOFError("connection closed")
        deadline = time.monotonic() + timeout
        chan = transport.open_session(timeout=timeout)
        watchdog, expired = _watchdog(chan, timeout)
        try:
            chan.exec_command(command)
            chan.shutdown_write()
            out, err = bytearray(), bytearray()
            with selectors.DefaultSelector() as sel:
                sel.register(chan, selectors.EVENT_READ)  # its pipe is set by stdout and stderr data, and by the end
                while True:
                    # the limit is checked per read: a device printing as fast as this loop drains the channel keeps
                    # it ready, and a check after draining came only when it paused
                    while chan.recv_ready() and len(out) + len(err) <= MAX_OUTPUT_BYTES:
                        out += chan.recv(1 << 16)
                    while chan.recv_stderr_ready() and len(out) + len(err) <= MAX_OUTPUT_BYTES:
                        err += chan.recv_stderr(1 << 16)
                    if len(out) + len(err) > MAX_OUTPUT_BYTES:
                        raise OutputTooLarge(f"printed more than {MAX_OUTPUT_BYTES >> 20} MiB")
                    if chan.eof_received or chan.closed:
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(command)
                    sel.select(left)
            if not chan.status_event.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(command)
            out += b"".join(iter(lambda: chan.recv(1 << 16) if chan.recv_ready() else b"", b""))
            err += b"".join(iter(lambda: chan.recv_stderr(1 << 16) if chan.recv_stderr_ready() else b"", b""))
            if len(out) + len(err) > MAX_OUTPUT_BYTES:
                raise OutputTooLarge(f"printed more than {MAX_OUTPUT_BYTES >> 20} MiB")
            if chan.exit_status == -1:  # closed without one: the link went down (or the watchdog closed it)
                raise EOFError("connection closed before the command's exit status came")
            return chan.exit_status, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
        except _LINK_ERRORS:
            if expired.is_set():
                raise TimeoutError(command) from None
            raise
        finally:
            watchdog.cancel()
            _close_quietly(chan)

    def agent(self, *args: str, timeout: float = COMMAND_TIMEOUT_S) -> dict[str, Any]:
        """Run ``python -m device_agents ARGS --root ROOT`` from the deployed agent; return its JSON.

        Raises:
            DeployError: the agent command failed (its one-line error is the reason), or printed JSON that is not
                an object (every agent command prints one).
        """
        root = self.root
        found = self.run_json([self.dev.python, "-B", "-m", "device_agents", *args, "--root", root], "the agent",
                              env={"PYTHONPATH": f"{root}/agent"}, timeout=timeout, cwd=f"{root}/agent")
        if not isinstance(found, dict):
            raise DeployError(f"{self.dev.name}: the agent's `{args[0] if args else ''}` printed a JSON "
                              f"{type(found).__name__}, not an object; check that the device runs edge-kit's agent")
        return found

    def run_json(self, argv: list[str], what: str, **kwargs: Any) -> Any:
        """Run ``argv`` as :meth:`run` does and return the JSON document it printed.

        Text the device's shell prints before it (a ``.bashrc``, ``BASH_ENV`` or profile that echoes in
        non-interactive sessions too) is skipped: the document is the output from the first line that
        starts one and parses to the end (of the first :data:`MAX_JSON_STARTS` such lines).

        Raises:
            DeployError: as :meth:`run`, more output than :data:`MAX_JSON_BYTES`, or no JSON document in the output
                (``what`` printed it; the start of the output is given).
        """
        out = self.run(argv, **kwargs)
        if len(out) > MAX_JSON_BYTES:  # characters: at least as many bytes
            raise DeployError(f"{self.dev.name}: {what} printed {len(out):,} characters, more than the "
                              f"{MAX_JSON_BYTES >> 20} MiB a JSON answer may take; refused (check the device)")
        # Each try costs up to the output's length (a failed one counts the lines before it): at most
        # MAX_JSON_STARTS of them, so a device printing a million lines that start with `{` cannot hold the host.
        lines = itertools.islice(re.finditer(r"\n(?=[{\[])", out), MAX_JSON_STARTS - 1)
        starts = [len(out) - len(out.lstrip())] + [m.start() + 1 for m in lines]
        decoder = json.JSONDecoder()
        for start in starts:
            try:
                doc, end = decoder.raw_decode(out, start)
            except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
                continue
            if not out[end:].strip():
                return doc
        raise DeployError(f"{self.dev.name}: unexpected output from {what}: {out.strip()[:200]!r}; if the device's "
                          "shell prints it, make its .bashrc or profile quiet for non-interactive sessions")

    def sftp(self) -> paramiko.SFTPClient:
        """Return this connection's SFTP session, opened on first use, each request of which waits at most
        :data:`SFTP_STALL_S` for the device's answer (Fabric's ``Connection.sftp`` waits without end: a device
        whose SFTP server stops answering held the deploy forever).

        Raises:
            TimeoutError: the device did not answer the session's opening within :data:`SFTP_STALL_S`.
            EOFError, OSError, paramiko.SSHException: the connection was lost, or the device refused SFTP.
        """
        if self._sftp is not None:
            return self._sftp
        transport = self.conn.client.get_transport()
        if transport is None or not transport.is_active():
            raise EOFError("connection closed")
        chan = transport.open_session(timeout=SFTP_STALL_S)
        chan.settimeout(SFTP_STALL_S)
        watchdog, expired = _watchdog(chan, SFTP_STALL_S)
        try:
            try:
                chan.invoke_subsystem("sftp")
            finally:
                watchdog.cancel()
            self._sftp = paramiko.SFTPClient(chan)  # its version exchange waits as every request does
        except _LINK_ERRORS:
            _close_quietly(chan)
            if expired.is_set():
                raise TimeoutError("timed out") from None
            raise
        return self._sftp

    def _close_sftp(self) -> None:
        """Close the SFTP session (after a request timed out its answers no longer match; the next use opens a new
        one); return nothing."""
        sftp, self._sftp = self._sftp, None
        if sftp is not None:
            try:
                sftp.close()
            except _LINK_ERRORS:
                pass

    def _sftp_failed(self, exc: BaseException) -> str:
        """Return what an SFTP step's error means for the operator, closing the session when the device stopped
        answering (a later request on it would read the late answer to this one)."""
        if isinstance(exc, TimeoutError):
            self._close_sftp()
            return f"the device did not answer within {SFTP_STALL_S:g} s"
        return _why(exc)

    def put(self, local: Path | bytes, remote: str, mode: int = 0o644, *, rename: bool = True) -> str:
        """Upload a file (or bytes) to ``remote``, creating its folder; lands as ``.part`` then renamed.

        ``rename`` False leaves it as ``.part`` (for a step that checks it and moves it itself). Each SFTP request
        waits at most :data:`SFTP_STALL_S` for the device's answer, and the whole upload at most
        2 x :data:`SFTP_STALL_S` + its size / :data:`SFTP_MIN_RATE` (:func:`upload_deadline`).

        Returns:
            Where the file is on the device.

        Raises:
            DeployError: the transfer failed (disk full, connection lost, the device stopped answering for
                :data:`SFTP_STALL_S`, or the upload went slower than :data:`SFTP_MIN_RATE`: the line names the
                bytes sent and the rate required), or ``local`` cannot be read; the ``.part`` is removed where the
                device still answers.
        """
        target = remote
        part = target + ".part"
        size, allowed, sent = 0, 0.0, [0]
        watchdog: threading.Timer | None = None
        expired = threading.Event()
        try:
            size = len(local) if isinstance(local, bytes) else Path(local).stat().st_size  # unreadable: one line too
            allowed = upload_deadline(size)
            sftp = self.sftp()
            watchdog, expired = _watchdog(sftp.get_channel(), allowed)  # the channel closed: the waiting request ends
            self._makedirs(sftp, target.rsplit("/", 1)[0] if "/" in target else ".")
            if isinstance(local, bytes):  # the mode is set before a byte is written (private keys)
                with sftp.open(part, "wb") as f:
                    f.chmod(mode)
                    f.set_pipelined(True)
                    for start in range(0, len(local), f.MAX_REQUEST_SIZE):
                        f.write(local[start:start + f.MAX_REQUEST_SIZE])
                        sent[0] = min(start + f.MAX_REQUEST_SIZE, len(local))
            else:
                sftp.put(str(local), part, callback=lambda done, _total: sent.__setitem__(0, done))
                sftp.chmod(part, mode)
            if rename:
                sftp.posix_rename(part, target)
        except _LINK_ERRORS as exc:
            sizes = re.search(r"size mismatch.*?(\d+) != (\d+)", str(exc))
            if expired.is_set():  # the device answered, each request in time, but too slowly for the whole
                self._close_sftp()
                why = (f"{sent[0]:,} of {size:,} bytes sent in {allowed:.0f} s; an upload must go at "
                       f"{SFTP_MIN_RATE / 1024:g} KiB/s or more: check the device's link and load")
            else:
                if sizes:  # paramiko's check after the transfer: the server kept fewer bytes than were sent
                    exc = OSError(f"the device stored only {sizes[1]} of {sizes[2]} bytes; is its disk full?")
                elif str(exc) == "Failure":  # SFTP v3 reports a failed write (ENOSPC among others) only as this
                    exc = OSError("the device could not write the file (SFTP 'Failure'); is its disk full or read-only?")
                why = self._sftp_failed(exc)
            if not isinstance(exc, TimeoutError):  # a device that stopped answering would hold this as long again
                try:
                    self.sftp().remove(part)
                except _LINK_ERRORS:
                    pass
            raise DeployError(f"{self.dev.name}: upload of {Path(remote).name} failed ({why})") from None
        finally:
            if watchdog is not None:
                watchdog.cancel()
        if expired.is_set():  # it fired as the upload ended: the next request gets a session of its own
            self._close_sftp()
        return target if rename else part

    def remove(self, remote: str) -> None:
        """Remove a remote file (nothing when it does not exist).

        Raises:
            DeployError: the connection failed, the device refused or stopped answering for :data:`SFTP_STALL_S`.
        """
        try:
            self.sftp().remove(remote)
        except FileNotFoundError:
            pass
        except _LINK_ERRORS as exc:
            raise DeployError(f"{self.dev.name}: cannot remove {remote} ({self._sftp_failed(exc)})") from None

    @staticmethod
    def _makedirs(sftp: paramiko.SFTPClient, folder: str) -> None:
        parts = [p for p in folder.split("/") if p]
        path = "/" if folder.startswith("/") else ""
        for part in parts:
            path = f"{path}{part}" if path in ("", "/") else f"{path}/{part}"
            try:
                sftp.stat(path)
            except FileNotFoundError:
                sftp.mkdir(path, 0o700 if part == "identity" else 0o777)  # keys: the owner's alone
