"""The canonical multiple-choice record, its validation, and JSONL / Parquet I/O.

Every benchmark reader (``data/readers/``) and the synthetic world (``data/synthetic/``) produce
``MCQRecord`` objects; every job downstream consumes them. Validation errors are raised as one
``RecordError`` whose message names the file, the row/line and the field at fault.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from medkr_jax.data.answer import LETTERS
from medkr_jax.data.text import normalize_text, option_key

LABELS = ("reasoning", "knowledge")


class RecordError(ValueError):
    """A record or source row is malformed.

    The message reads ``"<file>, <line N|row N>, field '<name>': <what was expected>"`` so a user can
    go straight to the offending entry. The parts are also kept as attributes for programs.
    """

    def __init__(
        self,
        reason: str,
        *,
        source: str | os.PathLike | None = None,
        where: str | None = None,
        field: str | None = None,
    ):
        self.reason = reason
        self.source = None if source is None else str(source)
        self.where = where
        self.field = field
        parts = [self.source or "<in-memory records>"]
        if where:
            parts.append(where)
        if field:
            parts.append(f"field {field!r}")
        super().__init__(", ".join(parts) + ": " + reason)


@dataclass
class MCQRecord:
    """One multiple-choice question in the project-wide canonical form.

    ``answer`` is the 0-based index into ``options``. ``label`` is a ground-truth
    reasoning/knowledge label (by construction or expert annotation); ``is_reasoning`` and
    ``reasoning_prob`` carry a classifier's released prediction, kept apart from ``label``.
    """

    id: str
    benchmark: str
    question: str
    options: list[str]
    answer: int
    context: str | None = None
    label: str | None = None
    meta: dict = field(default_factory=dict)
    trace: str | None = None
    adversarial_traces: list[str] = field(default_factory=list)
    reasoning_prob: float | None = None
    is_reasoning: bool | None = None

    @property
    def answer_letter(self) -> str:
        """The answer as a letter (``"A"`` for index 0)."""
        return LETTERS[self.answer]

    @property
    def answer_text(self) -> str:
        """The text of the correct option."""
        return self.options[self.answer]

    @property
    def letters(self) -> str:
        """The option letters of this question, e.g. ``"ABCD"``."""
        return LETTERS[: len(self.options)]

    def validate(self, *, source: str | os.PathLike | None = None, where: str | None = None,
                 duplicate_options_ok: bool = False) -> MCQRecord:
        """Check every field; raise ``RecordError`` naming ``source``/``where`` and the field.

        Options that repeat a text (``duplicate_options``) are an error unless ``duplicate_options_ok`` (the
        benchmark readers, which drop such questions of published sets with a count and a warning)."""
        validate_record(self, source=source, where=where, duplicate_options_ok=duplicate_options_ok)
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict with exactly the dataclass fields."""
        return {
            f.name: (list(v) if isinstance(v := getattr(self, f.name), list) else v)
            for f in dataclasses.fields(self)
        } | {"meta": dict(self.meta)}

    @classmethod
    def from_dict(
        cls,
        data: dict[str, Any],
        *,
        source: str | os.PathLike | None = None,
        where: str | None = None,
    ) -> MCQRecord:
        """Build and validate a record from a dict of canonical fields (unknown keys are errors)."""
        if not isinstance(data, dict):
            raise RecordError(
                f"expected a JSON object with the record fields, got {type(data).__name__}",
                source=source,
                where=where,
            )
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise RecordError(
                f"unknown field(s) {unknown}; a record has fields {names}",
                source=source,
                where=where,
                field=unknown[0],
            )
        for f in dataclasses.fields(cls):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                if f.name not in data:
                    raise RecordError("required field is missing", source=source, where=where, field=f.name)
        kwargs = dict(data)
        # Parquet/JSON may give None for an empty list/dict column; the dataclass wants the empty value.
        if kwargs.get("meta") is None:
            kwargs["meta"] = {}
        if kwargs.get("adversarial_traces") is None:
            kwargs["adversarial_traces"] = []
        if isinstance(kwargs.get("meta"), str):
            try:
                kwargs["meta"] = json.loads(kwargs["meta"])
            except json.JSONDecodeError as e:
                raise RecordError(f"meta is not valid JSON: {e}", source=source, where=where, field="meta") from None
        record = cls(**kwargs)
        return record.validate(source=source, where=where)


