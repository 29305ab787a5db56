"""Anytime prediction: serving exports, the curve and `keras-mwbp
calibrate`."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import mlp_model
from keras_mwbp import anytime
from keras_mwbp.anytime import serving
from keras_mwbp.report import count_multiply_adds
from test_anytime import counted_model
from test_anytime import data
from test_anytime import mid_thresholds
from test_anytime import np_confidence
from test_anytime import np_route
from test_anytime import seen


def routed_model():
    model = counted_model(seed=1)
    x, _ = data(40, seed=2)
    heads, thresholds = mid_thresholds(model, x)
    exits = np_route(heads, thresholds)
    assert set(exits) == {0, 1, 2}
    return model, anytime.AnytimeModel(model, thresholds), x, heads, exits


# ------------------------------------------------------------ serving
def test_early_exit_export_stops_at_the_exit_head_at_batch_1():
    model, fast, x, heads, exits = routed_model()
    early = serving.serving_function(fast, static=False)
    static = serving.serving_function(fast, static=True)
    easy = int(np.flatnonzero(exits == 0)[0])
    middle = int(np.flatnonzero(exits == 1)[0])
    hard = int(np.flatnonzero(exits == 2)[0])
    for function, sample, added in (
        (early, easy, (0, 0)),     # Segments 1 and 2 never run.
        (early, middle, (1, 0)),   # Segment 2 never runs.
        (early, hard, (1, 1)),
        (static, easy, (1, 1)),    # Every exit is computed.
    ):
        before = seen(model, "c1"), seen(model, "c2")
        out = function(x[sample:sample + 1])
        assert (seen(model, "c1") - before[0],
                seen(model, "c2") - before[1]) == added
        assert int(out["exit_index"][0]) == exits[sample]
        np.testing.assert_allclose(out["logits"][0],
                                   heads[exits[sample]][sample], atol=1e-6)


def test_saved_models_equal_the_anytime_model(tmp_path):
    import tensorflow as tf

    model, fast, x, heads, exits = routed_model()
    expected = np.stack(heads)[exits, np.arange(len(x))]
    for static in (False, True):
        path = str(tmp_path / f"static_{static}")
        fast.export(path, static=static)
        served = tf.saved_model.load(path)
        for first, n in ((0, len(x)), (0, 1), (5, 1)):
            out = served.serve(x[first:first + n])
            np.testing.assert_array_equal(out["exit_index"].numpy(),
                                          exits[first:first + n])
            np.testing.assert_allclose(out["logits"].numpy(),
                                       expected[first:first + n], atol=1e-6)


def test_tflite_exports_equal_the_anytime_model(tmp_path):
    import tensorflow as tf

    model = mlp_model("joint", seed=5)
    x, _ = data(30, seed=6)
    heads, thresholds = mid_thresholds(model, x)
    fast = anytime.AnytimeModel(model, thresholds)
    exits = np_route(heads, thresholds)
    expected = np.stack(heads)[exits, np.arange(len(x))]
    resolver = tf.lite.experimental.OpResolverType
    for static, kwargs in (
        (False, {"experimental_op_resolver_type":
                 resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES}),
        (True, {}),
    ):
        path = str(tmp_path / f"anytime_{static}.tflite")
        fast.export(path, format="tflite", static=static)
        for n in (1, len(x)):
            interpreter = tf.lite.Interpreter(path, **kwargs)
            entry = interpreter.get_input_details()[0]
            interpreter.resize_tensor_input(entry["index"], [n, 6])
            interpreter.allocate_tensors()
            interpreter.set_tensor(entry["index"], x[:n])
            interpreter.invoke()
            outs = [interpreter.get_tensor(d["index"])
                    for d in interpreter.get_output_details()]
            logits = next(o for o in outs if o.ndim == 2)
            exit_index = next(o for o in outs if o.ndim == 1)
            np.testing.assert_array_equal(exit_index, exits[:n])
            np.testing.assert_allclose(logits, expected[:n], atol=1e-5)


def test_export_format_is_checked():
    _, fast, _, _, _ = routed_model()
    with pytest.raises(ValueError, match=r"`format` must be "
                       r"\"tf_saved_model\" or \"tflite\"\. Received: "
                       r"format='onnx'"):
        fast.export("/tmp/never", format="onnx")
    with pytest.raises(ValueError, match=r"`model` must be a keras_mwbp"):
        serving.serving_function(keras.Model())


# ------------------------------------------------------------ curve
def test_curve_rows_are_heads_and_routings(tmp_path):
    model = mlp_model("joint", seed=6)
    x, y = data(50, seed=7)
    heads = [np.asarray(h) for h in model.predict(x, verbose=0)]
    result = anytime.calibrate(model, (x, y), max_accuracy_drop=0.05)
    rows = anytime.curve(model, (x, y), thresholds=(0.0, 0.5, 1.0),
                         calibration=result)
    assert [r["route"] for r in rows] == (
        ["head 0", "head 1", "head 2"] + ["anytime"] * 3 + ["calibrated"])
    costs = (36, 64, 92)  # ExitPlan's exit costs of mlp_graph.
    for i in range(3):
        assert rows[i]["accuracy"] == pytest.approx(
            np.mean(heads[i].argmax(-1) == y))
        assert rows[i]["multiply_adds"] == count_multiply_adds(
            model.exit_model(i))
    for row, t in zip(rows[3:6], (0.0, 0.5, 1.0)):
        exits = np_route(heads, [t, t, t])
        pred = np.stack([h.argmax(-1) for h in heads])[exits, np.arange(50)]
        assert row["threshold"] == t
        assert row["accuracy"] == pytest.approx(np.mean(pred == y))
        assert row["multiply_adds"] == pytest.approx(
            np.mean(np.asarray(costs)[exits]))
        assert row["relative_cost"] == pytest.approx(
            row["multiply_adds"] / 92)
    assert rows[3]["exit_fractions"] == (1.0, 0.0, 0.0)  # Threshold 0.
    assert rows[-1]["accuracy"] == pytest.approx(result.accuracy)
    table = anytime.format_curve(rows).splitlines()
    assert table[0].split() == ["route", "threshold", "accuracy",
                                "multiply-adds", "/", "final", "exits",
                                "per", "head"]
    assert table[4].split()[:2] == ["anytime", "0.000"]
    assert table[4].split()[-3:] == ["100%", "0%", "0%"]
    path = anytime.plot_curve(rows, str(tmp_path / "curve.png"))
    with open(path, "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"


def test_curve_uses_the_temperature():
    model = mlp_model("joint", seed=6)
    x, y = data(50, seed=7)
    heads = [np.asarray(h) for h in model.predict(x, verbose=0)]
    t = float(np.median(np_confidence(heads[0], 3.0)))
    rows = anytime.curve(model, (x, y), thresholds=(t,), temperature=3.0,
                         confidence="max_prob")
    exits = np_route(heads, [t, t, t], temperature=3.0)
    assert rows[-1]["exit_fractions"] == pytest.approx(
        tuple(np.bincount(exits, minlength=3) / 50))


# ------------------------------------------------------------ CLI
def run_cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-m", "keras_mwbp", *args], capture_output=True,
        text=True, env=env, timeout=400,
    )


def digits_model():
    import keras_mwbp

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(16, activation="relu")(x)
    aux = keras.layers.Dense(10, name="aux")(x)
    x = keras.layers.Dense(16, activation="relu")(x)
    final = keras.layers.Dense(10, name="final")(x)
    return keras_mwbp.MultiWayModel(inputs, [aux, final], method="joint")


def test_cli_calibrate_prints_the_table_and_saves_the_model(tmp_path):
    from keras_mwbp.data import load_digits

    model = digits_model()
    path = str(tmp_path / "model.keras")
    model.save(path)
    out = str(tmp_path / "fast.keras")
    done = run_cli("calibrate", path, "--dataset", "digits", "--max-drop",
                   "0.5", "--output", out, "--plot",
                   str(tmp_path / "curve.png"))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("calibrated on 225 samples, evaluated on 225")
    assert lines[1].split()[:3] == ["route", "threshold", "accuracy"]
    assert [line.split()[0] for line in lines[2:4]] == ["head", "head"]
    assert lines[-2].split()[0] == "calibrated"
    assert lines[-1] == f"AnytimeModel -> {out}"
    # The digits test split in its fixed order; the first half calibrates.
    _, (x_test, y_test) = load_digits()
    expected = anytime.calibrate(model, (x_test[:225], y_test[:225]),
                                 max_accuracy_drop=0.005)
    loaded = keras.saving.load_model(out)
    assert loaded.thresholds == expected.thresholds
    assert os.path.getsize(tmp_path / "curve.png") > 1000


def test_cli_calibrate_errors_are_one_line(tmp_path):
    path = str(tmp_path / "one_head.keras")
    inputs = keras.Input((8, 8, 1))
    keras.Model(inputs, [keras.layers.Dense(10)(
        keras.layers.Flatten()(inputs))]).save(path)
    done = run_cli("calibrate", path, "--max-drop", "0.5")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert "`model` must have at least two heads" in done.stderr
    assert "Traceback" not in done.stderr
    done = run_cli("calibrate", path, "--max-drop", "-1")
    assert done.returncode == 2
    assert done.stderr.strip().endswith(
        "argument --max-drop: must be a percentage in [0, 100], got -1")
    assert done.stderr.count("\n") == 1
