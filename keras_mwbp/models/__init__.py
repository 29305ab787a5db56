"""Model zoo: networks with auxiliary heads for multi-way training."""

from keras_mwbp.models.cifar_resnet import CIFAR_RESNET_PRESETS
from keras_mwbp.models.cifar_resnet import cifar_resnet
from keras_mwbp.models.densenet import densenet_bc
from keras_mwbp.models.mobilenet_v2 import MOBILENET_V2_CIFAR_CONFIG
from keras_mwbp.models.mobilenet_v2 import cifar_mobilenet_v2
from keras_mwbp.models.preact_resnet import PREACT_RESNET_PRESETS
from keras_mwbp.models.preact_resnet import preact_resnet
from keras_mwbp.models.resnext import resnext29
from keras_mwbp.models.wide_resnet import wide_resnet

__all__ = [
    "CIFAR_RESNET_PRESETS",
    "MOBILENET_V2_CIFAR_CONFIG",
    "PREACT_RESNET_PRESETS",
    "cifar_mobilenet_v2",
    "cifar_resnet",
    "densenet_bc",
    "preact_resnet",
    "resnext29",
    "wide_resnet",
]
