"""Utility metrics respond to quality: the holdout scores near-perfect, a broken table scores badly."""

import re

import numpy as np
import pandas as pd
import pytest

from dpsynth.cli import main
from dpsynth.metrics.utility import evaluate
from dpsynth.schema import validate_frame


@pytest.fixture(scope="module")
def frames(demo_dir, schema):
    real = validate_frame(pd.read_csv(demo_dir / "train.csv"), schema, "train")
    hold = validate_frame(pd.read_csv(demo_dir / "holdout.csv"), schema, "holdout")
    return real, hold


def test_holdout_as_synthetic_scores_near_perfect(frames, schema):
    real, hold = frames
    h = evaluate(real, hold, hold, schema)["headline"]
    assert h["mean_apd"] < 0.01
    assert h["correlation_distance"] < 0.03
    assert h["tstr_trtr_auroc_ratio"] > 0.97
    assert h["latent_cluster"] < 0.01
    assert h["constraint_violation_rate"] == 0.0


def test_broken_synthetic_scores_badly(frames, schema):
    real, hold = frames
    rng = np.random.default_rng(0)
    bad = hold.copy()
    for c in bad.columns:  # independent columns: marginals kept, every relation destroyed
        bad[c] = bad[c].to_numpy()[rng.permutation(len(bad))]
    bad["male"] = 1.0  # and one marginal wrong
    h = evaluate(real, hold, bad, schema)["headline"]
    good = evaluate(real, hold, hold, schema)["headline"]
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
