"""One DP step of the note model: Opacus ghost vs hooks mode, with and without length chunks and book-keeping
clipping (issue 7, training time).

The note model's DP step is the cost of the ≤ 5-minute training target. Each variant runs in a fresh process
(peak memory is per process): ``--steps`` DP steps of the default note model (TextConfig, only
``grad_sample_mode`` and ``length_chunks`` changed) on the demo cohort's rendered notes at the default Poisson batch,
after one warm-up step, σ 0.9, seeded, and ``book_keeping`` (hooks mode: the clipped sum without per-sample gradient
tensors, models.text._Book). Reports seconds per step (mean and each step), user CPU seconds and peak RSS, and each
variant's ratio to ghost mode without chunks (the wiring before 2026-11-28) measured in the same run.
All variants clip the same per-patient gradients and add the same noise (tests/test_text.py checks each against a
per-patient reference), so they differ in time and memory only.

    python bench/note_step.py [--steps 4] [--threads 2] [--save note_step]
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

VARIANTS = {  # name: (grad_sample_mode, length_chunks, book_keeping)
    "ghost": ("ghost", 1, False),
    "hooks": ("hooks", 1, False),
    "hooks_chunks_4": ("hooks", 4, False),
    "hooks_chunks_8": ("hooks", 8, False),
    "hooks_book": ("hooks", 1, True),
    "hooks_chunks_8_book": ("hooks", 8, True),  # the default since 2026-11-28
}
BASELINE = "ghost"


def workload(steps: int, threads: int, mode: str | None = None, chunks: int | None = None,
             book: bool | None = None) -> dict:
    """``steps`` timed DP steps (after one warm-up) of the default note model, ``mode`` / ``chunks`` / ``book``
    overriding TextConfig's; also used by bench/malloc.py."""
    import warnings
    from dataclasses import replace

    import torch
    from _common import demo_notes
    from torch.utils.data import DataLoader, TensorDataset

    from dpsynth.models.text import NoteLM, TextConfig, make_private_text, text_step

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = TextConfig()
    cfg = replace(cfg, grad_sample_mode=mode or cfg.grad_sample_mode, length_chunks=chunks or cfg.length_chunks,
                  book_keeping=cfg.book_keeping if book is None else book)
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
    return {"seconds_per_step": sum(times[1:]) / steps, "step_seconds": [round(t, 3) for t in times[1:]],
            "user_s": ru.ru_utime, "kernel_s": ru.ru_stime, "peak_rss_mb": ru.ru_maxrss / 1024,
            "batch": cfg.batch_size, "steps": steps, "grad_sample_mode": cfg.grad_sample_mode,
            "length_chunks": cfg.length_chunks, "book_keeping": cfg.book_keeping}


def run_one(script: str, args: list[str], env: dict) -> dict:
    """Run ``script --one args`` in a fresh process and return the dict it prints on its RESULT line."""
    p = subprocess.run([sys.executable, script, "--one", *args], env=env, capture_output=True, text=True, check=True)
    return json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", default="note_step")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--one", nargs=3, metavar=("MODE", "CHUNKS", "BOOK"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(workload(a.steps, a.threads, a.one[0], int(a.one[1]), a.one[2] == "1")), flush=True)
        return
    from _common import environment, save

    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    out = {}
    for name in a.variants:
        mode, chunks, book = VARIANTS[name]
        out[name] = run_one(__file__, [mode, str(chunks), str(int(book)), "--steps", str(a.steps), "--threads", str(a.threads)], env)
        print(f"{name}: {out[name]['seconds_per_step']:.2f} s/step, peak {out[name]['peak_rss_mb']:.0f} MB",
              file=sys.stderr)
    base = out[BASELINE]["seconds_per_step"] if BASELINE in out else float("nan")
    save(a.save, {"benchmark": "note_step", "variants": out, "baseline": BASELINE,
                  "speedup_vs_baseline": {k: base / v["seconds_per_step"] for k, v in out.items()},
                  "malloc": {k: os.environ.get(k) for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")},
                  "environment": environment()})


if __name__ == "__main__":
    main()
