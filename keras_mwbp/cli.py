"""The `keras-mwbp` command.

`keras-mwbp train` trains a small CIFAR-style ResNet with auxiliary heads on
scikit-learn's bundled 8x8 digits (no download) and prints, for every head,
the depth, size and test accuracy of its intermediate model.

TensorFlow and Keras are imported only inside the `run_*` functions, so that
`--help` and argument errors answer at once; TensorFlow's C++ start-up log
lines are kept out of the output (unless `TF_CPP_MIN_LOG_LEVEL=0` is set).

Each subcommand has its `add_<name>_parser(commands)` function (arguments)
and its `run_<name>(args, parser)` function (the work); `build_parser`
calls the former, `main` the latter.
"""

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import sys
import zipfile

from keras_mwbp import constants
from keras_mwbp import recipe

# From keras_mwbp.constants, which imports nothing, so that parsing
# arguments imports no module that imports Keras.
METHODS = constants.METHODS
RESNET_DEPTHS = constants.RESNET_DEPTHS
DATASETS = constants.DATASETS
TFDS_DATASETS = constants.TFDS_DATASETS

# Fractions of the run after which the learning rate is divided by 10 (the
# paper's CIFAR recipe).
LR_DROPS = recipe.LR_DROPS
# `--model` names: a pattern, the builder in `keras_mwbp.models` and the
# builder's arguments from the match's groups.
MODELS = (
    (r"resnet(\d+)", "cifar_resnet", lambda d: {"depth": int(d)}),
    (r"preact_resnet(\d+)", "preact_resnet", lambda d: {"depth": int(d)}),
    (r"wrn(\d+)-(\d+)", "wide_resnet",
     lambda d, k: {"depth": int(d), "widen_factor": int(k)}),
    (r"resnext29", "resnext29", lambda: {}),
    (r"densenet_bc(\d+)", "densenet_bc", lambda d: {"depth": int(d)}),
    (r"mobilenet_v2", "cifar_mobilenet_v2", lambda: {}),
)

# What `train --output-dir D` writes in D.
RUN_FILE = "run.json"  # The run's arguments and whether it finished.
BACKUP_DIR = "backup"  # keras_mwbp.callbacks.BackupAndRestore, each epoch.
MODEL_FILE = "model.keras"
LOGS_DIR = "logs"
REPORT_CSV = "report.csv"
REPORT_JSON = "report.json"
PLOT_FILE = "heads.png"
RUN_OUTPUTS = (RUN_FILE, BACKUP_DIR, MODEL_FILE, LOGS_DIR, REPORT_CSV,
               REPORT_JSON, PLOT_FILE)
# The arguments that define a run (in run.json), with their flags.
RUN_ARGUMENTS = (
    ("model", "--model"), ("method", "--method"), ("nu", "--nu"),
    ("dataset", "--dataset"), ("losses", "--losses"),
    ("epochs", "--epochs"), ("batch_size", "--batch-size"), ("lr", "--lr"),
    ("weight_decay", "--weight-decay"), ("seed", "--seed"),
)



class CommandError(Exception):
    """A failure that `main` prints as one line and exits 1 for."""


def model_name(text):
    """`--model`: a name such as `resnet56` (checked; built later)."""
    model_builder(text)
    return text


def model_builder(name):
    """`(builder name, kwargs)` of a `--model` name such as `resnet56`; the
    builder is a function of `keras_mwbp.models`."""
    for pattern, builder, make in MODELS:
        match = re.fullmatch(pattern, name)
        if match:
            return builder, make(*match.groups())
    raise argparse.ArgumentTypeError(
        f"unknown model {name!r}; use resnet<depth>, preact_resnet<depth>, "
        "wrn<depth>-<width>, resnext29, densenet_bc<depth> or mobilenet_v2"
    )


ADAPTIVE_NU = ("adaptive-I", "adaptive-II")


def nu_value(text):
    """`--nu`: a positive number, `adaptive-I` or `adaptive-II`."""
    if text in ADAPTIVE_NU:
        return text
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(
            f"must be a positive number, adaptive-I or adaptive-II, got {text!r}"
        )
    return value


def positive(type_):
    """argparse `type` that accepts only finite values of `type_` above
    zero."""
    return _bounded(type_, lambda value: value > 0, "must be > 0")


def non_negative(type_):
    """argparse `type` that accepts only finite values of `type_` >= 0."""
    return _bounded(type_, lambda value: value >= 0, "must be >= 0")


