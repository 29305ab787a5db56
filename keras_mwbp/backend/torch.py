"""The PyTorch part of the training step: eager, re-linearized, exact.

Keras's torch trainer calls `model.train_step(data)` eagerly, on the
variables themselves. `train_step` below runs `keras_mwbp.algorithm` under
`torch.no_grad()`: the shared forward pass builds no autograd graph, and the
optimizer updates write the variables in place, as Keras's own torch
trainer does.

`TorchStep` is the forward record and reverse pass of
`reverse_pass.ReversePassStep` (shared with JAX); its non-trainable state
before each call (BatchNorm statistics, dropout seeds) is cloned, as torch
assigns variables in place. Each node's vector-Jacobian product is taken
at its stored inputs and its parameters' *current* values (after the
updates of the earlier losses of the step: paper Eq. 10), in one of two ways:

- by the node's hand-written rule (`torch_vjp`: convolutions, Dense,
  BatchNormalization, ReLU, Add, ...), which needs no forward output;
- otherwise by calling the node again, under `torch.enable_grad()`, on
  detached copies of its stored inputs and on detached leaves of its
  parameters' current values, in a `keras.StatelessScope` that replays its
  recorded state, and `torch.autograd.grad` of that call.

No autograd graph outlives the node's VJP, so nothing is ever
back-propagated through a tensor an optimizer has since written in place.
Where a node has no rule, the shared forward pass also records its own
autograd graph, used while no parameter has changed (`_graph_gradients`).
"""

import contextlib
import sys

import keras
import torch

from keras_mwbp import resume
from keras_mwbp.backend import reverse_pass
from keras_mwbp.backend.numerics import all_finite  # noqa: F401
from keras_mwbp.backend.program_order import after  # noqa: F401
from keras_mwbp.backend.program_order import control_dependencies  # noqa: F401
from keras_mwbp.backend.program_order import token  # noqa: F401
from keras_mwbp.backend.numerics import zero_nans  # noqa: F401
from keras_mwbp.backend import torch_vjp


class NonFiniteStep(Exception):
    """A failed `nan_policy="raise"` check (step, head); the wrapped train
    function turns it into a `FloatingPointError`."""

    def __init__(self, step, head):
        super().__init__(step, head)
        self.step = step
        self.head = head


def _is_float(value):
    return isinstance(value, torch.Tensor) and (
        value.is_floating_point() or value.is_complex()
    )


