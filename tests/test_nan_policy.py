"""`MultiWayModel(nan_policy=...)`: what a step with a non-finite loss or
gradient does, compiled and eager.

- `"raise"` (default): `FloatingPointError` naming the step (the optimizer's
  iteration count before it, from 0) and the head whose loss or gradient is
  the first non-finite one (for `joint`: a head's loss, or "the gradient of
  the joint objective"); every model and optimizer variable is as before the
  step, and training goes on.
- `"skip_step"`: no error; every variable (weights, BatchNorm moving
  statistics, dropout seed state, optimizer states and iterations, metrics
  and loss trackers) is as before the step, so the run continues exactly as
  if the batch had never been there.
- `"zero"`: NaN gradient entries become 0 and the step is applied. Infinite
  entries are kept (only NaN is replaced), and nothing is checked or
  restored.

A NaN in `x` does not always reach the loss: in a compiled step TensorFlow's
fused MatMul + ReLU maps it to 0, so the NaN shows only in the kernel's
gradient; both are caught. The `clean_net` below removes the NaN from the
forward pass on purpose (`where(isnan(h), 0, h)`), so its loss is finite and
only the first kernel's gradient has NaN entries, in every mode.
"""

import json
import pathlib
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from conftest import tensorflow_only
from keras_mwbp import MultiWayModel

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

L = keras.layers
B = 8  # batch size
METHODS = ("mwbp", "joint", "naive_mwbp")
MODES = pytest.mark.parametrize(
    "run_eagerly", [False, True], ids=["compiled", "eager"]
)


# Known (torch): Keras's torch Dropout without a seed draws its mask from
# torch's global random generator, not from a per-layer seed state, so two
# identically seeded twins trained one after the other get different masks
# (they differ after their first common batch already). Strict: fails once
# the twins agree.
_TORCH_UNSEEDED_DROPOUT = pytest.mark.xfail(
    keras.backend.backend() == "torch", strict=True,
    reason="Keras's torch Dropout without a seed uses torch's global RNG")
# Known (torch): Keras's torch BatchNormalization turns the 1e30 row into NaN
# outputs (TensorFlow: 0), so head 0's loss is the first non-finite check,
# not the new state. Strict: fails once the message names the state.
_TORCH_BN_NAN = pytest.mark.xfail(
    keras.backend.backend() == "torch", strict=True,
    reason="Keras's torch BatchNorm gives NaN outputs for a 1e30 input")


# ------------------------------------------------------------------ models
def dense_net(method, nan_policy, batch_norm=True, dropout=False, seed=0):
    """x (4) -> d1 -> [bn] -> relu -> aux (2 logits); d2 -> [dropout] ->
    final (2 logits)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,), name="x")
    x = L.Dense(3, name="d1")(inputs)
    if batch_norm:
        x = L.BatchNormalization(name="bn")(x)
    a1 = L.ReLU(name="r1")(x)
    aux = L.Dense(2, name="aux")(a1)
    a2 = L.Dense(3, activation="relu", name="d2")(a1)
    if dropout:
        a2 = L.Dropout(0.5, name="drop")(a2)
    final = L.Dense(2, name="final")(a2)
    return MultiWayModel(inputs, [aux, final], method=method,
                         nan_policy=nan_policy, shuffle_seed=0)


def compiled_net(method, nan_policy, run_eagerly, **kwargs):
    model = dense_net(method, nan_policy, **kwargs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        run_eagerly=run_eagerly,
    )
    return model


def clean_net(method, nan_policy, run_eagerly, momentum=0.0):
    """x (3) -> t (Dense 2, no bias, linear) -> where(isnan, 0, .) -> aux and
    final (Dense 1 each, no bias); MSE for both heads, gammas (0.5, 1), plain
    SGD at rate 0.1. A NaN in x gives a finite loss and NaN entries only in
    t's gradient (the rows of the NaN features)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,), name="x")
    h = L.Dense(2, use_bias=False, name="t")(inputs)
    z = keras.ops.where(keras.ops.isnan(h), keras.ops.zeros_like(h), h)
    aux = L.Dense(1, use_bias=False, name="aux")(z)
    final = L.Dense(1, use_bias=False, name="final")(z)
    model = MultiWayModel(inputs, [aux, final], method=method,
                          head_weights=[0.5, 1.0], nan_policy=nan_policy,
                          shuffle_seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=momentum),
                  loss="mse", run_eagerly=run_eagerly)
    return model


