"""The release policy: a versioned TOML (or JSON) file of attack thresholds and required DP facts."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import tomllib

from dpsynth.errors import DpsynthError

POLICY_VERSION = 1

DEFAULT_REASONS = {
    "mia_distance_auc_max": "0.5 is chance; 0.6 tolerates sampling noise at ~2,000 victims per group (CI half-width ≈ 0.02) while a release of training rows scores ≈ 1.0",
    "mia_distance_f1_max": "tutorial contrast: a real-data release scores ≈ 0.9, good synthetic data ≈ 0.3",
    "mia_density_auc_max": "as for the distance attack: density calibration catches over-fitting in dense regions",
    "mia_density_tpr_at_fpr_1pct_max": "Carlini et al.: the low-FPR regime is what matters; 5 × the 1 % baseline",
    "attribute_inference_residual_max": "what the release adds about its own patients' sensitive attributes beyond what it says about anyone (non-member control)",
    "inference_risk_max": "anonymeter's residual inference risk; 0.1 is a commonly used upper bound for 'low' risk",
    "nnaa_privacy_loss_max": "Yale et al.: privacy loss near 0 means the release is no closer to its training patients than to unseen ones",
    "dcr_share_max": "0.5 is ideal; 0.6 means 20 % more synthetic rows sit nearer a training patient than chance",
    "exact_copy_excess_rate_max": "copies of training rows beyond what chance produces against the holdout",
    "identifier_replay_max": "no training identifier may appear in a release",
    "notes_ngram_excess_max": "share of synthetic notes carrying a word 8-gram found only in the training notes minus the same share for the holdout's own 8-grams: ≈ 0 for a model that writes like the population, large for one that copies notes; 0.05 tolerates sampling noise (and the check also needs a significant excess) while copied notes score ≈ 1",
    "notes_identifier_replay_max": "no identifier-like token (MRN-like digits, 'MRN x', titled names) of the training notes may appear in a generated note",
    "canary_exposure_margin_bits_max": "secret-sharer exposure of the canaries repeated most often: its lower 95 % bound (normal approximation, SD at least the no-memorisation SD 1/ln 2 bits, so a single canary cannot fail by chance more than ≈ 2.5 % of the time) must stay within 1 bit of chance (≈ 1.44 bits; a non-memorising model's bound falls below chance), i.e. the planted secret is not even twice as likely as under no memorisation; a model that memorised them scores near log2(candidates + 1) ≈ 10 bits",
    "max_epsilon": "formal guarantee required per site; 10 is the loosest value commonly published for DP synthetic data",
    "max_delta": "δ must stay far below 1/n",
}


@dataclass
class Policy:
    version: int = POLICY_VERSION
    name: str = "dpsynth-default"
    dp: dict = field(default_factory=lambda: {"require_dp": True, "max_epsilon": 10.0, "max_delta": 1e-5})
    thresholds: dict = field(default_factory=dict)
    audit: dict = field(default_factory=lambda: {"max_victims": 2000, "quasi_identifiers": [],
                                                 "significance_required": ["dcr.share", "inference_risk.risk",
                                                                          "attribute_inference.residual",
                                                                          "notes_ngram_overlap.excess"],
                                                 "false_refusal_rate": 0.05,
                                                 "canary_candidates": 1000})

    def to_json(self) -> dict:
        return asdict(self)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    @classmethod
    def from_dict(cls, d: dict, where: str) -> Policy:
        if d.get("version") != POLICY_VERSION:
            raise DpsynthError(f"{where}: policy version {d.get('version')!r} is not supported (expected {POLICY_VERSION})")
        unknown = set(d) - {"version", "name", "dp", "thresholds", "audit"}
        if unknown:
            raise DpsynthError(f"{where}: unknown policy sections {sorted(unknown)}")
        base = default_policy() if where != "default" else None
        th = dict(base.thresholds if base else {})
        for k, v in (d.get("thresholds") or {}).items():
            if base and k not in base.thresholds:
                raise DpsynthError(f"{where}: unknown threshold {k!r} (known: {sorted(base.thresholds)})")
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise DpsynthError(f"{where}: threshold {k!r} must be a number, got {v!r}")
            th[k] = float(v)
        dp = {**(base.dp if base else {}), **(d.get("dp") or {})}
        audit = {**(base.audit if base else {}), **(d.get("audit") or {})}
        fr = audit.get("false_refusal_rate", 0.05)
        if isinstance(fr, bool) or not isinstance(fr, (int, float)) or not 0 < fr < 0.5:
            raise DpsynthError(f"{where}: audit.false_refusal_rate must be a number in (0, 0.5), got {fr!r}")
        return cls(version=POLICY_VERSION, name=d.get("name", "custom"), dp=dp, thresholds=th, audit=audit)

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        path = Path(path)
        if not path.exists():
            raise DpsynthError(f"policy file {path} does not exist")
        try:
            if path.suffix.lower() == ".json":
                d = json.loads(path.read_text(encoding="utf-8"))
            else:
                d = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DpsynthError(f"{path}: cannot parse policy ({e})") from None
        return cls.from_dict(d, str(path))


def default_policy() -> Policy:
    text = resources.files("audits").joinpath("default_policy.toml").read_text(encoding="utf-8")
    return Policy.from_dict(tomllib.loads(text), "default")
