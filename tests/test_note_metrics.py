"""Note metrics (issue 7, req. 4) respond to quality: rendered notes of unseen patients score like real notes,
notes detached from their records (positive control) score at chance, random text is told apart at once."""

import json
import math
import time
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from dpsynth.data.demo import add_demo_notes, demo_schema_with_notes
from dpsynth.errors import DataError, SchemaError
from dpsynth.metrics.notes import (
    _tokens,
    condition_consistency,
    diversity,
    holdout_perplexity,
    note_metrics,
    note_tstr,
    two_sample_test,
    value_consistency,
)
from dpsynth.metrics.report import _notes_section, render_html
from dpsynth.metrics.utility import evaluate, notes_section
from dpsynth.models.text import NoteLM, NoteTokenizer, TextConfig, note_log_likelihood


@pytest.fixture(scope="module")
def nschema():
    return demo_schema_with_notes()


@pytest.fixture(scope="module")
def parts(train_df):
    """Three disjoint groups of demo patients with rendered notes: real train, real holdout, and a third group
    standing in for a perfect generator (each note consistent with its own record)."""
    df = add_demo_notes(train_df.iloc[:3100]).reset_index(drop=True)
    return df.iloc[:1500].reset_index(drop=True), df.iloc[1500:2300].reset_index(drop=True), \
        df.iloc[2300:].reset_index(drop=True)


@pytest.fixture(scope="module")
def shuffled(parts):
    """Positive control: the third group's notes permuted across rows (each note describes another patient)."""
    syn = parts[2].copy()
    syn["note"] = syn["note"].to_numpy()[np.random.default_rng(1).permutation(len(syn))]
    return syn


def test_real_notes_are_consistent_and_indistinguishable(parts, nschema):
    real, hold, good = parts
    c = condition_consistency(real, good, nschema, real_holdout=hold, seed=0)
    json.dumps(c)
    assert c["consistency"] >= 0.85 and c["ceiling"]["consistency"] >= 0.85
    assert abs(c["consistency"] - c["ceiling"]["consistency"]) < 0.05
    assert {"htn", "diabetes", "afib", "mi", "nafld"} <= set(c["conditions"])
    assert "positives" in c["skipped"]["cardiac_arrest"]  # ~1 % prevalence: too few positives in 1,500 notes
    e = c["conditions"]["htn"]
    assert e["balanced_accuracy"] > 0.9 and e["auc"] > 0.95 and e["n_positive"] == int(good["htn"].sum())
    assert c["accuracy_macro"] >= c["consistency"] - 0.01  # plain accuracy flatters rare conditions
    # without a holdout: a 25 % split of the training notes is the ceiling
    c2 = condition_consistency(real, good, nschema, conditions=["htn", "diabetes"], seed=0)
    assert c2["ceiling"]["n"] == 375 and c2["n"]["real_train"] == 1125 and c2["consistency"] > 0.9
    t = two_sample_test(hold["note"], good["note"], seed=0)
    assert t["n"] == {"real": 800, "synthetic": 800} and len(t["fold_aucs"]) == 5
    assert t["ci"][0] <= 0.5 <= t["ci"][1] and abs(t["auc"] - 0.5) < 0.06


