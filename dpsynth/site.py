"""One hospital's side of the consortium: its policy, its persisted accountant and ledger, one DP round.

Never imports flwr: the Flower ClientApp (client/) is a thin adapter over this module, and everything here
can be used and tested without Flower.

What lives in the site directory (``site-dir``, owned by the hospital):
  state.json    the site's accountant (JSON, composes *every* mechanism ever run on this site's patients),
                the current run's plan (σ calibrated up front) and the rounds done — written atomically
  ledger.jsonl  hash-chained budget ledger: plan, reserve (= charge), round-complete, refusals, audits

The models (request ``models``; the site trains the ones its policy allows, or refuses the run):
  wgan  the structured record (DP-SGD of the critic)                     mechanism dp-sgd:wgan-critic
  flow  the record's continuous measurements given the record            mechanism dp-sgd:flow
  text  a note conditioned on the record (needs the schema's one ``text`` column, ``allow_notes = true`` and
        "text" in ``allowed_models``)                                      mechanism dp-sgd:text
All three train in the same rounds and are charged to the same accountant. The note model samples its own
Poisson batches over the patients that have a note: q_text = 1/⌈n_notes/text_batch⌉, and it takes
⌈text_epochs × ⌈n_notes/text_batch⌉ / rounds⌉ steps per round, so ``text_epochs`` is the note model's
epochs over the whole run (as in ``dpsynth train``), spread evenly over the rounds.

What a site discloses besides DP outputs (public metadata, as in the standard DP-SGD analysis): its number
of training patients to within one batch (q = 1/⌈n/batch⌉ in its plan, its FedAvg weight) and, when it
trains the note model, its number of patients with a note to within one text batch (q_text, the note
model's FedAvg weight). Never an exact count, never anything about a patient's record.

Budget governance (DESIGN.md §3):
  * the site's cap is ``min(consortium request, site policy max_epsilon)`` — the server cannot make a site
    spend more than its own policy allows;
  * σ is calibrated once per run for rounds × local epochs × steps per epoch, on top of what the site has
    already spent (the accountant is created once and persisted, never rebuilt per round);
  * before every round the round's steps are **charged** to the accountant and written to disk (the
    reservation), and a round that would cross the cap is refused. A crash after the reservation leaves
    the accountant charged for the whole round (an upper bound on what was spent), so the ledger stays
    consistent and a restarted site resumes with at least its real spend.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tomllib
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .errors import BudgetExceededError, DataError, DpsynthError, PrivacyParameterError
from .io_utils import atomic_write_json, read_json, sha256_file
from .models.flow import FlowConfig, flow_epoch, make_private_flow, new_flow
from .models.text import NoteLM, NoteTokenizer, TextConfig, make_private_text, text_epoch
from .models.wgan import Critic, Generator, WGANConfig, make_private_critic, wgan_step
from .preprocess import Encoder
from .privacy.accountant import ACCOUNTANT_NAME, Mechanism, SiteAccountant, calibrate_split
from .privacy.ledger import Ledger
from .schema import Schema, validate_frame
from .train import (CRITIC_MECHANISM, FLOW_MECHANISM, TEXT_MECHANISM, TrainConfig, check_privacy_args,
                    default_delta, text_column)

STATE_FORMAT = "dpsynth-site-state/1"
KNOWN_MODELS = ("wgan", "flow", "text")
IMPLEMENTED_MODELS = ("wgan", "flow", "text")


class SitePolicyError(DpsynthError):
    """The consortium asked for something this site's policy does not allow."""

    exit_code = 3


# ------------------------------------------------------------------------------------------------
# policy
# ------------------------------------------------------------------------------------------------

