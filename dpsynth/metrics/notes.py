"""Evaluation metrics for synthetic clinical notes (issue 7, requirement 4).

A synthetic patient is generated record → vitals → note, so every synthetic note sits in the same row as the
record it was prompted with. The metrics below ask four questions:

  * ``condition_consistency`` — does the note say what its own record says? A TF-IDF + logistic-regression
    classifier is trained on REAL notes to read each binary condition off the text, then applied to the
    synthetic notes and compared with the synthetic rows' prompted values. The same classifier on held-out
    real notes is the ceiling (what a perfect note generator would score).
  * ``value_consistency`` — the same question for the record's numbers: each continuous column split at its real
    median, read off the note by a real-trained classifier, compared with the prompted record's value.
  * ``note_tstr`` — can a model trained on synthetic notes read conditions off real notes (train on
    synthetic, test on real) as well as one trained on real notes (train on real, test on real)?
  * ``diversity`` — distinct-n and self-BLEU-4 of a list of notes (mode collapse, copying).
  * ``two_sample_test`` — can a classifier tell real from synthetic notes (AUC 0.5: indistinguishable)?
  * ``holdout_perplexity`` — the note model's per-token perplexity on notes given their records; train vs
    holdout gives the generalisation gap.

``note_metrics`` runs them all. Every function is deterministic given ``seed`` and returns plain JSON
(floats / ints / str / None / lists / dicts); no note text is ever returned — only aggregate figures — so the
results can go into reports. Empty or missing notes are counted and excluded; a frame with fewer than
``MIN_NOTES`` usable notes is an error naming that frame.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from ..errors import DataError, SchemaError
from ..schema import Schema
from .auc import rank_auc

__all__ = [
    "MIN_CLASS",
    "MIN_NOTES",
    "condition_consistency",
    "diversity",
    "holdout_perplexity",
    "note_metrics",
    "note_tstr",
    "two_sample_test",
    "value_consistency",
]

MIN_NOTES = 20  # fewer usable notes in a frame: an error naming the frame
MIN_CLASS = 20  # a condition needs at least this many positives and negatives among the real training notes
# a condition whose real-on-real AUC is below this is not *stated* in the notes (at most predictable from conditions
# that are, e.g. an outcome a baseline note never mentions: NAFLD `status` 0.79) and is skipped. Stated conditions
# score ≥ 0.997 on the rendered demo notes; 0.9 leaves room for real notes that state a condition less reliably.
MIN_EXPRESSED_AUC = 0.9
MAX_NOTES = 4000  # notes per frame used by the classifiers (seeded subsample): bounds the cost on big cohorts
_WORD = re.compile(r"\w+", re.UNICODE)


def _one_thread(fn):
    """Run ``fn`` with BLAS limited to one thread: scikit-learn's L-BFGS on these small sparse problems is 20×
    slower with OpenBLAS threads competing for 2 busy cores (measured: 3.2 s vs 0.13 s per fit); same result."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)
    return wrapper


