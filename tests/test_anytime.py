"""Anytime prediction: routing, gather/scatter, costs, calibration, saving,
bad input. References are hand-written NumPy."""

import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
from keras import ops

from conftest import mlp_model
from keras_mwbp import anytime
from keras_mwbp.anytime.routing import ExitPlan
from keras_mwbp.report import count_multiply_adds

NUM_CLASSES = 3


# ------------------------------------------------------------ references
def np_softmax(z):
    z = np.asarray(z, dtype="float64")
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def np_confidence(logits, temperature=1.0, kind="max_prob"):
    p = np_softmax(np.asarray(logits, "float64") / temperature)
    if kind == "max_prob":
        return p.max(axis=-1)
    h = -(p * np.log(np.maximum(p, 1e-300))).sum(axis=-1)
    return 1.0 - h / np.log(p.shape[-1])


def np_route(heads, thresholds, temperature=1.0, kind="max_prob"):
    """Exit head of each sample, by a loop over samples and heads."""
    n = len(heads[0])
    exits = np.full(n, len(heads) - 1)
    for j in range(n):
        for i in range(len(heads) - 1):
            c = np_confidence(heads[i][j:j + 1], temperature, kind)[0]
            if c >= thresholds[i]:
                exits[j] = i
                break
    return exits


def gap_threshold(conf, quantile):
    """A threshold near `quantile` of `conf`, halfway across a gap wider than
    1e-4 between consecutive values (so float32 noise cannot flip a
    sample)."""
    values = np.sort(conf)
    start = int(quantile * (len(values) - 1))
    for k in list(range(start, len(values) - 1)) + list(range(start)):
        if values[k + 1] - values[k] > 1e-4:
            return float((values[k] + values[k + 1]) / 2)
    raise AssertionError("no gap")


