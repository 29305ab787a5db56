"""Bad input to the public API: one catalogue of cases (issue #5, item 4).

Every case checks that the call raises the right exception type with a
message naming the argument and the value received (Keras style:
``ValueError("`nu` must be ... Received: nu=-1")``), and that nothing
changed: the weights, `nu`, loss weights and optimizer state of the shared
models, the graph of the shared backbone, and the files of the scratch
directory are the same before and after the failed call.

The command-line flags are at the end: each bad invocation prints exactly
one line on stderr (no traceback, no usage dump) and exits with status 2.
"""

import os
import re

import keras
import numpy as np
import pytest

import keras_mwbp
from conftest import sgd
from conftest import sparse_ce
from keras_mwbp import cli
from keras_mwbp import data as mw_data
from keras_mwbp import heads
from keras_mwbp.callbacks import AdaptiveNu

NUM_CLASSES = 3
N = 16


def graph(num_classes=NUM_CLASSES):
    """8 inputs -> d1 -> [h0], d2 -> [final]: a two-head Dense network."""
    inputs = keras.Input((8,), name="x")
    a1 = keras.layers.Dense(4, activation="relu", name="d1")(inputs)
    h0 = keras.layers.Dense(num_classes, name="h0")(a1)
    a2 = keras.layers.Dense(4, activation="relu", name="d2")(a1)
    final = keras.layers.Dense(num_classes, name="final")(a2)
    return inputs, [h0, final]


def model(**kwargs):
    inputs, outputs = graph()
    return keras_mwbp.MultiWayModel(inputs, outputs, **kwargs)


def dense_chain(depth, name):
    """A functional chain of `depth` Dense layers `dense_1` .. `dense_<depth>`
    on 8 inputs, and `after_final`, a layer called on its output but not part
    of it."""
    inputs = keras.Input((8,))
    x = inputs
    for i in range(1, depth + 1):
        x = keras.layers.Dense(4, activation="relu", name=f"dense_{i}")(x)
    keras.layers.Dense(2, name="after_final")(x)
    return keras.Model(inputs, x, name=name)


def one_big_block():
    """Cut points at depths 1 and 11 only: dense -> 10-layer residual branch
    -> add -> dense."""
    inputs = keras.Input((8,))
    a = keras.layers.Dense(4, name="first")(inputs)
    y = a
    for i in range(10):
        y = keras.layers.Dense(4, name=f"inner_{i}")(y)
    x = keras.layers.Add(name="add")([a, y])
    return keras.Model(inputs, keras.layers.Dense(2, name="logits")(x),
                       name="big")


class TorchLikeOptimizer:
    """Looks like a `torch.optim` optimizer, not a Keras one."""

    def __init__(self):
        self.param_groups = [{"lr": 0.1}]

    def step(self):
        pass

    def zero_grad(self):
        pass


def detached_head(x, num_classes, name):
    """A head builder whose logits ignore the feature it is given."""
    other = keras.Input((4,), name=f"{name}_other_input")
    return keras.layers.Dense(num_classes, name=f"{name}_dense")(other)


