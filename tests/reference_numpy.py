"""Hand-written NumPy (float64) reference for multi-way backpropagation.

Everything here is plain NumPy: every backward function is derived by hand
with the chain rule, so the reference is independent of TensorFlow and Keras.
The formulas reproduce Keras 3 exactly: ``SGD`` with (Nesterov) momentum,
``BatchNormalization`` in training mode (biased batch variance, moving
statistics with momentum 0.99, epsilon 1e-3), ``Conv2D`` with ``"same"``
padding and stride 1 (cross-correlation, kernel ``(kh, kw, cin, cout)``),
``Dense`` (kernel ``(in, out)``) and
``SparseCategoricalCrossentropy(from_logits=True)`` averaged over the batch.

Conventions:
    * ``params`` maps a layer name to a dict of its trainable arrays
      (``"kernel"``/``"bias"`` or ``"gamma"``/``"beta"``).
    * ``bn_state`` maps a BatchNormalization layer name to a dict with
      ``"moving_mean"`` and ``"moving_variance"``.
    * Gradients use the same nested layout as ``params`` and contain only the
      layers that a loss depends on.
    * Every backward function receives the layer's STORED input (from the
      shared forward pass) and the layer's CURRENT parameters, so a backward
      pass may be evaluated at parameters that differ from those of the
      forward pass, as multi-way backpropagation requires.

:func:`train_steps` runs every training method of ``keras_mwbp``
(:data:`METHODS`), each a short update function of a :class:`Step`.
"""

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np

BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3


# --------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------


def dense_forward(x, kernel, bias):
    """Dense layer ``x @ kernel + bias``.

    Args:
        x: Input, shape ``(batch, in)``.
        kernel: Weights, shape ``(in, out)``.
        bias: Bias, shape ``(out,)``.

    Returns:
        Output, shape ``(batch, out)``.
    """
    return x @ kernel + bias


def dense_backward(x, kernel, grad_out):
    """Backward pass of :func:`dense_forward`.

    Args:
        x: Stored input, shape ``(batch, in)``.
        kernel: Current weights, shape ``(in, out)``.
        grad_out: Gradient with respect to the output, ``(batch, out)``.

    Returns:
        Tuple ``(grad_x, grads)`` where ``grads`` has ``"kernel"`` and
        ``"bias"``.
    """
    grad_x = grad_out @ kernel.T
    grads = {"kernel": x.T @ grad_out, "bias": grad_out.sum(axis=0)}
    return grad_x, grads


def relu_forward(x):
    """Rectified linear unit ``max(x, 0)``."""
    return np.maximum(x, 0.0)


def relu_backward(x, grad_out):
    """Backward pass of :func:`relu_forward` (derivative 0 at ``x == 0``).

    Args:
        x: Stored input.
        grad_out: Gradient with respect to the output.

    Returns:
        Gradient with respect to the input.
    """
    return grad_out * (x > 0.0)


def _same_padding(size):
    """Returns the (before, after) padding of "same" for stride 1."""
    total = size - 1
    return total // 2, total - total // 2


def _pad_same(x, kernel_height, kernel_width):
    """Zero-pads an NHWC tensor for a stride-1 "same" convolution."""
    return np.pad(
        x,
        (
            (0, 0),
            _same_padding(kernel_height),
            _same_padding(kernel_width),
            (0, 0),
        ),
    )


def conv2d_forward(x, kernel, bias):
    """2-D cross-correlation, stride 1, "same" padding, plus bias.

    ``out[n, i, j, o] = bias[o] + sum_{a, b, c} xp[n, i + a, j + b, c]
    * kernel[a, b, c, o]`` where ``xp`` is the zero-padded input.

    Args:
        x: Input, shape ``(batch, height, width, cin)``.
        kernel: Weights, shape ``(kh, kw, cin, cout)``.
        bias: Bias, shape ``(cout,)``.

    Returns:
        Output, shape ``(batch, height, width, cout)``.
    """
    kernel_height, kernel_width = kernel.shape[:2]
    height, width = x.shape[1:3]
    padded = _pad_same(x, kernel_height, kernel_width)
    out = np.zeros(x.shape[:3] + (kernel.shape[3],)) + bias
    for a in range(kernel_height):
        for b in range(kernel_width):
            window = padded[:, a : a + height, b : b + width, :]
            out += np.einsum("nhwc,co->nhwo", window, kernel[a, b])
    return out


