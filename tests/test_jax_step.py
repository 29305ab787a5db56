"""The JAX training step: stateless, jit-compiled, its state carried by Keras.

Keras's JAX trainer jit-compiles `train_step(state, data)` and carries only
the values in `state` from step to step (within an epoch of `fit` the
variables themselves are emptied); these tests check that everything the
algorithm needs travels there: every per-loss optimizer's variables, nu and
the loss weights, BatchNorm statistics. The step's numbers are checked
against the NumPy reference in `test_reference.py` and
`test_methods_reference.py`, which run on this backend too.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from _reference_harness import BATCH_SIZE  # noqa: E402
from _reference_harness import assert_nested_close  # noqa: E402
from _reference_harness import float64_dtype  # noqa: E402
from _reference_harness import keras_state  # noqa: E402
from _reference_harness import multiway_model  # noqa: E402
from _reference_harness import random_batches  # noqa: E402
from _reference_harness import reference_run  # noqa: E402
from _reference_harness import sgd  # noqa: E402
from _reference_harness import sparse_ce  # noqa: E402
from conftest import compiled_mlp  # noqa: E402
from conftest import jax_only  # noqa: E402
from conftest import mlp_data  # noqa: E402

pytestmark = jax_only


@pytest.fixture
def float64_keras():
    with float64_dtype():
        yield


def _state(model):
    return (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.optimizer.variables],
        [v.value for v in model.metrics_variables],
    )


def test_every_inner_optimizer_variable_is_in_the_carried_state():
    model = compiled_mlp("mwbp", optimizer=keras.optimizers.Adam(1e-2))
    carried = {id(v) for v in model.optimizer.variables}
    inner = [v for o in model.optimizer.loss_optimizers for v in o.variables]
    assert len(model.optimizer.loss_optimizers) == model.num_heads
    # Each Adam: iterations, learning rate, two moments per variable.
    assert len(inner) >= model.num_heads * 2
    assert {id(v) for v in inner} <= carried


@pytest.mark.parametrize("method", ["mwbp", "reverse_mwbp", "naive_mwbp"])
def test_fit_carries_the_state_between_steps(float64_keras, method):
    """Three steps of one `fit` epoch (variables emptied, state carried by
    the jit-compiled step, momentum buffers of every per-loss optimizer
    included) equal the NumPy reference."""
    model = multiway_model("convnet", method)
    initial = keras_state(model)
    model.compile(optimizer=sgd(nesterov=True), loss=sparse_ce())
    batches = random_batches("convnet", seed=0)
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=1, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == len(batches)
    expected_params, expected_bn = reference_run(
        "convnet", initial, method, nesterov=True
    )
    actual_params, actual_bn = keras_state(model)
    assert_nested_close(actual_params, expected_params)
    assert_nested_close(actual_bn, expected_bn)


def test_train_step_is_stateless_and_jit_compiled():
    """`jax.jit(model.train_step)(state, data)` returns the new state and
    changes no variable; the state it returns is the one `train_on_batch`
    leaves in the variables."""
    import jax

    model = compiled_mlp("mwbp", batch_norm=True)
    x, y = mlp_data(8, seed=3)
    model.train_on_batch(x, y)  # Builds the metrics.
    # train_on_batch resets the metrics before its step: so does the state
    # given to the jitted step.
    model.reset_metrics()
    before = [np.array(v.numpy()) for v in model.variables]
    trainable_before = [np.array(v.numpy()) for v in model.trainable_variables]
    optimizer_before = [np.array(v.numpy()) for v in model.optimizer.variables]
    state = _state(model)
    data = (keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y))
    logs, new_state = jax.jit(model.train_step)(state, data)
    for variable, value in zip(model.variables, before):
        np.testing.assert_array_equal(variable.numpy(), value)
    for variable, value in zip(model.optimizer.variables, optimizer_before):
        np.testing.assert_array_equal(variable.numpy(), value)
    model.train_on_batch(x, y)
    for group, variables in zip(new_state, _state_variables(model)):
        assert len(group) == len(variables)
        for value, variable in zip(group, variables):
            np.testing.assert_allclose(
                np.asarray(value), variable.numpy(), rtol=1e-6, atol=1e-7,
                err_msg=variable.path,
            )
    moved = max(
        float(np.max(np.abs(np.asarray(a) - b)))
        for a, b in zip(new_state[0], trainable_before)
    )
    assert moved > 1e-4
    assert float(logs["loss"]) > 0


def _state_variables(model):
    return (model.trainable_variables, model.non_trainable_variables,
            model.optimizer.variables, model.metrics_variables)


def test_set_nu_changes_the_weights_without_retracing(monkeypatch):
    from keras_mwbp import algorithm

    traces = []
    original = algorithm.TrainingStep.run

    def counting(self, data):
        traces.append(1)
        return original(self, data)

    monkeypatch.setattr(algorithm.TrainingStep, "run", counting)
    model = compiled_mlp("mwbp", nu=2.0)
    x, y = mlp_data(16, seed=4)
    first = model.fit(x, y, batch_size=16, epochs=1, shuffle=False,
                      verbose=0).history
    old_gammas = model.head_weights
    model.set_nu(0.5)
    new_gammas = model.head_weights
    assert new_gammas != old_gammas
    second = model.fit(x, y, batch_size=16, epochs=1, shuffle=False,
                       verbose=0).history
    assert len(traces) == 1
    heads = model.output_names
    for history, gammas in ((first, old_gammas), (second, new_gammas)):
        assert [history[f"gamma_{i}"][0] for i in range(3)] == pytest.approx(
            gammas, rel=1e-6)
        # One batch per epoch: the logged objective is sum gamma_i loss_i
        # with the loss weights of that epoch.
        objective = sum(g * history[f"{h}_loss"][0]
                        for g, h in zip(gammas, heads))
        assert history["loss"][0] == pytest.approx(objective, rel=1e-5)
    assert second["nu"] == [0.5]


def test_learning_rate_schedule_advances_once_per_step():
    """A schedule counts training steps on every per-loss optimizer: after
    three fit steps each inner SGD's step count is 3 and the rate is the
    schedule's at step 3."""
    schedule = keras.optimizers.schedules.ExponentialDecay(
        0.1, decay_steps=1, decay_rate=0.5)
    model = compiled_mlp("mwbp", optimizer=keras.optimizers.SGD(schedule))
    x, y = mlp_data(24, seed=5)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 3
    for inner in model.optimizer.loss_optimizers:
        assert int(inner.iterations.numpy()) == 3
        assert float(keras.ops.convert_to_numpy(inner.learning_rate)) == (
            pytest.approx(0.1 * 0.5 ** 3))


def test_without_x64_the_loss_weights_are_float32_and_nothing_warns():
    """JAX without JAX_ENABLE_X64 truncates float64 variables with a
    UserWarning; nu and the loss weights are made float32 there instead."""
    import subprocess
    import sys

    script = (
        "import warnings; warnings.simplefilter('error', UserWarning)\n"
        "import keras, keras_mwbp\n"
        "i = keras.Input((4,)); a = keras.layers.Dense(4)(i)\n"
        "h = keras.layers.Dense(3)(a)\n"
        "f = keras.layers.Dense(3)(keras.layers.Dense(4)(a))\n"
        "m = keras_mwbp.MultiWayModel(i, [h, f])\n"
        "print(m._nu.dtype, m._gammas.dtype)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    env["KERAS_BACKEND"] = "jax"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True,
        env=env, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["float32", "float32"]
