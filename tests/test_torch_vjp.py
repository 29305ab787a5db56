"""The torch backend's hand-written VJPs (keras_mwbp/backend/torch_vjp.py):
each equals autograd through the Keras layer's own call, and a layer whose
call a rule does not reproduce gets no rule (it is re-called)."""

import keras
import numpy as np
import pytest

from conftest import torch_only

pytestmark = [torch_only, pytest.mark.oldest_keras("torch")]


def _node(layer, shapes):
    """`layer` called on inputs of `shapes` (without the batch axis) in a
    functional graph; returns the layer's node."""
    inputs = [keras.Input(shape) for shape in shapes]
    layer(inputs if len(inputs) > 1 else inputs[0])
    return layer._inbound_nodes[-1]


def _autograd(layer, xs, ct):
    """Gradients of <ct, layer(xs)> for the inputs and the trainable
    variables, by torch autograd through the layer's own call."""
    import torch

    leaves = [torch.tensor(x, requires_grad=True) for x in xs]
    out = layer(leaves if len(leaves) > 1 else leaves[0], training=True)
    params = [v.value for v in layer.trainable_variables]
    grads = torch.autograd.grad(out, leaves + params, torch.tensor(ct))
    return grads[:len(xs)], grads[len(xs):]


def _rule_grads(layer, node, xs, ct, needs=None):
    import torch

    from keras_mwbp.backend import torch_vjp

    rule = torch_vjp.vjp_rule(node, training=True)
    assert rule is not None, f"no rule for {layer.__class__.__name__}"
    params = {id(v): v.value.detach() for v in layer.trainable_variables}
    result = rule([torch.tensor(x) for x in xs], params, torch.tensor(ct),
                  needs or [True] * len(xs))
    assert result is not None
    input_grads, param_grads = result
    return input_grads, [param_grads[id(v)] for v in
                         layer.trainable_variables]


