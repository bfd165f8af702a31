"""TensorRT (``tensorrt``): runs the ``trt-*`` variants through ONNX Runtime's TensorRT execution provider.

**This path has not run on a GPU.** No machine of this project has an NVIDIA GPU with TensorRT;
the code is written against the documented API of ONNX Runtime's TensorRT execution provider
(provider options ``trt_fp16_enable``, ``trt_int8_enable``, ``trt_int8_calibration_table_name``,
``trt_int8_use_native_calibration_table``, ``trt_engine_cache_enable``, ``trt_engine_cache_path``,
``trt_timing_cache_enable``; ``trt_profile_min_shapes`` / ``opt`` / ``max`` for a dynamic batch)
and its logic is unit-tested with a fake ``onnxruntime`` (tests/agent/test_tensorrt.py). docs/runtimes.md gives the one command a Jetson owner runs to check it.

Route: ONNX Runtime's TensorRT execution provider (``onnxruntime-gpu`` for JetPack), not TensorRT's
own Python API. The session, its inputs and outputs, the smoke check, the benchmark and the serving
API are then the same code (:class:`~device_agents.runtimes.onnxruntime.OrtInterpreter`) that runs
for real on the CPU provider here; ONNX Runtime parses the ONNX model, hands TensorRT the subgraphs
it takes (the rest runs on CUDA or the CPU rather than failing the build), builds and serialises the
engine; the agent writes no CUDA buffer management of its own, which could not be tested here.

The artifact is an ONNX model tagged by ``edgekit compile`` (:data:`~device_agents.formats.META_RUNTIME`
= ``tensorrt``); for ``trt-int8`` its ``metadata_props`` carry the calibration table the host computed
from ``--calib`` (ONNX Runtime's flatbuffers table, checked against its sha256 here).

Engines are cached under ``<root>/engines/<model sha256>-<TensorRT version>-<GPU name>/``: an engine
moved to another GPU or TensorRT version is invalid, so a change of either gives a new folder, and
folders of the same model under another version or GPU are removed (:func:`invalidate`). The engine
is built at install (:func:`build_in_child`, in a child process whose peak RSS is the reported peak
memory), never on the first request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from device_agents.disk import read_json, sha256_of
from device_agents.formats import (
    META_CALIB,
    META_CALIB_SHA256,
    META_RUNTIME,
    META_VARIANT,
    onnx_input_shapes,
    onnx_metadata,
)
from device_agents.runtimes.base import Runtime
from device_agents.runtimes.onnxruntime import OrtInterpreter, ort_error

PROVIDER = "TensorrtExecutionProvider"
INSTALL = ("install NVIDIA's onnxruntime-gpu wheel for your JetPack into the agent's venv "
           "(docs/firmware/jetson.md, 'TensorRT')")
ENGINES = "engines"  # <root>/engines/<key>/
CALIB_NAME = "calibration.flatbuffers"  # the table's file name in the engine folder (the provider reads it there)
BUILD_RECORD = "build.json"
BUILD_TIMEOUT_S = 1800.0  # large models take minutes on an Orin Nano; a hung build is killed after this
COMMAND_TIMEOUT_S = 10.0
PROFILE_RUNS = 50  # runs of the profiled session that gives the TensorRT node's compute time


class EngineBuildError(RuntimeError):
    """The TensorRT engine could not be built (the message says why, in one line)."""


@dataclass(frozen=True)
class Identity:
    """What an engine is valid for: the TensorRT version and the GPU that built it."""

    trt_version: str
    gpu: str


def _ort() -> Any:
    """Return the onnxruntime module. Raises ImportError when it is not installed."""
    import onnxruntime  # onnxruntime-gpu on a Jetson: the device-side dependency of this plugin only

    return onnxruntime


def _run(argv: list[str]) -> str | None:
    """Return a command's stdout, or None when it is absent, fails or times out."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def trt_version() -> str | None:
    """Return the TensorRT version on this device: the ``tensorrt`` Python module's, else the
    ``libnvinfer`` Debian package's (JetPack installs it), else None."""
    try:
        import tensorrt  # JetPack's bindings, when the venv sees them; only the version is read

        return str(tensorrt.__version__)
    except (ImportError, AttributeError):
        pass
    for package in ("libnvinfer10", "libnvinfer8"):
        out = _run(["dpkg-query", "-W", "-f=${Version}", package])
        if out:
            return out.split("-")[0].split("+")[0]
    return None


