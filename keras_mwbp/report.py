"""Per-head summaries of a trained `MultiWayModel`: its intermediate models.

`report(model, data)` gives the paper's model-selection table: for every
intermediate model its depth, parameters, multiply-adds (conv and dense
layers only, see `count_multiply_adds`) and top-1/top-5 error. The rows
print with `format_table` and export with `to_csv`/`to_json`;
`plot_history` draws each head's error over the epochs of a `fit`.
"""

import csv
import json
import os

import keras

from keras_mwbp import _compat
import numpy as np

# (row key, column title, format of a value) of the `head_table` columns.
HEAD_COLUMNS = (
    ("head", "head", "{}"),
    ("output", "output", "{}"),
    ("depth", "depth", "{}"),
    ("params", "params", "{:,}"),
    ("accuracy", "test accuracy", "{:.2%}"),
)


def head_table(model, x_test, y_test, batch_size=256):
    """Depth, size and test accuracy of every head's intermediate model.

    Args:
        model: A `keras_mwbp.MultiWayModel` whose outputs are logits.
        x_test: Test inputs.
        y_test: Integer test labels, shape `(N,)` or `(N, 1)`.
        batch_size: Batch size of the forward pass.

    Returns:
        List of dicts, one per head, shallowest first, with keys `"head"`
        (index), `"output"` (output name), `"depth"` (tap depth),
        `"params"` (`model.exit_model(i).count_params()`) and `"accuracy"`
        (fraction of test samples whose arg-max logit is the label).

    Example:

    >>> rows = head_table(model, x_test, y_test)
    >>> print(format_table(rows))
    """
    logits = keras.tree.flatten(
        model.predict(x_test, batch_size=batch_size, verbose=0)
    )
    labels = np.reshape(y_test, (-1,))
    return [
        {
            "head": index,
            "output": name,
            "depth": depth,
            "params": model.exit_model(index).count_params(),
            "accuracy": float(np.mean(np.argmax(head, axis=-1) == labels)),
        }
        for index, (name, depth, head) in enumerate(
            zip(model.output_names, model.head_depths, logits)
        )
    ]


def format_table(rows, columns=None):
    """Formats rows of dicts as an aligned text table.

    Text is aligned left and numbers right; a `None` value shows as `-`.

    Args:
        rows: List of dicts, e.g. as returned by `head_table` or `report`.
        columns: `(key, title, format)` triples, one per column: the row
            key, the column title and the `str.format` pattern of a value.
            Default: `REPORT_COLUMNS` for rows of `report` (they have
            `"multiply_adds"`), else `HEAD_COLUMNS`.

    Returns:
        The table as a string: a header line, then one line per row.

    Example:

    >>> print(format_table([{"head": 0, "output": "head_0_dense",
    ...                      "depth": 5, "params": 9914, "accuracy": 0.9}]))
    head  output        depth  params  test accuracy
       0  head_0_dense      5   9,914         90.00%
    """
    if columns is None:
        report_rows = rows and all("multiply_adds" in row for row in rows)
        columns = REPORT_COLUMNS if report_rows else HEAD_COLUMNS
    keys = [key for key, _, _ in columns]
    left = [any(isinstance(row[key], str) for row in rows) for key in keys]
    cells = [[title for _, title, _ in columns]]
    cells += [
        ["-" if row[key] is None else fmt.format(row[key])
         for key, _, fmt in columns]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(keys))]
    lines = [
        "  ".join(
            cell.ljust(width) if is_left else cell.rjust(width)
            for cell, width, is_left in zip(line, widths, left)
        ).rstrip()
        for line in cells
    ]
    return "\n".join(lines)


