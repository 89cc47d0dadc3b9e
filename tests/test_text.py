"""The note generator's building blocks (issue 7): rendered demo notes, the non-leaking tokenizer, the causal
transformer and its DP step (real Opacus), sampling, and the memorisation audits (canary exposure, n-gram
overlap, identifier replay)."""

import copy
import math
import re
import warnings
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from audits.text import (
    CANARY_FORMAT,
    chance_exposure,
    exposure,
    exposure_lower_bound,
    insert_canaries,
    make_canaries,
    ngram_overlap,
    note_identifier_replay,
)
from dpsynth.data.notes import NOTE_LABEL, render_notes
from dpsynth.models.text import (
    BOS,
    EOS,
    FIRST_COND,
    PAD,
    SEP,
    NoteLM,
    NoteTokenizer,
    TextConfig,
    make_private_text,
    note_log_likelihood,
    sample_notes,
    text_epoch,
    text_step,
)

SMALL = TextConfig(d_model=32, heads=4, layers=2, max_len=96)


@pytest.fixture(scope="module")
def notes(train_df):
    return render_notes(train_df.iloc[:3000], seed=0)


@pytest.fixture(scope="module")
def tok(schema):
    return NoteTokenizer.from_schema(schema, max_len=96)


def encoded(tok, df, notes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation warnings: the short test max_len cuts most notes
        return tok.encode(df, notes)


def flat(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


# ------------------------------------------------------------------------------------------------
# rendered demonstration notes
# ------------------------------------------------------------------------------------------------

def test_rendered_notes_are_deterministic_labelled_and_per_patient(train_df, notes):
    df = train_df.iloc[:3000]
    assert notes.attrs["label"] == NOTE_LABEL and "not real" in NOTE_LABEL
    assert notes.index.equals(df.index) and notes.map(lambda s: isinstance(s, str) and len(s) > 0).all()
    assert render_notes(df.iloc[:200], seed=0).equals(notes.iloc[:200])
    # each note depends on its own row only: shuffling / dropping other patients changes nothing
    sub = df.iloc[[57, 3, 1200, 9]]
    assert render_notes(sub, seed=0).tolist() == notes.loc[sub.index].tolist()
    assert render_notes(df.iloc[:200], seed=1).ne(notes.iloc[:200]).mean() > 0.9
    # the identifier is never rendered, nor the follow-up outcome
    one = df.iloc[:1].copy()
    other = one.assign(id=987654, futime=1, status=1)
    assert render_notes(one, 0).tolist() == render_notes(other, 0).tolist()


def test_rendered_notes_vary_and_reflect_the_record(train_df, notes):
    df = train_df.iloc[:3000]
    markers = {"soap": r"^S: ", "referral": r"(?i)^(?:dear colleague|thanks for seeing|please see)",
               "problems": r"(?i)problems: ", "annual": r"(?i)^annual review", "narrative": r"(?i)^(?:this is a|the patient is)",
               "clinic": r"(?i)seen in clinic|^pt is a|here for", "telegraphic": r"^\d+[MF]\. "}
    for name, pat in markers.items():
        assert notes.str.contains(pat, regex=True).mean() > 0.03, name
    for abbr in ["HTN", "DM2", "AF", "CHF", "MI", "BMI", "SBP", "HDL", "pt", "y/o", "hx", "c/o", "f/u"]:
        assert notes.str.contains(rf"\b{re.escape(abbr)}\b", regex=True).any(), abbr
    assert notes.nunique() > 0.9 * len(notes)  # duplicates only among sparse records (few facts to vary)
    # conditions are written into the note (allowing for the small typo rate and all-caps/lower-case notes)
    htn = notes[df["htn"] == 1].str.contains(r"(?i)\bhtn\b|hypertension|high blood pressure")
    assert htn.mean() > 0.95
    no_cond = df[["htn", "diabetes", "afib", "heart_failure"]].sum(axis=1) == 0
    # (pertinent negatives such as "no HTN" may mention them; these words only appear as positives)
    assert not notes[no_cond].str.contains(r"(?i)\b(?:hypertension|dm2|t2dm|atrial fibrillation|congestive)\b").any()
    # missing values are omitted or phrased, never rendered as numbers
    miss = df["weight"].isna()
    assert not notes[miss].str.contains(r"(?i)(?:wt|weight) ~?\d").any()
    assert notes[miss].str.contains(r"(?i)weight (?:not recorded|unknown)|wt not on file").any()
    # noise: some typos / casing / spacing, and numbers rounded now and then
    assert notes.str.contains("  ").mean() > 0.02 and (notes == notes.str.lower()).mean() > 0.02
    assert notes.str.contains("~").mean() > 0.05


def test_rendering_handles_missing_columns_and_values():
    df = pd.DataFrame({"age": [np.nan, 40.0], "male": [1, np.nan]})
    out = render_notes(df, seed=3)
    assert len(out) == 2 and out.map(len).min() > 10 and "None" not in " ".join(out) and "nan" not in " ".join(out)


# ------------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------------

def test_tokenizer_vocabulary_comes_from_the_schema_only(schema, tok):
    n_cond = len(schema.modelled)
    assert tok.prefix_len == n_cond + 2
    per_col = {c.name: len(c.values) for c in tok.columns}
    assert per_col["male"] == 3 and per_col["smoking"] == 3  # 0/1/NA, 2 categories + NA
    assert tok.vocab_size == 260 + sum(per_col.values())
    assert [c.edges for c in tok.columns if c.name == "age"] == [[30, 40, 50, 60, 70, 80]]
    hdl = next(c for c in tok.columns if c.name == "futime")  # no clinical cut-off: equal-width public bands
    assert hdl.edges == [1875.0, 3750.0, 5625.0]
    again = NoteTokenizer.from_json(tok.to_json())
    assert again.to_json() == tok.to_json() and again.vocab_size == tok.vocab_size
    assert tok.token_name(tok.condition_token("age", 45)) == "age=40-50"
    assert tok.token_name(tok.condition_token("bmi", float("nan"))) == "bmi=NA"
    assert tok.token_name(tok.condition_token("smoking", "smoker")) == "smoking=smoker"
    assert tok.token_name(tok.condition_token("sbp", 200)) == "sbp=>=180"


def test_tokenizer_round_trips_and_counts_bad_input(schema, train_df, tok):
    text = "pt 67 y/o F, BMI 24.9 — café ☕ 😀"
    assert tok.decode(tok.encode_text(text)) == text
    rows = train_df.iloc[:6]
    notes = [text, "", None, b"bad \xff\xfe bytes", "lone \udcff surrogate", "x" * 500]
    with pytest.warns(UserWarning, match="truncated"):
        enc = tok.encode(rows, notes)
    assert enc.ids.shape == (6, 96) and enc.ids.dtype == np.int64
    assert (enc.ids[:, 0] == BOS).all() and (enc.ids[:, tok.prefix_len - 1] == SEP).all()
    assert enc.truncated == 1 and enc.empty == 1 and enc.missing == 1 and enc.replaced == 3
    assert enc.present.tolist() == [True, True, False, True, True, True]
    assert enc.ids[1, tok.prefix_len:].tolist()[:2] == [EOS, PAD]  # empty: BOS cond SEP EOS
    assert tok.decode(enc.ids[0]) == text
    assert tok.decode(enc.ids[3]) == "bad \ufffd\ufffd bytes"
    assert tok.decode(enc.ids[4]) == "lone \ufffd surrogate"
    assert tok.decode(enc.ids[5]) == "x" * (96 - tok.prefix_len - 1) and enc.ids[5, -1] == EOS
    # truncation never splits a UTF-8 character
    enc2 = encoded(tok, rows.iloc[:1], ["é" * 200])
    assert tok.decode(enc2.ids[0]) == "é" * ((96 - tok.prefix_len - 1) // 2)
    assert list(enc.ids[0, 1 : tok.prefix_len - 1]) == tok.encode_condition(rows.iloc[0])


def test_word_pieces_of_the_public_vocabulary_are_one_token_and_everything_else_is_bytes(schema, train_df):
    from dpsynth.data.demo import demo_schema_with_notes
    from dpsynth.models.text import WORD_TOKENIZER_KIND

    wt = NoteTokenizer.from_schema(demo_schema_with_notes(), max_len=40)
    assert wt.kind == WORD_TOKENIZER_KIND and len(wt.words) > 500
    assert wt.vocab_size == NoteTokenizer.from_schema(schema).vocab_size + len(wt.words)
    text = "Pt c/o fatigue. HTN, DM2; zyxwv 12345 café ☕"
    ids = wt.encode_text(text)
    assert wt.decode(ids) == text  # exact round trip
    names = [wt.token_name(i) for i in ids]
    assert " HTN" in names and " fatigue" in names  # known pieces are single tokens, with their leading space
    assert "z" in names and " zyxwv" not in names  # an unknown word is spelled in bytes (ASCII bytes name themselves)
    assert len(ids) < len(text.encode("utf-8"))
    # every rendered demo note round-trips and is ~3 × shorter than its bytes
    notes = render_notes(train_df.iloc[:300], seed=0)
    lens = [len(wt.encode_text(n)) for n in notes]
    assert all(wt.decode(wt.encode_text(n)) == n for n in notes)
    assert np.mean(lens) < 0.45 * np.mean([len(n.encode("utf-8")) for n in notes])
    # truncation cuts between pieces; persistence keeps the word list; generation may use words, bytes, EOS
    enc = encoded(wt, train_df.iloc[:1], [" continue" * 40])
    assert wt.decode(enc.ids[0]) == " continue" * (40 - wt.prefix_len - 1) and enc.truncated == 1
    again = NoteTokenizer.from_json(wt.to_json())
    assert again.words == wt.words and again.vocab_size == wt.vocab_size and again.kind == wt.kind
    gen = set(wt.generable())
    assert EOS in gen and wt.word_ids[" HTN"] in gen and 255 in gen
    assert not gen & {PAD, BOS, SEP} and not gen & set(range(260, wt.word_offset))  # no condition tokens


def test_the_demo_vocabulary_is_the_renderer_language_without_any_patient():
    """The shipped word list is exactly what public_vocabulary() derives from the schema and the renderer's
    code (random public records, no patient): regenerated here, so an edit of the renderer cannot drift."""
    from dpsynth.data.demo import demo_note_vocabulary, demo_schema
    from dpsynth.data.notes import public_vocabulary

    assert public_vocabulary(demo_schema()) == demo_note_vocabulary()


def test_a_vocabulary_is_only_for_text_columns_and_must_be_clean():
    from dpsynth.errors import SchemaError
    from dpsynth.schema import Column

    Column("n", "text", vocabulary=[" a", "bc"]).validate()
    for bad, msg in ((Column("x", "binary", vocabulary=[" a"]), "only text"),
                     (Column("n", "text", vocabulary=[" a", " a"]), "duplicate"),
                     (Column("n", "text", vocabulary=[" a", ""]), "non-empty")):
        with pytest.raises(SchemaError, match=msg):
            bad.validate()


# ------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------

def test_attention_is_causal(tok, train_df, notes):
    torch.manual_seed(0)
    m = NoteLM.for_tokenizer(tok, SMALL)
    ids = torch.from_numpy(encoded(tok, train_df.iloc[:4], notes.iloc[:4]).ids[:, :60])
    k = 40
    changed = ids.clone()
    changed[:, k] = (changed[:, k] + 7) % 256
    a, b = m.logits(ids), m.logits(changed)
    torch.testing.assert_close(a[:, :k], b[:, :k], rtol=0, atol=0)
    assert (a[:, k:] - b[:, k:]).abs().max() > 1e-4


def test_loss_predicts_note_tokens_only(tok, train_df, notes):
    torch.manual_seed(1)
    m = NoteLM.for_tokenizer(tok, replace(SMALL, cond_dropout=0.0))  # the loss of the record's own condition
    enc = encoded(tok, train_df.iloc[:5], ["short", "", "a somewhat longer note here", notes.iloc[3], "é"])
    ids = torch.from_numpy(enc.ids)
    got = m(ids)
    logp = torch.log_softmax(m.logits(ids), dim=-1)
    P = tok.prefix_len
    for i in range(5):
        row = ids[i].tolist()
        end = row.index(EOS)
        want = -np.mean([logp[i, t - 1, row[t]].item() for t in range(P, end + 1)])  # bytes and EOS, not prefix/PAD
        assert got[i].item() == pytest.approx(want, rel=1e-5)
    # PAD columns do not matter (rows 0, 1, 2, 4 end well before column 60)
    short = [0, 1, 2, 4]
    torch.testing.assert_close(m(ids[short, :60]), got[short])
    ll, n = note_log_likelihood(m, ids)
    assert n.tolist() == [6, 1, 28, (ids[3] != PAD).sum().item() - P, 3]
    np.testing.assert_allclose(-ll / n, got.detach().numpy(), rtol=1e-5)


def test_config_and_model_guard_rails(tok):
    with pytest.raises(ValueError):
        TextConfig(d_model=30, heads=4)
    with pytest.raises(ValueError):
        NoteLM.for_tokenizer(tok, TextConfig(max_len=128))
    with pytest.raises(ValueError):
        NoteTokenizer(tok.columns, max_len=tok.prefix_len)  # no room for a note


@pytest.mark.parametrize("T", [2, 50])  # Opacus' Gram formula (short) and the per-sample matmul (long)
def test_sequence_linear_ghost_norm_is_the_exact_per_sample_norm(T):
    from dpsynth.models.text import SeqLinear, _seq_linear_norm_sample

    torch.manual_seed(T)
    layer = SeqLinear(8, 6)
    a, g = torch.randn(4, T, 8), torch.randn(4, T, 6)
    got = _seq_linear_norm_sample(layer, [a], g)
    want_w = torch.einsum("nto,nti->noi", g, a).flatten(1).norm(dim=1)
    torch.testing.assert_close(got[layer.weight], want_w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[layer.bias], g.sum(1).norm(dim=1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dense_max, distinct", [(None, False), (0, False), (None, True), (0, True)])
def test_sequence_embedding_ghost_norm_is_the_exact_per_sample_norm(monkeypatch, dense_max, distinct):
    """The scatter (small tables), Opacus' fallback, and samples without a repeated id (positions, condition
    tokens: the norm of the output gradients themselves) all give the norm of the per-sample table gradient."""
    from opacus.grad_sample.embedding_norm_sample import compute_embedding_norm_sample

    import dpsynth.models.text as text_mod

    if dense_max is not None:
        monkeypatch.setattr(text_mod, "DENSE_EMBEDDING_NORM_MAX", dense_max)
    torch.manual_seed(3)
    V, T = 40, 30
    layer = text_mod.SeqEmbedding(V, 5)
    # distinct: a different permutation per sample; else repeated ids within each sample (and one sample
    # with a single repeat, which must not take the distinct-id shortcut)
    ids = torch.stack([torch.randperm(V)[:T] for _ in range(6)]) if distinct else torch.randint(0, V, (6, T))
    if not distinct:
        ids[0] = torch.arange(T) % 29
    g = torch.randn(6, T, 5)
    got = text_mod._seq_embedding_norm_sample(layer, [ids], g)[layer.weight]
    dense = torch.stack([torch.zeros(V, 5).index_add_(0, ids[b], g[b]).flatten() for b in range(6)])
    torch.testing.assert_close(got, dense.norm(dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, compute_embedding_norm_sample(layer, [ids], g)[layer.weight], rtol=1e-5, atol=1e-6)


def _private(model, ids, B, *, C, lr, mode):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids[: 4 * B]), batch_size=B)
    return make_private_text(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), loader=loader,
                             noise_multiplier=0.0, max_grad_norm=C, noise_generator=None, grad_sample_mode=mode)


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_dp_text_step_with_no_noise_and_no_clipping_equals_plain_step(tok, train_df, notes, mode):
    torch.manual_seed(3)
    ids = torch.from_numpy(encoded(tok, train_df.iloc[:512], notes.iloc[:512]).ids)
    B = 64
    # no condition dropout: hooks mode cuts the batch into length-sorted chunks (TextConfig.length_chunks), which
    # draws the dropout per chunk in another order than one pass over the batch
    base = NoteLM.for_tokenizer(tok, replace(SMALL, cond_dropout=0.0))
    assert mode == "ghost" or base.config.length_chunks > 1
    plain = copy.deepcopy(base)
    torch.manual_seed(11)
    text_step(model=plain, optimizer=torch.optim.SGD(plain.parameters(), lr=0.05), criterion=None, batch=(ids[:B],),
              private=False)
    dp = copy.deepcopy(base)
    model, opt, crit, _ = _private(dp, ids, B, C=1e6, lr=0.05, mode=mode)
    assert opt.expected_batch_size == B
    torch.manual_seed(11)
    text_step(model=model, optimizer=opt, criterion=crit, batch=(ids[:B],), private=True)
    assert not torch.equal(flat(plain), flat(base))
    torch.testing.assert_close(flat(dp), flat(plain), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_dp_text_step_clips_each_patient(tok, train_df, notes, mode):
    """σ = 0, tiny clip: the update is the sum of per-patient gradients each of norm ≤ C, over the batch size."""
    torch.manual_seed(4)
    ids = torch.from_numpy(encoded(tok, train_df.iloc[:512], notes.iloc[:512]).ids)
    B, C = 64, 1e-3
    m = NoteLM.for_tokenizer(tok, SMALL)
    before = flat(m).clone()
    model, opt, crit, _ = _private(m, ids, B, C=C, lr=1.0, mode=mode)
    text_step(model=model, optimizer=opt, criterion=crit, batch=(ids[:B],), private=True)
    moved = (flat(m) - before).norm().item()
    assert 0 < moved <= C * (1 + 1e-4)
    # one patient alone, tiny clip: the update is exactly C (its gradient is far larger than C). No condition
    # dropout: a dropped record has no row in the sparse path, so its update would be C·√(1 − s) only
    m1 = NoteLM.for_tokenizer(tok, replace(SMALL, cond_dropout=0.0))
    b1 = flat(m1).clone()
    model, opt, crit, _ = _private(m1, ids, 1, C=C, lr=1.0, mode=mode)
    text_step(model=model, optimizer=opt, criterion=crit, batch=(ids[:1],), private=True)
    assert (flat(m1) - b1).norm().item() == pytest.approx(C, rel=1e-3)


def _groups(m):
    path = {id(p) for _, p in m.path_parameters()}
    return ([p for p in m.parameters() if id(p) not in path], [p for p in m.parameters() if id(p) in path])


def _moved(params, before):
    return torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(params, before)]).norm().item()


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_two_group_clipping_bounds_each_group_of_one_patient(tok, train_df, notes, mode):
    """σ = 0, one patient, tiny C: the path moves by exactly C·√s, the language model by exactly C·√(1 − s),
    so the whole update is C (the sensitivity the noise is calibrated to)."""
    torch.manual_seed(6)
    ids = torch.from_numpy(encoded(tok, train_df.iloc[:64], notes.iloc[:64]).ids)
    C, share = 1e-3, 0.3
    m = NoteLM.for_tokenizer(tok, replace(SMALL, cond_clip_share=share, cond_dropout=0.0))
    lm, path = _groups(m)
    assert path and len(lm) + len(path) == len(list(m.parameters()))
    b_lm, b_path, b_all = [p.detach().clone() for p in lm], [p.detach().clone() for p in path], flat(m).clone()
    model, opt, crit, _ = _private(m, ids, 1, C=C, lr=1.0, mode=mode)
    text_step(model=model, optimizer=opt, criterion=crit, batch=(ids[:1],), private=True)
    assert _moved(path, b_path) == pytest.approx(C * math.sqrt(share), rel=1e-3)
    assert _moved(lm, b_lm) == pytest.approx(C * math.sqrt(1 - share), rel=1e-3)
    assert (flat(m) - b_all).norm().item() == pytest.approx(C, rel=1e-3)


@pytest.mark.parametrize("share", [0.5, 0.0])
def test_two_group_clipping_equals_per_patient_reference_in_both_modes(tok, train_df, notes, share):
    """σ = 0: the ghost and hooks updates (hooks with and without book-keeping; 2 length chunks of 4 patients) all
    equal Σ_i (c_A,i·g_A,i + c_P,i·g_P,i) / B computed one patient at a time with plain autograd, c = min(1, bound /
    the group's norm) — for clipped and unclipped patients. Share 0: one flat bound, c = min(1, C / the whole norm)."""
    torch.manual_seed(7)
    ids = torch.from_numpy(encoded(tok, train_df.iloc[:64], notes.iloc[:64]).ids)
    B = 8
    cfg = replace(SMALL, cond_clip_share=share, cond_dropout=0.0, length_chunks=2)
    base = NoteLM.for_tokenizer(tok, cfg)
    with torch.no_grad():  # a path with weight, so the gate's gradient is not zero
        base.cond_out.weight.normal_(0, 0.5)
    ref = copy.deepcopy(base)
    lm, path = _groups(ref)
    norms = []
    for i in range(B):
        ref.zero_grad()
        ref(ids[i : i + 1]).sum().backward()
        norms.append((torch.cat([p.grad.reshape(-1) for p in lm]).norm().item(),
                      torch.cat([p.grad.reshape(-1) for p in path]).norm().item()))
    C = float(np.median([math.hypot(*n) for n in norms]))  # some patients clipped, some not
    total = [torch.zeros_like(p) for p in ref.parameters()]
    in_path = {id(p) for p in path}
    clipped = 0
    for i in range(B):
        ref.zero_grad()
        ref(ids[i : i + 1]).sum().backward()
        c_lm = min(1.0, C * math.sqrt(1 - share) / (norms[i][0] + 1e-6))
        c_path = min(1.0, C * math.sqrt(share) / (norms[i][1] + 1e-6))
        if share == 0:
            c_lm = c_path = min(1.0, C / (math.hypot(*norms[i]) + 1e-6))
        clipped += (c_lm < 1) + (c_path < 1)
        for t, p in zip(total, ref.parameters()):
            t += (c_path if id(p) in in_path else c_lm) * p.grad
    assert 0 < clipped < 2 * B
    want = torch.cat([(b.detach() - 0.1 * t / B).reshape(-1) for b, t in zip(base.parameters(), total)])
    for mode, book in (("ghost", False), ("hooks", True), ("hooks", False)):
        m = copy.deepcopy(base)
        m.config = replace(m.config, book_keeping=book)
        model, opt, crit, _ = _private(m, ids, B, C=C, lr=0.1, mode=mode)
        text_step(model=model, optimizer=opt, criterion=crit, batch=(ids[:B],), private=True)
        torch.testing.assert_close(flat(m), want, rtol=1e-4, atol=1e-6)


def _chunk_ids(tok, train_df, notes, B):
    """4·B encoded notes cut to 10–70 bytes, so length chunks are trimmed to different lengths."""
    cut = notes.iloc[: 4 * B].copy()
    cut[:] = [n[: 10 + (7 * i) % 61] for i, n in enumerate(cut)]
    ids = torch.from_numpy(encoded(tok, train_df.iloc[: 4 * B], cut).ids)
    lengths = (ids[:B] != PAD).sum(dim=1)
    assert lengths.max() - lengths.min() > 40
    return ids


def _hooks_base(tok, share, *, chunks):
    """A hooks-mode note model without condition dropout whose path has weight (so the gate's gradient is not 0)."""
    base = NoteLM.for_tokenizer(tok, replace(SMALL, cond_dropout=0.0, grad_sample_mode="hooks", length_chunks=chunks,
                                             cond_clip_share=share))
    with torch.no_grad():
        base.cond_out.weight.normal_(0, 0.5)
    return base


def _seeded_private(m, ids, B):
    """make_private_text with σ = 1 from a seeded generator and C = 0.05 (most patients clipped), SGD at lr 0.5."""
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=B)
    return make_private_text(model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.5), loader=loader,
                             noise_multiplier=1.0, max_grad_norm=0.05, noise_generator=torch.Generator().manual_seed(5))


