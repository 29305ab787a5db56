"""Every use of Keras's private API (`keras.src`), in one place.

Checked against Keras 3.12.0 (the oldest declared) and 3.15.1 (the newest
declared); see `pyproject.toml`. Each name below exists, with the behaviour
the project relies on, in both. When a new Keras moves one of them, this is
the only module to change.
"""

from keras.src.losses.losses import LossFunctionWrapper  # noqa: F401
from keras.src.models.functional import functional_from_config  # noqa: F401
from keras.src.models.functional import operation_fn  # noqa: F401
from keras.src.saving import serialization_lib  # noqa: F401
from keras.src.trainers import data_adapters  # noqa: F401
from keras.src.trainers.data_adapters import array_slicing  # noqa: F401
from keras.src.utils import file_utils  # noqa: F401
from keras.src.utils import io_utils  # noqa: F401
from keras.src.utils import tracking  # noqa: F401
