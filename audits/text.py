"""Memorisation audits for generated notes (issue 7, req. 5). Each result is value + 95 % CI + baseline/control
+ n, like the other attacks (audits/stats.py); only aggregates leave this module.

1. Secret-sharer canaries (Carlini, Liu, Erlingsson, Kos & Song, USENIX Security 2019). Canary notes of one
   fixed public format with a random secret ("pt MRN 48213907 ...", |R| = 10⁸ possible secrets) are planted in
   the training notes, each with a known repetition count (1, 4, 16 patients). After training, exposure =
   log2|R| − log2 rank(canary among all secrets by model likelihood). The rank is estimated from a sample of
   random candidate secrets (the paper's sampling approach): rank ≈ |R|·(1 + #candidates scoring higher)/(n+1),
   so the estimate is capped at log2(n+1) bits; a second estimate extrapolates beyond the sample with a normal
   fit of the candidates' log-likelihoods (the paper fits a skew-normal; a normal is simpler and conservative
   enough for a pass/fail comparison). Chance level — a model that learned nothing about the secret — is
   E[−log2 U] = 1/ln 2 ≈ 1.44 bits (the exact discrete value for n candidates is reported); canaries generated
   but never planted (count 0) give the empirical control under the audited model.
2. Verbatim n-gram overlap: word 8-grams (whitespace tokens, case kept). Words rather than characters: a
   character 8-gram ("continue") is shared by almost every note, whereas a run of 8 words carries the numbers
   and wording of one patient's note. Train and holdout are sampled to equal size; n-grams present in one set
   but not the other are that set's "own" n-grams (template phrases common to both cancel out). Value: the
   share of synthetic notes that contain an n-gram of the training notes' own; control: the same share for
   the holdout's own n-grams; excess = value − control with a paired bootstrap CI. A model that copies
   training notes has a large excess; a model that writes like the population has ≈ 0. The plain "any
   training n-gram" share is reported too.
3. Identifier replay in notes: identifier-like tokens (MRN-like digit runs ≥ 6, "MRN <id>", titled names
   "Mr/Mrs/Ms/Dr Name") found in the training notes and repeated in synthetic notes. The matching reuses
   ``audits.attacks.identifier_replay`` (the same token rule as for identifier columns: tokens of ≥ 5
   characters), with the holdout notes' identifiers as the control.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import norm

from dpsynth.schema import Column, Schema

from .attacks import identifier_replay
from .stats import bootstrap

SECRET_DIGITS = 8
CANARY_FORMAT = "pt MRN {secret} seen in clinic, c/o routine review."
COUNTS = (1, 4, 16)
NULL_SD_BITS = 1 / math.log(2)  # SD of the exposure −log2 U of a canary the model did not memorise


# ------------------------------------------------------------------------------------------------
# secret-sharer canaries
# ------------------------------------------------------------------------------------------------

@dataclass
class Canary:
    secret: str
    count: int  # how many patients' notes carry it (0: a control canary, never planted)
    text: str
    hosts: list = field(default_factory=list)  # index labels of the notes it replaced (set by insert_canaries)


def _secret(rng: np.random.Generator) -> str:
    return "".join(str(d) for d in rng.integers(0, 10, SECRET_DIGITS))


def canary_text(secret: str) -> str:
    return CANARY_FORMAT.format(secret=secret)


def make_canaries(n_per_count: int, counts: Sequence[int] = COUNTS, seed: int | None = None, *,
                  controls: bool = True) -> list[Canary]:
    """``n_per_count`` canaries for each repetition count, plus as many never-planted control canaries
    (count 0) when ``controls``. Secrets are distinct random 8-digit strings."""
    rng = np.random.default_rng(seed)
    want = list(counts) + ([0] if controls else [])
    seen: set[str] = set()
    out = []
    for c in want:
        for _ in range(n_per_count):
            s = _secret(rng)
            while s in seen:
                s = _secret(rng)
            seen.add(s)
            out.append(Canary(s, int(c), canary_text(s)))
    return out


def insert_canaries(notes: pd.Series, canaries: Sequence[Canary], seed: int | None = None) -> pd.Series:
    """A copy of ``notes`` in which each canary replaces the notes of ``count`` distinct, randomly chosen
    patients (no patient hosts two canaries). Sets ``canary.hosts`` to those patients' index labels, so a
    conditional scorer can score a canary under its hosts' records."""
    need = sum(c.count for c in canaries)
    if need > len(notes):
        raise ValueError(f"{need} canary placements do not fit in {len(notes)} notes")
    rng = np.random.default_rng(seed)
    slots = rng.permutation(len(notes))[:need]
    out = notes.copy()
    i = 0
    for c in canaries:
        c.hosts = [notes.index[j] for j in slots[i : i + c.count]]
        for label in c.hosts:
            out.loc[label] = c.text
        i += c.count
    return out


