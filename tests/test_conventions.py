"""The Keras conventions a user brings: per-head metrics, `from_logits`, the
heads' names, plots, exported intermediate models, `clone_model`, and no
stray warnings from keras_mwbp's own data paths."""

import warnings

import keras
import numpy as np
import pytest

import keras_mwbp
from keras_mwbp import report
from keras_mwbp.models import cifar_resnet

from conftest import mlp_data
from conftest import mlp_graph
from conftest import mlp_model
from conftest import sparse_ce


def _accuracy(model, x, y, head):
    logits = keras.ops.convert_to_numpy(model(x, training=False)[head])
    return float(np.mean(np.argmax(logits, axis=-1) == y))


# ------------------------------------------------------ per-head metrics
@pytest.mark.parametrize(
    "metrics, key",
    [
        ({"final": "accuracy"}, "final_accuracy"),
        ({"h0": keras.metrics.SparseCategoricalAccuracy(name="acc")},
         "h0_acc"),
        ({"h1": ["accuracy"], "final": None}, "h1_accuracy"),
    ],
    ids=["name", "metric_object", "list_and_none"],
)
def test_metrics_dict_with_one_value_per_head(metrics, key):
    model = mlp_model()
    model.compile(optimizer="sgd", loss=sparse_ce(), metrics=metrics)
    x, y = mlp_data(32)
    logs = model.evaluate(x, y, return_dict=True, verbose=0)
    accuracies = [k for k in logs if "acc" in k]
    assert accuracies == [key]
    head = ["h0", "h1", "final"].index(key.split("_")[0])
    assert logs[key] == pytest.approx(_accuracy(model, x, y, head), abs=1e-6)


# ------------------------------------------------------------ from_logits
def _compile_warnings(model, loss):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.compile(optimizer="sgd", loss=loss)
    return [w for w in caught if "from_logits" in str(w.message)]


@pytest.mark.parametrize(
    "loss",
    [keras.losses.SparseCategoricalCrossentropy(),
     "sparse_categorical_crossentropy",
     keras.losses.sparse_categorical_crossentropy],
    ids=["object", "string", "function"],
)
def test_probability_loss_on_logits_warns(loss):
    (warning,) = _compile_warnings(mlp_model(), loss)
    assert warning.category is UserWarning
    message = str(warning.message)
    assert "['h0', 'h1', 'final']" in message
    assert "Pass `from_logits=True`" in message


def test_logits_losses_and_probability_heads_do_not_warn():
    assert _compile_warnings(mlp_model(), sparse_ce()) == []
    inputs, outputs = mlp_graph()
    probabilities = [keras.layers.Softmax(name=f"p{i}")(o)
                     for i, o in enumerate(outputs)]
    model = keras_mwbp.MultiWayModel(inputs, probabilities)
    assert _compile_warnings(model, "sparse_categorical_crossentropy") == []
    # Only the heads that output logits are named.
    mixed = keras_mwbp.MultiWayModel(inputs, probabilities[:2] + outputs[2:])
    (warning,) = _compile_warnings(
        mixed, keras.losses.SparseCategoricalCrossentropy())
    assert "['final']" in str(warning.message)


def test_attach_heads_logits_warn_through_the_identity_layer():
    backbone = keras.Sequential(
        [keras.Input((8, 8, 1)),
         keras.layers.Conv2D(4, 3, name="c1"),
         keras.layers.Conv2D(4, 3, name="c2")])
    backbone = keras.Model(backbone.inputs, backbone.outputs)
    model = keras_mwbp.attach_heads(backbone, ["c1"], num_classes=3)
    (warning,) = _compile_warnings(model, "sparse_categorical_crossentropy")
    assert "['head_0', 'final']" in str(warning.message)


