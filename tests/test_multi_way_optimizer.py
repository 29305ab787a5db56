"""The per-loss optimizer container (`keras_mwbp.MultiWayOptimizer`): one
inner optimizer per loss, step counting, learning rates and its saved state."""

import re

import keras
import numpy as np
import pytest

import keras_mwbp
from conftest import compiled_mlp
from conftest import copy_weights
from conftest import mlp_data
from conftest import mlp_graph
from conftest import sparse_ce
from conftest import to_numpy
from keras_mwbp import MultiWayOptimizer

pytestmark = pytest.mark.oldest_keras()

LR = 0.1


def momentum_name(variable):
    return f"{variable.path.replace('/', '_')}_momentum"


def momentum_of(inner, variable):
    """Inner optimizer `inner`'s momentum buffer of model variable `variable`."""
    (buffer,) = [m for m in inner.momentums if m.name == momentum_name(variable)]
    return to_numpy(buffer)


# ------------------------------------------------------------ construction


def test_container_clones_the_template_once_per_loss():
    template = keras.optimizers.SGD(learning_rate=0.05, momentum=0.8,
                                    nesterov=True)
    container = MultiWayOptimizer(template, num_losses=3)
    assert container.num_losses == 3
    assert len(container.loss_optimizers) == 3
    assert len({id(o) for o in container.loss_optimizers} | {id(template)}) == 4
    for i, inner in enumerate(container.loss_optimizers):
        assert type(inner) is keras.optimizers.SGD
        assert inner.name == f"{template.name}_loss_{i}"
        assert float(to_numpy(inner.learning_rate)) == pytest.approx(0.05)
        assert inner.momentum == 0.8 and inner.nesterov is True
    assert float(to_numpy(container.learning_rate)) == pytest.approx(0.05)


def test_container_accepts_identifiers_and_unwraps_a_container():
    container = MultiWayOptimizer("adam", num_losses=2)
    assert [type(o) for o in container.loss_optimizers] == [keras.optimizers.Adam] * 2
    nested = MultiWayOptimizer(container, num_losses=4)
    assert len(nested.loss_optimizers) == 4
    assert type(nested.template) is keras.optimizers.Adam
    assert all(type(o) is keras.optimizers.Adam for o in nested.loss_optimizers)


@pytest.mark.parametrize("num_losses", [0, -1, 2.0, True, "3", None])
def test_container_rejects_a_bad_number_of_losses(num_losses):
    with pytest.raises(ValueError, match=re.escape(
            "`num_losses` must be a positive integer. "
            f"Received: num_losses={num_losses!r}")):
        MultiWayOptimizer("sgd", num_losses=num_losses)


def test_container_rejects_a_missing_optimizer():
    with pytest.raises(TypeError, match=re.escape(
            "`optimizer` must be a Keras optimizer. Received: optimizer=None")):
        MultiWayOptimizer(None, num_losses=2)


def test_container_needs_variable_groups_to_build():
    container = MultiWayOptimizer("sgd", num_losses=2)
    variable = keras.Variable(np.zeros((2,), "float32"))
    with pytest.raises(ValueError, match=re.escape(
            "`MultiWayOptimizer.build()` needs the variable groups")):
        container.build([variable])
    with pytest.raises(ValueError, match=re.escape(
            "`groups` must have one entry per loss (2). Received 3 groups.")):
        container.set_variable_groups([[variable]] * 3)


def test_apply_loss_uses_only_that_losss_optimizer():
    import tensorflow as tf

    a = keras.Variable(np.ones((2,), "float32"), name="a")
    b = keras.Variable(np.ones((3,), "float32"), name="b")
    container = MultiWayOptimizer(keras.optimizers.SGD(0.5), num_losses=2)
    container.set_variable_groups([[a], [a, b]])
    container.build([a, b])
    # Each inner SGD holds its step counter; the rate is the container's.
    assert [len(o.variables) for o in container.loss_optimizers] == [1, 1]
    container.apply_loss(1, [tf.ones((2,)), tf.ones((3,))], [a, b])
    np.testing.assert_array_equal(to_numpy(a), [0.5, 0.5])
    np.testing.assert_array_equal(to_numpy(b), [0.5, 0.5, 0.5])
    assert [int(o.iterations) for o in container.loss_optimizers] == [0, 1]
    # Applies do not count as steps; finish_step does.
    assert int(container.iterations) == 0
    container.finish_step()
    assert int(container.iterations) == 1


