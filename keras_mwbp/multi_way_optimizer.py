"""One optimizer per loss, held in one Keras optimizer."""

import copy

import keras
from keras_mwbp import _compat
from keras_mwbp._compat import tracking


@keras.saving.register_keras_serializable(package="keras_mwbp")
class MultiWayOptimizer(keras.optimizers.Optimizer):
    """Holds one clone of a template optimizer per loss of a multi-head model.

    As in the authors' code, loss `i` has its own optimizer: it keeps the
    state (momentum, Adam moments, its own step count) of the variables loss
    `i` updates, so a shallow variable has one momentum buffer per loss that
    reaches it. `MultiWayModel.compile` wraps the user's optimizer in this
    class and sets it as `model.optimizer`, so `model.save`, `save_weights`,
    `ModelCheckpoint` and `BackupAndRestore` keep every inner state.

    - `iterations` counts training steps (not per-loss updates); each inner
      optimizer is applied once per step, so learning-rate schedules, Adam's
      bias correction and weight decay advance once per step too.
    - One learning rate serves every inner optimizer: the container's
      `learning_rate` variable (or the template's schedule, evaluated at the
      step count), which each inner optimizer reads. Every way Keras code
      sets a rate reaches all of them: `learning_rate.assign(x)`, setting
      the attribute (as `LearningRateScheduler` and `ReduceLROnPlateau` do),
      or a `LearningRateSchedule`.
    - `variables` holds the container's own step counter and learning rate
      followed by every inner optimizer's variables. Loading a state whose number or shapes of
      variables differ, or a file with no state for it at all, raises a
      `ValueError` instead of training on with fresh optimizer states (Keras's
      own optimizers only warn).

    Args:
        optimizer: The template: a `keras.optimizers.Optimizer` instance,
            identifier string or config dict.
        num_losses: Number of inner optimizers (one per loss updated with
            its own optimizer).
        name: Optional name.
        loss_scale: `None` (no loss scaling), `True`, or a dict of
            `initial_scale` (default `2**15`) and `dynamic_growth_steps`
            (default 2000): each inner optimizer is then a
            `keras.optimizers.LossScaleOptimizer` with its own dynamic
            scale, so every loss's backward pass is scaled and checked on
            its own (see `loss_scales()`). A template that is a
            `LossScaleOptimizer` turns it on with its options.

    Example:

    >>> template = keras.optimizers.SGD(learning_rate=0.1, momentum=0.9)
    >>> opt = MultiWayOptimizer(template, num_losses=3)
    >>> len(opt.loss_optimizers)
    3
    """

    def __init__(
        self, optimizer, num_losses, name=None, loss_scale=None, **kwargs
    ):
        if not isinstance(optimizer, (str, dict, keras.optimizers.Optimizer)):
            raise TypeError(
                "`optimizer` must be a Keras optimizer. "
                f"Received: optimizer={optimizer!r}"
            )
        try:
            # (Keras's deserialization edits a config dict in place.)
            template = keras.optimizers.get(
                copy.deepcopy(optimizer)
                if isinstance(optimizer, dict) else optimizer
            )
        except (ValueError, TypeError, KeyError):
            # An unknown name or a config Keras cannot deserialize.
            raise ValueError(
                "`optimizer` must be a Keras optimizer, the name of one "
                "(e.g. 'sgd') or its config. "
                f"Received: optimizer={optimizer!r}"
            ) from None
        if isinstance(template, MultiWayOptimizer):
            loss_scale = loss_scale or template.loss_scale
            template = template.template
        if isinstance(template, keras.optimizers.LossScaleOptimizer):
            loss_scale = loss_scale or {
                "initial_scale": template.initial_scale,
                "dynamic_growth_steps": template.dynamic_growth_steps,
            }
            template = template.inner_optimizer
        loss_scale = _check_loss_scale(loss_scale)
        if (
            isinstance(num_losses, bool)
            or not isinstance(num_losses, int)
            or num_losses < 1
        ):
            raise ValueError(
                "`num_losses` must be a positive integer. "
                f"Received: num_losses={num_losses!r}"
            )
        rate = _compat.learning_rate_object(template)
        if isinstance(rate, keras.Variable):
            rate = float(keras.ops.convert_to_numpy(rate))
        # The container owns the one learning rate (a variable, or the
        # template's schedule object itself) that every inner optimizer
        # reads.
        super().__init__(learning_rate=rate, name=name, **kwargs)
        # (Items, not a dict: Keras's tracking would wrap a dict.)
        self._loss_scale = (
            None if loss_scale is None else tuple(loss_scale.items())
        )
        self.template = _copy(template, rate, template.name)
        inner = [
            _copy(template, _compat.learning_rate_object(self),
                  f"{template.name}_loss_{i}")
            for i in range(num_losses)
        ]
        if self.loss_scale is not None:
            inner = [
                keras.optimizers.LossScaleOptimizer(
                    optimizer, name=f"{optimizer.name}_scaled",
                    **self.loss_scale,
                )
                for optimizer in inner
            ]
        self._inner = tuple(inner)
        self._groups = None

    @property
    def loss_optimizers(self):
        """The inner optimizers, one per loss.

        (Not named `optimizers`: Keras's learning-rate callbacks treat an
        optimizer with that attribute as several independent ones; here they
        set `learning_rate`, which sets every inner optimizer's rate.)
        """
        return self._inner

    @property
    def num_losses(self):
        return len(self._inner)

    @property
    def loss_scale(self):
        """`None`, or the dynamic loss scaling options of every loss's
        `LossScaleOptimizer` (`initial_scale`, `dynamic_growth_steps`)."""
        return None if self._loss_scale is None else dict(self._loss_scale)

    @property
    def learning_rate(self):
        return keras.optimizers.Optimizer.learning_rate.fget(self)

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        # Keras's setter assigns a number to the rate variable, which every
        # inner optimizer reads, or replaces the rate by a schedule or a
        # callable, which is then handed to every inner optimizer.
        keras.optimizers.Optimizer.learning_rate.fset(self, learning_rate)
        for inner in self._inner:
            _compat.share_learning_rate(
                getattr(inner, "inner_optimizer", inner),
                _compat.learning_rate_object(self),
            )

    def loss_scales(self):
        """The dynamic loss scale of each inner optimizer (tensors), or
        `None` without loss scaling. The step multiplies loss i by scale i
        before its backward pass; loss i's `LossScaleOptimizer` divides the
        gradients by it, and skips the update and halves the scale when they
        are not finite."""
        if self.loss_scale is None:
            return None
        return [
            keras.ops.convert_to_tensor(inner.scale_loss(1.0))
            for inner in self._inner
        ]

    @tracking.no_automatic_dependency_tracking
    def set_variable_groups(self, groups, variables=None):
        """Sets which variables each inner optimizer updates.

        Args:
            groups: One list of variables per inner optimizer.
            variables: All the model's trainable variables, in the order
                `build()` will receive them; by default the groups' variables
                in order of first appearance. Loading a state into an
                optimizer that is not built yet builds it on these.
        """
        if len(groups) != self.num_losses:
            raise ValueError(
                f"`groups` must have one entry per loss ({self.num_losses}). "
                f"Received {len(groups)} groups."
            )
        if variables is None:
            variables = {id(v): v for group in groups for v in group}.values()
        self._groups = [{id(v) for v in group} for group in groups]
        self._model_variables = tuple(variables)

    def build(self, variables):
        if self._groups is None:
            raise ValueError(
                "`MultiWayOptimizer.build()` needs the variable groups; "
                "compile a `MultiWayModel` with it, which sets them."
            )
        for inner, group in zip(self._inner, self._groups):
            inner.build([v for v in variables if id(v) in group])
        super().build(variables)

    @property
    def variables(self):
        inner = [v for opt in self._inner for v in opt.variables]
        return _compat.own_variables(self) + inner

    def apply_loss(self, index, grads, variables):
        """Applies loss `index`'s gradients with loss `index`'s optimizer."""
        self._inner[index].apply(grads, variables)

    def finish_step(self):
        """Counts one training step (call once after all per-loss updates)."""
        _compat.count_iteration(self)

    def save_own_variables(self, store):
        for i, variable in enumerate(self.variables):
            store[str(i)] = variable.numpy()

    def load_own_variables(self, store):
        if not self.built and self._groups is not None:
            # Loading weights into a compiled model that has not trained yet.
            self.build(list(self._model_variables))
        variables = self.variables
        if not len(store.keys()):
            # Keras hands an empty store for a group missing from the file
            # (its own optimizers then warn and keep their fresh state). A
            # saved container always has at least its step counter.
            raise ValueError(
                f"The file has no saved state for optimizer '{self.name}': "
                f"expected {len(variables)} variables (its step counter and "
                f"the states of {self.num_losses} inner optimizers), found "
                "none. The file is incomplete or was saved without an "
                "optimizer; refusing to train on with fresh optimizer "
                "states. To load only the weights, load them into the model "
                "before `compile()` (or `load_model(..., compile=False)`)."
            )
        values = self._stored_values(store)
        if len(values) != len(variables):
            raise ValueError(
                f"The saved state of optimizer '{self.name}' has "
                f"{len(store.keys())} variables, but this optimizer has "
                f"{len(variables)} ({self.num_losses} inner optimizers"
                f"{'' if self.built else ', not built'}). The file was saved "
                "with a different model, method or optimizer."
            )
        for value, variable in zip(values, variables):
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"The saved state of optimizer '{self.name}' does not "
                    f"match variable '{variable.path}': saved shape "
                    f"{tuple(value.shape)}, expected {tuple(variable.shape)}."
                )
        for value, variable in zip(values, variables):
            variable.assign(value)

    def _stored_values(self, store):
        """The saved values in the order of `variables`. Files of
        keras_mwbp 0.1.0, whose inner optimizers had a learning rate
        variable each and the container none, are read in that layout (the
        rate is the first inner optimizer's: the one `learning_rate`
        showed)."""
        values = [store[str(i)] for i in range(len(store.keys()))]
        shared = self.loss_scale is None and isinstance(
            _compat.learning_rate_object(self), keras.Variable
        )
        old_length = len(self.variables) + self.num_losses - 1
        if (
            not shared
            or len(values) != old_length
            or "int" not in str(values[1].dtype)
        ):
            return values
        # 0.1.0: [step, (inner step, inner rate, slots...) per loss].
        converted, index = [values[0], values[2]], 1
        for inner in self._inner:
            slots = len(inner.variables) - 1
            converted.append(values[index])
            converted.extend(values[index + 2:index + 2 + slots])
            index += 2 + slots
        return converted

    def __dir__(self):
        # The container saves its inner optimizers' variables itself; hide
        # them from Keras's attribute walk so that they are not saved twice.
        hidden = {"_inner", "loss_optimizers", "template"}
        return [name for name in super().__dir__() if name not in hidden]

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": _compat.backend_neutral_config(
                keras.saving.serialize_keras_object(self.template)
            ),
            "num_losses": self.num_losses,
            "loss_scale": self.loss_scale,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["optimizer"] = keras.saving.deserialize_keras_object(
            config["optimizer"], custom_objects=custom_objects
        )
        return cls(**config)


