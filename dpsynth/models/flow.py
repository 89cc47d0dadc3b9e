"""Conditional RealNVP for the continuous columns ("vitals"), chained after the WGAN record.

The WGAN generates the record (binary and categorical columns and every column's missingness); this flow
generates the continuous values given that record: p(x_obs | record, missingness pattern).

Pipeline for one continuous column j with public bounds [lo_j, hi_j] from the schema:
  x  ──(public affine)──►  u = (x − lo) / (hi − lo) ∈ (0, 1)  ──(logit)──►  y ∈ ℝ
  integer columns are dequantised (x + U(−½, ½), bounds widened by ½) while training; samples are rounded.
  The inverse (sigmoid, affine) maps any y back inside [lo, hi]: samples never leave the public bounds.
Flow in y-space (all layers are nn.Linear + elementwise functions, so Opacus ghost clipping works):
  y ──► K affine couplings ──► conditional affine (μ(c), log σ(c)) ──► z ~ N(0, I) on the observed dims

Missing values — masked likelihood, exact: missing dims are set to 0 and *never transformed* (their scale
and shift are masked to 0 in every layer), and the base density covers the observed dims only. Each layer is
then a bijection of the observed dims whose conditioners see (observed values, observation mask, record),
so the model is an exact conditional density p(x_obs | mask, record). The mask comes from the WGAN at
generation time, and from the data at training time.

Per-sample loss = −log p(x_i | c_i) (in y-space; the public bounding bijection only adds a constant in the
parameters). Trained with DP-SGD: Opacus ghost clipping, Poisson sampling, charged to the site accountant
as its own mechanism (``dp-sgd:flow``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..preprocess import Encoder
from .dp import PerSampleLoss, backward_and_step, empty_batch_step, make_private, run_epoch
from ..schema import Schema

LOG_2PI = math.log(2 * math.pi)
U_EPS = 1e-5  # u is clamped to [U_EPS, 1 − U_EPS] before the logit (values on a bound stay finite)


@dataclass
class FlowConfig:
    hidden: int = 64
    couplings: int = 6
    lr: float = 5e-3  # tuned on NAFLD at ε = 3 (2e-3: under-fit in 60 epochs; 1e-2: unstable)
    epochs: int = 60
    scale_clamp: float = 2.0  # |log-scale| per coupling ≤ this (soft, via tanh): keeps DP training stable
    # per-example clipping norm of the flow's DP-SGD (None = the run's max_grad_norm, the critic's). Measured on
    # NAFLD at ε = 3, 3 seeds (bench/vitals.py --flow): weight KS 0.100 at 1.0, 0.061 at 0.3, 0.069 at 0.1; mean
    # KS 0.067 / 0.057 / 0.060
    max_grad_norm: float | None = 0.3


def _partition_masks(dim: int, k: int) -> list[torch.Tensor]:
    """Pass-through masks (1 = conditioner input, 0 = transformed): alternating halves of a few fixed
    orderings, so every dim is transformed conditioned on every other one across the stack."""
    orders = [np.arange(dim), np.arange(dim)[::-1], np.random.default_rng(0).permutation(dim)]
    masks = []
    for i in range(k):
        order = orders[(i // 2) % len(orders)]
        b = np.zeros(dim, dtype=np.float32)
        first = order[: dim // 2] if dim > 1 else order[:0]
        b[first] = 1.0
        if i % 2 == 1:
            b = 1.0 - b
        masks.append(torch.from_numpy(b))
    return masks


class Coupling(nn.Module):
    def __init__(self, dim: int, cond_dim: int, hidden: int, pass_mask: torch.Tensor, scale_clamp: float):
        super().__init__()
        self.register_buffer("b", pass_mask)
        self.scale_clamp = scale_clamp
        self.net = nn.Sequential(
            nn.Linear(2 * dim + cond_dim, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 2 * dim),
        )
        nn.init.zeros_(self.net[-1].weight)  # identity at start
        nn.init.zeros_(self.net[-1].bias)

    def _st(self, y, obs, c):
        h = self.net(torch.cat([y * self.b * obs, obs, c], dim=1))
        s, t = h.chunk(2, dim=1)
        s = self.scale_clamp * torch.tanh(s / self.scale_clamp)
        m = (1.0 - self.b) * obs  # transformed AND observed
        return s * m, t * m

    def forward(self, y, obs, c):
        s, t = self._st(y, obs, c)
        return y * torch.exp(s) + t, s.sum(dim=1)

    def inverse(self, y, obs, c):
        s, t = self._st(y, obs, c)  # depends on pass-through dims only: unchanged by this layer
        return (y - t) * torch.exp(-s)


class ConditionalFlow(nn.Module):
    """Conditional RealNVP in y-space. ``forward`` returns the per-sample negative log-likelihood."""

    def __init__(self, dim: int, cond_dim: int, config: FlowConfig | None = None):
        super().__init__()
        config = config or FlowConfig()
        self.dim, self.cond_dim = dim, cond_dim
        self.couplings = nn.ModuleList(
            [Coupling(dim, cond_dim, config.hidden, m, config.scale_clamp) for m in _partition_masks(dim, config.couplings)]
        )
        self.base = nn.Linear(dim + cond_dim, 2 * dim)  # conditional Gaussian: μ(c), log σ(c)
        nn.init.zeros_(self.base.weight)
        nn.init.zeros_(self.base.bias)

    def _base(self, obs, c):
        mu, log_sigma = self.base(torch.cat([obs, c], dim=1)).chunk(2, dim=1)
        return mu * obs, log_sigma * obs

    def to_latent(self, y, obs, c) -> tuple[torch.Tensor, torch.Tensor]:
        y = y * obs
        logdet = y.new_zeros(y.shape[0])
        for layer in self.couplings:
            y, ld = layer(y, obs, c)
            logdet = logdet + ld
        mu, log_sigma = self._base(obs, c)
        z = (y - mu) * torch.exp(-log_sigma)
        return z, logdet - log_sigma.sum(dim=1)

    def forward(self, y, obs, c) -> torch.Tensor:
        z, logdet = self.to_latent(y, obs, c)
        log_pz = -0.5 * ((z**2) * obs).sum(dim=1) - 0.5 * LOG_2PI * obs.sum(dim=1)
        return -(log_pz + logdet)

    def log_prob(self, y, obs, c) -> torch.Tensor:
        return -self.forward(y, obs, c)

    def from_latent(self, z, obs, c) -> torch.Tensor:
        """The inverse of ``to_latent`` (on the observed dims; missing dims stay 0)."""
        mu, log_sigma = self._base(obs, c)
        y = (mu + torch.exp(log_sigma) * z) * obs
        for layer in reversed(self.couplings):
            y = layer.inverse(y, obs, c)
        return y * obs

    @torch.no_grad()
    def sample(self, obs, c, *, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        z = torch.randn(obs.shape, generator=generator) * temperature * obs
        return self.from_latent(z, obs, c)


# ------------------------------------------------------------------------------------------------
# the public bounding bijection and the conditioning vector
# ------------------------------------------------------------------------------------------------

class VitalsCodec:
    """Maps a validated frame to (u, obs, c) tensors for the flow, and flow samples back to values.

    Everything here comes from the schema (public bounds, categories): nothing is fitted on the data.
    ``c`` is the encoded record without the continuous value slots: binary slots, one-hot blocks and every
    missingness indicator — exactly what the WGAN generates.
    """

    def __init__(self, schema: Schema, encoder: Encoder | None = None):
        self.schema = schema
        self.encoder = encoder or Encoder(schema)
        self.columns = [c for c in schema.modelled if c.kind == "continuous"]
        if not self.columns:
            raise ValueError("the schema has no continuous columns: nothing for the flow to model")
        self.names = [c.name for c in self.columns]
        lo, hi, integer = [], [], []
        for col in self.columns:
            half = 0.5 if col.integer else 0.0
            lo.append(float(col.lower) - half)
            hi.append(float(col.upper) + half)
            integer.append(bool(col.integer))
        self.lo = np.array(lo)
        self.hi = np.array(hi)
        self.integer = np.array(integer)
        value_slots = {sp.start for sp in self.encoder.spans if sp.role == "value" and sp.column in set(self.names)}
        self.cond_index = np.array([i for i in range(self.encoder.dim) if i not in value_slots], dtype=np.int64)
        self.dim = len(self.columns)
        self.cond_dim = len(self.cond_index)

    def condition(self, encoded: np.ndarray) -> np.ndarray:
        return encoded[:, self.cond_index].astype(np.float32)

    def encode(self, df: pd.DataFrame, encoded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(u, obs, c): u ∈ [0, 1] scaled by the (widened) public bounds, 0 where missing; values outside the
        bounds are clipped (the encoder counts them)."""
        if encoded is None:
            encoded, _ = self.encoder.transform(df)
        v = np.stack([df[n].to_numpy(dtype=float, na_value=np.nan) for n in self.names], axis=1)
        obs = ~np.isnan(v)
        u = (np.clip(np.where(obs, v, self.lo), self.lo, self.hi) - self.lo) / (self.hi - self.lo)
        return (np.where(obs, u, 0.0).astype(np.float32), obs.astype(np.float32), self.condition(encoded))

    def to_y(self, u: torch.Tensor, obs: torch.Tensor, *, dequantize: torch.Generator | None = None) -> torch.Tensor:
        """u → y = logit(u). With ``dequantize`` (a generator), integer columns get U(−½, ½) noise in value
        units — the standard dequantisation of discrete data for a continuous density."""
        if dequantize is not None and self.integer.any():
            width = torch.from_numpy((self.hi - self.lo).astype(np.float32))
            noise = torch.rand(u.shape, generator=dequantize) - 0.5
            u = u + noise * torch.from_numpy(self.integer.astype(np.float32)) / width
        u = u.clamp(U_EPS, 1 - U_EPS)
        return torch.logit(u) * obs

    def from_y(self, y: np.ndarray, obs: np.ndarray) -> dict[str, np.ndarray]:
        u = 1.0 / (1.0 + np.exp(-np.clip(y, -50, 50)))
        x = self.lo + u * (self.hi - self.lo)
        out = {}
        for j, col in enumerate(self.columns):
            v = x[:, j]
            if col.integer:
                v = np.round(v)
            v = np.clip(v, float(col.lower), float(col.upper))
            out[col.name] = np.where(obs[:, j] > 0, v, np.nan)
        return out


