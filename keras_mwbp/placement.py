"""Where to put the auxiliary heads of a backbone (paper Sec. 4.1.2)."""

import math
import numbers

import keras

from keras_mwbp.graph import ordered_nodes
from keras_mwbp.graph import weight_depth


def place_heads(backbone, num_losses, min_interval=5):
    """Picks the layers of a backbone that carry the auxiliary heads.

    The paper's rule (Sec. 4.1.2): one auxiliary loss every
    `tau = ceil(L / num_losses)` weight layers, with `tau >= min_interval`,
    where `L` is the backbone's depth (convolution and dense layers on the
    longest path from the input to the output, as `MultiWayModel` counts tap
    depths). The ideal tap depths are `tau, 2 * tau, ..., (num_losses - 1) *
    tau`, which must lie below `L`: as `tau` is rounded up, that fails for
    some counts of losses above `tau` (9 and 11 on ResNet-56, while 10 and
    12 fit), and the `ValueError` lists the counts that fit.

    Heads may only sit on cut points: layers whose output every path from
    the input to the output passes through, such as the output of a
    residual block, never a layer inside one. Several cut points at one
    depth (convolution -> BN -> ReLU) count once, as the last of them in
    run order (the activated feature) whose output has the rank of the
    first (not a pooled or flattened copy of the feature). Layers called
    more than once in the backbone and operations that are not layers
    (`x + y`) are never taps; a nested model counts as one layer.

    Mapping: each ideal depth goes to the nearest cut point strictly between
    the input (depth 0) and the output (depth `L`), with no cut point used
    twice (the assignment that minimizes the total distance, in order).
    A tie goes to the cut point nearer the middle of the network (depth
    `L / 2`): the shallowest head moves off the thin early features and the
    deepest one away from the final head, as in the paper's own placement
    (layers 15, 25, 35, 45 of ResNet-56). A chosen cut point must lie within
    `tau / 2` of its ideal depth; otherwise the cut points are too sparse
    for the rule and a `ValueError` says so.

    For a CIFAR ResNet-56 with 5 losses (`L = 56`, `tau = 12`, cut points at
    depths 1, 3, 5, ..., 55) this gives the blocks ending at depths 13, 25,
    35 and 47 (ideal 12, 24, 36, 48).

    Args:
        backbone: A functional `keras.Model` (or a built `keras.Sequential`)
            with one output, the final feature or the final logits, which
            the final head uses.
        num_losses: Number of losses, final included; an integer >= 2.
        min_interval: Smallest allowed `tau`, an integer >= 1 (the paper
            uses 5).

    Returns:
        List of the `num_losses - 1` layer names, shallowest first. Put a
        head on `backbone.get_layer(name).output` for each.

    Raises:
        TypeError: If `backbone` is not a functional Keras model.
        ValueError: If an argument is invalid, or if the backbone is too
            shallow for `num_losses` losses with `min_interval`, or has too
            few or too sparse cut points.

    Example:

    ```python
    from keras_mwbp.heads import bn_relu_pool_dense

    backbone = keras.Model(inputs, logits)          # e.g. a ResNet-56
    taps = keras_mwbp.place_heads(backbone, num_losses=5)
    # ['block_6_out', 'block_12_out', 'block_17_out', 'block_23_out']
    heads = [
        bn_relu_pool_dense(backbone.get_layer(name).output, 10, f"head_{i}")
        for i, name in enumerate(taps)
    ]
    model = keras_mwbp.MultiWayModel(backbone.inputs, heads + [logits])
    ```
    """
    function = _functional(backbone)
    _check_count(num_losses, "num_losses", 2,
                 "the final loss and at least one auxiliary loss")
    _check_count(min_interval, "min_interval", 1, "weight layers")
    cuts, depth = _cut_points(function)
    name = function.name
    interval = math.ceil(depth / num_losses)
    num_aux = num_losses - 1
    if interval < min_interval or num_aux * interval >= depth:
        if interval < min_interval:
            problem = f"but `min_interval`={min_interval}"
        else:
            problem = (
                f"which puts auxiliary head {num_aux} at depth "
                f"{num_aux * interval}, not below the output"
            )
        feasible = _feasible_losses(depth, min_interval)
        advice = (
            f"Numbers of losses that fit: {_ranges(feasible)} (or lower "
            "`min_interval`)."
            if feasible
            else "The backbone is too shallow for an auxiliary head at this "
            "`min_interval`."
        )
        raise ValueError(
            f"Backbone '{name}' of depth {depth} (weight layers) with "
            f"{num_losses} losses: one head every {interval} weight layers "
            f"(tau = ceil({depth} / {num_losses})), {problem}. {advice} "
            f"Received: num_losses={num_losses!r}, "
            f"min_interval={min_interval!r}"
        )
    candidates = [(d, layer) for d, layer in sorted(cuts.items())
                  if 0 < d < depth]
    if len(candidates) < num_aux:
        raise ValueError(
            f"Backbone '{name}' has {len(candidates)} cut points strictly "
            "between the input and the output (layers that every path from "
            "the input to the output passes through), at depths "
            f"{[d for d, _ in candidates]}; {num_losses} losses need "
            f"{num_aux}. Use fewer losses (a smaller `num_losses`). "
            f"Received: num_losses={num_losses!r}"
        )
    ideals = [k * interval for k in range(1, num_losses)]
    chosen = _assign(ideals, [d for d, _ in candidates], depth)
    for ideal, index in zip(ideals, chosen):
        found = candidates[index][0]
        if abs(found - ideal) > interval / 2:
            raise ValueError(
                f"Backbone '{name}' of depth {depth} with {num_losses} losses "
                f"(one head every {interval} weight layers): the cut point "
                f"used for depth {ideal} is at depth {found}, more than "
                f"tau / 2 = {interval / 2:g} away. Its cut points (layers "
                "that every path from the input to the output passes "
                f"through) lie at depths {[d for d, _ in candidates]}; "
                "use fewer losses (a smaller `num_losses`) or place the "
                "heads by hand. "
                f"Received: num_losses={num_losses!r}"
            )
    return [candidates[index][1] for index in chosen]


