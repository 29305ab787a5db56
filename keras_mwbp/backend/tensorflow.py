"""The TensorFlow part of the training step: forward, gradients, re-linearize.

`TensorFlowStep` runs the shared forward pass node by node under a persistent
`tf.GradientTape`, keeping what the multi-way backward needs: each node's
inputs (a `tf.identity` per consuming node where a tensor has several
consumers, so that the gradient reaching it through one consumer can be read
alone), its outputs and its non-trainable state before the call (BatchNorm
statistics, dropout seeds).

Gradients of loss `i` at the parameters already updated by earlier losses of
the step (paper Eq. 10) are taken in two parts. The nodes of the *region*
(nodes whose variables were updated, and every node below them) are
re-linearized one by one, in reverse order: each is called again on its
stored inputs with the current variables and its recorded state, under its own
small tape, and its vector-Jacobian product is taken there. Everything above
the region uses the forward tape, whose recorded values are still the current
ones for those layers. The re-call's forward result is not used (only its
gradient is), so TensorFlow prunes the forward work of convolutions and
dense layers from the graph; float32 NHWC BatchNorm layers use TensorFlow's
fused gradient kernel instead of a re-call.

A layer with a fused activation (`fused_activation`) is run in two parts:
the record keeps its pre-activation, and a re-linearization takes the
activation's derivative there (a feature of the shared forward pass, spec
Eq. 4), then re-calls the layer without its activation.
"""

import re

import keras
import tensorflow as tf
from keras_mwbp import resume
from keras_mwbp._compat import operation_fn
from keras_mwbp._compat import standardize_inputs
from keras_mwbp.backend.numerics import all_finite  # noqa: F401
from keras_mwbp.backend.numerics import zero_nans  # noqa: F401
from keras_mwbp.backend.fused_activation import fused_activation
from keras_mwbp.backend.fused_activation import pre_activation_calls


