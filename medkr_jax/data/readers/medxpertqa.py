"""MedXpertQA (Text): expert-level questions with up to ten options, labelled Reasoning or Understanding."""

from __future__ import annotations

import os

from medkr_jax.data.readers.fields import (ANSWER_CHOICES, RecordList, field_error, letter_index, limited, make_record,
                                           options_field, require_columns, text_field)
from medkr_jax.data.readers.io import read_rows
from medkr_jax.data.readers.registry import register_reader

MEDXPERTQA_LABELS = {"reasoning": "reasoning", "understanding": "knowledge"}


def _strip_answer_choices(question: str) -> str:
    m = list(ANSWER_CHOICES.finditer(question))
    return question[: m[-1].start()].rstrip() if m else question


@register_reader("medxpertqa")
def read_medxpertqa(path: str | os.PathLike, *, split: str | None = None, strip_choices: bool = True,
                    benchmark: str = "medxpertqa", limit: int | None = None) -> RecordList:
    """MedXpertQA (Text): ``id, question, options{A..J}, label (letter), medical_task, body_system,
    question_type``. ``question_type`` Reasoning/Understanding becomes ``label`` reasoning/knowledge —
    the expert labels the paper's classifier is trained on. The question text repeats the choices
    after "Answer Choices:"; ``strip_choices`` removes that copy (options are kept separately)."""
    rows = limited(read_rows(path, split=split), limit)
    out = RecordList()
    for n, row in enumerate(rows):
        require_columns(row, ("question", "options", "label"), "medxpertqa")
        options = options_field(row)
        idx = letter_index(row, "label", len(options))
        qtype = text_field(row, "question_type", required=False)
        label = None
        if qtype is not None:
            label = MEDXPERTQA_LABELS.get(qtype.strip().lower())
            if label is None:
                raise field_error(row, "question_type", f"expected 'Reasoning' or 'Understanding', got {qtype!r}")
        question = text_field(row, "question")
        if strip_choices:
            question = _strip_answer_choices(question) or question
        meta = {k: row.data[k] for k in ("medical_task", "body_system", "question_type") if row.data.get(k)}
        out.append(make_record(row, id=str(row.data.get("id") or f"{benchmark}-{n}"), benchmark=benchmark,
                               question=question, options=options, answer=idx, label=label, meta=meta))
    return out
