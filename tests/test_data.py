import os
import sys
from unittest import mock

import numpy as np
import pytest

from keras_mwbp import data
from keras_mwbp.data import load_digits


def test_load_digits_shapes_dtypes_and_ranges():
    (x_train, y_train), (x_test, y_test) = load_digits()
    # 1797 images; the test part is ceil(0.25 * 1797) = 450.
    assert x_train.shape == (1347, 8, 8, 1)
    assert x_test.shape == (450, 8, 8, 1)
    assert y_train.shape == (1347,)
    assert y_test.shape == (450,)
    assert x_train.dtype == np.float32 and x_test.dtype == np.float32
    assert y_train.dtype == np.int32 and y_test.dtype == np.int32
    for x in (x_train, x_test):
        assert x.min() == 0.0
        assert x.max() == 1.0
    assert set(np.unique(y_train)) == set(range(10))
    assert set(np.unique(y_test)) == set(range(10))


def test_load_digits_is_stratified():
    (_, y_train), (_, y_test) = load_digits()
    # sklearn's digits hold 178, 182, 177, 183, 181, 182, 181, 179, 174, 180
    # images of the digits 0..9: each class gives a quarter (+-1) to the test.
    per_class = np.array([178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
    np.testing.assert_array_equal(
        np.bincount(y_train) + np.bincount(y_test), per_class
    )
    assert np.all(np.abs(np.bincount(y_test) - per_class / 4) <= 1)


def test_load_digits_seed_and_fraction():
    (x_a, _), _ = load_digits(seed=0)
    (x_b, _), _ = load_digits(seed=0)
    (x_c, _), _ = load_digits(seed=1)
    np.testing.assert_array_equal(x_a, x_b)
    assert not np.array_equal(x_a, x_c)
    (x_half, _), (x_rest, _) = load_digits(test_fraction=0.5)
    assert (len(x_half), len(x_rest)) == (898, 899)


@pytest.mark.parametrize("fraction", [0, 1, 1.5])
def test_load_digits_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=fraction)


# ---------------------------------------------------------------- load()


def _collect(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def test_load_digits_pipelines():
    train_ds, test_ds, info = data.load("digits", batch_size=100)
    assert info == {
        "num_classes": 10,
        "input_shape": (8, 8, 1),
        "num_train": 1347,
        "num_test": 450,
    }
    x, y = next(iter(train_ds))
    assert tuple(x.shape) == (100, 8, 8, 1)
    assert x.dtype.name == "float32" and y.dtype.name == "int32"
    x_train, y_train = _collect(train_ds)
    x_test, y_test = _collect(test_ds)
    assert x_train.shape == (1347, 8, 8, 1) and x_test.shape == (450, 8, 8, 1)
    for x in (x_train, x_test):
        assert x.min() == 0.0 and x.max() == 1.0
    assert set(np.unique(y_train)) == set(np.unique(y_test)) == set(range(10))
    # Same examples as load_digits; the train pipeline is shuffled, the test
    # pipeline keeps its order.
    (x_ref, y_ref), (xt_ref, yt_ref) = load_digits()
    np.testing.assert_array_equal(x_test, xt_ref)
    np.testing.assert_array_equal(y_test, yt_ref)
    assert not np.array_equal(y_train, y_ref)
    np.testing.assert_array_equal(np.sort(y_train), np.sort(y_ref))


def test_load_train_shuffle_is_seeded():
    first = [_collect(data.load("digits", seed=s)[0])[1] for s in (3, 3, 4)]
    np.testing.assert_array_equal(first[0], first[1])
    assert not np.array_equal(first[0], first[2])


def test_load_digits_as_vectors():
    train_ds, _, info = data.load("digits", batch_size=8, as_images=False)
    assert info["input_shape"] == (64,)
    assert tuple(next(iter(train_ds))[0].shape) == (8, 64)


@pytest.mark.parametrize(
    "as_images, shape", [(True, (1, 40, 1)), (False, (40, 1))]
)
def test_load_mnist1d(as_images, shape):
    state = np.random.get_state()
    train_ds, test_ds, info = data.load(
        "mnist1d", batch_size=500, as_images=as_images
    )
    # make_dataset seeds NumPy's global generator; load restores it.
    np.testing.assert_array_equal(np.random.get_state()[1], state[1])
    assert info == {
        "num_classes": 10,
        "input_shape": shape,
        "num_train": 4000,
        "num_test": 1000,
    }
    x_train, y_train = _collect(train_ds)
    x_test, y_test = _collect(test_ds)
    assert x_train.shape == (4000,) + shape and x_test.shape == (1000,) + shape
    assert x_train.dtype == np.float32 and y_train.dtype == np.int32
    assert set(np.unique(y_train)) == set(np.unique(y_test)) == set(range(10))
    # make_dataset standardises all 5000 signals to mean 0 and std 1.
    x_all = np.concatenate([x_train, x_test])
    assert abs(x_all.mean()) < 1e-4 and abs(x_all.std() - 1) < 1e-4
    assert np.all(np.isfinite(x_all)) and np.abs(x_all).max() < 10


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"name": "mnist"}, "name"),
        ({"name": "digits", "batch_size": 0}, "batch_size"),
        ({"name": "digits", "batch_size": -4}, "batch_size"),
        ({"name": "digits", "batch_size": 2.5}, "batch_size"),
        ({"name": "digits", "batch_size": True}, "batch_size"),
    ],
)
def test_load_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        data.load(**kwargs)


