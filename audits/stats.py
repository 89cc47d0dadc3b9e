"""Every risk is value + 95 % confidence interval + baseline/control (anonymeter / mostlyai-qa style)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import norm

Z95 = float(norm.ppf(0.975))


@dataclass
class Estimate:
    value: float
    ci_low: float
    ci_high: float
    baseline: float | None  # what an attacker with no access to the release achieves / the control group
    n: int  # number of victims (targets) the estimate is based on
    method: str = ""

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def wilson(successes: int, n: int) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    den = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / den
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(successes: int, n: int, baseline: float | None, method: str) -> Estimate:
    lo, hi = wilson(successes, n)
    return Estimate(successes / n if n else float("nan"), lo, hi, baseline, n, method)


def bootstrap(stat: Callable[[np.ndarray], float], n: int, *, baseline: float | None, method: str,
              reps: int = 200, seed: int = 0) -> Estimate:
    """Percentile bootstrap over victims: ``stat`` receives an index array into the victim set."""
    rng = np.random.default_rng(seed)
    value = float(stat(np.arange(n)))
    boots = []
    for _ in range(reps):
        v = stat(rng.integers(0, n, n))
        if v is not None and np.isfinite(v):
            boots.append(v)
    return percentile_estimate(value, boots, baseline, n, method)


def percentile_estimate(value: float, boots, baseline: float | None, n: int, method: str) -> Estimate:
    """The estimate with the 2.5–97.5 % percentiles of its bootstrap replicates as 95 % CI (NaN without any)."""
    lo, hi = (np.percentile(boots, [2.5, 97.5]) if len(boots) else (float("nan"), float("nan")))
    return Estimate(value, float(lo), float(hi), baseline, n, method)
