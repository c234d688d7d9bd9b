"""The recipe search's paired summary (benchmarks/tune_recipe.py): candidates against a reference per cell."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from tune_recipe import paired_summary, small_bias  # noqa: E402

MAE, BACC = "lesion/val/mae", "lesion/val/cls3_balanced_accuracy"


def _table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = [{"candidate": "baseline_appearance", "val_fold": v, MAE: 0.7 + 0.01 * v, BACC: 0.9} for v in (1, 2, 3)]
    for name in ("current", "other"):
        for seed in (0, 1):
            for v in (1, 2, 3):
                rows.append(
                    {
                        "candidate": name,
                        "val_fold": v,
                        "seed": seed,
                        MAE: rng.uniform(0.7, 1.0),
                        BACC: rng.uniform(0.8, 1.0),
                    }
                )
    rows.append({"candidate": "other", "val_fold": 3, "seed": 2, MAE: 0.1, BACC: 0.1})  # no reference cell: unpaired
    return pd.DataFrame(rows)


def test_candidates_pair_with_the_reference_per_fold_and_seed_and_the_baseline_with_every_seed():
    table = _table()
    out = paired_summary(table).set_index(["candidate", "metric"])
    ref = table[table.candidate == "current"].set_index(["val_fold", "seed"])[MAE]
    other = table[(table.candidate == "other") & (table.seed < 2)].set_index(["val_fold", "seed"])[MAE]
    diff = (other - ref.loc[other.index]).to_numpy()
    row = out.loc[("other", MAE)]
    assert row["n"] == 6 and row["diff_mean"] == pytest.approx(diff.mean())
    scale = np.sqrt((1 / 6 + 1 / 3) * diff.var(ddof=1))  # Nadeau-Bengio with one fold against three
    assert row["p_corrected_t"] == pytest.approx(2 * stats.t.sf(abs(diff.mean()) / scale, 5))
    base = out.loc[("baseline_appearance", MAE)]
    by_fold = {1: 0.71, 2: 0.72, 3: 0.73}
    expected = [by_fold[v] - m for (v, _), m in ref.items()]
    assert base["n"] == 6 and base["diff_mean"] == pytest.approx(np.mean(expected))


def test_results_without_a_seed_column_count_as_seed_zero():
    table = _table()
    old = table[(table.candidate != "other") & (table.get("seed", 0).fillna(0) == 0)].drop(columns="seed")
    out = paired_summary(old).set_index(["candidate", "metric"])
    assert out.loc[("baseline_appearance", BACC), "n"] == 3


def test_small_bias_is_the_mean_lesion_error_of_lesions_up_to_5_mm():
    size = [3.0, 3.0, 5.0, 8.0]
    frames = pd.DataFrame(
        {
            "lesion_id": ["a", "a", "b", "c"],
            "video_id": "v",
            "size_mm": size,
            "target": size,
            "prediction": [3.5, 4.5, 4.0, 1.0],
        }
    )
    assert small_bias(frames)["lesion/val/bias_le5mm"] == pytest.approx(((4.0 - 3.0) + (4.0 - 5.0)) / 2)
