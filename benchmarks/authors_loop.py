"""The authors' MW-BP training loop, rewritten for current PyTorch.

Plain PyTorch without Keras: the CIFAR ResNet of `keras_mwbp.models.
cifar_resnet` (same layers, shapes and heads; channels-first, as PyTorch
code is written) trained the way the authors' code trains it, in every
method of `keras_mwbp` (`training_step`, `METHODS`):

- `mwbp` / `reverse_mwbp`: one forward pass, then for each loss, shallowest
  (or deepest) first, `backward(retain_graph=True)` and a step of that
  loss's own SGD (`DataSGD`, over the parameters the loss reaches);
- `naive_mwbp` / `naive_reverse_mwbp`: the same, each loss after the first
  from a new forward pass, with the BatchNorm running statistics of the
  first pass kept;
- `joint`: one backward pass of `sum_i gamma_i loss_i`, one optimizer;
  `relay`: the same with loss i's gradient kept to segments
  `i - relay_span .. i` (`segment_parameters`); `standard`: the final loss.

Options: coupled weight decay (`torch.optim.SGD`'s) and the weighting of the
authors' code (`weighting="reference_code"`, `AuthorsLossOptimizer`: the
trunk's gradient times gamma_i at the rate `lr / sum_{j>=i} gamma_j`, the
head's own parameters at the full rate), as `keras_mwbp.MultiWayModel`'s
`weight_decay` and `weighting`.

It is a timing baseline for `benchmarks/step_time.py --backend torch`
(`make_step`, rows authors-mwbp and authors-joint) and the independent
reference of `tests/test_authors_loop.py` (`ResNetWithHeads(...,
keras_padding=True)` pads as Keras does).

Since PyTorch 1.5 autograd refuses a backward pass through tensors an
optimizer changed in place, so the per-loss optimizers here write the
parameters through `.data`, as the authors' PyTorch 1.0 optimizers did. That
hides the writes from autograd's version check: the backward pass of a later
loss sees the new value of every parameter an op saved by reference and the
old value of anything else an op kept. On this network that is exact MW-BP
(paper Eq. 10): the parameters a later loss back-propagates through are the
trunk's convolution kernels and BatchNorm scales, which those ops save
themselves, and everything else the trunk's ops keep (inputs, BatchNorm
batch statistics, ReLU outputs) is a feature of the shared forward pass,
which Eq. 10 keeps too. `tests/test_authors_loop.py` finds all seven
methods equal to `keras_mwbp`'s within float32 round-off. It is not exact in
general: an op that saves a value computed from a parameter (a cast under
autocast, a reparametrized weight, the output of an activation fused into a
layer with parameters, as in `Dense(activation="tanh")`) keeps its old
value.
The speed is one forward and one backward pass per loss, with no
re-linearization.
"""

import torch
from torch import nn
from torch.nn import functional as F

STAGE_FILTERS = (16, 32, 64)


def _bn(channels):
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)