def conv2d_backward(x, kernel, grad_out):
    """Backward pass of :func:`conv2d_forward`.

    Args:
        x: Stored input, shape ``(batch, height, width, cin)``.
        kernel: Current weights, shape ``(kh, kw, cin, cout)``.
        grad_out: Gradient with respect to the output.

    Returns:
        Tuple ``(grad_x, grads)`` where ``grads`` has ``"kernel"`` and
        ``"bias"``.
    """
    kernel_height, kernel_width = kernel.shape[:2]
    height, width = x.shape[1:3]
    padded = _pad_same(x, kernel_height, kernel_width)
    grad_padded = np.zeros_like(padded)
    grad_kernel = np.zeros_like(kernel)
    for a in range(kernel_height):
        for b in range(kernel_width):
            window = padded[:, a : a + height, b : b + width, :]
            grad_kernel[a, b] = np.einsum("nhwc,nhwo->co", window, grad_out)
            grad_padded[:, a : a + height, b : b + width, :] += np.einsum(
                "nhwo,co->nhwc", grad_out, kernel[a, b]
            )
    top, _ = _same_padding(kernel_height)
    left, _ = _same_padding(kernel_width)
    grad_x = grad_padded[:, top : top + height, left : left + width, :]
    grads = {"kernel": grad_kernel, "bias": grad_out.sum(axis=(0, 1, 2))}
    return grad_x, grads


def _channel_reduction_axes(x):
    """All axes except the last (channel) one."""
    return tuple(range(x.ndim - 1))


def batch_norm_moments(x):
    """Batch mean and BIASED batch variance over all axes but the channel."""
    axes = _channel_reduction_axes(x)
    mean = x.mean(axis=axes)
    variance = ((x - mean) ** 2).mean(axis=axes)
    return mean, variance


def batch_norm_forward(x, gamma, beta, epsilon=BN_EPSILON):
    """BatchNormalization in training mode (normalises with batch moments).

    Args:
        x: Input with channels last.
        gamma: Scale, shape ``(channels,)``.
        beta: Offset, shape ``(channels,)``.
        epsilon: Added to the variance.

    Returns:
        Tuple ``(output, (mean, variance))``; the batch moments feed
        :func:`update_moving_statistics`.
    """
    mean, variance = batch_norm_moments(x)
    normalized = (x - mean) / np.sqrt(variance + epsilon)
    return gamma * normalized + beta, (mean, variance)


def batch_norm_backward(x, gamma, grad_out, epsilon=BN_EPSILON):
    """Backward pass of :func:`batch_norm_forward` in training mode.

    The Jacobian uses the batch moments of the stored input ``x`` (the batch
    statistics depend on ``x``, so they are differentiated too) and the
    current ``gamma``. With ``x_hat = (x - mean) / sqrt(var + eps)`` and
    means taken over the reduction axes::

        dx = gamma / sqrt(var + eps)
             * (g - mean(g) - x_hat * mean(g * x_hat))

    Args:
        x: Stored input with channels last.
        gamma: Current scale.
        grad_out: Gradient with respect to the output.
        epsilon: Added to the variance.

    Returns:
        Tuple ``(grad_x, grads)`` where ``grads`` has ``"gamma"`` and
        ``"beta"``.
    """
    axes = _channel_reduction_axes(x)
    mean, variance = batch_norm_moments(x)
    inv_std = 1.0 / np.sqrt(variance + epsilon)
    normalized = (x - mean) * inv_std
    grad_x = (
        gamma
        * inv_std
        * (
            grad_out
            - grad_out.mean(axis=axes)
            - normalized * (grad_out * normalized).mean(axis=axes)
        )
    )
    grads = {
        "gamma": (grad_out * normalized).sum(axis=axes),
        "beta": grad_out.sum(axis=axes),
    }
    return grad_x, grads


