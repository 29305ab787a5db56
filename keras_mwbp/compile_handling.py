"""How `MultiWayModel.compile` reads its arguments.

One loss and one metrics list for every head, a list with one entry per
output or a dict keyed by output name become one entry per head
(`per_head_losses`, `per_head_metrics`), each checked before any state
changes (a `ValueError` naming the argument); `warn_if_logits_meet_probability_losses`
warns where a head's logits meet a loss that expects probabilities.
"""

import re
import warnings

import keras

from keras_mwbp import _compat

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
        kwargs = _compat.loss_function_kwargs(loss)
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


def per_head_values(model, value, argument):
    """Expands `value` to one entry per output (None stays None)."""
    names = model.output_names
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(
                f"The keys of `{argument}` must be output names {names}. "
                f"Received unknown keys: {unknown}"
            )
        return [value.get(name) for name in names]
    return None


def per_head_losses(model, loss):
    if loss is None:
        raise ValueError(
            "`loss` is required: one loss for every head, a list with "
            "one loss per output, or a dict keyed by output name. "
            "Received: loss=None"
        )
    names = model.output_names
    per_head = per_head_values(model, loss, "loss")
    if per_head is None and isinstance(loss, (list, tuple)):
        if len(loss) != len(names):
            raise ValueError(
                f"`loss` as a list must have one entry per output "
                f"({len(names)}). Received: loss={loss!r}"
            )
        per_head = list(loss)
    if per_head is None:
        per_head = [loss] * len(names)
    missing = [n for n, item in zip(names, per_head) if item is None]
    if missing:
        raise ValueError(
            f"`loss` must give a loss for every output. Missing: {missing}"
        )
    return [loss_object(item) for item in per_head]


def per_head_metrics(model, metrics, argument):
    if metrics is None:
        return None
    per_head = per_head_values(model, metrics, argument)
    if per_head is not None:
        return checked_metrics(
            [metric_list(m) for m in per_head], argument, metrics
        )
    if not isinstance(metrics, (list, tuple)):
        raise ValueError(
            f"`{argument}` must be a list, a list of lists (one per "
            f"output) or a dict keyed by output name. "
            f"Received: {argument}={metrics!r}"
        )
    if metrics and all(
        m is None or isinstance(m, (list, tuple)) for m in metrics
    ):
        if len(metrics) != model.num_heads:
            raise ValueError(
                f"`{argument}` as a list of lists must have one list per "
                f"output ({model.num_heads}). "
                f"Received: {argument}={metrics!r}"
            )
        return checked_metrics(
            [list(m or []) for m in metrics], argument, metrics
        )
    checked_metrics([list(metrics)], argument, metrics)
    return [[clone_metric(m) for m in metrics]
            for _ in range(model.num_heads)]


def loss_object(identifier):
    try:
        loss = keras.losses.get(identifier)
    except (ValueError, TypeError, KeyError):
        loss = None
    if loss is None or not callable(loss):
        raise ValueError(
            "`loss` must be a Keras loss, the name of one or a callable "
            f"(y_true, y_pred) -> loss. Received: loss={identifier!r}"
        ) from None
    if isinstance(loss, keras.losses.Loss):
        return loss
    # A name TensorFlow accepts as a name scope ("<lambda>", "_loss" fail).
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", getattr(loss, "__name__", ""))
    return _compat.LossFunctionWrapper(loss, name=name.lstrip("_.-") or "loss")


# Names `CompileMetrics` resolves from the labels' and outputs' shapes.
_SHAPE_DEPENDENT_METRICS = ("accuracy", "acc", "crossentropy", "ce")


def metric_list(metrics):
    """One head's entry of a `metrics` dict as a list: a list or tuple of
    metrics, a single metric (name, object or callable) or None, as in
    `keras.Model.compile`."""
    if metrics is None:
        return []
    if isinstance(metrics, (list, tuple)):
        return list(metrics)
    return [metrics]


def checked_metrics(per_head, argument, received):
    """`per_head` (lists of metrics), once every named or configured metric
    is known to Keras; raises `ValueError` naming `argument` otherwise."""
    for metrics in per_head:
        for metric in metrics:
            if metric is None or (
                isinstance(metric, str)
                and metric in _SHAPE_DEPENDENT_METRICS
            ):
                continue
            if isinstance(metric, (str, dict)):
                try:
                    known = keras.metrics.get(metric) is not None
                except (ValueError, TypeError, KeyError):
                    known = False
            else:
                known = callable(metric)
            if not known:
                raise ValueError(
                    f"`{argument}` must hold Keras metrics, the names of "
                    "metrics or callables (y_true, y_pred) -> value. "
                    f"Unknown metric: {metric!r}. "
                    f"Received: {argument}={received!r}"
                )
    return per_head


def clone_metric(metric):
    if isinstance(metric, keras.metrics.Metric):
        return metric.__class__.from_config(metric.get_config())
    return metric
