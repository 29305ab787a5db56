"""DenseNet-BC for CIFAR (Huang et al. 2017) with auxiliary heads.

A 3x3 convolution with `2k` filters, three dense blocks of `n = (d - 4) / 6`
bottleneck layers (BN -> ReLU -> 1x1 conv with `4k` filters -> BN -> ReLU ->
3x3 conv with `k` filters, concatenated to the layer's input), joined by
transitions (BN -> ReLU -> 1x1 conv halving the channels -> 2x2 average
pooling), then BN -> ReLU -> global average pooling -> dense. The "blocks"
that can carry auxiliary heads are the dense layers: their outputs are the
concatenations.
"""

from keras import layers

from keras_mwbp.heads import bn_relu_pool_dense
from keras_mwbp.models.blocks import apply_bn_relu
from keras_mwbp.models.blocks import apply_conv
from keras_mwbp.models.taps import check_heads
from keras_mwbp.models.zoo_common import check_positive_int
from keras_mwbp.models.zoo_common import is_int
from keras_mwbp.models.zoo_common import multiway_model

BOTTLENECK_FACTOR = 4
COMPRESSION = 0.5


def apply_dense_layer(x, growth_rate, name):
    """Bottleneck dense layer: `x` concatenated with `k` new feature maps.

    Args:
        x: Feature tensor of shape `(batch, height, width, channels)`.
        growth_rate: New channels `k`.
        name: Prefix of the layer names.

    Returns:
        `channels + k` maps (layer `"{name}_out"`).
    """
    y = apply_bn_relu(x, f"{name}_1_bn", f"{name}_1_relu")
    y = apply_conv(y, BOTTLENECK_FACTOR * growth_rate, 1, 1, f"{name}_conv1")
    y = apply_bn_relu(y, f"{name}_2_bn", f"{name}_2_relu")
    y = apply_conv(y, growth_rate, 3, 1, f"{name}_conv2")
    return layers.Concatenate(name=f"{name}_out")([x, y])


def apply_transition(x, name):
    """BN -> ReLU -> 1x1 conv (half the channels) -> 2x2 average pooling."""
    filters = int(x.shape[-1] * COMPRESSION)
    x = apply_bn_relu(x, f"{name}_bn", f"{name}_relu")
    x = apply_conv(x, filters, 1, 1, f"{name}_conv")
    return layers.AveragePooling2D(2, name=f"{name}_pool")(x)


def densenet_bc(
    depth=100,
    growth_rate=12,
    num_classes=10,
    num_losses=1,
    taps=None,
    input_shape=(32, 32, 3),
    method="mwbp",
    nu=2.0,
    head=None,
):
    """DenseNet-BC-d (growth rate k) with auxiliary heads, ready to compile.

    Args:
        depth: Depth `d = 6n + 4`, `n >= 1` dense layers per block (100:
            `n = 16`; 250, 190 as in the paper).
        growth_rate: Growth rate `k`, a positive integer.
        num_classes: Number of classes of every head.
        num_losses: Number of heads (losses), final included, at most `3n`.
            `1` gives a plain network; train it with `method="standard"`.
        taps: 1-based indices of the dense layers (over all three blocks)
            whose outputs carry the `num_losses - 1` auxiliary heads,
            strictly increasing and below the last. `None` spreads them
            evenly.
        input_shape: Shape of one input image.
        method: Training method of `keras_mwbp.MultiWayModel`.
        nu: Decay rate of the loss weights (paper Eq. 5).
        head: Auxiliary head builder `head(x, num_classes, name)` returning
            logits, its layers named `"{name}_..."`. Defaults to
            `keras_mwbp.heads.bn_relu_pool_dense` (type A). The final head is
            always BN -> ReLU -> pool -> dense.

    Returns:
        An uncompiled `keras_mwbp.MultiWayModel` whose outputs are
        `"head_0", ..., "final"` (see `keras_mwbp.heads`).

    Example:

    >>> model = densenet_bc(100, 12, num_losses=4)
    >>> model.num_heads
    4
    """
    if not is_int(depth) or depth < 10 or (depth - 4) % 6:
        raise ValueError(
            "`depth` must be 6n+4 with n >= 1 (10, 16, ..., 100, ...). "
            f"Received: depth={depth!r}"
        )
    check_positive_int(growth_rate, "growth_rate")
    layers_per_block = (depth - 4) // 6
    taps = check_heads(
        num_losses, taps, 3 * layers_per_block,
        f"DenseNet-BC-{depth} (k={growth_rate})",
    )
    inputs = layers.Input(shape=input_shape, name="image")
    x = apply_conv(inputs, 2 * growth_rate, 3, 1, "stem_conv")
    block_outputs = []
    for block in range(3):
        if block:
            x = apply_transition(x, f"transition_{block}")
        for _ in range(layers_per_block):
            x = apply_dense_layer(
                x, growth_rate, f"block_{len(block_outputs) + 1}"
            )
            block_outputs.append(x)
    final = bn_relu_pool_dense(x, num_classes, "final")
    return multiway_model(
        inputs, block_outputs, final, taps, num_classes, head, method, nu,
        f"densenet_bc{depth}_{growth_rate}",
    )
