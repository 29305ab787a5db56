"""keras_mwbp.callbacks.ProgbarLogger: the lines `fit` prints.

The end-to-end tests run `fit` in a child process whose stdout is a
pseudo-terminal (`pty`) or a pipe, with Keras's own callback machinery, and
read what a terminal or a log file would show.
"""

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import textwrap

import keras
import pytest

import keras_mwbp
from keras_mwbp.callbacks import ProgbarLogger
from keras_mwbp.callbacks import progbar_logger

from conftest import mlp_data
from conftest import mlp_model
from conftest import sparse_ce

pytestmark = pytest.mark.oldest_keras()

# One xdist worker runs the whole file (conftest.ONE_WORKER_FILES), so its
# module-scoped fixtures are built once, not once per worker.

HEADS = ["head_0", "head_1", "head_2", "head_3", "final"]
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Fits a 5-head model with validation data at verbose=1 and verbose=2 with
# stdout as given (a terminal), then again with stdout a pipe (file
# descriptor argv[2]) and once at verbose=0; prints each History's logs as
# JSON.
CHILD = textwrap.dedent(
    r"""
    import json, os, sys, time
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras, numpy as np
    import keras_mwbp

    keras.utils.set_random_seed(0)
    L = keras.layers
    inputs = keras.Input((6,))
    x, outputs = inputs, []
    for i, name in enumerate(%(heads)r):
        x = L.Dense(8, activation="relu")(x)
        outputs.append(L.Dense(3, name=name)(x))
    model = keras_mwbp.MultiWayModel(inputs, outputs)
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6)).astype("float32")
    y = rng.integers(0, 3, 96)
    # Slow batches, so that the bar is redrawn mid-epoch.
    slow = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: time.sleep(0.03))
    terminal = sys.stdout
    pipe = os.fdopen(int(sys.argv[2]), "w", encoding="utf-8")
    histories = {}
    for where, stream in (("terminal", terminal), ("pipe", pipe)):
        sys.stdout = stream
        for verbose in (1, 2):
            callbacks = [slow] if verbose == 1 and where == "terminal" else []
            if verbose == 1 and where == "pipe":
                callbacks.append(keras.callbacks.CSVLogger(sys.argv[1]))
            print(f"<<verbose={verbose}>>", flush=True)
            history = model.fit(x, y, batch_size=8, epochs=2, verbose=verbose,
                                validation_data=(x[:32], y[:32]),
                                callbacks=callbacks)
            histories[f"{where}{verbose}"] = history.history
    pipe.close()
    sys.stdout = terminal
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0,
                        validation_data=(x[:32], y[:32]))
    histories["0"] = history.history
    print("<<history>>" + json.dumps(histories), flush=True)
    """
) % {"heads": HEADS}


@pytest.fixture(scope="module")
def child_run(tmp_path_factory):
    """Runs CHILD with stdout a 200-column pseudo-terminal; returns
    (terminal text, pipe text, histories, csv path)."""
    tmp_path = tmp_path_factory.mktemp("progbar")
    csv_path = str(tmp_path / "log.csv")
    read_end, write_end = os.pipe()
    env = dict(os.environ, PYTHONPATH=os.getcwd(), TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("COLUMNS", None)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, csv_path, str(write_end)],
        stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE,
        env=env, pass_fds=(write_end,),
    )
    os.close(slave)
    os.close(write_end)
    chunks = {master: [], read_end: []}
    open_fds = set(chunks)
    while open_fds:
        ready, _, _ = select.select(sorted(open_fds), [], [], 300)
        assert ready, "the child printed nothing for 300 s"
        for fd in ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal.
                chunk = b""
            if chunk:
                chunks[fd].append(chunk)
            else:
                open_fds.discard(fd)
                os.close(fd)
    stderr = child.stderr.read()
    assert child.wait(timeout=300) == 0, stderr.decode()[-3000:]
    terminal = b"".join(chunks[master]).decode("utf-8")
    pipe = b"".join(chunks[read_end]).decode("utf-8")
    terminal, history = terminal.split("<<history>>")
    return terminal, pipe, json.loads(history), csv_path


def _sections(text):
    """{verbose: output} of the child's fits."""
    parts = re.split(r"<<verbose=(\d)>>", text)
    return {int(v): out for v, out in zip(parts[1::2], parts[2::2])}


def _screen_rows(text):
    """Each stretch a terminal draws without a line feed, ANSI codes
    removed: the text after each carriage return (a redraw) of each line.
    Returns (segments, max column reached on any terminal row)."""
    segments, widest = [], 0
    for line in _ANSI.sub("", text).split("\n"):
        column = 0
        for part in re.split(r"(\r|\x08)", line):
            if part == "\r":
                column = 0
            elif part == "\x08":
                column = max(0, column - 1)
            elif part:
                segments.append(part)
                column += len(part)
                widest = max(widest, column)
    return segments, widest


