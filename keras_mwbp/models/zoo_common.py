"""Shared argument checks and head wiring of the model zoo.

Every zoo network is a trunk whose "blocks" (residual blocks, dense layers,
inverted residuals) each produce one feature tensor. Auxiliary heads sit on
the outputs of chosen blocks, the final head on the trunk's last feature map.
"""

from keras import layers

from keras_mwbp.heads import FINAL_HEAD
from keras_mwbp.heads import batch_normalization
from keras_mwbp.heads import bn_relu_pool_dense
from keras_mwbp.heads import output_name
from keras_mwbp.models.cifar_resnet import apply_conv  # noqa: F401 (re-export)
from keras_mwbp.models.cifar_resnet import check_taps
from keras_mwbp.models.cifar_resnet import official_taps
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


def check_heads(num_losses, taps, num_blocks, network):
    """Checks `num_losses` and `taps`; returns the taps to use.

    Args:
        num_losses: Number of heads, final included.
        taps: 1-based block indices of the auxiliary heads, or `None` for
            heads spread evenly (`official_taps`).
        num_blocks: Blocks of the trunk.
        network: Name of the network, for error messages.

    Returns:
        List of the `num_losses - 1` tap block indices.
    """
    if not is_int(num_losses) or not 1 <= num_losses <= num_blocks:
        raise ValueError(
            f"`num_losses` must be an integer from 1 to {num_blocks} (the "
            f"blocks of {network}). Received: num_losses={num_losses!r}"
        )
    if taps is None:
        taps = official_taps(num_blocks, num_losses)
    check_taps(taps, num_blocks, num_losses)
    return list(taps)


def apply_bn_relu(x, name):
    """BN -> ReLU, layers `"{name}_bn"` and `"{name}_relu"`."""
    x = batch_normalization(f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


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
):
    """Puts auxiliary heads on `block_outputs` and builds the model.

    Args:
        inputs: Input tensor.
        block_outputs: Output of every block, first to last.
        final_logits: Logits of the final head.
        taps: 1-based indices of the blocks carrying auxiliary heads.
        num_classes: Number of classes of every head.
        head: Auxiliary head builder, or `None` for type A
            (`bn_relu_pool_dense`).
        method: Training method of `MultiWayModel`.
        nu: Decay rate of the loss weights.
        name: Model name.

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
    outputs.append(output_name(final_logits, FINAL_HEAD))
    return MultiWayModel(
        inputs=inputs, outputs=outputs, method=method, nu=nu, name=name
    )
