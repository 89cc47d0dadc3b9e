"""Append-only, hash-chained budget ledger (JSON lines).

Each entry holds the SHA-256 of the previous entry; editing, deleting or reordering any line breaks the
chain and ``verify`` says where. The head hash is what a release manifest records.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from ..errors import DpsynthError

GENESIS = "0" * 64


class LedgerError(DpsynthError):
    pass


def _entry_hash(entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Ledger:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        with open(self.path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    raise LedgerError(f"{self.path}: line {i} is not valid JSON") from None
        return out

    def verify(self) -> str:
        """Check the whole chain; return the head hash."""
        prev = GENESIS
        for i, e in enumerate(self.entries(), 1):
            if e.get("seq") != i:
                raise LedgerError(f"{self.path}: entry {i} has seq {e.get('seq')} (deleted or reordered entries)")
            if e.get("prev") != prev:
                raise LedgerError(f"{self.path}: entry {i} does not chain to entry {i - 1} (edited, deleted or reordered)")
            if _entry_hash(e) != e.get("hash"):
                raise LedgerError(f"{self.path}: entry {i} was modified (hash mismatch)")
            prev = e["hash"]
        return prev

    def head(self) -> str:
        return self.verify()

    def append(self, event: str, data: dict) -> dict:
        prev = self.verify()
        seq = len(self.entries()) + 1
        entry = {
            "seq": seq,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "event": event,
            "data": data,
            "prev": prev,
        }
        entry["hash"] = _entry_hash(entry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return entry
