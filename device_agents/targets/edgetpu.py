"""The Coral Edge TPU: the ``edgetpu`` variant, compiled from ``int8`` by ``edgetpu_compiler``.

Rule check: predictions from Coral's documented rules ("TensorFlow models on the Edge TPU"),
labelled ``method: rule-check``; when ``edgetpu_compiler`` runs, its own per-op mapping is recorded
beside them (``method: edgetpu_compiler``) and is the one to trust. Tensors are 8-bit quantized,
shapes are static, a tensor has at most 3 dimensions larger than 1 (the innermost ones), and only
the listed ops map. The compiler cuts the graph once: the first op that cannot map and every op
after it run on the CPU, even ones that could map.

On the device the target loads ``libedgetpu.so.1`` (Coral's ``libedgetpu1-std`` or ``-max``).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator

from device_agents.errors import AcceleratorBusy, DeviceError
from device_agents.store import SMOKE_TIMEOUT_S
from device_agents.targets.base import ModelFacts, OpLike, Target
from edgekit_protocol.errors import ConfigError
from edgekit_protocol.labels import clip, printable

EDGETPU_OPS = frozenset({
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "EXPAND_DIMS",
    "FULLY_CONNECTED", "HARD_SWISH", "L2_NORMALIZATION", "LOGISTIC", "LSTM", "MAXIMUM", "MAX_POOL_2D",
    "MEAN", "MINIMUM", "MUL", "PACK", "PAD", "PRELU", "QUANTIZE", "DEQUANTIZE", "REDUCE_MAX", "REDUCE_MIN",
    "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "RSQRT",
    "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "SQUARED_DIFFERENCE", "SQUEEZE", "STRIDED_SLICE",
    "SUB", "SUM", "TANH", "TRANSPOSE", "TRANSPOSE_CONV",
})


def _edgetpu_reason(op: OpLike, stats: ModelFacts) -> str | None:
    """Return why ``op`` cannot map to the Edge TPU, or None if the documented rules allow it."""
    if op.name not in EDGETPU_OPS:
        return f"{op.name} is not an Edge TPU op"
    for idx in (*op.inputs, *op.outputs):
        if idx < 0:
            continue
        t = stats.tensors[idx]
        if t.constant:  # weights and biases are laid out by the compiler; the rules are about activations
            continue
        if any(d < 0 for d in t.shape_signature):
            return f"tensor '{t.name}' has a dynamic shape {t.shape_signature}"
        if t.dtype in ("float32", "float16") and op.name not in ("QUANTIZE", "DEQUANTIZE"):
            return f"tensor '{t.name}' is {t.dtype}, not 8-bit quantized"
        if any(d > 1 for d in t.shape[:-3]):
            return f"tensor '{t.name}' has shape {list(t.shape)}: more than 3 dimensions larger than 1"
    return None


def _rule_check(stats: ModelFacts) -> dict[str, Any]:
    """Return the predicted Edge TPU mapping of a model.

    Returns:
        ``{"method": "rule-check", "ops_total", "ops_mapped", "first_fallback": {index, op, reason} | None,
        "fallback_ops": {op: count}}``. Ops from the first fallback on are counted as CPU ops.
    """
    first = None
    mapped = 0
    fallback: dict[str, int] = {}
    for op in stats.ops:
        if first is None:
            reason = _edgetpu_reason(op, stats)
            if reason is None:
                mapped += 1
                continue
            first = {"index": op.index, "op": op.name, "reason": reason}
        fallback[op.name] = fallback.get(op.name, 0) + 1
    return {"method": "rule-check", "ops_total": len(stats.ops), "ops_mapped": mapped,
            "first_fallback": first, "fallback_ops": fallback}


COMPILER = "edgetpu_compiler"
COMPILER_TIMEOUT_S = 600
_OP_ROW = re.compile(r"^(?P<op>[A-Z][A-Z0-9_]+)\s+(?P<count>\d+)\s+(?P<status>\S.*?)\s*$")


def find_compiler() -> str | None:
    """Return the path of ``edgetpu_compiler`` on PATH, or None."""
    return shutil.which(COMPILER)


def compiler_version(path: str) -> str:
    """Return ``edgetpu_compiler --version`` output (``Edge TPU Compiler version 16.0.384591198``), or 'unknown' if
    it fails."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parse_compiler_log(text: str) -> list[dict[str, Any]]:
    """Return the per-op rows of an ``edgetpu_compiler -s`` log: ``[{op, count, status, mapped}]``."""
    rows = []
    in_table = False
    for line in text.splitlines():
        if line.strip().startswith("Operator") and "Status" in line:
            in_table = True
            continue
        if in_table and (m := _OP_ROW.match(line.strip())):
            status = m.group("status")
            rows.append({"op": m.group("op"), "count": int(m.group("count")), "status": status,
                         "mapped": status.startswith("Mapped to Edge TPU")})
    return rows