def data(n=64, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32") * 3
    y = rng.integers(0, NUM_CLASSES, size=n)
    return x, y


@keras.saving.register_keras_serializable(package="test_anytime")
class Counter(keras.layers.Layer):
    """Identity that counts the samples it sees."""

    def build(self, shape):
        self.seen = self.add_weight(shape=(), initializer="zeros",
                                    trainable=False, name="seen")

    def call(self, x):
        self.seen.assign(self.seen + ops.cast(ops.shape(x)[0], "float32"))
        return x


def counted_model(seed=0):
    """mlp_graph with a Counter at the start of segments 1 and 2."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((6,))
    a1 = layers.Dense(4, activation="relu", name="d1")(inputs)
    h0 = layers.Dense(NUM_CLASSES, name="h0")(a1)
    c1 = Counter(name="c1")(a1)
    a2 = layers.Dense(4, activation="relu", name="d2")(c1)
    h1 = layers.Dense(NUM_CLASSES, name="h1")(a2)
    c2 = Counter(name="c2")(a2)
    a3 = layers.Dense(4, activation="relu", name="d3")(c2)
    final = layers.Dense(NUM_CLASSES, name="final")(a3)
    return keras.Model(inputs, [h0, h1, final])


def seen(model, name):
    return float(ops.convert_to_numpy(model.get_layer(name).seen))


def mid_thresholds(model, x, kind="max_prob", temperature=1.0):
    heads = [np.asarray(h) for h in model.predict(x, verbose=0)]
    t = [gap_threshold(np_confidence(heads[i], temperature, kind), q)
         for i, q in ((0, 0.5), (1, 0.4))]
    return heads, t + [0.0]


# ------------------------------------------------------------ routing
@pytest.mark.parametrize("kind, temperature", [("max_prob", 1.0),
                                               ("entropy", 0.5)])
def test_predictions_equal_routing_of_full_model_logits(kind, temperature):
    model = mlp_model("joint")
    x, _ = data(64)  # 4 batches of 16: one trace per output mode.
    heads, thresholds = mid_thresholds(model, x, kind, temperature)
    fast = anytime.AnytimeModel(model, thresholds, temperature=temperature,
                                confidence=kind)
    expected_exits = np_route(heads, thresholds, temperature, kind)
    # Every head gets samples: the routing is exercised at each stage.
    assert set(expected_exits) == {0, 1, 2}
    expected = np.stack(heads)[expected_exits, np.arange(len(x))]
    exits = fast.exit_index(x, batch_size=16)
    logits = fast.predict(x, batch_size=16, verbose=0)
    np.testing.assert_array_equal(exits, expected_exits)
    np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)
    eager_logits, eager_exits = fast.route(x)  # Eager: Python branches.
    np.testing.assert_array_equal(np.asarray(eager_exits), expected_exits)
    np.testing.assert_allclose(np.asarray(eager_logits), expected,
                               rtol=1e-6, atol=1e-6)


def test_segments_run_only_on_undecided_samples():
    model = counted_model()
    x, _ = data(64)
    heads, thresholds = mid_thresholds(model, x)
    exits = np_route(heads, thresholds)
    reach_1, reach_2 = int(np.sum(exits >= 1)), int(np.sum(exits == 2))
    assert 0 < reach_2 < reach_1 < len(x)
    fast = anytime.AnytimeModel(model, thresholds)
    before = seen(model, "c1"), seen(model, "c2")
    fast.predict(x, batch_size=len(x), verbose=0)  # Compiled (tf.function).
    assert seen(model, "c1") - before[0] == reach_1
    assert seen(model, "c2") - before[1] == reach_2
    fast.route(x)  # Eager.
    assert seen(model, "c1") - before[0] == 2 * reach_1
    assert seen(model, "c2") - before[1] == 2 * reach_2
    # Everyone exits at head 0: the later segments do not run at all.
    everyone = anytime.AnytimeModel(model, [0.0, 0.0, 0.0])
    counts = seen(model, "c1"), seen(model, "c2")
    out = everyone.predict(x, batch_size=len(x), verbose=0)
    assert (seen(model, "c1"), seen(model, "c2")) == counts
    np.testing.assert_allclose(out, heads[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(everyone.exit_index(x), np.zeros(len(x)))


def test_thresholds_of_one_route_everything_to_confident_or_final():
    model = mlp_model("joint")
    x, _ = data(32)
    heads = [np.asarray(h) for h in model.predict(x, verbose=0)]
    fast = anytime.AnytimeModel(model, [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(fast.exit_index(x), np_route(heads, [1.0] * 3))
    assert set(fast.exit_index(x)) == {2}  # No softmax of these reaches 1.


def test_exit_costs_count_segments_as_report_does():
    model = mlp_model("joint")
    plan = ExitPlan(model)
    # d1 6x4, h0 4x3 | d2 4x4, h1 4x3 | d3 4x4, final 4x3.
    assert plan.exit_costs == (36, 64, 92)
    assert plan.head_costs == (36, 52, 68)  # final: 24 + 16 + 16 + 12
    assert plan.exit_costs[-1] == count_multiply_adds(model)
    for i in range(3):
        assert plan.head_costs[i] == count_multiply_adds(model.exit_model(i))


def test_exit_costs_of_a_zoo_resnet():
    from keras_mwbp.models import cifar_resnet

    model = cifar_resnet(8, num_losses=2, input_shape=(8, 8, 1))
    plan = ExitPlan(model)
    assert plan.exit_costs[0] == count_multiply_adds(model.exit_model(0))
    assert plan.exit_costs[-1] == count_multiply_adds(model)
    assert plan.head_costs[1] == count_multiply_adds(model.exit_model(1))
    # Exiting at the final head also pays for head 0's dense layer.
    head_0_dense = model.get_layer("head_0_dense")
    assert plan.exit_costs[1] - plan.head_costs[1] == (
        head_0_dense.kernel.shape[0] * head_0_dense.kernel.shape[1]
    )


# ------------------------------------------------------------ calibration
def logit_model(num_heads=3, num_classes=NUM_CLASSES, width=4):
    """A model whose head i outputs slice i of its input: the logits are the
    data. Trunk Dense layers of `width` units give each segment a cost."""
    layers = keras.layers
    size = num_heads * num_classes
    inputs = keras.Input((size,))
    x = inputs
    outputs = []
    for i in range(num_heads):
        pick = np.zeros((size, num_classes), "float32")
        pick[i * num_classes:(i + 1) * num_classes] = np.eye(num_classes)
        outputs.append(layers.Dense(
            num_classes, use_bias=False, name=f"pick_{i}",
            kernel_initializer=keras.initializers.Constant(pick))(inputs))
        x = layers.Dense(width * (i + 1), name=f"trunk_{i}")(x)
        # Each trunk layer feeds the next head's cost but not its logits.
        outputs[-1] = layers.Add(name=f"out_{i}")(
            [outputs[-1], layers.Dense(
                num_classes, kernel_initializer="zeros", use_bias=False,
                name=f"zero_{i}")(x)])
    return keras.Model(inputs, outputs)


def logit_data(num_heads, n, seed=0, num_classes=NUM_CLASSES):
    """Per-head logits, deeper heads more often right; labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, size=n)
    heads = []
    for i in range(num_heads):
        z = rng.normal(size=(n, num_classes)) * 1.5
        z[np.arange(n), y] += 0.8 + 1.2 * i
        heads.append(z.astype("float32"))
    return np.concatenate(heads, axis=1), y, heads


