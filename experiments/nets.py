"""Narrow residual networks with auxiliary heads, for 1-D signals or images.

The CIFAR ResNet of He et al. (`6n + 2` weight layers, three stages of `n`
basic blocks, stride 2 at the start of stages 2 and 3, 1x1 projection
shortcuts) with stage widths `(w, 2w, 4w)`, built from `Conv1D` for inputs of
shape `(length, channels)` and from `Conv2D` for `(height, width, channels)`.
Auxiliary heads are the authors' type A (`keras_mwbp.heads.bn_relu_pool_dense`)
at the paper's places (`official_taps`).
"""

from keras import layers

from keras_mwbp.heads import batch_normalization
from keras_mwbp.heads import bn_relu_pool_dense
from keras_mwbp.heads import pool_dense
from keras_mwbp.models.cifar_resnet import official_taps
from keras_mwbp.multi_way_model import MultiWayModel


def _conv(x, filters, kernel_size, strides, name):
    conv = layers.Conv1D if len(x.shape) == 3 else layers.Conv2D
    return conv(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=name,
    )(x)


def _block(x, filters, strides, name):
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv(x, filters, 1, strides, f"{name}_shortcut_conv")
        shortcut = batch_normalization(f"{name}_shortcut_bn")(shortcut)
    x = _conv(x, filters, 3, strides, f"{name}_conv1")
    x = batch_normalization(f"{name}_bn1")(x)
    x = layers.ReLU(name=f"{name}_relu1")(x)
    x = _conv(x, filters, 3, 1, f"{name}_conv2")
    x = batch_normalization(f"{name}_bn2")(x)
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.ReLU(name=f"{name}_out")(x)


def narrow_resnet(
    depth,
    input_shape,
    num_losses,
    width=8,
    num_classes=10,
    method="mwbp",
    nu=2.0,
    head_weights=None,
    shuffle_seed=0,
):
    """A `6n + 2`-layer residual `MultiWayModel` of stage widths `w, 2w, 4w`.

    Args:
        depth: `6n + 2` weight layers (8, 14, 20, 32, 44, 56, 110, ...).
        input_shape: `(length, channels)` or `(height, width, channels)`.
        num_losses: Heads, final included (1 to `3n`).
        width: Filters of the first stage.
        num_classes: Logits of every head.
        method, nu, head_weights, shuffle_seed: As `MultiWayModel`.

    Returns:
        An uncompiled `keras_mwbp.MultiWayModel`.
    """
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"`depth` must be 6n+2 >= 8. Received: depth={depth!r}")
    n = (depth - 2) // 6
    inputs = layers.Input(shape=input_shape, name="signal")
    x = _conv(inputs, width, 3, 1, "stem_conv")
    x = batch_normalization("stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    blocks = []
    for stage in range(3):
        for index in range(n):
            strides = 2 if stage > 0 and index == 0 else 1
            x = _block(x, width * 2**stage, strides, f"block_{len(blocks) + 1}")
            blocks.append(x)
    taps = official_taps(len(blocks), num_losses)
    outputs = [
        bn_relu_pool_dense(blocks[b - 1], num_classes, f"head_{i}")
        for i, b in enumerate(taps)
    ]
    outputs.append(pool_dense(blocks[-1], num_classes, "final"))
    return MultiWayModel(
        inputs=inputs,
        outputs=outputs,
        method=method,
        nu=nu,
        head_weights=head_weights,
        shuffle_seed=shuffle_seed,
        name=f"narrow_resnet{depth}_{num_losses}",
    )
