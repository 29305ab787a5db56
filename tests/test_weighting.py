"""Loss weights of the paper's Eq. 5 and the checks of explicit weights and
depths (`keras_mwbp.weighting`)."""

import math
import re

import pytest

import keras_mwbp
from keras_mwbp import weighting


def test_gammas_of_resnet56_5_depths_are_squared_depth_ratios():
    gammas = keras_mwbp.gammas_from_depths([15, 25, 35, 45, 56], nu=2)
    # gamma_i = (L_i / L_{K-1})^2 with L_{K-1} = 45; the final weight is 1.
    expected = (1 / 9, 25 / 81, 49 / 81, 1.0, 1.0)
    assert isinstance(gammas, tuple)
    assert len(gammas) == 5
    for actual, wanted in zip(gammas, expected):
        assert actual == pytest.approx(wanted, rel=1e-12, abs=0.0)


def test_gammas_are_floored_at_one_hundredth():
    gammas = keras_mwbp.gammas_from_depths([1, 45, 56], nu=2)
    # (1 / 45)^2 = 4.9e-4 is below the floor.
    assert gammas == (0.01, 1.0, 1.0)
    assert weighting.GAMMA_FLOOR == 0.01


def test_gammas_just_above_the_floor_are_kept():
    # (1 / 9)^2 = 0.0123 > 0.01.
    gammas = keras_mwbp.gammas_from_depths([1, 9, 12], nu=2)
    assert gammas[0] == pytest.approx(1 / 81, rel=1e-12)
    assert gammas[1:] == (1.0, 1.0)


def test_gammas_with_nu_one_are_linear_in_depth():
    gammas = keras_mwbp.gammas_from_depths([10, 20, 40, 50], nu=1)
    assert gammas[:3] == pytest.approx((0.25, 0.5, 1.0), rel=1e-12)
    assert gammas[3] == 1.0


def test_gammas_with_fractional_nu():
    gammas = keras_mwbp.gammas_from_depths([16, 64, 70], nu=0.5)
    assert gammas == pytest.approx((0.5, 1.0, 1.0), rel=1e-12)


def test_gammas_of_a_single_loss_is_one():
    assert keras_mwbp.gammas_from_depths([7], nu=2) == (1.0,)


@pytest.mark.parametrize(
    "nu", [0, 0.0, -1, -0.5, float("nan"), float("inf"), True, False, "2", None]
)
def test_gammas_reject_invalid_nu(nu):
    with pytest.raises(ValueError) as info:
        keras_mwbp.gammas_from_depths([1, 2, 3], nu=nu)
    message = str(info.value)
    assert "`nu`" in message
    assert f"Received: nu={nu!r}" in message


def test_check_nu_accepts_positive_numbers():
    for nu in (1e-3, 0.5, 2, 2.0, 10):
        assert weighting.check_nu(nu) is None


def test_check_head_weights_returns_floats():
    assert weighting.check_head_weights([0.5, 1], 2) == (0.5, 1.0)
    assert all(type(w) is float for w in weighting.check_head_weights((1, 1), 2))


@pytest.mark.parametrize("weights", [[0.5], [0.2, 0.5, 1.0]])
def test_check_head_weights_rejects_wrong_length(weights):
    with pytest.raises(ValueError, match=r"`head_weights` must have one weight "
                       r"per output \(2 outputs\)") as info:
        weighting.check_head_weights(weights, 2)
    assert f"Received: head_weights={weights!r}" in str(info.value)


@pytest.mark.parametrize(
    "weights", [[0.0, 1.0], [-0.1, 1.0], [0.5, 1.5], [float("nan"), 1.0],
                [True, 1.0], ["0.5", 1.0]]
)
def test_check_head_weights_rejects_values_outside_zero_one(weights):
    with pytest.raises(ValueError) as info:
        weighting.check_head_weights(weights, 2)
    message = str(info.value)
    assert message.startswith(
        "Every entry of `head_weights` must be a number in (0, 1]."
    )
    assert f"Received: head_weights={weights!r}" in message


def test_check_head_weights_rejects_a_non_sequence():
    with pytest.raises(ValueError, match=re.escape(
            "`head_weights` must be a list with one weight per output. "
            "Received: head_weights=0.5")):
        weighting.check_head_weights(0.5, 2)


def test_check_head_depths_returns_ints():
    assert weighting.check_head_depths([1, 3, 7], 3) == (1, 3, 7)


@pytest.mark.parametrize("depths", [[1, 2], [1, 2, 3, 4]])
def test_check_head_depths_rejects_wrong_length(depths):
    with pytest.raises(ValueError, match=r"`head_depths` must have one depth "
                       r"per output \(3 outputs\)") as info:
        weighting.check_head_depths(depths, 3)
    assert f"Received: head_depths={depths!r}" in str(info.value)


@pytest.mark.parametrize("depths", [[1, 3, 3], [2, 1, 3], [1, 5, 4]])
def test_check_head_depths_rejects_non_increasing_depths(depths):
    with pytest.raises(ValueError) as info:
        weighting.check_head_depths(depths, 3)
    assert str(info.value) == (
        "`head_depths` must increase strictly from the shallowest head to the "
        f"final one. Received: head_depths={depths!r}"
    )


@pytest.mark.parametrize("depths", [[0, 1, 2], [-1, 1, 2], [1.0, 2, 3],
                                    [True, 2, 3]])
def test_check_head_depths_rejects_non_positive_integers(depths):
    with pytest.raises(ValueError) as info:
        weighting.check_head_depths(depths, 3)
    assert str(info.value) == (
        "Every entry of `head_depths` must be a positive integer. "
        f"Received: head_depths={depths!r}"
    )


def test_check_head_depths_rejects_a_non_sequence():
    with pytest.raises(ValueError, match=re.escape(
            "`head_depths` must be a list with one depth per output. "
            "Received: head_depths=3")):
        weighting.check_head_depths(3, 3)


def test_gammas_follow_given_depths_through_the_formula():
    depths = [3, 6, 9]
    for nu in (0.5, 1.0, 2.0, 3.0):
        gammas = keras_mwbp.gammas_from_depths(depths, nu=nu)
        assert gammas[0] == pytest.approx(max(0.01, 0.5 ** nu), rel=1e-12)
        assert gammas[1] == 1.0 and gammas[2] == 1.0
        assert not math.isnan(gammas[0])
