"""USMLE-style question banks in their original layouts: MedQA, MedMCQA and MedBullets."""

from __future__ import annotations

import os

from medkr_jax.data.readers.fields import (AnswerTextCheck, RecordList, field_error, int_index, letter_index, limited,
                                           make_record, options_field, require_columns, text_field)
from medkr_jax.data.readers.io import Row, read_rows
from medkr_jax.data.readers.registry import register_reader
from medkr_jax.data.records import RecordError


@register_reader("medqa")
def read_medqa(path: str | os.PathLike, *, split: str | None = None, benchmark: str = "medqa",
               limit: int | None = None) -> RecordList:
    """MedQA-USMLE JSONL: ``question, answer, options{A..}, answer_idx, meta_info``."""
    rows = limited(read_rows(path, split=split), limit)
    checker = AnswerTextCheck(f"{path} (medqa)")
    out = RecordList()
    for n, row in enumerate(rows):
        require_columns(row, ("question", "options", "answer_idx"), "medqa")
        options = options_field(row)
        idx = letter_index(row, "answer_idx", len(options))
        checker.check(row, "answer", options, idx)
        meta = {"meta_info": row.data["meta_info"]} if row.data.get("meta_info") else {}
        out.append(make_record(row, id=str(row.data.get("id") or f"{benchmark}-{n}"), benchmark=benchmark,
                               question=text_field(row, "question"), options=options, answer=idx, meta=meta))
    checker.report()
    return out


def _infer_cop_base(rows: list[Row], path) -> int:
    """0 or 1: the base of MedMCQA's ``cop`` column, told by a 0 (0-based) or a 4 (1-based) in it."""
    values = set()
    for row in rows:
        try:
            values.add(int(row.data["cop"]))
        except (TypeError, ValueError):
            raise field_error(row, "cop",
                              f"expected an integer correct-option index, got {row.data['cop']!r}") from None
    if 0 in values and 4 in values:
        raise RecordError("column 'cop' holds both 0 and 4; cannot tell 0- from 1-based; pass cop_base",
                          source=str(path))
    if 0 not in values and 4 not in values:
        raise RecordError("column 'cop' holds neither 0 nor 4; cannot tell 0- from 1-based; pass cop_base=0 or 1",
                          source=str(path))
    return 0 if 0 in values else 1


@register_reader("medmcqa")
def read_medmcqa(path: str | os.PathLike, *, split: str | None = None, cop_base: int | None = None,
                 benchmark: str = "medmcqa", limit: int | None = None) -> RecordList:
    """MedMCQA: ``id, question, opa..opd, cop, choice_type, exp, subject_name, topic_name``.

    ``cop`` is 1-based (1..4) in the original JSON release and 0-based (0..3) in the hub version;
    ``cop_base=None`` infers it from the file (a 0 means 0-based, a 4 means 1-based) and raises if
    the file does not tell.
    """
    rows = limited(read_rows(path, split=split), limit)
    cols = ("question", "opa", "opb", "opc", "opd", "cop")
    for row in rows:
        require_columns(row, cols, "medmcqa")
    if cop_base is None:
        cop_base = _infer_cop_base(rows, path)
    out = RecordList()
    for n, row in enumerate(rows):
        options = [text_field(row, c) for c in ("opa", "opb", "opc", "opd")]
        idx = int_index(row, "cop", 4, base=cop_base)
        meta = {k: row.data[k] for k in ("choice_type", "subject_name", "topic_name") if row.data.get(k)}
        if row.data.get("exp"):
            meta["explanation"] = row.data["exp"]
        out.append(make_record(row, id=str(row.data.get("id") or f"{benchmark}-{n}"), benchmark=benchmark,
                               question=text_field(row, "question"), options=options, answer=idx, meta=meta))
    return out


@register_reader("medbullets")
def read_medbullets(path: str | os.PathLike, *, split: str | None = None, benchmark: str = "medbullets",
                    limit: int | None = None) -> RecordList:
    """MedBullets (op4/op5): ``question, opa..opd[, ope], answer_idx (letter), answer, explanation, link``.
    An empty ``ope`` means a 4-option question."""
    rows = limited(read_rows(path, split=split), limit)
    checker = AnswerTextCheck(f"{path} (medbullets)")
    out = RecordList()
    for n, row in enumerate(rows):
        require_columns(row, ("question", "opa", "opb", "opc", "opd", "answer_idx"), "medbullets")
        options = [text_field(row, c) for c in ("opa", "opb", "opc", "opd")]
        ope = text_field(row, "ope", required=False)
        if ope and ope.strip():
            options.append(ope)
        idx = letter_index(row, "answer_idx", len(options))
        checker.check(row, "answer", options, idx)
        meta = {"link": row.data["link"]} if row.data.get("link") else {}
        if row.data.get("explanation"):
            meta["explanation"] = row.data["explanation"]
        out.append(make_record(row, id=str(row.data.get("id") or f"{benchmark}-{n}"), benchmark=benchmark,
                               question=text_field(row, "question"), options=options, answer=idx, meta=meta))
    checker.report()
    return out
