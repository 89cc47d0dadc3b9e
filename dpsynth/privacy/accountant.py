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
from statistics import NormalDist

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


def _memoise_opacus_rdp() -> None:
    """Opacus' PRV accountant sizes its discretisation domain with RDP bounds at ~100 orders, 90 of them
    fractional, computed by a Python series per (q, σ, order): ~70 % of a PRV ε. A site asks for ε many times
    with the same few (q, σ) pairs (reservation, per-step guard, report), and RDP is linear in the steps, so
    the pure per-step function ``_compute_rdp(q, σ, order)`` is memoised. The results are unchanged (same
    function, same arguments); if Opacus renames it, nothing is patched."""
    import functools

    from opacus.accountants.analysis import rdp

    fn = getattr(rdp, "_compute_rdp", None)
    if fn is not None and not hasattr(fn, "cache_info"):
        rdp._compute_rdp = functools.lru_cache(maxsize=1 << 16)(fn)


def prv_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    if not history:
        return 0.0
    from opacus.accountants import PRVAccountant

    _memoise_opacus_rdp()

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
    return calibrate_split(target_epsilon=target_epsilon, delta=delta, parts=[(mechanism, sample_rate, steps, 1.0)],
                           prior=prior, tolerance=tolerance)[0]


def gdp_mu(epsilon: float, delta: float) -> float:
    """The μ of a μ-GDP mechanism that is exactly (ε, δ)-DP (Dong, Roth & Su 2019, Cor. 2.13):
    δ = Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2), increasing in μ. Used only as the calibrations' first guess (the
    CLT view of DP-SGD); the ε that is reported and enforced is always the PRV accountant's."""
    phi = NormalDist().cdf

    def d(mu: float) -> float:
        return phi(-epsilon / mu + mu / 2) - math.exp(min(epsilon, 700.0)) * phi(-epsilon / mu - mu / 2)

    lo, hi = 1e-4, 100.0
    for _ in range(80):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if d(mid) < delta else (lo, mid)
    return math.sqrt(lo * hi)


def _largest_within(f, target: float, x0: float, tol: float, *, x_min: float, x_max: float) -> float | None:
    """The largest x (to relative ``tol``: some x' ≤ x·(1 + tol) is known to exceed) with f(x) ≤ target, for f
    increasing — every f here is a PRV ε (≈ 0.2–0.6 s each), so the search brackets from a good first guess
    and interpolates in log–log (ε is close to a power of the noise scale) instead of bisecting: 4–6
    evaluations where bisection took 9–12. None: even ``x_min`` exceeds the target. At ``x_max`` without
    crossing: x_max."""
    lo = hi = None  # (x, f(x)) with f ≤ target / f > target
    x = min(max(x0, x_min), x_max)
    aimed = False  # the last point was aimed just below an interpolated crossing
    jump = 1.0
    for _ in range(100):
        e = f(x)
        if e <= target:
            lo = (x, e) if lo is None or x > lo[0] else lo
        else:
            hi = (x, e) if hi is None or x < hi[0] else hi
        if lo is not None and hi is not None and hi[0] - lo[0] <= tol * lo[0]:
            return lo[0]
        if hi is None:  # not crossed yet: jump past the crossing (each further jump at least squares the last)
            if x >= x_max:
                return x
            jump = min(4.0, max((target / e if e > 0 else 4.0) * (1 + tol), jump * jump))
            x = min(x_max, x * jump)
        elif lo is None:
            if x <= x_min:
                return None
            jump = min(4.0, max(e / target / (1 - tol), jump * jump))
            x = max(x_min, x / jump)
        else:
            (xl, el), (xh, eh) = lo, hi
            if 0 < el < eh:
                t = math.log(target / el) / math.log(eh / el)
                est = math.exp(math.log(xl) + t * math.log(xh / xl))
            else:
                est = math.sqrt(xl * xh)
            w = xh - xl
            if aimed and x == xl and xl * (1 + tol) < xh:  # an aimed point landed below: confirm one tol above
                x, aimed = xl * (1 + 0.99 * tol), False
            else:  # aim just below the interpolated crossing, strictly inside the bracket
                x, aimed = min(max(est * (1 - tol / 3), xl + 0.02 * w), xh - 0.02 * w), True
    raise PrivacyParameterError("noise calibration did not converge")


def clt_mu(sigma: float, q: float, steps: int) -> float:
    """μ of the μ-GDP that ``steps`` Poisson-subsampled Gaussian steps at (σ, q) approximately satisfy by the
    central-limit theorem (Bu, Dong, Long & Su 2020): μ = q·√(T·(e^{1/σ²} − 1)); ``split_sigmas`` inverts it."""
    return q * math.sqrt(steps * math.expm1(1 / sigma**2))


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
    One part is ``calibrate_noise``. The scale is searched to relative ``tolerance`` (σ to about the same)."""
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
            f"{', '.join(n for n, *_ in parts)}: ε already spent ({spent:.3f}) reaches the target "
            f"ε={target_epsilon:g}; nothing left to train with"
        )

    def eps(scale: float) -> float:
        sig = split_sigmas(scale, norm)
        if min(sig) > 1e4:
            return 0.0
        return prior.epsilon(delta, [Mechanism(n, s, q, t) for (n, q, t, _), s in zip(parts, sig)])

    scale = _largest_within(eps, target_epsilon, gdp_mu(target_epsilon, delta), tolerance, x_min=1e-6, x_max=1e3)
    if scale is None:
        what = ", ".join(f"{n} ({t} steps at q={q:.4g})" for n, q, t, _ in parts)
        raise PrivacyParameterError(f"cannot reach ε={target_epsilon:g} with {what}; use fewer epochs or a larger budget")
    return split_sigmas(scale, norm)  # the largest scale known to stay within the target
