"""The dpsynth ServerApp (the consortium coordinator).

  1. wait for the sites (SuperNodes) to be online; at least ``min-sites`` must take part
  2. query.hello  → every site plans the run under its own policy (ε = min(request, site cap), σ calibrated
                   up front for rounds × local epochs) and reports its schema; schema agreement by hash —
                   a mismatch stops the run before any training, naming the site and the differing columns.
                   When the models include the note model ("text"), "text" is dropped, with a logged note,
                   when the agreed schema has no single text column (every site holding that schema plans
                   without it), so the default model list can name it
  3. rounds      → train: sites reserve the round's spend, train locally with DP-SGD, return weights + spend;
                   FedAvg of each model (generator, critic, flow, note model) weighted by each site's expected
                   batches of that model; the consortium ledger records every site's reported spend and is
                   printed each round
  4. candidate   → the server samples a candidate release from the aggregated models: the chained patient
                   (record → vitals → note), with the models and the note tokenizer kept in candidate/
  5. evaluate.audit → every site audits the candidate against its own train/holdout (aggregates only)
  6. gate        → the worst site decides; only on PASS is the bundle written and signed
Faults: a site that errors, times out, disappears or sends a malformed / oversized message is dropped (and
logged); the run goes on while ``min-sites`` sites remain, otherwise it stops and nothing is released.
Everything is written under the absolute ``out-dir``; summary.json says how the run ended.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from client import wire
from dpsynth.errors import DpsynthError
from dpsynth.io_utils import atomic_write_json
from dpsynth.models.flow import FlowConfig, new_flow
from dpsynth.models.text import NoteLM, NoteTokenizer, TextConfig
from dpsynth.models.wgan import Critic, Generator, WGANConfig
from dpsynth.preprocess import Encoder
from dpsynth.privacy.ledger import Ledger
from dpsynth.schema import Schema

from .strategy import ConsortiumError, check_schema_agreement, fedavg, worst_case_gate

app = ServerApp()
log = logging.getLogger("dpsynth.server")

INSECURE_BANNER = "!" * 100


# Decision (issue 5): a site's size is public metadata, as in the standard DP-SGD analysis (Opacus, Abadi et
# al.): the sampling rate q = 1/⌈n/batch⌉ is a parameter of the mechanism, sent in the site's plan, and the
# FedAvg weight is the expected number of batches (local epochs × ⌈n/batch⌉). Both reveal n to within one
# batch; neither reveals anything about any patient's record. A hospital that cannot disclose its size
# should not join (or pad/subsample to a declared size first); this is stated in every release.
SITE_SIZE_DISCLOSURE = (
    "each site's number of training patients, rounded up to its expected batch size, is treated as public: it "
    "fixes the Poisson sampling rate q in the site's plan and the FedAvg weight (expected batches per round). "
    "The guarantee (ε, δ) protects every patient's record, not the site's size."
)
# Decision (issue 7): the number of a site's patients that have a note (n_notes) is public metadata in the same
# way: the note model's own Poisson rate q_text = 1/⌈n_notes/text batch⌉ is in the site's plan and its FedAvg
# weight is its expected note batches per round. Both reveal n_notes to within one text batch, nothing more.
NOTES_COUNT_DISCLOSURE = (
    " When the note model is trained, each site's number of training patients with a note, rounded up to the "
    "note model's expected batch size, is public in the same way (the note model's sampling rate and FedAvg "
    "weight)."
)


@dataclass
class RunSettings:
    epsilon: float = 3.0
    delta: float = 0.0  # 0: each site's default 1/(10·n)
    rounds: int = 20  # the measured setting (bench/federated_vs_central.py); pyproject's app config repeats it
    local_epochs: int = 6
    batch_size: int = 512
    # the note model ("text") is dropped by the coordinator, with a logged note, when the agreed schema has no
    # text column (so this default works for data with and without notes)
    models: tuple[str, ...] = ("wgan", "flow", "text")
    release_rows: int = 5000
    min_sites: int = 2
    expected_sites: int = 3
    out_dir: str = "out/federated"
    key_path: str = ""
    audit_policy: str = ""
    audit_empirical: bool = True
    site_utility: bool = True
    round_timeout: float = 900.0
    wait_for_nodes: float = 60.0
    poll_interval: float = 0.2
    max_grad_norm: float = 1.0
    latent_dim: int = 128
    gen_hidden: int = 256
    critic_hidden: int = 128
    # the note model; 0 = dpsynth.models.text.TextConfig's default. text-epochs are the note model's epochs
    # over the whole run (as in `dpsynth train`), spread evenly over the rounds
    text_epochs: int = 0
    text_batch_size: int = 0
    text_d_model: int = 0
    text_layers: int = 0
    text_heads: int = 0
    text_max_len: int = 0
    # each model's share of every site's privacy loss, e.g. "wgan=2,flow=1,text=1" ("": TrainConfig.budget_shares',
    # wgan=1,flow=1,text=0.33, as in `dpsynth train --budget-shares`); the site's cap on its total ε is unchanged
    budget_shares: str = ""

    @classmethod
    def from_run_config(cls, rc: dict) -> "RunSettings":
        s = cls()
        known = {f.replace("_", "-"): f for f in cls.__dataclass_fields__}
        unknown = sorted(set(rc) - set(known))
        if unknown:
            raise ConsortiumError(f"unknown run-config keys {unknown} (known: {sorted(known)})")
        for k, v in rc.items():
            f = known[k]
            cur = getattr(s, f)
            if f == "models":
                v = tuple(m.strip() for m in str(v).split(",") if m.strip())
            elif isinstance(cur, bool):
                v = bool(v)
            elif isinstance(cur, int):
                if int(v) != v:
                    raise ConsortiumError(f"run-config {k} must be an integer, got {v!r}")
                v = int(v)
            elif isinstance(cur, float):
                v = float(v)
            else:
                v = str(v)
            setattr(s, f, v)
        if s.min_sites < 1 or s.expected_sites < s.min_sites:
            raise ConsortiumError(f"need 1 ≤ min-sites ≤ expected-sites, got {s.min_sites}, {s.expected_sites}")
        for f in TEXT_KEYS:
            if getattr(s, f) < 0:
                raise ConsortiumError(f"run-config {f.replace('_', '-')} must be ≥ 0 (0: the default), got "
                                      f"{getattr(s, f)}")
        try:
            s.text()
        except ValueError as e:
            raise ConsortiumError(f"run-config text-*: {e}") from None
        from dpsynth.errors import DpsynthError
        from dpsynth.train import parse_budget_shares

        try:
            parse_budget_shares(s.budget_shares, "run-config budget-shares")
        except DpsynthError as e:
            raise ConsortiumError(str(e)) from None
        return s

    def wgan(self) -> WGANConfig:
        return WGANConfig(latent_dim=self.latent_dim, gen_hidden=self.gen_hidden, critic_hidden=self.critic_hidden)

    def text(self) -> TextConfig:
        """The note model's settings: the run config's text-* keys; where 0, FED_TEXT_DEFAULTS, then TextConfig's."""
        given = {f.removeprefix("text_"): getattr(self, f) for f in TEXT_KEYS if getattr(self, f)}
        return TextConfig(**{**FED_TEXT_DEFAULTS, **given})


