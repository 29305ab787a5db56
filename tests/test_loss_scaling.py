"""Dynamic loss scaling of every loss's backward pass: automatic under
`mixed_float16`, or from an explicit `keras.optimizers.LossScaleOptimizer`
(issue: the step ran without scaling, and an explicit LossScaleOptimizer
failed with `KeyError: 'inner_optimizer'`)."""

import os

import keras
import numpy as np
import pytest

from conftest import copy_weights
from conftest import mlp_data

from keras_mwbp import MultiWayModel

pytestmark = [
    pytest.mark.backends("tensorflow", "jax", "torch"),
    pytest.mark.oldest_keras(),
]

L = keras.layers
# The loss scaling itself runs on TensorFlow; on JAX compile refuses it
# (test_jax_refuses_loss_scaling_before_any_change).
TENSORFLOW_ONLY = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="dynamic loss scaling is TensorFlow-only so far",
)


def _net(method, seed=0, regularized=False):
    keras.utils.set_random_seed(seed)
    reg = keras.regularizers.L2(0.01) if regularized else None
    inputs = keras.Input((6,), name="x")
    a1 = L.Dense(4, activation="relu", name="d1", kernel_regularizer=reg)(
        inputs)
    h0 = L.Dense(3, name="h0")(a1)
    a2 = L.Dense(4, activation="relu", name="d2")(a1)
    final = L.Dense(3, name="final", kernel_regularizer=reg)(a2)
    return MultiWayModel(inputs, [h0, final], method=method)


def tiny_loss(y_true, y_pred):
    """Cross-entropy times 1e-8: its gradient at the float16 logits is
    below float16's smallest subnormal (6e-8) and underflows to 0."""
    return 1e-8 * keras.losses.sparse_categorical_crossentropy(
        y_true, y_pred, from_logits=True)


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _kernels(model):
    return {layer.name: keras.ops.convert_to_numpy(layer.kernel).copy()
            for layer in model.layers if hasattr(layer, "kernel")}


@TENSORFLOW_ONLY
@pytest.mark.parametrize("method", ["mwbp", "joint"])
def test_mixed_float16_scales_losses_so_tiny_gradients_train(
        mixed_float16, method):
    x, y = mlp_data(16)
    scaled, unscaled = _net(method), _net(method)
    scaled.compile(optimizer=keras.optimizers.SGD(1e7), loss=tiny_loss)
    unscaled.compile(optimizer=keras.optimizers.SGD(1e7), loss=tiny_loss,
                     auto_scale_loss=False)
    assert scaled.optimizer.loss_scale == {
        "initial_scale": 2.0**15, "dynamic_growth_steps": 2000}
    assert unscaled.optimizer.loss_scale is None
    before = _kernels(scaled)
    scaled.train_on_batch(x, y)
    unscaled.train_on_batch(x, y)
    # Without scaling every float16 gradient underflowed: nothing moved.
    for name, kernel in _kernels(unscaled).items():
        np.testing.assert_array_equal(kernel, before[name], err_msg=name)
    # With it, the step equals a float32 step (float16 round-off).
    keras.mixed_precision.set_global_policy("float32")
    reference = _net(method)
    copy_weights(scaled, reference)
    copy_weights(_net(method), reference)  # The initial weights again.
    reference.compile(optimizer=keras.optimizers.SGD(1e7), loss=tiny_loss)
    reference.train_on_batch(x, y)
    moved = 0.0
    for name, kernel in _kernels(scaled).items():
        expected = _kernels(reference)[name]
        moved = max(moved, float(np.abs(expected - before[name]).max()))
        np.testing.assert_allclose(kernel, expected, rtol=2e-2, atol=1e-3,
                                   err_msg=name)
    assert moved > 1e-2


@pytest.mark.parametrize(
    "method", ["mwbp", "reverse_mwbp", "naive_mwbp", "joint", "relay"])
