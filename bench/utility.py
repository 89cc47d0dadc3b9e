"""Utility of the DP-WGAN on the NAFLD demo cohort at ε ∈ {1, 3, 10, non-private}, several seeds.

Every metric of the utility report (dimension-wise, correlation, latent clusters, concept abundance,
constraint violations, TSTR/TRTR AUROC, SHAP overlap), with fit wall time and peak memory per run (each run
in its own subprocess). Real-data reference rows: the holdout scored as if it were synthetic.

    python bench/utility.py [--eps 1 3 10 inf] [--seeds 0 1 2] [--epochs N]
Targets at ε = 3 (issue 9): TSTR/TRTR ≥ 0.93, mean APD ≤ 0.01, correlation distance ≤ 0.06, constraint
violations no worse than non-private, fit ≤ 60 s on 2 cores.
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


def one_run(eps: float, seed: int, data: Path, epochs: int | None, n_syn: int) -> dict:
    import warnings

    import pandas as pd

    from _common import peak_rss_mb
    from dpsynth.data.demo import demo_schema
    from dpsynth.generate import generate
    from dpsynth.metrics.utility import evaluate
    from dpsynth.schema import validate_frame
    from dpsynth.train import TrainConfig, train

    warnings.filterwarnings("ignore")
    schema = demo_schema()
    real = validate_frame(pd.read_csv(data / "train.csv"), schema, "train")
    hold = validate_frame(pd.read_csv(data / "holdout.csv"), schema, "holdout")
    cfg = TrainConfig() if epochs is None else TrainConfig(epochs=epochs)
    non_private = math.isinf(eps)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        res = train(real, schema, out=Path(tmp) / "m", epsilon=None if non_private else eps, delta=None,
                    config=cfg, non_private=non_private, seed=seed, progress=False)
        fit = time.time() - t
        syn, _ = generate(Path(tmp) / "m", n_syn, seed=seed)
    syn = validate_frame(syn, schema, "synthetic")
    t = time.time()
    ev = evaluate(real, hold, syn, schema)
    return {
        "epsilon_target": None if non_private else eps,
        "epsilon_spent": res.epsilon,
        "delta": res.delta,
        "seed": seed,
        "fit_seconds": fit,
        "evaluate_seconds": time.time() - t,
        "peak_rss_mb": peak_rss_mb(),
        "metrics": ev["headline"],
        "trtr_auroc": ev["metrics"]["tstr_trtr_auroc_ratio"]["detail"]["trtr_auroc"],
        "tstr_auroc": ev["metrics"]["tstr_trtr_auroc_ratio"]["detail"]["tstr_auroc"],
        "selected_epoch": res.manifest["training"]["selected_epoch"],
        "real_constraint_violation_rate": ev["metrics"]["constraint_violation_rate"]["detail"]["bmi"]["real_rate"],
    }


def summarise(runs: list[dict]) -> dict:
    import numpy as np

    out = {}
    for key in sorted({str(r["epsilon_target"]) for r in runs}):
        rs = [r for r in runs if str(r["epsilon_target"]) == key]
        agg = {"runs": len(rs), "fit_seconds_mean": float(np.mean([r["fit_seconds"] for r in rs])),
               "fit_seconds_median": float(np.median([r["fit_seconds"] for r in rs])),
               "peak_rss_mb_max": float(max(r["peak_rss_mb"] for r in rs))}
        for m in rs[0]["metrics"]:
            vals = [r["metrics"][m] for r in rs if r["metrics"][m] is not None]
            if vals:
                agg[m] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "min": float(np.min(vals)), "max": float(np.max(vals))}
        out["non-private" if key == "None" else f"eps={key}"] = agg
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eps", nargs="+", type=float, default=[1.0, 3.0, 10.0, math.inf])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--n-synthetic", type=int, default=10_000)
    ap.add_argument("--one", nargs=2, metavar=("EPS", "SEED"))
    ap.add_argument("--data")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one_run(float(a.one[0]), int(a.one[1]), Path(a.data), a.epochs, a.n_synthetic)))
        return
    from _common import demo_frames, environment, save
    from dpsynth.metrics.utility import evaluate

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        data, schema, real, hold = demo_frames(tmp)
        reference = evaluate(real, hold, hold, schema)["headline"]
        for eps in a.eps:
            for seed in a.seeds:
                cmd = [sys.executable, __file__, "--one", str(eps), str(seed), "--data", str(data),
                       "--n-synthetic", str(a.n_synthetic)] + (["--epochs", str(a.epochs)] if a.epochs else [])
                out = subprocess.run(cmd, check=True, capture_output=True, text=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"eps={eps} seed={seed}: fit {r['fit_seconds']:.1f}s " +
                      ", ".join(f"{k}={v:.4f}" for k, v in r["metrics"].items() if v is not None), file=sys.stderr)
                runs.append(r)
    save("utility", {
        "benchmark": "utility",
        "dataset": "NAFLD demo cohort (train 70 %, holdout 30 %)",
        "holdout_as_synthetic_reference": reference,
        "summary": summarise(runs),
        "runs": runs,
        "targets_at_eps3": {"tstr_trtr_auroc_ratio_min": 0.93, "mean_apd_max": 0.01, "correlation_distance_max": 0.06,
                            "fit_seconds_max": 60},
        "environment": environment(),
    })


if __name__ == "__main__":
    main()
