"""Load the model a user compiles: Keras (``.keras``, ``.h5``), a SavedModel folder, or a ``.tflite``.

Only single-input, single-output models with a static input shape (apart from the batch axis) are
accepted: edge runtimes and the Edge TPU need static shapes, and every variant is exported with a
batch of one, the shape devices run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edge_kit.compiler.tf_quiet import captured_output, tensorflow
from edge_kit.errors import InputError
from edge_kit.fsutil import sha256_file

SourceKind = Literal["keras", "savedmodel", "tflite"]


@dataclass
class Graph:
    """A convertible TensorFlow function with a batch-1 input signature, plus what owns its variables."""

    function: Any
    trackable: Any


@dataclass
class Source:
    path: Path
    kind: SourceKind
    sha256: str
    name: str
    input_shape: tuple[int, ...]  # without the batch axis
    keras_model: Any = None
    saved_model: Any = None
    tflite: bytes | None = None
    tflite_precision: str | None = None

    def record(self) -> dict[str, Any]:
        """Return the manifest entry for the source model."""
        return {"name": self.name, "path": str(self.path), "format": self.kind, "sha256": self.sha256,
                "input_shape": list(self.input_shape)}


def keras_graph(model: Any, input_shape: tuple[int, ...]) -> Graph:
    """Return a :class:`Graph` calling a Keras model on one sample (batch 1)."""
    tf = tensorflow()
    holder = tf.Module()
    holder.model = model
    holder.variables_ = [getattr(v, "value", v) for v in model.variables]  # track Keras 3 variables
    holder.serve = tf.function(lambda x: model(x, training=False),
                               input_signature=[tf.TensorSpec([1, *input_shape], tf.float32)])
    return Graph(holder.serve.get_concrete_function(), holder)


def source_graph(source: Source) -> Graph:
    """Return the :class:`Graph` of a Keras or SavedModel source.

    Raises:
        ValueError: the source is a ``.tflite`` file, which has no TensorFlow graph.
    """
    if source.keras_model is not None:
        return keras_graph(source.keras_model, source.input_shape)
    if source.saved_model is not None:
        tf = tensorflow()
        obj, sig, arg = source.saved_model
        fn = tf.function(lambda x: next(iter(sig(**{arg: x}).values())),
                         input_signature=[tf.TensorSpec([1, *source.input_shape], tf.float32)])
        return Graph(fn.get_concrete_function(), obj)
    raise ValueError(f"{source.path}: a .tflite source has no TensorFlow graph")


def _static_shape(path: Path, shape: Any) -> tuple[int, ...]:
    dims = tuple(shape)[1:]
    if any(d is None or int(d) < 0 for d in dims):
        raise InputError(f"{path}: input shape {tuple(shape)} has unknown dimensions besides the batch; "
                         "re-export the model with a fixed input size (edge runtimes need static shapes)")
    return tuple(int(d) for d in dims)


def load_source(path: Path) -> Source:
    """Load a model file or folder.

    Returns:
        A :class:`Source` with its hash, kind and input shape.

    Raises:
        InputError: missing, unreadable or corrupt model, an unsupported format, more than one
            input or output, or dynamic input dimensions.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: model not found")
    name = path.stem if path.is_file() else path.name
    digest = sha256_file(path)
    if path.is_dir():
        return _load_savedmodel(path, name, digest)
    suffix = path.suffix.lower()
    if suffix == ".tflite":
        return _load_tflite(path, name, digest)
    if suffix in (".keras", ".h5", ".hdf5"):
        return _load_keras(path, name, digest)
    raise InputError(f"{path}: unknown model format '{suffix}'; give a .keras, .h5, .tflite file or a SavedModel folder")


def _load_keras(path: Path, name: str, digest: str) -> Source:
    tensorflow()
    import keras

    try:
        with captured_output():
            model = keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for a bad file; all mean the same to the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: not a loadable Keras model ({first[:200]})") from None
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise InputError(f"{path}: the model has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
                         "edge-kit compiles single-input, single-output models")
    shape = _static_shape(path, model.inputs[0].shape)
    return Source(path, "keras", digest, name, shape, keras_model=model)


def _load_savedmodel(path: Path, name: str, digest: str) -> Source:
    if not (path / "saved_model.pb").is_file():
        raise InputError(f"{path}: a folder model must be a SavedModel (saved_model.pb not found)")
    tf = tensorflow()
    try:
        obj = tf.saved_model.load(str(path))
        sig = obj.signatures["serving_default"]
    except KeyError:
        raise InputError(f"{path}: the SavedModel has no 'serving_default' signature") from None
    except Exception as exc:  # noqa: BLE001 - TF raises assorted errors for damaged SavedModels
        raise InputError(f"{path}: not a loadable SavedModel ({str(exc).splitlines()[0][:200]})") from None
    inputs = sig.structured_input_signature[1]
    if len(inputs) != 1 or len(sig.structured_outputs) != 1:
        raise InputError(f"{path}: serving_default has {len(inputs)} inputs and {len(sig.structured_outputs)} outputs; "
                         "edge-kit compiles single-input, single-output models")
    arg, spec = next(iter(inputs.items()))
    shape = _static_shape(path, spec.shape)
    return Source(path, "savedmodel", digest, name, shape, saved_model=(obj, sig, arg))


def _load_tflite(path: Path, name: str, digest: str) -> Source:
    from edge_kit.compiler.analysis import analyse

    data = path.read_bytes()
    try:
        stats = analyse(data)
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"{path}: not a loadable .tflite model ({str(exc).splitlines()[0][:200]})") from None
    shape = tuple(stats.input["shape"])
    return Source(path, "tflite", digest, name, shape[1:], tflite=data, tflite_precision=stats.precision)
