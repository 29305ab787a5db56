"""The JAX part of the training step: stateless, jit-compiled, exact.

Keras's JAX trainer calls `train_step(state, data)` with the values of every
trainable, non-trainable, optimizer and metric variable, and takes the new
values back; it jit-compiles the call. `train_step` below maps every
variable to its value in one `keras.StatelessScope` and runs
`keras_mwbp.algorithm` inside it, so the algorithm's reads and writes
(optimizer updates, BatchNorm statistics, metrics) are stateless. Every
per-loss optimizer's variables are in `model.optimizer.variables`
(`MultiWayOptimizer.variables`), hence in the carried state.

`JaxStep` is the forward record and reverse pass of
`reverse_pass.ReversePassStep` (shared with torch), each node's
vector-Jacobian product taken by `jax.vjp` of the node's stateless call at
its stored inputs and at the parameters' *current* values, i.e. after the
updates of the earlier losses of the step (paper Eq. 10). Nothing uses the
forward pass's residuals: a node whose parameters have not moved is
linearized at the same point as in the forward pass, one whose parameters
have moved at the new one. XLA drops the re-call's unused forward work (a
convolution's output, for one) and merges what equals the forward pass's.
"""

import sys

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_mwbp import _compat
from keras_mwbp import resume
from keras_mwbp.backend import reverse_pass
from keras_mwbp.backend.numerics import all_finite  # noqa: F401
from keras_mwbp.backend.program_order import after  # noqa: F401
from keras_mwbp.backend.program_order import control_dependencies  # noqa: F401
from keras_mwbp.backend.program_order import token  # noqa: F401
from keras_mwbp.backend.numerics import zero_nans  # noqa: F401

# Key of the nan_policy="raise" report in the step's logs (removed by the
# wrapped train function before Keras sees the logs).
FAILURE_KEY = "_keras_mwbp_nonfinite"


def _is_float(value):
    return jnp.issubdtype(jnp.result_type(value), jnp.inexact)


class JaxStep(reverse_pass.ReversePassStep):
    """`reverse_pass.ReversePassStep` with every VJP by `jax.vjp`."""

    def _forward_node(self, index, edges, training):
        params = [v.value for v in self.graph.node_variables(index)]
        return self._call(index, edges, params, training)

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
        return self._call_node(index, values, mapping, training)

    # ------------------------------------------------------------ gradients
    def _loss_vjp(self, head, coefficient):
        value, vjp_fn = jax.vjp(self.loss_fns[head], self.loss_inputs[head])
        seed = jnp.broadcast_to(
            jnp.asarray(coefficient, value.dtype), value.shape
        )
        (grad,) = vjp_fn(seed)
        return grad

    def _recall_vjp(self, index, input_ids, variables, output_cts):
        edges = self.edges[index]

        def call(inputs, params):
            values = dict(edges)
            values.update(zip(input_ids, inputs))
            return self._call(index, values, params, training=True)[0]

        outputs, vjp_fn = jax.vjp(
            call, [edges[i] for i in input_ids], [v.value for v in variables]
        )
        return vjp_fn(
            [_cotangent(out, ct) for out, ct in zip(outputs, output_cts)]
        )

    def _activation_vjp(self, activation, pre_activation, cotangent):
        _, vjp_fn = jax.vjp(activation, pre_activation)
        (grad,) = vjp_fn(cotangent)
        return grad

    def _zeros_like_variable(self, variable):
        return jnp.zeros(variable.shape, variable.dtype)

    _is_float = staticmethod(_is_float)


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


def skip_resumed(model, state, iterator):
    """The train function's `(logs, state)` for a batch a resumed backup
    already trained (`keras_mwbp.train_function`): drawn, not trained on;
    after the last one, the state carries the metrics' restored totals."""
    restoring = model._resume_metric_values is not None
    logs = resume.skip_batches(model, iterator)
    if restoring and model._resume_metric_values is None:
        # The metrics' running totals were just set on the variables.
        state = tuple(state[:-1]) + ([v.value for v in model.metrics_variables],)
    return logs, state


def failure_of(error):
    """None: a jit-compiled step reports a failed check in its result."""
    del error
    return None


def failure_in(model, result):
    """`(step, head)` if the step's report (`FAILURE_KEY`, taken out of the
    logs) says a `nan_policy="raise"` check failed, else None; on a failure
    the returned state, already put back as before the step, is written to
    the variables first."""
    logs, state = result
    report = logs.pop(FAILURE_KEY, None)
    if report is None:
        return None
    ok, step, head = (int(v) for v in np.asarray(report))
    if ok:
        return None
    _compat.jax_state_sync(model, state)
    return step, head


# ---------------------------------------------------- updates and checks
def snapshot(variables):
    """(variable, value) pairs: each variable's value now."""
    return [(v, v.value) for v in variables]






def first_failure(flags):
    """`(ok, head)`: whether every flag holds, and the head of the first that
    does not (`nan_policy.JOINT_HEAD`: the joint objective's gradient). Under
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


def _cotangent(output, cotangent):
    """The cotangent fed to a node's VJP for one of its outputs."""
    if not _is_float(output):
        return np.zeros(jnp.shape(output), dtype=jax.dtypes.float0)
    if cotangent is None:
        return jnp.zeros_like(output)
    return jnp.asarray(cotangent, jnp.result_type(output))

