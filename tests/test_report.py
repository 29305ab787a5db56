import keras
import numpy as np

import keras_mwbp
from keras_mwbp.report import format_table
from keras_mwbp.report import head_table


def tiny_model():
    """Identity trunk of two dense layers; the auxiliary head shifts classes.

    The final head predicts `argmax(x)`, the auxiliary head
    `(argmax(x) + 1) % 4`.
    """
    inputs = keras.Input((4,))
    eye = keras.initializers.Identity()
    shift = keras.initializers.Constant(np.roll(np.eye(4), 1, axis=1))
    x = keras.layers.Dense(4, use_bias=False, kernel_initializer=eye)(inputs)
    aux = keras.layers.Dense(4, kernel_initializer=shift, name="aux")(x)
    x = keras.layers.Dense(4, use_bias=False, kernel_initializer=eye)(x)
    final = keras.layers.Dense(4, kernel_initializer=eye, name="final")(x)
    return keras_mwbp.MultiWayModel(inputs, [aux, final], method="joint")


def test_head_table_rows():
    x = np.eye(4, dtype="float32")[[0, 1, 2, 3, 3]]
    # Final head right on the first four, auxiliary head on the last only.
    y = np.array([0, 1, 2, 3, 0])
    rows = head_table(tiny_model(), x, y, batch_size=2)
    assert rows == [
        # Aux tap after one dense layer: 16 + head 16 + 4 parameters.
        {"head": 0, "output": "aux", "depth": 1, "params": 36,
         "accuracy": 0.2},
        # Three dense layers: 16 + 16 + 16 + 4.
        {"head": 1, "output": "final", "depth": 3, "params": 52,
         "accuracy": 0.8},
    ]


def test_head_table_accepts_column_labels():
    x = np.eye(4, dtype="float32")
    rows = head_table(tiny_model(), x, np.arange(4).reshape(4, 1))
    assert [row["accuracy"] for row in rows] == [0.0, 1.0]


def test_format_table_aligns_columns():
    rows = [
        {"head": 0, "output": "head_0_dense", "depth": 7, "params": 14650,
         "accuracy": 0.98667},
        {"head": 3, "output": "final_dense", "depth": 20, "params": 273754,
         "accuracy": 0.99111},
    ]
    assert format_table(rows) == (
        "head  output        depth   params  test accuracy\n"
        "   0  head_0_dense      7   14,650         98.67%\n"
        "   3  final_dense      20  273,754         99.11%"
    )


def test_format_table_with_own_columns():
    rows = [{"method": "joint", "step_s": 1.23456}]
    columns = [("method", "method", "{}"), ("step_s", "step (s)", "{:.2f}")]
    assert format_table(rows, columns) == (
        "method  step (s)\n"
        "joint       1.23"
    )
