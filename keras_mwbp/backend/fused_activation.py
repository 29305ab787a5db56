"""Layers with a fused activation, split at their pre-activation.

The spec's decision on Eq. 4 and 10: layer j's Jacobian in loss i's backward
is `dx_{j+1}/dy_j * d_x F_j(x_j, U_j^i)`, the activation's derivative taken
at the stored pre-activation `y_j` of the shared forward pass (a feature)
and only `F_j` at the current parameters. A `Dense(..., activation="relu")`
thus keeps the shared forward's mask, as a separate `ReLU` layer does.

Every backend's step therefore runs such a layer in two parts: the layer
with its activation switched off (`without_activation`), whose output `y`
the forward record keeps, and the activation on `y`. A VJP first takes the
activation's VJP at the stored `y`, then the linear layer's at the stored
input and current parameters.

The split applies to the layers whose class runs the `call` of one of
Keras's `Dense`, `EinsumDense` and convolution layers, which end in
`self.activation(x)` (Keras 3.12.0 to 3.15.1); a subclass with a `call` of
its own is linearized whole, its activation included.
"""

import contextlib

import keras

_LAYERS = tuple(
    getattr(keras.layers, name)
    for name in (
        "Dense", "EinsumDense", "Conv1D", "Conv2D", "Conv3D",
        "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
        "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D",
        "SeparableConv2D",
    )
)


def fused_activation(operation):
    """The activation `operation` applies to its output as the last step
    of Keras's own `call`, or None (none, linear, or another layer)."""
    activation = getattr(operation, "activation", None)
    if activation is None or activation is keras.activations.linear:
        return None
    if not any(type(operation).call is cls.call for cls in _LAYERS):
        return None
    return activation


def pre_activation_calls(operation):
    """A context in which calls of `operation` return its pre-activation:
    `without_activation(operation)` where it has a fused activation, else
    a null context."""
    if fused_activation(operation) is None:
        return contextlib.nullcontext()
    return without_activation(operation)


@contextlib.contextmanager
def without_activation(operation):
    """Calls of `operation` inside return its pre-activation (the layer's
    `activation` is linear meanwhile; set around the call alone, which
    makes no collective call, so replicas run in turn do not see it)."""
    activation = operation.activation
    object.__setattr__(operation, "activation", keras.activations.linear)
    try:
        yield
    finally:
        object.__setattr__(operation, "activation", activation)
