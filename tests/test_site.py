"""Site-side budget governance (dpsynth.site, no Flower): policy, calibration, reservation, restart."""

from __future__ import annotations

import json

import pytest

from dpsynth.errors import BudgetExceededError, PrivacyParameterError
from dpsynth.models.text import TextConfig
from dpsynth.models.wgan import WGANConfig
from dpsynth.privacy.ledger import Ledger
from dpsynth.site import RunRequest, Site, SitePolicy, SitePolicyError, local_dp_round

SMALL = WGANConfig(latent_dim=16, gen_hidden=32, critic_hidden=32)


def _site(tmp_path, demo_dir, cap=2.0, name="a", **pol):
    policy = SitePolicy(max_epsilon=cap, min_patients=100, name=f"test-{name}", **pol)
    return Site(tmp_path / f"site_{name}", name=name, data_path=demo_dir / f"site_{name}.csv", policy=policy)


def _req(run_id="r1", epsilon=50.0, rounds=2, local_epochs=1, batch_size=512, models=("wgan",)):
    return RunRequest(run_id=run_id, epsilon=epsilon, rounds=rounds, local_epochs=local_epochs,
                      batch_size=batch_size, models=list(models))


def test_policy_file_is_parsed_and_unknown_keys_are_refused(tmp_path):
    p = tmp_path / "policy.toml"
    p.write_text('max_epsilon = 2.5\nallowed_models = ["wgan"]\nmin_patients = 300\n')
    pol = SitePolicy.load(p)
    assert pol.max_epsilon == 2.5 and pol.min_patients == 300 and pol.allowed_models == ["wgan"]
    p.write_text("max_epsilon = 2.5\nmax_epsilonn = 100\n")
    with pytest.raises(SitePolicyError, match="unknown keys"):
        SitePolicy.load(p)
    p.write_text("min_patients = 3\n")
    with pytest.raises(SitePolicyError, match="max_epsilon is required"):
        SitePolicy.load(p)


def test_greedy_request_is_capped_by_the_site_policy(tmp_path, demo_dir):
    site = _site(tmp_path, demo_dir, cap=2.0)
    plan = site.plan_run(_req(epsilon=50.0))
    assert plan.epsilon == 2.0 and plan.requested_epsilon == 50.0 and plan.policy_cap == 2.0
    acc = site.accountant
    from dpsynth.privacy.accountant import Mechanism
    from dpsynth.train import CRITIC_MECHANISM

    full = acc.epsilon(plan.delta, [Mechanism(CRITIC_MECHANISM, plan.noise_multiplier, plan.sample_rate, plan.planned_steps)])
    assert full <= 2.0 * (1 + 1e-6)  # calibrated up front for rounds × local epochs
    assert full > 1.9  # and not wastefully over-noised


def test_disallowed_model_and_too_few_patients_are_refused(tmp_path, demo_dir):
    site = _site(tmp_path, demo_dir)
    with pytest.raises(SitePolicyError, match="not allowed"):
        site.plan_run(_req(models=("wgan", "text")))
    wgan_only = _site(tmp_path / "w", demo_dir, allowed_models=["wgan"])  # a hospital that keeps vitals out
    with pytest.raises(SitePolicyError, match="not allowed"):
        wgan_only.plan_run(_req(models=("wgan", "flow")))
    site2 = Site(tmp_path / "s2", name="a", data_path=demo_dir / "site_a.csv",
                 policy=SitePolicy(max_epsilon=2.0, min_patients=10**6))
    with pytest.raises(SitePolicyError, match="below the site policy's minimum"):
        site2.plan_run(_req())
    assert [e["event"] for e in Ledger(tmp_path / "s2" / "ledger.jsonl").entries()] == ["refused"]


def test_reservation_charges_before_training_and_refuses_past_the_cap(tmp_path, demo_dir):
    site = _site(tmp_path, demo_dir, cap=2.0)
    plan = site.plan_run(_req(rounds=2))
    r1 = site.reserve(1)
    # the charge is on disk before any step is taken
    on_disk = json.loads((tmp_path / "site_a" / "state.json").read_text())
    assert sum(m["steps"] for m in on_disk["accountant"]["history"]) == plan.steps_per_round
    site.complete(r1, plan.steps_per_round, 0.1)
    site.reserve(2)
    # a third round (a greedy coordinator sending more rounds than planned) would cross the cap
    with pytest.raises(BudgetExceededError, match="would bring ε"):
        site.reserve(3)
    events = [e["event"] for e in site.ledger.entries()]
    assert events == ["plan", "reserve", "round-complete", "reserve", "refused"]
    site.ledger.verify()
    assert site.accountant.epsilon(plan.delta) <= 2.0 * (1 + 1e-6)


