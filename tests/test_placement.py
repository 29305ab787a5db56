"""`keras_mwbp.place_heads`: the paper's head placement (Sec. 4.1.2) on the
cut points of a functional backbone."""

import re

import keras
import pytest

import keras_mwbp
from keras_mwbp.heads import bn_relu_pool_dense
from keras_mwbp.heads import pool_dense
from keras_mwbp.models.cifar_resnet import apply_trunk

L = keras.layers
BLOCK_OUTPUT = re.compile(r"stem_relu|block_\d+_out")


def resnet(blocks_per_stage, logits=True):
    """A CIFAR ResNet-(6n + 2) backbone without auxiliary heads.

    Cut points: the stem (depth 1) and every block output, block b at depth
    2b + 1; with `logits` the output is the final dense layer (depth
    6n + 2), otherwise the last block's output (6n + 1).
    """
    inputs = keras.Input((32, 32, 3))
    blocks = apply_trunk(inputs, blocks_per_stage)
    output = pool_dense(blocks[-1], 10, "final") if logits else blocks[-1]
    return keras.Model(inputs, output, name=f"resnet{6 * blocks_per_stage + 2}")


@pytest.fixture(scope="module")
def resnet56():
    return resnet(9)


def test_resnet56_with_5_losses_gets_heads_near_layers_15_25_35_45(resnet56):
    # L = 56, tau = ceil(56 / 5) = 12: ideal depths 12, 24, 36, 48. The cut
    # points are the odd depths 1, 3, ..., 55, so each ideal depth lies
    # between two of them, 1 away from each: the tie goes to the one nearer
    # the middle (depth 28): 13, 25, 35, 47, i.e. blocks 6, 12, 17, 23.
    taps = keras_mwbp.place_heads(resnet56, num_losses=5)
    assert taps == ["block_6_out", "block_12_out", "block_17_out",
                    "block_23_out"]
    heads = [
        bn_relu_pool_dense(resnet56.get_layer(name).output, 10, f"head_{i}")
        for i, name in enumerate(taps)
    ]
    model = keras_mwbp.MultiWayModel(resnet56.inputs,
                                     heads + resnet56.outputs)
    assert model.head_depths == (13, 25, 35, 47, 56)
    for depth, paper in zip(model.head_depths, (15, 25, 35, 45)):
        assert abs(depth - paper) <= 3


def test_resnet56_ending_in_its_feature():
    # L = 55 (no final dense), tau = 11: ideal depths 11, 22, 33, 44. 11 and
    # 33 are cut points; 22 and 44 tie between 21/23 and 43/45, and go to
    # the one nearer the middle (27.5): 23 and 43.
    taps = keras_mwbp.place_heads(resnet(9, logits=False), num_losses=5)
    assert taps == ["block_5_out", "block_11_out", "block_16_out",
                    "block_21_out"]


# 9 and 11 losses do not fit ResNet-56 (see test_heads_reaching_the_output).
@pytest.mark.parametrize("num_losses", [2, 3, 4, 5, 6, 7, 8, 10, 12])
def test_taps_are_never_inside_a_residual_block(resnet56, num_losses):
    taps = keras_mwbp.place_heads(resnet56, num_losses)
    assert len(taps) == num_losses - 1
    assert all(BLOCK_OUTPUT.fullmatch(name) for name in taps), taps
    depths = [_block_depth(name) for name in taps]
    assert depths == sorted(set(depths))
    assert all(0 < d < 56 for d in depths)


def _block_depth(name):
    if name == "stem_relu":
        return 1
    return 2 * int(name.split("_")[1]) + 1


def wide_block_net():
    """Stem conv (depth 1), then 5 residual blocks of 4 convolutions each
    (block k ends at depth 1 + 4k), pooling and a dense layer: L = 22."""
    inputs = keras.Input((8, 8, 2))
    x = L.Conv2D(4, 3, padding="same", activation="relu", name="stem")(inputs)
    for k in range(1, 6):
        y = x
        for j in range(4):
            y = L.Conv2D(4, 3, padding="same", name=f"block_{k}_conv{j}")(y)
            y = L.ReLU(name=f"block_{k}_relu{j}")(y)
        x = L.ReLU(name=f"block_{k}_out")(L.Add(name=f"block_{k}_add")([x, y]))
    output = L.Dense(3, name="logits")(L.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, output, name="wide_blocks")


