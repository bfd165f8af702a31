"""The data-file format shared by host and device, read with the standard library alone.

A data file is an ``.npz`` (``numpy.savez``); the first axis of every array is the sample axis.

- Inputs: ``x`` for a model with one input (``x.<name>`` works too); otherwise one array per input,
  ``x.<input name>``, the name as the model declares it (``edgekit compile`` prints them).
- Labels, where the task needs them: ``y`` and/or ``y.<key>`` as the task documents
  (:mod:`device_agents.metrics`); every label array has one row per sample.
- The compiler ships ``eval.npz`` with the artifacts: the inputs, the labels, ``reference`` (one
  output) or ``reference.<output name>`` (the fp32 variant's outputs on the inputs, so a device can
  report fidelity without the fp32 model) and ``metric`` (how to score, UTF-8 JSON as bytes).

Arrays come back as :class:`Array`: the raw little-endian bytes with their numpy type string and
shape, exposing ``__array_interface__``, so ``numpy.asarray(a)`` on either side turns one into an
ndarray without a copy. Reading checks everything a native library would otherwise trip over:
the zip and ``.npy`` headers, truncation, pickled or big-endian or Fortran-ordered arrays, and any
NaN or infinity (refused with the key and the first bad index).

Raises :class:`~edgekit_protocol.errors.DataFileError` (exit code 2) with one line naming the
file, option and key, and what to do.
"""

from __future__ import annotations

import ast
import math
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edgekit_protocol.errors import DataFileError

# numpy type strings this format accepts: little-endian (or byte-sized) numbers and bools.
_KINDS = {"b1": "bool", "i1": "int", "u1": "int", "i2": "int", "u2": "int", "i4": "int", "u4": "int",
          "i8": "int", "u8": "int", "f2": "float", "f4": "float", "f8": "float"}
# For each float width: (byte offset, mask) pairs that hold its exponent bits (little-endian). A
# value is NaN or infinite exactly when every exponent bit is set.
_EXPONENT = {"f2": ((1, 0x7C),), "f4": ((3, 0x7F), (2, 0x80)), "f8": ((7, 0x7F), (6, 0xF0))}
_MAGIC = b"\x93NUMPY"
_SAVE_HINT = "save it with numpy.savez(path, x=..., y=...)"


@dataclass(frozen=True)
class Array:
    """One array of a data file: C-ordered little-endian bytes, numpy type string, shape."""

    key: str
    dtype: str  # numpy's type string, e.g. '<f4', '|u1'
    shape: tuple[int, ...]
    data: bytes

    @property
    def kind(self) -> str:
        """Return ``float``, ``int`` or ``bool``."""
        return _KINDS[self.dtype[1:]]

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    @property
    def __array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self.dtype, "data": self.data, "version": 3}


# numpy's type letters, in words, for a type this reader refuses (the user saved an array of it, perhaps unknowingly)
_KIND_WORDS = {"f": "float", "i": "int", "u": "uint", "c": "complex", "b": "bool", "U": "text (unicode string)",
               "S": "bytes (string)", "O": "Python object", "M": "datetime64", "m": "timedelta64", "V": "structured"}


def _type_text(descr: Any) -> str:
    """Return a numpy type string (``'<c8'``, ``'>f4'``, ``'<U5'``, ``'|O'``) in words (``complex64``, ``big-endian
    float32``, ``text (unicode string)``), or ``unknown`` for what is no such string."""
    if not isinstance(descr, str) or len(descr) < 2 or descr[1] not in _KIND_WORDS:
        return "unknown"
    kind, size = descr[1], descr[2:]
    words = _KIND_WORDS[kind]
    if kind in "fiuc" and size.isdigit():
        words += str(8 * int(size))
    return ("big-endian " if descr[0] == ">" else "") + words


