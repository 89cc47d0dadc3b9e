"""Wall time of the federated demo after set-up (issue 5 target: ≤ 5 min on 2 cores, stretch ≤ 2 min).

Runs exactly what `make demo-federated` runs (real flower-superlink + 3 flower-supernode processes with TLS
and node authentication, `flwr run`, audits at every site, signed release) and records its wall time, the
outcome and the per-site ε.

    python bench/demo_fed.py [--out DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from _common import environment, save

    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    a = p.parse_args()
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="dpsynth-demo-fed-"))
    repo = Path(__file__).resolve().parents[1]
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "deploy", "demo", "--out", str(out)], cwd=repo)
    wall = time.time() - t
    import json

    summ = out / "run" / "summary.json"
    s = json.loads(summ.read_text()) if summ.exists() else {}
    result = {
        "benchmark": "federated demo wall time (make demo-federated after set-up)",
        "wall_seconds": round(wall, 1),
        "target_seconds": 300,
        "stretch_seconds": 120,
        "meets_target": wall <= 300,
        "exit_code": r.returncode,
        "status": s.get("status"),
        "verdict": s.get("verdict"),
        "rounds": s.get("rounds_done"),
        "site_epsilon": {k: v["epsilon"] for k, v in ((s.get("privacy") or {}).get("sites") or {}).items()},
        "consortium_epsilon": (s.get("privacy") or {}).get("consortium_epsilon"),
        "server_seconds": s.get("seconds"),
        "run_config": __import__("deploy.demo", fromlist=["DEMO_RUN_CONFIG"]).DEMO_RUN_CONFIG,
        "site_sigma": {k: v.get("noise_multiplier") for k, v in ((s.get("privacy") or {}).get("sites") or {}).items()},
        "site_tstr_trtr_auroc": {k: (v or {}).get("tstr_trtr_auroc_ratio") for k, v in (s.get("utility") or {}).items()},
        "environment": environment(),
    }
    save("demo_fed", result)
    return 0 if r.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
