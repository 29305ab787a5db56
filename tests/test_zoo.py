"""Model zoo beyond the CIFAR ResNet: sizes against the literature, one
multi-way training step per family, head placement and argument checks.

Counts are TRAINABLE parameters (BN: 2 per channel, as PyTorch's
`sum(p.numel() for p in model.parameters())` counts them) of the plain
(`num_losses=1`) network with 10 classes.
"""

import numpy as np
import pytest
from _smoke_training import assert_learns

from keras_mwbp.models import cifar_mobilenet_v2
from keras_mwbp.models import densenet_bc
from keras_mwbp.models import preact_resnet
from keras_mwbp.models import resnext29
from keras_mwbp.models import wide_resnet

pytestmark = pytest.mark.oldest_keras()


def trainable_params(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_variables)


@pytest.mark.parametrize(
    "build, expected, reference, tolerance",
    [
        # He et al. 2016b (Identity Mappings), Table 3 / CIFAR ResNets of
        # He et al. 2016a: ResNet-20 0.27M, ResNet-56 0.85M, ResNet-110 1.7M;
        # pre-act ResNet-164 (bottleneck) 1.7M (Table 2/3). No BN on the
        # projection shortcuts, so 192 fewer than the post-act ResNets.
        (lambda: preact_resnet(20, method="standard"), 272_282, 0.27e6, 0.01),
        (lambda: preact_resnet(56, method="standard"), 855_578, 0.85e6, 0.01),
        (lambda: preact_resnet(110, method="standard"), 1_730_522, 1.7e6, 0.02),
        (lambda: preact_resnet(164, method="standard"), 1_703_258, 1.7e6, 0.01),
        # Zagoruyko & Komodakis 2016, Table 1/4: WRN-28-10 36.5M (the
        # PyTorch reference xternalz/WideResNet-pytorch: 36,479,194), the
        # same network spelled WRN-26-10 (6n + 2), WRN-28-2 1.5M (1.47M),
        # WRN-16-8 11.0M, WRN-40-4 8.9M.
        (lambda: wide_resnet(28, 10, method="standard"), 36_479_194, 36.5e6, 0.01),
        (lambda: wide_resnet(26, 10, method="standard"), 36_479_194, 36.5e6, 0.01),
        (lambda: wide_resnet(28, 2, method="standard"), 1_467_610, 1.47e6, 0.01),
        (lambda: wide_resnet(16, 8, method="standard"), 10_961_370, 11.0e6, 0.01),
        (lambda: wide_resnet(40, 4, method="standard"), 8_949_210, 8.9e6, 0.01),
        # Xie et al. 2017, Table 7: ResNeXt-29 8x64d 34.4M.
        (lambda: resnext29(8, 64, method="standard"), 34_426_698, 34.4e6, 0.01),
        # Huang et al. 2017, Table 2: DenseNet-BC (L=100, k=12) 0.8M, the
        # rounding of 769,162 (count of the PyTorch ports, e.g.
        # bamos/densenet.pytorch); DenseNet-BC (L=250, k=24) 15.3M.
        (lambda: densenet_bc(100, 12, method="standard"), 769_162, 0.769e6, 0.01),
        # kuangliu/pytorch-cifar MobileNetV2 (CIFAR strides, ReLU, 1x1
        # projection shortcuts where stride 1 changes the channels):
        # 2,296,922 = 2.3M; the ImageNet network with a 10-class classifier
        # would have 2.24M (Sandler et al. 2018: 3.4M with 1000 classes).
        (lambda: cifar_mobilenet_v2(method="standard"), 2_296_922, 2.3e6, 0.01),
    ],
    ids=[
        "preact20", "preact56", "preact110", "preact164", "wrn28_10",
        "wrn26_10", "wrn28_2", "wrn16_8", "wrn40_4", "resnext29_8x64d",
        "densenet_bc100_12", "mobilenet_v2",
    ],
)
def test_sizes_match_literature(build, expected, reference, tolerance):
    model = build()
    count = trainable_params(model)
    assert count == expected
    assert abs(count - reference) / reference < tolerance
    assert model.output_names == ["final"]


def test_densenet_bc_100_has_the_papers_structure():
    """DenseNet-BC (L=100, k=12): 16 bottleneck layers per block, 2k stem
    maps, k new maps per layer, transitions halving the channels; 100
    weight layers; 0.8M parameters, as Huang et al. round it."""
    model = densenet_bc(100, 12, method="standard", input_shape=(8, 8, 3))

    def channels(name):
        return model.get_layer(name).output.shape[-1]

    # Stem 2k = 24; block 1: 24 + 16 * 12 = 216; transition: 108; block 2:
    # 108 + 192 = 300; transition: 150; block 3: 150 + 192 = 342.
    assert channels("stem_conv") == 24
    assert channels("block_16_out") == 216
    assert channels("transition_1_conv") == 108
    assert channels("block_32_out") == 300
    assert channels("transition_2_conv") == 150
    assert channels("block_48_out") == 342
    assert "block_49_out" not in {layer.name for layer in model.layers}
    # Stem, 2 convolutions per bottleneck layer, 2 transitions, the dense.
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("Conv2D") == 1 + 2 * 48 + 2
    assert kinds.count("Dense") == 1
    assert round(trainable_params(model) / 1e6, 1) == 0.8