def _npy(raw: bytes, where: str) -> tuple[str, tuple[int, ...], bytes]:
    """Return (type string, shape, data bytes) of one ``.npy`` member.

    Raises:
        DataFileError: not an ``.npy``, a header it cannot read, an unsupported type, or a
            length that does not match the header (truncated).
    """
    major = raw[6] if len(raw) > 6 else 0
    start = 10 if major == 1 else 12
    if raw[:6] != _MAGIC or major not in (1, 2, 3) or len(raw) < start:
        raise DataFileError(f"{where} is not a numpy array (format 1-3); {_SAVE_HINT}")
    head_len = struct.unpack("<H" if major == 1 else "<I", raw[8:start])[0]
    if start + head_len > len(raw):
        raise DataFileError(f"{where} is truncated inside its array header; write the file again")
    try:
        header = ast.literal_eval(raw[start:start + head_len].decode("latin-1"))
        descr, fortran, shape = header["descr"], header["fortran_order"], tuple(header["shape"])
    except (ValueError, SyntaxError, KeyError, TypeError, MemoryError, RecursionError):
        raise DataFileError(f"{where} has an unreadable array header; {_SAVE_HINT}") from None
    if not isinstance(descr, str) or descr[:1] not in "<|" or descr[1:] not in _KINDS:
        raise DataFileError(f"{where} holds {_type_text(descr)} values ({descr!r}); give little-endian numbers "
                            "(e.g. float32, uint8, int64): save x.astype(numpy.float32), or your labels as integers")
    if fortran:
        raise DataFileError(f"{where} is stored in Fortran order; save numpy.ascontiguousarray(...) instead")
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise DataFileError(f"{where} has an invalid shape {shape}")
    data = raw[start + head_len:]
    expected = math.prod(shape) * int(descr[2:])
    if len(data) != expected:
        raise DataFileError(f"{where} is truncated or padded: {len(data)} bytes of data for shape {shape} "
                            f"({expected} expected); write the file again")
    return descr, shape, data


def first_nonfinite(array: Array) -> tuple[int, ...] | None:
    """Return the index of the first NaN or infinity in ``array`` (C order), or None when all are finite.

    Works on the bytes at C speed: a float is non-finite exactly when all its exponent bits are set,
    so the exponent bytes of every element are masked (``bytes.translate``), combined as integers,
    and the first element with every bit set is found with ``bytes.find``.
    """
    if array.kind != "float" or not array.data:
        return None
    size = int(array.dtype[2:])
    hit: int | None = None
    for offset, mask in _EXPONENT[array.dtype[1:]]:
        table = bytes(1 if b & mask == mask else 0 for b in range(256))
        lane = int.from_bytes(array.data[offset::size].translate(table), "big")
        hit = lane if hit is None else hit & lane
        if not hit:
            return None
    n = len(array.data) // size
    flat = hit.to_bytes(n, "big").find(1)
    index = []
    for dim in reversed(array.shape):
        flat, i = divmod(flat, dim) if dim else (flat, 0)
        index.append(i)
    return tuple(reversed(index))


def memory_available() -> int | None:
    """Return the bytes of memory the system can give without swapping (``MemAvailable`` in
    ``/proc/meminfo``), or None where that is not known (never raises)."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def read_arrays(path: Path, option: str) -> dict[str, Array]:
    """Read every array of an ``.npz`` data file, checked.

    ``option`` names where the file came from (``--calib``), for messages.

    Returns:
        ``{key: Array}`` in the file's order.

    Raises:
        DataFileError: missing, unreadable or not a regular file, arrays that would take more than
            half the memory available once decompressed (a zip bomb, or too many samples for this
            machine), a member that is not a plain numeric array (pickled objects, big-endian,
            Fortran order), a truncated member, or a NaN or infinity anywhere (with the key and
            first bad index).
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():  # a folder, pipe or device: reading it would fail oddly or block
            raise DataFileError(f"{path}: {option} is not a regular file (a folder, pipe or device); give the .npz file")
        raise DataFileError(f"{path}: {option} file not found")
    arrays: dict[str, Array] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            # the sizes the zip declares bound what reading decompresses (zipfile stops there)
            size, free = sum(info.file_size for info in zf.infolist()), memory_available()
            if free is not None and size > free // 2:
                raise DataFileError(f"{path}: {option} holds {size / 1e6:,.0f} MB of arrays once decompressed, more "
                                    f"than half of the {free / 1e6:,.0f} MB of memory available here; give fewer samples")
            for info in zf.infolist():
                key = info.filename.removesuffix(".npy")
                where = f"{path}: {option} key '{key}'"
                descr, shape, data = _npy(zf.read(info), where)
                arrays[key] = Array(key, descr, shape, data)
    except (OSError, zipfile.BadZipFile, EOFError, zipfile.LargeZipFile, NotImplementedError) as exc:
        raise DataFileError(f"{path}: {option} is not a readable .npz file ({exc}); {_SAVE_HINT}") from None
    except MemoryError:
        raise DataFileError(f"{path}: {option} does not fit in memory once decompressed; give fewer samples") from None
    for array in arrays.values():
        bad = first_nonfinite(array)
        if bad is not None:
            raise DataFileError(f"{path}: {option} key '{array.key}' holds NaN or infinity at index {list(bad)} "
                                "(first one); clean or drop that sample")
    return arrays


