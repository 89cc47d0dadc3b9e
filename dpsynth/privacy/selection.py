"""DP selection among generator checkpoints (the tutorial ranks several runs/checkpoints by use-case profiles).

Looking at real data to pick a checkpoint is a mechanism and is paid for: the real data's one-way marginals
(every modelled column binned: categories / 10 equal-width bins over the public bounds / a missing bin)
and the pairwise co-occurrence counts of binary columns are released once with Gaussian noise. One patient
changes one bin per column and at most C(b, 2) pair counts by 1, so the L2 sensitivity is
Δ = sqrt(d + C(b, 2)); noise N(0, (σΔ)²) is the Gaussian mechanism with noise multiplier σ, recorded in
the site accountant as (σ, q = 1, 1 step). Everything after that (scoring each checkpoint's samples against
the noisy statistics, picking the best) is post-processing.

Profiles (weights on the two normalised errors):
  A  statistical fidelity first: 0.7 · one-way marginal error + 0.3 · pairwise error
  B  association first (co-occurrence, incl. with the label): 0.3 · marginal + 0.7 · pairwise
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from ..schema import Schema, canonical_category

MECHANISM = "gaussian-marginals:checkpoint-selection"
PROFILES = {"A": (0.7, 0.3), "B": (0.3, 0.7)}
N_BINS = 10


def _column_bins(df: pd.DataFrame, schema: Schema) -> list[tuple[str, np.ndarray]]:
    """Per modelled column: one-hot bin membership (n × k), each row in exactly one bin."""
    out = []
    for col in schema.modelled:
        s = df[col.name]
        miss = s.isna().to_numpy()
        if col.kind == "categorical":
            cats = [canonical_category(c) for c in col.categories]
            codes = s.map(lambda v: -1 if pd.isna(v) else cats.index(canonical_category(v))).to_numpy()
            k = len(cats)
        elif col.kind == "binary":
            v = pd.to_numeric(s, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
            codes = np.where(np.isnan(v), -1, v).astype(int)
            k = 2
        else:
            v = pd.to_numeric(s, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
            lo, hi = float(col.lower), float(col.upper)
            scaled = (np.clip(np.nan_to_num(v, nan=lo), lo, hi) - lo) / (hi - lo)
            codes = np.minimum((scaled * N_BINS).astype(int), N_BINS - 1)
            k = N_BINS
        onehot = np.zeros((len(df), k + 1), dtype=np.float64)
        codes = np.where(miss, k, codes)
        onehot[np.arange(len(df)), codes] = 1.0
        out.append((col.name, onehot))
    return out


def _binary_ones(df: pd.DataFrame, schema: Schema) -> np.ndarray:
    cols = [c.name for c in schema.of_kind("binary")]
    if not cols:
        return np.zeros((len(df), 0))
    return np.nan_to_num(df[cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float), nan=0.0)


def statistics(df: pd.DataFrame, schema: Schema) -> tuple[np.ndarray, np.ndarray]:
    """(concatenated one-way bin counts, upper-triangle binary co-occurrence counts)."""
    one = np.concatenate([oh.sum(axis=0) for _, oh in _column_bins(df, schema)])
    b = _binary_ones(df, schema)
    co = b.T @ b
    iu = np.triu_indices(b.shape[1], k=1)
    return one, co[iu]


def sensitivity(schema: Schema) -> float:
    d = len(schema.modelled)
    b = len(schema.of_kind("binary"))
    return math.sqrt(d + b * (b - 1) / 2)


def noisy_statistics(df, schema, noise_multiplier: float, generator: torch.Generator | None = None):
    one, co = statistics(df, schema)
    std = noise_multiplier * sensitivity(schema)
    noise = torch.randn(len(one) + len(co), generator=generator, dtype=torch.float64).numpy() * std
    return one + noise[: len(one)], co + noise[len(one):]


def _split_one_way(schema: Schema, vec: np.ndarray) -> list[np.ndarray]:
    sizes = []
    for col in schema.modelled:
        k = len(col.categories) if col.kind == "categorical" else 2 if col.kind == "binary" else N_BINS
        sizes.append(k + 1)
    return np.split(vec, np.cumsum(sizes)[:-1])


def errors(real_one, real_co, syn_df, schema) -> tuple[float, float]:
    """(mean total-variation distance of one-way marginals, mean abs. error of pairwise frequencies)."""
    s_one, s_co = statistics(syn_df, schema)
    tv = []
    n_est = []
    for r, s in zip(_split_one_way(schema, real_one), _split_one_way(schema, s_one)):
        r = np.clip(r, 0, None)
        n_est.append(max(r.sum(), 1.0))
        tv.append(0.5 * np.abs(r / max(r.sum(), 1e-9) - s / max(s.sum(), 1e-9)).sum())
    n_real = float(np.median(n_est))
    pair = float(np.mean(np.abs(np.clip(real_co, 0, None) / n_real - s_co / len(syn_df)))) if len(real_co) else 0.0
    return float(np.mean(tv)), pair


def select_checkpoint(df, schema, encoder, generators: dict, *, latent_dim: int, noise_multiplier: float,
                      profile: str = "A", generator: torch.Generator | None = None, n_samples: int | None = None):
    from ..models.wgan import sample_encoded

    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    wd, wp = PROFILES[profile]
    real_one, real_co = noisy_statistics(df, schema, noise_multiplier, generator)
    n = n_samples or min(len(df), 20000)
    rng = np.random.default_rng(0)
    raw = {}
    for ep, g in generators.items():
        x = sample_encoded(g, encoder, n, latent_dim).numpy()
        raw[ep] = errors(real_one, real_co, encoder.inverse(x, rng=rng), schema)
    dmin = min(v[0] for v in raw.values()) or 1e-12
    pmin = min(v[1] for v in raw.values()) or 1e-12
    scores = {ep: wd * d / dmin + wp * p / pmin for ep, (d, p) in raw.items()}
    best = min(scores, key=scores.get)
    report = {
        "method": f"DP selection (Gaussian noisy marginals, profile {profile}: {wd}·marginal + {wp}·pairwise)",
        "mechanism": MECHANISM,
        "noise_multiplier": noise_multiplier,
        "sensitivity": sensitivity(schema),
        "candidates": {str(ep): {"marginal_tv": raw[ep][0], "pairwise_err": raw[ep][1], "score": scores[ep]} for ep in raw},
        "selected_epoch": best,
    }
    return best, report
