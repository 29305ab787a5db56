"""The CLI never overwrites its input and fails in one line on bad files
(issue 9, items 5, 8 and 9): an output that is also an input is refused; a
damaged `.keras` file, a zip without `config.json`, an output folder that
cannot be written, a damaged backup each print one line naming the file and
the problem and exit 1 (2 for usage errors), and nothing is overwritten."""

import os
import zipfile

import keras
import pytest

from keras_mwbp import MultiWayModel
from keras_mwbp.cli import main


def error_line(capsys, command):
    """The one line a failed command printed on stderr."""
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith(f"keras-mwbp {command}: error: "), lines[0]
    return lines[0]


def _fails(argv, code, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    return error_line(capsys, argv[0])


def _snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    aux = keras.layers.Dense(10, name="aux")(
        keras.layers.GlobalAveragePooling2D()(x))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    final = keras.layers.Dense(10, name="final")(
        keras.layers.GlobalAveragePooling2D()(x))
    model = MultiWayModel(inputs, [aux, final])
    path = tmp_path_factory.mktemp("model") / "m.keras"
    model.save(path)
    return path


@pytest.fixture
def folder(tmp_path, model_file):
    """A folder with a copy of the model file, `m.keras`."""
    (tmp_path / "m.keras").write_bytes(model_file.read_bytes())
    return tmp_path


# ----------------------------------------------- an output that is an input
@pytest.mark.parametrize("output", [
    "m.keras", "./m.keras", "sub/../m.keras", "link.keras", "hard.keras",
])
def test_export_onto_its_input_is_refused(folder, output, capsys,
                                          monkeypatch):
    monkeypatch.chdir(folder)
    os.mkdir("sub")
    os.symlink("m.keras", "link.keras")
    os.link("m.keras", "hard.keras")
    before = _snapshot(folder)
    line = _fails(["export", "m.keras", "--head", "0", output], 2, capsys)
    assert line == (
        f"keras-mwbp export: error: argument output: {output} is also the "
        "input model; writing it would overwrite that file; choose another "
        "path")
    assert _snapshot(folder) == before


@pytest.mark.parametrize("flags, message", [
    (["--csv", "m.keras"], "argument --csv: m.keras is also the input model"),
    (["--json", "./m.keras"],
     "argument --json: ./m.keras is also the input model"),
    (["--csv", "r.txt", "--json", "r.txt"],
     "argument --json: r.txt is also the --csv file"),
])
def test_report_onto_its_input_is_refused(folder, flags, message, capsys,
                                          monkeypatch):
    monkeypatch.chdir(folder)
    before = _snapshot(folder)
    line = _fails(["report", "m.keras"] + flags, 2, capsys)
    assert message in line
    assert _snapshot(folder) == before


# ---------------------------------------------------- damaged model files
def _damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "flipped":
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("model.weights.h5")
        # Flip bytes inside the weights' compressed data.
        start = info.header_offset + 30 + len(info.filename) + 64
        for i in range(start, start + 16):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "no_config":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("metadata.json", "{}")
    elif how == "text":
        path.write_text("not a model")


DAMAGES = {
    "flipped": "the file is damaged (Bad CRC-32 for file 'model.weights.h5')",
    "truncated": "not a .keras model file (not a zip archive",
    "no_config": "not a .keras model file (a zip archive without the "
                 "model's \"There is no item named 'config.json' in the "
                 "archive\")",
    "text": "not a .keras model file (not a zip archive",
}


@pytest.mark.parametrize("how", sorted(DAMAGES))
@pytest.mark.parametrize("command", ["export", "report"])
def test_damaged_model_file_is_one_line_exit_1(folder, how, command, capsys):
    path = folder / "m.keras"
    _damage(path, how)
    argv = {
        "export": ["export", str(path), "--head", "0",
                   str(folder / "out.keras")],
        "report": ["report", str(path), "--csv", str(folder / "r.csv")],
    }[command]
    before = _snapshot(folder)
    line = _fails(argv, 1, capsys)
    assert line.startswith(f"keras-mwbp {command}: error: cannot read {path}: ")
    assert DAMAGES[how] in line
    assert _snapshot(folder) == before  # No output written.


# ------------------------------------------ output folders that cannot work
@pytest.mark.parametrize("kind, code, message", [
    # Root writes anywhere but on a read-only file system such as /sys.
    ("read_only", 1, "--output-dir '/sys' is not writable: Permission denied"),
    ("read_only_new", 1,
     "--output-dir '/sys/keras_mwbp_run' is not writable"),
    ("file", 2, "argument --output-dir: not a directory"),
    ("under_file", 2, "which is a file, not a directory"),
    ("logs_file", 1, "logs is a file; logs/ must be a directory"),
])
def test_output_dir_that_cannot_be_written_fails_before_training(
    tmp_path, kind, code, message, capsys
):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    output = {
        "read_only": "/sys",
        "read_only_new": "/sys/keras_mwbp_run",
        "file": str(blocker),
        "under_file": str(blocker / "run"),
        "logs_file": str(tmp_path / "run"),
    }[kind]
    if kind == "logs_file":
        os.makedirs(output)
        (tmp_path / "run" / "logs").write_text("x")
        (tmp_path / "run" / "run.json").write_text(
            '{"config": {}, "status": "training"}')
    before = _snapshot(tmp_path)
    line = _fails(["train", "--depth", "8", "--losses", "2", "--epochs", "1",
                   "--output-dir", output], code, capsys)
    assert message in line
    assert _snapshot(tmp_path) == before


def test_damaged_run_file_is_one_line_exit_1(tmp_path, capsys):
    (tmp_path / "run.json").write_text("{not json")
    before = _snapshot(tmp_path)
    line = _fails(["train", "--output-dir", str(tmp_path)], 1, capsys)
    assert f"cannot read {tmp_path / 'run.json'}: " in line
    assert "pass --restart to start that run over" in line
    assert _snapshot(tmp_path) == before
