"""Synthetic clinical notes of the chained patient (issue 7): quality, memorisation and training time.

Demo cohort with rendered demonstration notes (dpsynth.data.notes; NOT real clinical text), train 70 %,
holdout 30 %. For each ε ∈ {3, 8, non-private} and seed, one subprocess trains the default chained model
(WGAN record → flow vitals → note model) with secret-sharer canaries planted (``--canaries`` per repetition
count 1/4/16, plus never-planted controls), generates ``--n-synthetic`` patients and measures
  * training time: the whole fit and the note model's phase alone (2 cores), peak memory;
  * dpsynth.metrics.notes.note_metrics: condition consistency, value consistency (do the notes' numbers follow
    the record?), note-level TSTR, distinct-n / self-BLEU, TF-IDF classifier two-sample AUC, perplexity on
    training and holdout notes;
  * canary exposure per repetition count (audits.text.model_exposure) against chance;
  * the gate's note checks (8-gram overlap excess, identifier replay).

    python bench/notes.py [--eps 3 8 inf] [--seeds 0] [--n-synthetic 2000] [--text '{"epochs": 4}']
Targets at ε = 8: condition consistency ≥ 0.85, canary exposure indistinguishable from chance (the lower 95 %
bound of every repetition count ≤ chance, in every run, and over all runs' canaries of a count pooled), note-model
training ≤ 5 minutes on 2 cores.
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

TARGET_MINUTES = 5.0
TARGET_CONSISTENCY = 0.85


def one_run(eps: float, seed: int, data: Path, n_syn: int, canaries: int, text: dict | None) -> dict:
    import warnings
    from dataclasses import replace

    import pandas as pd

    from _common import peak_rss_mb
    from audits.text import model_exposure, ngram_overlap, note_identifier_replay
    from dpsynth.data.demo import demo_schema_with_notes
    from dpsynth.generate import add_notes, generate
    from dpsynth.metrics.notes import condition_consistency, note_metrics
    from dpsynth.schema import validate_frame
    from dpsynth.train import TrainConfig, load_model, load_text, train

    warnings.filterwarnings("ignore")
    schema = demo_schema_with_notes()
    real = validate_frame(pd.read_csv(data / "train.csv"), schema, "train")
    hold = validate_frame(pd.read_csv(data / "holdout.csv"), schema, "holdout")
    non_private = math.isinf(eps)
    cfg = TrainConfig(models=("wgan", "flow", "text"), canaries=canaries)
    if text:
        cfg.text = replace(cfg.text, **text)
    marks: dict[str, float] = {}

    def mark(name):
        return lambda epoch, _acc: marks.__setitem__(name, time.time())

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m"
        t = time.time()
        res = train(real, schema, out=out, epsilon=None if non_private else eps, delta=None, config=cfg,
                    non_private=non_private, seed=seed if non_private else None, progress=False,
                    flow_epoch_callback=mark("flow"), text_epoch_callback=mark("text"))
        fit = time.time() - t
        text_seconds = marks["text"] - marks.get("flow", t)
        t = time.time()
        syn, _ = generate(out, n_syn, seed=seed)
        gen_seconds = time.time() - t
        manifest, _, _, _ = load_model(out)
        model, tok, col = load_text(out, manifest, schema)
        metrics = note_metrics(real, hold, syn, schema, model=model, tokenizer=tok, seed=seed)
        # the same note model prompted with real holdout records instead of synthetic ones (generate's note step,
        # sampling defaults): separates what the note model learnt from what the synthetic records bring
        prompts = hold.sample(min(2000, len(hold)), random_state=seed).reset_index(drop=True)
        add_notes(prompts, col, model, tok, temperature=model.config.temperature, top_p=model.config.top_p, seed=seed)
        cc_real = condition_consistency(real, prompts, schema, real_holdout=hold)
        metrics["summary"]["consistency_real_prompts"] = cc_real["consistency"]
        exp = model_exposure(out, real, n_candidates=1000, seed=seed)
        sy, tr, ho = (list(f[col].dropna().astype(str)) for f in (syn, real, hold))
        gate = {"ngram_overlap": ngram_overlap(sy, tr, ho, seed=seed), "identifier_replay": note_identifier_replay(sy, tr, ho)}
    tm = manifest["privacy"]["models"].get("text", {})
    return {
        "epsilon_target": None if non_private else eps, "epsilon_spent": res.epsilon, "seed": seed,
        "fit_seconds": fit, "text_phase_seconds": text_seconds, "generate_seconds": gen_seconds, "n_synthetic": n_syn,
        "peak_rss_mb": peak_rss_mb(), "text_config": {k: v for k, v in manifest["training"]["config"]["text"].items()},
        "text_noise_multiplier": tm.get("noise_multiplier"), "text_steps": tm.get("steps"),
        "notes": manifest["data"].get("notes"), "metrics": metrics, "canary_exposure": exp, "gate_checks": gate,
    }


def summarise(runs: list[dict]) -> dict:
    import numpy as np
    from _common import pooled_exposure

    out: dict[str, list] = {}
    for r in runs:
        out.setdefault("non-private" if r["epsilon_target"] is None else f"eps={r['epsilon_target']:g}", []).append(r)

    def ms(vals):
        vals = [v for v in vals if v is not None]
        return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)} if vals else None

    summary = {}
    for key, rs in out.items():
        keys = rs[0]["metrics"]["summary"].keys()
        per_count = rs[0]["canary_exposure"]["per_count"] if rs[0]["canary_exposure"] else {}
        summary[key] = {
            "runs": len(rs),
            "fit_seconds": ms([r["fit_seconds"] for r in rs]),
            "text_phase_seconds": ms([r["text_phase_seconds"] for r in rs]),
            **{k: ms([r["metrics"]["summary"][k] for r in rs]) for k in keys
               if all(isinstance(r["metrics"]["summary"].get(k), (int, float)) for r in rs)},
            "canary_exposure": {c: {"mean": ms([r["canary_exposure"]["per_count"][c]["value"] for r in rs]),
                                    "lower_bound_max": max(r["canary_exposure"]["per_count"][c]["lower_bound"] for r in rs),
                                    **pooled_exposure([r["canary_exposure"]["per_count"][c] for r in rs])}
                                for c in per_count},
            "canary_chance": rs[0]["canary_exposure"]["chance"] if rs[0]["canary_exposure"] else None,
            "ngram_overlap_excess": ms([(r["gate_checks"]["ngram_overlap"].get("excess") or {}).get("value") for r in rs]),
            "identifier_replay": ms([r["gate_checks"]["identifier_replay"].get("replayed_values") for r in rs]),
        }
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eps", nargs="+", type=float, default=[3.0, 8.0, math.inf])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--n-synthetic", type=int, default=2000)
    ap.add_argument("--canaries", type=int, default=4, help="canaries per repetition count (and as many controls)")
    ap.add_argument("--text", help="TextConfig overrides as JSON, e.g. '{\"epochs\": 4}' (default: TextConfig's)")
    ap.add_argument("--one", nargs=2, metavar=("EPS", "SEED"))
    ap.add_argument("--data")
    ap.add_argument("--save", default="notes", help="results/<name>.json")
    a = ap.parse_args()
    text = json.loads(a.text) if a.text else None
    if a.one:
        print(json.dumps(one_run(float(a.one[0]), int(a.one[1]), Path(a.data), a.n_synthetic, a.canaries, text)))
        return
    from _common import environment, save
    from dpsynth.data.demo import write_demo

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_demo(data, notes=True)
        for eps in a.eps:
            for seed in a.seeds:
                cmd = [sys.executable, __file__, "--one", str(eps), str(seed), "--data", str(data),
                       "--n-synthetic", str(a.n_synthetic), "--canaries", str(a.canaries)] + (["--text", a.text] if a.text else [])
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode:
                    sys.exit(f"run eps={eps} seed={seed} failed:\n{p.stderr[-4000:]}")
                r = json.loads(p.stdout.strip().splitlines()[-1])
                s = r["metrics"]["summary"]
                print(f"eps={eps} seed={seed}: fit {r['fit_seconds']:.0f}s (notes {r['text_phase_seconds']:.0f}s) "
                      f"consistency {s.get('consistency')} tstr {s.get('tstr_ratio')} 2-sample AUC {s.get('two_sample_auc')}",
                      file=sys.stderr)
                runs.append(r)
                save(a.save + ".partial", {"runs": runs})  # nothing measured is lost if a later run fails
    summary = summarise(runs)
    e8 = summary.get("eps=8")
    verdict = None
    if e8:
        exp = e8["canary_exposure"]
        verdict = {
            "consistency_ge_0.85": bool(e8.get("consistency") and e8["consistency"]["mean"] >= TARGET_CONSISTENCY),
            "exposure_at_chance": bool(exp) and all(v["lower_bound_max"] <= e8["canary_chance"] for v in exp.values()),
            # the same test on each count's canaries of all runs together (None for runs without per-canary values)
            "exposure_at_chance_pooled": (all(v["pooled"]["lower_bound"] <= e8["canary_chance"] for v in exp.values())
                                          if exp and all("pooled" in v for v in exp.values()) else None),
            "text_training_le_5_min": e8["text_phase_seconds"]["mean"] <= TARGET_MINUTES * 60,
        }
    save(a.save, {
        "benchmark": "notes",
        "dataset": "NAFLD demo cohort with rendered demonstration notes (not real clinical text); train 70 %, "
                   f"holdout 30 %; synthetic n = {a.n_synthetic}",
        "text_config": text or "TextConfig default",
        "canaries_per_count": a.canaries,
        "summary": summary,
        "targets_at_eps8": verdict,
        "runs": runs,
        "environment": environment(),
    })
    (Path(__file__).resolve().parent / "results" / f"{a.save}.partial.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
