"""The JAX part of the training step: stateless, jit-compiled, exact.

Keras's JAX trainer calls `train_step(state, data)` with the values of every
trainable, non-trainable, optimizer and metric variable, and takes the new
values back; it jit-compiles the call. `train_step` below maps every
variable to its value in one `keras.StatelessScope` and runs
`keras_mwbp.algorithm` inside it, so the algorithm's reads and writes
(optimizer updates, BatchNorm statistics, metrics) are stateless. Every
per-loss optimizer's variables are in `model.optimizer.variables`
(`MultiWayOptimizer.variables`), hence in the carried state.

`JaxStep` records the shared forward pass node by node: each node's inputs
(the features of the forward pass), its non-trainable state before the call
(BatchNorm statistics, dropout seeds) and its outputs. There is no tape: the
gradient of a linear combination of the head losses is a reverse pass over
the recorded nodes, each node's vector-Jacobian product taken by `jax.vjp`
of the node's stateless call at its stored inputs and at the parameters'
*current* values, i.e. after the updates of the earlier losses of the step
(paper Eq. 10). Nothing uses the forward pass's residuals: a node whose
parameters have not moved is linearized at the same point as in the forward
pass, one whose parameters have moved at the new one. XLA drops the re-call's
unused forward work (a convolution's output, for one) and merges what equals
the forward pass's.
"""

import contextlib
import sys

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_mwbp import _compat
from keras_mwbp import resume
from keras_mwbp._compat import operation_fn

# Key of the nan_policy="raise" report in the step's logs (removed by the
# wrapped train function before Keras sees the logs).
FAILURE_KEY = "_keras_mwbp_nonfinite"