def no_tensor_head(x, num_classes, name):
    return None


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The shared objects that the failed calls must leave as they were."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 8)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=N).astype("int32")
    trained = model(method="mwbp", nu=2.0)
    trained.compile(optimizer=sgd(), loss=sparse_ce(), metrics=["accuracy"])
    # One step, so that the momentum buffers hold something.
    trained.fit(x, y, batch_size=N, epochs=1, verbose=0)
    one_hot_model = model(method="joint")
    one_hot_model.compile(
        optimizer=sgd(),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    weighted = model(head_weights=[0.5, 1.0])
    weighted.compile(optimizer=sgd(), loss=sparse_ce())
    return {
        "x": x,
        "y": y,
        "model": trained,
        "one_hot_model": one_hot_model,
        "weighted": weighted,
        "backbone": dense_chain(6, "chain"),
        "big": one_big_block(),
        "dir": tmp_path_factory.mktemp("bad_input"),
    }


def snapshot(env):
    """Everything a failed call must not change, as plain values."""
    state = {}
    for key in ("model", "one_hot_model", "weighted"):
        m = env[key]
        state[key] = {
            "weights": [keras.ops.convert_to_numpy(v) for v in m.weights],
            "nu": m.nu,
            "head_weights": m.head_weights,
            "optimizer": id(m.optimizer),
            "optimizer_variables": [
                keras.ops.convert_to_numpy(v) for v in m.optimizer.variables
            ],
            "iterations": int(m.optimizer.iterations),
            "losses": [id(loss) for loss in m._head_losses],
        }
    for key in ("backbone", "big"):
        net = env[key]
        state[key] = {
            "weights": [keras.ops.convert_to_numpy(v) for v in net.weights],
            "layers": [layer.name for layer in net.layers],
            # Calling a layer on a backbone tensor adds an outbound node.
            "outbound": [len(layer._outbound_nodes) for layer in net.layers],
        }
    state["files"] = sorted(
        os.path.relpath(os.path.join(root, name), env["dir"])
        for root, dirs, files in os.walk(env["dir"])
        for name in dirs + files
    )
    return state


def assert_same(before, after, where="state"):
    if isinstance(before, dict):
        assert before.keys() == after.keys(), where
        for key in before:
            assert_same(before[key], after[key], f"{where}.{key}")
    elif isinstance(before, (list, tuple)):
        assert len(before) == len(after), where
        for i, (a, b) in enumerate(zip(before, after)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(before, np.ndarray):
        np.testing.assert_array_equal(after, before, err_msg=where)
    else:
        assert after == before, where


def one_hot(y, num_classes=NUM_CLASSES):
    return np.eye(num_classes, dtype="float32")[y]


def fit(env, key, x, y, **kwargs):
    env[key].fit(x, y, batch_size=8, epochs=1, verbose=0, **kwargs)


def tf_dataset(arrays):
    """A `tf.data.Dataset` of `arrays` in batches of 8."""
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(arrays).batch(8)


def empty_dataset(env):
    return tf_dataset((env["x"][:0], env["y"][:0]))


def case(id, call, error, argument, received, marks=()):
    """A bad call: `call(env)` raises `error`, whose message names
    `argument` and then, after "Received", shows `received`."""
    return pytest.param(call, error, argument, received, id=id, marks=marks)


CASES = [
    # ------------------------------------------------ MultiWayModel(...)
    case("model/unknown method", lambda e: model(method="sgd"),
         ValueError, "`method`", "method='sgd'"),
    case("model/shuffle_seed negative", lambda e: model(shuffle_seed=-1),
         ValueError, "`shuffle_seed`", "shuffle_seed=-1"),
    case("model/shuffle_seed a float", lambda e: model(shuffle_seed=1.5),
         ValueError, "`shuffle_seed`", "shuffle_seed=1.5"),
    case("model/nu zero", lambda e: model(nu=0),
         ValueError, "`nu`", "nu=0"),
    case("model/nu negative", lambda e: model(nu=-1),
         ValueError, "`nu`", "nu=-1"),
    case("model/nu nan", lambda e: model(nu=float("nan")),
         ValueError, "`nu`", "nu=nan"),
    case("model/nu inf", lambda e: model(nu=float("inf")),
         ValueError, "`nu`", "nu=inf"),
    case("model/nu a string", lambda e: model(nu="2"),
         ValueError, "`nu`", "nu='2'"),
    case("model/head weight zero", lambda e: model(head_weights=[0, 1]),
         ValueError, "`head_weights`", "head_weights=[0, 1]"),
    case("model/head weight above one",
         lambda e: model(head_weights=[1.5, 1.0]),
         ValueError, "`head_weights`", "head_weights=[1.5, 1.0]"),
    case("model/head weights wrong length",
         lambda e: model(head_weights=[0.5]),
         ValueError, "`head_weights`", "head_weights=[0.5]"),
    case("model/head depths not increasing",
         lambda e: model(head_depths=[3, 1]),
         ValueError, "`head_depths`", "head_depths=[3, 1]"),
    case("model/head depths wrong length",
         lambda e: model(head_depths=[1, 2, 3]),
         ValueError, "`head_depths`", "head_depths=[1, 2, 3]"),
    case("model/negative relay span",
         lambda e: model(method="relay", relay_span=-1),
         ValueError, "`relay_span`", "relay_span=-1"),
    case("model/fractional relay span",
         lambda e: model(method="relay", relay_span=1.5),
         ValueError, "`relay_span`", "relay_span=1.5"),
    case("model/unknown weighting", lambda e: model(weighting="uniform"),
         ValueError, "`weighting`", "weighting='uniform'"),
    case("model/unknown nan_policy", lambda e: model(nan_policy="ignore"),
         ValueError, "`nan_policy`", "nan_policy='ignore'"),
    case("model/negative weight_decay", lambda e: model(weight_decay=-1e-4),
         ValueError, "`weight_decay` must be a finite non-negative number.",
         "weight_decay=-0.0001"),
    case("model/infinite weight_decay",
         lambda e: model(weight_decay=float("inf")),
         ValueError, "`weight_decay`", "weight_decay=inf"),
    case("model/boolean weight_decay", lambda e: model(weight_decay=True),
         ValueError, "`weight_decay`", "weight_decay=True"),
    case("model/reference_code weighting with standard",
         lambda e: model(method="standard", weighting="reference_code"),
         ValueError, "`weighting='reference_code'`", "method='standard'"),
    case("model/one output for mwbp",
         lambda e: keras_mwbp.MultiWayModel(
             graph()[0], graph()[1][-1:], method="mwbp"),
         ValueError, "`outputs`", "1 output(s)"),
    case("model/output not depending on the inputs",
         lambda e: keras_mwbp.MultiWayModel(
             keras.Input((8,)), graph()[1]),
         ValueError, "`outputs`", "outputs[0]="),
    case("model/exit_model index out of range",
         lambda e: e["model"].exit_model(2),
         ValueError, "`index`", "index=2"),
    case("model/exit_model index a string",
         lambda e: e["model"].exit_model("0"),
         TypeError, "`index`", "index='0'"),
    # ---------------------------------------------------------- compile
    case("compile/unknown optimizer name",
         lambda e: e["model"].compile(optimizer="sgdd", loss=sparse_ce()),
         ValueError, "`optimizer`", "optimizer='sgdd'"),
    case("compile/optimizer config of an unknown class",
         lambda e: e["model"].compile(
             optimizer={"class_name": "Sgdd", "config": {}},
             loss=sparse_ce()),
         ValueError, "`optimizer`", "optimizer={'class_name': 'Sgdd'"),
    case("compile/optimizer config with an unknown argument",
         lambda e: e["model"].compile(
             optimizer={"class_name": "SGD", "config": {"lr": 0.1}},
             loss=sparse_ce()),
         ValueError, "`optimizer`", "optimizer={'class_name': 'SGD'"),
    case("compile/optimizer a plain object",
         lambda e: e["model"].compile(optimizer=object(), loss=sparse_ce()),
         TypeError, "`optimizer`", "optimizer=<object object"),
    case("compile/torch-like optimizer",
         lambda e: e["model"].compile(
             optimizer=TorchLikeOptimizer(), loss=sparse_ce()),
         TypeError, "`optimizer`", "optimizer=<test_bad_input.TorchLike"),
    case("compile/optimizer class, not instance",
         lambda e: e["model"].compile(
             optimizer=keras.optimizers.SGD, loss=sparse_ce()),
         TypeError, "`optimizer`", "optimizer=<class 'keras"),
    case("compile/loss_weights refused",
         lambda e: e["model"].compile(
             optimizer=sgd(), loss=sparse_ce(), loss_weights=[0.5, 1.0]),
         ValueError, "`loss_weights`", "loss_weights=[0.5, 1.0]"),
    case("compile/loss list of wrong length",
         lambda e: e["model"].compile(
             optimizer=sgd(), loss=[sparse_ce()] * 3),
         ValueError, "`loss`", "loss=[<"),
    case("compile/no loss",
         lambda e: e["model"].compile(optimizer=sgd(), loss=None),
         ValueError, "`loss`", "loss=None"),
    case("compile/loss dict with an unknown output",
         lambda e: e["model"].compile(
             optimizer=sgd(), loss={"h0": "mse", "nope": "mse"}),
         ValueError, "`loss`", "['nope']"),
    case("compile/unknown loss name",
         lambda e: e["model"].compile(optimizer=sgd(), loss="crossentropyy"),
         ValueError, "`loss`", "loss='crossentropyy'"),
    case("compile/unknown loss name for one head",
         lambda e: e["model"].compile(
             optimizer=sgd(), loss={"h0": "mse", "final": "msee"}),
         ValueError, "`loss`", "loss='msee'"),
    case("compile/loss not callable",
         lambda e: e["model"].compile(optimizer=sgd(), loss=3),
         ValueError, "`loss`", "loss=3"),
    case("compile/metrics a string",
         lambda e: e["model"].compile(
             optimizer=sgd(), loss=sparse_ce(), metrics="accuracy"),
         ValueError, "`metrics`", "metrics='accuracy'"),
    case("compile/metrics list of lists of wrong length",
         lambda e: e["model"].compile(
             optimizer=sgd(), loss=sparse_ce(), metrics=[["accuracy"]] * 3),
         ValueError, "`metrics`", "metrics=[['accuracy']"),
    case("compile/unknown metric name",
         lambda e: e["model"].compile(
             optimizer=sgd(), loss=sparse_ce(), metrics=["acuracy"]),
         ValueError, "`metrics`", "metrics=['acuracy']"),
    case("compile/unknown metric name for one head",
         lambda e: e["model"].compile(
             optimizer=sgd(), loss=sparse_ce(),
             metrics={"final": ["accuracy", "top5"]}),
         ValueError, "`metrics`", "metrics={'final': ['accuracy', 'top5']}"),
    case("compile/unknown weighted metric name",
         lambda e: e["model"].compile(
             optimizer=sgd(), loss=sparse_ce(), weighted_metrics=["acuracy"]),
         ValueError, "`weighted_metrics`", "weighted_metrics=['acuracy']"),
    case("compile/metric not callable",
         lambda e: e["model"].compile(
             optimizer=sgd(), loss=sparse_ce(), metrics=[["accuracy"], [3]]),
         ValueError, "`metrics`", "metrics=[['accuracy'], [3]]"),
    # ------------------------------------------------------ fit / evaluate
    case("fit/one-hot labels with SparseCategoricalCrossentropy",
         lambda e: fit(e, "model", e["x"], one_hot(e["y"])),
         ValueError, "`y`", "y with shape (None, 3)"),
    case("fit/integer labels with CategoricalCrossentropy",
         lambda e: fit(e, "one_hot_model", e["x"], e["y"]),
         ValueError, "`y`", "y with shape (None,)"),
    case("fit/one-hot labels for 4 classes, 3 logits",
         lambda e: fit(e, "one_hot_model", e["x"], one_hot(e["y"], 4)),
         ValueError, "`y`", "y with shape (None, 4)"),
    case("fit/labels of the wrong rank",
         lambda e: fit(e, "model", e["x"], e["y"].reshape(N, 1, 1)),
         ValueError, "`y`", "y with shape (None, 1, 1)"),
    case("fit/one label array per head",
         lambda e: fit(e, "model", e["x"], [e["y"], e["y"]]),
         ValueError, "`y`", "y with structure"),
    case("fit/dataset of one-hot labels with sparse loss",
         lambda e: e["model"].fit(
             tf_dataset((e["x"], one_hot(e["y"]))),
             epochs=1, verbose=0),
         ValueError, "`y`", "y with shape (None, 3)"),
    case("evaluate/one-hot labels with sparse loss",
         lambda e: e["model"].evaluate(e["x"], one_hot(e["y"]), verbose=0),
         ValueError, "`y`", "y with shape (None, 3)"),
    case("fit/empty arrays",
         lambda e: fit(e, "model", e["x"][:0], e["y"][:0]),
         ValueError, "`x`", "lengths [0, 0]"),
    case("fit/empty dataset",
         lambda e: e["model"].fit(empty_dataset(e), epochs=1, verbose=0),
         ValueError, "`x`", "cardinality 0"),
    case("fit/class index outside the logits",
         lambda e: fit(e, "model", e["x"], e["y"] + NUM_CLASSES),
         ValueError, "`y`", "y with values in [3, 5]"),
    case("fit/negative class index",
         lambda e: fit(e, "model", e["x"], e["y"] - NUM_CLASSES),
         ValueError, "`y`", "y with values in [-3, -1]"),
    case("fit/validation labels outside the logits",
         lambda e: fit(e, "model", e["x"], e["y"],
                       validation_data=(e["x"], e["y"] + 1)),
         ValueError, "`y`", "y with values in [1, 3]"),
    case("evaluate/class index outside the logits",
         lambda e: e["model"].evaluate(
             e["x"], e["y"] + NUM_CLASSES, verbose=0),
         ValueError, "`y`", "y with values in [3, 5]"),
    # ----------------------------------------------------------- set_nu
    case("set_nu/zero", lambda e: e["model"].set_nu(0),
         ValueError, "`nu`", "nu=0"),
    case("set_nu/negative", lambda e: e["model"].set_nu(-0.5),
         ValueError, "`nu`", "nu=-0.5"),
    case("set_nu/nan", lambda e: e["model"].set_nu(float("nan")),
         ValueError, "`nu`", "nu=nan"),
    case("set_nu/with explicit head_weights",
         lambda e: e["weighted"].set_nu(1.0),
         ValueError, "`nu`", "nu=1.0"),
    case("gammas_from_depths/nu zero",
         lambda e: keras_mwbp.gammas_from_depths([1, 2, 4], nu=0),
         ValueError, "`nu`", "nu=0"),
    # ------------------------------------------------------- AdaptiveNu
    case("AdaptiveNu/unknown schedule", lambda e: AdaptiveNu("III"),
         ValueError, "`mode`", "mode='III'"),
    case("AdaptiveNu/schedule lower case", lambda e: AdaptiveNu("i"),
         ValueError, "`mode`", "mode='i'"),
    case("AdaptiveNu/boundaries not increasing",
         lambda e: AdaptiveNu("I", boundaries=[3, 1]),
         ValueError, "`boundaries`", "boundaries=[3, 1]"),
    case("AdaptiveNu/negative boundary",
         lambda e: AdaptiveNu("II", boundaries=[-1]),
         ValueError, "`boundaries`", "boundaries=[-1]"),
    case("AdaptiveNu/model with explicit head_weights",
         lambda e: fit(e, "weighted", e["x"], e["y"],
                       callbacks=[AdaptiveNu("I")]),
         ValueError, "`nu`", "nu=2.0"),
    # ----------------------------------------------------- attach_heads
    case("attach_heads/unknown tap",
         lambda e: keras_mwbp.attach_heads(e["backbone"], ["dense_9"], 3),
         ValueError, "`taps`", "taps=['dense_9']"),
    case("attach_heads/final layer as tap",
         lambda e: keras_mwbp.attach_heads(e["backbone"], ["dense_6"], 3),
         ValueError, "`taps`", "taps=['dense_6']"),
    case("attach_heads/tap after the final layer",
         lambda e: keras_mwbp.attach_heads(e["backbone"], ["after_final"], 3),
         ValueError, "`taps`", "taps=['after_final']"),
    case("attach_heads/duplicate taps",
         lambda e: keras_mwbp.attach_heads(
             e["backbone"], ["dense_2", "dense_2"], 3),
         ValueError, "`taps`", "taps=['dense_2', 'dense_2']"),
    case("attach_heads/taps deep to shallow",
         lambda e: keras_mwbp.attach_heads(
             e["backbone"], ["dense_4", "dense_2"], 3),
         ValueError, "`taps`", "taps=['dense_4', 'dense_2']"),
    case("attach_heads/no taps",
         lambda e: keras_mwbp.attach_heads(e["backbone"], [], 3),
         ValueError, "`taps`", "taps=[]"),
    case("attach_heads/taps a layer name, not a list",
         lambda e: keras_mwbp.attach_heads(e["backbone"], "dense_2", 3),
         ValueError, "`taps`", "taps='dense_2'"),
    case("attach_heads/taps not names",
         lambda e: keras_mwbp.attach_heads(e["backbone"], [2, 4], 3),
         TypeError, "`taps`", "taps=[2, 4]"),
    case("attach_heads/num_classes zero",
         lambda e: keras_mwbp.attach_heads(e["backbone"], ["dense_2"], 0),
         ValueError, "`num_classes`", "num_classes=0"),
    case("attach_heads/num_losses not len(taps) + 1",
         lambda e: keras_mwbp.attach_heads(
             e["backbone"], ["dense_2"], 3, num_losses=4),
         ValueError, "`num_losses`", "num_losses=4"),
    case("attach_heads/auto without num_losses",
         lambda e: keras_mwbp.attach_heads(e["backbone"], "auto", 3),
         ValueError, "`num_losses`", "num_losses=None"),
    case("attach_heads/unknown head name",
         lambda e: keras_mwbp.attach_heads(
             e["backbone"], ["dense_2"], 3, head="type_b"),
         ValueError, "`head`", "head='type_b'"),
    case("attach_heads/head not callable",
         lambda e: keras_mwbp.attach_heads(
             e["backbone"], ["dense_2"], 3, head=3),
         TypeError, "`head`", "head=3"),
    case("attach_heads/final_head not callable",
         lambda e: keras_mwbp.attach_heads(
             e["backbone"], ["dense_2"], 3, final_head=None),
         TypeError, "`final_head`", "final_head=None"),
    case("attach_heads/head returns no tensor",
         lambda e: keras_mwbp.attach_heads(
             e["backbone"], ["dense_2"], 3, head=no_tensor_head),
         TypeError, "`head`", "head=<function no_tensor_head"),
    case("attach_heads/head not depending on its input",
         lambda e: keras_mwbp.attach_heads(
             e["backbone"], ["dense_2"], 3, head=detached_head),
         ValueError, "`head`", "head=<function detached_head"),
    case("attach_heads/backbone not a model",
         lambda e: keras_mwbp.attach_heads("resnet50", ["dense_2"], 3),
         TypeError, "`backbone`", "backbone='resnet50'"),
    case("attach_heads/bad model kwargs",
         lambda e: keras_mwbp.attach_heads(
             e["backbone"], ["dense_2"], 3, nu=-1),
         ValueError, "`nu`", "nu=-1"),
    # ------------------------------------------------------ place_heads
    case("place_heads/one loss",
         lambda e: keras_mwbp.place_heads(e["backbone"], 1),
         ValueError, "`num_losses`", "num_losses=1"),
    case("place_heads/num_losses a float",
         lambda e: keras_mwbp.place_heads(e["backbone"], 2.0),
         ValueError, "`num_losses`", "num_losses=2.0"),
    case("place_heads/min_interval zero",
         lambda e: keras_mwbp.place_heads(e["backbone"], 2, min_interval=0),
         ValueError, "`min_interval`", "min_interval=0"),
    case("place_heads/more heads than cut points",
         lambda e: keras_mwbp.place_heads(e["big"], 4, min_interval=1),
         ValueError, "losses", "num_losses=4"),
    case("place_heads/too many losses for the depth",
         lambda e: keras_mwbp.place_heads(e["backbone"], 3),
         ValueError, "`min_interval`", "num_losses=3, min_interval=5"),
    case("place_heads/a layer, not a model",
         lambda e: keras_mwbp.place_heads(keras.layers.Dense(2), 2),
         TypeError, "`backbone`", "backbone=<Dense"),
    case("place_heads/two outputs",
         lambda e: keras_mwbp.place_heads(keras.Model(*graph()), 2),
         ValueError, "`backbone`", "a model with 2 outputs"),
    case("heads/feature of rank 1",
         lambda e: heads.pool_dense(
             keras.Input((), name="scalar"), 3, "head_0"),
         ValueError, "`x`", "x with shape (None,)"),
    # ---------------------------------------------------- data, optimizer
    case("data.load/unknown name",
         lambda e: mw_data.load("imagenet"),
         ValueError, "`name`", "name='imagenet'"),
    case("data.load/batch_size zero",
         lambda e: mw_data.load("digits", batch_size=0),
         ValueError, "`batch_size`", "batch_size=0"),
    case("data.load/batch_size a string",
         lambda e: mw_data.load("digits", batch_size="32"),
         ValueError, "`batch_size`", "batch_size='32'"),
    case("MultiWayOptimizer/loss_scale a number",
         lambda e: keras_mwbp.MultiWayOptimizer(sgd(), num_losses=2,
                                                loss_scale=128.0),
         ValueError, "`loss_scale`", "loss_scale=128.0"),
    case("MultiWayOptimizer/loss_scale unknown option",
         lambda e: keras_mwbp.MultiWayOptimizer(
             sgd(), num_losses=2, loss_scale={"scale": 2.0}),
         ValueError, "`loss_scale`", "loss_scale={'scale': 2.0}"),
    case("MultiWayOptimizer/loss_scale initial_scale zero",
         lambda e: keras_mwbp.MultiWayOptimizer(
             sgd(), num_losses=2, loss_scale={"initial_scale": 0}),
         ValueError, "`loss_scale['initial_scale']`",
         "loss_scale={'initial_scale': 0}"),
    case("MultiWayOptimizer/no losses",
         lambda e: keras_mwbp.MultiWayOptimizer(sgd(), num_losses=0),
         ValueError, "`num_losses`", "num_losses=0"),
]


@pytest.mark.parametrize("call, error, argument, received", CASES)
def test_bad_input_raises_naming_the_argument_and_changes_nothing(
    env, call, error, argument, received
):
    before = snapshot(env)
    pattern = (
        rf"(?s){re.escape(argument)}.*Received.*{re.escape(received)}"
    )
    with pytest.raises(error, match=pattern):
        call(env)
    assert_same(before, snapshot(env))


# The entry points of the catalogue, by the prefix of their case ids, and
# the arguments that have no case here, each with the reason. A new argument
# of one of these needs a case above (or an entry here saying why not).
ENTRY_POINTS = {
    "model": ([keras_mwbp.MultiWayModel.__init__,
               keras_mwbp.MultiWayModel.exit_model],
              {"inputs": "any Keras inputs; `outputs` is checked against them"}),
    "compile": ([keras_mwbp.MultiWayModel.compile], {}),
    "set_nu": ([keras_mwbp.MultiWayModel.set_nu], {}),
    "gammas_from_depths": ([keras_mwbp.gammas_from_depths],
                           {"head_depths": "the model/head depths cases"}),
    "AdaptiveNu": ([AdaptiveNu.__init__],
                   {"verbose": "any truth value, as Keras callbacks"}),
    "attach_heads": ([keras_mwbp.attach_heads],
                     {"method": "passed to MultiWayModel (model/ cases)"}),
    "place_heads": ([keras_mwbp.place_heads], {}),
    "heads": ([heads.pool_dense, heads.bn_relu_pool_dense],
              {"num_classes": "Keras's Dense checks it (as `units`)",
               "name": "any layer-name prefix"}),
    "data.load": ([mw_data.load],
                  {"data_dir": "test_tfds_data_dir_that_does_not_exist",
                   "seed": "not checked by keras_mwbp (scikit-learn's error)",
                   "augment": "any truth value",
                   "as_images": "any truth value"}),
    "MultiWayOptimizer": ([keras_mwbp.MultiWayOptimizer.__init__],
                          {"optimizer": "the compile/optimizer cases",
                           "name": "any optimizer name"}),
}


def test_every_argument_of_the_entry_points_has_a_case():
    import inspect

    covered = {}
    for param in CASES:
        prefix = param.id.split("/")[0]
        argument = param.values[2]
        covered.setdefault(prefix, set()).update(
            re.findall(r"`(\w+)", argument) or [argument])
    # Every case belongs to an entry point listed here.
    assert set(covered) <= set(ENTRY_POINTS) | {"fit", "evaluate"}, (
        set(covered) - set(ENTRY_POINTS))
    missing = {}
    for prefix, (functions, exempt) in ENTRY_POINTS.items():
        arguments = {
            name
            for function in functions
            for name, p in inspect.signature(function).parameters.items()
            if name != "self" and p.kind not in (p.VAR_KEYWORD,
                                                 p.VAR_POSITIONAL)
        }
        # An exemption names a real argument, and one without a case.
        assert set(exempt) <= arguments, (prefix, set(exempt) - arguments)
        assert not set(exempt) & covered.get(prefix, set()), prefix
        gap = arguments - covered.get(prefix, set()) - set(exempt)
        if gap:
            missing[prefix] = sorted(gap)
    assert not missing, f"arguments without a bad-input case: {missing}"


def test_compile_failing_inside_keras_leaves_the_compiled_model_as_it_was(
    env, monkeypatch
):
    """A `compile()` that fails after Keras's own compile has begun setting
    state (here: a simulated failure at its end) puts every compile
    attribute back, and the model trains on as before."""
    from keras.src.trainers import trainer

    m = env["model"]
    keep = ("optimizer", "_compile_metrics", "_loss_tracker",
            "_head_losses", "_head_graph", "_head_loss_trackers",
            "_update_groups", "_compile_config", "train_function",
            "run_eagerly", "steps_per_execution")
    before_ids = {name: id(getattr(m, name)) for name in keep}
    before = snapshot(env)
    keras_compile = trainer.Trainer.compile

    def failing_compile(self, *args, **kwargs):
        keras_compile(self, *args, **kwargs)
        raise RuntimeError("simulated failure in keras.Model.compile")

    monkeypatch.setattr(trainer.Trainer, "compile", failing_compile)
    with pytest.raises(RuntimeError, match="simulated failure"):
        m.compile(optimizer="adam", loss="mse", metrics=["mae"],
                  run_eagerly=True, steps_per_execution=2)
    monkeypatch.undo()
    assert {name: id(getattr(m, name)) for name in keep} == before_ids
    assert_same(before, snapshot(env))
    assert m.run_eagerly is False and m.steps_per_execution == 1
    # The model still trains with its SGD states and accuracy metric.
    history = m.fit(env["x"], env["y"], batch_size=N, epochs=1, verbose=0,
                    shuffle=False)
    assert "final_accuracy" in history.history
    assert int(m.optimizer.iterations) == before["model"]["iterations"] + 1
    assert isinstance(m.optimizer.template, keras.optimizers.SGD)


def test_tfds_data_dir_that_does_not_exist(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    missing = str(tmp_path / "missing")
    with pytest.raises(
        FileNotFoundError,
        match=re.escape("`data_dir`") + ".*"
        + re.escape(f"Received: data_dir={missing!r}"),
    ):
        mw_data.load("cifar10", data_dir=missing)
    assert not os.path.exists(missing)


# -------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    keras.utils.set_random_seed(0)
    path = tmp_path_factory.mktemp("cli_model") / "m.keras"
    model().save(path)
    return str(path)


CLI_CASES = [
    # (argv with {tmp} and {model} placeholders, text in the error line)
    ([], "the following arguments are required: command"),
    (["fit"], "invalid choice: 'fit'"),
    (["train", "--foo"], "unrecognized arguments: --foo"),
    (["train", "--model", "vgg16"], "argument --model: unknown model 'vgg16'"),
    (["train", "--dataset", "imagenet"],
     "argument --dataset: invalid choice: 'imagenet'"),
    (["train", "--method", "dsn"], "argument --method: invalid choice: 'dsn'"),
    (["train", "--epochs", "0"], "argument --epochs: must be > 0, got 0"),
    (["train", "--epochs", "-1"], "argument --epochs: must be > 0, got -1"),
    (["train", "--epochs", "1.5"], "argument --epochs: invalid int value"),
    (["train", "--batch-size", "abc"],
     "argument --batch-size: invalid int value: 'abc'"),
    (["train", "--lr", "-0.1"], "argument --lr: must be > 0, got -0.1"),
    (["train", "--lr", "nan"], "argument --lr: must be > 0, got nan"),
    (["train", "--nu", "0"], "argument --nu: must be a positive number"),
    (["train", "--nu", "inf"], "argument --nu: must be a positive number"),
    (["train", "--nu", "adaptive-III"],
     "argument --nu: must be a positive number, adaptive-I or adaptive-II, "
     "got 'adaptive-III'"),
    (["train", "--losses", "0"], "argument --losses: must be > 0, got 0"),
    (["train", "--losses", "four"], "argument --losses: invalid int value"),
    (["train", "--depth", "9"], "argument --depth: invalid choice: 9"),
    (["train", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["train", "--weight-decay", "-0.001"],
     "argument --weight-decay: must be >= 0, got -0.001"),
    (["train", "--weight-decay=-1e-4"],
     "argument --weight-decay: must be >= 0, got -1e-4"),
    (["train", "--dataset", "cifar10", "--data-dir", "{tmp}/no_tfds"],
     "argument --data-dir: no such directory: {tmp}/no_tfds"),
    (["train", "--output-dir", "{model}"],
     "argument --output-dir: not a directory: {model}"),
    (["export", "{tmp}/none.keras", "--head", "0", "{tmp}/out.keras"],
     "argument model: no such file: {tmp}/none.keras"),
    (["export", "{model}", "--head", "0", "{tmp}/out.h5"],
     "OUTPUT must end in .keras, got {tmp}/out.h5"),
    (["export", "{model}", "--head", "0", "{tmp}/no_dir/out.keras"],
     "argument output: no such directory: {tmp}/no_dir"),
    (["export", "{model}", "--head", "first", "{tmp}/out.keras"],
     "argument --head: invalid int value: 'first'"),
    (["export", "{model}", "--head", "5", "{tmp}/out.keras"],
     "cannot export head 5 of {model}: `index` must be in [-2, 2)"),
    (["report", "{tmp}/none.keras"],
     "argument model: no such file: {tmp}/none.keras"),
    (["report", "{model}", "--dataset", "svhn_cropped", "--data-dir",
      "{tmp}/no_tfds"], "argument --data-dir: no such directory"),
    (["report", "{model}", "--csv", "{tmp}/no_dir/r.csv"],
     "argument --csv: no such directory: {tmp}/no_dir"),
]


@pytest.mark.parametrize(
    "argv, message", CLI_CASES,
    ids=[" ".join(argv) or "(none)" for argv, _ in CLI_CASES],
)
def test_cli_bad_flags_print_one_line_and_exit_2(
    argv, message, saved_model, tmp_path, capsys
):
    def fill(text):
        return text.format(tmp=tmp_path, model=saved_model)

    argv = [fill(a) for a in argv]
    if argv[:1] == ["train"] and "--output-dir" not in argv:
        argv += ["--output-dir", str(tmp_path / "run")]  # Must stay unmade.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert re.match(r"keras-mwbp( \w+)?: error: ", lines[0]), lines[0]
    assert fill(message) in lines[0]
    assert out == ""
    assert list(tmp_path.iterdir()) == []  # No file, no run directory.
