"""Run every attack and the gate on one synthetic table."""

from __future__ import annotations

import time

import pandas as pd

from dpsynth.schema import Schema

from . import attacks as A
from . import text as T
from .gate import decide
from .policy import Policy, default_policy


def _notes(df: pd.DataFrame, col: str) -> list[str]:
    if col not in df:
        return []
    return [v for v in df[col].tolist() if isinstance(v, str) and v]


def run_audit(train: pd.DataFrame, holdout: pd.DataFrame, synthetic: pd.DataFrame, schema: Schema, *,
              policy: Policy | None = None, dp: dict | None = None, seed: int = 0, progress=None,
              empirical: bool = True, model_dir=None, sites: int = 1) -> dict:
    """``dp``: the model's privacy facts (manifest 'privacy' section or synthetic provenance).

    Notes (issue 7): when the schema has a text column and train, holdout and synthetic all hold notes, the
    verbatim word 8-gram overlap and identifier replay in notes are added; when ``model_dir`` holds planted
    canaries (``canaries.json``), the canary exposure of its note model is measured with ``train`` as the host
    records (the audit runs at the data holder, on the file the model was trained on).

    ``sites``: how many sites audit the same release (federation); see ``gate.decide``."""
    policy = policy or default_policy()
    say = progress or (lambda msg: None)
    t0 = time.time()
    timings = {}
    a = A.prepare(train, holdout, synthetic, schema, max_victims=int(policy.audit.get("max_victims", 2000)), seed=seed)
    results = {}
    qi = policy.audit.get("quasi_identifiers") or None
    steps = [
        ("mia_distance", lambda: A.mia_distance(a)),
        ("mia_density", lambda: A.mia_density(a)),
        ("attribute_inference", lambda: A.attribute_inference(a, qi)),
        ("inference_risk", lambda: A.inference_risk(a)),
        ("nnaa", lambda: A.nnaa(a, seed=seed)),
        ("dcr", lambda: A.dcr_share(a, seed=seed)),
        ("exact_copies", lambda: A.exact_copies(train, holdout, synthetic, schema)),
        ("identifier_replay", lambda: A.identifier_replay(train, synthetic, schema)),
    ]
    text_cols = schema.of_kind("text")
    if len(text_cols) == 1:
        col = text_cols[0].name
        tr_n, ho_n, sy_n = _notes(train, col), _notes(holdout, col), _notes(synthetic, col)
        if tr_n and ho_n and sy_n:
            steps += [
                ("notes_ngram_overlap", lambda: T.ngram_overlap(sy_n, tr_n, ho_n, seed=seed)),
                ("notes_identifier_replay", lambda: T.note_identifier_replay(sy_n, tr_n, ho_n)),
            ]
    if model_dir is not None and T.load_canaries(model_dir):
        n_cand = int(policy.audit.get("canary_candidates", 1000))
        steps.append(("notes_canary_exposure", lambda: T.model_exposure(model_dir, train, n_candidates=n_cand, seed=seed)))
    for name, fn in steps:
        say(f"audit: {name} ...")
        t = time.time()
        results[name] = fn()
        timings[name] = round(time.time() - t, 3)
    if empirical and dp and dp.get("differentially_private") and dp.get("noise_multiplier"):
        say("audit: one-run canary audit of the DP-SGD step ...")
        t = time.time()
        results["empirical_epsilon"] = empirical_audit(dp, seed=seed)
        timings["empirical_epsilon"] = round(time.time() - t, 3)
    gate = decide(results, dp, policy, sites=sites)
    return {
        "format": "dpsynth-audit/1",
        "sample": a.info,
        "attacks": results,
        "gate": gate,
        "dp": dp,
        "policy": policy.to_json(),
        "seconds": round(time.time() - t0, 2),
        "timings": timings,
    }


def empirical_audit(dp: dict, *, max_steps: int = 300, seed: int | None = None) -> dict:
    """Canary audit of the model's DP-SGD configuration (σ, q, C). Runs are capped at ``max_steps``; the
    claimed ε is recomputed for exactly the steps run, so the comparison is like for like."""
    from dpsynth.privacy.accountant import Mechanism, SiteAccountant

    from .canary import one_run_audit

    steps = int(min(dp["steps"], max_steps))
    claimed = SiteAccountant([Mechanism("dp-sgd", dp["noise_multiplier"], dp["sample_rate"], steps)]).epsilon(dp["delta"])
    res = one_run_audit(noise_multiplier=dp["noise_multiplier"], sample_rate=dp["sample_rate"], steps=steps,
                        max_grad_norm=dp["max_grad_norm"], delta=dp["delta"], claimed_epsilon=claimed, seed=seed)
    res["claimed_epsilon_note"] = f"ε of {steps} steps at the model's σ and q (the model itself: {dp.get('epsilon')})"
    return res
