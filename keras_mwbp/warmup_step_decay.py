"""`WarmupStepDecay`: linear warm-up, then the rate divided by 10 at steps."""

import keras


@keras.saving.register_keras_serializable(package="keras_mwbp")
class WarmupStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak`, then the rate divided by 10 at boundaries.

    Step `s` (0-based, counted in optimizer steps) gets
    `peak * (s + 1) / warmup_steps` while `s < warmup_steps`, then
    `peak * 0.1 ** k` where `k` is the number of `decay_steps` that are
    `<= s`.

    Args:
        peak: Positive rate reached at the end of the warm-up.
        warmup_steps: Non-negative int; `0` means no warm-up.
        decay_steps: Strictly increasing step indices where the rate is
            divided by 10.
    """

    def __init__(self, peak, warmup_steps, decay_steps):
        if not peak > 0:
            raise ValueError(f"`peak` must be positive. Received: peak={peak!r}")
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ValueError(
                "`warmup_steps` must be a non-negative integer. "
                f"Received: warmup_steps={warmup_steps!r}"
            )
        decay_steps = [int(s) for s in decay_steps]
        if any(b <= a for a, b in zip(decay_steps, decay_steps[1:])):
            raise ValueError(
                "`decay_steps` must be strictly increasing. "
                f"Received: decay_steps={decay_steps!r}"
            )
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.decay_steps = decay_steps

    def __call__(self, step):
        ops = keras.ops
        step = ops.cast(step, "float32")
        rate = ops.convert_to_tensor(self.peak, "float32")
        for boundary in self.decay_steps:
            rate = ops.where(step >= boundary, rate * 0.1, rate)
        if self.warmup_steps:
            warm = self.peak * (step + 1.0) / float(self.warmup_steps)
            rate = ops.where(step < self.warmup_steps, warm, rate)
        return rate

    def get_config(self):
        return {
            "peak": self.peak,
            "warmup_steps": self.warmup_steps,
            "decay_steps": list(self.decay_steps),
        }