def _record_skips(opt) -> list[bool]:
    """Wrap the DP optimizer's signal_skip_step: the returned list records every signal."""
    skips, signal = [], opt.signal_skip_step

    def record(do_skip=True):
        skips.append(do_skip)
        signal(do_skip)

    opt.signal_skip_step = record
    return skips


def _failing_at(n: int, forward):
    """A forward that raises on its n-th call (a chunk running out of memory)."""
    calls = []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError(f"out of memory in chunk {n}")
        return forward(*a, **kw)

    return failing


@pytest.mark.parametrize("share", [0.75, 0.0])
def test_length_chunks_give_the_same_noisy_steps_as_one_pass(tok, train_df, notes, share):
    """Hooks mode, σ = 1 with the same seeded noise, two consecutive steps on one optimizer: a Poisson batch cut
    into length-sorted chunks (each trimmed to its own longest note) ends in the same weights as one pass over the
    whole padded batch — the clipped per-patient gradients are summed over the chunks, the noise is drawn once and
    scaled by the expected batch size, nothing carries into the next step. Two-group and flat clipping. A noise draw
    per chunk, a division per chunk or a clipped sum carried over would move the weights elsewhere."""
    torch.manual_seed(9)
    B = 40
    ids = _chunk_ids(tok, train_df, notes, B)
    base = _hooks_base(tok, share, chunks=1)
    after = {}
    for k in (1, 3, 7):
        m = copy.deepcopy(base)
        m.config = replace(m.config, length_chunks=k)
        model, opt, crit, _ = _seeded_private(m, ids, B)
        assert crit is None  # hooks mode, from the config
        skips = _record_skips(opt)
        losses = [text_step(model=model, optimizer=opt, criterion=crit, batch=(ids[j * B : (j + 1) * B],),
                            private=True) for j in (0, 1)]
        # the chunked path ran: k − 1 skipped chunk steps and one real step per batch (none without chunks)
        assert skips == ([True] * (k - 1) + [False]) * 2 if k > 1 else skips == []
        after[k] = (flat(m).clone(), losses)
    assert (after[1][0] - flat(base)).norm().item() > 0
    for k in (3, 7):
        torch.testing.assert_close(after[k][0], after[1][0], rtol=1e-4, atol=1e-6)
        assert after[k][1] == pytest.approx(after[1][1], rel=1e-5)  # the batches' mean NLL, over all chunks


