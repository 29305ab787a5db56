import csv
import json

import keras
import numpy as np
import pytest

import keras_mwbp
from keras_mwbp.report import count_multiply_adds
from keras_mwbp.report import format_table
from keras_mwbp.report import head_table
from keras_mwbp.report import plot_history
from keras_mwbp.report import report
from keras_mwbp.report import to_csv
from keras_mwbp.report import to_json
from keras_mwbp.report import top_k_errors


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


# ------------------------------------------------------------- multiply-adds
def test_multiply_adds_conv_dense_by_hand():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    y = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.Add()([x, y])
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10)(x)
    # Conv2D 3x3 same, 8x8x1 -> 8x8x4: 8*8 * 3*3 * 1 * 4 = 2304.
    # BatchNorm, ReLU, Add, pooling: 0.  Dense 4 -> 10: 4*10 = 40.
    # Total 2304 + 40 = 2344.
    assert count_multiply_adds(keras.Model(inputs, outputs)) == 2344


def test_multiply_adds_stride_valid_and_groups():
    inputs = keras.Input((9, 9, 2))
    x = keras.layers.Conv2D(3, 3, strides=2, padding="valid")(inputs)
    x = keras.layers.Conv2D(6, 3, padding="same", groups=3)(x)
    x = keras.layers.MaxPooling2D(2)(x)
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(x))
    # Conv 3x3 stride 2 valid, 9x9x2 -> 4x4x3: 4*4 * 3*3 * 2 * 3 = 864.
    # Grouped conv 3x3 same, 3 groups, 4x4x3 -> 4x4x6:
    #   4*4 * 3*3 * (3/3) * 6 = 864.
    # Max pooling 2: 0, -> 2x2x6.  Flatten 24 -> Dense 2: 24*2 = 48.
    # Total 864 + 864 + 48 = 1776.
    assert count_multiply_adds(keras.Model(inputs, outputs)) == 1776


def test_multiply_adds_depthwise_and_dense_on_sequences():
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2)(inputs)
    x = keras.layers.Conv2D(5, 1)(x)
    x = keras.layers.Reshape((16, 5))(x)
    outputs = keras.layers.Dense(3)(x)
    # Depthwise 3x3 valid, multiplier 2, 6x6x2 -> 4x4x4:
    #   4*4 * 3*3 * 2 * 2 = 576.
    # Pointwise conv 1x1, 4x4x4 -> 4x4x5: 4*4 * 1 * 4 * 5 = 320.
    # Dense 5 -> 3 on each of 16 positions: 16 * 5*3 = 240.
    # Total 576 + 320 + 240 = 1136.
    assert count_multiply_adds(keras.Model(inputs, outputs)) == 1136


L = keras.layers


