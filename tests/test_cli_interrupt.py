"""Ctrl-C during `keras-mwbp train` (issue 9, item 7), in a real process:
SIGINT while training prints one line saying where the saved state is and
how to resume, with no traceback, and exits with status 130."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _start(folder, log):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.Popen(
        [sys.executable, "-m", "keras_mwbp", "train", "--depth", "8",
         "--losses", "2", "--epochs", "200", "--batch-size", "256",
         "--output-dir", folder.name],
        cwd=folder.parent, env=env, stdout=log, stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path, process, timeout=400):
    start = time.monotonic()
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() - start < timeout, "no backup appeared"
        time.sleep(0.2)


def test_sigint_prints_where_the_state_is_and_exits_130(tmp_path):
    folder = tmp_path / "run"
    backup = folder / "backup" / "backup.npz"
    with open(tmp_path / "stdout.txt", "w") as log:
        process = _start(folder, log)
        try:
            _wait_for(backup, process)  # After the first epoch.
            time.sleep(0.5)  # Into the second epoch.
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 130, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(
        "keras-mwbp train: interrupted; the training state at "), lines[0]
    assert lines[0].endswith(
        f"is saved in run/backup/backup.npz; rerun the same command to "
        "resume, or add --restart to start over"), lines[0]
    # The backup holds the position the line names.
    with np.load(backup) as saved:
        meta = json.loads(str(saved["__meta__"]))
    epoch, step = meta["epoch"], meta["step"]
    where = (f"epoch {epoch + 1}, step {step}" if step
             else f"the end of epoch {epoch}")
    assert f"the training state at {where} is saved" in lines[0]
    assert epoch < 200
    assert json.loads((folder / "run.json").read_text())["status"] == (
        "training")