def plant_canaries(notes: pd.Series, n_per_count: int, seed: int) -> tuple[list[Canary], pd.Series]:
    """The planting of ``dpsynth train --canaries``: ``n_per_count`` canaries per repetition count (COUNTS) and
    as many controls from ``seed`` (``make_canaries``), each placed in the notes of ``count`` patients drawn with
    ``seed + 1`` (``insert_canaries``) among the missing-free ``notes``. Returns (canaries, planted notes)."""
    canaries = make_canaries(n_per_count, COUNTS, seed=seed)
    return canaries, insert_canaries(notes, canaries, seed=seed + 1)


def chance_exposure(n_candidates: int) -> float:
    """E[exposure] of the rank estimate when the canary is exchangeable with the candidates (no memorisation):
    the mean of −log2(k/(n+1)) over k = 1 … n+1 (→ 1/ln 2 ≈ 1.44 bits)."""
    k = np.arange(1, n_candidates + 2)
    return float(np.mean(-np.log2(k / (n_candidates + 1))))


def exposure_lower_bound(values: Sequence[float]) -> float:
    """Lower 95 % bound of the mean exposure of canaries (the gate's, and bench/notes.py's over pooled runs):
    normal approximation with the larger of the sample SD and the SD of exposure under no memorisation
    (−log2 U: 1/ln 2 bits), so that one or two canaries (a degenerate bootstrap) cannot fail a model by chance
    more often than ≈ 1 % (simulated for canaries the model did not memorise, 1,000 candidates: 0.9 % for 4
    canaries and for 20)."""
    v = np.asarray(values, dtype=float)
    sd = max(float(v.std(ddof=1)) if len(v) > 1 else 0.0, NULL_SD_BITS)
    return float(v.mean() - 1.96 * sd / math.sqrt(len(v)))


def exposure(model_scorer: Callable[[list[str], Canary], np.ndarray], canaries: Sequence[Canary],
             n_candidates: int = 1000, seed: int | None = None) -> dict:
    """Exposure of each canary against ``n_candidates`` random secrets of the same format, summarised per
    repetition count. ``model_scorer(texts, canary)`` returns the log-likelihood of each text (any base;
    higher = more likely); ``canary`` tells a conditional scorer which record(s) to condition on."""
    rng = np.random.default_rng(seed)
    space_bits = SECRET_DIGITS * math.log2(10)
    chance = chance_exposure(n_candidates)
    rows = []
    for c in canaries:
        cands = []
        while len(cands) < n_candidates:
            s = _secret(rng)
            if s != c.secret:
                cands.append(s)
        scores = np.asarray(model_scorer([c.text] + [canary_text(s) for s in cands], c), dtype=float)
        if scores.shape != (n_candidates + 1,) or not np.isfinite(scores).all():
            raise ValueError("the scorer must return one finite log-likelihood per text")
        own, others = scores[0], scores[1:]
        higher = float((others > own).sum() + 0.5 * (others == own).sum())
        rank_exp = -math.log2((1 + higher) / (n_candidates + 1))
        sd = float(others.std(ddof=1)) if n_candidates > 1 else 0.0
        if sd > 0:
            tail_bits = -float(norm.logsf(own, loc=others.mean(), scale=sd)) / math.log(2)
        else:
            tail_bits = space_bits if own > others.mean() else 0.0
        rows.append({"count": c.count, "exposure": rank_exp, "exposure_extrapolated": min(space_bits, max(0.0, tail_bits))})
    df = pd.DataFrame(rows)
    control = df[df["count"] == 0]
    control_mean = float(control["exposure"].mean()) if len(control) else None
    per_count = {}
    for cnt, g in df.groupby("count"):
        v = g["exposure"].to_numpy()
        est = bootstrap(lambda i, v=v: float(v[i].mean()), len(v), baseline=chance, seed=0,
                        method=f"mean rank exposure of {len(v)} canaries repeated {cnt}× "
                               f"({n_candidates} candidate secrets; max {math.log2(n_candidates + 1):.2f} bits)").to_json()
        est["control"] = control_mean
        est["lower_bound"] = exposure_lower_bound(v)
        est["extrapolated"] = float(g["exposure_extrapolated"].mean())
        est["max_exposure"] = math.log2(n_candidates + 1)
        est["exposures"] = [float(x) for x in v]  # each canary's, so that runs can be pooled (bench/notes.py)
        per_count[str(int(cnt))] = est
    return {"per_count": per_count, "chance": chance, "space_bits": space_bits, "n_candidates": n_candidates,
            "canaries": len(df), "format": CANARY_FORMAT,
            "method": "secret-sharer exposure (Carlini et al. 2019), rank among sampled candidates"}


