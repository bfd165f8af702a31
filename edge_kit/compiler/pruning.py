"""Pruning on Keras models, before conversion.

- :func:`magnitude_prune` zeroes the smallest-magnitude weights of every Conv, DepthwiseConv,
  SeparableConv, ConvTranspose (1D/2D) and Dense kernel, nested models included, to exactly the
  requested sparsity (per kernel; biases kept). The file shrinks only once compressed (the
  runtime still does dense math), so the gain is reported as gzip size.
- :func:`channel_prune` removes whole channels (lowest L1 norm first) and rebuilds the model with
  narrower layers, so MACs and latency really drop. It works on a dependency graph of channel
  groups, the idea of Torch-Pruning's ``DependencyGraph``: every tensor's last axis is mapped, channel
  by channel, to (group, index in group), and a group is pruned as one, with one set of kept indices.

  - A Conv1D/2D/3D or Dense layer starts a new group with its output channels (its *producers*).
  - Add, Multiply, Subtract, Maximum, Minimum and Average tie all their inputs and their output into
    one group (an input of width 1 that broadcasts is left out), so residual shortcuts and
    squeeze-excitation gates keep matching widths. A layer called twice ties its two inputs too.
  - Activations, ReLU, Softmax, BatchNormalization, pooling (global too), padding, cropping,
    upsampling, dropout, noise and a Reshape that keeps the last axis pass the channels through;
    DepthwiseConv keeps its input's channels (with a depth multiplier each one is repeated).
  - Concatenate on the channel axis lays its inputs' groups side by side (on another axis it ties
    them); Flatten repeats the channels once per spatial position, channel innermost.
  - A group is ranked by the L1 norm of each channel summed over all its producers (inputs already
    pruned upstream left out), and keeps ``1 - fraction`` of its channels. Groups that reach a model
    output or come from the model input are never pruned, nor are groups tied in an order that does
    not match (a concatenation added to a plain tensor, a depth multiplier tied to a plain tensor).

  Any other layer (SeparableConv2D, Conv2DTranspose, grouped Conv, Lambda, raw ``keras.ops`` calls,
  nested models, custom layers, a Reshape or Permute that moves the channel axis, channels_first
  layers...) may stand where no channel is pruned; where it reads or writes a group that would be
  pruned, :func:`channel_prune` raises a one-line :class:`CompileError` naming it and suggesting
  magnitude pruning (``int8-pruned-S``). A model is never pruned wrongly.

Both fine-tune for a few epochs when training data is given, which recovers most of the accuracy a
one-shot prune loses; magnitude masks are re-applied after every batch so pruned weights stay zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_kit.compiler.tf_quiet import tensorflow
from edge_kit.errors import CompileError

# magnitude pruning: the layers whose kernels become the MAC ops the analysis counts (CONV_2D,
# DEPTHWISE_CONV_2D, TRANSPOSE_CONV, FULLY_CONNECTED), so the sparsity asked is the sparsity measured
PRUNABLE = ("Conv1D", "Conv2D", "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D",
            "Conv1DTranspose", "Conv2DTranspose", "Dense")
KERNELS = ("kernel", "depthwise_kernel", "pointwise_kernel")  # biases are never pruned
# channel pruning: layers whose output channels start a group, and those that follow their input's
PRODUCERS = ("Conv1D", "Conv2D", "Conv3D", "Dense")
DEPTHWISE = ("DepthwiseConv1D", "DepthwiseConv2D")
MERGES = ("Add", "Multiply", "Subtract", "Maximum", "Minimum", "Average")
# layers that leave the channel layout of their input unchanged (elementwise or spatial only)
PASS_THROUGH = (
    "Activation", "ReLU", "LeakyReLU", "ELU", "Softmax", "Identity", "Dropout", "SpatialDropout1D",
    "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise", "GaussianDropout", "AlphaDropout",
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D", "AveragePooling3D",
    "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D", "GlobalMaxPooling1D",
    "GlobalMaxPooling2D", "GlobalMaxPooling3D", "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D",
    "Cropping1D", "Cropping2D", "Cropping3D", "UpSampling1D", "UpSampling2D", "UpSampling3D",
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

    ``after_batch`` runs after every optimiser step (used to keep pruned weights at zero). The
    batch-norm statistics are then re-estimated on ``x`` (:func:`recalibrate_batchnorm`).
    """
    keras = _keras()
    keras.utils.set_random_seed(seed)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=not _is_probabilities(model)))
    callbacks = [keras.callbacks.LambdaCallback(on_train_batch_end=lambda _batch, logs=None: after_batch())] if after_batch else []
    x, y = train
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0, callbacks=callbacks)
    recalibrate_batchnorm(model, x)


