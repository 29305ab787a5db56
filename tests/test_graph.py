"""Graph analysis (`keras_mwbp.graph`): tap depths, what each loss depends
on and the re-linearized region of a loss."""

import re

import keras
import pytest

import keras_mwbp
from conftest import mlp_model
from keras_mwbp.graph import HeadGraph
from keras_mwbp.graph import check_outputs_depend_on_inputs
from keras_mwbp.graph import is_weight_layer

L = keras.layers


def residual_conv_model(method="mwbp", **kwargs):
    """A small residual convnet with 3 heads.

    Weight layers: c1 (1) -> block c2 (2), c3 (3), skip proj (2) -> add
    (longest path 3) -> h0 head (its own conv and dense); c4 (4) -> h1 head;
    c5 (5) -> final dense (6).
    """
    inputs = keras.Input((8, 8, 1))
    a1 = L.ReLU()(L.Conv2D(2, 3, padding="same", name="c1")(inputs))
    branch = L.Conv2D(2, 3, padding="same", activation="relu", name="c2")(a1)
    branch = L.Conv2D(2, 3, padding="same", name="c3")(branch)
    skip = L.Conv2D(2, 1, name="proj")(a1)
    a2 = L.ReLU()(L.Add()([branch, skip]))
    head = L.Conv2D(2, 1, name="h0_conv")(a2)
    h0 = L.Dense(3, name="h0")(L.GlobalAveragePooling2D()(head))
    a3 = L.Conv2D(2, 3, padding="same", activation="relu", name="c4")(a2)
    h1 = L.Dense(3, name="h1")(L.GlobalAveragePooling2D()(a3))
    a4 = L.Conv2D(2, 3, padding="same", activation="relu", name="c5")(a3)
    final = L.Dense(3, name="final")(L.GlobalAveragePooling2D()(a4))
    return keras_mwbp.MultiWayModel(inputs, [h0, h1, final], method=method,
                                    **kwargs)


def paths(variables):
    return [v.path for v in variables]


def in_model_order(model, wanted):
    """The paths of `wanted`, in `model.trainable_variables` order."""
    ordered = [p for p in paths(model.trainable_variables) if p in wanted]
    assert set(ordered) == set(wanted), "a wanted path is not in the model"
    return ordered


def node_index(graph, model, layer_name):
    """Index in `graph.nodes` of the node of layer `layer_name`."""
    output = model.get_layer(layer_name).output
    return graph.producer[id(output)]


# ------------------------------------------------------------------ depths


def test_mlp_head_depths_are_the_hand_count():
    model = mlp_model()
    # h0 taps d1 (1 weight layer), h1 taps d2 (2); the final output counts
    # d1, d2, d3 and its own dense layer (4).
    assert model.head_depths == (1, 2, 4)
    assert HeadGraph(model).depths == (1, 2, 4)
    # gamma = ((1/2)^2, 1, 1).
    assert model.head_weights == (0.25, 1.0, 1.0)


def test_residual_depth_is_the_longest_path_through_the_block():
    model = residual_conv_model()
    # Block path c1, c2, c3 = 3 beats the skip path c1, proj = 2; the head's
    # own 1x1 conv and dense do not count for the auxiliary head; the final
    # head's dense counts: c1, c2, c3, c4, c5, final = 6.
    assert model.head_depths == (3, 4, 6)
    assert model.head_weights == pytest.approx(((3 / 4) ** 2, 1.0, 1.0))


def test_residual_depth_uses_the_skip_when_it_is_longer():
    inputs = keras.Input((8, 8, 1))
    a1 = L.Conv2D(2, 3, padding="same", name="c1")(inputs)
    # Identity-free skip with 3 convolutions, block with 1.
    skip = a1
    for name in ("s1", "s2", "s3"):
        skip = L.Conv2D(2, 1, name=name)(skip)
    block = L.Conv2D(2, 3, padding="same", name="b1")(a1)
    merged = L.Add()([block, skip])
    h0 = L.Dense(3, name="h0")(L.GlobalAveragePooling2D()(merged))
    top = L.Conv2D(2, 3, padding="same", name="top")(merged)
    final = L.Dense(3, name="final")(L.GlobalAveragePooling2D()(top))
    model = keras_mwbp.MultiWayModel(inputs, [h0, final])
    assert model.head_depths == (4, 6)