def np_evaluate(heads, y, thresholds, costs):
    exits = np_route(heads, thresholds)
    pred = np.stack([h.argmax(-1) for h in heads])[exits, np.arange(len(y))]
    return (float(np.mean(pred == y)), float(np.mean(np.asarray(costs)[exits])),
            np.bincount(exits, minlength=len(heads)) / len(y))


def np_candidates(conf):
    v = np.unique(conf)
    top = (v[-1] + 1) / 2 if v[-1] < 1 else 1.0
    return np.concatenate([[0.0], (v[:-1] + v[1:]) / 2, [top]])


def check_result(result, heads, y, costs):
    acc, madds, fractions = np_evaluate(heads, y, result.thresholds, costs)
    assert result.accuracy == pytest.approx(acc, abs=1e-12)
    assert result.multiply_adds == pytest.approx(madds, rel=1e-12)
    np.testing.assert_allclose(result.exit_fractions, fractions, atol=1e-12)
    assert result.final_accuracy == pytest.approx(
        np.mean(heads[-1].argmax(-1) == y))
    return acc, madds


def test_max_drop_with_two_heads_is_the_brute_force_optimum():
    model = logit_model(2)
    x, y, heads = logit_data(2, 60)
    costs = ExitPlan(model).exit_costs
    for drop in (0.0, 0.05, 0.2):
        result = anytime.calibrate(model, (x, y), max_accuracy_drop=drop)
        acc, madds = check_result(result, heads, y, costs)
        final = np.mean(heads[-1].argmax(-1) == y)
        best = min(
            (np_evaluate(heads, y, [t, 0.0], costs)[1], t)
            for t in np_candidates(np_confidence(heads[0]))
            if np_evaluate(heads, y, [t, 0.0], costs)[0] >= final - drop - 1e-12
        )
        assert madds == pytest.approx(best[0], rel=1e-12)
        assert acc >= final - drop - 1e-12


def test_budget_with_two_heads_is_the_brute_force_optimum():
    model = logit_model(2)
    x, y, heads = logit_data(2, 60, seed=3)
    costs = ExitPlan(model).exit_costs
    for budget in (costs[0], (costs[0] + costs[1]) / 2, costs[1] * 0.9):
        result = anytime.calibrate(model, (x, y), budget=budget)
        acc, madds = check_result(result, heads, y, costs)
        assert madds <= budget
        best = max(
            np_evaluate(heads, y, [t, 0.0], costs)[0]
            for t in np_candidates(np_confidence(heads[0]))
            if np_evaluate(heads, y, [t, 0.0], costs)[1] <= budget
        )
        assert acc == pytest.approx(best, abs=1e-12)