def update_moving_statistics(state, moments, momentum=BN_MOMENTUM):
    """Keras moving-average update of one BatchNormalization layer.

    ``moving = moving * momentum + batch_statistic * (1 - momentum)``.

    Args:
        state: Dict with ``"moving_mean"`` and ``"moving_variance"``;
            updated in place.
        moments: Tuple ``(mean, variance)`` of the batch.
        momentum: Moving-average momentum.
    """
    mean, variance = moments
    state["moving_mean"] = state["moving_mean"] * momentum + mean * (
        1.0 - momentum
    )
    state["moving_variance"] = state["moving_variance"] * momentum + (
        variance * (1.0 - momentum)
    )


def add_forward(a, b):
    """Residual Add layer ``a + b``."""
    return a + b


def add_backward(grad_out):
    """Backward pass of ``a + b``: the gradient flows unchanged to both."""
    return grad_out, grad_out


def global_average_pool_forward(x):
    """GlobalAveragePooling2D: mean over height and width of NHWC input."""
    return x.mean(axis=(1, 2))


def global_average_pool_backward(x, grad_out):
    """Backward pass of :func:`global_average_pool_forward`.

    Args:
        x: Stored input, shape ``(batch, height, width, channels)``.
        grad_out: Gradient with respect to the output, ``(batch, channels)``.

    Returns:
        Gradient with respect to the input.
    """
    height, width = x.shape[1:3]
    spread = grad_out[:, None, None, :] / (height * width)
    return np.broadcast_to(spread, x.shape).copy()


def _log_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def cross_entropy_loss(logits, labels):
    """Mean over the batch of ``-log softmax(logits)[label]``.

    Args:
        logits: Shape ``(batch, classes)``.
        labels: Integer labels, shape ``(batch,)``.

    Returns:
        Scalar loss.
    """
    log_probs = _log_softmax(logits)
    return -log_probs[np.arange(len(labels)), labels].mean()


def cross_entropy_backward(logits, labels):
    """Gradient of :func:`cross_entropy_loss` w.r.t. the logits.

    ``(softmax(logits) - one_hot(labels)) / batch``.
    """
    grad = np.exp(_log_softmax(logits))
    grad[np.arange(len(labels)), labels] -= 1.0
    return grad / len(labels)


# --------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------


class SGDMomentum:
    """Keras 3 ``SGD`` with momentum; one velocity buffer per variable.

    Update for gradient ``g`` (velocity starts at 0)::

        v <- momentum * v - learning_rate * g
        w <- w + v                                    (plain)
        w <- w + momentum * v - learning_rate * g     (Nesterov)

    Keras's TensorFlow backend casts a Python float ``momentum`` to a
    float64 variable's dtype through float32; pass
    ``float(np.float32(momentum))`` to reproduce float64 Keras bit for bit.

    Attributes:
        velocities: Maps ``(layer_name, weight_name)`` to the velocity of
            every variable this optimizer has updated.
    """

    def __init__(self, learning_rate, momentum, nesterov=False):
        """Initialises the optimizer.

        Args:
            learning_rate: Step size.
            momentum: Momentum coefficient.
            nesterov: Whether to use Nesterov momentum.
        """
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.nesterov = nesterov
        self.velocities = {}

    def apply(self, params, grads):
        """Updates ``params`` in place with ``grads`` (same nested layout).

        Args:
            params: All parameters; only those present in ``grads`` change.
            grads: Gradients of the variables to update.
        """
        for layer_name, layer_grads in grads.items():
            for weight_name, grad in layer_grads.items():
                key = (layer_name, weight_name)
                velocity = self.velocities.get(key, np.zeros_like(grad))
                velocity = self.momentum * velocity - self.learning_rate * grad
                self.velocities[key] = velocity
                if self.nesterov:
                    step = self.momentum * velocity - self.learning_rate * grad
                else:
                    step = velocity
                params[layer_name][weight_name] = (
                    params[layer_name][weight_name] + step
                )


# --------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Network:
    """A multi-head network written out explicitly.

    Attributes:
        head_names: Layer names of the heads, shallowest first, final last;
            loss ``i`` is the cross-entropy of head ``i``.
        forward: ``forward(params, x) -> (logits, tape, moments)``: the
            logits of every head, the stored input of every layer (by a
            descriptive key), and the batch moments of every
            BatchNormalization layer (by layer name).
        backward: ``backward(params, tape, loss_index, grad_logits) ->
            grads``: gradient of loss ``loss_index`` for every parameter it
            depends on, evaluated at ``params`` with the stored ``tape``.
    """

    head_names: tuple
    forward: Callable
    backward: Callable


