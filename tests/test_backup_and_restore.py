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

# The whole file on TensorFlow and torch; on JAX, the step-exact resume and
# the checks that touch the model (the rest is backend-neutral file logic).
pytestmark = pytest.mark.backends("tensorflow", "torch")
ALL_BACKENDS = pytest.mark.backends("tensorflow", "jax", "torch")


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


@ALL_BACKENDS
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


@ALL_BACKENDS
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


@pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="torch's unseeded Dropout draws from the global random state "
    "(which backups save), not from its seed state",
)
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


# ------------------------------------------------- what defines the position
def _crash_with_backup(backup_dir, batch_size=8, x=None, y=None, method="mwbp",
                       at=3):
    """Trains until optimizer step `at` with a backup after every batch, then
    stops as a crash would; returns the backup's meta."""
    if x is None:
        x, y = _data()
    model = _model(method=method)
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, batch_size=batch_size, epochs=3, verbose=0, callbacks=[
            BackupAndRestore(backup_dir, save_freq=1), _StopAt(at)])
    with np.load(os.path.join(backup_dir, BACKUP_FILE)) as backup:
        return json.loads(str(backup["__meta__"]))


@ALL_BACKENDS
def test_backup_records_what_defines_the_position(tmp_path):
    meta = _crash_with_backup(str(tmp_path / "b"))
    assert meta["position"] == {
        "method": "mwbp", "samples": 40, "batch_size": 8,
        "steps_per_epoch": 5, "shuffle_seed": 3,
    }


@pytest.mark.parametrize("change, field, before, after", [
    ({"batch_size": 4}, "batch_size", "8", "4"),  # smaller: after an OOM
    ({"batch_size": 16}, "batch_size", "8", "16"),  # larger
    ({"samples": 48}, "samples", "40", "48"),  # more
    ({"samples": 24}, "samples", "40", "24"),  # fewer
    ({"method": "reverse_mwbp"}, "method", "'mwbp'", "'reverse_mwbp'"),
    ({"method": "naive_mwbp"}, "method", "'mwbp'", "'naive_mwbp'"),
    ({"shuffle_seed": 4}, "shuffle_seed", "3", "4"),
    ({"validation_split": 0.25}, "samples", "40", "30"),
])
def test_resume_with_another_position_is_refused_before_any_change(
    tmp_path, change, field, before, after
):
    backup_dir = str(tmp_path / "backup")
    _crash_with_backup(backup_dir)
    backup_file = os.path.join(backup_dir, BACKUP_FILE)
    saved = open(backup_file, "rb").read()
    x, y = _data()
    rng = np.random.default_rng(1)
    if "samples" in change:
        n = change["samples"]
        x = np.concatenate([x, rng.normal(size=(8, 5)).astype("float32")])[:n]
        y = np.concatenate([y, rng.integers(0, 3, 8)])[:n]
    model = _model(method=change.get("method", "mwbp"))
    if "shuffle_seed" in change:
        model.shuffle_seed = change["shuffle_seed"]
    before_state = _state(model)
    batches = []
    with pytest.raises(ValueError) as error:
        model.fit(
            x, y, batch_size=change.get("batch_size", 8), epochs=3, verbose=0,
            validation_split=change.get("validation_split", 0.0),
            callbacks=[BackupAndRestore(backup_dir), keras.callbacks.LambdaCallback(
                on_train_batch_end=lambda batch, logs: batches.append(batch))])
    message = str(error.value)
    assert f"made with {field}={before}, this fit has {field}={after}" in message
    assert backup_file in message
    assert f"delete {backup_dir!r} or pass another backup_dir" in message
    assert batches == []
    for got, want in zip(_state(model), before_state):
        np.testing.assert_array_equal(got, want)
    assert open(backup_file, "rb").read() == saved  # Kept as it was.


def test_dataset_of_unknown_size_records_the_steps_per_epoch(tmp_path):
    import tensorflow as tf

    x, y = _data()
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    backup_dir = str(tmp_path / "backup")
    model = _model()
    with pytest.raises(KeyboardInterrupt):
        model.fit(data, steps_per_epoch=5, epochs=3, verbose=0, callbacks=[
            BackupAndRestore(backup_dir, save_freq=1), _StopAt(3)])
    with np.load(os.path.join(backup_dir, BACKUP_FILE)) as backup:
        position = json.loads(str(backup["__meta__"]))["position"]
    assert position == {"method": "mwbp", "samples": None, "batch_size": None,
                        "steps_per_epoch": 5, "shuffle_seed": None}
    with pytest.raises(ValueError, match="made with steps_per_epoch=5, this "
                                         "fit has steps_per_epoch=4"):
        _model().fit(data, steps_per_epoch=4, epochs=3, verbose=0,
                     callbacks=[BackupAndRestore(backup_dir)])
    # The same setup resumes.
    _model().fit(data, steps_per_epoch=5, epochs=3, verbose=0,
                 callbacks=[BackupAndRestore(backup_dir)])