def test_head_layers_count_for_the_final_head_only():
    inputs = keras.Input((6,))
    a1 = L.Dense(4, name="t1")(inputs)
    # A deep auxiliary head: three dense layers of its own.
    h = L.Dense(4, name="ha")(a1)
    h = L.Dense(4, name="hb")(h)
    h0 = L.Dense(3, name="hc")(h)
    a2 = L.Dense(4, name="t2")(a1)
    final = L.Dense(3, name="fa")(L.Dense(4, name="fb")(a2))
    model = keras_mwbp.MultiWayModel(inputs, [h0, final])
    assert model.head_depths == (1, 4)


def test_nested_functional_block_counts_its_weight_layers():
    block_in = keras.Input((4,))
    block_out = L.Dense(4, name="s2")(L.Dense(4, name="s1")(block_in))
    block = keras.Model(block_in, block_out, name="block")
    inputs = keras.Input((6,))
    a1 = L.Dense(4, name="d1")(inputs)
    h0 = L.Dense(3, name="h0")(a1)
    a2 = block(a1)
    h1 = L.Dense(3, name="h1")(a2)
    final = L.Dense(3, name="final")(L.Dense(4, name="d4")(a2))
    model = keras_mwbp.MultiWayModel(inputs, [h0, h1, final])
    assert model.head_depths == (1, 3, 5)
    graph = HeadGraph(model)
    assert paths(graph.loss_variables[1]) == in_model_order(
        model, {"d1/kernel", "d1/bias", "s1/kernel", "s1/bias", "s2/kernel",
                "s2/bias", "h1/kernel", "h1/bias"})


def test_explicit_head_depths_override_the_graph():
    model = mlp_model(head_depths=[2, 3, 9])
    assert model.head_depths == (2, 3, 9)
    assert model.head_weights == pytest.approx(((2 / 3) ** 2, 1.0, 1.0))


def test_is_weight_layer_counts_kernels_only():
    dense = L.Dense(2)
    dense.build((None, 3))
    bn = L.BatchNormalization()
    bn.build((None, 3))
    conv = L.Conv2D(2, 1)
    conv.build((None, 4, 4, 1))
    assert is_weight_layer(dense) and is_weight_layer(conv)
    assert not is_weight_layer(bn)
    assert not is_weight_layer(L.ReLU())


# --------------------------------------------------------- loss variables


def test_mlp_loss_variables_are_exactly_each_heads_path():
    model = mlp_model()
    graph = HeadGraph(model)
    expected = [
        {"d1/kernel", "d1/bias", "h0/kernel", "h0/bias"},
        {"d1/kernel", "d1/bias", "d2/kernel", "d2/bias", "h1/kernel",
         "h1/bias"},
        {"d1/kernel", "d1/bias", "d2/kernel", "d2/bias", "d3/kernel",
         "d3/bias", "final/kernel", "final/bias"},
    ]
    assert len(graph.loss_variables) == 3
    for actual, wanted in zip(graph.loss_variables, expected):
        assert paths(actual) == in_model_order(model, wanted)
    # The variables are the model's own objects, not copies.
    model_ids = {id(v) for v in model.trainable_variables}
    assert all(id(v) in model_ids for vs in graph.loss_variables for v in vs)


def test_residual_loss_variables_are_exactly_each_heads_path():
    model = residual_conv_model()
    graph = HeadGraph(model)
    trunk = {f"{n}/{w}" for n in ("c1", "c2", "c3", "proj")
             for w in ("kernel", "bias")}
    expected = [
        trunk | {"h0_conv/kernel", "h0_conv/bias", "h0/kernel", "h0/bias"},
        trunk | {"c4/kernel", "c4/bias", "h1/kernel", "h1/bias"},
        trunk | {"c4/kernel", "c4/bias", "c5/kernel", "c5/bias",
                 "final/kernel", "final/bias"},
    ]
    for actual, wanted in zip(graph.loss_variables, expected):
        assert paths(actual) == in_model_order(model, wanted)