@dataclass
class SitePolicy:
    """The hospital's own rules. Stricter than the consortium's request wins."""

    max_epsilon: float
    delta: float | None = None  # None: 1/(10·n) rounded down (dpsynth.train.default_delta)
    allowed_models: list[str] = field(default_factory=lambda: ["wgan", "flow"])
    min_patients: int = 500
    # the hospital's switch for its clinical notes: only with allow_notes = true (and "text" in allowed_models)
    # does the note model train on them; "text" in allowed_models with allow_notes = false is contradictory
    allow_notes: bool = False
    holdout_fraction: float = 0.2  # share of the site's file kept out of training for the site's audits
    name: str = "site-policy"

    KEYS = ("max_epsilon", "delta", "allowed_models", "min_patients", "allow_notes", "holdout_fraction", "name")

    def __post_init__(self) -> None:
        where = f"site policy {self.name!r}"
        if not (isinstance(self.max_epsilon, (int, float)) and math.isfinite(self.max_epsilon) and self.max_epsilon > 0):
            raise SitePolicyError(f"{where}: max_epsilon must be a positive number, got {self.max_epsilon!r}")
        if self.delta is not None and not (0 < float(self.delta) < 1):
            raise SitePolicyError(f"{where}: delta must be in (0, 1), got {self.delta!r}")
        unknown = sorted(set(self.allowed_models) - set(KNOWN_MODELS))
        if unknown:
            raise SitePolicyError(f"{where}: unknown models {unknown} (known: {list(KNOWN_MODELS)})")
        if not isinstance(self.allow_notes, bool):
            raise SitePolicyError(f"{where}: allow_notes must be true or false, got {self.allow_notes!r}")
        if "text" in self.allowed_models and not self.allow_notes:
            raise SitePolicyError(f"{where}: allowed_models lists 'text' (the note model) but allow_notes is false; "
                                  "set allow_notes = true to let the note model train on this site's notes, or "
                                  "remove 'text' from allowed_models")
        if int(self.min_patients) != self.min_patients or self.min_patients < 1:
            raise SitePolicyError(f"{where}: min_patients must be a positive integer, got {self.min_patients!r}")
        if not 0 < self.holdout_fraction < 0.9:
            raise SitePolicyError(f"{where}: holdout_fraction must be in (0, 0.9), got {self.holdout_fraction!r}")

    @classmethod
    def from_dict(cls, d: dict, where: str = "policy") -> "SitePolicy":
        unknown = sorted(set(d) - set(cls.KEYS))
        if unknown:
            raise SitePolicyError(f"{where}: unknown keys {unknown} (known: {list(cls.KEYS)})")
        if "max_epsilon" not in d:
            raise SitePolicyError(f"{where}: max_epsilon is required")
        d = dict(d)
        d.setdefault("name", Path(where).stem)
        d["allowed_models"] = list(d.get("allowed_models", ["wgan", "flow"]))
        return cls(**d)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SitePolicy":
        path = Path(path)
        if not path.exists():
            raise SitePolicyError(f"site policy file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
            d = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SitePolicyError(f"{path}: cannot parse site policy ({e})") from None
        return cls.from_dict(d, str(path))

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.KEYS}


# ------------------------------------------------------------------------------------------------
# the consortium's request and the site's plan
# ------------------------------------------------------------------------------------------------

@dataclass
class RunRequest:
    run_id: str
    epsilon: float  # consortium request for the site's total ε (composition of everything on its data)
    rounds: int
    local_epochs: int
    batch_size: int
    models: list[str]
    delta: float | None = None  # None / 0: the site's default
    max_grad_norm: float = 1.0
    # the note model (only with "text" in models): its epochs over the whole run and its expected Poisson batch
    # over the patients with a note (None: TextConfig's defaults)
    text_epochs: int | None = None
    text_batch_size: int | None = None
    # each model's share of the privacy loss (TrainConfig.budget_shares; None: its defaults)
    budget_shares: dict | None = None

    def __post_init__(self) -> None:
        self.text_epochs = TextConfig().epochs if self.text_epochs is None else self.text_epochs
        self.text_batch_size = TextConfig().batch_size if self.text_batch_size is None else self.text_batch_size
        for k in ("rounds", "local_epochs", "batch_size") + (("text_epochs", "text_batch_size")
                                                             if "text" in self.models else ()):
            v = getattr(self, k)
            if int(v) != v or v < 1:
                raise PrivacyParameterError(f"{k} must be a positive integer, got {v!r}")
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise PrivacyParameterError(f"epsilon must be positive and finite, got {self.epsilon!r}")
        if not (self.max_grad_norm > 0):
            raise PrivacyParameterError(f"max_grad_norm must be positive, got {self.max_grad_norm!r}")
        if self.budget_shares:  # TrainConfig's own check: known models, positive finite shares
            TrainConfig(budget_shares={**TrainConfig().budget_shares, **self.budget_shares})


@dataclass
class SitePlan:
    run_id: str
    epsilon: float  # the site's target for this run: min(request, policy cap)
    requested_epsilon: float
    policy_cap: float
    delta: float
    rounds: int
    local_epochs: int
    batch_size: int
    steps_per_epoch: int
    steps_per_round: int
    planned_steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    prior_epsilon: float
    models: list[str]
    flow_noise_multiplier: float | None = None  # σ of the vitals flow's DP-SGD (None: no flow in this run)
    budget_shares: dict | None = None
    # the note model (None / 0: no note model in this run). Its dataset is the patients with a note, n_notes;
    # like the site size, n_notes is public metadata to within one text batch (text_steps_per_epoch =
    # ⌈n_notes/text_batch_size⌉); the exact count is never sent.
    text_noise_multiplier: float | None = None
    text_sample_rate: float | None = None  # 1/⌈n_notes/text_batch_size⌉
    text_batch_size: int = 0
    text_epochs: int = 0  # over the whole run
    text_steps_per_epoch: int = 0
    text_steps_per_round: int = 0  # ⌈text_epochs × text_steps_per_epoch / rounds⌉
    text_planned_steps: int = 0

    def public(self) -> dict:
        """What the site tells the coordinator (no record-level information; steps_per_epoch ≈ n/batch,
        text_steps_per_epoch ≈ n_notes/text batch)."""
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# one round of local DP training (reuses the single-site DP critic step)
# ------------------------------------------------------------------------------------------------

