"""Encoder built from the schema only — never fitted on the private data.

Layout of the encoded vector, per modelled column (in schema order):
  continuous   value scaled to [0, 1] by the public bounds (sigmoid output); out-of-bound values are clipped
               and counted; if nullable, a missingness indicator (sigmoid) follows — missing values are
               generated, not imputed away (the value slot is 0 where missing and ignored on decoding)
  binary       one slot (sigmoid); if nullable, a missingness indicator follows
  categorical  one-hot over the schema's categories (softmax); if nullable, one more category "missing"
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .schema import Schema, canonical_category

MISSING = "__missing__"


@dataclass(frozen=True)
class Span:
    column: str
    role: str  # value | missing | onehot
    start: int
    end: int
    activation: str  # sigmoid | softmax


class Encoder:
    def __init__(self, schema: Schema):
        self.schema = schema
        spans: list[Span] = []
        pos = 0
        for col in schema.modelled:
            if col.kind == "categorical":
                k = len(col.categories) + (1 if col.nullable else 0)
                spans.append(Span(col.name, "onehot", pos, pos + k, "softmax"))
                pos += k
                continue
            spans.append(Span(col.name, "value", pos, pos + 1, "sigmoid"))
            pos += 1
            if col.nullable:
                spans.append(Span(col.name, "missing", pos, pos + 1, "sigmoid"))
                pos += 1
        self.spans = spans
        self.dim = pos

    # -------------------------------------------------------------------------------------------
    def feature_names(self) -> list[str]:
        names: list[str] = []
        for sp in self.spans:
            col = self.schema[sp.column]
            if sp.role == "onehot":
                cats = [canonical_category(c) for c in col.categories] + ([MISSING] if col.nullable else [])
                names += [f"{sp.column}={c}" for c in cats]
            elif sp.role == "missing":
                names.append(f"{sp.column}:missing")
            else:
                names.append(sp.column)
        return names

    def transform(self, df: pd.DataFrame) -> tuple[np.ndarray, dict[str, int]]:
        """Encode a frame already checked by ``validate_frame``. Returns (matrix, clipped counts per column)."""
        n = len(df)
        x = np.zeros((n, self.dim), dtype=np.float32)
        clipped: dict[str, int] = {}
        for sp in self.spans:
            col = self.schema[sp.column]
            s = df[sp.column]
            if sp.role == "missing":
                x[:, sp.start] = s.isna().to_numpy(dtype=np.float32)
            elif sp.role == "onehot":
                cats = [canonical_category(c) for c in col.categories] + ([MISSING] if col.nullable else [])
                index = {c: i for i, c in enumerate(cats)}
                codes = s.map(lambda v: index[MISSING] if pd.isna(v) else index[canonical_category(v)])
                x[np.arange(n), sp.start + codes.to_numpy(dtype=int)] = 1.0
            elif col.kind == "continuous":
                v = s.to_numpy(dtype=float, na_value=np.nan)
                lo, hi = float(col.lower), float(col.upper)
                present = ~np.isnan(v)
                out = present & ((v < lo) | (v > hi))
                if out.any():
                    clipped[sp.column] = int(out.sum())
                scaled = (np.clip(v, lo, hi) - lo) / (hi - lo)
                x[:, sp.start] = np.where(present, scaled, 0.0)
            else:  # binary
                v = s.to_numpy(dtype=float, na_value=np.nan)
                x[:, sp.start] = np.where(np.isnan(v), 0.0, v)
        return x, clipped

    # -------------------------------------------------------------------------------------------
    def activate(self, logits: torch.Tensor, hard: bool = False) -> torch.Tensor:
        """Generator output layer: sigmoid on value/missing slots, softmax on each one-hot block.

        ``hard``: binary / missingness slots are Bernoulli draws and one-hot blocks categorical draws, with
        straight-through gradients (the critic sees the same 0/1 support as real records, which it otherwise
        separates trivially); a value slot is zeroed where its missingness draw is 1, as in ``transform``.
        """
        parts = []
        value_at: dict[str, int] = {}
        for sp in self.spans:
            z = logits[:, sp.start : sp.end]
            if sp.activation == "softmax":
                p = torch.softmax(z, dim=1)
                if hard:
                    h = torch.zeros_like(p).scatter_(1, torch.multinomial(p.detach(), 1), 1.0)
                    p = h + p - p.detach()
                parts.append(p)
                continue
            p = torch.sigmoid(z)
            if hard and (sp.role == "missing" or self.schema[sp.column].kind == "binary"):
                p = torch.bernoulli(p.detach()) + p - p.detach()
            if hard and sp.role == "missing":  # the value slot follows its column's value slot
                i = value_at[sp.column]
                parts[i] = parts[i] * (1.0 - p.detach())
            if sp.role == "value":
                value_at[sp.column] = len(parts)
            parts.append(p)
        return torch.cat(parts, dim=1)

    def inverse(self, x: np.ndarray, *, rng: np.random.Generator | None = None, n_offset: int = 0) -> pd.DataFrame:
        """Decode generator outputs back to the user's columns and dtypes.

        Binary / missingness slots are Bernoulli draws from the generator's probabilities and categories are
        drawn from its softmax (calibrated marginals) when ``rng`` is given; otherwise thresholded / argmax.
        Identifier columns get fresh synthetic identifiers (never real ones); text columns stay empty until a
        text model fills them.
        """
        n = x.shape[0]
        cols: dict[str, object] = {}
        missing: dict[str, np.ndarray] = {}
        for sp in self.spans:
            if sp.role == "missing":
                p = x[:, sp.start]
                missing[sp.column] = (rng.random(n) < p) if rng is not None else (p > 0.5)
        for sp in self.spans:
            col = self.schema[sp.column]
            if sp.role == "missing":
                continue
            if sp.role == "onehot":
                p = np.clip(x[:, sp.start : sp.end].astype(float), 0, None)
                p = p / np.clip(p.sum(axis=1, keepdims=True), 1e-12, None)
                if rng is not None:
                    u = rng.random((n, 1))
                    codes = np.minimum((p.cumsum(axis=1) < u).sum(axis=1), p.shape[1] - 1)
                else:
                    codes = p.argmax(axis=1)
                cats = list(col.categories) + ([None] if col.nullable else [])
                cols[sp.column] = pd.Series([cats[c] for c in codes], dtype=object)
                continue
            v = np.clip(x[:, sp.start].astype(float), 0.0, 1.0)
            if col.kind == "continuous":
                lo, hi = float(col.lower), float(col.upper)
                vals = lo + v * (hi - lo)
                if col.integer:
                    vals = np.round(vals)
            else:
                vals = ((rng.random(n) < v) if rng is not None else (v > 0.5)).astype(float)
            miss = missing.get(sp.column)
            if miss is not None:
                vals = np.where(miss, np.nan, vals)
            if (col.integer or col.kind == "binary") and not np.isnan(vals).any():
                cols[sp.column] = pd.Series(vals.astype(np.int64))
            elif col.integer or col.kind == "binary":
                cols[sp.column] = pd.Series(vals).astype("Int64")
            else:
                cols[sp.column] = pd.Series(vals)
        out = {}
        for col in self.schema.columns:
            if col.kind == "identifier":
                out[col.name] = pd.Series([f"SYN-{n_offset + i + 1:08d}" for i in range(n)], dtype=object)
            elif col.kind == "text":
                out[col.name] = pd.Series([None] * n, dtype=object)
            else:
                out[col.name] = cols[col.name]
        return pd.DataFrame(out)
