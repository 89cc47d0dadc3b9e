"""The note model in the single-site pipeline (issue 7, req. 1, 3, 5, 7): demo notes, the text phase of
`train` under the one site accountant, resume, the chained patient record → vitals → note, canaries, the
memorisation checks of the gate (with a non-private positive control) and bad note input.

Tiny configurations only (the default TextConfig takes seconds per DP step on 2 cores)."""

import json
import math
import re
import warnings

import numpy as np
import pandas as pd
import pytest

from audits.audit import run_audit
from audits.text import load_canaries
from dpsynth.cli import TEXT_BATCH, TEXT_EPOCHS, budget_view, main
from dpsynth.data.demo import add_demo_notes, demo_schema, demo_schema_with_notes
from dpsynth.data.notes import NOTE_LABEL
from dpsynth.errors import DataError, ModelError
from dpsynth.data.io import read_table, write_table
from dpsynth.generate import GENERATED_NOTE_LABEL, clean_note, generate
from dpsynth.models.flow import FlowConfig
import dpsynth.models.text as text_mod
from dpsynth.models.text import WORD_TOKENIZER_KIND, TextConfig
from dpsynth.privacy.accountant import SiteAccountant
from dpsynth.schema import Schema, validate_frame
from dpsynth.train import (CRITIC_MECHANISM, FLOW_MECHANISM, TEXT_MECHANISM, TrainConfig, default_models, load_model,
                           resolve_models, train)

TINY_TEXT = dict(d_model=32, layers=1, heads=4, max_len=96, batch_size=125)
CFG = dict(epochs=1, batch_size=250, checkpoints=1, select=False, models=("wgan", "flow", "text"),
           flow=FlowConfig(epochs=1, hidden=16, couplings=2), text=TextConfig(**TINY_TEXT, epochs=2), canaries=1)


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**CFG, **kw})