CASES = {
    "conv2d_same": (lambda: keras.layers.Conv2D(4, 3, padding="same"),
                    [(8, 8, 3)]),
    "conv2d_same_stride2_even": (
        lambda: keras.layers.Conv2D(4, 3, strides=2, padding="same"),
        [(8, 8, 3)]),
    "conv2d_same_stride2_odd": (
        lambda: keras.layers.Conv2D(4, 3, strides=2, padding="same",
                                    use_bias=False), [(7, 9, 3)]),
    "conv2d_same_even_kernel": (
        lambda: keras.layers.Conv2D(4, 2, padding="same"), [(6, 6, 2)]),
    "conv2d_valid_dilated": (
        lambda: keras.layers.Conv2D(3, 3, dilation_rate=2), [(9, 9, 2)]),
    "conv2d_groups": (
        lambda: keras.layers.Conv2D(4, 3, padding="same", groups=2),
        [(6, 6, 4)]),
    "conv2d_1x1_stride2": (
        lambda: keras.layers.Conv2D(32, 1, strides=2, use_bias=False),
        [(8, 8, 16)]),
    "conv2d_channels_first": (
        lambda: keras.layers.Conv2D(4, 3, strides=2, padding="same",
                                    data_format="channels_first"),
        [(3, 8, 8)]),
    "conv1d_causal_dilated": (
        lambda: keras.layers.Conv1D(4, 3, padding="causal",
                                    dilation_rate=2), [(10, 3)]),
    "conv1d_same_stride3": (
        lambda: keras.layers.Conv1D(4, 4, strides=3, padding="same"),
        [(11, 2)]),
    "conv3d_same_stride2": (
        lambda: keras.layers.Conv3D(2, 3, strides=2, padding="same"),
        [(4, 5, 4, 2)]),
    "dense_rank3": (lambda: keras.layers.Dense(3), [(4, 5)]),
    "dense_no_bias": (lambda: keras.layers.Dense(3, use_bias=False), [(5,)]),
    "batch_norm": (lambda: keras.layers.BatchNormalization(epsilon=1e-5),
                   [(4, 4, 3)]),
    "batch_norm_axis1_no_center": (
        lambda: keras.layers.BatchNormalization(axis=1, center=False),
        [(3, 4, 4)]),
    "batch_norm_no_scale_2d": (
        lambda: keras.layers.BatchNormalization(scale=False), [(6,)]),
    "relu": (lambda: keras.layers.ReLU(), [(4, 4, 3)]),
    "activation_relu": (lambda: keras.layers.Activation("relu"), [(7,)]),
    "activation_linear": (lambda: keras.layers.Activation("linear"),
                          [(7,)]),
    "identity": (lambda: keras.layers.Identity(), [(3, 2)]),
    "add": (lambda: keras.layers.Add(), [(4, 3), (4, 3), (4, 3)]),
    "global_average_2d": (lambda: keras.layers.GlobalAveragePooling2D(),
                          [(4, 5, 3)]),
    "global_average_1d_channels_first_keepdims": (
        lambda: keras.layers.GlobalAveragePooling1D(
            data_format="channels_first", keepdims=True), [(3, 6)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rule_equals_autograd_through_the_layer(case):
    make, shapes = CASES[case]
    keras.utils.set_random_seed(1)
    layer = make()
    node = _node(layer, shapes)
    rng = np.random.default_rng(0)
    # Moved parameters, as after an earlier loss's update.
    for v in layer.trainable_variables:
        v.assign(rng.normal(size=v.shape).astype("float32"))
    xs = [rng.normal(size=(3,) + s).astype("float32") for s in shapes]
    out_shape = layer.compute_output_shape(
        [(3,) + s for s in shapes] if len(shapes) > 1 else (3,) + shapes[0])
    ct = rng.normal(size=out_shape).astype("float32")
    want_inputs, want_params = _autograd(layer, xs, ct)
    got_inputs, got_params = _rule_grads(layer, node, xs, ct)
    assert len(got_params) == len(want_params) == len(
        layer.trainable_variables)
    for got, want in zip(list(got_inputs) + got_params,
                         list(want_inputs) + list(want_params)):
        assert tuple(got.shape) == tuple(want.shape)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=2e-5,
                                   atol=2e-5)


def test_strided_pointwise_conv_where_torch_channels_last_is_wrong():
    """A 1x1 stride-2 conv from 3 to 5 channels on 8x8: torch 2.13's CPU
    convolution_backward gives a wrong kernel gradient in channels-last
    layout (which Keras's torch conv uses; uxlfoundation/oneDNN#6035); the
    rule equals a float64 conv in torch's standard layout."""
    import torch

    keras.utils.set_random_seed(1)
    layer = keras.layers.Conv2D(5, 1, strides=2, use_bias=False)
    node = _node(layer, [(8, 8, 3)])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 8, 8, 3)).astype("float32")
    ct = rng.normal(size=(3, 4, 4, 5)).astype("float32")
    x64 = torch.tensor(x, dtype=torch.float64).permute(0, 3, 1, 2)
    x64.requires_grad_()
    w64 = torch.tensor(layer.kernel.numpy(), dtype=torch.float64)
    w64.requires_grad_()
    out = torch.nn.functional.conv2d(x64, w64.permute(3, 2, 0, 1), stride=2)
    want_x, want_w = torch.autograd.grad(
        out, [x64, w64], torch.tensor(ct, dtype=torch.float64).permute(
            0, 3, 1, 2))
    (got_x,), (got_w,) = _rule_grads(layer, node, [x], ct)
    np.testing.assert_allclose(got_w.numpy(), want_w.numpy(), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(got_x.numpy(), want_x.permute(
        0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)


def test_batch_norm_statistics_follow_the_input():
    """The rule caches each step's batch statistics by input; a new input
    (the next step) gets its own."""
    layer = keras.layers.BatchNormalization()
    node = _node(layer, [(5,)])
    rng = np.random.default_rng(0)
    ct = rng.normal(size=(8, 5)).astype("float32")
    from keras_mwbp.backend import torch_vjp

    rule = torch_vjp.vjp_rule(node, training=True)
    import torch

    params = {id(v): v.value.detach() for v in layer.trainable_variables}
    for scale in (1.0, 3.0):
        x = (scale * rng.normal(size=(8, 5)) + scale).astype("float32")
        (got,), _ = rule([torch.tensor(x)], params, torch.tensor(ct), [True])
        (want,), _ = _autograd(layer, [x], ct)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=2e-5,
                                   atol=2e-5)


class _ScaledConv(keras.layers.Conv2D):
    def call(self, inputs):
        return 2.0 * super().call(inputs)


NO_RULE = {
    "fused_activation": (
        lambda: keras.layers.Conv2D(2, 3, activation="relu"), [(5, 5, 1)]),
    "subclass_with_own_call": (lambda: _ScaledConv(2, 3), [(5, 5, 1)]),
    "depthwise": (lambda: keras.layers.DepthwiseConv2D(3), [(5, 5, 2)]),
    "mixed_precision_dense": (
        lambda: keras.layers.Dense(2, dtype="mixed_float16"), [(3,)]),
    "float64_dense": (lambda: keras.layers.Dense(2, dtype="float64"),
                      [(3,)]),
    "frozen_batch_norm": (
        lambda: keras.layers.BatchNormalization(trainable=False), [(3,)]),
    "relu6": (lambda: keras.layers.ReLU(max_value=6.0), [(3,)]),
    "leaky_activation": (lambda: keras.layers.Activation("gelu"), [(3,)]),
    "dropout": (lambda: keras.layers.Dropout(0.5), [(3,)]),
}


@pytest.mark.parametrize("case", sorted(NO_RULE))
def test_layers_a_rule_does_not_reproduce_are_recalled(case):
    from keras_mwbp.backend import torch_vjp

    make, shapes = NO_RULE[case]
    node = _node(make(), shapes)
    assert torch_vjp.vjp_rule(node, training=True) is None


def test_no_rule_outside_training_mode_or_for_broadcasting_add():
    import torch

    from keras_mwbp.backend import torch_vjp

    node = _node(keras.layers.Dense(2), [(3,)])
    assert torch_vjp.vjp_rule(node, training=False) is None
    add = torch_vjp.vjp_rule(_node(keras.layers.Add(), [(1,), (4,)]), True)
    assert add([torch.ones(2, 1), torch.ones(2, 4)], {}, torch.ones(2, 4),
               [True, True]) is None
