"""Rendered demonstration notes: one short clinical-style note per patient of the demo cohort.

No public clinical-note corpus is available offline (DESIGN.md §5), so the demo renders a note from each
patient's structured record. These notes are NOT real clinical text and must be labelled as such wherever
they appear (``NOTE_LABEL``; the returned Series also carries it in ``.attrs["label"]``).

What the renderer does, so that the text model has something non-trivial to learn:
  * 7 templates (clinic note, SOAP, narrative, telegraphic, referral letter, problem list, annual review),
    each a header, a shuffled body of sentence units and a closing plan;
  * lexical variation: synonyms and the usual abbreviations (HTN, DM2, AF, CHF, MI, IHD, CVA, BMI, SBP, HDL,
    pt, y/o, hx, c/o, PMH, f/u, ...), random pertinent negatives for absent conditions;
  * numbers rendered with occasional rounding (88.4 kg → "88 kg" / "~90kg"; height in cm or m);
  * missing values either omitted or phrased ("weight not recorded", "no BP on file");
  * noise: typos at a small per-word rate, casing, spacing.

Privacy of the renderer itself: each note is a function of that patient's own record and the seed only
(the per-note random generator is seeded from the seed and a hash of the row's values, never from other
rows or from the row's position), so adding or removing one patient changes exactly one note. The
identifier column (``id``) is never rendered, and ``futime``/``status`` (the follow-up outcome) are not
mentioned: a baseline note cannot know them.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd

NOTE_LABEL = "rendered demonstration note (not real clinical text)"
TYPO_RATE = 0.012  # per word (≥ 4 letters)
MAX_CHARS = 200  # optional sentence units are dropped until a note fits (the history and plan always stay)

# condition column → (phrases used in lists, weight of the abbreviation forms is implicit in repetition)
CONDITIONS: dict[str, list[str]] = {
    "htn": ["HTN", "HTN", "hypertension", "high blood pressure", "essential hypertension"],
    "diabetes": ["DM2", "T2DM", "type 2 diabetes", "diabetes mellitus", "DM"],
    "dyslipidemia": ["dyslipidemia", "hyperlipidemia", "HLD", "high cholesterol", "dyslipidaemia"],
    "ang_isc": ["IHD", "angina", "ischemic heart disease", "CAD w/ angina", "stable angina"],
    "stroke": ["CVA", "stroke", "prior CVA", "old stroke", "cerebrovascular accident"],
    "afib": ["AF", "afib", "atrial fibrillation", "AFib", "paroxysmal AF"],
    "heart_failure": ["CHF", "heart failure", "HF", "congestive heart failure", "CCF"],
    "mi": ["MI", "old MI", "myocardial infarction", "prior MI", "hx MI"],
    "cardiac_arrest": ["cardiac arrest", "VF arrest", "prior cardiac arrest", "arrest (resuscitated)"],
    "nafld": ["NAFLD", "fatty liver", "hepatic steatosis", "non-alcoholic fatty liver disease", "NAFLD"],
}
PLANS: dict[str, list[str]] = {
    "htn": ["continue antihypertensives", "BP control discussed", "home BP monitoring", "titrate ACEi"],
    "diabetes": ["continue metformin", "check HbA1c", "diabetic foot review", "refer to diabetes nurse"],
    "dyslipidemia": ["continue statin", "repeat lipid panel", "start atorvastatin", "diet advice for lipids"],
    "ang_isc": ["GTN spray PRN", "cardiology f/u", "continue aspirin"],
    "stroke": ["secondary stroke prevention", "continue clopidogrel", "neuro f/u"],
    "afib": ["anticoagulation reviewed", "continue apixaban", "rate control ok", "CHA2DS2-VASc reviewed"],
    "heart_failure": ["daily weights", "continue furosemide", "echo in 6 months", "HF nurse f/u"],
    "mi": ["continue beta blocker", "cardiac rehab", "continue DAPT per cardiology"],
    "cardiac_arrest": ["ICD check", "EP clinic f/u"],
    "nafld": ["LFTs in 3 months", "weight loss advised", "liver US f/u", "hepatology referral"],
}
GENERIC_PLANS = ["f/u 6 months", "f/u 1 year", "routine f/u", "return PRN", "review in clinic", "labs before next visit"]
NEGATIVES = {
    "htn": ["no HTN", "normotensive"],
    "diabetes": ["no DM", "not diabetic"],
    "stroke": ["no hx of stroke", "no CVA"],
    "afib": ["no AF", "sinus rhythm"],
    "heart_failure": ["no signs of CHF", "no HF"],
    "mi": ["no prior MI", "denies MI"],
    "ang_isc": ["denies chest pain", "no angina"],
}
COMPLAINTS = ["routine review", "fatigue", "annual check", "med review", "mild SOB on exertion", "follow-up of labs",
              "knee pain", "BP check", "weight concerns", "no new complaints"]


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------

def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _present(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and not pd.isna(v)


def _flag(row: dict, col: str) -> bool:
    v = row.get(col)
    return _present(v) and float(v) >= 0.5


def _num(rng, x: float, *, decimals: int = 1, coarse: float = 5.0) -> str:
    """A number with occasional rounding: as recorded (to ``decimals``), rounded to an integer, or ~coarse."""
    u = rng.random()
    if u < 0.55:
        s = f"{x:.{decimals}f}"
        return s.removesuffix(".0")
    if u < 0.9:
        return str(round(x))
    return "~" + str(int(round(x / coarse) * coarse))


def _sex(rng, male: bool, style: str) -> str:
    if style == "short":
        return "M" if male else "F"
    if style == "noun":
        return _pick(rng, ["man", "male", "gentleman"] if male else ["woman", "female", "lady"])
    return "male" if male else "female"


def _join(rng, items: list[str]) -> str:
    if not items:
        return ""
    if len(items) == 1:
        return items[0]
    if rng.random() < 0.5:
        return ", ".join(items)
    return ", ".join(items[:-1]) + _pick(rng, [" and ", " & ", ", "]) + items[-1]


# ------------------------------------------------------------------------------------------------
# sentence units (each returns a sentence or None when it has nothing to say)
# ------------------------------------------------------------------------------------------------

def _history(rng, row) -> str | None:
    have = [c for c in CONDITIONS if _flag(row, c)]
    rng.shuffle(have)
    if not have:
        return _pick(rng, ["No significant PMH.", "PMH: nil of note.", "No known chronic conditions.", "pmh unremarkable."])
    words = _join(rng, [_pick(rng, CONDITIONS[c]) for c in have])
    return _pick(rng, [f"PMH: {words}.", f"hx of {words}.", f"Known {words}.", f"Background of {words}.",
                       f"PMHx {words}."])


def _negatives(rng, row) -> str | None:
    absent = [c for c in NEGATIVES if not _flag(row, c)]
    if not absent or rng.random() < 0.6:
        return None
    k = int(rng.integers(1, min(3, len(absent)) + 1))
    chosen = [absent[i] for i in rng.choice(len(absent), size=k, replace=False)]
    text = _join(rng, [_pick(rng, NEGATIVES[c]) for c in chosen])
    return text[0].upper() + text[1:] + "."


def _body_size(rng, row) -> str | None:
    h, w, b = row.get("height"), row.get("weight"), row.get("bmi")
    parts = []
    if _present(h):
        parts.append(_pick(rng, [f"ht {_num(rng, h, decimals=0)} cm", f"height {_num(rng, h, decimals=0)}cm",
                                 f"ht {float(h) / 100:.2f} m"]))
    elif rng.random() < 0.5:
        parts.append(_pick(rng, ["height not recorded", "ht not documented"]))
    if _present(w):
        parts.append(_pick(rng, [f"wt {_num(rng, w)} kg", f"weight {_num(rng, w)}kg", f"wt {_num(rng, w)}kg"]))
    elif rng.random() < 0.5:
        parts.append(_pick(rng, ["weight not recorded", "wt not on file", "weight unknown"]))
    if _present(b):
        bs = _num(rng, b, decimals=1, coarse=1.0)
        parts.append(_pick(rng, [f"BMI {bs}", f"BMI {bs} kg/m2", f"bmi {bs}"]))
    elif rng.random() < 0.4:
        parts.append(_pick(rng, ["BMI not calculated", "no BMI on file"]))
    if not parts:
        return None
    return _join(rng, parts) + "."


def _bp(rng, row) -> str | None:
    s = row.get("sbp")
    if _present(s):
        s = round(float(s))
        if rng.random() < 0.15:
            s = int(round(s / 5) * 5)
        return _pick(rng, [f"SBP {s} mmHg.", f"BP {s} systolic.", f"systolic BP {s}.", f"SBP {s}."])
    if rng.random() < 0.4:
        return _pick(rng, ["No BP on file.", "BP not recorded.", "SBP not documented."])
    return None


def _lipids(rng, row) -> str | None:
    v = row.get("hdl")
    if _present(v):
        s = _num(rng, float(v), decimals=0, coarse=5.0)
        return _pick(rng, [f"HDL {s} mg/dL.", f"HDL {s}.", f"lipids: HDL {s}.", f"last HDL {s}."])
    if rng.random() < 0.3:
        return _pick(rng, ["No recent lipids.", "HDL not recorded."])
    return None


def _smoking(rng, row) -> str | None:
    v = row.get("smoking")
    if _present(v):
        if str(v) == "smoker":
            return _pick(rng, ["Current smoker.", "Smoker, cessation advised.", "smokes.", "Tobacco: current."])
        return _pick(rng, ["Non-smoker.", "Never smoker.", "Denies tobacco.", "nonsmoker."])
    if rng.random() < 0.25:
        return _pick(rng, ["Smoking status unknown.", "Smoking hx not documented."])
    return None


def _plan(rng, row) -> str:
    have = [c for c in PLANS if _flag(row, c)]
    items = [_pick(rng, PLANS[c]) for c in have if rng.random() < 0.7]
    if len(items) > 3:
        items = items[:3]
    items.append(_pick(rng, GENERIC_PLANS))
    return _join(rng, items)


# ------------------------------------------------------------------------------------------------
# templates: header · shuffled body · closing
# ------------------------------------------------------------------------------------------------

def _demo_sentence(rng, age: int | None, male: bool, kind: str) -> str:
    a = "" if age is None else str(age)
    if kind == "clinic":
        return _pick(rng, [f"{a} y/o {_sex(rng, male, 'long')} seen in clinic.", f"Pt is a {a}yo {_sex(rng, male, 'long')}.",
                           f"{a}yo {_sex(rng, male, 'short')} here for {_pick(rng, COMPLAINTS)}."])
    if kind == "narrative":
        return _pick(rng, [f"This is a {a}-year-old {_sex(rng, male, 'noun')}.",
                           f"The patient is a {a} year old {_sex(rng, male, 'noun')} who c/o {_pick(rng, COMPLAINTS)}."])
    if kind == "telegraphic":
        return f"{a}{_sex(rng, male, 'short')}."
    return f"{a} y/o {_sex(rng, male, 'noun')}."


def _body(rng, row) -> list[tuple[str, int]]:
    """Shuffled sentence units with a drop priority (0: the history, never dropped; 2: dropped first)."""
    units = [(u, p) for u, p in ((_history(rng, row), 0), (_body_size(rng, row), 1), (_bp(rng, row), 1),
                                 (_lipids(rng, row), 1), (_smoking(rng, row), 2), (_negatives(rng, row), 2)) if u]
    order = rng.permutation(len(units))
    return [units[i] for i in order]


def _render_one(rng: np.random.Generator, row: dict) -> str:
    age = round(float(row["age"])) if _present(row.get("age")) else None
    age_s = "" if age is None else f"{age} "
    male = _flag(row, "male")
    t = int(rng.integers(7))
    units = _body(rng, row)
    plan = _plan(rng, row)
    if t == 0:  # clinic note
        head, tail = [_demo_sentence(rng, age, male, "clinic")], [f"Plan: {plan}."]
    elif t == 1:  # SOAP: the body is the objective section
        head = [f"S: {_pick(rng, ['pt c/o', 'c/o', 'presents for'])} {_pick(rng, COMPLAINTS)}.", "O:"]
        tail = [f"A: {_demo_sentence(rng, age, male, 'short')}", f"P: {plan}."]
    elif t == 2:  # narrative
        head = [_demo_sentence(rng, age, male, "narrative")]
        tail = [f"{_pick(rng, ['Recommend', 'Plan:', 'Will arrange'])} {plan}."]
    elif t == 3:  # telegraphic
        head, tail = [_demo_sentence(rng, age, male, "telegraphic")], [f"{plan}."]
    elif t == 4:  # referral letter
        head = [(f"{_pick(rng, ['Dear colleague, thank you for seeing', 'Thanks for seeing', 'Please see'])} this "
                f"{age_s}year old {_sex(rng, male, 'noun')}.")]
        tail = [f"Suggest {plan}."]
    elif t == 5:  # problem list: the history becomes the numbered list
        have = [c for c in CONDITIONS if _flag(row, c)]
        rng.shuffle(have)
        probs = " ".join(f"{i + 1}) {_pick(rng, CONDITIONS[c])}" for i, c in enumerate(have)) or "none active"
        units = [(u, p) for u, p in units if p > 0]
        head, tail = [f"{_demo_sentence(rng, age, male, 'short')} Problems: {probs}."], [f"Plan: {plan}."]
    else:  # annual review
        head, tail = [f"Annual review, {age_s.strip()}{_sex(rng, male, 'short')}."], [f"Plan - {plan}."]
    # keep notes short (a byte-level model pays for every character): drop optional units, lowest value first
    while True:
        body = [u for u, _ in units]
        if t == 1 and not body:
            body = ["exam unremarkable."]
        text = " ".join(head + body + tail)
        droppable = [i for i, (_, p) in enumerate(units) if p > 0]
        if len(text) <= MAX_CHARS or not droppable:
            break
        worst = max(droppable, key=lambda i: (units[i][1], i))
        units.pop(worst)
    return _noise(rng, text)


def _typo(rng, w: str) -> str:
    i = int(rng.integers(1, len(w) - 1))
    k = int(rng.integers(3))
    if k == 0:
        return w[:i] + w[i + 1] + w[i] + w[i + 2:]  # swap
    if k == 1:
        return w[:i] + w[i + 1:]  # drop
    return w[:i] + w[i] + w[i:]  # double


def _noise(rng, text: str) -> str:
    words = text.split(" ")
    for j, w in enumerate(words):
        if len(w) >= 4 and w.isalpha() and rng.random() < TYPO_RATE:
            words[j] = _typo(rng, w)
    text = " ".join(words)
    u = rng.random()
    if u < 0.08:
        text = text.lower()
    elif u < 0.11:
        text = text.upper()
    if rng.random() < 0.15:  # a doubled space somewhere
        spaces = [i for i, ch in enumerate(text) if ch == " "]
        if spaces:
            i = spaces[int(rng.integers(len(spaces)))]
            text = text[:i] + " " + text[i:]
    if rng.random() < 0.1:  # a missing space after a full stop
        text = text.replace(". ", ".", 1)
    return text


def _row_seed(seed: int, row: dict) -> np.random.SeedSequence:
    """Seed of one note: the user seed and a hash of the row's own values (canonical text), nothing else."""
    canon = "|".join(f"{k}={'NA' if not _present(v) else repr(float(v)) if isinstance(v, (int, float, np.number)) else str(v)}"
                     for k, v in sorted(row.items()))
    h = int.from_bytes(hashlib.blake2b(canon.encode("utf-8"), digest_size=8).digest(), "little")
    return np.random.SeedSequence([int(seed) & 0xFFFFFFFF, h & 0xFFFFFFFF, h >> 32])


