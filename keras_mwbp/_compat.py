"""Every use of Keras's private API (`keras.src` and private attributes of
Keras objects), in one place.

Checked against Keras 3.12.0 (the oldest declared) and 3.15.1 (the newest
declared); see `pyproject.toml`. Each name below exists, with the behaviour
the project relies on, in both. When a new Keras moves one of them, this is
the only module to change.
"""

import importlib

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


def config_without_learning_rate(optimizer):
    """`optimizer.get_config()` with its learning rate left out (a
    placeholder number stands in). A schedule or callable rate is not
    serialized, so one whose class is not registered for serialization,
    or has no `get_config()`, does not fail here (Keras serializes it only
    when the model is saved). Swaps the private `_learning_rate` for the
    call (Keras 3.12.0 to 3.15.1: `get_config()` reads it)."""
    own = optimizer._learning_rate
    object.__setattr__(optimizer, "_learning_rate", 0.0)
    try:
        return optimizer.get_config()
    finally:
        object.__setattr__(optimizer, "_learning_rate", own)


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


def backend_neutral_config(config):
    """`config` (a serialized Keras object, nested in dicts and lists) with
    every class that Keras serialized by its backend's own subclass renamed
    to the backend-neutral class it specializes, so that the file loads
    under every backend.

    On PyTorch, `keras.optimizers.Adam()` builds
    `keras.src.backend.torch.optimizers.torch_adam.Adam`, and Keras 3.12.0
    to 3.15.1 serialize it under that module: loaded under TensorFlow or
    JAX, it would build the torch class. Its backend-neutral base (the
    first class of its MRO with the same name outside `keras.src.backend`)
    is saved instead, named as TensorFlow names it (`keras.optimizers`)
    where that is its public home; building it under PyTorch gives the
    torch class again.
    """
    if isinstance(config, (list, tuple)):
        return type(config)(backend_neutral_config(item) for item in config)
    if not isinstance(config, dict):
        return config
    config = {
        key: backend_neutral_config(value) for key, value in config.items()
    }
    module, name = config.get("module"), config.get("class_name")
    if isinstance(module, str) and module.startswith("keras.src.backend."):
        cls = getattr(importlib.import_module(module), str(name), None)
        for base in getattr(cls, "__mro__", ())[1:]:
            if base.__name__ == name and not base.__module__.startswith(
                "keras.src.backend."
            ):
                public = getattr(keras.optimizers, name, None) is base
                config["module"] = (
                    "keras.optimizers" if public else base.__module__
                )
                if config.get("registered_name") == name:
                    config["registered_name"] = None
                break
    return config


def symbolic_build_on_local_values(model, iterator=None, data_batch=None):
    """Keras's TensorFlow `Trainer._maybe_symbolic_build` (private; 3.12.0 to
    3.15.1), which builds the metrics from the first batch, taking each
    distributed value of that batch as this worker's first local value.

    Keras reduces the batch with `strategy.reduce("MEAN", batch)`, which
    `MultiWorkerMirroredStrategy` refuses for a structure such as `(x, y)`
    (`ValueError: Attempt to convert a value (PerReplica...)`); the build
    needs only the batch's structure, shapes and dtypes, which every local
    value has.
    """
    strategy = model._distribute_strategy
    if strategy is None:
        return
    if iterator is not None:
        import tensorflow as tf

        def local(value):
            if isinstance(value, tf.distribute.DistributedValues):
                return strategy.experimental_local_results(value)[0]
            return value

        for _, _, it in iterator:
            data_batch = keras.tree.map_structure(local, next(it))
            break
    with strategy.scope():
        model._symbolic_build(data_batch=data_batch)


def conv_classes():
    """`(BaseConv, Conv1D)`: Keras's private convolution base class, whose
    `call` and `convolution_op` `Conv2D` and `Conv3D` run, and `Conv1D`,
    which has a `call` of its own for causal padding (Keras 3.12.0 to
    3.15.1). Used by the torch backend's hand-written VJPs."""
    from keras.src.layers.convolutional.base_conv import BaseConv

    return BaseConv, keras.layers.Conv1D
