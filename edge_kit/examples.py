"""Example models that need no download, for trying the toolkit, its tests and `edgekit demo`.

- ``digits``: a small CNN trained on scikit-learn's bundled 8x8 handwritten digits (1,797 images),
  with calibration, training and evaluation ``.npz`` files. Real accuracy, seconds to train.
- ``mobilenet``: a MobileNet-v1-style network (depthwise-separable blocks) with random weights and
  random calibration inputs. For size and speed only: its accuracy means nothing, so no eval set.
- ``mobilenetv2``: a small MobileNet-v2-style network (inverted-residual blocks with residual adds)
  trained on the same digits, upsampled to 32x32x3, with the same three ``.npz`` files. Real
  accuracy on a residual model (what structured pruning across residual adds is measured on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_kit.compiler.tf_quiet import captured_output, tensorflow
from edge_kit.errors import InputError
from edge_kit.fsutil import atomic_write_bytes

EXAMPLES = ("digits", "mobilenet", "mobilenetv2")


@dataclass
class ExampleFiles:
    model: Path
    calib: Path
    eval: Path | None
    train: Path | None
    facts: dict[str, Any]
    methods: dict[str, str] = field(default_factory=dict)  # how each figure of ``facts`` was obtained, by key

    def record(self) -> dict[str, Any]:
        """Return the files (as text paths; None where absent), the example's facts and ``methods`` (how each
        figure among them was obtained, keyed as the facts are), for ``--json``."""
        return {"model": str(self.model), "calib": str(self.calib),
                "eval": str(self.eval) if self.eval else None,
                "train": str(self.train) if self.train else None, **self.facts, "methods": dict(self.methods)}


PARAMS_METHOD = "counted: Keras Model.count_params() of the model as written"


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _save_model(model: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.part{path.suffix}")
    with captured_output():
        model.save(tmp)
    tmp.replace(path)


def _digits_split(seed: int, upsample: int = 1, channels: int = 1) -> tuple[np.ndarray, ...]:
    """Return (x_train, y_train, x_eval, y_eval) of scikit-learn's 8x8 digits scaled to [0, 1].

    The split is fixed by ``seed`` (80 % train, 20 % eval). Each image is enlarged ``upsample`` times
    (nearest neighbour) and repeated over ``channels`` channels.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)
    x = np.repeat(np.repeat(x, upsample, axis=1), upsample, axis=2)
    x = np.repeat(x[..., None], channels, axis=-1)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return x[:split], y[:split], x[split:], y[split:]


def _train_and_write(model: Any, name: str, out: Path, split: tuple[np.ndarray, ...], epochs: int,
                     facts: dict[str, Any]) -> ExampleFiles:
    """Train ``model`` on the digits ``split`` and write ``{name}.keras`` and ``{name}-{calib,train,eval}.npz``.

    Calibration is the first 300 training samples. Returns the paths and ``facts`` with the
    Keras-measured eval accuracy of the float model.
    """
    import keras

    xtr, ytr, xev, yev = split
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(xtr, ytr, epochs=epochs, batch_size=32, verbose=0)
    _, acc = model.evaluate(xev, yev, verbose=0)

    out.mkdir(parents=True, exist_ok=True)
    files = ExampleFiles(out / f"{name}.keras", out / f"{name}-calib.npz", out / f"{name}-eval.npz",
                         out / f"{name}-train.npz",
                         {"example": name, **facts, "keras_eval_accuracy": round(float(acc), 4),
                          "train_samples": len(xtr), "eval_samples": len(xev)},
                         {"keras_eval_accuracy": f"measured on this host: Keras model.evaluate (top-1 accuracy) of the "
                                                 f"trained float model on the {len(xev)} samples of {name}-eval.npz",
                          **({"params": PARAMS_METHOD} if "params" in facts else {})})
    _save_npz(files.train, x=xtr, y=ytr)
    _save_npz(files.eval, x=xev, y=yev)
    _save_npz(files.calib, x=xtr[:300])
    _save_model(model, files.model)
    return files


def digits(out: Path, *, epochs: int = 30, seed: int = 0) -> ExampleFiles:
    """Train the digits CNN and write ``digits.keras`` and ``digits-{calib,train,eval}.npz`` to ``out``.

    The split is fixed by ``seed``: 80 % train (its first 300 samples double as calibration),
    20 % eval. Returns the paths and the Keras-measured eval accuracy of the float model.
    """
    tensorflow()
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((8, 8, 1), name="image"),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10),
    ], name="digits_cnn")
    return _train_and_write(model, "digits", out, _digits_split(seed), epochs, {})