class TensorFlowStep:
    """One training step's forward record and gradient computations.

    Args:
        graph: The model's `HeadGraph`.
    """

    def __init__(self, graph, initial_state=None):
        self.graph = graph
        self.tape = None
        self.edges = {}
        self.calls = {}
        self.states = {}
        # The pre-activation of each node with a fused activation.
        self.pre_activations = {}
        self.initial_state = dict(initial_state or {})
        self.new_state = dict(self.initial_state)
        self.loss_inputs = []

    def fresh(self):
        """A new step for another forward pass from this step's initial
        state (same dropout masks), for naive MW-BP; its state is not
        committed."""
        return TensorFlowStep(self.graph, self.initial_state)

    def forward(self, model, x, training=True, nodes=None):
        """Shared forward pass; call inside `with step.recording(...):`.

        Non-trainable state (BatchNorm statistics, dropout seeds) is read once
        into tensors and threaded through the nodes with a `StatelessScope`,
        so that each node's state before its call is known exactly and a
        re-call replays it (same dropout mask). `commit_state()` writes the
        new state once.

        Args:
            model: The `MultiWayModel`.
            x: Input batch.
            training: Training mode of the layers.
            nodes: Optional set of node indices to run (e.g. one loss's
                ancestors); outputs not computed are `None`.

        Returns:
            The list of model outputs as seen by the losses.
        """
        # Keras's own input handling: dict inputs by name, dtypes, ranks.
        tensors = {
            id(ref): value
            for ref, value in zip(model.inputs, standardize_inputs(model, x))
        }
        for index, node in enumerate(self.graph.nodes):
            if nodes is not None and index not in nodes:
                continue
            edges = {id(t): self._edge(tensors[id(t)], id(t))
                     for t in node.input_tensors}
            args, kwargs = node.arguments.fill_in(edges)
            self.edges[index] = edges
            self.calls[index] = (args, kwargs)
            self.states[index] = [
                (v, self._state_value(v))
                for v in getattr(node.operation, "non_trainable_variables", [])
            ]
            with keras.StatelessScope(
                state_mapping=self.states[index]
            ) as scope, pre_activation_calls(node.operation):
                outputs = operation_fn(node.operation, training=training)(
                    *args, **kwargs
                )
            activation = fused_activation(node.operation)
            if activation is not None:
                self.pre_activations[index] = outputs
                outputs = activation(outputs)
            for variable, _ in self.states[index]:
                new_value = scope.get_current_value(variable)
                if new_value is not None:
                    self.new_state[id(variable)] = (variable, new_value)
            for ref, value in zip(node.outputs, tf.nest.flatten(outputs)):
                tensors[id(ref)] = value
        self.loss_inputs = [
            self._edge(tensors[id(o)], id(o)) if id(o) in tensors else None
            for o in model.outputs
        ]
        return self.loss_inputs

    def _state_value(self, variable):
        if id(variable) not in self.new_state:
            value = (variable, tf.identity(variable.value))
            self.initial_state[id(variable)] = self.new_state[id(variable)] = value
        return self.new_state[id(variable)][1]

    def commit_state(self, after=()):
        """Writes the forward pass's new non-trainable state, once (after
        every tensor of `after` exists)."""
        for variable, value in self.new_state.values():
            variable.assign(after_all(value, after))

    def _edge(self, tensor, ref_id):
        """The tensor as one consumer sees it: its own identity if shared."""
        if self.graph.consumers[ref_id] > 1:
            return tf.identity(tensor)
        return tensor

    def recording(self, persistent):
        """A tape that records the shared forward and the losses.

        Args:
            persistent: Whether gradients will be taken more than once.
        """
        self.tape = tf.GradientTape(persistent=persistent)
        return self.tape

    def losses(self, loss_fns, y, y_pred, sample_weight):
        """Each head's loss, recorded by the tape (call inside
        `recording`)."""
        return [
            loss_fn(y, out, sample_weight=sample_weight)
            for loss_fn, out in zip(loss_fns, y_pred)
        ]

    def loss(self, index, loss_fn, y, output, sample_weight):
        """Head `index`'s loss alone (naive MW-BP's new forward pass)."""
        return loss_fn(y, output, sample_weight=sample_weight)

    def gradients(self, objective, variables):
        """Gradients of an `algorithm.Objective` from the forward tape (exact
        when nothing was updated)."""
        grads = self.tape.gradient(objective.value, variables)
        return _zeros_for_none(grads, variables)

    def multiway_gradients(self, index, objective, updated_ids):
        """Gradients of `objective` (loss `index`) at the current variables.

        Args:
            index: Output index of the loss.
            objective: The `algorithm.Objective` of loss `index` (its
                weighted loss, recorded by the forward tape).
            updated_ids: `id()`s of the variables already updated this step.

        Returns:
            Gradients for `graph.loss_variables[index]`, in that order.
        """
        graph = self.graph
        region = graph.region(index, updated_ids)
        above = graph.ancestors[index] - region
        # Cotangents entering the region from above, through each edge.
        boundary = [
            (ref_id, edge)
            for node in above
            for ref_id, edge in self.edges[node].items()
            if graph.producer.get(ref_id) in region
        ]
        output_ref = graph.output_ids[index]
        if graph.producer.get(output_ref) in region:
            boundary.append((output_ref, self.loss_inputs[index]))
        above_vars = _unique(v for n in above for v in graph.node_variables(n))
        grads = self.tape.gradient(
            objective.value, [edge for _, edge in boundary] + above_vars
        )
        cotangents = {}
        for (ref_id, _), grad in zip(boundary, grads):
            _accumulate(cotangents, ref_id, grad)
        var_grads = {}
        for variable, grad in zip(above_vars, grads[len(boundary):]):
            _accumulate(var_grads, id(variable), grad)
        for node in sorted(region, reverse=True):
            self._node_vjp(node, cotangents, var_grads)
        variables = graph.loss_variables[index]
        return _zeros_for_none(
            [var_grads.get(id(v)) for v in variables], variables
        )

    def _node_vjp(self, index, cotangents, var_grads):
        """Re-linearizes node `index` at its stored inputs, current weights."""
        node = self.graph.nodes[index]
        output_cts = [cotangents.get(id(o)) for o in node.outputs]
        if all(ct is None for ct in output_cts):
            return
        activation = fused_activation(node.operation)
        if activation is not None:
            pre_activation = self.pre_activations[index]
            with tf.GradientTape() as tape:
                tape.watch(pre_activation)
                output = activation(pre_activation)
            output_cts = [tape.gradient(
                output, pre_activation, output_gradients=output_cts[0]
            )]
        edges = self.edges[index]
        input_ids = list(edges)
        variables = self.graph.node_variables(index)
        args, kwargs = self.calls[index]
        if _fused_batch_norm_applies(node, args, kwargs):
            grads = _fused_batch_norm_vjp(
                node.operation, args[0], output_cts[0], variables
            )
            self._add_vjp(input_ids, variables, grads, cotangents, var_grads)
            return
        with tf.GradientTape() as tape:
            tape.watch([edges[i] for i in input_ids])
            with keras.StatelessScope(
                state_mapping=self.states[index]
            ), pre_activation_calls(node.operation):
                outputs = operation_fn(node.operation, training=True)(
                    *args, **kwargs
                )
        pairs = [
            (out, ct)
            for out, ct in zip(tf.nest.flatten(outputs), output_cts)
            if ct is not None
        ]
        grads = tape.gradient(
            [out for out, _ in pairs],
            [edges[i] for i in input_ids] + variables,
            output_gradients=[ct for _, ct in pairs],
        )
        self._add_vjp(input_ids, variables, grads, cotangents, var_grads)

    def _add_vjp(self, input_ids, variables, grads, cotangents, var_grads):
        for ref_id, grad in zip(input_ids, grads):
            if ref_id in self.graph.producer:
                _accumulate(cotangents, ref_id, grad)
        for variable, grad in zip(variables, grads[len(input_ids):]):
            _accumulate(var_grads, id(variable), grad)


