"""Child process of `test_resume.py`: trains a small MultiWayModel on digits
and may SIGKILL itself at a given training step (or while writing a backup).

Usage: python _resume_child.py JOBS
  JOBS: a JSON list of runs [METHOD, MODE, WORKDIR, KILL_AT, OUT], done in
  turn in this process (each after `keras.backend.clear_session()`, from a
  model built anew); only the last may be killed.
  MODE: none (no backup), ours (keras_mwbp BackupAndRestore, every 3
  batches), ours_epoch, keras_bar (keras.callbacks.BackupAndRestore, per
  epoch), keras_bar_steps (the same, every 3 batches), checkpoint
  (keras_mwbp ModelCheckpoint .keras files + load_model +
  initial_epoch), ours_kill_in_save (KILL_AT counts backups: dies half way
  through writing that one).
  KILL_AT: optimizer step after which to SIGKILL (-1: never).
  OUT: .npz written at the end with every model, optimizer variable and the
  History.
"""

import glob
import io
import json
import os
import signal
import sys

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.experimental.enable_op_determinism()
tf.config.threading.set_inter_op_parallelism_threads(1)
tf.config.threading.set_intra_op_parallelism_threads(1)

import keras  # noqa: E402

import keras_mwbp  # noqa: E402
from keras_mwbp.callbacks import backup_and_restore  # noqa: E402
from keras_mwbp.data import load_digits  # noqa: E402

EPOCHS = 4
BATCH = 32


def build(method):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    x = keras.layers.Dense(24, name="d1")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.Dropout(0.2, name="drop")(x)
    aux0 = keras.layers.Dense(10, name="aux0")(x)
    x = keras.layers.Dense(24, activation="relu", name="d2")(x)
    aux1 = keras.layers.Dense(10, name="aux1")(x)
    x = keras.layers.Dense(24, activation="relu", name="d3")(x)
    final = keras.layers.Dense(10, name="final")(x)
    model = keras_mwbp.MultiWayModel(
        inputs, [aux0, aux1, final], method=method, nu=2.0, shuffle_seed=7
    )
    steps = EPOCHS * 8
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [steps // 2, 3 * steps // 4], [0.01, 0.003, 0.001]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


class Killer(keras.callbacks.Callback):
    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_in_save(at):
    """Dies half way through writing backup number `at` (1-based)."""
    real = np.savez
    count = [0]

    def savez(f, **arrays):
        count[0] += 1
        if count[0] != at:
            return real(f, **arrays)
        buffer = io.BytesIO()
        real(buffer, **arrays)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    backup_and_restore.np.savez = savez


def run(method, mode, workdir, kill_at, out):
    kill_at = int(kill_at)
    (x, y), _ = load_digits()
    x, y = x[:256].reshape(256, -1), y[:256]
    model = build(method)
    # nu follows the paper's Adaptive-I schedule (it changes when the
    # learning rate drops), so nu and the loss weights are state too.
    callbacks = [keras_mwbp.callbacks.AdaptiveNu("I")]
    initial_epoch = 0
    backup_dir = os.path.join(workdir, "backup")
    if mode in ("ours", "ours_kill_in_save"):
        callbacks.append(keras_mwbp.callbacks.BackupAndRestore(
            backup_dir, save_freq=3,
            delete_checkpoint=mode == "ours",  # kept to inspect
        ))
    elif mode == "ours_epoch":
        callbacks.append(keras_mwbp.callbacks.BackupAndRestore(backup_dir))
    elif mode == "keras_bar":
        callbacks.append(keras.callbacks.BackupAndRestore(backup_dir))
    elif mode == "keras_bar_steps":
        callbacks.append(keras.callbacks.BackupAndRestore(
            backup_dir, save_freq=3))
    elif mode == "checkpoint":
        files = sorted(glob.glob(os.path.join(workdir, "ckpt-*.keras")))
        if files:
            model = keras.saving.load_model(files[-1])
            initial_epoch = int(files[-1][-8:-6])
        callbacks.append(keras_mwbp.callbacks.ModelCheckpoint(
            os.path.join(workdir, "ckpt-{epoch:02d}.keras")))
    if mode == "ours_kill_in_save":
        if kill_at > 0:
            kill_in_save(kill_at)
    elif kill_at >= 0:
        callbacks.append(Killer(kill_at))
    history = model.fit(
        x, y, batch_size=BATCH, epochs=EPOCHS, callbacks=callbacks,
        initial_epoch=initial_epoch, verbose=0,
    )
    arrays = {
        f"model/{i}": keras.ops.convert_to_numpy(v)
        for i, v in enumerate(model.variables)
    }
    arrays.update({
        f"optimizer/{i}": keras.ops.convert_to_numpy(v)
        for i, v in enumerate(model.optimizer.variables)
    })
    arrays["history"] = np.array(json.dumps(
        {k: [float(v) for v in vs] for k, vs in history.history.items()}))
    arrays["history_epochs"] = np.array(history.epoch)
    np.savez(out, **arrays)


def main():
    jobs = json.loads(sys.argv[1])
    for job in jobs:
        keras.backend.clear_session()
        run(*job)


if __name__ == "__main__":
    main()
