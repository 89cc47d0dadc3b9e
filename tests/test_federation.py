"""The consortium logic without processes: wire checks, FedAvg, schema agreement, the worst-site gate, and
the real ServerApp coordinator driving the real ClientApp through an in-process grid (fast). The same code
runs under real Flower processes in tests/test_federation_e2e.py."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import federation_test_policy as _test_policy
from conftest import ledger_reserves
import torch

from flwr.app import ArrayRecord, Context, Message, RecordDict

from client import wire
from server.strategy import ConsortiumError, check_schema_agreement, fedavg, worst_case_gate

FAST = {"rounds": 2, "local-epochs": 1, "batch-size": 512, "release-rows": 800, "audit-empirical": False,
        "site-utility": False, "latent-dim": 16, "gen-hidden": 32, "critic-hidden": 32, "min-sites": 2,
        "expected-sites": 3, "wait-for-nodes": 1.0, "round-timeout": 120.0, "poll-interval": 0.01}


# ---- units ---------------------------------------------------------------------------------------------

def test_fedavg_weights_by_expected_batches():
    a = {"w": torch.zeros(2, 2)}
    b = {"w": torch.ones(2, 2)}
    out = fedavg([a, b], [1, 3])
    assert torch.allclose(out["w"], torch.full((2, 2), 0.75))
    with pytest.raises(ConsortiumError):
        fedavg([a, b], [1, 0])


def test_weights_are_checked_on_arrival():
    tmpl = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    sent = {"w": torch.arange(6.0).reshape(2, 3), "b": -torch.arange(3.0)}
    good = wire.state_to_record(sent)
    assert set(good.keys()) == {"flat", "layout"}  # one vector per model (Flower sends each array as an object)
    out = wire.record_to_state(good, tmpl, who="site x", what="critic")
    layout = torch.from_numpy(good["layout"].numpy().copy())
    assert list(out) == list(tmpl) and all(torch.equal(out[k], sent[k]) for k in sent)
    bad = {
        "shape": wire.state_to_record({"w": torch.ones(3, 2), "b": torch.ones(3)}),
        "NaN": wire.state_to_record({"w": torch.full((2, 3), float("nan")), "b": torch.ones(3)}),
        "unexpected": wire.state_to_record({"w": torch.ones(2, 3), "b": torch.ones(3), "x": torch.ones(1)}),
        "dtype": ArrayRecord([np.ones((2, 3), dtype=np.float64), np.ones(3, dtype=np.float32)]),
        "flat dtype": ArrayRecord({"flat": torch.ones(9, dtype=torch.float64), "layout": layout}),
        "size": ArrayRecord({"flat": torch.ones(8), "layout": layout}),
        "Inf": ArrayRecord({"flat": torch.tensor([1.0] * 8 + [float("inf")]), "layout": layout}),
    }
    for what, rec in bad.items():
        with pytest.raises(wire.WireError, match="site x"):
            wire.record_to_state(rec, tmpl, who="site x", what="critic")


def test_oversized_and_non_finite_json_is_rejected():
    with pytest.raises(wire.WireError, match="more than"):
        wire.loads("[" + "1," * 100 + "1]", who="s", what="audit", limit=50)
    with pytest.raises(wire.WireError, match="not valid JSON"):
        wire.loads('{"x": NaN}', who="s", what="audit")
    with pytest.raises(wire.WireError):
        wire.finite_number(float("inf"), who="s", what="epsilon")


def test_schema_mismatch_names_the_site_and_the_columns(schema):
    good = schema.to_json()
    bad = json.loads(json.dumps(good))
    for c in bad["columns"]:
        if c["name"] == "age":
            c["upper"] = 150
    bad["columns"] = [c for c in bad["columns"] if c["name"] != "smoking"]
    h_good, h_bad = "a" * 64, "b" * 64
    ok = check_schema_agreement({"a": (h_good, json.dumps(good)), "b": (h_good, json.dumps(good))})
    assert ok[0] == h_good
    with pytest.raises(ConsortiumError) as e:
        check_schema_agreement({"a": (h_good, json.dumps(good)), "b": (h_good, json.dumps(good)),
                                "c": (h_bad, json.dumps(bad))})
    msg = str(e.value)
    assert "site 'c'" in msg and "age" in msg and "upper" in msg and "smoking (missing at the site)" in msg
    assert "site 'a'" not in msg


def test_the_worst_site_decides_the_gate():
    def audit(verdict, value):
        return {"gate": {"verdict": verdict, "passed": verdict == "PASS", "failed": [] if verdict == "PASS" else ["dcr.share"],
                         "checks": [{"check": "dcr.share", "value": value, "threshold": 0.6, "comparison": "<=",
                                     "passed": value <= 0.6}]}}
    g = worst_case_gate({"a": audit("PASS", 0.5), "b": audit("PASS", 0.55)})
    assert g["passed"] and g["worst_checks"][0]["site"] == "b"
    g = worst_case_gate({"a": audit("PASS", 0.5), "b": audit("FAIL", 0.9)})
    assert not g["passed"] and g["failed"] == ["b:dcr.share"] and g["worst_checks"][0]["site"] == "b"
    assert not worst_case_gate({})["passed"]


def test_unknown_run_config_keys_are_refused():
    from server.app import RunSettings

    s = RunSettings.from_run_config({"epsilon": 2, "rounds": 4, "models": "wgan"})
    assert s.epsilon == 2.0 and s.rounds == 4 and s.models == ("wgan",)
    with pytest.raises(ConsortiumError, match="unknown run-config"):
        RunSettings.from_run_config({"epsilonn": 2})
    # the note model's settings: TextConfig's defaults where the run config says 0
    from dpsynth.models.text import TextConfig

    t = RunSettings.from_run_config({"text-epochs": 0, "text-d-model": 32, "text-max-len": 96}).text()
    assert (t.d_model, t.max_len, t.epochs, t.layers) == (32, 96, TextConfig().epochs, TextConfig().layers)
    with pytest.raises(ConsortiumError, match="text"):
        RunSettings.from_run_config({"text-d-model": 30, "text-heads": 4})
    with pytest.raises(wire.WireError, match="unknown note model settings"):
        wire.text_from_json('{"d_model": 32, "secret": 1}')


# ---- the coordinator and the ClientApp, in process ---------------------------------------------------

class InProcessGrid:
    """Delivers each message to the real ClientApp with a per-node Context (state kept across messages)."""

    def __init__(self, node_configs: dict[int, dict], tamper=None):
        from client.app import app as client_app

        self.client_app = client_app
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=cfg, state=RecordDict(), run_config={})
                         for n, cfg in node_configs.items()}
        self.replies: dict[str, Message] = {}
        self.tamper = tamper or {}
        self.dead: set[int] = set()

    def get_node_ids(self):
        return [n for n in self.contexts if n not in self.dead]

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = uuid.uuid4().hex
            m.metadata.__dict__["_message_id"] = mid
            n = m.metadata.dst_node_id
            if n not in self.dead:
                reply = self.client_app(m, self.contexts[n])
                if n in self.tamper:
                    reply = self.tamper[n](m, reply)
                if reply is not None:
                    self.replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def _nodes(demo_dir, tmp_path, caps=None, schema_for=None):
    caps = caps or {"a": 3.0, "b": 3.0, "c": 2.0}
    cfgs = {}
    for i, s in enumerate(sorted(caps), start=1):
        pol = tmp_path / f"policy_{s}.toml"
        pol.write_text(f"max_epsilon = {caps[s]}\ndelta = 1e-5\nmin_patients = 100\n")
        cfg = {"site": s, "data-path": str(demo_dir / f"site_{s}.csv"), "site-dir": str(tmp_path / "sites" / s),
               "policy-path": str(pol)}
        if schema_for and s in schema_for:
            cfg["schema-path"] = str(schema_for[s])
        cfgs[100 + i] = cfg
    return cfgs


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages created in a ServerApp carry the run's identity; the runtime sets it, here we do."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


def _run(grid, tmp_path, **overrides):
    from server.app import Coordinator, RunSettings

    rc = dict(FAST)
    rc.update(overrides)
    rc["out-dir"] = str(tmp_path / "run")
    rc.setdefault("audit-policy", _test_policy(tmp_path))
    coord = Coordinator(grid, RunSettings.from_run_config(rc), run_id="test-run")
    return coord.run()


def test_in_process_federation_trains_audits_and_signs(demo_dir, tmp_path):
    from dpsynth.release import verify_release

    grid = InProcessGrid(_nodes(demo_dir, tmp_path))
    s = _run(grid, tmp_path, epsilon=50.0)  # a greedy coordinator: every site caps it at its policy
    assert s["status"] == "released", s.get("message")
    man = verify_release(s["release"], tmp_path / "run" / "keys" / "release.pub")
    sites = man["privacy"]["sites"]
    assert set(sites) == {"a", "b", "c"}
    assert sites["c"]["epsilon"] <= 2.0 * (1 + 1e-6) and sites["a"]["epsilon"] <= 3.0 * (1 + 1e-6)
    assert man["privacy"]["consortium_epsilon"] == max(v["epsilon"] for v in sites.values())
    from dpsynth.privacy.ledger import Ledger

    for site in "abc":  # every site's budget-ledger head is in the signed manifest and matches the site's file
        head = Ledger(tmp_path / "sites" / site / "ledger.jsonl").verify()
        assert man["sites"][site]["ledger_head"] == head
    from dpsynth.privacy.ledger import Ledger

    events = [e["event"] for e in Ledger(tmp_path / "run" / "consortium-ledger.jsonl").entries()]
    assert events.count("site-spend") == 6 and events[-1] == "release-signed"
    # Context.state mirrors the site's accountant across rounds
    st = json.loads(grid.contexts[101].state["dpsynth-site"]["state"])
    assert st["accountant"]["history"][0]["steps"] > 0
    # the chained patient by default: the flow trained in the same rounds, charged to the same accountants,
    # and shipped (hash-checked) in the signed bundle
    assert {m["mechanism"] for m in st["accountant"]["history"]} >= {"dp-sgd:wgan-critic", "dp-sgd:flow"}
    assert man["model"]["models"] == ["wgan", "flow"] and man["model"]["flow_sha256"] == man["files"]["flow.safetensors"]
    # the default model list names the note model; without a text column in the agreed schema it is dropped
    # with a logged note (and nothing of it is planned, charged or shipped)
    assert "note model dropped from this run" in (tmp_path / "run" / "logs" / "serverapp.log").read_text()
    assert "model-dropped" in events and "dp-sgd:text" not in {m["mechanism"] for m in st["accountant"]["history"]}
    assert "text.safetensors" not in man["files"]


def test_malformed_weights_from_one_site_are_rejected_and_the_run_goes_on(demo_dir, tmp_path):
    def nan_weights(msg, reply):
        if msg.metadata.message_type == "train":
            g = reply.content["generator"]
            k = next(iter(g.keys()))
            arr = g[k].numpy().copy()
            arr[...] = np.nan
            from flwr.app import Array

            g[k] = Array.from_numpy_ndarray(arr)
        return reply

    grid = InProcessGrid(_nodes(demo_dir, tmp_path), tamper={103: nan_weights})
    s = _run(grid, tmp_path)
    assert s["status"] == "released"
    assert set(s["sites"]) == {"a", "b"} and "NaN" in s["dropped_sites"]["c"]
    log = (tmp_path / "run" / "logs" / "serverapp.log").read_text()
    assert "site c dropped" in log and "NaN" in log
    # the run goes on without c: a and b train round 2, c is not asked again (its spend stops at round 1)
    assert "consortium ledger after round 2" in log
    rounds = {site: [r["round"] for r in ledger_reserves(tmp_path / "sites" / site)] for site in "abc"}
    assert rounds == {"a": [1, 2], "b": [1, 2], "c": [1]}


def test_schema_mismatch_stops_before_training(demo_dir, tmp_path, schema):
    d = schema.to_json()
    for c in d["columns"]:
        if c["name"] == "bmi":
            c["upper"] = 70.0
    p = tmp_path / "schema_c.json"
    p.write_text(json.dumps(d))
    grid = InProcessGrid(_nodes(demo_dir, tmp_path, schema_for={"c": p}))
    s = _run(grid, tmp_path)
    assert s["status"] == "failed" and s["rounds_done"] == 0 and s["release"] is None
    assert "site 'c'" in s["message"] and "bmi" in s["message"]
    assert not (tmp_path / "run" / "release").exists()
    for site in "abc":  # nobody spent anything
        st = json.loads((tmp_path / "sites" / site / "state.json").read_text())
        assert sum(m["steps"] for m in st["accountant"]["history"]) == 0


def test_too_few_sites_left_stops_cleanly_and_releases_nothing(demo_dir, tmp_path):
    def die_in_round_1(msg, reply):
        return None if msg.metadata.message_type == "train" else reply

    grid = InProcessGrid(_nodes(demo_dir, tmp_path), tamper={102: die_in_round_1, 103: die_in_round_1})
    s = _run(grid, tmp_path, **{"round-timeout": 1.0})
    assert s["status"] == "failed" and "min-sites = 2" in s["message"]
    assert not (tmp_path / "run" / "release").exists()
    assert "run-failed" in (tmp_path / "run" / "consortium-ledger.jsonl").read_text()


def test_site_refusing_a_model_is_dropped_with_its_reason(demo_dir, tmp_path):
    cfgs = _nodes(demo_dir, tmp_path)
    for cfg in cfgs.values():  # hospitals that keep the vitals out of any model
        p = Path(cfg["policy-path"])
        p.write_text(p.read_text() + 'allowed_models = ["wgan"]\n')
    s = _run(InProcessGrid(cfgs), tmp_path, models="wgan,flow")
    assert s["status"] == "failed"
    assert "not allowed" in s["message"] and "c: SitePolicyError" in s["message"]  # named by site, not node id


def test_insecure_mode_is_explicit_and_loud(tmp_path, capsys):
    from deploy.local import LocalConsortium, kv_config

    secure = LocalConsortium(tmp_path / "s")
    secure.superlink_port = 1234
    text = secure.write_cli_config().read_text()
    assert "root-certificates" in text and "insecure = true" not in text
    assert "INSECURE" not in capsys.readouterr().err
    loud = LocalConsortium(tmp_path / "i", insecure=True)
    assert "TLS is OFF and SuperNode authentication is OFF" in capsys.readouterr().err
    loud.superlink_port = 1234
    assert "insecure = true" in loud.write_cli_config().read_text()
    assert kv_config({"site": "a", "rounds": 2, "x": 1.5, "b": False}) == 'site="a" rounds=2 x=1.5 b=false'


# ---- the note model in the federation (issue 7) ------------------------------------------------------------

TINY_TEXT_RC = {"models": "wgan,flow,text", "text-epochs": 1, "text-batch-size": 400, "text-d-model": 32,
                "text-layers": 1, "text-heads": 4, "text-max-len": 64}


@pytest.fixture(scope="module")
def notes_dir(tmp_path_factory):
    """The demo sites with the rendered demo notes (dpsynth demo-data --notes)."""
    from dpsynth.data.demo import write_demo

    d = tmp_path_factory.mktemp("demo_notes")
    write_demo(d, notes=True)
    return d


def _allow_notes(cfgs: dict, sites: str) -> dict:
    for cfg in cfgs.values():
        if cfg["site"] in sites:
            p = Path(cfg["policy-path"])
            p.write_text(p.read_text() + 'allowed_models = ["wgan", "flow", "text"]\nallow_notes = true\n')
    return cfgs


def test_in_process_federation_trains_the_note_model_and_releases_notes(notes_dir, tmp_path):
    """Sites a and b allow notes, site c's policy does not (allow_notes = false): c refuses the note model and is
    dropped; a and b train record + vitals + note in the same rounds; the candidate is the chained patient with
    a note, audited (notes included) at every site; the signed bundle carries the note model and tokenizer."""
    import pandas as pd
    from safetensors.torch import load_file

    from dpsynth.privacy.ledger import Ledger
    from dpsynth.release import verify_release

    sent: dict[str, list] = {}  # every site's note model update and its FedAvg weight (one round: the text model
    # is reserved, charged and averaged by the same round code as the record and the vitals, whose two-round run
    # is test_in_process_federation_trains_audits_and_signs)

    def keep_text_update(msg, reply):
        if msg.metadata.message_type == "train" and "text" in reply.content:
            sent.setdefault("updates", []).append(
                (reply.content["text"], float(reply.content["metrics"]["text_expected_batches"])))
        return reply

    cfgs = _allow_notes(_nodes(notes_dir, tmp_path), "ab")
    grid = InProcessGrid(cfgs, tamper={101: keep_text_update, 102: keep_text_update})
    s = _run(grid, tmp_path, rounds=1, **TINY_TEXT_RC)
    assert s["status"] == "released", s.get("message")
    assert s["sites"] == ["a", "b"] and "allow_notes = false" in s["dropped_sites"]["c"]

    # every site that trained charged the note model's planned steps to its own accountant, with its own q
    man = verify_release(s["release"], tmp_path / "run" / "keys" / "release.pub")
    for site in "ab":
        st = json.loads((tmp_path / "sites" / site / "state.json").read_text())
        plan = st["plan"]
        text = [m for m in st["accountant"]["history"] if m["mechanism"] == "dp-sgd:text"]
        assert [m["steps"] for m in text] == [plan["text_steps_per_round"]]
        assert {(m["noise_multiplier"], m["sample_rate"]) for m in text} == {
            (plan["text_noise_multiplier"], plan["text_sample_rate"])}
        assert plan["text_sample_rate"] != plan["sample_rate"]  # its own Poisson rate over the patients with a note
        assert man["privacy"]["sites"][site]["text_noise_multiplier"] == plan["text_noise_multiplier"]
        assert man["sites"][site]["ledger_head"] == Ledger(tmp_path / "sites" / site / "ledger.jsonl").verify()
        # the federated audit at the site checked the notes
        checks = {c["check"] for c in man["sites"][site]["audit_checks"]}
        assert {"notes_ngram_overlap.excess", "notes_identifier_replay.count"} <= checks
    # site c planned nothing and spent nothing: its ledger holds the refusal only
    assert [e["event"] for e in Ledger(tmp_path / "sites" / "c" / "ledger.jsonl").entries()] == ["refused"]
    assert not (tmp_path / "sites" / "c" / "state.json").exists()
    assert "note" in man["privacy"]["public_metadata"] and "notes" in man["privacy"]

    # FedAvg of the note model weighted by each site's expected note batches per round
    agg = load_file(str(tmp_path / "run" / "candidate" / "text.safetensors"))
    (ua, wa), (ub, wb) = ((wire.record_to_state(rec, agg, who="test", what="text"), w) for rec, w in sent["updates"])
    assert wa != wb
    for k, v in agg.items():
        assert torch.allclose(v, (wa * ua[k] + wb * ub[k]) / (wa + wb), atol=1e-6), k

    # the bundle carries the note model and its tokenizer (hash-checked); the release holds notes
    assert man["model"]["models"] == ["wgan", "flow", "text"]
    assert man["model"]["text_sha256"] == man["files"]["text.safetensors"]
    assert man["model"]["tokenizer_sha256"] == man["files"]["tokenizer.json"]
    assert json.loads((Path(s["release"]) / "tokenizer.json").read_text())["max_len"] == TINY_TEXT_RC["text-max-len"]
    syn = pd.read_csv(Path(s["release"]) / "synthetic.csv", keep_default_na=False)
    assert len(syn) == FAST["release-rows"] and (syn["note"].str.len() > 0).mean() > 0.5


def test_a_note_column_missing_at_one_site_is_named(notes_dir, demo_dir, tmp_path):
    import pandas as pd

    for r in ("r1", "r2"):
        (tmp_path / r).mkdir()
    # the site's schema (and file) have no note column: schema agreement stops the run before any training
    cfgs = _allow_notes(_nodes(notes_dir, tmp_path / "r1"), "abc")
    cfgs[103]["data-path"] = str(demo_dir / "site_c.csv")  # next to the demo schema without notes
    s = _run(InProcessGrid(cfgs), tmp_path / "r1", **TINY_TEXT_RC)
    assert s["status"] == "failed" and s["rounds_done"] == 0
    assert "site 'c'" in s["message"] and "note (missing at the site)" in s["message"]
    for site in "abc":  # nobody spent anything
        st = json.loads((tmp_path / "r1" / "sites" / site / "state.json").read_text())
        assert sum(m["steps"] for m in st["accountant"]["history"]) == 0
    # the schema has it, the site's file does not: that site refuses the note model, naming the column
    d = tmp_path / "c_data"
    d.mkdir()
    (d / "schema.json").write_text((notes_dir / "schema.json").read_text())
    pd.read_csv(notes_dir / "site_c.csv").drop(columns="note").to_csv(d / "site_c.csv", index=False)
    cfgs = _allow_notes(_nodes(notes_dir, tmp_path / "r2"), "abc")
    cfgs[103]["data-path"] = str(d / "site_c.csv")
    s = _run(InProcessGrid(cfgs), tmp_path / "r2", **{**TINY_TEXT_RC, "min-sites": 3})
    assert s["status"] == "failed" and s["rounds_done"] == 0  # min-sites 3: stops at planning, nothing trained
    assert "the note column 'note'" in s["dropped_sites"]["c"] and "site_c.csv" in s["dropped_sites"]["c"]