def recalibrate_batchnorm(model: Any, x: np.ndarray, batch_size: int = 64, samples: int = 1024) -> None:
    """Set every BatchNormalization's moving mean and variance, in place, to their average over
    batches of the first ``samples`` of ``x``.

    A few epochs of fine-tuning move the moving statistics only part of the way (momentum 0.99)
    from what the unpruned layers produced, and inference uses them: without this a pruned
    batch-norm model can lose most of its accuracy while training mode shows none of it.
    Does nothing to a model without batch-norm.
    """
    keras = _keras()
    norms = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    if not norms:
        return
    momentum = [layer.momentum for layer in norms]
    try:
        for k, start in enumerate(range(0, min(samples, len(x)), batch_size)):
            for layer in norms:
                layer.momentum = k / (k + 1)  # a running mean over the batches seen so far
            model(x[start:start + batch_size], training=True)
    finally:
        for layer, m in zip(norms, momentum):
            layer.momentum = m


def _all_layers(model: Any) -> list[Any]:
    """Return every layer of ``model``, those of nested models (a backbone used as a layer) included, once each."""
    seen: dict[int, Any] = {}
    todo = list(model.layers)
    while todo:
        layer = todo.pop(0)
        if id(layer) not in seen:
            seen[id(layer)] = layer
            todo.extend(getattr(layer, "layers", []))
    return list(seen.values())


def _prunable_kernels(model: Any) -> list[Any]:
    """Return the kernel variables :func:`magnitude_prune` prunes (see :data:`PRUNABLE`), each once."""
    kernels: dict[int, Any] = {}
    for layer in _all_layers(model):
        if type(layer).__name__ in PRUNABLE:
            for attr in KERNELS:
                var = getattr(layer, attr, None)
                if var is not None:
                    kernels.setdefault(id(var), var)
    return list(kernels.values())


def magnitude_prune(model: Any, sparsity: float, train: tuple[np.ndarray, np.ndarray] | None = None,
                    epochs: int = 3) -> Any:
    """Return a copy of ``model`` with ``sparsity`` of each prunable kernel's weights set to zero.

    Every kernel of the layers in :data:`PRUNABLE`, nested models included, the first and last
    layers too, loses exactly ``round(sparsity * size)`` of its values, the smallest in magnitude
    (ties broken by position, so weights with repeated values, as a dequantized model has, are not
    pruned beyond the share asked). Biases are kept.

    Returns:
        The pruned (and, with ``train``, fine-tuned) copy; ``model`` is unchanged.

    Raises:
        CompileError: the model has no kernel of a layer in :data:`PRUNABLE`.
    """
    pruned = _clone(model)
    masks: list[tuple[Any, np.ndarray]] = []
    kernels = _prunable_kernels(pruned)
    for kernel in kernels:
        w = np.asarray(kernel.numpy())
        k = int(round(w.size * sparsity))
        if k == 0:
            continue
        mask = np.ones(w.size, dtype=w.dtype)
        mask[np.argsort(np.abs(w).ravel(), kind="stable")[:k]] = 0
        mask = mask.reshape(w.shape)
        kernel.assign(w * mask)
        masks.append((kernel, mask))
    if not kernels:
        raise CompileError("magnitude pruning found no Conv, DepthwiseConv, SeparableConv, ConvTranspose or Dense "
                           "kernel to prune")

    def reapply() -> None:
        for kernel, mask in masks:
            kernel.assign(kernel.numpy() * mask)

    if train is not None:
        fine_tune(pruned, train, epochs, after_batch=reapply)
        reapply()
    return pruned