# -------------------------------------------------------------------- data
def good_batches(num, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=(B, 4)).astype("float32"), rng.integers(0, 2, B))
        for _ in range(num)
    ]


def with_nan(x, row=1, col=2):
    x = x.copy()
    x[row, col] = np.nan
    return x


def concat(batches):
    return (np.concatenate([x for x, _ in batches]),
            np.concatenate([y for _, y in batches]))


# ------------------------------------------------------------------- state
def state(model, metrics=False):
    """`{group:index:name: value}` of every model and optimizer variable
    (and metric variable with `metrics`); the same keys for twin models."""
    groups = {"model": model.variables, "optimizer": model.optimizer.variables}
    if metrics:
        # All but the `skipped_steps` count, which a skipped step raises
        # (see test_skip_step_counts_skipped_steps_per_epoch).
        counter = getattr(model, "_skipped_steps", None)
        counts = [] if counter is None else counter.variables
        groups["metrics"] = [
            v for v in model.metrics_variables
            if not any(v is c for c in counts)
        ]
    return {
        f"{group}:{i}:{v.name}": np.array(keras.ops.convert_to_numpy(v))
        for group, variables in groups.items()
        for i, v in enumerate(variables)
    }


def assert_bitwise_equal(actual, expected):
    assert actual.keys() == expected.keys()
    differ = [k for k in expected if not np.array_equal(actual[k], expected[k])]
    assert not differ, f"variables that differ: {differ}"


def head_text(method, gradient_only=False):
    """The part of the message naming the head, as a regex."""
    head0 = r"the loss or a gradient of head 0 \('aux'\)"
    joint = "the gradient of the joint objective"
    if method != "joint":
        return head0
    # A NaN in the forward pass makes head 0's loss the first failure,
    # unless the compiled step's fused ReLU turned it into 0.
    return joint if gradient_only else f"({head0}|{joint})"


# ------------------------------------------------------------------ raise
@MODES
@pytest.mark.parametrize("method", METHODS)
def test_raise_names_step_and_head_restores_everything_and_goes_on(
    method, run_eagerly
):
    model = compiled_net(method, "raise", run_eagerly)
    twin = compiled_net(method, "raise", run_eagerly)
    (x0, y0), (x1, y1), (x2, y2) = good_batches(3)
    model.train_on_batch(x0, y0)
    model.train_on_batch(x1, y1)
    before = state(model)
    with pytest.raises(FloatingPointError) as error:
        model.train_on_batch(with_nan(x2), y2)
    message = str(error.value)
    assert message.startswith("nan_policy='raise': ")
    assert "is not finite at training step 2 " in message
    assert re.search(head_text(method), message), message
    assert_bitwise_equal(state(model), before)
    # Training goes on, as if the bad batch had never been given.
    model.train_on_batch(x2, y2)
    for x, y in ((x0, y0), (x1, y1), (x2, y2)):
        twin.train_on_batch(x, y)
    assert int(model.optimizer.iterations) == 3
    assert_bitwise_equal(state(model), state(twin))


@MODES
@pytest.mark.parametrize("method", ("mwbp", "joint"))
def test_raise_in_fit_names_the_step(method, run_eagerly):
    model = compiled_net(method, "raise", run_eagerly)
    twin = compiled_net(method, "raise", run_eagerly)
    good = good_batches(2)
    x, y = concat(good + [(with_nan(good[0][0], row=3, col=0), good[0][1])])
    with pytest.raises(FloatingPointError, match=r"at training step 2 "):
        model.fit(x, y, batch_size=B, shuffle=False, verbose=0)
    twin.fit(*concat(good), batch_size=B, shuffle=False, verbose=0)
    assert_bitwise_equal(state(model), state(twin))
    # A later fit counts on from there.
    with pytest.raises(FloatingPointError, match=r"at training step 4 "):
        model.fit(x, y, batch_size=B, shuffle=False, verbose=0)


