"""One self-contained offline HTML page (inline PNG plots, no scripts, no external assets) + JSON."""

from __future__ import annotations

import base64
import html
import io
import json

import numpy as np


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plots(result: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = result["metrics"]
    out = []
    det = m["mean_apd"]["detail"]
    names = list(det["real_prevalence"])
    if names:
        r = np.array([det["real_prevalence"][k] for k in names])
        s = np.array([det["synthetic_prevalence"][k] for k in names])
        fig, ax = plt.subplots(figsize=(4.8, 4.8))
        ax.scatter(r, s, s=18)
        hi = max(float(r.max()), float(s.max()), 0.01) * 1.05
        ax.plot([0, hi], [0, hi], "k--", lw=0.8)
        ax.set_xlabel("real prevalence")
        ax.set_ylabel("synthetic prevalence")
        ax.set_title(f"Dimension-wise prevalence (mean APD {m['mean_apd']['value']:.4f})")
        out.append(("Prevalence of binary columns and categories (tutorial Figure 4)", _png(fig)))
    cd = m["correlation_distance"]["detail"]
    if cd["columns"]:
        cr, cs = np.array(cd["real"], dtype=float), np.array(cd["synthetic"], dtype=float)
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
        for ax, mat, title, cmap, lim in (
            (axes[0], cr, "real", "coolwarm", (-1, 1)),
            (axes[1], cs, "synthetic", "coolwarm", (-1, 1)),
            (axes[2], np.abs(cr - cs), "|real − synthetic|", "viridis", (0, 1)),
        ):
            im = ax.imshow(mat, cmap=cmap, vmin=lim[0], vmax=lim[1])
            ax.set_title(title)
            ax.set_xticks(range(len(cd["columns"])), cd["columns"], rotation=90, fontsize=6)
            ax.set_yticks(range(len(cd["columns"])), cd["columns"], fontsize=6)
            fig.colorbar(im, ax=ax, fraction=0.046)
        out.append(("Pairwise correlations", _png(fig)))
    if "tstr_trtr_auroc_ratio" in m and m["tstr_trtr_auroc_ratio"]["detail"]:
        d = m["tstr_trtr_auroc_ratio"]["detail"]
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        vals = [d["trtr_auroc"] or 0, d["tstr_auroc"] or 0]
        ax.bar(["TRTR (real)", "TSTR (synthetic)"], vals, color=["#4477aa", "#ee6677"])
        for i, v in enumerate(vals):
            ax.text(i, v + 0.01, f"{v:.3f}", ha="center")
        ax.set_ylim(0.4, 1.0)
        ax.set_ylabel("AUROC on holdout")
        ax.set_title(f"label: {d['label']}")
        out.append(("Train on synthetic, test on real", _png(fig)))
    return out


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return html.escape(str(v))


def _g(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def _pm(mean, std) -> str:
    if mean is None:
        return "n/a"
    return f"{_g(mean)} ± {_g(std)}" if std is not None else _g(mean)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def _vitals_plots(v: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    cols = v["columns"]
    names = [n for n, e in cols.items() if e["histogram"]["real"] is not None or e["histogram"]["synthetic"] is not None]
    if names:
        ncols = min(3, len(names))
        nrows = -(-len(names) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.1 * nrows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            e = cols[name]
            h = e["histogram"]
            edges = np.array(h["edges"], dtype=float)
            for key, color, label in (("real", "#4477aa", "real"), ("synthetic", "#ee6677", "synthetic")):
                if h[key] is not None:
                    ax.stairs(np.array(h[key], dtype=float), edges, fill=True, alpha=0.35, color=color)
                    ax.stairs(np.array(h[key], dtype=float), edges, color=color, lw=1.2, label=label)
            ks = f"KS {e['ks']:.3f}" if e["ks"] is not None else "not compared"
            ax.set_title(f"{name} ({ks})", fontsize=9)
            ax.set_xlim(edges[0], edges[-1])
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(names):]:
            ax.set_visible(False)
        fig.supylabel("share of observed values", fontsize=8)
        fig.tight_layout()
        out.append(("Continuous columns: real vs synthetic histograms over the public bounds (observed values)", _png(fig)))
    c = v["correlation"]
    if len(c["columns"]) > 1 and c["n_pairs_compared"]:
        k = len(c["columns"])
        d = np.full((k, k), np.nan)
        for i in range(k):
            for j in range(k):
                a, b = c["real"][i][j], c["synthetic"][i][j]
                if i != j and a is not None and b is not None:
                    d[i, j] = abs(a - b)
        fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.6 + 0.55 * k))
        vmax = max(0.2, float(np.nanmax(d)))
        im = ax.imshow(np.ma.masked_invalid(d), cmap="viridis", vmin=0, vmax=vmax)
        ax.set_xticks(range(k), c["columns"], rotation=90, fontsize=7)
        ax.set_yticks(range(k), c["columns"], fontsize=7)
        if k <= 12:
            for i in range(k):
                for j in range(k):
                    if not np.isnan(d[i, j]):
                        ax.text(j, i, f"{d[i, j]:.2f}", ha="center", va="center", fontsize=6,
                                color="k" if d[i, j] > 0.6 * vmax else "w")
        ax.set_title(f"|real − synthetic| correlation (max {c['max_abs_diff']:.3f})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
        out.append(("Continuous columns: absolute difference of pairwise Pearson correlations", _png(fig)))
    return out


def _vitals_section(result: dict) -> str:
    v = result.get("vitals")
    if not v or not v.get("columns"):
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td class=num>{_pm(e['mean_real'], e['std_real'])}</td>"
        f"<td class=num>{_pm(e['mean_synthetic'], e['std_synthetic'])}</td><td class=num>{_fmt(e['ks'])}</td>"
        f"<td class=num>{_fmt(e['wasserstein_rel'])}</td>"
        f"<td class=num>{_pct(e['missing_rate_real'])} / {_pct(e['missing_rate_synthetic'])}</td>"
        f"<td class=num>{e['n_real']} / {e['n_synthetic']}</td><td>{html.escape(e.get('note', ''))}</td></tr>"
        for name, e in v["columns"].items()
    )
    sm, c = v["summary"], v["correlation"]
    top = sorted((p for p in c["pairs"] if p["abs_diff"] is not None), key=lambda p: -p["abs_diff"])[:10]
    pair_rows = "".join(
        f"<tr><td>{html.escape(p['a'])} – {html.escape(p['b'])}</td><td class=num>{_fmt(p['real'])}</td>"
        f"<td class=num>{_fmt(p['synthetic'])}</td><td class=num>{_fmt(p['abs_diff'])}</td></tr>" for p in top
    )
    pairs = (f"<p>Pairwise Pearson correlations (pairwise-complete): max |difference| {_fmt(c['max_abs_diff'])}, "
             f"mean {_fmt(c['mean_abs_diff'])} over {c['n_pairs_compared']} pairs. Largest differences:</p>"
             f"<table><tr><th>pair</th><th>real r</th><th>synthetic r</th><th>|difference|</th></tr>{pair_rows}</table>"
             if top else "")
    figs = "".join(
        f"<figure><img alt='{html.escape(cap)}' src='{src}'><figcaption>{html.escape(cap)}</figcaption></figure>"
        for cap, src in _vitals_plots(v)
    )
    return f"""<h2 id=vitals>Continuous columns (vitals)</h2>
<p>Observed (non-missing) values only; Wasserstein distance divided by the public range (upper − lower).
Mean KS over {sm['n_compared']} of {sm['n_columns']} columns: {_fmt(sm['mean_ks'])}.</p>
<table><tr><th>column</th><th>real mean ± std</th><th>synthetic mean ± std</th><th>KS</th><th>Wasserstein / range</th>
<th>missing real / syn</th><th>observed real / syn</th><th>note</th></tr>{rows}</table>
{pairs}
{figs}
"""


_NOTE_SUMMARY = (  # key, label, what it means (no per-record content: only aggregates reach the report)
    ("consistency", "condition consistency", ("macro balanced accuracy of classifiers trained on real notes, applied "
                                              "to each synthetic note vs its own prompted record (0.5: no "
                                              "information, 1: consistent)")),
    ("consistency_ceiling", "consistency ceiling", "the same classifiers on real holdout notes vs their records"),
    ("value_consistency", "value consistency", ("the same for the record's numbers: each continuous column above or "
                                                "below its real median, read off the note")),
    ("value_consistency_ceiling", "value consistency ceiling", "the same classifiers on real holdout notes"),
    ("tstr_ratio", "note TSTR / TRTR", "macro AUC on real holdout notes: trained on synthetic / trained on real notes"),
    ("two_sample_auc", "two-sample AUC", ("real holdout vs synthetic notes told apart by a classifier "
                                          "(0.5: indistinguishable, 1: separable)")),
    ("distinct_2_synthetic", "distinct-2 synthetic", "unique / total word bigrams (same sample size as real)"),
    ("distinct_2_real", "distinct-2 real", "the same on real training notes"),
    ("self_bleu_synthetic", "self-BLEU-4 synthetic", "each note against the others (higher: less diverse)"),
    ("self_bleu_real", "self-BLEU-4 real", "the same on real training notes"),
    ("perplexity_train", "perplexity (train)", "the note model's per-token perplexity on real training notes"),
    ("perplexity_holdout", "perplexity (holdout)", "the same on real holdout notes"),
    ("perplexity_gap", "perplexity holdout / train", "generalisation gap (1: none)"),
)


def _notes_section(result: dict) -> str:
    n = result.get("notes")
    if not n:
        return ""
    if "skipped" in n:
        return f"<h2 id=notes>Notes</h2>\n<p>Note metrics not computed: {html.escape(str(n['skipped']))}</p>\n"
    label = n.get("label") or ""
    what = ""
    if "rendered" in label.lower() or "not real clinical text" in label.lower():
        what = ("<p class=warn>Rendered demonstration notes, not real clinical text (note column "
                f"{html.escape(n['note_column'])}: {html.escape(label)})</p>")
    elif label:
        what = f"<p>Note column {html.escape(n['note_column'])}: {html.escape(label)}</p>"
    sm = n["summary"]
    rows = "".join(f"<tr><td>{html.escape(lab)}</td><td class=num>{_fmt(sm[k])}</td><td>{html.escape(desc)}</td></tr>"
                   for k, lab, desc in _NOTE_SUMMARY if k in sm)
    cons, ts = n["consistency"], n["tstr"]
    cond_rows = "".join(
        f"<tr><td>{html.escape(c)}</td><td class=num>{_fmt(e['balanced_accuracy'])}</td><td class=num>{_fmt(e['accuracy'])}</td>"
        f"<td class=num>{_fmt(e['auc'])}</td><td class=num>{e['n_positive']} / {e['n']}</td>"
        f"<td class=num>{_fmt(e['ceiling']['balanced_accuracy'])}</td><td class=num>{_fmt(e['ceiling']['auc'])}</td>"
        f"<td class=num>{_fmt(ts['conditions'].get(c, {}).get('tstr_auc'))}</td>"
        f"<td class=num>{_fmt(ts['conditions'].get(c, {}).get('trtr_auc'))}</td></tr>"
        for c, e in cons["conditions"].items()
    )
    skipped = {**ts.get("skipped", {}), **cons.get("skipped", {})}
    skip = ("<p>Conditions not evaluated: " + "; ".join(f"{html.escape(c)} ({html.escape(r)})" for c, r in skipped.items())
            + ".</p>") if skipped else ""
    ex = {k: v for k, v in cons.get("excluded_notes", {}).items() if v}
    excl = ("<p>Empty or missing notes excluded: " + ", ".join(f"{html.escape(k)} {v}" for k, v in ex.items()) + ".</p>"
            if ex else "")
    two = n["two_sample"]
    ci = two["ci"]
    return f"""<h2 id=notes>Notes</h2>
{what}
<p>Only aggregate figures; no note is quoted. Classifiers: TF-IDF (word 1–2 grams + character 2–4 grams) logistic
regression. Two-sample AUC {_fmt(two['auc'])} (95 % CI {_fmt(ci[0])}–{_fmt(ci[1])}, {two['n']['real']} notes a side).
Consistency is the macro balanced accuracy (plain accuracy is inflated by rare conditions).</p>
{excl}
<table><tr><th>note metric</th><th>value</th><th>what it measures</th></tr>{rows}</table>
<table><tr><th>condition</th><th>balanced acc. (synthetic)</th><th>accuracy</th><th>AUC</th><th>positives / notes</th>
<th>balanced acc. (real holdout)</th><th>AUC (real holdout)</th><th>TSTR AUC</th><th>TRTR AUC</th></tr>{cond_rows}</table>
{skip}
"""


def render_html(result: dict, *, title: str, context: dict | None = None) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td class=num>{_fmt(mt['value'])}</td><td>{mt['goal']}</td>"
        f"<td>{mt['range'][0]}–{mt['range'][1]}</td><td>{html.escape(mt['description'])}</td></tr>"
        for name, mt in result["metrics"].items()
    )
    ctx = ""
    if context:
        ctx = "<table>" + "".join(
            f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in context.items()
        ) + "</table>"
    figs = "".join(
        f"<figure><img alt='{html.escape(cap)}' src='{src}'><figcaption>{html.escape(cap)}</figcaption></figure>"
        for cap, src in _plots(result)
    )
    banner = ""
    if context and context.get("differentially private") is False:
        banner = "<p class=warn>NOT DIFFERENTIALLY PRIVATE: this synthetic data came from a --non-private model.</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body{{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222;line-height:1.45}}
table{{border-collapse:collapse;margin:1rem 0;width:100%}}td,th{{border:1px solid #ccc;padding:.35rem .6rem;text-align:left;vertical-align:top}}
th{{background:#f3f3f3}}td.num{{font-variant-numeric:tabular-nums;text-align:right}}figure{{margin:1.5rem 0}}img{{max-width:100%}}
.warn{{background:#fde2e1;border:1px solid #c00;padding:.6rem;font-weight:bold}}
</style></head><body>
<h1>{html.escape(title)}</h1>
{banner}
{ctx}
<p>Rows: real {result['rows']['real']}, holdout {result['rows']['holdout']}, synthetic {result['rows']['synthetic']}.</p>
<h2>Metrics</h2>
<table><tr><th>metric</th><th>value</th><th>goal</th><th>range</th><th>what it measures</th></tr>{rows}</table>
<h2>Plots</h2>
{figs}
{_vitals_section(result)}
{_notes_section(result)}
<details><summary>All figures as JSON</summary><pre>{html.escape(json.dumps(result['headline'], indent=2))}</pre></details>
</body></html>
"""