def _j(x) -> float | None:
    """A plain JSON float (numpy scalars converted, NaN/inf → None)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# ------------------------------------------------------------------------------------------------
# input handling
# ------------------------------------------------------------------------------------------------

def text_column_of(schema: Schema, note_col: str | None = None) -> str:
    """The note column: ``note_col`` (which must be a ``text`` column of the schema) or the schema's one
    ``text`` column. A schema without one is a SchemaError."""
    texts = [c.name for c in schema.of_kind("text")]
    if note_col is not None:
        if note_col not in texts:
            raise SchemaError(f"note metrics: column {note_col!r} is not a column of kind 'text' in the schema "
                              f"(text columns: {texts or 'none'})")
        return note_col
    if not texts:
        raise SchemaError("note metrics need a column of kind 'text' in the schema (it has none): declare the note "
                          "column, e.g. {\"name\": \"note\", \"kind\": \"text\", \"nullable\": true}")
    if len(texts) > 1:
        raise SchemaError(f"the schema has {len(texts)} text columns {texts}: pass note_col to pick one")
    return texts[0]


def _usable(values: Iterable) -> np.ndarray:
    """True where a value is a non-empty (after stripping) string."""
    return np.array([isinstance(v, str) and bool(v.strip()) for v in values], dtype=bool)


def _frame_notes(frame: pd.DataFrame, col: str, name: str) -> tuple[pd.DataFrame, int]:
    """The rows of ``frame`` with a usable note, and how many were excluded (empty or missing)."""
    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"{name}: expected a DataFrame, got {type(frame).__name__}")
    if col not in frame.columns:
        raise DataError(f"{name} has no note column {col!r}")
    ok = _usable(frame[col].tolist())
    if int(ok.sum()) < MIN_NOTES:
        raise DataError(f"{name} has {int(ok.sum())} usable notes in column {col!r} (empty or missing: "
                        f"{int((~ok).sum())}); note metrics need at least {MIN_NOTES}")
    return frame.loc[ok], int((~ok).sum())


def _list_notes(notes: Iterable, name: str) -> tuple[list[str], int]:
    vals = notes.tolist() if isinstance(notes, pd.Series) else list(notes)
    ok = _usable(vals)
    if int(ok.sum()) < MIN_NOTES:
        raise DataError(f"{name} has {int(ok.sum())} usable notes (empty or missing: {int((~ok).sum())}); "
                        f"note metrics need at least {MIN_NOTES}")
    return [v for v, k in zip(vals, ok) if k], int((~ok).sum())


def _cap(frame: pd.DataFrame, max_notes: int | None, rng: np.random.Generator) -> pd.DataFrame:
    if max_notes is None or len(frame) <= max_notes:
        return frame
    return frame.iloc[np.sort(rng.choice(len(frame), max_notes, replace=False))]


def _labels(frame: pd.DataFrame, cond: str) -> np.ndarray:
    """0/1 labels of a binary column (missing or absent → 0, as the record metrics and the note renderer do)."""
    if cond not in frame.columns:
        return np.zeros(len(frame), dtype=int)
    return (pd.to_numeric(frame[cond], errors="coerce").fillna(0).to_numpy(dtype=float) >= 0.5).astype(int)


def _conditions(schema: Schema, conditions: Sequence[str] | None) -> list[str]:
    binary = [c.name for c in schema.of_kind("binary")]
    if conditions is None:
        return binary
    bad = [c for c in conditions if c not in binary]
    if bad:
        raise SchemaError(f"note metrics: {bad} are not binary columns of the schema (binary columns: {binary})")
    return list(conditions)


# ------------------------------------------------------------------------------------------------
# the classifier: TF-IDF (word 1–2 grams + character 2–4 grams) + logistic regression
# ------------------------------------------------------------------------------------------------

def _vectorizer(analyzers=None):
    """``analyzers``: one callable per part (word, char) that returns a document's tokens — for documents analysed
    once and fitted many times (``two_sample_test``'s folds); the same features as the built-in analysers."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import FeatureUnion

    specs = [("word", {"ngram_range": (1, 2), "token_pattern": r"(?u)\b\w+\b"}),
             ("char", {"analyzer": "char_wb", "ngram_range": (2, 4)})]
    parts = []
    for k, (name, kw) in enumerate(specs):
        if analyzers is not None:
            kw = {"analyzer": analyzers[k], "token_pattern": None}
        parts.append((name, TfidfVectorizer(lowercase=True, min_df=2, sublinear_tf=True, dtype=np.float32, **kw)))
    return FeatureUnion(parts)


# TF-IDF matrices shared by the metrics of one ``note_metrics`` call (``_shared_vectors``): condition and value
# consistency fit the same vectoriser on the same real notes and transform the same holdout and synthetic notes,
# and note_tstr's real side is that vectoriser again; None outside such a call (nothing is kept between calls)
_VECTORS: dict | None = None


@contextlib.contextmanager
def _shared_vectors():
    global _VECTORS
    outer = _VECTORS
    _VECTORS = {} if outer is None else outer
    try:
        yield
    finally:
        _VECTORS = outer


def _digest(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


def _tfidf(fit_docs: list[str], *others: list[str]) -> list:
    """``_vectorizer()`` fitted on ``fit_docs``: [its matrix, then each of ``others`` transformed]; inside
    ``_shared_vectors`` a fit or transform already done on the same documents is reused (same matrices)."""
    key = _digest(fit_docs)
    memo = _VECTORS if _VECTORS is not None else {}
    if key not in memo:
        vec = _vectorizer()
        memo[key] = (vec, vec.fit_transform(fit_docs))
    vec, x = memo[key]
    out = [x]
    for docs in others:
        k = (key, _digest(docs))
        if k not in memo:
            memo[k] = vec.transform(docs)
        out.append(memo[k])
    return out


def _logreg(seed: int):
    from sklearn.linear_model import LogisticRegression

    # class_weight balanced: the 0.5 threshold then targets balanced accuracy, not the majority class
    return LogisticRegression(C=4.0, class_weight="balanced", solver="lbfgs", max_iter=2000, random_state=seed)


def _scores(y: np.ndarray, p: np.ndarray) -> dict:
    """accuracy and balanced accuracy at threshold 0.5, AUC (None with one class), counts."""
    from sklearn.metrics import roc_auc_score

    pred = (p >= 0.5).astype(int)
    pos, neg = y == 1, y == 0
    tpr = float(pred[pos].mean()) if pos.any() else None
    tnr = float(1 - pred[neg].mean()) if neg.any() else None
    bal = (tpr + tnr) / 2 if tpr is not None and tnr is not None else (tpr if tpr is not None else tnr)
    auc = float(roc_auc_score(y, p)) if pos.any() and neg.any() else None
    return {"accuracy": _j((pred == y).mean()), "balanced_accuracy": _j(bal), "auc": _j(auc),
            "n": len(y), "n_positive": int(pos.sum())}


def _mean(vals) -> float | None:
    vals = [v for v in vals if v is not None]
    return _j(np.mean(vals)) if vals else None


# ------------------------------------------------------------------------------------------------
# 1. condition consistency
# ------------------------------------------------------------------------------------------------

def _consistency(real_train: pd.DataFrame, synthetic: pd.DataFrame, col: str, targets: dict, *, seed: int,
                 real_holdout: pd.DataFrame | None, max_notes: int | None, description: str, per_key: str) -> dict:
    """The machinery of ``condition_consistency`` and ``value_consistency``: one real-trained TF-IDF classifier per
    target (name → function of a frame giving 0/1 labels, or −1 where the target is unknown: such rows are left
    out of training and scoring), scored on the synthetic notes against their prompted labels and on held-out real
    notes (the ceiling). The per-target scores go under ``per_key``, skipped targets with the reason under
    ``skipped``."""
    rng = np.random.default_rng(seed)
    real, ex_r = _frame_notes(real_train, col, "real_train")
    syn, ex_s = _frame_notes(synthetic, col, "synthetic")
    excluded = {"real_train": ex_r, "synthetic": ex_s}
    real, syn = _cap(real, max_notes, rng), _cap(syn, max_notes, rng)
    if real_holdout is not None:
        test, ex_h = _frame_notes(real_holdout, col, "real_holdout")
        excluded["real_holdout"] = ex_h
        test = _cap(test, max_notes, rng)
        train, ceiling_on = real, "real_holdout"
    else:
        perm = rng.permutation(len(real))
        k = max(1, len(real) // 4)
        test, train = real.iloc[np.sort(perm[:k])], real.iloc[np.sort(perm[k:])]
        ceiling_on = "25 % of real_train held out (the classifier is trained on the other 75 %)"
    x_tr, x_te, x_syn = _tfidf(train[col].tolist(), test[col].tolist(), syn[col].tolist())

    per, skipped = {}, {}
    for c, labels in targets.items():
        y = labels(train)
        known = y >= 0
        npos, nneg = int((y == 1).sum()), int((y == 0).sum())
        if npos < MIN_CLASS or nneg < MIN_CLASS:
            skipped[c] = f"{npos} positives and {nneg} negatives in the real training notes (need ≥ {MIN_CLASS} each)"
            continue
        clf = _logreg(seed).fit(x_tr[known], y[known])
        y_te, y_syn = labels(test), labels(syn)
        ceil = _scores(y_te[y_te >= 0], clf.predict_proba(x_te[y_te >= 0])[:, 1])
        if ceil["auc"] is None or ceil["auc"] < MIN_EXPRESSED_AUC:
            skipped[c] = (f"not expressed in the real notes: held-out real AUC "
                          f"{'n/a (one class)' if ceil['auc'] is None else format(ceil['auc'], '.3f')} "
                          f"< {MIN_EXPRESSED_AUC}")
            continue
        if not (y_syn >= 0).any():
            skipped[c] = "unknown in every synthetic record"
            continue
        sc = _scores(y_syn[y_syn >= 0], clf.predict_proba(x_syn[y_syn >= 0])[:, 1])
        sc["ceiling"] = ceil
        per[c] = sc

    def macro(key, src):
        return _mean([src(e)[key] for e in per.values()])

    ceiling = {"consistency": macro("balanced_accuracy", lambda e: e["ceiling"]),
               "accuracy_macro": macro("accuracy", lambda e: e["ceiling"]),
               "auc_macro": macro("auc", lambda e: e["ceiling"]), "on": ceiling_on, "n": len(test)}
    return {
        "description": description,
        "note_column": col,
        "consistency": macro("balanced_accuracy", lambda e: e),
        "accuracy_macro": macro("accuracy", lambda e: e),
        "auc_macro": macro("auc", lambda e: e),
        "ceiling": ceiling,
        per_key: per,
        "skipped": skipped,
        "n": {"real_train": len(train), "synthetic": len(syn)},
        "excluded_notes": excluded,
    }


@_one_thread
def condition_consistency(real_train: pd.DataFrame, synthetic: pd.DataFrame, schema: Schema, *,
                          note_col: str | None = None, conditions: Sequence[str] | None = None, seed: int = 0,
                          real_holdout: pd.DataFrame | None = None, max_notes: int | None = MAX_NOTES) -> dict:
    """Does each synthetic note say what its own (prompted) record says?

    For each binary condition column (default: every binary column of the schema) with at least ``MIN_CLASS``
    positives and negatives among the real training notes, a TF-IDF (word 1–2 grams + character 2–4 grams)
    logistic-regression classifier is trained on REAL notes → the condition and applied to the SYNTHETIC notes;
    its predictions are compared with the synthetic rows' prompted values. The ceiling is the same
    classifier's score on held-out real notes (``real_holdout`` when given, else a seeded 25 % split of
    ``real_train`` that the classifier is then not trained on). Conditions the real notes do not express
    (ceiling AUC < ``MIN_EXPRESSED_AUC``, e.g. an outcome a baseline note never mentions) are skipped, as are
    conditions with too few positives or negatives; each skipped condition is listed with its reason.

    Per condition: accuracy and balanced accuracy at threshold 0.5, AUC and the number of positives, for the
    synthetic notes and for the ceiling. Headline ``consistency`` = macro-mean balanced accuracy over the
    evaluated conditions (plain accuracy is inflated by rare conditions: "never present" scores 0.95 on a
    condition with 5 % prevalence; it is reported as ``accuracy_macro``). 0.5 = the notes carry no
    information about their records, 1 = perfectly consistent; compare with ``ceiling.consistency``.
    """
    col = text_column_of(schema, note_col)
    targets = {c: (lambda f, c=c: _labels(f, c)) for c in _conditions(schema, conditions)}
    return _consistency(real_train, synthetic, col, targets, seed=seed, real_holdout=real_holdout, max_notes=max_notes,
                        per_key="conditions",
                        description="TF-IDF (word 1-2 + char 2-4 grams) logistic regression trained on real notes -> "
                                    "each binary condition, applied to synthetic notes and compared with their prompted "
                                    "records; consistency = macro balanced accuracy (0.5: no information, 1: consistent)")


@_one_thread
def value_consistency(real_train: pd.DataFrame, synthetic: pd.DataFrame, schema: Schema, *,
                      note_col: str | None = None, seed: int = 0, real_holdout: pd.DataFrame | None = None,
                      max_notes: int | None = MAX_NOTES) -> dict:
    """Do the synthetic notes' numbers follow their records? ``condition_consistency`` for the continuous columns:
    each is split at its median among the real training notes' records (above vs not), a real-trained TF-IDF
    classifier reads that from the note, and its reading of each synthetic note is compared with the prompted
    record's value. Records missing the value are left out. A column the real notes do not state (ceiling AUC <
    ``MIN_EXPRESSED_AUC``: e.g. a follow-up time a baseline note cannot know) is skipped with its reason. Headline
    ``consistency`` = macro balanced accuracy (0.5: the note's numbers say nothing of the record's)."""
    col = text_column_of(schema, note_col)
    real, _ = _frame_notes(real_train, col, "real_train")
    targets = {}
    for c in schema.of_kind("continuous"):
        vals = pd.to_numeric(real[c.name], errors="coerce") if c.name in real.columns else pd.Series(dtype=float)
        if vals.notna().sum() == 0:
            continue
        cut = float(vals.median())

        def labels(f, name=c.name, cut=cut):
            v = pd.to_numeric(f[name], errors="coerce").to_numpy(dtype=float) if name in f.columns else np.full(len(f), np.nan)
            return np.where(np.isnan(v), -1, (v > cut).astype(int))

        targets[c.name] = labels
    return _consistency(real_train, synthetic, col, targets, seed=seed, real_holdout=real_holdout, max_notes=max_notes,
                        per_key="columns",
                        description="TF-IDF (word 1-2 + char 2-4 grams) logistic regression trained on real notes -> "
                                    "each continuous value above its real median, applied to synthetic notes and "
                                    "compared with their prompted records; consistency = macro balanced accuracy (0.5: "
                                    "no information, 1: consistent)")


# ------------------------------------------------------------------------------------------------
# 2. note-level TSTR
# ------------------------------------------------------------------------------------------------

@_one_thread
def note_tstr(real_train: pd.DataFrame, synthetic: pd.DataFrame, real_holdout: pd.DataFrame, schema: Schema, *,
              note_col: str | None = None, conditions: Sequence[str] | None = None, seed: int = 0,
              max_notes: int | None = MAX_NOTES) -> dict:
    """Train on synthetic notes, test on real (TSTR) vs train on real, test on real (TRTR), per condition.

    The same TF-IDF + logistic-regression classifier (vectoriser fitted on its own training notes) learns each
    binary condition from the synthetic notes + their prompted records (TSTR) or from the real training notes
    (TRTR) and is scored by AUC on the real holdout notes. Conditions with fewer than ``MIN_CLASS`` positives or
    negatives in the real training notes, one class in the holdout, or TRTR AUC < ``MIN_EXPRESSED_AUC`` (not
    expressed in real notes) are skipped with the reason. A condition with a single class among the synthetic
    rows cannot be learnt from them: its TSTR AUC is scored as chance (0.5) and listed in ``one_class_synthetic``.
    ``ratio`` = macro TSTR AUC / macro TRTR AUC over the evaluated conditions (1: synthetic notes teach as well
    as real ones).
    """
    col = text_column_of(schema, note_col)
    conds = _conditions(schema, conditions)
    rng = np.random.default_rng(seed)
    real, ex_r = _frame_notes(real_train, col, "real_train")
    syn, ex_s = _frame_notes(synthetic, col, "synthetic")
    hold, ex_h = _frame_notes(real_holdout, col, "real_holdout")
    real, syn, hold = (_cap(f, max_notes, rng) for f in (real, syn, hold))
    xr, xh_r = _tfidf(real[col].tolist(), hold[col].tolist())
    xs, xh_s = _tfidf(syn[col].tolist(), hold[col].tolist())
    from sklearn.metrics import roc_auc_score

    per, skipped, one_class = {}, {}, []
    for c in conds:
        yr, ys, yh = _labels(real, c), _labels(syn, c), _labels(hold, c)
        npos, nneg = int(yr.sum()), int(len(yr) - yr.sum())
        if npos < MIN_CLASS or nneg < MIN_CLASS:
            skipped[c] = f"{npos} positives and {nneg} negatives in the real training notes (need ≥ {MIN_CLASS} each)"
            continue
        if yh.min() == yh.max():
            skipped[c] = "one class in the real holdout: AUC undefined"
            continue
        trtr = float(roc_auc_score(yh, _logreg(seed).fit(xr, yr).predict_proba(xh_r)[:, 1]))
        if trtr < MIN_EXPRESSED_AUC:
            skipped[c] = f"not expressed in the real notes: TRTR AUC {trtr:.3f} < {MIN_EXPRESSED_AUC}"
            continue
        if ys.min() == ys.max():
            tstr = 0.5
            one_class.append(c)
        else:
            tstr = float(roc_auc_score(yh, _logreg(seed).fit(xs, ys).predict_proba(xh_s)[:, 1]))
        per[c] = {"tstr_auc": tstr, "trtr_auc": trtr, "n_positive_synthetic": int(ys.sum()),
                  "n_positive_holdout": int(yh.sum())}
    t = _mean([e["tstr_auc"] for e in per.values()])
    r = _mean([e["trtr_auc"] for e in per.values()])
    return {
        "description": "AUC on real holdout notes of TF-IDF logistic regression per binary condition: trained on "
                       "synthetic notes (TSTR) vs on real notes (TRTR); ratio = macro TSTR / macro TRTR",
        "note_column": col,
        "tstr_auc_macro": t,
        "trtr_auc_macro": r,
        "ratio": _j(t / r) if t is not None and r else None,
        "conditions": per,
        "skipped": skipped,
        "one_class_synthetic": one_class,
        "n": {"real_train": len(real), "synthetic": len(syn), "real_holdout": len(hold)},
        "excluded_notes": {"real_train": ex_r, "synthetic": ex_s, "real_holdout": ex_h},
    }


# ------------------------------------------------------------------------------------------------
# 3. diversity: distinct-n and self-BLEU
# ------------------------------------------------------------------------------------------------

def _tokens(note: str) -> list[str]:
    return _WORD.findall(note.lower())


def _ngram_ids(toks: list[list[str]], n: int) -> tuple[list[np.ndarray], int]:
    """Per note, the integer ids of its word n-grams (ids shared across notes), and the vocabulary size."""
    vocab: dict[tuple, int] = {}
    out = []
    for t in toks:
        out.append(np.array([vocab.setdefault(tuple(t[i:i + n]), len(vocab)) for i in range(len(t) - n + 1)],
                            dtype=np.int64))
    return out, len(vocab)


def _self_bleu(toks: list[list[str]], max_n: int = 4, eps: float = 0.1) -> tuple[float, list[float]]:
    """Mean sentence BLEU-``max_n`` of each note against all the others as references (uniform weights,
    clipped counts against the per-n-gram maximum over the references, brevity penalty against the closest
    reference length, shorter on ties; a zero match count becomes ``eps`` — Chen & Cherry's smoothing 1, as
    NLTK's ``method1``). Vectorised: for each n-gram the largest and second-largest counts over all notes give
    the maximum over "all notes but this one" without a loop over pairs."""
    S = len(toks)
    L = np.array([len(t) for t in toks], dtype=float)
    logp = np.zeros(S)
    for n in range(1, max_n + 1):
        ids, V = _ngram_ids(toks, n)
        rows = np.concatenate([np.full(len(a), i, dtype=np.int64) for i, a in enumerate(ids)])
        cols = np.concatenate(ids) if rows.size else np.zeros(0, dtype=np.int64)
        key = rows * max(V, 1) + cols
        uk, cnt = np.unique(key, return_counts=True)  # (note, n-gram) pairs with their counts
        r, g = uk // max(V, 1), uk % max(V, 1)
        total = np.bincount(r, weights=cnt, minlength=S)
        # per n-gram: the largest count (and its note) and the second largest
        order = np.lexsort((-cnt, g))
        g_s, c_s, r_s = g[order], cnt[order], r[order]
        first = np.r_[True, g_s[1:] != g_s[:-1]] if len(g_s) else np.zeros(0, dtype=bool)
        max1 = np.zeros(V)
        arg1 = np.full(V, -1, dtype=np.int64)
        max2 = np.zeros(V)
        max1[g_s[first]] = c_s[first]
        arg1[g_s[first]] = r_s[first]
        second = np.r_[False, first[:-1] & ~first[1:]] if len(g_s) else np.zeros(0, dtype=bool)
        max2[g_s[second]] = c_s[second]
        other = np.where(arg1[g] == r, max2[g], max1[g])  # max count of this n-gram over the other notes
        clipped = np.bincount(r, weights=np.minimum(cnt, other), minlength=S)
        num = np.where(clipped > 0, clipped, eps)
        logp += np.log(num / np.maximum(total, 1.0)) / max_n
    # brevity penalty: closest other length (shorter on ties)
    d = np.abs(L[None, :] - L[:, None]) * 2 + (L[None, :] > L[:, None])
    np.fill_diagonal(d, np.inf)
    ref = L[np.argmin(d, axis=1)]
    bp = np.where(L >= ref, 1.0, np.exp(1 - ref / np.maximum(L, 1.0)))
    bleu = bp * np.exp(logp)
    return float(bleu.mean()), bleu.tolist()


def diversity(notes: Iterable, *, n_max: int = 3, sample: int = 500, seed: int = 0, name: str = "notes") -> dict:
    """distinct-1..``n_max`` and self-BLEU-4 of a list of notes (word tokens: lower-cased ``\\w+`` runs).

    distinct-n = unique word n-grams / total word n-grams over the sampled notes (1: no n-gram repeated; near
    0: the same phrases over and over). Both figures depend on how many notes are pooled, so a seeded sample of
    ``sample`` notes is used — compare two lists only at the same sample size (``note_metrics`` does).
    self-BLEU-4 = mean smoothed BLEU-4 of each sampled note against all other sampled notes as references
    (1: every note is a copy of the others; low: varied notes). Empty / missing notes are excluded and counted.
    """
    vals, excluded = _list_notes(notes, name)
    rng = np.random.default_rng(seed)
    if len(vals) > sample:
        vals = [vals[i] for i in np.sort(rng.choice(len(vals), sample, replace=False))]
    toks = [_tokens(v) for v in vals]
    distinct = {}
    for n in range(1, n_max + 1):
        grams = Counter(tuple(t[i:i + n]) for t in toks for i in range(len(t) - n + 1))
        total = sum(grams.values())
        distinct[f"distinct_{n}"] = _j(len(grams) / total) if total else None
    sb, _ = _self_bleu(toks)
    return {**distinct, "self_bleu_4": _j(sb), "n": len(vals), "excluded_notes": excluded,
            "mean_words": _j(np.mean([len(t) for t in toks]))}


# ------------------------------------------------------------------------------------------------
# 4. classifier two-sample test
# ------------------------------------------------------------------------------------------------

@_one_thread
def two_sample_test(real: Iterable, synthetic: Iterable, *, seed: int = 0, folds: int = 5,
                    max_notes: int | None = 2000, n_boot: int = 1000) -> dict:
    """Classifier two-sample test: can TF-IDF + logistic regression tell real notes from synthetic ones?

    Both sides are subsampled (seeded) to the same size n = min(len(real), len(synthetic), ``max_notes``), so
    AUC 0.5 = indistinguishable and 1 = perfectly separable. Stratified ``folds``-fold cross-validation (the
    vectoriser is fitted inside each training fold) gives an out-of-fold probability per note; ``auc`` is the
    pooled out-of-fold AUC and ``ci`` its 95 % percentile bootstrap interval (``n_boot`` resamples of the
    notes, seeded). The per-fold AUCs are reported too.
    """
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    r, ex_r = _list_notes(real, "real")
    s, ex_s = _list_notes(synthetic, "synthetic")
    rng = np.random.default_rng(seed)
    n = min(len(r), len(s), max_notes or max(len(r), len(s)))
    r = [r[i] for i in np.sort(rng.choice(len(r), n, replace=False))]
    s = [s[i] for i in np.sort(rng.choice(len(s), n, replace=False))]
    x = np.arange(2 * n)  # documents by index: each note is analysed once, not once per fold
    y = np.r_[np.zeros(n, dtype=int), np.ones(n, dtype=int)]
    tokens = [[analyse(doc) for doc in r + s]
              for analyse in (v.build_analyzer() for _, v in _vectorizer().transformer_list)]
    analyzers = [lambda i, t=t: t[i] for t in tokens]
    p = np.zeros(2 * n)
    fold_aucs = []
    for tr, te in StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y):
        vec = _vectorizer(analyzers)
        clf = _logreg(seed).fit(vec.fit_transform(x[tr].tolist()), y[tr])
        p[te] = clf.predict_proba(vec.transform(x[te].tolist()))[:, 1]
        fold_aucs.append(float(roc_auc_score(y[te], p[te])))
    auc = float(roc_auc_score(y, p))
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, 2 * n, 2 * n)
        if y[i].min() != y[i].max():
            boots.append(rank_auc(p[i][y[i] == 1], p[i][y[i] == 0]))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {
        "description": "TF-IDF logistic regression telling real from synthetic notes, balanced subsample, "
                       f"{folds}-fold cross-validated AUC (0.5: indistinguishable, 1: separable), 95 % bootstrap CI",
        "auc": _j(auc), "ci": [_j(lo), _j(hi)], "ci_method": f"percentile bootstrap of out-of-fold scores, {n_boot} resamples",
        "fold_aucs": fold_aucs, "n": {"real": n, "synthetic": n},
        "excluded_notes": {"real": ex_r, "synthetic": ex_s},
    }


# ------------------------------------------------------------------------------------------------
# 5. perplexity of the note model
# ------------------------------------------------------------------------------------------------

def holdout_perplexity(model, tokenizer, frame: pd.DataFrame, note_col: str, *, name: str = "frame") -> dict:
    """Per-token perplexity of the note model on ``frame``'s notes, each conditioned on its own record:
    exp(−Σ log-likelihood / Σ note tokens), where the note tokens are the note's UTF-8 bytes plus EOS (the
    condition prefix is input only). Also the mean NLL in nats and bits per token. Empty / missing notes are
    excluded and counted; notes longer than the tokenizer's room are truncated (counted) as in training.
    Call it for the training and the holdout notes: the ratio holdout / train is the generalisation gap."""
    import warnings

    from ..models.text import note_log_likelihood

    rows, excluded = _frame_notes(frame, note_col, name)
    with warnings.catch_warnings():  # truncation is counted below
        warnings.simplefilter("ignore")
        enc = tokenizer.encode(rows, rows[note_col].tolist())
    ll, cnt = note_log_likelihood(model, enc.ids[enc.present])
    tokens = float(np.sum(cnt))
    nll = float(-np.sum(ll) / tokens)
    return {"perplexity": _j(math.exp(nll)), "nll_per_token": _j(nll), "bits_per_token": _j(nll / math.log(2)),
            "tokens": int(tokens), "notes": int(enc.present.sum()), "truncated": int(enc.truncated),
            "excluded_notes": excluded}


# ------------------------------------------------------------------------------------------------
# 6. all of the above
# ------------------------------------------------------------------------------------------------

def note_metrics(real_train: pd.DataFrame, real_holdout: pd.DataFrame, synthetic: pd.DataFrame, schema: Schema, *,
                 model=None, tokenizer=None, seed: int = 0, note_col: str | None = None,
                 conditions: Sequence[str] | None = None, diversity_sample: int = 500) -> dict:
    """Every note metric in one dict, with a short ``summary``:

      consistency            macro balanced accuracy of real-trained condition classifiers on the synthetic notes
                             vs their prompted records (0.5 none … 1); ``consistency_ceiling``: the same on real
                             holdout notes
      value_consistency      the same for the continuous columns, each split at its real median (do the notes'
                             numbers follow the record?), with its ceiling ``value_consistency_ceiling``
      tstr_ratio             macro AUC on real holdout notes, trained on synthetic / trained on real notes
      two_sample_auc         real holdout vs synthetic notes, cross-validated (0.5: indistinguishable)
      distinct_2_*           distinct bigram share, synthetic / real training notes (same sample size)
      self_bleu_*            self-BLEU-4, synthetic / real training notes (same sample size; higher: less diverse)
      perplexity_*           the note model's per-token perplexity on real train / holdout notes (only with
                             ``model`` and ``tokenizer``), and their ratio ``perplexity_gap`` (holdout / train)

    ``label`` is the schema's description of the note column (e.g. that these are rendered demo notes).
    """
    col = text_column_of(schema, note_col)
    with _shared_vectors():  # the three fit the same vectoriser on the same real notes: once
        cons = condition_consistency(real_train, synthetic, schema, note_col=col, conditions=conditions, seed=seed,
                                     real_holdout=real_holdout)
        vals = value_consistency(real_train, synthetic, schema, note_col=col, seed=seed, real_holdout=real_holdout)
        ts = note_tstr(real_train, synthetic, real_holdout, schema, note_col=col, conditions=conditions, seed=seed)
    syn_notes = synthetic[col].tolist()
    real_notes = real_train[col].tolist()
    k = min(diversity_sample, int(_usable(syn_notes).sum()), int(_usable(real_notes).sum()))
    div = {"synthetic": diversity(syn_notes, sample=k, seed=seed, name="synthetic"),
           "real": diversity(real_notes, sample=k, seed=seed, name="real_train")}
    two = two_sample_test(real_holdout[col].tolist(), syn_notes, seed=seed)
    out = {
        "note_column": col,
        "label": schema[col].description or None,
        "rows": {"real_train": len(real_train), "real_holdout": len(real_holdout), "synthetic": len(synthetic)},
        "consistency": cons,
        "value_consistency": vals,
        "tstr": ts,
        "diversity": div,
        "two_sample": two,
    }
    summary = {
        "consistency": cons["consistency"],
        "consistency_ceiling": cons["ceiling"]["consistency"],
        "value_consistency": vals["consistency"],
        "value_consistency_ceiling": vals["ceiling"]["consistency"],
        "tstr_ratio": ts["ratio"],
        "two_sample_auc": two["auc"],
        "distinct_2_synthetic": div["synthetic"]["distinct_2"],
        "distinct_2_real": div["real"]["distinct_2"],
        "self_bleu_synthetic": div["synthetic"]["self_bleu_4"],
        "self_bleu_real": div["real"]["self_bleu_4"],
    }
    if model is not None and tokenizer is not None:
        tr = holdout_perplexity(model, tokenizer, real_train, col, name="real_train")
        ho = holdout_perplexity(model, tokenizer, real_holdout, col, name="real_holdout")
        out["perplexity"] = {"train": tr, "holdout": ho}
        summary.update({"perplexity_train": tr["perplexity"], "perplexity_holdout": ho["perplexity"],
                        "perplexity_gap": _j(ho["perplexity"] / tr["perplexity"]) if tr["perplexity"] else None})
    out["summary"] = summary
    return out
