"""The release gate: each policy check with its value, threshold and pass/fail; the verdict is their AND."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .policy import Policy


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


def decide(attacks: dict, dp: dict | None, policy: Policy) -> dict:
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
    for name, path, key in spec:
        e = est(path)
        c = _le(name, None if e is None else e.get("value"), t[key], _ci(e))
        if (name in significant_only and not c.passed and e is not None and e.get("baseline") is not None
                and e.get("ci_low") is not None and e["ci_low"] <= e["baseline"]):
            # above the threshold but not distinguishable from the baseline: sampling noise (small sites)
            c.passed = True
            c.note = f"above the threshold but its 95 % CI includes the baseline {e['baseline']} (not significant)"
        checks.append(c)
    checks.append(_le("exact_copies.excess_rate", est(["exact_copies", "excess_rate"]), t["exact_copy_excess_rate_max"]))
    checks.append(_le("identifier_replay.count", est(["identifier_replay", "replayed_values"]), t["identifier_replay_max"]))
    ng = est(["notes_ngram_overlap", "excess"])
    if ng is not None:
        c = _le("notes_ngram_overlap.excess", ng.get("value"), t["notes_ngram_excess_max"], _ci(ng),
                note=f"word {attacks['notes_ngram_overlap'].get('n')}-grams only in the training notes vs only in the holdout's")
        if ("notes_ngram_overlap.excess" in significant_only and not c.passed and ng.get("ci_low") is not None
                and ng["ci_low"] <= ng.get("baseline", 0.0)):
            c.passed = True
            c.note = f"above the threshold but its 95 % CI includes the baseline {ng.get('baseline', 0.0)} (not significant)"
        checks.append(c)
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
