"""Aggregation and the checks the coordinator applies to what sites send (no Flower imports here).

FedAvg of each model's weights (generator, critic, flow, note model), weighted by each site's expected number
of DP batches of that model in the round (local epochs × ⌈n/batch⌉ for the record and the flow; the note
model's planned steps per round, ∝ ⌈n_notes/text batch⌉, for the note model: a site's share of the round's
expected examples of that model). Schema agreement: every site's
schema is compared by hash; a mismatch names the site and the differing columns.
"""

from __future__ import annotations

import json
from collections import Counter

import torch

from dpsynth.errors import DpsynthError


class ConsortiumError(DpsynthError):
    """The run cannot go on (schema mismatch, too few sites, ...): nothing is released."""


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    if not states:
        raise ConsortiumError("nothing to aggregate")
    if len(states) != len(weights) or any(w <= 0 for w in weights):
        raise ConsortiumError(f"invalid aggregation weights {weights}")
    total = float(sum(weights))
    out = {}
    for k in states[0]:
        acc = torch.zeros_like(states[0][k], dtype=torch.float64)
        for s, w in zip(states, weights):
            acc += (w / total) * s[k].to(torch.float64)
        out[k] = acc.to(states[0][k].dtype)
    return out


def _columns(schema_json: dict) -> dict[str, dict]:
    return {c["name"]: c for c in schema_json.get("columns", [])}


def schema_differences(reference: dict, other: dict) -> list[str]:
    """Human-readable column differences (schemas are public metadata: bounds, categories, kinds)."""
    a, b = _columns(reference), _columns(other)
    diffs = []
    for name in sorted(set(a) | set(b)):
        if name not in b:
            diffs.append(f"{name} (missing at the site)")
        elif name not in a:
            diffs.append(f"{name} (only at the site)")
        elif a[name] != b[name]:
            keys = sorted(k for k in set(a[name]) | set(b[name]) if a[name].get(k) != b[name].get(k))
            detail = ", ".join(f"{k}: {a[name].get(k)!r} vs {b[name].get(k)!r}" for k in keys[:4])
            diffs.append(f"{name} ({detail})")
    ra = {k: v for k, v in reference.items() if k != "columns"}
    rb = {k: v for k, v in other.items() if k != "columns"}
    for k in sorted(set(ra) | set(rb)):
        if ra.get(k) != rb.get(k):
            diffs.append(f"[schema field {k!r} differs]")
    return diffs


def check_schema_agreement(schemas: dict[str, tuple[str, str]]) -> tuple[str, str]:
    """``schemas``: site → (sha256, schema JSON text). Returns the agreed (sha256, JSON) or raises
    ConsortiumError naming every disagreeing site and its differing columns. The reference is the schema
    held by most sites (ties: the one of the alphabetically first site)."""
    if not schemas:
        raise ConsortiumError("no site reported a schema")
    counts = Counter(h for h, _ in schemas.values())
    best = max(counts.values())
    ref_hash = min((site for site, (h, _) in schemas.items() if counts[h] == best), key=str)
    ref_hash = schemas[ref_hash][0]
    ref_json = next(j for h, j in schemas.values() if h == ref_hash)
    holders = sorted(s for s, (h, _) in schemas.items() if h == ref_hash)
    problems = []
    for site in sorted(schemas):
        h, j = schemas[site]
        if h != ref_hash:
            diffs = schema_differences(json.loads(ref_json), json.loads(j))
            problems.append(f"site {site!r} holds a different schema (sha256 {h[:12]}… vs {ref_hash[:12]}… held by "
                            f"{', '.join(holders)}); differing columns: {'; '.join(diffs) or 'none found (formatting?)'}")
    if problems:
        raise ConsortiumError("schema mismatch, the run is stopped before any training: " + " | ".join(problems))
    return ref_hash, ref_json


def worst_case_gate(site_audits: dict[str, dict]) -> dict:
    """Combine the sites' gates: the release passes only if every audited site passes. For each check the
    worst site's value is reported (largest value for '<=' checks)."""
    checks: dict[str, dict] = {}
    for site, a in sorted(site_audits.items()):
        for c in a["gate"]["checks"]:
            cur = checks.get(c["check"])
            v = c["value"]
            worse = cur is None or (not c["passed"] and cur["passed"]) or (
                c["comparison"] == "<=" and isinstance(v, (int, float)) and isinstance(cur["value"], (int, float))
                and cur["passed"] == c["passed"] and v > cur["value"])
            if worse:
                checks[c["check"]] = {**c, "site": site}
    verdicts = {s: a["gate"]["verdict"] for s, a in site_audits.items()}
    passed = bool(site_audits) and all(v == "PASS" for v in verdicts.values())
    return {
        "verdict": "PASS" if passed else "FAIL",
        "passed": passed,
        "rule": "the release passes only if the audit passes at every site that audited it (worst site decides)",
        "sites": verdicts,
        "failed": sorted({f"{s}:{c}" for s, a in site_audits.items() for c in a["gate"]["failed"]}),
        "worst_checks": list(checks.values()),
    }
