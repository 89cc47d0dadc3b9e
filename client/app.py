"""The dpsynth ClientApp: what a hospital's SuperNode runs. A thin adapter over dpsynth.site.Site.

Node config (set by the hospital when it starts its SuperNode, never by the coordinator):
  site         the site's name (used in every message and log line)
  data-path    absolute path of the site's table (CSV / Parquet)
  site-dir     absolute path of the site's state directory (accountant, budget ledger)
  policy-path  the site's policy file (TOML): max ε, δ, allowed models, minimum patients, notes allowed
               (the note model trains here only with allow_notes = true and "text" in allowed_models)
  schema-path  (optional) the reviewed schema; default: schema.json next to the data
  holdout-path (optional) the site's holdout for its audits; default: a fixed split of the site's file
  fault-inject (optional, testing only) "nan-weights" or "oversized": this site's training replies are made
               malformed on purpose, so an operator can check that the coordinator rejects and logs them

Messages handled:
  query.hello     plan the run under the site's policy (σ calibrated up front), report schema hash + schema
  train           one round: reserve the round's spend, local DP training of every planned model (generator +
                  critic, flow, note model), return weights (ArrayRecords generator, critic, flow, text) + spend
  evaluate.audit  audit a candidate release against the site's own train/holdout; aggregates only

Per-run state is mirrored in Flower's Context.state; the authoritative copy is the site file (a restarted
SuperNode loses Context.state but not the site's spent budget).
"""

from __future__ import annotations

import io
import logging
import time
import traceback

import torch

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from dpsynth.errors import DpsynthError
from dpsynth.site import RunRequest, Site, SitePolicy
from dpsynth.train import parse_budget_shares

from . import wire

log = logging.getLogger("dpsynth.client")
if not log.handlers:
    h = logging.StreamHandler()
    h.setFormatter(logging.Formatter("%(asctime)s dpsynth-site %(levelname)s %(message)s"))
    log.addHandler(h)
    log.setLevel(logging.INFO)

STATE_KEY = "dpsynth-site"
# training losses are computed on the site's real patients, not DP outputs: they stay at the site (its log)
LOCAL_ONLY = ("losses", "flow_nll", "text_nll")
app = ClientApp()


def _site(context: Context) -> Site:
    nc = context.node_config
    missing = [k for k in ("site", "data-path", "site-dir") if not nc.get(k)]
    if missing:
        raise DpsynthError(f"SuperNode node config is missing {missing} (start it with --node-config "
                           "'site=\"a\" data-path=\"/abs/site.csv\" site-dir=\"/abs/site_a\" policy-path=\"/abs/policy.toml\"')")
    policy = SitePolicy.load(str(nc["policy-path"])) if nc.get("policy-path") else None
    return Site(str(nc["site-dir"]), name=str(nc["site"]), data_path=str(nc["data-path"]),
                schema_path=str(nc["schema-path"]) if nc.get("schema-path") else None, policy=policy,
                holdout_path=str(nc["holdout-path"]) if nc.get("holdout-path") else None)


def _mirror_get(context: Context) -> dict | None:
    rec = context.state.get(STATE_KEY) if hasattr(context.state, "get") else None
    if isinstance(rec, ConfigRecord) and "state" in rec:
        return wire.loads(rec["state"], who="context", what="mirrored site state")
    return None


def _mirror_put(context: Context, site: Site) -> None:
    context.state[STATE_KEY] = ConfigRecord({"state": wire.dumps(site.state_dict())})