def _copy(template, learning_rate, name):
    """A fresh optimizer of the template's class and hyperparameters (no
    state), named `name`, reading `learning_rate` (a number, or a variable,
    schedule or callable shared as the object itself).

    The copy is built by the template's own class from its config
    (`type(template).from_config`, as Keras rebuilds any object), with the
    learning rate left out of the config: a schedule is shared, never
    serialized, so a `LearningRateSchedule` subclass that is not registered
    (or has no `get_config()`) trains as with a plain `keras.Model`; saving
    the model then gives Keras's own error, as it does for a plain model. A
    subclassed optimizer needs only what Keras's own `from_config` needs: a
    `get_config()` that returns its constructor's arguments.
    """
    config = dict(_compat.config_without_learning_rate(template), name=name)
    try:
        optimizer = template.__class__.from_config(config)
    except Exception as error:
        raise TypeError(
            "`optimizer` must be rebuildable from its config: every loss "
            "gets its own copy, made by "
            f"`{type(template).__name__}.from_config(optimizer.get_config())`"
            ", which failed with "
            f"{type(error).__name__}: {error}. Make `get_config()` return "
            "every argument of the optimizer's `__init__`. Received: "
            f"optimizer={template!r}"
        ) from error
    if isinstance(learning_rate, (int, float)):
        optimizer.learning_rate = learning_rate
    else:
        _compat.share_learning_rate(optimizer, learning_rate)
    return optimizer


def _check_loss_scale(loss_scale):
    """`None`, or the dynamic loss scaling options (those of
    `keras.optimizers.LossScaleOptimizer`) with their defaults."""
    if loss_scale is None:
        return None
    if loss_scale is True:
        loss_scale = {}
    options = {"initial_scale": 2.0**15, "dynamic_growth_steps": 2000}
    if not isinstance(loss_scale, dict) or set(loss_scale) - set(options):
        raise ValueError(
            "`loss_scale` must be None, True or a dict with keys "
            f"{sorted(options)}. Received: loss_scale={loss_scale!r}"
        )
    options.update(loss_scale)
    scale, steps = options["initial_scale"], options["dynamic_growth_steps"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (
        scale > 0
    ):
        raise ValueError(
            "`loss_scale['initial_scale']` must be a positive number. "
            f"Received: loss_scale={loss_scale!r}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(
            "`loss_scale['dynamic_growth_steps']` must be a positive integer. "
            f"Received: loss_scale={loss_scale!r}"
        )
    return {"initial_scale": float(scale), "dynamic_growth_steps": steps}
