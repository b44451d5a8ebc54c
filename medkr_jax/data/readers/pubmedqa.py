"""PubMedQA: yes / no / maybe questions over PubMed abstracts, in the original and the hub layout."""

from __future__ import annotations

import os

from medkr_jax.data.readers.fields import RecordList, field_error, limited, make_record, require_columns, text_field
from medkr_jax.data.readers.io import read_rows
from medkr_jax.data.readers.registry import register_reader

PUBMEDQA_OPTIONS = ["yes", "no", "maybe"]


@register_reader("pubmedqa")
def read_pubmedqa(path: str | os.PathLike, *, split: str | None = None, benchmark: str = "pubmedqa",
                  limit: int | None = None) -> RecordList:
    """PubMedQA: the original ``{pmid: {QUESTION, CONTEXTS, final_decision, ...}}`` JSON or the hub
    layout (``pubid, question, context{contexts}, final_decision``). Options: yes / no / maybe."""
    rows = limited(read_rows(path, split=split), limit)
    out = RecordList()
    for n, row in enumerate(rows):
        upper = "QUESTION" in row.data
        q_col, c_col = ("QUESTION", "CONTEXTS") if upper else ("question", "context")
        require_columns(row, (q_col, c_col, "final_decision"), "pubmedqa")
        ctx = row.data[c_col]
        if isinstance(ctx, dict):
            ctx = ctx.get("contexts")
        if isinstance(ctx, str):
            ctx = [ctx]
        if not isinstance(ctx, list) or not all(isinstance(c, str) for c in ctx):
            raise field_error(row, c_col, "expected a list of context passages")
        decision = row.data["final_decision"]
        if not isinstance(decision, str) or decision.strip().lower() not in PUBMEDQA_OPTIONS:
            raise field_error(row, "final_decision", f"expected one of {PUBMEDQA_OPTIONS}, got {decision!r}")
        rid = row.data.get("__key__") or row.data.get("pubid") or f"{n}"
        meta = {k.lower(): row.data[k] for k in ("LONG_ANSWER", "long_answer", "YEAR") if row.data.get(k)}
        out.append(make_record(row, id=f"{benchmark}-{rid}", benchmark=benchmark, question=text_field(row, q_col),
                               options=list(PUBMEDQA_OPTIONS), answer=PUBMEDQA_OPTIONS.index(decision.strip().lower()),
                               context="\n".join(ctx), meta=meta))
    return out