def _is_int(x: Any) -> bool:
    # bool is an int subclass; True as an answer index is a data bug, not index 1.
    return isinstance(x, int) and not isinstance(x, bool)


def validate_record(
    record: MCQRecord, *, source: str | os.PathLike | None = None, where: str | None = None,
    duplicate_options_ok: bool = False,
) -> None:
    """Raise ``RecordError`` (naming file, row/line and field) if ``record`` breaks the contract."""

    def fail(field_name: str, reason: str) -> None:
        raise RecordError(reason, source=source, where=where, field=field_name)

    if where is None and isinstance(getattr(record, "id", None), str) and record.id:
        where = f"record {record.id!r}"
    if not isinstance(record.id, str) or not record.id.strip():
        fail("id", f"expected a non-empty string, got {record.id!r}")
    if not isinstance(record.benchmark, str) or not record.benchmark.strip():
        fail("benchmark", f"expected a non-empty string, got {record.benchmark!r}")
    if not isinstance(record.question, str) or not record.question.strip():
        fail("question", f"expected a non-empty question text, got {record.question!r}")
    if not isinstance(record.options, list):
        fail("options", f"expected a list of option texts, got {type(record.options).__name__}")
    if len(record.options) < 2:
        fail("options", f"expected at least 2 options, got {len(record.options)}")
    if len(record.options) > len(LETTERS):
        fail("options", f"expected at most {len(LETTERS)} options, got {len(record.options)}")
    for i, opt in enumerate(record.options):
        if not isinstance(opt, str) or not opt.strip():
            fail("options", f"option {LETTERS[i]} must be a non-empty string, got {opt!r}")
    dup = None if duplicate_options_ok else duplicate_options(record.options)
    if dup is not None:
        i, j = dup
        fail("options", f"options {LETTERS[i]} and {LETTERS[j]} of record {record.id!r} are the same text "
                        f"({record.options[i]!r} / {record.options[j]!r}, spacing and a final period ignored), so an "
                        "answer naming it cannot be scored; remove or reword the duplicate")
    if not _is_int(record.answer):
        fail("answer", f"expected an integer option index, got {record.answer!r}")
    if not 0 <= record.answer < len(record.options):
        fail(
            "answer",
            f"index {record.answer} is out of range for {len(record.options)} options "
            f"(expected 0..{len(record.options) - 1})",
        )
    if record.context is not None and not isinstance(record.context, str):
        fail("context", f"expected a string or None, got {type(record.context).__name__}")
    if record.label is not None and record.label not in LABELS:
        fail("label", f"expected one of {list(LABELS)} or None, got {record.label!r}")
    if not isinstance(record.meta, dict):
        fail("meta", f"expected a dict, got {type(record.meta).__name__}")
    if record.trace is not None and not isinstance(record.trace, str):
        fail("trace", f"expected a string or None, got {type(record.trace).__name__}")
    if not isinstance(record.adversarial_traces, list) or not all(
        isinstance(t, str) for t in record.adversarial_traces
    ):
        fail("adversarial_traces", "expected a list of strings")
    if record.reasoning_prob is not None:
        p = record.reasoning_prob
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
            fail("reasoning_prob", f"expected a probability in [0, 1] or None, got {p!r}")
    if record.is_reasoning is not None and not isinstance(record.is_reasoning, bool):
        fail("is_reasoning", f"expected a bool or None, got {record.is_reasoning!r}")


# ---------------------------------------------------------------------------------------------
# Duplicate detection


def duplicate_options(options: Iterable[str]) -> tuple[int, int] | None:
    """The first pair (i, j), i < j, of options with the same ``option_key`` (which no answer extractor
    can tell apart), or None."""
    seen: dict[str, int] = {}
    for j, opt in enumerate(options):
        key = option_key(opt)
        if key in seen:
            return seen[key], j
        seen[key] = j
    return None