@pytest.mark.parametrize(
    "input_shape, make_layer, output_shape, expected",
    [
        # Conv1D 3 valid, 10x4 -> 8x5: 8 * 3 * 4 * 5 = 480.
        ((10, 4), lambda: L.Conv1D(5, 3), (8, 5), 480),
        # Conv1D 3, stride 2, same, 10x4 -> 5x5: 5 * 3 * 4 * 5 = 300.
        ((10, 4), lambda: L.Conv1D(5, 3, strides=2, padding="same"),
         (5, 5), 300),
        # Conv1D causal, 2 groups, 10x4 -> 10x6: 10 * 3 * (4/2) * 6 = 360.
        ((10, 4), lambda: L.Conv1D(6, 3, groups=2, padding="causal"),
         (10, 6), 360),
        # Conv1D channels_first, 4 channels x 10 -> 5 x 8:
        # 8 * 3 * 4 * 5 = 480 (not 10-channel, 2-position 2 * 3 * 10 * 5).
        ((4, 10), lambda: L.Conv1D(5, 3, data_format="channels_first"),
         (5, 8), 480),
        # Conv2D channels_first same, 3x8x8 -> 4x8x8: 64 * 9 * 3 * 4 = 6912.
        ((3, 8, 8),
         lambda: L.Conv2D(4, 3, padding="same", data_format="channels_first"),
         (4, 8, 8), 6912),
        # Conv3D channels_first same, 2x4x4x4 -> 3x4x4x4:
        # 64 * 27 * 2 * 3 = 10368.
        ((2, 4, 4, 4),
         lambda: L.Conv3D(3, 3, padding="same", data_format="channels_first"),
         (3, 4, 4, 4), 10368),
        # SeparableConv2D 3 valid, multiplier 2, 8x8x3 -> 6x6x6: depthwise
        # 36 * 9 * 3 * 2 = 1944, pointwise 36 * (3 * 2) * 6 = 1296: 3240.
        ((8, 8, 3), lambda: L.SeparableConv2D(6, 3, depth_multiplier=2),
         (6, 6, 6), 3240),
        # The same, channels_first: 3x8x8 -> 6x6x6, 3240.
        ((3, 8, 8),
         lambda: L.SeparableConv2D(6, 3, depth_multiplier=2,
                                   data_format="channels_first"),
         (6, 6, 6), 3240),
        # SeparableConv1D 3 valid, 10x4 -> 8x5: depthwise 8 * 3 * 4 = 96,
        # pointwise 8 * 4 * 5 = 160: 256.
        ((10, 4), lambda: L.SeparableConv1D(5, 3), (8, 5), 256),
        # DepthwiseConv1D 3 valid, 10x4 -> 8x4: 8 * 3 * 4 = 96.
        ((10, 4), lambda: L.DepthwiseConv1D(3), (8, 4), 96),
        # DepthwiseConv2D channels_first same, multiplier 2, 3x8x8 -> 6x8x8:
        # 64 * 9 * 3 * 2 = 3456.
        ((3, 8, 8),
         lambda: L.DepthwiseConv2D(3, depth_multiplier=2, padding="same",
                                   data_format="channels_first"),
         (6, 8, 8), 3456),
        # Conv2DTranspose 3, stride 2, same, 5x5x3 -> 10x10x4: every input
        # position times the whole kernel: 25 * 9 * 3 * 4 = 2700 (not the
        # output positions' 100 * 9 * 3 * 4 = 10800).
        ((5, 5, 3),
         lambda: L.Conv2DTranspose(4, 3, strides=2, padding="same"),
         (10, 10, 4), 2700),
        # The same, channels_first: 3x5x5 -> 4x10x10, 2700.
        ((3, 5, 5),
         lambda: L.Conv2DTranspose(4, 3, strides=2, padding="same",
                                   data_format="channels_first"),
         (4, 10, 10), 2700),
        # Conv1DTranspose 3, stride 2, valid, 7x2 -> 15x3: 7 * 3 * 2 * 3 = 126.
        ((7, 2), lambda: L.Conv1DTranspose(3, 3, strides=2), (15, 3), 126),
    ],
    ids=[
        "conv1d", "conv1d_stride2_same", "conv1d_causal_groups",
        "conv1d_channels_first", "conv2d_channels_first",
        "conv3d_channels_first", "separable2d", "separable2d_channels_first",
        "separable1d", "depthwise1d", "depthwise2d_channels_first",
        "conv2d_transpose", "conv2d_transpose_channels_first",
        "conv1d_transpose",
    ],
)
def test_multiply_adds_of_each_convolution_by_hand(
    input_shape, make_layer, output_shape, expected
):
    inputs = keras.Input(input_shape)
    outputs = make_layer()(inputs)
    assert tuple(outputs.shape[1:]) == output_shape
    assert count_multiply_adds(keras.Model(inputs, outputs)) == expected


def test_multiply_adds_of_a_channels_first_network_by_hand():
    """A small channels_first network: each layer's count, summed."""
    inputs = keras.Input((3, 8, 8))
    x = L.Conv2D(4, 3, padding="same", data_format="channels_first")(inputs)
    x = L.SeparableConv2D(8, 3, strides=2, padding="same",
                          data_format="channels_first")(x)
    x = L.Conv2DTranspose(2, 2, strides=2, data_format="channels_first")(x)
    x = L.GlobalAveragePooling2D(data_format="channels_first")(x)
    outputs = L.Dense(5)(x)
    # Conv2D 3x8x8 -> 4x8x8: 64 * 9 * 3 * 4 = 6912.
    # SeparableConv2D stride 2 -> 8x4x4: depthwise 16 * 9 * 4 = 576,
    #   pointwise 16 * 4 * 8 = 512.
    # Conv2DTranspose 2, stride 2, 8x4x4 -> 2x8x8: 16 * 4 * 8 * 2 = 1024.
    # Pooling 0; Dense 2 -> 5: 10.
    # Total 6912 + 576 + 512 + 1024 + 10 = 9034.
    assert count_multiply_adds(keras.Model(inputs, outputs)) == 9034


def test_multiply_adds_of_sequential_and_shared_layers():
    dense = keras.layers.Dense(4)
    inputs = keras.Input((4,))
    # The shared layer runs twice: 2 * 4*4 = 32.
    outputs = dense(dense(inputs))
    assert count_multiply_adds(keras.Model(inputs, outputs)) == 32
    sequential = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert count_multiply_adds(sequential) == 6