def _seed_from_os() -> int:
    return int.from_bytes(os.urandom(8), "little")


def local_dp_round(
    *,
    x: np.ndarray,
    encoder: Encoder,
    generator_state: dict[str, torch.Tensor] | None,
    critic_state: dict[str, torch.Tensor] | None,
    wgan: WGANConfig,
    epochs: int,
    batch_size: int,
    noise_multiplier: float,
    max_grad_norm: float,
    max_steps: int,
    seed: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int, list[dict]]:
    """Run ``epochs`` local epochs of DP-WGAN training from the given weights; never more than ``max_steps``
    DP steps. Returns (generator state, critic state, DP steps taken, per-epoch losses).

    The same wiring and step as dpsynth.train.train (models.wgan.make_private_critic + wgan_step): Poisson sampling
    (q = 1/⌈n/batch⌉), ghost clipping on the real term only, fake term added after the noise step
    (critic_step_dp). The engine's own accountant is not used: the caller's SiteAccountant is.
    ``seed`` is for tests only: DP noise and sampling draw from OS entropy otherwise.
    """
    if seed is not None:
        torch.manual_seed(seed)
    noise_gen = torch.Generator()
    noise_gen.manual_seed(seed if seed is not None else _seed_from_os())
    sample_gen = torch.Generator()
    sample_gen.manual_seed((seed + 1) if seed is not None else _seed_from_os())

    generator = Generator(wgan.latent_dim, wgan.gen_hidden, encoder.dim)
    critic = Critic(encoder.dim, wgan.critic_hidden)
    if generator_state is not None:
        generator.load_state_dict(generator_state)
    if critic_state is not None:
        critic.load_state_dict(critic_state)
    g_opt = torch.optim.Adam(generator.parameters(), lr=wgan.gen_lr, betas=wgan.betas)
    c_opt = torch.optim.Adam(critic.parameters(), lr=wgan.critic_lr, betas=wgan.betas)

    dataset = torch.utils.data.TensorDataset(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, generator=sample_gen)
    train_critic, c_opt, criterion, dp_loader = make_private_critic(
        critic=critic, optimizer=c_opt, loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, noise_generator=noise_gen,
    )
    steps = 0
    losses: list[dict] = []
    for _ in range(epochs):
        ep = []
        for (real,) in dp_loader:
            if steps >= max_steps:
                break  # never take a step the reservation did not charge
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep.append(wgan_step(generator=generator, critic=train_critic, encoder=encoder, g_opt=g_opt,
                                    c_opt=c_opt, criterion=criterion, real=real, config=wgan,
                                    batch_size=batch_size, max_grad_norm=max_grad_norm))
            steps += 1
        if ep:
            losses.append({k: float(np.mean([d[k] for d in ep])) for k in ep[0]})
    g_state = {k: v.detach().clone().contiguous() for k, v in generator.state_dict().items()}
    c_state = {k: v.detach().clone().contiguous() for k, v in critic.state_dict().items()}
    return g_state, c_state, steps, losses


def local_flow_round(*, df: pd.DataFrame, schema: Schema, encoder: Encoder, x: np.ndarray, flow_state: dict | None,
                     config: FlowConfig, epochs: int, batch_size: int, noise_multiplier: float, max_grad_norm: float,
                     max_steps: int, seed: int | None = None) -> tuple[dict, int, list[float]]:
    """``epochs`` local epochs of DP training of the vitals flow from the given weights (the same wiring and step
    as dpsynth.train: models.flow.make_private_flow + flow_epoch); never more than ``max_steps`` DP steps.
    Returns (flow state, DP steps taken, per-epoch mean NLL)."""
    if seed is not None:
        torch.manual_seed(seed)
    flow, codec = new_flow(schema, encoder, config, flow_state)
    gens = []
    for k in range(3):  # noise, Poisson sampling, dequantisation
        g = torch.Generator()
        g.manual_seed(seed + k if seed is not None else _seed_from_os())
        gens.append(g)
    u, obs, c = codec.encode(df, x)
    ds = torch.utils.data.TensorDataset(torch.from_numpy(u), torch.from_numpy(obs), torch.from_numpy(c))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, generator=gens[1])
    model, opt, crit, dp_loader = make_private_flow(
        flow=flow, optimizer=torch.optim.Adam(flow.parameters(), lr=config.lr), loader=loader,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, noise_generator=gens[0])
    taken = [0]

    def stepped() -> None:
        taken[0] += 1

    losses = []
    for _ in range(epochs):
        ls = flow_epoch(flow=model, optimizer=opt, criterion=crit, loader=dp_loader, codec=codec, dequant=gens[2],
                        private=True, may_step=lambda: taken[0] < max_steps, stepped=stepped)
        if ls:
            losses.append(float(np.nanmean(ls)))
    state = {k: v.detach().clone().contiguous() for k, v in flow.state_dict().items()}
    return state, taken[0], losses


