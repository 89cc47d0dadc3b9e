"""The schema: what each column is, its public bounds / categories, constraints, and how it may be used.

A schema is JSON. It is the only source of preprocessing parameters: min/max and categories come from here,
never from the private data (fitting an encoder on raw data is a leak, DESIGN.md §3). A schema produced by
`dpsynth schema infer` without ``--epsilon`` is a *draft*: its bounds come from the data and must be
replaced or confirmed by a person, and ``train`` refuses it until ``status`` is ``"reviewed"``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .errors import DataError, SchemaError

SCHEMA_VERSION = 1
KINDS = ("continuous", "binary", "categorical", "identifier", "text")
MODELLED_KINDS = ("continuous", "binary", "categorical")

# Column names that are identifiers whatever their values look like (names, MRNs, dates of birth, ids).
IDENTIFIER_NAME = re.compile(
    r"(^|_|\b)(id|ids|uuid|mrn|nhs|ssn|name|first_?name|last_?name|surname|patient_?id|subject_?id|"
    r"record_?id|case_?id|dob|birth_?date|date_?of_?birth|address|phone|email|zip|postcode)($|_|\b)",
    re.IGNORECASE,
)


def canonical_category(value: Any) -> str:
    """Categories are compared in one canonical string form: 1, 1.0 and "1" are the same category."""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isfinite(value) and float(value).is_integer():
            return str(int(value))
        return repr(float(value))
    return str(value)


MAX_VOCABULARY = 16_384  # word pieces of a text column's public vocabulary


@dataclass
class Column:
    name: str
    kind: str
    nullable: bool = False
    lower: float | None = None
    upper: float | None = None
    integer: bool = False
    categories: list[Any] | None = None
    bounds_source: str = "public"  # public | dp | data-draft
    review: str | None = None  # set on draft columns: what a person must check before training
    description: str = ""
    # text columns only: public word pieces the note tokenizer may use as single tokens (everything else is
    # spelled in UTF-8 bytes). Public like bounds: written by a person, derived from public text, or DP-selected
    # with its spend in ``dp_spend`` — never read off the private notes for free.
    vocabulary: list[str] | None = None

    def validate(self) -> None:
        where = f"column {self.name!r}"
        if not self.name or not isinstance(self.name, str):
            raise SchemaError(f"{where}: a column needs a non-empty string name")
        if self.kind not in KINDS:
            raise SchemaError(f"{where}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "continuous":
            if self.lower is None or self.upper is None:
                raise SchemaError(f"{where}: continuous columns need public bounds 'lower' and 'upper'")
            lo, hi = float(self.lower), float(self.upper)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise SchemaError(f"{where}: bounds must be finite, got [{self.lower}, {self.upper}]")
            if not lo < hi:
                raise SchemaError(f"{where}: lower bound {lo} must be below upper bound {hi}")
        if self.kind == "categorical":
            if not self.categories or len(self.categories) < 2:
                raise SchemaError(f"{where}: categorical columns need at least two categories")
            canon = [canonical_category(c) for c in self.categories]
            dup = sorted({c for c in canon if canon.count(c) > 1})
            if dup:
                raise SchemaError(f"{where}: duplicate categories {dup}")
        if self.bounds_source not in ("public", "dp", "data-draft"):
            raise SchemaError(f"{where}: bounds_source {self.bounds_source!r} is not public, dp or data-draft")
        if self.vocabulary is not None:
            if self.kind != "text":
                raise SchemaError(f"{where}: only text columns have a vocabulary (kind is {self.kind!r})")
            v = self.vocabulary
            if not isinstance(v, list) or not all(isinstance(w, str) and w for w in v):
                raise SchemaError(f"{where}: vocabulary must be a list of non-empty strings")
            if len(set(v)) != len(v):
                raise SchemaError(f"{where}: vocabulary has duplicate entries {sorted({w for w in v if v.count(w) > 1})[:5]}")
            if len(v) > MAX_VOCABULARY:
                raise SchemaError(f"{where}: vocabulary has {len(v)} entries, more than {MAX_VOCABULARY}")

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: v for k, v in d.items() if v is not None and v != "" and not (k == "integer" and not v)}

    @classmethod
    def from_json(cls, d: dict, where: str) -> "Column":
        if not isinstance(d, dict):
            raise SchemaError(f"{where}: each column must be a JSON object")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise SchemaError(f"{where}: unknown keys {sorted(unknown)} in column {d.get('name')!r}")
        if "name" not in d or "kind" not in d:
            raise SchemaError(f"{where}: every column needs 'name' and 'kind'")
        col = cls(**d)
        col.validate()
        return col


@dataclass
class Constraint:
    """A known relation between columns. Only typed constraints (no eval of user expressions).

    type "bmi": bmi ≈ weight[kg] / (height[cm]/100)²; a row violates it when all three are present and the
    relative error exceeds ``rel_tol``.
    """

    type: str
    columns: dict[str, str]
    rel_tol: float = 0.05
    description: str = ""
    enforce: bool = True  # generation recomputes the target from the other columns (public knowledge)

    def validate(self, names: set[str]) -> None:
        if self.type != "bmi":
            raise SchemaError(f"constraint type {self.type!r} is not supported (supported: 'bmi')")
        need = {"bmi", "weight", "height"}
        if set(self.columns) != need:
            raise SchemaError(f"constraint 'bmi' needs columns {sorted(need)}, got {sorted(self.columns)}")
        missing = [c for c in self.columns.values() if c not in names]
        if missing:
            raise SchemaError(f"constraint 'bmi' refers to columns not in the schema: {missing}")

    def enforce_on(self, df: pd.DataFrame, schema: "Schema") -> int:
        """Recompute bmi from weight and height where all three are present and the result lies within the
        bmi column's public bounds (post-processing of synthetic records: no privacy cost). Returns rows set."""
        c = self.columns
        bmi, w, h = (pd.to_numeric(df[c[k]], errors="coerce") for k in ("bmi", "weight", "height"))
        target = schema[c["bmi"]]
        ok = bmi.notna() & w.notna() & h.notna() & (h > 0)
        val = w / (h / 100.0) ** 2
        ok &= (val >= target.lower) & (val <= target.upper)
        df.loc[ok, c["bmi"]] = val[ok].round(4 if not target.integer else 0)
        return int(ok.sum())

    def violations(self, df: pd.DataFrame) -> tuple[int, int]:
        """(violating rows, rows where the constraint can be checked: all columns present)."""
        c = self.columns
        bmi, w, h = (pd.to_numeric(df[c[k]], errors="coerce") for k in ("bmi", "weight", "height"))
        ok = bmi.notna() & w.notna() & h.notna() & (h > 0)
        expected = w[ok] / (h[ok] / 100.0) ** 2
        rel = (bmi[ok] - expected).abs() / expected.abs().clip(lower=1e-9)
        return int((rel > self.rel_tol).sum()), int(ok.sum())