@MODES
@pytest.mark.parametrize("method", METHODS)
def test_raise_on_a_nan_that_only_reaches_a_gradient(method, run_eagerly):
    model = clean_net(method, "raise", run_eagerly)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(B, 3)).astype("float32")
    y = rng.normal(size=(B, 1)).astype("float32")
    model.train_on_batch(x, y)
    before = state(model)
    x[4, 1] = np.nan
    # The loss itself is finite.
    assert np.isfinite(model.evaluate(x, y, batch_size=B, verbose=0)[0])
    with pytest.raises(FloatingPointError) as error:
        model.train_on_batch(x, y)
    message = str(error.value)
    assert "at training step 1 " in message
    assert re.search(
        head_text(method, gradient_only=True), message), message
    assert_bitwise_equal(state(model), before)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("method", METHODS)
def test_raise_on_a_non_finite_sample_weight(method, bad):
    """Finite inputs and labels, one NaN or infinite sample weight: head
    0's loss is the first non-finite value, in every method."""
    model = compiled_net(method, "raise", run_eagerly=False)
    (x0, y0), (x1, y1) = good_batches(2)
    model.train_on_batch(x0, y0)
    before = state(model)
    weights = np.ones(B, "float32")
    weights[5] = bad
    with pytest.raises(
        FloatingPointError,
        match=r"head 0 \('aux'\) is not finite at training step 1 ",
    ):
        model.train_on_batch(x1, y1, sample_weight=weights)
    assert_bitwise_equal(state(model), before)


# -------------------------------------------------------------- skip_step
@MODES
@pytest.mark.parametrize("method", METHODS)
@_TORCH_UNSEEDED_DROPOUT
def test_skip_step_changes_nothing_and_the_next_step_is_unaffected(
    method, run_eagerly
):
    """BatchNorm moving statistics, the dropout seed, optimizer states and
    iterations, metrics and loss trackers: all as before the bad batch.

    (`train_on_batch` resets the metrics before its step, so a skipped
    `train_on_batch` has seen no sample: its metrics read NaN, issue 9
    item 3.)"""
    kwargs = dict(dropout=True, run_eagerly=run_eagerly)
    model = compiled_net(method, "skip_step", **kwargs)
    twin = compiled_net(method, "skip_step", **kwargs)
    (x0, y0), (x1, y1) = good_batches(2, seed=3)
    logs = model.train_on_batch(x0, y0, return_dict=True)
    assert logs["loss"] > 0
    model.reset_metrics()  # What train_on_batch does first.
    before = state(model, metrics=True)
    skipped = model.train_on_batch(with_nan(x1), y1, return_dict=True)
    assert_bitwise_equal(state(model, metrics=True), before)
    assert int(model.optimizer.iterations) == 1
    assert skipped.keys() == logs.keys()
    for key in ("loss", "aux_loss", "final_loss", "aux_accuracy",
                "final_accuracy"):
        assert np.isnan(skipped[key]), key
    model.train_on_batch(x1, y1)
    twin.train_on_batch(x0, y0)
    twin.train_on_batch(x1, y1)
    assert_bitwise_equal(state(model, metrics=True),
                         state(twin, metrics=True))


@MODES
@pytest.mark.parametrize("method", METHODS)
@_TORCH_UNSEEDED_DROPOUT
def test_skip_step_in_fit_logs_and_trains_as_without_the_bad_batch(
    method, run_eagerly
):
    """fit over [good, bad, good] logs the mean over the two good batches
    and ends with the weights of a fit over [good, good]."""
    kwargs = dict(dropout=True, run_eagerly=run_eagerly)
    model = compiled_net(method, "skip_step", **kwargs)
    twin = compiled_net(method, "skip_step", **kwargs)
    good = good_batches(2, seed=4)
    bad = (with_nan(good[1][0], row=0, col=1), good[1][1])
    history = model.fit(*concat([good[0], bad, good[1]]), batch_size=B,
                        shuffle=False, verbose=0).history
    expected = twin.fit(*concat(good), batch_size=B, shuffle=False,
                        verbose=0).history
    assert history.keys() == expected.keys()
    for key in expected:
        if key != "skipped_steps":
            assert history[key] == expected[key], key
    assert (history["skipped_steps"], expected["skipped_steps"]) == ([1], [0])
    assert np.isfinite(history["loss"][0])
    assert int(model.optimizer.iterations) == 2
    assert_bitwise_equal(state(model), state(twin))


