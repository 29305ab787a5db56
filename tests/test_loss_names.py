"""Plain functions as losses train whatever their name: TensorFlow refuses
"<lambda>" and names with a leading underscore as name scopes."""

import keras
import numpy as np
import pytest

from conftest import mlp_data
from conftest import mlp_model

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")


def _private_loss(y_true, y_pred):
    return keras.losses.sparse_categorical_crossentropy(
        y_true, y_pred, from_logits=True)


@pytest.mark.parametrize("loss", [
    _private_loss,
    lambda y_true, y_pred: keras.losses.sparse_categorical_crossentropy(
        y_true, y_pred, from_logits=True),
], ids=["underscore", "lambda"])
def test_function_losses_train_whatever_their_name(loss):
    model = mlp_model("mwbp")
    model.compile(optimizer="sgd", loss=loss)
    x, y = mlp_data(16)
    expected = keras.ops.convert_to_numpy(
        keras.losses.sparse_categorical_crossentropy(
            y, model.predict(x, verbose=0)[-1], from_logits=True)).mean()
    logs = model.train_on_batch(x, y, return_dict=True)
    np.testing.assert_allclose(logs["final_loss"], expected, rtol=1e-5)
