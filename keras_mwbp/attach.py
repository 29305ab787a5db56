"""`attach_heads`: a `MultiWayModel` from a backbone and the names of its taps."""

import numbers

import keras

from keras_mwbp import heads as head_builders
from keras_mwbp.graph import _tensor_weight_depths
from keras_mwbp.graph import ordered_nodes
from keras_mwbp.graph import upstream_tensors
from keras_mwbp.multi_way_model import METHODS
from keras_mwbp.multi_way_model import MultiWayModel
from keras_mwbp.multi_way_model import _check_relay_span
from keras_mwbp.multi_way_model import _check_weighting
from keras_mwbp.placement import _functional
from keras_mwbp.placement import place_heads
from keras_mwbp.weighting import check_head_depths
from keras_mwbp.weighting import check_head_weights
from keras_mwbp.weighting import check_nu

HEADS = {
    "bn_relu_pool_dense": head_builders.bn_relu_pool_dense,
    "pool_dense": head_builders.pool_dense,
}


def attach_heads(
    backbone,
    taps,
    num_classes,
    head="bn_relu_pool_dense",
    final_head="pool_dense",
    num_losses=None,
    method="mwbp",
    **model_kwargs,
):
    """Puts classifier heads on a backbone and returns a `MultiWayModel`.

    Auxiliary head `i` reads the output of layer `taps[i]` of the backbone;
    the final head reads the backbone's output. The backbone's layers are
    shared, not copied: training the returned model trains the backbone.

    Each head's layers are named `"head_{i}_..."` (`"final_..."` for the final
    head) and its logits pass through an `Identity` layer named `"head_{i}"`
    (`"final"`), so the model's outputs, in this order from the shallowest
    head to the final one, are named `head_0, ..., head_{K-1}, final` and
    `fit()` logs `head_0_loss, ..., final_loss`: the naming convention of
    every keras_mwbp model (see `keras_mwbp.heads`), the zoo's included.

    Args:
        backbone: A functional `keras.Model` (e.g.
            `keras.applications.ResNet50(weights=None, include_top=False)`)
            with one output: the final feature map or feature vector.
        taps: List of the names of the backbone layers that carry the
            auxiliary heads, shallowest first; each layer must be called once
            in the backbone and lie strictly below its output. Or `"auto"`:
            `place_heads(backbone, num_losses)` picks them (paper Sec.
            4.1.2).
        num_classes: Number of logits of every head, a positive integer.
        head: Builder of the auxiliary heads: `"bn_relu_pool_dense"` (the
            authors' type A), `"pool_dense"`, or a callable
            `(x, num_classes, name) -> logits`. The named builders take
            feature maps of rank 3 to 5 (pooled globally) or feature vectors
            (rank 2, dense only).
        final_head: Builder of the final head on the backbone's output, as
            `head`; a rank 2 output (a feature vector) gets a dense layer.
        num_losses: Number of losses, final included. Required with
            `taps="auto"`; with a list of taps, it must equal
            `len(taps) + 1` if given.
        method: Training method of the `MultiWayModel` (see `METHODS`).
        **model_kwargs: Passed to `MultiWayModel` (`nu`, `head_depths`,
            `head_weights`, `relay_span`, `weighting`, `name`, ...).

    Returns:
        A `MultiWayModel` with `len(taps) + 1` outputs, shallowest first.

    Raises:
        TypeError: If `backbone` is not a functional Keras model, or `taps`,
            `head` or `final_head` has the wrong type, or a head builder
            returns something other than a symbolic tensor.
        ValueError: If a tap is unknown, duplicated, out of order (not
            shallow to deep), not below the backbone's output, if
            `num_classes`, `num_losses` or a head name is invalid, or if a
            head builder returns logits that do not depend on its input.

    Example:

    ```python
    backbone = keras.applications.ResNet50(
        weights=None, include_top=False, input_shape=(32, 32, 3))
    model = keras_mwbp.attach_heads(
        backbone, ["conv3_block4_out", "conv4_block6_out"], num_classes=10,
        nu=2.0)
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train)  # logs head_0_loss, head_1_loss, final_loss
    ```
    """
    backbone = _functional(backbone)
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, numbers.Integral)
        or num_classes < 1
    ):
        raise ValueError(
            "`num_classes` must be a positive integer. "
            f"Received: num_classes={num_classes!r}"
        )
    head = _builder(head, "head")
    final_head = _builder(final_head, "final_head")
    taps = _check_taps(backbone, taps, num_losses)
    # Before any head touches the backbone's graph.
    _check_model_kwargs(method, model_kwargs, len(taps) + 1)
    outputs = []
    for index, name in enumerate(taps):
        x = backbone.get_layer(name).output
        outputs.append(_head(head, "head", x, num_classes, f"head_{index}"))
    outputs.append(
        _head(final_head, "final_head", backbone.outputs[0], num_classes,
              "final")
    )
    return MultiWayModel(backbone.inputs, outputs, method=method, **model_kwargs)


