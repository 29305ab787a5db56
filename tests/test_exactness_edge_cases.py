"""Exactness at the edges: three cases where a wrong step would still train,
so that only a comparison with an independent computation tells.

Each part was written against a mutation of the code that the rest of the
suite did not notice:

- The TensorFlow backend's fused-BatchNorm shortcut taken for a frozen
  BatchNormalization (which normalises with its moving statistics, not the
  batch's) or for one over a non-last axis. A float32 MW-BP run (fused
  kernels where they apply) is compared with the same run in float64 (never
  fused).
- `nan_policy="zero"` not zeroing the NaN gradient entries of the per-loss
  updates (mwbp and the other per-loss methods), compared with a NumPy hand
  computation.
- A head layer shared between two outputs: the loss's own gradient enters
  through its output node, which an earlier loss of the step updated (so it
  is re-linearized). Compared with a NumPy hand computation of MW-BP and
  reverse MW-BP.
"""

import contextlib

import keras
import numpy as np
import pytest

import reference_numpy as ref
from _reference_harness import float64_dtype
from conftest import tensorflow_only

import keras_mwbp

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

L = keras.layers
GAMMAS = (0.5, 1.0)
LR = 0.1
PER_LOSS_METHODS = ("mwbp", "reverse_mwbp", "naive_mwbp",
                    "naive_reverse_mwbp")


def numpy_weights(model):
    """`{variable.path: float64 array}` of every weight of `model`'s
    layers."""
    return {
        v.path: np.array(keras.ops.convert_to_numpy(v), dtype=np.float64)
        for layer in model.layers
        for v in layer.weights
    }


def set_layer_weights(model, values):
    """Sets each layer's weights from `{layer name: [arrays]}` (cast to the
    layer's dtype by Keras)."""
    for name, arrays in values.items():
        model.get_layer(name).set_weights(arrays)


# ---------------------------------------------------------------------------
# Fused BatchNorm: frozen layer, non-last axis
# ---------------------------------------------------------------------------
BN_INPUT = (4, 4, 2)
BN_CHANNELS = 4  # = height = width: a fused kernel over the wrong axis
#                  runs without a shape error and gives wrong numbers.


def bn_net(kind):
    """x (4x4x2) -> c1 -> bn -> relu -> c2 -> relu -> [pool -> h0];
    -> c3 -> relu -> pool -> final.

    Loss 0 updates c1 and c2, so loss 1 re-linearizes c2, bn and c1 (bn lies
    below an updated layer). `kind`: "frozen" (bn.trainable = False),
    "axis1" (bn normalises over the height axis), "plain" (trainable,
    channels last: the fused kernel's own case).
    """
    inputs = keras.Input(BN_INPUT)
    x = L.Conv2D(BN_CHANNELS, 3, padding="same", name="c1")(inputs)
    bn = L.BatchNormalization(axis=1 if kind == "axis1" else -1, name="bn")
    x = L.ReLU()(bn(x))
    a1 = L.Conv2D(BN_CHANNELS, 3, padding="same", activation="relu",
                  name="c2")(x)
    h0 = L.Dense(3, name="h0")(L.GlobalAveragePooling2D()(a1))
    a2 = L.Conv2D(BN_CHANNELS, 3, padding="same", activation="relu",
                  name="c3")(a1)
    final = L.Dense(3, name="final")(L.GlobalAveragePooling2D()(a2))
    if kind == "frozen":
        bn.trainable = False
    model = keras_mwbp.MultiWayModel(inputs, [h0, final], method="mwbp",
                                     head_weights=list(GAMMAS))
    model.compile(
        optimizer=keras.optimizers.SGD(LR, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def bn_initial_weights(seed=0):
    """Layer weights by name; BatchNorm scale, offset and moving statistics
    away from 1, 0, 0, 1 (a frozen layer normalises with the moving ones)."""
    rng = np.random.default_rng(seed)

    def conv(cin):
        return [rng.normal(scale=0.4, size=(3, 3, cin, BN_CHANNELS)),
                rng.normal(scale=0.1, size=BN_CHANNELS)]

    def dense():
        return [rng.normal(scale=0.5, size=(BN_CHANNELS, 3)),
                rng.normal(scale=0.1, size=3)]

    return {
        "c1": conv(BN_INPUT[-1]),
        "c2": conv(BN_CHANNELS),
        "c3": conv(BN_CHANNELS),
        "h0": dense(),
        "final": dense(),
        "bn": [rng.uniform(0.5, 1.5, BN_CHANNELS),
               rng.normal(scale=0.2, size=BN_CHANNELS),
               rng.normal(scale=0.5, size=BN_CHANNELS),
               rng.uniform(0.5, 2.0, BN_CHANNELS)],
    }


def bn_batches(num=2, seed=1):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(8,) + BN_INPUT), rng.integers(0, 3, 8))
            for _ in range(num)]


