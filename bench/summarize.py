"""Print the README's benchmark tables from bench/results/*.json (the README quotes exactly this output)."""

from __future__ import annotations

import json
from pathlib import Path

R = Path(__file__).resolve().parent / "results"


def load(name):
    p = R / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def f(v, d=3):
    return "n/a" if v is None else f"{v:.{d}f}"


def main() -> None:
    u = load("utility")
    if u:
        print("**`bench/utility.py`** — NAFLD demo cohort, the default chained patient (DP-WGAN 120 epochs + DP vitals "
              "flow 60 epochs, equal budget shares, expected batch 1,024), "
              f"{len(u['runs']) // max(1, len(u['summary']))} seeds per setting, mean ± sd "
              f"(2 CPU cores; {u['environment']['time_utc'][:10]}):\n")
        keys = [("tstr_trtr_auroc_ratio", "TSTR/TRTR AUROC", 3), ("mean_apd", "mean APD", 4),
                ("correlation_distance", "corr. distance", 3), ("mean_wasserstein", "mean W1", 3),
                ("latent_cluster", "latent cluster", 4), ("concept_abundance", "concept abundance", 3),
                ("constraint_violation_rate", "constraint viol.", 3), ("shap_topk_overlap", "SHAP top-k overlap", 2)]
        print("| setting | ε spent | " + " | ".join(k[1] for k in keys) + " | fit s (median) | peak MB |")
        print("|---" * (len(keys) + 4) + "|")
        order = sorted(u["summary"], key=lambda s: (s == "non-private", float(s.split("=")[1]) if "=" in s else 0))
        for name in order:
            s = u["summary"][name]
            runs = [r for r in u["runs"] if (f"eps={r['epsilon_target']}" if r["epsilon_target"] is not None else "non-private") == name]
            eps = max((r["epsilon_spent"] or 0) for r in runs) if name != "non-private" else None
            cells = [f"{f(s[k]['mean'], d)} ± {f(s[k]['std'], d)}" if k in s else "n/a" for k, _, d in keys]
            fit_median = sorted(r["fit_seconds"] for r in runs)[len(runs) // 2]  # robust to a run slowed by other jobs
            print(f"| {name} | {f(eps, 2) if eps else '—'} | " + " | ".join(cells) + f" | {fit_median:.0f} | {s['peak_rss_mb_max']:.0f} |")
        ref = u["holdout_as_synthetic_reference"]
        print("| holdout as 'synthetic' (reference) | — | " + " | ".join(f(ref.get(k), d) for k, _, d in keys) + " | — | — |")
        print()
    d = load("dp_overhead")
    if d:
        print(f"**`bench/dp_overhead.py`** — one critic step, batch {d['shape']['batch']}, "
              f"{d['shape']['rows']:,} × {d['shape']['cols']:,} sparse binary + 4 continuous, hidden {d['shape']['hidden']}: "
              f"non-DP {d['plain']['step_ms_median']:.1f} ms, DP (Opacus ghost clipping) {d['dp']['step_ms_median']:.1f} ms → "
              f"ratio **{d['dp_over_plain_time_ratio']:.2f}** (target ≤ 1.3); peak memory with the whole training set held "
              f"in memory: {d['dp']['peak_rss_mb']:.0f} MB DP, {d['plain']['peak_rss_mb']:.0f} MB non-DP (target ≤ 2,048 MB).\n")
    d = load("malloc")
    if d:
        g, t = d["runs"]["glibc_defaults"], d["runs"]["tuned"]
        print(f"**`bench/malloc.py`** — the DP note model's step (batch {g['batch']}, mean of {g['steps']} steps, 2 threads) "
              f"with glibc's default malloc: {g['seconds_per_step']:.1f} s, {g['kernel_s']:.0f} s in the kernel; with the "
              f"Makefile's {', '.join(f'{k}={v}' for k, v in d['settings'].items())}: {t['seconds_per_step']:.1f} s, "
              f"{t['kernel_s']:.0f} s in the kernel → **{d['speedup']:.2f}×** faster; peak RSS {g['peak_rss_mb']:.0f} → "
              f"{t['peak_rss_mb']:.0f} MB.\n")
    d = load("note_step")
    if d:
        v = d["variants"]
        cells = [f"{k.replace('_', ' ')} {r['seconds_per_step']:.2f} s, {r['peak_rss_mb']:.0f} MB"
                 + (f" ({d['speedup_vs_baseline'][k]:.2f}×)" if k != d["baseline"] else "") for k, r in v.items()]
        r0 = next(iter(v.values()))
        print(f"**`bench/note_step.py`** — one DP step of the default note model (batch {r0['batch']}, mean of "
              f"{r0['steps']} steps, 2 threads, {d['environment']['time_utc'][:10]}), seconds and peak RSS by Opacus mode, "
              f"length chunks and book-keeping clipping (speed-up against {d['baseline']} in the same run): {'; '.join(cells)}.\n")
    s = load("audit_speed")
    if s:
        parts = []
        for case in ("nafld", "mimic"):
            if case in s:
                c = s[case]
                parts.append(f"{case}: {c['seconds_audit']:.1f} s, peak {c['peak_rss_mb']:.0f} MB "
                             f"({c['victims']} victims per group; rows {c['rows']})")
        print("**`bench/audit_speed.py`** — full audit incl. the canary audit: " + "; ".join(parts) +
              " (targets: NAFLD ≤ 20 s, MIMIC shape ≤ 300 s, ≤ 4,096 MB)." + (f" {s['note']}" if s.get("note") else "") + "\n")
    c = load("audit_controls")
    if c:
        print("**`bench/audit_controls.py`** — gate verdicts on NAFLD:\n")
        checks = ["mia_distance.auc", "mia_distance.f1", "mia_density.auc", "attribute_inference.residual",
                  "inference_risk.risk", "nnaa.privacy_loss", "dcr.share", "empirical_epsilon.lower_bound"]
        print("| release | verdict | " + " | ".join(checks) + " |")
        print("|---" * (len(checks) + 2) + "|")
        for name, case in c["cases"].items():
            cells = []
            for k in checks:
                ch = case["checks"].get(k)
                if not ch or ch["value"] is None:
                    cells.append("—")
                else:
                    ci = f" [{ch['ci'][0]:.2f}, {ch['ci'][1]:.2f}]" if ch.get("ci") else ""
                    cells.append(f"{ch['value']:.3f}{ci}")
            print(f"| {name} | {case['verdict']} | " + " | ".join(cells) + " |")
        print()
    v = load("vitals")
    if v:
        n_seeds = max(x["runs"] for x in v["summary"].values())
        cols = list(v["holdout_reference"]["columns"])
        print(f"**`bench/vitals.py`** — continuous columns of the synthetic patient, KS statistic against the training "
              f"data (mean ± sd over {n_seeds} seeds); bmi error on the models' raw output (before generation recomputes "
              f"bmi from weight and height): share of rows off by > 5 % and mean relative error "
              f"({v['environment']['time_utc'][:10]}):\n")
        print("| model @ setting | " + " | ".join(f"KS {c}" for c in cols) + " | mean KS | bmi viol. (raw) | bmi rel. error (raw) | fit s |")
        print("|---" * (len(cols) + 5) + "|")

        def order(k):
            var, _, setting = k.partition(" @ ")
            return (setting == "non-private", float(setting.split("=")[1]) if "=" in setting else 0, var)

        for k in sorted(v["summary"], key=order):
            s_ = v["summary"][k]
            cells = [f"{f(s_['columns'][c]['ks']['mean'])} ± {f(s_['columns'][c]['ks']['std'])}" if s_["columns"][c]["ks"] else "n/a"
                     for c in cols]
            print(f"| {k} | " + " | ".join(cells) + f" | **{f(s_['mean_ks']['mean'])}** | "
                  f"{f(s_['bmi_violation_rate_raw']['mean'])} | {f(s_['bmi_mean_rel_error_raw']['mean'], 4)} | "
                  f"{s_['fit_seconds_mean']:.0f} |")
        ref = v["holdout_reference"]
        print("| holdout (reference) | " + " | ".join(f(ref["columns"][c]["ks"]) for c in cols) +
              f" | {f(ref['mean_ks'])} | {f(ref['bmi_raw']['violation_rate'])} | {f(ref['bmi_raw']['mean_rel_error'], 4)} | — |")
        t = v.get("targets_at_eps3") or {}
        print("\nTargets at ε = 3: " + ", ".join(f"{k} **{'met' if ok else 'NOT met'}**" for k, ok in t.items()) + ".\n")
    def m(x, d=3):
        return "—" if not x else f"{x['mean']:.{d}f}" + (f" ± {x['std']:.{d}f}" if x.get("n", 1) > 1 else "")

    for name in ("notes", "notes_eps8_seeds123", "notes_eps8_seed4", "notes_prior_eps8", "notes_prior_eps3_np", "notes_band_eps8",
                 "notes_hooks_eps8", "notes_book_eps8", "notes_book_eps8_seeds1234", "notes_share09_eps8"):
        nb = load(name)
        if not nb:
            continue
        tc = nb["text_config"]
        print(f"**`bench/notes.py`**{'' if name == 'notes' else f' ({name})'} — notes of the chained patient on the demo cohort (rendered demonstration notes, not "
              f"real clinical text), {nb['runs'][0]['n_synthetic']} synthetic patients, {nb['canaries_per_count']} "
              f"canaries per repetition count, note model {tc if isinstance(tc, str) else ', '.join(f'{k} {v}' for k, v in tc.items())} "
              f"({nb['environment']['time_utc'][:10]}, 2 cores):\n")
        print("| setting | note-model training s | whole fit s | condition consistency | value consistency | note TSTR/TRTR | two-sample AUC | "
              "distinct-2 syn / real | self-BLEU syn / real | perplexity holdout / train | canary exposure, bits, 0× (controls) / 1× / 4× / 16× "
              f"(chance {nb['runs'][0]['canary_exposure']['chance']:.2f}; gate: lower bound of 16×) | 8-gram overlap excess |")
        print("|---" * 12 + "|")
        order = sorted(nb["summary"], key=lambda k: (k == "non-private", float(k.split("=")[1]) if "=" in k else 0))
        for k in order:
            s_ = nb["summary"][k]
            exp = s_["canary_exposure"].get("16") or {}
            exps = " / ".join(f"{s_['canary_exposure'][c]['mean']['mean']:.2f}" for c in ("0", "1", "4", "16") if c in s_["canary_exposure"])
            print(f"| {k} | {m(s_['text_phase_seconds'], 0)} | {m(s_['fit_seconds'], 0)} | {m(s_.get('consistency'))} | "
                  f"{m(s_.get('value_consistency'))} | {m(s_.get('tstr_ratio'))} | {m(s_.get('two_sample_auc'))} | {m(s_.get('distinct_2_synthetic'))} / "
                  f"{m(s_.get('distinct_2_real'))} | {m(s_.get('self_bleu_synthetic'))} / {m(s_.get('self_bleu_real'))} | "
                  f"{m(s_.get('perplexity_holdout'), 2)} / {m(s_.get('perplexity_train'), 2)} | {exps} "
                  f"(16× lower bound {exp.get('lower_bound_max', float('nan')):.2f}"
                  + (f"; {exp['pooled']['n']} pooled: {exp['pooled']['lower_bound']:.2f}" if exp.get("pooled") and s_["runs"] > 1 else "")
                  + f") | {m(s_.get('ngram_overlap_excess'), 4)} |")
        t = nb.get("targets_at_eps8") or {}  # none when the file has no ε = 8 run
        verdict = ("Targets at ε = 8: " + ", ".join(f"{k} **{'met' if ok else 'NOT met'}**" for k, ok in t.items()) + "."
                   if t else "")
        print("\n" + " ".join(x for x in (verdict, nb.get("note") or "") if x) + "\n")
    ns = load("notes_steps")
    if ns:
        pts = "; ".join(f"{p['epochs']} epochs ({p['steps']} steps, {p['train_seconds']:.0f} s): {p['consistency']:.2f}"
                        for p in ns["points"])
        tcs = ns["text_config"]  # runs before condition dropout / guidance existed had neither
        print(f"**`bench/notes_steps.py`** — the note model alone, NON-PRIVATE (TextConfig of "
              f"{ns['environment']['time_utc'][:10]}: batch {tcs.get('batch_size')}, lr {tcs['lr']}, condition dropout {tcs.get('cond_dropout', 0)}, "
              f"guidance {tcs.get('guidance', 1.0)}; {ns['train_notes']} "
              f"training notes, {ns['evaluated_prompts']} holdout records prompted), condition consistency after: {pts} "
              f"(real-note ceiling {ns['points'][-1]['ceiling']:.2f}).\n")
    # notes_guidance_batch256: the conditioning-path comparison at the TextConfig before the batch change
    for name in ("notes_guidance_batch256", "notes_guidance", "notes_guidance_seed1"):
        ng = load(name)
        if not (ng and "models" in ng):
            continue
        r0 = ng["models"][0]  # runs before per-variant noise recorded one σ for all
        noise = (f"σ {ng['noise_multiplier']}, {ng['steps']} steps, q {ng['sample_rate']:.4f}: the ε = 8 fit's at the "
                 f"TextConfig of the time, batch {ng['text_config']['batch_size']}" if "noise_multiplier" in ng
                 else f"σ {r0['noise_multiplier']:.2f}, {r0['steps']} steps, q {r0['sample_rate']:.4f}: the ε = 8 fit's")
        print(f"**`bench/notes_guidance.py`**{'' if name == 'notes_guidance' else f' ({name})'} — seed {ng.get('seed', 0)}, the note model alone, DP ({noise}), one model per set of conditioning paths, notes for "
              f"{ng['evaluated_prompts']} holdout records; condition consistency / real-vs-synthetic AUC at guidance w "
              f"and plausibility α ({ng['environment']['time_utc'][:10]}):\n")
        pts0 = ng["models"][0]["points"]
        print("| condition → vocabulary path | clipping | train s | final loss | " + " | ".join(
            f"w {p['guidance']:g}, α {p['plausibility']:g}" for p in pts0) + " |")
        print("|---|---|---|---|" + "---|" * len(pts0))
        for r in ng["models"]:
            v = r["variant"]
            share = v.get("cond_clip_share", 0.0)
            clip = f"two-group, path share {share:g}" if v["cond_vocab"] and share > 0 else "flat"
            if v.get("cond_sparse") and v["cond_vocab"]:
                clip += f"; row-sparse path; batch {v['batch_size']}, lr {v['lr']:g}"
            print(f"| {'yes' if v['cond_vocab'] else 'no'} | {clip} | {r['train_seconds']:.0f} | "
                  f"{r['final_loss']:.2f} | " + " | ".join(f"{p['consistency']:.2f} / {p['two_sample_auc']:.3f}"
                                                         for p in r["points"]) + " |")
        print(f"\n(real-note ceiling {pts0[-1]['ceiling']:.2f})\n")
    def setting(v):
        return ", ".join(f"{k} {x:g}" if isinstance(x, float) else f"{k} {x}" for k, x in sorted(v.items())) or "defaults"

    for name in ("notes_sweep_gpu", "notes_sweep_gpu2", "notes_sweep_gpu3"):
        sw = load(name)
        if not sw:
            continue
        print(f"**`bench/notes_sweep.py`** ({name}) — the note model alone at the ε = {sw['epsilon']:g} fit's privacy loss "
              f"(σ rule {sw['sigma_rule']}), {sw['prompts']} holdout records prompted, one run per seed "
              f"({sw['environment'].get('date') or sw['environment']['time_utc'][:10]}, {sw['environment'].get('gpu', 'CPU')}); "
              f"condition consistency mean (min) over seeds" + (f" ({sw['note'].rstrip('.')})" if sw.get("note") else "") + ":\n")
        print("| setting | sampling | seeds | σ | steps | consistency | final loss | cardiac arrest | MI | AF |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in sw["summary"]:
            c = r["conditions"]
            print(f"| {setting(r['variant'])} | {setting(r['sampling']) if r.get('sampling') else 'TextConfig of the time'} | {len(r['seeds'])} | {r['sigma']:.2f} | "
                  f"{r['steps']} | {r['mean']:.3f} ({r['min']:.3f}) | {r['final_loss']:.2f} | "
                  f"{c.get('cardiac_arrest', float('nan')):.2f} | {c.get('mi', float('nan')):.2f} | "
                  f"{c.get('afib', float('nan')):.2f} |")
        print()
    for name in ("notes_canaries", "notes_prior", "notes_paired_s2", "notes_band_s0", "notes_sweep_fed", "notes_share033"):
        sw = load(name)
        if not sw:
            continue
        print(f"**`bench/notes_sweep.py`** ({name}, CPU, {sw['environment']['time_utc'][:10]}) — "
              + (f"{sw['note'].rstrip('.')}" if sw.get("note") else "") + ":\n")
        print("| setting | seeds | σ | steps | consistency | value consistency | 16× canaries: mean bits, lower bounds "
              "(runs above chance / above the gate's allowance) |")
        print("|---|---|---|---|---|---|---|")
        for r in sw["summary"]:
            sig = r["sigma"] if isinstance(r["sigma"], list) else [r["sigma"]]
            stp = r["steps"] if isinstance(r["steps"], list) else [r["steps"]]
            e = (r.get("canary_exposure") or {}).get("16")
            can = (f"{e['mean']:.2f}, {' / '.join(f'{x:.2f}' for x in e['lower_bounds'])} ({e['above_chance']} / "
                   f"{e['above_gate_allowance']} of {len(e['lower_bounds'])})" if e else "—")
            print(f"| {setting(r['variant'])} | {', '.join(map(str, r['seeds']))} | {'/'.join(f'{x:.2f}' for x in sig)} | "
                  f"{'/'.join(map(str, stp))} | {r['mean']:.3f} | {r['value_consistency']:.3f} | {can} |")
        dps = {}  # one line per distinct note-model privacy loss (a budget-share variant has its own)
        for r in sw["summary"]:
            if r.get("canary_dp"):
                dps.setdefault(round(r["canary_dp"]["gdp_mu"], 2), (r["canary_dp"], setting(r["variant"])))
        for dp, name in dps.values():
            print(f"\n(the note model's privacy loss as μ-GDP{'' if len(dps) == 1 else f' ({name})'}: μ = {dp['gdp_mu']:.2f}; "
                  "group privacy allows a 5 %-level test that a secret shared by k patients was trained on a power of at most "
                  + ", ".join(f"{v:.2f} ({k}×)" for k, v in sorted(dp["max_test_power_5pct"].items(), key=lambda kv: int(kv[0])))
                  + ")")
        print()
    adv = load("notes_adv_s0")
    if adv:
        print(f"**`bench/notes_sweep.py`** (notes_adv_s0, CPU, {adv['environment']['time_utc'][:10]}) — "
              f"{adv['note'].rstrip('.')}:\n")
        print("| setting | σ MLE / critic | ε of the note mechanisms | training s | condition consistency | value consistency | "
              "note TSTR/TRTR | two-sample AUC | distinct-2 / self-BLEU | perplexity holdout | critic loss first / last "
              "(chance 1.39) | 16× canaries' lower bound |")
        print("|---" * 12 + "|")
        for r in adv["runs"]:
            mt, a = r["metrics"], r.get("adversarial")
            if a:
                head = f"| MLE + adversarial stage | {r['sigma']:.3f} / {a['critic_sigma']:.3f} | {a['epsilon_note_mechanisms']:.2f} | "
            else:  # the MLE-alone fit's ε is recorded with the adversarial run it is the target of
                e = next(x["adversarial"]["epsilon_mle_alone"] for x in adv["runs"] if x.get("adversarial"))
                head = f"| MLE alone | {r['sigma']:.3f} / — | {e:.2f} | "
            print(head + f"{r['train_seconds']:.0f} | {mt['consistency']:.3f} | {mt['value_consistency']:.3f} | "
                  f"{mt['tstr_ratio']:.3f} | {mt['two_sample_auc']:.3f} | {mt['distinct_2_synthetic']:.3f} / "
                  f"{mt['self_bleu_synthetic']:.3f} | {mt['perplexity_holdout']:.2f} | "
                  + (" / ".join(f"{x:.3f}" for x in a["critic_loss_first_last"]) if a else "—")
                  + f" | {r['canary_exposure']['16']['lower_bound']:.2f} |")
        print()
    for name in ("demo_fed", "demo_fed_share09", "demo_fed_notes", "demo_fed_notes_share"):
        fd = load(name)
        if not fd:
            continue
        eps = ", ".join(f"{k} {v:.2f}" for k, v in fd["site_epsilon"].items())
        rc = fd.get("run_config") or {}
        extra = ""
        if rc:
            extra += f"; {rc.get('rounds')} rounds × {rc.get('local-epochs')} local epochs"
            if rc.get("budget-shares"):
                extra += f", budget shares {rc['budget-shares']}"
        if fd.get("run_config_extra"):
            extra += f"; run config {fd['run_config_extra']}"
        if fd.get("site_sigma"):
            extra += "; WGAN σ " + ", ".join(f"{k} {v:.2f}" for k, v in fd["site_sigma"].items())
        if fd.get("site_tstr_trtr_auroc"):
            extra += ("; TSTR/TRTR AUROC at the sites " + ", ".join(f"{k} {v:.2f}" for k, v in fd["site_tstr_trtr_auroc"].items())
                      + " (a short demo run, not the utility benchmark: see `bench/federated_vs_central.py`)")
        if fd.get("release_note_consistency") is not None:
            cond = fd["release_note_conditions"]
            extra += (f"; released notes ({fd['release_notes']}): condition consistency "
                      f"{fd['release_note_consistency']:.3f}, value consistency {fd['release_note_value_consistency']:.3f} "
                      f"(HTN {cond.get('htn', float('nan')):.2f}, diabetes {cond.get('diabetes', float('nan')):.2f}, "
                      f"AF {cond.get('afib', float('nan')):.2f})")
        target = ("" if fd["meets_target"] is None else
                  f"; target ≤ 300 s: {'met' if fd['meets_target'] else 'NOT met'}; "
                  f"stretch ≤ 120 s: {'met' if fd['wall_seconds'] <= 120 else 'not met'}")
        what = "`make demo` after set-up" if name in ("demo_fed", "demo_fed_share09") else "the federated demo with a larger note model"
        print(f"**`bench/demo_fed.py`**{'' if name == 'demo_fed' else f' ({name})'} — {what}: {fd['wall_seconds']:.0f} s "
              f"wall, one run ({fd['environment']['time_utc'][:10]}{target}){extra}; site ε {eps}; "
              f"consortium ε {fd['consortium_epsilon']:.2f}; gate {fd['verdict']}." + (f" {fd['note']}" if fd.get("note") else "")
              + "\n")
    fc = load("federated_vs_central")
    if fc:
        f_, c_ = fc["mean"]["federated"], fc["mean"]["central"]
        print(f"**`bench/federated_vs_central.py`** — ε = {fc['epsilon_per_site']:g} per site, {fc['rounds']} rounds × "
              f"{fc['local_epochs']} local epochs, {len(fc['runs'])} seed(s): TSTR/TRTR federated {f_['tstr_trtr_auroc_ratio']:.2f} vs "
              f"central {c_['tstr_trtr_auroc_ratio']:.2f} → **{fc['federated_over_central_tstr']:.0%} of central** (target ≥ 95 %: "
              f"{'met' if fc['meets_target'] else 'not met'}; per seed "
              + ", ".join(f"{r['federated']['tstr_trtr_auroc_ratio'] / r['central']['tstr_trtr_auroc_ratio']:.0%}" for r in fc["runs"])
              + f"; models {fc.get('models', 'wgan')}); mean APD {f_['mean_apd']:.3f} vs {c_['mean_apd']:.3f}; correlation distance "
              f"{f_['correlation_distance']:.3f} vs {c_['correlation_distance']:.3f}.\n")


if __name__ == "__main__":
    main()
