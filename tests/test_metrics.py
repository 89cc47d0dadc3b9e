"""Utility metrics respond to quality: the holdout scores near-perfect, a broken table scores badly."""

import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ks_2samp, wasserstein_distance

from dpsynth.cli import main
from dpsynth.metrics.utility import evaluate, vitals
from dpsynth.schema import Column, Schema, validate_frame


@pytest.fixture(scope="module")
def frames(demo_dir, schema):
    real = validate_frame(pd.read_csv(demo_dir / "train.csv"), schema, "train")
    hold = validate_frame(pd.read_csv(demo_dir / "holdout.csv"), schema, "holdout")
    return real, hold


def test_holdout_as_synthetic_scores_near_perfect(frames, schema):
    real, hold = frames
    res = evaluate(real, hold, hold, schema)
    h = res["headline"]
    assert h["mean_apd"] < 0.01
    assert h["correlation_distance"] < 0.03
    assert h["tstr_trtr_auroc_ratio"] > 0.97
    assert h["latent_cluster"] < 0.01
    assert h["constraint_violation_rate"] == 0.0
    v = res["vitals"]
    assert set(v["columns"]) == {c.name for c in schema.of_kind("continuous")}
    assert v["summary"]["mean_ks"] < 0.05
    assert v["correlation"]["max_abs_diff"] < 0.15


def test_broken_synthetic_scores_badly(frames, schema):
    real, hold = frames
    rng = np.random.default_rng(0)
    bad = hold.copy()
    for c in bad.columns:  # independent columns: marginals kept, every relation destroyed
        bad[c] = bad[c].to_numpy()[rng.permutation(len(bad))]
    bad["male"] = 1.0  # and one marginal wrong
    res = evaluate(real, hold, bad, schema)
    h = res["headline"]
    good_res = evaluate(real, hold, hold, schema)
    good = good_res["headline"]
    # permuted columns keep each vital's marginal but destroy the correlations among vitals
    assert res["vitals"]["summary"]["mean_ks"] < 0.05
    assert res["vitals"]["correlation"]["max_abs_diff"] > 0.3 > good_res["vitals"]["correlation"]["max_abs_diff"]
    assert h["mean_apd"] > good["mean_apd"] + 0.02
    assert h["correlation_distance"] > 2 * good["correlation_distance"]
    assert h["tstr_trtr_auroc_ratio"] < 0.75
    assert h["constraint_violation_rate"] > 0.5


def test_evaluate_cli_writes_self_contained_html(demo_dir, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["evaluate", "--real", str(demo_dir / "train.csv"), "--holdout", str(demo_dir / "holdout.csv"),
               "--synthetic", str(demo_dir / "holdout.csv"), "--schema", str(demo_dir / "schema.json"), "--out", str(out)])
    assert rc == 0
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    assert not re.search(r"(src|href)=['\"]https?://", html)  # nothing loaded from the network
    assert "<script" not in html
    assert (out / "utility.json").exists()
    assert "Continuous columns (vitals)" in html
    assert "Wasserstein / range" in html
    assert "histograms over the public bounds" in html and "pairwise Pearson correlations" in html
    for name in ("age", "bmi", "sbp"):
        assert f"<td>{name}</td>" in html
    res = json.loads((out / "utility.json").read_text())
    assert res["vitals"]["summary"]["n_columns"] == 7


# ---- vitals: per-column report of the continuous columns -------------------------------------------

@pytest.fixture
def vital_schema():
    return Schema(columns=[
        Column("a", "continuous", nullable=True, lower=0, upper=100),
        Column("b", "continuous", nullable=True, lower=-10, upper=10),
        Column("c", "continuous", nullable=True, lower=0, upper=1),
        Column("flag", "binary"),
    ])


def _walk(x):
    """Every leaf of a nested result is a plain JSON scalar (no numpy types, no NaN)."""
    if isinstance(x, dict):
        assert all(isinstance(k, str) for k in x)
        for v in x.values():
            _walk(v)
    elif isinstance(x, list):
        for v in x:
            _walk(v)
    else:
        assert x is None or type(x) in (str, int, float, bool), (type(x), x)
        if type(x) is float:
            assert np.isfinite(x)


