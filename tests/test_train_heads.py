"""`keras_mwbp.train_heads` (keras_mwbp/head_training.py): frozen-trunk training of the auxiliary heads."""

import warnings

import keras
import numpy as np
import pytest

from keras_mwbp import MultiWayModel
from keras_mwbp.head_training import train_heads

# Every layer the final output depends on: the trunk (final head included).
TRUNK = ("d1", "bn1", "d2", "bn2", "final")
HEADS = ("h0_hidden", "h0_bn", "head_0", "head_1")


def _model(method="standard"):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, name="d1")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.5, name="bn1")(x)
    x = keras.layers.ReLU()(x)
    h = keras.layers.Dense(5, name="h0_hidden")(x)
    h = keras.layers.BatchNormalization(momentum=0.5, name="h0_bn")(h)
    h0 = keras.layers.Dense(3, name="head_0")(keras.layers.ReLU()(h))
    x = keras.layers.Dense(8, name="d2")(x)
    x = keras.layers.BatchNormalization(momentum=0.5, name="bn2")(x)
    x = keras.layers.ReLU()(x)
    h1 = keras.layers.Dense(3, name="head_1")(x)
    final = keras.layers.Dense(3, name="final")(x)
    model = MultiWayModel(inputs, [h0, h1, final], method=method, shuffle_seed=0)
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _data(n=96):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0.5).astype("int32")
    return x, y


def _values(model, names):
    return {
        (name, i): np.array(v.numpy())
        for name in names
        for i, v in enumerate(model.get_layer(name).weights)
    }


def _cross_entropy(logits, y):
    """Mean sparse cross-entropy of logits, in NumPy."""
    logits = logits.astype("float64")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def _head_losses(model, x, y):
    outputs = model.predict(x, verbose=0)
    return [_cross_entropy(np.asarray(o), y) for o in outputs]


@pytest.mark.parametrize("as_dataset", [False, True])
def test_trunk_fixed_bit_for_bit_and_every_head_loss_decreases(as_dataset):
    x, y = _data()
    model = _model("standard")
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)  # trunk trained
    trunk_before = _values(model, TRUNK)
    heads_before = _values(model, HEADS)
    # The BN layers hold moving statistics, not the initial zeros and ones.
    assert not np.allclose(trunk_before[("bn1", 2)], 0.0)
    assert len(trunk_before) == 2 + 4 + 2 + 4 + 2
    flags = {layer.name: layer.trainable for layer in model.layers}
    losses_before = _head_losses(model, x, y)

    if as_dataset:
        import tensorflow as tf

        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    else:
        data = (x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = train_heads(
            model, data, epochs=4,
            optimizer=keras.optimizers.SGD(0.1, momentum=0.9), batch_size=32,
        )
    # No "shuffle=True was passed, but will be ignored" for a dataset.
    assert not [w for w in caught if "shuffle" in str(w.message)]

    trunk_after = _values(model, TRUNK)
    for key, value in trunk_before.items():
        np.testing.assert_array_equal(trunk_after[key], value, err_msg=str(key))
    heads_after = _values(model, HEADS)
    for key in heads_before:  # every head variable moved, BN stats included
        assert not np.array_equal(heads_after[key], heads_before[key]), key
    losses_after = _head_losses(model, x, y)
    for head in (0, 1):
        assert losses_after[head] < 0.9 * losses_before[head], (
            head, losses_before, losses_after)
    assert losses_after[2] == pytest.approx(losses_before[2], abs=1e-7)
    assert {layer.name: layer.trainable for layer in model.layers} == flags
    assert sorted(history.history) == ["head_0_loss", "head_1_loss", "loss"]
    assert len(history.history["head_0_loss"]) == 4


def test_only_chosen_heads_train_and_model_still_fits():
    x, y = _data()
    model = _model("joint")
    before = _values(model, TRUNK + HEADS)
    train_heads(model, (x, y), epochs=2, heads=[1], batch_size=32)
    after = _values(model, TRUNK + HEADS)
    for key, value in before.items():
        changed = not np.array_equal(after[key], value)
        assert changed == (key[0] == "head_1"), key
    # The model itself trains afterwards: the trainable flags were restored.
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert not np.array_equal(model.get_layer("d1").kernel.numpy(),
                              before[("d1", 0)])


def test_same_seed_same_result():
    x, y = _data()
    results = []
    for _ in range(2):
        model = _model("standard")
        train_heads(model, (x, y), epochs=2, batch_size=16, shuffle_seed=5)
        results.append(model.get_layer("head_0").kernel.numpy())
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(epochs=0), ValueError,
         "`epochs` must be a positive integer. Received: epochs=0"),
        (dict(epochs=1.5), ValueError,
         "`epochs` must be a positive integer. Received: epochs=1.5"),
        (dict(heads=[2]), ValueError,
         "indices from 0 to 1 (the final head is not trained). "
         "Received: heads=[2]"),
        (dict(heads=[0, 0]), ValueError, "Received: heads=[0, 0]"),
        (dict(batch_size=0), ValueError,
         "`batch_size` must be a positive integer. Received: batch_size=0"),
        (dict(shuffle_seed=-1), ValueError, "Received: shuffle_seed=-1"),
        (dict(optimizer="sgd"), TypeError,
         "`optimizer` must be a keras.optimizers.Optimizer or None. "
         "Received: optimizer='sgd'"),
        (dict(data=[1, 2, 3]), TypeError, "Received: a list of 3 items."),
        (dict(data="x"), TypeError, "Received: data of type str"),
        (dict(data=(np.zeros((4, 6)), np.zeros(3))), ValueError,
         "Received: input lengths [4] and 3 labels."),
    ],
)
def test_bad_input_is_refused_before_any_change(kwargs, error, message):
    x, y = _data()
    model = _model()
    before = _values(model, TRUNK + HEADS)
    call = dict(data=(x, y), epochs=1)
    call.update(kwargs)
    with pytest.raises(error) as info:
        train_heads(model, **call)
    assert message in str(info.value)
    after = _values(model, TRUNK + HEADS)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value)


