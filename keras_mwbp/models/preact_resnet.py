"""The pre-activation CIFAR ResNet of He et al. (2016b) with auxiliary heads.

"Identity Mappings in Deep Residual Networks" (ECCV 2016): every residual
unit is BN -> ReLU -> conv -> ... with nothing after the addition. A 3x3
convolution with 16 filters is followed by three stages with 16, 32 and 64
filters (stride 2 at the start of the second and third stage) of basic units
(two 3x3 convolutions, depth `6n + 2`) or bottleneck units (1x1, 3x3, 1x1 with
4x expansion, depth `9n + 2`), then BN -> ReLU -> global average pooling ->
dense. Where the shape changes, the shortcut is a bias-free 1x1 convolution
of the pre-activated input (no BN), as in the authors' code.
"""

from keras import layers

from keras_mwbp.heads import bn_relu_pool_dense
from keras_mwbp.models.blocks import apply_bn_relu
from keras_mwbp.models.blocks import apply_conv
from keras_mwbp.models.taps import check_heads
from keras_mwbp.models.zoo_common import multiway_model

# depth -> (unit, units per stage). Basic: 6n + 2; bottleneck: 9n + 2.
PREACT_RESNET_PRESETS = {
    8: ("basic", 1),
    14: ("basic", 2),
    20: ("basic", 3),
    32: ("basic", 5),
    44: ("basic", 7),
    56: ("basic", 9),
    110: ("basic", 18),
    164: ("bottleneck", 18),
    1001: ("bottleneck", 111),
}
STAGE_FILTERS = (16, 32, 64)
BOTTLENECK_EXPANSION = 4


def apply_preact_basic_block(x, filters, strides, name, dropout_rate=0.0):
    """Pre-activation basic unit (He et al. 2016b, Fig. 1b; WRN's B(3,3)).

    BN -> ReLU -> 3x3 conv -> BN -> ReLU -> [dropout] -> 3x3 conv, plus the
    identity, or a 1x1 convolution of the pre-activated input where the shape
    changes.

    Args:
        x: Feature tensor of shape `(batch, height, width, channels)`.
        filters: Output channels.
        strides: Stride of the first convolution and of the projection.
        name: Prefix of the layer names, e.g. `"block_3"`.
        dropout_rate: Rate of the dropout between the convolutions (WRN);
            `0` adds no dropout layer.

    Returns:
        The block's output, the sum (layer `"{name}_out"`).
    """
    preact = apply_bn_relu(x, f"{name}_bn1", f"{name}_relu1")
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = apply_conv(preact, filters, 1, strides, f"{name}_shortcut_conv")
    y = apply_conv(preact, filters, 3, strides, f"{name}_conv1")
    y = apply_bn_relu(y, f"{name}_bn2", f"{name}_relu2")
    if dropout_rate:
        y = layers.Dropout(dropout_rate, name=f"{name}_dropout")(y)
    y = apply_conv(y, filters, 3, 1, f"{name}_conv2")
    return layers.Add(name=f"{name}_out")([shortcut, y])


def apply_preact_bottleneck_block(x, filters, strides, name):
    """Pre-activation bottleneck unit (He et al. 2016b, ResNet-164/1001).

    BN -> ReLU -> 1x1 conv (`filters`) -> BN -> ReLU -> 3x3 conv (`filters`,
    stride) -> BN -> ReLU -> 1x1 conv (`4 * filters`), plus the identity or a
    1x1 projection of the pre-activated input.

    Args:
        x: Feature tensor of shape `(batch, height, width, channels)`.
        filters: Bottleneck channels; the output has four times as many.
        strides: Stride of the 3x3 convolution and of the projection.
        name: Prefix of the layer names.

    Returns:
        The block's output, the sum (layer `"{name}_out"`).
    """
    out_filters = BOTTLENECK_EXPANSION * filters
    preact = apply_bn_relu(x, f"{name}_bn1", f"{name}_relu1")
    shortcut = x
    if strides != 1 or x.shape[-1] != out_filters:
        shortcut = apply_conv(
            preact, out_filters, 1, strides, f"{name}_shortcut_conv"
        )
    y = apply_conv(preact, filters, 1, 1, f"{name}_conv1")
    y = apply_bn_relu(y, f"{name}_bn2", f"{name}_relu2")
    y = apply_conv(y, filters, 3, strides, f"{name}_conv2")
    y = apply_bn_relu(y, f"{name}_bn3", f"{name}_relu3")
    y = apply_conv(y, out_filters, 1, 1, f"{name}_conv3")
    return layers.Add(name=f"{name}_out")([shortcut, y])