def _error_reply(msg: Message, site_name: str, e: BaseException) -> Message:
    kind = type(e).__name__
    log.error("site %s: %s: %s", site_name, kind, e)
    if not isinstance(e, DpsynthError):
        log.error("%s", traceback.format_exc())
    return Message(RecordDict({"error": ConfigRecord({"site": site_name, "kind": kind, "message": str(e)[:4000]})}),
                   reply_to=msg)


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    name = str(context.node_config.get("site", f"node-{context.node_id}"))
    try:
        site = _site(context)
        site.check_against(_mirror_get(context))
        req = msg.content["request"]
        request = RunRequest(
            run_id=str(req["run_id"]), epsilon=float(req["epsilon"]), rounds=int(req["rounds"]),
            local_epochs=int(req["local_epochs"]), batch_size=int(req["batch_size"]),
            models=[str(m) for m in req["models"]], delta=float(req.get("delta", 0.0)) or None,
            max_grad_norm=float(req.get("max_grad_norm", 1.0)),
            text_epochs=int(req["text_epochs"]) if "text_epochs" in req else None,
            text_batch_size=int(req["text_batch_size"]) if "text_batch_size" in req else None,
            budget_shares=parse_budget_shares(str(req["budget_shares"]), "coordinator's budget-shares")
            if "budget_shares" in req else None,
        )
        if "text" in request.models and bool(req.get("drop_text_without_column", False)):
            from dpsynth.train import text_column

            try:
                text_column(site.schema)
            except DpsynthError as e:  # the coordinator drops "text" too once it sees the agreed schema
                request.models = [m for m in request.models if m != "text"]
                log.info("site %s: planning without the note model: %s", site.name, str(e).split(";")[0])
        reply = {"site": site.name, "schema_sha256": site.schema.hash(), "schema": site.schema.dumps()}
        if bool(req.get("check_schema_only", False)):
            return Message(RecordDict({"hello": ConfigRecord(reply)}), reply_to=msg)
        expected = str(req.get("schema_sha256", ""))
        if expected and expected != site.schema.hash():
            raise DpsynthError(f"site {site.name!r}: schema hash {site.schema.hash()[:12]}… differs from the "
                               f"consortium's {expected[:12]}…; not planning")
        plan = site.plan_run(request)
        _mirror_put(context, site)
        pub = plan.public()
        reply["plan"] = wire.dumps(pub)
        reply["spend"] = wire.dumps(site.spend())
        log.info("site %s: planned run %s: ε target %.3g (requested %.3g, policy cap %.3g), δ %.2g, σ %.4g, "
                 "q %.4g, %d steps", site.name, plan.run_id, plan.epsilon, plan.requested_epsilon, plan.policy_cap,
                 plan.delta, plan.noise_multiplier, plan.sample_rate, plan.planned_steps)
        return Message(RecordDict({"hello": ConfigRecord(reply)}), reply_to=msg)
    except Exception as e:  # noqa: BLE001 - every failure goes back to the coordinator with its reason
        return _error_reply(msg, name, e)