# ------------------------------------------------- tensorflow-datasets path

try:
    import tensorflow_datasets as tfds
except ImportError:  # pragma: no cover - tensorflow-datasets is optional.
    tfds = None

needs_tfds = pytest.mark.skipif(tfds is None, reason="needs tensorflow-datasets")

_NUM_TRAIN, _NUM_TEST = 5 * 4, 6


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory):
    """A real, tiny tfds `cifar10` directory, built offline.

    The files of the CIFAR-10 binary archive are written with random images,
    and only the download is mocked: tfds's own Cifar10 builder turns them
    into a prepared data set (TFRecords and dataset_info.json).
    """
    root = tmp_path_factory.mktemp("tfds")
    extracted = root / "extracted"
    batches = extracted / "cifar-10-batches-bin"
    batches.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def write(filename, n):
        labels = rng.integers(0, 10, (n, 1), dtype=np.uint8)
        labels[:2, 0] = [0, 9]
        images = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        (batches / filename).write_bytes(
            np.concatenate([labels, images], axis=1).tobytes()
        )

    for i in range(1, 6):
        write(f"data_batch_{i}.bin", _NUM_TRAIN // 5)
    write("test_batch.bin", _NUM_TEST)
    (batches / "batches.meta.txt").write_text("\n".join("abcdefghij"))
    data_dir = root / "data"
    builder = tfds.builder("cifar10", data_dir=str(data_dir))
    with mock.patch.object(
        tfds.download.DownloadManager,
        "download_and_extract",
        return_value=str(extracted),
    ):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    return data_dir


def _raw(data_dir, split):
    ds = tfds.builder("cifar10", data_dir=str(data_dir)).as_dataset(
        split=split, as_supervised=True
    )
    return _collect(ds.batch(100))


@needs_tfds
def test_load_tfds_local_copy(cifar10_dir):
    train_ds, test_ds, info = data.load("cifar10", batch_size=8, data_dir=cifar10_dir)
    assert info == {
        "num_classes": 10,
        "input_shape": (32, 32, 3),
        "num_train": _NUM_TRAIN,
        "num_test": _NUM_TEST,
    }
    x_train, y_train = _collect(train_ds)
    x_test, y_test = _collect(test_ds)
    assert x_train.shape == (_NUM_TRAIN, 32, 32, 3)
    assert x_test.shape == (_NUM_TEST, 32, 32, 3)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int32
    assert [len(y) for _, y in train_ds] == [8, 8, 4]
    _, y_raw = _raw(cifar10_dir, "train")
    np.testing.assert_array_equal(np.sort(y_train), np.sort(y_raw))
    assert set(np.unique(y_train)) <= set(range(10))
    mean, std = (np.array(v, "float32") for v in data.NORMALIZATION["cifar10"])
    low, high = (0 - mean) / std, (1 - mean) / std
    for x in (x_train, x_test):
        assert np.all(x >= low - 1e-5) and np.all(x <= high + 1e-5)


@needs_tfds
def test_load_tfds_test_pipeline_is_normalised_not_augmented(cifar10_dir):
    _, test_ds, _ = data.load("cifar10", data_dir=cifar10_dir, augment=True)
    x_test, y_test = _collect(test_ds)
    x_raw, y_raw = _raw(cifar10_dir, "test")
    mean, std = data.NORMALIZATION["cifar10"]
    expected = (x_raw.astype("float32") / 255 - np.array(mean)) / np.array(std)
    np.testing.assert_array_equal(y_test, y_raw)
    np.testing.assert_allclose(x_test, expected, atol=1e-5)
    # Undo the normalisation: per-channel mean and std of the raw pixels.
    undone = x_test * np.array(std) + np.array(mean)
    np.testing.assert_allclose(
        undone.mean(axis=(0, 1, 2)), (x_raw / 255).mean(axis=(0, 1, 2)), atol=1e-5
    )


@needs_tfds
def test_load_tfds_augmentation_changes_train_images_only(cifar10_dir):
    plain, plain_test, _ = data.load(
        "cifar10", data_dir=cifar10_dir, augment=False, seed=1
    )
    aug, aug_test, _ = data.load("cifar10", data_dir=cifar10_dir, augment=True, seed=1)
    x_plain, y_plain = _collect(plain)
    x_aug, y_aug = _collect(aug)
    # Same seeded order, same shape; the images moved and/or flipped.
    np.testing.assert_array_equal(y_plain, y_aug)
    assert x_aug.shape == x_plain.shape
    changed = [not np.allclose(a, p) for a, p in zip(x_aug, x_plain)]
    assert sum(changed) >= _NUM_TRAIN // 2
    # Each augmented image is a shifted (and maybe mirrored) copy of its
    # original, padded with zeros: some window of it matches.
    mean, std = (np.array(v, "float32") for v in data.NORMALIZATION["cifar10"])
    pad_value = (0 - mean) / std
    for a, p in zip(x_aug[:4], x_plain[:4]):
        assert _is_shifted_copy(a, p, pad_value) or _is_shifted_copy(
            a[:, ::-1], p, pad_value
        )
    np.testing.assert_array_equal(_collect(plain_test)[0], _collect(aug_test)[0])


def _is_shifted_copy(image, original, pad_value, pad=4):
    padded = np.broadcast_to(pad_value, (32 + 2 * pad, 32 + 2 * pad, 3)).copy()
    padded[pad:-pad, pad:-pad] = original
    return any(
        np.allclose(padded[i : i + 32, j : j + 32], image, atol=1e-5)
        for i in range(2 * pad + 1)
        for j in range(2 * pad + 1)
    )


@needs_tfds
def test_load_tfds_as_vectors(cifar10_dir):
    train_ds, _, info = data.load(
        "cifar10", batch_size=4, data_dir=cifar10_dir, as_images=False
    )
    assert info["input_shape"] == (3072,)
    assert tuple(next(iter(train_ds))[0].shape) == (4, 3072)


@needs_tfds
def test_load_tfds_missing_dataset_is_clear_and_offline(tmp_path):
    with mock.patch.object(
        tfds.download.DownloadManager, "download_and_extract"
    ) as download:
        with pytest.raises(FileNotFoundError) as error:
            data.load("cifar100", data_dir=tmp_path)
    download.assert_not_called()
    message = str(error.value)
    assert "'cifar100'" in message and str(tmp_path) in message
    assert "download" in message and "data_dir" in message
    assert not (tmp_path / "cifar100").exists() or not any(
        (tmp_path / "cifar100").rglob("*.tfrecord*")
    )


def test_load_tfds_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match="svhn_cropped.*tensorflow-datasets"):
        data.load("svhn_cropped", data_dir=os.devnull)


def test_normalization_constants():
    for name in ("cifar10", "cifar100", "svhn_cropped"):
        mean, std = data.NORMALIZATION[name]
        assert len(mean) == len(std) == 3
        assert all(0.4 < m < 0.55 for m in mean)
        assert all(0.15 < s < 0.3 for s in std)
