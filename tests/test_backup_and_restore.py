"""`keras_mwbp.callbacks.BackupAndRestore` in one process: arguments, what a
backup holds, refusing a backup of another model, and a resume in the middle
of an epoch (the SIGKILL tests are in `test_resume.py`)."""

import json
import os

import keras
import numpy as np
import pytest

import keras_mwbp
from keras_mwbp.callbacks import BackupAndRestore
from keras_mwbp.callbacks.backup_and_restore import BACKUP_FILE


def _model(width=6, method="mwbp"):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    x = keras.layers.Dense(width, activation="relu", name="d1")(inputs)
    x = keras.layers.Dropout(0.25, name="drop")(x)
    aux = keras.layers.Dense(3, name="aux")(x)
    x = keras.layers.Dense(width, activation="relu", name="d2")(x)
    final = keras.layers.Dense(3, name="final")(x)
    model = keras_mwbp.MultiWayModel(
        inputs, [aux, final], method=method, shuffle_seed=3
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(40, 5)).astype("float32"), rng.integers(0, 3, 40)


class _StopAt(keras.callbacks.Callback):
    """Stops training abruptly (an exception, as a crash would) after
    optimizer step `at`."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.at:
            raise KeyboardInterrupt


def _state(model):
    return [keras.ops.convert_to_numpy(v) for v in
            list(model.variables) + list(model.optimizer.variables)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backup_dir": ""}, "`backup_dir` must be a non-empty path. "
                             "Received: backup_dir=''"),
        ({"backup_dir": None}, "Received: backup_dir=None"),
        ({"backup_dir": "d", "save_freq": 0},
         "`save_freq` must be 'epoch' or a positive integer. "
         "Received: save_freq=0"),
        ({"backup_dir": "d", "save_freq": "batch"}, "Received: save_freq='batch'"),
        ({"backup_dir": "d", "save_freq": True}, "Received: save_freq=True"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        BackupAndRestore(**kwargs)


def test_plain_keras_model_is_refused(tmp_path):
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    model.compile("sgd", "mse")
    x, _ = _data()
    with pytest.raises(ValueError, match="Received: model of type Functional"):
        model.fit(x, np.zeros((40, 3)), epochs=1, verbose=0,
                  callbacks=[BackupAndRestore(str(tmp_path))])


def test_resume_mid_epoch_equals_uninterrupted_run(tmp_path):
    x, y = _data()
    reference = _model()
    reference_history = reference.fit(
        x, y, batch_size=8, epochs=3, verbose=0).history

    backup_dir = str(tmp_path / "backup")
    crashed = _model()
    with pytest.raises(KeyboardInterrupt):
        crashed.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[
            BackupAndRestore(backup_dir, save_freq=2), _StopAt(8)])
    with np.load(os.path.join(backup_dir, BACKUP_FILE)) as backup:
        meta = json.loads(str(backup["__meta__"]))
    # 5 batches per epoch; the last backup was after step 8: epoch 1, 3 done.
    assert (meta["epoch"], meta["step"]) == (1, 3)

    resumed = _model()  # A new model, as in a new process.
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append(batch))
    history = resumed.fit(
        x, y, batch_size=8, epochs=3, verbose=0,
        callbacks=[BackupAndRestore(backup_dir, save_freq=2), record])
    for got, want in zip(_state(resumed), _state(reference)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # Callbacks see every batch of the resumed epoch (the 3 skipped ones
    # with the backup's logs), numbered as in the uninterrupted run.
    assert seen == [0, 1, 2, 3, 4] * 2
    # The epoch's logs include the batches trained before the crash.
    for key in ("loss", "aux_accuracy", "final_loss"):
        np.testing.assert_allclose(
            history.history[key], reference_history[key], rtol=1e-6)
    assert history.epoch == [0, 1, 2]
    assert not os.path.exists(backup_dir)  # delete_checkpoint=True


def test_backup_of_another_model_is_refused_before_any_change(tmp_path):
    x, y = _data()
    backup_dir = str(tmp_path / "backup")
    model = _model()
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[
            BackupAndRestore(backup_dir, save_freq=1), _StopAt(2)])
    other = _model(width=7)
    before = _state(other)
    with pytest.raises(ValueError, match="does not match this model"):
        other.fit(x, y, batch_size=8, epochs=2, verbose=0,
                  callbacks=[BackupAndRestore(backup_dir)])
    for got, want in zip(_state(other), before):
        np.testing.assert_array_equal(got, want)
    assert os.path.exists(os.path.join(backup_dir, BACKUP_FILE))


def test_seed_states_are_saved_in_keras_files(tmp_path):
    """Keras's weight files leave out the Dropout seed state; a
    MultiWayModel's keep it, so a resumed run draws the same masks."""
    x, y = _data()
    model = _model()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    seeds = [keras.ops.convert_to_numpy(v) for v in model._seed_states()]
    assert seeds and any(s[1] != 0 for s in seeds)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    for got, want in zip(loaded._seed_states(), seeds):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(got), want)
