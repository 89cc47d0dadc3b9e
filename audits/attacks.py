"""Privacy attacks on a synthetic table, run by the data holder against its own train (members) and holdout
(non-members). Each result is value + 95 % CI + baseline/control; only aggregates leave this module (ROC
points, histogram counts) — never a per-record distance.

Records are compared in one encoding built from the schema (binary / one-hot as 0/1, continuous scaled to
[0, 1] by the public bounds, a missingness indicator per nullable column): Euclidean distance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve
from sklearn.neighbors import NearestNeighbors

from dpsynth.metrics.auc import rank_auc
from dpsynth.schema import Schema, canonical_category

from .stats import bootstrap, percentile_estimate, proportion


@dataclass
class AuditData:
    """Victim sets and encodings. Holdout is split: reference half (for density-ratio) and target half."""

    schema: Schema
    columns: list[str]
    train: np.ndarray  # training records (encoded; a sample of at most max_reference rows)
    holdout: np.ndarray  # holdout records (encoded; a sample of at most max_reference rows)
    members: np.ndarray  # victims sampled from train
    nonmembers: np.ndarray  # victims from the holdout target half
    reference: np.ndarray  # holdout reference half (never a victim)
    synthetic: np.ndarray
    raw_members: pd.DataFrame
    raw_nonmembers: pd.DataFrame
    raw_synthetic: pd.DataFrame
    n_victims: int
    info: dict = field(default_factory=dict)


def audit_columns(schema: Schema) -> list[str]:
    """The encoding's column names, fixed by the schema alone (never by the data)."""
    cols: list[str] = []
    for c in schema.modelled:
        if c.kind == "categorical":
            cols += [f"{c.name}={canonical_category(v)}" for v in c.categories]
        else:
            cols.append(c.name)
        if c.nullable:
            cols.append(f"{c.name}:missing")
    return cols