@dataclass
class Schema:
    columns: list[Column]
    name: str = "dataset"
    status: str = "reviewed"  # draft | reviewed
    label: str | None = None  # binary column used for TSTR in the utility report
    constraints: list[Constraint] = field(default_factory=list)
    # DP mechanisms that looked at the private data to build this schema (charged to the training budget).
    dp_spend: dict | None = None
    notes: str = ""
    version: int = SCHEMA_VERSION

    # ---- lookup -------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self._by_name = {c.name: c for c in self.columns}

    def __getitem__(self, name: str) -> Column:
        return self._by_name[name]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def of_kind(self, *kinds: str) -> list[Column]:
        return [c for c in self.columns if c.kind in kinds]

    @property
    def modelled(self) -> list[Column]:
        return self.of_kind(*MODELLED_KINDS)

    # ---- checks -------------------------------------------------------------------------------
    def validate(self) -> None:
        if self.version != SCHEMA_VERSION:
            raise SchemaError(f"schema version {self.version} is not supported (expected {SCHEMA_VERSION})")
        if not self.columns:
            raise SchemaError("schema has no columns")
        names = [c.name for c in self.columns]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SchemaError(f"duplicate column names in schema: {dup}")
        for c in self.columns:
            c.validate()
        if self.status not in ("draft", "reviewed"):
            raise SchemaError(f"schema status {self.status!r} must be 'draft' or 'reviewed'")
        if self.label is not None:
            if self.label not in self._by_name:
                raise SchemaError(f"label column {self.label!r} is not in the schema")
            if self._by_name[self.label].kind != "binary":
                raise SchemaError(f"label column {self.label!r} must be binary")
        for con in self.constraints:
            con.validate(set(names))
        if not self.modelled:
            raise SchemaError("schema has no modelled column (continuous, binary or categorical)")

    def require_reviewed(self, path: str = "schema") -> None:
        """Training refuses drafts: their bounds were read off the data and would leak it."""
        pending = [c.name for c in self.columns if c.review]
        if self.status != "reviewed" or pending:
            raise SchemaError(
                f"{path} is a DRAFT (status={self.status!r}; columns awaiting review: {pending or 'none'}). "
                "Its bounds/categories were read off the private data. Replace them with public knowledge "
                "(physiological limits, code lists), remove each column's 'review' key and set "
                "\"status\": \"reviewed\" — or run `dpsynth schema infer --epsilon ...` to estimate them with DP."
            )

    # ---- JSON ---------------------------------------------------------------------------------
    def to_json(self) -> dict:
        d: dict[str, Any] = {
            "version": self.version,
            "name": self.name,
            "status": self.status,
            "columns": [c.to_json() for c in self.columns],
        }
        if self.label:
            d["label"] = self.label
        if self.constraints:
            d["constraints"] = [
                {k: v for k, v in asdict(c).items() if v != ""} for c in self.constraints
            ]
        if self.dp_spend:
            d["dp_spend"] = self.dp_spend
        if self.notes:
            d["notes"] = self.notes
        return d

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"

    def hash(self) -> str:
        """SHA-256 over the canonical JSON (key order and whitespace do not matter)."""
        canon = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()

    @classmethod
    def from_json(cls, d: Any, where: str = "schema") -> "Schema":
        if not isinstance(d, dict):
            raise SchemaError(f"{where}: top level must be a JSON object")
        allowed = {"version", "name", "status", "columns", "label", "constraints", "dp_spend", "notes"}
        unknown = set(d) - allowed
        if unknown:
            raise SchemaError(f"{where}: unknown top-level keys {sorted(unknown)}")
        if not isinstance(d.get("columns"), list):
            raise SchemaError(f"{where}: 'columns' must be a list")
        cols = [Column.from_json(c, where) for c in d["columns"]]
        cons = []
        for c in d.get("constraints", []) or []:
            try:
                cons.append(Constraint(**c))
            except TypeError as e:
                raise SchemaError(f"{where}: bad constraint {c!r}: {e}") from None
        s = cls(
            columns=cols,
            name=d.get("name", "dataset"),
            status=d.get("status", "reviewed"),
            label=d.get("label"),
            constraints=cons,
            dp_spend=d.get("dp_spend"),
            notes=d.get("notes", ""),
            version=d.get("version", SCHEMA_VERSION),
        )
        try:
            s.validate()
        except SchemaError as e:
            raise SchemaError(f"{where}: {e}") from None
        return s

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Schema":
        path = os.fspath(path)
        if not os.path.exists(path):
            raise SchemaError(f"schema file {path} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise SchemaError(f"{path}: not valid JSON ({e})") from None
        except UnicodeDecodeError:
            raise SchemaError(f"{path}: not UTF-8 text") from None
        return cls.from_json(d, where=path)

    def save(self, path: str | os.PathLike) -> None:
        from .io_utils import atomic_write_text

        atomic_write_text(path, self.dumps())


# ---------------------------------------------------------------------------------------------
# Data validation against a schema
# ---------------------------------------------------------------------------------------------

_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f"}


def _first_bad(series: pd.Series, bad_mask: pd.Series) -> str:
    idx = bad_mask[bad_mask].index[0]
    pos = series.index.get_loc(idx)
    return f"value {series.loc[idx]!r} in data row {pos + 1}"


def validate_frame(df: pd.DataFrame, schema: Schema, source: str = "data") -> pd.DataFrame:
    """Check ``df`` against ``schema`` and return a normalised copy (numeric dtypes, canonical categories).

    Raises DataError naming the file, the column and the first offending value.
    """
    if len(df) == 0:
        raise DataError(f"{source}: the file has no data rows")
    cols = [str(c) for c in df.columns]
    dup = sorted({c for c in cols if cols.count(c) > 1})
    if dup:
        raise DataError(f"{source}: duplicate column names {dup}")
    missing = [n for n in schema.names if n not in cols]
    extra = [c for c in cols if c not in schema._by_name]
    if missing:
        raise DataError(f"{source}: columns in the schema but not in the file: {missing}")
    if extra:
        raise DataError(
            f"{source}: columns in the file but not in the schema: {extra} "
            "(add them to the schema, e.g. as kind 'identifier' to ignore them, or drop them)"
        )
    out: dict = {}
    for col in schema.columns:
        s = df[col.name]
        where = f"{source}: column {col.name!r}"
        isna = s.isna()
        if isna.any() and not col.nullable and col.kind in MODELLED_KINDS:
            raise DataError(
                f"{where} has {int(isna.sum())} missing values but the schema says nullable=false "
                f"(first in data row {int(np.flatnonzero(isna.to_numpy())[0]) + 1})"
            )
        if col.kind == "continuous":
            num = pd.to_numeric(s, errors="coerce")
            bad = num.isna() & ~isna
            if bad.any():
                raise DataError(f"{where}: non-numeric {_first_bad(s, bad)}")
            inf = np.isinf(num.to_numpy(dtype=float, na_value=np.nan))
            if inf.any():
                raise DataError(f"{where}: infinite {_first_bad(s, pd.Series(inf, index=s.index))}")
            out[col.name] = num.astype(float)
        elif col.kind == "binary":
            if pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):  # vectorised fast path
                v = s.astype(float)
                ok = v.isin([0.0, 1.0]) | isna
                if not ok.all():
                    raise DataError(f"{where}: binary columns hold 0/1 (or true/false); got {_first_bad(s, ~ok)}")
            else:
                txt = s.map(lambda v: None if pd.isna(v) else canonical_category(v).strip().lower())
                ok = txt.isin(_TRUE | _FALSE) | isna
                if not ok.all():
                    raise DataError(f"{where}: binary columns hold 0/1 (or true/false); got {_first_bad(s, ~ok)}")
                v = txt.map(lambda t: np.nan if t is None else float(t in _TRUE))
            # int8 where complete (wide code matrices stay small), float with NaN where values are missing
            out[col.name] = v.astype(np.int8) if not isna.any() else v.astype(np.float32)
        elif col.kind == "categorical":
            allowed = {canonical_category(c) for c in col.categories or []}
            canon = s.map(lambda v: None if pd.isna(v) else canonical_category(v))
            bad = ~(canon.isin(allowed) | isna)
            if bad.any():
                raise DataError(
                    f"{where}: category outside the schema: {_first_bad(s, bad)} "
                    f"(allowed: {sorted(allowed)})"
                )
            out[col.name] = canon.astype(object)
        else:  # identifier / text: carried, never modelled
            out[col.name] = s
    return pd.DataFrame(out, index=df.index)


