"""Checks of `MultiWayModel.compile` that warn rather than refuse."""

import warnings

import keras

from keras_mwbp.graph import producing_node

# Losses whose `from_logits=False` default expects probabilities.
_PROBABILITY_LOSSES = (
    keras.losses.SparseCategoricalCrossentropy,
    keras.losses.CategoricalCrossentropy,
    keras.losses.BinaryCrossentropy,
    keras.losses.CategoricalFocalCrossentropy,
    keras.losses.BinaryFocalCrossentropy,
)
_PROBABILITY_FUNCTIONS = (
    keras.losses.sparse_categorical_crossentropy,
    keras.losses.categorical_crossentropy,
    keras.losses.binary_crossentropy,
    keras.losses.categorical_focal_crossentropy,
    keras.losses.binary_focal_crossentropy,
)
# Layers that pass their input's kind (logits or probabilities) through.
_PASS_THROUGH = (
    keras.layers.Identity,
    keras.layers.Reshape,
    keras.layers.Flatten,
    keras.layers.Dropout,
)


def warn_if_logits_meet_probability_losses(model, head_losses):
    """Warns when a head ends in a linear layer but its loss expects
    probabilities.

    A head whose logits come from a layer without an activation (e.g.
    `Dense(10)`, as every head builder of keras_mwbp makes them), trained
    with a crossentropy whose `from_logits` is False (the default of
    `keras.losses.SparseCategoricalCrossentropy()` and of the string
    `"sparse_categorical_crossentropy"`), trains much worse, silently: the
    loss clips the "probabilities" instead of applying a softmax.

    Args:
        model: A `MultiWayModel` (its `outputs` and `output_names`).
        head_losses: One `keras.losses.Loss` per output.

    Returns:
        The names of the heads warned about (possibly empty).
    """
    heads = [
        name
        for name, output, loss in zip(
            model.output_names, model.outputs, head_losses
        )
        if _expects_probabilities(loss) and _ends_in_linear_layer(output)
    ]
    if heads:
        losses = sorted({
            _loss_name(loss) for name, loss in zip(model.output_names,
                                                   head_losses)
            if name in heads
        })
        warnings.warn(
            f"The heads {heads} end in a linear layer (they output logits), "
            f"but their loss {', '.join(losses)} expects probabilities "
            "(from_logits=False). Pass `from_logits=True`, e.g. "
            "loss=keras.losses.SparseCategoricalCrossentropy("
            "from_logits=True), or end the heads in a softmax.",
            UserWarning,
            stacklevel=4,  # The caller of compile (through its tracking wrapper).
        )
    return heads


def _expects_probabilities(loss):
    if isinstance(loss, _PROBABILITY_LOSSES):
        return not loss.get_config().get("from_logits", False)
    fn = getattr(loss, "fn", None)
    if fn in _PROBABILITY_FUNCTIONS:
        kwargs = getattr(loss, "_fn_kwargs", None) or {}
        return not kwargs.get("from_logits", False)
    return False


def _loss_name(loss):
    fn = getattr(loss, "fn", None)
    if fn in _PROBABILITY_FUNCTIONS:
        return repr(fn.__name__)
    return type(loss).__name__


def _ends_in_linear_layer(tensor):
    """Whether `tensor` comes from a layer without an activation (through
    layers that pass it on unchanged, such as `Identity`); False if the
    last layer is a softmax or sigmoid, or is not known."""
    for _ in range(100):
        node = producing_node(tensor)
        if node is None:
            return False
        layer = node.operation
        inputs = keras.tree.flatten(node.input_tensors)
        activation = getattr(layer, "activation", None)
        if isinstance(layer, _PASS_THROUGH) or (
            isinstance(layer, keras.layers.Activation)
            and activation is keras.activations.linear
        ):
            if len(inputs) != 1:
                return False
            tensor = inputs[0]
            continue
        if isinstance(layer, keras.layers.Activation) or isinstance(
            layer, keras.layers.Softmax
        ):
            return False
        return (
            activation is keras.activations.linear
            and len(getattr(layer, "weights", [])) > 0
        )
    return False