def test_three_heads_meet_the_target_and_are_locally_optimal():
    model = logit_model(3)
    x, y, heads = logit_data(3, 80, seed=5)
    costs = ExitPlan(model).exit_costs
    final = np.mean(heads[-1].argmax(-1) == y)
    drop = 0.03
    result = anytime.calibrate(model, (x, y), max_accuracy_drop=drop)
    acc, madds = check_result(result, heads, y, costs)
    assert acc >= final - drop - 1e-12
    assert madds < costs[-1]  # Some samples exit early.
    # No single threshold move to a candidate is feasible and cheaper.
    for i in range(2):
        for t in np_candidates(np_confidence(heads[i])):
            trial = list(result.thresholds)
            trial[i] = t
            a, m, _ = np_evaluate(heads, y, trial, costs)
            assert not (a >= final - drop - 1e-12 and m < madds - 1e-9)
    # And it is no worse than the best threshold shared by both heads.
    shared = [
        np_evaluate(heads, y, [t, t, 0.0], costs)
        for t in np.unique(np.concatenate(
            [np_candidates(np_confidence(h)) for h in heads[:2]]))
    ]
    assert madds <= min(m for a, m, _ in shared if a >= final - drop - 1e-12)


def test_geometric_shares_exit_as_msdnet_prescribes():
    model = logit_model(3)
    x, y, heads = logit_data(3, 70, seed=7)
    costs = ExitPlan(model).exit_costs
    result = anytime.calibrate(model, (x, y), shares="geometric")
    check_result(result, heads, y, costs)
    # ratio 0.5: shares 4/7, 2/7, 1/7 of 70 samples.
    np.testing.assert_allclose(result.exit_fractions, [40 / 70, 20 / 70,
                                                       10 / 70])
    np.testing.assert_allclose(anytime.geometric_shares(3, 0.5),
                               [4 / 7, 2 / 7, 1 / 7])
    explicit = anytime.calibrate(model, (x, y), shares=[0.5, 0.3, 0.2])
    np.testing.assert_allclose(explicit.exit_fractions, [0.5, 0.3, 0.2])
    # With a budget, the largest ratio whose cost fits.
    budget = (costs[0] + costs[2]) / 2
    fitted = anytime.calibrate(model, (x, y), shares="geometric",
                               budget=budget)
    _, madds = check_result(fitted, heads, y, costs)
    assert madds <= budget
    assert madds > result.multiply_adds  # More than ratio 0.5 costs.


def test_calibrated_accuracy_is_what_the_anytime_model_gets():
    model = mlp_model("joint", seed=2)
    x, y = data(90, seed=4)
    result = anytime.calibrate(model, (x, y), max_accuracy_drop=0.05)
    fast = anytime.AnytimeModel(model, result)
    logits = fast.predict(x, verbose=0)
    assert np.mean(logits.argmax(-1) == y) == pytest.approx(result.accuracy)
    exits = fast.exit_index(x)
    np.testing.assert_allclose(
        np.bincount(exits, minlength=3) / len(x), result.exit_fractions)
    assert result.multiply_adds == pytest.approx(
        np.mean(np.asarray(fast.exit_costs)[exits]))


def test_entropy_confidence_matches_numpy():
    logits = np.random.default_rng(0).normal(size=(20, 5)).astype("float32")
    for kind in anytime.CONFIDENCES:
        for temperature in (1.0, 0.3):
            got = ops.convert_to_numpy(
                anytime.confidence(logits, temperature, kind))
            np.testing.assert_allclose(
                got, np_confidence(logits, temperature, kind), atol=2e-6)


def test_temperature_fit_minimizes_nll_and_warns_on_shared_data():
    from scipy.optimize import minimize_scalar

    model = logit_model(2)
    x, y, heads = logit_data(2, 200, seed=9)
    x_t, y_t, heads_t = logit_data(2, 200, seed=10)

    def nll(temperature):
        return np.mean([
            -np.mean(np.log(np_softmax(h / temperature)[np.arange(200), y_t]))
            for h in heads_t
        ])

    expected = minimize_scalar(nll, bounds=(0.05, 20), method="bounded",
                               options={"xatol": 1e-8}).x
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # A separate split: no warning.
        result = anytime.calibrate(model, (x, y), max_accuracy_drop=0.1,
                                   temperature="fit",
                                   temperature_data=(x_t, y_t))
    assert result.temperature == pytest.approx(expected, rel=1e-4)
    assert result.temperature != pytest.approx(1.0, abs=0.05)
    for same in (None, (x, y), (x.copy(), y)):
        with pytest.warns(UserWarning, match="same samples"):
            anytime.calibrate(model, (x, y), max_accuracy_drop=0.1,
                              temperature="fit", temperature_data=same)


