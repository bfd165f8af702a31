"""Structured channel pruning across residual adds, concatenations and gates, on small Keras models."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import keras  # noqa: E402 - the host extra's TensorFlow brings it: missing, these tests fail, never skip

layers = keras.layers

from edge_kit.compiler.pruning import _ChannelGraph, _functional, channel_prune  # noqa: E402
from edge_kit.errors import CompileError  # noqa: E402


def _randomize_batchnorm(model) -> None:
    """Give every BatchNormalization non-trivial statistics, so slicing them wrongly would show."""
    rng = np.random.default_rng(7)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.2, n), rng.normal(0, 0.2, n),
                               rng.uniform(0.5, 1.5, n)])


def resnet_block(norm: bool = True):
    """Stem conv, then Conv-BN-ReLU, Conv-BN, Add with the shortcut, ReLU; pooled into a classifier."""
    keras.utils.set_random_seed(0)
    bn = layers.BatchNormalization if norm else (lambda: layers.Identity())
    inp = keras.Input((12, 12, 3))
    x = layers.ReLU()(bn()(layers.Conv2D(16, 3, padding="same", name="stem")(inp)))
    y = layers.ReLU()(bn()(layers.Conv2D(16, 3, padding="same", name="conv_a")(x)))
    y = bn()(layers.Conv2D(16, 3, padding="same", name="conv_b")(y))
    x = layers.ReLU()(layers.Add(name="add")([x, y]))
    out = layers.Dense(10, name="head")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inp, out, name="resnet_block")


def inverted_residual(norm: bool = True):
    """MobileNetV2 block: 1x1 expand, depthwise 3x3, 1x1 project (linear), Add with the block input."""
    keras.utils.set_random_seed(1)
    bn = layers.BatchNormalization if norm else (lambda: layers.Identity())
    inp = keras.Input((12, 12, 3))
    x = bn()(layers.Conv2D(16, 3, strides=2, padding="same", name="stem")(inp))
    y = layers.ReLU(6.0)(bn()(layers.Conv2D(64, 1, name="expand")(x)))
    y = layers.ReLU(6.0)(bn()(layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(y)))
    y = bn()(layers.Conv2D(16, 1, name="project")(y))
    x = layers.Add(name="add")([x, y])
    x = layers.ReLU(6.0)(bn()(layers.Conv2D(32, 1, name="last")(x)))
    out = layers.Dense(10, name="head")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inp, out, name="inverted_residual")


def inception(norm: bool = True):
    """A stem, three branches (1x1, 3x3, max-pool) concatenated, a 1x1 conv, then a Flatten + Dense head."""
    keras.utils.set_random_seed(2)
    bn = layers.BatchNormalization if norm else (lambda: layers.Identity())
    inp = keras.Input((8, 8, 3))
    x = layers.ReLU()(bn()(layers.Conv2D(8, 3, padding="same", name="stem")(inp)))
    b1 = layers.ReLU()(layers.Conv2D(8, 1, name="b1")(x))
    b2 = layers.ReLU()(bn()(layers.Conv2D(12, 3, padding="same", name="b2")(x)))
    b3 = layers.MaxPooling2D(3, strides=1, padding="same")(x)
    x = layers.Concatenate(name="concat")([b1, b2, b3])
    x = layers.ReLU()(layers.Conv2D(16, 1, name="mix")(x))
    x = layers.Flatten()(layers.MaxPooling2D(2)(x))
    out = layers.Dense(10, name="head")(layers.Dense(32, activation="relu", name="hidden")(x))
    return keras.Model(inp, out, name="inception")


def squeeze_excite(norm: bool = True):
    """Conv, then a squeeze-excitation gate (pool, Dense down, Dense up, sigmoid) multiplied back in."""
    keras.utils.set_random_seed(3)
    bn = layers.BatchNormalization if norm else (lambda: layers.Identity())
    inp = keras.Input((10, 10, 3))
    x = layers.ReLU()(bn()(layers.Conv2D(16, 3, padding="same", name="conv")(inp)))
    s = layers.GlobalAveragePooling2D()(x)
    s = layers.Dense(8, activation="relu", name="se_down")(s)
    s = layers.Reshape((1, 1, 16))(layers.Dense(16, activation="sigmoid", name="se_up")(s))
    x = layers.Multiply(name="gate")([x, s])
    x = layers.ReLU()(layers.Conv2D(24, 3, padding="same", name="conv2")(x))
    out = layers.Dense(10, name="head")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inp, out, name="squeeze_excite")


BUILDERS = [resnet_block, inverted_residual, inception, squeeze_excite]
# the width each named layer keeps at fraction 0.5 (the head always keeps its 10 outputs)
HALVED = {
    "resnet_block": {"stem": 8, "conv_a": 8, "conv_b": 8, "head": 10},
    "inverted_residual": {"stem": 8, "expand": 32, "project": 8, "last": 16, "head": 10},
    "inception": {"stem": 4, "b1": 4, "b2": 6, "concat": 14, "mix": 8, "hidden": 16, "head": 10},
    "squeeze_excite": {"conv": 8, "se_down": 4, "se_up": 8, "conv2": 12, "head": 10},
}


def _inputs(model, n: int = 3) -> np.ndarray:
    return np.random.default_rng(5).uniform(size=(n, *model.inputs[0].shape[1:])).astype(np.float32)


@pytest.mark.parametrize("build", BUILDERS, ids=lambda b: b.__name__)
def test_fraction_zero_reproduces_the_original_outputs(build):
    model = build()
    _randomize_batchnorm(model)
    same = channel_prune(model, 0.0)
    x = _inputs(model)
    assert same.count_params() == model.count_params()
    np.testing.assert_allclose(np.asarray(same(x)), np.asarray(model(x)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("build", BUILDERS, ids=lambda b: b.__name__)
def test_half_pruning_narrows_every_group_and_runs(build):
    model = build()
    pruned = channel_prune(model, 0.5)
    widths = {layer.name: int(layer.output.shape[-1]) for layer in pruned.layers}
    assert {name: widths[name] for name in HALVED[model.name]} == HALVED[model.name]
    assert pruned.count_params() < 0.5 * model.count_params()
    y = np.asarray(pruned(_inputs(model)))
    assert y.shape == (3, 10) and np.isfinite(y).all()
    assert model.get_layer("head").kernel.shape[-1] == 10  # the original is left alone


def _assert_pruned_equals_silenced(model, fraction: float = 0.5) -> None:
    """Zeroing the removed output channels of every producer in the original must give the pruned
    model's outputs (without batch-norm, and with zero biases after them): then every consumer was
    sliced at the right indices."""
    pruned = channel_prune(model, fraction)
    graph = _ChannelGraph(_functional(model))
    graph.choose(fraction)
    masked = keras.models.clone_model(model)
    masked.set_weights(model.get_weights())
    for layer in graph.order:
        drop = np.setdiff1d(np.arange(layer.kernel.shape[-1]), graph.kept_of(graph.outputs[id(layer)]))
        w = masked.get_layer(layer.name).get_weights()
        for v in w:
            v[..., drop] = 0
        masked.get_layer(layer.name).set_weights(w)
    x = _inputs(model)
    np.testing.assert_allclose(np.asarray(pruned(x)), np.asarray(masked(x)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("build", BUILDERS, ids=lambda b: b.__name__)
def test_the_pruned_model_is_the_original_with_the_removed_channels_silenced(build):
    _assert_pruned_equals_silenced(build(norm=False))


def test_an_add_prunes_both_branches_with_one_index_set_ranked_by_their_summed_norms():
    inp = keras.Input((4, 4, 2))
    a = layers.Conv2D(4, 1, name="a")(inp)
    b = layers.Conv2D(4, 1, name="b")(a)
    out = layers.Dense(2, name="head")(layers.GlobalAveragePooling2D()(layers.Add()([a, b])))
    model = keras.Model(inp, out)
    ka = np.zeros((1, 1, 2, 4), np.float32)
    ka[0, 0, 0] = [1.0, 5.0, 2.0, 0.5]  # alone, a would keep channels 1 and 2
    kb = np.zeros((1, 1, 4, 4), np.float32)
    kb[0, 0, 0] = [4.0, 0.1, 2.0, 3.0]  # alone, b would keep channels 0 and 3
    model.get_layer("a").set_weights([ka, np.arange(4, dtype=np.float32)])
    model.get_layer("b").set_weights([kb, np.arange(4, dtype=np.float32) + 10])
    pruned = channel_prune(model, 0.5)
    kept = [0, 1]  # summed norms 5, 5.1, 4, 3.5
    a2, b2, head = (pruned.get_layer(n).get_weights() for n in ("a", "b", "head"))
    np.testing.assert_array_equal(a2[0], ka[..., kept])
    np.testing.assert_array_equal(a2[1], np.float32(kept))
    np.testing.assert_array_equal(b2[0], kb[:, :, kept][..., kept])
    np.testing.assert_array_equal(b2[1], np.float32(kept) + 10)
    np.testing.assert_array_equal(head[0], model.get_layer("head").get_weights()[0][kept])


def test_groups_tied_to_the_model_input_or_output_keep_their_width():
    inp = keras.Input((8, 8, 4))
    y = layers.Conv2D(4, 3, padding="same", name="tied_to_input")(inp)
    y = layers.Flatten()(layers.Add()([inp, y]))
    y = layers.Dense(16, name="hidden")(y)
    out = layers.Add()([layers.Dense(2, name="out_a")(y), layers.Dense(2, name="out_b")(y)])
    pruned = channel_prune(keras.Model(inp, out), 0.5)
    widths = {layer.name: int(layer.output.shape[-1]) for layer in pruned.layers}
    assert (widths["tied_to_input"], widths["hidden"], widths["out_a"], widths["out_b"]) == (4, 8, 2, 2)

    x = layers.Conv2D(4, 3, padding="same")(inp)
    with pytest.raises(CompileError, match="no Conv or Dense layer whose channels may be removed"):
        channel_prune(keras.Model(inp, layers.Add()([inp, x])), 0.5)


def test_a_depth_multiplier_is_followed_alone_and_frozen_when_tied_to_a_plain_tensor():
    inp = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, padding="same", name="c1")(inp)
    d = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(x)
    y = layers.Conv2D(16, 1, name="c2")(x)
    z = layers.Add()([d, y])  # depthwise output order (channel, copy) cannot be matched to c2's channels
    w = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw_free")(
        layers.Conv2D(6, 1, name="c3")(z))
    out = layers.Dense(3, name="head")(layers.GlobalAveragePooling2D()(w))
    model = keras.Model(inp, out)
    pruned = channel_prune(model, 0.5)
    widths = {layer.name: int(layer.output.shape[-1]) for layer in pruned.layers}
    assert (widths["c1"], widths["c2"], widths["c3"], widths["dw_free"]) == (8, 16, 3, 6)
    _assert_pruned_equals_silenced(model)


def test_a_shared_layer_ties_the_channels_of_both_its_inputs():
    inp = keras.Input((6, 6, 3))
    shared = layers.Conv2D(8, 3, padding="same", name="shared")
    a = shared(layers.Conv2D(8, 1, name="a")(inp))
    b = shared(layers.Conv2D(8, 1, name="b")(inp))
    out = layers.Dense(2, name="head")(layers.GlobalAveragePooling2D()(layers.Concatenate()([a, b])))
    model = keras.Model(inp, out)
    pruned = channel_prune(model, 0.5)
    assert [int(pruned.get_layer(n).output.shape[-1]) for n in ("a", "b", "shared")] == [4, 4, 4]
    _assert_pruned_equals_silenced(model)


def _with_inside(make_layer):
    inp = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, padding="same", name="conv")(inp)
    x = make_layer()(x)
    return keras.Model(inp, layers.Dense(2, name="head")(layers.GlobalAveragePooling2D()(x)))


@pytest.mark.parametrize(("make_layer", "name", "kind"), [
    (lambda: layers.SeparableConv2D(8, 3, padding="same", name="sep"), "sep", "SeparableConv2D"),
    (lambda: layers.Lambda(lambda t: t * 2.0, name="double"), "double", "Lambda"),
    (lambda: layers.Conv2DTranspose(8, 3, padding="same", name="up"), "up", "Conv2DTranspose"),
    (lambda: layers.Reshape((8, 16, 4), name="regroup"), "regroup", "Reshape"),
], ids=["separable", "lambda", "transpose", "reshape"])
def test_a_layer_that_cannot_be_followed_inside_a_pruned_group_is_refused_by_name(make_layer, name, kind):
    with pytest.raises(CompileError, match=rf"layer '{name}' \({kind}\), which uses the channels of 'conv'.*int8-pruned-S"):
        channel_prune(_with_inside(make_layer), 0.5)


def test_any_layer_may_stand_where_no_channel_is_pruned():
    inp = keras.Input((8, 8, 3))
    x = layers.Lambda(lambda t: t * 2.0, name="scale")(inp)  # on the model input: never pruned
    x = layers.SeparableConv2D(8, 3, padding="same", name="sep")(x)  # reads the input, writes a group of its own
    x = layers.Conv2D(8, 3, padding="same", name="conv")(x)
    x = layers.Add()([x, layers.Lambda(lambda t: t + 1.0, name="shift")(x)])  # ties conv to a Lambda: frozen
    y = layers.Dense(6, name="hidden")(layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, layers.Dense(2, name="head")(y))
    pruned = channel_prune(model, 0.5)
    assert [int(pruned.get_layer(n).output.shape[-1]) for n in ("sep", "conv", "hidden")] == [8, 8, 3]


def test_keras_mobilenet_v2_prunes_to_about_half_the_parameters():
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3), alpha=0.35, classes=10)
    pruned = channel_prune(model, 0.5)
    assert pruned.count_params() <= 0.55 * model.count_params()
    assert pruned.get_layer("predictions").output.shape[-1] == 10
    x = _inputs(model, 2)
    assert np.asarray(pruned(x)).shape == (2, 10)
    np.testing.assert_allclose(np.asarray(channel_prune(model, 0.0)(x)), np.asarray(model(x)), atol=1e-5, rtol=0)


def test_fine_tuning_leaves_batchnorm_statistics_measured_on_the_training_data():
    from edge_kit.compiler.pruning import recalibrate_batchnorm

    inp = keras.Input((4, 4, 3))
    model = keras.Model(inp, layers.BatchNormalization(name="bn")(inp))
    x = np.random.default_rng(0).normal([1.0, -2.0, 3.0], [0.5, 1.0, 2.0], size=(256, 4, 4, 3)).astype(np.float32)
    recalibrate_batchnorm(model, x, batch_size=64)
    bn = model.get_layer("bn")
    batches = x.reshape(4, 64 * 16, 3)
    np.testing.assert_allclose(bn.moving_mean.numpy(), batches.mean(axis=1).mean(axis=0), atol=1e-4)
    np.testing.assert_allclose(bn.moving_variance.numpy(), batches.var(axis=1).mean(axis=0), rtol=1e-3)
    assert bn.momentum == 0.99


def test_a_raw_keras_op_inside_a_pruned_group_is_refused_as_an_operation():
    inp = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, padding="same", name="conv")(inp)
    x = keras.ops.relu(x)
    model = keras.Model(inp, layers.Dense(2)(layers.GlobalAveragePooling2D()(x)))
    with pytest.raises(CompileError, match=r"operation 'relu' \(keras.ops Relu\)"):
        channel_prune(model, 0.5)


def _zero_share(model) -> float:
    from edge_kit.compiler.pruning import _prunable_kernels

    ws = [np.asarray(k.numpy()) for k in _prunable_kernels(model)]
    return sum(int(np.sum(w == 0)) for w in ws) / sum(w.size for w in ws)


def test_magnitude_pruning_reaches_kernels_inside_a_nested_backbone():
    """A backbone used as a layer (Sequential([base, head])) was skipped: '50 %' pruned only the head."""
    from edge_kit.compiler.pruning import _prunable_kernels, magnitude_prune

    keras.utils.set_random_seed(0)
    inp = keras.Input((12, 12, 3))
    x = layers.DepthwiseConv2D(3, padding="same")(layers.Conv2D(16, 3, padding="same")(inp))
    x = layers.SeparableConv2D(16, 3, padding="same")(x)
    base = keras.Model(inp, layers.GlobalAveragePooling2D()(x), name="base")
    model = keras.Sequential([keras.Input((12, 12, 3)), base, layers.Dense(10)])
    pruned = magnitude_prune(model, 0.5)
    assert _zero_share(pruned) == pytest.approx(0.5, abs=0.01)
    shares = [float(np.mean(np.asarray(k.numpy()) == 0)) for k in _prunable_kernels(pruned)]
    assert len(shares) == 5 and all(s == pytest.approx(0.5, abs=0.02) for s in shares)  # conv, dw, sep x2, dense
    assert _zero_share(model) == 0.0  # the source model is left as it was


def test_magnitude_pruning_zeroes_exactly_the_share_asked_when_weights_repeat():
    """Weights with repeated values (a dequantized or constant-initialised model) were pruned past the
    threshold's ties: '50 %' of an all-equal kernel zeroed all of it."""
    from edge_kit.compiler.pruning import magnitude_prune

    model = keras.Sequential([keras.Input((8,)), layers.Dense(6, kernel_initializer="ones"),
                              layers.Dense(4, kernel_initializer=keras.initializers.Constant(0.25))])
    pruned = magnitude_prune(model, 0.5)
    assert [float(np.mean(np.asarray(layer.kernel.numpy()) == 0)) for layer in pruned.layers] == [0.5, 0.5]