class JaxStep:
    """One training step's forward record and vector-Jacobian products.

    Args:
        graph: The model's `HeadGraph`.
        initial_state: Optional state before the step, `{id(variable):
            (variable, value)}` (a new forward pass of the same step).
    """

    def __init__(self, graph, initial_state=None):
        self.graph = graph
        self.edges = {}
        self.states = {}
        self.initial_state = dict(initial_state or {})
        self.new_state = dict(self.initial_state)
        self.loss_inputs = []
        self.loss_fns = {}

    def fresh(self):
        """A new step for another forward pass from this step's initial
        state (same dropout masks), for naive MW-BP; its state is not
        committed."""
        return JaxStep(self.graph, self.initial_state)

    def recording(self, persistent):
        """Nothing to record on: JAX differentiates functions, not tapes."""
        del persistent
        return contextlib.nullcontext()

    # -------------------------------------------------------------- forward
    def forward(self, model, x, training=True, nodes=None):
        """Runs the nodes (all, or the indices in `nodes`) and records each
        one's inputs and state; returns the model outputs (None where not
        computed)."""
        tensors = {
            id(ref): value
            for ref, value in zip(model.inputs, model._standardize_inputs(x))
        }
        for index, node in enumerate(self.graph.nodes):
            if nodes is not None and index not in nodes:
                continue
            edges = {id(t): tensors[id(t)] for t in node.input_tensors}
            self.edges[index] = edges
            self.states[index] = [
                (v, self._state_value(v))
                for v in getattr(node.operation, "non_trainable_variables", [])
            ]
            params = [v.value for v in self.graph.node_variables(index)]
            outputs, scope = self._call(index, edges, params, training)
            for variable, _ in self.states[index]:
                new_value = scope.get_current_value(variable)
                if new_value is not None:
                    self.new_state[id(variable)] = (variable, new_value)
            for ref, value in zip(node.outputs, outputs):
                tensors[id(ref)] = value
        self.loss_inputs = [tensors.get(id(o)) for o in model.outputs]
        return self.loss_inputs

    def _state_value(self, variable):
        if id(variable) not in self.new_state:
            value = (variable, variable.value)
            self.initial_state[id(variable)] = value
            self.new_state[id(variable)] = value
        return self.new_state[id(variable)][1]

    def _call(self, index, values, params, training):
        """Node `index` on input `values` (by tensor id), its trainable
        variables at `params` and its state as recorded; returns the flat
        outputs and the scope holding the state it wrote."""
        node = self.graph.nodes[index]
        given = {id(v): p for v, p in zip(self.graph.node_variables(index),
                                          params)}
        given.update({id(v): value for v, value in self.states[index]})
        # Every variable the node reads must be mapped: a nested scope does
        # not see the enclosing one's values.
        mapping = [
            (v, given[id(v)] if id(v) in given else v.value)
            for v in getattr(node.operation, "variables", [])
        ]
        args, kwargs = node.arguments.fill_in(values)
        with keras.StatelessScope(state_mapping=mapping) as scope:
            outputs = operation_fn(node.operation, training=training)(
                *args, **kwargs
            )
        return keras.tree.flatten(outputs), scope

    def commit_state(self, after=()):
        """Writes the forward pass's new non-trainable state, once."""
        del after
        for variable, value in self.new_state.values():
            variable.assign(value)

    # --------------------------------------------------------------- losses
    def losses(self, loss_fns, y, y_pred, sample_weight):
        """Each head's loss; records the functions for their VJPs."""
        return [
            self.loss(i, loss_fn, y, out, sample_weight)
            for i, (loss_fn, out) in enumerate(zip(loss_fns, y_pred))
        ]

    def loss(self, index, loss_fn, y, output, sample_weight):
        """Head `index`'s loss of `output`; records it for its VJP."""

        def head_loss(logits):
            return loss_fn(y, logits, sample_weight=sample_weight)

        self.loss_fns[index] = head_loss
        return head_loss(output)

    # ------------------------------------------------------------ gradients
    def gradients(self, objective, variables):
        """Gradients of an `algorithm.Objective` for `variables`, by VJPs of
        every node at its stored inputs and current parameters."""
        return self._backward(objective.coefficients, variables)

    def multiway_gradients(self, index, objective, updated_ids):
        """Gradients of loss `index`'s objective at the current parameters
        (those updated by earlier losses of the step included), for
        `graph.loss_variables[index]`."""
        del updated_ids  # Every node is linearized at its current values.
        return self._backward(
            objective.coefficients, self.graph.loss_variables[index]
        )

    def _backward(self, coefficients, variables):
        graph = self.graph
        cotangents, var_grads, nodes = {}, {}, set()
        for head, coefficient in coefficients:
            value, vjp_fn = jax.vjp(self.loss_fns[head], self.loss_inputs[head])
            seed = jnp.broadcast_to(
                jnp.asarray(coefficient, value.dtype), value.shape
            )
            (grad,) = vjp_fn(seed)
            _accumulate(cotangents, graph.output_ids[head], grad)
            nodes |= graph.ancestors[head]
        for index in sorted(nodes, reverse=True):
            self._node_vjp(index, cotangents, var_grads)
        return [
            var_grads[id(v)] if id(v) in var_grads
            else jnp.zeros(v.shape, v.dtype)
            for v in variables
        ]

    def _node_vjp(self, index, cotangents, var_grads):
        """Node `index`'s VJP at its stored inputs and the current values of
        its parameters; adds to `cotangents` (by input tensor) and
        `var_grads` (by variable)."""
        node = self.graph.nodes[index]
        output_cts = [cotangents.get(id(o)) for o in node.outputs]
        if all(ct is None for ct in output_cts):
            return
        edges = self.edges[index]
        # Inputs made by another node, of a float dtype (the model's inputs
        # and integer tensors need no cotangent).
        input_ids = [
            ref_id for ref_id, value in edges.items()
            if ref_id in self.graph.producer and _is_float(value)
        ]
        variables = self.graph.node_variables(index)

        def call(inputs, params):
            values = dict(edges)
            values.update(zip(input_ids, inputs))
            return self._call(index, values, params, training=True)[0]

        outputs, vjp_fn = jax.vjp(
            call, [edges[i] for i in input_ids], [v.value for v in variables]
        )
        input_grads, param_grads = vjp_fn(
            [_cotangent(out, ct) for out, ct in zip(outputs, output_cts)]
        )
        for ref_id, grad in zip(input_ids, input_grads):
            _accumulate(cotangents, ref_id, grad)
        for variable, grad in zip(variables, param_grads):
            _accumulate(var_grads, id(variable), grad)


Step = JaxStep


# ------------------------------------------------------- the Keras trainer
def _state_variables(model, optimizer=True):
    """The variable groups of Keras's JAX state, in its order."""
    groups = [model.trainable_variables, model.non_trainable_variables]
    if optimizer:
        groups.append(model.optimizer.variables)
    groups.append(model.metrics_variables)
    return groups


def _stateless(model, state, function, optimizer=True):
    groups = _state_variables(model, optimizer)
    mapping = [
        (v, value)
        for variables, values in zip(groups, state)
        for v, value in zip(variables, values)
    ]
    with keras.StatelessScope(state_mapping=mapping) as scope:
        result = function()
    new_state = tuple(
        [scope.get_current_value(v) for v in variables] for variables in groups
    )
    return result, new_state


def train_step(model, state, data):
    """`model.train_step(state, data)` for Keras's JAX trainer: the
    algorithm on the carried state; returns `(logs, new_state)`."""
    from keras_mwbp import algorithm

    run = algorithm.TrainingStep(model, sys.modules[__name__])
    logs, new_state = _stateless(model, state, lambda: run.run(data))
    if run.failure is not None:
        ok, step, head = run.failure
        logs[FAILURE_KEY] = jnp.stack(
            [jnp.asarray(ok, "int32"), jnp.asarray(step, "int32"),
             jnp.asarray(head, "int32")]
        )
    return logs, new_state


