"""`train_heads`: frozen-trunk training of a model's auxiliary heads.

Paper footnote 3 (Guo et al. 2020): the intermediate models of standard BP
are compared after their auxiliary heads are trained on the frozen trunk.
"""

import numbers

import keras
import numpy as np

from keras_mwbp.weighting import check_weight_decay


def train_heads(
    model,
    data,
    epochs,
    optimizer=None,
    loss=None,
    heads=None,
    batch_size=32,
    shuffle_seed=0,
    verbose=0,
    weight_decay=0.0,
):
    """Trains only the auxiliary heads of a model; the trunk stays fixed.

    The trunk is every layer the final output depends on (the final head's
    own layers included). The trained layers are those that only auxiliary
    heads depend on. During training the trunk layers are frozen
    (`trainable=False`), so their BatchNorm layers run in inference mode:
    their moving statistics are neither read from the batch nor updated,
    and every trunk variable ends bit-for-bit as it was. The heads' own
    layers train as usual (a head's BatchNorm uses batch statistics and
    updates its moving statistics). The `trainable` flags are put back
    afterwards, also when training fails.

    This is the paper's "frozen-trunk head training" (footnote 3), the fair
    way to get intermediate models out of a network trained with
    `method="standard"`, whose auxiliary heads were never trained.

    Args:
        model: A functional `keras.Model` with at least two outputs, the
            auxiliary heads' logits first and the final head's last (such
            as a `keras_mwbp.MultiWayModel`).
        data: `(x, y)`, a tuple of NumPy arrays (one label array for every
            head), or a `tf.data.Dataset` of `(x, y)` batches.
        epochs: Positive int, the number of passes over `data`.
        optimizer: A `keras.optimizers.Optimizer` (a new one, not the
            model's) or `None` for `SGD(learning_rate=0.01, momentum=0.9)`.
        loss: A Keras loss for every head, or `None` for
            `SparseCategoricalCrossentropy(from_logits=True)`.
        heads: Indices of the auxiliary heads to train (`0` to
            `len(model.outputs) - 2`), or `None` for all of them.
        batch_size: Positive int; used when `data` holds arrays.
        shuffle_seed: Non-negative int or `None`; with arrays, the samples
            are shuffled once per epoch by a permutation drawn from this
            seed and the epoch (the same order on every call).
        verbose: Passed to `fit`.
        weight_decay: Coupled (L2) weight decay of the trained variables,
            as `MultiWayModel(weight_decay=...)`: `weight_decay * w` is
            added to each one's gradient (a regularizer `0.5 * weight_decay
            * sum(w ** 2)` set for the training, on top of the variable's
            own, and taken off afterwards). A non-negative number.

    Returns:
        The `keras.callbacks.History` of the training; its `history` holds
        `<output name>_loss` for each trained head.

    Raises:
        TypeError: If `model` is not a functional Keras model, or `data`
            is neither an `(x, y)` tuple nor a `tf.data.Dataset`.
        ValueError: For fewer than two outputs, bad `epochs`, `heads`,
            `batch_size` or `shuffle_seed`, or arrays of different lengths.

    Example:

    ```python
    model = cifar_resnet(20, num_losses=3, method="standard")
    model.compile(optimizer="sgd", loss=..., metrics=["accuracy"])
    model.fit(x, y, epochs=10)
    keras_mwbp.train_heads(model, (x, y), epochs=5)
    model.evaluate(x_test, y_test)  # every head is now a trained classifier
    ```
    """
    outputs = _check_model(model)
    epochs = _check_positive_int(epochs, "epochs")
    batch_size = _check_positive_int(batch_size, "batch_size")
    if shuffle_seed is not None and (
        isinstance(shuffle_seed, bool)
        or not isinstance(shuffle_seed, (int, np.integer))
        or shuffle_seed < 0
    ):
        raise ValueError(
            "`shuffle_seed` must be a non-negative integer or None. "
            f"Received: shuffle_seed={shuffle_seed!r}"
        )
    weight_decay = check_weight_decay(weight_decay)
    heads = _check_heads(heads, len(outputs) - 1)
    arrays = _check_data(data)
    if optimizer is None:
        optimizer = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
    elif not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(
            "`optimizer` must be a keras.optimizers.Optimizer or None. "
            f"Received: optimizer={optimizer!r}"
        )
    if optimizer is getattr(model, "optimizer", None):
        raise ValueError(
            "`optimizer` must be a new optimizer, not the model's own "
            "(its state belongs to the trunk's training)."
        )
    if loss is None:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    trunk = set(id(layer) for layer in _layers_of(model.inputs, outputs[-1]))
    head_layers = []
    for index in heads:
        for layer in _layers_of(model.inputs, outputs[index]):
            if id(layer) not in trunk and layer not in head_layers:
                head_layers.append(layer)
    if not any(layer.weights for layer in head_layers):
        raise ValueError(
            f"The auxiliary heads {list(heads)} have no layer of their own "
            "with weights (every layer they use is part of the trunk that "
            "feeds the final output), so there is nothing to train."
        )
    heads_model = keras.Model(
        model.inputs,
        [outputs[index] for index in heads],
        name=f"{model.name}_heads",
    )
    names = [model.output_names[index] for index in heads]
    flags = [(layer, layer.trainable) for layer in heads_model.layers]
    regularized = [
        (v, v.regularizer) for layer in head_layers
        for v in layer.trainable_weights
    ] if weight_decay else []
    try:
        head_ids = set(id(layer) for layer in head_layers)
        for layer, _ in flags:
            layer.trainable = id(layer) in head_ids
        for variable, own in regularized:
            variable.regularizer = _CoupledDecay(weight_decay, own)
        single = len(names) == 1  # a one-output model takes plain targets

        def targets(y):
            return y if single else {name: y for name in names}

        heads_model.compile(
            optimizer=optimizer,
            loss=loss if single else {name: loss for name in names},
        )
        if arrays is None:
            dataset = data.map(lambda x, y: (x, targets(y)))
            # A dataset keeps its own order (Keras warns about shuffle=True).
            return heads_model.fit(
                dataset, epochs=epochs, shuffle=False, verbose=verbose
            )
        x, y = arrays
        history = keras.callbacks.History()
        history.set_model(heads_model)
        history.on_train_begin()
        for epoch in range(epochs):
            order = _permutation(len(y), shuffle_seed, epoch)
            step = heads_model.fit(
                _take(x, order),
                targets(y[order]),
                batch_size=batch_size,
                epochs=1,
                shuffle=False,
                verbose=verbose,
            )
            history.on_epoch_end(
                epoch, {k: v[-1] for k, v in step.history.items()}
            )
        return history
    finally:
        for layer, trainable in flags:
            layer.trainable = trainable
        for variable, own in regularized:
            variable.regularizer = own