def test_vitals_match_scipy_and_numpy_and_exclude_missing(vital_schema):
    real = pd.DataFrame({"a": [1.0, 2, 3, 4, 5, np.nan, 40], "b": [0.5, -1, 2, np.nan, 3, 1, 0],
                         "c": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], "flag": [0, 1, 0, 1, 0, 1, 0]})
    syn = pd.DataFrame({"a": [2.0, 3, 3, 7, np.nan, np.nan], "b": [1.0, 2, -3, 4, 0, np.nan],
                        "c": [0.3, 0.1, 0.9, 0.2, 0.5, 0.4], "flag": [1, 1, 0, 0, 1, 0]})
    v = vitals(real, syn, vital_schema)
    assert list(v["columns"]) == ["a", "b", "c"]  # binary columns are not vitals
    ra, sa = np.array([1.0, 2, 3, 4, 5, 40]), np.array([2.0, 3, 3, 7])  # observed values only
    e = v["columns"]["a"]
    assert e["n_real"] == 6 and e["n_synthetic"] == 4
    assert e["missing_rate_real"] == pytest.approx(1 / 7) and e["missing_rate_synthetic"] == pytest.approx(2 / 6)
    assert e["mean_real"] == pytest.approx(ra.mean()) and e["mean_synthetic"] == pytest.approx(sa.mean())
    assert e["std_real"] == pytest.approx(ra.std(ddof=1)) and e["std_synthetic"] == pytest.approx(sa.std(ddof=1))
    assert e["mean_abs_error"] == pytest.approx(abs(ra.mean() - sa.mean()))
    assert e["mean_abs_error_rel"] == pytest.approx(abs(ra.mean() - sa.mean()) / 100)
    assert e["std_abs_error_rel"] == pytest.approx(abs(ra.std(ddof=1) - sa.std(ddof=1)) / 100)
    ks = ks_2samp(ra, sa)
    assert e["ks"] == pytest.approx(ks.statistic) and e["ks_pvalue"] == pytest.approx(ks.pvalue)
    assert e["wasserstein"] == pytest.approx(wasserstein_distance(ra, sa))
    assert e["wasserstein_rel"] == pytest.approx(wasserstein_distance(ra, sa) / 100)
    assert "note" not in e
    # histogram: 30 bins over the public bounds (not the data's range), shares of observed values
    h = e["histogram"]
    assert h["edges"] == pytest.approx(np.linspace(0, 100, 31).tolist())
    assert sum(h["real"]) == pytest.approx(1) and sum(h["synthetic"]) == pytest.approx(1)
    assert h["real"][:2] == pytest.approx([3 / 6, 2 / 6])  # bins of width 10/3: {1, 2, 3}, {4, 5}
    assert h["synthetic"][:3] == pytest.approx([3 / 4, 0, 1 / 4])  # {2, 3, 3}, {}, {7}
    # correlations: pairwise-complete Pearson
    c = v["correlation"]
    assert c["columns"] == ["a", "b", "c"]
    rab = real[["a", "b"]].dropna()
    assert c["real"][0][1] == pytest.approx(np.corrcoef(rab["a"], rab["b"])[0, 1])
    diffs = [p["abs_diff"] for p in c["pairs"]]
    assert len(diffs) == 3 and c["n_pairs_compared"] == 3
    assert c["max_abs_diff"] == pytest.approx(max(diffs)) and c["mean_abs_diff"] == pytest.approx(np.mean(diffs))
    kss = [v["columns"][n]["ks"] for n in "abc"]
    assert v["summary"]["mean_ks"] == pytest.approx(np.mean(kss))
    _walk(v)
    json.dumps(v, allow_nan=False)


def test_vitals_identical_frames_score_zero(vital_schema):
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": rng.uniform(0, 100, 200), "b": rng.normal(0, 3, 200), "c": rng.uniform(0, 1, 200),
                       "flag": rng.integers(0, 2, 200)})
    df.loc[rng.choice(200, 30, replace=False), "b"] = np.nan
    v = vitals(df, df.copy(), vital_schema)
    for e in v["columns"].values():
        assert e["ks"] == 0 and e["wasserstein"] == 0 and e["mean_abs_error"] == 0 and e["std_abs_error"] == 0
        assert e["missing_rate_diff"] == 0 and e["histogram"]["real"] == e["histogram"]["synthetic"]
    assert v["correlation"]["max_abs_diff"] == 0 and v["correlation"]["mean_abs_diff"] == 0
    assert v["summary"]["mean_ks"] == 0


