"""Keras callbacks for `keras_mwbp.MultiWayModel`."""

from keras_mwbp.callbacks.adaptive_nu import AdaptiveNu
from keras_mwbp.callbacks.tensorboard import TensorBoard

__all__ = ["AdaptiveNu", "TensorBoard"]
