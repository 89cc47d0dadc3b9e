"""One site's DP training of the structured-record generator under one budget.

Budget flow (all composed by one SiteAccountant, PRV):
  schema inference spend (if the schema was estimated with DP)  ─┐
  DP checkpoint selection (Gaussian noisy marginals, q = 1)       │
  DP-SGD steps of the WGAN critic                                 ├─► total ≤ --epsilon at --delta
  DP-SGD steps of the vitals flow (models.flow)                   │
  DP-SGD steps of the note generator (models.text; opt-in)       ─┘
Noise is calibrated before the first step for the planned epochs of every model, splitting the budget between
the models by ``TrainConfig.budget_shares`` (rule: privacy.accountant.split_sigmas); the loops stop before
any step beyond the plan, and the final ε is recomputed and checked against the target before anything is
written. The flow trains first, then the note model, then the WGAN; an interrupted run resumes in any phase.

The note model (``models=(..., "text")``) needs a schema with exactly one column of kind ``text``. Patients
whose note is missing are dropped from the text model's dataset only: its Poisson sampling rate is
q = 1/ceil(n_notes/text.batch_size) over the n_notes patients that have a note (so n and q differ from the
other models'; n_notes, like the site size, is treated as public metadata and written in the manifest).
Adding or removing one patient still changes at most one example of every dataset, so the add/remove-one-
patient guarantee composes as before. Empty notes are kept (the model learns "no text"), over-long notes are
truncated and non-UTF-8 bytes replaced by the tokenizer; all are counted in the manifest (``data.notes``).
Optional secret-sharer canaries (``TrainConfig.canaries``) are planted in the training notes for the
memorisation audit; the planted secrets are kept only in the model directory (``canaries.json``).
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import BudgetExceededError, DataError, ModelError, PrivacyParameterError
from .io_utils import atomic_write_json, read_json, sha256_file
from .models.dp import PerSampleLoss, make_private
from .models.flow import FlowConfig, flow_epoch, new_flow
from .models.text import NoteLM, NoteTokenizer, TextConfig, make_private_text, text_epoch
from .models.wgan import Critic, Generator, RealTermLoss, WGANConfig, wgan_step
from .preprocess import Encoder
from .privacy.accountant import ACCOUNTANT_NAME, Mechanism, SiteAccountant, calibrate_noise, calibrate_split
from .privacy.ledger import Ledger
from .privacy import selection
from .schema import Schema

MODEL_FORMAT = "dpsynth-model/1"
CRITIC_MECHANISM = "dp-sgd:wgan-critic"
FLOW_MECHANISM = "dp-sgd:flow"
TEXT_MECHANISM = "dp-sgd:text"
MODELS = ("wgan", "flow", "text")
RECORD_MODELS = ("wgan", "flow")  # the default chained patient of a schema without a text column
# TextConfig options absent from note models saved before them, and the value those models were trained with
LEGACY_TEXT_PATHS = {"cond_vocab": False, "cond_clip_share": 0.0, "cond_sparse": False, "cond_rows": "asserting"}
CANARY_WARNING = ("planted secret-sharer canaries: keep inside the model directory for the memorisation audit; "
                  "never release this file")
BUDGET_SPLIT_RULE = (
    "ε is shared by the models' DP-SGD mechanisms in proportion to budget_shares, measured as shares of the "
    "Gaussian-DP privacy loss μ² = q²·T·(e^{1/σ²} − 1) of each (CLT approximation, Bu et al. 2020); one scale "
    "is then searched so that the exact PRV composition of all mechanisms meets the target ε"
)
PRIVACY_STATEMENT = (
    "Unit of privacy: one patient (one row; adjacency = adding or removing one patient). Every mechanism that "
    "read the training data is composed by one accountant (Opacus PRV, upper bound): DP statistics used to "
    "build the schema, DP checkpoint selection, every DP-SGD step of the WGAN critic and every DP-SGD step of "
    "the vitals flow (Poisson sampling, per-sample clipping by ghost clipping, Gaussian noise). The WGAN "
    "generator never reads real records (post-processing). Preprocessing uses the schema's public bounds only."
)
TEXT_STATEMENT = (
    " The note generator is trained with DP-SGD charged to the same accountant (one example per patient with a "
    "note: the whole note is clipped as one example, its condition → vocabulary path and the rest of the model "
    "each to their part of the one clipping norm; patients without a note are not in its dataset). Its "
    "tokenizer is byte-level plus the schema's public word pieces and condition tokens built from the schema only: "
    "nothing is fitted on the notes."
)
NOT_PRIVATE = "NOT DIFFERENTIALLY PRIVATE: trained with --non-private, for comparison only. Do not release."


@dataclass
class TrainConfig:
    epochs: int = 120
    batch_size: int = 1024  # expected Poisson batch size
    max_grad_norm: float = 1.0
    checkpoints: int = 5  # generator snapshots kept for selection (post-processing, free)
    select: bool = True  # DP selection among checkpoints (charged), else the last checkpoint
    selection_share: float = 0.05  # fraction of ε given to selection when select is on
    profile: str = "A"
    # the chained patient: the WGAN generates the record, the flow its continuous columns given the record
    # None = default_models(schema): the chained patient record → vitals → note (the note only when the schema
    # has a text column); resolved by ``train`` and stored resolved in the manifest
    models: tuple[str, ...] | None = None
    # how ε is split between the models' DP-SGD runs (BUDGET_SPLIT_RULE); only the models trained count.
    # Equal shares: at ε = 3 on NAFLD, 1:1 gave height/weight KS ≈ 0.06/0.035 vs ≈ 0.07/0.09 with 3:1
    # (bench/vitals.py, 2 seeds each); the WGAN's record is scored in bench/utility.py with the same default.
    # The note model's share, 0.33 (since 2026-11-28; 1.0 before): with the path's share of its clipping at 0.9
    # (TextConfig.cond_clip_share), it is what kept canaries written in 16 patients' notes at chance at ε = 8. The
    # note model alone at the ε = 8 fit's privacy loss, 5 seeds paired (same canaries, hosts and noise seed;
    # bench/notes_sweep.py, results/notes_share033.json): the 16× canaries' mean exposure 2.70 bits with share 1.0
    # and path share 0.75, 2.15 with path share 0.9, 1.72 with both (chance 1.44), condition consistency 0.955 /
    # 0.951 / 0.946. The WGAN and flow get the privacy the notes give up
    budget_shares: dict = field(default_factory=lambda: {"wgan": 1.0, "flow": 1.0, "text": 0.33})
    wgan: WGANConfig = field(default_factory=WGANConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # secret-sharer canaries for the memorisation audit: this many per repetition count (audits.text.COUNTS), plus as
    # many never-planted controls; 0 = none. Only with the text model.
    canaries: int = 0

    def __post_init__(self) -> None:
        if self.models is not None:  # None: resolved against the schema by ``train`` (resolve_models), checked then
            self.models = tuple(self.models)
            unknown = [m for m in self.models if m not in MODELS]
            if unknown or "wgan" not in self.models or len(set(self.models)) != len(self.models):
                raise ModelError(f"--models must list wgan and optionally flow and text (known: {', '.join(MODELS)}), "
                                 f"got {','.join(self.models)}")
        if not isinstance(self.canaries, int) or isinstance(self.canaries, bool) or self.canaries < 0:
            raise ModelError(f"--canaries must be a non-negative integer, got {self.canaries!r}")
        if self.canaries and self.models is not None and "text" not in self.models:
            raise ModelError("--canaries plants secrets in the training notes: it needs the text model (--models ...,text)")
        extra = sorted(set(self.budget_shares) - set(MODELS))
        if extra:
            raise PrivacyParameterError(f"budget shares name unknown models {extra} (known: {', '.join(MODELS)})")
        for m in MODELS:
            w = self.budget_shares.get(m)
            needed = self.models is not None and m in self.models
            if (w is None and needed) or (w is not None and not (w > 0 and math.isfinite(w))):
                raise PrivacyParameterError(f"budget share of {m} must be a positive number, got {w}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["wgan"]["betas"] = list(d["wgan"]["betas"])
        d["models"] = None if self.models is None else list(self.models)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        w = dict(d.pop("wgan", {}))
        if "betas" in w:
            w["betas"] = tuple(w["betas"])
        f = dict(d.pop("flow", {}))
        t = dict(d.pop("text", {}))  # model directories written before the note model existed: defaults
        if t:  # note models saved before a TextConfig path existed lack its weights: load them without it
            for k, v in LEGACY_TEXT_PATHS.items():
                t.setdefault(k, v)
        d.setdefault("models", ["wgan"])  # model directories written before the flow existed
        return cls(**d, wgan=WGANConfig(**w), flow=FlowConfig(**f), text=TextConfig(**t))


def text_clipping(text: TextConfig) -> str:
    """How the note model's per-patient clipping norm C is spent (models.text.make_private_text)."""
    s = text.path_clip_share
    if s <= 0:
        return "flat: each patient's whole gradient ≤ C"
    return (f"two-group: each patient's gradient on the condition → vocabulary path ≤ C·√{s:g}, on the rest of "
            f"the model ≤ C·√{1 - s:g}; the whole gradient ≤ C")


