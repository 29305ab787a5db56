"""Label values `fit` and `evaluate` refuse before any step: strings (issue:
NumPy's `UFuncTypeError` from the label check) and non-integer floats with a
sparse loss (issue: silently truncated)."""

import re

import keras
import numpy as np
import pytest

from conftest import compiled_mlp
from conftest import mlp_data

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")


def _state(model):
    return [keras.ops.convert_to_numpy(v).copy() for v in model.variables]


def _unchanged(before, model):
    return all(np.array_equal(a, keras.ops.convert_to_numpy(b))
               for a, b in zip(before, model.variables))


STRINGS = {
    "unicode": np.array(list("abcabcabcabcabca")),
    "object": np.array(["0", "1"] * 8, dtype=object),
    "bytes": np.array([b"0", b"1"] * 8),
}


@pytest.mark.parametrize("kind", sorted(STRINGS))
@pytest.mark.parametrize("where", ["fit", "validation_data", "evaluate"])
def test_string_labels_are_refused_naming_y(kind, where):
    model = compiled_mlp("mwbp")
    x, y = mlp_data(16)
    labels = STRINGS[kind]
    before = _state(model)
    with pytest.raises(ValueError) as info:
        if where == "fit":
            model.fit(x, labels, epochs=1, verbose=0)
        elif where == "validation_data":
            model.fit(x, y, epochs=1, verbose=0,
                      validation_data=(x, labels))
        else:
            model.evaluate(x, labels, verbose=0)
    message = str(info.value)
    assert message.startswith("`y` must hold numbers (class indices or "
                              "targets)")
    first = {"unicode": "'a'", "object": "'0'", "bytes": "b'0'"}[kind]
    assert message.endswith(
        f"Received: y with dtype {labels.dtype} (first value {first})")
    assert _unchanged(before, model)


def test_non_integer_float_labels_with_a_sparse_loss_are_refused():
    model = compiled_mlp("mwbp")
    x, _ = mlp_data(16)
    labels = np.arange(16) % 3 + 0.5  # 0.5, 1.5, 2.5, ...
    before = _state(model)
    with pytest.raises(ValueError, match=re.escape(
            "`y` must hold whole-number class indices for head 'h0' (loss "
            "sparse_categorical_crossentropy would truncate the others). "
            "Received: y with non-integer values such as 0.5")):
        model.fit(x, labels, epochs=1, verbose=0)
    assert _unchanged(before, model)
    nan_labels = (np.arange(16) % 3).astype("float32")
    nan_labels[3] = np.nan
    with pytest.raises(ValueError, match="non-integer values such as nan"):
        model.fit(x, nan_labels, epochs=1, verbose=0)
    assert _unchanged(before, model)


def test_whole_number_float_labels_train_as_integers():
    x, y = mlp_data(16)
    as_int = compiled_mlp("mwbp")
    as_float = compiled_mlp("mwbp")
    a = as_int.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    b = as_float.fit(x, y.astype("float32"), batch_size=8, epochs=1,
                     verbose=0).history
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)


def test_float_targets_of_a_dense_loss_are_accepted():
    model = compiled_mlp("mwbp")
    model.compile(optimizer="sgd", loss="mse")
    x, _ = mlp_data(16)
    targets = np.random.default_rng(0).normal(size=(16, 3)).astype("float32")
    history = model.fit(x, targets, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0])
