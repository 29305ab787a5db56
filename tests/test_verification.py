"""`keras_mwbp.verification` against hand computations, and an open-set
check: embeddings trained on MNIST-1D classes 0-6 verify pairs of classes
7-9."""

import math

import keras
import numpy as np
import pytest

import keras_mwbp
from keras_mwbp import verification
from keras_mwbp.heads import cosine_head

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

T, F = True, False


def test_cosine_similarity_by_hand():
    got = verification.cosine_similarity([[1, 0], [1, 1], [2, 0]],
                                         [[0, 1], [1, 1], [-3, 0]])
    np.testing.assert_allclose(got, [0.0, 1.0, -1.0])


def test_best_threshold_by_hand():
    # Candidates: below all (acc 2/4), 0.25 (3/4), 0.45 (2/4), 0.7 (3/4),
    # above all (2/4): the first best is 0.25.
    threshold, accuracy = verification.best_threshold(
        [0.9, 0.4, 0.5, 0.1], np.array([T, T, F, F]))
    assert threshold == pytest.approx(0.25)
    assert accuracy == 0.75


def test_lfw_protocol_by_hand():
    """4 folds of 2 pairs; the last fold's same pair (0.35) lies below its
    different pair (0.6). Thresholds chosen on the other 3 folds (by hand):
    0.325, 0.325, 0.275, 0.5; fold accuracies 1, 1, 0.5, 0."""
    similarities = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.35, 0.6]
    issame = np.array([T, F, T, F, T, F, T, F])
    result = verification.lfw_accuracy(similarities, issame, num_folds=4)
    np.testing.assert_allclose(result["thresholds"], [0.325, 0.325, 0.275, 0.5])
    assert result["accuracies"] == [1.0, 1.0, 0.5, 0.0]
    assert result["mean"] == pytest.approx(0.625)
    assert result["std"] == pytest.approx(math.sqrt(0.6875 / 4))


@pytest.mark.parametrize("far, tar, threshold", [
    (0.2, 0.5, 0.5),    # One of 5 negatives may pass: t = 0.5.
    (0.0, 0.25, 0.9),   # None may: t = the highest negative.
    (1.0, 1.0, -0.9),   # All may: t below every score.
])
def test_tar_at_far_by_hand(far, tar, threshold):
    similarities = [0.9, 0.5, 0.4, 0.3, 0.1, 0.95, 0.6, 0.45, 0.2]
    issame = np.array([F] * 5 + [T] * 4)
    got_tar, got_threshold = verification.tar_at_far(similarities, issame, far)
    assert got_tar == tar
    assert got_threshold == pytest.approx(threshold)


def test_read_pairs_reads_the_lfw_format(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("2\t2\nAbel_Pacheco\t1\t4\nAkhmed_Zakayev\t1\t3\n"
                    "Abdel_Madi_Shabneh\t1\tDean_Barker\t1\n"
                    "Abdel_Madi_Shabneh\t1\tGiancarlo_Fisichella\t1\n")
    a, b, issame = verification.read_pairs(str(path), image_dir="lfw")
    assert a[0] == "lfw/Abel_Pacheco/Abel_Pacheco_0001.jpg"
    assert b[0] == "lfw/Abel_Pacheco/Abel_Pacheco_0004.jpg"
    assert b[3] == "lfw/Giancarlo_Fisichella/Giancarlo_Fisichella_0001.jpg"
    assert issame.tolist() == [T, T, F, F]


@pytest.mark.parametrize("call, error, message", [
    (lambda: verification.lfw_accuracy([0.1, 0.2], np.array([T, F]), 3),
     ValueError, "`num_folds` must be an integer from 2 to the number of "
     "pairs (2). Received: num_folds=3"),
    (lambda: verification.lfw_accuracy([0.1, 0.2], [1, 0], 2),
     TypeError, "`issame` must be a boolean array. Received: dtype int64"),
    (lambda: verification.tar_at_far([0.1, 0.2], np.array([T, F]), 1.5),
     ValueError, "`far` must be a number in [0, 1]. Received: far=1.5"),
    (lambda: verification.read_pairs("/no/such/pairs.txt"),
     FileNotFoundError, "The pairs file '/no/such/pairs.txt' does not exist."),
])
def test_bad_input_is_named(call, error, message):
    with pytest.raises(error) as caught:
        call()
    assert str(caught.value) == message


@pytest.mark.backends("tensorflow")  # One backend: a 15-epoch training.
def test_open_set_verification_on_unseen_classes():
    """Cosine heads trained with ArcFace on MNIST-1D classes 0-6 only (3
    heads on a small 1-D convnet, MW-BP); 600 pairs of the unseen classes
    7-9, half of one class, half of two, are verified by every head far
    above chance and above the raw signals' cosine (10 folds).

    Measured (TensorFlow, seeds 0 and 1): heads 0.71 / 0.67 / 0.71 and
    0.70 / 0.66 / 0.64; the raw signals score 0.52 and chance is 0.5, whose
    standard error at 600 pairs is 0.02: the bound 0.6 is 5 of them. (On
    8x8 digits 0-6 / 7-9 the learned heads scored 0.65-0.70 but the raw
    pixels 0.75, so that split cannot show that the embedding learns.)
    It passed once on torch too (9.5 min of eager steps on a loaded CPU,
    which is why it runs on TensorFlow alone)."""
    from keras_mwbp import data

    (x, y), (x_test, y_test) = data._make_mnist1d(False)
    x = np.concatenate([x, x_test]).astype("float32")
    y = np.concatenate([y, y_test])
    seen = y <= 6
    rng = np.random.default_rng(0)
    unseen = np.flatnonzero(~seen)
    pairs_a, pairs_b, issame = [], [], []
    for k in range(600):
        i = rng.choice(unseen)
        pool = unseen[(y[unseen] == y[i]) == (k % 2 == 0)]
        pairs_a.append(i)
        pairs_b.append(rng.choice(pool[pool != i]))
        issame.append(k % 2 == 0)
    issame = np.array(issame)
    flat = x.reshape(len(x), -1)
    raw = verification.lfw_accuracy(verification.cosine_similarity(
        flat[pairs_a], flat[pairs_b]), issame)["mean"]

    keras.utils.set_random_seed(0)
    layers = keras.layers
    head = cosine_head(embedding_dim=32)
    inputs = keras.Input(x.shape[1:])
    a = layers.Conv1D(32, 5, padding="same", activation="relu")(inputs)
    b = layers.Conv1D(32, 5, strides=2, padding="same", activation="relu")(a)
    c = layers.Conv1D(64, 3, padding="same", activation="relu")(b)
    outputs = [layers.Identity(name=n)(head(t, 7, n))
               for n, t in (("head_0", a), ("head_1", b), ("final", c))]
    model = keras_mwbp.MultiWayModel(inputs, outputs, method="mwbp")
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras_mwbp.AngularMarginLoss(margin=0.3, scale=16.0))
    model.fit(x[seen], y[seen], batch_size=64, epochs=15, verbose=0)
    rows = verification.verify(model, x[pairs_a], x[pairs_b], issame)
    assert [row["output"] for row in rows] == ["head_0", "head_1", "final"]
    assert raw < 0.56
    for row in rows:
        assert row["accuracy"] > 0.6, (raw, rows)
        assert 0 <= row["tar"] <= 1


def test_head_embeddings_refuses_a_model_without_cosine_heads():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="final")(inputs))
    with pytest.raises(ValueError) as caught:
        verification.head_embeddings(model)
    assert str(caught.value) == (
        "`model` must end every output in a CosineLogits layer "
        "(keras_mwbp.heads.cosine_head). Output 'final' does not.")