@dataclass
class Plan:
    n: int
    sample_rate: float
    steps_per_epoch: int
    planned_steps: int
    noise_multiplier: float | None  # None when non-private
    selection_noise: float | None
    flow_steps: int = 0  # planned DP-SGD steps of the flow (0: no flow)
    flow_noise: float | None = None
    text_n: int = 0  # patients with a note (the text model's dataset)
    text_sample_rate: float | None = None  # its own Poisson rate: 1/ceil(text_n / text.batch_size)
    text_steps_per_epoch: int = 0
    text_steps: int = 0  # planned DP-SGD steps of the note model (0: no note model)
    text_noise: float | None = None


def default_models(schema: Schema) -> tuple[str, ...]:
    """The default chained patient for a schema: the WGAN's record, the flow's continuous columns and — when
    the schema declares a ``text`` column — a note written by the note model."""
    return RECORD_MODELS + (("text",) if schema.of_kind("text") else ())


def resolve_models(config: TrainConfig, schema: Schema) -> TrainConfig:
    """``config`` with ``models`` set (the schema's default when None), validated."""
    return config if config.models is not None else replace(config, models=default_models(schema))


def clip_norm(config: TrainConfig, model: str) -> float:
    """Per-example clipping norm of one model's DP-SGD: the model's own (FlowConfig.max_grad_norm) or the
    run's ``max_grad_norm``. Clipping changes no ε (σ is relative to the norm); it trades clipping bias
    against noise, per model."""
    own = config.flow.max_grad_norm if model == "flow" else None
    return config.max_grad_norm if own is None else float(own)


def parse_budget_shares(text: str | None, what: str = "--budget-shares") -> dict:
    """``wgan=3,flow=1`` → {"wgan": 3.0, "flow": 1.0}: each named model's share of the privacy loss (see
    TrainConfig.budget_shares); unnamed models keep the default 1. Names must be models, values positive."""
    out = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, sep, val = part.partition("=")
        name = name.strip()
        try:
            v = float(val)
        except ValueError:
            v = None
        if not sep or v is None:
            raise ModelError(f"{what}: {part.strip()!r} is not name=number (e.g. wgan=3,flow=1)")
        if name not in MODELS:
            raise ModelError(f"{what}: unknown model {name!r} (known: {', '.join(MODELS)})")
        if not (v > 0 and math.isfinite(v)):
            raise ModelError(f"{what}: the share of {name} must be a positive number, got {val.strip()!r}")
        out[name] = v
    return out


def text_column(schema: Schema) -> str:
    """The schema's one ``text`` column (the note model needs exactly one)."""
    cols = [c.name for c in schema.of_kind("text")]
    if len(cols) != 1:
        have = f"it has {len(cols)}: {cols}" if cols else "it has none"
        raise ModelError(f"the text model needs exactly one column of kind 'text' in the schema ({have}); "
                         "declare the note column in the schema, e.g. {\"name\": \"note\", \"kind\": \"text\", "
                         "\"nullable\": true}, or train without text in --models")
    return cols[0]

