"""`MultiWayModel` under TensorFlow's `MultiWorkerMirroredStrategy`: two
worker processes on localhost (TF_CONFIG with loopback ports).

- Two workers train like one device on the same global batch, for mwbp and
  joint.
- A worker killed (SIGKILL) mid-run: the other is killed too, both are
  restarted with `keras_mwbp.callbacks.BackupAndRestore` on the shared
  backup folder, and the run ends where the uninterrupted one ends.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import tensorflow_only

pytestmark = [tensorflow_only, pytest.mark.oldest_keras()]

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    import numpy as np
    import tensorflow as tf

    mode, task, out, backup_dir = sys.argv[1:5]
    task = int(task)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import keras
    import keras_mwbp

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = rng.integers(0, 3, 64)

    def build(method):
        inputs = keras.Input((6,))
        h = keras.layers.Dense(5, activation="relu", name="d1",
                               kernel_regularizer="l2")(inputs)
        aux = keras.layers.Dense(3, name="aux")(h)
        h = keras.layers.Dense(5, activation="relu", name="d2")(h)
        final = keras.layers.Dense(3, name="final")(h)
        return keras_mwbp.MultiWayModel(inputs, [aux, final], method=method,
                                        head_weights=[0.5, 1.0])

    def compile(model):
        model.compile(
            keras.optimizers.SGD(0.1, momentum=0.9),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    def fit(model, callbacks=()):
        # 2 epochs of 4 global batches of 16 (8 per worker).
        return model.fit(x, y, batch_size=16, epochs=2, shuffle=False,
                         verbose=0, callbacks=list(callbacks)).history

    class KillAt(keras.callbacks.Callback):
        # SIGKILL this worker after its 5th step (mid second epoch).
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == 5:
                os.kill(os.getpid(), signal.SIGKILL)

    def single_device(method):
        keras.utils.set_random_seed(0)
        model = build(method)
        initial = model.get_weights()
        compile(model)
        history = fit(model)
        return initial, model, history

    def state(model):
        return [w.tolist() for w in model.get_weights()] + [
            np.asarray(v.numpy()).tolist()
            for v in model.optimizer.variables]

    result = {"replicas": strategy.num_replicas_in_sync}
    methods = ("mwbp", "joint") if mode == "compare" else ("mwbp",)
    for method in methods:
        initial, single, history = single_device(method)
        with strategy.scope():
            model = build(method)
            model.set_weights(initial)
            compile(model)
        callbacks = []
        if mode == "compare":
            # A folder per worker: only the chief's gets a backup file.
            callbacks.append(keras_mwbp.callbacks.BackupAndRestore(
                os.path.join(backup_dir, f"{method}-{task}"), save_freq=2,
                delete_checkpoint=False))
        else:
            callbacks.append(keras_mwbp.callbacks.BackupAndRestore(
                backup_dir, save_freq=1, delete_checkpoint=False))
        if mode == "crash" and task == 1:
            callbacks.append(KillAt())
        distributed = fit(model, callbacks)
        result[method] = {
            "single": state(single), "workers": state(model),
            "single_history": history, "workers_history": distributed,
            "iterations": int(model.optimizer.iterations.numpy()),
        }
    if task == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    """
)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_workers(mode, folder):
    """Two worker processes of one cluster; returns them (task 0 first)."""
    ports = _free_ports(2)
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    workers = []
    for task in range(2):
        env = dict(
            os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3",
            PYTHONPATH=str(ROOT),
            TF_CONFIG=json.dumps(
                {"cluster": cluster, "task": {"type": "worker",
                                              "index": task}}),
        )
        workers.append(subprocess.Popen(
            [sys.executable, "-c", SCRIPT, mode, str(task),
             str(folder / f"{mode}.json"), str(folder / "backup")],
            cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        ))
    return workers


def _finish(workers, timeout=240):
    """Waits for both workers; fails with their error output if one
    fails."""
    try:
        outputs = [w.communicate(timeout=timeout) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    for task, (w, (_, err)) in enumerate(zip(workers, outputs)):
        if w.returncode:
            raise AssertionError(
                f"worker {task} exited with {w.returncode}:\n{err[-3000:]}")


def _max_diff(a, b):
    assert len(a) == len(b)
    return max(float(np.max(np.abs(np.subtract(p, q))))
               for p, q in zip(a, b))


def _read(folder, mode):
    with open(folder / f"{mode}.json") as f:
        return json.load(f)


def test_two_workers_train_like_one_device(tmp_path):
    """Every weight and optimizer variable, the History and the step count
    of a 2-worker fit equal a 1-device fit on the same global batches; only
    the chief writes a backup."""
    _finish(_start_workers("compare", tmp_path))
    result = _read(tmp_path, "compare")
    assert result["replicas"] == 2
    for method in ("mwbp", "joint"):
        # Only the chief (worker 0) writes backups.
        assert (tmp_path / "backup" / f"{method}-0" / "backup.npz").exists()
        assert not (tmp_path / "backup" / f"{method}-1" / "backup.npz").exists()
    for method in ("mwbp", "joint"):
        run = result[method]
        assert run["iterations"] == 8
        assert _max_diff(run["workers"], run["single"]) < 1e-6, method
        # Trained: the weights moved well beyond the tolerance.
        assert set(run["workers_history"]) == set(run["single_history"])
        for key, values in run["single_history"].items():
            np.testing.assert_allclose(run["workers_history"][key], values,
                                       rtol=1e-5, atol=1e-6, err_msg=key)
        assert run["single_history"]["loss"][1] < run["single_history"][
            "loss"][0]


def test_killed_worker_resumes_from_the_last_backup(tmp_path):
    """Worker 1 is SIGKILLed after step 5 of 8; worker 0 cannot go on
    without it and is killed too. Both restarted resume from the chief's
    backup and end with the state of the uninterrupted run."""
    workers = _start_workers("crash", tmp_path)
    try:
        workers[1].communicate(timeout=240)
    finally:
        workers[0].kill()
        workers[0].communicate()
        workers[1].kill()
    assert workers[1].returncode == -signal.SIGKILL
    backup = tmp_path / "backup" / "backup.npz"
    with np.load(backup) as saved:
        meta = json.loads(str(saved["__meta__"]))
    # Backed up mid-run: after step 4 (the end of the first epoch) or step
    # 5 (the chief's own step 5 may end before it is killed).
    assert (meta["epoch"], meta["step"]) in [(0, 4), (1, 1)], meta
    _finish(_start_workers("resume", tmp_path))
    run = _read(tmp_path, "resume")["mwbp"]
    assert run["iterations"] == 8
    assert _max_diff(run["workers"], run["single"]) < 1e-6
    assert run["workers_history"]["loss"] == pytest.approx(
        run["single_history"]["loss"], rel=1e-5)
