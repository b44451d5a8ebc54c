"""The project's own canonical records (``write_records`` output, JSONL or Parquet) as a benchmark: the
reader a spec string without a known reader prefix gets."""

from __future__ import annotations

import os

from medkr_jax.data.readers.fields import RecordList
from medkr_jax.data.readers.registry import register_reader
from medkr_jax.data.records import read_records


@register_reader("records")
def read_canonical(path: str | os.PathLike) -> RecordList:
    """Canonical records written by ``write_records`` (JSONL or Parquet)."""
    return RecordList(read_records(path))
