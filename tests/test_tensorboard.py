"""`keras_mwbp.callbacks.TensorBoard`: Keras's TensorBoard callback plus a
custom-scalar layout of every head's loss, accuracy and the loss weights."""

import os
import re

import keras
import numpy as np
import pytest

import keras_mwbp
from conftest import compiled_mlp
from conftest import mlp_data
from keras_mwbp.callbacks.tensorboard import heads_layout

ea = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator"
)
layout_pb2 = pytest.importorskip("tensorboard.plugins.custom_scalar.layout_pb2")
tensor_util = pytest.importorskip("tensorboard.util.tensor_util")

HEADS = ("h0", "h1", "final")
EPOCHS = 2
LAYOUT_TAG = "custom_scalars__config__"
CHARTS = {
    "loss": r"^epoch_(h0|h1|final)_loss$",
    "accuracy": r"^epoch_(h0|h1|final)_(\w+_)?acc(uracy)?$",
    "loss weights": r"^epoch_(nu|gamma_\d+)$",
}


def read_run(log_dir, run):
    """`{tag: [(step, value), ...]}` of one run's scalar summaries, and the
    accumulator (for reading the other tensors)."""
    acc = ea.EventAccumulator(
        os.path.join(log_dir, run), size_guidance={ea.TENSORS: 0}
    )
    acc.Reload()
    scalars = {}
    for tag in acc.Tags()["tensors"]:
        if acc.SummaryMetadata(tag).plugin_data.plugin_name != "scalars":
            continue
        scalars[tag] = [
            (event.step, float(np.asarray(tensor_util.make_ndarray(
                event.tensor_proto))))
            for event in acc.Tensors(tag)
        ]
    return scalars, acc


def read_layout(acc):
    events = acc.Tensors(LAYOUT_TAG)
    assert len(events) == 1
    content = tensor_util.make_ndarray(events[0].tensor_proto)
    layout = layout_pb2.Layout()
    layout.ParseFromString(np.asarray(content).item())
    return layout


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A 3-head MultiWayModel fit for 2 epochs with the callback."""
    log_dir = str(tmp_path_factory.mktemp("tb"))
    model = compiled_mlp(metrics=["accuracy"])
    x, y = mlp_data(32)
    callback = keras_mwbp.callbacks.TensorBoard(log_dir)
    history = model.fit(
        x,
        y,
        epochs=EPOCHS,
        batch_size=16,
        validation_data=mlp_data(16, seed=1),
        callbacks=[callback],
        verbose=0,
    )
    train, train_acc = read_run(log_dir, "train")
    validation, _ = read_run(log_dir, "validation")
    return history.history, train, validation, read_layout(train_acc)


def assert_curve(scalars, tag, expected):
    assert tag in scalars, (tag, sorted(scalars))
    steps = [step for step, _ in scalars[tag]]
    values = [value for _, value in scalars[tag]]
    assert steps == list(range(EPOCHS)), tag
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-6, err_msg=tag)


def test_is_a_keras_tensorboard_callback():
    callback = keras_mwbp.callbacks.TensorBoard("logs", histogram_freq=1)
    assert isinstance(callback, keras.callbacks.TensorBoard)
    assert callback.histogram_freq == 1
    assert callback.log_dir == "logs"


@pytest.mark.parametrize("metric", ["loss", "accuracy"])
def test_every_heads_curves_in_train_and_validation_runs(fitted, metric):
    history, train, validation, _ = fitted
    for head in HEADS:
        key = f"{head}_{metric}"
        assert_curve(train, f"epoch_{key}", history[key])
        assert_curve(validation, f"epoch_{key}", history[f"val_{key}"])


def test_total_loss_still_written(fitted):
    history, train, validation, _ = fitted
    assert_curve(train, "epoch_loss", history["loss"])
    assert_curve(validation, "epoch_loss", history["val_loss"])


def test_nu_and_gammas_in_train_run(fitted):
    history, train, validation, _ = fitted
    keys = ["nu"] + [f"gamma_{i}" for i in range(len(HEADS))]
    for key in keys:
        assert_curve(train, f"epoch_{key}", history[key])
        assert f"epoch_{key}" not in validation
    # The 3-head MLP's default weights (nu=2, depths 1, 2, 4): gamma_K = 1.
    assert train["epoch_nu"][0][1] == pytest.approx(2.0)
    assert train["epoch_gamma_2"][0][1] == pytest.approx(1.0)


def test_custom_scalar_layout(fitted):
    _, train, validation, layout = fitted
    assert len(layout.category) == 1
    category = layout.category[0]
    assert category.title == "multi-way BP"
    charts = {chart.title: list(chart.multiline.tag) for chart in category.chart}
    assert charts == {title: [regex] for title, regex in CHARTS.items()}
    # Each chart holds exactly its tags (TensorBoard uses `re.match`).
    tags = set(train) | set(validation)
    matched = {
        title: {tag for tag in tags if re.match(regex, tag)}
        for title, regex in CHARTS.items()
    }
    assert matched == {
        "loss": {f"epoch_{h}_loss" for h in HEADS},
        "accuracy": {f"epoch_{h}_accuracy" for h in HEADS},
        "loss weights": {"epoch_nu", "epoch_gamma_0", "epoch_gamma_1",
                         "epoch_gamma_2"},
    }


def test_layout_without_output_names_and_other_accuracy_names():
    category = heads_layout(None, title="t").category[0]
    loss, accuracy, weights = (chart.multiline.tag[0] for chart in category.chart)
    assert category.title == "t"
    assert re.match(loss, "epoch_aux_1_loss")
    assert not re.match(loss, "epoch_loss")
    assert not re.match(loss, "evaluation_aux_loss_vs_iterations")
    for tag in ("epoch_aux_accuracy", "epoch_aux_sparse_categorical_accuracy",
                "epoch_aux_acc"):
        assert re.match(accuracy, tag), tag
    assert not re.match(accuracy, "epoch_aux_loss")
    assert re.match(weights, "epoch_gamma_12")
    assert not re.match(weights, "epoch_learning_rate")
    # Output names are escaped.
    named = heads_layout(["a.b"]).category[0].chart[0].multiline.tag[0]
    assert re.match(named, "epoch_a.b_loss")
    assert not re.match(named, "epoch_aXb_loss")


def test_custom_layout_title_with_plain_keras_model(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="out")(inputs))
    model.compile(optimizer="sgd", loss="mse")
    x, _ = mlp_data(8)
    model.fit(
        x,
        np.zeros((8, 3), "float32"),
        epochs=1,
        verbose=0,
        callbacks=[keras_mwbp.callbacks.TensorBoard(tmp_path, layout_title="x")],
    )
    scalars, acc = read_run(str(tmp_path), "train")
    assert "epoch_loss" in scalars
    category = read_layout(acc).category[0]
    assert category.title == "x"
    assert category.chart[0].multiline.tag[0] == r"^epoch_(out)_loss$"
