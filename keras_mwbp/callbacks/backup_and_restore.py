"""Step-exact backup and resume of an interrupted `MultiWayModel.fit`."""

import json
import math
import os
import shutil
import zipfile
import zlib

import keras
import numpy as np

from keras_mwbp import _compat
from keras_mwbp import backend
from keras_mwbp.resume import resume_in_epoch
from keras_mwbp.saving import atomic_path
from keras_mwbp.saving import check_writable_dir

BACKUP_FILE = "backup.npz"
_META = "__meta__"
# The backend's global random state (torch's; see `random_state` in
# `keras_mwbp/backend/<name>.py`), saved beside the variables.
_RANDOM = "random"
# What defines a position in the training: the same (epoch, batch) means the
# same samples only if none of these changed. `None` where not known (the
# number of samples of a dataset; the steps of one of unknown length).
POSITION_FIELDS = (
    "method", "samples", "batch_size", "steps_per_epoch", "shuffle_seed",
)
# What reading a damaged or foreign `.npz` raises.
_READ_ERRORS = (
    OSError, EOFError, KeyError, ValueError, TypeError, zipfile.BadZipFile,
    zlib.error,
)


@keras.saving.register_keras_serializable(package="keras_mwbp")
class BackupAndRestore(keras.callbacks.Callback):
    """Backs up training every `save_freq` and resumes at the exact step.

    Like `keras.callbacks.BackupAndRestore`, but a run restarted after a
    crash continues from the batch after the last backup instead of the
    start of the interrupted epoch, and ends with the same result as a run
    that was never interrupted:

    - Saved: every variable of the model (weights, BatchNorm statistics,
      dropout seed states, `nu` and the loss weights), every variable of
      the optimizer (each loss's optimizer state and step counter, hence
      the learning-rate schedule's position), the metrics' running totals,
      the epoch, the number of batches done in it, the `History` so far,
      and on torch the global random state (Keras's torch `Dropout` without
      a seed draws its masks from it; it is put back before the first
      trained batch).
    - Resume: `fit` starts at the saved epoch; the batches of that epoch that
      were already trained are drawn from the data and skipped (not
      trained), so the data order is kept. For in-memory arrays
      `MultiWayModel.fit` makes the order of every epoch a function of the
      model's `shuffle_seed` and the epoch number, so it is the same in the
      new process. A `tf.data.Dataset` resumes exactly if it yields the same
      batches in each epoch of a new process (no shuffle, or a shuffle with
      `reshuffle_each_iteration=False`); a dataset that reshuffles every
      iteration restarts its shuffle sequence, so later batches come in
      another order (the state is still restored exactly).
    - Atomic: the backup is one file, written beside its final name and
      renamed over it when complete; a crash while writing leaves the
      previous backup intact.
    - With deterministic ops (`tf.config.experimental.enable_op_determinism`)
      the resumed run is bit-for-bit the uninterrupted one.
    - Checked: a backup records what defines its position, the model's
      `method`, the number of training samples, the batch size, the steps
      per epoch and the data-order seed (`model.shuffle_seed`); the number
      of samples and the batch size are known for in-memory arrays, the
      steps per epoch for any data of known length. A resume whose `fit`
      differs in any of them (say, a smaller batch size after running out
      of memory) would train other samples than the uninterrupted run, and
      is refused with a `ValueError` naming the field and both values,
      before any variable changes. So is a backup of a model whose variables
      differ, and a damaged backup file (the error names the file). To
      start over, delete `backup_dir` or pass another one.
    - `backup_dir` is checked when training begins: a path that is a file,
      or a folder where no file can be written, fails then, not at the
      first backup.

    Several workers (TensorFlow's `MultiWorkerMirroredStrategy`): give
    every worker the same `backup_dir` on a shared file system. Each worker
    restores from the backup and runs the callback, but only the chief
    writes and deletes it. When a worker fails, restart all of them (as
    TensorFlow's fault-tolerance guide describes): they resume from the
    chief's last backup at the same step.

    Keras's own `keras.callbacks.BackupAndRestore` keeps working with a
    `MultiWayModel` at epoch granularity (`save_freq="epoch"`); with a step
    `save_freq` it restarts the interrupted epoch from its first batch on
    mid-epoch weights, which trains some batches twice.

    Callbacks see the skipped batches' `on_train_batch_begin/end` with the
    logs of the backup, so batch numbers match the uninterrupted run.
    Callbacks with their own state (e.g. `ReduceLROnPlateau`'s patience)
    restart it. A rerun after the last epoch's backup trains nothing and
    ends with the saved state and `History`.

    `request_stop()` (for a signal handler, as `keras-mwbp train` has for
    Ctrl-C) makes training stop at the end of the running batch, after a
    backup of exactly that position: `fit` then raises `KeyboardInterrupt`
    and the backup is kept.

    Args:
        backup_dir: Folder for the backup file (created if needed).
        save_freq: `"epoch"` (after every epoch) or a positive integer: back
            up every `save_freq` trained batches.
        delete_checkpoint: Whether to delete the backup when training ends.

    Example:

    ```python
    backup = keras_mwbp.callbacks.BackupAndRestore("/tmp/run", save_freq=50)
    model.fit(x, y, epochs=400, callbacks=[backup])  # rerun after a crash
    ```
    """

    def __init__(self, backup_dir, save_freq="epoch", delete_checkpoint=True):
        super().__init__()
        if not isinstance(backup_dir, (str, os.PathLike)) or not str(
            backup_dir
        ):
            raise ValueError(
                "`backup_dir` must be a non-empty path. "
                f"Received: backup_dir={backup_dir!r}"
            )
        if save_freq != "epoch" and (
            isinstance(save_freq, bool)
            or not isinstance(save_freq, int)
            or save_freq < 1
        ):
            raise ValueError(
                "`save_freq` must be 'epoch' or a positive integer. "
                f"Received: save_freq={save_freq!r}"
            )
        self.backup_dir = os.fspath(backup_dir)
        self.save_freq = save_freq
        self.delete_checkpoint = delete_checkpoint
        self._backup_file = os.path.join(self.backup_dir, BACKUP_FILE)
        self._resume = None
        self._epoch = 0
        self._skip_until = 0
        self._since_save = 0
        self._position = None
        self._random_state = None
        self._stop_requested = False
        self.saved_position = None

    @property
    def backup_path(self):
        """The backup file, `backup_dir/backup.npz`."""
        return self._backup_file

    def request_stop(self):
        """Stop training after the running batch, with a backup of it.

        Safe to call from a signal handler: it only sets a flag. At the end
        of the next trained batch (or of the epoch, if the epoch's batches
        are done) the backup is written and `fit` raises
        `KeyboardInterrupt`; `saved_position` then holds `(epoch, batch)`.
        """
        self._stop_requested = True

    def get_config(self):
        return {
            "backup_dir": self.backup_dir,
            "save_freq": self.save_freq,
            "delete_checkpoint": self.delete_checkpoint,
        }

    # --------------------------------------------------------------- resume
    def resume_epoch(self):
        """The epoch the backup resumes at, or None without a backup."""
        meta = self._read_meta()
        return None if meta is None else meta["epoch"]

    def _read_meta(self):
        if not os.path.exists(self._backup_file):
            return None
        return self._read(arrays=False)[0]

    def _read(self, arrays=True):
        """`(meta, groups)` of the backup file; a damaged file raises a
        `ValueError` that names it."""
        try:
            with np.load(self._backup_file, allow_pickle=False) as backup:
                meta = json.loads(str(backup[_META]))
                epoch, step = int(meta["epoch"]), int(meta["step"])
                groups = None
                if arrays:
                    groups = {
                        name: [backup[f"{name}/{i}"] for i in range(len(paths))]
                        for name, paths in meta["paths"].items()
                    }
                    groups[_RANDOM] = [
                        backup[f"{_RANDOM}/{i}"]
                        for i in range(int(meta.get(_RANDOM, 0)))
                    ]
        except _READ_ERRORS as error:
            raise ValueError(
                f"The backup file {self._backup_file!r} is damaged or not a "
                f"keras_mwbp backup ({type(error).__name__}: "
                f"{_one_line(error)}). Delete it, or the folder "
                f"{self.backup_dir!r}, to start over (or pass another "
                "backup_dir)."
            ) from None
        meta["epoch"], meta["step"] = epoch, step
        return meta, groups

    def set_model(self, model):
        if not hasattr(model, "_batches_to_skip"):
            raise ValueError(
                "keras_mwbp.callbacks.BackupAndRestore resumes a "
                "`keras_mwbp.MultiWayModel`; use "
                "`keras.callbacks.BackupAndRestore` for other models. "
                f"Received: model of type {type(model).__name__}"
            )
        super().set_model(model)

    def on_train_begin(self, logs=None):
        self._resume = None
        self._random_state = None
        self._skip_until = 0
        self._since_save = 0
        self._position = self._current_position()
        if not os.path.exists(self._backup_file):
            check_writable_dir(self.backup_dir, "`backup_dir`")
            return
        meta, groups = self._read()
        # Everything is checked before any variable is assigned.
        self._check_position(meta.get("position"))
        current = self._variable_groups()
        del current["metrics"]  # Built with the first step; checked then.
        for name, variables in current.items():
            saved_paths = meta["paths"].get(name)
            paths = [v.path for v in variables]
            shapes = [tuple(v.shape) for v in variables]
            saved_shapes = [tuple(a.shape) for a in groups.get(name, [])]
            # Layer names may differ between processes (`dense_3`), so the
            # structure is checked: the number and shapes of the variables.
            if saved_shapes != shapes:
                raise ValueError(
                    f"The backup in {self.backup_dir!r} does not match this "
                    f"model: its {name} variables are {len(saved_paths or [])}"
                    f" ({_summary(saved_paths, saved_shapes)}), this model "
                    f"has {len(paths)} ({_summary(paths, shapes)}). Resume "
                    "with the model, method and optimizer that made it, or "
                    "delete the backup to start over."
                )
        check_writable_dir(self.backup_dir, "`backup_dir`")
        # Checked everything first; now restore (metrics after Keras resets
        # them at the start of the epoch).
        for name in ("model", "optimizer"):
            for variable, value in zip(current[name], groups[name]):
                variable.assign(value)
        # Put back before the first trained batch: the data iterator that
        # `fit` makes first draws from it (torch's DataLoader draws a seed).
        self._random_state = groups[_RANDOM]
        self._metric_values = groups["metrics"]
        _compat.set_initial_epoch(self.model, meta["epoch"])
        self._resume = meta
        self.saved_position = (meta["epoch"], meta["step"])

    def _current_position(self):
        """This `fit`'s values of `POSITION_FIELDS`."""
        model = self.model
        steps = (self.params or {}).get("steps")
        samples = batch_size = seed = None
        sizes = getattr(model, "_fit_sizes", None)  # Set by `fit` for arrays.
        if sizes:
            count, batch_size, validation_split = sizes
            samples = count
            if validation_split:  # As Keras splits: the first part trains.
                samples = int(math.floor(count * (1.0 - validation_split)))
            batch_size = int(batch_size or 32)  # Keras's default for arrays.
            seed = getattr(model, "shuffle_seed", None)
        return {
            "method": getattr(model, "method", None),
            "samples": samples,
            "batch_size": batch_size,
            "steps_per_epoch": None if steps is None else int(steps),
            "shuffle_seed": None if seed is None else int(seed),
        }

    def _check_position(self, saved):
        """Refuses a backup made with another definition of the position
        (backups without the record, from older versions, pass)."""
        if not saved:
            return
        for field in POSITION_FIELDS:
            before, now = saved.get(field), self._position.get(field)
            if before is None and now is None or before == now:
                continue
            raise ValueError(
                f"The backup {self._backup_file!r} cannot resume this fit: it was "
                f"made with {field}={_show(before)}, this fit has "
                f"{field}={_show(now)}. A backup resumes at a batch of an "
                "epoch, which means the same samples only with the same "
                f"method, number of samples, batch size, steps per epoch and "
                f"shuffle_seed ({_describe(saved)}). Rerun with "
                f"{field}={_show(before)} to resume, or start over: delete "
                f"{self.backup_dir!r} or pass another backup_dir."
            )

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        resume, self._resume = self._resume, None
        if resume is None:
            return
        history = getattr(self.model, "history", None)
        if history is not None and resume["history"]:
            history.epoch = resume["history_epochs"] + list(history.epoch)
            for key, values in resume["history"].items():
                history.history[key] = values + history.history.get(key, [])
        if resume["step"] > 0 and epoch == resume["epoch"]:
            self._skip_until = resume["step"]
            resume_in_epoch(
                self.model, resume["step"], resume["logs"],
                self._metric_values,
            )

    def on_train_batch_begin(self, batch, logs=None):
        if self._random_state is not None and batch >= self._skip_until:
            backend.get().set_random_state(self._random_state)
            self._random_state = None

    # --------------------------------------------------------------- backup
    def on_train_batch_end(self, batch, logs=None):
        if batch < self._skip_until:
            return  # A skipped batch (already trained before the backup).
        if self._stop_requested:
            self._write_backup(self._epoch, batch + 1, logs)
            self._halt_after_backup()
        if self.save_freq == "epoch":
            return
        self._since_save += self.model.steps_per_execution
        if self._since_save >= self.save_freq:
            self._since_save = 0
            self._write_backup(self._epoch, batch + 1, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._skip_until = 0
        if self.save_freq == "epoch" or self._stop_requested:
            self._write_backup(epoch + 1, 0, logs, epoch_done=True)
        if self._stop_requested:
            self._halt_after_backup()

    def _halt_after_backup(self):
        self._stop_requested = False
        epoch, step = self.saved_position
        raise KeyboardInterrupt(
            f"training stopped at epoch {epoch + 1}, batch {step}; the "
            f"backup {self._backup_file!r} resumes it"
        )

    def on_train_end(self, logs=None):
        self.model._batches_to_skip = 0
        resume, self._resume = self._resume, None
        history = getattr(self.model, "history", None)
        if resume is not None and history is not None:
            # Resumed after the last epoch: no epoch ran to put the saved
            # History back, so it is put back now.
            history.epoch = list(resume["history_epochs"])
            history.history = {
                k: list(v) for k, v in resume["history"].items()
            }
        if (
            self.delete_checkpoint
            and backend.get().writes_files(self.model)
            and os.path.exists(self.backup_dir)
        ):
            shutil.rmtree(self.backup_dir, ignore_errors=True)

    def _variable_groups(self):
        return {
            "model": list(self.model.variables),
            "optimizer": list(self.model.optimizer.variables),
            "metrics": list(self.model.metrics_variables),
        }

    def _write_backup(self, epoch, step, logs, epoch_done=False):
        history = getattr(self.model, "history", None)
        past = {}
        past_epochs = []
        if history is not None:
            past = {k: [_number(v) for v in vs]
                    for k, vs in history.history.items()}
            past_epochs = [int(e) for e in history.epoch]
            if epoch_done:  # History records this epoch after this callback.
                past_epochs, past = _with_epoch(past_epochs, past, epoch - 1,
                                                logs)
        groups = self._variable_groups()
        meta = {
            "epoch": int(epoch),
            "step": int(step),
            "logs": {k: _number(v) for k, v in (logs or {}).items()},
            "history": past,
            "history_epochs": past_epochs,
            "position": self._position or self._current_position(),
            "paths": {
                name: [v.path for v in variables]
                for name, variables in groups.items()
            },
        }
        arrays = {
            f"{name}/{i}": keras.ops.convert_to_numpy(v)
            for name, variables in groups.items()
            for i, v in enumerate(variables)
        }
        random_state = backend.get().random_state()
        meta[_RANDOM] = len(random_state)
        arrays.update(
            (f"{_RANDOM}/{i}", a) for i, a in enumerate(random_state)
        )
        arrays[_META] = np.array(json.dumps(meta))
        # Every worker reads the variables above: under a multi-worker
        # strategy a metric's variable is synchronized on read, and reading
        # it is a collective that waits for all workers. Only the chief
        # writes the one backup they share.
        if backend.get().writes_files(self.model):
            os.makedirs(self.backup_dir, exist_ok=True)
            with atomic_path(self._backup_file) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, **arrays)
        self.saved_position = (int(epoch), int(step))


def _number(value):
    return float(keras.ops.convert_to_numpy(value))


def _with_epoch(epochs, history, epoch, logs):
    if epoch in epochs:
        return epochs, history
    history = {k: list(v) for k, v in history.items()}
    for key, value in (logs or {}).items():
        history.setdefault(key, []).append(_number(value))
    return epochs + [epoch], history


def _show(value):
    return "unknown" if value is None else repr(value)


def _describe(position):
    return ", ".join(
        f"{field}={_show(position.get(field))}" for field in POSITION_FIELDS
    )


def _one_line(text):
    return " ".join(str(text).split())


def _summary(paths, shapes):
    if not paths:
        return "none"
    pairs = [f"{p} {s}" for p, s in zip(paths, shapes)]
    return ", ".join(pairs[:3]) + (", ..." if len(pairs) > 3 else "")
