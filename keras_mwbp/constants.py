"""The names and numbers the library, the CLI and the tests share, in one place.

This module imports nothing (no Keras, no NumPy), so that the CLI can build
its parser and answer `--help` without loading TensorFlow. Every other module
reads these values from here; none keeps a copy.
"""

#: The training methods of `MultiWayModel(method=...)`: standard BP (the
#: final loss alone), Joint BP (one update of the weighted sum), Relay BP,
#: and the per-loss methods (one backward pass and update per loss).
METHODS = (
    "standard",
    "joint",
    "relay",
    "mwbp",
    "reverse_mwbp",
    "naive_mwbp",
    "naive_reverse_mwbp",
)

#: The per-loss methods: one optimizer and one update per loss, in this
#: order of the losses (reverse: the final loss first).
MULTIWAY_METHODS = ("mwbp", "reverse_mwbp", "naive_mwbp", "naive_reverse_mwbp")

#: `MultiWayModel(weighting=...)`: how gamma_i scales each loss's update
#: (docs/methods.md).
WEIGHTINGS = ("paper", "reference_code")

#: `MultiWayModel(nan_policy=...)`: what a step with a non-finite loss or
#: gradient does.
NAN_POLICIES = ("raise", "skip_step", "zero")

#: The names `keras_mwbp.data.load` accepts.
DATASETS = ("digits", "mnist1d", "cifar10", "cifar100", "svhn_cropped")

#: The names `keras_mwbp.data.load` reads from a local tensorflow-datasets
#: copy.
TFDS_DATASETS = ("cifar10", "cifar100", "svhn_cropped")

#: Residual blocks per stage of `keras_mwbp.models.cifar_resnet`, for each
#: depth `6n + 2` of He et al.
CIFAR_RESNET_PRESETS = {
    8: 1,
    14: 2,
    20: 3,
    32: 5,
    44: 7,
    56: 9,
    110: 18,
    1202: 200,
}

#: The depths `cifar_resnet(depth=...)` (and the CLI's `--depth`) accept.
RESNET_DEPTHS = tuple(sorted(CIFAR_RESNET_PRESETS))