@dataclass(frozen=True)
class _Layout:
    """Where each channel of a tensor's last axis comes from: channel ``index[i]`` of group ``group[i]``."""

    group: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return len(self.group)

    @staticmethod
    def concat(parts: list[_Layout]) -> _Layout:
        """Return the layouts side by side (a concatenation on the channel axis)."""
        return _Layout(np.concatenate([p.group for p in parts]), np.concatenate([p.index for p in parts]))

    def repeat(self, times: int) -> _Layout:
        """Return the layout with each channel ``times`` times in a row (a depth multiplier)."""
        return _Layout(np.repeat(self.group, times), np.repeat(self.index, times))

    def tile(self, times: int) -> _Layout:
        """Return the whole layout ``times`` times over (Flatten: one copy per spatial position)."""
        return _Layout(np.tile(self.group, times), np.tile(self.index, times))


class _Groups:
    """Channel groups under union-find; each root holds its width, its producers and whether it is frozen."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._size: list[int] = []
        self._frozen: list[bool] = []
        self._producers: list[list[Any]] = []

    def new(self, size: int, frozen: bool = False, producer: Any = None) -> _Layout:
        """Return the layout of a new group of ``size`` channels."""
        g = len(self._parent)
        self._parent.append(g)
        self._size.append(size)
        self._frozen.append(frozen)
        self._producers.append([producer] if producer is not None else [])
        return _Layout(np.full(size, g), np.arange(size))

    def find(self, g: int) -> int:
        """Return the root of group ``g``."""
        while self._parent[g] != g:
            self._parent[g] = self._parent[self._parent[g]]
            g = self._parent[g]
        return g

    def roots(self, layout: _Layout) -> np.ndarray:
        """Return the root group of every channel of ``layout``."""
        unique, inverse = np.unique(layout.group, return_inverse=True)
        return np.array([self.find(int(g)) for g in unique], dtype=np.int64)[inverse.ravel()]

    def size(self, g: int) -> int:
        """Return the number of channels of group ``g``."""
        return self._size[self.find(g)]

    def producers(self, g: int) -> list[Any]:
        """Return the Conv/Dense layers whose output channels are group ``g``."""
        return self._producers[self.find(g)]

    def prunable(self, g: int) -> bool:
        """Return True when group ``g`` may lose channels: something produces it and nothing froze it."""
        r = self.find(g)
        return not self._frozen[r] and bool(self._producers[r])

    def freeze(self, layout: _Layout) -> None:
        """Keep every channel of every group in ``layout``."""
        for r in set(self.roots(layout).tolist()):
            self._frozen[r] = True

    def tie(self, layouts: list[_Layout]) -> None:
        """Make channel ``i`` of every layout one channel (one group, one index); freeze them all where
        the layouts do not line up channel for channel (different order or group widths)."""
        first = layouts[0]
        for other in layouts[1:]:
            ok = len(other) == len(first) and np.array_equal(other.index, first.index)
            if ok:
                pairs = set(zip(self.roots(first).tolist(), self.roots(other).tolist()))
                ok = all([self._union(a, b) for a, b in pairs])
            if not ok:
                for layout in layouts:
                    self.freeze(layout)
                return

    def _union(self, a: int, b: int) -> bool:
        a, b = self.find(a), self.find(b)
        if a == b:
            return True
        if self._size[a] != self._size[b]:
            return False
        self._parent[b] = a
        self._frozen[a] = self._frozen[a] or self._frozen[b]
        self._producers[a] += self._producers[b]
        return True


def _width(tensor: Any) -> int:
    """Return the size of a tensor's last axis (0 when unknown)."""
    shape = tuple(tensor.shape)
    return int(shape[-1]) if shape and shape[-1] is not None else 0


