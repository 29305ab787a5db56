"""The model, data and training of the distribution tests' child processes
(test_distribute.py: TensorFlow's MirroredStrategy; test_jax_distribute.py:
Keras's DataParallel on JAX): a 2-head MLP, 32 samples, 2 epochs of
batch 16. Import it after the child has configured its devices."""

import keras
import numpy as np

import keras_mwbp


def build(method="mwbp", batch_norm=False):
    """The 2-head MLP: d1 (L2-regularized) -> [bn] -> aux, d2 -> final."""
    inputs = keras.Input((6,))
    x = keras.layers.Dense(5, activation="relu", name="d1",
                           kernel_regularizer="l2")(inputs)
    if batch_norm:
        x = keras.layers.BatchNormalization(name="bn")(x)
    aux = keras.layers.Dense(3, name="aux")(x)
    x = keras.layers.Dense(5, activation="relu", name="d2")(x)
    final = keras.layers.Dense(3, name="final")(x)
    return keras_mwbp.MultiWayModel(inputs, [aux, final], method=method,
                                    head_weights=[0.5, 1.0])


def compile(model):
    model.compile(
        keras.optimizers.SGD(0.1, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])


def data():
    """`(x, y)`: 32 samples of 6 features, 3 classes."""
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 6)).astype("float32"), rng.integers(0, 3, 32)


def train(model, x, y):
    """2 epochs of batch 16 in order; returns the History's dict."""
    return model.fit(x, y, batch_size=16, epochs=2, shuffle=False,
                     verbose=0).history
