"""The declared Keras range (3.12 to 3.15): private API in one module, and
layer attributes that older Keras versions lack read with a default."""

import pathlib
import re
import types

import keras
import pytest

from conftest import tensorflow_only

pytestmark = pytest.mark.oldest_keras()

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "keras_mwbp"


def test_only_the_compat_module_uses_private_keras_api():
    users = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "_compat.py"
        and re.search(r"\bkeras\.src\b", path.read_text())
    )
    assert users == []


@tensorflow_only
def test_the_fused_batch_norm_check_reads_renorm_with_a_default():
    """Keras 3.12's BatchNormalization has no `renorm` attribute; the
    fused-kernel check read it (AttributeError in every float32 BatchNorm
    step of Keras 3.12). Keras 3.15's own `call` reads it, so the layer is
    not called here: the check is, on a layer without the attribute. (CI
    also runs the zoo's BatchNorm networks under Keras 3.12 itself.)"""
    import tensorflow as tf

    from keras_mwbp.backend import tensorflow as tf_backend

    layer = keras.layers.BatchNormalization()
    layer.build((None, 4, 4, 2))
    node = types.SimpleNamespace(operation=layer)
    x = tf.zeros((2, 4, 4, 2))
    assert tf_backend._fused_batch_norm_applies(node, (x,), {}) is True
    if "renorm" in layer.__dict__:  # Keras 3.12 has none to remove.
        object.__delattr__(layer, "renorm")
    assert not hasattr(layer, "renorm")
    assert tf_backend._fused_batch_norm_applies(node, (x,), {}) is True
    layer.renorm = True  # A layer that has it and uses it: not fused.
    assert tf_backend._fused_batch_norm_applies(node, (x,), {}) is False