def test_loss_variables_leave_out_non_trainable_state():
    model = mlp_model(batch_norm=True)
    graph = HeadGraph(model)
    assert paths(graph.loss_variables[0]) == in_model_order(
        model, {"d1/kernel", "d1/bias", "bn/gamma", "bn/beta", "h0/kernel",
                "h0/bias"})


def test_frozen_layers_are_not_loss_variables():
    model = mlp_model()
    model.get_layer("d2").trainable = False
    graph = HeadGraph(model)
    assert paths(graph.loss_variables[1]) == in_model_order(
        model, {"d1/kernel", "d1/bias", "h1/kernel", "h1/bias"})


# ------------------------------------------------------ ancestors, region


def test_mlp_ancestors_are_the_nodes_each_output_needs():
    model = mlp_model()
    graph = HeadGraph(model)
    idx = {name: node_index(graph, model, name)
           for name in ("d1", "r1", "h0", "d2", "h1", "d3", "final")}
    assert graph.ancestors == (
        frozenset({idx["d1"], idx["r1"], idx["h0"]}),
        frozenset({idx["d1"], idx["r1"], idx["d2"], idx["h1"]}),
        frozenset({idx["d1"], idx["r1"], idx["d2"], idx["d3"], idx["final"]}),
    )
    # r1's output feeds h0 and d2; d2's feeds h1 and d3.
    assert graph.consumers[id(model.get_layer("r1").output)] == 2
    assert graph.consumers[id(model.get_layer("d2").output)] == 2
    assert graph.consumers[id(model.get_layer("d3").output)] == 1


def test_region_of_a_chain_is_the_updated_nodes_and_everything_below():
    model = mlp_model()
    graph = HeadGraph(model)
    idx = {name: node_index(graph, model, name)
           for name in ("d1", "r1", "d2", "d3")}
    ids = [{id(v) for v in vs} for vs in graph.loss_variables]

    # Nothing updated yet (loss 0): no re-linearization.
    assert graph.region(0, set()) == frozenset()
    # Loss 1 after loss 0 updated d1 and h0: only d1 (r1 sits above d1 and
    # has no variable; h0 is not below h1).
    assert graph.region(1, ids[0]) == frozenset({idx["d1"]})
    # Loss 2 after losses 0 and 1: d2 and everything below it.
    assert graph.region(2, ids[0] | ids[1]) == frozenset(
        {idx["d1"], idx["r1"], idx["d2"]})
    # Only d2 updated: d2, r1 and d1 (below d2) are re-linearized.
    d2_ids = {id(v) for v in model.get_layer("d2").trainable_variables}
    assert graph.region(2, d2_ids) == frozenset(
        {idx["d1"], idx["r1"], idx["d2"]})
    # Variables that loss 1 does not reach do not touch its region.
    d3_ids = {id(v) for v in model.get_layer("d3").trainable_variables}
    assert graph.region(1, d3_ids) == frozenset()
    # A region is always within the loss's ancestors; d3 is never in loss
    # 1's region.
    assert idx["d3"] not in graph.region(1, ids[2])


# ------------------------------------------------------ outputs vs inputs


def test_output_from_a_foreign_input_is_rejected():
    inputs = keras.Input((6,))
    other = keras.Input((6,), name="other")
    h0 = L.Dense(3)(inputs)
    final = L.Dense(3)(L.Add()([L.Dense(6)(inputs), other]))
    with pytest.raises(ValueError, match=re.escape(
            "Every entry of `outputs` must depend on `inputs` only. "
            "Received: outputs[1]=")):
        check_outputs_depend_on_inputs([inputs], [h0, final])


def test_non_symbolic_output_is_rejected():
    inputs = keras.Input((6,))
    with pytest.raises(ValueError, match=re.escape(
            "Every entry of `outputs` must be a symbolic tensor computed from "
            "`inputs`. Received: outputs[1]=")):
        check_outputs_depend_on_inputs([inputs], [L.Dense(3)(inputs), 3.0])


def test_outputs_of_the_inputs_pass_the_check():
    inputs = keras.Input((6,))
    outputs = [L.Dense(3)(inputs), L.Dense(3)(L.Dense(3)(inputs))]
    assert check_outputs_depend_on_inputs([inputs], outputs) is None