class SameConv2d(nn.Conv2d):
    """A convolution with TensorFlow's (and Keras's) "same" padding: where
    the total padding is odd (a 3x3 stride-2 convolution on an even size),
    the extra row and column go at the bottom and right, where PyTorch's
    symmetric `padding=1` shifts the sampling grid by one pixel."""

    def forward(self, x):
        pads = []
        for size, kernel, stride in zip(reversed(x.shape[2:]),
                                        reversed(self.kernel_size),
                                        reversed(self.stride)):
            total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _conv(cin, cout, kernel, stride, keras_padding=False):
    if keras_padding:
        return SameConv2d(cin, cout, kernel, stride=stride, bias=False)
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2,
                     bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity or 1x1-conv + BN shortcut."""

    def __init__(self, cin, cout, stride, keras_padding=False):
        super().__init__()
        self.conv1 = _conv(cin, cout, 3, stride, keras_padding)
        self.bn1 = _bn(cout)
        self.conv2 = _conv(cout, cout, 3, 1, keras_padding)
        self.bn2 = _bn(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                _conv(cin, cout, 1, stride, keras_padding), _bn(cout))

    def forward(self, x):
        shortcut = x if self.shortcut is None else self.shortcut(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(shortcut + self.bn2(self.conv2(out)))


class Head(nn.Module):
    """Auxiliary head type A (BN -> ReLU -> avg pool -> dense), or, with
    `bn=False`, the final head (avg pool -> dense)."""

    def __init__(self, channels, num_classes, bn=True):
        super().__init__()
        self.bn = _bn(channels) if bn else None
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        if self.bn is not None:
            x = F.relu(self.bn(x))
        return self.fc(x.mean(dim=(2, 3)))


class ResNetWithHeads(nn.Module):
    """CIFAR ResNet-`6n+2` with auxiliary heads after the blocks `taps`
    (1-based), returning every head's logits, shallowest first.

    `keras_padding=True` pads every convolution as Keras's `"same"` does
    (`SameConv2d`), for a weight-for-weight copy of `keras_mwbp.models.
    cifar_resnet`; the default is the usual PyTorch ResNet (`padding=1`)."""

    def __init__(self, blocks_per_stage, taps, num_classes=10,
                 keras_padding=False):
        super().__init__()
        self.stem = nn.Sequential(
            _conv(3, STAGE_FILTERS[0], 3, 1, keras_padding),
            _bn(STAGE_FILTERS[0]), nn.ReLU())
        blocks, cin = [], STAGE_FILTERS[0]
        for stage, cout in enumerate(STAGE_FILTERS):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(cin, cout, stride, keras_padding))
                cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.taps = list(taps)
        self.heads = nn.ModuleList(
            [Head(self._channels(t), num_classes) for t in self.taps]
            + [Head(STAGE_FILTERS[-1], num_classes, bn=False)])

    def _channels(self, block):
        return self.blocks[block - 1].bn2.num_features

    def forward(self, x):
        x, outputs = self.stem(x), []
        for number, block in enumerate(self.blocks, start=1):
            x = block(x)
            if number in self.taps:
                outputs.append(self.heads[len(outputs)](x))
        outputs.append(self.heads[-1](x))
        return outputs

    def loss_parameters(self, i):
        """The parameters loss `i` reaches: the trunk below its head, and
        the head."""
        depth = (self.taps + [len(self.blocks)])[i]
        modules = [self.stem, *self.blocks[:depth], self.heads[i]]
        return [p for m in modules for p in m.parameters()]

    def segment_parameters(self, s):
        """Relay BP's segment `s`: the trunk between tap `s - 1` (the stem
        for `s = 0`) and tap `s`, and head `s`."""
        ends = [0] + self.taps + [len(self.blocks)]
        modules = [self.stem] if s == 0 else []
        modules += [*self.blocks[ends[s]:ends[s + 1]], self.heads[s]]
        return [p for m in modules for p in m.parameters()]


class DataSGD:
    """SGD with Nesterov momentum that writes the parameters through `.data`
    (hidden from autograd's version counters), as the authors' optimizers
    did; `weight_decay` is coupled, as `torch.optim.SGD`'s (added to the
    gradient before the momentum)."""

    def __init__(self, params, lr, momentum, weight_decay=0.0):
        self.params, self.lr, self.momentum = list(params), lr, momentum
        self.weight_decay = weight_decay
        self.buffers = [torch.zeros_like(p) for p in self.params]

    def step(self):
        grads = [p.grad for p in self.params]
        if self.weight_decay:
            grads = torch._foreach_add(grads, [p.data for p in self.params],
                                       alpha=self.weight_decay)
        torch._foreach_mul_(self.buffers, self.momentum)
        torch._foreach_add_(self.buffers, grads)
        updates = torch._foreach_add(grads, self.buffers,
                                     alpha=self.momentum)
        torch._foreach_add_([p.data for p in self.params], updates,
                            alpha=-self.lr)


METHODS = ("standard", "joint", "relay", "mwbp", "reverse_mwbp",
           "naive_mwbp", "naive_reverse_mwbp")


class AuthorsLossOptimizer:
    """The per-loss optimizers of the authors' code (`aux_trainer.py`) for
    loss `i`: an auxiliary loss's trunk parameters get their gradient times
    gamma_i and a `DataSGD` at the rate `lr / sum_{j=i}^{K-1} gamma_j`, its
    head's own parameters the plain gradient at the rate `lr`; the final
    loss one `DataSGD` at `lr`. Every `DataSGD` has the weight decay."""

    def __init__(self, model, i, gammas, lr, momentum, weight_decay):
        self.params = model.loss_parameters(i)
        last = len(gammas) - 1
        if i == last:
            self.trunk_scale = 1.0
            self.parts = [DataSGD(self.params, lr, momentum, weight_decay)]
            self.trunk = []
            return
        own = {id(p) for p in model.heads[i].parameters()}
        self.trunk = [p for p in self.params if id(p) not in own]
        head = [p for p in self.params if id(p) in own]
        self.trunk_scale = gammas[i]
        self.parts = [
            DataSGD(self.trunk, lr / sum(gammas[i:last]), momentum,
                    weight_decay),
            DataSGD(head, lr, momentum, weight_decay),
        ]

    def step(self):
        for p in self.trunk:
            p.grad.mul_(self.trunk_scale)
        for part in self.parts:
            part.step()


def mwbp_step(model, optimizers, gammas, x, y, order=None):
    """One forward pass, then per loss (shallowest first, or in `order`)
    its backward pass through the recorded graph and its own optimizer's
    step. `gammas` weight the losses (`None`: unweighted, for the authors'
    optimizers, which weight the gradients themselves)."""
    outputs = model(x)
    order = range(len(outputs)) if order is None else order
    for n, i in enumerate(order):
        optimizer = optimizers[i]
        for p in optimizer.params:
            p.grad = None
        loss = F.cross_entropy(outputs[i], y)
        if gammas is not None:
            loss = gammas[i] * loss
        loss.backward(retain_graph=n < len(outputs) - 1)
        optimizer.step()


def naive_step(model, optimizers, gammas, x, y, order):
    """Naive MW-BP: as `mwbp_step`, but each loss after the first from a new
    forward pass at the current parameters (its own batch statistics); the
    BatchNorm running statistics keep what the first pass made of them."""
    buffers = [b for m in model.modules() if isinstance(m, nn.BatchNorm2d)
               for b in m.buffers()]
    for n, i in enumerate(order):
        logits = model(x)[i]
        if n == 0:
            kept = [b.clone() for b in buffers]
        optimizer = optimizers[i]
        for p in optimizer.params:
            p.grad = None
        loss = F.cross_entropy(logits, y)
        (loss if gammas is None else gammas[i] * loss).backward()
        optimizer.step()
    with torch.no_grad():
        for b, k in zip(buffers, kept):
            b.copy_(k)


def joint_step(model, optimizer, gammas, x, y):
    """Joint BP: one backward pass of the weighted sum of the losses."""
    optimizer.zero_grad(set_to_none=True)
    outputs = model(x)
    sum(g * F.cross_entropy(o, y) for g, o in zip(gammas, outputs)).backward()
    optimizer.step()


def standard_step(model, optimizer, x, y):
    """Standard BP: the final loss only (the auxiliary heads get no
    gradient, and `torch.optim.SGD` skips them)."""
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x)[-1], y).backward()
    optimizer.step()


def relay_step(model, optimizer, gammas, x, y, span=1, scale=None):
    """Relay BP: as `joint_step`, but loss i's gradient is taken for, and
    reaches, only the parameters of segments `i - span .. i` (those of them
    it depends on: not the heads of the segments below its own). `span=None`
    reaches every parameter (Joint BP) and `scale(i, p)`, if given, is the
    factor of loss i's gradient on parameter `p` instead of gamma_i."""
    optimizer.zero_grad(set_to_none=True)
    outputs = model(x)
    for i, logits in enumerate(outputs):
        params = model.loss_parameters(i)
        if span is not None:
            reach = {id(p) for s in range(max(0, i - span), i + 1)
                     for p in model.segment_parameters(s)}
            params = [p for p in params if id(p) in reach]
        grads = torch.autograd.grad(F.cross_entropy(logits, y), params,
                                    retain_graph=i < len(outputs) - 1)
        for p, g in zip(params, grads):
            g = g * (gammas[i] if scale is None else scale(i, p))
            p.grad = g if p.grad is None else p.grad + g
    optimizer.step()


