"""One-run empirical privacy audit of the DP-SGD critic step (Steinke, Nasr, Jagielski, NeurIPS 2023).

m canaries are each included in the training set with probability ½; the critic is trained **once** with
the production code path (Opacus ghost clipping, Poisson sampling, the same σ, q, C and number of steps as
the model being audited); then the k canaries with the highest scores are guessed "in" and the k lowest
"out". Under (ε, δ)-DP the number of correct guesses is dominated by Binomial(r, p) with
p = e^ε/(1 + e^ε) (+ δ, a conservative allowance), so observing many correct guesses rejects every ε
for which that is unlikely: the largest rejected ε is a lower bound (95 % confidence, Bonferroni over the
values of k tried). It cannot prove a claimed ε; it catches broken noise or clipping.

Canaries are "Dirac" inputs: canary i is the one-hot vector of a reserved input coordinate that no other
record uses, so its only trace in the model is the first-layer weight column of that coordinate; its score
is how far that column moved during training (white-box: noise alone for a canary left out). Background records are random and have zeros there.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy.stats import binom

from dpsynth.models.wgan import Critic, RealTermLoss, critic_step_dp

KS = (25, 50, 100, 250, 500)


def epsilon_lower_bound(correct: int, guesses: int, *, delta: float, alpha: float) -> float:
    """Largest ε such that P[Binomial(guesses, e^ε/(1+e^ε) + δ) ≥ correct] < alpha (0 if none)."""
    if guesses == 0:
        return 0.0

    def pval(eps: float) -> float:
        p = min(1.0, math.exp(eps) / (1 + math.exp(eps)) + delta)
        return float(binom.sf(correct - 1, guesses, p))

    if pval(0.0) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while pval(hi) < alpha and hi < 50:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if pval(mid) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


def one_run_audit(*, noise_multiplier: float, sample_rate: float, steps: int, max_grad_norm: float,
                  delta: float, claimed_epsilon: float | None, m: int = 2000, n_background: int = 4000,
                  hidden: int = 32, lr: float = 0.1, seed: int | None = None, confidence: float = 0.95) -> dict:
    """Audit the production critic step with the given DP-SGD parameters. Returns the ε lower bound."""
    from opacus import PrivacyEngine

    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    d_bg = 8
    n = n_background + m
    batch = max(1, int(round(n * sample_rate)))
    x = np.zeros((n, d_bg + m), dtype=np.float32)
    x[:n_background, :d_bg] = rng.random((n_background, d_bg), dtype=np.float32)
    include = rng.random(m) < 0.5
    x[n_background + np.arange(m), d_bg + np.arange(m)] = 1.0
    keep = np.r_[np.ones(n_background, bool), include]
    data = torch.from_numpy(x[keep])

    torch.manual_seed(int(rng.integers(2**31)))
    critic = Critic(d_bg + m, hidden)
    first = critic.net[0].weight  # (hidden, d_bg + m): column d_bg + i belongs to canary i alone
    before = first.detach().clone()
    opt = torch.optim.SGD(critic.parameters(), lr=lr)
    # the loader's batch size sets q = 1/len(loader): choose it so q matches the audited run
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=max(1, round(sample_rate * len(data))),
                                         generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, dpopt, crit, dl = PrivacyEngine().make_private(
            module=critic, optimizer=opt, criterion=RealTermLoss(), data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, grad_sample_mode="ghost", noise_generator=gen,
        )
    done = 0
    while done < steps:
        for (real,) in dl:
            critic_step_dp(critic=model, optimizer=dpopt, criterion=crit, real=real, fake=None, gp_weight=0.0)
            done += 1
            if done >= steps:
                break
    # score: how far canary i's own weight column moved (noise alone for a canary that was left out)
    scores = (first.detach() - before)[:, d_bg:].norm(dim=0).numpy()
    order = np.argsort(-scores)
    alpha = (1 - confidence) / len(KS)
    best = {"epsilon_lower_bound": 0.0, "k": None, "correct": 0, "guesses": 0}
    for k in KS:
        if 2 * k > m:
            continue
        top, bottom = order[:k], order[-k:]
        correct = int(include[top].sum() + (~include[bottom]).sum())
        lb = epsilon_lower_bound(correct, 2 * k, delta=delta, alpha=alpha)
        if best["k"] is None or lb > best["epsilon_lower_bound"] or (lb == best["epsilon_lower_bound"] == 0 and correct / (2 * k) > best["correct"] / max(best["guesses"], 1)):
            best = {"epsilon_lower_bound": lb, "k": k, "correct": correct, "guesses": 2 * k}
    flagged = claimed_epsilon is not None and best["epsilon_lower_bound"] > claimed_epsilon
    return {
        "method": "one-run canary audit (Steinke, Nasr & Jagielski 2023), Dirac input canaries, production critic step",
        "canaries": m,
        "included": int(include.sum()),
        "steps": done,
        "noise_multiplier": noise_multiplier,
        "sample_rate": 1 / len(dl),
        "batch_size_expected": batch,
        "max_grad_norm": max_grad_norm,
        "confidence": confidence,
        "claimed_epsilon": claimed_epsilon,
        **best,
        "flagged": bool(flagged),
        "note": "a lower bound only: it can reveal broken noise or clipping, it cannot prove the claimed ε",
    }
