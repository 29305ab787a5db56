"""Quick start: a small residual CNN with two auxiliary heads on the digits.

Builds the network with the functional API, trains it with Multi-way BP,
prints each head's test accuracy and saves the shallowest intermediate model
as a plain Keras model that loads without keras_mwbp.

Run: `python examples/quickstart.py` (about a minute on 2 CPU cores).
"""

import keras
from keras import layers

import keras_mwbp
from keras_mwbp.data import load_digits


def conv_bn_relu(x, filters, name):
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False,
                      name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def head(x, num_classes, name):
    # The output is named `name`: "head_0", "head_1", ..., "final", as
    # keras_mwbp's zoo and attach_heads name them (see keras_mwbp.heads).
    x = layers.GlobalAveragePooling2D(name=f"{name}_pool")(x)
    return layers.Dense(num_classes, name=name)(x)


def build(num_classes=10):
    inputs = keras.Input((8, 8, 1))
    x = conv_bn_relu(inputs, 16, "stem")
    y = conv_bn_relu(x, 16, "block1a")
    x = layers.Add(name="block1_add")([x, conv_bn_relu(y, 16, "block1b")])
    head_0 = head(x, num_classes, "head_0")
    x = conv_bn_relu(x, 32, "block2")
    head_1 = head(x, num_classes, "head_1")
    x = conv_bn_relu(x, 64, "block3")
    final = head(x, num_classes, "final")
    return keras_mwbp.MultiWayModel(inputs, [head_0, head_1, final],
                                    method="mwbp", nu=2.0)


def main():
    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test) = load_digits()
    model = build()
    print("tap depths", model.head_depths, "loss weights", model.head_weights)
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, batch_size=64, epochs=15,
              validation_data=(x_test, y_test), verbose=2)
    results = model.evaluate(x_test, y_test, return_dict=True, verbose=0)
    for name in model.output_names:
        print(f"{name}: test accuracy {results[f'{name}_accuracy']:.4f}")
    model.exit_model(0).save("head_0.keras")  # loads with plain Keras
    print("saved the shallowest intermediate model to head_0.keras")


if __name__ == "__main__":
    main()
