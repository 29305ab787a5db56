"""Tiny models and data shared by the behaviour tests of keras_mwbp."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if os.environ.get("KERAS_BACKEND") == "jax":
    # The float64 tests (the NumPy reference at rtol 1e-5) need JAX's 64-bit
    # types; JAX truncates float64 to float32 without this.
    os.environ.setdefault("JAX_ENABLE_X64", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from _backend_selection import backend_selection_hooks  # noqa: E402
from _xdist_scheduling import one_worker_files_hook  # noqa: E402

# The backends each test runs on, by its markers (_backend_selection.py):
# `@pytest.mark.backends(...)` names them, unmarked tests run on TensorFlow
# alone, and `@pytest.mark.oldest_keras(...)` marks those that run again at
# the oldest declared Keras (`--oldest-keras`). tests/run_all.sh collects the
# whole suite on each backend and lets the markers choose.
globals().update(backend_selection_hooks(keras.backend.backend))

# Files whose module-scoped fixtures are costly (child processes, several
# trainings) run whole on one xdist worker under `--dist loadgroup`, so those
# fixtures are built once, not once per worker (_xdist_scheduling.py says why
# xdist's own `xdist_group` mark is not used).
ONE_WORKER_FILES = (
    "test_atomic_saving.py",  # the crashed runs
    "test_authors_loop.py",  # every method's runs, reused by the differences test
    "test_cli_resume.py",  # the uninterrupted and interrupted CLI runs
    "test_cross_backend_saving.py",  # the checkpoints of every backend
    "test_progbar_logger.py",  # the child run in a terminal
    "test_resume.py",  # the SIGKILLed and restarted children
)
pytest_xdist_make_scheduler = one_worker_files_hook(ONE_WORKER_FILES)

# One backend alone: on a test or as a module's `pytestmark`; the closest
# marker wins, so a test of TensorFlow-only machinery (tf.distribute, tf.data
# pipelines, TensorFlow's fused BatchNorm kernels, graph-mode op ordering)
# inside a module that runs on every backend is `@tensorflow_only`.
tensorflow_only = pytest.mark.backends("tensorflow")
jax_only = pytest.mark.backends("jax")
torch_only = pytest.mark.backends("torch")

NUM_CLASSES = 3
MLP_INPUT_SHAPE = (6,)


@pytest.fixture
def seeded():
    """Seeds Keras's global generator (`keras.utils.set_random_seed(0)`), so
    a network built without a seed of its own starts from the same weights
    in every run and a failure reproduces."""
    keras.utils.set_random_seed(0)


def mlp_graph(units=4, num_classes=NUM_CLASSES, batch_norm=False):
    """A 3-head MLP: inputs -> d1 -> [h0], d2 -> [h1], d3 -> final.

    Weight layers on the longest path: tap of h0 is d1 (1), tap of h1 is
    d2 (2), the final output is d1, d2, d3, final (4). With `batch_norm`, a
    BatchNormalization layer `bn` sits between d1 and its ReLU (below the
    first tap).

    Returns:
        `(inputs, [h0, h1, final])`.
    """
    layers = keras.layers
    inputs = keras.Input(MLP_INPUT_SHAPE, name="x")
    x = layers.Dense(units, name="d1")(inputs)
    if batch_norm:
        x = layers.BatchNormalization(name="bn")(x)
    a1 = layers.ReLU(name="r1")(x)
    h0 = layers.Dense(num_classes, name="h0")(a1)
    a2 = layers.Dense(units, activation="relu", name="d2")(a1)
    h1 = layers.Dense(num_classes, name="h1")(a2)
    a3 = layers.Dense(units, activation="relu", name="d3")(a2)
    final = layers.Dense(num_classes, name="final")(a3)
    return inputs, [h0, h1, final]


def mlp_model(method="mwbp", seed=0, **kwargs):
    """A `MultiWayModel` on `mlp_graph()` with seeded initial weights."""
    import keras_mwbp

    keras.utils.set_random_seed(seed)
    graph_kwargs = {k: kwargs.pop(k) for k in ("batch_norm", "num_classes")
                    if k in kwargs}
    inputs, outputs = mlp_graph(**graph_kwargs)
    return keras_mwbp.MultiWayModel(inputs, outputs, method=method, **kwargs)


def mlp_data(n=16, seed=0, num_classes=NUM_CLASSES):
    """`(x, y)`: float32 features of shape `(n, 6)`, integer labels `(n,)`."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n,) + MLP_INPUT_SHAPE).astype("float32")
    y = rng.integers(0, num_classes, size=n)
    return x, y


def sparse_ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def to_numpy(value):
    """A Keras variable or tensor as a NumPy array."""
    return keras.ops.convert_to_numpy(value)


def sgd(learning_rate=0.1, momentum=0.9):
    return keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum)


def compiled_mlp(method="mwbp", seed=0, optimizer=None, metrics=None, **kwargs):
    model = mlp_model(method, seed=seed, **kwargs)
    model.compile(
        optimizer=optimizer if optimizer is not None else sgd(),
        loss=sparse_ce(),
        metrics=metrics,
    )
    return model


def copy_weights(source, target):
    """Copies every weight of `source` into `target`, layer by layer name."""
    for layer in source.layers:
        if layer.weights:
            target.get_layer(layer.name).set_weights(layer.get_weights())


def weights_by_path(model):
    """`{variable.path: numpy value}` of every weight of `model`; the model's
    own variables (`nu`, `head_weights`) by name, as model names differ."""
    return {
        v.name if v.path.startswith(f"{model.name}/") else v.path:
        keras.ops.convert_to_numpy(v)
        for v in model.weights
    }


def assert_weights_equal(actual, expected, rtol=0.0, atol=0.0, paths=None):
    """Compares two `weights_by_path` dicts (on `paths` if given)."""
    assert set(actual) == set(expected)
    for path in paths if paths is not None else expected:
        np.testing.assert_allclose(
            actual[path], expected[path], rtol=rtol, atol=atol, err_msg=path
        )
