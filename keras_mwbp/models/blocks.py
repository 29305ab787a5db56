"""The layers every zoo network is made of: `apply_*` functions that add
named layers to a functional graph and return the new feature tensor.

The convolution's rank follows its input, so the same builder makes a 1-D
network from a `(length, channels)` input, a 2-D one from images and a 3-D
one from volumes.
"""

from keras import layers

from keras_mwbp.heads import batch_normalization

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


def apply_bn_relu(x, bn_name, relu_name):
    """BN (`keras_mwbp.heads.batch_normalization`) -> ReLU, layers named
    `bn_name` and `relu_name`."""
    x = batch_normalization(bn_name)(x)
    return layers.ReLU(name=relu_name)(x)


def apply_stem(x, filters):
    """3x3 convolution -> BN -> ReLU, layers named `"stem_..."`."""
    x = apply_conv(x, filters, 3, 1, "stem_conv")
    return apply_bn_relu(x, "stem_bn", "stem_relu")


def apply_stages(x, block, blocks_per_stage, stage_filters):
    """The stage loop of the residual networks: `blocks_per_stage` blocks
    in each stage, stride 2 at the start of every stage but the first.

    Args:
        x: Feature tensor (the stem's output).
        block: `block(x, filters, strides, name)`, returning the block's
            output; its layers are named `"{name}_..."`.
        blocks_per_stage: Blocks in each stage.
        stage_filters: Filters of each stage.

    Returns:
        List of the outputs of all blocks, first to last, named
        `"block_1"`, `"block_2"`, ... across the stages.
    """
    block_outputs = []
    for stage, filters in enumerate(stage_filters):
        for index in range(blocks_per_stage):
            strides = 2 if stage > 0 and index == 0 else 1
            name = f"block_{len(block_outputs) + 1}"
            x = block(x, filters, strides, name)
            block_outputs.append(x)
    return block_outputs
