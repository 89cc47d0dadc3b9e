"""The release gate: each policy check with its value, threshold and pass/fail; the verdict is their AND."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import NormalDist

from .policy import Policy

Z95 = NormalDist().inv_cdf(0.975)  # the attacks' reported 95 % CIs


@dataclass
class Check:
    check: str
    value: float | bool | None
    threshold: float | bool | None
    comparison: str  # "<=", "==", "is"
    passed: bool
    ci: list | None = None
    note: str = ""


def _le(name, value, threshold, ci=None, note="") -> Check:
    ok = value is not None and value <= threshold
    return Check(name, value, threshold, "<=", bool(ok), ci, note if value is not None else "not measured")


def _ci(est: dict | None):
    return [est.get("ci_low"), est.get("ci_high")] if est and "ci_low" in est else None


def significance_z(policy: Policy, family: int, sites: int = 1) -> float:
    """One-sided z for the significance rule, Bonferroni over the gate's family of significance-tested checks
    at every site: a release that memorised nothing is refused by chance (all sites together) with probability
    at most the policy's ``false_refusal_rate`` (a refusal is not free: the budget was spent)."""
    alpha = float(policy.audit.get("false_refusal_rate", 0.05)) / max(1, family * max(1, int(sites)))
    return NormalDist().inv_cdf(1.0 - alpha)


def significant_excess(e: dict, z: float) -> tuple[bool, float | None]:
    """Is the estimate's excess over its baseline significant at ``z``? The lower one-sided bound rescales the
    lower half of the reported 95 % CI: value − z/1.96 · (value − ci_low) (the bootstrap's own shape on the
    side that matters). Returns (significant, bound); without a CI or baseline the excess counts as significant."""
    if e.get("baseline") is None or e.get("ci_low") is None or e.get("value") is None:
        return True, None
    bound = e["value"] - z / Z95 * max(0.0, e["value"] - e["ci_low"])
    return bound > e["baseline"], bound


def decide(attacks: dict, dp: dict | None, policy: Policy, sites: int = 1) -> dict:
    """``sites``: how many sites audit the same release (the coordinator's gate is their AND); the significance
    rule's family-wise false-refusal rate covers all of them."""
    t = policy.thresholds
    checks: list[Check] = []
    dpp = policy.dp
    if dpp.get("require_dp", True):
        is_dp = bool(dp and dp.get("differentially_private"))
        checks.append(Check("dp.differentially_private", is_dp, True, "is", is_dp, None,
                            "" if dp else "no DP facts given (model manifest or synthetic provenance)"))
        eps = dp.get("epsilon") if dp else None
        checks.append(_le("dp.epsilon", eps, float(dpp["max_epsilon"]), note="per site; consortium ε = max"))
        delta = dp.get("delta") if dp else None
        checks.append(_le("dp.delta", delta, float(dpp["max_delta"])))

    def est(path: list[str]):
        node = attacks
        for p in path:
            if not isinstance(node, dict) or p not in node:
                return None
            node = node[p]
        return node

    spec = [
        ("mia_distance.auc", ["mia_distance", "auc"], "mia_distance_auc_max"),
        ("mia_distance.f1", ["mia_distance", "f1"], "mia_distance_f1_max"),
        ("mia_density.auc", ["mia_density", "auc"], "mia_density_auc_max"),
        ("mia_density.tpr_at_fpr_1pct", ["mia_density", "tpr_at_fpr_1pct"], "mia_density_tpr_at_fpr_1pct_max"),
        ("attribute_inference.residual", ["attribute_inference", "residual"], "attribute_inference_residual_max"),
        ("inference_risk.risk", ["inference_risk", "risk"], "inference_risk_max"),
        ("nnaa.privacy_loss", ["nnaa", "privacy_loss"], "nnaa_privacy_loss_max"),
        ("dcr.share", ["dcr", "share"], "dcr_share_max"),
    ]
    significant_only = set(policy.audit.get("significance_required", []))
    family = [n for n, p, _ in spec if n in significant_only and est(p) is not None]
    if "notes_ngram_overlap.excess" in significant_only and est(["notes_ngram_overlap", "excess"]) is not None:
        family.append("notes_ngram_overlap.excess")
    z = significance_z(policy, len(family), sites)

    def significance(c: Check, e: dict | None) -> Check:
        if c.check in family and not c.passed and e is not None:
            sig, bound = significant_excess(e, z)
            if not sig:  # above the threshold but not distinguishable from the baseline: sampling noise (small sites)
                c.passed = True
                c.note = (f"above the threshold but not significant: one-sided lower bound {bound:.4g} ≤ baseline "
                          f"{e['baseline']} (z = {z:.2f}: false-refusal rate "
                          f"{policy.audit.get('false_refusal_rate', 0.05)} over {len(family)} check(s) × {sites} site(s))")
        return c

    for name, path, key in spec:
        e = est(path)
        checks.append(significance(_le(name, None if e is None else e.get("value"), t[key], _ci(e)), e))
    checks.append(_le("exact_copies.excess_rate", est(["exact_copies", "excess_rate"]), t["exact_copy_excess_rate_max"]))
    checks.append(_le("identifier_replay.count", est(["identifier_replay", "replayed_values"]), t["identifier_replay_max"]))
    ng = est(["notes_ngram_overlap", "excess"])
    if ng is not None:
        ng = {"baseline": 0.0, **ng}
        checks.append(significance(_le("notes_ngram_overlap.excess", ng.get("value"), t["notes_ngram_excess_max"], _ci(ng),
                                       note=f"word {attacks['notes_ngram_overlap'].get('n')}-grams only in the training "
                                            f"notes vs only in the holdout's"), ng))
    nir = est(["notes_identifier_replay", "replayed_values"])
    if nir is not None:
        checks.append(_le("notes_identifier_replay.count", nir, t["notes_identifier_replay_max"],
                          note=f"control (holdout-only identifiers): {attacks['notes_identifier_replay'].get('control')}"))
    exp = attacks.get("notes_canary_exposure")
    if exp:
        top = max(exp["per_count"], key=int)
        e = exp["per_count"][top]
        checks.append(_le(f"notes_canary_exposure.count_{top}", e.get("lower_bound", e.get("ci_low")),
                          exp["chance"] + t["canary_exposure_margin_bits_max"], _ci(e),
                          note=f"lower 95 % bound of the mean exposure (bits) of the {e.get('n')} canaries repeated "
                               f"{top}× (point {e['value']:.2f}; SD at least that of no memorisation); threshold = "
                               f"chance {exp['chance']:.2f} + margin"))
    emp = attacks.get("empirical_epsilon")
    if emp:
        checks.append(_le("empirical_epsilon.lower_bound", emp["epsilon_lower_bound"], emp["claimed_epsilon"],
                          note=f"one-run canary audit, {emp['canaries']} canaries, {emp['steps']} steps"))
    passed = all(c.passed for c in checks)
    return {"verdict": "PASS" if passed else "FAIL", "passed": passed, "checks": [asdict(c) for c in checks],
            "failed": [c.check for c in checks if not c.passed], "policy": policy.name, "policy_sha256": policy.hash()}
