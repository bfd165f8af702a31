"""ONNX Runtime (``onnxruntime``): runs ``.onnx`` artifacts (the ``onnx-*`` variants).

The runtime hands back an :class:`OrtInterpreter`, an adapter with the surface of a LiteRT
interpreter that the rest of the agent uses (``get_input_details``, ``get_output_details``,
``set_tensor``, ``invoke``, ``get_tensor``; no signature list), so benchmarks, the smoke check and
the serving API run an ONNX model through the same code as a ``.tflite`` one.

Execution providers: the CPU provider everywhere; the CUDA provider first when the installed build
has it (``onnxruntime-gpu`` on a Jetson). The TensorRT provider is left to the ``tensorrt`` runtime
(:mod:`device_agents.runtimes.tensorrt`), which runs the ``trt-*`` variants with a configured engine
cache built at install: an ``onnx-*`` variant on a Jetson must not silently become a TensorRT engine
rebuilt, uncached, at every load. The provider the session actually runs on is
:attr:`OrtInterpreter.provider`, and a bench record names it. LiteRT's targets
(``delegate``: xnnpack, none, edgetpu, gpu) do not apply to ONNX models and are not used here.

Devices that want it install the ``agent-onnx`` extra; without it the runtime stays registered
and says in one line how to install it.
"""

from __future__ import annotations

import functools
import platform
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from device_agents.lazy import LazyModule
from device_agents.runtimes.base import Runtime

if TYPE_CHECKING:
    import numpy as np
else:  # imported where a model runs (the agent's store commands start without it), then a plain global
    np = LazyModule("numpy", globals(), "np")

INSTALL = "pip install 'edge-kit[agent-onnx]'"
# Preferred first; the CPU provider is always last and always present. TensorRT: the tensorrt runtime's.
PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


@functools.cache
def _dtypes() -> dict[str, type]:
    """Return the numpy dtype of each ONNX tensor type the agent feeds, keyed by ONNX Runtime's name of it."""
    return {
        "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
        "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int16)": np.int16, "tensor(uint16)": np.uint16,
        "tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(bool)": np.bool_,
    }


# ONNX Runtime prefixes a message with the C++ source line and, often, the throwing function's signature
_CPP_WHERE = re.compile(r"\S+\.(?:h|cc|cpp):\d+\s+(?:[\w:~<>,&*\s]+\([^()]*\)\s*(?:const\s*)?)?")
_OPSET = re.compile(r"Opset (\d+) is under development.*?support for domain (\S+) is till opset (\d+)", re.S)


# ONNX Runtime's x86-64 int8 kernels multiply uint8 activations by int8 weights with AVX2's vpmaddubsw, which
# saturates at 16 bits on CPUs without VNNI: an int8 model then answers far from what it computes elsewhere
# (PP-OCR's direction classifier: 7.6 dB from fp32 on an AVX2-only host, 22.2 dB with this set, as on a CPU with
# VNNI). Arm's kernels (the devices) have no such step. Set on x86-64 so figures and answers are the model's own.
X64_PRECISE_INT8 = ("session.x64quantprecision", "1")


