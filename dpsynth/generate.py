"""Sampling synthetic patients from a trained model directory."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .errors import DpsynthError
from .models.flow import fill_vitals
from .models.wgan import sample_encoded
from .models.text import sample_notes
from .train import NOT_PRIVATE, TrainConfig, load_flow, load_model, load_text

GENERATED_NOTE_LABEL = "synthetic note written by dpsynth's DP note model"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_note(text: str) -> str:
    """A generated note made safe for CSV and text tools (post-processing): line breaks normalised to \\n
    (pandas writes a lone \\r unquoted, which splits the row on reading) and other control characters
    removed; tabs and newlines are kept."""
    return _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


def sample_patients(schema, encoder, generator, latent_dim: int, n: int, *, rng: np.random.Generator,
                    flow=None, codec=None, enforce_constraints: bool = True) -> pd.DataFrame:
    """The chained record + vitals from given models: the WGAN's record decoded with ``rng``, the flow's
    continuous values conditioned on it (when given), then the schema's declared relations recomputed
    (post-processing). Used by ``generate``, the coordinator's candidate release and the benchmarks."""
    df = encoder.inverse(sample_encoded(generator, encoder, n, latent_dim).numpy(), rng=rng)
    if flow is not None:
        df = fill_vitals(flow, codec, df)
    if enforce_constraints:
        for con in schema.constraints:
            if con.enforce:
                con.enforce_on(df, schema)
    return df


def add_notes(df: pd.DataFrame, column: str, model, tokenizer, *, temperature: float, top_p: float,
              seed: int | None = None, guidance: float | None = None) -> None:
    """The chain's last link, in place: one note per row of the finished record + vitals, sampled by the note
    model (temperature / top-p / classifier-free guidance, by default the model's TextConfig.guidance; seeded,
    else from OS entropy) and cleaned for CSV (``clean_note``). Used by
    ``generate`` and the coordinator's candidate release."""
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))
    guidance = model.config.guidance if guidance is None else guidance
    notes = sample_notes(model, tokenizer, df, temperature=temperature, top_p=top_p, generator=g, guidance=guidance)
    df[column] = [clean_note(t) for t in notes]


def generate(model_dir: str | os.PathLike, n: int, *, seed: int | None = None,
             use_flow: bool = True, use_text: bool = True, enforce_constraints: bool = True,
             temperature: float | None = None, top_p: float | None = None) -> tuple[pd.DataFrame, dict]:
    """The chained synthetic patient: the WGAN's record (binary/categorical values and which measurements are
    missing), then — when the model has one — the flow's continuous values conditioned on that record, then —
    when the model has one — a note conditioned on record + vitals (temperature / top-p from the model's
    TextConfig unless given). ``use_flow=False`` keeps the WGAN's own continuous columns, ``use_text=False``
    leaves the note column empty and ``enforce_constraints=False`` keeps the models' raw output (for measuring
    the models, as bench/vitals.py does). The planted canaries of a model (canaries.json) are never read here."""
    if n <= 0:
        raise DpsynthError(f"--n must be a positive number of patients, got {n}")
    manifest, schema, gen, enc = load_model(model_dir)
    latent = TrainConfig.from_json(manifest["training"]["config"]).wgan.latent_dim
    flow, codec = load_flow(model_dir, manifest, schema, enc) if use_flow else (None, None)
    if seed is not None:  # after building the flow: its initialisation must not shift the seeded draws
        torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    df = sample_patients(schema, enc, gen, latent, n, rng=rng, flow=flow, codec=codec,
                         enforce_constraints=enforce_constraints)
    text, tok, col = load_text(model_dir, manifest, schema) if use_text else (None, None, None)
    if text is not None:
        cfg = TrainConfig.from_json(manifest["training"]["config"]).text
        add_notes(df, col, text, tok, temperature=cfg.temperature if temperature is None else temperature,
                  top_p=cfg.top_p if top_p is None else top_p, seed=None if seed is None else seed + 3)
    return df, manifest


def provenance(manifest: dict, model_dir: str | os.PathLike, n: int) -> dict:
    priv = manifest["privacy"]
    return {
        "generated_by": f"dpsynth {manifest['dpsynth_version']}",
        "model": str(Path(model_dir).resolve()),
        "model_manifest_sha256": None,
        "rows": n,
        "differentially_private": priv["differentially_private"],
        "epsilon": priv["epsilon"],
        "delta": priv["delta"],
        "unit": priv["unit"],
        "warning": None if priv["differentially_private"] else NOT_PRIVATE,
        **({"notes": {"label": GENERATED_NOTE_LABEL, "trained_on": (manifest["data"].get("notes") or {}).get("label")}}
           if "text" in manifest.get("models", []) else {}),
    }