_TOTAL = re.compile(r"^Total number of operations:\s*(\d+)\s*$", re.M)
_ON_TPU = re.compile(r"^Number of operations that will run on Edge TPU:\s*(\d+)\s*$", re.M)
_SUBGRAPHS = re.compile(r"^Number of Edge TPU subgraphs:\s*(\d+)\s*$", re.M)
WHAT_MAPS = ("see docs/firmware/coral.md for what the Edge TPU takes (full-integer ops, static shapes, at most 3 "
             "dimensions larger than 1, the supported ops)")


def mapping_counts(log: str, rows: list[dict[str, Any]]) -> tuple[int | None, int | None]:
    """Return ``(ops mapped to the Edge TPU, ops in all)`` from a compiler log: the summary lines ("Number of
    operations that will run on Edge TPU: N", "Total number of operations: N") where it prints them, else the sums
    of its op table ``rows`` (:func:`parse_compiler_log`); every op mapped when it gives a total and neither, nor
    its "not all operations are supported" sentence; None for a count none of these gives."""
    mapped = int(m.group(1)) if (m := _ON_TPU.search(log)) else sum(r["count"] for r in rows if r["mapped"]) if rows \
        else None
    total = int(m.group(1)) if (m := _TOTAL.search(log)) else sum(r["count"] for r in rows) if rows else None
    if mapped is None and total is not None and "not all operations are supported" not in log:
        mapped = total
    return mapped, total


_CAUSES = ("Compilation failed:", "ERROR:", "Compilation timeout", "Internal compiler error", "libc++abi:")
"""How the lines of a failed compile that say why begin (compiler 16: "Compilation failed: Compilation failed due
to large activation tensors in model.", "ERROR: Attempting to use a delegate that only supports static-sized tensors
...", "Compilation timeout. This is usually caused by large activations."; 14 and 15: "Internal compiler error.
Aborting!"), most telling first: its last line, "Compilation failed!", says nothing."""


