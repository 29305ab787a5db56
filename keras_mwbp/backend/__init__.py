"""The backend-specific primitives of the training step, one module per
Keras backend.

`keras_mwbp.algorithm` is the training step of every method, written once;
it reaches the backend only through the module `get()` returns, which
supplies:

- a `Step` class (`step_class`): record the shared forward pass node by node
  (`forward`, each head's loss with `losses`/`loss`), the gradients of a
  linear combination of the head losses at the current parameters
  (`gradients`, and `multiway_gradients`, which re-linearizes the nodes whose
  parameters the earlier losses of the step updated: paper Eq. 10), and
  `commit_state` (BatchNorm statistics and seed states, once per step);
  JAX's and torch's are `reverse_pass.ReversePassStep` with their own VJPs;
- the ordering and checking helpers of an update (`after`, `token`,
  `control_dependencies`, `all_finite`, `zero_nans`, `first_failure`,
  `snapshot`, `restore_unless`, `assert_finite_step`), `num_replicas` and
  `regularization_gradients` (`all_finite` and `zero_nans` are written once,
  with `keras.ops`, in `numerics.py`, and re-exported by each backend);
- `train_step(model, ...)`, and the hooks of the train-function wrapper
  (`skip_resumed`, `failure_of`, `failure_in`; `keras_mwbp.train_function`
  writes the wrapper once): how Keras's trainer of that backend calls the
  step (TensorFlow: `train_step(data)` on
  variables; JAX: a stateless, jit-compiled `train_step(state, data)`;
  torch: an eager `train_step(data)` on the variables).
"""

import importlib

import keras

SUPPORTED_BACKENDS = ("tensorflow", "jax", "torch")


def check_supported():
    """Raises `ValueError` unless Keras runs on a supported backend."""
    name = keras.backend.backend()
    if name not in SUPPORTED_BACKENDS:
        raise ValueError(
            "MultiWayModel trains on the Keras backends "
            f"{SUPPORTED_BACKENDS}. Received: KERAS_BACKEND={name!r} "
            "(set the KERAS_BACKEND environment variable before importing "
            "keras)."
        )


def get():
    """The primitives module of the current Keras backend."""
    check_supported()
    return importlib.import_module(
        f"keras_mwbp.backend.{keras.backend.backend()}"
    )


def widest_float():
    """`"float64"`, or `"float32"` on JAX without 64-bit types
    (`JAX_ENABLE_X64`), where a float64 variable would be truncated with a
    warning."""
    if keras.backend.backend() == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            return "float32"
    return "float64"
