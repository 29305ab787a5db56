"""The paper's training recipe, in one place.

The CIFAR recipe of Guo et al. (2020), Sec. 5, with what the authors' code
adds (Nesterov momentum, coupled weight decay 1e-4): SGD with momentum 0.9,
batch 128, learning rate 0.1 divided by 10 after 40% and 60% of the epochs,
400 epochs, nu = 2. The CLI (`keras-mwbp train`), the examples and the
studies of `experiments/` build their optimizer and schedule here.

Weight decay is coupled, as `torch.optim.SGD`'s: it is the model's
`MultiWayModel(weight_decay=...)`, added to every update's gradient (each
per-loss update of MW-BP), not the decoupled `weight_decay` of a Keras
optimizer.

The constants import without Keras (the CLI's `--help` stays fast); the
functions import it when called.
"""

MOMENTUM = 0.9
NESTEROV = True
WEIGHT_DECAY = 1e-4
LEARNING_RATE = 0.1
BATCH_SIZE = 128
EPOCHS = 400
LR_DROPS = (0.4, 0.6)
NU = 2.0


def learning_rate_schedule(
    steps_per_epoch,
    epochs,
    peak=LEARNING_RATE,
    drops=LR_DROPS,
    warmup_epochs=0,
):
    """The recipe's schedule: `peak`, divided by 10 after each fraction
    `drops` of the training steps; with `warmup_epochs`, a linear warm-up
    to `peak` over that many epochs first.

    Args:
        steps_per_epoch: Optimizer steps per epoch (positive int).
        epochs: Epochs of the run (positive int).
        peak: Learning rate before the first drop.
        drops: Increasing fractions of the run, each in (0, 1].
        warmup_epochs: Non-negative number of warm-up epochs (0: none).

    Returns:
        A `keras_mwbp.WarmupStepDecay`, a function of the step.
    """
    from keras_mwbp.warmup_step_decay import WarmupStepDecay

    total = epochs * steps_per_epoch
    return WarmupStepDecay(
        peak=peak,
        warmup_steps=int(round(warmup_epochs * steps_per_epoch)),
        decay_steps=sorted({int(round(f * total)) for f in drops}),
    )


def sgd(learning_rate=LEARNING_RATE):
    """The recipe's optimizer: SGD with Nesterov momentum 0.9 and no
    decoupled weight decay (the recipe's decay is the model's
    `weight_decay`)."""
    import keras

    return keras.optimizers.SGD(
        learning_rate, momentum=MOMENTUM, nesterov=NESTEROV
    )