# Building blocks of the networks below: each forward helper stores its
# layer's input in ``tape`` (under the layer name, or a key for layers without
# parameters) and each backward helper reads it back, uses the CURRENT
# ``params``, and stores the parameter gradients in ``grads``.


def _dense(params, tape, name, x):
    tape[name] = x
    return dense_forward(x, params[name]["kernel"], params[name]["bias"])


def _dense_back(params, tape, name, grad, grads):
    grad, grads[name] = dense_backward(tape[name], params[name]["kernel"], grad)
    return grad


def _relu(tape, key, x):
    tape[key] = x
    return relu_forward(x)


def _relu_back(tape, key, grad):
    return relu_backward(tape[key], grad)


def _conv(params, tape, name, x):
    tape[name] = x
    return conv2d_forward(x, params[name]["kernel"], params[name]["bias"])


def _conv_back(params, tape, name, grad, grads):
    grad, grads[name] = conv2d_backward(
        tape[name], params[name]["kernel"], grad
    )
    return grad


def _bn(params, tape, moments, name, x):
    tape[name] = x
    out, moments[name] = batch_norm_forward(
        x, params[name]["gamma"], params[name]["beta"]
    )
    return out


def _bn_back(params, tape, name, grad, grads):
    grad, grads[name] = batch_norm_backward(
        tape[name], params[name]["gamma"], grad
    )
    return grad


def _gap(tape, key, x):
    tape[key] = x
    return global_average_pool_forward(x)


def _gap_back(tape, key, grad):
    return global_average_pool_backward(tape[key], grad)


def mlp_forward(params, x):
    """Forward pass of the MLP (see :data:`MLP`)."""
    tape, moments = {}, {}
    a1 = _relu(tape, "relu1", _dense(params, tape, "d1", x))
    h0 = _dense(params, tape, "h0", a1)
    a2 = _relu(tape, "relu2", _dense(params, tape, "d2", a1))
    h1 = _dense(params, tape, "h1", a2)
    final = _dense(params, tape, "final", a2)
    return [h0, h1, final], tape, moments


def mlp_backward(params, tape, loss_index, grad_logits):
    """Backward pass of one MLP loss (see :class:`Network`)."""
    grads = {}
    head = MLP.head_names[loss_index]
    grad = _dense_back(params, tape, head, grad_logits, grads)
    if loss_index >= 1:  # heads h1 and final sit on a2
        grad = _relu_back(tape, "relu2", grad)
        grad = _dense_back(params, tape, "d2", grad, grads)
    grad = _relu_back(tape, "relu1", grad)
    _dense_back(params, tape, "d1", grad, grads)
    return grads


MLP = Network(
    head_names=("h0", "h1", "final"),
    forward=mlp_forward,
    backward=mlp_backward,
)
"""MLP, input dim 5.

``d1(6) -> ReLU = a1 -> [h0(3)]``; ``d2(6) -> ReLU = a2 -> [h1(3)]``;
``a2 -> final(3)``.
"""


def convnet_forward(params, x):
    """Forward pass of the convolutional network (see :data:`CONVNET`)."""
    tape, moments = {}, {}
    stem = _bn(params, tape, moments, "bn1", _conv(params, tape, "c1", x))
    a1 = _relu(tape, "relu1", stem)
    branch = _bn(params, tape, moments, "bn2", _conv(params, tape, "c2", a1))
    branch = _relu(tape, "relu_block", branch)
    branch = _bn(params, tape, moments, "bn3", _conv(params, tape, "c3", branch))
    a2 = _relu(tape, "relu2", add_forward(branch, a1))
    h0 = _dense(params, tape, "h0", _gap(tape, "gap0", a2))
    a3 = _bn(params, tape, moments, "bn4", _conv(params, tape, "c4", a2))
    a3 = _relu(tape, "relu3", a3)
    h1 = _dense(params, tape, "h1", _gap(tape, "gap1", a3))
    top = _relu(tape, "relu_final", _conv(params, tape, "c5", a3))
    final = _dense(params, tape, "final", _gap(tape, "gap_final", top))
    return [h0, h1, final], tape, moments


