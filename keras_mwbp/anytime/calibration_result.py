"""`CalibrationResult`: what `keras_mwbp.anytime.calibrate` found."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    """Thresholds of anytime prediction and what they give on the
    calibration data.

    Attributes:
        thresholds: One confidence threshold in [0, 1] per head (the final
            head's entry, 0, is ignored by the routing rule).
        accuracy: Accuracy of the routed predictions on the calibration
            data.
        multiply_adds: Average multiply-adds per sample of the routing on
            the calibration data (convolutions and dense layers, as
            `keras_mwbp.report` counts them; a sample exiting at head `i`
            costs every trunk segment and head up to head `i`).
        temperature: The temperature the logits are divided by (1 unless
            one was given or fit).
        exit_fractions: Fraction of the calibration samples exiting at each
            head; they sum to 1.
        confidence: `"max_prob"` or `"entropy"`.
        final_accuracy: Accuracy of the final head alone on the same data.
        head_accuracies: Accuracy of each head alone.
        exit_costs: Multiply-adds of a sample exiting at each head.
        target: The target that was met, e.g. `{"max_accuracy_drop":
            0.005}`, `{"budget": 1e6}` or `{"shares": [...]}`.
        num_samples: Number of calibration samples.
    """

    thresholds: tuple
    accuracy: float
    multiply_adds: float
    temperature: float
    exit_fractions: tuple
    confidence: str
    final_accuracy: float
    head_accuracies: tuple
    exit_costs: tuple
    target: dict
    num_samples: int

    @property
    def accuracy_drop(self):
        """`final_accuracy - accuracy` (negative when routing is better)."""
        return self.final_accuracy - self.accuracy

    @property
    def speedup(self):
        """Final head's multiply-adds over the routing's average."""
        return self.exit_costs[-1] / self.multiply_adds

    def to_dict(self):
        """The fields (and `accuracy_drop`, `speedup`) as plain Python."""
        result = dataclasses.asdict(self)
        result["thresholds"] = list(self.thresholds)
        result["exit_fractions"] = list(self.exit_fractions)
        result["head_accuracies"] = list(self.head_accuracies)
        result["exit_costs"] = list(self.exit_costs)
        result["accuracy_drop"] = self.accuracy_drop
        result["speedup"] = self.speedup
        return result
