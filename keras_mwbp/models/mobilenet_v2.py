"""MobileNetV2 for CIFAR (kuangliu/pytorch-cifar) with auxiliary heads.

MobileNetV2 (Sandler et al. 2018) as adapted to 32x32 images in
kuangliu/pytorch-cifar (`models/mobilenetv2.py`): a 3x3 convolution with 32
filters and stride 1 (not 2), seventeen inverted residual blocks whose
second stage (24 channels) keeps stride 1 (not 2), a 1x1 convolution to 1280
channels, global average pooling and a dense classifier. A block is 1x1
expansion conv -> BN -> ReLU -> 3x3 depthwise conv -> BN -> ReLU -> 1x1
projection conv -> BN, plus, where the stride is 1, the identity or (where
the channels change) a 1x1 convolution + BN. As in that code, the first
block also has an expansion convolution (factor 1) and the activations are
ReLU, not ReLU6.
"""

from keras import layers

from keras_mwbp.heads import batch_normalization
from keras_mwbp.heads import pool_dense
from keras_mwbp.models.blocks import apply_conv
from keras_mwbp.models.taps import check_heads
from keras_mwbp.models.zoo_common import multiway_model

# (expansion, output channels, blocks, stride of the first block); the second
# row has stride 1 instead of 2 for CIFAR.
MOBILENET_V2_CIFAR_CONFIG = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_FILTERS = 32
TOP_FILTERS = 1280


def apply_inverted_residual_block(x, expansion, out_filters, strides, name):
    """Inverted residual block with a linear bottleneck.

    Args:
        x: Feature tensor of shape `(batch, height, width, channels)`.
        expansion: Expansion factor of the 1x1 convolution.
        out_filters: Output channels.
        strides: Stride of the depthwise convolution.
        name: Prefix of the layer names.

    Returns:
        The block's output (layer `"{name}_out"`).
    """
    in_filters = x.shape[-1]
    y = apply_conv(x, expansion * in_filters, 1, 1, f"{name}_expand_conv")
    y = batch_normalization(f"{name}_expand_bn")(y)
    y = layers.ReLU(name=f"{name}_expand_relu")(y)
    y = layers.DepthwiseConv2D(
        3,
        strides=strides,
        padding="same",
        use_bias=False,
        depthwise_initializer="he_normal",
        name=f"{name}_depthwise_conv",
    )(y)
    y = batch_normalization(f"{name}_depthwise_bn")(y)
    y = layers.ReLU(name=f"{name}_depthwise_relu")(y)
    y = apply_conv(y, out_filters, 1, 1, f"{name}_project_conv")
    y = batch_normalization(f"{name}_project_bn")(y)
    if strides != 1:
        return layers.Identity(name=f"{name}_out")(y)
    shortcut = x
    if in_filters != out_filters:
        shortcut = apply_conv(x, out_filters, 1, 1, f"{name}_shortcut_conv")
        shortcut = batch_normalization(f"{name}_shortcut_bn")(shortcut)
    return layers.Add(name=f"{name}_out")([shortcut, y])


def cifar_mobilenet_v2(
    num_classes=10,
    num_losses=1,
    taps=None,
    input_shape=(32, 32, 3),
    method="mwbp",
    nu=2.0,
    head=None,
):
    """MobileNetV2 for CIFAR with auxiliary heads, ready to compile.

    Args:
        num_classes: Number of classes of every head.
        num_losses: Number of heads (losses), final included, at most 17.
            `1` gives a plain network; train it with `method="standard"`.
        taps: 1-based indices of the inverted residual blocks (1 to 16)
            whose outputs carry the `num_losses - 1` auxiliary heads,
            strictly increasing. `None` spreads them evenly.
        input_shape: Shape of one input image.
        method: Training method of `keras_mwbp.MultiWayModel`.
        nu: Decay rate of the loss weights (paper Eq. 5).
        head: Auxiliary head builder `head(x, num_classes, name)` returning
            logits, its layers named `"{name}_..."`. Defaults to
            `keras_mwbp.heads.bn_relu_pool_dense` (type A). The final head is
            the 1x1 convolution to 1280 channels -> BN -> ReLU, then
            `pool_dense`.

    Returns:
        An uncompiled `keras_mwbp.MultiWayModel` whose outputs are
        `"head_0", ..., "final"` (see `keras_mwbp.heads`).

    Example:

    >>> model = cifar_mobilenet_v2(num_classes=100, num_losses=3)
    >>> model.output_names
    ['head_0', 'head_1', 'final']
    """
    num_blocks = sum(row[2] for row in MOBILENET_V2_CIFAR_CONFIG)
    taps = check_heads(num_losses, taps, num_blocks, "MobileNetV2")
    inputs = layers.Input(shape=input_shape, name="image")
    x = apply_conv(inputs, STEM_FILTERS, 3, 1, "stem_conv")
    x = batch_normalization("stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    block_outputs = []
    for expansion, out_filters, blocks, first_stride in MOBILENET_V2_CIFAR_CONFIG:
        for index in range(blocks):
            strides = first_stride if index == 0 else 1
            name = f"block_{len(block_outputs) + 1}"
            x = apply_inverted_residual_block(
                x, expansion, out_filters, strides, name
            )
            block_outputs.append(x)
    x = apply_conv(x, TOP_FILTERS, 1, 1, "top_conv")
    x = batch_normalization("top_bn")(x)
    x = layers.ReLU(name="top_relu")(x)
    final = pool_dense(x, num_classes, "final")
    return multiway_model(
        inputs, block_outputs, final, taps, num_classes, head, method, nu,
        "cifar_mobilenet_v2",
    )
