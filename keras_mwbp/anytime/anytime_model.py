"""`AnytimeModel`: a multi-head model that answers each sample at its first
confident head."""

import contextlib

import keras
import numpy as np

from keras_mwbp.anytime import routing


@keras.saving.register_keras_serializable(package="keras_mwbp")
class AnytimeModel(keras.Model):
    """Early-exit inference with a multi-head model.

    A sample exits at the first head `i` whose confidence (see
    `keras_mwbp.anytime.confidence`: by default the top softmax probability
    of the head's logits divided by `temperature`) reaches `thresholds[i]`;
    the final head takes every sample that is left.

    The trunk runs segment by segment (segment `s`: the layers head `s`
    needs that no earlier head needs), each segment only on the samples no
    earlier head has taken: the features they need are gathered, the
    segment runs on that smaller batch, and every sample's logits are
    scattered back to its place in the batch. When no sample is left, the
    remaining segments do not run at all (a `tf.cond` in a TensorFlow
    graph). So a batch of mostly easy inputs costs little more than the
    shallow heads.

    The layers and weights are `model`'s own (shared, not copied). Inference
    only: calling in training mode is refused.

    Args:
        model: A functional `keras.Model` whose outputs are the heads'
            logits, shallowest first, final last; typically a
            `keras_mwbp.MultiWayModel`. At least two heads.
        thresholds: One confidence in [0, 1] per head (the final head's entry
            is ignored), or the `CalibrationResult` of
            `keras_mwbp.anytime.calibrate`, whose `temperature` and
            `confidence` are then used too.
        temperature: Positive float dividing the logits before the softmax.
            Default 1, or the calibration's.
        confidence: `"max_prob"` (default) or `"entropy"`
            (`1 - H(p) / log(num_classes)`), or the calibration's.
        **kwargs: Passed to `keras.Model` (e.g. `name`).

    Example:

    ```python
    result = keras_mwbp.anytime.calibrate(model, (x_val, y_val),
                                          max_accuracy_drop=0.005)
    fast = keras_mwbp.anytime.AnytimeModel(model, result)
    logits = fast.predict(x_test)      # the exit head's logits per sample
    exits = fast.exit_index(x_test)    # and that head's index
    fast.save("anytime.keras")         # thresholds and temperature kept
    ```
    """

    def __init__(self, model, thresholds, temperature=None, confidence=None,
                 **kwargs):
        routing.check_multi_head_model(model)
        calibration = thresholds if hasattr(thresholds, "exit_fractions") else (
            None
        )
        if calibration is not None:
            thresholds = calibration.thresholds
            if temperature is None:
                temperature = calibration.temperature
            if confidence is None:
                confidence = calibration.confidence
        thresholds = routing.check_thresholds(thresholds, len(model.outputs))
        temperature = routing.check_temperature(
            1.0 if temperature is None else temperature
        )
        confidence = routing.check_confidence(
            "max_prob" if confidence is None else confidence
        )
        super().__init__(**kwargs)
        self.base_model = model
        self.thresholds = thresholds
        self.temperature = temperature
        self.confidence = confidence
        self._plan = routing.ExitPlan(model)
        self._returns = "logits"
        self._mode_functions = {}
        self.built = True

    @property
    def num_heads(self):
        return len(self.thresholds)

    @property
    def exit_costs(self):
        """Multiply-adds of a sample exiting at each head (all segments up to
        the head's own; convolutions and dense layers, as
        `keras_mwbp.report` counts them)."""
        return self._plan.exit_costs

    def call(self, inputs, training=False):
        if training:
            raise ValueError(
                "`AnytimeModel` is for inference only; train the wrapped "
                "`base_model`. Received: training=True"
            )
        return self.route(inputs)[0]

    def route(self, inputs):
        """`(logits, exit_index)` of a batch, as tensors.

        Args:
            inputs: A batch of the wrapped model's inputs.

        Returns:
            The exit head's logits `(batch, num_classes)` and the exit head
            of each sample `(batch,)` (int32), in input order.
        """
        if keras.backend.backend() == "jax":
            return self._plan.run_routed_jax(
                inputs, self.thresholds, self.temperature, self.confidence
            )
        with _no_autograd():
            return self._plan.run_routed(
                inputs, self.thresholds, self.temperature, self.confidence
            )

    def compute_output_spec(self, inputs, training=False):
        batch = keras.tree.flatten(inputs)[0].shape[0]
        return keras.KerasTensor(
            (batch, self._plan.num_classes), dtype=self._plan.logits_dtype
        )

    def predict_step(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        logits, exit_index = self.route(x)
        return exit_index if self._returns == "exit_index" else logits

    def make_predict_function(self, force=False):
        # One compiled predict function per output mode (logits or exit
        # index), each built once.
        mode = self._returns
        if not force and mode in self._mode_functions:
            self.predict_function = self._mode_functions[mode]
            return self.predict_function
        self.predict_function = None
        super().make_predict_function(force=True)
        self._mode_functions[mode] = self.predict_function
        return self.predict_function

    def predict(self, x, batch_size=None, verbose="auto", steps=None,
                callbacks=None):
        """Per sample, the logits of the head it exits at (NumPy)."""
        return self._predict_mode(
            "logits", x, batch_size, verbose, steps, callbacks
        )

    def predict_on_batch(self, x):
        """The exit head's logits of one batch (NumPy)."""
        if keras.backend.backend() != "tensorflow":
            return self._eager_predict("logits", x, len(keras.tree.flatten(
                x)[0]))
        self._returns = "logits"
        self.make_predict_function()
        return super().predict_on_batch(x)

    def exit_index(self, x, batch_size=None, verbose=0, steps=None):
        """Per sample, the index of the head it exits at.

        Args:
            x: Inputs, as for `predict`.
            batch_size: As for `predict`.

        Returns:
            Int array `(N,)`: 0 is the shallowest head, `num_heads - 1` the
            final one.
        """
        return np.asarray(
            self._predict_mode("exit_index", x, batch_size, verbose, steps,
                               None)
        ).astype("int64")

    def _predict_mode(self, mode, x, batch_size, verbose, steps, callbacks):
        if keras.backend.backend() != "tensorflow":
            # JAX compiles `predict_step` whole with static shapes, which the
            # data-dependent gathers cannot have: route batch by batch,
            # eagerly.
            return self._eager_predict(mode, x, batch_size or 32)
        self._returns = mode
        self.make_predict_function()
        try:
            return super().predict(
                x, batch_size=batch_size, verbose=verbose, steps=steps,
                callbacks=callbacks,
            )
        finally:
            self._returns = "logits"
            self.make_predict_function()

    def export(self, filepath, format="tf_saved_model", verbose=None,
               input_signature=None, static=False):
        """Exports the routing for serving (TensorFlow backend).

        Args:
            filepath: Directory of the SavedModel, or the `.tflite` file.
            format: `"tf_saved_model"` (TF Serving; endpoint `serve`) or
                `"tflite"`.
            verbose: Whether to print the endpoint summary (SavedModel).
            input_signature: `tf.TensorSpec`s of the inputs; default: the
                wrapped model's inputs with a free batch dimension.
            static: `False` (default): true early exit, a `tf.cond` per
                stage skips the rest of the network once no sample is left,
                so a batch-1 request stops at its exit head. `True`: every
                exit is computed and the routing selects among them (fixed
                shapes, no control flow). See `keras_mwbp.anytime.serving`
                for when to pick which.

        Returns:
            `filepath`. The export returns `{"logits": ..., "exit_index":
            ...}`.
        """
        from keras_mwbp.anytime import serving

        if format == "tf_saved_model":
            return serving.export_saved_model(
                self, filepath, static=static,
                input_signature=input_signature, verbose=bool(verbose),
            )
        if format == "tflite":
            return serving.export_tflite(
                self, filepath, static=static, input_signature=input_signature
            )
        raise ValueError(
            '`format` must be "tf_saved_model" or "tflite". Received: '
            f"format={format!r}"
        )

    def _eager_predict(self, mode, x, batch_size):
        pick = 1 if mode == "exit_index" else 0
        if hasattr(x, "element_spec") or not isinstance(
            x, (np.ndarray, list, tuple)
        ) and not hasattr(x, "shape"):
            batches = (
                keras.utils.unpack_x_y_sample_weight(element)[0]
                for element in x
            )
        else:
            flat = keras.tree.flatten(x)
            size = len(flat[0])
            batches = (
                keras.tree.map_structure(
                    lambda a: a[start:start + batch_size], x
                )
                for start in range(0, size, batch_size)
            )
        outputs = [
            np.asarray(keras.ops.convert_to_numpy(self.route(batch)[pick]))
            for batch in batches
        ]
        return np.concatenate(outputs)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "model": keras.saving.serialize_keras_object(self.base_model),
            "thresholds": list(self.thresholds),
            "temperature": self.temperature,
            "confidence": self.confidence,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(
            config.pop("model"), custom_objects=custom_objects
        )
        trainable = config.pop("trainable", True)
        instance = cls(model, **config)
        instance.trainable = trainable
        return instance


def _no_autograd():
    """On torch, no autograd graph for the routing (inference only; Keras's
    own `predict` runs under `torch.no_grad()` too): faster, less memory."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()