def _functional(backbone):
    """The functional graph of `backbone`, or a `TypeError`/`ValueError`."""
    if isinstance(backbone, keras.Sequential):
        try:
            backbone = keras.Model(backbone.inputs, backbone.outputs,
                                   name=backbone.name)
        except (AttributeError, ValueError):
            raise TypeError(
                "`backbone` must be a functional `keras.Model` or a built "
                "`keras.Sequential` (with an `Input`). Received an unbuilt "
                f"Sequential: backbone={backbone.name!r}"
            ) from None
    if not isinstance(backbone, keras.Model) or not hasattr(
        backbone, "_nodes_by_depth"
    ):
        raise TypeError(
            "`backbone` must be a functional `keras.Model` (built from "
            "`keras.Input` tensors), whose graph can be read. "
            f"Received: backbone={backbone!r} of type "
            f"{type(backbone).__name__}"
        )
    if len(backbone.outputs) != 1:
        raise ValueError(
            "`backbone` must have one output (the final feature or logits). "
            f"Received: a model with {len(backbone.outputs)} outputs"
        )
    return backbone


def _check_count(value, argument, minimum, what):
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < minimum
    ):
        raise ValueError(
            f"`{argument}` must be an integer >= {minimum} ({what}). "
            f"Received: {argument}={value!r}"
        )


def _feasible_losses(depth, min_interval):
    """Numbers of losses the rule can place on a backbone of `depth`.

    `tau = ceil(depth / n)` must be at least `min_interval` and the deepest
    auxiliary head, at `(n - 1) * tau`, below `depth`; rounding `tau` up
    makes the second condition fail for some `n` between feasible ones.
    """
    return [
        n
        for n in range(2, depth + 1)
        if math.ceil(depth / n) >= min_interval
        and (n - 1) * math.ceil(depth / n) < depth
    ]


def _ranges(numbers):
    """`[2, 3, 4, 6, 8, 9]` -> `"2-4, 6, 8-9"`."""
    runs = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _cut_points(function):
    """Cut points of a one-output functional model, by weight depth.

    A tensor is a cut point when it is the only live tensor between two
    consecutive nodes of a topological order (every node of a functional
    model leads to its output): every path from the inputs to the output
    then passes through it, whatever topological order is used. Only layers
    called once in the model and with one output are candidates.

    Returns:
        `({depth: layer name}, depth of the output)`. Of the cut points of
        one depth, the last in run order whose output has the rank of the
        first one's (the activated feature, not a pooled or flattened copy).
    """
    nodes = ordered_nodes(function)
    calls = {}
    for node in nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
    uses = {}
    for node in nodes:
        for x in node.input_tensors:
            uses[id(x)] = uses.get(id(x), 0) + 1
    output = function.outputs[0]
    uses[id(output)] = uses.get(id(output), 0) + 1
    live = {id(x) for x in function.inputs if uses.get(id(x))}
    depths = {id(x): 0 for x in function.inputs}
    by_depth = {}  # depth -> [(rank, layer name)] in run order
    for node in nodes:
        below = max((depths.get(id(x), 0) for x in node.input_tensors),
                    default=0)
        for x in node.input_tensors:
            uses[id(x)] -= 1
            if not uses[id(x)]:
                live.discard(id(x))
        for x in node.outputs:
            depths[id(x)] = below + weight_depth(node.operation)
            if uses.get(id(x)):
                live.add(id(x))
        operation = node.operation
        if (
            len(node.outputs) == 1
            and live == {id(node.outputs[0])}
            and isinstance(operation, keras.layers.Layer)
            and calls[id(operation)] == 1
        ):
            x = node.outputs[0]
            by_depth.setdefault(depths[id(x)], []).append(
                (len(x.shape), operation.name)
            )
    cuts = {
        depth: [name for rank, name in found if rank == found[0][0]][-1]
        for depth, found in by_depth.items()
    }
    return cuts, depths[id(output)]


def _assign(ideals, depths, total):
    """Indices into `depths` (sorted, distinct) for `ideals`, increasing.

    Minimizes the summed distance to the ideal depths; ties go to the cut
    point nearer `total / 2`, then to the deeper one.
    """
    middle = total / 2

    def cost(ideal, depth):
        return (abs(depth - ideal), abs(depth - middle), -depth)

    def add(a, b):
        return tuple(x + y for x, y in zip(a, b))

    num = len(depths)
    # best[m]: (cost, chosen indices) with the current ideal at index m.
    best = [(cost(ideals[0], d), (m,)) for m, d in enumerate(depths)]
    for ideal in ideals[1:]:
        row = [None] * num
        prefix = None  # The best entry of the previous row left of m.
        for m, d in enumerate(depths):
            if m and best[m - 1] is not None and (
                prefix is None or best[m - 1][0] < prefix[0]
            ):
                prefix = best[m - 1]
            if prefix is not None:
                row[m] = (add(prefix[0], cost(ideal, d)), prefix[1] + (m,))
        best = row
    return list(min((entry for entry in best if entry is not None),
                    key=lambda entry: entry[0])[1])
