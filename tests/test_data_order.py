"""The order of in-memory training data (`keras_mwbp.data_order`): each
epoch a permutation of all samples, a function of (seed, epoch) only, used
by `MultiWayModel.fit`."""

import keras
import numpy as np

from keras_mwbp import MultiWayModel
from keras_mwbp import data_order

N, BATCH = 10, 4


def _epochs(seed, first_epoch, epochs):
    """The sample indices of each epoch's batches, read back from
    `epoch_batches` over an array holding each sample's index."""
    ids = np.arange(N, dtype="int64")
    dataset = data_order.epoch_batches(
        ids, ids, None, BATCH, seed, first_epoch, epochs
    )
    batches = [x.numpy() for x, _ in dataset]
    steps = data_order.steps_per_epoch(N, BATCH)
    assert steps == 3 and len(batches) == steps * (epochs - first_epoch)
    return [
        np.concatenate(batches[i:i + steps])
        for i in range(0, len(batches), steps)
    ]


def test_every_epoch_is_a_permutation_of_all_samples():
    epochs = _epochs(seed=5, first_epoch=0, epochs=3)
    for order in epochs:
        assert sorted(order) == list(range(N))
    # Batches of 4, 4 and the remaining 2, in that order.
    ids = np.arange(N, dtype="int64")
    sizes = [len(x) for x, _ in data_order.epoch_batches(
        ids, ids, None, BATCH, 5, 0, 1)]
    assert sizes == [4, 4, 2]
    # Another order every epoch, and not the identity.
    assert len({tuple(order) for order in epochs}) == 3
    assert not any(np.array_equal(order, np.arange(N)) for order in epochs)


def test_order_depends_only_on_seed_and_epoch():
    full = _epochs(seed=5, first_epoch=0, epochs=4)
    resumed = _epochs(seed=5, first_epoch=2, epochs=4)
    for got, want in zip(resumed, full[2:]):
        np.testing.assert_array_equal(got, want)
    for epoch, order in enumerate(full):
        np.testing.assert_array_equal(
            order, data_order.permutation(5, epoch, N))
    other_seed = _epochs(seed=6, first_epoch=0, epochs=4)
    assert not all(np.array_equal(a, b) for a, b in zip(full, other_seed))


def test_labels_and_sample_weights_stay_with_their_samples():
    ids = np.arange(N, dtype="float32")[:, None]
    dataset = data_order.epoch_batches(
        ids, [10 * np.arange(N), 20 * np.arange(N)], 100 * np.arange(N),
        BATCH, 1, 0, 1)
    for x, (y0, y1), weight in dataset:
        x = x.numpy()[:, 0]
        np.testing.assert_array_equal(y0.numpy(), 10 * x)
        np.testing.assert_array_equal(y1.numpy(), 20 * x)
        np.testing.assert_array_equal(weight.numpy(), 100 * x)


def _model(seed):
    inputs = keras.Input((1,))
    x = keras.layers.Dense(2)(inputs)
    aux = keras.layers.Dense(2)(x)
    final = keras.layers.Dense(2)(keras.layers.Dense(2)(x))
    model = MultiWayModel(inputs, [aux, final], shuffle_seed=seed)
    model.compile(
        "sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=True)
    return model


def _record_batches(model):
    """Makes `model` (run eagerly) record each training batch's sample ids
    (its one input feature); returns the list they are appended to."""
    seen = []
    step = model.train_step

    def recording_step(data):
        seen.append(keras.ops.convert_to_numpy(data[0])[:, 0].astype(int))
        return step(data)

    model.train_step = recording_step
    return seen


def test_fit_visits_samples_in_the_seeded_order():
    model = _model(seed=3)
    seen = _record_batches(model)
    ids = np.arange(N, dtype="float32")[:, None]
    model.fit(ids, np.zeros(N, int), batch_size=BATCH, epochs=2, verbose=0)
    orders = [np.concatenate(seen[:3]), np.concatenate(seen[3:])]
    for epoch, order in enumerate(orders):
        np.testing.assert_array_equal(
            order, data_order.permutation(3, epoch, N))
    # The seed is part of the config, so a reloaded model keeps the order.
    assert model.get_config()["shuffle_seed"] == 3
    assert MultiWayModel.from_config(model.get_config()).shuffle_seed == 3


def test_validation_split_takes_the_last_samples_as_keras_does():
    model = _model(seed=3)
    seen = _record_batches(model)
    ids = np.arange(N, dtype="float32")[:, None]
    history = model.fit(ids, np.zeros(N, int), batch_size=BATCH, epochs=1,
                        validation_split=0.2, verbose=0)
    assert sorted(np.concatenate(seen)) == list(range(8))
    assert "val_loss" in history.history