def _final_lines(output):
    return [
        s for s in _screen_rows(output)[0]
        if re.match(r"\s*12/12 ", s) and "val" in s
    ]


def _values(line, group):
    """The per-head values after `group` (e.g. "acc", "val acc")."""
    match = re.search(
        rf"(?:^| - ){re.escape(group)} ([-\d.| ]+?)(?: - |\s*$)", line
    )
    assert match, (group, line)
    return [v.strip() for v in match.group(1).split("|")]


def _expected(history, prefix, epoch):
    return [
        f"{100 * history[f'{prefix}{name}_accuracy'][epoch]:.1f}"
        for name in HEADS
    ]


def _check_output(output, history, columns):
    segments, widest = _screen_rows(output)
    assert widest <= columns, max(segments, key=len)
    assert all(len(s) <= columns for s in segments)
    text = _ANSI.sub("", output)
    assert "gamma" not in text and "nu" not in text.replace("Unknown", "")
    finals = _final_lines(output)
    assert len(finals) == 2, finals  # One per epoch.
    for epoch, line in enumerate(finals):
        # Heads in depth order (final last), the values History holds.
        assert _values(line, "acc") == _expected(history, "", epoch)
        assert _values(line, "val acc") == _expected(history, "val_", epoch)
        assert f"- loss {history['loss'][epoch]:.3f}" in line
        assert f"- val loss {history['val_loss'][epoch]:.3f}" in line


def _check_history(histories, csv_path):
    expected = {"loss", "nu"} | {f"gamma_{i}" for i in range(5)}
    for name in HEADS:
        expected |= {f"{name}_loss", f"{name}_accuracy"}
    expected |= {f"val_{k}" for k in expected if k[:5] not in ("gamma", "nu")}
    assert set(histories) == {"terminal1", "terminal2", "pipe1", "pipe2", "0"}
    for run, history in histories.items():
        assert set(history) == expected, run
    with open(csv_path) as f:
        header = f.readline().strip().split(",")
    assert {"nu", "gamma_0", "gamma_4", "final_accuracy"} <= set(header)
    assert histories["pipe1"]["gamma_4"] == [1.0, 1.0]


def test_fit_in_a_terminal_fits_120_columns(child_run):
    # A 200-column terminal: the lines still fit in 120.
    output, _, histories, _ = child_run
    sections = _sections(output)
    for verbose in (1, 2):
        _check_output(sections[verbose], histories[f"terminal{verbose}"], 120)
    # verbose=1 redrew the bar mid-epoch (in place, with a carriage return).
    segments = _screen_rows(sections[1])[0]
    partial = [s for s in segments if re.match(r"\s*\d+/12 ", s)
               and not s.lstrip().startswith("12/12")]
    assert partial and "\r" in sections[1]
    assert all("val" not in s for s in partial)
    assert "\x1b[32m" in sections[1]  # Keras's green bar.


def test_fit_piped_to_a_log_fits_120_columns(child_run):
    _, output, histories, _ = child_run
    sections = _sections(output)
    for verbose in (1, 2):
        out = sections[verbose]
        assert "\r" not in out and "\x08" not in out and "\x1b" not in out
        assert max(len(line) for line in out.split("\n")) <= 120
        _check_output(out, histories[f"pipe{verbose}"], 120)
        # Nothing but the epoch headers and one final line per epoch.
        lines = [line for line in out.split("\n") if line.strip()]
        assert lines[0] == "Epoch 1/2" and len(lines) == 4, lines


def test_history_and_csv_keys_unchanged(child_run):
    *_, histories, csv_path = child_run
    _check_history(histories, csv_path)


# ----------------------------------------------------- in-process layout
def _logs(heads, metrics=("accuracy",), value=0.123456, val=True):
    logs = {"loss": 1.234567, "nu": 2.0}
    for i, name in enumerate(heads):
        logs[f"gamma_{i}"] = 0.5
        logs[f"{name}_loss"] = value
        for metric in metrics:
            logs[f"{name}_{metric}"] = 1.0 if i == len(heads) - 1 else value
    if val:
        logs.update({f"val_{k}": v for k, v in list(logs.items())
                     if not k.startswith(("nu", "gamma"))})
    return logs


def _draw(capsys, logs, heads, target=1563, verbose=1, columns=120,
          current=None, finalize=True):
    bar = progbar_logger._CompactProgbar(
        target=target, verbose=verbose, output_names=heads, columns=columns,
        dynamic=False, interval=0.0,
    )
    bar.update(current or target, logs, finalize=finalize)
    return capsys.readouterr().out


