"""DP statistics for building a schema (`dpsynth schema infer --epsilon`).

One Gaussian mechanism releases, for every column, a histogram to which each patient contributes exactly one
count (so the L2 sensitivity over k columns is sqrt(k)); it is recorded as (σ, q = 1, 1 step) in the site
accountant, and ``train`` composes it with everything else inside its --epsilon.

  numeric columns  bins: value == 0, value == 1, and a fixed, data-independent grid of 10 bins per decade
                   on ±[1e-3, 1e7] (plus zero-width guards) — binary if the noisy mass off {0, 1} is below
                   1 %, else continuous with bounds at the bin edges where the noisy CDF crosses 0.5 % and
                   99.5 % (values outside are clipped and counted at training)
  string columns   noisy counts of the observed values, released only above a threshold τ (the Gaussian
                   sparse histogram): a category held by one patient can appear only with probability
                   Φ̄((τ−1)/(σ√k)) per column, which is added to δ (``extra_delta``). No released category
                   → the column is treated as an identifier (never modelled).
Nullability is not learned (it would be a data-dependent bit): every modelled column is nullable in a DP
schema; the generator simply learns a near-zero missing rate where there is none.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from scipy.stats import norm

from .accountant import Mechanism, calibrate_noise

MECHANISM = "gaussian-histogram:schema-inference"
_POS_EDGES = 10.0 ** (np.arange(-30, 71) / 10.0)  # 1e-3 … 1e7, 10 bins per decade
GRID = np.concatenate([-_POS_EDGES[::-1], [0.0], _POS_EDGES])


def _numeric_hist(v: np.ndarray) -> np.ndarray:
    """Counts: [==0, ==1, missing, grid bins (len(GRID)+1 incl. under/overflow)] — one count per row."""
    miss = np.isnan(v)
    is0 = (v == 0) & ~miss
    is1 = (v == 1) & ~miss
    other = ~(miss | is0 | is1)
    idx = np.searchsorted(GRID, v[other], side="right")
    grid_counts = np.bincount(idx, minlength=len(GRID) + 1).astype(float)
    return np.concatenate([[is0.sum(), is1.sum(), miss.sum()], grid_counts]).astype(float)


def _bounds_from_hist(grid_counts: np.ndarray, lo_q: float = 0.005, hi_q: float = 0.995) -> tuple[float, float]:
    c = np.clip(grid_counts, 0, None)
    if c.sum() <= 0:
        return 0.0, 1.0
    cdf = np.cumsum(c) / c.sum()
    i_lo = int(np.searchsorted(cdf, lo_q))
    i_hi = int(np.searchsorted(cdf, hi_q))
    edges = np.concatenate([[GRID[0] * 10], GRID, [GRID[-1] * 10]])  # bin i spans edges[i]..edges[i+1]
    lo, hi = float(edges[i_lo]), float(edges[i_hi + 1])
    if not lo < hi:
        hi = lo + 1.0
    return lo, hi


def dp_column_summaries(df: pd.DataFrame, columns: dict[str, str], *, epsilon: float, delta: float,
                        generator: torch.Generator | None = None) -> tuple[dict, dict]:
    """columns: name → 'numeric' | 'string'. Returns (per-column findings, dp_spend record for the schema)."""
    k = len(columns)
    if k == 0:
        return {}, {}
    # half of δ for the Gaussian part, half for the thresholding of string categories
    n_string = sum(1 for t in columns.values() if t == "string")
    gauss_delta = delta / 2 if n_string else delta
    sigma = calibrate_noise(target_epsilon=epsilon, delta=gauss_delta, sample_rate=1.0, steps=1, mechanism=MECHANISM)
    std = sigma * math.sqrt(k)
    extra_delta = 0.0
    tau = None
    if n_string:
        per_col = (delta / 2) / n_string
        tau = 1.0 + std * float(norm.isf(per_col))
        extra_delta = n_string * float(norm.sf((tau - 1.0) / std))

    def noise(size: int) -> np.ndarray:
        return torch.randn(size, generator=generator, dtype=torch.float64).numpy() * std

    out = {}
    for name, typ in columns.items():
        s = df[name]
        if typ == "numeric":
            v = pd.to_numeric(s, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
            h = _numeric_hist(v) + noise(len(GRID) + 4)
            h0, h1, grid = h[0], h[1], h[3:]
            total = max(np.clip(h, 0, None).sum(), 1.0)
            other = np.clip(grid, 0, None).sum()
            if other / total < 0.01 and h0 + h1 > 0:
                out[name] = {"kind": "binary"}
            else:
                # 0 and 1 are part of the continuous range: fold them back into their grid bins
                g = grid.copy()
                g[np.searchsorted(GRID, 0.0, side="right")] += max(h0, 0)
                g[np.searchsorted(GRID, 1.0, side="right")] += max(h1, 0)
                lo, hi = _bounds_from_hist(g)
                out[name] = {"kind": "continuous", "lower": lo, "upper": hi}
        else:
            vals = s.dropna().astype(str)
            counts = vals.value_counts()
            noisy = counts.to_numpy(dtype=float) + noise(len(counts))
            keep = [c for c, x in zip(counts.index, noisy) if x > tau]
            out[name] = {"kind": "categorical", "categories": sorted(keep)} if len(keep) >= 2 else {"kind": "identifier"}
    spend = {
        "purpose": "schema inference (bounds, binary detection, categories)",
        "epsilon": epsilon,
        "delta": delta,
        "mechanisms": [Mechanism(MECHANISM, sigma, 1.0, 1).__dict__],
        "extra_delta": extra_delta,
        "threshold": tau,
        "noise_std": std,
    }
    return out, spend