def quiet_train(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation: max_len 96 cuts most rendered notes
        return train(*args, progress=False, **kw)


@pytest.fixture(scope="module")
def tschema():
    return demo_schema_with_notes()


@pytest.fixture(scope="module")
def ndf(train_df, tschema):
    return validate_frame(add_demo_notes(train_df.iloc[:1000].reset_index(drop=True)), tschema, "train")


@pytest.fixture(scope="module")
def nhold(demo_dir, tschema):
    hold = pd.read_csv(demo_dir / "holdout.csv").iloc[:400]
    return validate_frame(add_demo_notes(hold), tschema, "holdout")


@pytest.fixture(scope="module")
def dp_model(tmp_path_factory, ndf, tschema):
    out = tmp_path_factory.mktemp("text") / "model"
    real = text_mod._clipping

    def spy(model, module, optimizer, mode, path, C, share):  # records how the fit wired the note model's clipping
        TWO_GROUP_CALLS.append({"mode": mode, "path": len(path), "C": C, "share": share,
                                "path_parameters": len(model.path_parameters())})
        return real(model, module, optimizer, mode, path, C, share)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(text_mod, "_clipping", spy)
        # seeded DP noise (tests only): the exposure check below is then reproducible
        return out, quiet_train(ndf, tschema, out=out, epsilon=3.0, delta=1e-5, config=cfg(), seed=11)


TWO_GROUP_CALLS: list[dict] = []


def test_the_chained_fit_clips_the_note_model_in_two_groups(dp_model):
    """The fit's note model goes through make_private_text's two-group clipping (once, in the configured Opacus
    mode, the whole path, the configured share and the fit's clipping norm)."""
    _, res = dp_model
    assert len(TWO_GROUP_CALLS) == 1
    call = TWO_GROUP_CALLS[0]
    assert call["mode"] == TextConfig().grad_sample_mode == "hooks"
    assert call["path"] == call["path_parameters"] == 3  # table, gate weight and bias
    assert call["share"] == TextConfig().cond_clip_share and call["C"] == res.manifest["privacy"]["models"]["text"]["max_grad_norm"]


# ------------------------------------------------------------------------------------------------
# demo data
# ------------------------------------------------------------------------------------------------

def test_demo_data_has_a_labelled_note_column_by_default_and_no_notes_changes_nothing_else(tmp_path, demo_dir, capsys):
    assert main(["demo-data", "--out", str(tmp_path / "d")]) == 0
    assert NOTE_LABEL in capsys.readouterr().out
    s = Schema.load(tmp_path / "d" / "schema.json")
    assert s["note"].kind == "text" and NOTE_LABEL in s["note"].description
    assert s.names[:-1] == demo_schema().names
    # --no-notes gives the structured demo (as write_demo's default, demo_dir) byte for byte: the notes change
    # nothing else
    assert main(["demo-data", "--out", str(tmp_path / "plain"), "--no-notes"]) == 0
    assert "note" not in Schema.load(tmp_path / "plain" / "schema.json").names
    assert "note" not in Schema.load(demo_dir / "schema.json").names
    for name in ("train.csv", "holdout.csv", "site_a.csv", "site_b.csv", "site_c.csv"):
        with_notes = pd.read_csv(tmp_path / "d" / name, keep_default_na=False, dtype=str)
        assert with_notes["note"].str.len().gt(0).all()
        plain = with_notes.drop(columns="note").to_csv(index=False, lineterminator="\n").encode()
        assert plain == (demo_dir / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name


# ------------------------------------------------------------------------------------------------
# one accountant, manifest, budget
# ------------------------------------------------------------------------------------------------

def test_one_accountant_charges_the_three_models(dp_model, capsys):
    out, res = dp_model
    m, p = res.manifest, res.manifest["privacy"]
    assert m["models"] == ["wgan", "flow", "text"]
    assert 2.7 < p["epsilon"] <= 3.0
    acc = SiteAccountant.from_state(json.loads((out / "accountant.json").read_text()))
    assert {x.mechanism for x in acc.history} == {CRITIC_MECHANISM, FLOW_MECHANISM, TEXT_MECHANISM}
    assert acc.epsilon(1e-5) == pytest.approx(p["epsilon"], rel=1e-9)
    t = p["models"]["text"]
    assert t["mechanism"] == TEXT_MECHANISM and t["rows"] == 1000 and t["sample_rate"] == pytest.approx(1 / 8)
    assert t["steps"] == t["planned_steps"] == 2 * 8 and t["share"] == TrainConfig().budget_shares["text"] and 0 < t["epsilon_alone"] < p["epsilon"]
    assert t["noise_multiplier"] > 0
    assert sum(x.steps for x in acc.history if x.mechanism == TEXT_MECHANISM) == 16
    without_text = SiteAccountant([x for x in acc.history if x.mechanism != TEXT_MECHANISM]).epsilon(1e-5)
    assert without_text < p["epsilon"] - 0.1  # the note model's spend is not hidden
    assert p["tokenizer"] == WORD_TOKENIZER_KIND and "note generator" in p["statement"]
    for f in ("text.safetensors", "tokenizer.json", "canaries.json"):
        assert len(m["files"][f]) == 64
    notes = m["data"]["notes"]
    assert notes["column"] == "note" and notes["notes"] == 1000 and notes["missing"] == 0
    assert notes["trained_on"] == 1000 and notes["canary_notes_planted"] == 21 and NOTE_LABEL in notes["label"]
    assert len(m["training"]["text_epoch_nll"]) == 2
    assert budget_view(str(out))["tokenizer"] == WORD_TOKENIZER_KIND
    assert main(["budget", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"tokenizer         {WORD_TOKENIZER_KIND}" in printed and TEXT_MECHANISM in printed
    s = TextConfig().cond_clip_share
    assert t["clipping"].startswith("two-group") and f"C·√{s:g}" in t["clipping"] and t["clipping"] in printed
    load_model(out)  # every file matches its SHA-256


def test_the_default_patient_has_a_note_exactly_when_the_schema_has_a_text_column(tschema):
    assert TrainConfig().models is None and TrainConfig().budget_shares == {"wgan": 1.0, "flow": 1.0, "text": 0.33}
    assert default_models(tschema) == ("wgan", "flow", "text")
    assert default_models(demo_schema()) == ("wgan", "flow")
    assert resolve_models(TrainConfig(), tschema).models == ("wgan", "flow", "text")
    assert resolve_models(TrainConfig(models=("wgan",)), tschema).models == ("wgan",)  # an explicit choice stays
    with pytest.raises(ModelError, match="canaries"):  # checked once the default is resolved
        resolve_models(TrainConfig(canaries=1), demo_schema())
    assert TEXT_EPOCHS == TextConfig().epochs and TEXT_BATCH == TextConfig().batch_size
    old = TrainConfig().to_json()
    old.pop("text"), old.pop("canaries")  # a model directory written before the note model
    assert TrainConfig.from_json(old).text == TextConfig()
    # a note model saved before the condition → vocabulary path: its weights lack the path, so its config must too
    older = TrainConfig().to_json()
    older["text"].pop("cond_vocab")
    assert TextConfig().cond_vocab and not TrainConfig.from_json(older).text.cond_vocab
    # … and one trained before two-group clipping was trained (and resumes) with one flat bound
    older = TrainConfig().to_json()
    older["text"].pop("cond_clip_share")
    assert TextConfig().cond_clip_share > 0 and TrainConfig.from_json(older).text.cond_clip_share == 0
    # … and one trained before the row-sparse path read every row of its table
    older = TrainConfig().to_json()
    older["text"].pop("cond_sparse")
    assert TextConfig().cond_sparse and not TrainConfig.from_json(older).text.cond_sparse
    # … and one trained before the choice of rows kept a row for every band and category
    older = TrainConfig(text=TextConfig(cond_rows="binary")).to_json()
    older["text"].pop("cond_rows")
    assert TrainConfig.from_json(older).text.cond_rows == "asserting"
    # the repetition penalty only changes sampling: an older model takes today's default
    older["text"].pop("repetition")
    assert TrainConfig.from_json(older).text.repetition == TextConfig().repetition
    assert TrainConfig.from_json(TrainConfig().to_json()).text == TextConfig()


# ------------------------------------------------------------------------------------------------
# the chained patient: record → vitals → note
# ------------------------------------------------------------------------------------------------

def test_generated_notes_are_present_labelled_and_never_carry_the_canaries(dp_model, tschema, tmp_path):
    out, _ = dp_model
    syn, _ = generate(out, 300, seed=0)
    validate_frame(syn, tschema, "synthetic")
    assert syn["note"].map(lambda v: isinstance(v, str)).all() and syn["note"].str.len().gt(0).mean() > 0.9
    plain, _ = generate(out, 300, seed=0, use_text=False)
    assert plain["note"].isna().all()
    other = [c for c in tschema.names if c not in ("note", "id")]
    pd.testing.assert_frame_equal(syn[other], plain[other])  # the note is added after record → vitals
    no_flow, _ = generate(out, 50, seed=0, use_flow=False)  # use_flow= still works, with notes
    assert no_flow["note"].map(lambda v: isinstance(v, str)).all()
    csv = tmp_path / "syn.csv"
    assert main(["generate", "--model", str(out), "--n", "200", "--out", str(csv), "--seed", "1"]) == 0
    prov = json.loads((tmp_path / "syn.csv.provenance.json").read_text())
    assert prov["notes"]["label"] == GENERATED_NOTE_LABEL and NOTE_LABEL in prov["notes"]["trained_on"]
    secrets = [c.secret for c in load_canaries(out)]
    assert len(secrets) == 4  # one per count (1, 4, 16) + one never-planted control
    written = csv.read_text(encoding="utf-8") + (tmp_path / "syn.csv.provenance.json").read_text()
    assert not any(s in written for s in secrets)
    assert not any(s in n for s in secrets for n in syn["note"])


# ------------------------------------------------------------------------------------------------
# resume in the text phase
# ------------------------------------------------------------------------------------------------

def test_text_phase_resume_gives_the_same_epsilon(tmp_path, ndf, tschema, dp_model):
    _, full = dp_model

    def stop(epoch, acc):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quiet_train(ndf, tschema, out=tmp_path / "r", epsilon=3.0, delta=1e-5, config=cfg(),
                    text_epoch_callback=stop)
    work = tmp_path / "r" / ".work"
    assert not (tmp_path / "r" / "manifest.json").exists()
    st = json.loads((work / "state.json").read_text())
    assert st["text_epochs_done"] == 1 and (work / "text.safetensors").exists()
    planted = json.loads((work / "canaries.json").read_text())
    res = quiet_train(ndf, tschema, out=tmp_path / "r", epsilon=None, resume=True)
    assert res.epsilon == pytest.approx(full.epsilon, rel=1e-9)
    assert res.manifest["privacy"]["models"]["text"]["steps"] == 16
    assert res.manifest["privacy"]["models"]["text"]["noise_multiplier"] == pytest.approx(
        full.manifest["privacy"]["models"]["text"]["noise_multiplier"], rel=1e-12)
    assert json.loads((tmp_path / "r" / "canaries.json").read_text()) == planted  # the same secrets, same hosts
    assert len(res.manifest["training"]["text_epoch_nll"]) == 2
    load_model(tmp_path / "r")


# ------------------------------------------------------------------------------------------------
# the gate: n-gram overlap, identifier replay, canary exposure
# ------------------------------------------------------------------------------------------------

def _check(audit, prefix):
    return next(c for c in audit["gate"]["checks"] if c["check"].startswith(prefix))


def test_dp_model_passes_the_memorisation_checks(dp_model, ndf, nhold, tschema):
    out, res = dp_model
    syn, _ = generate(out, 400, seed=2)
    a = run_audit(ndf, nhold, syn, tschema, dp=res.manifest["privacy"], model_dir=out, empirical=False)
    exp = _check(a, "notes_canary_exposure.count_16")
    assert exp["passed"], (exp, a["attacks"]["notes_canary_exposure"]["per_count"])
    assert set(a["attacks"]["notes_canary_exposure"]["per_count"]) == {"0", "1", "4", "16"}
    assert _check(a, "notes_ngram_overlap.excess")["passed"] and _check(a, "notes_identifier_replay.count")["passed"]


def test_non_private_model_that_memorised_canaries_fails_the_gate(tmp_path, ndf, nhold, tschema):
    """Positive control: no noise, 5 epochs, canaries repeated 16× — the audit must catch the memorisation.
    (Measured: with 5 epochs the 16× canaries already rank first of 1,000 candidates, exposure 9.97 bits, lower
    bound 7.97 against the 4.44 asserted; 10 epochs took 15 s more for the same ranks.)"""
    c = cfg(models=("wgan", "text"), canaries=2, text=TextConfig(**{**TINY_TEXT, "batch_size": 50}, epochs=5, lr=1e-2))
    out = tmp_path / "np"
    quiet_train(ndf, tschema, out=out, epsilon=None, non_private=True, seed=0, config=c)
    d = tmp_path / "csv"
    d.mkdir()
    ndf.to_csv(d / "train.csv", index=False)
    nhold.to_csv(d / "holdout.csv", index=False)
    tschema.save(d / "schema.json")
    assert main(["generate", "--model", str(out), "--n", "300", "--out", str(d / "syn.csv"), "--seed", "0"]) == 0
    rc = main(["audit", "--real", str(d / "train.csv"), "--holdout", str(d / "holdout.csv"), "--synthetic",
               str(d / "syn.csv"), "--schema", str(d / "schema.json"), "--model", str(out), "--out", str(d / "audit")])
    assert rc == 4
    a = json.loads((d / "audit" / "audit.json").read_text())
    assert "notes_canary_exposure.count_16" in a["gate"]["failed"]
    per = a["attacks"]["notes_canary_exposure"]["per_count"]
    assert per["16"]["lower_bound"] > a["attacks"]["notes_canary_exposure"]["chance"] + 3
    assert per["16"]["value"] > per["0"]["value"]


# ------------------------------------------------------------------------------------------------
# bad input (req. 7)
# ------------------------------------------------------------------------------------------------

def test_empty_long_non_utf8_and_missing_notes_are_handled_and_counted(tmp_path, ndf, tschema):
    df = ndf.copy()
    df.loc[0:9, "note"] = ""  # empty: kept (the model learns "no text")
    df.loc[10:14, "note"] = "very long note " * 400  # truncated with a warning, counted
    df.loc[15:16, "note"] = [b"bad bytes \xff\xfe end", "lone surrogate \udcff"]  # invalid UTF-8: replaced
    df.loc[100:224, "note"] = None  # missing: dropped from the text dataset only
    with pytest.warns(UserWarning, match="truncated"):
        res = train(df, tschema, out=tmp_path / "m", epsilon=3.0, delta=1e-5, progress=False,
                    config=cfg(models=("wgan", "text"), canaries=0, text=TextConfig(**TINY_TEXT, epochs=1)))
    n = res.manifest["data"]["notes"]
    assert n["empty"] == 10 and n["missing"] == 125 and n["replaced_bytes"] >= 3 and n["trained_on"] == 875
    assert n["truncated"] >= 5
    t = res.manifest["privacy"]["models"]["text"]
    assert t["rows"] == 875 and t["sample_rate"] == pytest.approx(1 / math.ceil(875 / 125)) and t["steps"] == 7
    assert res.manifest["data"]["rows"] == 1000  # the other models keep every patient
    assert res.epsilon <= 3.0
    assert "canaries.json" not in res.manifest["files"]


def test_text_model_needs_one_text_column_and_the_notes(tmp_path, ndf, tschema, train_df, schema):
    c = cfg(models=("wgan", "text"), canaries=0)
    with pytest.raises(ModelError, match="kind 'text'.*none"):
        train(train_df.iloc[:1000], schema, out=tmp_path / "a", epsilon=3.0, delta=1e-5, config=c, progress=False)
    d = tschema.to_json()
    d["columns"].append({"name": "note2", "kind": "text", "nullable": True})
    two = Schema.from_json(d)
    with pytest.raises(ModelError, match="note2"):
        train(ndf.assign(note2="x"), two, out=tmp_path / "b", epsilon=3.0, delta=1e-5, config=c, progress=False)
    with pytest.raises(DataError, match="'note'"):  # the note column is absent from the data
        train(ndf.drop(columns="note"), tschema, out=tmp_path / "c", epsilon=3.0, delta=1e-5, config=c, progress=False)
    with pytest.raises(ModelError, match="--canaries"):
        TrainConfig(canaries=2, models=("wgan", "flow"))  # canaries without the text model
    with pytest.raises(ModelError, match="--canaries"):  # ... also when the default has no text model
        train(train_df.iloc[:1000], schema, out=tmp_path / "e", epsilon=3.0, delta=1e-5,
              config=TrainConfig(canaries=2), progress=False)
    with pytest.raises(DataError, match="have a note.*--text-batch-size"):  # fewer notes than one text batch: names the fix
        train(ndf.assign(note=[None] * 950 + ["x"] * 50), tschema, out=tmp_path / "d", epsilon=3.0, delta=1e-5,
              config=c, progress=False)


def test_cli_train_text_errors_name_the_problem(tmp_path, demo_dir, capsys, ndf, tschema):
    base = ["train", "--data", str(demo_dir / "train.csv"), "--schema", str(demo_dir / "schema.json"),
            "--epsilon", "3", "--out", str(tmp_path / "m"), "--models", "wgan,flow,text", "--quiet"]
    assert main(base) != 0
    assert "kind 'text'" in capsys.readouterr().err
    ndf.drop(columns="note").to_csv(tmp_path / "nonote.csv", index=False)
    tschema.save(tmp_path / "schema.json")
    argv = ["train", "--data", str(tmp_path / "nonote.csv"), "--schema", str(tmp_path / "schema.json"),
            "--epsilon", "3", "--out", str(tmp_path / "m2"), "--models", "wgan,text", "--text-epochs", "1",
            "--canaries", "1", "--quiet"]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "note" in err and "not in the file" in err
    assert main(["train", "--data", str(demo_dir / "train.csv"), "--schema", str(demo_dir / "schema.json"),
                 "--epsilon", "3", "--out", str(tmp_path / "m3"), "--canaries", "2", "--quiet"]) != 0
    assert "--canaries" in capsys.readouterr().err


def test_csv_round_trip_of_generated_notes(dp_model, tschema, tmp_path):
    """Generated bytes (a barely trained model writes control characters, U+FFFD) survive the CSV writer and
    the schema check: a lone carriage return would otherwise split a row."""
    assert clean_note("a\rb\r\nc\x00d\te\x1bf") == "a\nb\ncd\tef"
    out, _ = dp_model
    syn, _ = generate(out, 100, seed=5)
    assert not any(re.search(r"[\x00-\x08\x0b-\x1f\x7f]", n) for n in syn["note"])
    write_table(syn, tmp_path / "s.csv")
    back = validate_frame(read_table(tmp_path / "s.csv"), tschema, "s.csv")
    assert len(back) == 100
    assert np.mean([isinstance(v, str) for v in back["note"]]) > 0.9


def test_gate_rules_for_the_note_checks():
    """The three note checks on hand-made attack results: thresholds, the significance rule, the exposure bound."""
    from audits.gate import decide
    from audits.policy import default_policy
    from audits.text import chance_exposure, exposure, make_canaries

    pol = default_policy()
    assert {"notes_ngram_excess_max", "notes_identifier_replay_max", "canary_exposure_margin_bits_max"} <= set(pol.thresholds)

    def gate(ng, replay, exp_per16):
        at = {"notes_ngram_overlap": {"n": 8, "excess": ng},
              "notes_identifier_replay": {"replayed_values": replay, "control": 0},
              "notes_canary_exposure": {"chance": chance_exposure(1000), "per_count": {"0": exp_per16, "16": exp_per16}}}
        return {c["check"]: c["passed"] for c in decide(at, None, pol)["checks"] if c["check"].startswith("notes_")}

    quiet = {"value": 1.5, "ci_low": 0.5, "ci_high": 2.5, "lower_bound": 0.2, "n": 4}
    assert all(gate({"value": 0.0, "ci_low": -0.02, "ci_high": 0.02, "baseline": 0.0}, 0, quiet).values())
    # above the threshold but not significant: passes (noisy small sites); significant: fails
    assert gate({"value": 0.08, "ci_low": -0.03, "ci_high": 0.19, "baseline": 0.0}, 0, quiet)["notes_ngram_overlap.excess"]
    assert not gate({"value": 0.3, "ci_low": 0.25, "ci_high": 0.35, "baseline": 0.0}, 0, quiet)["notes_ngram_overlap.excess"]
    assert not gate({"value": 0.0, "ci_low": 0.0, "ci_high": 0.0, "baseline": 0.0}, 1, quiet)["notes_identifier_replay.count"]
    loud = {"value": 9.9, "ci_low": 9.9, "ci_high": 9.9, "lower_bound": 8.5, "n": 2}
    assert not gate({"value": 0.0, "ci_low": 0.0, "ci_high": 0.0, "baseline": 0.0}, 0, loud)["notes_canary_exposure.count_16"]
    # a scorer that knows nothing about the secrets: one canary per count must not fail the bound by chance often
    rng = np.random.default_rng(0)
    fails = 0
    for rep in range(40):
        cans = make_canaries(1, (16,), seed=rep, controls=False)
        res = exposure(lambda texts, c: rng.normal(size=len(texts)), cans, n_candidates=200, seed=rep)
        fails += res["per_count"]["16"]["lower_bound"] > res["chance"] + pol.thresholds["canary_exposure_margin_bits_max"]
    assert fails <= 4  # expected ≈ 2.5 % of 40 ≈ 1
