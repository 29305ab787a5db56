"""`calibrate`: per-head exit thresholds that meet a target on held-out data.

Every target works on the per-head logits of the calibration data, computed
once with `model.predict`:

- `max_accuracy_drop=d`: the cheapest thresholds (least average
  multiply-adds) whose routed accuracy is at least the final head's minus
  `d`.
- `budget=B`: the most accurate thresholds whose average multiply-adds per
  sample are at most `B`.
- `shares="geometric"` (MSDNet's budgeted batch classification, Huang et
  al. 2018): a share `q_k` of the samples proportional to `ratio ** k` exits
  at head `k`; head `k`'s threshold is the confidence that lets exactly its
  share of the samples still undecided there exit. With `budget=B` too,
  `ratio` is the largest one whose routing costs at most `B` (MSDNet's way
  of meeting a budget).

Search (targets a and b): thresholds are chosen among candidates lying
halfway between consecutive distinct confidences of each head (so a tiny
numerical difference cannot move a calibration sample across one). The
search starts from the best single threshold shared by every head, then
changes one head's threshold at a time to its best candidate given the
others, sweep after sweep, until a sweep changes nothing.
"""

import math
import warnings

import numpy as np

from keras_mwbp.anytime import routing
from keras_mwbp.anytime.calibration_result import CalibrationResult

_MAX_SWEEPS = 20