# ------------------------------------------------------------ saving
def test_keras_file_round_trip_loads_in_safe_mode(tmp_path):
    model = mlp_model("joint", seed=4)
    x, y = data(60, seed=8)
    result = anytime.calibrate(model, (x, y), budget=70.0, temperature=1.7,
                               confidence="entropy")
    fast = anytime.AnytimeModel(model, result)
    assert fast.thresholds == result.thresholds
    assert (fast.temperature, fast.confidence) == (1.7, "entropy")
    expected = fast.predict(x, verbose=0)
    path = str(tmp_path / "anytime.keras")
    fast.save(path)
    np.save(tmp_path / "x.npy", x)
    # A fresh process: only the registration of keras_mwbp.anytime, Keras's
    # default safe_mode=True.
    script = (
        "import numpy as np, keras\n"
        "import keras_mwbp.anytime\n"
        f"m = keras.saving.load_model({path!r}, safe_mode=True)\n"
        "assert type(m).__name__ == 'AnytimeModel', type(m)\n"
        "print(repr(list(m.thresholds)), m.temperature, m.confidence)\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, m.predict(x, verbose=0))\n"
        f"np.save({str(tmp_path / 'exits.npy')!r}, m.exit_index(x))\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == (
        f"{list(result.thresholds)!r} 1.7 entropy")
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.load(tmp_path / "exits.npy"),
                                  fast.exit_index(x))


# ------------------------------------------------------------ bad input
def one_head_model():
    inputs = keras.Input((6,))
    return keras.Model(inputs, [keras.layers.Dense(3)(inputs)])


@pytest.mark.parametrize("thresholds, message", [
    ([0.5, 0.5], r"`thresholds` must hold one entry per head \(3 for this "
                 r"model.*Received: thresholds=\[0\.5, 0\.5\] \(2 entries\)"),
    ([0.5, 1.5, 0.0], r"`thresholds` must be confidences in \[0, 1\]\. "
                      r"Received: thresholds\[1\]=1\.5"),
    ([-0.1, 0.5, 0.0], r"Received: thresholds\[0\]=-0\.1"),
    (0.5, r"`thresholds` must be a sequence of 3 numbers"),
])
def test_bad_thresholds(thresholds, message):
    model = mlp_model("joint")
    with pytest.raises(ValueError, match=message):
        anytime.AnytimeModel(model, thresholds)


def test_one_head_model_is_refused():
    model = one_head_model()
    x, y = data(10)
    message = r"`model` must have at least two heads.*with 1 head\(s\)"
    with pytest.raises(ValueError, match=message):
        anytime.AnytimeModel(model, [0.5])
    with pytest.raises(ValueError, match=message):
        anytime.calibrate(model, (x, y), max_accuracy_drop=0.01)


@pytest.mark.parametrize("calibration_data, message", [
    ((np.zeros((0, 6), "float32"), np.zeros((0,), "int64")),
     r"`data` must hold at least one sample"),
    ((np.ones((5, 6), "float32"), np.full((5,), 2)),
     r"`data` must hold samples of at least two classes.*5 samples, all "
     r"of class 2"),
    ((np.ones((5, 6), "float32"), np.arange(4) % 2),
     r"`data` must hold one label per input\. Received 4 labels for 5"),
    ([1, 2, 3], r"`data` must be an `\(x, y\)` tuple"),
])
def test_bad_calibration_data(calibration_data, message):
    with pytest.raises(ValueError, match=message):
        anytime.calibrate(mlp_model("joint"), calibration_data,
                          max_accuracy_drop=0.01)


def test_unreachable_budget_names_the_first_head_cost():
    model = mlp_model("joint")
    with pytest.raises(ValueError, match=(
            r"`budget` cannot be met: it is below the cost of exiting at the "
            r"first head, 36 multiply-adds per sample \(the final head costs "
            r"92\)\. Received: budget=35\.0")):
        anytime.calibrate(model, data(10), budget=35.0)


