"""Sampling synthetic patients from a trained model directory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .errors import DpsynthError
from .models.wgan import sample_encoded
from .train import NOT_PRIVATE, TrainConfig, load_model


def generate(model_dir: str | os.PathLike, n: int, *, seed: int | None = None) -> tuple[pd.DataFrame, dict]:
    if n <= 0:
        raise DpsynthError(f"--n must be a positive number of patients, got {n}")
    manifest, schema, gen, enc = load_model(model_dir)
    latent = TrainConfig.from_json(manifest["training"]["config"]).wgan.latent_dim
    if seed is not None:
        torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x = sample_encoded(gen, enc, n, latent).numpy()
    df = enc.inverse(x, rng=rng)
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
    }
