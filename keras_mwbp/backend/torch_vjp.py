"""Hand-written vector-Jacobian products of common Keras layers, on torch.

A node's VJP in MW-BP is taken at its input from the shared forward pass and
at its parameters' current values (paper Eq. 10). Autograd can only give it
by calling the node again (`TorchStep._node_vjp`), which computes a forward
output nobody needs: a convolution's VJP needs its input and kernel, not its
output. The rules below compute the VJP directly, with the same math as
the layer's call on Keras's torch backend:

- `Conv1D`/`Conv2D`/`Conv3D` (padding "valid", "same" or "causal", any
  strides, dilation, groups and data format, with or without a bias):
  `torch.ops.aten.convolution_backward` on the input and kernel laid out as
  Keras's torch `conv` lays them out, with its "same" padding (extra pixel
  at the end);
- `Dense`: two matrix products and a sum;
- `BatchNormalization` in training mode: torch's batch-norm backward
  (`native_batch_norm_backward`) with the mean and variance of the stored
  input (variance E[x^2] - E[x]^2, as Keras's torch `moments`);
- `ReLU` (default arguments), `Activation("relu")`, `Activation("linear")`,
  `Identity`, `Add` of same-shaped inputs, and the global average poolings.

A rule applies only where its layer runs exactly Keras's own code: the
layer's class's `call` is Keras's (a subclass overriding it is re-called),
the activation is linear, no LoRA, no quantization, no mask, and inputs,
parameters and compute dtype are one float dtype (mixed precision is
re-called). Everything else is re-called, which is exact for any op.
tests/test_torch_vjp.py checks each rule against the re-call.
"""

import keras
import torch

from keras_mwbp._compat import conv_classes
from keras_mwbp._compat import merges_by_adding


def vjp_rule(node, training):
    """The hand-written VJP of `node`, or None (then it is re-called).

    Returns:
        A function `(inputs, params, cotangent, needs) -> (input_grads,
        param_grads)`: `inputs` are the node's stored input values, in
        `node.input_tensors` order; `params` maps `id(variable)` to its
        current value; `cotangent` is the output's; `needs[k]` says whether
        input k's gradient is wanted (None may be returned where not).
        `input_grads` is aligned with the inputs; `param_grads` maps
        `id(variable)` to its gradient.
    """
    if not training or len(node.outputs) != 1:
        return None
    if any(value is not None for value in node.arguments.kwargs.values()):
        return None  # A mask or another call argument.
    operation = node.operation
    for kind, make in _RULES:
        if isinstance(operation, kind):
            return make(operation, node)
    return None


# ------------------------------------------------------------------ checks
def _keras_call(operation, *classes):
    """Whether `operation`'s class runs the `call` of one of `classes`."""
    return any(type(operation).call is cls.call for cls in classes)


def _plain(operation):
    """No LoRA, no quantization, a linear activation, one float dtype."""
    if getattr(operation, "lora_enabled", False):
        return False
    if getattr(operation, "quantization_mode", None) is not None:
        return False
    if getattr(operation, "activation", None) not in (
        None, keras.activations.linear
    ):
        return False
    dtypes = {v.dtype for v in operation.weights}
    dtypes.add(keras.backend.standardize_dtype(operation.compute_dtype))
    return len(dtypes) == 1 and dtypes.pop() in ("float32", "float64")


def _runs_keras_call(operation, node, *classes):
    """A single-input node of a plain layer (`_plain`) whose class runs
    the `call` of one of `classes`."""
    return (_single_input(node) and _plain(operation)
            and _keras_call(operation, *classes))


def _single_input(node):
    args = node.arguments.args
    return (
        len(node.input_tensors) == 1
        and len(args) == 1
        and args[0] is node.input_tensors[0]
    )


def _checked(rule, *variables):
    """`rule`, called with the current values of `variables` (None entries
    stay None) where each is in `params` and every input and value has the
    cotangent's dtype; else None (re-called)."""

    def run(inputs, params, cotangent, needs):
        current = [None if v is None else params.get(id(v))
                   for v in variables]
        if any(v is not None and value is None
               for v, value in zip(variables, current)):
            return None
        dtype = cotangent.dtype
        if any(x.dtype != dtype for x in inputs) or any(
            value is not None and value.dtype != dtype for value in current
        ):
            return None
        return rule(inputs, current, cotangent, needs)

    return run