def test_five_heads_with_long_numbers_fit(capsys):
    # 4-digit step counts and 100.0% accuracies.
    out = _draw(capsys, _logs(HEADS), HEADS)
    (line,) = out.splitlines()
    assert len(line) <= 120, line
    assert _values(line, "acc") == ["12.3"] * 4 + ["100.0"]
    assert _values(line, "val acc") == ["12.3"] * 4 + ["100.0"]
    assert "loss 1.235" in line and "val loss 1.235" in line


def test_four_heads_keep_spaced_separators(capsys):
    heads = HEADS[1:]
    line = _draw(capsys, _logs(heads), heads, target=8).strip()
    assert " - acc 12.3 | 12.3 | 12.3 | 100.0 - " in line
    assert len(line) <= 120


def test_too_many_metrics_wrap_final_lines_and_cut_redraws(capsys):
    metrics = ("accuracy", "top_k_categorical_accuracy", "mse")
    logs = _logs(HEADS, metrics)
    out = _draw(capsys, logs, HEADS)
    lines = out.splitlines()
    assert len(lines) > 1 and all(len(line) <= 120 for line in lines)
    assert all(line.startswith("    - ") for line in lines[1:])
    text = " ".join(lines)
    for group in ("acc", "top_k_categorical_acc", "mse", "val mse"):
        assert f" - {group} " in text
    # An in-progress line is cut, never wrapped.
    out = _draw(capsys, {k: v for k, v in logs.items() if "val" not in k},
                HEADS, current=7, finalize=False)
    assert out.count("\n") == 1 and len(out.rstrip("\n")) == 120
    assert out.rstrip().endswith("...")


def test_narrow_terminal_columns(capsys):
    out = _draw(capsys, _logs(HEADS), HEADS, columns=60)
    assert all(len(line) <= 60 for line in out.splitlines())


def test_head_losses_shown_without_metrics(capsys):
    logs = _logs(HEADS, metrics=(), val=False)
    line = _draw(capsys, logs, HEADS, target=8).strip()
    assert line.endswith(
        " - loss 1.235 - losses 0.123 | 0.123 | 0.123 | 0.123 | 0.123")


def test_hidden_and_kept_keys(capsys):
    logs = {"loss": 0.5, "nu": 2.0, "gamma_0": 0.1, "skipped_steps": 0.0,
            "learning_rate": 0.01}
    line = _draw(capsys, logs, [], target=8).strip()
    assert line.endswith("- loss 0.500 - lr 0.010")
    logs["skipped_steps"] = 3.0
    assert "- skipped_steps 3" in _draw(capsys, logs, [], target=8)


def test_verbose_2_line(capsys):
    line = _draw(capsys, _logs(HEADS[2:]), HEADS[2:], target=8, verbose=2)
    assert re.match(r"8/8 - \d+s - \d+[mu]?s/step - loss 1.235 - acc 12.3 \| "
                    r"12.3 \| 100.0 - val loss 1.235 - val acc", line)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match=r"`columns` must be an integer of "
                       r"at least 20, or None. Received: columns=10"):
        ProgbarLogger(columns=10)
    with pytest.raises(ValueError, match="`log_interval` must be a positive"):
        ProgbarLogger(log_interval=0)


# ---------------------------------------------------- installed by fit
def _fit_callbacks(monkeypatch, callbacks, verbose=1):
    """The callbacks `keras.Model.fit` ends up with."""
    model = mlp_model()
    model.compile(optimizer="sgd", loss=sparse_ce())
    x, y = mlp_data(8)
    captured = []
    original = keras.callbacks.CallbackList.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        captured.append(list(self.callbacks))

    monkeypatch.setattr(keras.callbacks.CallbackList, "__init__", init)
    model.fit(x, y, epochs=1, verbose=verbose, callbacks=callbacks)
    return captured[0]


def _bars(callbacks):
    return [c for c in callbacks
            if isinstance(c, keras.callbacks.ProgbarLogger)]


def test_fit_installs_the_compact_progbar(monkeypatch, capsys):
    bars = _bars(_fit_callbacks(monkeypatch, []))
    assert len(bars) == 1 and isinstance(bars[0], ProgbarLogger)
    out = capsys.readouterr().out
    assert re.fullmatch(r"1/1 \S+ \d+s \d+[mu]?s/step - loss \d\.\d{3} - "
                        r"losses \d\.\d{3} \| \d\.\d{3} \| \d\.\d{3}\n", out)


def test_fit_keeps_a_given_progbar(monkeypatch):
    given = keras.callbacks.ProgbarLogger()
    assert _bars(_fit_callbacks(monkeypatch, [given])) == [given]
    assert _bars(_fit_callbacks(monkeypatch, [], verbose=0)) == []


def test_exported():
    assert keras_mwbp.callbacks.ProgbarLogger is ProgbarLogger
    assert ProgbarLogger().get_config() == {
        "columns": None, "log_interval": 30.0}