def test_a_chunked_step_cut_short_leaves_nothing_for_the_next(tok, train_df, notes):
    """A failure in the middle of a chunked step moves no weight and leaves no queued skip or partial clipped sum:
    the optimizer's next step is the same as a fresh optimizer's."""
    torch.manual_seed(10)
    B = 40
    ids = _chunk_ids(tok, train_df, notes, B)
    base = NoteLM.for_tokenizer(tok, replace(SMALL, cond_dropout=0.0, grad_sample_mode="hooks", length_chunks=4))
    results = []
    for fail in (True, False):
        m = copy.deepcopy(base)
        model, opt, crit, _ = _seeded_private(m, ids, B)
        if fail:
            forward = model.forward
            model.forward = _failing_at(3, forward)
            with pytest.raises(RuntimeError, match="chunk 3"):
                text_step(model=model, optimizer=opt, criterion=crit, batch=(ids[:B],), private=True)
            model.forward = forward
            assert torch.equal(flat(m), flat(base))  # nothing released
            assert not opt._step_skip_queue and not opt._is_last_step_skipped
        text_step(model=model, optimizer=opt, criterion=crit, batch=(ids[B : 2 * B],), private=True)
        results.append(flat(m).clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-6)


def _refuse(*args, **kwargs):
    raise AssertionError("a per-sample gradient tensor was formed")


