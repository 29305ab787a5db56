"""The zoo's shared model constructor (`multiway_model`) and argument checks.

The layers the networks are made of live in `keras_mwbp.models.blocks`, the
placement of the heads in `keras_mwbp.models.taps`.
"""

from keras_mwbp.heads import FINAL_HEAD
from keras_mwbp.heads import bn_relu_pool_dense
from keras_mwbp.heads import output_name
from keras_mwbp.multi_way_model import MultiWayModel


def is_int(value):
    """Whether `value` is an `int` (and not a `bool`)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_int(value, argument):
    """Raises `ValueError` unless `value` is a positive integer."""
    if not is_int(value) or value < 1:
        raise ValueError(
            f"`{argument}` must be a positive integer. "
            f"Received: {argument}={value!r}"
        )


def multiway_model(
    inputs,
    block_outputs,
    final_logits,
    taps,
    num_classes,
    head,
    method,
    nu,
    name,
    **kwargs,
):
    """Puts auxiliary heads on `block_outputs` and builds the model.

    Args:
        inputs: Input tensor.
        block_outputs: Output of every block, first to last.
        final_logits: Logits of the final head, or a function of no
            argument that builds them after the auxiliary heads (so that
            their layers, and the weights a seed gives them, come first).
        taps: 1-based indices of the blocks carrying auxiliary heads.
        num_classes: Number of classes of every head.
        head: Auxiliary head builder, or `None` for type A
            (`bn_relu_pool_dense`).
        method: Training method of `MultiWayModel`.
        nu: Decay rate of the loss weights.
        name: Model name (a `name` in `kwargs` overrides it).
        **kwargs: Other `keras_mwbp.MultiWayModel` arguments.

    Returns:
        An uncompiled `MultiWayModel` with outputs `"head_0", ...,
        "final"` (the naming convention of `keras_mwbp.heads`).
    """
    head = head or bn_relu_pool_dense
    outputs = [
        output_name(
            head(block_outputs[block - 1], num_classes, f"head_{index}"),
            f"head_{index}",
        )
        for index, block in enumerate(taps)
    ]
    if callable(final_logits):
        final_logits = final_logits()
    outputs.append(output_name(final_logits, FINAL_HEAD))
    return MultiWayModel(
        inputs=inputs, outputs=outputs, method=method, nu=nu,
        **{"name": name, **kwargs},
    )
