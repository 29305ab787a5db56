"""`MultiWayModel`: a functional Keras model trained with Multi-way BP."""

import types

import keras

from keras_mwbp import _compat
from keras_mwbp import compile_handling
from keras_mwbp import constants
from keras_mwbp import data_order
from keras_mwbp import labels
from keras_mwbp import train_function as train_functions
from keras_mwbp.nan_policy import NAN_POLICIES
from keras_mwbp import algorithm
from keras_mwbp import backend as backends
from keras_mwbp.callbacks.progbar_logger import ProgbarLogger
from keras_mwbp.graph import HeadGraph
from keras_mwbp.graph import check_outputs_depend_on_inputs
from keras_mwbp.multi_way_optimizer import MultiWayOptimizer
from keras_mwbp.weighting import check_head_depths
from keras_mwbp.weighting import check_head_weights
from keras_mwbp.weighting import check_nu
from keras_mwbp.weighting import check_weight_decay
from keras_mwbp.weighting import gammas_from_depths

METHODS = constants.METHODS
MULTIWAY_METHODS = constants.MULTIWAY_METHODS
WEIGHTINGS = constants.WEIGHTINGS
# The attributes `compile()` sets (Keras's and this class's), put back when
# it fails part way.
_COMPILE_STATE = (
    "optimizer",
    "loss",
    "_compile_loss",
    "_compile_metrics",
    "_jit_compile",
    "_run_eagerly",
    "stop_training",
    "_compiled_trainable_state",
    "compiled",
    "_loss_tracker",
    "steps_per_execution",
    "train_function",
    "test_function",
    "predict_function",
    "_compile_config",
    "_head_graph",
    "_head_losses",
    "_update_groups",
    "_head_loss_trackers",
    "_skipped_steps",
)
_MISSING = object()


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
    - `"reverse_mwbp"`: the same from the final loss to the shallowest.
    - `"naive_mwbp"`, `"naive_reverse_mwbp"`: a new forward pass with the
      current parameters before every loss after the first (same dropout
      masks; BatchNorm batch statistics from the new features; moving
      statistics only from the first pass), in either order.
    - `"joint"` (Joint BP): one gradient of `sum_i gamma_i * loss_i`, one
      optimizer.
    - `"relay"` (Relay BP): as joint, but loss i's gradient reaches only the
      segments `i - relay_span .. i` (segment s: the variables loss s is the
      first to depend on).
    - `"standard"`: only the final loss; the auxiliary heads are not trained.

    Loss weights follow the paper's Eq. 5: `gamma_K = 1` for the final loss
    and `gamma_i = max(0.01, (L_i / L_{K-1}) ** nu)` for auxiliary head `i`,
    where `L_i` is the depth of the head's tap: the number of weight layers
    (convolutions, dense layers) on the longest path from the input to the
    tap, the head's own layers excluded. The depths are read from the graph
    unless `head_depths` is given; `head_weights` overrides the weights.
    `nu` and the weights are non-trainable variables (saved with the model);
    `set_nu()` changes them between steps without retracing.

    Logs: `loss` is the method's training objective (`sum_i gamma_i loss_i`,
    the final head's loss for `"standard"`) plus weight regularization;
    `<output name>_loss` is each head's unweighted loss, and every compiled
    metric is reported per head as `<output name>_<metric name>`, as Keras
    names a multi-output model's. Training logs also hold `nu` and the loss
    weights `gamma_0` .. `gamma_K`.

    Regularization: each variable's own regularizer (e.g. `kernel_regularizer`)
    is added, unweighted, to every update that touches the variable (so in
    `"mwbp"` once per loss that reaches it, as the authors' per-loss weight
    decay did). Activity regularizers are not supported. `weight_decay` is
    the authors' coupled weight decay (below).

    Args:
        inputs: The model's input tensor(s), as for a functional model.
        outputs: List of head logits, shallowest first, final last.
        method: One of `METHODS`: `"mwbp"`, `"reverse_mwbp"`, `"naive_mwbp"`,
            `"naive_reverse_mwbp"`, `"joint"`, `"relay"`, `"standard"`.
        nu: Positive decay rate of Eq. 5.
        head_depths: Optional tap depth of each output (positive, strictly
            increasing); read from the graph when `None`.
        head_weights: Optional loss weight of each output, each in (0, 1];
            overrides `nu`.
        relay_span: Relay BP's `c`: how many segments below its own loss i's
            gradient reaches (non-negative int; default 1).
        weighting: `"paper"` (loss i's gradient times gamma_i) or
            `"reference_code"` (the authors' code: an auxiliary head's own
            variables, those the final loss does not depend on, get loss
            i's gradient unscaled, the trunk's times
            gamma_i / sum_{j=i}^{K-1} gamma_j; the final loss's gradient is
            unscaled). Every method but `"standard"` takes it: the per-loss
            methods scale each loss's update; `"joint"` and `"relay"` sum
            the per-loss gradients so scaled into their one update (for
            `"joint"` one backward pass per loss instead of one in all).
        weight_decay: Coupled (L2) weight decay, as `torch.optim.SGD`'s and
            the authors' per-loss SGDs: `weight_decay * w` is added to the
            gradient of every trainable variable `w` in every update that
            touches it, before the optimizer (so momentum carries it).
            Per-loss methods decay a shallow variable once per loss that
            reaches it; `"joint"`, `"relay"` and `"standard"` once per step.
            Under `weighting="reference_code"` the trunk's term of an
            auxiliary loss i is divided by `sum_{j=i}^{K-1} gamma_j`, as the
            authors' trunk learning rate is. A non-negative number; `0`
            (default) adds nothing. Unlike the decoupled `weight_decay` of
            Keras optimizers (`w -= lr * wd * w` outside the momentum, about
            ten times weaker at momentum 0.9), this is the paper's recipe.
        nan_policy: What a training step does when a head's loss, an
            update's gradients or the new BatchNorm statistics are not
            finite. `"raise"` (default): every variable (weights, statistics,
            optimizer states, step counters, metrics) is put back as before
            the step and `fit` raises a `FloatingPointError` naming the step
            and the head. `"skip_step"`: the same undo, then training goes
            on. `"zero"`: NaN gradient entries become 0 before each update
            (the authors' code); nothing else is checked.
        shuffle_seed: Non-negative int or `None` (drawn from NumPy's global
            generator, so `keras.utils.set_random_seed` fixes it). `fit`
            shuffles in-memory arrays by a permutation of this seed and the
            epoch number, so a resumed run sees the same batches; saved in
            the config.
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
        relay_span=1,
        weighting="paper",
        nan_policy="raise",
        shuffle_seed=None,
        weight_decay=0.0,
        **kwargs,
    ):
        if method not in METHODS:
            raise ValueError(
                f"`method` must be one of {METHODS}. Received: method={method!r}"
            )
        _check_relay_span(relay_span)
        _check_weighting(weighting, method)
        _check_nan_policy(nan_policy)
        weight_decay = check_weight_decay(weight_decay)
        shuffle_seed = data_order.check_seed(shuffle_seed)
        check_nu(nu)
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        outputs = list(outputs)
        if method in MULTIWAY_METHODS and len(outputs) < 2:
            raise ValueError(
                "`outputs` must hold at least two heads (auxiliary heads and "
                f"the final one) for method={method!r}. Received: "
                f"{len(outputs)} output(s)."
            )
        check_outputs_depend_on_inputs(keras.tree.flatten(inputs), outputs)
        if head_weights is not None:
            head_weights = check_head_weights(
                head_weights, len(outputs)
            )
        if head_depths is not None:
            head_depths = check_head_depths(
                head_depths, len(outputs)
            )
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self._check_no_activity_regularizers()
        self._head_graph = HeadGraph(self)
        _check_head_order(self._head_graph.depths)
        self.method = method
        self.relay_span = int(relay_span)
        self.weighting = weighting
        self.nan_policy = nan_policy
        self.shuffle_seed = shuffle_seed
        self.weight_decay = weight_decay
        self._batches_to_skip = 0
        self._skipped_logs = {}
        self._resume_metric_values = None
        self._given_head_depths = head_depths
        self._given_head_weights = head_weights
        # Non-trainable variables, so that a callback can change them between
        # steps without retracing the train step; saved with the weights.
        # float64 where the backend has it (JAX only with JAX_ENABLE_X64).
        weight_dtype = backends.widest_float()
        self._nu = self.add_weight(
            shape=(), trainable=False, dtype=weight_dtype, name="nu"
        )
        self._gammas = self.add_weight(
            shape=(len(self.outputs),),
            trainable=False,
            dtype=weight_dtype,
            name="head_weights",
        )
        self._nu.assign(float(nu))
        self._gammas.assign(
            head_weights
            or gammas_from_depths(self.head_depths, nu)
        )

    # ------------------------------------------------------------ properties
    @property
    def head_depths(self):
        """Tap depth of each head, shallowest first; the final entry is the
        depth of the whole network."""
        return self._given_head_depths or self._head_graph.depths

    @property
    def head_weights(self):
        """Loss weight gamma_i of each head (paper Eq. 5), final last."""
        return tuple(
            float(g) for g in keras.ops.convert_to_numpy(self._gammas)
        )

    @property
    def nu(self):
        """The decay rate of Eq. 5 the loss weights were computed with."""
        return float(keras.ops.convert_to_numpy(self._nu))

    def set_nu(self, nu):
        """Sets `nu` and recomputes the loss weights from `head_depths`.

        The weights live in a non-trainable variable: the change applies from
        the next training step on, without retracing it.

        Args:
            nu: Positive decay rate.
        """
        check_nu(nu)
        if self._given_head_weights is not None:
            raise ValueError(
                "`nu` cannot change the loss weights of a model built with "
                f"explicit `head_weights`={list(self._given_head_weights)}. "
                f"Received: nu={nu!r}"
            )
        self._nu.assign(float(nu))
        self._gammas.assign(
            gammas_from_depths(self.head_depths, nu)
        )

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
        # One input is passed as a tensor, not a list of one, so that the
        # exit model (its `export()`ed `serve` endpoint included) takes a
        # tensor, as a one-input Keras model does.
        inputs = self.inputs[0] if len(self.inputs) == 1 else self.inputs
        return keras.Model(
            inputs,
            self.outputs[index],
            name=f"{self.name}_exit_{self.output_names[index]}",
        )

    def _run_through_graph(self, inputs, *args, **kwargs):
        """Refuses `keras.models.clone_model`, runs the graph otherwise.

        Keras's `clone_model` rebuilds a functional subclass whose
        constructor differs from `keras.Model`'s as a plain `Functional`
        model (no method, loss weights or per-head losses; `fit` then fails
        on the label structure). It is the only caller of this (private)
        method that passes `call_fn` with symbolic inputs.
        """
        if "call_fn" in kwargs and all(
            isinstance(x, keras.KerasTensor) for x in keras.tree.flatten(inputs)
        ):
            raise ValueError(
                "`keras.models.clone_model` cannot clone a MultiWayModel: "
                "Keras would rebuild it as a plain Functional model, without "
                "its method, loss weights and per-head losses. For a copy "
                "with the same configuration and new weights, use "
                "`keras_mwbp.MultiWayModel.from_config(model.get_config())` "
                "(then `copy.set_weights(model.get_weights())` for the same "
                f"weights). Received: model {self.name!r}"
            )
        return super()._run_through_graph(inputs, *args, **kwargs)

    # --------------------------------------------------------------- compile
    @_compat.tracking.no_automatic_dependency_tracking
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
            **kwargs: Other `keras.Model.compile` arguments. With
                `auto_scale_loss=True` (the default, as in Keras) and the
                model's dtype policy `"mixed_float16"`, every loss's backward
                pass gets dynamic loss scaling: each per-loss optimizer is a
                `keras.optimizers.LossScaleOptimizer` with a scale of its
                own (losses of different size need different scales), saved
                with the model. An explicit `LossScaleOptimizer` as
                `optimizer` turns it on with its options under any policy.
                `mixed_bfloat16` needs no scaling and gets none.
        """
        backends.check_supported()
        if loss_weights is not None:
            raise ValueError(
                "`loss_weights` is not used by MultiWayModel: the loss weights "
                "are `head_weights` (or computed from `nu`). "
                f"Received: loss_weights={loss_weights!r}"
            )
        auto_scale_loss = kwargs.pop("auto_scale_loss", True)
        loss_scale = None
        if auto_scale_loss and self.dtype_policy.name == "mixed_float16":
            loss_scale = True
        # Everything is checked before any state changes: a failed
        # compile() leaves a compiled model as it was.
        head_losses = compile_handling.per_head_losses(self, loss)
        head_metrics = compile_handling.per_head_metrics(
            self, metrics, "metrics"
        )
        head_weighted = compile_handling.per_head_metrics(
            self, weighted_metrics, "weighted_metrics"
        )
        head_graph = HeadGraph(self)
        if self.method in MULTIWAY_METHODS:
            groups = list(head_graph.loss_variables)
        elif self.method == "standard":
            groups = [head_graph.loss_variables[-1]]
        else:
            groups = [self.trainable_variables]
        container = MultiWayOptimizer(
            optimizer, num_losses=len(groups), loss_scale=loss_scale
        )
        if (container.loss_scale is not None
                and keras.backend.backend() != "tensorflow"):
            raise ValueError(
                "Dynamic loss scaling (the mixed_float16 dtype policy, or a "
                "LossScaleOptimizer as `optimizer`) is supported on the "
                "TensorFlow backend only so far. Received: KERAS_BACKEND="
                f"{keras.backend.backend()!r}, dtype policy "
                f"{self.dtype_policy.name!r}, optimizer={optimizer!r}. Use "
                "mixed_bfloat16 (no scaling needed), or pass "
                "auto_scale_loss=False to train without loss scaling."
            )
        container.set_variable_groups(groups, self.trainable_variables)
        previous = {
            name: self.__dict__.get(name, _MISSING)
            for name in _COMPILE_STATE
        }
        try:
            self._head_graph = head_graph
            super().compile(
                optimizer=container,
                metrics=head_metrics,
                weighted_metrics=head_weighted,
                # The per-loss optimizers scale the losses themselves; a
                # LossScaleOptimizer around them would hide them.
                auto_scale_loss=False,
                **kwargs,
            )
            self._head_losses = head_losses
            self._update_groups = groups
            self._head_loss_trackers = [
                keras.metrics.Mean(name=f"{name}_loss")
                for name in self.output_names
            ]
            self._skipped_steps = (
                keras.metrics.Sum(name="skipped_steps")
                if self.nan_policy == "skip_step" else None
            )
            container.build(self.trainable_variables)
            template = container.template
            if container.loss_scale is not None:
                template = keras.optimizers.LossScaleOptimizer(
                    template, **container.loss_scale
                )
            _compat.set_compile_config(
                self,
                optimizer=template,
                auto_scale_loss=auto_scale_loss,
                loss=loss,
                metrics=metrics,
                weighted_metrics=weighted_metrics,
                **kwargs,
            )
        except BaseException:
            for name, value in previous.items():
                if value is _MISSING:
                    self.__dict__.pop(name, None)
                else:
                    self.__dict__[name] = value
            raise
        compile_handling.warn_if_logits_meet_probability_losses(
            self, head_losses
        )

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # TensorFlow's trainer (see `_compat`): also under a multi-worker
        # strategy.
        _compat.symbolic_build_on_local_values(self, iterator, data_batch)

    def get_compile_config(self):
        # Named by backend-neutral classes, so that a file saved under one
        # backend compiles under another (see `_compat`).
        return _compat.backend_neutral_config(super().get_compile_config())

    def compile_from_config(self, config):
        config = _compat.serialization_lib.deserialize_keras_object(config)
        self.compile(**config)

    @property
    def metrics(self):
        metrics = super().metrics
        trackers = list(getattr(self, "_head_loss_trackers", []))
        if metrics and metrics[0] is _compat.loss_tracker(self):
            metrics = metrics[:1] + trackers + metrics[1:]
        else:
            metrics = trackers + metrics
        skipped = getattr(self, "_skipped_steps", None)
        return metrics + ([skipped] if skipped is not None else [])

    def get_metrics_result(self):
        """The metrics' values; under `nan_policy="skip_step"`, NaN for every
        metric (`skipped_steps` excepted) while every step of the epoch so
        far was skipped.

        A metric that saw no sample has no value: Keras's means would read
        0, and `ModelCheckpoint(save_best_only=True)` or `EarlyStopping`
        would take a diverged epoch's `loss: 0.0` for an improvement. They
        treat NaN as no improvement.
        """
        results = super().get_metrics_result()
        if getattr(self, "_skipped_steps", None) is None:
            return results
        seen = _compat.loss_tracker(self).count > 0
        return {
            name: value if name == "skipped_steps"
            else keras.ops.where(seen, value, float("nan"))
            for name, value in results.items()
        }

    # ------------------------------------------------------------- training
    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=1,
        verbose="auto",
        callbacks=None,
        validation_split=0.0,
        validation_data=None,
        shuffle=True,
        class_weight=None,
        sample_weight=None,
        initial_epoch=0,
        steps_per_epoch=None,
        **kwargs,
    ):
        """`keras.Model.fit`, with a data order that survives a restart.

        In-memory arrays (NumPy arrays or tensors) with `shuffle=True` and no
        `steps_per_epoch` are shuffled by a permutation that depends only on
        the model's `shuffle_seed` and the epoch number, so that training
        resumed at epoch `e` (from a `.keras` checkpoint with
        `initial_epoch=e`, or from a backup) sees the batches the
        uninterrupted run saw. Datasets, generators and `PyDataset`s are used
        as given. Other arguments are those of `keras.Model.fit`.
        """
        leaves = data_order.array_leaves(x, y, sample_weight)
        # The epoch's size, for the position check of BackupAndRestore.
        self._fit_sizes = leaves and (len(leaves[0]), batch_size, validation_split)
        if leaves is not None and x is not None and any(
            len(a) == 0 for a in leaves
        ):
            raise ValueError(
                "The training data is empty: `x`, `y` and `sample_weight` "
                "must hold at least one sample. Received: arrays of lengths "
                f"{[len(a) for a in leaves]}"
            )
        if (
            _compat.data_adapters.is_tf_dataset(x)
            and hasattr(x, "cardinality")
            and int(x.cardinality()) == 0
        ):
            raise ValueError(
                "The training data is empty: `x` is a `tf.data.Dataset` "
                "with no batches. Received: x with cardinality 0"
            )
        labels.check_array_labels(self, y)
        if isinstance(validation_data, (list, tuple)) and len(
            validation_data
        ) in (2, 3):
            labels.check_array_labels(self, validation_data[1])
        if (
            shuffle is True
            and steps_per_epoch is None
            and leaves is not None
            and x is not None
        ):
            if validation_split and validation_data is None:
                (x, y, sample_weight), validation_data = (
                    _compat.array_slicing.train_validation_split(
                        (x, y, sample_weight),
                        validation_split=validation_split,
                    )
                )
            validation_split = 0.0
            batch_size = batch_size or 32
            num_samples = len(keras.tree.flatten(x)[0])
            first = data_order.start_epoch(
                self, _as_list(callbacks), initial_epoch
            )
            if first >= epochs:
                # Nothing left to train (a rerun after the last epoch's
                # backup): Keras's JAX fit builds the metrics from a first
                # batch, which this epoch order no longer yields.
                _compat.symbolic_build(self, keras.tree.map_structure(
                    lambda a: a[:batch_size],
                    tuple(t for t in (x, y, sample_weight) if t is not None),
                ))
            x = data_order.epoch_batches(
                x, y, sample_weight, batch_size, self.shuffle_seed,
                first_epoch=first, epochs=epochs,
            )
            steps_per_epoch = data_order.steps_per_epoch(
                num_samples, batch_size
            )
            y = sample_weight = batch_size = None
            shuffle = False
        if not _shuffle_applies(x):
            shuffle = False  # Keras would ignore it, with a warning.
        callbacks = _with_progbar(callbacks, verbose)
        return super().fit(
            x=x,
            y=y,
            batch_size=batch_size,
            epochs=epochs,
            verbose=verbose,
            callbacks=callbacks,
            validation_split=validation_split,
            validation_data=validation_data,
            shuffle=shuffle,
            class_weight=class_weight,
            sample_weight=sample_weight,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps_per_epoch,
            **kwargs,
        )

    def make_train_function(self, force=False):
        """Keras's train function, wrapped: it skips the batches a resumed
        backup already trained (see `keras_mwbp.callbacks.BackupAndRestore`)
        and turns a failed `nan_policy="raise"` check into a
        `FloatingPointError` naming the step and head."""
        super().make_train_function(force=force)
        function = self.train_function
        if getattr(function, "_keras_mwbp_wrapped", False):
            return function
        train_function = train_functions.wrap(self, function, backends.get())
        train_function._keras_mwbp_wrapped = True
        self.train_function = train_function
        return train_function

    def train_step(self, *args):
        """One training step (`keras_mwbp.algorithm.TrainingStep`), as the
        backend's Keras trainer calls it: `train_step(data)` under
        TensorFlow and torch, the stateless `train_step(state, data)` under
        JAX."""
        return backends.get().train_step(self, *args)

    def test_step(self, *args):
        if len(args) == 2:  # JAX: the stateless test_step(state, data).
            return backends.get().test_step(self, *args)
        (data,) = args
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        labels.check_labels(self, y)
        y_pred = keras.tree.flatten(self(x, training=False))
        head_losses = algorithm.head_loss_values(self, y, y_pred, sample_weight)
        gammas = algorithm.gamma_tensors(self, head_losses[0].dtype)
        weighted = [g * loss for g, loss in zip(gammas, head_losses)]
        total = algorithm.objective_value(
            self, head_losses, weighted
        ) + algorithm.regularization_penalty(self.trainable_variables)
        logs = self._update_logs(
            x, y, y_pred, sample_weight, head_losses, total
        )
        logs.pop("skipped_steps", None)  # A training count only.
        return logs

    def _update_logs(self, x, y, y_pred, sample_weight, head_losses, total):
        algorithm.update_metrics(
            self, x, y, y_pred, sample_weight, head_losses, total
        )
        return self.get_metrics_result()

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """Updates every head's metrics with the one label array `y`."""
        y_pred = keras.tree.flatten(y_pred)
        return super().compute_metrics(
            x, [y] * len(y_pred), y_pred, sample_weight=sample_weight
        )

    # ------------------------------------------------------------ validation
    def evaluate(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.evaluate`; in-memory class-index labels outside a
        head's logits raise a `ValueError` before any batch runs."""
        if not kwargs.get("_use_cached_eval_dataset"):
            # (fit() checked its validation labels already.)
            labels.check_array_labels(self, y)
        return super().evaluate(x, y, *args, **kwargs)

    def _check_no_activity_regularizers(self):
        for layer in _compat.sublayers(self):
            if getattr(layer, "activity_regularizer", None) is not None:
                raise ValueError(
                    "MultiWayModel does not support activity regularizers. "
                    f"Received: layer '{layer.name}' with "
                    f"activity_regularizer={layer.activity_regularizer!r}"
                )

    # ---------------------------------------------------------- serializing
    def _seed_states(self):
        """The layers' random seed states (e.g. Dropout's), which Keras's
        weight files leave out."""
        weights = {id(v) for v in self.weights}
        return [v for v in self.variables if id(v) not in weights]

    def save_own_variables(self, store):
        """Saves nu, the loss weights and every layer's seed state, so that
        a resumed run draws the dropout masks the uninterrupted one would."""
        super().save_own_variables(store)
        for i, variable in enumerate(self._seed_states()):
            store[f"seed_state_{i}"] = keras.ops.convert_to_numpy(variable)

    def load_own_variables(self, store):
        keys = list(store.keys())
        seeds = sorted(
            (k for k in keys if k.startswith("seed_state_")),
            key=lambda k: int(k.rsplit("_", 1)[1]),
        )
        states = self._seed_states()
        if seeds and len(seeds) != len(states):
            raise ValueError(
                f"The file holds {len(seeds)} random seed states, but this "
                f"model has {len(states)}: it was saved from another model."
            )
        super().load_own_variables(
            {k: store[k] for k in keys if not k.startswith("seed_state_")}
        )
        # Files written before seed states were saved keep fresh seeds.
        for variable, key in zip(states, seeds):
            variable.assign(store[key])

    def get_config(self):
        config = keras.Model(self.inputs, self.outputs).get_config()
        config.update(
            name=self.name,
            trainable=self.trainable,
            method=self.method,
            nu=self.nu,
            relay_span=self.relay_span,
            weighting=self.weighting,
            nan_policy=self.nan_policy,
            shuffle_seed=self.shuffle_seed,
            weight_decay=self.weight_decay,
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
        return _compat.functional_from_config(cls, config, custom_objects)


def _check_relay_span(relay_span):
    if (
        isinstance(relay_span, bool)
        or not isinstance(relay_span, int)
        or relay_span < 0
    ):
        raise ValueError(
            "`relay_span` must be a non-negative integer. "
            f"Received: relay_span={relay_span!r}"
        )


def _shuffle_applies(x):
    """Whether `fit(shuffle=...)` means anything for data `x` (it does not
    for datasets and generators, which are used as given)."""
    if _compat.data_adapters.is_tf_dataset(x) or isinstance(
        x, types.GeneratorType
    ):
        return False
    return not (
        isinstance(x, keras.utils.PyDataset)
        and getattr(x, "num_batches", None) is None
    )


def _with_progbar(callbacks, verbose):
    """`callbacks` with a `keras_mwbp.callbacks.ProgbarLogger` added, unless
    it holds a `keras.callbacks.ProgbarLogger` (or is a `CallbackList`,
    which Keras uses as it is) or `verbose` is 0."""
    if verbose == 0 or isinstance(callbacks, keras.callbacks.CallbackList):
        return callbacks
    callbacks = keras.tree.flatten(callbacks) if callbacks else []
    if any(isinstance(c, keras.callbacks.ProgbarLogger) for c in callbacks):
        return callbacks
    return callbacks + [ProgbarLogger()]


def _as_list(callbacks):
    """The callbacks of `callbacks` (None, a list or a `CallbackList`)."""
    if isinstance(callbacks, keras.callbacks.CallbackList):
        return list(callbacks.callbacks)
    return list(callbacks or [])


def _check_nan_policy(nan_policy):
    if nan_policy not in NAN_POLICIES:
        raise ValueError(
            f"`nan_policy` must be one of {NAN_POLICIES}. "
            f"Received: nan_policy={nan_policy!r}"
        )


def _check_weighting(weighting, method):
    if weighting not in WEIGHTINGS:
        raise ValueError(
            f"`weighting` must be one of {WEIGHTINGS}. "
            f"Received: weighting={weighting!r}"
        )
    if weighting == "reference_code" and method == "standard":
        raise ValueError(
            "`weighting='reference_code'` applies to the methods that train "
            "on more than one loss (every method but 'standard', which "
            f"trains on the final loss alone). Received: method={method!r}"
        )


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