def test_multiply_adds_of_intermediate_models():
    inputs = keras.Input((4, 4, 1))
    x = keras.layers.Conv2D(2, 3, padding="same")(inputs)
    aux = keras.layers.Dense(3, name="aux")(
        keras.layers.GlobalAveragePooling2D()(x)
    )
    x = keras.layers.Conv2D(2, 3, padding="same")(x)
    final = keras.layers.Dense(3, name="final")(
        keras.layers.GlobalAveragePooling2D()(x)
    )
    model = keras_mwbp.MultiWayModel(inputs, [aux, final], method="joint")
    # Head 0: conv 4*4 * 9 * 1 * 2 = 288, dense 2*3 = 6 -> 294.
    # Head 1: convs 288 + 4*4 * 9 * 2 * 2 = 576, dense 6 -> 870.
    assert count_multiply_adds(model.exit_model(0)) == 294
    assert count_multiply_adds(model.exit_model(1)) == 870


def test_multiply_adds_rejects_unknown_shapes_and_non_models():
    inputs = keras.Input((None, None, 1))
    x = keras.layers.Conv2D(2, 3)(inputs)
    model = keras.Model(inputs, keras.layers.GlobalMaxPooling2D()(x))
    with pytest.raises(ValueError, match="known shape"):
        count_multiply_adds(model)
    with pytest.raises(ValueError, match="`model`"):
        count_multiply_adds("not a model")


# -------------------------------------------------------------------- errors
def ranking_model():
    """Six classes; the auxiliary head's logits are the inputs, the final
    head's their negation (fixed kernels, zero biases)."""
    inputs = keras.Input((6,))
    eye = keras.initializers.Identity()
    minus = keras.initializers.Constant(-np.eye(6))
    x = keras.layers.Dense(6, use_bias=False, kernel_initializer=eye)(inputs)
    aux = keras.layers.Dense(6, kernel_initializer=eye, name="aux")(x)
    x = keras.layers.Dense(6, use_bias=False, kernel_initializer=eye)(x)
    final = keras.layers.Dense(6, kernel_initializer=minus, name="final")(x)
    return keras_mwbp.MultiWayModel(inputs, [aux, final], method="joint")


RANK_X = np.array(
    [
        [6, 5, 4, 3, 2, 1],
        [1, 2, 3, 4, 5, 6],
        [3, 6, 1, 2, 5, 4],
        [2, 1, 6, 5, 4, 3],
        [1, 6, 2, 5, 3, 4],
    ],
    dtype="float32",
)
RANK_Y = np.array([0, 4, 2, 1, 3])
# By hand. Aux head (logits = x, the label's rank by descending x):
#   sample 0: label 0 rank 1; 1: label 4 rank 2; 2: label 2 rank 6;
#   3: label 1 rank 6; 4: label 3 rank 2.
#   Top-1 hits 1/5 -> error 0.8; top-5 hits 3/5 -> error 0.4.
# Final head (logits = -x, rank by ascending x):
#   sample 0: rank 6; 1: rank 5; 2: rank 1; 3: rank 1; 4: rank 5.
#   Top-1 hits 2/5 -> error 0.6; top-5 hits 4/5 -> error 0.2.
RANK_ROWS = [
    # Params: 36 + 36 + 6 = 78; multiply-adds: 36 + 36 = 72.
    {"head": 0, "output": "aux", "depth": 1, "params": 78,
     "multiply_adds": 72, "accuracy": 0.2, "top1_error": 0.8,
     "top5_error": 0.4},
    # Depth of the whole network: three dense layers (head included).
    # Params: 36 * 3 + 6 = 114; multiply-adds: 36 * 3 = 108.
    {"head": 1, "output": "final", "depth": 3, "params": 114,
     "multiply_adds": 108, "accuracy": 0.4, "top1_error": 0.6,
     "top5_error": 0.2},
]


def assert_rows_close(rows, expected):
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected):
        assert row.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, float):
                assert row[key] == pytest.approx(value), key
            else:
                assert row[key] == value, key


def test_report_errors_from_fixed_logits():
    rows = report(ranking_model(), (RANK_X, RANK_Y), batch_size=2)
    assert_rows_close(rows, RANK_ROWS)


def test_report_from_dataset_and_column_labels():
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices(
        (RANK_X, RANK_Y.reshape(-1, 1))
    ).batch(3)
    assert_rows_close(report(ranking_model(), dataset), RANK_ROWS)


