"""The sweep report against hand computations, and the lesion bootstrap CI over videos."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fsg_endo.engine.evaluation import lesion_bootstrap_ci, pooled_metric, video_sums
from fsg_endo.engine.tasks import get_task
from fsg_endo.errors import FsgEndoError
from fsg_endo.experiment.analysis import summarize, wilcoxon_min_p
from fsg_endo.experiment.report import COLUMNS, axis_report, corrected_t, holm, sweep_report

METRIC = "lesion/test/mae"


def sweep_rows(values: dict[str, list[float]], fractions=(0.5,), grid_points=("",), test=20.0, train=60.0):
    """Finished children: per arm one metric value per (fraction, grid point, fold, seed) cell, in order."""
    cells = list(itertools.product(fractions, grid_points, range(3), range(2)))
    rows = [
        {
            "regularizer": arm,
            "train_fraction": f,
            "grid_point": g,
            "fold": fold,
            "seed": seed,
            METRIC: v,
            "data/test_lesions": test,
            "data/train_lesions": train * f,
            "status": "FINISHED",
        }
        for arm, vs in values.items()
        for (f, g, fold, seed), v in zip(cells, vs)
    ]
    return pd.DataFrame(rows)


def _exact_wilcoxon_p(diff: list[float]) -> float:
    """Two-sided exact signed-rank p by enumerating every sign assignment (no ties, no zeros)."""
    ranks = np.argsort(np.argsort(np.abs(diff))) + 1
    w_obs = ranks[np.asarray(diff) > 0].sum()
    total = ranks.sum()
    sums = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=len(diff))]
    extreme = abs(w_obs - total / 2)
    return sum(abs(w - total / 2) >= extreme - 1e-12 for w in sums) / len(sums)


def test_wilcoxon_column_is_the_exact_signed_rank_test():
    gr = [4.0, 5.5, 3.0, 6.25, 5.0, 4.0]
    none = [5.0, 5.0, 4.5, 8.0, 5.3, 6.1]  # distinct |diff|, no zeros
    row = sweep_report(sweep_rows({"none": none, "fsg_gr": gr}), METRIC, ["fsg_gr"]).iloc[0]
    assert row["p_wilcoxon"] == pytest.approx(_exact_wilcoxon_p(list(np.subtract(none, gr))))
    smallest = min(
        _exact_wilcoxon_p([s * r for s, r in zip(signs, range(1, 7))]) for signs in itertools.product([-1, 1], repeat=6)
    )
    assert wilcoxon_min_p(6) == pytest.approx(smallest)


def test_corrected_t_by_hand():
    diff = np.array([0.3, -0.1, 0.4, 0.2, 0.5, 0.1])
    n, ratio = len(diff), 20 / 30
    mean = sum(diff) / n
    var = sum((d - mean) ** 2 for d in diff) / (n - 1)
    t = mean / math.sqrt((1 / n + ratio) * var)
    p, low, high = corrected_t(diff, ratio)
    assert p == pytest.approx(2 * (1 - stats.t.cdf(abs(t), n - 1)))
    half = stats.t.ppf(0.975, n - 1) * math.sqrt((1 / n + ratio) * var)
    assert (low, high) == pytest.approx((mean - half, mean + half))
    # without the correction term it is the ordinary paired t-test
    assert corrected_t(diff, 0.0)[0] == pytest.approx(stats.ttest_1samp(diff, 0.0).pvalue)
    assert p > corrected_t(diff, 0.0)[0]  # overlapping training sets make the evidence weaker
    assert all(math.isnan(v) for v in corrected_t(diff[:1], ratio))


def test_holm_by_hand():
    p = [0.01, 0.04, 0.03, 0.005, np.nan]
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04 -> running max
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, 0.02, np.nan])
    assert holm([0.6, 0.5])[0] == 1.0


def test_report_rows_pair_cells_and_match_hand_statistics():
    gr = [5.0, 5.2, 4.9, 5.1, 5.3, 5.0]
    frozen = [5.1, 5.0, 5.0, 5.4, 5.2, 5.3]
    none = [6.0, 6.5, 5.9, 6.1, 6.3, 6.2]
    report = sweep_report(sweep_rows({"none": none, "fsg_frozen": frozen, "fsg_gr": gr}), METRIC)
    assert list(report.columns) == COLUMNS
    assert set(zip(report["arm"], report["reference"])) == {
        ("none", "fsg_gr"),
        ("fsg_frozen", "fsg_gr"),
        ("fsg_frozen", "none"),
        ("fsg_gr", "none"),
    }
    row = report[(report["arm"] == "fsg_frozen") & (report["reference"] == "fsg_gr")].iloc[0]
    diff = np.subtract(frozen, gr)
    assert row["n"] == 6 and row["mean"] == pytest.approx(np.mean(frozen))
    assert row["std"] == pytest.approx(np.std(frozen, ddof=1))
    assert row["diff_mean"] == pytest.approx(diff.mean())
    assert row["effect_size"] == pytest.approx(diff.mean() / np.std(diff, ddof=1))
    assert row["p_wilcoxon"] == pytest.approx(stats.wilcoxon(frozen, gr).pvalue)
    ratio = 20.0 / 30.0  # n_test / n_train of the cells
    se = math.sqrt((1 / 6 + ratio) * np.var(diff, ddof=1))
    assert row["p_corrected_t"] == pytest.approx(2 * stats.t.sf(abs(diff.mean()) / se, 5))
    assert row["diff_ci_low"] == pytest.approx(diff.mean() - stats.t.ppf(0.975, 5) * se)
    np.testing.assert_allclose(report["p_holm"], holm(report["p_corrected_t"]))
    mirror = report[(report["arm"] == "fsg_gr") & (report["reference"] == "none")].iloc[0]
    assert mirror["diff_mean"] == pytest.approx(np.mean(np.subtract(gr, none)))


def test_a_validation_metric_is_corrected_by_the_validation_fold_size():
    gr, none = [5.0, 5.2, 4.9, 5.1, 5.3, 5.0], [6.0, 6.5, 5.9, 6.1, 6.3, 6.2]
    rows = sweep_rows({"none": none, "fsg_gr": gr}).rename(columns={METRIC: "lesion/val/mae"})
    rows["data/val_lesions"] = 12.0  # the test fold (20 lesions) plays no part in a validation comparison
    row = sweep_report(rows, "lesion/val/mae", ["fsg_gr"]).iloc[0]
    diff = np.subtract(none, gr)
    se = math.sqrt((1 / 6 + 12.0 / 30.0) * np.var(diff, ddof=1))
    assert row["p_corrected_t"] == pytest.approx(2 * stats.t.sf(abs(diff.mean()) / se, 5))


def test_report_pairs_within_train_fraction_and_grid_point_only():
    points = ("gr.gate_lr=0.001", "gr.gate_lr=0.1")
    rng = np.random.default_rng(0)
    values = {arm: list(rng.normal(5, 1, 24)) for arm in ("none", "fsg", "fsg_gr")}
    runs = sweep_rows(values, fractions=(0.25, 1.0), grid_points=points)
    missing = (runs["regularizer"] == "fsg") & (runs["fold"] == 0) & (runs["train_fraction"] == 1.0)
    report = sweep_report(runs[~missing], METRIC, ["fsg_gr"])
    assert list(report.columns) == COLUMNS[:1] + ["grid_point"] + COLUMNS[1:]
    assert len(report) == 2 * 2 * 2  # (fraction, grid point) x arms none, fsg
    row = report[(report["train_fraction"] == 1.0) & (report["grid_point"] == points[1]) & (report["arm"] == "fsg")]
    cell = runs[(runs["train_fraction"] == 1.0) & (runs["grid_point"] == points[1]) & (runs["fold"] > 0)]
    by_arm = cell.pivot_table(index=["fold", "seed"], columns="regularizer", values=METRIC)
    assert row["n"].item() == 4
    assert row["diff_mean"].item() == pytest.approx((by_arm["fsg"] - by_arm["fsg_gr"]).mean())


def test_axis_report_pairs_values_of_one_key_within_each_arm():
    points = [f"gr.gate_lr={lr},model.weights={w}" for lr in ("0.1", "1") for w in ("none", "runs:/abc/backbone.pt")]
    rng = np.random.default_rng(1)
    runs = sweep_rows({arm: list(rng.normal(5, 1, 24)) for arm in ("fsg_gr", "fsg_frozen")}, grid_points=points)
    report = axis_report(runs, METRIC, "model.weights", "none")
    assert set(zip(report["arm"], report["reference"])) == {
        (f"{a} @ model.weights=runs:/abc/backbone.pt", f"{a} @ model.weights=none") for a in ("fsg_gr", "fsg_frozen")
    }
    assert sorted(report["grid_point"]) == ["gr.gate_lr=0.1", "gr.gate_lr=0.1", "gr.gate_lr=1", "gr.gate_lr=1"]
    row = report[report["arm"].str.startswith("fsg_frozen") & (report["grid_point"] == "gr.gate_lr=1")].iloc[0]
    frozen = runs[runs["regularizer"] == "fsg_frozen"].set_index(["grid_point", "fold", "seed"])[METRIC]
    diff = frozen.loc[points[3]] - frozen.loc[points[2]]  # pretrained minus scratch, same lr, per (fold, seed)
    assert row["n"] == 6 and row["diff_mean"] == pytest.approx(diff.mean())
    assert row["mean"] == pytest.approx(frozen.loc[points[3]].mean())
    np.testing.assert_allclose(report["p_holm"], holm(report["p_corrected_t"]))
    with pytest.raises(FsgEndoError, match="--axis optim.lr: not a grid key"):
        axis_report(runs, METRIC, "optim.lr")
    with pytest.raises(FsgEndoError, match="no run has model.weights=x"):
        axis_report(runs, METRIC, "model.weights", "x")


def test_report_needs_a_reference():
    with pytest.raises(FsgEndoError, match="reference"):
        sweep_report(sweep_rows({"none": [1.0] * 6, "dropout": [2.0] * 6}), METRIC, ["fsg_gr"])


@pytest.mark.parametrize("task_name", ["size_regression", "size_class3"])
def test_video_sums_give_the_task_metric_of_any_resample(task_name):
    task = get_task(task_name)
    rng = np.random.default_rng(1)
    n = 30
    lesions = pd.DataFrame({"lesion_id": range(n), "video_id": rng.integers(0, 8, n)})
    if task.kind == "regression":
        lesions["target"] = lesions["size_mm"] = rng.uniform(2, 15, n)
        lesions["prediction"] = lesions["target"] + rng.normal(0, 2, n)
    else:
        lesions["target"], lesions["prediction"] = rng.integers(0, 3, n), rng.integers(0, 3, n)
        lesions["size_mm"] = 5.0
        for k in range(3):
            lesions[f"prob_{k}"] = (lesions["prediction"] == k).astype(float)
    num, den = video_sums(task, lesions)
    videos = pd.factorize(lesions["video_id"])[0]
    for _ in range(5):
        pick = rng.integers(0, num.shape[0], num.shape[0])
        resample = pd.concat([lesions[videos == v] for v in pick])
        assert pooled_metric(num[pick], den[pick]) == pytest.approx(task.compute_metrics(resample)[task.main_metric])
    low, high = lesion_bootstrap_ci(task, lesions, seed=0)
    point = task.compute_metrics(lesions)[task.main_metric]
    assert low < point < high
    assert lesion_bootstrap_ci(task, lesions, seed=0) == (low, high)
    assert all(math.isnan(v) for v in lesion_bootstrap_ci(task, lesions.assign(video_id=0)))


def test_summaries_keep_grid_points_apart():
    runs = sweep_rows({"fsg_gr": [1.0] * 6 + [3.0] * 6}, grid_points=("gr.gate_lr=0.001", "gr.gate_lr=0.1"))
    table = summarize(runs, [METRIC])
    assert table.index.names == ["regularizer", "train_fraction", "grid_point"]
    assert table[f"{METRIC} mean"].tolist() == [1.0, 3.0] and table[f"{METRIC} count"].tolist() == [6, 6]
    assert summarize(runs.assign(grid_point=""), [METRIC]).index.names == ["regularizer", "train_fraction"]


def test_report_reads_the_children_of_several_sweeps_together(tmp_path):
    """Two sweeps on the same cells: one ran fsg_gr from two backbones, the other another arm on the first; read
    together, the axis report pairs fsg_gr's backbones and the arm report pairs the arms on the shared backbone."""
    import mlflow

    from fsg_endo.experiment.report import report_table
    from fsg_endo.tracking.tracker import GRID_POINT_TAG

    uri, exp = f"sqlite:///{tmp_path / 'mlflow.db'}", "study"
    client = mlflow.MlflowClient(uri)
    exp_id = client.create_experiment(exp)
    rng = np.random.default_rng(0)
    cells = list(itertools.product(range(3), range(2)))
    logged: dict[tuple[str, str], list[float]] = {}
    sweeps = {"a": [("fsg_gr", "ssl"), ("fsg_gr", "None")], "b": [("fsg_frozen", "ssl")]}
    parents = {}
    for name, children in sweeps.items():
        parents[name] = client.create_run(exp_id, tags={"regularizer": "sweep"}).info.run_id
        for arm, weights in children:
            for fold, seed in cells:
                value = float(rng.uniform(1, 2))
                logged.setdefault((arm, weights), []).append(value)
                tags = {"regularizer": arm, GRID_POINT_TAG: f"model.weights={weights}"}
                run = client.create_run(exp_id, tags=tags | {"mlflow.parentRunId": parents[name]}).info.run_id
                for key, param in {"data.train_fraction": 1.0, "data.test_fold": fold, "seed": seed}.items():
                    client.log_param(run, key, param)
                client.log_metric(run, METRIC, value)
                client.set_terminated(run)
    both = [parents["a"], parents["b"]]

    axis = report_table(exp, uri, METRIC, reference="None", parent_run_id=both, axis="model.weights")
    assert list(axis["arm"]) == ["fsg_gr @ model.weights=ssl"]
    want = np.mean(np.subtract(logged["fsg_gr", "ssl"], logged["fsg_gr", "None"]))
    assert axis["diff_mean"].iloc[0] == pytest.approx(want)

    arms = report_table(exp, uri, METRIC, reference="fsg_gr", parent_run_id=both)
    row = arms[arms["grid_point"] == "model.weights=ssl"].iloc[0]
    assert row["arm"] == "fsg_frozen" and row["n"] == len(cells)
    assert row["diff_mean"] == pytest.approx(np.mean(np.subtract(logged["fsg_frozen", "ssl"], logged["fsg_gr", "ssl"])))
    with pytest.raises(FsgEndoError, match="fsg_frozen"):  # one sweep alone lacks the other's arm
        report_table(exp, uri, METRIC, reference="fsg_frozen", parent_run_id=[parents["a"]])
