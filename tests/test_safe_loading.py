"""Loading `.keras` files of a `MultiWayModel` and of its intermediate models:
safe mode without `custom_objects`, unsafe lambdas refused, and a missing or
mismatched optimizer state refused instead of training on from scratch."""

import io
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import zipfile

import h5py
import keras
import numpy as np
import pytest

import keras_mwbp
from conftest import compiled_mlp
from conftest import mlp_data
from conftest import mlp_model
from conftest import sgd
from conftest import sparse_ce
from conftest import to_numpy
from keras_mwbp.saving import save_model

pytestmark = pytest.mark.oldest_keras()

TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent


def optimizer_state(model):
    return [to_numpy(v) for v in model.optimizer.variables]


def trained(method="mwbp", steps=1, **kwargs):
    model = compiled_mlp(method, **kwargs)
    for _ in range(steps):
        model.train_on_batch(*mlp_data(8))
    return model


# ------------------------------------------------- a fresh process, safe mode

# Loads exit0.keras before anything imported keras_mwbp, checks that
# model.keras then needs the package, imports it (which registers its
# classes) and loads model.keras; both in safe mode, without custom_objects.
FRESH = textwrap.dedent(
    """
    import sys
    import keras
    import numpy as np

    folder = sys.argv[1]
    data = np.load(folder + "/data.npz")
    exit_model = keras.saving.load_model(folder + "/exit0.keras",
                                         safe_mode=True)
    assert "keras_mwbp" not in sys.modules
    assert type(exit_model).__module__.startswith("keras."), type(exit_model)
    try:
        keras.saving.load_model(folder + "/model.keras", safe_mode=True)
    except TypeError as e:
        assert "MultiWayModel" in str(e), e
    else:
        raise AssertionError("loaded a MultiWayModel without keras_mwbp")

    import keras_mwbp
    model = keras.saving.load_model(folder + "/model.keras", safe_mode=True)
    assert type(model) is keras_mwbp.MultiWayModel, type(model)
    assert type(model.optimizer) is keras_mwbp.MultiWayOptimizer
    results = {"exit0": exit_model.predict(data["x"], verbose=0),
               "iterations": int(model.optimizer.iterations)}
    for i, out in enumerate(model.predict(data["x"], verbose=0)):
        results[f"head{i}"] = out
    for i, v in enumerate(model.optimizer.variables):
        results[f"opt{i}"] = keras.ops.convert_to_numpy(v)
    np.savez(folder + "/results.npz", **results)
    print("OK")
    """
)


