"""Checkpoints move between the TensorFlow, JAX and PyTorch backends.

A `MultiWayModel` (BatchNorm, a residual add, three heads, MW-BP with one
Adam per loss and a decaying learning rate) is trained for two steps under
one backend and checkpointed twice: a `.keras` file (`model.save`) and a
`keras_mwbp.callbacks.BackupAndRestore` backup of a `fit` stopped after its
second step. Under every other backend the `.keras` file is loaded and
trained on for three steps, and a new model resumes the backup's `fit` for
its last three steps. Each result equals training on in the first backend
within float32 round-off, for every ordered pair of backends, with every
weight, BatchNorm statistic and per-loss optimizer state (moments, step
counts) carried over. Each run is a process of its own: one per backend
writes its checkpoints, and one per backend trains on from those of the two
others (6 processes, not one per ordered pair). The convolutions in
front of a BatchNorm have no bias: its true gradient is zero, and Adam turns
a gradient of pure round-off into a step of the learning rate's size, which
differs between backends beyond any round-off tolerance.
"""

import functools
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

# One xdist worker runs the whole file (conftest.ONE_WORKER_FILES), so its
# module-scoped fixtures are built once, not once per worker.

BACKENDS = ("tensorflow", "jax", "torch")
for _name in BACKENDS:
    pytest.importorskip(_name)

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, shutil, sys
    import numpy as np
    import keras
    import keras_mwbp

    mode, out, folders = sys.argv[1], sys.argv[2], sys.argv[3:]
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

    class StopAt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(keras.ops.convert_to_numpy(
                    self.model.optimizer.iterations)) == 2:
                raise KeyboardInterrupt

    # The backup's fit: the 5 batches as one epoch of 40 samples, in the
    # model's (backend-independent) shuffle_seed order.
    fit_x = np.concatenate([x for x, _ in batches])
    fit_y = np.concatenate([y for _, y in batches])

    def fit(model, backup_dir, stop):
        callbacks = [keras_mwbp.callbacks.BackupAndRestore(
            backup_dir, save_freq=1, delete_checkpoint=False)]
        model.fit(fit_x, fit_y, batch_size=8, epochs=1, verbose=0,
                  callbacks=callbacks + ([StopAt()] if stop else []))

    def start(path, backup):
        result = {"backend": keras.backend.backend()}
        model = build()
        train(model, batches[:2])
        model.save(path)
        result["saved"] = state(model)
        train(model, batches[2:])
        result["continued"] = state(model)
        stopped = build()
        try:
            fit(stopped, backup + ".first", stop=True)
        except KeyboardInterrupt:
            pass
        result["backup_saved"] = state(stopped)
        shutil.copytree(backup + ".first", backup)
        resumed = build()
        fit(resumed, backup + ".first", stop=False)
        result["backup_continued"] = state(resumed)
        return result

    def resume(path, backup):
        result = {"backend": keras.backend.backend()}
        model = keras.saving.load_model(path)
        result["loaded"] = state(model)
        train(model, batches[2:])
        result["continued"] = state(model)
        resumed = build()
        fit(resumed, backup, stop=False)
        result["backup_continued"] = state(resumed)
        return result

    # One process per backend and mode: "start" writes the checkpoints of
    # one folder; "resume" trains on from those of each folder in turn.
    results = {}
    for folder in folders:
        run = start if mode == "start" else resume
        results[folder] = run(folder + "/model.keras", folder + "/backup")
    with open(out, "w") as f:
        json.dump(results, f)
    """
)


def _run(backend, mode, folders, out):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=str(ROOT))
    env.pop("JAX_ENABLE_X64", None)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, str(out)] + [str(f) for f in folders],
        cwd=ROOT, env=env, timeout=600, capture_output=True, text=True,
    )
    if result.returncode:
        raise AssertionError(
            f"{mode} under {backend} failed:\n{result.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def _started(backend, root):
    """The checkpoints of a run under `backend` (once per test process), in
    `root/backend`, with that run's states."""
    folder = pathlib.Path(root) / backend
    folder.mkdir()
    return folder, _run(backend, "start", [folder], folder / "start.json")[str(folder)]


@functools.lru_cache(maxsize=None)
def _resumed(backend, root):
    """`{first backend: states}`: one process under `backend` trains on from
    the checkpoints of each other backend (once per test process)."""
    firsts = [b for b in BACKENDS if b != backend]
    folders = [_started(first, root)[0] for first in firsts]
    out = pathlib.Path(root) / f"resumed-in-{backend}.json"
    results = _run(backend, "resume", folders, out)
    return {first: results[str(folder)] for first, folder in zip(firsts, folders)}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("checkpoints"))


def _assert_close(actual, expected, what, rtol=0.0, atol=0.0):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(
            np.asarray(a, dtype="float64"), np.asarray(e, dtype="float64"),
            rtol=rtol, atol=atol, err_msg=f"{what} {i}",
        )


def _assert_continued(resumed, started, what):
    """Trained on: equal to the first backend's continued run to
    round-off, which the continued runs moved well beyond."""
    _assert_close(resumed["weights"], started["weights"],
                  f"{what} weight", rtol=1e-4, atol=1e-5)
    _assert_close(resumed["optimizer"], started["optimizer"],
                  f"{what} optimizer variable", rtol=1e-4, atol=1e-6)


PAIRS = [(a, b) for a in BACKENDS for b in BACKENDS if a != b]


@pytest.mark.parametrize("first, second", PAIRS)
def test_checkpoints_train_on_in_another_backend(root, first, second):
    _, started = _started(first, root)
    resumed = _resumed(second, root)[first]
    assert (started["backend"], resumed["backend"]) == (first, second)
    # The .keras file loaded exactly: weights and every optimizer variable
    # (the container's step count, each per-loss Adam's moments and step
    # count); `nu` and the loss weights are float64 variables, which JAX
    # without JAX_ENABLE_X64 holds in float32 (hence rtol 1e-7).
    _assert_close(resumed["loaded"]["weights"], started["saved"]["weights"],
                  "loaded weight", rtol=1e-7)
    _assert_close(resumed["loaded"]["optimizer"],
                  started["saved"]["optimizer"], "loaded optimizer variable")
    counts = [v for v in started["saved"]["optimizer"] if np.ndim(v) == 0]
    assert 2 in counts  # Step counters are among the carried state.
    _assert_continued(resumed["continued"], started["continued"], ".keras")
    # The backup's fit, resumed in the second backend, ends where its
    # resume in the first backend ends.
    _assert_continued(resumed["backup_continued"],
                      started["backup_continued"], "backup")
    for run in ("continued", "backup_continued"):
        before = started["saved" if run == "continued" else "backup_saved"]
        moved = max(
            float(np.max(np.abs(np.subtract(a, b))))
            for a, b in zip(started[run]["weights"], before["weights"])
        )
        assert moved > 1e-3, run