def apply_preact_trunk(x, unit, blocks_per_stage, stage_filters, dropout_rate=0.0):
    """Stem convolution and three pre-activation stages.

    Args:
        x: Input image tensor.
        unit: `"basic"` or `"bottleneck"`.
        blocks_per_stage: Units in each stage.
        stage_filters: Filters of the stem and (bottleneck) filters of each
            stage: `(stem, stage_1, stage_2, stage_3)`.
        dropout_rate: Dropout inside basic units.

    Returns:
        List of the outputs of all units, first to last.
    """
    x = apply_conv(x, stage_filters[0], 3, 1, "stem_conv")
    block_outputs = []
    for stage, filters in enumerate(stage_filters[1:]):
        for index in range(blocks_per_stage):
            strides = 2 if stage > 0 and index == 0 else 1
            name = f"block_{len(block_outputs) + 1}"
            if unit == "basic":
                x = apply_preact_basic_block(x, filters, strides, name, dropout_rate)
            else:
                x = apply_preact_bottleneck_block(x, filters, strides, name)
            block_outputs.append(x)
    return block_outputs


def preact_resnet(
    depth,
    num_classes=10,
    num_losses=1,
    taps=None,
    input_shape=(32, 32, 3),
    method="mwbp",
    nu=2.0,
    head=None,
):
    """A pre-activation CIFAR ResNet with auxiliary heads, ready to compile.

    Args:
        depth: Number of weight layers; one of `PREACT_RESNET_PRESETS`:
            basic units for 8, 14, 20, 32, 44, 56, 110 (`6n + 2`),
            bottleneck units for 164 and 1001 (`9n + 2`).
        num_classes: Number of classes of every head.
        num_losses: Number of heads (losses), final included. `1` gives a
            plain network; train it with `method="standard"`.
        taps: 1-based indices of the residual units whose outputs carry the
            `num_losses - 1` auxiliary heads, strictly increasing and below
            the last unit. `None` spreads them evenly
            (`keras_mwbp.models.taps.official_taps`).
        input_shape: Shape of one input image.
        method: Training method of `keras_mwbp.MultiWayModel`.
        nu: Decay rate of the loss weights (paper Eq. 5).
        head: Auxiliary head builder `head(x, num_classes, name)` returning
            logits, its layers named `"{name}_..."`. Defaults to
            `keras_mwbp.heads.bn_relu_pool_dense` (type A). The final head is
            always BN -> ReLU -> pool -> dense, the network's own classifier.

    Returns:
        An uncompiled `keras_mwbp.MultiWayModel` whose outputs are
        `"head_0", ..., "final"` (see `keras_mwbp.heads`).

    Example:

    >>> model = preact_resnet(110, num_losses=3)
    >>> model.output_names
    ['head_0', 'head_1', 'final']
    """
    if is_bad_key(depth, PREACT_RESNET_PRESETS):
        raise ValueError(
            "`depth` must be one of "
            f"{sorted(PREACT_RESNET_PRESETS)}. Received: depth={depth!r}"
        )
    unit, blocks_per_stage = PREACT_RESNET_PRESETS[depth]
    num_blocks = 3 * blocks_per_stage
    taps = check_heads(
        num_losses, taps, num_blocks, f"PreAct-ResNet-{depth}"
    )
    inputs = layers.Input(shape=input_shape, name="image")
    block_outputs = apply_preact_trunk(
        inputs, unit, blocks_per_stage, (STAGE_FILTERS[0],) + STAGE_FILTERS
    )
    final = bn_relu_pool_dense(block_outputs[-1], num_classes, "final")
    return multiway_model(
        inputs, block_outputs, final, taps, num_classes, head, method, nu,
        f"preact_resnet{depth}",
    )


def is_bad_key(value, presets):
    """Whether `value` is not an integer key of `presets`."""
    return isinstance(value, bool) or value not in presets