def reference_code_scale(model, gammas):
    """`scale(i, p)` of the authors' weighting for the one-update methods:
    1 on a head's own parameters and for the final loss, gamma_i /
    sum_{j=i}^{K-1} gamma_j on the trunk of an auxiliary loss i."""
    last = len(gammas) - 1
    trunk = {id(p) for p in model.loss_parameters(last)}

    def scale(i, p):
        if i == last or id(p) not in trunk:
            return 1.0
        return gammas[i] / sum(gammas[i:last])

    return scale


WEIGHTINGS = ("paper", "reference_code")


def training_step(method, model, gammas, lr=0.1, momentum=0.9,
                  relay_span=1, weighting="paper", weight_decay=0.0):
    """Returns `step(x, y)`, one training step of `method` (one of
    `METHODS`) on `model` with SGD (Nesterov momentum, coupled
    `weight_decay`); `x` is channels-first, `y` integer labels. The per-loss
    methods give every loss its own `DataSGD` over the parameters it
    reaches; under `weighting="reference_code"` the authors' per-loss
    optimizers (`AuthorsLossOptimizer`), and the one-update methods scale
    each loss's gradient as `reference_code_scale` says."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; one of "
                         f"{WEIGHTINGS}")
    num_losses = len(gammas)
    order = list(range(num_losses))
    if "reverse" in method:
        order.reverse()
    if method.endswith("mwbp"):
        if weighting == "reference_code":
            optimizers = [AuthorsLossOptimizer(model, i, gammas, lr, momentum,
                                               weight_decay)
                          for i in range(num_losses)]
            weights = None
        else:
            optimizers = [DataSGD(model.loss_parameters(i), lr, momentum,
                                  weight_decay)
                          for i in range(num_losses)]
            weights = gammas
        if method.startswith("naive_"):
            return lambda x, y: naive_step(model, optimizers, weights, x, y,
                                           order)
        return lambda x, y: mwbp_step(model, optimizers, weights, x, y, order)
    optimizer = torch.optim.SGD(model.parameters(), lr, momentum=momentum,
                                nesterov=True, weight_decay=weight_decay)
    if method == "standard":
        return lambda x, y: standard_step(model, optimizer, x, y)
    scale = None
    if weighting == "reference_code":
        scale = reference_code_scale(model, gammas)
    if method == "relay":
        return lambda x, y: relay_step(model, optimizer, gammas, x, y,
                                       relay_span, scale)
    if scale is not None:
        return lambda x, y: relay_step(model, optimizer, gammas, x, y, None,
                                       scale)
    return lambda x, y: joint_step(model, optimizer, gammas, x, y)


def make_step(method, blocks_per_stage, taps, gammas, x, y, lr=0.1,
              momentum=0.9):
    """Returns `(step, model)` for `method` (one of `METHODS`) on a new
    default `ResNetWithHeads` and the fixed batch `x`, `y`; `x` is
    channels-last, as the Keras rows get it."""
    torch.manual_seed(0)
    model = ResNetWithHeads(blocks_per_stage, taps).train()
    x = torch.as_tensor(x).permute(0, 3, 1, 2).contiguous()
    y = torch.as_tensor(y).long()
    step = training_step(method, model, gammas, lr, momentum)
    return (lambda: step(x, y)), model