def gpu_name() -> str | None:
    """Return the GPU's name: ``nvidia-smi``'s (discrete GPUs), else the board model from the device tree
    (a Jetson's integrated GPU is named by its module, e.g. ``NVIDIA Jetson Orin Nano Developer Kit``), else None."""
    out = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    if out:
        return out.splitlines()[0].strip()
    try:
        return Path("/proc/device-tree/model").read_bytes().rstrip(b"\x00").decode(errors="replace").strip() or None
    except OSError:
        return None


def identity() -> Identity:
    """Return this device's :class:`Identity`.

    Raises:
        EngineBuildError: the TensorRT version or the GPU cannot be told (an engine cached without
            them could be reused where it is invalid).
    """
    version, gpu = trt_version(), gpu_name()
    if version is None:
        raise EngineBuildError("cannot tell the TensorRT version (no tensorrt module, no libnvinfer package): "
                               "is this a Jetson with JetPack's TensorRT?")
    if gpu is None:
        raise EngineBuildError("cannot tell the GPU (no nvidia-smi, no /proc/device-tree/model)")
    return Identity(version, gpu)


def _slug(text: str) -> str:
    """Return ``text`` made safe for a folder name (runs of other characters become ``_``)."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_") or "unknown"


def engine_key(sha256: str, ident: Identity) -> str:
    """Return the engine cache key: ``<model sha256>-<TensorRT version>-<GPU name>`` (file-name safe)."""
    return f"{sha256}-{_slug(ident.trt_version)}-{_slug(ident.gpu)}"


def engine_dir(root: Path, sha256: str, ident: Identity) -> Path:
    """Return the engine folder of model ``sha256`` for ``ident`` under the device root (not created)."""
    return Path(root) / ENGINES / engine_key(sha256, ident)


def invalidate(root: Path, sha256: str, ident: Identity) -> list[str]:
    """Remove the engine folders of model ``sha256`` built for another TensorRT version or GPU.

    Returns:
        The names of the folders removed.
    """
    keep = engine_key(sha256, ident)
    removed = []
    for folder in sorted((Path(root) / ENGINES).glob(f"{sha256}-*")):
        if folder.name != keep and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


def remove_engines(root: Path, sha256: str) -> None:
    """Remove every engine folder of model ``sha256`` (when the model itself is removed)."""
    for folder in (Path(root) / ENGINES).glob(f"{sha256}-*"):
        shutil.rmtree(folder, ignore_errors=True)


def calibration_table(meta: dict[str, str], model: str = "the model") -> bytes | None:
    """Return the calibration table embedded in an artifact's metadata, or None when it has none.

    Raises:
        EngineBuildError: the table does not decode or does not hash to the sha256 recorded beside it.
    """
    if META_CALIB not in meta:
        return None
    try:
        table = base64.b64decode(meta[META_CALIB], validate=True)
    except ValueError:
        raise EngineBuildError(f"{model}: its calibration table is not valid base64; compile it again") from None
    want = meta.get(META_CALIB_SHA256)
    if not want or hashlib.sha256(table).hexdigest() != want:
        raise EngineBuildError(f"{model}: its calibration table does not match its recorded sha256; compile it again")
    return table


def engine_shapes(model: Path) -> dict[str, tuple[int, ...]]:
    """Return the batch-1 shape the engine is built for, per input whose batch axis is dynamic (what
    :func:`provider_options` makes an explicit optimisation profile of: min = opt = max).

    Devices run one sample at a time, and ``edgekit compile`` pins every dimension of a ``trt-*``
    artifact, so such an input only comes from a model made by other means; a dynamic dimension
    besides the batch has no size to build for and is refused.

    Raises:
        EngineBuildError: an input with a dynamic dimension besides the batch, or no declared shape,
            or a name the provider's profile option cannot carry (``,`` or ``:``); the model unreadable.
    """
    try:
        shapes = onnx_input_shapes(model)
    except (OSError, ValueError) as exc:
        raise EngineBuildError(f"{model.name}: cannot read its inputs ({exc})") from None
    profile: dict[str, tuple[int, ...]] = {}
    for name, dims in shapes.items():
        if not dims:
            raise EngineBuildError(f"{model.name}: input '{name}' has no dimensions (a scalar, or no declared shape); "
                                   "compile it again with edgekit compile, which pins every input's shape")
        late = [(axis, d) for axis, d in enumerate(dims) if axis > 0 and isinstance(d, str)]
        if late:
            axis, dim = late[0]
            raise EngineBuildError(f"{model.name}: input '{name}' has a dynamic dimension {axis} ('{dim}'); a TensorRT "
                                   "engine is built for fixed sizes: compile it with edgekit compile --input-shape "
                                   f"{name}=1x... (it pins every dimension)")
        if isinstance(dims[0], str):
            if "," in name or ":" in name:
                raise EngineBuildError(f"{model.name}: input '{name}' has a dynamic batch and a name with ',' or ':', "
                                       "which the TensorRT provider's profile option cannot carry; compile it with "
                                       "edgekit compile, which pins the batch to 1")
            profile[name] = (1, *(int(d) for d in dims[1:]))
    return profile


def provider_options(variant: str, cache: Path, *, calibrated: bool,
                     profile: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Return the TensorRT execution provider's options for ``variant`` with engines cached in ``cache``.

    ``profile`` (:func:`engine_shapes`) gives the inputs with a dynamic batch their one shape as an
    explicit optimisation profile (``trt_profile_min_shapes`` = ``opt`` = ``max``), so the engine is
    built, and found again in the cache, for exactly the shape devices run.

    Raises:
        EngineBuildError: ``trt-int8`` without a calibration table, or not a TensorRT variant.
    """
    if variant not in ("trt-fp16", "trt-int8"):
        raise EngineBuildError(f"'{variant}' is not a TensorRT variant (trt-fp16, trt-int8)")
    options: dict[str, Any] = {
        "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
        "trt_fp16_enable": variant == "trt-fp16",
        "trt_int8_enable": variant == "trt-int8",
    }
    if variant == "trt-int8":
        if not calibrated:
            raise EngineBuildError("trt-int8 needs the calibration table the host computed from --calib, and the "
                                   "artifact has none; compile it again with --calib")
        # read from the engine cache path; ONNX Runtime's own flatbuffers format, not TensorRT's native cache
        options.update(trt_int8_calibration_table_name=CALIB_NAME, trt_int8_use_native_calibration_table=False)
    if profile:
        shapes = ",".join(f"{name}:{'x'.join(map(str, shape))}" for name, shape in profile.items())
        options.update(trt_profile_min_shapes=shapes, trt_profile_opt_shapes=shapes, trt_profile_max_shapes=shapes)
    return options



