"""ResNeXt-29 for CIFAR (Xie et al. 2017) with auxiliary heads.

A 3x3 convolution with 64 filters, three stages of three bottleneck blocks
with 256, 512 and 1024 output channels (stride 2 at the start of the second
and third stage), global average pooling and a dense classifier. A block is
1x1 conv -> BN -> ReLU -> grouped 3x3 conv (`cardinality` groups) -> BN ->
ReLU -> 1x1 conv -> BN, plus the identity or a 1x1 convolution + BN, then
ReLU. The inner width is `cardinality * bottleneck_width` in the first stage
and doubles with every stage (8x64d: 512, 1024, 2048), as in the authors'
code. 29 = 3 stages * 3 blocks * 3 layers + stem + classifier.
"""

from keras import layers

from keras_mwbp.heads import batch_normalization
from keras_mwbp.heads import pool_dense
from keras_mwbp.models.blocks import apply_conv
from keras_mwbp.models.taps import check_heads
from keras_mwbp.models.zoo_common import check_positive_int
from keras_mwbp.models.zoo_common import multiway_model

STEM_FILTERS = 64
STAGE_OUTPUT_FILTERS = (256, 512, 1024)
BLOCKS_PER_STAGE = 3


def apply_resnext_block(x, width, cardinality, out_filters, strides, name):
    """ResNeXt bottleneck block, form (c) of Xie et al. (grouped conv).

    Args:
        x: Feature tensor of shape `(batch, height, width, channels)`.
        width: Channels of the grouped 3x3 convolution.
        cardinality: Number of groups.
        out_filters: Output channels.
        strides: Stride of the grouped convolution and of the projection.
        name: Prefix of the layer names.

    Returns:
        The block's output, after the final ReLU (layer `"{name}_out"`).
    """
    shortcut = x
    if strides != 1 or x.shape[-1] != out_filters:
        shortcut = apply_conv(x, out_filters, 1, strides, f"{name}_shortcut_conv")
        shortcut = batch_normalization(f"{name}_shortcut_bn")(shortcut)
    y = apply_conv(x, width, 1, 1, f"{name}_conv1")
    y = batch_normalization(f"{name}_bn1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = apply_conv(y, width, 3, strides, f"{name}_conv2", groups=cardinality)
    y = batch_normalization(f"{name}_bn2")(y)
    y = layers.ReLU(name=f"{name}_relu2")(y)
    y = apply_conv(y, out_filters, 1, 1, f"{name}_conv3")
    y = batch_normalization(f"{name}_bn3")(y)
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.ReLU(name=f"{name}_out")(y)


def resnext29(
    cardinality=8,
    bottleneck_width=64,
    num_classes=10,
    num_losses=1,
    taps=None,
    input_shape=(32, 32, 3),
    method="mwbp",
    nu=2.0,
    head=None,
):
    """ResNeXt-29 (C x d) with auxiliary heads, ready to compile.

    Args:
        cardinality: Number of groups `C` of the 3x3 convolutions.
        bottleneck_width: Channels per group `d` in the first stage.
        num_classes: Number of classes of every head.
        num_losses: Number of heads (losses), final included, at most 9.
            `1` gives a plain network; train it with `method="standard"`.
        taps: 1-based indices of the blocks (1 to 8) whose outputs carry
            the `num_losses - 1` auxiliary heads, strictly increasing.
            `None` spreads them evenly.
        input_shape: Shape of one input image.
        method: Training method of `keras_mwbp.MultiWayModel`.
        nu: Decay rate of the loss weights (paper Eq. 5).
        head: Auxiliary head builder `head(x, num_classes, name)` returning
            logits, its layers named `"{name}_..."`. Defaults to
            `keras_mwbp.heads.bn_relu_pool_dense` (type A). The final head is
            always `pool_dense`.

    Returns:
        An uncompiled `keras_mwbp.MultiWayModel` whose outputs are
        `"head_0", ..., "final"` (see `keras_mwbp.heads`).

    Example:

    >>> model = resnext29(8, 64, num_losses=3)  # ResNeXt-29 8x64d
    >>> model.output_names
    ['head_0', 'head_1', 'final']
    """
    check_positive_int(cardinality, "cardinality")
    check_positive_int(bottleneck_width, "bottleneck_width")
    num_blocks = 3 * BLOCKS_PER_STAGE
    taps = check_heads(
        num_losses, taps, num_blocks,
        f"ResNeXt-29 {cardinality}x{bottleneck_width}d",
    )
    inputs = layers.Input(shape=input_shape, name="image")
    x = apply_conv(inputs, STEM_FILTERS, 3, 1, "stem_conv")
    x = batch_normalization("stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    block_outputs = []
    for stage, out_filters in enumerate(STAGE_OUTPUT_FILTERS):
        width = cardinality * bottleneck_width * 2**stage
        for index in range(BLOCKS_PER_STAGE):
            strides = 2 if stage > 0 and index == 0 else 1
            name = f"block_{len(block_outputs) + 1}"
            x = apply_resnext_block(
                x, width, cardinality, out_filters, strides, name
            )
            block_outputs.append(x)
    final = pool_dense(x, num_classes, "final")
    return multiway_model(
        inputs, block_outputs, final, taps, num_classes, head, method, nu,
        f"resnext29_{cardinality}x{bottleneck_width}d",
    )
