"""Run a ``.tflite`` model on float inputs and get float outputs, whatever its I/O quantization.

Used by the host compiler (accuracy and fidelity of each variant) and by the agent (on-device
accuracy), so both name, quantize and dequantize a model's inputs and outputs the same way.

Names: a model's inputs and outputs are named by its signature when it has exactly one (what the
TFLite converter writes, and what the quantizer keeps), else by their tensor names. Every variant
of a model therefore answers to the same names, and outputs come back in the same order, whatever
order the converter gave the tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

SNR_CAP_DB = 200.0  # identical outputs (or both silent) report this instead of +infinity


@dataclass(frozen=True)
class Port:
    """One input or output tensor of a model: its name, tensor index, shape (batch included), type."""

    name: str
    index: int
    shape: tuple[int, ...]
    dtype: np.dtype
    scale: float  # 0.0 when the tensor is not quantized
    zero_point: int

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Return the shape of one sample (without the batch axis)."""
        return self.shape[1:]

    def record(self) -> dict[str, Any]:
        """Return the manifest entry: name, shape, dtype and quantization."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype.name,
                "scale": self.scale or None, "zero_point": self.zero_point if self.scale else None}


def _port(name: str, detail: dict[str, Any]) -> Port:
    scale, zero = detail.get("quantization", (0.0, 0))
    return Port(name, int(detail["index"]), tuple(int(d) for d in detail["shape"]), np.dtype(detail["dtype"]),
                float(scale or 0.0), int(zero or 0))


def ports(interpreter: Any) -> tuple[list[Port], list[Port]]:
    """Return the (inputs, outputs) of an interpreter, named as the module docstring says.

    Inputs come in the signature's order (else the interpreter's); outputs likewise.
    """
    ins = {int(d["index"]): d for d in interpreter.get_input_details()}
    outs = {int(d["index"]): d for d in interpreter.get_output_details()}
    full = getattr(interpreter, "_get_full_signature_list", lambda: {})() or {}
    if len(full) == 1:
        sig = next(iter(full.values()))
        named_in, named_out = sig.get("inputs", {}), sig.get("outputs", {})
        if set(named_in.values()) == set(ins) and set(named_out.values()) == set(outs):
            return ([_port(n, ins[i]) for n, i in named_in.items()],
                    [_port(n, outs[i]) for n, i in named_out.items()])
    return [_port(d["name"], d) for d in ins.values()], [_port(d["name"], d) for d in outs.values()]


def quantize(port: Port, x: np.ndarray) -> np.ndarray:
    """Return float values ``x`` as ``port``'s tensor type (quantized with its scale when it has one)."""
    if np.issubdtype(port.dtype, np.integer):
        x = np.asarray(x, dtype=np.float64)
        if port.scale:
            x = np.round(x / port.scale + port.zero_point)
        info = np.iinfo(port.dtype)
        x = np.clip(x, info.min, info.max)
    return np.asarray(x).astype(port.dtype, copy=False)


def dequantize(port: Port, y: np.ndarray) -> np.ndarray:
    """Return a tensor of ``port`` as float32 (dequantized when it is a quantized integer type)."""
    if np.issubdtype(port.dtype, np.integer) and port.scale:
        return (y.astype(np.float32) - port.zero_point) * np.float32(port.scale)
    return y.astype(np.float32)


def _exact(port: Port, x: np.ndarray) -> np.ndarray:
    """Return ``x`` as ``port``'s plain integer or boolean type, value for value.

    Raises:
        ValueError: NaN/infinity, a fraction, or a value outside the type's range (0/1 for a
            boolean), named with the input and its first flat index.
    """
    name = np.dtype(port.dtype).name
    if port.dtype == np.bool_:
        low, high = 0, 1
    else:
        info = np.iinfo(port.dtype)
        low, high = int(info.min), int(info.max)
    flat = x.reshape(-1)
    if x.dtype.kind == "f":
        bad = ~np.isfinite(flat)
        if bad.any():
            raise ValueError(f"input {port.name!r} holds NaN or infinity at flat index {int(np.argmax(bad))}")
        bad = flat != np.floor(flat)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"input {port.name!r} takes {name}: {flat[i].item()!r} at flat index {i} is not a whole number")
    if x.dtype.kind in "iuf" and flat.size:
        # compared as Python ints, so uint64 against int64 bounds (or a huge float) cannot wrap
        bad = (flat < low) | (flat >= high + 1) if x.dtype.kind != "u" else flat > high  # high + 1: exact as a float
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"input {port.name!r} takes {name}: {flat[i].item()!r} at flat index {i} is outside "
                             f"[{low}, {high}]")
    return x.astype(port.dtype)


Batch = dict[str, np.ndarray]  # name -> array whose first axis is the sample axis


