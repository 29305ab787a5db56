"""Per-head summaries of a trained `MultiWayModel`: its intermediate models."""

import keras
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


def format_table(rows, columns=HEAD_COLUMNS):
    """Formats rows of dicts as an aligned text table.

    Text is aligned left and numbers right.

    Args:
        rows: List of dicts, e.g. as returned by `head_table`.
        columns: `(key, title, format)` triples, one per column: the row
            key, the column title and the `str.format` pattern of a value.

    Returns:
        The table as a string: a header line, then one line per row.

    Example:

    >>> print(format_table([{"head": 0, "output": "head_0_dense",
    ...                      "depth": 5, "params": 9914, "accuracy": 0.9}]))
    head  output        depth  params  test accuracy
       0  head_0_dense      5   9,914         90.00%
    """
    keys = [key for key, _, _ in columns]
    left = [any(isinstance(row[key], str) for row in rows) for key in keys]
    cells = [[title for _, title, _ in columns]]
    cells += [[fmt.format(row[key]) for key, _, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(keys))]
    lines = [
        "  ".join(
            cell.ljust(width) if is_left else cell.rjust(width)
            for cell, width, is_left in zip(line, widths, left)
        ).rstrip()
        for line in cells
    ]
    return "\n".join(lines)
