import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_mwbp
from keras_mwbp import MultiWayModel
from keras_mwbp.cli import main

# ResNet-8 on 8x8x1 digits with 3 losses: heads after blocks 1 and 2. With
# BN moving statistics (count_params): stem 144 + BN 64; block 1
# 2 * (2304 + 64); block 2 4608 + 9216 + 512 + 3 * 128; block 3
# 18432 + 36864 + 2048 + 3 * 256; heads BN 4c + dense 10c + 10.
RESNET8_ROWS = [
    ("0", "head_0", "3", "5,178"),  # 208 + 4736 + 234
    ("1", "head_1", "5", "20,122"),  # 208 + 4736 + 14720 + 458
    ("2", "final", "8", "78,426"),  # 208 + 4736 + 14720 + 58112 + 650
]
ROW = re.compile(r"^\s*(\d+)\s+(\S+)\s+(\d+)\s+([\d,]+)\s+([\d.]+)%$")


def table_rows(stdout):
    """(head, output, depth, params) and accuracy of each printed row."""
    lines = stdout.splitlines()
    start = next(
        i for i, line in enumerate(lines) if line.startswith("head  output")
    )
    matches = [ROW.match(line) for line in lines[start + 1:]]
    assert all(matches), lines[start:]
    return [(m.groups()[:4], float(m.group(5))) for m in matches]


def error_line(capsys, command=None):
    """The one line a failed command printed on stderr (checked: one
    non-empty line, `keras-mwbp[ command]: error: ...`, no traceback)."""
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    prefix = "keras-mwbp" + (f" {command}" if command else "")
    assert lines[0].startswith(prefix + ": error: "), lines[0]
    return lines[0]


def test_train_end_to_end(tmp_path):
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(keras_mwbp.__file__))
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [package_root, env.get("PYTHONPATH")])
    )
    done = subprocess.run(
        [sys.executable, "-m", "keras_mwbp", "train", "--epochs", "1",
         "--depth", "8", "--losses", "3", "--batch-size", "128"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Keras's progress bar: 1347 training images in batches of 128.
    assert "11/11" in done.stdout
    rows = table_rows(done.stdout)
    assert [cells for cells, _ in rows] == RESNET8_ROWS
    assert all(0 <= accuracy <= 100 for _, accuracy in rows)
    assert list(tmp_path.iterdir()) == []  # Writes no file.


@pytest.mark.parametrize("method", ["joint", "standard"])
def test_train_other_methods(method, capsys):
    assert main(["train", "--method", method, "--epochs", "1", "--depth", "8",
                 "--losses", "2", "--batch-size", "256"]) == 0
    rows = table_rows(capsys.readouterr().out)
    # 3 blocks // 2 = 1: the head sits on block 2.
    assert [cells[:3] for cells, _ in rows] == [
        ("0", "head_0", "5"), ("1", "final", "8"),
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required: command"),
        (["fit"], "invalid choice: 'fit'"),
        (["train", "--method", "dsn"], "invalid choice: 'dsn'"),
        (["train", "--epochs", "0"], "must be > 0"),
        (["train", "--epochs", "two"], "invalid int value"),
        (["train", "--nu", "-1"], "must be a positive number"),
        (["train", "--depth", "9"], "invalid choice: 9"),
        (["train", "--depth", "8", "--losses", "4"], "`num_losses`"),
        (["train", "--losses", "1"], "at least two heads"),
    ],
)
def test_bad_flags_exit_with_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in error_line(capsys, argv[0] if len(argv) > 1 else None)


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_help(argv, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # No line breaks inside the help.
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: keras-mwbp" in out
    if argv[0] == "train":
        # The defaults of the README's run: ResNet-20, 4 heads, 30 epochs.
        for default in ["(default: 20)", "(default: 4)", "(default: 30)",
                        "after 40% and 60%"]:
            assert default in out


def test_export_writes_a_plain_keras_model(tmp_path, capsys):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(4, activation="relu", name="d1")(inputs)
    aux = keras.layers.Dense(3, name="aux")(hidden)
    final = keras.layers.Dense(3, name="final")(
        keras.layers.Dense(4, activation="relu", name="d2")(hidden)
    )
    model = MultiWayModel(inputs, [aux, final])
    model.save(tmp_path / "full.keras")
    out = tmp_path / "aux.keras"
    assert main(["export", str(tmp_path / "full.keras"), "--head", "0",
                 str(out)]) == 0
    assert f"head 0 (aux, depth 1, 43 parameters) -> {out}" in (
        capsys.readouterr().out)
    exported = keras.saving.load_model(out)
    assert not isinstance(exported, MultiWayModel)  # plain Keras
    x = np.random.default_rng(0).normal(size=(5, 6)).astype("float32")
    np.testing.assert_array_equal(
        exported.predict(x, verbose=0), model.predict(x, verbose=0)[0]
    )


@pytest.mark.parametrize("argv, message", [
    (["--head", "5"], "cannot export head 5"),
    (["--head", "0", "-", "x.h5"], "OUTPUT must end in .keras"),
])
def test_export_errors_are_usage_errors(tmp_path, argv, message, capsys):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((2,))
    model = MultiWayModel(
        inputs, [keras.layers.Dense(2)(inputs)], method="standard"
    )
    model.save(tmp_path / "m.keras")
    if argv[-1] == "x.h5":
        argv = argv[:2] + [str(tmp_path / "x.h5")]
    else:
        argv = argv + [str(tmp_path / "out.keras")]
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "m.keras")] + argv)
    assert exit_info.value.code == 2
    assert message in error_line(capsys, "export")
    assert not (tmp_path / "out.keras").exists()
    assert not (tmp_path / "x.h5").exists()