NOT_RENDERED = ("id", "futime", "status")  # the identifier, and the follow-up outcome a baseline note cannot know


def render_notes(df: pd.DataFrame, seed: int, *, exclude: tuple[str, ...] = NOT_RENDERED) -> pd.Series:
    """One rendered demonstration note per row of ``df`` (same index), deterministic given ``seed``.

    Each note depends only on its own row (minus the ``exclude`` columns: the identifier and the follow-up
    outcome by default) and the seed. Missing columns and missing values are allowed. The Series is named ``"note"`` and carries
    ``attrs["label"] = NOTE_LABEL``: these are not real clinical notes.
    """
    keep = [c for c in df.columns if c not in exclude]
    notes = []
    for rec in df[keep].to_dict(orient="records"):
        rng = np.random.default_rng(_row_seed(seed, rec))
        notes.append(_render_one(rng, rec))
    out = pd.Series(notes, index=df.index, name="note", dtype=object)
    out.attrs["label"] = NOTE_LABEL
    return out


# ------------------------------------------------------------------------------------------------
# the demo's public word list
# ------------------------------------------------------------------------------------------------

VOCAB_RECORDS = 4000  # public random records rendered to find the renderer's word pieces
VOCAB_MIN_COUNT = 8  # a piece must occur this often among their notes
VOCAB_SEED = 20261126


