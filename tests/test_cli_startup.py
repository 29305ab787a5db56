"""`keras-mwbp` starts fast and quietly (issue 11, section 4): `--help` and
argument errors import neither TensorFlow nor Keras, TensorFlow's C++
start-up lines stay out of the output, and the help shows no formatting
artefacts."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from keras_mwbp import cli

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("tensorflow", "keras", "jax", "torch", "sklearn", "numpy")


def _python(code, **env):
    environment = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    environment.pop("TF_CPP_MIN_LOG_LEVEL", None)  # As a user's shell has.
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
        env=environment, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize("argv", [
    ["--help"], ["train", "--help"], ["export", "--help"], ["report", "--help"],
    ["train", "--epochs", "0"], ["train", "--model", "vgg16"], ["fit"],
    ["export", "missing.keras", "--head", "0", "out.keras"],
])
def test_help_and_argument_errors_import_no_tensorflow(argv):
    done = _python(f"""
        import sys
        from keras_mwbp.cli import main
        try:
            main({argv!r})
        except SystemExit as exit:
            code = exit.code
        loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
        print("LOADED", loaded, "EXIT", code)
    """)
    assert "LOADED [] EXIT" in done.stdout, done.stdout + done.stderr
    code = 0 if "--help" in argv else 2
    assert f"EXIT {code}" in done.stdout
    assert "Traceback" not in done.stderr


def test_import_keras_mwbp_imports_no_tensorflow_and_names_stay_reachable():
    done = _python(f"""
        import sys
        import keras_mwbp
        assert not set({HEAVY!r}) & {{m.split(".")[0] for m in sys.modules}}
        from keras_mwbp import MultiWayModel, MultiWayOptimizer, attach_heads
        from keras_mwbp import AdaptiveNu, METHODS, gammas_from_depths
        from keras_mwbp import place_heads
        for name in keras_mwbp.__all__:
            getattr(keras_mwbp, name)
        # The submodules are attributes, as keras.applications is of keras.
        print(keras_mwbp.models.cifar_resnet.__name__,
              keras_mwbp.callbacks.BackupAndRestore.__name__,
              keras_mwbp.report.report.__name__, keras_mwbp.data.load.__name__)
        assert "models" in dir(keras_mwbp)
        print(sorted(keras_mwbp.__all__))
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cifar_resnet BackupAndRestore report load" in done.stdout
    assert ("['AdaptiveNu', 'AngularMarginLoss', 'CosineLogits', 'METHODS', "
            "'MultiWayModel', 'MultiWayOptimizer', "
            "'WarmupStepDecay', 'attach_heads', 'gammas_from_depths', 'place_heads', "
            "'train_heads']") in done.stdout


def test_saved_model_loads_when_keras_is_imported_after_keras_mwbp(tmp_path):
    """`import keras_mwbp` no longer imports Keras; MultiWayModel is still
    registered for `load_model` once Keras is imported."""
    done = _python(f"""
        import keras_mwbp
        import keras
        inputs = keras.Input((3,))
        hidden = keras.layers.Dense(3)(inputs)
        model = keras_mwbp.MultiWayModel(inputs, [
            keras.layers.Dense(2)(hidden),
            keras.layers.Dense(2)(keras.layers.Dense(3)(hidden))])
        model.save({str(tmp_path / "m.keras")!r})
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    done = _python(f"""
        import keras_mwbp
        import keras
        model = keras.saving.load_model({str(tmp_path / "m.keras")!r})
        print(type(model).__name__)
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["MultiWayModel"]


@pytest.mark.parametrize("module", [
    "keras_mwbp._compat", "keras_mwbp.algorithm", "keras_mwbp.graph",
    "keras_mwbp.multi_way_optimizer", "keras_mwbp.report",
])
def test_a_submodule_imported_first_imports_and_registers(module):
    """A module that imports Keras itself, first in a fresh interpreter: the
    classes register once it is done, not while it is half-imported (the
    registering modules import it: an ImportError before)."""
    done = _python(f"""
        import {module}
        import keras
        print(keras.saving.get_registered_object("keras_mwbp>MultiWayModel"))
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "keras_mwbp.multi_way_model.MultiWayModel" in done.stdout


def _help(capsys, monkeypatch, argv):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_train_help_has_no_formatting_artefacts(capsys, monkeypatch):
    out = _help(capsys, monkeypatch, ["train", "--help"])
    assert "%%" not in out
    assert "(default: None)" not in out
    assert "(default: False)" not in out
    assert "after 40% and 60% of the epochs" in out  # Description and --lr.
    assert out.count("40% and 60%") == 2
    assert "(default: resnet<--depth>)" in out
    assert "(default: 64)" in out


def test_the_shared_constants_have_one_source_that_imports_nothing():
    """keras_mwbp.constants imports no package (Keras, NumPy, ... and no
    other keras_mwbp module); the library, the CLIs and the zoo use its
    objects, not copies of them."""
    done = _python(f"""
        import sys
        before = set(sys.modules)
        import keras_mwbp.constants
        new = set(sys.modules) - before
        # The standard library may load helpers of its own (it does in a
        # fresh venv); no other package may be imported.
        print(sorted(m for m in new if m.startswith("keras_mwbp")
                     or m.split(".")[0] in {HEAVY!r}))
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["['keras_mwbp',", "'keras_mwbp.constants']"]

    from keras_mwbp import algorithm, constants, data, multi_way_model
    from keras_mwbp.anytime import cli as anytime_cli
    from keras_mwbp.models import CIFAR_RESNET_PRESETS

    for user, name in [
        (cli, "METHODS"), (multi_way_model, "METHODS"),
        (multi_way_model, "MULTIWAY_METHODS"), (algorithm, "MULTIWAY_METHODS"),
        (multi_way_model, "WEIGHTINGS"), (multi_way_model, "NAN_POLICIES"),
        (cli, "DATASETS"), (data, "DATASETS"), (anytime_cli, "DATASETS"),
        (cli, "TFDS_DATASETS"), (data, "TFDS_DATASETS"),
        (cli, "RESNET_DEPTHS"),
    ]:
        assert getattr(user, name) is getattr(constants, name), (user, name)
    assert CIFAR_RESNET_PRESETS is constants.CIFAR_RESNET_PRESETS
    assert constants.RESNET_DEPTHS == tuple(sorted(CIFAR_RESNET_PRESETS))


def test_tensorflow_start_up_lines_stay_out_of_the_output(tmp_path):
    """The TensorFlow log lines start-up prints (oneDNN, CUDA, CPU
    features; some before TF_CPP_MIN_LOG_LEVEL is read) are filtered out;
    other lines written meanwhile are kept."""
    done = _python("""
        import sys, warnings
        from keras_mwbp import startup
        with startup.quiet_start_up():
            print("a line of our own", file=sys.stderr)
            import os
            os.write(2, b"I0000 00:00:1796205498.720913   19631 port.cc:153] "
                        b"oneDNN custom operations are on.\\n")
            import tensorflow
            tensorflow.config.list_logical_devices()
        print("after", file=sys.stderr)
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.splitlines() == ["a line of our own", "after"]


def test_train_prints_no_tensorflow_log_lines(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "keras_mwbp", "train", "--epochs", "1",
         "--depth", "8", "--losses", "2", "--batch-size", "512"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={k: v for k, v in dict(os.environ, PYTHONPATH=str(ROOT)).items()
             if k != "TF_CPP_MIN_LOG_LEVEL"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""
