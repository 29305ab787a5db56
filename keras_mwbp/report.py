"""Per-head summaries of a trained `MultiWayModel`: its intermediate models."""

import keras
import numpy as np

# (row key, column title, format of a value, align left).
COLUMNS = (
    ("head", "head", "{}", False),
    ("output", "output", "{}", True),
    ("depth", "depth", "{}", False),
    ("params", "params", "{:,}", False),
    ("accuracy", "test accuracy", "{:.2%}", False),
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


def format_table(rows):
    """Formats `head_table` rows as an aligned text table.

    Args:
        rows: List of dicts as returned by `head_table`.

    Returns:
        The table as a string: a header line, then one line per row.

    Example:

    >>> print(format_table([{"head": 0, "output": "head_0_dense",
    ...                      "depth": 5, "params": 9914, "accuracy": 0.9}]))
    head  output        depth  params  test accuracy
       0  head_0_dense      5   9,914         90.00%
    """
    cells = [[title for _, title, _, _ in COLUMNS]]
    cells += [[fmt.format(row[key]) for key, _, fmt, _ in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(
            cell.ljust(width) if left else cell.rjust(width)
            for cell, width, (_, _, _, left) in zip(line, widths, COLUMNS)
        ).rstrip()
        for line in cells
    ]
    return "\n".join(lines)