@pytest.mark.parametrize("share", [0.75, 0.0])
def test_book_keeping_gives_the_same_noisy_steps_as_per_sample_gradients(tok, train_df, notes, share):
    """Hooks mode, σ = 1 with the same seeded noise, two consecutive steps of 3 length chunks each: book-keeping
    clipping (each SeqLinear / SeqEmbedding layer's squared per-patient norms and clipped sum from its inputs and output
    gradients; no ordinary weight gradients) ends in the same weights and losses as Opacus' per-sample gradient
    tensors, and never calls Opacus' per-sample samplers. Two-group and flat clipping, most patients clipped. A wrong
    norm, coefficient or clipped sum, or a wrong input gradient from SeqLinear's DP-step forward, moves the weights."""
    import opacus.grad_sample.embedding as opacus_embedding
    import opacus.grad_sample.linear as opacus_linear

    torch.manual_seed(12)
    B = 40
    ids = _chunk_ids(tok, train_df, notes, B)
    base = _hooks_base(tok, share, chunks=3)
    after = {}
    for book in (False, True):
        m = copy.deepcopy(base)
        m.config = replace(m.config, book_keeping=book)
        model, opt, crit, _ = _seeded_private(m, ids, B)
        with pytest.MonkeyPatch.context() as mp:
            if book:
                mp.setattr(opacus_linear, "compute_linear_grad_sample", _refuse)
                mp.setattr(opacus_embedding, "compute_embedding_grad_sample", _refuse)
            losses = [text_step(model=model, optimizer=opt, criterion=crit, batch=(ids[j * B : (j + 1) * B],),
                                private=True) for j in (0, 1)]
        assert (m._dp_book is not None) == book
        after[book] = (flat(m).clone(), losses)
    assert (after[False][0] - flat(base)).norm().item() > 0
    torch.testing.assert_close(after[True][0], after[False][0], rtol=1e-4, atol=1e-6)
    assert after[True][1] == pytest.approx(after[False][1], rel=1e-5)


def test_seq_linear_skips_weight_gradients_only_inside_a_book_keeping_step():
    """In a DP step's passes (``_booking``) SeqLinear leaves the ordinary weight and bias gradients to the book and
    gives the input's gradient exactly; before and after, it is nn.Linear (plain training and scoring are unchanged)."""
    from dpsynth.models.text import SeqLinear, _Book, _booking

    torch.manual_seed(13)
    layer, ref = SeqLinear(8, 6), nn.Linear(8, 6)
    ref.load_state_dict(layer.state_dict())
    layer._dp_book = book = _Book()
    x = torch.randn(3, 5, 8)
    for inside in (False, True, False):
        layer.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        with _booking(book if inside else None):
            layer(xa).square().sum().backward()
        ref(xb).square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad)
        if inside:
            assert layer.weight.grad is None and layer.bias.grad is None
        else:
            torch.testing.assert_close(layer.weight.grad, ref.weight.grad)
            torch.testing.assert_close(layer.bias.grad, ref.bias.grad)
        assert not book.active
    with pytest.raises(RuntimeError, match="boom"), _booking(book):
        raise RuntimeError("boom")
    assert not book.active


