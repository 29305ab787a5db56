"""Numeric equality of ``keras_mwbp`` training with a NumPy reference.

The reference (``reference_numpy.py``) is proven first: every hand-written
backward pass against central finite differences, and its forward passes,
optimizer and joint/standard training against plain Keras. Then
``keras_mwbp.MultiWayModel`` is trained for three steps with each method and
every trainable weight and BatchNormalization moving statistic is compared
with the reference, in float64.
"""

import collections
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import reference_numpy as ref  # noqa: E402
from _reference_harness import GAMMAS  # noqa: E402
from _reference_harness import GRAPHS  # noqa: E402
from _reference_harness import INPUT_SHAPES  # noqa: E402
from _reference_harness import KERAS_FLOAT64_EXACT  # noqa: E402
from _reference_harness import KERAS_MOMENTUM  # noqa: E402
from _reference_harness import LEARNING_RATE  # noqa: E402
from _reference_harness import MIN_MWBP_EFFECT  # noqa: E402
from _reference_harness import MOMENTUM  # noqa: E402
from _reference_harness import NETWORKS  # noqa: E402
from _reference_harness import NUM_CLASSES  # noqa: E402
from _reference_harness import assert_nested_close  # noqa: E402
from _reference_harness import convnet_graph  # noqa: E402
from _reference_harness import copy_weights  # noqa: E402
from _reference_harness import float64_dtype  # noqa: E402
from _reference_harness import initial_bn_state  # noqa: E402
from _reference_harness import keras_state  # noqa: E402
from _reference_harness import max_relative_difference  # noqa: E402
from _reference_harness import multiway_model  # noqa: E402
from _reference_harness import multiway_run  # noqa: E402
from _reference_harness import random_batches  # noqa: E402
from _reference_harness import random_params  # noqa: E402
from _reference_harness import reference_run  # noqa: E402
from _reference_harness import sgd  # noqa: E402
from _reference_harness import sparse_ce  # noqa: E402
from _reference_harness import to_numpy  # noqa: E402
from conftest import tensorflow_only  # noqa: E402

pytestmark = [
    pytest.mark.backends("tensorflow", "jax", "torch"),
    pytest.mark.oldest_keras(),
]


# --------------------------------------------------------------------------
# The NumPy reference alone: finite differences and identities
# --------------------------------------------------------------------------


def _numeric_gradient(function, array, step=1e-6):
    """Central finite differences of scalar ``function()`` w.r.t. ``array``.

    ``array`` is perturbed in place, one entry at a time, and restored.
    """
    grad = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        original = array[index]
        array[index] = original + step
        upper = function()
        array[index] = original - step
        lower = function()
        array[index] = original
        grad[index] = (upper - lower) / (2.0 * step)
    return grad


def _assert_layer_backward(forward, backward, arrays, seed=0):
    """Checks a layer's backward pass against finite differences.

    Args:
        forward: ``forward(arrays) -> output``.
        backward: ``backward(arrays, grad_out) -> {name: gradient}`` with one
            gradient per entry of ``arrays``.
        arrays: Named float64 inputs and parameters of the layer.
        seed: Seed of the random upstream gradient.
    """
    grad_out = np.random.default_rng(seed).normal(size=forward(arrays).shape)
    analytic = backward(arrays, grad_out)
    assert set(analytic) == set(arrays)
    for name, array in arrays.items():
        numeric = _numeric_gradient(
            lambda: np.sum(forward(arrays) * grad_out), array
        )
        np.testing.assert_allclose(
            analytic[name], numeric, rtol=1e-6, atol=1e-8, err_msg=name
        )


def test_dense_backward_matches_finite_differences():
    rng = np.random.default_rng(1)
    arrays = {
        "x": rng.normal(size=(4, 5)),
        "kernel": rng.normal(size=(5, 3)),
        "bias": rng.normal(size=3),
    }

    def forward(a):
        return ref.dense_forward(a["x"], a["kernel"], a["bias"])

    def backward(a, grad_out):
        grad_x, grads = ref.dense_backward(a["x"], a["kernel"], grad_out)
        return {"x": grad_x, **grads}

    _assert_layer_backward(forward, backward, arrays)


def test_relu_backward_matches_finite_differences():
    arrays = {"x": np.random.default_rng(2).normal(size=(4, 6))}
    _assert_layer_backward(
        lambda a: ref.relu_forward(a["x"]),
        lambda a, grad_out: {"x": ref.relu_backward(a["x"], grad_out)},
        arrays,
    )


