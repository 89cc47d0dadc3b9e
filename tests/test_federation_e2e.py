"""Real Flower processes on 127.0.0.1: flower-superlink (TLS + SuperNode auth), flower-supernode per site,
`flwr supernode register`, `flwr run`. Small models so the runs stay short on 2 cores.

One consortium serves the tests that `make test` runs. Every ClientApp message starts a fresh `flwr-clientapp`
process that imports torch and Opacus (≈ 8 s of CPU on a slow 2-core machine), so each run is costly and the
faults are drilled together:
- run 0: sites a and f, whose reviewed schema widens sbp's bounds: the run stops at the plan, naming f;
- run 1 (greedy ε 50 request, one round, five sites): c is SIGKILLed after reserving round 1 (the SuperLink
  notices only after its ≈ 60 s heartbeat timeout), d sends NaN weights and e an oversized report (node-config
  fault drill); a and b finish the round, each capped by its own policy, and release (that the survivors go
  on to a next round is checked in process: tests/test_federation.py, the malformed-weights run);
- run 2: c restarted resumes with its spent budget, and a, b and c train, audit and release together;
- an unregistered node is refused.
Marked slow (`make test-slow`), each with an in-process twin in tests/test_federation.py: a killed node below
the minimum number of sites, and the note model over real processes."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import federation_test_policy as _test_policy
from conftest import ledger_reserves as _reserves

from deploy.local import LocalConsortium

E2E = {"rounds": 2, "local-epochs": 1, "batch-size": 512, "release-rows": 800, "audit-empirical": False,
       "site-utility": False, "latent-dim": 16, "gen-hidden": 32, "critic-hidden": 32, "min-sites": 2,
       "expected-sites": 3, "wait-for-nodes": 60.0, "round-timeout": 300.0}
CAPS = {"a": 3.0, "b": 3.0, "c": 2.0}
FAULTS = {"d": ("nan-weights", "a"), "e": ("oversized", "b")}  # site: (fault injected, whose data it holds)


def _policies(d: Path) -> dict[str, Path]:
    out = {}
    for s, cap in CAPS.items():
        p = d / f"policy_{s}.toml"
        p.write_text(f'max_epsilon = {cap}\ndelta = 1e-5\nallowed_models = ["wgan", "flow"]\nmin_patients = 100\n')
        out[s] = p
    return out


def _start(fed: LocalConsortium, demo_dir: Path, root: Path, sites=("a", "b", "c")) -> None:
    pol = _policies(root)
    fed.start_superlink()
    for s in sites:
        fed.register(s)
    for s in sites:
        fed.start_supernode(s, data_path=demo_dir / f"site_{s}.csv", site_dir=root / "sites" / s, policy_path=pol[s])


def _start_faulty(fed: LocalConsortium, demo_dir: Path, root: Path) -> None:
    for s, (fault, data) in FAULTS.items():
        fed.register(s)
        fed.start_supernode(s, data_path=demo_dir / f"site_{data}.csv", site_dir=root / "sites" / s,
                            policy_path=root / "policy_a.toml", extra_node_config={"fault-inject": fault})


def _run(fed: LocalConsortium, root: Path, name: str, **overrides) -> dict:
    rc = dict(E2E)
    rc.update(overrides)
    rc["out-dir"] = str(root / name)
    rc.setdefault("audit-policy", _test_policy(root))
    fed.run_app(rc, timeout=600, echo=False)
    p = root / name / "summary.json"
    assert p.exists(), (fed.logs / "flwr_run.log").read_text()[-4000:]
    return json.loads(p.read_text())


def _wait_for(pred, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _reserved_rounds(site_dir: Path) -> int:
    p = site_dir / "ledger.jsonl"
    if not p.exists():
        return 0
    return sum(1 for line in p.read_text().splitlines() if '"event": "reserve"' in line)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory, demo_dir, schema):
    """The SuperLink, site a, and site f whose reviewed schema widens sbp's bounds (for run 0); the other sites
    join in ``mismatch_run``, after f has left."""
    root = tmp_path_factory.mktemp("consortium")
    fed = LocalConsortium(root)
    try:
        pol = _policies(root)
        d = schema.to_json()
        for c in d["columns"]:
            if c["name"] == "sbp":
                c["upper"] = 300.0
        (root / "schema_f.json").write_text(json.dumps(d))
        fed.start_superlink()
        for s in ("a", "f"):
            fed.register(s)
        fed.start_supernode("a", data_path=demo_dir / "site_a.csv", site_dir=root / "sites" / "a", policy_path=pol["a"])
        fed.start_supernode("f", data_path=demo_dir / "site_a.csv", site_dir=root / "sites" / "f", policy_path=pol["a"],
                            extra_node_config={"schema-path": str(root / "schema_f.json")})
        yield fed, root
    finally:
        fed.stop()


@pytest.fixture(scope="module")
def mismatch_run(consortium, demo_dir):
    """Run 0: a and f disagree on the schema, so the run stops before training. Then f leaves and b, c and the
    two faulty sites d and e join."""
    fed, root = consortium
    try:
        s = _run(fed, root, "run_mismatch", **{"expected-sites": 2})
    finally:
        fed.stop_one("supernode_f")
    for site in ("b", "c"):
        fed.register(site)
        fed.start_supernode(site, data_path=demo_dir / f"site_{site}.csv", site_dir=root / "sites" / site,
                            policy_path=root / f"policy_{site}.toml")
    _start_faulty(fed, demo_dir, root)
    return s


@pytest.fixture(scope="module")
def faulty_run(consortium, mismatch_run):
    """Run 1: five sites, one round; c is killed after reserving it, d and e send malformed replies."""
    fed, root = consortium
    holder = {}
    # greedy coordinator: every site must cap it at its own policy
    t = threading.Thread(target=lambda: holder.setdefault(
        "s", _run(fed, root, "run1", epsilon=50.0, rounds=1, **{"expected-sites": 5})))
    t.start()
    try:
        _wait_for(lambda: _reserved_rounds(root / "sites" / "c") >= 1, 300, "site c to reserve round 1")
    finally:
        fed.kill("supernode_c", signal.SIGKILL)
        t.join(timeout=600)
    assert "s" in holder, "run 1 did not finish"
    return holder["s"]


@pytest.fixture(scope="module")
def restart_run(consortium, faulty_run, demo_dir):
    """Run 2: d and e stopped, c restarted on its site directory; a, b and c train, audit and release."""
    fed, root = consortium
    for s in FAULTS:
        fed.stop_one(f"supernode_{s}")
    c_spent = _reserves(root / "sites" / "c")[-1]["epsilon_after"]
    c_steps = sum(m["steps"] for m in json.loads((root / "sites" / "c" / "state.json").read_text())["accountant"]["history"])
    fed.start_supernode("c", data_path=demo_dir / "site_c.csv", site_dir=root / "sites" / "c",
                        policy_path=root / "policy_c.toml")
    s = _run(fed, root, "run2", epsilon=50.0, rounds=1)
    return s, c_spent, c_steps


def test_schema_mismatch_stops_the_run_naming_the_site(consortium, mismatch_run):
    _fed, root = consortium
    s = mismatch_run
    assert s["status"] == "failed" and s["release"] is None and s["rounds_done"] == 0
    assert "site 'f'" in s["message"] and "sbp" in s["message"]
    assert not (root / "run_mismatch" / "release").exists()
    for site in ("a", "f"):  # nothing was reserved (spent) for the stopped run at either site
        assert not [r for r in _reserves(root / "sites" / site) if r["run_id"] == s["run_id"]]


def test_killed_and_malformed_sites_are_dropped_and_the_rest_release_over_tls_with_node_auth(consortium, faulty_run):
    from dpsynth.privacy.ledger import Ledger
    from dpsynth.release import verify_release

    fed, root = consortium
    s = faulty_run
    assert s["status"] == "released", s.get("message")
    assert sorted(s["sites"]) == ["a", "b"]
    dropped = s["dropped_sites"]
    assert set(dropped) == {"c", "d", "e"}
    assert "heartbeat" in dropped["c"] or "Unavailable" in dropped["c"], dropped["c"]
    assert "NaN" in dropped["d"] and "malformed" in dropped["d"]
    assert "characters" in dropped["e"] and "malformed" in dropped["e"]
    assert (root / "run1" / "consortium-ledger.jsonl").read_text().count('"site-dropped"') == 3
    man = verify_release(s["release"], root / "run1" / "keys" / "release.pub")
    sites = man["privacy"]["sites"]
    assert set(sites) == {"a", "b"}
    for site in ("a", "b"):  # the site policy wins over the greedy ε = 50 request
        assert sites[site]["epsilon"] <= CAPS[site] * (1 + 1e-6) and sites[site]["cap"] == CAPS[site]
        assert man["sites"][site]["ledger_head"] == Ledger(root / "sites" / site / "ledger.jsonl").verify()
    assert man["privacy"]["consortium_epsilon"] == pytest.approx(max(v["epsilon"] for v in sites.values()))
    assert man["audit"]["verdict"] == "PASS"
    # the killed site's ledger is consistent and its spend (charged at reservation, before training) is on disk
    assert Ledger(root / "sites" / "c" / "ledger.jsonl").verify()
    assert [r["round"] for r in _reserves(root / "sites" / "c")] == [1]
    # TLS and node authentication were on; every process has its own log
    cmd = (fed.logs / "superlink.log").read_text().splitlines()[0]
    assert "--enable-supernode-auth" in cmd and "--ssl-certfile" in cmd and "--insecure" not in cmd
    for name in ("superlink", "supernode_a", "supernode_b", "supernode_c", "supernode_d", "flwr_run", "register_a"):
        assert (fed.logs / f"{name}.log").exists()
    log = (root / "run1" / "logs" / "serverapp.log").read_text()
    assert "consortium ledger after round 1" in log and "site d dropped" in log and "site e dropped" in log
    for site in ("a", "b"):
        assert [r["round"] for r in _reserves(root / "sites" / site) if r["run_id"] == s["run_id"]] == [1]


def test_a_restarted_site_resumes_its_budget_and_three_sites_release(consortium, restart_run):
    from dpsynth.privacy.ledger import Ledger
    from dpsynth.release import verify_release

    _fed, root = consortium
    s, c_spent, c_steps = restart_run
    assert s["status"] == "released", s.get("message")
    assert sorted(s["sites"]) == ["a", "b", "c"] and not s["dropped_sites"]
    man = verify_release(s["release"], root / "run2" / "keys" / "release.pub")
    sites = man["privacy"]["sites"]
    for site, cap in CAPS.items():  # lifetime caps: run 2 adds to what run 1 spent
        assert sites[site]["epsilon"] <= cap * (1 + 1e-6) and sites[site]["cap"] == cap
        assert man["sites"][site]["ledger_head"] == Ledger(root / "sites" / site / "ledger.jsonl").verify()
    assert man["audit"]["verdict"] == "PASS"
    plans = [e["data"] for e in Ledger(root / "sites" / "c" / "ledger.jsonl").entries() if e["event"] == "plan"]
    assert len(plans) == 2 and plans[-1]["prior_epsilon"] == pytest.approx(c_spent, rel=1e-6)
    st = json.loads((root / "sites" / "c" / "state.json").read_text())
    assert sum(m["steps"] for m in st["accountant"]["history"]) > c_steps


def test_an_unregistered_node_is_refused(consortium, tmp_path):
    from deploy.certs import make_node_key

    fed, root = consortium
    key, _pub = make_node_key(tmp_path, "intruder")  # never registered
    p = fed.start_supernode("x", data_path=root / "policy_a.toml", site_dir=tmp_path / "x", policy_path=None,
                            key=key, name="supernode_intruder")
    try:
        p.popen.wait(timeout=90)
    finally:
        fed.stop_one("supernode_intruder")
    assert p.popen.returncode not in (0, None)
    text = p.log_text()
    assert "Failed to initialize the connection" in text or "2004" in text, text[-2000:]


@pytest.mark.slow  # ~80-100 s; make test keeps the in-process twin (tests/test_federation.py) under the 15-min budget
def test_the_note_model_travels_in_the_rounds_and_the_signed_release(tmp_path):
    """Real processes, two hospitals that allow notes (issue 7): the note model's weights travel as the
    ArrayRecord "text" in the same rounds as the record and the vitals, every site charges its steps to its own
    accountant, the audits at the sites check the notes, and the signed bundle carries the note model."""
    import pandas as pd

    from dpsynth.data.demo import write_demo
    from dpsynth.privacy.ledger import Ledger
    from dpsynth.release import verify_release

    data = tmp_path / "data"
    write_demo(data, notes=True)
    with LocalConsortium(tmp_path) as fed:
        fed.start_superlink()
        for s in ("a", "b"):
            fed.register(s)
        for s in ("a", "b"):
            pol = tmp_path / f"policy_notes_{s}.toml"
            pol.write_text(f'max_epsilon = {CAPS[s]}\ndelta = 1e-5\nmin_patients = 100\n'
                           'allowed_models = ["wgan", "flow", "text"]\nallow_notes = true\n')
            fed.start_supernode(s, data_path=data / f"site_{s}.csv", site_dir=tmp_path / "sites" / s, policy_path=pol)
        s = _run(fed, tmp_path, "run_notes", rounds=1, models="wgan,flow,text", **{
            "expected-sites": 2, "text-epochs": 1, "text-batch-size": 400, "text-d-model": 32, "text-layers": 1,
            "text-heads": 4, "text-max-len": 96})
    assert s["status"] == "released", s.get("message")
    man = verify_release(s["release"], tmp_path / "run_notes" / "keys" / "release.pub")
    assert man["model"]["models"] == ["wgan", "flow", "text"] and man["model"]["text_sha256"] == man["files"]["text.safetensors"]
    assert "tokenizer.json" in man["files"]
    for site in ("a", "b"):
        st = json.loads((tmp_path / "sites" / site / "state.json").read_text())
        text = [m["steps"] for m in st["accountant"]["history"] if m["mechanism"] == "dp-sgd:text"]
        assert text == [st["plan"]["text_steps_per_round"]]
        assert man["sites"][site]["ledger_head"] == Ledger(tmp_path / "sites" / site / "ledger.jsonl").verify()
        assert "notes_ngram_overlap.excess" in {c["check"] for c in man["sites"][site]["audit_checks"]}
    syn = pd.read_csv(Path(s["release"]) / "synthetic.csv", keep_default_na=False)
    assert (syn["note"].str.len() > 0).mean() > 0.5


# ---- a killed node below the minimum number of sites (slow: the SuperLink waits out its heartbeat) --------

@pytest.mark.slow
def test_killed_node_below_min_sites_stops_cleanly_and_releases_nothing(tmp_path, demo_dir):
    with LocalConsortium(tmp_path) as fed:
        _start(fed, demo_dir, tmp_path)
        holder = {}
        t = threading.Thread(target=lambda: holder.setdefault(
            "s", _run(fed, tmp_path, "run_kill3", rounds=3, **{"min-sites": 3})))
        t.start()
        _wait_for(lambda: _reserved_rounds(tmp_path / "sites" / "c") >= 1, 300, "site c to reserve round 1")
        fed.kill("supernode_c", signal.SIGKILL)
        t.join(timeout=600)
        s = holder["s"]
        assert s["status"] == "failed" and "min-sites = 3" in s["message"]
        assert not (tmp_path / "run_kill3" / "release").exists()
