"""DP statistics for building a schema (`dpsynth schema infer --epsilon`).

One Gaussian mechanism releases, per column, histograms to which each patient contributes one count each
(two for a numeric column, one for a string column: L2 sensitivity sqrt(2·k_numeric + k_string)); it is
recorded as (σ, q = 1, 1 step) in the site accountant, and ``train`` composes it with everything else
inside its --epsilon.

  numeric columns  a type histogram [== 0, == 1, other value, missing] and a histogram of the non-missing
                   values on a fixed, data-independent grid of 10 bins per decade on ±[1e-3, 1e7]. Binary if
                   the noisy "other" count is below 1 % of the noisy total; else continuous, with bounds at
                   the grid edges where the CDF of the grid bins whose noisy count clears the noise (a
                   0.1 % chance per column that an empty bin passes) crosses 0.5 % and 99.5 % (values outside are clipped and counted at training)
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
    """[==0, ==1, other, missing] + grid bins of the non-missing values (len(GRID)+1 incl. under/overflow)."""
    miss = np.isnan(v)
    is0 = (v == 0) & ~miss
    is1 = (v == 1) & ~miss
    other = ~(miss | is0 | is1)
    idx = np.searchsorted(GRID, v[~miss], side="right")
    grid_counts = np.bincount(idx, minlength=len(GRID) + 1).astype(float)
    return np.concatenate([[is0.sum(), is1.sum(), other.sum(), miss.sum()], grid_counts]).astype(float)


def _bounds_from_hist(grid_counts: np.ndarray, floor: float, lo_q: float = 0.005, hi_q: float = 0.995) -> tuple[float, float] | None:
    """Bounds from the noisy grid histogram, or None when no bin clears the noise floor (too few values)."""
    c = np.where(grid_counts > floor, grid_counts, 0.0)  # empty bins' noise would otherwise spread the bounds
    if c.sum() <= 0:
        return None
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
    if not columns:
        return {}, {}
    # half of δ for the Gaussian part, half for the thresholding of string categories
    n_string = sum(1 for t in columns.values() if t == "string")
    n_numeric = len(columns) - n_string
    gauss_delta = delta / 2 if n_string else delta
    sigma = calibrate_noise(target_epsilon=epsilon, delta=gauss_delta, sample_rate=1.0, steps=1, mechanism=MECHANISM)
    std = sigma * math.sqrt(2 * n_numeric + n_string)
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
            h = _numeric_hist(v) + noise(len(GRID) + 5)
            h0, h1, other, grid = h[0], h[1], h[2], h[4:]
            total = max(h0, 0) + max(h1, 0) + max(other, 0)
            if total > 0 and max(other, 0) / total < 0.01:
                out[name] = {"kind": "binary"}
            else:
                b = _bounds_from_hist(grid, floor=std * float(norm.isf(1e-3 / len(grid))))
                out[name] = {"kind": "continuous", "lower": b[0], "upper": b[1]} if b else {"kind": "continuous"}
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
