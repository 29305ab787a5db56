"""`AdaptiveNu`: the paper's Adaptive-I and Adaptive-II schedules of nu."""

import math
import numbers

import keras
import numpy as np
from keras_mwbp import _compat
from keras_mwbp._compat import io_utils

MODES = {"I": (0.5, 2.0), "II": (2.0, 0.5)}  # mode -> (start, factor)


class AdaptiveNu(keras.callbacks.Callback):
    """Changes the loss weights' decay rate nu when the learning rate changes.

    The paper's schedules of nu (Guo et al. 2020, Sec. 6.2), for a
    `keras_mwbp.MultiWayModel` whose loss weights come from nu (paper Eq. 5;
    not explicit `head_weights`):

    - `"I"` (Adaptive-I): nu starts at 1/2 and doubles at each change of the
      learning rate (0.5, 1, 2, ...).
    - `"II"` (Adaptive-II): nu starts at 2 and halves at each change
      (2, 1, 0.5, ...).

    The new nu goes through `model.set_nu`, which rewrites the loss weights
    in a variable: the compiled train step is not retraced.

    When the rate changes: by default, when the optimizer's actual rate
    (`model.optimizer.learning_rate`, a `LearningRateSchedule` evaluated at
    the current step) at the start of an epoch differs from its rate at the
    start of the previous epoch. It is read when the epoch's first batch
    begins, after every callback's `on_epoch_begin`, so the callback works
    in any position of the callbacks list with `LearningRateScheduler`,
    `ReduceLROnPlateau` or a schedule given to the optimizer alike. Any
    change counts, up or down: a schedule that decays every epoch
    (`ExponentialDecay`, `CosineDecay`) would change nu every epoch; give
    `boundaries` for those, and for schedules that change the rate
    in the middle of an epoch (the change then counts from the next epoch).
    With `boundaries`, nu changes at the start of those epochs and the
    learning rate is not read.

    Resuming: a `fit` starting at epoch 0 starts nu at the mode's value.
    A `fit` starting later (`initial_epoch > 0` or `BackupAndRestore`) with
    `boundaries` sets nu from the epoch (exact). Without `boundaries`, the
    callback goes on from where it stopped if it is the same callback and
    the run continues at the next epoch; otherwise it keeps the model's
    current nu (saved and restored with the model's weights, as
    `BackupAndRestore` and `keras.saving.load_model` do) and counts changes
    from the first epoch of this run on, which serves as the reference.

    `nu` is written into the epoch logs (and so into `History`).

    Args:
        mode: `"I"` or `"II"`.
        boundaries: Optional list of strictly increasing non-negative epoch
            indices (0-based) at whose start nu changes, instead of
            watching the learning rate.
        verbose: `0` is silent, `1` prints each change of nu.

    Attributes:
        nu: The value this callback last set (`None` before training).

    Example:

    ```python
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), ...)
    drops = keras.callbacks.LearningRateScheduler(
        lambda epoch, lr: 0.1 if epoch < 160 else 0.01 if epoch < 240 else 0.001)
    model.fit(x, y, epochs=400,
              callbacks=[drops, keras_mwbp.callbacks.AdaptiveNu("II")])
    # nu = 2 for epochs 0-159, 1 for 160-239, 0.5 from 240 on.
    ```
    """

    def __init__(self, mode, boundaries=None, verbose=0):
        super().__init__()
        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(
                f"`mode` must be 'I' or 'II'. Received: mode={mode!r}"
            )
        if boundaries is not None:
            boundaries = _check_boundaries(boundaries)
        self.mode = mode
        self.boundaries = boundaries
        self.verbose = verbose
        self.start, self.factor = MODES[mode]
        self.nu = None
        self._last_epoch = None  # Last epoch this callback set nu for.
        self._reference_rate = None  # The rate when that epoch began.
        self._epoch = None
        self._pending = False

    def set_model(self, model):
        if model is not _compat.callback_model(self):
            self._last_epoch = None  # Nothing to go on from for this model.
        super().set_model(model)

    def on_train_begin(self, logs=None):
        model = self.model
        if not callable(getattr(model, "set_nu", None)):
            raise ValueError(
                "AdaptiveNu needs a `keras_mwbp.MultiWayModel`. Received: "
                f"model of type {type(model).__name__}"
            )
        try:
            model.set_nu(model.nu)  # Raises with explicit `head_weights`.
        except ValueError as error:
            raise ValueError(f"AdaptiveNu cannot schedule nu: {error}") from None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._pending = True

    def on_train_batch_begin(self, batch, logs=None):
        if self._pending:
            self._pending = False
            self._update(self._epoch)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["nu"] = self.model.nu

    def _update(self, epoch):
        if self.boundaries is not None:
            changes = sum(1 for b in self.boundaries if b <= epoch)
            nu = self.start * self.factor**changes
        else:
            rate = self._current_rate()
            if epoch == 0:
                nu = self.start
            elif self._last_epoch == epoch - 1:  # This callback's last epoch.
                nu = self.nu
                if not _same(rate, self._reference_rate):
                    nu *= self.factor
            else:  # Resumed: the model's restored nu; this epoch's rate.
                nu = self.model.nu
            self._reference_rate = rate
        self._last_epoch = epoch
        if nu != self.model.nu and self.verbose:
            io_utils.print_msg(
                f"\nEpoch {epoch + 1}: AdaptiveNu setting nu to {nu:g}."
            )
        self.model.set_nu(nu)
        self.nu = nu

    def _current_rate(self):
        """The learning rate at the first step of this epoch.

        Read at the epoch's first batch; in an epoch resumed mid-way by
        `keras_mwbp.callbacks.BackupAndRestore` the optimizer is already
        `model._batches_to_skip` steps further, so a schedule is evaluated
        at the epoch's first step instead.
        """
        optimizer = self.model.optimizer
        skipped = getattr(self.model, "_batches_to_skip", 0)
        inner = getattr(optimizer, "loss_optimizers", (optimizer,))[0]
        schedule = _compat.learning_rate_object(inner)
        if skipped and isinstance(
            schedule, keras.optimizers.schedules.LearningRateSchedule
        ):
            rate = schedule(inner.iterations - skipped)
        else:
            rate = optimizer.learning_rate
        return float(np.asarray(keras.ops.convert_to_numpy(rate)))


def _same(a, b):
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def _check_boundaries(boundaries):
    message = (
        "`boundaries` must be a list of strictly increasing non-negative "
        f"integers (epoch indices). Received: boundaries={boundaries!r}"
    )
    try:
        values = list(boundaries)
    except TypeError:
        raise ValueError(message) from None
    if any(
        isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 0
        for b in values
    ) or any(a >= b for a, b in zip(values, values[1:])):
        raise ValueError(message)
    return tuple(int(b) for b in values)