def test_conv2d_backward_matches_finite_differences():
    rng = np.random.default_rng(3)
    arrays = {
        "x": rng.normal(size=(2, 4, 5, 2)),
        "kernel": rng.normal(size=(3, 3, 2, 3)),
        "bias": rng.normal(size=3),
    }

    def forward(a):
        return ref.conv2d_forward(a["x"], a["kernel"], a["bias"])

    def backward(a, grad_out):
        grad_x, grads = ref.conv2d_backward(a["x"], a["kernel"], grad_out)
        return {"x": grad_x, **grads}

    _assert_layer_backward(forward, backward, arrays)


def test_batch_norm_backward_matches_finite_differences():
    rng = np.random.default_rng(4)
    arrays = {
        "x": rng.normal(loc=0.5, scale=2.0, size=(3, 2, 2, 3)),
        "gamma": rng.normal(size=3),
        "beta": rng.normal(size=3),
    }

    def forward(a):
        return ref.batch_norm_forward(a["x"], a["gamma"], a["beta"])[0]

    def backward(a, grad_out):
        grad_x, grads = ref.batch_norm_backward(a["x"], a["gamma"], grad_out)
        return {"x": grad_x, **grads}

    _assert_layer_backward(forward, backward, arrays)


def test_add_backward_matches_finite_differences():
    rng = np.random.default_rng(5)
    arrays = {"a": rng.normal(size=(2, 3)), "b": rng.normal(size=(2, 3))}

    def backward(a, grad_out):
        grad_a, grad_b = ref.add_backward(grad_out)
        return {"a": grad_a, "b": grad_b}

    _assert_layer_backward(
        lambda a: ref.add_forward(a["a"], a["b"]), backward, arrays
    )


def test_global_average_pool_backward_matches_finite_differences():
    arrays = {"x": np.random.default_rng(6).normal(size=(2, 3, 4, 3))}
    _assert_layer_backward(
        lambda a: ref.global_average_pool_forward(a["x"]),
        lambda a, grad_out: {
            "x": ref.global_average_pool_backward(a["x"], grad_out)
        },
        arrays,
    )


def test_cross_entropy_backward_matches_finite_differences():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(5, 4))
    labels = rng.integers(0, 4, size=5)
    numeric = _numeric_gradient(
        lambda: ref.cross_entropy_loss(logits, labels), logits
    )
    np.testing.assert_allclose(
        ref.cross_entropy_backward(logits, labels), numeric, rtol=1e-6, atol=1e-9
    )


_LOSS_DEPENDENCIES = {
    "mlp": (
        {"d1", "h0"},
        {"d1", "d2", "h1"},
        {"d1", "d2", "final"},
    ),
    "convnet": (
        {"c1", "bn1", "c2", "bn2", "c3", "bn3", "h0"},
        {"c1", "bn1", "c2", "bn2", "c3", "bn3", "c4", "bn4", "h1"},
        {"c1", "bn1", "c2", "bn2", "c3", "bn3", "c4", "bn4", "c5", "final"},
    ),
}


@pytest.mark.parametrize("loss_index", [0, 1, 2])
@pytest.mark.parametrize("network_name", ["mlp", "convnet"])
def test_network_backward_matches_finite_differences(network_name, loss_index):
    """Each loss's gradient w.r.t. EVERY parameter; zero where not returned."""
    network = NETWORKS[network_name]
    rng = np.random.default_rng(8)
    params = random_params(network_name, rng)
    x = rng.normal(size=(4,) + INPUT_SHAPES[network_name])
    labels = rng.integers(0, NUM_CLASSES[network_name], size=4)

    def loss():
        logits = network.forward(params, x)[0][loss_index]
        return ref.cross_entropy_loss(logits, labels)

    logits, tape, _ = network.forward(params, x)
    grad_logits = ref.cross_entropy_backward(logits[loss_index], labels)
    grads = network.backward(params, tape, loss_index, grad_logits)

    assert set(grads) == _LOSS_DEPENDENCIES[network_name][loss_index]
    for layer, weights in params.items():
        for weight, array in weights.items():
            expected = _numeric_gradient(loss, array)
            actual = grads.get(layer, {}).get(weight, np.zeros_like(array))
            np.testing.assert_allclose(
                actual, expected, rtol=1e-5, atol=1e-8, err_msg=f"{layer}/{weight}"
            )