def test_report_top5_needs_five_classes():
    x = np.eye(4, dtype="float32")[[0, 1, 2, 3, 3]]
    rows = report(tiny_model(), (x, np.array([0, 1, 2, 3, 0])))
    assert [row["top5_error"] for row in rows] == [None, None]
    assert [row["top1_error"] for row in rows] == pytest.approx([0.8, 0.2])
    # Dense 4x4 + 4x4: 32; 4x4 * 3: 48.
    assert [row["multiply_adds"] for row in rows] == [32, 48]
    text = format_table(rows)
    assert text.splitlines()[0] == (
        "head  output  depth  params  multiply-adds  top-1 error  top-5 error"
    )
    assert text.splitlines()[1].endswith("80.00%            -")


def test_top_k_errors():
    logits = np.array([[0.1, 0.9], [0.8, 0.2]])
    assert top_k_errors(logits, np.array([1, 1])) == (0.5, None)
    logits = np.arange(6, dtype="float32")[None, :].repeat(2, axis=0)
    # Top-2 classes are 5 and 4: label 4 is a top-2 hit, label 0 not.
    assert top_k_errors(logits, np.array([4, 0]), k=2) == (1.0, 0.5)


# ------------------------------------------------------------------ exports
def test_csv_and_json_parse_back(tmp_path):
    rows = report(tiny_model(), (np.eye(4, dtype="float32"), np.arange(4)))
    rows.append(dict(RANK_ROWS[0]))
    assert to_json(rows, tmp_path / "rows.json") == tmp_path / "rows.json"
    with open(tmp_path / "rows.json") as file:
        assert json.load(file) == rows
    to_csv(rows, str(tmp_path / "rows.csv"))
    with open(tmp_path / "rows.csv", newline="") as file:
        parsed = list(csv.DictReader(file))
    types = {"head": int, "output": str, "depth": int, "params": int,
             "multiply_adds": int, "accuracy": float, "top1_error": float,
             "top5_error": float}
    parsed = [
        {key: None if value == "" else types[key](value)
         for key, value in row.items()}
        for row in parsed
    ]
    assert parsed == rows


# --------------------------------------------------------------------- plot
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plot_history_from_dict(tmp_path):
    history = {
        "loss": [2.0, 1.0, 0.5],
        "aux_accuracy": [0.3, 0.5, 0.6],
        "final_accuracy": [0.4, 0.7, 0.9],
        "val_aux_accuracy": [0.3, 0.4, 0.5],
        "val_final_accuracy": [0.4, 0.6, 0.8],
        "gamma_0": [0.1, 0.1, 0.1],
    }
    path = tmp_path / "history.png"
    assert plot_history(history, path) == path
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)


def test_plot_history_from_fit(tmp_path):
    model = tiny_model()
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    x = np.eye(4, dtype="float32")
    history = model.fit(x, np.arange(4), validation_data=(x, np.arange(4)),
                        epochs=2, verbose=0)
    assert "aux_accuracy" in history.history
    path = str(tmp_path / "fit.png")
    plot_history(history, path)
    with open(path, "rb") as file:
        assert file.read(8) == PNG_SIGNATURE


# ----------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    "call, name",
    [
        (lambda m, p: report(m, [RANK_X]), "`data`"),
        (lambda m, p: report(m, "data"), "`data`"),
        (lambda m, p: report(m, (RANK_X, RANK_Y[:2])), "`data`"),
        (lambda m, p: report(m, (RANK_X, RANK_Y), batch_size=0), "`batch_size`"),
        (lambda m, p: report("model", (RANK_X, RANK_Y)), "`model`"),
        (lambda m, p: to_csv([], p / "a.csv"), "`rows`"),
        (lambda m, p: to_json(RANK_ROWS, 3), "`path`"),
        (lambda m, p: to_csv(RANK_ROWS, ""), "`path`"),
        (lambda m, p: plot_history(5, p / "a.png"), "`history`"),
        (lambda m, p: plot_history({"aux_accuracy": [0.5]}, None), "`path`"),
        (lambda m, p: plot_history({"aux_accuracy": [0.5]}, p / "a.png",
                                   metric="auc"), "`metric`"),
        (lambda m, p: plot_history({"aux_accuracy": [0.5]}, p / "a.png",
                                   metric=""), "`metric`"),
    ],
)
def test_bad_arguments_raise(call, name, tmp_path):
    with pytest.raises(ValueError, match=name):
        call(ranking_model(), tmp_path)
