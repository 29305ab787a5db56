"""The training step of every method, for any backend (paper Algorithm 1).

One step on a batch, as the paper's Algorithm 1 and the spec describe it:

1. **Shared forward** (`TrainingStep.run`): one training-mode forward pass
   records every feature and every head's loss; the new BatchNorm
   statistics and seed states are committed once.
2. **Backward and update**, by method:

   - `standard`, `joint`: one gradient of the objective (the final loss, or
     `sum_i gamma_i loss_i`) at the forward pass's parameters, one update.
   - `relay`: as `joint`, loss i's gradient restricted to segments
     `i - relay_span .. i` (`summed_gradients`). Under
     `weighting="reference_code"`, `joint` too sums per-loss gradients, each
     scaled per variable as the authors' code scales it.
   - `mwbp` / `reverse_mwbp` (`multiway_backward`): for each loss in order
     (`loss_order`), its gradient at the parameters the earlier losses of
     this step already updated, with the shared forward's features (the
     backend re-linearizes the updated nodes at their stored inputs: Eq.
     10), then that loss's own optimizer applies it.
   - `naive_mwbp` / `naive_reverse_mwbp`: the same order, each loss after the
     first from a new forward pass at the current parameters
     (`fresh_gradients`).

The backend (`keras_mwbp.backend.get()`) records the forward pass and takes
the vector-Jacobian products; everything here is written with `keras.ops`
and the backend's primitives only. Under JAX the step runs inside a
`keras.StatelessScope` that maps every variable to the carried state, so the
variable reads and writes below are stateless there.
"""

import collections

import keras

from keras_mwbp import _compat
from keras_mwbp import backend as backends
from keras_mwbp import constants
from keras_mwbp import labels
from keras_mwbp import nan_policy

# Methods with one optimizer and one update per loss.
MULTIWAY_METHODS = constants.MULTIWAY_METHODS

Objective = collections.namedtuple("Objective", ["value", "coefficients"])
Objective.__doc__ = """A linear combination of the head losses.

`value` is the tensor recorded in the forward pass (TensorFlow takes its
gradient from the tape); `coefficients` holds `(head index, scalar)` pairs
with `value = sum(c * loss_head)` (the backends that take gradients by
vector-Jacobian products seed each head's loss with its coefficient).
"""


def scaled(objective, scale):
    """`objective` times a loss scale (value and coefficients)."""
    return Objective(
        objective.value * scale,
        tuple((head, c * scale) for head, c in objective.coefficients),
    )


def loss_order(method, num_heads):
    """The order in which a per-loss method back-propagates the losses:
    shallow to deep, or deep to shallow for the `reverse` methods."""
    order = range(num_heads)
    if method in ("reverse_mwbp", "naive_reverse_mwbp"):
        order = reversed(order)
    return list(order)