def bn_run(kind, float64):
    """Two MW-BP steps from `bn_initial_weights()`; the weights after."""
    if float64:
        with float64_dtype():
            model = bn_net(kind)
    else:
        model = bn_net(kind)
    set_layer_weights(model, bn_initial_weights())
    dtype = "float64" if float64 else "float32"
    for x, y in bn_batches():
        model.train_on_batch(x.astype(dtype), y)
    return model, numpy_weights(model)


def largest_difference(actual, expected):
    assert actual.keys() == expected.keys()
    return max(float(np.max(np.abs(actual[k] - expected[k])))
               for k in expected)


@tensorflow_only
@pytest.mark.parametrize("kind", ["frozen", "axis1", "plain"])
def test_float32_batch_norm_shortcut_matches_float64(kind):
    """float32 and float64 MW-BP agree to float32 round-off (measured: at
    most about 1e-7 here) with a frozen BatchNorm and one over a non-last
    axis, which the fused kernel cannot express. "plain" is the case the
    fused kernel is for."""
    model32, after32 = bn_run(kind, float64=False)
    model64, after64 = bn_run(kind, float64=True)
    assert model64.get_layer("bn").moving_mean.dtype == "float64"
    bn = model32.get_layer("bn")
    assert bn.trainable == (kind != "frozen")
    assert bn.axis in ((1,) if kind == "axis1" else (-1, 3))
    # The step moved every trainable weight by far more than the bound.
    initial = bn_initial_weights()
    assert np.max(np.abs(after64[model64.get_layer("c1").kernel.path]
                         - initial["c1"][0])) > 1e-3
    difference = largest_difference(after32, after64)
    assert difference < 2e-6, f"{kind}: float32 vs float64 {difference:.3g}"


# ---------------------------------------------------------------------------
# nan_policy="zero" in the per-loss methods
# ---------------------------------------------------------------------------
NAN_INPUT = 3


def nan_net(method):
    """x (3) -> t (Dense 2, no bias) -> where(isnan, 0, .) -> u (Dense 2, no
    bias) -> aux and final (Dense 1 each, no bias); MSE, gammas (0.5, 1),
    plain SGD.

    A NaN in x gives finite losses and NaN entries only in t's gradient (the
    row of the NaN feature), for every loss. Both heads tap u's output, so
    the second loss of a step back-propagates through u, which the first
    one updated (the per-loss methods differ from joint).
    """
    keras.utils.set_random_seed(0)
    inputs = keras.Input((NAN_INPUT,), name="x")
    h = L.Dense(2, use_bias=False, name="t")(inputs)
    z = keras.ops.where(keras.ops.isnan(h), keras.ops.zeros_like(h), h)
    v = L.Dense(2, use_bias=False, name="u")(z)
    aux = L.Dense(1, use_bias=False, name="aux")(v)
    final = L.Dense(1, use_bias=False, name="final")(v)
    model = keras_mwbp.MultiWayModel(
        inputs, [aux, final], method=method, head_weights=list(GAMMAS),
        nan_policy="zero",
    )
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    return model


NAN_LAYERS = ("t", "u", "aux", "final")
NAN_HEADS = ("aux", "final")


def nan_forward(p, x):
    """The stored features of `nan_net` at parameters `p`."""
    with np.errstate(invalid="ignore"):
        h = x @ p["t"]
    mask = np.isnan(h)
    z = np.where(mask, 0.0, h)
    v = z @ p["u"]
    return {"x": x, "mask": mask, "z": z, "v": v,
            "outputs": [v @ p["aux"], v @ p["final"]]}


def nan_backward(p, features, head, y, zero=True):
    """Head `head`'s gamma-weighted MSE gradient at the current parameters
    `p` and the stored `features`, NaN entries set to 0 ("zero") unless
    `zero` is False."""
    n = len(y)
    w = NAN_HEADS[head]
    d_out = GAMMAS[head] * 2.0 / n * (features["outputs"][head] - y)
    d_v = d_out @ p[w].T
    d_z = d_v @ p["u"].T
    d_h = np.where(features["mask"], 0.0, d_z)
    with np.errstate(invalid="ignore"):
        grads = {w: features["v"].T @ d_out, "u": features["z"].T @ d_v,
                 "t": features["x"].T @ d_h}
    if not zero:
        return grads
    return {k: np.where(np.isnan(g), 0.0, g) for k, g in grads.items()}