def default_delta(n: int) -> float:
    """δ ≤ 1/(10·n) (DESIGN.md §3), rounded down to one significant digit."""
    d = 1.0 / (10 * n)
    exp = math.floor(math.log10(d))
    return math.floor(d / 10**exp) * 10**exp


def check_privacy_args(epsilon: float | None, delta: float, n: int, non_private: bool) -> None:
    if not non_private:
        if epsilon is None or not math.isfinite(epsilon) or epsilon <= 0:
            raise PrivacyParameterError(f"--epsilon must be a positive finite number, got {epsilon}")
    if not (0 < delta < 1):
        raise PrivacyParameterError(f"--delta must be in (0, 1), got {delta}")
    if delta >= 1.0 / n:
        raise PrivacyParameterError(
            f"--delta {delta:g} is ≥ 1/n = {1.0 / n:.3g} for n={n} patients: such a δ allows releasing a "
            f"whole record. Use δ ≤ 1/(10·n) = {1.0 / (10 * n):.3g}."
        )
    if delta > 1.0 / (10 * n):
        warnings.warn(
            f"δ={delta:g} is above the recommended 1/(10·n) = {1.0 / (10 * n):.3g} for n={n}", stacklevel=2
        )


def schema_accountant(schema: Schema) -> SiteAccountant:
    """The spend already made on this data by DP schema inference (counted inside --epsilon)."""
    acc = SiteAccountant()
    sp = schema.dp_spend
    if sp:
        for m in sp.get("mechanisms", []):
            acc.add(Mechanism(**m))
        acc.add_extra_delta(float(sp.get("extra_delta", 0.0)))
    return acc


def make_plan(
    *, n: int, epsilon: float | None, delta: float, config: TrainConfig, prior: SiteAccountant, non_private: bool,
    text_n: int = 0,
) -> Plan:
    if config.models is None:  # no schema here: the record models (``train`` resolves the default first)
        config = replace(config, models=RECORD_MODELS)
    if n < config.batch_size:
        raise DataError(
            f"the data has {n} rows, fewer than one expected batch ({config.batch_size}); "
            "DP-SGD needs many batches — use a smaller --batch-size or more data"
        )
    if config.epochs < 1:
        raise PrivacyParameterError(f"--epochs must be ≥ 1, got {config.epochs}")
    steps_per_epoch = math.ceil(n / config.batch_size)
    q = 1.0 / steps_per_epoch  # exactly what Opacus' Poisson loader samples with
    planned = steps_per_epoch * config.epochs
    flow_steps = steps_per_epoch * config.flow.epochs if "flow" in config.models else 0
    if "flow" in config.models and config.flow.epochs < 1:
        raise PrivacyParameterError(f"--flow-epochs must be ≥ 1, got {config.flow.epochs}")
    tq, t_spe, text_steps = None, 0, 0
    if "text" in config.models:
        if config.text.epochs < 1:
            raise PrivacyParameterError(f"--text-epochs must be ≥ 1, got {config.text.epochs}")
        if text_n < config.text.batch_size:
            raise DataError(
                f"only {text_n} patients have a note, fewer than one expected text batch ({config.text.batch_size}); "
                "DP-SGD needs many batches — use a smaller --text-batch-size (e.g. the number of notes / 16) or more notes"
            )
        t_spe = math.ceil(text_n / config.text.batch_size)
        tq = 1.0 / t_spe  # Opacus' Poisson rate for this loader (≈ batch / n_notes)
        text_steps = t_spe * config.text.epochs
    text_fields = dict(text_n=text_n, text_sample_rate=tq, text_steps_per_epoch=t_spe, text_steps=text_steps)
    if non_private:
        return Plan(n, q, steps_per_epoch, planned, None, None, flow_steps, None, **text_fields)
    acc = prior.copy()
    sel_sigma = None
    if config.select and config.checkpoints > 1:
        share = config.selection_share
        if not 0 < share < 1:
            raise PrivacyParameterError(f"selection share must be in (0, 1), got {share}")
        sel_sigma = calibrate_noise(
            target_epsilon=epsilon * share, delta=delta, sample_rate=1.0, steps=1, mechanism=selection.MECHANISM
        )
        acc.add(Mechanism(selection.MECHANISM, sel_sigma, 1.0, 1))
    parts = [(CRITIC_MECHANISM, q, planned, config.budget_shares["wgan"])]
    if flow_steps:
        parts.append((FLOW_MECHANISM, q, flow_steps, config.budget_shares["flow"]))
    if text_steps:
        parts.append((TEXT_MECHANISM, tq, text_steps, config.budget_shares["text"]))
    sigmas = calibrate_split(target_epsilon=epsilon, delta=delta, parts=parts, prior=acc)
    by_name = {name: s for (name, *_), s in zip(parts, sigmas)}
    return Plan(n, q, steps_per_epoch, planned, sigmas[0], sel_sigma, flow_steps, by_name.get(FLOW_MECHANISM),
                **text_fields, text_noise=by_name.get(TEXT_MECHANISM))


# ------------------------------------------------------------------------------------------------
# state on disk (safetensors + JSON; never pickle)
# ------------------------------------------------------------------------------------------------

