"""`keras-mwbp calibrate`: anytime thresholds for a saved model.

Registered in `keras_mwbp.cli` with `add_parser(subparsers)`; `run(args,
parser)` does the work. TensorFlow and Keras are imported by `run`, not at
import time. Usage errors go through `parser.error` (exit 2, checked before
any work); errors while running propagate to `keras_mwbp.cli.main`, which
prints them on one line (exit 1).

The data set's test split is cut in two, in a fixed order: the first part
(`--calibration-fraction`, default half) calibrates, the rest measures the
table. With `--fit-temperature`, the calibration part is halved again: the
temperature is fit on its first half, the thresholds on its second.
"""

import argparse
import math
import os

from keras_mwbp import constants

# From keras_mwbp.constants, so that building the parser imports nothing
# heavy.
DATASETS = constants.DATASETS


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}")
    if not (0 < value < 1):
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def _non_negative_percent(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}")
    if not (math.isfinite(value) and 0 <= value <= 100):
        raise argparse.ArgumentTypeError(
            f"must be a percentage in [0, 100], got {text}"
        )
    return value


def _positive_number(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_parser(subparsers):
    """Adds the `calibrate` subcommand to an argparse `subparsers`."""
    parser = subparsers.add_parser(
        "calibrate",
        help="fit anytime-prediction exit thresholds and save an "
        "AnytimeModel",
        description="Calibrate per-head exit thresholds of a saved "
        "MultiWayModel on part of a data set's test split, print the "
        "accuracy-vs-multiply-adds table on the rest and save the "
        "AnytimeModel.",
    )
    parser.add_argument("model", help="a MultiWayModel saved as .keras")
    parser.add_argument(
        "--dataset", choices=DATASETS, default="digits",
        help="data set whose test split is used (tensorflow-datasets names "
        "need a local copy)",
    )
    parser.add_argument("--data-dir", help="tensorflow-datasets directory")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--max-drop", type=_non_negative_percent,
        help="largest accuracy drop against the final head, in percentage "
        "points (0.5 = half a point)",
    )
    target.add_argument(
        "--budget", type=_positive_number,
        help="average multiply-adds per sample",
    )
    target.add_argument(
        "--shares", choices=["geometric"],
        help="MSDNet's geometric exit shares (see --ratio)",
    )
    parser.add_argument(
        "--ratio", type=_positive_number, default=0.5,
        help="ratio of the geometric shares (below 1: more early exits)",
    )
    parser.add_argument(
        "--confidence", choices=["max_prob", "entropy"], default="max_prob",
        help="confidence score compared with the thresholds",
    )
    parser.add_argument(
        "--fit-temperature", action="store_true",
        help="fit temperature scaling on a separate part of the data",
    )
    parser.add_argument(
        "--calibration-fraction", type=_fraction, default=0.5,
        help="part of the test split used to calibrate (the rest is "
        "evaluated)",
    )
    parser.add_argument(
        "--output",
        help="where to save the AnytimeModel (.keras; default: MODEL with "
        "_anytime before .keras)",
    )
    parser.add_argument("--plot", help="also draw the curve to this PNG")
    parser.add_argument("--csv", help="also write the table to this CSV")
    parser.set_defaults(run=run, parser=parser)
    return parser


def _default_output(model_path):
    stem = model_path[: -len(".keras")] if model_path.endswith(".keras") else (
        model_path
    )
    return stem + "_anytime.keras"


def _check_args(args, parser):
    if not os.path.exists(args.model):
        parser.error(f"argument model: no such file: {args.model}")
    if args.output is None:
        args.output = _default_output(args.model)
    if not args.output.endswith(".keras"):
        parser.error(f"argument --output: must end in .keras, got "
                     f"{args.output}")
    for argument, path in (("--output", args.output), ("--plot", args.plot),
                           ("--csv", args.csv)):
        if path is None:
            continue
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            parser.error(f"argument {argument}: no such directory: {parent}")
    if args.data_dir is not None and "://" not in args.data_dir and (
        not os.path.isdir(args.data_dir)
    ):
        parser.error(f"argument --data-dir: no such directory: {args.data_dir}")


def _arrays(dataset):
    import numpy as np

    xs, ys = [], []
    for x, y in dataset:
        xs.append(np.asarray(x))
        ys.append(np.asarray(y))
    return np.concatenate(xs), np.concatenate(ys)


def run(args, parser):
    """Calibrates, prints the table, saves the AnytimeModel."""
    _check_args(args, parser)
    from keras_mwbp.startup import import_keras

    keras = import_keras()
    from keras_mwbp import anytime
    from keras_mwbp.data import load
    from keras_mwbp.report import to_csv
    from keras_mwbp.saving import save_model

    model = keras.saving.load_model(args.model, compile=False)
    _, test, _ = load(args.dataset, data_dir=args.data_dir, augment=False)
    x, y = _arrays(test)
    cut = int(round(len(x) * args.calibration_fraction))
    if cut < 2 or cut > len(x) - 1:
        parser.error(
            f"argument --calibration-fraction: leaves {cut} of {len(x)} "
            "samples to calibrate on"
        )
    calibration, evaluation = (x[:cut], y[:cut]), (x[cut:], y[cut:])
    kwargs = {}
    if args.fit_temperature:
        half = cut // 2
        kwargs = {"temperature": "fit",
                  "temperature_data": (x[:half], y[:half])}
        calibration = (x[half:cut], y[half:cut])
    if args.max_drop is not None:
        kwargs["max_accuracy_drop"] = args.max_drop / 100.0
    elif args.budget is not None:
        kwargs["budget"] = args.budget
    else:
        kwargs["shares"] = args.shares
        kwargs["geometric_ratio"] = args.ratio
    result = anytime.calibrate(
        model, calibration, confidence=args.confidence, **kwargs
    )
    rows = anytime.curve(
        model, evaluation, confidence=args.confidence,
        temperature=result.temperature, calibration=result,
    )
    print(
        f"calibrated on {len(calibration[0])} samples, evaluated on "
        f"{len(evaluation[0])}: thresholds "
        + ", ".join(f"{t:.4f}" for t in result.thresholds[:-1])
        + f" (final head takes the rest), temperature "
        f"{result.temperature:.4g}"
    )
    print(anytime.format_curve(rows))
    fast = anytime.AnytimeModel(model, result)
    save_model(fast, args.output)
    print(f"AnytimeModel -> {args.output}")
    if args.plot:
        anytime.plot_curve(rows, args.plot)
    if args.csv:
        to_csv(
            [{k: v for k, v in row.items() if k != "exit_fractions"}
             for row in rows],
            args.csv,
        )
    return result
