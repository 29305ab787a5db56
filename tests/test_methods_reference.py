"""Every training method of ``keras_mwbp`` against the NumPy reference.

The seven methods ("standard", "joint", "relay", "mwbp", "reverse_mwbp",
"naive_mwbp", "naive_reverse_mwbp"), Relay BP's span and the authors'
"reference_code" loss weighting: ``MultiWayModel`` is trained for three steps
(SGD momentum 0.9, float64) on the MLP and the residual conv net of
``reference_numpy`` and every weight and BatchNorm moving statistic is
compared with the reference. Then the definitions are checked to matter:
the order of the losses, the shared forward pass and the weighting change the
result, and Relay BP with a span covering every segment is Joint BP.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import reference_numpy as ref  # noqa: E402
from _reference_harness import GAMMAS  # noqa: E402
from _reference_harness import KERAS_IDENTITY_TOLERANCE  # noqa: E402
from _reference_harness import LEARNING_RATE  # noqa: E402
from _reference_harness import MIN_MWBP_EFFECT  # noqa: E402
from _reference_harness import NETWORKS  # noqa: E402
from _reference_harness import assert_nested_close  # noqa: E402
from _reference_harness import float64_dtype  # noqa: E402
from _reference_harness import initial_bn_state  # noqa: E402
from _reference_harness import max_relative_difference  # noqa: E402
from _reference_harness import multiway_run  # noqa: E402
from _reference_harness import random_batches  # noqa: E402
from _reference_harness import random_params  # noqa: E402
from _reference_harness import reference_run  # noqa: E402
from keras_mwbp.constants import METHODS  # noqa: E402

pytestmark = [
    pytest.mark.backends("tensorflow", "jax", "torch"),
    pytest.mark.oldest_keras(),
]

NETWORK_NAMES = ("mlp", "convnet")
# On both 3-loss networks a span of 2 lets every loss reach every segment.
COVERING_SPAN = 2
# Coupled weight decay of the decay tests: large enough that 3 steps move the
# weights far beyond the comparison's tolerance.
WEIGHT_DECAY = 0.05

_SEGMENTS = {
    "mlp": ({"d1", "h0"}, {"d2", "h1"}, {"final"}),
    "convnet": (
        {"c1", "bn1", "c2", "bn2", "c3", "bn3", "h0"},
        {"c4", "bn4", "h1"},
        {"c5", "final"},
    ),
}


@pytest.fixture(scope="module")
def float64_keras():
    """Makes new Keras layers and inputs float64 for the module's tests."""
    with float64_dtype():
        yield


def _initial(network_name):
    """A random ``(params, bn_state)`` for the reference-only tests."""
    params = random_params(network_name, np.random.default_rng(20))
    return params, initial_bn_state(network_name)


def _dependencies(network_name):
    params, _ = _initial(network_name)
    x, labels = random_batches(network_name, seed=0)[0]
    return ref.loss_dependencies(NETWORKS[network_name], params, x, labels)


def _assert_identical(actual, expected):
    assert_nested_close(actual, expected, rtol=0.0, atol=0.0)


# --------------------------------------------------------------------------
# The reference's definitions
# --------------------------------------------------------------------------


@pytest.mark.parametrize("network_name", NETWORK_NAMES)
def test_reference_segments(network_name):
    """Segment s: the layers loss s is the first to depend on."""
    segments = ref.segments(_dependencies(network_name))
    assert tuple(segments) == _SEGMENTS[network_name]


def test_reference_relay_one_step_by_hand():
    """One relay step of plain SGD on the MLP, written out per segment:
    d1 (segment 0) gets losses 0..c, d2 (segment 1) losses 1..1+c, the heads
    their own loss only; every gradient at the initial parameters."""
    params, bn_state = _initial("mlp")
    batch = random_batches("mlp", seed=0)[:1]
    x, labels = batch[0]
    logits, tape, _ = ref.MLP.forward(params, x)
    grads = [
        ref.MLP.backward(params, tape, i, ref.cross_entropy_backward(z, labels))
        for i, z in enumerate(logits)
    ]
    reached_by = {
        0: {"d1": (0,), "d2": (1,)},
        1: {"d1": (0, 1), "d2": (1, 2)},
    }
    for span, trunk in reached_by.items():
        losses_of = dict(trunk, h0=(0,), h1=(1,), final=(2,))
        trained, _, _ = ref.train_steps(
            ref.MLP, params, bn_state, batch, "relay", GAMMAS, LEARNING_RATE,
            0.0, relay_span=span,
        )
        for layer, losses in losses_of.items():
            for weight in ("kernel", "bias"):
                step = sum(GAMMAS[i] * grads[i][layer][weight] for i in losses)
                np.testing.assert_allclose(
                    trained[layer][weight],
                    params[layer][weight] - LEARNING_RATE * step,
                    rtol=1e-12,
                    atol=1e-14,
                    err_msg=f"span {span}: {layer}/{weight}",
                )


