"""Calibrators against golden values, ECE against a hand-computed example, threshold picking."""
import numpy as np
import pytest
from scipy.special import expit
from sklearn.calibration import _SigmoidCalibration
from sklearn.isotonic import IsotonicRegression

from core.ml.calibration import (IsotonicCalibration, PlattScaling, TemperatureScaling, calibrator_from_dict,
                                 calibrator_to_dict, confusion_at, expected_calibration_error, fit_and_select,
                                 threshold_for_sensitivity)


def synthetic(n=20000, temperature=2.0, seed=0):
    rng = np.random.default_rng(seed)
    true_logit = rng.normal(0.0, 2.5, n)
    y = (rng.random(n) < expit(true_logit)).astype(int)
    return true_logit * temperature, y  # an over-confident model: logits T times too large


def test_ece_matches_hand_computed_example():
    probs = [0.10, 0.12, 0.20, 0.90, 0.95, 1.00]
    labels = [1, 0, 1, 1, 1, 1]
    # bins (15 equal-width): 1,1,3,13,14,14 → (2/6)|0.11−0.5| + (1/6)|0.2−1| + (1/6)|0.9−1| + (2/6)|0.975−1|
    expected = 2 / 6 * 0.39 + 1 / 6 * 0.8 + 1 / 6 * 0.1 + 2 / 6 * 0.025
    assert expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.288333333, abs=1e-8)


def test_temperature_recovers_known_temperature():
    z, y = synthetic(temperature=2.0)
    cal = TemperatureScaling().fit(z, y)
    assert cal.temperature_ == pytest.approx(2.0, abs=0.08)
    assert expected_calibration_error(cal.predict(z), y) < 0.015 < expected_calibration_error(expit(z), y)


def test_platt_matches_scikit_learn_sigmoid_calibration():
    z, y = synthetic(n=3000, temperature=1.7, seed=1)
    ours = PlattScaling().fit(z, y)
    ref = _SigmoidCalibration().fit(z, y)
    np.testing.assert_allclose(ours.predict(z), ref.predict(z), atol=2e-4)


def test_isotonic_matches_scikit_learn_including_clipping():
    z, y = synthetic(n=2000, seed=2)
    ours = IsotonicCalibration().fit(z, y)
    ref = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(z, y)
    probe = np.concatenate([z[:200], [z.min() - 5, z.max() + 5]])
    np.testing.assert_allclose(ours.predict(probe), ref.predict(probe), atol=1e-12)


@pytest.mark.parametrize("cls", [TemperatureScaling, PlattScaling, IsotonicCalibration])
def test_calibrators_round_trip_through_json(cls):
    z, y = synthetic(n=500, seed=3)
    cal = cls().fit(z, y)
    again = calibrator_from_dict(calibrator_to_dict(cal))
    np.testing.assert_array_equal(again.predict(z), cal.predict(z))


def test_threshold_for_sensitivity_and_confusion():
    scores = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.55, 0.05])
    labels = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    t = threshold_for_sensitivity(scores, labels, 0.9)
    assert t == 0.2  # the 9th highest of 10 positives
    c = confusion_at(scores, labels, t)
    assert (c["tp"], c["fn"], c["fp"], c["tn"]) == (9, 1, 1, 1)
    assert c["sensitivity"] == 0.9 and c["specificity"] == 0.5


def test_fit_and_select_keeps_lowest_ece_on_the_second_set():
    z, y = synthetic(n=4000, temperature=3.0, seed=4)
    best, table = fit_and_select(z[:2000], y[:2000], z[2000:], y[2000:])
    assert set(table) == {"none", "temperature", "platt", "isotonic"}
    assert best.kind == min(("temperature", "platt", "isotonic"), key=lambda k: table[k]["ece"])
    assert table[best.kind]["ece"] < table["none"]["ece"]