def new_flow(schema: Schema, encoder: Encoder, config: FlowConfig | None = None,
             state: dict | None = None) -> tuple[ConditionalFlow, VitalsCodec]:
    """The flow for a schema (and its codec), with ``state`` loaded when given: the one place that sizes it."""
    codec = VitalsCodec(schema, encoder)
    flow = ConditionalFlow(codec.dim, codec.cond_dim, config or FlowConfig())
    if state is not None:
        flow.load_state_dict(state)
    return flow, codec


def flow_step(*, flow, optimizer, criterion, codec: VitalsCodec, batch, dequant: torch.Generator | None,
              private: bool) -> float:
    """One (DP when ``private``) step on a Poisson batch (u, obs, c). Returns the mean NLL."""
    u, obs, c = batch
    optimizer.zero_grad(set_to_none=False)
    if u.shape[0] == 0:
        return empty_batch_step(flow, optimizer)
    y = codec.to_y(u, obs, dequantize=dequant)
    return backward_and_step(flow(y, obs, c), criterion=criterion, optimizer=optimizer, private=private)


def make_private_flow(*, flow, optimizer, loader, noise_multiplier: float, max_grad_norm: float, noise_generator):
    """Opacus wiring for the flow: ghost clipping, Poisson sampling (q = 1/len(loader))."""
    return make_private(module=flow, optimizer=optimizer, criterion=PerSampleLoss(), loader=loader,
                        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, noise_generator=noise_generator)