def encode(df: pd.DataFrame, schema: Schema, columns: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """float32 matrix built column by column (wide tables never pass through a float64 frame):
    binary 0/1, one-hot categories, continuous scaled to [0, 1] by the public bounds (0.5 where missing),
    and a missingness indicator for each nullable column."""
    cols = audit_columns(schema)
    out = np.zeros((len(df), len(cols)), dtype=np.float32)
    j = 0
    for c in schema.modelled:
        s = df[c.name]
        miss = s.isna().to_numpy()
        if c.kind == "categorical":
            canon = s.map(lambda v: None if pd.isna(v) else canonical_category(v)).to_numpy()
            for v in c.categories:
                out[:, j] = canon == canonical_category(v)
                j += 1
        elif c.kind == "binary":
            out[:, j] = np.nan_to_num(s.to_numpy(dtype=np.float32, na_value=np.nan), nan=0.0)
            j += 1
        else:
            v = s.to_numpy(dtype=np.float64, na_value=np.nan)
            scaled = (np.clip(v, c.lower, c.upper) - c.lower) / (c.upper - c.lower)
            out[:, j] = np.where(miss, 0.5, scaled)
            j += 1
        if c.nullable:
            out[:, j] = miss
            j += 1
    return out, cols


def prepare(train: pd.DataFrame, holdout: pd.DataFrame, synthetic: pd.DataFrame, schema: Schema, *,
            max_victims: int = 2000, max_synthetic: int = 50_000, max_reference: int = 10_000, seed: int = 0) -> AuditData:
    """Sample first, encode only what is used: large tables (180k × 1,460) stay within memory.

    ``train``/``holdout`` in AuditData are samples of at most ``max_reference`` rows (DCR, NNAA, τ)."""
    rng = np.random.default_rng(seed)
    if len(holdout) < 20:
        raise ValueError(f"the holdout has {len(holdout)} rows: at least 20 are needed for the audits")
    hperm = rng.permutation(len(holdout))
    half = len(holdout) // 2
    ref_idx, tgt_idx = hperm[:half][:max_reference], hperm[half:]
    m = int(min(max_victims, len(tgt_idx), len(train)))
    mem_idx = rng.choice(len(train), m, replace=False)
    non_idx = tgt_idx[:m]
    tr_idx = np.sort(rng.choice(len(train), min(len(train), max_reference), replace=False))
    ho_idx = np.sort(rng.choice(len(holdout), min(len(holdout), max_reference), replace=False))
    syn = synthetic if len(synthetic) <= max_synthetic else synthetic.iloc[np.sort(rng.choice(len(synthetic), max_synthetic, replace=False))]
    x_mem, cols = encode(train.iloc[mem_idx], schema)
    enc = lambda df: encode(df, schema, cols)[0]
    return AuditData(
        schema=schema, columns=cols, train=enc(train.iloc[tr_idx]), holdout=enc(holdout.iloc[ho_idx]), members=x_mem,
        nonmembers=enc(holdout.iloc[non_idx]), reference=enc(holdout.iloc[ref_idx]), synthetic=enc(syn),
        raw_members=train.iloc[mem_idx].reset_index(drop=True),
        raw_nonmembers=holdout.iloc[non_idx].reset_index(drop=True),
        raw_synthetic=syn.reset_index(drop=True), n_victims=m,
        info={"victims_per_group": m, "train_rows": len(train), "holdout_rows": len(holdout),
              "reference_rows_used": len(tr_idx), "synthetic_rows_used": len(syn),
              "synthetic_rows": len(synthetic), "encoded_dims": len(cols)},
    )


def _nn(base: np.ndarray, query: np.ndarray, k: int = 1) -> np.ndarray:
    nn = NearestNeighbors(n_neighbors=min(k, len(base)), algorithm="brute").fit(base)
    d, _ = nn.kneighbors(query)
    return d


def _roc_points(y: np.ndarray, s: np.ndarray, n: int = 60) -> dict:
    fpr, tpr, _ = roc_curve(y, s)
    idx = np.unique(np.linspace(0, len(fpr) - 1, min(n, len(fpr))).astype(int))
    return {"fpr": fpr[idx].round(4).tolist(), "tpr": tpr[idx].round(4).tolist()}


def _tpr_at(y: np.ndarray, s: np.ndarray, fpr_max: float) -> float:
    fpr, tpr, _ = roc_curve(y, s)
    ok = fpr <= fpr_max
    return float(tpr[ok].max()) if ok.any() else 0.0


def _score_attack(name: str, sm: np.ndarray, sn: np.ndarray, method: str) -> dict:
    """AUC and TPR at low FPR for scores (higher = 'member'), with bootstrap CIs over victims."""
    m = len(sm)
    y = np.r_[np.ones(m), np.zeros(len(sn))]

    def auc(idx):
        return rank_auc(sm[idx], sn[idx])

    def tpr01(idx):
        yy = np.r_[np.ones(len(idx)), np.zeros(len(idx))]
        return _tpr_at(yy, np.r_[sm[idx], sn[idx]], 0.01)

    s = np.r_[sm, sn]
    return {
        "auc": bootstrap(auc, m, baseline=0.5, method=f"{method}: ROC AUC, members vs holdout non-members").to_json(),
        "tpr_at_fpr_1pct": bootstrap(tpr01, m, baseline=0.01, method=f"{method}: TPR at FPR ≤ 1 %").to_json(),
        "tpr_at_fpr_0.1pct": {"value": _tpr_at(y, s, 0.001), "baseline": 0.001, "n": m},
        "roc": _roc_points(y, s),
    }


# ---- membership inference -----------------------------------------------------------------------

def mia_distance(a: AuditData) -> dict:
    """Tutorial attack: 'member' if the nearest synthetic record is within a threshold."""
    dm = _nn(a.synthetic, a.members)[:, 0]
    dn = _nn(a.synthetic, a.nonmembers)[:, 0]
    # threshold: 10th percentile of a fresh patient's distance to its closest training patient (train sample)
    tau = float(np.percentile(_nn(a.train, a.reference)[:, 0], 10))

    def f1_at(t, idx):
        tp = (dm[idx] <= t).sum()
        fp = (dn[idx] <= t).sum()
        fn = len(idx) - tp
        return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)

    m = len(dm)
    thresholds = np.quantile(np.r_[dm, dn], np.linspace(0, 1, 41))
    curve = []
    for t in thresholds:
        tp, fp = int((dm <= t).sum()), int((dn <= t).sum())
        curve.append({"threshold": float(t), "precision": tp / (tp + fp) if tp + fp else None,
                      "recall": tp / m, "f1": f1_at(t, np.arange(m))})
    res = _score_attack("mia_distance", -dm, -dn, "nearest-synthetic distance")
    tp, fp = int((dm <= tau).sum()), int((dn <= tau).sum())
    res["f1"] = bootstrap(lambda idx: f1_at(tau, idx), m, baseline=None,
                          method="F1 of 'member if nearest synthetic ≤ τ' (τ = 10th pct of holdout→train NN distance)").to_json()
    res["precision"] = tp / (tp + fp) if tp + fp else None
    res["recall"] = tp / m
    res["threshold"] = tau
    res["f1_curve"] = curve
    # aggregate histogram only (bin counts), never per-record distances
    edges = np.linspace(0, float(np.percentile(np.r_[dm, dn], 99)) or 1.0, 31)
    res["distance_histogram"] = {"edges": edges.round(5).tolist(),
                                 "members": np.histogram(dm, edges)[0].tolist(),
                                 "nonmembers": np.histogram(dn, edges)[0].tolist()}
    return res


