"""`AngularMarginLoss`: ArcFace's and CosFace's margins on cosine logits."""

import math

import keras
from keras import ops

KINDS = ("arcface", "cosface")


@keras.saving.register_keras_serializable(package="keras_mwbp")
class AngularMarginLoss(keras.losses.Loss):
    """Softmax cross-entropy on cosine logits with an angular margin on the
    true class.

    `y_pred` holds cosines `cos(theta_j)` (for example from
    `keras_mwbp.CosineLogits`), `y_true` the class index of each sample (one
    label array serves every head). The true class's cosine becomes

    - `kind="arcface"` (Deng et al. 2019, additive angular margin):
      `cos(theta_y + m)`; where `theta_y + m > pi` (so that the logit would
      no longer fall as the angle grows) it is `cos(theta_y) - m sin(m)`
      instead, the usual fallback;
    - `kind="cosface"` (Wang et al. 2018, additive cosine margin):
      `cos(theta_y) - m`;

    every logit is multiplied by `scale`, and the loss is the sparse
    softmax cross-entropy of those logits. With `margin=0` both are the
    scaled-cosine softmax. The margin is applied here, in the loss, so the
    model's outputs (and inference) never need the labels.

    Args:
        margin: `m`, a finite number >= 0 (radians for ArcFace, where it
            must be below pi; a cosine for CosFace). Default 0.5 (ArcFace's).
        scale: `s`, a positive finite number. Default 64.
        kind: `"arcface"` or `"cosface"`.
        **kwargs: `keras.losses.Loss` arguments (`reduction`, `name`).
    """

    def __init__(self, margin=0.5, scale=64.0, kind="arcface", **kwargs):
        if kind not in KINDS:
            raise ValueError(
                f"`kind` must be one of {KINDS}. Received: kind={kind!r}"
            )
        if not _is_number(margin) or margin < 0 or (
            kind == "arcface" and margin >= math.pi
        ):
            limit = " and below pi for ArcFace" if kind == "arcface" else ""
            raise ValueError(
                f"`margin` must be a finite number >= 0{limit}. "
                f"Received: margin={margin!r}"
            )
        if not _is_number(scale) or scale <= 0:
            raise ValueError(
                "`scale` must be a positive finite number. "
                f"Received: scale={scale!r}"
            )
        kwargs.setdefault("name", f"{kind}_loss")
        super().__init__(**kwargs)
        self.margin = float(margin)
        self.scale = float(scale)
        self.kind = kind

    def call(self, y_true, y_pred):
        cosine = ops.clip(y_pred, -1.0, 1.0)
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        true_class = ops.one_hot(labels, ops.shape(cosine)[-1],
                                 dtype=cosine.dtype)
        m = self.margin
        if self.kind == "cosface":
            target = cosine - m
        else:
            # cos(theta + m) = cos(theta) cos(m) - sin(theta) sin(m), with
            # sin(theta) >= 0 on [0, pi] (no arccos: its gradient at +-1).
            sine = ops.sqrt(ops.maximum(1.0 - ops.square(cosine), 0.0))
            shifted = cosine * math.cos(m) - sine * math.sin(m)
            # theta + m > pi  <=>  cos(theta) < cos(pi - m).
            target = ops.where(
                cosine >= math.cos(math.pi - m), shifted,
                cosine - m * math.sin(m),
            )
        logits = self.scale * (true_class * target + (1.0 - true_class) * cosine)
        return keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True
        )

    def get_config(self):
        return {
            **super().get_config(),
            "margin": self.margin,
            "scale": self.scale,
            "kind": self.kind,
        }


def _is_number(value):
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
    )
