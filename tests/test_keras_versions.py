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


# A private name Keras defines: `self._x = `, `def _x(` or a class-level
# `_x = ` anywhere in its source; and where keras_mwbp reads or writes one:
# `obj._x` or `getattr(obj, "_x"` (hasattr, setattr, object.__setattr__).
_DEFINED = (r"self\.(_[a-z]\w*)\s*=(?!=)", r"def (_[a-z]\w*)\(",
            r"^\s+(_[a-z]\w*)\s*=(?!=)")
_USED = r"[\w)\]]\.(_[a-z]\w*)\b|attr\([\w.]+, \"(_[a-z]\w*)\""


def _keras_private_names():
    source = pathlib.Path(keras.__file__).resolve().parent / "src"
    names = set()
    for path in source.rglob("*.py"):
        text = path.read_text(errors="replace")
        for pattern in _DEFINED:
            names.update(re.findall(pattern, text, re.M))
    return names


def test_only_the_compat_module_touches_private_keras_attributes():
    """No module but `_compat` reads, writes or calls a private name of
    Keras's (a name Keras's source defines), on this Keras: keras_mwbp's own
    private names are chosen apart from Keras's, so that none can be taken
    for Keras's. Overrides of Keras's private methods are listed in
    `_compat.OVERRIDDEN_PRIVATE_METHODS` (checked below)."""
    from keras_mwbp import _compat

    keras_names = _keras_private_names()
    overridden = {name for _, name in _compat.OVERRIDDEN_PRIVATE_METHODS}
    uses = sorted(
        f"{path.relative_to(PACKAGE)}:{number}: {name}"
        for path in PACKAGE.rglob("*.py") if path.name != "_compat.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        for match in re.finditer(_USED, line)
        for name in [match.group(1) or match.group(2)]
        if name in keras_names and name not in overridden
    )
    assert uses == []


@tensorflow_only  # One of them is the TensorFlow trainer's.
def test_the_private_methods_keras_mwbp_overrides_exist_on_this_keras():
    from keras_mwbp import _compat

    import importlib

    for owner, name in _compat.OVERRIDDEN_PRIVATE_METHODS:
        module, class_name = owner.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), class_name)
        assert callable(cls.__dict__.get(name)), (owner, name)


def test_the_compat_accessors_reach_keras_private_api_on_this_keras():
    """Each `_compat` accessor on a real model, optimizer and callbacks of
    this Keras: what it returns, not only that it runs."""
    import numpy as np

    from keras_mwbp import _compat

    inputs = keras.Input((3,), name="x")
    hidden = keras.layers.Dense(4, name="d")(inputs)
    summed = keras.layers.Add(name="add")([hidden, hidden])
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(summed))
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    assert [tuple(v.shape) for v in _compat.standardize_inputs(
        model, {"x": np.zeros((2, 3), "float32")})] == [(2, 3)]
    depths = _compat.nodes_by_depth(model)
    assert sorted(n.operation.name for ns in depths.values() for n in ns
                  if not n.is_input) == ["add", "d", "out"]
    assert _compat.nodes_by_depth(model.get_layer("d")) is None
    assert _compat.producing_node(summed).operation is model.get_layer("add")
    assert _compat.producing_node(np.zeros(2)) is None
    assert [layer.name for layer in _compat.sublayers(model)] == [
        "x", "d", "add", "out"]
    assert _compat.merges_by_adding(model.get_layer("add"))
    assert _compat.call_context_args(object()) == ()
    assert "training" in _compat.call_context_args(keras.layers.Dropout(0.5))
    model.fit(np.zeros((4, 3), "float32"), np.zeros(4, "int32"), verbose=0)
    assert float(_compat.loss_tracker(model).count) > 0
    assert _compat.initial_epoch(model) is None
    _compat.set_initial_epoch(model, 3)
    assert _compat.initial_epoch(model) == 3
    optimizer = model.optimizer
    before = int(optimizer.iterations)
    _compat.count_iteration(optimizer)
    assert int(optimizer.iterations) == before + 1
    assert any(v is optimizer.iterations for v in _compat.own_variables(optimizer))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=2)
    assert _compat.loss_function_kwargs(loss)["ignore_class"] == 2
    assert _compat.loss_function_kwargs(lambda y, p: y) == {}
    sequential = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert _compat.nodes_by_depth(_compat.sequential_graph(sequential)) is not None
    checkpoint = keras.callbacks.ModelCheckpoint("/tmp/m_{epoch}.keras")
    assert _compat.checkpoint_file_path(checkpoint, 4, None, {}) == "/tmp/m_5.keras"
    assert _compat.callback_model(checkpoint) is None
    checkpoint.set_model(model)
    assert _compat.callback_model(checkpoint) is model
    backup = keras.callbacks.BackupAndRestore("/tmp/backup_dir_unused")
    assert _compat.training_metadata_path(backup).startswith("/tmp/backup_dir_unused")
    assert _compat.training_metadata_path(checkpoint) is None


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
