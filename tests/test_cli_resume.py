"""`keras-mwbp train --output-dir D` never loses work (issue 9, items 6-8):
the same command run again resumes at the step where it stopped, with the
project's BackupAndRestore in D; `--restart` starts over; other arguments in
an existing D are refused in one line; Ctrl-C (a real SIGINT) stops after
the running step with a backup of it, prints one line and exits 130."""

import json
import os
import signal

import keras
import numpy as np
import pytest

from keras_mwbp import MultiWayModel
from keras_mwbp.cli import main

# One xdist worker runs the whole file (conftest.ONE_WORKER_FILES), so its
# module-scoped fixtures are built once, not once per worker.

# ResNet-8 on the 1347 training digits in batches of 256: 6 steps an epoch.
ARGS = ["train", "--depth", "8", "--losses", "2", "--epochs", "2",
        "--batch-size", "256", "--nu", "adaptive-II"]
STEPS = 12


def _train(folder, *extra):
    return main(ARGS + ["--output-dir", str(folder)] + list(extra))


def _weights(folder):
    model = keras.saving.load_model(os.path.join(folder, "model.keras"))
    values = [keras.ops.convert_to_numpy(v) for v in model.variables]
    values += [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables]
    return model, values


def _snapshot(folder):
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


class _Trained(keras.callbacks.Callback):
    """Counts the steps this process trained; with `sigint_at`, sends
    SIGINT to this process after that optimizer step, as Ctrl-C does."""

    steps = 0

    def __init__(self, sigint_at=None):
        super().__init__()
        self.sigint_at = sigint_at

    def on_train_batch_begin(self, batch, logs=None):
        self._before = int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step == self._before:
            return  # A batch a resumed run skips (trained before).
        _Trained.steps += 1
        if step == self.sigint_at:
            os.kill(os.getpid(), signal.SIGINT)


def _hook_fit(monkeypatch):
    """Makes `train`'s fit use a `_Trained(plan["sigint_at"])` callback."""
    fit = MultiWayModel.fit
    plan = {"sigint_at": None}

    def hooked(self, *args, callbacks=None, **kwargs):
        callbacks = list(callbacks or []) + [_Trained(plan["sigint_at"])]
        return fit(self, *args, callbacks=callbacks, **kwargs)

    monkeypatch.setattr(MultiWayModel, "fit", hooked)
    _Trained.steps = 0
    return plan


@pytest.fixture
def hooked_fit(monkeypatch):
    return _hook_fit(monkeypatch)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    assert _train(folder) == 0
    return folder