# ------------------------------------------------------------ head names
def test_zoo_attach_heads_and_examples_share_head_names():
    zoo = cifar_resnet(8, num_losses=3, input_shape=(8, 8, 1))
    assert zoo.output_names == ["head_0", "head_1", "final"]
    backbone = cifar_resnet(8, input_shape=(8, 8, 1), method="standard")
    trunk = keras.Model(backbone.inputs,
                        backbone.get_layer("block_3_out").output)
    attached = keras_mwbp.attach_heads(
        trunk, ["block_1_out", "block_2_out"], num_classes=10)
    assert attached.output_names == zoo.output_names
    # Same parameters as before the outputs were named: Identity layers.
    assert zoo.count_params() == attached.count_params()


def test_quickstart_example_names_its_heads_alike():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "quickstart", "examples/quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    assert quickstart.build().output_names == ["head_0", "head_1", "final"]


# ------------------------------------------------------------------ plot
def test_plot_history_draws_a_marker_for_a_single_epoch(tmp_path,
                                                        monkeypatch):
    from matplotlib.figure import Figure

    figures = []
    original = Figure.savefig

    def savefig(self, *args, **kwargs):
        figures.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    history = {"h0_accuracy": [0.25], "final_accuracy": [0.75],
               "val_h0_accuracy": [0.5], "val_final_accuracy": [1.0]}
    path = tmp_path / "heads.png"
    report.plot_history(history, str(path), output_names=["h0", "final"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (axes,) = figures[0].axes
    lines = {line.get_label(): line for line in axes.lines}
    assert sorted(lines) == ["final (train)", "final (val)", "h0 (train)",
                             "h0 (val)"]
    for label, error in (("h0 (train)", 0.75), ("final (val)", 0.0)):
        line = lines[label]
        assert list(line.get_xdata()) == [1]
        assert list(line.get_ydata()) == [error]
        # A visible marker: one point is drawn.
        assert line.get_marker() not in (None, "None", "", " ")
        assert line.get_markersize() > 0


# ---------------------------------------------------------------- export
def test_exported_exit_model_serves_a_tensor(tmp_path):
    import tensorflow as tf

    model = mlp_model()
    x, _ = mlp_data(5)
    small = model.exit_model(1)
    path = str(tmp_path / "head_1")
    small.export(path, verbose=False)
    loaded = tf.saved_model.load(path)
    served = loaded.serve(tf.constant(x))
    np.testing.assert_allclose(
        served.numpy(), keras.ops.convert_to_numpy(model(x)[1]),
        rtol=1e-6, atol=1e-6)
    # As a plain one-input Keras model's endpoint.
    inputs, _ = mlp_graph()
    plain = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    assert small.input.shape == plain.input.shape
    assert not isinstance(small.input, list)


# ----------------------------------------------------------------- clone
def test_clone_model_is_refused_with_the_way_to_copy():
    model = mlp_model(method="joint", nu=1.5)
    model.compile(optimizer="sgd", loss=sparse_ce())
    with pytest.raises(ValueError, match=(
        r"`keras.models.clone_model` cannot clone a MultiWayModel.*"
        r"MultiWayModel.from_config\(model.get_config\(\)\)")):
        keras.models.clone_model(model)
    copy = keras_mwbp.MultiWayModel.from_config(model.get_config())
    assert (copy.method, copy.nu, copy.output_names) == (
        "joint", 1.5, model.output_names)
    copy.set_weights(model.get_weights())
    x, y = mlp_data(8)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(copy(x)[2]),
        keras.ops.convert_to_numpy(model(x)[2]), rtol=1e-6)
    copy.compile(optimizer="sgd", loss=sparse_ce())
    assert np.isfinite(copy.fit(x, y, verbose=0).history["final_loss"][0])
    # Calling the model on new symbolic inputs still works.
    inputs = keras.Input((6,))
    assert len(model(inputs)) == 3


# -------------------------------------------------------------- warnings
def test_fit_on_a_dataset_does_not_warn_about_shuffle():
    import tensorflow as tf

    model = mlp_model()
    model.compile(optimizer="sgd", loss=sparse_ce())
    x, y = mlp_data(16)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(dataset, epochs=1, verbose=0)
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "shuffle" in m], messages
