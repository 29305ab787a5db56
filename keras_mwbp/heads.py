"""Classifier heads to put on a trunk's feature maps.

Each builder takes a 4D feature tensor `(batch, height, width, channels)` and
returns logits. Its layers are named `"{name}_..."`; the last one, and so the
model output, is `"{name}_dense"`.
"""

from keras import layers


def batch_normalization(name):
    """`BatchNormalization` with the authors' (PyTorch's) settings.

    PyTorch's momentum 0.1 is Keras's `momentum=0.9`; epsilon is 1e-5. Keras's
    default momentum 0.99 lets the moving statistics lag far behind on short
    runs.

    Args:
        name: Layer name.

    Returns:
        A `keras.layers.BatchNormalization` layer.
    """
    return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)


def bn_relu_pool_dense(x, num_classes, name):
    """The authors' auxiliary head "type A": BN -> ReLU -> avg pool -> dense.

    Args:
        x: Feature tensor of shape `(batch, height, width, channels)`.
        num_classes: Number of logits.
        name: Prefix of the layer names.

    Returns:
        Logits tensor of shape `(batch, num_classes)`.

    Example:

    >>> x = keras.Input((8, 8, 16))
    >>> keras.Model(x, bn_relu_pool_dense(x, 10, "head_0")).count_params()
    234
    """
    x = batch_normalization(f"{name}_bn")(x)
    x = layers.ReLU(name=f"{name}_relu")(x)
    return pool_dense(x, num_classes, name)


def pool_dense(x, num_classes, name):
    """Global average pooling -> dense (the ResNet classifier, "type C").

    Args:
        x: Feature tensor of shape `(batch, height, width, channels)`.
        num_classes: Number of logits.
        name: Prefix of the layer names.

    Returns:
        Logits tensor of shape `(batch, num_classes)`.

    Example:

    >>> x = keras.Input((8, 8, 64))
    >>> keras.Model(x, pool_dense(x, 10, "final")).count_params()
    650
    """
    x = layers.GlobalAveragePooling2D(name=f"{name}_pool")(x)
    return layers.Dense(num_classes, name=f"{name}_dense")(x)