def calibrate(
    model,
    data,
    max_accuracy_drop=None,
    budget=None,
    shares=None,
    *,
    confidence="max_prob",
    temperature=None,
    temperature_data=None,
    geometric_ratio=0.5,
    batch_size=256,
    max_candidates=256,
):
    """Per-head exit thresholds of anytime prediction, fit to a target.

    Give exactly one target: `max_accuracy_drop`, `budget` or `shares`
    (`shares="geometric"` may come with a `budget`).

    Args:
        model: A functional `keras.Model` (typically a
            `keras_mwbp.MultiWayModel`) whose outputs are the logits of at
            least two heads, shallowest first.
        data: Calibration data, held out from training: `(x, y)` arrays or
            a `tf.data.Dataset` of `(x, y)` batches; integer or one-hot
            labels, of at least two classes.
        max_accuracy_drop: Largest accepted accuracy loss against the final
            head alone, as a fraction in [0, 1] (0.005 = half a point).
        budget: Largest average multiply-adds per sample (positive; at
            least the cost of exiting at the first head).
        shares: `"geometric"`, or the fraction of samples to exit at each
            head (one non-negative number per head, summing to 1).
        confidence: `"max_prob"` (top softmax probability) or `"entropy"`
            (`1 - H(p) / log(num_classes)`).
        temperature: `None` (1), a positive number, or `"fit"`: temperature
            scaling (Guo et al. 2017), the temperature minimizing the
            negative log-likelihood of every head's logits on
            `temperature_data`.
        temperature_data: The split to fit the temperature on, as `data`.
            When it is missing or is `data` itself, the temperature is fit
            on `data` with a warning (the thresholds are then fit on the same
            samples, which makes the expected accuracy optimistic).
        geometric_ratio: The `ratio` of `shares="geometric"`: positive;
            below 1 more samples exit early, above 1 fewer.
        batch_size: Batch size of `model.predict`.
        max_candidates: Most threshold candidates per head (at least 2).

    Returns:
        A `CalibrationResult` (`thresholds`, `accuracy`, `multiply_adds`,
        `temperature`, `exit_fractions`, ...), measured on `data`.

    Raises:
        ValueError: For a bad argument (named in the message), before any
            forward pass; for `data` that is empty or holds one class; and
            when no thresholds meet `max_accuracy_drop`.

    Example:

    >>> result = calibrate(model, (x_val, y_val), max_accuracy_drop=0.005)
    >>> result.thresholds, result.accuracy, result.multiply_adds
    >>> fast = AnytimeModel(model, result)
    """
    routing.check_multi_head_model(model)
    plan = routing.ExitPlan(model)
    num_heads = plan.num_heads
    costs = np.asarray(plan.exit_costs, dtype="float64")
    target = _check_target(max_accuracy_drop, budget, shares, num_heads,
                           costs)
    confidence = routing.check_confidence(confidence)
    ratio = _check_positive(geometric_ratio, "geometric_ratio")
    fit = isinstance(temperature, str)
    if fit and temperature != "fit":
        raise ValueError(
            '`temperature` must be None, a positive number or "fit". '
            f"Received: temperature={temperature!r}"
        )
    if not fit:
        temperature = routing.check_temperature(
            1.0 if temperature is None else temperature
        )
        if temperature_data is not None:
            raise ValueError(
                '`temperature_data` is only read with temperature="fit". '
                f"Received: temperature={temperature!r} and a "
                "temperature_data."
            )
    _check_int(batch_size, "batch_size", 1)
    _check_int(max_candidates, "max_candidates", 2)

    logits, labels = routing.collect_logits(model, data, batch_size)
    if fit:
        if temperature_data is None or _same_data(temperature_data, data):
            warnings.warn(
                'calibrate(temperature="fit") fits the temperature on the '
                "calibration data `data` itself, the same samples as the "
                "thresholds; pass a separate split as `temperature_data`.",
                stacklevel=2,
            )
            fit_logits, fit_labels = logits, labels
        else:
            fit_logits, fit_labels = routing.collect_logits(
                model, temperature_data, batch_size, "temperature_data"
            )
        temperature = fit_temperature(fit_logits, fit_labels)

    conf = np.stack([
        routing.numpy_confidence(head, temperature, confidence)
        for head in logits
    ]).astype("float64")
    correct = np.stack([np.argmax(h, axis=-1) == labels for h in logits])
    head_accuracies = tuple(float(a) for a in correct.mean(axis=1))
    final_accuracy = head_accuracies[-1]

    if "shares" in target:
        thresholds = _shares_search(conf, correct, costs, target, ratio)
    elif "budget" in target:
        limit = target["budget"]
        thresholds = _search(
            conf, correct, costs, max_candidates,
            feasible=lambda acc, madds: madds <= limit * (1 + 1e-12),
            key=lambda acc, madds: (-acc, madds),
        )
    else:
        floor = final_accuracy - target["max_accuracy_drop"] - 1e-12
        thresholds = _search(
            conf, correct, costs, max_candidates,
            feasible=lambda acc, madds: acc >= floor,
            key=lambda acc, madds: (madds, -acc),
        )
        if thresholds is None:
            raise ValueError(
                "`max_accuracy_drop` cannot be met on `data`: even the "
                "highest thresholds (1.0) lose more than "
                f"{target['max_accuracy_drop']!r} against the final head's "
                f"accuracy {final_accuracy:.4f}. Received: "
                f"max_accuracy_drop={target['max_accuracy_drop']!r}"
            )
    accuracy, madds, fractions = routing.evaluate_routing(
        conf, correct, costs, thresholds
    )
    return CalibrationResult(
        thresholds=tuple(float(t) for t in thresholds),
        accuracy=accuracy,
        multiply_adds=madds,
        temperature=float(temperature),
        exit_fractions=fractions,
        confidence=confidence,
        final_accuracy=final_accuracy,
        head_accuracies=head_accuracies,
        exit_costs=tuple(int(c) for c in costs),
        target=target,
        num_samples=int(len(labels)),
    )