def precise_int8(options: Any) -> Any:
    """Return ONNX Runtime ``options`` (SessionOptions) with :data:`X64_PRECISE_INT8` set when this is an x86-64
    machine (a no-op elsewhere, and on CPUs with VNNI)."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        options.add_session_config_entry(*X64_PRECISE_INT8)
    return options


def ort_error(exc: BaseException) -> str:
    """Return ONNX Runtime's error as one line a user can act on (at most 300 characters).

    The C++ source location and function signature ONNX Runtime puts in front are dropped; an opset
    newer than this build supports is said as such, with the highest opset it runs.
    """
    text = str(exc).strip()
    opset = _OPSET.search(text)
    if opset:
        version = getattr(_ort_or_none(), "__version__", "?")
        return (f"the model uses opset {opset.group(1)} of domain {opset.group(2)}, and onnxruntime {version} runs "
                f"up to opset {opset.group(3)}: export the model with opset {opset.group(3)} or lower, or upgrade "
                "onnxruntime")
    text = " ".join(_CPP_WHERE.sub("", text).split())
    return (text or type(exc).__name__)[:300]


def _ort_or_none() -> Any:
    try:
        return _ort()
    except ImportError:
        return None


def _ort() -> Any:
    import onnxruntime  # the device-side dependency of this plugin only (the agent-onnx extra)

    return onnxruntime


class OrtInterpreter:
    """An ONNX Runtime session behind the LiteRT interpreter calls the agent makes.

    Tensor indexes: inputs are ``0..n-1`` in the model's input order, outputs ``n..n+m-1``.
    """

    def __init__(self, session: Any, name: str):
        self.session = session
        self.provider: str = session.get_providers()[0]
        self._inputs = [self._detail(i, arg, name) for i, arg in enumerate(session.get_inputs())]
        first = len(self._inputs)
        self._outputs = [self._detail(first + i, arg, name, output=True) for i, arg in enumerate(session.get_outputs())]
        self._output_names = [d["name"] for d in self._outputs]
        if not self._outputs:
            raise ValueError(f"{name}: the model declares no outputs; export it with its outputs")
        self._feed: dict[str, np.ndarray] = {}
        self._results: list[np.ndarray] = []

    @staticmethod
    def _detail(index: int, arg: Any, model: str, output: bool = False) -> dict[str, Any]:
        dtype = _dtypes().get(arg.type)
        if dtype is None:
            raise ValueError(f"{model}: tensor '{arg.name}' has type {arg.type}, which the agent does not feed")
        if not arg.shape:  # ONNX Runtime gives [] for a scalar and for an undeclared shape alike
            raise ValueError(f"{model}: tensor '{arg.name}' has no dimensions (a scalar, or no declared shape); "
                             "the agent runs one sample with a batch axis: export it with shape [1, ...]")
        shape = []
        for axis, dim in enumerate(arg.shape):
            if isinstance(dim, int) and dim > 0:
                shape.append(dim)
            elif axis == 0:
                shape.append(1)  # the batch axis: devices run one sample at a time
            elif output:
                shape.append(-1)  # known after a run; nothing is fed to an output
            else:
                raise ValueError(f"{model}: tensor '{arg.name}' has a dynamic dimension {axis} ({dim!r}); "
                                 "pin its shape (edgekit compile does for the onnx-* variants)")
        return {"index": index, "name": arg.name, "shape": np.array(shape, dtype=np.int32), "dtype": dtype,
                "quantization": (0.0, 0)}

    def get_input_details(self) -> list[dict[str, Any]]:
        """Return one dict per input: index, name, shape (batch of 1), dtype, quantization (none)."""
        return [dict(d) for d in self._inputs]

    def get_output_details(self) -> list[dict[str, Any]]:
        """Return one dict per output, as :meth:`get_input_details`."""
        return [dict(d) for d in self._outputs]

    def allocate_tensors(self) -> None:
        """Do nothing: ONNX Runtime allocates per run (kept for the interpreter surface)."""

    def set_tensor(self, index: int, value: np.ndarray) -> None:
        """Set input ``index`` for the next :meth:`invoke`.

        Raises:
            ValueError: ``index`` is not an input, or the value's shape or dtype does not fit.
        """
        if not 0 <= index < len(self._inputs):
            raise ValueError(f"tensor {index} is not an input of this model")
        d = self._inputs[index]
        value = np.asarray(value)
        if value.dtype != d["dtype"] or tuple(value.shape) != tuple(d["shape"]):
            raise ValueError(f"input '{d['name']}' takes {np.dtype(d['dtype']).name} {list(d['shape'])}, "
                             f"got {value.dtype.name} {list(value.shape)}")
        self._feed[d["name"]] = value

    def invoke(self) -> None:
        """Run the model once on the inputs set.

        Raises:
            ValueError: an input was not set. RuntimeError: ONNX Runtime failed to run the model.
        """
        if len(self._feed) != len(self._inputs):
            missing = [d["name"] for d in self._inputs if d["name"] not in self._feed]
            raise ValueError(f"input(s) {', '.join(missing)} not set before invoke()")
        try:
            self._results = self.session.run(self._output_names, self._feed)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own (non-Python) exception types
            raise RuntimeError(f"onnxruntime failed to run the model: {ort_error(exc)}") from None

    def get_tensor(self, index: int) -> np.ndarray:
        """Return input ``index`` as set, or output ``index`` of the last run.

        Raises:
            ValueError: no such tensor, or no run yet for an output.
        """
        n = len(self._inputs)
        if 0 <= index < n:
            return self._feed[self._inputs[index]["name"]]
        if n <= index < n + len(self._outputs):
            if not self._results:
                raise ValueError("no output before the first invoke()")
            return self._results[index - n]
        raise ValueError(f"tensor {index} is not an input or output of this model")


class OnnxRuntime(Runtime):
    key: ClassVar[str] = "onnxruntime"
    package: ClassVar[str] = "onnxruntime"
    formats: ClassVar[tuple[str, ...]] = ("onnx",)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            _ort()
        except ImportError:
            return f"runtime '{cls.key}' needs the onnxruntime package: {INSTALL}"
        return None

    def version(self) -> str:
        try:
            return str(_ort().__version__)
        except (ImportError, AttributeError):
            return "unknown"

    @staticmethod
    def providers() -> list[str]:
        """Return the execution providers a session asks for, preferred first (CPU always last)."""
        have = set(_ort().get_available_providers())
        return [p for p in PROVIDERS if p in have or p == "CPUExecutionProvider"]

    def interpreter(self, model: Path | bytes, *, threads: int = 1, delegate: str = "xnnpack",
                    options: dict[str, Any] | None = None) -> OrtInterpreter:
        """Return an :class:`OrtInterpreter` for ``model`` (a path or the ONNX bytes).

        ``delegate`` and ``options`` (LiteRT targets) are not used for ONNX models.

        Raises:
            ValueError: the model is not a valid ONNX model, or ONNX Runtime cannot load it.
        """
        ort = _ort()
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3  # warnings about provider fallbacks would go to stderr on every load
        precise_int8(so)
        source = bytes(model) if isinstance(model, bytes | bytearray) else str(model)
        name = "model" if isinstance(model, bytes | bytearray) else Path(model).name
        try:
            session = ort.InferenceSession(source, sess_options=so, providers=self.providers())
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own exception types for bad models
            raise ValueError(f"{name}: onnxruntime cannot load it: {ort_error(exc)}") from None
        return OrtInterpreter(session, name)
