"""Every training method of ``keras_mwbp`` against the authors' loop in PyTorch.

An independent check from plain PyTorch: ``benchmarks/authors_loop.py``
trains its ``ResNetWithHeads`` the way the authors' code does (one forward
pass, per loss ``backward(retain_graph=True)`` and a step of that loss's own
SGD, which writes the parameters through ``.data``; naive MW-BP re-runs the
forward pass; Joint, Relay and standard BP one optimizer). Here a small
``keras_mwbp.models.cifar_resnet`` (ResNet-8, 3 losses, 8x8x3 images) and the
PyTorch network start from the same weights, train 3 steps of each of the
seven methods on the same batches (SGD, Nesterov momentum 0.9) and must end
with the same weights and BatchNorm moving statistics, within float32
round-off. Runs under every Keras backend; the reference is PyTorch in every
case (skipped without torch).

Two conventions differ and are converted, not approximated:

- PyTorch pads a 3x3 stride-2 convolution by one pixel on each side, Keras's
  ``"same"`` by one pixel at the bottom and right only: the reference is
  built with ``keras_padding=True``.
- PyTorch's running variance averages the unbiased batch variance
  (``n / (n - 1)`` times the biased one, n = batch x height x width), Keras's
  moving variance the biased one. With momentum m = 0.9, the same start
  ``v0`` and 3 steps, ``keras = m^3 v0 + (torch - m^3 v0) (n - 1) / n``
  exactly, which is what is compared.
"""

import os
import pathlib
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

torch = pytest.importorskip("torch")

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
import authors_loop  # noqa: E402

from keras_mwbp.models import cifar_resnet  # noqa: E402

# One xdist worker runs the whole file (conftest.ONE_WORKER_FILES), so its
# module-scoped fixtures are built once, not once per worker.

METHODS = authors_loop.METHODS
DEPTH, BLOCKS_PER_STAGE, NUM_LOSSES = 8, 1, 3
INPUT_SHAPE, NUM_CLASSES, BATCH, STEPS = (8, 8, 3), 5, 8, 3
LEARNING_RATE, MOMENTUM = 0.1, 0.9
# float32 round-off of two implementations (oneDNN, XLA, Eigen and ATen
# convolutions sum in different orders) over 3 steps.
RTOL, ATOL = 1e-4, 1e-5
# Every weight tensor must move by more than this in 3 steps (and mwbp's
# result must differ from every other method's by more), 100x the tolerance.
MIN_CHANGE = 100 * ATOL
BN_MOMENTUM = 0.9  # Keras's; PyTorch's 0.1.
WEIGHT_SEED, DATA_SEED = 0, 2
# A ReLU input within float32 round-off of 0 can fall on the other side of 0
# in the other implementation; its gradient then differs by a whole element
# (seen: an input of -3.6e-7 in the reference, positive under TensorFlow,
# gave naive_mwbp's trunk gradients a 5% difference). The seeds above keep
# every ReLU input of every method's reference run farther from 0 than this.
RELU_MARGIN = 2e-6