@ALL_BACKENDS
def test_rerun_after_the_last_backup_restores_state_and_history(tmp_path):
    x, y = _data()
    backup_dir = str(tmp_path / "backup")
    model = _model()
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[
        BackupAndRestore(backup_dir, delete_checkpoint=False)]).history
    again = _model()
    rerun = again.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[
        BackupAndRestore(backup_dir, delete_checkpoint=False)])
    assert rerun.epoch == [0, 1]
    for key in history:
        np.testing.assert_allclose(rerun.history[key], history[key], rtol=1e-6)
    for got, want in zip(_state(again), _state(model)):
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------- damaged backups
def _flip(data):
    """Inverts 8 bytes in the middle of the largest array's stored data
    (which the zip's CRC then catches; a byte of padding or of a header
    field that nothing reads would go unnoticed, so not anywhere)."""
    import io
    import struct
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = max(archive.infolist(), key=lambda i: i.compress_size)
    name_length, extra_length = struct.unpack(
        "<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length
    middle = start + info.compress_size // 2
    data = bytearray(data)
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    return bytes(data)


@pytest.mark.parametrize("damage, error", [
    (_flip, "BadZipFile"),
    (lambda data: data[: len(data) // 2], "BadZipFile"),
    (lambda data: data[:40], ""),  # Too short for a zip: read as .npy
    (None, "KeyError"),  # A zip of arrays without the backup's record.
])
def test_damaged_backup_error_names_the_file(tmp_path, damage, error):
    backup_dir = str(tmp_path / "backup")
    _crash_with_backup(backup_dir)
    path = os.path.join(backup_dir, BACKUP_FILE)
    if damage is None:
        np.savez(path, weights=np.zeros(3))
    else:
        data = open(path, "rb").read()
        open(path, "wb").write(damage(data))
    model = _model()
    before = _state(model)
    x, y = _data()
    with pytest.raises(ValueError) as info:
        model.fit(x, y, batch_size=8, epochs=3, verbose=0,
                  callbacks=[BackupAndRestore(backup_dir)])
    message = str(info.value)
    assert message.startswith(f"The backup file {path!r} is damaged or not a "
                              "keras_mwbp backup ("), message
    assert error in message
    assert f"Delete it, or the folder {backup_dir!r}, to start over" in message
    for got, want in zip(_state(model), before):
        np.testing.assert_array_equal(got, want)


# ------------------------------------- folders checked when training begins
def _unusable_dirs(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    return {
        "file": (str(blocker), "is a file, not a directory"),
        "under_file": (str(blocker / "sub"), "which is a file"),
        # Root writes anywhere but on a read-only file system such as /sys.
        "read_only": ("/sys/keras_mwbp_test", "is not writable"),
    }


class _CountBatches(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1


@pytest.mark.parametrize("kind", ["file", "under_file", "read_only"])
def test_unusable_backup_dir_fails_when_training_begins(tmp_path, kind):
    path, message = _unusable_dirs(tmp_path)[kind]
    count = _CountBatches()
    x, y = _data()
    with pytest.raises(OSError, match=f"`backup_dir` '{path}'.*{message}"):
        _model().fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[
            BackupAndRestore(path, save_freq=1000), count])
    assert count.batches == 0


@pytest.mark.parametrize("kind", ["file", "under_file", "read_only"])
def test_unusable_checkpoint_folder_fails_when_training_begins(tmp_path, kind):
    from keras_mwbp.callbacks import ModelCheckpoint

    folder, message = _unusable_dirs(tmp_path)[kind]
    count = _CountBatches()
    x, y = _data()
    with pytest.raises(OSError, match=f"ModelCheckpoint's filepath '{folder}'"
                                      f".*{message}"):
        _model().fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[
            ModelCheckpoint(os.path.join(folder, "m.keras")), count])
    assert count.batches == 0


def test_checkpoint_onto_a_directory_fails_when_training_begins(tmp_path):
    from keras_mwbp.callbacks import ModelCheckpoint

    (tmp_path / "m.keras").mkdir()
    count = _CountBatches()
    x, y = _data()
    with pytest.raises(IsADirectoryError, match="is an existing directory"):
        _model().fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[
            ModelCheckpoint(str(tmp_path / "m.keras")), count])
    assert count.batches == 0


@ALL_BACKENDS
def test_request_stop_backs_up_the_batch_and_resumes_exactly(tmp_path):
    x, y = _data()
    reference = _model()
    reference.fit(x, y, batch_size=8, epochs=3, verbose=0)
    backup_dir = str(tmp_path / "backup")
    backup = BackupAndRestore(backup_dir)  # Backs up at epoch ends only.
    stop = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: (
        backup.request_stop() if b == 1 else None))
    with pytest.raises(KeyboardInterrupt):
        _model().fit(x, y, batch_size=8, epochs=3, verbose=0,
                     callbacks=[backup, stop])
    assert backup.saved_position == (0, 3)  # The batch after the request.
    resumed = _model()
    resumed.fit(x, y, batch_size=8, epochs=3, verbose=0,
                callbacks=[BackupAndRestore(backup_dir)])
    for got, want in zip(_state(resumed), _state(reference)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_resume_at_an_epoch_boundary_equals_uninterrupted_run(tmp_path):
    """A backup written between epochs (save_freq="epoch") resumes at the
    next epoch with the uninterrupted run's dropout masks: on torch the
    backup holds the global random state, which the next epoch's data
    iterator and the unseeded Dropout draw from."""
    x, y = _data()
    reference = _model()
    reference.fit(x, y, batch_size=8, epochs=3, verbose=0)
    backup_dir = str(tmp_path / "backup")
    crashed = _model()
    with pytest.raises(KeyboardInterrupt):
        crashed.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[
            BackupAndRestore(backup_dir), _StopAt(7)])
    with np.load(os.path.join(backup_dir, BACKUP_FILE)) as backup:
        meta = json.loads(str(backup["__meta__"]))
        names = set(backup.files)
    assert (meta["epoch"], meta["step"]) == (1, 0)
    if keras.backend.backend() == "torch":
        assert meta["random"] >= 1 and "random/0" in names
    else:
        assert meta["random"] == 0
    resumed = _model()
    resumed.fit(x, y, batch_size=8, epochs=3, verbose=0,
                callbacks=[BackupAndRestore(backup_dir)])
    for got, want in zip(_state(resumed), _state(reference)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
