"""Anytime prediction: each sample exits at its first confident head.

```python
from keras_mwbp import anytime

result = anytime.calibrate(model, (x_val, y_val), max_accuracy_drop=0.005)
fast = anytime.AnytimeModel(model, result)   # a keras.Model
logits = fast.predict(x)                     # the exit head's logits
exits = fast.exit_index(x)                   # the exit head's index
fast.export("served", static=False)          # TF SavedModel, tf.cond per stage
print(anytime.format_curve(anytime.curve(model, (x_test, y_test))))
```
"""

from keras_mwbp.anytime.anytime_model import AnytimeModel
from keras_mwbp.anytime.calibration import calibrate
from keras_mwbp.anytime.calibration import fit_temperature
from keras_mwbp.anytime.calibration import geometric_shares
from keras_mwbp.anytime.calibration_result import CalibrationResult
from keras_mwbp.anytime.curve import curve
from keras_mwbp.anytime.curve import format_curve
from keras_mwbp.anytime.curve import plot_curve
from keras_mwbp.anytime.routing import CONFIDENCES
from keras_mwbp.anytime.routing import confidence

__all__ = [
    "AnytimeModel",
    "CONFIDENCES",
    "CalibrationResult",
    "calibrate",
    "confidence",
    "curve",
    "format_curve",
    "plot_curve",
    "fit_temperature",
    "geometric_shares",
]
