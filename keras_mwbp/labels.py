"""Label checks of `MultiWayModel`: one label array that fits every head.

`check_labels` runs in every train and test step on the labels' static
shapes; `check_array_labels` runs in `fit` and `evaluate` on in-memory labels
before any step (values too: class indices within each head's logits, whole
numbers, no strings). Both raise a `ValueError` that names `y`.
"""

import types

import keras
import numpy as np

from keras_mwbp import _compat
from keras_mwbp import data_order

_SPARSE_LOSSES = (keras.losses.SparseCategoricalCrossentropy,)
_SPARSE_FUNCTIONS = (keras.losses.sparse_categorical_crossentropy,)


def check_labels(model, y):
    """Raises `ValueError` if `y` is not one label array fitting every
    head (checked on static shapes, before anything runs)."""
    if y is None:
        raise ValueError(
            "`y` is required: one label array used by every head. "
            "Received: y=None"
        )
    if isinstance(y, (list, tuple, dict)):
        shapes = keras.tree.map_structure(lambda t: tuple(t.shape), y)
        raise ValueError(
            "`y` must be one label array used by every head, not one per "
            f"head. Received: y with structure {shapes}"
        )
    if getattr(y.shape, "rank", 0) is None:
        return  # Retraced with an unknown rank: nothing static to check.
    y_shape = tuple(y.shape)
    for name, output, loss_fn in zip(
        model.output_names, model.outputs, model._head_losses
    ):
        rule = label_rule(loss_fn)
        if rule is not None and not rule(y_shape, tuple(output.shape)):
            raise ValueError(
                f"`y` has the wrong shape for head '{name}' (outputs of "
                f"shape {tuple(output.shape)}, loss "
                f"{getattr(loss_fn, 'name', loss_fn)}). Received: y with "
                f"shape {y_shape}"
            )


def check_array_labels(model, y):
    """Checks in-memory labels before any step: their shape (as
    `check_labels` does in the step, whose traced shapes Keras may relax
    to an unknown rank after a retrace) and, for a head with a sparse
    loss, that every label is a whole number and a class index of its
    logits (the loss's `ignore_class` excepted). Labels must be numbers
    (not strings). Raises `ValueError` naming `y`."""
    losses = getattr(model, "_head_losses", None)
    if losses is None or y is None or isinstance(y, (list, tuple, dict)):
        return
    leaves = data_order.array_leaves(y)
    if not leaves:
        return
    labels = leaves[0]
    if labels.dtype.kind not in "biuf":
        example = labels.ravel()[:1].tolist()[0] if labels.size else None
        raise ValueError(
            "`y` must hold numbers (class indices or targets), e.g. "
            "integer class indices for a sparse loss; map string labels "
            "to indices first. Received: y with dtype "
            f"{labels.dtype} (first value {example!r})"
        )
    check_labels(
        model, types.SimpleNamespace(shape=(None,) + tuple(labels.shape[1:]))
    )
    if labels.size == 0:
        return
    for name, output, loss_fn in zip(model.output_names, model.outputs,
                                     losses):
        classes = output.shape[-1]
        if (
            label_rule(loss_fn) is not sparse_labels_fit
            or classes is None
            or not sparse_labels_fit(labels.shape, tuple(output.shape))
        ):
            continue
        values = labels
        ignore = _compat.loss_function_kwargs(loss_fn).get("ignore_class")
        if ignore is not None:
            values = labels[labels != ignore]
        if values.size == 0:
            continue
        if values.dtype.kind == "f":
            fractional = values[values != np.floor(values)]
            if fractional.size:
                raise ValueError(
                    f"`y` must hold whole-number class indices for head "
                    f"'{name}' (loss {getattr(loss_fn, 'name', loss_fn)} "
                    "would truncate the others). Received: y with "
                    f"non-integer values such as {fractional.flat[0].item()!r}"
                )
        low, high = values.min(), values.max()
        if low < 0 or high >= classes:
            raise ValueError(
                f"`y` must hold class indices in [0, {classes - 1}] for "
                f"head '{name}' ({classes} logits, loss "
                f"{getattr(loss_fn, 'name', loss_fn)}). Received: y with "
                f"values in [{low}, {high}]"
            )


def label_rule(loss_fn):
    """The label shape rule for a loss, or None if it is unknown."""
    fn = getattr(loss_fn, "fn", None)
    if isinstance(loss_fn, _SPARSE_LOSSES) or fn in _SPARSE_FUNCTIONS:
        return sparse_labels_fit
    owner = fn if isinstance(loss_fn, _compat.LossFunctionWrapper) else (
        type(loss_fn))
    if getattr(owner, "__module__", "").startswith("keras."):
        return dense_labels_fit
    return None


def _dims_match(a, b):
    return len(a) == len(b) and all(
        x is None or y is None or x == y for x, y in zip(a, b)
    )


def sparse_labels_fit(y_shape, out_shape):
    return _dims_match(y_shape, out_shape[:-1]) or (
        _dims_match(y_shape[:-1], out_shape[:-1])
        and len(y_shape) == len(out_shape)
        and y_shape[-1] == 1
    )


def dense_labels_fit(y_shape, out_shape):
    return _dims_match(y_shape, out_shape) or (
        _dims_match(y_shape, out_shape[:-1]) and out_shape[-1] == 1
    )
