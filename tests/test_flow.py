"""The conditional vitals flow: exact likelihood, invertibility, masked missing values, DP step (real Opacus),
one accountant shared with the WGAN, the chained patient, and the budget split rule."""

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from opacus import PrivacyEngine

from dpsynth.cli import budget_view
from dpsynth.errors import ModelError, PrivacyParameterError
from dpsynth.generate import generate
from dpsynth.models.flow import ConditionalFlow, FlowConfig, PerSampleLoss, VitalsCodec, flow_step
from dpsynth.privacy.accountant import Mechanism, SiteAccountant, calibrate_noise, calibrate_split, split_sigmas
from dpsynth.schema import Schema, validate_frame
from dpsynth.train import CRITIC_MECHANISM, FLOW_MECHANISM, TrainConfig, load_model, train

LOG_2PI = math.log(2 * math.pi)


def randomised(flow: ConditionalFlow, seed: int = 0) -> ConditionalFlow:
    """Zero-initialised output layers make a fresh flow the identity; give every weight a random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return flow


def test_log_likelihood_on_a_hand_checkable_case():
    # one coupling over 2 dims, its output layer set so that s = (0, 0.5) (dim 1 transformed), t = (0, 1);
    # base: μ = (0.2, −0.1), log σ = (0.3, 0.0). Then z0 = (y0 − 0.2)/e^0.3, z1 = y1·e^0.5 + 1 + 0.1,
    # log p = log N(z0) + log N(z1) + 0.5 − 0.3.
    flow = ConditionalFlow(2, 1, FlowConfig(couplings=1, scale_clamp=100.0))
    (cp,) = flow.couplings
    assert cp.b.tolist() == [1.0, 0.0]
    with torch.no_grad():
        last = cp.net[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 0.5, 0.0, 1.0]))
        flow.base.weight.zero_()
        flow.base.bias.copy_(torch.tensor([0.2, -0.1, 0.3, 0.0]))
    y = torch.tensor([[0.7, -1.2]])
    obs, c = torch.ones(1, 2), torch.zeros(1, 1)
    s_eff = 100.0 * math.tanh(0.5 / 100.0)  # the soft clamp
    z0 = (0.7 - 0.2) / math.exp(0.3)
    z1 = -1.2 * math.exp(s_eff) + 1.0 + 0.1
    want = -0.5 * (z0**2 + z1**2) - LOG_2PI + s_eff - 0.3
    assert flow.log_prob(y, obs, c).item() == pytest.approx(want, rel=1e-6)


def test_log_likelihood_equals_change_of_variables_with_autograd_jacobian():
    torch.manual_seed(0)
    d, k = 5, 3
    flow = randomised(ConditionalFlow(d, k, FlowConfig(couplings=4, hidden=16)))
    c = torch.randn(1, k)
    obs = torch.ones(1, d)
    y = torch.randn(1, d)
    jac = torch.autograd.functional.jacobian(lambda v: flow.to_latent(v.unsqueeze(0), obs, c)[0][0], y[0])
    z, _ = flow.to_latent(y, obs, c)
    want = -0.5 * (z**2).sum() - 0.5 * d * LOG_2PI + torch.linalg.slogdet(jac)[1]
    assert flow.log_prob(y, obs, c).item() == pytest.approx(want.item(), rel=1e-5, abs=1e-5)


def test_masked_likelihood_is_an_exact_density_of_the_observed_dims():
    torch.manual_seed(1)
    d, k = 4, 2
    flow = randomised(ConditionalFlow(d, k, FlowConfig(couplings=4, hidden=16)), seed=3)
    obs = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    c = torch.randn(1, k)
    keep = [0, 2, 3]
    y = torch.tensor([[0.3, 0.0, -0.4, 1.1]])
    # the value in a missing slot is ignored
    y_junk = y.clone()
    y_junk[0, 1] = 7.0
    assert flow.log_prob(y, obs, c).item() == pytest.approx(flow.log_prob(y_junk, obs, c).item(), rel=1e-6)

    def f(v):
        full = torch.zeros(1, d)
        full[0, keep] = v
        return flow.to_latent(full, obs, c)[0][0, keep]

    jac = torch.autograd.functional.jacobian(f, y[0, keep])
    z = f(y[0, keep])
    want = -0.5 * (z**2).sum() - 0.5 * len(keep) * LOG_2PI + torch.linalg.slogdet(jac)[1]
    assert flow.log_prob(y, obs, c).item() == pytest.approx(want.item(), rel=1e-5, abs=1e-5)
    # and the missing dim never moves
    assert flow.to_latent(y, obs, c)[0][0, 1].item() == 0.0


def test_inverse_of_forward_is_identity():
    torch.manual_seed(2)
    d, k, n = 6, 5, 64
    # float64: six random couplings can scale by up to e^12, which float32 round-off would blur
    flow = randomised(ConditionalFlow(d, k, FlowConfig(couplings=6, hidden=32)), seed=5).double()
    obs = (torch.rand(n, d) > 0.2).double()
    c = torch.randn(n, k).double()
    y = torch.randn(n, d).double() * obs
    z, _ = flow.to_latent(y, obs, c)
    torch.testing.assert_close(flow.from_latent(z, obs, c), y, rtol=1e-9, atol=1e-9)
    z2 = torch.randn(n, d).double() * obs
    y2 = flow.from_latent(z2, obs, c)
    torch.testing.assert_close(flow.to_latent(y2, obs, c)[0], z2, rtol=1e-9, atol=1e-9)


def test_codec_bijection_keeps_samples_inside_the_public_bounds(schema):
    codec = VitalsCodec(schema)
    n = 1000
    y = np.random.default_rng(0).normal(0, 30, size=(n, codec.dim))  # far into the tails
    obs = np.ones((n, codec.dim))
    vals = codec.from_y(y, obs)
    for col in codec.columns:
        v = vals[col.name]
        assert ((v >= col.lower) & (v <= col.upper)).all(), col.name
        if col.integer:
            assert np.array_equal(v, np.round(v))
    # and the map round-trips observed values (non-integer column: exact up to float error)
    df = pd.DataFrame({c.name: [float(c.lower) + 0.37 * (float(c.upper) - float(c.lower))] for c in codec.columns})
    u = (df.to_numpy() - codec.lo) / (codec.hi - codec.lo)
    y1 = codec.to_y(torch.tensor(u, dtype=torch.float32), torch.ones(1, codec.dim)).numpy()
    back = codec.from_y(y1, np.ones((1, codec.dim)))
    for col in codec.columns:
        assert back[col.name][0] == pytest.approx(df[col.name][0], abs=0.5 if col.integer else 1e-3)


def test_dp_flow_step_with_no_noise_and_no_clipping_equals_plain_step(schema, small_df):
    torch.manual_seed(3)
    codec = VitalsCodec(schema)
    u, obs, c = (torch.from_numpy(a) for a in codec.encode(small_df))
    B = 256
    base = randomised(ConditionalFlow(codec.dim, codec.cond_dim, FlowConfig(couplings=4, hidden=16)), seed=7)
    batch = (u[:B], obs[:B], c[:B])
    plain = copy.deepcopy(base)
    flow_step(flow=plain, optimizer=torch.optim.SGD(plain.parameters(), lr=0.01), criterion=None, codec=codec,
              batch=batch, dequant=None, private=False)
    dp = copy.deepcopy(base)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(u[: 4 * B], obs[: 4 * B], c[: 4 * B]), batch_size=B)
    model, opt, crit, _ = PrivacyEngine().make_private(
        module=dp, optimizer=torch.optim.SGD(dp.parameters(), lr=0.01), criterion=PerSampleLoss(), data_loader=loader,
        noise_multiplier=0.0, max_grad_norm=1e6, grad_sample_mode="ghost")
    assert opt.expected_batch_size == B
    flow_step(flow=model, optimizer=opt, criterion=crit, codec=codec, batch=batch, dequant=None, private=True)

    def flat(m):
        return torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    assert not torch.equal(flat(plain), flat(base))
    torch.testing.assert_close(flat(dp), flat(plain), rtol=1e-4, atol=1e-6)


def test_dp_flow_step_clips_each_patient(schema, small_df):
    """σ = 0, tiny clip: the update is the sum of per-sample gradients each of norm ≤ C, over the batch size."""
    codec = VitalsCodec(schema)
    u, obs, c = (torch.from_numpy(a) for a in codec.encode(small_df))
    B, C = 128, 1e-3
    flow = randomised(ConditionalFlow(codec.dim, codec.cond_dim, FlowConfig(couplings=2, hidden=16)), seed=9)
    before = torch.cat([p.detach().reshape(-1) for p in flow.parameters()]).clone()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(u[: 4 * B], obs[: 4 * B], c[: 4 * B]), batch_size=B)
    model, opt, crit, _ = PrivacyEngine().make_private(
        module=flow, optimizer=torch.optim.SGD(flow.parameters(), lr=1.0), criterion=PerSampleLoss(),
        data_loader=loader, noise_multiplier=0.0, max_grad_norm=C, grad_sample_mode="ghost")
    flow_step(flow=model, optimizer=opt, criterion=crit, codec=codec, batch=(u[:B], obs[:B], c[:B]), dequant=None,
              private=True)
    after = torch.cat([p.detach().reshape(-1) for p in flow.parameters()])
    assert 0 < (after - before).norm().item() <= C * (1 + 1e-4)


# ------------------------------------------------------------------------------------------------
# the budget split rule
# ------------------------------------------------------------------------------------------------

def test_split_with_one_model_is_plain_calibration():
    one = calibrate_split(target_epsilon=2.0, delta=1e-5, parts=[("a", 0.05, 400, 1.0)])
    assert one == [calibrate_noise(target_epsilon=2.0, delta=1e-5, sample_rate=0.05, steps=400, mechanism="a")]


@pytest.mark.parametrize("shares", [(3.0, 1.0), (1.0, 1.0), (1.0, 4.0)])
def test_split_meets_the_target_tightly_and_follows_the_shares(shares):
    parts = [("dp-sgd:a", 1 / 12, 12 * 30, shares[0]), ("dp-sgd:b", 1 / 12, 12 * 20, shares[1])]
    prior = SiteAccountant([Mechanism("sel", 20.0, 1.0, 1)])
    sig = calibrate_split(target_epsilon=3.0, delta=1e-5, parts=parts, prior=prior)
    mechs = [Mechanism(n, s, q, t) for (n, q, t, _), s in zip(parts, sig)]
    total = prior.epsilon(1e-5, mechs)
    assert total <= 3.0 + 1e-9
    assert total > 3.0 * 0.97  # tight
    # the μ² (GDP) of each part is in the ratio of the shares
    mu2 = [q * q * t * math.expm1(1 / s**2) for (_, q, t, _), s in zip(parts, sig)]
    assert mu2[0] / mu2[1] == pytest.approx(shares[0] / shares[1], rel=1e-6)
    # a larger share buys a model less noise per step than the other, at equal steps
    assert split_sigmas(1.0, [(0.1, 100, 0.75), (0.1, 100, 0.25)])[0] < split_sigmas(1.0, [(0.1, 100, 0.75), (0.1, 100, 0.25)])[1]


def test_split_refuses_bad_shares():
    with pytest.raises(PrivacyParameterError):
        calibrate_split(target_epsilon=1.0, delta=1e-5, parts=[("a", 0.1, 10, 1.0), ("b", 0.1, 10, 0.0)])
    with pytest.raises(PrivacyParameterError):
        TrainConfig(budget_shares={"wgan": 1.0, "flow": -1.0})
    with pytest.raises(ModelError, match="--models"):
        TrainConfig(models=("flow",))


# ------------------------------------------------------------------------------------------------
# training and generation of the chained patient
# ------------------------------------------------------------------------------------------------

CFG = dict(epochs=2, batch_size=256, checkpoints=2, flow=FlowConfig(epochs=3, hidden=32, couplings=4))


@pytest.fixture(scope="module")
def chained(tmp_path_factory, small_df, schema):
    out = tmp_path_factory.mktemp("flow") / "model"
    res = train(small_df, schema, out=out, epsilon=2.0, delta=1e-5, config=TrainConfig(**CFG), progress=False)
    return out, res


def test_one_accountant_charges_both_models(chained):
    out, res = chained
    p = res.manifest["privacy"]
    assert res.manifest["models"] == ["wgan", "flow"]
    assert 1.8 < p["epsilon"] <= 2.0
    acc = SiteAccountant.from_state(json.loads((out / "accountant.json").read_text()))
    names = {m.mechanism for m in acc.history}
    assert {CRITIC_MECHANISM, FLOW_MECHANISM} <= names
    steps_per_epoch = math.ceil(res.manifest["data"]["rows"] / 256)
    assert sum(m.steps for m in acc.history if m.mechanism == FLOW_MECHANISM) == 3 * steps_per_epoch
    assert acc.epsilon(1e-5) == pytest.approx(p["epsilon"], rel=1e-9)
    # the WGAN alone would report less than the total: the flow's spend is not hidden
    wgan_only = SiteAccountant([m for m in acc.history if m.mechanism != FLOW_MECHANISM]).epsilon(1e-5)
    assert wgan_only < p["epsilon"] - 0.05
    assert p["models"]["flow"]["epsilon_alone"] > 0 and p["models"]["wgan"]["epsilon_alone"] < p["epsilon"]
    v = budget_view(str(out))
    assert FLOW_MECHANISM in {m["mechanism"] for m in v["mechanisms"]}
    assert v["epsilon_recomputed"] == pytest.approx(p["epsilon"])


def test_generated_vitals_come_from_the_flow_and_keep_the_record(chained, schema):
    out, _ = chained
    torch.manual_seed(0)
    with_flow, _ = generate(out, 400, seed=4)
    without, _ = generate(out, 400, seed=4, use_flow=False)
    validate_frame(with_flow, schema, "synthetic")
    cont = [c.name for c in schema.of_kind("continuous")]
    other = [c for c in schema.names if c not in cont and schema[c].kind != "identifier"]
    pd.testing.assert_frame_equal(with_flow[other], without[other])  # the record is the WGAN's
    for c in cont:  # missingness pattern from the record, values from the flow
        assert with_flow[c].isna().equals(without[c].isna())
        v = with_flow[c].dropna()
        assert ((v >= schema[c].lower) & (v <= schema[c].upper)).all()
    assert not with_flow[cont].fillna(-1).equals(without[cont].fillna(-1))


def test_flow_phase_resume_gives_the_same_epsilon(tmp_path, small_df, schema):
    cfg = TrainConfig(**CFG)
    full = train(small_df, schema, out=tmp_path / "full", epsilon=2.0, delta=1e-5, config=cfg, progress=False)

    def stop(epoch, acc):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(small_df, schema, out=tmp_path / "r", epsilon=2.0, delta=1e-5, config=cfg, progress=False,
              flow_epoch_callback=stop)
    assert not (tmp_path / "r" / "manifest.json").exists()
    res = train(small_df, schema, out=tmp_path / "r", epsilon=None, resume=True, progress=False)
    flow_steps = [m.steps for m in SiteAccountant.from_state(json.loads((tmp_path / "r" / "accountant.json").read_text())).history
                  if m.mechanism == FLOW_MECHANISM]
    assert sum(flow_steps) == full.manifest["privacy"]["models"]["flow"]["steps"]
    assert res.epsilon == pytest.approx(full.epsilon, rel=1e-9)
    load_model(tmp_path / "r")


def test_wgan_only_models_still_load_and_generate(tmp_path, small_df, schema):
    res = train(small_df, schema, out=tmp_path / "w", epsilon=2.0, delta=1e-5,
                config=TrainConfig(**{**CFG, "models": ("wgan",)}), progress=False)
    assert res.manifest["models"] == ["wgan"] and "flow.safetensors" not in res.manifest["files"]
    assert FLOW_MECHANISM not in {m["mechanism"] for m in res.manifest["privacy"]["mechanisms"]}
    syn, _ = generate(tmp_path / "w", 50, seed=0)
    validate_frame(syn, schema, "synthetic")


# ------------------------------------------------------------------------------------------------
# awkward data (documented handling)
# ------------------------------------------------------------------------------------------------

def test_all_missing_zero_variance_and_narrow_bounds_are_handled(tmp_path, small_df, schema):
    df = small_df.copy()
    df["hdl"] = np.nan  # all values missing at this site: nothing to learn, the column stays missing
    df["height"] = 170.0  # zero variance
    d = schema.to_json()
    for c in d["columns"]:
        if c["name"] == "weight":
            c["lower"], c["upper"] = 60, 90  # narrower than the data: clipped and counted
    narrow = Schema.from_json(d)
    df = validate_frame(df, narrow, "data")
    res = train(df, narrow, out=tmp_path / "m", epsilon=2.0, delta=1e-5, config=TrainConfig(**CFG), progress=False)
    assert res.manifest["data"]["clipped_values"]["weight"] > 0
    syn, _ = generate(tmp_path / "m", 300, seed=1)
    validate_frame(syn, narrow, "synthetic")
    w = syn["weight"].dropna()
    assert ((w >= 60) & (w <= 90)).all()
    assert np.isfinite(syn["height"].dropna()).all()