@app.train()
def train(msg: Message, context: Context) -> Message:
    name = str(context.node_config.get("site", f"node-{context.node_id}"))
    try:
        t0 = time.time()
        site = _site(context)
        site.check_against(_mirror_get(context))
        cfg = msg.content["config"]
        round_no = int(cfg["round"])
        wgan = wire.wgan_from_json(str(cfg["wgan"]))
        from dpsynth.models.wgan import Critic, Generator
        from dpsynth.preprocess import Encoder

        enc = Encoder(site.schema)
        g_t = Generator(wgan.latent_dim, wgan.gen_hidden, enc.dim).state_dict()
        c_t = Critic(enc.dim, wgan.critic_hidden).state_dict()
        g_in = wire.record_to_state(msg.content["generator"], g_t, who="coordinator", what="generator")
        c_in = wire.record_to_state(msg.content["critic"], c_t, who="coordinator", what="critic")
        f_in = flow_cfg = t_in = text_cfg = None
        if "flow" in msg.content:
            from dpsynth.models.flow import new_flow

            flow_cfg = wire.flow_from_json(str(cfg["flow"]))
            f_t = new_flow(site.schema, enc, flow_cfg)[0].state_dict()
            f_in = wire.record_to_state(msg.content["flow"], f_t, who="coordinator", what="flow")
        if "text" in msg.content:
            from dpsynth.models.text import NoteLM, NoteTokenizer

            text_cfg = wire.text_from_json(str(cfg["text"]))
            t_t = NoteLM.for_tokenizer(NoteTokenizer.from_schema(site.schema, max_len=text_cfg.max_len),
                                       text_cfg).state_dict()
            t_in = wire.record_to_state(msg.content["text"], t_t, who="coordinator", what="text")
        planned = set(site.plan.models) if site.plan else set()
        if ("flow" in planned) != (f_in is not None) or ("text" in planned) != (t_in is not None):
            # checked before the round's spend is reserved: a mismatch costs the site nothing
            raise DpsynthError(f"site {site.name!r}: the coordinator's models do not match this site's plan "
                               f"({sorted(planned)})")
        g, c, report, f, t = site.train_round(round_no, g_in, c_in, wgan=wgan, flow_state=f_in, flow_config=flow_cfg,
                                              text_state=t_in, text_config=text_cfg)
        _mirror_put(context, site)
        metrics = MetricRecord({
            "round": round_no, "steps": int(report["steps_round"]), "expected_batches": int(report["expected_batches"]),
            "epsilon": float(report["epsilon"]), "delta": float(report["delta"]),
            "noise_multiplier": float(report["noise_multiplier"]), "sample_rate": float(report["sample_rate"]),
            "seconds": time.time() - t0,
            **({"text_steps": int(report["text_steps_round"]),
                "text_expected_batches": int(report["text_expected_batches"])} if t is not None else {}),
        })
        log.info("site %s: round %d done: %d DP steps%s, ε spent %.4f of cap %.4g (%.1f s)", site.name, round_no,
                 report["steps_round"], f" (+ {report['text_steps_round']} of the note model)" if t is not None else "",
                 report["epsilon"], report["cap"], time.time() - t0)
        log.info("site %s: round %d training losses (kept at the site): %s", site.name, round_no,
                 {k: report.get(k) for k in LOCAL_ONLY})
        spend = wire.dumps({k: v for k, v in report.items() if k not in LOCAL_ONLY})
        fault = str(context.node_config.get("fault-inject", ""))
        if fault:  # operator's test aid: corrupt only this site's own reply to check the coordinator rejects it
            log.warning("site %s: fault-inject=%s — sending a deliberately malformed reply", site.name, fault)
            if fault == "nan-weights":
                g = dict(g)
                k = next(iter(g))
                g[k] = torch.full_like(g[k], float("nan"))
            elif fault == "oversized":
                spend = spend[:-1] + ', "padding": "' + "x" * (wire.MAX_JSON_CHARS + 1) + '"}'
        out = {"generator": wire.state_to_record(g), "critic": wire.state_to_record(c), "metrics": metrics,
               "report": ConfigRecord({"site": site.name, "spend": spend})}
        if f is not None:
            out["flow"] = wire.state_to_record(f)
        if t is not None:
            out["text"] = wire.state_to_record(t)
        return Message(RecordDict(out), reply_to=msg)
    except Exception as e:  # noqa: BLE001
        return _error_reply(msg, name, e)


@app.evaluate("audit")
def audit(msg: Message, context: Context) -> Message:
    name = str(context.node_config.get("site", f"node-{context.node_id}"))
    try:
        import pandas as pd

        from audits.policy import Policy

        site = _site(context)
        rel = msg.content["release"]
        data = rel["csv"]
        if not isinstance(data, bytes) or len(data) > wire.MAX_RELEASE_BYTES:
            raise wire.WireError("coordinator: the candidate release is missing or too large")
        policy = Policy.from_dict(wire.loads(str(rel["policy"]), who="coordinator", what="audit policy"), "consortium policy")
        syn = pd.read_csv(io.BytesIO(data), keep_default_na=True, na_values=[""], low_memory=False)
        t0 = time.time()
        res = site.audit(syn, policy=policy, empirical=bool(rel.get("empirical", True)),
                         utility=bool(rel.get("utility", True)), seed=int(rel.get("seed", 0)),
                         sites=max(1, int(rel.get("sites", 1))))
        res["spend"] = site.spend()
        log.info("site %s: audit of the candidate release: %s (%.1f s)", site.name, res["gate"]["verdict"], time.time() - t0)
        return Message(RecordDict({"audit": ConfigRecord({"site": site.name, "audit": wire.dumps(res)})}), reply_to=msg)
    except Exception as e:  # noqa: BLE001
        return _error_reply(msg, name, e)
