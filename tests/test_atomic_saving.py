"""Atomic checkpoints (`keras_mwbp.callbacks.model_checkpoint.ModelCheckpoint`,
`keras_mwbp.saving.save_model`): a process killed, or a save failing, while
a checkpoint is written leaves the previous checkpoint as it was."""

import itertools
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import zipfile

import keras
import numpy as np
import pytest
from keras.src.saving import saving_lib

import keras_mwbp
from conftest import compiled_mlp
from conftest import mlp_data
from keras_mwbp.callbacks.model_checkpoint import ModelCheckpoint
from keras_mwbp.saving import save_model

# One xdist worker runs the whole file (conftest.ONE_WORKER_FILES), so its
# module-scoped fixtures are built once, not once per worker.

TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent

# Trains a tiny MultiWayModel for 2 epochs (2 steps each) with a checkpoint
# callback saving model.keras each epoch. After the first save it writes the
# model's weights and optimizer state to an npz; during the second save it
# writes half of the weights entry into the file being written, flushes it
# and SIGKILLs itself.
CHILD = textwrap.dedent(
    """
    import os, signal, sys, zipfile
    sys.path.insert(0, {tests!r})
    import keras
    import numpy as np
    from conftest import compiled_mlp, mlp_data
    from keras_mwbp.callbacks.model_checkpoint import ModelCheckpoint

    kind, checkpoint_path, npz_path = sys.argv[1:4]
    checkpoint_class = {{"atomic": ModelCheckpoint,
                        "keras": keras.callbacks.ModelCheckpoint}}[kind]
    saves = []
    writestr = zipfile.ZipFile.writestr

    def crashing_writestr(self, name, data, *args, **kwargs):
        if name == "model.weights.h5":
            saves.append(name)
            if len(saves) == 2:
                self.fp.write(data[: len(data) // 2])
                self.fp.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        return writestr(self, name, data, *args, **kwargs)

    zipfile.ZipFile.writestr = crashing_writestr

    def record(epoch, logs):
        if epoch == 0:
            assert len(saves) == 1, saves
            values = model.get_weights() + [
                keras.ops.convert_to_numpy(v)
                for v in model.optimizer.variables]
            np.savez(npz_path, *values)

    model = compiled_mlp("mwbp")
    x, y = mlp_data(16)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False,
              callbacks=[checkpoint_class(checkpoint_path),
                         keras.callbacks.LambdaCallback(on_epoch_end=record)])
    print("NOT KILLED")
    """
)


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


@pytest.fixture(scope="module")
def crashed_runs(tmp_path_factory):
    """Both children (atomic and Keras's callback), run side by side."""
    root = tmp_path_factory.mktemp("crash")
    script = root / "child.py"
    script.write_text(CHILD.format(tests=str(TESTS)))
    runs = {}
    for kind in ("atomic", "keras"):
        folder = root / kind
        folder.mkdir()
        checkpoint, npz = folder / "model.keras", folder / "first_save.npz"
        process = subprocess.Popen(
            [sys.executable, str(script), kind, str(checkpoint), str(npz)],
            cwd=folder, env=child_env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        runs[kind] = (process, folder, checkpoint, npz)
    results = {}
    for kind, (process, folder, checkpoint, npz) in runs.items():
        output, _ = process.communicate(timeout=300)
        results[kind] = (process.returncode, output, folder, checkpoint, npz)
    return results


def test_checkpoint_killed_mid_save_keeps_the_previous_checkpoint(crashed_runs):
    returncode, output, folder, checkpoint, npz = crashed_runs["atomic"]
    assert returncode == -signal.SIGKILL, output[-3000:]
    # The kill happened while the temporary file was being written: it is
    # left behind, the checkpoint itself was not touched.
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and leftovers[0].endswith(".keras"), leftovers
    loaded = keras.saving.load_model(checkpoint)
    assert isinstance(loaded, keras_mwbp.MultiWayModel)
    with np.load(npz) as saved:
        expected = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    actual = loaded.get_weights() + [
        keras.ops.convert_to_numpy(v) for v in loaded.optimizer.variables]
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_array_equal(a, e)
    # The first epoch's 2 steps, and the momentum buffers are not all zero.
    assert int(loaded.optimizer.iterations) == 2
    assert any(np.any(m != 0) for m in expected[len(loaded.weights):])


def test_keras_checkpoint_killed_mid_save_leaves_a_broken_file(crashed_runs):
    # The same crash with Keras's own callback: the checkpoint is truncated.
    returncode, output, folder, checkpoint, npz = crashed_runs["keras"]
    assert returncode == -signal.SIGKILL, output[-3000:]
    assert npz.exists()  # The first save completed.
    with pytest.raises((zipfile.BadZipFile, ValueError, OSError)):
        keras.saving.load_model(checkpoint)


# -------------------------------------------- a save that raises, in-process


def _fail_saving(monkeypatch):
    def failing_save_state(*args, **kwargs):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(saving_lib, "_save_state", failing_save_state)


_scores = itertools.count()


def _rising_score(epoch):
    return float(next(_scores))  # Improves at every epoch in mode "max".


CONFIGS = {
    "keras_epoch": ("model.keras", {}),
    "weights_epoch": ("model.weights.h5", {"save_weights_only": True}),
    "keras_steps": ("model.keras", {"save_freq": 1}),
    "weights_best_only": ("model.weights.h5", {
        "save_weights_only": True, "save_best_only": True,
        "monitor": "score", "mode": "max"}),
}


def _fit(model, checkpoint, epochs=1, score=_rising_score):
    def inject_score(epoch, logs):
        logs["score"] = score(epoch)

    x, y = mlp_data(16)
    model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, shuffle=False,
              callbacks=[keras.callbacks.LambdaCallback(
                  on_epoch_end=inject_score), checkpoint])


