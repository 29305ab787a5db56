import numpy as np
import pytest

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
