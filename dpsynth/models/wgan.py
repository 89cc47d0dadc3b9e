"""EMR-WGAN-style generator and critic, and their DP training steps.

Only the critic touches real records, so only the critic is trained with DP-SGD; the generator learns from
the critic's outputs on fake records (post-processing, no privacy cost).

The critic's loss is D(fake) − D(real) + λ·GP(fake). Under Opacus only the real term is private:
  1. real term  −D(x_i) per sample → ghost clipping (per-sample clip to C) → summed in p.grad
  2. optimizer.pre_step(): Gaussian noise σ·C added, divided by the expected batch size (Poisson sampling)
  3. fake term + fake-only gradient penalty computed with Opacus' hooks disabled and **added to p.grad after
     the noise step** — Opacus' optimizer overwrites p.grad in pre_step, so a fake-term gradient added before
     step() would be silently lost (DESIGN.md §4)
  4. the wrapped optimizer's plain step.
The interpolate-based gradient penalty is not used: it fails under Opacus (hooks: IndexError, ghost:
NotImplementedError) and would mix real records into a term that is not clipped.
No BatchNorm anywhere (it mixes samples and breaks per-sample clipping); LayerNorm only in the generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class WGANConfig:
    latent_dim: int = 128
    gen_hidden: int = 256
    critic_hidden: int = 128  # fewer critic parameters → less total noise per DP step (noise norm ∝ sqrt(P))
    # defaults from a tuning study on the NAFLD cohort at ε = 3 (README, "How the DP-WGAN is trained"):
    # a slower generator stops the oscillation; a small penalty once both terms are clipped
    gen_lr: float = 1e-4
    critic_lr: float = 3e-3
    betas: tuple[float, float] = (0.5, 0.9)
    gp_weight: float = 0.1
    gen_steps_per_critic_step: int = 1
    # straight-through 0/1 draws for binary / missingness / categorical slots of fake records: the critic
    # sees the same support as real records (fractional sigmoids are trivially separable from exact 0/1)
    hard_samples: bool = True
    # clip the D(fake) term per sample at max_grad_norm too, keeping it on the real term's scale
    clip_fake: bool = True
    # exponential moving average of the generator's weights (post-processing: free); snapshots keep the EMA.
    # 0 disables it. It damps the seed-to-seed and step-to-step swings of a generator trained on a noisy critic.
    ema_decay: float = 0.0


class Generator(nn.Module):
    def __init__(self, latent_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.inp = nn.Linear(latent_dim, hidden)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, hidden)) for _ in range(2)]
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # returns logits; Encoder.activate maps them
        h = self.inp(z)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


class Critic(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden // 2),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden // 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class RealTermLoss(nn.Module):
    """Per-sample real term of the critic loss: −D(x_i). Has ``reduction`` as Opacus' criterion wrapper expects."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, critic_out: torch.Tensor, _target: torch.Tensor | None = None) -> torch.Tensor:
        per_sample = -critic_out.reshape(-1)
        if self.reduction == "none":
            return per_sample
        return per_sample.sum() if self.reduction == "sum" else per_sample.mean()


def _plain(critic: nn.Module) -> nn.Module:
    """The bare critic inside an Opacus wrapper (or the critic itself)."""
    return getattr(critic, "_module", critic)


class _hooks_off:
    """Run the critic without Opacus capturing activations (fake term, penalty, generator step)."""

    def __init__(self, critic: nn.Module):
        self.critic = critic
        self.had = getattr(critic, "hooks_enabled", None)

    def __enter__(self):
        if self.had is not None:
            self.critic.disable_hooks()

    def __exit__(self, *exc):
        if self.had:
            self.critic.enable_hooks()
        return False


def fake_term_grads(
    critic: nn.Module, fake: torch.Tensor, gp_weight: float, clip: float | None = None
) -> tuple[list[torch.Tensor], float]:
    """Gradient of mean D(fake) + λ·E[(‖∇ₓD(fake)‖ − 1)²] w.r.t. the critic's parameters (no real data).

    ``clip``: the D(fake) term's per-sample gradients are clipped to this norm before averaging, as the real
    term's are, so the two terms of the critic loss stay on the same scale (the penalty is not clipped).
    """
    params = [p for p in _plain(critic).parameters() if p.requires_grad]
    with _hooks_off(critic):
        fake = fake.detach().requires_grad_(gp_weight > 0)
        out = _plain(critic)(fake)
        loss = out.mean() if clip is None else out.new_zeros(())
        if gp_weight > 0:
            (gx,) = torch.autograd.grad(out.sum(), fake, create_graph=True)
            loss = loss + gp_weight * ((gx.norm(2, dim=1) - 1.0) ** 2).mean()
        if loss.requires_grad:
            grads = list(torch.autograd.grad(loss, params, allow_unused=True))
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        else:
            grads = [torch.zeros_like(p) for p in params]
        if clip is not None:
            scale = (clip / (_per_sample_grad_norms(_plain(critic), fake.detach()) + 1e-6)).clamp(max=1.0)
            out = _plain(critic)(fake.detach()).reshape(-1)
            clipped = torch.autograd.grad((scale * out).mean(), params)
            grads = [g + c for g, c in zip(grads, clipped)]
            loss = loss + out.mean()
    return grads, float(loss.detach())


