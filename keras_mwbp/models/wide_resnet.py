"""Wide residual networks (Zagoruyko & Komodakis 2016) with auxiliary heads.

WRN-d-k: a 3x3 convolution with 16 filters, three stages of `n` pre-activation
basic blocks with `16k`, `32k` and `64k` filters (stride 2 at the start of the
second and third stage; optional dropout between the two convolutions), then
BN -> ReLU -> global average pooling -> dense. The shortcut is a bias-free
1x1 convolution of the pre-activated input where the shape changes (also in
the first block, 16 -> 16k channels), as in the authors' code.

The paper counts the three projection convolutions in the depth: `d = 6n + 4`
(WRN-28-10 has `n = 4`). Some papers count without them, `d = 6n + 2`, and
call the same network WRN-26-10; both spellings are accepted.
"""

from keras import layers

from keras_mwbp.heads import bn_relu_pool_dense
from keras_mwbp.models.preact_resnet import apply_preact_trunk
from keras_mwbp.models.taps import check_heads
from keras_mwbp.models.zoo_common import check_positive_int
from keras_mwbp.models.zoo_common import is_int
from keras_mwbp.models.zoo_common import multiway_model

STAGE_FILTERS = (16, 32, 64)


def blocks_per_stage(depth):
    """Blocks per stage `n` of WRN-`depth`: `d = 6n + 4` or `d = 6n + 2`.

    Args:
        depth: Depth, e.g. 28 (or 26) for `n = 4`.

    Returns:
        `n`.
    """
    if is_int(depth):
        for offset in (4, 2):
            if depth - offset >= 6 and (depth - offset) % 6 == 0:
                return (depth - offset) // 6
    raise ValueError(
        "`depth` must be 6n+4 (counting the projection convolutions, as "
        "Zagoruyko & Komodakis do: 10, 16, 22, 28, 40, ...) or 6n+2 (8, 14, "
        f"20, 26, ...) with n >= 1. Received: depth={depth!r}"
    )


def wide_resnet(
    depth,
    widen_factor,
    dropout_rate=0.0,
    num_classes=10,
    num_losses=1,
    taps=None,
    input_shape=(32, 32, 3),
    method="mwbp",
    nu=2.0,
    head=None,
):
    """A wide residual network WRN-d-k with auxiliary heads, ready to compile.

    Args:
        depth: Depth `d`, `6n + 4` as in the paper (WRN-28-10: 28) or
            `6n + 2` (the same network spelled WRN-26-10).
        widen_factor: Width multiplier `k`, a positive integer.
        dropout_rate: Dropout between the two convolutions of every block,
            in `[0, 1)`; the paper uses 0.3 for some runs.
        num_classes: Number of classes of every head.
        num_losses: Number of heads (losses), final included. `1` gives a
            plain network; train it with `method="standard"`.
        taps: 1-based indices of the blocks whose outputs carry the
            `num_losses - 1` auxiliary heads, strictly increasing and below
            the last block (there are `3n`). `None` spreads them evenly.
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

    >>> model = wide_resnet(28, 10, num_losses=4, dropout_rate=0.3)
    >>> model.num_heads
    4
    """
    n = blocks_per_stage(depth)
    check_positive_int(widen_factor, "widen_factor")
    if (
        isinstance(dropout_rate, bool)
        or not isinstance(dropout_rate, (int, float))
        or not 0 <= dropout_rate < 1
    ):
        raise ValueError(
            "`dropout_rate` must be a number in [0, 1). "
            f"Received: dropout_rate={dropout_rate!r}"
        )
    taps = check_heads(num_losses, taps, 3 * n, f"WRN-{depth}-{widen_factor}")
    inputs = layers.Input(shape=input_shape, name="image")
    filters = (16,) + tuple(widen_factor * f for f in STAGE_FILTERS)
    block_outputs = apply_preact_trunk(inputs, "basic", n, filters, dropout_rate)
    final = bn_relu_pool_dense(block_outputs[-1], num_classes, "final")
    return multiway_model(
        inputs, block_outputs, final, taps, num_classes, head, method, nu,
        f"wide_resnet{depth}_{widen_factor}",
    )