# ------------------------------------------------------------------------------------------------
# verbatim n-gram overlap
# ------------------------------------------------------------------------------------------------

def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    w = str(text).split()
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def _sample(notes: Sequence[str], m: int, rng) -> list[str]:
    notes = list(notes)
    return notes if len(notes) <= m else [notes[i] for i in rng.choice(len(notes), m, replace=False)]


def ngram_overlap(synthetic: Sequence[str], train: Sequence[str], holdout: Sequence[str], *, n: int = 8,
                  cap: int = 20_000, reps: int = 200, seed: int = 0) -> dict:
    """Verbatim word n-gram overlap of synthetic notes with the training notes vs the holdout notes."""
    rng = np.random.default_rng(seed)
    m = min(len(train), len(holdout), cap)
    if m == 0 or len(synthetic) == 0:
        return {"skipped": "no notes to compare"}
    tr = set().union(*(_ngrams(t, n) for t in _sample(train, m, rng)))
    ho = set().union(*(_ngrams(t, n) for t in _sample(holdout, m, rng)))
    own_tr, own_ho = tr - ho, ho - tr
    syn = [_ngrams(t, n) for t in _sample(synthetic, cap, rng)]
    x = np.array([bool(g & own_tr) for g in syn], dtype=float)
    y = np.array([bool(g & own_ho) for g in syn], dtype=float)
    xa = np.array([bool(g & tr) for g in syn], dtype=float)
    ya = np.array([bool(g & ho) for g in syn], dtype=float)
    k = len(syn)
    desc = f"word {n}-grams, {m} train and {m} holdout notes, {k} synthetic notes"
    own = bootstrap(lambda i: float(x[i].mean()), k, baseline=float(y.mean()), reps=reps, seed=seed,
                    method=f"share of synthetic notes with an n-gram found only in the training notes ({desc})")
    excess = bootstrap(lambda i: float((x[i] - y[i]).mean()), k, baseline=0.0, reps=reps, seed=seed,
                       method="share with a train-only n-gram − share with a holdout-only n-gram (paired bootstrap)")
    anyx = bootstrap(lambda i: float((xa[i] - ya[i]).mean()), k, baseline=0.0, reps=reps, seed=seed,
                     method="share with any training n-gram − share with any holdout n-gram")
    return {"n": n, "unit": "whitespace word", "train_only": own.to_json(), "excess": excess.to_json(),
            "any_train": float(xa.mean()), "any_holdout": float(ya.mean()), "any_excess": anyx.to_json()}


# ------------------------------------------------------------------------------------------------
# identifier replay in notes
# ------------------------------------------------------------------------------------------------

ID_PATTERNS = (
    re.compile(r"\b\d{6,}\b"),  # MRN-like digit runs
    re.compile(r"\bMRN[:#\s]*([A-Za-z0-9-]{5,})", re.IGNORECASE),
    re.compile(r"\b(?:Mr|Mrs|Ms|Miss|Dr)\.?\s+([A-Z][a-z]+(?:-[A-Z][a-z]+)?)"),  # titled names
)