def _per_sample_grad_norms(critic: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """‖∇_θ D(x_i)‖ per sample for the Sequential critic of Linear layers and elementwise activations
    (ghost-norm identity: ‖g_i a_iᵀ‖ = ‖g_i‖·‖a_i‖, a bias adds ‖g_i‖²). Checked against torch.func in tests."""
    h, acts, outs = x, [], []
    linears = [m for m in critic.net if isinstance(m, nn.Linear)]
    for layer in critic.net:
        if isinstance(layer, nn.Linear):
            acts.append(h)
            h = layer(h)
            outs.append(h)
        else:
            h = layer(h)
    gs = torch.autograd.grad(h.sum(), outs)
    sq = torch.zeros(x.shape[0])
    for a, g, layer in zip(acts, gs, linears):
        gn = (g**2).sum(1)
        sq = sq + gn * (a.detach() ** 2).sum(1) + (gn if layer.bias is not None else 0.0)
    return sq.sqrt()


def critic_step_dp(
    *, critic, optimizer, criterion, real: torch.Tensor, fake: torch.Tensor | None, gp_weight: float,
    fake_clip: float | None = None,
) -> dict:
    """One DP critic step (Opacus ghost clipping). Returns losses; the caller records the accountant step.

    ``fake=None`` runs the private part only (the canary audit measures exactly that)."""
    optimizer.zero_grad(set_to_none=False)
    params = [p for p in critic.parameters() if p.requires_grad]
    if real.shape[0] > 0:
        loss_real = criterion(critic(real), None)
        loss_real.backward()  # two passes inside: per-sample norms, then clipped sum into p.grad
        real_val = float(loss_real.detach())
    else:  # an empty Poisson batch still gets its noise: the update is noise only
        for p in params:
            p.grad = torch.zeros_like(p)
        real_val = 0.0
    if not optimizer.pre_step():  # adds N(0, σ²C²), divides by the expected batch size
        raise RuntimeError("Opacus skipped a step (gradient accumulation is not used here)")
    fake_val = 0.0
    if fake is not None:
        grads, fake_val = fake_term_grads(critic, fake, gp_weight, fake_clip)
        for p, g in zip(params, grads):  # after the noise step, so it is not overwritten
            p.grad.add_(g)
    optimizer.original_optimizer.step()
    return {"critic_real": real_val, "critic_fake": fake_val}


def critic_step_plain(*, critic, optimizer, real: torch.Tensor, fake: torch.Tensor, gp_weight: float,
                      fake_clip: float | None = None) -> dict:
    """Non-private critic step: the same loss with no clipping and no noise (for comparison only)."""
    optimizer.zero_grad(set_to_none=False)
    params = [p for p in critic.parameters() if p.requires_grad]
    real_loss = (-critic(real).reshape(-1)).mean() if real.shape[0] else None
    real_grads = torch.autograd.grad(real_loss, params) if real_loss is not None else [torch.zeros_like(p) for p in params]
    grads, fake_val = fake_term_grads(critic, fake, gp_weight, fake_clip)
    for p, gr, gf in zip(params, real_grads, grads):
        p.grad = gr + gf
    optimizer.step()
    return {"critic_real": float(real_loss.detach()) if real_loss is not None else 0.0, "critic_fake": fake_val}


def generator_step(*, generator, critic, encoder, optimizer, batch_size: int, latent_dim: int, hard: bool = False) -> float:
    """Generator update: maximise D(G(z)). Gradients go to the generator only; the critic is untouched."""
    optimizer.zero_grad(set_to_none=True)
    z = torch.randn(batch_size, latent_dim)
    with _hooks_off(critic):
        out = _plain(critic)(encoder.activate(generator(z), hard=hard))
        loss = -out.mean()
        gparams = [p for p in generator.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, gparams)
    for p, g in zip(gparams, grads):
        p.grad = g
    optimizer.step()
    return float(loss.detach())


def make_private_critic(*, critic, optimizer, loader, noise_multiplier: float, max_grad_norm: float, noise_generator):
    """The one Opacus wiring for the critic: ghost clipping, Poisson sampling (q = 1/len(loader)).
    Returns (wrapped critic, DP optimizer, criterion, Poisson loader). The engine's own accountant is not
    used: callers record steps in their SiteAccountant."""
    from .dp import make_private

    return make_private(module=critic, optimizer=optimizer, criterion=RealTermLoss(), loader=loader,
                        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, noise_generator=noise_generator)


def wgan_step(*, generator, critic, encoder, g_opt, c_opt, criterion, real: torch.Tensor, config: WGANConfig,
              batch_size: int, max_grad_norm: float) -> dict:
    """One critic step on a Poisson batch (DP when ``criterion`` is Opacus' ghost-clipping criterion, plain
    when it is None) followed by the generator step(s). Returns the losses."""
    fake = encoder.activate(generator(torch.randn(batch_size, config.latent_dim)), hard=config.hard_samples).detach()
    if criterion is None:
        losses = critic_step_plain(critic=critic, optimizer=c_opt, real=real, fake=fake, gp_weight=config.gp_weight)
    else:
        losses = critic_step_dp(critic=critic, optimizer=c_opt, criterion=criterion, real=real, fake=fake,
                                gp_weight=config.gp_weight, fake_clip=max_grad_norm if config.clip_fake else None)
    for _ in range(config.gen_steps_per_critic_step):
        losses["generator"] = generator_step(generator=generator, critic=critic, encoder=encoder, optimizer=g_opt,
                                             batch_size=batch_size, latent_dim=config.latent_dim, hard=config.hard_samples)
    return losses


@torch.no_grad()
def sample_encoded(generator: Generator, encoder, n: int, latent_dim: int, batch: int = 4096) -> torch.Tensor:
    generator.eval()
    outs = []
    for i in range(0, n, batch):
        z = torch.randn(min(batch, n - i), latent_dim)
        outs.append(encoder.activate(generator(z)))
    generator.train()
    return torch.cat(outs) if outs else torch.zeros(0, encoder.dim)
