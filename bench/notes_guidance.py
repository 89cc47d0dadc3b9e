"""Classifier-free guidance for the DP note model (issue 7, condition consistency): which ``guidance`` to default to?

The note model alone, trained with DP-SGD exactly as in the chained fit (Opacus ghost clipping, Poisson sampling,
TextConfig defaults incl. condition dropout) at the noise the default fit gives it at ε = 8 (equal budget shares
with the WGAN and the flow: σ 0.69 for 240 steps, ``bench/notes.py``), on the demo cohort's real records and
rendered notes (train split). Then notes are sampled for ``--n-eval`` real holdout records at each guidance
weight w (logits u + w·(c − u); w = 1 is plain conditional sampling) and scored by
``dpsynth.metrics.notes.condition_consistency`` against those records. Sampling is post-processing: every w
uses the same trained model and the same ε.

    python bench/notes_guidance.py [--guidance 1 2 3 5 8] [--sigma 0.69] [--steps 240]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import warnings

    import numpy as np
    import torch
    from _common import demo_notes, environment, peak_rss_mb, save
    from torch.utils.data import DataLoader, TensorDataset

    from dpsynth.metrics.notes import condition_consistency
    from dpsynth.models.text import (
        NoteLM,
        TextConfig,
        make_private_text,
        sample_notes,
        text_step,
    )

    ap = argparse.ArgumentParser()
    ap.add_argument("--guidance", nargs="+", type=float, default=[1.0, 2.0, 3.0, 5.0, 8.0])
    ap.add_argument("--sigma", type=float, default=0.69, help="noise multiplier (default: the ε = 8 fit's)")
    ap.add_argument("--steps", type=int, default=240, help="DP steps (default: the ε = 8 fit's, 5 epochs)")
    ap.add_argument("--n-eval", type=int, default=1000)
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    cfg = TextConfig()
    schema, tr, ho, tok, ids = demo_notes(cfg.max_len)
    model = NoteLM.for_tokenizer(tok, cfg)
    loader = DataLoader(TensorDataset(ids), batch_size=cfg.batch_size)
    m, opt, crit, dl = make_private_text(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=cfg.lr),
                                         loader=loader, noise_multiplier=a.sigma, max_grad_norm=1.0,
                                         noise_generator=None)
    losses, t, steps = [], time.time(), 0
    while steps < a.steps:
        for b in dl:
            losses.append(text_step(model=m, optimizer=opt, criterion=crit, batch=b, private=True))
            steps += 1
            if steps >= a.steps:
                break
    train_s = time.time() - t
    prompts = ho.sample(min(a.n_eval, len(ho)), random_state=0).reset_index(drop=True)
    out = {"benchmark": "notes_guidance", "private": True, "noise_multiplier": a.sigma, "steps": a.steps,
           "sample_rate": cfg.batch_size / len(ids), "max_grad_norm": 1.0, "text_config": cfg.__dict__,
           "train_notes": len(ids), "train_seconds": round(train_s, 1),
           "final_loss": float(np.nanmean(losses[-24:])), "evaluated_prompts": len(prompts), "points": []}
    for w in a.guidance:
        t = time.time()
        notes = sample_notes(m, tok, prompts, temperature=cfg.temperature, top_p=cfg.top_p,
                             generator=torch.Generator().manual_seed(1), guidance=w)
        sample_s = time.time() - t
        cc = condition_consistency(tr, prompts.assign(note=notes), schema, real_holdout=ho)
        point = {"guidance": w, "sample_seconds": round(sample_s, 1), "consistency": cc["consistency"],
                 "ceiling": cc["ceiling"]["consistency"]}
        out["points"].append(point)
        print(json.dumps(point), file=sys.stderr, flush=True)
    out["peak_rss_mb"] = peak_rss_mb()
    out["environment"] = environment()
    save("notes_guidance", out)


if __name__ == "__main__":
    main()