class ModelRunner:
    """Feeds one sample at a time to an allocated interpreter, by input name, and collects outputs by name."""

    def __init__(self, interpreter: Any):
        """Take an allocated interpreter (LiteRT's, or the ONNX Runtime adapter).

        Raises:
            ValueError: an output is a scalar (0-d): outputs are returned one sample at a time along
                a batch axis, which a scalar has not.
        """
        self.interpreter = interpreter
        self.inputs, self.outputs = ports(interpreter)
        for port in self.outputs:
            if not port.shape:
                raise ValueError(f"output {port.name!r} is a scalar (0-d); the agent returns each output with a "
                                 "batch axis: export the model with it shaped [1]")

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Return {input name: shape of one sample}."""
        return {p.name: p.sample_shape for p in self.inputs}

    def tensors(self, batch: Batch, i: int) -> list[np.ndarray]:
        """Return sample ``i`` of ``batch`` as the model's typed input tensors (batch axis added), in input order.

        Raises:
            KeyError: ``batch`` lacks one of the model's inputs (a single-input model takes any one array).
            ValueError: a sample whose size does not fit the input's shape (the input and both shapes named).
        """
        out = []
        for port in self.inputs:
            x = batch[port.name] if port.name in batch or len(self.inputs) > 1 else next(iter(batch.values()))
            sample = np.asarray(x[i])
            if sample.size != int(np.prod(port.shape)):
                raise ValueError(f"input {port.name!r}: a sample of shape {list(sample.shape)}, the model takes "
                                 f"{list(port.sample_shape)}")
            out.append(quantize(port, sample.reshape(port.shape)))
        return out

    def sample_tensors(self, named: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Return one sample's typed input tensors from float arrays by input name (what an application
        sends: the sample's shape, with or without the batch axis of 1; any numeric dtype, read as
        float32 and quantized here, so the same call works for every variant of a model).

        A single-input model takes its one array under any name.

        An input the model takes as a plain (unquantized) integer or boolean tensor (token ids,
        uint8 pixels, a mask) is taken exactly: integer arrays keep their values (no float32 trip,
        which would round ids above 2**24), and every value must be a whole number in the tensor
        type's range (0 or 1 for a boolean); nothing is rounded or clipped.

        Raises:
            ValueError: a missing or unknown input, a shape that does not fit, NaN/infinity in an
                input, or a value a plain integer or boolean input cannot hold (each named, with
                the first bad index).
        """
        if len(self.inputs) == 1 and len(named) == 1:
            named = {self.inputs[0].name: next(iter(named.values()))}
        unknown = sorted(set(named) - {p.name for p in self.inputs})
        if unknown:
            raise ValueError(f"unknown input {unknown[0]!r} (the model's inputs: {', '.join(p.name for p in self.inputs)})")
        out = []
        for port in self.inputs:
            if port.name not in named:
                raise ValueError(f"input {port.name!r} is missing (the model's inputs: {', '.join(p.name for p in self.inputs)})")
            x = np.asarray(named[port.name])
            if x.dtype.kind not in "fiub":
                raise ValueError(f"input {port.name!r}: dtype {x.dtype} is not numeric")
            if tuple(x.shape) not in (port.shape, port.sample_shape):
                raise ValueError(f"input {port.name!r}: shape {list(x.shape)}, the model takes {list(port.sample_shape)} "
                                 f"(or {list(port.shape)})")
            if (port.dtype == np.bool_ or np.issubdtype(port.dtype, np.integer)) and not port.scale:
                out.append(_exact(port, x).reshape(port.shape))
                continue
            x = x.astype(np.float32, copy=False)
            if not np.isfinite(x).all():
                raise ValueError(f"input {port.name!r} holds NaN or infinity at flat index {int(np.argmin(np.isfinite(x)))}")
            out.append(quantize(port, x.reshape(port.shape)))
        return out

    def invoke_raw(self, tensors: list[np.ndarray]) -> None:
        """Set the already-typed input tensors and run once (the timed path of a benchmark)."""
        for port, t in zip(self.inputs, tensors):
            self.interpreter.set_tensor(port.index, t)
        self.interpreter.invoke()

    def results(self) -> dict[str, np.ndarray]:
        """Return the last run's outputs as float32 by output name, without the batch axis."""
        return {p.name: dequantize(p, self.interpreter.get_tensor(p.index))[0] for p in self.outputs}

    def predict(self, batch: Batch | np.ndarray, progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
        """Return {output name: outputs stacked over the samples of ``batch``}.

        ``batch`` maps input names to arrays (first axis = samples); a bare array stands for the
        only input of a single-input model. ``progress(i)`` is called before sample ``i`` (1-based) runs.
        """
        if not isinstance(batch, dict):
            batch = {self.inputs[0].name: batch}
        samples = len(next(iter(batch.values()))) if batch else 0
        rows: dict[str, list[np.ndarray]] = {p.name: [] for p in self.outputs}
        for i in range(samples):
            if progress is not None:
                progress(i + 1)
            self.invoke_raw(self.tensors(batch, i))
            for name, y in self.results().items():
                rows[name].append(y)
        return {name: np.stack(r) if r else np.zeros((0, *p.sample_shape), np.float32)
                for (name, r), p in zip(rows.items(), self.outputs)}


def is_vector(reference: np.ndarray) -> bool:
    """Return whether each sample of ``reference`` is one vector of two or more values (other axes of size 1)."""
    size = int(np.prod(reference.shape[1:]))
    return len(reference) > 0 and size >= 2 and size == max(reference.shape[1:], default=0)


def is_distribution(reference: np.ndarray) -> bool:
    """Return whether each sample of ``reference`` is a vector of class probabilities (non-negative, sum 1)."""
    rows = reference.reshape(len(reference), -1)
    return is_vector(reference) and bool(np.all(rows >= 0) and np.allclose(rows.sum(axis=1), 1.0, atol=1e-3))


def output_fidelity(output: np.ndarray, reference: np.ndarray, *, classes: bool = False) -> dict[str, float]:
    """Return how closely one output follows the fp32 model's on the same inputs, no labels needed.

    ``snr_db``: 10·log10(Σref² / Σ(out−ref)²), capped at ±:data:`SNR_CAP_DB`; ``cosine``: mean
    per-sample cosine similarity (1 when both are zero); ``max_abs_error`` and ``mean_abs_error``
    over all values; ``top1_agreement`` (share of samples with the same argmax) when the output is a
    class vector: a vector per sample and ``classes`` True (a classifier's scores, logits included),
    or the reference rows are probability distributions.

    Raises:
        ValueError: the output or the reference holds NaN or infinity (the first such sample named):
            no figure measured on it would mean anything (NaN against NaN would otherwise read as
            identical).
    """
    a = output.reshape(len(output), -1).astype(np.float64)
    b = reference.reshape(len(reference), -1).astype(np.float64)
    for label, values in (("reference", b), ("output", a)):
        finite = np.isfinite(values).all(axis=1)
        if not finite.all():
            raise ValueError(f"the {label} holds NaN or infinity (first at sample {int(np.argmin(finite))}), "
                             "so no fidelity is measured")
    diff = a - b
    signal, noise = float(np.sum(b * b)), float(np.sum(diff * diff))
    if noise == 0.0:
        snr = SNR_CAP_DB
    elif signal == 0.0:
        snr = -SNR_CAP_DB
    else:
        snr = max(-SNR_CAP_DB, min(SNR_CAP_DB, 10 * math.log10(signal / noise)))
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both = (na > 0) & (nb > 0)
    cos = np.where(both, np.sum(a * b, axis=1) / np.where(both, na * nb, 1.0), (na == 0) & (nb == 0))
    out = {
        "snr_db": round(snr, 3),
        "cosine": float(np.mean(cos)) if len(cos) else 1.0,
        "max_abs_error": float(np.abs(diff).max()) if diff.size else 0.0,
        "mean_abs_error": float(np.abs(diff).mean()) if diff.size else 0.0,
    }
    if (classes and is_vector(reference)) or is_distribution(reference):
        out["top1_agreement"] = float(np.mean(np.argmax(a, 1) == np.argmax(b, 1))) if len(a) else 1.0
    return out


def fidelity(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], *,
             classes: Collection[str] = ()) -> dict[str, Any]:
    """Return per-output fidelity against the fp32 outputs, plus the worst of each figure over outputs.

    ``classes`` names the outputs known to hold class scores (see :func:`output_fidelity`).

    Returns:
        ``{"outputs": {name: output_fidelity(...)}, "snr_db": worst, "cosine": worst,
        "max_abs_error": worst, "mean_abs_error": worst, "top1_agreement": worst or absent}``.

    Raises:
        ValueError: the two do not hold the same outputs with the same shapes, or one holds NaN or
            infinity (the output named).
    """
    if set(outputs) != set(reference):
        raise ValueError(f"outputs {sorted(outputs)} do not match the reference's {sorted(reference)}")
    per = {}
    for name, ref in reference.items():
        out = outputs[name]
        if out.shape != ref.shape:
            raise ValueError(f"output '{name}' has shape {out.shape}, the reference {ref.shape}")
        try:
            per[name] = output_fidelity(out, ref, classes=name in classes)
        except ValueError as exc:
            raise ValueError(f"output '{name}': {exc}") from None
    worst: dict[str, Any] = {"outputs": per}
    for key, pick in (("snr_db", min), ("cosine", min), ("max_abs_error", max), ("mean_abs_error", max),
                      ("top1_agreement", min)):
        values = [f[key] for f in per.values() if key in f]
        if values:
            worst[key] = pick(values)
    return worst