# ------------------------------------------------------------- multiply-adds
def count_multiply_adds(model):
    """Multiply-adds of one example's forward pass through a functional model.

    The convention is the paper's "MAdds": only convolutions and fully
    connected layers are counted, one multiply-add per weight use. Biases,
    batch normalization, activations, pooling, element-wise additions and
    every other layer count 0. Per call (node) of a layer in `model`:

    - `Conv1D`/`Conv2D`/`Conv3D`:
      `prod(output spatial dims) * prod(kernel_size) * (c_in / groups) *
      filters`.
    - `Conv1DTranspose`/`Conv2DTranspose`/`Conv3DTranspose`:
      `prod(input spatial dims) * prod(kernel_size) * c_in * filters`.
    - `DepthwiseConv1D`/`DepthwiseConv2D`:
      `prod(output spatial dims) * prod(kernel_size) * c_in *
      depth_multiplier`.
    - `SeparableConv1D`/`SeparableConv2D`: the depthwise count plus the
      pointwise one, `prod(output spatial dims) * c_in * depth_multiplier *
      filters`.
    - `Dense`: `units_in * units_out`, times the product of the input's
      inner dimensions between the batch axis and the last one.
    - A nested functional or `Sequential` model: its own count.

    A shared layer counts once per call in `model`. For intermediate model
    `i` of a `MultiWayModel`, use `count_multiply_adds(model.exit_model(i))`.

    Args:
        model: A built functional `keras.Model` (or a `keras.Sequential` with
            a known input shape) whose inputs have known non-batch
            dimensions.

    Returns:
        The number of multiply-adds, an int.

    Raises:
        ValueError: If `model` is not a functional model, or an input's
            non-batch dimensions are not all known.

    Example:

    >>> inputs = keras.Input((8, 8, 1))
    >>> x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> outputs = keras.layers.Dense(10)(x)
    >>> count_multiply_adds(keras.Model(inputs, outputs))  # 2304 + 40
    2344
    """
    graph = _functional_graph(model)
    for tensor in graph.inputs:
        if any(dim is None for dim in tuple(tensor.shape)[1:]):
            raise ValueError(
                "`model` must have inputs of known shape (all but the batch "
                f"dimension) to count multiply-adds. Input {tensor.name!r} "
                f"of model {model.name!r} has shape {tuple(tensor.shape)}."
            )
    total = 0
    for nodes in _compat.nodes_by_depth(graph).values():
        for node in nodes:
            total += _node_multiply_adds(node)
    return int(total)


def _functional_graph(model):
    """The functional graph of `model`, or a ValueError naming `model`."""
    if isinstance(model, keras.Sequential):
        model = _compat.sequential_graph(model) or model
    if not isinstance(model, keras.Model) or _compat.nodes_by_depth(
        model
    ) is None:
        raise ValueError(
            "`model` must be a functional keras.Model (or a built "
            f"keras.Sequential). Received: model={model!r}"
        )
    return model


def _spatial(shape, data_format):
    """Spatial dims of a conv tensor shape (batch axis first)."""
    if data_format == "channels_first":
        return shape[2:], shape[1]
    return shape[1:-1], shape[-1]