def _plain(layer: Any) -> bool:
    """Return True when ``layer`` holds exactly the weights channel pruning slices (no LoRA, no quantized kernel)."""
    kind = type(layer).__name__
    if kind == "BatchNormalization":
        expected = 2 + int(layer.center) + int(layer.scale)
    else:
        expected = 1 + int(layer.use_bias)
    return len(layer.weights) == expected


class _ChannelGraph:
    """The channel groups of a functional Keras model, and which channels each group keeps.

    Attributes:
        inputs: id(layer) -> layout of the input of each layer whose weights or config follow its
            input's width (Conv, Dense, DepthwiseConv, BatchNormalization, Reshape).
        outputs: id(layer) -> group of the output channels of each producer (Conv, Dense).
        order: the producers, in graph order.
        foreign: the layers channel pruning cannot follow, with the layouts of their inputs.
    """

    def __init__(self, model: Any) -> None:
        keras = _keras()
        self.groups = _Groups()
        self.inputs: dict[int, _Layout] = {}
        self.outputs: dict[int, int] = {}
        self.order: list[Any] = []
        self.foreign: list[tuple[Any, list[_Layout]]] = []
        self.kept: dict[int, np.ndarray] = {}
        layouts = {id(t): self.groups.new(_width(t), frozen=True) for t in model.inputs}
        nodes = model._nodes_by_depth  # the graph keras.models.clone_model walks, deepest (inputs) first
        for depth in sorted(nodes, reverse=True):
            for node in nodes[depth]:
                if node.is_input or not node.operation:
                    continue
                ins = [layouts[id(t)] for t in node.input_tensors]
                outs = self._follow(node.operation, node, ins, keras)
                if outs is None:
                    self.foreign.append((node.operation, ins))
                    outs = [self.groups.new(_width(t), frozen=True) for t in node.outputs]
                layouts.update((id(t), layout) for t, layout in zip(node.outputs, outs))
        for t in model.outputs:
            self.groups.freeze(layouts[id(t)])

    def _follow(self, op: Any, node: Any, ins: list[_Layout], keras: Any) -> list[_Layout] | None:
        """Return the layouts of ``node``'s outputs, or None when channel pruning cannot follow ``op``."""
        kind = type(op).__name__
        if (not isinstance(op, keras.layers.Layer) or getattr(op, "data_format", "channels_last") != "channels_last"
                or len(node.outputs) != 1 or not ins):
            return None
        src, dst = node.input_tensors[0], node.outputs[0]
        rank = len(src.shape)
        out: _Layout | None = None
        if kind in PRODUCERS and len(ins) == 1 and getattr(op, "groups", 1) == 1 and _plain(op):
            self._tie_input(op, ins[0])
            if id(op) not in self.outputs:
                self.outputs[id(op)] = int(self.groups.new(_width(dst), producer=op).group[0])
                self.order.append(op)
            out = _Layout(np.full(_width(dst), self.outputs[id(op)]), np.arange(_width(dst)))
        elif kind in DEPTHWISE and len(ins) == 1 and _plain(op):
            self._tie_input(op, ins[0])
            out = ins[0].repeat(op.depth_multiplier)
        elif kind == "BatchNormalization" and len(ins) == 1 and op.axis in (-1, rank - 1) and _plain(op):
            self._tie_input(op, ins[0])
            out = ins[0]
        elif kind == "Reshape" and len(ins) == 1 and _width(dst) == _width(src):
            self._tie_input(op, ins[0])  # its target shape names the width
            out = ins[0]
        elif kind in PASS_THROUGH and len(ins) == 1:
            out = ins[0]
        elif kind == "Flatten" and len(ins) == 1 and all(d is not None for d in src.shape[1:]):
            out = ins[0].tile(int(np.prod(src.shape[1:-1], dtype=np.int64)))
        elif kind in MERGES:
            # an input of width 1 against a wider output broadcasts: its channel is not tied to the others
            tied = [lay for lay, t in zip(ins, node.input_tensors) if not (_width(t) == 1 < _width(dst))]
            self.groups.tie(tied)
            out = tied[0] if tied else None
        elif kind == "Concatenate":
            if op.axis in (-1, rank - 1):
                out = _Layout.concat(ins)
            else:
                self.groups.tie(ins)
                out = ins[0]
        return [out] if out is not None and len(out) == _width(dst) else None

    def _tie_input(self, layer: Any, layout: _Layout) -> None:
        """Record the input layout of a layer that follows its input's width; a shared layer ties its inputs."""
        if id(layer) in self.inputs:
            self.groups.tie([self.inputs[id(layer)], layout])
        else:
            self.inputs[id(layer)] = layout

    def check(self) -> None:
        """Raise when a layer that cannot be followed touches channels that would be removed.

        Raises:
            CompileError: naming the first such layer, its class and the layer whose channels it uses;
                or no channel may be removed at all.
        """
        keras = _keras()
        for op, ins in self.foreign:
            for layout in ins:
                for r in sorted(set(self.groups.roots(layout).tolist())):
                    if self.groups.prunable(r):
                        what = "layer" if isinstance(op, keras.layers.Layer) else "operation"
                        kind = type(op).__name__ if what == "layer" else f"keras.ops {type(op).__name__}"
                        raise CompileError(
                            f"channel pruning cannot follow channels through {what} '{op.name}' ({kind}), "
                            f"which uses the channels of '{self.groups.producers(r)[0].name}'; "
                            "use magnitude pruning (int8-pruned-S) for this model")
        if not any(self.groups.prunable(g) for g in self.outputs.values()):
            raise CompileError("channel pruning found no Conv or Dense layer whose channels may be removed "
                               "(every one reaches the model's output or input); use magnitude pruning "
                               "(int8-pruned-S) for this model")

    def mask(self, layout: _Layout) -> np.ndarray:
        """Return which channels of ``layout`` are kept (all of a group not decided yet)."""
        roots = self.groups.roots(layout)
        keep = np.ones(len(layout), dtype=bool)
        for r in np.unique(roots).tolist():
            if r in self.kept:
                sel = roots == r
                keep[sel] = np.isin(layout.index[sel], self.kept[r])
        return keep

    def kept_of(self, g: int) -> np.ndarray:
        """Return the sorted indices group ``g`` keeps."""
        return self.kept.get(self.groups.find(g), np.arange(self.groups.size(g)))

    def choose(self, fraction: float) -> None:
        """Decide the kept channels of every group, in graph order of their first producer.

        A prunable group keeps the ``1 - fraction`` of its channels (at least one) with the largest L1
        norm summed over its producers' kernels, leaving out input channels already pruned upstream.
        """
        for layer in self.order:
            r = self.groups.find(self.outputs[id(layer)])
            if r in self.kept:
                continue
            n = self.groups.size(r)
            if not self.groups.prunable(r):
                self.kept[r] = np.arange(n)
                continue
            scores = np.zeros(n)
            for producer in self.groups.producers(r):
                kernel = np.asarray(producer.get_weights()[0])[..., self.mask(self.inputs[id(producer)]), :]
                scores += np.abs(kernel).reshape(-1, n).sum(axis=0)
            n_keep = max(1, int(round(n * (1.0 - fraction))))
            self.kept[r] = np.sort(np.argsort(-scores, kind="stable")[:n_keep])

    def config(self, layer: Any) -> dict[str, Any]:
        """Return ``layer``'s config with the widths it keeps (Conv ``filters``, Dense ``units``, Reshape's last axis)."""
        cfg = layer.get_config()
        if id(layer) in self.outputs:
            cfg["filters" if "filters" in cfg else "units"] = len(self.kept_of(self.outputs[id(layer)]))
        elif type(layer).__name__ == "Reshape" and id(layer) in self.inputs and cfg["target_shape"][-1] != -1:
            width = int(self.mask(self.inputs[id(layer)]).sum())
            cfg["target_shape"] = (*cfg["target_shape"][:-1], width)
        return cfg

    def sliced_weights(self, layer: Any) -> list[np.ndarray]:
        """Return ``layer``'s weights cut to the kept channels of its input and output."""
        w = [np.asarray(v) for v in layer.get_weights()]
        if id(layer) not in self.inputs:
            return w
        ins = np.flatnonzero(self.mask(self.inputs[id(layer)]))
        if id(layer) in self.outputs:
            out = self.kept_of(self.outputs[id(layer)])
            return [w[0][..., ins, :][..., out], *(v[out] for v in w[1:])]
        if type(layer).__name__ in DEPTHWISE:
            mult = w[0].shape[-1]
            out = (ins[:, None] * mult + np.arange(mult)[None, :]).ravel()
            return [w[0][..., ins, :], *(v[out] for v in w[1:])]
        return [v[ins] for v in w]  # BatchNormalization


