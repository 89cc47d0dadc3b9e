"""Single-site DP training end to end (real Opacus), resume, no pickle, non-private marking."""

import json
import pickle

import pytest
import torch

from dpsynth.cli import budget_view
from dpsynth.errors import ModelError, SchemaError
from dpsynth.generate import generate
from dpsynth.models.flow import FlowConfig
from dpsynth.privacy.accountant import SiteAccountant
from dpsynth.schema import Schema, validate_frame
from dpsynth.train import CRITIC_MECHANISM, TrainConfig, load_model, train

CFG = dict(epochs=3, batch_size=256, checkpoints=3, flow=FlowConfig(epochs=3))


def small_cfg(**kw):
    return TrainConfig(**{**CFG, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_df, schema):
    out = tmp_path_factory.mktemp("m") / "model"
    res = train(small_df, schema, out=out, epsilon=2.0, delta=1e-5, config=small_cfg(), progress=False)
    return out, res


def test_training_spends_at_most_the_budget_and_writes_a_complete_model(trained, schema):
    out, res = trained
    man = json.loads((out / "manifest.json").read_text())
    p = man["privacy"]
    assert p["differentially_private"] is True
    assert 1.5 < p["epsilon"] <= 2.0  # calibrated to use the budget, never more
    assert p["steps"] == p["planned_steps"] == 3 * 8
    assert p["unit"] == "patient" and p["accountant"] == "opacus-prv"
    # the number printed equals what the saved accountant state gives
    acc = SiteAccountant.from_state(json.loads((out / "accountant.json").read_text()))
    assert acc.epsilon(1e-5) == pytest.approx(p["epsilon"], rel=1e-9)
    sgd = [m for m in acc.history if m.mechanism == CRITIC_MECHANISM]
    assert sum(m.steps for m in sgd) == 24 and sgd[0].noise_multiplier == p["noise_multiplier"]
    # selection among checkpoints was paid for
    assert any(m.mechanism.startswith("gaussian-marginals") for m in acc.history)
    assert not (out / ".work").exists()


def test_generated_patients_match_the_schema(trained, schema):
    out, _ = trained
    syn, man = generate(out, 500, seed=1)
    assert list(syn.columns) == schema.names
    validate_frame(syn, schema, "synthetic")  # raises if anything is outside the schema
    assert syn["id"].str.startswith("SYN-").all()
    for col in schema.of_kind("continuous"):
        v = syn[col.name].dropna()
        assert ((v >= col.lower) & (v <= col.upper)).all()


def test_budget_json_lists_every_mechanism(trained):
    out, _ = trained
    v = budget_view(str(out))
    assert {"mechanism", "noise_multiplier", "sample_rate", "steps"} <= set(v["mechanisms"][0])
    assert v["epsilon_recomputed"] == pytest.approx(v["epsilon"])


def test_resume_gives_the_same_epsilon_as_an_uninterrupted_run(tmp_path, small_df, schema):
    full = train(small_df, schema, out=tmp_path / "full", epsilon=2.0, delta=1e-5, config=small_cfg(), progress=False)

    def stop_after_first_epoch(epoch, acc):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(small_df, schema, out=tmp_path / "resumed", epsilon=2.0, delta=1e-5, config=small_cfg(),
              progress=False, epoch_callback=stop_after_first_epoch)
    assert not (tmp_path / "resumed" / "manifest.json").exists()  # no output that looks complete
    with pytest.raises(ModelError, match="resume"):
        load_model(tmp_path / "resumed")
    res = train(small_df, schema, out=tmp_path / "resumed", epsilon=None, resume=True, progress=False)
    assert res.steps == full.steps
    assert res.epsilon == pytest.approx(full.epsilon, rel=1e-9)


def test_no_pickle_is_ever_loaded(trained, monkeypatch, small_df, schema, tmp_path):
    def boom(*a, **k):
        raise AssertionError("pickle/torch.load used")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    out, _ = trained
    generate(out, 50, seed=0)

    def stop(epoch, acc):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(small_df, schema, out=tmp_path / "r", epsilon=2.0, delta=1e-5, config=small_cfg(), progress=False,
              epoch_callback=stop)
    train(small_df, schema, out=tmp_path / "r", epsilon=None, resume=True, progress=False)


def test_model_files_are_checked_against_the_manifest(trained, tmp_path):
    import shutil

    out, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / "generator.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ModelError, match="SHA-256"):
        load_model(copy)


def test_non_private_mode_is_marked_everywhere(tmp_path, small_df, schema):
    res = train(small_df, schema, out=tmp_path / "np", epsilon=None, delta=1e-5, config=small_cfg(epochs=1),
                non_private=True, seed=0, progress=False)
    p = res.manifest["privacy"]
    assert p["differentially_private"] is False and p["epsilon"] is None
    assert "NOT DIFFERENTIALLY PRIVATE" in p["statement"]


def test_draft_schema_is_refused(small_df, schema, tmp_path):
    d = schema.to_json()
    d["status"] = "draft"
    draft = Schema.from_json(d)
    with pytest.raises(SchemaError, match="DRAFT"):
        train(small_df, draft, out=tmp_path / "x", epsilon=1.0, delta=1e-5, config=small_cfg(), progress=False)
    assert not (tmp_path / "x").exists()
