"""Small data sets that need no download."""

import os

import numpy as np
from sklearn import datasets
from sklearn import model_selection

from keras_mwbp import constants


def load_digits(test_fraction=0.25, seed=0):
    """scikit-learn's bundled 8x8 handwritten digits, split for training.

    1797 grey images of the digits 0-9 (UCI optical recognition test set),
    shipped with scikit-learn. The split is stratified by label.

    Args:
        test_fraction: Fraction of the images held out for testing, in (0, 1).
        seed: Seed of the shuffle before the split.

    Returns:
        `((x_train, y_train), (x_test, y_test))`: images of shape
        `(N, 8, 8, 1)`, float32 in [0, 1], and int32 labels 0..9.

    Example:

    >>> (x_train, y_train), (x_test, y_test) = load_digits()
    >>> x_train.shape, x_test.shape
    ((1347, 8, 8, 1), (450, 8, 8, 1))
    """
    if not 0 < test_fraction < 1:
        raise ValueError(
            "`test_fraction` must be in (0, 1). "
            f"Received: test_fraction={test_fraction!r}"
        )
    digits = datasets.load_digits()
    # Pixel values are counts 0..16 of a 4x4 block of the 32x32 bitmap.
    images = (digits.images / 16.0).astype("float32")[..., np.newaxis]
    labels = digits.target.astype("int32")
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        images,
        labels,
        test_size=test_fraction,
        random_state=seed,
        stratify=labels,
    )
    return (x_train, y_train), (x_test, y_test)


# --------------------------------------------------------------------------
# tf.data pipelines: `load(name, ...)`.
# --------------------------------------------------------------------------

#: The names `load` accepts (keras_mwbp.constants).
DATASETS = constants.DATASETS

#: The names `load` reads from a local tensorflow-datasets copy.
TFDS_DATASETS = constants.TFDS_DATASETS

#: Per-channel mean and standard deviation of the training images, scaled
#: to [0, 1]; fixed constants, so that train and test use the same ones.
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn_cropped": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}

_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn_cropped": 10}

_PAD = 4  # Pixels of zero padding before the random crop (CIFAR style).


def load(
    name,
    batch_size=128,
    data_dir=None,
    seed=0,
    augment=True,
    as_images=True,
):
    """Train and test `tf.data` pipelines of a classification data set.

    No data set is downloaded:

    - `"digits"`: scikit-learn's bundled 8x8 digits (`load_digits`), float32
      in [0, 1], shape `(8, 8, 1)`, 10 classes. The offline default.
    - `"mnist1d"`: MNIST-1D (Greydanus, 2020), generated locally with
      `mnist1d.data.make_dataset()` and its default arguments
      (`mnist1d.data.get_dataset_args()`: 5000 signals of length 40, 4000
      train / 1000 test, standardised to mean 0 and std 1, seed 42, so the
      data themselves do not depend on `seed`). With `as_images=True` each
      signal is a one-row image of shape `(1, 40, 1)` (for 2-D convolutions);
      with `as_images=False` it is a 1-D signal of shape `(40, 1)` (length,
      channels; for 1-D convolutions). 10 classes.
    - `"cifar10"`, `"cifar100"`, `"svhn_cropped"`: tensorflow-datasets data
      sets, read from a prepared local copy in `data_dir` (or the tfds
      default directory, `$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
      Images of shape `(32, 32, 3)`, scaled to [0, 1] and normalised per
      channel with the fixed constants of `NORMALIZATION`. With `augment`,
      the training images get the standard CIFAR augmentation, made of
      Keras preprocessing layers: 4-pixel zero padding, a random 32x32 crop
      and a random horizontal flip, drawn per image.

    Augmentation applies only to the tfds image sets and only to the train
    pipeline; `digits` and `mnist1d` are never augmented. The train pipeline
    is shuffled (seeded by `seed`, reshuffled each epoch), batched and
    prefetched; the test pipeline is batched and prefetched, in a fixed
    order. Labels are int32 class indices. With `as_images=False`, images of
    `digits` and the tfds sets are flattened to vectors (after any
    augmentation).

    Args:
        name: One of `DATASETS`.
        batch_size: Positive number of examples per batch. The last batch may
            be smaller.
        data_dir: Directory of prepared tensorflow-datasets data (the
            `data_dir` of `tfds.load`), used for the tfds names only. `None`
            means the tfds default directory.
        seed: Seed of the shuffle, of the augmentation and of the `digits`
            split.
        augment: Whether to augment the training images of the tfds sets.
        as_images: Whether the inputs keep an image layout (see above).

    Returns:
        `(train_ds, test_ds, info)`: two `tf.data.Dataset`s of
        `(inputs, labels)` batches, and a dict with `num_classes`,
        `input_shape` (a tuple, without the batch axis), `num_train` and
        `num_test`.

    Raises:
        ValueError: For an unknown `name` or a `batch_size` that is not a
            positive integer.
        ImportError: If tensorflow-datasets is needed but not installed.
        FileNotFoundError: If a local `data_dir` is not a directory, or a
            tfds data set is not prepared in it (nothing is downloaded).

    Example:

    >>> train_ds, test_ds, info = load("digits", batch_size=32)
    >>> info["input_shape"], info["num_classes"], info["num_train"]
    ((8, 8, 1), 10, 1347)
    >>> x, y = next(iter(train_ds))
    >>> tuple(x.shape), tuple(y.shape)
    ((32, 8, 8, 1), (32,))
    """
    if name not in DATASETS:
        raise ValueError(
            f"`name` must be one of {DATASETS}. Received: name={name!r}"
        )
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size <= 0
    ):
        raise ValueError(
            "`batch_size` must be a positive integer. "
            f"Received: batch_size={batch_size!r}"
        )
    batch_size = int(batch_size)
    if name in TFDS_DATASETS:
        return _load_tfds(name, batch_size, data_dir, seed, augment, as_images)
    if name == "digits":
        (x_train, y_train), (x_test, y_test) = load_digits(seed=seed)
        num_classes = 10
    else:
        (x_train, y_train), (x_test, y_test) = _make_mnist1d(as_images)
        num_classes = 10
    if not as_images and name == "digits":
        x_train = x_train.reshape(len(x_train), -1)
        x_test = x_test.reshape(len(x_test), -1)
    info = {
        "num_classes": num_classes,
        "input_shape": tuple(x_train.shape[1:]),
        "num_train": len(x_train),
        "num_test": len(x_test),
    }
    train_ds = _finish(
        _tf().data.Dataset.from_tensor_slices((x_train, y_train)),
        batch_size,
        shuffle=len(x_train),
        seed=seed,
    )
    test_ds = _finish(
        _tf().data.Dataset.from_tensor_slices((x_test, y_test)), batch_size
    )
    return train_ds, test_ds, info