def test_report_prints_and_writes_the_table(tmp_path, capsys):
    import csv
    import json

    from keras_mwbp.data import load_digits

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    aux = keras.layers.Dense(10, name="aux")(
        keras.layers.GlobalAveragePooling2D()(x))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    final = keras.layers.Dense(10, name="final")(
        keras.layers.GlobalAveragePooling2D()(x))
    model = MultiWayModel(inputs, [aux, final])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    model.save(tmp_path / "m.keras")
    _, (x_test, y_test) = load_digits()
    errors = [
        1 - np.mean(np.argmax(logits, -1) == y_test)
        for logits in model.predict(x_test, verbose=0)
    ]
    assert main(["report", str(tmp_path / "m.keras"), "--dataset", "digits",
                 "--csv", str(tmp_path / "r.csv"),
                 "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "aux" in out and "final" in out
    with open(tmp_path / "r.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["output"] for row in rows] == ["aux", "final"]
    # Conv 8*8*9*1*4 = 2304 (+ Dense 4*10 = 40) for aux; + 8*8*9*4*4 = 9216.
    assert [int(row["multiply_adds"]) for row in rows] == [2344, 11560]
    with open(tmp_path / "r.json") as f:
        rows = json.load(f)
    for row, error in zip(rows, errors):
        assert row["top1_error"] == pytest.approx(error, abs=1e-9)


def test_report_of_a_missing_file_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "none.keras")])
    assert exit_info.value.code == 2
    assert "none.keras" in error_line(capsys, "report")


def test_train_writes_checkpoint_logs_and_report(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "preact_resnet8", "--losses", "2",
                 "--epochs", "2", "--batch-size", "256", "--nu", "adaptive-II",
                 "--output-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "heads.png", "logs", "model.keras", "report.csv", "report.json",
        "run.json"]  # run.json: the run's arguments, for a rerun to resume.
    loaded = keras.saving.load_model(out / "model.keras")
    assert int(loaded.optimizer.iterations) == 2 * 6  # 1347 / 256 -> 6 steps
    # Adaptive-II starts at 2. The rate drops after 40% of the 12 steps (step
    # 5, in epoch 0), seen at the start of epoch 1: nu halves once.
    assert loaded.nu == 1.0
    assert (out / "heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((out / "logs").rglob("events.out.tfevents.*"))
    rows = table_rows(capsys.readouterr().out)
    assert [cells[1] for cells, _ in rows] == ["head_0", "final"]


def test_train_on_mnist1d_signals(capsys):
    assert main(["train", "--dataset", "mnist1d", "--depth", "8",
                 "--losses", "2", "--epochs", "1", "--batch-size", "512"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [cells[2] for cells, _ in rows] == ["5", "8"]


@pytest.mark.parametrize("argv, message", [
    (["--model", "vgg16"], "unknown model 'vgg16'"),
    (["--nu", "adaptive-III"], "got 'adaptive-III'"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/tfds"],
     "argument --data-dir: no such directory: /nonexistent/tfds"),
])
def test_train_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train"] + argv)
    assert exit_info.value.code == 2
    assert message in error_line(capsys, "train")


@pytest.mark.parametrize("where, error", [
    ("data.load", OSError("[Errno 5] Input/output error:\n'/data/digits'")),
    ("data.load", TypeError("unsupported operand\ntype(s)")),
    # After training a ValueError is no usage error either.
    ("report.report", ValueError("")),
])
def test_errors_while_running_print_one_line_and_exit_1(
    where, error, monkeypatch, capsys
):
    def fail(*args, **kwargs):
        raise error

    # The command imports what it uses when it runs (for a fast --help).
    module, name = where.split(".")
    monkeypatch.setattr(getattr(keras_mwbp, module), name, fail)
    monkeypatch.setattr(MultiWayModel, "fit", lambda self, *a, **k: None)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--depth", "8", "--losses", "2", "--epochs", "1"])
    assert exit_info.value.code == 1
    message = " ".join(str(error).split()) or "(no message)"
    assert error_line(capsys, "train") == (
        f"keras-mwbp train: error: {type(error).__name__}: {message}")


def test_export_onto_a_directory_is_one_line_exit_1(tmp_path, capsys):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((2,))
    model = MultiWayModel(
        inputs, [keras.layers.Dense(2)(inputs)], method="standard"
    )
    model.save(tmp_path / "m.keras")
    (tmp_path / "out.keras").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "m.keras"), "--head", "0",
              str(tmp_path / "out.keras")])
    assert exit_info.value.code == 1
    assert "IsADirectoryError" in error_line(capsys, "export")
