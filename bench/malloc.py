"""glibc malloc settings vs the defaults on the DP note model's training step (the Makefile's MALLOC_* exports).

A DP text step at the demo's batch (768 notes × 128 tokens) allocates and frees tensors of tens to hundreds of MB
(logits, per-sample gradient norms). glibc serves every block above 32 MB with its own mmap and gives it back
with munmap, so each step page-faults gigabytes of fresh zeroed memory; on a virtual machine a page fault is
expensive, and the step spends a large share of its time in the kernel. ``MALLOC_MMAP_MAX_=0`` makes glibc serve
large blocks from its heap and ``MALLOC_TRIM_THRESHOLD_`` keeps freed heap memory instead of returning it, so the
next step reuses pages that are already mapped. The cost is that a process keeps its peak heap until it exits.

Each setting runs the same workload in a fresh process (``--steps`` DP steps of the default note model on the
demo cohort, after one warm-up step; ``--threads`` torch threads), and reports seconds per step, user and kernel
CPU seconds, and peak RSS; the ratio default / tuned is the speed-up in the same run.

    python bench/malloc.py [--steps 4] [--threads 2] [--save malloc]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TUNED = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}  # the Makefile's exports


def workload(steps: int, threads: int) -> dict:
    import warnings

    import torch
    from _common import demo_notes
    from torch.utils.data import DataLoader, TensorDataset

    from dpsynth.models.text import NoteLM, TextConfig, make_private_text, text_step

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = TextConfig()
    _, _, _, tok, ids = demo_notes(cfg.max_len)
    model = NoteLM.for_tokenizer(tok, cfg)
    m, opt, crit, dl = make_private_text(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=cfg.lr),
        loader=DataLoader(TensorDataset(ids), batch_size=cfg.batch_size), noise_multiplier=0.9, max_grad_norm=1.0,
        noise_generator=torch.Generator().manual_seed(0))
    times = []
    while len(times) < steps + 1:
        for (b,) in dl:
            t = time.perf_counter()
            text_step(model=m, optimizer=opt, criterion=crit, batch=b, private=True)
            times.append(time.perf_counter() - t)
            if len(times) > steps:
                break
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds_per_step": sum(times[1:]) / steps, "user_s": ru.ru_utime, "kernel_s": ru.ru_stime,
            "peak_rss_mb": ru.ru_maxrss / 1024, "batch": cfg.batch_size, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", default="malloc")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(workload(a.steps, a.threads)), flush=True)
        return
    from _common import environment, save

    base = {k: v for k, v in os.environ.items() if k not in TUNED}
    out = {}
    for name, env in (("glibc_defaults", base), ("tuned", {**base, **TUNED})):
        p = subprocess.run([sys.executable, __file__, "--one", "--steps", str(a.steps), "--threads", str(a.threads)],
                           env={**env, "OMP_NUM_THREADS": str(a.threads)}, capture_output=True, text=True, check=True)
        out[name] = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
        print(f"{name}: {out[name]['seconds_per_step']:.2f} s/step, kernel {out[name]['kernel_s']:.1f} s", file=sys.stderr)
    save(a.save, {"benchmark": "malloc", "settings": TUNED, "runs": out,
                  "speedup": out["glibc_defaults"]["seconds_per_step"] / out["tuned"]["seconds_per_step"],
                  "environment": environment()})


if __name__ == "__main__":
    main()