def public_vocabulary(schema, *, n: int = VOCAB_RECORDS, min_count: int = VOCAB_MIN_COUNT, seed: int = VOCAB_SEED) -> list[str]:
    """The word pieces of the renderer's own language, found without any patient: ``n`` records drawn at random
    from the schema's public description (uniform within the public bounds, a fair coin for binary columns, a
    uniform category, 10 % missing where nullable) are rendered, and every piece (``models.text.PIECE``: a
    word or number with its leading space) longer than one byte that occurs at least ``min_count`` times is
    kept, most frequent first. Public by construction (code + schema + seed): it is the demo schema's note
    ``vocabulary``. A real consortium writes its own (a clinical word list) or selects one with DP."""
    from ..models.text import PIECE

    rng = np.random.default_rng(seed)
    cols = {}
    for c in schema.columns:
        if c.kind == "continuous":
            v = rng.uniform(float(c.lower), float(c.upper), n)
            cols[c.name] = np.round(v) if c.integer else v
        elif c.kind == "binary":
            cols[c.name] = rng.integers(0, 2, n).astype(float)
        elif c.kind == "categorical":
            cols[c.name] = np.asarray(c.categories, dtype=object)[rng.integers(0, len(c.categories), n)]
        else:
            continue
        if c.nullable:
            cols[c.name] = pd.Series(cols[c.name], dtype=object).where(rng.random(n) >= 0.1, None)
    counts: dict[str, int] = {}
    for note in render_notes(pd.DataFrame(cols), seed):
        for m in PIECE.finditer(note):
            w = m.group()
            if len(w.encode("utf-8")) > 1:
                counts[w] = counts.get(w, 0) + 1
    return [w for w, k in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if k >= min_count]
