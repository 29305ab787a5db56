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
from keras_mwbp.heads import bn_relu_pool_dense
from keras_mwbp.heads import output_name
from keras_mwbp.heads import pool_dense
from keras_mwbp.multi_way_model import MultiWayModel

# Residual blocks per stage for each depth `6n + 2` of He et al.
CIFAR_RESNET_PRESETS = constants.CIFAR_RESNET_PRESETS
STAGE_FILTERS = (16, 32, 64)


_CONVOLUTIONS = {3: layers.Conv1D, 4: layers.Conv2D, 5: layers.Conv3D}


def apply_conv(x, filters, kernel_size, strides, name, groups=1):
    """Bias-free "same" convolution with He-normal initialization, as in
    every layer of the zoo's networks before a BN. Its rank follows `x`:
    `Conv1D` for `(batch, length, channels)`, `Conv2D` for images,
    `Conv3D` for volumes."""
    rank = len(x.shape)
    if rank not in _CONVOLUTIONS:
        raise ValueError(
            "The input of a zoo network must have 1, 2 or 3 spatial axes "
            "and a channel axis: `input_shape` `(length, channels)`, "
            "`(height, width, channels)` or `(depth, height, width, "
            f"channels)`. Received: a feature of shape {tuple(x.shape)} "
            f"before layer {name!r}"
        )
    return _CONVOLUTIONS[rank](
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        groups=groups,
        kernel_initializer="he_normal",
        name=name,
    )(x)


def apply_stem(x, filters):
    """3x3 convolution -> BN -> ReLU, layers named `"stem_..."`."""
    x = apply_conv(x, filters, 3, 1, "stem_conv")
    x = batch_normalization("stem_bn")(x)
    return layers.ReLU(name="stem_relu")(x)


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
    block_outputs = []
    for stage, filters in enumerate(stage_filters):
        for index in range(blocks_per_stage):
            strides = 2 if stage > 0 and index == 0 else 1
            name = f"block_{len(block_outputs) + 1}"
            x = apply_basic_block(x, filters, strides, name)
            block_outputs.append(x)
    return block_outputs


def official_taps(num_blocks, num_losses):
    """Blocks that carry the auxiliary heads in the paper's placement.

    The `num_losses - 1` auxiliary heads sit every `num_blocks // num_losses`
    blocks, counted back from the last block (which feeds the final head).
    For ResNet-56 (27 blocks) with 5 losses this gives blocks 7, 12, 17, 22,
    the paper's layers 15, 25, 35, 45 (Table 6).

    Args:
        num_blocks: Residual blocks in the network.
        num_losses: Number of losses, final included; at most `num_blocks`.

    Returns:
        List of 1-based block indices, shallowest first.
    """
    spacing = num_blocks // num_losses
    return [num_blocks - spacing * k for k in range(num_losses - 1, 0, -1)]


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
    if (
        isinstance(num_losses, bool)
        or not isinstance(num_losses, int)
        or not 1 <= num_losses <= num_blocks
    ):
        raise ValueError(
            f"`num_losses` must be an integer from 1 to {num_blocks} (the "
            f"residual blocks of ResNet-{depth}). "
            f"Received: num_losses={num_losses!r}"
        )
    if taps is None:
        taps = official_taps(num_blocks, num_losses)
    check_taps(taps, num_blocks, num_losses)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(
            f"`width` must be a positive integer. Received: width={width!r}"
        )
    head = head or bn_relu_pool_dense

    inputs = layers.Input(shape=input_shape, name="image")
    block_outputs = apply_trunk(
        inputs, CIFAR_RESNET_PRESETS[depth], (width, 2 * width, 4 * width)
    )
    outputs = [
        output_name(
            head(block_outputs[block - 1], num_classes, f"head_{index}"),
            f"head_{index}",
        )
        for index, block in enumerate(taps)
    ]
    outputs.append(output_name(
        pool_dense(block_outputs[-1], num_classes, FINAL_HEAD), FINAL_HEAD
    ))
    return MultiWayModel(
        inputs=inputs,
        outputs=outputs,
        method=method,
        nu=nu,
        **{"name": f"cifar_resnet{depth}", **kwargs},
    )


def check_taps(taps, num_blocks, num_losses):
    """Raises `ValueError` unless `taps` places `num_losses - 1` heads."""
    if (
        not isinstance(taps, (list, tuple))
        or len(taps) != num_losses - 1
        or any(isinstance(t, bool) or not isinstance(t, int) for t in taps)
        or any(not 1 <= t < num_blocks for t in taps)
        or any(a >= b for a, b in zip(taps, taps[1:]))
    ):
        raise ValueError(
            f"`taps` must list num_losses - 1 = {num_losses - 1} strictly "
            f"increasing block indices from 1 to {num_blocks - 1}. "
            f"Received: taps={taps!r}"
        )