def _convnet_back_to_a3(params, tape, loss_index, grad_logits, grads):
    """Backward from head 1 or the final head to the gradient w.r.t. a3."""
    if loss_index == 1:
        grad = _dense_back(params, tape, "h1", grad_logits, grads)
        return _gap_back(tape, "gap1", grad)
    grad = _dense_back(params, tape, "final", grad_logits, grads)
    grad = _gap_back(tape, "gap_final", grad)
    grad = _relu_back(tape, "relu_final", grad)
    return _conv_back(params, tape, "c5", grad, grads)


def convnet_backward(params, tape, loss_index, grad_logits):
    """Backward pass of one convolutional-network loss (see :class:`Network`)."""
    grads = {}
    if loss_index == 0:
        grad = _dense_back(params, tape, "h0", grad_logits, grads)
        grad_a2 = _gap_back(tape, "gap0", grad)
    else:
        grad = _convnet_back_to_a3(params, tape, loss_index, grad_logits, grads)
        grad = _relu_back(tape, "relu3", grad)
        grad = _bn_back(params, tape, "bn4", grad, grads)
        grad_a2 = _conv_back(params, tape, "c4", grad, grads)
    grad_sum = _relu_back(tape, "relu2", grad_a2)
    grad_branch, grad_skip = add_backward(grad_sum)
    grad = _bn_back(params, tape, "bn3", grad_branch, grads)
    grad = _conv_back(params, tape, "c3", grad, grads)
    grad = _relu_back(tape, "relu_block", grad)
    grad = _bn_back(params, tape, "bn2", grad, grads)
    grad = _conv_back(params, tape, "c2", grad, grads)
    grad = _relu_back(tape, "relu1", grad + grad_skip)
    grad = _bn_back(params, tape, "bn1", grad, grads)
    _conv_back(params, tape, "c1", grad, grads)
    return grads


CONVNET = Network(
    head_names=("h0", "h1", "final"),
    forward=convnet_forward,
    backward=convnet_backward,
)
"""Convolutional network, input ``(5, 5, 2)``; every conv is 3 channels,
3x3, "same".

``c1 -> bn1 -> ReLU = a1``; residual block
``ReLU(bn3(c3(ReLU(bn2(c2(a1))))) + a1) = a2 -> [GAP -> h0(4)]``;
``c4 -> bn4 -> ReLU = a3 -> [GAP -> h1(4)]``;
``a3 -> c5 -> ReLU -> GAP -> final(4)``.
"""


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def _add(grads_a, grads_b):
    total = copy.deepcopy(grads_a)
    for layer, layer_grads in grads_b.items():
        for name, grad in layer_grads.items():
            total.setdefault(layer, {})
            total[layer][name] = total[layer].get(name, 0.0) + grad
    return total


def _restrict(grads, layers):
    """The entries of ``grads`` whose layer is in ``layers``."""
    return {layer: g for layer, g in grads.items() if layer in layers}


def segments(dependencies):
    """Relay BP's segments: the layers each loss is the FIRST to depend on.

    Segment ``s`` holds the layers loss ``s`` depends on that no loss
    ``< s`` depends on: the trunk between tap ``s - 1`` and tap ``s`` plus
    head ``s``.

    Args:
        dependencies: Per loss, shallowest first, the set of layer names it
            depends on (see :func:`loss_dependencies`).

    Returns:
        List of sets of layer names, one per loss.
    """
    seen = set()
    result = []
    for layers in dependencies:
        result.append(set(layers) - seen)
        seen |= set(layers)
    return result


def relay_layers(dependencies, index, span):
    """Layers that loss ``index`` reaches in Relay BP with span ``c``:
    segments ``max(0, index - c) .. index``."""
    parts = segments(dependencies)
    return set().union(*parts[max(0, index - span) : index + 1])