@pytest.mark.parametrize(("T", "branch"), [(None, "2-D input"), (2, "Gram"), (12, "per-sample")])
def test_book_keeping_samplers_agree_with_opacus_per_sample_gradients(T, branch):
    """Each book-keeping sampler against Opacus' per-sample gradients of the same layer, inputs and output gradients:
    the squared per-sample norms and Σ_i c_i g_i for random coefficients — a Linear layer on 2-D input and on sequences
    short enough for the Gram-matrix norm and long enough for the per-sample product (8 → 6: the product is cheaper
    past T = 48/14), an Embedding with ids repeated within a sample. Outside an active step the samplers are Opacus'."""
    from opacus.grad_sample.embedding import compute_embedding_grad_sample
    from opacus.grad_sample.linear import compute_linear_grad_sample

    from dpsynth.models.text import (
        SeqEmbedding,
        SeqLinear,
        _Book,
        _per_sample_cheaper,
        _seq_embedding_grad_sample,
        _seq_linear_grad_sample,
    )

    torch.manual_seed(14)
    B = 5
    c = torch.rand(B)
    linear, embedding = SeqLinear(8, 6), SeqEmbedding(7, 4)
    ids = torch.randint(0, 7, (B, 9))
    assert bool((ids.sort(dim=1).values.diff(dim=1) == 0).any())  # repeated ids
    shape = (B, 8) if T is None else (B, T, 8)
    x, g = torch.randn(shape), torch.randn(*shape[:-1], 6)
    if T is not None:
        assert _per_sample_cheaper(linear, g) == (branch == "per-sample")
    cases = [(linear, _seq_linear_grad_sample, compute_linear_grad_sample, [x], g),
             (embedding, _seq_embedding_grad_sample, compute_embedding_grad_sample, [ids], torch.randn(B, 9, 4))]
    for layer, sampler, opacus_sampler, acts, backprops in cases:
        want = opacus_sampler(layer, acts, backprops)
        layer._dp_book = book = _Book()
        for p, gs in sampler(layer, acts, backprops).items():  # inactive: Opacus' per-sample gradients
            torch.testing.assert_close(gs, want[p])
        book.active = True
        got = sampler(layer, acts, backprops)
        assert set(got) == set(want) and len(book) == len(want)
        for p, gs in want.items():
            assert got[p].shape == (B, 1)
            torch.testing.assert_close(got[p][:, 0], gs.reshape(B, -1).pow(2).sum(1), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(book.clipped_sum(p, c), torch.einsum("i,i...", c, gs), rtol=1e-5, atol=1e-6)
        assert len(book) == 0


def test_only_a_hooks_wiring_with_book_keeping_keeps_a_book(tok, train_df, notes):
    """make_private_text gives the model and its sequence layers a book in hooks mode with book_keeping only; wiring
    the same model again in ghost mode (or without book-keeping) takes the earlier wiring's book away."""
    ids = torch.from_numpy(encoded(tok, train_df.iloc[:64], notes.iloc[:64]).ids)
    m = NoteLM.for_tokenizer(tok, SMALL)
    books = []
    for mode, book in (("hooks", True), ("ghost", True), ("hooks", True), ("hooks", False)):
        m.config = replace(m.config, book_keeping=book)
        wrapped = _private(m, ids, 8, C=1.0, lr=0.1, mode=mode)[0]
        wrapped.remove_hooks()  # Opacus refuses to add its hooks twice
        books.append({id(getattr(x, "_dp_book", None)) for x in m.modules() if x is m or isinstance(x, nn.Linear | nn.Embedding)})
    assert [len(b) for b in books] == [1, 1, 1, 1]
    assert books[1] == books[3] == {id(None)} and books[0] != books[2] and id(None) not in books[0] | books[2]


def test_book_refuses_a_layer_recorded_twice_in_one_pass():
    """Opacus adds the per-sample gradients of a layer called twice in one forward pass; squared norms do not add,
    so the book refuses the second record instead of clipping with a wrong norm."""
    from dpsynth.models.text import _Book

    book, p = _Book(), nn.Parameter(torch.zeros(2))
    book.record(p, lambda c: c)
    with pytest.raises(RuntimeError, match="twice"):
        book.record(p, lambda c: c)


def test_text_config_rejects_an_unknown_grad_sample_mode_and_bad_chunks():
    with pytest.raises(ValueError, match="grad_sample_mode"):
        TextConfig(grad_sample_mode="functorch")
    with pytest.raises(ValueError, match="length_chunks"):
        TextConfig(length_chunks=0)


@pytest.mark.parametrize(("mode", "book"), [("ghost", False), ("hooks", True), ("hooks", False)])
def test_flat_clipping_when_the_path_share_is_zero(tok, train_df, notes, mode, book):
    """cond_clip_share 0: one bound for the whole gradient, as before two-group clipping (a path's share of a
    single patient's update is then whatever its gradient's share is, not C·√s)."""
    torch.manual_seed(8)
    ids = torch.from_numpy(encoded(tok, train_df.iloc[:64], notes.iloc[:64]).ids)
    C = 1e-3
    m = NoteLM.for_tokenizer(tok, replace(SMALL, cond_clip_share=0.0, cond_dropout=0.0, book_keeping=book))
    _, path = _groups(m)
    probe = copy.deepcopy(m)
    probe(ids[:1]).sum().backward()
    g_lm, g_path = (torch.cat([p.grad.reshape(-1) for p in grp]).norm().item() for grp in _groups(probe))
    b_path = [p.detach().clone() for p in path]
    model, opt, crit, _ = _private(m, ids, 1, C=C, lr=1.0, mode=mode)
    text_step(model=model, optimizer=opt, criterion=crit, batch=(ids[:1],), private=True)
    assert _moved(path, b_path) == pytest.approx(C * g_path / math.hypot(g_lm, g_path), rel=1e-3)


@pytest.mark.parametrize("which", ["binary", "asserting"])
def test_row_sparse_path_reads_only_tokens_that_assert_something(tok, train_df, notes, which):
    """cond_sparse: rows only for what a record asserts (from the schema alone): with cond_rows "asserting" (the
    default) every band, category and binary "1", never a missing value or a binary "0"; with "binary" only a
    binary column's "1". Other rows never reach a logit and get no gradient under DP-SGD (σ = 0), while the rows of
    present values learn. Off: every row."""
    rows = tok.path_rows(which)
    assert len(rows) == tok.word_offset - FIRST_COND and 0 < sum(rows) < len(rows)
    for c in tok.columns:
        assert not rows[tok.condition_token(c.name, None) - FIRST_COND]
        first = tok.offsets[tok.columns.index(c)] - FIRST_COND
        own = rows[first : first + len(c.values)]
        if c.kind == "binary":
            assert not rows[tok.condition_token(c.name, 0) - FIRST_COND] and rows[tok.condition_token(c.name, 1) - FIRST_COND]
        else:  # bands and categories: a row each for "asserting", none for "binary"
            assert sum(own) == (len(c.values) - 1 if which == "asserting" else 0)
    with pytest.raises(ValueError, match="cond_rows"):
        replace(SMALL, cond_rows="all")
    torch.manual_seed(9)
    ids = torch.from_numpy(encoded(tok, train_df.iloc[:64], notes.iloc[:64]).ids)
    dense = NoteLM.for_tokenizer(tok, replace(SMALL, cond_dropout=0.0, cond_sparse=False))
    m = NoteLM.for_tokenizer(tok, replace(SMALL, cond_dropout=0.0, cond_rows=which))
    assert SMALL.cond_sparse and SMALL.cond_rows == "asserting" and tok.path_rows() == tok.path_rows("asserting")
    assert dense.cond_keep is None and m.cond_keep.tolist() == rows
    with torch.no_grad():
        for x in (m, dense):
            x.cond_out.weight.normal_(0, 0.5)
        uncond = torch.as_tensor([tok.unconditional()])
        assert not m.cond_offsets(uncond).any() and dense.cond_offsets(uncond).abs().min() > 0
        cond = m._cond(ids)
        off = m.cond_offsets(cond)
        keep = torch.as_tensor(rows)[cond - FIRST_COND]
        torch.testing.assert_close(off[keep], m.cond_out.weight[(cond - FIRST_COND)[keep]])
        assert not off[~keep].any()
    before = m.cond_out.weight.detach().clone()
    model, opt, crit, _ = _private(m, ids, 16, C=1.0, lr=0.1, mode="ghost")
    text_step(model=model, optimizer=opt, criterion=crit, batch=(ids[:16],), private=True)
    moved = (m.cond_out.weight.detach() - before).abs().sum(1) > 0
    used = torch.zeros(len(rows), dtype=torch.bool)
    used[(m._cond(ids[:16]) - FIRST_COND).unique()] = True
    assert not moved[~torch.as_tensor(rows)].any()
    assert torch.equal(moved, used & torch.as_tensor(rows))


def test_opacus_refuses_tied_embeddings_under_ghost_clipping(tok, train_df, notes):
    """Why the output layer is untied: a parameter used by two layers fails ghost clipping."""
    m = NoteLM.for_tokenizer(tok, SMALL)
    m.head.weight = m.tok.weight
    ids = torch.from_numpy(encoded(tok, train_df.iloc[:64], notes.iloc[:64]).ids)
    model, opt, crit, _ = _private(m, ids, 16, C=1.0, lr=0.1, mode="ghost")
    with pytest.raises(NotImplementedError, match="tying"):
        text_step(model=model, optimizer=opt, criterion=crit, batch=(ids[:16],), private=True)


def test_epoch_callbacks_empty_batches_and_real_noise(tok, train_df, notes):
    ids = torch.from_numpy(encoded(tok, train_df.iloc[:256], notes.iloc[:256]).ids)
    m = NoteLM.for_tokenizer(tok, SMALL)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=32)
    model, opt, crit, dl = make_private_text(model=m, optimizer=torch.optim.Adam(m.parameters(), lr=1e-3), loader=loader,
                                             noise_multiplier=1.0, max_grad_norm=1.0,
                                             noise_generator=torch.Generator().manual_seed(0))
    assert dl.sample_rate == pytest.approx(1 / 8)
    steps = []
    losses = text_epoch(model=model, optimizer=opt, criterion=crit, loader=dl, private=True,
                        may_step=lambda: len(steps) < 5, stepped=lambda: steps.append(1))
    assert len(losses) == len(steps) == 5 and all(math.isfinite(x) for x in losses)
    before = flat(m).clone()
    assert math.isnan(text_step(model=model, optimizer=opt, criterion=crit, batch=(ids[:0],), private=True))
    assert not torch.equal(before, flat(m))  # the empty batch still got its noise