class TorchStep(reverse_pass.ReversePassStep):
    """`reverse_pass.ReversePassStep` with each node's VJP by its
    hand-written rule or by autograd of a re-call.

    Args:
        graph: The model's `HeadGraph`.
        initial_state: Optional state before the step, `{id(variable):
            (variable, value)}` (a new forward pass of the same step).
        rng_states: Optional torch random state before each node's call, by
            node index (a new forward pass of the same step replays them).
    """

    def __init__(self, graph, initial_state=None, rng_states=None):
        super().__init__(graph, initial_state)
        # Torch's global random state before each node's call in the shared
        # forward pass: Keras's torch Dropout without a seed draws its mask
        # from it, so a re-call (a VJP, naive MW-BP's new forward pass)
        # replays it to get the same mask.
        self.replay = rng_states is not None
        self.rng_states = dict(rng_states or {})
        # The shared forward pass's autograd graph (see `_graph_gradients`):
        # whether the pass records it, the heads' outputs in it, each
        # variable's parameter leaves, and each variable's tensor and
        # version when the graph was recorded.
        self._record = False
        self._graph_outputs = None
        self._leaves = {}
        self._versions = {}
        self._rules = {}

    def fresh(self):
        """`ReversePassStep.fresh`, replaying this step's random states."""
        return TorchStep(self.graph, self.initial_state, self.rng_states)

    def recording(self, persistent):
        """No tape: gradients are re-calls of the nodes (`_node_vjp`)."""
        del persistent
        return torch.no_grad()

    # -------------------------------------------------------------- forward
    def forward(self, model, x, training=True, nodes=None):
        """`ReversePassStep.forward`. A whole training-mode pass also
        records its autograd graph, which gives the gradients for as long as
        no parameter has changed, unless every node has a hand-written VJP
        (`torch_vjp`): those are as fast as the graph's backward, and the
        pass is faster and keeps less memory without it."""
        self._record = record = nodes is None and training and any(
            self._rule(index) is None for index in range(len(self.graph.nodes))
        )
        self._graph_outputs, self._leaves, self._versions = None, {}, {}
        with torch.enable_grad() if record else torch.no_grad():
            outputs = self._forward(model, x, training, nodes)
        if record:
            self._graph_outputs = outputs
        self.loss_inputs = [_detached(o) for o in outputs]
        return self.loss_inputs

    def _kept(self, value):
        return _detached(value)

    def _kept_state(self, value):
        return _copy(value)

    def _forward_node(self, index, edges, training):
        variables = self.graph.node_variables(index)
        params = [_leaf(v.value, self._record) for v in variables]
        if self._record:
            for variable, leaf in zip(variables, params):
                self._leaves.setdefault(id(variable), []).append(leaf)
                self._versions[id(variable)] = (
                    variable, variable.value, variable.value._version
                )
        if self.replay:
            return self._call(index, edges, params, training, replay=True)
        self.rng_states[index] = _rng_state()
        return self._call(index, edges, params, training)

    def _call(self, index, values, params, training, replay=False):
        """Node `index` on input `values` (by tensor id), its trainable
        variables at `params` and its state as recorded (with `replay`, the
        global random state too, which is left as it was); returns the flat
        outputs and the scope holding the state it wrote."""
        if replay:
            with _replayed_rng(self.rng_states[index]):
                return self._call(index, values, params, training)
        mapping = list(zip(self.graph.node_variables(index), params))
        mapping += list(self.states[index])
        return self._call_node(index, values, mapping, training)

    # --------------------------------------------------------------- losses
    def loss(self, index, loss_fn, y, output, sample_weight):
        """`ReversePassStep.loss`, without an autograd graph."""
        with torch.no_grad():
            return super().loss(index, loss_fn, y, output, sample_weight)

    # ------------------------------------------------------------ gradients
    def _graph_gradients(self, coefficients, variables):
        """The gradients by the shared forward pass's own autograd graph, or
        None once it is stale: when a parameter it was recorded at has been
        updated since (the tensor of a variable replaced, or written in
        place: its version counter moved), or was never recorded. Then the
        graph is dropped and the caller re-linearizes."""
        if self._graph_outputs is None:
            return None
        if any(
            variable.value is not tensor or tensor._version != version
            for variable, tensor, version in self._versions.values()
        ):
            self._graph_outputs, self._leaves, self._versions = None, {}, {}
            return None
        values, seeds = [], []
        with torch.enable_grad():
            for head, coefficient in coefficients:
                value = self.loss_fns[head](self._graph_outputs[head])
                values.append(value)
                seeds.append(torch.ones_like(value) * _as_tensor(
                    coefficient, value.dtype))
            per_variable = [self._leaves.get(id(v), []) for v in variables]
            leaves = [leaf for group in per_variable for leaf in group]
            grads = iter(torch.autograd.grad(
                values, leaves, seeds, retain_graph=True, allow_unused=True
            ) if leaves else ())
        result = []
        for variable, group in zip(variables, per_variable):
            # A variable used by several nodes has a leaf in each.
            parts = [g for g in (next(grads) for _ in group) if g is not None]
            result.append(
                sum(parts[1:], parts[0]) if parts else self._zeros_like_variable(variable)
            )
        return result

    def _backward(self, coefficients, variables):
        grads = self._graph_gradients(coefficients, variables)
        if grads is not None:
            return grads
        return super()._backward(coefficients, variables)

    def _loss_vjp(self, head, coefficient):
        logits = _leaf(self.loss_inputs[head], True)
        with torch.enable_grad():
            value = self.loss_fns[head](logits)
            seed = torch.ones_like(value) * _as_tensor(
                coefficient, value.dtype
            )
            (grad,) = torch.autograd.grad(value, [logits], seed)
        return grad

    def _recall_vjp(self, index, input_ids, variables, output_cts):
        """The VJP of the node called again, under `torch.enable_grad()`, on
        detached leaves of its stored inputs and of its parameters' current
        values, replaying its random state."""
        edges = self.edges[index]
        values = dict(edges)
        inputs = [_leaf(edges[i], True) for i in input_ids]
        values.update(zip(input_ids, inputs))
        params = [_leaf(v.value, True) for v in variables]
        with torch.enable_grad():
            outputs = self._call(
                index, values, params, training=True, replay=True
            )[0]
            pairs = [
                (out, ct.to(out.dtype))
                for out, ct in zip(outputs, output_cts)
                if ct is not None and _is_float(out) and out.requires_grad
            ]
            if not pairs:
                return None
            grads = torch.autograd.grad(
                [out for out, _ in pairs],
                inputs + params,
                grad_outputs=[ct for _, ct in pairs],
                allow_unused=True,
            )
        return grads[:len(inputs)], grads[len(inputs):]

    def _activation_vjp(self, activation, pre_activation, cotangent):
        y = _leaf(pre_activation, True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(
                activation(y), [y], cotangent.to(y.dtype)
            )
        return grad

    def _rule(self, index):
        """Node `index`'s hand-written VJP in training mode, or None; made
        once per step (a rule may cache the step's batch statistics)."""
        if index not in self._rules:
            self._rules[index] = torch_vjp.vjp_rule(
                self.graph.nodes[index], training=True)
        return self._rules[index]

    def _rule_vjp(self, index, output_cts, cotangents, var_grads):
        """Node `index`'s VJP by its hand-written rule (`torch_vjp`), which
        needs no forward output; False where it has none."""
        rule = self._rule(index)
        if rule is None or output_cts[0] is None:
            return False
        node = self.graph.nodes[index]
        edges = self.edges[index]
        inputs = [edges[id(t)] for t in node.input_tensors]
        needs = [
            id(t) in self.graph.producer and _is_float(x)
            for t, x in zip(node.input_tensors, inputs)
        ]
        params = {id(v): v.value for v in self.graph.node_variables(index)}
        result = rule(inputs, params, output_cts[0], needs)
        if result is None:
            return False
        input_grads, param_grads = result
        for t, grad, need in zip(node.input_tensors, input_grads, needs):
            if need:
                reverse_pass.accumulate(cotangents, id(t), grad)
        for key, grad in param_grads.items():
            reverse_pass.accumulate(var_grads, key, grad)
        return True

    def _zeros_like_variable(self, variable):
        return torch.zeros_like(variable.value).detach()

    _is_float = staticmethod(_is_float)


Step = TorchStep


# ------------------------------------------------------- the Keras trainer
def train_step(model, data):
    """`model.train_step(data)` for Keras's torch trainer (eager, on the
    variables): the algorithm without an autograd graph."""
    from keras_mwbp import algorithm

    with torch.no_grad():
        logs = algorithm.TrainingStep(model, sys.modules[__name__]).run(data)
        # Copies: a metric's result or `nu` can be the variable's own storage,
        # which a later in-place write (a metrics reset) would change.
        return {
            name: _copy(value) if isinstance(value, torch.Tensor) else value
            for name, value in logs.items()
        }


def skip_resumed(model, data):
    """The train function's logs for a batch a resumed backup already
    trained (`keras_mwbp.train_function`): drawn, not trained on."""
    return resume.skip_batches(model, iter(data))


def failure_of(error):
    """`(step, head)` if `error` is a failed `nan_policy="raise"` check."""
    if isinstance(error, NonFiniteStep):
        return error.step, error.head
    return None


def failure_in(model, result):
    """None: a failed check raises (`failure_of`)."""
    del model, result
    return None


# ---------------------------------------------------- updates and checks
def snapshot(variables):
    """(variable, value) pairs: a copy of each variable's value now (torch
    writes variables in place)."""
    return [(v, _copy(v.value)) for v in variables]






def first_failure(flags):
    """`(ok, head)`: whether every flag holds, and the head of the first that
    does not (`nan_policy.JOINT_HEAD`: the joint objective's gradient)."""
    bad = torch.stack([torch.logical_not(f) for _, f in flags])
    heads = torch.tensor([h for h, _ in flags], dtype=torch.int32)
    ok = torch.logical_not(bad.any())
    return ok, heads[torch.argmax(bad.to(torch.float32))]


def restore_unless(ok, saved):
    """Puts every variable of `saved` back to its saved value unless `ok`;
    returns `ok`."""
    if not bool(ok):
        for variable, value in saved:
            variable.assign(value)
    return ok


def assert_finite_step(ok, step, head):
    """Raises `NonFiniteStep` (after the restore) unless `ok`."""
    if not bool(ok):
        raise NonFiniteStep(int(step), int(head))
    return ok


def num_replicas():
    """1: no distribution strategy on the torch backend."""
    return 1


def regularization_gradients(variables):
    """Gradients of the variables' own regularizers at their current values
    (`None` for a variable without one)."""
    regularized = [v for v in variables if getattr(v, "regularizer", None)]
    if not regularized:
        return [None] * len(variables)
    leaves = [_leaf(v.value, True) for v in regularized]
    with torch.enable_grad():
        penalty = sum(v.regularizer(leaf)
                      for v, leaf in zip(regularized, leaves))
        grads = torch.autograd.grad(penalty, leaves, allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g
             for g, leaf in zip(grads, leaves)]
    by_id = dict(zip(map(id, regularized), grads))
    return [by_id.get(id(v)) for v in variables]


def random_state():
    """Torch's global random state as NumPy arrays (CPU first, then the
    current CUDA device's when Keras runs there), for a backup: Keras's
    torch `Dropout` without a seed draws its masks from it, so a resumed
    run draws the masks of the uninterrupted one only from this state."""
    cpu, cuda = _rng_state()
    return [t.cpu().numpy() for t in [cpu, *cuda]]


def writes_files(model):
    """Whether this process writes the run's files (backups): always (one
    process; Keras's torch backend has no multi-process training)."""
    del model
    return True


def set_random_state(arrays):
    """Puts back a `random_state()` (a backup made with CUDA resumed on
    the CPU restores the CPU state; one without a state changes nothing)."""
    if not arrays:
        return
    torch.set_rng_state(torch.from_numpy(arrays[0]).to(torch.uint8))
    for device, value in zip(_rng_devices(), arrays[1:]):
        torch.cuda.set_rng_state(
            torch.from_numpy(value).to(torch.uint8), device
        )


# ----------------------------------------------------------------- helpers
def _leaf(value, requires_grad):
    """A detached tensor of `value` (sharing its storage), as an autograd
    leaf when `requires_grad` and of a float dtype."""
    tensor = keras.ops.convert_to_tensor(value).detach()
    if requires_grad and tensor.is_floating_point():
        tensor.requires_grad_(True)
    return tensor


def _rng_devices():
    """The CUDA device whose random state is kept (Keras's torch backend
    runs on it when CUDA is available), if any."""
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []


def _rng_state():
    """Torch's global random state now (CPU, and the current CUDA device
    when Keras runs there)."""
    cuda = [torch.cuda.get_rng_state(d) for d in _rng_devices()]
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replayed_rng(state):
    """Runs the body from the random state `state` and puts the global
    random state back afterwards."""
    cpu, cuda = state
    devices = _rng_devices()
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(cpu)
        for device, value in zip(devices, cuda):
            torch.cuda.set_rng_state(value, device)
        yield


def _detached(value):
    """`value` without its autograd history (None stays None)."""
    return value.detach() if isinstance(value, torch.Tensor) else value


def _copy(value):
    """A copy of `value` that later in-place writes do not change."""
    return keras.ops.convert_to_tensor(value).detach().clone()


def _as_tensor(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.detach().to(dtype)
    return torch.tensor(value, dtype=dtype)