def keras_model(method, weighting="paper", weight_decay=0.0):
    keras.utils.set_random_seed(0)
    model = cifar_resnet(
        DEPTH,
        num_classes=NUM_CLASSES,
        num_losses=NUM_LOSSES,
        input_shape=INPUT_SHAPE,
        method=method,
        weighting=weighting,
        weight_decay=weight_decay,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(
            LEARNING_RATE, momentum=MOMENTUM, nesterov=True
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def torch_layer(net, name):
    """The module of `authors_loop.ResNetWithHeads` for a Keras layer name."""
    if name == "stem_conv":
        return net.stem[0]
    if name == "stem_bn":
        return net.stem[1]
    if name == "final_dense":
        return net.heads[-1].fc
    match = re.fullmatch(r"block_(\d+)_(conv1|bn1|conv2|bn2|shortcut_conv|"
                         r"shortcut_bn)", name)
    if match:
        block = net.blocks[int(match.group(1)) - 1]
        part = match.group(2)
        if part.startswith("shortcut"):
            return block.shortcut[0 if part.endswith("conv") else 1]
        return getattr(block, part)
    match = re.fullmatch(r"head_(\d+)_(bn|dense)", name)
    if match:
        head = net.heads[int(match.group(1))]
        return head.bn if match.group(2) == "bn" else head.fc
    raise AssertionError(f"no PyTorch module for Keras layer {name!r}")


def to_keras_layout(tensor, kind):
    value = tensor.detach().cpu().numpy()
    if kind == "conv":  # (cout, cin, kh, kw) -> (kh, kw, cin, cout)
        return value.transpose(2, 3, 1, 0)
    if kind == "dense":  # (out, in) -> (in, out)
        return value.T
    return value


def variable_pairs(model, net):
    """`(name, keras variable, torch tensor, kind, n)` for every Keras
    variable of the network; `n` is a BatchNorm's batch x height x width."""
    pairs = []
    for layer in model.layers:
        if not layer.weights or not re.match(r"(stem|block|head|final)_",
                                             layer.name):
            continue
        module = torch_layer(net, layer.name)
        if isinstance(layer, keras.layers.Conv2D):
            assert tuple(module.stride) == tuple(layer.strides)
            pairs.append((layer.name, layer.kernel, module.weight, "conv", 0))
        elif isinstance(layer, keras.layers.Dense):
            pairs.append((layer.name, layer.kernel, module.weight, "dense", 0))
            pairs.append((layer.name, layer.bias, module.bias, "", 0))
        elif isinstance(layer, keras.layers.BatchNormalization):
            assert layer.epsilon == module.eps == 1e-5
            assert layer.momentum == 1 - module.momentum == BN_MOMENTUM
            n = BATCH * int(np.prod(layer.input.shape[1:3]))
            pairs += [
                (layer.name, layer.gamma, module.weight, "", 0),
                (layer.name, layer.beta, module.bias, "", 0),
                (layer.name, layer.moving_mean, module.running_mean, "", 0),
                (layer.name, layer.moving_variance, module.running_var,
                 "variance", n),
            ]
        else:
            raise AssertionError(f"unexpected weighted layer {layer.name}")
    return pairs


def set_initial_weights(pairs, seed):
    """Draws every variable from NumPy (the same on every backend): He-normal
    convolutions, Glorot-uniform dense kernels, random biases and BatchNorm
    scales, offsets and moving statistics. Keras's own initializers draw
    differently on each backend."""
    rng = np.random.default_rng(seed)
    for _, variable, _, kind, _ in pairs:
        shape = tuple(variable.shape)
        name = variable.path.rsplit("/", 1)[-1]
        if kind == "conv":
            fan_in = int(np.prod(shape[:-1]))
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        elif kind == "dense":
            limit = np.sqrt(6.0 / sum(shape))
            value = rng.uniform(-limit, limit, shape)
        elif name in ("gamma", "moving_variance"):
            value = rng.uniform(0.5, 1.5, shape)
        else:  # Dense bias, BatchNorm beta and moving mean.
            value = rng.normal(0.0, 0.1, shape)
        variable.assign(value.astype("float32"))


def copy_into_torch(pairs):
    with torch.no_grad():
        for _, variable, tensor, kind, _ in pairs:
            value = np.asarray(keras.ops.convert_to_numpy(variable.value))
            if kind == "conv":
                value = value.transpose(3, 2, 0, 1)
            elif kind == "dense":
                value = value.T
            assert value.shape == tuple(tensor.shape), variable.path
            tensor.copy_(torch.from_numpy(np.ascontiguousarray(value)))


class ReluMargin(torch.overrides.TorchFunctionMode):
    """Records the smallest |input| of any ReLU the reference computes."""

    def __init__(self):
        super().__init__()
        self.margin = float("inf")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.nn.functional.relu, torch.relu):
            smallest = float(args[0].detach().abs().min())
            self.margin = min(self.margin, smallest)
        return func(*args, **(kwargs or {}))


def check_architecture(model, net):
    """Same taps, same parameters: every trainable tensor is paired."""
    taps = authors_loop_taps()
    for index, block in enumerate(taps):
        source = model.get_layer(f"head_{index}_bn").input
        assert source._keras_history[0].name == f"block_{block}_out"
    final = model.get_layer("final_pool").input
    assert final._keras_history[0].name == f"block_{3 * BLOCKS_PER_STAGE}_out"
    assert model.output_names == [f"head_{i}" for i in range(len(taps))] + [
        "final"
    ]
    torch_count = sum(p.numel() for p in net.parameters())
    keras_count = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert torch_count == keras_count


def authors_loop_taps():
    from keras_mwbp.models.taps import official_taps

    return official_taps(3 * BLOCKS_PER_STAGE, NUM_LOSSES)


def batches():
    rng = np.random.default_rng(DATA_SEED)
    return [
        (
            rng.normal(size=(BATCH,) + INPUT_SHAPE).astype("float32"),
            rng.integers(0, NUM_CLASSES, size=BATCH).astype("int32"),
        )
        for _ in range(STEPS)
    ]


def weights_of(pairs, source):
    """`{name/index: value}` in Keras layout, from Keras or from torch."""
    values = {}
    for index, (name, variable, tensor, kind, _) in enumerate(pairs):
        if source == "keras":
            value = np.asarray(keras.ops.convert_to_numpy(variable.value))
        else:
            value = to_keras_layout(tensor, kind)
        values[f"{name}/{index}"] = value.astype("float32")
    return values


_RUNS = {}


def run(method, weighting="paper", weight_decay=0.0):
    """Trains both implementations 3 steps; returns the `(keras, torch,
    initial)` weights (Keras layout; torch's running variances converted to
    Keras's convention) and the reference's smallest |ReLU input|."""
    key = (method, weighting, weight_decay)
    if key in _RUNS:  # Each option trains once per test process.
        return _RUNS[key]
    model = keras_model(method, weighting, weight_decay)
    torch.manual_seed(0)
    net = authors_loop.ResNetWithHeads(
        BLOCKS_PER_STAGE, authors_loop_taps(), num_classes=NUM_CLASSES,
        keras_padding=True,
    ).train()
    check_architecture(model, net)
    pairs = variable_pairs(model, net)
    set_initial_weights(pairs, WEIGHT_SEED)
    copy_into_torch(pairs)
    initial = weights_of(pairs, "keras")
    np.testing.assert_array_equal(
        np.concatenate([v.ravel() for v in weights_of(pairs, "torch").values()]),
        np.concatenate([v.ravel() for v in initial.values()]),
    )
    gammas = list(model.head_weights)
    assert len(gammas) == NUM_LOSSES and gammas[-1] == 1.0
    step = authors_loop.training_step(
        method, net, gammas, LEARNING_RATE, MOMENTUM,
        relay_span=model.relay_span, weighting=weighting,
        weight_decay=weight_decay,
    )
    relu = ReluMargin()
    for x, y in batches():
        model.train_on_batch(x, y)
        with relu:
            step(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(),
                 torch.from_numpy(y).long())
    trained_keras = weights_of(pairs, "keras")
    trained_torch = weights_of(pairs, "torch")
    decay = BN_MOMENTUM ** STEPS
    for index, (name, _, _, kind, n) in enumerate(pairs):
        if kind == "variance":
            entry = f"{name}/{index}"
            start = initial[entry]
            trained_torch[entry] = (
                decay * start + (trained_torch[entry] - decay * start)
                * (n - 1) / n
            )
    _RUNS[key] = trained_keras, trained_torch, initial, relu.margin
    return _RUNS[key]


def differences(actual, expected):
    """The largest absolute difference, the largest relative one (entries
    above 1e-3 in size) and the largest share of the tolerance
    `ATOL + RTOL * |expected|` used."""
    absolute = relative = share = 0.0
    for key, value in expected.items():
        error = np.abs(actual[key] - value)
        absolute = max(absolute, float(error.max()))
        large = np.abs(value) > 1e-3
        if large.any():
            relative = max(relative,
                           float((error[large] / np.abs(value[large])).max()))
        share = max(share, float((error / (ATOL + RTOL * np.abs(value))).max()))
    return absolute, relative, share


# The authors' weighting and coupled weight decay (large enough to move every
# weight far beyond the tolerance in 3 steps): the per-loss methods against
# the authors' per-loss optimizers (trunk rate lr / sum_{j>=i} gamma_j), the
# one-update methods against torch.optim.SGD(weight_decay=...). (The decay of
# every method under both weightings is checked against the NumPy reference
# in test_methods_reference.py.)
OPTIONS = [(m, "paper", 0.0) for m in METHODS] + [
    ("mwbp", "reference_code", 0.05),
    ("naive_reverse_mwbp", "reference_code", 0.05),
    ("joint", "reference_code", 0.05),
    ("relay", "paper", 0.05),
]


@pytest.mark.parametrize(
    "method, weighting, weight_decay", OPTIONS,
    ids=[m if not d else f"{m}-{w}-decay" for m, w, d in OPTIONS],
)
def test_keras_mwbp_equals_the_authors_loop(method, weighting, weight_decay):
    trained_keras, trained_torch, initial, margin = run(
        method, weighting, weight_decay
    )
    # Well-conditioned data: no ReLU input of the reference lies so near 0
    # that float32 round-off could put it on the other side in Keras.
    assert margin > RELU_MARGIN, (
        f"{method}: a ReLU input of the reference lies {margin:.1e} from 0 "
        "(ill-conditioned data: choose other seeds)"
    )
    for key, expected in trained_torch.items():
        np.testing.assert_allclose(
            trained_keras[key], expected, rtol=RTOL, atol=ATOL,
            err_msg=f"{method}: {key}",
        )
    # The comparison is meaningful: the weights moved far beyond the
    # tolerance (standard BP leaves the auxiliary heads' weights alone).
    moved = [
        key for key in initial
        if np.max(np.abs(trained_keras[key] - initial[key])) > MIN_CHANGE
    ]
    still = set(initial) - set(moved)
    if method == "standard":
        assert all(k.startswith("head_") for k in still), sorted(still)
    else:
        assert not still, sorted(still)
    absolute, relative, share = differences(trained_keras, trained_torch)
    print(f"{method}: max abs difference {absolute:.1e}, max relative "
          f"{relative:.1e}, {share:.0%} of the tolerance")


@pytest.mark.parametrize(
    "other", [(m, "paper", 0.0) for m in METHODS if m != "mwbp"]
    + [o for o in OPTIONS if o[2]],
    ids=lambda o: "-".join(map(str, o)),
)
def test_methods_differ_beyond_the_tolerance(other):
    """mwbp's result differs from every other method's and option's, so a
    method or option mixed up with another would fail the comparison
    above."""
    mwbp = run("mwbp")[0]
    result = run(*other)[0]
    difference = max(
        float(np.max(np.abs(mwbp[k] - result[k]))) for k in mwbp
    )
    assert difference > MIN_CHANGE, (other, difference)
