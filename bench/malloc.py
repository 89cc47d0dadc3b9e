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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from note_step import run_one, workload  # the DP note step both benchmarks time

TUNED = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}  # the Makefile's exports


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
        out[name] = run_one(__file__, ["--steps", str(a.steps), "--threads", str(a.threads)],
                            {**env, "OMP_NUM_THREADS": str(a.threads)})
        print(f"{name}: {out[name]['seconds_per_step']:.2f} s/step, kernel {out[name]['kernel_s']:.1f} s", file=sys.stderr)
    save(a.save, {"benchmark": "malloc", "settings": TUNED, "runs": out,
                  "speedup": out["glibc_defaults"]["seconds_per_step"] / out["tuned"]["seconds_per_step"],
                  "environment": environment()})


if __name__ == "__main__":
    main()
