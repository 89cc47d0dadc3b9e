"""One critic step, DP (Opacus ghost clipping, the production step) vs non-DP, batch 512, on a synthetic
matrix of the tutorial's MIMIC-IV shape (180,000 × 1,460: sparse binary + 4 continuous), generated on the fly.

Each mode runs in its own subprocess so that peak memory is measured per mode, over the whole training set
held in memory (uint8 binary block + float32 continuous block, densified per batch).

    python bench/dp_overhead.py [--rows 180000] [--cols 1460] [--steps 30]
Targets (issue 9): DP/non-DP time ratio ≤ 1.3; peak memory ≤ 2 GB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one_mode(mode: str, rows: int, cols: int, steps: int, hidden: int, batch: int) -> dict:
    import warnings

    import numpy as np
    import torch
    from opacus.data_loader import DPDataLoader

    from _common import peak_rss_mb
    from dpsynth.models.wgan import Critic, RealTermLoss, critic_step_dp, critic_step_plain

    warnings.filterwarnings("ignore")
    rng = np.random.default_rng(0)
    n_cont = 4
    # sparse binary block: ~2 % density (MIMIC-IV code matrices are very sparse), stored as uint8
    binary = torch.from_numpy((rng.random((rows, cols - n_cont), dtype=np.float32) < 0.02).astype(np.uint8))
    cont = torch.from_numpy(rng.random((rows, n_cont), dtype=np.float32))

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return rows

        def __getitem__(self, i):
            return (torch.cat([binary[i].float(), cont[i]]),)

    critic = Critic(cols, hidden)
    opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(DS(), batch_size=batch)
    if mode == "dp":
        from opacus import PrivacyEngine

        critic, opt, crit, loader = PrivacyEngine().make_private(
            module=critic, optimizer=opt, criterion=RealTermLoss(), data_loader=loader,
            noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost",
        )
    else:
        loader = DPDataLoader.from_data_loader(loader)  # the same Poisson batches
    it = iter(loader)
    times, load_times = [], []
    for s in range(steps + 3):
        t = time.perf_counter()
        (real,) = next(it)
        tl = time.perf_counter()
        fake = torch.rand(batch, cols)
        if mode == "dp":
            critic_step_dp(critic=critic, optimizer=opt, criterion=crit, real=real, fake=fake, gp_weight=10.0)
        else:
            critic_step_plain(critic=critic, optimizer=opt, real=real, fake=fake, gp_weight=10.0)
        te = time.perf_counter()
        if s >= 3:  # warm-up excluded
            times.append(te - tl)
            load_times.append(tl - t)
    return {
        "mode": mode,
        "step_ms_median": 1000 * float(np.median(times)),
        "step_ms_mean": 1000 * float(np.mean(times)),
        "batch_load_ms_median": 1000 * float(np.median(load_times)),
        "peak_rss_mb": peak_rss_mb(),
        "data_mb": (binary.numel() + cont.numel() * 4) / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=180_000)
    ap.add_argument("--cols", type=int, default=1_460)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--mode", choices=["dp", "plain"])
    a = ap.parse_args()
    if a.mode:
        print(json.dumps(one_mode(a.mode, a.rows, a.cols, a.steps, a.hidden, a.batch)))
        return
    from _common import environment, save

    res = {}
    for mode in ("plain", "dp"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--rows", str(a.rows), "--cols", str(a.cols),
                              "--steps", str(a.steps), "--hidden", str(a.hidden), "--batch", str(a.batch)],
                             check=True, capture_output=True, text=True)
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = res["dp"]["step_ms_median"] / res["plain"]["step_ms_median"]
    save("dp_overhead", {
        "benchmark": "dp_overhead",
        "shape": {"rows": a.rows, "cols": a.cols, "batch": a.batch, "hidden": a.hidden, "steps_timed": a.steps},
        "plain": res["plain"],
        "dp": res["dp"],
        "dp_over_plain_time_ratio": ratio,
        "targets": {"ratio_max": 1.3, "peak_memory_mb_max": 2048},
        "meets_ratio_target": ratio <= 1.3,
        "meets_memory_target": max(res["dp"]["peak_rss_mb"], res["plain"]["peak_rss_mb"]) <= 2048,
        "environment": environment(),
    })


if __name__ == "__main__":
    main()
