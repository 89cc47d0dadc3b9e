"""The site accountant: composes every mechanism that touched one site's patients.

Every mechanism here is a (Poisson-subsampled) Gaussian mechanism described by
(noise_multiplier σ, sample_rate q, steps): DP-SGD steps of every model, and the Gaussian noisy counts used
for DP schema inference (q = 1). ε is computed by Opacus' PRV accountant (Gopi et al. 2021, the upper
bound of its estimate); Opacus' RDP accountant is kept as a cross-check (it is always looser). Mechanisms
with an additional additive δ (thresholded histograms for DP category selection) record it in
``extra_delta``; the PRV accountant is then asked for ε at δ − extra_delta, so the reported (ε, δ) holds
for the whole composition.

The state is plain JSON (``state_dict``) — no pickle — and is saved with every checkpoint so that a resumed
or restarted site continues from what it has already spent.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass

from ..errors import BudgetExceededError, PrivacyParameterError

ACCOUNTANT_NAME = "opacus-prv"
EPS_ERROR = 0.01  # PRV discretisation error; get_epsilon returns the upper bound


@dataclass(frozen=True)
class Mechanism:
    mechanism: str  # e.g. "dp-sgd:wgan-critic", "gaussian-histogram:schema"
    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise PrivacyParameterError(f"{self.mechanism}: noise multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise PrivacyParameterError(f"{self.mechanism}: sample rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 0 or int(self.steps) != self.steps:
            raise PrivacyParameterError(f"{self.mechanism}: steps must be a non-negative integer, got {self.steps}")


def _grouped(history: list[Mechanism]) -> list[tuple[float, float, int]]:
    """Composition is order-free: merge entries with equal (σ, q) for a cheaper PRV computation."""
    g: "OrderedDict[tuple[float, float], int]" = OrderedDict()
    for m in history:
        if m.steps:
            key = (float(m.noise_multiplier), float(m.sample_rate))
            g[key] = g.get(key, 0) + int(m.steps)
    return [(s, q, n) for (s, q), n in g.items()]


def prv_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    if not history:
        return 0.0
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # log(0) at q = 1 inside opacus' PRV: harmless
        warnings.simplefilter("ignore", UserWarning)  # RDP order-range notes from PRV's domain computation
        return float(acc.get_epsilon(delta=delta, eps_error=EPS_ERROR))


def rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


class SiteAccountant:
    """One per site (or per single-site training run); created once and persisted, never rebuilt per round."""

    def __init__(self, history: list[Mechanism] | None = None, extra_delta: float = 0.0):
        self.history: list[Mechanism] = list(history or [])
        self.extra_delta = float(extra_delta)

    # ---- recording ------------------------------------------------------------------------------
    def add(self, mech: Mechanism) -> None:
        self.history.append(mech)

    def step(self, mechanism: str, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` more steps; consecutive steps of one mechanism share an entry."""
        last = self.history[-1] if self.history else None
        if (
            last is not None
            and last.mechanism == mechanism
            and last.noise_multiplier == noise_multiplier
            and last.sample_rate == sample_rate
        ):
            self.history[-1] = Mechanism(mechanism, noise_multiplier, sample_rate, last.steps + steps)
        else:
            self.add(Mechanism(mechanism, noise_multiplier, sample_rate, steps))

    def add_extra_delta(self, d: float) -> None:
        self.extra_delta += float(d)

    # ---- ε ----------------------------------------------------------------------------------------
    def _prv_delta(self, delta: float) -> float:
        d = delta - self.extra_delta
        if d <= 0:
            raise BudgetExceededError(
                f"δ={delta:g} is used up by mechanisms with additive δ ({self.extra_delta:g}); nothing is left"
            )
        return d

    def epsilon(self, delta: float, extra: list[Mechanism] | None = None) -> float:
        hist = self.history + list(extra or [])
        if not any(m.steps for m in hist):
            return 0.0
        return prv_epsilon(_grouped(hist), self._prv_delta(delta))

    def epsilon_rdp(self, delta: float) -> float:
        return rdp_epsilon(_grouped(self.history), self._prv_delta(delta))

    @property
    def total_steps(self) -> int:
        return sum(m.steps for m in self.history)

    # ---- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "accountant": ACCOUNTANT_NAME,
            "extra_delta": self.extra_delta,
            "history": [asdict(m) for m in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("accountant") != ACCOUNTANT_NAME:
            raise PrivacyParameterError(f"accountant state is for {state.get('accountant')!r}, expected {ACCOUNTANT_NAME}")
        self.history = [Mechanism(**m) for m in state["history"]]
        self.extra_delta = float(state.get("extra_delta", 0.0))

    @classmethod
    def from_state(cls, state: dict) -> "SiteAccountant":
        acc = cls()
        acc.load_state_dict(state)
        return acc

    def copy(self) -> "SiteAccountant":
        return SiteAccountant(list(self.history), self.extra_delta)


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    mechanism: str,
    prior: SiteAccountant | None = None,
    tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier σ (to ``tolerance``) such that ``prior`` + steps × (σ, q) stays ≤ target ε.

    Calibrated up front for the whole planned run, so the budget is spent evenly and never crossed.
    """
    prior = prior or SiteAccountant()
    if steps <= 0:
        raise PrivacyParameterError(f"{mechanism}: planned steps must be positive, got {steps}")
    spent = prior.epsilon(delta)
    if spent >= target_epsilon:
        raise BudgetExceededError(
            f"{mechanism}: ε already spent ({spent:.3f}) reaches the target ε={target_epsilon:g}; nothing left to train with"
        )

    def eps(sigma: float) -> float:
        return prior.epsilon(delta, [Mechanism(mechanism, sigma, sample_rate, steps)])

    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise PrivacyParameterError(
                f"{mechanism}: cannot reach ε={target_epsilon:g} with {steps} steps at q={sample_rate:.4g}; "
                "use fewer epochs or a larger budget"
            )
    while hi - lo > tolerance * max(hi, 1e-3):
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def split_sigmas(scale: float, parts: list[tuple[float, int, float]]) -> list[float]:
    """Noise multipliers for several DP-SGD mechanisms sharing one budget (the split rule).

    Each part is (sample_rate q, steps T, share w). By the central-limit approximation of subsampled Gaussian
    DP-SGD (Bu, Dong, Long & Su 2020), T steps at (σ, q) are ≈ μ-GDP with μ² = q²·T·(e^{1/σ²} − 1), and μ²
    adds up under composition. The rule gives part m the share w_m of the total μ²: μ_m² = w_m·scale², i.e.
    σ_m = 1 / sqrt(log(1 + w_m·scale² / (q_m²·T_m))). ``calibrate_split`` then searches the one ``scale`` at
    which the exact PRV composition of everything meets the target — so the total ε is exact, and the shares
    are shares of the privacy loss in that approximation.
    """
    out = []
    for q, steps, w in parts:
        x = w * scale * scale / (q * q * steps)
        out.append(1.0 / math.sqrt(math.log1p(x)) if x > 0 else float("inf"))
    return out


def calibrate_split(
    *,
    target_epsilon: float,
    delta: float,
    parts: list[tuple[str, float, int, float]],
    prior: SiteAccountant | None = None,
    tolerance: float = 0.01,
) -> list[float]:
    """σ per mechanism for ``parts`` = [(mechanism, sample_rate, steps, share), ...] such that ``prior`` plus all
    parts composes to ≤ target ε (PRV), with the privacy loss split by ``share`` (see ``split_sigmas``).
    One part reduces to ``calibrate_noise``."""
    if len(parts) == 1:
        name, q, steps, _ = parts[0]
        return [calibrate_noise(target_epsilon=target_epsilon, delta=delta, sample_rate=q, steps=steps,
                                mechanism=name, prior=prior, tolerance=tolerance)]
    prior = prior or SiteAccountant()
    for name, q, steps, w in parts:
        if steps <= 0:
            raise PrivacyParameterError(f"{name}: planned steps must be positive, got {steps}")
        if not (w > 0 and math.isfinite(w)):
            raise PrivacyParameterError(f"{name}: budget share must be positive, got {w}")
    total = sum(w for *_, w in parts)
    norm = [(q, steps, w / total) for _, q, steps, w in parts]
    spent = prior.epsilon(delta)
    if spent >= target_epsilon:
        raise BudgetExceededError(
            f"ε already spent ({spent:.3f}) reaches the target ε={target_epsilon:g}; nothing left to train with"
        )

    def eps(scale: float) -> float:
        sig = split_sigmas(scale, norm)
        if min(sig) > 1e4:
            return 0.0
        return prior.epsilon(delta, [Mechanism(n, s, q, t) for (n, q, t, _), s in zip(parts, sig)])

    lo, hi = 0.0, 1.0
    while eps(hi) <= target_epsilon:  # grow until the budget is crossed (scale ∝ total μ)
        lo, hi = hi, hi * 2
        if hi > 1e3:
            break
    if lo == 0.0:
        while eps(hi) > target_epsilon:
            hi /= 2
            if hi < 1e-6:
                raise PrivacyParameterError("cannot meet the target ε with the planned steps; use fewer epochs")
        lo, hi = hi, hi * 2
    while hi - lo > tolerance * lo:
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            hi = mid
        else:
            lo = mid
    return split_sigmas(lo, norm)  # the largest scale known to stay within the target