def _interrupt(folder, at, plan, capsys=None):
    """Runs ARGS in `folder` with SIGINT after step `at`; returns the line
    printed on stderr."""
    plan["sigint_at"] = at
    with pytest.raises(SystemExit) as exit_info:
        if capsys is None:
            import contextlib
            import io

            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                _train(folder)
        else:
            _train(folder)
    plan["sigint_at"] = None
    assert exit_info.value.code == 130
    err = err.getvalue() if capsys is None else capsys.readouterr()[1]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run interrupted by SIGINT after step 8 (epoch 2, batch 2), the
    line it printed and the steps it trained."""
    folder = tmp_path_factory.mktemp("interrupted")
    with pytest.MonkeyPatch.context() as monkeypatch:
        plan = _hook_fit(monkeypatch)
        line = _interrupt(folder, 8, plan)
    return folder, line, _Trained.steps


@pytest.fixture
def copy_of_interrupted(interrupted, tmp_path):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(interrupted[0], folder)
    # run.json and the backup name no folder: a copy resumes as well.
    return folder


def test_ctrl_c_stops_after_the_step_with_a_backup(interrupted):
    folder, line, steps = interrupted
    # SIGINT after step 8 (epoch 2, batch 2): the backup callback stops after
    # the next step, with a backup of it.
    backup = folder / "backup" / "backup.npz"
    assert line == (
        f"keras-mwbp train: interrupted; the training state at epoch 2, step "
        f"3 is saved in {backup}; rerun the same command to resume, or add "
        "--restart to start over")
    # (Our callback runs after the backup's, which stopped after step 9.)
    assert steps == 8
    with np.load(backup) as saved:
        meta = json.loads(str(saved["__meta__"]))
        iterations = [saved[f"optimizer/{i}"] for i in range(
            len(meta["paths"]["optimizer"]))]
    assert (meta["epoch"], meta["step"]) == (1, 3)
    assert int(iterations[0]) == 9
    assert meta["position"]["batch_size"] == 256
    assert json.loads((folder / "run.json").read_text())["status"] == (
        "training")


def test_rerun_resumes_step_exact(copy_of_interrupted, uninterrupted,
                                  hooked_fit):
    tmp_path = copy_of_interrupted
    _Trained.steps = 0
    assert _train(tmp_path) == 0  # The same command again.
    assert _Trained.steps == STEPS - 9  # Only the steps still to do.
    assert sorted(os.listdir(tmp_path)) == [
        "heads.png", "logs", "model.keras", "report.csv", "report.json",
        "run.json"]  # The backup is removed once the run is finished.
    model, resumed = _weights(tmp_path)
    reference_model, reference = _weights(uninterrupted)
    assert int(model.optimizer.iterations) == STEPS
    assert model.nu == reference_model.nu == 1.0  # Adaptive-II, one drop.
    for got, want in zip(resumed, reference):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    got = json.loads((tmp_path / "report.json").read_text())
    want = json.loads((uninterrupted / "report.json").read_text())
    for row, expected in zip(got, want):
        assert row["top1_error"] == pytest.approx(expected["top1_error"],
                                                  abs=1e-6)
    assert json.loads((tmp_path / "run.json").read_text())["status"] == (
        "finished")


def test_restart_starts_over(copy_of_interrupted, uninterrupted, hooked_fit):
    tmp_path = copy_of_interrupted
    (tmp_path / "mine.txt").write_text("not the run's")
    _Trained.steps = 0
    assert _train(tmp_path, "--restart") == 0
    assert _Trained.steps == STEPS  # From the first step.
    _, weights = _weights(tmp_path)
    for got, want in zip(weights, _weights(uninterrupted)[1]):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert (tmp_path / "mine.txt").read_text() == "not the run's"


def test_other_arguments_in_an_existing_run_are_refused(
    copy_of_interrupted, hooked_fit, capsys
):
    tmp_path = copy_of_interrupted
    before = _snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(ARGS[:-4] + ["--batch-size", "128", "--nu", "adaptive-II",
                          "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    _, err = capsys.readouterr()
    assert err.splitlines() == [
        f"keras-mwbp train: error: argument --output-dir: {tmp_path} holds a "
        "run with other arguments: --batch-size 256 there, 128 now. Rerun "
        "with its arguments to resume it, pass --restart to start over, or "
        "choose another --output-dir"]
    assert _snapshot(tmp_path) == before
    assert _Trained.steps == 0  # Nothing trained by the refused command.


def test_rerun_of_a_finished_run_changes_nothing(uninterrupted, capsys):
    before = _snapshot(uninterrupted)
    capsys.readouterr()
    assert _train(uninterrupted) == 0
    _, err = capsys.readouterr()
    assert err.splitlines() == [
        f"keras-mwbp train: {uninterrupted} holds this run, finished (2 "
        f"epochs; {uninterrupted / 'model.keras'}); nothing to do (pass "
        "--restart to train it again)"]
    assert _snapshot(uninterrupted) == before


@pytest.mark.parametrize("present", [["model.keras"], ["backup"]])
def test_files_of_an_unknown_run_are_not_overwritten(tmp_path, present,
                                                     capsys):
    for name in present:
        if name == "backup":
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_text("a model")
    before = _snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        _train(tmp_path)
    assert exit_info.value.code == 2
    _, err = capsys.readouterr()
    assert f"{tmp_path} holds {present[0]} but no run.json" in err
    assert "pass --restart to replace them" in err
    assert _snapshot(tmp_path) == before


def test_damaged_backup_is_one_line_exit_1(copy_of_interrupted, hooked_fit,
                                          capsys):
    tmp_path = copy_of_interrupted
    backup = tmp_path / "backup" / "backup.npz"
    data = bytearray(backup.read_bytes())
    backup.write_bytes(bytes(data[: len(data) // 2]))
    before = _snapshot(tmp_path)
    _Trained.steps = 0
    with pytest.raises(SystemExit) as exit_info:
        _train(tmp_path)
    assert exit_info.value.code == 1
    _, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(
        f"keras-mwbp train: error: ValueError: The backup file '{backup}' is "
        "damaged or not a keras_mwbp backup (BadZipFile: ")
    assert _snapshot(tmp_path) == before  # model.keras kept as it was.
    assert _Trained.steps == 0