Step = TensorFlowStep


def train_step(model, data):
    """Keras's TensorFlow trainer calls `model.train_step(data)`, on the
    variables themselves (traced by `tf.function`)."""
    from keras_mwbp import algorithm

    logs = algorithm.TrainingStep(model, _this_module()).run(data)
    if _multi_worker():
        # Keras reduces each log across the workers with
        # `strategy.reduce("MEAN", log, axis=0)`, which needs an axis: a
        # scalar becomes shape (1,), and the mean of the workers' equal
        # values a scalar again.
        logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
    return logs


def _multi_worker():
    """Whether the step runs under a `MultiWorkerMirroredStrategy` of more
    than one worker (the test Keras's trainer makes before it reduces the
    logs with an axis)."""
    strategy = tf.distribute.get_strategy()
    in_multi_worker_mode = getattr(
        strategy.extended, "_in_multi_worker_mode", lambda: False
    )
    return isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ) and bool(in_multi_worker_mode())


def _this_module():
    import sys

    return sys.modules[__name__]


def skip_resumed(model, iterator):
    """The train function's logs for a batch a resumed backup already
    trained (`keras_mwbp.train_function`): drawn, not trained on."""
    return resume.skip_batches(model, iterator)


def failure_in(model, result):
    """None: a failed check raises (`failure_of`)."""
    del model, result
    return None


def _fused_batch_norm_applies(node, args, kwargs):
    """Whether node is a plain Keras BatchNormalization of NHWC float32."""
    layer = node.operation
    if type(layer) is not keras.layers.BatchNormalization:
        return False
    x = args[0] if args else None
    return (
        len(args) == 1
        and kwargs.get("mask") is None
        and x is not None
        and x.shape.rank == 4
        and x.dtype == tf.float32
        and layer.axis in (-1, 3)
        and not getattr(layer, "renorm", False)  # (not in Keras <= 3.12)
        and not getattr(layer, "synchronized", False)
        and layer.trainable
        and layer.dtype_policy.compute_dtype == "float32"
    )


def _fused_batch_norm_vjp(layer, x, cotangent, variables):
    """Vector-Jacobian product of training-mode batch normalization.

    The same Jacobian as the layer's own (batch statistics of the stored input
    `x`, current scale), from TensorFlow's fused kernels: one pass instead of
    re-running the layer's unfused normalization and differentiating it.

    Returns:
        Gradients for `[x] + variables` (the layer's gamma and beta).
    """
    channels = x.shape[-1]
    gamma = layer.gamma if layer.scale else tf.ones([channels], x.dtype)
    beta = layer.beta if layer.center else tf.zeros([channels], x.dtype)
    empty = tf.constant([], x.dtype)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.raw_ops.FusedBatchNormV3(
            x=x,
            scale=tf.convert_to_tensor(gamma),
            offset=tf.convert_to_tensor(beta),
            mean=empty,
            variance=empty,
            epsilon=layer.epsilon,
            data_format="NHWC",
            is_training=True,
        )[0]
    return tape.gradient(y, [x] + variables, output_gradients=cotangent)


def after(tensors, dependencies):
    """`tensors`, computed only once every tensor of `dependencies` exists.

    An optimizer update writes variables that the gradients of the same loss
    read (e.g. a BatchNorm scale read by the gradient of the convolution
    below it). TensorFlow's graph optimizer may drop the read-before-write
    ordering edge when no data path links the two; passing the update only
    gradients that wait for all of the loss's gradients restores it.
    """
    with tf.control_dependencies(list(dependencies)):
        return [tf.identity(t) for t in tensors]


def after_all(tensor, dependencies):
    """`tensor`, computed once every tensor of `dependencies` exists."""
    if not dependencies:
        return tensor
    return after([tensor], dependencies)[0]


# ------------------------------------------------------------ nan_policy
NAN_ASSERT_TAG = "keras_mwbp_nonfinite_step"


def snapshot(variables):
    """(variable, value) pairs: each variable's value now."""
    return [(v, tf.identity(v.value)) for v in variables]


def token(tensors):
    """A scalar that exists once every tensor of `tensors` does (one
    dependency standing for many)."""
    with tf.control_dependencies(list(tensors)):
        return tf.constant(True)






