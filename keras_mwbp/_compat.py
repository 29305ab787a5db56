"""Every use of Keras's private API (`keras.src` and private attributes of
Keras objects), in one place.

The other modules call the small functions below (`standardize_inputs`,
`loss_tracker`, ...) and never read, write or call a private name of a Keras
object themselves; the private methods that keras_mwbp's subclasses override
are listed in `OVERRIDDEN_PRIVATE_METHODS`. keras_mwbp's own private names
are chosen apart from Keras's. tests/test_keras_versions.py checks all three
on the oldest and the newest Keras declared.

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


# ----------------------------------------------------------------------------
# Private methods of Keras classes that keras_mwbp's subclasses override, as
# (the Keras class that defines it, the method). An override cannot live
# here; tests/test_keras_versions.py checks that each exists on its class,
# on the oldest and the newest Keras declared.
OVERRIDDEN_PRIVATE_METHODS = (
    # MultiWayModel: refuses keras.models.clone_model (a lost head graph).
    ("keras.src.ops.function.Function", "_run_through_graph"),
    # MultiWayModel on TensorFlow: builds the metrics under a multi-worker
    # strategy (symbolic_build_on_local_values, above).
    ("keras.src.backend.tensorflow.trainer.TensorFlowTrainer",
     "_maybe_symbolic_build"),
    # keras_mwbp.callbacks.ModelCheckpoint: the two writes made atomic.
    ("keras.src.callbacks.model_checkpoint.ModelCheckpoint", "_save_model"),
)


# ----------------------------------------------------------------------------
# Private attributes and methods of Keras objects, read or called.
def standardize_inputs(model, x):
    """`x` as the flat list of the functional `model`'s inputs, in the order
    of `model.inputs` (private `Functional._standardize_inputs`)."""
    return model._standardize_inputs(x)


def nodes_by_depth(function):
    """The `{depth: [node, ...]}` of a Keras `Function` or `Functional`
    (private `_nodes_by_depth`), or None for any other object."""
    return getattr(function, "_nodes_by_depth", None)


def producing_node(tensor):
    """The graph node that computed the symbolic `tensor` (private
    `_keras_history` of a `KerasTensor` and `_inbound_nodes` of its
    operation), or None for a tensor that no operation made."""
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None
    return history.operation._inbound_nodes[history.node_index]


def sublayers(model):
    """Every layer inside `model`, nested ones included, `model` itself
    excluded (private `Layer._flatten_layers`)."""
    return model._flatten_layers(include_self=False)


def loss_tracker(model):
    """The compiled model's `Mean` tracker of the `loss` log (private
    `Trainer._loss_tracker`)."""
    return model._loss_tracker


def symbolic_build(model, data_batch):
    """Builds the compiled model's metrics from `data_batch`'s structure
    (private `Trainer._symbolic_build`)."""
    model._symbolic_build(data_batch=data_batch)


def set_compile_config(model, **config):
    """Records `config` as the model's compile arguments for saving
    (private `Trainer._compile_config`, a `SerializableDict`)."""
    model._compile_config = serialization_lib.SerializableDict(**config)


def initial_epoch(model):
    """The epoch a `BackupAndRestore` restored to (the private
    `_initial_epoch` that `fit` reads), or None."""
    return getattr(model, "_initial_epoch", None)


def set_initial_epoch(model, epoch):
    """Makes the next `fit` start at `epoch` (private `_initial_epoch`, as
    Keras's `BackupAndRestore` sets it)."""
    model._initial_epoch = epoch


def training_metadata_path(callback):
    """The metadata file path of Keras's `BackupAndRestore` (private
    `_training_metadata_path`), or None for another callback."""
    return getattr(callback, "_training_metadata_path", None)


def callback_model(callback):
    """The model `callback` was last given, or None (private
    `Callback._model`; the public `model` property may raise or build)."""
    return getattr(callback, "_model", None)


def train_writer(callback):
    """The summary writer of a `TensorBoard` callback's training logs
    (private `TensorBoard._train_writer`)."""
    return callback._train_writer


def checkpoint_file_path(callback, epoch, batch, logs):
    """The file a `ModelCheckpoint` writes at this point (private
    `ModelCheckpoint._get_file_path`)."""
    return callback._get_file_path(epoch, batch, logs)


def checkpoint_should_save(callback, epoch, batch, logs, filepath):
    """Whether a `ModelCheckpoint` saves at this point (private
    `ModelCheckpoint._should_save_model`, which also updates its best)."""
    return callback._should_save_model(epoch, batch, logs, filepath)


def own_variables(optimizer):
    """The variables an optimizer made itself (its iteration count and
    rate; private `BaseOptimizer._variables`), as a new list."""
    return optimizer._variables[:]


def count_iteration(optimizer):
    """Adds 1 to the optimizer's iteration count (private `_iterations`,
    the variable behind the read-only `iterations`)."""
    iterations = optimizer._iterations
    iterations.assign_add(keras.ops.cast(1, iterations.dtype))


def loss_function_kwargs(loss):
    """The keyword arguments a `LossFunctionWrapper` (every built-in Keras
    loss class) passes to its function (private `_fn_kwargs`); {} for any
    other loss."""
    return getattr(loss, "_fn_kwargs", None) or {}


def call_context_args(layer):
    """The call-context arguments (e.g. `training`) `layer` takes (private
    `Operation._call_context_args`); empty for an operation without."""
    return getattr(layer, "_call_context_args", None) or ()


def merges_by_adding(layer):
    """Whether `layer`'s merge is `keras.layers.Add`'s own (private
    `Merge._merge_function`), not a subclass's override."""
    return type(layer)._merge_function is keras.layers.Add._merge_function


def sequential_graph(model):
    """The functional graph a built `keras.Sequential` runs (private
    `Sequential._functional`), or None before it is built."""
    return getattr(model, "_functional", None)
