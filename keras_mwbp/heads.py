"""Classifier heads to put on a trunk's feature maps.

Each builder takes a feature tensor, usually 4D `(batch, height, width,
channels)` (rank 3 and 5 feature maps and rank 2 feature vectors work too),
and returns logits. Its layers are named `"{name}_..."`; the last one is
`"{name}_dense"`.

Naming convention of keras_mwbp's models: the outputs of a model built by
the zoo (`keras_mwbp.models`) or by `keras_mwbp.attach_heads` are named
`"head_0", ..., "head_{K-1}"` for the auxiliary heads, shallowest first, and
`"final"` for the final head (`output_name(logits, name)` gives a head's
logits that name), so `fit()` logs `head_0_loss`, ..., `final_loss`,
`val_final_accuracy`, and callbacks monitor the same keys whichever way the
model was built.
"""

from keras import layers

from keras_mwbp.graph import producing_node

FINAL_HEAD = "final"


def output_name(logits, name):
    """`logits`, as the output of a layer named `name`.

    A head's logits pass through an `Identity` layer named `name` (unless
    the layer that computed them is already called so), so the model
    output and its log keys are `name`, e.g. `"head_0"` or `"final"`.

    Args:
        logits: Symbolic logits tensor of a head.
        name: The head's output name.

    Returns:
        A symbolic tensor equal to `logits`.
    """
    node = producing_node(logits)
    if node is not None and node.operation.name == name:
        return logits
    return layers.Identity(name=name)(logits)


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
    if len(x.shape) not in (2, 3, 4, 5):
        raise ValueError(
            f"`x` of head {name!r} must be a feature tensor of rank 2 to 5. "
            f"Received: x with shape {tuple(x.shape)}"
        )
    x = _global_pool(x, name)
    return layers.Dense(num_classes, name=f"{name}_dense")(x)


def cosine_head(embedding_dim=128):
    """A head builder for angular-margin training: global average pooling
    -> a linear `embedding_dim` embedding (layer `"{name}_embedding"`) ->
    `keras_mwbp.CosineLogits` (layer `"{name}_cosine"`).

    Pass it as `head=` (and `final_head=` to `attach_heads`) and train with
    `keras_mwbp.AngularMarginLoss`. Every head so built ends in its own
    embedding of the same size.

    Args:
        embedding_dim: Size of the embedding, a positive int.

    Returns:
        `head(x, num_classes, name)`, returning the cosines of shape
        `(batch, num_classes)`.
    """
    if (
        isinstance(embedding_dim, bool)
        or not isinstance(embedding_dim, int)
        or embedding_dim < 1
    ):
        raise ValueError(
            "`embedding_dim` must be a positive integer. "
            f"Received: embedding_dim={embedding_dim!r}"
        )

    def head(x, num_classes, name):
        from keras_mwbp.cosine_logits import CosineLogits

        x = _global_pool(x, name)
        x = layers.Dense(embedding_dim, name=f"{name}_embedding")(x)
        return CosineLogits(num_classes, name=f"{name}_cosine")(x)

    return head


def _global_pool(x, name):
    """Global average pooling of the rank of `x` (layer `"{name}_pool"`);
    a feature vector (rank 2) is returned as it is."""
    pooling = {
        3: layers.GlobalAveragePooling1D,
        4: layers.GlobalAveragePooling2D,
        5: layers.GlobalAveragePooling3D,
    }
    if len(x.shape) in pooling:
        return pooling[len(x.shape)](name=f"{name}_pool")(x)
    return x
