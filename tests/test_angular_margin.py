"""`AngularMarginLoss` (ArcFace, CosFace) and `CosineLogits` against NumPy,
the head builder `cosine_head`, and a model trained with them."""

import math

import keras
import numpy as np
import pytest

import keras_mwbp
from keras_mwbp.heads import cosine_head

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")


def np_loss(cosine, labels, margin, scale, kind):
    """The loss by hand: per sample, s * (margin-adjusted true cosine, other
    cosines), then softmax cross-entropy."""
    out = []
    for cos, y in zip(np.clip(cosine, -1, 1), labels):
        logits = np.array(cos, dtype=np.float64)
        theta = math.acos(cos[y])
        if kind == "cosface":
            logits[y] = cos[y] - margin
        elif theta + margin <= math.pi:
            logits[y] = math.cos(theta + margin)
        else:  # The fallback: cos(theta) - m sin(m).
            logits[y] = cos[y] - margin * math.sin(margin)
        logits *= scale
        logits -= logits.max()
        out.append(-(logits[y] - math.log(np.exp(logits).sum())))
    return np.array(out)


def _cosines():
    rng = np.random.default_rng(0)
    cosine = rng.uniform(-0.95, 0.95, size=(6, 4)).astype("float32")
    labels = np.array([0, 1, 2, 3, 1, 2])
    # Sample 4's true angle is near pi: with m = 0.5, theta + m > pi.
    cosine[4, 1] = -0.97
    return cosine, labels


@pytest.mark.parametrize("kind, margin, scale", [
    ("arcface", 0.5, 64.0), ("arcface", 0.3, 16.0), ("cosface", 0.35, 30.0),
])
def test_loss_matches_numpy_per_sample(kind, margin, scale):
    cosine, labels = _cosines()
    assert math.acos(cosine[4, 1]) + 0.5 > math.pi  # The fallback is taken.
    loss = keras_mwbp.AngularMarginLoss(margin, scale, kind, reduction=None)
    got = keras.ops.convert_to_numpy(loss(labels, cosine))
    np.testing.assert_allclose(
        got, np_loss(cosine, labels, margin, scale, kind), rtol=2e-5, atol=2e-5)


def test_fallback_branch_is_cos_minus_m_sin_m():
    """One sample whose true angle plus the margin passes pi: its true logit
    is s (cos(theta) - m sin(m)), not s cos(theta + m)."""
    cosine = np.array([[-0.99, 0.2, 0.1]], "float32")
    margin, scale = 0.5, 2.0
    loss = keras_mwbp.AngularMarginLoss(margin, scale, reduction=None)
    got = float(keras.ops.convert_to_numpy(loss(np.array([0]), cosine))[0])
    logits = scale * np.array([-0.99 - margin * math.sin(margin), 0.2, 0.1])
    expected = -(logits[0] - math.log(np.exp(logits).sum()))
    assert got == pytest.approx(expected, rel=1e-5)
    wrong = scale * np.array([math.cos(math.acos(-0.99) + margin), 0.2, 0.1])
    assert got != pytest.approx(-(wrong[0] - math.log(np.exp(wrong).sum())),
                                rel=1e-3)


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_zero_margin_is_scaled_cosine_softmax(kind):
    cosine, labels = _cosines()
    loss = keras_mwbp.AngularMarginLoss(0.0, 8.0, kind)
    plain = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    assert float(loss(labels, cosine)) == pytest.approx(
        float(plain(labels, 8.0 * cosine)), rel=1e-5)


def test_cosine_logits_are_normalized_products():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 7)).astype("float32")
    layer = keras_mwbp.CosineLogits(3)
    out = keras.ops.convert_to_numpy(layer(x))
    w = keras.ops.convert_to_numpy(layer.centres)
    expected = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (
        w / np.linalg.norm(w, axis=0, keepdims=True))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(out) <= 1 + 1e-6)


@pytest.mark.parametrize("call, message", [
    (lambda: keras_mwbp.AngularMarginLoss(kind="sphereface"),
     "`kind` must be one of ('arcface', 'cosface'). Received: kind='sphereface'"),
    (lambda: keras_mwbp.AngularMarginLoss(margin=-0.1),
     "`margin` must be a finite number >= 0 and below pi for ArcFace. "
     "Received: margin=-0.1"),
    (lambda: keras_mwbp.AngularMarginLoss(margin=3.2),
     "`margin` must be a finite number >= 0 and below pi for ArcFace. "
     "Received: margin=3.2"),
    (lambda: keras_mwbp.AngularMarginLoss(margin=True, kind="cosface"),
     "`margin` must be a finite number >= 0. Received: margin=True"),
    (lambda: keras_mwbp.AngularMarginLoss(scale=0),
     "`scale` must be a positive finite number. Received: scale=0"),
    (lambda: keras_mwbp.CosineLogits(0),
     "`num_classes` must be a positive integer. Received: num_classes=0"),
    (lambda: cosine_head(embedding_dim=2.5),
     "`embedding_dim` must be a positive integer. Received: embedding_dim=2.5"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert str(error.value) == message


def test_model_with_cosine_heads_learns_and_saves(tmp_path):
    """A 3-head MultiWayModel with a cosine head on every output, trained by
    MW-BP with ArcFace on separable data: every head's loss falls, and the
    `.keras` file loads (layer and loss) and predicts the same."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 3
    y = rng.integers(0, 4, 256)
    x = (centres[y] + rng.normal(size=(256, 8))).astype("float32")
    head = cosine_head(embedding_dim=16)
    inputs = keras.Input((8,))
    a = keras.layers.Dense(16, activation="relu")(inputs)
    b = keras.layers.Dense(16, activation="relu")(a)
    outputs = [keras.layers.Identity(name=n)(head(t, 4, n))
               for n, t in (("head_0", inputs), ("head_1", a), ("final", b))]
    model = keras_mwbp.MultiWayModel(inputs, outputs, method="mwbp")
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras_mwbp.AngularMarginLoss(margin=0.2, scale=8.0),
                  metrics=["accuracy"])
    history = model.fit(x, y, batch_size=32, epochs=4, verbose=0).history
    for name in ("head_0", "head_1", "final"):
        losses = history[f"{name}_loss"]
        assert losses[-1] < 0.7 * losses[0], (name, losses)
    assert history["final_accuracy"][-1] > 0.9
    path = str(tmp_path / "cosine.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    for got, want in zip(loaded.predict(x[:8], verbose=0),
                         model.predict(x[:8], verbose=0)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert isinstance(loaded.get_layer("final_cosine"), keras_mwbp.CosineLogits)
