"""Model zoo: networks with auxiliary heads for multi-way training."""

from keras_mwbp.models.cifar_resnet import CIFAR_RESNET_PRESETS
from keras_mwbp.models.cifar_resnet import cifar_resnet

__all__ = ["CIFAR_RESNET_PRESETS", "cifar_resnet"]
