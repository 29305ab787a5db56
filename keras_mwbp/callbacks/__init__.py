"""Keras callbacks for `keras_mwbp.MultiWayModel`."""

from keras_mwbp.callbacks.adaptive_nu import AdaptiveNu

__all__ = ["AdaptiveNu"]
