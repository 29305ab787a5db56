"""A user's own learning-rate schedule, loss and optimizer class work in
`compile` and `fit` as they do for a plain `keras.Model`: none of them needs
to be registered for serialization until the model is saved (issue 21).

The per-loss optimizers are copies of the template; the copy shares the
template's schedule as an object instead of serializing it. Each run is
checked against the NumPy reference (float64, MW-BP, 3 steps), whose SGD
reads the same warm-up rate at each step.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from _reference_harness import GAMMAS  # noqa: E402
from _reference_harness import LEARNING_RATE  # noqa: E402
from _reference_harness import MOMENTUM  # noqa: E402
from _reference_harness import assert_nested_close  # noqa: E402
from _reference_harness import float64_dtype  # noqa: E402
from _reference_harness import keras_state  # noqa: E402
from _reference_harness import multiway_model  # noqa: E402
from _reference_harness import random_batches  # noqa: E402
from _reference_harness import reference_run  # noqa: E402

pytestmark = [
    pytest.mark.backends("tensorflow", "jax", "torch"),
    pytest.mark.oldest_keras("tensorflow", "torch"),
]

WARMUP_STEPS = 2


def warmup(step):
    """The rate at step 0, 1, ...: LEARNING_RATE * (step + 1) / 3, capped."""
    return LEARNING_RATE * min(1.0, (step + 1) / (WARMUP_STEPS + 1))


class Warmup(keras.optimizers.schedules.LearningRateSchedule):
    """A user's warm-up: not registered, and no `get_config()`."""

    def __call__(self, step):
        step = keras.ops.cast(step, "float64")
        return LEARNING_RATE * keras.ops.minimum(
            1.0, (step + 1.0) / (WARMUP_STEPS + 1.0)
        )


class CrossEntropy(keras.losses.Loss):
    """A user's loss class, not registered: sparse cross-entropy of logits."""

    def call(self, y_true, y_pred):
        return keras.losses.sparse_categorical_crossentropy(
            y_true, y_pred, from_logits=True
        )


class ScaledSGD(keras.optimizers.SGD):
    """A user's optimizer subclass, not registered: SGD on `factor` times the
    gradient. With `learning_rate / factor` it takes SGD's own steps, so
    only a copy of this class (not of `SGD`) matches the reference."""

    def __init__(self, factor, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def update_step(self, gradient, variable, learning_rate):
        super().update_step(gradient * self.factor, variable, learning_rate)

    def get_config(self):
        return dict(super().get_config(), factor=self.factor)


class ForgetfulSGD(keras.optimizers.SGD):
    """An optimizer subclass whose config lacks its constructor argument."""

    def __init__(self, factor, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor


def _train(optimizer, loss):
    """3 MW-BP steps of the reference MLP (float64) with `optimizer` and
    `loss`; returns `(model, initial_state, trained_state)`."""
    with float64_dtype():
        model = multiway_model("mlp", "mwbp")
        initial = keras_state(model)
        model.compile(optimizer=optimizer, loss=loss)
        for x, labels in random_batches("mlp", seed=0):
            model.train_on_batch(x, labels)
    return model, initial, keras_state(model)


def _reference(initial, learning_rate):
    from _reference_harness import KERAS_MOMENTUM

    import reference_numpy as ref

    return ref.train_steps(
        ref.MLP, initial[0], initial[1], random_batches("mlp", seed=0),
        "mwbp", GAMMAS, learning_rate, KERAS_MOMENTUM,
    )[:2]


def test_unregistered_schedule_trains_each_loss_at_the_scheduled_rate():
    model, initial, trained = _train(
        keras.optimizers.SGD(Warmup(), momentum=MOMENTUM),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    assert_nested_close(trained[0], _reference(initial, warmup)[0])
    # The rate did change between steps: the constant rate ends elsewhere.
    constant = _reference(initial, LEARNING_RATE)
    gap = np.abs(constant[0]["d1"]["kernel"] - trained[0]["d1"]["kernel"])
    assert gap.max() > 1e-3
    # Every loss's optimizer reads the user's own schedule object.
    from keras_mwbp._compat import learning_rate_object

    rates = [learning_rate_object(o) for o in
             (model.optimizer, *model.optimizer.loss_optimizers)]
    assert isinstance(rates[0], Warmup)
    assert all(rate is rates[0] for rate in rates)


def test_unregistered_loss_and_optimizer_subclass_match_the_reference():
    factor = 4.0
    _, initial, trained = _train(
        ScaledSGD(factor, learning_rate=LEARNING_RATE / factor,
                  momentum=MOMENTUM),
        CrossEntropy(),
    )
    assert_nested_close(trained[0], _reference(initial, LEARNING_RATE)[0])
    # A plain SGD copy at that rate would have moved a quarter as far.
    slow = _reference(initial, LEARNING_RATE / factor)
    gap = np.abs(slow[0]["d1"]["kernel"] - trained[0]["d1"]["kernel"])
    assert gap.max() > 1e-3


def test_saving_an_unserializable_schedule_fails_as_for_a_plain_model(
        tmp_path):
    model, _, _ = _train(
        keras.optimizers.SGD(Warmup(), momentum=MOMENTUM),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    plain = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    plain.compile(optimizer=keras.optimizers.SGD(Warmup()), loss="mse")
    plain.train_on_batch(np.zeros((2, 5)), np.zeros((2, 3)))
    with pytest.raises(NotImplementedError) as expected:
        plain.save(tmp_path / "plain.keras")
    with pytest.raises(NotImplementedError) as raised:
        model.save(tmp_path / "model.keras")
    assert str(raised.value) == str(expected.value)
    assert "'Warmup' must override `get_config()`" in str(raised.value)


def test_an_optimizer_that_cannot_be_copied_is_refused_at_compile():
    with float64_dtype():
        model = multiway_model("mlp", "mwbp")
    template = ForgetfulSGD(2.0, learning_rate=0.1)
    with pytest.raises(TypeError) as raised:
        model.compile(optimizer=template, loss=CrossEntropy())
    assert str(raised.value) == (
        "`optimizer` must be rebuildable from its config: every loss gets "
        "its own copy, made by "
        "`ForgetfulSGD.from_config(optimizer.get_config())`, which failed "
        "with TypeError: ForgetfulSGD.__init__() missing 1 required "
        "positional argument: 'factor'. Make `get_config()` return every "
        "argument of the optimizer's `__init__`. Received: "
        f"optimizer={template!r}"
    )
    assert not model.compiled
