"""Auxiliary heads on a `keras.applications` backbone, trained with MW-BP.

MobileNetV2 (random weights, width 0.35) on the digits resized to 32x32,
with two auxiliary heads after blocks 2 and 5; prints the model-selection
table and saves the middle head as a plain Keras model.

Run: `python examples/heads_on_keras_applications.py` (a few minutes on 2
CPU cores).
"""

import keras
import tensorflow as tf

import keras_mwbp
from keras_mwbp import data
from keras_mwbp.report import format_table
from keras_mwbp.report import report


def to_rgb_32(images, labels):
    images = tf.image.resize(tf.image.grayscale_to_rgb(images), (32, 32))
    return images, labels


def main():
    keras.utils.set_random_seed(0)
    train, test, info = data.load("digits", batch_size=64)
    train, test = train.map(to_rgb_32), test.map(to_rgb_32)
    backbone = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None)
    model = keras_mwbp.attach_heads(
        backbone, ["block_2_add", "block_5_add"], info["num_classes"],
        method="mwbp")
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(train, epochs=10, validation_data=test, verbose=2)
    print(format_table(report(model, test)))
    model.exit_model(1).save("mobilenet_v2_head_1.keras")


if __name__ == "__main__":
    main()