def text_hash(text: str) -> str:
    """A stable 16-hex-digit hash of ``normalize_text(text)`` (same across runs and machines)."""
    return hashlib.sha1(normalize_text(text).encode("utf-8")).hexdigest()[:16]


def question_hash(record: MCQRecord, *, with_options: bool = True) -> str:
    """Hash identifying a question: its normalised stem, plus its option set when ``with_options``.

    Options are sorted before hashing so a reshuffled copy of a question (e.g. GPQA) still matches,
    while generic stems ("Which of the following is true?") with different options do not.
    """
    parts = [normalize_text(record.question)]
    if with_options:
        parts += sorted(normalize_text(o) for o in record.options)
    return hashlib.sha1("\x1f".join(parts).encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# JSONL / Parquet I/O


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, parsed_json)`` for each non-blank line; errors name the line.

    Raises ``FileNotFoundError`` for a missing file and ``RecordError`` for bad JSON or an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    seen = False
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"invalid JSON ({e.msg} at column {e.colno})", source=path, where=f"line {lineno}") from None
            seen = True
            yield lineno, obj
    if not seen:
        raise RecordError("file is empty (expected one JSON object per line)", source=path)


_RECORD_FORMATS = (".jsonl", ".parquet")


_EXPECTED = "a .jsonl or .parquet file of canonical records"


def _record_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in _RECORD_FORMATS:
        raise ValueError(f"{path}: unsupported record file extension {suffix!r}; expected one of {_RECORD_FORMATS}")
    return suffix


def _check_records_path(path: Path) -> None:
    """A folder or a missing extension-less path (an ``owner/name``) given where a records file is read."""
    if path.is_dir():
        raise ValueError(f"{path} is a folder; expected {_EXPECTED} (a published benchmark's folder or file "
                         "needs its reader, e.g. 'biomed_r1_eval:<folder>?config=medqa')")
    if not path.suffix and not path.exists():
        raise FileNotFoundError(f"{path}: no such file; expected {_EXPECTED} (a Hugging Face Hub dataset id "
                                "needs its reader and hub=1, e.g. 'biomed_r1_eval:owner/name?config=medqa&hub=1')")


def read_records(path: str | os.PathLike) -> list[MCQRecord]:
    """Read canonical records from ``.jsonl`` (one record per line) or ``.parquet``; all validated."""
    path = Path(path)
    _check_records_path(path)
    fmt = _record_format(path)
    if fmt == ".jsonl":
        return [MCQRecord.from_dict(obj, source=path, where=f"line {n}") for n, obj in iter_jsonl(path)]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise RecordError(f"cannot read as Parquet: {e}", source=path) from None
    if not rows:
        raise RecordError("file has no rows", source=path)
    return [MCQRecord.from_dict(row, source=path, where=f"row {i}") for i, row in enumerate(rows, start=1)]


def _parquet_schema() -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.string()),
            ("benchmark", pa.string()),
            ("question", pa.string()),
            ("options", pa.list_(pa.string())),
            ("answer", pa.int64()),
            ("context", pa.string()),
            ("label", pa.string()),
            # meta is free-form per benchmark; a JSON string keeps the Parquet schema fixed.
            ("meta", pa.string()),
            ("trace", pa.string()),
            ("adversarial_traces", pa.list_(pa.string())),
            ("reasoning_prob", pa.float64()),
            ("is_reasoning", pa.bool_()),
        ]
    )


def write_records(path: str | os.PathLike, records: Iterable[MCQRecord]) -> Path:
    """Validate and write records to ``.jsonl`` or ``.parquet`` (atomically: temp file + rename)."""
    path = Path(path)
    fmt = _record_format(path)
    records = list(records)
    for r in records:
        r.validate(source=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if fmt == ".jsonl":
        with tmp.open("w", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
    else:
        rows = [r.to_dict() | {"meta": json.dumps(r.meta, ensure_ascii=False)} for r in records]
        pq.write_table(pa.Table.from_pylist(rows, schema=_parquet_schema()), tmp)
    os.replace(tmp, path)
    return path