def test_finished_notes_leave_the_batch_without_changing_any_note(tok, train_df, monkeypatch):
    import dpsynth.models.text as text_mod

    torch.manual_seed(7)
    m = NoteLM.for_tokenizer(tok, SMALL)
    with torch.no_grad():  # a random model whose notes end at many different lengths
        for p in m.parameters():
            p.normal_(0, 0.3)
        m.head.bias[EOS] += 3.5
    rows = train_df.iloc[:24]
    held = []  # rows each block step runs on
    step = text_mod.Block.step
    monkeypatch.setattr(text_mod.Block, "step", lambda self, x, cache, t0: held.append(x.shape[0]) or step(self, x, cache, t0))
    kw = {"temperature": 0.9, "top_p": 0.9, "guidance": 2.0, "repetition": 0.5, "max_new": 40, "batch": 16}
    ids, rows_held = {}, {}
    for compact in (True, False):
        held.clear()
        ids[compact] = text_mod.sample_note_ids(m, tok, rows, generator=torch.Generator().manual_seed(2),
                                                compact=compact, **kw)
        rows_held[compact] = list(held)
    assert torch.equal(ids[True], ids[False])  # same draws per note: the same notes
    lengths = (ids[True][:, tok.prefix_len :] == EOS).float().argmax(dim=1).tolist()
    assert len(set(lengths)) > 5
    # both streams (guidance) of each finished note left the batch; without compaction every row runs to the end
    assert set(rows_held[False]) == {32, 16} and min(rows_held[True]) < 16 and sum(rows_held[True]) < 0.8 * sum(
        rows_held[False])
    assert all(r % 2 == 0 for r in rows_held[True])


def test_sampling_with_cache_equals_greedy_decoding_without_cache(tok, train_df):
    torch.manual_seed(5)
    m = NoteLM.for_tokenizer(tok, SMALL)
    with torch.no_grad():  # a random model that does not emit EOS at once
        m.head.bias.normal_(0, 1.0)
    rows = train_df.iloc[:3]
    got = sample_notes(m, tok, rows, temperature=0.0, max_new=20)
    cond = torch.as_tensor(tok.encode_condition(rows))
    seq = torch.cat([torch.full((3, 1), BOS), cond, torch.full((3, 1), SEP)], dim=1)
    allowed = torch.full((tok.vocab_size,), float("-inf"))
    allowed[:256] = 0
    allowed[EOS] = 0
    with torch.no_grad():
        for _ in range(20):
            nxt = (m.logits(seq)[:, -1] + allowed).argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert got == [tok.decode(r) for r in seq.tolist()]
    a = sample_notes(m, tok, rows, generator=torch.Generator().manual_seed(1), top_p=0.9, max_new=30)
    b = sample_notes(m, tok, rows, generator=torch.Generator().manual_seed(1), top_p=0.9, max_new=30)
    assert a == b and len(a) == 3 and all(len(x) <= 30 for x in a)  # ≤ 30 bytes, each at most one character


def test_repetition_penalty_lowers_a_word_piece_by_lambda_per_earlier_use(tok, train_df):
    """TextConfig.repetition λ: at each step a word piece's logit is lowered by λ × the number of times the note
    already holds it; bytes and EOS are never penalised. A model whose logits are a fixed bias spells it out; a
    random model matches a reference greedy decoder without cache."""
    wtok = NoteTokenizer(tok.columns, max_len=96, words=[" alpha", " beta"])
    alpha, beta = wtok.word_ids[" alpha"], wtok.word_ids[" beta"]
    m = NoteLM.for_tokenizer(wtok, SMALL)
    rows = train_df.iloc[:2]
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.head.bias[alpha], m.head.bias[beta], m.head.bias[ord("x")], m.head.bias[EOS] = 10.0, 7.0, 7.5, 4.0
    greedy = {lam: sample_notes(m, wtok, rows, temperature=0.0, max_new=6, repetition=lam)[0] for lam in (0.0, 1.0, 2.0)}
    assert greedy == {0.0: " alpha" * 6, 1.0: " alpha" * 3 + "xxx", 2.0: " alpha alpha" + "xxxx"}
    assert TextConfig().repetition > 0 and sample_notes(m, wtok, rows, temperature=0.0, max_new=6)[0] == greedy[
        TextConfig().repetition]  # None: the model's TextConfig.repetition
    torch.manual_seed(6)
    r = NoteLM.for_tokenizer(wtok, SMALL)
    with torch.no_grad():  # a random model that likes the two word pieces
        r.head.bias.normal_(0, 1.0)
        r.head.bias[[alpha, beta]] += 3.0
    lam = 1.5
    cond = torch.as_tensor(wtok.encode_condition(rows))
    seq = torch.cat([torch.full((2, 1), BOS), cond, torch.full((2, 1), SEP)], dim=1)
    allowed = torch.full((wtok.vocab_size,), float("-inf"))
    allowed[wtok.generable()] = 0
    with torch.no_grad():
        for _ in range(16):
            note = seq[:, wtok.prefix_len :]
            seen = torch.stack([(note == w).sum(1) for w in range(wtok.vocab_size)], dim=1).float()
            seen[:, : wtok.word_offset] = 0  # bytes, specials and condition tokens: no penalty
            nxt = (r.logits(seq)[:, -1] - lam * seen + allowed).argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    got = sample_notes(r, wtok, rows, temperature=0.0, max_new=16, repetition=lam)
    ids = seq[:, wtok.prefix_len :].tolist()
    assert got == [wtok.decode(x) for x in ids]  # decode stops at the first EOS, as sampling does
    assert got != sample_notes(r, wtok, rows, temperature=0.0, max_new=16, repetition=0.0)


def test_guided_sampling_follows_u_plus_w_times_c_minus_u(tok, train_df):
    """Classifier-free guidance: greedy guided decoding (cache, both streams in one batch) equals a reference
    without cache that takes argmax(u + w (c − u)) of the conditional and the all-missing prefix's logits among
    the tokens that pass the plausibility constraint (p_c ≥ α · max p_c)."""

    torch.manual_seed(6)
    m = NoteLM.for_tokenizer(tok, SMALL)
    with torch.no_grad():  # a random model whose condition moves the logits, so u and c differ
        for p in m.parameters():
            p.normal_(0, 0.5)
    rows = train_df.iloc[:3]
    w, alpha = 2.5, m.config.plausibility
    assert alpha > 0
    allowed = torch.full((tok.vocab_size,), float("-inf"))
    allowed[tok.generable()] = 0

    def prefix(cond):
        return torch.cat([torch.full((3, 1), BOS), cond, torch.full((3, 1), SEP)], dim=1)

    def reference(w, alpha=alpha):  # token ids (decoded text can hide differences: invalid bytes all become U+FFFD)
        c_seq = prefix(torch.as_tensor(tok.encode_condition(rows)))
        u_seq = prefix(torch.as_tensor(tok.unconditional()).expand(3, -1))
        with torch.no_grad():
            for _ in range(12):
                c, u = m.logits(c_seq)[:, -1], m.logits(u_seq)[:, -1]
                p = torch.softmax(c + allowed, dim=-1)  # plausibility: p_c ≥ α · max p_c among generable tokens
                plausible = p >= alpha * p.max(dim=-1, keepdim=True).values if w != 1 else p >= 0  # guided only
                nxt = (u + w * (c - u) + allowed).masked_fill(~plausible, float("-inf")).argmax(-1)
                c_seq, u_seq = (torch.cat([q, nxt[:, None]], dim=1) for q in (c_seq, u_seq))
        return c_seq.tolist()

    guided, unguided = reference(w), reference(1.0)
    assert guided != unguided  # guidance changes the notes of this model
    assert sample_notes(m, tok, rows, temperature=0.0, max_new=12, guidance=w) == [tok.decode(r) for r in guided]
    assert sample_notes(m, tok, rows, temperature=0.0, max_new=12) == [tok.decode(r) for r in unguided]
    strict, unconstrained = reference(5.0, alpha=0.5), reference(5.0, alpha=0.0)
    assert strict != unconstrained  # the constraint binds for this model (0 switches it off)
    for a, ref in ((0.5, strict), (0.0, unconstrained)):
        assert sample_notes(m, tok, rows, temperature=0.0, max_new=12, guidance=5.0, plausibility=a) == [
            tok.decode(r) for r in ref]
    # the chain's sampler (generate, the coordinator's candidate release) defaults to the model's TextConfig.guidance
    from dpsynth.generate import add_notes, clean_note

    m.config = replace(m.config, guidance=w)
    df = rows.copy()
    add_notes(df, "note", m, tok, temperature=0.7, top_p=0.9, seed=3)
    ref = sample_notes(m, tok, rows, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(3), guidance=w)
    assert df["note"].tolist() == [clean_note(x) for x in ref]
    assert ref != sample_notes(m, tok, rows, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(3))


