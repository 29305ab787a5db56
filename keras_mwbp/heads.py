"""Classifier heads to put on a trunk's feature maps.

Each builder takes a feature tensor, usually 4D `(batch, height, width,
channels)` (rank 3 and 5 feature maps and rank 2 feature vectors work too),
and returns logits. Its layers are named `"{name}_..."`; the last one, and so the
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
        x: Feature tensor of shape `(batch, height, width, channels)` (or of
            rank 2, 3 or 5, as for `pool_dense`).
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

    The pooling matches the rank of `x` (`GlobalAveragePooling1D` for rank 3,
    `2D` for rank 4, `3D` for rank 5); a feature vector (rank 2) goes
    straight to the dense layer.

    Args:
        x: Feature tensor of shape `(batch, height, width, channels)` (or
            `(batch, ..., channels)` of rank 2, 3 or 5).
        num_classes: Number of logits.
        name: Prefix of the layer names.

    Returns:
        Logits tensor of shape `(batch, num_classes)`.

    Example:

    >>> x = keras.Input((8, 8, 64))
    >>> keras.Model(x, pool_dense(x, 10, "final")).count_params()
    650
    """
    pooling = {
        3: layers.GlobalAveragePooling1D,
        4: layers.GlobalAveragePooling2D,
        5: layers.GlobalAveragePooling3D,
    }
    rank = len(x.shape)
    if rank in pooling:
        x = pooling[rank](name=f"{name}_pool")(x)
    elif rank != 2:
        raise ValueError(
            f"`x` of head {name!r} must be a feature tensor of rank 2 to 5. "
            f"Received: x with shape {tuple(x.shape)}"
        )
    return layers.Dense(num_classes, name=f"{name}_dense")(x)
