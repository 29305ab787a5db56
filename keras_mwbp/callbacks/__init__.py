"""Keras callbacks for `keras_mwbp.MultiWayModel`."""

from keras_mwbp.callbacks.adaptive_nu import AdaptiveNu
from keras_mwbp.callbacks.backup_and_restore import BackupAndRestore
from keras_mwbp.callbacks.model_checkpoint import ModelCheckpoint
from keras_mwbp.callbacks.progbar_logger import ProgbarLogger
from keras_mwbp.callbacks.tensorboard import TensorBoard

__all__ = [
    "AdaptiveNu",
    "BackupAndRestore",
    "ModelCheckpoint",
    "ProgbarLogger",
    "TensorBoard",
]
