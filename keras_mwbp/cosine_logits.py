"""`CosineLogits`: the cosine of an embedding with each class centre."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_mwbp")
class CosineLogits(keras.layers.Layer):
    """Cosine logits: the L2-normalized input times the L2-normalized class
    centres.

    For an embedding `e` (the last axis of the input) and the centre `w_j` of
    class `j` (a column of the layer's `centres`, shape `(dim,
    num_classes)`), the output is `cos(theta_j) = e . w_j / (|e| |w_j|)`, in
    [-1, 1]. Train it with `keras_mwbp.AngularMarginLoss`, which applies the
    margin and the scale to the true class only, so inference needs no
    labels: the largest cosine is the prediction, and the normalized input
    is the embedding to compare faces (or any samples) with.

    Args:
        num_classes: Number of classes (identities), a positive int.
        epsilon: Added to the norms (a zero embedding gives cosines of 0).
        **kwargs: `keras.layers.Layer` arguments (`name`, `dtype`, ...).
    """

    def __init__(self, num_classes, epsilon=1e-12, **kwargs):
        if (
            isinstance(num_classes, bool)
            or not isinstance(num_classes, int)
            or num_classes < 1
        ):
            raise ValueError(
                "`num_classes` must be a positive integer. "
                f"Received: num_classes={num_classes!r}"
            )
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        self.centres = self.add_weight(
            shape=(input_shape[-1], self.num_classes),
            initializer="glorot_uniform",
            name="centres",
        )

    def call(self, inputs):
        embedding = inputs / (
            ops.sqrt(ops.sum(ops.square(inputs), axis=-1, keepdims=True))
            + self.epsilon
        )
        centres = self.centres / (
            ops.sqrt(ops.sum(ops.square(self.centres), axis=0, keepdims=True))
            + self.epsilon
        )
        return ops.matmul(embedding, centres)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.num_classes,)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "epsilon": self.epsilon,
        }