def nan_expected_step(method, p, x, y):
    """One step of `method` by hand (plain SGD, per-loss updates)."""
    p = {k: v.copy() for k, v in p.items()}
    order = [1, 0] if "reverse" in method else [0, 1]
    stored = nan_forward(p, x)
    for head in order:
        features = nan_forward(p, x) if method.startswith("naive") else stored
        for name, grad in nan_backward(p, features, head, y).items():
            p[name] = p[name] - LR * grad
    return p


def nan_batch():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, NAN_INPUT))
    y = rng.normal(size=(8, 1))
    x[2, 0] = np.nan  # Row 0 of t's gradient is NaN, for both losses.
    return x, y


def kernels(model):
    return {name: np.array(model.get_layer(name).kernel.numpy(), np.float64)
            for name in NAN_LAYERS}


@pytest.mark.parametrize("method", PER_LOSS_METHODS)
def test_zero_policy_zeroes_nan_entries_of_every_per_loss_update(method):
    model = nan_net(method)
    x, y = nan_batch()
    before = kernels(model)
    expected = nan_expected_step(method, before, x, y)
    # Without the policy both losses' t gradients have a NaN row 0, and only
    # that row.
    for head in (0, 1):
        raw = nan_backward(before, nan_forward(before, x), head, y,
                           zero=False)
        assert np.isnan(raw["t"][0]).all()
        assert np.isfinite(raw["t"][1:]).all()
        assert all(np.isfinite(raw[k]).all() for k in raw if k != "t")
    logs = model.train_on_batch(x.astype("float32"), y.astype("float32"),
                                return_dict=True)
    assert np.isfinite(logs["loss"])
    after = kernels(model)
    for name in NAN_LAYERS:
        assert np.isfinite(after[name]).all(), f"{name}: {after[name]}"
        np.testing.assert_allclose(after[name], expected[name], rtol=1e-5,
                                   atol=1e-6, err_msg=name)
    # Row 0 of t saw only NaN (zeroed) gradient entries; the rest moved.
    assert np.array_equal(after["t"][0], before["t"][0])
    assert np.abs(after["t"][1:] - before["t"][1:]).min() > 1e-4
    # The second loss ran at u updated by the first: not joint's step.
    joint = {k: v.copy() for k, v in before.items()}
    for head in (0, 1):
        for name, grad in nan_backward(before, nan_forward(before, x), head,
                                       y).items():
            joint[name] = joint[name] - LR * grad
    assert np.abs(expected["t"] - joint["t"]).max() > 1e-4


# ---------------------------------------------------------------------------
# A head layer shared between two outputs
# ---------------------------------------------------------------------------
SHARED_INPUT, SHARED_UNITS, SHARED_CLASSES = 5, 4, 3