@pytest.mark.parametrize("network_name", NETWORK_NAMES)
def test_reference_code_weighting_scales(network_name):
    """1 on an auxiliary head's own layers, gamma_i / sum_{j=i}^{K-1} gamma_j
    on its trunk, 1 for the final loss."""
    dependencies = _dependencies(network_name)
    scales = ref.loss_scales(dependencies, GAMMAS, "reference_code")
    heads = ("h0", "h1")
    trunk_factors = (GAMMAS[0] / (GAMMAS[0] + GAMMAS[1]), 1.0)
    for index, head in enumerate(heads):
        assert set(scales[index]) == dependencies[index]
        for layer, factor in scales[index].items():
            expected = 1.0 if layer == head else trunk_factors[index]
            assert factor == pytest.approx(expected, rel=1e-15), layer
    assert scales[2] == {layer: 1.0 for layer in dependencies[2]}
    paper = ref.loss_scales(dependencies, GAMMAS, "paper")
    for index, layers in enumerate(dependencies):
        assert paper[index] == {layer: GAMMAS[index] for layer in layers}


def test_reference_rejects_weighting_of_standard_bp():
    params, bn_state = _initial("mlp")
    with pytest.raises(ValueError, match="weighting"):
        ref.train_steps(
            ref.MLP, params, bn_state, random_batches("mlp", 0), "standard",
            GAMMAS, LEARNING_RATE, 0.9, weighting="reference_code",
        )


@pytest.mark.parametrize("network_name", NETWORK_NAMES)
def test_reference_joint_with_reference_code_weighting_by_hand(network_name):
    """One SGD step (no momentum) of Joint BP under the authors' weighting:
    each head's own layers move by the head's plain gradient, the trunk by
    sum_i (gamma_i / sum_{j=i}^{K-1} gamma_j) grad_i + grad_final."""
    network = NETWORKS[network_name]
    params, bn_state = _initial(network_name)
    x, labels = random_batches(network_name, 0)[0]
    logits, tape, _ = network.forward(params, x)
    grads = [network.backward(params, tape, i,
                              ref.cross_entropy_backward(z, labels))
             for i, z in enumerate(logits)]
    trunk = _dependencies(network_name)[-1]
    factors = (GAMMAS[0] / (GAMMAS[0] + GAMMAS[1]), 1.0, 1.0)
    trained, _, _ = ref.train_steps(
        network, params, bn_state, [(x, labels)], "joint", GAMMAS,
        LEARNING_RATE, 0.0, weighting="reference_code")
    for layer, weights in params.items():
        for weight, value in weights.items():
            step = sum(
                (factors[i] if layer in trunk else 1.0) * g[layer][weight]
                for i, g in enumerate(grads) if layer in g
            )
            np.testing.assert_allclose(
                trained[layer][weight], value - LEARNING_RATE * step,
                rtol=1e-12, atol=1e-14, err_msg=f"{layer}/{weight}")


@pytest.mark.parametrize("network_name", NETWORK_NAMES)
def test_reference_weight_decay_scales(network_name):
    """Coupled weight decay of loss i: 1 everywhere under "paper"; under
    "reference_code" 1 / sum_{j=i}^{K-1} gamma_j on an auxiliary loss's
    trunk (the authors divide the trunk's rate), 1 on its head's own layers
    and for the final loss."""
    dependencies = _dependencies(network_name)
    decays = ref.decay_scales(dependencies, GAMMAS, "reference_code")
    trunk_factors = (1.0 / (GAMMAS[0] + GAMMAS[1]), 1.0 / GAMMAS[1])
    for index, head in enumerate(("h0", "h1")):
        assert set(decays[index]) == dependencies[index]
        for layer, factor in decays[index].items():
            expected = 1.0 if layer == head else trunk_factors[index]
            assert factor == pytest.approx(expected, rel=1e-15), layer
    assert decays[2] == {layer: 1.0 for layer in dependencies[2]}
    paper = ref.decay_scales(dependencies, GAMMAS, "paper")
    assert paper == [{layer: 1.0 for layer in d} for d in dependencies]


