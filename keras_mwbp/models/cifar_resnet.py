"""The CIFAR ResNet of He et al. (2016) with auxiliary heads.

A `6n + 2`-layer network: a 3x3 convolution with 16 filters, three stages of
`n` basic blocks with 16, 32 and 64 filters (stride 2 at the start of the
second and third stage, where a 1x1 convolution + BN projects the shortcut),
global average pooling and a dense classifier. Auxiliary heads sit on the
outputs of chosen residual blocks; the output of block `b` (1-based over all
blocks) lies `2 * b + 1` weight layers deep.
"""

from keras import layers

from keras_mwbp import constants
from keras_mwbp.heads import FINAL_HEAD
from keras_mwbp.heads import batch_normalization
from keras_mwbp.heads import pool_dense
from keras_mwbp.models.blocks import apply_conv
from keras_mwbp.models.blocks import apply_stages
from keras_mwbp.models.blocks import apply_stem
from keras_mwbp.models.taps import check_heads
from keras_mwbp.models.taps import check_taps  # noqa: F401 (its old home)
from keras_mwbp.models.taps import official_taps  # noqa: F401 (its old home)
from keras_mwbp.models.zoo_common import check_positive_int
from keras_mwbp.models.zoo_common import multiway_model

# Residual blocks per stage for each depth `6n + 2` of He et al.
CIFAR_RESNET_PRESETS = constants.CIFAR_RESNET_PRESETS
STAGE_FILTERS = (16, 32, 64)



def apply_basic_block(x, filters, strides, name):
    """Two 3x3 convolutions with a shortcut (He et al. 2016, Fig. 2 left).

    The shortcut is the identity, or a 1x1 convolution + BN where the shape
    changes (option B).

    Args:
        x: Feature tensor of shape `(batch, height, width, channels)`.
        filters: Output channels.
        strides: Stride of the first convolution and of the projection.
        name: Prefix of the layer names, e.g. `"block_3"`.

    Returns:
        The block's output, after the final ReLU (layer `"{name}_out"`).
    """
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = apply_conv(x, filters, 1, strides, f"{name}_shortcut_conv")
        shortcut = batch_normalization(f"{name}_shortcut_bn")(shortcut)
    x = apply_conv(x, filters, 3, strides, f"{name}_conv1")
    x = batch_normalization(f"{name}_bn1")(x)
    x = layers.ReLU(name=f"{name}_relu1")(x)
    x = apply_conv(x, filters, 3, 1, f"{name}_conv2")
    x = batch_normalization(f"{name}_bn2")(x)
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.ReLU(name=f"{name}_out")(x)


def apply_trunk(x, blocks_per_stage, stage_filters=STAGE_FILTERS):
    """Stem and residual stages.

    Args:
        x: Input tensor (image, or 1-D signal of shape `(length, channels)`).
        blocks_per_stage: Basic blocks in each of the three stages.
        stage_filters: Filters of the stem and first stage, then of the
            second and third stages.

    Returns:
        List of the outputs of all residual blocks, first to last.
    """
    x = apply_stem(x, stage_filters[0])
    return apply_stages(x, apply_basic_block, blocks_per_stage, stage_filters)


def cifar_resnet(
    depth,
    num_classes=10,
    num_losses=1,
    taps=None,
    input_shape=(32, 32, 3),
    method="mwbp",
    nu=2.0,
    head=None,
    width=16,
    **kwargs,
):
    """A CIFAR ResNet with auxiliary heads, ready to compile.

    The convolutions' rank follows `input_shape`: `(length, channels)`
    builds the same network from `Conv1D` layers (for 1-D signals such as
    MNIST-1D), `(height, width, channels)` from `Conv2D`.

    Args:
        depth: Number of weight layers, `6n + 2`; one of
            `CIFAR_RESNET_PRESETS` (8, 14, 20, 32, 44, 56, 110, 1202).
        num_classes: Number of classes of every head.
        num_losses: Number of heads (losses), final included. `1` gives a
            plain ResNet; train it with `method="standard"`.
        taps: 1-based indices of the residual blocks whose outputs carry
            the `num_losses - 1` auxiliary heads, strictly increasing and
            below the last block. `None` uses `official_taps`.
        input_shape: Shape of one input image.
        method: Training method of `keras_mwbp.MultiWayModel`.
        nu: Decay rate of the loss weights (paper Eq. 5).
        head: Auxiliary head builder `head(x, num_classes, name)` returning
            logits, with its layers named `"{name}_..."`. Defaults to
            `keras_mwbp.heads.bn_relu_pool_dense` (type A). The final head is
            always `pool_dense`, the ResNet classifier.
        width: Filters of the first stage (positive int); the stages have
            `width, 2 * width, 4 * width` (He et al.: 16, 32, 64).
        **kwargs: Other `keras_mwbp.MultiWayModel` arguments (`weighting`,
            `weight_decay`, `head_weights`, `shuffle_seed`, `name`, ...).

    Returns:
        An uncompiled `keras_mwbp.MultiWayModel` whose outputs are
        `"head_0", ..., "final"` (see `keras_mwbp.heads`).

    Example:

    >>> model = cifar_resnet(56, num_losses=5)
    >>> model.head_depths
    (15, 25, 35, 45, 56)
    >>> model.compile(
    ...     optimizer=keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
    ...     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ...     metrics=["accuracy"],
    ... )
    """
    if depth not in CIFAR_RESNET_PRESETS:
        raise ValueError(
            "`depth` must be 6n+2, one of "
            f"{sorted(CIFAR_RESNET_PRESETS)}. Received: depth={depth!r}"
        )
    num_blocks = 3 * CIFAR_RESNET_PRESETS[depth]
    taps = check_heads(num_losses, taps, num_blocks, f"ResNet-{depth}",
                       blocks="residual blocks")
    check_positive_int(width, "width")

    inputs = layers.Input(shape=input_shape, name="image")
    block_outputs = apply_trunk(
        inputs, CIFAR_RESNET_PRESETS[depth], (width, 2 * width, 4 * width)
    )
    return multiway_model(
        inputs, block_outputs,
        lambda: pool_dense(block_outputs[-1], num_classes, FINAL_HEAD),
        taps, num_classes, head, method, nu, f"cifar_resnet{depth}", **kwargs,
    )