def test_ideal_depths_inside_a_block_go_to_the_nearest_block_output():
    # L = 22, tau = ceil(22 / 3) = 8: ideal depths 8 and 16 lie inside
    # blocks 2 and 4 (depths 6-9 and 14-17); the nearest cut points are the
    # block outputs at 9 and 17.
    net = wide_block_net()
    assert keras_mwbp.place_heads(net, 3) == ["block_2_out", "block_4_out"]
    for num_losses in range(2, 7):
        taps = keras_mwbp.place_heads(net, num_losses, min_interval=1)
        assert all(re.fullmatch(r"stem|block_\d_out", t) for t in taps), taps


def chain(num_layers, separate_activations=False):
    inputs = keras.Input((5,))
    x = inputs
    for i in range(1, num_layers + 1):
        if separate_activations:
            x = L.Dense(4, name=f"dense_{i}")(x)
            x = L.BatchNormalization(name=f"bn_{i}")(x)
            x = L.ReLU(name=f"relu_{i}")(x)
        else:
            x = L.Dense(4, activation="relu", name=f"dense_{i}")(x)
    return keras.Model(inputs, x, name="chain")


def test_in_a_plain_chain_every_layer_is_a_cut_point():
    # L = 20, tau = 5: depths 5, 10, 15 exactly.
    assert keras_mwbp.place_heads(chain(20), 4) == [
        "dense_5", "dense_10", "dense_15"
    ]
    # min_interval=1 allows a head on every layer but the last.
    assert keras_mwbp.place_heads(chain(20), 20, min_interval=1) == [
        f"dense_{i}" for i in range(1, 20)
    ]


def test_of_the_layers_at_one_depth_the_activated_feature_is_used():
    # Dense -> BN -> ReLU all sit at one depth; the head goes after ReLU.
    assert keras_mwbp.place_heads(chain(20, separate_activations=True), 4) == [
        "relu_5", "relu_10", "relu_15"
    ]


def test_a_pooled_copy_of_the_feature_is_not_a_tap():
    # Depth 10 holds conv_10's ReLU output and its global average pooling;
    # the 4D feature is used, not the pooled vector.
    inputs = keras.Input((4, 4, 2))
    x = inputs
    for i in range(1, 11):
        x = L.Conv2D(2, 1, activation="relu", name=f"conv_{i}")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    net = keras.Model(inputs, L.Dense(3, name="logits")(x))
    # L = 11, tau = 1 with 11 losses; the last ideal depth is 10.
    taps = keras_mwbp.place_heads(net, 11, min_interval=1)
    assert taps[-1] == "conv_10" and "pool" not in taps


def test_shared_layers_and_operations_are_not_taps():
    inputs = keras.Input((4,))
    shared = L.Dense(4, name="shared")
    x = inputs
    for i in range(1, 7):
        x = L.Dense(4, name=f"dense_{i}")(x)
        x = shared(x)  # A layer used several times: not a tap.
        x = keras.ops.relu(x)  # An operation, not a layer: not a tap.
        x = L.Identity(name=f"out_{i}")(x)
    net = keras.Model(inputs, L.Dense(2, name="logits")(x))
    # dense_i ends at depth 2i - 1, out_i at 2i; L = 13, tau = ceil(13 / 3)
    # = 5: ideal depths 5 (dense_3) and 10 (out_5; `shared` and the relu
    # operation at that depth are not candidates).
    assert keras_mwbp.place_heads(net, 3) == ["dense_3", "out_5"]
    taps = keras_mwbp.place_heads(net, 13, min_interval=1)
    assert all(re.fullmatch(r"dense_\d|out_\d", t) for t in taps), taps


def test_a_sequential_backbone_is_read_as_a_chain():
    net = keras.Sequential(
        [keras.Input((5,))]
        + [L.Dense(4, name=f"dense_{i}") for i in range(1, 11)]
    )
    assert keras_mwbp.place_heads(net, 2) == ["dense_5"]


