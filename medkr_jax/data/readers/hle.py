"""Humanity's Last Exam: only its text multiple-choice items, whose options are written in the question."""

from __future__ import annotations

import logging
import os
import re

from medkr_jax.data.answer import LETTERS
from medkr_jax.data.readers.fields import (ANSWER_CHOICES, RecordList, letter_index, limited, make_record,
                                           require_columns, text_field)
from medkr_jax.data.readers.io import read_rows
from medkr_jax.data.readers.registry import register_reader

log = logging.getLogger(__name__)

_HLE_OPTION = re.compile(r"^\s*\(?([A-Z])[\.\)]\s*(.*)$")


def parse_inline_choices(text: str) -> tuple[str, list[str]] | None:
    """Split ``"<stem>\\n\\nAnswer Choices:\\nA. x\\nB. y ..."`` into ``(stem, [x, y, ...])``.

    Returns None when no well-formed A, B, C ... list follows the last "Answer Choices:" marker.
    """
    m = list(ANSWER_CHOICES.finditer(text))
    if not m:
        return None
    stem, tail = text[: m[-1].start()].rstrip(), text[m[-1].end():]
    options: list[str] = []
    for line in tail.splitlines():
        om = _HLE_OPTION.match(line)
        if om and om.group(1) == LETTERS[len(options)]:
            options.append(om.group(2).strip())
        elif options and line.strip():
            options[-1] = (options[-1] + "\n" + line.strip()).strip()  # a multi-line option
        elif line.strip():
            return None
    if len(options) < 2 or not stem or not all(options):
        return None
    return stem, options


@register_reader("hle")
def read_hle(path: str | os.PathLike, *, split: str | None = None, text_only: bool = True,
             benchmark: str = "hle", limit: int | None = None) -> RecordList:
    """Humanity's Last Exam: ``id, question, answer, answer_type, image, category, raw_subject``.

    Only multiple-choice items become records (their options are parsed from the question text);
    exact-match items, image items (with ``text_only``) and choice lists that do not parse are
    skipped, counted in ``.skipped`` and logged.
    """
    rows = limited(read_rows(path, split=split), limit)
    out = RecordList()

    def skip(reason: str) -> None:
        out.skipped[reason] = out.skipped.get(reason, 0) + 1

    for n, row in enumerate(rows):
        require_columns(row, ("question", "answer", "answer_type"), "hle")
        if str(row.data["answer_type"]).strip() != "multipleChoice":
            skip("not multiple-choice")
            continue
        if text_only and row.data.get("image"):
            skip("has an image")
            continue
        parsed = parse_inline_choices(text_field(row, "question"))
        if parsed is None:
            skip("answer choices not parseable")
            continue
        stem, options = parsed
        idx = letter_index(row, "answer", len(options))
        meta = {k: row.data[k] for k in ("category", "raw_subject") if row.data.get(k)}
        out.append(make_record(row, id=str(row.data.get("id") or f"{benchmark}-{n}"), benchmark=benchmark,
                               question=stem, options=options, answer=idx, meta=meta,
                               trace=text_field(row, "rationale", required=False)))
    if out.skipped:
        log.warning("%s (hle): kept %d multiple-choice items, skipped %s", path, len(out), out.skipped)
    return out