def test_condition_to_vocabulary_path_adds_gated_offsets_of_the_record_s_own_condition_tokens(tok, train_df, notes):
    """logits = head(h) + Σ_k gate_k(h) · E[c_k]: with E = 0 the model is the same transformer without the path;
    an offset in the row of one condition token moves that token's logit only in the records that have it, by the
    gate of its column."""
    torch.manual_seed(8)
    assert SMALL.cond_vocab
    m = NoteLM.for_tokenizer(tok, replace(SMALL, cond_dropout=0.0))
    plain = NoteLM.for_tokenizer(tok, replace(SMALL, cond_dropout=0.0, cond_vocab=False))
    assert m.cond_out.weight.shape == (tok.word_offset - FIRST_COND, tok.vocab_size) and plain.cond_out is None
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("cond_")})
    ids = torch.from_numpy(encoded(tok, train_df.iloc[:40], notes.iloc[:40]).ids)
    with torch.no_grad():
        assert not m.cond_out.weight.any()  # starts as the plain transformer
        torch.testing.assert_close(m.logits(ids), plain.logits(ids))
        col = [c.name for c in tok.columns].index("diabetes")
        yes = tok.condition_token("diabetes", 1)
        target = tok.word_ids[" DM"] if " DM" in tok.word_ids else ord("D")
        m.cond_out.weight[yes - FIRST_COND, target] = 5.0
        diff = m.logits(ids) - plain.logits(ids)
        has = ids[:, 1 + col] == yes
        assert 0 < int(has.sum()) < len(ids)
        gate = m.cond_gate(m.hidden(ids))[..., col]
        torch.testing.assert_close(diff[has][..., target], 5.0 * gate[has])
        assert not diff[~has].any() and not diff[has][..., :target].any()


def test_public_prior_raises_the_words_that_name_a_present_condition_and_nothing_else(schema):
    """TextConfig.cond_prior: the path row of a present binary condition starts at b on the word pieces that
    name it (the schema column's name and description words, case-insensitive), every other entry at 0; the
    words come from the schema alone, and a tokenizer saved without them (before the prior existed) has none."""
    from dpsynth.data.demo import demo_schema_with_notes
    from dpsynth.models.text import condition_terms

    tok = NoteTokenizer.from_schema(demo_schema_with_notes(), max_len=96)  # with the demo's public vocabulary
    assert condition_terms(schema["heart_failure"]) == ["heart", "failure"]
    assert condition_terms(schema["htn"]) == ["htn", "hypertension"]  # description "hypertension"
    assert "recorded" not in condition_terms(schema["nafld"])  # "NAFLD diagnosis ever recorded": stop words
    pairs = tok.prior_pieces()
    hf = tok.condition_token("heart_failure", 1) - FIRST_COND
    named = {tok.token_name(w) for r, w in pairs if r == hf}
    assert {" heart", " failure"} <= named and all(w.strip().lower() in {"heart", "failure"} for w in named)
    yes_rows = {tok.condition_token(c.name, 1) - FIRST_COND for c in tok.columns if c.kind == "binary"}
    assert {r for r, _ in pairs} <= yes_rows  # never a "0", missing, band or category row
    torch.manual_seed(0)
    m = NoteLM.for_tokenizer(tok, replace(SMALL, cond_prior=1.5, cond_prior_bands=False))
    expected = torch.zeros_like(m.cond_out.weight)
    for r, w in pairs:
        expected[r, w] = 1.5
    assert torch.equal(m.cond_out.weight.detach(), expected) and len(pairs) > 10
    assert not NoteLM.for_tokenizer(tok, replace(SMALL, cond_prior=0.0)).cond_out.weight.any()  # 0: no prior
    old = tok.to_json()
    for c in old["columns"]:
        c.pop("terms")
    assert NoteTokenizer.from_json(old).prior_pieces() == []
    with pytest.raises(ValueError, match="cond_prior"):
        replace(SMALL, cond_prior=-1.0)


def test_band_prior_raises_the_whole_numbers_inside_a_closed_band_only():
    """TextConfig.cond_prior_bands: the row of a closed value band [a, b) also starts at the prior on the
    whole-number word pieces a ≤ n < b; open bands ("<30", ">=80"), whose public bound is one-sided, get none."""
    from dpsynth.data.demo import demo_schema_with_notes

    tok = NoteTokenizer.from_schema(demo_schema_with_notes(), max_len=96)
    plain, banded = set(tok.prior_pieces()), set(tok.prior_pieces(bands=True))
    assert plain < banded
    age = next(c for c in tok.columns if c.name == "age")

    def numbers(value, label):  # the whole numbers raised on the row of the age band holding ``value``
        assert age.values[age.index_of(value)] == label
        row = tok.condition_token("age", value) - FIRST_COND
        return {int(tok.token_name(w)) for r, w in banded - plain if r == row}

    assert numbers(55, "50-60") == set(range(50, 60)) and numbers(35, "30-40") == set(range(30, 40))
    assert numbers(20, "<30") == set() and numbers(85, ">=80") == set()
    band_rows = {tok.condition_token(c.name, v) - FIRST_COND for c in tok.columns if c.kind == "continuous"
                 for v in [(a + b) / 2 for a, b in zip(c.edges, c.edges[1:])]}
    assert {r for r, _ in banded - plain} <= band_rows and len(banded - plain) > 100
    m = NoteLM.for_tokenizer(tok, replace(SMALL, cond_prior=1.5, cond_prior_bands=True))
    assert all(m.cond_out.weight[r, w] == 1.5 for r, w in banded)
    assert int((m.cond_out.weight != 0).sum()) == len(banded)
    assert TextConfig().cond_prior_bands  # the default since the chained fit's five seeds
    off = replace(SMALL, cond_prior=1.5, cond_prior_bands=False)
    assert int((NoteLM.for_tokenizer(tok, off).cond_out.weight != 0).sum()) == len(plain)


def test_condition_dropout_replaces_the_whole_condition_in_training_only(tok, train_df, notes):
    """cond_dropout p: in training, each example's condition becomes the all-missing one with probability p
    (p = 1: always, p = 0: never); in evaluation (scoring, audits) never."""

    ids = torch.as_tensor(tok.encode(train_df.iloc[:8], notes[:8]).ids)
    uncond = ids.clone()
    uncond[:, 1 : tok.prefix_len - 1] = torch.as_tensor(tok.unconditional())
    torch.manual_seed(7)
    m = NoteLM.for_tokenizer(tok, replace(SMALL, cond_dropout=1.0))
    with torch.no_grad():
        for p in m.parameters():  # a random model whose condition moves the loss
            p.normal_(0, 0.5)
        m.eval()
        plain, dropped = m(ids), m(uncond)
        assert not torch.allclose(plain, dropped)
        m.train()
        torch.testing.assert_close(m(ids), dropped)
        m.config = replace(m.config, cond_dropout=0.0)
        torch.testing.assert_close(m(ids), plain)
        m.config = replace(m.config, cond_dropout=0.5)
        torch.manual_seed(0)
        half = m(ids)
        assert 0 < int(torch.isclose(half, dropped).sum()) < 8  # some examples dropped, not all


def _sex(note: str) -> int:
    if re.search(r"(?i)\b(male|man|gentleman)\b|\d+M\b", note):
        return 1
    if re.search(r"(?i)\b(female|woman|lady)\b|\d+F\b", note):
        return 0
    return -1


def test_nucleus_sampling_draws_from_the_renormalised_nucleus():
    """Statistical: 40,000 draws (seeded) match the renormalised top-p set within 4 standard errors; nothing
    outside the nucleus is ever drawn; top_p = 1 samples the whole distribution; temperature 0 is argmax."""
    from dpsynth.models.text import _top_p_sample

    p = torch.tensor([0.04, 0.4, 0.1, 0.25, 0.06, 0.15])
    logits = p.log().expand(40_000, -1)
    g = torch.Generator().manual_seed(0)
    for top_p, expect in [(0.75, {1: 0.4, 3: 0.25, 5: 0.15}), (1.0, dict(enumerate(p.tolist())))]:
        draws = _top_p_sample(logits, 1.0, top_p, g)
        total = sum(expect.values())
        counts = torch.bincount(draws, minlength=6).double() / len(draws)
        for t in range(6):
            q = expect.get(t, 0.0) / total
            se = max((q * (1 - q) / len(draws)) ** 0.5, 1e-12)
            assert abs(float(counts[t]) - q) <= 4 * se, (top_p, t, float(counts[t]), q)
    assert bool((_top_p_sample(logits[:5], 0.0, 0.9, g) == 1).all())