def mia_density(a: AuditData, k: int = 5) -> dict:
    """DOMIAS-style local density-ratio attack: score = log d_k(x, reference) − log d_1(x, synthetic).

    The distance to the nearest synthetic record is calibrated by how crowded the population (the holdout
    reference half, never a victim) is around x: a generator that over-fits puts synthetic records closer
    to its training patients than the population density explains, which the plain distance attack misses
    in dense regions and over-calls in sparse ones.
    """
    eps = 1e-6
    sm = np.log(_nn(a.reference, a.members, k)[:, -1] + eps) - np.log(_nn(a.synthetic, a.members)[:, 0] + eps)
    sn = np.log(_nn(a.reference, a.nonmembers, k)[:, -1] + eps) - np.log(_nn(a.synthetic, a.nonmembers)[:, 0] + eps)
    return _score_attack("mia_density", sm, sn, f"local density ratio (k_ref={k}, k_syn=1)")


# ---- attribute inference -------------------------------------------------------------------------

def _col_index(cols: list[str], names: list[str]) -> list[int]:
    out = []
    for i, c in enumerate(cols):
        base = c.split("=")[0].split(":")[0]
        if base in names:
            out.append(i)
    return out


def default_quasi_identifiers(schema: Schema) -> list[str]:
    qi = [c.name for c in schema.of_kind("continuous")]
    qi += [c.name for c in schema.of_kind("binary") if c.name.lower() in ("male", "female", "sex", "gender")]
    qi += [c.name for c in schema.of_kind("categorical") if c.name.lower() in ("sex", "gender", "race", "ethnicity")]
    return qi


def _binary_targets(a: AuditData, sensitive: list[str]) -> list[tuple[str, int]]:
    """(feature name, column index) of the 0/1 features of the sensitive columns (binary value or one-hot)."""
    out = []
    for i, c in enumerate(a.columns):
        if c.endswith(":missing"):
            continue
        base = c.split("=")[0]
        if base in sensitive:
            out.append((c, i))
    return out


RESAMPLED_NEIGHBOURS = 24  # synthetic neighbours kept per victim for the bootstrap (P(none drawn) = e^-24, k = 1)