def control_dependencies(dependencies):
    """Context: ops created inside run after `dependencies` (None dropped)."""
    return tf.control_dependencies([d for d in dependencies if d is not None])


def first_failure(flags):
    """Whether every flag holds, on every replica, and the head of the first
    flag that does not (in the order the flags were recorded).

    Args:
        flags: List of `(head, boolean scalar tensor)`.

    Returns:
        `(ok, head)`: a boolean scalar and an int32 scalar (-1 when the first
        failure is the joint objective's gradient).
    """
    bad = tf.cast(tf.logical_not(tf.stack([f for _, f in flags])), tf.float32)
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        bad = context.all_reduce("sum", bad)
    heads = tf.constant([h for h, _ in flags], tf.int32)
    ok = tf.equal(tf.reduce_sum(bad), 0.0)
    return ok, tf.gather(heads, tf.argmax(bad))


def restore_unless(ok, saved):
    """Puts every variable of `saved` back to its saved value unless `ok`.

    Runs once every variable's current value has been read (after the
    step's updates), so the restore follows every write of the step.

    Returns:
        `ok`, once the restore (if any) is done.
    """
    ok = after_all(ok, [v.value for v, _ in saved])

    if num_replicas() > 1:
        # No control flow around writes in a replica context (they would
        # need a cross-replica merge inside the cond): write every variable,
        # its current value or the saved one.
        for variable, value in saved:
            variable.assign(tf.where(ok, variable.value, value))
        return after_all(ok, [v.value for v, _ in saved])

    def restore():
        for variable, value in saved:
            variable.assign(value)
        return tf.constant(False)

    return tf.cond(ok, lambda: tf.constant(True), restore)


def assert_finite_step(ok, step, head):
    """Fails the step (after the restore) naming the step and the head."""
    check = tf.debugging.Assert(ok, [NAN_ASSERT_TAG, step, head])
    with tf.control_dependencies([check]):
        return tf.identity(ok)


def failure_of(error):
    """`(step, head)` if `error` is a failed `assert_finite_step` (a failed
    `nan_policy="raise"` check), else None."""
    if not isinstance(error, tf.errors.InvalidArgumentError):
        return None
    match = re.search(
        NAN_ASSERT_TAG + r"[^\d-]*(-?\d+)[^\d-]+(-?\d+)", str(error)
    )
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def num_replicas():
    """Replicas of the current `tf.distribute` strategy (1 without one)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def random_state():
    """No global random state to back up: Keras's random layers on this
    backend draw from seed-generator variables, saved with the model."""
    return []


def writes_files(model):
    """Whether this process writes `model`'s run files (backups): `False`
    only on a worker other than the chief of the multi-worker
    `tf.distribute` strategy (`MultiWorkerMirroredStrategy`) the model was
    built under, whose workers all run the same callbacks on a shared
    folder. The chief is the task of type "chief", or worker 0 in a cluster
    without one. (Callbacks run outside the strategy's scope, so the
    strategy is the model's, not the current one.)"""
    resolver = getattr(model.distribute_strategy, "cluster_resolver", None)
    cluster = {} if resolver is None else resolver.cluster_spec().as_dict()
    if not cluster or resolver.task_type in (None, "chief"):
        return True
    return (resolver.task_type, resolver.task_id) == ("worker", 0) and (
        "chief" not in cluster
    )


def set_random_state(arrays):
    """Nothing to restore (see `random_state`); a torch backup's state is
    ignored."""
    del arrays


def regularization_gradients(variables):
    """Gradients of the variables' own regularizers at their current values.

    Under a `tf.distribute` strategy the penalty is divided by the number of
    replicas, as Keras losses are, since the optimizer sums the replicas'
    gradients.

    Returns:
        A list of gradients (or `None`) in `variables` order.
    """
    regularized = [v for v in variables if getattr(v, "regularizer", None)]
    if not regularized:
        return [None] * len(variables)
    with tf.GradientTape() as tape:
        penalty = tf.add_n([v.regularizer(v) for v in regularized])
        penalty = penalty / num_replicas()
    grads = dict(
        zip(map(id, regularized), tape.gradient(penalty, regularized))
    )
    return [grads.get(id(v)) for v in variables]


def _accumulate(store, key, value):
    if value is None:
        return
    if isinstance(value, tf.IndexedSlices):
        value = tf.convert_to_tensor(value)
    store[key] = value if key not in store else store[key] + value


def _zeros_for_none(grads, variables):
    return [
        tf.zeros(v.shape, v.dtype) if g is None else tf.convert_to_tensor(g)
        for g, v in zip(grads, variables)
    ]


def _unique(variables):
    seen, result = set(), []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            result.append(v)
    return result