def _check_model_kwargs(method, model_kwargs, num_outputs):
    """Raises the `MultiWayModel` constructor's errors for its documented
    arguments, before the heads are built."""
    if method not in METHODS:
        raise ValueError(
            f"`method` must be one of {METHODS}. Received: method={method!r}"
        )
    if "nu" in model_kwargs:
        check_nu(model_kwargs["nu"])
    if "relay_span" in model_kwargs:
        _check_relay_span(model_kwargs["relay_span"])
    _check_weighting(model_kwargs.get("weighting", "paper"), method)
    if model_kwargs.get("head_weights") is not None:
        check_head_weights(
            model_kwargs["head_weights"], num_outputs
        )
    if model_kwargs.get("head_depths") is not None:
        check_head_depths(model_kwargs["head_depths"], num_outputs)


def _builder(head, argument):
    if isinstance(head, str):
        if head not in HEADS:
            raise ValueError(
                f"`{argument}` must be one of {sorted(HEADS)} or a callable "
                f"`(x, num_classes, name) -> logits`. Received: "
                f"{argument}={head!r}"
            )
        return HEADS[head]
    if not callable(head):
        raise TypeError(
            f"`{argument}` must be a head name ({sorted(HEADS)}) or a "
            "callable `(x, num_classes, name) -> logits`. Received: "
            f"{argument}={head!r} of type {type(head).__name__}"
        )
    return head


def _head(builder, argument, x, num_classes, name):
    """Calls head builder `builder` (the value of `argument`) on `x`."""
    logits = builder(x, num_classes, name)
    if not isinstance(logits, keras.KerasTensor):
        raise TypeError(
            f"`{argument}` must return a symbolic tensor (the logits). "
            f"Received: {argument}={builder!r}, which returned {logits!r} "
            f"for head {name!r}"
        )
    if id(x) not in upstream_tensors(logits):
        raise ValueError(
            f"`{argument}` must return logits computed from the feature it "
            f"is given. Received: {argument}={builder!r}, whose logits for "
            f"head {name!r} ({logits!r}) do not depend on that feature"
        )
    return head_builders.output_name(logits, name)


def _check_taps(backbone, taps, num_losses):
    """Validates `taps` (or places them) and returns the list of names."""
    if isinstance(taps, str):
        if taps != "auto":
            raise ValueError(
                '`taps` must be a list of layer names or "auto". '
                f"Received: taps={taps!r}"
            )
        if num_losses is None:
            raise ValueError(
                '`num_losses` is required with taps="auto" (the number of '
                "losses, final included). Received: num_losses=None"
            )
        return place_heads(backbone, num_losses)
    if not isinstance(taps, (list, tuple)) or not all(
        isinstance(name, str) for name in taps
    ):
        raise TypeError(
            '`taps` must be a list of layer names (str) or "auto". '
            f"Received: taps={taps!r}"
        )
    taps = list(taps)
    if not taps:
        raise ValueError(
            "`taps` must name at least one layer (one auxiliary head). "
            f"Received: taps={taps!r}"
        )
    if num_losses is not None and num_losses != len(taps) + 1:
        raise ValueError(
            f"`num_losses` must equal len(taps) + 1 = {len(taps) + 1} (the "
            "auxiliary losses and the final one), or be None. Received: "
            f"num_losses={num_losses!r}, taps={taps!r}"
        )
    duplicates = sorted({name for name in taps if taps.count(name) > 1})
    if duplicates:
        raise ValueError(
            f"`taps` must name each layer once; {duplicates} appear more "
            f"than once. Received: taps={taps!r}"
        )
    layers = {layer.name: layer for layer in backbone.layers}
    unknown = [name for name in taps if name not in layers]
    if unknown:
        raise ValueError(
            f"`taps` names layers that are not in backbone "
            f"{backbone.name!r}: {unknown}. Received: taps={taps!r}"
        )
    nodes = ordered_nodes(backbone)
    position = {}  # id(tensor) -> index of the node computing it.
    calls = {}
    for index, node in enumerate(nodes):
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
        for x in node.outputs:
            position[id(x)] = index
    output = backbone.outputs[0]
    below_output = set(upstream_tensors(output))
    depth_of = _tensor_weight_depths(backbone)
    depths = []
    for name in taps:
        layer = layers[name]
        if calls.get(id(layer), 0) != 1 or len(
            keras.tree.flatten(layer.output)
        ) != 1:
            raise ValueError(
                f"`taps` must name layers called once in the backbone, with "
                f"one output; layer {name!r} is not. Received: taps={taps!r}"
            )
        x = layer.output
        if x is output or id(x) not in below_output:
            where = (
                "is the backbone's output (the final head reads it)"
                if x is output
                else "does not lie below the backbone's output"
            )
            raise ValueError(
                f"`taps` must name layers strictly below the backbone's "
                f"output; layer {name!r} {where}. Received: taps={taps!r}"
            )
        depths.append((position[id(x)], depth_of.get(id(x), 0)))
    for (a, b), (first, second) in zip(zip(taps, taps[1:]),
                                       zip(depths, depths[1:])):
        if second[0] <= first[0] or second[1] <= first[1]:
            raise ValueError(
                "`taps` must be ordered from shallow to deep, each tap deeper "
                f"(in weight layers) than the previous: {b!r} (depth "
                f"{second[1]}) is not deeper than {a!r} (depth {first[1]}). "
                f"Received: taps={taps!r}"
            )
    return taps
