"""Small data sets that need no download."""

import numpy as np
from sklearn import datasets
from sklearn import model_selection


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