def _foreign(cache: Path, ident: Identity) -> str | None:
    """Return why the engine files in ``cache`` must not be used on ``ident`` (built for another TensorRT
    version or GPU whose names give the same folder name, or of unknown origin: no build record), or
    None when the folder has no engine or its build record names ``ident``."""
    if not _engines(cache):
        return None
    try:
        record = read_json(cache / BUILD_RECORD)
    except (OSError, ValueError):
        return "no build record says which TensorRT version and GPU built it"
    if not isinstance(record, dict):
        return "its build record is not a JSON object"
    built = (record.get("trt_version"), record.get("gpu"))
    if built != (ident.trt_version, ident.gpu):
        return f"built for TensorRT {built[0]} on {built[1]}"
    return None


def _engines(cache: Path) -> list[Path]:
    """Return the serialized engine files (``*.engine``) in an engine folder, sorted; [] when none."""
    return sorted(p for p in cache.glob("*.engine") if p.is_file())


def _session(ort: Any, model: Path, options: dict[str, Any], *, threads: int = 1, profile: bool = False) -> Any:
    """Return an ONNX Runtime session on the TensorRT provider (CUDA, then CPU, take what TensorRT does not).

    Raises:
        EngineBuildError: ONNX Runtime refused the model or the options, or TensorRT is not the
            session's first provider (the build would silently fall back to CUDA or the CPU).
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if profile:  # the trace goes to the engine folder (writable), not the working directory
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(options["trt_engine_cache_path"]) / "profile")
    providers = [(PROVIDER, options), "CUDAExecutionProvider", "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(model), sess_options=so, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own exception types
        raise EngineBuildError(f"{model.name}: TensorRT engine build failed: {ort_error(exc)}") from None
    got = session.get_providers()
    if not got or got[0] != PROVIDER:
        raise EngineBuildError(f"{model.name}: ONNX Runtime did not put the TensorRT provider first (got "
                               f"{', '.join(got) or 'none'}): {INSTALL}")
    return session


def _zeros(interp: OrtInterpreter) -> None:
    """Set every input of ``interp`` to zeros of its shape and dtype (returns nothing, raises nothing)."""
    import numpy as np

    for d in interp.get_input_details():
        interp.set_tensor(d["index"], np.zeros(tuple(d["shape"]), dtype=d["dtype"]))


def build_engine(model: Path, root: Path, *, threads: int = 1, ident: Identity | None = None,
                 ort: Any = None) -> dict[str, Any]:
    """Build (or find cached) the TensorRT engine of a ``trt-*`` artifact, in this process.

    The session is created with :func:`provider_options` (an input with a dynamic batch gets an explicit
    batch-1 profile, :func:`engine_shapes`) and run once on zeros, so the engine exists
    on disk when this returns (the provider builds at session creation for static shapes, at the
    first run otherwise). Folders of the same model for another TensorRT version or GPU are removed,
    and so is an engine in this device's own folder whose build record names another version or GPU
    (names that make the same folder name) or that has no record (a build cut short): ``invalidated``
    lists them, with the reason.

    Returns:
        The build record: variant, model sha256, engine key and folder, TensorRT version, GPU,
        ``cached`` (an engine was there already), ``seconds`` (wall clock, ``time.perf_counter``,
        session creation + first run), ``threads`` (the session's intra-op threads), engine files and bytes, the
        provider options, ``invalidated``.

    Raises:
        EngineBuildError: not a TensorRT variant, a bad calibration table, an input with a dynamic
            dimension besides the batch (:func:`engine_shapes`), onnxruntime has no TensorRT provider, the TensorRT version or GPU cannot be told, or the build failed (a partly
            written engine folder is removed).
    """
    model = Path(model)
    ort = ort or _ort()
    meta = onnx_metadata(model)
    if meta.get(META_RUNTIME) != "tensorrt":
        raise EngineBuildError(f"{model.name} is not a TensorRT variant (no {META_RUNTIME}=tensorrt in its metadata); "
                               "compile it with a trt-* variant")
    variant = meta.get(META_VARIANT, "")
    table = calibration_table(meta, model.name)
    profile = engine_shapes(model)
    provider_options(variant, Path("."), calibrated=table is not None)  # refuses before anything touches the disk
    if PROVIDER not in ort.get_available_providers():
        raise EngineBuildError(f"{model.name}: this onnxruntime build has no {PROVIDER}: {INSTALL}")
    ident = ident or identity()
    sha = sha256_of(model)
    cache = engine_dir(root, sha, ident)
    invalidated = invalidate(root, sha, ident)
    foreign = _foreign(cache, ident)
    if foreign:  # the same folder name for another identity (names that slug alike), or a half-written build
        shutil.rmtree(cache, ignore_errors=True)
        invalidated.append(f"{cache.name} ({foreign})")
    options = provider_options(variant, cache, calibrated=table is not None, profile=profile)
    cached = bool(_engines(cache))
    cache.mkdir(parents=True, exist_ok=True)
    if table is not None:
        (cache / CALIB_NAME).write_bytes(table)
    t0 = time.perf_counter()
    try:
        interp = OrtInterpreter(_session(ort, model, options, threads=threads), model.name)
        _zeros(interp)
        interp.invoke()
    except (EngineBuildError, RuntimeError, ValueError) as exc:
        if not cached:
            shutil.rmtree(cache, ignore_errors=True)
        msg = str(exc)
        raise EngineBuildError(msg if "TensorRT" in msg else f"{model.name}: TensorRT engine build failed: {msg}") from None
    seconds = time.perf_counter() - t0
    engines = _engines(cache)
    if not engines:
        shutil.rmtree(cache, ignore_errors=True)
        raise EngineBuildError(f"{model.name}: the TensorRT provider ran but wrote no engine to {cache} "
                               "(did TensorRT take no part of the graph?)")
    record = {
        "variant": variant, "sha256": sha, "engine_key": cache.name, "engine_dir": str(cache),
        "trt_version": ident.trt_version, "gpu": ident.gpu, "onnxruntime_version": str(getattr(ort, "__version__", "unknown")),
        "cached": cached, "seconds": round(seconds, 3), "threads": threads,
        "seconds_method": "time.perf_counter around session creation + one run on zeros (the provider builds then)",
        "engines": [p.name for p in engines], "engine_bytes": sum(p.stat().st_size for p in engines),
        "calibration_table_sha256": meta.get(META_CALIB_SHA256), "provider_options": options,
        "invalidated": invalidated,
    }
    (cache / BUILD_RECORD).write_text(json.dumps(record, indent=2))
    return record


def _peak_rss_mb() -> float:
    """Return this process's peak resident set in MB (``getrusage`` ``ru_maxrss``, KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def _child(model: str, root: str, threads: int, conn: Any) -> None:
    """Build the engine in the child process and send ("ok", record) or ("failed", one line) on ``conn``;
    raises nothing (every failure is sent)."""
    try:
        record = build_engine(Path(model), Path(root), threads=threads)
        record["peak_rss_mb"] = _peak_rss_mb()
        conn.send(("ok", record))
    except EngineBuildError as exc:
        conn.send(("failed", str(exc)))
    except Exception as exc:  # noqa: BLE001 - the child reports every failure as one line, never a traceback
        conn.send(("failed", f"{Path(model).name}: TensorRT engine build failed: {type(exc).__name__}: {exc}"))
    conn.close()


def build_in_child(model: Path, root: Path, *, threads: int = 1, timeout: float = BUILD_TIMEOUT_S,
                   target: Callable[..., None] = _child) -> dict[str, Any]:
    """Build the engine (:func:`build_engine`) in a child process, so its memory is measured alone and
    returned to the system, and a crashing builder kills only the child.

    Returns:
        The build record with ``peak_rss_mb``: the child's peak resident set (``getrusage`` ``ru_maxrss``),
        and ``peak_rss_method`` saying so. On a Jetson, GPU memory the driver maps outside the process's
        resident pages is not in it.

    Raises:
        EngineBuildError: the build failed, the child died, or it took longer than ``timeout`` seconds.
    """
    import multiprocessing
    import threading

    from device_agents import smoke

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(str(model), str(root), threads, child), daemon=True)
    deadline = time.monotonic() + timeout
    proc.start()
    child.close()
    stalled = threading.Event()
    ender = None
    try:
        if not parent.poll(timeout):
            raise EngineBuildError(f"{Path(model).name}: TensorRT engine build took more than {timeout:.0f} s; killed")
        # the answer has begun: a child that stops halfway through it is ended at the build's deadline (at least
        # smoke.SEND_GRACE_S from now), as SmokePool.run does, not waited for without end
        ender = threading.Timer(max(deadline - time.monotonic(), smoke.SEND_GRACE_S),
                                lambda: (stalled.set(), proc.kill()))
        ender.daemon = True
        ender.start()
        status, value = parent.recv()
    except (EOFError, OSError):  # OSError: it died partway through sending ("got end of file during message")
        proc.join(5)
        if stalled.is_set():
            raise EngineBuildError(f"{Path(model).name}: the engine build process stopped partway through sending "
                                   "its result; killed at the build's deadline") from None
        raise EngineBuildError(f"{Path(model).name}: the engine build process died (exit code {proc.exitcode})") from None
    finally:
        if ender is not None:
            ender.cancel()
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        parent.close()
    if status != "ok":
        raise EngineBuildError(value)
    value["peak_rss_method"] = "peak resident set of the build process (getrusage ru_maxrss), GPU driver mappings excluded"
    return value


