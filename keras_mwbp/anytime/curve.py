"""The accuracy-vs-multiply-adds curve of anytime prediction.

`curve(model, data)` gives one row per head alone (its intermediate model:
the accuracy and multiply-adds of `model.exit_model(i)`) and one row per
swept threshold of the anytime routing (the same threshold at every head);
`format_curve` prints the rows as a table and `plot_curve` draws them.
"""

import numpy as np

from keras_mwbp.anytime import routing
from keras_mwbp.report import _check_path
from keras_mwbp.report import format_table

#: Thresholds swept by default (the same one at every head).
DEFAULT_THRESHOLDS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98,
                      0.99, 0.995, 0.999, 1.0)

#: `(key, title, format)` columns of `format_curve`.
CURVE_COLUMNS = (
    ("route", "route", "{}"),
    ("threshold", "threshold", "{:.3f}"),
    ("accuracy", "accuracy", "{:.2%}"),
    ("multiply_adds", "multiply-adds", "{:,.0f}"),
    ("relative_cost", "/ final", "{:.3f}"),
    ("exits", "exits per head", "{}"),
)


def curve(model, data, thresholds=DEFAULT_THRESHOLDS, confidence="max_prob",
          temperature=1.0, batch_size=256, calibration=None):
    """Accuracy and average multiply-adds of each head and of routings.

    Args:
        model: A functional multi-head model (e.g. a `MultiWayModel`).
        data: `(x, y)` arrays or a `tf.data.Dataset` of `(x, y)` batches.
        thresholds: Thresholds in [0, 1] to sweep; each routing row uses
            the same one at every head.
        confidence: `"max_prob"` or `"entropy"`.
        temperature: Positive float.
        batch_size: Batch size of `model.predict`.
        calibration: Optional `CalibrationResult` (or a list of them): a
            `"calibrated"` row with its thresholds, temperature and
            confidence, measured on `data`.

    Returns:
        List of dicts, heads first, then routings by threshold, then the
        calibrated rows: `"route"` (`"head i"`, `"anytime"` or
        `"calibrated"`), `"threshold"` (`None` for a head alone or a
        calibration), `"accuracy"`, `"multiply_adds"` (average per sample),
        `"relative_cost"` (over the full model's), `"exit_fractions"` (a
        tuple; `None` for a head alone) and `"exits"` (the fractions as
        text).
    """
    routing.check_multi_head_model(model)
    confidence = routing.check_confidence(confidence)
    temperature = routing.check_temperature(temperature)
    plan = routing.ExitPlan(model)
    num_heads = plan.num_heads
    sweep = [
        routing.check_thresholds([t] * num_heads, num_heads)[0]
        for t in thresholds
    ]
    calibrations = (
        [] if calibration is None else
        list(calibration) if isinstance(calibration, (list, tuple)) else
        [calibration]
    )
    logits, labels = routing.collect_logits(model, data, batch_size)
    correct = np.stack([np.argmax(h, axis=-1) == labels for h in logits])
    costs = np.asarray(plan.exit_costs, dtype="float64")
    full = float(costs[-1])
    rows = []
    for i in range(num_heads):
        madds = float(plan.head_costs[i])
        rows.append(_row(f"head {i}", None, float(correct[i].mean()), madds,
                         full, None))

    def routed(route, threshold, values, temp, kind):
        conf = np.stack([
            routing.numpy_confidence(h, temp, kind) for h in logits
        ]).astype("float64")
        acc, madds, fractions = routing.evaluate_routing(
            conf, correct, costs, values
        )
        rows.append(_row(route, threshold, acc, madds, full, fractions))

    for t in sweep:
        routed("anytime", t, [t] * num_heads, temperature, confidence)
    for result in calibrations:
        routed("calibrated", None, list(result.thresholds),
               result.temperature, result.confidence)
    return rows


def _row(route, threshold, accuracy, madds, full, fractions):
    return {
        "route": route,
        "threshold": threshold,
        "accuracy": accuracy,
        "multiply_adds": madds,
        "relative_cost": madds / full,
        "exit_fractions": fractions,
        "exits": "-" if fractions is None else " ".join(
            f"{f:.0%}" for f in fractions
        ),
    }


def format_curve(rows):
    """The rows of `curve` as an aligned text table."""
    return format_table(rows, CURVE_COLUMNS)


def plot_curve(rows, path, title="Anytime prediction"):
    """Draws accuracy against multiply-adds and saves a PNG.

    Heads alone are points (labelled), the threshold sweep a line, the
    calibrated rows stars. Drawn with Matplotlib's Agg canvas (no display).

    Args:
        rows: As returned by `curve`.
        path: PNG file to write.
        title: Title of the plot.

    Returns:
        `path`.
    """
    target = _check_path(path)
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ValueError(
            f"`rows` must be a non-empty list of `curve` rows. Received: "
            f"rows={rows!r}"
        )
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    heads = [r for r in rows if r["route"].startswith("head")]
    sweep = sorted(
        (r for r in rows if r["route"] == "anytime"),
        key=lambda r: r["multiply_adds"],
    )
    chosen = [r for r in rows if r["route"] == "calibrated"]
    if sweep:
        axes.plot([r["multiply_adds"] for r in sweep],
                  [r["accuracy"] for r in sweep], "o-", color="C0",
                  markersize=3, label="anytime (one threshold at every head)")
    axes.plot([r["multiply_adds"] for r in heads],
              [r["accuracy"] for r in heads], "s--", color="C1",
              label="each head alone")
    for r in heads:
        axes.annotate(r["route"], (r["multiply_adds"], r["accuracy"]),
                      textcoords="offset points", xytext=(4, -10),
                      fontsize="small")
    if chosen:
        axes.plot([r["multiply_adds"] for r in chosen],
                  [r["accuracy"] for r in chosen], "*", color="C3",
                  markersize=12, label="calibrated")
    axes.set_xlabel("multiply-adds per sample")
    axes.set_ylabel("accuracy")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small", loc="lower right")
    figure.tight_layout()
    figure.savefig(target, format="png")
    return path