def _node_multiply_adds(node):
    layer = node.operation
    if isinstance(layer, keras.Model):
        return count_multiply_adds(layer) if node.input_tensors else 0
    if not isinstance(layer, _COUNTED_LAYERS):
        return 0
    in_shape = tuple(node.input_tensors[0].shape)
    out_shape = tuple(node.outputs[0].shape)
    if any(dim is None for dim in in_shape[1:] + out_shape[1:]):
        raise ValueError(
            f"Layer {layer.name!r} has unknown shapes: input {in_shape}, "
            f"output {out_shape}; `model` needs fully known input shapes."
        )
    if isinstance(layer, keras.layers.Dense):
        return int(np.prod(in_shape[1:])) * out_shape[-1]
    data_format = getattr(layer, "data_format", "channels_last")
    in_spatial, c_in = _spatial(in_shape, data_format)
    out_spatial, _ = _spatial(out_shape, data_format)
    kernel = int(np.prod(layer.kernel_size))
    out_positions = int(np.prod(out_spatial))
    if isinstance(layer, _SEPARABLE_LAYERS):
        depthwise = out_positions * kernel * c_in * layer.depth_multiplier
        return depthwise + (
            out_positions * c_in * layer.depth_multiplier * layer.filters
        )
    if isinstance(layer, _DEPTHWISE_LAYERS):
        return out_positions * kernel * c_in * layer.depth_multiplier
    if isinstance(layer, _TRANSPOSE_LAYERS):
        return int(np.prod(in_spatial)) * kernel * c_in * layer.filters
    groups = getattr(layer, "groups", 1)
    return out_positions * kernel * (c_in // groups) * layer.filters


_SEPARABLE_LAYERS = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
_DEPTHWISE_LAYERS = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_TRANSPOSE_LAYERS = (
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
)
_COUNTED_LAYERS = (
    keras.layers.Dense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
) + _SEPARABLE_LAYERS + _DEPTHWISE_LAYERS + _TRANSPOSE_LAYERS


# -------------------------------------------------------------------- errors
def top_k_errors(logits, labels, k=5):
    """Top-1 and top-k error of one head's logits.

    Args:
        logits: Array of shape `(N, num_classes)`.
        labels: Integer labels, shape `(N,)` or `(N, 1)`, or one-hot labels
            of shape `(N, num_classes)`.
        k: The `k` of the top-k error.

    Returns:
        `(top1_error, topk_error)` as floats; `topk_error` is `None` when the
        head has fewer than `k` classes. A sample is a top-k hit when its
        label is among the `k` largest logits (ties broken by class index).

    Example:

    >>> top_k_errors(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1]))
    (0.5, None)
    """
    hits1, hitsk, count = _count_hits(np.asarray(logits), labels, k)
    if count == 0:
        raise ValueError("`logits` must hold at least one sample.")
    return 1.0 - hits1 / count, (None if hitsk is None else 1.0 - hitsk / count)


def _labels_vector(labels, num_classes, count):
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == num_classes and num_classes > 1:
        labels = np.argmax(labels, axis=-1)  # One-hot labels.
    labels = np.reshape(labels, (-1,))
    if labels.shape[0] != count:
        raise ValueError(
            f"`y` must hold one label per sample: got {labels.shape[0]} "
            f"labels for {count} samples."
        )
    return labels


def _count_hits(logits, labels, k):
    """(top-1 hits, top-k hits or None, sample count) of a batch."""
    logits = np.reshape(logits, (logits.shape[0], -1))
    count, num_classes = logits.shape
    labels = _labels_vector(labels, num_classes, count)
    hits1 = int(np.sum(np.argmax(logits, axis=-1) == labels))
    if num_classes < k:
        return hits1, None, count
    # Stable descending order: ties go to the lower class index.
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    hitsk = int(np.sum(np.any(top == labels[:, None], axis=-1)))
    return hits1, hitsk, count


# -------------------------------------------------------------------- report
REPORT_COLUMNS = (
    ("head", "head", "{}"),
    ("output", "output", "{}"),
    ("depth", "depth", "{}"),
    ("params", "params", "{:,}"),
    ("multiply_adds", "multiply-adds", "{:,}"),
    ("top1_error", "top-1 error", "{:.2%}"),
    ("top5_error", "top-5 error", "{:.2%}"),
)


def report(model, data, batch_size=256):
    """The model-selection table: every intermediate model's cost and error.

    Args:
        model: A `keras_mwbp.MultiWayModel` whose outputs are logits.
        data: Evaluation data: an `(x, y)` tuple of arrays, or a
            `tf.data.Dataset` of `(x, y)` batches. Labels are integers
            (shape `(N,)` or `(N, 1)`) or one-hot.
        batch_size: Batch size of the forward pass over arrays (a dataset
            keeps its own batches); a positive int.

    Returns:
        List of dicts, one per head, shallowest first, with the keys of
        `head_table` (`"head"`, `"output"`, `"depth"`, `"params"`,
        `"accuracy"`) and `"multiply_adds"` (`count_multiply_adds` of the
        head's intermediate model; conv and dense layers only),
        `"top1_error"` and `"top5_error"` (`None` for a head with fewer than
        5 classes).

    Raises:
        ValueError: If `data`, `batch_size` or `model` are not as above.

    Example:

    >>> rows = report(model, (x_test, y_test))
    >>> print(format_table(rows))
    >>> to_csv(rows, "heads.csv")
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or (
        batch_size < 1
    ):
        raise ValueError(
            f"`batch_size` must be a positive int. Received: "
            f"batch_size={batch_size!r}"
        )
    if not hasattr(model, "exit_model") or not hasattr(model, "head_depths"):
        raise ValueError(
            f"`model` must be a keras_mwbp.MultiWayModel. Received: "
            f"model={model!r}"
        )
    hits = _evaluate(model, data, batch_size)
    rows = []
    for index, (name, depth) in enumerate(
        zip(model.output_names, model.head_depths)
    ):
        hits1, hits5, count = hits[index]
        exit_model = model.exit_model(index)
        rows.append(
            {
                "head": index,
                "output": name,
                "depth": int(depth),
                "params": int(exit_model.count_params()),
                "multiply_adds": count_multiply_adds(exit_model),
                "accuracy": hits1 / count,
                "top1_error": 1.0 - hits1 / count,
                "top5_error": None if hits5 is None else 1.0 - hits5 / count,
            }
        )
    return rows


def _batches(model, data, batch_size):
    """Yields `(logits, y)` of batches of `data`, or raises a ValueError."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
        size = len(keras.tree.flatten(x)[0])
        if len(y) != size:
            raise ValueError(
                f"`data` must hold as many labels as inputs: got {len(y)} "
                f"labels for {size} inputs."
            )
        if size == 0:
            return
        yield model.predict(x, batch_size=batch_size, verbose=0), y
        return
    if _is_dataset(data):
        for element in data:
            if not isinstance(element, (tuple, list)) or len(element) < 2:
                raise ValueError(
                    "`data` must be a dataset of `(x, y)` batches. Received "
                    f"an element of type {type(element).__name__}."
                )
            yield model.predict_on_batch(element[0]), element[1]
        return
    raise ValueError(
        "`data` must be an `(x, y)` tuple of arrays or a tf.data.Dataset of "
        f"`(x, y)` batches. Received: data of type {type(data).__name__}"
    )


def _is_dataset(data):
    try:
        import tensorflow as tf
    except ImportError:  # pragma: no cover - TensorFlow is the backend.
        return False
    return isinstance(data, tf.data.Dataset)


def _evaluate(model, data, batch_size):
    """Per head: (top-1 hits, top-5 hits or None, sample count)."""
    totals = None
    for outputs, y in _batches(model, data, batch_size):
        logits = keras.tree.flatten(outputs)
        labels = keras.ops.convert_to_numpy(y)
        counts = [_count_hits(np.asarray(head), labels, 5) for head in logits]
        if totals is None:
            totals = counts
            continue
        totals = [
            (a1 + b1, None if ak is None else ak + bk, an + bn)
            for (a1, ak, an), (b1, bk, bn) in zip(totals, counts)
        ]
    if totals is None:
        raise ValueError("`data` must hold at least one sample.")
    return totals


# ------------------------------------------------------------------ exports
def _check_rows(rows):
    if (
        not isinstance(rows, (list, tuple))
        or not rows
        or not all(isinstance(row, dict) for row in rows)
    ):
        raise ValueError(
            f"`rows` must be a non-empty list of dicts. Received: rows={rows!r}"
        )
    keys = []
    for row in rows:
        keys += [key for key in row if key not in keys]
    return keys


def _check_path(path):
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(
            f"`path` must be a file path (str or os.PathLike). Received: "
            f"path={path!r}"
        )
    return os.fspath(path)


def to_csv(rows, path):
    """Writes report rows as CSV: a header of the row keys, one line per row.

    `None` (e.g. a missing top-5 error) is written as an empty cell; floats
    with `repr`, so they parse back exactly.

    Args:
        rows: List of dicts, e.g. as returned by `report`.
        path: Path of the CSV file to write.

    Returns:
        `path`.

    Example:

    >>> to_csv(report(model, (x_test, y_test)), "heads.csv")
    'heads.csv'
    """
    keys = _check_rows(rows)
    target = _check_path(path)
    with open(target, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {key: _plain(row.get(key)) for key in keys}
            )
    return path


def to_json(rows, path):
    """Writes report rows as a JSON list of objects (`None` as `null`).

    Args:
        rows: List of dicts, e.g. as returned by `report`.
        path: Path of the JSON file to write.

    Returns:
        `path`.

    Example:

    >>> to_json(report(model, (x_test, y_test)), "heads.json")
    'heads.json'
    """
    _check_rows(rows)
    target = _check_path(path)
    plain = [{key: _plain(value) for key, value in row.items()} for row in rows]
    with open(target, "w", encoding="utf-8") as file:
        json.dump(plain, file, indent=2)
        file.write("\n")
    return path


def _plain(value):
    """NumPy scalars as Python ones, for csv and json."""
    if isinstance(value, np.generic):
        return value.item()
    return value


# --------------------------------------------------------------------- plot
def plot_history(history, path, metric="accuracy", output_names=None):
    """Plots each head's error (1 - metric) over epochs and saves a PNG.

    One color per head; training error solid with round markers,
    validation error (the `val_` keys, when present) dashed with square
    markers (a one-epoch history draws one marker per line). Drawn with
    Matplotlib's Agg canvas, without pyplot, so no display or global
    backend is needed.

    Args:
        history: A `keras.callbacks.History` (as returned by `fit`) or its
            `.history` dict of per-epoch logs.
        path: Path of the PNG file to write.
        metric: Name of the compiled accuracy-like metric; head `name`'s
            values are under `"<name>_<metric>"` (and `"val_<name>_<metric>"`).
        output_names: Head names, in order. Default: the `History`'s model's
            `output_names`, else every key ending in `"_<metric>"`.

    Returns:
        `path`.

    Raises:
        ValueError: If `history`, `path` or `metric` are invalid, or no
            key of `history` holds `metric`.

    Example:

    >>> history = model.fit(x, y, validation_split=0.1, epochs=5)
    >>> plot_history(history, "heads.png")
    'heads.png'
    """
    logs = getattr(history, "history", history)
    if not isinstance(logs, dict):
        raise ValueError(
            "`history` must be a keras.callbacks.History or its `.history` "
            f"dict. Received: history of type {type(history).__name__}"
        )
    target = _check_path(path)
    if not isinstance(metric, str) or not metric:
        raise ValueError(
            f"`metric` must be a non-empty str. Received: metric={metric!r}"
        )
    if output_names is None:
        output_names = _history_output_names(history)
    names = _plotted_heads(logs, metric, output_names)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(names))]
    for name, color in zip(names, colors):
        key = f"{name}_{metric}" if name else metric
        for prefix, style, marker, label in (
            ("", "-", "o", "train"), ("val_", "--", "s", "val")
        ):
            values = logs.get(prefix + key)
            if values is None:
                continue
            errors = 1.0 - np.asarray(values, dtype="float64")
            epochs = np.arange(1, len(errors) + 1)
            # Markers: a one-epoch history is one point per line.
            axes.plot(
                epochs, errors, style, color=color, marker=marker,
                markersize=4, label=f"{name or 'model'} ({label})",
            )
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel(f"error (1 - {metric})")
    axes.set_title("Per-head error")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(target, format="png")
    return path


def _history_output_names(history):
    try:
        model = getattr(history, "model", None)
    except AttributeError:
        model = None
    names = getattr(model, "output_names", None)
    return list(names) if names else None


def _plotted_heads(logs, metric, output_names):
    """Head names with `metric` logs; `""` stands for an unprefixed key."""
    suffix = f"_{metric}"
    if output_names is not None:
        names = [
            name for name in output_names
            if f"{name}{suffix}" in logs or f"val_{name}{suffix}" in logs
        ]
    else:
        names = []
        for key in logs:
            base = key[len("val_"):] if key.startswith("val_") else key
            if base.endswith(suffix):
                name = base[: -len(suffix)]
                if name not in names:
                    names.append(name)
    if not names and (metric in logs or f"val_{metric}" in logs):
        names = [""]
    if not names:
        raise ValueError(
            f"`metric`={metric!r} matches no key of `history` (keys "
            f"`<output name>_{metric}` expected). Keys: {sorted(logs)}"
        )
    return names
