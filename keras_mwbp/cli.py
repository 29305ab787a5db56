"""The `keras-mwbp` command.

`keras-mwbp train` trains a small CIFAR-style ResNet with auxiliary heads on
scikit-learn's bundled 8x8 digits (no download) and prints, for every head,
the depth, size and test accuracy of its intermediate model.
"""

import argparse
import math
import os
import re

import keras

from keras_mwbp.data import DATASETS
from keras_mwbp.data import TFDS_DATASETS
from keras_mwbp.data import load
from keras_mwbp.callbacks import AdaptiveNu
from keras_mwbp.callbacks import ModelCheckpoint
from keras_mwbp.callbacks import TensorBoard
from keras_mwbp.models import CIFAR_RESNET_PRESETS
from keras_mwbp.models import cifar_mobilenet_v2
from keras_mwbp.models import cifar_resnet
from keras_mwbp.models import densenet_bc
from keras_mwbp.models import preact_resnet
from keras_mwbp.models import resnext29
from keras_mwbp.models import wide_resnet
from keras_mwbp.multi_way_model import METHODS
from keras_mwbp.report import HEAD_COLUMNS
from keras_mwbp.report import format_table
from keras_mwbp.report import plot_history
from keras_mwbp.report import report
from keras_mwbp.report import to_csv
from keras_mwbp.report import to_json
from keras_mwbp.saving import save_model

# Fractions of the run after which the learning rate is divided by 10 (the
# paper's CIFAR recipe).
LR_DROPS = (0.4, 0.6)
# `--model` names: a pattern and the builder of its match's groups.
MODELS = (
    (r"resnet(\d+)", lambda d: (cifar_resnet, {"depth": int(d)})),
    (r"preact_resnet(\d+)", lambda d: (preact_resnet, {"depth": int(d)})),
    (r"wrn(\d+)-(\d+)", lambda d, k: (
        wide_resnet, {"depth": int(d), "widen_factor": int(k)})),
    (r"resnext29", lambda: (resnext29, {})),
    (r"densenet_bc(\d+)", lambda d: (densenet_bc, {"depth": int(d)})),
    (r"mobilenet_v2", lambda: (cifar_mobilenet_v2, {})),
)


def model_builder(name):
    """`(builder, kwargs)` of a `--model` name such as `resnet56`."""
    for pattern, make in MODELS:
        match = re.fullmatch(pattern, name)
        if match:
            return make(*match.groups())
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