def note_values(df: pd.DataFrame, column: str) -> list:
    """The note of every row, None where it is missing (those patients are not in the note model's dataset)."""
    def missing(v) -> bool:
        try:
            return v is None or bool(pd.isna(v))
        except (TypeError, ValueError):
            return False

    return [None if missing(v) else v for v in df[column].tolist()]


def text_steps_per_epoch(n_notes: int, batch_size: int) -> int:
    """⌈n_notes/batch⌉: the note model's Poisson rate is its inverse (exactly what Opacus' loader samples)."""
    return math.ceil(n_notes / batch_size)


def local_text_round(*, df: pd.DataFrame, schema: Schema, column: str, text_state: dict | None, config: TextConfig,
                     batch_size: int, sample_rate: float, noise_multiplier: float, max_grad_norm: float,
                     max_steps: int, seed: int | None = None) -> tuple[dict, int, list[float]]:
    """DP training of the note model from the given weights for exactly ``max_steps`` Poisson steps (the round's
    reserved steps; passes over the notes are repeated or cut short to get there, never a step more).

    The same wiring and step as dpsynth.train's note phase: NoteTokenizer.from_schema (byte-level + public
    condition tokens; nothing fitted on the notes) → NoteLM.for_tokenizer(tok, config) → make_private_text
    (per-patient clipping of the whole note; TextConfig.grad_sample_mode, hooks by default) → text_epoch, over
    the patients of ``df`` that have a note (Poisson rate ``sample_rate`` = 1/⌈n_notes/batch_size⌉, checked against
    the loader's). ``config.batch_size`` is not used: ``batch_size`` is the planned one. Returns (note model state,
    DP steps taken, mean NLL per pass over the notes)."""
    if seed is not None:
        torch.manual_seed(seed)
    tok = NoteTokenizer.from_schema(schema, max_len=config.max_len)
    model = NoteLM.for_tokenizer(tok, config)
    if text_state is not None:
        model.load_state_dict(text_state)
    gens = []
    for k in range(2):  # noise, Poisson sampling
        g = torch.Generator()
        g.manual_seed(seed + k if seed is not None else _seed_from_os())
        gens.append(g)
    with warnings.catch_warnings():  # truncated / replaced notes are counted by the tokenizer, not shown here
        warnings.simplefilter("ignore")
        enc = tok.encode(df.reset_index(drop=True), note_values(df, column))
    ids = np.ascontiguousarray(enc.ids[enc.present])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(ids)), batch_size=batch_size,
                                         generator=gens[1])
    train_text, opt, crit, dp_loader = make_private_text(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=config.lr), loader=loader,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, noise_generator=gens[0])
    if abs(dp_loader.sample_rate - sample_rate) > 1e-12:
        raise DpsynthError(f"note model sampling rate mismatch: loader {dp_loader.sample_rate} vs plan {sample_rate}")
    taken = [0]

    def stepped() -> None:
        taken[0] += 1

    losses: list[float] = []
    while taken[0] < max_steps:
        ls = text_epoch(model=train_text, optimizer=opt, criterion=crit, loader=dp_loader, private=True,
                        may_step=lambda: taken[0] < max_steps, stepped=stepped)
        if not ls:
            break
        finite = [v for v in ls if not math.isnan(v)]
        losses.append(float(np.mean(finite)) if finite else float("nan"))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return state, taken[0], losses


# ------------------------------------------------------------------------------------------------
# the site
# ------------------------------------------------------------------------------------------------