def _neighbours(a: AuditData, cols: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the nearest synthetic rows (on ``cols``) of the members and of the non-members, nearest first:
    k of them, and enough more that a bootstrap redraw of the synthetic set still holds the k nearest."""
    K = min(len(a.synthetic), max(k, RESAMPLED_NEIGHBOURS))
    nn = NearestNeighbors(n_neighbors=K, algorithm="brute").fit(a.synthetic[:, cols])
    return nn.kneighbors(a.members[:, cols])[1], nn.kneighbors(a.nonmembers[:, cols])[1]


def _first_k(nbrs: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    """[n, K] copies of each listed neighbour among a victim's k nearest when synthetic row j appears
    ``counts[j]`` times (a bootstrap redraw; all ones for the release itself). Ties keep the neighbour order."""
    c = counts[nbrs]
    return np.clip(k - (np.cumsum(c, axis=1) - c), 0, c)


def _nearest_drawn(nbrs: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``_first_k``'s rule for k = 1 without its cumulative sums: along the last axis (a victim's listed
    neighbours, nearest first), the first neighbour drawn at least once, and whether any was (if none was, the
    first listed one is returned and the flag is False)."""
    drawn = counts[nbrs] > 0
    first = drawn.argmax(axis=-1)
    return np.take_along_axis(nbrs, first[..., None], axis=-1)[..., 0], drawn.any(axis=-1)


def _redraw(rng: np.random.Generator, s: int) -> np.ndarray:
    """Multiplicities of a bootstrap redraw of s synthetic rows."""
    return rng.multinomial(s, np.full(s, 1.0 / s))


def attribute_inference(a: AuditData, quasi_identifiers: list[str] | None = None, k: int = 1, *,
                        reps: int = 200, seed: int = 0) -> dict:
    """Tutorial kNN attack: QIs known, sensitive attributes predicted by majority of the k nearest synthetic
    records; F1 per sensitive attribute, weighted by its entropy. Control: the same attack on non-members.

    The CIs resample the victims AND the synthetic rows (each replicate redraws the synthetic set with
    replacement and redoes the attack on it). A victims-only bootstrap is too narrow at a small site: on the
    smallest demo site (219 victims per group) the residual's SD over independent releases is 0.040 while the
    victims-only bootstrap said 0.033, so its significance rule refused 3× its nominal rate."""
    schema = a.schema
    qi = quasi_identifiers or default_quasi_identifiers(schema)
    sensitive = [c.name for c in schema.modelled if c.name not in qi and c.kind in ("binary", "categorical")]
    qi_idx = _col_index(a.columns, qi)
    targets = _binary_targets(a, sensitive)
    if not qi_idx or not targets:
        return {"skipped": "no quasi-identifiers or no sensitive binary/categorical columns"}
    S = len(a.synthetic)
    im, inn = _neighbours(a, qi_idx, k)
    t_idx = [i for _, i in targets]
    syn_t = a.synthetic[:, t_idx]
    true_m = a.members[:, t_idx] > 0.5
    true_n = a.nonmembers[:, t_idx] > 0.5
    p = np.clip(a.train[:, t_idx].mean(axis=0), 1e-9, 1 - 1e-9)
    ent = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    w = ent / ent.sum() if ent.sum() > 0 else np.full(len(ent), 1 / len(ent))

    def predict(nbrs: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Majority vote of the k nearest synthetic rows of the (redrawn) synthetic set."""
        if k == 1:  # the same vote without the [n, K, t] product
            nearest, any_drawn = _nearest_drawn(nbrs, counts)
            return (syn_t[nearest] > 0.5) & any_drawn[:, None]
        take = _first_k(nbrs, counts, k)
        return (take[:, :, None] * syn_t[nbrs]).sum(axis=1) / np.maximum(take.sum(axis=1), 1)[:, None] > 0.5

    def wf1(pred, true):
        tp = (pred & true).sum(axis=0)
        fp = (pred & ~true).sum(axis=0)
        fn = (~pred & true).sum(axis=0)
        den = 2 * tp + fp + fn
        f1 = np.where(den > 0, 2 * tp / np.maximum(den, 1), 0.0)
        return float((w * f1).sum())

    ones = np.ones(S, dtype=np.int64)
    pm, pn = predict(im, ones), predict(inn, ones)
    value = (wf1(pm, true_m), wf1(pn, true_n))
    n = a.n_victims
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(reps):
        counts = _redraw(rng, S)
        i, j = rng.integers(0, n, n), rng.integers(0, n, n)
        boots.append((wf1(predict(im[i], counts), true_m[i]), wf1(predict(inn[j], counts), true_n[j])))
    boots = np.asarray(boots)

    def est(v: float, b: np.ndarray, baseline, method: str) -> dict:
        return percentile_estimate(v, b, baseline, n, method).to_json()

    how = " (CI: victims and synthetic rows resampled)"
    return {"quasi_identifiers": qi, "sensitive": sensitive, "k": k,
            "member_f1": est(value[0], boots[:, 0], None, "entropy-weighted F1, members" + how),
            "control_f1": est(value[1], boots[:, 1], None, "entropy-weighted F1, holdout non-members" + how),
            "residual": est(value[0] - value[1], boots[:, 0] - boots[:, 1], 0.0,
                            "member F1 − non-member F1 (what the release adds about its own patients)" + how)}


def inference_risk(a: AuditData, max_secrets: int = 12, *, reps: int = 200, seed: int = 0) -> dict:
    """anonymeter-style inference: the attacker knows every other column and guesses the secret from the
    nearest synthetic record. Risk = (attack − control)/(1 − control), control = holdout non-members.

    The gated value pools all secrets (one guess per victim and secret): the per-secret risks are reported
    too, but their maximum is a maximum of noisy estimates and (1 − control) is tiny for near-constant
    columns, so it would fail independent data by chance. Its CI resamples the victims and the synthetic rows
    (as attribute_inference's): with victims alone, 3 of 60 independent releases at the smallest demo site were
    refused where the significance rule allows 1.
    """
    schema = a.schema
    secrets = [c.name for c in schema.modelled if c.kind in ("binary", "categorical")][:max_secrets]
    if not secrets:
        return {"skipped": "no binary/categorical columns to infer"}
    n, S = a.n_victims, len(a.synthetic)
    nbr_m, nbr_n, val_s, val_m, val_n = [], [], [], [], []  # per secret; stacked below: [secret, ...]
    for s in secrets:
        s_idx = _col_index(a.columns, [s])
        other = [i for i in range(len(a.columns)) if i not in s_idx]

        def value(x, s_idx=s_idx):  # category index (one-hot) or 0/1
            return x[:, s_idx].argmax(axis=1) if len(s_idx) > 1 else (x[:, s_idx[0]] > 0.5).astype(int)

        im, inn = _neighbours(a, other, 1)
        for lst, v in zip((nbr_m, nbr_n, val_s, val_m, val_n),
                          (im, inn, value(a.synthetic), value(a.members), value(a.nonmembers))):
            lst.append(v)
    nbr_m, nbr_n, val_s, val_m, val_n = map(np.stack, (nbr_m, nbr_n, val_s, val_m, val_n))
    sec = np.arange(len(secrets))[:, None]

    def hits(counts: np.ndarray, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """victims × secrets: does the nearest synthetic row of the (redrawn) set give the victim's value?
        (every secret at once: the neighbour arrays are [secret, victim, K])"""
        out = []
        for nbrs, vals, idx in ((nbr_m, val_m, i), (nbr_n, val_n, j)):
            nearest, _ = _nearest_drawn(nbrs, counts)  # every victim once, then the resampled ones (no copy
            out.append((val_s[sec, nearest] == vals)[:, idx].T)  # of the [secret, victim, K] array per replicate)
        return out[0], out[1]

    def risk(hm, hn):
        ra, rc = hm.mean(), hn.mean()
        return (ra - rc) / (1 - rc) if rc < 1 else 0.0

    everyone = np.arange(n)
    hm, hn = hits(np.ones(S, dtype=np.int64), everyone, everyone)
    per = {}
    for k, s in enumerate(secrets):
        ra, rc = float(hm[:, k].mean()), float(hn[:, k].mean())
        per[s] = {"attack_rate": ra, "control_rate": rc, "risk": (ra - rc) / (1 - rc) if rc < 1 else 0.0}
    rng = np.random.default_rng(seed)
    boots = [risk(*hits(_redraw(rng, S), rng.integers(0, n, n), rng.integers(0, n, n))) for _ in range(reps)]
    est = percentile_estimate(risk(hm, hn), boots, 0.0, n,
                              "pooled over secrets: (attack − control)/(1 − control) (CI: victims and synthetic rows resampled)")
    return {"secrets": secrets, "per_secret": per, "attack_rate": float(hm.mean()), "control_rate": float(hn.mean()),
            "risk": est.to_json()}


# ---- distance-based ------------------------------------------------------------------------------

def _sample(x: np.ndarray, n: int, rng) -> np.ndarray:
    return x if len(x) <= n else x[rng.choice(len(x), n, replace=False)]


def _bootstrap_diff(x: np.ndarray, y: np.ndarray, reps: int = 200, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    d = [x[rng.integers(0, len(x), len(x))].mean() - y[rng.integers(0, len(y), len(y))].mean() for _ in range(reps)]
    lo, hi = np.percentile(d, [2.5, 97.5])
    return float(lo), float(hi)


def nnaa(a: AuditData, cap: int = 10_000, seed: int = 0) -> dict:
    """Nearest-neighbour adversarial accuracy (Yale et al. 2020): AA_train, AA_holdout, privacy loss.

    AA(T, S) = ½(P[d_TS > d_TT] + P[d_ST > d_SS]) on equal-size T and S (leave-one-out within a set); 0.5 is
    ideal. Privacy loss = AA_holdout − AA_train: how much closer the release is to its own training patients.
    """
    rng = np.random.default_rng(seed)

    def indicators(t: np.ndarray):
        m = min(len(t), len(a.synthetic), cap)
        t = _sample(t, m, rng)
        s = _sample(a.synthetic, m, rng)
        x = (_nn(s, t)[:, 0] > _nn(t, t, 2)[:, 1]).astype(float)
        y = (_nn(t, s)[:, 0] > _nn(s, s, 2)[:, 1]).astype(float)
        return np.r_[x, y]  # AA = mean of both halves (equal sizes)

    it, ih = indicators(a.train), indicators(a.holdout)

    def est(v, method):
        e = bootstrap(lambda i: v[i].mean(), len(v), baseline=0.5, method=method).to_json()
        e["n"] = len(v) // 2  # records per set (the indicator vector holds both directions)
        return e

    lo, hi = _bootstrap_diff(ih, it, seed=seed)
    loss = float(ih.mean() - it.mean())
    return {
        "aa_train": est(it, f"AA(train, synthetic), {len(it) // 2} records each"),
        "aa_holdout": est(ih, f"AA(holdout, synthetic), {len(ih) // 2} records each"),
        "privacy_loss": {"value": loss, "ci_low": lo, "ci_high": hi, "baseline": 0.0, "n": len(it) // 2,
                         "method": "AA_holdout − AA_train"},
    }


def dcr_share(a: AuditData, cap: int = 10_000, seed: int = 0, draws: int = 5) -> dict:
    """Share of synthetic records closer to a training record than to a holdout record (equal-size sets).

    The train reference set is a random sample of the holdout's size; the share depends on which sample,
    so it is computed for ``draws`` independent samples: the value is their mean and the 95 % CI combines
    the binomial spread over synthetic rows with the spread between reference draws (small sites would
    otherwise fail the gate by chance)."""
    rng = np.random.default_rng(seed)
    m = min(len(a.holdout), len(a.train), cap)
    h = _sample(a.holdout, m, rng)
    s = _sample(a.synthetic, cap, rng)
    dh = _nn(h, s)[:, 0]
    shares = []
    for _ in range(draws if len(a.train) > m else 1):
        dt = _nn(_sample(a.train, m, rng), s)[:, 0]
        shares.append(((dt < dh).sum() + 0.5 * (dt == dh).sum()) / len(s))
    value = float(np.mean(shares))
    binom_var = value * (1 - value) / len(s)
    between = float(np.var(shares, ddof=1)) if len(shares) > 1 else 0.0
    half = 1.96 * float(np.sqrt(binom_var + between))
    return {"share": {"value": value, "ci_low": max(0.0, value - half), "ci_high": min(1.0, value + half),
                      "baseline": 0.5, "n": len(s),
                      "method": f"share of synthetic rows closer to train than holdout ({m} records each, "
                                f"{len(shares)} train reference draws)"}}


def _row_keys(df: pd.DataFrame, schema: Schema) -> pd.Series:
    """A 64-bit hash per row of the modelled columns (continuous rounded to 6 decimals, categories canonical),
    combined column by column so that wide tables need O(rows) extra memory."""
    h = np.zeros(len(df), dtype=np.uint64)
    for c in schema.modelled:
        s = df[c.name]
        if c.kind == "categorical":
            vals = s.map(lambda x: "NA" if pd.isna(x) else canonical_category(x)).to_numpy(dtype=object)
        else:
            vals = np.round(s.to_numpy(dtype=np.float64, na_value=np.nan), 6)
        with np.errstate(over="ignore"):
            h = h * np.uint64(1_000_003) ^ pd.util.hash_array(vals)
    return pd.Series(h)


def exact_copies(train: pd.DataFrame, holdout: pd.DataFrame, synthetic: pd.DataFrame, schema: Schema) -> dict:
    """Synthetic rows identical to a training row on every modelled column; control: identical to a holdout row."""
    ks = _row_keys(synthetic, schema)
    kt, kh = set(_row_keys(train, schema)), set(_row_keys(holdout, schema))
    n = len(ks)
    c_train = int(ks.isin(kt).sum())
    c_hold = int(ks.isin(kh).sum())
    # scale the control to the train set's size (more training rows → more chance matches)
    control_rate = c_hold / n * (len(kt) / max(len(kh), 1))
    return {"train_copies": proportion(c_train, n, control_rate, "synthetic rows equal to a training row").to_json(),
            "holdout_copies": c_hold, "excess_rate": c_train / n - control_rate}


def identifier_replay(train: pd.DataFrame, synthetic: pd.DataFrame, schema: Schema) -> dict:
    """Training identifier values (names, MRNs, ids) appearing in the release: exact values in identifier
    columns, and as tokens inside text columns (values of 5+ characters, numbers of 6+ digits, to avoid
    matching plain quantities)."""
    import re

    ids = set()
    for c in schema.of_kind("identifier"):
        if c.name in train:
            ids |= {str(v) for v in train[c.name].dropna()}
    found = 0
    for c in schema.of_kind("identifier"):
        if c.name in synthetic:
            found += int(synthetic[c.name].dropna().astype(str).isin(ids).sum())
    # in free text a short number is a quantity (a weight, a date part, a count) as often as an id: purely
    # numeric values count from 6 digits (MRN-like, the rule of audits.text.note_identifiers), others from 5
    # characters. A dense numeric id space (NAFLD ids are 1–5 digits) would otherwise "replay" an id in every
    # note that mentions a 5-digit number
    long_ids = {i for i in ids if len(i) >= (6 if i.isdigit() else 5)}
    if long_ids:
        for c in schema.of_kind("text"):
            if c.name in synthetic:
                for note in synthetic[c.name].dropna().astype(str):
                    found += sum(1 for tok in re.findall(r"[\w-]+", note) if tok in long_ids)
    return {"replayed_values": found, "identifier_columns": [c.name for c in schema.of_kind("identifier")]}
