"""Tasks: loss weights at the size boundaries, predictions, lesion aggregation and metrics by hand."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from fsg_endo.engine.evaluation import is_better
from fsg_endo.engine.tasks import get_task
from fsg_endo.errors import FsgEndoError


def _scaled(size_mm):
    """The documented target scaling written out: [0.5, 20] mm -> [-1, 1]."""
    return 2.0 * (np.asarray(size_mm, dtype=float) - 0.5) / 19.5 - 1.0


def _batch(sizes, lesions=None, videos=None):
    sizes = torch.tensor(sizes, dtype=torch.float32)
    n = len(sizes)
    lesions = lesions or [f"L{k}" for k in range(n)]
    return {
        "size_mm": sizes,
        "target_reg": torch.tensor(_scaled(sizes.numpy()), dtype=torch.float32),
        "size_class3": torch.tensor([0 if s <= 5 else 1 if s < 10 else 2 for s in sizes.tolist()]),
        "size_class2": torch.tensor([int(s >= 10) for s in sizes.tolist()]),
        "lesion_id": lesions,
        "video_id": videos or ["V0"] * n,
        "frame_id": torch.arange(n),
    }


@pytest.mark.parametrize(
    "name, n, kind, metric, mode",
    [
        ("size_regression", 1, "regression", "mae", "min"),
        ("size_class3", 3, "classification", "balanced_accuracy", "max"),
        ("size_class2", 2, "classification", "balanced_accuracy", "max"),
    ],
)
def test_task_attributes(name, n, kind, metric, mode):
    task = get_task(name)
    assert (task.name, task.num_outputs, task.kind, task.main_metric, task.mode) == (name, n, kind, metric, mode)


def test_unknown_task_is_a_user_error():
    with pytest.raises(FsgEndoError, match="size_regresion"):
        get_task("size_regresion")


def test_weighted_smooth_l1_by_hand_at_the_size_boundaries():
    task = get_task("size_regression")
    sizes = [5.0, 9.9, 10.0, 3.0]  # weight classes: <=5, (5, 10), >=10, <=5
    diffs = np.array([0.5, 2.0, -0.2, 0.0])
    outputs = torch.tensor(_scaled(sizes) + diffs, dtype=torch.float32).reshape(-1, 1)
    targets = task.targets(_batch(sizes))
    # smooth-L1 (beta 1): 0.5 d^2 below 1, |d| - 0.5 above
    per_sample = np.array([0.5 * 0.25, 2.0 - 0.5, 0.5 * 0.04, 0.0])
    main = (1 * per_sample[0] + 3 * per_sample[1] + 5 * per_sample[2] + 1 * per_sample[3]) / (1 + 3 + 5 + 1)
    gate = (1 * per_sample[0] + 5 * per_sample[1] + 10 * per_sample[2] + 1 * per_sample[3]) / (1 + 5 + 10 + 1)
    assert task.main_loss(outputs, targets).item() == pytest.approx(main, rel=1e-5)
    assert task.gate_loss(outputs, targets).item() == pytest.approx(gate, rel=1e-5)
    assert task.main_loss(outputs.reshape(-1), targets).item() == pytest.approx(main, rel=1e-5)


def test_smooth_l1_beta_by_hand():
    task = get_task("size_regression", main_weights=(1.0, 1.0, 1.0), beta=0.1)
    sizes = [3.0, 7.0]
    diffs = np.array([0.05, -0.4])  # below and above beta
    outputs = torch.tensor(_scaled(sizes) + diffs, dtype=torch.float32)
    # smooth-L1 (beta b): 0.5 d^2 / b below b, |d| - 0.5 b above
    per_sample = [0.5 * 0.05**2 / 0.1, 0.4 - 0.05]
    assert task.main_loss(outputs, task.targets(_batch(sizes))).item() == pytest.approx(np.mean(per_sample), rel=1e-5)


def test_custom_loss_weights_and_gradient():
    task = get_task("size_regression", main_weights=(2.0, 1.0, 1.0), gate_weights=(1.0, 1.0, 1.0))
    sizes = [4.0, 12.0]
    outputs = torch.tensor(_scaled(sizes) + np.array([0.4, 0.2]), dtype=torch.float32, requires_grad=True)
    loss = task.main_loss(outputs, task.targets(_batch(sizes)))
    assert loss.item() == pytest.approx((2 * 0.5 * 0.16 + 1 * 0.5 * 0.04) / 3, rel=1e-5)
    loss.backward()
    # d/dy of w * 0.5 d^2 / sum(w) = w * d / sum(w)
    np.testing.assert_allclose(outputs.grad.numpy(), [2 * 0.4 / 3, 1 * 0.2 / 3], rtol=1e-5)


def test_bad_loss_weights_are_a_user_error():
    with pytest.raises(FsgEndoError, match="3 positive"):
        get_task("size_regression", main_weights=(1.0, 3.0))


def test_cross_entropy_by_hand():
    task = get_task("size_class3")
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    batch = _batch([3.0, 7.0])
    targets = task.targets(batch)
    assert targets.tolist() == [0, 1]
    logp0 = 2.0 - math.log(math.exp(2.0) + 1 + math.exp(-1.0))
    logp1 = 1.0 - math.log(2 + math.e)
    assert task.main_loss(logits, targets).item() == pytest.approx(-(logp0 + logp1) / 2, rel=1e-5)
    assert task.gate_loss(logits, targets).item() == pytest.approx(-(logp0 + logp1) / 2, rel=1e-5)


def test_regression_frame_predictions_in_mm():
    task = get_task("size_regression")
    batch = _batch([2.0, 12.0, 7.0], videos=["V0", "V1", "V1"])
    pred = task.outputs_to_numpy(torch.tensor([[-1.0], [0.0], [1.0]]))
    np.testing.assert_allclose(pred, [0.5, 10.25, 20.0])
    df = task.frame_predictions(batch, pred)
    assert list(df.columns[:6]) == ["lesion_id", "video_id", "frame_id", "target", "prediction", "size_mm"]
    assert df["target"].tolist() == [2.0, 12.0, 7.0]
    assert df["video_id"].tolist() == ["V0", "V1", "V1"] and df["frame_id"].tolist() == [0, 1, 2]


def test_regression_lesion_prediction_is_the_frame_mean():
    task = get_task("size_regression")
    frames = pd.DataFrame(
        {
            "lesion_id": ["A", "B", "A", "A"],
            "video_id": ["V0", "V1", "V0", "V0"],
            "frame_id": [0, 0, 1, 2],
            "target": [4.0, 11.0, 4.0, 4.0],
            "prediction": [3.0, 12.0, 6.0, 6.0],
            "size_mm": [4.0, 11.0, 4.0, 4.0],
        }
    )
    lesions = task.lesion_predictions(frames).set_index("lesion_id")
    assert lesions.loc["A", "prediction"] == pytest.approx(5.0)
    assert lesions.loc["B", "prediction"] == pytest.approx(12.0)
    assert lesions.loc["A", "n_frames"] == 3 and lesions.loc["B", "video_id"] == "V1"
    assert lesions.loc["A", "target"] == 4.0 and lesions.loc["A", "size_mm"] == 4.0


def test_classification_lesion_uses_mean_probabilities_not_majority_vote():
    task = get_task("size_class2")
    batch = _batch([12.0, 12.0, 12.0], lesions=["A", "A", "A"])
    prob = np.array([[0.6, 0.4], [0.6, 0.4], [0.0, 1.0]])  # majority says 0, mean [0.4, 0.6] says 1
    frames = task.frame_predictions(batch, prob)
    assert frames["prediction"].tolist() == [0, 0, 1]
    assert frames["target"].tolist() == [1, 1, 1]
    lesion = task.lesion_predictions(frames)
    assert len(lesion) == 1 and lesion["prediction"].item() == 1
    np.testing.assert_allclose(lesion[["prob_0", "prob_1"]].to_numpy(), [[0.4, 0.6]])


def test_classification_outputs_are_probabilities():
    task = get_task("size_class3")
    prob = task.outputs_to_numpy(torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]))
    np.testing.assert_allclose(prob[0], [1 / 3] * 3, rtol=1e-6)
    np.testing.assert_allclose(prob.sum(axis=1), [1.0, 1.0], rtol=1e-6)


def test_regression_metrics_include_class_metrics_by_hand():
    task = get_task("size_regression")
    df = pd.DataFrame({"target": [3.0, 7.0, 12.0], "prediction": [4.0, 11.0, 12.0]})
    out = task.compute_metrics(df)
    assert out["mae"] == pytest.approx(5 / 3)
    assert out["within_1mm"] == pytest.approx(2 / 3)
    # classes: true [0, 1, 2] / [0, 0, 1]; predicted [0, 2, 2] / [0, 1, 1]
    assert out["cls3_accuracy"] == pytest.approx(2 / 3)
    assert out["cls3_balanced_accuracy"] == pytest.approx(2 / 3)
    assert out["cls3_f1_small"] == 0.0
    assert out["cls2_accuracy"] == pytest.approx(2 / 3)
    assert out["cls2_balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
    assert out["cls2_auroc"] == pytest.approx(1.0)  # 12 mm ranks above 4 and 11 mm
    np.testing.assert_array_equal(task.confusion(df), [[1, 0, 0], [0, 0, 1], [0, 0, 1]])


def test_classification_metrics_and_confusion():
    task = get_task("size_class2")
    df = pd.DataFrame(
        {
            "target": [0, 0, 1, 1],
            "prediction": [0, 1, 1, 1],
            "prob_0": [0.9, 0.4, 0.3, 0.2],
            "prob_1": [0.1, 0.6, 0.7, 0.8],
        }
    )
    out = task.compute_metrics(df)
    assert out["accuracy"] == pytest.approx(3 / 4)
    assert out["auroc"] == pytest.approx(1.0)
    assert set(out) >= {"balanced_accuracy", "macro_f1", "f1_lt10mm", "f1_ge10mm"}
    np.testing.assert_array_equal(task.confusion(df), [[1, 1], [0, 2]])


def test_is_better_follows_the_mode():
    reg, cls = get_task("size_regression"), get_task("size_class3")
    assert is_better(1.0, 2.0, reg.mode) and not is_better(2.0, 1.0, reg.mode) and is_better(3.0, None, reg.mode)
    assert is_better(0.8, 0.5, cls.mode) and not is_better(0.5, 0.8, cls.mode)
    assert is_better(0.1, float("nan"), cls.mode)
    assert not is_better(float("nan"), 0.5, cls.mode)