def test_model_optimizer_and_single_output_refused():
    x, y = _data()
    model = _model()
    with pytest.raises(ValueError, match="must be a new optimizer"):
        train_heads(model, (x, y), epochs=1, optimizer=model.optimizer)
    inputs = keras.Input((6,))
    single = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    with pytest.raises(ValueError, match=r"at least two outputs.*Received: 1"):
        train_heads(single, (x, y), epochs=1)
    with pytest.raises(TypeError, match="functional keras.Model"):
        train_heads("model", (x, y), epochs=1)


def test_heads_without_own_layers_refused():
    x, y = _data()
    inputs = keras.Input((6,))
    a = keras.layers.Dense(3, name="a")(inputs)
    b = keras.layers.Dense(3, name="b")(a)
    model = keras.Model(inputs, [a, b])  # the "head" is part of the trunk
    with pytest.raises(ValueError, match="nothing to train"):
        train_heads(model, (x, y), epochs=1)


def test_exported_as_a_function_after_its_module_is_imported():
    """`keras_mwbp.train_heads` is the function, also once its module is
    imported (a module of the same name would replace it: no such module)."""
    import importlib
    import importlib.util
    import types

    import keras_mwbp

    importlib.import_module("keras_mwbp.head_training")
    assert "train_heads" in keras_mwbp.__all__
    assert isinstance(keras_mwbp.train_heads, types.FunctionType)
    assert importlib.util.find_spec("keras_mwbp.train_heads") is None
    x, y = _data()
    model = _model()
    kernel = model.get_layer("head_1").kernel.numpy()
    keras_mwbp.train_heads(model, (x, y), epochs=1, heads=[1])
    assert not np.array_equal(model.get_layer("head_1").kernel.numpy(), kernel)


def test_weight_decay_is_coupled_and_taken_off_afterwards():
    """One step of plain SGD on one batch: with `weight_decay`, every head
    variable ends at `w - lr * (g + weight_decay * w)`, `g` its gradient
    without decay (the same run without it); the trunk stays fixed and no
    regularizer is left on any variable."""
    x, y = _data(16)
    lr, decay = 0.05, 0.3
    ends = []
    for weight_decay in (0.0, decay):
        model = _model("standard")
        start = _values(model, TRUNK + HEADS)
        train_heads(model, (x, y), epochs=1, batch_size=16, shuffle_seed=0,
                    optimizer=keras.optimizers.SGD(lr),
                    weight_decay=weight_decay)
        ends.append(_values(model, TRUNK + HEADS))
        assert all(v.regularizer is None for v in model.trainable_variables)
    plain, decayed = ends
    moved = 0
    for key, value in start.items():
        if key[0] in TRUNK:
            np.testing.assert_array_equal(decayed[key], value)
            continue
        if not model.get_layer(key[0]).weights[key[1]].trainable:
            np.testing.assert_array_equal(decayed[key], plain[key])
            continue
        np.testing.assert_allclose(
            decayed[key], plain[key] - lr * decay * value, rtol=1e-5,
            atol=1e-6, err_msg=str(key))
        moved += 1
    assert moved == 8  # h0_hidden, h0_bn (gamma, beta), head_0, head_1.


def test_weight_decay_must_be_non_negative():
    x, y = _data()
    with pytest.raises(ValueError, match=r"`weight_decay` must be a finite "
                       r"non-negative number. Received: weight_decay=-0.1"):
        train_heads(_model(), (x, y), epochs=1, weight_decay=-0.1)