def test_backward_uses_stored_features_and_current_params():
    """Backward at new params with an old tape re-linearises the trunk.

    For the MLP's final loss, d1's kernel gradient is
    ``x^T [relu1' * ((relu2' * (g W_final^T)) W_d2^T)]`` with the relu masks
    and ``x`` from the tape and ``W_d2`` the CURRENT d2 kernel.
    """
    rng = np.random.default_rng(9)
    params = random_params("mlp", rng)
    x = rng.normal(size=(4, 5))
    labels = rng.integers(0, 3, size=4)
    logits, tape, _ = ref.MLP.forward(params, x)
    grad_logits = ref.cross_entropy_backward(logits[2], labels)
    params["d2"]["kernel"] = rng.normal(size=(6, 6))
    params["d1"]["kernel"] = rng.normal(size=(5, 6))

    grads = ref.MLP.backward(params, tape, 2, grad_logits)

    grad_a2 = grad_logits @ params["final"]["kernel"].T
    grad_pre2 = grad_a2 * (tape["relu2"] > 0)
    grad_pre1 = (grad_pre2 @ params["d2"]["kernel"].T) * (tape["relu1"] > 0)
    np.testing.assert_allclose(grads["d1"]["kernel"], x.T @ grad_pre1, rtol=1e-12)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("network_name", ["mlp", "convnet"])
