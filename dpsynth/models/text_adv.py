"""mtGAN-style adversarial fine-tuning of the note model under DP (issue 7, requirement 6: a measured comparison).

mtGAN (Guan et al. 2018, arXiv 1812.02793) fine-tunes a conditional text generator against a discriminator with
REINFORCE and gives no privacy guarantee. Here the same stage runs after the DP maximum-likelihood fit:

* **Critic** (``NoteCritic``): a small conditional bag-of-bigrams classifier (token and previous-token
  embeddings, the mean of the record's condition embeddings, one hidden layer, masked mean over the note). It is
  the only part that reads private notes, so it is trained with DP-SGD (``models.dp.make_private``: Poisson
  sampling over the patients that have a note, per-patient clipping, Gaussian noise). A patient's unit of
  clipping is the pair (its real note, one note the generator writes for its record): the fake depends on the
  patient's record, so both terms of its loss are clipped together.
* **Generator** (REINFORCE, Williams 1992): notes sampled on-policy (temperature 1, no nucleus, no guidance, no
  repetition penalty: the model's own distribution) for *public* conditions — the synthetic records of the chained
  fit, or any records that are not training data — are rewarded with the critic's probability of "real"; the
  batch-mean reward is the baseline. The generator update reads only the DP critic, the DP generator and the
  public conditions: post-processing, no privacy cost.

The critic's steps are a DP-SGD mechanism of their own (q, T, σ): the caller charges them to its accountant (the
comparison in ``bench/notes_sweep.py`` takes a share of the note model's privacy loss for them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .dp import backward_and_step, empty_batch_step, make_private
from .text import PAD, NoteLM, SeqEmbedding, SeqLinear, _plain, _trim, sample_note_ids


@dataclass
class AdversarialConfig:
    """The adversarial stage. ``share``: the critic's part of the note model's privacy loss (the split rule of
    ``privacy.accountant.calibrate_split``; the MLE fit keeps the rest)."""

    share: float = 0.2
    steps: int = 40  # critic DP-SGD steps (each followed by ``g_steps`` generator updates)
    batch_size: int = 256  # expected Poisson batch of the critic; also the generator's batch of public prompts
    g_steps: int = 1
    lr_critic: float = 2e-3
    lr_generator: float = 1e-4
    d_model: int = 64
    hidden: int = 128
    warmup: int = 5  # critic steps before the first generator update (the critic must tell something first)

    def __post_init__(self):
        if not 0.0 < self.share < 1.0:
            raise ValueError(f"adversarial share must be in (0, 1), got {self.share}")
        for k in ("steps", "batch_size", "d_model", "hidden"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"adversarial {k} must be ≥ 1, got {getattr(self, k)}")


class NoteCritic(nn.Module):
    """Real-vs-generated score of notes given their record: ``forward(ids)`` with ids [B, S, L] (S streams of
    whole sequences per patient, the training layout) → logits [B, S]."""

    def __init__(self, vocab_size: int, prefix_len: int, d: int = 64, hidden: int = 128):
        super().__init__()
        self.prefix_len = int(prefix_len)
        self.tok = SeqEmbedding(vocab_size, d)
        self.prev = SeqEmbedding(vocab_size, d)  # the previous token: bigram features
        self.cond = SeqEmbedding(vocab_size, d)  # the record's condition tokens (the prefix), mean-pooled
        self.fc = SeqLinear(d, hidden)
        self.out = SeqLinear(hidden, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        B, S, L = ids.shape
        P = self.prefix_len
        note = ids[:, :, P:]
        mask = (note != PAD).to(torch.float32)  # [B, S, T]
        T = L - P  # Opacus' samplers see [B, …] inputs (one patient per row): streams are folded into T
        h = (self.tok(note.reshape(B, S * T)) + self.prev(ids[:, :, P - 1 : L - 1].reshape(B, S * T))).view(B, S, T, -1)
        c = self.cond(ids[:, :, 1 : P - 1].reshape(B, -1)).view(B, S, P - 2, -1).mean(2, keepdim=True)
        h = F.relu(self.fc((h + c).reshape(B, S * T, -1))).view(B, S, T, -1)
        pooled = (h * mask.unsqueeze(-1)).sum(2) / mask.sum(2, keepdim=True).clamp(min=1.0)  # [B, S, hidden]
        return self.out(pooled).squeeze(-1)


def critic_loss(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Per-patient logistic loss of the pair (real note, generated note for the same record), shape [B]."""
    s = critic(torch.stack([real, fake], dim=1))
    return F.softplus(-s[:, 0]) + F.softplus(s[:, 1])