@torch.no_grad()
def fill_vitals(flow: ConditionalFlow, codec: VitalsCodec, df: pd.DataFrame, *, generator: torch.Generator | None = None,
                batch: int = 8192) -> pd.DataFrame:
    """Replace the continuous columns of a decoded synthetic record frame by flow samples conditioned on the
    record (its binary/categorical values and missingness pattern). Returns a new frame."""
    flow.eval()
    encoded, _ = codec.encoder.transform(df)
    _, obs, c = codec.encode(df, encoded)
    ys = []
    for i in range(0, len(df), batch):
        o = torch.from_numpy(obs[i : i + batch])
        ys.append(flow.sample(o, torch.from_numpy(c[i : i + batch]), generator=generator).numpy())
    y = np.concatenate(ys) if ys else np.zeros((0, codec.dim))
    values = codec.from_y(y, obs)
    out = df.copy()
    for col in codec.columns:
        v = values[col.name]
        if col.integer:
            s = pd.Series(v).astype("Int64")
            out[col.name] = s.astype(np.int64) if not s.isna().any() else s
        else:
            out[col.name] = v
    flow.train()
    return out


def flow_epoch(*, flow, optimizer, criterion, loader, codec: VitalsCodec, dequant, private: bool,
               may_step=lambda: True, stepped=lambda: None) -> list[float]:
    """One pass over a Poisson loader (models.dp.run_epoch). Returns the per-step mean NLLs."""
    return run_epoch(loader, lambda b: flow_step(flow=flow, optimizer=optimizer, criterion=criterion, codec=codec,
                                                   batch=b, dequant=dequant, private=private),
                     may_step=may_step, stepped=stepped)
