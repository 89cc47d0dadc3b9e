"""DP conditional note generator: a small byte-level decoder-only transformer conditioned on the record.

Sequence of one patient (fixed prefix length for a schema):

    BOS  c_1 … c_K  SEP  b_1 … b_L  EOS  PAD …
         └ condition ┘    └ note (UTF-8 bytes) ┘

Tokenizer — nothing is fitted on private text (issue 7, req. 2). The vocabulary is
  * the 256 byte values (any text is representable: no out-of-vocabulary),
  * four special tokens (PAD, BOS, EOS, SEP),
  * condition tokens built only from the schema: one token per value of each binary column, per category
    of each categorical column, per band of each continuous column, plus a missing-value token per column.
    Bands use fixed public clinical cut-offs (age decades, WHO BMI classes, systolic BP stages) when they lie
    inside the schema's public bounds, otherwise equal-width bands of the public bounds — never quantiles;
  * the word pieces of the text column's public ``vocabulary`` in the schema, when it has one (a word or a
    number with its leading space, ``PIECE``): such a piece is one token, anything else is spelled in bytes.
    The list is public like the bounds (written by a person, derived from public text, or DP-selected with the
    spend in the schema); the demo's comes from rendering random public records (data.notes.public_vocabulary).
    It cuts a rendered demo note from ≈ 160 byte tokens to a median 52, and a DP step's cost with it.
So the tokenizer costs no privacy budget and can be published with the model (``to_json``).

Model — built only from nn.Embedding, nn.Linear, nn.LayerNorm and causal
``F.scaled_dot_product_attention`` (DESIGN.md §4: nn.TransformerEncoderLayer fails under Opacus,
DPMultiheadAttention has no causal mask, DPLSTM is 11–16× slower). Learned positional embedding, pre-LN
blocks, *untied* input/output embeddings: Opacus ghost clipping refuses a parameter used by two layers
("Parameter tying is not supported with Ghost Clipping"), and with a tied matrix the per-layer ghost norms
would not add up to the per-sample gradient norm anyway.

Loss and the privacy unit. ``forward`` returns one number per patient: the mean negative log-likelihood of
that patient's note tokens (bytes + EOS). The prefix (BOS, condition, SEP) is input only, never predicted, and
PAD positions are masked. Ghost clipping needs exactly this shape: Opacus' ``DPLossFastGradientClipping``
multiplies the per-sample loss by the per-sample clipping coefficient (shape [B]) in its second backward, so
the loss handed to the criterion must be [B] — one entry per patient. The ``shape=`` argument mentioned in
DESIGN.md §4 exists for the other design, a token-level criterion (e.g. CrossEntropyLoss on flattened
[B·T, V] logits): Opacus then reshapes the [B·T] loss to [B, T] and reduces each row to one value per
sequence; forgetting ``shape=`` there clips per *token* (wrong privacy unit) or fails. Our criterion
(``PerSampleLoss``) receives the [B] vector directly, so no ``shape=`` is needed and every patient's whole
note is clipped as one example. The Linear layers see 3-D activations [B, T, d]; Opacus' ghost norm sampler
for nn.Linear handles them by per-sample Gram matrices (‖Σ_t g_t a_tᵀ‖² = ⟨G Gᵀ, A Aᵀ⟩, [B, T, T]), and the
Embedding norm sampler sums the gradient rows of repeated token ids within a sample before the norm — both
give the exact per-patient norm (tested against a plain step and against the clipping bound).

Condition dropout and classifier-free guidance (Ho & Salimans 2022). In training, a patient's whole condition
is replaced by the all-missing condition with probability ``TextConfig.cond_dropout``: a random transform of
that patient's own example drawn independently of the data, so each patient still contributes one clipped
gradient and the accounting is unchanged. The model thereby also learns p(note) without a record, and
sampling can sharpen the record's effect: next-token logits u + w·(c − u), u from the all-missing prefix, c
from the record's (both streams share one batch and one key/value cache layout). Under DP the record's signal
is learnt slowly; guidance amplifies what was learnt (post-processing: no privacy effect). Guided candidates
must pass a plausibility constraint (p_c ≥ α·max p_c, ``TextConfig.plausibility``): guidance also amplifies c − u
of tokens neither stream finds likely, where the difference is mostly DP noise, and those came out as word salad.

Condition → vocabulary path (``TextConfig.cond_vocab``). Through the prefix alone, the record reaches a note
token only once attention has learnt to look up the right condition slot, which DP-SGD's few noisy steps barely
achieve. Next to it, every condition token c_k has a row of logit offsets E[c_k] (a table of [condition tokens ×
vocabulary], zero at the start) that enters each position's logits with a gate computed from the hidden state:
logits_t = head(h_t) + Σ_k gate_k(h_t) · E[c_k] (gate: one nn.Linear d → K, bias 1 at the start). E learns
"this record says diabetes: DM2, metformin and HbA1c are likelier, 'no DM' is not" as directly as a logistic
regression, the gate learns where in a note a column matters. Both are ordinary nn.Embedding / nn.Linear layers
under ghost clipping (the per-patient norm covers them; tested like the rest). adaLN conditioning (DiT's adaptive
layer norm) was tried in the same probe and dropped: under DP its noisy modulations stalled the loss at 2.64
against 1.92 for the path alone (same seed).

Two-group clipping (``TextConfig.cond_clip_share`` s, default 0.9; 0.75 until 2026-11-28). With one flat bound C on a patient's whole
gradient, the path's table and gate took ≈ 6 % of the squared norm of a trained model's per-patient gradient
(the language model's attention, MLP and embeddings the rest), so after clipping each patient gave the
condition → word associations a sliver of its contribution while the noise σ·C hit them at full strength.
Two-group clipping bounds the path's part of each patient's gradient by C·√s and the rest by C·√(1 − s)
(the per-layer clipping of Opacus, with two groups): the whole gradient still has norm ≤ C, the same noise
σ·C is added, and ε is unchanged — only how the per-patient bound is spent moves. The gate reads the hidden
state detached, so the path's logit term depends on the path's parameters only, and under ghost clipping the
path's gradient is rescaled between Opacus' two backward passes (``_ScaleGrad``, ``_clipping``;
tested against a per-patient reference in ghost and hooks modes). One-off DP probe (σ 0.69, 240 steps, w 3,
α 0.1, 600 prompts, 2 seeds): consistency 0.71 flat → 0.80 with s = 0.5 and 0.80–0.84 with s = 0.75, the note
NLL 1.92 → 2.13 → 2.37 nats/token. The split also decides where a patient's note can be memorised: only the
language model stores a string in order, and s = 0.9 gives it C·√0.1 under the same noise σ·C, which brought
canaries written in 16 patients' notes down towards chance at ε = 8 (``TextConfig.cond_clip_share``'s comment).

Row-sparse path (``TextConfig.cond_sparse``). Only condition tokens that assert something have a row in the
path's table: no row for a missing value or a binary column's "0" (``NoteTokenizer.path_rows``; 48 of the demo's
80 tokens, chosen from the schema alone). A patient's path gradient is then not spread over rows that say
"absent", and the all-missing stream of guidance has no path term, so guidance amplifies the whole path.

Repetition penalty at sampling (``TextConfig.repetition``, post-processing). Under DP the path's strongest rows win
at every list position, so a note repeated the record's best-learnt condition ("congestive heart heart failure,
congestive heart failure") and left out its rarer ones. Lowering a word piece's logit by λ per earlier use in the
note (a frequency penalty) gives the other conditions their turn: consistency 0.861 → 0.882 at λ 2 (5 seeds).

Batch size. At a fixed privacy loss a larger Poisson batch takes fewer steps with more noise per step but a
better signal-to-noise ratio per step; a GPU sweep of the ε = 8 fit's note model (``bench/notes_sweep.py``,
results/notes_sweep_gpu.json) put the optimum at batch 768 (80 steps over 5 epochs, σ ≈ 0.9): condition
consistency 0.858 over 7 seeds against 0.82 at batch 256 (240 steps, σ 0.69), and the note NLL 2.15 against 2.39.

Cost: the Gram trick is O(B·T²·d) per Linear layer, so a step costs roughly quadratically in the longest
note of the Poisson batch; ``text_step`` trims each batch to its longest sequence (no privacy effect: the
computation is identical, only PAD columns are dropped).

Measured on the 2-core development machine, Poisson batch ≈ 256 rendered NAFLD notes, DP ghost clipping, seconds
per step: byte tokens, d_model 64, max_len 256: 4.8 with Opacus' embedding norm sampler, 1.76 with
``SeqEmbedding``; word pieces, max_len 128: 0.84 (hooks mode was 3.55 against 4.8 before ``SeqEmbedding``).

Opacus mode and length chunks (``TextConfig.grad_sample_mode``, ``length_chunks``). At the demo's batch of 768
word-piece notes the vocabulary-wide layers dominate (output head 64 × 1,119, condition path 80 × 1,119), and ghost
clipping's second backward pass through them costs more than instantiating the per-sample gradients once. The
default is therefore hooks mode (one backward pass, per-sample gradients) on length-sorted chunks of the Poisson
batch, each trimmed to its own longest note; the chunks' clipped gradients are summed and the noise is drawn once
per batch (``text_step``). ``make_private_text`` still takes either mode.

Book-keeping clipping (``TextConfig.book_keeping``, ``_Book``; the "BK" algorithm of Bu et al. 2023). Even in hooks
mode, Opacus' per-sample gradient tensors [B, *param] cost more than the arithmetic they hold: each is zero-filled,
copied into place, read for the norms and read again for the clipped sum, and autograd still computes the ordinary
weight gradients that the noised sum replaces. With a book, each ``SeqLinear`` / ``SeqEmbedding`` layer's grad
sampler computes the exact squared per-patient norms (from the per-sample product where that is the cheaper
formula, else from Gram matrices; for an embedding from the Gram matrix of its output gradients masked by equal
ids) and records how to form the clipped sum Σ_i c_i g_i once the coefficients are known (a matrix-vector product
over the per-sample products, a matmul of coefficient-scaled output gradients with the inputs, or an ``index_add``
into the table's rows); ``SeqLinear`` skips the ordinary weight gradient inside a DP step. Same clipped sum, same
noise (tested against the per-sample tensors with seeded noise and against a per-patient reference).
bench/note_step.py, one DP step on 2 cores, same run (results/note_step.json): ghost 7.2 s and 3.1 GB peak, hooks
7.0 s, hooks with 8 chunks 2.8 s and 1.3 GB, **with 8 chunks and book-keeping 2.05 s** (3.5× ghost). Earlier
runs of the same machine were slower throughout (ghost 9.7 s, hooks with 8 chunks 4.6 s).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..schema import Schema, canonical_category
from .dp import (
    PerSampleLoss,
    backward_and_step,
    empty_batch_step,
    make_private,
    run_epoch,
)

__all__ = [
    "TOKENIZER_KIND",
    "EncodedNotes",
    "NoteLM",
    "NoteTokenizer",
    "PerSampleLoss",
    "TextConfig",
    "make_private_text",
    "note_log_likelihood",
    "sample_notes",
    "text_epoch",
    "text_step",
]

TOKENIZER_KIND = "byte-level UTF-8 + public schema condition tokens (no vocabulary fitted on data: no privacy cost)"
WORD_TOKENIZER_KIND = ("UTF-8 bytes + the schema's public word pieces (text column 'vocabulary') + public schema "
                       "condition tokens (nothing fitted on the notes: no privacy cost)")
# a note is cut into pieces: a word or a number with its leading space, or any single character; the pieces
# concatenate back to the note exactly. A piece in the public vocabulary is one token, any other is spelled in bytes.
PIECE = re.compile(r" ?[A-Za-z]+| ?[0-9]+|.", re.DOTALL)
N_BYTES = 256
PAD, BOS, EOS, SEP = 256, 257, 258, 259
SPECIALS = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS, "<sep>": SEP}
FIRST_COND = 260
MISSING = "NA"
PATH_ROWS = ("binary", "asserting")  # TextConfig.cond_rows

# Public clinical cut-offs (left-closed bands). Used only when every edge lies strictly inside the schema's
# public bounds for that column; otherwise the column gets equal-width bands of its public bounds.
CLINICAL_EDGES: dict[str, list[float]] = {
    "age": [30, 40, 50, 60, 70, 80],  # decades
    "bmi": [18.5, 25, 30, 35, 40],  # WHO classes
    "sbp": [120, 130, 140, 160, 180],  # normal / elevated / stage 1 / stage 2 / severe
    "hdl": [40, 60],  # low / normal / high (mg/dL)
}
EQUAL_WIDTH_BANDS = 4


# ------------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------------

def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass
class CondColumn:
    """One condition slot: the column, its kind and its public token names (and band edges)."""

    name: str
    kind: str  # binary | categorical | continuous
    values: list[str]  # canonical values (binary/categorical) or band labels (continuous); MISSING last
    edges: list[float] = field(default_factory=list)  # continuous only: band edges (left-closed bands)
    # binary only: public words that name the condition (the schema column's name and description, see
    # ``condition_terms``); the note model's path may start with these word pieces raised (TextConfig.cond_prior)
    terms: list[str] = field(default_factory=list)

    def index_of(self, v: Any) -> int:
        """Position of a value in ``values`` (the missing token for NaN/None or an unknown value)."""
        if v is None or (isinstance(v, float) and math.isnan(v)) or pd.isna(v):
            return len(self.values) - 1
        if self.kind == "continuous":
            return int(np.searchsorted(np.asarray(self.edges, dtype=float), float(v), side="right"))
        c = canonical_category(v)
        try:
            return self.values.index(c)
        except ValueError:
            return len(self.values) - 1  # unknown category: treated as missing (the schema check reports it)


# words of a column description that say how the column was recorded, not what it is
TERM_STOPWORDS = frozenset({"diagnosis", "ever", "recorded", "during", "follow", "up", "status", "label", "for", "the",
                            "and", "with", "disease"})


def condition_terms(col) -> list[str]:
    """Public words naming a binary schema column: its name split at "_" and its description's words of two or
    more letters (lower case, without ``TERM_STOPWORDS``), e.g. heart_failure → heart, failure; htn with the
    description "hypertension" → htn, hypertension. Schema only: no privacy cost."""
    words = re.findall(r"[a-z]+", col.name.lower().replace("_", " ")) + re.findall(r"[a-z]+", (col.description or "").lower())
    return list(dict.fromkeys(w for w in words if len(w) >= 2 and w not in TERM_STOPWORDS))


def _bands(col) -> list[float]:
    lo, hi = float(col.lower), float(col.upper)
    clinical = CLINICAL_EDGES.get(col.name.lower())
    if clinical and all(lo < e < hi for e in clinical):
        return [float(e) for e in clinical]
    step = (hi - lo) / EQUAL_WIDTH_BANDS
    return [lo + step * i for i in range(1, EQUAL_WIDTH_BANDS)]


@dataclass
class EncodedNotes:
    """The result of ``NoteTokenizer.encode``: padded ids and what had to be done to the input."""

    ids: np.ndarray  # int64 [n, max_len]: BOS cond SEP bytes EOS PAD…
    present: np.ndarray  # bool [n]: False where the note was missing (None/NaN) — the caller drops those rows
    truncated: int  # notes cut to fit max_len (at a UTF-8 character boundary; EOS still appended)
    replaced: int  # invalid UTF-8 byte sequences / lone surrogates replaced by U+FFFD
    empty: int  # empty notes (encoded as BOS cond SEP EOS)
    missing: int  # missing notes (None / NaN)

    def counts(self) -> dict:
        return {"notes": len(self.ids), "truncated": self.truncated, "replaced_bytes": self.replaced,
                "empty": self.empty, "missing": self.missing}


class NoteTokenizer:
    """Byte-level tokenizer with public condition tokens derived from the schema (see module docstring)."""

    def __init__(self, columns: list[CondColumn], *, max_len: int = 256, words: Iterable[str] = ()):
        self.columns = columns
        self.max_len = int(max_len)
        self.offsets: list[int] = []
        nxt = FIRST_COND
        for c in columns:
            self.offsets.append(nxt)
            nxt += len(c.values)
        self.words = [w for w in words if len(w.encode("utf-8")) > 1]  # one byte is already a token
        self.word_offset = nxt
        self.word_ids = {w: nxt + i for i, w in enumerate(self.words)}
        self.word_bytes = [w.encode("utf-8") for w in self.words]
        nxt += len(self.words)
        self.vocab_size = nxt
        self.prefix_len = len(columns) + 2  # BOS + one token per column + SEP
        if self.max_len < self.prefix_len + 1:
            raise ValueError(f"max_len {self.max_len} leaves no room for a note after the {self.prefix_len}-token prefix")

    # ---- construction / persistence ---------------------------------------------------------
    @property
    def kind(self) -> str:
        return WORD_TOKENIZER_KIND if self.words else TOKENIZER_KIND

    def generable(self) -> list[int]:
        """The token ids a note may contain: bytes, the word pieces and EOS."""
        return list(range(N_BYTES)) + [EOS] + list(range(self.word_offset, self.word_offset + len(self.words)))

    @classmethod
    def from_schema(cls, schema: Schema, *, max_len: int = 256, columns: Iterable[str] | None = None) -> NoteTokenizer:
        """Condition slots for the schema's modelled columns (or ``columns``), and the word pieces of its text
        column's public ``vocabulary`` (if any), from public information only."""
        texts = schema.of_kind("text")
        words = (texts[0].vocabulary or []) if len(texts) == 1 else []
        names = list(columns) if columns is not None else [c.name for c in schema.modelled]
        out = []
        for name in names:
            col = schema[name]
            if col.kind == "binary":
                out.append(CondColumn(name, "binary", ["0", "1", MISSING], terms=condition_terms(col)))
            elif col.kind == "categorical":
                out.append(CondColumn(name, "categorical", [canonical_category(v) for v in col.categories] + [MISSING]))
            elif col.kind == "continuous":
                e = _bands(col)
                labels = [f"<{_fmt(e[0])}"] + [f"{_fmt(a)}-{_fmt(b)}" for a, b in itertools.pairwise(e)] + [f">={_fmt(e[-1])}"]
                out.append(CondColumn(name, "continuous", labels + [MISSING], e))
            else:
                raise ValueError(f"column {name!r} of kind {col.kind!r} cannot condition a note")
        return cls(out, max_len=max_len, words=words)

    def to_json(self) -> dict:
        return {"version": 1, "kind": self.kind, "max_len": self.max_len, "specials": SPECIALS,
                "columns": [asdict(c) for c in self.columns], "words": list(self.words)}

    @classmethod
    def from_json(cls, d: dict) -> NoteTokenizer:
        if not isinstance(d, dict) or d.get("version") != 1:
            raise ValueError("not a version-1 NoteTokenizer JSON")
        if d.get("specials", SPECIALS) != SPECIALS:
            raise ValueError("special token ids differ from this version's")
        cols = [CondColumn(c["name"], c["kind"], list(c["values"]), [float(x) for x in c.get("edges", [])],
                           [str(t) for t in c.get("terms", [])]) for c in d["columns"]]
        return cls(cols, max_len=int(d["max_len"]), words=[str(w) for w in d.get("words", [])])

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=True)

    # ---- names ------------------------------------------------------------------------------
    def token_name(self, i: int) -> str:
        if i < N_BYTES:
            return bytes([i]).decode("latin-1")
        for k, v in SPECIALS.items():
            if v == i:
                return k
        for c, off in zip(self.columns, self.offsets):
            if off <= i < off + len(c.values):
                return f"{c.name}={c.values[i - off]}"
        if self.word_offset <= i < self.vocab_size:
            return self.words[i - self.word_offset]
        raise ValueError(f"token id {i} is outside the vocabulary ({self.vocab_size})")

    def unconditional(self) -> list[int]:
        """The condition ids of a record with every column missing (condition dropout, guidance)."""
        return [off + len(c.values) - 1 for c, off in zip(self.columns, self.offsets)]

    def path_rows(self, rows: str = "asserting") -> list[bool]:
        """Per condition token (in id order): does it get a row in the note model's condition → vocabulary path?
        ``rows`` (``TextConfig.cond_rows``): "binary" — only a binary column's "1" (the condition is present);
        "asserting" — every value except a column's missing token and a binary column's "0": what a record says,
        not what it does not say. Decided by the schema alone (no privacy cost)."""
        if rows == "binary":
            return [c.kind == "binary" and v == "1" for c in self.columns for v in c.values]
        if rows == "asserting":
            return [not (v == MISSING or (c.kind == "binary" and v == "0")) for c in self.columns for v in c.values]
        raise ValueError(f"path rows must be one of {PATH_ROWS}, got {rows!r}")

    def prior_pieces(self, bands: bool = False) -> list[tuple[int, int]]:
        """(path row, word-piece id) pairs: the row of each binary column's "1" (the condition is present) with
        every word piece of the public vocabulary that is one of the column's ``terms`` (ignoring case and the
        leading space); with ``bands``, also the row of each closed band [a, b) of a continuous column with every
        whole-number word piece n, a ≤ n < b (age band 50-60 → " 50" … " 59"; open bands such as "<30" have no
        public lower end and get none). Decided by the schema alone (no privacy cost)."""
        out = []
        numbers = {w: int(w.strip()) for w in self.words if w.strip().isdigit()} if bands else {}
        for c, off in zip(self.columns, self.offsets):
            if c.kind == "binary" and c.terms:
                row, terms = off + c.values.index("1") - FIRST_COND, set(c.terms)
                out += [(row, self.word_ids[w]) for w in self.words if w.strip().lower() in terms]
            elif c.kind == "continuous" and numbers:
                for i in range(1, len(c.edges)):  # band i is [edges[i-1], edges[i])
                    lo, hi, row = c.edges[i - 1], c.edges[i], off + i - FIRST_COND
                    out += [(row, self.word_ids[w]) for w, n in numbers.items() if lo <= n < hi]
        return out

    def condition_token(self, column: str, value: Any) -> int:
        for c, off in zip(self.columns, self.offsets):
            if c.name == column:
                return off + c.index_of(value)
        raise KeyError(column)

    # ---- encoding ---------------------------------------------------------------------------
    def encode_condition(self, rows: pd.DataFrame | pd.Series | dict) -> np.ndarray | list[int]:
        """Condition token ids: [n, K] int64 for a frame, a list of K ids for one row (Series or dict).
        Columns absent from the input are encoded as missing."""
        if isinstance(rows, pd.DataFrame):
            out = np.empty((len(rows), len(self.columns)), dtype=np.int64)
            for j, (c, off) in enumerate(zip(self.columns, self.offsets)):
                vals = rows[c.name].tolist() if c.name in rows else [None] * len(rows)
                out[:, j] = [off + c.index_of(v) for v in vals]
            return out
        row = dict(rows)
        return [off + c.index_of(row.get(c.name)) for c, off in zip(self.columns, self.offsets)]

    @staticmethod
    def _to_bytes(note: Any) -> tuple[bytes, int]:
        """UTF-8 bytes of a note and the number of replacements made (invalid bytes, lone surrogates)."""
        if isinstance(note, (bytes, bytearray)):
            raw = bytes(note)
            text = raw.decode("utf-8", errors="replace")
            bad = text.count("\ufffd") - raw.count("\ufffd".encode("utf-8"))
            return text.encode("utf-8"), bad
        text = str(note)
        try:
            return text.encode("utf-8"), 0
        except UnicodeEncodeError:  # lone surrogates, e.g. bytes read with errors="surrogateescape"
            bad = sum(1 for ch in text if 0xD800 <= ord(ch) <= 0xDFFF)
            return "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text).encode("utf-8"), bad

    def _pieces(self, b: bytes) -> list[list[int]]:
        """Token ids of a (valid UTF-8) note, grouped by piece: one word token, or the piece's bytes."""
        if not self.words:  # bytes only, grouped by character (a cut never splits a UTF-8 character)
            return [list(ch.encode("utf-8")) for ch in b.decode("utf-8")]
        out = []
        for m in PIECE.finditer(b.decode("utf-8")):
            w = m.group()
            i = self.word_ids.get(w)
            out.append([i] if i is not None else list(w.encode("utf-8")))
        return out

    def encode_text(self, note: str | bytes) -> list[int]:
        """The token ids of a note (no specials, no truncation): word pieces of the public vocabulary as one
        token, everything else as UTF-8 bytes. Invalid UTF-8 is replaced by U+FFFD."""
        return [t for p in self._pieces(self._to_bytes(note)[0]) for t in p]

    def encode(self, rows: pd.DataFrame, notes: Iterable[Any] | None) -> EncodedNotes:
        """Full padded sequences for a frame of records and their notes (``notes`` None: prefixes only,
        for generation). Notes longer than the room left after the prefix are truncated (counted, warned)."""
        cond = self.encode_condition(rows)
        n = len(cond)
        ids = np.full((n, self.max_len), PAD, dtype=np.int64)
        ids[:, 0] = BOS
        ids[:, 1 : 1 + len(self.columns)] = cond
        ids[:, self.prefix_len - 1] = SEP
        room = self.max_len - self.prefix_len - 1  # EOS always fits
        present = np.ones(n, dtype=bool)
        truncated = replaced = empty = missing = 0
        notes = [""] * n if notes is None else list(notes)
        if len(notes) != n:
            raise ValueError(f"{len(notes)} notes for {n} records")
        for i, note in enumerate(notes):
            if note is None or (isinstance(note, float) and math.isnan(note)):
                present[i] = False
                missing += 1
                note = ""
            b, bad = self._to_bytes(note)
            replaced += bad
            if not b:
                empty += present[i]
            toks: list[int] = []
            for p in self._pieces(b):
                if len(toks) + len(p) > room:  # cut at a piece (so never inside a UTF-8 character)
                    truncated += 1
                    break
                toks += p
            k = self.prefix_len
            ids[i, k : k + len(toks)] = toks
            ids[i, k + len(toks)] = EOS
        if truncated:
            warnings.warn(f"{truncated} of {n} notes were longer than {room} tokens and were truncated", stacklevel=2)
        return EncodedNotes(ids, present, truncated, replaced, int(empty), missing)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence: the bytes after the first SEP (or all bytes if there is none) up to the first
        EOS; special and condition tokens are skipped; invalid UTF-8 is replaced."""
        ids = [int(i) for i in ids]
        if SEP in ids:
            ids = ids[ids.index(SEP) + 1 :]
        if EOS in ids:
            ids = ids[: ids.index(EOS)]
        out = bytearray()
        for i in ids:
            if 0 <= i < N_BYTES:
                out.append(i)
            elif self.word_offset <= i < self.vocab_size:
                out += self.word_bytes[i - self.word_offset]
        return out.decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------

class SeqLinear(nn.Linear):
    """An nn.Linear (same parameters, same forward) whose Opacus ghost norm uses the cheaper exact formula.

    For a sequence input a [B, T, i] and output gradient g [B, T, o], the per-sample weight gradient is
    Σ_t g_t a_tᵀ. Opacus' ghost norm sampler for nn.Linear computes its norm as ⟨g gᵀ, a aᵀ⟩ with two
    [B, T, T] Gram matrices: O(B·T²·(i+o)). For our notes T (≈ 250 bytes) exceeds √(i·o) (d_model 64–128), so
    forming the per-sample gradient [B, o, i] by one batched matmul, O(B·T·i·o), is cheaper (the "mixed ghost
    norm" of Bu et al. 2022). Both are exact; this class picks the cheaper one per call. It is registered for
    this subclass only — Opacus' global sampler for nn.Linear is left untouched.

    Inside a book-keeping DP step (``_Book.active``) the forward pass does not let autograd compute the ordinary
    weight and bias gradients: the book forms the clipped sum that replaces them, and Opacus overwrites ``.grad`` with
    the noised sum anyway. Everywhere else (plain training, ghost mode, scoring) it is nn.Linear's forward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        book = getattr(self, "_dp_book", None)
        if book is not None and book.active and torch.is_grad_enabled():
            return _InputGradOnlyLinear.apply(x, self.weight, self.bias)
        return super().forward(x)


class _InputGradOnlyLinear(torch.autograd.Function):
    """F.linear whose backward gives the input's gradient only (see ``SeqLinear``)."""

    @staticmethod
    def forward(x, weight, bias):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return (grad @ weight if ctx.needs_input_grad[0] else None), None, None


def _per_sample_cheaper(layer: nn.Linear, g: torch.Tensor) -> bool:
    """For output gradients g [B, T, o]: is forming the per-sample weight gradient [B, o, i], O(B·T·i·o), cheaper than
    the Gram matrices of the ghost norm, O(B·T²·(i+o))?"""
    return g.dim() == 3 and g.shape[1] ** 2 * (layer.in_features + layer.out_features) > g.shape[1] * layer.in_features * layer.out_features


def _seq_linear_norm_sample(layer: nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    from opacus.grad_sample.linear import compute_linear_norm_sample

    g = backprops
    if _per_sample_cheaper(layer, g):
        a = activations[0].to(g.dtype)
        ret = {}
        if layer.weight.requires_grad:
            ret[layer.weight] = torch.bmm(g.transpose(1, 2), a).flatten(1).norm(dim=1)
        if layer.bias is not None and layer.bias.requires_grad:
            ret[layer.bias] = g.sum(dim=1).norm(dim=1)
        return ret
    return compute_linear_norm_sample(layer, activations, backprops)


class SeqEmbedding(nn.Embedding):
    """An nn.Embedding (same parameters, same forward) whose Opacus ghost norm is computed by one scatter.

    The per-sample gradient of an embedding table is G_b[v] = Σ_{t: id_bt = v} g_bt. Opacus' norm sampler forms
    it through ``unique`` over (sample, id) pairs, which on CPU costs ≈ 1 s per step for our [256, 256] batches
    (Python-level indexing). For a small table (bytes + condition tokens, or positions) the dense [B, V, d]
    per-sample gradient is a few million floats: one ``scatter_add`` and a norm give the same exact value.
    Larger tables fall back to Opacus' sampler. Registered for this subclass only.
    """


DENSE_EMBEDDING_NORM_MAX = 32_000_000  # B·V·d floats (128 MB) above which the Opacus sampler is used


def _seq_embedding_norm_sample(layer: nn.Embedding, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    from opacus.grad_sample.embedding_norm_sample import compute_embedding_norm_sample

    ids = activations[0]
    B = ids.shape[0]
    if not layer.weight.requires_grad:
        return {}
    g = backprops.reshape(B, -1, layer.embedding_dim)
    flat = ids.reshape(B, -1)
    srt = flat.sort(dim=1).values
    if not bool((srt[:, 1:] == srt[:, :-1]).any()):  # no id twice in a sample (positions, the condition tokens):
        return {layer.weight: g.pow(2).sum(dim=(1, 2)).sqrt()}  # each row of the sample's gradient is one g_bt
    if B * layer.num_embeddings * layer.embedding_dim > DENSE_EMBEDDING_NORM_MAX:
        return compute_embedding_norm_sample(layer, activations, backprops)
    idx = ids.reshape(B, -1, 1).expand(-1, -1, layer.embedding_dim)
    per_sample = torch.zeros(B, layer.num_embeddings, layer.embedding_dim, dtype=g.dtype, device=g.device)
    per_sample.scatter_add_(1, idx, g)
    return {layer.weight: per_sample.flatten(1).norm(dim=1)}


def _register(cls: type, norm_fn, grad_fn) -> None:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping as GSM
    from opacus.grad_sample.utils import register_grad_sampler, register_norm_sampler

    for registry, fn, register in ((GSM.NORM_SAMPLERS, norm_fn, register_norm_sampler),
                                   (GSM.GRAD_SAMPLERS, grad_fn, register_grad_sampler)):
        have = registry.get(cls)
        if have is not None and have is not fn:  # refuse to silently replace someone else's sampler
            raise RuntimeError(f"an Opacus sampler for {cls.__name__} is already registered: {have}")
        register(cls)(fn)


class _Book:
    """Book-keeping clipping in hooks mode (the "BK" algorithm of Bu et al. 2023, "Differentially private
    optimization on large model at small cost"): the clipped per-patient gradient sum without per-patient gradients.

    ``make_private_text`` gives each ``SeqLinear`` / ``SeqEmbedding`` layer of the note model a book
    (``layer._dp_book``). Their grad samplers then do not form the per-sample gradient tensors [B, *param] (which
    Opacus zero-fills, copies, and the optimizer reads twice more: for the norms and for the clipped sum). Instead each
    computes the per-sample squared norms of its parameters' gradients exactly (``_seq_linear_grad_sample``,
    ``_seq_embedding_grad_sample``), returns them as the parameter's ``grad_sample`` — a [B, 1] placeholder — and
    records how to form Σ_i c_i g_i for given per-patient coefficients c: for a linear layer a matrix-vector product
    over its per-sample products where those were formed for the norms, else one matmul of the coefficient-scaled
    output gradients with the inputs, Σ_i c_i Σ_t g_it a_itᵀ; for an embedding one ``index_add`` of c_i g_it into
    the rows of the ids. The optimizer's ``clip_and_accumulate`` (``_clipping``) reads the norms,
    computes the coefficients and asks the book for the sums. Same per-patient gradients, norms, coefficients and
    clipped sum as with the per-sample tensors (tested against them and against a per-patient reference); the noise
    and the accounting are Opacus' as before. The samplers keep books only while ``active`` (inside ``text_step``'s
    DP passes, whose optimizer runs that ``clip_and_accumulate``); at any other time they give Opacus' per-sample
    gradients, so no other code ever reads a placeholder as a gradient."""

    def __init__(self):
        self._sums: dict[int, Any] = {}
        self.active = False  # set by text_step around the forward and backward passes of a DP step

    def record(self, param: nn.Parameter, clipped_sum) -> None:
        """Keep ``clipped_sum(c)`` → Σ_i c_i g_i for ``param`` until the step asks for it."""
        if id(param) in self._sums:  # Opacus would sum two calls' per-sample gradients; squared norms do not add
            raise RuntimeError("a layer of the note model ran twice in one forward pass: book-keeping clipping "
                               "needs one call per layer and backward pass")
        self._sums[id(param)] = clipped_sum

    def holds(self, param: nn.Parameter) -> bool:
        return id(param) in self._sums

    def clipped_sum(self, param: nn.Parameter, coefficients: torch.Tensor) -> torch.Tensor:
        return self._sums.pop(id(param))(coefficients)

    def clear(self) -> None:
        self._sums.clear()

    def __len__(self) -> int:
        return len(self._sums)


def _seq_linear_grad_sample(layer: nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Opacus' hooks-mode grad sampler for ``SeqLinear``: per-sample gradients, or with a book (``_Book``) the
    squared per-sample norms and a record of the clipped sum."""
    from opacus.grad_sample.linear import compute_linear_grad_sample

    book = getattr(layer, "_dp_book", None)
    if book is None or not book.active:
        return compute_linear_grad_sample(layer, activations, backprops)
    a = activations[0].to(backprops.dtype)
    B, o, i = backprops.shape[0], layer.out_features, layer.in_features
    g, a = backprops.reshape(B, -1, o), a.reshape(B, -1, i)  # [B, T, ·]; T = 1 for an input without positions
    ret = {}
    if layer.weight.requires_grad:
        if _per_sample_cheaper(layer, g):
            # the per-sample gradients are formed for the norms anyway: the clipped sum is one matrix-vector product
            per_sample = torch.bmm(g.transpose(1, 2), a).flatten(1)
            book.record(layer.weight, lambda c: (c @ per_sample).view(o, i))
            ret[layer.weight] = per_sample.pow(2).sum(dim=1, keepdim=True)
        else:  # ghost norm ⟨g gᵀ, a aᵀ⟩; the clipped sum by one matmul over all positions
            book.record(layer.weight, lambda c: (g * c.view(B, 1, 1)).reshape(-1, o).T @ a.reshape(-1, i))
            gram = (torch.bmm(g, g.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum(dim=(1, 2))
            ret[layer.weight] = gram.clamp(min=0).unsqueeze(1)
    if layer.bias is not None and layer.bias.requires_grad:
        per_sample_bias = g.sum(dim=1)  # [B, o]
        book.record(layer.bias, lambda c: c @ per_sample_bias)
        ret[layer.bias] = per_sample_bias.pow(2).sum(dim=1, keepdim=True)
    return ret


def _seq_embedding_grad_sample(layer: nn.Embedding, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Opacus' hooks-mode grad sampler for ``SeqEmbedding``: per-sample gradients, or with a book (``_Book``) the
    squared per-sample norms and a record of the clipped sum."""
    from opacus.grad_sample.embedding import compute_embedding_grad_sample

    book = getattr(layer, "_dp_book", None)
    if book is None or not book.active:
        return compute_embedding_grad_sample(layer, activations, backprops)
    if not layer.weight.requires_grad:
        return {}
    if layer.padding_idx is not None or layer.max_norm is not None:
        raise ValueError("book-keeping clipping supports embeddings without padding_idx and max_norm only")
    ids = activations[0]
    B, d = ids.shape[0], layer.embedding_dim
    ids, g = ids.reshape(B, -1), backprops.reshape(B, -1, d)
    book.record(layer.weight, lambda c: g.new_zeros(layer.weight.shape).index_add_(
        0, ids.reshape(-1), (g * c.view(B, 1, 1)).reshape(-1, d)))
    # row v of a patient's gradient is Σ_{t: id_t = v} g_t, so its squared norm is Σ_{t, t': id_t = id_t'} ⟨g_t, g_t'⟩:
    # O(B·T²·d), without the [B, V, d] per-sample table
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g.dtype)
    return {layer.weight: (torch.bmm(g, g.transpose(1, 2)) * same).sum(dim=(1, 2)).clamp(min=0).unsqueeze(1)}


def _register_samplers() -> None:
    _register(SeqLinear, _seq_linear_norm_sample, _seq_linear_grad_sample)
    _register(SeqEmbedding, _seq_embedding_norm_sample, _seq_embedding_grad_sample)


_register_samplers()


@dataclass
class TextConfig:
    # defaults sized for 2 CPU cores (measured, see the module docstring): cost grows with d_model and,
    # quadratically in attention, with the longest note of a Poisson batch
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    mlp: int = 4  # hidden width of the MLP = mlp × d_model
    # tokens incl. the condition prefix (22 for NAFLD). With the demo's public word pieces a rendered note is
    # a median 52 tokens (99th percentile 86; ~160 bytes); byte-only tokenizers need ≈ 256
    max_len: int = 128
    # Batch size and learning rate from a GPU probe sweep at the ε = 8 fit's text privacy loss (bench/notes_sweep.py:
    # each variant's σ keeps μ² = q²·T·(e^{1/σ²} − 1) of the fit's σ 0.688 at batch 256 × 240 steps; 5 epochs;
    # 2,000 prompts; mean condition consistency over seeds): batch 256, lr 1e-2 (σ 0.69, 240 steps): 0.82 (2 seeds);
    # 512: 0.84–0.85; 768, lr 1.5e-2 (σ 0.90, 80 steps): 0.858 (7 seeds, min 0.844); 1024: 0.849–0.855; 2048: 0.78.
    # Larger Poisson batches at the same privacy loss raise the signal-to-noise ratio of each step (De et al. 2022);
    # past ≈ 80 steps the model has too few steps to learn. The note NLL also drops (2.39 → 2.15 nats/token).
    # lr at batch 1024: 1e-2 0.82, 1.5e-2 0.855, 2e-2 0.850, 3e-2 0.80
    lr: float = 1.5e-2
    epochs: int = 5  # an epoch costs about the same at any batch: 5 epochs of the demo ≈ 210 s at 256, ≈ 250 s at 768
    batch_size: int = 768
    # condition dropout: a training example's condition is replaced by the all-missing condition with this
    # probability (a data-independent transform of each patient's own example: no privacy effect), which trains
    # the unconditional model that classifier-free guidance needs
    cond_dropout: float = 0.1
    # classifier-free guidance at sampling (post-processing): logits = u + guidance · (c − u), u the
    # all-missing condition's; 1 = plain conditional sampling. bench/notes_guidance.py (the ε = 8 fit's DP: σ 0.69,
    # 240 steps, the defaults: path and two-group clipping): condition consistency 0.71 at w 1; 0.74 / 0.67 at
    # w 3 / 5 without the plausibility constraint, 0.84 / 0.84 with it; sampling costs ≈ 1.3×
    guidance: float = 3.0
    # plausibility constraint of guided sampling (the adaptive plausibility of contrastive decoding, Li et al.
    # 2022): only tokens whose conditional probability is ≥ plausibility × the most likely token's are candidates.
    # Guidance amplifies c − u for every token, including ones both streams find implausible, whose difference is
    # mostly DP noise; they then surface as word salad. One-off DP probe (σ 0.69, 240 steps, w 3, 600 prompts):
    # consistency 0.674 → 0.712 and real-vs-synthetic AUC 1.000 → 0.995 with 0.1. 0: off. At batch 768
    # (bench/notes_guidance.py, the ε = 8 fit's noise, 2,000 prompts, w 3): α 0.05 beat 0.1 on both seeds, 0.858 vs
    # 0.844 (seed 0) and 0.880 vs 0.871 (seed 1); 0.2: 0.839 (seed 0), 0.02: 0.876 (seed 1)
    plausibility: float = 0.05
    # condition → vocabulary path (module docstring): logits += Σ_k gate_k(h_t) · E[c_k]. One-off DP probes (σ 0.69,
    # 240 steps, w 3, α 0.1, 600 prompts), consistency without / with it: 0.66 / 0.71 (seed 0), 0.61 / 0.71
    # (seed 1), about the same step time; bench/notes_guidance.py measures it. Its own learning rate did not help
    # (× 3: 0.63; × 0.3: 0.72 and 0.68 on seeds 0 and 1)
    cond_vocab: bool = True
    # two-group clipping (module docstring): this share of the squared per-patient clipping norm C² is reserved
    # for the condition → vocabulary path (bound C·√share), the rest for the language model (C·√(1 − share));
    # each patient's gradient still has norm ≤ C, so the noise and the ε are unchanged. 0: one flat bound.
    # Measured with one flat bound the path took ≈ 6 % of the squared norm of a trained model's per-patient
    # gradient, so its associations were learnt from a sliver of each patient's clipped contribution.
    # One-off DP probes (σ 0.69, 240 steps, w 3, α 0.1, 600 prompts; seeds 0 / 1), consistency: flat 0.71 / 0.71;
    # share 0.5: 0.80 / 0.80; 0.75: 0.84 / 0.80; 0.9: 0.83 (seed 0). Note NLL after 240 steps: flat 1.92, 0.5: 2.13,
    # 0.75: 2.37, 0.9: 2.77 nats/token — the language model pays for what the path gets.
    # 0.9 since 2026-11-28 (0.75 before), for memorisation: only the language model can store a secret's digits in
    # order (the path adds position-free offsets per condition row), and its part of each patient's bound is now
    # C·√0.1 against C·√0.25 under the same noise σ·C, a 0.63× signal-to-noise ratio for what one patient's note can
    # teach it. The note model alone at the ε = 8 fit's privacy loss, seeds 0–4 paired (bench/notes_sweep.py,
    # results/notes_share033.json): 16× canaries' mean exposure 2.70 → 2.15 bits (chance 1.44), condition
    # consistency 0.955 → 0.951, value consistency 0.771 → 0.767, final NLL 2.12 → 2.45 nats/token (the cost: less
    # fluent notes). With the note model's budget share at 0.33 too (TrainConfig.budget_shares): 1.72 bits, 0.946,
    # 0.759, 2.70
    cond_clip_share: float = 0.9
    # row-sparse path: only condition tokens that assert something get a row of logit offsets (NoteTokenizer.
    # path_rows: no rows for missing values and binary "0"; 48 of the demo's 80), so a patient's path gradient is
    # not spread over rows that say "absent", and the unconditional (all-missing) stream of guidance has no path
    # term. GPU probe sweep (bench/notes_sweep.py, the ε = 8 fit's privacy loss, 2,000 prompts): +0.005–0.008 over
    # the dense table at batch 768–1024 (e.g. 0.850 vs 0.841 over the same 5 seeds at batch 1024, lr 2e-2)
    cond_sparse: bool = True
    # which rows the row-sparse path keeps (NoteTokenizer.path_rows): "asserting" — every band, category and binary
    # "1" (12.9 rows in a demo patient's prefix on average); "binary" — only binary "1" rows (conditions present, ≈ 5
    # rows). A patient's path gradient is the same gated residual copied into each of its rows, so fewer rows leave
    # each more of the clipped norm. GPU probe sweep (bench/notes_sweep.py, 5 seeds, results/notes_sweep_gpu3.json):
    # consistency 0.882 with "binary" against 0.861, 0.896 against 0.882 with the repetition penalty 2 — but the notes'
    # numbers stop following the record, because band rows are what write them: value consistency (dpsynth.metrics.
    # notes.value_consistency; seed 0, 2,000 notes; real ceiling 0.915) 0.621 against 0.753, BMI 0.58 against 0.79.
    # Condition consistency alone would pick "binary"; the default keeps the numbers
    cond_rows: str = "asserting"
    # sampling defaults used by dpsynth.generate (post-processing: no privacy effect)
    temperature: float = 1.0
    top_p: float = 0.95
    # repetition penalty (a frequency penalty, as in CTRL, Keskar et al. 2019, and OpenAI's API): at each step a word
    # piece's logit is lowered by repetition × the number of times the note already holds it; bytes and EOS are
    # never penalised. DP notes repeat the record's most strongly learnt words ("congestive heart heart failure,
    # congestive heart failure") and drop its rarer conditions; real notes name each once. GPU probe sweep
    # (bench/notes_sweep.py, the ε = 8 fit's privacy loss, 5 seeds × 2,000 prompts, results/notes_sweep_gpu2.json),
    # consistency: 0 → 0.861, 1 → 0.880, 2 → 0.882, 3 → 0.889 (min over seeds 0.853 / 0.871 / 0.874 / 0.875).
    # On seed 0 (CPU): distinct-2 0.41 → 0.46 (real notes 0.25), self-BLEU 0.40 → 0.36 (real 0.69), the real-vs-
    # synthetic AUC ≈ 1.00 either way, numbers as consistent with the record as before; 3 and 5 spell more word
    # salad in bytes (the penalty does not reach bytes), so the default stays at 2. 0: off
    repetition: float = 2.0
    # public prior of the condition → vocabulary path: the row of a present binary condition starts with this logit
    # offset on the word pieces that name it (NoteTokenizer.prior_pieces: the schema column's name and description,
    # e.g. heart_failure → " heart", " failure"; public knowledge, no privacy cost) instead of 0. 0: no prior.
    # bench/notes_sweep.py (CPU, seed 0, 2,000 prompts; results/notes_prior.json): the note model alone at the ε = 8
    # fit's privacy loss 0.870 → 0.959 condition consistency (cardiac arrest 0.50 → 1.00, AF 0.67 → 0.99, MI 0.80
    # → 0.97), value consistency 0.75 → 0.74, final NLL 2.16 → 2.17, 16× canaries 2.7 → 2.4 bits; the federated
    # demo's note model (sites at ε 3 / 3 / 2) 0.567 → 0.823. A start, not a constraint: DP training moves the rows
    cond_prior: float = 1.5
    # the same prior on the rows of closed value bands (NoteTokenizer.prior_pieces(bands=True)): age band 50-60 starts
    # raised on the word pieces " 50" … " 59", BMI 25-30 on " 25" … " 29" (the band edges are public: no privacy cost).
    # The note model alone at the ε = 8 fit's privacy loss, seeds 2 and 0 paired (results/notes_paired_s2.json,
    # notes_band_s0.json): condition consistency 0.948 → 0.952 and 0.959 → 0.961, value consistency 0.738 → 0.755
    # and 0.741 → 0.773, final NLL 2.15 → 2.10 and 2.17 → 2.13 nats/token. The chained fit at ε = 8, seeds 0–4
    # (results/notes_band_eps8.json against notes_prior_eps8.json): condition consistency 0.953 both, value
    # consistency 0.743 (0.734–0.759) against 0.728 (0.702–0.748), holdout perplexity 8.3 against 8.7. Default since
    # 2026-11-27
    cond_prior_bands: bool = True
    # how Opacus gets each patient's gradient norm (models.text.make_private_text). "hooks": per-sample gradients
    # from one backward pass; "ghost": per-sample norms only, but two backward passes. Both clip the same per-patient
    # gradient to C and add the same noise (tested against a per-patient reference in both modes), so the choice moves
    # time and memory, not the privacy. At the demo's batch of 768 notes the vocabulary-wide layers (output head,
    # condition path) make ghost's second backward pass the dearer: one DP step on 2 cores (bench/note_step.py) took
    # 9.7 s in ghost mode, 7.2 s in hooks mode without chunks. Ghost remains for models too large for per-sample
    # gradients
    grad_sample_mode: str = "hooks"
    # hooks mode only: a Poisson batch is sorted by note length and cut into this many chunks, each trimmed to its own
    # longest note, and their clipped per-patient gradients are summed before the one noise draw of the step (Opacus'
    # virtual steps: DPOptimizer.signal_skip_step). The sum is the same as one pass over the whole batch padded to its
    # longest note (no privacy effect: same per-patient gradients, same clipping, one noise draw per Poisson batch);
    # 8 chunks compute ≈ 35 % fewer padded positions (the demo's notes: 75 tokens on average, 128 at most) and hold an
    # eighth of the per-sample gradients at a time. Without book-keeping: 2.8 s per step and 1.3 GB peak against 7.0 s
    # and 2.8 GB without chunks, 4.2 s with 4; with it 2.05 s against 5.1 s without chunks (bench/note_step.py,
    # results/note_step.json). 1: no chunks
    length_chunks: int = 8
    # hooks mode only: book-keeping clipping (models.text._Book; Bu et al. 2023). The vocabulary-wide and other
    # SeqLinear / SeqEmbedding layers give each patient's squared gradient norm and the clipped sum Σ_i c_i g_i without
    # forming the per-sample gradient tensors that Opacus zero-fills, copies and reads twice more. Same clipping and
    # noise (tested against the per-sample tensors and a per-patient reference). One DP step with 8 chunks on 2 cores
    # (bench/note_step.py, same run): 2.8 s without, 2.05 s with. False: Opacus' per-sample tensors
    book_keeping: bool = True

    def __post_init__(self):
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} must be a multiple of heads {self.heads}")
        if not (0 <= self.cond_dropout <= 1 and self.guidance >= 0 and 0 <= self.plausibility <= 1):
            raise ValueError(f"cond_dropout and plausibility must be in [0, 1] and guidance ≥ 0, got "
                             f"{self.cond_dropout}, {self.plausibility}, {self.guidance}")
        if self.cond_rows not in PATH_ROWS:
            raise ValueError(f"cond_rows must be one of {PATH_ROWS}, got {self.cond_rows!r}")
        if not 0 <= self.cond_clip_share < 1:
            raise ValueError(f"cond_clip_share must be in [0, 1), got {self.cond_clip_share}")
        if not self.cond_prior >= 0:
            raise ValueError(f"cond_prior must be ≥ 0, got {self.cond_prior}")
        if self.grad_sample_mode not in ("hooks", "ghost"):
            raise ValueError(f"grad_sample_mode must be 'hooks' or 'ghost', got {self.grad_sample_mode!r}")
        if not (isinstance(self.length_chunks, int) and self.length_chunks >= 1):
            raise ValueError(f"length_chunks must be an integer ≥ 1, got {self.length_chunks!r}")
        if not (self.temperature >= 0 and 0 < self.top_p <= 1 and self.repetition >= 0):
            raise ValueError(f"temperature and repetition must be ≥ 0 and top_p in (0, 1], got {self.temperature}, "
                             f"{self.repetition}, {self.top_p}")

    @property
    def path_clip_share(self) -> float:
        """The path's share of two-group clipping in effect: ``cond_clip_share`` with the path, else 0 (flat)."""
        return self.cond_clip_share if self.cond_vocab else 0.0


class Block(nn.Module):
    """Pre-LN transformer block: causal self-attention and an MLP, Linear/LayerNorm only."""

    def __init__(self, d: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = SeqLinear(d, 3 * d)
        self.proj = SeqLinear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = SeqLinear(d, mlp * d)
        self.fc2 = SeqLinear(mlp * d, d)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        return tuple(t.view(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))  # [B, H, T, dh]

    def _out(self, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = att.shape
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, -1))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(x)
        return self._out(x, F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def step(self, x: torch.Tensor, cache: list[torch.Tensor], t0: int) -> torch.Tensor:
        """Incremental forward for positions t0 … t0+T−1 with a key/value cache (generation only)."""
        q, k, v = self._split(x)
        T = x.shape[1]
        cache[0][:, :, t0 : t0 + T] = k
        cache[1][:, :, t0 : t0 + T] = v
        K, V = cache[0][:, :, : t0 + T], cache[1][:, :, : t0 + T]
        if T == 1:
            att = F.scaled_dot_product_attention(q, K, V)  # one query sees every cached position
        else:  # prefill from t0 = 0
            att = F.scaled_dot_product_attention(q, K, V, is_causal=True)
        return self._out(x, att)


COND_PATH = ("cond_out.", "cond_gate.")  # parameter names of the condition → vocabulary path


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; the backward pass multiplies sample b's gradient by ``scale[b]``, read when
    the backward runs (two-group clipping writes the scale between Opacus' two backward passes)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale.view(-1, *([1] * (grad.dim() - 1))).to(grad.dtype), None


class NoteLM(nn.Module):
    """Decoder-only byte transformer. ``forward(ids)`` → per-sample mean NLL of the note tokens, shape [B]."""

    def __init__(self, vocab_size: int, prefix_len: int, config: TextConfig | None = None,
                 uncond: list[int] | None = None, n_cond: int = 0, path_rows: list[bool] | None = None,
                 prior: list[tuple[int, int]] | None = None):
        super().__init__()
        config = config or TextConfig()
        self.config = config
        self.vocab_size = int(vocab_size)
        self.prefix_len = int(prefix_len)
        d = config.d_model
        self.tok = SeqEmbedding(vocab_size, d)
        self.pos = SeqEmbedding(config.max_len, d)
        # the all-missing condition (condition dropout, guidance); not saved: it comes from the tokenizer
        self.register_buffer("uncond", torch.as_tensor(uncond if uncond is not None else [], dtype=torch.long),
                             persistent=False)
        self.blocks = nn.ModuleList([Block(d, config.heads, config.mlp) for _ in range(config.layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = SeqLinear(d, vocab_size)  # untied from self.tok: ghost clipping refuses shared parameters
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
        for b in self.blocks:  # GPT-2 style: residual projections scaled down with depth
            nn.init.normal_(b.proj.weight, std=0.02 / math.sqrt(2 * config.layers))
            nn.init.normal_(b.fc2.weight, std=0.02 / math.sqrt(2 * config.layers))
        self.cond_out = self.cond_gate = None
        if config.cond_vocab and n_cond > 0:
            self.cond_out = SeqEmbedding(n_cond, vocab_size)  # condition token → logit offsets, starts at 0
            self.cond_gate = SeqLinear(d, prefix_len - 2)  # per position, how much each condition column speaks
            nn.init.zeros_(self.cond_out.weight)
            if config.cond_prior and prior:  # public prior (TextConfig.cond_prior): the condition's own words
                with torch.no_grad():
                    for row, piece in prior:
                        self.cond_out.weight[row, piece] = config.cond_prior
            nn.init.normal_(self.cond_gate.weight, std=0.02)
            nn.init.ones_(self.cond_gate.bias)
        # row-sparse path (TextConfig.cond_sparse): the table keeps every row, so saved shapes do not depend on the
        # option, but rows of tokens outside ``path_rows`` are multiplied by 0: they never reach a logit, get no
        # gradient and add nothing to a patient's gradient norm (their DP noise moves weights nothing reads)
        self.register_buffer("cond_keep", None, persistent=False)
        if self.cond_out is not None and config.cond_sparse and path_rows is not None:
            if len(path_rows) != n_cond:
                raise ValueError(f"path_rows has {len(path_rows)} entries for {n_cond} condition tokens")
            self.cond_keep = torch.as_tensor(path_rows, dtype=torch.bool)

    @classmethod
    def for_tokenizer(cls, tokenizer: NoteTokenizer, config: TextConfig | None = None) -> NoteLM:
        config = config or TextConfig(max_len=tokenizer.max_len)
        if config.max_len != tokenizer.max_len:
            raise ValueError(f"config.max_len {config.max_len} differs from the tokenizer's {tokenizer.max_len}")
        return cls(tokenizer.vocab_size, tokenizer.prefix_len, config, uncond=tokenizer.unconditional(),
                   n_cond=tokenizer.word_offset - FIRST_COND, path_rows=tokenizer.path_rows(config.cond_rows),
                   prior=tokenizer.prior_pieces(bands=config.cond_prior_bands))

    def _embed(self, ids: torch.Tensor, t0: int = 0) -> torch.Tensor:
        ids = ids.contiguous()  # Opacus' embedding norm sampler views the ids flat
        B, T = ids.shape
        # positions are given per sample ([B, T]): Opacus' embedding norm sampler needs a batch dimension
        pos = torch.arange(t0, t0 + T, device=ids.device).unsqueeze(0).expand(B, T).contiguous()
        return self.tok(ids) + self.pos(pos)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        x = self._embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.ln_f(x)

    def cond_offsets(self, cond: torch.Tensor) -> torch.Tensor | None:
        """The condition → vocabulary path's logit offsets [B, K, V] of condition ids cond [B, K] (None without
        the path). They depend on the record only, so generation computes them once per note, not per token."""
        if self.cond_out is None:
            return None
        rows = (cond - FIRST_COND).contiguous()
        offsets = self.cond_out(rows)
        if self.cond_keep is not None:
            offsets = offsets * self.cond_keep[rows].unsqueeze(-1).to(offsets.dtype)
        return offsets

    def project(self, h: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
        """Next-token logits [B, T, V] from final hidden states h [B, T, d] and ``cond_offsets`` of the records.

        With two-group clipping the gate reads h detached, so the path's term reaches only the path's own
        parameters, and in training its gradient passes ``_ScaleGrad`` with a per-patient scale (1 until the
        clipping coefficients set it between Opacus' two backward passes; see ``make_private_text``)."""
        logits = self.head(h)
        if offsets is not None:
            split = self.config.path_clip_share > 0
            path = torch.bmm(self.cond_gate(h.detach() if split else h), offsets)
            if split and self.training and torch.is_grad_enabled():
                self._path_scale = torch.ones(h.shape[0], dtype=h.dtype, device=h.device)
                path = _ScaleGrad.apply(path, self._path_scale)
            logits = logits + path
        return logits

    def path_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The condition → vocabulary path's (name, parameter) pairs: the second group of two-group clipping."""
        return [(n, p) for n, p in self.named_parameters() if n.startswith(COND_PATH)]

    def _cond(self, ids: torch.Tensor) -> torch.Tensor:
        return ids[:, 1 : self.prefix_len - 1]

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits at every position, [B, T, V]."""
        return self.project(self.hidden(ids), self.cond_offsets(self._cond(ids)))

    def token_nll(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the NLL of the note tokens, number of note tokens) per sequence. Note tokens are the
        positions after SEP (bytes and EOS) that are not PAD; the prefix is conditioning input only."""
        if ids.shape[1] <= self.prefix_len:
            raise ValueError(f"sequences of {ids.shape[1]} tokens hold no note after the {self.prefix_len}-token prefix")
        h = self.hidden(ids[:, :-1])
        # only the positions that predict a note token reach the output layer (position p predicts p + 1)
        logits = self.project(h[:, self.prefix_len - 1 :], self.cond_offsets(self._cond(ids)))
        target = ids[:, self.prefix_len :]
        mask = (target != PAD).to(logits.dtype)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        nll = nll.view(target.shape) * mask
        return nll.sum(dim=1), mask.sum(dim=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        p = self.config.cond_dropout
        if self.training and p > 0 and len(self.uncond) == self.prefix_len - 2:
            drop = torch.rand(ids.shape[0], device=ids.device) < p
            if bool(drop.any()):
                ids = ids.clone()
                ids[drop, 1 : self.prefix_len - 1] = self.uncond
        total, count = self.token_nll(ids)
        return total / count.clamp(min=1.0)


# ------------------------------------------------------------------------------------------------
# DP training
# ------------------------------------------------------------------------------------------------

def _trim(ids: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """Drop PAD-only columns at the right of a batch (the result of the step is unchanged)."""
    used = int((ids != PAD).sum(dim=1).max()) if ids.numel() else prefix_len + 1
    return ids[:, : max(used, prefix_len + 1)]


def text_step(*, model, optimizer, criterion, batch, private: bool) -> float:
    """One (DP when ``private``) step on a Poisson batch of padded sequences (a tensor or a 1-tuple from a
    TensorDataset loader). Returns the batch's mean per-patient NLL (nats per token).

    In hooks mode (criterion None) with ``TextConfig.length_chunks`` k > 1, the batch is sorted by length and cut
    into k chunks, each trimmed to its own longest sequence; each chunk's per-patient gradients are clipped and
    added to the step's sum (Opacus' skipped steps), and only the last chunk's ``step`` adds the noise and updates
    the weights — one noise draw per Poisson batch, scaled by the expected batch size as without chunks."""
    ids = batch[0] if isinstance(batch, (tuple, list)) else batch
    optimizer.zero_grad(set_to_none=False)
    plain = _plain(model)
    book = getattr(plain, "_dp_book", None)
    if book is not None:
        book.clear()  # nothing from an earlier backward pass that never reached its step
    if ids.shape[0] == 0:
        return empty_batch_step(model, optimizer)
    k = plain.config.length_chunks
    if private and criterion is None and k > 1 and ids.shape[0] > 1 and hasattr(optimizer, "signal_skip_step"):
        chunks = ids[(ids != PAD).sum(dim=1).argsort(stable=True)].tensor_split(min(k, ids.shape[0]))
        total = 0.0
        try:
            for i, chunk in enumerate(chunks):
                if i:  # drops the last chunk's per-sample gradients; the clipped sum is kept (that step was skipped)
                    optimizer.zero_grad(set_to_none=False)
                optimizer.signal_skip_step(i < len(chunks) - 1)
                with _booking(book):
                    total += backward_and_step(model(_trim(chunk, plain.prefix_len)), criterion=None,
                                               optimizer=optimizer, private=private) * len(chunk)
        except BaseException:
            # a batch cut short releases nothing (no weight moved before the last chunk); leave no queued skip and no
            # partial clipped sum behind, so a caller that reuses the optimizer cannot mix this batch into the next
            optimizer._step_skip_queue.clear()
            optimizer._is_last_step_skipped = False
            optimizer.zero_grad(set_to_none=False)
            if book is not None:
                book.clear()
            raise
        return total / ids.shape[0]
    # ghost clipping: the criterion wraps the [B] per-patient losses; hooks mode (criterion None): the plain mean
    with _booking(book if private else None):
        return backward_and_step(model(_trim(ids, plain.prefix_len)), criterion=criterion, optimizer=optimizer,
                                 private=private)


@contextlib.contextmanager
def _booking(book: _Book | None):
    """Mark a DP step's forward and backward passes for book-keeping clipping (``SeqLinear``); always unmarked after."""
    if book is None:
        yield
        return
    book.active = True
    try:
        yield
    finally:
        book.active = False


def make_private_text(*, model, optimizer, loader, noise_multiplier: float, max_grad_norm: float, noise_generator,
                      grad_sample_mode: str | None = None):
    """Opacus wiring for the note model: per-patient clipping, Poisson sampling (q = 1/len(loader)).

    The loader must yield 1-tuples of int64 [B, max_len] sequences (a TensorDataset of ``EncodedNotes.ids``).
    Returns (model, optimizer, criterion, loader) in both modes: ``"hooks"`` (one backward pass, per-sample
    gradients instantiated, one length chunk of the batch at a time: ``text_step``; criterion None) or ``"ghost"``
    (two backward passes, per-sample norms without per-sample gradients). ``grad_sample_mode`` None takes the
    model's ``TextConfig.grad_sample_mode`` (hooks). Both clip each patient's whole note to ``max_grad_norm`` and
    add the same noise; the default is the faster one at the demo's batch (see the module docstring).

    With the condition → vocabulary path and ``TextConfig.cond_clip_share`` s > 0, clipping is two-group: a
    patient's gradient on the path's parameters is clipped to C·√s and on all the others to C·√(1 − s), so its
    whole gradient has norm ≤ C = ``max_grad_norm`` and the Gaussian noise σ·C is calibrated as before."""
    grad_sample_mode = grad_sample_mode or model.config.grad_sample_mode
    out = make_private(module=model, optimizer=optimizer, criterion=PerSampleLoss(), loader=loader,
                       noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, noise_generator=noise_generator,
                       grad_sample_mode=grad_sample_mode)
    share = model.config.path_clip_share
    path = {id(p) for _, p in model.path_parameters()} if share > 0 else set()
    # a model wired before keeps no book of that wiring: only hooks mode with TextConfig.book_keeping has one
    _attach_book(model, _Book() if grad_sample_mode == "hooks" and model.config.book_keeping else None)
    if path or grad_sample_mode == "hooks":
        _clipping(model, out[0], out[1], grad_sample_mode, path, max_grad_norm, share)
    return out


def _attach_book(model: NoteLM, book: _Book | None) -> None:
    """Give the model and its SeqLinear / SeqEmbedding layers ``book`` (None: none) for book-keeping clipping."""
    model._dp_book = book
    for layer in model.modules():
        if isinstance(layer, (SeqLinear, SeqEmbedding)):
            layer._dp_book = book


def _clipping(model: NoteLM, module, optimizer, mode: str, path: set[int], C: float, share: float) -> None:
    """Install the note model's clipping (see ``make_private_text``) on Opacus' wrapped module / DP optimizer:
    two-group when ``path`` (the path's parameter ids) is not empty, else one flat bound C.

    ghost (two-group only): Opacus computes each parameter's per-sample gradient norm in its first backward pass
    and asks ``get_clipping_coef`` for one coefficient per patient, which its second backward pass applies. We return
    the language model's coefficient c_A and set the path's gradient scale to c_P / c_A (``_ScaleGrad``), so the
    second pass leaves c_A·g_A + c_P·g_P. hooks: the optimizer's ``clip_and_accumulate`` is replaced by one that
    adds Σ_i (c_A,i·g_A,i + c_P,i·g_P,i) to ``summed_grad`` (each patient's norm ≤ C, so Opacus' flat clipping at C
    would change nothing), reading the ``SeqLinear`` / ``SeqEmbedding`` layers' norms and clipped sums from a book
    (``_Book``; ``TextConfig.book_keeping``) and the other layers' (layer norms) from their per-sample gradients."""
    c_lm, c_path = C * math.sqrt(1.0 - share), C * math.sqrt(share)

    def coefficients(squares: list[tuple[nn.Parameter, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-patient clipping coefficients (language model, path) from each parameter's squared per-sample
        gradient norms [B]; with one flat bound both are min(1, C / the whole gradient's norm)."""
        if not path:  # Opacus' flat clipping factor
            c = (C / (torch.stack([s for _, s in squares]).sum(0).sqrt() + 1e-6)).clamp(max=1.0)
            return c, c
        lm = torch.stack([s for p, s in squares if id(p) not in path]).sum(0).sqrt()
        pa = torch.stack([s for p, s in squares if id(p) in path]).sum(0).sqrt()
        return (c_lm / (lm + 1e-6)).clamp(max=1.0), (c_path / (pa + 1e-6)).clamp(max=1.0)

    if mode == "ghost":
        def get_clipping_coef() -> torch.Tensor:
            a, b = coefficients([(p, p._norm_sample.pow(2)) for p in module.trainable_parameters])
            module.get_norm_sample()  # Opacus' own record of the (unclipped) per-patient norms
            model._path_scale.copy_(b / a)
            return a

        module.get_clipping_coef = get_clipping_coef
        return
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    book = model._dp_book
    flat_clip = optimizer.clip_and_accumulate

    def clip_and_accumulate() -> None:
        """Opacus' DPOptimizer.clip_and_accumulate with one coefficient per group: each parameter's per-sample
        gradients (or a book's squared norms) are read once for their norms and once for the clipped sum."""
        gs = optimizer.grad_samples
        if not len(gs[0]):
            if book is not None and len(book):
                raise RuntimeError("book-keeping clipping: an empty batch with recorded gradients")
            flat_clip()  # empty Poisson batch: Opacus' own zero contribution
            return
        B = len(gs[0])
        squares = []
        for p, g in zip(optimizer.params, gs):
            if book is not None and book.holds(p):
                if g.shape != (B, 1):
                    raise RuntimeError(f"book-keeping clipping: a placeholder of shape {tuple(g.shape)}, not ({B}, 1)")
                squares.append((p, g[:, 0]))
            else:
                squares.append((p, g.reshape(B, -1).pow(2).sum(1)))
        a, b = coefficients(squares)
        for p, g in zip(optimizer.params, gs):
            _check_processed_flag(p.grad_sample)
            c = (b if id(p) in path else a).to(g.dtype)
            grad = book.clipped_sum(p, c) if book is not None and book.holds(p) else torch.einsum("i,i...", c, g)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)
        if book is not None and len(book):
            raise RuntimeError(f"book-keeping clipping: {len(book)} recorded gradients belong to no parameter of the "
                               "optimizer")

    optimizer.clip_and_accumulate = clip_and_accumulate


def text_epoch(*, model, optimizer, criterion, loader, private: bool, may_step=lambda: True,
               stepped=lambda: None) -> list[float]:
    """One pass over a Poisson loader (models.dp.run_epoch). Returns the per-step mean NLLs."""
    return run_epoch(loader, lambda b: text_step(model=model, optimizer=optimizer, criterion=criterion, batch=b,
                                                   private=private), may_step=may_step, stepped=stepped)


# ------------------------------------------------------------------------------------------------
# scoring and sampling (post-processing: no privacy cost)
# ------------------------------------------------------------------------------------------------

def _plain(model) -> NoteLM:
    return model._module if hasattr(model, "_module") else model


@torch.no_grad()
def note_log_likelihood(model, ids: np.ndarray | torch.Tensor, *, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(log-likelihood in nats, number of note tokens) per sequence: the scorer of the canary exposure audit
    and of holdout perplexity (exp(−Σ ll / Σ n))."""
    m = _plain(model)
    was = m.training
    m.eval()
    ids = torch.as_tensor(ids)
    ll, cnt = [], []
    for i in range(0, len(ids), batch):
        chunk = _trim(ids[i : i + batch], m.prefix_len)
        s, c = m.token_nll(chunk)
        ll.append(-s.double().numpy())
        cnt.append(c.numpy())
    m.train(was)
    if not ll:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(ll), np.concatenate(cnt)


def _inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None, u: torch.Tensor | None = None) -> torch.Tensor:
    """One index per row drawn from the (unnormalised) weights ``probs`` [B, K]: u ~ U(0, row mass), the first
    position whose cumulative weight exceeds u. Exact, and ~40× cheaper than torch.multinomial on CPU (which
    was half of the sampling time). ``u`` [B, 1]: the uniform draws in [0, 1) to use (default: drawn here)."""
    c = probs.cumsum(dim=-1)
    if u is None:
        u = torch.rand(probs.shape[0], 1, generator=generator, dtype=c.dtype)
    return torch.searchsorted(c, u * c[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1).squeeze(-1)


TOP_P_CANDIDATES = 64  # nucleus sampling looks among this many most likely tokens first (see _top_p_sample)


def _nucleus_draw(sp: torch.Tensor, idx: torch.Tensor, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """Token ids drawn from the nucleus of descending probabilities ``sp`` (token ids ``idx``) with uniforms ``u``."""
    keep = (sp.cumsum(dim=-1) - sp) < top_p  # a prefix of the sorted tokens
    return idx.gather(-1, _inverse_cdf(sp * keep, None, u).unsqueeze(-1)).squeeze(-1)


def _top_p_sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
                  u: torch.Tensor | None = None) -> torch.Tensor:
    """Temperature and nucleus (top-p) sampling: the smallest set of most likely tokens whose mass reaches
    ``top_p`` (the first always kept), renormalised.

    The nucleus is looked for among the ``TOP_P_CANDIDATES`` most likely tokens (``topk``) and only rows whose
    nucleus reaches beyond them are fully sorted: a full sort of the vocabulary per row and token was a third of
    the sampling time. The same nucleus and the same uniform draw per row (one ``rand`` per row, as before), so
    the same tokens up to the order of exactly tied probabilities. ``u`` [rows, 1]: the uniform draws to use
    (default: one per row from ``generator``)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return _inverse_cdf(probs, generator, u)
    if u is None:
        u = torch.rand(probs.shape[0], 1, generator=generator, dtype=probs.dtype)
    k = min(TOP_P_CANDIDATES, probs.shape[-1])
    sp, idx = probs.topk(k, dim=-1)  # sorted, most likely first
    out = _nucleus_draw(sp, idx, top_p, u)
    if k < probs.shape[-1]:
        wide = sp.cumsum(dim=-1)[:, -1] < top_p  # the k most likely hold less than top_p: the nucleus goes on
        if bool(wide.any()):
            out[wide] = _nucleus_draw(*probs[wide].sort(dim=-1, descending=True), top_p, u[wide])
    return out


def _guide(logits: torch.Tensor, B: int, guidance: float, plausibility: float, allowed: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance u + w (c − u) when rows B … 2B−1 are the unconditional stream (else as is),
    restricted to the generable tokens (``allowed``: 0 or −inf) whose conditional probability is ≥
    ``plausibility`` × the most likely generable token's; the others get −inf."""
    if logits.shape[0] == B:
        return logits
    c, u = logits[:B], logits[B:]
    guided = u + guidance * (c - u)
    if plausibility > 0:  # on logits: the log-softmax offset cancels in the comparison with the row's maximum
        c = c + allowed
        guided = guided.masked_fill(c < c.max(dim=-1, keepdim=True).values + math.log(plausibility), float("-inf"))
    return guided


# finished notes leave a generation batch once they are at least 1/COMPACT_SHARE of the rows it holds
# (sample_note_ids): dropping them copies the key/value caches, so not at every EOS
COMPACT_SHARE = 4


@torch.no_grad()
def sample_notes(model, tokenizer: NoteTokenizer, conditions: pd.DataFrame | np.ndarray, *, temperature: float = 1.0,
                 top_p: float = 0.95, generator: torch.Generator | None = None, max_new: int | None = None,
                 batch: int = 512, guidance: float = 1.0, plausibility: float | None = None,
                 repetition: float | None = None, compact: bool = True) -> list[str]:
    """One note per condition row (``sample_note_ids``' sequences, decoded)."""
    ids = sample_note_ids(model, tokenizer, conditions, temperature=temperature, top_p=top_p, generator=generator,
                          max_new=max_new, batch=batch, guidance=guidance, plausibility=plausibility,
                          repetition=repetition, compact=compact)
    return [tokenizer.decode(row) for row in ids[:, tokenizer.prefix_len :].tolist()]


def sample_note_ids(model, tokenizer: NoteTokenizer, conditions: pd.DataFrame | np.ndarray, *,
                    temperature: float = 1.0, top_p: float = 0.95, generator: torch.Generator | None = None,
                    max_new: int | None = None, batch: int = 512, guidance: float = 1.0,
                    plausibility: float | None = None, repetition: float | None = None,
                    compact: bool = True) -> torch.Tensor:
    """One note per condition row, as whole sequences [n, max_len] in the training layout (BOS, condition, SEP,
    note tokens, EOS, PAD…; ``NoteLM.token_nll`` scores them). ``conditions``: a frame of records, or [n, K]
    condition ids. Each note is generated token by token with a key/value cache, temperature and nucleus (top-p) sampling. Only byte tokens and EOS can be
    generated; a note that reaches ``max_new`` tokens (default: the room left in ``max_len``) stops there.
    ``guidance`` ≠ 1: classifier-free guidance, an all-missing-condition stream alongside in the same batch, with
    the plausibility constraint ``plausibility`` (None: the model's ``TextConfig.plausibility``) on the candidates.
    ``repetition`` (None: the model's ``TextConfig.repetition``): each word piece's logit is lowered by this much per
    earlier use in the note (after guidance and the plausibility constraint; bytes and EOS are never penalised).
    ``compact``: notes that have written EOS leave the batch (their rows of the key/value caches are dropped) once
    they are ``1/COMPACT_SHARE`` of the rows still held; a batch otherwise runs every row to its longest note. The
    notes are the same either way: each batch row gets its uniform draw per token whether or not it is held."""
    m = _plain(model)
    was = m.training
    m.eval()
    cond = tokenizer.encode_condition(conditions) if isinstance(conditions, pd.DataFrame) else np.asarray(conditions)
    if cond.ndim != 2 or cond.shape[1] != len(tokenizer.columns):
        raise ValueError(f"conditions must be [n, {len(tokenizer.columns)}] ids, got {cond.shape}")
    room = tokenizer.max_len - tokenizer.prefix_len
    max_new = room if max_new is None else min(int(max_new), room)
    allowed = torch.full((m.vocab_size,), float("-inf"))
    allowed[tokenizer.generable()] = 0.0
    cfg = m.config
    dh = cfg.d_model // cfg.heads
    out = torch.full((len(cond), tokenizer.max_len), PAD, dtype=torch.long)
    guided = guidance != 1.0
    alpha = cfg.plausibility if plausibility is None else float(plausibility)
    uncond = torch.as_tensor(tokenizer.unconditional(), dtype=torch.long)
    rep = cfg.repetition if repetition is None else float(repetition)
    words = torch.zeros(m.vocab_size)  # 1 for the tokens the repetition penalty applies to: the word pieces
    words[tokenizer.word_offset : tokenizer.word_offset + len(tokenizer.words)] = 1.0
    for s in range(0, len(cond), batch):
        c = torch.as_tensor(cond[s : s + batch], dtype=torch.long)
        B = c.shape[0]
        if guided:  # the unconditional stream rides in the same batch: rows n … 2n−1 for the n rows held
            c = torch.cat([c, uncond.expand(B, -1)])
        R = c.shape[0]  # B, or 2B with the unconditional stream
        prefix = torch.cat([torch.full((R, 1), BOS), c, torch.full((R, 1), SEP)], dim=1)
        caches = [[torch.zeros(R, cfg.heads, tokenizer.max_len, dh) for _ in range(2)] for _ in m.blocks]
        offsets = m.cond_offsets(c)
        x = m._embed(prefix, 0)
        for b, cache in zip(m.blocks, caches):
            x = b.step(x, cache, 0)
        logits = _guide(m.project(m.ln_f(x[:, -1:]), offsets)[:, 0], B, guidance, alpha, allowed)
        t = prefix.shape[1]
        gen = torch.full((B, max_new), PAD, dtype=torch.long)
        held = torch.arange(B)  # the batch rows still in the caches, in cache order
        done = torch.zeros(B, dtype=torch.bool)  # of the held rows: wrote EOS
        seen = torch.zeros(B, m.vocab_size)  # of the held rows: how often each word piece is already in the note
        for j in range(max_new):
            if rep > 0:
                logits = logits - rep * seen
            # one uniform per batch row and token whichever rows are still held, so that dropping finished rows
            # leaves every note's draws, and so its tokens, as they were
            u = torch.rand(B, 1, generator=generator) if temperature > 0 else None
            nxt = _top_p_sample(logits + allowed, temperature, top_p, generator, None if u is None else u[held])
            nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
            gen[held, j] = nxt
            if rep > 0:
                seen[torch.arange(len(held)), nxt] += words[nxt]
            done |= nxt == EOS
            if bool(done.all()) or t >= tokenizer.max_len:
                break
            n = len(held)
            if compact and int(done.sum()) * COMPACT_SHARE >= n:  # drop finished notes from the batch
                keep = (~done).nonzero().squeeze(1)
                rows = torch.cat([keep, keep + n]) if guided else keep
                caches = [[kv.index_select(0, rows) for kv in cache] for cache in caches]
                offsets = None if offsets is None else offsets.index_select(0, rows)
                held, nxt, seen, done = held[keep], nxt[keep], seen[keep], done[keep]
            step_ids = torch.cat([nxt, nxt]) if guided else nxt  # both streams continue the same note
            x = m._embed(step_ids.unsqueeze(1), t)
            for b, cache in zip(m.blocks, caches):
                x = b.step(x, cache, t)
            logits = _guide(m.project(m.ln_f(x), offsets)[:, 0], len(held), guidance, alpha, allowed)
            t += 1
        P = prefix.shape[1]
        out[s : s + B, :P] = prefix[:B]
        out[s : s + B, P : P + max_new] = gen
    m.train(was)
    return out