# ------------------------------------------------------------------- errors
def test_too_many_losses_raise_with_the_numbers(resnet56):
    message = (
        "Backbone 'resnet56' of depth 56 (weight layers) with 20 losses: one "
        "head every 3 weight layers (tau = ceil(56 / 20)), but "
        "`min_interval`=5. Numbers of losses that fit: 2-8, 10, 12 (or lower "
        "`min_interval`)."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        keras_mwbp.place_heads(resnet56, 20)
    with pytest.raises(ValueError, match=re.escape(
        "Backbone 'resnet20' of depth 20 (weight layers) with 10 losses: one "
        "head every 2 weight layers"
    )):
        keras_mwbp.place_heads(resnet(3), 10)


@pytest.mark.parametrize(
    "num_losses, tau, head, depth", [(9, 7, 8, 56), (11, 6, 10, 60), (13, 5, 12, 60)]
)
def test_heads_reaching_the_output_raise(resnet56, num_losses, tau, head, depth):
    # tau = ceil(56 / num_losses) >= 5, but the deepest auxiliary head,
    # (num_losses - 1) * tau, would not lie below the output (depth 56).
    with pytest.raises(
        ValueError,
        match=rf"{num_losses} losses: one head every {tau} weight layers .*"
        rf"auxiliary head {head} at depth {depth}, not below the output\. "
        r"Numbers of losses that fit: 2-8, 10, 12 ",
    ):
        keras_mwbp.place_heads(resnet56, num_losses)


def test_too_shallow_a_backbone_says_so():
    with pytest.raises(ValueError, match="too shallow for an auxiliary head"):
        keras_mwbp.place_heads(chain(8), 2)  # tau = 4


def one_big_block():
    """Dense (cut, depth 1) -> residual branch of 10 dense layers -> add
    (cut, depth 11) -> logits (12)."""
    inputs = keras.Input((4,))
    a = L.Dense(4, name="first")(inputs)
    y = a
    for i in range(10):
        y = L.Dense(4, name=f"inner_{i}")(y)
    x = L.Add(name="add")([a, y])
    return keras.Model(inputs, L.Dense(2, name="logits")(x), name="big")


def test_too_few_cut_points_raise():
    with pytest.raises(ValueError, match=re.escape(
        "Backbone 'big' has 2 cut points strictly between the input and the "
        "output (layers that every path from the input to the output passes "
        "through), at depths [1, 11]; 4 losses need 3."
    )):
        keras_mwbp.place_heads(one_big_block(), 4, min_interval=1)


def test_cut_points_too_far_from_the_ideal_depth_raise():
    # tau = 6: ideal depth 6, cut points at 1 and 11 (5 away each).
    with pytest.raises(ValueError, match=re.escape(
        "the cut point used for depth 6 is at depth 11, more than tau / 2 = "
        "3 away"
    )):
        keras_mwbp.place_heads(one_big_block(), 2)


@pytest.mark.parametrize("num_losses", [1, 0, 2.0, True, "5", None])
def test_bad_num_losses_raise(num_losses):
    with pytest.raises(ValueError, match="`num_losses` must be an integer >= 2"):
        keras_mwbp.place_heads(chain(20), num_losses)


@pytest.mark.parametrize("min_interval", [0, -1, 1.5, False, "5"])
def test_bad_min_interval_raise(min_interval):
    with pytest.raises(ValueError, match="`min_interval` must be an integer >= 1"):
        keras_mwbp.place_heads(chain(20), 4, min_interval=min_interval)


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = L.Dense(2)

    def call(self, x):
        return self.dense(x)


@pytest.mark.parametrize(
    "backbone",
    [
        "resnet56",
        L.Dense(2),
        Subclassed(),
        keras.Sequential([L.Dense(2)]),  # Not built: no graph.
    ],
)
def test_a_backbone_that_is_not_functional_raises(backbone):
    with pytest.raises(TypeError, match="`backbone` must be a functional"):
        keras_mwbp.place_heads(backbone, 2)


def test_a_backbone_with_several_outputs_raises():
    inputs = keras.Input((4,))
    x = L.Dense(4)(inputs)
    net = keras.Model(inputs, [L.Dense(2)(x), L.Dense(2)(x)])
    with pytest.raises(ValueError, match="`backbone` must have one output"):
        keras_mwbp.place_heads(net, 2)