@pytest.mark.parametrize("kwargs, message", [
    ({}, r"Give exactly one target"),
    ({"max_accuracy_drop": 0.01, "budget": 50.0}, r"Give exactly one target"),
    ({"max_accuracy_drop": 1.5}, r"`max_accuracy_drop` must be a fraction "
                                 r"in \[0, 1\].*Received: "
                                 r"max_accuracy_drop=1\.5"),
    ({"budget": -1.0}, r"`budget` must be a positive finite number\. "
                       r"Received: budget=-1\.0"),
    ({"shares": "linear"}, r"`shares` must be \"geometric\""),
    ({"shares": [0.5, 0.6, 0.0]}, r"`shares` must hold 3 non-negative "
                                  r"fractions"),
    ({"budget": 50.0, "shares": [0.5, 0.5, 0.0]}, r"Give exactly one target"),
    ({"max_accuracy_drop": 0.1, "confidence": "margin"},
     r"`confidence` must be one of \('max_prob', 'entropy'\)\. Received: "
     r"confidence='margin'"),
    ({"max_accuracy_drop": 0.1, "temperature": 0.0},
     r"`temperature` must be a positive finite number\. Received: "
     r"temperature=0\.0"),
    ({"max_accuracy_drop": 0.1, "temperature": "auto"},
     r'`temperature` must be None, a positive number or "fit"'),
    ({"max_accuracy_drop": 0.1, "temperature_data": (1, 2)},
     r'`temperature_data` is only read with temperature="fit"'),
    ({"shares": "geometric", "geometric_ratio": 0},
     r"`geometric_ratio` must be a positive finite number"),
])
def test_bad_calibrate_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        anytime.calibrate(mlp_model("joint"), data(10), **kwargs)


def test_bad_anytime_model_arguments():
    model = mlp_model("joint")
    with pytest.raises(ValueError, match=r"`temperature` must be a positive"):
        anytime.AnytimeModel(model, [0.5] * 3, temperature=-2)
    with pytest.raises(ValueError, match=r"`confidence` must be one of"):
        anytime.AnytimeModel(model, [0.5] * 3, confidence="top")
    with pytest.raises(ValueError, match=r"`model` must be a functional"):
        anytime.AnytimeModel("model.keras", [0.5] * 3)
    fast = anytime.AnytimeModel(model, [0.5] * 3)
    with pytest.raises(ValueError, match=r"inference only.*training=True"):
        fast(data(4)[0], training=True)


# ------------------------------------------------------------ JAX
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_other_backends_route_exactly_and_load_the_file(tmp_path, backend):
    pytest.importorskip(backend)
    model = mlp_model("joint", seed=6)
    x, _ = data(70, seed=11)
    heads, thresholds = mid_thresholds(model, x)
    exits = np_route(heads, thresholds)
    assert set(exits) == {0, 1, 2}
    fast = anytime.AnytimeModel(model, thresholds)
    path = str(tmp_path / "anytime.keras")
    fast.save(path)  # Saved with TensorFlow, run with `backend`.
    np.save(tmp_path / "x.npy", x)
    script = (
        "import numpy as np, keras\n"
        "import keras_mwbp.anytime\n"
        f"assert keras.backend.backend() == {backend!r}\n"
        f"m = keras.saving.load_model({path!r})\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        # torch: the routing records no autograd graph.
        "assert not getattr(m.route(x[:8])[0], 'requires_grad', False)\n"
        f"np.save({str(tmp_path / 'logits.npy')!r}, "
        "m.predict(x, batch_size=32, verbose=0))\n"
        f"np.save({str(tmp_path / 'exits.npy')!r}, "
        "m.exit_index(x, batch_size=32))\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND=backend)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "exits.npy"), exits)
    np.testing.assert_allclose(
        np.load(tmp_path / "logits.npy"),
        np.stack(heads)[exits, np.arange(len(x))], rtol=1e-5, atol=1e-5)
