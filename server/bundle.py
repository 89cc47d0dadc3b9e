"""The signed consortium release: same bundle format as the single-site release (dpsynth verify works on it).

Only called after the worst-site gate passed. The manifest carries every site's budget (ε, δ, σ, q, steps,
mechanisms), every site's budget-ledger head, every site's audit verdict, the consortium ledger head, the
consortium ε (the maximum: sites hold disjoint patients) and the policy. The aggregated models travel with
the release, hash-checked like every file: generator.safetensors, flow.safetensors (the vitals flow) and
text.safetensors + tokenizer.json (the note model and its public, schema-only tokenizer) when trained.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from datetime import datetime, timezone
from pathlib import Path

from dpsynth.io_utils import atomic_write_json, atomic_write_text, output_dir, sha256_file
from dpsynth.release import RELEASE_FORMAT, key_fingerprint, load_private_key, tool_versions

FEDERATED_AUDIT_FORMAT = "dpsynth-federated-audit/1"


def _versions() -> dict:
    v = tool_versions()
    try:
        from importlib.metadata import version

        v["flwr"] = version("flwr")
    except Exception:  # pragma: no cover
        v["flwr"] = None
    return v


def consortium_html(summary: dict, gate: dict, site_audits: dict[str, dict]) -> str:
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(s)}</td><td>{esc(str(a['gate']['verdict']))}</td>"
        f"<td>{a['dp'].get('epsilon', float('nan')):.4f}</td><td>{a['dp'].get('delta')}</td>"
        f"<td>{esc(', '.join(a['gate']['failed']) or '—')}</td></tr>"
        for s, a in sorted(site_audits.items()))
    checks = "".join(
        f"<tr><td>{esc(c['check'])}</td><td>{esc(str(c['value']))}</td><td>{esc(c['comparison'])} "
        f"{esc(str(c['threshold']))}</td><td>{'PASS' if c['passed'] else 'FAIL'}</td><td>{esc(c['site'])}</td></tr>"
        for c in gate["worst_checks"])
    priv = summary["privacy"]
    def note_model(v: dict) -> str:
        if v.get("text_noise_multiplier") is None:
            return ""
        return f"; note model σ = {v['text_noise_multiplier']:.4g}, q = {v['text_sample_rate']:.4g}"

    per_site = "".join(f"<li>{esc(s)}: ε = {v['epsilon']:.4f}, δ = {v['delta']:g}, σ = {v['noise_multiplier']:.4g}, "
                       f"q = {v['sample_rate']:.4g}, steps = {v['steps']}{note_model(v)}</li>"
                       for s, v in sorted(priv["sites"].items()))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>dpsynth consortium release</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}td,th{{border:1px solid #ccc;padding:3px 6px}}
table{{border-collapse:collapse}}</style></head><body>
<h1>dpsynth consortium release — verdict {esc(gate['verdict'])}</h1>
<p>{esc(gate['rule'])}. Audits ran at every site against its own training patients (members) and its own holdout
(non-members); only aggregate numbers left the sites. Each site's report is in this bundle.</p>
<h2>Privacy</h2><p>Unit: one patient; adjacency: add/remove one patient. Sites hold disjoint patients, so the
consortium ε is the maximum site ε (parallel composition): <b>ε = {priv['consortium_epsilon']:.4f}</b>,
δ = {priv['consortium_delta']:g}. Accountant: {esc(priv['accountant'])}.</p><ul>{per_site}</ul>
<h2>Sites</h2><table><tr><th>site</th><th>verdict</th><th>ε</th><th>δ</th><th>failed checks</th></tr>{rows}</table>
<h2>Worst site per check</h2><table><tr><th>check</th><th>value</th><th>threshold</th><th>result</th><th>site</th></tr>
{checks}</table><p>Generated {esc(summary['created_utc'])} by dpsynth (federated, Flower).</p></body></html>"""


def write_bundle(*, out: Path, synthetic_csv: Path, key_path: Path, gate: dict, site_audits: dict[str, dict],
                 summary: dict, generator_file: Path, schema_json: str, policy: dict, policy_sha256: str,
                 models: list[str] | None = None) -> dict:
    """Write and sign the bundle into ``out`` (must not exist). Returns the manifest."""
    from audits.report import render

    if not gate["passed"]:
        raise RuntimeError("write_bundle called for a failed gate")  # the caller checks first; belt and braces
    key = load_private_key(key_path)
    with output_dir(out) as tmp:
        (tmp / "synthetic.csv").write_bytes(synthetic_csv.read_bytes())
        (tmp / "generator.safetensors").write_bytes(generator_file.read_bytes())
        model_files = {"flow": ("flow.safetensors",), "text": ("text.safetensors", "tokenizer.json")}
        for m, names in model_files.items():
            if models and m in models:
                for name in names:
                    (tmp / name).write_bytes((generator_file.parent / name).read_bytes())
        atomic_write_text(tmp / "schema.json", schema_json)
        audit = {"format": FEDERATED_AUDIT_FORMAT, "gate": gate, "sites": site_audits,
                 "synthetic_sha256": sha256_file(synthetic_csv), "created_utc": summary["created_utc"]}
        atomic_write_json(tmp / "audit.json", audit)
        atomic_write_text(tmp / "report.html", consortium_html(summary, gate, site_audits))
        for s, a in sorted(site_audits.items()):
            atomic_write_text(tmp / f"site_{s}_audit.html", render(a, title=f"dpsynth audit at site {s}"))
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        manifest = {
            "format": RELEASE_FORMAT,
            "kind": "federated",
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": files,
            "synthetic_file": "synthetic.csv",
            "model": {"generator_sha256": files["generator.safetensors"], "flow_sha256": files.get("flow.safetensors"),
                      "text_sha256": files.get("text.safetensors"), "tokenizer_sha256": files.get("tokenizer.json"),
                      "models": list(models or ["wgan"])},
            "schema_sha256": hashlib.sha256(schema_json.encode()).hexdigest(),
            "privacy": summary["privacy"],
            "sites": {s: {"ledger_head": a.get("spend", {}).get("ledger_head"), "epsilon": a["dp"].get("epsilon"),
                          "delta": a["dp"].get("delta"), "audit_verdict": a["gate"]["verdict"],
                          "audit_failed": a["gate"]["failed"], "audit_checks": a["gate"]["checks"],
                          "utility": a.get("utility")}
                      for s, a in sorted(site_audits.items())},
            "dropped_sites": summary.get("dropped_sites", {}),
            "rounds": summary["rounds_done"],
            "audit": {"verdict": gate["verdict"], "rule": gate["rule"], "sha256": files["audit.json"],
                      "created_utc": summary["created_utc"]},
            "policy": policy,
            "policy_sha256": policy_sha256,
            "consortium_ledger_head": summary.get("consortium_ledger_head"),
            "budget_ledger_head": summary.get("consortium_ledger_head"),
            "tool_versions": _versions(),
            "signing_key_sha256": key_fingerprint(key.public_key()),
        }
        body = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        (tmp / "manifest.json").write_bytes(body)
        (tmp / "manifest.sig").write_text(base64.b64encode(key.sign(body)).decode() + "\n")
    return manifest
