"""The authors' MW-BP training loop, rewritten for current PyTorch (a baseline).

A timing baseline for `benchmarks/step_time.py --backend torch`, written in
plain PyTorch without Keras: the CIFAR ResNet of `keras_mwbp.models.
cifar_resnet` (same layers, shapes and heads; channels-first, as PyTorch
code is written) trained the way the authors' code trains it (one forward
pass, then for each loss, shallowest first, `backward(retain_graph=True)`
and a step of that loss's own SGD optimizer).

Since PyTorch 1.5 autograd refuses a backward pass through tensors an
optimizer changed in place, so the per-loss optimizers here write the
parameters through `.data`, as the authors' PyTorch 1.0 optimizers did. That
hides the writes from autograd's version check: the backward pass of a later
loss then sees the new value of every parameter an op saved (a convolution's
kernel) and the old value of anything else an op kept. It is MW-BP only as
far as that goes, and not exact (`keras_mwbp` re-linearizes instead); it is
here for its speed, the cost of one forward and one backward pass per loss
with no re-linearization.
"""

import torch
from torch import nn
from torch.nn import functional as F

STAGE_FILTERS = (16, 32, 64)


def _bn(channels):
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)


def _conv(cin, cout, kernel, stride):
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2,
                     bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity or 1x1-conv + BN shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, cout, 3, stride), _bn(cout)
        self.conv2, self.bn2 = _conv(cout, cout, 3, 1), _bn(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(_conv(cin, cout, 1, stride),
                                          _bn(cout))

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
    (1-based), returning every head's logits, shallowest first."""

    def __init__(self, blocks_per_stage, taps, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(_conv(3, STAGE_FILTERS[0], 3, 1),
                                  _bn(STAGE_FILTERS[0]), nn.ReLU())
        blocks, cin = [], STAGE_FILTERS[0]
        for stage, cout in enumerate(STAGE_FILTERS):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(cin, cout, stride))
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


class DataSGD:
    """SGD with Nesterov momentum that writes the parameters through `.data`
    (hidden from autograd's version counters), as the authors' optimizers
    did."""

    def __init__(self, params, lr, momentum):
        self.params, self.lr, self.momentum = list(params), lr, momentum
        self.buffers = [torch.zeros_like(p) for p in self.params]

    def step(self):
        grads = [p.grad for p in self.params]
        torch._foreach_mul_(self.buffers, self.momentum)
        torch._foreach_add_(self.buffers, grads)
        updates = torch._foreach_add(grads, self.buffers,
                                     alpha=self.momentum)
        torch._foreach_add_([p.data for p in self.params], updates,
                            alpha=-self.lr)


def mwbp_step(model, optimizers, gammas, x, y):
    """One forward pass, then per loss (shallowest first) its backward pass
    through the recorded graph and its own optimizer's step."""
    outputs = model(x)
    for i, (logits, optimizer) in enumerate(zip(outputs, optimizers)):
        for p in optimizer.params:
            p.grad = None
        loss = gammas[i] * F.cross_entropy(logits, y)
        loss.backward(retain_graph=i < len(outputs) - 1)
        optimizer.step()


def joint_step(model, optimizer, gammas, x, y):
    """Joint BP: one backward pass of the weighted sum of the losses."""
    optimizer.zero_grad(set_to_none=True)
    outputs = model(x)
    sum(g * F.cross_entropy(o, y) for g, o in zip(gammas, outputs)).backward()
    optimizer.step()


def make_step(method, blocks_per_stage, taps, gammas, x, y, lr=0.1,
              momentum=0.9):
    """Returns `(step, model)` for `method` "mwbp" or "joint"; `x` is
    channels-last, as the Keras rows get it."""
    torch.manual_seed(0)
    model = ResNetWithHeads(blocks_per_stage, taps).train()
    x = torch.as_tensor(x).permute(0, 3, 1, 2).contiguous()
    y = torch.as_tensor(y).long()
    if method == "mwbp":
        optimizers = [DataSGD(model.loss_parameters(i), lr, momentum)
                      for i in range(len(gammas))]
        return (lambda: mwbp_step(model, optimizers, gammas, x, y)), model
    optimizer = torch.optim.SGD(model.parameters(), lr, momentum=momentum,
                                nesterov=True)
    return (lambda: joint_step(model, optimizer, gammas, x, y)), model
