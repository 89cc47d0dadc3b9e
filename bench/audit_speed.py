"""Full audit (every attack + the one-run canary audit + the gate) on the NAFLD demo cohort (12k train rows)
and on a 180,000 × 1,460 table of the tutorial's MIMIC-IV shape (sparse binary + 4 continuous), generated
on the fly. Each case runs in its own subprocess: wall time and peak memory per case.

    python bench/audit_speed.py [--rows 180000] [--cols 1460] [--only nafld|mimic]
Targets (issue 4): NAFLD ≤ 20 s, MIMIC shape ≤ 5 min on 2 cores, memory ≤ 4 GB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# DP facts of a typical model (σ, q, C, steps of the default NAFLD configuration) for the canary audit
DP = {"differentially_private": True, "epsilon": 3.0, "delta": 8e-6, "noise_multiplier": 3.0,
      "sample_rate": 1 / 12, "steps": 600, "max_grad_norm": 1.0}


def case_nafld() -> dict:
    import pandas as pd

    from _common import peak_rss_mb
    from audits.audit import run_audit
    from dpsynth.data.demo import demo_schema, write_demo
    from dpsynth.schema import validate_frame

    with tempfile.TemporaryDirectory() as tmp:
        write_demo(tmp)
        schema = demo_schema()
        t0 = time.time()
        tr = validate_frame(pd.read_csv(Path(tmp) / "train.csv"), schema, "train")
        ho = validate_frame(pd.read_csv(Path(tmp) / "holdout.csv"), schema, "holdout")
    half = len(ho) // 2
    syn = ho.iloc[half:].sample(10_000, replace=True, random_state=0).reset_index(drop=True)  # stand-in release
    t1 = time.time()
    res = run_audit(tr, ho.iloc[:half].reset_index(drop=True), syn, schema, dp=DP)
    return {"case": "nafld", "rows": {"train": len(tr), "holdout": half, "synthetic": len(syn)},
            "seconds_load_validate": t1 - t0, "seconds_audit": time.time() - t1, "timings": res["timings"],
            "verdict": res["gate"]["verdict"], "peak_rss_mb": peak_rss_mb(), "victims": res["sample"]["victims_per_group"]}


def case_mimic(rows: int, cols: int) -> dict:
    import numpy as np
    import pandas as pd

    from _common import peak_rss_mb
    from audits.audit import run_audit
    from dpsynth.schema import Column, Schema, validate_frame

    n_cont = 4
    schema = Schema(columns=[Column(f"c{i:04d}", "binary") for i in range(cols - n_cont)]
                    + [Column(f"v{i}", "continuous", lower=0.0, upper=1.0) for i in range(n_cont)], name="mimic-shape")
    rng = np.random.default_rng(0)

    def table(n):
        b = (rng.random((n, cols - n_cont), dtype=np.float32) < 0.02).astype(np.int8)
        df = pd.DataFrame(b, columns=[f"c{i:04d}" for i in range(cols - n_cont)])
        for i in range(n_cont):
            df[f"v{i}"] = rng.random(n, dtype=np.float32)
        return df

    t0 = time.time()
    tr = validate_frame(table(rows), schema, "train")
    ho = validate_frame(table(rows // 9), schema, "holdout")
    syn = validate_frame(table(rows), schema, "synthetic")
    t1 = time.time()
    res = run_audit(tr, ho, syn, schema, dp=DP)
    return {"case": "mimic-shape", "rows": {"train": rows, "holdout": rows // 9, "synthetic": rows}, "cols": cols,
            "seconds_generate_validate": t1 - t0, "seconds_audit": time.time() - t1, "timings": res["timings"],
            "verdict": res["gate"]["verdict"], "peak_rss_mb": peak_rss_mb(), "victims": res["sample"]["victims_per_group"],
            "synthetic_rows_used": res["sample"]["synthetic_rows_used"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=180_000)
    ap.add_argument("--cols", type=int, default=1_460)
    ap.add_argument("--only", choices=["nafld", "mimic"])
    ap.add_argument("--case", choices=["nafld", "mimic"])
    a = ap.parse_args()
    if a.case:
        r = case_nafld() if a.case == "nafld" else case_mimic(a.rows, a.cols)
        print(json.dumps(r))
        return
    from _common import environment, save

    out = {"benchmark": "audit_speed", "targets": {"nafld_seconds_max": 20, "mimic_seconds_max": 300, "peak_memory_mb_max": 4096}}
    for case in ([a.only] if a.only else ["nafld", "mimic"]):
        p = subprocess.run([sys.executable, __file__, "--case", case, "--rows", str(a.rows), "--cols", str(a.cols)],
                           check=True, capture_output=True, text=True)
        out[case] = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"{case}: audit {out[case]['seconds_audit']:.1f}s, peak {out[case]['peak_rss_mb']:.0f} MB", file=sys.stderr)
    out["environment"] = environment()
    save("audit_speed", out)


if __name__ == "__main__":
    main()
