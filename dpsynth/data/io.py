"""Reading and writing tables (CSV / Parquet) with errors that name the file."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import pandas as pd

from ..errors import DataError
from ..io_utils import atomic_write_bytes


def _check_header(path: Path) -> None:
    """pandas silently renames duplicate CSV headers (a, a.1): catch them on the raw header first."""
    with open(path, newline="", encoding="utf-8") as f:
        try:
            header = next(csv.reader(f), None)
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None
        except csv.Error as e:
            raise DataError(f"{path}: malformed CSV header ({e})") from None
    if header is None or not any(h.strip() for h in header):
        raise DataError(f"{path}: the file is empty (no header row)")
    names = [h.strip() for h in header]
    dup = sorted({h for h in names if names.count(h) > 1})
    if dup:
        raise DataError(f"{path}: duplicate column names {dup}")
    blank = [i + 1 for i, h in enumerate(names) if not h]
    if blank:
        raise DataError(f"{path}: header has unnamed columns at positions {blank}")


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        raise DataError(f"{path} is a directory, expected a CSV or Parquet file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
            cols = [str(c) for c in df.columns]
            dup = sorted({c for c in cols if cols.count(c) > 1})
            if dup:
                raise DataError(f"{path}: duplicate column names {dup}")
        else:
            _check_header(path)
            df = pd.read_csv(path, keep_default_na=True, na_values=[""], low_memory=False)
    except DataError:
        raise
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as e:
        raise DataError(f"{path}: cannot be read as a table ({type(e).__name__}: {e})") from None
    df.columns = [str(c).strip() for c in df.columns]
    if len(df) == 0:
        raise DataError(f"{path}: the file has a header but no data rows")
    return df


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Atomic write: the file appears only when complete."""
    path = Path(path)
    if path.suffix.lower() in (".parquet", ".pq"):
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        atomic_write_bytes(path, buf.getvalue())
    else:
        atomic_write_bytes(path, df.to_csv(index=False).encode("utf-8"))