def test_learning_rate_setter_sets_every_inner_optimizer():
    container = MultiWayOptimizer(keras.optimizers.SGD(0.1), num_losses=3)
    container.learning_rate = 0.025
    for inner in container.loss_optimizers:
        assert float(to_numpy(inner.learning_rate)) == pytest.approx(0.025)
    assert float(to_numpy(container.learning_rate)) == pytest.approx(0.025)


def test_config_round_trip_keeps_the_template_and_number_of_losses():
    template = keras.optimizers.SGD(learning_rate=0.3, momentum=0.7)
    container = MultiWayOptimizer(template, num_losses=3, name="mw")
    config = container.get_config()
    assert config["num_losses"] == 3 and config["name"] == "mw"
    restored = MultiWayOptimizer.from_config(config)
    assert restored.name == "mw"
    assert len(restored.loss_optimizers) == 3
    for inner in restored.loss_optimizers:
        assert type(inner) is keras.optimizers.SGD
        assert inner.momentum == pytest.approx(0.7)
        assert float(to_numpy(inner.learning_rate)) == pytest.approx(0.3)


# -------------------------------------------------------- per-loss state


@pytest.mark.parametrize("method, groups", [("mwbp", 3), ("joint", 1),
                                            ("standard", 1)])
def test_number_of_inner_optimizers_per_method(method, groups):
    model = compiled_mlp(method)
    assert isinstance(model.optimizer, MultiWayOptimizer)
    assert len(model.optimizer.loss_optimizers) == groups
    assert model.optimizer.num_losses == groups


def test_inner_optimizers_hold_momentum_for_their_losss_variables():
    model = compiled_mlp("mwbp")
    x, y = mlp_data(8)
    model.train_on_batch(x, y)
    graph_variables = model._head_graph.loss_variables
    for inner, variables in zip(model.optimizer.loss_optimizers, graph_variables):
        assert sorted(m.name for m in inner.momentums) == sorted(
            momentum_name(v) for v in variables)
        for v in variables:
            assert momentum_of(inner, v).shape == tuple(v.shape)
    # d1 is reached by all three losses, h0 only by loss 0, final only by 2.
    names = [[m.name for m in inner.momentums]
             for inner in model.optimizer.loss_optimizers]
    assert ["d1_kernel_momentum" in n for n in names] == [True] * 3
    assert ["h0_kernel_momentum" in n for n in names] == [True, False, False]
    assert ["final_kernel_momentum" in n for n in names] == [False, False, True]


@pytest.mark.parametrize("method", ["joint", "standard"])
def test_single_optimizer_methods_hold_momentum_for_what_they_update(method):
    model = compiled_mlp(method)
    x, y = mlp_data(8)
    model.train_on_batch(x, y)
    (inner,) = model.optimizer.loss_optimizers
    expected = (model.trainable_variables if method == "joint"
                else model._head_graph.loss_variables[-1])
    assert sorted(m.name for m in inner.momentums) == sorted(
        momentum_name(v) for v in expected)


def _loss_gradient(initial_model, x, y, head, layer_name):
    """d loss_head / d kernel of `layer_name`, by a plain tape on a copy."""
    import tensorflow as tf

    inputs, outputs = mlp_graph()
    copy = keras.Model(inputs, outputs)
    copy_weights(initial_model, copy)
    kernel = copy.get_layer(layer_name).kernel
    with tf.GradientTape() as tape:
        logits = copy(x, training=True)[head]
        loss = sparse_ce()(y, logits)
    return to_numpy(tape.gradient(loss, kernel.value))


