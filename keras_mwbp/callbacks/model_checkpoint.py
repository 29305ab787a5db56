"""`ModelCheckpoint`: Keras's checkpoint callback, with atomic saves."""

import os

import keras
from keras_mwbp import _compat
from keras_mwbp._compat import file_utils
from keras_mwbp._compat import io_utils

from keras_mwbp.saving import atomic_path
from keras_mwbp.saving import check_writable_dir
from keras_mwbp.saving import save_model


@keras.saving.register_keras_serializable(package="keras_mwbp")
class ModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """Keras's `ModelCheckpoint` whose saves are atomic.

    Same arguments and behaviour as `keras.callbacks.ModelCheckpoint`
    (`.keras` or `.weights.h5` files, `save_freq="epoch"` or every N batches,
    `save_best_only`, formatted file names), but every save writes a
    temporary file beside the checkpoint and renames it over the checkpoint
    only once it is complete (`keras_mwbp.saving.atomic_path`). A process
    killed, or a save failing, while writing leaves the previous checkpoint
    intact and loadable; Keras's callback writes in place and leaves a
    truncated file. Remote paths (`gs://...`) are saved by Keras as they are.

    The folder of `filepath` is checked when training begins (created if
    missing): if it is a file, or no file can be written there, or
    `filepath` is an existing directory, `fit` fails at once instead of at
    the first save.

    Args:
        filepath: Path of the checkpoint, `.keras` (or `.weights.h5` with
            `save_weights_only=True`); may hold formatting options such as
            `{epoch:02d}`.
        monitor: Metric name to monitor for `save_best_only`.
        verbose: 0 silent, 1 prints a message on each save.
        save_best_only: Save only when `monitor` improves.
        save_weights_only: Save `model.save_weights(...)` instead of the
            whole model.
        mode: `"auto"`, `"min"` or `"max"`: how `monitor` improves.
        save_freq: `"epoch"`, or an integer number of batches.
        initial_value_threshold: Initial best value of `monitor`.

    Example:

    ```python
    from keras_mwbp.callbacks.model_checkpoint import ModelCheckpoint

    model.fit(x, y, epochs=10,
              callbacks=[ModelCheckpoint("runs/model.keras")])
    model = keras.saving.load_model("runs/model.keras")
    ```
    """

    def __init__(
        self,
        filepath,
        monitor="val_loss",
        verbose=0,
        save_best_only=False,
        save_weights_only=False,
        mode="auto",
        save_freq="epoch",
        initial_value_threshold=None,
    ):
        options = dict(
            monitor=monitor,
            verbose=verbose,
            save_best_only=save_best_only,
            save_weights_only=save_weights_only,
            mode=mode,
            save_freq=save_freq,
            initial_value_threshold=initial_value_threshold,
        )
        super().__init__(filepath, **options)
        self._checkpoint_options = dict(filepath=self.filepath, **options)

    def get_config(self):
        return dict(self._checkpoint_options)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        filepath = os.fspath(self.filepath)
        if file_utils.is_remote_path(filepath):
            return
        folder = os.path.dirname(os.path.abspath(filepath))
        if "{" in folder:  # Formatted per epoch or batch: checked on save.
            return
        if "{" not in os.path.basename(filepath) and os.path.isdir(filepath):
            raise IsADirectoryError(
                "ModelCheckpoint's `filepath` must name a file; "
                f"{filepath!r} is an existing directory"
            )
        check_writable_dir(folder, "The folder of ModelCheckpoint's filepath")

    def _save_model(self, epoch, batch, logs):
        # As Keras's `_save_model`, with the two writes made atomic.
        filepath = _compat.checkpoint_file_path(self, epoch, batch, logs)
        if file_utils.is_remote_path(filepath):
            super()._save_model(epoch, batch, logs)
            return
        try:
            if not _compat.checkpoint_should_save(self, epoch, batch, logs, filepath):
                return
            if self.save_weights_only:
                with atomic_path(filepath) as tmp:
                    self.model.save_weights(tmp, overwrite=True)
            else:
                save_model(self.model, filepath, overwrite=True)
            if self.verbose > 0:
                io_utils.print_msg(
                    f"\nEpoch {epoch + 1}: finished saving model to {filepath}"
                )
        except IsADirectoryError:
            raise IOError(
                "Please specify a non-directory filepath for "
                "ModelCheckpoint. Filepath used is an existing "
                f"directory: {filepath}"
            )