def test_nucleus_sampling_among_the_top_candidates_equals_a_full_sort():
    """Rows whose nucleus lies within the TOP_P_CANDIDATES most likely tokens, rows whose nucleus reaches past them
    (fully sorted), in one batch: the same tokens as a full sort of every row with the same seeded uniforms."""
    import dpsynth.models.text as text_mod

    torch.manual_seed(12)
    V = 1000
    peaked = torch.randn(300, V) * 6.0  # nucleus of a few tokens
    flat = torch.randn(300, V) * 0.1  # nucleus of most of the vocabulary
    logits = torch.cat([peaked, flat])[torch.randperm(600)]

    def reference(lg, top_p, g):
        probs = torch.softmax(lg, dim=-1)
        sp, idx = probs.sort(dim=-1, descending=True)
        keep = (sp.cumsum(dim=-1) - sp) < top_p
        return idx.gather(-1, text_mod._inverse_cdf(sp * keep, g).unsqueeze(-1)).squeeze(-1)

    k = text_mod.TOP_P_CANDIDATES
    probs = torch.softmax(logits, dim=-1).topk(k, dim=-1).values.sum(dim=-1)
    assert (probs >= 0.9).sum() > 100 and (probs < 0.9).sum() > 100  # both kinds of row are there
    for seed in range(3):
        got = text_mod._top_p_sample(logits, 1.0, 0.9, torch.Generator().manual_seed(seed))
        want = reference(logits, 0.9, torch.Generator().manual_seed(seed))
        assert torch.equal(got, want)


def test_tiny_model_learns_notes_and_follows_the_condition(schema, train_df, notes):
    """Non-private, tiny and short (≈ 40 s): the loss falls and the sampled sex follows the condition. (400 steps,
    measured for seeds 0 and 1: holdout NLL 0.60 / 0.62 nats per token against the 1.2 asserted, sex differences
    0.59–0.65 against 0.25; 600 steps cost 20 s more and only widened those margins.)"""
    tok = NoteTokenizer.from_schema(schema, max_len=88, columns=["age", "male", "htn", "diabetes"])
    ids = torch.from_numpy(encoded(tok, train_df.iloc[:3000], notes).ids)
    torch.manual_seed(0)
    m = NoteLM.for_tokenizer(tok, TextConfig(d_model=48, heads=4, layers=2, max_len=88))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    holdout = ids[-200:]
    start = float(m(holdout).mean().detach())
    losses = [text_step(model=m, optimizer=opt, criterion=None, batch=ids[torch.randint(2800, (32,), generator=g)],
                        private=False) for _ in range(400)]
    end = float(m(holdout).mean().detach())
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:5]) and end < 0.5 * start and end < 1.2
    cond = pd.DataFrame({"age": [45] * 200, "male": [1] * 100 + [0] * 100, "htn": [0, 1] * 100, "diabetes": [0] * 200})
    out = sample_notes(m, tok, cond, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(1))
    s = np.array([_sex(o) for o in out])
    assert (s[:100] == 1).mean() - (s[100:] == 1).mean() > 0.25
    assert (s[100:] == 0).mean() - (s[:100] == 0).mean() > 0.25


# ------------------------------------------------------------------------------------------------
# memorisation audits
# ------------------------------------------------------------------------------------------------

def test_canaries_are_planted_with_their_counts(notes):
    can = make_canaries(3, counts=(1, 4), seed=0)
    assert [c.count for c in can] == [1, 1, 1, 4, 4, 4, 0, 0, 0]
    assert len({c.secret for c in can}) == 9 and all(re.fullmatch(r"\d{8}", c.secret) for c in can)
    assert all(c.text == CANARY_FORMAT.format(secret=c.secret) for c in can)
    out = insert_canaries(notes, can, seed=1)
    for c in can:
        assert len(c.hosts) == c.count and (out == c.text).sum() == c.count
    assert (out != notes).sum() == 15 and out.index.equals(notes.index)
    with pytest.raises(ValueError):
        insert_canaries(notes.iloc[:10], can)


def test_exposure_of_a_memorising_scorer_is_high_and_of_an_unrelated_one_is_chance():
    can = make_canaries(20, counts=(1, 16), seed=2)
    memorised = {c.secret for c in can if c.count == 16}

    def memorising(texts, canary):  # assigns its training canaries a far higher likelihood
        return np.array([10.0 if any(s in t for s in memorised) else -float(sum(map(ord, t)) % 97) / 97 for t in texts])

    rng = np.random.default_rng(0)

    def unrelated(texts, canary):
        return rng.normal(size=len(texts))

    n = 500
    hi = exposure(memorising, can, n_candidates=n, seed=3)
    assert hi["per_count"]["16"]["value"] == pytest.approx(math.log2(n + 1), abs=1e-9)
    assert hi["per_count"]["16"]["extrapolated"] > 20
    assert hi["per_count"]["1"]["value"] < 3 and hi["per_count"]["0"]["value"] < 3
    lo = exposure(unrelated, can, n_candidates=n, seed=3)
    chance = chance_exposure(n)
    assert chance == pytest.approx(1 / math.log(2), abs=0.02)  # → 1/ln 2 as n grows
    for k in ("0", "1", "16"):
        e = lo["per_count"][k]
        assert e["baseline"] == pytest.approx(chance) and e["ci_low"] <= chance + 0.3 and abs(e["value"] - chance) < 0.8
    assert lo["per_count"]["16"]["control"] == pytest.approx(lo["per_count"]["0"]["value"])


def test_exposure_lower_bound_holds_its_level_at_chance_and_pools_runs():
    """The gate's lower bound (also bench/notes.py's over pooled runs): canaries the model did not memorise (rank
    uniform among the candidates) exceed chance rarely, for 4 canaries and for 20; a real excess over 20 pooled
    canaries is found where 4 per run can miss it. Each canary's exposure is reported for pooling."""
    n, chance = 1000, chance_exposure(1000)
    rng = np.random.default_rng(5)

    def null(k):  # the rank exposure −log2((1 + #higher) / (n + 1)) of k unmemorised canaries
        return -np.log2((1 + rng.integers(0, n + 1, k)) / (n + 1))

    for k in (4, 20):
        flagged = np.mean([exposure_lower_bound(null(k)) > chance for _ in range(20000)])
        assert flagged < 0.02, (k, flagged)  # 0.9 % measured for both
    # about a bit of memorisation (each canary's rank 2^-1 of a chance canary's): pooled over 5 runs it is found in
    # almost every draw, 4 canaries at a time mostly not
    pooled = [exposure_lower_bound(null(20) + 1.0) > chance for _ in range(2000)]
    single = [exposure_lower_bound(null(4) + 1.0) > chance for _ in range(2000)]
    assert np.mean(pooled) > 0.8 and np.mean(single) < 0.3
    can = make_canaries(4, counts=(16,), seed=2)
    res = exposure(lambda texts, c: np.arange(len(texts), 0, -1.0), can, n_candidates=n, seed=3)["per_count"]
    assert res["16"]["exposures"] == pytest.approx([math.log2(n + 1)] * 4)
    assert res["0"]["value"] == pytest.approx(np.mean(res["0"]["exposures"]))
    assert res["16"]["lower_bound"] == pytest.approx(exposure_lower_bound(res["16"]["exposures"]))


def test_ngram_overlap_flags_copies_and_not_fresh_notes(train_df):
    df = train_df.iloc[:3000]
    all_notes = render_notes(df, seed=7).tolist()
    train, holdout, fresh = all_notes[:1000], all_notes[1000:2000], all_notes[2000:3000]
    copied = ngram_overlap(train, train, holdout)
    assert copied["excess"]["value"] > 0.5 and copied["excess"]["ci_low"] > 0.4
    assert copied["train_only"]["value"] > 0.5 and copied["train_only"]["baseline"] < 0.2
    ok = ngram_overlap(fresh, train, holdout)
    assert abs(ok["excess"]["value"]) < 0.05 and ok["excess"]["ci_low"] < 0.02
    assert ok["unit"] == "whitespace word" and ok["n"] == 8


def test_identifier_replay_in_notes():
    def name(i):
        return f"{chr(97 + i % 26)}{chr(97 + i // 26)}"

    train = [f"Mr Fake{name(i)} MRN 9{i:07d} seen" for i in range(50)] + ["plain note"] * 50
    holdout = [f"Mrs Other{name(i)} MRN 7{i:07d} seen" for i in range(50)]
    leaky = ["copied: " + t for t in train[:5]] + ["nothing here"]
    r = note_identifier_replay(leaky, train, holdout)
    assert r["replayed_values"] == 10 and r["control"] == 0 and r["identifiers_in_train_notes"] == 100
    clean = note_identifier_replay(["BMI 31, HDL 52, wt 88kg"], train, holdout)
    assert clean["replayed_values"] == 0