@dataclass(frozen=True)
class Data:
    """The checked arrays of a data file: inputs by input name, labels by key (``y.`` stripped)."""

    x: dict[str, Array]
    labels: dict[str, Array]
    samples: int


def input_key(name: str, count: int) -> str:
    """Return the data-file key of input ``name`` of a model with ``count`` inputs (``x`` for the only one)."""
    return "x" if count == 1 else f"x.{name}"


def output_key(name: str, count: int) -> str:
    """Return the ``eval.npz`` key of the fp32 reference of output ``name`` (``reference`` for the only one)."""
    return "reference" if count == 1 else f"reference.{name}"


def read_data(path: Path, option: str, inputs: dict[str, tuple[int, ...]], *,
              labels: Literal["required", "optional", "ignored"],
              arrays: dict[str, Array] | None = None) -> Data:
    """Read and check a data file for a model whose inputs are ``{name: shape of one sample}``.

    ``labels``: ``required`` (some ``y`` or ``y.<key>`` must be there), ``optional`` (returned if
    there), ``ignored`` (never returned: calibration data); which label keys a task needs is the
    task's check. ``arrays``: the file's arrays when the caller has read them already
    (:func:`read_arrays`), so the file is read once.

    Returns:
        A :class:`Data`; ``numpy.asarray`` turns each array into an ndarray.

    Raises:
        DataFileError: everything :func:`read_arrays` refuses, an input missing (the message lists
            the keys expected and found), samples of the wrong shape or type, inputs or labels with
            different sample counts, or required labels missing.
    """
    arrays = read_arrays(path, option) if arrays is None else arrays
    found = ", ".join(arrays) or "none"
    x: dict[str, Array] = {}
    for name, shape in inputs.items():
        key = input_key(name, len(inputs))
        a = arrays.get(key, arrays.get(f"x.{name}") if len(inputs) == 1 else None)
        if a is None:
            keys = [input_key(n, len(inputs)) for n in inputs]
            how = "x=..." if keys == ["x"] else "**{" + ", ".join(f"'{k}': ..." for k in keys) + "}"
            raise DataFileError(f"{path}: {option} has no array '{key}' for input '{name}' (expected: "
                                f"{', '.join(keys)}; found: {found}); save one array per model input under its key: "
                                f"numpy.savez(path, {how}) (an array given without a name is saved as arr_0)")
        if not a.shape or a.shape[1:] != tuple(shape):
            raise DataFileError(f"{path}: {option} key '{a.key}' samples have shape {a.shape[1:]} but input "
                                f"'{name}' takes {tuple(shape)} (the first axis is the sample axis)")
        if a.kind == "bool":
            raise DataFileError(f"{path}: {option} key '{a.key}' has dtype bool; expected numbers")
        x[name] = a
    samples = len(next(iter(x.values()))) if x else 0
    ys = {} if labels == "ignored" else {k: a for k, a in arrays.items() if k == "y" or k.startswith("y.")}
    for key, a in [*((a.key, a) for a in x.values()), *ys.items()]:
        if len(a) != samples:
            raise DataFileError(f"{path}: {option} key '{key}' has {len(a)} samples, the inputs {samples}; "
                                "every array needs one row per sample")
    if labels == "required" and not ys:
        raise DataFileError(f"{path}: {option} has no labels (y or y.<key>; found: {found}); "
                            "see the label format of your --task")
    return Data(x, {("y" if k == "y" else k[2:]): a for k, a in ys.items()}, samples)


def read_reference(path: Path, samples: int, outputs: list[str],
                   arrays: dict[str, Array] | None = None) -> dict[str, Array] | None:
    """Return the fp32 model's outputs stored next to the inputs (see the module docstring), or None.

    Raises:
        DataFileError: the file cannot be read (see :func:`read_arrays`), only some outputs have a
            reference, or one has not one row per sample.
    """
    arrays = read_arrays(path, "eval set") if arrays is None else arrays
    refs = {n: arrays.get(output_key(n, len(outputs))) for n in outputs}
    if all(r is None for r in refs.values()):
        return None
    for name, ref in refs.items():
        if ref is None:
            raise DataFileError(f"{path}: no reference for output '{name}' ({output_key(name, len(outputs))}); "
                                "compile again to rebuild eval.npz")
        if len(ref) != samples:
            raise DataFileError(f"{path}: {ref.key} has {len(ref)} rows for {samples} samples")
    return refs  # type: ignore[return-value]
