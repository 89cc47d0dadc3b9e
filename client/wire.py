"""What travels between the coordinator and the sites, and how it is checked.

Weights travel as Flower ArrayRecords, one float32 vector per model and the digest of its parameter layout
(numpy, serialised with allow_pickle=False); everything else is JSON
text or plain scalars in ConfigRecords / MetricRecords. Nothing is pickled. Every inbound message is
checked for shape, dtype, finiteness and size before it is used; a malformed or oversized message is
rejected with a WireError naming the site and what was wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict

import numpy as np
import torch

from flwr.app import ArrayRecord, ConfigRecord

from dpsynth.models.flow import FlowConfig
from dpsynth.models.text import TextConfig
from dpsynth.models.wgan import WGANConfig

MAX_WEIGHT_BYTES = 64 * 1024 * 1024  # per model
MAX_JSON_CHARS = 4 * 1024 * 1024
MAX_RELEASE_BYTES = 64 * 1024 * 1024

HELLO = "query.hello"
TRAIN = "train"
AUDIT = "evaluate.audit"


class WireError(ValueError):
    """A message that does not have the expected form (malformed, oversized, non-finite, wrong keys)."""


def _layout(state: dict[str, torch.Tensor]) -> tuple[list[str], bytes]:
    """The parameter names in wire order (sorted) and the SHA-256 of names and shapes."""
    keys = sorted(state)
    desc = ";".join(f"{k}:{tuple(state[k].shape)}" for k in keys)
    return keys, hashlib.sha256(desc.encode()).digest()


def state_to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """A model's weights as two arrays: every parameter flattened into one float32 vector (parameters in sorted
    name order) and the SHA-256 of the parameter names and shapes. Flower sends each array of a record as its own
    object (a request each way through SuperLink and SuperNode): one vector per model instead of one array per
    tensor (≈ 100 for the demo's four models) takes seconds off every round."""
    keys, digest = _layout(state)
    parts = [state[k].detach().cpu().float().reshape(-1) for k in keys]
    flat = torch.cat(parts) if parts else torch.zeros(0)
    return ArrayRecord({"flat": flat.contiguous(), "layout": torch.frombuffer(bytearray(digest), dtype=torch.uint8)})


def record_to_state(rec, template: dict[str, torch.Tensor], *, who: str, what: str) -> dict[str, torch.Tensor]:
    """``state_to_record``'s arrays → tensors, checked against the expected state dict: the same parameter names
    and shapes (layout digest), float32, the exact size, finite values, at most MAX_WEIGHT_BYTES."""
    if not isinstance(rec, ArrayRecord):
        raise WireError(f"{who}: {what} is not an ArrayRecord")
    if set(rec.keys()) != {"flat", "layout"}:
        raise WireError(f"{who}: {what} is not a dpsynth weight record (arrays {sorted(rec.keys())[:5]}, expected "
                        "'flat' and 'layout')")
    total = rec.count_bytes()
    if total > MAX_WEIGHT_BYTES:
        raise WireError(f"{who}: {what} is {total} bytes, more than the {MAX_WEIGHT_BYTES} allowed")
    keys, digest = _layout(template)
    layout = rec["layout"].numpy()  # np.load(..., allow_pickle=False) inside Flower
    if layout.dtype != np.uint8 or layout.tobytes() != digest:
        raise WireError(f"{who}: {what} has other parameters than this side's model (names or shapes differ: the "
                        "two sides run different model settings or versions)")
    flat = rec["flat"].numpy()
    if flat.dtype != np.float32:
        raise WireError(f"{who}: {what} has dtype {flat.dtype}, expected float32")
    sizes = [template[k].numel() for k in keys]
    if flat.ndim != 1 or flat.size != sum(sizes):
        raise WireError(f"{who}: {what} has {flat.size} values in shape {flat.shape}, expected a vector of {sum(sizes)}")
    out, i = {}, 0
    for k, n in zip(keys, sizes):
        arr = flat[i : i + n]
        i += n
        if not np.isfinite(arr).all():
            raise WireError(f"{who}: {what}.{k} contains NaN or infinite values")
        out[k] = torch.from_numpy(np.array(arr, copy=True)).reshape(template[k].shape)
    return {k: out[k] for k in template}


def dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, allow_nan=False, default=_jsonable)


def _jsonable(o):
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def loads(text, *, who: str, what: str, limit: int = MAX_JSON_CHARS):
    if not isinstance(text, str):
        raise WireError(f"{who}: {what} is not text")
    if len(text) > limit:
        raise WireError(f"{who}: {what} is {len(text)} characters, more than the {limit} allowed")
    try:
        return json.loads(text, parse_constant=_no_constants)
    except (json.JSONDecodeError, ValueError) as e:
        raise WireError(f"{who}: {what} is not valid JSON ({e})") from None


def _no_constants(c):
    raise ValueError(f"non-finite number {c} is not allowed")


def finite_number(v, *, who: str, what: str, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise WireError(f"{who}: {what} must be a finite number, got {v!r}")
    if lo is not None and v < lo or hi is not None and v > hi:
        raise WireError(f"{who}: {what} = {v!r} is outside [{lo}, {hi}]")
    return float(v)


def wgan_to_json(w: WGANConfig) -> str:
    d = asdict(w)
    d["betas"] = list(d["betas"])
    return dumps(d)


def wgan_from_json(text: str) -> WGANConfig:
    d = loads(text, who="coordinator", what="wgan config")
    allowed = set(WGANConfig.__dataclass_fields__)
    unknown = set(d) - allowed
    if unknown:
        raise WireError(f"coordinator: unknown WGAN settings {sorted(unknown)}")
    if "betas" in d:
        d["betas"] = tuple(d["betas"])
    return WGANConfig(**d)


def flow_to_json(f: FlowConfig) -> str:
    return dumps(asdict(f))


def _settings_from_json(text: str, cls, what: str):
    """A coordinator's model settings: known fields only, validated by the dataclass."""
    d = loads(text, who="coordinator", what=f"{what} config")
    unknown = set(d) - set(cls.__dataclass_fields__)
    if unknown:
        raise WireError(f"coordinator: unknown {what} settings {sorted(unknown)}")
    try:
        return cls(**d)
    except (TypeError, ValueError) as e:
        raise WireError(f"coordinator: invalid {what} settings ({e})") from None


def flow_from_json(text: str) -> FlowConfig:
    return _settings_from_json(text, FlowConfig, "flow")


def text_to_json(t: TextConfig) -> str:
    return dumps(asdict(t))


def text_from_json(text: str) -> TextConfig:
    return _settings_from_json(text, TextConfig, "note model")


def config(**kw) -> ConfigRecord:
    return ConfigRecord({k: v for k, v in kw.items() if v is not None})