class TrtInterpreter(OrtInterpreter):
    """An :class:`OrtInterpreter` on the TensorRT provider, with the engine's build record and the
    TensorRT node's compute time (:meth:`compute_times_ms`)."""

    def __init__(self, session: Any, name: str, *, model: Path, options: dict[str, Any], engine: dict[str, Any],
                 ort: Any, threads: int):
        super().__init__(session, name)
        self.engine = engine
        self._model, self._options, self._ort, self._threads = model, options, ort, threads

    def compute_times_ms(self, runs: int = PROFILE_RUNS) -> tuple[list[float], str]:
        """Run the model ``runs`` times in a second session with ONNX Runtime's profiler on (the cached
        engine is loaded, not rebuilt) and return the durations of the fused TensorRT node(s) per run,
        in ms, with the method.

        This is the closest figure to trtexec's "GPU Compute Time" the route exposes: the profiler's
        host clock around the TensorRT node's execution (enqueue and stream synchronisation), without
        the input and output copies; not CUDA events.

        Raises:
            ValueError: inputs not set. EngineBuildError: the profiled session cannot be made.
        """
        if len(self._feed) != len(self._inputs):
            raise ValueError("set the inputs before measuring compute time")
        session = _session(self._ort, self._model, self._options, threads=self._threads, profile=True)
        for _ in range(runs):
            session.run(self._output_names, self._feed)
        trace = Path(session.end_profiling())
        try:
            events = json.loads(trace.read_text())
        finally:
            trace.unlink(missing_ok=True)
        return trt_node_times(events, runs), ("ONNX Runtime profiler (host clock) around the fused TensorRT node(s) "
                                              "per run: enqueue + synchronise, no host/device copies; not CUDA events")


