"""Utility metrics of the EMR-WGAN tutorial / Yan et al. 2022 benchmark, computed from the schema.

Every metric declares its goal and range (SDMetrics style). Real-data statistics are computed on the raw
data with its missing values (imputing first creates constraint violations that are not there).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy.stats import ks_2samp, wasserstein_distance

from ..schema import Schema, canonical_category


@dataclass
class Metric:
    name: str
    value: float | None
    goal: str  # minimize | maximize
    range: tuple[float, float]
    description: str
    detail: dict | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["range"] = list(self.range)
        return d


# ---- encodings ------------------------------------------------------------------------------------

def binary_matrix(df: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """Binary columns and one-hot categories as 0/1 (missing → 0): the 'medical concepts' of the record."""
    out = {}
    for col in schema.modelled:
        if col.kind == "binary":
            out[col.name] = pd.to_numeric(df[col.name], errors="coerce").fillna(0).to_numpy(dtype=float)
        elif col.kind == "categorical":
            canon = df[col.name].map(lambda v: None if pd.isna(v) else canonical_category(v))
            for c in col.categories:
                out[f"{col.name}={canonical_category(c)}"] = (canon == canonical_category(c)).to_numpy(dtype=float)
    return pd.DataFrame(out, index=df.index)


def numeric_frame(df: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """Binary, one-hot and continuous (scaled by public bounds) columns; NaN kept for missing continuous."""
    b = binary_matrix(df, schema)
    cont = {}
    for col in schema.of_kind("continuous"):
        v = pd.to_numeric(df[col.name], errors="coerce").astype(float)
        cont[col.name] = (v.clip(col.lower, col.upper) - col.lower) / (col.upper - col.lower)
    return pd.concat([b, pd.DataFrame(cont, index=df.index)], axis=1)


def feature_matrix(df: pd.DataFrame, schema: Schema, exclude: str | None = None) -> pd.DataFrame:
    """Model-ready features: numeric frame + missingness indicators, missing continuous set to 0.5 (mid-bound)."""
    num = numeric_frame(df, schema)
    feats = {}
    for c in num.columns:
        base = c.split("=")[0]
        if base == exclude:
            continue
        v = num[c]
        if v.isna().any() or (base in schema._by_name and schema[base].nullable and schema[base].kind == "continuous"):
            feats[f"{c}:missing"] = v.isna().astype(float)
        feats[c] = v.fillna(0.5)
    return pd.DataFrame(feats, index=df.index)


# ---- metrics --------------------------------------------------------------------------------------

def dimension_wise(real: pd.DataFrame, syn: pd.DataFrame, schema: Schema) -> list[Metric]:
    rb, sb = binary_matrix(real, schema), binary_matrix(syn, schema)
    prev_r, prev_s = rb.mean(), sb.mean()
    apd = (prev_r - prev_s).abs()
    wd, miss = {}, {}
    for col in schema.of_kind("continuous"):
        r = pd.to_numeric(real[col.name], errors="coerce")
        s = pd.to_numeric(syn[col.name], errors="coerce")
        scale = col.upper - col.lower
        rr, ss = r.dropna().clip(col.lower, col.upper), s.dropna().clip(col.lower, col.upper)
        wd[col.name] = float(wasserstein_distance((rr - col.lower) / scale, (ss - col.lower) / scale)) if len(rr) and len(ss) else None
        miss[col.name] = float(abs(r.isna().mean() - s.isna().mean()))
    wd_vals = [v for v in wd.values() if v is not None]
    return [
        Metric("mean_apd", float(apd.mean()) if len(apd) else None, "minimize", (0, 1),
               "mean absolute prevalence difference over binary columns and categories",
               {"real_prevalence": prev_r.round(5).to_dict(), "synthetic_prevalence": prev_s.round(5).to_dict()}),
        Metric("mean_wasserstein", float(np.mean(wd_vals)) if wd_vals else None, "minimize", (0, 1),
               "mean Wasserstein-1 distance of continuous columns (observed values, scaled to [0,1] by public bounds)",
               {"per_column": wd}),
        Metric("mean_missing_rate_diff", float(np.mean(list(miss.values()))) if miss else None, "minimize", (0, 1),
               "mean absolute difference of missing-value rates of continuous columns", {"per_column": miss}),
    ]


def correlation_distance(real, syn, schema) -> Metric:
    rn, sn = numeric_frame(real, schema), numeric_frame(syn, schema)
    keep = [c for c in rn.columns if rn[c].nunique(dropna=True) > 1 and sn[c].nunique(dropna=True) > 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cr, cs = rn[keep].corr(), sn[keep].corr()
    iu = np.triu_indices(len(keep), k=1)
    diff = np.abs(cr.to_numpy()[iu] - cs.to_numpy()[iu])
    diff = diff[~np.isnan(diff)]
    return Metric("correlation_distance", float(diff.mean()) if len(diff) else None, "minimize", (0, 2),
                  "mean absolute difference of pairwise Pearson correlations (pairwise-complete)",
                  {"columns": keep, "real": cr.round(4).to_numpy().tolist(), "synthetic": cs.round(4).to_numpy().tolist()})


def latent_cluster(real, syn, schema, k: int = 5, variance: float = 0.8, seed: int = 0, max_rows: int = 20000) -> Metric:
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    r = feature_matrix(real, schema)
    s = feature_matrix(syn, schema)[r.columns]
    if len(r) > max_rows:
        r = r.iloc[rng.choice(len(r), max_rows, replace=False)]
    if len(s) > max_rows:
        s = s.iloc[rng.choice(len(s), max_rows, replace=False)]
    x = StandardScaler().fit_transform(np.vstack([r.to_numpy(), s.to_numpy()]))
    z = PCA(n_components=variance, svd_solver="full", random_state=seed).fit_transform(x)
    labels = KMeans(n_clusters=k, n_init=5, random_state=seed).fit_predict(z)
    is_real = np.r_[np.ones(len(r)), np.zeros(len(s))]
    c = len(r) / (len(r) + len(s))
    dev = []
    for j in range(k):
        m = labels == j
        if m.any():
            dev.append((is_real[m].mean() - c) ** 2)
    return Metric("latent_cluster", float(np.mean(dev)), "minimize", (0, 1),
                  f"Yan et al. latent cluster analysis: PCA ({variance:.0%} variance, {z.shape[1]} comps) + k-means k={k}; "
                  "mean squared deviation of each cluster's real share from the overall real share",
                  {"components": int(z.shape[1]), "k": k})


def concept_abundance(real, syn, schema) -> Metric:
    rb, sb = binary_matrix(real, schema), binary_matrix(syn, schema)
    cr, cs = rb.sum(axis=1).astype(int), sb.sum(axis=1).astype(int)
    m = int(max(cr.max(), cs.max())) + 1
    hr = np.bincount(cr, minlength=m) / len(cr)
    hs = np.bincount(cs, minlength=m) / len(cs)
    return Metric("concept_abundance", float(0.5 * np.abs(hr - hs).sum()), "minimize", (0, 1),
                  "total-variation distance between the distributions of the number of medical concepts "
                  "(binary columns / categories present) per record",
                  {"real": hr.round(5).tolist(), "synthetic": hs.round(5).tolist()})


def constraint_violations(real, syn, schema) -> Metric:
    detail = {}
    for con in schema.constraints:
        vr, nr = con.violations(real)
        vs, ns = con.violations(syn)
        detail[con.type] = {
            "real_rate": vr / nr if nr else None, "real_checked": nr,
            "synthetic_rate": vs / ns if ns else None, "synthetic_checked": ns,
        }
    rates = [d["synthetic_rate"] for d in detail.values() if d["synthetic_rate"] is not None]
    return Metric("constraint_violation_rate", float(np.mean(rates)) if rates else None, "minimize", (0, 1),
                  "share of synthetic rows (where all constrained columns are present) violating a schema "
                  "constraint; the real data's rate (raw, with missing values) is in detail", detail)


def _fit_auc(xtr, ytr, xte, yte, seed=0):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(ytr)) < 2:
        return None, None
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    model.fit(xtr, ytr)
    return float(roc_auc_score(yte, model.predict_proba(xte)[:, 1])), model


def tstr(real, holdout, syn, schema, label: str) -> tuple[Metric, Metric, dict]:
    """Train-on-synthetic/test-on-real vs train-on-real/test-on-real AUROC (logistic regression), + SHAP overlap."""
    def xy(df):
        y = pd.to_numeric(df[label], errors="coerce").fillna(0).to_numpy(dtype=int)
        return feature_matrix(df, schema, exclude=label), y

    xr, yr = xy(real)
    xs, ys = xy(syn)
    xh, yh = xy(holdout)
    xs, xh = xs.reindex(columns=xr.columns, fill_value=0.0), xh.reindex(columns=xr.columns, fill_value=0.0)
    auc_r, m_r = _fit_auc(xr, yr, xh, yh)
    auc_s, m_s = _fit_auc(xs, ys, xh, yh)
    ratio = auc_s / auc_r if (auc_s is not None and auc_r) else None
    shap_detail = shap_overlap(m_r, m_s, xr, xh, list(xr.columns)) if m_s is not None else {"overlap": None}
    return (
        Metric("tstr_trtr_auroc_ratio", ratio, "maximize", (0, 2),
               f"AUROC on the holdout for predicting {label!r}: trained on synthetic / trained on real",
               {"trtr_auroc": auc_r, "tstr_auroc": auc_s, "label": label}),
        Metric("shap_topk_overlap", shap_detail.get("overlap"), "maximize", (0, 1),
               "overlap of the top-k features by mean |SHAP| between the real-trained and synthetic-trained models",
               shap_detail),
        {"trtr": auc_r, "tstr": auc_s},
    )


def shap_overlap(m_real, m_syn, x_bg, x_eval, names, k: int = 20, max_rows: int = 2000) -> dict:
    import shap

    k = min(k, max(1, len(names) // 2))
    bg = x_bg.iloc[:500]
    ev = x_eval.iloc[:max_rows]
    tops = []
    for m in (m_real, m_syn):
        scaler, lr = m[0], m[-1]
        explainer = shap.LinearExplainer(lr, scaler.transform(bg))
        sv = explainer.shap_values(scaler.transform(ev))
        imp = np.abs(np.asarray(sv)).mean(axis=0)
        tops.append([names[i] for i in np.argsort(-imp)[:k]])
    return {"k": k, "overlap": len(set(tops[0]) & set(tops[1])) / k, "top_real": tops[0], "top_synthetic": tops[1],
            "note": f"k = min(20, features/2) = {k} for {len(names)} features"}


# ---- per-column report of the continuous columns ("vitals") ----------------------------------------

def _jnum(x) -> float | None:
    """A plain JSON float: numpy scalars converted, NaN/inf → None."""
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None


def _observed(df: pd.DataFrame, name: str) -> pd.Series:
    """The column as floats with non-numeric / non-finite values as missing (an absent column is all missing)."""
    if name not in df.columns:
        return pd.Series(np.nan, index=df.index, dtype=float)
    v = pd.to_numeric(df[name], errors="coerce").astype(float)
    return v.where(np.isfinite(v))


def _shares(x: np.ndarray, edges: np.ndarray) -> list[float] | None:
    """Share of the values per bin; values outside the edges are counted in the end bins."""
    if not len(x):
        return None
    counts, _ = np.histogram(np.clip(x, edges[0], edges[-1]), bins=edges)
    return [round(float(c), 6) for c in counts / len(x)]


def _corr_matrix(frame: pd.DataFrame) -> pd.DataFrame:
    with warnings.catch_warnings():  # constant columns give NaN (reported as None), not a warning
        warnings.simplefilter("ignore")
        return frame.corr(method="pearson", min_periods=3)


def vitals(real: pd.DataFrame, syn: pd.DataFrame, schema: Schema, *, bins: int = 30) -> dict:
    """Per-column comparison of every continuous column, on observed (non-missing) values only.

    Per column: mean and std (ddof=1) of each side, absolute mean / std error (raw and divided by the public
    range ``upper - lower``), two-sample KS statistic and p-value, Wasserstein-1 distance (raw and / range),
    missing rates, observed counts, values outside the public bounds, and a histogram (``bins`` equal bins over
    the public bounds — edges never depend on the data; values outside the bounds are counted in the end bins)
    as each side's share of its observed values. Statistics use the raw values, not clipped to the bounds.
    A column with fewer than 2 observed values on either side gets None comparison metrics and a ``note``.

    Also pairwise-complete Pearson correlations among the columns (at least 3 common observations) for each
    side, with the max and mean absolute difference over pairs defined on both sides; and a summary.
    Everything is plain JSON: floats / ints / str / None (NaN → None).
    """
    cols = schema.of_kind("continuous")
    per_col: dict[str, dict] = {}
    obs_r, obs_s = {}, {}
    for col in cols:
        lo, hi = float(col.lower), float(col.upper)
        scale = hi - lo
        r, s = _observed(real, col.name), _observed(syn, col.name)
        obs_r[col.name], obs_s[col.name] = r, s
        ro, so = r.dropna().to_numpy(), s.dropna().to_numpy()
        nr, ns = len(ro), len(so)
        edges = np.linspace(lo, hi, bins + 1)
        e = {
            "lower": lo, "upper": hi, "range": scale,
            "n_real": nr, "n_synthetic": ns,
            "missing_rate_real": _jnum(r.isna().mean()) if len(r) else None,
            "missing_rate_synthetic": _jnum(s.isna().mean()) if len(s) else None,
            "outside_bounds_real": int(((ro < lo) | (ro > hi)).sum()),
            "outside_bounds_synthetic": int(((so < lo) | (so > hi)).sum()),
            "mean_real": _jnum(ro.mean()) if nr else None,
            "mean_synthetic": _jnum(so.mean()) if ns else None,
            "std_real": _jnum(ro.std(ddof=1)) if nr > 1 else None,
            "std_synthetic": _jnum(so.std(ddof=1)) if ns > 1 else None,
            "mean_abs_error": None, "mean_abs_error_rel": None,
            "std_abs_error": None, "std_abs_error_rel": None,
            "ks": None, "ks_pvalue": None,
            "wasserstein": None, "wasserstein_rel": None,
            "histogram": {"edges": [float(x) for x in edges], "real": _shares(ro, edges), "synthetic": _shares(so, edges)},
        }
        mr, ms = e["missing_rate_real"], e["missing_rate_synthetic"]
        e["missing_rate_diff"] = abs(mr - ms) if mr is not None and ms is not None else None
        short = [f"{side} ({n})" for side, n in (("real", nr), ("synthetic", ns)) if n < 2]
        if short:
            e["note"] = "fewer than 2 observed values in " + " and ".join(short) + ": not compared"
        else:
            mae = abs(e["mean_real"] - e["mean_synthetic"])
            sae = abs(e["std_real"] - e["std_synthetic"])
            ks = ks_2samp(ro, so)
            wd = float(wasserstein_distance(ro, so))
            e.update({
                "mean_abs_error": _jnum(mae), "mean_abs_error_rel": _jnum(mae / scale),
                "std_abs_error": _jnum(sae), "std_abs_error_rel": _jnum(sae / scale),
                "ks": _jnum(ks.statistic), "ks_pvalue": _jnum(ks.pvalue),
                "wasserstein": _jnum(wd), "wasserstein_rel": _jnum(wd / scale),
            })
        per_col[col.name] = e

    names = [c.name for c in cols]
    cr = _corr_matrix(pd.DataFrame(obs_r)) if names else pd.DataFrame()
    cs = _corr_matrix(pd.DataFrame(obs_s)) if names else pd.DataFrame()
    pairs, diffs = [], []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            vr, vs = _jnum(cr.loc[a, b]), _jnum(cs.loc[a, b])
            d = abs(vr - vs) if vr is not None and vs is not None else None
            if d is not None:
                diffs.append(d)
            pairs.append({"a": a, "b": b, "real": vr, "synthetic": vs, "abs_diff": d})

    def mat(c):
        return [[_jnum(c.loc[a, b]) for b in names] for a in names]

    ks_vals = [e["ks"] for e in per_col.values() if e["ks"] is not None]
    wr_vals = [e["wasserstein_rel"] for e in per_col.values() if e["wasserstein_rel"] is not None]
    return {
        "description": "continuous columns on observed values; errors relative to the public range upper - lower; "
                       f"histograms: {bins} bins over the public bounds, share of observed values per bin",
        "columns": per_col,
        "correlation": {
            "columns": names, "real": mat(cr), "synthetic": mat(cs), "pairs": pairs,
            "n_pairs_compared": len(diffs),
            "max_abs_diff": _jnum(max(diffs)) if diffs else None,
            "mean_abs_diff": _jnum(np.mean(diffs)) if diffs else None,
        },
        "summary": {
            "n_columns": len(names),
            "n_compared": len(ks_vals),
            "mean_ks": _jnum(np.mean(ks_vals)) if ks_vals else None,
            "max_ks": _jnum(max(ks_vals)) if ks_vals else None,
            "mean_wasserstein_rel": _jnum(np.mean(wr_vals)) if wr_vals else None,
            "not_compared": [n for n, e in per_col.items() if "note" in e],
        },
    }


def notes_section(real: pd.DataFrame, holdout: pd.DataFrame, syn: pd.DataFrame, schema: Schema, *,
                  note_model=None, note_tokenizer=None) -> dict | None:
    """The note metrics (``metrics.notes.note_metrics``) when the schema has a text column that the synthetic
    frame carries; None otherwise. Input the note metrics cannot use (several text columns, too few notes in a
    frame) gives ``{"skipped": reason}`` instead of failing the whole evaluation. Perplexity only when the note
    model and its tokenizer are given."""
    from ..errors import DpsynthError
    from .notes import note_metrics

    texts = [c.name for c in schema.of_kind("text")]
    if not texts or not any(t in syn.columns for t in texts):
        return None
    try:
        return note_metrics(real, holdout, syn, schema, model=note_model, tokenizer=note_tokenizer)
    except DpsynthError as e:
        return {"skipped": str(e)}


def evaluate(real: pd.DataFrame, holdout: pd.DataFrame, syn: pd.DataFrame, schema: Schema, label: str | None = None,
             *, notes: bool = True, note_model=None, note_tokenizer=None) -> dict:
    """Record metrics, the per-column vitals report and — when ``notes`` is set, the schema has a text column
    and the synthetic frame carries it — the note metrics (``notes``; perplexity only with ``note_model`` and
    ``note_tokenizer``). Callers that only read ``headline`` can pass ``notes=False`` to skip their cost."""
    label = label or schema.label
    metrics: list[Metric] = []
    metrics += dimension_wise(real, syn, schema)
    metrics.append(correlation_distance(real, syn, schema))
    metrics.append(latent_cluster(real, syn, schema))
    metrics.append(concept_abundance(real, syn, schema))
    metrics.append(constraint_violations(real, syn, schema))
    if label:
        m1, m2, _ = tstr(real, holdout, syn, schema, label)
        metrics += [m1, m2]
    out = {
        "rows": {"real": len(real), "holdout": len(holdout), "synthetic": len(syn)},
        "label": label,
        "metrics": {m.name: m.to_json() for m in metrics},
        "headline": {m.name: m.value for m in metrics},
        "vitals": vitals(real, syn, schema),
    }
    section = notes_section(real, holdout, syn, schema, note_model=note_model,
                            note_tokenizer=note_tokenizer) if notes else None
    if section is not None:
        out["notes"] = section
    return out