def _flatten_optimizer(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.{pid}.{k}"] = v.contiguous()
                meta["state"][str(pid)][k] = "tensor"
            else:
                meta["state"][str(pid)][k] = v
    return tensors, meta


def _unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict, prefix: str) -> None:
    state = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {k: (tensors[f"{prefix}.{pid}.{k}"] if v == "tensor" else v) for k, v in st.items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_weights(module: torch.nn.Module, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def load_weights(module: torch.nn.Module, path: Path) -> None:
    if not path.exists():
        raise ModelError(f"{path} is missing")
    try:
        module.load_state_dict(load_file(str(path)))
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise ModelError(f"{path}: cannot load weights ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    out: Path
    epsilon: float | None
    delta: float
    steps: int
    seconds: float
    manifest: dict


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", desc="DP training", dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(**postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(
    df: pd.DataFrame,
    schema: Schema,
    *,
    out: str | os.PathLike,
    epsilon: float | None,
    delta: float | None = None,
    config: TrainConfig | None = None,
    non_private: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    data_path: str | None = None,
    data_sha256: str | None = None,
    seed: int | None = None,
    progress: bool = True,
    epoch_callback: Callable[[int, SiteAccountant], None] | None = None,
    flow_epoch_callback: Callable[[int, SiteAccountant], None] | None = None,
    text_epoch_callback: Callable[[int, SiteAccountant], None] | None = None,
) -> TrainResult:
    """Train on a frame already validated against ``schema``; write the model directory ``out``.

    ``seed`` seeds model initialisation and sampling noise of the *generator*; DP noise and Poisson sampling
    always draw from fresh OS entropy unless a seed is given, which only tests and --non-private runs may do.
    """
    out = Path(out)
    config = resolve_models(config or TrainConfig(), schema)
    schema.require_reviewed()
    work = out / ".work"
    manifest_path = out / "manifest.json"

    if resume:
        if not (work / "state.json").exists():
            raise ModelError(f"{out}: nothing to resume (no {work / 'state.json'})")
        st = read_json(work / "state.json", "resume state")
        config = TrainConfig.from_json(st["config"])
        epsilon, delta, non_private = st["target_epsilon"], st["delta"], st["non_private"]
        if st["schema_sha256"] != schema.hash():
            raise ModelError(f"{out}: the schema changed since training started; cannot resume")
        if data_sha256 and st["data_sha256"] and data_sha256 != st["data_sha256"]:
            raise ModelError(f"{out}: the data file changed since training started; cannot resume")
    else:
        if out.exists() and any(out.iterdir()):
            if not overwrite:
                raise ModelError(
                    f"output {out} already exists and is not empty (pass --overwrite to replace it, or --resume)"
                )
            shutil.rmtree(out)
        st = None

    encoder = Encoder(schema)
    x_np, clipped = encoder.transform(df)
    n = len(x_np)
    if delta is None:
        delta = default_delta(n)
    check_privacy_args(epsilon, delta, n, non_private)
    note_col, raw_notes = None, None
    if "text" in config.models:
        note_col = text_column(schema)
        if note_col not in df.columns:
            raise DataError(f"the schema's text column {note_col!r} is not in the data: the text model needs the notes "
                            f"(add the column, or train without text in --models)")
        raw_notes = [None if _missing(v) else v for v in df[note_col].tolist()]
    text_n = sum(v is not None for v in raw_notes) if raw_notes is not None else 0
    prior = schema_accountant(schema)
    plan = make_plan(n=n, epsilon=epsilon, delta=delta, config=config, prior=prior, non_private=non_private,
                     text_n=text_n)

    if seed is not None:
        torch.manual_seed(seed)
    noise_gen = torch.Generator()
    noise_gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))
    sample_gen = torch.Generator()
    sample_gen.manual_seed((seed + 1) if seed is not None else int.from_bytes(os.urandom(8), "little"))

    w = config.wgan
    generator = Generator(w.latent_dim, w.gen_hidden, encoder.dim)
    ema = Generator(w.latent_dim, w.gen_hidden, encoder.dim) if w.ema_decay > 0 else None
    if ema is not None:
        ema.load_state_dict(generator.state_dict())
    critic = Critic(encoder.dim, w.critic_hidden)
    g_opt = torch.optim.Adam(generator.parameters(), lr=w.gen_lr, betas=w.betas)
    c_opt = torch.optim.Adam(critic.parameters(), lr=w.critic_lr, betas=w.betas)

    accountant = prior.copy()
    if plan.selection_noise is not None:
        # reserved up front: the selection mechanism runs at the end, but its share is never given to SGD
        accountant.add(Mechanism(selection.MECHANISM, plan.selection_noise, 1.0, 1))
    start_epoch = 0
    snapshots: dict[int, Path] = {}
    losses: list[dict] = []
    if st is not None:
        load_weights(generator, work / "generator.safetensors")
        if ema is not None:
            load_weights(ema, work / "generator_ema.safetensors")
        load_weights(critic, work / "critic.safetensors")
        opt_t = load_file(str(work / "optimizers.safetensors"))
        _unflatten_optimizer(g_opt, opt_t, st["g_opt"], "g")
        _unflatten_optimizer(c_opt, opt_t, st["c_opt"], "c")
        accountant = SiteAccountant.from_state(st["accountant"])
        start_epoch = st["epochs_done"]
        snapshots = {int(k): Path(v) for k, v in st["snapshots"].items()}
        losses = st["losses"]
        if plan.noise_multiplier is not None and abs(st["noise_multiplier"] - plan.noise_multiplier) > 1e-9:
            raise ModelError(f"{out}: recalibrated noise differs from the interrupted run's; cannot resume safely")
        if plan.flow_noise is not None and abs(st.get("flow_noise", -1.0) - plan.flow_noise) > 1e-9:
            raise ModelError(f"{out}: recalibrated flow noise differs from the interrupted run's; cannot resume safely")
        if plan.text_noise is not None and abs(st.get("text_noise", -1.0) - plan.text_noise) > 1e-9:
            raise ModelError(f"{out}: recalibrated text noise differs from the interrupted run's; cannot resume safely")

    work.mkdir(parents=True, exist_ok=True)
    (work / "snapshots").mkdir(exist_ok=True)
    t0 = time.time()
    prev_seconds = st["seconds"] if st else 0.0
    bar = _Progress(plan.planned_steps + plan.flow_steps + plan.text_steps, progress)

    def poisson_wiring(module, optimizer, criterion, dataset, batch_size, noise, sample_rate, what, clip):
        """(module, optimizer, criterion, Poisson loader) for one model: Opacus (clipping + noise) when private,
        the same Poisson batches and the plain module / optimizer (criterion None) when not."""
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, generator=sample_gen)
        if non_private:
            from opacus.data_loader import DPDataLoader

            out = (module, optimizer, None, DPDataLoader.from_data_loader(loader, generator=sample_gen))
        elif isinstance(module, NoteLM):  # its own wiring: two-group clipping (TextConfig.cond_clip_share)
            out = make_private_text(model=module, optimizer=optimizer, loader=loader, noise_multiplier=noise,
                                    max_grad_norm=clip, noise_generator=noise_gen)
        else:
            out = make_private(module=module, optimizer=optimizer, criterion=criterion, loader=loader,
                               noise_multiplier=noise, max_grad_norm=clip, noise_generator=noise_gen)
        if abs(out[3].sample_rate - sample_rate) > 1e-12:
            raise RuntimeError(f"{what} sampling rate mismatch: loader {out[3].sample_rate} vs plan {sample_rate}")
        return out

    def step_guard(mechanism: str, noise, sample_rate, planned: int):
        """(may_step, stepped) for one model's loop: never a step the calibration did not plan for; every step
        recorded in the accountant (DP runs) and the progress bar."""
        def may_step() -> bool:
            return non_private or sum(m.steps for m in accountant.history if m.mechanism == mechanism) < planned

        def stepped() -> None:
            if not non_private:
                accountant.step(mechanism, noise_multiplier=noise, sample_rate=sample_rate)
            bar.update(1)

        return may_step, stepped

    def save_before_wgan(flow_epochs: int, text_epochs: int) -> None:
        """Resume state during the flow / text phases (the WGAN has not started: its initial weights)."""
        _save_resume_state(
            work, seconds=time.time() - t0 + prev_seconds, generator=generator, ema=ema, critic=critic,
            g_opt=g_opt, c_opt=c_opt, accountant=accountant, epochs_done=0, config=config,
            epsilon=epsilon, delta=delta, non_private=non_private, schema=schema,
            data_sha256=data_sha256, plan=plan, snapshots={}, losses=[],
            flow=flow, flow_opt=flow_opt, flow_epochs_done=flow_epochs, flow_losses=flow_losses,
            text=text, text_opt=text_opt, text_epochs_done=text_epochs, text_losses=text_losses,
        )

    def run_phase(start: int, total: int, label: str, losses: list, save, callback, one_epoch) -> int:
        """Epochs ``start``..``total`` of one model: mean loss per epoch, resume state saved after each, the
        caller's callback told. Returns the epochs done."""
        try:
            for e in range(start, total):
                ls = one_epoch()
                losses.append(float(np.nanmean(ls)) if ls and not np.isnan(ls).all() else float("nan"))
                bar.update(0, **{label: f"{e + 1}/{total}"}, nll=f"{losses[-1]:.3f}")
                save(e + 1)
                if callback is not None:
                    callback(e + 1, accountant)
        except BaseException:
            bar.close()
            raise
        return max(start, total)

    # ---- phase 1: the vitals flow (DP-SGD, its own mechanism in the same accountant) ---------------
    flow = flow_opt = None
    flow_losses: list[float] = []
    text = text_opt = tok = None  # phase 2's model: named here because save_before_wgan reads it in phase 1
    text_losses: list[float] = []
    flow_done = 0
    if plan.flow_steps:
        flow, codec = new_flow(schema, encoder, config.flow)
        flow_opt = torch.optim.Adam(flow.parameters(), lr=config.flow.lr)
        if st is not None:
            flow_done = st.get("flow_epochs_done", 0)
            load_weights(flow, work / "flow.safetensors")
            _unflatten_optimizer(flow_opt, load_file(str(work / "flow_optimizer.safetensors")), st["flow_opt"], "f")
            flow_losses = st.get("flow_losses", [])
        bar.update(flow_done * plan.steps_per_epoch)
        if flow_done < config.flow.epochs:
            u, obs, c = codec.encode(df, x_np)
            fds = torch.utils.data.TensorDataset(torch.from_numpy(u), torch.from_numpy(obs), torch.from_numpy(c))
            train_flow, f_opt, f_crit, f_loader = poisson_wiring(
                flow, flow_opt, PerSampleLoss(), fds, config.batch_size, plan.flow_noise, plan.sample_rate, "flow",
                clip_norm(config, "flow"))
            dequant = torch.Generator()
            dequant.manual_seed(int.from_bytes(os.urandom(8), "little") if seed is None else seed + 2)

            flow_may_step, flow_stepped = step_guard(FLOW_MECHANISM, plan.flow_noise, plan.sample_rate, plan.flow_steps)
            flow_done = run_phase(
                flow_done, config.flow.epochs, "flow_epoch", flow_losses, lambda d: save_before_wgan(d, 0),
                flow_epoch_callback,
                lambda: flow_epoch(flow=train_flow, optimizer=f_opt, criterion=f_crit, loader=f_loader, codec=codec,
                                   dequant=dequant, private=not non_private, may_step=flow_may_step,
                                   stepped=flow_stepped))
            flow_opt = f_opt

    # ---- phase 2: the note model (DP-SGD over the patients with a note, same accountant) ------------
    text_done = 0
    note_counts = canary_doc = None
    if plan.text_steps:
        tok = NoteTokenizer.from_schema(schema, max_len=config.text.max_len)
        text = NoteLM.for_tokenizer(tok, config.text)
        text_opt = torch.optim.Adam(text.parameters(), lr=config.text.lr)
        if config.canaries:
            canary_doc = _canaries(work, config.canaries, raw_notes, seed=seed, resume=st is not None)
        if st is not None and st.get("text_epochs_done", 0) > 0:
            text_done = st["text_epochs_done"]
            load_weights(text, work / "text.safetensors")
            _unflatten_optimizer(text_opt, load_file(str(work / "text_optimizer.safetensors")), st["text_opt"], "t")
            text_losses = st.get("text_losses", [])
        notes_used = list(raw_notes)
        for c in (canary_doc or {}).get("canaries", []):
            for h in c["hosts"]:
                notes_used[h] = c["text"]
        rows = df.reset_index(drop=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            counted = tok.encode(rows, raw_notes)  # the data as given (before any canary is planted)
            enc = tok.encode(rows, notes_used) if canary_doc else counted
        note_counts = {"column": note_col, "label": schema[note_col].description or None, **counted.counts(),
                       "trained_on": int(enc.present.sum()),
                       "handling": "missing notes dropped from the text dataset; empty notes kept; notes longer "
                                   f"than max_len {tok.max_len} tokens truncated at a character boundary; invalid "
                                   "UTF-8 replaced by U+FFFD"}
        if canary_doc:
            note_counts["canary_notes_planted"] = sum(len(c["hosts"]) for c in canary_doc["canaries"])
        if counted.truncated:
            warnings.warn(f"{counted.truncated} of {len(rows)} notes in {note_col!r} were longer than the text model's "
                          f"{tok.max_len}-token window and were truncated (counted in the manifest)", stacklevel=2)
        del caught
        bar.update(text_done * plan.text_steps_per_epoch)
        if text_done < config.text.epochs:
            tds = torch.utils.data.TensorDataset(torch.from_numpy(enc.ids[enc.present]))
            train_text, t_opt, t_crit, t_loader = poisson_wiring(
                text, text_opt, PerSampleLoss(), tds, config.text.batch_size, plan.text_noise, plan.text_sample_rate,
                "text", clip_norm(config, "text"))

            text_may_step, text_stepped = step_guard(TEXT_MECHANISM, plan.text_noise, plan.text_sample_rate,
                                                     plan.text_steps)
            text_done = run_phase(
                text_done, config.text.epochs, "text_epoch", text_losses, lambda d: save_before_wgan(flow_done, d),
                text_epoch_callback,
                lambda: text_epoch(model=train_text, optimizer=t_opt, criterion=t_crit, loader=t_loader,
                                   private=not non_private, may_step=text_may_step, stepped=text_stepped))
            text_opt = t_opt

    # ---- phase 3: the WGAN -------------------------------------------------------------------------
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x_np))
    train_critic, c_opt, criterion, dp_loader = poisson_wiring(
        critic, c_opt, RealTermLoss(), dataset, config.batch_size, plan.noise_multiplier, plan.sample_rate, "critic",
        clip_norm(config, "wgan"))

    snap_epochs = sorted({max(1, round(config.epochs * (i + 1) / max(1, config.checkpoints))) for i in range(max(1, config.checkpoints))})
    bar.update(start_epoch * plan.steps_per_epoch)

    def sgd_steps() -> int:
        return sum(m.steps for m in accountant.history if m.mechanism == CRITIC_MECHANISM)

    try:
        for epoch in range(start_epoch, config.epochs):
            ep_losses = []
            for (real,) in dp_loader:
                if not non_private and sgd_steps() >= plan.planned_steps:
                    break  # never take a step the calibration did not plan for
                l = wgan_step(generator=generator, critic=train_critic, encoder=encoder, g_opt=g_opt, c_opt=c_opt,
                              criterion=criterion, real=real, config=w, batch_size=config.batch_size,
                              max_grad_norm=config.max_grad_norm)
                if not non_private:
                    accountant.step(CRITIC_MECHANISM, noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
                if ema is not None:
                    with torch.no_grad():
                        for pe, pg in zip(ema.parameters(), generator.parameters()):
                            pe.mul_(w.ema_decay).add_(pg, alpha=1 - w.ema_decay)
                ep_losses.append(l)
                bar.update(1)
            losses.append({k: float(np.mean([d[k] for d in ep_losses])) for k in ep_losses[0]} if ep_losses else {})
            # ε so far for the progress bar (a PRV computation costs ~0.2 s: about ten times per run)
            every = max(1, config.epochs // 10)
            if progress and ((epoch + 1) % every == 0 or epoch + 1 == config.epochs):
                eps_now = "n/a" if non_private else f"{accountant.epsilon(delta):.2f}"
                bar.update(0, epoch=f"{epoch + 1}/{config.epochs}", eps=eps_now)
            if epoch + 1 in snap_epochs:
                p = work / "snapshots" / f"generator_epoch{epoch + 1:04d}.safetensors"
                save_weights(ema if ema is not None else generator, p)
                snapshots[epoch + 1] = p
            _save_resume_state(
                work, seconds=time.time() - t0 + prev_seconds, generator=generator, ema=ema, critic=critic, g_opt=g_opt, c_opt=c_opt, accountant=accountant,
                epochs_done=epoch + 1, config=config, epsilon=epsilon, delta=delta, non_private=non_private,
                schema=schema, data_sha256=data_sha256, plan=plan, snapshots=snapshots, losses=losses,
                flow=flow, flow_opt=flow_opt, flow_epochs_done=flow_done, flow_losses=flow_losses,
                text=text, text_opt=text_opt, text_epochs_done=text_done, text_losses=text_losses,
            )
            if epoch_callback is not None:
                epoch_callback(epoch + 1, accountant)
    finally:
        bar.close()
    seconds = time.time() - t0 + prev_seconds

    # ---- checkpoint selection ------------------------------------------------------------------
    chosen_epoch = max(snapshots)
    selection_report = {"method": "last checkpoint (no selection)", "candidates": sorted(snapshots)}
    if plan.selection_noise is not None and len(snapshots) > 1:
        gens = {}
        for ep, p in sorted(snapshots.items()):
            g = Generator(w.latent_dim, w.gen_hidden, encoder.dim)
            load_weights(g, p)
            gens[ep] = g
        chosen_epoch, selection_report = selection.select_checkpoint(
            df, schema, encoder, gens, latent_dim=w.latent_dim, noise_multiplier=plan.selection_noise,
            profile=config.profile, generator=noise_gen,
        )
    elif non_private and config.select and len(snapshots) > 1:
        selection_report["method"] = "last checkpoint (selection is DP-only)"
    final_gen = Generator(w.latent_dim, w.gen_hidden, encoder.dim)
    load_weights(final_gen, snapshots[chosen_epoch])

    # ---- privacy check before anything is written ---------------------------------------------
    eps_final = eps_rdp = None
    if not non_private:
        eps_final = accountant.epsilon(delta)
        eps_rdp = accountant.epsilon_rdp(delta)
        if eps_final > epsilon * (1 + 1e-6):
            raise BudgetExceededError(f"internal error: final ε {eps_final:.4f} exceeds the target {epsilon}")

    # ---- write the model directory (manifest last: a dir without it is incomplete) -------------
    save_weights(final_gen, out / "generator.safetensors")
    files = ["generator.safetensors", "schema.json", "accountant.json"]
    if flow is not None:
        save_weights(flow, out / "flow.safetensors")
        files.insert(1, "flow.safetensors")
    if text is not None:
        save_weights(text, out / "text.safetensors")
        atomic_write_json(out / "tokenizer.json", tok.to_json())
        files[-2:-2] = ["text.safetensors", "tokenizer.json"]
        if canary_doc:
            atomic_write_json(out / "canaries.json", canary_doc)
            files.append("canaries.json")
    schema.save(out / "schema.json")
    atomic_write_json(out / "accountant.json", accountant.state_dict())
    sgd = [m for m in accountant.history if m.mechanism == CRITIC_MECHANISM]
    flow_sgd = [m for m in accountant.history if m.mechanism == FLOW_MECHANISM]
    per_model = {"wgan": {"mechanism": CRITIC_MECHANISM, "noise_multiplier": plan.noise_multiplier,
                          "sample_rate": plan.sample_rate, "steps": sum(m.steps for m in sgd),
                          "planned_steps": plan.planned_steps, "share": config.budget_shares["wgan"]}}
    if flow is not None:
        per_model["flow"] = {"mechanism": FLOW_MECHANISM, "noise_multiplier": plan.flow_noise,
                             "sample_rate": plan.sample_rate, "steps": sum(m.steps for m in flow_sgd),
                             "planned_steps": plan.flow_steps, "share": config.budget_shares["flow"]}
    if text is not None:
        text_sgd = [m for m in accountant.history if m.mechanism == TEXT_MECHANISM]
        per_model["text"] = {"mechanism": TEXT_MECHANISM, "noise_multiplier": plan.text_noise,
                             "sample_rate": plan.text_sample_rate, "steps": sum(m.steps for m in text_sgd),
                             "planned_steps": plan.text_steps, "share": config.budget_shares["text"],
                             "rows": plan.text_n, "batch_size": config.text.batch_size,
                             "sampling": "Poisson over the patients with a note, q = 1/ceil(n_notes/text batch size)",
                             "clipping": text_clipping(config.text)}
    for m, v in per_model.items():
        v["max_grad_norm"] = None if non_private else clip_norm(config, m)
    if not non_private:
        for v in per_model.values():  # what each model would cost alone (for reading the split; not additive)
            v["epsilon_alone"] = SiteAccountant([Mechanism(v["mechanism"], v["noise_multiplier"], v["sample_rate"],
                                                           v["steps"])]).epsilon(delta) if v["steps"] else 0.0
    privacy = {
        "differentially_private": not non_private,
        "statement": NOT_PRIVATE if non_private else PRIVACY_STATEMENT + (TEXT_STATEMENT if text is not None else ""),
        "unit": "patient",
        "adjacency": "add/remove one patient (one row per patient)",
        "epsilon": eps_final,
        "epsilon_rdp_crosscheck": eps_rdp,
        "target_epsilon": epsilon,
        "delta": delta,
        "accountant": ACCOUNTANT_NAME,
        "sampling": "Poisson (Opacus DPDataLoader), q = 1/ceil(n/batch_size)",
        "noise_multiplier": plan.noise_multiplier,
        "max_grad_norm": None if non_private else config.max_grad_norm,
        "sample_rate": plan.sample_rate,
        "steps": sum(m.steps for m in sgd),
        "planned_steps": plan.planned_steps,
        "models": per_model,
        "budget_split": {"rule": BUDGET_SPLIT_RULE, "shares": {m: config.budget_shares[m] for m in per_model}},
        "noise_rng": "torch generator seeded from os.urandom (Opacus secure_mode is not used: it needs "
        "torchcsprng, unmaintained since 2021)" if seed is None else f"SEEDED ({seed}): test/comparison only",
        "mechanisms": [asdict(m) for m in accountant.history],
        "extra_delta": accountant.extra_delta,
        "schema_spend": schema.dp_spend,
        "preprocessing": "public bounds from the schema" + (" (estimated with DP, spend included)" if schema.dp_spend else ""),
        "selection": selection_report,
    }
    if text is not None:
        privacy["tokenizer"] = tok.kind
    manifest = {
        "format": MODEL_FORMAT,
        "dpsynth_version": __version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "models": list(config.models),
        "schema_sha256": schema.hash(),
        "data": {"file": data_path, "sha256": data_sha256, "rows": n, "clipped_values": clipped,
                 **({"notes": note_counts} if note_counts is not None else {})},
        "privacy": privacy,
        "training": {
            "config": config.to_json(),
            "seconds": round(seconds, 2),
            "epochs": config.epochs,
            "selected_epoch": chosen_epoch,
            "epoch_losses": losses,
            "encoded_dim": encoder.dim,
            "flow_epoch_nll": flow_losses,
            **({"text_epoch_nll": text_losses} if text is not None else {}),
        },
        "files": {name: sha256_file(out / name) for name in files},
    }
    ledger = Ledger(out / "ledger.jsonl")
    ledger.append("train", {"epsilon": eps_final, "delta": delta, "steps": privacy["steps"],
                            "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
                            "model": "+".join(config.models), "models": per_model, "private": not non_private})
    manifest["ledger_head"] = ledger.head()
    atomic_write_json(manifest_path, manifest)
    shutil.rmtree(work, ignore_errors=True)
    return TrainResult(out, eps_final, delta, privacy["steps"], seconds, manifest)


def _save_resume_state(work: Path, *, seconds, generator, ema, critic, g_opt, c_opt, accountant, epochs_done, config, epsilon,
                       delta, non_private, schema, data_sha256, plan, snapshots, losses, flow=None, flow_opt=None,
                       flow_epochs_done=0, flow_losses=(), text=None, text_opt=None, text_epochs_done=0,
                       text_losses=()) -> None:
    flow_meta = text_meta = None
    if text is not None and text_epochs_done > 0:  # weights + optimizer first, then state.json names them
        save_weights(getattr(text, "_module", text), work / "text.safetensors")
        tt, text_meta = _flatten_optimizer(getattr(text_opt, "original_optimizer", text_opt), "t")
        tmp = work / ".text_optimizer.safetensors.tmp"
        save_file(tt, str(tmp))
        os.replace(tmp, work / "text_optimizer.safetensors")
    if flow is not None:  # written before state.json: the state never names a file that is not there yet
        save_weights(getattr(flow, "_module", flow), work / "flow.safetensors")
        ft, flow_meta = _flatten_optimizer(getattr(flow_opt, "original_optimizer", flow_opt), "f")
        tmp = work / ".flow_optimizer.safetensors.tmp"
        save_file(ft, str(tmp))
        os.replace(tmp, work / "flow_optimizer.safetensors")
    save_weights(generator, work / "generator.safetensors")
    if ema is not None:
        save_weights(ema, work / "generator_ema.safetensors")
    plain_critic = getattr(critic, "_module", critic)
    save_weights(plain_critic, work / "critic.safetensors")
    inner_c = getattr(c_opt, "original_optimizer", c_opt)
    gt, gmeta = _flatten_optimizer(g_opt, "g")
    ct, cmeta = _flatten_optimizer(inner_c, "c")
    tmp = work / ".optimizers.safetensors.tmp"
    save_file({**gt, **ct}, str(tmp))
    os.replace(tmp, work / "optimizers.safetensors")
    atomic_write_json(work / "state.json", {
        "epochs_done": epochs_done,
        "config": config.to_json(),
        "target_epsilon": epsilon,
        "delta": delta,
        "non_private": non_private,
        "schema_sha256": schema.hash(),
        "data_sha256": data_sha256,
        "noise_multiplier": plan.noise_multiplier,
        "accountant": accountant.state_dict(),
        "snapshots": {str(k): str(v) for k, v in snapshots.items()},
        "losses": losses,
        "g_opt": gmeta,
        "c_opt": cmeta,
        "seconds": seconds,
        "flow_noise": plan.flow_noise,
        "flow_epochs_done": flow_epochs_done,
        "flow_losses": list(flow_losses),
        "flow_opt": flow_meta,
        "text_noise": plan.text_noise,
        "text_epochs_done": text_epochs_done,
        "text_losses": list(text_losses),
        "text_opt": text_meta,
    })


def _missing(v) -> bool:
    if v is None:
        return True
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):  # e.g. array-like cells
        return False


def _canaries(work: Path, per_count: int, notes: list, *, seed: int | None, resume: bool) -> dict:
    """Plant (or, on resume, reload) the secret-sharer canaries: ``per_count`` canaries per repetition count in
    audits.text.COUNTS plus as many never-planted controls. Hosts are row positions among the patients with a note.
    Written to ``work/canaries.json`` before the first text step, so a resumed run trains on the same notes."""
    from audits.text import COUNTS, plant_canaries

    path = work / "canaries.json"
    if resume and path.exists():
        return read_json(path, "canaries")
    present = [i for i, v in enumerate(notes) if v is not None]
    need = per_count * sum(COUNTS)
    if need > len(present):
        raise DataError(f"--canaries {per_count} needs {need} notes to replace, the data has {len(present)}")
    secret_seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little")
    cans, _ = plant_canaries(pd.Series(notes, dtype=object)[present], per_count, secret_seed)
    doc = {"warning": CANARY_WARNING, "counts": list(COUNTS), "per_count": per_count,
           "hosts_are": "row positions in the training data",
           "canaries": [{"secret": c.secret, "count": c.count, "text": c.text, "hosts": [int(h) for h in c.hosts]}
                        for c in cans]}
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, doc)
    return doc


