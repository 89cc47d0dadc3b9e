"""What travels between the coordinator and the sites, and how it is checked.

Weights travel as Flower ArrayRecords (numpy, serialised with allow_pickle=False); everything else is JSON
text or plain scalars in ConfigRecords / MetricRecords. Nothing is pickled. Every inbound message is
checked for shape, dtype, finiteness and size before it is used; a malformed or oversized message is
rejected with a WireError naming the site and what was wrong.
"""

from __future__ import annotations

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


def state_to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().float().contiguous() for k, v in state.items()})


def record_to_state(rec, template: dict[str, torch.Tensor], *, who: str, what: str) -> dict[str, torch.Tensor]:
    """Numpy arrays → tensors, checked against the expected state dict (keys, shapes, dtype, finite, size)."""
    if not isinstance(rec, ArrayRecord):
        raise WireError(f"{who}: {what} is not an ArrayRecord")
    keys, expected = set(rec.keys()), set(template)
    if keys != expected:
        raise WireError(f"{who}: {what} has unexpected parameters (missing {sorted(expected - keys)[:5]}, "
                        f"extra {sorted(keys - expected)[:5]})")
    total = rec.count_bytes()
    if total > MAX_WEIGHT_BYTES:
        raise WireError(f"{who}: {what} is {total} bytes, more than the {MAX_WEIGHT_BYTES} allowed")
    out = {}
    for k, t in template.items():
        arr = rec[k].numpy()  # np.load(..., allow_pickle=False) inside Flower
        if arr.dtype != np.float32:
            raise WireError(f"{who}: {what}.{k} has dtype {arr.dtype}, expected float32")
        if tuple(arr.shape) != tuple(t.shape):
            raise WireError(f"{who}: {what}.{k} has shape {tuple(arr.shape)}, expected {tuple(t.shape)}")
        if not np.isfinite(arr).all():
            raise WireError(f"{who}: {what}.{k} contains NaN or infinite values")
        out[k] = torch.from_numpy(np.array(arr, copy=True))
    return out


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