def test_vitals_shifted_column_gives_the_shift_as_mean_error(vital_schema):
    rng = np.random.default_rng(1)
    real = pd.DataFrame({"a": rng.uniform(20, 60, 500), "b": rng.normal(0, 2, 500), "c": rng.uniform(0, 1, 500),
                         "flag": 0})
    syn = real.copy()
    syn["a"] = syn["a"] + 5
    v = vitals(real, syn, vital_schema)
    e = v["columns"]["a"]
    assert e["mean_abs_error"] == pytest.approx(5)
    assert e["mean_abs_error_rel"] == pytest.approx(0.05)
    assert e["std_abs_error"] == pytest.approx(0, abs=1e-9)
    assert e["wasserstein"] == pytest.approx(5)
    assert e["ks"] > 0.1
    assert v["columns"]["b"]["ks"] == 0
    assert v["correlation"]["max_abs_diff"] == pytest.approx(0, abs=1e-9)  # a shift keeps correlations


def test_vitals_too_few_observed_values_give_none_with_a_note(vital_schema):
    real = pd.DataFrame({"a": [1.0, 2, 3, 4], "b": [1.0, 2, 3, np.nan], "c": [0.1, 0.2, 0.3, 0.4], "flag": 0})
    syn = pd.DataFrame({"a": [np.nan] * 3, "b": [1.0, 5, 2], "c": [0.5, np.nan, np.nan], "flag": 0})
    v = vitals(real, syn, vital_schema)
    a = v["columns"]["a"]  # all missing in the synthetic frame
    for k in ("ks", "ks_pvalue", "wasserstein", "wasserstein_rel", "mean_abs_error", "std_abs_error",
              "mean_synthetic", "std_synthetic"):
        assert a[k] is None, k
    assert "synthetic (0)" in a["note"]
    assert a["mean_real"] == pytest.approx(2.5) and a["missing_rate_synthetic"] == 1.0
    assert a["histogram"]["synthetic"] is None and a["histogram"]["real"] is not None
    c = v["columns"]["c"]  # a single observed synthetic value: not compared either
    assert c["ks"] is None and "synthetic (1)" in c["note"] and c["mean_synthetic"] == pytest.approx(0.5)
    assert v["columns"]["b"]["ks"] is not None and v["columns"]["b"]["n_real"] == 3
    assert v["summary"]["not_compared"] == ["a", "c"] and v["summary"]["n_compared"] == 1
    assert v["summary"]["mean_ks"] == pytest.approx(v["columns"]["b"]["ks"])
    pair_ab = next(p for p in v["correlation"]["pairs"] if (p["a"], p["b"]) == ("a", "b"))
    assert pair_ab["synthetic"] is None and pair_ab["abs_diff"] is None
    _walk(v)
    json.dumps(v, allow_nan=False)
    # a column absent from the synthetic frame, or a synthetic frame with no rows, is reported, not raised
    v2 = vitals(real, syn.drop(columns=["a"]), vital_schema)
    assert v2["columns"]["a"]["ks"] is None and "note" in v2["columns"]["a"]
    v3 = vitals(real, syn.iloc[:0], vital_schema)
    assert v3["summary"]["n_compared"] == 0 and v3["summary"]["mean_ks"] is None
    assert v3["columns"]["b"]["missing_rate_synthetic"] is None
    assert v3["correlation"]["max_abs_diff"] is None
    _walk(v3)


def test_rank_auc_is_sklearns_roc_auc_with_ties():
    """The bootstraps' AUC (Mann–Whitney with average ranks) equals sklearn's roc_auc_score, ties included."""
    from sklearn.metrics import roc_auc_score

    from dpsynth.metrics.auc import rank_auc

    rng = np.random.default_rng(0)
    for n1, n0, levels in ((50, 70, 5), (300, 200, None), (1, 9, 2), (40, 40, 1)):
        draw = (lambda n: rng.integers(0, levels, n).astype(float)) if levels else (lambda n: rng.normal(size=n))
        pos, neg = draw(n1) + (0.5 if levels is None else 0), draw(n0)
        want = roc_auc_score(np.r_[np.ones(n1), np.zeros(n0)], np.r_[pos, neg])
        assert rank_auc(pos, neg) == pytest.approx(want, abs=1e-12)
    assert rank_auc([2.0, 3.0], [0.0, 1.0]) == 1.0 and rank_auc([0.0], [1.0]) == 0.0
    with pytest.raises(ValueError):
        rank_auc([], [1.0])