# ------------------------------------------------------------ temperature
def fit_temperature(logits, labels):
    """The temperature minimizing the mean negative log-likelihood.

    One temperature for every head: the NLL is averaged over the heads'
    logits. The NLL of `softmax(beta * z)` is convex in `beta = 1 / T`, so a
    golden-section search over `beta` in [0.02, 50] finds its minimum.

    Args:
        logits: List of arrays `(N, num_classes)`, one per head.
        labels: Int labels `(N,)`.

    Returns:
        The temperature, a float in [0.02, 50].
    """
    heads = [np.asarray(h, dtype="float64") for h in logits]
    labels = np.asarray(labels)

    def nll(beta):
        total = 0.0
        for z in heads:
            s = beta * z
            s = s - s.max(axis=-1, keepdims=True)
            log_norm = np.log(np.exp(s).sum(axis=-1))
            total += np.mean(log_norm - s[np.arange(len(labels)), labels])
        return total / len(heads)

    low, high = 0.02, 50.0
    golden = (math.sqrt(5) - 1) / 2
    a, b = high - golden * (high - low), low + golden * (high - low)
    fa, fb = nll(a), nll(b)
    for _ in range(100):
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - golden * (high - low)
            fa = nll(a)
        else:
            low, a, fa = a, b, fb
            b = low + golden * (high - low)
            fb = nll(b)
    return 1.0 / ((low + high) / 2)


def _same_data(a, b):
    if a is b:
        return True
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        if len(a) == 2 and len(b) == 2:
            xa, xb = np.asarray(a[0]), np.asarray(b[0])
            return xa.shape == xb.shape and bool(np.array_equal(xa, xb))
    return False


# ------------------------------------------------------------ search
def candidates(conf, max_candidates=256):
    """Threshold candidates of one head: midpoints between its consecutive
    distinct confidences, 0 (every sample exits) and a value above the
    largest confidence (none exits; 1.0 when the largest is 1.0)."""
    values = np.unique(conf)
    mids = (values[:-1] + values[1:]) / 2
    if len(mids) > max_candidates - 2:
        picks = np.linspace(0, len(mids) - 1, max_candidates - 2)
        mids = mids[np.unique(np.round(picks).astype(int))]
    top = (values[-1] + 1.0) / 2 if values[-1] < 1.0 else 1.0
    return np.unique(np.concatenate([[0.0], mids, [top]]))


def _search(conf, correct, costs, max_candidates, feasible, key):
    """Coordinate search of thresholds; `None` when none is feasible."""
    num_heads = len(costs)
    options = [candidates(conf[i], max_candidates) for i in range(num_heads - 1)]

    def score(thresholds):
        acc, madds, _ = routing.evaluate_routing(
            conf, correct, costs, thresholds
        )
        return feasible(acc, madds), key(acc, madds)

    shared = np.unique(np.concatenate(options))
    if len(shared) > max_candidates:
        picks = np.linspace(0, len(shared) - 1, max_candidates)
        shared = shared[np.unique(np.round(picks).astype(int))]
    best, best_key = None, None
    for tau in shared:
        thresholds = [float(tau)] * (num_heads - 1) + [0.0]
        ok, k = score(thresholds)
        if ok and (best_key is None or k < best_key):
            best, best_key = thresholds, k
    if best is None:
        return None
    for _ in range(_MAX_SWEEPS):
        changed = False
        for i in range(num_heads - 1):
            for value in options[i]:
                trial = list(best)
                trial[i] = float(value)
                ok, k = score(trial)
                if ok and k < best_key:
                    best, best_key, changed = trial, k, True
        if not changed:
            break
    return best


def geometric_shares(num_heads, ratio):
    """MSDNet's exit shares: `q_k` proportional to `ratio ** k`."""
    weights = np.power(float(ratio), np.arange(num_heads, dtype="float64"))
    return weights / weights.sum()


def thresholds_for_shares(conf, shares):
    """Thresholds letting `shares[k]` of the samples exit at head `k`.

    Head by head, the samples still undecided are ranked by confidence and
    the threshold is put halfway between the last one that is to exit and
    the next; ties at that confidence all exit.
    """
    num_heads, n = conf.shape
    cumulative = np.round(np.cumsum(shares) * n).astype(int)
    wanted = np.diff(np.concatenate([[0], cumulative]))
    undecided = np.ones(n, dtype=bool)
    thresholds = []
    for k in range(num_heads - 1):
        scores = np.sort(conf[k][undecided])[::-1]
        count = min(int(wanted[k]), len(scores))
        if len(scores) == 0 or count == len(scores):
            t = 0.0
        elif count == 0:
            t = (scores[0] + 1.0) / 2 if scores[0] < 1.0 else 1.0
        else:
            t = (scores[count - 1] + scores[count]) / 2
        thresholds.append(float(t))
        undecided &= ~(conf[k] >= t)
    return thresholds + [0.0]


