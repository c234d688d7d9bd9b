"""Metric functions against cases computed by hand."""

import math

import numpy as np
import pytest

from fsg_endo.engine.metrics import classification_metrics, confusion_matrix, metric_key, regression_metrics


def test_regression_metrics_by_hand():
    # errors 1, 0, 2, 0.5 mm
    out = regression_metrics([1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 5.0, 4.5])
    assert out["mae"] == pytest.approx(3.5 / 4)
    assert out["rmse"] == pytest.approx(math.sqrt((1 + 0 + 4 + 0.25) / 4))
    assert out["within_1mm"] == pytest.approx(3 / 4)


def test_within_1mm_counts_the_boundary_despite_float_noise():
    assert 2.2 - 1.2 > 1.0  # the float noise the tolerance absorbs
    out = regression_metrics([1.2, 10.0, 3.0], [2.2, 11.0, 4.01])
    assert out["within_1mm"] == pytest.approx(2 / 3)


def test_classification_metrics_by_hand():
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    out = classification_metrics(y_true, y_pred, 3, names=("diminutive", "small", "large"))
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)  # mean recall
    f1 = {"diminutive": 2 * 2 / (2 * 2 + 0 + 1), "small": 2 / (2 + 1 + 1), "large": 2 / (2 + 1 + 0)}
    for name, value in f1.items():
        assert out[f"f1_{name}"] == pytest.approx(value)
    assert out["macro_f1"] == pytest.approx(sum(f1.values()) / 3)
    assert "auroc" not in out


def test_per_class_f1_uses_indices_without_names():
    out = classification_metrics([0, 1], [0, 0], 2)
    assert out["f1_0"] == pytest.approx(2 / 3) and out["f1_1"] == 0.0


def test_class_absent_everywhere_is_nan_and_left_out_of_macro_f1():
    out = classification_metrics([0, 0, 1], [0, 0, 1], 3)
    assert math.isnan(out["f1_2"])
    assert out["macro_f1"] == pytest.approx(1.0)


def test_binary_auroc_by_hand_from_scores_or_probabilities():
    y_true = [0, 0, 1, 1]
    score = np.array([0.1, 0.4, 0.35, 0.8])
    # positive-negative pairs ranked right: (0.35, 0.1), (0.8, 0.1), (0.8, 0.4) -> 3 of 4
    out = classification_metrics(y_true, (score > 0.5).astype(int), 2, prob=score)
    assert out["auroc"] == pytest.approx(0.75)
    prob = np.stack([1 - score, score], axis=1)
    assert classification_metrics(y_true, [0, 0, 0, 1], 2, prob=prob)["auroc"] == pytest.approx(0.75)


def test_auroc_with_one_class_present_is_nan():
    out = classification_metrics([1, 1, 1], [1, 0, 1], 2, prob=np.array([0.9, 0.2, 0.7]))
    assert math.isnan(out["auroc"])
    assert out["accuracy"] == pytest.approx(2 / 3)


def test_empty_input_gives_nan_without_crashing():
    assert all(math.isnan(v) for v in regression_metrics([], []).values())
    assert all(math.isnan(v) for v in classification_metrics([], [], 2, prob=np.zeros((0, 2))).values())


def test_confusion_matrix_by_hand_keeps_absent_classes():
    cm = confusion_matrix([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], 3)
    np.testing.assert_array_equal(cm, [[2, 1, 0], [0, 1, 1], [0, 0, 1]])
    np.testing.assert_array_equal(confusion_matrix([0, 0], [0, 0], 3), [[2, 0, 0], [0, 0, 0], [0, 0, 0]])


@pytest.mark.parametrize(
    "name, key", [("<10mm", "lt10mm"), (">=10mm", "ge10mm"), ("small", "small"), ("a b/c", "a_b_c")]
)
def test_metric_key_is_mlflow_safe(name, key):
    assert metric_key(name) == key
