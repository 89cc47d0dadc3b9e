"""The gate's verdicts on the NAFLD cohort for: the training rows themselves (positive control), an
independent draw (half of the holdout, audited against the other half: negative control), and DP-WGAN
synthetic data at ε ∈ {1, 3, 10}, with every attack's value and 95 % CI.

    python bench/audit_controls.py [--eps 1 3 10] [--epochs N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def summary(res: dict) -> dict:
    return {
        "verdict": res["gate"]["verdict"],
        "failed": res["gate"]["failed"],
        "checks": {c["check"]: {"value": c["value"], "ci": c["ci"], "threshold": c["threshold"], "passed": c["passed"]}
                   for c in res["gate"]["checks"]},
        "seconds": res["seconds"],
    }


def main() -> None:
    import pandas as pd

    from _common import environment, peak_rss_mb, save
    from audits.audit import run_audit
    from dpsynth.data.demo import demo_schema, write_demo
    from dpsynth.generate import generate
    from dpsynth.schema import validate_frame
    from dpsynth.train import TrainConfig, train

    ap = argparse.ArgumentParser()
    ap.add_argument("--eps", nargs="+", type=float, default=[1.0, 3.0, 10.0])
    ap.add_argument("--epochs", type=int)
    a = ap.parse_args()
    schema = demo_schema()
    out = {"benchmark": "audit_controls", "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        write_demo(tmp)
        tr = validate_frame(pd.read_csv(Path(tmp) / "train.csv"), schema, "train")
        ho = validate_frame(pd.read_csv(Path(tmp) / "holdout.csv"), schema, "holdout")
        half = len(ho) // 2
        h_audit, h_release = ho.iloc[:half].reset_index(drop=True), ho.iloc[half:].reset_index(drop=True)
        dp_none = {"differentially_private": True, "epsilon": 0.0, "delta": 0.0}  # controls: DP facts not at issue
        out["cases"]["real_copy"] = summary(run_audit(tr, h_audit, tr, schema, dp=dp_none))
        out["cases"]["independent_holdout"] = summary(run_audit(tr, h_audit, h_release, schema, dp=dp_none))
        for eps in a.eps:
            t = time.time()
            cfg = TrainConfig() if a.epochs is None else TrainConfig(epochs=a.epochs)
            res = train(tr, schema, out=Path(tmp) / f"m{eps}", epsilon=eps, config=cfg, progress=False)
            syn, man = generate(Path(tmp) / f"m{eps}", 10_000)
            r = run_audit(tr, h_audit, validate_frame(syn, schema, "synthetic"), schema, dp=man["privacy"])
            s = summary(r)
            s["epsilon_spent"] = res.epsilon
            s["fit_seconds"] = time.time() - t
            s["empirical_epsilon_lower_bound"] = r["attacks"].get("empirical_epsilon", {}).get("epsilon_lower_bound")
            out["cases"][f"dp_wgan_eps{eps:g}"] = s
            print(f"eps={eps}: {s['verdict']} {s['failed']}", file=sys.stderr)
    out["peak_rss_mb"] = peak_rss_mb()
    out["environment"] = environment()
    save("audit_controls", out)


if __name__ == "__main__":
    main()
