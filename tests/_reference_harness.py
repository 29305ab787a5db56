"""Shared pieces of the tests that compare keras_mwbp with the NumPy
reference (``test_reference.py``, ``test_methods_reference.py``).

The two networks of ``reference_numpy`` as Keras graphs, fixed batches,
reading a Keras model's weights in the reference layout, and cached
three-step training runs of ``keras_mwbp.MultiWayModel`` and the reference.
"""

import contextlib
import functools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import reference_numpy as ref  # noqa: E402
from conftest import sparse_ce  # noqa: E402, F401 (the harness's users import it here)

GAMMAS = (0.3, 0.6, 1.0)
LEARNING_RATE = 0.1
MOMENTUM = 0.9
# Keras's SGD casts the Python float momentum with ``ops.cast``, which on the
# TensorFlow backend goes through a float32 tensor: float64 variables are
# updated with float32(0.9) = 0.8999999761581421. JAX casts the Python float
# to float64 directly (0.9). Both are checked bit-exactly by
# test_reference_sgd_matches_keras; the reference is fed the same value.
KERAS_MOMENTUM = (
    float(np.float32(MOMENTUM))
    if keras.backend.backend() == "tensorflow" else MOMENTUM
)
# Keras's type promotion maps float64 to float32 on every backend but
# TensorFlow (keras.backend.result_type("float64", "float32")), so
# BatchNormalization and means (global pooling, loss reductions) compute a
# float64 model in float32 there. The reference comparisons (RTOL) hold on
# every backend; an identity between two Keras runs that sum the same terms
# in another order holds to float64 round-off on TensorFlow and to float32
# round-off elsewhere.
KERAS_FLOAT64_EXACT = (
    keras.backend.result_type("float64", "float32") == "float64"
)
KERAS_IDENTITY_TOLERANCE = (
    {"rtol": 1e-10, "atol": 1e-12} if KERAS_FLOAT64_EXACT
    else {"rtol": 2e-6, "atol": 1e-7}
)
BATCH_SIZE = 8
NUM_STEPS = 3
RTOL = 1e-5
ATOL = 1e-7
MIN_MWBP_EFFECT = 1e-4
INITIAL_WEIGHTS_SEED = 0
NETWORKS = {"mlp": ref.MLP, "convnet": ref.CONVNET}
INPUT_SHAPES = {"mlp": (5,), "convnet": (5, 5, 2)}
NUM_CLASSES = {"mlp": 3, "convnet": 4}


# --------------------------------------------------------------------------
# Data and comparisons
# --------------------------------------------------------------------------


def random_batches(network_name, seed):
    """NUM_STEPS fixed batches ``(x, integer labels)`` for a network."""
    rng = np.random.default_rng(seed)
    return [
        (
            rng.normal(size=(BATCH_SIZE,) + INPUT_SHAPES[network_name]),
            rng.integers(0, NUM_CLASSES[network_name], size=BATCH_SIZE),
        )
        for _ in range(NUM_STEPS)
    ]


def random_params(network_name, rng):
    """Random parameters (BatchNorm gamma/beta away from 1/0) for a network."""
    if network_name == "mlp":
        shapes = {
            "d1": (5, 6),
            "h0": (6, 3),
            "d2": (6, 6),
            "h1": (6, 3),
            "final": (6, 3),
        }
        batch_norms = ()
    else:
        shapes = {"c1": (3, 3, 2, 3), "h0": (3, 4), "h1": (3, 4), "final": (3, 4)}
        shapes.update({name: (3, 3, 3, 3) for name in ("c2", "c3", "c4", "c5")})
        batch_norms = ("bn1", "bn2", "bn3", "bn4")
    params = {
        name: {
            "kernel": rng.normal(scale=0.5, size=shape),
            "bias": rng.normal(scale=0.1, size=shape[-1]),
        }
        for name, shape in shapes.items()
    }
    for name in batch_norms:
        params[name] = {
            "gamma": rng.uniform(0.5, 1.5, size=3),
            "beta": rng.normal(scale=0.1, size=3),
        }
    return params


def initial_bn_state(network_name):
    """Keras's initial moving statistics (mean 0, variance 1) by layer."""
    if network_name == "mlp":
        return {}
    return {
        name: {"moving_mean": np.zeros(3), "moving_variance": np.ones(3)}
        for name in ("bn1", "bn2", "bn3", "bn4")
    }


def assert_nested_close(actual, expected, rtol=RTOL, atol=ATOL):
    """Asserts two ``{layer: {weight: array}}`` dicts are equal numerically."""
    assert set(actual) == set(expected)
    for layer, weights in expected.items():
        assert set(actual[layer]) == set(weights)
        for weight, array in weights.items():
            np.testing.assert_allclose(
                actual[layer][weight],
                array,
                rtol=rtol,
                atol=atol,
                err_msg=f"{layer}/{weight}",
            )


def max_relative_difference(actual, expected):
    """Largest ``||a - e|| / ||e||`` over the weight arrays.

    Arrays of norm below 1e-6 (e.g. conv biases feeding a BatchNorm, whose
    gradient is zero) are skipped: their ratio is round-off noise.
    """
    ratios = [
        np.linalg.norm(actual[layer][weight] - array) / np.linalg.norm(array)
        for layer, weights in expected.items()
        for weight, array in weights.items()
        if np.linalg.norm(array) > 1e-6
    ]
    return max(ratios)


# --------------------------------------------------------------------------
# Keras
# --------------------------------------------------------------------------


