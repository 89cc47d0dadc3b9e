"""`dpsynth` command line. Every error is one line naming the file/column/value, with a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

from . import __version__
from .errors import DpsynthError

log = logging.getLogger("dpsynth")
TEXT_EPOCHS = 5  # models.text.TextConfig().epochs (kept here so `dpsynth --help` does not import torch)
TEXT_BATCH = 768  # models.text.TextConfig().batch_size (likewise)


def _positive_int(v: str) -> int:
    i = int(v)
    if i <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return i


def _nonneg_int(v: str) -> int:
    i = int(v)
    if i < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {v}")
    return i


def _float(v: str) -> float:
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {v!r}") from None


# ---- commands -------------------------------------------------------------------------------------

def cmd_demo_data(a) -> int:
    from .data.demo import write_demo

    s = write_demo(a.out, notes=a.notes)
    print(f"NAFLD demo cohort: {s['patients']} patients → train {s['train']}, holdout {s['holdout']}, "
          f"sites {s['sites']} (mean age {s['site_mean_age']})")
    if a.notes:
        print(f"column 'note': {s['notes']} — one per patient, rendered from its own record")
    print(f"wrote {a.out}/train.csv holdout.csv site_*.csv schema.json")
    return 0


def _load_validated(data: str, schema):
    from .data.io import read_table
    from .schema import validate_frame

    return validate_frame(read_table(data), schema, source=data)


def cmd_schema_infer(a) -> int:
    from .data.io import read_table
    from .schema import infer_schema

    out = Path(a.out)
    if out.exists() and not a.overwrite:
        raise DpsynthError(f"{out} already exists (pass --overwrite to replace it)")
    if a.epsilon is not None and a.epsilon <= 0:
        raise DpsynthError(f"--epsilon must be positive, got {a.epsilon}")
    df = read_table(a.data)
    schema = infer_schema(df, name=Path(a.data).stem, epsilon=a.epsilon, delta=a.delta)
    schema.save(out)
    sp = schema.dp_spend
    if sp:
        print(f"DP schema inference spent ε={sp['epsilon']:g} (δ={sp['delta']:g}) on {a.data}; "
              "`dpsynth train` counts it inside its --epsilon")
    if schema.status == "draft":
        pending = [c.name for c in schema.columns if c.review]
        print(f"wrote DRAFT schema {out}: {len(schema.columns)} columns; review before training: {', '.join(pending)}")
        print("`dpsynth train` refuses it until each 'review' note is resolved and status is 'reviewed'")
    else:
        print(f"wrote schema {out}: {len(schema.columns)} columns")
    return 0


def cmd_train(a) -> int:
    from .io_utils import sha256_file
    from .schema import Schema
    from .train import TrainConfig, train

    if a.seed is not None and not a.non_private:
        raise DpsynthError("--seed is refused for DP training: noise and sampling must come from fresh entropy "
                           "(use it only with --non-private)")
    if a.non_private:
        print("WARNING: --non-private: the model and everything generated from it are NOT differentially private",
              file=sys.stderr)
    elif a.epsilon is None and not a.resume:
        raise DpsynthError("--epsilon is required (or --non-private for a comparison model)")
    schema = Schema.load(a.schema)
    schema.require_reviewed(a.schema)
    df = _load_validated(a.data, schema)
    from .models.flow import FlowConfig
    from .models.text import TextConfig
    from .train import parse_budget_shares, resolve_models, text_column

    models = None if a.models is None else tuple(m.strip() for m in a.models.split(",") if m.strip())
    shares = parse_budget_shares(a.budget_shares)
    cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, max_grad_norm=a.max_grad_norm,
                      checkpoints=a.checkpoints, select=not a.no_select, profile=a.profile, models=models,
                      budget_shares={**TrainConfig().budget_shares, **shares},
                      flow=FlowConfig(epochs=a.flow_epochs), text=TextConfig(epochs=a.text_epochs, batch_size=a.text_batch_size),
                      canaries=a.canaries)
    cfg = resolve_models(cfg, schema)
    if "text" in cfg.models and not a.resume:
        text_column(schema)  # exactly one text column, or a clear error before reading anything else
    res = train(df, schema, out=a.out, epsilon=a.epsilon, delta=a.delta, config=cfg, non_private=a.non_private,
                resume=a.resume, overwrite=a.overwrite, data_path=str(Path(a.data).resolve()),
                data_sha256=sha256_file(a.data), seed=a.seed, progress=not a.quiet)
    p = res.manifest["privacy"]
    if p["differentially_private"]:
        print(f"trained {a.out}: ε={res.epsilon:.3f} (target {p['target_epsilon']:g}), δ={res.delta:g}, "
              f"{res.seconds:.1f}s")
        for name, m in p["models"].items():
            print(f"  {name:<5} {m['steps']} DP-SGD steps, σ={m['noise_multiplier']:.3f}, q={m['sample_rate']:.4f}, "
                  f"budget share {m['share']:g} (ε {m['epsilon_alone']:.3f} if it were alone)")
    else:
        print(f"trained {a.out}: NOT DIFFERENTIALLY PRIVATE ({res.steps} steps, {res.seconds:.1f}s)")
    clipped = res.manifest["data"]["clipped_values"]
    if clipped:
        print(f"values outside the schema bounds were clipped: {clipped}")
    notes = res.manifest["data"].get("notes")
    if notes:
        print(f"notes ({notes['column']!r}): {notes['trained_on']} used, {notes['missing']} missing (dropped), "
              f"{notes['empty']} empty, {notes['truncated']} truncated, {notes['replaced_bytes']} invalid bytes replaced"
              + (f"; {notes['canary_notes_planted']} canary notes planted (secrets in {a.out}/canaries.json only)"
                 if notes.get("canary_notes_planted") else ""))
    return 0


def cmd_generate(a) -> int:
    from .data.io import write_table
    from .generate import generate, provenance
    from .io_utils import atomic_write_json, sha256_file

    out = Path(a.out)
    if out.exists() and not a.overwrite:
        raise DpsynthError(f"{out} already exists (pass --overwrite to replace it)")
    df, manifest = generate(a.model, a.n, seed=a.seed)
    write_table(df, out)
    prov = provenance(manifest, a.model, len(df))
    prov["model_manifest_sha256"] = sha256_file(Path(a.model) / "manifest.json")
    prov["file_sha256"] = sha256_file(out)
    atomic_write_json(str(out) + ".provenance.json", prov)
    if not prov["differentially_private"]:
        print(f"WARNING: {out} is NOT DIFFERENTIALLY PRIVATE (model trained with --non-private)", file=sys.stderr)
    print(f"wrote {len(df)} synthetic patients to {out} (provenance: {out}.provenance.json)")
    if prov.get("notes"):
        print(f"notes: {prov['notes']['label']} (trained on: {prov['notes']['trained_on']})")
    return 0


def cmd_evaluate(a) -> int:
    from .data.io import read_table
    from .io_utils import atomic_write_json, atomic_write_text, output_dir
    from .metrics.report import render_html
    from .metrics.utility import evaluate
    from .schema import Schema, validate_frame

    schema = Schema.load(a.schema)
    real = validate_frame(read_table(a.real), schema, a.real)
    hold = validate_frame(read_table(a.holdout), schema, a.holdout)
    syn = validate_frame(read_table(a.synthetic), schema, a.synthetic)
    note_model = note_tok = None
    if a.model:  # the note model's perplexity on the real training and holdout notes
        from .train import load_model, load_text

        manifest, _, _, _ = load_model(a.model)
        note_model, note_tok, _ = load_text(a.model, manifest, schema)
    t = time.time()
    res = evaluate(real, hold, syn, schema, label=a.label, note_model=note_model, note_tokenizer=note_tok)
    res["seconds"] = round(time.time() - t, 2)
    ctx = {"real": a.real, "holdout": a.holdout, "synthetic": a.synthetic, "schema": a.schema}
    prov_path = Path(str(a.synthetic) + ".provenance.json")
    if prov_path.exists():
        prov = json.loads(prov_path.read_text())
        ctx["differentially private"] = prov.get("differentially_private")
        ctx["epsilon"] = prov.get("epsilon")
        ctx["delta"] = prov.get("delta")
        res["provenance"] = prov
    with output_dir(a.out, overwrite=a.overwrite) as tmp:
        atomic_write_json(tmp / "utility.json", res)
        atomic_write_text(tmp / "report.html", render_html(res, title="dpsynth utility report", context=ctx))
    h = res["headline"]
    print("utility: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in h.items()))
    ns = (res.get("notes") or {}).get("summary")
    if ns:
        print("notes:   " + ", ".join(f"{k}={v:.3f}" for k, v in ns.items() if isinstance(v, float)))
    print(f"wrote {a.out}/utility.json and {a.out}/report.html")
    return 0


def cmd_keys_new(a) -> int:
    from .release import new_keys

    priv, pub = new_keys(a.out, a.name)
    print(f"wrote {priv} (private, mode 0600 — keep it secret) and {pub} (public, give to reviewers)")
    return 0


def _dp_facts(model: str | None, synthetic: str) -> tuple[dict | None, str | None, str]:
    """(privacy facts, model manifest sha256, where they came from)."""
    from .io_utils import read_json, sha256_file

    if model:
        mp = Path(model) / "manifest.json"
        if not mp.exists():
            raise DpsynthError(f"{model} is not a complete dpsynth model (no manifest.json)")
        return read_json(mp, "model manifest")["privacy"], sha256_file(mp), f"model {model}"
    prov = Path(str(synthetic) + ".provenance.json")
    if prov.exists():
        pv = read_json(prov, "provenance")
        mp = Path(pv.get("model", "")) / "manifest.json"
        if pv.get("model") and mp.exists() and sha256_file(mp) == pv.get("model_manifest_sha256"):
            return read_json(mp, "model manifest")["privacy"], pv["model_manifest_sha256"], f"model {pv['model']} (via {prov.name})"
        return ({k: pv.get(k) for k in ("differentially_private", "epsilon", "delta", "unit")},
                pv.get("model_manifest_sha256"), str(prov))
    return None, None, "none: pass --model"


def cmd_audit(a) -> int:
    from datetime import datetime, timezone

    from audits.audit import run_audit
    from audits.policy import Policy, default_policy
    from audits.report import render

    from .data.io import read_table
    from .io_utils import sha256_file
    from .metrics.utility import evaluate
    from .privacy.ledger import Ledger
    from .release import tool_versions, write_audit
    from .schema import Schema, validate_frame

    schema = Schema.load(a.schema)
    policy = Policy.load(a.policy) if a.policy else default_policy()
    real = validate_frame(read_table(a.real), schema, a.real)
    hold = validate_frame(read_table(a.holdout), schema, a.holdout)
    syn = validate_frame(read_table(a.synthetic), schema, a.synthetic)
    dp, model_sha, dp_source = _dp_facts(a.model, a.synthetic)
    res = run_audit(real, hold, syn, schema, policy=policy, dp=dp, progress=lambda m: print(m, file=sys.stderr),
                    model_dir=a.model)
    util = evaluate(real, hold, syn, schema, notes=False)["headline"]
    res.update({
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "synthetic_sha256": sha256_file(a.synthetic),
        "schema_sha256": schema.hash(),
        "provenance": {"real_sha256": sha256_file(a.real), "holdout_sha256": sha256_file(a.holdout),
                       "synthetic_sha256": sha256_file(a.synthetic), "schema_sha256": schema.hash(),
                       "model_manifest_sha256": model_sha, "dp_facts_from": dp_source},
        "utility": util,
        "versions": tool_versions(),
    })
    write_audit(a.out, res, render(res), overwrite=a.overwrite)
    log = Ledger(a.log or (Path(a.out).resolve().parent / "dpsynth-audit-log.jsonl"))
    log.append("audit", {"synthetic_sha256": res["synthetic_sha256"], "verdict": res["gate"]["verdict"],
                         "failed": res["gate"]["failed"], "out": str(a.out)})
    g = res["gate"]
    for c in g["checks"]:
        v = c["value"]
        vs = f"{v:.4g}" if isinstance(v, float) else str(v)
        print(f"  {'PASS' if c['passed'] else 'FAIL'}  {c['check']:<32} {vs:>10}  {c['comparison']} {c['threshold']}")
    print(f"gate verdict: {g['verdict']} ({res['seconds']} s); wrote {a.out}/audit.json and {a.out}/report.html")
    return 0 if g["passed"] else 4


def cmd_release(a) -> int:
    from .release import build_release

    man = build_release(synthetic=a.synthetic, audit_dir=a.audit, model_dir=a.model, key_path=a.key, out=a.out,
                        log_path=a.log, overwrite=a.overwrite)
    print(f"signed release in {a.out}: {len(man['files'])} files, key sha256 {man['signing_key_sha256'][:16]}…")
    return 0


def cmd_verify(a) -> int:
    from .release import verify_log, verify_release

    if a.log:
        n = verify_log(a.log)
        print(f"audit log {a.log}: {n} entries, hash chain intact")
    if a.bundle:
        if not a.public_key:
            raise DpsynthError("--public-key is required to verify a bundle")
        man = verify_release(a.bundle, a.public_key)
        print(f"release {a.bundle}: signature valid, {len(man['files'])} files intact, verdict {man['audit']['verdict']}")
    if not a.log and not a.bundle:
        raise DpsynthError("give a bundle directory and/or --log")
    return 0


def budget_view(model_dir: str) -> dict:
    from .io_utils import read_json
    from .privacy.accountant import SiteAccountant

    mdir = Path(model_dir)
    man = read_json(mdir / "manifest.json", "model manifest")
    p = man["privacy"]
    view = {
        "model": str(mdir),
        "differentially_private": p["differentially_private"],
        "epsilon": p["epsilon"],
        "delta": p["delta"],
        "target_epsilon": p["target_epsilon"],
        "epsilon_rdp_crosscheck": p["epsilon_rdp_crosscheck"],
        "accountant": p["accountant"],
        "unit": p["unit"],
        "adjacency": p["adjacency"],
        "sampling": p["sampling"],
        "steps": p["steps"],
        "noise_multiplier": p["noise_multiplier"],
        "max_grad_norm": p["max_grad_norm"],
        "sample_rate": p["sample_rate"],
        "extra_delta": p["extra_delta"],
        "preprocessing": p["preprocessing"],
        "selection": p["selection"].get("method"),
        "noise_rng": p["noise_rng"],
        "mechanisms": p["mechanisms"],
        "models": p.get("models", {}),
        "budget_split": p.get("budget_split"),
        "tokenizer": p.get("tokenizer"),
    }
    # recompute from the saved accountant state: the number printed is the number the state gives
    if p["differentially_private"]:
        acc = SiteAccountant.from_state(read_json(mdir / "accountant.json", "accountant state"))
        view["epsilon_recomputed"] = acc.epsilon(p["delta"])
    return view


def cmd_budget(a) -> int:
    v = budget_view(a.model)
    if a.json:
        print(json.dumps(v, indent=2))
        return 0
    if not v["differentially_private"]:
        print("NOT DIFFERENTIALLY PRIVATE (trained with --non-private)")
    else:
        print(f"ε = {v['epsilon']:.4f} at δ = {v['delta']:g}   (target ε {v['target_epsilon']:g}; "
              f"recomputed {v['epsilon_recomputed']:.4f}; RDP cross-check {v['epsilon_rdp_crosscheck']:.4f})")
    labels = {"steps": "critic steps", "noise_multiplier": "critic σ"}  # the flow's are listed per model below
    for k in ("accountant", "unit", "adjacency", "sampling", "steps", "noise_multiplier", "max_grad_norm",
              "sample_rate", "extra_delta", "preprocessing", "selection", "noise_rng"):
        print(f"  {labels.get(k, k):<17} {v[k]}")
    if v["models"]:
        print("  models trained on these patients (one accountant; ε 'alone' is not additive):")
        for name, m in v["models"].items():
            alone = f", ε alone {m['epsilon_alone']:.3f}" if "epsilon_alone" in m else ""
            sigma = "n/a" if m["noise_multiplier"] is None else f"{m['noise_multiplier']:.4g}"
            print(f"    - {name:<5} {m['mechanism']:<22} σ={sigma:<8} steps={m['steps']:<6} share={m['share']:g}{alone}")
            if m.get("clipping"):
                print(f"      clipping: {m['clipping']}")
    if v["budget_split"]:
        print(f"  budget split      {v['budget_split']['rule']}")
    if v["tokenizer"]:
        print(f"  tokenizer         {v['tokenizer']}")
    print("  mechanisms (compose all to recompute ε with any accountant):")
    for m in v["mechanisms"]:
        print(f"    - {m['mechanism']:<42} σ={m['noise_multiplier']:<10.5g} q={m['sample_rate']:<10.5g} steps={m['steps']}")
    return 0


def cmd_demo(a) -> int:
    """Single-site demo end to end on the embedded NAFLD cohort: data → DP training → synthetic patients →
    utility report → privacy audit → signed release → verification."""
    import shutil

    out = Path(a.out)
    data, model, syn, report = out / "data", out / "model", out / "synthetic.csv", out / "report"
    audit, release, keys = out / "audit", out / "release", out / "keys"
    if out.exists() and any(out.iterdir()):
        print(f"{out} holds an earlier demo: replacing its outputs (the signing keys in {keys} are kept)")
        for p in (data, model, report, audit, release):
            shutil.rmtree(p, ignore_errors=True)
        for p in (syn, Path(str(syn) + ".provenance.json")):
            if p.exists():
                p.unlink()
    t0 = time.time()
    steps = [
        ["demo-data", "--out", str(data)],
        ["train", "--data", str(data / "train.csv"), "--schema", str(data / "schema.json"), "--epsilon", str(a.epsilon),
         "--out", str(model)] + (["--quiet"] if a.quiet else []),
        ["budget", str(model)],
        ["generate", "--model", str(model), "--n", "10000", "--out", str(syn)],
        ["evaluate", "--real", str(data / "train.csv"), "--holdout", str(data / "holdout.csv"), "--synthetic", str(syn),
         "--schema", str(data / "schema.json"), "--model", str(model), "--out", str(report)],
    ]
    if not (keys / "release.key").exists():
        steps.append(["keys", "new", "--out", str(keys)])
    steps += [
        ["audit", "--real", str(data / "train.csv"), "--holdout", str(data / "holdout.csv"), "--synthetic", str(syn),
         "--schema", str(data / "schema.json"), "--model", str(model), "--out", str(audit)],
        ["release", "--synthetic", str(syn), "--audit", str(audit), "--model", str(model),
         "--key", str(keys / "release.key"), "--out", str(release)],
        ["verify", str(release), "--public-key", str(keys / "release.pub"), "--log", str(out / "dpsynth-audit-log.jsonl")],
    ]
    for argv in steps:
        print(f"\n$ dpsynth {' '.join(argv)}", flush=True)
        rc = main(argv)
        if rc:
            print(f"\ndemo stopped: `dpsynth {argv[0]}` exited {rc}", file=sys.stderr)
            return rc
    res = json.loads((report / "utility.json").read_text())
    gate = json.loads((audit / "audit.json").read_text())["gate"]
    man = json.loads((model / "manifest.json").read_text())["privacy"]
    h = res["headline"]
    print(f"\n== demo finished in {time.time() - t0:.0f}s ==")
    print(f"privacy:   ε = {man['epsilon']:.3f}, δ = {man['delta']:g} (unit: patient; accountant {man['accountant']})")
    print(f"utility:   TSTR/TRTR AUROC {h.get('tstr_trtr_auroc_ratio'):.3f}, mean APD {h['mean_apd']:.4f}, "
          f"correlation distance {h['correlation_distance']:.4f}  ({report / 'report.html'})")
    ns = (res.get("notes") or {}).get("summary")
    if ns:
        print(f"notes:     condition consistency {ns['consistency']:.3f} (real notes {ns['consistency_ceiling']:.3f}), "
              f"two-sample AUC {ns['two_sample_auc']:.3f}, note TSTR/TRTR {ns['tstr_ratio']:.3f}")
    print(f"audit:     {gate['verdict']}  ({audit / 'report.html'})")
    print(f"release:   {release}  (verify: dpsynth verify {release} --public-key {keys / 'release.pub'})")
    return 0


# ---- parser ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpsynth", description="Differentially private synthetic patient records.")
    p.add_argument("--version", action="version", version=f"dpsynth {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("demo", help="single-site demo end to end on the embedded NAFLD cohort")
    s.add_argument("--out", default="out")
    s.add_argument("--epsilon", type=_float, default=3.0)
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("demo-data", help="write the embedded NAFLD cohort: train/holdout, 3 sites, schema.json")
    s.add_argument("--out", required=True)
    s.add_argument("--notes", action=argparse.BooleanOptionalAction, default=True,
                   help="add a 'note' column of rendered demonstration notes, not real clinical text (default; "
                        "--no-notes: the structured record only)")
    s.set_defaults(func=cmd_demo_data)

    sch = sub.add_parser("schema", help="schema tools").add_subparsers(dest="schema_cmd", required=True)
    s = sch.add_parser("infer", help="draft schema from data (or DP-estimated with --epsilon)")
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--epsilon", type=_float, help="estimate bounds/categories with DP, spending this ε")
    s.add_argument("--delta", type=_float, help="δ for the DP estimate (default 1/(10·n))")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_schema_infer)

    s = sub.add_parser("train", help="DP training of the synthetic-record generator")
    s.add_argument("--data", required=True)
    s.add_argument("--schema", required=True)
    s.add_argument("--out", required=True, help="model directory")
    s.add_argument("--epsilon", type=_float, help="total privacy budget ε (includes schema inference and selection)")
    s.add_argument("--delta", type=_float, help="δ (default 1/(10·n), rounded down; must be < 1/n)")
    s.add_argument("--epochs", type=_positive_int, default=120)
    s.add_argument("--batch-size", type=_positive_int, default=1024, help="expected Poisson batch size")
    s.add_argument("--max-grad-norm", type=_float, default=1.0)
    s.add_argument("--checkpoints", type=_positive_int, default=5, help="generator snapshots to select from")
    s.add_argument("--no-select", action="store_true", help="keep the last checkpoint (no selection spend)")
    s.add_argument("--profile", choices=["A", "B"], default="A", help="selection weight profile (see docs)")
    s.add_argument("--models", default=None,
                   help="models to train: wgan (the record), flow (continuous columns given the record) and text "
                        "(a note given record + vitals; needs one schema column of kind 'text'); default: the "
                        "chained patient, wgan,flow plus text when the schema has a text column")
    s.add_argument("--flow-epochs", type=_positive_int, default=60, help="epochs of the vitals flow")
    s.add_argument("--text-epochs", type=_positive_int, default=TEXT_EPOCHS, help="epochs of the note model")
    s.add_argument("--text-batch-size", type=_positive_int, default=TEXT_BATCH,
                   help="expected Poisson batch of the note model over the patients with a note (default %(default)s, "
                        "measured on the demo's 12,260 notes: 16 steps per epoch; a cohort with far fewer notes needs "
                        "a smaller batch, e.g. its number of notes / 16)")
    s.add_argument("--canaries", type=_nonneg_int, default=0,
                   help="plant N secret-sharer canaries per repetition count (1, 4, 16) in the training notes for "
                        "the memorisation audit (kept in the model directory only)")
    s.add_argument("--budget-shares", default="",
                   help="how ε is split between the models, e.g. wgan=3,flow=1 (default wgan=1,flow=1,text=0.33); see "
                        "`dpsynth budget`")
    s.add_argument("--non-private", action="store_true", help="no clipping, no noise: comparison only")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--seed", type=int, help="only with --non-private")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("generate", help="sample synthetic patients")
    s.add_argument("--model", required=True)
    s.add_argument("--n", type=_positive_int, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, help="seed for sampling (post-processing; does not affect privacy)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("evaluate", help="utility report: JSON + self-contained HTML")
    s.add_argument("--real", required=True)
    s.add_argument("--holdout", required=True)
    s.add_argument("--synthetic", required=True)
    s.add_argument("--schema", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--label", help="binary label column for TSTR (default: the schema's label)")
    s.add_argument("--model", help="model directory: adds its note model's perplexity on the real notes")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_evaluate)

    keys = sub.add_parser("keys", help="release signing keys").add_subparsers(dest="keys_cmd", required=True)
    s = keys.add_parser("new", help="new Ed25519 key pair (private key 0600, never overwritten)")
    s.add_argument("--out", required=True)
    s.add_argument("--name", default="release")
    s.set_defaults(func=cmd_keys_new)

    s = sub.add_parser("audit", help="privacy attacks + release gate on a synthetic table")
    s.add_argument("--real", required=True, help="training data (members)")
    s.add_argument("--holdout", required=True, help="data no model saw (non-members, control)")
    s.add_argument("--synthetic", required=True)
    s.add_argument("--schema", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--model", help="model directory (DP facts); default: from the synthetic file's provenance")
    s.add_argument("--policy", help="policy TOML/JSON (default: the shipped policy)")
    s.add_argument("--log", help="hash-chained audit log (default: dpsynth-audit-log.jsonl beside --out)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_audit)

    s = sub.add_parser("release", help="sign and export an audited release (refuses unaudited or failed ones)")
    s.add_argument("--synthetic", required=True)
    s.add_argument("--audit", required=True, help="directory written by `dpsynth audit`")
    s.add_argument("--model", help="model directory (its hashes and ledger head go into the manifest)")
    s.add_argument("--key", required=True, help="Ed25519 private key (PEM)")
    s.add_argument("--out", required=True)
    s.add_argument("--log", help="hash-chained audit log (default: dpsynth-audit-log.jsonl beside --out)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_release)

    s = sub.add_parser("verify", help="verify a signed release bundle and/or an audit log")
    s.add_argument("bundle", nargs="?")
    s.add_argument("--public-key")
    s.add_argument("--log", help="check the audit log's hash chain")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("budget", help="print a model's privacy spend and every mechanism")
    s.add_argument("model")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_budget)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", category=UserWarning, module="opacus")
    warnings.filterwarnings("ignore", message=".*Full backward hook.*")

    def showwarning(message, category, filename, lineno, file=None, line=None):
        print(f"dpsynth: warning: {message}", file=sys.stderr)

    warnings.showwarning = showwarning
    try:
        return a.func(a)
    except DpsynthError as e:
        print(f"dpsynth: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("dpsynth: interrupted; partial training state (if any) is kept for --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