def reinforce_step(generator: NoteLM, critic: nn.Module, tokenizer, conditions: np.ndarray, optimizer,
                   rng: torch.Generator | None = None) -> dict:
    """One REINFORCE update of ``generator`` (a plain NoteLM) on notes it samples on-policy for ``conditions``
    ([n, K] public condition ids); reward = the critic's probability of "real", baseline = the batch mean. Returns
    the mean reward and the policy loss."""
    ids = sample_note_ids(generator, tokenizer, conditions, temperature=1.0, top_p=1.0, guidance=1.0,
                          repetition=0.0, generator=rng)
    ids = _trim(ids, generator.prefix_len)
    with torch.no_grad():
        reward = torch.sigmoid(_plain(critic)(ids.unsqueeze(1))[:, 0])
    adv = reward - reward.mean()
    generator.train()
    optimizer.zero_grad()
    nll, _ = generator.token_nll(ids)  # −log p(note | record), summed over its tokens
    loss = (adv * nll).mean()  # ∇ = −E[(r − b)·∇log p]
    loss.backward()
    optimizer.step()
    return {"reward": float(reward.mean()), "policy_loss": float(loss.detach())}


def adversarial_finetune(generator: NoteLM, tokenizer, train_ids: torch.Tensor, public_conditions: np.ndarray, *,
                         config: AdversarialConfig, noise_multiplier: float, max_grad_norm: float = 1.0,
                         seed: int = 0, noise_generator: torch.Generator | None = None) -> dict:
    """The adversarial stage after the DP maximum-likelihood fit (module docstring). ``train_ids``: the private
    training sequences [n, max_len]; ``public_conditions``: [m, K] condition ids of public records for the
    generator's prompts. ``generator``: a plain NoteLM (Opacus' hooks removed after its DP fit, or they compute
    per-sample norms on every REINFORCE step for nothing). The critic takes ``config.steps`` DP-SGD steps at (q = 1/⌈n/batch⌉, σ =
    ``noise_multiplier``), which the caller charges. ``generator`` is updated in place. Returns the history."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(seed)
    critic = NoteCritic(generator.vocab_size, generator.prefix_len, config.d_model, config.hidden)
    loader = DataLoader(TensorDataset(train_ids), batch_size=config.batch_size)
    d_opt = torch.optim.Adam(critic.parameters(), lr=config.lr_critic)
    dp_critic, d_opt, _, dl = make_private(
        module=critic, optimizer=d_opt, criterion=None, loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, noise_generator=noise_generator or torch.Generator().manual_seed(seed + 1),
        grad_sample_mode="hooks")
    g_opt = torch.optim.Adam(generator.parameters(), lr=config.lr_generator)
    P = generator.prefix_len
    pub = np.asarray(public_conditions)
    hist = {"critic_loss": [], "reward": [], "steps": 0, "sample_rate": 1 / len(loader),
            "noise_multiplier": noise_multiplier}
    while hist["steps"] < config.steps:
        for (real,) in dl:
            d_opt.zero_grad(set_to_none=False)
            if real.shape[0] == 0:
                hist["critic_loss"].append(empty_batch_step(dp_critic, d_opt))
            else:
                fake = sample_note_ids(generator, tokenizer, real[:, 1 : P - 1].numpy(), temperature=1.0,
                                       top_p=1.0, guidance=1.0, repetition=0.0, generator=g)
                pair = _trim(torch.cat([real, fake]), P)  # one width for both streams
                B = len(real)
                hist["critic_loss"].append(backward_and_step(critic_loss(dp_critic, pair[:B], pair[B:]),
                                                             criterion=None, optimizer=d_opt, private=True))
            hist["steps"] += 1
            if hist["steps"] > config.warmup:
                for _ in range(config.g_steps):
                    rows = torch.randint(len(pub), (config.batch_size,), generator=g).numpy()
                    hist["reward"].append(reinforce_step(generator, critic, tokenizer, pub[rows], g_opt, g)["reward"])
            if hist["steps"] >= config.steps:
                break
    generator.eval()
    return hist


__all__ = ["AdversarialConfig", "NoteCritic", "adversarial_finetune", "critic_loss", "reinforce_step"]