def test_shared_kernel_has_one_momentum_buffer_per_loss():
    model = compiled_mlp("mwbp", optimizer=keras.optimizers.SGD(LR, momentum=0.9))
    x, y = mlp_data(8, seed=3)
    inputs, outputs = mlp_graph()
    initial = keras.Model(inputs, outputs)
    copy_weights(model, initial)
    gammas = model.head_weights
    assert gammas == (0.25, 1.0, 1.0)

    model.train_on_batch(x, y)
    assert int(model.optimizer.iterations) == 1
    kernel = model.get_layer("d1").kernel
    buffers = [momentum_of(inner, kernel) for inner in model.optimizer.loss_optimizers]
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.max(np.abs(buffers[i] - buffers[j])) > 1e-6, (i, j)

    # Loss 0 sees the initial parameters: velocity = -lr * gamma_0 * grad.
    grad0 = _loss_gradient(initial, x, y, 0, "d1")
    np.testing.assert_allclose(buffers[0], -LR * gammas[0] * grad0,
                               rtol=1e-5, atol=1e-7)
    # Loss 1 reaches d1 through d2 and h1, which loss 0 did not change, and
    # a dense kernel's own gradient does not depend on the kernel: its
    # gradient is the one at the initial parameters too.
    grad1 = _loss_gradient(initial, x, y, 1, "d1")
    np.testing.assert_allclose(buffers[1], -LR * gammas[1] * grad1,
                               rtol=1e-5, atol=1e-7)
    # The weight moved by the sum of the three velocities.
    np.testing.assert_allclose(
        to_numpy(kernel), to_numpy(initial.get_layer("d1").kernel) + sum(buffers),
        rtol=1e-5, atol=1e-7)


# ------------------------------------------------------ steps and rates


def test_learning_rate_schedule_advances_once_per_step():
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries=[2], values=[0.1, 0.01])
    model = compiled_mlp("mwbp", optimizer=keras.optimizers.SGD(schedule))
    x, y = mlp_data(8)
    assert len(model.optimizer.loss_optimizers) == 3
    # The rate shown after `steps` steps is schedule(steps): 0.1 while
    # iterations <= 2, then 0.01 (step 3 itself still used schedule(2)).
    expected = {1: 0.1, 2: 0.1, 3: 0.01, 4: 0.01}
    for steps in range(1, 5):
        model.train_on_batch(x, y)
        assert int(model.optimizer.iterations) == steps
        rates = [float(to_numpy(model.optimizer.learning_rate))]
        for inner in model.optimizer.loss_optimizers:
            assert int(inner.iterations) == steps
            rates.append(float(to_numpy(inner.learning_rate)))
        assert rates == pytest.approx([expected[steps]] * 4, rel=1e-6), steps


def test_schedule_rate_used_by_each_update_is_that_of_the_step():
    # Plain SGD, lr 1 until iteration 1, then 0: only the first step moves
    # the weights, for every loss's update.
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries=[0], values=[1.0, 0.0])
    model = compiled_mlp("mwbp", optimizer=keras.optimizers.SGD(schedule))
    x, y = mlp_data(8)
    before = [to_numpy(v) for v in model.trainable_variables]
    model.train_on_batch(x, y)
    after_one = [to_numpy(v) for v in model.trainable_variables]
    assert all(np.max(np.abs(a - b)) > 0 for a, b in zip(after_one, before)
               if a.ndim == 2)
    model.train_on_batch(x, y)
    for a, b in zip(after_one, model.trainable_variables):
        np.testing.assert_array_equal(to_numpy(b), a)


def test_learning_rate_scheduler_callback_sets_every_inner_rate():
    model = compiled_mlp("mwbp", optimizer=keras.optimizers.SGD(0.1))
    x, y = mlp_data(16)
    seen = []

    def schedule(epoch, lr):
        seen.append(lr)
        return 0.05 / (epoch + 1)

    history = model.fit(
        x, y, batch_size=8, epochs=2, verbose=0,
        callbacks=[keras.callbacks.LearningRateScheduler(schedule)])
    # Keras's callback calls the schedule once per epoch and sets the
    # container's rate, which sets every inner optimizer's ...
    assert seen == pytest.approx([0.1, 0.05])
    # ... and logs one `learning_rate`.
    assert history.history["learning_rate"] == pytest.approx([0.05, 0.025])
    for inner in model.optimizer.loss_optimizers:
        assert float(to_numpy(inner.learning_rate)) == pytest.approx(0.025)
    assert int(model.optimizer.iterations) == 4
    assert [int(o.iterations) for o in model.optimizer.loss_optimizers] == [4] * 3


# ------------------------------------------------------------ saved state


