"""Audit controls: releasing the training rows fails every attack; an independent draw passes."""

import numpy as np
import pandas as pd
import pytest

from audits.audit import run_audit
from audits.policy import Policy, default_policy
from dpsynth.errors import DpsynthError
from dpsynth.schema import validate_frame

DP = {"differentially_private": True, "epsilon": 3.0, "delta": 1e-6}
ATTACK_CHECKS = {"mia_distance.auc", "mia_distance.f1", "mia_density.auc", "mia_density.tpr_at_fpr_1pct",
                 "attribute_inference.residual", "inference_risk.risk", "nnaa.privacy_loss", "dcr.share",
                 "exact_copies.excess_rate", "identifier_replay.count"}


@pytest.fixture(scope="module")
def frames(demo_dir, schema):
    tr = validate_frame(pd.read_csv(demo_dir / "train.csv"), schema, "train")
    ho = validate_frame(pd.read_csv(demo_dir / "holdout.csv"), schema, "holdout")
    return tr, ho


@pytest.fixture(scope="module")
def real_copy_audit(frames, schema):
    tr, ho = frames
    return run_audit(tr, ho, tr, schema, dp=DP, policy=_small())


@pytest.fixture(scope="module")
def independent_audit(frames, schema):
    tr, ho = frames
    half = len(ho) // 2  # the release is one half of the holdout, the audit's non-members the other
    return run_audit(tr, ho.iloc[:half].reset_index(drop=True), ho.iloc[half:].reset_index(drop=True), schema,
                     dp=DP, policy=_small())


def _small():
    p = default_policy()
    p.audit["max_victims"] = 1000
    return p


def test_positive_control_releasing_training_rows_fails_every_attack(real_copy_audit):
    gate = real_copy_audit["gate"]
    assert gate["verdict"] == "FAIL"
    failed = set(gate["failed"])
    assert ATTACK_CHECKS <= failed, ATTACK_CHECKS - failed
    at = real_copy_audit["attacks"]
    assert at["mia_distance"]["f1"]["value"] > 0.85  # the tutorial's ≈ 0.9 for a real-data release
    assert at["mia_distance"]["auc"]["ci_low"] > 0.9


def test_negative_control_independent_draw_passes(independent_audit):
    gate = independent_audit["gate"]
    assert gate["verdict"] == "PASS", [c for c in gate["checks"] if not c["passed"]]
    at = independent_audit["attacks"]
    assert at["mia_distance"]["f1"]["value"] < 0.35  # good synthetic data ≈ 0.3 in the tutorial
    assert at["mia_distance"]["auc"]["ci_low"] < 0.5 < at["mia_distance"]["auc"]["ci_high"] + 0.02


def test_every_result_has_value_ci_baseline_and_no_per_record_distances(independent_audit):
    import json

    at = independent_audit["attacks"]
    for est in (at["mia_distance"]["auc"], at["mia_density"]["auc"], at["attribute_inference"]["residual"],
                at["inference_risk"]["risk"], at["nnaa"]["privacy_loss"], at["dcr"]["share"]):
        assert {"value", "ci_low", "ci_high", "baseline", "n"} <= set(est)
        assert est["ci_low"] <= est["value"] <= est["ci_high"]
    # the only arrays are aggregate: ROC points (≤ 60), histogram counts (30 bins), threshold curves (41)
    def arrays(node):
        if isinstance(node, dict):
            for v in node.values():
                yield from arrays(v)
        elif isinstance(node, list):
            yield node
            for v in node:
                yield from arrays(v)
    assert max(len(a) for a in arrays(at)) <= 61
    assert independent_audit["sample"]["victims_per_group"] == 1000
    json.dumps(independent_audit)  # serialisable


def test_dp_facts_are_required(independent_audit):
    """The gate on the passing audit's own attack results (run_audit hands them to ``decide`` with the model's DP
    facts; rerunning the attacks would only give the same results): no DP facts, or an ε over the policy's
    maximum, and the release is refused for that alone."""
    from audits.gate import decide

    at = independent_audit["attacks"]
    assert independent_audit["gate"]["verdict"] == "PASS" and decide(at, DP, _small())["verdict"] == "PASS"
    assert "dp.differentially_private" in decide(at, None, _small())["failed"]
    assert "dp.differentially_private" in decide(at, {**DP, "differentially_private": False}, _small())["failed"]
    assert decide(at, {**DP, "epsilon": 50.0}, _small())["failed"] == ["dp.epsilon"]