def _load_weights_of(path):
    target = compiled_mlp("mwbp", seed=5)
    if path.name.endswith(".weights.h5"):
        target.load_weights(path)
        return target
    return keras.saving.load_model(path)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_failed_save_leaves_the_previous_checkpoint_byte_identical(
        tmp_path, monkeypatch, config):
    name, kwargs = CONFIGS[config]
    path = tmp_path / "ckpt" / name
    model = compiled_mlp("mwbp")
    checkpoint = ModelCheckpoint(str(path), **kwargs)
    _fit(model, checkpoint)
    # The first save is complete and loadable.
    loaded = _load_weights_of(path)
    for a, e in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, e)
    assert int(loaded.optimizer.iterations) == 2
    before = path.read_bytes()

    _fail_saving(monkeypatch)
    with pytest.raises(RuntimeError, match="disk full"):
        _fit(model, checkpoint)
    assert int(model.optimizer.iterations) >= 3  # It trained on, then failed.
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [name]


@pytest.mark.parametrize("name, kwargs", [
    ("model.keras", {}), ("model.weights.h5", {"save_weights_only": True})])
def test_failed_save_of_keras_checkpoint_damages_the_previous_file(
        tmp_path, monkeypatch, name, kwargs):
    # Keras's callback writes in place: the same failure destroys the file.
    path = tmp_path / name
    model = compiled_mlp("mwbp")
    _fit(model, keras.callbacks.ModelCheckpoint(str(path), **kwargs))
    before = path.read_bytes()
    _fail_saving(monkeypatch)
    with pytest.raises(RuntimeError, match="disk full"):
        _fit(model, keras.callbacks.ModelCheckpoint(str(path), **kwargs))
    assert path.read_bytes() != before
    monkeypatch.undo()
    with pytest.raises(ValueError):
        _load_weights_of(path)


def test_checkpoint_keeps_keras_behaviour(tmp_path):
    # File name formatting, save_best_only skipping a worse epoch, a message
    # per save, and nothing left beside the checkpoints.
    model = compiled_mlp("mwbp")
    _fit(model, ModelCheckpoint(str(tmp_path / "m-{epoch:02d}.keras")),
         epochs=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m-01.keras", "m-02.keras"]
    best = tmp_path / "best" / "best.weights.h5"
    checkpoint = ModelCheckpoint(
        str(best), monitor="score", mode="min", save_best_only=True,
        save_weights_only=True, initial_value_threshold=0.5)
    # Score 0.0 improves on 0.5, then 1.0 does not.
    _fit(model, checkpoint, epochs=2, score=float)
    assert checkpoint.best == 0.0
    assert sorted(p.name for p in best.parent.iterdir()) == ["best.weights.h5"]
    config = checkpoint.get_config()
    assert config["monitor"] == "score" and config["save_best_only"] is True
    assert keras.saving.get_registered_object(
        "keras_mwbp>ModelCheckpoint") is ModelCheckpoint
    with pytest.raises(ValueError, match="must end in `.weights.h5`"):
        ModelCheckpoint(str(tmp_path / "x.keras"), save_weights_only=True)


def test_save_model_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "model.keras"
    model = compiled_mlp("mwbp")
    save_model(model, path)
    loaded = keras.saving.load_model(path)
    for a, e in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, e)
    before = path.read_bytes()
    model.train_on_batch(*mlp_data(8))

    # overwrite=False asks first, as Keras does; "no" keeps the file.
    asked = []
    monkeypatch.setattr(
        "keras.src.utils.io_utils.ask_to_proceed_with_overwrite",
        lambda filepath: asked.append(filepath) or False)
    save_model(model, path, overwrite=False)
    assert asked == [str(path)] and path.read_bytes() == before

    _fail_saving(monkeypatch)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(model, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras"]
