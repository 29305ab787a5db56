"""The order of in-memory training data: a function of (seed, epoch) only.

Keras shuffles NumPy inputs with an unseeded `tf.random.shuffle`, so a
process that resumes training at epoch `e` (from a `.keras` checkpoint or a
backup) sees another order than the run it continues. `MultiWayModel.fit`
therefore feeds array inputs through `epoch_batches`: epoch `e` visits the
samples in the order `permutation(shuffle_seed, e, n)`, the same in every
process, and the seed is part of the model's config.
"""

import math

import keras

from keras_mwbp import _compat
import numpy as np


def check_seed(seed):
    """A valid `shuffle_seed`: `seed` itself, or a random one for `None`.

    `None` draws from NumPy's global generator, so
    `keras.utils.set_random_seed` makes it reproducible.
    """
    if seed is None:
        return int(np.random.randint(0, 2**31 - 1))
    if (
        isinstance(seed, bool)
        or not isinstance(seed, (int, np.integer))
        or seed < 0
    ):
        raise ValueError(
            "`shuffle_seed` must be a non-negative integer or None. "
            f"Received: shuffle_seed={seed!r}"
        )
    return int(seed)


def permutation(seed, epoch, num_samples):
    """The order of the samples in epoch `epoch` (a NumPy array)."""
    return _tf_permutation(seed, epoch, num_samples).numpy()


def _tf_permutation(seed, epoch, num_samples):
    import tensorflow as tf

    seed = tf.stack(
        [tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)]
    )
    return tf.random.experimental.stateless_shuffle(
        tf.range(num_samples, dtype=tf.int64), seed=seed
    )


def array_leaves(*structures):
    """The leaves of `structures` (None dropped) as NumPy arrays, or None if
    any leaf is not an in-memory array (a dataset, a generator, ...)."""
    leaves = []
    for structure in structures:
        if structure is None:
            continue
        for leaf in keras.tree.flatten(structure):
            if isinstance(leaf, np.ndarray):
                leaves.append(leaf)
            elif keras.ops.is_tensor(leaf) and hasattr(leaf, "numpy"):
                leaves.append(np.asarray(leaf))
            else:
                return None
    return leaves


def epoch_batches(
    x, y, sample_weight, batch_size, seed, first_epoch, epochs
):
    """A `tf.data.Dataset` of the batches of epochs `first_epoch` ..
    `epochs - 1`, each epoch in the order `permutation(seed, epoch)`.

    Feed it to `fit` with `steps_per_epoch=steps_per_epoch(...)`, so that
    Keras keeps one iterator across epochs.

    Args:
        x: Inputs (array or nested structure of arrays).
        y: Labels, or None.
        sample_weight: Per-sample weights, or None (used only with `y`).
        batch_size: Positive batch size.
        seed: The shuffle seed.
        first_epoch: The epoch `fit` starts at.
        epochs: The epoch `fit` stops before.
    """
    import tensorflow as tf

    data = (x,)
    if y is not None:
        data += (y,)
        if sample_weight is not None:
            data += (sample_weight,)
    # tf.data would stack a list of arrays into one tensor; Keras's own
    # array adapter keeps them apart as a tuple.
    data = keras.tree.lists_to_tuples(keras.tree.map_structure(np.asarray, data))
    num_samples = len(keras.tree.flatten(data)[0])

    def one_epoch(epoch):
        order = _tf_permutation(seed, epoch, num_samples)
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    indices = tf.data.Dataset.range(first_epoch, max(first_epoch, epochs))
    indices = indices.flat_map(one_epoch)
    arrays = tf.data.Dataset.from_tensors(data).repeat()

    def gather(rows, arrays):
        return tf.nest.map_structure(
            lambda a: tf.gather(a, rows, axis=0), arrays
        )

    dataset = tf.data.Dataset.zip((indices, arrays)).map(
        gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    return dataset.prefetch(tf.data.AUTOTUNE)


def steps_per_epoch(num_samples, batch_size):
    return math.ceil(num_samples / batch_size)


def start_epoch(model, callbacks, initial_epoch):
    """The epoch `fit` will start at, as Keras's `fit` decides it after
    `on_train_begin`: a backup callback in `callbacks` (Keras's
    `BackupAndRestore` or keras_mwbp's) sets the model's initial epoch to the
    epoch of its backup."""
    start = None
    for callback in callbacks or []:
        peek = getattr(callback, "resume_epoch", None)
        if peek is not None:
            epoch = peek()
        elif isinstance(callback, keras.callbacks.BackupAndRestore):
            epoch = _keras_backup_epoch(callback)
        else:
            continue
        if epoch is not None:
            start = epoch
    if start is None:
        start = _compat.initial_epoch(model)
    return start or initial_epoch


def _keras_backup_epoch(callback):
    import json
    import os

    path = _compat.training_metadata_path(callback)
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return int(json.load(f)["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