# ---------------------------------------------------------------------------------------------
# Inference: a DRAFT from the data, or a DP estimate
# ---------------------------------------------------------------------------------------------

def _looks_identifier(name: str, s: pd.Series) -> bool:
    if IDENTIFIER_NAME.search(name):
        return True
    nonnull = s.dropna()
    if len(nonnull) == 0:
        return False
    if pd.api.types.is_float_dtype(s):
        return False
    return nonnull.nunique() / len(nonnull) > 0.95 and len(nonnull) >= 20


def infer_schema(df: pd.DataFrame, *, name: str = "dataset", epsilon: float | None = None,
                 delta: float | None = None, generator=None) -> Schema:
    """Without ``epsilon``: a draft (data-derived bounds marked for review; ``train`` refuses it).

    With ``epsilon``: bounds, binary detection and categories from DP mechanisms; the spend is recorded in
    ``dp_spend`` and counted by ``train`` inside its budget. Identifier detection by column name is free
    (names are not data); uniqueness-based detection looks at the data, so in DP mode only names are used
    and string columns without any category surviving the DP threshold become identifiers.
    """
    cols = [str(c) for c in df.columns]
    dup = sorted({c for c in cols if cols.count(c) > 1})
    if dup:
        raise DataError(f"duplicate column names {dup}")
    if len(df) == 0:
        raise DataError("no data rows to infer a schema from")
    columns: list[Column] = []
    if epsilon is None:
        for c in df.columns:
            s = df[c]
            if _looks_identifier(c, s):
                columns.append(Column(c, "identifier", description="detected by name/uniqueness: never modelled",
                                      review="confirm this column is an identifier"))
                continue
            num = pd.to_numeric(s, errors="coerce")
            is_numeric = num.notna().sum() == s.notna().sum()
            nonnull = num.dropna() if is_numeric else s.dropna()
            nullable = bool(s.isna().any())
            if is_numeric and set(nonnull.unique()) <= {0, 1}:
                columns.append(Column(c, "binary", nullable=nullable))
            elif is_numeric and nonnull.nunique() > 10:
                integer = bool(np.all(np.mod(nonnull, 1) == 0))
                columns.append(Column(
                    c, "continuous", nullable=nullable, lower=float(nonnull.min()), upper=float(nonnull.max()),
                    integer=integer, bounds_source="data-draft",
                    review="bounds are the data's min/max: replace with public limits (e.g. physiological)",
                ))
            elif not is_numeric and nonnull.astype(str).str.len().mean() > 40:
                columns.append(Column(c, "text", nullable=True, review="free text: confirm"))
            else:
                cats = sorted({canonical_category(v) for v in nonnull})
                if len(cats) < 2:
                    cats = cats + ["other"]
                columns.append(Column(c, "categorical", nullable=nullable, categories=cats, bounds_source="data-draft",
                                      review="categories are the values seen in the data: replace with the public code list"))
        return Schema(columns=columns, name=name, status="draft",
                      notes="DRAFT written by `dpsynth schema infer` without --epsilon: review every column marked "
                            "'review', then set status to 'reviewed'.")

    from .privacy.dpstats import dp_column_summaries

    if delta is None:
        delta = 1.0 / (10 * len(df))
    kinds: dict[str, str] = {}
    for c in df.columns:
        if IDENTIFIER_NAME.search(c):
            columns.append(Column(c, "identifier", description="identifier by name: never modelled"))
            continue
        kinds[c] = "numeric" if pd.api.types.is_numeric_dtype(df[c]) else "string"
        columns.append(None)  # placeholder, filled below in order
    found, spend = dp_column_summaries(df, kinds, epsilon=epsilon, delta=delta, generator=generator)
    out: list[Column] = []
    it = iter(found.items())
    for col in columns:
        if col is not None:
            out.append(col)
            continue
        c, f = next(it)
        if f["kind"] == "binary":
            out.append(Column(c, "binary", nullable=True, bounds_source="dp"))
        elif f["kind"] == "continuous" and "lower" in f:
            integer = pd.api.types.is_integer_dtype(df[c])
            out.append(Column(c, "continuous", nullable=True, lower=f["lower"], upper=f["upper"], integer=integer,
                              bounds_source="dp"))
        elif f["kind"] == "continuous":  # too few values for this ε: no bound is released, a person must set them
            out.append(Column(c, "continuous", nullable=True, lower=-1e7, upper=1e7, bounds_source="dp",
                              integer=pd.api.types.is_integer_dtype(df[c]),
                              review="too few values to estimate bounds at this ε: set public bounds"))
        elif f["kind"] == "categorical":
            out.append(Column(c, "categorical", nullable=True, categories=f["categories"], bounds_source="dp",
                              description="categories released by a thresholded DP histogram; rarer values are "
                                          "not in the schema (map them to a listed category before training)"))
        else:
            out.append(Column(c, "identifier", description="no category passed the DP threshold: not modelled"))
    pending = [c.name for c in out if c.review]
    return Schema(columns=out, name=name, status="draft" if pending else "reviewed", dp_spend=spend,
                  notes=f"Estimated with DP (epsilon={epsilon:g}, delta={delta:g}); train counts this spend inside "
                        "its --epsilon. Review the result anyway.")
