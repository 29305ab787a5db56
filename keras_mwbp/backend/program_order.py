"""The update-ordering helpers of the backends that need none.

TensorFlow's graph mode must be told that an update waits for every
gradient of its loss (`keras_mwbp.backend.tensorflow.after`). Under JAX,
XLA orders reads and writes by data flow; PyTorch runs eagerly, in program
order. Those two backends re-export the no-ops below.
"""

import contextlib

from keras import ops


def after(tensors, dependencies):
    """`tensors`, unchanged: they already come after `dependencies`."""
    del dependencies
    return list(tensors)


def token(tensors):
    """A stand-in for "every tensor of `tensors` exists" (a no-op)."""
    del tensors
    return ops.convert_to_tensor(True)


def control_dependencies(dependencies):
    """A context that adds no dependency."""
    del dependencies
    return contextlib.nullcontext()