def mobilenet_model(size: int = 96, alpha: float = 0.5, classes: int = 10, seed: int = 0) -> Any:
    """Return a MobileNet-v1-style Keras model (conv + 13 depthwise-separable blocks) with random weights."""
    tensorflow()
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)

    def block(x: Any, filters: int, stride: int) -> Any:
        x = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU(6.0)(x)
        x = layers.Conv2D(int(filters * alpha), 1, use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        return layers.ReLU(6.0)(x)

    inp = keras.Input((size, size, 3), name="image")
    x = layers.Conv2D(int(32 * alpha), 3, strides=2, padding="same", use_bias=False)(inp)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU(6.0)(x)
    for filters, stride in [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5,
                            (1024, 2), (1024, 1)]:
        x = block(x, filters, stride)
    x = layers.GlobalAveragePooling2D()(x)
    out = layers.Dense(classes)(x)
    return keras.Model(inp, out, name=f"mobilenet_a{int(alpha * 100)}_{size}")


def mobilenet(out: Path, *, size: int = 96, alpha: float = 0.5, seed: int = 0) -> ExampleFiles:
    """Write ``mobilenet.keras`` (random weights) and ``mobilenet-calib.npz`` (uniform random inputs)."""
    model = mobilenet_model(size, alpha, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    files = ExampleFiles(out / "mobilenet.keras", out / "mobilenet-calib.npz", None, None,
                         {"example": "mobilenet", "size": size, "alpha": alpha, "params": int(model.count_params()),
                          "weights": "random (size and speed only; accuracy is meaningless)"},
                         {"params": PARAMS_METHOD})
    rng = np.random.default_rng(seed)
    _save_npz(files.calib, x=rng.uniform(0, 1, (100, size, size, 3)).astype(np.float32))
    _save_model(model, files.model)
    return files


def mobilenetv2_model(size: int = 32, alpha: float = 1.0, classes: int = 10, seed: int = 0) -> Any:
    """Return a small MobileNet-v2-style Keras model with random weights.

    A stride-2 stem, six inverted-residual blocks (1x1 expand x4, depthwise 3x3, linear 1x1 project;
    a residual add wherever the shape allows, four of them) at widths 16/24/32 times ``alpha``, a
    1x1 conv to 128, global pooling and a Dense head giving logits.
    """
    tensorflow()
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)

    def conv_bn(x: Any, filters: int, kernel: int = 1, stride: int = 1, relu: bool = True) -> Any:
        x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        return layers.ReLU(6.0)(x) if relu else x

    def inverted_residual(x: Any, filters: int, stride: int) -> Any:
        y = conv_bn(x, 4 * int(x.shape[-1]))
        y = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False)(y)
        y = layers.ReLU(6.0)(layers.BatchNormalization()(y))
        y = conv_bn(y, filters, relu=False)
        return layers.Add()([x, y]) if stride == 1 and int(x.shape[-1]) == filters else y

    inp = keras.Input((size, size, 3), name="image")
    x = conv_bn(inp, int(16 * alpha), 3, stride=2)
    for filters, stride in [(16, 1), (16, 1), (24, 2), (24, 1), (32, 2), (32, 1)]:
        x = inverted_residual(x, int(filters * alpha), stride)
    x = conv_bn(x, int(128 * alpha))
    out = layers.Dense(classes)(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inp, out, name=f"mobilenetv2_a{int(alpha * 100)}_{size}")


def mobilenetv2(out: Path, *, epochs: int = 15, alpha: float = 1.0, seed: int = 0) -> ExampleFiles:
    """Train the MobileNet-v2-style network on the digits upsampled to 32x32x3 and write
    ``mobilenetv2.keras`` and ``mobilenetv2-{calib,train,eval}.npz`` to ``out`` (split as :func:`digits`).

    Returns the paths and the Keras-measured eval accuracy of the float model.
    """
    model = mobilenetv2_model(32, alpha, seed=seed)
    facts = {"size": 32, "alpha": alpha, "params": int(model.count_params())}
    return _train_and_write(model, "mobilenetv2", out, _digits_split(seed, upsample=4, channels=3), epochs, facts)


def make_example(name: str, out: Path, **kwargs: Any) -> ExampleFiles:
    """Build the named example into ``out`` and return its files (``kwargs`` go to that example's builder).

    Raises:
        InputError: unknown example name, or ``out`` cannot be created or written (checked in that order:
            a mistyped name leaves no empty folder behind).
    """
    builders = {"digits": digits, "mobilenet": mobilenet, "mobilenetv2": mobilenetv2}
    if name not in builders:
        from edge_kit.config import closest

        hint = closest(name, EXAMPLES)
        raise InputError(f"unknown example '{name}'" + (f"; did you mean '{hint}'?" if hint else "")
                         + f" (choose from: {', '.join(EXAMPLES)})")
    from edge_kit.fsutil import writable_folder

    return builders[name](writable_folder(Path(out)), **kwargs)
