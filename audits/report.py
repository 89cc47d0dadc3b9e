"""Compliance report: one self-contained offline HTML file (inline PNG plots) carrying the same facts as
audit.json. Only aggregate distributions are drawn (ROC points, histogram counts), never per-record values."""

from __future__ import annotations

import html
import json

from dpsynth.metrics.report import _png


def _fmt(v, digits=4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"
    return html.escape(str(v))


def _plots(audit: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    at = audit["attacks"]
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, label in (("mia_distance", "distance attack"), ("mia_density", "density-ratio attack")):
        roc = at.get(name, {}).get("roc")
        if roc:
            auc = at[name]["auc"]["value"]
            ax.plot(roc["fpr"], roc["tpr"], label=f"{label} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    ax.set_xlabel("false positive rate (holdout non-members)")
    ax.set_ylabel("true positive rate (training members)")
    ax.legend(loc="lower right")
    ax.set_title("Membership inference ROC")
    out.append(("Membership-inference ROC curves", _png(fig)))
    hist = at.get("mia_distance", {}).get("distance_histogram")
    if hist:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        edges = hist["edges"]
        centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        w = (edges[1] - edges[0]) * 0.45
        ax.bar([c - w / 2 for c in centers], hist["members"], width=w, label="training members")
        ax.bar([c + w / 2 for c in centers], hist["nonmembers"], width=w, label="holdout non-members")
        ax.set_xlabel("distance to the nearest synthetic record")
        ax.set_ylabel("victims (count per bin)")
        ax.legend()
        ax.set_title("Aggregate distance distributions")
        out.append(("Distance to closest synthetic record (aggregate histogram)", _png(fig)))
    sites = audit.get("sites") or []
    if not sites and (audit.get("dp") or {}).get("epsilon") is not None:
        sites = [{"site": "this site", "epsilon": audit["dp"]["epsilon"]}]
    if sites:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar([s["site"] for s in sites], [s["epsilon"] or 0 for s in sites])
        ax.set_ylabel("ε spent")
        ax.set_title("Privacy spend per site")
        out.append(("ε per site", _png(fig)))
    return out


def _estimate_cells(e) -> str:
    if not isinstance(e, dict):
        return f"<td class=num>{_fmt(e)}</td><td></td><td></td><td></td>"
    ci = f"[{_fmt(e.get('ci_low'))}, {_fmt(e.get('ci_high'))}]" if e.get("ci_low") is not None else ""
    return (f"<td class=num>{_fmt(e.get('value'))}</td><td class=num>{ci}</td>"
            f"<td class=num>{_fmt(e.get('baseline'))}</td><td class=num>{_fmt(e.get('n'))}</td>")


def render(audit: dict, title: str = "dpsynth privacy audit and compliance report") -> str:
    gate = audit["gate"]
    verdict_cls = "pass" if gate["passed"] else "fail"
    checks = "".join(
        f"<tr class={'ok' if c['passed'] else 'bad'}><td>{html.escape(c['check'])}</td><td class=num>{_fmt(c['value'])}</td>"
        f"<td class=num>{html.escape(c['comparison'])} {_fmt(c['threshold'])}</td>"
        f"<td class=num>{'' if not c.get('ci') else '[' + ', '.join(_fmt(x) for x in c['ci']) + ']'}</td>"
        f"<td>{'PASS' if c['passed'] else 'FAIL'}</td><td>{html.escape(c.get('note') or '')}</td></tr>"
        for c in gate["checks"]
    )
    at = audit["attacks"]
    rows = []

    def row(name, e, what):
        rows.append(f"<tr><td>{html.escape(name)}</td>{_estimate_cells(e)}<td>{html.escape(what)}</td></tr>")

    md, mdd = at.get("mia_distance", {}), at.get("mia_density", {})
    if md:
        row("MIA distance: AUC", md["auc"], "members vs holdout non-members; 0.5 = chance")
        row("MIA distance: F1 at τ", md["f1"], f"precision {_fmt(md.get('precision'))}, recall {_fmt(md.get('recall'))}, τ = {_fmt(md.get('threshold'))}")
        row("MIA distance: TPR @ FPR 1 %", md["tpr_at_fpr_1pct"], "low-FPR regime")
    if mdd:
        row("MIA density ratio: AUC", mdd["auc"], "DOMIAS-style local density calibration")
        row("MIA density ratio: TPR @ FPR 1 %", mdd["tpr_at_fpr_1pct"], "low-FPR regime")
    ai = at.get("attribute_inference", {})
    if "residual" in ai:
        row("Attribute inference: member F1", ai["member_f1"], f"QIs {', '.join(ai['quasi_identifiers'])}")
        row("Attribute inference: control F1", ai["control_f1"], "same attack on non-members")
        row("Attribute inference: residual", ai["residual"], "member − control")
    ir = at.get("inference_risk", {})
    if ir.get("risk"):
        row("Inference risk (anonymeter-style)", ir["risk"], f"attack rate {_fmt(ir['attack_rate'])} vs control {_fmt(ir['control_rate'])}")
    nn = at.get("nnaa", {})
    if nn:
        row("NNAA: AA train", nn["aa_train"], "0.5 ideal")
        row("NNAA: AA holdout", nn["aa_holdout"], "0.5 ideal")
        row("NNAA: privacy loss", nn["privacy_loss"], "AA_holdout − AA_train")
    if "dcr" in at:
        row("DCR share", at["dcr"]["share"], "synthetic rows closer to train than to holdout; 0.5 ideal")
    if "exact_copies" in at:
        row("Exact copies of training rows", at["exact_copies"]["train_copies"], f"excess over holdout control {_fmt(at['exact_copies']['excess_rate'])}")
    if "identifier_replay" in at:
        row("Identifier replay", at["identifier_replay"]["replayed_values"], "training identifiers found in the release")
    dp = audit.get("dp") or {}
    prov = audit.get("provenance", {})
    priv_rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{_fmt(v) if not isinstance(v, (dict, list)) else html.escape(json.dumps(v))}</td></tr>"
        for k, v in [
            ("differentially private", dp.get("differentially_private")),
            ("ε (per site)", dp.get("epsilon")),
            ("δ", dp.get("delta")),
            ("unit of privacy", dp.get("unit")),
            ("adjacency", dp.get("adjacency")),
            ("accountant", dp.get("accountant")),
            ("sampling", dp.get("sampling")),
            ("noise multiplier", dp.get("noise_multiplier")),
            ("clipping norm", dp.get("max_grad_norm")),
            ("DP-SGD steps", dp.get("steps")),
            ("preprocessing", dp.get("preprocessing")),
            ("preprocessing spend", dp.get("schema_spend")),
            ("statement", dp.get("statement")),
        ]
    )
    prov_rows = "".join(f"<tr><th>{html.escape(k)}</th><td><code>{html.escape(str(v))}</code></td></tr>" for k, v in prov.items())
    util = audit.get("utility") or {}
    util_rows = "".join(f"<tr><th>{html.escape(k)}</th><td class=num>{_fmt(v)}</td></tr>" for k, v in util.items())
    figs = "".join(f"<figure><img alt='{html.escape(c)}' src='{s}'><figcaption>{html.escape(c)}</figcaption></figure>"
                   for c, s in _plots(audit))
    sample = audit.get("sample", {})
    versions = audit.get("versions", {})
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body{{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222;line-height:1.45}}
table{{border-collapse:collapse;margin:.8rem 0;width:100%}}td,th{{border:1px solid #ccc;padding:.3rem .55rem;text-align:left;vertical-align:top}}
th{{background:#f3f3f3;width:16rem}}td.num{{font-variant-numeric:tabular-nums;text-align:right;white-space:nowrap}}
.verdict{{font-size:1.4rem;font-weight:bold;padding:.6rem 1rem;border-radius:4px;display:inline-block}}
.pass{{background:#dff3e3;border:1px solid #2a7}}.fail{{background:#fde2e1;border:1px solid #c00}}
tr.bad td{{background:#fff1f0}}figure{{margin:1.2rem 0}}img{{max-width:100%}}code{{font-size:.85em;word-break:break-all}}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="verdict {verdict_cls}">Release gate: {gate['verdict']}</p>
<p>Policy <b>{html.escape(gate['policy'])}</b> (sha256 <code>{gate['policy_sha256'][:16]}…</code>). Audit run {html.escape(audit.get('created_utc', ''))} in {audit.get('seconds')} s.
Victims per group: {sample.get('victims_per_group')} (train {sample.get('train_rows')} rows, holdout {sample.get('holdout_rows')} rows, synthetic {sample.get('synthetic_rows')} rows).</p>
<h2>Gate checks</h2>
<table><tr><th>check</th><th>value</th><th>threshold</th><th>95 % CI</th><th>result</th><th>note</th></tr>{checks}</table>
<h2>Privacy guarantee</h2>
<table>{priv_rows}</table>
<h2>Attacks (value, 95 % CI, baseline / control, victims)</h2>
<table><tr><th>attack</th><th>value</th><th>95 % CI</th><th>baseline</th><th>n</th><th>notes</th></tr>{''.join(rows)}</table>
<p>No per-record distance is written anywhere in this report or bundle: only aggregate curves and histogram counts.</p>
<h2>Utility summary</h2>
<table>{util_rows}</table>
<h2>Provenance</h2>
<table>{prov_rows}</table>
<h2>Plots</h2>
{figs}
<h2>Versions</h2>
<table>{''.join(f'<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>' for k, v in versions.items())}</table>
</body></html>
"""