@pytest.mark.parametrize("method", ["standard", "joint", "relay"])
def test_reference_weight_decay_of_one_update_by_hand(method):
    """One SGD step (no momentum) of the one-update methods with coupled
    weight decay: w - lr * (gradient of the method + wd * w) on every layer
    the update touches (standard BP: the final loss's layers only)."""
    network = NETWORKS["convnet"]
    params, bn_state = _initial("convnet")
    batch = random_batches("convnet", 0)[:1]
    plain, _, _ = ref.train_steps(network, params, bn_state, batch, method,
                                  GAMMAS, LEARNING_RATE, 0.0)
    decayed, _, _ = ref.train_steps(network, params, bn_state, batch, method,
                                    GAMMAS, LEARNING_RATE, 0.0,
                                    weight_decay=WEIGHT_DECAY)
    touched = _dependencies("convnet")[-1] if method == "standard" else params
    for layer, weights in params.items():
        for weight, value in weights.items():
            expected = plain[layer][weight]
            if layer in touched:
                expected = expected - LEARNING_RATE * WEIGHT_DECAY * value
            np.testing.assert_allclose(
                decayed[layer][weight], expected, rtol=1e-12, atol=1e-14,
                err_msg=f"{method}: {layer}/{weight}")


def _reference_params(network_name, method, **options):
    params, _, _ = ref.train_steps(
        NETWORKS[network_name], *_initial(network_name),
        random_batches(network_name, seed=0), method, GAMMAS, LEARNING_RATE,
        0.9, **options,
    )
    return params


@pytest.mark.parametrize("network_name", NETWORK_NAMES)
def test_reference_relay_covering_all_segments_is_joint(network_name):
    joint = _reference_params(network_name, "joint")
    for span in (COVERING_SPAN, 5):
        _assert_identical(
            _reference_params(network_name, "relay", relay_span=span), joint
        )
    narrow = _reference_params(network_name, "relay", relay_span=0)
    assert max_relative_difference(narrow, joint) > MIN_MWBP_EFFECT


@pytest.mark.parametrize(
    "method, other",
    [
        ("mwbp", "reverse_mwbp"),
        ("mwbp", "naive_mwbp"),
        ("reverse_mwbp", "naive_reverse_mwbp"),
        ("naive_mwbp", "naive_reverse_mwbp"),
    ],
)
@pytest.mark.parametrize("network_name", NETWORK_NAMES)
def test_reference_order_and_shared_forward_matter(network_name, method, other):
    assert (
        max_relative_difference(
            _reference_params(network_name, method),
            _reference_params(network_name, other),
        )
        > MIN_MWBP_EFFECT
    )


# --------------------------------------------------------------------------
# keras_mwbp against the reference
# --------------------------------------------------------------------------


def _check_against_reference(network_name, method, **options):
    initial, (actual_params, actual_bn) = multiway_run(
        network_name, method, **options
    )
    expected_params, expected_bn = reference_run(
        network_name, initial, method, **options
    )
    assert_nested_close(actual_params, expected_params)
    assert_nested_close(actual_bn, expected_bn)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("network_name", NETWORK_NAMES)
def test_method_matches_reference(float64_keras, network_name, method):
    import keras_mwbp

    assert method in keras_mwbp.METHODS
    _check_against_reference(network_name, method)


@pytest.mark.parametrize("relay_span", [0, 1, COVERING_SPAN])
@pytest.mark.parametrize("network_name", NETWORK_NAMES)
def test_relay_span_matches_reference(float64_keras, network_name, relay_span):
    _check_against_reference(network_name, "relay", relay_span=relay_span)


