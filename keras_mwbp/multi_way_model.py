"""`MultiWayModel`: a functional Keras model trained with Multi-way BP."""

import keras
from keras.src.losses.losses import LossFunctionWrapper
from keras.src.saving import serialization_lib
from keras.src.utils import tracking

from keras_mwbp import weighting
from keras_mwbp.backend import tensorflow as backend_step
from keras_mwbp.graph import HeadGraph
from keras_mwbp.graph import check_outputs_depend_on_inputs
from keras_mwbp.multi_way_optimizer import MultiWayOptimizer

METHODS = ("standard", "joint", "mwbp")


@keras.saving.register_keras_serializable(package="keras_mwbp")
class MultiWayModel(keras.Model):
    """A functional model with auxiliary heads, trained with Multi-way BP.

    The outputs are the logits of every head, from the shallowest auxiliary
    head to the final one. `fit()` trains them with the chosen method:

    - `"mwbp"` (paper Algorithm 1): one shared forward pass in training mode;
      then, for each loss from the shallowest to the final one, the gradient
      of `gamma_i * loss_i` is taken at the parameters that the earlier
      losses of the same step already updated (the layers they changed are
      re-linearized at their stored inputs; paper Eq. 10), and applied by
      that loss's own optimizer.
    - `"joint"` (Joint BP): one gradient of `sum_i gamma_i * loss_i`, one
      optimizer.
    - `"standard"`: only the final loss; the auxiliary heads are not trained.

    Loss weights follow the paper's Eq. 5: `gamma_K = 1` for the final loss
    and `gamma_i = max(0.01, (L_i / L_{K-1}) ** nu)` for auxiliary head `i`,
    where `L_i` is the depth of the head's tap: the number of weight layers
    (convolutions, dense layers) on the longest path from the input to the
    tap, the head's own layers excluded. The depths are read from the graph
    unless `head_depths` is given; `head_weights` overrides the weights.

    Logs: `loss` is the method's training objective (`sum_i gamma_i loss_i`
    for `"joint"` and `"mwbp"`, the final head's loss for `"standard"`) plus
    weight regularization; `<output name>_loss` is each head's unweighted
    loss, and every compiled metric is reported per head as
    `<output name>_<metric name>`, as Keras names a multi-output model's.

    Regularization: each variable's own regularizer (e.g. `kernel_regularizer`)
    is added, unweighted, to every update that touches the variable (so in
    `"mwbp"` once per loss that reaches it, as the authors' per-loss weight
    decay did). Activity regularizers are not supported.

    Args:
        inputs: The model's input tensor(s), as for a functional model.
        outputs: List of head logits, shallowest first, final last.
        method: One of `"mwbp"`, `"joint"`, `"standard"`.
        nu: Positive decay rate of Eq. 5.
        head_depths: Optional tap depth of each output (positive, strictly
            increasing); read from the graph when `None`.
        head_weights: Optional loss weight of each output, each in (0, 1];
            overrides `nu`.
        **kwargs: Passed to `keras.Model` (e.g. `name`).

    Example:

    ```python
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    aux = keras.layers.Dense(10, name="aux")(
        keras.layers.GlobalAveragePooling2D()(x))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    final = keras.layers.Dense(10, name="final")(
        keras.layers.GlobalAveragePooling2D()(x))
    model = MultiWayModel(inputs, [aux, final], method="mwbp", nu=2.0)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=10)  # one label array for all heads
    deployable = model.exit_model(0)        # a plain keras.Model
    ```
    """

    def __init__(
        self,
        inputs,
        outputs,
        method="mwbp",
        nu=2.0,
        head_depths=None,
        head_weights=None,
        **kwargs,
    ):
        if method not in METHODS:
            raise ValueError(
                f"`method` must be one of {METHODS}. Received: method={method!r}"
            )
        weighting.check_nu(nu)
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        outputs = list(outputs)
        if method == "mwbp" and len(outputs) < 2:
            raise ValueError(
                "`outputs` must hold at least two heads (auxiliary heads and "
                f"the final one) for method='mwbp'. Received: {len(outputs)} "
                "output(s)."
            )
        check_outputs_depend_on_inputs(keras.tree.flatten(inputs), outputs)
        if head_weights is not None:
            head_weights = weighting.check_head_weights(
                head_weights, len(outputs)
            )
        if head_depths is not None:
            head_depths = weighting.check_head_depths(head_depths, len(outputs))
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self._check_no_activity_regularizers()
        self._head_graph = HeadGraph(self)
        _check_head_order(self._head_graph.depths)
        self.method = method
        self.nu = float(nu)
        self._given_head_depths = head_depths
        self._given_head_weights = head_weights

    # ------------------------------------------------------------ properties
    @property
    def head_depths(self):
        """Tap depth of each head, shallowest first; the final entry is the
        depth of the whole network."""
        return self._given_head_depths or self._head_graph.depths

    @property
    def head_weights(self):
        """Loss weight gamma_i of each head (paper Eq. 5), final last."""
        if self._given_head_weights is not None:
            return self._given_head_weights
        return weighting.gammas_from_depths(self.head_depths, self.nu)

    @property
    def num_heads(self):
        return len(self.outputs)

    def exit_model(self, index):
        """The intermediate model ending at head `index`.

        Args:
            index: Head index; `0` is the shallowest, `-1` the final head.

        Returns:
            A plain `keras.Model` from the inputs to head `index`'s logits,
            sharing this model's layers and weights. It can be saved and
            loaded without keras_mwbp.
        """
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(
                f"`index` must be an int. Received: index={index!r}"
            )
        if not -self.num_heads <= index < self.num_heads:
            raise ValueError(
                f"`index` must be in [{-self.num_heads}, {self.num_heads}) "
                f"for a model with {self.num_heads} heads. "
                f"Received: index={index}"
            )
        index %= self.num_heads
        return keras.Model(
            self.inputs,
            self.outputs[index],
            name=f"{self.name}_exit_{self.output_names[index]}",
        )

    # --------------------------------------------------------------- compile
    @tracking.no_automatic_dependency_tracking
    def compile(
        self,
        optimizer="rmsprop",
        loss=None,
        loss_weights=None,
        metrics=None,
        weighted_metrics=None,
        **kwargs,
    ):
        """Configures training; one `loss` and one `metrics` list serve all
        heads.

        Args:
            optimizer: Template optimizer. `"mwbp"` trains with one clone per
                loss, held in a `MultiWayOptimizer` that becomes
                `model.optimizer`; the other methods with one clone.
            loss: One loss for every head, or a list (one per output) or a
                dict keyed by output name.
            loss_weights: Not accepted; use `head_weights` or `nu`.
            metrics: One list of metrics for every head, or a list of lists
                (one per output) or a dict keyed by output name.
            weighted_metrics: As `metrics`, weighted by `sample_weight`.
            **kwargs: Other `keras.Model.compile` arguments. `auto_scale_loss`
                is ignored: the optimizer is never wrapped in a
                `LossScaleOptimizer` (it would hide the per-loss optimizers),
                so mixed-precision training runs without loss scaling.
        """
        if loss_weights is not None:
            raise ValueError(
                "`loss_weights` is not used by MultiWayModel: the loss weights "
                "are `head_weights` (or computed from `nu`). "
                f"Received: loss_weights={loss_weights!r}"
            )
        kwargs.pop("auto_scale_loss", None)
        head_losses = self._per_head_losses(loss)
        head_metrics = self._per_head_metrics(metrics, "metrics")
        head_weighted = self._per_head_metrics(
            weighted_metrics, "weighted_metrics"
        )
        self._head_graph = HeadGraph(self)
        if self.method == "mwbp":
            groups = list(self._head_graph.loss_variables)
        else:
            groups = [self._head_graph.loss_variables[-1]
                      if self.method == "standard"
                      else self.trainable_variables]
        container = MultiWayOptimizer(optimizer, num_losses=len(groups))
        container.set_variable_groups(groups, self.trainable_variables)
        super().compile(
            optimizer=container,
            metrics=head_metrics,
            weighted_metrics=head_weighted,
            # A LossScaleOptimizer would hide the per-loss optimizers.
            auto_scale_loss=False,
            **kwargs,
        )
        self._head_losses = head_losses
        self._update_groups = groups
        self._head_loss_trackers = [
            keras.metrics.Mean(name=f"{name}_loss")
            for name in self.output_names
        ]
        container.build(self.trainable_variables)
        self._compile_config = serialization_lib.SerializableDict(
            optimizer=container.template,
            loss=loss,
            metrics=metrics,
            weighted_metrics=weighted_metrics,
            **kwargs,
        )

    def compile_from_config(self, config):
        config = serialization_lib.deserialize_keras_object(config)
        self.compile(**config)

    @property
    def metrics(self):
        metrics = super().metrics
        trackers = list(getattr(self, "_head_loss_trackers", []))
        if metrics and metrics[0] is self._loss_tracker:
            return metrics[:1] + trackers + metrics[1:]
        return trackers + metrics

    # ------------------------------------------------------------- training
    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        self._check_labels(y)
        graph = self._head_graph
        gammas = self.head_weights
        step = backend_step.TensorFlowStep(graph)
        # 1. Shared forward: every feature and every loss, once.
        with step.recording(persistent=self.method == "mwbp"):
            y_pred = step.forward(self, x, training=True)
            head_losses = self._head_loss_values(y, y_pred, sample_weight)
            weighted = [g * loss for g, loss in zip(gammas, head_losses)]
            objective = self._objective(head_losses)
            penalty = _regularization_penalty(self.trainable_variables)
        step.commit_state()  # BatchNorm statistics move once per step.
        total = objective + penalty  # Logged; computed before any update.
        if self.method == "mwbp":
            # 2. Multi-way backward, shallow to deep: loss i's gradient at the
            # parameters already updated by losses 0..i-1 of this step.
            updated = set()
            for i in range(self.num_heads):
                variables = graph.loss_variables[i]
                grads = step.multiway_gradients(i, weighted[i], updated)
                self._apply(i, grads, variables, after=[total])
                updated.update(id(v) for v in variables)
        else:
            variables = self._update_groups[0]
            grads = step.gradients(objective, variables)
            self._apply(0, grads, variables, after=[total])
        self.optimizer.finish_step()
        return self._update_logs(x, y, y_pred, sample_weight, head_losses, total)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        self._check_labels(y)
        y_pred = keras.tree.flatten(self(x, training=False))
        head_losses = self._head_loss_values(y, y_pred, sample_weight)
        total = self._objective(head_losses) + _regularization_penalty(
            self.trainable_variables
        )
        return self._update_logs(x, y, y_pred, sample_weight, head_losses, total)

    def _objective(self, head_losses):
        """The method's training objective (what `loss` logs, less
        regularization)."""
        if self.method == "standard":
            return head_losses[-1]
        return sum(g * loss for g, loss in zip(self.head_weights, head_losses))

    def _apply(self, index, grads, variables, after=()):
        """Adds the variables' regularizer gradients, applies optimizer i once
        every gradient of the loss (and every tensor of `after`) exists."""
        reg_grads = backend_step.regularization_gradients(variables)
        grads = [g if r is None else g + r for g, r in zip(grads, reg_grads)]
        grads = backend_step.after(grads, list(grads) + list(after))
        self.optimizer.apply_loss(index, grads, variables)

    def _head_loss_values(self, y, y_pred, sample_weight):
        return [
            loss_fn(y, out, sample_weight=sample_weight)
            for loss_fn, out in zip(self._head_losses, y_pred)
        ]

    def _update_logs(self, x, y, y_pred, sample_weight, head_losses, total):
        # Keras losses are divided by the number of replicas of a
        # `tf.distribute` strategy; the logs show the global values.
        replicas = backend_step.num_replicas()
        batch_size = keras.ops.shape(keras.tree.flatten(x)[0])[0]
        self._loss_tracker.update_state(
            total * replicas, sample_weight=batch_size
        )
        for tracker, value in zip(self._head_loss_trackers, head_losses):
            tracker.update_state(value * replicas, sample_weight=batch_size)
        return self.compute_metrics(x, y, y_pred, sample_weight)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """Updates every head's metrics with the one label array `y`."""
        y_pred = keras.tree.flatten(y_pred)
        return super().compute_metrics(
            x, [y] * len(y_pred), y_pred, sample_weight=sample_weight
        )

    # ------------------------------------------------------------ validation
    def _per_head(self, value, argument):
        """Expands `value` to one entry per output (None stays None)."""
        names = self.output_names
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(names))
            if unknown:
                raise ValueError(
                    f"The keys of `{argument}` must be output names {names}. "
                    f"Received unknown keys: {unknown}"
                )
            return [value.get(name) for name in names]
        return None

    def _per_head_losses(self, loss):
        if loss is None:
            raise ValueError(
                "`loss` is required: one loss for every head, a list with "
                "one loss per output, or a dict keyed by output name. "
                "Received: loss=None"
            )
        names = self.output_names
        per_head = self._per_head(loss, "loss")
        if per_head is None and isinstance(loss, (list, tuple)):
            if len(loss) != len(names):
                raise ValueError(
                    f"`loss` as a list must have one entry per output "
                    f"({len(names)}). Received: loss={loss!r}"
                )
            per_head = list(loss)
        if per_head is None:
            per_head = [loss] * len(names)
        missing = [n for n, item in zip(names, per_head) if item is None]
        if missing:
            raise ValueError(
                f"`loss` must give a loss for every output. Missing: {missing}"
            )
        return [_loss_object(item) for item in per_head]

    def _per_head_metrics(self, metrics, argument):
        if metrics is None:
            return None
        per_head = self._per_head(metrics, argument)
        if per_head is not None:
            return [list(m or []) for m in per_head]
        if not isinstance(metrics, (list, tuple)):
            raise ValueError(
                f"`{argument}` must be a list, a list of lists (one per "
                f"output) or a dict keyed by output name. "
                f"Received: {argument}={metrics!r}"
            )
        if metrics and all(
            m is None or isinstance(m, (list, tuple)) for m in metrics
        ):
            if len(metrics) != self.num_heads:
                raise ValueError(
                    f"`{argument}` as a list of lists must have one list per "
                    f"output ({self.num_heads}). "
                    f"Received: {argument}={metrics!r}"
                )
            return [list(m or []) for m in metrics]
        return [[_clone_metric(m) for m in metrics]
                for _ in range(self.num_heads)]

    def _check_labels(self, y):
        """Raises `ValueError` if `y` is not one label array fitting every
        head (checked on static shapes, before anything runs)."""
        if y is None:
            raise ValueError(
                "`y` is required: one label array used by every head. "
                "Received: y=None"
            )
        if isinstance(y, (list, tuple, dict)):
            shapes = keras.tree.map_structure(lambda t: tuple(t.shape), y)
            raise ValueError(
                "`y` must be one label array used by every head, not one per "
                f"head. Received: y with structure {shapes}"
            )
        y_shape = tuple(y.shape)
        for name, output, loss_fn in zip(
            self.output_names, self.outputs, self._head_losses
        ):
            rule = _label_rule(loss_fn)
            if rule is not None and not rule(y_shape, tuple(output.shape)):
                raise ValueError(
                    f"`y` has the wrong shape for head '{name}' (outputs of "
                    f"shape {tuple(output.shape)}, loss "
                    f"{getattr(loss_fn, 'name', loss_fn)}). Received: y with "
                    f"shape {y_shape}"
                )

    def _check_no_activity_regularizers(self):
        for layer in self._flatten_layers(include_self=False):
            if getattr(layer, "activity_regularizer", None) is not None:
                raise ValueError(
                    "MultiWayModel does not support activity regularizers. "
                    f"Received: layer '{layer.name}' with "
                    f"activity_regularizer={layer.activity_regularizer!r}"
                )

    # ---------------------------------------------------------- serializing
    def get_config(self):
        config = keras.Model(self.inputs, self.outputs).get_config()
        config.update(
            name=self.name,
            trainable=self.trainable,
            method=self.method,
            nu=self.nu,
            head_depths=(
                None if self._given_head_depths is None
                else list(self._given_head_depths)
            ),
            head_weights=(
                None if self._given_head_weights is None
                else list(self._given_head_weights)
            ),
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        from keras.src.models.functional import functional_from_config

        return functional_from_config(cls, config, custom_objects)


def _check_head_order(depths):
    aux = depths[:-1]
    ordered = all(a < b for a, b in zip(aux, aux[1:])) and (
        not aux or (aux[-1] > 0 and aux[-1] <= depths[-1])
    )
    if not ordered:
        raise ValueError(
            "`outputs` must be ordered from the shallowest head to the final "
            "one, each auxiliary head on a deeper trunk feature than the "
            "previous. Received outputs whose tap depths (weight layers from "
            f"the input) are {list(depths)}"
        )


def _loss_object(identifier):
    loss = keras.losses.get(identifier)
    if loss is None:
        raise ValueError(f"Could not interpret loss: {identifier!r}")
    if isinstance(loss, keras.losses.Loss):
        return loss
    return LossFunctionWrapper(loss, name=loss.__name__)


def _clone_metric(metric):
    if isinstance(metric, keras.metrics.Metric):
        return metric.__class__.from_config(metric.get_config())
    return metric


_SPARSE_LOSSES = (keras.losses.SparseCategoricalCrossentropy,)
_SPARSE_FUNCTIONS = (keras.losses.sparse_categorical_crossentropy,)


def _label_rule(loss_fn):
    """The label shape rule for a loss, or None if it is unknown."""
    fn = getattr(loss_fn, "fn", None)
    if isinstance(loss_fn, _SPARSE_LOSSES) or fn in _SPARSE_FUNCTIONS:
        return _sparse_labels_fit
    owner = fn if isinstance(loss_fn, LossFunctionWrapper) else (
        type(loss_fn))
    if getattr(owner, "__module__", "").startswith("keras."):
        return _dense_labels_fit
    return None


def _dims_match(a, b):
    return len(a) == len(b) and all(
        x is None or y is None or x == y for x, y in zip(a, b)
    )


def _sparse_labels_fit(y_shape, out_shape):
    return _dims_match(y_shape, out_shape[:-1]) or (
        _dims_match(y_shape[:-1], out_shape[:-1])
        and len(y_shape) == len(out_shape)
        and y_shape[-1] == 1
    )


def _dense_labels_fit(y_shape, out_shape):
    return _dims_match(y_shape, out_shape) or (
        _dims_match(y_shape, out_shape[:-1]) and out_shape[-1] == 1
    )


def _regularization_penalty(variables):
    """The weight regularizers' penalty, scaled per replica like losses."""
    terms = [v.regularizer(v) for v in variables
             if getattr(v, "regularizer", None)]
    return sum(terms) / backend_step.num_replicas() if terms else 0.0
