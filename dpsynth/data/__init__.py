"""Loaders, the embedded demo cohort and site splits."""

from .io import read_table, write_table

__all__ = ["read_table", "write_table"]