@TENSORFLOW_ONLY
def test_an_explicit_loss_scale_optimizer_gives_the_unscaled_updates(method):
    """A power-of-two scale is exact in float32: the scaled step equals the
    plain one to round-off (regularizers included)."""
    x, y = mlp_data(16)
    plain, scaled = _net(method, regularized=True), _net(
        method, regularized=True)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    plain.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=loss)
    scaled.compile(
        optimizer=keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.1, momentum=0.9), initial_scale=1024.0),
        loss=loss)
    assert scaled.optimizer.loss_scale["initial_scale"] == 1024.0
    for _ in range(3):
        plain.train_on_batch(x, y)
        scaled.train_on_batch(x, y)
    for a, b in zip(plain.trainable_variables, scaled.trainable_variables):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(b), keras.ops.convert_to_numpy(a),
            rtol=1e-5, atol=1e-7, err_msg=a.path)


def huge_loss(y_true, y_pred):
    """Cross-entropy times 1e30: finite, but not times a scale of 2**40."""
    return 1e30 * keras.losses.sparse_categorical_crossentropy(
        y_true, y_pred, from_logits=True)


@TENSORFLOW_ONLY
def test_an_overflowing_loss_skips_that_update_and_halves_its_scale():
    x, y = mlp_data(16)
    model = _net("mwbp")
    model.compile(
        optimizer=keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(1e-32), initial_scale=2.0**40),
        loss=huge_loss)
    before = _kernels(model)
    model.train_on_batch(x, y)
    # Every scaled loss overflowed float32: no weight moved, every loss's
    # scale was halved, the step still counts and nan_policy="raise" did not
    # stop (loss scaling owns the gradients' overflow).
    for name, kernel in _kernels(model).items():
        np.testing.assert_array_equal(kernel, before[name], err_msg=name)
    scales = [float(s) for s in model.optimizer.loss_scales()]
    assert scales == [2.0**39, 2.0**39]
    assert int(model.optimizer.iterations) == 1
    # At a scale that fits, the same loss trains.
    for inner in model.optimizer.loss_optimizers:
        inner.dynamic_scale.assign(1.0)
    model.train_on_batch(x, y)
    assert any(np.abs(kernel - before[name]).max() > 0
               for name, kernel in _kernels(model).items())


@TENSORFLOW_ONLY
def test_the_loss_scales_are_saved_with_the_model(tmp_path, mixed_float16):
    x, y = mlp_data(16)
    model = _net("mwbp")
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    model.train_on_batch(x, y)
    inner = model.optimizer.loss_optimizers
    inner[0].dynamic_scale.assign(256.0)
    inner[1].dynamic_scale.assign(64.0)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [float(s) for s in loaded.optimizer.loss_scales()] == [256.0, 64.0]
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


@TENSORFLOW_ONLY
def test_mixed_bfloat16_gets_no_scaling():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = _net("mwbp")
        model.compile(optimizer="sgd", loss=tiny_loss)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.optimizer.loss_scale is None
    assert model.optimizer.loss_scales() is None


@pytest.mark.skipif(
    keras.backend.backend() not in ("jax", "torch"),
    reason="compile refuses loss scaling on JAX and torch")
def test_jax_refuses_loss_scaling_before_any_change(mixed_float16):
    """(Torch too.)"""
    model = _net("mwbp")
    backend = keras.backend.backend()
    with pytest.raises(ValueError, match=(
            r"Dynamic loss scaling .* is supported on the TensorFlow backend "
            rf"only so far\. Received: KERAS_BACKEND='{backend}', dtype policy "
            r"'mixed_float16'.*auto_scale_loss=False")):
        model.compile(optimizer="sgd", loss=keras.losses.
                      SparseCategoricalCrossentropy(from_logits=True))
    assert not model.compiled
    explicit = _net("mwbp")
    keras.mixed_precision.set_global_policy("float32")
    with pytest.raises(ValueError, match="TensorFlow backend only"):
        explicit.compile(
            optimizer=keras.optimizers.LossScaleOptimizer(
                keras.optimizers.SGD()),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    keras.mixed_precision.set_global_policy("mixed_float16")
    model.compile(optimizer="sgd", auto_scale_loss=False, loss=keras.losses.
                  SparseCategoricalCrossentropy(from_logits=True))
    logs = model.train_on_batch(*mlp_data(16), return_dict=True)
    assert np.isfinite(logs["loss"])
