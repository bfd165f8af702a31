"""Pruning on Keras models, before conversion.

- :func:`magnitude_prune` zeroes the smallest-magnitude weights of every Conv2D, DepthwiseConv2D and
  Dense kernel to the requested sparsity (per layer). The file shrinks only once compressed (the
  runtime still does dense math), so the gain is reported as gzip size.
- :func:`channel_prune` removes whole output channels (lowest L1 norm first) from every Conv2D and
  hidden Dense layer of a chain model and slices the layers that consume them, so MACs and latency
  really drop. Models with branches (residual adds, concatenations) are refused with a reason.

Both fine-tune for a few epochs when training data is given, which recovers most of the accuracy a
one-shot prune loses; magnitude masks are re-applied after every batch so pruned weights stay zero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edge_kit.compiler.tf_quiet import tensorflow
from edge_kit.errors import CompileError

PRUNABLE = ("Conv2D", "DepthwiseConv2D", "Dense")
# Layers that keep the channel layout of their input unchanged.
PASS_THROUGH = (
    "InputLayer", "Activation", "ReLU", "LeakyReLU", "Dropout", "MaxPooling2D", "AveragePooling2D",
    "GlobalAveragePooling2D", "GlobalMaxPooling2D", "ZeroPadding2D", "Softmax", "SpatialDropout2D",
)


def _keras() -> Any:
    tensorflow()
    import keras

    return keras


def _clone(model: Any) -> Any:
    keras = _keras()
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def _is_probabilities(model: Any) -> bool:
    act = getattr(model.layers[-1], "activation", None)
    return getattr(act, "__name__", "") == "softmax" or type(model.layers[-1]).__name__ == "Softmax"


def fine_tune(model: Any, train: tuple[np.ndarray, np.ndarray], epochs: int,
              after_batch: Callable[[], None] | None = None, seed: int = 0) -> None:
    """Train ``model`` in place on ``train`` = (x, y) with Adam and sparse cross-entropy.

    ``after_batch`` runs after every optimiser step (used to keep pruned weights at zero).
    """
    keras = _keras()
    keras.utils.set_random_seed(seed)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=not _is_probabilities(model)))
    callbacks = [keras.callbacks.LambdaCallback(on_train_batch_end=lambda _batch, logs=None: after_batch())] if after_batch else []
    x, y = train
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0, callbacks=callbacks)


def magnitude_prune(model: Any, sparsity: float, train: tuple[np.ndarray, np.ndarray] | None = None,
                    epochs: int = 3) -> Any:
    """Return a copy of ``model`` with ``sparsity`` of each prunable kernel's weights set to zero.

    Raises:
        CompileError: the model has no Conv2D, DepthwiseConv2D or Dense kernels.
    """
    pruned = _clone(model)
    masks: list[tuple[Any, np.ndarray]] = []
    for layer in pruned.layers:
        if type(layer).__name__ not in PRUNABLE:
            continue
        kernel = layer.depthwise_kernel if hasattr(layer, "depthwise_kernel") else layer.kernel
        w = np.asarray(kernel.numpy())
        k = int(round(w.size * sparsity))
        if k == 0:
            continue
        threshold = np.partition(np.abs(w).ravel(), k - 1)[k - 1]
        mask = (np.abs(w) > threshold).astype(w.dtype)
        kernel.assign(w * mask)
        masks.append((kernel, mask))
    if not masks:
        raise CompileError("magnitude pruning found no Conv2D, DepthwiseConv2D or Dense kernel to prune")

    def reapply() -> None:
        for kernel, mask in masks:
            kernel.assign(kernel.numpy() * mask)

    if train is not None:
        fine_tune(pruned, train, epochs, after_batch=reapply)
        reapply()
    return pruned


def _chain_layers(model: Any) -> list[Any]:
    """Return the layers of a model whose layers form a single chain, input to output.

    Raises:
        CompileError: the model branches or merges, so channels cannot be removed layer by layer.
    """
    layers = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
    prev = None
    for layer in layers:
        # the first inbound node is the one the model was built with; later calls add more
        nodes = getattr(layer, "_inbound_nodes", [])[:1]
        parents = {id(t._keras_history[0]): t._keras_history[0] for n in nodes for t in n.input_tensors}
        parents = list(parents.values())
        expected_input = prev is None and all(type(p).__name__ == "InputLayer" for p in parents)
        if len(parents) > 1 or not (expected_input or (parents and parents[0] is prev)):
            raise CompileError(f"channel pruning needs a chain of layers; layer '{layer.name}' "
                               "joins branches (use magnitude pruning, int8-pruned-S, for this model)")
        prev = layer
    return layers


def channel_prune(model: Any, fraction: float, train: tuple[np.ndarray, np.ndarray] | None = None,
                  epochs: int = 3) -> Any:
    """Return a smaller model with ``fraction`` of the output channels of each Conv2D and hidden Dense removed.

    Channels are ranked by the L1 norm of their filter; the last Conv2D/Dense (the model's output)
    keeps all its channels. Batch-norm, depthwise and the next layer's input weights are sliced to match.

    Raises:
        CompileError: the model is not a chain, or holds a layer whose channels cannot be followed
            (for example Reshape, SeparableConv2D, Concatenate).
    """
    keras = _keras()
    layers = _chain_layers(model)
    weighted = [i for i, layer in enumerate(layers) if type(layer).__name__ in ("Conv2D", "Dense")]
    if len(weighted) < 2:
        raise CompileError("channel pruning needs at least one Conv2D or Dense layer before the output layer")
    last = weighted[-1]
    kept: np.ndarray | None = None  # indices of surviving channels of the current tensor (None = all)
    new_layers: list[tuple[Any, list[np.ndarray]]] = []

    for i, layer in enumerate(layers):
        kind = type(layer).__name__
        cfg = layer.get_config()
        w = [np.asarray(v) for v in layer.get_weights()]
        if kind in ("Conv2D", "Dense"):
            kernel = w[0]
            if kept is not None:
                kernel = kernel[..., kept, :]
            out = kernel.shape[-1]
            if i != last:
                n_keep = max(1, int(round(out * (1.0 - fraction))))
                norms = np.abs(kernel).reshape(-1, out).sum(axis=0)
                keep = np.sort(np.argsort(norms)[::-1][:n_keep])
                kernel = kernel[..., keep]
                w = [kernel, *(v[keep] for v in w[1:])]
                cfg["filters" if kind == "Conv2D" else "units"] = int(n_keep)
                kept = keep
            else:
                w = [kernel, *w[1:]]
                kept = None
        elif kind == "DepthwiseConv2D":
            if kept is not None:
                mult = w[0].shape[-1]
                w[0] = w[0][:, :, kept, :]
                out_idx = (kept[:, None] * mult + np.arange(mult)[None, :]).ravel()
                w[1:] = [v[out_idx] for v in w[1:]]
                kept = out_idx
        elif kind == "BatchNormalization":
            if kept is not None:
                w = [v[kept] for v in w]
        elif kind == "Flatten":
            if kept is not None:
                in_shape = layer.input.shape
                channels = int(in_shape[-1])
                positions = int(np.prod(in_shape[1:-1]))
                kept = (np.arange(positions)[:, None] * channels + kept[None, :]).ravel()
        elif kind not in PASS_THROUGH:
            raise CompileError(f"channel pruning cannot follow channels through layer '{layer.name}' ({kind}); "
                               "use magnitude pruning (int8-pruned-S) for this model")
        new_layers.append((type(layer).from_config(cfg), w))

    pruned = keras.Sequential([keras.Input(model.inputs[0].shape[1:])] + [lay for lay, _ in new_layers],
                              name=f"{model.name}_chpruned")
    for lay, w in new_layers:
        if w:
            lay.set_weights(w)
    if train is not None:
        fine_tune(pruned, train, epochs)
    return pruned
