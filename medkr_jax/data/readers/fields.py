"""Field parsing shared by the benchmark readers: typed values out of a raw ``Row`` (each error names the
file, the row/line and the field), record building, the answer-text check and duplicate-option dropping.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence

from medkr_jax.data.answer import LETTERS
from medkr_jax.data.readers.io import Row
from medkr_jax.data.records import MCQRecord, RecordError, duplicate_options
from medkr_jax.data.text import normalize_text

log = logging.getLogger(__name__)

# The marker before a list of options written into the question text (MedXpertQA, HLE).
ANSWER_CHOICES = re.compile(r"\s*answer choices:", re.IGNORECASE)
_LETTER_FORMS = re.compile(r"^\(?([A-Za-z])[\)\.:]?$")


class RecordList(list):
    """A list of records that also says what the reader skipped on purpose and why.

    ``skipped`` maps a reason (e.g. ``"not multiple-choice"``) to a count. Readers never skip
    malformed rows silently: only rows that are out of scope by design (HLE free-text answers,
    image questions, a repeated header line) are skipped, counted here and logged.
    """

    def __init__(self, records: Iterable[MCQRecord] = (), skipped: dict[str, int] | None = None):
        super().__init__(records)
        self.skipped: dict[str, int] = dict(skipped or {})


def limited(items: list, limit: int | None) -> list:
    """The first ``limit`` items (all of them when ``limit`` is None)."""
    return items if limit is None else items[:limit]


def require_columns(row: Row, columns: Sequence[str], layout: str) -> None:
    """Raise naming the missing columns of ``layout`` and the columns the row has."""
    missing = [c for c in columns if c not in row.data]
    if missing:
        found = sorted(k for k in row.data if k != "__key__")
        raise RecordError(
            f"missing column(s) {missing} for the {layout!r} layout (found columns {found})",
            source=row.source,
            where=row.where,
            field=missing[0],
        )


def field_error(row: Row, field: str, reason: str) -> RecordError:
    """A ``RecordError`` about ``field`` of ``row``."""
    return RecordError(reason, source=row.source, where=row.where, field=field)


def text_field(row: Row, column: str, *, required: bool = True) -> str | None:
    """The text in ``column`` (numbers as text); None for an empty optional value."""
    value = row.data.get(column)
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        if required:
            raise field_error(row, column, "expected text, got an empty value")
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise field_error(row, column, f"expected text, got {type(value).__name__}")
    if required and not value.strip():
        raise field_error(row, column, "expected non-empty text")
    return value


def options_field(row: Row, column: str = "options") -> list[str]:
    """Options given as a letter->text dict, a list, or a JSON string of either."""
    value = row.data.get(column)
    if value is None:
        raise field_error(row, column, "options are missing (empty value)")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise field_error(row, column, f"options JSON string does not parse ({e.msg} at char {e.pos}): "
                                           f"{value[:60]!r}") from None
    if isinstance(value, dict):
        keys = [str(k).strip().upper() for k in value]
        expected = list(LETTERS[: len(keys)])
        if sorted(keys) != expected:
            raise field_error(row, column, f"option keys {list(value)} are not the letters {expected}")
        by_letter = {str(k).strip().upper(): v for k, v in value.items()}
        texts = [by_letter[k] for k in expected]
    elif isinstance(value, (list, tuple)):
        texts = list(value)
    else:
        raise field_error(row, column, f"expected a letter->text mapping or a list, got {type(value).__name__}")
    out = []
    for i, t in enumerate(texts):
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            t = str(t)
        if not isinstance(t, str) or not t.strip():
            raise field_error(row, column,
                              f"option {LETTERS[i] if i < len(LETTERS) else i} must be non-empty text, got {t!r}")
        out.append(t)
    if len(out) < 2:
        raise field_error(row, column, f"expected at least 2 options, got {len(out)}")
    return out


def letter_index(row: Row, column: str, n_options: int) -> int:
    """The 0-based index of an answer letter (``"B"``, ``"(b)"``, ``"B."``) among ``n_options``."""
    value = row.data.get(column)
    if not isinstance(value, str) or not _LETTER_FORMS.match(value.strip()):
        raise field_error(row, column, f"expected an answer letter, got {value!r}")
    idx = LETTERS.index(_LETTER_FORMS.match(value.strip()).group(1).upper())
    if idx >= n_options:
        raise field_error(row, column, f"answer letter {value.strip()!r} is not among the options "
                                       f"{LETTERS[0]}-{LETTERS[n_options - 1]}")
    return idx


def int_index(row: Row, column: str, n_options: int, *, base: int = 0) -> int:
    """The 0-based index of an integer answer column counted from ``base``."""
    value = row.data.get(column)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise field_error(row, column, f"expected an integer answer index, got {value!r}")
    idx = value - base
    if not 0 <= idx < n_options:
        raise field_error(row, column, f"answer {value} is out of range for {n_options} options "
                                       f"(expected {base}..{n_options - 1 + base})")
    return idx


def float_field(row: Row, column: str) -> float | None:
    """A number, or None for an empty value or NaN."""
    value = row.data.get(column)
    if value is None or value == "":
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise field_error(row, column, f"expected a number, got {value!r}") from None
    return None if f != f else f


def bool_field(row: Row, column: str) -> bool | None:
    """A boolean (``True``, ``"true"``, ``1`` ...), or None for an empty value."""
    value = row.data.get(column)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise field_error(row, column, f"expected a boolean, got {value!r}")


def make_record(row: Row, **fields) -> MCQRecord:
    """A validated record built from ``row`` (errors name its file and row); repeated options pass
    here and are dropped later by ``drop_duplicate_options``."""
    rec = MCQRecord(**fields)
    return rec.validate(source=row.source, where=row.where, duplicate_options_ok=True)


def drop_duplicate_options(name: str, records: RecordList) -> RecordList:
    """Published sets hold a few questions whose options repeat a text (full MMLU: 9 of 14,042, e.g.
    ['0.16 N', '0.16 N', '0.32 N', '0.36 N']); no extractor can score an answer naming the repeated text,
    so they are dropped, counted in ``.skipped`` and named in a warning."""
    kept, dropped = RecordList(skipped=records.skipped), []
    for r in records:
        dup = duplicate_options(r.options)
        if dup is None:
            kept.append(r)
        else:
            dropped.append(f"{r.id} (options {LETTERS[dup[0]]} and {LETTERS[dup[1]]} are both {r.options[dup[0]]!r})")
    if dropped:
        kept.skipped["options repeat a text"] = len(dropped)
        log.warning("%s: dropped %d question(s) whose options repeat a text (an answer naming it cannot be "
                    "scored): %s%s", name, len(dropped), "; ".join(dropped[:5]), " ..." if len(dropped) > 5 else "")
    return kept


class AnswerTextCheck:
    """Counts rows whose answer text disagrees with options[answer] (reported, not fatal)."""

    def __init__(self, name: str):
        self.name, self.mismatches, self.first = name, 0, None

    def check(self, row: Row, column: str, options: list[str], idx: int) -> None:
        text = row.data.get(column)
        if isinstance(text, str) and text.strip() and normalize_text(text) != normalize_text(options[idx]):
            self.mismatches += 1
            self.first = self.first or f"{row.source}, {row.where}"

    def report(self) -> None:
        if self.mismatches:
            log.warning("%s: %d row(s) whose answer text differs from the option its letter/index "
                        "points to (first: %s); the letter/index was used.", self.name, self.mismatches, self.first)