TINY = {
    "preact_resnet8": lambda **kw: preact_resnet(8, **kw),
    "wrn10_1_dropout": lambda **kw: wide_resnet(10, 1, dropout_rate=0.3, **kw),
    "resnext29_2x4d": lambda **kw: resnext29(2, 4, **kw),
    "densenet_bc16_4": lambda **kw: densenet_bc(16, 4, **kw),
    "mobilenet_v2": lambda **kw: cifar_mobilenet_v2(**kw),
}


# Trained eagerly: tracing its MW-BP step is most of the cost (on 2 cores,
# 59 s compiled, 18 s eager). The compiled step of its kind of layer (the
# depthwise convolution) equals the eager one in float64
# (test_compiled_step.py). The others train compiled; ResNeXt eagerly would
# be slower (TensorFlow compiles each grouped convolution call with XLA).
EAGER = {"mobilenet_v2"}


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("family", sorted(TINY))
def test_mwbp_training_moves_every_weight_and_lowers_every_loss(family):
    """A few MW-BP steps on one fixed batch: per-head logs, every trainable
    weight moved, every head's loss lower than before the first update."""
    model = TINY[family](num_classes=5, num_losses=3, method="mwbp")
    assert model.output_names == ["head_0", "head_1", "final"]
    depths = model.head_depths
    assert len(depths) == 3 and list(depths) == sorted(set(depths))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 32, 32, 3)).astype("float32")
    y = np.array([1, 4, 0, 2])
    logs = assert_learns(model, x, y, metrics=["accuracy"],
                         run_eagerly=family in EAGER)
    for name in model.output_names:
        assert len(logs[f"{name}_accuracy"]) == len(logs["loss"])


def test_heads_are_spread_evenly_over_blocks():
    # WRN-16-1: 6 blocks; 3 losses: every 6 // 3 = 2 blocks back from the
    # last, i.e. blocks 2 and 4.
    model = wide_resnet(16, 1, num_losses=3, input_shape=(8, 8, 3))
    assert model.get_layer("head_0_bn").input is (
        model.get_layer("block_2_out").output
    )
    assert model.get_layer("head_1_bn").input is (
        model.get_layer("block_4_out").output
    )
    # Block b's output is 2b + 1 weight layers deep on the longest path (a
    # 1x1 projection sits beside conv1, not on top of it); the final head:
    # 13 + dense = 14 (WRN-16 counts the three projections, too).
    assert model.head_depths == (5, 9, 14)


def test_explicit_taps_and_custom_head():
    from keras_mwbp.heads import pool_dense

    model = densenet_bc(
        16, 4, num_classes=7, num_losses=3, taps=[1, 4], head=pool_dense,
        input_shape=(8, 8, 3),
    )
    assert model.get_layer("head_0_pool").input is (
        model.get_layer("block_1_out").output
    )
    assert model.get_layer("head_1_pool").input is (
        model.get_layer("block_4_out").output
    )
    assert "head_0_bn" not in {layer.name for layer in model.layers}
    logits = model(np.zeros((2, 8, 8, 3), "float32"))
    assert [tuple(t.shape) for t in logits] == [(2, 7)] * 3


def test_mobilenet_v2_keeps_cifar_resolution():
    model = cifar_mobilenet_v2(num_losses=2)

    def shape(name):
        return tuple(model.get_layer(name).output.shape[1:])

    # Stem and the 24-channel stage keep 32x32 (stride 1 instead of 2).
    assert shape("stem_conv") == (32, 32, 32)
    assert shape("block_3_out") == (32, 32, 24)
    assert shape("block_17_out") == (4, 4, 320)
    assert shape("top_relu") == (4, 4, 1280)


def test_resnext_uses_grouped_convolutions():
    model = resnext29(8, 4, num_losses=2, input_shape=(8, 8, 3))
    conv = model.get_layer("block_1_conv2")
    assert conv.groups == 8 and conv.filters == 32
    assert model.get_layer("block_9_conv2").filters == 128


@pytest.mark.parametrize(
    "build, argument",
    [
        (lambda: preact_resnet(7), "depth"),
        (lambda: preact_resnet(True), "depth"),
        (lambda: preact_resnet(20, num_losses=0), "num_losses"),
        (lambda: preact_resnet(8, num_losses=4), "num_losses"),
        (lambda: preact_resnet(20, num_losses=3, taps=[5, 4]), "taps"),
        (lambda: wide_resnet(27, 2), "depth"),
        (lambda: wide_resnet(4, 2), "depth"),
        (lambda: wide_resnet(28, 0), "widen_factor"),
        (lambda: wide_resnet(28, 2.5), "widen_factor"),
        (lambda: wide_resnet(28, 2, dropout_rate=1.0), "dropout_rate"),
        (lambda: wide_resnet(10, 1, num_losses=4), "num_losses"),
        (lambda: resnext29(0), "cardinality"),
        (lambda: resnext29(8, -1), "bottleneck_width"),
        (lambda: resnext29(num_losses=10), "num_losses"),
        (lambda: resnext29(num_losses=2, taps=[9]), "taps"),
        (lambda: densenet_bc(99), "depth"),
        (lambda: densenet_bc(4), "depth"),
        (lambda: densenet_bc(100, 0), "growth_rate"),
        (lambda: densenet_bc(16, 4, num_losses=7), "num_losses"),
        (lambda: cifar_mobilenet_v2(num_losses=18), "num_losses"),
        (lambda: cifar_mobilenet_v2(num_losses=2, taps=[0]), "taps"),
    ],
)
def test_bad_arguments_raise(build, argument):
    with pytest.raises(ValueError, match=f"`{argument}`.*Received: {argument}="):
        build()