def _last_line(log: str) -> str:
    """Return the line of a compiler log that says why it failed: the last one beginning as one of :data:`_CAUSES`
    (the first of those that occurs), else its last non-empty line; control characters shown escaped, at most 200
    characters."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    said = next((ln for cause in _CAUSES for ln in reversed(lines) if ln.startswith(cause)), None)
    return clip(printable(said or (lines[-1] if lines else "no output")), 200)


def run_compiler(int8_model: bytes, compiler: str) -> tuple[bytes, dict[str, Any]]:
    """Compile a full-integer model with ``edgetpu_compiler -s -o DIR DIR/model.tflite``, which writes
    ``DIR/model_edgetpu.tflite`` (the input's name + ``_edgetpu``) and prints its log with the per-op table.

    Returns:
        (compiled flatbuffer, ``{"method": "edgetpu_compiler", "version", "ops": [...] (the op table:
        :func:`parse_compiler_log`), "ops_mapped", "ops_total" (:func:`mapping_counts`), "subgraphs" (Edge TPU
        subgraphs, or None), "log" (its last 4000 characters)}``).

    Raises:
        RuntimeError: one line saying what to do: the compiler could not be started (missing or not executable),
            timed out, exited non-zero (the line saying why: :func:`_last_line`), exited 0 without writing the model,
            or mapped none of the model's operations to the Edge TPU (the compiled model would run on the CPU only,
            like its input).
    """
    with tempfile.TemporaryDirectory(prefix="edgekit-etpu-") as tmp:
        src = Path(tmp) / "model.tflite"
        src.write_bytes(int8_model)
        try:
            proc = subprocess.run([compiler, "-s", "-o", tmp, str(src)], capture_output=True, text=True,
                                  timeout=COMPILER_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{COMPILER} did not finish within {COMPILER_TIMEOUT_S} s; run {COMPILER} -s on the int8 "
                               f"variant's int8.tflite by hand to see where it stops, and {WHAT_MAPS}") from None
        except OSError as exc:
            raise RuntimeError(f"{COMPILER} could not be started ({exc.strerror or exc}: {compiler}); install Coral's "
                               "edgetpu-compiler package (x86-64 Linux, docs/firmware/coral.md) so it is on PATH, "
                               "and compile again") from None
        log = (proc.stdout or "") + (proc.stderr or "")
        out = Path(tmp) / "model_edgetpu.tflite"
        if proc.returncode != 0:
            raise RuntimeError(f"{COMPILER} failed (exit {proc.returncode}): {_last_line(log)}; it could not compile "
                               f"the int8 variant: {WHAT_MAPS}")
        if not out.is_file():
            raise RuntimeError(f"{COMPILER} exited 0 but wrote no {out.name} (its last line: {_last_line(log)}); "
                               "reinstall Coral's edgetpu-compiler package (docs/firmware/coral.md) and compile again")
        rows = parse_compiler_log(log)
        mapped, total = mapping_counts(log, rows)
        if mapped == 0:
            first = next((r for r in rows if not r["mapped"]), None)
            which = f" (first in its table: {first['op']} x{first['count']}: {first['status']})" if first else ""
            raise RuntimeError(f"{COMPILER} mapped none of the model's {total if total is not None else '?'} operations "
                               f"to the Edge TPU{which}, so the variant would run on the CPU only, like int8; "
                               f"{WHAT_MAPS}")
        return out.read_bytes(), {"method": COMPILER, "version": compiler_version(compiler), "ops": rows,
                                  "ops_mapped": mapped, "ops_total": total,
                                  "subgraphs": int(m.group(1)) if (m := _SUBGRAPHS.search(log)) else None,
                                  "log": log[-4000:]}


INTERPRETER_MODULES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")


def load_delegate(library: str, options: dict[str, str] | None = None) -> Any:
    """Return the Edge TPU delegate of ``library`` as the first LiteRT package importable here makes it
    (``load_delegate``) with ``options`` (its options dictionary, :meth:`Target.delegate_options`: ``device`` names
    which Edge TPU), which opens that Edge TPU (the first found without ``device``); dropping it closes the TPU again.

    Raises:
        ImportError: neither ai-edge-litert nor tflite-runtime is installed. ValueError, OSError, RuntimeError:
            the delegate could not be created (the library loads, but no Edge TPU is attached, or it is busy).
    """
    for name in INTERPRETER_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        return module.load_delegate(library, options or {})
    raise ImportError("neither ai-edge-litert nor tflite-runtime is installed")


#: In an agent's root: held (flock) by the process that opens the Edge TPU for a model not served yet (:func:`turn`).
TURN = "edgetpu.lock"
TURN_POLL_S = 0.1  # how often a process waiting for its turn looks again
# How long `edgekit-agent activate` waits for the running agent's own check and load of a model to end (its child is
# killed after SMOKE_TIMEOUT_S): what a host running it over SSH adds to its command timeout.
TURN_WAIT_S = SMOKE_TIMEOUT_S + 60.0
_turns = threading.local()  # per thread: the roots whose turn it holds (``held``)


@contextlib.contextmanager
def turn(root: Path, wait_s: float = 0.0, cancel: threading.Event | None = None) -> Iterator[None]:
    """Run the ``with`` block, where this process opens the Edge TPU for a model that no serving interpreter holds yet,
    holding ``<root>/``:data:`TURN` (an exclusive flock): the running agent's check and load of its current model (at
    its start, or after a switch made over SSH), its own smoke checks and benches (commands over MQTT),
    `edgekit-agent activate`'s smoke check and `edgekit-agent bench` on the Edge TPU take turns there, as an Edge TPU
    opens for one process at a time and the serving socket's pause covers only what is served. A process that ends
    (killed included) lets it go. Waits ``wait_s`` at most for another process's turn to end, or another thread's: a
    flock belongs to the open file, so each thread takes its own, and a turn the calling thread holds already (a
    bench, then its smoke check) is just the block. ``cancel`` set (the agent is stopping) ends the wait at once.
    Yields nothing; raises what the block raises.

    Raises:
        AcceleratorBusy: another process (or another thread of this one) still holds it after ``wait_s``, or when
            ``cancel`` is set while waiting (the file named).
        DeviceError: the file does not open (the root is missing or not this user's), in one line naming it; the block
            does not run.
    """
    held = _turns.__dict__.setdefault("held", set())
    if root in held:  # nested in this thread's turn: a second open's flock would wait for the first
        yield
        return
    try:
        fd = os.open(root / TURN, os.O_RDONLY | os.O_CREAT, 0o644)  # flock needs no write access: any user of the root
    except OSError as exc:
        raise DeviceError(f"cannot take turns on the Edge TPU: {root / TURN} does not open ({exc.strerror or exc}); "
                          "let the agent's user and the one running edgekit-agent activate read it and create files "
                          f"in {root}") from None
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                stopping = cancel is not None and cancel.is_set()
                if stopping or time.monotonic() >= deadline:
                    waited = " (no longer waited for: this agent is stopping)" if stopping else (
                        f" for {wait_s:g} s" if wait_s else "")
                    raise AcceleratorBusy(f"another process holds the Edge TPU for a model it checks or loads "
                                          f"({root / TURN} taken{waited}: the running agent, or edgekit-agent "
                                          "activate or bench); retry once it ends") from None
                if cancel is None:
                    time.sleep(TURN_POLL_S)
                else:
                    cancel.wait(TURN_POLL_S)
        held.add(root)
        try:
            yield
        finally:
            held.discard(root)
    finally:
        os.close(fd)  # the lock goes with it


#: How long an Edge TPU that opened is taken as attached without opening it again (seconds): the status after each
#: command, every bench and activation would otherwise open the USB device each time, and an Edge TPU is opened by one
#: process at a time (a smoke, bench or shadow child opening it in that instant fails). One unplugged meanwhile is
#: found by the model's own smoke inference until then.
PROBE_TTL_S = 30.0
#: The Coral USB Accelerator's USB ids (vendor, product): before its firmware is loaded, and after.
USB_IDS = frozenset({("1a6e", "089a"), ("18d1", "9302")})
SYSFS_USB = Path("/sys/bus/usb/devices")  # where attached USB devices are listed (never opened)
DEV = Path("/dev")  # where the M.2/PCIe card's driver makes /dev/apex_<n>

log = logging.getLogger(__name__)


def enumerated(device: str | None = None, usb: Path | None = None, dev: Path | None = None) -> bool:
    """Return whether the Edge TPU ``device`` names (Coral's ``device`` option: ``usb``, ``usb:N``, ``pci``, ``pci:N``,
    ``:N``; None: any) is attached as the kernel lists it (USB Accelerators by their ids under ``usb``, default
    :data:`SYSFS_USB`; M.2/PCIe cards by their ``apex_<n>`` nodes under ``dev``, default :data:`DEV`; at least N + 1 of
    that kind for an index N; an index that is not ASCII digits, any of that kind: libedgetpu's load said what it
    makes of it), without opening it: so one that another process holds (busy) is told from none attached. Unreadable
    listings count as none. Never raises."""
    usb, dev = usb or SYSFS_USB, dev or DEV
    kind, _, index = (device or "").partition(":")
    found = 0
    try:
        if kind in ("", "usb"):
            for entry in usb.iterdir():
                try:
                    ids = ((entry / "idVendor").read_text().strip(), (entry / "idProduct").read_text().strip())
                except OSError:
                    continue
                found += ids in USB_IDS
        if kind in ("", "pci"):
            found += len(list(dev.glob("apex_*")))
    except OSError:
        return False
    if not (index.isascii() and index.isdigit()):  # "²" is a digit to isdigit(), not to int()
        return found > 0
    index = index.lstrip("0") or "0"
    return len(index) <= 9 and found > int(index)  # never a billion Edge TPUs: int() refuses 4,300 digits and more


@dataclass(frozen=True)
class EdgeTpuOptions:
    """``runtime.options`` of the Edge TPU: which one, when a device has several."""

    device: str | None = None  # "usb", "usb:0", "pci", "pci:0" (Coral's load_delegate option); None: the first


class EdgeTpu(Target):
    key: ClassVar[str] = "edgetpu"
    Options: ClassVar[type] = EdgeTpuOptions
    accelerator: ClassVar[str] = "edgetpu"
    summary: ClassVar[str] = "Coral Edge TPU (USB, M.2, Dev Board)"
    library: ClassVar[str | None] = "libedgetpu.so.1"
    install_hint: ClassVar[str] = "install Coral's libedgetpu1-std package (docs/firmware/coral.md)"
    compiled_variant: ClassVar[str | None] = "edgetpu"
    custom_op: ClassVar[str | None] = "edgetpu-custom-op"

    #: The Edge TPU delegates this process's interpreters hold (the serving API's), each with its ``device`` option:
    #: while one lives, that TPU is open here, attached, and is never opened again to ask.
    _held: ClassVar[weakref.WeakKeyDictionary[Any, str | None]] = weakref.WeakKeyDictionary()
    #: by ``device`` option: time.monotonic() until which the last probe that opened that TPU holds
    _opened_until: ClassVar[dict[str | None, float]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def interpreter_options(cls, interpreter_module: Any, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """Return the keyword arguments of :meth:`Target.interpreter_options`, remembering the delegate made (while an
        interpreter holds it, :meth:`device_missing` opens no Edge TPU to ask).

        Raises:
            ConfigError, RuntimeUnavailable: as :meth:`Target.interpreter_options`.
        """
        kwargs = super().interpreter_options(interpreter_module, options)
        device = cls.options(options).device
        with cls._lock:  # the probe looks through them under it: never changed meanwhile
            for delegate in kwargs.get("experimental_delegates", []):
                try:
                    cls._held[delegate] = device
                except TypeError:  # a delegate that takes no weak reference: asked as before
                    pass
        return kwargs

    @classmethod
    def held(cls, options: dict[str, Any] | None = None) -> bool:
        """Return whether an interpreter of this process (the serving API's) holds the Edge TPU ``options`` names with
        ``device`` (``runtime.options``); a ``device`` left out, here or there, is the first found: taken as the same
        one. Options the target does not take: False (their load says so). Never raises."""
        try:
            device = cls.options(options).device
        except ConfigError:
            return False
        with cls._lock:
            held = list(cls._held.values())
        return any(d is None or device is None or d == device for d in held)

    @classmethod
    def forget(cls) -> None:
        """Forget that an Edge TPU opened (the next :meth:`device_missing` opens it again); return nothing."""
        with cls._lock:
            cls._opened_until.clear()

    @classmethod
    def device_missing(cls, options: dict[str, Any] | None = None) -> str | None:
        """Return "no Edge TPU attached: ..." when ``libedgetpu.so.1`` loads but its delegate opens no Edge TPU and the
        kernel lists none (the USB Accelerator unplugged, the PCIe card's driver missing), else None. The Edge TPU
        asked for is the one ``options`` (``runtime.options``) names with ``device`` (``usb:0``, ``pci:0``, ``:1``; the
        first found without), as the interpreter's delegate is loaded: with two, the other one opening says nothing of
        it. Asked only when it matters: not while an interpreter of this process holds that Edge TPU (the serving API
        serving an edgetpu model), nor within :data:`PROBE_TTL_S` of a probe that opened it; else it opens it and
        closes it again (:func:`load_delegate`). One the kernel lists (:func:`enumerated`) that does not open is busy
        (held by another process: a smoke, bench or shadow child, another application): None, with a warning, as that
        process's own run says what fails. Options the target does not take: their one line (the interpreter's load
        would refuse them too). No LiteRT package here: None, the runtime's own check says so. A TPU that did not open
        is asked for again at the next check, so one plugged in later is found without restarting the agent."""
        try:
            checked = cls.options(options)
        except ConfigError as exc:
            return str(exc)
        device = checked.device
        named = f" as {clip(printable(device), 40)} (runtime.options.device)" if device else ""  # a config's: one line
        with cls._lock:
            if device in cls._held.values() or time.monotonic() < cls._opened_until.get(device, 0.0):
                return None
            try:
                delegate = load_delegate(cls.library or "", cls.delegate_options(checked))
            except ImportError:
                return None
            except (ValueError, OSError, RuntimeError) as exc:
                said = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                if enumerated(device):
                    log.warning("an Edge TPU is attached%s but did not open (%s): busy in another process? Taken as "
                                "attached", named, said)
                    return None
                return (f"no Edge TPU attached{named}: {cls.library} loads but its delegate opens no Edge TPU ({said}); "
                        "plug in the Coral USB Accelerator (or load the M.2/PCIe card's gasket-dkms driver, "
                        "docs/firmware/coral.md)")
            del delegate
            cls._opened_until[device] = time.monotonic() + PROBE_TTL_S
            return None

    @classmethod
    def rule_check(cls, stats: ModelFacts) -> dict[str, Any]:
        """Return the predicted Edge TPU mapping (see the module docstring)."""
        return _rule_check(stats)

    @classmethod
    def compiler_unavailable(cls) -> str | None:
        if find_compiler() is None:
            return (f"{COMPILER} not found on PATH (it runs on x86-64 Linux; install Coral's edgetpu-compiler "
                    "package, see docs/firmware/coral.md); the int8 variant is the input it needs")
        return None

    @classmethod
    def compile(cls, model: bytes) -> tuple[bytes, dict[str, Any]]:
        return run_compiler(model, find_compiler() or COMPILER)

    @classmethod
    def tool_versions(cls) -> dict[str, str | None]:
        path = find_compiler()
        return {COMPILER: compiler_version(path) if path else None}