class Site:
    """A hospital's node state. Create one per message (it reloads everything from ``site_dir``)."""

    def __init__(
        self,
        site_dir: str | os.PathLike,
        *,
        name: str,
        data_path: str | os.PathLike,
        schema_path: str | os.PathLike | None = None,
        policy: SitePolicy | None = None,
        holdout_path: str | os.PathLike | None = None,
    ):
        self.name = name
        self.dir = Path(site_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_path = Path(data_path)
        if not self.data_path.exists():
            raise DataError(f"site {name!r}: data file {self.data_path} does not exist")
        self.schema_path = Path(schema_path) if schema_path else self.data_path.parent / "schema.json"
        if not self.schema_path.exists():
            raise DataError(f"site {name!r}: schema file {self.schema_path} does not exist")
        if policy is None:
            warnings.warn(f"site {name!r}: no site policy given; using max_epsilon = 3", stacklevel=2)
            policy = SitePolicy(max_epsilon=3.0, name="default-site-policy")
        self.policy = policy
        self.holdout_path = Path(holdout_path) if holdout_path else None
        self.schema = Schema.load(self.schema_path)
        self.ledger = Ledger(self.dir / "ledger.jsonl")
        self._frames: tuple[pd.DataFrame, pd.DataFrame] | None = None
        self._state = self._load_state()

    # ---- persisted state -----------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    def _load_state(self) -> dict:
        if not self.state_path.exists():
            return {"format": STATE_FORMAT, "site": self.name, "accountant": SiteAccountant().state_dict(),
                    "plan": None, "rounds": []}
        st = read_json(self.state_path, "site state")
        if st.get("format") != STATE_FORMAT:
            raise DpsynthError(f"{self.state_path}: unknown site state format {st.get('format')!r}")
        if st.get("site") != self.name:
            raise DpsynthError(f"{self.state_path}: belongs to site {st.get('site')!r}, not {self.name!r}")
        self.ledger.verify()  # a broken ledger stops the site: someone edited its budget history
        return st

    def _save_state(self) -> None:
        atomic_write_json(self.state_path, self._state)

    @property
    def accountant(self) -> SiteAccountant:
        return SiteAccountant.from_state(self._state["accountant"])

    @property
    def plan(self) -> SitePlan | None:
        p = self._state.get("plan")
        return SitePlan(**p) if p else None

    def state_dict(self) -> dict:
        """The whole persisted state (mirrored into Flower's Context.state by the ClientApp)."""
        return json.loads(json.dumps(self._state))

    def check_against(self, mirrored: dict | None) -> None:
        """A copy of the state kept elsewhere (Flower Context.state) must never show more spend than the file:
        that would mean the site file was replaced or rolled back."""
        if not mirrored:
            return
        other = SiteAccountant.from_state(mirrored["accountant"])
        if other.total_steps > self.accountant.total_steps:
            raise BudgetExceededError(
                f"site {self.name!r}: {self.state_path} records fewer DP steps ({self.accountant.total_steps}) than "
                f"this run already took ({other.total_steps}); the site file was rolled back — refusing to train"
            )

    # ---- data ------------------------------------------------------------------------------------
    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(train, holdout) of this site. Without a holdout file the site's file is split deterministically
        (seeded by the site name) so every process and every restart sees the same split; the holdout rows
        never enter training and serve the site's own audits."""
        if self._frames is None:
            from .data.io import read_table

            df = validate_frame(self._with_note_column(read_table(self.data_path), self.data_path), self.schema,
                                str(self.data_path))
            if self.holdout_path is not None:
                hold = validate_frame(self._with_note_column(read_table(self.holdout_path), self.holdout_path),
                                      self.schema, str(self.holdout_path))
                train = df
            else:
                seed = int.from_bytes(hashlib.sha256(f"dpsynth-site-split:{self.name}".encode()).digest()[:8], "little")
                perm = np.random.default_rng(seed).permutation(len(df))
                n_hold = int(round(self.policy.holdout_fraction * len(df)))
                hold = df.iloc[np.sort(perm[:n_hold])].reset_index(drop=True)
                train = df.iloc[np.sort(perm[n_hold:])].reset_index(drop=True)
            self._frames = (train, hold)
        return self._frames

    def _with_note_column(self, df: pd.DataFrame, path: Path) -> pd.DataFrame:
        """A note column of the schema that the site's file lacks is named as such (the generic schema check
        would only list it among missing columns)."""
        for col in self.schema.of_kind("text"):
            if col.name not in df.columns:
                raise DataError(f"site {self.name!r}: the note column {col.name!r} (kind text in the schema) is missing "
                                f"from {path}; this site cannot train or audit the note model — add the column "
                                "(empty for patients without a note), or use a schema without it")
        return df

    def _note_column(self) -> str:
        """The schema's one text column, or a refusal naming what is wrong."""
        try:
            return text_column(self.schema)
        except DpsynthError as e:
            self._refuse("plan", f"cannot train the note model: {e}", SitePolicyError)

    # ---- planning --------------------------------------------------------------------------------
    def plan_run(self, request: RunRequest) -> SitePlan:
        """Check the request against the policy and calibrate σ once for the whole run (idempotent per run)."""
        self.schema.require_reviewed(str(self.schema_path))
        existing = self.plan
        if existing is not None and existing.run_id == request.run_id:
            return existing  # a restarted node continues the same run with the same calibration
        not_allowed = sorted(set(request.models) - set(self.policy.allowed_models))
        if not_allowed:
            why = ("; allow_notes = false: this hospital's notes never train a model"
                   if "text" in not_allowed and not self.policy.allow_notes else "")
            self._refuse("plan", f"models {not_allowed} are not allowed by the site policy "
                                 f"(allowed: {self.policy.allowed_models}{why})", SitePolicyError)
        unsupported = sorted(set(request.models) - set(IMPLEMENTED_MODELS))
        if unsupported:
            self._refuse("plan", f"models {unsupported} are not implemented yet", SitePolicyError)
        note_col = self._note_column() if "text" in request.models else None
        try:
            train, _ = self.frames()
        except DataError as e:
            self._refuse("plan", str(e).removeprefix(f"site {self.name!r}: "), DataError)
        n = len(train)
        if n < self.policy.min_patients:
            self._refuse("plan", f"{n} training patients is below the site policy's minimum of "
                                 f"{self.policy.min_patients}", SitePolicyError)
        delta = request.delta or None
        site_delta = self.policy.delta or default_delta(n)
        delta = min(delta, site_delta) if delta else site_delta
        cap = float(self.policy.max_epsilon)
        target = min(float(request.epsilon), cap)
        try:
            check_privacy_args(target, delta, n, non_private=False)
        except PrivacyParameterError as e:
            self._refuse("plan", str(e), PrivacyParameterError)
        steps_per_epoch = math.ceil(n / request.batch_size)
        q = 1.0 / steps_per_epoch
        steps_per_round = request.local_epochs * steps_per_epoch
        planned = request.rounds * steps_per_round
        acc = self.accountant
        prior = acc.epsilon(delta)
        if prior >= target:
            self._refuse("plan", f"ε already spent on this site's patients ({prior:.3f}) reaches the cap "
                                 f"{target:g}; nothing left to train with", BudgetExceededError)
        if "wgan" not in request.models:
            self._refuse("plan", "the models must include wgan (the record the other models are conditioned on)",
                         SitePolicyError)
        shares = {m: {**TrainConfig().budget_shares, **(request.budget_shares or {})}[m] for m in request.models}
        parts = [(CRITIC_MECHANISM, q, planned, shares["wgan"])]
        if "flow" in request.models:  # the flow trains the same local epochs in the same rounds
            parts.append((FLOW_MECHANISM, q, planned, shares["flow"]))
        text = {}
        if note_col is not None:  # the note model: its own Poisson rate over the patients with a note
            n_notes = sum(v is not None for v in note_values(train, note_col))
            if n_notes < request.text_batch_size:
                self._refuse("plan", f"only {n_notes} training patients have a note in column {note_col!r}, fewer "
                                     f"than one expected text batch ({request.text_batch_size}); DP-SGD needs many "
                                     "batches — a smaller text batch size, or a run without text", DataError)
            t_spe = text_steps_per_epoch(n_notes, request.text_batch_size)
            t_round = math.ceil(request.text_epochs * t_spe / request.rounds)
            text = {"text_sample_rate": 1.0 / t_spe, "text_batch_size": request.text_batch_size,
                    "text_epochs": request.text_epochs, "text_steps_per_epoch": t_spe,
                    "text_steps_per_round": t_round, "text_planned_steps": t_round * request.rounds}
            parts.append((TEXT_MECHANISM, text["text_sample_rate"], text["text_planned_steps"], shares["text"]))
        try:
            sigmas = calibrate_split(target_epsilon=target, delta=delta, parts=parts, prior=acc)
        except (PrivacyParameterError, BudgetExceededError) as e:
            self._refuse("plan", f"cannot plan within the remaining budget: {e}", BudgetExceededError)
        by_name = {name: sg for (name, *_), sg in zip(parts, sigmas)}
        sigma = sigmas[0]
        flow_sigma = by_name.get(FLOW_MECHANISM)
        if note_col is not None:
            text["text_noise_multiplier"] = by_name[TEXT_MECHANISM]
        plan = SitePlan(run_id=request.run_id, epsilon=target, requested_epsilon=float(request.epsilon), policy_cap=cap,
                        delta=delta, rounds=request.rounds, local_epochs=request.local_epochs,
                        batch_size=request.batch_size, steps_per_epoch=steps_per_epoch, steps_per_round=steps_per_round,
                        planned_steps=planned, sample_rate=q, noise_multiplier=sigma,
                        max_grad_norm=float(request.max_grad_norm), prior_epsilon=prior, models=list(request.models),
                        flow_noise_multiplier=flow_sigma, budget_shares=shares, **text)
        self._state["plan"] = asdict(plan)
        self._state["rounds"] = []
        self._state["data_sha256"] = sha256_file(self.data_path)
        self._state["schema_sha256"] = self.schema.hash()
        self._save_state()
        self.ledger.append("plan", {k: v for k, v in asdict(plan).items()})
        return plan

    def _refuse(self, what: str, reason: str, exc: type[DpsynthError]) -> None:
        self.ledger.append("refused", {"what": what, "reason": reason})
        raise exc(f"site {self.name!r}: {reason}")

    # ---- reservation -----------------------------------------------------------------------------
    def reserve(self, round_no: int) -> dict:
        """Charge this round's DP steps to the persisted accountant *before* training; refuse a round that
        would cross the site's cap. Returns the reservation."""
        plan = self.plan
        if plan is None:
            self._refuse("round", f"round {round_no} requested before any plan", BudgetExceededError)
        if self._state.get("data_sha256") != sha256_file(self.data_path):
            self._refuse("round", f"the data file {self.data_path} changed since the run was planned", DataError)
        cap = min(plan.epsilon, float(self.policy.max_epsilon))
        mechs = [Mechanism(CRITIC_MECHANISM, plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)]
        if plan.flow_noise_multiplier is not None:
            mechs.append(Mechanism(FLOW_MECHANISM, plan.flow_noise_multiplier, plan.sample_rate, plan.steps_per_round))
        if plan.text_noise_multiplier is not None:
            mechs.append(Mechanism(TEXT_MECHANISM, plan.text_noise_multiplier, plan.text_sample_rate,
                                   plan.text_steps_per_round))
        acc = self.accountant
        eps_after = acc.epsilon(plan.delta, mechs)
        if eps_after > cap * (1 + 1e-6):
            self._refuse("round", f"round {round_no} would bring ε to {eps_after:.4f} > cap {cap:g} "
                                  f"(already spent {acc.epsilon(plan.delta):.4f})", BudgetExceededError)
        for m in mechs:
            acc.step(m.mechanism, noise_multiplier=m.noise_multiplier, sample_rate=m.sample_rate, steps=m.steps)
        self._state["accountant"] = acc.state_dict()
        res = {"run_id": plan.run_id, "round": int(round_no), "steps": plan.steps_per_round,
               "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
               "flow_noise_multiplier": plan.flow_noise_multiplier,
               "text_steps": plan.text_steps_per_round, "text_noise_multiplier": plan.text_noise_multiplier,
               "text_sample_rate": plan.text_sample_rate,
               "epsilon_after": eps_after, "delta": plan.delta, "model": "+".join(plan.models)}
        self._state.setdefault("rounds", []).append({**res, "status": "reserved"})
        self._save_state()  # on disk before the first step
        self.ledger.append("reserve", res)
        return res

    def complete(self, reservation: dict, steps_taken: int, seconds: float, flow_steps_taken: int = 0,
                 text_steps_taken: int = 0) -> None:
        for taken, reserved in ((steps_taken, reservation["steps"]), (flow_steps_taken, reservation["steps"]),
                                (text_steps_taken, reservation.get("text_steps") or 0)):
            if taken > reserved:
                raise BudgetExceededError(f"site {self.name!r}: took {taken} steps, reserved {reserved}")
        for r in reversed(self._state["rounds"]):
            if r["round"] == reservation["round"] and r["status"] == "reserved":
                r["status"] = "complete"
                r["steps_taken"] = int(steps_taken)
                r["flow_steps_taken"] = int(flow_steps_taken)
                r["text_steps_taken"] = int(text_steps_taken)
                break
        self._save_state()
        self.ledger.append("round-complete", {"run_id": reservation["run_id"], "round": reservation["round"],
                                              "steps_reserved": reservation["steps"], "steps_taken": int(steps_taken),
                                              "flow_steps_taken": int(flow_steps_taken),
                                              "text_steps_reserved": int(reservation.get("text_steps") or 0),
                                              "text_steps_taken": int(text_steps_taken), "seconds": round(seconds, 2)})

    def spend(self) -> dict:
        """The site's spend so far, as reported to the coordinator (ε, δ, steps, σ, q per mechanism)."""
        plan = self.plan
        acc = self.accountant
        delta = plan.delta if plan else None
        return {
            "site": self.name,
            "epsilon": acc.epsilon(delta) if delta else 0.0,
            "delta": delta,
            "cap": min(plan.epsilon, self.policy.max_epsilon) if plan else self.policy.max_epsilon,
            "accountant": ACCOUNTANT_NAME,
            "steps": acc.total_steps,
            "mechanisms": [asdict(m) for m in acc.history],
            "ledger_head": self.ledger.head(),
        }

    # ---- a whole round ---------------------------------------------------------------------------
    def train_round(self, round_no: int, generator_state, critic_state, *, wgan: WGANConfig,
                    flow_state: dict | None = None, flow_config: FlowConfig | None = None,
                    text_state: dict | None = None, text_config: TextConfig | None = None,
                    seed: int | None = None) -> tuple[dict, dict, dict, dict | None, dict | None]:
        """Reserve, then train the round's local epochs of every planned model from the coordinator's weights
        (the note model: its planned steps per round). Returns (generator state, critic state, report, flow state
        or None, note model state or None)."""
        import time

        plan = self.plan
        if plan is None:
            self._refuse("round", f"round {round_no} requested before any plan", BudgetExceededError)
        train, _ = self.frames()
        encoder = Encoder(self.schema)
        x, _clipped = encoder.transform(train)
        if math.ceil(len(x) / plan.batch_size) != plan.steps_per_epoch:
            self._refuse("round", "the number of training batches changed since the plan", DataError)
        note_col = None
        if plan.text_noise_multiplier is not None:
            note_col = self._note_column()
            n_notes = sum(v is not None for v in note_values(train, note_col))
            if text_steps_per_epoch(n_notes, plan.text_batch_size) != plan.text_steps_per_epoch:
                self._refuse("round", "the number of note batches changed since the plan", DataError)
        res = self.reserve(round_no)
        t0 = time.time()
        g, c, steps, losses = local_dp_round(
            x=x, encoder=encoder, generator_state=generator_state, critic_state=critic_state, wgan=wgan,
            epochs=plan.local_epochs, batch_size=plan.batch_size, noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm, max_steps=res["steps"], seed=seed,
        )
        f_out, flow_steps, flow_losses = None, 0, []
        if plan.flow_noise_multiplier is not None:
            f_out, flow_steps, flow_losses = local_flow_round(
                df=train, schema=self.schema, encoder=encoder, x=x, flow_state=flow_state,
                config=flow_config or FlowConfig(), epochs=plan.local_epochs, batch_size=plan.batch_size,
                noise_multiplier=plan.flow_noise_multiplier, max_grad_norm=plan.max_grad_norm, max_steps=res["steps"],
                seed=None if seed is None else seed + 10)
        t_out, text_steps, text_losses = None, 0, []
        if note_col is not None:
            t_out, text_steps, text_losses = local_text_round(
                df=train, schema=self.schema, column=note_col, text_state=text_state, config=text_config or TextConfig(),
                batch_size=plan.text_batch_size, sample_rate=plan.text_sample_rate,
                noise_multiplier=plan.text_noise_multiplier, max_grad_norm=plan.max_grad_norm,
                max_steps=res["text_steps"], seed=None if seed is None else seed + 20)
        self.complete(res, steps, time.time() - t0, flow_steps, text_steps)
        report = {**self.spend(), "round": int(round_no), "steps_round": int(steps), "flow_steps_round": int(flow_steps),
                  "expected_batches": plan.steps_per_round, "noise_multiplier": plan.noise_multiplier,
                  "flow_noise_multiplier": plan.flow_noise_multiplier,
                  "sample_rate": plan.sample_rate, "losses": losses[-1] if losses else {},
                  "flow_nll": flow_losses[-1] if flow_losses else None,
                  "text_steps_round": int(text_steps), "text_expected_batches": plan.text_steps_per_round,
                  "text_noise_multiplier": plan.text_noise_multiplier, "text_sample_rate": plan.text_sample_rate,
                  "text_nll": text_losses}
        return g, c, report, f_out, t_out

    # ---- audit of a candidate release ------------------------------------------------------------
    def dp_facts(self) -> dict:
        plan = self.plan
        if plan is None:
            return {"differentially_private": False}
        acc = self.accountant
        sgd = [m for m in acc.history if m.mechanism == CRITIC_MECHANISM]
        flow = [m for m in acc.history if m.mechanism == FLOW_MECHANISM]
        text = [m for m in acc.history if m.mechanism == TEXT_MECHANISM]
        return {
            "differentially_private": True,
            "models": list(plan.models),
            "flow_noise_multiplier": plan.flow_noise_multiplier,
            "flow_steps": sum(m.steps for m in flow if m.noise_multiplier == plan.flow_noise_multiplier),
            "text_noise_multiplier": plan.text_noise_multiplier,
            "text_sample_rate": plan.text_sample_rate,
            "text_steps": sum(m.steps for m in text if m.noise_multiplier == plan.text_noise_multiplier),
            "epsilon": acc.epsilon(plan.delta),
            "delta": plan.delta,
            "unit": "patient",
            "accountant": ACCOUNTANT_NAME,
            "noise_multiplier": plan.noise_multiplier,
            "sample_rate": plan.sample_rate,
            "steps": sum(m.steps for m in sgd if m.noise_multiplier == plan.noise_multiplier
                         and m.sample_rate == plan.sample_rate),
            "max_grad_norm": plan.max_grad_norm,
            "site": self.name,
        }

    def audit(self, synthetic: pd.DataFrame, *, policy=None, empirical: bool = True, utility: bool = True,
              seed: int = 0, sites: int = 1) -> dict:
        """Run every attack against this site's own train (members) and holdout (non-members). Returns
        aggregates only (run_audit never returns per-record distances)."""
        from audits.audit import run_audit

        train, hold = self.frames()
        syn = validate_frame(synthetic, self.schema, "candidate release")
        res = run_audit(train, hold, syn, self.schema, policy=policy, dp=self.dp_facts(), seed=seed,
                        empirical=empirical, sites=sites)
        if utility:
            from .metrics.utility import evaluate

            try:
                res["utility"] = evaluate(train, hold, syn, self.schema)["headline"]
            except Exception as e:  # utility is informative only; the gate does not depend on it
                res["utility"] = {"error": f"{type(e).__name__}: {e}"}
        res["site"] = self.name
        res["schema_sha256"] = self.schema.hash()
        self.ledger.append("audit", {"verdict": res["gate"]["verdict"], "failed": res["gate"]["failed"],
                                     "synthetic_rows": len(syn)})
        return res
