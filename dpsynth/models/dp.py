"""The one Opacus wiring and DP step tail shared by every model trained on patients (critic, flow, notes).

Each model returns one loss per patient (shape [B]); Opacus clips each patient's gradient to C (ghost
clipping by default: per-sample norms without per-sample gradients), adds N(0, σ²C²) and divides by the
expected Poisson batch size. Opacus' own accountant is never used: callers record every step in their
SiteAccountant (dpsynth.privacy.accountant).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


class PerSampleLoss(nn.Module):
    """The model already returns one loss per sample; Opacus' criterion wrapper needs ``reduction``."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, per_sample: torch.Tensor, _target: torch.Tensor | None = None) -> torch.Tensor:
        per_sample = per_sample.reshape(-1)
        if self.reduction == "none":
            return per_sample
        return per_sample.sum() if self.reduction == "sum" else per_sample.mean()


def make_private(*, module, optimizer, criterion: nn.Module, loader, noise_multiplier: float, max_grad_norm: float,
                 noise_generator, grad_sample_mode: str = "ghost"):
    """Poisson sampling (q = 1/len(loader)) and per-patient clipping + Gaussian noise. Returns (wrapped module,
    DP optimizer, criterion, Poisson loader); the criterion is None in ``"hooks"`` mode (plain mean loss)."""
    from opacus import PrivacyEngine

    if grad_sample_mode not in ("ghost", "hooks"):
        raise ValueError(f"grad_sample_mode must be 'ghost' or 'hooks', got {grad_sample_mode!r}")
    kw = {"criterion": criterion} if grad_sample_mode == "ghost" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = PrivacyEngine(accountant="prv").make_private(
            module=module, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, grad_sample_mode=grad_sample_mode, poisson_sampling=True,
            noise_generator=noise_generator, **kw,
        )
    if grad_sample_mode == "hooks":
        m, opt, dl = out
        return m, opt, None, dl
    return out


def empty_batch_step(module, optimizer) -> float:
    """An empty Poisson batch still takes its step: zero gradient, and the DP optimizer adds the noise. In hooks
    mode the optimizer reads per-sample gradients: an empty [0, …] one per parameter, as a forward and backward
    pass over no patients would leave (Opacus then clips nothing and adds the noise)."""
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
        if p.requires_grad and hasattr(p, "grad_sample"):
            p.grad_sample = p.new_zeros((0, *p.shape))
    optimizer.step()
    return float("nan")


def backward_and_step(per_sample: torch.Tensor, *, criterion, optimizer, private: bool) -> float:
    """Backward of the per-patient losses (through Opacus' ghost-clipping criterion when private and one is
    given, else their mean) and the optimizer step (which adds the noise when the optimizer is Opacus').
    Returns the mean loss."""
    if private and criterion is not None:
        loss = criterion(per_sample, None)
    else:
        loss = per_sample.mean()
    with warnings.catch_warnings():  # Opacus' hooks: "full backward hook ... no inputs require grad" (harmless)
        warnings.filterwarnings("ignore", message="Full backward hook")
        loss.backward()
    optimizer.step()
    return float(per_sample.detach().mean())


def run_epoch(loader, step, *, may_step=lambda: True, stepped=lambda: None) -> list[float]:
    """One pass over a Poisson loader: ``may_step()`` is asked before every step (the caller's plan — never a
    step beyond it), ``step(batch)`` runs it, ``stepped()`` is told after (the caller's accountant)."""
    losses = []
    for batch in loader:
        if not may_step():
            break
        losses.append(step(batch))
        stepped()
    return losses
