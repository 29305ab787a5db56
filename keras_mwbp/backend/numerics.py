"""The step's backend-neutral numerics, written once with `keras.ops`.

Each backend module re-exports them (`keras_mwbp.algorithm` reaches every
primitive through the backend module); what needs a backend's own autodiff
or graph machinery stays in that module.
"""

from keras import ops


def all_finite(tensors):
    """A scalar boolean: every entry of every tensor is finite."""
    return ops.all(ops.stack([ops.all(ops.isfinite(t)) for t in tensors]))


def zero_nans(grads):
    """The gradients with every NaN entry replaced by 0 (infinities kept)."""
    return [ops.where(ops.isnan(g), ops.zeros_like(g), g) for g in grads]