def shared_head_net(method):
    """x (5) -> d1 (relu) -> a1 -> head; a1 -> d2 (relu) -> a2 -> head, with
    ONE Dense layer `head` giving both outputs (gammas 0.5, 1).

    Whichever loss runs second finds `head` updated by the first, so its
    own output node is re-linearized: its gradient must enter there.
    """
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SHARED_INPUT,))
    a1 = L.Dense(SHARED_UNITS, activation="relu", name="d1")(inputs)
    head = L.Dense(SHARED_CLASSES, name="head")
    out0 = head(a1)
    a2 = L.Dense(SHARED_UNITS, activation="relu", name="d2")(a1)
    out1 = head(a2)
    model = keras_mwbp.MultiWayModel(inputs, [out0, out1], method=method,
                                     head_weights=list(GAMMAS))
    model.compile(
        optimizer=keras.optimizers.SGD(LR, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def shared_forward(p, x):
    tape = {"x": x}
    tape["z1"] = ref.dense_forward(x, p["d1"]["kernel"], p["d1"]["bias"])
    tape["a1"] = ref.relu_forward(tape["z1"])
    tape["z2"] = ref.dense_forward(tape["a1"], p["d2"]["kernel"],
                                   p["d2"]["bias"])
    tape["a2"] = ref.relu_forward(tape["z2"])
    tape["outputs"] = [
        ref.dense_forward(tape[a], p["head"]["kernel"], p["head"]["bias"])
        for a in ("a1", "a2")
    ]
    return tape


def shared_backward(p, tape, index, labels):
    """Gradient of gamma_index * loss_index at the current parameters `p`,
    from the stored features `tape` (paper Eq. 10): d1's fused ReLU takes
    its derivative at the stored pre-activation (spec, Eq. 4)."""
    grad = GAMMAS[index] * ref.cross_entropy_backward(
        tape["outputs"][index], labels)
    grads = {}
    grad, grads["head"] = ref.dense_backward(
        tape[("a1", "a2")[index]], p["head"]["kernel"], grad)
    if index == 1:
        grad = ref.relu_backward(tape["z2"], grad)
        grad, grads["d2"] = ref.dense_backward(tape["a1"], p["d2"]["kernel"],
                                               grad)
    grad = ref.relu_backward(tape["z1"], grad)
    _, grads["d1"] = ref.dense_backward(tape["x"], p["d1"]["kernel"], grad)
    return grads


def shared_reference(p, batches, order, relinearize=True):
    """Steps of MW-BP (order [0, 1]) or reverse MW-BP ([1, 0]), one SGD with
    momentum per loss. With `relinearize=False` every loss takes its
    gradient at the step's initial parameters (what a plain persistent tape
    gives: not MW-BP)."""
    import copy

    from _reference_harness import KERAS_MOMENTUM

    p = copy.deepcopy(p)
    optimizers = [ref.SGDMomentum(LR, KERAS_MOMENTUM) for _ in GAMMAS]
    for x, labels in batches:
        tape = shared_forward(p, x)
        start = copy.deepcopy(p)
        for index in order:
            at = p if relinearize else start
            optimizers[index].apply(p, shared_backward(at, tape, index,
                                                       labels))
    return p


def shared_params(model):
    return {
        name: {"kernel": np.array(model.get_layer(name).kernel.numpy()),
               "bias": np.array(model.get_layer(name).bias.numpy())}
        for name in ("d1", "d2", "head")
    }


# Known (torch): the hand computation is float64 at rtol 1e-9; Keras's
# torch `ops.matmul` rounds float64 products to float32 (result_type maps
# float64 to float32 off TensorFlow). Both cases pass with that cast patched
# out, and the float32 case below checks torch at float32 round-off.
# Strict: the test fails once Keras keeps float64 matmuls in float64.
_TORCH_FLOAT64_MATMUL = pytest.mark.xfail(
    keras.backend.backend() == "torch", strict=True,
    reason="Keras's torch matmul rounds float64 products to float32")

# d1 is Dense(activation="relu") and the lowest updated node. In float64
# reverse_mwbp, d1's pre-activation at its updated kernel changes sign in
# one unit; the spec (Eq. 4 and 10) keeps the shared forward's mask (the
# stored pre-activation's), as this reference does, on every backend
# (before the spec's decision JAX took the mask at the updated kernel and
# failed here; tests/test_fused_activation.py checks the decision where the
# masks differ by a wide margin).
DTYPE_CASES = [
    pytest.param("float64", 1e-9, 1e-12, marks=_TORCH_FLOAT64_MATMUL,
                 id="float64"),
    pytest.param("float32", 2e-5, 1e-6, id="float32"),
]


@pytest.mark.parametrize("dtype, rtol, atol", DTYPE_CASES)
@pytest.mark.parametrize("method, order", [
    ("mwbp", [0, 1]),
    ("reverse_mwbp", [1, 0]),
])
def test_shared_head_layer_matches_hand_computation(method, order, dtype,
                                                    rtol, atol):
    rng = np.random.default_rng(3)
    batches = [(rng.normal(size=(8, SHARED_INPUT)),
                rng.integers(0, SHARED_CLASSES, 8)) for _ in range(2)]
    with float64_dtype() if dtype == "float64" else contextlib.nullcontext():
        model = shared_head_net(method)
        initial = shared_params(model)
        assert initial["head"]["kernel"].dtype == np.dtype(dtype)
        for x, labels in batches:
            model.train_on_batch(x.astype(dtype), labels)
    initial = {name: {w: value.astype("float64") for w, value in p.items()}
               for name, p in initial.items()}
    expected = shared_reference(initial, batches, order)
    actual = shared_params(model)
    for name in expected:
        for weight in expected[name]:
            np.testing.assert_allclose(
                actual[name][weight], expected[name][weight], rtol=rtol,
                atol=atol, err_msg=f"{name}/{weight}")
    # The re-linearization matters here: with every gradient taken at the
    # step's initial parameters, d1's kernel would end elsewhere.
    stale = shared_reference(initial, batches, order, relinearize=False)
    gap = np.abs(stale["d1"]["kernel"] - expected["d1"]["kernel"]).max()
    assert gap > 1e-4