def loss_dependencies(network, params, x, labels):
    """Per loss, the set of layer names whose parameters it depends on
    (read off the layers a backward pass returns gradients for)."""
    logits, tape, _ = network.forward(params, x)
    return [
        set(
            network.backward(
                params, tape, index, cross_entropy_backward(z, labels)
            )
        )
        for index, z in enumerate(logits)
    ]


def loss_scales(dependencies, gammas, weighting="paper"):
    """Factor applied to loss ``i``'s gradient, per loss and layer.

    ``"paper"``: ``gamma_i`` everywhere. ``"reference_code"`` (the authors'
    code): for an auxiliary loss ``i < K``, 1 on its head's own layers (those
    the final loss does not depend on) and
    ``gamma_i / sum_{j=i}^{K-1} gamma_j`` on the trunk (those the final loss
    depends on); 1 everywhere for the final loss.

    Returns:
        List (one per loss) of dicts ``{layer_name: factor}`` over the layers
        the loss depends on.
    """
    last = len(gammas) - 1
    scales = []
    for index, layers in enumerate(dependencies):
        if weighting == "paper":
            scales.append({layer: gammas[index] for layer in layers})
        elif weighting == "reference_code":
            if index == last:
                scales.append({layer: 1.0 for layer in layers})
                continue
            trunk = gammas[index] / sum(gammas[index:last])
            scales.append(
                {
                    layer: trunk if layer in dependencies[last] else 1.0
                    for layer in layers
                }
            )
        else:
            raise ValueError(f"unknown weighting {weighting!r}")
    return scales


def decay_scales(dependencies, gammas, weighting="paper"):
    """Factor of loss ``i``'s coupled weight decay, per loss and layer.

    ``"paper"``: 1 everywhere. ``"reference_code"``: the authors' code divides
    an auxiliary loss ``i``'s trunk learning rate by
    ``sum_{j=i}^{K-1} gamma_j``, so its trunk layers' decay has the factor
    ``1 / sum_{j=i}^{K-1} gamma_j``; 1 on the head's own layers and for the
    final loss.
    """
    last = len(gammas) - 1
    result = []
    for index, layers in enumerate(dependencies):
        if weighting == "paper" or index == last:
            result.append({layer: 1.0 for layer in layers})
            continue
        trunk = 1.0 / sum(gammas[index:last])
        result.append(
            {
                layer: trunk if layer in dependencies[last] else 1.0
                for layer in layers
            }
        )
    return result


def _decayed(grads, params, weight_decay, factors=None):
    """``grads`` plus ``weight_decay * factor * w`` for every parameter
    ``w`` they hold (coupled L2 decay, as ``torch.optim.SGD``)."""
    return {
        layer: {
            name: g + (1.0 if factors is None else factors[layer])
            * weight_decay * params[layer][name]
            for name, g in layer_grads.items()
        }
        for layer, layer_grads in grads.items()
    }


def _scale_per_layer(grads, factors):
    return {
        layer: {name: factors[layer] * g for name, g in layer_grads.items()}
        for layer, layer_grads in grads.items()
    }


@dataclass
class Step:
    """One training step's data, after the shared forward pass.

    Attributes:
        network: The network.
        params: The parameters, updated in place by the step's updates.
        x: The batch's inputs.
        labels: The batch's labels.
        tape: Stored layer inputs of the shared forward pass.
        grad_logits: Per loss, the gradient of the loss w.r.t. its logits
            from the shared forward pass.
        gammas: Loss weights.
        dependencies: Per loss, the set of layer names it depends on.
        scales: Per loss, ``{layer: factor}`` of its gradient
            (:func:`loss_scales`).
        relay_span: Relay BP's ``c``.
        optimizers: One optimizer, or one per loss.
        weight_decay: Coupled weight decay of every update.
        decays: Per loss, ``{layer: factor}`` of its weight decay
            (:func:`decay_scales`).
    """

    network: Network
    params: dict
    x: np.ndarray
    labels: np.ndarray
    tape: dict
    grad_logits: list
    gammas: tuple
    dependencies: list
    scales: list
    relay_span: int
    optimizers: list
    weight_decay: float = 0.0
    decays: list = None

    @property
    def num_losses(self):
        return len(self.network.head_names)

    def shared_gradient(self, index):
        """Gradient of loss ``index`` at the CURRENT parameters with the
        features of the shared forward pass (Eq. 10's re-linearization)."""
        return self.network.backward(
            self.params, self.tape, index, self.grad_logits[index]
        )

    def fresh_gradient(self, index):
        """Gradient of loss ``index`` from a NEW forward pass in training
        mode at the current parameters (its batch statistics are not used
        for the moving statistics)."""
        logits, tape, _ = self.network.forward(self.params, self.x)
        grad = cross_entropy_backward(logits[index], self.labels)
        return self.network.backward(self.params, tape, index, grad)

    def apply_loss(self, index, grads):
        """Scales loss ``index``'s gradient (:attr:`scales`), adds its weight
        decay (:attr:`decays`) and applies it with loss ``index``'s own
        optimizer."""
        scaled = _scale_per_layer(grads, self.scales[index])
        scaled = _decayed(
            scaled, self.params, self.weight_decay, self.decays[index]
        )
        self.optimizers[index].apply(self.params, scaled)

    def apply_single(self, grads):
        """The one update of the single-optimizer methods, with the weight
        decay of every parameter it touches."""
        grads = _decayed(grads, self.params, self.weight_decay)
        self.optimizers[0].apply(self.params, grads)


