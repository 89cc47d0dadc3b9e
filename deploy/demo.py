"""One-command federated demo on loopback: NAFLD cohort split into 3 hospitals → certificates + node keys →
flower-superlink + 3 flower-supernode (TLS + node authentication) → `flwr run` of the dpsynth app → DP
training at every site → audits at every site → signed release → all processes stopped → summary.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from .local import REPO, LocalConsortium

SITES = ("a", "b", "c")
POLICIES = REPO / "deploy" / "policies"

# Small enough for 2 CPU cores, large enough for the model to learn something (see bench/demo_fed.py).
DEMO_RUN_CONFIG = {
    "epsilon": 3.0,
    "rounds": 3,
    "local-epochs": 4,
    "batch-size": 256,
    "release-rows": 4000,
    "min-sites": 2,
    "expected-sites": 3,
    # the note model, small for the demo (3 sites share 2 cores): 3 epochs over the whole run
    "text-epochs": 3,
    "text-d-model": 32,
    # the record model drives the demo's utility headline: half of each site's privacy loss (μ²) goes to it,
    # a quarter each to the vitals flow and the note model (equal thirds gave σ ≈ 2.7–3.4 to the WGAN)
    "budget-shares": "wgan=2,flow=1,text=1",
}


def prepare_sites(out: Path) -> dict:
    """The demo cohort and one directory per hospital (data file, schema, policy, state)."""
    from dpsynth.data.demo import write_demo

    info = write_demo(out / "data", notes=True)  # rendered demonstration notes (labelled: not real clinical text)
    for s in SITES:
        d = out / "sites" / s
        d.mkdir(parents=True, exist_ok=True)
    return info


def run_demo(out: str | Path, *, insecure: bool = False, run_config: dict | None = None, echo: bool = True,
             timeout: float = 1800.0) -> dict:
    t0 = time.time()
    out = Path(out).resolve()
    keys = out / "keys"
    if out.exists():
        for child in out.iterdir():  # a re-run starts fresh (site budgets included); the signing key is kept
            if child.name != "keys":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    info = prepare_sites(out)
    print(f"demo cohort: {info['patients']} patients → sites {info['sites']} (+ {info['holdout']} public holdout)",
          flush=True)
    if not (keys / "release.key").exists():
        from dpsynth.release import new_keys

        new_keys(keys)
    rc = dict(DEMO_RUN_CONFIG)
    rc.update(run_config or {})
    rc["out-dir"] = str(out / "run")
    rc["key-path"] = str(keys / "release.key")
    with LocalConsortium(out, insecure=insecure) as fed:
        fed.start_superlink()
        print(f"SuperLink on {fed.address} ({'INSECURE' if insecure else 'TLS, SuperNode authentication on'})", flush=True)
        for s in SITES:
            fed.register(s)
        for s in SITES:
            fed.start_supernode(s, data_path=out / "data" / f"site_{s}.csv", site_dir=out / "sites" / s,
                                policy_path=POLICIES / f"site_{s}.toml")
        print(f"3 SuperNodes started (sites {', '.join(SITES)}); logs in {fed.logs}", flush=True)
        code = fed.run_app(rc, timeout=timeout, echo=echo)
    summary_path = out / "run" / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"the run wrote no summary (flwr run exited {code}); see {out / 'logs'} and "
                           f"{out / 'run' / 'logs'}")
    summary = json.loads(summary_path.read_text())
    summary["wall_seconds"] = round(time.time() - t0, 1)
    summary["flwr_run_exit_code"] = code
    if summary["status"] == "released":
        from dpsynth.release import verify_release

        verify_release(summary["release"], keys / "release.pub")
        summary["verified"] = True
    print_summary(summary, out)
    return summary


def print_summary(s: dict, out: Path) -> None:
    line = "=" * 78
    print(f"\n{line}\ndpsynth federated demo: {s['status'].upper()}  ({s.get('wall_seconds', s.get('seconds'))} s)")
    print(f"sites:     {', '.join(s.get('sites') or []) or '—'}"
          + (f"   dropped: {s['dropped_sites']}" if s.get("dropped_sites") else ""))
    print(f"rounds:    {s.get('rounds_done')}/{s.get('rounds_planned')}")
    priv = s.get("privacy") or {}
    for site, v in sorted((priv.get("sites") or {}).items()):
        print(f"  site {site}: ε = {v['epsilon']:.3f} (cap {v['cap']:.3g}), δ = {v['delta']:g}, σ = {v['noise_multiplier']:.3f}, "
              f"steps = {v['steps']}")
    if priv.get("consortium_epsilon") is not None:
        print(f"consortium ε = {priv['consortium_epsilon']:.3f} (max over sites: disjoint patients), "
              f"δ = {priv['consortium_delta']:g}")
    for site, u in sorted((s.get("utility") or {}).items()):
        if u and "error" not in u:
            r = u.get("tstr_trtr_auroc_ratio")
            print(f"  utility at site {site}: TSTR/TRTR AUROC {r if r is None else round(r, 3)}, mean APD "
                  f"{u.get('mean_apd', float('nan')):.4f}, correlation distance {u.get('correlation_distance', float('nan')):.4f}")
    print(f"gate:      {s.get('verdict') or '—'}")
    if s.get("release"):
        print(f"release:   {s['release']}  (verified: {s.get('verified', False)})")
        print(f"           dpsynth verify {s['release']} --public-key {out / 'keys' / 'release.pub'}")
    else:
        print(f"release:   none — {s.get('message')}")
    print(f"logs:      {out / 'logs'} (superlink, supernode_*, flwr_run) and {out / 'run' / 'logs'}")
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m deploy demo")
    p.add_argument("--out", default="out/federated")
    p.add_argument("--insecure", action="store_true",
                   help="DANGER: no TLS, no node authentication (debugging on a trusted machine only)")
    p.add_argument("--run-config", default="", help="extra run config, e.g. 'rounds=2 epsilon=2.0'")
    a = p.parse_args(argv)
    extra = {}
    if a.run_config:
        import tomllib

        extra = tomllib.loads("\n".join(a.run_config.split()))
    s = run_demo(a.out, insecure=a.insecure, run_config=extra)
    return 0 if s["status"] == "released" else (4 if s["status"] == "refused" else 1)


if __name__ == "__main__":
    sys.exit(main())