def load_model(model_dir: str | os.PathLike) -> tuple[dict, Schema, Generator, Encoder]:
    model_dir = Path(model_dir)
    mpath = model_dir / "manifest.json"
    if not mpath.exists():
        hint = " (training did not finish: run `dpsynth train --resume`)" if (model_dir / ".work").exists() else ""
        raise ModelError(f"{model_dir} is not a complete dpsynth model: no manifest.json{hint}")
    manifest = read_json(mpath, "model manifest")
    if manifest.get("format") != MODEL_FORMAT:
        raise ModelError(f"{mpath}: unknown model format {manifest.get('format')!r}")
    for name, digest in manifest.get("files", {}).items():
        p = model_dir / name
        if not p.exists():
            raise ModelError(f"{model_dir}: {name} is missing")
        if sha256_file(p) != digest:
            raise ModelError(f"{model_dir}: {name} does not match the manifest's SHA-256 (modified?)")
    schema = Schema.load(model_dir / "schema.json")
    enc = Encoder(schema)
    w = TrainConfig.from_json(manifest["training"]["config"]).wgan
    gen = Generator(w.latent_dim, w.gen_hidden, enc.dim)
    load_weights(gen, model_dir / "generator.safetensors")
    return manifest, schema, gen, enc


def load_flow(model_dir: str | os.PathLike, manifest: dict, schema: Schema, encoder: Encoder):
    """The vitals flow of a model directory already checked by ``load_model``; (None, None) without one."""
    if "flow" not in manifest.get("models", []):
        return None, None
    flow, codec = new_flow(schema, encoder, TrainConfig.from_json(manifest["training"]["config"]).flow)
    load_weights(flow, Path(model_dir) / "flow.safetensors")
    return flow, codec


def load_text(model_dir: str | os.PathLike, manifest: dict, schema: Schema):
    """(note model, tokenizer, text column) of a model directory already checked by ``load_model``;
    (None, None, None) without a note model."""
    if "text" not in manifest.get("models", []):
        return None, None, None
    model_dir = Path(model_dir)
    tok = NoteTokenizer.from_json(read_json(model_dir / "tokenizer.json", "tokenizer"))
    cfg = TrainConfig.from_json(manifest["training"]["config"]).text
    model = NoteLM.for_tokenizer(tok, cfg)
    load_weights(model, model_dir / "text.safetensors")
    model.eval()
    return model, tok, text_column(schema)