def test_policy_file_overrides_and_rejects_unknown_keys(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text('version = 1\nname = "strict"\n[thresholds]\nmia_distance_auc_max = 0.55\n[dp]\nmax_epsilon = 3.0\n')
    pol = Policy.load(p)
    assert pol.thresholds["mia_distance_auc_max"] == 0.55 and pol.dp["max_epsilon"] == 3.0
    assert pol.thresholds["dcr_share_max"] == default_policy().thresholds["dcr_share_max"]
    p.write_text('version = 1\n[thresholds]\nmia_auc = 0.5\n')
    with pytest.raises(DpsynthError, match="unknown threshold 'mia_auc'"):
        Policy.load(p)
    p.write_text('version = 2\n')
    with pytest.raises(DpsynthError, match="version"):
        Policy.load(p)


def test_canary_audit_flags_planted_under_noising_and_not_correct_noise():
    from audits.canary import one_run_audit
    from dpsynth.privacy.accountant import calibrate_noise

    q, steps, delta, claimed = 0.05, 100, 1e-5, 2.0
    sigma = calibrate_noise(target_epsilon=claimed, delta=delta, sample_rate=q, steps=steps, mechanism="sgd")
    ok = one_run_audit(noise_multiplier=sigma, sample_rate=q, steps=steps, max_grad_norm=1.0, delta=delta,
                       claimed_epsilon=claimed, seed=1)
    assert not ok["flagged"] and ok["epsilon_lower_bound"] < claimed
    # the accountant believes σ, the optimizer adds 1 % of it
    broken = one_run_audit(noise_multiplier=sigma * 0.01, sample_rate=q, steps=steps, max_grad_norm=1.0, delta=delta,
                           claimed_epsilon=claimed, seed=1)
    assert broken["flagged"] and broken["epsilon_lower_bound"] > claimed
    assert broken["correct"] / broken["guesses"] > 0.95


def test_epsilon_lower_bound_math():
    from audits.canary import epsilon_lower_bound

    assert epsilon_lower_bound(50, 100, delta=0, alpha=0.05) == 0.0  # chance
    lb = epsilon_lower_bound(100, 100, delta=0, alpha=0.05)  # perfect: p^100 = 0.05 → p ≈ 0.9705
    p = 0.05 ** (1 / 100)
    assert abs(lb - np.log(p / (1 - p))) < 1e-3


def test_significance_rule_applies_only_to_listed_checks():
    from audits.gate import decide

    attacks = {"dcr": {"share": {"value": 0.62, "ci_low": 0.46, "ci_high": 0.78, "baseline": 0.5}},
               "mia_distance": {"auc": {"value": 0.62, "ci_low": 0.48, "ci_high": 0.76, "baseline": 0.5}}}
    res = decide(attacks, DP, default_policy())
    checks = {c["check"]: c for c in res["checks"]}
    assert checks["dcr.share"]["passed"] and "not significant" in checks["dcr.share"]["note"]
    assert not checks["mia_distance.auc"]["passed"]
    strict = default_policy()
    strict.audit["significance_required"] = []
    checks = {c["check"]: c for c in decide(attacks, DP, strict)["checks"]}
    assert not checks["dcr.share"]["passed"]


def test_significance_rule_is_family_wise_over_checks_and_sites():
    """The one-sided bound uses z at false_refusal_rate / (significance-tested checks × sites): an excess that is
    significant for one check at one site is not once three sites audit the same release; a large one still is."""
    from statistics import NormalDist

    from audits.gate import decide, significance_z, significant_excess

    pol = default_policy()
    assert significance_z(pol, 1, 1) == pytest.approx(NormalDist().inv_cdf(0.95))
    assert significance_z(pol, 3, 2) == pytest.approx(NormalDist().inv_cdf(1 - 0.05 / 6))
    se = 0.055  # value 0.12 > threshold 0.10; ci_low 0.012 > 0: the plain 95 % CI calls it significant
    risk = {"value": 0.12, "ci_low": 0.12 - 1.96 * se, "ci_high": 0.12 + 1.96 * se, "baseline": 0.0}
    assert significant_excess(risk, significance_z(pol, 1, 1)) == (True, pytest.approx(0.12 - 1.6449 * se, abs=1e-3))

    def passed(attacks, sites):
        return {c["check"]: c["passed"] for c in decide(attacks, DP, pol, sites=sites)["checks"]}["inference_risk.risk"]

    assert not passed({"inference_risk": {"risk": risk}}, 1)
    assert passed({"inference_risk": {"risk": risk}}, 5)  # z(0.01) = 2.33: bound 0.12 − 0.128 < 0
    three = {"inference_risk": {"risk": risk}, "dcr": {"share": {"value": 0.5, "ci_low": 0.48, "ci_high": 0.52, "baseline": 0.5}},
             "notes_ngram_overlap": {"n": 8, "excess": {"value": 0.0, "ci_low": -0.01, "ci_high": 0.01, "baseline": 0.0}}}
    assert passed(three, 2)  # three tested checks × two sites: z(0.05 / 6) = 2.39
    strong = {**risk, "value": 0.4, "ci_low": 0.4 - 1.96 * se}
    assert not passed({**three, "inference_risk": {"risk": strong}}, 10)
    with pytest.raises(DpsynthError, match="false_refusal_rate"):
        Policy.from_dict({"version": 1, "audit": {"false_refusal_rate": 0.7}}, "p.toml")


def test_gate_refuses_independent_data_at_a_small_site_at_most_at_the_false_refusal_rate(demo_dir, schema):
    """Statistical: the smallest demo site (≈ 220 victims per group), 60 random train/holdout splits, each audited
    against 800 real rows of the other sites (independent of its patients: nothing memorised). Here the pooled
    inference risk's SD is ≈ 0.09 against its 0.10 threshold and the attribute-inference residual's ≈ 0.04 against
    0.05, so without the significance rule more than 1 in 12 such releases would be refused by either check.
    Seeds are fixed: the counts are reproducible."""
    from audits import attacks as A
    from audits.gate import significance_z, significant_excess

    b = validate_frame(pd.read_csv(demo_dir / "site_b.csv"), schema, "site_b")
    others = validate_frame(pd.concat([pd.read_csv(demo_dir / f"site_{s}.csv") for s in "ac"]), schema, "others")
    pol = default_policy()
    tested = {"inference_risk.risk": "inference_risk_max", "attribute_inference.residual": "attribute_inference_residual_max"}
    assert set(tested) <= set(pol.audit["significance_required"])
    z = significance_z(pol, 3, 1)  # the tabular gate tests three: DCR too

    def estimates(a):
        return {"inference_risk.risk": A.inference_risk(a)["risk"],
                "attribute_inference.residual": A.attribute_inference(a)["residual"]}

    rng = np.random.default_rng(1)
    above = dict.fromkeys(tested, 0)
    refused = 0
    reps = 60
    for r in range(reps):
        perm = rng.permutation(len(b))
        cut = int(0.8 * len(b))
        a = A.prepare(b.iloc[perm[:cut]], b.iloc[perm[cut:]], others.sample(800, random_state=r), schema, seed=r)
        refusal = False
        for name, e in estimates(a).items():
            over = e["value"] > pol.thresholds[tested[name]]
            above[name] += over
            refusal |= over and significant_excess(e, z)[0]
        refused += refusal
    for name in tested:  # the threshold alone would refuse independent data often at this size
        assert above[name] >= 0.08 * reps, (name, above)
    assert refused <= pol.audit["false_refusal_rate"] * reps  # the whole family's budget (DCR: SD 0.02 here)
    # positive control at the same size: a release of the site's own training rows is refused by both checks
    a = A.prepare(b.iloc[perm[:cut]], b.iloc[perm[cut:]], b.iloc[perm[:cut]], schema, seed=0)
    for name, e in estimates(a).items():
        assert e["value"] > pol.thresholds[tested[name]] and significant_excess(e, significance_z(pol, 4, 5))[0], name


def test_identifier_replay_in_text_ignores_short_numbers_and_counts_mrn_like_ones():
    """A 5-digit number in a note is a quantity as often as an id (NAFLD ids are dense 1–5 digit integers); a
    6-digit MRN-like number or a 5-character alphanumeric id of a training patient is a replay."""
    from audits.attacks import identifier_replay
    from dpsynth.schema import Column, Schema

    schema = Schema([Column("id", "identifier"), Column("note", "text", nullable=True)], name="t")
    train = pd.DataFrame({"id": ["12345", "654321", "AB123"], "note": ["x", "y", "z"]})
    syn = pd.DataFrame({"id": ["SYN-1", "SYN-2", "SYN-3"],
                        "note": ["wt 12345 g", "MRN 654321 seen", "ref AB123; 99999"]})
    assert identifier_replay(train, syn, schema)["replayed_values"] == 2  # 654321 and AB123, not 12345
    syn_id = syn.assign(id=["12345", "SYN-2", "SYN-3"])  # an exact id value in an identifier column always counts
    assert identifier_replay(train, syn_id, schema)["replayed_values"] == 3