def trt_node_times(events: list[dict[str, Any]], runs: int) -> list[float]:
    """Return per-run milliseconds spent in TensorRT nodes, from an ONNX Runtime profile's events.

    Node events (``cat`` ``Node``, name ending ``_kernel_time``) whose ``args.provider`` is the TensorRT
    provider are summed per run, in order; the last ``runs`` runs are returned.

    Raises:
        ValueError: the profile holds no TensorRT node event (TensorRT ran nothing).
    """
    per_run: list[float] = []
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        if (e.get("args") or {}).get("provider") != PROVIDER:
            continue
        per_run.append(float(e.get("dur", 0)) / 1000.0)  # µs
    if not per_run:
        raise ValueError("the profile holds no TensorRT node: TensorRT ran no part of the model")
    if len(per_run) % runs == 0 and len(per_run) >= runs:  # several TensorRT subgraphs: sum each run's nodes
        k = len(per_run) // runs
        per_run = [sum(per_run[i * k:(i + 1) * k]) for i in range(len(per_run) // k)]
    return per_run[-runs:]


def _cached_record(model: Path, root: Path) -> dict[str, Any] | None:
    """Return the build record of ``model``'s cached engine for this device (``cached`` set), or None when
    there is no engine for it under ``root``, or its engine was not built for this device's TensorRT
    version and GPU (then :func:`build_engine` removes it and builds one).

    Raises:
        EngineBuildError: the TensorRT version or GPU cannot be told (:func:`identity`).
    """
    ident = identity()
    cache = engine_dir(root, sha256_of(model), ident)
    if not _engines(cache) or _foreign(cache, ident):  # build_engine then removes a foreign engine and builds
        return None
    record = read_json(cache / BUILD_RECORD)  # _foreign read it just now
    if "provider_options" not in record:
        return None
    return {**record, "cached": True}


def default_root(model: Path) -> Path:
    """Return the device root an installed model lives under (``<root>/models/<sha>/model.onnx``), else the
    model's own folder: where its engine cache goes when no ``engine_root`` option says."""
    model = Path(model).resolve()
    if model.parent.parent.name == "models":
        return model.parent.parent.parent
    return model.parent


class TensorRT(Runtime):
    key: ClassVar[str] = "tensorrt"
    package: ClassVar[str] = "onnxruntime-gpu"
    formats: ClassVar[tuple[str, ...]] = ("onnx",)
    reader_options: ClassVar[dict[str, Any] | None] = {"build": False}  # an application never builds nor removes engines

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Return None when onnxruntime here has the TensorRT provider, else one line on what to install."""
        try:
            providers = _ort().get_available_providers()
        except ImportError:
            return f"runtime '{cls.key}' needs onnxruntime with the TensorRT provider: {INSTALL}"
        if PROVIDER not in providers:
            return f"runtime '{cls.key}': this onnxruntime build has no {PROVIDER}: {INSTALL}"
        return None

    def version(self) -> str:
        """Return ``TensorRT <version> via onnxruntime <version>`` (``unknown`` where one cannot be told)."""
        try:
            ort = _ort().__version__
        except (ImportError, AttributeError):
            ort = "unknown"
        return f"TensorRT {trt_version() or 'unknown'} via onnxruntime {ort}"

    def interpreter(self, model: Path | bytes, *, threads: int = 1, delegate: str = "xnnpack",
                    options: dict[str, Any] | None = None) -> TrtInterpreter:
        """Return a :class:`TrtInterpreter` for an installed or local ``trt-*`` artifact (a path).

        The engine comes from the cache (built at install); when it is not there (``edgekit-agent bench``
        on a file) it is built now, in a child process as at install (:func:`build_in_child`: its time
        and peak memory), and :attr:`TrtInterpreter.engine` says so.
        ``options``: ``engine_root`` (default: :func:`default_root`); ``build`` (default True): False for a reader
        of the agent's store (:attr:`reader_options`), which never builds an engine nor removes one (building one
        removes the engines of other TensorRT versions and GPUs, and a build half done: the agent's own, maybe under
        way). ``delegate`` does not apply.

        Raises:
            ValueError: given bytes (the engine cache needs the file), the engine cannot be built, or (``build``
                False) there is no engine built for this device's TensorRT version and GPU.
        """
        if isinstance(model, bytes | bytearray):
            raise ValueError("a TensorRT variant is run from its file (the engine cache is keyed by it), not from bytes")
        model = Path(model)
        root = Path((options or {}).get("engine_root") or default_root(model))
        ort = _ort()
        try:
            engine = _cached_record(model, root)
            if engine is None and (options or {}).get("build", True) is False:
                raise EngineBuildError(f"{model.name}: no TensorRT engine built for this device's TensorRT version and "
                                       f"GPU under {root / ENGINES} (or one being built); the agent builds it at "
                                       "install and when it serves the model: use its serving API meanwhile")
            engine = engine or build_in_child(model, root, threads=threads)
            session = _session(ort, model, engine["provider_options"], threads=threads)
        except EngineBuildError as exc:
            raise ValueError(str(exc)) from None
        return TrtInterpreter(session, model.name, model=model, options=engine["provider_options"], engine=engine,
                              ort=ort, threads=threads)