def test_container_variables_are_its_step_counter_rate_then_inner_states():
    model = compiled_mlp("mwbp")
    model.train_on_batch(*mlp_data(8))
    variables = model.optimizer.variables
    assert variables[0] is model.optimizer.iterations
    assert variables[1] is model.optimizer.learning_rate
    inner = [v for o in model.optimizer.loss_optimizers for v in o.variables]
    assert [id(v) for v in variables[2:]] == [id(v) for v in inner]


def test_load_own_variables_rejects_a_state_of_the_wrong_length():
    model = compiled_mlp("mwbp")
    model.train_on_batch(*mlp_data(8))
    optimizer = model.optimizer
    store = {}
    optimizer.save_own_variables(store)
    assert len(store) == len(optimizer.variables)
    store.pop(str(len(store) - 1))
    before = [to_numpy(v) for v in optimizer.variables]
    with pytest.raises(ValueError) as info:
        optimizer.load_own_variables(store)
    message = str(info.value)
    assert message.startswith(
        f"The saved state of optimizer '{optimizer.name}' has "
        f"{len(before) - 1} variables, but this optimizer has {len(before)} "
        "(3 inner optimizers")
    assert message.endswith(
        "The file was saved with a different model, method or optimizer.")
    for value, variable in zip(before, optimizer.variables):
        np.testing.assert_array_equal(to_numpy(variable), value)


def test_load_own_variables_rejects_a_missing_state():
    # Keras passes an empty store when the file has no group for the
    # optimizer; its own optimizers then only warn and keep a fresh state.
    model = compiled_mlp("mwbp")
    model.train_on_batch(*mlp_data(8))
    optimizer = model.optimizer
    count = len(optimizer.variables)
    with pytest.raises(ValueError, match=re.escape(
            f"The file has no saved state for optimizer '{optimizer.name}': "
            f"expected {count} variables (its step counter and the states of "
            "3 inner optimizers), found none.")):
        optimizer.load_own_variables({})
    assert int(optimizer.iterations) == 1


def test_container_is_built_once_training_built_its_inner_optimizers():
    model = compiled_mlp("mwbp")
    model.train_on_batch(*mlp_data(8))
    optimizer = model.optimizer
    assert all(inner.built for inner in optimizer.loss_optimizers)
    # Step counter and the shared rate, then the inner states.
    assert len(optimizer.variables) == 2 + sum(
        len(inner.variables) for inner in optimizer.loss_optimizers)
    # A trained optimizer is built, as a plain Keras optimizer is after its
    # first apply (checked before anything else could build it).
    assert optimizer.built


def test_load_own_variables_rejects_a_state_of_the_wrong_shape():
    model = compiled_mlp("mwbp")
    model.train_on_batch(*mlp_data(8))
    optimizer = model.optimizer
    store = {}
    optimizer.save_own_variables(store)
    last = optimizer.variables[-1]
    store[str(len(store) - 1)] = np.zeros((7,), "float32")
    with pytest.raises(ValueError, match=re.escape(
            f"does not match variable '{last.path}': saved shape (7,), "
            f"expected {tuple(last.shape)}.")):
        optimizer.load_own_variables(store)


def test_load_own_variables_restores_every_inner_state():
    model = compiled_mlp("mwbp")
    x, y = mlp_data(8)
    model.train_on_batch(x, y)
    store = {}
    model.optimizer.save_own_variables(store)
    saved = dict(store)
    model.train_on_batch(x, y)
    assert int(model.optimizer.iterations) == 2
    model.optimizer.load_own_variables(saved)
    assert int(model.optimizer.iterations) == 1
    for i, variable in enumerate(model.optimizer.variables):
        np.testing.assert_array_equal(to_numpy(variable), saved[str(i)])


def test_optimizer_state_of_another_method_is_rejected(tmp_path):
    source = compiled_mlp("mwbp")
    source.train_on_batch(*mlp_data(8))
    path = str(tmp_path / "mwbp.weights.h5")
    source.save_weights(path)
    target = compiled_mlp("joint", seed=1)  # Not trained, not built.
    with pytest.raises(ValueError, match=re.escape(
            "(1 inner optimizers). The file was saved with a different model, "
            "method or optimizer.")):
        target.load_weights(path)
    assert int(target.optimizer.iterations) == 0


def test_keras_multiway_optimizer_is_exported():
    assert keras_mwbp.MultiWayOptimizer is MultiWayOptimizer