class _CoupledDecay:
    """`0.5 * weight_decay * sum(w ** 2)`, plus a variable's own
    regularizer: its gradient adds `weight_decay * w`."""

    def __init__(self, weight_decay, own):
        self.weight_decay = weight_decay
        self.own = own

    def __call__(self, x):
        penalty = 0.5 * self.weight_decay * keras.ops.sum(keras.ops.square(x))
        return penalty if self.own is None else penalty + self.own(x)


def _check_model(model):
    if not isinstance(model, keras.Model) or not hasattr(model, "inputs"):
        raise TypeError(
            "`model` must be a functional keras.Model (such as a "
            f"keras_mwbp.MultiWayModel). Received: model={model!r}"
        )
    try:
        outputs = list(model.outputs)
    except (AttributeError, TypeError, ValueError):
        outputs = None
    if not outputs or model.inputs is None:
        raise TypeError(
            "`model` must be a functional keras.Model with inputs and "
            f"outputs. Received: model={model!r}"
        )
    if len(outputs) < 2:
        raise ValueError(
            "`model` must have at least two outputs (auxiliary heads, then "
            f"the final head). Received: {len(outputs)} output(s)."
        )
    return outputs


def _check_positive_int(value, argument):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value <= 0
    ):
        raise ValueError(
            f"`{argument}` must be a positive integer. "
            f"Received: {argument}={value!r}"
        )
    return int(value)


def _check_heads(heads, num_aux):
    if heads is None:
        return tuple(range(num_aux))
    if isinstance(heads, (str, bytes)) or not hasattr(heads, "__iter__"):
        raise ValueError(
            "`heads` must be a list of auxiliary head indices or None. "
            f"Received: heads={heads!r}"
        )
    heads = list(heads)
    valid = (
        heads
        and all(
            isinstance(i, numbers.Integral)
            and not isinstance(i, bool)
            and 0 <= i < num_aux
            for i in heads
        )
        and len(set(heads)) == len(heads)
    )
    if not valid:
        raise ValueError(
            "`heads` must be a non-empty list of distinct auxiliary head "
            f"indices from 0 to {num_aux - 1} (the final head is not "
            f"trained). Received: heads={heads!r}"
        )
    return tuple(sorted(int(i) for i in heads))


def _check_data(data):
    """Returns `(x, y)` arrays, or `None` for a `tf.data.Dataset`."""
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise TypeError(
                "`data` must be a tuple `(x, y)` or a tf.data.Dataset. "
                f"Received: a {type(data).__name__} of {len(data)} items."
            )
        x, y = data
        y = np.asarray(y)
        lengths = {len(a) for a in keras.tree.flatten(x)}
        if len(lengths) != 1 or lengths != {len(y)} or len(y) == 0:
            raise ValueError(
                "`data` must hold inputs and labels with the same, non-zero "
                f"number of samples. Received: input lengths {sorted(lengths)}"
                f" and {len(y)} labels."
            )
        return x, y
    try:
        import tensorflow as tf
    except ImportError:  # pragma: no cover - TensorFlow is the backend.
        tf = None
    if tf is not None and isinstance(data, tf.data.Dataset):
        return None
    raise TypeError(
        "`data` must be a tuple `(x, y)` of arrays or a tf.data.Dataset of "
        f"(x, y) batches. Received: data of type {type(data).__name__}"
    )


def _layers_of(inputs, output):
    """The layers of the functional graph from `inputs` to `output`."""
    return keras.Model(inputs, output).layers


def _permutation(num_samples, seed, epoch):
    if seed is None:
        return np.random.permutation(num_samples)
    rng = np.random.default_rng([int(seed), int(epoch)])
    return rng.permutation(num_samples)


def _take(x, order):
    return keras.tree.map_structure(lambda a: np.asarray(a)[order], x)
