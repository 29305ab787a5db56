"""Where the zoo's auxiliary heads sit: the paper's placement and the checks
of `num_losses` and `taps`.

Every zoo network is a trunk whose "blocks" (residual blocks, dense layers,
inverted residuals) each produce one feature tensor; a tap is the 1-based
index of a block whose output carries an auxiliary head. The final head
sits on the trunk's last feature map.
"""


def official_taps(num_blocks, num_losses):
    """Blocks that carry the auxiliary heads in the paper's placement.

    The `num_losses - 1` auxiliary heads sit every `num_blocks // num_losses`
    blocks, counted back from the last block (which feeds the final head).
    For ResNet-56 (27 blocks) with 5 losses this gives blocks 7, 12, 17, 22,
    the paper's layers 15, 25, 35, 45 (Table 6).

    Args:
        num_blocks: Blocks in the network.
        num_losses: Number of losses, final included; at most `num_blocks`.

    Returns:
        List of 1-based block indices, shallowest first.
    """
    spacing = num_blocks // num_losses
    return [num_blocks - spacing * k for k in range(num_losses - 1, 0, -1)]


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


def check_heads(num_losses, taps, num_blocks, network, blocks="blocks"):
    """Checks `num_losses` and `taps`; returns the taps to use.

    Args:
        num_losses: Number of heads, final included.
        taps: 1-based block indices of the auxiliary heads, or `None` for
            the paper's placement (`official_taps`).
        num_blocks: Blocks of the trunk.
        network: Name of the network, for error messages.
        blocks: What the network's blocks are called, for error messages.

    Returns:
        List of the `num_losses - 1` tap block indices.
    """
    if (
        isinstance(num_losses, bool)
        or not isinstance(num_losses, int)
        or not 1 <= num_losses <= num_blocks
    ):
        raise ValueError(
            f"`num_losses` must be an integer from 1 to {num_blocks} (the "
            f"{blocks} of {network}). Received: num_losses={num_losses!r}"
        )
    if taps is None:
        taps = official_taps(num_blocks, num_losses)
    check_taps(taps, num_blocks, num_losses)
    return list(taps)