def build_parser():
    """The argument parser of `keras-mwbp`, one subcommand per job."""
    parser = ArgumentParser(
        prog="keras-mwbp",
        description="Multi-way backpropagation (Guo et al., 2020) for Keras.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="train a network with auxiliary heads (default: ResNet-20 on "
        "the bundled 8x8 digits)",
        description="Train a network of the zoo with auxiliary heads and "
        "print each head's test accuracy. The recipe is the paper's: SGD "
        "with Nesterov momentum 0.9, weight decay 1e-4, learning rate "
        "divided by 10 after 40%% and 60%% of the epochs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
        "--depth", type=int, choices=sorted(CIFAR_RESNET_PRESETS), default=20,
        help="weight layers of the ResNet (6n+2), unless --model is given",
    )
    train.add_argument(
        "--model", type=model_builder, default=None,
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
        + " and ".join(f"{f * 100:g}%%" for f in LR_DROPS)  # %% for argparse
        + " of the epochs",
    )
    train.add_argument(
        "--weight-decay", type=non_negative(float), default=1e-4,
        help="decoupled weight decay of SGD",
    )
    train.add_argument(
        "--seed", type=non_negative(int), default=0,
        help="seed of the weights, the data split and the shuffling",
    )
    train.add_argument(
        "--output-dir",
        help="write the model (checkpoint each epoch), TensorBoard logs, the "
        "report (CSV, JSON) and a plot of every head's error here",
    )
    train.set_defaults(run=run_train, parser=train)
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
    from keras_mwbp.anytime import cli as anytime_cli  # Imports no Keras.

    anytime_cli.add_parser(commands)
    return parser


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


def _check_parent_dir(parser, argument, path):
    """A usage error unless the directory that would hold `path` exists."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        parser.error(f"argument {argument}: no such directory: {parent}")


def run_train(args, parser):
    """Trains as `args` say and prints the per-head table."""
    _check_data_dir(args, parser)
    if args.output_dir is not None and (
        os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir)
    ):
        parser.error(
            f"argument --output-dir: not a directory: {args.output_dir}"
        )
    keras.utils.set_random_seed(args.seed)
    try:
        train, test, info = load(
            args.dataset, batch_size=args.batch_size, data_dir=args.data_dir,
            seed=args.seed,
        )
        builder, kwargs = args.model or (cifar_resnet, {"depth": args.depth})
        adaptive = isinstance(args.nu, str)
        model = builder(
            **kwargs,
            num_classes=info["num_classes"],
            num_losses=args.losses,
            input_shape=info["input_shape"],
            method=args.method,
            nu=2.0 if adaptive else args.nu,
        )
    except (ValueError, ImportError, FileNotFoundError) as error:
        parser.error(str(error))
    steps = args.epochs * math.ceil(info["num_train"] / args.batch_size)
    learning_rate = keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries=[round(steps * fraction) for fraction in LR_DROPS],
        values=[args.lr / 10**k for k in range(len(LR_DROPS) + 1)],
    )
    model.compile(
        optimizer=keras.optimizers.SGD(
            learning_rate, momentum=0.9, nesterov=True,
            weight_decay=args.weight_decay or None,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    callbacks = []
    if adaptive:  # nu changes when the learning rate drops.
        callbacks.append(AdaptiveNu(args.nu.split("-")[1]))
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        callbacks += [
            ModelCheckpoint(  # Atomic: a crash keeps the last checkpoint.
                os.path.join(args.output_dir, "model.keras")),
            TensorBoard(os.path.join(args.output_dir, "logs")),
        ]
    history = model.fit(
        train, epochs=args.epochs, validation_data=test, callbacks=callbacks
    )
    rows = report(model, test)
    print(format_table(rows, HEAD_COLUMNS))
    if args.output_dir:
        to_csv(rows, os.path.join(args.output_dir, "report.csv"))
        to_json(rows, os.path.join(args.output_dir, "report.json"))
        plot_history(history, os.path.join(args.output_dir, "heads.png"))


def run_export(args, parser):
    """Saves intermediate model `args.head` of `args.model` to `args.output`."""
    if not args.output.endswith(".keras"):
        parser.error(f"OUTPUT must end in .keras, got {args.output}")
    _check_parent_dir(parser, "output", args.output)
    _check_model_file(args, parser)
    try:
        model = keras.saving.load_model(args.model)
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
        if getattr(args, argument) is not None:
            _check_parent_dir(parser, f"--{argument}", getattr(args, argument))
    try:
        model = keras.saving.load_model(args.model)
        _, test, _ = load(args.dataset, data_dir=args.data_dir, augment=False)
    except (OSError, ValueError, ImportError) as error:
        parser.error(str(error))
    rows = report(model, test)
    print(format_table(rows))
    if args.csv:
        to_csv(rows, args.csv)
    if args.json:
        to_json(rows, args.json)


def main(argv=None):
    """Entry point of the `keras-mwbp` console script.

    Args:
        argv: Arguments without the program name; `None` reads `sys.argv`.

    Returns:
        Exit status 0. Errors print one line, `"keras-mwbp <command>: error:
        <message>"`, on stderr, with no traceback, and raise `SystemExit`:
        status 2 for bad arguments (usage errors, checked before any work),
        status 1 for a `ValueError`, `TypeError`, `OSError` or `ImportError`
        while the command runs.

    Example:

    >>> main(["train", "--epochs", "1"])
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args, args.parser)
    except (ValueError, TypeError, OSError, ImportError) as error:
        message = _one_line(error) or "(no message)"
        args.parser.exit(
            1, f"{args.parser.prog}: error: {type(error).__name__}: {message}\n"
        )
    return 0