def test_persistent_tape_equals_joint_for_sgd_momentum(network_name, nesterov):
    """SGD momentum is linear in the gradient, so per-loss velocity buffers
    fed with gradients at the OLD parameters sum to the joint velocity: the
    "persistent tape" variant is indistinguishable from joint training."""
    args = (
        NETWORKS[network_name],
        random_params(network_name, np.random.default_rng(10)),
        initial_bn_state(network_name),
        random_batches(network_name, seed=11),
    )
    hyper = (GAMMAS, LEARNING_RATE, MOMENTUM, nesterov)
    tape_params, tape_bn, _ = ref.train_steps(*args, "persistent_tape", *hyper)
    joint_params, joint_bn, _ = ref.train_steps(*args, "joint", *hyper)
    assert_nested_close(tape_params, joint_params, rtol=1e-12, atol=1e-14)
    assert_nested_close(tape_bn, joint_bn, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------
# The reference against plain Keras (layers, SGD, joint training)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def float64_keras():
    """Makes new Keras layers and inputs float64 for the module's tests."""
    with float64_dtype():
        yield


# Known (torch): Keras's torch `ops.matmul` casts its result to
# `result_type(float64, float64)`, which Keras maps to float32 on every
# backend but TensorFlow, so a float64 Dense is float32-exact there (the
# convolution, BatchNorm and pooling checks above it pass). With the cast
# patched out, the sparse cross-entropy check after it is float32-exact
# too (cause not traced). Strict: the test fails once Keras keeps these in
# float64 on torch.
@pytest.mark.xfail(
    keras.backend.backend() == "torch", strict=True, raises=AssertionError,
    reason="Keras's torch matmul (and sparse cross-entropy) round float64 "
    "to float32")
def test_reference_layer_forwards_match_keras(float64_keras):
    rng = np.random.default_rng(12)
    images = rng.normal(size=(2, 4, 5, 2))

    conv = keras.layers.Conv2D(3, (3, 3), padding="same")
    conv.build(images.shape)
    conv.bias.assign(rng.normal(size=3))
    np.testing.assert_allclose(
        to_numpy(conv(images)),
        ref.conv2d_forward(images, to_numpy(conv.kernel), to_numpy(conv.bias)),
        rtol=1e-12,
        atol=1e-12,
    )

    bn = keras.layers.BatchNormalization()
    bn.build(images.shape)
    bn.gamma.assign(rng.uniform(0.5, 1.5, size=2))
    bn.beta.assign(rng.normal(size=2))
    state = {"moving_mean": np.zeros(2), "moving_variance": np.ones(2)}
    expected, moments = ref.batch_norm_forward(
        images, to_numpy(bn.gamma), to_numpy(bn.beta)
    )
    ref.update_moving_statistics(state, moments)
    # Keras computes BatchNormalization (in result_type(dtype, "float32"))
    # and means in float32 for float64 layers on every backend but
    # TensorFlow (see KERAS_FLOAT64_EXACT): float32-exact there.
    if KERAS_FLOAT64_EXACT:
        bn_tolerance = {"rtol": 1e-10, "atol": 1e-12}
        stats_tolerance = {"rtol": 1e-12}
        pool_tolerance = {"rtol": 1e-7}
    else:
        assert keras.backend.backend() != "tensorflow"
        bn_tolerance = stats_tolerance = {"rtol": 1e-6, "atol": 1e-6}
        pool_tolerance = {"rtol": 1e-6, "atol": 1e-7}
    np.testing.assert_allclose(
        to_numpy(bn(images, training=True)), expected, **bn_tolerance
    )
    np.testing.assert_allclose(
        to_numpy(bn.moving_mean), state["moving_mean"], **stats_tolerance
    )
    np.testing.assert_allclose(
        to_numpy(bn.moving_variance), state["moving_variance"],
        **stats_tolerance
    )

    pooled = ref.global_average_pool_forward(images)
    np.testing.assert_allclose(
        to_numpy(keras.layers.GlobalAveragePooling2D()(images)), pooled,
        **pool_tolerance
    )

    dense = keras.layers.Dense(3)
    dense.build(pooled.shape)
    dense.bias.assign(rng.normal(size=3))
    logits = ref.dense_forward(pooled, to_numpy(dense.kernel), to_numpy(dense.bias))
    np.testing.assert_allclose(to_numpy(dense(pooled)), logits, rtol=1e-12)

    labels = np.array([2, 0])
    np.testing.assert_allclose(
        to_numpy(sparse_ce()(labels, logits)),
        ref.cross_entropy_loss(logits, labels),
        rtol=1e-12,
    )


@pytest.mark.parametrize("nesterov", [False, True])
def test_reference_sgd_matches_keras(float64_keras, nesterov):
    rng = np.random.default_rng(13)
    initial = rng.normal(size=(2, 3))
    gradients = [rng.normal(size=(2, 3)) for _ in range(3)]
    variable = keras.Variable(initial)
    optimizer = sgd(nesterov)
    reference = ref.SGDMomentum(LEARNING_RATE, KERAS_MOMENTUM, nesterov)
    params = {"layer": {"w": initial}}
    for gradient in gradients:
        optimizer.apply([keras.ops.convert_to_tensor(gradient)], [variable])
        reference.apply(params, {"layer": {"w": gradient}})
    np.testing.assert_allclose(
        to_numpy(variable), params["layer"]["w"], rtol=1e-14, atol=1e-15
    )


@pytest.mark.parametrize("network_name", ["mlp", "convnet"])
def test_reference_joint_matches_plain_keras(float64_keras, network_name):
    """A plain multi-output Keras model with ``loss_weights=GAMMAS`` is joint
    training; it validates the reference networks, BN statistics and SGD."""
    inputs, outputs = GRAPHS[network_name]()
    model = keras.Model(inputs, outputs)
    initial = keras_state(model)
    model.compile(optimizer=sgd(), loss=[sparse_ce()] * 3, loss_weights=list(GAMMAS))
    for x, labels in random_batches(network_name, seed=0):
        model.train_on_batch(x, [labels] * 3)

    expected_params, expected_bn = reference_run(network_name, initial, "joint")
    actual_params, actual_bn = keras_state(model)
    assert_nested_close(actual_params, expected_params)
    assert_nested_close(actual_bn, expected_bn)


# --------------------------------------------------------------------------
# keras_mwbp against the reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["mwbp", "joint", "standard"])
@pytest.mark.parametrize("network_name", ["mlp", "convnet"])
def test_multiway_model_matches_reference(float64_keras, network_name, method):
    initial, (actual_params, actual_bn) = multiway_run(network_name, method)
    expected_params, expected_bn = reference_run(network_name, initial, method)
    assert_nested_close(actual_params, expected_params)
    assert_nested_close(actual_bn, expected_bn)


@pytest.mark.parametrize("network_name", ["mlp", "convnet"])
def test_multiway_model_matches_reference_eagerly(float64_keras, network_name):
    """Eager execution runs the ops in program order, without graph rewrites.

    Together with the compiled-step test above it separates an error in the
    algorithm from an error in the ordering of variable reads and writes.
    """
    initial, (actual_params, actual_bn) = multiway_run(
        network_name, "mwbp", run_eagerly=True
    )
    expected_params, expected_bn = reference_run(network_name, initial, "mwbp")
    assert_nested_close(actual_params, expected_params)
    assert_nested_close(actual_bn, expected_bn)


@pytest.mark.parametrize("network_name", ["mlp", "convnet"])
def test_multiway_model_matches_reference_with_nesterov(
    float64_keras, network_name
):
    initial, (actual_params, actual_bn) = multiway_run(
        network_name, "mwbp", nesterov=True
    )
    expected_params, expected_bn = reference_run(
        network_name, initial, "mwbp", nesterov=True
    )
    assert_nested_close(actual_params, expected_params)
    assert_nested_close(actual_bn, expected_bn)


@pytest.mark.parametrize("wrong_method", ["joint", "persistent_tape"])
@pytest.mark.parametrize("network_name", ["mlp", "convnet"])
def test_mwbp_differs_from_gradients_at_old_params(
    float64_keras, network_name, wrong_method
):
    """MW-BP's re-linearisation changes the result measurably."""
    initial, (actual_params, _) = multiway_run(network_name, "mwbp")
    wrong_params, _ = reference_run(network_name, initial, wrong_method)
    assert max_relative_difference(actual_params, wrong_params) > MIN_MWBP_EFFECT


def test_single_head_standard_matches_plain_keras(float64_keras):
    import keras_mwbp  # Imported here so the NumPy-only tests run without it.

    inputs, outputs = convnet_graph()
    multiway = keras_mwbp.MultiWayModel(
        inputs=inputs, outputs=[outputs[-1]], method="standard", head_weights=[1.0]
    )
    inputs, outputs = convnet_graph()
    plain = keras.Model(inputs, outputs[-1])
    copy_weights(multiway, plain)
    for model in (multiway, plain):
        model.compile(optimizer=sgd(), loss=sparse_ce())
        for x, labels in random_batches("convnet", seed=0):
            model.train_on_batch(x, labels)

    multiway_params, multiway_bn = keras_state(multiway)
    plain_params, plain_bn = keras_state(plain)
    assert_nested_close(multiway_params, plain_params, rtol=1e-10, atol=1e-12)
    assert_nested_close(multiway_bn, plain_bn, rtol=1e-10, atol=1e-12)


@pytest.fixture
def float32_keras():
    """Makes new Keras layers float32 for one test."""
    previous = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_floatx(previous[0])
    keras.config.set_dtype_policy(previous[1])


def _float32_mwbp_run():
    """Three float32 MW-BP steps on the conv net: ``(initial, trained)``."""
    model = multiway_model("convnet", "mwbp")
    initial = keras_state(model)
    model.compile(optimizer=sgd(), loss=sparse_ce())
    for x, labels in random_batches("convnet", seed=0):
        model.train_on_batch(x.astype("float32"), labels)
    return initial, keras_state(model)


def test_mwbp_float32_matches_reference(float32_keras):
    """In float32 (on every backend) MW-BP follows the float64 reference to
    float32 round-off."""
    initial, (actual_params, actual_bn) = _float32_mwbp_run()
    expected_params, expected_bn = reference_run("convnet", initial, "mwbp")
    assert_nested_close(actual_params, expected_params, rtol=1e-4, atol=1e-5)
    assert_nested_close(actual_bn, expected_bn, rtol=1e-4, atol=1e-5)


@tensorflow_only
def test_mwbp_float32_fused_batch_norm_matches_reference(float32_keras, monkeypatch):
    """Float32 NHWC BatchNorm layers are re-linearized with TensorFlow's fused
    kernels; the float32 result still follows the float64 reference."""
    from keras_mwbp.backend import tensorflow as tf_backend

    fused_calls = []
    original = tf_backend._fused_batch_norm_vjp

    def spy(layer, *args):
        fused_calls.append(layer.name)
        return original(layer, *args)

    monkeypatch.setattr(tf_backend, "_fused_batch_norm_vjp", spy)
    model = multiway_model("convnet", "mwbp")
    initial = keras_state(model)
    model.compile(optimizer=sgd(), loss=sparse_ce())
    for x, labels in random_batches("convnet", seed=0):
        model.train_on_batch(x.astype("float32"), labels)
    actual_params, actual_bn = keras_state(model)
    expected_params, expected_bn = reference_run("convnet", initial, "mwbp")
    # Per trace, loss 1 re-linearizes bn1-bn3 (updated by loss 0) and loss 2
    # bn1-bn4.
    counts = collections.Counter(fused_calls)
    traces = counts["bn4"]
    assert traces >= 1
    assert counts == {"bn1": 2 * traces, "bn2": 2 * traces, "bn3": 2 * traces,
                      "bn4": traces}
    assert_nested_close(actual_params, expected_params, rtol=1e-4, atol=1e-5)
    assert_nested_close(actual_bn, expected_bn, rtol=1e-4, atol=1e-5)