def _functional(model: Any) -> Any:
    """Return a functional view of a Sequential or functional model (same layers, same weights).

    Raises:
        CompileError: a subclassed model, or one never called on a ``keras.Input``: it has no graph.
    """
    keras = _keras()
    try:
        if isinstance(model, keras.Sequential):  # its .input exists only once it has been called
            inputs, outputs = model.inputs[0], model.outputs[0]
        else:
            inputs, outputs = model.input, model.output
    except (AttributeError, ValueError, IndexError, TypeError):
        inputs = outputs = None
    if inputs is None or outputs is None:
        raise CompileError(f"channel pruning needs a Sequential or functional Keras model built on keras.Input; "
                           f"'{model.name}' has no layer graph (use magnitude pruning, int8-pruned-S)")
    return keras.Model(inputs, outputs, name=model.name)


def channel_prune(model: Any, fraction: float, train: tuple[np.ndarray, np.ndarray] | None = None,
                  epochs: int = 3) -> Any:
    """Return a smaller copy of ``model`` with ``fraction`` of the channels of every prunable group removed.

    Channels tied together (through residual adds, multiplies, a shared layer) are removed together;
    the output layer and anything tied to the model's output or input keep their width (see the
    module docstring). Conv and Dense layers are rebuilt with fewer ``filters``/``units``;
    BatchNormalization, DepthwiseConv and every consumer's input weights are sliced to match, so with
    ``fraction`` 0 the copy computes exactly what ``model`` does. With ``train`` = (x, y) the copy is
    fine-tuned for ``epochs``. ``model`` itself is not changed.

    Raises:
        CompileError: the model has no layer graph, nothing may be pruned, a layer channel pruning
            cannot follow (SeparableConv2D, Lambda, a Reshape moving the channel axis...) touches
            channels that would be removed, or a layer cannot be re-created from its config; the
            message names the layer and its class.
    """
    keras = _keras()
    source = _functional(model)
    graph = _ChannelGraph(source)
    graph.check()
    graph.choose(fraction)
    foreign = {id(op) for op, _ in graph.foreign}
    made: dict[int, Any] = {}

    def clone(op: Any) -> Any:
        if id(op) not in made:
            if not isinstance(op, keras.layers.Layer) or (id(op) in foreign and not op.weights):
                made[id(op)] = op  # stateless: shared as is (a Lambda may not survive get_config)
            else:
                try:
                    made[id(op)] = type(op).from_config(graph.config(op))
                except (TypeError, ValueError, KeyError, NotImplementedError) as exc:
                    raise CompileError(f"channel pruning cannot rebuild layer '{op.name}' ({type(op).__name__}) "
                                       f"from its config: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                                       "use magnitude pruning (int8-pruned-S) for this model") from None
        return made[id(op)]

    rebuilt = keras.models.clone_model(source, clone_function=clone)
    for layer in source.layers:
        new = made.get(id(layer))
        if new is not None and new is not layer and layer.weights:
            new.set_weights(graph.sliced_weights(layer))
    pruned = keras.Model(rebuilt.input, rebuilt.output, name=f"{model.name}_chpruned")
    if train is not None:
        fine_tune(pruned, train, epochs)
    return pruned
