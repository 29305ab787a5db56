"""keras_mwbp: Multi-way backpropagation for Keras 3.

Train a network with auxiliary heads so that every intermediate model is
good, with the exact update of Guo et al., "Multi-way backpropagation for
training compact deep neural networks" (Neural Networks, 2020).
"""

from keras_mwbp.attach import attach_heads
from keras_mwbp.callbacks import AdaptiveNu
from keras_mwbp.multi_way_model import METHODS
from keras_mwbp.multi_way_model import MultiWayModel
from keras_mwbp.multi_way_optimizer import MultiWayOptimizer
from keras_mwbp.placement import place_heads
from keras_mwbp.train_heads import train_heads
from keras_mwbp.weighting import gammas_from_depths

__version__ = "0.1.0"

__all__ = [
    "AdaptiveNu",
    "METHODS",
    "MultiWayModel",
    "MultiWayOptimizer",
    "attach_heads",
    "gammas_from_depths",
    "place_heads",
    "train_heads",
]
