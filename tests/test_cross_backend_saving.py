"""`.keras` files move between the TensorFlow and JAX backends.

A `MultiWayModel` (BatchNorm, a residual add, three heads, MW-BP with one
Adam per loss and a decaying learning rate) is trained for two steps under
one backend and saved; the file is loaded under the other backend and trained
on for three steps. The result equals training on in the first backend
within float32 round-off, in both directions, with every weight, BatchNorm
statistic and per-loss optimizer state (moments, step counts) carried over.
Each backend runs in its own process. The convolutions in front of a
BatchNorm have no bias: its true gradient is zero, and Adam turns a gradient
of pure round-off into a step of the learning rate's size, which differs
between backends beyond any round-off tolerance.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("tensorflow")

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import keras
    import keras_mwbp

    mode, path, out = sys.argv[1:4]
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(8, 6, 6, 2)).astype("float32"),
                rng.integers(0, 3, 8)) for _ in range(5)]

    def build():
        keras.utils.set_random_seed(0)
        layers = keras.layers
        inputs = keras.Input((6, 6, 2))
        a = layers.ReLU()(layers.BatchNormalization(name="bn1")(
            layers.Conv2D(4, 3, padding="same", use_bias=False, name="c1")(
                inputs)))
        b = layers.BatchNormalization(name="bn2")(
            layers.Conv2D(4, 3, padding="same", use_bias=False, name="c2")(a))
        a = layers.ReLU()(layers.Add()([a, b]))
        h0 = layers.Dense(3, name="h0")(layers.GlobalAveragePooling2D()(a))
        a = layers.ReLU()(layers.Conv2D(4, 3, padding="same", name="c3")(a))
        h1 = layers.Dense(3, name="h1")(layers.GlobalAveragePooling2D()(a))
        a = layers.ReLU()(layers.Conv2D(4, 3, padding="same", name="c4")(a))
        final = layers.Dense(3, name="final")(
            layers.GlobalAveragePooling2D()(a))
        model = keras_mwbp.MultiWayModel(inputs, [h0, h1, final],
                                         method="mwbp", nu=2.0)
        schedule = keras.optimizers.schedules.ExponentialDecay(
            0.01, decay_steps=1, decay_rate=0.8)
        model.compile(keras.optimizers.Adam(schedule),
                      keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True))
        return model

    def train(model, steps):
        for x, y in steps:
            model.train_on_batch(x, y)

    def state(model):
        return {
            "weights": [w.tolist() for w in model.get_weights()],
            "optimizer": [np.asarray(keras.ops.convert_to_numpy(v)).tolist()
                          for v in model.optimizer.variables],
        }

    result = {"backend": keras.backend.backend()}
    if mode == "start":
        model = build()
        train(model, batches[:2])
        model.save(path)
        result["saved"] = state(model)
    else:
        model = keras.saving.load_model(path)
        result["loaded"] = state(model)
    train(model, batches[2:])
    result["continued"] = state(model)
    with open(out, "w") as f:
        json.dump(result, f)
    """
)


def _run(backend, mode, path, out):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("JAX_ENABLE_X64", None)
    subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, str(path), str(out)],
        cwd=ROOT, env=env, check=True, timeout=600,
        capture_output=True, text=True,
    )
    with open(out) as f:
        return json.load(f)


def _assert_close(actual, expected, what, rtol=0.0, atol=0.0):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(
            np.asarray(a, dtype="float64"), np.asarray(e, dtype="float64"),
            rtol=rtol, atol=atol, err_msg=f"{what} {i}",
        )


@pytest.mark.parametrize(
    "first, second", [("tensorflow", "jax"), ("jax", "tensorflow")]
)
def test_keras_file_trains_on_in_the_other_backend(tmp_path, first, second):
    path = tmp_path / "model.keras"
    started = _run(first, "start", path, tmp_path / "first.json")
    resumed = _run(second, "resume", path, tmp_path / "second.json")
    assert (started["backend"], resumed["backend"]) == (first, second)
    # Loaded exactly: weights and every optimizer variable (the container's
    # step count, each per-loss Adam's moments and step count); `nu` and the
    # loss weights are float64 variables, which JAX without JAX_ENABLE_X64
    # holds in float32 (hence rtol 1e-7).
    _assert_close(resumed["loaded"]["weights"], started["saved"]["weights"],
                  "loaded weight", rtol=1e-7)
    _assert_close(resumed["loaded"]["optimizer"],
                  started["saved"]["optimizer"], "loaded optimizer variable")
    counts = [v for v in started["saved"]["optimizer"] if np.ndim(v) == 0]
    assert 2 in counts  # Step counters are among the carried state.
    # Trained on: equal to the first backend's continued run to round-off.
    _assert_close(resumed["continued"]["weights"],
                  started["continued"]["weights"], "continued weight",
                  rtol=1e-4, atol=1e-5)
    _assert_close(resumed["continued"]["optimizer"],
                  started["continued"]["optimizer"],
                  "continued optimizer variable", rtol=1e-4, atol=1e-6)
    # The continued runs moved the weights well beyond that tolerance.
    moved = max(
        float(np.max(np.abs(np.subtract(a, b))))
        for a, b in zip(started["continued"]["weights"],
                        started["saved"]["weights"])
    )
    assert moved > 1e-3
