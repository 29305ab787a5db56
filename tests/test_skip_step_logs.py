"""`nan_policy="skip_step"`: an epoch whose every step was skipped saw no
sample, so its metrics read NaN, not 0, and Keras's callbacks do not take
it for an improvement (issue: `ModelCheckpoint(save_best_only=True)` saved a
diverged model as the best, "loss improved from 6.0e22 to 0.00000")."""

import math
import os

import keras
import numpy as np
import pytest

from conftest import compiled_mlp
from conftest import mlp_data

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")


class _DivergesAfterEpoch0(keras.utils.PyDataset):
    """Two batches an epoch; from epoch 1 on (set by `Epoch`) every input
    is NaN."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y, self.epoch = x, y, 0

    def __len__(self):
        return 2

    def __getitem__(self, index):
        x = self.x[index * 8:(index + 1) * 8]
        if self.epoch > 0:
            x = np.full_like(x, np.nan)
        return x, self.y[index * 8:(index + 1) * 8]


class _Epoch(keras.callbacks.Callback):
    def __init__(self, data):
        super().__init__()
        self.data = data

    def on_epoch_begin(self, epoch, logs=None):
        self.data.epoch = epoch


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_an_all_skipped_epoch_logs_nan_and_is_no_improvement(
        tmp_path, run_eagerly):
    model = compiled_mlp("mwbp", nan_policy="skip_step")
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True),
                  metrics=["accuracy"], run_eagerly=run_eagerly)
    x, y = mlp_data(16)
    path = os.path.join(tmp_path, "best.keras")
    saved = []

    class SavedAt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            saved.append(os.stat(path).st_mtime_ns)

    checkpoint = keras.callbacks.ModelCheckpoint(
        path, monitor="loss", save_best_only=True)
    stopping = keras.callbacks.EarlyStopping(monitor="loss", patience=5)
    data = _DivergesAfterEpoch0(x, y)
    history = model.fit(
        data, epochs=3, verbose=0,
        callbacks=[_Epoch(data), checkpoint, stopping, SavedAt()]).history
    assert history["skipped_steps"] == [0.0, 2.0, 2.0]
    best_loss = history["loss"][0]
    assert math.isfinite(best_loss)
    for name, values in history.items():
        if name in ("skipped_steps", "nu") or name.startswith("gamma_"):
            continue
        assert math.isfinite(values[0]), (name, values)
        assert all(math.isnan(v) for v in values[1:]), (name, values)
    # NaN is no improvement: the best model stays, EarlyStopping waits.
    assert checkpoint.best == best_loss
    assert saved[1] == saved[0] and saved[2] == saved[0]
    assert stopping.wait == 2


def test_a_partly_skipped_epoch_logs_the_trained_steps_only():
    model = compiled_mlp("mwbp", nan_policy="skip_step")
    twin = compiled_mlp("mwbp", nan_policy="skip_step")
    x, y = mlp_data(16)
    bad = x.copy()
    bad[8:] = np.nan
    # shuffle=False: batch 0 is good, batch 1 all NaN.
    logs = model.fit(bad, y, batch_size=8, epochs=1, verbose=0,
                     shuffle=False).history
    reference = twin.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0,
                         shuffle=False).history
    assert logs["skipped_steps"] == [1.0]
    np.testing.assert_allclose(logs["loss"], reference["loss"], rtol=1e-6)
