"""Schema JSON, inference (draft vs DP), the schema-only encoder and its inverse, the ledger."""

import json

import numpy as np
import pandas as pd
import pytest

from dpsynth.errors import SchemaError
from dpsynth.preprocess import Encoder
from dpsynth.privacy.accountant import SiteAccountant
from dpsynth.privacy.ledger import Ledger, LedgerError
from dpsynth.schema import Schema, infer_schema, validate_frame
from dpsynth.models.flow import FlowConfig
from dpsynth.train import TrainConfig, make_plan, schema_accountant


def test_schema_roundtrip_and_hash(schema):
    again = Schema.from_json(json.loads(schema.dumps()))
    assert again.hash() == schema.hash()
    d = schema.to_json()
    d["columns"][1]["upper"] = 101
    assert Schema.from_json(d).hash() != schema.hash()


def test_encoder_is_built_from_the_schema_only(schema, train_df):
    a = Encoder(schema)
    x1, _ = a.transform(train_df)
    x2, _ = a.transform(train_df.iloc[:100])
    assert x1.shape[1] == x2.shape[1] == a.dim
    np.testing.assert_array_equal(x1[:100], x2)  # encoding a row does not depend on the other rows


def test_encoder_roundtrip(schema, train_df):
    enc = Encoder(schema)
    x, clipped = enc.transform(train_df)
    assert clipped == {}  # the demo schema's public bounds cover the cohort
    back = enc.inverse(x)  # deterministic decoding of one-hot / 0-1 inputs
    for col in schema.modelled:
        r, b = train_df[col.name], back[col.name]
        assert (r.isna().to_numpy() == b.isna().to_numpy()).all(), col.name
        if col.kind == "continuous":
            np.testing.assert_allclose(b.dropna().astype(float), r.dropna().round() if col.integer else r.dropna(), rtol=1e-5, atol=1e-3)
        elif col.kind == "categorical":
            assert (r.dropna().astype(str).to_numpy() == b.dropna().astype(str).to_numpy()).all()
        else:
            assert (r.dropna().to_numpy() == b.dropna().astype(float).to_numpy()).all()


def test_out_of_bounds_values_are_clipped_and_counted(schema, train_df):
    df = train_df.copy()
    df.loc[df.index[:3], "weight"] = 400.0
    x, clipped = Encoder(schema).transform(df)
    assert clipped == {"weight": 3}
    assert x.max() <= 1.0


def test_draft_inference_marks_data_derived_bounds(train_df, demo_dir):
    raw = pd.read_csv(demo_dir / "train.csv")
    draft = infer_schema(raw)
    assert draft.status == "draft"
    assert draft["id"].kind == "identifier"
    assert draft["age"].kind == "continuous" and draft["age"].review and draft["age"].bounds_source == "data-draft"
    assert draft["male"].kind == "binary"
    assert draft["smoking"].kind == "categorical"
    with pytest.raises(SchemaError, match="DRAFT"):
        draft.require_reviewed()


def test_dp_inference_records_its_spend_and_train_counts_it(demo_dir):
    import torch

    raw = pd.read_csv(demo_dir / "train.csv")
    s = infer_schema(raw, epsilon=1.0, delta=1e-6, generator=torch.Generator().manual_seed(0))
    s.require_reviewed()
    assert s["id"].kind == "identifier"
    assert s["male"].kind == "binary" and s["status"].kind == "binary"
    age = s["age"]
    assert age.kind == "continuous" and age.bounds_source == "dp"
    assert age.lower <= 25 and 80 <= age.upper <= 200  # grid edges around the real 18..98
    assert s["smoking"].kind == "categorical" and set(s["smoking"].categories) == {"non-smoker", "smoker"}
    # the data validates against the DP schema and training composes its spend
    df = validate_frame(raw, s, "train.csv")
    prior = schema_accountant(s)
    assert 0.9 < prior.epsilon(1e-6) <= 1.0 + 1e-9 and prior.extra_delta > 0  # the (ε, δ) asked for holds
    cfg = TrainConfig(epochs=3, batch_size=512, checkpoints=1, flow=FlowConfig(epochs=2))
    with_prior = make_plan(n=len(df), epsilon=2.0, delta=1e-5, config=cfg, prior=prior, non_private=False)
    without = make_plan(n=len(df), epsilon=2.0, delta=1e-5, config=cfg, prior=SiteAccountant(), non_private=False)
    assert with_prior.noise_multiplier > without.noise_multiplier


def test_ledger_detects_edits_deletions_and_reordering(tmp_path):
    led = Ledger(tmp_path / "ledger.jsonl")
    for i in range(4):
        led.append("spend", {"epsilon": i})
    head = led.verify()
    lines = (tmp_path / "ledger.jsonl").read_text().splitlines()
    for tampered in (
        [lines[0], lines[1].replace('"epsilon": 1', '"epsilon": 0'), *lines[2:]],
        [lines[0], *lines[2:]],
        [lines[1], lines[0], *lines[2:]],
    ):
        (tmp_path / "ledger.jsonl").write_text("\n".join(tampered) + "\n")
        with pytest.raises(LedgerError):
            led.verify()
    (tmp_path / "ledger.jsonl").write_text("\n".join(lines) + "\n")
    assert led.verify() == head