def _shares_search(conf, correct, costs, target, ratio):
    shares = target["shares"]
    num_heads = len(costs)
    if shares != "geometric":
        return thresholds_for_shares(conf, np.asarray(shares))
    if "budget" not in target:
        return thresholds_for_shares(conf, geometric_shares(num_heads, ratio))

    def cost(log_ratio):
        t = thresholds_for_shares(
            conf, geometric_shares(num_heads, math.exp(log_ratio))
        )
        return routing.evaluate_routing(conf, correct, costs, t)[1], t

    limit = target["budget"] * (1 + 1e-12)
    low, high = math.log(1e-4), math.log(1e4)
    madds, best = cost(low)
    if madds > limit:  # Ties at head 0 hold samples back: all exit there.
        return [0.0] * num_heads
    top, t = cost(high)
    if top <= limit:
        return t
    for _ in range(60):
        middle = (low + high) / 2
        madds, t = cost(middle)
        if madds <= limit:
            low, best = middle, t
        else:
            high = middle
    return best


# ------------------------------------------------------------ checks
def _check_target(max_accuracy_drop, budget, shares, num_heads, costs):
    given = [
        name for name, value in (
            ("max_accuracy_drop", max_accuracy_drop), ("budget", budget),
            ("shares", shares),
        ) if value is not None
    ]
    if not given or (
        len(given) > 1 and set(given) != {"budget", "shares"}
    ) or (len(given) == 2 and shares != "geometric"):
        raise ValueError(
            "Give exactly one target: `max_accuracy_drop`, `budget` or "
            '`shares` (or shares="geometric" with a `budget`). Received: '
            f"max_accuracy_drop={max_accuracy_drop!r}, budget={budget!r}, "
            f"shares={shares!r}"
        )
    target = {}
    if max_accuracy_drop is not None:
        if not _is_number(max_accuracy_drop) or not (
            0.0 <= max_accuracy_drop <= 1.0
        ):
            raise ValueError(
                "`max_accuracy_drop` must be a fraction in [0, 1] (0.005 is "
                "half a percentage point). Received: "
                f"max_accuracy_drop={max_accuracy_drop!r}"
            )
        target["max_accuracy_drop"] = float(max_accuracy_drop)
    if budget is not None:
        budget = _check_positive(budget, "budget")
        if budget < costs[0]:
            raise ValueError(
                "`budget` cannot be met: it is below the cost of exiting at "
                f"the first head, {int(costs[0]):,} multiply-adds per sample "
                f"(the final head costs {int(costs[-1]):,}). Received: "
                f"budget={budget!r}"
            )
        target["budget"] = budget
    if shares is not None:
        if isinstance(shares, str):
            if shares != "geometric":
                raise ValueError(
                    '`shares` must be "geometric" or one fraction per head. '
                    f"Received: shares={shares!r}"
                )
            target["shares"] = "geometric"
        else:
            values = list(shares) if hasattr(shares, "__len__") else None
            if (
                values is None
                or len(values) != num_heads
                or not all(_is_number(v) and v >= 0 for v in values)
                or abs(sum(values) - 1.0) > 1e-6
            ):
                raise ValueError(
                    f"`shares` must hold {num_heads} non-negative fractions "
                    "(one per head) summing to 1, or be \"geometric\". "
                    f"Received: shares={shares!r}"
                )
            target["shares"] = [float(v) for v in values]
    return target


def _is_number(value):
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float, np.integer, np.floating))
        and math.isfinite(value)
    )


def _check_positive(value, argument):
    if not _is_number(value) or value <= 0:
        raise ValueError(
            f"`{argument}` must be a positive finite number. Received: "
            f"{argument}={value!r}"
        )
    return float(value)


def _check_int(value, argument, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
        value < minimum
    ):
        raise ValueError(
            f"`{argument}` must be an int >= {minimum}. Received: "
            f"{argument}={value!r}"
        )