# ------------------------------------------------------------------- zero
def zero_policy_expectation(model, x, y, method, lr=0.1):
    """The hand-computed step of `clean_net` (float64): t's gradient with
    the NaN entries set to 0 (what "zero" applies), and the heads'."""
    t = model.get_layer("t").kernel.numpy().astype("float64")
    w_a = model.get_layer("aux").kernel.numpy().astype("float64")
    w_f = model.get_layer("final").kernel.numpy().astype("float64")
    x = x.astype("float64")
    y = y.astype("float64")
    n = len(x)
    h = x @ t
    nan_h = np.isnan(h)
    z = np.where(nan_h, 0.0, h)
    # d loss / d output for each head: gamma * 2 / n * (prediction - y);
    # "standard" trains only the final head, unweighted.
    g_aux, g_final = (0.0, 1.0) if method == "standard" else (0.5, 1.0)
    d_a = g_aux * 2.0 / n * (z @ w_a - y)
    d_f = g_final * 2.0 / n * (z @ w_f - y)
    d_h = np.where(nan_h, 0.0, d_a @ w_a.T + d_f @ w_f.T)
    with np.errstate(invalid="ignore"):
        grad_t = x.T @ d_h  # NaN in the rows of the NaN features
    nan_rows = np.isnan(grad_t)
    grad_t = np.where(nan_rows, 0.0, grad_t)
    return {
        "t": t - lr * grad_t,
        "aux": w_a - lr * (z.T @ d_a),
        "final": w_f - lr * (z.T @ d_f),
    }, nan_rows


@MODES
@pytest.mark.parametrize("method", ("joint", "standard"))
def test_zero_replaces_nan_gradient_entries_by_zero(method, run_eagerly):
    model = clean_net(method, "zero", run_eagerly)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(B, 3)).astype("float32")
    y = rng.normal(size=(B, 1)).astype("float32")
    x[2, 0] = np.nan  # Feature 0 of sample 2: row 0 of t's gradient is NaN.
    before = {name: model.get_layer(name).kernel.numpy()
              for name in ("t", "aux", "final")}
    expected, nan_rows = zero_policy_expectation(model, x, y, method)
    assert nan_rows[0].all() and not nan_rows[1:].any()
    logs = model.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"])
    after = {name: model.get_layer(name).kernel.numpy()
             for name in ("t", "aux", "final")}
    # The NaN row did not move at all; the others took the plain SGD step.
    assert np.array_equal(after["t"][0], before["t"][0])
    assert not np.array_equal(after["t"][1:], before["t"][1:])
    for name in ("t", "aux", "final"):
        np.testing.assert_allclose(after[name], expected[name], rtol=1e-5,
                                   atol=1e-7, err_msg=name)
    if method == "standard":
        assert np.array_equal(after["aux"], before["aux"])
    assert int(model.optimizer.iterations) == 1


@MODES
def test_zero_keeps_infinite_gradients(run_eagerly):
    """Only NaN entries are replaced: an input of 1e30 makes the loss and
    some gradients infinite, and the step applies them."""
    model = clean_net("joint", "zero", run_eagerly)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(B, 3)).astype("float32")
    y = rng.normal(size=(B, 1)).astype("float32")
    x[2, 0] = 1e30
    before = model.get_layer("t").kernel.numpy()
    logs = model.train_on_batch(x, y, return_dict=True)
    assert np.isinf(logs["loss"])
    after = model.get_layer("t").kernel.numpy()
    assert np.isinf(after[0]).all()  # Row 0: x[2, 0] times a huge delta.
    assert np.isfinite(after[1:]).all()
    assert not np.array_equal(after[1:], before[1:])


