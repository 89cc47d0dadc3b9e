"""Utility of the 3-site federation vs one model trained centrally on the pooled data, at equal ε per site.

Federated: the exact site-side code the ClientApp runs (dpsynth.site.Site: per-site policy, σ calibrated
up front, reservation, local DP rounds) and the coordinator's FedAvg (server.strategy.fedavg, weighted by
expected batch counts), driven in one process — the transport (Flower) does not change the numbers.
Central: dpsynth.train.train on the pooled training data (the union of the three sites) at the same ε.
Both are scored with the same utility metrics against the pooled training data and the public holdout.

    python bench/federated_vs_central.py [--eps 3] [--seeds 0 1 2] [--rounds 20] [--local-epochs 6]
Target (issue 5): federated ≥ 95 % of central on the TSTR/TRTR AUROC ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def federated(data: Path, eps: float, rounds: int, local_epochs: int, batch: int, seed: int, n_syn: int,
              models: list[str]):
    import numpy as np
    import torch

    from dpsynth.generate import sample_patients
    from dpsynth.models.flow import FlowConfig, new_flow
    from dpsynth.models.wgan import Critic, Generator, WGANConfig
    from dpsynth.preprocess import Encoder
    from dpsynth.site import RunRequest, Site, SitePolicy
    from server.strategy import fedavg

    work = Path(tempfile.mkdtemp(prefix="fedbench-"))
    sites = [Site(work / s, name=s, data_path=data / f"site_{s}.csv", policy=SitePolicy(max_epsilon=eps, min_patients=100))
             for s in "abc"]
    req = RunRequest(run_id=f"bench-{seed}", epsilon=eps, rounds=rounds, local_epochs=local_epochs, batch_size=batch,
                     models=list(models))
    for s in sites:
        s.plan_run(req)
    w = WGANConfig()
    enc = Encoder(sites[0].schema)
    torch.manual_seed(seed)
    g = Generator(w.latent_dim, w.gen_hidden, enc.dim).state_dict()
    c = Critic(enc.dim, w.critic_hidden).state_dict()
    f = new_flow(sites[0].schema, enc, FlowConfig())[0].state_dict() if "flow" in models else None
    t = time.time()
    for r in range(1, rounds + 1):
        outs = [s.train_round(r, g, c, wgan=w, flow_state=f) for s in sites]
        weights = [o[2]["expected_batches"] for o in outs]
        g = fedavg([o[0] for o in outs], weights)
        c = fedavg([o[1] for o in outs], weights)
        if f is not None:
            f = fedavg([o[3] for o in outs], weights)
    fit = time.time() - t
    gen = Generator(w.latent_dim, w.gen_hidden, enc.dim)
    gen.load_state_dict(g)
    flow, codec = new_flow(sites[0].schema, enc, FlowConfig(), f) if f is not None else (None, None)
    df = sample_patients(sites[0].schema, enc, gen, w.latent_dim, n_syn, rng=np.random.default_rng(seed), flow=flow,
                         codec=codec)
    eps_sites = {s.name: s.accountant.epsilon(s.plan.delta) for s in sites}
    return df, fit, eps_sites


def central(data: Path, eps: float, seed: int, n_syn: int, models: list[str]):
    import pandas as pd

    from dpsynth.generate import generate
    from dpsynth.data.demo import demo_schema
    from dpsynth.schema import validate_frame
    from dpsynth.train import TrainConfig, train

    schema = demo_schema()
    df = validate_frame(pd.read_csv(data / "train.csv"), schema, "train.csv")
    out = Path(tempfile.mkdtemp(prefix="centralbench-")) / "model"
    t = time.time()
    res = train(df, schema, out=out, epsilon=eps, config=TrainConfig(models=tuple(models)), progress=False)
    fit = time.time() - t
    syn, _ = generate(out, n_syn, seed=seed)
    return syn, fit, res.epsilon


def main() -> int:
    import pandas as pd

    from _common import environment, save
    from dpsynth.data.demo import demo_schema, write_demo
    from dpsynth.metrics.utility import evaluate
    from dpsynth.schema import validate_frame

    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser()
    p.add_argument("--eps", type=float, default=3.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=6)  # 120 epochs per site, as many as the central model
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--n-syn", type=int, default=10000)
    p.add_argument("--models", default="wgan,flow", help="the same models on both sides (default: chained patient)")
    a = p.parse_args()
    data = Path(tempfile.mkdtemp(prefix="fedbench-data-"))
    write_demo(data)
    schema = demo_schema()
    real = validate_frame(pd.read_csv(data / "train.csv"), schema, "train")
    hold = validate_frame(pd.read_csv(data / "holdout.csv"), schema, "holdout")
    keys = ("tstr_trtr_auroc_ratio", "mean_apd", "correlation_distance")
    runs = []
    for seed in a.seeds:
        models = [m for m in a.models.split(",") if m]
        syn_f, fit_f, eps_f = federated(data, a.eps, a.rounds, a.local_epochs, a.batch_size, seed, a.n_syn, models)
        hf = evaluate(real, hold, syn_f, schema)["headline"]
        syn_c, fit_c, eps_c = central(data, a.eps, seed, a.n_syn, models)
        hc = evaluate(real, hold, syn_c, schema)["headline"]
        runs.append({"seed": seed, "federated": {**{k: hf.get(k) for k in keys}, "fit_seconds": round(fit_f, 1),
                                                  "site_epsilon": eps_f},
                     "central": {**{k: hc.get(k) for k in keys}, "fit_seconds": round(fit_c, 1), "epsilon": eps_c}})
        print(runs[-1], flush=True)
    import numpy as np

    def mean(side, k):
        v = [r[side][k] for r in runs if r[side][k] is not None]
        return float(np.mean(v)) if v else None

    summary = {s: {k: mean(s, k) for k in keys} for s in ("federated", "central")}
    ratio = (summary["federated"]["tstr_trtr_auroc_ratio"] / summary["central"]["tstr_trtr_auroc_ratio"]
             if summary["central"]["tstr_trtr_auroc_ratio"] else None)
    save("federated_vs_central", {
        "benchmark": "3-site federation vs central DP-WGAN at equal ε per site (NAFLD demo cohort)",
        "epsilon_per_site": a.eps, "models": a.models, "rounds": a.rounds, "local_epochs": a.local_epochs, "batch_size": a.batch_size,
        "runs": runs, "mean": summary, "federated_over_central_tstr": ratio, "target": 0.95,
        "meets_target": ratio is not None and ratio >= 0.95, "environment": environment(),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
