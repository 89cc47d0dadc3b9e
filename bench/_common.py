"""Shared helpers for benchmark scripts: environment facts, peak memory, JSON output."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def environment() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    print(json.dumps(result, indent=2, sort_keys=True))
    print(f"saved {path}", file=sys.stderr)
    return path


def demo_frames(tmp: str | Path, *, notes: bool = False):
    """Write the demo cohort (with its rendered notes when ``notes``) under ``tmp``/data and return (data dir,
    schema, train frame, holdout frame)."""
    import pandas as pd

    from dpsynth.data.demo import demo_schema, demo_schema_with_notes, write_demo
    from dpsynth.schema import validate_frame

    data = Path(tmp) / "data"
    write_demo(data, notes=notes)
    schema = demo_schema_with_notes() if notes else demo_schema()
    real = validate_frame(pd.read_csv(data / "train.csv"), schema, "train")
    hold = validate_frame(pd.read_csv(data / "holdout.csv"), schema, "holdout")
    return data, schema, real, hold


def demo_notes(max_len: int):
    """The demo cohort with rendered notes for the note-model benchmarks: (schema, train frame, holdout frame,
    tokenizer, int64 tensor of the training notes' padded token ids)."""
    import tempfile

    import torch

    from dpsynth.models.text import NoteTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        _, schema, tr, ho = demo_frames(tmp, notes=True)
    tok = NoteTokenizer.from_schema(schema, max_len=max_len)
    enc = tok.encode(tr.reset_index(drop=True), tr["note"].tolist())
    return schema, tr, ho, tok, torch.from_numpy(enc.ids[enc.present])


def pooled_exposure(per_run: list[dict]) -> dict:
    """One repetition count's canaries of all runs as one sample: their mean exposure and the gate's lower 95 %
    bound of it (audits.text.exposure_lower_bound). Each run plants its own secrets in its own hosts and draws its
    own DP noise, so the runs' canaries are independent, and one test of all of them has more power than one per
    run (empty when a run predates the per-canary values)."""
    from audits.text import exposure_lower_bound

    if not all("exposures" in e for e in per_run):
        return {}
    v = [x for e in per_run for x in e["exposures"]]
    return {"pooled": {"n": len(v), "mean": sum(v) / len(v), "lower_bound": exposure_lower_bound(v)}}