def test_saved_files_load_in_a_fresh_process_in_safe_mode(tmp_path):
    model = trained()
    model.save(tmp_path / "model.keras")
    save_model(model.exit_model(0), tmp_path / "exit0.keras")
    x, _ = mlp_data(5, seed=9)
    np.savez(tmp_path / "data.npz", x=x)
    (tmp_path / "fresh.py").write_text(FRESH)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    done = subprocess.run(
        [sys.executable, str(tmp_path / "fresh.py"), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]

    with np.load(tmp_path / "results.npz") as results:
        expected = model.predict(x, verbose=0)
        for i, out in enumerate(expected):
            np.testing.assert_array_equal(results[f"head{i}"], out)
        np.testing.assert_array_equal(results["exit0"], expected[0])
        assert int(results["iterations"]) == 1
        state = optimizer_state(model)
        assert len([k for k in results.files if k.startswith("opt")]) == len(state)
        for i, value in enumerate(state):
            np.testing.assert_array_equal(results[f"opt{i}"], value)


# ----------------------------------------------------------- unsafe lambdas


def test_unsafe_lambda_is_refused_in_safe_mode(tmp_path):
    keras.utils.set_random_seed(0)
    layers = keras.layers
    inputs = keras.Input((6,))
    a1 = layers.Dense(4, activation="relu", name="d1")(inputs)
    doubled = layers.Lambda(lambda t: t * 2, name="double")(a1)
    h0 = layers.Dense(3, name="h0")(doubled)
    a2 = layers.Dense(4, activation="relu", name="d2")(doubled)
    final = layers.Dense(3, name="final")(a2)
    model = keras_mwbp.MultiWayModel(inputs, [h0, final], method="mwbp")
    model.compile(optimizer=sgd(), loss=sparse_ce())
    model.train_on_batch(*mlp_data(8))
    path = tmp_path / "lambda.keras"
    model.save(path)

    with pytest.raises(ValueError, match=re.escape(
            "Requested the deserialization of a `Lambda` layer whose "
            "`function` is a Python lambda.")) as info:
        keras.saving.load_model(path, safe_mode=True)
    assert "safe_mode=False" in str(info.value)
    with pytest.raises(ValueError, match="Python lambda"):
        keras.saving.load_model(path)  # Safe mode is the default.

    loaded = keras.saving.load_model(path, safe_mode=False)
    x, _ = mlp_data(4, seed=2)
    for a, e in zip(loaded.predict(x, verbose=0), model.predict(x, verbose=0)):
        np.testing.assert_array_equal(a, e)


# ------------------------------------------- missing or mismatched state


def rewrite_weights(source, target, edit):
    """Copies the `.keras` file `source` to `target`, with `edit(h5_file)`
    applied to its `model.weights.h5`."""
    with zipfile.ZipFile(source) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    buffer = io.BytesIO(entries["model.weights.h5"])
    with h5py.File(buffer, "a") as f:
        edit(f)
    entries["model.weights.h5"] = buffer.getvalue()
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


@pytest.fixture(scope="module")
def trained_file(tmp_path_factory):
    model = trained(steps=2)
    path = tmp_path_factory.mktemp("trained") / "model.keras"
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        with h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as f:
            # The container saves every variable in one flat group.
            assert sorted(f["optimizer"]) == ["vars"]
            assert len(f["optimizer/vars"]) == len(model.optimizer.variables)
    return path, len(model.optimizer.variables)


def test_trained_file_round_trips_its_optimizer_state(trained_file):
    path, count = trained_file
    loaded = keras.saving.load_model(path)
    assert len(loaded.optimizer.variables) == count
    assert int(loaded.optimizer.iterations) == 2
    assert [int(o.iterations) for o in loaded.optimizer.loss_optimizers] == [2] * 3


def test_missing_optimizer_state_is_refused(trained_file, tmp_path):
    path, count = trained_file
    broken = tmp_path / "no_optimizer.keras"
    rewrite_weights(path, broken, lambda f: f.__delitem__("optimizer"))
    with pytest.raises(ValueError) as info:
        keras.saving.load_model(broken)
    message = str(info.value)
    # Keras gathers the errors of `load_own_variables` into one ValueError.
    assert message.startswith("A total of 1 objects could not be loaded.")
    assert re.search(
        r"The file has no saved state for optimizer 'multi_way_optimizer\w*': "
        rf"expected {count} variables \(its step counter and the states of 3 "
        r"inner optimizers\), found none\.", message), message
    assert "refusing to train on with fresh optimizer states" in message
    # The way out it names: the weights alone.
    model = keras.saving.load_model(broken, compile=False)
    reference = keras.saving.load_model(path)
    for a, e in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(a, e)


def _drop_last_variable(f):
    del f[f"optimizer/vars/{len(f['optimizer/vars']) - 1}"]


def _reshape_last_variable(f):
    name = f"optimizer/vars/{len(f['optimizer/vars']) - 1}"
    del f[name]
    f[name] = np.zeros((7,), "float32")


def test_optimizer_state_with_a_variable_missing_is_refused(
        trained_file, tmp_path):
    path, count = trained_file
    broken = tmp_path / "short.keras"
    rewrite_weights(path, broken, _drop_last_variable)
    with pytest.raises(ValueError, match=(
            r"The saved state of optimizer 'multi_way_optimizer\w*' has "
            rf"{count - 1} variables, but this optimizer has {count} "
            r"\(3 inner optimizers\)\.")):
        keras.saving.load_model(broken)


def test_optimizer_state_of_the_wrong_shape_is_refused(trained_file, tmp_path):
    path, _ = trained_file
    broken = tmp_path / "reshaped.keras"
    rewrite_weights(path, broken, _reshape_last_variable)
    with pytest.raises(ValueError, match=(
            r"The saved state of optimizer 'multi_way_optimizer\w*' does not "
            r"match variable '[^']+': saved shape \(7,\), expected \(3,\)\.")):
        keras.saving.load_model(broken)


def test_weights_file_without_optimizer_state_is_refused_after_compile(
        tmp_path):
    # A `.weights.h5` saved from an uncompiled model has no optimizer state:
    # a compiled model refuses it (Keras's own optimizers would only warn and
    # train on from scratch); an uncompiled one takes the weights.
    source = mlp_model("mwbp", seed=3)
    path = tmp_path / "plain.weights.h5"
    source.save_weights(path)
    target = compiled_mlp("mwbp")
    with pytest.raises(ValueError, match="has no saved state for optimizer"):
        target.load_weights(path)
    target = mlp_model("mwbp")
    target.load_weights(path)
    target.compile(optimizer=sgd(), loss=sparse_ce())
    for a, e in zip(target.get_weights(), source.get_weights()):
        np.testing.assert_array_equal(a, e)
    assert int(target.optimizer.iterations) == 0


# ------------------------------------- saved before any training: fresh state


def _one_step_from_fresh_state(model, loaded):
    """`loaded` (from a file saved before training) steps exactly as a model
    with the same weights and a brand-new optimizer does."""
    fresh = compiled_mlp("mwbp", seed=4)
    fresh.set_weights(model.get_weights())
    assert int(loaded.optimizer.iterations) == 0
    assert len(loaded.optimizer.variables) == len(fresh.optimizer.variables)
    for a, e in zip(optimizer_state(loaded), optimizer_state(fresh)):
        np.testing.assert_array_equal(a, e)
    batch = mlp_data(8, seed=1)
    loaded.train_on_batch(*batch)
    fresh.train_on_batch(*batch)
    for a, e in zip(loaded.get_weights(), fresh.get_weights()):
        np.testing.assert_array_equal(a, e)
    for a, e in zip(optimizer_state(loaded), optimizer_state(fresh)):
        np.testing.assert_array_equal(a, e)
    assert int(loaded.optimizer.iterations) == 1


def test_file_saved_before_training_loads_with_fresh_optimizer_state(tmp_path):
    # `compile()` builds the optimizer, so the file holds its (initial) state.
    model = compiled_mlp("mwbp")
    path = tmp_path / "untrained.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    _one_step_from_fresh_state(model, loaded)


def test_uncompiled_file_loads_and_trains_from_fresh_state(tmp_path):
    # Nothing about an optimizer in the file: it loads uncompiled.
    model = mlp_model("mwbp")
    path = tmp_path / "uncompiled.keras"
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        with h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as f:
            assert "optimizer" not in f
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, keras_mwbp.MultiWayModel)
    assert getattr(loaded, "optimizer", None) is None
    loaded.compile(optimizer=sgd(), loss=sparse_ce())
    _one_step_from_fresh_state(model, loaded)
