"""A layer with a fused activation keeps the shared forward pass's
activation derivative (spec, "Decision on fused activations", Eq. 4 and 10),
on every backend.

The net: x -> d1 = Dense(relu) -> h0;  d1 -> d2 = Dense(tanh) -> final.
In MW-BP loss 0 updates d1 (at a large rate, so that many of d1's
pre-activations change sign), then loss 1 back-propagates through d2 and d1
at their current kernels: the ReLU mask and tanh's derivative are those of
the stored pre-activations, not of the pre-activations at the updated
kernels. A NumPy chain rule is the reference; its other reading of Eq. 10
(derivatives at the current parameters) ends far from it.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import copy  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import reference_numpy as ref  # noqa: E402
import keras_mwbp  # noqa: E402

pytestmark = [
    pytest.mark.backends("tensorflow", "jax", "torch"),
    pytest.mark.oldest_keras(),
]

GAMMAS = (0.5, 1.0)
LEARNING_RATE = 1.0
LAYERS = ("d1", "h0", "d2", "final")


def fused_net(activation_2):
    keras.utils.set_random_seed(4)
    layers = keras.layers
    inputs = keras.Input((5,))
    a1 = layers.Dense(6, activation="relu", name="d1")(inputs)
    h0 = layers.Dense(3, name="h0")(a1)
    a2 = layers.Dense(6, activation=activation_2, name="d2")(a1)
    final = layers.Dense(3, name="final")(a2)
    model = keras_mwbp.MultiWayModel(inputs, [h0, final], method="mwbp",
                                     head_weights=list(GAMMAS))
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    return model


def params_of(model):
    return {
        name: {
            "kernel": keras.ops.convert_to_numpy(
                model.get_layer(name).kernel).astype("float64"),
            "bias": keras.ops.convert_to_numpy(
                model.get_layer(name).bias).astype("float64"),
        }
        for name in LAYERS
    }


ACTIVATIONS = {
    "relu": (lambda z: np.maximum(z, 0.0), lambda z: (z > 0).astype(float)),
    "tanh": (np.tanh, lambda z: 1.0 - np.tanh(z) ** 2),
}


def reference(p, batches, activation_2, at_current=False):
    """MW-BP steps (one SGD per loss, no momentum). Each activation's
    derivative is taken at the stored pre-activation (the spec), or with
    `at_current` at the pre-activation of the stored input and the current
    parameters (the other reading)."""
    p = copy.deepcopy(p)
    relu, relu_prime = ACTIVATIONS["relu"]
    act_2, act_2_prime = ACTIVATIONS[activation_2]
    optimizers = [ref.SGDMomentum(LEARNING_RATE, 0.0) for _ in GAMMAS]

    def pre(name, x):
        return ref.dense_forward(x, p[name]["kernel"], p[name]["bias"])

    for x, labels in batches:
        z1 = pre("d1", x)
        a1 = relu(z1)
        z2 = pre("d2", a1)
        a2 = act_2(z2)
        logits = [pre("h0", a1), pre("final", a2)]
        for index in (0, 1):
            grads = {}
            grad = GAMMAS[index] * ref.cross_entropy_backward(
                logits[index], labels)
            if index == 0:
                grad, grads["h0"] = ref.dense_backward(
                    a1, p["h0"]["kernel"], grad)
            else:
                grad, grads["final"] = ref.dense_backward(
                    a2, p["final"]["kernel"], grad)
                z = pre("d2", a1) if at_current else z2
                grad, grads["d2"] = ref.dense_backward(
                    a1, p["d2"]["kernel"], grad * act_2_prime(z))
            z = pre("d1", x) if at_current else z1
            _, grads["d1"] = ref.dense_backward(
                x, p["d1"]["kernel"], grad * relu_prime(z))
            optimizers[index].apply(p, grads)
    return p


@pytest.mark.parametrize("activation_2", sorted(ACTIVATIONS))
def test_fused_activations_keep_the_shared_forward_derivative(activation_2):
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(16, 5)).astype("float32"),
                rng.integers(0, 3, 16)) for _ in range(2)]
    model = fused_net(activation_2)
    initial = params_of(model)
    for x, labels in batches:
        model.train_on_batch(x, labels)
    actual = params_of(model)
    expected = reference(initial, batches, activation_2)
    for name in LAYERS:
        for weight in ("kernel", "bias"):
            np.testing.assert_allclose(
                actual[name][weight], expected[name][weight], rtol=1e-4,
                atol=1e-5, err_msg=f"{name}/{weight}")
    # The decision matters here: derivatives at the updated kernels move
    # d1 (and d2) far from the spec's update.
    other = reference(initial, batches, activation_2, at_current=True)
    gap = np.abs(other["d1"]["kernel"] - expected["d1"]["kernel"]).max()
    assert gap > 1e-2
    # Some of d1's pre-activations changed sign within the first step.
    x = batches[0][0].astype("float64")
    after = reference(initial, batches[:1], activation_2)
    signs = [ref.dense_forward(x, p["d1"]["kernel"], p["d1"]["bias"]) > 0
             for p in (initial, after)]
    assert np.any(signs[0] != signs[1])