class TrainingStep:
    """One training step of a `MultiWayModel` on one batch.

    Args:
        model: The compiled `MultiWayModel`.
        backend: The primitives module (default: the current backend's).
    """

    def __init__(self, model, backend=None):
        self.model = model
        self.backend = backend or backends.get()
        self.finite_flags = []
        self.scales = None  # Each loss optimizer's loss scale, if any.
        self.failure = None  # (ok, step, head) under nan_policy="raise".

    # ----------------------------------------------------------------- step
    def run(self, data):
        """The whole step; returns the logs."""
        model, backend = self.model, self.backend
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        labels.check_labels(model, y)
        # nan_policy "raise"/"skip_step": the state before the step, to put
        # back if a loss or gradient is not finite.
        snapshot, taken = [], []
        if model.nan_policy != "zero":
            snapshot = backend.snapshot(step_state(model))
            taken = [backend.token([value for _, value in snapshot])]
        step = backend.Step(model._head_graph)
        # 1. The shared forward: every feature and every loss, once.
        per_loss = per_loss_gradients(model)
        with step.recording(persistent=per_loss):
            y_pred = step.forward(model, x, training=True)
            head_losses = step.losses(
                model._head_losses, y, y_pred, sample_weight
            )
            gammas = gamma_tensors(model, head_losses[0].dtype)
            weighted = [g * loss for g, loss in zip(gammas, head_losses)]
            objective = Objective(
                objective_value(model, head_losses, weighted),
                objective_coefficients(model, gammas),
            )
            penalty = regularization_penalty(model.trainable_variables)
            # Dynamic loss scaling (mixed_float16): each backward pass
            # starts from its loss times its optimizer's scale; the
            # optimizer divides the gradients by it (`apply`).
            self.scales = model.optimizer.loss_scales()
            grad_objective = objective
            if per_loss:
                if model.weighting == "paper":
                    seeds = [Objective(w, ((i, g),)) for i, (w, g)
                             in enumerate(zip(weighted, gammas))]
                else:
                    seeds = [Objective(loss, ((i, 1.0),))
                             for i, loss in enumerate(head_losses)]
                if self.scales:
                    # One scale per loss's optimizer, or the one optimizer's.
                    scales = self.scales * (len(seeds) // len(self.scales))
                    seeds = [scaled(seed, scale)
                             for seed, scale in zip(seeds, scales)]
            elif self.scales:
                grad_objective = scaled(objective, self.scales[0])
        # BatchNorm statistics move once per step.
        step.commit_state(after=taken)
        total = objective.value + penalty  # Logged; before any update.
        if snapshot:
            for i, loss in enumerate(head_losses):
                self.finite_flags.append((i, backend.all_finite([loss])))
            # The new BatchNorm statistics (finite losses can still give an
            # infinite moving variance).
            state = [v for _, v in step.new_state.values()
                     if keras.backend.is_float_dtype(v.dtype)]
            if state:
                self.finite_flags.append(
                    (nan_policy.STATE_HEAD, backend.all_finite(state))
                )
        after = [total] + taken
        # 2. The backward passes and updates of the method.
        if model.method in MULTIWAY_METHODS:
            self.multiway_backward(step, seeds, gammas, data, after)
        else:
            variables = model._update_groups[0]
            if per_loss:
                grads = self.summed_gradients(step, seeds, gammas)
            else:
                grads = step.gradients(grad_objective, variables)
            self.apply(0, grads, variables, after=after,
                       head=nan_policy.JOINT_HEAD)
        model.optimizer.finish_step()
        update_metrics(model, x, y, y_pred, sample_weight, head_losses, total)
        applied = self.undo_unless_finite(snapshot) if snapshot else None
        with backend.control_dependencies([applied]):
            if model._skipped_steps is not None:
                # Counted after the undo (which restores the metrics too).
                model._skipped_steps.update_state(
                    1.0 - keras.ops.cast(applied, "float32")
                )
            logs = dict(model.get_metrics_result())
        # Tensors, not the variables: eager Keras packs logs in an Optional.
        logs["nu"] = keras.ops.convert_to_tensor(model._nu)
        gammas = keras.ops.convert_to_tensor(model._gammas)
        for i in range(model.num_heads):
            logs[f"gamma_{i}"] = gammas[i]
        return logs

    # ------------------------------------------------------------- backward
    def multiway_backward(self, step, seeds, gammas, data, after):
        """Paper Algorithm 1: one backward pass and update per loss.

        `seeds[i]` is the objective whose gradient loss i's optimizer gets
        (`gamma_i * loss_i`, or `loss_i` scaled per variable afterwards for
        `weighting="reference_code"`). Each loss's gradient is taken at the
        parameters the earlier losses of this step already updated, with the
        features of the shared forward pass (re-linearized, Eq. 10); the
        `naive_*` methods instead run a new forward pass with the current
        parameters before every loss after the first.
        """
        model = self.model
        graph = model._head_graph
        updated = set()
        for i in loss_order(model.method, model.num_heads):
            variables = graph.loss_variables[i]
            if not model.method.startswith("naive_"):
                grads = step.multiway_gradients(i, seeds[i], updated)
            elif not updated:
                grads = step.gradients(seeds[i], variables)
            else:
                grads = self.fresh_gradients(step, i, data, variables, gammas)
            decay = None
            if model.weighting == "reference_code":
                factors, decay = reference_code_scales(
                    model, i, variables, gammas
                )
                grads = [g * factor for g, factor in zip(grads, factors)]
            self.apply(i, grads, variables, after=after, head=i, decay=decay)
            updated.update(id(v) for v in variables)

    def fresh_gradients(self, step, index, data, variables, gammas):
        """Naive MW-BP: loss `index` from a new forward pass (current
        parameters, the step's recorded state, no state committed)."""
        model = self.model
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        fresh = step.fresh()
        with fresh.recording(persistent=False):
            outputs = fresh.forward(
                model, x, training=True,
                nodes=model._head_graph.ancestors[index],
            )
            loss = fresh.loss(
                index, model._head_losses[index], y, outputs[index],
                sample_weight,
            )
            coefficient = 1.0
            if model.weighting == "paper":
                loss = gammas[index] * loss
                coefficient = gammas[index]
            if self.scales:
                loss = loss * self.scales[index]
                coefficient = coefficient * self.scales[index]
        return fresh.gradients(
            Objective(loss, ((index, coefficient),)), variables
        )

    def summed_gradients(self, step, seeds, gammas):
        """Relay BP, and Joint BP under `weighting="reference_code"`: the
        sum over the losses of the gradient of `seeds[i]` (loss i, weighted
        as `multiway_backward` weights it), for relay restricted to
        segments i - span .. i, all at the forward pass's parameters."""
        model = self.model
        graph = model._head_graph
        totals = {}
        for i, seed in enumerate(seeds):
            variables = graph.loss_variables[i]
            if model.method == "relay":
                reach = {
                    id(v)
                    for s in range(max(0, i - model.relay_span), i + 1)
                    for v in graph.segments[s]
                }
                variables = [v for v in variables if id(v) in reach]
            grads = step.gradients(seed, variables)
            if model.weighting == "reference_code":
                factors, _ = reference_code_scales(model, i, variables, gammas)
                grads = [g * factor for g, factor in zip(grads, factors)]
            for v, g in zip(variables, grads):
                totals[id(v)] = g + totals[id(v)] if id(v) in totals else g
        return [
            totals.get(id(v), keras.ops.zeros(v.shape, v.dtype))
            for v in model._update_groups[0]
        ]

    # --------------------------------------------------------------- update
    def apply(self, index, grads, variables, after=(),
              head=nan_policy.JOINT_HEAD, decay=None):
        """Adds the variables' regularizer gradients and the coupled weight
        decay, applies optimizer i once every gradient of the loss (and every
        tensor of `after`) exists.

        Under nan_policy "zero" NaN gradient entries become 0; under the other
        policies the gradients' finiteness is recorded for head `head` (`nan_policy.JOINT_HEAD`:
        the joint objective). `decay` holds a factor per variable of the
        weight decay term (`None`: 1 for all)."""
        backend = self.backend
        if self.model.nan_policy == "zero":
            grads = backend.zero_nans(grads)
        elif not self.scales:
            # (With loss scaling, loss i's LossScaleOptimizer skips an update
            # whose scaled gradients overflow, and halves its scale.)
            self.finite_flags.append((head, backend.all_finite(grads)))
        reg_grads = backend.regularization_gradients(variables)
        reg_grads = add_weight_decay(
            reg_grads, variables, self.model.weight_decay, decay
        )
        if self.scales:
            reg_grads = [r if r is None else r * self.scales[index]
                         for r in reg_grads]
        grads = [g if r is None else g + r for g, r in zip(grads, reg_grads)]
        grads = backend.after(grads, list(grads) + list(after))
        self.model.optimizer.apply_loss(index, grads, variables)

    def undo_unless_finite(self, snapshot):
        """nan_policy "raise"/"skip_step": if a loss or gradient of this step
        is not finite, puts every variable back as it was before the step;
        under "raise" then stops with the step and head named.

        Returns:
            A boolean tensor: whether the step was applied.
        """
        backend = self.backend
        counter = self.model.optimizer.iterations
        step_number = next(value for v, value in snapshot if v is counter)
        ok, head = backend.first_failure(self.finite_flags)
        done = backend.restore_unless(ok, snapshot)
        if self.model.nan_policy == "raise":
            self.failure = (done, step_number, head)
            done = backend.assert_finite_step(done, step_number, head)
        return done


# ------------------------------------------------------------------ pieces
def per_loss_gradients(model):
    """Whether the method takes a gradient per loss: the per-loss methods,
    `relay`, and `joint` under `weighting="reference_code"` (whose factors
    differ per loss and variable)."""
    return (
        model.method in MULTIWAY_METHODS
        or model.method == "relay"
        or (model.method == "joint" and model.weighting == "reference_code")
    )


def step_state(model):
    """Every variable a training step may change: the model's (weights,
    BatchNorm statistics, dropout seeds, nu, gammas), the optimizer's (all
    per-loss states, step counters) and the metrics'."""
    seen, state = set(), []
    variables = (
        list(model.variables)
        + list(model.optimizer.variables)
        + list(model.metrics_variables)
    )
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            state.append(v)
    return state


def head_loss_values(model, y, y_pred, sample_weight):
    """Each head's unweighted loss."""
    return [
        loss_fn(y, out, sample_weight=sample_weight)
        for loss_fn, out in zip(model._head_losses, y_pred)
    ]


def gamma_tensors(model, dtype):
    """The loss weights gamma_i, read from their variable, as scalars."""
    gammas = keras.ops.cast(model._gammas.value, dtype)
    return [gammas[i] for i in range(model.num_heads)]


def objective_value(model, head_losses, weighted):
    """The method's training objective (what `loss` logs, less
    regularization), from the losses and the gamma-weighted losses."""
    if model.method == "standard":
        return head_losses[-1]
    return sum(weighted)


def objective_coefficients(model, gammas):
    """The objective as `(head, coefficient)` pairs of the head losses."""
    if model.method == "standard":
        return ((model.num_heads - 1, 1.0),)
    return tuple(enumerate(gammas))


def reference_code_scales(model, index, variables, gammas):
    """The authors' code's factors of loss `index`, per variable: of its
    gradient, 1 on an auxiliary head's own variables, gamma_i divided by
    the sum of gamma_j for j = i .. K-1 on the trunk, 1 for the final loss;
    and of its weight decay, 1 / that sum on the trunk (the authors divide
    the trunk's learning rate by it), 1 elsewhere.

    Returns:
        `(gradient factors, decay factors)`, one list per kind.
    """
    last = model.num_heads - 1
    if index == last:
        return [1.0] * len(variables), [1.0] * len(variables)
    trunk = {id(v) for v in model._head_graph.loss_variables[last]}
    total = sum(gammas[index:last])
    gradient, decay = gammas[index] / total, 1.0 / total
    on_trunk = [id(v) in trunk for v in variables]
    return (
        [gradient if t else 1.0 for t in on_trunk],
        [decay if t else 1.0 for t in on_trunk],
    )


def add_weight_decay(reg_grads, variables, weight_decay, factors=None):
    """`reg_grads` (a gradient or `None` per variable) plus the coupled
    weight decay `weight_decay * factor * w` of every variable `w`, divided
    by the number of replicas as the regularizers' gradients are (the
    optimizer sums the replicas' gradients)."""
    if not weight_decay:
        return reg_grads
    if factors is None:
        factors = [1.0] * len(variables)
    rate = weight_decay / backends.get().num_replicas()
    total = []
    for r, v, factor in zip(reg_grads, variables, factors):
        value = keras.ops.convert_to_tensor(v.value)
        term = value * keras.ops.cast(factor * rate, value.dtype)
        total.append(term if r is None else r + term)
    return total


def regularization_penalty(variables):
    """The weight regularizers' penalty, scaled per replica like losses."""
    terms = [v.regularizer(v) for v in variables
             if getattr(v, "regularizer", None)]
    return sum(terms) / backends.get().num_replicas() if terms else 0.0


def update_metrics(model, x, y, y_pred, sample_weight, head_losses, total):
    """Updates the loss trackers (objective and each head's loss) and the
    compiled metrics of every head."""
    # Keras losses are divided by the number of replicas of a
    # `tf.distribute` strategy; the logs show the global values.
    replicas = backends.get().num_replicas()
    batch_size = keras.ops.shape(keras.tree.flatten(x)[0])[0]
    _compat.loss_tracker(model).update_state(
        total * replicas, sample_weight=batch_size
    )
    for tracker, value in zip(model._head_loss_trackers, head_losses):
        tracker.update_state(value * replicas, sample_weight=batch_size)
    model.compute_metrics(x, y, y_pred, sample_weight)
