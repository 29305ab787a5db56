"""Keras's train function of a `MultiWayModel`, wrapped once for every
backend.

The wrapper does two things around each call of Keras's train function:

- While a restored in-epoch backup has batches to skip
  (`keras_mwbp.resume`), it draws them from the data without training.
- When a `nan_policy="raise"` check failed (the step already undone), it
  raises a `FloatingPointError` naming the step and the head
  (`keras_mwbp.nan_policy.nonfinite_message`).

How each backend's train function is called, skips and reports a failure
differs; the backend module supplies three hooks:

- `skip_resumed(model, *args)`: the call's result while batches are
  skipped (JAX also hands back its carried state);
- `failure_of(error)`: `(step, head)` if `error` is the backend's report of
  a failed check (TensorFlow's graph assertion, torch's exception), else
  None;
- `failure_in(model, result)`: `(step, head)` if the call's result reports
  a failed check (JAX's jit-compiled step returns its report), else None.
"""

from keras_mwbp.nan_policy import nonfinite_message


def wrap(model, function, backend):
    """`function` (Keras's train function of `model`), wrapped.

    Args:
        model: The `MultiWayModel`.
        function: Keras's train function for `model`'s backend.
        backend: The backend module (`keras_mwbp.backend.get()`).

    Returns:
        The wrapped function, with the same arguments and result.
    """

    def train_function(*args):
        if model._batches_to_skip > 0:
            return backend.skip_resumed(model, *args)
        try:
            result = function(*args)
        except Exception as error:
            failure = backend.failure_of(error)
            if failure is None:
                raise
        else:
            failure = backend.failure_in(model, result)
            if failure is None:
                return result
        raise FloatingPointError(
            nonfinite_message(model.output_names, *failure)
        )

    return train_function
