"""The torch backend's step: re-calls replay the shared forward's dropout
mask (Keras's torch Dropout without a seed draws it from torch's global
random generator)."""

import keras
import numpy as np
import pytest

from conftest import torch_only
from keras_mwbp import MultiWayModel
from keras_mwbp.algorithm import Objective

pytestmark = [torch_only, pytest.mark.oldest_keras("torch")]


def _dropout_model(method="mwbp"):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    h = keras.layers.Dense(8, name="d1")(inputs)
    d = keras.layers.Dropout(0.5, name="drop")(h)
    aux = keras.layers.Dense(2, name="aux")(d)
    final = keras.layers.Dense(2, name="final")(
        keras.layers.Dense(4, name="d2")(d))
    model = MultiWayModel(inputs, [aux, final], method=method)
    model.compile(
        "sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _batch():
    rng = np.random.default_rng(0)
    return rng.normal(size=(6, 5)).astype("float32"), np.array([0, 1] * 3)


def test_gradients_use_the_forward_mask():
    """Joint gradients by node re-calls equal autograd through one forward
    pass from the same random state (same mask)."""
    import torch

    from keras_mwbp.backend import torch as backend

    model = _dropout_model()
    x, y = _batch()
    step = backend.TorchStep(model._head_graph)
    state = backend._rng_state()
    outputs = step.forward(model, x)
    step.losses(model._head_losses, y, outputs, None)
    grads = step.gradients(
        Objective(None, ((0, 1.0), (1, 0.5))), model.trainable_variables)
    with backend._replayed_rng(state):
        pred = model(x, training=True)
        loss = (model._head_losses[0](y, pred[0])
                + 0.5 * model._head_losses[1](y, pred[1]))
        expected = torch.autograd.grad(
            loss, [v.value for v in model.trainable_variables])
    for got, want in zip(grads, expected):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_new_forward_pass_replays_the_mask():
    from keras_mwbp.backend import torch as backend

    model = _dropout_model()
    x, _ = _batch()
    step = backend.TorchStep(model._head_graph)
    first = step.forward(model, x)
    again = step.fresh().forward(model, x)
    other = backend.TorchStep(model._head_graph).forward(model, x)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not all(np.array_equal(a.numpy(), b.numpy())
                   for a, b in zip(first, other))


@pytest.mark.parametrize("method", ["mwbp", "naive_mwbp", "joint"])
def test_fit_with_dropout_trains(method):
    model = _dropout_model(method)
    x, y = _batch()
    history = model.fit(x, y, batch_size=3, epochs=2, verbose=0).history
    assert np.isfinite(history["loss"]).all()


def test_optimizers_are_saved_by_their_backend_neutral_class():
    """On torch, `keras.optimizers.AdamW()` is Keras's torch subclass; the
    compile config and the per-loss container name the class that every
    backend has (as TensorFlow does), and building it on torch gives the
    torch class again."""
    from keras_mwbp import MultiWayOptimizer

    model = _dropout_model()
    model.compile(keras.optimizers.AdamW(0.01, weight_decay=0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert type(model.optimizer.template).__module__.startswith(
        "keras.src.backend.torch")
    configs = [model.get_compile_config()["optimizer"],
               model.optimizer.get_config()["optimizer"]]
    for config in configs:
        assert (config["module"], config["class_name"]) == (
            "keras.optimizers", "AdamW")
        assert config["registered_name"] is None
        assert config["config"]["weight_decay"] == 0.1
    rebuilt = MultiWayOptimizer.from_config(model.optimizer.get_config())
    assert type(rebuilt.template) is type(model.optimizer.template)
    assert rebuilt.num_losses == 2
