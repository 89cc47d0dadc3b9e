"""How the DP note model follows its record (issue 7, condition consistency): conditioning paths and sampling.

The note model alone, trained with DP-SGD exactly as in the chained fit (Opacus ghost clipping, Poisson sampling,
TextConfig defaults incl. condition dropout) at the noise the default fit gives it at ε = 8 (equal budget shares
with the WGAN and the flow; ``dpsynth.train.make_plan`` for each variant's TextConfig, as ``bench/notes_sweep.py``
does; ``--sigma`` / ``--steps`` override), on the demo cohort's real records and
rendered notes (train split). One model per ``--variants`` entry (TextConfig overrides; by default: without
``cond_vocab``, the condition → vocabulary path next to the in-context prefix; with it under one flat clipping
bound (``cond_clip_share`` 0); with it under two-group clipping, the default), same seed, same noise. Then notes
are sampled for ``--n-eval`` real holdout records at each
classifier-free guidance weight w (logits u + w·(c − u); w = 1 is plain conditional sampling) and plausibility
constraint α (guided candidates must have p_c ≥ α·max p_c; 0 = off) and scored by
``dpsynth.metrics.notes.condition_consistency`` against those records, and by the real-vs-synthetic TF-IDF
classifier AUC (``two_sample_test``; 0.5 = indistinguishable). Sampling is post-processing: every (w, α) uses
the same trained model and the same ε.

    python bench/notes_guidance.py [--guidance 1 3 5] [--plausibility 0 0.1] [--variants '[{}, ...]']
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NO_PATHS = {"cond_vocab": False}
VARIANTS = [NO_PATHS, {"cond_clip_share": 0.0}, {}]
RECORDED = ("cond_vocab", "cond_clip_share", "cond_sparse", "batch_size", "lr")


def main() -> None:
    import warnings

    import numpy as np
    import torch
    from _common import demo_notes, environment, peak_rss_mb, save
    from notes_sweep import noise, train_private

    from dpsynth.metrics.notes import condition_consistency, two_sample_test
    from dpsynth.models.text import (
        NoteLM,
        TextConfig,
        sample_notes,
    )

    ap = argparse.ArgumentParser()
    ap.add_argument("--guidance", nargs="+", type=float, default=[1.0, 3.0, 5.0])
    ap.add_argument("--plausibility", nargs="+", type=float, default=[0.0, 0.1])
    ap.add_argument("--variants", default=json.dumps(VARIANTS),
                    help="JSON list of TextConfig overrides, one DP model each ({} = the defaults)")
    ap.add_argument("--sigma", type=float, help="noise multiplier (default: the ε = 8 fit's for the variant)")
    ap.add_argument("--steps", type=int, help="DP steps (default: the ε = 8 fit's for the variant)")
    ap.add_argument("--n-eval", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0, help="seed of the model's initialisation, sampling and noise")
    ap.add_argument("--save", default="notes_guidance", help="results/<name>.json")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    base = TextConfig()
    schema, tr, ho, tok, ids = demo_notes(base.max_len)
    prompts = ho.sample(min(a.n_eval, len(ho)), random_state=0).reset_index(drop=True)
    real = tr["note"].sample(len(prompts), random_state=0).tolist()
    out = {"benchmark": "notes_guidance", "private": True, "epsilon": 8.0, "max_grad_norm": 1.0, "text_config": base.__dict__,
           "train_notes": len(ids), "evaluated_prompts": len(prompts), "models": []}
    for over in json.loads(a.variants):
        torch.manual_seed(a.seed)
        cfg = replace(base, **over)
        sigma, n_steps = noise("plan", cfg, len(ids), 8.0, schema)
        sigma, n_steps = a.sigma or sigma, a.steps or n_steps
        model = NoteLM.for_tokenizer(tok, cfg)
        losses, train_s, q = train_private(model, cfg, ids, sigma=sigma, steps=n_steps, seed=a.seed)
        res = {"variant": {k: getattr(cfg, k) for k in RECORDED}, "noise_multiplier": sigma, "steps": n_steps,
               "sample_rate": q, "parameters": sum(p.numel() for p in model.parameters()),
               "train_seconds": round(train_s, 1), "final_loss": float(np.nanmean(losses[-24:])), "points": []}
        print(json.dumps({k: v for k, v in res.items() if k != "points"}), file=sys.stderr, flush=True)
        for w in a.guidance:
            for alpha in (a.plausibility if w != 1 else [0.0]):  # the constraint acts on guided sampling only
                t = time.time()
                notes = sample_notes(model, tok, prompts, temperature=cfg.temperature, top_p=cfg.top_p,
                                     generator=torch.Generator().manual_seed(1), guidance=w, plausibility=alpha)
                sample_s = time.time() - t
                cc = condition_consistency(tr, prompts.assign(note=notes), schema, real_holdout=ho)
                point = {"guidance": w, "plausibility": alpha, "sample_seconds": round(sample_s, 1),
                         "consistency": cc["consistency"], "ceiling": cc["ceiling"]["consistency"],
                         "two_sample_auc": two_sample_test(real, notes)["auc"], "example": notes[0]}
                res["points"].append(point)
                print(json.dumps(point), file=sys.stderr, flush=True)
        out["models"].append(res)
    out["peak_rss_mb"] = peak_rss_mb()
    out["environment"] = environment()
    out["seed"] = a.seed
    save(a.save, out)


if __name__ == "__main__":
    main()