@pytest.mark.parametrize(
    "method", ["mwbp", "reverse_mwbp", "naive_mwbp", "naive_reverse_mwbp",
               "joint", "relay"]
)
@pytest.mark.parametrize("network_name", NETWORK_NAMES)
def test_reference_code_weighting_matches_reference(
    float64_keras, network_name, method
):
    _check_against_reference(network_name, method, weighting="reference_code")


# Every code path of the update under each weighting: the one update
# (standard, joint), the summed per-loss gradients (relay; joint under
# "reference_code"), the re-linearized per-loss updates (mwbp) and those from
# a new forward pass (naive), in both orders.
DECAY_CASES = [
    ("standard", "paper"), ("joint", "paper"), ("relay", "paper"),
    ("mwbp", "paper"), ("naive_mwbp", "paper"),
    ("joint", "reference_code"), ("relay", "reference_code"),
    ("mwbp", "reference_code"), ("naive_reverse_mwbp", "reference_code"),
    ("reverse_mwbp", "reference_code"),
]


@pytest.mark.parametrize(
    "method, weighting", DECAY_CASES, ids=[f"{m}-{w}" for m, w in DECAY_CASES]
)
def test_weight_decay_matches_reference(float64_keras, method, weighting):
    """Coupled weight decay in every update (each per-loss update, the one
    update of the others), under both weightings, on the conv net with
    BatchNorm and a residual connection."""
    _check_against_reference(
        "convnet", method, weighting=weighting, weight_decay=WEIGHT_DECAY
    )


@pytest.mark.parametrize("network_name", NETWORK_NAMES)
def test_keras_relay_covering_all_segments_is_joint(float64_keras, network_name):
    initial, (relay_params, relay_bn) = multiway_run(
        network_name, "relay", relay_span=COVERING_SPAN
    )
    joint_initial, (joint_params, joint_bn) = multiway_run(network_name, "joint")
    _assert_identical(initial[0], joint_initial[0])
    assert_nested_close(relay_params, joint_params, **KERAS_IDENTITY_TOLERANCE)
    assert_nested_close(relay_bn, joint_bn, **KERAS_IDENTITY_TOLERANCE)
    expected_params, _ = reference_run(network_name, initial, "joint")
    assert_nested_close(relay_params, expected_params)


@pytest.mark.parametrize(
    "run_a, run_b",
    [
        (("mwbp", {}), ("reverse_mwbp", {})),
        (("mwbp", {}), ("naive_mwbp", {})),
        (("reverse_mwbp", {}), ("naive_reverse_mwbp", {})),
        (("relay", {"relay_span": 0}), ("joint", {})),
        (("mwbp", {}), ("mwbp", {"weighting": "reference_code"})),
        (("joint", {}), ("joint", {"weighting": "reference_code"})),
        (("relay", {}), ("relay", {"weighting": "reference_code"})),
        (("joint", {"weighting": "reference_code"}),
         ("mwbp", {"weighting": "reference_code"})),
        (("mwbp", {}), ("mwbp", {"weight_decay": WEIGHT_DECAY})),
        (("mwbp", {"weight_decay": WEIGHT_DECAY}),
         ("mwbp", {"weight_decay": WEIGHT_DECAY,
                   "weighting": "reference_code"})),
    ],
    ids=["order", "naive", "naive-reverse", "relay-span0", "weighting",
         "joint-weighting", "relay-weighting", "joint-mwbp-weighting",
         "decay", "decay-weighting"],
)
@pytest.mark.parametrize("network_name", NETWORK_NAMES)
def test_keras_shows_the_reference_differences(
    float64_keras, network_name, run_a, run_b
):
    """The methods differ measurably, in the reference and in keras_mwbp
    alike (all Keras runs start from the same initial weights)."""
    (method_a, options_a), (method_b, options_b) = run_a, run_b
    initial, (keras_a, _) = multiway_run(network_name, method_a, **options_a)
    initial_b, (keras_b, _) = multiway_run(network_name, method_b, **options_b)
    _assert_identical(initial[0], initial_b[0])
    reference_a, _ = reference_run(network_name, initial, method_a, **options_a)
    reference_b, _ = reference_run(network_name, initial, method_b, **options_b)
    assert max_relative_difference(reference_a, reference_b) > MIN_MWBP_EFFECT
    assert max_relative_difference(keras_a, keras_b) > MIN_MWBP_EFFECT