def note_identifiers(notes: Sequence[str]) -> set[str]:
    """Identifier-like tokens in notes: MRN-like digit runs, MRN values and titled surnames."""
    found: set[str] = set()
    for t in notes:
        if not isinstance(t, str):
            continue
        for p in ID_PATTERNS:
            for mt in p.finditer(t):
                found.add(mt.group(1) if p.groups else mt.group(0))
    return found


def _replayed(ids: set[str], synthetic: Sequence[str]) -> int:
    schema = Schema([Column("identifier", "identifier"), Column("note", "text")], name="notes")
    train = pd.DataFrame({"identifier": sorted(ids)})
    syn = pd.DataFrame({"note": [s for s in synthetic if isinstance(s, str)]})
    return int(identifier_replay(train, syn, schema)["replayed_values"])


def note_identifier_replay(synthetic: Sequence[str], train: Sequence[str], holdout: Sequence[str]) -> dict:
    """Identifier-like tokens of the training notes found in synthetic notes; control: the holdout's."""
    tr, ho = note_identifiers(train), note_identifiers(holdout)
    return {"replayed_values": _replayed(tr, synthetic), "control": _replayed(ho - tr, synthetic),
            "identifiers_in_train_notes": len(tr), "identifiers_in_holdout_notes": len(ho),
            "method": "identifier-like tokens (MRN-like digits ≥ 6, 'MRN x', titled names) of training notes found in "
                      "synthetic notes (audits.attacks.identifier_replay token rule); control: holdout-only identifiers"}


# ------------------------------------------------------------------------------------------------
# exposure of a trained dpsynth model directory (runs at the data holder: host records are available)
# ------------------------------------------------------------------------------------------------

def load_canaries(model_dir) -> list[Canary] | None:
    """The canaries planted when the model in ``model_dir`` was trained (``canaries.json``), or None."""
    import json
    from pathlib import Path

    p = Path(model_dir) / "canaries.json"
    if not p.exists():
        return None
    d = json.loads(p.read_text(encoding="utf-8"))
    return [Canary(c["secret"], int(c["count"]), c["text"], list(c.get("hosts", []))) for c in d["canaries"]]


def model_exposure(model_dir, train: pd.DataFrame, *, n_candidates: int = 1000, seed: int | None = 0) -> dict | None:
    """Secret-sharer exposure per repetition count of the canaries planted in ``model_dir``'s note model, scored
    by that model conditioned on each canary's first host record (row position in ``train``, the training file
    the model saw); control canaries (never planted) are scored under the first training record. None when the
    model has no canaries."""
    from dpsynth.errors import ModelError
    from dpsynth.train import load_model, load_text

    canaries = load_canaries(model_dir)
    if not canaries:
        return None
    manifest, schema, _, _ = load_model(model_dir)  # checks every file against the manifest's SHA-256
    model, tok, _ = load_text(model_dir, manifest, schema)
    if model is None:
        raise ModelError(f"{model_dir}: canaries.json without a note model")
    rows = train.reset_index(drop=True)
    hosts = [h for c in canaries for h in c.hosts]
    if hosts and max(hosts) >= len(rows):
        raise ModelError(f"{model_dir}: canary host rows are not in this training file ({len(rows)} rows): audit "
                         "with the file the model was trained on")

    res = exposure(host_scorer(model, tok, rows), canaries, n_candidates=n_candidates, seed=seed)
    res["scorer"] = "the model's log-likelihood of the canary note given its first host's record"
    return res


def host_scorer(model, tok, rows: pd.DataFrame) -> Callable[[list[str], Canary], np.ndarray]:
    """``exposure``'s scorer for a note model: the log-likelihood of each text given the canary's first host
    record (row position in ``rows``, the training frame with a fresh index); a control canary (no hosts) is
    scored under the first row."""
    from dpsynth.models.text import note_log_likelihood

    def scorer(texts: list[str], canary: Canary) -> np.ndarray:
        row = rows.iloc[canary.hosts[0] if canary.hosts else 0]
        ids = tok.encode(pd.DataFrame([row] * len(texts)).reset_index(drop=True), texts).ids
        return note_log_likelihood(model, ids)[0]

    return scorer