def test_value_consistency_reads_the_records_numbers_off_the_notes(parts, shuffled, nschema):
    """The continuous columns' analogue of condition consistency: a note with its own record's numbers scores like
    the held-out real notes; notes of other patients score at chance; a value the notes never state (follow-up
    time) is skipped; a record missing a value is left out of that column's score."""
    real, hold, good = parts
    v = value_consistency(real, good, nschema, real_holdout=hold, seed=0)
    json.dumps(v)
    assert {"age", "bmi", "weight"} <= set(v["columns"]) and "not expressed" in v["skipped"]["futime"]
    assert v["consistency"] >= 0.8 and abs(v["consistency"] - v["ceiling"]["consistency"]) < 0.05
    bad = value_consistency(real, shuffled, nschema, real_holdout=hold, seed=0)
    assert bad["consistency"] < 0.6 and bad["ceiling"]["consistency"] == pytest.approx(v["ceiling"]["consistency"])
    gaps = good.copy()
    gaps.loc[: len(gaps) // 2, "bmi"] = np.nan
    g = value_consistency(real, gaps, nschema, real_holdout=hold, seed=0)
    assert g["columns"]["bmi"]["n"] == int(gaps["bmi"].notna().sum()) < v["columns"]["bmi"]["n"]


def test_notes_detached_from_their_records_score_at_chance(parts, shuffled, nschema):
    real, hold, good = parts
    c = condition_consistency(real, shuffled, nschema, real_holdout=hold, seed=0)
    assert c["consistency"] < 0.6 and c["ceiling"]["consistency"] >= 0.85
    ts_bad = note_tstr(real, shuffled, hold, nschema, seed=0)
    ts_good = note_tstr(real, good, hold, nschema, seed=0)
    json.dumps(ts_bad)
    assert ts_good["ratio"] > 0.95 and ts_good["trtr_auc_macro"] > 0.9
    assert ts_bad["ratio"] < 0.7
    assert ts_bad["trtr_auc_macro"] == pytest.approx(ts_good["trtr_auc_macro"])  # same real model, same test set
    assert ts_bad["conditions"]["htn"]["tstr_auc"] < 0.6 and ts_good["conditions"]["htn"]["tstr_auc"] > 0.95


def test_random_text_is_told_apart(parts):
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789 .,"))
    noise = ["".join(rng.choice(letters, size=int(rng.integers(100, 200)))) for _ in range(400)]
    t = two_sample_test(parts[1]["note"], noise, seed=0)
    assert t["auc"] > 0.98 and t["ci"][0] > 0.95 and t["n"]["real"] == 400


def _bleu_reference(hyp: list[str], refs: list[list[str]], eps: float = 0.1) -> float:
    """Plain-Python sentence BLEU-4 (clipped counts, closest reference length, NLTK method1 smoothing)."""
    logp = 0.0
    for n in range(1, 5):
        h = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
        best: Counter = Counter()
        for r in refs:
            for g, k in Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1)).items():
                best[g] = max(best[g], k)
        clipped = sum(min(k, best[g]) for g, k in h.items())
        logp += math.log((clipped or eps) / max(sum(h.values()), 1)) / 4
    ref = min((len(r) for r in refs), key=lambda x: (abs(x - len(hyp)), x))
    bp = 1.0 if len(hyp) >= ref else math.exp(1 - ref / max(len(hyp), 1))
    return bp * math.exp(logp)


def test_diversity(parts):
    one = "pt is a 54 y/o man with HTN and DM2, plan f/u 6 months."
    same = diversity([one] * 50)
    words = _tokens(one)
    assert same["self_bleu_4"] == pytest.approx(1.0)
    assert same["distinct_1"] == pytest.approx(len(set(words)) / (50 * len(words))) and same["distinct_3"] < 0.03
    notes = parts[0]["note"].tolist()
    t = time.perf_counter()
    real = diversity(notes, sample=500, seed=0)
    assert time.perf_counter() - t < 10
    assert real["n"] == 500 and real["distinct_2"] > 10 * same["distinct_2"] and real["self_bleu_4"] < 0.9
    # the vectorised self-BLEU equals a plain pairwise computation
    few = notes[:25]
    toks = [_tokens(x) for x in few]
    want = np.mean([_bleu_reference(toks[i], toks[:i] + toks[i + 1:]) for i in range(len(toks))])
    assert diversity(few, sample=25)["self_bleu_4"] == pytest.approx(want, rel=1e-9)
    # empty and missing notes are counted and excluded
    d = diversity(few + ["", None, "   ", float("nan")], sample=100)
    assert d["excluded_notes"] == 4 and d["n"] == 25


def test_bad_input_is_named(parts, nschema, schema):
    real, hold, good = parts
    with pytest.raises(SchemaError, match="kind 'text'"):
        condition_consistency(real, good, schema)  # the demo schema without the note column
    few = good.copy()
    few.loc[15:, "note"] = None
    with pytest.raises(DataError, match="synthetic has 15 usable notes"):
        note_tstr(real, few, hold, nschema)
    with pytest.raises(DataError, match="real_holdout has no note column"):
        note_tstr(real, good, hold.drop(columns="note"), nschema)
    gaps = good.copy()
    gaps.loc[:29, "note"] = [""] * 15 + [None] * 15
    c = condition_consistency(real, gaps, nschema, conditions=["htn"], seed=0)
    assert c["excluded_notes"]["synthetic"] == 30 and c["n"]["synthetic"] == len(good) - 30


@pytest.fixture(scope="module")
def tiny_lm(parts, nschema):
    """(untrained, trained) tiny note models and their tokenizer; trained non-privately on 200 notes, 12 full-batch
    steps (measured: perplexity 1,314 untrained → 50 after 12 steps, 4 after 40; each step ≈ 0.7 s)."""
    torch.manual_seed(0)
    tok = NoteTokenizer.from_schema(nschema, max_len=96)
    cfg = TextConfig(d_model=32, layers=1, heads=4, max_len=96)
    untrained = NoteLM.for_tokenizer(tok, cfg)
    trained = NoteLM.for_tokenizer(tok, cfg)
    trained.load_state_dict(untrained.state_dict())
    with pytest.warns(UserWarning, match="truncated"):
        ids = torch.as_tensor(tok.encode(parts[0].iloc[:200], parts[0]["note"].iloc[:200].tolist()).ids)
    opt = torch.optim.Adam(trained.parameters(), lr=1e-2)
    for _ in range(12):
        opt.zero_grad()
        trained(ids).mean().backward()
        opt.step()
    trained.eval()
    return tok, untrained, trained