def _standard_update(step):
    """Ordinary (unweighted) gradient of the final loss, one optimizer."""
    final = step.num_losses - 1
    step.apply_single(step.shared_gradient(final))


def _joint_update(step):
    """Gradient of ``sum_i gamma_i * xi_i``, one optimizer, one update; under
    ``"reference_code"`` each loss's gradient scaled per layer instead
    (:attr:`Step.scales`)."""
    total = {}
    for index in range(step.num_losses):
        grads = step.shared_gradient(index)
        total = _add(total, _scale_per_layer(grads, step.scales[index]))
    step.apply_single(total)


def _relay_update(step):
    """Relay BP (Eq. 8): as joint, but loss ``i``'s gradient reaches only the
    segments ``max(0, i - c) .. i``; all gradients at the old parameters."""
    total = {}
    for index in range(step.num_losses):
        reach = relay_layers(step.dependencies, index, step.relay_span)
        grads = _restrict(step.shared_gradient(index), reach)
        total = _add(total, _scale_per_layer(grads, step.scales[index]))
    step.apply_single(total)


def _multiway(step, order):
    """One backward and update per loss, in ``order``, each at the CURRENT
    parameters with the features stored by the shared forward pass, applied
    by the loss's own optimizer."""
    for index in order:
        step.apply_loss(index, step.shared_gradient(index))


def _naive_multiway(step, order):
    """As :func:`_multiway`, but every loss after the first is
    back-propagated through a new forward pass at the current parameters."""
    for position, index in enumerate(order):
        if position == 0:
            grads = step.shared_gradient(index)
        else:
            grads = step.fresh_gradient(index)
        step.apply_loss(index, grads)


def _shallow_to_deep(step):
    return range(step.num_losses)


def _deep_to_shallow(step):
    return range(step.num_losses - 1, -1, -1)


def _mwbp_update(step):
    """Algorithm 1: loss by loss, shallow to deep; loss ``i`` is
    back-propagated through the parameters already updated by losses
    ``0..i-1`` in this step, with the features of the shared forward pass."""
    _multiway(step, _shallow_to_deep(step))


def _reverse_mwbp_update(step):
    """MW-BP from the final loss down to the shallowest."""
    _multiway(step, _deep_to_shallow(step))


def _naive_mwbp_update(step):
    """Naive MW-BP, shallow to deep, a new forward pass per later loss."""
    _naive_multiway(step, _shallow_to_deep(step))


def _naive_reverse_mwbp_update(step):
    """Naive MW-BP, deep to shallow, a new forward pass per later loss."""
    _naive_multiway(step, _deep_to_shallow(step))


def _persistent_tape_update(step):
    """WRONG variant: every loss's gradient at the OLD parameters, then each
    applied in sequence by that loss's own optimizer."""
    all_grads = [step.shared_gradient(i) for i in range(step.num_losses)]
    for index, grads in enumerate(all_grads):
        step.apply_loss(index, grads)


