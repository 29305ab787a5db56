"""Loss weights gamma_i of the paper's Eq. 5."""

import math
import numbers

GAMMA_FLOOR = 0.01


def gammas_from_depths(head_depths, nu):
    """Loss weights from the depths of the heads' taps (paper Eq. 5).

    `gamma_K = 1` for the final loss and
    `gamma_i = max(0.01, (L_i / L_{K-1}) ** nu)` for the auxiliary losses,
    where `L_{K-1}` is the depth of the deepest auxiliary head.

    Args:
        head_depths: Sequence of tap depths, one per loss, shallowest first,
            final last.
        nu: Positive decay rate.

    Returns:
        Tuple of floats, one weight per loss.

    Example:

    >>> gammas_from_depths([15, 25, 35, 45, 56], nu=2.0)[:2]
    (0.1111111111111111, 0.30864197530864196)
    """
    check_nu(nu)
    depths = list(head_depths)
    if len(depths) == 1:
        return (1.0,)
    deepest_aux = depths[-2]
    aux = tuple(
        max(GAMMA_FLOOR, (depth / deepest_aux) ** nu) for depth in depths[:-1]
    )
    return aux + (1.0,)


def check_nu(nu):
    """Raises `ValueError` unless `nu` is a finite positive number."""
    if (
        isinstance(nu, bool)
        or not isinstance(nu, numbers.Real)
        or not math.isfinite(nu)
        or nu <= 0
    ):
        raise ValueError(
            f"`nu` must be a finite positive number. Received: nu={nu!r}"
        )


def check_weight_decay(weight_decay):
    """The coupled weight decay as a float; `ValueError` unless it is a
    finite non-negative number."""
    if (
        isinstance(weight_decay, bool)
        or not isinstance(weight_decay, numbers.Real)
        or not math.isfinite(weight_decay)
        or weight_decay < 0
    ):
        raise ValueError(
            "`weight_decay` must be a finite non-negative number. "
            f"Received: weight_decay={weight_decay!r}"
        )
    return float(weight_decay)


def check_head_weights(head_weights, num_outputs):
    """Validates explicit loss weights and returns them as floats.

    Args:
        head_weights: Sequence of weights, one per output, each in (0, 1].
        num_outputs: Number of model outputs.

    Returns:
        Tuple of floats.
    """
    weights = _one_per_output(head_weights, "head_weights", "weight", num_outputs)
    for weight in weights:
        if (
            isinstance(weight, bool)
            or not isinstance(weight, numbers.Real)
            or not 0 < weight <= 1
        ):
            raise ValueError(
                "Every entry of `head_weights` must be a number in (0, 1]. "
                f"Received: head_weights={list(weights)!r}"
            )
    return tuple(float(w) for w in weights)


def check_head_depths(head_depths, num_outputs):
    """Validates explicit tap depths and returns them as ints.

    Args:
        head_depths: Sequence of positive, strictly increasing integers,
            one per output.
        num_outputs: Number of model outputs.

    Returns:
        Tuple of ints.
    """
    depths = _one_per_output(head_depths, "head_depths", "depth", num_outputs)
    if any(
        isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1
        for d in depths
    ):
        raise ValueError(
            "Every entry of `head_depths` must be a positive integer. "
            f"Received: head_depths={list(depths)!r}"
        )
    if any(a >= b for a, b in zip(depths, depths[1:])):
        raise ValueError(
            "`head_depths` must increase strictly from the shallowest head "
            f"to the final one. Received: head_depths={list(depths)!r}"
        )
    return tuple(int(d) for d in depths)


def _one_per_output(values, argument, noun, num_outputs):
    """`values` as a tuple, or a `ValueError` unless one per output."""
    try:
        values = tuple(values)
    except TypeError:
        raise ValueError(
            f"`{argument}` must be a list with one {noun} per output. "
            f"Received: {argument}={values!r}"
        ) from None
    if len(values) != num_outputs:
        raise ValueError(
            f"`{argument}` must have one {noun} per output ({num_outputs} "
            f"outputs). Received: {argument}={list(values)!r}"
        )
    return values
