"""Bad input → a clear error naming the file / column / value, a non-zero exit, and nothing half-written."""

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpsynth.cli import main

TRAIN_ARGS = ["--epochs", "1", "--batch-size", "256", "--quiet", "--no-select"]


@pytest.fixture()
def small_csv(demo_dir, tmp_path):
    df = pd.read_csv(demo_dir / "train.csv").iloc[:1500]
    p = tmp_path / "train.csv"
    df.to_csv(p, index=False)
    return p, df


def run_train(data, schema_path, out, *extra, epsilon="1.0", delta="1e-5"):
    return main(["train", "--data", str(data), "--schema", str(schema_path), "--out", str(out),
                 "--epsilon", epsilon, "--delta", delta, *TRAIN_ARGS, *extra])


def expect_error(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert rc != 0, err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"
    return err


@pytest.mark.parametrize(
    "mutate,needles",
    [
        (lambda df: df.drop(columns=["bmi"]), ["columns in the schema but not in the file", "bmi"]),
        (lambda df: df.assign(extra_col=1), ["columns in the file but not in the schema", "extra_col"]),
        (lambda df: df.assign(age=df["age"].astype(object).where(df.index != 7, "forty")), ["'age'", "'forty'", "row 8"]),
        (lambda df: df.assign(weight=df["weight"].where(df.index != 3, np.inf)), ["'weight'", "infinite", "row 4"]),
        (lambda df: df.assign(smoking=df["smoking"].where(df.index != 5, "vaper")), ["'smoking'", "'vaper'", "outside the schema"]),
        (lambda df: df.assign(male=df["male"].where(df.index != 2, 7)), ["'male'", "binary", "7"]),
        (lambda df: df.assign(age=df["age"].astype(float).where(df.index != 9, np.nan)), ["'age'", "missing", "nullable=false"]),
    ],
    ids=["missing-column", "extra-column", "non-numeric", "inf", "category", "binary", "null-in-non-nullable"],
)
def test_bad_frames_name_file_column_value(small_csv, demo_dir, tmp_path, capsys, mutate, needles):
    _, df = small_csv
    bad = tmp_path / "bad.csv"
    mutate(df).to_csv(bad, index=False)
    rc = run_train(bad, demo_dir / "schema.json", tmp_path / "model")
    expect_error(capsys, rc, str(bad), *needles)
    assert not (tmp_path / "model").exists()


def test_empty_file(demo_dir, tmp_path, capsys):
    p = tmp_path / "empty.csv"
    p.write_text("")
    expect_error(capsys, run_train(p, demo_dir / "schema.json", tmp_path / "m"), str(p), "empty")
    p.write_text("id,age\n")
    expect_error(capsys, run_train(p, demo_dir / "schema.json", tmp_path / "m"), str(p), "no data rows")


def test_duplicate_column_names(small_csv, demo_dir, tmp_path, capsys):
    src, _ = small_csv
    lines = src.read_text().splitlines()
    lines[0] = lines[0].replace("height", "weight")
    p = tmp_path / "dup.csv"
    p.write_text("\n".join(lines) + "\n")
    expect_error(capsys, run_train(p, demo_dir / "schema.json", tmp_path / "m"), str(p), "duplicate", "weight")


@pytest.mark.parametrize("eps", ["0", "-1", "nan"])
def test_epsilon_must_be_positive(small_csv, demo_dir, tmp_path, capsys, eps):
    src, _ = small_csv
    expect_error(capsys, run_train(src, demo_dir / "schema.json", tmp_path / "m", epsilon=eps), "--epsilon")
    assert not (tmp_path / "m").exists()


def test_delta_at_least_one_over_n_is_refused(small_csv, demo_dir, tmp_path, capsys):
    src, _ = small_csv
    expect_error(capsys, run_train(src, demo_dir / "schema.json", tmp_path / "m", delta=str(1 / 1500)), "--delta", "1/n")


def test_fewer_rows_than_one_batch(small_csv, demo_dir, tmp_path, capsys):
    src, df = small_csv
    p = tmp_path / "tiny.csv"
    df.iloc[:100].to_csv(p, index=False)
    expect_error(capsys, run_train(p, demo_dir / "schema.json", tmp_path / "m", delta="1e-4"), "fewer than one expected batch")


def test_malformed_schema(small_csv, tmp_path, capsys):
    src, _ = small_csv
    s = tmp_path / "schema.json"
    s.write_text("{not json")
    expect_error(capsys, run_train(src, s, tmp_path / "m"), str(s), "not valid JSON")
    s.write_text(json.dumps({"version": 1, "columns": [{"name": "age", "kind": "continuous", "lower": 5, "upper": 1}]}))
    expect_error(capsys, run_train(src, s, tmp_path / "m"), "'age'", "lower bound")


def test_existing_model_is_not_overwritten(small_csv, demo_dir, tmp_path, capsys):
    src, _ = small_csv
    out = tmp_path / "m"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    expect_error(capsys, run_train(src, demo_dir / "schema.json", out), "already exists")
    assert (out / "precious.txt").read_text() == "keep me"


def test_seed_is_refused_for_dp_training(small_csv, demo_dir, tmp_path, capsys):
    src, _ = small_csv
    expect_error(capsys, run_train(src, demo_dir / "schema.json", tmp_path / "m", "--seed", "1"), "--seed")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    col=st.sampled_from(["age", "height", "male", "smoking", "futime", "status"]),
    value=st.one_of(st.text(min_size=1, max_size=6), st.floats(allow_nan=False), st.integers(-10**6, 10**6)),
)
def test_fuzzed_values_are_accepted_or_rejected_cleanly(schema, train_df, col, value):
    """Any single odd value is either valid for the column or raises DataError naming the column."""
    from dpsynth.errors import DataError
    from dpsynth.schema import validate_frame

    raw = train_df.iloc[:50].copy()
    raw[col] = raw[col].astype(object)
    raw.iloc[10, raw.columns.get_loc(col)] = value
    try:
        validate_frame(raw, schema, "fuzz.csv")
    except DataError as e:
        assert "fuzz.csv" in str(e) and repr(col) in str(e)


def _audit(demo_dir, syn, out):
    return main(["audit", "--real", str(demo_dir / "train.csv"), "--holdout", str(demo_dir / "holdout.csv"),
                 "--synthetic", str(syn), "--schema", str(demo_dir / "schema.json"), "--out", str(out)])


@pytest.mark.parametrize(
    "content,needles",
    [
        ("", ["empty"]),
        ("id,age\nSYN-1,40\n", ["columns in the schema but not in the file"]),
    ],
    ids=["empty-synthetic", "schema-mismatch"],
)
def test_audit_rejects_bad_synthetic_files(demo_dir, tmp_path, capsys, content, needles):
    syn = tmp_path / "syn.csv"
    syn.write_text(content)
    expect_error(capsys, _audit(demo_dir, syn, tmp_path / "audit"), str(syn), *needles)
    assert not (tmp_path / "audit").exists()


def test_audit_rejects_inf_in_synthetic(demo_dir, tmp_path, capsys):
    syn = tmp_path / "syn.csv"
    df = pd.read_csv(demo_dir / "holdout.csv").iloc[:200]
    df.loc[5, "bmi"] = np.inf
    df.to_csv(syn, index=False)
    expect_error(capsys, _audit(demo_dir, syn, tmp_path / "audit"), str(syn), "'bmi'", "infinite")
