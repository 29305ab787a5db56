"""A few training steps on one fixed batch, for the smoke tests of whole
networks (the zoo, `attach_heads`): every weight moves and every head's loss
falls.

The first step's logged losses come from the forward pass before any update,
so they cannot show that training works; the losses of later steps can.
"""

import keras
import numpy as np

# Adam's steps have about the learning rate's size whatever the gradient's
# scale, so a few of them lower the loss of a fixed batch in every network
# (SGD at one rate overshot on some heads and crawled on others).
STEPS = 6
LEARNING_RATE = 1e-3


def fit_fixed_batch(model, x, y, steps=STEPS, learning_rate=LEARNING_RATE,
                    metrics=None, run_eagerly=False):
    """Compiles `model` (Adam, sparse cross-entropy on logits; eager with
    `run_eagerly`) and fits `steps` epochs of the single batch `(x, y)`.

    Returns:
        `(history, moved)`: the History dict (one entry per step, each the
        loss before that step's update) and `{variable path: whether it
        changed}` for every trainable variable.
    """
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=metrics,
        run_eagerly=run_eagerly,
    )
    before = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    history = model.fit(x, y, batch_size=len(x), epochs=steps, shuffle=False,
                        verbose=0).history
    moved = {
        v.path: not np.array_equal(keras.ops.convert_to_numpy(v), b)
        for v, b in zip(model.trainable_variables, before)
    }
    return history, moved


def assert_learns(model, x, y, steps=STEPS, learning_rate=LEARNING_RATE,
                  metrics=None, run_eagerly=False):
    """Every trainable variable moved and every head's loss (and the
    objective) is lower after `steps - 1` updates than before the first.

    Returns:
        The History dict.
    """
    history, moved = fit_fixed_batch(model, x, y, steps, learning_rate,
                                     metrics, run_eagerly)
    unmoved = [path for path, changed in moved.items() if not changed]
    assert moved and not unmoved, f"weights that did not move: {unmoved}"
    for key in [f"{name}_loss" for name in model.output_names] + ["loss"]:
        losses = history[key]
        assert len(losses) == steps, key
        assert np.isfinite(losses).all(), f"{key}: {losses}"
        assert losses[-1] < losses[0], f"{key} did not fall: {losses}"
    return history
