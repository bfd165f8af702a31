"""Load the model a user compiles: Keras (``.keras``, ``.h5``), a SavedModel folder, a ``.tflite`` or an ``.onnx``.

Any number of named inputs and outputs: Keras by its input and output names, a SavedModel by its
``serving_default`` signature's argument and output names, a ``.tflite`` as
:mod:`device_agents.inference` names them (signature, else tensor names), an ONNX model by its
graph's input and output names (converted once by :mod:`edge_kit.compiler.onnx_source`). Every variant is
exported with a batch of one (the shape devices run) and keeps those names. Dimensions other than
the batch must be static: a dynamic one is pinned with ``--input-shape NAME=1x320x320x3``, or the
load fails naming the input.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edge_kit.compiler.tf_quiet import captured_output, tensorflow
from edge_kit.compiler.watch import LOAD_CAUSE, watched
from edge_kit.errors import CompileError, InputError, first_line
from edge_kit.fsutil import sha256_file

SourceKind = Literal["keras", "savedmodel", "tflite", "onnx"]
KERAS_SAFE_MODE = (3, 14)  # the first Keras without a known way around safe_mode (TFSMLayer: CVE-2026-1462)
MAX_NAME_CHARS = 256  # per input or output name: devices' messages name each (64 KiB per message)
MAX_SAMPLE_VALUES = 2**27  # per input and sample: 512 MiB of float32 (a 4K RGB frame is 25M values)
Shapes = dict[str, tuple[int, ...]]  # input name -> shape of one sample (no batch axis)


@dataclass
class Graph:
    """A convertible TensorFlow function with batch-1 inputs in ``inputs`` order, plus what owns its variables."""

    function: Any
    trackable: Any
    inputs: list[str]


@dataclass
class Source:
    path: Path
    kind: SourceKind
    sha256: str  # the user's file as sha256sum gives it (a SavedModel: fsutil.sha256_file; ONNX: load_onnx's sha256)
    name: str
    inputs: Shapes
    outputs: list[str]
    keras_model: Any = None
    saved_model: Any = None
    tflite: bytes | None = None
    tflite_precision: str | None = None
    onnx: bytes | None = None  # an ONNX source's file; ``tflite`` is its float32 conversion once converted
    onnx_pinned: bytes | None = None  # that file with its input shapes pinned, made in a child at load
    onnx_pin_error: str | None = None  # why the child could not pin them (onnx_pinned is None)
    conversion: dict[str, Any] | None = None  # an ONNX source's conversion: converter, reference, fidelity
    size: int = 0  # bytes of the file, or of a SavedModel folder's files: what a conversion's deadline scales with
    # input name -> the numpy name of its declared type, for an input the model takes as another type than float32
    # (token ids: int64); a Keras, SavedModel or ONNX source takes float32 there and casts it inside every variant
    input_types: dict[str, str] = field(default_factory=dict)
    # an ONNX model with external data: {name in the model's folder: sha256} of the model file and each data file
    files: dict[str, str] = field(default_factory=dict)

    def pinned_onnx(self) -> bytes:
        """Return an ONNX source's model with its input shapes pinned, as the child made it at load (onnx's shape
        inference is native code reading the user's file: it does not run on it again in this process).

        Raises:
            CompileError: the child could not pin them (its reason), or this is not an ONNX source.
        """
        if self.onnx_pinned is None:
            raise CompileError(self.onnx_pin_error or f"{self.path}: not an ONNX source")
        return self.onnx_pinned

    def id_bounds(self) -> dict[str, tuple[int, str]]:
        """Return, for each integer input (:attr:`input_types`) whose ids index a table the model stores, ``(rows,
        what they are)``: the ids it takes are ``0..rows-1``, read from an ONNX ``Gather``
        (:func:`~edge_kit.compiler.onnx_source.id_bounds`), a Keras ``Embedding`` (:func:`keras_id_bounds`) or a
        ``.tflite`` GATHER or EMBEDDING_LOOKUP (:func:`~edge_kit.compiler.tflite_edit.table_rows`). Inputs whose
        range the model does not say (no such table, or a SavedModel, which is not read for it) are left out."""
        from edge_kit.compiler.data import id_inputs

        ids = id_inputs(self.input_types)
        if not ids:
            return {}
        if self.kind == "onnx" and self.onnx:
            from edge_kit.compiler.onnx_source import id_bounds

            return id_bounds(self.onnx, self.input_types)
        if self.kind == "keras" and self.keras_model is not None:
            return keras_id_bounds(self.keras_model, ids)
        if self.kind == "tflite" and self.tflite:
            from edge_kit.compiler.tflite_edit import table_rows

            return table_rows(self.tflite, ids)
        return {}

    def record(self) -> dict[str, Any]:
        """Return the manifest entry for the source model (with ``conversion`` for an ONNX source)."""
        entry = {"name": self.name, "path": str(self.path), "format": self.kind, "sha256": self.sha256,
                 "inputs": {k: list(v) for k, v in self.inputs.items()}, "outputs": list(self.outputs)}
        if self.files:
            entry["files"] = dict(self.files)
        if self.conversion is not None:
            entry["conversion"] = self.conversion
        return entry


def parse_input_shapes(specs: list[str]) -> dict[str, tuple[int, ...]]:
    """Return ``{input name: full shape}`` from ``NAME=1x320x320x3`` options (the batch must be 1).

    Raises:
        InputError: a spec is malformed (the message shows the expected form).
    """
    out: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or shape[0] != 1 or min(shape) < 1:
            raise InputError(f"--input-shape {spec}: give NAME=1xHxWxC (positive sizes, batch 1), e.g. images=1x320x320x3")
        out[name] = shape[1:]
    return out


def pin_hint(dims: tuple[int | None, ...] | list[int | None]) -> str:
    """Return ``--input-shape``'s value for a sample's ``dims`` (batch left out, None for a dynamic
    one): ``1x3xHxW``, the dynamic ones named H, W, then D3, D4... in order."""
    names = iter(["H", "W", *(f"D{i}" for i in range(3, 10))])
    return "x".join(["1", *(str(d) if d is not None else next(names) for d in dims)])


def _keras_outputs(model: Any) -> list[str]:
    names = list(getattr(model, "output_names", None) or [])
    return names if len(names) == len(model.outputs) else [f"output_{i}" for i in range(len(model.outputs))]


KERAS_ID_MOVES = ("Reshape", "Flatten", "Permute", "Squeeze", "ExpandDims", "Transpose", "Identity")  # layers and
# ops that move ids about, never change one (as an ONNX model's SHAPE_ONLY_OPS)


def keras_id_bounds(model: Any, names: list[str]) -> dict[str, tuple[int, str]]:
    """Return, for each input of the Keras ``model`` named in ``names`` (integer ids) that an ``Embedding`` layer
    reads, ``(input_dim of the smallest such layer, what it is)``: the ids it takes are ``0..input_dim-1``. The ids
    are followed up to :data:`~edge_kit.compiler.onnx_source.MAX_SHAPE_HOPS` layers from the input, through
    :data:`KERAS_ID_MOVES`, ``keras.ops.cast`` to an integer type and into nested models. Inputs reaching no
    ``Embedding`` are left out."""
    import keras

    from edge_kit.compiler.onnx_source import ID_CASTS, MAX_SHAPE_HOPS

    readers: dict[int, list[tuple[Any, Any, int]]] = {}  # id(tensor) -> (layer, its call, position of the tensor)
    models, seen = [model], set()
    while models:
        inner = models.pop()
        inner = getattr(inner, "_functional", None) or inner  # a Sequential's layers, wired
        if id(inner) in seen:
            continue
        seen.add(id(inner))
        for layer in getattr(inner, "operations", None) or getattr(inner, "layers", []):
            for node in getattr(layer, "_inbound_nodes", []):
                for at, tensor in enumerate(node.input_tensors):
                    readers.setdefault(id(tensor), []).append((layer, node, at))
            if isinstance(layer, keras.Model):
                models.append(layer)
    out: dict[str, tuple[int, str]] = {}
    for name, tensor in zip([t.name for t in model.inputs], model.inputs):
        if name not in names:
            continue
        frontier, visited = [tensor], set()
        for _ in range(MAX_SHAPE_HOPS + 1):
            ahead = []
            for value in frontier:
                if id(value) in visited:
                    continue
                visited.add(id(value))
                for layer, node, at in readers.get(id(value), []):
                    kind = type(layer).__name__
                    if isinstance(layer, keras.layers.Embedding):
                        rows = int(layer.input_dim)
                        if rows >= 1 and (name not in out or rows < out[name][0]):
                            out[name] = (rows, f"the {rows} rows of Embedding layer '{layer.name}'")
                    elif isinstance(layer, keras.Model):
                        wired = getattr(layer, "_functional", None) or layer
                        ahead.extend(wired.inputs[at:at + 1])
                    elif kind in KERAS_ID_MOVES or kind == "Cast" and str(getattr(layer, "dtype", "")) in ID_CASTS:
                        ahead.extend(node.output_tensors)
            frontier = ahead
    return out


def keras_graph(model: Any, inputs: Shapes, outputs: list[str] | None = None) -> Graph:
    """Return a :class:`Graph` calling a Keras model on one sample (batch 1) per input, outputs by name.

    ``inputs`` name the model's inputs in its own order; ``outputs`` (default: the model's output
    names) name its outputs in order, so a rebuilt model (pruning) keeps the source's names.
    """
    tf = tensorflow()
    names = list(inputs)
    own = _keras_outputs(model)
    outputs = list(outputs) if outputs is not None else own
    holder = tf.Module()
    holder.model = model
    holder.variables_ = [getattr(v, "value", v) for v in model.variables]  # track Keras 3 variables

    def call(*args: Any) -> dict[str, Any]:
        result = model(list(args) if len(args) > 1 else args[0], training=False)
        if isinstance(result, dict):
            return {n: result[k] for n, k in zip(outputs, own)}
        result = result if isinstance(result, (list, tuple)) else [result]
        return dict(zip(outputs, result))

    specs = [tf.TensorSpec([1, *shape], tf.float32, name=name) for name, shape in inputs.items()]
    holder.serve = tf.function(call, input_signature=specs)
    return Graph(holder.serve.get_concrete_function(), holder, names)


def source_graph(source: Source) -> Graph:
    """Return the :class:`Graph` of a Keras or SavedModel source.

    Raises:
        ValueError: the source is a ``.tflite`` file, which has no TensorFlow graph.
    """
    if source.keras_model is not None:
        return keras_graph(source.keras_model, source.inputs)
    if source.saved_model is not None:
        tf = tensorflow()
        obj, sig = source.saved_model
        names = list(source.inputs)
        # float32 in, as for a Keras source; an integer or boolean input (token ids) cast to what the signature takes
        dtypes = {n: spec.dtype for n, spec in sig.structured_input_signature[1].items()}
        fn = tf.function(lambda *args: dict(sig(**{n: tf.cast(a, dtypes[n]) for n, a in zip(names, args)})),
                         input_signature=[tf.TensorSpec([1, *shape], tf.float32, name=n) for n, shape in source.inputs.items()])
        return Graph(fn.get_concrete_function(), obj, names)
    raise ValueError(f"{source.path}: a .tflite source has no TensorFlow graph")


def _static(path: Path, name: str, shape: Any, pinned: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    if name in pinned:
        given = pinned[name]
        declared = tuple(shape)[1:]
        if len(given) != len(declared) or any(d is not None and int(d) >= 0 and int(d) != g for d, g in zip(declared, given)):
            raise InputError(f"{path}: --input-shape {name}=1x{'x'.join(map(str, given))} does not fit the declared "
                             f"shape {tuple(shape)} of input '{name}'")
        return given
    dims = tuple(shape)[1:]
    if any(d is None or int(d) < 0 for d in dims):
        raise InputError(f"{path}: input '{name}' has shape {tuple(shape)} with a dynamic dimension besides the batch; "
                         f"pin it with --input-shape {name}={pin_hint([None if d is None or int(d) < 0 else int(d) for d in dims])}")
    return tuple(int(d) for d in dims)


def check_input_dtype(path: Path, name: str, dtype: str) -> None:
    """Refuse a Keras, SavedModel or ONNX input of a type that is not a number (``string``, ``resource``,
    ``variant``; ``dtype`` is the type's numpy name): variants take float32 inputs, cast to an integer or boolean
    input's own type (token ids), which a string cannot be (every variant failed in the converter, and a manifest of
    failures was written). Returns nothing.

    Raises:
        InputError: naming the input, its type and what to do.
    """
    if dtype == "bool" or dtype.startswith(("float", "bfloat", "int", "uint")):
        return
    from edgekit_protocol.labels import clip, printable

    raise InputError(f"{path}: input '{printable(clip(name, 60))}' is {printable(clip(dtype, 40))}; edge-kit feeds "
                     "float32 data files (cast to an integer or boolean input's type), so export the model with "
                     "numeric inputs (parse or tokenize strings before the model)")


def _unknown_pins(path: Path, pinned: dict[str, tuple[int, ...]], inputs: list[str]) -> None:
    extra = sorted(set(pinned) - set(inputs))
    if extra:
        raise InputError(f"{path}: --input-shape names '{extra[0]}', which is not an input (inputs: {', '.join(inputs)})")


def load_source(path: Path, input_shapes: dict[str, tuple[int, ...]] | None = None, name: str | None = None, *,
                load_seconds: float | None = None) -> Source:
    """Load a model file or folder; ``input_shapes`` pins dynamic dimensions (see :func:`parse_input_shapes`),
    ``name`` names the model (``compile --name``; default: the file's name without its suffix, or the folder's).
    ``load_seconds`` is how long TensorFlow's loading of a Keras or SavedModel source may take in this process
    (:func:`edge_kit.compiler.watch.watched`; default: :func:`~edge_kit.compiler.analysis.inference_deadline` of no
    samples, the floor the model-run children get for loading).

    Returns:
        A :class:`Source` with its hash, kind, named inputs (with their shapes) and outputs.

    Raises:
        InputError: ``name`` (or, without one, the file's or folder's name) is not a model name
            (:func:`edgekit_protocol.messages.check_model_name`; the error suggests one), a
            missing, unreadable or corrupt model, a path that is neither a regular file nor a
            folder (a pipe), an unsupported format (a TensorRT engine said as such), an input left
            with a dynamic dimension, or a pinned shape naming no input, not fitting it, or (for a
            ``.tflite``, whose file is rewritten to the pinned shapes) one the model cannot run at, or an
            input of more than :data:`MAX_SAMPLE_VALUES` values per sample (a hostile or mistaken shape
            would take the host's memory in the first random sample or conversion), or an input or
            output name longer than :data:`MAX_NAME_CHARS` or holding a control character, or a Keras file whose
            config holds a Python lambda (a ``Lambda`` layer's code) or a layer larger than edge-kit takes
            (:func:`_check_keras_config`), or a SavedModel whose ``saved_model.pb`` declares such a tensor (:func:`_oversized_declaration`) or that has no
            ``serving_default`` signature (the ones it has are named), or a Keras or SavedModel input that is not a
            number (:func:`check_input_dtype`).
    """
    pinned = dict(input_shapes or {})
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: model not found; check the path (a .keras or .h5 file, a SavedModel folder, a "
                         ".tflite or an .onnx file)")
    if not (path.is_file() or path.is_dir()):  # a pipe or device: hashing it would block or never end
        raise InputError(f"{path}: not a regular file or folder (a pipe or device); give the model file or SavedModel folder")
    if load_seconds is None:
        from edge_kit.compiler.analysis import inference_deadline

        load_seconds = inference_deadline(0)
    source = _load_kind(path, pinned, model_name(path, name), load_seconds)
    folder = path.resolve().parent  # an ONNX model's external data files count: they hold its weights
    source.size = sum(_disk_bytes(folder / name) for name in source.files) if source.files else _disk_bytes(path)
    check_sample_sizes(path, source.inputs)
    _check_names(path, source)
    return source


def _disk_bytes(path: Path) -> int:
    """Return the size in bytes of the file ``path``, or of the files in the folder ``path`` (0 for one unreadable),
    each counted at most at what it takes on disk: a sparse file (``truncate -s 1T``) takes next to nothing, and must
    not buy a conversion a deadline of days (:func:`~edge_kit.compiler.analysis.conversion_deadline`)."""

    def size(file: Path) -> int:
        st = file.stat()
        return min(st.st_size, st.st_blocks * 512) if hasattr(st, "st_blocks") else st.st_size

    try:
        if path.is_file():
            return size(path)
        return sum(size(Path(top) / f) for top, _, files in os.walk(path) for f in files)
    except OSError:
        return 0


def _check_names(path: Path, source: Source) -> None:
    """Refuse an input or output name longer than :data:`MAX_NAME_CHARS` or holding a control character
    (names key data files and ``eval.npz``, whose zip reader cuts a member's name at NUL, and reach
    logs and terminals). Returns nothing.

    Raises:
        InputError: the first such name, shown cut and escaped.
    """
    from edgekit_protocol.labels import clip, printable

    for kind, names in (("input", list(source.inputs)), ("output", source.outputs)):
        for name in names:
            if printable(name) != name:
                raise InputError(f"{path}: {kind} '{printable(clip(name, 60))}' has a control character in its name; "
                                 "data files and devices' messages are keyed by name: export the model with a plain "
                                 "name")
            if len(name) > MAX_NAME_CHARS:
                raise InputError(f"{path}: {kind} '{clip(name, 60)}' has a name longer than {MAX_NAME_CHARS} characters; "
                                 "devices send every input's and output's name in their bench records, which "
                                 "receivers take up to 64 KiB: export the model with a shorter name")


def check_sample_sizes(path: Path, inputs: Shapes) -> None:
    """Refuse an input of more than :data:`MAX_SAMPLE_VALUES` values per sample.

    Raises:
        InputError: the first such input, named with its shape and what to do.
    """
    for input_name, shape in inputs.items():
        values = math.prod(shape)
        if values > MAX_SAMPLE_VALUES:
            raise InputError(f"{path}: input '{input_name}' takes {values:,} values per sample (shape 1x"
                             f"{'x'.join(map(str, shape))}); edge-kit takes at most {MAX_SAMPLE_VALUES:,} "
                             f"({MAX_SAMPLE_VALUES * 4 // 2**20} MiB of float32): pin a smaller shape with "
                             f"--input-shape {input_name}=1x... or export the model with a smaller input")


def model_name(path: Path, name: str | None = None) -> str:
    """Return the model's name: ``name`` (``compile --name``) when given, else the file's name without its suffix
    (a folder's name: ``.`` or ``x/..`` name the folder they mean; links are not followed).

    Raises:
        InputError: the name is not a model name (:func:`edgekit_protocol.messages.check_model_name`), saying
            what to give instead.
    """
    from edgekit_protocol.messages import check_model_name, model_name_like

    given = name is not None
    if name is None:
        name = path.stem if path.is_file() else Path(os.path.abspath(path)).name
    try:
        return check_model_name(name)
    except ValueError as exc:
        if given:
            raise InputError(f"--name: {exc}; e.g. --name {model_name_like(name)}") from None
        raise InputError(f"{path}: the model takes its file's name, and {exc} (it names OUT/<model> and the store's "
                         f"manifests/<model>/); give --name {model_name_like(name)} or rename the file") from None


def _load_kind(path: Path, pinned: dict[str, tuple[int, ...]], name: str, load_seconds: float) -> Source:
    """Return the :class:`Source` of ``path`` by its kind, named ``name``, TensorFlow's loading watched with a
    deadline of ``load_seconds`` (:func:`load_source` checks the rest). Raises InputError."""
    if path.is_dir():
        _check_links(path)  # before hashing or loading reads through them
        return _load_savedmodel(path, name, sha256_file(path), pinned, load_seconds)
    digest = sha256_file(path)
    suffix = path.suffix.lower()
    if suffix == ".tflite":
        return _load_tflite(path, name, digest, pinned)
    if suffix in (".keras", ".h5", ".hdf5"):
        return _load_keras(path, name, digest, pinned, load_seconds)
    if suffix == ".onnx":
        from edge_kit.compiler.onnx_source import load_onnx

        loaded = load_onnx(path, pinned)
        fixed = loaded.pinned
        # the user's model: the file's own hash; with external data, that of the files' sha256sum (weights included).
        # Never the model with integer inputs cast inside (loaded.data), which the user cannot check
        return Source(path, "onnx", loaded.sha256, name, loaded.inputs, loaded.outputs, onnx=loaded.data,
                      onnx_pinned=fixed if isinstance(fixed, bytes) else None,
                      onnx_pin_error=fixed if isinstance(fixed, str) else None, input_types=loaded.types,
                      files=loaded.files)
    if suffix in (".engine", ".plan", ".trt"):
        raise InputError(f"{path}: a TensorRT engine runs only on the GPU and TensorRT version that built it, so edge-kit "
                         "does not take one: give the .onnx model it was built from (the trt-* variants build the "
                         "engine on each device at install)")
    raise InputError(f"{path}: unknown model format '{suffix}'; give a .keras, .h5, .tflite, .onnx file or a SavedModel folder")


def _load_keras(path: Path, name: str, digest: str, pinned: dict[str, tuple[int, ...]], load_seconds: float) -> Source:
    import zipfile

    is_zip = zipfile.is_zipfile(path)
    if path.suffix.lower() == ".keras" and not is_zip:  # Keras itself says "File not found"
        raise InputError(f"{path}: not a loadable Keras model (not a zip archive, as every .keras file is: damaged, "
                         "cut short, or another format named .keras); save it again with model.save('name.keras')")
    if not is_zip:  # an .h5: Keras' refusal of a damaged one came with advice about custom layers
        try:
            import h5py

            with h5py.File(path, "r"):
                pass
        except ImportError:
            pass
        except OSError as exc:
            raise InputError(f"{path}: not a loadable Keras model (not an HDF5 file, or one cut short or damaged: "
                             f"{first_line(exc, 120)}); save it again with model.save('name.keras')") from None
    if is_zip:  # Keras reads its members whole: the sizes the zip declares bound that
        from edgekit_protocol.datafile import memory_available

        try:
            with zipfile.ZipFile(path) as zf:
                size = sum(info.file_size for info in zf.infolist())
        except (OSError, zipfile.BadZipFile) as exc:
            raise InputError(f"{path}: not a loadable Keras model (a damaged zip archive: {first_line(exc)}); save it "
                             "again with model.save('name.keras')") from None
        free = memory_available()
        if free is not None and size > free // 2:
            raise InputError(f"{path}: not a loadable Keras model (its zip archive holds {size / 1e6:,.0f} MB once "
                             f"decompressed, more than half of the {free / 1e6:,.0f} MB of memory available here: a "
                             "damaged or hostile file); save it again with model.save('name.keras')")
    _check_keras_config(path)  # before Keras builds the layers it declares
    tensorflow()
    import keras

    version = str(getattr(keras, "__version__", "0"))
    if tuple(int(p) if p.isdigit() else 0 for p in version.split(".")[:2]) < KERAS_SAFE_MODE:
        raise InputError(f"{path}: Keras {version} is installed, whose safe mode a crafted file can get around to run "
                         "code while it loads (CVE-2025-1550, CVE-2025-9906, CVE-2026-1462); edge-kit loads Keras files "
                         f"with Keras {'.'.join(map(str, KERAS_SAFE_MODE))} or later: pip install "
                         f"'keras>={'.'.join(map(str, KERAS_SAFE_MODE))}'")
    try:
        with captured_output(), watched("Keras's loading of the model", load_seconds, cause=LOAD_CAUSE):
            # safe_mode said, not left to the default: keras.config.enable_unsafe_deserialization() elsewhere in
            # this process (a notebook, a plugin) would otherwise let the file's code run
            model = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a bad file; all mean the same to the user
        raise InputError(f"{path}: not a loadable Keras model ({first_line(exc)}); if it has custom layers or Lambda "
                         "functions, export it where their code is (model.export(folder) for a SavedModel, or "
                         "to .onnx) and compile that") from None
    names = [t.name for t in model.inputs]
    for input_name, tensor in zip(names, model.inputs):
        check_input_dtype(path, input_name, str(getattr(tensor.dtype, "name", tensor.dtype)))
    _unknown_pins(path, pinned, names)
    inputs = {n: _static(path, n, t.shape, pinned) for n, t in zip(names, model.inputs)}
    types = {n: str(getattr(t.dtype, "name", t.dtype)) for n, t in zip(names, model.inputs)}
    return Source(path, "keras", digest, name, inputs, _keras_outputs(model), keras_model=model,
                  input_types={n: t for n, t in types.items() if t != "float32"})


def _lambda_layer(config: Any) -> str | None:
    """Return the name of the first layer of a parsed Keras ``config`` holding a Python lambda (a ``__lambda__``
    entry: the function's bytecode, which a ``Lambda`` layer stores), nested models and wrapped layers included
    (``'?'`` when that layer has no name), or None when there is none. A ``Lambda`` layer naming a function
    (``keras.activations.relu``) stores no code and is left to Keras' safe mode, which loads it."""
    todo: list[tuple[Any, str]] = [(config, "?")]
    while todo:
        item, layer = todo.pop()
        if isinstance(item, list):
            todo.extend((v, layer) for v in reversed(item))
        elif isinstance(item, dict):
            if item.get("class_name") == "__lambda__":
                return layer
            inner = item.get("config")
            if "class_name" in item and isinstance(inner, dict) and isinstance(inner.get("name"), str):
                layer = inner["name"]
            todo.extend((v, layer) for v in reversed(list(item.values())))
    return None


def _keras_config(path: Path) -> Any:
    """Return the model config a Keras file declares (``config.json`` in a ``.keras`` zip, the ``model_config``
    attribute of an ``.h5``), parsed, without TensorFlow; None when there is none to read (Keras's own load then
    says what is wrong).

    Raises:
        InputError: the config is not JSON Python can parse (nested past the interpreter's limit).
    """
    import json
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                text: Any = zf.read("config.json")
        else:
            import h5py

            with h5py.File(path, "r") as f:
                text = f.attrs.get("model_config")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, ImportError):
        return None
    if not isinstance(text, (str, bytes, bytearray)):  # none, or a number or array in its place (an .h5 attribute)
        return None
    try:
        return json.loads(text)
    except RecursionError:
        raise InputError(f"{path}: not a loadable Keras model (its config is nested too deep to read: a damaged or "
                         "hostile file); save it again with model.save('name.keras')") from None
    except ValueError:
        return None


# A Keras config's sizes are the file's to choose: JSON takes integers of 4,000 digits (no float holds one) and lists
# of any length. Each declared size and each layer's count of weights is taken at most this (far past any limit),
# so the check's arithmetic stays small and its message's figures stay printable.
DECLARED_CAP = 2**50


def _declared_int(value: Any) -> int | None:
    """Return ``value`` when it is a positive integer (not a bool), else None; at most :data:`DECLARED_CAP`."""
    return min(value, DECLARED_CAP) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _capped_prod(values: Any) -> int:
    """Return the product of the positive integers ``values``, at most :data:`DECLARED_CAP` (taken as it goes)."""
    product = 1
    for value in values:
        product = min(product * value, DECLARED_CAP)
    return product


def _declared_shape(layer: dict[str, Any]) -> list[Any] | None:
    """Return the input shape a layer entry of a Keras config declares: its ``build_config`` (what Keras builds it
    at), else the shape of the first tensor of its first call (``inbound_nodes``); None when it declares none."""
    shape = (layer.get("build_config") or {}).get("input_shape") if isinstance(layer.get("build_config"), dict) else None
    if isinstance(shape, list) and shape and isinstance(shape[0], list):  # several inputs: the first
        shape = shape[0]
    if isinstance(shape, list):
        return shape
    nodes = layer.get("inbound_nodes")
    try:
        tensor = nodes[0]["args"][0]
        tensor = tensor[0] if isinstance(tensor, list) else tensor
        shape = tensor["config"]["shape"]
    except (TypeError, KeyError, IndexError):
        return None
    return shape if isinstance(shape, list) else None


def _layer_weights(config: dict[str, Any], channels: int) -> int:
    """Return about how many weights a layer of this ``config`` allocates when built on inputs of ``channels``
    channels (the last axis): its kernel (units or filters x kernel area x channels, four gates' worth for a
    recurrent layer), an embedding table, a depthwise kernel, attention's projections, or one per channel."""
    kernel = config.get("kernel_size")
    area = _capped_prod(_declared_int(k) or 1 for k in kernel) if isinstance(kernel, list) else _declared_int(kernel) or 1
    width = _declared_int(config.get("units")) or _declared_int(config.get("filters")) or 0
    weights = area * channels * width + width
    if width and "recurrent_initializer" in config:  # LSTM (4 gates), GRU (3), SimpleRNN (1): bound by four
        weights = 4 * (channels + width + 1) * width
    if (rows := _declared_int(config.get("input_dim"))) and (cols := _declared_int(config.get("output_dim"))):
        weights = max(weights, rows * cols)  # an embedding table
    if multiplier := _declared_int(config.get("depth_multiplier")):
        weights = max(weights, area * channels * multiplier)
    if heads := _declared_int(config.get("num_heads")):
        size = max(_declared_int(config.get("key_dim")) or 1, _declared_int(config.get("value_dim")) or 1)
        weights = max(weights, 4 * heads * size * channels)  # query, key, value and output projections
    return min(max(weights, channels), DECLARED_CAP)  # a normalisation's scale and offset per channel, at least


def _check_keras_config(path: Path) -> None:
    """Refuse a Keras file whose config holds a Python lambda (a ``Lambda`` layer's code stored in the file, which safe
    mode would refuse in words cut short), or a layer TensorFlow would allocate more weights for than
    :data:`~edge_kit.compiler.analysis.MAX_TENSOR_BYTES` of float32 (``Dense(units=10**9)``), or layers adding up
    to more than half the memory available, before Keras builds anything. Returns nothing.

    The sizes are read from what the config declares: each layer's ``units``, ``filters``, ``kernel_size``,
    ``input_dim`` x ``output_dim``, ``depth_multiplier``, ``num_heads`` x ``key_dim``, and the input shape it is
    built at (its ``build_config``, else its first call's, else the width of the layer before it), nested models
    and wrapped layers included. That is an estimate from the file, not a sandbox: a layer Keras sizes some other
    way is not counted.

    Raises:
        InputError: the first layer holding a Python lambda, by name, or the largest layer too large, named with its class and size;
            each with what to do.
    """
    from edge_kit.compiler.analysis import MAX_TENSOR_BYTES
    from edgekit_protocol.datafile import memory_available

    config = _keras_config(path)
    lambda_layer = _lambda_layer(config)
    if lambda_layer is not None:  # Keras' own refusal was cut mid-sentence, before its advice, and named no layer
        from edgekit_protocol.labels import clip, printable

        raise InputError(f"{path}: layer '{printable(clip(lambda_layer, 60))}' is a Lambda layer, whose function is "
                         "Python code stored in the file, which edge-kit does not run (Keras safe mode); export the "
                         "model where that code is (model.export(folder) for a SavedModel, or to .onnx) and compile "
                         "that")
    sizes: list[tuple[int, str, str]] = []  # (weights, layer name, class)

    def walk(layers: list[Any], width: int) -> None:
        for layer in layers:
            if not isinstance(layer, dict) or not isinstance(layer.get("config"), dict):
                continue
            inner = layer["config"]
            shape = _declared_shape(layer)
            channels = _declared_int(shape[-1]) if shape else None
            if channels is None and "batch_shape" in inner and isinstance(inner["batch_shape"], list) and inner["batch_shape"]:
                channels = _declared_int(inner["batch_shape"][-1])  # an InputLayer
            channels = channels or width
            name = str(inner.get("name") or layer.get("name") or "?")
            sizes.append((_layer_weights(inner, channels), name, str(layer.get("class_name") or "?")))
            if isinstance(inner.get("layers"), list):  # a nested model
                walk(inner["layers"], channels)
            walk([inner[k] for k in ("layer", "forward_layer", "backward_layer", "cell") if isinstance(inner.get(k), dict)],
                 channels)  # TimeDistributed, Bidirectional, RNN wrappers
            width = _declared_int(inner.get("units")) or _declared_int(inner.get("filters")) or \
                _declared_int(inner.get("output_dim")) or channels

    if isinstance(config, dict) and isinstance(config.get("config"), dict):
        inner = config["config"]
        walk(inner["layers"] if isinstance(inner.get("layers"), list) else [config], 1)
    if not sizes:
        return
    weights, name, kind = max(sizes)
    free = memory_available()
    total = sum(w for w, _, _ in sizes) * 4
    if weights * 4 > MAX_TENSOR_BYTES or (free is not None and total > free // 2):
        why = (f"more than the {MAX_TENSOR_BYTES:,} bytes edge-kit takes per layer (no device has the memory for more)"
               if weights * 4 > MAX_TENSOR_BYTES else
               f"and its layers {total / 1e6:,.0f} MB in all, more than half of the {(free or 0) / 1e6:,.0f} MB of "
               "memory available here")
        from edgekit_protocol.labels import clip, printable

        about = "about" if weights < DECLARED_CAP else "more than"  # a size past the cap: the cap's figure
        raise InputError(f"{path}: layer '{printable(clip(name, 60))}' ({printable(clip(kind, 40))}) declares {about} "
                         f"{weights:,} weights ({weights * 4 / 1e6:,.0f} MB of float32) in the model's config, {why}; "
                         "TensorFlow would allocate them on this host while loading it: a damaged or hostile file, or "
                         "a model too large for edge devices; export a smaller model")


def _check_links(folder: Path) -> None:
    """Refuse a model folder holding a link (to a file or a folder) that leads out of it. Returns nothing.

    Hashing the folder and TensorFlow's load read through links: one leading out would take in any file
    of this machine, or block on one that never ends (``/proc/kmsg``).

    Raises:
        InputError: the first such link, named with where it leads.
    """
    root = folder.resolve()
    for top, dirs, files in os.walk(folder):  # links to folders are listed in dirs and not followed
        for entry in sorted([*dirs, *files]):
            link = Path(top) / entry
            if not link.is_symlink():
                continue
            target = link.resolve()
            if target != root and root not in target.parents:
                raise InputError(f"{folder}: '{link.relative_to(folder)}' is a link leading out of the SavedModel's "
                                 f"folder (to {target}); edge-kit reads a model's files only from inside it: copy the "
                                 "file in place of the link")


def _load_savedmodel(path: Path, name: str, digest: str, pinned: dict[str, tuple[int, ...]],
                     load_seconds: float) -> Source:
    if not (path / "saved_model.pb").is_file():
        raise InputError(f"{path}: a folder model must be a SavedModel (saved_model.pb not found)")
    tf = tensorflow()
    _check_savedmodel(path)
    try:
        with watched("TensorFlow's loading of the SavedModel", load_seconds, cause=LOAD_CAUSE):
            obj = tf.saved_model.load(str(path))
        signatures = obj.signatures
    except Exception as exc:  # noqa: BLE001 - TF raises assorted errors for damaged SavedModels
        raise InputError(f"{path}: not a loadable SavedModel ({first_line(exc)}); save it again whole, saved_model.pb "
                         "with its variables folder (tf.saved_model.save(obj, folder), Keras: model.export(folder))") \
            from None
    if "serving_default" not in signatures:
        raise InputError(f"{path}: {_no_serving_default(list(signatures))}")
    sig = signatures["serving_default"]
    specs = sig.structured_input_signature[1]
    for input_name, spec in specs.items():
        check_input_dtype(path, input_name, spec.dtype.name)
    _unknown_pins(path, pinned, list(specs))
    inputs = {n: _static(path, n, spec.shape, pinned) for n, spec in specs.items()}
    return Source(path, "savedmodel", digest, name, inputs, list(sig.structured_outputs), saved_model=(obj, sig),
                  input_types={n: spec.dtype.name for n, spec in specs.items() if spec.dtype.name != "float32"})


def _no_serving_default(names: list[str]) -> str:
    """Return why a SavedModel whose signatures are ``names`` (none of them ``serving_default``) is refused, and what
    to do: edge-kit compiles that one signature, and does not guess which of several is the model."""
    from edgekit_protocol.labels import clip, printable

    if not names:
        return ("the SavedModel has no signatures, so nothing says which function is the model; save it again with "
                "tf.saved_model.save(obj, folder, signatures={'serving_default': fn}) (Keras: model.export(folder))")
    shown = ", ".join(f"'{printable(clip(n, 60))}'" for n in sorted(names)[:8]) + (", ..." if len(names) > 8 else "")
    return (f"the SavedModel has no 'serving_default' signature (it has {shown}), the one edge-kit compiles; save it "
            "again with signatures={'serving_default': <the function to compile>, ...}")


# TensorFlow ops that read or write files of the machine running them (or map them: ImmutableConst). A
# SavedModel's initializers run while it loads, so one of these there reads or writes any file of this
# host. Checkpoint ops are allowed only in the SavedModel's own save/restore functions (its saver_def).
FILE_OPS = frozenset({
    "ReadFile", "WriteFile", "MatchingFiles", "ImmutableConst", "CreateSummaryFileWriter", "CreateSummaryDbWriter",
    "DebugIdentity", "DebugIdentityV2", "DebugIdentityV3", "DebugNanCount", "DebugNumericSummary",
    "DebugNumericSummaryV2", "InitializeTableFromTextFile", "InitializeTableFromTextFileV2",
    "TextLineDataset", "TFRecordDataset", "TFRecordDatasetV2", "FixedLengthRecordDataset",
    "FixedLengthRecordDatasetV2", "CSVDataset", "CSVDatasetV2", "ExperimentalCSVDataset", "SaveDataset",
    "SaveDatasetV2", "LoadDataset", "SnapshotDataset", "SnapshotDatasetV2", "ExperimentalSqlDataset", "SqlDataset",
    "TextLineReader", "TextLineReaderV2", "TFRecordReader", "TFRecordReaderV2", "FixedLengthRecordReader",
    "FixedLengthRecordReaderV2", "WholeFileReader", "WholeFileReaderV2", "LMDBReader", "LMDBDataset",
    "LoadAndRemapMatrix"})
CHECKPOINT_OPS = frozenset({"Save", "SaveSlices", "SaveV2", "Restore", "RestoreSlice", "RestoreV2",
                            "MergeV2Checkpoints"})


def _check_savedmodel(path: Path) -> None:
    """Refuse a SavedModel that would touch this machine's files while loading. Returns nothing.

    - Assets: TensorFlow joins each asset's recorded file name to ``<path>/assets`` and reads the file
      while loading (a lookup table is initialized from it): ``..``, an absolute name or a link leading
      out would read any file of this machine into the model.
    - Ops: a resource's initializer runs while the model loads, whatever ops it holds (a ``WriteFile``
      there writes any file of this host). A function holding an op of :data:`FILE_OPS`, a ``PrintV2``
      to a ``file://`` stream or a ``DecodeProtoV2`` reading its descriptors from a file (a table
      initialized from a text file is fine when that file is one of its assets, as TensorFlow saves
      it), or a checkpoint op outside the SavedModel's own save and restore functions, is refused.
    - Sizes: a variable, constant or shape-taking op declaring a tensor larger than edge-kit takes
      (:func:`_oversized_declaration`), before TensorFlow allocates it.

    A ``saved_model.pb`` TensorFlow cannot parse is left to its own load, which words the error.

    Raises:
        InputError: the first asset outside the folder, or the first such op, named with its function, or the first
            tensor too large, named with what declares it and its shape.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString((path / "saved_model.pb").read_bytes())
    except Exception:  # noqa: BLE001 - DecodeError and friends: tf.saved_model.load says what is wrong
        return
    assets = (path / "assets").resolve()
    for graph in proto.meta_graphs:
        for asset in _asset_defs(graph):
            name = asset.filename
            target = (assets / name).resolve()
            if not name or Path(name).is_absolute() or assets not in target.parents:
                raise InputError(f"{path}: asset '{name}' lies outside the SavedModel's assets folder, and TensorFlow "
                                 "would read it from this machine while loading the model; save the model again "
                                 "with its assets inside it")
    for graph in proto.meta_graphs:
        functions = {f.signature.name: f for f in graph.graph_def.library.function}
        saver = {graph.saver_def.save_tensor_name.split(":")[0], graph.saver_def.restore_op_name.split(":")[0]}
        checkpointing = _called(functions, [n for n in graph.graph_def.node if n.name in saver])
        asset_tensors = {a.tensor_info.name.split(":")[0] for a in _asset_defs(graph)}  # TF1: the loader sets them
        bodies = [("the main graph", list(graph.graph_def.node))] + [(name, list(f.node_def)) for name, f in functions.items()]
        for where, nodes in bodies:
            for node in nodes:
                source = node.input[1].split(":")[0] if len(node.input) > 1 else ""  # the file name's tensor
                textfile_asset = node.op.startswith("InitializeTableFromTextFile") and (
                    source in asset_tensors if where not in functions else _is_argument(functions[where], source))
                to_file = (node.op == "PrintV2" and node.attr["output_stream"].s.startswith(b"file://")) or \
                    (node.op == "DecodeProtoV2" and node.attr["descriptor_source"].s not in (b"", b"local://"))
                bad = to_file or (node.op in FILE_OPS and not textfile_asset) or \
                    (node.op in CHECKPOINT_OPS and where not in checkpointing)
                if bad:
                    raise InputError(f"{path}: the SavedModel's function '{where}' holds a {node.op} op, which reads "
                                     "or writes files of the machine that runs it (TensorFlow runs initializers while "
                                     "loading the model); export the model without it")
    too_big = _oversized_declaration(proto)
    if too_big:
        from edge_kit.compiler.analysis import MAX_TENSOR_BYTES

        raise InputError(f"{path}: saved_model.pb declares {too_big}, more than the {MAX_TENSOR_BYTES:,} bytes edge-kit "
                         "takes per tensor (no device has the memory for more); TensorFlow would allocate it on this "
                         "host while loading or converting the model: a damaged or hostile file, or a model too large "
                         "for edge devices; export a smaller model")


# Ops that allocate a tensor of the shape one of their inputs gives (by index): Fill (tf.fill, tf.ones, tf.zeros of a
# shape), BroadcastTo, Empty, the random ops. With that input a constant, TensorFlow's constant folding at conversion
# (or the op at load, in an initializer) materialises the tensor whatever the file's size.
SHAPE_INPUT_OPS = {"Fill": 0, "BroadcastTo": 1, "Empty": 0, "RandomUniform": 0, "RandomStandardNormal": 0,
                   "TruncatedNormal": 0, "RandomUniformInt": 0, "StatelessRandomUniform": 0,
                   "StatelessRandomNormal": 0, "StatelessTruncatedNormal": 0, "StatelessRandomUniformV2": 0,
                   "StatelessRandomNormalV2": 0, "StatelessTruncatedNormalV2": 0}
MAX_SHAPE_RANK = 254  # TensorFlow's own limit: a longer shape constant is no shape


def _oversized_declaration(proto: Any) -> str | None:
    """Return, for the first tensor a SavedModel's ``proto`` (its parsed ``saved_model.pb``) declares that would take
    more than :data:`~edge_kit.compiler.analysis.MAX_TENSOR_BYTES`, what declares it and its shape, dtype and size
    (``variable 'dense/kernel' of shape 1000000000x10 (float32, 40,000,000,000 bytes)``); None when every one fits.

    Read from the proto alone, nothing allocated: the variables the object graph and the graphs (``VarHandleOp``,
    ``VariableV2``) declare, each ``Const`` (its declared shape: TensorFlow fills a large shape from one stored value),
    and each op of :data:`SHAPE_INPUT_OPS` whose shape input is a ``Const`` of the same graph or function. Sizes are
    taken at most :data:`DECLARED_CAP` (a dynamic dimension counted as 1), as for a Keras config. Never raises."""
    from tensorflow.core.framework import types_pb2

    from edge_kit.compiler.analysis import _ITEM_BYTES, MAX_TENSOR_BYTES

    tf = tensorflow()

    def described(kind: str, name: str, where: str, dims: list[int], dtype: int) -> str | None:
        try:
            dtype_name = tf.dtypes.as_dtype(dtype).base_dtype.name  # float32, bfloat16... (a _ref type: its base)
        except TypeError:
            dtype_name = f"type {dtype}"
        item = _ITEM_BYTES.get(dtype_name, 1)
        size = min(_capped_prod(max(int(d), 1) for d in dims) * item, DECLARED_CAP)
        if size <= MAX_TENSOR_BYTES:
            return None
        from edgekit_protocol.labels import clip, printable

        about = f"{size:,}" if size < DECLARED_CAP else f"more than {DECLARED_CAP:,}"
        shape = "x".join(str(int(d)) for d in dims[:8]) + ("x..." if len(dims) > 8 else "")
        return (f"{kind} '{printable(clip(name, 60))}'{where} of shape {shape} ({dtype_name}, {about} bytes)")

    for graph in proto.meta_graphs:
        for node in graph.object_graph_def.nodes:
            if node.WhichOneof("kind") == "variable":
                var = node.variable
                said = described("variable", var.name, "", [d.size for d in var.shape.dim], var.dtype)
                if said:
                    return said
        functions = [("", list(graph.graph_def.node))] + \
            [(f" in function '{f.signature.name}'", list(f.node_def)) for f in graph.graph_def.library.function]
        for where, nodes in functions:
            consts = {n.name: n for n in nodes if n.op == "Const"}
            for node in nodes:
                said = None
                if node.op in ("VarHandleOp", "VariableV2", "Variable") and "shape" in node.attr:
                    said = described("variable", node.name, where, [d.size for d in node.attr["shape"].shape.dim],
                                     node.attr["dtype"].type)
                elif node.op == "Const":
                    tensor = node.attr["value"].tensor
                    said = described("constant", node.name, where, [d.size for d in tensor.tensor_shape.dim],
                                     tensor.dtype)
                elif node.op in SHAPE_INPUT_OPS and len(node.input) > SHAPE_INPUT_OPS[node.op]:
                    shape_node = consts.get(node.input[SHAPE_INPUT_OPS[node.op]].lstrip("^").split(":")[0])
                    dims = _shape_constant(shape_node) if shape_node is not None else None
                    dtype = next((node.attr[k].type for k in ("dtype", "T") if k in node.attr), types_pb2.DT_FLOAT)
                    if dims is not None:
                        said = described(f"{node.op} op", node.name, where, dims, dtype)
                if said:
                    return said
    return None


def _shape_constant(node: Any) -> list[int] | None:
    """Return the integers a ``Const`` node holding a shape stores (a vector of at most :data:`MAX_SHAPE_RANK`
    int32 or int64; TensorFlow repeats the last stored value to its declared length), read from the proto without
    TensorFlow; None for anything else."""
    import numpy as np
    from tensorflow.core.framework import types_pb2

    tensor = node.attr["value"].tensor
    dims = [d.size for d in tensor.tensor_shape.dim]
    if len(dims) != 1 or not 0 <= dims[0] <= MAX_SHAPE_RANK or tensor.dtype not in (types_pb2.DT_INT32,
                                                                                      types_pb2.DT_INT64):
        return None
    if tensor.tensor_content:
        width = np.dtype("<i4" if tensor.dtype == types_pb2.DT_INT32 else "<i8")
        if len(tensor.tensor_content) != dims[0] * width.itemsize:
            return None
        return [int(v) for v in np.frombuffer(tensor.tensor_content, width)]
    stored = list(tensor.int_val if tensor.dtype == types_pb2.DT_INT32 else tensor.int64_val)[:dims[0]]
    if not stored:
        return [0] * dims[0]
    return stored + [stored[-1]] * (dims[0] - len(stored))


def _asset_defs(graph: Any) -> list[Any]:
    """Return a MetaGraphDef's AssetFileDefs: its ``asset_file_def`` (TF2) and those a TF1 SavedModel keeps
    in the ``saved_model_assets`` collection."""
    from tensorflow.core.protobuf import meta_graph_pb2

    defs = list(graph.asset_file_def)
    if "saved_model_assets" in graph.collection_def:
        for packed in graph.collection_def["saved_model_assets"].any_list.value:
            asset = meta_graph_pb2.AssetFileDef()
            if packed.Unpack(asset):
                defs.append(asset)
    return defs


def _called(functions: dict[str, Any], nodes: list[Any]) -> set[str]:
    """Return the names of the functions ``nodes`` call (their ``f`` attribute), and those they call in turn."""
    seen: set[str] = set()
    todo = [n.attr["f"].func.name for n in nodes if "f" in n.attr]
    while todo:
        name = todo.pop()
        if name in seen or name not in functions:
            continue
        seen.add(name)
        todo += [n.attr["f"].func.name for n in functions[name].node_def if "f" in n.attr]
    return seen


def _is_argument(function: Any, tensor: str) -> bool:
    """Return True when ``tensor`` (a node's name) is an argument of ``function`` (a captured asset's path)."""
    return tensor in {arg.name for arg in function.signature.input_arg}


def _load_tflite(path: Path, name: str, digest: str, pinned: dict[str, tuple[int, ...]]) -> Source:
    from edge_kit.compiler.analysis import analyse, flex_ops, probe_in_child

    data = path.read_bytes()
    try:
        _check_tensors(path, data)
        probe_in_child(data)  # a file that crashes the interpreter crashes a child, never this process
        stats = analyse(data)
    except (ValueError, RuntimeError) as exc:
        flex = flex_ops(data)
        if flex:  # LiteRT's own words ran past 200 characters into advice for Android builds
            from edgekit_protocol.labels import clip, printable

            names = printable(clip(", ".join(flex), 120))
            raise InputError(f"{path}: not a loadable .tflite model (it holds TensorFlow ops, {names}, which the "
                             "LiteRT runtime on devices does not run); convert it again with builtin ops only "
                             "(supported_ops=[tf.lite.OpsSet.TFLITE_BUILTINS]), or compile the model it came from") \
                from None
        raise InputError(f"{path}: not a loadable .tflite model ({first_line(exc)})") from None
    _check_tflite_ports(path, stats)
    _unknown_pins(path, pinned, [p["name"] for p in stats.inputs])
    inputs = {p["name"]: _static(path, p["name"], p["shape_signature"], pinned) for p in stats.inputs}
    if pinned:  # written into the file: every variant, and the source variant itself, is static
        check_sample_sizes(path, inputs)  # before the interpreter that pins them allocates that much
        from device_agents.errors import SmokeCrashed, SmokeFailed
        from device_agents.smoke import SmokePool
        from edge_kit.compiler.analysis import PROBE_TIMEOUT_S

        shapes = ", ".join(f"{n}=1x{'x'.join(map(str, inputs[n]))}" for n in pinned)
        try:  # the interpreter resizes and allocates the file at the new shapes: first in a child, as it loads it
            data = SmokePool().run(_pin_tflite, data, {n: (1, *inputs[n]) for n in pinned}, timeout=PROBE_TIMEOUT_S,
                                   what="pinning of the input shapes")
        except SmokeCrashed as exc:
            raise InputError(f"{path}: not a loadable .tflite model (the LiteRT interpreter {exc.how} resizing it to "
                             f"--input-shape {shapes}: a damaged or hostile file)") from None
        except SmokeFailed as exc:
            raise InputError(f"{path}: the model does not run with --input-shape {shapes} ({exc})") from None
        try:
            _check_tensors(path, data)
            probe_in_child(data)
            stats = analyse(data)
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"{path}: the model does not run with --input-shape {shapes} ({first_line(exc)})") from None
    return Source(path, "tflite", digest, name, inputs, [p["name"] for p in stats.outputs],
                  tflite=data, tflite_precision=stats.precision,  # a quantized input (a scale) takes real values
                  input_types={p["name"]: p["dtype"] for p in stats.inputs if p["dtype"] != "float32" and not p["scale"]})


def _pin_tflite(data: bytes, shapes: Shapes) -> bytes:
    """Return :func:`~edge_kit.compiler.tflite_edit.pin_inputs` of the model at ``shapes`` (full shapes, batch
    included), run in a child of :class:`device_agents.smoke.SmokePool` by :func:`_load_tflite`: the LiteRT
    interpreter resizes and allocates the user's file there, so a crash or a hang is the child's.

    Raises:
        SmokeFailed: the interpreter refuses the shapes (its first line).
    """
    from device_agents.errors import SmokeFailed
    from edge_kit.compiler.tflite_edit import pin_inputs

    try:
        return pin_inputs(data, shapes)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise SmokeFailed(first_line(exc)) from None


def _check_tensors(path: Path, data: bytes) -> None:
    """Refuse a ``.tflite`` declaring a tensor larger than
    :data:`~edge_kit.compiler.analysis.MAX_TENSOR_BYTES` (before any runtime allocates it), or holding
    NaN in a float constant (as an ONNX initializer holding NaN is). Returns nothing.

    Raises:
        InputError: the first such tensor, named with its shape and size, or with its first NaN's index.
        ValueError: not a ``.tflite`` flatbuffer, or a damaged one (the caller words it).
    """
    from edge_kit.compiler.analysis import (
        MAX_TENSOR_BYTES,
        nan_constant,
        oversized_tensor,
    )

    too_big = oversized_tensor(data)
    if too_big:
        raise InputError(f"{path}: {too_big}; edge-kit takes models whose tensors each fit in {MAX_TENSOR_BYTES:,} "
                         "bytes (no device has the memory for more): export the model for a smaller input")
    nan = nan_constant(data)
    if nan:
        raise InputError(f"{path}: constant tensor '{nan[0]}' holds NaN at flat index {nan[1]}, so the model computes "
                         "NaN; export it again from weights without NaN")


def _check_tflite_ports(path: Path, stats: Any) -> None:
    """Refuse a ``.tflite`` whose inputs and outputs a device cannot serve one sample at a time (the
    ``.tflite`` counterpart of the ONNX graph check in :mod:`edge_kit.compiler.onnx_source`).

    ``stats`` is the file's :class:`edge_kit.compiler.analysis.ModelStats`. Returns nothing.

    Raises:
        InputError: no inputs, no outputs, two inputs or outputs of one name (data files and results
            are keyed by name), an output that is an input tensor (passed through unchanged), an output
            no op computes (a stored constant, or memory never written), or a scalar (0-d) output.
    """
    if not stats.inputs:
        raise InputError(f"{path}: the model has no inputs, so it computes the same output for every request; "
                         "export it with its real inputs")
    if not stats.outputs:
        raise InputError(f"{path}: the model declares no outputs; export it again with its outputs")
    produced = {t for op in stats.ops for t in op.outputs}
    for port, tensor in zip(stats.outputs, stats.output_tensors):
        if tensor in stats.input_tensors:
            raise InputError(f"{path}: output '{port['name']}' is also an input (passed through unchanged); remove "
                             "it from the outputs, or compute it with an op (tf.identity), and export again")
        if tensor not in produced:
            raise InputError(f"{path}: output '{port['name']}' is computed by no op (a stored constant, or a tensor "
                             "nothing writes), so it says nothing about the input; export the model again with the "
                             "outputs it computes")
    names = [p["name"] for p in stats.inputs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"{path}: input '{twice[0]}' has the name of another input; data files are keyed by input "
                         "name, so export the model with a name of its own for each")
    for port in stats.outputs:
        if port["name"] in names:
            raise InputError(f"{path}: output '{port['name']}' has the name of another input or output; data files "
                             "and results are keyed by name, so export the model with a name of its own for each")
        names.append(port["name"])
    scalar = [p["name"] for p in stats.outputs if not p["shape"]]
    if scalar:  # the runner returns every output along a batch axis, which a 0-d tensor has not
        raise InputError(f"{path}: output '{scalar[0]}' is a scalar (0-d); devices return each output with a batch "
                         "axis: export the model with it shaped [1] (e.g. keepdims=True, or tf.reshape(y, [1]))")