# ------------------------------------------------------- tf.distribute
MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import keras_mwbp

    L = keras.layers
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,))
        x = L.BatchNormalization(name="bn")(L.Dense(3, name="d1")(inputs))
        x = L.ReLU()(x)
        aux = L.Dense(2, name="aux")(x)
        x = L.Dense(3, activation="relu", name="d2")(x)
        final = L.Dense(2, name="final")(x)
        model = keras_mwbp.MultiWayModel(
            inputs, [aux, final], method="mwbp", nan_policy="skip_step")
        model.compile(
            keras.optimizers.SGD(0.1, momentum=0.9),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    def values():
        # Every replica's copy of every model and optimizer variable.
        out = []
        for v in list(model.variables) + list(model.optimizer.variables):
            for local in strategy.experimental_local_results(v.value):
                out.append(np.array(local))
        return out

    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.integers(0, 2, 16)
    model.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    before = values()
    bad = x.copy()
    bad[0, 1] = np.nan  # In the first replica's half of the batch only.
    model.fit(bad, y, batch_size=16, shuffle=False, verbose=0)
    after = values()
    skipped_iterations = int(model.optimizer.iterations.numpy())
    model.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "num_variables": len(model.variables) + len(
            model.optimizer.variables),
        "num_values": len(before),
        "differ": [i for i, (a, b) in enumerate(zip(before, after))
                   if not np.array_equal(a, b)],
        "iterations_after_skip": skipped_iterations,
        "iterations": int(model.optimizer.iterations.numpy()),
        "finite_after": all(np.isfinite(v).all() for v in values()),
    }))
    """
)


@tensorflow_only  # tf.distribute.MirroredStrategy
def test_skip_step_under_mirrored_strategy_changes_no_replica():
    """Two replicas, a NaN in one replica's half of the batch: both skip
    the step (the finiteness flags are all-reduced), and every replica's
    copy of every variable is unchanged."""
    completed = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT],
        cwd=pathlib.Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert result["num_values"] == 2 * result["num_variables"]
    assert result["differ"] == []
    assert result["iterations_after_skip"] == 1
    assert result["iterations"] == 2
    assert result["finite_after"]


@pytest.mark.parametrize(
    "policy", [pytest.param("raise", marks=_TORCH_BN_NAN), "skip_step"])
def test_infinite_batchnorm_statistics_are_caught(policy):
    """Finite losses and gradients, but an extreme input makes the new
    moving variance infinite: the step is undone (and named under raise)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    x = keras.layers.Dense(3)(inputs)
    bn = keras.layers.BatchNormalization()
    x = keras.layers.ReLU()(bn(x))
    aux = keras.layers.Dense(2, name="aux")(x)
    final = keras.layers.Dense(2, name="final")(keras.layers.Dense(3)(x))
    model = MultiWayModel(inputs, [aux, final], nan_policy=policy)
    model.compile(
        "sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).random((8, 4)).astype("float32")
    x[5] = 1e30
    before = [keras.ops.convert_to_numpy(v) for v in model.variables]
    if policy == "raise":
        with pytest.raises(FloatingPointError, match=re.escape(
                "the layers' new state (e.g. BatchNorm statistics) is not "
                "finite at training step 0")):
            model.train_on_batch(x, np.zeros(8, int))
    else:
        model.train_on_batch(x, np.zeros(8, int))
    for got, want in zip(model.variables, before):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(got), want)
    np.testing.assert_array_equal(bn.moving_variance.numpy(), np.ones(3))


def test_skip_step_counts_skipped_steps_per_epoch():
    """`skipped_steps` in the training logs counts the epoch's skipped
    steps; validation logs do not carry it."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    x = keras.layers.Dense(3, activation="relu")(inputs)
    aux = keras.layers.Dense(2, name="aux")(x)
    final = keras.layers.Dense(2, name="final")(keras.layers.Dense(3)(x))
    model = MultiWayModel(inputs, [aux, final], nan_policy="skip_step")
    model.compile(
        "sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    data = np.random.default_rng(0).random((32, 4)).astype("float32")
    data[[3, 5, 20]] = np.nan  # batches 0 and 2 of 8 samples
    labels = np.zeros(32, int)
    history = model.fit(
        data, labels, batch_size=8, epochs=2, shuffle=False, verbose=0,
        validation_data=(np.zeros((8, 4), "float32"), labels[:8]),
    ).history
    assert history["skipped_steps"] == [2.0, 2.0]
    assert "val_skipped_steps" not in history
    assert np.isfinite(history["loss"]).all()
