"""Every use of Keras's private API (`keras.src` and private attributes of
Keras objects), in one place.

Checked against Keras 3.12.0 (the oldest declared) and 3.15.1 (the newest
declared); see `pyproject.toml`. Each name below exists, with the behaviour
the project relies on, in both. When a new Keras moves one of them, this is
the only module to change.
"""

import keras
from keras.src.losses.losses import LossFunctionWrapper  # noqa: F401
from keras.src.models.functional import functional_from_config  # noqa: F401
from keras.src.models.functional import operation_fn  # noqa: F401
from keras.src.saving import serialization_lib  # noqa: F401
from keras.src.trainers import data_adapters  # noqa: F401
from keras.src.trainers.data_adapters import array_slicing  # noqa: F401
from keras.src.utils import file_utils  # noqa: F401
from keras.src.utils import io_utils  # noqa: F401
from keras.src.utils import tracking  # noqa: F401


def learning_rate_object(optimizer):
    """The optimizer's rate as given: its variable, schedule or callable
    (private `_learning_rate`, Keras 3.12.0 to 3.15.1)."""
    return optimizer._learning_rate


def share_learning_rate(optimizer, learning_rate):
    """Makes `optimizer` read `learning_rate` (a variable, a schedule or a
    callable) as its rate, without tracking it as one of its own variables,
    and drops the rate variable it made for itself. Uses the optimizer's
    private `_learning_rate` attribute and `_untrack_variable()` (Keras
    3.12.0 to 3.15.1: the attribute `learning_rate`'s getter reads and its
    setter assigns or replaces)."""
    own = optimizer._learning_rate
    object.__setattr__(optimizer, "_learning_rate", learning_rate)
    if isinstance(own, keras.Variable) and own is not learning_rate:
        optimizer._untrack_variable(own)


def jax_state_sync(model, state):
    """Writes Keras's JAX trainer state `(trainable, non_trainable,
    optimizer, metrics)` values to the model's variables (private
    `_jax_state`, `_jax_state_synced` and `jax_state_sync()` of the JAX
    trainer, Keras 3.12.0 to 3.15.1)."""
    names = ("trainable_variables", "non_trainable_variables",
             "optimizer_variables", "metrics_variables")
    model._jax_state = dict(zip(names, state))
    model._jax_state_synced = False
    model.jax_state_sync()