def test_perplexity(parts, tiny_lm):
    tok, untrained, trained = tiny_lm
    seen = parts[0].iloc[:200]
    p_un = holdout_perplexity(untrained, tok, seen, "note")
    p_tr = holdout_perplexity(trained, tok, seen, "note")
    assert p_tr["perplexity"] < 0.5 * p_un["perplexity"]
    assert p_un["perplexity"] > 200  # an untrained model is near uniform over 256 bytes + specials
    with pytest.warns(UserWarning):
        enc = tok.encode(seen, seen["note"].tolist())
    ll, n = note_log_likelihood(trained, enc.ids)
    assert p_tr["perplexity"] == pytest.approx(math.exp(-ll.sum() / n.sum()), rel=1e-9)
    assert p_tr["tokens"] == int(n.sum()) and p_tr["notes"] == 200 and p_tr["truncated"] > 0


def test_note_metrics_in_the_evaluation_and_report(parts, nschema, tiny_lm):
    real, hold, good = parts
    tok, _, trained = tiny_lm
    res = evaluate(real, hold, good, nschema, note_model=trained, note_tokenizer=tok)
    n = res["notes"]
    json.dumps(res)
    s = n["summary"]
    assert s["consistency"] >= 0.85 and s["tstr_ratio"] > 0.95 and abs(s["two_sample_auc"] - 0.5) < 0.06
    assert s["distinct_2_synthetic"] == pytest.approx(s["distinct_2_real"], rel=0.15)
    assert s["perplexity_train"] == pytest.approx(holdout_perplexity(trained, tok, real, "note")["perplexity"])
    assert s["perplexity_gap"] == pytest.approx(s["perplexity_holdout"] / s["perplexity_train"])
    assert n["diversity"]["synthetic"]["n"] == n["diversity"]["real"]["n"] == 500
    html = render_html(res, title="t")
    assert "<h2 id=notes>Notes</h2>" in html and "Rendered demonstration notes, not real clinical text" in html
    assert "<td>htn</td>" in html and "condition consistency" in html and "cardiac_arrest (" in html
    for note in pd.concat([real, hold, good])["note"]:  # no note is quoted in the report
        assert note not in html
    # a synthetic file without notes (model without the text part): the section says why, the rest is kept
    skipped = notes_section(real, hold, good.assign(note=np.nan), nschema)
    assert "synthetic has 0 usable notes" in skipped["skipped"]
    # (the page's notes part alone: the rest of the page, and its ≈ 5 s of plots, is the page checked above)
    assert "Note metrics not computed: synthetic has 0" in _notes_section({**res, "notes": skipped})
    assert notes_section(real, hold, good.drop(columns="note"), nschema) is None
    # without the model: no perplexity
    m = note_metrics(real.iloc[:300], hold.iloc[:200], good.iloc[:200], nschema, seed=0)
    assert "perplexity" not in m and "perplexity_train" not in m["summary"] and m["summary"]["consistency"] > 0.8


def test_note_metrics_vectorise_each_set_of_notes_once_with_the_same_results(parts, nschema, monkeypatch):
    import dpsynth.metrics.notes as nm

    real, hold, good = parts[0].iloc[:400], parts[1].iloc[:300], parts[2].iloc[:300]
    fits = []
    plain = nm._vectorizer
    monkeypatch.setattr(nm, "_vectorizer", lambda analyzers=None: fits.append(analyzers is None) or plain(analyzers))
    m = note_metrics(real, hold, good, nschema, seed=0)
    # the real notes once (condition, value consistency and TRTR), the synthetic once (TSTR), and two_sample_test's
    # analyser builder (its folds fit on pre-analysed documents)
    assert fits.count(True) == 3 and nm._VECTORS is None
    fits.clear()
    assert m["consistency"] == condition_consistency(real, good, nschema, real_holdout=hold, seed=0)
    assert m["value_consistency"] == value_consistency(real, good, nschema, real_holdout=hold, seed=0)
    assert m["tstr"] == note_tstr(real, good, hold, nschema, seed=0)
    assert fits.count(True) == 4  # called on their own, each fits its own
