"""The DP critic step, with real Opacus: noise scale, equality with the non-DP step, the fake term survives."""

import copy

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine

from dpsynth.models.wgan import Critic, RealTermLoss, critic_step_dp, critic_step_plain, fake_term_grads

D = 12
N = 2048
B = 512  # expected batch size: q = 1/4, int(N*q) = B


def make_dp(critic, sigma, clip, lr=0.1, seed=0):
    opt = torch.optim.SGD(critic.parameters(), lr=lr)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(N, D)), batch_size=B)
    gen = torch.Generator().manual_seed(seed)
    model, dpopt, crit, _ = PrivacyEngine().make_private(
        module=critic, optimizer=opt, criterion=RealTermLoss(), data_loader=dl, noise_multiplier=sigma,
        max_grad_norm=clip, grad_sample_mode="ghost", noise_generator=gen,
    )
    assert dpopt.expected_batch_size == B
    return model, dpopt, crit


def flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def test_dp_step_with_no_noise_and_no_clipping_equals_plain_step():
    torch.manual_seed(0)
    base = Critic(D, 64)
    real = torch.rand(B, D)
    fake = torch.rand(B, D)
    plain = copy.deepcopy(base)
    critic_step_plain(critic=plain, optimizer=torch.optim.SGD(plain.parameters(), lr=0.1), real=real, fake=fake, gp_weight=10.0)
    dp = copy.deepcopy(base)
    model, opt, crit = make_dp(dp, sigma=0.0, clip=1e6)
    critic_step_dp(critic=model, optimizer=opt, criterion=crit, real=real, fake=fake, gp_weight=10.0)
    assert not torch.equal(flat(plain), flat(base))  # something happened
    torch.testing.assert_close(flat(dp), flat(plain), rtol=1e-4, atol=1e-6)


def test_fake_term_gradient_reaches_critic_in_dp_mode():
    torch.manual_seed(1)
    base = Critic(D, 64)
    fake = torch.rand(B, D)
    expected, _ = fake_term_grads(base, fake, 10.0)
    dp = copy.deepcopy(base)
    model, opt, crit = make_dp(dp, sigma=0.0, clip=1.0, lr=1.0)
    before = flat(dp).clone()
    # empty real batch: the private part of the update is exactly zero, only the fake term moves the critic
    critic_step_dp(critic=model, optimizer=opt, criterion=crit, real=torch.zeros(0, D), fake=fake, gp_weight=10.0)
    delta = before - flat(dp)
    want = torch.cat([g.reshape(-1) for g in expected])
    assert want.abs().sum() > 0
    torch.testing.assert_close(delta, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sigma,clip", [(1.0, 1.0), (2.5, 0.5)])
def test_noise_has_the_variance_dp_sgd_promises(sigma, clip):
    """Zero private gradient: the update minus the (deterministic) fake term is pure noise N(0, (σC/B)²)."""
    torch.manual_seed(2)
    base = Critic(D, 256)  # ~36k parameters → the std estimate is accurate to well under 1 %
    fake = torch.rand(B, D)
    fake_grads, _ = fake_term_grads(base, fake, 10.0)
    dp = copy.deepcopy(base)
    model, opt, crit = make_dp(dp, sigma=sigma, clip=clip, lr=1.0, seed=123)
    before = flat(dp).clone()
    critic_step_dp(critic=model, optimizer=opt, criterion=crit, real=torch.zeros(0, D), fake=fake, gp_weight=10.0)
    noise = (before - flat(dp)) - torch.cat([g.reshape(-1) for g in fake_grads])
    noise = noise.double().numpy()
    expected_std = sigma * clip / B
    n = noise.size
    # sample std of n normals: relative s.e. ≈ 1/sqrt(2n) ≈ 0.4 %; allow 5 s.e.
    assert abs(noise.std() / expected_std - 1) < 5 / np.sqrt(2 * n)
    assert abs(noise.mean()) < 5 * expected_std / np.sqrt(n)
    # and it is Gaussian: kurtosis ≈ 3
    k = ((noise - noise.mean()) ** 4).mean() / noise.var() ** 2
    assert abs(k - 3) < 0.15


def test_per_sample_clipping_bounds_each_patient_influence():
    """With σ = 0 a single real record moves the critic by at most C/B (plus the fake term). In float64: the
    move is weights-before minus weights-after, and in float32 that difference alone carries a rounding error of
    a few 1e-4 of C/B (it read 1.0002 × C/B on an AVX2-only CPU, where the float32 kernels round differently)."""
    torch.manual_seed(3)
    base = Critic(D, 64).double()
    fake = torch.rand(B, D, dtype=torch.float64)
    fake_grads, _ = fake_term_grads(base, fake, 0.0)
    dp = copy.deepcopy(base)
    clip = 0.01
    model, opt, crit = make_dp(dp, sigma=0.0, clip=clip, lr=1.0)
    before = flat(dp).clone()
    outlier = torch.full((1, D), 50.0, dtype=torch.float64)  # a huge record: unclipped its gradient would be enormous
    critic_step_dp(critic=model, optimizer=opt, criterion=crit, real=outlier, fake=fake, gp_weight=0.0)
    private = (before - flat(dp)) - torch.cat([g.reshape(-1) for g in fake_grads])
    assert private.norm() <= clip / B * 1.0001
    assert private.norm() > 0.5 * clip / B


def test_per_sample_norms_of_the_fake_term_match_explicit_per_sample_gradients():
    from dpsynth.models.wgan import _per_sample_grad_norms

    torch.manual_seed(4)
    c = Critic(D, 32)
    x = torch.rand(16, D)
    want = []
    for i in range(len(x)):
        g = torch.autograd.grad(c(x[i : i + 1]).sum(), list(c.parameters()))
        want.append(torch.sqrt(sum((gi**2).sum() for gi in g)))
    torch.testing.assert_close(_per_sample_grad_norms(c, x), torch.stack(want), rtol=1e-5, atol=1e-6)


def test_clipped_fake_term_bounds_each_fake_record():
    """With fake clipping, one extreme fake record moves the critic by at most C/B through the D(fake) term."""
    torch.manual_seed(5)
    c = Critic(D, 32)
    fake = torch.rand(B, D)
    fake[0] = 1e3
    base, _ = fake_term_grads(c, fake[1:], 0.0, clip=1.0)
    full, _ = fake_term_grads(c, fake, 0.0, clip=1.0)
    # mean over B vs B-1 records: rescale the B-1 term to compare the single record's contribution
    one = torch.cat([(f - b * (B - 1) / B).reshape(-1) for f, b in zip(full, base)])
    assert one.norm() <= 1.0 / B * 1.001
