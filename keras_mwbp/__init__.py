"""keras_mwbp: Multi-way backpropagation for Keras 3.

Train a network with auxiliary heads so that every intermediate model is
good, with the exact update of Guo et al., "Multi-way backpropagation for
training compact deep neural networks" (Neural Networks, 2020).

The names below and the submodules (`keras_mwbp.models`,
`keras_mwbp.callbacks`, `keras_mwbp.report`, `keras_mwbp.data`, ...) load on
first use (PEP 562), so that `import keras_mwbp` alone, and the
`keras-mwbp --help` command, do not import TensorFlow. The classes that
`.keras` files name (`MultiWayModel`, `MultiWayOptimizer` and the callbacks)
are registered with Keras as soon as Keras is imported, before or after
`import keras_mwbp`, so `keras.saving.load_model` finds them.
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.2.0"

# Public name -> the module that defines it.
_NAMES = {
    "AdaptiveNu": "keras_mwbp.callbacks",
    "AngularMarginLoss": "keras_mwbp.angular_margin_loss",
    "CosineLogits": "keras_mwbp.cosine_logits",
    "METHODS": "keras_mwbp.multi_way_model",
    "MultiWayModel": "keras_mwbp.multi_way_model",
    "MultiWayOptimizer": "keras_mwbp.multi_way_optimizer",
    "attach_heads": "keras_mwbp.attach",
    "gammas_from_depths": "keras_mwbp.weighting",
    "place_heads": "keras_mwbp.placement",
    "train_heads": "keras_mwbp.head_training",
    "WarmupStepDecay": "keras_mwbp.warmup_step_decay",
}
# The modules whose import registers the classes saved in `.keras` files.
_REGISTERING = (
    "keras_mwbp.multi_way_model",
    "keras_mwbp.angular_margin_loss",
    "keras_mwbp.cosine_logits",
    "keras_mwbp.callbacks",
    "keras_mwbp.anytime.anytime_model",
    "keras_mwbp.warmup_step_decay",
)

__all__ = sorted(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(
        f"{__name__}.{name}"
    ):
        return importlib.import_module(f"{__name__}.{name}")  # A submodule.
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    import pkgutil

    submodules = {m.name for m in pkgutil.iter_modules(__path__)}
    return sorted(set(globals()) | set(_NAMES) | submodules)


def _register_with_keras():
    for module in _REGISTERING:
        importlib.import_module(module)  # Registers as it is imported.


class _RegisterWhenKerasLoads(importlib.abc.MetaPathFinder):
    """Registers keras_mwbp's classes once `keras` is imported.

    Finds `keras` and keras_mwbp's own modules as the other finders do, and
    wraps their loaders. The registering modules are imported when `keras`
    has finished loading and no keras_mwbp module is still being imported:
    a module of ours that imports `keras` first (`import keras_mwbp.report`
    in a fresh interpreter) is finished before the registering modules,
    which import it, run. Removes itself once that is done.
    """

    _busy = False

    def __init__(self):
        self.importing = 0  # keras_mwbp modules being imported.
        self.keras_loaded = False

    def find_spec(self, fullname, path=None, target=None):
        if self._busy or not (
            fullname == "keras" or fullname.startswith(__name__ + ".")
        ):
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _ThenRegister(spec.loader, self, fullname == "keras")
        return spec

    def module_done(self):
        if self.keras_loaded and not self.importing and self in sys.meta_path:
            sys.meta_path.remove(self)
            _register_with_keras()


class _ThenRegister(importlib.abc.Loader):
    def __init__(self, loader, finder, is_keras):
        self._loader = loader
        self._finder = finder
        self._is_keras = is_keras

    def __getattr__(self, name):  # get_resource_reader, is_package, ...
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        finder = self._finder
        if self._is_keras:
            self._loader.exec_module(module)
            finder.keras_loaded = True
        else:
            finder.importing += 1
            try:
                self._loader.exec_module(module)
            finally:
                finder.importing -= 1
        finder.module_done()


if "keras" in sys.modules:
    _register_with_keras()
else:
    sys.meta_path.insert(0, _RegisterWhenKerasLoads())