def test_step(model, state, data):
    """`model.test_step(state, data)` for Keras's JAX trainer: the model's
    own test step on the carried state."""
    return _stateless(
        model, state, lambda: model.test_step(data), optimizer=False
    )


def wrap_train_function(model, function):
    """Keras's train function `(state, iterator) -> (logs, state)`, wrapped:
    it skips the batches a resumed backup already trained and raises a
    `FloatingPointError` naming the step and head when a
    `nan_policy="raise"` check failed (the returned state, already put back
    as before the step, is written to the variables first)."""

    def train_function(state, iterator):
        if model._batches_to_skip > 0:
            restoring = model._resume_metric_values is not None
            logs = resume.skip_batches(model, iterator)
            if restoring and model._resume_metric_values is None:
                # The metrics' running totals were just set on the variables.
                state = tuple(state[:-1]) + (
                    [v.value for v in model.metrics_variables],
                )
            return logs, state
        logs, state = function(state, iterator)
        report = logs.pop(FAILURE_KEY, None)
        if report is not None:
            ok, step, head = (int(v) for v in np.asarray(report))
            if not ok:
                _compat.jax_state_sync(model, state)
                raise FloatingPointError(model._nonfinite_message(step, head))
        return logs, state

    return train_function


# ---------------------------------------------------- updates and checks
def after(tensors, dependencies):
    """`tensors` (XLA orders reads and writes by data flow already)."""
    del dependencies
    return list(tensors)


def token(tensors):
    """A stand-in for "every tensor of `tensors` exists" (no-op here)."""
    del tensors
    return jnp.asarray(True)


def control_dependencies(dependencies):
    del dependencies
    return contextlib.nullcontext()


def snapshot(variables):
    """(variable, value) pairs: each variable's value now."""
    return [(v, v.value) for v in variables]


def all_finite(tensors):
    """A scalar boolean: every entry of every tensor is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(t)) for t in tensors]))


def zero_nans(grads):
    """The gradients with every NaN entry replaced by 0 (infinities kept)."""
    return [jnp.where(jnp.isnan(g), jnp.zeros_like(g), g) for g in grads]


def first_failure(flags):
    """`(ok, head)`: whether every flag holds, and the head of the first that
    does not (-1: the joint objective's gradient). Under
    `keras.distribution` the arrays are global, so every device agrees."""
    bad = jnp.stack([jnp.logical_not(f) for _, f in flags]).astype("float32")
    heads = jnp.asarray([h for h, _ in flags], "int32")
    return jnp.sum(bad) == 0, heads[jnp.argmax(bad)]


def restore_unless(ok, saved):
    """Puts every variable of `saved` back to its saved value unless `ok`;
    returns `ok`."""
    for variable, value in saved:
        variable.assign(jnp.where(ok, variable.value, value))
    return ok


def assert_finite_step(ok, step, head):
    """No assertion inside a jit-compiled step: the wrapped train function
    reads the report (`FAILURE_KEY`) and raises."""
    del step, head
    return ok


def num_replicas():
    """1: under `keras.distribution` the step sees the global batch."""
    return 1


def random_state():
    """No global random state to back up: Keras's random layers on this
    backend draw from seed-generator variables, saved with the model."""
    return []


def writes_files(model):
    """Whether this process writes the run's files (backups): the first
    process of a multi-process JAX run."""
    del model
    return jax.process_index() == 0


def set_random_state(arrays):
    """Nothing to restore (see `random_state`); a torch backup's state is
    ignored."""
    del arrays


def regularization_gradients(variables):
    """Gradients of the variables' own regularizers at their current values
    (`None` for a variable without one)."""
    regularized = [v for v in variables if getattr(v, "regularizer", None)]
    if not regularized:
        return [None] * len(variables)

    def penalty(values):
        return sum(v.regularizer(value)
                   for v, value in zip(regularized, values))

    grads = jax.grad(penalty)([v.value for v in regularized])
    by_id = dict(zip(map(id, regularized), grads))
    return [by_id.get(id(v)) for v in variables]


def _is_float(value):
    return jnp.issubdtype(jnp.result_type(value), jnp.inexact)


def _cotangent(output, cotangent):
    """The cotangent fed to a node's VJP for one of its outputs."""
    if not _is_float(output):
        return np.zeros(jnp.shape(output), dtype=jax.dtypes.float0)
    if cotangent is None:
        return jnp.zeros_like(output)
    return jnp.asarray(cotangent, jnp.result_type(output))


def _accumulate(store, key, value):
    if value is None:
        return
    store[key] = value if key not in store else store[key] + value