def _tf():
    import tensorflow as tf

    return tf


def _finish(ds, batch_size, shuffle=0, seed=None, augment_fn=None):
    """Shuffles (train only), maps, batches and prefetches `ds`."""
    tf = _tf()
    if shuffle:
        ds = ds.shuffle(shuffle, seed=seed, reshuffle_each_iteration=True)
    if augment_fn is not None:
        ds = ds.map(augment_fn, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _make_mnist1d(as_images):
    """MNIST-1D from `mnist1d.data.make_dataset()` with its default args."""
    try:
        from mnist1d import data as mnist1d_data
    except ImportError as error:  # pragma: no cover - depends on the install.
        raise ImportError(
            "`name='mnist1d'` needs the `mnist1d` package: pip install mnist1d"
        ) from error
    # make_dataset seeds NumPy's global generator; keep the caller's state.
    state = np.random.get_state()
    try:
        data = mnist1d_data.make_dataset(mnist1d_data.get_dataset_args())
    finally:
        np.random.set_state(state)
    shape = (1, -1, 1) if as_images else (-1, 1)
    x_train = data["x"].astype("float32")
    x_test = data["x_test"].astype("float32")
    x_train = x_train.reshape((len(x_train),) + shape)
    x_test = x_test.reshape((len(x_test),) + shape)
    y_train = np.asarray(data["y"], dtype="int32")
    y_test = np.asarray(data["y_test"], dtype="int32")
    return (x_train, y_train), (x_test, y_test)


def _import_tfds(name):
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(
            f"Data set {name!r} is read with tensorflow-datasets, which is not "
            "installed: pip install tensorflow-datasets"
        ) from error
    return tfds


def _missing_message(name, data_dir):
    where = data_dir if data_dir is not None else "the tfds default directory"
    return (
        f"The tensorflow-datasets data set {name!r} is not prepared in "
        f"data_dir={where!s}, and it cannot be downloaded here (offline: "
        "download=False). Prepare it on a machine with network access, e.g. "
        f"`tfds build {name} --data_dir=DIR` or "
        f"`tfds.builder({name!r}, data_dir=DIR).download_and_prepare()`, copy "
        f"DIR/{name}/ next to the other data sets, and pass data_dir=DIR."
    )


def normalization_layer(name):
    """The fixed per-channel normalisation of a tfds image data set.

    Args:
        name: One of `"cifar10"`, `"cifar100"`, `"svhn_cropped"`.

    Returns:
        A `keras.layers.Normalization` with the constants of
        `NORMALIZATION[name]`, for images scaled to [0, 1].

    Example:

    >>> import numpy as np
    >>> layer = normalization_layer("cifar10")
    >>> tuple(layer(np.zeros((1, 32, 32, 3), "float32")).shape)
    (1, 32, 32, 3)
    """
    import keras

    mean, std = NORMALIZATION[name]
    return keras.layers.Normalization(
        mean=list(mean), variance=[s * s for s in std]
    )


def augmentation_layers(seed=0, image_size=32, pad=_PAD):
    """Standard CIFAR augmentation as Keras layers (batch of images in, out).

    Zero padding of `pad` pixels on each side, a random crop back to
    `image_size` and a random horizontal flip. `RandomCrop` draws one offset
    per call, so `load` applies this to one image at a time (a batch of one).

    Args:
        seed: Seed of the random crop and flip.
        image_size: Height and width of the output.
        pad: Pixels of zero padding before the crop.

    Returns:
        A `keras.Sequential` of `ZeroPadding2D`, `RandomCrop`, `RandomFlip`.

    Example:

    >>> import numpy as np
    >>> layers = augmentation_layers(seed=1)
    >>> tuple(layers(np.ones((1, 32, 32, 3)), training=True).shape)
    (1, 32, 32, 3)
    """
    import keras

    return keras.Sequential(
        [
            keras.layers.ZeroPadding2D(pad),
            keras.layers.RandomCrop(image_size, image_size, seed=seed),
            keras.layers.RandomFlip("horizontal", seed=seed + 1),
        ],
        name="cifar_augmentation",
    )


def _load_tfds(name, batch_size, data_dir, seed, augment, as_images):
    tfds = _import_tfds(name)
    tf = _tf()
    if data_dir is not None:
        data_dir = os.fspath(data_dir)
        if "://" not in data_dir and not os.path.isdir(data_dir):
            raise FileNotFoundError(
                "`data_dir` must be an existing directory of prepared "
                f"tensorflow-datasets data (for {name!r}). "
                f"Received: data_dir={data_dir!r}, which is not a directory"
            )
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.is_prepared()
    except (FileNotFoundError, tf.errors.NotFoundError) as error:
        raise FileNotFoundError(_missing_message(name, data_dir)) from error
    if not prepared:
        raise FileNotFoundError(_missing_message(name, data_dir))
    splits = builder.info.splits
    num_train = splits["train"].num_examples
    num_test = splits["test"].num_examples
    rescale = 1.0 / 255.0
    normalize = normalization_layer(name)
    normalize(np.zeros((1, 32, 32, 3), "float32"))  # Build eagerly.
    augmenter = None
    if augment:
        augmenter = augmentation_layers(seed=seed)
        # Create the layers' state (seed generators) eagerly, not in tf.data.
        augmenter(np.zeros((1, 32, 32, 3), "float32"), training=True)

    def prepare(image, label, augment_image=False):
        # The layers see a batch of one image: `RandomCrop` draws one offset
        # per call, and `Normalization` is built for 4-D inputs.
        image = tf.cast(image, "float32")[tf.newaxis] * rescale
        if augment_image:
            image = augmenter(image, training=True)
        image = normalize(image)[0]
        return flatten(image), tf.cast(label, "int32")

    def prepare_train(image, label):
        return prepare(image, label, augment_image=augmenter is not None)

    def prepare_test(image, label):
        return prepare(image, label)

    def flatten(image):
        return image if as_images else tf.reshape(image, [-1])

    read_config = tfds.ReadConfig(shuffle_seed=seed)
    train_ds = builder.as_dataset(
        split="train",
        as_supervised=True,
        shuffle_files=True,
        read_config=read_config,
    )
    test_ds = builder.as_dataset(split="test", as_supervised=True)
    train_ds = _finish(
        train_ds,
        batch_size,
        shuffle=min(num_train, 10_000),
        seed=seed,
        augment_fn=prepare_train,
    )
    test_ds = _finish(test_ds, batch_size, augment_fn=prepare_test)
    shape = (32, 32, 3)
    info = {
        "num_classes": _NUM_CLASSES[name],
        "input_shape": shape if as_images else (int(np.prod(shape)),),
        "num_train": num_train,
        "num_test": num_test,
    }
    return train_ds, test_ds, info