def test_restarted_site_resumes_its_spent_budget(tmp_path, demo_dir):
    site = _site(tmp_path, demo_dir, cap=2.0)
    plan = site.plan_run(_req(run_id="run-1", rounds=3))
    site.reserve(1)  # then the process dies (no complete): the reservation stays charged
    mirrored = site.state_dict()
    again = _site(tmp_path, demo_dir, cap=2.0)  # a new process reads the site directory
    assert again.accountant.total_steps == plan.steps_per_round
    assert again.plan.run_id == "run-1" and again.plan.noise_multiplier == plan.noise_multiplier
    again.check_against(mirrored)
    # the same run continues with the same calibration; a new run starts from the spent budget
    assert again.plan_run(_req(run_id="run-1", rounds=3)).noise_multiplier == plan.noise_multiplier
    new = again.plan_run(_req(run_id="run-2", rounds=3))
    assert new.prior_epsilon > 0 and new.noise_multiplier > plan.noise_multiplier


def test_a_rolled_back_site_file_is_detected(tmp_path, demo_dir):
    site = _site(tmp_path, demo_dir)
    site.plan_run(_req())
    site.reserve(1)
    mirrored = site.state_dict()
    (tmp_path / "site_a" / "state.json").unlink()
    (tmp_path / "site_a" / "ledger.jsonl").unlink()
    fresh = _site(tmp_path, demo_dir)
    with pytest.raises(BudgetExceededError, match="rolled back"):
        fresh.check_against(mirrored)


def test_site_whose_spend_reaches_its_cap_refuses_a_new_run(tmp_path, demo_dir):
    site = _site(tmp_path, demo_dir, cap=1.0)
    site.plan_run(_req(run_id="r1", rounds=1, epsilon=1.0))
    site.reserve(1)
    # the hospital tightens its policy: what it already spent is above the new cap, nothing more is trained
    with pytest.raises(BudgetExceededError, match="reaches the cap"):
        _site(tmp_path, demo_dir, cap=0.5).plan_run(_req(run_id="r2", rounds=1, epsilon=1.0))


def test_one_local_round_trains_from_given_weights_within_the_reserved_steps(tmp_path, demo_dir):
    from dpsynth.models.wgan import Critic, Generator
    from dpsynth.preprocess import Encoder

    from dpsynth.models.flow import ConditionalFlow, FlowConfig, VitalsCodec
    from dpsynth.train import CRITIC_MECHANISM, FLOW_MECHANISM

    site = _site(tmp_path, demo_dir, cap=2.0)
    site.plan_run(_req(rounds=2, local_epochs=1, models=("wgan", "flow")))
    assert site.plan.flow_noise_multiplier is not None
    enc = Encoder(site.schema)
    g0 = Generator(SMALL.latent_dim, SMALL.gen_hidden, enc.dim).state_dict()
    c0 = Critic(enc.dim, SMALL.critic_hidden).state_dict()
    codec = VitalsCodec(site.schema, enc)
    f0 = ConditionalFlow(codec.dim, codec.cond_dim, FlowConfig()).state_dict()
    g, c, report, f, t = site.train_round(1, g0, c0, wgan=SMALL, flow_state=f0, seed=1)
    assert t is None  # no note model planned
    assert set(g) == set(g0) and set(c) == set(c0) and set(f) == set(f0)
    assert any(not (g[k] == g0[k]).all() for k in g)
    assert any(not (f[k] == f0[k]).all() for k in f)  # the flow trained from the coordinator's weights
    assert report["steps_round"] <= report["expected_batches"] == site.plan.steps_per_round
    assert 0 < report["flow_steps_round"] <= site.plan.steps_per_round
    # one accountant: both mechanisms charged for the round before it ran, ε within the cap
    acc = site.accountant
    for mech in (CRITIC_MECHANISM, FLOW_MECHANISM):
        assert sum(m.steps for m in acc.history if m.mechanism == mech) == site.plan.steps_per_round
    assert 0 < report["epsilon"] <= 2.0
    assert report["ledger_head"] == site.ledger.head()
    train, hold = site.frames()
    x, _ = enc.transform(train)
    _, _, steps, _ = local_dp_round(x=x, encoder=enc, generator_state=g, critic_state=c, wgan=SMALL, epochs=5,
                                    batch_size=256, noise_multiplier=1.0, max_grad_norm=1.0, max_steps=3, seed=0)
    assert steps == 3  # never beyond what was reserved


def test_site_split_is_deterministic_and_disjoint(tmp_path, demo_dir):
    a = _site(tmp_path, demo_dir).frames()
    b = _site(tmp_path, demo_dir).frames()
    assert a[0].equals(b[0]) and a[1].equals(b[1])
    ids_train, ids_hold = set(a[0]["id"]), set(a[1]["id"])
    assert not ids_train & ids_hold and len(a[1]) > 0


# ---- the note model (issue 7) ------------------------------------------------------------------------

