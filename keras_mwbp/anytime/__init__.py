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

The names load on first use (PEP 562), so that `keras-mwbp --help` does
not import Keras through `keras_mwbp.anytime.cli`. `AnytimeModel` is
registered with Keras as soon as this package is imported, if Keras is
already imported, and otherwise when it is first used.
"""

import importlib
import sys

# Public name -> the module that defines it.
_NAMES = {
    "AnytimeModel": "keras_mwbp.anytime.anytime_model",
    "CONFIDENCES": "keras_mwbp.anytime.routing",
    "CalibrationResult": "keras_mwbp.anytime.calibration_result",
    "calibrate": "keras_mwbp.anytime.calibration",
    "confidence": "keras_mwbp.anytime.routing",
    "curve": "keras_mwbp.anytime.curve",
    "fit_temperature": "keras_mwbp.anytime.calibration",
    "format_curve": "keras_mwbp.anytime.curve",
    "geometric_shares": "keras_mwbp.anytime.calibration",
    "plot_curve": "keras_mwbp.anytime.curve",
}

__all__ = sorted(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_NAMES))


if "keras" in sys.modules:  # Register AnytimeModel for `.keras` loading.
    importlib.import_module("keras_mwbp.anytime.anytime_model")