# ------------------------------------------------------------ convolution
def _same_padding(size, kernel, stride, dilation):
    """Keras's "same" padding on torch: (before, after), extra at the end."""
    effective = (kernel - 1) * dilation + 1
    if stride == 1:
        total = effective - 1
    else:
        total = max(0, (-(-size // stride) - 1) * stride + effective - size)
    return total // 2, total - total // 2


def _conv_rule(operation, node):
    if not _runs_keras_call(operation, node, *conv_classes()):
        return None
    if type(operation).convolution_op is not conv_classes()[0].convolution_op:
        return None
    rank = operation.rank
    channels_last = operation.data_format == "channels_last"
    kernel_var = operation.kernel
    bias_var = operation.bias if operation.use_bias else None
    strides = list(operation.strides)
    dilation = list(operation.dilation_rate)
    spatial = list(range(2, rank + 2))

    def rule(inputs, current, cotangent, needs):
        kernel, _ = current
        (x,) = inputs
        ct = cotangent
        if channels_last:  # To (batch, channels, *spatial), as Keras does.
            x = x.movedim(-1, 1)
            ct = ct.movedim(-1, 1)
        # (*kernel, in, out) -> (out, in, *kernel).
        weight = kernel.permute([rank + 1, rank] + list(range(rank)))
        weight = weight.contiguous()
        # Channels-last, as Keras's torch conv runs, except for a strided
        # 1x1 kernel: there oneDNN's AVX2 1x1 backward-weights kernel in
        # torch 2.13 gives a wrong kernel gradient in channels-last when the
        # input has fewer channels than its block (e.g. 3 -> 5 channels,
        # 8x8, stride 2; uxlfoundation/oneDNN#6035, open). Keras's own
        # autograd on torch gets it wrong too.
        pointwise = all(k == 1 for k in weight.shape[2:])
        strided = any(s != 1 for s in strides)
        if channels_last and rank in (2, 3) and not (pointwise and strided):
            memory = (torch.channels_last if rank == 2
                      else torch.channels_last_3d)
            x = x.contiguous(memory_format=memory)
            ct = ct.contiguous(memory_format=memory)
        else:
            x, ct = x.contiguous(), ct.contiguous()
        if operation.padding == "same":
            pads = [
                _same_padding(x.shape[d], weight.shape[d], s, r)
                for d, s, r in zip(spatial, strides, dilation)
            ]
        elif operation.padding == "causal":
            pads = [((operation.kernel_size[0] - 1) * dilation[0], 0)]
        else:
            pads = [(0, 0)] * rank
        symmetric = all(before == after for before, after in pads)
        if symmetric:
            padding = [before for before, _ in pads]
        else:
            flat = [p for pair in reversed(pads) for p in pair]
            x = torch.nn.functional.pad(x, flat)
            padding = [0] * rank
        groups = x.shape[1] // weight.shape[1]
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            ct, x, weight, None, strides, padding, dilation, False,
            [0] * rank, groups, [bool(needs[0]), True, False],
        )
        if grad_x is not None:
            if not symmetric:
                grad_x = grad_x[
                    (slice(None), slice(None)) + tuple(
                        slice(before, grad_x.shape[d] - after)
                        for d, (before, after) in zip(spatial, pads)
                    )
                ]
            if channels_last:
                grad_x = grad_x.movedim(1, -1)
        grads = {id(kernel_var): grad_w.permute(
            list(range(2, rank + 2)) + [1, 0])}
        if bias_var is not None:
            grads[id(bias_var)] = ct.sum([0] + spatial)
        return [grad_x], grads

    return _checked(rule, kernel_var, bias_var)


# ------------------------------------------------------------------ dense
def _dense_rule(operation, node):
    if not _runs_keras_call(operation, node, keras.layers.Dense):
        return None
    if operation.compute_dtype != "float32":
        # Keras's torch `matmul` rounds a float64 product to float32, and
        # autograd through it the gradients too: re-called, to stay equal.
        return None
    kernel_var = operation.kernel
    bias_var = operation.bias

    def rule(inputs, current, cotangent, needs):
        kernel, _ = current
        (x,) = inputs
        ct = cotangent.reshape(-1, cotangent.shape[-1])
        grads = {id(kernel_var): x.reshape(-1, x.shape[-1]).T @ ct}
        if bias_var is not None:
            grads[id(bias_var)] = ct.sum(0)
        grad_x = cotangent @ kernel.T if needs[0] else None
        return [grad_x], grads

    return _checked(rule, kernel_var, bias_var)


# ---------------------------------------------------- batch normalization
def _batch_norm_rule(operation, node):
    if not _runs_keras_call(operation, node, keras.layers.BatchNormalization):
        return None
    if not operation.trainable or getattr(operation, "renorm", False):
        return None
    if getattr(operation, "synchronized", False):
        return None
    gamma_var = operation.gamma if operation.scale else None
    beta_var = operation.beta if operation.center else None
    epsilon = operation.epsilon
    axis = operation.axis
    statistics = []  # (input, mean, inverse std): one input per step.

    def rule(inputs, current, cotangent, needs):
        gamma, _ = current
        (x,) = inputs
        channel = axis % x.ndim
        reduce = [d for d in range(x.ndim) if d != channel]
        if not statistics or statistics[0][0] is not x:
            mean = x.mean(reduce)
            variance = x.square().mean(reduce) - mean.square()
            statistics[:] = [(x, mean, (variance + epsilon).rsqrt())]
        _, mean, inv_std = statistics[0]
        grad_x, grad_gamma, grad_beta = (
            torch.ops.aten.native_batch_norm_backward(
                cotangent.movedim(channel, 1), x.movedim(channel, 1), gamma,
                None, None, mean, inv_std, True,
                epsilon, [bool(needs[0]), gamma_var is not None,
                          beta_var is not None],
            )
        )
        grads = {}
        if gamma_var is not None:
            grads[id(gamma_var)] = grad_gamma
        if beta_var is not None:
            grads[id(beta_var)] = grad_beta
        if grad_x is not None:
            grad_x = grad_x.movedim(1, channel)
        return [grad_x], grads

    return _checked(rule, gamma_var, beta_var)


# ------------------------------------------------- parameter-free layers
def _relu_rule(operation, node):
    if not _single_input(node):
        return None
    if isinstance(operation, keras.layers.ReLU):
        if not _keras_call(operation, keras.layers.ReLU) or (
            operation.negative_slope != 0 or operation.max_value is not None
            or operation.threshold != 0
        ):
            return None
    elif not _keras_call(operation, keras.layers.Activation):
        return None
    elif operation.activation is keras.activations.linear:
        return _identity_rule(operation, node)
    elif operation.activation is not keras.activations.relu:
        return None

    def rule(inputs, params, cotangent, needs):
        (x,) = inputs  # Where x > 0, as torch's ReLU backward.
        return [torch.ops.aten.threshold_backward(cotangent, x, 0)], {}

    return rule


def _identity_rule(operation, node):
    if not _single_input(node):
        return None
    if isinstance(operation, keras.layers.Identity) and not _keras_call(
        operation, keras.layers.Identity
    ):
        return None
    return lambda inputs, params, cotangent, needs: ([cotangent], {})


def _add_rule(operation, node):
    if not _keras_call(operation, keras.layers.Add) or (
        not merges_by_adding(operation)
    ):
        return None
    args = node.arguments.args
    if len(args) != 1 or len(args[0]) != len(node.input_tensors) or any(
        a is not b for a, b in zip(args[0], node.input_tensors)
    ):
        return None

    def rule(inputs, params, cotangent, needs):
        if any(x.shape != cotangent.shape for x in inputs):
            return None  # Broadcasting: re-called.
        return [cotangent] * len(inputs), {}

    return rule


def _pooling_rule(operation, node):
    if not _single_input(node) or not _keras_call(operation, *_POOLINGS):
        return None
    channels_last = operation.data_format == "channels_last"
    keepdims = operation.keepdims

    def rule(inputs, params, cotangent, needs):
        (x,) = inputs
        spatial = (list(range(1, x.ndim - 1)) if channels_last
                   else list(range(2, x.ndim)))
        ct = cotangent
        if not keepdims:
            for d in spatial:
                ct = ct.unsqueeze(d)
        count = 1
        for d in spatial:
            count *= x.shape[d]
        return [(ct / count).expand(x.shape)], {}

    return rule


_POOLINGS = (
    keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalAveragePooling3D,
)
_RULES = (
    (conv_classes()[0], _conv_rule),
    (keras.layers.Dense, _dense_rule),
    (keras.layers.BatchNormalization, _batch_norm_rule),
    (keras.layers.ReLU, _relu_rule),
    (keras.layers.Activation, _relu_rule),
    (keras.layers.Identity, _identity_rule),
    (keras.layers.Add, _add_rule),
    (_POOLINGS, _pooling_rule),
)
