"""Every way Keras code sets a learning rate reaches every loss's optimizer
(issue: `model.optimizer.learning_rate.assign(x)` used to reach only loss 0's
optimizer, while `model.optimizer.learning_rate` read `x`)."""

import os

import keras
import numpy as np
import pytest

from conftest import compiled_mlp
from conftest import mlp_data

from keras_mwbp import MultiWayModel

pytestmark = [
    pytest.mark.backends("tensorflow", "jax", "torch"),
    pytest.mark.oldest_keras(),
]


def _weights(model):
    return [keras.ops.convert_to_numpy(v).copy()
            for v in model.trainable_variables]


def _largest_change(before, model):
    return max(float(np.abs(a - b).max())
               for a, b in zip(before, _weights(model)))


OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "sgd_momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(0.01),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("how", ["assign", "attribute"])
def test_a_zero_rate_set_on_model_optimizer_freezes_every_loss(name, how):
    model = compiled_mlp("mwbp", optimizer=OPTIMIZERS[name]())
    if how == "assign":
        model.optimizer.learning_rate.assign(0.0)
    else:
        model.optimizer.learning_rate = 0.0
    before = _weights(model)
    x, y = mlp_data(16)
    # The first step: momentum and Adam moments start from zero, so only
    # the rate decides whether a weight moves.
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert _largest_change(before, model) == 0.0
    # The rate still trains once it is set again.
    model.optimizer.learning_rate.assign(0.1)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert _largest_change(before, model) > 1e-3


def test_learning_rate_scheduler_reaches_every_loss():
    model = compiled_mlp("mwbp")
    before = _weights(model)
    x, y = mlp_data(16)
    scheduler = keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.0)
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0,
                        callbacks=[scheduler])
    assert _largest_change(before, model) == 0.0
    assert history.history["learning_rate"] == [0.0, 0.0]


class _Weights(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.per_epoch = []

    def on_epoch_end(self, epoch, logs=None):
        self.per_epoch.append(_weights(self.model))


def test_reduce_lr_on_plateau_reaches_every_loss():
    # (Plain SGD: with momentum a zero rate still moves the weights.)
    model = compiled_mlp("mwbp", optimizer=keras.optimizers.SGD(0.1))
    x, y = mlp_data(16)
    # No epoch counts as an improvement after the first: the rate drops to
    # 0 at the end of epoch 2, so epoch 3 changes nothing.
    plateau = keras.callbacks.ReduceLROnPlateau(
        monitor="loss", factor=0.0, patience=0, min_delta=1e9, min_lr=0.0
    )
    weights = _Weights()
    model.fit(x, y, batch_size=8, epochs=3, verbose=0,
              callbacks=[plateau, weights])
    second, third = weights.per_epoch[1], weights.per_epoch[2]
    assert max(float(np.abs(a - b).max()) for a, b in zip(
        weights.per_epoch[0], second)) > 1e-4
    assert max(float(np.abs(a - b).max()) for a, b in zip(
        second, third)) == 0.0


def test_a_schedule_set_on_model_optimizer_reaches_every_loss():
    model = compiled_mlp("mwbp", optimizer=keras.optimizers.SGD(0.1))
    x, y = mlp_data(16)
    # Rate 0.1 for the first step, 0 from the second on.
    model.optimizer.learning_rate = (
        keras.optimizers.schedules.PiecewiseConstantDecay([0], [0.1, 0.0])
    )
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    before = _weights(model)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert _largest_change(before, model) == 0.0
    # A number cannot be set on a schedule, as in Keras.
    with pytest.raises(TypeError, match="not settable"):
        model.optimizer.learning_rate = 0.5


def test_the_set_rate_is_saved_and_restored(tmp_path):
    model = compiled_mlp("mwbp", optimizer=keras.optimizers.SGD(0.1))
    model.train_on_batch(*mlp_data(8))
    model.optimizer.learning_rate.assign(0.0125)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, MultiWayModel)
    assert float(loaded.optimizer.learning_rate) == pytest.approx(0.0125)
    # And the loaded model's every loss trains at that rate: at 0, not at
    # all.
    loaded.optimizer.learning_rate.assign(0.0)
    before = _weights(loaded)
    loaded.fit(*mlp_data(16), batch_size=16, epochs=1, verbose=0)
    assert _largest_change(before, loaded) == 0.0


def test_a_state_saved_by_keras_mwbp_0_1_0_still_loads():
    """0.1.0 saved one rate variable per inner optimizer and none in the
    container: [step, (inner step, inner rate, slots...) per loss]."""
    model = compiled_mlp("mwbp")
    model.train_on_batch(*mlp_data(8))
    model.optimizer.learning_rate.assign(0.03)
    store = {}
    model.optimizer.save_own_variables(store)
    values = [store[str(i)] for i in range(len(store))]
    old, index = [values[0]], 2
    for inner in model.optimizer.loss_optimizers:
        slots = len(inner.variables) - 1
        old += [values[index], np.float32(0.03)]
        old += values[index + 1:index + 1 + slots]
        index += 1 + slots
    assert len(old) == len(values) + model.optimizer.num_losses - 1
    fresh = compiled_mlp("mwbp", seed=1)
    fresh.optimizer.load_own_variables({str(i): v for i, v in enumerate(old)})
    for saved, variable in zip(values, fresh.optimizer.variables):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(variable), saved, err_msg=variable.path
        )
