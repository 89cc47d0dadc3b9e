"""Continuous columns ("vitals") of the chained patient: WGAN-only vs WGAN + conditional flow (issue 6).

NAFLD demo cohort; per continuous column KS statistic, mean and std error (relative to the public range)
against the training data, for
  (a) wgan-only: a WGAN trained alone with the whole ε; its own continuous columns
  (b) wgan+flow: the default chained model at the same total ε (budget split by TrainConfig.budget_shares);
      the WGAN's record, the flow's continuous values
at ε ∈ {3, 10, non-private}, 3 seeds, each run in its own subprocess. Column statistics are of the models'
raw output (``released`` repeats them after generation recomputes bmi). The bmi constraint is measured on the
models' raw output (before generation recomputes bmi from weight and height): share of rows violating
|bmi − w/h²| ≤ 5 % and the mean relative error. Reference rows: the holdout scored the same way.

    python bench/vitals.py [--eps 3 10 inf] [--seeds 0 1 2] [--n-synthetic 10000]
Targets at ε = 3: KS ≤ 0.08 for height and weight with the flow; flow better than WGAN-only on mean KS;
bmi constraint error lower than WGAN-only.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {"wgan-only": ("wgan",), "wgan+flow": ("wgan", "flow")}


def bmi_error(df, schema) -> dict:
    import numpy as np

    con = schema.constraints[0]
    c = con.columns
    ok = df[[c["bmi"], c["weight"], c["height"]]].notna().all(axis=1)
    w, h, b = (df.loc[ok, c[k]].astype(float) for k in ("weight", "height", "bmi"))
    expected = w / (h / 100.0) ** 2
    rel = (b - expected).abs() / expected
    bad, checked = con.violations(df)
    return {"violation_rate": bad / checked if checked else None, "mean_rel_error": float(np.mean(rel)) if len(rel) else None,
            "checked_rows": checked}


def column_stats(real, syn, schema) -> dict:
    from dpsynth.metrics.utility import vitals

    v = vitals(real, syn, schema)
    cols = {name: {k: c[k] for k in ("ks", "mean_abs_error_rel", "std_abs_error_rel", "wasserstein_rel", "missing_rate_diff")}
            for name, c in v["columns"].items()}
    return {"columns": cols, "mean_ks": v["summary"]["mean_ks"], "max_corr_diff": v["correlation"]["max_abs_diff"],
            "mean_corr_diff": v["correlation"]["mean_abs_diff"]}


def one_run(variant: str, eps: float, seed: int, data: Path, n_syn: int, shares: dict | None = None,
            flow: dict | None = None) -> dict:
    import warnings
    from dataclasses import replace

    import pandas as pd

    from _common import peak_rss_mb
    from dpsynth.data.demo import demo_schema
    from dpsynth.generate import generate
    from dpsynth.schema import validate_frame
    from dpsynth.train import TrainConfig, train

    warnings.filterwarnings("ignore")
    schema = demo_schema()
    real = validate_frame(pd.read_csv(data / "train.csv"), schema, "train")
    non_private = math.isinf(eps)
    cfg = TrainConfig(models=VARIANTS[variant])
    if shares:
        cfg.budget_shares = {**cfg.budget_shares, **shares}
    if flow:
        cfg.flow = replace(cfg.flow, **flow)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        res = train(real, schema, out=Path(tmp) / "m", epsilon=None if non_private else eps, delta=None, config=cfg,
                    non_private=non_private, seed=seed if non_private else None, progress=False)
        fit = time.time() - t
        raw, _ = generate(Path(tmp) / "m", n_syn, seed=seed, enforce_constraints=False)
        released, _ = generate(Path(tmp) / "m", n_syn, seed=seed)  # bmi recomputed from weight and height
    return {
        "variant": variant, "epsilon_target": None if non_private else eps, "epsilon_spent": res.epsilon, "seed": seed,
        "fit_seconds": fit, "peak_rss_mb": peak_rss_mb(),
        "noise": {k: v["noise_multiplier"] for k, v in res.manifest["privacy"]["models"].items()},
        **column_stats(real, raw, schema), "bmi_raw": bmi_error(raw, schema),
        "released": column_stats(real, released, schema),
    }


def summarise(runs: list[dict]) -> dict:
    import numpy as np

    def ms(vals):
        vals = [v for v in vals if v is not None]
        return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)} if vals else None

    out = {}
    for r in runs:
        key = f"{r['variant']} @ " + ("non-private" if r["epsilon_target"] is None else f"eps={r['epsilon_target']:g}")
        out.setdefault(key, []).append(r)
    summary = {}
    for key, rs in out.items():
        cols = rs[0]["columns"]
        summary[key] = {
            "runs": len(rs),
            "fit_seconds_mean": float(np.mean([r["fit_seconds"] for r in rs])),
            "mean_ks": ms([r["mean_ks"] for r in rs]),
            "max_corr_diff": ms([r["max_corr_diff"] for r in rs]),
            "bmi_violation_rate_raw": ms([r["bmi_raw"]["violation_rate"] for r in rs]),
            "bmi_mean_rel_error_raw": ms([r["bmi_raw"]["mean_rel_error"] for r in rs]),
            "columns": {c: {m: ms([r["columns"][c][m] for r in rs]) for m in ("ks", "mean_abs_error_rel", "std_abs_error_rel")}
                        for c in cols},
        }
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eps", nargs="+", type=float, default=[3.0, 10.0, math.inf])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--n-synthetic", type=int, default=10_000)
    ap.add_argument("--one", nargs=3, metavar=("VARIANT", "EPS", "SEED"))
    ap.add_argument("--data")
    ap.add_argument("--save", default="vitals", help="results/<name>.json")
    ap.add_argument("--keep-other-variants", action="store_true",
                    help="keep the runs of the variants not rerun from the existing results/<save>.json (e.g. rerun "
                         "only wgan+flow after a flow change: the wgan-only runs do not involve the flow)")
    ap.add_argument("--flow", help="FlowConfig overrides as JSON, e.g. '{\"max_grad_norm\": 5}' (default: FlowConfig's)")
    ap.add_argument("--shares", help="budget shares as JSON, e.g. '{\"wgan\": 1, \"flow\": 1}' (default: TrainConfig's)")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one_run(a.one[0], float(a.one[1]), int(a.one[2]), Path(a.data), a.n_synthetic,
                                 json.loads(a.shares) if a.shares else None, json.loads(a.flow) if a.flow else None)))
        return
    from _common import demo_frames, environment, save

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        data, schema, real, hold = demo_frames(tmp)
        reference = {**column_stats(real, hold, schema), "bmi_raw": bmi_error(hold, schema)}
        for eps in a.eps:
            for variant in a.variants:
                for seed in a.seeds:
                    cmd = [sys.executable, __file__, "--one", variant, str(eps), str(seed), "--data", str(data),
                           "--n-synthetic", str(a.n_synthetic)] + (["--shares", a.shares] if a.shares else []) + (["--flow", a.flow] if a.flow else [])
                    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
                    print(f"{variant} eps={eps} seed={seed}: fit {r['fit_seconds']:.0f}s mean KS {r['mean_ks']:.3f} "
                          f"height {r['columns']['height']['ks']:.3f} weight {r['columns']['weight']['ks']:.3f} "
                          f"bmi viol {r['bmi_raw']['violation_rate']:.3f}", file=sys.stderr)
                    runs.append(r)
    kept = []
    if a.keep_other_variants:
        from _common import RESULTS

        old = json.loads((RESULTS / f"{a.save}.json").read_text())
        kept = [r for r in old["runs"] if r["variant"] not in a.variants]
        for r in kept:
            r.setdefault("measured_utc", old["environment"]["time_utc"])
        runs = kept + runs
    summary = summarise(runs)
    f3, w3 = summary.get("wgan+flow @ eps=3"), summary.get("wgan-only @ eps=3")
    verdict = None
    if f3 and w3:
        verdict = {
            "height_ks_le_0.08": f3["columns"]["height"]["ks"]["mean"] <= 0.08,
            "weight_ks_le_0.08": f3["columns"]["weight"]["ks"]["mean"] <= 0.08,
            "flow_mean_ks_better": f3["mean_ks"]["mean"] < w3["mean_ks"]["mean"],
            "flow_bmi_error_lower": f3["bmi_mean_rel_error_raw"]["mean"] < w3["bmi_mean_rel_error_raw"]["mean"],
        }
    save(a.save, {
        "benchmark": "vitals",
        "dataset": "NAFLD demo cohort (train 70 %); statistics against the training data, synthetic n = "
                   f"{a.n_synthetic}",
        "holdout_reference": reference,
        "summary": summary,
        "targets_at_eps3": verdict,
        "budget_shares": json.loads(a.shares) if a.shares else "TrainConfig default",
        "flow_config": json.loads(a.flow) if a.flow else "FlowConfig default",
        "kept_runs": f"{len(kept)} runs of {sorted({r['variant'] for r in kept})} kept from the previous results" if kept else None,
        "runs": runs,
        "environment": environment(),
    })


if __name__ == "__main__":
    main()