TINY_TEXT = TextConfig(d_model=32, layers=1, heads=4, max_len=96, batch_size=400, epochs=2)
NOTES_OK = {"allowed_models": ["wgan", "flow", "text"], "allow_notes": True}


@pytest.fixture(scope="module")
def notes_dir(tmp_path_factory):
    """The demo sites with the rendered demo notes (dpsynth demo-data --notes)."""
    from dpsynth.data.demo import write_demo

    d = tmp_path_factory.mktemp("demo_notes")
    write_demo(d, notes=True)
    return d


def _text_req(**kw):
    kw = {"models": ("wgan", "text"), **kw}
    return RunRequest(run_id=kw.pop("run_id", "t1"), epsilon=kw.pop("epsilon", 50.0), rounds=kw.pop("rounds", 2),
                      local_epochs=1, batch_size=512, models=list(kw.pop("models")),
                      text_epochs=kw.pop("text_epochs", TINY_TEXT.epochs),
                      text_batch_size=kw.pop("text_batch_size", TINY_TEXT.batch_size), **kw)


def test_note_model_is_planned_reserved_and_trained_in_the_same_round(tmp_path, notes_dir):
    import math

    from dpsynth.models.text import NoteLM, NoteTokenizer
    from dpsynth.models.wgan import Critic, Generator
    from dpsynth.preprocess import Encoder
    from dpsynth.privacy.accountant import Mechanism
    from dpsynth.site import local_text_round
    from dpsynth.train import CRITIC_MECHANISM, TEXT_MECHANISM

    site = _site(tmp_path, notes_dir, cap=2.0, name="b", **NOTES_OK)
    plan = site.plan_run(_text_req())
    train, _ = site.frames()
    n_notes = int(train["note"].notna().sum())
    t_spe = math.ceil(n_notes / TINY_TEXT.batch_size)
    # its own Poisson rate over the patients with a note, its steps spread over the rounds
    assert plan.text_sample_rate == 1.0 / t_spe and plan.text_steps_per_epoch == t_spe
    assert plan.text_steps_per_round == math.ceil(TINY_TEXT.epochs * t_spe / 2)
    assert plan.text_planned_steps == 2 * plan.text_steps_per_round
    assert plan.text_noise_multiplier is not None and plan.flow_noise_multiplier is None
    # both mechanisms calibrated together within the cap; the exact note count never leaves (only ⌈n_notes/batch⌉)
    full = site.accountant.epsilon(plan.delta, [
        Mechanism(CRITIC_MECHANISM, plan.noise_multiplier, plan.sample_rate, plan.planned_steps),
        Mechanism(TEXT_MECHANISM, plan.text_noise_multiplier, plan.text_sample_rate, plan.text_planned_steps)])
    assert 1.9 < full <= 2.0 * (1 + 1e-6)
    assert n_notes not in [v for k, v in plan.public().items() if k.startswith("text")]

    enc = Encoder(site.schema)
    g0 = Generator(SMALL.latent_dim, SMALL.gen_hidden, enc.dim).state_dict()
    c0 = Critic(enc.dim, SMALL.critic_hidden).state_dict()
    tok = NoteTokenizer.from_schema(site.schema, max_len=TINY_TEXT.max_len)
    t0 = NoteLM.for_tokenizer(tok, TINY_TEXT).state_dict()
    _, _, report, f, t = site.train_round(1, g0, c0, wgan=SMALL, text_state=t0, text_config=TINY_TEXT, seed=3)
    assert f is None and set(t) == set(t0) and any(not (t[k] == t0[k]).all() for k in t)
    assert report["text_steps_round"] == report["text_expected_batches"] == plan.text_steps_per_round
    assert len(report["text_nll"]) >= 1 and all(math.isfinite(v) for v in report["text_nll"])
    # one accountant: the note model's mechanism charged (before the round) with its own σ and q
    text_mechs = [m for m in site.accountant.history if m.mechanism == TEXT_MECHANISM]
    assert [(m.noise_multiplier, m.sample_rate, m.steps) for m in text_mechs] == [
        (plan.text_noise_multiplier, plan.text_sample_rate, plan.text_steps_per_round)]
    done = [e["data"] for e in site.ledger.entries() if e["event"] == "round-complete"]
    assert done[-1]["text_steps_taken"] == done[-1]["text_steps_reserved"] == plan.text_steps_per_round
    assert site.dp_facts()["text_steps"] == plan.text_steps_per_round
    assert 0 < report["epsilon"] <= 2.0
    # never a step beyond what was reserved, even when more passes over the notes would fit
    _, steps, losses = local_text_round(df=train, schema=site.schema, column="note", text_state=t, config=TINY_TEXT,
                                        batch_size=TINY_TEXT.batch_size, sample_rate=plan.text_sample_rate,
                                        noise_multiplier=1.0, max_grad_norm=1.0, max_steps=2, seed=0)
    assert steps == 2 and len(losses) == 1