def _bounded(type_, accept, rule):
    def parse(text):
        value = type_(text)  # A ValueError: argparse's "invalid int value".
        if not (accept(value) and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return value

    parse.__name__ = type_.__name__
    return parse


def _one_line(text):
    """`text` with every run of whitespace (newlines too) as one space."""
    return " ".join(str(text).split())


class ArgumentParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors are one line.

    `error()` prints `"<prog>: error: <message>"` on one line of stderr, with
    no usage dump, and exits with status 2 (argparse's status for usage
    errors). Subcommand parsers are of the same class.
    """

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {_one_line(message)}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows `(default: ...)` after an option's help, except where there is
    no default value (None), the option is a flag or the help already names
    its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.nargs == 0 or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser():
    """The argument parser of `keras-mwbp`, one subcommand per job."""
    parser = ArgumentParser(
        prog="keras-mwbp",
        description="Multi-way backpropagation (Guo et al., 2020) for Keras.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_train_parser(commands)
    add_export_parser(commands)
    add_report_parser(commands)
    from keras_mwbp.anytime import cli as anytime_cli  # Imports no Keras.

    anytime_cli.add_parser(commands)
    return parser


def add_train_parser(commands):
    """The `train` subcommand's arguments."""
    drops = " and ".join(f"{f * 100:g}%" for f in LR_DROPS)
    train = commands.add_parser(
        "train",
        help="train a network with auxiliary heads (default: ResNet-20 on "
        "the bundled 8x8 digits)",
        # The description is printed as it is; help strings go through
        # %-formatting (hence "%%" there).
        description="Train a network of the zoo with auxiliary heads and "
        "print each head's test accuracy. The recipe is the paper's: SGD "
        "with Nesterov momentum 0.9, coupled weight decay 1e-4, learning rate "
        f"divided by 10 after {drops} of the epochs. With --output-dir, "
        "rerunning the same command after a crash or Ctrl-C resumes at the "
        "step where it stopped.",
        formatter_class=HelpFormatter,
    )
    train.add_argument(
        "--method", choices=METHODS, default="mwbp", help="training method"
    )
    train.add_argument(
        "--nu", type=nu_value, default=2.0,
        help="decay rate of the auxiliary loss weights, or adaptive-I / "
        "adaptive-II (changed at each learning-rate drop)",
    )
    train.add_argument(
        "--depth", type=int, choices=RESNET_DEPTHS, default=20,
        help="weight layers of the ResNet (6n+2), unless --model is given",
    )
    train.add_argument(
        "--model", type=model_name, default=None,
        help="network of the zoo, e.g. resnet56, preact_resnet110, wrn28-10, "
        "resnext29, densenet_bc100, mobilenet_v2 (default: resnet<--depth>)",
    )
    train.add_argument(
        "--dataset", choices=DATASETS, default="digits",
        help="data set (tensorflow-datasets names need a local copy)",
    )
    train.add_argument("--data-dir", help="tensorflow-datasets directory")
    train.add_argument(
        "--losses", type=positive(int), default=4,
        help="number of heads, final included",
    )
    train.add_argument(
        "--epochs", type=positive(int), default=30, help="training epochs"
    )
    train.add_argument(
        "--batch-size", type=positive(int), default=64, help="training batch"
    )
    train.add_argument(
        "--lr", type=positive(float), default=0.1,
        help="initial learning rate, divided by 10 after "
        + drops.replace("%", "%%")  # %-formatted by argparse
        + " of the epochs",
    )
    train.add_argument(
        "--weight-decay", type=non_negative(float),
        default=recipe.WEIGHT_DECAY,
        help="coupled (L2) weight decay, added to the gradient of every "
        "update as in the authors' SGD (MultiWayModel's weight_decay)",
    )
    train.add_argument(
        "--seed", type=non_negative(int), default=0,
        help="seed of the weights, the data split and the shuffling",
    )
    train.add_argument(
        "--output-dir",
        help="write the model (checkpoint each epoch), a backup of the "
        "training state, TensorBoard logs, the report (CSV, JSON) and a plot "
        "of every head's error here; the same command run again resumes "
        "the run it holds",
    )
    train.add_argument(
        "--restart", action="store_true",
        help="start the run in --output-dir over, replacing what it wrote",
    )
    train.set_defaults(run=run_train, parser=train)
    return train


def add_export_parser(commands):
    """The `export` subcommand's arguments."""
    export = commands.add_parser(
        "export",
        help="save one head's intermediate model as a plain Keras model",
        description="Save intermediate model HEAD of a saved MultiWayModel "
        "as a .keras file that loads without keras_mwbp.",
    )
    export.add_argument("model", help="a MultiWayModel saved as .keras")
    export.add_argument(
        "--head", type=int, required=True,
        help="head index: 0 is the shallowest, -1 the final head",
    )
    export.add_argument("output", help="where to write the .keras file")
    export.set_defaults(run=run_export, parser=export)
    return export


def add_report_parser(commands):
    """The `report` subcommand's arguments."""
    report = commands.add_parser(
        "report",
        help="print every intermediate model's depth, size, cost and error",
        description="Print the model-selection table of a saved "
        "MultiWayModel on a data set's test split; optionally write it as "
        "CSV or JSON.",
    )
    report.add_argument("model", help="a MultiWayModel saved as .keras")
    report.add_argument(
        "--dataset", choices=DATASETS, default="digits",
        help="test data (tensorflow-datasets names need a local copy)",
    )
    report.add_argument("--data-dir", help="tensorflow-datasets directory")
    report.add_argument("--csv", help="also write the table to this CSV file")
    report.add_argument("--json", help="also write the table to this JSON file")
    report.set_defaults(run=run_report, parser=report)
    return report


# ------------------------------------------------------------------ helpers
def _import_keras():
    """Keras (and TensorFlow, started quietly)."""
    from keras_mwbp.startup import import_keras

    return import_keras()


def _same_file(a, b):
    """Whether paths `a` and `b` name the same file (links resolved)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # One does not exist.
        return False


def _check_not_input(parser, argument, path, inputs):
    """A usage error if output `path` is one of `inputs` (name -> path)."""
    for name, source in inputs.items():
        if source is not None and _same_file(path, source):
            parser.error(
                f"argument {argument}: {path} is also the {name}; writing it "
                "would overwrite that file; choose another path"
            )


def _load_model(keras, path):
    """`keras.saving.load_model(path)`; a file that is not a readable
    `.keras` model raises a `CommandError` that names it."""
    if not zipfile.is_zipfile(path):
        raise CommandError(
            f"cannot read {path}: not a .keras model file (not a zip "
            "archive: truncated, damaged or of another format)"
        )
    try:
        return keras.saving.load_model(path)
    except zipfile.BadZipFile as error:
        problem = f"the file is damaged ({_one_line(error)})"
    except KeyError as error:
        problem = (
            "not a .keras model file (a zip archive without the model's "
            f"{_one_line(error)})"
        )
    except Exception as error:  # Any other failure to rebuild the model.
        problem = f"{type(error).__name__}: {_one_line(error)}"
    raise CommandError(f"cannot read {path}: {problem}")


@contextlib.contextmanager
def _atomic(path):
    from keras_mwbp.saving import atomic_path

    with atomic_path(path) as tmp:
        yield tmp


def _check_data_dir(args, parser):
    """A usage error unless a `--data-dir` that the data set reads exists."""
    if (
        args.data_dir is not None
        and args.dataset in TFDS_DATASETS
        and "://" not in args.data_dir
        and not os.path.isdir(args.data_dir)
    ):
        parser.error(
            f"argument --data-dir: no such directory: {args.data_dir}"
        )


def _check_model_file(args, parser):
    if not os.path.exists(args.model):
        parser.error(f"argument model: no such file: {args.model}")
    if os.path.isdir(args.model):
        parser.error(f"argument model: a directory, not a file: {args.model}")


def _check_parent_dir(parser, argument, path):
    """A usage error unless the directory that would hold `path` exists."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        parser.error(f"argument {argument}: no such directory: {parent}")


# -------------------------------------------------------------------- train
def _run_config(args):
    """The arguments that define the run (what run.json records)."""
    config = {
        "model": args.model or f"resnet{args.depth}",
        "method": args.method,
        "nu": args.nu,
        "dataset": args.dataset,
        "losses": args.losses,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
    }
    return config


def _read_run_file(path):
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
        if not isinstance(run, dict) or not isinstance(run.get("config"), dict):
            raise ValueError("no 'config' object")
        return run
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise CommandError(
            f"cannot read {path}: {_one_line(error)}; it records the run in "
            "this folder: pass --restart to start that run over, or choose "
            "another --output-dir"
        ) from None


def _write_run_file(path, config, status):
    from keras_mwbp import __version__
    from keras_mwbp.saving import atomic_write_text

    run = {"config": config, "status": status, "keras_mwbp": __version__}
    atomic_write_text(path, json.dumps(run, indent=2) + "\n")


def _check_output_dir(args, parser, config):
    """Checks `--output-dir` before any work.

    Returns:
        `"new"`, `"resume"` or `"finished"` (the run D holds is done).
    """
    folder = args.output_dir
    if os.path.exists(folder) and not os.path.isdir(folder):
        parser.error(f"argument --output-dir: not a directory: {folder}")
    from keras_mwbp.saving import check_writable_dir

    try:
        check_writable_dir(folder, "--output-dir")
    except NotADirectoryError as error:
        parser.error(f"argument {error}")
    except OSError as error:
        raise CommandError(_one_line(error)) from None
    for name in (BACKUP_DIR, LOGS_DIR):
        path = os.path.join(folder, name)
        if os.path.exists(path) and not os.path.isdir(path):
            raise CommandError(
                f"{path} is a file; {name}/ must be a directory for this run"
            )
    if args.restart:
        return "new"
    present = [n for n in RUN_OUTPUTS if os.path.exists(os.path.join(folder, n))]
    run_file = os.path.join(folder, RUN_FILE)
    if not os.path.exists(run_file):
        if present:
            parser.error(
                f"argument --output-dir: {folder} holds {', '.join(present)} "
                f"but no {RUN_FILE}, so no run of this command to resume; "
                "pass --restart to replace them, or choose another "
                "--output-dir"
            )
        return "new"
    run = _read_run_file(run_file)
    stored = run["config"]
    differences = [
        f"{flag} {_show(stored.get(key))} there, {_show(config[key])} now"
        for key, flag in RUN_ARGUMENTS
        if stored.get(key) != config[key]
    ]
    if differences:
        parser.error(
            f"argument --output-dir: {folder} holds a run with other "
            f"arguments: {'; '.join(differences)}. Rerun with its arguments "
            "to resume it, pass --restart to start over, or choose another "
            "--output-dir"
        )
    if run.get("status") == "finished":
        return "finished"
    if os.path.exists(os.path.join(folder, MODEL_FILE)) and not os.path.exists(
        os.path.join(folder, BACKUP_DIR)
    ):
        parser.error(
            f"argument --output-dir: {folder} holds {MODEL_FILE} but its "
            f"training backup ({BACKUP_DIR}/) is gone, so the run cannot "
            "resume; pass --restart to start over, or choose another "
            "--output-dir"
        )
    return "resume"


def _show(value):
    return "(none)" if value is None else f"{value:g}" if isinstance(
        value, float) else str(value)


def _clear_run(folder):
    """Removes what `train` wrote in `folder` (nothing else)."""
    for name in RUN_OUTPUTS:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def _nu_boundaries(step_boundaries, steps_per_epoch):
    """The epochs whose first step has a new learning rate, for
    `AdaptiveNu(boundaries=...)`: a `PiecewiseConstantDecay` on the step
    counter changes after step `b`, seen at the start of epoch
    `b // steps_per_epoch + 1`. (The same epochs AdaptiveNu finds from the
    learning rate, but a function of the epoch alone, so a resumed run sets
    the same nu.)"""
    return sorted({b // steps_per_epoch + 1 for b in step_boundaries})


class _Interrupts:
    """SIGINT (Ctrl-C) during `train`.

    While the model trains, the first Ctrl-C asks the backup callback to
    stop after the running step with a backup of it (so nothing is lost); a
    second one, or one at any other time, raises `KeyboardInterrupt` at
    once. `main` turns either into one line and exit status 130.
    """

    def __init__(self):
        self.backup = None
        self.training = False
        self._requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # Not the main thread: Python's default stays.
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False

    def _handle(self, signum, frame):
        if self.training and self.backup is not None and not self._requested:
            self._requested = True
            self.backup.request_stop()
            return
        raise KeyboardInterrupt


def run_train(args, parser):
    """Trains as `args` say and prints the per-head table."""
    _check_data_dir(args, parser)
    if args.model is not None:
        model_builder(args.model)
    folder = args.output_dir
    config = _run_config(args)
    state = "new"
    if folder is not None:
        state = _check_output_dir(args, parser, config)
    elif args.restart:
        parser.error("argument --restart: needs --output-dir")
    if state == "finished":
        print(
            f"{parser.prog}: {folder} holds this run, finished "
            f"({args.epochs} epochs; {os.path.join(folder, MODEL_FILE)}); "
            "nothing to do (pass --restart to train it again)",
            file=sys.stderr,
        )
        return
    interrupts = _Interrupts()
    args.interrupted = lambda: _interrupted_message(args, interrupts)
    with interrupts:
        _train(args, parser, config, interrupts)


def _train(args, parser, config, interrupts):
    keras = _import_keras()
    import keras_mwbp.models
    from keras_mwbp.callbacks import AdaptiveNu
    from keras_mwbp.callbacks import BackupAndRestore
    from keras_mwbp.callbacks import ModelCheckpoint
    from keras_mwbp.callbacks import TensorBoard
    from keras_mwbp.data import load
    from keras_mwbp.report import HEAD_COLUMNS
    from keras_mwbp.report import format_table
    from keras_mwbp.report import plot_history
    from keras_mwbp.report import report
    from keras_mwbp.report import to_csv
    from keras_mwbp.report import to_json

    folder = args.output_dir
    keras.utils.set_random_seed(args.seed)
    try:
        train, test, info = load(
            args.dataset, batch_size=args.batch_size, data_dir=args.data_dir,
            seed=args.seed,
        )
        name, kwargs = model_builder(config["model"])
        adaptive = isinstance(args.nu, str)
        model = getattr(keras_mwbp.models, name)(
            **kwargs,
            num_classes=info["num_classes"],
            num_losses=args.losses,
            input_shape=info["input_shape"],
            method=args.method,
            nu=2.0 if adaptive else args.nu,
        )
    except (ValueError, ImportError, FileNotFoundError) as error:
        parser.error(str(error))
    model.shuffle_seed = args.seed  # The order of the samples in each epoch.
    steps_per_epoch = math.ceil(info["num_train"] / args.batch_size)
    boundaries = [
        round(args.epochs * steps_per_epoch * f) for f in LR_DROPS
    ]
    learning_rate = keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries=boundaries,
        values=[args.lr / 10**k for k in range(len(LR_DROPS) + 1)],
    )
    # The paper's recipe: Nesterov SGD, and coupled weight decay in every
    # update of the method (the model's, as the authors' per-loss SGDs).
    model.weight_decay = args.weight_decay
    model.compile(
        optimizer=recipe.sgd(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    if args.dataset in TFDS_DATASETS:
        data = {"x": train}
    else:
        # In-memory samples: MultiWayModel.fit orders each epoch by
        # (shuffle_seed, epoch), so a resumed run sees the same batches.
        x, y = next(iter(train.unbatch().batch(info["num_train"])))
        data = {"x": x.numpy(), "y": y.numpy(), "batch_size": args.batch_size}
    callbacks = []
    if adaptive:  # nu changes when the learning rate drops.
        callbacks.append(AdaptiveNu(
            args.nu.split("-")[1],
            boundaries=_nu_boundaries(boundaries, steps_per_epoch) or None,
        ))
    if folder:
        if args.restart:
            _clear_run(folder)
        _write_run_file(os.path.join(folder, RUN_FILE), config, "training")
        interrupts.backup = BackupAndRestore(
            os.path.join(folder, BACKUP_DIR), delete_checkpoint=False
        )
        callbacks = [interrupts.backup] + callbacks + [
            ModelCheckpoint(  # Atomic: a crash keeps the last checkpoint.
                os.path.join(folder, MODEL_FILE)),
            TensorBoard(os.path.join(folder, LOGS_DIR)),
        ]
    interrupts.training = True
    history = model.fit(
        **data, epochs=args.epochs, validation_data=test, callbacks=callbacks
    )
    interrupts.training = False
    args.trained = True
    rows = report(model, test)
    print(format_table(rows, HEAD_COLUMNS))
    if folder:
        for write, name in ((to_csv, REPORT_CSV), (to_json, REPORT_JSON),
                            (plot_history, PLOT_FILE)):
            with _atomic(os.path.join(folder, name)) as tmp:
                write(rows if write is not plot_history else history, tmp)
        _write_run_file(os.path.join(folder, RUN_FILE), config, "finished")
        shutil.rmtree(os.path.join(folder, BACKUP_DIR), ignore_errors=True)


def _interrupted_message(args, interrupts):
    folder = args.output_dir
    if folder is None:
        return ("interrupted; nothing was saved (without --output-dir a run "
                "cannot be resumed)")
    backup = interrupts.backup
    position = backup.saved_position if backup is not None else None
    if getattr(args, "trained", False):
        return (f"interrupted after training; the model is in "
                f"{os.path.join(folder, MODEL_FILE)}; rerun the same command "
                "to write the report")
    if position is None:
        return ("interrupted before the first backup; nothing to resume "
                "yet; rerun the same command to start again")
    epoch, step = position
    where = (f"epoch {epoch + 1}, step {step}" if step
             else f"the end of epoch {epoch}")
    return (f"interrupted; the training state at {where} is saved in "
            f"{backup.backup_path}; rerun the same command to resume, or add "
            "--restart to start over")


# ------------------------------------------------------------ export/report
def run_export(args, parser):
    """Saves intermediate model `args.head` of `args.model` to `args.output`."""
    if not args.output.endswith(".keras"):
        parser.error(f"OUTPUT must end in .keras, got {args.output}")
    _check_parent_dir(parser, "output", args.output)
    _check_model_file(args, parser)
    _check_not_input(parser, "output", args.output,
                     {"input model": args.model})
    keras = _import_keras()
    from keras_mwbp.saving import save_model

    model = _load_model(keras, args.model)
    try:
        exit_model = model.exit_model(args.head)
    except (OSError, ValueError, TypeError, AttributeError) as error:
        parser.error(f"cannot export head {args.head} of {args.model}: {error}")
    save_model(exit_model, args.output)
    print(
        f"head {args.head} ({model.output_names[args.head]}, depth "
        f"{model.head_depths[args.head]}, {exit_model.count_params():,} "
        f"parameters) -> {args.output}"
    )


def run_report(args, parser):
    """Prints (and writes) the per-head report of `args.model`."""
    _check_model_file(args, parser)
    _check_data_dir(args, parser)
    for argument in ("csv", "json"):
        path = getattr(args, argument)
        if path is not None:
            _check_parent_dir(parser, f"--{argument}", path)
            _check_not_input(parser, f"--{argument}", path, {
                "input model": args.model,
                "--csv file": args.csv if argument == "json" else None,
            })
    keras = _import_keras()
    from keras_mwbp.data import load
    from keras_mwbp.report import format_table
    from keras_mwbp.report import report
    from keras_mwbp.report import to_csv
    from keras_mwbp.report import to_json

    model = _load_model(keras, args.model)
    try:
        _, test, _ = load(args.dataset, data_dir=args.data_dir, augment=False)
    except (OSError, ValueError, ImportError) as error:
        parser.error(str(error))
    rows = report(model, test)
    print(format_table(rows))
    for write, path in ((to_csv, args.csv), (to_json, args.json)):
        if path:
            with _atomic(path) as tmp:
                write(rows, tmp)


# --------------------------------------------------------------------- main
def main(argv=None):
    """Entry point of the `keras-mwbp` console script.

    Args:
        argv: Arguments without the program name; `None` reads `sys.argv`.

    Returns:
        Exit status 0. Errors print one line, `"keras-mwbp <command>: error:
        <message>"`, on stderr, with no traceback, and raise `SystemExit`:
        status 2 for bad arguments (usage errors, checked before any work),
        status 1 for a failure while the command runs (a file that cannot
        be read or written, an error of the training), status 130 after
        Ctrl-C (with one line saying where the saved state is).
        `KERAS_MWBP_TRACEBACK=1` shows the traceback of an unexpected error
        instead.

    Example:

    >>> main(["train", "--epochs", "1"])
    """
    # TensorFlow's later INFO and WARNING lines; set before it is imported.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = args.parser.prog
    try:
        args.run(args, args.parser)
    except KeyboardInterrupt:
        message = getattr(args, "interrupted", lambda: "interrupted")()
        if sys.stdout.isatty():
            print(file=sys.stdout)  # End a progress bar's line.
        sys.stdout.flush()
        args.parser.exit(130, f"{prog}: {_one_line(message)}\n")
    except CommandError as error:
        args.parser.exit(1, f"{prog}: error: {_one_line(error)}\n")
    except Exception as error:
        if os.environ.get("KERAS_MWBP_TRACEBACK"):
            raise
        message = _one_line(error) or "(no message)"
        args.parser.exit(
            1, f"{prog}: error: {type(error).__name__}: {message}\n"
        )
    return 0
