"""Where ε is computed: the site accountant, noise calibration, the budget ledger, DP statistics."""

from .accountant import Mechanism, SiteAccountant, calibrate_noise

__all__ = ["Mechanism", "SiteAccountant", "calibrate_noise"]