def test_a_site_that_does_not_allow_notes_refuses_the_note_model(tmp_path, notes_dir):
    with pytest.raises(SitePolicyError, match="allow_notes is false"):  # a contradictory policy is refused
        SitePolicy(max_epsilon=2.0, allowed_models=["wgan", "text"], allow_notes=False)
    p = tmp_path / "policy.toml"
    p.write_text('max_epsilon = 2.0\nallowed_models = ["wgan", "flow", "text"]\n')  # allow_notes defaults to false
    with pytest.raises(SitePolicyError, match="allow_notes"):
        SitePolicy.load(p)
    site = _site(tmp_path, notes_dir, name="b")  # the default: notes never train a model
    with pytest.raises(SitePolicyError, match="allow_notes = false"):
        site.plan_run(_text_req())
    assert [e["event"] for e in site.ledger.entries()] == ["refused"] and site.accountant.total_steps == 0
    notes_but_no_model = _site(tmp_path / "n", notes_dir, name="b", allow_notes=True)
    with pytest.raises(SitePolicyError, match=r"\['text'\] are not allowed"):
        notes_but_no_model.plan_run(_text_req())


def test_a_site_without_the_note_column_refuses_the_note_model_naming_it(tmp_path, notes_dir, demo_dir):
    import pandas as pd

    from dpsynth.errors import DataError

    d = tmp_path / "data"
    d.mkdir()
    (d / "schema.json").write_text((notes_dir / "schema.json").read_text())
    pd.read_csv(notes_dir / "site_b.csv").drop(columns="note").to_csv(d / "site_b.csv", index=False)
    site = _site(tmp_path, d, name="b", **NOTES_OK)
    with pytest.raises(DataError, match="the note column 'note' .* is missing from .*site_b.csv"):
        site.plan_run(_text_req())
    assert site.ledger.entries()[-1]["event"] == "refused" and site.accountant.total_steps == 0
    # a schema without a text column: the note model cannot be conditioned, the site says why
    plain = _site(tmp_path / "p", demo_dir, name="b", **NOTES_OK)
    with pytest.raises(SitePolicyError, match="exactly one column of kind 'text'"):
        plain.plan_run(_text_req())
    # the column is there but no patient has a note
    empty = pd.read_csv(notes_dir / "site_b.csv")
    empty["note"] = None
    empty.to_csv(d / "site_b.csv", index=False)
    with pytest.raises(DataError, match="only 0 training patients have a note in column 'note'"):
        _site(tmp_path / "e", d, name="b", **NOTES_OK).plan_run(_text_req())


def test_coordinator_budget_shares_split_the_site_budget(tmp_path, demo_dir):
    """run-config budget-shares reach the site's plan: the privacy loss (μ²) splits in their ratio, the total
    still meets the site's cap; bad shares are refused by name at the coordinator and at the site."""
    import math

    from dpsynth.privacy.accountant import Mechanism
    from dpsynth.train import CRITIC_MECHANISM, FLOW_MECHANISM
    from server.app import ConsortiumError, RunSettings

    site = _site(tmp_path, demo_dir, cap=3.0)
    req = _req(run_id="shares", epsilon=3.0, models=("wgan", "flow"))
    req.budget_shares = {"wgan": 3.0, "flow": 1.0}
    plan = site.plan_run(req)
    mu2 = [plan.sample_rate ** 2 * plan.planned_steps * math.expm1(1 / s ** 2)
           for s in (plan.noise_multiplier, plan.flow_noise_multiplier)]
    assert mu2[0] / mu2[1] == pytest.approx(3.0, rel=1e-6) and plan.budget_shares == {"wgan": 3.0, "flow": 1.0}
    total = site.accountant.epsilon(plan.delta, [
        Mechanism(CRITIC_MECHANISM, plan.noise_multiplier, plan.sample_rate, plan.planned_steps),
        Mechanism(FLOW_MECHANISM, plan.flow_noise_multiplier, plan.sample_rate, plan.planned_steps)])
    assert 2.9 < total <= 3.0 * (1 + 1e-6)
    assert RunSettings.from_run_config({"budget-shares": "wgan=2,text=0.5"}).budget_shares == "wgan=2,text=0.5"
    for bad, msg in [("wgan=0", "positive"), ("critic=1", "unknown model 'critic'"), ("wgan", "name=number")]:
        with pytest.raises(ConsortiumError, match=msg):
            RunSettings.from_run_config({"budget-shares": bad})
    with pytest.raises(PrivacyParameterError, match="budget share"):
        RunRequest(run_id="x", epsilon=1.0, rounds=1, local_epochs=1, batch_size=256, models=["wgan"],
                   budget_shares={"wgan": -1.0})