# The single-site defaults (TextConfig: Poisson batch 768, lr 1.5e-2) were measured on the whole demo cohort
# (12,260 notes: 16 steps per epoch). A site holds a part of a consortium's patients (the demo's: 2,187–6,292), and
# batch 768 would leave it 3–9 steps per epoch, too few to learn from; federated runs keep the batch and learning
# rate they were measured with (bench/demo_fed.py) until a federated sweep says otherwise.
FED_TEXT_DEFAULTS = {"batch_size": 256, "lr": 1e-2}


TEXT_KEYS = ("text_epochs", "text_batch_size", "text_d_model", "text_layers", "text_heads", "text_max_len")


def _setup_logging(out: Path) -> None:
    (out / "logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s dpsynth-server %(levelname)s %(message)s")
    log.handlers.clear()
    fh = logging.FileHandler(out / "logs" / "serverapp.log", encoding="utf-8")
    fh.setFormatter(fmt)
    sh = logging.StreamHandler(sys.stdout)
    sh.setFormatter(fmt)
    log.addHandler(fh)
    log.addHandler(sh)
    log.setLevel(logging.INFO)
    log.propagate = False


class Coordinator:
    def __init__(self, grid: Grid, settings: RunSettings, run_id: str):
        self.grid = grid
        self.s = settings
        self.run_id = run_id
        out = Path(settings.out_dir)
        if not out.is_absolute():
            out = out.resolve()
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        _setup_logging(self.out)
        if not Path(settings.out_dir).is_absolute():
            log.warning("out-dir %r is relative; the ServerApp runs in the SuperLink's working directory, so it "
                        "resolves to %s — pass an absolute out-dir", settings.out_dir, self.out)
        self.ledger = Ledger(self.out / "consortium-ledger.jsonl")
        self.sites: dict[int, str] = {}  # node id → site name (alive)
        self.dropped: dict[str, str] = {}  # site → reason
        self.spend: dict[str, dict] = {}
        self.rounds_done = 0
        self.t0 = time.time()

    # ---- messaging -------------------------------------------------------------------------------
    def exchange(self, contents: dict[int, RecordDict], message_type: str, group: str, timeout: float) -> dict[int, Message | str]:
        """Send one message per node and collect replies (fast polling). Missing replies → 'timeout'."""
        nodes = list(contents)
        msgs = [Message(contents[n], dst_node_id=n, message_type=message_type, group_id=group,
                        ttl=max(timeout + 60.0, 120.0)) for n in nodes]
        ids = list(self.grid.push_messages(msgs))
        pending = {}
        out: dict[int, Message | str] = {}
        for n, mid in zip(nodes, ids):
            if mid:
                pending[mid] = n
            else:
                out[n] = "the SuperLink refused the message (malformed or too large)"
        end = time.time() + timeout
        while pending and time.time() < end:
            for reply in self.grid.pull_messages(list(pending)):
                n = pending.pop(reply.metadata.reply_to_message_id, None)
                if n is not None:
                    out[n] = reply
            if pending:
                time.sleep(self.s.poll_interval)
        for n in pending.values():
            out[n] = f"no reply within {timeout:.0f} s"
        return out

    def _problem(self, node: int, reply: Message | str) -> str | None:
        if isinstance(reply, str):
            return reply
        if reply.has_error():
            return f"Flower error {reply.error.code}: {reply.error.reason}"
        if "error" in reply.content:
            e = reply.content["error"]
            return f"{e.get('kind')}: {e.get('message')}"
        return None

    def drop(self, node: int, reason: str) -> None:
        site = self.sites.pop(node, f"node-{node}")
        self.dropped[site] = reason
        log.error("site %s dropped: %s", site, reason)
        self.ledger.append("site-dropped", {"site": site, "reason": reason[:2000], "run_id": self.run_id})

    def require_quorum(self, stage: str) -> None:
        if len(self.sites) < self.s.min_sites:
            raise ConsortiumError(
                f"{stage}: only {len(self.sites)} site(s) left ({', '.join(sorted(self.sites.values())) or 'none'}), "
                f"the run needs min-sites = {self.s.min_sites}; stopping — nothing is released. Dropped: "
                + "; ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())))

    # ---- stages ------------------------------------------------------------------------------------
    def wait_for_nodes(self) -> list[int]:
        end = time.time() + self.s.wait_for_nodes
        nodes: list[int] = []
        while time.time() < end:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.s.expected_sites:
                break
            time.sleep(0.5)
        log.info("%d site node(s) online: %s (expected %d, minimum %d)", len(nodes), nodes, self.s.expected_sites,
                 self.s.min_sites)
        if len(nodes) < self.s.min_sites:
            raise ConsortiumError(f"only {len(nodes)} SuperNode(s) online after {self.s.wait_for_nodes:.0f} s; "
                                  f"min-sites = {self.s.min_sites}")
        return nodes

    def hello(self, nodes: list[int]) -> tuple[str, Schema]:
        """Every site's plan and schema; schema agreement. With the note model requested, a site whose schema has
        no (single) text column plans without it (``drop_text_without_column``: one round trip, not two), and the
        coordinator drops "text" from the run, with a logged note, when the agreed schema has none."""
        t = self.s.text()
        with_text = "text" in self.s.models
        req = wire.config(run_id=self.run_id, epsilon=self.s.epsilon, delta=self.s.delta, rounds=self.s.rounds,
                          local_epochs=self.s.local_epochs, batch_size=self.s.batch_size, models=list(self.s.models),
                          max_grad_norm=self.s.max_grad_norm, drop_text_without_column=with_text or None,
                          text_epochs=t.epochs if with_text else None,
                          text_batch_size=t.batch_size if with_text else None,
                          budget_shares=self.s.budget_shares or None)
        replies = self.exchange({n: RecordDict({"request": req}) for n in nodes}, wire.HELLO, "hello",
                                self.s.round_timeout)
        schemas: dict[str, tuple[str, str]] = {}
        plans: dict[int, dict] = {}
        for n in nodes:
            self.sites[n] = f"node-{n}"
            r = replies[n]
            prob = self._problem(n, r)
            if prob is None:
                try:
                    h = r.content["hello"]
                    site = str(h["site"])
                    if site in self.sites.values():
                        raise wire.WireError(f"two SuperNodes claim to be site {site!r}")
                    self.sites[n] = site
                    plan = wire.loads(h["plan"], who=site, what="plan")
                    spend = wire.loads(h["spend"], who=site, what="spend")
                    schemas[site] = (str(h["schema_sha256"]), str(h["schema"]))
                    for k in ("epsilon", "delta", "noise_multiplier", "sample_rate"):
                        wire.finite_number(plan[k], who=site, what=f"plan.{k}", lo=0)
                    self.spend[site] = {**spend, "plan": plan}
                    plans[n] = plan
                except (KeyError, TypeError, ValueError) as e:
                    prob = f"malformed hello reply rejected: {e}"
            elif not isinstance(r, str) and not r.has_error() and "error" in r.content:
                named = str(r.content["error"].get("site", ""))  # a refusal names its site: log it by that name
                if named and named not in self.sites.values():
                    self.sites[n] = named
            if prob is not None:
                self.drop(n, prob)
        if schemas:
            ref_hash, ref_json = check_schema_agreement(schemas)  # raises ConsortiumError naming the sites
        self.require_quorum("planning")
        schema = Schema.from_json(wire.loads(ref_json, who="sites", what="schema"), where="agreed schema")
        if with_text:
            self.settle_models(schema)
        for n, plan in plans.items():
            site = self.sites[n]
            try:
                self._check_plan(site, plan)
            except (KeyError, TypeError, ValueError) as e:
                self.drop(n, f"malformed hello reply rejected: {e}")
                continue
            self.ledger.append("site-plan", {"site": site, "run_id": self.run_id, **{
                k: plan[k] for k in ("epsilon", "requested_epsilon", "policy_cap", "delta", "noise_multiplier",
                                     "sample_rate", "planned_steps", "steps_per_round", "models")},
                **{k: plan.get(k) for k in ("text_noise_multiplier", "text_sample_rate", "text_planned_steps",
                                            "text_steps_per_round") if "text" in self.s.models},
                "prior_epsilon": plan["prior_epsilon"], "site_ledger_head": self.spend[site].get("ledger_head")})
            capped = " (capped by the site's policy)" if plan["epsilon"] < plan["requested_epsilon"] else ""
            log.info("site %s: ε target %.4g%s, δ %.3g, σ %.4g, q %.4g, %d planned DP steps, already spent "
                     "ε %.4g", site, plan["epsilon"], capped, plan["delta"], plan["noise_multiplier"],
                     plan["sample_rate"], plan["planned_steps"], plan["prior_epsilon"])
            if "text" in self.s.models:
                log.info("site %s: note model σ %.4g, q %.4g, %d DP steps per round", site,
                         plan["text_noise_multiplier"], plan["text_sample_rate"], plan["text_steps_per_round"])
        self.require_quorum("planning")
        log.info("schema agreement: %d sites hold schema sha256 %s…", len(schemas), ref_hash[:16])
        self.ledger.append("schema-agreed", {"sha256": ref_hash, "sites": sorted(schemas), "run_id": self.run_id})
        return ref_json, schema

    def _check_plan(self, site: str, plan: dict) -> None:
        """A site's plan must cover exactly the run's models (after settle_models), with finite parameters."""
        if sorted(plan.get("models") or []) != sorted(self.s.models):
            raise wire.WireError(f"{site}: planned models {plan.get('models')} differ from the run's "
                                 f"{list(self.s.models)}")
        if "text" in self.s.models:
            for k in ("text_noise_multiplier", "text_sample_rate"):
                wire.finite_number(plan.get(k), who=site, what=f"plan.{k}", lo=0)
            for k in ("text_steps_per_round", "text_planned_steps"):
                wire.finite_number(plan.get(k), who=site, what=f"plan.{k}", lo=1)

    def settle_models(self, schema: Schema) -> None:
        """Drop the note model, with a logged note, when the agreed schema cannot condition one (no single text
        column); every site with that schema has planned without it."""
        from dpsynth.train import text_column

        try:
            col = text_column(schema)
        except DpsynthError as e:
            self.s.models = tuple(m for m in self.s.models if m != "text")
            why = str(e).split(";")[0]
            log.warning("note model dropped from this run (models now %s): %s", ",".join(self.s.models), why)
            self.ledger.append("model-dropped", {"run_id": self.run_id, "model": "text", "reason": why})
            return
        t = self.s.text()
        log.info("note model: column %r of the agreed schema; d_model %d, %d layer(s), max_len %d, %d epoch(s) over "
                 "the run, expected text batch %d", col, t.d_model, t.layers, t.max_len, t.epochs, t.batch_size)

    def train_round(self, r: int, states: dict[str, dict], templates: dict[str, dict]) -> dict[str, dict]:
        """One round: send every model's weights (generator, critic, and flow / note model when planned), collect
        the sites' updates, check them, FedAvg each model weighted by the site's expected batches of that model
        (the note model: its own expected note batches per round). Returns the aggregated states."""
        cfg = wire.config(round=r, wgan=wire.wgan_to_json(self.s.wgan()),
                          flow=wire.flow_to_json(FlowConfig()) if "flow" in states else None,
                          text=wire.text_to_json(self.s.text()) if "text" in states else None)
        contents = {n: RecordDict({**{k: wire.state_to_record(v) for k, v in states.items()}, "config": cfg})
                    for n in self.sites}
        t = time.time()
        replies = self.exchange(contents, wire.TRAIN, f"round-{r}", self.s.round_timeout)
        updates: dict[str, list[dict]] = {k: [] for k in states}
        weights: dict[str, list[float]] = {k: [] for k in states}
        rows = []
        for n, reply in replies.items():
            site = self.sites[n]
            prob = self._problem(n, reply)
            if prob is None:
                try:
                    got = {k: wire.record_to_state(reply.content[k], templates[k], who=site, what=k) for k in states}
                    m = reply.content["metrics"]
                    plan = self.spend[site]["plan"]
                    steps = int(m["steps"])
                    w = wire.finite_number(m["expected_batches"], who=site, what="expected_batches", lo=1,
                                           hi=plan["steps_per_round"])
                    eps = wire.finite_number(m["epsilon"], who=site, what="epsilon", lo=0)
                    if eps > plan["epsilon"] * (1 + 1e-6):
                        raise wire.WireError(f"{site}: reported ε {eps} above its own plan {plan['epsilon']}")
                    if not 0 <= steps <= plan["steps_per_round"]:
                        raise wire.WireError(f"{site}: reported {steps} steps, planned {plan['steps_per_round']}")
                    tw, t_steps = None, 0
                    if "text" in states:
                        tw = wire.finite_number(m["text_expected_batches"], who=site, what="text_expected_batches",
                                                lo=1, hi=plan["text_steps_per_round"])
                        t_steps = int(m["text_steps"])
                        if not 0 <= t_steps <= plan["text_steps_per_round"]:
                            raise wire.WireError(f"{site}: reported {t_steps} note model steps, planned "
                                                 f"{plan['text_steps_per_round']}")
                    rep = wire.loads(reply.content["report"]["spend"], who=site, what="spend report")
                except (KeyError, TypeError, ValueError) as e:
                    prob = f"malformed reply rejected: {e}"
            if prob is not None:
                self.drop(n, f"round {r}: {prob}")
                continue
            for k, v in got.items():
                updates[k].append(v)
                weights[k].append(tw if k == "text" else w)
            entry = {"site": site, "round": r, "run_id": self.run_id, "model": "+".join(self.s.models), "epsilon": eps,
                     "delta": float(m["delta"]), "steps_round": steps, "steps_total": int(rep.get("steps", 0)),
                     "noise_multiplier": float(m["noise_multiplier"]), "sample_rate": float(m["sample_rate"]),
                     "expected_batches": w, "site_ledger_head": rep.get("ledger_head"), "cap": rep.get("cap"),
                     "mechanisms": rep.get("mechanisms")}
            if tw is not None:
                entry.update({"text_steps_round": t_steps, "text_expected_batches": tw})
            self.ledger.append("site-spend", entry)
            self.spend[site].update({k: entry[k] for k in ("epsilon", "delta", "noise_multiplier", "sample_rate")})
            self.spend[site]["steps"] = entry["steps_total"]
            self.spend[site]["ledger_head"] = entry["site_ledger_head"]
            rows.append(entry)
        self.require_quorum(f"round {r}")
        agg = {k: fedavg(v, weights[k]) for k, v in updates.items()}
        self.rounds_done = r
        log.info("round %d/%d: %s aggregated from %d site(s) in %.1f s (FedAvg weights = expected batches of each "
                 "model)", r, self.s.rounds, ", ".join(agg), len(weights["generator"]), time.time() - t)
        log.info("consortium ledger after round %d:", r)
        log.info("  %-10s %10s %10s %10s %10s %8s %8s", "site", "ε spent", "ε cap", "δ", "σ", "q", "steps")
        for e in sorted(rows, key=lambda e: e["site"]):
            log.info("  %-10s %10.4f %10.4g %10.3g %10.4g %8.4f %8d", e["site"], e["epsilon"], e["cap"] or float("nan"),
                     e["delta"], e["noise_multiplier"], e["sample_rate"], e["steps_total"])
        return agg

    def candidate(self, schema: Schema, states: dict[str, dict]) -> Path:
        """The candidate release: the aggregated WGAN's records, then (when trained) the aggregated flow's
        continuous values conditioned on each record, then (when trained) the aggregated note model's note
        conditioned on record + vitals — the same chained patient as dpsynth.generate. The models (and the note
        tokenizer) are kept next to it in candidate/."""
        from dpsynth.generate import sample_patients

        enc = Encoder(schema)
        w = self.s.wgan()
        g = Generator(w.latent_dim, w.gen_hidden, enc.dim)
        g.load_state_dict(states["generator"])
        flow, codec = new_flow(schema, enc, FlowConfig(), states["flow"]) if "flow" in states else (None, None)
        df = sample_patients(schema, enc, g, w.latent_dim, self.s.release_rows, rng=np.random.default_rng(),
                             flow=flow, codec=codec)
        text = tok = None
        if "text" in states:  # as dpsynth.generate.generate: notes conditioned on the finished record + vitals
            from dpsynth.generate import add_notes
            from dpsynth.train import text_column

            cfg = self.s.text()
            tok = NoteTokenizer.from_schema(schema, max_len=cfg.max_len)
            text = NoteLM.for_tokenizer(tok, cfg)
            text.load_state_dict(states["text"])
            text.eval()
            add_notes(df, text_column(schema), text, tok, temperature=cfg.temperature, top_p=cfg.top_p)
        cand = self.out / "candidate"
        cand.mkdir(parents=True, exist_ok=True)
        p = cand / "synthetic.csv"
        from dpsynth.data.io import write_table
        from dpsynth.train import save_weights

        write_table(df, p)
        save_weights(g, cand / "generator.safetensors")
        if flow is not None:
            save_weights(flow, cand / "flow.safetensors")
        if text is not None:
            save_weights(text, cand / "text.safetensors")
            atomic_write_json(cand / "tokenizer.json", tok.to_json())
        return p

    def audit(self, syn_path: Path, policy) -> dict[str, dict]:
        rel = ConfigRecord({"csv": syn_path.read_bytes(), "policy": wire.dumps(policy.to_json()),
                            "empirical": bool(self.s.audit_empirical), "utility": bool(self.s.site_utility), "seed": 0,
                            "sites": len(self.sites)})  # the gate's false-refusal rate covers every site
        replies = self.exchange({n: RecordDict({"release": rel}) for n in self.sites}, wire.AUDIT, "audit",
                                self.s.round_timeout)
        audits = {}
        for n, reply in replies.items():
            site = self.sites[n]
            prob = self._problem(n, reply)
            if prob is None:
                try:
                    a = wire.loads(reply.content["audit"]["audit"], who=site, what="audit")
                    if not isinstance(a.get("gate", {}).get("checks"), list) or a["gate"].get("verdict") not in ("PASS", "FAIL"):
                        raise wire.WireError(f"{site}: audit reply has no gate")
                    audits[site] = a
                    log.info("site %s audit: %s%s", site, a["gate"]["verdict"],
                             "" if a["gate"]["passed"] else f" (failed: {', '.join(a['gate']['failed'])})")
                except (KeyError, TypeError, ValueError) as e:
                    prob = f"malformed audit reply rejected: {e}"
            if prob is not None:
                self.drop(n, f"audit: {prob}")
        self.require_quorum("audit")
        return audits

    # ---- the whole run -----------------------------------------------------------------------------
    def run(self) -> dict:
        from audits.policy import Policy, default_policy

        s = self.s
        summary = {"status": "failed", "run_id": self.run_id, "out_dir": str(self.out), "rounds_planned": s.rounds,
                   "rounds_done": 0, "sites": [], "dropped_sites": {}, "release": None, "verdict": None,
                   "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.ledger.append("run-start", {"run_id": self.run_id, "settings": {k: (list(v) if isinstance(v, tuple) else v)
                                                                             for k, v in vars(s).items()}})
        try:
            policy = Policy.load(s.audit_policy) if s.audit_policy else default_policy()
            nodes = self.wait_for_nodes()
            schema_json, schema = self.hello(nodes)
            enc = Encoder(schema)
            w = s.wgan()
            torch.manual_seed(int.from_bytes(os.urandom(8), "little") % (2**63))
            states = {"generator": Generator(w.latent_dim, w.gen_hidden, enc.dim).state_dict(),
                      "critic": Critic(enc.dim, w.critic_hidden).state_dict()}
            if "flow" in s.models:
                states["flow"] = new_flow(schema, enc, FlowConfig())[0].state_dict()
            if "text" in s.models:
                t = s.text()
                states["text"] = NoteLM.for_tokenizer(NoteTokenizer.from_schema(schema, max_len=t.max_len),
                                                      t).state_dict()
            templates = {k: {n: t.clone() for n, t in v.items()} for k, v in states.items()}
            for r in range(1, s.rounds + 1):
                states = self.train_round(r, states, templates)
            summary["rounds_done"] = self.rounds_done
            syn = self.candidate(schema, states)
            log.info("candidate release: %d rows sampled from the aggregated models (%s); sending it to %d site(s) "
                     "for audit", s.release_rows, ",".join(s.models), len(self.sites))
            audits = self.audit(syn, policy)
            gate = worst_case_gate(audits)
            privacy = self.privacy_summary(audits)
            summary.update({"sites": sorted(audits), "dropped_sites": dict(self.dropped), "verdict": gate["verdict"],
                            "privacy": privacy, "gate": gate, "utility": {k: a.get("utility") for k, a in audits.items()},
                            "consortium_ledger_head": None})
            self.ledger.append("gate", {"run_id": self.run_id, "verdict": gate["verdict"], "sites": gate["sites"],
                                        "failed": gate["failed"]})
            summary["consortium_ledger_head"] = self.ledger.head()
            if not gate["passed"]:
                summary["status"] = "refused"
                summary["message"] = ("the release gate FAILED at " + ", ".join(s_ for s_, v in gate["sites"].items()
                                                                                if v != "PASS") + ": nothing is released")
                log.error(summary["message"])
                Ledger(self.out / "dpsynth-audit-log.jsonl").append("release-refused", {
                    "run_id": self.run_id, "failed": gate["failed"]})
                return summary
            from .bundle import write_bundle

            key = self.signing_key()
            release = self.out / "release"
            man = write_bundle(out=release, synthetic_csv=syn, key_path=key, gate=gate, site_audits=audits,
                               summary=summary, generator_file=syn.parent / "generator.safetensors",
                               models=list(s.models),
                               schema_json=schema_json, policy=policy.to_json(), policy_sha256=policy.hash())
            Ledger(self.out / "dpsynth-audit-log.jsonl").append("release-signed", {
                "run_id": self.run_id, "out": str(release), "verdict": "PASS",
                "manifest_sha256": __import__("hashlib").sha256((release / "manifest.json").read_bytes()).hexdigest()})
            self.ledger.append("release-signed", {"run_id": self.run_id, "out": str(release),
                                                  "signing_key_sha256": man["signing_key_sha256"]})
            summary.update({"status": "released", "release": str(release),
                            "public_key": str(Path(key).with_suffix(".pub"))})
            return summary
        except ConsortiumError as e:
            summary["message"] = str(e)
            summary["dropped_sites"] = dict(self.dropped)
            summary["rounds_done"] = self.rounds_done
            log.error("run stopped: %s", e)
            self.ledger.append("run-failed", {"run_id": self.run_id, "reason": str(e)[:4000]})
            return summary
        except Exception as e:  # noqa: BLE001 - recorded, then re-raised for Flower to mark the run failed
            summary["message"] = f"internal error: {type(e).__name__}: {e}"
            log.exception("run failed")
            self.ledger.append("run-failed", {"run_id": self.run_id, "reason": summary["message"][:4000]})
            raise
        finally:
            summary["seconds"] = round(time.time() - self.t0, 1)
            summary["finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            atomic_write_json(self.out / "summary.json", summary)
            log.info("summary: %s (%s) in %.0f s; written to %s", summary["status"], summary.get("message") or
                     summary.get("release"), summary["seconds"], self.out / "summary.json")

    def privacy_summary(self, audits: dict[str, dict]) -> dict:
        from dpsynth.train import TEXT_STATEMENT

        sites = {}
        for site, sp in sorted(self.spend.items()):
            if "epsilon" not in sp or "noise_multiplier" not in sp:
                continue
            plan = sp.get("plan", {})
            sites[site] = {"epsilon": sp["epsilon"], "delta": sp["delta"], "noise_multiplier": sp["noise_multiplier"],
                           "flow_noise_multiplier": plan.get("flow_noise_multiplier"), "models": plan.get("models"),
                           "text_noise_multiplier": plan.get("text_noise_multiplier"),
                           "text_sample_rate": plan.get("text_sample_rate"),
                           "text_planned_steps": plan.get("text_planned_steps"),
                           "sample_rate": sp["sample_rate"], "steps": sp.get("steps"), "cap": plan.get("epsilon"),
                           "ledger_head": (audits.get(site, {}).get("spend") or {}).get("ledger_head", sp.get("ledger_head")),
                           "audited": site in audits}
        eps = [v["epsilon"] for v in sites.values()]
        deltas = [v["delta"] for v in sites.values()]
        return {
            "differentially_private": True,
            "unit": "patient",
            "adjacency": "add/remove one patient (one row per patient)",
            "accountant": "opacus-prv (per site, persisted across rounds and restarts)",
            "composition": "sites hold disjoint patients: consortium ε = max site ε (parallel composition)",
            "consortium_epsilon": max(eps) if eps else None,
            "consortium_delta": max(deltas) if deltas else None,
            "sites": sites,
            "sampling": "Poisson (Opacus DPDataLoader) at every site",
            "preprocessing": "public bounds from the agreed schema",
            "public_metadata": SITE_SIZE_DISCLOSURE + (NOTES_COUNT_DISCLOSURE if "text" in self.s.models else ""),
            **({"notes": TEXT_STATEMENT.strip()} if "text" in self.s.models else {}),
        }

    def signing_key(self) -> Path:
        from dpsynth.release import new_keys

        if self.s.key_path:
            key = Path(self.s.key_path)
            if not key.exists():
                raise ConsortiumError(f"signing key {key} does not exist")
            return key
        key = self.out / "keys" / "release.key"
        if not key.exists():
            new_keys(self.out / "keys")
            log.info("created a signing key pair in %s", self.out / "keys")
        return key


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(dict(context.run_config))
    run_id = f"{context.run_id}-{uuid.uuid4().hex[:8]}"
    coord = Coordinator(grid, settings, run_id)
    log.info("dpsynth consortium run %s: ε %.3g requested per site, %d rounds × %d local epochs, models %s, "
             "min-sites %d, out %s", run_id, settings.epsilon, settings.rounds, settings.local_epochs,
             ",".join(settings.models), settings.min_sites, coord.out)
    summary = coord.run()
    if summary["status"] == "released":
        log.info("RELEASED: %s", summary["release"])
    else:
        log.error("NOT RELEASED: %s", summary.get("message"))