@contextlib.contextmanager
def float64_dtype():
    """Makes new Keras layers and inputs float64 inside the ``with``.

    Test modules wrap it in a module-scoped ``float64_keras`` fixture.
    """
    previous = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    # The global dtype policy is cached from floatx on first use; set it too.
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_floatx(previous[0])
        keras.config.set_dtype_policy(previous[1])


def mlp_graph():
    """The MLP of ``ref.MLP`` as a functional graph: (inputs, head logits)."""
    layers = keras.layers
    inputs = keras.Input((5,))
    a1 = layers.ReLU()(layers.Dense(6, name="d1")(inputs))
    h0 = layers.Dense(3, name="h0")(a1)
    a2 = layers.ReLU()(layers.Dense(6, name="d2")(a1))
    h1 = layers.Dense(3, name="h1")(a2)
    final = layers.Dense(3, name="final")(a2)
    return inputs, [h0, h1, final]


def convnet_graph():
    """The network of ``ref.CONVNET`` as a functional graph."""
    layers = keras.layers

    def conv(name):
        return layers.Conv2D(3, (3, 3), padding="same", name=name)

    inputs = keras.Input((5, 5, 2))
    a1 = layers.ReLU()(layers.BatchNormalization(name="bn1")(conv("c1")(inputs)))
    branch = layers.BatchNormalization(name="bn2")(conv("c2")(a1))
    branch = layers.ReLU()(branch)
    branch = layers.BatchNormalization(name="bn3")(conv("c3")(branch))
    a2 = layers.ReLU()(layers.Add()([branch, a1]))
    h0 = layers.Dense(4, name="h0")(layers.GlobalAveragePooling2D()(a2))
    a3 = layers.BatchNormalization(name="bn4")(conv("c4")(a2))
    a3 = layers.ReLU()(a3)
    h1 = layers.Dense(4, name="h1")(layers.GlobalAveragePooling2D()(a3))
    top = layers.ReLU()(conv("c5")(a3))
    final = layers.Dense(4, name="final")(layers.GlobalAveragePooling2D()(top))
    return inputs, [h0, h1, final]


GRAPHS = {"mlp": mlp_graph, "convnet": convnet_graph}


def to_numpy(value):
    """A Keras variable or tensor as a float64 NumPy array."""
    return np.array(keras.ops.convert_to_numpy(value), dtype=np.float64)


def keras_state(model):
    """Reads a model's weights in the reference layout, by layer name.

    Returns:
        Tuple ``(params, bn_state)``.
    """
    params, bn_state = {}, {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            params[layer.name] = {
                "gamma": to_numpy(layer.gamma),
                "beta": to_numpy(layer.beta),
            }
            bn_state[layer.name] = {
                "moving_mean": to_numpy(layer.moving_mean),
                "moving_variance": to_numpy(layer.moving_variance),
            }
        elif isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)):
            params[layer.name] = {
                "kernel": to_numpy(layer.kernel),
                "bias": to_numpy(layer.bias),
            }
    num_arrays = sum(len(weights) for weights in params.values())
    assert num_arrays == len(model.trainable_weights), "uncompared weights"
    return params, bn_state


def copy_weights(source, target):
    """Copies every weight of ``source``'s layers into ``target``'s by name."""
    for layer in source.layers:
        if layer.weights:
            target.get_layer(layer.name).set_weights(layer.get_weights())


def sgd(nesterov=False):
    return keras.optimizers.SGD(
        learning_rate=LEARNING_RATE, momentum=MOMENTUM, nesterov=nesterov
    )


# --------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------


def reference_run(network_name, initial, method, nesterov=False, **options):
    """The reference's ``(params, bn_state)`` after NUM_STEPS steps from
    ``initial = (params, bn_state)``; ``options`` go to ``ref.train_steps``
    (``relay_span``, ``weighting``)."""
    params, bn_state = initial
    return ref.train_steps(
        NETWORKS[network_name],
        params,
        bn_state,
        random_batches(network_name, seed=0),
        method,
        GAMMAS,
        LEARNING_RATE,
        KERAS_MOMENTUM,
        nesterov,
        **options,
    )[:2]


def multiway_model(network_name, method, **options):
    """A ``MultiWayModel`` on the network's graph with the initial weights
    of seed INITIAL_WEIGHTS_SEED; ``options`` go to its constructor."""
    import keras_mwbp  # Imported here so the NumPy-only tests run without it.

    keras.utils.set_random_seed(INITIAL_WEIGHTS_SEED)
    inputs, outputs = GRAPHS[network_name]()
    return keras_mwbp.MultiWayModel(
        inputs=inputs,
        outputs=outputs,
        method=method,
        head_weights=list(GAMMAS),
        **options,
    )


@functools.cache
def multiway_run(network_name, method, nesterov=False, run_eagerly=False,
                 **options):
    """Trains a MultiWayModel for NUM_STEPS steps; needs ``float64_dtype()``.

    Every run starts from the same initial weights, so runs of different
    methods can be compared with each other.

    Returns:
        Tuple ``(initial, trained)`` of ``(params, bn_state)`` pairs.
    """
    model = multiway_model(network_name, method, **options)
    initial = keras_state(model)
    model.compile(optimizer=sgd(nesterov), loss=sparse_ce(),
                  run_eagerly=run_eagerly)
    for x, labels in random_batches(network_name, seed=0):
        model.train_on_batch(x, labels)
    return initial, keras_state(model)
