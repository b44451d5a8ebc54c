"""GPQA: graduate-level questions whose source lists the correct answer first (options are shuffled)."""

from __future__ import annotations

import os
import random
from collections.abc import Iterable

from medkr_jax.data.readers.fields import RecordList, limited, make_record, require_columns, text_field
from medkr_jax.data.readers.io import read_rows
from medkr_jax.data.readers.registry import register_reader


@register_reader("gpqa")
def read_gpqa(path: str | os.PathLike, *, seed: int = 0, domains: str | Iterable[str] | None = None,
              benchmark: str = "gpqa", limit: int | None = None) -> RecordList:
    """GPQA CSV: ``Question, Correct Answer, Incorrect Answer 1..3, Record ID, High-level domain,
    Subdomain``. The correct answer is always listed first in the source, so options are shuffled with
    a per-question RNG seeded by ``(seed, Record ID)`` (same order whatever the file order)."""
    if isinstance(domains, str):
        domains = [domains]
    wanted = None if domains is None else {d.strip().lower() for d in domains}
    rows = limited(read_rows(path), limit)
    cols = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
    out = RecordList()
    for n, row in enumerate(rows):
        require_columns(row, cols, "gpqa")
        domain = (text_field(row, "High-level domain", required=False) or "").strip()
        if wanted is not None and domain.lower() not in wanted:
            continue
        rid = text_field(row, "Record ID", required=False) or str(n)
        texts = [text_field(row, c).strip() for c in cols[1:]]
        order = list(range(4))
        random.Random(f"gpqa:{seed}:{rid}").shuffle(order)
        meta = {"domain": domain, "subdomain": (text_field(row, "Subdomain", required=False) or "").strip()}
        out.append(make_record(row, id=f"{benchmark}-{rid}", benchmark=benchmark,
                               question=text_field(row, "Question").strip(), options=[texts[i] for i in order],
                               answer=order.index(0), meta=meta, trace=text_field(row, "Explanation", required=False)))
    return out