_UPDATES = {
    "standard": (_standard_update, False),
    "joint": (_joint_update, False),
    "relay": (_relay_update, False),
    "mwbp": (_mwbp_update, True),
    "reverse_mwbp": (_reverse_mwbp_update, True),
    "naive_mwbp": (_naive_mwbp_update, True),
    "naive_reverse_mwbp": (_naive_reverse_mwbp_update, True),
    "persistent_tape": (_persistent_tape_update, True),
}
"""Method name -> (parameter update, whether each loss has its own
optimizer). Every method but ``"standard"`` takes a ``weighting``."""

METHODS = tuple(name for name in _UPDATES if name != "persistent_tape")


def train_steps(
    network,
    params,
    bn_state,
    batches,
    method,
    gammas,
    learning_rate,
    momentum,
    nesterov=False,
    relay_span=1,
    weighting="paper",
    weight_decay=0.0,
):
    """Runs one training step per batch.

    Every step starts with ONE shared forward pass in training mode, which
    also updates the BatchNormalization moving statistics once (the naive
    methods' extra forward passes do not move them); the method then decides
    how the parameters are updated.

    Args:
        network: :data:`MLP` or :data:`CONVNET`.
        params: Initial parameters (not modified).
        bn_state: Initial moving statistics (not modified).
        batches: Iterable of ``(x, labels)``.
        method: One of :data:`METHODS` (``"standard"``, ``"joint"``,
            ``"relay"``, ``"mwbp"``, ``"reverse_mwbp"``, ``"naive_mwbp"``,
            ``"naive_reverse_mwbp"``) or the wrong variant
            ``"persistent_tape"``.
        gammas: Loss weight of every head, shallowest first.
        learning_rate: SGD learning rate: a number, or a function of the
            step index (0, 1, ...), as a Keras learning-rate schedule of
            the optimizer's step count.
        momentum: SGD momentum.
        nesterov: Whether SGD uses Nesterov momentum.
        relay_span: Relay BP's ``c`` (``"relay"`` only), an int >= 0.
        weighting: ``"paper"`` or ``"reference_code"`` (see
            :func:`loss_scales`); every method but ``"standard"``.
        weight_decay: Coupled weight decay: ``weight_decay * w`` added to
            the gradient of every parameter ``w`` an update touches, times
            :func:`decay_scales`'s factor in the per-loss updates.

    Returns:
        Tuple ``(params, bn_state, velocities)``: the trained parameters, the
        moving statistics and, per optimizer (one, or one per loss), its
        velocity dict.
    """
    update, one_optimizer_per_loss = _UPDATES[method]
    if weighting != "paper" and method == "standard":
        raise ValueError(f"weighting={weighting!r} needs several losses")
    if isinstance(relay_span, bool) or not isinstance(relay_span, int) or (
        relay_span < 0
    ):
        raise ValueError(f"relay_span must be an int >= 0: {relay_span!r}")
    params = copy.deepcopy(params)
    bn_state = copy.deepcopy(bn_state)
    num_optimizers = len(network.head_names) if one_optimizer_per_loss else 1
    optimizers = [
        SGDMomentum(None, momentum, nesterov) for _ in range(num_optimizers)
    ]
    dependencies = None
    for step_index, (x, labels) in enumerate(batches):
        for optimizer in optimizers:
            optimizer.learning_rate = (
                learning_rate(step_index) if callable(learning_rate)
                else learning_rate
            )
        if dependencies is None:  # They do not change between steps.
            dependencies = loss_dependencies(network, params, x, labels)
            scales = loss_scales(dependencies, gammas, weighting)
            decays = decay_scales(dependencies, gammas, weighting)
        logits, tape, moments = network.forward(params, x)
        for name, layer_moments in moments.items():
            update_moving_statistics(bn_state[name], layer_moments)
        step = Step(
            network=network,
            params=params,
            x=x,
            labels=labels,
            tape=tape,
            grad_logits=[cross_entropy_backward(z, labels) for z in logits],
            gammas=tuple(gammas),
            dependencies=dependencies,
            scales=scales,
            relay_span=relay_span,
            optimizers=optimizers,
            weight_decay=weight_decay,
            decays=decays,
        )
        update(step)
    return params, bn_state, [optimizer.velocities for optimizer in optimizers]
